"""Seed replicates (cortex/analysis/replicates.py), the README check's rule across CPUs, and the SmoothGrad caveat.

Every aggregation is tested on constructed inputs; nothing here depends on a training run's outcome.
"""
import csv
import math

import pytest

from cortex.analysis import replicates as rp
from cortex.analysis.bias_files import BIAS_HEADER
from cortex.attribution.attributions import smoothgrad_caveat
from cortex.scripts import REPO, load_script
from cortex.utils import CortexError


def test_summarize_interval_and_verdict():
    s = rp.summarize([0.9, 0.8, float("nan"), 1.0])
    assert s["n"] == 3 and s["lo"] == 0.8 and s["hi"] == 1.0 and math.isclose(s["mean"], 0.9)
    assert rp.fmt_interval(s) == "0.90 [0.80, 1.00]"
    assert rp.fmt_interval(rp.summarize([79.25]), ".1f") == "79.2"
    assert rp.fmt_interval(rp.summarize([])) == "–"
    assert rp.verdict([True, True, True]) == "yes (3/3)"
    assert rp.verdict([False, False]) == "no (0/2)"
    assert rp.verdict([True, False, True]) == "not robust (2/3)"


def test_token_stability_on_constructed_runs():
    assert rp.jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and rp.jaccard([], []) == 1.0
    runs = {0: {0: [1, 2, 3, 4], 1: [9, 8]}, 1: {0: [4, 3, 2, 1], 1: [9, 7]}, 2: {0: [1, 2, 3, 4], 1: [9, 6],
                                                                                    5: [1]}}
    st = rp.token_stability(runs)
    assert set(st) == {0, 1}  # label 5 is in one run only
    assert st[0]["jaccard"] == 1.0 and st[0]["shared"] == [1, 2, 3, 4]
    assert math.isclose(st[1]["jaccard"], 1 / 3) and st[1]["shared"] == [9]
    with pytest.raises(CortexError):
        rp.token_stability({0: {0: [1]}})


def _row(label, delta, lo, hi):
    return {"label": label, "cliff_delta": delta, "cliff_delta_ci_low": lo, "cliff_delta_ci_high": hi}


def test_bias_robustness_marks_disagreement():
    agree = {"seed 0, a": [_row(0, 0.6, 0.5, 0.7), _row(1, -0.6, -0.7, -0.5)],
             "seed 1, a": [_row(0, 0.5, 0.4, 0.6), _row(1, -0.5, -0.6, -0.4)]}
    rows = rp.bias_robustness(agree)
    assert [(r["label"], r["direction"], r["verdict"]) for r in rows] == [(0, "+", "robust"), (1, "-", "robust")]
    flip = dict(agree, **{"seed 2, a": [_row(0, -0.3, -0.4, -0.2), _row(1, 0.3, 0.2, 0.4)]})
    rows = rp.bias_robustness(flip)
    assert all(r["verdict"] == "not robust" for r in rows) and rows[0]["runs_same_sign"] == 2
    weak = {"s0": [_row(0, 0.6, 0.5, 0.7)], "s1": [_row(0, 0.1, -0.05, 0.2)]}  # same sign, CI covers 0
    assert rp.bias_robustness(weak)[0]["verdict"] == "not robust"
    # the count shown beside the verdict ("not robust (k/n)") is of the runs with the sign AND a CI excluding 0
    (w,) = rp.bias_robustness(weak)
    assert (w["runs_same_sign"], w["runs_ci_excludes_0"], w["runs_agree"], w["runs"]) == (2, 1, 1, 2)
    odd = {"s0": [_row(0, 0.6, 0.5, 0.7)], "s1": [_row(0, 0.1, -0.05, 0.2)], "s2": [_row(0, -0.3, -0.4, -0.2)]}
    (o,) = rp.bias_robustness(odd)  # same sign 2/3, CI excluding 0 2/3, both only 1/3
    assert (o["runs_same_sign"], o["runs_ci_excludes_0"], o["runs_agree"]) == (2, 2, 1)
    assert rp.bias_robustness({"s0": [_row(0, 0.6, 0.5, 0.7)]})[0]["verdict"] == "one run only"


def test_seed_folders_and_bias_robustness_file(tmp_path):
    assert rp.seed_dirs(tmp_path, 0) == {}
    p = rp.seed_paths("dalle", tmp_path, 2, "doctor_color")
    assert p.checkpoint_dir == tmp_path / "checkpoints/replicates/seed_2/doctor_color"
    assert p.bias_dir() == tmp_path / "results/replicates/seed_2/doctor_color/Bias_detection"
    assert rp.seed_flags(tmp_path, 1, relative_to=tmp_path) == ["--checkpoint_dir", "checkpoints/replicates/seed_1",
                                                                "--results_dir", "results/replicates/seed_1"]

    def write(seed, attr, d0):
        folder = rp.seed_paths("dalle", tmp_path, seed, "doctor_color").bias_dir()
        folder.mkdir(parents=True, exist_ok=True)
        name = "token_bias_top5_num10_cliff" + ("" if attr == "smoothgrad" else f"_{attr}") + ".csv"
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(BIAS_HEADER)
            for label, d in ((0, d0), (1, -d0)):
                w.writerow([10, 20, 2.0, 3, label, "['1', '2', '3']", d, d / 2, 1e-3, d - 0.1, d + 0.1, "large"])

    write(0, "smoothgrad", 0.5)
    assert rp.write_bias_robustness(tmp_path, "doctor_color") is None  # one run: nothing to compare
    write(0, "smoothgrad_x_input", 0.6)
    write(3, "smoothgrad_x_input", 0.55)
    assert rp.found_seeds(tmp_path, "doctor_color") == [0, 3]
    out, rows = rp.write_bias_robustness(tmp_path, "doctor_color")
    assert out.name == "token_bias_top5_num10_cliff_robustness.csv" and out.parent.parent.name == "doctor_color"
    assert [r["verdict"] for r in rows] == ["robust", "robust"] and rows[0]["runs"] == 3
    write(3, "smoothgrad", -0.4)  # one run flips
    out, rows = rp.write_bias_robustness(tmp_path, "doctor_color")
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["verdict"] for r in got] == ["not robust", "not robust"] and got[0]["runs"] == "4"
    assert list(got[0]) == rp.BIAS_ROBUSTNESS_HEADER  # runs_agree stays in memory: the CSV keeps SPEC's columns
    assert "seed 3, smoothgrad: -0.400" in got[0]["per_run"]


def test_smoothgrad_caveat_names_the_alternative():
    for use in ("bias", "concept tokens"):
        line = smoothgrad_caveat("smoothgrad", use)
        assert "--attribution smoothgrad_x_input" in line and "\n" not in line
    assert smoothgrad_caveat("smoothgrad_x_input", "bias") is None


def test_readme_check_rule_across_cpus():
    check = load_script(REPO / "scripts" / "check_readme_demo.py")
    agrees = check.cell_agrees
    assert agrees("0.90 [0.85, 0.95]", "0.93 [0.91, 0.95]") is True
    assert agrees("0.90 [0.85, 0.95]", "0.955 [0.9, 1.0]") is True  # within half a unit of the last digit
    assert agrees("0.90 [0.85, 0.95]", "0.78 [0.70, 0.90]") is True  # the range widened by its width: [0.75, 1.05]
    assert agrees("0.90 [0.85, 0.95]", "0.74 [0.70, 0.78]") is False
    assert agrees("1.00 [1.00, 1.00]", "0.99 [0.98, 1.00]") is False  # no spread: half a unit of the last digit
    assert agrees("+1.50 [+1.39, +1.69]", "+1.45") is True
    assert agrees("yes (3/3)", "yes (2/2)") is True and agrees("yes (3/3)", "not robust (2/3)") is False
    assert agrees("not robust (2/3)", "yes (3/3)") is True
    assert agrees("+0.85 [+0.81, +0.89]", "+0.50 [+0.40, +0.60]", intervals=False) is None  # one run's CI
    assert agrees("79.2", "85.0") is None and agrees("0.9 / 0.8", "0.7 / 0.8") is None  # single runs: not compared
    T = check.Table
    readme = [T("Across seeds", ["quantity", "mean [min, max]", "per seed", "holds"],
                [["acc", "80.0 [78.0, 82.0]", "78.0 / 82.0", "yes (2/2)"]]),
              T("IEM accuracy", ["experiment", "top-1"], [["object", "79.2%"]])]
    other_cpu = [T("Across seeds", ["quantity", "mean [min, max]", "per seed", "holds"],
                   [["acc", "81.0 [80.0, 82.0]", "80.0 / 82.0", "yes (2/2)"]]),
                 T("IEM accuracy", ["experiment", "top-1"], [["object", "85.0%"]])]
    skipped = []
    assert check.compare(readme, other_cpu, same_machine=False, skipped=skipped) == []
    assert len(skipped) == 2  # the per-seed list and the single run's accuracy
    assert len(check.compare(readme, other_cpu, same_machine=True)) == 2  # same CPU: every cell must be equal
    outside = [T("Across seeds", readme[0].header, [["acc", "87.0 [86.0, 88.0]", "86.0 / 88.0", "yes (2/2)"]]),
               other_cpu[1]]
    assert len(check.compare(readme, outside, same_machine=False)) == 1
    assert check.machine_cpu("x\nMachine: AMD EPYC 7B13, 2 cores, torch 2\n") == "AMD EPYC 7B13"


def test_summary_rows_across_seeds_and_models(tmp_path):
    """Constructed statistics of seeds 0 and 1 (Net1) and of Net2 (seed 0): the Jaccard rows follow the tokens."""
    from tests.helpers import write_sectioned_stats

    def stats(seed, model, label, tokens):
        d = rp.seed_paths("vqgan", tmp_path, seed).stats_dir(model)
        write_sectioned_stats(d / f"label_{label}.csv", 10, [(t, 10 - i, "a.npy") for i, t in enumerate(tokens)])

    for seed, acc in ((0, 80.0), (1, 90.0)):
        res = rp.seed_paths("vqgan", tmp_path, seed).testing_results(1)
        res.parent.mkdir(parents=True)
        res.write_text(f"Top-1 Accuracy,Top-3 Accuracy,Top-5 Accuracy,Top-10 Accuracy\n{acc},99,100,100\n")
    stats(0, 1, 0, [1, 2, 3, 4]), stats(1, 1, 0, [1, 2, 3, 5])  # label 0: 3 shared of 5 -> 0.6
    stats(0, 1, 1, [7, 8, 9, 10]), stats(1, 1, 1, [7, 8, 9, 10])  # label 1: identical -> 1.0
    stats(0, 2, 0, [11, 12, 13, 14]), stats(0, 2, 1, [7, 8, 9, 10])  # Net2: label 0 disjoint, label 1 identical
    rows = rp.summary_rows("vqgan", tmp_path, [0, 1], 1, "smoothgrad", 5, 4)
    assert rows[0]["mean"] == "85.0000" and rows[0]["min"] == "80.0000" and rows[0]["max"] == "90.0000"
    by = {r["quantity"].split(":")[0]: r for r in rows}
    assert by["label 0"]["mean"] == "0.6000" and by["label 0"]["per_seed"] == "shared: 1 2 3"
    assert by["label 1"]["mean"] == "1.0000" and by["mean over labels"]["mean"] == "0.8000"
    (m,) = rp.model_stability_rows("vqgan", tmp_path, [0], [1, 2], "smoothgrad", 5, 4)
    assert "Net1/Net2" in m["quantity"] and m["mean"] == "0.5000" and m["min"] == "0.0000"
