"""TIS statistics and frequency baseline: byte-equal to the authors' scripts; integrity of the inputs.

The "authors' rule" below is re-written here from their description (no code of theirs, nothing of
cortex.analysis.statistics): per image, the top-n positions are ``np.argsort(scores)[-n:][::-1]``; a plain dict / Counter
is filled in reading order and sorted by count, descending, with Python's stable sort (ties: first
occurrence); Files lists the image of every occurrence; the global file has a ``Top N,Token,Frequency,Files``
header and, per n, a ``Top n Tokens`` row followed by the rows.
"""
import csv
import io
import json
from collections import Counter

import numpy as np
import pytest

from cortex import provenance as P
from cortex.data import list_csv as L
from cortex.analysis import statistics as S, statistics_files as SF
from cortex.attribution.store import read_tis_file
from cortex.data.writer import DatasetWriter
from cortex.utils import CortexError, atomic_write, format_list
from tests.helpers import run_script

TOP_NS = (1, 5, 10, 20)
N_CODES = 400
LABELS = {0: 8, 1: 5, 2: 3}  # label -> images


def _write_tis(path, rows):
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "contribution"])
        for name, label, scores in rows:
            w.writerow([name, label, format_list(scores)])


@pytest.fixture(params=["row_reader", "fast_reader"])
def world(tmp_path, request, monkeypatch):
    """3 labels, ids over 400 codes (many tokens seen once: ties at the 100-row cut) and coarse scores
    (values in {0, .25, .5, .75, 1}: many equal scores, so numpy's tie order matters). Run with the
    row-by-row CSV readers and with the one-parse readers (``fast_list_csv``, used for files over 64 KiB)."""
    monkeypatch.setattr(L, "FAST_CSV_MIN_BYTES", 0 if request.param == "fast_reader" else 1 << 40)
    rng = np.random.default_rng(3)
    root = tmp_path / "exp"
    w = DatasetWriter(root / "datasets", np.zeros((N_CODES, 256), np.float32), layout="compact")
    tis = root / "results" / "TIS" / "Net1" / "TIS_value_train"
    for label, n in LABELS.items():
        rows = []
        for i in range(n):
            name = f"{label}_{i}.npy"
            ids = rng.integers(0, N_CODES, 256)
            ids[:40] = rng.integers(0, 6, 40)  # a few frequent tokens too
            w.add("train", name, label, ids)
            rows.append((name, label, rng.integers(0, 5, 256) / 4))
        rows.reverse()  # TIS rows in another order than the CSV: reading order is the TIS file's
        _write_tis(tis / f"label_{label}.csv", rows)
    w.close({"num_classes": 3})
    (tis / "tis_config.json").write_text(json.dumps({"attribution": "smoothgrad", "method": "max"}))
    return root


def _csv_text(rows) -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def _authors_tis_statistics(tis_dir, ids_of, labels, limit=100):
    """{file name: expected bytes}: the authors' rule, labels read in increasing order for the global file."""
    out, overall = {}, {n: {} for n in TOP_NS}
    for label in labels:
        with open(tis_dir / f"label_{label}.csv", newline="") as f:
            data = list(csv.reader(f))[1:]
        per = {n: {} for n in TOP_NS}
        for name, _, contribution in data:
            scores = np.array([float(v) for v in contribution.strip("[]").split(",")])
            for n in TOP_NS:
                for p in np.argsort(scores)[-n:][::-1]:
                    tok = ids_of[name][p]
                    for d in (per[n], overall[n]):
                        d.setdefault(tok, [0, []])
                        d[tok][0] += 1
                        d[tok][1].append(name)
        rows = [[f"Total Images: {len(data)}"]]
        for n in TOP_NS:
            rows += [[f"Top {n} Tokens"], ["Token", "Frequency", "Files"]]
            rows += [[t, c, "; ".join(fs)] for t, (c, fs) in sorted(per[n].items(), key=lambda x: x[1][0],
                                                                     reverse=True)[:limit]]
        out[f"label_{label}.csv"] = _csv_text(rows)
    rows = [["Top N", "Token", "Frequency", "Files"]]
    for n in TOP_NS:
        rows.append([f"Top {n} Tokens"])
        rows += [[t, c, "; ".join(fs)] for t, (c, fs) in sorted(overall[n].items(), key=lambda x: x[1][0],
                                                                 reverse=True)[:limit]]
    out["global_top_tokens_statistics.csv"] = _csv_text(rows)
    return out


def _ids_of(root):
    with open(root / "datasets" / "train_embeddings.csv", newline="") as f:
        return {r[0]: [int(v) for v in r[2].strip("[]").split(",")] for r in list(csv.reader(f))[1:]}


def _analyse(root, *extra):
    return run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", root, "--no_progress", *extra])


def _stats_dir(root):
    return root / "results" / "TIS" / "Net1" / "TIS_statistics_train"


def test_tis_statistics_byte_equal_to_authors_rule(world):
    _analyse(world)
    tis = world / "results" / "TIS" / "Net1" / "TIS_value_train"
    expected = _authors_tis_statistics(tis, _ids_of(world), sorted(LABELS))
    fast = L.fast_list_csv(tis / "label_0.csv", ["filename", "label", "contribution"])
    assert (fast is not None) == (L.FAST_CSV_MIN_BYTES == 0)  # the reader under test
    # the fixture has ties at the cut: label 0's top-20 section lists 100 of more tokens seen once
    top20 = SF.read_stats(_stats_dir(world) / "label_0.csv")[1][20]
    assert len(top20) == 100 and top20[-1][1] == 1
    for name, want in expected.items():
        assert (_stats_dir(world) / name).read_bytes() == want, name
    src = json.loads((_stats_dir(world) / "source.json").read_text())
    assert src["complete"] and sorted(src["labels"]) == ["0", "1", "2"]
    assert json.loads((_stats_dir(world) / "tis_config.json").read_text())["method"] == "max"


def test_frequency_baseline_byte_equal_to_authors_rule(world):
    fast = L.fast_list_csv(world / "datasets" / "train_embeddings.csv", ["filename", "label", "indices"], 256, np.int64)
    assert (fast is not None) == (L.FAST_CSV_MIN_BYTES == 0)
    run_script("VQGAN_explanation/generate_freq_based_tokens.py", ["--root", world])
    counters = {}
    with open(world / "datasets" / "train_embeddings.csv", newline="") as f:
        for name, label, ids in list(csv.reader(f))[1:]:
            counters.setdefault(label, Counter()).update(int(v) for v in ids.strip("[]").split(", "))
    fd = world / "results" / "TIS" / "frequency_baseline"
    for label, counter in counters.items():
        want = _csv_text([["Token", "Count"], *counter.most_common(100)])
        assert (fd / f"label_{label}.csv").read_bytes() == want
    # ties at the cut: the 100th count is shared with tokens left out
    last = counters["0"].most_common(100)[-1][1]
    assert sum(c == last for c in counters["0"].values()) > sum(c == last for _, c in counters["0"].most_common(100))


# ----------------------------------------------------------------------------- integrity (issue 12)

def test_incomplete_tis_run_is_an_error_unless_allow_partial(world, capsys):
    tis = world / "results" / "TIS" / "Net1" / "TIS_value_train"
    sd = _stats_dir(world)
    sd.mkdir(parents=True)
    (sd / "label_7.csv").write_text("Total Images: 1\r\n")  # an earlier run's statistics
    (tis / "label_2.csv").rename(tis / "label_2.csv.partial")  # an unfinished label
    with pytest.raises(CortexError, match=r"(?s)label_2.csv.partial.*--resume.*--allow_partial"):
        _analyse(world)
    summary = _analyse(world, "--allow_partial")
    out = capsys.readouterr().out
    assert "warning" in out and "label_2" in out
    assert summary["labels"] == [0, 1] and not summary["complete"]
    assert sorted(p.name for p in sd.glob("label_*.csv")) == ["label_0.csv", "label_1.csv"]  # label_7 removed
    assert json.loads((sd / "source.json").read_text())["complete"] is False


@pytest.mark.parametrize("defect", ["missing", "header_only", "short", "foreign", "no_config", "other_run"])
def test_check_tis_inputs_names_each_defect(world, defect):
    tis = world / "results" / "TIS" / "Net1" / "TIS_value_train"
    expected = S.split_label_counts(world / "datasets", "train")
    assert expected == LABELS
    S.check_tis_inputs(tis, expected)  # complete
    if defect == "missing":
        (tis / "label_1.csv").unlink()
        match = "no TIS file: 1"
    elif defect == "header_only":
        (tis / "label_1.csv").write_text("filename,label,contribution\r\n")
        match = "label_1.csv has no rows"
    elif defect == "short":
        lines = (tis / "label_1.csv").read_text().splitlines(keepends=True)
        (tis / "label_1.csv").write_text("".join(lines[:-1]))
        match = "label_1.csv has 4 rows, the split has 5"
    elif defect == "foreign":
        (tis / "label_9.csv").write_bytes((tis / "label_2.csv").read_bytes())
        match = "labels the dataset does not have: label_9.csv"
    elif defect == "other_run":  # cortex.attribution.tis records run ids: tis_config.json's and each finished label's
        (tis / "tis_config.json").write_text(json.dumps({"attribution": "smoothgrad", "run_id": "a" * 16}))
        (tis / "runs.json").write_text(json.dumps({"0": "a" * 16, "1": "b" * 16, "2": "a" * 16}))
        match = "labels 1 were written by another TIS run"
    else:
        (tis / "tis_config.json").unlink()
        match = "tis_config.json is missing"
    with pytest.raises(CortexError, match=match):
        S.check_tis_inputs(tis, expected)
    info = S.check_tis_inputs(tis, expected, allow_partial=True)
    assert info.problems and (1 not in info.labels) == (defect in ("missing", "header_only", "short", "other_run"))


def test_statistics_current_check(world):
    tis = world / "results" / "TIS" / "Net1" / "TIS_value_train"
    sd = _stats_dir(world)
    _analyse(world)
    assert P.check_statistics_current(sd, tis)["complete"]
    (sd / "label_5.csv").write_bytes((sd / "label_0.csv").read_bytes())  # stale file beside the run's
    with pytest.raises(CortexError, match="label.* 5 .*not part of the recorded"):
        P.check_statistics_current(sd, tis)
    (sd / "label_5.csv").unlink()
    names, labels, scores = read_tis_file(tis / "label_1.csv")
    _write_tis(tis / "label_1.csv", zip(names, labels, scores[:, ::-1]))  # TIS recomputed, same config
    with pytest.raises(CortexError, match="out of date.*labels 1"):
        P.check_statistics_current(sd, tis)
    _analyse(world)
    (tis / "tis_config.json").write_text(json.dumps({"attribution": "smoothgrad", "method": "mean"}))
    with pytest.raises(CortexError, match="another TIS run.*tis_config.json changed"):
        P.check_statistics_current(sd, tis)
    (sd / "source.json").unlink()
    with pytest.raises(CortexError, match="source.json missing"):
        P.check_statistics_current(sd, tis, require=True)


@pytest.mark.parametrize("bad", ["nan", "inf", "duplicate"])
def test_tis_rows_with_nan_or_repeated_image_are_rejected(world, bad):
    tis = world / "results" / "TIS" / "Net1" / "TIS_value_train"
    names, labels, scores = read_tis_file(tis / "label_0.csv")
    if bad == "duplicate":
        names[5] = names[2]
        match = rf"label_0.csv:7: image {names[2]} is listed twice \(also at line 4\)"
    else:
        scores[3, 17] = float(bad)
        match = rf"label_0.csv:5: non-finite TIS .*{names[3]}"
    _write_tis(tis / "label_0.csv", zip(names, labels, scores))
    with pytest.raises(CortexError, match=match):
        read_tis_file(tis / "label_0.csv")
    with pytest.raises(CortexError, match=match):
        _analyse(world)


def test_utf8_bom_headers_are_accepted(world):
    tis = world / "results" / "TIS" / "Net1" / "TIS_value_train"
    _analyse(world)
    want = {p.name: p.read_bytes() for p in _stats_dir(world).glob("label_*.csv")}
    for p in [*tis.glob("label_*.csv"), world / "datasets" / "train_embeddings.csv"]:
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    (world / "datasets" / "train_token_indices.pkl").unlink()
    names, _, _ = read_tis_file(tis / "label_0.csv")
    assert names[0] == "0_7.npy"
    _analyse(world)
    assert {p.name: p.read_bytes() for p in _stats_dir(world).glob("label_*.csv")} == want
    run_script("VQGAN_explanation/generate_freq_based_tokens.py", ["--root", world])
    stats0 = _stats_dir(world) / "label_0.csv"
    stats0.write_bytes(b"\xef\xbb\xbf" + stats0.read_bytes())
    assert SF.read_stats(stats0)[0] == 8


def test_frequency_baseline_rejects_label_outside_num_classes(world):
    csv_path = world / "datasets" / "train_embeddings.csv"
    text = csv_path.read_text()
    csv_path.write_text(text + '9_0.npy,7,"' + format_list(np.zeros(256, int)) + '"\r\n')
    with pytest.raises(CortexError, match=r"train_embeddings.csv:18: label 7 is outside 0..2"):
        run_script("VQGAN_explanation/generate_freq_based_tokens.py", ["--root", world])
    run_script("VQGAN_explanation/generate_freq_based_tokens.py", ["--root", world, "--num_classes", 8])
    assert (world / "results" / "TIS" / "frequency_baseline" / "label_7.csv").exists()
