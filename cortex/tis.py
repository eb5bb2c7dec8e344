"""Token Importance Score computation: the driver behind both folders' ``TIS_computation.py``.

``compute_tis`` scores every image of a dataset with one attribution (``cortex.attribution``) and
writes one CSV per label, ``label_{k}.csv`` with header ``filename,label,contribution`` (SPEC §3).

Files of a TIS folder (``results/.../TIS_value_{split}/``), the format other steps may rely on:

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

Noise: ``noise_scope="sample"`` (default) draws each image's noise from a generator seeded by
``(seed, filename)``, so scores depend neither on ``batch_size`` nor on sharding or resuming;
``"batch"`` takes the scale over the batch (batches are consecutive images of one label);
``"authors"`` reproduces the authors' script exactly: batches of ``batch_size`` consecutive rows of the
split in its CSV order (across labels), ``torch.manual_seed(seed)`` once, then per batch per draw one
``torch.normal`` over the batch from the global CPU generator (``attribution.authors_noise``), gradients
summed in float64 and written as float64. Resume and shards replay the draws of the batches they skip.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .attribution import (ATTRIBUTIONS, NOISE_SCOPES, authors_noise, available_memory_bytes, copies_for_budget,
                          get_attribution, image_seed, memory_per_copy, prepare_fast, reduce_channels,
                          smoothgrad_from_noise, standard_noise, token_scores, top_overlap)
from .cli import make_parser, nonneg_float, nonneg_int, positive_float, positive_int
from .provenance import file_sha256  # noqa: F401  (cortex.tis.file_sha256: one hashing function)
from .utils import (CortexError, atomic_write, blocking_lock, format_list, lock_fd, open_lock, parse_float_list,
                    try_lock, unlock)

TIS_HEADER = ["filename", "label", "contribution"]
N_POS = 256  # scores per row for the paper's 16x16 grid; another tokenizer's files hold h*w (tis_row_length)
FORMAT_VERSION = 2


# ----------------------------------------------------------------------------- configuration

@dataclass
class TISConfig:
    """The TIS settings: everything that changes the scores is in ``score_key`` (-> ``tis_config.json``)."""

    attribution: str = "smoothgrad"
    method: str | None = None          # channel reduction; None = the attribution's natural one
    nsamples: int = 20
    stdev_spread: float = 0.2
    noise_scope: str = "sample"
    seed: int = 0
    ig_steps: int = 32
    fast: bool = False                 # BN folding + channels-last (+ bf16 for allowed nets on CUDA)
    max_copies_per_pass: int | None = None  # memory knob (None: from max_memory_gb; 0: all); not in the key
    max_memory_gb: float | None = None      # memory budget (None: 50% of the free memory); not in the key

    def __post_init__(self):
        get_attribution(self.attribution)
        if self.method in ("ave", "avg"):
            self.method = "mean"
        if self.noise_scope not in NOISE_SCOPES:
            raise CortexError(f"--noise_scope {self.noise_scope!r}: use one of {', '.join(NOISE_SCOPES)}")
        if self.noise_scope == "authors" and self.attribution != "smoothgrad":
            raise CortexError(f"--noise_scope authors reproduces the authors' SmoothGrad; it cannot be used with "
                              f"--attribution {self.attribution}")
        if self.nsamples < 1:
            raise CortexError(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise CortexError(f"--max_memory_gb must be > 0, got {self.max_memory_gb}")

    @property
    def reduction(self) -> str:
        return self.method or ATTRIBUTIONS[self.attribution].reduction

    def score_key(self) -> dict:
        """The settings that change the scores (the memory knobs are left out)."""
        d = asdict(self)
        d.pop("max_copies_per_pass")
        d.pop("max_memory_gb")
        d["method"] = self.reduction
        a = ATTRIBUTIONS[self.attribution]
        if not a.stochastic:
            for k in ("nsamples", "stdev_spread", "noise_scope", "seed"):
                d.pop(k)
        if self.attribution != "integrated_gradients":
            d.pop("ig_steps")
        return d


def run_id_of(key: dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of a run key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_labels(labels, shard: int = 0, num_shards: int = 1) -> list[int]:
    """This shard's labels: ``sorted(set(labels))[shard::num_shards]`` (disjoint, covering)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise CortexError(f"--shard {shard} --num_shards {num_shards}: need 0 <= shard < num_shards")
    return sorted(set(int(l) for l in labels))[shard::num_shards]


# ----------------------------------------------------------------------------- near-chance IEMs

def warn_if_near_chance(accuracy_percent: float | None, num_classes: int, source: str, factor: float = 1.5,
                        what: str = "explanations") -> bool:
    """Warn loudly (stderr banner + ``warnings.warn``) when an accuracy is within ``factor`` x chance.

    accuracy_percent: accuracy in percent (0-100; ``None``/NaN: nothing to check); num_classes: the IEM's
    classes (chance = 100 / num_classes percent); source: where the number comes from (shown). Returns
    True when it warned. Reusable by any script that explains or uses an IEM (TIS, bias detection, eval).
    """
    if not _near_chance(accuracy_percent, num_classes, factor):
        return False
    _near_chance_banner([(source, accuracy_percent)], num_classes, what)
    return True


def _near_chance(accuracy_percent, num_classes: int, factor: float) -> bool:
    if accuracy_percent is None or not np.isfinite(accuracy_percent) or num_classes < 2:
        return False
    return accuracy_percent <= factor * 100.0 / num_classes


def _near_chance_banner(found: list, num_classes: int, what: str) -> None:
    """One stderr banner for every (source, accuracy) near chance, and one ``warnings.warn`` with the same text
    (for callers that catch warnings; ``cortex.cli.quiet_third_party`` keeps it from being printed twice)."""
    accs = "; ".join(f"{acc:.2f}% ({src})" for src, acc in found)
    msg = (f"the IEM's accuracy is near chance: {accs} vs chance {100.0 / num_classes:.2f}% "
           f"({num_classes} classes). Its {what} are meaningless: train it longer / on more data first.")
    bar = "!" * 100
    print(f"\n{bar}\nWARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(msg, stacklevel=3)


def iem_accuracies(checkpoint, testing_results=None) -> dict[str, float]:
    """Known accuracies (percent) of an IEM: ``{source: value}``.

    From ``testing_results`` (``testing_results.csv``: column ``Top-1 Accuracy`` or ``Accuracy``) and from the
    ``config.json`` beside ``checkpoint`` (keys ``val_acc`` / ``best_val_acc`` / ``val_accuracy`` /
    ``validation_accuracy``; a value <= 1 is read as a fraction). Unreadable files are skipped.
    """
    out = {}
    if testing_results is not None and Path(testing_results).exists():
        try:
            with open(testing_results, newline="", encoding="utf-8-sig") as f:
                row = next(csv.DictReader(f), None) or {}
            for col in ("Top-1 Accuracy", "Accuracy"):
                if row.get(col) not in (None, ""):
                    out[f"{testing_results} ({col})"] = float(row[col])
                    break
        except (OSError, ValueError):
            pass
    cfg = Path(checkpoint).parent / "config.json"
    if cfg.exists():
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, ValueError):
            meta = {}
        for k in ("val_acc", "best_val_acc", "val_accuracy", "validation_accuracy"):
            if isinstance(meta.get(k), (int, float)):
                v = float(meta[k])
                out[f"{cfg} ({k})"] = v * 100 if v <= 1 else v
                break
    return out


def check_iem_not_near_chance(checkpoint, testing_results, num_classes: int, factor: float = 1.5,
                              what: str = "explanations") -> list[str]:
    """One near-chance warning (``warn_if_near_chance``) naming every accuracy ``iem_accuracies`` finds near
    chance; returns those sources."""
    found = [(src, acc) for src, acc in iem_accuracies(checkpoint, testing_results).items()
             if _near_chance(acc, num_classes, factor)]
    if found:
        _near_chance_banner(found, num_classes, what)
    return [src for src, _ in found]


# ----------------------------------------------------------------------------- files and locks

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


# ----------------------------------------------------------------------------- readers

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

    Linear in the rows: one C parse (``cortex.stats.fast_list_csv``), else the row-by-row reader below,
    which names a malformed line. A UTF-8 BOM is accepted; a NaN/Inf score or an image listed twice is a
    CortexError naming the file and line (``cortex.stats.check_tis_rows``).
    """
    from .stats import check_tis_rows, fast_list_csv

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


# ----------------------------------------------------------------------------- driver

def _collate(batch):
    embs, labels, names = zip(*batch)
    return torch.stack([torch.as_tensor(e) for e in embs]), torch.as_tensor(labels, dtype=torch.long), list(names)


class _LabelWriter:
    """The labels this process writes: their locks, resume state, side-cars, rows and finishing.

    ``names_of[l]``: the filenames of label ``l`` in dataset order. ``open(l)`` locks the label and returns
    the set of names still to score (empty: nothing to do; None: another process holds the label).
    """

    def __init__(self, out_dir: Path, key: dict, run_id: str, resume: bool, names_of: dict[int, list[str]],
                 writers_fd: int | None = None):
        self.out, self.key, self.run_id, self.resume, self.names_of = out_dir, key, run_id, resume, names_of
        self.writers_fd = writers_fd  # the folder's shared writer lock (_hold_writers), released by close()
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


def _claim_config(out_dir: Path, key: dict, run_id: str, overwrite: bool, write: bool = True) -> None:
    """Write ``tis_config.json`` (atomically, under its lock) or check that it holds this run's key
    (``write=False``: only refuse a different one, write nothing)."""
    path = out_dir / "tis_config.json"
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


def _hold_writers(out_dir: Path, key: dict, run_id: str, overwrite: bool) -> int:
    """The fd of a shared ``flock`` on ``<out_dir>/tis_writers.lock``, held by every TIS writer for its run.

    An ``--overwrite`` run that replaces another run's ``tis_config.json`` must find no other writer (it would
    delete their labels, or they would write theirs beside its own): refused with a CortexError while any other
    process holds the lock; else it writes its ``tis_config.json`` here. Plain runs and shards of one run share
    the lock (their labels are locked one by one, as before). Every writer takes it under
    ``tis_config.json.lock``, so testing for others and then sharing is race-free."""
    path = out_dir / "tis_config.json"
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


def _check_label_files(out_dir: Path, labels: list[int], key: dict, run_id: str, overwrite: bool) -> None:
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


def _remove_foreign_labels(out_dir: Path, labels: set[int]) -> list[int]:
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


def _resolve_copies(config: TISConfig, model, device, shape=(256, 16, 16)) -> int | None:
    """Copies per forward+backward pass: ``max_copies_per_pass`` if given (0: all), else from the budget.
    shape: one embedding (D, h, w), the paper's (256, 16, 16) by default."""
    if config.max_copies_per_pass is not None:
        return config.max_copies_per_pass or None
    free, where = available_memory_bytes(device)
    budget = config.max_memory_gb * 2 ** 30 if config.max_memory_gb else 0.5 * free
    per = memory_per_copy(model, torch.zeros(1, *shape, device=device))
    copies = copies_for_budget(budget, per)
    src = f"--max_memory_gb {config.max_memory_gb}" if config.max_memory_gb else f"50% of {free / 2**30:.1f} GiB ({where})"
    print(f"memory: budget {budget / 2**30:.2f} GiB ({src}), {per / 2**20:.1f} MiB per copy (measured) -> "
          f"{copies} copies per forward+backward pass")
    return copies


def compute_tis(model: torch.nn.Module, dataset, out_dir, config: TISConfig | None = None, *,
                batch_size: int = 25, device="cpu", codebook=None, resume: bool = False, overwrite: bool = False,
                shard: int = 0, num_shards: int = 1, num_workers: int = 0, progress: bool = True,
                run_info: dict | None = None, net: tuple[str, int] | None = None) -> dict:
    """Score every image of ``dataset`` (this shard's labels) and write ``out_dir/label_{k}.csv``.

    model: IEM taking ``(B, 256, 16, 16)``; dataset: items ``(embedding (256,16,16), label, filename)``
    with a ``labels`` list (``cortex.data.formats.EmbeddingDataset``; items may carry ``(256,)`` token ids instead,
    which its ``lookup`` turns into embeddings on ``device``); codebook ``(n_codes, 256)`` gives the
    baseline of integrated gradients / occlusion (mean codebook vector; zeros when None). run_info: extra
    identity of the run for ``tis_config.json`` (checkpoint hash, model, data; see the module docstring);
    net: ``(experiment, model_id)`` for ``--fast``'s bf16 allow-list. ``overwrite``: delete label files of
    another run instead of refusing. See the module docstring for the files and the integrity rules.
    Returns ``{"labels", "scored", "skipped", "files", "busy", "run_id", "copies_per_pass", "fast_agreement"}``.
    """
    from tqdm import tqdm

    config = config or TISConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    attr = ATTRIBUTIONS[config.attribution]
    authors = config.noise_scope == "authors"

    exact = model.to(device).eval()
    fast_info = False
    run_model = exact
    if config.fast:
        run_model, fast_info = prepare_fast(exact, device, net)
        print(f"--fast: {fast_info['bn_folds']} BatchNorms folded, channels-last, bf16 autocast "
              f"{'on' if fast_info['bf16'] else 'off'}")

    key = {"format": FORMAT_VERSION, **config.score_key(), "fast": fast_info, **(run_info or {})}
    if attr.uses_baseline:  # the baseline changes the scores: part of the config
        key["baseline"] = "zeros" if codebook is None else "codebook mean, sha1 " + hashlib.sha1(
            np.ascontiguousarray(codebook, dtype=np.float32).tobytes()).hexdigest()[:16]
    if attr.stochastic and config.noise_scope == "sample":
        key["noise_device"] = device.type
    if attr.stochastic and config.noise_scope in ("batch", "authors"):
        key["batch_size"] = int(batch_size)
    if authors:
        key["order"] = "split CSV order, batches across labels"
    run_id = run_id_of(key)
    labels_of = [int(l) for l in dataset.labels]
    mine = shard_labels(labels_of, shard, num_shards)
    copies = _resolve_copies(config, run_model, device, getattr(dataset, "emb_shape", (256, 16, 16)))
    cb = None if codebook is None else torch.as_tensor(np.asarray(codebook), dtype=torch.float32, device=device)
    writers = _hold_writers(out_dir, key, run_id, overwrite)  # released by writer.close()
    try:
        if not overwrite:  # refuse before anything is written: another tis_config.json first, then label files
            _claim_config(out_dir, key, run_id, overwrite=False, write=False)
            _check_label_files(out_dir, mine, key, run_id, overwrite=False)
        _claim_config(out_dir, key, run_id, overwrite)
        if overwrite:
            _check_label_files(out_dir, mine, key, run_id, overwrite=True)
            _remove_foreign_labels(out_dir, set(labels_of))
    except BaseException:
        unlock(writers)
        raise
    keep = set(mine)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, l in enumerate(labels_of):
        if l in keep:
            by_label[l].append(i)

    def name_of(i):
        return dataset.records[i].filename if hasattr(dataset, "records") else dataset[i][2]

    writer = _LabelWriter(out_dir, key, run_id, resume, {l: [name_of(i) for i in by_label[l]] for l in mine},
                          writers_fd=writers)
    workspace: dict = {}  # buffers reused from batch to batch (smoothgrad's copy buffer)
    opts = dict(nsamples=config.nsamples, stdev_spread=config.stdev_spread, noise_scope=config.noise_scope,
                codebook=cb, n_steps=config.ig_steps, max_copies_per_pass=copies, workspace=workspace)
    lookup = getattr(dataset, "lookup", None)
    agreement = {}

    def to_device(t: torch.Tensor) -> torch.Tensor:
        # pinned + non_blocking: a plain host->GPU copy would wait for the previous batch's queued work
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

    def embed(emb):
        emb = to_device(emb)
        return lookup(emb) if lookup is not None else emb  # ids (B, 256) -> (B, 256, 16, 16) on the device

    def score(m, emb, lab, noise) -> torch.Tensor:  # (B, 256)
        if authors:
            g = smoothgrad_from_noise(m, emb, lab, noise, copies, out_dtype=torch.float64, workspace=workspace)
            return reduce_channels(g, config.reduction)
        return token_scores(config.attribution, m, emb, lab, method=config.reduction, noise=noise, **opts)

    # One batch in flight: its scores are copied to the host asynchronously and its rows written only after
    # the next batch has been queued, so that on a GPU the CSV writing (and data loading) of one batch overlaps
    # the forward+backward of the next. Same rows, same order, same bytes; on an error the computed batch is
    # still written (see the except clause below).
    pending: list[tuple] = []

    def score_and_write(emb, lab, labs, names, noise, rows) -> None:
        """Queue a batch's scores; write the previous batch's rows. labs: the labels as a host list."""
        s = score(run_model, emb, lab, noise)
        if config.fast and not agreement:
            ref = score(exact, emb, lab, noise)
            k = min(20, ref.shape[1])
            agreement.update(max_abs_diff=(s.double() - ref.double()).abs().max().item(),
                             max_abs_score=ref.abs().max().item(), top20_overlap=top_overlap(s.float(), ref.float(), k))
            print(f"--fast vs exact on the first batch: max |diff| {agreement['max_abs_diff']:.3g} (max |score| "
                  f"{agreement['max_abs_score']:.3g}), top-{k} position overlap {agreement['top20_overlap']:.4f}")
        s, ready = s.detach(), None
        if s.device.type == "cuda":
            host = torch.empty(s.shape, dtype=s.dtype, pin_memory=True)
            host.copy_(s, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            s = host
        write_pending()
        pending.append((s, ready, labs, names, rows))

    def write_pending() -> None:
        """Write the rows of the batch in flight (waiting for its scores to reach the host)."""
        while pending:
            s, ready, labs, names, rows = pending.pop(0)
            if ready is not None:
                ready.synchronize()
            s = s.cpu()
            s = (s.double() if authors else s.float()).numpy()  # (B, 256)
            for j in rows:
                if not np.isfinite(s[j]).all():
                    raise CortexError(f"non-finite TIS for image {names[j]} (label {labs[j]}, file "
                                      f"{tis_file(out_dir, labs[j])}): the IEM or the embedding {names[j]} produces "
                                      f"NaN/Inf gradients; check the checkpoint and this embedding")
                writer.write(labs[j], names[j], s[j])

    def loader_of(ds):
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)

    desc = f"TIS {config.attribution} shard {shard}/{num_shards}"
    try:
        if authors:
            # the authors' loop: every batch of the split in order, noise drawn for each (kept in step)
            opened: dict[int, set[str] | None] = {}
            it = iter(loader_of(dataset))  # created before seeding: the iterator itself draws from the global RNG
            torch.manual_seed(config.seed)
            for emb, lab, names in tqdm(it, total=len(it), desc=desc, unit="batch", disable=not progress):
                labs = lab.tolist()
                emb, lab = embed(emb), to_device(lab)
                noise = authors_noise(emb, config.nsamples, config.stdev_spread)  # (S, B, 256, 16, 16)
                rows = []
                for j, (name, l) in enumerate(zip(names, labs)):
                    if l in keep:
                        if l not in opened:
                            opened[l] = writer.open(l)
                        if opened[l] and name in opened[l]:
                            rows.append(j)
                if rows:
                    score_and_write(emb, lab, labs, names, noise, rows)
        else:
            bar = tqdm(total=sum(len(v) for v in by_label.values()), desc=desc, unit="img", disable=not progress)
            for l in mine:
                rest = writer.open(l)
                idx = [i for i in by_label[l] if rest and name_of(i) in rest]
                bar.update(len(by_label[l]) - len(idx))
                for emb, lab, names in loader_of(Subset(dataset, idx)):
                    labs = lab.tolist()
                    emb, lab = embed(emb), to_device(lab)
                    noise = None
                    if attr.stochastic:
                        noise = standard_noise(config.nsamples, emb.shape[1:],
                                               seeds=[image_seed(config.seed, n) for n in names], device=device)
                    score_and_write(emb, lab, labs, names, noise, range(len(names)))
                    bar.update(len(names))
            bar.close()
        write_pending()
    except BaseException:
        with contextlib.suppress(Exception):  # keep the rows already computed (resume starts after them)
            write_pending()
        raise
    finally:
        writer.close()
    if writer.busy:
        print(f"warning: {len(writer.busy)} labels were skipped because another process holds them: "
              f"{writer.busy[:20]}{' ...' if len(writer.busy) > 20 else ''}. Rerun with --resume after it ends.")
    return {"labels": mine, "scored": writer.scored, "skipped": writer.skipped, "busy": writer.busy,
            "files": [str(tis_file(out_dir, l)) for l in mine], "run_id": run_id, "copies_per_pass": copies,
            "fast_agreement": agreement}


# ----------------------------------------------------------------------------- scripts

def tis_parser(batch_size_default: int = 25, data_type_default: str | None = None) -> argparse.ArgumentParser:
    """The TIS_computation.py flags (parent parser; both experiment folders use it)."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("TIS")
    g.add_argument("--data_type", choices=("train", "test", "validation"), default=data_type_default,
                   required=data_type_default is None, help="which split to score")
    g.add_argument("--batch_size", type=positive_int, default=batch_size_default, help="images per batch (default: %(default)s)")
    g.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="score: the paper's smoothgrad (default), smoothgrad_x_input, integrated_gradients, "
                        "occlusion; non-paper scores go to results/TIS_<attribution>/")
    g.add_argument("--method", choices=("max", "ave", "mean", "sum"), default=None,
                   help="channel reduction (seed: max|ave). Default: max for smoothgrad, sum for "
                        "smoothgrad_x_input and integrated_gradients, mean for occlusion")
    g.add_argument("--nsamples", type=positive_int, default=20, help="SmoothGrad noise draws (default: %(default)s)")
    g.add_argument("--stdev_spread", type=nonneg_float, default=0.2,
                   help="noise sd = stdev_spread * (max - min) (default: %(default)s)")
    g.add_argument("--noise_scope", choices=NOISE_SCOPES, default="sample",
                   help="sample (default): max-min per image and noise seeded by (--seed, filename): scores "
                        "independent of --batch_size, shards and resuming. batch: max-min over the batch (the "
                        "authors' scale). authors: the authors' script exactly: batches of --batch_size "
                        "consecutive rows of the split CSV (across labels), torch.manual_seed(--seed) once, then "
                        "per batch per draw one torch.normal(0, sd, batch shape) from the global CPU generator, "
                        "gradients summed in float64, scores written as float64; same seed, batch size and order "
                        "-> the same files as their script (smoothgrad only)")
    g.add_argument("--ig_steps", type=positive_int, default=32, help="integrated-gradients steps (default: %(default)s)")
    g.add_argument("--max_memory_gb", type=positive_float, default=None,
                   help="memory budget of the noisy / interpolated / occluded copies. Copies per forward+backward "
                        "pass = floor(budget / memory per copy), the memory per copy measured once on the model "
                        "with a small probe (CUDA: peak allocated memory; CPU: bytes saved for backward x 1.5). "
                        "Default: 50%% of the GPU's free memory (CUDA) or of MemAvailable (CPU). Does not change "
                        "the scores")
    g.add_argument("--max_copies_per_pass", type=positive_int, default=None,
                   help="explicit override of the copies per forward+backward pass (0 = all copies of a batch at "
                        "once); default: from --max_memory_gb. Does not change the scores")
    g.add_argument("--fast", action="store_true",
                   help="fold BatchNorm into the preceding conv/linear and run channels-last (+ bf16 autocast on "
                        "CUDA for nets whose bf16 top-20 positions agree >= 99%% with float32: VQGAN Net3 only). "
                        "Prints max |diff| and top-20 overlap against the exact path on the first batch. Scores "
                        "differ from the exact default by float rounding (more with bf16); recorded in "
                        "tis_config.json")
    g.add_argument("--resume", action="store_true",
                   help="skip finished labels and the finished rows of a partial label (refused when the files "
                        "come from other settings, checkpoint or dataset)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete this shard's label files written with other settings (and replace tis_config.json) "
                        "instead of refusing to start")
    g.add_argument("--shard", type=nonneg_int, default=None, help="this shard (default: $SLURM_ARRAY_TASK_ID - min, else 0)")
    g.add_argument("--num_shards", type=positive_int, default=None, help="number of shards (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    g.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """--shard/--num_shards, else the SLURM array variables, else (0, 1)."""
    from .cli import env_int

    if num_shards is None:
        num_shards = env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if shard is None:
        tid = env_int("SLURM_ARRAY_TASK_ID", None)
        shard = 0 if tid is None else tid - env_int("SLURM_ARRAY_TASK_MIN", 0)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise CortexError(f"--shard {shard} --num_shards {num_shards}: need 0 <= shard < num_shards")
    return shard, num_shards


def run_tis(args, experiment: str) -> dict:
    """``TIS_computation.py``'s main for either experiment folder (``"vqgan"`` or ``"dalle"``).

    Uses ``args`` from ``paths_parser``, ``runtime_parser``, ``model_parser`` and ``tis_parser``.
    """
    from cortex.data.formats import EmbeddingDataset, load_codebook, resolve_num_classes, split_csv
    from cortex.iem.checkpoints import load_iem
    from .paths import ExperimentPaths
    from .provenance import check_checkpoint
    from .utils import get_device, require_file, save_run_args, seed_everything

    paths = ExperimentPaths.from_args(args, experiment)
    shard, num_shards = resolve_shard(args.shard, args.num_shards)
    config = TISConfig(attribution=args.attribution, method=args.method, nsamples=args.nsamples,
                       stdev_spread=args.stdev_spread, noise_scope=args.noise_scope, seed=args.seed,
                       ig_steps=args.ig_steps, fast=getattr(args, "fast", False),
                       max_copies_per_pass=args.max_copies_per_pass, max_memory_gb=getattr(args, "max_memory_gb", None))
    check_checkpoint(paths, args.model)  # trained on the dataset on disk now (cortex.provenance); before any write
    out_dir = paths.tis_dir(args.model, args.data_type, args.attribution)
    seed_everything(args.seed)
    device = get_device(args.device, args.gpu)
    num_classes = resolve_num_classes(args.num_classes, paths.data_dir, 1000 if experiment == "vqgan" else 2)
    ckpt = require_file(paths.best_ckpt(args.model), "IEM checkpoint",
                        f"Train it first (python train.py --model {args.model}) or pass --checkpoint_dir.")
    model = load_iem(ckpt, experiment, args.model, num_classes=args.num_classes, width=args.width,
                     depth=args.depth, map_location="cpu")
    model_classes = getattr(model, "num_classes", num_classes)
    check_iem_not_near_chance(ckpt, paths.testing_results(args.model), model_classes, what="token importance scores")
    dataset = EmbeddingDataset(paths.data_dir, args.data_type, num_classes, layout=args.data_layout, return_ids=True)
    codebook = None
    if ATTRIBUTIONS[args.attribution].uses_baseline:
        if (Path(paths.data_dir) / "codebook.npy").exists():
            codebook = load_codebook(paths.data_dir)
        else:
            print(f"note: {paths.data_dir}/codebook.npy not found; the {args.attribution} baseline is zeros")
    run_info = {
        "checkpoint": {"file": ckpt.name, "sha256": file_sha256(ckpt)},
        "model": {"experiment": experiment, "model_id": int(args.model), "num_classes": int(model_classes),
                  "width": getattr(model, "width", None), "depth": getattr(model, "depth", None)},
        "data": {"split": args.data_type, "csv_sha256": file_sha256(split_csv(paths.data_dir, args.data_type)),
                 "codebook_sha256": file_sha256(Path(paths.data_dir) / "codebook.npy")},
    }
    # the folder is made once the checkpoint and the data passed their checks (a refused run leaves none)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out_dir, name="args.json" if num_shards == 1 else f"args_shard{shard}of{num_shards}.json")
    summary = compute_tis(model, dataset, out_dir, config, batch_size=args.batch_size, device=device,
                          codebook=codebook, resume=args.resume, overwrite=getattr(args, "overwrite", False),
                          shard=shard, num_shards=num_shards, num_workers=args.num_workers,
                          progress=not args.no_progress, run_info=run_info, net=(experiment, int(args.model)))
    print(f"TIS ({args.attribution}, {config.reduction}) of {len(summary['labels'])} labels -> {out_dir}: "
          f"{summary['scored']} images scored, {summary['skipped']} already done"
          + (f", {len(summary['busy'])} labels held by another process" if summary["busy"] else ""))
    return summary
