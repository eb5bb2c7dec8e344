"""Multi-process training (Lightning DDP, gloo on CPU) and preemption (kill, then --resume).

Every run is a real ``train.py`` subprocess (DDP's launcher re-executes the script for rank 1), on the
tiny synthetic world of ``conftest.tiny_root``, width 16, 2-4 epochs.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cortex.iem.checkpoints import load_iem

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "VQGAN_explanation"
TRAIN = ["--model", "1", "--width", "16", "--batch_size", "4", "--accelerator", "cpu", "--lr", "3e-3"]
EPOCH_LINE = re.compile(r"Epoch \[(\d+)/(\d+)\], Training Loss: \d+\.\d{4}")
VAL_LINE = re.compile(r"Validation Loss: \d+\.\d{4}, Accuracy: \d+\.\d{2}%")
TIMEOUT = 300

# train.py with a NaN loss on rank 1's first training batch only (rank 0's loss stays finite).
NAN_WRAPPER = '''
import importlib.util, os, sys, types
import torch
import torch.nn.functional as F
import cortex.iem.training as T
calls = {"n": 0}
def cross_entropy(logits, y, *a, **k):
    loss = F.cross_entropy(logits, y, *a, **k)
    if torch.is_grad_enabled() and os.environ.get("LOCAL_RANK", "0") == "1":
        calls["n"] += 1
        if calls["n"] == 1:
            return loss * float("nan")
    return loss
T.F = types.SimpleNamespace(cross_entropy=cross_entropy)
spec = importlib.util.spec_from_file_location("train_script", sys.argv.pop(1))
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
sys.argv.insert(1, spec.origin)  # DDP re-executes [python, argv[0], *argv[1:]] for rank 1: keep the wrapper
if __name__ == "__main__":
    m.main(m.get_args_parser().parse_args(sys.argv[2:]))
'''


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in list(env):  # a pytest run inside a SLURM job must not make Lightning think it is a SLURM task
        if k.startswith("SLURM_"):
            del env[k]
    return env


def _cmd(data_dir, out: Path, *extra, script=None):
    prefix = [sys.executable] + ([str(script), str(EXP / "train.py")] if script else [str(EXP / "train.py")])
    return prefix + ["--data_dir", str(data_dir), "--checkpoint_dir", str(out / "checkpoints"),
                     "--log_dir", str(out / "logs"), *TRAIN, *[str(e) for e in extra]]


def _start(cmd, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / "stdout.txt", "w")
    return subprocess.Popen(cmd, cwd=EXP, env=_env(), stdout=f, stderr=subprocess.STDOUT), f


def _finish(proc, f, out: Path, timeout=TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    f.close()
    text = (out / "stdout.txt").read_text(errors="replace")
    assert proc.returncode == 0, f"train.py exited with {proc.returncode}:\n{text[-4000:]}"
    return text


def _run(cmd, out: Path) -> str:
    return _finish(*_start(cmd, out), out)


def _model_files(out: Path) -> list[str]:
    d = out / "checkpoints" / "ClassificationNet1"
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _log(out: Path) -> list[str]:
    logs = sorted((out / "logs").glob("training_log_*.txt"))
    assert len(logs) == 1, f"expected one training log, found {[p.name for p in logs]}"
    return logs[0].read_text().splitlines()


def _check_log(lines, epochs: int):
    assert len(lines) == 2 * epochs, lines
    for e in range(epochs):
        m = EPOCH_LINE.fullmatch(lines[2 * e])
        assert m and (int(m.group(1)), int(m.group(2))) == (e + 1, epochs), lines[2 * e]
        assert VAL_LINE.fullmatch(lines[2 * e + 1]), lines[2 * e + 1]


@pytest.fixture(scope="module")
def data_dir(tiny_root):
    return tiny_root / "datasets"


def test_ddp_two_processes_write_once(data_dir, tmp_path):
    """2 gloo processes: one log, one set of checkpoints, same files and formats as 1 process.

    The 2-process run also gets a NaN loss on rank 1's first batch (rank 0's loss is finite): both ranks must
    skip that batch (Lightning forbids ``return None`` under DDP, and a lone skip would hang the all-reduce).
    One run checks both, to keep the test time down (each DDP launch costs two interpreter start-ups)."""
    one, two = tmp_path / "one", tmp_path / "two"
    wrapper = tmp_path / "nan_train.py"
    wrapper.write_text(NAN_WRAPPER)
    p1 = _start(_cmd(data_dir, one, "--epochs", 2, "--devices", 1), one)
    p2 = _start(_cmd(data_dir, two, "--epochs", 2, "--devices", 2, "--strategy", "ddp", script=wrapper), two)
    _finish(*p1, one)
    text = _finish(*p2, two)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text and "distributed_backend=gloo" in text  # really 2 processes
    assert "skipping batch 0: loss is nan" in text  # rank 1
    assert "skipping batch 0: non-finite loss on another rank" in text  # rank 0 skipped it too

    assert _model_files(one) == _model_files(two) == [
        "best_model.pth", "config.json", "lightning/last.ckpt", "lightning/last.prev.ckpt", "lightning/metrics.csv",
        "loss_curves.png", "model.pth", "train_args.json", "writer.lock"]
    _check_log(_log(one), 2)
    _check_log(_log(two), 2)  # each epoch once: rank 1 wrote nothing
    printed = [l for l in text.splitlines() if EPOCH_LINE.fullmatch(l.strip())]
    assert len(printed) == 2, printed  # the epoch summary is printed by rank 0 only

    d1, d2 = (o / "checkpoints" / "ClassificationNet1" for o in (one, two))
    assert json.loads((d1 / "config.json").read_text()) == json.loads((d2 / "config.json").read_text())
    for name in ("model.pth", "best_model.pth"):
        s1, s2 = (torch.load(d / name, weights_only=True) for d in (d1, d2))
        assert {k: v.shape for k, v in s1.items()} == {k: v.shape for k, v in s2.items()}
        assert all(torch.isfinite(v).all() for v in s2.values() if v.is_floating_point())
    load_iem(d2 / "best_model.pth", "vqgan", 1)  # strict load of the DDP checkpoint (no "module." prefix)
    ck = torch.load(d2 / "lightning" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ck["epoch"] == 1 and ck["global_step"] > 0


def test_killed_run_resumes(data_dir, tmp_path):
    """SIGKILL a run after its first resumable checkpoint; the same command with --resume auto finishes the
    epochs, continuing the same log (the lines of any epoch redone are not duplicated)."""
    epochs = 6
    out = tmp_path / "kill"
    ckpt = out / "checkpoints" / "ClassificationNet1" / "lightning" / "last.ckpt"
    cmd = _cmd(data_dir, out, "--epochs", epochs, "--devices", 1, "--batch_size", 2, "--resume", "auto")
    proc, f = _start(cmd, out)
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < TIMEOUT:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    f.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: raise `epochs`"
    before = _log(out)
    done = len(before) // 2
    assert 1 <= done < epochs, before
    k = torch.load(ckpt, weights_only=False, map_location="cpu")["epoch"]  # last checkpointed epoch (0-based)
    (out / "stdout_killed.txt").write_text((out / "stdout.txt").read_text())

    text = _run(cmd, out)
    assert "--resume auto: resuming from" in text
    after = _log(out)
    _check_log(after, epochs)
    assert after[: 2 * (k + 1)] == before[: 2 * (k + 1)]  # the checkpointed epochs' lines kept as they were
    assert _model_files(out) == ["best_model.pth", "config.json", "lightning/last.ckpt", "lightning/last.prev.ckpt",
                                 "lightning/metrics.csv", "loss_curves.png", "model.pth", "train_args.json", "writer.lock"]
    assert torch.load(ckpt, weights_only=False, map_location="cpu")["epoch"] == epochs - 1


def test_trim_training_log(tmp_path):
    from cortex.iem.run_files import trim_training_log

    p = tmp_path / "training_log_20250101_0000.txt"
    p.write_text("Epoch [1/3], Training Loss: 1.0000\nValidation Loss: 1.0000, Accuracy: 10.00%\n"
                 "Epoch [2/3], Training Loss: 0.5000\nValidation Loss: 0.9000, Accuracy: 20.00%\nEpoch [3/3], Tra")
    trim_training_log(p, 2)
    assert p.read_text().count("\n") == 4 and p.read_text().endswith("20.00%\n")  # torn line dropped
    trim_training_log(p, 1)
    assert p.read_text().splitlines() == ["Epoch [1/3], Training Loss: 1.0000",
                                          "Validation Loss: 1.0000, Accuracy: 10.00%"]


def test_runs_started_in_the_same_minute_get_their_own_logs(data_dir, tmp_path):
    """Two trainings sharing a log folder (e.g. two SLURM jobs of different models starting together) must not
    write into one training_log_<minute>.txt: a fresh run claims a new file (O_EXCL), ``_2`` when taken."""
    from tests.helpers import run_script

    logs = tmp_path / "logs"
    logs.mkdir()
    t = time.time()
    others = {logs / f"training_log_{time.strftime('%Y%m%d_%H%M', time.localtime(t + d))}.txt" for d in (0, 60)}
    for p in others:
        p.write_text("another run's line\n")
    run_script("VQGAN_explanation/train.py", ["--data_dir", data_dir, "--checkpoint_dir", tmp_path / "ck",
                                              "--log_dir", logs, *TRAIN, "--epochs", "1", "--device", "cpu"])
    assert all(p.read_text() == "another run's line\n" for p in others)
    mine = sorted(set(logs.glob("training_log_*.txt")) - others)
    assert len(mine) == 1 and re.fullmatch(r"training_log_\d{8}_\d{4}_2\.txt", mine[0].name), mine
    _check_log(mine[0].read_text().splitlines(), 1)
