"""Token masking in pixel space and the token choices of the sample- and concept-level evaluations.

A VQ image is a 16 x 16 grid of tokens; token position ``p`` (row-major, ``p = row*16 + col``) covers
the ``image_size // 16`` pixel square at row ``p // 16``, col ``p % 16`` (SPEC §3). *Masking* a
position blacks out that square (pixel value 0 in ``[0, 1]`` images, i.e. RGB (0, 0, 0)).

The evaluations mask by **token id**: every position of an image whose id is in a chosen set.

* sample level: the ids at the image's top-n TIS positions (``top_ids``), or at n random positions
  (``random_positions``; the top-n / random-n for every n are prefixes of one ranking per image);
* concept level: a label's concept tokens (TIS statistics) or its frequency-baseline tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import GRID, N_POS
from .utils import CortexError


def patch_size(image_size: int) -> int:
    """Pixels per token side (``image_size // 16``); the image must be at least 16 px."""
    p = int(image_size) // GRID
    if p < 1 or int(image_size) % GRID:
        raise CortexError(f"image size {image_size} px is not a multiple of {GRID}: cannot map the 16x16 token "
                          f"grid onto it (the real VQGAN's images are 256 px, the synthetic world's 16*patch_size)")
    return p


def positions_with_ids(ids, token_set) -> np.ndarray:
    """Boolean position mask: ``ids`` (..., 256) int -> (..., 256) bool, True where the id is in ``token_set``."""
    ids = np.asarray(ids, dtype=np.int64)
    tokens = np.fromiter((int(t) for t in token_set), dtype=np.int64)
    return np.isin(ids, tokens)


def pixel_mask(pos_mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 256) bool position mask -> (B, 1, H, W) bool pixel mask (True = blacked out)."""
    pos_mask = torch.as_tensor(pos_mask, dtype=torch.bool)
    if pos_mask.ndim == 1:
        pos_mask = pos_mask[None]
    if pos_mask.shape[-1] != N_POS:
        raise CortexError(f"a position mask needs {N_POS} entries per image, got {pos_mask.shape[-1]}")
    p = patch_size(image_size)
    grid = pos_mask.view(-1, 1, GRID, GRID)
    return grid.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (B, 1, H, W)


def mask_images(images: torch.Tensor, pos_mask) -> torch.Tensor:
    """Black out the patches of the masked positions.

    images: (B, 3, H, W) (any range; masked pixels become 0, i.e. black for ``[0, 1]`` or uint8 images)
    or one image (3, H, W) broadcast against several masks; pos_mask: (B, 256) or (256,) bool.
    Returns a new (B, 3, H, W) tensor.
    """
    if images.ndim == 3:
        images = images[None]
    if images.shape[-1] != images.shape[-2]:
        raise CortexError(f"images must be square, got {tuple(images.shape[-2:])}")
    m = pixel_mask(torch.as_tensor(pos_mask), images.shape[-1]).to(images.device)  # (B, 1, H, W)
    if images.shape[0] == 1 and m.shape[0] > 1:
        images = images.expand(m.shape[0], -1, -1, -1)
    return images.masked_fill(m, 0)


# ----------------------------------------------------------------------------- token choices

def ranking(scores) -> np.ndarray:
    """Positions of one image by decreasing score (stable: equal scores, lower position first)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (N_POS,):
        raise CortexError(f"expected {N_POS} token scores, got {scores.size}")
    if not np.isfinite(scores).all():
        raise CortexError("TIS row contains NaN/Inf; recompute the TIS of this image")
    return np.argsort(-scores, kind="stable")


def random_positions(seed: int, key: str) -> np.ndarray:
    """A seeded random order of the 256 positions for image ``key`` (its filename); the random n
    positions of the sample-level evaluation are its first n, so they do not depend on image order."""
    from .attribution import image_seed

    return np.random.default_rng(image_seed(seed, key)).permutation(N_POS)


def prefix_masks(ids, order: np.ndarray, ns) -> np.ndarray:
    """For each n: mask every position whose id is among the ids at ``order[:n]``.

    ids: (256,) token ids of one image; order: (256,) positions (a ranking); ns: numbers of positions.
    Returns (len(ns), 256) bool.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.zeros((len(ns), N_POS), dtype=bool)
    for i, n in enumerate(ns):
        out[i] = np.isin(ids, ids[order[: int(n)]])
    return out


def check_ns(ns) -> list[int]:
    ns = [int(n) for n in ns]
    bad = [n for n in ns if not 1 <= n <= N_POS]
    if bad or not ns:
        raise CortexError(f"--num_tokens {bad or ns}: each number of masked positions must be in 1..{N_POS}")
    return ns
