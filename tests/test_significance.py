"""Per-token significance tests (cortex.analysis.significance), the null world, the bias statistics and table."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as ss

from cortex.analysis import significance as G
from cortex.analysis.exact_tests import hypergeom_sf
from cortex.analysis import bias as B, cliffs_delta as CD
from cortex.data.writer import DatasetWriter
from cortex.utils import CortexError, atomic_write, format_list
from tests.helpers import run_script


# ----------------------------------------------------------------------------- 16.1 the exact test

def _brute_sf(cs, n):
    """P(sum_i H(256, c_i, n) >= k) for every k, by plain convolution (independent re-computation)."""
    pmf = np.array([1.0])
    for c in cs:
        pmf = np.convolve(pmf, ss.hypergeom(256, c, n).pmf(np.arange(min(c, n) + 1)))
    return np.cumsum(pmf[::-1])[::-1]


@pytest.mark.parametrize("n", [1, 5, 20])
def test_sum_tail_equals_brute_force(n):
    rng = np.random.default_rng(n)
    cs = rng.integers(1, 40, 12)
    sf = _brute_sf(cs, n)
    u, m = np.unique(cs, return_counts=True)
    for k in range(sf.size):
        assert G.sum_tail(G.hypergeom_table(n)[u], m, k) == pytest.approx(sf[k], rel=1e-9, abs=1e-300)


def test_token_in_several_positions_exact_not_binomial():
    """n = 1, one image where the token fills 28 positions: P = 28/256 exactly (the binomial says 0.1038)."""
    p = G.sum_tail(G.hypergeom_table(1)[[28]], [1], 1)
    assert p == pytest.approx(28 / 256, rel=1e-12)
    assert ss.binom.sf(0, 28, 1 / 256) < p  # the binomial shortcut would be anti-conservative here


def _label(rng, n_img=40, planted=None):
    ids = rng.integers(0, 30, (n_img, 256))
    scores = rng.normal(size=(n_img, 256))
    if planted is not None:  # token 99 at 3 positions of every image, with the highest scores
        for i in range(n_img):
            pos = rng.choice(256, 3, replace=False)
            ids[i, pos] = planted
            scores[i, pos] = 10 + rng.random(3)
    return ids, scores


def test_planted_token_significant_random_scores_not():
    rng = np.random.default_rng(0)
    t = G.label_tests(0, *_label(rng, planted=99), top_ns=(1, 5, 20))
    for n, r in t.items():
        assert r.significant().tolist() == [99], n
        i = int(np.flatnonzero(r.tokens == 99)[0])
        assert r.count[i] == (40 if n == 1 else 120) and r.expected[i] == pytest.approx(120 * n / 256)
        assert r.enrichment[i] == pytest.approx(r.count[i] / r.expected[i])
        assert r.q_value[i] < 1e-10 and np.all(r.q_value >= r.p_value)
    # pure null: permuted scores -> p-values valid (P(p <= a) <= a) and no discovery at q < 0.05
    ps, found = [], 0
    for _ in range(30):
        t = G.label_tests(1, *_label(rng), top_ns=(5,))[5]
        ps.append(t.p_value)
        found += t.significant().size
    ps = np.concatenate(ps)
    for a in (0.01, 0.05, 0.2):
        assert np.mean(ps <= a) <= a + 0.02
    assert found <= 1


def test_bh_matches_definition():
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.5])
    q = G.benjamini_hochberg(p)
    order = np.argsort(p)
    raw = p[order] * p.size / np.arange(1, p.size + 1)
    expect = np.minimum.accumulate(raw[::-1])[::-1]
    assert np.allclose(q[order], np.minimum(expect, 1))
    # m hypotheses of which only these 5 have p < 1: the same q as the 5 padded with p = 1
    padded = G.benjamini_hochberg(np.concatenate([p, np.ones(7)]))[:5]
    assert np.array_equal(G.benjamini_hochberg(p, m=12), padded)


def test_contrast_arrays_hold_the_tokens_in_a_top_n_and_count_every_hypothesis():
    """ContrastTests lists the tokens with top_images > 0; ``tested`` counts every tested token of the label's
    images, and the q-values are BH over all of them (the others have p = 1)."""
    parsed, _, _ = _toy_world(1, n_img=20)
    for per in G.contrast_tests(parsed, (5, 20)).values():
        for t in per.values():
            assert t.tokens.size and np.all(t.top_images > 0) and t.tested >= t.tokens.size
            padded = G.benjamini_hochberg(np.concatenate([t.p_value, np.ones(t.tested - t.tokens.size)]))
            assert np.array_equal(t.q_value, padded[:t.tokens.size])


# ----------------------------------------------------------------------------- the label-contrast test

def _toy_world(seed, planted=4, nulls=2, n_img=40, concept=3, hard_neg=4, signal=3.0, spurious=1.5):
    """Constructed TIS of a world with null labels: ``({label: (ids, scores)}, {label: planted ids}, nulls)``.

    Deterministic (numpy's seeded generator; no training). Background tokens 0..29 (Zipf frequencies, a
    label-blind attention offset each), 6 distractors (ids 100..105) per image attended in every image (+2),
    each planted label k an object of 9-25 positions of its concept tokens 200+10k.. (+signal), and
    ``hard_neg`` positions with other labels' concept tokens (+1.5). Null labels have no object, so their top n
    goes to distractors and hard negatives more often: the competition a concept test must not report. And
    the IEM's spurious use of a background token: label k's IEM ranks background token ``2 + k`` higher
    (+``spurious``) in k's images only, though it occurs in every label's images alike (seen in trained IEMs).
    """
    rng = np.random.default_rng([seed, 20])
    bg_p = 1 / np.arange(1, 31) ** 1.1
    bg_p /= bg_p.sum()
    offset = np.concatenate([rng.normal(0, 0.5, 30), np.zeros(300)])
    truth = {k: list(range(200 + 10 * k, 200 + 10 * k + concept)) for k in range(planted)}
    parsed = {}
    for label in range(planted + nulls):
        ids = rng.choice(30, (n_img, 256), p=bg_p)
        boost = np.zeros((n_img, 256))
        others = [t for k, ts in truth.items() if k != label for t in ts]
        for i in range(n_img):
            pos = rng.permutation(256)
            ids[i, pos[:6]] = rng.integers(100, 106, 6)
            boost[i, pos[:6]] = 2.0
            ids[i, pos[6:6 + hard_neg]] = rng.choice(others, hard_neg)
            boost[i, pos[6:6 + hard_neg]] = 1.5
            if label in truth:
                side = rng.integers(3, 6)
                obj = pos[6 + hard_neg:6 + hard_neg + side * side]
                ids[i, obj] = rng.choice(truth[label], obj.size)
                boost[i, obj] = signal
        boost[ids == 2 + label] += spurious
        parsed[label] = (ids, rng.normal(size=(n_img, 256)) + boost + offset[np.minimum(ids, 329)])
    return parsed, truth, list(range(planted, planted + nulls))


def _significant(tests, alpha=0.05):
    return {(k, n): t.significant(alpha).tolist() for k, per in tests.items() for n, t in per.items()}


def test_contrast_is_calibrated_on_constructed_worlds():
    """30 constructed worlds (4 planted + 2 null labels, distractors, hard negatives, a spuriously attended
    background token per label): the label-contrast test keeps the false share and the null labels'
    discoveries at q = 0.05 within a binomial margin (one-sided 99.9%), while the within-image enrichment test
    reports distractors for every null label and the attention half alone reports the spurious tokens."""
    top_ns, seeds = (5, 20), range(30)
    false = found = null_any = null_labels = 0
    recall = []
    for seed in seeds:
        parsed, truth, nulls = _toy_world(seed)
        rows, _ = G.score_significant(_significant(G.contrast_tests(parsed, top_ns)), truth, nulls, top_ns)
        for r in rows:
            if r["kind"] == "planted":
                false += r["false_discoveries"]
                found += r["significant"]
                recall.append(r["recall"])
            else:
                null_any += r["significant"] > 0
                null_labels += 1
    assert found > 500
    assert false <= ss.binom.ppf(0.999, found, 0.05), (false, found)  # FDP <= q (BH), within the margin
    assert null_any <= ss.binom.ppf(0.999, null_labels, 0.05), (null_any, null_labels)
    assert np.mean(recall) >= 0.9, np.mean(recall)
    parsed, truth, nulls = _toy_world(0)
    _, summary = G.score_significant(_significant(G.contrast_tests(parsed, top_ns, occurrence=False)), truth, nulls,
                                     top_ns)
    assert all(s["fdp"] > 0.1 and s["null_labels_with_discovery"] > 0.5 for s in summary), summary  # one half alone
    enr = G.significance_tests({k: None for k in parsed}, None, top_ns, progress=False, parsed=parsed)
    _, summary = G.score_significant(_significant(enr), truth, nulls, top_ns)
    assert all(s["null_labels_with_discovery"] == 1.0 for s in summary)  # the finding, reproduced


def test_contrast_pure_null_pvalues_are_valid():
    """No label has a concept (6 labels drawn alike): p-values are super-uniform, discoveries rare."""
    ps, any_found, cells = [], 0, 0
    for seed in range(12):
        parsed, _, _ = _toy_world(seed, planted=0, nulls=6, n_img=30, hard_neg=0)
        for rivals in (0, 2):
            tests = G.contrast_tests(parsed, (5, 20), rivals=rivals)
            for per in tests.values():
                for t in per.values():
                    if rivals == 0:
                        ps.append(t.p_value)
                    any_found += t.significant().size > 0
                    cells += 1
    ps = np.concatenate(ps)
    for a in (0.01, 0.05, 0.2):
        assert np.mean(ps <= a) <= a + 3 * np.sqrt(a * (1 - a) / ps.size) + 0.01, a
    assert any_found <= ss.binom.ppf(0.999, cells, 0.05)


def test_contrast_exact_equals_within_stratum_label_permutation():
    """Both exact halves are label-permutation p-values (Monte Carlo, 4000 shuffles): attention within strata,
    occurrence over all images; the p-value is the larger."""
    rng = np.random.default_rng(7)
    parsed = {}
    for label in range(3):
        ids = rng.integers(0, 12, (15, 256))
        ids[:, :rng.integers(0, 4)] = 50  # token 50 at 0-3 positions: several count strata
        scores = rng.normal(size=(15, 256))
        scores[:, 0] += 1.5 * (label == 0)  # label 0 puts its first position (token 50 when present) high
        parsed[label] = (ids, scores)
    for strata in ("occurrence", "count"):
        t = G.contrast_tests(parsed, (5,), rivals=0, strata=strata, min_top_images=1)[0][5]
        i = int(np.flatnonzero(t.tokens == 50)[0])
        ids = np.concatenate([parsed[k][0] for k in range(3)])
        top = np.argsort(np.concatenate([parsed[k][1] for k in range(3)]), axis=1)[:, ::-1][:, :5]
        y = np.repeat(np.arange(3), 15)
        c = (ids == 50).sum(1)
        h = (np.take_along_axis(ids, top, 1) == 50).any(1)
        s = G.STRATA[strata][c]
        obs = int((h & (y == 0) & (c > 0)).sum())
        assert obs == t.top_images[i] and (c[y == 0] > 0).sum() == t.images[i]
        r2 = np.random.default_rng(0)
        hits = 0
        for _ in range(4000):
            yy = y.copy()
            for st in np.unique(s[c > 0]):
                idx = np.flatnonzero((s == st) & (c > 0))
                yy[idx] = r2.permutation(yy[idx])
            hits += int((h & (yy == 0) & (c > 0)).sum()) >= obs
        p_mc = hits / 4000
        assert abs(t.p_attention[i] - p_mc) <= 4 * np.sqrt(p_mc * (1 - p_mc) / 4000) + 0.005, (strata, t.p_attention[i], p_mc)
        # the occurrence half: a plain label permutation of "the image contains token 50"
        occ = int(((c > 0) & (y == 0)).sum())
        p_occ = np.mean([((c > 0) & (r2.permutation(y) == 0)).sum() >= occ for _ in range(4000)])
        assert abs(t.p_occurrence[i] - p_occ) <= 4 * np.sqrt(p_occ * (1 - p_occ) / 4000) + 0.005, (t.p_occurrence[i], p_occ)
        assert t.p_value[i] == max(t.p_attention[i], t.p_occurrence[i])


def test_contrast_same_numbers_for_any_order_and_rivals_only_raise_p():
    parsed, _, _ = _toy_world(3, n_img=20)
    a = G.contrast_tests(parsed, (1, 5, 20))
    rng = np.random.default_rng(1)
    shuffled = {}
    for k in sorted(parsed, reverse=True):  # other dict order, images shuffled within each label
        perm = rng.permutation(len(parsed[k][0]))
        shuffled[k] = (parsed[k][0][perm], parsed[k][1][perm])
    b = G.contrast_tests(shuffled, (20, 5, 1))
    pooled = G.contrast_tests(parsed, (1, 5, 20), rivals=0)
    for k in parsed:
        for n in (1, 5, 20):
            x, y, z = a[k][n], b[k][n], pooled[k][n]
            assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.p_value, y.p_value)
            assert np.array_equal(x.q_value, y.q_value) and np.array_equal(x.top_images, y.top_images)
            assert np.array_equal(x.tokens, z.tokens) and np.all(x.p_value >= z.p_value)
    with pytest.raises(CortexError, match="at least two labels"):
        G.contrast_tests({0: parsed[0]}, (5,))


# ----------------------------------------------------------------------------- 16.1 TIS_analysis.py output

@pytest.fixture()
def hand_world(tmp_path):
    """Token 7 in every image of label 0 and in 10 of label 1's 30; label 0: at the best-scored position of each
    of its 30 images; label 1: random scores."""
    rng = np.random.default_rng(3)
    root = tmp_path / "exp"
    w = DatasetWriter(root / "datasets", np.zeros((40, 256), np.float32), layout="compact")
    tis = root / "results" / "TIS" / "Net1" / "TIS_value_train"
    rows = {0: [], 1: []}
    for label in (0, 1):
        for i in range(30):
            ids = rng.integers(10, 40, 256)
            scores = rng.normal(size=256)
            if label == 0 or i < 10:
                ids[5] = 7  # label 0's IEM puts it first, label 1's does not
            if label == 0:
                scores[5] = 50.0
            w.add("train", f"{label}_{i}.npy", label, ids)
            rows[label].append([f"{label}_{i}.npy", label, format_list(scores)])
    w.close({"num_classes": 2})
    for label, rs in rows.items():
        with atomic_write(tis / f"label_{label}.csv") as f:
            wr = csv.writer(f)
            wr.writerow(["filename", "label", "contribution"])
            wr.writerows(rs)
    (tis / "tis_config.json").write_text(json.dumps({"attribution": "smoothgrad"}))
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tis_analysis_writes_significance(hand_world):
    sd = hand_world / "results" / "TIS" / "Net1" / "TIS_statistics_train"
    run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", hand_world, "--no_progress"])
    sectioned = (sd / "label_0.csv").read_bytes()
    assert not (sd / G.ENRICHMENT_FILE).exists()  # the within-image test is opt-in
    rows = _rows(sd / G.SIGNIFICANCE_FILE)
    assert list(rows[0]) == G.SIGNIFICANCE_HEADER
    top = [r for r in rows if r["label"] == "0" and r["top_n"] == "1"]
    assert top[0]["token"] == "7" and top[0]["images"] == "30" and top[0]["top_images"] == "30"
    assert float(top[0]["q_value"]) < 1e-6 and float(top[0]["expected"]) == pytest.approx(30 * 30 / 40)
    assert float(top[0]["occurrence_ratio"]) == pytest.approx(30 / (40 * 30 / 60))
    assert float(top[0]["p_attention"]) == pytest.approx(1 / math.comb(40, 30), rel=1e-4)  # every image of 0 first
    assert float(top[0]["p_occurrence"]) == pytest.approx(math.comb(40, 30) / math.comb(60, 30), rel=1e-4)
    assert not any(r["token"] == "7" and float(r["q_value"]) < 0.05 for r in rows if r["label"] == "1")
    run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", hand_world, "--no_progress",
                                                     "--significant_only", "--enrichment"])
    sig = _rows(sd / G.SIGNIFICANCE_FILE)
    assert sig and all(float(r["q_value"]) < 0.05 for r in sig)
    assert {(r["label"], r["token"]) for r in sig} == {("0", "7")}
    enr = _rows(sd / G.ENRICHMENT_FILE)
    assert list(enr[0]) == G.ENRICHMENT_HEADER and all(float(r["q_value"]) < 0.05 for r in enr)
    top = [r for r in enr if r["label"] == "0" and r["top_n"] == "1"]
    assert top[0]["token"] == "7" and top[0]["count"] == "30"
    assert float(top[0]["expected"]) == pytest.approx(30 / 256, rel=1e-5)
    assert (sd / "label_0.csv").read_bytes() == sectioned  # the authors'-format files do not change
    found = G.significant_tokens(sd / G.SIGNIFICANCE_FILE)
    assert all(found[(0, n)] == [7] for n in (1, 5, 10, 20))
    assert all(found[(0, n)][0] == 7 for n in (1, 5, 10, 20))


# ----------------------------------------------------------------------------- 16.2 null labels and their report

def test_null_classes_in_synthetic_world(tmp_path):
    from cortex.data.synthetic import SyntheticWorld, WorldConfig

    w = SyntheticWorld.build(WorldConfig(num_classes=2, null_classes=2, n_codes=96, concept_tokens=3,
                                         n_background=16, n_distractors=4))
    gt = w.ground_truth()
    assert gt["num_classes"] == 4 and gt["null_labels"] == [2, 3] and sorted(gt["concept_tokens"]) == ["0", "1"]
    rng = np.random.default_rng(0)
    planted = set().union(*map(set, w.concept_tokens.values()))
    assert not set(w.sample(3, rng).tolist()) & planted
    assert set(w.sample(1, rng).tolist()) & set(w.concept_tokens[1])
    hard = SyntheticWorld.build(WorldConfig(num_classes=2, null_classes=2, n_codes=96, concept_tokens=3,
                                            n_background=16, n_distractors=4, hard_negatives=5))
    ids0 = hard.sample(0, np.random.default_rng(1))
    assert len(set(ids0.tolist()) & set(hard.concept_tokens[1])) >= 1  # class 1's tokens in a class-0 image
    assert np.isin(hard.sample(3, np.random.default_rng(2)), list(planted)).sum() == 5  # a null label: 5 positions
    root = tmp_path / "exp"
    run_script("VQGAN_explanation/generate_dataset.py",
               ["--root", root, "--num_classes", 2, "--null_classes", 1, "--train_per_class", 2, "--val_per_class", 1,
                "--test_per_class", 1, "--n_codes", 64, "--concept_tokens", 3, "--n_background", 16,
                "--n_distractors", 4, "--object_size", 3, 3, "--patch_size", 2, "--layout", "compact"])
    gt = json.loads((root / "datasets" / "ground_truth.json").read_text())
    assert gt["null_labels"] == [2] and G.null_labels(root / "datasets") == [2]
    assert {r["label"] for r in _rows(root / "datasets" / "train_embeddings.csv")} == {"0", "1", "2"}


def test_significance_recovery_report(tmp_path):
    path = tmp_path / G.ENRICHMENT_FILE
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(G.ENRICHMENT_HEADER)
        w.writerows([[0, 5, 1, 9, 1, 9, 1e-9, 1e-8], [0, 5, 2, 9, 1, 9, 1e-9, 1e-8], [0, 5, 30, 4, 1, 4, 0.01, 0.04],
                     [1, 5, 3, 9, 1, 9, 1e-9, 1e-8], [1, 5, 4, 2, 1, 2, 0.2, 0.3], [2, 5, 31, 5, 1, 5, 1e-4, 1e-3]])
    rows, summary = G.significance_recovery(path, {0: [1, 2], 1: [3, 4]}, [2, 3], [5])
    by = {r["label"]: r for r in rows}
    assert by[0]["recall"] == 1.0 and by[0]["false_discoveries"] == 1 and by[1]["recall"] == 0.5
    assert by[2]["kind"] == "null" and by[2]["false_discoveries"] == 1 and by[3]["significant"] == 0
    s = summary[0]
    assert s["recall"] == 0.75 and s["fdp"] == pytest.approx(1 / 4)
    assert s["null_discoveries"] == 0.5 and s["null_labels_with_discovery"] == 0.5


# ----------------------------------------------------------------------------- 16.3 bias statistics

@pytest.mark.parametrize("seed", range(6))
def test_cliff_delta_from_mannwhitney_equals_sorting(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, rng.integers(1, 60)), rng.integers(0, 6, rng.integers(1, 60))
    d, p = B.cliffs_delta_mwu(x, y)
    assert d == pytest.approx(CD.cliffs_delta(x, y), abs=1e-12)
    assert p == pytest.approx(ss.mannwhitneyu(x, y, alternative="two-sided").pvalue)
    lo, hi = B.bootstrap_ci(x, y, 500, seed=1)
    assert (lo, hi) == B.bootstrap_ci(x, y, 500, seed=1)  # seeded
    assert -1 <= lo <= hi <= 1


def test_bootstrap_ci_matches_plain_resampling():
    """The multinomial shortcut gives the distribution of plain with-replacement resampling."""
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 5, 80), rng.integers(1, 6, 70)
    lo, hi = B.bootstrap_ci(x, y, 4000, seed=0)
    r2 = np.random.default_rng(9)
    plain = [CD.cliffs_delta(r2.choice(x, x.size), r2.choice(y, y.size)) for _ in range(4000)]
    assert lo == pytest.approx(np.quantile(plain, 0.025), abs=0.03)
    assert hi == pytest.approx(np.quantile(plain, 0.975), abs=0.03)
    assert lo < CD.cliffs_delta(x, y) < hi


def _authors_rule(stats_files, top_n, token_num, neutral_ids):
    """The authors' table written from their description: per label file (ascending label), the first
    token_num rows of 'Top n Tokens'; the tokens cell is the str() of the list of token strings; per neutral
    image the positions holding one of them; average = total / files as a float; cliff (theirs) halves."""
    out = []
    for label in sorted(stats_files):
        toks = []
        with open(stats_files[label], newline="") as f:
            rows = list(csv.reader(f))
        i = rows.index([f"Top {top_n} Tokens"]) + 2
        while len(toks) < token_num and i < len(rows) and rows[i] and rows[i][0].isdigit():
            toks.append(rows[i][0])
            i += 1
        counts = [sum(1 for t in img if str(t) in toks) for img in neutral_ids]
        out.append([str(len(counts)), str(sum(counts)), str(sum(counts) / len(counts)), str(len(toks)), str(label),
                    str(toks)])
    return out


def test_bias_table_authors_format(tmp_path):
    from cortex.paths import ExperimentPaths

    files = {}
    for label, toks in ((1, [12, 7, 3]), (0, [5, 7, 40])):
        p = tmp_path / f"label_{label}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Total Images: 3"])
            for n in (1, 5):
                w.writerow([f"Top {n} Tokens"])
                w.writerow(["Token", "Frequency", "Files"])
                for t in toks:
                    w.writerow([t, 3, "a.npy; b.npy"])
        files[label] = p
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, 256) for _ in range(25)]
    from cortex.analysis.statistics_files import read_stats_section

    rows = B.detect_bias({k: read_stats_section(p, 5, 2) for k, p in files.items()}, ids)
    paths = ExperimentPaths(experiment="dalle", root=tmp_path, bias_type="doctor_gender")
    out = B.write_bias_csv(paths.bias_dir() / B.bias_csv_name(5, 2), rows)
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:8] == ["total_files", "total_token_occurrences", "average_frequency_per_file",
                            "number_of_target_tokens", "label", "tokens", "cliff_delta", "cliff_delta_seed"]
    assert table[0][8:] == ["p_value", "cliff_delta_ci_low", "cliff_delta_ci_high", "magnitude"]
    assert [r[:6] for r in table[1:]] == _authors_rule(files, 5, 2, ids)
    assert table[1][5] == "['5', '7']"
    assert float(table[1][7]) == pytest.approx(float(table[1][6]) / 2, abs=1e-6)
    back = B.read_bias_csv(out)
    assert back[0]["tokens"] == [5, 7] and back[0]["p_value"] == pytest.approx(rows[0].p_value, rel=1e-5)
    assert back[0]["cliff_delta_ci_low"] <= back[0]["cliff_delta"] <= back[0]["cliff_delta_ci_high"]


def test_bias_figure_draws_only_this_run(tmp_path, monkeypatch):
    """A doctor_gender figure never draws another bias type's (or an earlier run's) bars."""
    from cortex.paths import ExperimentPaths

    other = ExperimentPaths(experiment="dalle", root=tmp_path, bias_type="doctor_color")
    stale = B.detect_bias({0: [1], 1: [2]}, [np.array([1, 1, 2]), np.array([2, 2, 1])], n_boot=0)
    B.write_bias_csv(other.bias_dir() / B.bias_csv_name(5, 2), stale)
    drawn = []
    import matplotlib.axes

    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: drawn.append(a) or real_bar(self, *a, **k))
    paths = ExperimentPaths(experiment="dalle", root=tmp_path, bias_type="doctor_gender")
    rows = B.detect_bias({0: [1, 5], 1: [2, 7]}, [np.array([1, 1, 2, 5]), np.array([2, 2, 2, 9]), np.array([1, 7])])
    png = B.plot_bias(paths, 5, 2, rows=rows)
    assert png.exists() and len([a for a in drawn if np.isscalar(a[0])]) == 2  # this run's two labels only


# ----------------------------------------------------------------------------- 12.5 / 14.5 inputs of the current run

def _sha(path):
    from cortex.utils import file_sha256

    return file_sha256(path)


def _fake_tis_run(root, data_dir, tis_dir, ckpt, labels_scores, attribution="smoothgrad"):
    """TIS files of a run (hand-made scores) whose tis_config.json names ``ckpt`` and the train CSV."""
    from cortex.data.formats import read_split

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        ckpt.write_bytes(b"weights of the current IEM")
    rng = np.random.default_rng(0)
    by = {}
    for r in read_split(data_dir, "train"):
        by.setdefault(r.label, []).append(r)
    for label, recs in by.items():
        with atomic_write(tis_dir / f"label_{label}.csv") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label", "contribution"])
            for r in recs:
                w.writerow([r.filename, label, format_list(labels_scores(r, rng))])
    cfg = {"attribution": attribution, "checkpoint": {"file": ckpt.name, "sha256": _sha(ckpt)},
           "data": {"split": "train", "csv_sha256": _sha(data_dir / "train_embeddings.csv")}}
    (tis_dir / "tis_config.json").write_text(json.dumps(cfg))


@pytest.fixture()
def dalle_root(tmp_path):
    from cortex.paths import ExperimentPaths

    root = tmp_path / "dalle"
    run_script("Dalle_explanation/generate_dataset.py",
               ["--root", root, "--bias_type", "doctor_gender", "--train_per_class", 8, "--val_per_class", 2,
                "--test_per_class", 2, "--neutral_images", 24, "--n_codes", 160, "--attribute_tokens", 6,
                "--doctor_tokens", 8, "--n_background", 24, "--n_distractors", 8, "--layout", "compact", "--no_images"])
    paths = ExperimentPaths(experiment="dalle", root=root, bias_type="doctor_gender")
    gt = json.loads((paths.data_dir / "ground_truth.json").read_text())
    planted = {int(k): set(v) for k, v in gt["concept_tokens"].items()}

    def scores(r, rng):  # the label's attribute tokens score highest
        return rng.random(256) + 5.0 * np.isin(r.ids, list(planted[r.label]))

    _fake_tis_run(root, paths.data_dir, paths.tis_dir(1, "train"), paths.best_ckpt(1), scores)
    run_script("Dalle_explanation/TIS_analysis.py", ["--root", root, "--model", 1, "--bias_type", "doctor_gender",
                                                     "--no_progress"])
    return root, paths


def test_bias_detection_refuses_inputs_not_of_this_run(dalle_root, capsys):
    root, paths = dalle_root
    args = ["--root", root, "--model", 1, "--bias_type", "doctor_gender", "--top_n", 5, "--token_num", 4,
            "--no_plot", "--n_boot", 200]
    out = run_script("Dalle_explanation/bias_detection.py", args)
    ok = out["csv"].read_bytes()
    r0 = out["rows"][0]
    assert r0.ci[0] <= r0.cliff_delta <= r0.ci[1] and 0 <= r0.p_value <= 1
    # another IEM now sits at the checkpoint path: the statistics explain the old one
    paths.best_ckpt(1).write_bytes(b"a retrained IEM")
    with pytest.raises(CortexError, match="explains another IEM"):
        run_script("Dalle_explanation/bias_detection.py", args)
    out = run_script("Dalle_explanation/bias_detection.py", [*args, "--allow_partial"])
    assert "--allow_partial" in capsys.readouterr().out and out["csv"].read_bytes() == ok
    paths.best_ckpt(1).write_bytes(b"weights of the current IEM")
    # a statistics file left from another run (label 7), and a missing label
    stats = paths.stats_dir(1)
    (stats / "label_7.csv").write_bytes((stats / "label_1.csv").read_bytes())
    with pytest.raises(CortexError, match=r"labels \[?7\b"):
        run_script("Dalle_explanation/bias_detection.py", args)
    (stats / "label_7.csv").unlink()
    (stats / "label_1.csv").rename(stats / "label_1.bak")
    with pytest.raises(CortexError, match=r"labels \[1\] of the train split have no statistics"):
        run_script("Dalle_explanation/bias_detection.py", args)
    (stats / "label_1.bak").rename(stats / "label_1.csv")
    # near-chance IEM: a loud warning
    res = paths.testing_results(1)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text("Accuracy\n52.0\n")
    with pytest.warns(UserWarning, match="near chance"):
        run_script("Dalle_explanation/bias_detection.py", args)


def test_concept_recovery_uses_only_current_runs(hand_world, capsys):
    """Statistics of an attribution left from an earlier IEM are left out (named: refused)."""
    from cortex.paths import ExperimentPaths

    root = hand_world
    paths = ExperimentPaths(experiment="vqgan", root=root)
    (paths.data_dir / "ground_truth.json").write_text(json.dumps({"concept_tokens": {"0": [7], "1": [99]}}))
    paths.best_ckpt(1).parent.mkdir(parents=True, exist_ok=True)
    paths.best_ckpt(1).write_bytes(b"old IEM")
    _fake_tis_run(root, paths.data_dir, paths.tis_dir(1, "train", "occlusion"), paths.best_ckpt(1),
                  lambda r, rng: rng.random(256), attribution="occlusion")
    run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", root, "--no_progress",
                                                     "--attribution", "occlusion"])
    paths.best_ckpt(1).write_bytes(b"new IEM")  # retrained since: the occlusion statistics are leftovers
    run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", root, "--no_progress"])
    summary = run_script("VQGAN_explanation/explanation_evaluation/concept_recovery.py", ["--root", root])
    assert {r["method"] for r in summary} == {"smoothgrad", "random"}
    assert "left out Net1 occlusion" in capsys.readouterr().out
    sig = _rows(root / "results" / "Explanation" / "concept_recovery_significance.csv")
    assert {r["method"] for r in sig} == {"smoothgrad"}
    mean5 = next(r for r in sig if r["label"] == "mean" and r["top_n"] == "5")
    assert float(mean5["recall"]) == pytest.approx(0.5)  # token 7 found for label 0; 99 does not exist
    with pytest.raises(CortexError, match="explains another IEM"):
        run_script("VQGAN_explanation/explanation_evaluation/concept_recovery.py",
                   ["--root", root, "--attribution", "occlusion"])
    summary = run_script("VQGAN_explanation/explanation_evaluation/concept_recovery.py",
                         ["--root", root, "--attribution", "occlusion", "--allow_partial"])
    assert "occlusion" in {r["method"] for r in summary}


# ----------------------------------------------------------------------------- 16.5 model randomisation

def test_model_randomisation_on_tiny_trained_iem(tiny_root, tmp_path):
    import shutil

    root = tmp_path / "exp"
    shutil.copytree(tiny_root / "datasets", root / "datasets")
    run_script("VQGAN_explanation/train.py", ["--model", 1, "--width", 8, "--epochs", 1, "--batch_size", 8,
                                              "--root", root, "--device", "cpu", "--accelerator", "cpu"])
    rows = run_script("VQGAN_explanation/explanation_evaluation/model_randomisation.py",
                      ["--root", root, "--model", 1, "--num_images", 4, "--nsamples", 2, "--max_stages", 3,
                       "--device", "cpu"])
    out = root / "results" / "Explanation" / "model_1" / "model_randomisation.csv"
    table = _rows(out)
    assert list(table[0]) == ["model", "attribution", "stage", "layer", "spearman_mean", "spearman_std", "images"]
    for a in ("smoothgrad", "smoothgrad_x_input"):
        rs = [r for r in rows if r["attribution"] == a]
        assert [r["stage"] for r in rs] == [0, 1, 2, 3] and rs[1]["layer"] == "fc3"
        assert rs[0]["spearman_mean"] == pytest.approx(1.0)
        assert rs[-1]["spearman_mean"] < 0.95, rs
    assert out.with_suffix(".png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- 16.2 the null check, end to end

def test_null_labels_end_to_end(tmp_path):
    """generate (3 planted + 2 null classes, hard negatives) -> train a tiny IEM -> TIS -> analysis (both tests)
    -> concept_recovery.

    Asserts the wiring and what holds for any training outcome (the calibration itself is tested on constructed
    TIS above, over many seeds): both tests are scored, the summary rows are those of the files, the null
    labels' p-value figure is written, and the null labels get at most one significant token each on average
    (wide margin: the label-contrast test measured 0 on such worlds; the enrichment test gave 1-11).
    """
    root = tmp_path / "exp"
    world = ["--num_classes", 3, "--null_classes", 2, "--hard_negatives", 4, "--train_per_class", 24,
             "--val_per_class", 4, "--test_per_class", 1, "--n_codes", 96, "--concept_tokens", 3, "--n_background",
             16, "--n_distractors", 4, "--object_size", 3, 5, "--patch_size", 2, "--layout", "compact"]
    run_script("VQGAN_explanation/generate_dataset.py", [*world, "--root", root, "--seed", 0])
    run_script("VQGAN_explanation/train.py", ["--model", 1, "--width", 16, "--epochs", 6, "--batch_size", 8,
                                              "--root", root, "--device", "cpu", "--accelerator", "cpu"])
    run_script("VQGAN_explanation/TIS_computation.py", ["--model", 1, "--data_type", "train", "--nsamples", 2,
                                                        "--batch_size", 60, "--root", root, "--device", "cpu",
                                                        "--no_progress"])
    run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", root, "--no_progress", "--enrichment"])
    run_script("VQGAN_explanation/explanation_evaluation/concept_recovery.py", ["--root", root])
    ex = root / "results" / "Explanation"
    stats = root / "results" / "TIS" / "Net1" / "TIS_statistics_train"
    gt = json.loads((root / "datasets" / "ground_truth.json").read_text())
    planted = {int(k): v for k, v in gt["concept_tokens"].items()}
    for csv_name, test_file in (("concept_recovery_significance.csv", G.SIGNIFICANCE_FILE),
                                ("concept_recovery_enrichment.csv", G.ENRICHMENT_FILE)):
        rows = _rows(ex / csv_name)
        assert len([r for r in rows if r["kind"] == "null"]) == 8 and len([r for r in rows if r["kind"] == "planted"]) == 12
        _, summary = G.significance_recovery(stats / test_file, planted, [3, 4], (1, 5, 10, 20))
        mean = {int(r["top_n"]): r for r in rows if r["label"] == "mean"}
        for s in summary:
            for c in ("recall", "fdp", "null_discoveries", "null_labels_with_discovery"):
                assert float(mean[s["top_n"]][c]) == pytest.approx(s[c], abs=1e-6)
    for r in G.read_significance(stats / G.SIGNIFICANCE_FILE):
        assert 0 <= r["p_value"] <= r["q_value"] <= 1 and r["top_images"] <= r["images"]
    contrast = [r for r in _rows(ex / "concept_recovery_significance.csv") if r["label"] == "mean"]
    assert all(float(r["null_discoveries"]) <= 1.0 for r in contrast), contrast
    assert (ex / "null_label_pvalues.png").stat().st_size > 10_000


def test_one_label_run_removes_an_earlier_significance_file(tmp_path):
    """One label: no label-contrast test, and an earlier run's tis_significance.csv does not stay behind."""
    from cortex.paths import ExperimentPaths
    from cortex.provenance import significance_record_path
    from tests.helpers import compact_dataset

    paths = ExperimentPaths(experiment="vqgan", root=tmp_path)
    compact_dataset(paths.data_dir, 1, 4)
    _fake_tis_run(tmp_path, paths.data_dir, paths.tis_dir(1, "train"), paths.best_ckpt(1),
                  lambda r, rng: rng.random(256))
    stale = paths.stats_dir(1, "smoothgrad") / G.SIGNIFICANCE_FILE
    stale.parent.mkdir(parents=True)
    stale.write_text("label,top_n,token\n0,5,7\n")  # left by an earlier run
    significance_record_path(stale).write_text("{}")
    run_script("VQGAN_explanation/TIS_analysis.py", ["--root", tmp_path, "--model", "1", "--no_progress"])
    assert (paths.stats_dir(1, "smoothgrad") / "label_0.csv").exists()
    assert not stale.exists() and not significance_record_path(stale).exists()


def test_hypergeom_tail_equals_scipy():
    """The label-contrast test's own hypergeometric tail agrees with scipy's (boost) to 1e-9 relative, edges
    (k outside the support, n = 0, N = M) included, for scalars and arrays, small p-values too."""
    rng = np.random.default_rng(5)
    M = rng.integers(1, 20000, 5000)
    n = (M * rng.random(M.size)).astype(int)
    N = (M * rng.random(M.size)).astype(int)
    k = (n * N / M * rng.uniform(0, 3, M.size)).astype(int) + rng.integers(-2, 3, M.size)
    M, n, N, k = (np.append(a, b) for a, b in zip((M, n, N, k), ([10, 10, 10, 50], [0, 4, 4, 25], [5, 10, 5, 25],
                                                                  [1, 4, 0, 25])))
    ours, ref = hypergeom_sf(k, M, n, N), ss.hypergeom.sf(k - 1, M, n, N)
    big = ref > 1e-250
    assert np.all(np.abs(ours - ref)[big] <= 1e-9 * ref[big] + 1e-12)
    assert np.all(ours[~big] < 1e-240) and ref.min() < 1e-100  # the far tails were exercised
    assert hypergeom_sf(3, 10, 4, 5).shape == () and float(hypergeom_sf(3, 10, 4, 5)) == pytest.approx(11 / 42)
