"""Ranking token occurrences in the authors' order: the counting rule of the TIS statistics and the frequency baseline.

An image's top-n positions are ``np.argsort(scores)[-n:][::-1]`` (numpy's default sort, best first);
*Frequency* is the number of top-n positions, over the label's images, that hold the token (twice in one image
counts twice). Ties in count keep the order of first occurrence -- rows in file order, within an image its top
positions best first -- as ``collections.Counter.most_common`` / a stable sort of a dict does.
"""
from __future__ import annotations

import numpy as np

TOP_NS = (1, 5, 10, 20)
MAX_ROWS = 100


def compact_ids(a) -> np.ndarray:
    """Token ids as int16 when they fit (numpy's stable sort is then a linear radix sort), else int64."""
    a = np.asarray(a)
    if a.size and a.dtype != np.int16 and -(1 << 15) <= a.min() and a.max() < (1 << 15):
        return a.astype(np.int16)
    return a if a.dtype == np.int16 else a.astype(np.int64, copy=False)


def rank_occurrences(flat, limit: int | None = MAX_ROWS, positions: bool = False):
    """Count the token ids of ``flat`` and rank them as the authors do.

    flat: ``(M,)`` token ids in reading order. The authors fill a dict (``collections.Counter``) in that
    order and sort it by count, descending, with a stable sort (``most_common``): equal counts keep the
    order of their FIRST occurrence. Same here, linear in M: counts by ``np.bincount``; only the tokens
    that can make the first ``limit`` rows (count >= the limit-th largest count) are located in ``flat``
    to break ties by first occurrence (ids outside ``0..max(4 M, 65535)``: one stable sort of ``flat``).
    Returns ``(tokens (K,), counts (K,), where)``, K <= ``limit``; ``where`` is ``None`` unless
    ``positions``, else a list of K arrays: the indices into ``flat`` of each token's occurrences,
    ascending (reading order).
    """
    flat = np.asarray(flat).ravel()
    if flat.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, ([] if positions else None)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= max(4 * flat.size, 1 << 16):
        return _rank_by_sort(flat, limit, positions)
    count = np.bincount(flat, minlength=hi + 1)  # (V,) occurrences of each id
    present = np.flatnonzero(count)  # (U,) ascending ids
    cand = present
    if limit is not None and present.size > limit:
        kth = np.partition(count[present], present.size - limit)[present.size - limit]  # limit-th largest count
        cand = present[count[present] >= kth]  # every token that can rank in the first `limit`
    if cand.size == present.size:
        where = np.arange(flat.size)  # every position
    else:
        keep = np.zeros(hi + 1, bool)
        keep[cand] = True
        where = np.flatnonzero(keep[flat])  # (P,) positions of the candidates, reading order
    sub = flat[where]  # (P,)
    if not positions:  # first occurrences from a prefix of `sub` (frequent tokens show up early)
        seen = 4 * cand.size
        while True:
            found, idx = np.unique(sub[:seen], return_index=True)  # ascending ids, first index of each
            if found.size == cand.size or seen >= sub.size:
                break
            seen *= 4
        order = np.lexsort((where[idx], -count[cand]))[:limit]  # count descending, then first occurrence
        tokens = cand[order].astype(np.int64)
        return tokens, count[tokens], None
    perm = np.argsort(compact_ids(sub), kind="stable")  # equal ids stay in reading order
    cuts = np.r_[0, np.cumsum(count[cand])]  # candidate j's occurrences: perm[cuts[j]:cuts[j + 1]]
    first = where[perm[cuts[:-1]]]  # (C,) first occurrence of each candidate
    order = np.lexsort((first, -count[cand]))[:limit]  # count descending, then first occurrence
    tokens = cand[order].astype(np.int64)
    return tokens, count[tokens], [where[perm[cuts[j]:cuts[j + 1]]] for j in order]


def _rank_by_sort(flat: np.ndarray, limit: int | None, positions: bool):
    """:func:`rank_occurrences` for any ids (negative or huge): one stable sort of ``flat`` ``(M,)``."""
    flat = compact_ids(flat)
    perm = np.argsort(flat, kind="stable")  # (M,) equal ids stay in reading order
    run = flat[perm]
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])  # (U,) first slot of each distinct id
    counts = np.diff(np.r_[starts, flat.size])  # (U,)
    order = np.lexsort((perm[starts], -counts))  # count descending, then first occurrence
    if limit is not None:
        order = order[:limit]
    tokens = run[starts[order]].astype(np.int64)
    where = [perm[starts[j]:starts[j] + counts[j]] for j in order] if positions else None
    return tokens, counts[order], where


def count_tokens(ids, limit: int | None = MAX_ROWS) -> list[tuple[int, int]]:
    """``[(token, count), ...]`` of the ids of ``ids`` (any shape, read row-major), the authors' order."""
    tokens, counts, _ = rank_occurrences(ids, limit)
    return list(zip(tokens.tolist(), counts.tolist()))


def rank_tokens(tokens: np.ndarray, count: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indices of the kept tokens, ``count`` descending, then token id ascending (the significance tables' order)."""
    idx = np.flatnonzero(keep)
    return idx[np.lexsort((tokens[idx], -count[idx]))]


def top_positions(scores: np.ndarray, max_n: int) -> np.ndarray:
    """The authors' top positions of each row, best first: ``(N, max_n)``.

    scores ``(N, 256)``. As the authors' ``np.argsort(scores)[-n:][::-1]``: numpy's default argsort,
    ascending, read from the end; so equal scores come out as numpy orders them (reversed), and the
    top-n for every n <= max_n is a prefix of this.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(scores, axis=1)[:, ::-1][:, :max_n]


def top_tokens(ids: np.ndarray, scores: np.ndarray, max_n: int) -> np.ndarray:
    """Token ids at the top positions: ``(N, max_n)`` (ids ``(N, 256)``, scores ``(N, 256)``)."""
    return np.take_along_axis(compact_ids(ids), top_positions(scores, max_n), axis=1)


def sections_from_top(names, top: np.ndarray, top_ns=TOP_NS, limit: int | None = MAX_ROWS) -> dict:
    """``{n: [(token, count, files), ...]}`` from the top tokens ``(N, max_n)`` of N images.

    Frequency = occurrences among the images' top-n positions; files = the image of each occurrence, in
    reading order (an image holding the token twice is listed twice), as the authors.
    """
    names = np.asarray(names, dtype=object)
    out = {}
    for n in top_ns:
        flat = top[:, :n].ravel()  # (N * n,) image by image, best position first
        tokens, counts, where = rank_occurrences(flat, limit, positions=True)
        out[n] = [(t, c, names[w // n].tolist()) for t, c, w in zip(tokens.tolist(), counts.tolist(), where)]
    return out
