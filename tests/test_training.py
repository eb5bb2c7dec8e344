"""train.py / test.py (VQGAN): the authors' output files and formats, resume, wrong --model."""
import csv
import json
import re

import pytest
import torch

from cortex.iem.checkpoints import load_iem
from cortex.utils import CortexError
from tests.helpers import run_script

TRAIN = ["--width", "16", "--batch_size", "8", "--device", "cpu", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def trained(tiny_root):
    run_script("VQGAN_explanation/train.py", ["--root", tiny_root, "--model", "1", "--epochs", "2", *TRAIN])
    return tiny_root


def test_outputs_and_log_format(trained):
    d = trained / "checkpoints" / "ClassificationNet1"
    for name in ("model.pth", "best_model.pth", "config.json", "lightning/last.ckpt", "train_args.json"):
        assert (d / name).exists(), name
    sd = torch.load(d / "best_model.pth", weights_only=True)
    assert isinstance(sd, dict) and "conv1_1.weight" in sd and sd["fc3.weight"].shape[0] == 3  # plain state_dict
    assert json.loads((d / "config.json").read_text())["num_classes"] == 3
    logs = list((trained / "logs").glob("training_log_*.txt"))
    assert len(logs) == 1 and re.fullmatch(r"training_log_\d{8}_\d{4}\.txt", logs[0].name)
    lines = logs[0].read_text().splitlines()
    assert len(lines) == 4
    assert re.fullmatch(r"Epoch \[1/2\], Training Loss: \d+\.\d{4}", lines[0])
    assert re.fullmatch(r"Validation Loss: \d+\.\d{4}, Accuracy: \d+\.\d{2}%", lines[1])


def test_test_script(trained):
    acc = run_script("VQGAN_explanation/test.py", ["--root", trained, "--model", "1", "--device", "cpu"])
    out = trained / "results" / "Classification" / "ClassificationNet1" / "testing_results.csv"
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["Top-1 Accuracy", "Top-3 Accuracy", "Top-5 Accuracy", "Top-10 Accuracy"]
    vals = [float(v) for v in rows[1]]
    assert vals == sorted(vals) and vals[1] == 100.0  # 3 classes: top-3 always right
    assert abs(vals[0] - acc[1]) < 0.01


def test_wrong_model_is_named(trained):
    with pytest.raises(CortexError, match=r"ClassificationNet1.*--model 3"):
        load_iem(trained / "checkpoints" / "ClassificationNet1" / "best_model.pth", "vqgan", 3)
    (trained / "checkpoints" / "ClassificationNet3").mkdir(exist_ok=True)
    import shutil
    shutil.copy(trained / "checkpoints" / "ClassificationNet1" / "best_model.pth",
                trained / "checkpoints" / "ClassificationNet3" / "best_model.pth")
    with pytest.raises(CortexError, match="ClassificationNet1"):
        run_script("VQGAN_explanation/test.py", ["--root", trained, "--model", "3", "--device", "cpu"])


def test_missing_checkpoint(tiny_root):
    with pytest.raises(CortexError, match="checkpoint not found"):
        run_script("VQGAN_explanation/test.py", ["--root", tiny_root, "--model", "2", "--device", "cpu"])


def test_resume_continues(trained, tmp_path):
    import shutil
    shutil.copytree(trained, tmp_path / "r", ignore=shutil.ignore_patterns("train", "val", "images"))
    root = tmp_path / "r"
    run_script("VQGAN_explanation/train.py", ["--root", root, "--model", "1", "--epochs", "3", "--resume", *TRAIN])
    log = next((root / "logs").glob("training_log_*.txt")).read_text().splitlines()
    assert [l.split(",")[0] for l in log[::2]] == ["Epoch [1/2]", "Epoch [2/2]", "Epoch [3/3]"]


@pytest.mark.parametrize("m", [2, 3, 4])
def test_every_net_trains(tiny_root, tmp_path, m):
    """--model m builds ClassificationNet{m} (the seed silently built another net for 3/4)."""
    import shutil
    shutil.copytree(tiny_root / "datasets", tmp_path / "datasets", ignore=shutil.ignore_patterns("images", "train", "val", "test"))
    run_script("VQGAN_explanation/train.py", ["--root", tmp_path, "--model", m, "--epochs", "1", "--depth", "1", *TRAIN])
    from cortex.iem.registry import identify_architecture
    sd = torch.load(tmp_path / "checkpoints" / f"ClassificationNet{m}" / "model.pth", weights_only=True)
    assert identify_architecture(sd, "vqgan") == m


def test_layouts_train_identically(tiny_root, tmp_path):
    """Id batches looked up on the device train the same weights, bit for bit, as the per-image files."""
    sds = {}
    for layout in ("files", "compact"):
        run_script("VQGAN_explanation/train.py", ["--root", tiny_root, "--model", "1", "--epochs", "1", *TRAIN,
                                                  "--data_layout", layout, "--checkpoint_dir", tmp_path / layout,
                                                  "--log_dir", tmp_path / f"logs_{layout}"])
        sds[layout] = torch.load(tmp_path / layout / "ClassificationNet1" / "model.pth", weights_only=True)
        acc = run_script("VQGAN_explanation/test.py", ["--root", tiny_root, "--model", "1", "--device", "cpu",
                                                       "--data_layout", layout, "--checkpoint_dir", tmp_path / layout,
                                                       "--results_dir", tmp_path / f"results_{layout}"])
        sds[layout + "_acc"] = acc
    assert sds["files"].keys() == sds["compact"].keys()
    assert all(torch.equal(sds["files"][k], sds["compact"][k]) for k in sds["files"])
    assert sds["files_acc"] == sds["compact_acc"]


@pytest.mark.parametrize("workers", [0, 2])  # 2: DataLoader workers (restarted each epoch, as resume needs)
def test_resume_is_bit_exact(tiny_root, tmp_path, workers):
    """Stopped after epoch 1 and resumed: the same weights as an uninterrupted run (shuffle + dropout RNG)."""
    def train(name, epochs, *extra):
        run_script("VQGAN_explanation/train.py", ["--root", tiny_root, "--model", "1", "--epochs", epochs, *TRAIN,
                                                  "--num_workers", workers,
                                                  "--checkpoint_dir", tmp_path / name, "--log_dir",
                                                  tmp_path / f"logs_{name}", *extra])
        return torch.load(tmp_path / name / "ClassificationNet1" / "model.pth", weights_only=True)

    straight = train("straight", 3)
    train("resumed", 1)
    resumed = train("resumed", 3, "--resume")
    once = train("once", 1)
    assert not all(torch.equal(straight[k], once[k]) for k in straight)  # epochs 2-3 changed the weights
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = next((tmp_path / "logs_resumed").glob("training_log_*.txt")).read_text().splitlines()
    ref = next((tmp_path / "logs_straight").glob("training_log_*.txt")).read_text().splitlines()
    assert log[2:] == ref[2:]  # epochs 2 and 3: the same losses and accuracies
