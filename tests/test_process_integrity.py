"""Process integrity (issue 21): signals, completion markers, writer locks, disk full, NaN codebooks.

Real subprocesses where the fault is a process (SIGTERM / SIGINT to a running script, two writers at once).
Tiny everything: the session's 3-class world (compact layout), IEM width 8; a run is stopped as soon as it
has started (polled), never after a fixed sleep.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cortex.iem.checkpoints import UNFINISHED_MARKER
from cortex.utils import CortexError, atomic_torch_save, try_lock, unlock
from tests.helpers import run_script
from tests.test_train_integrity import _compact_copy

V = "VQGAN_explanation"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model", "1", "--width", "8", "--batch_size", "8", "--device", "cpu"]


def _start(script, argv):
    """A script as a shell would run it, in its own process (stdout/stderr captured)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before the state was reached:\n{err[-3000:]}")
        assert time.time() - t0 < timeout, "state not reached in time"
        time.sleep(0.2)


def _stop(proc, sig):
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _held(path) -> bool:
    fd = try_lock(path)
    if fd is None:
        return True
    unlock(fd)
    return False


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """A finished ClassificationNet1 (1 epoch) on a compact copy of the tiny world."""
    root = _compact_copy(tiny_root, tmp_path_factory.mktemp("pi"))
    run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", *TRAIN])
    return root


# ----------------------------------------------------------------------------- training

def test_sigterm_during_training_is_a_failure_and_resumes(trained, tmp_path):
    """SIGTERM (SLURM preemption) while train.py runs: one line, exit 143, the unfinished IEM is refused by
    test.py and TIS_computation.py, a second train.py into the folder is refused meanwhile, and --resume
    finishes the run."""
    root = _compact_copy(trained, tmp_path)
    d = root / "checkpoints" / "ClassificationNet1"
    p = _start(f"{V}/train.py", ["--root", root, "--epochs", "50", *TRAIN])
    _wait_for(lambda: (d / "model.pth").exists() and (d / "lightning" / "last.ckpt").exists(), p)
    # a second writer while the first runs: refused, naming the folder
    assert _held(d / "writer.lock")
    with pytest.raises(CortexError, match="another process is writing a training run"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", "--overwrite", *TRAIN])
    rc, out, err = _stop(p, signal.SIGTERM)
    assert rc == 143, err[-2000:]
    last = err.rstrip().split("\n")[-1]
    assert last.startswith("train.py: stopped by SIGTERM") and "--resume" in last, err[-2000:]
    assert "Traceback" not in err
    marker = json.loads((d / UNFINISHED_MARKER).read_text())
    assert marker["epochs"] == 50
    for script, extra in (("test.py", []), ("TIS_computation.py", ["--data_type", "test", "--nsamples", "1"])):
        with pytest.raises(CortexError, match=r"unfinished.*--resume"):
            run_script(f"{V}/{script}", ["--root", root, "--model", "1", "--device", "cpu", *extra])
    assert not (root / "results" / "TIS_value_test").exists() or not list((root / "results").rglob("label_*.csv"))
    done = torch.load(d / "lightning" / "last.ckpt", weights_only=False)["epoch"] + 1
    run_script(f"{V}/train.py", ["--root", root, "--epochs", str(done + 1), "--resume", *TRAIN])
    assert not (d / UNFINISHED_MARKER).exists()
    acc = run_script(f"{V}/test.py", ["--root", root, "--model", "1", "--device", "cpu"])
    assert 0 <= acc[1] <= 100


def test_overwrite_keeps_the_old_iem_until_the_data_checks_pass(trained, tmp_path):
    """NaN in codebook.npy: refused before training (naming the file and a token id); the previous IEM stays."""
    root = _compact_copy(trained, tmp_path)
    d = root / "checkpoints" / "ClassificationNet1"
    shutil.copytree(trained / "checkpoints", root / "checkpoints")
    before = (d / "best_model.pth").read_bytes()
    cb = np.load(root / "datasets" / "codebook.npy")
    cb[5, 3] = np.nan
    np.save(root / "datasets" / "codebook.npy", cb)
    nan = r"codebook\.npy: 1 of \d+ codebook entries hold NaN or Inf \(first: token id 5\)"
    with pytest.raises(CortexError, match=nan):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", "--overwrite", *TRAIN])
    assert (d / "best_model.pth").read_bytes() == before and not (d / UNFINISHED_MARKER).exists()


def test_every_batch_nan_is_an_error(tiny_root, tmp_path):
    """Per-image files full of NaN (files layout): not 'loss is nan' every batch and exit 0, but an error; the
    run stays unfinished."""
    root = tmp_path
    shutil.copytree(tiny_root / "datasets", root / "datasets", ignore=shutil.ignore_patterns("images", "codebook.npy"))
    for f in (root / "datasets" / "train").rglob("*.npy"):
        a = np.load(f)
        np.save(f, np.full_like(a, np.nan))
    with pytest.raises(CortexError, match="the loss of every training batch was NaN or Inf"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "2", "--data_layout", "files", *TRAIN])
    assert (root / "checkpoints" / "ClassificationNet1" / UNFINISHED_MARKER).exists()


def test_disk_full_while_saving_the_iem(trained, tmp_path, monkeypatch):
    """torch.save on a full disk raises 'RuntimeError: unexpected pos' over the ENOSPC: the OSError is what
    surfaces (run_main prints 'error: cannot write <folder>: disk full'), and the half-trained IEM is refused."""
    root = _compact_copy(trained, tmp_path)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if "best_model.pth" in str(getattr(f, "name", f)):
            try:
                f.write(b"PK\x03\x04 half")
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 6976 vs 6870")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as e:
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "2", *TRAIN])
    assert e.value.errno == errno.ENOSPC and "ClassificationNet1" in e.value.filename
    monkeypatch.setattr(torch, "save", real_save)
    d = root / "checkpoints" / "ClassificationNet1"
    assert (d / UNFINISHED_MARKER).exists() and not (d / "best_model.pth").exists()
    (d / "best_model.pth").write_bytes((d / "model.pth").read_bytes())  # even a complete-looking file
    with pytest.raises(CortexError, match="unfinished"):
        run_script(f"{V}/test.py", ["--root", root, "--model", "1", "--device", "cpu"])


def test_atomic_write_surfaces_the_os_error(tmp_path):
    from cortex.utils import atomic_write

    with pytest.raises(OSError) as e:
        with atomic_write(tmp_path / "x.bin", "wb"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("unexpected pos")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.bin")
    assert list(tmp_path.iterdir()) == []
    atomic_torch_save({"a": 1}, tmp_path / "ok.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]


# ----------------------------------------------------------------------------- TIS

# one noisy copy per forward+backward pass: slow enough to be stopped mid-label (the pass size is not a
# setting of the scores: a resumed run may take all copies at once)
SLOW_TIS = ["--model", "1", "--device", "cpu", "--data_type", "train", "--batch_size", "1", "--nsamples", "64",
            "--max_copies_per_pass", "1"]
FAST = ["--max_copies_per_pass", "64", "--no_progress"]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_tis_keeps_a_resumable_partial(trained, tmp_path, sig, status):
    """SIGTERM / Ctrl-C during TIS_computation.py: one line, exit 143 / 130, the label in progress stays
    .partial (never a finished label_k.csv), --resume completes it."""
    out = tmp_path / "res"
    argv = ["--root", trained, "--results_dir", out, *SLOW_TIS]
    p = _start(f"{V}/TIS_computation.py", argv)
    tis = out / "TIS" / "Net1" / "TIS_value_train"
    _wait_for(lambda: tis.exists() and any(f.stat().st_size > 100 for f in tis.glob("label_*.csv.partial")), p)
    rc, _, err = _stop(p, sig)
    assert rc == status, err[-2000:]
    assert "Traceback" not in err
    last = err.rstrip().split("\n")[-1]
    assert last.startswith("TIS_computation.py: stopped by SIG") and "--resume" in last, err[-1000:]
    partial = sorted(tis.glob("label_*.csv.partial"))
    assert partial, sorted(x.name for x in tis.iterdir())
    for f in partial:
        assert not f.with_suffix("").exists() or f.name != f.with_suffix("").name
    summary = run_script(f"{V}/TIS_computation.py", [*argv, *FAST, "--resume"])
    assert summary["skipped"] > 0 and not list(tis.glob("label_*.csv.partial"))
    assert sorted(f.name for f in tis.glob("label_*.csv")) == ["label_0.csv", "label_1.csv", "label_2.csv"]


def test_tis_overwrite_refused_while_another_run_writes(trained, tmp_path):
    """Two TIS_computation.py --overwrite with different settings into one folder: the second is refused while
    the first writes (before: labels of both in one folder)."""
    out = tmp_path / "res"
    p = _start(f"{V}/TIS_computation.py", ["--root", trained, "--results_dir", out, *SLOW_TIS, "--overwrite"])
    tis = out / "TIS" / "Net1" / "TIS_value_train"
    _wait_for(lambda: tis.exists() and any(tis.glob("label_*.csv.partial")), p)
    config = (tis / "tis_config.json").read_text()
    with pytest.raises(CortexError, match="another TIS_computation.py is writing into this folder"):
        run_script(f"{V}/TIS_computation.py", ["--root", trained, "--results_dir", out, *SLOW_TIS, "--overwrite",
                                               "--seed", "7", *FAST])
    assert (tis / "tis_config.json").read_text() == config
    rc, _, err = _stop(p, signal.SIGTERM)
    assert rc == 143
    # once it has ended, --overwrite replaces the folder's run as before
    run_script(f"{V}/TIS_computation.py", ["--root", trained, "--results_dir", out, *SLOW_TIS, *FAST, "--overwrite",
                                           "--seed", "7"])
    assert json.loads((tis / "tis_config.json").read_text())["seed"] == 7
    assert {json.loads(f.read_text())["config"]["seed"] for f in tis.glob("label_*.csv.run.json")} == {7}


# ----------------------------------------------------------------------------- writer locks of other folders

def _hold(folder):
    """Hold ``<folder>/writer.lock`` from this process (another fd: conflicts like another process)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = try_lock(folder / "writer.lock")
    assert fd is not None
    return fd


def test_evaluators_and_analysis_refuse_a_second_writer(tiny_root, tmp_path):
    from cortex.evaluation.evaluators import synthetic_dir
    from cortex.paths import ExperimentPaths

    paths = ExperimentPaths(experiment="vqgan", root=tiny_root)
    ev = synthetic_dir(tmp_path / "ck")
    fd = _hold(ev)
    try:
        with pytest.raises(CortexError, match=r"another process is writing evaluators \(train_evaluators.py\)"):
            run_script(f"{V}/train_evaluators.py", ["--root", tiny_root, "--checkpoint_dir", tmp_path / "ck",
                                                    "--archs", "resnet10", "--epochs", "1", "--device", "cpu"])
    finally:
        unlock(fd)
    out = tmp_path / "res"
    stats = ExperimentPaths(experiment="vqgan", root=tiny_root, results_dir=out).stats_dir(1)
    fd = _hold(stats)
    try:
        with pytest.raises(CortexError, match=r"another process is writing TIS statistics"):
            run_script(f"{V}/TIS_analysis.py", ["--root", tiny_root, "--results_dir", out, "--model", "1"])
    finally:
        unlock(fd)
    assert paths.data_dir.is_dir()


def test_refused_analysis_leaves_no_folder_and_says_run_tis_first(tiny_root, tmp_path):
    """TIS_analysis.py before any TIS: 'run TIS_computation.py first' (not --resume / --allow_partial), and
    no empty statistics folder is left behind."""
    out = tmp_path / "res"
    with pytest.raises(CortexError, match="TIS folder not found.*Run TIS_computation.py first") as e:
        run_script(f"{V}/TIS_analysis.py", ["--root", tiny_root, "--results_dir", out, "--model", "1"])
    assert "--allow_partial" not in str(e.value) and not out.exists()
    tis = out / "TIS" / "Net1" / "TIS_value_train"
    tis.mkdir(parents=True)  # e.g. made by a TIS run that failed before scoring anything
    with pytest.raises(CortexError, match="holds no TIS file.*Run TIS_computation.py first") as e:
        run_script(f"{V}/TIS_analysis.py", ["--root", tiny_root, "--results_dir", out, "--model", "1"])
    assert "--resume" not in str(e.value) and "--allow_partial" not in str(e.value)
    assert sorted(p.name for p in (out / "TIS" / "Net1").iterdir()) == ["TIS_value_train"]


def test_refused_tis_run_leaves_no_folder(trained, tmp_path):
    out = tmp_path / "res"
    with pytest.raises(CortexError):
        run_script(f"{V}/TIS_computation.py", ["--root", trained, "--results_dir", out, "--model", "2",
                                               "--data_type", "test", "--device", "cpu"])
    assert not (out / "TIS").exists()


# ----------------------------------------------------------------------------- input validation

def _edit_line(path, lineno, fn):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = fn(lines[lineno - 1])
    path.write_text("".join(lines))


def test_token_id_beyond_the_codebook_is_refused(tmp_path):
    """Token id 99999 in a 24-code dataset: refused (file:line) by the frequency baseline and by the token
    indices the statistics and the significance test read."""
    from cortex.data.formats import load_token_indices
    from cortex.data.list_csv import read_split_ids
    from tests.helpers import compact_dataset

    d = compact_dataset(tmp_path / "datasets", 3, 4, n_codes=24)
    csv_path = d / "train_embeddings.csv"
    # line 3: the first id becomes 99999 (still 256 ids)
    _edit_line(csv_path, 3, lambda l: l.split('"[', 1)[0] + '"[99999, ' + l.split('"[', 1)[1].split(", ", 1)[1])
    bad = r"train_embeddings\.csv:3: token id 99999 of image \S+ is not in the codebook \(it has 24"
    with pytest.raises(CortexError, match=bad):
        read_split_ids(d, "train")
    with pytest.raises(CortexError, match=r"train_embeddings\.csv:3: token id 99999"):
        run_script(f"{V}/generate_freq_based_tokens.py", ["--root", tmp_path])
    os.utime(csv_path)  # edited after the pickle: it is rebuilt from the CSV
    (d / "train_token_indices.pkl").touch()
    os.utime(d / "train_token_indices.pkl", (0, 0))
    with pytest.raises(CortexError, match=r"train_embeddings\.csv:3: token id 99999"):
        load_token_indices(d, "train")


@pytest.mark.parametrize("row, why", [("-1", "token id -1 is outside the codebook"),
                                      ("99999", "token id 99999 is outside the codebook"),
                                      ("short", "255 token ids, expected 256")])
def test_bad_neutral_row_is_refused_with_its_line(tmp_path, row, why):
    from cortex.analysis.bias import read_neutral_set

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 24, 256) for _ in range(40)]
    if row == "short":
        rows[6] = rows[6][:255]
    else:
        rows[6][17] = int(row)
    p = tmp_path / "results_none.csv"
    p.write_text("filename,indices\n" + "".join(f'n{i}.png,"[{", ".join(map(str, r))}]"\n' for i, r in enumerate(rows)))
    with pytest.raises(CortexError, match=rf"results_none\.csv:8: {why}"):
        read_neutral_set(p, 256, 24)
    if row != "-1":  # without the dataset's geometry only a negative id is known to be wrong
        read_neutral_set(p)
    else:
        with pytest.raises(CortexError, match=r"results_none\.csv:8"):
            read_neutral_set(p)


def test_token_num_beyond_a_cut_list(tmp_path, capsys):
    from cortex.analysis.ranking import MAX_ROWS
    from cortex.analysis.frequency import read_frequency_baseline
    from cortex.analysis.statistics_files import read_stats_section
    from tests.helpers import write_frequency_baseline, write_sectioned_stats

    cut = tmp_path / "stats" / "label_0.csv"
    write_sectioned_stats(cut, 10, [(t, 5, 3) for t in range(MAX_ROWS)])
    with pytest.raises(CortexError, match=rf"--token_num 500 asks for more tokens.*cut at --max_rows {MAX_ROWS}.*"
                                          rf"TIS_analysis.py --max_rows 500"):
        read_stats_section(cut, 20, 500)
    assert len(read_stats_section(cut, 20, 50)) == 50
    short = tmp_path / "stats2" / "label_0.csv"
    write_sectioned_stats(short, 10, [(t, 5, 3) for t in range(30)])
    assert read_stats_section(short, 20, 500) == list(range(30))
    assert "lists only 30 tokens" in capsys.readouterr().out
    freq = tmp_path / "freq" / "label_0.csv"
    write_frequency_baseline(freq, [(t, 9) for t in range(MAX_ROWS)])
    with pytest.raises(CortexError, match="generate_freq_based_tokens.py --max_rows 500"):
        read_frequency_baseline(freq, 500)


def test_concept_recovery_refuses_a_missing_section(tmp_path):
    from cortex.paths import ExperimentPaths
    from cortex.analysis.recovery import concept_recovery
    from tests.helpers import compact_dataset, write_sectioned_stats

    paths = ExperimentPaths(experiment="vqgan", root=tmp_path)
    compact_dataset(paths.data_dir, 2, 4)
    (paths.data_dir / "ground_truth.json").write_text(json.dumps({"concept_tokens": {"0": [1], "1": [2]}}))
    write_sectioned_stats(paths.stats_file(1, 0), 4, [(1, 4, 4)])
    write_sectioned_stats(paths.stats_file(1, 1), 4, [(2, 4, 4)], top_ns=(1, 5, 10))  # Top 20 cut off
    with pytest.raises(CortexError, match=r"label_1\.csv: no 'Top 20 Tokens' section"):
        concept_recovery(paths, models=[1], top_ns=(5, 20), attributions=["smoothgrad"])


# ----------------------------------------------------------------------------- messages that point the right way

def test_header_only_split_csv_is_named(tmp_path):
    from cortex.data.list_csv import split_label_counts

    (tmp_path / "train_embeddings.csv").write_text("filename,label,indices\n")
    with pytest.raises(CortexError, match=r"train_embeddings\.csv: no rows \(header only\).*regenerate") as e:
        split_label_counts(tmp_path, "train")
    assert "delete" not in str(e.value)


def test_short_first_tis_row_is_the_one_named(tmp_path):
    from cortex.attribution.store import read_tis_file
    from cortex.utils import format_list

    rows = [np.arange(255 if i == 0 else 256) / 7 for i in range(5)]
    p = tmp_path / "label_0.csv"
    body = "".join(f'img{i},0,"{format_list(r)}"\n' for i, r in enumerate(rows))
    p.write_text("filename,label,contribution\n" + body)
    with pytest.raises(CortexError, match=r"label_0\.csv:2 \(image img0\): 255 scores, expected 256"):
        read_tis_file(p)


def test_dangling_results_symlink_is_named(tmp_path, capsys):
    import argparse

    from cortex.cli import run_main

    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")

    def main(args):
        (link / "TIS" / "Net1").mkdir(parents=True, exist_ok=True)

    with pytest.raises(SystemExit) as e:
        run_main(main, lambda: argparse.ArgumentParser(), [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in err and "Traceback" not in err


def test_deleted_dataset_or_iem_is_not_another_one(tmp_path):
    """Statistics whose dataset (or IEM) was deleted since: 'not found', not 'another dataset / IEM'."""
    from cortex.paths import ExperimentPaths
    from cortex.analysis.significance import check_current_run
    from tests.helpers import compact_dataset
    from tests.test_significance import _fake_tis_run

    paths = ExperimentPaths(experiment="vqgan", root=tmp_path)
    compact_dataset(paths.data_dir, 2, 4)
    _fake_tis_run(tmp_path, paths.data_dir, paths.tis_dir(1, "train"), paths.best_ckpt(1),
                  lambda r, rng: rng.random(256))
    run_script(f"{V}/TIS_analysis.py", ["--root", tmp_path, "--model", "1", "--no_progress"])
    check_current_run(paths, 1, "smoothgrad")
    paths.best_ckpt(1).rename(tmp_path / "moved.pth")
    with pytest.raises(CortexError, match=r"IEM checkpoint not found: .*best_model\.pth") as e:
        check_current_run(paths, 1, "smoothgrad")
    assert "another IEM" not in str(e.value)
    (tmp_path / "moved.pth").rename(paths.best_ckpt(1))
    (paths.data_dir / "train_embeddings.csv").unlink()
    with pytest.raises(CortexError, match=r"dataset not found: .*train_embeddings\.csv") as e:
        check_current_run(paths, 1, "smoothgrad")
    assert "another dataset" not in str(e.value)
