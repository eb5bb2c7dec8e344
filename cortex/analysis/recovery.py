"""Concept recovery: precision@k of the planted concept tokens of the synthetic world (``ground_truth.json``), for
each model and attribution with statistics, the frequency baseline and random choice."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..attribution.attributions import ATTRIBUTIONS
from ..data.formats import read_split
from ..paths import label_files
from ..utils import CortexError
from .frequency import read_frequency_baseline
from .ranking import TOP_NS
from .statistics_files import read_stats


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
    names = [a for a in ATTRIBUTIONS if label_files(paths.stats_dir(model, a))]
    return sorted(names, key=lambda a: (a != "smoothgrad", a))


def find_models(paths) -> list[int]:
    """The models with TIS statistics for any attribution."""
    return sorted({m for a in ATTRIBUTIONS for m in paths.tis_models(a) if label_files(paths.stats_dir(m, a))})


def concept_recovery(paths, models=None, k: int | None = None, top_ns=TOP_NS,
                     attributions=None) -> tuple[list[dict], list[dict]]:
    """Precision@k of the planted concept tokens (``paths.data_dir/ground_truth.json``).

    For each model and attribution with statistics, each top_n: the first k tokens of section
    ``Top {top_n} Tokens``; plus the frequency baseline (first k of ``Token,Count``) and random
    choice (expected precision over the ids occurring in the label's train images). ``k`` defaults to
    the number of planted tokens of each label. Returns ``(per_label_rows, summary_rows)``; the rows
    are dicts with keys ``model, method, top_n, label, k, precision`` (summary: label ``"mean"``).
    attributions: a list for every model, or ``{model: [attribution, ...]}``; default: all found per model.
    """
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
        attrs = attributions.get(m) if isinstance(attributions, dict) else attributions
        for a in attrs or find_attributions(paths, m):
            files = label_files(paths.stats_dir(m, a))
            for n in top_ns:
                for label in labels:
                    if label not in files:
                        continue
                    _, sections = read_stats(files[label])
                    if n not in sections:  # a missing section is no evidence of precision 0
                        raise CortexError(f"{files[label]}: no 'Top {n} Tokens' section (found: {sorted(sections)}); "
                                          f"the file is truncated or from another TIS_analysis.py run: rerun "
                                          f"TIS_analysis.py --model {m}, or pass --top_ns among those found")
                    pred = [t for t, _ in sections[n]]
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
