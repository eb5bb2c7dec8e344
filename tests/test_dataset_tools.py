"""cortex.data.dataset_tools: compact_dataset.py (files -> codebook.npy) and merge_datasets.py (folders -> one)."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from cortex.data.formats import EmbeddingDataset, image_path, load_codebook, read_split
from cortex.data.writer import DatasetWriter
from cortex.utils import CortexError
from tests.helpers import run_script


def test_compact_dataset_from_the_authors_files(tiny_root, tmp_path):
    """compact_dataset.py rebuilds codebook.npy from per-image files; the layouts then load the same tensors."""
    root = tmp_path / "r"
    shutil.copytree(tiny_root / "datasets", root / "datasets")
    d = root / "datasets"
    original = load_codebook(d)
    (d / "codebook.npy").unlink()  # the authors' layout: CSVs + per-image files only
    run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--n_codes", "64", "--no_progress"])
    cb = load_codebook(d)
    used = np.unique(np.concatenate([r.ids for s in ("train", "validation", "test") for r in read_split(d, s)]))
    assert cb.shape == (64, 256)
    assert np.array_equal(cb[used], original[used])  # every code an image uses, bit for bit
    assert not cb[np.setdiff1d(np.arange(64), used)].any()  # the others are zeros
    info = json.loads((d / "dataset_info.json").read_text())
    assert info["codes_used"] == len(used) and info["codebook_source"] == "per-image files"
    for split in ("train", "test"):
        a, b = EmbeddingDataset(d, split, layout="files"), EmbeddingDataset(d, split, layout="compact")
        assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    with pytest.raises(CortexError, match="codebook.npy exists; pass --force"):
        run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--no_progress"])
    # a file that is not a codebook lookup of its ids is refused, naming file and position
    rec = read_split(d, "train")[1]
    emb = np.load(d / "train" / rec.filename)
    emb[:, 2, 3] += 0.5  # position 2*16 + 3
    np.save(d / "train" / rec.filename, emb)
    with pytest.raises(CortexError, match=rf"{rec.filename}: position 35 \(row 2, col 3\) differs"):
        run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--force", "--no_progress"])
    emb[:, 2, 3] -= 0.5
    emb[:, 2, 3] *= 1 + 1e-7  # float rounding (taming's straight-through z_q) is tolerated
    np.save(d / "train" / rec.filename, emb)
    run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--force", "--no_progress"])
    with pytest.raises(CortexError, match="differs"):
        run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--force", "--no_progress",
                                                            "--tolerance", "0"])
    emb[:, 2, 3] = np.nan  # a broken file is named, not averaged in (NaN passes any tolerance test)
    np.save(d / "train" / rec.filename, emb)
    with pytest.raises(CortexError, match=rf"{rec.filename}: position 35 \(row 2, col 3\) holds NaN"):
        run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--force", "--no_progress"])
    with pytest.raises(CortexError, match="token id 63 is outside the codebook: --n_codes gives 8 codes"):
        run_script("VQGAN_explanation/compact_dataset.py", ["--root", root, "--force", "--n_codes", "8"])


def _write(d, codebook, labels, rng, info, n=3):
    """A dataset folder like generate_dataset.py writes, both layouts + PNGs; returns the rows added."""
    w = DatasetWriter(d, codebook, layout="both")
    added = []
    for c in labels:
        for i in range(n):
            split = ("train", "validation", "test")[i % 3]
            ids = rng.integers(0, len(codebook), 256)
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            w.add(split, f"{c}_{i}.npy", c, ids, img)
            added.append((split, f"{c}_{i}.npy", c, ids, img))
    w.close(info)
    return added


def test_merge_datasets(tmp_path):
    """Two class-range folders merge into what one run over all classes writes (CSV bytes, pickles, tensors)."""
    rng = np.random.default_rng(0)
    cb = rng.normal(size=(32, 256)).astype(np.float32)
    base = {"source": "cin_transformer", "n_codes": 32, "top_k": 600}
    a = _write(tmp_path / "a", cb, [0, 1], rng, {**base, "classes": [0, 1], "num_classes": 2, "seed": 0})
    b = _write(tmp_path / "b", cb, [3, 2], rng, {**base, "classes": [2, 3], "num_classes": 4, "seed": 1})
    ref = DatasetWriter(tmp_path / "ref", cb, layout="both")
    for split, name, c, ids, img in b + a:
        ref.add(split, name, c, ids, img)
    ref.close({})
    root = tmp_path / "root"
    merge = ["--inputs", tmp_path / "a", tmp_path / "b", "--root", root, "--no_progress"]
    info = run_script("VQGAN_explanation/merge_datasets.py", merge)
    out = root / "datasets"
    for name in ("train_embeddings.csv", "validation_embeddings.csv", "test_embeddings.csv"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    for name in ("train_token_indices.pkl", "test_token_indices.pkl"):
        assert pickle.loads((out / name).read_bytes()) == pickle.loads((tmp_path / "ref" / name).read_bytes())
    assert np.array_equal(load_codebook(out), cb)
    for split in ("train", "validation", "test"):
        files, compact = EmbeddingDataset(out, split, layout="files"), EmbeddingDataset(out, split, layout="compact")
        assert len(files) == 4 and all(torch.equal(files[i][0], compact[i][0]) for i in range(4))
    src = tmp_path / "a" / "train" / "0_0.npy"
    assert os.path.samefile(src, out / "train" / "0_0.npy")  # hard-linked, not copied
    assert image_path(out, "3_2.npy").read_bytes() == image_path(tmp_path / "b", "3_2.npy").read_bytes()
    saved = json.loads((out / "dataset_info.json").read_text())
    assert saved == info
    assert info["classes"] == [0, 1, 2, 3] and info["num_classes"] == 4 and info["top_k"] == 600
    assert info["split_sizes"] == {"train": 4, "validation": 4, "test": 4}
    assert "seed" not in info and [m["seed"] for m in info["merged_from"]] == [0, 1]
    assert "codebook_max_deviation" not in info
    # the same merge again (e.g. after a kill) finishes/keeps it; another dataset is not overwritten by accident
    (out / "test_embeddings.csv").unlink()
    assert run_script("VQGAN_explanation/merge_datasets.py", merge) == info
    assert (out / "test_embeddings.csv").read_bytes() == (tmp_path / "ref" / "test_embeddings.csv").read_bytes()
    other = ["--inputs", tmp_path / "a", tmp_path / "b", "--data_dir", tmp_path / "ref", "--no_progress"]
    with pytest.raises(CortexError, match="already holds another dataset; pass --force"):
        run_script("VQGAN_explanation/merge_datasets.py", other)
    run_script("VQGAN_explanation/merge_datasets.py", [*other, "--force"])
    # --force into a dataset with a codebook, from inputs without one: the old codebook must not survive
    for x in ("a", "b"):
        shutil.copytree(tmp_path / x, tmp_path / f"{x}_files", ignore=shutil.ignore_patterns("codebook.npy"))
    _write(tmp_path / "old", rng.normal(size=(32, 256)).astype(np.float32), [5], rng, {})
    shutil.copytree(tmp_path / "old", tmp_path / "old_files", ignore=shutil.ignore_patterns("codebook.npy"))
    # a merge that stops on a differing file leaves the old dataset as it was (its codebook included)
    _write(tmp_path / "clash", cb, [5], rng, {})  # 5_0.npy again, other content, no codebook
    (tmp_path / "clash" / "codebook.npy").unlink()
    with pytest.raises(CortexError, match=r"train/5_0.npy exists and differs"):
        run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a_files", tmp_path / "clash",
                                                           "--data_dir", tmp_path / "old", "--force", "--no_progress"])
    assert (tmp_path / "old" / "codebook.npy").exists()
    assert [r.filename for r in read_split(tmp_path / "old", "train")] == ["5_0.npy"]
    run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a_files", tmp_path / "b_files",
                                                       "--data_dir", tmp_path / "old", "--force", "--no_progress"])
    assert not (tmp_path / "old" / "codebook.npy").exists()
    merged = EmbeddingDataset(tmp_path / "old", "train")
    ref_train = EmbeddingDataset(out, "train", layout="files")
    assert merged.layout == "files" and len(merged) == 4
    assert all(torch.equal(merged[i][0], ref_train[i][0]) for i in range(4))
    # some inputs with a codebook, some without: the others' files are checked against it
    run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "b_files",
                                                       "--data_dir", tmp_path / "mixed", "--no_progress"])
    assert (tmp_path / "mixed" / "train_embeddings.csv").read_bytes() == (out / "train_embeddings.csv").read_bytes()
    assert np.array_equal(load_codebook(tmp_path / "mixed"), cb)
    other_vqgan = r"cannot merge .*old_files with .*a \(another VQGAN\?\): .*5_0.npy: position 0 .* reference codebook"
    with pytest.raises(CortexError, match=other_vqgan):
        run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "old_files",
                                                           "--data_dir", tmp_path / "mixed2", "--no_progress"])
    # the largest recorded deviation of any input is kept at the top level (EmbeddingDataset's note reads it)
    info_a = json.loads((tmp_path / "a" / "dataset_info.json").read_text())
    (tmp_path / "a" / "dataset_info.json").write_text(json.dumps({**info_a, "codebook_max_deviation": 1e-7}))
    dev = run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "b",
                                                             "--data_dir", tmp_path / "dev", "--no_progress"])
    assert dev["codebook_max_deviation"] == 1e-7
    run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "b", "--copy",
                                                       "--data_dir", tmp_path / "c", "--no_progress"])
    assert not os.path.samefile(src, tmp_path / "c" / "train" / "0_0.npy")
    assert (tmp_path / "c" / "train_embeddings.csv").read_bytes() == (out / "train_embeddings.csv").read_bytes()


def test_merge_refuses_what_cannot_be_merged(tmp_path):
    rng = np.random.default_rng(1)
    cb = rng.normal(size=(16, 256)).astype(np.float32)
    _write(tmp_path / "a", cb, [0], rng, {})
    _write(tmp_path / "b", cb, [0], rng, {})
    _write(tmp_path / "c", cb + 1, [1], rng, {})
    with pytest.raises(CortexError, match=r"0_0.npy is in both .*a and .*b"):
        run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "b",
                                                           "--data_dir", tmp_path / "o1"])
    with pytest.raises(CortexError, match=r"c/codebook.npy differs from .*a/codebook.npy"):
        run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "c",
                                                           "--data_dir", tmp_path / "o2"])
    with pytest.raises(CortexError, match="input dataset folder not found"):
        run_script("VQGAN_explanation/merge_datasets.py", ["--inputs", tmp_path / "a", tmp_path / "zz",
                                                           "--data_dir", tmp_path / "o3"])
    assert not (tmp_path / "o1" / "train_embeddings.csv").exists()  # nothing half-merged to trust
