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

from cortex.models import UNFINISHED_MARKER
from cortex.utils import CortexError, atomic_torch_save, try_lock, unlock
from tests.helpers import run_script

V = "VQGAN_explanation"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model", "1", "--width", "8", "--batch_size", "8", "--device", "cpu"]


def _compact_copy(tiny_root, dst):
    shutil.copytree(tiny_root / "datasets", dst / "datasets", ignore=shutil.ignore_patterns("images", "train", "val", "test"))
    return dst


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
    with pytest.raises(CortexError, match=r"codebook\.npy: 1 of \d+ codebook entries hold NaN or Inf \(first: token id 5\)"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", "--overwrite", *TRAIN])
    assert (d / "best_model.pth").read_bytes() == before and not (d / UNFINISHED_MARKER).exists()


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
    _wait_for(lambda: any(f.stat().st_size > 100 for f in tis.glob("label_*.csv.partial")) if tis.exists() else False, p)
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
