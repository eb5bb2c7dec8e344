"""The TIS statistics files (SPEC §3): writing and reading the sectioned CSVs.

* ``TIS_statistics_train/label_{k}.csv`` -- a sectioned CSV: a row ``Total Images: N``; then for each
  n in 1, 5, 10, 20 a row ``Top n Tokens``, a row ``Token,Frequency,Files`` and up to 100 rows
  ``token,count,"f1; f2; ..."``;
* ``TIS_statistics_train/global_top_tokens_statistics.csv`` -- the authors' layout: a header
  ``Top N,Token,Frequency,Files``, then for each n a row ``Top n Tokens`` and its rows ``token,count,files``
  over all labels;
* ``TIS_statistics_train/tis_statistics_long.csv`` -- tidy ``label,top_n,token,count`` (the rows of
  the sectioned files) and ``global_top_tokens_long.csv`` -- tidy ``top_n,token,count``, for pandas.

Many files of one folder are written atomically together through :class:`StagedFiles`.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..utils import CortexError, atomic_write
from .ranking import MAX_ROWS

FILE_SEP = "; "


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
    check_token_num(path, len(toks), token_num, recorded_max_rows(Path(path).parent / "source.json"),
                    f"section 'Top {top_n} Tokens'", "TIS_analysis.py --max_rows")
    return toks[:token_num]


def recorded_max_rows(args_path) -> int:
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
