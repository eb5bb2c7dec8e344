"""`make demo`: the whole CORTEX pipeline on the embedded synthetic worlds, then one report.

Every step runs an experiment script with the flags a researcher types (``cd VQGAN_explanation; python
train.py --model 1 ...``, printed before the step), through the script's own parser and ``main`` and with
its progress bars; ``--subprocesses`` runs each as a separate ``python`` process instead. A step whose outputs exist is
skipped (set ``FORCE=1`` to redo everything). The report is printed and written to
``results/demo_report.md``; every number in it is read from the files the steps wrote.

Seed replicates (``--seeds``, default 0 1 2; cortex/analysis/replicates.py): seed 0 runs the whole pipeline, every other
seed retrains the IEMs and redoes TIS, statistics, concept recovery, concept-level masking and bias detection
in ``results/replicates/seed_<s>/`` and ``checkpoints/replicates/seed_<s>/``; the report opens with each headline
number as mean [min, max] over the seeds and whether each conclusion holds on every seed.

    python -m cortex.demo [--force] [--tiny] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .analysis.bias_files import bias_csv_name, parse_tokens_cell, read_bias_csv
from .analysis.replicates import (bias_robustness_file, fmt_interval, read_run_tokens, seed_dirs, seed_paths,
                                  summarize, token_stability, verdict)
from .cli import make_parser, seed_int
from .evaluation.concept_level import read_paired_stats
from .paths import ExperimentPaths
from .scripts import run_script

REPO = Path(__file__).resolve().parents[1]
VQ = REPO / "VQGAN_explanation"
DA = REPO / "Dalle_explanation"


@dataclass
class Sizes:
    """Demo size (default: minutes on a 2-core laptop) and a tiny size for the tests."""

    world: list = field(default_factory=lambda: ["--num_classes", "10", "--train_per_class", "60",
                                                 "--val_per_class", "10", "--test_per_class", "20",
                                                 "--null_classes", "2",  # 2 labels with no planted concept
                                                 "--hard_negatives", "4"])  # other classes' concept tokens in each image
    train: list = field(default_factory=lambda: ["--width", "32", "--epochs", "10", "--batch_size", "64"])
    nsamples: str = "10"  # SmoothGrad draws (the paper's 20 doubles every TIS step; 10 fits 3 seeds in 10 minutes)
    evaluators_epochs: str = "4"
    codebook_steps: str = "300"
    codebook_eval_every: str = "100"
    codebook_lr: str = "0.1"  # the paper's 0.01 needs its 5000 steps to change a token
    randomisation_images: str = "16"  # model-randomisation sanity check
    token_num: str = "8"  # concept tokens masked per label (= the planted ones per class)
    pairs: str = "0:5,1:6,2:7,3:8,4:9"  # codebook level: source label -> target label
    bias_world: list = field(default_factory=list)  # the generator's defaults: 300/50/100 images per label, 500 neutral
    bias_train: list = field(default_factory=lambda: ["--width", "32", "--epochs", "10", "--batch_size", "32"])
    # seed replicates (cortex/analysis/replicates.py): seed 0 runs everything; every other seed retrains the IEMs and redoes
    # TIS, statistics, concept recovery, the concept-level masking and the bias detection in its own folders
    seeds: tuple = (0, 1, 2)


TINY = Sizes(
    world=["--num_classes", "3", "--null_classes", "1", "--train_per_class", "10", "--val_per_class", "3",
           "--test_per_class", "4",
           "--n_codes", "96", "--concept_tokens", "4", "--n_background", "16", "--n_distractors", "4",
           "--object_size", "3", "4", "--patch_size", "2", "--hard_negatives", "2"],
    train=["--width", "16", "--epochs", "3", "--batch_size", "16"],
    nsamples="2", evaluators_epochs="1", randomisation_images="4", codebook_steps="4", codebook_eval_every="2",
    token_num="4", pairs="0:1,1:2",
    bias_world=["--train_per_class", "12", "--val_per_class", "4", "--test_per_class", "4", "--neutral_images", "24",
                "--n_codes", "640", "--patch_size", "2"],
    bias_train=["--width", "16", "--epochs", "2", "--batch_size", "16"],
    seeds=(0, 1),
)


@dataclass
class Step:
    name: str
    cwd: Path  # the script's folder, as a researcher runs it
    argv: list
    outputs: list  # absolute paths; the step is skipped when all exist
    on_force: tuple = ()  # (flag to drop, flag to add) pairs when FORCE=1 redoes a finished step

    def done(self) -> bool:
        return all(Path(o).exists() for o in self.outputs)

    def command(self, force: bool) -> list[str]:
        """The argv as run: a forced rerun replaces e.g. ``--resume auto`` by ``--overwrite``."""
        argv = [str(a) for a in self.argv]
        if force:
            for drop, add in self.on_force:
                argv = [a for a in argv if a not in drop] + list(add)
        return argv


# a forced rerun starts over instead of resuming (train.py / TIS_computation.py refuse to mix two runs)
TRAIN_FORCE = ((("--resume", "auto"), ("--overwrite",)),)
TIS_FORCE = ((("--resume",), ("--overwrite",)),)
GEN_FORCE = (((), ("--overwrite",)),)


def _root_flag(root: Path, cwd: Path) -> list[str]:
    """``--root`` as a researcher would type it: relative to the script's folder when inside it."""
    try:
        rel = os.path.relpath(root, cwd)
    except ValueError:
        rel = str(root)
    return ["--root", rel if not rel.startswith("../..") else str(root)]


def vqgan_steps(root: Path, layout: str, s: Sizes, full: bool) -> list[Step]:
    """The VQGAN pipeline on one synthetic world whose experiment folder is ``root``."""
    r = _root_flag(root, VQ)
    tis_root = lambda attr: ExperimentPaths(root=root).tis_root(attr) / "Net1"
    tis = lambda split, attr: Step(
        f"TIS {split} ({attr}, {layout} world)", VQ,
        ["TIS_computation.py", "--model", "1", "--data_type", split, "--batch_size", "25", "--attribution", attr,
         "--nsamples", s.nsamples, "--resume", *r],
        [tis_root(attr) / f"TIS_value_{split}" / "label_0.csv"], TIS_FORCE)
    steps = [
        Step(f"generate the {layout} world", VQ,
             ["generate_dataset.py", "--source", "synthetic", "--concept_layout", layout, "--layout", "compact",
              *s.world, *r], [root / "datasets/generation_args.json"], GEN_FORCE),
        Step(f"train IEM ({layout} world)", VQ, ["train.py", "--model", "1", *s.train, "--resume", "auto", *r],
             [root / "checkpoints/ClassificationNet1/best_model.pth"], TRAIN_FORCE),
        Step(f"test IEM ({layout} world)", VQ, ["test.py", "--model", "1", *r],
             [root / "results/Classification/ClassificationNet1/testing_results.csv"]),
    ]
    for attr in ("smoothgrad", "smoothgrad_x_input"):
        steps.append(tis("train", attr))
        steps.append(Step(f"TIS analysis ({attr}, {layout} world)", VQ,
                          ["TIS_analysis.py", "--model", "1", "--attribution", attr, "--enrichment", *r],
                          [tis_root(attr) / "TIS_statistics_train" / "global_top_tokens_statistics.csv"]))
    steps += [
        Step(f"frequency baseline ({layout} world)", VQ, ["generate_freq_based_tokens.py", *r],
             [root / "results/TIS/frequency_baseline/label_0.csv"]),
        Step(f"concept recovery ({layout} world)", VQ / "explanation_evaluation",
             ["concept_recovery.py", *_root_flag(root, VQ / "explanation_evaluation")],
             [root / "results/Explanation/concept_recovery.csv"]),
    ]
    if full:
        steps.insert(3, tis("test", "smoothgrad"))
        e = _root_flag(root, VQ / "eval")
        out = root / "results/Explanation/model_1"
        steps += [
            Step("train the synthetic evaluators", VQ, ["train_evaluators.py", "--epochs", s.evaluators_epochs, *r],
                 [root / "checkpoints/evaluators/evaluators.csv"]),
            Step("sample-level (image) explanation", VQ / "eval",
                 ["sample_image_level_explanation.py", "--model", "1", "--evaluators", "synthetic", *e],
                 [out / "sample_image_level_results.csv"]),
            Step("sample-level (concept) explanation", VQ / "eval",
                 ["sample_concept_level_explanation.py", "--model", "1", "--top_n", "20", "--token_num",
                  s.token_num, "--evaluators", "synthetic", *e],
                 [out / f"sample_concept_level_results_top20_token{s.token_num}.csv"]),
            Step("codebook-level explanation", VQ / "eval",
                 ["codebook_level_explanation.py", "--model", "1", "--optimization_type", "token", "--steps",
                  s.codebook_steps, "--lr", s.codebook_lr, "--eval_every", s.codebook_eval_every, "--pairs", s.pairs,
                  "--images_per_label", "2", "--evaluators", "synthetic", *e],
                 [out / f"codebook_level_results_token_{s.codebook_steps}_{s.codebook_lr}.csv"]),
            Step("model-randomisation sanity check", VQ / "explanation_evaluation",
                 ["model_randomisation.py", "--model", "1", "--num_images", s.randomisation_images, "--nsamples",
                  s.nsamples, *_root_flag(root, VQ / "explanation_evaluation")],
                 [out / "model_randomisation.csv"]),
        ]
    return steps


def dalle_steps(root: Path, s: Sizes) -> list[Step]:
    r = _root_flag(root, DA)
    steps = [Step("generate the bias worlds", DA,
                  ["generate_dataset.py", "--source", "synthetic", "--bias_type", "all", "--layout", "compact",
                   *s.bias_world, *r],
                  [root / "datasets/doctor_original/information/results_none.csv",
                   root / "datasets/doctor_color/embeddings/test_embeddings.csv"], GEN_FORCE)]
    for bt in ("doctor_gender", "doctor_color"):
        b = ["--bias_type", bt, *r]
        res = root / "results" / bt
        steps += [
            Step(f"train IEM ({bt})", DA, ["train.py", "--model", "1", *s.bias_train, "--resume", "auto", *b],
                 [root / f"checkpoints/{bt}/ClassificationNet1/best_model.pth"], TRAIN_FORCE),
            Step(f"test IEM ({bt})", DA, ["test.py", "--model", "1", *b],
                 [res / "Classification/ClassificationNet1/testing_results.csv"]),
        ]
        for attr in DALLE_ATTRIBUTIONS:
            tis = ExperimentPaths("dalle", root, bt).tis_root(attr) / "Net1"
            a = ["--attribution", attr]
            steps += [
                Step(f"TIS ({bt}, {attr})", DA, ["TIS_computation.py", "--model", "1", "--batch_size", "25",
                                                 "--nsamples", s.nsamples, "--resume", *a, *b],
                     [tis / "TIS_value_train/label_1.csv"], TIS_FORCE),
                Step(f"TIS analysis ({bt}, {attr})", DA, ["TIS_analysis.py", "--model", "1", *a, *b],
                     [tis / "TIS_statistics_train/global_top_tokens_statistics.csv"]),
                Step(f"bias detection ({bt}, {attr})", DA, ["bias_detection.py", "--model", "1", "--top_n", "5",
                                                            "--token_num", "10", *a, *b],
                     [res / "Bias_detection" / bias_file(attr)]),
            ]
    return steps


DALLE_ATTRIBUTIONS = ("smoothgrad", "smoothgrad_x_input")
# the report's sections from this heading on are not copied into the README (scripts/check_readme_demo.py)
DETAIL_HEADING = "## Seed 0's evaluation in detail (this report only)"


def _seed_flags(root: Path, seed: int, cwd: Path, bias_type: str | None = None, only=("checkpoint_dir", "results_dir")):
    """``--checkpoint_dir/--results_dir`` of seed ``seed``'s folders (cortex.analysis.replicates.seed_dirs), relative to the
    script's folder as a researcher would type them."""
    out = []
    for key, path in seed_dirs(root, seed, bias_type).items():
        if key in only:
            out += [f"--{key}", _root_flag(path, cwd)[1]]
    return out


def vqgan_replicate_steps(root: Path, s: Sizes, seed: int) -> list[Step]:
    """Seed ``seed``'s replicate on the world of ``root`` (generated by seed 0): train and test the IEM, TIS and
    statistics with both attributions, frequency baseline, concept recovery, concept-level masking."""
    r, tag = _root_flag(root, VQ), f"seed {seed}"
    sd = lambda cwd, only=("checkpoint_dir", "results_dir"): ["--seed", str(seed), *_seed_flags(root, seed, cwd,
                                                                                                only=only)]
    paths = seed_paths("vqgan", root, seed)
    steps = [
        Step(f"train IEM ({tag})", VQ, ["train.py", "--model", "1", *s.train, "--resume", "auto", *r, *sd(VQ)],
             [paths.best_ckpt(1)], TRAIN_FORCE),
        Step(f"test IEM ({tag})", VQ, ["test.py", "--model", "1", *r, *sd(VQ)], [paths.testing_results(1)]),
    ]
    for attr in DALLE_ATTRIBUTIONS:
        steps += [
            Step(f"TIS train ({attr}, {tag})", VQ,
                 ["TIS_computation.py", "--model", "1", "--data_type", "train", "--batch_size", "25", "--attribution",
                  attr, "--nsamples", s.nsamples, "--resume", *r, *sd(VQ)],
                 [paths.tis_file(1, "train", 0, attr)], TIS_FORCE),
            Step(f"TIS analysis ({attr}, {tag})", VQ,
                 ["TIS_analysis.py", "--model", "1", "--attribution", attr, *r, *sd(VQ)[2:]],
                 [paths.stats_dir(1, attr) / "global_top_tokens_statistics.csv"]),
        ]
    ev, ee = VQ / "eval", VQ / "explanation_evaluation"
    res_only = lambda cwd: _seed_flags(root, seed, cwd, only=("results_dir",))
    steps += [
        Step(f"frequency baseline ({tag})", VQ, ["generate_freq_based_tokens.py", *r, *res_only(VQ)],
             [paths.frequency_file(0)]),
        Step(f"concept recovery ({tag})", ee, ["concept_recovery.py", *_root_flag(root, ee), *sd(ee)[2:]],
             [paths.results_dir / "Explanation/concept_recovery.csv"]),
        # the evaluators are seed 0's (checkpoints/evaluators): only the IEM and its concept tokens change
        Step(f"sample-level (concept) explanation ({tag})", ev,
             ["sample_concept_level_explanation.py", "--model", "1", "--top_n", "20", "--token_num", s.token_num,
              "--evaluators", "synthetic", "--no_figures", *_root_flag(root, ev), *sd(ev)[2:],
              "--evaluator_dir", _root_flag(root / "checkpoints/evaluators", ev)[1]],
             [paths.explanation_dir(1) / f"sample_concept_level_results_top20_token{s.token_num}.csv"]),
    ]
    return steps


def dalle_replicate_steps(root: Path, s: Sizes, seed: int) -> list[Step]:
    """Seed ``seed``'s replicate of both bias worlds: train and test the IEM, TIS, statistics, bias detection."""
    r, steps = _root_flag(root, DA), []
    for bt in ("doctor_gender", "doctor_color"):
        b = ["--bias_type", bt, *r, *_seed_flags(root, seed, DA, bt)]
        paths, tag = seed_paths("dalle", root, seed, bt), f"{bt}, seed {seed}"
        steps += [
            Step(f"train IEM ({tag})", DA, ["train.py", "--model", "1", *s.bias_train, "--resume", "auto", "--seed",
                                            str(seed), *b], [paths.best_ckpt(1)], TRAIN_FORCE),
            Step(f"test IEM ({tag})", DA, ["test.py", "--model", "1", *b], [paths.testing_results(1)]),
        ]
        for attr in DALLE_ATTRIBUTIONS:
            a = ["--attribution", attr]
            steps += [
                Step(f"TIS ({tag}, {attr})", DA, ["TIS_computation.py", "--model", "1", "--batch_size", "25",
                                                  "--nsamples", s.nsamples, "--resume", "--seed", str(seed), *a, *b],
                     [paths.tis_file(1, "train", 1, attr)], TIS_FORCE),
                Step(f"TIS analysis ({tag}, {attr})", DA, ["TIS_analysis.py", "--model", "1", *a, *b],
                     [paths.stats_dir(1, attr) / "global_top_tokens_statistics.csv"]),
                Step(f"bias detection ({tag}, {attr})", DA, ["bias_detection.py", "--model", "1", "--top_n", "5",
                                                             "--token_num", "10", *a, *b],
                     [paths.bias_dir() / bias_file(attr)]),
            ]
    return steps


def bias_file(attr: str) -> str:
    return bias_csv_name(5, 10, attribution=attr)


@dataclass
class Roots:
    """Experiment folders of the demo: the repo's own by default, a scratch folder in the tests."""

    vqgan: Path
    scattered: Path
    dalle: Path

    @classmethod
    def under(cls, work: Path) -> "Roots":
        vq = work / "VQGAN_explanation"
        return cls(vq, vq / "scattered_world", work / "Dalle_explanation")


def all_steps(s: Sizes, roots: Roots) -> list[Step]:
    """Seed 0's whole pipeline, then each other seed's replicate (object world and bias worlds)."""
    steps = (vqgan_steps(roots.vqgan, "object", s, full=True) + vqgan_steps(roots.scattered, "scattered", s, full=False)
             + dalle_steps(roots.dalle, s))
    for seed in s.seeds:
        if seed != 0:
            steps += vqgan_replicate_steps(roots.vqgan, s, seed) + dalle_replicate_steps(roots.dalle, s, seed)
    return steps


def run_steps(steps: list[Step], force: bool, subprocesses: bool = False) -> list[tuple[str, float, bool]]:
    """Run each step from its script's folder, in this process (default) or as a subprocess."""
    timings = []
    for i, st in enumerate(steps, 1):
        header = f"[{i}/{len(steps)}] {st.name}"
        if st.done() and not force:
            print(f"{header}: done already, skipped (FORCE=1 to redo)")
            timings.append((st.name, 0.0, True))
            continue
        argv = st.command(force)
        print(f"\n{header}\n  cd {os.path.relpath(st.cwd, REPO)} && python {' '.join(shlex.quote(a) for a in argv)}",
              flush=True)
        t = time.time()
        if subprocesses:
            subprocess.run([sys.executable, *argv], cwd=st.cwd, check=True)
        else:
            here = os.getcwd()
            os.chdir(st.cwd)
            try:
                run_script(st.cwd / argv[0], argv[1:])
            finally:
                os.chdir(here)
        timings.append((st.name, time.time() - t, False))
    return timings


# ----------------------------------------------------------------------------- the report

def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def machine_line() -> str:
    """``Machine: <CPU model>, <n> cores, torch <version>, <date>``: the numbers' last digits depend on the CPU."""
    import platform
    from datetime import date

    import torch

    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    # the kernels' instruction set is part of "the CPU": ATen's and oneDNN's (capped by ATEN_CPU_CAPABILITY /
    # ONEDNN_MAX_CPU_ISA, e.g. to compute as an AVX2-only CPU does) round differently
    isa = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        isa += f" + oneDNN {os.environ['ONEDNN_MAX_CPU_ISA']}"
    return (f"Machine: {cpu} [{isa}], {os.cpu_count()} cores, torch {torch.__version__}, {date.today().isoformat()} "
            "(another CPU or torch build changes the last digits)")


def _significance_section(roots: Roots, out: Path) -> list[str]:
    """The label-contrast test of the concept tokens (BH q < 0.05) against the planted truth, null labels
    included; the within-image enrichment test's null-label discoveries for comparison; the null labels'
    p-value figure (the calibration check)."""
    lines = ["", "## Significant concept tokens (label-contrast test, BH q < 0.05): recall of the planted tokens, false "
             "share among the planted labels' significant tokens, and significant tokens on the labels with no "
             "planted concept", "",
             "| world | TIS | top n | recall | false share | significant tokens per null label | null labels with any |",
             "|---|---|---|---|---|---|---|"]
    enrichment, figures = [], []
    for world, root in (("object", roots.vqgan), ("scattered", roots.scattered)):
        ex = root / "results/Explanation"
        for name, into in (("concept_recovery_significance.csv", lines), ("concept_recovery_enrichment.csv", enrichment)):
            for r in (_rows(ex / name) if (ex / name).exists() else []):
                if r["label"] == "mean" and r["top_n"] in ("5", "20"):
                    if into is lines:
                        lines.append(f"| {world} | {r['method']} | {r['top_n']} | {float(r['recall']):.2f} | "
                                     f"{float(r['fdp']):.2f} | {float(r['null_discoveries']):.2f} | "
                                     f"{float(r['null_labels_with_discovery']):.2f} |")
                    else:
                        enrichment.append(f"{world} {r['method']} top {r['top_n']}: recall {float(r['recall']):.2f}, "
                                          f"false share {float(r['fdp']):.2f}, {float(r['null_discoveries']):.2f} "
                                          f"per null label")
        if (ex / "null_label_pvalues.png").exists():
            figures.append(f"![null-label p-values, {world} world]"
                           f"({os.path.relpath(ex / 'null_label_pvalues.png', out.parent)})")
    if enrichment:
        lines += ["", "For comparison, the within-image enrichment test (`tis_enrichment.csv`, not calibrated for "
                  "concepts): " + "; ".join(enrichment) + "."]
    if figures:
        lines += ["", "Null labels' p-values of the label-contrast test (histogram, and QQ plot against the uniform: "
                  "a calibrated test stays on or below the diagonal):", ""] + figures
    return lines


def _paired_section(conc: Path) -> list[str]:
    """Per image, CORTEX's drop minus the baseline's drop, with its 95% confidence interval."""
    lines = ["", "Paired per image (CORTEX's logit drop minus the baseline's), mean and 95% Student-t interval:", "",
             "| evaluator | mean paired difference | 95% CI | images |", "|---|---|---|---|"]
    for r in read_paired_stats(conc):
        if r["Metric"] == "logit_drop":
            lines.append(f"| {r['Model']} | {r['Mean_Paired_Diff']:+.2f} | [{r['CI_Low']:+.2f}, {r['CI_High']:+.2f}] "
                         f"| {r['N']} |")
    return lines


def _randomisation_section(path: Path) -> list[str]:
    """Cascading model randomisation: Spearman correlation of the TIS with the trained IEM's."""
    rows = _rows(path)
    lines = ["", "## Sanity check: cascading model randomisation (Spearman correlation of an image's 256 TIS with "
             "the trained IEM's; a sound attribution falls towards 0)", "",
             "| TIS | output layer randomised | half the layers | all layers |", "|---|---|---|---|"]
    for attr in dict.fromkeys(r["attribution"] for r in rows):
        st = sorted((r for r in rows if r["attribution"] == attr), key=lambda r: int(r["stage"]))
        pick = [st[min(1, len(st) - 1)], st[len(st) // 2], st[-1]]
        lines.append(f"| {attr} | " + " | ".join(f"{float(r['spearman_mean']):.2f}" for r in pick) + " |")
    return lines


def _replicates_sections(roots: Roots, seeds: list[int]) -> list[str]:
    """Headline numbers as mean [min, max] over the seeds, the conclusions' verdicts, and the concept tokens'
    stability across seeds (cortex.analysis.replicates)."""
    vq = {s: seed_paths("vqgan", roots.vqgan, s) for s in seeds}
    lines = ["", "## Across seeds: IEM trained and TIS computed once per seed on the same data; mean [min, max] over "
             "the seeds, and whether the conclusion holds on every seed", "",
             f"Seeds {', '.join(map(str, seeds))} (`python -m cortex.demo --seeds ...`); seed s > 0 wrote "
             "`results/replicates/seed_<s>/` and `checkpoints/replicates/seed_<s>/`.", "",
             "| quantity | mean [min, max] | per seed | holds on every seed |", "|---|---|---|---|"]

    def row(name, values, spec=".2f", flags=None):
        lines.append(f"| {name} | {fmt_interval(summarize(values), spec)} | "
                     + " / ".join(f"{v:{spec}}" for v in values) + f" | {verdict(flags) if flags is not None else ''} |")

    row("VQGAN object world: Net1 test top-1 (%)",
        [float(_rows(vq[s].testing_results(1))[0]["Top-1 Accuracy"]) for s in seeds], ".1f")
    rec = {s: {(r["method"], r["top_n"]): float(r["precision"])
               for r in _rows(vq[s].results_dir / "Explanation/concept_recovery.csv") if r["label"] == "mean"}
           for s in seeds}
    base = [rec[s][("frequency_baseline", next(t for m, t in rec[s] if m == "frequency_baseline"))] for s in seeds]
    for attr in DALLE_ATTRIBUTIONS:
        vals = [rec[s][(attr, "5")] for s in seeds]
        row(f"object world: {attr} top-5 precision@k, above the frequency baseline", vals, ".2f",
            [v > b for v, b in zip(vals, base)])
    sig = {s: {r["top_n"]: r for r in _rows(vq[s].results_dir / "Explanation/concept_recovery_significance.csv")
               if r["label"] == "mean" and r["method"] == "smoothgrad_x_input"} for s in seeds}
    if all("20" in sig[s] for s in seeds):
        rs = [sig[s]["20"] for s in seeds]
        row("object world: smoothgrad_x_input top-20 significant tokens (q < 0.05): recall, with false share "
            "<= 0.05 and no token on a null label", [float(r["recall"]) for r in rs], ".2f",
            [float(r["fdp"]) <= 0.05 and float(r["null_discoveries"]) == 0 for r in rs])
    conc = {s: next(p for p in sorted(vq[s].explanation_dir(1).glob("sample_concept_level_results_top*_token*.csv"))
                    if not p.stem.endswith("_paired")) for s in seeds}
    paired = {s: [r for r in read_paired_stats(conc[s]) if r["Metric"] == "logit_drop"] for s in seeds}
    for ev in [r["Model"] for r in paired[seeds[0]]]:
        rs = [next(r for r in paired[s] if r["Model"] == ev) for s in seeds]
        row(f"concept level, {ev}: CORTEX minus baseline logit drop, paired 95% CI above 0",
            [r["Mean_Paired_Diff"] for r in rs], "+.2f", [r["CI_Low"] > 0 for r in rs])
    stab_rows = []
    for bt in ("doctor_gender", "doctor_color"):
        da = {s: seed_paths("dalle", roots.dalle, s, bt) for s in seeds}
        row(f"DALL-E-mini {bt}: Net1 test accuracy (%)",
            [float(_rows(da[s].testing_results(1))[0]["Accuracy"]) for s in seeds], ".1f")
        gt = json.loads((da[0].data_dir / "ground_truth.json").read_text())
        want = gt["expected_direction"]["sign_of_cliff_delta_label_0"]
        runs = []
        for attr in DALLE_ATTRIBUTIONS:
            r0 = [next(r for r in read_bias_csv(da[s].bias_dir() / bias_file(attr)) if r["label"] == 0) for s in seeds]
            runs += r0
            row(f"{bt}, {attr}: Cliff's δ of label 0, planted direction found", [r["cliff_delta"] for r in r0],
                "+.3f", [r["cliff_delta"] * want > 0 for r in r0])
        sign = 1 if summarize([r["cliff_delta"] for r in runs])["mean"] >= 0 else -1
        row(f"{bt}: one direction on every seed and TIS, 95% CI excluding 0", [r["cliff_delta"] for r in runs],
            "+.3f", [r["cliff_delta"] * sign > 0 and (r["cliff_delta_ci_low"] > 0 or r["cliff_delta_ci_high"] < 0)
                     for r in runs])
        for attr in DALLE_ATTRIBUTIONS:
            stab_rows.append((f"DALL-E-mini {bt}", attr, 5, 10,
                              {s: read_run_tokens(da[s].stats_dir(1, attr), 5, 10) for s in seeds}))
    gt = json.loads((roots.vqgan / "datasets/ground_truth.json").read_text())
    k = max(len(v) for v in gt["concept_tokens"].values())
    for attr in DALLE_ATTRIBUTIONS:
        stab_rows.insert(0 if attr == DALLE_ATTRIBUTIONS[0] else 1,
                         ("VQGAN object world", attr, 5, k, {s: read_run_tokens(vq[s].stats_dir(1, attr), 5, k)
                                                             for s in seeds}))
    lines += ["", "## Stability of the concept tokens across seeds: mean pairwise Jaccard overlap of each label's "
              "top-k tokens (section Top 5; 1 = the same tokens on every seed, 0 = disjoint)", "",
              "| experiment | TIS | k | mean over labels | lowest label | labels with the same k tokens on every seed |",
              "|---|---|---|---|---|---|"]
    for name, attr, top_n, kk, tokens in stab_rows:
        st = token_stability(tokens)
        js = [v["jaccard"] for v in st.values()]
        same = sum(1 for v in st.values() if v["jaccard"] == 1.0)
        lines.append(f"| {name} | {attr} | {kk} | {sum(js) / len(js):.2f} | {min(js):.2f} | {same}/{len(js)} |")
    return lines


def report(roots: Roots, out: Path, seeds=None) -> str:
    """Read every number from the files the steps wrote and format one markdown report."""
    lines = ["# CORTEX demo report", "",
             "Synthetic worlds generated, explained and evaluated by `make demo`; every number below is read "
             "from the files the pipeline wrote. The tables after the first two are seed 0's run; the first two "
             "give each headline number over the seed replicates.", "", machine_line(), ""]
    seeds = sorted(seeds) if seeds is not None else [0]
    if len(seeds) > 1:
        lines += _replicates_sections(roots, seeds)[1:] + [""]
    # 1. IEM accuracy
    lines += ["## IEM accuracy (test split)", "", "| experiment | IEM | top-1 | top-3 | chance |", "|---|---|---|---|---|"]
    for name, root in (("VQGAN, object world", roots.vqgan), ("VQGAN, scattered world", roots.scattered)):
        r = _rows(root / "results/Classification/ClassificationNet1/testing_results.csv")[0]
        k = json.loads((root / "datasets/dataset_info.json").read_text())["num_classes"]
        lines.append(f"| {name} | Net1 | {float(r['Top-1 Accuracy']):.1f}% | {float(r['Top-3 Accuracy']):.1f}% | "
                     f"{100 / k:.1f}% |")
    for bt in ("doctor_gender", "doctor_color"):
        r = _rows(roots.dalle / f"results/{bt}/Classification/ClassificationNet1/testing_results.csv")[0]
        lines.append(f"| DALL-E-mini, {bt} | Net1 | {float(r['Accuracy']):.1f}% | | 50.0% |")
    # 2. concept recovery
    lines += ["", "## Concept recovery: precision@k of the planted concept tokens (k = planted tokens per label)", "",
              "| method | object world | scattered world |", "|---|---|---|"]
    table = {}
    for world, root in (("object", roots.vqgan), ("scattered", roots.scattered)):
        for r in _rows(root / "results/Explanation/concept_recovery.csv"):
            if r["label"] == "mean":
                key = r["method"] + (f" (top {r['top_n']})" if r["top_n"] not in ("", "-") else "")
                table.setdefault(key, {})[world] = float(r["precision"])
    for key, v in table.items():
        lines.append(f"| {key} | {v.get('object', float('nan')):.2f} | {v.get('scattered', float('nan')):.2f} |")
    lines += _significance_section(roots, out)
    # 4. bias detection
    lines += ["", "## Bias detection (DALL-E-mini synthetic world; neutral prompt planted to lean to label 0)", "",
              "| bias type | TIS | label | tokens in the label's set that are planted attribute tokens | mean hits / image "
              "| Cliff's δ [95% CI] | p | seed's δ/2 | planted direction found | direction across seeds and TIS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for bt in ("doctor_gender", "doctor_color"):
        gt = json.loads((roots.dalle / f"datasets/{bt}/embeddings/ground_truth.json").read_text())
        want = gt["expected_direction"]["sign_of_cliff_delta_label_0"]
        rob = bias_robustness_file(roots.dalle, bt, 5, 10)
        rob = {r["label"]: f"{r['verdict']} ({r['runs_same_sign']}/{r['runs']})" for r in _rows(rob)} \
            if rob.exists() else {}
        for attr, r in [(a, r) for a in DALLE_ATTRIBUTIONS
                        for r in _rows(roots.dalle / f"results/{bt}/Bias_detection" / bias_file(a))]:
            label, delta = r["label"], float(r["cliff_delta"])
            tokens = parse_tokens_cell(r["tokens"])
            planted = sum(t in set(gt["concept_tokens"][label]) for t in tokens)
            sign = want if label == "0" else -want
            lines.append(f"| {bt} | {attr} | {label} ({gt['attribute_names'][label]}) | {planted}/{len(tokens)} | "
                         f"{float(r['average_frequency_per_file']):.2f} | {delta:+.3f} "
                         f"[{float(r['cliff_delta_ci_low']):+.2f}, {float(r['cliff_delta_ci_high']):+.2f}] | "
                         f"{float(r['p_value']):.2g} | "
                         f"{float(r.get('cliff_delta_seed', 'nan')):+.3f} | {'yes' if delta * sign > 0 else 'no'} | "
                         f"{rob.get(label, 'one run only')} |")
    # seed 0's evaluation in detail: in the report only (scripts/check_readme_demo.py copies the tables above)
    lines += ["", DETAIL_HEADING, "", "Masking and optimisation with the synthetic evaluators, seed 0's run; "
              "the concept level over all seeds is in the first table."]
    # 3. evaluation with the synthetic evaluators
    ex = roots.vqgan / "results/Explanation/model_1"
    rows = _rows(ex / "sample_image_level_results.csv")
    ns = sorted({int(r["Num_Masked_Tokens"]) for r in rows if r["Method"] != "original"})
    show = [n for n in (10, 20, 30) if n in ns] or ns[:3]
    lines += ["", "## Deletion: evaluators' target probability after masking the tokens at the top-n TIS positions vs "
              "n random positions", "",
              "| evaluator | unmasked | " + " | ".join(f"TIS n={n} | random n={n}" for n in show) + " |",
              "|---|---|" + "---|---|" * len(show)]
    for ev in dict.fromkeys(r["Model"] for r in rows):
        get = lambda m, n=None: next(float(r["Avg_Probs"]) for r in rows if r["Model"] == ev and r["Method"] == m
                                     and (n is None or int(r["Num_Masked_Tokens"]) == n))
        lines.append(f"| {ev} | {get('original'):.3f} | "
                     + " | ".join(f"{get('target', n):.3f} | {get('random', n):.3f}" for n in show) + " |")
    conc = next(p for p in sorted(ex.glob("sample_concept_level_results_top*_token*.csv"))
                if not p.stem.endswith("_paired"))
    lines += ["", f"## Concept-level masking ({conc.stem.split('results_')[1]}): drop of the target logit when the "
              "label's CORTEX concept tokens vs its frequency-baseline tokens are masked", "",
              "| evaluator | original prob | CORTEX: logit drop | baseline: logit drop | CORTEX: prob | baseline: prob |",
              "|---|---|---|---|---|---|"]
    for r in _rows(conc):
        lines.append(f"| {r['Model']} | {float(r['Avg_Original_Prob']):.3f} | {float(r['Avg_Diff_Target']):.2f} | "
                     f"{float(r['Avg_Diff_Baseline']):.2f} | {float(r['Avg_Masked_Prob_Target']):.3f} | "
                     f"{float(r['Avg_Masked_Prob_Baseline']):.3f} |")
    lines += _paired_section(conc)
    cb = next(ex.glob("codebook_level_results_token_*.csv"))
    lines += ["", f"## Codebook-level optimisation ({cb.stem.split('results_')[1]}): target-label probability "
              "before and after optimising the 4x4 region's tokens", "",
              "| evaluator | initial target prob | final target prob | gain |", "|---|---|---|---|"]
    for r in _rows(cb):
        i, f = float(r["initial_target_prob"]), float(r["final_target_prob"])
        lines.append(f"| {r['model']} | {i:.3f} | {f:.3f} | {f - i:+.3f} |")
    lines += _randomisation_section(ex / "model_randomisation.csv")
    figures = (sorted((ex / "figures").glob("*.png")) + sorted(ex.glob("model_randomisation*.png"))
               + sorted(roots.dalle.glob("results/*/Bias_detection/*.png"))
               + [p for r in (roots.vqgan, roots.scattered, roots.dalle)
                  for p in sorted(r.glob("checkpoints/**/loss_curves.png"))])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out.parent)})" for p in figures]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def get_args_parser():

    p = make_parser("CORTEX demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", default=os.environ.get("FORCE", "0") not in ("", "0"),
                   help="redo every step (also FORCE=1)")
    p.add_argument("--tiny", action="store_true", help="a tiny world (seconds; used by the tests)")
    p.add_argument("--subprocesses", action="store_true",
                   help="run each script as its own `python script.py ...` process (default: in this process, "
                        "through the script's own parser and main, which saves the start-up of every step)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                   help="seed replicates: seed 0 runs the whole pipeline, every other seed retrains the IEMs and "
                        "redoes TIS, statistics, concept recovery, concept-level masking and bias detection in "
                        "results/replicates/seed_<s>/ (default: 0 1 2; --tiny: 0 1; --seeds 0: no replicates)")
    p.add_argument("--workdir", default=str(REPO),
                   help="folder holding VQGAN_explanation/ and Dalle_explanation/ experiment folders (default: the repo)")
    p.add_argument("--report", default=None, help="report path (default: <workdir>/results/demo_report.md)")
    return p


def main(args):
    t = time.time()
    sizes = TINY if args.tiny else Sizes()
    if args.seeds is not None:
        sizes = replace(sizes, seeds=tuple(dict.fromkeys([0, *args.seeds])))
    roots = Roots.under(Path(args.workdir).resolve())
    out = Path(args.report) if args.report else Path(args.workdir) / "results" / "demo_report.md"
    timings = run_steps(all_steps(sizes, roots), args.force, args.subprocesses)
    text = report(roots, out, sizes.seeds)
    print("\nstep times:\n" + "\n".join(f"  {sec:7.1f} s  {name}" + ("  (skipped)" if skipped else "")
                                        for name, sec, skipped in timings))
    print("\n" + text)
    print(f"demo finished in {time.time() - t:.0f} s ({sum(1 for *_, skipped in timings if skipped)} steps skipped); "
          f"report: {out}")
    return timings


if __name__ == "__main__":
    from cortex.cli import run_main

    run_main(main, get_args_parser)
