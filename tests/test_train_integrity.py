"""Run integrity of training and dataset generation (issue 12), faithfulness (13), training curves (14).

Tiny everything: a 3-class synthetic world of 39 images, IEM width 8, one or two epochs.
"""
import csv
import errno
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from cortex.data.formats import EmbeddingDataset, load_token_indices, read_split
from cortex.data.writer import DatasetWriter
from cortex.utils import CortexError
from tests.conftest import TINY_WORLD
from tests.helpers import run_script

V = "VQGAN_explanation"
D = "Dalle_explanation"
_REAL_ADD = DatasetWriter.add
TRAIN = ["--model", "1", "--width", "8", "--batch_size", "8", "--device", "cpu"]


def _compact_copy(tiny_root, dst):
    """An experiment folder holding only the compact layout of the session's tiny world (fast to copy)."""
    shutil.copytree(tiny_root / "datasets", dst / "datasets", ignore=shutil.ignore_patterns("images", "train", "val", "test"))
    return dst


def _log_epochs(root):
    logs = sorted((root / "logs").glob("training_log_*.txt"))
    assert len(logs) == 1, logs
    return [l.split(",")[0] for l in logs[0].read_text().splitlines() if l.startswith("Epoch")]


@pytest.fixture(scope="module")
def trained2(tiny_root, tmp_path_factory):
    """ClassificationNet1 trained for 2 epochs: lightning/last.ckpt (epoch 2) + last.prev.ckpt (epoch 1)."""
    root = _compact_copy(tiny_root, tmp_path_factory.mktemp("t2"))
    out = run_script(f"{V}/train.py", ["--root", root, "--epochs", "2", *TRAIN])
    return root, out


# ----------------------------------------------------------------------------- 12.2 crash-safe checkpoints

def test_checkpoint_files_and_curves(trained2):
    """Every run keeps last.ckpt + last.prev.ckpt, Lightning's metrics.csv and loss_curves.png (14.6)."""
    root, out = trained2
    d = root / "checkpoints" / "ClassificationNet1"
    last, prev = torch.load(d / "lightning" / "last.ckpt", weights_only=False), \
        torch.load(d / "lightning" / "last.prev.ckpt", weights_only=False)
    assert (last["epoch"], prev["epoch"]) == (1, 0)
    assert not list((d / "lightning").glob(".*tmp"))  # no temp file left behind
    assert out["curves"] == d / "loss_curves.png" and out["metrics"] == d / "lightning" / "metrics.csv"
    png = (d / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    rows = list(csv.DictReader(open(d / "lightning" / "metrics.csv")))
    assert {"epoch", "train_loss", "val_loss", "val_acc"} <= set(rows[0])
    assert sorted({int(r["epoch"]) for r in rows if r["val_loss"]}) == [0, 1]
    assert sorted({int(r["epoch"]) for r in rows if r["train_loss"]}) == [0, 1]
    # the authors' text log is unchanged: exactly two lines per epoch
    log = out["log"].read_text().splitlines()
    assert len(log) == 4 and re.fullmatch(r"Epoch \[2/2\], Training Loss: \d+\.\d{4}", log[2])


def test_plot_loss_curves_reads_the_authors_log(tmp_path):
    from cortex.iem.run_files import plot_loss_curves, read_training_log

    log = tmp_path / "training_log_20250101_1200.txt"
    log.write_text("Epoch [1/3], Training Loss: 2.0000\nValidation Loss: 1.5000, Accuracy: 40.00%\n"
                   "Epoch [2/3], Training Loss: 1.0000\nValidation Loss: 1.2500, Accuracy: 60.00%\n")
    h = read_training_log(log)
    assert h == {"epoch": [1, 2], "train_loss": [2.0, 1.0], "val_loss": [1.5, 1.25], "val_acc": [40.0, 60.0]}
    out = plot_loss_curves(log, tmp_path / "x" / "loss_curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_failed_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    """A save that dies mid-way (disk full) leaves the previous checkpoint intact and no temp file."""
    from cortex.iem.run_files import atomic_checkpoint_save, checkpoint_problem

    path = tmp_path / "lightning" / "last.ckpt"
    atomic_checkpoint_save({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        atomic_checkpoint_save({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and checkpoint_problem(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp, no rotated copy


def test_disk_full_during_training_then_resume(trained2, tmp_path, monkeypatch):
    """Through Lightning: the epoch-3 save fails with ENOSPC; last.ckpt stays the epoch-2 one and resumes."""
    root = tmp_path / "r"
    shutil.copytree(trained2[0], root)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if "last.ckpt" in str(getattr(f, "name", f)):
            f.write(b"PK\x03\x04 truncated")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "3", "--resume", "auto", *TRAIN])
    monkeypatch.setattr(torch, "save", real_save)
    ck = root / "checkpoints" / "ClassificationNet1" / "lightning"
    assert torch.load(ck / "last.ckpt", weights_only=False)["epoch"] == 1  # still the epoch-2 checkpoint
    run_script(f"{V}/train.py", ["--root", root, "--epochs", "3", "--resume", "auto", *TRAIN])
    assert torch.load(ck / "last.ckpt", weights_only=False)["epoch"] == 2
    assert _log_epochs(root) == ["Epoch [1/2]", "Epoch [2/2]", "Epoch [3/3]"]


def test_truncated_last_ckpt_resumes_from_previous(trained2, tmp_path, capsys):
    root = tmp_path / "r"
    shutil.copytree(trained2[0], root)
    ck = root / "checkpoints" / "ClassificationNet1" / "lightning" / "last.ckpt"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])  # disk full while Lightning wrote it (the old, non-atomic writer)
    run_script(f"{V}/train.py", ["--root", root, "--epochs", "3", "--resume", "auto", *TRAIN])
    out = capsys.readouterr().out
    assert "last.ckpt cannot be loaded" in out and "resuming from the previous checkpoint" in out
    # resumed after epoch 1 (the previous checkpoint): epoch 2's old lines dropped, epochs 2 and 3 trained anew
    assert _log_epochs(root) == ["Epoch [1/2]", "Epoch [2/3]", "Epoch [3/3]"]
    rows = list(csv.DictReader(open(ck.parent / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows if r["val_loss"]] == [0, 1, 2]  # metrics.csv trimmed alike


def test_only_corrupt_checkpoints_is_a_clear_error(trained2, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(trained2[0], root)
    ck = root / "checkpoints" / "ClassificationNet1" / "lightning"
    for name in ("last.ckpt", "last.prev.ckpt"):
        (ck / name).write_bytes(b"garbage")
    with pytest.raises(CortexError, match="no loadable checkpoint.*--overwrite"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "3", "--resume", *TRAIN])


# ----------------------------------------------------------------------------- 12.10 overwrite / resume settings

def test_retraining_needs_overwrite(trained2, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(trained2[0], root)
    d = root / "checkpoints" / "ClassificationNet1"
    best = (d / "best_model.pth").read_bytes()
    with pytest.raises(CortexError, match="already holds a trained ClassificationNet1.*--overwrite"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", *TRAIN])
    with pytest.raises(CortexError, match="already holds a trained ClassificationNet1"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", *TRAIN[:2], "--width", "16", *TRAIN[4:]])
    assert (d / "best_model.pth").read_bytes() == best  # untouched
    with pytest.raises(CortexError, match="contradict"):
        run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", "--resume", "auto", "--overwrite", *TRAIN])
    run_script(f"{V}/train.py", ["--root", root, "--epochs", "1", "--overwrite", *TRAIN[:2], "--width", "16",
                                 *TRAIN[4:]])
    assert json.loads((d / "config.json").read_text())["width"] == 16
    assert torch.load(d / "lightning" / "last.ckpt", weights_only=False)["epoch"] == 0  # a fresh run
    assert not (d / "lightning" / "last.prev.ckpt").exists()


def test_resume_with_other_settings_is_refused(trained2, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(trained2[0], root)
    args = ["--root", root, "--epochs", "3", "--resume", "auto", *TRAIN]
    with pytest.raises(CortexError, match=r"--lr 0\.001 -> 0\.01.*--batch_size 8 -> 4"):
        run_script(f"{V}/train.py", [*args, "--lr", "0.01", "--batch_size", "4"])
    recorded = json.loads((root / "checkpoints" / "ClassificationNet1" / "train_args.json").read_text())
    assert recorded["lr"] == 0.001 and recorded["batch_size"] == 8  # the record still tells the truth


# ----------------------------------------------------------------------------- 12.3 generation over a dataset

def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _kill_after(monkeypatch, n):
    """DatasetWriter.add raises KeyboardInterrupt (a kill) after n images; returns the call counter."""
    calls = {"n": 0}

    def add(self, *a, **k):
        calls["n"] += 1
        if n is not None and calls["n"] > n:
            raise KeyboardInterrupt
        return _REAL_ADD(self, *a, **k)

    monkeypatch.setattr(DatasetWriter, "add", add)
    return calls


def test_killed_generation_keeps_the_old_dataset_and_resumes(tmp_path, monkeypatch):
    world = [*TINY_WORLD, "--layout", "files"]
    old_root, ref_root = tmp_path / "a", tmp_path / "ref"
    run_script(f"{V}/generate_dataset.py", ["--root", old_root, *world])
    d = old_root / "datasets"
    old = _snapshot(d)
    _kill_after(monkeypatch, 5)
    with pytest.raises(CortexError, match=r"other settings \(--seed 0 -> 1\).*--overwrite"):  # issue 21
        run_script(f"{V}/generate_dataset.py", ["--root", old_root, *world, "--seed", "1"])
    with pytest.raises(KeyboardInterrupt):
        run_script(f"{V}/generate_dataset.py", ["--root", old_root, *world, "--seed", "1", "--overwrite"])
    assert _snapshot(d) == old  # old CSVs with old .npy / PNGs: nothing of the new run in datasets/
    assert (old_root / "datasets.generating").is_dir()
    calls = _kill_after(monkeypatch, None)
    run_script(f"{V}/generate_dataset.py", ["--root", old_root, *world, "--seed", "1", "--overwrite"])
    assert calls["n"] == 39 - 5  # resumed: the 5 images written before the kill are not redone
    assert not (old_root / "datasets.generating").exists() and not (old_root / "datasets.replaced").exists()
    run_script(f"{V}/generate_dataset.py", ["--root", ref_root, *world, "--seed", "1"])
    new, ref = _snapshot(d), _snapshot(ref_root / "datasets")
    skip = {"args.json"}  # records the run's own argv / paths
    assert {k: v for k, v in new.items() if k not in skip} == {k: v for k, v in ref.items() if k not in skip}


def test_generation_refuses_a_foreign_dataset(tiny_root, tmp_path):
    root = _compact_copy(tiny_root, tmp_path)
    (root / "datasets" / "generation_args.json").unlink()  # e.g. the authors' download or a merge
    with pytest.raises(CortexError, match="did not make.*--overwrite"):
        run_script(f"{V}/generate_dataset.py", ["--root", root, *TINY_WORLD, "--seed", "2"])


DGEN = ["--train_per_class", 8, "--val_per_class", 2, "--test_per_class", 3, "--neutral_images", 8,
        "--n_codes", 160, "--attribute_tokens", 6, "--doctor_tokens", 8, "--n_background", 24,
        "--n_distractors", 8, "--layout", "compact", "--no_images"]


@pytest.fixture(scope="module")
def dalle_root(tmp_path_factory):
    r = tmp_path_factory.mktemp("dalle_int")
    run_script(f"{D}/generate_dataset.py", ["--root", r, "--bias_type", "all", *DGEN])
    return r


def test_dalle_killed_overwrite_keeps_the_old_dataset(dalle_root, tmp_path, monkeypatch):
    root = tmp_path / "r"
    shutil.copytree(dalle_root, root)
    d = root / "datasets" / "doctor_gender" / "embeddings"
    old = _snapshot(d)
    _kill_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_script(f"{D}/generate_dataset.py", ["--root", root, "--bias_type", "doctor_gender", *DGEN, "--seed", 5,
                                                "--overwrite"])
    assert _snapshot(d) == old
    calls = _kill_after(monkeypatch, None)
    run_script(f"{D}/generate_dataset.py", ["--root", root, "--bias_type", "doctor_gender", *DGEN, "--seed", 5,
                                            "--overwrite"])  # the same command again
    assert calls["n"] == 26 - 3  # the same settings resume the staged dataset
    assert json.loads((d / "generation_args.json").read_text())["complete"] is True
    assert _snapshot(d) != old and not d.with_name("embeddings.generating").exists()


# ----------------------------------------------------------------------------- 13.12 / 14.4 DALL-E training

def test_dalle_logs_and_batch_cap(dalle_root, tmp_path, capsys):
    root = tmp_path / "r"
    shutil.copytree(dalle_root, root)
    for bt in ("doctor_gender", "doctor_color"):  # two bias types in the same minute
        run_script(f"{D}/train.py", ["--root", root, "--model", 1, "--bias_type", bt, "--width", 8, "--epochs", 1,
                                     "--device", "cpu"])  # the paper's batch 256 on 16 training images
    out = capsys.readouterr().out
    assert "--batch_size 256 is more than a tenth of the 16 training images; using 2" in out
    logs = sorted(p.name for p in (root / "logs").iterdir())
    assert len(logs) == 2 and all(re.fullmatch(r"training_log_\d{8}_\d{4}(_2)?\.txt", n) for n in logs)
    assert not (root / "logs" / "doctor_gender").exists()
    rec = json.loads((root / "checkpoints" / "doctor_gender" / "ClassificationNet1" / "train_args.json").read_text())
    assert rec["batch_size"] == 2
    assert (root / "checkpoints" / "doctor_color" / "ClassificationNet1" / "loss_curves.png").exists()


def test_batch_cap_rule():
    from cortex.iem.run_files import capped_batch_size

    assert capped_batch_size(256, 600, "dalle") == 60
    assert capped_batch_size(32, 600, "dalle") == 32
    assert capped_batch_size(512, 600, "vqgan") == 512  # VQGAN batches are left alone


# ----------------------------------------------------------------------------- 12.7 .npy files

@pytest.mark.parametrize("dtype", [np.int64, np.float16])
def test_npy_of_another_dtype_is_refused(tiny_root, tmp_path, dtype):
    shutil.copytree(tiny_root / "datasets", tmp_path / "d", ignore=shutil.ignore_patterns("images"))
    d = tmp_path / "d"
    rec = read_split(d, "train")[0]
    f = d / "train" / rec.filename
    np.save(f, np.load(f).astype(dtype))
    with pytest.raises(CortexError, match=rf"{re.escape(str(f))}: embedding has dtype {np.dtype(dtype)}, expected float32"):
        EmbeddingDataset(d, "train", layout="files")[0]
    (d / "codebook.npy").unlink()
    with pytest.raises(CortexError, match=re.escape(str(f))):
        run_script(f"{V}/compact_dataset.py", ["--data_dir", d, "--no_progress"])


def test_truncated_npy_names_the_file(tiny_root, tmp_path):
    shutil.copytree(tiny_root / "datasets", tmp_path / "d", ignore=shutil.ignore_patterns("images"))
    d = tmp_path / "d"
    f = d / "train" / read_split(d, "train")[0].filename
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CortexError, match=rf"{re.escape(str(f))}: cannot read .*truncated"):
        EmbeddingDataset(d, "train", layout="files")[0]
    np.save(f, np.zeros((256, 8, 8), np.float32))
    with pytest.raises(CortexError, match="must have shape"):
        EmbeddingDataset(d, "train", layout="files")[0]


# ----------------------------------------------------------------------------- 12.9 compact / pickle / BOM

def _set_id(d, split, row, value):
    p = d / f"{split}_embeddings.csv"
    rows = list(csv.reader(open(p, newline="")))
    ids = rows[row][2][1:-1].split(", ")
    ids[0] = str(value)
    rows[row][2] = "[" + ", ".join(ids) + "]"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return rows[row][0]


def test_compact_validates_ids(tiny_root, tmp_path):
    shutil.copytree(tiny_root / "datasets", tmp_path / "d", ignore=shutil.ignore_patterns("images"))
    d = tmp_path / "d"
    (d / "codebook.npy").unlink()
    name = _set_id(d, "test", 2, 70)  # dataset_info.json says 64 codes
    with pytest.raises(CortexError, match=rf"test_embeddings.csv:\d+: token id 70 of image {name} .*dataset_info.json"):
        run_script(f"{V}/compact_dataset.py", ["--data_dir", d, "--no_progress"])
    info = json.loads((d / "dataset_info.json").read_text())
    del info["n_codes"]
    (d / "dataset_info.json").write_text(json.dumps(info))
    _set_id(d, "test", 2, 99999)  # nothing says how many codes: no 100,000-code codebook
    with pytest.raises(CortexError, match=rf"row {name}: token id 99999 would make a 100000-code codebook.*--n_codes"):
        run_script(f"{V}/compact_dataset.py", ["--data_dir", d, "--no_progress"])
    assert not (d / "codebook.npy").exists()


def test_stale_token_pickle_is_rebuilt(tiny_root, tmp_path):
    shutil.copytree(tiny_root / "datasets", tmp_path / "d", ignore=shutil.ignore_patterns("images", "train", "val", "test"))
    d = tmp_path / "d"
    first = read_split(d, "train")[0].filename
    assert load_token_indices(d, "train")[first][0] != 63
    name = _set_id(d, "train", 1, 63)
    assert name == first
    os.utime(d / "train_embeddings.csv", ns=(0, (d / "train_token_indices.pkl").stat().st_mtime_ns + 10**9))
    assert load_token_indices(d, "train")[first][0] == 63  # the newer CSV wins
    with open(d / "train_token_indices.pkl", "rb") as f:
        assert pickle.load(f)[first][0] == 63  # and the pickle was rebuilt (the authors' format)


def test_csv_with_bom_header(tiny_root, tmp_path):
    shutil.copytree(tiny_root / "datasets", tmp_path / "d", ignore=shutil.ignore_patterns("images", "train", "val", "test"))
    p = tmp_path / "d" / "test_embeddings.csv"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert len(read_split(tmp_path / "d", "test")) == 9


# ----------------------------------------------------------------------------- 13.11 dropout as the authors

def test_dropout_probabilities_as_the_authors():
    from cortex.iem.registry import build_model

    vit = build_model("vqgan", 4, 3, width=16, depth=2)
    ps = [m.p for m in vit.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and set(ps) == {0.2}
    assert all(m.dropout == 0.2 for m in vit.modules() if isinstance(m, torch.nn.MultiheadAttention))
    layer = vit.encoder[0]
    assert [type(m).__name__ for m in layer.mlp] == ["Linear", "GELU", "Dropout", "Linear", "Dropout"]

    post = build_model("dalle", 3, 2, width=16, depth=2)
    layer = post.encoder[0]
    assert [type(m).__name__ for m in layer.mlp] == ["Linear", "GELU", "Dropout", "Linear", "Dropout"]
    assert layer.mlp[4].p == 0.1 and layer.dropout2.p == 0.1  # two dropouts after the MLP's last Linear
    assert {m.p for m in post.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
