"""TIS statistics (concept-level explanation), the frequency baseline, and concept recovery.

Formats (SPEC §3):

* ``TIS_statistics_train/label_{k}.csv`` -- a sectioned CSV: a row ``Total Images: N``; then for each
  n in 1, 5, 10, 20 a row ``Top n Tokens``, a row ``Token,Frequency,Files`` and up to 100 rows
  ``token,count,"f1; f2; ..."``;
* ``TIS_statistics_train/global_top_tokens_statistics.csv`` -- header ``Top N,Token,Frequency,Files``,
  the same rows over all labels;
* ``TIS_statistics_train/tis_statistics_long.csv`` -- tidy ``label,top_n,token,count`` (the rows of
  the sectioned files), for pandas;
* ``TIS/frequency_baseline/label_{k}.csv`` -- header ``Token,Count``, top 100.

Counting rule: *Frequency* is the number of top-n positions, over all images of the label, that hold
the token (a token at two of an image's top-n positions counts twice); *Files* lists each image once,
in reading order. Ties are broken deterministically: count descending, then token id ascending.
An image's top-n positions come from one stable argsort of its scores (equal scores: lower position
first), shared by every n.
"""
from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .utils import CortexError, atomic_write

TOP_NS = (1, 5, 10, 20)
MAX_ROWS = 100
FILE_SEP = "; "
_LABEL_RE = re.compile(r"^label_(\d+)\.csv$")


# ----------------------------------------------------------------------------- ranking

def rank_counts(tokens: np.ndarray, counts: np.ndarray, limit: int | None = MAX_ROWS) -> list[tuple[int, int]]:
    """``[(token, count), ...]`` sorted by count descending, then token id ascending; zero counts dropped."""
    tokens, counts = np.asarray(tokens, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    keep = counts > 0
    tokens, counts = tokens[keep], counts[keep]
    order = np.lexsort((tokens, -counts))
    if limit is not None:
        order = order[:limit]
    return [(int(tokens[i]), int(counts[i])) for i in order]


def count_tokens(ids: np.ndarray, limit: int | None = MAX_ROWS) -> list[tuple[int, int]]:
    """Occurrences of each token id in ``ids`` (any shape), ranked (``rank_counts``)."""
    toks, cnts = np.unique(np.asarray(ids, dtype=np.int64).ravel(), return_counts=True)
    return rank_counts(toks, cnts, limit)


def label_files(directory, pattern: str = "label_*.csv") -> dict[int, Path]:
    """``{label: path}`` of the ``label_{k}.csv`` files of a folder, sorted by label."""
    out = {}
    for p in Path(directory).glob(pattern):
        m = _LABEL_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- TIS statistics

def top_positions(scores: np.ndarray, max_n: int) -> np.ndarray:
    """Positions of the ``max_n`` highest scores of each row, best first: ``(N, max_n)``.

    One stable argsort per image; the top-n for every n <= max_n is a prefix of it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(-scores, axis=1, kind="stable")[:, :max_n]


def label_statistics(names: list[str], ids: np.ndarray, scores: np.ndarray, top_ns=TOP_NS,
                     limit: int | None = MAX_ROWS) -> dict[int, list[tuple[int, int, list[str]]]]:
    """TIS statistics of one label.

    names: N filenames; ids ``(N, 256)`` token ids; scores ``(N, 256)`` TIS.
    Returns ``{n: [(token, count, files), ...]}`` with up to ``limit`` rows per n.
    """
    ids = np.asarray(ids, dtype=np.int64)
    out = {}
    if len(names) == 0:
        return {n: [] for n in top_ns}
    top = top_positions(scores, max(top_ns))
    top_tokens = np.take_along_axis(ids, top, axis=1)  # (N, max_n) token id at each top position
    for n in top_ns:
        t = top_tokens[:, :n]
        ranked = count_tokens(t, limit)
        rows = []
        for tok, cnt in ranked:
            hit = np.flatnonzero((t == tok).any(axis=1))
            rows.append((tok, cnt, [names[i] for i in hit]))
        out[n] = rows
    return out


def write_stats_csv(path, total_images: int, sections: dict[int, list]) -> None:
    """The sectioned per-label statistics file (SPEC §3)."""
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow([f"Total Images: {total_images}"])
        for n, rows in sections.items():
            w.writerow([f"Top {n} Tokens"])
            w.writerow(["Token", "Frequency", "Files"])
            for tok, cnt, files in rows:
                w.writerow([tok, cnt, FILE_SEP.join(files)])


def read_stats(path) -> tuple[int | None, dict[int, list[tuple[int, int]]]]:
    """Parse a sectioned statistics file: ``(total_images, {n: [(token, count), ...]})``.

    Tolerates blank rows between sections (as in files written by other tools).
    """
    path = Path(path)
    if not path.exists():
        raise CortexError(f"TIS statistics file not found: {path}. Run TIS_analysis.py --model M first.")
    total, sections, current = None, {}, None
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            head = row[0].strip()
            if head.startswith("Total Images:"):
                total = int(head.split(":", 1)[1])
                continue
            m = re.fullmatch(r"Top (\d+) Tokens", head)
            if m:
                current = sections.setdefault(int(m.group(1)), [])
                continue
            if head == "Token":
                continue
            if current is None:
                raise CortexError(f"{path}:{lineno}: token row before any 'Top n Tokens' section")
            try:
                current.append((int(head), int(row[1])))
            except (ValueError, IndexError):
                raise CortexError(f"{path}:{lineno}: expected 'token,count,files', got {row[:2]}") from None
    return total, sections


def read_stats_section(path, top_n: int, token_num: int) -> list[int]:
    """The first ``token_num`` token ids of section ``Top {top_n} Tokens`` (concept tokens of a label)."""
    _, sections = read_stats(path)
    if top_n not in sections:
        raise CortexError(f"{path}: no 'Top {top_n} Tokens' section (found: {sorted(sections)}). "
                          f"Use --top_n among those, or rerun TIS_analysis.py.")
    return [t for t, _ in sections[top_n][:token_num]]


def token_matrix(names: list[str], token_indices: dict, where) -> np.ndarray:
    """``(N, 256)`` ids of ``names`` from the token-index cache; a missing image is a CortexError."""
    try:
        return np.asarray([token_indices[n] for n in names], dtype=np.int64).reshape(len(names), -1)
    except KeyError as e:
        raise CortexError(f"{where}: image {e.args[0]} is not in the train token indices "
                          f"(datasets/train_token_indices.pkl / train_embeddings.csv); are the TIS files from "
                          f"another dataset? Delete a stale pkl to rebuild it.") from None


def analyze_tis(tis_dir, stats_dir, token_indices: dict, top_ns=TOP_NS, limit: int = MAX_ROWS,
                progress: bool = True) -> dict:
    """Write the statistics of every ``label_{k}.csv`` in ``tis_dir`` to ``stats_dir``.

    Each TIS file is read once; the global file sums the per-label counts (all tokens, not only the
    top 100 of each label). Returns ``{"labels": [...], "images": N}``.
    """
    from tqdm import tqdm

    from .tis import read_tis_file

    tis_dir, stats_dir = Path(tis_dir), Path(stats_dir)
    files = label_files(tis_dir)
    if not files:
        raise CortexError(f"no TIS files (label_*.csv) in {tis_dir}. Run TIS_computation.py --data_type train first.")
    partial = sorted(p.name for p in tis_dir.glob("label_*.csv.partial"))
    if partial:
        print(f"warning: {len(partial)} labels of {tis_dir} are unfinished ({', '.join(partial[:5])}...); "
              f"finish them with TIS_computation.py --resume")
    g_counts = {n: defaultdict(int) for n in top_ns}
    g_files = {n: defaultdict(list) for n in top_ns}
    long_rows = []
    total = 0
    for label, path in tqdm(files.items(), desc="TIS statistics", unit="label", disable=not progress):
        names, _, scores = read_tis_file(path)
        ids = token_matrix(names, token_indices, path)
        full = label_statistics(names, ids, scores, top_ns, limit=None)
        sections = {n: rows[:limit] for n, rows in full.items()}
        write_stats_csv(stats_dir / f"label_{label}.csv", len(names), sections)
        for n, rows in full.items():
            for tok, cnt, fl in rows:
                g_counts[n][tok] += cnt
                g_files[n][tok].extend(fl)
        for n, rows in sections.items():
            long_rows.extend((label, n, tok, cnt) for tok, cnt, _ in rows)
        total += len(names)
    with atomic_write(stats_dir / "global_top_tokens_statistics.csv") as f:
        w = csv.writer(f)
        w.writerow(["Top N", "Token", "Frequency", "Files"])
        for n in top_ns:
            toks = np.fromiter(g_counts[n].keys(), dtype=np.int64)
            cnts = np.fromiter(g_counts[n].values(), dtype=np.int64)
            for tok, cnt in rank_counts(toks, cnts, limit):
                w.writerow([n, tok, cnt, FILE_SEP.join(g_files[n][tok])])
    with atomic_write(stats_dir / "tis_statistics_long.csv") as f:
        w = csv.writer(f)
        w.writerow(["label", "top_n", "token", "count"])
        w.writerows(long_rows)
    return {"labels": list(files), "images": total}


# ----------------------------------------------------------------------------- frequency baseline

def frequency_baseline(records, limit: int = MAX_ROWS) -> dict[int, list[tuple[int, int]]]:
    """``{label: [(token, count), ...]}``: the ids occurring most often in a label's images."""
    by_label = defaultdict(list)
    for r in records:
        by_label[int(r.label)].append(np.asarray(r.ids, dtype=np.int64))
    return {l: count_tokens(np.stack(v), limit) for l, v in sorted(by_label.items())}


def write_frequency_baseline(out_dir, baseline: dict[int, list[tuple[int, int]]]) -> list[Path]:
    out = []
    for label, rows in baseline.items():
        p = Path(out_dir) / f"label_{label}.csv"
        with atomic_write(p) as f:
            w = csv.writer(f)
            w.writerow(["Token", "Count"])
            w.writerows(rows)
        out.append(p)
    return out


def read_frequency_baseline(path, token_num: int | None = None) -> list[int]:
    """Token ids of a frequency-baseline file, most frequent first."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"frequency baseline not found: {path}. Run generate_freq_based_tokens.py first.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["Token", "Count"]:
            raise CortexError(f"{path}: header must be 'Token,Count', got {header}")
        toks = [int(r[0]) for r in reader if r]
    return toks if token_num is None else toks[:token_num]


# ----------------------------------------------------------------------------- concept recovery

def read_ground_truth(path) -> dict[int, list[int]]:
    """``{label: planted concept token ids}`` from ``datasets/ground_truth.json``."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"ground truth not found: {path}. It is written by generate_dataset.py for the "
                          f"synthetic world only; real data has no planted concepts.")
    gt = json.loads(path.read_text())
    if "concept_tokens" not in gt:
        raise CortexError(f"{path}: no 'concept_tokens' entry")
    return {int(k): [int(t) for t in v] for k, v in gt["concept_tokens"].items()}


def precision_at_k(predicted, planted, k: int) -> float:
    """``|first k predicted ∩ planted| / k`` (missing predictions count as misses)."""
    if k <= 0:
        return float("nan")
    return len(set(list(predicted)[:k]) & set(planted)) / k


def random_precision(occurring, planted) -> float:
    """Expected precision of k ids drawn uniformly (without replacement) from the ids occurring in a
    label's images: ``|planted ∩ occurring| / |occurring|``, for any k."""
    occ = set(occurring)
    return len(occ & set(planted)) / len(occ) if occ else float("nan")


def find_attributions(paths, model: int) -> list[str]:
    """Attributions with TIS statistics for ``model`` (the paper's ``smoothgrad`` first)."""
    from .attribution import ATTRIBUTIONS

    names = [a for a in ATTRIBUTIONS if label_files(paths.stats_dir(model, a))]
    return sorted(names, key=lambda a: (a != "smoothgrad", a))


def find_models(paths) -> list[int]:
    from .attribution import ATTRIBUTIONS

    ms = set()
    for a in ATTRIBUTIONS:
        root = paths.tis_root(a)
        if root.is_dir():
            for d in root.glob("Net*"):
                if d.name[3:].isdigit() and label_files(d / "TIS_statistics_train"):
                    ms.add(int(d.name[3:]))
    return sorted(ms)


def concept_recovery(paths, models=None, k: int | None = None, top_ns=TOP_NS,
                     attributions=None) -> tuple[list[dict], list[dict]]:
    """Precision@k of the planted concept tokens (``paths.data_dir/ground_truth.json``).

    For each model and attribution with statistics, each top_n: the first k tokens of section
    ``Top {top_n} Tokens``; plus the frequency baseline (first k of ``Token,Count``) and random
    choice (expected precision over the ids occurring in the label's train images). ``k`` defaults to
    the number of planted tokens of each label. Returns ``(per_label_rows, summary_rows)``; the rows
    are dicts with keys ``model, method, top_n, label, k, precision`` (summary: label ``"mean"``).
    """
    from .data import read_split

    planted = read_ground_truth(Path(paths.data_dir) / "ground_truth.json")
    records = read_split(paths.data_dir, "train")
    occurring = defaultdict(set)
    for r in records:
        occurring[int(r.label)].update(r.ids.tolist())
    labels = sorted(planted)
    models = list(models) if models else find_models(paths)
    rows = []

    def kk(label):
        return k if k is not None else len(planted[label])

    for m in models:
        for a in attributions or find_attributions(paths, m):
            files = label_files(paths.stats_dir(m, a))
            for n in top_ns:
                for label in labels:
                    if label not in files:
                        continue
                    _, sections = read_stats(files[label])
                    pred = [t for t, _ in sections.get(n, [])]
                    rows.append(dict(model=m, method=a, top_n=n, label=label, k=kk(label),
                                     precision=precision_at_k(pred, planted[label], kk(label))))
    freq = label_files(paths.frequency_dir())
    for label in labels:
        if label in freq:
            rows.append(dict(model="", method="frequency_baseline", top_n="", label=label, k=kk(label),
                             precision=precision_at_k(read_frequency_baseline(freq[label]), planted[label], kk(label))))
        rows.append(dict(model="", method="random", top_n="", label=label, k=kk(label),
                         precision=random_precision(occurring[label], planted[label])))
    summary = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["method"], r["top_n"])].append(r)
    for (m, a, n), rs in groups.items():
        ks = {r["k"] for r in rs}
        summary.append(dict(model=m, method=a, top_n=n, label="mean", k=ks.pop() if len(ks) == 1 else "planted",
                            precision=float(np.mean([r["precision"] for r in rs])), labels=len(rs)))
    return rows, summary


# ----------------------------------------------------------------------------- the TIS_analysis.py scripts

def analysis_parser(model_choices) -> "argparse.ArgumentParser":
    """Flags of both folders' TIS_analysis.py (the VQGAN one adds paths; the Dalle one also --bias_type)."""
    import argparse

    from .attribution import ATTRIBUTIONS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", type=int, choices=tuple(model_choices), required=True, help="IEM ClassificationNet{m}")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS to analyse (default: the paper's %(default)s)")
    p.add_argument("--top_ns", type=int, nargs="+", default=list(TOP_NS),
                   help="n of the Top n sections (default: 1 5 10 20)")
    p.add_argument("--max_rows", type=int, default=MAX_ROWS, help="tokens listed per section (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def run_analysis(args, experiment: str) -> dict:
    """TIS statistics of the train split for ``args`` (from :func:`analysis_parser` + the path flags)."""
    from .data import load_token_indices
    from .paths import ExperimentPaths
    from .utils import save_run_args

    paths = ExperimentPaths.from_args(args, experiment)
    stats_dir = paths.stats_dir(args.model, args.attribution)
    stats_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, stats_dir)
    token_indices = load_token_indices(paths.data_dir, "train")
    summary = analyze_tis(paths.tis_dir(args.model, "train", args.attribution), stats_dir, token_indices,
                          top_ns=tuple(args.top_ns), limit=args.max_rows, progress=not args.no_progress)
    print(f"TIS statistics of {len(summary['labels'])} labels ({summary['images']} images) -> {stats_dir}")
    return summary
