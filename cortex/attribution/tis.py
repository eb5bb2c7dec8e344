"""Token Importance Score computation: the driver behind both folders' ``TIS_computation.py``.

``compute_tis`` scores every image of a dataset with one attribution (``cortex.attribution.attributions``) and
writes one CSV per label, ``label_{k}.csv`` with header ``filename,label,contribution`` (SPEC §3), through the
TIS store (``cortex.attribution.store``: the folder's files, locks, resume and integrity rules).

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
import sys
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..cli import env_int, make_parser, nonneg_float, nonneg_int, positive_float, positive_int
from ..data import EmbeddingDataset, load_codebook, resolve_num_classes, split_csv
from ..models import load_iem
from ..paths import ExperimentPaths
from ..provenance import check_checkpoint
from ..utils import CortexError, file_sha256, get_device, require_file, save_run_args, seed_everything, unlock
from .attributions import (ATTRIBUTIONS, NOISE_SCOPES, authors_noise, available_memory_bytes, copies_for_budget,
                           get_attribution, image_seed, memory_per_copy, prepare_fast, reduce_channels,
                           smoothgrad_from_noise, standard_noise, token_scores, top_overlap)
from .store import (FORMAT_VERSION, LabelWriter, check_label_files, claim_config, hold_writers, remove_foreign_labels,
                    run_id_of, tis_file)


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


def shard_labels(labels, shard: int = 0, num_shards: int = 1) -> list[int]:
    """This shard's labels: ``sorted(set(labels))[shard::num_shards]`` (disjoint, covering)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise CortexError(f"--shard {shard} --num_shards {num_shards}: need 0 <= shard < num_shards")
    return sorted(set(int(l) for l in labels))[shard::num_shards]


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


# ----------------------------------------------------------------------------- driver

def _collate(batch):
    embs, labels, names = zip(*batch)
    return torch.stack([torch.as_tensor(e) for e in embs]), torch.as_tensor(labels, dtype=torch.long), list(names)


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
    with a ``labels`` list (``cortex.data.EmbeddingDataset``; items may carry ``(256,)`` token ids instead,
    which its ``lookup`` turns into embeddings on ``device``); codebook ``(n_codes, 256)`` gives the
    baseline of integrated gradients / occlusion (mean codebook vector; zeros when None). run_info: extra
    identity of the run for ``tis_config.json`` (checkpoint hash, model, data; see the module docstring);
    net: ``(experiment, model_id)`` for ``--fast``'s bf16 allow-list. ``overwrite``: delete label files of
    another run instead of refusing. See the module docstring for the files and the integrity rules.
    Returns ``{"labels", "scored", "skipped", "files", "busy", "run_id", "copies_per_pass", "fast_agreement"}``.
    """

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
    writers = hold_writers(out_dir, key, run_id, overwrite)  # released by writer.close()
    try:
        if not overwrite:  # refuse before anything is written: another tis_config.json first, then label files
            claim_config(out_dir, key, run_id, overwrite=False, write=False)
            check_label_files(out_dir, mine, key, run_id, overwrite=False)
        claim_config(out_dir, key, run_id, overwrite)
        if overwrite:
            check_label_files(out_dir, mine, key, run_id, overwrite=True)
            remove_foreign_labels(out_dir, set(labels_of))
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

    writer = LabelWriter(out_dir, key, run_id, resume, {l: [name_of(i) for i in by_label[l]] for l in mine},
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
