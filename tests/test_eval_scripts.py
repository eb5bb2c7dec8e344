"""The eval scripts and train_evaluators.py on a tiny synthetic world.

To check the *direction* of the effects without training anything, the TIS rows and statistics are
written by hand from the planted ground truth (an "oracle" TIS, in the SPEC §3 formats), and the
evaluator is a colour oracle: a module that scores each class by how much of the image has the colour of
the class's concept tokens, saved and loaded through the real synthetic-evaluator checkpoint code.
"""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from cortex.data.formats import read_split
from cortex.evaluation import codebook_level as XC, evaluators as E, explain as X
from cortex.iem.registry import build_model
from cortex.iem.checkpoints import save_iem
from cortex.paths import ExperimentPaths
from cortex.data.synthetic import load_vq
from cortex.utils import CortexError, format_list
from tests.helpers import LinearIEM, run_script, write_frequency_baseline, write_sectioned_stats

NC, CONCEPT = 3, 4
EVAL = "VQGAN_explanation/eval/"


N_OTHER = 16 + 4 + 1  # background + distractor token colours + black


class ColourOracle(nn.Module):
    """A nearest-colour classifier: each pixel is softly assigned to the nearest reference colour (the mean
    colour of every concept, background and distractor token, and black); logit_k = 100 * the fraction of
    the image assigned to class k's concept colours."""

    def __init__(self, num_classes, image_size):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("refs", torch.zeros(num_classes * CONCEPT + N_OTHER, 3))
        self.register_buffer("owner", torch.full((num_classes * CONCEPT + N_OTHER,), num_classes))
        self.register_buffer("mean", torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):  # x: ImageNet-normalised (B, 3, H, W)
        x = (x * self.std + self.mean).flatten(2).transpose(1, 2)  # (B, HW, 3) in [0, 1]
        w = torch.softmax(-torch.cdist(x, self.refs[None].expand(x.shape[0], -1, -1)) / 0.02, -1)  # (B, HW, R)
        mass = w @ torch.nn.functional.one_hot(self.owner, self.num_classes + 1).float()  # (B, HW, K+1)
        return 100 * mass.mean(1)[:, : self.num_classes]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalworld") / "VQGAN_explanation"
    run_script("VQGAN_explanation/generate_dataset.py", [
        "--root", root, "--num_classes", NC, "--train_per_class", 4, "--val_per_class", 2, "--test_per_class", 3,
        "--n_codes", 96, "--concept_tokens", CONCEPT, "--n_background", 16, "--n_distractors", 4,
        "--distractors_per_image", 2, "--object_size", 3, 4, "--patch_size", 2, "--layout", "compact"])
    paths = ExperimentPaths(root=root)
    gt = json.loads((paths.data_dir / "ground_truth.json").read_text())
    concept = {int(k): v for k, v in gt["concept_tokens"].items()}
    # a tiny random IEM (the codebook script needs one; nothing here depends on its quality)
    torch.manual_seed(0)
    save_iem(build_model("vqgan", 1, NC, width=8), paths.best_ckpt(1),
             {"experiment": "vqgan", "model_id": 1, "num_classes": NC, "width": 8})
    # the colour-oracle evaluator, through the synthetic-evaluator checkpoint code
    vq = load_vq(paths.data_dir / "synthetic_vq.pt")
    oracle = ColourOracle(NC, 32)
    colour = lambda toks: ((vq.patches[toks] + 1) / 2).mean((-1, -2))  # noqa: E731 - (n, 3) mean colours
    with torch.no_grad():
        for k, toks in concept.items():
            oracle.refs[k * CONCEPT:(k + 1) * CONCEPT] = colour(toks)
            oracle.owner[k * CONCEPT:(k + 1) * CONCEPT] = k
        oracle.refs[NC * CONCEPT:-1] = colour(gt["background_tokens"] + gt["distractor_tokens"])
    mp = pytest.MonkeyPatch()
    mp.setitem(E.SYNTHETIC_ARCHS, "colour_oracle", ColourOracle)
    E.save_synthetic_evaluator(E.synthetic_dir(paths.checkpoint_dir) / "colour_oracle.pth", oracle, "colour_oracle",
                               NC, 32)
    # oracle TIS (test split): high on the planted concept positions
    rng = np.random.default_rng(0)
    for split in ("test",):
        by = X.records_by_label(read_split(paths.data_dir, split))
        for k, recs in by.items():
            p = paths.tis_file(1, split, k)
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["filename", "label", "contribution"])
                for r in recs:
                    s = rng.random(256) * 0.1 + np.isin(r.ids, concept[k]) * (1 + rng.random(256))
                    w.writerow([r.filename, k, format_list(s.round(5))])
            (p.parent / "tis_config.json").write_text(json.dumps({"attribution": "oracle"}))  # one run's settings
    # TIS statistics (concept tokens first) and frequency baseline, written in the SPEC §3 formats
    train = X.records_by_label(read_split(paths.data_dir, "train"))
    for k, recs in train.items():
        toks, cnts = np.unique(np.concatenate([r.ids for r in recs]), return_counts=True)
        order = np.lexsort((toks, -cnts))
        freq = [(int(toks[i]), int(cnts[i])) for i in order]
        rows = [(t, 50 - i, recs[0].filename) for i, t in enumerate(concept[k])]
        rows += [(t, 3, recs[0].filename) for t, _ in freq if t not in concept[k]][:5]
        write_sectioned_stats(paths.stats_file(1, k), len(recs), rows)
        write_frequency_baseline(paths.frequency_file(k), freq[:100])
    yield paths
    mp.undo()


def _csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


COMMON = ["--evaluators", "synthetic", "--device", "cpu", "--no_progress"]


def test_sample_image_level(world):
    out = run_script(EVAL + "sample_image_level_explanation.py",
                     ["--model", 1, "--root", world.root, "--num_tokens", 2, 4, *COMMON])
    header, rows = _csv(out)
    assert out == world.explanation_dir(1) / "sample_image_level_results.csv"
    assert header == X.SAMPLE_COLUMNS
    assert [(r["Method"], r["Num_Masked_Tokens"]) for r in rows] == [
        ("original", "0"), ("target", "2"), ("random", "2"), ("target", "4"), ("random", "4")]
    d = {(r["Method"], int(r["Num_Masked_Tokens"])): r for r in rows}
    assert float(d[("original", 0)]["Avg_Probs"]) > 0.8 and d[("original", 0)]["Probs_Diff"] == "0"
    for n in (2, 4):  # masking the oracle-TIS tokens hurts much more than masking random ones
        t, r = d[("target", n)], d[("random", n)]
        assert float(t["Probs_Diff"]) < float(r["Probs_Diff"]) - 0.1  # the authors' sign: masked - original
        assert float(t["Logits_Diff"]) < float(r["Logits_Diff"])
        assert float(t["Avg_Probs"]) - float(t["Probs_Diff"]) == pytest.approx(float(d[("original", 0)]["Avg_Probs"]),
                                                                               abs=1e-12)
    h, per = _csv(world.explanation_dir(1) / "sample_image_level_per_image.csv")
    assert h == X.PER_IMAGE_COLUMNS and len(per) == NC * 3 * 5
    figs = world.figures_dir(1)
    assert (figs / "sample_level_deletion_curves.png").stat().st_size > 5000
    assert (figs / "sample_level_tis_grid.png").stat().st_size > 5000
    # same seed, same random tokens
    run_script(EVAL + "sample_image_level_explanation.py",
               ["--model", 1, "--root", world.root, "--num_tokens", 2, 4, "--no_figures", *COMMON])
    assert _csv(out)[1] == rows


def test_sample_image_level_needs_tis(world, tmp_path):
    with pytest.raises(CortexError, match="TIS_computation.py"):
        run_script(EVAL + "sample_image_level_explanation.py",
                   ["--model", 1, "--root", world.root, "--results_dir", tmp_path, *COMMON])


def test_concept_level(world):
    out = run_script(EVAL + "sample_concept_level_explanation.py",
                     ["--model", 1, "--root", world.root, "--top_n", 20, "--token_num", CONCEPT, *COMMON])
    assert out == world.explanation_dir(1) / f"sample_concept_level_results_top20_token{CONCEPT}.csv"
    header, rows = _csv(out)
    assert header == X.CONCEPT_COLUMNS and [r["Model"] for r in rows] == ["colour_oracle", "Overall"]
    r = rows[0]
    assert float(r["Avg_Diff_Target"]) > float(r["Avg_Diff_Baseline"]) + 1
    assert float(r["Avg_Masked_Prob_Target"]) < float(r["Avg_Masked_Prob_Baseline"]) - 0.3
    assert all(rows[1][c] == r[c] for c in header[1:])  # one evaluator: Overall = its row
    assert (world.figures_dir(1) / f"concept_level_top20_token{CONCEPT}.png").stat().st_size > 5000
    with pytest.raises(CortexError, match="no 'Top 7 Tokens' section"):
        run_script(EVAL + "sample_concept_level_explanation.py",
                   ["--model", 1, "--root", world.root, "--top_n", 7, "--token_num", 3, *COMMON])


@pytest.mark.parametrize("mode", ["token", "embedding"])
def test_codebook_level(world, mode):
    args = ["--model", 1, "--root", world.root, "--pairs", "0:1,2:0", "--steps", 4, "--eval_every", 2, "--lr", 0.5,
            "--optimization_type", mode, "--rows", 6, 8, "--cols", 5, 9, *COMMON]
    out = run_script(EVAL + "codebook_level_explanation.py", args)
    assert out == world.explanation_dir(1) / f"codebook_level_results_{mode}_4_0.5.csv"
    header, rows = _csv(out)
    assert header == X.CODEBOOK_COLUMNS and [r["model"] for r in rows] == ["colour_oracle"]
    # the best checkpoint is chosen over the authors' steps 0, 2 and 3 (= steps - 1) of each image
    run = world.explanation_dir(1) / f"codebook_level_{mode}_4_0.5"
    h, per = _csv(run / "per_image.csv")
    assert len(per) == 6 and {p["best_step"] for p in per} <= {"0", "2", "3"}
    assert float(rows[0]["final_target_prob"]) == pytest.approx(np.mean([float(p["final_target_prob"]) for p in per]),
                                                                abs=1e-5)
    region = set(XC.region_positions((6, 8), (5, 9)).tolist())
    _, toks = _csv(run / "optimized_tokens.csv")
    assert len(toks) == 6 and {(t["label"], t["target"]) for t in toks} == {("0", "1"), ("2", "0")}
    for t in toks:
        a = np.array(t["original_indices"][1:-1].split(","), dtype=int)
        b = np.array(t["optimized_indices"][1:-1].split(","), dtype=int)
        changed = set(np.flatnonzero(a != b).tolist())
        assert changed <= region and int(t["changed_positions"]) == len(changed)
    assert len(list((run / "images").glob("*_before.png"))) == 6 and len(list((run / "images").glob("*_after.png"))) == 6
    assert (world.figures_dir(1) / f"codebook_level_{mode}_4_0.5.png").stat().st_size > 5000


def test_codebook_level_flag_errors(world):
    base = ["--model", 1, "--root", world.root, "--steps", 2, *COMMON]
    with pytest.raises(CortexError, match="--pairs"):  # explicit labels outside the 3-class world
        run_script(EVAL + "codebook_level_explanation.py", [*base, "--labels", 10, 11])
    with pytest.raises(CortexError, match="VQGAN_directory"):
        run_script(EVAL + "codebook_level_explanation.py", [*base, "--pairs", "0:1", "--vq", "taming"])
    with pytest.raises(CortexError, match="region"):
        run_script(EVAL + "codebook_level_explanation.py", [*base, "--pairs", "0:1", "--rows", 10, 9])



@pytest.mark.parametrize("mode", ["token", "embedding"])
def test_optimisation_raises_target_logit(mode):
    """With an IEM whose target logit is linear in the embedding, the optimisation must raise it."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 256, generator=g)
    ids = torch.randint(0, 16, (2, 256), generator=g)
    iem = LinearIEM().requires_grad_(False)
    region = XC.region_positions((7, 10), (7, 10))
    tg = torch.tensor([1, 2])
    if mode == "token":
        tr = XC.optimize_tokens(iem, codebook, ids, tg, region, steps=60, lr=0.5, eval_every=30, progress=False)
    else:
        tr = XC.optimize_embedding(iem, codebook, ids, tg, region, steps=60, lr=0.5, eval_every=30, progress=False)
    assert tr.steps == [0, 30, 59]  # the authors' step % every == 0 or step == steps - 1
    assert np.all(tr.iem_target_logit[-1] > tr.initial_iem_target_logit + 1)
    outside = np.setdiff1d(np.arange(256), region)
    assert torch.equal(tr.ids[-1][:, outside], ids[:, outside])


def test_train_evaluators(world, tmp_path):
    ck = tmp_path / "ck"
    argv = ["--root", world.root, "--checkpoint_dir", ck, "--archs", "vit_tiny_8", "--epochs", 1, "--batch_size", 8,
            "--device", "cpu"]
    out = run_script("VQGAN_explanation/train_evaluators.py", argv)
    assert (out / "vit_tiny_8.pth").is_file()
    header, rows = _csv(out / "evaluators.csv")
    assert header[:3] == ["arch", "val_accuracy", "test_accuracy"] and rows[0]["arch"] == "vit_tiny_8"
    ev = E.load_synthetic_evaluator(out / "vit_tiny_8.pth")
    assert ev.num_classes == NC and ev.input_size == 32
    mtime = (out / "vit_tiny_8.pth").stat().st_mtime_ns
    run_script("VQGAN_explanation/train_evaluators.py", argv)  # exists: skipped
    assert (out / "vit_tiny_8.pth").stat().st_mtime_ns == mtime


def test_codebook_level_taming_vqgan(world, tmp_path):
    """The real-VQGAN path: a tiny randomly initialised taming VQModel (96 256-d codes, 32 px) written to a
    YAML + Lightning-style checkpoint here, found through VQGAN_directory (configs/model.yaml,
    checkpoints/last.ckpt) and through --vqgan_config/--vqgan_ckpt."""
    pytest.importorskip("taming")
    from omegaconf import OmegaConf

    from cortex.data.taming_compat import import_taming
    from tests.helpers import load_script

    import_taming()
    from taming.main import instantiate_from_config

    dd = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # f2: 32 px <-> 16x16 tokens
    params = {"embed_dim": 256, "n_embed": 96, "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}
    torch.manual_seed(0)
    vq = instantiate_from_config({"target": "taming.models.vqgan.VQModel", "params": params})
    vdir = tmp_path / "vqgan_imagenet_f16_16384"
    (vdir / "configs").mkdir(parents=True)
    (vdir / "checkpoints").mkdir()
    torch.save({"state_dict": vq.state_dict()}, vdir / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}),
                   vdir / "configs" / "model.yaml")
    mod = load_script(EVAL + "codebook_level_explanation.py")
    mod.VQGAN_directory = str(vdir)
    argv = ["--model", 1, "--root", world.root, "--pairs", "1:2", "--images_per_label", 1, "--steps", 2,
            "--eval_every", 1, "--lr", 0.5, "--vq", "taming", "--no_figures", "--results_dir", tmp_path / "r1", *COMMON]
    out = mod.main(mod.get_args_parser().parse_args([str(a) for a in argv]))
    assert _csv(out)[0] == X.CODEBOOK_COLUMNS
    from PIL import Image

    pngs = sorted((out.parent / "codebook_level_token_2_0.5" / "images").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (32, 32)
    # explicit flags (auto picks taming because a --vqgan_* flag is given)
    argv = [a for a in argv if a not in ("--vq", "taming")]
    argv += ["--vqgan_config", vdir / "configs" / "model.yaml", "--vqgan_ckpt", vdir / "checkpoints" / "last.ckpt"]
    argv[argv.index("--results_dir") + 1] = tmp_path / "r2"
    out2 = run_script(EVAL + "codebook_level_explanation.py", argv)
    assert _csv(out2)[1] == _csv(out)[1]  # same seed, same model: same numbers
