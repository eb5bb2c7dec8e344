"""cortex.evaluation.evaluators (ImageNet weights through torchvision's API, offline copies, clear errors; synthetic
checkpoints) and cortex.evaluation.masking (patch blackout, token-id masks)."""
import urllib.error

import numpy as np
import pytest
import torch

from cortex.evaluation import evaluators as E, masking as M
from cortex.utils import CortexError


# ----------------------------------------------------------------------------- masking

def test_mask_images_blacks_exact_patches():
    img = torch.full((3, 32, 32), 200, dtype=torch.uint8)  # 2-px patches
    pos = torch.zeros(256, dtype=torch.bool)
    pos[0] = pos[17] = pos[255] = True  # (0,0), (1,1), (15,15)
    out = M.mask_images(img, pos)[0]
    black = (out == 0).all(0)
    expect = torch.zeros(32, 32, dtype=torch.bool)
    expect[0:2, 0:2] = expect[2:4, 2:4] = expect[30:32, 30:32] = True
    assert torch.equal(black, expect)
    assert (out[:, ~expect] == 200).all()
    # one image broadcast against several masks
    many = M.mask_images(img, torch.stack([pos, torch.zeros(256, dtype=torch.bool)]))
    assert many.shape == (2, 3, 32, 32) and (many[1] == 200).all()
    with pytest.raises(CortexError, match="multiple of 16"):
        M.patch_size(40)


def test_token_id_masks():
    ids = np.arange(256) % 10  # id k at every position p with p % 10 == k
    scores = np.zeros(256)
    scores[[3, 13, 7]] = [3.0, 2.0, 1.0]  # top positions: 3 (id 3), 13 (id 3), 7 (id 7)
    order = M.ranking(scores)
    assert list(order[:3]) == [3, 13, 7]
    masks = M.prefix_masks(ids, order, [1, 2, 3])
    assert masks[0].sum() == masks[1].sum() == (ids == 3).sum()  # same id twice: same set
    assert np.array_equal(masks[2], np.isin(ids, [3, 7]))
    assert np.array_equal(M.positions_with_ids(ids, {3, 7}), masks[2])
    a = M.authors_random_draws(["0_1.npy", "0_2.npy"], [3, 5])
    assert [len(p) for p in a["0_1.npy"]] == [3, 5] and all(len(set(p)) == len(p) for p in a["0_1.npy"])
    assert M.authors_random_draws(["0_1.npy", "0_2.npy"], [3, 5]).keys() == a.keys()
    assert np.array_equal(M.draw_masks(ids, [np.array([3, 7])])[0], np.isin(ids, [3, 7]))
    with pytest.raises(CortexError, match="NaN"):
        M.ranking(np.full(256, np.nan))
    with pytest.raises(CortexError, match="num_tokens"):
        M.check_ns([0, 5])


# ----------------------------------------------------------------------------- real evaluators

@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """torchvision's resnet18 with random weights saved under torchvision's file name."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    net = get_model("resnet18", weights=None).eval()
    d = tmp_path_factory.mktemp("weights")
    torch.save(net.state_dict(), d / "resnet18-f37072fd.pth")
    return d, net


def _reference(net, x01):
    import torch.nn.functional as F

    x = F.interpolate(x01, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return net((x - mean) / std)


def test_weight_file_names():
    assert E.weight_file_name("resnet18") == "resnet18-f37072fd.pth"
    assert E.weight_file_name("vit_b_16").startswith("vit_b_16-") and E.weight_file_name("resnet50").endswith(".pth")
    with pytest.raises(CortexError, match="not a torchvision model"):
        E.imagenet_weights("no_such_net")


def test_real_evaluator_from_weights_dir(resnet18_weights, monkeypatch, tmp_path):
    d, net = resnet18_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    ev = E.load_imagenet_evaluator("resnet18", weights_dir=d, download=False)
    assert ev.num_classes == 1000 and ev.input_size == 224 and not ev.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = ev(x)
    torch.testing.assert_close(out, _reference(net, x), rtol=1e-4, atol=1e-4)
    # uint8 input through evaluator_logits, and class_logit_prob
    lg = E.evaluator_logits(ev, (x * 255).round().to(torch.uint8), batch_size=1)
    logit, prob = E.class_logit_prob(lg, [3, 5])
    assert logit.shape == (2,) and np.all((prob > 0) & (prob < 1))


def test_real_evaluator_from_torch_home_layout(resnet18_weights, monkeypatch, tmp_path):
    d, net = resnet18_weights
    home = tmp_path / "th"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes((d / "resnet18-f37072fd.pth").read_bytes())
    # --weights_dir pointing at a TORCH_HOME folder
    ev = E.load_imagenet_evaluator("resnet18", weights_dir=home, download=False)
    # TORCH_HOME itself (torch hub's cache), no --weights_dir
    monkeypatch.setenv("TORCH_HOME", str(home))
    ev2 = E.load_imagenet_evaluator("resnet18", download=False)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ev(x), ev2(x))


def test_missing_weights_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CortexError, match=r"resnet18-f37072fd\.pth.*--no_download.*--weights_dir"):
        E.load_imagenet_evaluator("resnet18", weights_dir=tmp_path, download=False)

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(CortexError) as e:
        E.load_imagenet_evaluator("resnet18", weights_dir=tmp_path, download=True)
    msg = str(e.value)
    assert "cannot be downloaded" in msg and "resnet18-f37072fd.pth" in msg and "--weights_dir" in msg
    assert "download.pytorch.org" in msg


def test_wrong_weight_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "resnet18-f37072fd.pth")
    with pytest.raises(CortexError, match="not torchvision's resnet18 weights"):
        E.load_imagenet_evaluator("resnet18", weights_dir=tmp_path, download=False)
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"torn")
    with pytest.raises(CortexError, match="cannot read"):
        E.load_imagenet_evaluator("resnet18", weights_dir=tmp_path, download=False)


# ----------------------------------------------------------------------------- synthetic evaluators

def test_synthetic_round_trip_and_selection(tmp_path):
    from cortex.paths import ExperimentPaths

    paths = ExperimentPaths(root=tmp_path)
    net = E.build_synthetic_net("vit_tiny_8", 3, 32).eval()
    E.save_synthetic_evaluator(E.synthetic_dir(paths.checkpoint_dir) / "vit_tiny_8.pth", net, "vit_tiny_8", 3, 32,
                               meta={"val_accuracy": 50.0})
    paths.data_dir.mkdir(parents=True)
    (paths.data_dir / "dataset_info.json").write_text('{"source": "synthetic", "num_classes": 3}')
    evs = E.load_evaluators(["auto"], paths)
    assert [e.name for e in evs] == ["vit_tiny_8"] and evs[0].input_size == 32 and evs[0].num_classes == 3
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(evs[0](x), net((x - mean) / std))
    assert [e.name for e in E.load_evaluators(["synthetic"], paths)] == ["vit_tiny_8"]
    with pytest.raises(CortexError, match="predicts 3 classes"):
        E.load_evaluators(["synthetic"], paths, num_classes=10)
    # a synthetic world without evaluator checkpoints: say what to run
    empty = ExperimentPaths(root=tmp_path, checkpoint_dir=tmp_path / "none")
    with pytest.raises(CortexError, match="train_evaluators.py"):
        E.load_evaluators(["auto"], empty)
    with pytest.raises(CortexError, match="train_evaluators.py"):
        E.load_evaluators(["synthetic"], empty)
