"""Real-VQGAN path without downloads (SPEC §6): the taming shim, the (config, ckpt) loader, new_vqgan's
distances, and both real sources (cin_transformer sampling, image-folder encoding) on a tiny randomly
initialised taming VQModel (16x16 token grid at 32 px, 256-d codes) + a one-layer Net2NetTransformer,
each saved to a YAML + Lightning-style checkpoint by the test itself."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("taming")

from cortex.data import real_data  # noqa: E402
from cortex.data.formats import EmbeddingDataset, image_path, load_codebook, read_split  # noqa: E402
from cortex.data.writer import DatasetWriter  # noqa: E402
from cortex.data.taming_compat import import_taming, load_taming_model, top_k_top_p_filtering  # noqa: E402
from cortex.utils import CortexError  # noqa: E402
from tests.helpers import run_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_EMBED = 64
DDCONFIG = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # f2: 32 px -> 16x16
LPIPS_LOSS = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
              "params": {"disc_start": 0, "disc_weight": 0.8, "codebook_weight": 1.0}}  # would download VGG


def vq_params(**extra):
    return {"embed_dim": 256, "n_embed": N_EMBED, "ddconfig": DDCONFIG, "lossconfig": LPIPS_LOSS, **extra}


def write_yaml(path: Path, cfg: dict) -> Path:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Configs + checkpoints of a tiny VQGAN and a tiny class-conditional transformer."""
    import_taming()
    from taming.main import instantiate_from_config

    d = tmp_path_factory.mktemp("taming")
    torch.manual_seed(0)
    vq_cfg = {"model": {"target": "taming.models.vqgan.VQModel", "params": vq_params()}}
    build = {"target": "taming.models.vqgan.VQModel",
             "params": {**vq_params(), "lossconfig": {"target": "torch.nn.Identity"}}}
    vq = instantiate_from_config(build)
    with torch.no_grad():  # spread the codes so that images use many of them
        vq.quantize.embedding.weight.normal_()
    sd = dict(vq.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)  # as in real VQGAN checkpoints
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 10}, d / "vq.ckpt")
    write_yaml(d / "vq.yaml", vq_cfg)

    tr_params = {
        "first_stage_key": "image", "cond_stage_key": "class_label",
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                               "params": {"vocab_size": N_EMBED, "block_size": 257, "n_layer": 1, "n_head": 2,
                                          "n_embd": 32}},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                               "params": vq_params(ckpt_path="/authors/abs/path/vqgan/last.ckpt",
                                                   lossconfig={"target": "taming.modules.losses.DummyLoss"})},
        "cond_stage_config": {"target": "taming.modules.util.Labelator", "params": {"n_classes": 5}},
    }
    tr_build = {"target": "taming.models.cond_transformer.Net2NetTransformer",
                "params": {**tr_params, "first_stage_config": build}}
    tr = instantiate_from_config(tr_build)
    tr.first_stage_model.load_state_dict(vq.state_dict())
    with torch.no_grad():
        tr.transformer.head.weight.mul_(50)  # peaky logits, so top-k / top-p matter
    torch.save({"state_dict": tr.state_dict()}, d / "tr.ckpt")
    write_yaml(d / "tr.yaml", {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer",
                                         "params": tr_params}})
    return d


def real_args(tiny, **kw):
    p = argparse.ArgumentParser()
    real_data.add_real_source_args(p)
    a = p.parse_args([])
    a.seed, a.source, a.layout = 0, "cin_transformer", "both"
    a.transformer_config, a.transformer_ckpt = str(tiny / "tr.yaml"), str(tiny / "tr.ckpt")
    a.vqgan_config, a.vqgan_ckpt = str(tiny / "vq.yaml"), str(tiny / "vq.ckpt")
    a.classes, a.images_per_class, a.batch_size, a.splits = "1,3", 3, 2, "0.34,0.33,0.33"
    a.top_k, a.top_p = 20, 0.95
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def check_dataset(data_dir: Path, model, n_codes=N_EMBED):
    """Embeddings == codebook[ids] in both layouts; decoded ids reproduce the PNGs; CSVs parse."""
    cb = load_codebook(data_dir)
    assert cb.shape == (n_codes, 256)
    np.testing.assert_array_equal(cb, real_data.codebook_of(model))
    total = 0
    for split in ("train", "validation", "test"):
        if not (data_dir / f"{split}_embeddings.csv").exists():
            continue
        recs = read_split(data_dir, split)
        files, compact = EmbeddingDataset(data_dir, split, layout="files"), EmbeddingDataset(data_dir, split, layout="compact")
        ids = torch.from_numpy(np.stack([r.ids for r in recs]))
        assert ids.shape[1] == 256 and int(ids.max()) < n_codes
        ref = torch.from_numpy(cb)[ids].transpose(1, 2).reshape(-1, 256, 16, 16)
        for i in range(len(recs)):
            emb_f, label, name = files[i]
            emb_c = compact[i][0]
            assert emb_f.shape == (256, 16, 16) and emb_f.dtype == torch.float32
            torch.testing.assert_close(emb_f, ref[i], rtol=0, atol=0)
            torch.testing.assert_close(emb_c, ref[i], rtol=0, atol=0)
        png = np.stack([np.asarray(Image.open(image_path(data_dir, r.filename))) for r in recs])
        dec = real_data.to_uint8(real_data.decode_ids(model, ids))
        assert png.shape == dec.shape == (len(recs), 32, 32, 3)
        assert np.abs(png.astype(int) - dec.astype(int)).max() <= 1
        total += len(recs)
    return total


# ----------------------------------------------------------------------------- shim and loader

def test_shim_is_idempotent_and_leaves_no_fake_transformers():
    assert import_taming() is import_taming()
    assert "transformers" not in sys.modules or hasattr(sys.modules["transformers"], "__file__")
    import taming.modules.transformer.mingpt as mingpt

    assert mingpt.top_k_top_p_filtering is top_k_top_p_filtering
    from pytorch_lightning.utilities.distributed import rank_zero_only  # noqa: F401


def test_top_k_top_p_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(top_k_top_p_filtering(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    p = torch.softmax(logits, -1)[0]  # 0.636, 0.234, ...: top_p 0.7 keeps the first two (crossing included)
    assert p[0] < 0.7 < p[0] + p[1]
    out = top_k_top_p_filtering(logits, top_k=0, top_p=0.7)
    assert torch.isinf(out).tolist() == [[False, False, True, True, True]]
    assert torch.equal(top_k_top_p_filtering(logits, top_k=None, top_p=None), logits)
    assert not torch.isinf(logits).any()  # input untouched


def test_loader_lightning_and_plain_state_dict(tiny, tmp_path):
    vq = load_taming_model(tiny / "vq.yaml", tiny / "vq.ckpt")  # LPIPS loss replaced: no download
    assert isinstance(vq.loss, torch.nn.Identity) and not vq.training
    ref = torch.load(tiny / "vq.ckpt", weights_only=True)["state_dict"]
    for k, v in vq.state_dict().items():
        assert torch.equal(v, ref[k]), k
    torch.save(vq.state_dict(), tmp_path / "plain.pth")
    vq2 = load_taming_model(tiny / "vq.yaml", tmp_path / "plain.pth")
    assert torch.equal(vq2.quantize.embedding.weight, vq.quantize.embedding.weight)
    tr = load_taming_model(tiny / "tr.yaml", tiny / "tr.ckpt")  # nested absolute ckpt_path ignored
    assert torch.equal(tr.first_stage_model.quantize.embedding.weight, vq.quantize.embedding.weight)


def test_loader_errors(tiny, tmp_path):
    with pytest.raises(CortexError, match="checkpoint not found: .*nope.ckpt"):
        load_taming_model(tiny / "vq.yaml", tmp_path / "nope.ckpt")
    with pytest.raises(CortexError, match="taming config not found"):
        load_taming_model(tmp_path / "nope.yaml", tiny / "vq.ckpt")
    with pytest.raises(CortexError, match=r"vq\.ckpt: the checkpoint does not fit the model built from .*tr\.yaml: "
                                          r"\d+ missing keys: first_stage_model\..*unexpected keys: decoder\."):
        load_taming_model(tiny / "tr.yaml", tiny / "vq.ckpt")
    vq = load_taming_model(tiny / "vq.yaml", tiny / "tr.ckpt")  # the VQGAN part of a transformer checkpoint
    assert vq.quantize.embedding.weight.shape == (N_EMBED, 256)
    sd = torch.load(tiny / "vq.ckpt", weights_only=True)["state_dict"]
    sd["quantize.embedding.weight"] = torch.zeros(N_EMBED + 1, 256)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(CortexError, match=r"shape mismatches.*quantize\.embedding\.weight \(65, 256\) vs \(64, 256\)"):
        load_taming_model(tiny / "vq.yaml", tmp_path / "bad.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CortexError, match="junk.ckpt"):
        load_taming_model(tiny / "vq.yaml", tmp_path / "junk.ckpt")
    with pytest.raises(CortexError, match="needs --transformer_config"):
        real_data.load_vq_for_dataset(real_args(tiny, transformer_config=None), "cpu")


@pytest.mark.parametrize("target", ["cortex.data.taming_compat.DistanceVQModel", "new_vqgan.VQModel"])
def test_distance_vqmodel(tiny, tmp_path, monkeypatch, target):
    monkeypatch.syspath_prepend(str(REPO / "VQGAN_explanation"))
    cfg = write_yaml(tmp_path / "d.yaml", {"model": {"target": target, "params": vq_params()}})
    m = load_taming_model(cfg, tiny / "vq.ckpt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    quant, loss, info, dist = m.encode(x)
    assert quant.shape == (2, 256, 16, 16) and dist.shape == (2, 256, N_EMBED)
    assert torch.equal(dist.argmin(-1).reshape(-1), info[2].reshape(-1))
    assert torch.equal(real_data.encode_ids(m, x), info[2].reshape(2, 256))
    z = quant.flatten(2).transpose(1, 2)  # distances are squared L2 to the codes
    torch.testing.assert_close(dist.gather(-1, info[2].reshape(2, 256, 1))[..., 0],
                               ((m.quant_conv(m.encoder(x)).flatten(2).transpose(1, 2) - z) ** 2).sum(-1),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- sources

def test_cin_transformer_source_deterministic_and_resumable(tiny, tmp_path):
    args = real_args(tiny)
    model, codebook = real_data.load_vq_for_dataset(args, "cpu")
    full = tmp_path / "full"
    info = real_data.generate_real(args, full, "cpu", model=model)  # folder: writer built and closed here
    assert info["source"] == "cin_transformer" and info["num_classes"] == 4 and info["classes"] == [1, 3]
    assert info["n_codes"] == N_EMBED and info["image_size"] == 32
    assert info["split_sizes"] == {"train": 2, "validation": 2, "test": 2}
    assert json.loads((full / "dataset_info.json").read_text())["top_k"] == 20
    assert check_dataset(full, model) == 6
    names = {s: [r.filename for r in read_split(full, s)] for s in ("train", "validation", "test")}
    assert names == {"train": ["1_0.npy", "3_0.npy"], "validation": ["1_1.npy", "3_1.npy"],
                     "test": ["1_2.npy", "3_2.npy"]}
    assert len({tuple(r.ids) for s in names for r in read_split(full, s)}) == 6  # distinct samples
    # interrupted run (class 1 only, never closed), then resumed with both classes: same dataset
    part = tmp_path / "part"
    w = DatasetWriter(part, codebook, "both")
    real_data.generate_real(real_args(tiny, classes="1"), w, "cpu", model=model)
    w._files.clear()  # "crash": the partial CSVs stay
    w2 = DatasetWriter(part, codebook, "both")
    assert w2.done("train") == {"1_0.npy"}
    w2.close(real_data.generate_real(args, w2, "cpu", model=model))
    for s in names:
        assert (part / f"{s}_embeddings.csv").read_text() == (full / f"{s}_embeddings.csv").read_text()


def _make_folder(root: Path, rng) -> None:
    for name, sizes in {"cat": [(40, 50), (32, 32), (64, 36)], "dog": [(33, 47), (50, 40)]}.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).convert("RGBA" if i == 1 else "RGB").save(root / name / f"img{i}.png")


def test_images_source_folders_csv_and_neutral_set(tiny, tmp_path):
    rng = np.random.default_rng(0)
    _make_folder(tmp_path / "pics", rng)
    args = real_args(tiny, source="images", image_dir=str(tmp_path / "pics"), transformer_config=None,
                     splits="0.5,0,0.5")
    model, codebook = real_data.load_vq_for_dataset(args, "cpu")
    w = DatasetWriter(tmp_path / "ds", codebook, "both")
    info = real_data.generate_real(args, w, "cpu", model=model)
    w.close(info)
    assert info["num_classes"] == 2 and info["class_names"] == ["cat", "dog"] and info["resolution"] == 32
    assert check_dataset(tmp_path / "ds", model) == 5
    assert info["split_sizes"] == {"train": 3, "validation": 0, "test": 2}  # cat 2+1, dog 1+1
    with open(tmp_path / "ds" / "image_sources.csv", newline="") as f:
        src = {r["filename"]: r for r in csv.DictReader(f)}
    assert src["0_1.npy"]["source"] == "cat/img1.png" and src["1_0.npy"]["label"] == "1"
    # the saved ids are the encoding of the resized, center-cropped picture
    rec = {r.filename: r for s in ("train", "test") for r in read_split(tmp_path / "ds", s)}
    x = real_data.load_image(tmp_path / "pics" / "cat" / "img2.png", 32)[None]
    assert np.array_equal(real_data.encode_ids(model, x)[0].numpy(), rec["0_2.npy"].ids)
    # labels from a CSV with a split column
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filename", "label", "split"], ["cat/img0.png", 4, "val"],
                                 ["dog/img1.png", 2, "test"], ["dog/img0.png", 2, "train"]])
    args2 = real_args(tiny, source="images", image_dir=str(tmp_path / "pics"),
                      labels_csv=str(tmp_path / "labels.csv"), transformer_config=None)
    info2 = real_data.generate_real(args2, tmp_path / "ds2", "cpu", model=model)
    assert info2["num_classes"] == 5
    assert [r.filename for r in read_split(tmp_path / "ds2", "validation")] == ["4_0.npy"]
    assert [r.filename for r in read_split(tmp_path / "ds2", "test")] == ["2_1.npy"]
    # DALL-E-mini neutral set
    out = real_data.encode_neutral_set(args, tmp_path / "info" / "results_none.csv", model, "cpu",
                                       image_dir=tmp_path / "pics" / "dog")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["filename"] for r in rows] == ["img0.png", "img1.png"]
    assert rows[0]["indices"] == "[" + ", ".join(map(str, rec["1_0.npy"].ids.tolist())) + "]"
    # compact_dataset.py with the VQGAN: its full codebook, every per-image file checked against it
    (tmp_path / "ds" / "codebook.npy").unlink()
    run_script("VQGAN_explanation/compact_dataset.py", ["--data_dir", tmp_path / "ds", "--no_progress",
                                                        "--vqgan_config", tiny / "vq.yaml",
                                                        "--vqgan_ckpt", tiny / "vq.ckpt"])
    np.testing.assert_array_equal(load_codebook(tmp_path / "ds"), codebook)
    assert json.loads((tmp_path / "ds" / "dataset_info.json").read_text())["codebook_source"] == "vqgan checkpoint"
    with pytest.raises(CortexError, match="--vqgan_config and --vqgan_ckpt go together"):
        run_script("VQGAN_explanation/compact_dataset.py", ["--data_dir", tmp_path / "ds", "--force",
                                                            "--vqgan_ckpt", tiny / "vq.ckpt"])
    # another resolution gives another token grid (issue 15): 64 px -> 32x32 tokens, recorded in dataset_info.json
    info = real_data.generate_real(real_args(tiny, source="images", image_dir=str(tmp_path / "pics"),
                                             resolution=64), tmp_path / "ds3", "cpu", model=model)
    assert info["grid_size"] == [32, 32] and info["code_dim"] == 256 and info["image_size_hw"] == [64, 64]
    assert {r.ids.size for r in read_split(tmp_path / "ds3", "train")} == {32 * 32}
