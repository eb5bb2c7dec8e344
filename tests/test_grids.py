"""Issue 15 (items 2 and 4): any token grid h x w and code dimension D through the whole pipeline.

Two tiny randomly initialised diffusers VQModels (no download) encode a few pictures: an 8x8 grid of 8-d codes
(f4 at 32 px) and a 32x32 grid of 256-d codes (f2 at 64 px). Each dataset goes through generate_dataset ->
train -> test -> TIS -> statistics -> frequency baseline -> sample / concept masking -> codebook level, with
the geometry read from ``dataset_info.json``. The paper's 16x16x256 path is covered (unchanged) by the other
test files; here also: the IEMs of every geometry, their checkpoints, and the defaults of absent keys.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cortex.data.formats import EmbeddingDataset, dataset_geometry, ids_to_embedding, load_codebook, read_split
from cortex.evaluation import evaluators as E
from cortex.iem.registry import MODEL_IDS, build_model
from cortex.iem.checkpoints import load_iem, save_iem
from cortex.paths import ExperimentPaths
from cortex.data.tokenizers import load_tokenizer
from cortex.utils import CortexError
from tests.helpers import run_script

# (name, grid side, code dim D, blocks of the VQModel (f = 2**(blocks-1)), picture size)
GEOMETRIES = [("g8d8", 8, 8, 3, 32), ("g32d256", 32, 256, 2, 64)]
N_CODES = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _vqmodel_dir(root, blocks: int, dim: int, size: int):
    from diffusers import VQModel

    torch.manual_seed(0)
    m = VQModel(block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, latent_channels=4,
                sample_size=size, num_vq_embeddings=N_CODES, norm_num_groups=4, vq_embed_dim=dim,
                mid_block_add_attention=False)
    with torch.no_grad():  # codes on the latents' scale, so that the pictures use several of them
        m.quantize.embedding.weight.mul_(0.05)
    d = root / "vqvae"
    m.save_pretrained(d)
    return d


def _pictures(root, size: int):
    """Two labels x 4 pictures: dark and bright noise, so that a tiny IEM can tell them apart."""
    d = root / "pics"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("dark", "bright")):
        (d / name).mkdir(parents=True)
        for i in range(4):
            img = np.clip(40 + 150 * label + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / name / f"p{i}.png")
    return d


@pytest.fixture(scope="module", params=GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def world(request, tmp_path_factory):
    """An experiment folder encoded with a tiny diffusers VQModel of this geometry, with a trained IEM, its TIS
    (train and test) and statistics, the frequency baseline and a small synthetic-style evaluator."""
    name, side, dim, blocks, size = request.param
    base = tmp_path_factory.mktemp(name)
    vq_dir, pics, root = _vqmodel_dir(base, blocks, dim, size), _pictures(base, size), base / "exp"
    run_script("VQGAN_explanation/generate_dataset.py",
               ["--root", root, "--source", "images", "--image_dir", pics, "--tokenizer", "diffusers",
                "--tokenizer_config", vq_dir, "--layout", "both", "--splits", "0.5,0.25,0.25", "--device", "cpu"])
    model = 1 if side == 8 else 4  # the VGG (adaptive pool to 4x4) and the ViT (h*w+1 positions)
    run_script("VQGAN_explanation/train.py", ["--root", root, "--model", model, "--epochs", 2, "--width", 8,
                                              "--depth", 1, "--batch_size", 4, "--device", "cpu", "--lr", "3e-3"])
    acc = run_script("VQGAN_explanation/test.py", ["--root", root, "--model", model, "--device", "cpu"])
    for split in ("train", "test"):
        run_script("VQGAN_explanation/TIS_computation.py", ["--root", root, "--model", model, "--data_type", split,
                                                            "--nsamples", 2, "--device", "cpu", "--no_progress"])
    run_script("VQGAN_explanation/TIS_analysis.py", ["--root", root, "--model", model, "--no_progress"])
    run_script("VQGAN_explanation/generate_freq_based_tokens.py", ["--root", root])
    paths = ExperimentPaths(root=root)
    torch.manual_seed(0)  # an evaluator of the decoded pictures (untrained: only the shapes matter here)
    E.save_synthetic_evaluator(E.synthetic_dir(paths.checkpoint_dir) / "resnet10.pth",
                               E.build_synthetic_net("resnet10", 2, size), "resnet10", 2, size)
    return dict(paths=paths, side=side, dim=dim, size=size, model=model, vq_dir=vq_dir, acc=acc)


COMMON = ["--evaluators", "synthetic", "--device", "cpu", "--no_progress"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dataset_records_and_reads_its_geometry(world):
    paths, side, dim = world["paths"], world["side"], world["dim"]
    info = json.loads((paths.data_dir / "dataset_info.json").read_text())
    assert info["grid_size"] == [side, side] and info["code_dim"] == dim
    assert dataset_geometry(paths.data_dir) == (side, side, dim)
    cb = load_codebook(paths.data_dir)
    assert cb.shape == (N_CODES, dim)
    recs = read_split(paths.data_dir, "train")
    assert all(r.ids.shape == (side * side,) for r in recs)
    tok = load_tokenizer("diffusers", world["vq_dir"])
    files = EmbeddingDataset(paths.data_dir, "train", layout="files")
    compact = EmbeddingDataset(paths.data_dir, "train", layout="compact")
    for i, r in enumerate(recs):
        e = files[i][0]
        assert e.shape == (dim, side, side)
        assert torch.equal(e, compact[i][0])
        assert torch.equal(e, ids_to_embedding(tok.codebook, torch.from_numpy(r.ids)[None])[0])
    ids_batch = EmbeddingDataset(paths.data_dir, "train", layout="compact", return_ids=True)
    x = ids_batch.lookup(torch.stack([ids_batch[i][0] for i in range(len(ids_batch))]))
    assert x.shape == (len(recs), dim, side, side) and torch.equal(x[0], files[0][0])


def test_iem_trained_tested_and_reloaded_with_the_geometry(world):
    paths, side, dim, model = world["paths"], world["side"], world["dim"], world["model"]
    cfg = json.loads((paths.best_ckpt(model).parent / "config.json").read_text())
    assert cfg["grid"] == [side, side] and cfg.get("code_dim", 256) == dim  # written only when not the paper's
    iem = load_iem(paths.best_ckpt(model), "vqgan", model)  # geometry from config.json
    assert iem.grid == (side, side) and iem.code_dim == dim
    assert iem(torch.randn(3, dim, side, side)).shape == (3, 2)
    res = paths.results_dir / "Classification" / f"ClassificationNet{model}" / "testing_results.csv"
    assert 0 <= float(_rows(res)[0]["Top-1 Accuracy"]) <= 100  # test.py read the (D, h, w) test split


def test_tis_rows_and_statistics_follow_the_grid(world):
    from cortex.analysis.statistics_files import read_stats
    from cortex.attribution.store import read_tis_file

    paths, side, model = world["paths"], world["side"], world["model"]
    n_test = 0
    for label in (0, 1):
        for split in ("train", "test"):
            names, labels, scores = read_tis_file(paths.tis_file(model, split, label))
            assert scores.shape == (len(names), side * side) and np.isfinite(scores).all() and set(labels) == {label}
            n_test += len(names) * (split == "test")
        _, stats = read_stats(paths.stats_file(model, label))
        tokens = [t for rows in stats.values() for t, *_ in rows]
        assert tokens and all(0 <= int(t) < N_CODES for t in tokens)
    assert n_test == 2
    sig = _rows(paths.stats_dir(model) / "tis_significance.csv")
    assert sig and all(0 <= float(r["p_value"]) <= 1 for r in sig)


def test_sample_and_concept_masking_on_the_grid(world):
    paths, side, model = world["paths"], world["side"], world["model"]
    out = run_script("VQGAN_explanation/eval/sample_image_level_explanation.py",
                     ["--model", model, "--root", paths.root, "--num_tokens", 2, 4, *COMMON])
    assert {(r["Method"], r["Num_Masked_Tokens"]) for r in _rows(out)} == {
        ("original", "0"), ("target", "2"), ("random", "2"), ("target", "4"), ("random", "4")}
    per = _rows(paths.explanation_dir(model) / "sample_image_level_per_image.csv")
    assert per and all(0 <= int(r["masked_positions"]) <= side * side for r in per)
    assert max(int(r["masked_positions"]) for r in per if r["method"] == "target") >= 2
    assert (paths.figures_dir(model) / "sample_level_tis_grid.png").stat().st_size > 5000
    out = run_script("VQGAN_explanation/eval/sample_concept_level_explanation.py",
                     ["--model", model, "--root", paths.root, "--top_n", 5, "--token_num", 2, *COMMON])
    rows = _rows(out)
    assert rows[-1]["Model"] == "Overall" and all(np.isfinite(float(r["Avg_Diff_Target"])) for r in rows)


def test_codebook_level_on_the_grid(world):
    from cortex.evaluation.codebook_level import default_region, region_positions

    paths, side, model = world["paths"], world["side"], world["model"]
    out = run_script("VQGAN_explanation/eval/codebook_level_explanation.py",
                     ["--model", model, "--root", paths.root, "--vq", "diffusers", "--tokenizer_config", world["vq_dir"],
                      "--pairs", "0:1", "--steps", 2, "--eval_every", 1, "--lr", 5.0, *COMMON])
    assert _rows(out)
    (r0, r1), (c0, c1) = default_region((side, side))
    assert (r0, r1) == ((4, 5) if side == 8 else (13, 20)) and (c0, c1) == (r0, r1)
    region = set(region_positions((r0, r1), (c0, c1), (side, side)).tolist())
    run = paths.explanation_dir(model) / "codebook_level_token_2_5.0"
    for t in _rows(run / "optimized_tokens.csv"):
        a = np.array(t["original_indices"][1:-1].split(","), dtype=int)
        b = np.array(t["optimized_indices"][1:-1].split(","), dtype=int)
        assert a.size == side * side and set(np.flatnonzero(a != b).tolist()) <= region
    args = json.loads((run / "args.json").read_text())
    assert list(args["rows"]) == [r0, r1]
    assert (paths.figures_dir(model) / "codebook_level_token_2_5.0.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- units: nets, checkpoints, defaults

@pytest.mark.parametrize("side,dim", [(8, 8), (32, 256), (6, 16)])
def test_every_iem_builds_for_the_geometry(side, dim, tmp_path):
    for experiment, ids in MODEL_IDS.items():
        for m in ids:
            torch.manual_seed(0)
            net = build_model(experiment, m, 3, width=8, depth=1, code_dim=dim, grid=(side, side)).eval()
            assert net(torch.randn(2, dim, side, side)).shape == (2, 3), (experiment, m)
            path = tmp_path / f"{experiment}{m}" / "model.pth"
            save_iem(net, path, {"experiment": experiment, "model_id": m})
            back = load_iem(path, experiment, m)
            assert (back.grid, back.code_dim) == ((side, side), dim)
            for k, v in net.state_dict().items():
                assert torch.equal(v, back.state_dict()[k]), k


def test_paper_geometry_is_unchanged(tmp_path):
    """Defaults build the paper's nets: same keys and shapes as before, no new config.json keys, no pooling."""
    torch.manual_seed(0)
    a = build_model("vqgan", 1, 5, width=8)
    torch.manual_seed(0)
    b = build_model("vqgan", 1, 5, width=8, code_dim=256, grid=(16, 16))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.conv1_1.weight.shape[1] == 256 and build_model("vqgan", 4, 5, width=8, depth=1).pos_embed.shape[1] == 257
    save_iem(a, tmp_path / "m.pth", {"experiment": "vqgan"})
    assert set(json.loads((tmp_path / "config.json").read_text())) == {"experiment", "model_id", "num_classes",
                                                                      "width", "depth"}
    assert dataset_geometry(tmp_path) == (16, 16, 256)  # no dataset_info.json: the paper's geometry


def test_geometry_errors(tmp_path):
    with pytest.raises(CortexError, match="at least 4x4"):
        build_model("vqgan", 1, 3, width=8, grid=(2, 2))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"grid_size": [8, 8], "code_dim": 8}))
    (tmp_path / "train_embeddings.csv").write_text('filename,label,indices\n0_0.npy,0,"[1, 2, 3]"\n')
    with pytest.raises(CortexError, match="expected 64 token ids"):
        read_split(tmp_path, "train")
    np.save(tmp_path / "codebook.npy", np.zeros((4, 256), np.float32))
    with pytest.raises(CortexError, match=r"\(n_codes, 8\)"):
        load_codebook(tmp_path)


def test_geometry_read_off_the_weights_without_config(tmp_path):
    """No config.json: D from the first layer's input, the ViT's grid from pos_embed (h*w+1 rows, square)."""
    net = build_model("vqgan", 4, 3, width=8, depth=1, code_dim=8, grid=(12, 12))
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    back = load_iem(tmp_path / "vit.pth", "vqgan", 4)
    assert (back.grid, back.code_dim) == ((12, 12), 8)
    torch.save(build_model("vqgan", 3, 3, width=8, code_dim=8).state_dict(), tmp_path / "res.pth")
    assert load_iem(tmp_path / "res.pth", "vqgan", 3).code_dim == 8
