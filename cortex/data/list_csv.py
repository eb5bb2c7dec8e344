"""Readers of CSVs holding one quoted integer or float list per row, and the split CSVs' fast readers.

The files: split CSVs ``filename,label,"[id, ...]"`` (``cortex.data``), TIS files ``filename,label,"[s, ...]"``
(``cortex.attribution.store``), neutral-prompt sets ``...,"[id, ...]"`` (``cortex.analysis.bias``). The happy path
reads a whole file in one C parse (:func:`fast_list_csv`, :func:`fast_int_list_csv`); anything unusual returns
``None`` and the caller's row-by-row reader names the bad line. (Headed for ``cortex/data/`` once that package
exists on the branch: it reads the data layer's formats.)
"""
from __future__ import annotations

import csv
import io
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from .formats import CSV_HEADER, codebook_size, n_positions, read_split, split_csv
from ..utils import CortexError, generator_command

FAST_CSV_MIN_BYTES = 1 << 16  # below ~12 TIS rows the row reader's lower fixed cost wins


def _parse_float_rows(rows: list[bytes], n_values: int, dtype):
    """``(R, n_values)`` ``dtype`` (a fresh, writable array) from R list bodies ``b"a, b, ..."`` (TIS scores):
    every value parsed by one single-column pandas C parse, rounding as ``float()``
    (``float_precision="round_trip"``). ``None`` unless every row has ``n_values`` finite numbers."""
    import pandas as pd  # heavy (~0.3 s): imported on the fast path only

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


def _list_bodies(texts) -> list[bytes] | None:
    """The bodies ``b"a, b, ..."`` of N list literals ``"[a, b, ...]"`` (str); ``None`` when one is not bracketed."""
    bodies = []
    for t in texts:
        t = t.strip()
        if len(t) < 2 or t[0] != "[" or t[-1] != "]":
            return None
        bodies.append(t[1:-1].encode())
    return bodies


def int_lists(texts, n_values: int | None = None):
    """``(N, L)`` int64 from N list literals ``"[a, b, ...]"`` (str) in one C parse, or ``None`` when one is
    not a bracketed list of non-negative integers or the lengths differ (callers then parse row by row,
    which names the bad row or keeps ragged rows)."""
    bodies = _list_bodies(texts)
    return _parse_int_rows(bodies, n_values) if bodies else None


def float_lists(texts, n_values: int):
    """``(N, n_values)`` float64 from N list literals ``"[s, ...]"`` (str; TIS scores) in one C parse
    (:func:`_parse_float_rows`, rounding as ``float()``), or ``None`` when one is not a bracketed list of
    ``n_values`` finite numbers (callers then parse row by row, which names the bad row)."""
    bodies = _list_bodies(texts)
    return _parse_float_rows(bodies, n_values, np.float64) if bodies else None


def _frame_list_csv(path: Path, list_column: str, prefix_columns: int | None = None):
    """Split a CSV with one quoted list per row into its parts, on the bytes (numpy finds the brackets).

    Returns ``(header, prefix, rows)``: header ``list[str]``; prefix a DataFrame (str) of the fields before
    the list column; rows the N list bodies ``b"a, b, ..."`` (no brackets). ``None`` unless each row holds
    exactly one ``"[...]"`` in column ``list_column`` (the ``prefix_columns``-th, if given), no other
    bracket, no quote before it, and nothing but the other fields after it; and for a file under
    ``FAST_CSV_MIN_BYTES``.
    """
    import pandas as pd  # heavy (~0.3 s): imported on the fast path only

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


# ----------------------------------------------------------------------------- split CSVs

def split_label_counts(data_dir, split: str = "train") -> dict[int, int]:
    """``{label: number of images}`` of ``{split}_embeddings.csv`` (labels only: the id lists are not parsed)."""
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
        raise CortexError(f"{path}: no rows (header only): the dataset's {split} split is empty or was cut short; "
                          f"regenerate the dataset ({generator_command(data_dir)} --overwrite) or pass the right "
                          f"--data_dir")
    return dict(sorted(counts.items()))


def read_split_ids(data_dir, split: str = "train", num_classes: int | None = None):
    """``(names, labels (N,) int64, ids (N, h*w) int64)`` of ``{split}_embeddings.csv`` in file order (h*w = 256
    for the paper's grid; another tokenizer's from ``dataset_info.json``, :func:`cortex.data.dataset_geometry`).

    One C parse on well-formed files; anything else goes through :func:`cortex.data.read_split` (the
    training reader), so every check -- header, field count, integer label within ``0..num_classes-1``,
    256 ids in 0..n_codes-1 -- and its message (file and line) are the training reader's.
    """
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
