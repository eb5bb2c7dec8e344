"""The within-image enrichment test (``tis_enrichment.csv`` with ``--enrichment``; :func:`label_tests`)
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

Cost: gathering the counts
is linear in images (one ``np.unique`` over the label's ``N x 256`` ids); the exact tail costs ``O(groups x log(images) x count^2)`` per token that reaches the top n at all.

Output: ``TIS_statistics_train/tis_enrichment.csv`` (tidy), columns
``label,top_n,token,count,expected,enrichment,p_value,q_value``; per (label, n) the tokens with a count
(count descending, then token id ascending; up to ``--max_rows`` rows), or with ``--significant_only`` only
those with ``q < alpha``. The authors'-format sectioned files are never changed by this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..attribution import store
from ..utils import CortexError
from .exact_tests import ALPHA, benjamini_hochberg, hypergeom_table, sum_tail
from .ranking import rank_tokens, top_positions
from .statistics import token_matrix

ENRICHMENT_HEADER = ["label", "top_n", "token", "count", "expected", "enrichment", "p_value", "q_value"]


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
        return self.tokens[rank_tokens(self.tokens, self.count, self.q_value < alpha)]

    def rows(self, alpha: float | None = None, limit: int | None = None) -> list[list]:
        """CSV rows (``ENRICHMENT_HEADER``) of the tokens with a count (or with ``q < alpha``), ranked by count."""
        idx = rank_tokens(self.tokens, self.count, self.count > 0 if alpha is None else self.q_value < alpha)[:limit]
        enr = self.enrichment
        return [[self.label, self.top_n, int(self.tokens[i]), int(self.count[i]), f"{self.expected[i]:.6g}",
                 f"{enr[i]:.6g}", f"{self.p_value[i]:.6g}", f"{self.q_value[i]:.6g}"] for i in idx]


def label_tests(label: int, ids: np.ndarray, scores: np.ndarray, top_ns) -> dict[int, TokenTests]:
    """Enrichment tests of one label for every n in ``top_ns``.

    ids ``(N, 256)`` token ids, scores ``(N, 256)`` TIS of the label's images. Top-n positions come from
    ``cortex.analysis.ranking.top_positions`` (the rule of the sectioned files). Returns ``{n: TokenTests}``.
    """
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


def read_label_tis(path, token_indices: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (N, 256), scores (N, 256))`` of one ``TIS_value_*/label_{k}.csv`` (the TIS-file parser of cortex)."""
    names, _, scores = store.read_tis_file(path)
    return token_matrix(names, token_indices, path), scores


def significance_tests(tis_files: dict, token_indices: dict | None, top_ns, progress: bool = True,
                       parsed: dict | None = None) -> dict:
    """``{label: {n: TokenTests}}`` for the TIS files ``{label: path}``; parsed: ``{label: (ids, scores)}``
    already read (``cortex.analysis.statistics.analyze_tis(keep=...)``): those files are not read again."""
    parsed = parsed or {}
    out = {}
    for label, path in tqdm(tis_files.items(), desc="enrichment tests", unit="label", disable=not progress):
        ids, scores = parsed[label] if label in parsed else read_label_tis(path, token_indices)
        if ids.shape[0] == 0:
            raise CortexError(f"{path}: no rows (header only); rerun TIS_computation.py for label {label}")
        out[int(label)] = label_tests(label, ids, scores, top_ns)
    return out
