"""Cliff's delta and its uncertainty (bias detection, SPEC §1 step 7).

Cliff's delta of samples ``x`` (n values) and ``y`` (m values) is the standard

    delta = (#{(i, j): x_i > y_j} - #{(i, j): x_i < y_j}) / (n * m)      in [-1, 1]

computed here in O((n + m) log(n + m)) by sorting ``y`` and two ``searchsorted`` calls (ties count in
neither term). The seed code divided by ``2 * n * m``, i.e. returned half of the standard value; that
value is reported too, as ``cliff_delta_seed``, for readers reproducing the paper's table.

``cliffs_delta_mwu`` computes it from ``scipy.stats.mannwhitneyu`` (``delta = 2U/(n m) - 1``, equal to the sorting
implementation) with the two-sided p-value; ``bootstrap_ci`` gives a seeded percentile-bootstrap 95% CI (the two
samples resampled independently); ``magnitude`` reads |delta| with Romano et al.'s thresholds.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu

from ..utils import CortexError

N_BOOT = 2000  # bootstrap resamples of the 95% CI


MAGNITUDES = ((0.147, "negligible"), (0.33, "small"), (0.474, "medium"), (float("inf"), "large"))


def _sample(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.dtype == object:
        raise CortexError(f"Cliff's delta: sample {name} must be numbers, got objects")
    a = a.ravel()
    if a.size == 0:
        raise CortexError(f"Cliff's delta: sample {name} is empty; both samples need at least one value "
                          f"(is the neutral-prompt CSV empty?)")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise CortexError(f"Cliff's delta: sample {name} contains NaN")
    return a


def dominance(x, y) -> tuple[int, int]:
    """``(#{x_i > y_j}, #{x_i < y_j})`` over all pairs, by sorting: O((n + m) log(n + m))."""
    x, y = _sample(x, "x"), _sample(y, "y")
    ys = np.sort(y, kind="stable")
    below = np.searchsorted(ys, x, side="left")  # for each x_i: #y_j < x_i
    not_above = np.searchsorted(ys, x, side="right")  # #y_j <= x_i
    greater = int(below.sum(dtype=np.int64))
    less = int((ys.size - not_above).sum(dtype=np.int64))
    return greater, less


def cliffs_delta(x, y) -> float:
    """Standard Cliff's delta ``(#x>y - #x<y) / (n m)`` in [-1, 1]; O((n + m) log(n + m))."""
    greater, less = dominance(x, y)
    n, m = np.asarray(x).size, np.asarray(y).size
    return (greater - less) / (n * m)


def cliffs_delta_mwu(x, y) -> tuple[float, float]:
    """``(delta, p)``: Cliff's delta from the Mann-Whitney U of ``x`` (``delta = 2 U / (n m) - 1``) and the
    two-sided p-value of ``scipy.stats.mannwhitneyu`` (exact without ties for small samples, else the normal
    approximation with tie correction). ``delta`` equals :func:`cliffs_delta`. Equal constant samples: p = 1."""
    x, y = _sample(x, "x"), _sample(y, "y")
    n, m = x.size, y.size
    if np.unique(np.concatenate([x, y])).size == 1:
        return 0.0, 1.0
    res = mannwhitneyu(x, y, alternative="two-sided")
    return 2.0 * float(res.statistic) / (n * m) - 1.0, float(res.pvalue)


def bootstrap_ci(x, y, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of Cliff's delta, ``x`` and ``y`` resampled independently (seeded).

    Each resample is drawn as multinomial counts over the pooled distinct values, so one resample costs
    O(distinct values) (the per-image token counts take few values): ``(B, V)`` arrays in chunks.
    """
    x, y = _sample(x, "x"), _sample(y, "y")
    values = np.unique(np.concatenate([x, y]))  # (V,)
    px = np.bincount(np.searchsorted(values, x), minlength=values.size) / x.size
    py = np.bincount(np.searchsorted(values, y), minlength=values.size) / y.size
    rng = np.random.default_rng(seed)
    deltas = []
    for s in range(0, n_boot, 256):
        b = min(256, n_boot - s)
        hx = rng.multinomial(x.size, px, size=b).astype(np.float64)  # (b, V)
        hy = rng.multinomial(y.size, py, size=b).astype(np.float64)  # (b, V)
        below = np.cumsum(hy, axis=1) - hy  # (b, V) #y < value
        above = y.size - np.cumsum(hy, axis=1)  # (b, V) #y > value
        deltas.append(((hx * below).sum(1) - (hx * above).sum(1)) / (x.size * y.size))
    d = np.concatenate(deltas)
    a = (1 - level) / 2
    return float(np.quantile(d, a)), float(np.quantile(d, 1 - a))


def cliffs_delta_seed(x, y) -> float:
    """The value the seed code reported: half the standard Cliff's delta (it divided by ``2 n m``)."""
    return cliffs_delta(x, y) / 2.0


def cliffs_delta_brute(x, y, chunk: int = 1024) -> float:
    """Definition by comparing every pair, vectorised with numpy in chunks of ``x`` (O(n m) work)."""
    x, y = _sample(x, "x"), _sample(y, "y")
    dom = 0
    for s in range(0, x.size, chunk):
        xs = x[s:s + chunk, None]
        dom += int((xs > y[None]).sum()) - int((xs < y[None]).sum())
    return dom / (x.size * y.size)


def cliffs_delta_loop(x, y) -> float:
    """The seed's double loop in pure Python (standard normalisation), for tests and the benchmark."""
    x, y = _sample(x, "x").tolist(), _sample(y, "y").tolist()
    dom = 0
    for a in x:
        for b in y:
            if a > b:
                dom += 1
            elif a < b:
                dom -= 1
    return dom / (len(x) * len(y))


def magnitude(delta: float) -> str:
    """negligible / small / medium / large (Romano et al. 2006 thresholds on |delta|)."""
    d = abs(delta)
    return next(name for t, name in MAGNITUDES if d < t)
