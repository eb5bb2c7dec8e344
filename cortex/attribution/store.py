"""The TIS store: the one owner of a TIS folder on disk -- writing, locking, resuming, checking and reading.

The TIS driver (:mod:`cortex.attribution.tis`) writes through :class:`LabelWriter` and the claim / check
functions below; the statistics, the significance tests and the provenance checks read and re-check through
:func:`read_tis_file` and :func:`check_tis_inputs`. This docstring is the format's specification.

Files of a TIS folder (``results/.../TIS_value_{split}/``, :meth:`cortex.paths.ExperimentPaths.tis_dir`):

* ``label_{k}.csv`` -- a finished label (complete: one row per image of the label, never a name twice).
* ``label_{k}.csv.partial`` -- an unfinished label: same header and rows, appended and flushed row by row;
  renamed to ``label_{k}.csv`` when the label's last image is scored.
* ``label_{k}.csv.run.json`` -- side-car of the label (final or partial): ``{"run_id": "<16 hex>",
  "config": {...}}``, the identity of the run that wrote its rows (same ``run_id`` and ``config`` as
  ``tis_config.json``). Written before the label's first row.
* ``label_{k}.csv.lock`` -- an empty lock file; a process writing label ``k`` holds ``fcntl.flock``
  (exclusive) on it. Left in place (deleting lock files is racy); harmless.
* ``tis_config.json`` -- ``{"run_id": ..., <every score-changing setting>}``, sorted keys: attribution,
  method (channel reduction), nsamples / stdev_spread / noise_scope / seed (stochastic scores),
  noise_device (``sample`` scope: CPU and CUDA generators differ), batch_size (``batch`` / ``authors``
  scopes), ig_steps, baseline (integrated gradients / occlusion), fast (``--fast`` settings or false),
  order (``authors``: the split's order), format (this file's version) and, from ``run_tis``: checkpoint
  (path, sha256 of the state-dict file), model (experiment, model_id, num_classes, width, depth) and data
  (split, sha256 of the split CSV, sha256 of ``codebook.npy`` or null, layout). ``run_id`` is the first
  16 hex digits of the sha256 of the canonical JSON of the other keys. Written atomically under
  ``tis_config.json.lock``; a shard finding different content refuses to start.
* ``runs.json`` -- ``{label: run_id}`` of the finished labels (updated under ``runs.json.lock``).

Integrity rules:

* ``resume=True`` skips finished labels (a finished file holding a name twice is rewritten without the
  repeats; one missing images is reopened as partial) and the rows already in a partial file (a torn last
  line and repeated names are dropped), so a resumed run ends with exactly one row per image;
* any label file (final or partial) written under another ``run_id`` (other settings, another checkpoint
  or dataset) is refused, with or without ``resume``, naming what differs; ``overwrite=True`` deletes
  such files of this shard's labels and starts them over;
* two processes never write one label: the second finds its lock held and skips that label (it says so,
  and the summary lists it under ``"busy"``); shards (``sorted labels[shard::num_shards]``) run side by side;
* a non-finite score is a CortexError naming the image.
* ``tis_writers.lock`` -- a shared ``flock`` held by every writer for its run; an ``--overwrite`` run that
  replaces another run's ``tis_config.json`` needs it exclusively (:func:`hold_writers`).
* ``.label_{k}.csv.*.tmp`` -- the temp file of an atomic write (``cortex.utils.atomic_write``: temp file in
  the same folder, then ``os.replace``); one left behind means a write was interrupted.

Rows: ``filename,label,"[s1, s2, ...]"`` -- one row per image, h*w scores (256 for the paper's 16x16 grid)
written by ``cortex.utils.format_list``; the row length is the first row's (:func:`tis_row_length`).

Reading rules (:func:`read_tis_file`, :func:`check_tis_inputs`): a finished run has a ``label_{k}.csv`` for
every label of the split with one row per image, no ``.partial`` or temp file, no file for a label the dataset
lacks, a ``tis_config.json``, and one ``run_id`` over ``runs.json`` / the side-cars; a NaN/Inf score or an image
listed twice is an error naming the file and line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.list_csv import fast_list_csv
from ..paths import LABEL_RE, label_files
from ..utils import (CortexError, atomic_write, blocking_lock, format_list, lock_fd, open_lock, parse_float_list,
                     try_lock, unlock)

TIS_HEADER = ["filename", "label", "contribution"]
N_POS = 256  # scores per row for the paper's 16x16 grid; another tokenizer's files hold h*w (tis_row_length)
FORMAT_VERSION = 2
TIS_CONFIG = "tis_config.json"


# ----------------------------------------------------------------------------- names, side-cars, run ids

def run_id_of(key: dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of a run key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tis_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv"


def partial_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.partial"


def sidecar_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.run.json"


def lock_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.lock"


def read_sidecar(out_dir, label: int) -> dict | None:
    p = sidecar_file(out_dir, label)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _diff(old: dict | None, new: dict) -> dict:
    """``{key: (stored, requested)}`` of the keys whose values differ."""
    old = old or {}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k != "run_id" and old.get(k) != new.get(k)}


def final_names(path) -> list[str]:
    """Filenames of a TIS CSV's rows in order (first field only; the scores are not parsed)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [row[0] for row in reader if row]


def _dedupe_file(path, names: list[str]) -> list[str]:
    """Rewrite a TIS CSV keeping the first row of each filename; returns the distinct names."""
    if len(set(names)) == len(names):
        return names
    seen, keep = set(), []
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    keep.append(lines[0])
    for line in lines[1:]:
        name = next(csv.reader([line]), [""])[0]
        if name and name not in seen:
            seen.add(name)
            keep.append(line)
    print(f"note: {path} held {len(names) - len(seen)} repeated rows (two writers?); kept the first of each")
    with atomic_write(path) as f:
        f.write("".join(keep))
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- reading

def read_partial(path) -> list[str]:
    """Filenames of the complete rows of a partial TIS file; rewrites it without a torn last line and
    without repeated names (the first row of a name is kept)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    good, names, seen = [], [], set()
    n_pos = None  # scores per row: the first complete row's count (h*w of the dataset's grid)
    for i, line in enumerate(lines):
        if i == 0:
            if not line.endswith("\n"):
                break  # torn header: treat as empty
            if next(csv.reader([line]), []) != TIS_HEADER:
                raise CortexError(f"{path}: not a TIS partial file (header {line.strip()!r}); delete it")
            good.append(line)
            continue
        row = next(csv.reader([line]), [])
        ok = line.endswith("\n") and len(row) == 3
        if ok:
            try:
                n = parse_float_list(row[2], where=str(path)).size
                n_pos = n if n_pos is None else n_pos
                ok = n == n_pos
            except CortexError:
                ok = False
        if not ok:
            if i != len(lines) - 1:
                raise CortexError(f"{path}:{i + 1}: malformed row in the middle of a partial TIS file; delete it "
                                  f"and rerun this label")
            break  # torn last line of a killed run
        if row[0] in seen:
            continue  # a repeated name (two writers of an old version): keep the first row
        seen.add(row[0])
        good.append(line)
        names.append(row[0])
    if "".join(good) != text:
        with atomic_write(path) as f:
            f.write("".join(good))
    return names


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
    """All contribution literals of a file in one numpy call: ``(N, n_pos)`` (n_pos = 256 for 16x16).
    lines / names: each row's line number and image, for the message naming a bad row."""
    if not rows:
        return np.zeros((0, n_pos))
    body = ",".join(r.strip()[1:-1] for r in rows)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = np.fromstring(body, dtype=np.float64, sep=",")  # text mode: one C parse per file
    except ValueError:
        flat = None
    if flat is None or flat.size != len(rows) * n_pos or not all(r.strip()[:1] == "[" for r in rows):
        # find the culprit for a precise message: a row whose length differs from most rows' (the first row
        # may be the odd one, and must then be named, not the next one)
        sizes = [r.count(",") + 1 for r in rows]
        common = max(set(sizes), key=sizes.count) if len(rows) > 2 else n_pos
        for i, r in enumerate(rows):
            where = f"{path}:{lines[i] if lines else i + 2}" + (f" (image {names[i]})" if names else "")
            v = parse_float_list(r, where=where)
            if v.shape != (common,):
                raise CortexError(f"{where}: {v.size} scores, expected {common} (as the file's other rows: one per "
                                  f"token position)")
        raise CortexError(f"{path}: malformed contribution lists")
    return flat.reshape(len(rows), n_pos)


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


# ----------------------------------------------------------------------------- writing (locks, resume, run identity)

class LabelWriter:
    """The labels this process writes: their locks, resume state, side-cars, rows and finishing.

    ``names_of[l]``: the filenames of label ``l`` in dataset order. ``open(l)`` locks the label and returns
    the set of names still to score (empty: nothing to do; None: another process holds the label).
    """

    def __init__(self, out_dir: Path, key: dict, run_id: str, resume: bool, names_of: dict[int, list[str]],
                 writers_fd: int | None = None):
        self.out, self.key, self.run_id, self.resume, self.names_of = out_dir, key, run_id, resume, names_of
        self.writers_fd = writers_fd  # the folder's shared writer lock (hold_writers), released by close()
        self.handles: dict[int, object] = {}
        self.locks: dict[int, int] = {}
        self.todo: dict[int, set[str]] = {}
        self.busy: list[int] = []
        self.skipped = self.scored = 0

    def open(self, l: int) -> set[str] | None:
        fd = try_lock(lock_file(self.out, l))
        if fd is None:
            print(f"label {l}: another process is writing {tis_file(self.out, l)} (it holds the lock "
                  f"{lock_file(self.out, l).name}); skipping this label. When that process ends, rerun with "
                  f"--resume to check that every label is complete.", flush=True)
            self.busy.append(l)
            return None
        self.locks[l] = fd
        try:
            return self._load(l)
        except BaseException:
            self._release(l)
            raise

    def _load(self, l: int) -> set[str]:
        want = self.names_of[l]
        final, part = tis_file(self.out, l), partial_file(self.out, l)
        side = read_sidecar(self.out, l)
        if (final.exists() or part.exists()) and (side or {}).get("run_id") != self.run_id:
            raise CortexError(f"{final}: written by another TIS run while this one started (differs: "
                              f"{_diff((side or {}).get('config'), self.key)}); use a new results directory "
                              f"or --overwrite")
        if self.resume and final.exists():
            names = set(_dedupe_file(final, final_names(final)))
            missing = [n for n in want if n not in names]
            if not missing:
                self.skipped += len(want)
                self.todo[l] = set()
                self._record_run(l)
                self._release(l)
                return set()
            print(f"note: {final} lacks {len(missing)} of the label's {len(want)} images; reopened to score them")
            os.replace(final, part)
        if part.exists():
            if self.resume:
                done = set(read_partial(part))
            else:
                part.unlink()
                done = set()
        else:
            done = set()
        with atomic_write(sidecar_file(self.out, l)) as f:
            json.dump({"run_id": self.run_id, "config": self.key}, f, indent=2, sort_keys=True)
        rest = [n for n in want if n not in done]
        self.skipped += len(want) - len(rest)
        self.todo[l] = set(rest)
        if not rest:
            self.finish(l)
        return set(rest)

    def write(self, l: int, name: str, scores: np.ndarray) -> None:
        """Append one row (a name already written is ignored) and finish the label after its last image."""
        todo = self.todo.get(l)
        if not todo or name not in todo:
            return
        f = self.handles.get(l)
        if f is None:
            part = partial_file(self.out, l)
            new = not part.exists() or part.stat().st_size == 0
            f = self.handles[l] = open(part, "a", newline="", encoding="utf-8")
            if new:
                csv.writer(f).writerow(TIS_HEADER)
        csv.writer(f).writerow([name, l, format_list(scores)])
        f.flush()
        self.scored += 1
        todo.discard(name)
        if not todo:
            self.finish(l)

    def finish(self, l: int) -> None:
        f = self.handles.pop(l, None)
        if f is not None:
            f.close()
        part, final = partial_file(self.out, l), tis_file(self.out, l)
        if part.exists():
            with open(part, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(part, final)
        self._record_run(l)
        self._release(l)

    def _record_run(self, l: int) -> None:
        path = self.out / "runs.json"
        with blocking_lock(self.out / "runs.json.lock"):
            runs = json.loads(path.read_text()) if path.exists() else {}
            if runs.get(str(l)) != self.run_id:
                runs[str(l)] = self.run_id
                with atomic_write(path) as f:
                    json.dump(dict(sorted(runs.items(), key=lambda kv: int(kv[0]))), f, indent=1)

    def _release(self, l: int) -> None:
        unlock(self.locks.pop(l, None))

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()
        for l in list(self.locks):
            self._release(l)
        unlock(self.writers_fd)
        self.writers_fd = None


def _baseline_hint(diff: dict) -> str:
    """The explanation added to a refusal whose differing keys include the baseline."""
    return ("the baseline changed: codebook.npy was added, removed or changed since the stored labels were "
            "scored. " if "baseline" in diff else "")


def claim_config(out_dir: Path, key: dict, run_id: str, overwrite: bool, write: bool = True) -> None:
    """Write ``tis_config.json`` (atomically, under its lock) or check that it holds this run's key
    (``write=False``: only refuse a different one, write nothing)."""
    path = out_dir / TIS_CONFIG
    with blocking_lock(out_dir / "tis_config.json.lock"):
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {}
            if old.get("run_id") == run_id:
                return
            if not overwrite:
                diff = _diff(old, key)
                hint = _baseline_hint(diff)
                raise CortexError(f"{path}: this folder holds a TIS run with other settings (differs, stored -> "
                                  f"requested: {diff}). {hint}Use a new results directory (--results_dir), or "
                                  f"pass --overwrite to start this folder over with the new settings.")
            print(f"--overwrite: {path} replaced (differs: {_diff(old, key)})")
        if not write:
            return
        with atomic_write(path) as f:
            json.dump({**key, "run_id": run_id}, f, indent=2, sort_keys=True)


def hold_writers(out_dir: Path, key: dict, run_id: str, overwrite: bool) -> int:
    """The fd of a shared ``flock`` on ``<out_dir>/tis_writers.lock``, held by every TIS writer for its run.

    An ``--overwrite`` run that replaces another run's ``tis_config.json`` must find no other writer (it would
    delete their labels, or they would write theirs beside its own): refused with a CortexError while any other
    process holds the lock; else it writes its ``tis_config.json`` here. Plain runs and shards of one run share
    the lock (their labels are locked one by one, as before). Every writer takes it under
    ``tis_config.json.lock``, so testing for others and then sharing is race-free."""
    path = out_dir / TIS_CONFIG
    with blocking_lock(out_dir / "tis_config.json.lock"):
        try:
            old = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            old = {}
        fd = open_lock(out_dir / "tis_writers.lock")
        try:
            if overwrite and old is not None and old.get("run_id") != run_id:
                if not lock_fd(fd):
                    raise CortexError(f"{out_dir}: another TIS_computation.py is writing into this folder now "
                                      f"(run {old.get('run_id', 'unknown')}); --overwrite would replace its settings "
                                      f"and delete its labels. Wait for it to end, or choose another --results_dir")
                print(f"--overwrite: {path} replaced (differs: {_diff(old, key)})")
                with atomic_write(path) as f:
                    json.dump({**key, "run_id": run_id}, f, indent=2, sort_keys=True)
            lock_fd(fd, shared=True, block=True)  # EX is only ever held here, under tis_config.json.lock
        except BaseException:
            os.close(fd)
            raise
    return fd


def _delete_label(out_dir: Path, l: int) -> bool:
    """Delete label ``l``'s files (final, partial, side-car) under its lock; False when another process holds it."""
    fd = try_lock(lock_file(out_dir, l))
    if fd is None:
        return False
    for p in (tis_file(out_dir, l), partial_file(out_dir, l), sidecar_file(out_dir, l)):
        p.unlink(missing_ok=True)
    unlock(fd)
    return True


def check_label_files(out_dir: Path, labels: list[int], key: dict, run_id: str, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, delete) this shard's label files written under another run id."""
    bad, hint = [], ""
    for l in labels:
        final, part = tis_file(out_dir, l), partial_file(out_dir, l)
        if not (final.exists() or part.exists()):
            continue
        side = read_sidecar(out_dir, l)
        if side is not None and side.get("run_id") == run_id:
            continue
        if overwrite:
            _delete_label(out_dir, l)  # a held label is refused later, when this run reaches it
            continue
        diff = _diff(side.get("config"), key) if side else {}
        hint = hint or _baseline_hint(diff)
        what = ("no run identity (written by an older version or another tool)" if not side
                else f"differs, stored -> requested: {diff}")
        bad.append(f"{(final if final.exists() else part).name}: {what}")
    if bad:
        raise CortexError(f"{out_dir}: {len(bad)} label files were not written by a run with these settings:\n  "
                          + "\n  ".join(bad[:10]) + ("\n  ..." if len(bad) > 10 else "") + "\n" + hint +
                          "Use a new results directory (--results_dir), or pass --overwrite to delete these "
                          "files and score their labels again.")


def remove_foreign_labels(out_dir: Path, labels: set[int]) -> list[int]:
    """``--overwrite``: delete the files of labels the dataset does not have (an earlier run on another world).

    They belong to no shard, so any shard may remove them; each goes under its label's lock. Their entries in
    ``runs.json`` go too. Returns the labels removed."""
    found = set()
    for p in out_dir.glob("label_*.csv*"):
        m = re.match(r"^label_(\d+)\.csv(\.partial|\.run\.json)?$", p.name)
        if m and int(m.group(1)) not in labels:
            found.add(int(m.group(1)))
    # a label another process writes is left (TIS_analysis.py will name it)
    removed = [l for l in sorted(found) if _delete_label(out_dir, l)]
    runs = out_dir / "runs.json"
    if removed and runs.exists():
        with blocking_lock(out_dir / "runs.json.lock"):
            kept = {k: v for k, v in json.loads(runs.read_text()).items() if int(k) not in set(removed)}
            with atomic_write(runs) as f:
                json.dump(kept, f, indent=1)
    if removed:
        print(f"--overwrite: removed the files of labels the dataset does not have: {removed}")
    return removed



def open_run(out_dir: Path, key: dict, run_id: str, labels: list[int], dataset_labels: set[int],
             overwrite: bool) -> int:
    """Claim a TIS folder for the run ``key`` / ``run_id`` before anything is scored; returns the fd of the shared
    writer lock (:func:`hold_writers`; :class:`LabelWriter` releases it). Without ``overwrite``, another
    ``tis_config.json`` or label files of ``labels`` written by another run are refused before anything is written;
    with it, those files and the files of labels outside ``dataset_labels`` are deleted."""
    writers = hold_writers(out_dir, key, run_id, overwrite)
    try:
        if not overwrite:  # refuse before anything is written: another tis_config.json first, then label files
            claim_config(out_dir, key, run_id, overwrite=False, write=False)
            check_label_files(out_dir, labels, key, run_id, overwrite=False)
        claim_config(out_dir, key, run_id, overwrite)
        if overwrite:
            check_label_files(out_dir, labels, key, run_id, overwrite=True)
            remove_foreign_labels(out_dir, dataset_labels)
    except BaseException:
        unlock(writers)
        raise
    return writers

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


def file_sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


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


def short_list(items, n: int = 10) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a (large) TIS file: size + SHA-1 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    return h.hexdigest()
