"""Reading and checking TIS files and folders: one TIS CSV parsed once (:func:`read_tis_file`), a finished run
checked before anything is computed from it (:func:`check_tis_inputs`). The format is specified in
:mod:`cortex.attribution.store`."""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...data.list_csv import fast_list_csv, float_lists
from ...paths import LABEL_RE, label_files
from ...utils import CortexError, parse_float_list
from .layout import N_POS, TIS_CONFIG, TIS_HEADER, file_sha1, short_list

# ----------------------------------------------------------------------------- reading

def tis_row_length(path) -> int:
    """Scores per row of a TIS file: the first row's count (h*w of the dataset's token grid, 256 for the
    paper's 16x16); 256 for a file without rows. Every other row must match it (:func:`read_tis_file`)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)
        for row in reader:
            if len(row) == 3:
                return row[2].count(",") + 1
    return N_POS


def read_tis_file(path) -> tuple[list[str], list[int], np.ndarray]:
    """Read a TIS CSV once: filenames, labels and scores ``(N, h*w)`` float64 (no ``ast``); ``(N, 256)`` for
    the paper's grid. The row length is the first row's (:func:`tis_row_length`); a row of another length is
    a CortexError naming it.

    Linear in the rows: one C parse (``cortex.data.list_csv.fast_list_csv``), else the row-by-row reader below,
    which names a malformed line. A UTF-8 BOM is accepted; a NaN/Inf score or an image listed twice is a
    CortexError naming the file and line (:func:`check_tis_rows`).
    """
    path = Path(path)
    n_pos = tis_row_length(path)
    fast = fast_list_csv(path, TIS_HEADER, n_pos, np.float64)
    if fast is not None:
        check_tis_rows(path, fast[0], fast[2])
        return fast[0], fast[1].tolist(), fast[2]
    names, labels, rows, lines = [], [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != TIS_HEADER:
            raise CortexError(f"{path}: header must be 'filename,label,contribution', got {header}")
        for row in reader:
            if not row:
                continue
            lineno = reader.line_num  # the row's own (last) line: blank lines and the header counted
            if len(row) != 3:
                raise CortexError(f"{path}:{lineno}: expected 3 fields, got {len(row)}")
            names.append(row[0])
            labels.append(int(row[1]))
            rows.append(row[2])
            lines.append(lineno)
    scores = _parse_rows(rows, path, n_pos, lines, names)
    check_tis_rows(path, names, scores)
    return names, labels, scores


def _parse_rows(rows: list[str], path, n_pos: int = N_POS, lines: list[int] | None = None,
                names: list[str] | None = None) -> np.ndarray:
    """All contribution literals of a file in one C parse (``cortex.data.list_csv.float_lists``): ``(N, n_pos)``
    (n_pos = 256 for 16x16). lines / names: each row's line number and image, for the message naming a bad row."""
    if not rows:
        return np.zeros((0, n_pos))
    flat = float_lists(rows, n_pos)  # None: a malformed row, or a NaN/Inf score (check_tis_rows names it)
    if flat is not None:
        return flat
    # row by row, for a precise message: a row whose length differs from most rows' (the first row may be the
    # odd one, and must then be named, not the next one)
    sizes = [r.count(",") + 1 for r in rows]
    common = max(set(sizes), key=sizes.count) if len(rows) > 2 else n_pos
    parsed = []
    for i, r in enumerate(rows):
        where = f"{path}:{lines[i] if lines else i + 2}" + (f" (image {names[i]})" if names else "")
        v = parse_float_list(r, where=where)
        if v.shape != (common,):
            raise CortexError(f"{where}: {v.size} scores, expected {common} (as the file's other rows: one per "
                              f"token position)")
        parsed.append(v)
    if common != n_pos:
        raise CortexError(f"{path}: malformed contribution lists")
    return np.stack(parsed)  # (N, n_pos), with the non-finite scores check_tis_rows reports


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


# ----------------------------------------------------------------------------- checking a finished run

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


def _count_rows(path: Path) -> int:
    """Non-blank lines after the header (a TIS row holds no newline: the list literal is one field)."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line not in (b"\n", b"\r\n"))
    return max(n - 1, 0)


def check_tis_inputs(tis_dir, expected_labels, allow_partial: bool = False, *, count_rows: bool = True,
                     hint: str = "") -> TisRunInfo:
    """Check that a TIS folder holds one complete run before anything is computed from it.

    tis_dir: ``.../TIS_value_{split}``; expected_labels: ``{label: n_images}`` of the split
    (:func:`split_label_counts`) or an iterable of labels (then row counts are not checked).
    Checks: a ``label_{k}.csv`` for every expected label; none header-only; no unfinished
    ``label_{k}.csv.partial`` or temp file of an interrupted write; no file for a label the
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
        problems.append(f"{len(missing)} labels have no TIS file: {short_list(missing)}")
        bad.update(missing)
    partial = sorted(p.name for p in tis_dir.glob("label_*.csv.partial"))
    if partial:
        problems.append(f"{len(partial)} labels are unfinished ({short_list(partial)})")
        bad.update(int(LABEL_RE.match(n[: -len(".partial")]).group(1)) for n in partial
                   if LABEL_RE.match(n[: -len(".partial")]))
    temps = sorted(p.name for p in tis_dir.glob(".label_*.csv.*.tmp"))
    if temps:
        problems.append(f"temp files of an interrupted write: {short_list(temps)} (delete them)")
    extra = sorted(set(present) - set(expected))
    if extra:
        problems.append(f"{len(extra)} TIS files are for labels the dataset does not have: "
                        f"{short_list([present[k].name for k in extra])} (another dataset's run? delete them)")
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
        sha = file_sha1(cpath)
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
        problems.append(f"labels {short_list(foreign)} were written by another TIS run than {TIS_CONFIG}'s "
                        f"run_id {want_id} (other settings or checkpoint)")
    elif len(set(run_ids.values())) > 1:
        by = defaultdict(list)
        for label, rid in run_ids.items():
            by[rid].append(label)
        problems.append("the files come from different TIS runs: " +
                        "; ".join(f"run {rid}: labels {short_list(ls)}" for rid, ls in by.items()))
    labels = sorted(set(present) - bad)
    info = TisRunInfo(tis_dir, labels, {k: present[k] for k in labels}, expected, rows, config, sha, problems)
    if problems:
        report_problems(tis_dir, problems, len(labels), len(expected), allow_partial, hint)
    return info


def report_problems(tis_dir: Path, problems: list[str], n_ok: int, n_expected: int, allow_partial: bool,
                    hint: str) -> None:
    """Raise the CortexError listing every problem of a TIS run, or, with ``allow_partial``, warn."""
    what = "\n  - ".join(problems)
    if not allow_partial:
        raise CortexError(f"{tis_dir}: incomplete or inconsistent TIS run:\n  - {what}\nFinish the run with "
                          f"TIS_computation.py --resume (same flags){hint}, or pass --allow_partial to use only "
                          f"the {n_ok} complete labels on purpose.")
    print(f"warning: --allow_partial: {tis_dir} is incomplete; using {n_ok} of {n_expected} labels. "
          f"Skipped / found:\n  - {what}")


def _run_ids(tis_dir: Path, files: dict[int, Path]) -> dict[int, str]:
    """``{label: run_id}`` of the present label files, as :class:`LabelWriter` records them: ``runs.json``
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
