"""Seed replicates: the same pipeline run with several ``--seed`` values, summarised across seeds.

One trained IEM is one draw: another seed (or another CPU, whose float rounding changes the training) gives
another IEM, other TIS and other concept tokens. A number is worth reporting when it holds across replicates.

Where replicate outputs live (relative to the experiment folder, ``--root``)::

    seed 0 (the scripts' default --seed)   checkpoints/[{bias_type}/]...   results/[{bias_type}/]...   (the usual folders)
    seed s != 0                             checkpoints/replicates/seed_<s>/[{bias_type}/]...
                                            results/replicates/seed_<s>/[{bias_type}/]...

i.e. seed ``s`` passes ``--seed s --checkpoint_dir ... --results_dir ...`` (:func:`seed_flags`) to ``train.py``,
``test.py``, ``TIS_computation.py``, ``TIS_analysis.py``, ``bias_detection.py`` and the evaluation scripts; the
dataset is shared. The summaries below read those folders:

* :func:`summarize`: mean and **min–max** over the replicates of one number (the interval the demo report and
  the README show: a Student-t interval would assume normal outcomes, which a two-valued δ is not);
* :func:`verdict`: a conclusion (``CORTEX beats the baseline``, ``planted direction found``) that holds on every
  replicate is ``yes (n/n)``, on none ``no (0/n)``, else ``not robust (k/n)``;
* :func:`token_stability`: mean pairwise Jaccard overlap of each label's top-k concept tokens across runs (IEM
  seeds, or Net1–Net4 of one seed): 1 = the same tokens every time, 0 = disjoint;
* :func:`bias_robustness`: a bias direction is ``robust`` only when every run (seed × attribution) gives δ the
  same sign with a 95% CI that excludes 0, else ``not robust``.

    cd VQGAN_explanation/explanation_evaluation && python summarize_replicates.py --attribution smoothgrad_x_input
    cd Dalle_explanation && python summarize_replicates.py --bias_type doctor_color

writes ``results/[{bias_type}/]replicates/replicates_summary.csv`` (and, for DALL-E-mini, the bias
robustness table) from the per-seed folders the runs wrote.
"""
from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

from ..attribution.attributions import ATTRIBUTIONS
from ..cli import add_message_flags, bias_parser, experiment_folder, make_parser, position_int, positive_int, seed_int
from ..paths import ExperimentPaths, label_files
from ..utils import CortexError, atomic_write
from .bias_files import bias_csv_name, read_bias_csv
from .statistics_files import read_stats_section
from cortex.iem.registry import model_choices

REPLICATES_DIR = "replicates"
BIAS_ROBUSTNESS_HEADER = ["label", "direction", "runs", "runs_same_sign", "runs_ci_excludes_0", "delta_mean",
                          "delta_min", "delta_max", "verdict", "per_run"]


# ----------------------------------------------------------------------------- where a seed's outputs live

def seed_dirs(root, seed: int, bias_type: str | None = None) -> dict:
    """``{"checkpoint_dir": ..., "results_dir": ...}`` of seed ``seed`` (empty for seed 0: the usual folders)."""
    if seed == 0:
        return {}
    root, sub = Path(root), Path(bias_type or "")
    return {"checkpoint_dir": root / "checkpoints" / REPLICATES_DIR / f"seed_{seed}" / sub,
            "results_dir": root / "results" / REPLICATES_DIR / f"seed_{seed}" / sub}


def seed_flags(root, seed: int, bias_type: str | None = None, relative_to=None) -> list[str]:
    """The flags that send a script's outputs to seed ``seed``'s folders (``--seed`` not included)."""
    out = []
    for key, path in seed_dirs(root, seed, bias_type).items():
        out += [f"--{key}", str(Path(path).relative_to(relative_to)) if relative_to else str(path)]
    return out


def seed_paths(experiment: str, root, seed: int, bias_type: str | None = None):
    """``cortex.paths.ExperimentPaths`` of seed ``seed``'s run."""
    return ExperimentPaths(experiment=experiment, root=Path(root), bias_type=bias_type,
                           **seed_dirs(root, seed, bias_type))


def found_seeds(root, bias_type: str | None = None) -> list[int]:
    """Seed 0 and the seeds that have a ``results/replicates/seed_<s>[/bias_type]`` folder, sorted."""
    base = Path(root) / "results" / REPLICATES_DIR
    seeds = {0}
    for p in base.glob("seed_*"):
        if p.name[5:].isdigit() and (p / (bias_type or "")).is_dir():
            seeds.add(int(p.name[5:]))
    return sorted(seeds)


# ----------------------------------------------------------------------------- summaries of numbers

def summarize(values) -> dict:
    """Mean and min–max of one number over replicates: ``{"mean", "lo", "hi", "n", "values"}`` (NaNs dropped)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "values": []}
    return {"mean": sum(vals) / len(vals), "lo": min(vals), "hi": max(vals), "n": len(vals), "values": vals}


def fmt_interval(s: dict, spec: str = ".2f", unit: str = "") -> str:
    """``0.90 [0.88, 0.93]``: the mean, then the min–max over replicates (one value: the value alone)."""
    if s["n"] == 0:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:{spec}}{unit}"
    return f"{s['mean']:{spec}}{unit} [{s['lo']:{spec}}, {s['hi']:{spec}}]"


def verdict(flags) -> str:
    """``yes (n/n)`` when a conclusion holds on every replicate, ``no (0/n)`` on none, else ``not robust (k/n)``."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    if n == 0:
        return "–"
    word = "yes" if k == n else "no" if k == 0 else "not robust"
    return f"{word} ({k}/{n})"


# ----------------------------------------------------------------------------- stability of the concept tokens

def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two token collections (1.0 for two empty ones)."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def mean_pairwise_jaccard(token_sets: list) -> float:
    """Mean Jaccard overlap over all pairs of runs (NaN with fewer than two runs)."""
    pairs = list(itertools.combinations(token_sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else float("nan")


def token_stability(tokens_by_run: dict) -> dict:
    """Per label, the mean pairwise Jaccard of its top-k tokens across runs, and the tokens every run shares.

    tokens_by_run: ``{run: {label: [token, ...]}}`` (run = a seed, or a NetM). Only labels present in every run
    are compared. Returns ``{label: {"jaccard": float, "shared": [tokens in every run], "k": max list length}}``.
    """
    runs = list(tokens_by_run.values())
    if len(runs) < 2:
        raise CortexError(f"token stability needs at least two runs, got {len(runs)}")
    labels = sorted(set.intersection(*(set(r) for r in runs)))
    out = {}
    for label in labels:
        sets = [r[label] for r in runs]
        shared = set.intersection(*(set(s) for s in sets))
        out[label] = {"jaccard": mean_pairwise_jaccard(sets), "shared": [t for t in sets[0] if t in shared],
                      "k": max(len(s) for s in sets)}
    return out


def read_run_tokens(stats_dir, top_n: int, k: int) -> dict:
    """``{label: first k tokens of section Top {top_n}}`` of one run's TIS statistics folder."""
    files = label_files(stats_dir)
    if not files:
        raise CortexError(f"no TIS statistics (label_*.csv) in {stats_dir}; run TIS_analysis.py for this run first")
    return {label: read_stats_section(p, top_n, k) for label, p in files.items()}


# ----------------------------------------------------------------------------- bias directions across runs

def bias_robustness(runs: dict) -> list[dict]:
    """Is a label's bias direction the same in every run?

    runs: ``{run name: [rows of a bias CSV]}`` (``cortex.analysis.bias_files.read_bias_csv`` rows: ``label``, ``cliff_delta``,
    optionally ``cliff_delta_ci_low/high``); a run is e.g. ``seed 1, smoothgrad_x_input``. Per label: the
    direction of the runs' mean δ, how many runs share its sign, how many have a 95% CI excluding 0 and how many
    do both (``runs_agree``, not a column of the CSV). The verdict is ``robust`` when every run has that sign and
    a CI excluding 0 (runs without a CI count by sign), else ``not robust``; a single run is ``one run only``.
    """
    by_label: dict = {}
    for name, rows in runs.items():
        for r in rows:
            by_label.setdefault(int(r["label"]), []).append((name, r))
    out = []
    for label, items in sorted(by_label.items()):
        deltas = [float(r["cliff_delta"]) for _, r in items]
        s = summarize(deltas)
        sign = 1 if s["mean"] > 0 else -1 if s["mean"] < 0 else 0
        same = sum(1 for d in deltas if sign and d * sign > 0)

        def excludes_0(r):
            lo, hi = r.get("cliff_delta_ci_low"), r.get("cliff_delta_ci_high")
            if lo is None or hi is None or math.isnan(float(lo)) or math.isnan(float(hi)):
                return float(r["cliff_delta"]) != 0
            return float(lo) > 0 or float(hi) < 0

        excl = sum(1 for _, r in items if excludes_0(r))
        agree = sum(1 for _, r in items if sign and float(r["cliff_delta"]) * sign > 0 and excludes_0(r))
        robust = sign != 0 and agree == len(items)
        out.append({"label": label, "direction": "+" if sign > 0 else "-" if sign < 0 else "0", "runs": len(items),
                    "runs_same_sign": same, "runs_ci_excludes_0": excl, "delta_mean": s["mean"], "delta_min": s["lo"],
                    "delta_max": s["hi"],
                    "verdict": "one run only" if len(items) == 1 else "robust" if robust else "not robust",
                    "per_run": "; ".join(f"{name}: {float(r['cliff_delta']):+.3f}" for name, r in items),
                    "runs_agree": agree})
    return out


def bias_runs(root, bias_type: str, top_n: int = 5, token_num: int = 10, exclude_shared: bool = False) -> dict:
    """``{"seed s, <attribution>": rows}`` of every bias table of these settings found under ``root``: the
    usual ``results/{bias_type}/Bias_detection/`` (seed 0) and each ``results/replicates/seed_<s>/{bias_type}/``."""
    out = {}
    for seed in found_seeds(root, bias_type):
        folder = seed_paths("dalle", root, seed, bias_type).bias_dir()
        for attr in sorted(ATTRIBUTIONS):
            f = folder / bias_csv_name(top_n, token_num, exclude_shared, attr)
            if f.is_file():
                out[f"seed {seed}, {attr}"] = read_bias_csv(f)
    return out


def bias_robustness_file(root, bias_type: str, top_n: int, token_num: int, exclude_shared: bool = False) -> Path:
    """``results/{bias_type}/Bias_detection/token_bias_top{n}_num{k}_cliff[_noshared]_robustness.csv``."""
    name = bias_csv_name(top_n, token_num, exclude_shared).replace(".csv", "_robustness.csv")
    return seed_paths("dalle", root, 0, bias_type).bias_dir() / name


def write_bias_robustness(root, bias_type: str, top_n: int = 5, token_num: int = 10,
                          exclude_shared: bool = False) -> tuple[Path, list[dict]] | None:
    """Compare every bias run found (seeds × attributions) and write the robustness table; None when fewer
    than two runs exist."""
    runs = bias_runs(root, bias_type, top_n, token_num, exclude_shared)
    if len(runs) < 2:
        return None
    rows = bias_robustness(runs)
    out = bias_robustness_file(root, bias_type, top_n, token_num, exclude_shared)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        w = csv.DictWriter(f, fieldnames=BIAS_ROBUSTNESS_HEADER, extrasaction="ignore")  # runs_agree: in memory only
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out, rows


# ----------------------------------------------------------------------------- the summary script

SUMMARY_HEADER = ["quantity", "mean", "min", "max", "n", "per_seed"]


def summary_rows(experiment: str, root, seeds: list[int], model: int, attribution: str, top_n: int, k: int,
                 bias_type: str | None = None) -> list[dict]:
    """Accuracy per seed and the concept tokens' stability across seeds, as rows of ``SUMMARY_HEADER``."""
    rows = []
    acc = []
    for s in seeds:
        p = seed_paths(experiment, root, s, bias_type).testing_results(model)
        if p.is_file():
            with open(p, newline="") as f:
                r = next(csv.DictReader(f))
            acc.append(float(r.get("Top-1 Accuracy", r.get("Accuracy"))))
        else:
            acc.append(float("nan"))
    rows.append(_row(f"Net{model} test top-1 accuracy (%)", acc, seeds))
    tokens = {}
    for s in seeds:
        d = seed_paths(experiment, root, s, bias_type).stats_dir(model, attribution)
        try:
            tokens[s] = read_run_tokens(d, top_n, k)
        except CortexError as e:
            print(f"warning: seed {s}: {e}")
    if len(tokens) >= 2:
        stab = token_stability(tokens)
        for label, v in stab.items():
            rows.append({"quantity": f"label {label}: Jaccard of the top-{k} tokens (Top {top_n}, {attribution}) "
                                     f"across seeds", "mean": f"{v['jaccard']:.4f}", "min": "", "max": "",
                         "n": len(tokens), "per_seed": "shared: " + " ".join(map(str, v["shared"]))})
        rows.append(_row(f"mean over labels: Jaccard of the top-{k} tokens across seeds",
                         [v["jaccard"] for v in stab.values()], None))
    return rows


def model_stability_rows(experiment: str, root, seeds: list[int], models: list[int], attribution: str, top_n: int,
                         k: int, bias_type: str | None = None) -> list[dict]:
    """Per seed, the mean over labels of the pairwise Jaccard of the top-k tokens across the IEMs ``models``
    (e.g. Net1–Net4 trained on the same data): do different architectures name the same concept tokens?"""
    rows = []
    for s in seeds:
        paths = seed_paths(experiment, root, s, bias_type)
        tokens = {m: read_run_tokens(paths.stats_dir(m, attribution), top_n, k) for m in models}
        stab = token_stability(tokens)
        rows.append(_row(f"seed {s}: Jaccard of the top-{k} tokens (Top {top_n}, {attribution}) across "
                         + "/".join(f"Net{m}" for m in models) + ", mean over labels",
                         [v["jaccard"] for v in stab.values()], None))
    return rows


def _row(name: str, values, seeds) -> dict:
    s = summarize(values)
    return {"quantity": name, "mean": f"{s['mean']:.4f}", "min": f"{s['lo']:.4f}", "max": f"{s['hi']:.4f}",
            "n": s["n"], "per_seed": "" if seeds is None else
            "; ".join(f"seed {sd}: {v:.4g}" for sd, v in zip(seeds, values))}


def get_args_parser(script=None, up: int = 0, experiment: str = "vqgan"):
    """Parser of ``summarize_replicates.py`` (``script``: the script's ``__file__``; ``up``: folders above it)."""
    import argparse


    p = make_parser("summarize_replicates.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[bias_parser()] if experiment == "dalle" else [])
    p.set_defaults(experiment=experiment)
    p.add_argument("--root", default=str(experiment_folder(script, up)) if script else ".",
                   help="experiment folder holding the seed folders (default: %(default)s)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                   help="seeds to compare (default: 0 and every results/replicates/seed_<s> found)")
    p.add_argument("--model", type=int, choices=model_choices("vqgan"), default=1, help="IEM ClassificationNet{m} (default: 1)")
    p.add_argument("--attribution", default="smoothgrad", help="whose TIS statistics (default: %(default)s)")
    p.add_argument("--top_n", type=position_int, default=5, help="section 'Top n Tokens' (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=10, help="tokens per label compared (default: %(default)s)")
    p.add_argument("--across_models", type=int, choices=model_choices("vqgan"), nargs="+", default=None,
                   help="also compare the tokens of these IEMs (e.g. 1 2 3 4) with each other, per seed")
    return add_message_flags(p)


def main(args):
    root = Path(args.root).resolve()
    experiment = args.experiment
    bias_type = args.bias_type if experiment == "dalle" else None
    seeds = args.seeds or found_seeds(root, bias_type)
    if len(seeds) < 2:
        raise CortexError(f"{root}: only seed {seeds} found; run the pipeline with more seeds first "
                          "(seed s writes results/replicates/seed_<s>/, see docs/evaluation.md#seed-replicates)")
    rows = summary_rows(experiment, root, seeds, args.model, args.attribution, args.top_n, args.k, bias_type)
    if args.across_models:
        rows += model_stability_rows(experiment, root, seeds, args.across_models, args.attribution, args.top_n,
                                     args.k, bias_type)
    out = seed_paths(experiment, root, 0, bias_type).results_dir / REPLICATES_DIR / "replicates_summary.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_HEADER)
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        if r["min"] != "":
            print(f"{r['quantity']}: {r['mean']}" + (f" [min {r['min']}, max {r['max']}]" if r["min"] else ""))
    print(f"wrote {out}")
    if experiment == "dalle":
        res = write_bias_robustness(root, bias_type)
        if res:
            for r in res[1]:
                print(f"bias direction of label {r['label']}: {r['direction']} ({r['verdict']}; {r['per_run']})")
            print(f"wrote {res[0]}")
    return out


