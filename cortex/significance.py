"""Is a concept token real, or just frequent? Per-token enrichment tests of the TIS statistics (issue 16.1).

CORTEX ranks a label's tokens by how often they sit among an image's top-n TIS positions. A token that
fills many positions of a label's images lands there by chance too. For every (label, n, token) this module
tests whether the token is *more often* among the top-n positions than its frequency in those images predicts.

The test (exact, valid when a token fills several positions of an image)
------------------------------------------------------------------------
Null hypothesis: within each image, the TIS ranking does not depend on which token sits where, i.e. the
top-n positions are a uniformly random n-subset of the 256 positions (a permutation of the scores within
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

Cost: gathering the counts is linear in images (one ``np.unique`` over the label's ``N x 256`` ids); the
exact tail costs ``O(groups x log(images) x count^2)`` per token that reaches the top n at all.

Output: ``TIS_statistics_train/tis_significance.csv`` (tidy), columns
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

from .cli import float_in
from .utils import CortexError, atomic_write

N_POS = 256
SIGNIFICANCE_FILE = "tis_significance.csv"
SIGNIFICANCE_HEADER = ["label", "top_n", "token", "count", "expected", "enrichment", "p_value", "q_value"]
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
    from scipy.stats import false_discovery_control

    return false_discovery_control(p.ravel(), method="bh").reshape(p.shape)


# ----------------------------------------------------------------------------- one label

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
        keep = self.q_value < alpha
        order = np.lexsort((self.tokens[keep], -self.count[keep]))
        return self.tokens[keep][order]

    def rows(self, alpha: float | None = None, limit: int | None = None) -> list[list]:
        """CSV rows (``SIGNIFICANCE_HEADER``) of the tokens with a count (or with ``q < alpha``), ranked by count."""
        keep = self.count > 0 if alpha is None else self.q_value < alpha
        idx = np.flatnonzero(keep)
        idx = idx[np.lexsort((self.tokens[idx], -self.count[idx]))][:limit]
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


def write_significance(path, tests: dict, alpha: float | None = None, limit: int | None = None) -> Path:
    """Write the tidy significance file; ``alpha`` set: only tokens with ``q < alpha``."""
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(SIGNIFICANCE_HEADER)
        for label in sorted(tests):
            for n in sorted(tests[label]):
                w.writerows(tests[label][n].rows(alpha, limit))
    return Path(path)


def read_significance(path) -> list[dict]:
    """Rows of ``tis_significance.csv`` as dicts (ints and floats parsed)."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"significance file not found: {path}. Run TIS_analysis.py (it writes {SIGNIFICANCE_FILE} "
                          f"beside the statistics).")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != SIGNIFICANCE_HEADER:
            raise CortexError(f"{path}: header must be {','.join(SIGNIFICANCE_HEADER)}, got {reader.fieldnames}")
        out = []
        for lineno, r in enumerate(reader, start=2):
            try:
                out.append(dict(label=int(r["label"]), top_n=int(r["top_n"]), token=int(r["token"]),
                                count=int(r["count"]), expected=float(r["expected"]), enrichment=float(r["enrichment"]),
                                p_value=float(r["p_value"]), q_value=float(r["q_value"])))
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
    """``--significant_only`` and ``--alpha`` of TIS_analysis.py."""
    p.add_argument("--significant_only", action="store_true",
                   help=f"{SIGNIFICANCE_FILE}: list only the tokens with BH q < --alpha (default: every token with a "
                        f"count, up to --max_rows per label and n). The sectioned label_{{k}}.csv files keep the "
                        f"authors' format and content either way")
    p.add_argument("--alpha", type=float_in(0, 1, lo_open=True, hi_open=True), default=ALPHA,
                   help="false discovery rate for --significant_only (default: %(default)s)")


def run_tis_analysis(args, experiment: str) -> dict:
    """``TIS_analysis.py`` of both folders: the authors' statistics (cortex.stats.run_analysis), then the
    enrichment tests of the same labels; each TIS file is parsed once for both."""
    from .attribution import print_smoothgrad_caveat
    from .stats import run_analysis

    print_smoothgrad_caveat(args.attribution, "concept tokens")
    parsed = {}  # {label: (ids, scores)}
    summary = run_analysis(args, experiment, keep=parsed)
    run_significance(args, experiment, parsed=parsed)
    return summary


def run_significance(args, experiment: str, parsed: dict | None = None) -> Path:
    """TIS_analysis.py's second output: the enrichment tests of the labels that have statistics.

    parsed: ``{label: (ids, scores)}`` kept by ``cortex.stats.run_analysis(keep=...)`` in the same run, so
    the TIS files and the token cache are not read a second time.
    """
    from .data import load_token_indices
    from .paths import ExperimentPaths
    from .stats import label_files

    if not 0 < args.alpha < 1:
        raise CortexError(f"--alpha {args.alpha}: must lie in (0, 1)")
    paths = ExperimentPaths.from_args(args, experiment)
    stats_dir = paths.stats_dir(args.model, args.attribution)
    done = label_files(stats_dir)
    tis = {k: p for k, p in label_files(paths.tis_dir(args.model, "train", args.attribution)).items() if k in done}
    if not tis:
        raise CortexError(f"no TIS statistics in {stats_dir} to test; run TIS_analysis.py --model {args.model} first")
    parsed = parsed or {}
    token_indices = None if set(tis) <= set(parsed) else load_token_indices(paths.data_dir, "train")
    tests = significance_tests(tis, token_indices, tuple(args.top_ns),
                               progress=not getattr(args, "no_progress", False), parsed=parsed)
    out = write_significance(stats_dir / SIGNIFICANCE_FILE, tests, args.alpha if args.significant_only else None,
                             getattr(args, "max_rows", None))
    n_sig = {n: sum(len(t[n].significant(args.alpha)) for t in tests.values()) for n in args.top_ns}
    print(f"enrichment tests (exact hypergeometric, BH q < {args.alpha}): significant tokens over "
          f"{len(tests)} labels: " + ", ".join(f"top {n}: {k}" for n, k in n_sig.items()) + f" -> {out}")
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
    sig = significant_tokens(sig_file, alpha)
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

def check_current_run(paths, model: int, attribution: str) -> None:
    """CortexError unless the statistics of (model, attribution) come from the *current* run.

    Current: ``cortex.stats.check_statistics_current`` passes (the statistics match their TIS run, nothing
    unfinished or left over) and that TIS run's ``tis_config.json`` names the checkpoint and train CSV that
    are on disk now (same sha256): statistics left from an earlier IEM or dataset are not current.
    """
    import json

    from .data import split_csv
    from .stats import check_statistics_current
    from .tis import file_sha256

    stats_dir, tis_dir = paths.stats_dir(model, attribution), paths.tis_dir(model, "train", attribution)
    check_statistics_current(stats_dir, tis_dir)  # no source.json (e.g. the authors' files): a warning
    cfg_path = tis_dir / "tis_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    redo = (f"Rerun TIS_computation.py and TIS_analysis.py --model {model} --attribution {attribution} "
            f"for the current run.")
    want = cfg.get("checkpoint", {}).get("sha256")
    ckpt = paths.model_dir(model) / cfg.get("checkpoint", {}).get("file", "best_model.pth")
    if want and want != file_sha256(ckpt):
        raise CortexError(f"{stats_dir} explains another IEM: {cfg_path} names a checkpoint that is not the current "
                          f"{ckpt} (left from an earlier run). {redo}")
    want = cfg.get("data", {}).get("csv_sha256")
    if want and want != file_sha256(split_csv(paths.data_dir, "train")):
        raise CortexError(f"{stats_dir} was computed on another dataset: {cfg_path} names a train CSV that is not "
                          f"the current {split_csv(paths.data_dir, 'train')} (left from an earlier run). {redo}")
