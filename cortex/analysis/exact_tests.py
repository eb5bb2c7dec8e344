"""Exact tails for the significance tests: a sum of hypergeometrics, one hypergeometric, and Benjamini-Hochberg.

Both tests of ``cortex.analysis.significance`` need exact one-sided tails of hypergeometric counts: the
within-image enrichment test a sum over images of ``H(256, c_i, n)`` (:func:`sum_tail`, convolved on the
support ``0..observed-1`` plus one "at least observed" bin, so small p-values keep their relative precision),
the label-contrast test one hypergeometric per (label, token) (:func:`hypergeom_sf`) or a sum over strata
(:func:`grouped_sf`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import gammaln
from scipy.stats import hypergeom

N_POS = 256  # positions of the paper's 16 x 16 token grid
ALPHA = 0.05  # the default false discovery rate of both tests


@lru_cache(maxsize=None)
def hypergeom_table(n: int, n_pos: int = N_POS) -> np.ndarray:
    """``T[c, k] = P(H(n_pos, c, n) = k)``: ``(n_pos + 1, n + 1)`` float64 (k of the top n among c positions)."""
    c = np.arange(n_pos + 1)[:, None]
    k = np.arange(n + 1)[None, :]
    return hypergeom.pmf(k, n_pos, c, n)


def _conv(a, b, length: int):
    """Sum of two independent variables, each ``(pmf on 0..length-1, P(>= length))``."""
    (pa, la), (pb, lb) = a, b
    if pa.size * pb.size > 4_000_000:
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


def benjamini_hochberg(p: np.ndarray, m: int | None = None) -> np.ndarray:
    """BH-adjusted q-values of ``p`` (any shape; monotone, capped at 1). ``m``: the number of hypotheses when
    more were tested than ``p`` holds (the others have p = 1, which changes no q below 1 but counts in m)."""
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    flat = p.ravel()
    m = flat.size if m is None else max(int(m), flat.size)
    order = np.argsort(flat, kind="stable")
    q = flat[order] * (m / np.arange(1, flat.size + 1))  # p_(i) m / i
    q = np.minimum.accumulate(q[::-1])[::-1]  # monotone: the smallest over ranks >= i
    out = np.empty_like(flat)
    out[order] = np.minimum(q, 1.0)
    return out.reshape(p.shape)  # = scipy.stats.false_discovery_control(p, method="bh"), without its overhead


def _log_hypergeom_pmf(x, M, n, N) -> np.ndarray:
    """``log P(X = x)``, X ~ hypergeometric(M population, n successes, N draws) (float64 arrays)."""
    return (gammaln(n + 1) - gammaln(x + 1) - gammaln(n - x + 1) + gammaln(M - n + 1) - gammaln(N - x + 1)
            - gammaln(M - n - N + x + 1) - gammaln(M + 1) + gammaln(N + 1) + gammaln(M - N + 1))


def hypergeom_sf(k, M, n, N, rtol: float = 1e-17) -> np.ndarray:
    """``P(X >= k)``, X ~ hypergeometric(M population, n successes, N draws), vectorised (float64).

    The tail away from the mode is summed term by term (the ratio of neighbouring pmf terms is a rational
    function of x) until a term adds less than ``rtol`` of the sum: above the mode the upper tail itself (small
    p-values keep their relative precision), at or below it 1 - the lower tail. No approximation; float
    rounding ~1e-10 relative at 1e5 images (tested against scipy's boost-based ``hypergeom.sf``, which is ~8-100x slower:
    100-250 us an element at 1e5 images). Each distinct (k, M, n, N) is computed once.
    """
    shape = np.broadcast_shapes(*(np.shape(v) for v in (k, M, n, N)))
    k, M, n, N = (a.ravel().astype(np.int64) for a in np.broadcast_arrays(*(np.asarray(v) for v in (k, M, n, N))))
    if k.size >= 64:  # the tuples of a run repeat a lot (small counts, a few label sizes)
        cols = (k, M, n, N)
        lo = [int(c.min()) for c in cols]
        span = [int(c.max()) - low + 1 for c, low in zip(cols, lo)]
        if sum(int(w).bit_length() for w in span) <= 62:  # one int64 key per tuple
            key = np.zeros(k.size, np.int64)
            for c, low, w in zip(cols, lo, span):
                key = key * w + (c - low)
            first, inv = np.unique(key, return_index=True, return_inverse=True)[1:]
            return _hypergeom_tail(k[first], M[first], n[first], N[first], rtol)[inv.ravel()].reshape(shape)
    return _hypergeom_tail(k, M, n, N, rtol).reshape(shape)


def _hypergeom_tail(k, M, n, N, rtol: float) -> np.ndarray:
    """:func:`hypergeom_sf` of flat int64 arrays ``(E,)``: the summation itself."""
    out = np.empty(k.size)
    lo, hi = np.maximum(0, N - (M - n)), np.minimum(n, N)  # the support
    out[k <= lo] = 1.0
    out[k > hi] = 0.0
    todo = np.flatnonzero((k > lo) & (k <= hi))
    mode = (n[todo] + 1) * (N[todo] + 1) // (M[todo] + 2)
    for idx, upward in ((todo[k[todo] > mode], True), (todo[k[todo] <= mode], False)):
        x0 = (k[idx] if upward else k[idx] - 1).astype(np.float64)
        Mi, ni, Ni = M[idx].astype(np.float64), n[idx].astype(np.float64), N[idx].astype(np.float64)
        end = (hi[idx] if upward else lo[idx]).astype(np.float64)
        x, term, total = x0.copy(), np.ones(idx.size), np.ones(idx.size)  # terms relative to pmf(x0)
        act = np.arange(idx.size)
        while act.size:
            xa, ma, na, Na = x[act], Mi[act], ni[act], Ni[act]
            if upward:  # pmf(x + 1) / pmf(x)
                t = term[act] * (na - xa) * (Na - xa) / ((xa + 1) * (ma - na - Na + xa + 1))
                x[act] = xa + 1
            else:  # pmf(x - 1) / pmf(x)
                t = term[act] * xa * (ma - na - Na + xa) / ((na - xa + 1) * (Na - xa + 1))
                x[act] = xa - 1
            term[act] = t
            total[act] += t
            act = act[(t > total[act] * rtol) & ((x[act] < end[act]) if upward else (x[act] > end[act]))]
        tail = np.exp(_log_hypergeom_pmf(x0, Mi, ni, Ni)) * total
        out[idx] = tail if upward else 1.0 - tail
    return np.clip(out, 0.0, 1.0)


def grouped_sf(obs, start, end, M, n, N) -> np.ndarray:
    """``P(sum_s H(M_s, n_s, N_s) >= obs_j)`` over the strata rows ``start_j..end_j-1`` of each group j;
    1 where ``obs_j == 0``. One stratum: scipy's sf, vectorised; several: :func:`stratified_sf`."""
    p = np.ones(obs.size)
    one = (end - start == 1) & (obs > 0)
    p[one] = hypergeom_sf(obs[one], M[start[one]], n[start[one]], N[start[one]])
    multi = np.flatnonzero((end - start > 1) & (obs > 0))
    p[multi] = stratified_sf(obs[multi], start[multi], end[multi], M, n, N)
    return p


def stratified_sf(obs, start, end, M, n, N) -> np.ndarray:
    """``P(sum_{r in start_j..end_j-1} H(M_r, n_r, N_r) >= obs_j)`` for each group j (exact, independent strata).

    Each stratum's pmf on ``0..obs_j - 1`` plus one "at least obs_j" bin (one vectorised scipy call for all
    strata), then a convolution per group that lumps everything >= obs_j into the last bin.
    """
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
