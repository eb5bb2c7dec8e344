"""Is a concept token real? Per-token significance tests of the TIS statistics (issues 16.1 and 20).

CORTEX ranks a label's tokens by how often they sit among an image's top-n TIS positions. Two tests ask
whether a token's place in that ranking is more than chance; they answer different questions.

The label-contrast test (issue 20; ``tis_significance.csv``, the default; :func:`contrast_tests`)
-------------------------------------------------------------------------------------------------
Unit: the image. Among the images that contain token t, is t more often among the top-n positions in label
L's images than in the other labels' images? Null: given that an image contains t, whether t is in its top n
does not depend on the image's label. Calibrated by label permutation: the p-value is the within-stratum
label-permutation p-value, computed exactly (every permutation enumerated: a sum of hypergeometrics), so it
has no Monte-Carlo error and needs no seed. L must beat the other labels pooled *and* each of its strongest
rivals (the labels with the highest rate of t; intersection-union, the largest p-value), so tokens the IEM
attends to in every image without a concept (distractors, hard negatives) are not a concept of a label that
has none. BH across a label's tested tokens. This is the test to cite for "token t carries label L's concept".

Columns ``label,top_n,token,images,top_images,expected,ratio,p_value,q_value``: the label's images that contain
the token, those of them with the token in the top n, the count expected from the rate over all labels' images
(stratum by stratum), their ratio, the p-value and the BH q-value; per (label, n) the tokens with
``top_images > 0`` (descending, then token id; up to ``--max_rows`` rows), or with ``--significant_only``
only those with ``q < alpha``.

The within-image enrichment test (issue 16.1; ``tis_enrichment.csv`` with ``--enrichment``; :func:`label_tests`)
----------------------------------------------------------------------------------------------------------------
Per (label, n, token): is the token *more often* among the top-n positions than its frequency in those
images predicts? Not calibrated for concepts: what the IEM attends to in every label (distractors, hard
negatives, background structure) comes out enriched for every label, including labels with no concept.
Exact, valid when a token fills several positions of an image. Null hypothesis: within each image, the
TIS ranking does not depend on which token sits where, i.e. the top-n positions are a uniformly random n-subset of the 256 positions (a permutation of the scores within
each image). If token ``t`` fills ``c_i`` positions of image ``i``, the number of them among the top n is
then hypergeometric ``H(256, c_i, n)`` -- exactly, for any ``c_i`` -- and images are independent, so the
label's count ``S_t = sum_i H(256, c_i, n)``. The one-sided p-value ``P(S_t >= observed)`` is computed
exactly by convolving the hypergeometric pmfs (images with the same ``c_i`` grouped and raised to their
multiplicity by repeated squaring), on the support ``0..observed-1`` plus one "at least observed" bin, so
small p-values keep their relative precision (no ``1 - cdf`` cancellation).
A binomial ``Bin(sum_i c_i, n/256)`` shortcut is *not* used: it is anti-conservative for a token that fills
several positions of one image (e.g. n=1, one image with c=28: exact 0.109, binomial 0.104).

Per (label, n): ``expected = n/256 * sum_i c_i``, ``enrichment = count / expected``; Benjamini-Hochberg
q-values across every token occurring in the label's images (tokens never in the top n have p = 1 and count
in the number of hypotheses).

Cost of the label-contrast test: one ``np.unique`` over all ``N x 256`` ids, then vectorised hypergeometric
tails (a short convolution only for tokens in several strata). Of the enrichment test: gathering the counts
is linear in images (one ``np.unique`` over the label's ``N x 256`` ids); the exact tail costs ``O(groups x log(images) x count^2)`` per token that reaches the top n at all.

Output: ``TIS_statistics_train/tis_enrichment.csv`` (tidy), columns
``label,top_n,token,count,expected,enrichment,p_value,q_value``; per (label, n) the tokens with a count
(count descending, then token id ascending; up to ``--max_rows`` rows), or with ``--significant_only`` only
those with ``q < alpha``. The authors'-format sectioned files are never changed by this module.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .cli import float_in, positive_int
from .utils import CortexError, atomic_write

N_POS = 256
SIGNIFICANCE_FILE = "tis_significance.csv"  # the label-contrast test (below); the default
SIGNIFICANCE_HEADER = ["label", "top_n", "token", "images", "top_images", "expected", "ratio", "p_value", "q_value"]
ENRICHMENT_FILE = "tis_enrichment.csv"  # the within-image test (opt-in: TIS_analysis.py --enrichment)
RIVALS = 2  # label-contrast test: L must also beat each of the 2 other labels with the highest rate of t
MIN_TOP_IMAGES = 3  # label-blind filter: a token is tested only if >= this many images (any label) hold it in the top n
ENRICHMENT_HEADER = ["label", "top_n", "token", "count", "expected", "enrichment", "p_value", "q_value"]
ALPHA = 0.05


# ----------------------------------------------------------------------------- exact tail of a sum of hypergeometrics

@lru_cache(maxsize=None)
def hypergeom_table(n: int, n_pos: int = N_POS) -> np.ndarray:
    """``T[c, k] = P(H(n_pos, c, n) = k)``: ``(n_pos + 1, n + 1)`` float64 (k of the top n among c positions)."""
    from scipy.stats import hypergeom

    c = np.arange(n_pos + 1)[:, None]
    k = np.arange(n + 1)[None, :]
    return hypergeom.pmf(k, n_pos, c, n)


def _conv(a, b, length: int):
    """Sum of two independent variables, each ``(pmf on 0..length-1, P(>= length))``."""
    (pa, la), (pb, lb) = a, b
    if pa.size * pb.size > 4_000_000:
        from scipy.signal import fftconvolve

        full = np.clip(fftconvolve(pa, pb), 0.0, None)
    else:
        full = np.convolve(pa, pb)
    # P(X+Y >= L) = P(X >= L) + P(X < L) P(Y >= L) + P(X < L, Y < L, X + Y >= L)
    lump = la + pa.sum() * lb + full[length:].sum()
    return full[:length], min(lump, 1.0)


def sum_tail(pmfs, mults, threshold: int) -> float:
    """``P(sum >= threshold)`` of independent variables: ``mults[j]`` copies with pmf ``pmfs[j]`` (on 0, 1, ...)."""
    if threshold <= 0:
        return 1.0
    acc = (np.ones(1), 0.0)
    for pmf, m in zip(pmfs, mults):
        pmf = np.asarray(pmf, dtype=np.float64)
        power = (pmf[:threshold].copy(), float(pmf[threshold:].sum()))
        m = int(m)
        while m:
            if m & 1:
                acc = _conv(acc, power, threshold)
            m >>= 1
            if m:
                power = _conv(power, power, threshold)
    return float(acc[1])


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values of ``p`` (any shape; monotone, capped at 1)."""
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    flat = p.ravel()
    order = np.argsort(flat, kind="stable")
    q = flat[order] * (flat.size / np.arange(1, flat.size + 1))  # p_(i) m / i
    q = np.minimum.accumulate(q[::-1])[::-1]  # monotone: the smallest over ranks >= i
    out = np.empty_like(flat)
    out[order] = np.minimum(q, 1.0)
    return out.reshape(p.shape)  # = scipy.stats.false_discovery_control(p, method="bh"), without its overhead


# ----------------------------------------------------------------------------- one label

def _ranked(tokens: np.ndarray, count: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indices of the kept tokens, ``count`` descending, then token id ascending (the order of every table)."""
    idx = np.flatnonzero(keep)
    return idx[np.lexsort((tokens[idx], -count[idx]))]


@dataclass
class TokenTests:
    """Enrichment tests of one (label, n): arrays over the tokens occurring in the label's images, shape ``(T,)``."""

    label: int
    top_n: int
    tokens: np.ndarray  # int64 token ids (ascending)
    count: np.ndarray  # int64 top-n positions holding the token, over all images
    occurrences: np.ndarray  # int64 positions holding the token, over all images (sum_i c_i)
    expected: np.ndarray  # float64 n/256 * occurrences
    p_value: np.ndarray  # float64 one-sided exact P(S >= count)
    q_value: np.ndarray  # float64 Benjamini-Hochberg over the T tokens

    @property
    def enrichment(self) -> np.ndarray:
        return self.count / self.expected

    def significant(self, alpha: float = ALPHA) -> np.ndarray:
        """Token ids with ``q < alpha``, count descending (then token ascending)."""
        return self.tokens[_ranked(self.tokens, self.count, self.q_value < alpha)]

    def rows(self, alpha: float | None = None, limit: int | None = None) -> list[list]:
        """CSV rows (``ENRICHMENT_HEADER``) of the tokens with a count (or with ``q < alpha``), ranked by count."""
        idx = _ranked(self.tokens, self.count, self.count > 0 if alpha is None else self.q_value < alpha)[:limit]
        enr = self.enrichment
        return [[self.label, self.top_n, int(self.tokens[i]), int(self.count[i]), f"{self.expected[i]:.6g}",
                 f"{enr[i]:.6g}", f"{self.p_value[i]:.6g}", f"{self.q_value[i]:.6g}"] for i in idx]


def label_tests(label: int, ids: np.ndarray, scores: np.ndarray, top_ns) -> dict[int, TokenTests]:
    """Enrichment tests of one label for every n in ``top_ns``.

    ids ``(N, 256)`` token ids, scores ``(N, 256)`` TIS of the label's images. Top-n positions come from
    ``cortex.stats.top_positions`` (the rule of the sectioned files). Returns ``{n: TokenTests}``.
    """
    from .stats import top_positions

    ids = np.asarray(ids, dtype=np.int64)
    N = ids.shape[0]
    if N == 0:
        raise CortexError(f"label {label}: no images to test")
    n_pos = ids.shape[1]  # h*w positions per image (256 for the paper's 16x16 grid)
    if np.shape(scores) != ids.shape:
        raise CortexError(f"label {label}: {np.shape(scores)[-1]} TIS scores but {n_pos} token ids per image; are "
                          f"the TIS files from another dataset?")
    tokens, inv = np.unique(ids, return_inverse=True)  # tokens (T,), inv (N*n_pos,) index into tokens
    inv = inv.reshape(N, n_pos)
    T = tokens.size
    occurrences = np.bincount(inv.ravel(), minlength=T)  # (T,)
    # per (image, token): c_i = positions of the token in image i, grouped per token by value of c
    pair, c = np.unique(np.arange(N)[:, None] * T + inv, return_counts=True)
    pair_tok = pair % T
    grp, mult = np.unique(pair_tok * (n_pos + 1) + c, return_counts=True)  # (token, c) -> number of images
    grp_tok, grp_c = grp // (n_pos + 1), grp % (n_pos + 1)
    starts = np.searchsorted(grp_tok, np.arange(T + 1))
    top = top_positions(scores, max(top_ns))  # (N, max_n)
    out = {}
    for n in top_ns:
        count = np.bincount(np.take_along_axis(inv, top[:, :n], axis=1).ravel(), minlength=T)  # (T,)
        table = hypergeom_table(min(int(n), n_pos), n_pos)
        p = np.ones(T)
        for t in np.flatnonzero(count):
            s, e = starts[t], starts[t + 1]
            p[t] = sum_tail(table[grp_c[s:e]], mult[s:e], int(count[t]))
        out[n] = TokenTests(int(label), int(n), tokens, count, occurrences, occurrences * (min(n, n_pos) / n_pos), p,
                            benjamini_hochberg(p))
    return out


# ----------------------------------------------------------------------------- a TIS run

def read_label_tis(path, token_indices: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (N, 256), scores (N, 256))`` of one ``TIS_value_*/label_{k}.csv`` (the TIS-file parser of cortex)."""
    from .stats import token_matrix
    from .tis import read_tis_file

    names, _, scores = read_tis_file(path)
    return token_matrix(names, token_indices, path), scores


def significance_tests(tis_files: dict, token_indices: dict | None, top_ns, progress: bool = True,
                       parsed: dict | None = None) -> dict:
    """``{label: {n: TokenTests}}`` for the TIS files ``{label: path}``; parsed: ``{label: (ids, scores)}``
    already read (``cortex.stats.analyze_tis(keep=...)``): those files are not read again."""
    from tqdm import tqdm

    parsed = parsed or {}
    out = {}
    for label, path in tqdm(tis_files.items(), desc="enrichment tests", unit="label", disable=not progress):
        ids, scores = parsed[label] if label in parsed else read_label_tis(path, token_indices)
        if ids.shape[0] == 0:
            raise CortexError(f"{path}: no rows (header only); rerun TIS_computation.py for label {label}")
        out[int(label)] = label_tests(label, ids, scores, top_ns)
    return out


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
    """``TIS_analysis.py`` of both folders: the authors' statistics (cortex.stats.run_analysis), then the
    label-contrast tests of the same labels (and with ``--enrichment`` the within-image test); each TIS file is
    parsed once for all."""
    from .attribution import print_smoothgrad_caveat
    from .paths import ExperimentPaths
    from .stats import run_analysis
    from .utils import hold_writer_lock

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

    parsed: ``{label: (ids, scores)}`` kept by ``cortex.stats.run_analysis(keep=...)`` in the same run, so
    the TIS files and the token cache are not read a second time.
    """
    from cortex.data.formats import load_token_indices
    from .paths import ExperimentPaths
    from .provenance import significance_record_path, write_significance_record
    from .stats import label_files

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
                               getattr(args, "min_top_images", MIN_TOP_IMAGES), progress)
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
    import json

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


# ----------------------------------------------------------------------------- inputs of the current run (issue 14.5)

def check_current_run(paths, model: int, attribution: str) -> dict:
    """CortexError unless the statistics of (model, attribution) come from the *current* run.

    Current: every link of ``cortex.provenance`` up to the dataset holds -- the statistics are complete and
    match their TIS run (``cortex.stats.check_statistics_current``), that run names the checkpoint, train CSV
    and codebook on disk now, the checkpoint was trained on this dataset, and ``tis_significance.csv`` was
    computed with these statistics. Returns the ids used (``cortex.provenance.verify``).
    """
    from .provenance import verify

    return verify(paths, model, statistics=True, attribution=attribution)


# ----------------------------------------------------------------------------- the label-contrast test (issue 20)

# strata of a token's count c in an image (index = STRATA[name][c]; 0: absent)
STRATA = {"occurrence": np.minimum(np.arange(N_POS + 1), 1),  # condition on occurrence: one stratum, c >= 1
          "count": np.minimum(np.ceil(np.log2(np.maximum(np.arange(N_POS + 1), 1))).astype(np.int64) + 1, 6)
          * (np.arange(N_POS + 1) > 0)}  # c = 1, 2, 3-4, 5-8, 9-16, 17+


@dataclass
class ContrastTests:
    """Label-contrast tests of one (label, n): arrays over the tested tokens occurring in the label's images, ``(T,)``."""

    label: int
    top_n: int
    tokens: np.ndarray  # int64 token ids (ascending)
    images: np.ndarray  # int64 the label's images that contain the token
    top_images: np.ndarray  # int64 ... of which hold it among their top-n positions
    expected: np.ndarray  # float64 top_images expected from the rate over all labels' images, per stratum
    p_value: np.ndarray  # float64 exact one-sided P(top_images >= observed) under within-stratum label permutation
    q_value: np.ndarray  # float64 Benjamini-Hochberg over the T tokens

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.top_images / self.expected

    def significant(self, alpha: float = ALPHA) -> np.ndarray:
        """Token ids with ``q < alpha``, top_images descending (then token ascending)."""
        return self.tokens[_ranked(self.tokens, self.top_images, self.q_value < alpha)]

    def rows(self, alpha: float | None = None, limit: int | None = None) -> list[list]:
        """CSV rows (``SIGNIFICANCE_HEADER``) of the tokens with top_images > 0 (or with ``q < alpha``)."""
        idx = _ranked(self.tokens, self.top_images, self.top_images > 0 if alpha is None else self.q_value < alpha)
        idx = idx[:limit]
        cols = zip(*(a[idx].tolist() for a in (self.tokens, self.images, self.top_images, self.expected, self.ratio,
                                                self.p_value, self.q_value)))  # Python scalars: fast to format
        return [[self.label, self.top_n, t, m, o, f"{e:.6g}", f"{r:.6g}", f"{p:.6g}", f"{q:.6g}"]
                for t, m, o, e, r, p, q in cols]


def _token_index(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens (T,) ascending, inv (N, P))`` with ``tokens[inv] == ids``; a lookup table, no sort, for ids
    in ``0 .. 2^24`` (codebook ids), else ``np.unique``."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= 1 << 24:
        tokens, inv = np.unique(ids, return_inverse=True)
        return tokens, inv.reshape(ids.shape)
    present = np.zeros(hi + 1, bool)
    present[ids.ravel()] = True
    lut = np.cumsum(present) - 1
    return np.flatnonzero(present), lut[ids]


def _hypergeom_sf(k, M, n, N) -> np.ndarray:
    """``P(X >= k)``, X ~ hypergeometric(M population, n successes, N draws), vectorised (float64)."""
    from scipy.stats import hypergeom

    return np.clip(hypergeom.sf(np.asarray(k) - 1, M, n, N), 0.0, 1.0)


def contrast_tests(parsed: dict, top_ns, min_top_images: int = MIN_TOP_IMAGES, rivals: int = RIVALS,
                   strata: str = "occurrence", progress: bool = False) -> dict:
    """The label-contrast test of every (label, n, token): ``{label: {n: ContrastTests}}``.

    parsed: ``{label: (ids (N_k, 256), scores (N_k, 256))}``, every label of the run (the contrast is between
    labels). The unit is the image. For token t, its images (those that contain it) are split into strata by
    t's count in the image (``strata``: ``"occurrence"``, the default, one stratum: condition on occurrence;
    ``"count"``: 1, 2, 3-4, 5-8, 9-16, 17+ positions); in stratum s, ``n_s`` images contain t, ``a_s`` of them
    hold it among their top-n positions, and label L owns ``m_s`` of them. Null hypothesis: within each
    stratum, whether an image holds t in its top n does not depend on its label (labels exchangeable among the
    images of a stratum). Under it, L's count is a sum over strata of independent hypergeometrics
    ``H(n_s, a_s, m_s)``, and ``P(sum >= observed)`` is the within-stratum label-permutation p-value with every
    permutation enumerated: exact, no Monte-Carlo error, no seed, the same for any order of the images.

    Intersection-union with the strongest rivals: the same exact test is repeated against each of the
    ``rivals`` other labels with the highest rate of t (``top_images / (images + 2)``), pooling only L and that
    label; the p-value is the largest. A label with no concept then does not get the tokens that the IEM
    attends to whenever no concept competes for the top n (distractors, hard negatives): another label without
    a concept holds them as often. Tokens held in the top n by fewer than ``min_top_images`` images of all
    labels together are not tested (label-blind filter). BH across a label's tested tokens, per n.
    """
    from tqdm import tqdm

    from .stats import top_positions

    labels = sorted(int(k) for k in parsed)
    if len(labels) < 2:
        raise CortexError("the label-contrast test needs at least two labels with TIS statistics")
    ids = np.concatenate([np.asarray(parsed[k][0], dtype=np.int64) for k in labels])  # (N, P)
    N, n_pos = ids.shape
    y = np.repeat(np.arange(len(labels)), [len(parsed[k][0]) for k in labels])  # (N,) label index
    max_n = min(max(top_ns), n_pos)
    top = np.concatenate([top_positions(parsed[k][1], max_n) for k in labels])  # (N, max_n) positions
    tokens, inv = _token_index(ids)  # tokens (T,) ascending, inv (N, P) index into tokens
    T = tokens.size
    if strata not in STRATA:
        raise CortexError(f"strata {strata!r}: use one of {sorted(STRATA)}")
    stratum = STRATA[strata]
    if n_pos >= stratum.size:  # a grid of more than 256 positions: the last stratum holds the larger counts
        stratum = np.append(stratum, np.full(n_pos + 1 - stratum.size, stratum[-1]))
    S = int(stratum.max()) + 1
    # (image, token) pairs in (image, token) order, from each image's sorted ids: c = the token's count there
    order_in_row = np.argsort(inv, axis=1, kind="stable")  # (N, P)
    srt = np.take_along_axis(inv, order_in_row, axis=1)  # each image's ids, sorted
    new = np.ones(srt.shape, bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    at = np.flatnonzero(new.ravel())
    c = np.diff(np.append(at, srt.size))
    p_img, p_tok = at // n_pos, srt.ravel()[at]
    p_str = stratum[c]
    # the pair of each of the top max_n positions: its place in the sorted row, then that run's pair index
    rank = np.empty_like(order_in_row)
    np.put_along_axis(rank, order_in_row, np.arange(n_pos)[None, :], axis=1)
    run_of = np.cumsum(new.ravel()) - 1  # (N * P,) pair index of every sorted position
    top_pair = run_of[np.arange(N)[:, None] * n_pos + np.take_along_axis(rank, top, axis=1)]  # (N, max_n)
    del rank, run_of, order_in_row
    ts = p_tok * S + p_str
    n_ts = np.bincount(ts, minlength=T * S)  # images per (token, stratum)
    # per (label, token, stratum) group: m = the label's images (the same for every n)
    key = (y[p_img] * T + p_tok) * S + p_str
    if len(labels) * T * S <= 8 * key.size:  # a dense table is cheaper than a sort
        m_dense = np.bincount(key, minlength=len(labels) * T * S)
        lts_all = np.flatnonzero(m_dense)
        m_all = m_dense[lts_all]
        g_of_pair = (np.cumsum(m_dense > 0) - 1)[key]
    else:
        lts_all, g_of_pair, m_all = np.unique(key, return_inverse=True, return_counts=True)
    out = {k: {} for k in labels}
    for n in tqdm(top_ns, desc="label-contrast tests", unit="n", disable=not progress):
        n_eff = min(int(n), n_pos)
        h = np.zeros(p_tok.size, bool)  # (P,) the image holds the token in its top n
        h[top_pair[:, :n_eff]] = True
        a_ts = np.bincount(ts, weights=h, minlength=T * S)
        tested = np.bincount(p_tok, weights=h, minlength=T) >= min_top_images  # (T,) label-blind filter
        o_all = np.bincount(g_of_pair, weights=h, minlength=lts_all.size).astype(np.int64)
        g = tested[(lts_all // S) % T]
        lts, m, o = lts_all[g], m_all[g], o_all[g]  # o = of the label's images, those with t in the top n
        lt, ts_ = lts // S, (lts % (T * S))
        tot_n, tot_a = n_ts[ts_], a_ts[ts_].astype(np.int64)
        # group the strata of each (label, token)
        keys, start = np.unique(lt, return_index=True)
        end = np.append(start[1:], lt.size)
        obs = np.add.reduceat(o, start)
        img = np.add.reduceat(m, start)
        expct = np.add.reduceat(m * tot_a / tot_n, start)
        p = _grouped_sf(obs, start, end, tot_n, tot_a, m)  # L against the other labels pooled
        lab, tok = keys // T, keys % T
        # ... and against each of its `rivals` strongest rivals: the labels with the highest rate o / (images + 2)
        # of t (intersection-union: L must beat the pool and each of them)
        hot = np.flatnonzero(obs > 0)  # (H,) only these can be rivals, and only these have p < 1
        h_tok, h_lab = tok[hot], lab[hot]
        order = np.lexsort((h_lab, -obs[hot] / (img[hot] + 2.0), h_tok))  # per token, its labels by rate, desc.
        first = np.searchsorted(h_tok[order], np.arange(T + 1))  # (T + 1,) where each token's ranking starts
        rank = np.empty(hot.size, np.int64)
        rank[order] = np.arange(hot.size) - first[h_tok[order]]  # L's rank among the labels of t
        h_start, h_end = start[hot], end[hot]
        h_len = h_end - h_start
        sub_start = np.append(0, np.cumsum(h_len)[:-1]).astype(np.int64)
        h_rows = np.repeat(h_start - sub_start, h_len) + np.arange(h_len.sum())  # their (L, t, s) rows
        # labels that contain t but never hold it in the top n (rate 0) come after, smallest label first
        n_hot = np.diff(first)  # (T,) labels holding t in some top n
        cold = np.flatnonzero((obs == 0) & (n_hot[tok] <= rivals))
        cold = cold[np.argsort(tok[cold], kind="stable")]  # by token, then label (keys are label-major)
        c_first = np.searchsorted(tok[cold], np.arange(T + 1))
        for r in range(rivals):
            at = first[h_tok] + r + (rank <= r)  # the r-th best label of t other than L
            ok = at < first[h_tok + 1]
            c_at = c_first[h_tok] + r - (n_hot[h_tok] - 1)  # ... or, past those, a label with rate 0
            c_ok = ~ok & (c_at < c_first[h_tok + 1])
            rival = np.where(ok, h_lab[order[np.minimum(at, hot.size - 1)]], -1)
            if c_ok.any():
                rival[c_ok] = lab[cold[c_at[c_ok]]]
            ok |= c_ok
            if not ok.any():
                continue
            rows_rival = np.repeat(rival, h_len)  # per (L, t, s) row: the rival label
            key_r = (rows_rival * T + np.repeat(h_tok, h_len)) * S + lts[h_rows] % S
            at_r = np.minimum(np.searchsorted(lts, key_r), lts.size - 1)
            hit = (lts[at_r] == key_r) & (rows_rival >= 0)
            m_r, o_r = np.where(hit, m[at_r], 0), np.where(hit, o[at_r], 0)
            # stratum s of L vs its rival: population m + m_r images, o + o_r in the top n, L draws m
            mm, oo = m[h_rows], o[h_rows]
            p_r = _grouped_sf(np.where(ok, obs[hot], 0), sub_start, sub_start + h_len, mm + m_r, oo + o_r, mm)
            p[hot] = np.where(ok, np.maximum(p[hot], p_r), p[hot])  # no rival left: the pooled test stands
        bounds = np.searchsorted(lab, np.arange(len(labels) + 1))
        for li, k in enumerate(labels):
            s, e = bounds[li], bounds[li + 1]
            out[k][int(n)] = ContrastTests(k, int(n), tokens[tok[s:e]], img[s:e], obs[s:e], expct[s:e], p[s:e],
                                           benjamini_hochberg(p[s:e]))
    return out


def _grouped_sf(obs, start, end, M, n, N) -> np.ndarray:
    """``P(sum_s H(M_s, n_s, N_s) >= obs_j)`` over the strata rows ``start_j..end_j-1`` of each group j;
    1 where ``obs_j == 0``. One stratum: scipy's sf, vectorised; several: :func:`_stratified_sf`."""
    p = np.ones(obs.size)
    one = (end - start == 1) & (obs > 0)
    p[one] = _hypergeom_sf(obs[one], M[start[one]], n[start[one]], N[start[one]])
    multi = np.flatnonzero((end - start > 1) & (obs > 0))
    p[multi] = _stratified_sf(obs[multi], start[multi], end[multi], M, n, N)
    return p


def _stratified_sf(obs, start, end, M, n, N) -> np.ndarray:
    """``P(sum_{r in start_j..end_j-1} H(M_r, n_r, N_r) >= obs_j)`` for each group j (exact, independent strata).

    Each stratum's pmf on ``0..obs_j - 1`` plus one "at least obs_j" bin (one vectorised scipy call for all
    strata), then a convolution per group that lumps everything >= obs_j into the last bin.
    """
    from scipy.stats import hypergeom

    if obs.size == 0:
        return np.ones(0)
    rows = np.concatenate([np.arange(s, e) for s, e in zip(start, end)])  # strata of the groups, group order
    grp = np.repeat(np.arange(obs.size), end - start)
    top = np.minimum(np.minimum(n[rows], N[rows]), obs[grp])  # support 0..top (top == obs: the lump bin)
    k = np.concatenate([np.arange(t + 1) for t in top])
    r = np.repeat(np.arange(rows.size), top + 1)
    val = hypergeom.pmf(k, M[rows][r], n[rows][r], N[rows][r])
    lump = k == obs[grp][r]
    val[lump] = hypergeom.sf(k[lump] - 1, M[rows][r][lump], n[rows][r][lump], N[rows][r][lump])
    bounds = np.append(0, np.cumsum(top + 1))
    out = np.ones(obs.size)
    j = 0
    for g in range(obs.size):
        o = int(obs[g])
        acc = np.ones(1)
        for _ in range(int(end[g] - start[g])):
            acc = np.convolve(acc, val[bounds[j]:bounds[j + 1]])
            if acc.size > o:
                acc[o] = acc[o:].sum()
                acc = acc[:o + 1]
            j += 1
        out[g] = acc[o] if acc.size > o else 0.0
    return np.clip(out, 0.0, 1.0)
