"""`make demo`: the whole CORTEX pipeline on the embedded synthetic worlds, then one report.

Every step runs an experiment script with the flags a researcher types (``cd VQGAN_explanation; python
train.py --model 1 ...``, printed before the step), through the script's own parser and ``main`` and with
its progress bars; ``--subprocesses`` runs each as a separate ``python`` process instead. A step whose outputs exist is
skipped (set ``FORCE=1`` to redo everything). The report is printed and written to
``results/demo_report.md``; every number in it is read from the files the steps wrote.

Seed replicates (``--seeds``, default 0 1 2 3 4; cortex/analysis/replicates.py): seed 0 runs the whole pipeline, every other
seed retrains the IEMs and redoes TIS, statistics, concept recovery, concept-level masking and bias detection
in ``results/replicates/seed_<s>/`` and ``checkpoints/replicates/seed_<s>/``; the report opens with each headline
number as mean [min, max] over the seeds and whether each conclusion holds on every seed.

    python -m cortex.demo [--force] [--tiny] [--seeds 0 1 2 3 4]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .analysis.replicates import seed_dirs, seed_paths
from .cli import make_parser, seed_int
from .paths import ExperimentPaths
from .report.demo_report import DALLE_ATTRIBUTIONS, Roots, bias_file, report
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
    nsamples: str = "10"  # SmoothGrad draws (the paper's 20 doubles every TIS step; 10 fits 5 seeds in 10 minutes)
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
    # five: three seeds' min-max is too narrow to compare another CPU's run with (docs/development.md)
    seeds: tuple = (0, 1, 2, 3, 4)


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
    r, paths = _root_flag(root, VQ), ExperimentPaths(root=root)
    tis = lambda split, attr: Step(
        f"TIS {split} ({attr}, {layout} world)", VQ,
        ["TIS_computation.py", "--model", "1", "--data_type", split, "--batch_size", "25", "--attribution", attr,
         "--nsamples", s.nsamples, "--resume", *r],
        [paths.tis_file(1, split, 0, attr)], TIS_FORCE)
    steps = [
        Step(f"generate the {layout} world", VQ,
             ["generate_dataset.py", "--source", "synthetic", "--concept_layout", layout, "--layout", "compact",
              *s.world, *r], [root / "datasets/generation_args.json"], GEN_FORCE),
        Step(f"train IEM ({layout} world)", VQ, ["train.py", "--model", "1", *s.train, "--resume", "auto", *r],
             [paths.best_ckpt(1)], TRAIN_FORCE),
        Step(f"test IEM ({layout} world)", VQ, ["test.py", "--model", "1", *r], [paths.testing_results(1)]),
    ]
    for attr in ("smoothgrad", "smoothgrad_x_input"):
        steps.append(tis("train", attr))
        steps.append(Step(f"TIS analysis ({attr}, {layout} world)", VQ,
                          ["TIS_analysis.py", "--model", "1", "--attribution", attr, "--enrichment", *r],
                          [paths.stats_dir(1, attr) / "global_top_tokens_statistics.csv"]))
    steps += [
        Step(f"frequency baseline ({layout} world)", VQ, ["generate_freq_based_tokens.py", *r],
             [paths.frequency_file(0)]),
        Step(f"concept recovery ({layout} world)", VQ / "explanation_evaluation",
             ["concept_recovery.py", *_root_flag(root, VQ / "explanation_evaluation")],
             [paths.results_dir / "Explanation/concept_recovery.csv"]),
    ]
    if full:
        steps.insert(3, tis("test", "smoothgrad"))
        e = _root_flag(root, VQ / "eval")
        out = paths.explanation_dir(1)
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


def bias_world_steps(bt: str, tag: str, paths: ExperimentPaths, b: list, seed: list, s: Sizes) -> list[Step]:
    """Bias type ``bt``'s IEM trained and tested, then TIS, statistics and bias detection with each attribution.

    tag: the steps' name suffix; paths: the run's folders; b: the scripts' ``--bias_type``/``--root`` (and a
    replicate's folder) flags; seed: ``["--seed", s]`` of a replicate, else ``[]``."""
    steps = [
        Step(f"train IEM ({tag})", DA, ["train.py", "--model", "1", *s.bias_train, "--resume", "auto", *seed, *b],
             [paths.best_ckpt(1)], TRAIN_FORCE),
        Step(f"test IEM ({tag})", DA, ["test.py", "--model", "1", *b], [paths.testing_results(1)]),
    ]
    for attr in DALLE_ATTRIBUTIONS:
        a = ["--attribution", attr]
        steps += [
            Step(f"TIS ({tag}, {attr})", DA, ["TIS_computation.py", "--model", "1", "--batch_size", "25",
                                              "--nsamples", s.nsamples, "--resume", *seed, *a, *b],
                 [paths.tis_file(1, "train", 1, attr)], TIS_FORCE),
            Step(f"TIS analysis ({tag}, {attr})", DA, ["TIS_analysis.py", "--model", "1", *a, *b],
                 [paths.stats_dir(1, attr) / "global_top_tokens_statistics.csv"]),
            Step(f"bias detection ({tag}, {attr})", DA, ["bias_detection.py", "--model", "1", "--top_n", "5",
                                                         "--token_num", "10", *a, *b],
                 [paths.bias_dir() / bias_file(attr)]),
        ]
    return steps


def dalle_steps(root: Path, s: Sizes) -> list[Step]:
    r = _root_flag(root, DA)
    steps = [Step("generate the bias worlds", DA,
                  ["generate_dataset.py", "--source", "synthetic", "--bias_type", "all", "--layout", "compact",
                   *s.bias_world, *r],
                  [ExperimentPaths("dalle", root).neutral_csv(),
                   root / "datasets/doctor_color/embeddings/test_embeddings.csv"], GEN_FORCE)]
    for bt in ("doctor_gender", "doctor_color"):
        steps += bias_world_steps(bt, bt, ExperimentPaths("dalle", root, bt), ["--bias_type", bt, *r], [], s)
    return steps


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
        steps += bias_world_steps(bt, f"{bt}, seed {seed}", seed_paths("dalle", root, seed, bt),
                                  ["--bias_type", bt, *r, *_seed_flags(root, seed, DA, bt)], ["--seed", str(seed)], s)
    return steps


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
                        "results/replicates/seed_<s>/ (default: 0 1 2 3 4; --tiny: 0 1; --seeds 0: no replicates)")
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
