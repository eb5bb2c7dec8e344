"""Operations on whole dataset folders (SPEC §3 layout).

* ``codebook_from_files`` / ``run_compact`` (``compact_dataset.py``): the compact layout's ``codebook.npy``
  from the authors' per-image files, every file checked.
* ``merge_datasets`` / ``run_merge`` (``merge_datasets.py``): one dataset from folders generated
  separately (e.g. one class range per GPU job), per-image files and PNGs hard-linked.
* ``staged_dataset`` (both ``generate_dataset.py``): a dataset is built in ``<data_dir>.generating`` beside its
  final place and swapped in when complete, so a killed generation never mixes old CSVs with new files.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cortex.data.formats import (CSV_HEADER, EMB_DIM, GRID, N_POS, SPLITS, _natural_key, dataset_info, image_path,
                                 load_codebook, load_embedding_file, read_split, split_csv, split_npy_dir,
                                 write_token_indices)
from cortex.data.real_common import codebook_of
from cortex.data.taming_compat import load_taming_model
from cortex.utils import CortexError, atomic_save_npy, atomic_write, format_list, parse_int_list


# ----------------------------------------------------------------------------- files -> compact

# Without --n_codes, a VQGAN or dataset_info.json, the codebook size is inferred as the largest id + 1, up to the
# paper's VQGAN (16,384 codes): one stray id 99999 must not silently build a 100,000-code codebook.
MAX_INFERRED_CODES = 16384

def codebook_from_files(data_dir, n_codes: int | None = None, reference: np.ndarray | None = None,
                        tolerance: float = 1e-5, progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Recover ``codebook.npy`` from the authors' per-image layout.

    Position ``p`` of an image's ``(256, 16, 16)`` file holds ``codebook[ids[p]]`` (quantised ``z_q``), so
    reading every split once recovers every code an image uses. Each vector is checked: all positions with
    the same id, in every file, must hold the same vector (and equal ``reference[id]`` when a VQGAN codebook
    is given) up to ``|a - b| <= tolerance * (1 + |b|)``, else a CortexError names the file and position.
    The tolerance is for float rounding: taming's straight-through ``z + (z_q - z).detach()`` can differ from
    ``z_q`` in the last bit, so saved encodings need not equal the codebook bit for bit.

    Returns ``(codebook (n_codes, 256) float32, seen (n_codes,) bool, largest |file - codebook|)``; codes no
    image uses are ``reference``'s rows when given, else zeros (no CSV row refers to them).
    """
    data_dir = Path(data_dir)
    work = [(split, r) for split in SPLITS if split_csv(data_dir, split).exists()
            for r in read_split(data_dir, split)]
    if not work:
        raise CortexError(f"{data_dir}: no *_embeddings.csv; nothing to convert")
    split_top, rec_top = max(work, key=lambda w: int(w[1].ids.max()))
    top = int(rec_top.ids.max()) + 1
    where = f"{split_csv(data_dir, split_top)}, row {rec_top.filename}"
    source = "--n_codes"
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float32)
        n_codes, source = n_codes or reference.shape[0], "the VQGAN's codebook"
        if reference.shape != (n_codes, EMB_DIM):
            raise CortexError(f"the VQGAN codebook has shape {reference.shape}, expected ({n_codes}, {EMB_DIM})")
    info_codes = dataset_info(data_dir).get("n_codes") if n_codes is None else None
    if info_codes:
        n_codes, source = int(info_codes), f"{data_dir / 'dataset_info.json'} (n_codes)"
    if n_codes is None:
        if top > MAX_INFERRED_CODES:
            raise CortexError(f"{where}: token id {top - 1} would make a {top}-code codebook (the paper's VQGAN has "
                              f"{MAX_INFERRED_CODES}); fix that row if the id is wrong, or pass --n_codes (or "
                              f"--vqgan_config/--vqgan_ckpt) for a larger codebook")
        n_codes, source = top, None
    if top > n_codes:
        raise CortexError(f"{where}: token id {top - 1} is outside the codebook: {source} gives {n_codes} codes "
                          f"(ids 0..{n_codes - 1}); fix the row or the codebook size")
    cb = np.zeros((n_codes, EMB_DIM), np.float32) if reference is None else reference.copy()
    seen = np.zeros(n_codes, bool)
    max_dev = 0.0
    for split, r in tqdm(work, desc="reading per-image embeddings", unit="file", disable=not progress):
        path = split_npy_dir(data_dir, split) / r.filename
        if not path.exists():
            raise CortexError(f"embedding file not found: {path} (row {r.filename} of {split_csv(data_dir, split)})")
        arr = load_embedding_file(path)  # (256, 16, 16) float32, else a CortexError naming the file
        z = arr.reshape(EMB_DIM, N_POS).T  # (256 positions, 256 channels)
        if reference is None:
            new = ~seen[r.ids]
            cb[r.ids[new]] = z[new]  # first sighting of a code sets its row
        if not np.isfinite(z).all():
            p = int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])
            raise CortexError(f"{path}: position {p} (row {p // GRID}, col {p % GRID}) holds NaN/Inf; this file is "
                              f"broken, regenerate it")
        dev = np.abs(cb[r.ids] - z)  # (256, 256)
        max_dev = max(max_dev, float(dev.max()))
        bad = np.flatnonzero((~(dev <= tolerance * (1 + np.abs(z)))).any(axis=1))
        if bad.size:
            p = int(bad[0])
            what = ("the reference codebook's code" if reference is not None
                    else "the vector the other positions/files give code")
            raise CortexError(f"{path}: position {p} (row {p // GRID}, col {p % GRID}) differs from {what} "
                              f"{int(r.ids[p])}: this embedding is not a codebook lookup of its CSV ids, so the "
                              f"compact layout would not be lossless")
        seen[r.ids] = True
    return cb, seen, max_dev


def run_compact(args, data_dir) -> Path:
    """``compact_dataset.py``'s main: write ``<data_dir>/codebook.npy`` next to the authors' per-image files."""
    data_dir = Path(data_dir)
    out = data_dir / "codebook.npy"
    if out.exists() and not args.force:
        raise CortexError(f"{out} exists; pass --force to rebuild it")
    reference = None
    if args.vqgan_ckpt or args.vqgan_config:
        if not (args.vqgan_ckpt and args.vqgan_config):
            raise CortexError("--vqgan_config and --vqgan_ckpt go together (the taming VQGAN that made the data)")
        reference = codebook_of(load_taming_model(args.vqgan_config, args.vqgan_ckpt, "cpu"))
    cb, seen, max_dev = codebook_from_files(data_dir, args.n_codes, reference, args.tolerance,
                                            progress=not args.no_progress)
    atomic_save_npy(out, cb)
    info = dataset_info(data_dir)
    info.update(n_codes=int(cb.shape[0]), codes_used=int(seen.sum()), codebook_max_deviation=max_dev,
                codebook_source="vqgan checkpoint" if reference is not None else "per-image files")
    with atomic_write(data_dir / "dataset_info.json") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    print(f"wrote {out}: {cb.shape[0]} codes, {int(seen.sum())} used by the images; every file checked, largest "
          f"|file - codebook| {max_dev:.3g}{' (bit-exact)' if max_dev == 0 else ''}")
    if reference is None and not seen.all():
        print(f"note: {int((~seen).sum())} codes appear in no image and are zeros; the TIS baselines of "
              f"integrated gradients / occlusion average the codebook, so pass --vqgan_config/--vqgan_ckpt "
              f"for the exact full codebook")
    return out


# ----------------------------------------------------------------------------- merging folders

def _place(src: Path, dst: Path, copy: bool) -> None:
    """Hard-link (else copy) ``src`` to ``dst``; an existing identical ``dst`` (a rerun) is kept."""
    if dst.exists():
        same_size = dst.stat().st_size == src.stat().st_size
        if same_size and (os.path.samefile(src, dst) or dst.read_bytes() == src.read_bytes()):
            return
        raise CortexError(f"{dst} exists and differs from {src}; merge into an empty --data_dir")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    tmp.unlink(missing_ok=True)
    if not copy:
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge_datasets(inputs, out_dir, copy: bool = False, progress: bool = True) -> dict:
    """Merge dataset folders generated separately (e.g. ``--classes 0-499`` and ``--classes 500-999`` on two GPUs).

    Every input must use the same codebook (``codebook.npy`` equal, when present) and no filename may occur in
    two inputs. The split CSVs are concatenated and sorted as one generator run sorts them, the token-index
    pickles rebuilt, per-image ``.npy`` files and PNGs hard-linked (copied with ``copy=True`` or across file
    systems), and ``dataset_info.json`` merged: ``classes`` united, ``num_classes`` the largest, ``split_sizes``
    counted, settings that differ between inputs kept per input under ``merged_from``. Rerunning after an
    interruption finishes the job; every file is written atomically, the CSVs last.
    Returns the merged info.
    """
    inputs = [Path(d) for d in inputs]
    out_dir = Path(out_dir)
    if len(inputs) < 2:
        raise CortexError("merge_datasets.py needs at least two input folders")
    for d in inputs:
        if not d.is_dir():
            raise CortexError(f"input dataset folder not found: {d}")
        if d.resolve() == out_dir.resolve():
            raise CortexError(f"{d}: an input cannot be the output --data_dir")
    # the codebook: every input that has one must have the same
    books = [(d, d / "codebook.npy") for d in inputs if (d / "codebook.npy").exists()]
    codebook = load_codebook(books[0][0]) if books else None
    for d, _ in books[1:]:
        if not np.array_equal(load_codebook(d), codebook):
            raise CortexError(f"{d}/codebook.npy differs from {books[0][0]}/codebook.npy: the folders were made with "
                              f"different VQGANs and cannot be merged")
    max_dev = 0.0
    for d in inputs:  # an input without codebook.npy: its per-image files must be lookups of the shared one
        if codebook is not None and not (d / "codebook.npy").exists():
            if not any(split_npy_dir(d, s).is_dir() for s in SPLITS):
                raise CortexError(f"{d}: has neither codebook.npy nor per-image files (train/ val/ test/); "
                                  f"nothing to merge its CSVs' ids with")
            print(f"{d} has no codebook.npy: checking its files against {books[0][0]}/codebook.npy")
            try:
                max_dev = max(max_dev, codebook_from_files(d, reference=codebook, progress=progress)[2])
            except CortexError as e:
                raise CortexError(f"cannot merge {d} with {books[0][0]} (another VQGAN?): {e}") from None
    rows: dict[str, list] = {s: [] for s in SPLITS}
    owner: dict[str, Path] = {}
    jobs = []  # (src, dst)
    for d in inputs:
        splits = [s for s in SPLITS if split_csv(d, s).exists()]
        if not splits:
            raise CortexError(f"{d}: no *_embeddings.csv; is this a dataset folder?")
        for s in splits:
            has_files = split_npy_dir(d, s).is_dir()
            if not has_files and codebook is None:
                raise CortexError(f"{d}: split {s} has neither per-image files ({split_npy_dir(d, s).name}/) nor "
                                  f"codebook.npy")
            for r in read_split(d, s):
                if r.filename in owner:
                    raise CortexError(f"{r.filename} is in both {owner[r.filename]} and {d}: the inputs must hold "
                                      f"different images (e.g. disjoint --classes ranges)")
                owner[r.filename] = d
                rows[s].append([r.filename, str(r.label), format_list(r.ids)])
                if has_files:
                    jobs.append((split_npy_dir(d, s) / r.filename, split_npy_dir(out_dir, s) / r.filename))
                elif any(split_npy_dir(e, s).is_dir() for e in inputs):
                    raise CortexError(f"{d}: split {s} has no per-image files but another input has; merge folders "
                                      f"of one layout (or build the missing files' codebook with compact_dataset.py "
                                      f"and merge the compact layout)")
                png = image_path(d, r.filename)
                if png.exists():
                    jobs.append((png, image_path(out_dir, r.filename)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, dst in tqdm(jobs, desc="linking per-image files", unit="file", disable=not progress):
        _place(src, dst, copy)  # may stop on a differing file: out_dir's own dataset is untouched until here
    # what an earlier dataset in out_dir (merged into with --force) left that the merged one does not have
    stale = [] if codebook is not None else [out_dir / "codebook.npy"]
    for s, rs in rows.items():
        if not rs:
            stale += [split_csv(out_dir, s), out_dir / f"{s}_token_indices.pkl"]
    for p in stale:
        p.unlink(missing_ok=True)
    if codebook is not None:
        atomic_save_npy(out_dir / "codebook.npy", codebook)
    info = _merged_info(inputs, rows, max_dev)  # first: it marks the folder as this merge's, so a rerun may finish it
    with atomic_write(out_dir / "dataset_info.json") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    for s, rs in rows.items():
        if not rs:
            continue
        rs.sort(key=lambda r: (int(r[1]), _natural_key(r[0])))
        with atomic_write(split_csv(out_dir, s)) as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            w.writerows(rs)
        if s in ("train", "test"):
            write_token_indices(out_dir, s, {r[0]: parse_int_list(r[2]).tolist() for r in rs})
    return info


def _merged_info(inputs: list[Path], rows: dict[str, list], max_dev: float = 0.0) -> dict:
    infos = [dataset_info(d) for d in inputs]
    labels = sorted({int(r[1]) for rs in rows.values() for r in rs})
    keys = set().union(*infos) - {"classes", "num_classes", "split_sizes", "merged_from"}
    info = {k: infos[0][k] for k in keys if all(k in i and i[k] == infos[0][k] for i in infos)}
    classes = sorted({c for i in infos for c in (i.get("classes") or [])}) or None
    if classes is not None and all("classes" in i for i in infos):
        info["classes"] = classes
    info["num_classes"] = max([int(i.get("num_classes", 0)) for i in infos] + [labels[-1] + 1])
    info["split_sizes"] = {s: len(rs) for s, rs in rows.items()}
    max_dev = max([max_dev] + [float(i.get("codebook_max_deviation", 0)) for i in infos])
    if max_dev:
        info["codebook_max_deviation"] = max_dev
    info["merged_from"] = [{"data_dir": str(d), **{k: v for k, v in i.items() if k not in info or k == "classes"}}
                           for d, i in zip(inputs, infos)]
    return info


def run_merge(args, data_dir) -> dict:
    """``merge_datasets.py``'s main."""
    out = Path(data_dir)
    merged_from = [m.get("data_dir") for m in dataset_info(out).get("merged_from", [])]
    rerun = merged_from == [str(Path(d)) for d in args.inputs]  # the same merge again (e.g. after a kill)
    if holds_dataset(out) and not (rerun or args.force):
        raise CortexError(f"{out} already holds another dataset; pass --force to merge into it anyway (its CSVs "
                          f"are replaced), or choose another --data_dir")
    info = merge_datasets(args.inputs, out, copy=args.copy, progress=not args.no_progress)
    sizes = ", ".join(f"{k} {v}" for k, v in info["split_sizes"].items())
    print(f"merged {len(args.inputs)} folders into {out}: {sizes} images, num_classes {info['num_classes']}")
    return info


# ----------------------------------------------------------------------------- staged generation

def holds_dataset(data_dir) -> bool:
    """True when ``data_dir`` has any split CSV (``{split}_embeddings.csv``): a dataset, finished or not."""
    return any(split_csv(data_dir, s).exists() for s in SPLITS)


STAGE_SUFFIX = ".generating"   # the dataset being built
OLD_SUFFIX = ".replaced"       # the previous dataset, during the swap only
_STAMP = ".staging_args.json"  # inside the stage: the settings it is built with (resume only the same)
_READY = ".staging_complete"   # inside the stage: complete, waiting to be swapped in


def _stage_paths(data_dir) -> tuple[Path, Path, Path]:
    data_dir = Path(os.path.abspath(data_dir))
    return data_dir, data_dir.with_name(data_dir.name + STAGE_SUFFIX), data_dir.with_name(data_dir.name + OLD_SUFFIX)


def _swap_in(data_dir: Path, stage: Path, old: Path) -> None:
    """Two renames: ``data_dir`` -> ``old``, ``stage`` -> ``data_dir``; then the markers and ``old`` go."""
    if data_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(data_dir, old)
    os.replace(stage, data_dir)
    for marker in (_READY, _STAMP):
        (data_dir / marker).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def recover_staged(data_dir) -> None:
    """Finish a swap that a kill interrupted (the staged dataset was complete), or put the old dataset back."""
    data_dir, stage, old = _stage_paths(data_dir)
    if (stage / _READY).exists():
        print(f"{stage} is complete: moving it to {data_dir} (a previous run was stopped during the swap)")
        _swap_in(data_dir, stage, old)
    elif old.exists():
        if data_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, data_dir)


@contextlib.contextmanager
def staged_dataset(data_dir, stamp: dict):
    """Build a dataset folder beside its final place; swap it in only when the body completes.

    Yields ``<data_dir>.generating`` to write into. A kill leaves ``data_dir`` (the old dataset, if any) intact
    and the stage behind: the next run with the same ``stamp`` (the generation settings, JSON-able) resumes it
    (``DatasetWriter.done``; with or without ``--overwrite``), other settings start the stage anew. On success
    the stage replaces ``data_dir`` by two renames (``recover_staged`` completes a swap cut short).
    """
    data_dir, stage, old = _stage_paths(data_dir)
    recover_staged(data_dir)
    want = json.loads(json.dumps(stamp, default=str))
    if stage.exists():
        try:
            same = json.loads((stage / _STAMP).read_text()) == want
        except (OSError, ValueError):
            same = False
        if same:
            print(f"resuming the interrupted generation in {stage}")
        else:
            print(f"discarding {stage} (an interrupted generation with other settings)")
            shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    with atomic_write(stage / _STAMP) as f:
        json.dump(want, f, indent=2, sort_keys=True)
    yield stage
    (stage / _READY).touch()
    _swap_in(data_dir, stage, old)
