"""What the real sources share (SPEC §6): their flags' parsers and split plans, the per-batch seeds, and the VQ
model helpers (codebook, grid, encoding and decoding through :func:`cortex.data.tokenizers.as_tokenizer`, the
``dataset_info.json`` fields of the tokenizer)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cortex.data.formats import GRID, square_grid
from cortex.data.tokenizers import as_tokenizer
from cortex.utils import CortexError


def _arg(args, name, default=None):
    v = getattr(args, name, default)
    return default if v is None else v


def parse_classes(text: str) -> list[int]:
    """``"0-999"`` / ``"1,5,7"`` / ``"0-9,20"`` -> sorted unique ints."""
    out = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                a, b = int(a), int(b)
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise CortexError(f"--classes {text!r}: use ids and ranges like 0-999 or 1,5,7") from None
    if not out or min(out) < 0:
        raise CortexError(f"--classes {text!r}: no (non-negative) class ids")
    return sorted(out)


def parse_splits(text: str) -> tuple[float, float, float]:
    try:
        fr = [float(t) for t in str(text).split(",")]
    except ValueError:
        fr = []
    if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
        raise CortexError(f"--splits {text!r}: give three non-negative fractions train,validation,test, e.g. 0.8,0.1,0.1")
    s = sum(fr)
    return fr[0] / s, fr[1] / s, fr[2] / s


def split_counts(n: int, fractions) -> tuple[int, int, int]:
    """Items per split for ``n`` items: largest-remainder rounding, and every split with a positive
    fraction gets at least one item when ``n`` allows it (10 items at 0.8,0.1,0.1 -> 8, 1, 1)."""
    raw = [f * n for f in fractions]
    counts = [int(r) for r in raw]
    for i in sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    need = [i for i in range(3) if fractions[i] > 0 and counts[i] == 0]
    if len([f for f in fractions if f > 0]) <= n:
        for i in need:
            counts[max(range(3), key=lambda j: counts[j])] -= 1
            counts[i] += 1
    return counts[0], counts[1], counts[2]


def split_of_index(i: int, n: int, fractions) -> str:
    """Split of item ``i`` of ``n``: the first ``split_counts(n)[0]`` are train, then validation, then test."""
    n_train, n_val, _ = split_counts(n, fractions)
    return "train" if i < n_train else ("validation" if i < n_train + n_val else "test")


def _sub_seed(*parts) -> int:
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63)


# ----------------------------------------------------------------------------- models

def first_stage(model):
    """The VQ model (``encode``/``decode``/``quantize``) of a VQModel or a Net2NetTransformer (a
    :class:`cortex.data.tokenizers.VQTokenizer` passes through)."""
    return getattr(model, "first_stage_model", model)


def codebook_of(model) -> np.ndarray:
    """(n_codes, D) float32 codebook of the model's quantiser (any tokenizer adapter; D = 256 for taming's VQGAN)."""
    cb = as_tokenizer(model).codebook.detach().float().cpu().numpy()
    return np.ascontiguousarray(cb)


def model_resolution(model) -> int:
    """The tokenizer's training resolution (taming: encoder.resolution; diffusers: config.sample_size)."""
    return int(as_tokenizer(model).image_size[0])


def grid_at(model, resolution: int | None = None) -> tuple[int, int]:
    """The token grid (h, w) of a square ``resolution`` px image (default: the model's resolution)."""
    tok = as_tokenizer(model)
    return tok.grid_at(resolution or tok.image_size[0])


def _check_grid(model, resolution: int | None = None, what: str = "") -> tuple[int, int]:
    """The token grid (h, w) at ``resolution``; an empty grid (a too small --resolution) is a CortexError."""
    h, w = grid_at(model, resolution)
    if h < 1 or w < 1:
        res = resolution or model_resolution(model)
        ph, pw = as_tokenizer(model).patch_size
        raise CortexError(f"{what}at {res} px this tokenizer gives a {h}x{w} token grid; use --resolution of at "
                          f"least {max(ph, pw)} px (one {ph}x{pw} px token)")
    return h, w


# ----------------------------------------------------------------------------- encode / decode / sample

def encode_ids(model, x):
    """x (B, 3, R, R) in [-1, 1] -> token ids (B, h*w) int64, row-major (any tokenizer adapter; 256 for the
    paper's VQGAN at 256 px)."""
    ids = as_tokenizer(model).encode(x)  # (B, h, w)
    b, h, w = ids.shape
    return ids.reshape(b, h * w)


def decode_ids(model, ids, grid=None):
    """ids (B, h*w) -> images (B, 3, H, W) in about [-1, 1] (any tokenizer adapter).

    grid: (h, w); default the square grid of ``ids.shape[1]`` (16 x 16 for 256 ids)."""
    h, w = square_grid(ids.shape[1]) if grid is None else grid
    return as_tokenizer(model).decode(ids.reshape(ids.shape[0], h, w))


def _base_info(model, source, args, grid=(GRID, GRID)) -> dict:
    """dataset_info.json fields shared by the real sources, with the tokenizer's geometry (``tokenizer``,
    ``code_dim``, ``grid_size`` [h, w] of the encoded images, ``patch_size``; ``tokenizer_config`` for the
    kinds loaded from ``--tokenizer_config``: diffusers and any other registered kind but taming)."""
    tok = as_tokenizer(model)
    h, w = grid
    info = {
        "source": source,
        "n_codes": tok.n_codes,
        "embed_dim": tok.code_dim,
        "grid": h if h == w else [h, w],
        "image_size": h * tok.patch_size[0],
        "layout_note": f"E[c, r, k] = codebook[ids[r*{w}+k], c]",
        "images_saved": not getattr(args, "no_images", False),
    }
    info.update(tok.info())
    info["grid_size"] = [h, w]
    info["image_size_hw"] = [h * tok.patch_size[0], w * tok.patch_size[1]]
    if tok.kind not in ("taming", "custom"):  # diffusers and other registered kinds load from --tokenizer_config
        info["tokenizer_config"] = str(Path(_arg(args, "tokenizer_config", "")).resolve())
    return info
