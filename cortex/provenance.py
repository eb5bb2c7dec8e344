"""One provenance chain from the dataset to every result, and one checker (SPEC §5, what the scripts guarantee).

Each artifact records the content hashes (sha256) of what it was computed from::

    dataset  (the split CSVs + codebook.npy: hashed, not recorded)
      -> IEM checkpoint     config.json "dataset": {file: sha256} of the data it was trained on
      -> TIS run            tis_config.json: checkpoint sha256, split CSV and codebook sha256 (cortex.attribution.store)
      -> statistics         source.json: tis_config.json's SHA-1, each TIS file's fingerprint, statistics_id
                            (cortex.analysis.statistics); "in_progress" while TIS_analysis.py writes them
      -> significance       tis_significance.csv.source.json: the statistics_id it was computed from
    dataset -> frequency baseline   frequency_baseline/source.json: the split CSV's sha256, the labels;
                                    "in_progress" while generate_freq_based_tokens.py writes it
    each evaluation output  <output>.source.json: the ids of everything above it used

A consumer calls :func:`verify` (or one of the ``check_*`` functions) before it computes: every link up to the
dataset is compared with the files on disk now, upstream first, and the first stale link is a CortexError in one
line naming the link and the command that rebuilds it. Links that record nothing (the authors' published
checkpoints and statistics) are not judged. Hashes are of file contents; a process hashes a file once per
(size, mtime, inode) -- a cache of this process only, so the verdict is always content-based.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .attribution.store import TIS_CONFIG, file_sha1, fingerprint, short_list
from .data.formats import dataset_files, dataset_hashes, require_split, split_csv  # noqa: F401 (re-exported)
from .paths import PAPER_ATTRIBUTION, label_files
from .utils import CortexError, atomic_write, file_sha256

SOURCE_SUFFIX = ".source.json"  # the provenance record beside an evaluation output
CODEBOOK = "codebook.npy"
SOURCE_FILE = "source.json"  # the TIS statistics' record: which TIS run they come from (check_statistics_current)


def record_id(record: dict) -> str:
    """16 hex digits of the sha256 of a record's canonical JSON (as ``cortex.attribution.store.run_id_of``)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the dataset

def dataset_changes(recorded: dict, data_dir) -> list[str]:
    """Files of ``recorded`` (``{file: sha256}``) whose content differs now. ``codebook.npy`` counts only when
    both sides have one (``compact_dataset.py`` adds it to a files-layout dataset without changing a tensor)."""
    changed = []
    for name, sha in sorted(recorded.items()):
        now = file_sha256(Path(data_dir) / name)
        if name == CODEBOOK:
            if sha and now and sha != now:
                changed.append(name)
        elif sha != now:
            changed.append(f"{name} ({'deleted' if now is None else 'changed'})")
    return changed


# ----------------------------------------------------------------------------- commands that rebuild a link

def command(paths, script: str, model: int | None = None, attribution: str | None = None, **flags) -> str:
    """The command that rebuilds a link, as a researcher types it in the experiment folder."""
    parts = ["python", script]
    if model is not None:
        parts += ["--model", str(model)]
    if getattr(paths, "experiment", "vqgan") == "dalle" and paths.bias_type:
        parts += ["--bias_type", paths.bias_type]
    for k, v in flags.items():
        if v is not None and v is not False:
            parts += [f"--{k}"] + ([] if v is True else [str(v)])
    if attribution and attribution != PAPER_ATTRIBUTION:
        parts += ["--attribution", attribution]
    return " ".join(parts)


def stale(link: str, why: str, rebuild: str) -> CortexError:
    """The one-line error of a stale link."""
    return CortexError(f"stale {link}: {why}; rebuild it: {rebuild}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as e:
        raise CortexError(f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it") from None


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "missing"


# ----------------------------------------------------------------------------- the links

def check_dataset(paths, split: str = "train") -> None:
    """The dataset exists (its ``split`` CSV): the head of every chain."""
    require_split(paths.data_dir, split)


def checkpoint_record(paths, model: int) -> dict:
    """``config.json`` beside ``best_model.pth`` (``{}`` when absent)."""
    cfg = paths.best_ckpt(model).parent / "config.json"
    return _read_json(cfg) if cfg.exists() else {}


def check_checkpoint(paths, model: int) -> str | None:
    """The IEM checkpoint was trained on the dataset on disk now (``config.json``'s ``dataset`` hashes; a
    checkpoint that records none, e.g. the authors', is not judged). Returns its sha256 (``None`` when absent)."""
    ckpt = paths.best_ckpt(model)
    recorded = checkpoint_record(paths, model).get("dataset")
    if recorded and ckpt.exists():
        changed = dataset_changes(recorded, paths.data_dir)
        if changed:
            raise stale(f"IEM checkpoint {ckpt}", f"it was trained on another dataset ({', '.join(changed)} in "
                        f"{paths.data_dir} since)", command(paths, "train.py", model, overwrite=True))
    return file_sha256(ckpt)


def tis_record(tis_dir) -> dict | None:
    p = Path(tis_dir) / TIS_CONFIG
    return _read_json(p) if p.exists() else None


def check_tis_run(paths, model: int, split: str, attribution: str = "smoothgrad") -> dict | None:
    """The TIS run of (model, split, attribution) was computed with the current checkpoint on the current split
    CSV and codebook (``tis_config.json``), and that checkpoint on the current dataset. Returns the run's
    ``tis_config.json`` (``None`` when there is none: ``cortex.attribution.store.check_tis_inputs`` reports that)."""
    check_checkpoint(paths, model)
    tis_dir = paths.tis_dir(model, split, attribution)
    cfg = tis_record(tis_dir)
    if cfg is None:
        return None
    redo = command(paths, "TIS_computation.py", model, attribution, data_type=split, overwrite=True)
    ck = cfg.get("checkpoint") or {}
    if ck.get("sha256"):
        path = paths.model_dir(model) / ck.get("file", "best_model.pth")
        now = file_sha256(path)
        if now is None:  # deleted or moved: not "another IEM"
            raise CortexError(f"IEM checkpoint not found: {path} (the TIS run in {tis_dir} was computed with it): "
                              f"restore it, or pass the --root / --checkpoint_dir that holds it")
        if now != ck["sha256"]:
            raise stale(f"TIS run {tis_dir}", f"it explains another IEM (computed with checkpoint {_short(ck['sha256'])}, "
                        f"{path} is {_short(now)})", redo)
    data = cfg.get("data") or {}
    if data.get("csv_sha256"):
        path = split_csv(paths.data_dir, data.get("split", split))
        now = file_sha256(path)
        if now is None:  # deleted or moved: not "another dataset"
            raise CortexError(f"dataset not found: {path} (the TIS run in {tis_dir} was computed on it): restore "
                              f"it, or pass the --root / --data_dir that holds it")
        if now != data["csv_sha256"]:
            raise stale(f"TIS run {tis_dir}", f"it was computed on another dataset ({path} changed since)", redo)
    cb_now, cb = file_sha256(Path(paths.data_dir) / CODEBOOK), data.get("codebook_sha256")
    if cb and cb_now and cb != cb_now:
        raise stale(f"TIS run {tis_dir}", f"it was computed with another {Path(paths.data_dir) / CODEBOOK}", redo)
    return cfg


def check_statistics_current(stats_dir, tis_dir=None, *, require: bool = False,
                             rebuild: str | None = None) -> dict | None:
    """Check that the TIS statistics in ``stats_dir`` were computed from the current TIS run.

    Reads ``stats_dir/source.json`` (written last by ``cortex.analysis.statistics.analyze_tis``). A CortexError when: the
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
        raise CortexError(f"{stats_dir}: statistics files for labels {short_list(stale)} are not part of the recorded "
                          f"TIS run (left from an earlier run). {rerun}")
    if tis_dir is not None and Path(tis_dir).is_dir():
        tis_dir = Path(tis_dir)
        cpath = tis_dir / TIS_CONFIG
        sha = file_sha1(cpath) if cpath.exists() else None
        if sha != src.get("tis_config_sha1"):
            raise CortexError(f"{stats_dir} was computed from another TIS run: {cpath} "
                              f"{'changed' if sha else 'is missing'} since. {rerun}")
        files = label_files(tis_dir)
        changed = [l for l, v in recorded.items() if l not in files or fingerprint(files[l]) != v["fingerprint"]]
        new = sorted(set(files) - set(recorded)) if src.get("complete", True) else []
        if changed or new:
            what = (f"TIS files changed or removed since: labels {short_list(sorted(changed))}. " if changed else "") + \
                   (f"new TIS files: labels {short_list(new)}. " if new else "")
            raise CortexError(f"{stats_dir} is out of date with {tis_dir}: {what}{rerun}")
    if not src.get("complete", True):
        print(f"warning: {stats_dir} was computed with --allow_partial from an incomplete TIS run: "
              + "; ".join(src.get("problems", [])))
    return src


def check_statistics(paths, model: int, attribution: str = "smoothgrad", require: bool = False) -> dict | None:
    """The chain dataset -> checkpoint -> TIS run -> statistics of (model, attribution)
    (:func:`check_statistics_current`: complete, not left over, from the current TIS run's files).
    Returns the statistics' ``source.json`` (``None``: statistics with no record, e.g. the authors', warned)."""
    check_tis_run(paths, model, "train", attribution)
    return check_statistics_current(paths.stats_dir(model, attribution), paths.tis_dir(model, "train", attribution),
                                    require=require, rebuild=command(paths, "TIS_analysis.py", model, attribution))


def significance_record_path(sig_file) -> Path:
    return Path(str(sig_file) + SOURCE_SUFFIX)


def write_significance_record(sig_file, stats_dir) -> None:
    """Beside ``tis_significance.csv``: the ``statistics_id`` of the statistics it was computed with."""
    src = _read_json(Path(stats_dir) / SOURCE_FILE) if (Path(stats_dir) / SOURCE_FILE).exists() else {}
    with atomic_write(significance_record_path(sig_file)) as f:
        json.dump({"statistics_id": src.get("statistics_id")}, f, indent=2)


def check_significance(paths, model: int, attribution: str, source: dict | None) -> None:
    """``tis_significance.csv`` was computed with the statistics beside it (``source``: their ``source.json``)."""
    from .paths import SIGNIFICANCE_FILE

    sig = paths.stats_dir(model, attribution) / SIGNIFICANCE_FILE
    want = (source or {}).get("statistics_id")
    if not sig.exists() or not want:
        return
    rec = significance_record_path(sig)
    got = _read_json(rec).get("statistics_id") if rec.exists() else None
    if got != want:
        raise stale(f"significance file {sig}", "it was not computed with the statistics beside it (TIS_analysis.py "
                    "stopped between the two)", command(paths, "TIS_analysis.py", model, attribution))


# ----------------------------------------------------------------------------- frequency baseline

def frequency_record_path(paths) -> Path:
    return paths.frequency_dir() / "source.json"


def mark_in_progress(record) -> None:
    """Write ``{"in_progress": true}`` as an artifact's record: none of its files is current until the producer
    writes the real record after the last one (a killed or failed run stays marked)."""
    with atomic_write(record) as f:
        json.dump({"in_progress": True}, f)


def begin_frequency_baseline(paths) -> None:
    """Mark the frequency baseline unfinished until :func:`finish_frequency_baseline` (a failed run stays so)."""
    mark_in_progress(frequency_record_path(paths))


def finish_frequency_baseline(paths, split: str, labels) -> None:
    name = split_csv(paths.data_dir, split).name
    with atomic_write(frequency_record_path(paths)) as f:
        json.dump({"split": split, "dataset": {name: file_sha256(split_csv(paths.data_dir, split))},
                   "labels": sorted(int(l) for l in labels)}, f, indent=2)


def check_frequency_baseline(paths) -> dict | None:
    """The frequency baseline is complete and was counted on the current split CSV. Returns its record;
    ``None`` when there is no baseline at all; a baseline written without a record (older version, the
    authors') passes with a warning."""
    out = paths.frequency_dir()
    files = label_files(out)
    rec_path = frequency_record_path(paths)
    rebuild = command(paths, "generate_freq_based_tokens.py")
    if not rec_path.exists():
        if files:
            print(f"warning: {out} has no source.json: cannot tell which dataset this frequency baseline was "
                  f"counted on (written by another tool or an older version); {rebuild} records it")
        return None
    rec = _read_json(rec_path)
    if rec.get("in_progress"):
        raise stale(f"frequency baseline {out}", "its last run did not finish (stopped or failed while writing)",
                    rebuild)
    changed = dataset_changes(rec.get("dataset") or {}, paths.data_dir)
    if changed:
        raise stale(f"frequency baseline {out}", f"it was counted on another dataset ({', '.join(changed)} since)",
                    rebuild)
    extra = sorted(set(files) - set(rec.get("labels", [])))
    if extra:
        raise stale(f"frequency baseline {out}", f"label files {extra[:10]} are left from an earlier run", rebuild)
    return rec


# ----------------------------------------------------------------------------- the whole chain and output records

def verify(paths, model: int | None = None, *, split: str | None = None, tis_split: str | None = None,
           statistics: bool = False, frequency: bool = False, attribution: str = "smoothgrad") -> dict:
    """Check every link a consumer uses, upstream first; return the ids of what it will compute from.

    split: the dataset split read (must exist); model: the IEM (its checkpoint trained on this dataset);
    tis_split: the TIS run read; statistics: the train statistics (+ significance); frequency: the baseline.
    The returned dict is what :func:`write_output_record` stores beside the output.
    """
    used: dict = {}
    if split is not None:
        check_dataset(paths, split)
    used["dataset"] = {k: v for k, v in dataset_hashes(paths.data_dir).items() if v}
    if model is not None:
        used["checkpoint_sha256"] = check_checkpoint(paths, model)
    if tis_split is not None:
        cfg = check_tis_run(paths, model, tis_split, attribution)
        used[f"tis_run_{tis_split}"] = (cfg or {}).get("run_id")
    if statistics:
        src = check_statistics(paths, model, attribution)
        check_significance(paths, model, attribution, src)
        used["statistics_id"] = (src or {}).get("statistics_id")
        used["tis_run_train"] = ((src or {}).get("tis_config") or {}).get("run_id")
    if frequency:
        rec = check_frequency_baseline(paths)
        used["frequency_baseline_id"] = record_id(rec) if rec else None
    return used


def write_output_record(output, used: dict, **extra) -> Path:
    """``<output>.source.json``: the ids of the inputs an evaluation output was computed from."""
    path = Path(str(output) + SOURCE_SUFFIX)
    with atomic_write(path) as f:
        json.dump({"output": os.path.basename(str(output)), "inputs": used, **extra}, f, indent=2, sort_keys=True,
                  default=str)
    return path
