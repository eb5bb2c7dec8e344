"""cortex.data.formats: the authors' layout and the compact layout give identical tensors; bad input is named."""
import csv
import shutil

import numpy as np
import pytest
import torch

from cortex.data.formats import (EmbeddingDataset, embedding_to_ids, ids_to_embedding, image_path, load_codebook,
                                 load_token_indices, read_split)
from cortex.data.writer import DatasetWriter
from cortex.utils import CortexError, format_list, parse_float_list, parse_int_list


def test_layouts_identical(tiny_root):
    data = tiny_root / "datasets"
    for split in ("train", "validation", "test"):
        a = EmbeddingDataset(data, split, layout="files")
        b = EmbeddingDataset(data, split, layout="compact")
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            xa, ya, fa = a[i]
            xb, yb, fb = b[i]
            assert xa.shape == (256, 16, 16) and xa.dtype == torch.float32
            assert torch.equal(xa, xb) and ya == yb and fa == fb


def test_id_batches_are_looked_up_on_the_device(tiny_root):
    """Compact + return_ids: the loader ships (B, 256) int16 ids; lookup gives the files layout's batch exactly."""
    from torch.utils.data import DataLoader

    data = tiny_root / "datasets"
    files = EmbeddingDataset(data, "train", layout="files", return_ids=True)
    ids = EmbeddingDataset(data, "train", layout="compact", return_ids=True)
    assert not files.return_ids and ids.return_ids
    n = 0
    for (xa, ya, fa), (xb, yb, fb) in zip(DataLoader(files, batch_size=5), DataLoader(ids, batch_size=5)):
        assert xa.shape == (len(ya), 256, 16, 16) and xb.shape == (len(yb), 256) and xb.dtype == torch.int16
        assert torch.equal(files.lookup(xa), xa)  # embeddings pass through
        assert torch.equal(ids.lookup(xb), xa) and torch.equal(ya, yb) and fa == fb
        n += len(ya)
    assert n == len(files)
    half = ids.lookup(xb, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, xa.half())
    assert ids[0][0].tolist() == read_split(data, "train")[0].ids.tolist()
    with pytest.raises(CortexError, match="no codebook.npy"):
        files.lookup(xb)


def test_compact_edge_cases(tiny_root, tmp_path):
    """An empty label filter gives an empty dataset (as the files layout does); a negative id is named."""
    data = tiny_root / "datasets"
    for layout in ("files", "compact"):
        assert len(EmbeddingDataset(data, "train", layout=layout, labels=[99], return_ids=True)) == 0
    d = tmp_path / "neg"
    d.mkdir()
    _write_csv(d / "train_embeddings.csv", [["0_0.npy", "0", format_list(np.r_[-65530, np.zeros(255, int)])]])
    with pytest.raises(CortexError, match=r"train_embeddings.csv:2: negative token id -65530"):
        read_split(d, "train")


def test_auto_layout(tiny_root, tmp_path):
    """auto: compact when codebook.npy exists, else the per-image files; a missing codebook is named."""
    assert EmbeddingDataset(tiny_root / "datasets", "test").layout == "compact"
    d = tmp_path / "d"
    shutil.copytree(tiny_root / "datasets", d)
    (d / "codebook.npy").unlink()
    assert EmbeddingDataset(d, "test").layout == "files"
    with pytest.raises(CortexError, match=r"codebook not found: .*codebook.npy"):
        EmbeddingDataset(d, "test", layout="compact")
    with pytest.raises(CortexError, match="unknown layout 'zip'"):
        EmbeddingDataset(d, "test", layout="zip")
    shutil.rmtree(d / "test")
    with pytest.raises(CortexError, match="neither the per-image folder test/ nor codebook.npy"):
        EmbeddingDataset(d, "test")


def test_embedding_definition(tiny_root):
    """E[c, r, k] = codebook[ids[r*16 + k], c] and nearest-code decoding inverts it."""
    data = tiny_root / "datasets"
    cb = load_codebook(data)
    rec = read_split(data, "train")[0]
    emb = np.load(data / "train" / rec.filename)
    r, k, c = 5, 11, 17
    assert emb[c, r, k] == cb[rec.ids[r * 16 + k], c]
    ids = torch.from_numpy(rec.ids)[None]
    e = ids_to_embedding(torch.from_numpy(cb), ids)
    assert torch.equal(embedding_to_ids(torch.from_numpy(cb), e), ids)


def test_csv_format_and_caches(tiny_root):
    data = tiny_root / "datasets"
    with open(data / "train_embeddings.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label", "indices"]
    assert rows[1][0] == "0_0.npy" and rows[1][2].startswith("[") and len(parse_int_list(rows[1][2])) == 256
    raw = (data / "train_embeddings.csv").read_text().splitlines()[1]
    assert raw.startswith('0_0.npy,0,"[')  # the list literal is quoted, as the authors' files
    cache = load_token_indices(data, "train")
    assert cache["0_0.npy"] == parse_int_list(rows[1][2]).tolist()
    assert image_path(data, "2_13.npy") == data / "images" / "2" / "13.png"
    assert image_path(data, "0_0.npy").exists()


def test_token_cache_built_when_missing(tiny_root, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(tiny_root / "datasets", data, ignore=shutil.ignore_patterns("train", "val", "test", "images"))
    (data / "train_token_indices.pkl").unlink()
    cache = load_token_indices(data, "train")
    assert (data / "train_token_indices.pkl").exists() and len(cache) == 24


def test_list_literals_roundtrip():
    x = np.array([0.1, -2.5e-07, 3.0, 1e20])
    assert np.array_equal(parse_float_list(format_list(x)), x)
    assert parse_int_list(format_list(np.array([5, 16383]))).tolist() == [5, 16383]


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "indices"])
        w.writerows(rows)


@pytest.fixture
def small_dir(tmp_path):
    cb = np.random.default_rng(0).normal(size=(10, 256)).astype(np.float32)
    w = DatasetWriter(tmp_path, cb, layout="files")
    for i in range(2):
        w.add("train", f"0_{i}.npy", i, np.arange(256) % 10)
    w.close({"num_classes": 2})
    return tmp_path


def test_errors_name_the_problem(small_dir, tmp_path):
    with pytest.raises(CortexError, match="dataset folder not found"):
        read_split(tmp_path / "nope", "train")
    with pytest.raises(CortexError, match="validation_embeddings.csv"):
        read_split(small_dir, "validation")
    with pytest.raises(CortexError, match=r"label 1 is outside 0\.\.0"):
        read_split(small_dir, "train", num_classes=1)
    good = format_list(np.arange(256) % 10)
    _write_csv(small_dir / "test_embeddings.csv", [["0_0.npy", "x", good]])
    with pytest.raises(CortexError, match=r"test_embeddings.csv:2: label 'x' is not an integer"):
        read_split(small_dir, "test")
    _write_csv(small_dir / "test_embeddings.csv", [["0_0.npy", "0", "[1, 2, 3]"]])
    with pytest.raises(CortexError, match="expected 256 token ids, got 3"):
        read_split(small_dir, "test")
    (small_dir / "test_embeddings.csv").write_text("filename,label,indices\n0_0.npy,0,[1, 2]\n")
    with pytest.raises(CortexError, match="expected 3 fields"):
        read_split(small_dir, "test")
    np.save(small_dir / "train" / "0_1.npy", np.zeros((256, 8, 8), np.float32))
    with pytest.raises(CortexError, match=r"0_1.npy: embedding must have shape \(256, 16, 16\)"):
        EmbeddingDataset(small_dir, "train", layout="files")[1]
    (small_dir / "train" / "0_0.npy").unlink()
    with pytest.raises(CortexError, match="embedding file not found"):
        EmbeddingDataset(small_dir, "train", layout="files")[0]


def test_writer_resumes(tmp_path):
    cb = np.zeros((4, 256), np.float32)
    w = DatasetWriter(tmp_path, cb, layout="compact")
    w.add("train", "0_0.npy", 0, np.zeros(256, int))
    del w  # interrupted: no close(), no final CSV
    assert not (tmp_path / "train_embeddings.csv").exists()
    w = DatasetWriter(tmp_path, cb, layout="compact")
    assert w.done("train") == {"0_0.npy"}
    w.add("train", "0_1.npy", 0, np.ones(256, int))
    w.close()
    assert [r.filename for r in read_split(tmp_path, "train")] == ["0_0.npy", "0_1.npy"]

