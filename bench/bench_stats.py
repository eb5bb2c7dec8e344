"""Benchmark: TIS statistics and the frequency baseline, the project's scripts vs a plain pandas/numpy version.

    python bench/bench_stats.py                          # 1k and 10k images
    python bench/bench_stats.py --sizes 1000 10000 100000 --labels 10 1000

For every size N and label count L (N/L images per label, at least 1) it writes a synthetic experiment
folder: ``datasets/train_embeddings.csv`` + ``train_token_indices.pkl`` (256 ids per image over 16,384
codes) and ``results/TIS/Net1/TIS_value_train/label_{k}.csv`` (256 float32-valued scores per image, as
TIS_computation.py writes them) + ``tis_config.json``. Then it times, end to end from those files:

* ``TIS_analysis.py --model 1``'s statistics (``cortex.stats.run_analysis``: checks, token cache, TIS
  parsing, statistics, writing; not the enrichment tests the script runs after them) against
  ``plain_tis_statistics`` below (pandas ``read_csv`` + ``np.fromstring`` of the score lists, numpy
  argsort, pandas ``value_counts``/``groupby`` for the counts and file lists);
* ``generate_freq_based_tokens.py`` against ``plain_frequency_baseline`` (pandas + numpy);
* bias detection (``Dalle_explanation/bias_detection.py``'s counting step, once per size N): a neutral-prompt
  set of N images (``filename,indices``) and two labels' token sets (10 ids each); ours =
  ``cortex.bias.read_neutral_set`` + ``detect_bias`` (counts, Cliff's delta, Mann-Whitney p; ``n_boot=0``: the
  bootstrap CI costs the same at every N) against ``plain_bias`` (pandas ``read_csv`` + ``np.fromstring``,
  ``np.isin`` on the (N, 256) ids, Cliff's delta by sorting).

Both sides write/return the same results; the benchmark asserts they are byte-equal (bias: equal counts and
equal ``cliff_delta`` cells), then prints images/s of each and the ratio (project / plain; >= 1 means the
project is at least as fast), the median over ``--repeats`` runs. Timings include parsing the CSVs, which
dominates. At the ``--significance_sizes`` it also times the whole TIS_analysis.py in one run: the statistics
step (keeping the parsed scores) and then the significance step (``cortex.significance.run_significance``: the
label-contrast test, the default; ``--enrichment`` adds the within-image test, timed separately) and prints
the ratio (statistics + tests) / statistics (issue 20: at most 2). Use ``--workdir`` to keep the generated
folders.
"""
import argparse
import csv
import importlib
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortex.bias import detect_bias, read_neutral_set  # noqa: E402
from cortex.scripts import load_script, run_script  # noqa: E402
from cortex.significance import run_significance  # noqa: E402
from cortex.stats import run_analysis  # noqa: E402

for _module in ("cortex.data.formats", "cortex.tis", "scipy.stats", "tqdm"):  # (torch ...) imported before any timing
    importlib.import_module(_module)

TOP_NS = (1, 5, 10, 20)
LIMIT = 100
N_CODES = 16384


# ----------------------------------------------------------------------------- synthetic inputs

def make_experiment(root: Path, n_images: int, n_labels: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_labels = min(n_labels, n_images)
    per = np.full(n_labels, n_images // n_labels)
    per[: n_images % n_labels] += 1
    data = root / "datasets"
    tis = root / "results" / "TIS" / "Net1" / "TIS_value_train"
    data.mkdir(parents=True)
    tis.mkdir(parents=True)
    cache = {}
    with open(data / "train_embeddings.csv", "w", newline="") as fcsv:
        wcsv = csv.writer(fcsv)
        wcsv.writerow(["filename", "label", "indices"])
        for label, n in enumerate(per):
            # a label's images share a pool of frequent tokens (real data: background / concept tokens)
            pool = rng.integers(0, N_CODES, 64)
            ids = np.where(rng.random((n, 256)) < 0.5, pool[rng.integers(0, 64, (n, 256))],
                           rng.integers(0, N_CODES, (n, 256)))
            scores = rng.standard_normal((n, 256)).astype(np.float32).astype(np.float64)
            with open(tis / f"label_{label}.csv", "w", newline="") as ft:
                wt = csv.writer(ft)
                wt.writerow(["filename", "label", "contribution"])
                for i in range(n):
                    name = f"{label}_{i}.npy"
                    row = ids[i].tolist()
                    cache[name] = row
                    wcsv.writerow([name, label, "[" + ", ".join(map(str, row)) + "]"])
                    wt.writerow([name, label, "[" + ", ".join(map(repr, scores[i].tolist())) + "]"])
    with open(data / "train_token_indices.pkl", "wb") as f:
        pickle.dump(cache, f)
    (data / "dataset_info.json").write_text(f'{{"num_classes": {n_labels}}}')
    (tis / "tis_config.json").write_text('{"attribution": "smoothgrad", "method": "max"}')


def make_neutral_set(path: Path, n_images: int, seed: int = 0) -> dict[int, list[int]]:
    """A neutral-prompt CSV of ``n_images`` rows (``filename,indices``) and two labels' token sets: label 0's
    tokens are planted a little more often than label 1's. Returns ``{label: [10 token ids]}``."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.choice(N_CODES, 20, replace=False)
    sets = {0: tokens[:10].tolist(), 1: tokens[10:].tolist()}
    ids = rng.integers(0, N_CODES, (n_images, 256))
    for label, p in ((0, 0.02), (1, 0.015)):
        plant = rng.random((n_images, 256)) < p
        ids[plant] = rng.choice(sets[label], int(plant.sum()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "indices"])
        w.writerows([f"{i}.png", "[" + ", ".join(map(str, row)) + "]"] for i, row in enumerate(ids.tolist()))
    return sets


# ----------------------------------------------------------------------------- the plain implementations

def _parse_lists(column, dtype) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.fromstring(",".join(s[1:-1] for s in column), dtype=dtype, sep=",").reshape(len(column), 256)


def _ranked(tokens: np.ndarray, files, limit: int = LIMIT):
    """[(token, count, files)] in the authors' order, with pandas: counts in first-seen order, stable sort."""
    s = pd.Series(tokens)
    vc = s.value_counts(sort=False).sort_values(ascending=False, kind="stable").iloc[:limit]
    if files is None:
        return [(int(t), int(c), None) for t, c in vc.items()]
    df = pd.DataFrame({"t": tokens, "f": files})
    joined = df[df.t.isin(vc.index)].groupby("t", sort=False).f.agg("; ".join)
    return [(int(t), int(c), joined[t]) for t, c in vc.items()]


def plain_tis_statistics(root: Path, out: Path) -> None:
    tis = root / "results" / "TIS" / "Net1" / "TIS_value_train"
    with open(root / "datasets" / "train_token_indices.pkl", "rb") as f:
        cache = pickle.load(f)
    labels = sorted(int(p.stem.split("_")[1]) for p in tis.glob("label_*.csv"))
    out.mkdir(parents=True, exist_ok=True)
    all_top, all_names = [], []
    for label in labels:
        df = pd.read_csv(tis / f"label_{label}.csv")
        names = df.filename.to_numpy(dtype=object)
        scores = _parse_lists(df.contribution.tolist(), np.float64)  # (N, 256)
        ids = np.array([cache[n] for n in names])  # (N, 256)
        top = np.take_along_axis(ids, np.argsort(scores, axis=1)[:, ::-1][:, :20], axis=1)  # (N, 20)
        all_top.append(top)
        all_names.append(names)
        with open(out / f"label_{label}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([f"Total Images: {len(names)}"])
            for n in TOP_NS:
                w.writerow([f"Top {n} Tokens"])
                w.writerow(["Token", "Frequency", "Files"])
                w.writerows(_ranked(top[:, :n].ravel(), np.repeat(names, n)))
    top, names = np.concatenate(all_top), np.concatenate(all_names)
    with open(out / "global_top_tokens_statistics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Top N", "Token", "Frequency", "Files"])
        for n in TOP_NS:
            w.writerow([f"Top {n} Tokens"])
            w.writerows(_ranked(top[:, :n].ravel(), np.repeat(names, n)))


def plain_frequency_baseline(root: Path, out: Path) -> None:
    df = pd.read_csv(root / "datasets" / "train_embeddings.csv")
    ids = _parse_lists(df["indices"].tolist(), np.int64)  # (N, 256)
    out.mkdir(parents=True, exist_ok=True)
    for label, rows in df.groupby("label", sort=False).indices.items():
        with open(out / f"label_{label}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Token", "Count"])
            w.writerows((t, c) for t, c, _ in _ranked(ids[rows].ravel(), None))


def plain_bias(path: Path, sets: dict[int, list[int]]) -> dict[int, tuple[np.ndarray, float]]:
    """``{label: (counts (N,), cliff_delta)}``: pandas + numpy, Cliff's delta by sorting."""
    df = pd.read_csv(path)
    ids = _parse_lists(df["indices"].tolist(), np.int64)  # (N, 256)
    out = {}
    for label, toks in sets.items():
        own = np.isin(ids, toks).sum(axis=1)  # (N,)
        rest = np.isin(ids, [t for k, ts in sets.items() if k != label for t in ts]).sum(axis=1)
        ys = np.sort(rest)
        greater = np.searchsorted(ys, own, side="left").sum()
        less = (ys.size - np.searchsorted(ys, own, side="right")).sum()
        out[label] = (own, (greater - less) / (own.size * rest.size))
    return out


def ours_bias(path: Path, sets: dict[int, list[int]]) -> dict[int, tuple[np.ndarray, float]]:
    _, ids = read_neutral_set(path)
    return {r.label: (r.counts, r.cliff_delta) for r in detect_bias(sets, ids, n_boot=0)}


# ----------------------------------------------------------------------------- timing

def _same(a: Path, b: Path, names) -> None:
    for name in names:
        if (a / name).read_bytes() != (b / name).read_bytes():
            raise AssertionError(f"{a / name} differs from the plain implementation's {b / name}")


def _timed(fn, out: list | None = None):
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        old, sys.stdout = sys.stdout, null
        try:
            result = fn()
        finally:
            sys.stdout = old
    if out is not None:
        out.append(result)
    return time.perf_counter() - t0


def _line(name: str, n_images: int, ours: float, plain: float) -> None:
    print(f"  {name:19} ours {n_images / ours:10,.0f} img/s ({ours:7.2f} s)   plain {n_images / plain:10,.0f} "
          f"img/s ({plain:7.2f} s)   ours/plain speed {plain / ours:5.2f}x", flush=True)


def bench_one(root: Path, n_images: int, n_labels: int, repeats: int, significance: bool = False,
              enrichment: bool = False, skip_plain: bool = False) -> dict:
    stats = root / "results" / "TIS" / "Net1" / "TIS_statistics_train"
    freq = root / "results" / "TIS" / "frequency_baseline"
    t = {"ours_tis": [], "plain_tis": [], "ours_freq": [], "plain_freq": []}
    args = load_script("VQGAN_explanation/TIS_analysis.py").get_args_parser().parse_args(
        ["--model", "1", "--root", str(root), "--no_progress"])  # imports done before timing
    for _ in range(repeats if not skip_plain else 0):
        t["ours_tis"].append(_timed(lambda: run_analysis(args, "vqgan")))
        t["plain_tis"].append(_timed(lambda: plain_tis_statistics(root, root / "plain_stats")))
        t["ours_freq"].append(_timed(lambda: run_script("VQGAN_explanation/generate_freq_based_tokens.py",
                                                        ["--root", root])))
        t["plain_freq"].append(_timed(lambda: plain_frequency_baseline(root, root / "plain_freq")))
    med = {}
    if not skip_plain:
        labels = sorted(p.name for p in (root / "plain_stats").glob("label_*.csv"))
        _same(stats, root / "plain_stats", [*labels, "global_top_tokens_statistics.csv"])
        _same(freq, root / "plain_freq", labels)
        med = {k: float(np.median(v)) for k, v in t.items()}
        _line("TIS statistics", n_images, med["ours_tis"], med["plain_tis"])
        _line("frequency baseline", n_images, med["ours_freq"], med["plain_freq"])
    if significance:  # the whole TIS_analysis.py in one run: statistics, then the tests on the scores kept
        parsed: dict = {}
        t_stats = _timed(lambda: run_analysis(args, "vqgan", keep=parsed))
        t_sig = _timed(lambda: run_significance(args, "vqgan", parsed=parsed))
        med.update(stats_keep=t_stats, significance=t_sig, analysis_ratio=(t_stats + t_sig) / t_stats)
        print(f"  TIS_analysis.py     statistics {t_stats:.2f} s + label-contrast tests {t_sig:.2f} s = "
              f"{(t_stats + t_sig) / t_stats:.2f} x the statistics step alone", flush=True)
        if enrichment:
            args.enrichment = True
            t_enr = _timed(lambda: run_significance(args, "vqgan", parsed=parsed)) - t_sig
            args.enrichment = False
            med.update(enrichment=t_enr)
            print(f"  --enrichment adds   {t_enr:.2f} s = {t_enr / t_stats:.2f} x the statistics step", flush=True)
    return med


def bench_bias(root: Path, n_images: int, repeats: int, seed: int) -> dict:
    path = root / "results_none.csv"
    sets = make_neutral_set(path, n_images, seed)
    t = {"ours_bias": [], "plain_bias": []}
    ours, plain = [], []
    for _ in range(repeats):
        t["ours_bias"].append(_timed(lambda: ours_bias(path, sets), ours))
        t["plain_bias"].append(_timed(lambda: plain_bias(path, sets), plain))
    for label, (counts, delta) in plain[-1].items():
        o_counts, o_delta = ours[-1][label]
        if not np.array_equal(counts, o_counts) or f"{delta:.6f}" != f"{o_delta:.6f}":
            raise AssertionError(f"bias detection, label {label}: ours differs from the plain implementation")
    med = {k: float(np.median(v)) for k, v in t.items()}
    _line("bias detection", n_images, med["ours_bias"], med["plain_bias"])
    return med


def get_args_parser():
    p = argparse.ArgumentParser("bench_stats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="numbers of images (default: 1k 10k)")
    p.add_argument("--labels", type=int, nargs="+", default=[10, 1000], help="numbers of labels (default: 10 1000)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side; the median is reported (default: 1)")
    p.add_argument("--significance_sizes", type=int, nargs="*", default=[10000],
                   help="sizes at which the whole TIS_analysis.py (statistics + tests) is timed too (default: 10000)")
    p.add_argument("--enrichment", action="store_true", help="also time TIS_analysis.py --enrichment's extra test")
    p.add_argument("--skip_plain", action="store_true",
                   help="time only the project's side of the statistics (not the pandas baselines; the byte check "
                        "against them is skipped too)")
    p.add_argument("--workdir", default=None, help="keep the generated experiments here (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_stats_"))
    results = {}
    try:
        for n in args.sizes:
            for n_labels in args.labels:
                root = work / f"n{n}_l{n_labels}"
                if root.exists():
                    shutil.rmtree(root)
                t0 = time.perf_counter()
                make_experiment(root, n, n_labels, args.seed)
                print(f"{n:,} images, {min(n_labels, n):,} labels (generated in {time.perf_counter() - t0:.1f} s):")
                results[(n, n_labels)] = bench_one(root, n, n_labels, args.repeats,
                                                   significance=n in args.significance_sizes,
                                                   enrichment=args.enrichment, skip_plain=args.skip_plain)
                if args.workdir is None:
                    shutil.rmtree(root)
            if args.skip_plain:
                continue
            root = work / f"n{n}_bias"
            if root.exists():
                shutil.rmtree(root)
            print(f"{n:,} neutral-prompt images, 2 labels x 10 tokens:")
            results[(n, "bias")] = bench_bias(root, n, args.repeats, args.seed)
            if args.workdir is None:
                shutil.rmtree(root)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
