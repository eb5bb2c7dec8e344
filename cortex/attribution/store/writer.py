"""Writing TIS folders: claiming a folder for a run (``tis_config.json``, the writers' lock), locking, resuming and
writing labels (:class:`LabelWriter`). The format is specified in :mod:`cortex.attribution.store`."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np

from ...utils import (CortexError, atomic_write, blocking_lock, format_list, lock_fd, open_lock, parse_float_list,
                      try_lock, unlock)
from .layout import TIS_CONFIG, TIS_HEADER, _diff, lock_file, partial_file, read_sidecar, sidecar_file, tis_file

# ----------------------------------------------------------------------------- resuming: the rows already written

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
