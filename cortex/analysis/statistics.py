"""TIS statistics (concept-level explanation): a TIS run -> the statistics files, and ``TIS_analysis.py``'s main.

* ``TIS_statistics_train/source.json`` (+ a copy of ``tis_config.json``) -- which TIS run the statistics
  come from and their ``statistics_id`` (``cortex.provenance.check_statistics_current``); ``{"in_progress": true}`` from
  the first file written until the last (a killed run leaves statistics no consumer accepts);
  one link of the provenance chain of ``cortex.provenance``;

Counting rule: :mod:`cortex.analysis.ranking` (the authors': their TIS_analysis.py gives byte-equal files).
Inputs are checked first (``cortex.attribution.store.check_tis_inputs``): a missing, partial, header-only or
foreign label file, a NaN score or a repeated image is an error, not a silent skip.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from operator import itemgetter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..attribution import store
from ..attribution.attributions import ATTRIBUTIONS
from ..attribution.store import TIS_CONFIG, check_tis_inputs, fingerprint, report_problems
from ..cli import make_parser, position_int, positive_int
from ..data.formats import load_token_indices
from ..data.list_csv import split_label_counts
from ..paths import ExperimentPaths, label_files
from ..provenance import SOURCE_FILE, check_tis_run, mark_in_progress, record_id
from ..utils import CortexError, atomic_write, save_run_args
from .ranking import MAX_ROWS, TOP_NS, compact_ids, sections_from_top, top_positions, top_tokens
from .statistics_files import StagedFiles, write_global_csv, write_stats_csv


def label_statistics(names: list[str], ids: np.ndarray, scores: np.ndarray, top_ns=TOP_NS,
                     limit: int | None = MAX_ROWS) -> dict[int, list[tuple[int, int, list[str]]]]:
    """TIS statistics of one label.

    names: N filenames; ids ``(N, 256)`` token ids; scores ``(N, 256)`` TIS.
    Returns ``{n: [(token, count, files), ...]}`` with up to ``limit`` rows per n.
    """
    if len(names) == 0:
        return {n: [] for n in top_ns}
    return sections_from_top(names, top_tokens(ids, scores, max(top_ns)), top_ns, limit)


def _missing_image(where, name) -> CortexError:
    return CortexError(f"{where}: image {name} is not in the train token indices "
                       f"(datasets/train_token_indices.pkl / train_embeddings.csv); are the TIS files from "
                       f"another dataset? Delete a stale pkl to rebuild it.")


def top_token_matrix(names: list[str], positions: np.ndarray, token_indices: dict, where) -> np.ndarray:
    """Token ids at given positions of each image: ``(N, k)`` from ``positions (N, k)`` and the
    ``{filename: [256 ids]}`` cache; only the k ids per image are touched. A missing image is a CortexError."""
    k = positions.shape[1]
    try:
        rows = [itemgetter(*p)(token_indices[n]) for n, p in zip(names, positions.tolist())]
    except KeyError as e:
        raise _missing_image(where, e.args[0]) from None
    if k == 1:
        rows = [(r,) for r in rows]
    return compact_ids(np.array(rows, dtype=np.int64).reshape(len(names), k))


def token_matrix(names: list[str], token_indices: dict, where) -> np.ndarray:
    """``(N, h*w)`` ids of ``names`` from the token-index cache (256 per image for the paper's grid; the length
    of the cache's lists), in one numpy conversion; a missing image or lists of unequal length are a CortexError."""
    try:
        rows = [token_indices[n] for n in names]
    except KeyError as e:
        raise _missing_image(where, e.args[0]) from None
    if not rows:
        return np.zeros((0, len(next(iter(token_indices.values()), range(256)))), np.int16)
    try:
        return compact_ids(np.array(rows, dtype=np.int64))  # (N, h*w)
    except ValueError:
        raise CortexError(f"{where}: the token indices of these images have different lengths; rebuild "
                          f"datasets/train_token_indices.pkl (delete it) from train_embeddings.csv.") from None


def analyze_tis(tis_dir, stats_dir, token_indices, top_ns=TOP_NS, limit: int = MAX_ROWS,
                progress: bool = True, expected_labels=None, allow_partial: bool = False, hint: str = "",
                keep: dict | None = None) -> dict:
    """Write the statistics of a TIS run (``tis_dir/label_{k}.csv``) to ``stats_dir``, as the authors' script.

    token_indices: ``{filename: [256 ids]}`` or a function returning it (called after the checks).
    expected_labels: ``{label: n_images}`` of the train split (``cortex.data.list_csv.split_label_counts``); the run is
    checked by ``cortex.attribution.store.check_tis_inputs`` (a CortexError unless ``allow_partial``). Every TIS file is read
    and checked (NaN/Inf, repeated image, row count) before anything is written. Per label: top-n token
    counts (``Files``: one entry per occurrence), ties in the authors' first-occurrence order; the global
    file counts the labels in increasing label order (the authors': ``os.listdir`` order). Statistics of
    labels outside this run are removed, and ``source.json`` records the ``tis_config.json`` and each TIS
    file's fingerprint (``cortex.provenance.check_statistics_current``). Returns ``{"labels": [...], "images": N}``.
    keep: a dict to fill with ``{label: (ids (N, 256), scores (N, 256))}`` of the labels analysed, so a later
    step (the enrichment tests, ``cortex.analysis.significance.run_significance(parsed=...)``) need not parse the
    TIS files again.
    """
    tis_dir, stats_dir = Path(tis_dir), Path(stats_dir)
    if expected_labels is None:
        expected_labels = list(label_files(tis_dir))
        if not expected_labels:
            raise CortexError(f"no TIS files (label_*.csv) in {tis_dir}. Run TIS_computation.py --data_type "
                              f"train first.")
    info = check_tis_inputs(tis_dir, expected_labels, allow_partial, count_rows=False, hint=hint)
    if callable(token_indices):
        token_indices = token_indices()  # loaded once the run passed the checks
    max_n = max(top_ns)
    tops, names_of, problems = {}, {}, []
    for label in tqdm(info.labels, desc="TIS statistics", unit="label", disable=not progress):
        path = info.files[label]
        names, _, scores = store.read_tis_file(path)  # rejects NaN/Inf and repeated images
        pos = top_positions(scores, max_n)  # (N, max_n)
        if keep is None:  # only the max_n ids per image are needed
            top = top_token_matrix(names, pos, token_indices, path)  # (N, max_n); an unknown image is an error
        else:
            ids = token_matrix(names, token_indices, path)  # (N, 256)
            top = np.take_along_axis(ids, pos, axis=1)  # (N, max_n)
        want = info.expected.get(label)
        if len(names) == 0 or (want is not None and len(names) != want):
            problems.append(f"{path.name} has {len(names)} rows, the split has {want} images of label {label}")
            continue
        tops[label] = top
        names_of[label] = names
        if keep is not None:
            keep[label] = (ids, scores)
        info.rows[label] = len(names)
    if problems:
        report_problems(tis_dir, problems, len(tops), len(info.expected), allow_partial, hint)
        info.problems.extend(problems)
    labels = sorted(tops)

    stats_dir.mkdir(parents=True, exist_ok=True)
    source = stats_dir / SOURCE_FILE
    mark_in_progress(source)  # until the new statistics are complete, none are current (a kill -9 included)
    for label, path in label_files(stats_dir).items():
        if label not in tops:
            path.unlink()  # an earlier run's label: not part of this run
    long_rows = []
    with StagedFiles(stats_dir) as stage:  # every file atomic; one plain open per label file
        for label in labels:
            sections = sections_from_top(names_of[label], tops[label], top_ns, limit)
            write_stats_csv(stats_dir / f"label_{label}.csv", len(names_of[label]), sections, stage.open)
            long_rows.extend((label, n, tok, cnt) for n, rows in sections.items() for tok, cnt, _ in rows)
        every = [n for label in labels for n in names_of[label]]
        glob = sections_from_top(every, np.concatenate([tops[l] for l in labels]) if labels else
                                 np.zeros((0, max_n), np.int16), top_ns, limit)
        write_global_csv(stats_dir / "global_top_tokens_statistics.csv", glob, stage.open)
        with stage.open(stats_dir / "tis_statistics_long.csv") as f:
            w = csv.writer(f)
            w.writerow(["label", "top_n", "token", "count"])
            w.writerows(long_rows)
        with stage.open(stats_dir / "global_top_tokens_long.csv") as f:
            w = csv.writer(f)
            w.writerow(["top_n", "token", "count"])
            w.writerows((n, tok, cnt) for n, rows in glob.items() for tok, cnt, _ in rows)
    if info.config is not None:
        with atomic_write(stats_dir / TIS_CONFIG) as f:
            json.dump(info.config, f, indent=2, sort_keys=True)
    # tis_dir relative to the statistics: the same file wherever the experiment folder lies (moved, SLURM)
    record = {"tis_dir": os.path.relpath(tis_dir.resolve(), stats_dir.resolve()), "tis_config": info.config,
              "tis_config_sha1": info.config_sha1,
              "labels": {str(l): {"rows": len(names_of[l]), "fingerprint": fingerprint(info.files[l])}
                         for l in labels},
              "complete": info.complete, "problems": info.problems, "top_ns": list(top_ns), "max_rows": limit}
    record["statistics_id"] = record_id(record)  # what the significance file and the eval outputs record
    with atomic_write(source) as f:
        json.dump(record, f, indent=2)
    return {"labels": labels, "images": len(every), "complete": info.complete}


def analysis_parser(model_choices) -> argparse.ArgumentParser:
    """Flags of both folders' TIS_analysis.py (the VQGAN one adds paths; the Dalle one also --bias_type)."""
    p = make_parser(add_help=False)
    p.add_argument("--model", type=int, choices=tuple(model_choices), required=True, help="IEM ClassificationNet{m}")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS to analyse (default: the paper's %(default)s)")
    p.add_argument("--top_ns", type=position_int, nargs="+", default=list(TOP_NS),
                   help="n of the Top n sections (default: 1 5 10 20)")
    p.add_argument("--max_rows", type=positive_int, default=MAX_ROWS, help="tokens listed per section (default: %(default)s)")
    p.add_argument("--allow_partial", action="store_true",
                   help="analyse an incomplete TIS run on purpose: only the labels with a complete TIS file, with "
                        "a warning that lists what is missing (default: an incomplete run is an error)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def run_analysis(args, experiment: str, keep: dict | None = None) -> dict:
    """TIS statistics of the train split for ``args`` (from :func:`analysis_parser` + the path flags).

    The TIS run is checked against the train split's labels and image counts first
    (``check_tis_inputs``; ``--allow_partial`` to proceed on an incomplete run). keep: filled with the
    parsed ``{label: (ids, scores)}`` (:func:`analyze_tis`) for the enrichment tests that follow.
    """
    paths = ExperimentPaths.from_args(args, experiment)
    stats_dir = paths.stats_dir(args.model, args.attribution)
    tis_dir = paths.tis_dir(args.model, "train", args.attribution)
    check_tis_run(paths, args.model, "train", args.attribution)  # TIS of the current IEM on the current dataset
    expected = split_label_counts(paths.data_dir, "train")
    hint = f" (--model {args.model} --data_type train --attribution {args.attribution})"
    stats_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, stats_dir)
    summary = analyze_tis(tis_dir, stats_dir, lambda: load_token_indices(paths.data_dir, "train"), top_ns=tuple(args.top_ns), limit=args.max_rows,
                          progress=not args.no_progress, expected_labels=expected,
                          allow_partial=args.allow_partial, hint=hint, keep=keep)
    print(f"TIS statistics of {len(summary['labels'])} labels ({summary['images']} images) -> {stats_dir}")
    return summary
