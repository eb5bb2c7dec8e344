"""The IEMs of SPEC §4: fixture keys/shapes, forward shapes, batch independence, checkpoint I/O."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cortex.iem import architectures as models
from cortex.iem.checkpoints import load_iem, save_iem
from cortex.iem.registry import MODEL_IDS, build_model, identify_architecture
from cortex.utils import CortexError
from tests.helpers import load_script

FIXTURE = Path(__file__).parent / "fixtures" / "state_dict_shapes.json"
FOLDER = {"vqgan": "VQGAN_explanation", "dalle": "Dalle_explanation"}
PAPER_CLASSES = {"vqgan": 1000, "dalle": 2}
ALL_NETS = [(e, m) for e in ("vqgan", "dalle") for m in MODEL_IDS[e]]
TRANSFORMERS = [("vqgan", 4), ("dalle", 3)]
TINY = dict(num_classes=7, width=16, depth=2)


@pytest.fixture(scope="module")
def fixture_shapes() -> dict:
    return json.loads(FIXTURE.read_text())


def shapes_of(model: torch.nn.Module) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def tiny(experiment: str, model_id: int, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(experiment, model_id, **{**TINY, **kw})


# ----------------------------------------------------------------------------- the fixture

@pytest.mark.parametrize("experiment,model_id", ALL_NETS)
def test_state_dict_equals_fixture(fixture_shapes, experiment, model_id):
    expected = fixture_shapes[f"{FOLDER[experiment]}/ClassificationNet{model_id}"]
    with torch.device("meta"):
        model = build_model(experiment, model_id, PAPER_CLASSES[experiment])
    got = shapes_of(model)
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    assert list(got) == list(expected)  # same order too
    assert identify_architecture(dict.fromkeys(expected), experiment) == model_id


@pytest.mark.parametrize("experiment", ["vqgan", "dalle"])
def test_folder_model_modules_match_fixture(fixture_shapes, experiment):
    mod = load_script(f"{FOLDER[experiment]}/model.py")
    assert mod.build_model is build_model and mod.load_iem is load_iem
    for model_id in MODEL_IDS[experiment]:
        cls = getattr(mod, f"ClassificationNet{model_id}")
        with torch.device("meta"):
            model = cls()
        assert shapes_of(model) == fixture_shapes[f"{FOLDER[experiment]}/ClassificationNet{model_id}"]
    assert not hasattr(mod, f"ClassificationNet{len(MODEL_IDS[experiment]) + 1}")


def test_dalle_naming_and_shared_classes():
    assert isinstance(build_model("dalle", 2, 2, width=16), models.ResSENet)
    assert isinstance(build_model("vqgan", 3, 2, width=16), models.ResSENet)
    assert type(build_model("dalle", 1, 2, width=16)) is type(build_model("vqgan", 1, 2, width=16))


def test_dalle_positions_not_in_state_dict():
    model = tiny("dalle", 3)
    assert not any("pos" in k for k in model.state_dict())
    assert model.positions.shape == (1, 257, 16)


@torch.no_grad()
def test_forward_at_paper_width():
    x = torch.randn(2, 256, 16, 16)
    for experiment, model_id in ALL_NETS:
        model = build_model(experiment, model_id, PAPER_CLASSES[experiment]).eval()
        assert model(x).shape == (2, PAPER_CLASSES[experiment]), (experiment, model_id)


# ----------------------------------------------------------------------------- tiny widths

@pytest.mark.parametrize("experiment,model_id", ALL_NETS)
def test_tiny_forward_backward(experiment, model_id):
    model = tiny(experiment, model_id)
    x = torch.randn(3, 256, 16, 16, requires_grad=True)
    y = model.train()(x)
    assert y.shape == (3, 7)
    y[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.eval()(x).shape == (3, 7)
    if (experiment, model_id) in TRANSFORMERS:
        assert len(model.encoder) == 2


def test_width_scales_hidden_sizes():
    sd = shapes_of(build_model("vqgan", 2, 5, width=16))
    assert sd["conv1_1.weight"] == [16, 256, 3, 3]
    assert sd["fc1.weight"] == [128, 256] and sd["fc2.weight"] == [64, 128] and sd["fc3.weight"] == [5, 64]
    sd = shapes_of(build_model("vqgan", 3, 5, width=16))
    assert sd["layer1.0.se.fc1.weight"] == [1, 16] and sd["fc1.weight"] == [64, 16]
    sd = shapes_of(build_model("vqgan", 4, 5, width=16, depth=3))
    assert sd["encoder.2.mlp.0.weight"] == [64, 16] and sd["pre_classifier.0.weight"] == [32, 16]
    assert "encoder.3.norm1.weight" not in sd


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"--width 12.*multiple of 8"):
        build_model("vqgan", 1, 10, width=12)
    with pytest.raises(CortexError, match=r"--model 5 .*valid choices: 1, 2, 3, 4"):
        build_model("vqgan", 5, 10)
    with pytest.raises(ValueError, match=r"--model 4 .*Dalle_explanation.*valid choices: 1, 2, 3"):
        build_model("dalle", 4, 2)
    with pytest.raises(ValueError, match="--depth"):
        build_model("dalle", 3, 2, width=16, depth=0)


# ----------------------------------------------------------------------------- batch independence

@pytest.mark.parametrize("experiment,model_id", TRANSFORMERS)
@torch.no_grad()
def test_transformer_is_batch_independent(experiment, model_id):
    """Attention runs across positions: one image's logits ignore the other images (eval mode)."""
    model = tiny(experiment, model_id).eval()
    torch.manual_seed(1)
    x = torch.randn(4, 256, 16, 16)
    y = model(x)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 256, 16, 16) * 3
    y2 = model(x2)
    assert not torch.allclose(y[1:], y2[1:])
    torch.testing.assert_close(y2[0], y[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x[:1])[0], y[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("experiment,model_id", ALL_NETS)
def test_save_load_roundtrip_infers_width_depth(tmp_path, experiment, model_id):
    model = tiny(experiment, model_id, width=24, depth=3, num_classes=5).eval()
    path = tmp_path / f"ClassificationNet{model_id}" / "best_model.pth"
    save_iem(model, path, {"experiment": experiment, "model_id": model_id})
    config = json.loads((path.parent / "config.json").read_text())
    depth = 3 if (experiment, model_id) in TRANSFORMERS else None
    assert config == dict(experiment=experiment, model_id=model_id, num_classes=5, width=24, depth=depth)
    assert set(torch.load(path, weights_only=True)) == set(model.state_dict())

    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        expected = model(x)
    # from config.json, then (config removed) from the state-dict shapes
    for _ in range(2):
        loaded = load_iem(path, experiment, model_id)
        assert not loaded.training
        assert (loaded.width, loaded.num_classes, loaded.depth) == (24, 5, depth)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
        (path.parent / "config.json").unlink(missing_ok=True)


def test_load_wrapped_checkpoints(tmp_path):
    model = tiny("dalle", 3).eval()
    sd = model.state_dict()
    lightning = {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}}
    lightning["state_dict"]["criterion.weight"] = torch.ones(2)  # other LightningModule state
    ddp = {f"module.{k}": v for k, v in sd.items()}
    for i, obj in enumerate([lightning, ddp, {"model": sd}]):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(obj, path)
        loaded = load_iem(path, "dalle", 3)
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, sd[k])


def test_load_errors(tmp_path):
    with pytest.raises(CortexError, match=r"checkpoint not found: .*nope\.pth; train it first with train.py --model 2"):
        load_iem(tmp_path / "nope.pth", "vqgan", 2)

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CortexError, match=r"garbage\.pth: cannot read the checkpoint"):
        load_iem(tmp_path / "garbage.pth", "vqgan", 1)

    path = tmp_path / "ClassificationNet3" / "model.pth"
    save_iem(tiny("vqgan", 3), path, {"experiment": "vqgan", "model_id": 3})
    with pytest.raises(CortexError) as e:
        load_iem(path, "vqgan", 1)
    assert str(e.value) == (f"{path} holds a ClassificationNet3 checkpoint (vqgan), "
                            f"but --model 1 was given; pass --model 3")
    with pytest.raises(CortexError, match=r"fc2\.weight has shape \[7, 64\].*\[9, 64\]"):
        load_iem(path, "vqgan", 3, num_classes=9)
    with pytest.raises(CortexError, match=r"layer1\.0\.conv1\.weight has shape"):
        load_iem(path, "vqgan", 3, width=32)
    with pytest.raises(CortexError, match=r"--model 7 .*valid choices"):
        load_iem(path, "vqgan", 7)
    with pytest.raises(CortexError, match="meta says ClassificationNet2"):
        save_iem(tiny("vqgan", 3), tmp_path / "x.pth", {"experiment": "vqgan", "model_id": 2})

    path = tmp_path / "dalle3.pth"
    save_iem(tiny("dalle", 3), path, {"experiment": "dalle", "model_id": 3})
    with pytest.raises(CortexError, match=r"unexpected key 'encoder\.1\."):
        load_iem(path, "dalle", 3, depth=1)
    with pytest.raises(CortexError, match="looks like a Dalle_explanation ClassificationNet3"):
        load_iem(path, "vqgan", 4)
