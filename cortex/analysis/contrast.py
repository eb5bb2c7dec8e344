"""The label-contrast test (``tis_significance.csv``, the default; :func:`contrast_tests`)
------------------------------------------------------------------------------------
Unit: the image; both halves are exact label-permutation tests (shuffle the labels across the images):

* occurrence: do L's images contain token t more often than the other labels' images?
  ``P(images >= observed)``, hypergeometric over all images (N images, K_t contain t, L owns N_L);
* attention: among the images that contain t, is t more often among the top-n positions in L's images than in
  the other labels' images? Null: given that an image contains t, whether t is in its top n does not depend
  on the image's label; within-stratum label permutation, computed exactly (every permutation enumerated: a
  sum of hypergeometrics), so no Monte-Carlo error and no seed.

The p-value is the larger of the two (intersection-union: t carries L's concept when it marks L's images *and*
the IEM ranks it higher where it occurs in them); BH across a label's tested tokens, per n. Either half alone
is not calibrated for concepts: tokens the IEM attends to whenever no concept competes for the top n
(background, distractors, other labels' concept tokens in an image without its own concept) pass the
attention half for labels with no concept, and tokens that merely occur more often pass the occurrence half
(that is the frequency baseline). A token that occurs in every label's images alike but that the IEM ranks
high for one label only (a spurious use) is not reported as that label's concept. This is the test to cite
for "token t carries label L's concept". Optional (``rivals``): L must also beat each of its strongest rival
labels in the attention half.

Columns ``label,top_n,token,images,top_images,expected,ratio,p_value,q_value,occurrence_ratio,p_occurrence,
p_attention``: the label's images that contain the token, those of them with the token in the top n, the count
expected from the rate over all labels' images (stratum by stratum), their ratio, the p-value and the BH
q-value; ``images`` over the images expected from t's rate over all images, and the two halves' p-values.
Per (label, n) the tokens with ``top_images > 0`` (descending, then token id; up to ``--max_rows`` rows), or
with ``--significant_only`` only those with ``q < alpha``.

Cost of the label-contrast test: one pass over all ``N x 256`` ids, then vectorised hypergeometric tails (a
short convolution only for tokens in several strata).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..utils import CortexError
from .exact_tests import ALPHA, N_POS, benjamini_hochberg, grouped_sf, hypergeom_sf
from .ranking import rank_tokens, top_positions

SIGNIFICANCE_HEADER = ["label", "top_n", "token", "images", "top_images", "expected", "ratio", "p_value", "q_value",
                       "occurrence_ratio", "p_occurrence", "p_attention"]
RIVALS = 0  # label-contrast test: optionally L must also beat each of the R other labels with the highest rate of t
MIN_TOP_IMAGES = 3  # label-blind filter: a token is tested only if >= this many images (any label) hold it in the top n

# strata of a token's count c in an image (index = STRATA[name][c]; 0: absent)
STRATA = {"occurrence": np.minimum(np.arange(N_POS + 1), 1),  # condition on occurrence: one stratum, c >= 1
          "count": np.minimum(np.ceil(np.log2(np.maximum(np.arange(N_POS + 1), 1))).astype(np.int64) + 1, 6)
          * (np.arange(N_POS + 1) > 0)}  # c = 1, 2, 3-4, 5-8, 9-16, 17+


@dataclass
class ContrastTests:
    """Label-contrast tests of one (label, n): arrays ``(T,)`` over the tested tokens that the label's images hold
    among their top n (``top_images > 0``; every other tested token has p = 1); ``tested`` counts all the tested
    tokens occurring in the label's images (the hypotheses of BH)."""

    label: int
    top_n: int
    tested: int  # hypotheses: tested tokens occurring in the label's images (those with top_images = 0 included)
    tokens: np.ndarray  # int64 token ids (ascending)
    images: np.ndarray  # int64 the label's images that contain the token
    top_images: np.ndarray  # int64 ... of which hold it among their top-n positions
    expected: np.ndarray  # float64 top_images expected from the rate over all labels' images, per stratum
    p_value: np.ndarray  # float64 max(p_occurrence, p_attention): both halves must hold (intersection-union)
    q_value: np.ndarray  # float64 Benjamini-Hochberg over the ``tested`` tokens
    occurrence_ratio: np.ndarray  # float64 images / the images expected from t's rate over all labels' images
    p_occurrence: np.ndarray  # float64 exact P(images >= observed) under label permutation (hypergeometric)
    p_attention: np.ndarray  # float64 exact P(top_images >= observed | occurrence) under within-stratum permutation

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.top_images / self.expected

    def significant(self, alpha: float = ALPHA) -> np.ndarray:
        """Token ids with ``q < alpha``, top_images descending (then token ascending)."""
        return self.tokens[rank_tokens(self.tokens, self.top_images, self.q_value < alpha)]

    def rows(self, alpha: float | None = None, limit: int | None = None) -> list[list]:
        """CSV rows (``SIGNIFICANCE_HEADER``) of the tokens with top_images > 0 (or with ``q < alpha``)."""
        idx = rank_tokens(self.tokens, self.top_images, self.top_images > 0 if alpha is None else self.q_value < alpha)
        idx = idx[:limit]
        cols = zip(*(a[idx].tolist() for a in (self.tokens, self.images, self.top_images, self.expected, self.ratio,
                                                self.p_value, self.q_value, self.occurrence_ratio, self.p_occurrence,
                                                self.p_attention)))  # Python scalars: fast to format
        return [[self.label, self.top_n, t, m, o, f"{e:.6g}", f"{r:.6g}", f"{p:.6g}", f"{q:.6g}", f"{orr:.6g}",
                 f"{po:.6g}", f"{pa:.6g}"] for t, m, o, e, r, p, q, orr, po, pa in cols]


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


def contrast_tests(parsed: dict, top_ns, min_top_images: int = MIN_TOP_IMAGES, rivals: int = RIVALS,
                   strata: str = "occurrence", progress: bool = False, occurrence: bool = True) -> dict:
    """The label-contrast test of every (label, n, token): ``{label: {n: ContrastTests}}``.

    parsed: ``{label: (ids (N_k, 256), scores (N_k, 256))}``, every label of the run (the contrast is between
    labels). The unit is the image; the null hypothesis of both halves is that labels are exchangeable among
    the images (label permutation), and both p-values are exact.

    Occurrence (``occurrence=True``): of the N images, K_t contain t and label L owns N_L; L's count is
    hypergeometric ``H(N, K_t, N_L)``.

    Attention: t's images (those that contain it) are split into strata by t's count in the image
    (``strata``: ``"occurrence"``, the default, one stratum: condition on occurrence; ``"count"``: 1, 2, 3-4,
    5-8, 9-16, 17+ positions); in stratum s, ``n_s`` images contain t, ``a_s`` of them hold it among their
    top-n positions, and label L owns ``m_s`` of them. Under the null L's count is a sum over strata of
    independent hypergeometrics ``H(n_s, a_s, m_s)``, and ``P(sum >= observed)`` is the within-stratum
    label-permutation p-value with every permutation enumerated: no Monte-Carlo error, no seed, the same for
    any order of the images. With ``rivals`` > 0 the same test is repeated against each of the ``rivals``
    other labels with the highest rate of t (``top_images / (images + 2)``), pooling only L and that label,
    and the largest p-value is kept (few images of a rival give it little power: off by default).

    ``p_value = max(p_occurrence, p_attention)`` (intersection-union), BH across a label's tested tokens, per n.
    Tokens held in the top n by fewer than ``min_top_images`` images of all labels together are not tested
    (label-blind filter).
    """
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
    K_tok = np.bincount(p_tok, minlength=T)  # (T,) images that contain the token, any label
    N_lab = np.bincount(y, minlength=len(labels))  # (labels,) images per label
    # per (label, token, stratum) group: m = the label's images (the same for every n)
    key = (y[p_img] * T + p_tok) * S + p_str
    if len(labels) * T * S <= 8 * key.size:  # a dense table is cheaper than a sort
        m_dense = np.bincount(key, minlength=len(labels) * T * S)
        lts_all = np.flatnonzero(m_dense)
        m_all = m_dense[lts_all]
        g_of_pair = (np.cumsum(m_dense > 0) - 1)[key]
    else:
        lts_all, g_of_pair, m_all = np.unique(key, return_inverse=True, return_counts=True)
    # the occurrence half, the same for every n: per (label, token), N images, K_t contain t, L owns N_L.
    # Computed only where the label holds t in some top n (elsewhere the attention half's p is 1, and so is p)
    lt_of = lts_all // S
    lt_start = _run_starts(lt_of)
    lt_keys = lt_of[lt_start]  # (label, token) keys, label-major
    img_all = np.add.reduceat(m_all, lt_start) if lt_keys.size else np.zeros(0, np.int64)
    tok_all, lab_all = lt_keys % T, lt_keys // T
    hot = np.unique(g_of_pair[top_pair[:, :max_n]])  # groups with t in some image's top max_n (sorted)
    hot_lt = np.searchsorted(lt_keys, lt_of[hot][_run_starts(lt_of[hot])])
    p_occ_all = np.ones(lt_keys.size)  # only keys in some top n are tested (the others have p = 1)
    p_occ_all[hot_lt] = (hypergeom_sf(img_all[hot_lt], N, K_tok[tok_all[hot_lt]], N_lab[lab_all[hot_lt]])
                         if occurrence else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        occ_ratio_all = img_all / (K_tok[tok_all] * N_lab[lab_all] / N)
    lt_lab, lt_tok = lab_all, tok_all  # label and token of each (label, token) key
    grp_tok, grp_ts = lt_of % T, lts_all % (T * S)  # token and (token, stratum) of each group
    one_stratum = lt_keys.size == lts_all.size
    out = {k: {} for k in labels}
    fast = one_stratum and rivals == 0
    for n in tqdm(top_ns, desc="label-contrast tests", unit="n", disable=not progress):
        n_eff = min(int(n), n_pos)
        tp = np.sort(top_pair[:, :n_eff], axis=1)  # (N, n) the pairs of each image's top n ...
        tp = tp[np.concatenate([np.ones((N, 1), bool), tp[:, 1:] != tp[:, :-1]], axis=1)]  # ... each pair once
        a_ts = np.bincount(ts[tp], minlength=T * S)  # images holding t in the top n, per (token, stratum)
        tested = np.bincount(p_tok[tp], minlength=T) >= min_top_images  # (T,) label-blind filter
        n_tested = np.bincount(lt_lab[tested[lt_tok]], minlength=len(labels))  # BH's hypotheses per label
        if fast:  # one row per (label, token), no rivals: only the groups with t in a top n can have p < 1
            hg, obs = np.unique(g_of_pair[tp], return_counts=True)  # (H,) groups = (label, token) keys, obs > 0
            keep = tested[lt_tok[hg]]
            hg, obs = hg[keep], obs[keep]
            img = m_all[hg]
            tot_n, tot_a = n_ts[grp_ts[hg]], a_ts[grp_ts[hg]]
            expct = img * tot_a / tot_n
            p = hypergeom_sf(obs, tot_n, tot_a, img)  # L against the other labels pooled
            at_lt = hg
        else:
            o_all = np.bincount(g_of_pair[tp], minlength=lts_all.size)
            g = tested[grp_tok]
            lts, m, o = lts_all[g], m_all[g], o_all[g]  # o = of the label's images, those with t in the top n
            tot_n, tot_a = n_ts[grp_ts[g]], a_ts[grp_ts[g]]
            at_lt = np.flatnonzero(tested[lt_tok])  # this n's tested (label, token) keys among all
            if one_stratum:
                start = np.arange(at_lt.size)
                obs, img, expct = o, m, m * tot_a / tot_n
            else:  # group the strata of each (label, token)
                start = _run_starts(lts // S)  # sorted
                obs = np.add.reduceat(o, start)
                img = np.add.reduceat(m, start)
                expct = np.add.reduceat(m * tot_a / tot_n, start)
            end = np.append(start[1:], lts.size)
            p = grouped_sf(obs, start, end, tot_n, tot_a, m)  # L against the other labels pooled; 1 where obs = 0
            if rivals > 0:
                p = _against_rivals(p, obs, img, lt_tok[at_lt], lt_lab[at_lt], start, end, lts, m, o, T, S, rivals)
            hot = obs > 0
            at_lt, obs, img, expct, p = at_lt[hot], obs[hot], img[hot], expct[hot], p[hot]
        lab, tok = lt_lab[at_lt], lt_tok[at_lt]
        p_occ, occ_ratio = p_occ_all[at_lt], occ_ratio_all[at_lt]
        p_both = np.maximum(p, p_occ)
        bounds = np.searchsorted(lab, np.arange(len(labels) + 1))
        for li, k in enumerate(labels):
            s, e = bounds[li], bounds[li + 1]
            out[k][int(n)] = ContrastTests(k, int(n), int(n_tested[li]), tokens[tok[s:e]], img[s:e], obs[s:e],
                                           expct[s:e], p_both[s:e], benjamini_hochberg(p_both[s:e], int(n_tested[li])),
                                           occ_ratio[s:e], p_occ[s:e], p[s:e])
    return out


def _against_rivals(p, obs, img, tok, lab, start, end, lts, m, o, T: int, S: int, rivals: int) -> np.ndarray:
    """The attention half's p-values ``p`` (one per (label, token) group) raised to L's test against each of
    its ``rivals`` strongest rival labels (the labels with the highest rate ``o / (images + 2)`` of t; the
    intersection-union keeps the largest p). Groups: ``start``/``end`` rows of ``lts, m, o`` (per stratum)."""
    p = p.copy()
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
        p_r = grouped_sf(np.where(ok, obs[hot], 0), sub_start, sub_start + h_len, mm + m_r, oo + o_r, mm)
        p[hot] = np.where(ok, np.maximum(p[hot], p_r), p[hot])  # no rival left: the pooled test stands
    return p


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values of the sorted ``a`` starts (``np.unique(a, return_index=True)[1]``, no sort)."""
    if a.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], a[1:] != a[:-1]]))
