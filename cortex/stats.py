"""TIS statistics (concept-level explanation), the frequency baseline, and concept recovery.

Formats (SPEC §3):

* ``TIS_statistics_train/label_{k}.csv`` -- a sectioned CSV: a row ``Total Images: N``; then for each
  n in 1, 5, 10, 20 a row ``Top n Tokens``, a row ``Token,Frequency,Files`` and up to 100 rows
  ``token,count,"f1; f2; ..."``;
* ``TIS_statistics_train/global_top_tokens_statistics.csv`` -- the authors' layout: a header
  ``Top N,Token,Frequency,Files``, then for each n a row ``Top n Tokens`` and its rows ``token,count,files``
  over all labels;
* ``TIS_statistics_train/tis_statistics_long.csv`` -- tidy ``label,top_n,token,count`` (the rows of
  the sectioned files) and ``global_top_tokens_long.csv`` -- tidy ``top_n,token,count``, for pandas;
* ``TIS_statistics_train/source.json`` (+ a copy of ``tis_config.json``) -- which TIS run the statistics
  come from and their ``statistics_id`` (:func:`check_statistics_current`); ``{"in_progress": true}`` from
  the first file written until the last (a killed run leaves statistics no consumer accepts);
  one link of the provenance chain of ``cortex.provenance``;
* ``TIS/frequency_baseline/label_{k}.csv`` -- header ``Token,Count``, top 100.

Counting rule, the authors' (their TIS_analysis.py / generate_freq_based_tokens.py give byte-equal
files): an image's top-n positions are ``np.argsort(scores)[-n:][::-1]`` (numpy's default sort, best
first); *Frequency* is the number of top-n positions, over the label's images, that hold the token
(twice in one image counts twice); *Files* lists the image of every occurrence (an image may appear
twice). Ties in count keep the order of first occurrence -- rows in file order, within an image its
top positions best first -- as ``collections.Counter.most_common`` / a stable sort of a dict does.
The frequency baseline counts every position of the label's rows in CSV order, same tie rule.
Inputs are checked first (:func:`check_tis_inputs`): a missing, partial, header-only or foreign
label file, a NaN score or a repeated image is an error, not a silent skip.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli import make_parser, position_int, positive_int
from .provenance import mark_in_progress, record_id
from .utils import CortexError, atomic_write

TOP_NS = (1, 5, 10, 20)
MAX_ROWS = 100
FILE_SEP = "; "
_LABEL_RE = re.compile(r"^label_(\d+)\.csv$")


# ----------------------------------------------------------------------------- ranking (the authors' order)

def _compact_ids(a) -> np.ndarray:
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
    perm = np.argsort(_compact_ids(sub), kind="stable")  # equal ids stay in reading order
    cuts = np.r_[0, np.cumsum(count[cand])]  # candidate j's occurrences: perm[cuts[j]:cuts[j + 1]]
    first = where[perm[cuts[:-1]]]  # (C,) first occurrence of each candidate
    order = np.lexsort((first, -count[cand]))[:limit]  # count descending, then first occurrence
    tokens = cand[order].astype(np.int64)
    return tokens, count[tokens], [where[perm[cuts[j]:cuts[j + 1]]] for j in order]


def _rank_by_sort(flat: np.ndarray, limit: int | None, positions: bool):
    """:func:`rank_occurrences` for any ids (negative or huge): one stable sort of ``flat`` ``(M,)``."""
    flat = _compact_ids(flat)
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


def label_files(directory, pattern: str = "label_*.csv") -> dict[int, Path]:
    """``{label: path}`` of the ``label_{k}.csv`` files of a folder, sorted by label."""
    out = {}
    for p in Path(directory).glob(pattern):
        m = _LABEL_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


class StagedFiles:
    """Write many files of one folder, each atomically, at the cost of a plain ``open`` per file.

    ``with StagedFiles(out_dir) as stage: with stage.open(out_dir / "a.csv") as f: ...``: every file is
    written into a hidden staging folder inside ``out_dir`` and, when the block ends without an error,
    renamed over its final path (``os.replace``: atomic per file, as :func:`cortex.utils.atomic_write`).
    On an error the staging folder is removed and no final path is touched. For thousands of small
    files (1,000 labels) this avoids atomic_write's per-file temp-name search and chmod; the files get
    the permissions of a plain ``open()``.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.staged: list[tuple[Path, Path]] = []

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".staging_", dir=self.out_dir))
        return self

    def open(self, path):
        """A text file (``newline=""``, UTF-8) that becomes ``path`` (a file of ``out_dir``) at the end."""
        path = Path(path)
        if path.parent != self.out_dir and path.parent.resolve() != self.out_dir.resolve():
            raise ValueError(f"{path} is not a file of {self.out_dir}")
        tmp = self.tmp / path.name
        self.staged.append((tmp, path))
        return open(tmp, "w", newline="", encoding="utf-8")

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                for tmp, path in self.staged:
                    os.replace(tmp, path)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# ----------------------------------------------------------------------------- integrity of the inputs

SOURCE_FILE = "source.json"
TIS_CONFIG = "tis_config.json"


@dataclass
class TisRunInfo:
    """What :func:`check_tis_inputs` found in a TIS folder.

    labels: the labels whose TIS file is complete (sorted; these are read); files: ``{label: path}`` of
    those; expected: ``{label: number of images of the label in the split}`` (counts are ``None`` when only
    the label set was given); rows: ``{label: data rows found}`` of every ``label_{k}.csv`` present;
    config / config_sha1: ``tis_config.json`` and the SHA-1 of its bytes (``None`` when missing);
    problems: one line per defect (empty for a complete run; with ``allow_partial`` these were skipped).
    """

    tis_dir: Path
    labels: list[int]
    files: dict[int, Path]
    expected: dict[int, int | None]
    rows: dict[int, int]
    config: dict | None
    config_sha1: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems


def split_label_counts(data_dir, split: str = "train") -> dict[int, int]:
    """``{label: number of images}`` of ``{split}_embeddings.csv`` (labels only: the id lists are not parsed)."""
    from cortex.data.formats import split_csv

    path = split_csv(data_dir, split)
    if not path.exists():
        raise CortexError(f"split CSV not found: {path}; it gives the labels the TIS files must cover. Pass the "
                          f"right --data_dir (or --root).")
    framed = _frame_list_csv(path, "indices", prefix_columns=2)  # one pass on a large well-formed file
    labels = _int_column(framed[1][1]) if framed is not None and framed[0][:2] == ["filename", "label"] else None
    if labels is not None and labels.size:
        found, n = np.unique(labels, return_counts=True)
        return {int(k): int(v) for k, v in zip(found, n)}
    counts: dict[int, int] = defaultdict(int)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise CortexError(f"{path}: header must be 'filename,label,indices', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                counts[int(row[1])] += 1
            except (ValueError, IndexError):
                raise CortexError(f"{path}:{lineno}: label {row[1:2]} is not an integer") from None
    if not counts:  # else every TIS file would look like another dataset's
        from .utils import generator_command

        raise CortexError(f"{path}: no rows (header only): the dataset's {split} split is empty or was cut short; "
                          f"regenerate the dataset ({generator_command(data_dir)} --overwrite) or pass the right "
                          f"--data_dir")
    return dict(sorted(counts.items()))


def _count_rows(path: Path) -> int:
    """Non-blank lines after the header (a TIS row holds no newline: the list literal is one field)."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line not in (b"\n", b"\r\n"))
    return max(n - 1, 0)


def _sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def check_tis_inputs(tis_dir, expected_labels, allow_partial: bool = False, *, count_rows: bool = True,
                     hint: str = "") -> TisRunInfo:
    """Check that a TIS folder holds one complete run before anything is computed from it.

    tis_dir: ``.../TIS_value_{split}``; expected_labels: ``{label: n_images}`` of the split
    (:func:`split_label_counts`) or an iterable of labels (then row counts are not checked).
    Checks: a ``label_{k}.csv`` for every expected label; none header-only; no unfinished
    ``label_{k}.csv.partial`` (cortex.tis) or temp file of an interrupted write; no file for a label the
    dataset lacks (another dataset's run); each file's row count equals the label's image count
    (``count_rows``); ``tis_config.json`` present (the run's settings) and, where the TIS run records
    per-label run ids, all equal. Any defect is a CortexError listing every problem and what to do, unless
    ``allow_partial``: then a warning lists exactly what is skipped and only the complete labels are returned.
    ``hint`` is added to the message (e.g. the TIS_computation.py command to finish the run).
    """
    tis_dir = Path(tis_dir)
    counted = isinstance(expected_labels, dict)
    expected = ({int(k): int(v) for k, v in expected_labels.items()} if counted
                else {int(k): None for k in expected_labels})
    if not tis_dir.is_dir():
        raise CortexError(f"TIS folder not found: {tis_dir}. Run TIS_computation.py first{hint}.")
    present = label_files(tis_dir)
    if not present and not any(tis_dir.glob("label_*.csv.partial")):  # nothing to resume or to use in part
        raise CortexError(f"{tis_dir} holds no TIS file: no TIS_computation.py run has scored a label here yet. "
                          f"Run TIS_computation.py first{hint}.")
    problems, bad = [], set()
    missing = sorted(set(expected) - set(present))
    if missing:
        problems.append(f"{len(missing)} labels have no TIS file: {_short(missing)}")
        bad.update(missing)
    partial = sorted(p.name for p in tis_dir.glob("label_*.csv.partial"))
    if partial:
        problems.append(f"{len(partial)} labels are unfinished ({_short(partial)})")
        bad.update(int(_LABEL_RE.match(n[: -len(".partial")]).group(1)) for n in partial
                   if _LABEL_RE.match(n[: -len(".partial")]))
    temps = sorted(p.name for p in tis_dir.glob(".label_*.csv.*.tmp"))
    if temps:
        problems.append(f"temp files of an interrupted write: {_short(temps)} (delete them)")
    extra = sorted(set(present) - set(expected))
    if extra:
        problems.append(f"{len(extra)} TIS files are for labels the dataset does not have: "
                        f"{_short([present[k].name for k in extra])} (another dataset's run? delete them)")
        bad.update(extra)
    rows = {}
    for label, path in present.items():
        if not count_rows and label not in extra:
            continue
        rows[label] = n = _count_rows(path)
        want = expected.get(label)
        if n == 0:
            problems.append(f"{path.name} has no rows (header only)")
            bad.add(label)
        elif want is not None and n != want:
            problems.append(f"{path.name} has {n} rows, the split has {want} images of label {label}")
            bad.add(label)
    config, sha = None, None
    cpath = tis_dir / TIS_CONFIG
    if cpath.exists():
        sha = _sha1(cpath)
        try:
            config = json.loads(cpath.read_text(encoding="utf-8-sig"))
        except ValueError as e:
            problems.append(f"{TIS_CONFIG} is not valid JSON ({e})")
    else:
        problems.append(f"{TIS_CONFIG} is missing: the files are not known to come from one TIS_computation.py run")
    run_ids = _run_ids(tis_dir, present)
    want_id = (config or {}).get("run_id")
    foreign = sorted(l for l, rid in run_ids.items() if rid != (want_id or rid))
    if foreign:
        bad.update(foreign)
        problems.append(f"labels {_short(foreign)} were written by another TIS run than {TIS_CONFIG}'s "
                        f"run_id {want_id} (other settings or checkpoint)")
    elif len(set(run_ids.values())) > 1:
        by = defaultdict(list)
        for label, rid in run_ids.items():
            by[rid].append(label)
        problems.append("the files come from different TIS runs: " +
                        "; ".join(f"run {rid}: labels {_short(ls)}" for rid, ls in by.items()))
    labels = sorted(set(present) - bad)
    info = TisRunInfo(tis_dir, labels, {k: present[k] for k in labels}, expected, rows, config, sha, problems)
    if problems:
        _report(tis_dir, problems, len(labels), len(expected), allow_partial, hint)
    return info


def _report(tis_dir: Path, problems: list[str], n_ok: int, n_expected: int, allow_partial: bool, hint: str) -> None:
    """Raise the CortexError listing every problem of a TIS run, or, with ``allow_partial``, warn."""
    what = "\n  - ".join(problems)
    if not allow_partial:
        raise CortexError(f"{tis_dir}: incomplete or inconsistent TIS run:\n  - {what}\nFinish the run with "
                          f"TIS_computation.py --resume (same flags){hint}, or pass --allow_partial to use only "
                          f"the {n_ok} complete labels on purpose.")
    print(f"warning: --allow_partial: {tis_dir} is incomplete; using {n_ok} of {n_expected} labels. "
          f"Skipped / found:\n  - {what}")


def _run_ids(tis_dir: Path, files: dict[int, Path]) -> dict[int, str]:
    """``{label: run_id}`` of the present label files, as cortex.tis records them: ``runs.json``
    (``{label: run_id}`` of finished labels), else the side-car ``label_{k}.csv.run.json``; ``{}`` for
    files written without run records (older runs, the authors' files)."""
    p = tis_dir / "runs.json"
    runs = json.loads(p.read_text(encoding="utf-8-sig")) if p.exists() else {}
    out = {}
    for label, path in files.items():
        rid = runs.get(str(label))
        side = path.with_name(path.name + ".run.json")
        if rid is None and side.exists():
            rid = json.loads(side.read_text(encoding="utf-8-sig")).get("run_id")
        if rid is not None:
            out[label] = str(rid)
    return out


def _short(items, n: int = 10) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- fast CSV readers

FAST_CSV_MIN_BYTES = 1 << 16  # below ~12 TIS rows the row reader's lower fixed cost wins


def _parse_float_rows(rows: list[bytes], n_values: int, dtype):
    """``(R, n_values)`` ``dtype`` (a fresh, writable array) from R list bodies ``b"a, b, ..."`` (TIS scores):
    every value parsed by one single-column pandas C parse, rounding as ``float()``
    (``float_precision="round_trip"``). ``None`` unless every row has ``n_values`` finite numbers."""
    import io
    import warnings

    import pandas as pd

    # one value per line, a sentinel -inf after each row: a row with a value too many or too few moves it
    text = (b"\n-inf\n".join(rows) + b"\n-inf").replace(b",", b"\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float_precision is deprecated in pandas 3 (still honoured)
            column = pd.read_csv(io.BytesIO(text), header=None, names=[0], dtype=np.float64, na_filter=False,
                                 engine="c", float_precision="round_trip", skip_blank_lines=False)[0]
    except Exception:  # nan, an empty or non-numeric value ...: the precise reader explains
        return None
    if column.size != len(rows) * (n_values + 1):
        return None
    values = column.to_numpy(np.float64).reshape(len(rows), n_values + 1)  # (N, n_values + 1)
    if not (np.all(values[:, -1] == -np.inf) and np.isfinite(values[:, :-1]).all()):
        return None  # a moved sentinel, or a non-finite score (check_tis_rows names it on the row path)
    return values[:, :-1].astype(dtype)  # (R, n_values), a copy


def _parse_int_rows(rows: list[bytes], n_values: int | None):
    """``(R, n_values)`` int64 from R list bodies ``b"a, b, ..."`` (no brackets), in one C parse.

    The rows are joined with a sentinel value ``-1`` after each, so a row with a value too many or too
    few moves a sentinel and is caught without a per-row check. ``None`` unless every value is a
    non-negative integer that fits int64 and every row has the same number of values (``n_values`` if
    given); the caller's row reader then names the bad row.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy deprecates stopping at a bad value; the size check catches it
        try:
            flat = np.fromstring(b", -1, ".join(rows) + b", -1", dtype=np.int64, sep=",")  # (R * (width + 1),)
        except ValueError:
            return None
    if flat.size % len(rows):
        return None
    values = flat.reshape(len(rows), -1)  # (R, width + 1)
    width = values.shape[1] - 1
    if width < 1 or (n_values is not None and width != n_values) or not np.all(values[:, -1] == -1):
        return None
    values = values[:, :-1]
    if values.min() < 0 or values.max() == np.iinfo(np.int64).max:  # a negative id or a saturated overflow
        return None
    return values


def int_lists(texts, n_values: int | None = None):
    """``(N, L)`` int64 from N list literals ``"[a, b, ...]"`` (str) in one C parse, or ``None`` when one is
    not a bracketed list of non-negative integers or the lengths differ (callers then parse row by row,
    which names the bad row or keeps ragged rows)."""
    bodies = []
    for t in texts:
        t = t.strip()
        if len(t) < 2 or t[0] != "[" or t[-1] != "]":
            return None
        bodies.append(t[1:-1].encode())
    return _parse_int_rows(bodies, n_values) if bodies else None


def _frame_list_csv(path: Path, list_column: str, prefix_columns: int | None = None):
    """Split a CSV with one quoted list per row into its parts, on the bytes (numpy finds the brackets).

    Returns ``(header, prefix, rows)``: header ``list[str]``; prefix a DataFrame (str) of the fields before
    the list column; rows the N list bodies ``b"a, b, ..."`` (no brackets). ``None`` unless each row holds
    exactly one ``"[...]"`` in column ``list_column`` (the ``prefix_columns``-th, if given), no other
    bracket, no quote before it, and nothing but the other fields after it; and for a file under
    ``FAST_CSV_MIN_BYTES``.
    """
    import io

    import pandas as pd

    path = Path(path)
    if path.stat().st_size < FAST_CSV_MIN_BYTES:
        return None
    raw = path.read_bytes()
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    head_end = raw.find(b"\n", start)
    header = [h.strip() for h in next(csv.reader([raw[start:max(head_end, start)].decode("utf-8", "replace")]), [])]
    if head_end < 0 or list_column not in header or (prefix_columns is not None and
                                                      header.index(list_column) != prefix_columns):
        return None
    j = header.index(list_column)
    base, end = head_end + 1, len(raw)
    while end > base and raw[end - 1] in b"\r\n":
        end -= 1
    b = np.frombuffer(raw, np.uint8)[base:end]  # (B,) the rows, a view (positions below are relative to base)
    if b.size == 0:
        return None
    line_end = np.r_[np.flatnonzero(b == 10), b.size]  # (N,) index of each row's '\n' (or the end)
    line_start = np.r_[0, line_end[:-1] + 1]
    opens, closes = np.flatnonzero(b == 91), np.flatnonzero(b == 93)  # '[' and ']'
    n = line_end.size
    if opens.size != n or closes.size != n or not np.all(opens > line_start):
        return None
    if not (np.all(opens < closes) and np.all(closes < line_end) and np.all(opens[1:] > line_end[:-1])):
        return None  # one list per row, inside its row
    if not (np.all(b[opens - 1] == 34) and np.all(b[np.minimum(closes + 1, b.size - 1)] == 34)):
        return None  # the list is a quoted field
    after = np.minimum(closes + 2, b.size - 1)  # the byte after the closing quote
    if j == len(header) - 1:  # the last field: the row ends there ('\r\n' accepted)
        ok = (closes + 2 == line_end) | ((b[after] == 13) & (closes + 3 == line_end))
    else:
        ok = (closes + 2 < line_end) & (b[after] == 44)
    if not np.all(ok):
        return None
    if j == 0:
        if not np.all(opens - 1 == line_start):
            return None
        prefix = pd.DataFrame(index=range(n))
    else:
        if not np.all(b[opens - 2] == 44):
            return None
        text = b"\n".join(raw[s:e] for s, e in zip((line_start + base).tolist(), (opens - 2 + base).tolist()))
        if b'"' in text or text.count(b",") != n * (j - 1):
            return None  # a quoted or extra field before the list: the csv module's reader decides
        try:
            prefix = pd.read_csv(io.BytesIO(text + b"\n"), header=None, names=range(j), dtype=str,
                                 na_filter=False, engine="c", skip_blank_lines=False)
        except Exception:
            return None
        if len(prefix) != n:
            return None
    rows = [raw[o:e] for o, e in zip((opens + 1 + base).tolist(), (closes + base).tolist())]  # (N,) list bodies
    return header, prefix, rows


def fast_int_list_csv(path, list_column: str, n_values: int | None = 256, prefix_columns: int | None = None):
    """Happy-path reader of CSVs with one quoted integer list per row (split CSVs, neutral-prompt sets).

    The file is read as bytes; each row must hold exactly one ``"[a, b, ...]"`` (the column
    ``list_column`` of the header) and no other bracket (:func:`_frame_list_csv`); the integers are parsed
    in one C call (:func:`_parse_int_rows`), the fields before the list by pandas' C parser.
    Returns ``(header, prefix, values)``: header ``list[str]``, prefix a DataFrame of the fields before the
    list column (str), values ``(N, n_values)`` int64 (``n_values=None``: any length, equal in every row).
    ``None`` whenever the file is not exactly of that shape (wrong header, a blank or short row, a
    negative, spaced or non-numeric id ...) or is under ``FAST_CSV_MIN_BYTES``: callers then use their row
    reader, which names the bad line. A UTF-8 BOM before the header is accepted.
    """
    framed = _frame_list_csv(Path(path), list_column, prefix_columns)
    if framed is None:
        return None
    header, prefix, rows = framed
    values = _parse_int_rows(rows, n_values)  # (N, n_values)
    if values is None:
        return None
    return header, prefix, values


def fast_list_csv(path, header: list[str], n_values: int = 256, dtype=np.float64):
    """Happy-path reader of ``name,label,"[v1, v2, ...]"`` CSVs (TIS files, split CSVs) in one pass.

    Returns ``(names list[str], labels (N,) int64, values (N, n_values) dtype)``, or ``None`` for a file
    under ``FAST_CSV_MIN_BYTES`` and whenever the file is not exactly of that shape (wrong header, a
    quoted name, a short list, a non-numeric value, no rows ...): callers then use their own row-by-row
    reader, which names the bad line. Floats are parsed with Python's correctly rounded ``float`` rules
    (identical to ``float(text)``); integers as :func:`fast_int_list_csv`. A UTF-8 BOM is accepted.
    """
    framed = _frame_list_csv(Path(path), header[2], prefix_columns=2)  # None for a small file
    if framed is None or framed[0] != list(header):
        return None
    _, prefix, rows = framed
    if np.issubdtype(dtype, np.integer):
        values = _parse_int_rows(rows, n_values)  # (N, n_values) int64
    else:
        values = _parse_float_rows(rows, n_values, dtype)
    labels = _int_column(prefix[1])
    if values is None or labels is None:
        return None
    return prefix[0].tolist(), labels, values.astype(dtype, copy=False)  # (N,), (N,), (N, n_values)


def _int_column(column):
    """``(N,)`` int64 of a str column of :func:`_frame_list_csv`'s prefix, or ``None`` (not all integers)."""
    try:
        return column.astype(np.int64).to_numpy(np.int64, copy=True)
    except (ValueError, OverflowError):
        return None


def check_tis_rows(path, names: list[str], scores: np.ndarray) -> None:
    """Reject a TIS file with a non-finite score or a repeated filename, naming the file and line.

    names: N filenames in file order; scores ``(N, 256)``. Line numbers count the header as line 1.
    """
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise CortexError(f"{path}:{i + 2}: non-finite TIS (NaN/Inf) for image {names[i]} ({bad.size} such rows). "
                          f"Recompute this label: delete the file and rerun TIS_computation.py --resume.")
    arr = np.asarray(names, dtype=object)
    order = np.argsort(arr, kind="stable")
    same = np.flatnonzero(arr[order][1:] == arr[order][:-1])
    if same.size:
        a, b = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        raise CortexError(f"{path}:{b + 2}: image {names[b]} is listed twice (also at line {a + 2}); a row per "
                          f"image is expected. Delete the file and rerun TIS_computation.py --resume for this label.")


def read_split_ids(data_dir, split: str = "train", num_classes: int | None = None):
    """``(names, labels (N,) int64, ids (N, h*w) int64)`` of ``{split}_embeddings.csv`` in file order (h*w = 256
    for the paper's grid; another tokenizer's from ``dataset_info.json``, :func:`cortex.data.formats.dataset_geometry`).

    One C parse on well-formed files; anything else goes through :func:`cortex.data.formats.read_split` (the
    training reader), so every check -- header, field count, integer label within ``0..num_classes-1``,
    256 ids in 0..n_codes-1 -- and its message (file and line) are the training reader's.
    """
    from cortex.data.formats import CSV_HEADER, codebook_size, n_positions, read_split, split_csv

    path = split_csv(data_dir, split)
    fast = fast_list_csv(path, CSV_HEADER, n_positions(data_dir), np.int64) if path.exists() else None
    if fast is not None:
        names, labels, ids = fast
        n_codes = codebook_size(data_dir)
        ok = labels.min() >= 0 and ids.min() >= 0 and (num_classes is None or labels.max() < num_classes)
        ok = ok and (n_codes is None or ids.size == 0 or ids.max() < n_codes)
        if ok:
            return names, labels, ids
    records = read_split(data_dir, split, num_classes)  # raises the precise CortexError
    return ([r.filename for r in records], np.array([r.label for r in records], dtype=np.int64),
            np.array([r.ids for r in records], dtype=np.int64).reshape(len(records), -1))


# ----------------------------------------------------------------------------- TIS statistics

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
    return np.take_along_axis(_compact_ids(ids), top_positions(scores, max_n), axis=1)


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


def label_statistics(names: list[str], ids: np.ndarray, scores: np.ndarray, top_ns=TOP_NS,
                     limit: int | None = MAX_ROWS) -> dict[int, list[tuple[int, int, list[str]]]]:
    """TIS statistics of one label.

    names: N filenames; ids ``(N, 256)`` token ids; scores ``(N, 256)`` TIS.
    Returns ``{n: [(token, count, files), ...]}`` with up to ``limit`` rows per n.
    """
    if len(names) == 0:
        return {n: [] for n in top_ns}
    return sections_from_top(names, top_tokens(ids, scores, max(top_ns)), top_ns, limit)


def write_stats_csv(path, total_images: int, sections: dict[int, list], opener=atomic_write) -> None:
    """The sectioned per-label statistics file (SPEC §3); ``opener``: atomic_write or ``StagedFiles.open``."""
    with opener(path) as f:
        w = csv.writer(f)
        w.writerow([f"Total Images: {total_images}"])
        for n, rows in sections.items():
            w.writerow([f"Top {n} Tokens"])
            w.writerow(["Token", "Frequency", "Files"])
            w.writerows([tok, cnt, FILE_SEP.join(files)] for tok, cnt, files in rows)


def write_global_csv(path, sections: dict[int, list], opener=atomic_write) -> None:
    """``global_top_tokens_statistics.csv`` in the authors' layout: a header ``Top N,Token,Frequency,Files``,
    then per n a row ``Top n Tokens`` and the rows ``token,count,files`` (no per-section header)."""
    with opener(path) as f:
        w = csv.writer(f)
        w.writerow(["Top N", "Token", "Frequency", "Files"])
        for n, rows in sections.items():
            w.writerow([f"Top {n} Tokens"])
            w.writerows([tok, cnt, FILE_SEP.join(files)] for tok, cnt, files in rows)


def read_stats(path) -> tuple[int | None, dict[int, list[tuple[int, int]]]]:
    """Parse a sectioned statistics file: ``(total_images, {n: [(token, count), ...]})``.

    Reads the per-label files and the global one (whose sections have no ``Token,...`` header row);
    tolerates blank rows between sections and a UTF-8 BOM (files written by other tools).
    """
    path = Path(path)
    if not path.exists():
        raise CortexError(f"TIS statistics file not found: {path}. Run TIS_analysis.py --model M first.")
    total, sections, current = None, {}, None
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            head = row[0].strip()
            if head.startswith("Total Images:"):
                total = int(head.split(":", 1)[1])
                continue
            m = re.fullmatch(r"Top (\d+) Tokens", head)
            if m:
                current = sections.setdefault(int(m.group(1)), [])
                continue
            if head in ("Token", "Top N"):
                continue
            if current is None:
                raise CortexError(f"{path}:{lineno}: token row before any 'Top n Tokens' section")
            try:
                current.append((int(head), int(row[1])))
            except (ValueError, IndexError):
                raise CortexError(f"{path}:{lineno}: expected 'token,count,files', got {row[:2]}") from None
    return total, sections


def read_stats_section(path, top_n: int, token_num: int) -> list[int]:
    """The first ``token_num`` token ids of section ``Top {top_n} Tokens`` (concept tokens of a label)."""
    _, sections = read_stats(path)
    if top_n not in sections:
        raise CortexError(f"{path}: no 'Top {top_n} Tokens' section (found: {sorted(sections)}). "
                          f"Use --top_n among those, or rerun TIS_analysis.py.")
    toks = [t for t, _ in sections[top_n]]
    check_token_num(path, len(toks), token_num, _recorded_max_rows(Path(path).parent / "source.json"),
                    f"section 'Top {top_n} Tokens'", "TIS_analysis.py --max_rows")
    return toks[:token_num]


def _recorded_max_rows(args_path) -> int:
    """``max_rows`` recorded beside a statistics / frequency-baseline folder (source.json, args.json), else the
    default MAX_ROWS."""
    try:
        v = json.loads(Path(args_path).read_text()).get("max_rows")
    except (OSError, ValueError, AttributeError):
        v = None
    return int(v) if isinstance(v, int) else MAX_ROWS


def check_token_num(path, listed: int, token_num: int | None, max_rows: int, what: str, rerun: str) -> None:
    """``--token_num`` larger than the tokens a file lists: a CortexError when the list was cut at ``max_rows``
    (more tokens exist: rerun with a larger ``--max_rows``); a note when the file lists every token there is."""
    if token_num is None or listed >= token_num:
        return
    if listed >= max_rows:
        raise CortexError(f"{path}: --token_num {token_num} asks for more tokens than its {what} lists ({listed}: "
                          f"the list was cut at --max_rows {max_rows}); rerun {rerun} {token_num} (or more), or "
                          f"pass --token_num {listed} or less")
    print(f"note: {path}: its {what} lists only {listed} tokens (every token there is); using {listed}, not "
          f"--token_num {token_num}")


def _missing_image(where, name) -> CortexError:
    return CortexError(f"{where}: image {name} is not in the train token indices "
                       f"(datasets/train_token_indices.pkl / train_embeddings.csv); are the TIS files from "
                       f"another dataset? Delete a stale pkl to rebuild it.")


def top_token_matrix(names: list[str], positions: np.ndarray, token_indices: dict, where) -> np.ndarray:
    """Token ids at given positions of each image: ``(N, k)`` from ``positions (N, k)`` and the
    ``{filename: [256 ids]}`` cache; only the k ids per image are touched. A missing image is a CortexError."""
    from operator import itemgetter

    k = positions.shape[1]
    try:
        rows = [itemgetter(*p)(token_indices[n]) for n, p in zip(names, positions.tolist())]
    except KeyError as e:
        raise _missing_image(where, e.args[0]) from None
    if k == 1:
        rows = [(r,) for r in rows]
    return _compact_ids(np.array(rows, dtype=np.int64).reshape(len(names), k))


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
        return _compact_ids(np.array(rows, dtype=np.int64))  # (N, h*w)
    except ValueError:
        raise CortexError(f"{where}: the token indices of these images have different lengths; rebuild "
                          f"datasets/train_token_indices.pkl (delete it) from train_embeddings.csv.") from None


def _fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a (large) TIS file: size + SHA-1 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    return h.hexdigest()


def analyze_tis(tis_dir, stats_dir, token_indices, top_ns=TOP_NS, limit: int = MAX_ROWS,
                progress: bool = True, expected_labels=None, allow_partial: bool = False, hint: str = "",
                keep: dict | None = None) -> dict:
    """Write the statistics of a TIS run (``tis_dir/label_{k}.csv``) to ``stats_dir``, as the authors' script.

    token_indices: ``{filename: [256 ids]}`` or a function returning it (called after the checks).
    expected_labels: ``{label: n_images}`` of the train split (:func:`split_label_counts`); the run is
    checked by :func:`check_tis_inputs` (a CortexError unless ``allow_partial``). Every TIS file is read
    and checked (NaN/Inf, repeated image, row count) before anything is written. Per label: top-n token
    counts (``Files``: one entry per occurrence), ties in the authors' first-occurrence order; the global
    file counts the labels in increasing label order (the authors': ``os.listdir`` order). Statistics of
    labels outside this run are removed, and ``source.json`` records the ``tis_config.json`` and each TIS
    file's fingerprint (:func:`check_statistics_current`). Returns ``{"labels": [...], "images": N}``.
    keep: a dict to fill with ``{label: (ids (N, 256), scores (N, 256))}`` of the labels analysed, so a later
    step (the enrichment tests, ``cortex.significance.run_significance(parsed=...)``) need not parse the
    TIS files again.
    """
    from tqdm import tqdm

    from .tis import read_tis_file

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
        names, _, scores = read_tis_file(path)  # rejects NaN/Inf and repeated images
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
        _report(tis_dir, problems, len(tops), len(info.expected), allow_partial, hint)
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
              "labels": {str(l): {"rows": len(names_of[l]), "fingerprint": _fingerprint(info.files[l])}
                         for l in labels},
              "complete": info.complete, "problems": info.problems, "top_ns": list(top_ns), "max_rows": limit}
    record["statistics_id"] = record_id(record)  # what the significance file and the eval outputs record
    with atomic_write(source) as f:
        json.dump(record, f, indent=2)
    return {"labels": labels, "images": len(every), "complete": info.complete}


def check_statistics_current(stats_dir, tis_dir=None, *, require: bool = False, rebuild: str | None = None) -> dict | None:
    """Check that the TIS statistics in ``stats_dir`` were computed from the current TIS run.

    Reads ``stats_dir/source.json`` (written last by :func:`analyze_tis`). A CortexError when: the
    statistics were left unfinished; a statistics file exists for a label outside the recorded run
    (stale); and, when ``tis_dir`` exists, its ``tis_config.json`` differs from the recorded one, its
    label files differ, or a TIS file changed since (fingerprint). Without ``source.json`` (statistics
    not written by this version, e.g. the authors' published files) a warning is printed and ``None``
    returned, or a CortexError with ``require=True``. Statistics made with ``--allow_partial`` pass with
    a warning naming what they lack. Returns the recorded source dict.
    """
    stats_dir = Path(stats_dir)
    rerun = f"Rebuild them: {rebuild}" if rebuild else "Rerun TIS_analysis.py (same --model/--attribution) to recompute them."
    src_path = stats_dir / SOURCE_FILE
    if not src_path.exists():
        if label_files(stats_dir) and not require:
            print(f"warning: {stats_dir} has no {SOURCE_FILE}: cannot tell which TIS run these statistics come "
                  f"from (written by another tool or an older version). {rerun}")
            return None
        raise CortexError(f"{stats_dir}: no complete TIS statistics ({SOURCE_FILE} missing: never computed, or "
                          f"the last TIS_analysis.py run stopped early). {rerun}")
    src = json.loads(src_path.read_text(encoding="utf-8"))
    if src.get("in_progress"):
        raise CortexError(f"stale statistics {stats_dir}: the last TIS_analysis.py run did not finish (stopped "
                          f"while writing them; the files may mix two runs). {rerun}")
    recorded = {int(k): v for k, v in src["labels"].items()}
    stale = sorted(set(label_files(stats_dir)) - set(recorded))
    if stale:
        raise CortexError(f"{stats_dir}: statistics files for labels {_short(stale)} are not part of the recorded "
                          f"TIS run (left from an earlier run). {rerun}")
    if tis_dir is not None and Path(tis_dir).is_dir():
        tis_dir = Path(tis_dir)
        cpath = tis_dir / TIS_CONFIG
        sha = _sha1(cpath) if cpath.exists() else None
        if sha != src.get("tis_config_sha1"):
            raise CortexError(f"{stats_dir} was computed from another TIS run: {cpath} "
                              f"{'changed' if sha else 'is missing'} since. {rerun}")
        files = label_files(tis_dir)
        changed = [l for l, v in recorded.items() if l not in files or _fingerprint(files[l]) != v["fingerprint"]]
        new = sorted(set(files) - set(recorded)) if src.get("complete", True) else []
        if changed or new:
            what = (f"TIS files changed or removed since: labels {_short(sorted(changed))}. " if changed else "") + \
                   (f"new TIS files: labels {_short(new)}. " if new else "")
            raise CortexError(f"{stats_dir} is out of date with {tis_dir}: {what}{rerun}")
    if not src.get("complete", True):
        print(f"warning: {stats_dir} was computed with --allow_partial from an incomplete TIS run: "
              + "; ".join(src.get("problems", [])))
    return src


# ----------------------------------------------------------------------------- frequency baseline

def frequency_baseline(records, limit: int = MAX_ROWS) -> dict[int, list[tuple[int, int]]]:
    """``{label: [(token, count), ...]}``: the ids occurring most often in a label's images.

    records: ``cortex.data.formats.Record``s, or ``(labels (N,), ids (N, 256))`` arrays (:func:`read_split_ids`).
    Counted in file order, ties in first-occurrence order (the authors' ``Counter.most_common``).
    """
    if isinstance(records, tuple):
        labels, ids = np.asarray(records[0]), _compact_ids(records[1])
    else:
        labels = np.array([int(r.label) for r in records], dtype=np.int64)
        ids = _compact_ids(np.array([r.ids for r in records]).reshape(len(records), -1))
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
    check_token_num(path, len(toks), token_num, _recorded_max_rows(path.parent / "args.json"),
                    "frequency baseline", "generate_freq_based_tokens.py --max_rows")
    return toks if token_num is None else toks[:token_num]


# ----------------------------------------------------------------------------- concept recovery

def read_ground_truth(path) -> dict[int, list[int]]:
    """``{label: planted concept token ids}`` from ``datasets/ground_truth.json``."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"ground truth not found: {path}. It is written by generate_dataset.py for the "
                          f"synthetic world only; real data has no planted concepts.")
    gt = json.loads(path.read_text())
    if "concept_tokens" not in gt:
        raise CortexError(f"{path}: no 'concept_tokens' entry")
    return {int(k): [int(t) for t in v] for k, v in gt["concept_tokens"].items()}


def precision_at_k(predicted, planted, k: int) -> float:
    """``|first k predicted ∩ planted| / k`` (missing predictions count as misses)."""
    if k <= 0:
        return float("nan")
    return len(set(list(predicted)[:k]) & set(planted)) / k


def random_precision(occurring, planted) -> float:
    """Expected precision of k ids drawn uniformly (without replacement) from the ids occurring in a
    label's images: ``|planted ∩ occurring| / |occurring|``, for any k."""
    occ = set(occurring)
    return len(occ & set(planted)) / len(occ) if occ else float("nan")


def find_attributions(paths, model: int) -> list[str]:
    """Attributions with TIS statistics for ``model`` (the paper's ``smoothgrad`` first)."""
    from .attribution import ATTRIBUTIONS

    names = [a for a in ATTRIBUTIONS if label_files(paths.stats_dir(model, a))]
    return sorted(names, key=lambda a: (a != "smoothgrad", a))


def find_models(paths) -> list[int]:
    from .attribution import ATTRIBUTIONS

    ms = set()
    for a in ATTRIBUTIONS:
        root = paths.tis_root(a)
        if root.is_dir():
            for d in root.glob("Net*"):
                if d.name[3:].isdigit() and label_files(d / "TIS_statistics_train"):
                    ms.add(int(d.name[3:]))
    return sorted(ms)


def concept_recovery(paths, models=None, k: int | None = None, top_ns=TOP_NS,
                     attributions=None) -> tuple[list[dict], list[dict]]:
    """Precision@k of the planted concept tokens (``paths.data_dir/ground_truth.json``).

    For each model and attribution with statistics, each top_n: the first k tokens of section
    ``Top {top_n} Tokens``; plus the frequency baseline (first k of ``Token,Count``) and random
    choice (expected precision over the ids occurring in the label's train images). ``k`` defaults to
    the number of planted tokens of each label. Returns ``(per_label_rows, summary_rows)``; the rows
    are dicts with keys ``model, method, top_n, label, k, precision`` (summary: label ``"mean"``).
    attributions: a list for every model, or ``{model: [attribution, ...]}``; default: all found per model.
    """
    from cortex.data.formats import read_split

    planted = read_ground_truth(Path(paths.data_dir) / "ground_truth.json")
    records = read_split(paths.data_dir, "train")
    occurring = defaultdict(set)
    for r in records:
        occurring[int(r.label)].update(r.ids.tolist())
    labels = sorted(planted)
    models = list(models) if models else find_models(paths)
    rows = []

    def kk(label):
        return k if k is not None else len(planted[label])

    for m in models:
        attrs = attributions.get(m) if isinstance(attributions, dict) else attributions
        for a in attrs or find_attributions(paths, m):
            files = label_files(paths.stats_dir(m, a))
            for n in top_ns:
                for label in labels:
                    if label not in files:
                        continue
                    _, sections = read_stats(files[label])
                    if n not in sections:  # a missing section is no evidence of precision 0
                        raise CortexError(f"{files[label]}: no 'Top {n} Tokens' section (found: {sorted(sections)}); "
                                          f"the file is truncated or from another TIS_analysis.py run: rerun "
                                          f"TIS_analysis.py --model {m}, or pass --top_ns among those found")
                    pred = [t for t, _ in sections[n]]
                    rows.append(dict(model=m, method=a, top_n=n, label=label, k=kk(label),
                                     precision=precision_at_k(pred, planted[label], kk(label))))
    freq = label_files(paths.frequency_dir())
    for label in labels:
        if label in freq:
            rows.append(dict(model="", method="frequency_baseline", top_n="", label=label, k=kk(label),
                             precision=precision_at_k(read_frequency_baseline(freq[label]), planted[label], kk(label))))
        rows.append(dict(model="", method="random", top_n="", label=label, k=kk(label),
                         precision=random_precision(occurring[label], planted[label])))
    summary = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["method"], r["top_n"])].append(r)
    for (m, a, n), rs in groups.items():
        ks = {r["k"] for r in rs}
        summary.append(dict(model=m, method=a, top_n=n, label="mean", k=ks.pop() if len(ks) == 1 else "planted",
                            precision=float(np.mean([r["precision"] for r in rs])), labels=len(rs)))
    return rows, summary


# ----------------------------------------------------------------------------- the TIS_analysis.py scripts

def analysis_parser(model_choices) -> argparse.ArgumentParser:
    """Flags of both folders' TIS_analysis.py (the VQGAN one adds paths; the Dalle one also --bias_type)."""
    from .attribution import ATTRIBUTIONS

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
    (:func:`check_tis_inputs`; ``--allow_partial`` to proceed on an incomplete run). keep: filled with the
    parsed ``{label: (ids, scores)}`` (:func:`analyze_tis`) for the enrichment tests that follow.
    """
    from cortex.data.formats import load_token_indices
    from .paths import ExperimentPaths
    from .provenance import check_tis_run
    from .utils import save_run_args

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
