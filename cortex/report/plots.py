"""Every figure of the project, drawn with matplotlib's Agg backend and saved to a file.

Each function takes plain data (DataFrames / arrays), writes one PNG (and returns its path), and
closes its figure. The eval scripts save theirs under ``results/Explanation/model_{m}/figures/``.

* ``deletion_curves``  sample level: evaluator target prob vs number of masked tokens, TIS vs random, with
                       95% bands over images;
* ``concept_bars``     concept level: original vs CORTEX-masked vs frequency-baseline-masked prob, with 95%
                       error bars over images;
* ``tis_grid``         test images with their TIS heatmap (labelled colour bar), top-token boxes and the masked image;
* ``before_after``     codebook level: decoded image before/after the optimisation.

Style and saving: :mod:`cortex.figures` (every figure of the project goes through ``save_figure``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.formats import dataset_info, square_grid
from ..evaluation.concept_level import paired_t_interval
from ..figures import COLUMN_WIDTH_IN, MAX_WIDTH_IN, _plt, _save, save_figure
from ..utils import CortexError

GRID = 16


def class_name(label, names=None) -> str:
    """``3 (cat)`` when the dataset stores ``class_names`` (dataset_info.json), else ``3``."""
    if names and 0 <= int(label) < len(names) and names[int(label)] not in (None, ""):
        return f"{int(label)} ({names[int(label)]})"
    return str(int(label))


def class_names_of(data_dir) -> list | None:
    """The dataset's ``class_names`` (dataset_info.json; ``--source images`` stores the folder names), or None."""
    names = dataset_info(data_dir).get("class_names")
    return list(names) if names else None


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its Student-t interval (NaN bounds for one value)."""
    ci = paired_t_interval(np.asarray(values, dtype=np.float64), confidence)
    return ci["mean"], ci["low"], ci["high"]


def _hwc(img) -> np.ndarray:
    """(3, H, W) or (H, W, 3), uint8 or [0, 1] float -> (H, W, 3) float in [0, 1]."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    a = a.astype(np.float64)
    return a / 255.0 if a.max(initial=0) > 1.0 else a


def _interval_table(per_image, keys: list[str], value: str = "prob") -> dict:
    """``{key tuple: (mean, low, high)}`` over the images of each group of ``per_image`` (the per-image rows)."""
    out = {}
    for key, g in per_image.groupby(keys, sort=False):
        out[key if isinstance(key, tuple) else (key,)] = mean_interval(g[value].to_numpy(dtype=float))
    return out


def deletion_curves(df, path, title: str = "", per_image=None) -> Path:
    """Sample-level deletion curves, one panel per evaluator, with 95% bands over images.

    df: the sample-level results (columns Model, Num_Masked_Tokens, Method, Avg_Probs); per_image: optional
    per-image rows (columns evaluator, method, num_tokens, prob: ``SampleLevelResult.per_image()``), which
    give each point its 95% Student-t interval over images, drawn as a band.
    """
    plt = _plt()
    models = list(dict.fromkeys(df["Model"]))
    ncol = min(len(models), 3)
    nrow = (len(models) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_WIDTH_IN, 2.3 * ncol + 0.4), 2.2 * nrow + 0.5),
                             squeeze=False, sharey=True)
    styles = {"target": dict(color="tab:red", marker="o", label="top-n TIS tokens (CORTEX)"),
              "random": dict(color="tab:gray", marker="s", label="n random tokens")}
    ci = _interval_table(per_image, ["evaluator", "method", "num_tokens"]) if per_image is not None else {}
    for ax in axes.ravel()[len(models):]:
        ax.set_visible(False)
    for ax, m in zip(axes.ravel(), models):
        d = df[df["Model"] == m]
        orig = d[d["Method"] == "original"]["Avg_Probs"]
        for method, st in styles.items():
            dm = d[d["Method"] == method].sort_values("Num_Masked_Tokens")
            if len(dm):
                x = np.r_[0, dm["Num_Masked_Tokens"].to_numpy()]
                y = np.r_[orig.iloc[0] if len(orig) else np.nan, dm["Avg_Probs"].to_numpy()]
                ax.plot(x, y, lw=1.3, ms=2.5, **st)
                if ci:
                    keys = [(m, "original", 0)] + [(m, method, int(n)) for n in x[1:]]
                    lo = [ci.get(k, (np.nan,) * 3)[1] for k in keys]
                    hi = [ci.get(k, (np.nan,) * 3)[2] for k in keys]
                    ax.fill_between(x, lo, hi, color=st["color"], alpha=0.2, lw=0)
        ax.set_title(m)
        ax.set_xlabel("n masked (top-n / random)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("p(true label)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if ci:
        labels = [f"{lab}, 95% CI" if i == 0 else lab for i, lab in enumerate(labels)]
    fig.tight_layout()
    # after tight_layout: the legend under the panels, the title above them (bbox_inches="tight" keeps both)
    fig.legend(handles, labels, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.0), frameon=False)
    if title:
        fig.suptitle(title, y=1.0, va="bottom")
    return _save(fig, path)


def concept_bars(df, path, title: str = "", per_image=None) -> Path:
    """Concept-level bars per evaluator (and Overall): original / CORTEX-masked / baseline-masked prob.

    df: the concept-level results (Model, Avg_Original_Prob, Avg_Masked_Prob_Target, Avg_Masked_Prob_Baseline);
    per_image: optional per-image rows (evaluator, filename, method original/target/baseline, prob:
    ``ConceptLevelResult.per_image()``), which give each bar its 95% Student-t interval over images (Overall:
    over the per-image means across evaluators) as an error bar.
    """
    plt = _plt()
    models = list(df["Model"])
    x = np.arange(len(models))
    w = 0.27
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, max(COLUMN_WIDTH_IN, 0.8 * len(models) + 0.8)), 2.6))
    series = [("Avg_Original_Prob", "original", "unmasked", "tab:blue"),
              ("Avg_Masked_Prob_Target", "target", "CORTEX tokens masked", "tab:red"),
              ("Avg_Masked_Prob_Baseline", "baseline", "frequency tokens masked", "tab:gray")]
    ci = {}
    if per_image is not None:
        ci = _interval_table(per_image, ["evaluator", "method"])
        overall = per_image.groupby(["filename", "method"], sort=False)["prob"].mean().reset_index()
        ci.update({("Overall", k[0]): v for k, v in _interval_table(overall, ["method"]).items()})
    for i, (col, method, label, color) in enumerate(series):
        vals = df[col].to_numpy(dtype=float)
        err = None
        if ci:
            bounds = [ci.get((m, method), (v, np.nan, np.nan)) for m, v in zip(models, vals)]
            err = np.array([[max(v - b[1], 0.0) if np.isfinite(b[1]) else 0.0 for v, b in zip(vals, bounds)],
                            [max(b[2] - v, 0.0) if np.isfinite(b[2]) else 0.0 for v, b in zip(vals, bounds)]])
        ax.bar(x + (i - 1) * w, vals, w, label=label, color=color, yerr=err, capsize=2,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, models)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("p(true label)" + (" (mean, 95% CI)" if ci else ""))
    ax.legend(loc="upper center", ncol=3, bbox_to_anchor=(0.5, -0.13), frameon=False, columnspacing=0.8,
              handlelength=1.2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _grid_of(n_pos: int, grid=None) -> tuple[int, int]:
    """(h, w) of a TIS row of ``n_pos`` scores: ``grid`` if given, else the square grid (16 x 16 for 256)."""
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
    fig, axes = plt.subplots(n, ncol, figsize=(2.2 * ncol, 2.3 * n), squeeze=False)
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
        ax.set_title(f"{titles[i]}\nboxes: top-{top_n} TIS", fontsize=7)
        ax = axes[i][1]
        ax.imshow(img, interpolation="nearest")
        hm = ax.imshow(s, cmap="inferno", alpha=0.7, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
        cb = fig.colorbar(hm, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("TIS", fontsize=7)
        ax.set_title("TIS heatmap", fontsize=7)
        if masked is not None:
            axes[i][2].imshow(_hwc(masked[i]), interpolation="nearest")
            mt = masked_titles[i] if masked_titles is not None else ""
            axes[i][2].set_title(f"top-{top_n} TIS ids masked" + (f"\n{mt}" if mt else ""), fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(h_pad=1.5)
    if title:  # after tight_layout, above the axes (bbox_inches="tight" keeps it in the file)
        fig.suptitle(title, fontsize=9, y=1.0, va="bottom")
    return _save(fig, path)


def before_after(befores, afters, titles, path, region=None, title: str = "", grid=(GRID, GRID)) -> Path:
    """Codebook level: pairs (before | after) per image, the optimised region outlined.

    befores/afters: lists of images; titles: one string per pair (shown above the pair);
    region: (row0, row1, col0, col1) inclusive token rows/cols, or None; grid: the token grid (h, w).
    """
    from matplotlib.patches import Rectangle

    plt = _plt()
    n = len(befores)
    per_row = min(n, 2)  # two pairs (four images) per row: 6.4 in, a two-column paper's text width
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(1.6 * 2 * per_row, 2.0 * rows), squeeze=False)
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
        fig.suptitle(title, fontsize=9, y=1.0, va="bottom")
    return _save(fig, path)


def null_pvalues(pvalues: dict, path, alpha: float = 0.05, title: str = "") -> Path:
    """Calibration figure of a significance test: the p-values of labels with no planted concept.

    pvalues: ``{series name: p-values (any shape)}`` (e.g. one per attribution and top n). Left: histogram
    (a calibrated test is flat or leans to 1: discrete p-values are conservative); right: QQ plot of
    ``-log10`` observed vs uniform quantiles (a calibrated test stays on or below the diagonal).
    """
    plt = _plt()
    fig, (ax_h, ax_q) = plt.subplots(1, 2, figsize=(MAX_WIDTH_IN, 2.8))
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
    ax_h.set_title("histogram")
    ax_h.legend(loc="upper left")
    ax_q.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    ax_q.axhline(-np.log10(alpha), color="red", lw=0.6, ls=":", label=f"p = {alpha}")
    ax_q.set_xlabel("expected -log10 p (uniform)")
    ax_q.set_ylabel("observed -log10 p")
    ax_q.set_title("QQ plot")
    ax_q.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
