"""cortex.analysis.bias (Cliff's delta, detection, figure) and cortex.bias_world (the planted bias)."""
import csv
import json

import numpy as np
import pytest

from cortex.analysis import bias as B, bias_files as BF, cliffs_delta as CD
from cortex.data.bias_world import BiasWorld, BiasWorldConfig, neutral_assignment, write_neutral_set
from cortex.utils import CortexError

SMALL = BiasWorldConfig(n_codes=160, attribute_tokens=6, doctor_tokens=8, n_background=24, n_distractors=8)


# ----------------------------------------------------------------------------- Cliff's delta

@pytest.mark.parametrize("n,m,high", [(1, 1, 2), (1, 9, 3), (7, 1, 3), (13, 29, 4), (200, 150, 6), (1000, 700, 30)])
def test_cliffs_delta_equals_brute_force_with_ties(n, m, high):
    rng = np.random.default_rng(n * 1000 + m)
    for _ in range(5):
        x, y = rng.integers(0, high, n), rng.integers(0, high, m)
        d = CD.cliffs_delta(x, y)
        assert d == pytest.approx(CD.cliffs_delta_brute(x, y), abs=1e-12)
        if n * m <= 30_000:
            assert d == pytest.approx(CD.cliffs_delta_loop(x, y), abs=1e-12)
        assert CD.cliffs_delta(y, x) == pytest.approx(-d, abs=1e-12)
        assert CD.cliffs_delta_seed(x, y) == pytest.approx(d / 2, abs=1e-12)


def test_cliffs_delta_known_values_and_floats():
    assert CD.cliffs_delta([3, 4, 5], [0, 1, 2]) == 1.0
    assert CD.cliffs_delta([0, 1], [5, 6, 7]) == -1.0
    assert CD.cliffs_delta([2, 2, 2], [2, 2]) == 0.0
    # x = [1, 2, 3], y = [2]: 1 pair greater, 1 less, 1 tie -> 0; y = [1, 1]: 4 greater, 0 less of 6 -> 2/3
    assert CD.cliffs_delta([1, 2, 3], [2]) == 0.0
    assert CD.cliffs_delta([1, 2, 3], [1, 1]) == pytest.approx(4 / 6)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.normal(0.3, size=400)
    assert CD.cliffs_delta(x, y) == pytest.approx(CD.cliffs_delta_brute(x, y), abs=1e-12)


def test_cliffs_delta_errors():
    with pytest.raises(CortexError, match="sample x is empty"):
        CD.cliffs_delta([], [1, 2])
    with pytest.raises(CortexError, match="sample y is empty"):
        CD.cliffs_delta([1], np.array([]))
    with pytest.raises(CortexError, match="NaN"):
        CD.cliffs_delta([1.0, float("nan")], [1.0])
    assert B.magnitude(0.1) == "negligible" and B.magnitude(-0.4) == "medium" and B.magnitude(0.9) == "large"


# ----------------------------------------------------------------------------- the planted bias

def _neutral(tmp_path, world, ratio, n=240):
    path = tmp_path / f"none_{ratio}.csv"
    write_neutral_set(path, world, None, n, gender_ratio=ratio, color_ratio=1 - ratio)
    return path


def test_neutral_assignment_exact_and_nested():
    a = neutral_assignment(100, 0.7, 0, "gender")
    b = neutral_assignment(100, 0.9, 0, "gender")
    assert (a == 0).sum() == 70 and (b == 0).sum() == 90
    assert np.all(b[a == 0] == 0)  # raising the ratio only flips images to attribute 0
    with pytest.raises(CortexError, match="gender_ratio"):
        neutral_assignment(10, 1.5, 0, "gender")


def test_detection_with_planted_tokens_finds_direction_and_grows_with_ratio(tmp_path):
    """With the planted attribute tokens as the labels' sets, delta ~ 2 ratio - 1 (no IEM involved)."""
    world = BiasWorld(SMALL)
    gt = world.ground_truth("doctor_gender")
    tokens = {int(k): v for k, v in gt["concept_tokens"].items()}
    deltas = {}
    for ratio in (0.5, 0.7, 0.9):
        names, ids = B.read_neutral_set(_neutral(tmp_path, world, ratio))
        rows = B.detect_bias(tokens, ids)
        assert rows[0].cliff_delta == pytest.approx(-rows[1].cliff_delta)
        deltas[ratio] = rows[0].cliff_delta
    assert abs(deltas[0.5]) < 0.1
    assert 0.2 < deltas[0.7] < deltas[0.9]
    assert deltas[0.9] > 0.6
    # the colour attribute was planted the other way round (color_ratio = 1 - ratio)
    col = {int(k): v for k, v in world.ground_truth("doctor_color")["concept_tokens"].items()}
    _, ids = B.read_neutral_set(tmp_path / "none_0.9.csv")
    assert B.detect_bias(col, ids)[0].cliff_delta < -0.6


def test_world_groups_are_disjoint_and_ground_truth(tmp_path):
    world = BiasWorld(SMALL)
    groups = [set(v) for v in world.groups.values()] + [set(world.world.background), set(world.world.distractors)]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    info = write_neutral_set(tmp_path / "n.csv", world, None, 50, 0.8, 0.4)
    gt = world.ground_truth("doctor_color", info)
    assert gt["neutral_set"]["images_per_label"] == {"0": 20, "1": 30}
    assert gt["expected_direction"]["sign_of_cliff_delta_label_0"] == -1
    assert gt["expected_direction"]["leans_to_label"] == 1
    assert world.ground_truth("doctor_gender", info)["expected_direction"]["leans_to_label"] == 0
    json.dumps(gt)
    # every image carries exactly its two attribute squares and the doctor object
    with open(tmp_path / "n.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = np.array(json.loads(rows[0]["indices"]))
    g, c = int(rows[0]["gender"]), int(rows[0]["color"])
    assert np.isin(ids, world.groups[f"gender_{g}"]).sum() >= 4
    assert np.isin(ids, world.groups[f"color_{c}"]).sum() >= 4
    assert np.isin(ids, world.groups[f"gender_{1 - g}"]).sum() == 0
    assert np.isin(ids, world.groups["doctor"]).sum() > 0


# ----------------------------------------------------------------------------- files and errors

def test_read_neutral_set_errors(tmp_path):
    with pytest.raises(CortexError, match="results_none.csv"):
        B.read_neutral_set(tmp_path / "results_none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text('filename,tokens\na.png,"[1, 2]"\n')
    with pytest.raises(CortexError, match=r"bad\.csv: no 'indices' column"):
        B.read_neutral_set(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("filename,indices\n")
    with pytest.raises(CortexError, match=r"empty\.csv: no rows"):
        B.read_neutral_set(empty)
    broken = tmp_path / "broken.csv"
    broken.write_text("filename,indices\na.png,1 2 3\n")
    with pytest.raises(CortexError, match=r"broken\.csv:2"):
        B.read_neutral_set(broken)
    only = tmp_path / "only.csv"
    only.write_text('indices\n"[1, 2, 2]"\n"[3]"\n')
    names, ids = B.read_neutral_set(only)
    assert names == ["row_1", "row_2"] and B.count_hits(ids, [2, 3]).tolist() == [2, 1]
    with pytest.raises(CortexError, match="at least two labels"):
        B.detect_bias({0: [1]}, ids)


def test_csv_roundtrip_and_figure(tmp_path):
    from cortex.paths import ExperimentPaths

    paths = ExperimentPaths(experiment="dalle", root=tmp_path, bias_type="doctor_gender")
    ids = [np.array([1, 1, 2, 5]), np.array([2, 2, 2, 9]), np.array([1, 7, 7, 7])]
    rows = B.detect_bias({0: [1, 5], 1: [2, 7]}, ids)
    out = B.write_bias_csv(paths.bias_dir() / B.bias_csv_name(5, 2), rows)
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == BF.BIAS_HEADER
    back = B.read_bias_csv(out)
    assert [r["label"] for r in back] == [0, 1] and back[0]["tokens"] == [1, 5]
    assert back[0]["cliff_delta"] == pytest.approx(rows[0].cliff_delta, abs=1e-6)
    assert back[0]["cliff_delta_seed"] == pytest.approx(rows[0].cliff_delta / 2, abs=1e-6)
    assert back[0]["total_files"] == "3" and back[0]["total_token_occurrences"] == "4"
    png = B.plot_bias(paths, 5, 2, rows=rows)
    assert png.name == "token_bias_top5_num2_cliff.png" and png.stat().st_size > 10_000


def test_ratio_sweep_figure(tmp_path):
    rows = [dict(bias_type="doctor_gender", method="smoothgrad", ratio=r, cliff_delta=2 * r - 1) for r in (0.5, 0.7, 0.9)]
    out = B.plot_ratio_sweep(rows, tmp_path / "sweep.png")
    assert out.stat().st_size > 10_000
