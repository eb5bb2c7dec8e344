"""The token gallery: what a label's concept tokens look like.

For each of a label's first ``k`` concept tokens (section ``Top {top_n} Tokens`` of its TIS statistics
file) the gallery shows

* the token **decoded on its own**: the tokenizer's decode of a grid filled with that token
  (:meth:`cortex.data.tokenizers.VQTokenizer.decode_token`), and
* the token **in context**: up to ``n_patches`` patches cut from the dataset's decoded images
  ``datasets/images/<a>/<b>.png`` where the token sits, drawn from as many images as possible (the first
  occurrence in each of the label's images of ``split``, in the split CSV's order, then the second ones, ...:
  :func:`spread_occurrences`; patch = image size / grid),

one row per token, one PNG per label (matplotlib Agg). Works for every tokenizer adapter (synthetic world,
taming, diffusers, :class:`~cortex.data.tokenizers.CallableTokenizer`).

    cards = build_gallery(data_dir, tokenizer, stats_file, label=3, top_n=20, k=8)
    draw_gallery(cards, "gallery.png", title="label 3")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils import CortexError


@dataclass
class TokenCard:
    """One gallery row. decoded: (H, W, 3) uint8; patches: [(ph, pw, 3) uint8], with ``context`` tokens of
    margin: [((2c+1) ph, (2c+1) pw, 3)] (less at the border); sources: [(filename, position)]."""

    token: int
    count: int  # its Frequency in the TIS statistics section
    decoded: np.ndarray
    patches: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    boxes: list = field(default_factory=list)  # (x, y, pw, ph) of the token inside each patch (context > 0)
    occurrences: int = 0  # positions holding the token over the label's images of the split
    images_with_token: int = 0


def concept_tokens(stats_file, top_n: int, k: int) -> list[tuple[int, int]]:
    """The first ``k`` rows ``(token, count)`` of section ``Top {top_n} Tokens`` of a TIS statistics file."""
    from ..analysis.statistics_files import read_stats

    if k <= 0:
        raise CortexError(f"--k {k}: ask for at least one token")
    _, sections = read_stats(stats_file)
    if top_n not in sections:
        raise CortexError(f"{stats_file}: no 'Top {top_n} Tokens' section (found: {sorted(sections)}). "
                          f"Use --top_n among those, or rerun TIS_analysis.py.")
    rows = sections[top_n][:k]
    if not rows:
        raise CortexError(f"{stats_file}: section 'Top {top_n} Tokens' has no tokens")
    return rows


def crop_around(image: np.ndarray, position: int, grid: tuple[int, int], context: int = 0):
    """The pixels of token ``position`` (row-major in an ``h x w`` grid) of an (H, W, 3) image, with ``context``
    tokens of margin on each side (clipped at the border). Returns ``(crop, (x, y, pw, ph))``, the box of
    the token itself inside the crop."""
    h, w = grid
    H, W = image.shape[:2]
    if H % h or W % w:
        raise CortexError(f"an image of {H}x{W} px is not a whole number of {h}x{w} token patches")
    ph, pw = H // h, W // w
    r, c = divmod(int(position), w)
    r0, c0 = max(0, r - context), max(0, c - context)
    r1, c1 = min(h, r + context + 1), min(w, c + context + 1)
    crop = image[r0 * ph:r1 * ph, c0 * pw:c1 * pw]
    return crop, ((c - c0) * pw, (r - r0) * ph, pw, ph)


def spread_occurrences(hit: np.ndarray) -> list[tuple[int, int]]:
    """(image, position) of every True of ``hit`` (N, h*w), ordered so that a gallery row draws from as many
    images as it can: each image's first occurrence (images in reading order), then each image's second, ..."""
    per_image = [(i, np.flatnonzero(row)) for i, row in enumerate(hit) if row.any()]
    depth = max((len(p) for _, p in per_image), default=0)
    return [(i, int(p[k])) for k in range(depth) for i, p in per_image if k < len(p)]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def build_gallery(data_dir, tokenizer, stats_file, label: int, top_n: int = 20, k: int = 8,
                  n_patches: int = 6, split: str = "train", context: int = 0) -> list[TokenCard]:
    """The gallery rows of ``label``: one :class:`TokenCard` per concept token, in the statistics' order.

    tokenizer: any :class:`cortex.data.tokenizers.VQTokenizer` (or a model :func:`~cortex.data.tokenizers.as_tokenizer`
    accepts). Patches come from ``images/`` of ``data_dir``; a dataset generated with ``--no_images`` has
    none (CortexError). context: tokens of margin around each patch (the token is boxed in the figure).
    """
    from ..data.formats import image_path, read_split
    from ..data.writer import to_uint8
    from ..data.tokenizers import as_tokenizer

    if context < 0 or n_patches < 0:
        raise CortexError(f"--context {context} / --patches {n_patches}: use non-negative numbers")
    tok = as_tokenizer(tokenizer)
    rows = concept_tokens(stats_file, top_n, k)
    records = [r for r in read_split(data_dir, split) if r.label == int(label)]
    if not records:
        raise CortexError(f"{data_dir}: the {split} split has no images of label {label}; check --label")
    ids = np.stack([r.ids for r in records])  # (N, h*w)
    if ids.shape[1] != tok.n_positions:
        raise CortexError(f"{data_dir}: images have {ids.shape[1]} tokens but the tokenizer's grid "
                          f"{tok.grid[0]}x{tok.grid[1]} has {tok.n_positions}; is this the tokenizer that made the data?")
    bad = [t for t, _ in rows if not 0 <= t < tok.n_codes]
    if bad:
        raise CortexError(f"{stats_file}: token ids {bad[:5]} are outside the tokenizer's codebook (0..{tok.n_codes - 1}); "
                          f"is this the tokenizer that made the data?")
    images: dict[str, np.ndarray] = {}
    cards = []
    for token, count in rows:
        hit = ids == token  # (N, h*w)
        card = TokenCard(token=token, count=count, decoded=to_uint8(tok.decode_token(token)[None])[0],
                         occurrences=int(hit.sum()), images_with_token=int(hit.any(1).sum()))
        for i, p in spread_occurrences(hit)[:n_patches]:  # one per image first, then second ones, ...
            name = records[i].filename
            if name not in images:
                path = image_path(data_dir, name)
                if not path.is_file():
                    raise CortexError(f"decoded image not found: {path}. The gallery cuts patches from "
                                      f"datasets/images/; regenerate the dataset without --no_images.")
                images[name] = _read_png(path)
            crop, box = crop_around(images[name], int(p), tok.grid, context)
            card.patches.append(crop)
            card.boxes.append(box)
            card.sources.append((name, int(p)))
        cards.append(card)
    return cards


def draw_gallery(cards: list[TokenCard], path, title: str = "") -> Path:
    """One row per token: its decode on its own, then its patches from the dataset. Saves a PNG."""
    from ..figures import MAX_WIDTH_IN, _plt, _save

    plt = _plt()
    if not cards:
        raise CortexError("no tokens to draw")
    n_cols = 1 + max(1, max(len(c.patches) for c in cards))
    width = min(MAX_WIDTH_IN, 0.85 * n_cols + 0.7)  # a paper's text width at most
    fig, axes = plt.subplots(len(cards), n_cols, figsize=(width, 1.35 * len(cards) + 0.3), squeeze=False)
    for row, card in zip(axes, cards):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
        row[0].imshow(card.decoded, interpolation="nearest")
        row[0].set_title(f"token {card.token}\ncount {card.count}", fontsize=7)
        for j, (patch, (name, pos)) in enumerate(zip(card.patches, card.sources)):
            ax = row[1 + j]
            ax.imshow(patch, interpolation="nearest")
            x, y, pw, ph = card.boxes[j] if j < len(card.boxes) else (0, 0, patch.shape[1], patch.shape[0])
            if (pw, ph) != (patch.shape[1], patch.shape[0]):  # context around the token: box the token
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), pw, ph, fill=False, edgecolor="red", linewidth=1))
            ax.set_title(f"{Path(name).stem}\n@{pos}", fontsize=7)
        if not card.patches:
            row[1].text(0.5, 0.5, "not in this split's images", ha="center", va="center", fontsize=7)
        row[-1].text(1.05, 0.5, f"{card.occurrences} pos.\n{card.images_with_token} img.", transform=row[-1].transAxes,
                     fontsize=7, va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
