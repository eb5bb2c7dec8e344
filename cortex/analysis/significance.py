"""Is a concept token real? Per-token significance tests of the TIS statistics.

CORTEX ranks a label's tokens by how often they sit among an image's top-n TIS positions. Two tests ask
whether a token's place in that ranking is more than chance; they answer different questions.

* the label-contrast test (``tis_significance.csv``, the default; ``cortex.analysis.contrast``): does token t
  mark label L's images, and does the IEM rank it higher where it occurs in them? The test to cite for "token
  t carries label L's concept".
* the within-image enrichment test (``tis_enrichment.csv`` with ``--enrichment``;
  ``cortex.analysis.enrichment``): is t more often in the top n than its frequency in the images predicts? Not
  calibrated for concepts.

This module writes and reads the two files (the authors'-format sectioned files are never changed), holds
``TIS_analysis.py``'s significance step and flags, and scores significant tokens against a synthetic world's
planted truth. Exact tails and BH: ``cortex.analysis.exact_tests``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..attribution.attributions import print_smoothgrad_caveat
from ..cli import float_in, positive_int
from ..data.formats import load_token_indices
from ..paths import ENRICHMENT_FILE, SIGNIFICANCE_FILE, ExperimentPaths, label_files
from ..provenance import significance_record_path, verify, write_significance_record
from ..utils import CortexError, atomic_write, hold_writer_lock
from .contrast import MIN_TOP_IMAGES, RIVALS, SIGNIFICANCE_HEADER, STRATA, ContrastTests, contrast_tests  # noqa: F401
from .enrichment import ENRICHMENT_HEADER, TokenTests, label_tests, read_label_tis, significance_tests  # noqa: F401
from .exact_tests import ALPHA, benjamini_hochberg, hypergeom_table, sum_tail  # noqa: F401  (re-exported)
from .statistics import run_analysis


def write_significance(path, tests: dict, alpha: float | None = None, limit: int | None = None,
                       header: list | None = None) -> Path:
    """Write a tidy test file (``header``: ``SIGNIFICANCE_HEADER`` of the label-contrast test, or
    ``ENRICHMENT_HEADER``); ``alpha`` set: only tokens with ``q < alpha``."""
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(header or SIGNIFICANCE_HEADER)
        for label in sorted(tests):
            for n in sorted(tests[label]):
                w.writerows(tests[label][n].rows(alpha, limit))
    return Path(path)


_INT_COLUMNS = {"label", "top_n", "token", "count", "images", "top_images"}


def read_significance(path) -> list[dict]:
    """Rows of ``tis_significance.csv`` (label-contrast) or ``tis_enrichment.csv`` as dicts (ints and floats parsed)."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"significance file not found: {path}. Run TIS_analysis.py (it writes {SIGNIFICANCE_FILE} "
                          f"beside the statistics; {ENRICHMENT_FILE} with --enrichment).")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (SIGNIFICANCE_HEADER, ENRICHMENT_HEADER):
            raise CortexError(f"{path}: header must be {','.join(SIGNIFICANCE_HEADER)} (label-contrast test) or "
                              f"{','.join(ENRICHMENT_HEADER)} (enrichment test), got {reader.fieldnames}; a file "
                              f"from an older TIS_analysis.py: rerun it")
        out = []
        for lineno, r in enumerate(reader, start=2):
            try:
                out.append({k: int(v) if k in _INT_COLUMNS else float(v) for k, v in r.items()})
            except (TypeError, ValueError):
                raise CortexError(f"{path}:{lineno}: malformed row {r}") from None
    return out


def significant_tokens(path, alpha: float = ALPHA) -> dict[tuple[int, int], list[int]]:
    """``{(label, n): [token ids with q < alpha, file order]}`` from a significance file."""
    out: dict = {}
    for r in read_significance(path):
        if r["q_value"] < alpha:
            out.setdefault((r["label"], r["top_n"]), []).append(r["token"])
    return out


def add_significance_args(p) -> None:
    """``--significant_only``, ``--alpha``, ``--enrichment`` and ``--min_top_images`` of TIS_analysis.py."""
    p.add_argument("--significant_only", action="store_true",
                   help=f"{SIGNIFICANCE_FILE} (and {ENRICHMENT_FILE}): list only the tokens with BH q < --alpha "
                        f"(default: every token in some top n, up to --max_rows per label and n). The sectioned "
                        f"label_{{k}}.csv files keep the authors' format and content either way")
    p.add_argument("--alpha", type=float_in(0, 1, lo_open=True, hi_open=True), default=ALPHA,
                   help="false discovery rate for --significant_only (default: %(default)s)")
    p.add_argument("--enrichment", action="store_true",
                   help=f"also write {ENRICHMENT_FILE}: the within-image enrichment test (null: the top-n positions "
                        f"are a random subset of the image's positions). Not calibrated for concepts: tokens the IEM "
                        f"attends to in every label come out for every label (docs/attributions.md). Default: only "
                        f"the label-contrast test ({SIGNIFICANCE_FILE})")
    p.add_argument("--min_top_images", type=positive_int, default=MIN_TOP_IMAGES,
                   help="label-contrast test: test only tokens held in the top n by at least this many images of "
                        "any label (a label-blind filter of rare tokens; default: %(default)s)")


def run_tis_analysis(args, experiment: str) -> dict:
    """``TIS_analysis.py`` of both folders: the authors' statistics (cortex.analysis.statistics.run_analysis), then the
    label-contrast tests of the same labels (and with ``--enrichment`` the within-image test); each TIS file is
    parsed once for all."""
    stats_dir = ExperimentPaths.from_args(args, experiment).stats_dir(args.model, args.attribution)
    hold_writer_lock(stats_dir, "TIS statistics (TIS_analysis.py)", "wait for it to end (two analyses of one "
                     "TIS run into one folder would mix their files)")
    print_smoothgrad_caveat(args.attribution, "concept tokens")
    parsed = {}  # {label: (ids, scores)}
    summary = run_analysis(args, experiment, keep=parsed)
    run_significance(args, experiment, parsed=parsed)
    return summary


def run_significance(args, experiment: str, parsed: dict | None = None) -> Path:
    """TIS_analysis.py's second output: the label-contrast tests (and with ``--enrichment`` the within-image
    enrichment tests) of the labels that have statistics.

    parsed: ``{label: (ids, scores)}`` kept by ``cortex.analysis.statistics.run_analysis(keep=...)`` in the same run, so
    the TIS files and the token cache are not read a second time.
    """
    if not 0 < args.alpha < 1:
        raise CortexError(f"--alpha {args.alpha}: must lie in (0, 1)")
    paths = ExperimentPaths.from_args(args, experiment)
    stats_dir = paths.stats_dir(args.model, args.attribution)
    done = label_files(stats_dir)
    tis = {k: p for k, p in label_files(paths.tis_dir(args.model, "train", args.attribution)).items() if k in done}
    if not tis:
        raise CortexError(f"no TIS statistics in {stats_dir} to test; run TIS_analysis.py --model {args.model} first")
    parsed = dict(parsed or {})
    progress = not getattr(args, "no_progress", False)
    if not set(tis) <= set(parsed):
        token_indices = load_token_indices(paths.data_dir, "train")
        for label, path in tis.items():
            if label not in parsed:
                parsed[label] = read_label_tis(path, token_indices)
    for label, path in tis.items():
        if parsed[label][0].shape[0] == 0:
            raise CortexError(f"{path}: no rows (header only); rerun TIS_computation.py for label {label}")
    alpha = args.alpha if args.significant_only else None
    limit = getattr(args, "max_rows", None)
    top_ns = tuple(args.top_ns)
    if len(tis) < 2:
        print(f"note: one label only ({sorted(tis)}): no label-contrast test, {SIGNIFICANCE_FILE} not written")
        for stale in (stats_dir / SIGNIFICANCE_FILE, significance_record_path(stats_dir / SIGNIFICANCE_FILE)):
            stale.unlink(missing_ok=True)  # an earlier run's tests must not pass for these statistics
        out = None
    else:
        tests = contrast_tests({k: parsed[k] for k in tis}, top_ns,
                               min_top_images=getattr(args, "min_top_images", MIN_TOP_IMAGES), progress=progress)
        out = write_significance(stats_dir / SIGNIFICANCE_FILE, tests, alpha, limit, SIGNIFICANCE_HEADER)
        write_significance_record(out, stats_dir)  # the statistics_id these tests were computed with
        n_sig = {n: sum(len(t[n].significant(args.alpha)) for t in tests.values()) for n in top_ns}
        print(f"label-contrast tests (exact within-stratum permutation, BH q < {args.alpha}): significant tokens over "
              f"{len(tests)} labels: " + ", ".join(f"top {n}: {k}" for n, k in n_sig.items()) + f" -> {out}")
    if getattr(args, "enrichment", False):
        tests = significance_tests(tis, None, top_ns, progress=progress, parsed=parsed)
        enr = write_significance(stats_dir / ENRICHMENT_FILE, tests, alpha, limit, ENRICHMENT_HEADER)
        write_significance_record(enr, stats_dir)
        n_sig = {n: sum(len(t[n].significant(args.alpha)) for t in tests.values()) for n in top_ns}
        print(f"within-image enrichment tests (exact hypergeometric, BH q < {args.alpha}; not calibrated for "
              f"concepts): significant tokens: " + ", ".join(f"top {n}: {k}" for n, k in n_sig.items()) + f" -> {enr}")
        out = out or enr
    return out


# ----------------------------------------------------------------------------- null check on the synthetic world

def null_labels(data_dir) -> list[int]:
    """``null_labels`` of ``ground_truth.json`` (labels with no planted concept; ``[]`` when none)."""
    p = Path(data_dir) / "ground_truth.json"
    return [int(k) for k in json.loads(p.read_text()).get("null_labels", [])] if p.exists() else []


def significance_recovery(sig_file, planted: dict, nulls, top_ns, alpha: float = ALPHA) -> tuple[list, list]:
    """Score the significant tokens (``q < alpha``) of one statistics run against the planted truth.

    planted: ``{label: planted token ids}``; nulls: labels with no concept. Per (label, n) row: ``kind``
    (planted / null), ``significant`` (number of tokens with q < alpha), ``true_positives``, ``recall``
    (planted labels: found / planted) and ``false_discoveries`` (significant tokens that are not planted;
    on a null label every significant token). Summary per n: ``recall`` (mean over planted labels),
    ``fdp`` (false / all significant tokens of the planted labels), ``null_discoveries`` (mean significant
    tokens per null label) and ``null_labels_with_discovery`` (fraction). Returns ``(rows, summary)``.
    """
    return score_significant(significant_tokens(sig_file, alpha), planted, nulls, top_ns)


def score_significant(sig: dict, planted: dict, nulls, top_ns) -> tuple[list, list]:
    """:func:`significance_recovery` of ``sig = {(label, n): [significant token ids]}`` (any test)."""
    rows = []
    for n in top_ns:
        for label in sorted(set(planted) | set(nulls)):
            found = set(sig.get((label, n), []))
            truth = set(planted.get(label, [])) if label not in nulls else set()
            tp = len(found & truth)
            rows.append(dict(top_n=n, label=label, kind="null" if label in nulls else "planted",
                             significant=len(found), true_positives=tp,
                             recall=tp / len(truth) if truth else float("nan"), false_discoveries=len(found - truth)))
    summary = []
    for n in top_ns:
        pl = [r for r in rows if r["top_n"] == n and r["kind"] == "planted"]
        nl = [r for r in rows if r["top_n"] == n and r["kind"] == "null"]
        sig_pl = sum(r["significant"] for r in pl)
        summary.append(dict(top_n=n, recall=float(np.mean([r["recall"] for r in pl])) if pl else float("nan"),
                            fdp=sum(r["false_discoveries"] for r in pl) / sig_pl if sig_pl else 0.0,
                            null_discoveries=float(np.mean([r["significant"] for r in nl])) if nl else float("nan"),
                            null_labels_with_discovery=float(np.mean([r["significant"] > 0 for r in nl]))
                            if nl else float("nan"), planted_labels=len(pl), null_labels=len(nl)))
    return rows, summary


# ----------------------------------------------------------------------------- inputs of the current run

def check_current_run(paths, model: int, attribution: str) -> dict:
    """CortexError unless the statistics of (model, attribution) come from the *current* run.

    Current: every link of ``cortex.provenance`` up to the dataset holds -- the statistics are complete and
    match their TIS run (``cortex.provenance.check_statistics_current``), that run names the checkpoint, train CSV
    and codebook on disk now, the checkpoint was trained on this dataset, and ``tis_significance.csv`` was
    computed with these statistics. Returns the ids used (``cortex.provenance.verify``).
    """
    return verify(paths, model, statistics=True, attribution=attribution)
