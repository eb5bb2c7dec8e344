"""Evaluators trained on the user's own dataset (issue 22, item 3): train_evaluators.py on any dataset, ImageNet
weights used when found locally (never downloaded), every evaluator tied to the dataset it was trained on."""
import json

import pytest
import torch

from cortex.cli import run_main
from cortex.evaluation import evaluators as E
from cortex.paths import ExperimentPaths
from cortex.utils import CortexError
from tests.helpers import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = ["--train_per_class", "4", "--val_per_class", "2", "--test_per_class", "2", "--n_codes", "64",
         "--concept_tokens", "4", "--n_background", "16", "--n_distractors", "4", "--object_size", "3", "4",
         "--patch_size", "2", "--layout", "compact"]
TRAIN = ["--epochs", "1", "--batch_size", "8", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two datasets: a 4-label 'demo' world and a 3-label world of 'your own' labels (class names stored)."""
    out = {}
    for name, n in (("demo", 4), ("own", 3)):
        root = tmp_path_factory.mktemp(name)
        run_script("VQGAN_explanation/generate_dataset.py", ["--root", root, "--num_classes", n, *WORLD])
        out[name] = ExperimentPaths(root=root)
    info = out["own"].data_dir / "dataset_info.json"
    d = json.loads(info.read_text())
    info.write_text(json.dumps({**d, "source": "images", "class_names": ["cat", "dog", "fox"]}))
    (out["own"].data_dir / "synthetic_vq.pt").rename(out["own"].root / "vq_elsewhere.pt")  # not the synthetic world
    return out


def _train(paths, *extra):
    return run_script("VQGAN_explanation/train_evaluators.py",
                      ["--root", paths.root, "--archs", "resnet10", *TRAIN, *extra])


def test_evaluators_record_their_dataset_and_refuse_another(worlds, tmp_path, capsys):
    demo, own = worlds["demo"], worlds["own"]
    out = _train(demo, "--evaluator_dir", tmp_path / "ev", "--epochs", "2")
    meta = torch.load(out / "resnet10.pth", weights_only=True)["meta"]
    rec = meta["dataset"]
    assert rec["labels"] == [0, 1, 2, 3] and rec["content_hash"] == E.dataset_record(demo.data_dir)["content_hash"]
    assert meta["settings"]["epochs"] == 2
    args_json = json.loads((out / "train_evaluators_args.json").read_text())
    assert args_json["epochs"] == 2 and args_json["trained"] == ["resnet10"]

    # the bug: a 3-label dataset with the demo's evaluators on disk was "nothing to do"; now an error naming both
    with pytest.raises(CortexError, match="trained on .*4 labels.*not on .*3 labels.*--evaluator_dir"):
        _train(own, "--evaluator_dir", tmp_path / "ev")
    # a rerun on the same dataset with other settings keeps the checkpoint, says so, and leaves the args JSON alone
    capsys.readouterr()
    _train(demo, "--evaluator_dir", tmp_path / "ev", "--epochs", "1")
    said = capsys.readouterr().out
    assert "kept" in said and "epochs 2 (asked: 1)" in said and "nothing to do" in said
    assert json.loads((out / "train_evaluators_args.json").read_text())["epochs"] == 2

    # the eval scripts' loader refuses them on the other dataset, accepts them on their own
    with pytest.raises(CortexError, match="evaluator resnet10 .* was trained on another dataset"):
        E.load_evaluators(["trained"], own, evaluator_dir=tmp_path / "ev")
    evs = E.load_evaluators(["trained"], demo, evaluator_dir=tmp_path / "ev")
    assert [e.name for e in evs] == ["resnet10"] and evs[0].num_classes == 4
    # auto: this dataset's evaluators; on your own labels without any, an error instead of ImageNet's classes
    assert E.resolve_evaluator_names(["auto"], demo, tmp_path / "ev") == [E.SYNTHETIC]
    with pytest.raises(CortexError, match="your own labelled images.*train_evaluators.py"):
        E.resolve_evaluator_names(["auto"], own, tmp_path / "ev")
    # --overwrite retrains them on this dataset; then the eval loader takes them there
    _train(own, "--evaluator_dir", tmp_path / "ev", "--overwrite")
    assert [e.num_classes for e in E.load_evaluators(["auto"], own, evaluator_dir=tmp_path / "ev")] == [3]


def test_eval_script_prints_an_error_line_for_foreign_evaluators(worlds, tmp_path, capsys):
    """The shell path: `error: ... trained on another dataset ...`, exit status 2 (through eval_setup)."""
    from types import SimpleNamespace

    from cortex.evaluation.explain import eval_setup

    demo, own = worlds["demo"], worlds["own"]
    _train(demo, "--evaluator_dir", tmp_path / "ev")
    args = SimpleNamespace(root=own.root, data_dir=None, checkpoint_dir=None, results_dir=None, log_dir=None,
                           device="cpu", gpu=None, seed=0, evaluators=["trained"], weights_dir=None, no_download=True,
                           evaluator_dir=str(tmp_path / "ev"))

    def main(a):
        eval_setup(a)

    with pytest.raises(SystemExit) as e:
        _run(main, args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: evaluator resnet10") and "another dataset" in err[-1]


def _run(main, args):
    """run_main's error path for a ready Namespace."""
    import argparse

    class P(argparse.ArgumentParser):
        def parse_args(self, argv=None, namespace=None):
            return args

    return run_main(main, lambda: P(), [])


def test_pretrained_backbone_from_a_local_weight_file(worlds, tmp_path, monkeypatch, capsys):
    """resnet18's ImageNet weights found in --weights_dir (a file made here; nothing downloaded): the backbone
    starts from them, with a new 3-class head; without the file it trains from scratch and says so."""
    from torchvision.models import get_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("tried to download"), raising=True)
    own = worlds["own"]
    torch.manual_seed(0)
    fake = get_model("resnet18", weights=None).state_dict()
    wd = tmp_path / "weights"
    wd.mkdir()
    torch.save(fake, wd / E.weight_file_name("resnet18"))

    net, src = E.pretrained_net("resnet18", 3, wd)
    assert src == wd / "resnet18-f37072fd.pth" and net.fc.out_features == 3
    assert torch.equal(net.conv1.weight, fake["conv1.weight"]) and net.conv1.weight.requires_grad
    assert E.pretrained_net("resnet10", 3, wd) == (None, None)  # no ImageNet weights for the small archs

    out = run_script("VQGAN_explanation/train_evaluators.py",
                     ["--root", own.root, "--archs", "resnet18", *TRAIN, "--weights_dir", wd,
                      "--evaluator_dir", tmp_path / "ev"])
    assert "fine-tuning from the ImageNet weights" in capsys.readouterr().out
    ev = E.load_synthetic_evaluator(out / "resnet18.pth")
    assert ev.num_classes == 3 and ev.meta["pretrained"].endswith("resnet18-f37072fd.pth")
    assert not torch.equal(ev.net.conv1.weight, fake["conv1.weight"])  # fine-tuned, not frozen

    run_script("VQGAN_explanation/train_evaluators.py",
               ["--root", own.root, "--archs", "resnet18", *TRAIN, "--evaluator_dir", tmp_path / "ev2"])
    assert "training from scratch (no local ImageNet weights found" in capsys.readouterr().out
    assert E.load_synthetic_evaluator(tmp_path / "ev2" / "resnet18.pth").meta["pretrained"] == ""


def test_dataset_record_tells_datasets_apart(worlds, tmp_path):
    import shutil

    demo = worlds["demo"]
    a = E.dataset_record(demo.data_dir)
    copy = tmp_path / "copy"
    shutil.copytree(demo.data_dir, copy)
    assert E.dataset_record(copy)["content_hash"] == a["content_hash"]  # the same dataset elsewhere
    csv = copy / "test_embeddings.csv"
    csv.write_text(csv.read_text().replace(",0,", ",1,", 1))  # one label changed
    assert E.dataset_record(copy)["content_hash"] != a["content_hash"]
    (copy / "train_embeddings.csv").unlink()
    with pytest.raises(CortexError, match="train_embeddings.csv not found"):
        E.dataset_record(copy)
