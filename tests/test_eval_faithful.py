"""The eval steps give the authors' numbers (issue 13), check their inputs (issue 12) and report a paired
statistic (issue 16.4).

Each output is compared with a re-computation of the authors' rule written here from its description:
the random control drawn with ``random.seed(42)`` once and ``random.sample(range(256), n)`` per image and n
(labels ascending, CSV order), diffs = mean(masked) - mean(original), sums image after image, floats
written at full precision, PIL ``Resize`` of the uint8 image, codebook checkpoints at steps
``0, every, ..., steps - 1`` with the first highest target prob kept.
"""
import csv
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cortex.data.formats import image_path, read_split
from cortex.evaluation import codebook_level as XC, concept_level as XK, evaluators as E, explain as X, masking as M
from cortex.iem.registry import build_model
from cortex.iem.checkpoints import save_iem
from cortex.paths import ExperimentPaths
from cortex.utils import CortexError, format_list
from tests.helpers import LinearIEM, run_script, write_frequency_baseline, write_sectioned_stats

NC = 3
EVAL = "VQGAN_explanation/eval/"
COMMON = ["--evaluators", "synthetic", "--device", "cpu", "--no_progress", "--no_figures"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_tis(paths, label, recs, rng, with_config=True):
    p = paths.tis_file(1, "test", label)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "contribution"])
        for r in recs:
            w.writerow([r.filename, label, format_list(rng.random(256).round(6))])
    if with_config:
        (p.parent / "tis_config.json").write_text(json.dumps({"attribution": "test"}))
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world with random TIS, statistics, frequency baseline, a random IEM (width 8) and one
    small random synthetic evaluator (resnet10 at 32 px: no resize, the PIL path is tested on its own)."""
    root = tmp_path_factory.mktemp("faithful") / "VQGAN_explanation"
    run_script("VQGAN_explanation/generate_dataset.py", [
        "--root", root, "--num_classes", NC, "--train_per_class", 3, "--val_per_class", 1, "--test_per_class", 3,
        "--n_codes", 48, "--concept_tokens", 4, "--n_background", 12, "--n_distractors", 2,
        "--object_size", 3, 4, "--patch_size", 2, "--layout", "compact"])
    paths = ExperimentPaths(root=root)
    torch.manual_seed(0)
    save_iem(build_model("vqgan", 1, NC, width=8), paths.best_ckpt(1),
             {"experiment": "vqgan", "model_id": 1, "num_classes": NC, "width": 8})
    net = E.build_synthetic_net("resnet10", NC, 32).eval()
    E.save_synthetic_evaluator(E.synthetic_dir(paths.checkpoint_dir) / "resnet10.pth", net, "resnet10", NC, 32)
    rng = np.random.default_rng(0)
    for k, recs in X.records_by_label(read_split(paths.data_dir, "test")).items():
        _write_tis(paths, k, recs, rng)
    for k, recs in X.records_by_label(read_split(paths.data_dir, "train")).items():
        toks, cnts = np.unique(np.concatenate([r.ids for r in recs]), return_counts=True)
        order = np.lexsort((toks, -cnts))
        write_sectioned_stats(paths.stats_file(1, k), len(recs),
                              [(int(toks[i]), 9 - j, recs[0].filename) for j, i in enumerate(order[-6:])])
        write_frequency_baseline(paths.frequency_file(k), [(int(toks[i]), int(cnts[i])) for i in order[:20]])
    return paths


def _copy(world, tmp_path):
    """A private copy of the world (tests that break its inputs)."""
    root = tmp_path / "VQGAN_explanation"
    shutil.copytree(world.root, root)
    return ExperimentPaths(root=root)


def _authors_score(net, img_hwc: np.ndarray, label: int):
    """The authors' scoring of one image: PIL image -> ToTensor -> Normalize -> net -> (logit, softmax prob)."""
    x = torch.from_numpy(np.array(Image.fromarray(img_hwc))).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(E.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(E.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        out = net(x[None])
    return out[0, label].item(), torch.softmax(out, 1)[0, label].item()


def _authors_mask(img_hwc: np.ndarray, ids, chosen_positions) -> np.ndarray:
    """Black out (pixel by pixel, as the authors) every patch whose id is among the ids at chosen_positions."""
    out = img_hwc.copy()
    p = out.shape[0] // 16
    targets = [ids[i] for i in chosen_positions]
    for pos in range(256):
        if ids[pos] in targets:
            r, c = pos // 16, pos % 16
            for i in range(p):
                for j in range(p):
                    out[r * p + j, c * p + i] = (0, 0, 0)
    return out


# ----------------------------------------------------------------------------- A. sample level (13.1, 13.3, 13.7)

def test_sample_level_equals_the_authors(world):
    out = run_script(EVAL + "sample_image_level_explanation.py",
                     ["--model", 1, "--root", world.root, "--num_tokens", 3, 7, *COMMON])
    rows = _rows(out)
    per = _rows(world.explanation_dir(1) / "sample_image_level_per_image.csv")
    test = read_split(world.data_dir, "test")
    order = [r for k in sorted({r.label for r in test}) for r in test if r.label == k]  # labels asc, CSV order
    ns = [3, 7]
    # the random control: random.seed(42) once, random.sample(range(256), n) per image and n
    random.seed(42)
    draws = {r.filename: [random.sample(range(256), n) for n in ns] for r in order}
    got = {(p["filename"], p["method"], int(p["num_tokens"])): p for p in per}
    for r in order:
        for n, pos in zip(ns, draws[r.filename]):
            want = int(np.isin(r.ids, r.ids[pos]).sum())
            assert int(got[(r.filename, "random", n)]["masked_positions"]) == want
    # the numbers: the authors' scoring of the PNG, pixel-masked, one image at a time
    net = E.load_synthetic_evaluator(E.synthetic_dir(world.checkpoint_dir) / "resnet10.pth").net
    tis = {}
    for k in range(NC):
        with open(world.tis_file(1, "test", k), newline="") as f:
            for row in list(csv.reader(f))[1:]:
                tis[row[0]] = [float(v) for v in row[2][1:-1].split(",")]
    authors = {(m, n): ([], []) for m, n in [("original", 0)] + [(m, n) for n in ns for m in ("target", "random")]}
    for r in order:
        img = np.array(Image.open(image_path(world.data_dir, r.filename)).convert("RGB"))
        ids = list(r.ids)
        ranked = sorted(range(256), key=lambda i: tis[r.filename][i], reverse=True)
        for key, chosen in [(("original", 0), [])] + [(("target", n), ranked[:n]) for n in ns] + [
                (("random", n), d) for n, d in zip(ns, draws[r.filename])]:
            lg, pr = _authors_score(net, _authors_mask(img, ids, chosen), r.label)
            authors[key][0].append(lg)
            authors[key][1].append(pr)
            p = got[(r.filename, key[0], key[1])]
            assert float(p["logit"]) == pytest.approx(lg, rel=1e-5, abs=1e-5)
    o_lg, o_pr = np.mean(authors[("original", 0)][0]), np.mean(authors[("original", 0)][1])
    by = {(r["Method"], int(r["Num_Masked_Tokens"])): r for r in rows}
    assert by[("original", 0)]["Logits_Diff"] == "0" and by[("original", 0)]["Probs_Diff"] == "0"
    for key, (lgs, prs) in authors.items():
        r = by[key]
        assert float(r["Avg_Logits"]) == pytest.approx(np.mean(lgs), rel=1e-5, abs=1e-5)
        if key[0] != "original":  # the authors' sign: masked - original
            assert float(r["Logits_Diff"]) == pytest.approx(np.mean(lgs) - o_lg, rel=1e-4, abs=1e-5)
            assert float(r["Probs_Diff"]) == pytest.approx(np.mean(prs) - o_pr, rel=1e-4, abs=1e-6)
            # full precision, same arithmetic: Diff = Avg(masked) - Avg(original), bit for bit
            assert float(r["Logits_Diff"]) == float(r["Avg_Logits"]) - float(by[("original", 0)]["Avg_Logits"])
    # Avg = numpy's mean of the per-image values in the authors' order, bit for bit (per-image CSV at full precision)
    for (m, n), r in by.items():
        vals = [float(got[(x.filename, m, n)]["logit"]) for x in order]
        assert float(r["Avg_Logits"]) == np.mean(vals)


def test_random_draws_are_independent_of_subsets(world, tmp_path):
    """--labels / --max_images_per_label evaluate a subset; each image keeps the draws of the full run."""
    full = M.authors_random_draws(["a", "b", "c"], [5, 10])
    part = M.authors_random_draws(["a", "b", "c"], [5, 10])
    assert all(np.array_equal(x, y) for f in full for x, y in zip(full[f], part[f]))
    random.seed(42)
    assert [list(p) for p in full["a"]] == [random.sample(range(256), 5), random.sample(range(256), 10)]
    paths = _copy(world, tmp_path)
    out = run_script(EVAL + "sample_image_level_explanation.py",
                     ["--model", 1, "--root", paths.root, "--num_tokens", 3, "--labels", 2, *COMMON])
    per = _rows(out.parent / "sample_image_level_per_image.csv")
    test = read_split(world.data_dir, "test")
    order = [r for k in range(NC) for r in test if r.label == k]
    draws = M.authors_random_draws([r.filename for r in order], [3])
    ids = {r.filename: r.ids for r in test}
    for p in per:
        if p["method"] == "random":
            fn = p["filename"]
            assert int(p["masked_positions"]) == int(np.isin(ids[fn], ids[fn][draws[fn][0]]).sum())
    assert {p["label"] for p in per} == {"2"}


def test_full_precision_writers(tmp_path):
    tiny, third = 1.234567891234e-9, 1 / 3
    p = X.write_rows(tmp_path / "x.csv", ["a", "b", "c"], [{"a": tiny, "b": np.float32(third), "c": np.int64(4)}])
    r = _rows(p)[0]
    assert float(r["a"]) == tiny and r["a"] != "0.000000"  # the old {:.6f} wrote 0.000000
    assert float(r["b"]) == float(np.float32(third)) and r["c"] == "4"


def test_testing_results_full_precision(world, tmp_path):
    """test.py writes 100 * correct / total unrounded (the authors' csv writer), not %.2f."""
    from cortex.data.formats import EmbeddingDataset
    from cortex.iem.checkpoints import load_iem

    out = run_script("VQGAN_explanation/test.py", ["--model", 1, "--root", world.root, "--width", 8, "--device", "cpu",
                                                   "--results_dir", tmp_path])
    with open(tmp_path / "Classification" / "ClassificationNet1" / "testing_results.csv", newline="") as f:
        header, row = list(csv.reader(f))
    ds = EmbeddingDataset(world.data_dir, "test", NC)
    model = load_iem(world.best_ckpt(1), "vqgan", 1, num_classes=NC, width=8)
    with torch.no_grad():
        x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        top = model(x).topk(NC, 1).indices
    for k, text in zip((1, 3), row[:2]):
        c = int((top[:, :k] == y[:, None]).any(1).sum())
        assert text == repr(100 * c / len(ds))
    assert out is not None


# ----------------------------------------------------------------------------- concept level + paired (C)

def test_concept_level_equals_the_authors_and_paired_file(world):
    out = run_script(EVAL + "sample_concept_level_explanation.py",
                     ["--model", 1, "--root", world.root, "--top_n", 5, "--token_num", 4, *COMMON])
    rows = _rows(out)
    assert list(rows[0]) == X.CONCEPT_COLUMNS  # the authors' columns, unchanged
    per = _rows(out.parent / "sample_concept_level_per_image_top5_token4.csv")
    get = lambda m: [p for p in per if p["method"] == m]  # noqa: E731 - image order: labels asc, CSV order
    orig, tgt, base = get("original"), get("target"), get("baseline")

    def seq_mean(v):  # the authors: total += value, image after image; then / count
        total = 0
        for x in v:
            total += x
        return total / len(v)

    r = rows[0]
    assert float(r["Avg_Diff_Target"]) == seq_mean([float(a["logit"]) - float(b["logit"]) for a, b in zip(orig, tgt)])
    assert float(r["Avg_Diff_Baseline"]) == seq_mean([float(a["logit"]) - float(b["logit"]) for a, b in zip(orig, base)])
    assert float(r["Avg_Masked_Prob_Target"]) == seq_mean([float(b["prob"]) for b in tgt])
    assert rows[1]["Model"] == "Overall" and float(rows[1]["Avg_Diff_Target"]) == seq_mean([float(r["Avg_Diff_Target"])])
    # the paired statistic beside it
    paired = _rows(XK.paired_stats_path(out))
    assert list(paired[0]) == XK.PAIRED_COLUMNS
    d = np.array([float(b["logit"]) - float(a["logit"]) for a, b in zip(tgt, base)])  # CORTEX drop - baseline drop
    row = next(p for p in paired if p["Model"] == "resnet10" and p["Metric"] == "logit_drop")
    assert int(row["N"]) == len(d) == NC * 3 and float(row["Mean_Paired_Diff"]) == pytest.approx(d.mean(), abs=1e-12)
    half = 2.306004135204166 * d.std(ddof=1) / math.sqrt(9)  # t_{0.975, 8}
    assert float(row["CI_Low"]) == pytest.approx(d.mean() - half, rel=1e-9)
    assert float(row["CI_High"]) == pytest.approx(d.mean() + half, rel=1e-9)
    back = {(r["Model"], r["Metric"]): r for r in XK.read_paired_stats(out)}
    assert back[("resnet10", "logit_drop")]["CI_Low"] == float(row["CI_Low"]) and ("Overall", "prob_drop") in back


def test_paired_statistic_hand_computed():
    """One evaluator, three images: original logit 5; CORTEX-masked 1, 2, 3; baseline-masked 4, 4, 4.
    CORTEX drops 4, 3, 2; baseline drops 1, 1, 1; paired 3, 2, 1: mean 2, sd 1, t_{0.975,2} = 4.302653."""
    lg = np.array([[5.0, 1.0, 4.0], [5.0, 2.0, 4.0], [5.0, 3.0, 4.0]])
    pr = np.array([[0.9, 0.1, 0.5], [0.9, 0.2, 0.5], [0.9, 0.3, 0.5]])
    res = XK.ConceptLevelResult([], [(["a", "b", "c"], 0, {"ev": (lg, pr)}, np.zeros((3, 3)), (0, 1, 1))], [])
    rows = {(r["Model"], r["Metric"]): r for r in XK.concept_paired_stats(res)}
    r = rows[("ev", "logit_drop")]
    assert r["Mean_Paired_Diff"] == pytest.approx(2.0) and r["Std"] == pytest.approx(1.0) and r["N"] == 3
    assert r["CI_Low"] == pytest.approx(2 - 4.302652729911275 / math.sqrt(3))
    assert r["CI_High"] == pytest.approx(2 + 4.302652729911275 / math.sqrt(3))
    p = rows[("ev", "prob_drop")]  # 0.4, 0.3, 0.2
    assert p["Mean_Paired_Diff"] == pytest.approx(0.3) and p["Std"] == pytest.approx(0.1)
    assert rows[("Overall", "logit_drop")]["Mean_Paired_Diff"] == pytest.approx(2.0)
    one = XK.paired_t_interval([1.5])
    assert one["mean"] == 1.5 and math.isnan(one["low"]) and one["n"] == 1


# ----------------------------------------------------------------------------- codebook level (13.9, 14.4)

def test_checkpoint_steps_and_best_rule():
    assert XC.checkpoint_steps(5000, 500) == list(range(0, 5000, 500)) + [4999]
    assert XC.checkpoint_steps(4, 2) == [0, 2, 3] and XC.checkpoint_steps(1, 500) == [0]
    rng = np.random.default_rng(0)
    tp = rng.integers(0, 4, (6, 50)) / 4.0  # many ties and some all-zero columns
    tp[:, 0] = 0
    b = XC.best_checkpoints(tp)
    for i in range(tp.shape[1]):  # the authors: best = 0; keep a checkpoint only if its prob is > best so far
        best, idx = 0.0, -1
        for t in range(tp.shape[0]):
            if tp[t, i] > best:
                best, idx = tp[t, i], t
        assert b[i] == idx
    s = {k: rng.random((6, 50)) for k in XC.SCORE_KEYS}
    s["tgt_prob"] = tp
    s["initial"] = {k: rng.random(50) for k in XC.SCORE_KEYS}
    row = XC.best_rows({"ev": s})[0][0]
    final = [s["orig_logit"][b[i], i] if b[i] >= 0 else 0.0 for i in range(50)]
    assert row["final_original_logit"] == np.mean(final)  # the authors' zeros where nothing beat 0
    assert row["initial_target_prob"] == np.mean(s["initial"]["tgt_prob"])



def test_token_checkpoint_is_that_steps_gumbel_sample():
    """Checkpoint 0 decodes the Gumbel sample drawn at step 0 (from the random init), not an argmax after it."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 256, generator=g)
    ids = torch.randint(0, 16, (2, 256), generator=g)
    iem = LinearIEM().requires_grad_(False)
    region = XC.region_positions((7, 8), (7, 8))
    tr = XC.optimize_tokens(iem, codebook, ids, torch.tensor([1, 2]), region, steps=1, lr=0.5, eval_every=500,
                           seed=3, progress=False)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, len(region), 16, generator=gen)
    u = torch.rand(logits.shape, generator=gen).clamp(1e-10, 1 - 1e-10)
    sample = (logits - torch.log(-torch.log(u))).argmax(-1)
    assert tr.steps == [0] and torch.equal(tr.ids[0][:, region], sample)
    assert torch.equal(tr.initial_ids, ids)


def test_embedding_checkpoint_is_after_the_update():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 256, generator=g)
    ids = torch.randint(0, 16, (1, 256), generator=g)
    iem = LinearIEM().requires_grad_(False)
    region = XC.region_positions((7, 8), (7, 8))
    tr = XC.optimize_embedding(iem, codebook, ids, torch.tensor([2]), region, steps=3, lr=2.0, eval_every=2,
                              progress=False)
    assert tr.steps == [0, 2]
    emb = codebook[ids].transpose(1, 2).reshape(1, 256, 16, 16).clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=2.0)
    mask = torch.zeros(256)
    mask[torch.as_tensor(region)] = 1
    (-iem(emb)[0, 2]).backward()
    emb.grad *= mask.view(1, 1, 16, 16)
    opt.step()
    z = emb.detach().flatten(2).transpose(1, 2)[0]  # (256, C)
    nearest = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(tr.ids[0][0], nearest)


def test_decoded_image_conversion_is_the_authors():
    x = torch.randn(2, 3, 16, 16) * 1.5  # decoder output, partly outside [-1, 1]
    a = x.numpy().transpose(0, 2, 3, 1)
    want = (255 * ((a + 1.) / 2.)).clip(0, 255).astype(np.uint8)  # truncation, as chw_to_pillow
    got = XC.decoded_to_uint8(x).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, want)


def test_codebook_pairs_rule():
    paper, note = XC.codebook_pairs(range(1000), 1000)
    assert paper == [(l, 30 - l) for l in range(10, 21) if l != 15] and note is None
    pairs, note = XC.codebook_pairs(range(10), 10)  # the paper's labels are absent: mirror the labels present
    assert pairs == [(0, 9), (1, 8), (2, 7), (3, 6), (4, 5), (5, 4), (6, 3), (7, 2), (8, 1), (9, 0)]
    assert "not all in this dataset" in note
    assert XC.codebook_pairs([0, 1, 2], 3) == ([(0, 2), (2, 0)], XC.codebook_pairs([0, 1, 2], 3)[1])
    assert XC.codebook_pairs([0, 1, 2], 3, labels=[0, 1], target_sum=2) == ([(0, 2), (1, 1)], None)


def test_codebook_script_defaults_on_demo_data(world, capsys):
    """No --pairs on a 3-class world: pairs 0->2 and 2->0, said on the console; the CSV follows the authors."""
    out = run_script(EVAL + "codebook_level_explanation.py",
                     ["--model", 1, "--root", world.root, "--steps", 3, "--eval_every", 2, "--lr", 0.5,
                      "--images_per_label", 1, *COMMON])
    assert "not all in this dataset" in capsys.readouterr().out
    toks = _rows(out.parent / "codebook_level_token_3_0.5" / "optimized_tokens.csv")
    assert [(t["label"], t["target"]) for t in toks] == [("0", "2"), ("2", "0")]
    per = _rows(out.parent / "codebook_level_token_3_0.5" / "per_image.csv")
    assert {p["best_step"] for p in per} <= {"0", "2", ""}
    row = _rows(out)[0]
    assert float(row["final_target_prob"]) == np.mean([float(p["final_target_prob"]) for p in per])


# ----------------------------------------------------------------------------- ImageNet evaluators: PIL resize (13.10)

def test_imagenet_evaluator_uses_pil_resize():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 4)).eval()
    ev = E.Evaluator("lin", net, 224, 4)
    imgs = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    want = []
    for im in imgs:
        pil = Image.fromarray(im.permute(1, 2, 0).numpy().copy()).resize((224, 224), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
        want.append(x)
    want = torch.stack(want)
    assert torch.equal(ev.to_input(imgs), want)
    norm = (want - torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(E.evaluator_logits(ev, imgs, batch_size=1), net(norm), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- B. integrity (12.5)

def test_sample_level_refuses_incomplete_tis(world, tmp_path, capsys):
    paths = _copy(world, tmp_path)
    argv = ["--model", 1, "--root", paths.root, "--num_tokens", 3, *COMMON]
    recs = X.records_by_label(read_split(paths.data_dir, "test"))
    # header-only file for label 1
    with open(paths.tis_file(1, "test", 1), "w", newline="") as f:
        f.write("filename,label,contribution\n")
    with pytest.raises(CortexError, match="label_1.csv has no rows"):
        run_script(EVAL + "sample_image_level_explanation.py", argv)
    # partial file (one row of three)
    _write_tis(paths, 1, recs[1][:1], np.random.default_rng(1))
    with pytest.raises(CortexError, match="label_1.csv has 1 rows"):
        run_script(EVAL + "sample_image_level_explanation.py", argv)
    # missing label file
    paths.tis_file(1, "test", 1).unlink()
    with pytest.raises(CortexError, match="no TIS file: 1"):
        run_script(EVAL + "sample_image_level_explanation.py", argv)
    # --allow_partial: proceeds on purpose, saying what it skips
    out = run_script(EVAL + "sample_image_level_explanation.py", [*argv, "--allow_partial"])
    assert "--allow_partial" in capsys.readouterr().out
    assert {p["label"] for p in _rows(out.parent / "sample_image_level_per_image.csv")} == {"0", "2"}
    # a stale file of another dataset (a label this dataset lacks)
    _write_tis(paths, 1, recs[1], np.random.default_rng(1))
    _write_tis(paths, 7, recs[1], np.random.default_rng(1))
    with pytest.raises(CortexError, match="labels the dataset does not have"):
        run_script(EVAL + "sample_image_level_explanation.py", argv)


def test_concept_level_refuses_missing_inputs(world, tmp_path, capsys):
    paths = _copy(world, tmp_path)
    argv = ["--model", 1, "--root", paths.root, "--top_n", 5, "--token_num", 4, *COMMON]
    paths.stats_file(1, 2).unlink()
    paths.frequency_file(0).unlink()
    with pytest.raises(CortexError, match=r"no TIS statistics for labels 2 .*no frequency baseline for labels 0"):
        run_script(EVAL + "sample_concept_level_explanation.py", argv)
    out = run_script(EVAL + "sample_concept_level_explanation.py", [*argv, "--allow_partial"])
    assert "skipping labels" in capsys.readouterr().out
    assert {p["label"] for p in _rows(out.parent / "sample_concept_level_per_image_top5_token4.csv")} == {"1"}


@pytest.mark.parametrize("script", ["sample_image_level_explanation.py", "sample_concept_level_explanation.py",
                                    "codebook_level_explanation.py"])
def test_missing_dataset_reported_before_evaluators(script, tmp_path, monkeypatch):
    """No dataset: the error names the folder; no ImageNet weights are looked for (or downloaded) first."""
    def no_load(*a, **k):
        raise AssertionError("evaluators loaded before the dataset was checked")

    monkeypatch.setattr(E, "load_imagenet_evaluator", no_load)
    monkeypatch.setattr(E, "load_evaluators", no_load)
    missing = tmp_path / "no_datasets"
    with pytest.raises(CortexError, match=f"dataset folder not found: {missing}.*generate"):
        run_script(EVAL + script, ["--model", 1, "--root", tmp_path, "--data_dir", missing, "--evaluators",
                                   "resnet18", "--device", "cpu", "--no_progress"])


def test_near_chance_warning(world, tmp_path, capsys):
    paths = _copy(world, tmp_path)
    f = paths.testing_results(1)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("Top-1 Accuracy,Top-3 Accuracy,Top-5 Accuracy,Top-10 Accuracy\n34.0,100.0,100.0,100.0\n")
    with pytest.warns(UserWarning, match="near chance"):
        run_script(EVAL + "sample_concept_level_explanation.py",
                   ["--model", 1, "--root", paths.root, "--top_n", 5, "--token_num", 4, *COMMON])
    assert "near chance" in capsys.readouterr().err
    f.write_text("Top-1 Accuracy,Top-3 Accuracy,Top-5 Accuracy,Top-10 Accuracy\n90.0,100.0,100.0,100.0\n")
    assert X.warn_if_near_chance(paths, 1) is False
    assert "near chance" not in capsys.readouterr().err


def test_concept_level_refuses_stale_statistics(world, tmp_path, capsys):
    """Statistics computed by TIS_analysis.py from one TIS run; the TIS change afterwards: refused."""
    paths = _copy(world, tmp_path)
    rng = np.random.default_rng(5)
    train = X.records_by_label(read_split(paths.data_dir, "train"))
    for k, recs in train.items():
        p = paths.tis_file(1, "train", k)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label", "contribution"])
            w.writerows([[r.filename, k, format_list(rng.random(256).round(6))] for r in recs])
    (paths.tis_dir(1, "train") / "tis_config.json").write_text(json.dumps({"attribution": "test"}))
    shutil.rmtree(paths.stats_dir(1))
    run_script("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--root", paths.root, "--no_progress"])
    argv = ["--model", 1, "--root", paths.root, "--top_n", 5, "--token_num", 4, *COMMON]
    run_script(EVAL + "sample_concept_level_explanation.py", argv)  # current: accepted
    with open(paths.tis_file(1, "train", 0), "a", newline="") as f:  # the TIS change after the analysis
        csv.writer(f).writerow([train[0][0].filename, 0, format_list(rng.random(256).round(6))])
    with pytest.raises(CortexError, match="out of date"):
        run_script(EVAL + "sample_concept_level_explanation.py", argv)
    run_script(EVAL + "sample_concept_level_explanation.py", [*argv, "--allow_partial"])
    assert "using the statistics anyway" in capsys.readouterr().out
