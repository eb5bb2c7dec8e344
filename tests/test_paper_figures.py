"""Figures fit for a paper (issue 22, item 4): intervals drawn where they exist, labelled colour bars, every text
>= 7 pt at a paper's text width, class names, short titles, galleries drawn from many images.

Each figure carries ``cortex.figures.figure_summary`` in its PNG (``read_figure_summary``); ``check_report_figures``
checks every figure of the demo report against the panels it must have (tests/test_demo.py calls it).
"""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cortex import figures
from cortex.report import plots
from cortex.report.gallery import spread_occurrences
from cortex.utils import CortexError


def _common(path, summary):
    """What every figure must satisfy: text >= 7 pt at a size no wider than a paper's text width, short titles."""
    assert summary["min_font_pt"] >= figures.MIN_FONT_PT, (path, summary["min_font_pt"])
    assert 0 < summary["width_in"] <= plots.MAX_WIDTH_IN + 1e-6, (path, summary["width_in"])
    assert summary["suptitle"].count("\n") == 0 and len(summary["suptitle"]) <= 80, (path, summary["suptitle"])
    for p in summary["panels"]:
        assert p["title"].count("\n") <= 1 and all(len(t) <= 70 for t in p["title"].split("\n")), (path, p["title"])
    with Image.open(path) as im:  # the PNG re-opens, at a printable resolution
        assert im.size[0] >= 100 * summary["width_in"] * 0.9, (path, im.size)


# file-name pattern -> what its panels must show
EXPECTED = {
    r"sample_level_deletion_curves": lambda s: s["panels"] and all(
        p["lines"] >= 2 and p["bands"] >= 2 and p["xlabel"] for p in s["panels"]),
    r"sample_level_tis_grid": lambda s: len(s["panels"]) % 3 == 0 and s["colorbars"]
    and set(s["colorbars"]) == {"TIS"} and all(p["images"] >= 1 for p in s["panels"]),
    r"concept_level_": lambda s: len(s["panels"]) == 1 and s["panels"][0]["errorbars"] == 3
    and s["panels"][0]["ylabel"],
    r"codebook_level_": lambda s: len(s["panels"]) >= 2 and all(p["images"] == 1 for p in s["panels"]),
    r"model_randomisation": lambda s: len(s["panels"]) == 1 and s["panels"][0]["bands"] >= 1
    and s["panels"][0]["lines"] >= 1,
    r"token_bias_": lambda s: len(s["panels"]) in (1, 2) and s["panels"][0]["errorbars"] >= 1,
    r"loss_curves": lambda s: s["panels"] and sum(p["lines"] for p in s["panels"]) >= 3,
    r"null_label_pvalues": lambda s: len(s["panels"]) == 2 and all(p["xlabel"] and p["ylabel"] for p in s["panels"]),
}


def check_report_figures(report: Path) -> list[str]:
    """Every figure linked from the demo report: written by save_figure, with its expected panels; returns the
    names checked."""
    checked = []
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report.read_text()):
        path = (report.parent / link).resolve()
        summary = figures.read_figure_summary(path)
        _common(path, summary)
        kind = next((k for k in EXPECTED if re.search(k, path.name)), None)
        assert kind is not None, f"{path.name}: no expected panels known for this figure; add it to EXPECTED"
        assert EXPECTED[kind](summary), (path.name, summary)
        checked.append(kind)
    return checked


# ----------------------------------------------------------------------------- each figure function


def _sample_data(rng, models=("resnet10", "vit_tiny_8"), ns=(5, 10), n_img=6):
    rows, per = [], []
    for m in models:
        rows.append(dict(Model=m, Num_Masked_Tokens=0, Method="original", Avg_Probs=0.9))
        for i in range(n_img):
            per.append(dict(evaluator=m, method="original", num_tokens=0, prob=0.9 + 0.01 * rng.standard_normal()))
        for n in ns:
            for method, p in (("target", 0.9 - 0.05 * n), ("random", 0.88)):
                rows.append(dict(Model=m, Num_Masked_Tokens=n, Method=method, Avg_Probs=p))
                per += [dict(evaluator=m, method=method, num_tokens=n, prob=p + 0.05 * rng.standard_normal())
                        for _ in range(n_img)]
    return pd.DataFrame(rows), pd.DataFrame(per)


def test_deletion_curves_have_bands(tmp_path):
    df, per = _sample_data(np.random.default_rng(0))
    s = figures.read_figure_summary(plots.deletion_curves(df, tmp_path / "d.png", title="Deletion", per_image=per))
    _common(tmp_path / "d.png", s)
    assert [p["title"] for p in s["panels"]] == ["resnet10", "vit_tiny_8"]
    assert all(p["lines"] == 2 and p["bands"] == 2 for p in s["panels"])
    # without per-image rows: no bands, the curves only
    s = figures.read_figure_summary(plots.deletion_curves(df, tmp_path / "e.png"))
    assert all(p["lines"] == 2 and p["bands"] == 0 for p in s["panels"])


def test_concept_bars_have_error_bars(tmp_path):
    rng = np.random.default_rng(1)
    models = ["resnet10", "vit_tiny_8"]
    per = pd.DataFrame([dict(evaluator=m, filename=f"{i}.npy", method=meth, prob=float(rng.uniform()))
                        for m in models for i in range(5) for meth in ("original", "target", "baseline")])
    means = {(m, meth): per[(per.evaluator == m) & (per.method == meth)].prob.mean()
             for m in models for meth in ("original", "target", "baseline")}
    df = pd.DataFrame([dict(Model=m, Avg_Original_Prob=means[m, "original"], Avg_Masked_Prob_Target=means[m, "target"],
                            Avg_Masked_Prob_Baseline=means[m, "baseline"]) for m in models]
                      + [dict(Model="Overall", Avg_Original_Prob=0.5, Avg_Masked_Prob_Target=0.4,
                              Avg_Masked_Prob_Baseline=0.45)])
    path = plots.concept_bars(df, tmp_path / "c.png", title="Concept level", per_image=per)
    s = figures.read_figure_summary(path)
    _common(path, s)
    assert len(s["panels"]) == 1 and s["panels"][0]["errorbars"] == 3 and "95% CI" in s["panels"][0]["ylabel"]
    assert s["width_in"] <= plots.COLUMN_WIDTH_IN + 1e-6  # three groups fit one column


def test_tis_grid_colour_bar_labelled_and_class_names(tmp_path):
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 255, (3, 32, 32), dtype=np.uint8) for _ in range(2)]
    names = ["cat", "dog"]
    titles = [f"0_{i}.png, label {plots.class_name(i, names)}" for i in range(2)]
    path = plots.tis_grid(imgs, [rng.random(256) for _ in range(2)], titles, tmp_path / "t.png", top_n=5,
                          masked=imgs, title="TIS")
    s = figures.read_figure_summary(path)
    _common(path, s)
    assert len(s["panels"]) == 6 and s["colorbars"] == ["TIS", "TIS"]
    assert "label 1 (dog)" in s["panels"][3]["title"]
    assert plots.class_name(3, None) == "3" and plots.class_name(5, names) == "5"


def test_before_after_fits_the_text_width(tmp_path):
    imgs = [np.zeros((32, 32, 3), np.uint8)] * 8
    path = plots.before_after(imgs, imgs, [f"{i} (a) -> 5 (b)\np(target) 0.00 -> 0.30" for i in range(8)],
                              tmp_path / "b.png", region=(7, 10, 7, 10), title="Codebook level")
    s = figures.read_figure_summary(path)
    _common(path, s)
    assert len(s["panels"]) == 16


def test_randomisation_band_is_not_cut(tmp_path):
    from tests.helpers import load_script

    mod = load_script("VQGAN_explanation/explanation_evaluation/model_randomisation.py")
    rows = [dict(attribution=a, stage=k, layer=f"l{k}", spearman_mean=m, spearman_std=0.35)
            for a, ms in (("smoothgrad", [1.0, 0.8, 0.7]), ("smoothgrad_x_input", [1.0, -0.1, -0.2]))
            for k, m in enumerate(ms)]
    s = figures.read_figure_summary(mod.plot_randomisation(rows, tmp_path / "r.png", "Model randomisation"))
    _common(tmp_path / "r.png", s)
    lo, hi = s["panels"][0]["ylim"]
    assert lo <= -0.2 - 0.35 and hi >= 1.0  # the lowest band edge (-0.55) and the top are inside
    assert s["panels"][0]["bands"] == 2


def test_bias_figure_has_a_short_title(tmp_path):
    from cortex.analysis import bias as B
    from cortex.paths import ExperimentPaths

    paths = ExperimentPaths("dalle", root=tmp_path, bias_type="doctor_gender")
    rows = [B.BiasRow(label=k, tokens=[1, 2, 3], counts=np.arange(5) + k, cliff_delta=d, cliff_delta_seed=d / 2,
                      p_value=0.01, ci=(d - 0.1, d + 0.1)) for k, d in ((0, 0.4), (1, -0.4))]
    path = B.plot_bias(paths, 5, 3, rows=rows)
    s = figures.read_figure_summary(path)
    _common(path, s)
    assert s["panels"][0]["errorbars"] == 2 and "\n" not in s["panels"][0]["title"]


def test_loss_curves_and_a_png_without_summary(tmp_path):
    from cortex.iem.run_files import plot_loss_curves

    log = tmp_path / "training_log.txt"
    log.write_text("".join(f"Epoch [{e}/3], Training Loss: {1 / e:.4f}\nValidation Loss: {1.2 / e:.4f}, "
                           f"Accuracy: {30 * e:.2f}%\n" for e in (1, 2, 3)))
    s = figures.read_figure_summary(plot_loss_curves(log, tmp_path / "loss_curves.png"))
    _common(tmp_path / "loss_curves.png", s)
    assert s["width_in"] <= plots.COLUMN_WIDTH_IN + 1e-6
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(CortexError, match="no figure summary"):
        figures.read_figure_summary(tmp_path / "plain.png")


def test_gallery_draws_from_many_images():
    """A token that fills image 0 and sits once in images 1..3: the first four patches come from four images."""
    hit = np.zeros((4, 16), bool)
    hit[0, :10] = True
    hit[1, 3] = hit[2, 7] = hit[3, 0] = True
    order = spread_occurrences(hit)
    assert [i for i, _ in order[:4]] == [0, 1, 2, 3] and order[:4] == [(0, 0), (1, 3), (2, 7), (3, 0)]
    assert len(order) == hit.sum() and order[4] == (0, 1)
    assert spread_occurrences(np.zeros((2, 4), bool)) == []
