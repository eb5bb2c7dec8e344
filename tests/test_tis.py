"""cortex.attribution.tis: per-label TIS files, batch-size independence, resume after a kill, label shards."""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from cortex.attribution import scorer as S
from cortex.attribution import store, tis as T
from cortex.attribution.attributions import image_seed, token_scores
from cortex.data.formats import EmbeddingDataset
from cortex.utils import CortexError
from tests.helpers import compact_dataset

N_CLASSES, PER_LABEL = 4, 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(256, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, N_CLASSES)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return compact_dataset(tmp_path_factory.mktemp("ds") / "datasets", N_CLASSES, PER_LABEL)


def _read_all(out_dir):
    out = {}
    for p in sorted(out_dir.glob("label_*.csv")):
        names, labels, scores = store.read_tis_file(p)
        out[p.name] = (names, labels, scores)
    return out


def _run(data_dir, out_dir, **kw):
    ds = EmbeddingDataset(data_dir, "train")
    kw.setdefault("config", T.TISConfig(nsamples=3))
    return T.compute_tis(Tiny(), ds, out_dir, progress=False, **kw)


def test_files_and_values(data_dir, tmp_path):
    out = tmp_path / "tis"
    summary = _run(data_dir, out, batch_size=5)
    assert summary["scored"] == N_CLASSES * PER_LABEL
    files = _read_all(out)
    assert sorted(files) == [f"label_{k}.csv" for k in range(N_CLASSES)]
    assert not list(out.glob("*.partial"))
    with open(out / "label_2.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label", "contribution"]
    assert [r[0] for r in rows[1:]] == ["2_0.npy", "2_1.npy", "2_2.npy"] and rows[1][1] == "2"
    # equals the attribution called directly with the per-image seeds
    ds = EmbeddingDataset(data_dir, "train", labels=[2])
    x = torch.stack([ds[i][0] for i in range(3)])
    ref = token_scores("smoothgrad", Tiny(), x, torch.full((3,), 2), nsamples=3,
                       seeds=[image_seed(0, f"2_{j}.npy") for j in range(3)])
    np.testing.assert_allclose(files["label_2.csv"][2], ref.numpy(), rtol=1e-5, atol=1e-7)


def test_id_batches_score_like_embeddings(data_dir, tmp_path):
    """The loader shipping token ids (looked up on the device) writes the same TIS files as embeddings."""
    ids = EmbeddingDataset(data_dir, "train", return_ids=True)
    assert ids.return_ids
    T.compute_tis(Tiny(), ids, tmp_path / "ids", T.TISConfig(nsamples=3), batch_size=5, progress=False)
    _run(data_dir, tmp_path / "emb", batch_size=5)
    a, b = _read_all(tmp_path / "ids"), _read_all(tmp_path / "emb")
    assert a.keys() == b.keys() and len(a) == N_CLASSES
    for k in a:
        assert a[k][0] == b[k][0] and np.array_equal(a[k][2], b[k][2])


def test_files_and_compact_layouts_score_alike(tiny_root, tmp_path):
    """The authors' per-image files and the compact layout's id batches write identical TIS files."""
    for layout in ("files", "compact"):
        ds = EmbeddingDataset(tiny_root / "datasets", "test", layout=layout, return_ids=True)
        T.compute_tis(Tiny(), ds, tmp_path / layout, T.TISConfig(nsamples=2), batch_size=4, progress=False)
    a, b = _read_all(tmp_path / "files"), _read_all(tmp_path / "compact")
    assert a.keys() == b.keys() and len(a) == 3
    assert all(a[k][0] == b[k][0] and np.array_equal(a[k][2], b[k][2]) for k in a)


def test_baseline_is_part_of_the_config(data_dir, tmp_path):
    """Resuming occlusion with another baseline (codebook.npy appeared in between) is refused."""
    ds = EmbeddingDataset(data_dir, "train")
    cfg = T.TISConfig(attribution="occlusion")
    T.compute_tis(Tiny(), ds, tmp_path / "o", cfg, progress=False)
    with pytest.raises(CortexError, match="the baseline changed: codebook.npy was added"):
        T.compute_tis(Tiny(), ds, tmp_path / "o", cfg, codebook=ds.codebook, resume=True, progress=False)
    # a tis_config.json of an older version (no run identity) is refused too; --overwrite starts over
    stored = json.loads((tmp_path / "o" / "tis_config.json").read_text())
    stored.pop("run_id")
    (tmp_path / "o" / "tis_config.json").write_text(json.dumps(stored))
    with pytest.raises(CortexError, match="--overwrite"):
        T.compute_tis(Tiny(), ds, tmp_path / "o", cfg, resume=True, progress=False)
    T.compute_tis(Tiny(), ds, tmp_path / "o", cfg, codebook=ds.codebook, overwrite=True, progress=False)
    assert json.loads((tmp_path / "o" / "tis_config.json").read_text())["baseline"].startswith("codebook mean")


def test_batch_size_independent(data_dir, tmp_path):
    _run(data_dir, tmp_path / "a", batch_size=1)
    _run(data_dir, tmp_path / "b", batch_size=7)
    a, b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]
        np.testing.assert_allclose(a[k][2], b[k][2], rtol=1e-5, atol=1e-7)


def test_resume_after_interruption(data_dir, tmp_path, monkeypatch):
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    _run(data_dir, ref_dir, batch_size=2)
    calls = {"n": 0}
    real = S.token_scores

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # batches are per label ([0_0, 0_1], [0_2], [1_0, 1_1], [1_2], ...): killed during
            # the 4th batch, label 0 is done and label 1 has two rows
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "token_scores", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, out, batch_size=2)
    monkeypatch.setattr(S, "token_scores", real)
    assert (out / "label_0.csv").exists() and (out / "label_1.csv.partial").exists()
    assert not (out / "label_1.csv").exists()
    with open(out / "label_1.csv.partial", "a") as f:  # a torn row, as left by a kill mid-write
        f.write('1_9.npy,1,"[0.1, 0.2')
    summary = _run(data_dir, out, batch_size=2, resume=True)
    assert summary["skipped"] == PER_LABEL + 2 and summary["scored"] == N_CLASSES * PER_LABEL - PER_LABEL - 2
    got, ref = _read_all(out), _read_all(ref_dir)
    assert got.keys() == ref.keys() and not list(out.glob("*.partial"))
    for k in ref:
        assert got[k][0] == ref[k][0]  # exactly one row per image, in order
        np.testing.assert_allclose(got[k][2], ref[k][2], rtol=1e-5, atol=1e-7)
    # resuming a finished run does nothing; other settings are refused
    assert _run(data_dir, out, resume=True)["scored"] == 0
    with pytest.raises(CortexError, match="tis_config.json"):
        _run(data_dir, out, resume=True, config=T.TISConfig(nsamples=5))


def test_shards_equal_unsharded(data_dir, tmp_path):
    _run(data_dir, tmp_path / "all", batch_size=4)
    seen = {}
    for s in range(3):
        d = tmp_path / f"s{s}"
        summary = _run(data_dir, d, batch_size=4, shard=s, num_shards=3)
        assert summary["labels"] == list(range(N_CLASSES))[s::3]
        for p in d.glob("label_*.csv"):
            assert p.name not in seen, f"{p.name} written by shards {seen[p.name]} and {s}"
            seen[p.name] = s
            a, b = store.read_tis_file(p), store.read_tis_file(tmp_path / "all" / p.name)
            assert a[0] == b[0] and a[1] == b[1]
            np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-7)
    assert sorted(seen) == sorted(p.name for p in (tmp_path / "all").glob("label_*.csv"))


def test_resolve_shard_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert T.resolve_shard(None, None) == (2, 4)
    assert T.resolve_shard(0, 2) == (0, 2)
    with pytest.raises(CortexError):
        T.resolve_shard(4, 4)


def test_nan_score_names_the_file(data_dir, tmp_path):
    class NaNNet(Tiny):
        def forward(self, x):
            out = super().forward(x)
            return out * torch.where(x[:, :1, :1, :1].flatten(1) > -1e9, float("nan"), 1.0)

    ds = EmbeddingDataset(data_dir, "train", labels=[1])
    with pytest.raises(CortexError, match=r"1_0\.npy"):
        T.compute_tis(NaNNet(), ds, tmp_path / "nan", T.TISConfig(nsamples=1), progress=False)
    assert not (tmp_path / "nan" / "label_1.csv").exists()


def test_contribution_attributions_run(data_dir, tmp_path):
    cb = np.load(data_dir / "codebook.npy")
    for name in ("smoothgrad_x_input", "integrated_gradients", "occlusion"):
        ds = EmbeddingDataset(data_dir, "train", labels=[0])
        T.compute_tis(Tiny(), ds, tmp_path / name, T.TISConfig(attribution=name, nsamples=2, ig_steps=4),
                      codebook=cb, progress=False)
        names, labels, scores = store.read_tis_file(tmp_path / name / "label_0.csv")
        assert scores.shape == (PER_LABEL, 256) and np.isfinite(scores).all()


def test_read_tis_file_rejects_malformed_rows(tmp_path):
    from cortex.utils import format_list

    p = tmp_path / "label_0.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(store.TIS_HEADER)
        w.writerow(["0_0.npy", 0, format_list(np.arange(256) / 3)])
        w.writerow(["0_1.npy", 0, format_list(np.arange(255) / 3)])
    with pytest.raises(CortexError, match=r"label_0\.csv:3 \(image 0_1\.npy\): 255 scores"):
        store.read_tis_file(p)
