"""Issue 17.1 follow-up: the one-parse readers, linear token ranking, staged writes, bias counting in one call,
and TIS_analysis.py parsing each TIS file once. Timings live in bench/bench_stats.py; these tests check that
the fast paths give exactly what the row-by-row paths give, and fall back on anything unusual."""
import csv
import os
from collections import Counter

import numpy as np
import pytest

from cortex.data import list_csv as L
from cortex.analysis import bias as B, frequency as F, ranking as R, statistics as S
from cortex.scripts import load_script
from cortex.analysis.significance import run_significance
from cortex.utils import parse_int_list
from tests.test_stats_faithful import _analyse, _stats_dir, world  # noqa: F401  (fixture)


def _write(path, header, rows, newline="\n", bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f, lineterminator=newline)
        w.writerow(header)
        w.writerows(rows)
    return path


def _lists(n, width, seed=0):
    return np.random.default_rng(seed).integers(0, 16384, (n, width))


def _lit(ids):
    return "[" + ", ".join(map(str, ids)) + "]"


@pytest.fixture
def fast_always(monkeypatch):
    monkeypatch.setattr(L, "FAST_CSV_MIN_BYTES", 0)


def test_fast_int_list_csv_equals_row_parse(tmp_path, fast_always):
    ids = _lists(7, 256)
    for bom, nl in ((False, "\n"), (True, "\r\n")):
        p = _write(tmp_path / "s.csv", ["filename", "label", "indices"],
                   [[f"{i}_0.npy", i % 3, _lit(r)] for i, r in enumerate(ids)], nl, bom)
        names, labels, values = L.fast_list_csv(p, ["filename", "label", "indices"], 256, np.int64)
        assert names == [f"{i}_0.npy" for i in range(7)] and labels.tolist() == [i % 3 for i in range(7)]
        assert values.dtype == np.int64 and np.array_equal(values, ids)
    # a list column in the middle, other columns after it; any equal length
    p = _write(tmp_path / "n.csv", ["filename", "indices", "gender"], [[f"{i}.png", _lit(r[:9]), 1] for i, r in
                                                                         enumerate(ids)])
    header, prefix, values = L.fast_int_list_csv(p, "indices", n_values=None)
    assert header == ["filename", "indices", "gender"] and prefix[0].tolist()[:2] == ["0.png", "1.png"]
    assert np.array_equal(values, ids[:, :9])


@pytest.mark.parametrize("bad", ["short", "long_and_short", "negative", "space", "blank_row", "quoted_name",
                                 "bracket_in_name", "float", "empty_item", "trailing_field"])
def test_fast_int_list_csv_falls_back_on_anything_unusual(tmp_path, fast_always, bad):
    """Every oddity gives None (the row reader then names the line), never a silently wrong matrix."""
    rows = [[f"{i}_0.npy", 0, _lit(r)] for i, r in enumerate(_lists(4, 256))]
    if bad == "short":
        rows[2][2] = _lit(range(255))
    elif bad == "long_and_short":  # the total count is right, the rows are not
        rows[1][2], rows[2][2] = _lit(range(257)), _lit(range(255))
    elif bad == "negative":
        rows[1][2] = rows[1][2].replace("[", "[-", 1)
    elif bad == "space":
        rows[1][2] = rows[1][2].replace(", ", " ", 1)
    elif bad == "float":
        rows[1][2] = rows[1][2].replace(",", ".5,", 1)
    elif bad == "empty_item":
        rows[1][2] = rows[1][2].replace(", ", ", , ", 1)
    elif bad == "quoted_name":
        rows[1][0] = "a,b.npy"
    elif bad == "bracket_in_name":
        rows[1][0] = "a[1].npy"
    elif bad == "trailing_field":
        rows[1].append("x")
    p = _write(tmp_path / "s.csv", ["filename", "label", "indices"], rows)
    if bad == "blank_row":
        p.write_text(p.read_text().replace("\n", "\n\n", 2))
    assert L.fast_list_csv(p, ["filename", "label", "indices"], 256, np.int64) is None


def test_fast_float_reader_rejects_a_moved_value(tmp_path, fast_always):
    rows = [[f"{i}.npy", 0, _lit(np.linspace(-1, 1, 256) * (i + 1))] for i in range(3)]
    rows[0][2] = _lit(np.linspace(-1, 1, 257))
    rows[1][2] = _lit(np.linspace(-1, 1, 255))
    p = _write(tmp_path / "t.csv", ["filename", "label", "contribution"], rows)
    assert L.fast_list_csv(p, ["filename", "label", "contribution"]) is None
    rows[0][2] = rows[1][2] = rows[2][2]
    names, labels, scores = L.fast_list_csv(_write(p, ["filename", "label", "contribution"], rows),
                                            ["filename", "label", "contribution"])
    assert scores.flags.writeable and np.array_equal(scores[0], np.linspace(-1, 1, 256) * 3)


def test_rank_occurrences_is_counter_most_common():
    rng = np.random.default_rng(0)
    for trial in range(200):
        flat = rng.integers(0, [3, 40, 500, 16384, 10 ** 6][trial % 5], int(rng.integers(1, 2000)))
        if trial % 7 == 0:
            flat = flat - 20  # negative ids: the sorting path
        limit = [None, 1, 7, 100][trial % 4]
        tokens, counts, where = R.rank_occurrences(flat, limit, positions=True)
        want = Counter(flat.tolist()).most_common(limit)
        assert list(zip(tokens.tolist(), counts.tolist())) == want
        for t, w in zip(tokens, where):
            assert np.array_equal(w, np.flatnonzero(flat == t))
        tokens, counts, _ = R.rank_occurrences(flat, limit)  # first occurrences found without the full sort
        assert list(zip(tokens.tolist(), counts.tolist())) == want


def test_staged_files_are_atomic(tmp_path):
    out = tmp_path / "freq"
    F.write_frequency_baseline(out, {0: [(5, 3)], 1: [(7, 1)]})
    assert (out / "label_0.csv").read_bytes() == b"Token,Count\r\n5,3\r\n"
    mode = (out / "label_1.csv").stat().st_mode & 0o777
    assert mode == 0o666 & ~S_umask()
    with pytest.raises(RuntimeError):
        with S.StagedFiles(out) as stage:
            with stage.open(out / "label_0.csv") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert (out / "label_0.csv").read_bytes() == b"Token,Count\r\n5,3\r\n"  # untouched
    assert sorted(os.listdir(out)) == ["label_0.csv", "label_1.csv"]  # no staging folder left


def S_umask():
    from cortex.utils import current_umask

    return current_umask()


@pytest.mark.parametrize("fast", [False, True])
def test_read_neutral_set_one_matrix_and_count_hits(tmp_path, monkeypatch, fast):
    monkeypatch.setattr(L, "FAST_CSV_MIN_BYTES", 0 if fast else 1 << 40)
    ids = _lists(6, 256, seed=1)
    p = _write(tmp_path / "results_none.csv", ["filename", "indices", "gender", "color"],
               [[f"{i}.png" if i != 2 else "", _lit(r), i % 2, 0] for i, r in enumerate(ids)])
    names, got = B.read_neutral_set(p)
    assert names == ["0.png", "1.png", "row_3", "3.png", "4.png", "5.png"]
    assert isinstance(got, np.ndarray) and got.shape == (6, 256) and np.array_equal(got, ids)
    toks = ids[0, :5].tolist() + [16385]
    want = [int(np.isin(r, toks).sum()) for r in ids]
    calls = []
    real = B._is_token
    monkeypatch.setattr(B, "_is_token", lambda *a: calls.append(1) or real(*a))
    assert B.count_hits(got, set(toks)).tolist() == want
    assert B.count_hits(list(got), toks).tolist() == want  # a list of rows: one call too
    assert B.count_hits(got - 20, toks).tolist() == [int(np.isin(r - 20, toks).sum()) for r in ids]  # np.isin path
    assert len(calls) == 3  # one membership test per call, not one per image


def test_read_neutral_set_ragged_and_bad_rows(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text('indices\n"[1, 2, 2]"\n"[3]"\n')
    names, ids = B.read_neutral_set(p)
    assert isinstance(ids, list) and [r.tolist() for r in ids] == [[1, 2, 2], [3]]
    assert B.count_hits(ids, [2, 3]).tolist() == [2, 1]
    p.write_text('indices\n"[1, 2]"\n"[3, x]"\n')
    with pytest.raises(Exception, match=r"r\.csv:3"):
        B.read_neutral_set(p)
    assert parse_int_list("[1, 2]").tolist() == [1, 2]


def test_tis_analysis_parses_each_tis_file_once(world, monkeypatch):  # noqa: F811
    import cortex.attribution.store as T

    reads = Counter()
    real = T.read_tis_file

    def counting(path):
        reads[os.path.basename(path)] += 1
        return real(path)

    monkeypatch.setattr(T, "read_tis_file", counting)
    _analyse(world)
    assert reads and set(reads.values()) == {1}, reads  # the enrichment tests reuse the parsed scores
    kept = (_stats_dir(world) / "tis_significance.csv").read_bytes()
    args = load_script("VQGAN_explanation/TIS_analysis.py").get_args_parser().parse_args(
        ["--model", "1", "--root", str(world), "--no_progress"])
    run_significance(args, "vqgan")  # the files parsed again: the same tests
    assert (_stats_dir(world) / "tis_significance.csv").read_bytes() == kept
    assert sum(reads.values()) == 2 * len(reads)
