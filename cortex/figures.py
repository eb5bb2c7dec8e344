"""The figures' style and the one way a figure is saved (matplotlib's Agg backend, headless).

Fit for a paper: ``PAPER_STYLE`` (every text >= 7 pt) and figures at most ``MAX_WIDTH_IN`` (7 in, a two-column
paper's text width; one-panel plots 3.5 in, a column) wide, so that printed at that width no text is smaller
than 7 pt. ``save_figure`` writes a summary of the figure's panels (titles, axis labels, lines, bands, error
bars, colour-bar labels, smallest font, size) into the PNG's ``Description`` text chunk;
``read_figure_summary`` reads it back (the tests check every figure of the demo with it).
"""
from __future__ import annotations

import json
from pathlib import Path

from .utils import CortexError, atomic_write

MIN_FONT_PT = 7.0
COLUMN_WIDTH_IN = 3.5   # one column of a two-column paper (ICML: 3.25 in)
MAX_WIDTH_IN = 7.0      # the text width of a two-column paper (ICML: 6.75 in)
PAPER_STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
               "ytick.labelsize": 7, "legend.fontsize": 7, "figure.titlesize": 9}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(PAPER_STYLE)
    return plt


def figure_summary(fig) -> dict:
    """What a figure shows, for the tests: ``{width_in, height_in, suptitle, min_font_pt, panels: [{title,
    xlabel, ylabel, lines, bands, errorbars, images, legend}], colorbars: [label]}`` (colour bars are not panels)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.container import ErrorbarContainer
    from matplotlib.text import Text

    panels, colorbars = [], []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        if ax.get_label() == "<colorbar>":
            colorbars.append(ax.get_ylabel() or ax.get_xlabel())
            continue
        if not ax.axison and not ax.images:  # an empty cell of a grid of panels
            continue
        leg = ax.get_legend()
        panels.append({"title": ax.get_title() or ax.get_title(loc="left"), "xlabel": ax.get_xlabel(),
                       "ylabel": ax.get_ylabel(), "lines": len(ax.lines),
                       "bands": sum(isinstance(c, PolyCollection) for c in ax.collections),
                       "errorbars": sum(isinstance(c, ErrorbarContainer) for c in ax.containers),
                       "images": len(ax.images), "ylim": [float(v) for v in ax.get_ylim()],
                       "legend": [t.get_text() for t in leg.get_texts()] if leg else []})
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    sup = getattr(fig, "_suptitle", None)
    w, h = fig.get_size_inches()
    return {"width_in": round(float(w), 3), "height_in": round(float(h), 3),
            "suptitle": sup.get_text() if sup is not None else "", "min_font_pt": float(min(sizes, default=0.0)),
            "panels": panels, "colorbars": colorbars}


def save_figure(fig, path, dpi: int = 150, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG (atomically; its ``figure_summary`` in the ``Description`` text chunk) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = json.dumps(figure_summary(fig))
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight" if tight else None,
                    metadata={"Description": summary})
    _plt().close(fig)
    return path


_save = save_figure  # the short name the figure functions use


def read_figure_summary(path) -> dict:
    """The ``figure_summary`` that ``save_figure`` stored in a PNG (a CortexError for a PNG without one)."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}).get("Description")
    if not text:
        raise CortexError(f"{path}: no figure summary in this PNG (not written by cortex.figures.save_figure)")
    return json.loads(text)
