"""The frequency baseline (``generate_freq_based_tokens.py``): the ids occurring most often in a label's images.

``TIS/frequency_baseline/label_{k}.csv`` -- header ``Token,Count``, top 100 (SPEC §3). Every position of the
label's rows is counted in CSV order, ties in first-occurrence order (:mod:`cortex.analysis.ranking`).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..utils import CortexError
from .ranking import MAX_ROWS, compact_ids, count_tokens
from .statistics_files import StagedFiles, check_token_num, recorded_max_rows


def frequency_baseline(records, limit: int = MAX_ROWS) -> dict[int, list[tuple[int, int]]]:
    """``{label: [(token, count), ...]}``: the ids occurring most often in a label's images.

    records: ``cortex.data.Record``s, or ``(labels (N,), ids (N, 256))`` arrays (:func:`read_split_ids`).
    Counted in file order, ties in first-occurrence order (the authors' ``Counter.most_common``).
    """
    if isinstance(records, tuple):
        labels, ids = np.asarray(records[0]), compact_ids(records[1])
    else:
        labels = np.array([int(r.label) for r in records], dtype=np.int64)
        ids = compact_ids(np.array([r.ids for r in records]).reshape(len(records), -1))
    order = np.argsort(labels, kind="stable")  # rows grouped by label, file order kept
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return {int(labels[g[0]]): count_tokens(ids[g], limit) for g in np.split(order, cuts) if g.size}


def write_frequency_baseline(out_dir, baseline: dict[int, list[tuple[int, int]]]) -> list[Path]:
    """``out_dir/label_{k}.csv`` (header ``Token,Count``) for every label, each file atomic (:class:`StagedFiles`)."""
    out = []
    with StagedFiles(out_dir) as stage:
        for label, rows in baseline.items():
            p = Path(out_dir) / f"label_{label}.csv"
            with stage.open(p) as f:
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
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["Token", "Count"]:
            raise CortexError(f"{path}: header must be 'Token,Count', got {header}")
        toks = [int(r[0]) for r in reader if r]
    check_token_num(path, len(toks), token_num, recorded_max_rows(path.parent / "args.json"),
                    "frequency baseline", "generate_freq_based_tokens.py --max_rows")
    return toks if token_num is None else toks[:token_num]
