"""Token Importance Score computation: the driver behind both folders' ``TIS_computation.py``.

``compute_tis`` scores every image of a dataset with one attribution (``cortex.attribution``) and
writes one CSV per label, ``label_{k}.csv`` with header ``filename,label,contribution`` (SPEC §3).

Resumable and safe:

* rows of a label go to ``label_{k}.csv.partial``, appended and flushed row by row; when the label's
  last image is scored the partial file is renamed to ``label_{k}.csv``, so a final file is always
  complete;
* ``resume=True`` skips labels whose final file exists and the rows already in a partial file (a torn
  last line is dropped), so a restarted run ends with exactly one row per image;
* the score-relevant settings are stored in ``tis_config.json``; resuming with different ones is an
  error instead of a silent mix;
* a non-finite score is a CortexError naming the image.

Shards (SLURM arrays) split the *labels* (``sorted labels[shard::num_shards]``), so two shards never
write the same file. Under ``noise_scope="sample"`` each image's noise comes from a generator seeded
by ``(seed, filename)``, so scores depend neither on ``batch_size`` nor on sharding or resuming.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .attribution import ATTRIBUTIONS, NOISE_SCOPES, get_attribution, image_seed, token_scores
from .utils import CortexError, atomic_write, format_list, parse_float_list

TIS_HEADER = ["filename", "label", "contribution"]
N_POS = 256


# ----------------------------------------------------------------------------- configuration

@dataclass
class TISConfig:
    """Everything that changes the scores (stored as ``tis_config.json`` beside the CSVs)."""

    attribution: str = "smoothgrad"
    method: str | None = None          # channel reduction; None = the attribution's natural one
    nsamples: int = 20
    stdev_spread: float = 0.2
    noise_scope: str = "sample"
    seed: int = 0
    ig_steps: int = 32
    max_copies_per_pass: int | None = None  # memory knob, does not change the scores

    def __post_init__(self):
        get_attribution(self.attribution)
        if self.method in ("ave", "avg"):
            self.method = "mean"
        if self.noise_scope not in NOISE_SCOPES:
            raise CortexError(f"--noise_scope {self.noise_scope!r}: use one of {', '.join(NOISE_SCOPES)}")
        if self.nsamples < 1:
            raise CortexError(f"--nsamples must be >= 1, got {self.nsamples}")

    @property
    def reduction(self) -> str:
        return self.method or ATTRIBUTIONS[self.attribution].reduction

    def score_key(self) -> dict:
        d = asdict(self)
        d.pop("max_copies_per_pass")
        d["method"] = self.reduction
        a = ATTRIBUTIONS[self.attribution]
        if not a.stochastic:
            for k in ("nsamples", "stdev_spread", "noise_scope", "seed"):
                d.pop(k)
        if self.attribution != "integrated_gradients":
            d.pop("ig_steps")
        return d


def shard_labels(labels, shard: int = 0, num_shards: int = 1) -> list[int]:
    """This shard's labels: ``sorted(set(labels))[shard::num_shards]`` (disjoint, covering)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise CortexError(f"--shard {shard} --num_shards {num_shards}: need 0 <= shard < num_shards")
    return sorted(set(int(l) for l in labels))[shard::num_shards]


# ----------------------------------------------------------------------------- files

def tis_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv"


def partial_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.partial"


def read_partial(path) -> list[str]:
    """Filenames of the complete rows of a partial TIS file; rewrites it without a torn last line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    good, names = [], []
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
                ok = parse_float_list(row[2], where=str(path)).shape == (N_POS,)
            except CortexError:
                ok = False
        if not ok:
            if i != len(lines) - 1:
                raise CortexError(f"{path}:{i + 1}: malformed row in the middle of a partial TIS file; delete it "
                                  f"and rerun this label")
            break  # torn last line of a killed run
        good.append(line)
        names.append(row[0])
    if "".join(good) != text:
        with atomic_write(path) as f:
            f.write("".join(good))
    return names


def read_tis_file(path) -> tuple[list[str], list[int], np.ndarray]:
    """Read a TIS CSV once: filenames, labels and scores ``(N, 256)`` float64 (no ``ast``)."""
    path = Path(path)
    names, labels, rows = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != TIS_HEADER:
            raise CortexError(f"{path}: header must be 'filename,label,contribution', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3:
                raise CortexError(f"{path}:{lineno}: expected 3 fields, got {len(row)}")
            names.append(row[0])
            labels.append(int(row[1]))
            rows.append(row[2])
    scores = _parse_rows(rows, path)
    return names, labels, scores


def _parse_rows(rows: list[str], path) -> np.ndarray:
    """All contribution literals of a file in one numpy call: ``(N, 256)``."""
    if not rows:
        return np.zeros((0, N_POS))
    body = ",".join(r.strip()[1:-1] for r in rows)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = np.fromstring(body, dtype=np.float64, sep=",")  # text mode: one C parse per file
    except ValueError:
        flat = None
    if flat is None or flat.size != len(rows) * N_POS or not all(r.strip()[:1] == "[" for r in rows):
        # find the culprit for a precise message
        for i, r in enumerate(rows):
            v = parse_float_list(r, where=f"{path}: row {i + 2}")
            if v.shape != (N_POS,):
                raise CortexError(f"{path}: row {i + 2} has {v.size} scores, expected {N_POS}")
        raise CortexError(f"{path}: malformed contribution lists")
    return flat.reshape(len(rows), N_POS)


# ----------------------------------------------------------------------------- driver

def _collate(batch):
    embs, labels, names = zip(*batch)
    return torch.stack([torch.as_tensor(e) for e in embs]), torch.as_tensor(labels, dtype=torch.long), list(names)


def compute_tis(model: torch.nn.Module, dataset, out_dir, config: TISConfig | None = None, *,
                batch_size: int = 25, device="cpu", codebook=None, resume: bool = False,
                shard: int = 0, num_shards: int = 1, num_workers: int = 0, progress: bool = True) -> dict:
    """Score every image of ``dataset`` (this shard's labels) and write ``out_dir/label_{k}.csv``.

    model: IEM taking ``(B, 256, 16, 16)``; dataset: items ``(embedding (256,16,16), label, filename)``
    with a ``labels`` list (``cortex.data.EmbeddingDataset``; items may carry ``(256,)`` token ids instead,
    which its ``lookup`` turns into embeddings on ``device``); codebook ``(n_codes, 256)`` gives the
    baseline of integrated gradients / occlusion (mean codebook vector; zeros when None).
    Returns ``{"labels": [...], "scored": n_new_rows, "skipped": n_rows_kept, "files": [...]}``.
    """
    from tqdm import tqdm

    config = config or TISConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    extra = {}
    if ATTRIBUTIONS[config.attribution].uses_baseline:  # the baseline changes the scores: part of the config
        extra["baseline"] = "zeros" if codebook is None else "codebook mean, sha1 " + hashlib.sha1(
            np.ascontiguousarray(codebook, dtype=np.float32).tobytes()).hexdigest()[:16]
    _check_config(out_dir, config, resume, extra)

    labels_of = [int(l) for l in dataset.labels]
    mine = shard_labels(labels_of, shard, num_shards)
    by_label: dict[int, list[int]] = defaultdict(list)
    keep = set(mine)
    for i, l in enumerate(labels_of):
        if l in keep:
            by_label[l].append(i)

    def name_of(i):
        return dataset.records[i].filename if hasattr(dataset, "records") else dataset[i][2]

    todo: list[int] = []
    remaining: dict[int, int] = {}
    skipped = 0
    for l in mine:
        final, part = tis_file(out_dir, l), partial_file(out_dir, l)
        if resume and final.exists():
            skipped += len(by_label[l])
            continue
        done = set(read_partial(part)) if resume and part.exists() else set()
        if not resume and part.exists():
            part.unlink()
        rest = [i for i in by_label[l] if name_of(i) not in done]
        skipped += len(by_label[l]) - len(rest)
        if not rest:
            _finish(part, final)
            continue
        remaining[l] = len(rest)
        todo.extend(rest)

    model = model.to(device).eval()
    cb = None if codebook is None else torch.as_tensor(np.asarray(codebook), dtype=torch.float32, device=device)
    opts = dict(nsamples=config.nsamples, stdev_spread=config.stdev_spread, noise_scope=config.noise_scope,
                codebook=cb, n_steps=config.ig_steps, max_copies_per_pass=config.max_copies_per_pass)
    stochastic = ATTRIBUTIONS[config.attribution].stochastic

    lookup = getattr(dataset, "lookup", None)
    files: dict[int, object] = {}
    scored = 0
    loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    try:
        bar = tqdm(loader, desc=f"TIS {config.attribution} shard {shard}/{num_shards}", unit="batch",
                   disable=not progress)
        for emb, lab, names in bar:
            emb, lab = emb.to(device), lab.to(device)
            if lookup is not None:
                emb = lookup(emb)  # compact layout: ids (B, 256) -> (B, 256, 16, 16) on the device
            seeds = [image_seed(config.seed, n) for n in names] if stochastic else None
            scores = token_scores(config.attribution, model, emb, lab, method=config.reduction, seeds=seeds, **opts)
            scores = scores.detach().float().cpu().numpy()  # (B, 256)
            for name, l, s in zip(names, lab.tolist(), scores):
                if not np.isfinite(s).all():
                    raise CortexError(f"non-finite TIS for image {name} (label {l}, file "
                                      f"{tis_file(out_dir, l)}): the IEM or the embedding {name} produces NaN/Inf "
                                      f"gradients; check the checkpoint and this embedding")
                f = files.get(l)
                if f is None:
                    part = partial_file(out_dir, l)
                    new = not part.exists() or part.stat().st_size == 0
                    f = files[l] = open(part, "a", newline="", encoding="utf-8")
                    if new:
                        csv.writer(f).writerow(TIS_HEADER)
                csv.writer(f).writerow([name, l, format_list(s)])
                f.flush()
                scored += 1
                remaining[l] -= 1
                if remaining[l] == 0:
                    files.pop(l).close()
                    _finish(partial_file(out_dir, l), tis_file(out_dir, l))
    finally:
        for f in files.values():
            f.close()
    return {"labels": mine, "scored": scored, "skipped": skipped,
            "files": [str(tis_file(out_dir, l)) for l in mine]}


def _finish(part: Path, final: Path) -> None:
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, final)


def _check_config(out_dir: Path, config: TISConfig, resume: bool, extra: dict | None = None) -> None:
    path = out_dir / "tis_config.json"
    key = {**config.score_key(), **(extra or {})}
    if resume and path.exists():
        old = json.loads(path.read_text())
        if "baseline" in key and "baseline" not in old and old == {k: v for k, v in key.items() if k != "baseline"}:
            # written before the baseline was recorded: trust it, and record the baseline below
            print(f"note: {path} does not record the baseline; assuming it was {key['baseline']!r} (the current "
                  f"one) and adding it")
        elif old != key:
            diff = {k: (old.get(k), key.get(k)) for k in set(old) | set(key) if old.get(k) != key.get(k)}
            hint = ("the baseline changed: codebook.npy was added, removed or changed since the stored labels were "
                    "scored. " if "baseline" in diff else "")
            raise CortexError(f"{path}: --resume with different settings {diff} (stored, requested). {hint}Rerun "
                              f"with the stored settings, or without --resume to start over.")
        else:
            return
    with atomic_write(path) as f:
        json.dump(key, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- scripts

def tis_parser(batch_size_default: int = 25, data_type_default: str | None = None) -> argparse.ArgumentParser:
    """The TIS_computation.py flags (parent parser; both experiment folders use it)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("TIS")
    g.add_argument("--data_type", choices=("train", "test", "validation"), default=data_type_default,
                   required=data_type_default is None, help="which split to score")
    g.add_argument("--batch_size", type=int, default=batch_size_default, help="images per batch (default: %(default)s)")
    g.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="score: the paper's smoothgrad (default), smoothgrad_x_input, integrated_gradients, "
                        "occlusion; non-paper scores go to results/TIS_<attribution>/")
    g.add_argument("--method", choices=("max", "ave", "mean", "sum"), default=None,
                   help="channel reduction (seed: max|ave). Default: max for smoothgrad, sum for "
                        "smoothgrad_x_input and integrated_gradients, mean for occlusion")
    g.add_argument("--nsamples", type=int, default=20, help="SmoothGrad noise draws (default: %(default)s)")
    g.add_argument("--stdev_spread", type=float, default=0.2,
                   help="noise sd = stdev_spread * (max - min) (default: %(default)s)")
    g.add_argument("--noise_scope", choices=NOISE_SCOPES, default="sample",
                   help="max-min per image (default; scores independent of --batch_size) or over the batch "
                        "(reproduces the seed code)")
    g.add_argument("--ig_steps", type=int, default=32, help="integrated-gradients steps (default: %(default)s)")
    g.add_argument("--max_copies_per_pass", type=int, default=256,
                   help="memory knob: noisy / interpolated / occluded copies per forward+backward; does not "
                        "change the scores (default: %(default)s; 0 = all copies of a batch at once)")
    g.add_argument("--resume", action="store_true", help="skip finished labels and the finished rows of a partial label")
    g.add_argument("--shard", type=int, default=None, help="this shard (default: $SLURM_ARRAY_TASK_ID - min, else 0)")
    g.add_argument("--num_shards", type=int, default=None, help="number of shards (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
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
    from .data import EmbeddingDataset, load_codebook, resolve_num_classes
    from .models import load_iem
    from .paths import ExperimentPaths
    from .utils import get_device, require_file, save_run_args, seed_everything

    paths = ExperimentPaths.from_args(args, experiment)
    shard, num_shards = resolve_shard(args.shard, args.num_shards)
    config = TISConfig(attribution=args.attribution, method=args.method, nsamples=args.nsamples,
                       stdev_spread=args.stdev_spread, noise_scope=args.noise_scope, seed=args.seed,
                       ig_steps=args.ig_steps, max_copies_per_pass=args.max_copies_per_pass)
    out_dir = paths.tis_dir(args.model, args.data_type, args.attribution)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out_dir, name="args.json" if num_shards == 1 else f"args_shard{shard}of{num_shards}.json")
    seed_everything(args.seed)
    device = get_device(args.device, args.gpu)
    num_classes = resolve_num_classes(args.num_classes, paths.data_dir, 1000 if experiment == "vqgan" else 2)
    ckpt = require_file(paths.best_ckpt(args.model), "IEM checkpoint",
                        f"Train it first (python train.py --model {args.model}) or pass --checkpoint_dir.")
    model = load_iem(ckpt, experiment, args.model, num_classes=args.num_classes, width=args.width,
                     depth=args.depth, map_location="cpu")
    dataset = EmbeddingDataset(paths.data_dir, args.data_type, num_classes, layout=args.data_layout, return_ids=True)
    codebook = None
    if ATTRIBUTIONS[args.attribution].uses_baseline:
        if (Path(paths.data_dir) / "codebook.npy").exists():
            codebook = load_codebook(paths.data_dir)
        else:
            print(f"note: {paths.data_dir}/codebook.npy not found; the {args.attribution} baseline is zeros")
    summary = compute_tis(model, dataset, out_dir, config, batch_size=args.batch_size, device=device,
                          codebook=codebook, resume=args.resume, shard=shard, num_shards=num_shards,
                          num_workers=args.num_workers, progress=not args.no_progress)
    print(f"TIS ({args.attribution}, {config.reduction}) of {len(summary['labels'])} labels -> {out_dir}: "
          f"{summary['scored']} images scored, {summary['skipped']} already done")
    return summary
