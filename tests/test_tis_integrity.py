"""TIS integrity (locks, run identity, resume without repeats), the authors' exact noise stream,
near-chance warning, memory budget / chunking, --fast (BatchNorm folding)."""
import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from cortex.attribution import attributions as A, store, tis as T
from cortex.data.formats import EmbeddingDataset
from cortex.utils import CortexError
from tests.helpers import compact_dataset

N_CLASSES, PER_LABEL = 3, 3


class Tiny(nn.Module):
    """conv -> BN -> tanh -> mean -> fc; seeded weights, BN with non-trivial running statistics."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(256, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, N_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.bn.running_mean.copy_(torch.randn(6, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
        self.delay = delay

    def forward(self, x):
        if self.delay:
            import time
            time.sleep(self.delay)
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make_data(d, n_classes=N_CLASSES, per_label=PER_LABEL):
    return compact_dataset(d, n_classes, per_label)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ds") / "datasets")


def _run(data_dir, out, model=None, **kw):
    kw.setdefault("config", T.TISConfig(nsamples=2, max_copies_per_pass=0))
    return T.compute_tis(model or Tiny(), EmbeddingDataset(data_dir, "train"), out, progress=False, **kw)


def _names(path):
    with open(path, newline="") as f:
        return [r[0] for r in list(csv.reader(f))[1:]]


# ----------------------------------------------------------------------------- 12.1 locks

WORKER = textwrap.dedent('''
    import os, sys, json
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]  # this module, and the repo for tests.helpers
    from test_tis_integrity import Tiny, _run
    from pathlib import Path
    shard, num = int(sys.argv[1]), int(sys.argv[2])
    s = _run(Path({data!r}), Path({out!r}), model=Tiny(delay=0.3), shard=shard, num_shards=num, resume=True)
    print(json.dumps({{"busy": s["busy"], "scored": s["scored"]}}))
''')


def _spawn(tmp_path, data_dir, out, shard, num):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(__import__("pathlib").Path(__file__).parent), data=str(data_dir),
                                    out=str(out)))
    return subprocess.Popen([sys.executable, str(script), str(shard), str(num)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_same_run_never_duplicate(data_dir, tmp_path):
    """The same run started twice into one folder: each label is written by one process, once."""
    out = tmp_path / "tis"
    p1, p2 = _spawn(tmp_path, data_dir, out, 0, 1), _spawn(tmp_path, data_dir, out, 0, 1)
    r1, r2 = _result(p1), _result(p2)
    for k in range(N_CLASSES):
        names = _names(out / f"label_{k}.csv")
        assert sorted(names) == [f"{k}_{j}.npy" for j in range(PER_LABEL)]  # each image exactly once
    assert r1["scored"] + r2["scored"] >= N_CLASSES * PER_LABEL
    assert not list(out.glob("*.partial"))
    runs = json.loads((out / "runs.json").read_text())
    assert sorted(runs) == [str(k) for k in range(N_CLASSES)] and len(set(runs.values())) == 1


def test_held_label_is_refused_and_shards_run_side_by_side(data_dir, tmp_path):
    out = tmp_path / "tis"
    out.mkdir()
    fd = store.try_lock(store.lock_file(out, 1))  # another writer holds label 1
    assert fd is not None
    s = _run(data_dir, out)
    assert s["busy"] == [1] and not (out / "label_1.csv").exists() and (out / "label_0.csv").exists()
    store.unlock(fd)
    assert _run(data_dir, out, resume=True)["scored"] == PER_LABEL
    # two shards of one run, side by side: nothing refused
    out2 = tmp_path / "sharded"
    p0, p1 = _spawn(tmp_path, data_dir, out2, 0, 2), _spawn(tmp_path, data_dir, out2, 1, 2)
    r0, r1 = _result(p0), _result(p1)
    assert r0["busy"] == [] and r1["busy"] == [] and r0["scored"] + r1["scored"] == N_CLASSES * PER_LABEL
    assert sorted(p.name for p in out2.glob("label_*.csv")) == [f"label_{k}.csv" for k in range(N_CLASSES)]


def test_resume_removes_repeated_rows(data_dir, tmp_path):
    """Files with a name twice (old two-writer runs): --resume keeps one row per image."""
    out = tmp_path / "tis"
    _run(data_dir, out)
    ref = _names(out / "label_0.csv")
    lines = (out / "label_0.csv").read_text().splitlines(keepends=True)
    (out / "label_0.csv").write_text("".join(lines + lines[1:]))          # final with every row twice
    lines = (out / "label_1.csv").read_text().splitlines(keepends=True)
    (out / "label_1.csv").unlink()
    (out / "label_1.csv.partial").write_text("".join(lines[:2] + lines[1:2]))  # partial, one row twice
    s = _run(data_dir, out, resume=True)
    assert s["scored"] == PER_LABEL - 1
    assert _names(out / "label_0.csv") == ref
    assert _names(out / "label_1.csv") == [f"1_{j}.npy" for j in range(PER_LABEL)]


# ----------------------------------------------------------------------------- 12.4 run identity

def test_resume_refuses_files_of_another_run(data_dir, tmp_path):
    out = tmp_path / "tis"
    _run(data_dir, out, run_info={"checkpoint": {"sha256": "aaa"}})
    cfg = json.loads((out / "tis_config.json").read_text())
    assert cfg["checkpoint"]["sha256"] == "aaa" and cfg["nsamples"] == 2 and "run_id" in cfg
    side = json.loads((out / "label_0.csv.run.json").read_text())
    assert side["run_id"] == cfg["run_id"]
    # retrained IEM (other checkpoint hash): --resume refused, the message says what differs and what to do
    with pytest.raises(CortexError, match=r"(?s)checkpoint.*--overwrite"):
        _run(data_dir, out, resume=True, run_info={"checkpoint": {"sha256": "bbb"}})
    # a fresh run without --overwrite is refused too
    with pytest.raises(CortexError, match="--overwrite"):
        _run(data_dir, out, run_info={"checkpoint": {"sha256": "bbb"}})
    # label files of another run are refused even when tis_config.json was replaced (killed mix of two runs)
    (out / "tis_config.json").unlink()
    with pytest.raises(CortexError, match=r"(?s)label_0.csv.*nsamples"):
        _run(data_dir, out, resume=True, config=T.TISConfig(nsamples=3), run_info={"checkpoint": {"sha256": "aaa"}})
    # a partial file of another run as well
    (out / "label_2.csv").rename(out / "label_2.csv.partial")
    with pytest.raises(CortexError, match="label_2.csv.partial"):
        _run(data_dir, out, resume=True, run_info={"checkpoint": {"sha256": "ccc"}})
    # --overwrite starts over: every label from the new run
    s = _run(data_dir, out, overwrite=True, run_info={"checkpoint": {"sha256": "bbb"}})
    assert s["scored"] == N_CLASSES * PER_LABEL
    rid = json.loads((out / "tis_config.json").read_text())["run_id"]
    assert {json.loads((out / f"label_{k}.csv.run.json").read_text())["run_id"] for k in range(N_CLASSES)} == {rid}


def test_overwrite_removes_labels_the_dataset_lacks(data_dir, tmp_path):
    """A results folder of an earlier, larger world: --overwrite leaves only this dataset's labels."""
    import shutil

    out = tmp_path / "tis"
    _run(data_dir, out, run_info={"checkpoint": {"sha256": "aaa"}})
    for k, x in ((N_CLASSES, ""), (N_CLASSES, ".run.json"), (N_CLASSES + 1, ".partial")):  # an earlier world's
        shutil.copy(out / f"label_0.csv{x.replace('.partial', '')}", out / f"label_{k}.csv{x}")
    runs = json.loads((out / "runs.json").read_text())
    (out / "runs.json").write_text(json.dumps({**runs, str(N_CLASSES): "old"}))
    s = _run(data_dir, out, overwrite=True, run_info={"checkpoint": {"sha256": "bbb"}})
    assert s["scored"] == N_CLASSES * PER_LABEL
    left = sorted(p.name for p in out.glob("label_*.csv*") if not p.name.endswith(".lock"))
    assert left == sorted(f"label_{k}.csv{x}" for k in range(N_CLASSES) for x in ("", ".run.json"))
    assert sorted(json.loads((out / "runs.json").read_text())) == [str(k) for k in range(N_CLASSES)]


def test_shards_write_identical_config_or_refuse(data_dir, tmp_path):
    out = tmp_path / "tis"
    _run(data_dir, out, shard=0, num_shards=2)
    before = (out / "tis_config.json").read_bytes()
    with pytest.raises(CortexError, match="tis_config.json"):  # a shard started with other settings
        _run(data_dir, out, shard=1, num_shards=2, config=T.TISConfig(nsamples=4))
    assert (out / "tis_config.json").read_bytes() == before and not (out / "label_1.csv").exists()
    _run(data_dir, out, shard=1, num_shards=2)
    assert (out / "tis_config.json").read_bytes() == before


# ----------------------------------------------------------------------------- near chance

def test_warn_if_near_chance(tmp_path, capsys):
    with pytest.warns(UserWarning, match="near chance"):
        assert T.warn_if_near_chance(0.12, 1000, "test") is True
    assert T.warn_if_near_chance(40.0, 10, "test") is False
    ckpt = tmp_path / "ClassificationNet1" / "best_model.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    (ckpt.parent / "config.json").write_text(json.dumps({"val_acc": 55.0}))
    res = tmp_path / "testing_results.csv"
    res.write_text("Accuracy\n52.0\n")
    with pytest.warns(UserWarning):
        warned = T.check_iem_not_near_chance(ckpt, res, 2)
    assert len(warned) == 2 and "WARNING" in capsys.readouterr().err
    assert T.check_iem_not_near_chance(ckpt, res, 100) == []


# ----------------------------------------------------------------------------- 13.4 the authors' stream

def _authors_reference(model, ds, batch_size, nsamples, seed, stdev_spread=0.2):
    """The authors' loop re-implemented from their description: global generator seeded once, per batch
    (split order) per draw torch.normal over the whole batch, one autograd.grad per sample
    (create_graph=True), float64 sum, channel max."""
    torch.manual_seed(seed)
    out = {}
    xs = [ds[i][0] for i in range(len(ds))]
    for start in range(0, len(ds), batch_size):
        inputs = torch.stack(xs[start:start + batch_size])
        labels = torch.tensor(ds.labels[start:start + batch_size])
        stdev = stdev_spread * (torch.max(inputs) - torch.min(inputs))
        total = torch.zeros_like(inputs, dtype=torch.float64)
        for _ in range(nsamples):
            noisy = inputs + torch.normal(mean=0, std=stdev, size=inputs.shape)
            noisy.requires_grad = True
            outputs = model(noisy)
            grads = []
            for i, index in enumerate(labels):
                go = torch.zeros_like(outputs)
                go[i, index] = 1.0
                grads.append(torch.autograd.grad(outputs, noisy, grad_outputs=go, create_graph=True)[0][i][None])
            total += torch.cat(grads)
        g = (total / nsamples).detach().numpy()
        for j in range(len(labels)):
            out[ds.records[start + j].filename] = g[j].max(axis=0).flatten()
    return out


def test_authors_stream_reproduced(tmp_path):
    data = make_data(tmp_path / "ds5", n_classes=2, per_label=3)  # 6 images; use 5 (labels 0,0,0,1,1)
    ds = EmbeddingDataset(data, "train")
    ds.records, ds.labels = ds.records[:5], ds.labels[:5]
    model = Tiny().eval()
    ref = _authors_reference(model, ds, batch_size=2, nsamples=3, seed=7)
    out = tmp_path / "tis"
    cfg = T.TISConfig(nsamples=3, noise_scope="authors", seed=7, max_copies_per_pass=0)
    T.compute_tis(Tiny(), ds, out, cfg, batch_size=2, progress=False)
    got = {}
    for k in (0, 1):
        names, _, scores = store.read_tis_file(out / f"label_{k}.csv")
        got.update(zip(names, scores))
    assert sorted(got) == sorted(ref)
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-6, atol=1e-12)
    exact = all(np.array_equal(got[n], ref[n]) for n in ref)
    print("authors stream bit-exact:", exact)
    # resume after losing label 1 (its batch is shared with label 0): the replayed stream gives the same rows
    before = (out / "label_1.csv").read_text()
    (out / "label_1.csv").unlink()
    T.compute_tis(Tiny(), ds, out, cfg, batch_size=2, resume=True, progress=False)
    assert (out / "label_1.csv").read_text() == before
    # shard 1 alone (label 1 only) replays the stream of shard 0's batches
    T.compute_tis(Tiny(), ds, tmp_path / "sh", cfg, batch_size=2, shard=1, num_shards=2, progress=False)
    assert (tmp_path / "sh" / "label_1.csv").read_text() == before


# ----------------------------------------------------------------------------- 17.2 memory budget / chunking

def test_results_identical_whatever_the_chunking(data_dir, tmp_path):
    texts = []
    for i, copies in enumerate((0, 1, 3, None)):  # all at once, 1, 3, from the memory budget
        out = tmp_path / f"c{i}"
        s = _run(data_dir, out, config=T.TISConfig(nsamples=3, max_copies_per_pass=copies, max_memory_gb=0.001),
                 batch_size=2)
        texts.append([(out / f"label_{k}.csv").read_text() for k in range(N_CLASSES)])
        if copies is None:
            assert s["copies_per_pass"] >= 1
    assert all(t == texts[0] for t in texts[1:])


def test_memory_budget_maps_to_copies():
    model = Tiny().eval()
    per = A.memory_per_copy(model, torch.zeros(1, 256, 16, 16))
    assert per > 256 * 16 * 16 * 4  # at least the copy itself
    assert A.copies_for_budget(10 * per, per) == 10 and A.copies_for_budget(1, per) == 1
    free, where = A.available_memory_bytes("cpu")
    assert free > 0 and where


# ----------------------------------------------------------------------------- 17.3 --fast

def test_batchnorm_folding_is_exact_in_eval_mode():
    from cortex.iem.registry import build_model

    torch.manual_seed(0)
    for m in (1, 3):
        net = build_model("vqgan", m, 5, width=16).eval()
        for mod in net.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2)
                mod.weight.data.normal_()
                mod.bias.data.normal_()
        folded, n = A.fold_batchnorm(net)
        assert n > 0 and not any(isinstance(x, nn.BatchNorm2d) for x in folded.modules())
        x = torch.randn(3, 256, 16, 16)
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_fast_close_to_exact(data_dir, tmp_path):
    exact = _run(data_dir, tmp_path / "exact", batch_size=4)
    fast = _run(data_dir, tmp_path / "fast", batch_size=4, config=T.TISConfig(nsamples=2, fast=True))
    assert fast["fast_agreement"]["top20_overlap"] >= 0.99
    assert json.loads((tmp_path / "fast" / "tis_config.json").read_text())["fast"]["bn_folds"] == 1
    assert exact["run_id"] != fast["run_id"]
    for k in range(N_CLASSES):
        _, _, a = store.read_tis_file(tmp_path / "exact" / f"label_{k}.csv")
        _, _, b = store.read_tis_file(tmp_path / "fast" / f"label_{k}.csv")
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
        overlap = A.top_overlap(torch.tensor(a), torch.tensor(b), 20)
        assert overlap >= 0.95
