"""The slurm/ pipelines on a real one-node SLURM cluster equal a local run of the same scripts.

Run with ``make test-slurm`` (or ``pytest -q tests_slurm``), as root: ``scripts/slurm_test_cluster.sh`` installs
Debian's slurmctld/slurmd/slurm-client/munge if missing, starts a private cluster in a temp folder, and stops
the daemons it started (by pid) at the end. Where root or the packages are missing the tests SKIP with the
reason; they never pass without running. Kept out of ``make test`` (this folder is not under tests/).

The world is tiny (3 classes, a few images, IEM width 16, 2 epochs, 2 SmoothGrad draws): each job is mostly
Python start-up. TIS runs as a 3-task job array and must give exactly the files of one unsharded local run.
"""
from __future__ import annotations

import filecmp
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "slurm_test_cluster.sh"
SKIP = 77
WAIT_S = 900
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT"}
# the templates ask for GPUs and tens of GB; the test node has neither
SBATCH_ARGS = "--gres=none --mem=800M --cpus-per-task=1 --time=00:20:00"

VQGAN_GEN = ("--num_classes 3 --train_per_class 4 --val_per_class 2 --test_per_class 2 --n_codes 64 "
             "--concept_tokens 4 --n_background 16 --n_distractors 4 --object_size 3 4 --patch_size 2")
DALLE_GEN = ("--train_per_class 4 --val_per_class 2 --test_per_class 2 --neutral_images 6 --n_codes 64 "
             "--attribute_tokens 3 --doctor_tokens 4 --n_background 16 --n_distractors 4 --patch_size 2")
TRAIN = "--width 16 --epochs 2 --batch_size 4"
EVAL_ENV = dict(EVALUATOR_ARGS="--archs resnet10 --epochs 1", EVAL_IMAGE_ARGS="--num_tokens 5 --no_figures",
                EVAL_CONCEPT_ARGS="--top_n 5 --token_num 5 --no_figures",
                EVAL_CODEBOOK_ARGS="--steps 4 --eval_every 2 --pairs 0:1 --images_per_label 1 --no_figures")
TIS = "--nsamples 2 --batch_size 4 --no_progress"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- the cluster

@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("SLURM test: needs Linux (Debian's slurm packages)")
    if os.geteuid() != 0:
        pytest.skip("SLURM test: needs root (it installs slurm/munge and runs slurmd + munged as root); "
                    "run `make test-slurm` as root")
    r = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True)
    if r.returncode == SKIP:
        pytest.skip(f"SLURM test: {r.stderr.strip()}")
    assert r.returncode == 0, f"installing SLURM failed:\n{r.stdout}\n{r.stderr}"
    d = Path(tempfile.mkdtemp(prefix="cortex-slurm-"))  # short path: the munge socket must fit in 108 bytes
    r = subprocess.run(["bash", str(CLUSTER), "start", str(d)], capture_output=True, text=True)
    if r.returncode == SKIP:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"SLURM test: {r.stderr.strip()}")
    try:
        assert r.returncode == 0, f"starting the test cluster failed:\n{r.stdout}\n{r.stderr}\n{_tail_logs(d / 'log')}"
        yield {"SLURM_CONF": str(d / "slurm.conf"), "dir": d}
    finally:
        s = subprocess.run(["bash", str(CLUSTER), "stop", str(d)], capture_output=True, text=True)
        print(s.stdout, s.stderr)
        if s.returncode == 0:
            shutil.rmtree(d, ignore_errors=True)


def _tail_logs(folder: Path, n: int = 30) -> str:
    out = []
    for p in sorted(Path(folder).glob("*")):
        if p.is_file():
            lines = p.read_text(errors="replace").splitlines()
            out.append(f"--- {p.name} (last {n} lines)\n" + "\n".join(lines[-n:]))
    return "\n".join(out)


def _submit(cluster, driver: str, exp: str, root: Path, args: list[str], env: dict) -> dict[str, str]:
    r = subprocess.run(["bash", str(REPO / "slurm" / driver), "--root", str(root), *args], cwd=REPO / exp,
                       env=_clean_env(SLURM_CONF=cluster["SLURM_CONF"], SBATCH_ARGS=SBATCH_ARGS, **env),
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{driver} failed:\n{r.stdout}\n{r.stderr}"
    jobs = dict(line.split() for line in r.stdout.splitlines() if line.strip())
    assert jobs, r.stdout + r.stderr
    return jobs


def _job_states(cluster, ids) -> dict[str, tuple[str, str]]:
    """JobId -> (state, name) for every job and array task of ``ids`` (scontrol shows one job or all)."""
    r = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True,
                       env=_clean_env(SLURM_CONF=cluster["SLURM_CONF"]))
    assert r.returncode == 0, r.stderr
    want, out = set(ids), {}
    for line in r.stdout.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if f.get("JobId") in want or f.get("ArrayJobId") in want:
            out[f["JobId"]] = (f.get("JobState", "?"), f.get("JobName", "?"))
    return out


def _wait(cluster, jobs: dict[str, str], root: Path) -> dict[str, tuple[str, str]]:
    ids = sorted(set(jobs.values()), key=int)
    t0 = time.time()
    while True:
        states = _job_states(cluster, ids)
        if states and all(s in TERMINAL for s, _ in states.values()):
            break
        if time.time() - t0 > WAIT_S:
            pytest.fail(f"SLURM jobs not done after {WAIT_S}s: {states}\n{_tail_logs(root / 'logs')}")
        time.sleep(2)
    bad = {j: s for j, s in states.items() if s[0] != "COMPLETED"}
    assert not bad, f"jobs that did not complete: {bad}\n{_tail_logs(root / 'logs', 60)}"
    return states


def _local(exp: str, root: Path, steps: list[list[str]]) -> None:
    """The README's commands, one after the other, in the experiment folder."""
    env = _clean_env()
    for argv in steps:
        cwd = REPO / exp / ("eval" if argv[0].startswith("eval/") else "")
        script = Path(argv[0]).name
        r = subprocess.run([sys.executable, script, "--root", str(root), *argv[1:]], cwd=cwd, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, f"local {argv}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


# ----------------------------------------------------------------------------- comparing two roots

IGNORED = re.compile(r"(^|/)([^/]*args[^/]*\.json)$")  # run records: paths, argv, shard numbers


def _files(root: Path, sub: str) -> set[str]:
    base = root / sub
    return {str(p.relative_to(root)) for p in base.rglob("*") if p.is_file() and not IGNORED.search(str(p))}


def _same(a: Path, b: Path) -> bool:
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix in (".pth", ".ckpt", ".pt"):
        x, y = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
        if a.suffix == ".ckpt":
            x, y = x["state_dict"], y["state_dict"]
        return _same_obj(x, y)
    if a.suffix == ".pkl":
        return pickle.loads(a.read_bytes()) == pickle.loads(b.read_bytes())
    if a.suffix == ".npy":
        return np.array_equal(np.load(a), np.load(b))
    if a.suffix == ".png" and "results" in a.parts:
        return True  # figures: present in both (matplotlib output is not byte-stable across runs)
    return False


def _same_obj(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_obj(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same_obj(u, v) for u, v in zip(x, y))
    if hasattr(x, "state_dict"):
        return _same_obj(x.state_dict(), y.state_dict())
    return x == y


def _compare(local: Path, slurm: Path, subs=("datasets", "checkpoints", "results")) -> int:
    n = 0
    for sub in subs:
        fl, fs = _files(local, sub), _files(slurm, sub)
        assert fl == fs, f"{sub}/: only local {sorted(fl - fs)[:10]}, only SLURM {sorted(fs - fl)[:10]}"
        diff = [f for f in sorted(fl) if not _same(local / f, slurm / f)]
        assert not diff, f"files differing between the local and the SLURM run: {diff[:20]}"
        n += len(fl)
    # the training logs: same lines (their names carry the start time)
    logs = lambda r: [p.read_text() for p in sorted((r / "logs").rglob("training_log_*.txt"))]  # noqa: E731
    assert logs(local) == logs(slurm) and logs(local), "training logs differ"
    return n


def _tis_labels_per_task(root: Path, pattern: str) -> list[int]:
    """Labels each TIS array task scored, from its job log (no label may be scored by two tasks)."""
    counts = []
    for p in sorted((root / "logs").glob(pattern)):
        m = re.search(r"TIS \(\w+, \w+\) of (\d+) labels", p.read_text(errors="replace"))
        assert m, f"{p.name}: no TIS summary line"
        counts.append(int(m.group(1)))
    return counts


# ----------------------------------------------------------------------------- the tests

def test_vqgan_pipeline_on_slurm_equals_local(cluster, tmp_path):
    slurm_root, local_root = tmp_path / "slurm", tmp_path / "local"
    core = "generate,freq,train,test,tis_train,tis_test,analysis"
    # the evaluation steps run on SLURM too (their templates cd into eval/), checked for completion and outputs
    # only: comparing them with a local run would double the test time
    evals = "evaluators,eval_image,eval_concept,eval_codebook"
    t0 = time.time()
    jobs = _submit(cluster, "submit_vqgan_pipeline.sh", "VQGAN_explanation", slurm_root,
                   ["--shards", "3", "--models", "1", "--steps", f"{core},{evals}"],
                   dict(GEN_ARGS=VQGAN_GEN, TRAIN_ARGS=TRAIN, TIS_ARGS=TIS, **EVAL_ENV))
    assert set(jobs) == {"generate", "freq", "train_m1", "test_m1", "tis_train_m1", "tis_test_m1", "analysis_m1",
                         "evaluators", "eval_image_m1", "eval_concept_m1", "eval_codebook_m1"}
    # meanwhile, the same steps locally (unsharded TIS)
    _local("VQGAN_explanation", local_root, [
        ["generate_dataset.py", *VQGAN_GEN.split()],
        ["generate_freq_based_tokens.py"],
        ["train.py", "--model", "1", *TRAIN.split()],
        ["test.py", "--model", "1"],
        ["TIS_computation.py", "--model", "1", "--data_type", "train", *TIS.split()],
        ["TIS_computation.py", "--model", "1", "--data_type", "test", *TIS.split()],
        ["TIS_analysis.py", "--model", "1"],
    ])
    t_local = time.time() - t0
    states = _wait(cluster, jobs, slurm_root)
    print(f"\nSLURM pipeline: {len(states)} jobs/tasks in {time.time() - t0:.0f}s (local run {t_local:.0f}s)")

    # 3-task arrays, each task scoring its own labels, together all 3 labels once
    tasks = [name for _, name in states.values() if name.startswith("cortex-vqgan-tis-train")]
    assert len(tasks) == 3
    for split in ("train", "test"):
        per_task = _tis_labels_per_task(slurm_root, f"slurm-cortex-vqgan-tis-{split}-m1-*.out")
        assert sorted(per_task) == [1, 1, 1], per_task
        shard_args = sorted(p.name for p in (slurm_root / "results/TIS/Net1" / f"TIS_value_{split}").glob("args*"))
        assert shard_args == [f"args_shard{i}of3.json" for i in range(3)]
    # the job logs are where the templates say
    assert len(list((slurm_root / "logs").glob("slurm-cortex-vqgan-*.out"))) == len(states)
    assert "--resume auto" in (next((slurm_root / "logs").glob("slurm-cortex-vqgan-train-m1-*.out"))).read_text()

    expl = slurm_root / "results" / "Explanation" / "model_1"
    for name in ("sample_image_level_results.csv", "sample_concept_level_results_top5_token5.csv",
                 "codebook_level_results_token_4_0.01.csv"):
        assert (expl / name).exists(), name
    shutil.rmtree(expl)  # the local run has no evaluation steps
    shutil.rmtree(slurm_root / "checkpoints" / "evaluators")
    n = _compare(local_root, slurm_root)
    assert n > 50
    for k in range(3):
        assert (slurm_root / "results/TIS/Net1/TIS_statistics_train" / f"label_{k}.csv").exists()


def test_dalle_pipeline_on_slurm_equals_local(cluster, tmp_path):
    slurm_root, local_root = tmp_path / "slurm", tmp_path / "local"
    b = "doctor_gender"
    t0 = time.time()
    jobs = _submit(cluster, "submit_dalle_pipeline.sh", "Dalle_explanation", slurm_root,
                   ["--bias_types", b, "--shards", "2", "--models", "1"],
                   dict(GEN_ARGS=DALLE_GEN, TRAIN_ARGS=TRAIN, TIS_ARGS=TIS, BIAS_ARGS="--top_n 5 --token_num 3"))
    assert set(jobs) == {"generate", f"train_{b}_m1", f"test_{b}_m1", f"tis_{b}_m1", f"analysis_{b}_m1",
                         f"bias_{b}_m1"}
    _local("Dalle_explanation", local_root, [
        ["generate_dataset.py", *DALLE_GEN.split()],
        ["train.py", "--model", "1", "--bias_type", b, *TRAIN.split()],
        ["test.py", "--model", "1", "--bias_type", b],
        ["TIS_computation.py", "--model", "1", "--bias_type", b, *TIS.split()],
        ["TIS_analysis.py", "--model", "1", "--bias_type", b],
        ["bias_detection.py", "--model", "1", "--bias_type", b, "--top_n", "5", "--token_num", "3"],
    ])
    states = _wait(cluster, jobs, slurm_root)
    print(f"\nSLURM Dalle pipeline: {len(states)} jobs/tasks in {time.time() - t0:.0f}s")
    assert sorted(_tis_labels_per_task(slurm_root, f"slurm-cortex-dalle-tis-{b}-m1-*.out")) == [1, 1]
    n = _compare(local_root, slurm_root)
    assert n > 20
    assert list((slurm_root / "results" / b / "Bias_detection").glob("token_bias_top5_num3_cliff.csv"))


def test_train_job_requeues_itself_and_resumes(cluster, tmp_path):
    """train.sbatch near its time limit (the USR1 that `#SBATCH --signal=B:USR1@300` sends, delivered now by
    scancel) requeues itself; the rerun of the same command resumes from lightning/last.ckpt, and the job
    ends COMPLETED with one continuous training log."""
    root, epochs = tmp_path / "rq", 12
    _local("VQGAN_explanation", root, [["generate_dataset.py", *VQGAN_GEN.split()]])
    (root / "logs").mkdir()
    env = _clean_env(SLURM_CONF=cluster["SLURM_CONF"], CORTEX_ROOT=str(root))
    r = subprocess.run(["sbatch", "--parsable", *SBATCH_ARGS.split(), f"--output={root}/logs/slurm-%x-%j.out",
                        str(REPO / "slurm/vqgan/train.sbatch"), "--model", "1", *TRAIN.split(),
                        "--epochs", str(epochs), "--batch_size", "2"],
                       cwd=REPO / "VQGAN_explanation", env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    ckpt = root / "checkpoints/ClassificationNet1/lightning/last.ckpt"
    t0 = time.time()
    while not ckpt.exists():
        assert time.time() - t0 < WAIT_S, f"no checkpoint after {WAIT_S}s\n{_tail_logs(root / 'logs')}"
        time.sleep(0.1)
    s = subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, capture_output=True, text=True)
    assert s.returncode == 0, s.stderr
    _wait(cluster, {"train": job}, root)
    info = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    assert re.search(r"Restarts=[1-9]", info), f"the job was not requeued (it finished first?): {info}"
    out = next((root / "logs").glob("slurm-cortex-vqgan-train-*.out")).read_text(errors="replace")
    assert "time limit near: requeueing job" in out and "--resume auto: resuming from" in out, out[-3000:]
    logs = list((root / "logs").glob("training_log_*.txt"))
    assert len(logs) == 1
    lines = logs[0].read_text().splitlines()
    assert [l.split(",")[0] for l in lines[::2]] == [f"Epoch [{e}/{epochs}]" for e in range(1, epochs + 1)]
