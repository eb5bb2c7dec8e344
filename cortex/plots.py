"""Every figure of the project, drawn with matplotlib's Agg backend and saved to a file.

Each function takes plain data (DataFrames / arrays), writes one PNG (and returns its path), and
closes its figure. The eval scripts save theirs under ``results/Explanation/model_{m}/figures/``.

* ``deletion_curves``  sample level: evaluator target prob vs number of masked tokens, TIS vs random;
* ``concept_bars``     concept level: original vs CORTEX-masked vs frequency-baseline-masked prob;
* ``tis_grid``         test images with their TIS heatmap, top-token boxes and the masked image;
* ``before_after``     codebook level: decoded image before/after the optimisation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .utils import CortexError

GRID = 16


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from .utils import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _hwc(img) -> np.ndarray:
    """(3, H, W) or (H, W, 3), uint8 or [0, 1] float -> (H, W, 3) float in [0, 1]."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    a = a.astype(np.float64)
    return a / 255.0 if a.max(initial=0) > 1.0 else a


def deletion_curves(df, path, title: str = "") -> Path:
    """Sample-level deletion curves, one panel per evaluator.

    df: the sample-level results (columns Model, Num_Masked_Tokens, Method, Avg_Probs).
    """
    plt = _plt()
    models = list(dict.fromkeys(df["Model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.2), squeeze=False, sharey=True)
    styles = {"target": dict(color="tab:red", marker="o", label="top-n TIS tokens (CORTEX)"),
              "random": dict(color="tab:gray", marker="s", label="n random tokens")}
    for ax, m in zip(axes[0], models):
        d = df[df["Model"] == m]
        orig = d[d["Method"] == "original"]["Avg_Probs"]
        for method, st in styles.items():
            dm = d[d["Method"] == method].sort_values("Num_Masked_Tokens")
            if len(dm):
                x = np.r_[0, dm["Num_Masked_Tokens"].to_numpy()]
                y = np.r_[orig.iloc[0] if len(orig) else np.nan, dm["Avg_Probs"].to_numpy()]
                ax.plot(x, y, lw=1.6, ms=3.5, **st)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("n (positions whose ids are masked)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("evaluator prob. of the true label")
    axes[0][0].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def concept_bars(df, path, title: str = "") -> Path:
    """Concept-level bars per evaluator (and Overall): original / CORTEX-masked / baseline-masked prob.

    df: the concept-level results (Model, Avg_Original_Prob, Avg_Masked_Prob_Target, Avg_Masked_Prob_Baseline).
    """
    plt = _plt()
    models = list(df["Model"])
    x = np.arange(len(models))
    w = 0.27
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(models) + 1.5), 3.4))
    series = [("Avg_Original_Prob", "unmasked", "tab:blue"),
              ("Avg_Masked_Prob_Target", "CORTEX concept tokens masked", "tab:red"),
              ("Avg_Masked_Prob_Baseline", "frequency-baseline tokens masked", "tab:gray")]
    for i, (col, label, color) in enumerate(series):
        vals = df[col].to_numpy(dtype=float)
        bars = ax.bar(x + (i - 1) * w, vals, w, label=label, color=color)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, models, fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("prob. of the true label")
    ax.legend(fontsize=8, loc="upper center", ncol=3, bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _grid_of(n_pos: int, grid=None) -> tuple[int, int]:
    """(h, w) of a TIS row of ``n_pos`` scores: ``grid`` if given, else the square grid (16 x 16 for 256)."""
    from .data import square_grid

    if grid is None:
        return square_grid(n_pos)
    h, w = int(grid[0]), int(grid[1])
    if h * w != n_pos:
        raise CortexError(f"a {h}x{w} token grid has {h * w} positions, not {n_pos}")
    return h, w


def tis_grid(images, scores, titles, path, top_n: int = 10, masked=None, masked_titles=None, title: str = "",
             grid=None) -> Path:
    """One row per image: the image with boxes on its top-n TIS positions, the TIS heatmap over the
    image, and (optional) the image with the top-n TIS token ids masked.

    images: list of (3, H, W)/(H, W, 3) arrays; scores: list of (h*w,) TIS rows ((256,) for the paper's grid);
    titles: one per row (shown above the image); masked: optional masked images; masked_titles: optional titles
    for them; grid: the token grid (h, w) (default: the square grid of the rows, 16 x 16 for 256 scores).
    """
    from matplotlib.patches import Rectangle

    plt = _plt()
    ncol = 3 if masked is not None else 2
    n = len(images)
    fig, axes = plt.subplots(n, ncol, figsize=(2.5 * ncol, 2.55 * n), squeeze=False)
    for i in range(n):
        img = _hwc(images[i])
        H, W = img.shape[:2]
        s = np.asarray(scores[i], dtype=np.float64).reshape(-1)
        h, w = _grid_of(s.size, grid)
        ph, pw = H / h, W / w
        s = s.reshape(h, w)
        top = np.argsort(-s.reshape(-1), kind="stable")[:top_n]
        ax = axes[i][0]
        ax.imshow(img, interpolation="nearest")
        for pos in top:
            r, c = divmod(int(pos), w)
            ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="yellow", lw=1.2))
        ax.set_title(f"{titles[i]}\n+ top-{top_n} TIS positions", fontsize=7)
        ax = axes[i][1]
        ax.imshow(img, interpolation="nearest")
        hm = ax.imshow(s, cmap="inferno", alpha=0.7, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
        fig.colorbar(hm, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        ax.set_title("TIS heatmap", fontsize=7)
        if masked is not None:
            axes[i][2].imshow(_hwc(masked[i]), interpolation="nearest")
            mt = masked_titles[i] if masked_titles is not None else ""
            axes[i][2].set_title(f"ids at top-{top_n} TIS positions masked" + (f"\n{mt}" if mt else ""), fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(h_pad=1.5)
    if title:  # after tight_layout, above the axes (bbox_inches="tight" keeps it in the file)
        fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    return _save(fig, path)


def before_after(befores, afters, titles, path, region=None, title: str = "", grid=(GRID, GRID)) -> Path:
    """Codebook level: pairs (before | after) per image, the optimised region outlined.

    befores/afters: lists of images; titles: one string per pair (shown above the pair);
    region: (row0, row1, col0, col1) inclusive token rows/cols, or None; grid: the token grid (h, w).
    """
    from matplotlib.patches import Rectangle

    plt = _plt()
    n = len(befores)
    per_row = min(n, 4)
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.0 * 2 * per_row, 2.7 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, per_row)
        for j, (img, tag) in enumerate(((befores[i], "before"), (afters[i], "after"))):
            ax = axes[r][2 * c + j]
            im = _hwc(img)
            ax.imshow(im, interpolation="nearest")
            if region is not None:
                ph, pw = im.shape[0] / grid[0], im.shape[1] / grid[1]
                r0, r1, c0, c1 = region
                ax.add_patch(Rectangle((c0 * pw - 0.5, r0 * ph - 0.5), (c1 - c0 + 1) * pw, (r1 - r0 + 1) * ph,
                                       fill=False, ec="cyan", lw=1.0, ls="--"))
            ax.set_title(f"{titles[i]}" if j == 0 else "", fontsize=7, loc="left")
            ax.text(0.5, -0.04, tag, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    fig.tight_layout(h_pad=1.5)
    if title:  # after tight_layout, above the axes (bbox_inches="tight" keeps it in the file)
        fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    return _save(fig, path)


def null_pvalues(pvalues: dict, path, alpha: float = 0.05, title: str = "") -> Path:
    """Calibration figure of a significance test: the p-values of labels with no planted concept.

    pvalues: ``{series name: p-values (any shape)}`` (e.g. one per attribution and top n). Left: histogram
    (a calibrated test is flat or leans to 1: discrete p-values are conservative); right: QQ plot of
    ``-log10`` observed vs uniform quantiles (a calibrated test stays on or below the diagonal).
    """
    plt = _plt()
    fig, (ax_h, ax_q) = plt.subplots(1, 2, figsize=(9, 3.6))
    bins = np.linspace(0, 1, 21)
    top = 1.0
    for name, p in pvalues.items():
        p = np.sort(np.asarray(p, dtype=np.float64).ravel())
        if p.size == 0:
            continue
        ax_h.hist(p, bins=bins, histtype="step", density=True, label=f"{name} ({p.size})")
        expected = -np.log10((np.arange(1, p.size + 1) - 0.5) / p.size)
        observed = -np.log10(np.maximum(p, 1e-300))
        ax_q.plot(expected, observed, ".", ms=3, label=name)
        top = max(top, float(expected.max()), float(min(observed.max(), 20)))
    ax_h.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_h.set_xlabel("p-value")
    ax_h.set_ylabel("density")
    ax_h.legend(fontsize=6, loc="upper left")
    ax_q.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    ax_q.axhline(-np.log10(alpha), color="red", lw=0.6, ls=":", label=f"p = {alpha}")
    ax_q.set_xlabel("expected -log10 p (uniform)")
    ax_q.set_ylabel("observed -log10 p")
    ax_q.legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
