"""The synthetic world: seeded, byte-identical, taming-like, with planted concepts written down."""
import hashlib
import json

import numpy as np
import torch

from cortex.data.formats import read_split
from cortex.data.synthetic import SyntheticWorld, WorldConfig, load_vq
from tests.conftest import TINY_WORLD
from tests.helpers import run_script


def _digest(folder):
    h = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "args.json":  # args.json records the output path itself
            h[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def test_same_seed_byte_identical(tmp_path, tiny_root):
    run_script("VQGAN_explanation/generate_dataset.py", ["--root", tmp_path, "--layout", "both", *TINY_WORLD])
    a, b = _digest(tmp_path / "datasets"), _digest(tiny_root / "datasets")
    assert a == b and len(a) > 50


def test_other_seed_differs(tmp_path):
    run_script("VQGAN_explanation/generate_dataset.py", ["--root", tmp_path, "--seed", "1", "--layout", "compact",
                                                         *TINY_WORLD])
    gt = json.loads((tmp_path / "datasets" / "ground_truth.json").read_text())
    assert gt["config"]["seed"] == 1


def test_planted_concepts(tiny_root):
    data = tiny_root / "datasets"
    gt = json.loads((data / "ground_truth.json").read_text())
    concepts = {int(k): set(v) for k, v in gt["concept_tokens"].items()}
    assert len(concepts) == 3 and all(len(v) == 4 for v in concepts.values())
    assert not (concepts[0] & concepts[1]) and not (set(gt["background_tokens"]) & concepts[0])
    for rec in read_split(data, "train"):
        present = set(rec.ids.tolist())
        assert present & concepts[rec.label]  # its own concept is in the image
        assert not any(present & concepts[y] for y in concepts if y != rec.label)
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["num_classes"] == 3 and info["n_codes"] == 64


def test_frequency_is_fooled():
    """The most frequent tokens of a class are background, not its concept."""
    world = SyntheticWorld.build(WorldConfig(num_classes=4, n_codes=256, seed=3))
    rng = np.random.default_rng(0)
    counts = np.bincount(np.concatenate([world.sample(0, rng) for _ in range(50)]), minlength=256)
    top = set(np.argsort(-counts)[:8].tolist())
    assert not (top & set(world.concept_tokens[0]))


def test_object_vs_scattered():
    for layout in ("object", "scattered"):
        world = SyntheticWorld.build(WorldConfig(num_classes=2, n_codes=256, concept_layout=layout, object_size=(4, 4)))
        pos = world.concept_positions(np.random.default_rng(1))
        rows, cols = pos // 16, pos % 16
        spread = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(pos) == 16
        assert (spread == 16) == (layout == "object")


def test_vq_interface_roundtrip(tiny_root):
    vq = load_vq(tiny_root / "datasets" / "synthetic_vq.pt")
    assert vq.quantize.embedding.weight.shape == (64, 256)
    rec = read_split(tiny_root / "datasets", "test")[0]
    ids = torch.from_numpy(rec.ids)[None]
    img = vq.decode_ids(ids)
    assert img.shape == (1, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    quant, _, (_, _, enc_ids) = vq.encode(img)
    assert torch.equal(enc_ids.view(1, 256), ids)  # the decoder is invertible on its own outputs
    assert torch.equal(vq.decode(quant), img)
    # the saved PNG is the decode
    from PIL import Image
    from cortex.data.formats import image_path
    png = np.asarray(Image.open(image_path(tiny_root / "datasets", rec.filename)))
    assert np.abs(png.astype(int) - ((img[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()).max() <= 1
