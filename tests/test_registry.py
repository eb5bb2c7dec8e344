"""The IEM and tokenizer registries: a new IEM is one class plus one entry, a new tokenizer one adapter plus one entry.

A toy tokenizer (a palette of 8 colours, one token per 4x4 px patch of a 32 px picture: an 8x8 grid of 8-d
codes) and a toy IEM (a 1x1 conv and a linear head) are registered here and nowhere else, then run through the
scripts: generate_dataset.py --source images --tokenizer toy -> train.py --model 5 -> test.py -> TIS_computation.py
-> TIS_analysis.py. Label 0's pictures carry the colour of token 0 on half their patches, label 1's that of token 1.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cortex.data.tokenizers import (TOKENIZERS, TokenizerEntry, VQTokenizer, load_tokenizer, register_tokenizer,
                                    tokenizer_for_dataset, tokenizer_kinds, unregister_tokenizer)
from cortex.iem.checkpoints import load_iem
from cortex.iem.registry import (IEMEntry, StateDictSignature, build_model, identify_architecture, model_choices,
                                 register_iem, unregister_iem)
from cortex.paths import ExperimentPaths
from cortex.analysis.statistics_files import read_stats
from cortex.attribution.store import read_tis_file
from tests.helpers import run_script

TOY_ID = 5
PALETTE = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, -1.0],
                        [-1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])  # (8, 3) in [-1, 1]
PATCH, SIDE = 4, 8  # 4x4 px per token, 8x8 tokens: 32 px pictures

pytestmark = pytest.mark.usefixtures("one_thread")


class PaletteTokenizer(VQTokenizer):
    """Toy adapter: a token is the palette colour nearest to a patch's mean colour; decoding paints the patch."""

    kind = "toy"

    def __init__(self, codebook, palette, name: str = "toy"):
        super().__init__(codebook, SIDE, SIDE * PATCH, name)
        self.palette = palette

    def _encode(self, images):                                      # (B, 3, 32, 32)
        means = F.avg_pool2d(images, PATCH)                          # (B, 3, 8, 8)
        d = ((means[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)  # (B, 8 codes, 8, 8)
        return d.argmin(1)                                           # (B, 8, 8)

    def _decode(self, ids):                                         # (B, 8, 8)
        img = self.palette[ids].permute(0, 3, 1, 2)                  # (B, 3, 8, 8)
        return img.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)  # (B, 3, 32, 32)


def load_palette_tokenizer(config, ckpt, device):
    d = torch.load(config, map_location=device, weights_only=True)
    return PaletteTokenizer(d["codebook"], d["palette"])


class ToyIEM(nn.Module):
    """Toy IEM: a 1x1 conv to ``width`` channels, ReLU, mean over the positions, a linear head."""

    def __init__(self, num_classes: int, width: int = 8, code_dim: int = 256, grid=(16, 16)):
        super().__init__()
        self.num_classes, self.width, self.depth, self.code_dim, self.grid = num_classes, width, None, code_dim, grid
        self.stem = nn.Conv2d(code_dim, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):                                           # (B, D, h, w)
        return self.head(F.relu(self.stem(x)).mean((2, 3)))          # (B, num_classes)


@pytest.fixture(scope="module")
def registered():
    """The toy tokenizer and the toy IEM in the registries for this module's tests only."""
    register_tokenizer(TokenizerEntry("toy", PaletteTokenizer, load_palette_tokenizer))
    register_iem(IEMEntry("vqgan", TOY_ID, ToyIEM, StateDictSignature("stem.weight", "head.weight",
                                                                      requires=("stem.weight", "head.weight"))))
    try:
        yield
    finally:
        unregister_iem("vqgan", TOY_ID)
        unregister_tokenizer("toy")


@pytest.fixture(scope="module")
def world(registered, tmp_path_factory):
    """Pictures of two labels encoded with the toy tokenizer, the toy IEM trained on them, its TIS and statistics."""
    base = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    toy_file = base / "toy_tokenizer.pt"
    torch.save({"codebook": torch.randn(len(PALETTE), 8), "palette": PALETTE}, toy_file)
    rng = np.random.default_rng(0)
    for label, name in enumerate(("l0_red", "l1_blue")):  # labels follow the sorted folder names
        (base / "pics" / name).mkdir(parents=True)
        for i in range(12):
            ids = rng.integers(2, len(PALETTE), SIDE * SIDE)          # background: tokens 2..7
            ids[rng.permutation(SIDE * SIDE)[:SIDE * SIDE // 2]] = label  # the label's token on half the patches
            img = PaletteTokenizer(torch.zeros(len(PALETTE), 8), PALETTE).decode(torch.from_numpy(ids)[None])[0]
            px = ((img.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
            Image.fromarray(px).save(base / "pics" / name / f"p{i:02d}.png")
    root = base / "exp"
    run_script("VQGAN_explanation/generate_dataset.py",
               ["--root", root, "--source", "images", "--image_dir", base / "pics", "--tokenizer", "toy",
                "--tokenizer_config", toy_file, "--splits", "0.5,0.25,0.25", "--device", "cpu"])
    run_script("VQGAN_explanation/train.py", ["--root", root, "--model", TOY_ID, "--epochs", 15, "--width", 8,
                                              "--batch_size", 4, "--device", "cpu", "--lr", "1e-2"])
    run_script("VQGAN_explanation/test.py", ["--root", root, "--model", TOY_ID, "--device", "cpu"])
    for split in ("train", "test"):
        run_script("VQGAN_explanation/TIS_computation.py", ["--root", root, "--model", TOY_ID, "--data_type", split,
                                                            "--nsamples", 2, "--device", "cpu", "--no_progress"])
    run_script("VQGAN_explanation/TIS_analysis.py", ["--root", root, "--model", TOY_ID, "--no_progress"])
    return dict(paths=ExperimentPaths(root=root), toy_file=toy_file)


def test_entries_reach_the_cli_and_the_loaders(registered, tmp_path):
    assert TOY_ID in model_choices("vqgan") and "toy" in tokenizer_kinds(images_only=True)
    net = build_model("vqgan", TOY_ID, 3, width=16, code_dim=8, grid=(8, 8))
    assert isinstance(net, ToyIEM) and net(torch.randn(2, 8, 8, 8)).shape == (2, 3)
    assert identify_architecture(net.state_dict(), "vqgan") == TOY_ID
    assert identify_architecture(net.state_dict(), "dalle") is None  # registered for VQGAN_explanation only
    from tests.helpers import load_script

    parser = load_script("VQGAN_explanation/TIS_computation.py").get_args_parser()
    assert parser.parse_args(["--model", str(TOY_ID), "--data_type", "train"]).model == TOY_ID


def test_register_and_unregister_leave_the_paper_entries():
    before = model_choices("dalle"), tokenizer_kinds()
    register_iem(IEMEntry("dalle", 9, ToyIEM, StateDictSignature("stem.weight", "head.weight", requires=("stem.weight",))))
    register_tokenizer(TokenizerEntry("toy2", PaletteTokenizer, load_palette_tokenizer))
    assert 9 in model_choices("dalle") and "toy2" in tokenizer_kinds()
    unregister_iem("dalle", 9)
    unregister_tokenizer("toy2")
    assert (model_choices("dalle"), tokenizer_kinds()) == before
    assert model_choices("dalle") == (1, 2, 3) and {"synthetic", "taming", "diffusers"} <= set(tokenizer_kinds())


def test_toy_tokenizer_and_iem_through_train_tis_and_statistics(world):
    paths = world["paths"]
    info = json.loads((paths.data_dir / "dataset_info.json").read_text())
    assert info["tokenizer"] == "toy" and info["grid_size"] == [SIDE, SIDE] and info["code_dim"] == 8
    tok = load_tokenizer("toy", world["toy_file"])
    assert isinstance(tokenizer_for_dataset(paths.data_dir), PaletteTokenizer)  # dataset_info.json names it
    assert torch.equal(tok.encode(tok.decode(torch.arange(64).reshape(1, 8, 8) % 8)),
                       torch.arange(64).reshape(1, 8, 8) % 8)  # the adapter round-trips

    iem = load_iem(paths.best_ckpt(TOY_ID), "vqgan", TOY_ID)  # identified by the entry's signature
    assert isinstance(iem, ToyIEM) and iem.code_dim == 8 and tuple(iem.grid) == (SIDE, SIDE)
    res = paths.results_dir / "Classification" / f"ClassificationNet{TOY_ID}" / "testing_results.csv"
    with open(res, newline="") as f:
        acc = float(next(csv.DictReader(f))["Top-1 Accuracy"])
    assert acc >= 75.0  # two labels told apart by one colour: far above chance (50 %)

    for label in (0, 1):
        for split in ("train", "test"):
            names, labels, scores = read_tis_file(paths.tis_file(TOY_ID, split, label))
            assert names and scores.shape == (len(names), SIDE * SIDE) and np.isfinite(scores).all()
            assert set(labels) == {label}
        _, stats = read_stats(paths.stats_file(TOY_ID, label))
        counts = {}
        for rows in stats.values():
            for token, count in rows:
                counts[int(token)] = counts.get(int(token), 0) + int(count)
        assert counts and all(0 <= t < len(PALETTE) for t in counts)
        # the label's own colour is among its two most important tokens (it decides the label)
        assert label in sorted(counts, key=counts.get, reverse=True)[:2], counts
