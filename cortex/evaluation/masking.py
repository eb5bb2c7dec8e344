"""Token masking in pixel space and the token choices of the sample- and concept-level evaluations.

A VQ image is a 16 x 16 grid of tokens; token position ``p`` (row-major, ``p = row*16 + col``) covers
the ``image_size // 16`` pixel square at row ``p // 16``, col ``p % 16`` (SPEC §3). *Masking* a
position blacks out that square (pixel value 0 in ``[0, 1]`` images, i.e. RGB (0, 0, 0)).

The evaluations mask by **token id**: every position of an image whose id is in a chosen set.

* sample level: the ids at the image's top-n TIS positions (the top-n for every n are prefixes of one
  ranking per image, ``prefix_masks``), or at n random positions drawn as the authors draw them
  (``authors_random_draws``: ``random.sample`` from one stream seeded 42, a fresh draw per image and n);
* concept level: a label's concept tokens (TIS statistics) or its frequency-baseline tokens.

Another tokenizer's ``h x w`` grid: positions are ``p = row*w + col`` over ``h*w`` entries; pass
``grid=(h, w)`` to :func:`mask_images` and ``n_pos=h*w`` to the token choices (default 256).
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.formats import GRID, N_POS
from ..utils import CortexError


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


def pixel_mask(pos_mask: torch.Tensor, image_size, grid=None) -> torch.Tensor:
    """(B, h*w) bool position mask -> (B, 1, H, W) bool pixel mask (True = blacked out).

    grid: the token grid (h, w) of another tokenizer (default: the paper's 16 x 16); image_size: H, or (H, W)
    with a grid. A token covers an (H / h) x (W / w) patch (:attr:`cortex.data.tokenizers.VQTokenizer.patch_size`).
    """
    pos_mask = torch.as_tensor(pos_mask, dtype=torch.bool)
    if pos_mask.ndim == 1:
        pos_mask = pos_mask[None]
    h, w = (GRID, GRID) if grid is None else (int(grid[0]), int(grid[1]))
    if pos_mask.shape[-1] != h * w:
        raise CortexError(f"a position mask needs {h * w} entries per image, got {pos_mask.shape[-1]}")
    if grid is None:
        ph = pw = patch_size(image_size)
    else:
        H, W = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        if H % h or W % w or H < h or W < w:
            raise CortexError(f"image size {H}x{W} px is not a whole number of {h}x{w} token patches")
        ph, pw = H // h, W // w
    cells = pos_mask.view(-1, 1, h, w)
    return cells.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)  # (B, 1, H, W)


def mask_images(images: torch.Tensor, pos_mask, grid=None) -> torch.Tensor:
    """Black out the patches of the masked positions.

    images: (B, 3, H, W) (any range; masked pixels become 0, i.e. black for ``[0, 1]`` or uint8 images)
    or one image (3, H, W) broadcast against several masks; pos_mask: (B, 256) or (256,) bool, or
    (B, h*w) with ``grid=(h, w)`` for another tokenizer's grid (patch = image size / grid).
    Returns a new (B, 3, H, W) tensor.
    """
    if images.ndim == 3:
        images = images[None]
    if grid is None and images.shape[-1] != images.shape[-2]:
        raise CortexError(f"images must be square, got {tuple(images.shape[-2:])}")
    size = images.shape[-1] if grid is None else tuple(images.shape[-2:])
    m = pixel_mask(torch.as_tensor(pos_mask), size, grid).to(images.device)  # (B, 1, H, W)
    if images.shape[0] == 1 and m.shape[0] > 1:
        images = images.expand(m.shape[0], -1, -1, -1)
    return images.masked_fill(m, 0)


# ----------------------------------------------------------------------------- token choices

def ranking(scores, n_pos: int = N_POS) -> np.ndarray:
    """Positions of one image by decreasing score (stable: equal scores, lower position first).

    scores: (n_pos,) TIS row (n_pos = h*w, 256 for the paper's grid) -> (n_pos,) positions."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (n_pos,):
        raise CortexError(f"expected {n_pos} token scores (one per token position), got {scores.size}")
    if not np.isfinite(scores).all():
        raise CortexError("TIS row contains NaN/Inf; recompute the TIS of this image")
    return np.argsort(-scores, kind="stable")


AUTHORS_RANDOM_SEED = 42  # the authors' sample-level script calls random.seed(42) once, before any draw


def authors_random_draws(filenames, ns, seed: int = AUTHORS_RANDOM_SEED, rng=None,
                         n_pos: int = N_POS) -> dict[str, list[np.ndarray]]:
    """The random control positions of the sample-level evaluation, drawn as the authors' script draws them.

    One ``random.Random(seed)`` stream (their ``random.seed(42)``, set once) is consumed image after image in
    ``filenames`` order -- labels ascending, each label's images in the split CSV's order -- and, per image,
    n after n in ``ns`` order: ``rng.sample(range(256), n)`` (``n`` distinct positions out of all 256; an
    independent draw per n, not a prefix of one order). Pass *every* image of the split in that order: the
    draws of an image depend on how many numbers the images before it consumed, so evaluating a subset
    (``--labels``, ``--max_images_per_label``) still gives each image the draws of the full run.

    ``rng``: a ``random.Random`` to continue (then ``seed`` is unused). ``n_pos``: positions per image
    (h*w of another grid; 256 draws exactly the authors' numbers). Returns
    ``{filename: [positions (n,) int64 for n in ns]}``.
    """
    import random

    rng = random.Random(int(seed)) if rng is None else rng
    ns = [int(n) for n in ns]
    out = {}
    for fn in filenames:
        out[fn] = [np.asarray(rng.sample(range(n_pos), n), dtype=np.int64) for n in ns]
    return out


def draw_masks(ids, draws) -> np.ndarray:
    """For each draw (positions): mask every position whose id is among the ids at those positions.

    ids: (h*w,) token ids of one image (256 for 16x16); draws: list of K position arrays. Returns (K, h*w) bool.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.zeros((len(draws), ids.size), dtype=bool)
    for i, pos in enumerate(draws):
        out[i] = np.isin(ids, ids[np.asarray(pos, dtype=np.int64)])
    return out


def prefix_masks(ids, order: np.ndarray, ns) -> np.ndarray:
    """For each n: mask every position whose id is among the ids at ``order[:n]``.

    ids: (h*w,) token ids of one image (256 for 16x16); order: (h*w,) positions (a ranking); ns: numbers of
    positions. Returns (len(ns), h*w) bool.
    """
    return draw_masks(ids, [order[: int(n)] for n in ns])


def check_ns(ns, n_pos: int = N_POS) -> list[int]:
    """--num_tokens as ints, each in 1..n_pos (h*w positions; 256 for the paper's grid)."""
    ns = [int(n) for n in ns]
    bad = [n for n in ns if not 1 <= n <= n_pos]
    if bad or not ns:
        raise CortexError(f"--num_tokens {bad or ns}: each number of masked positions must be in 1..{n_pos}")
    return ns
