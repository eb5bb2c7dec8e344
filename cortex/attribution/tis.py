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
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..cli import env_int, make_parser, nonneg_float, nonneg_int, positive_float, positive_int
from ..data.formats import EmbeddingDataset, load_codebook, resolve_num_classes, split_csv
from ..iem.checkpoints import load_iem
from ..paths import ExperimentPaths
from ..provenance import check_checkpoint
from ..utils import CortexError, file_sha256, get_device, require_file, save_run_args, seed_everything
from .attributions import ATTRIBUTIONS, NOISE_SCOPES
from .performance import prepare_fast, top_overlap
from .scorer import TISConfig, TISScorer, resolve_copies
from .store import FORMAT_VERSION, LabelWriter, open_run, run_id_of, tis_file


# ----------------------------------------------------------------------------- shards and near-chance IEMs

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
    exact = model.to(device).eval()
    run_model, fast_info = exact, False
    if config.fast:
        run_model, fast_info = prepare_fast(exact, device, net)
        print(f"--fast: {fast_info['bn_folds']} BatchNorms folded, channels-last, bf16 autocast "
              f"{'on' if fast_info['bf16'] else 'off'}")
    key = run_key(config, device, batch_size, codebook, fast_info, run_info)
    run_id = run_id_of(key)
    labels_of = [int(l) for l in dataset.labels]
    mine = shard_labels(labels_of, shard, num_shards)
    copies = resolve_copies(config, run_model, device, getattr(dataset, "emb_shape", (256, 16, 16)))
    scorer = TISScorer(run_model, config, device, codebook, copies)
    writers = open_run(out_dir, key, run_id, mine, set(labels_of), overwrite)  # released by writer.close()
    keep = set(mine)
    by_label: dict[int, list[int]] = defaultdict(list)  # this shard's labels -> their dataset indices, in order
    for i, l in enumerate(labels_of):
        if l in keep:
            by_label[l].append(i)

    def name_of(i):
        return dataset.records[i].filename if hasattr(dataset, "records") else dataset[i][2]

    writer = LabelWriter(out_dir, key, run_id, resume, {l: [name_of(i) for i in by_label[l]] for l in mine},
                         writers_fd=writers)
    batches = _Batches(dataset, batch_size, num_workers, device)
    pipe = _ScoreWriter(scorer, writer, out_dir, exact if config.fast else None)
    desc = f"TIS {config.attribution} shard {shard}/{num_shards}"
    try:
        if scorer.authors:
            _score_in_split_order(batches, scorer, writer, pipe, keep, desc, progress)
        else:
            _score_by_label(batches, scorer, writer, pipe, mine, by_label, name_of, desc, progress)
        pipe.flush()
    except BaseException:
        with contextlib.suppress(Exception):  # keep the rows already computed (resume starts after them)
            pipe.flush()
        raise
    finally:
        writer.close()
    if writer.busy:
        print(f"warning: {len(writer.busy)} labels were skipped because another process holds them: "
              f"{writer.busy[:20]}{' ...' if len(writer.busy) > 20 else ''}. Rerun with --resume after it ends.")
    return {"labels": mine, "scored": writer.scored, "skipped": writer.skipped, "busy": writer.busy,
            "files": [str(tis_file(out_dir, l)) for l in mine], "run_id": run_id, "copies_per_pass": copies,
            "fast_agreement": pipe.agreement}


def run_key(config: TISConfig, device: torch.device, batch_size: int, codebook, fast_info, run_info) -> dict:
    """Every setting that changes the scores: ``tis_config.json`` without its ``run_id`` (the store's docstring)."""
    attr = ATTRIBUTIONS[config.attribution]
    key = {"format": FORMAT_VERSION, **config.score_key(), "fast": fast_info, **(run_info or {})}
    if attr.uses_baseline:  # the baseline changes the scores: part of the config
        key["baseline"] = "zeros" if codebook is None else "codebook mean, sha1 " + hashlib.sha1(
            np.ascontiguousarray(codebook, dtype=np.float32).tobytes()).hexdigest()[:16]
    if attr.stochastic and config.noise_scope == "sample":
        key["noise_device"] = device.type
    if attr.stochastic and config.noise_scope in ("batch", "authors"):
        key["batch_size"] = int(batch_size)
    if config.noise_scope == "authors":
        key["order"] = "split CSV order, batches across labels"
    return key


def _collate(batch):
    embs, labels, names = zip(*batch)
    return torch.stack([torch.as_tensor(e) for e in embs]), torch.as_tensor(labels, dtype=torch.long), list(names)


class _Batches:
    """A dataset's batches on the scoring device: ``on_device`` gives ``(emb (B, 256, 16, 16), target (B,),
    labels as a host list)``; ids ``(B, 256)`` become embeddings there (the dataset's ``lookup``)."""

    def __init__(self, dataset, batch_size: int, num_workers: int, device: torch.device):
        self.dataset, self.batch_size, self.num_workers, self.device = dataset, batch_size, num_workers, device
        self.lookup = getattr(dataset, "lookup", None)

    def loader(self, ds=None) -> DataLoader:
        return DataLoader(self.dataset if ds is None else ds, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=_collate)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        # pinned + non_blocking: a plain host->GPU copy would wait for the previous batch's queued work
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def on_device(self, emb, lab):
        labs = lab.tolist()
        emb, lab = self.to_device(emb), self.to_device(lab)
        return (self.lookup(emb) if self.lookup is not None else emb), lab, labs


class _ScoreWriter:
    """One batch in flight: its scores are copied to the host asynchronously and its rows written only after the
    next batch has been queued, so that on a GPU the CSV writing (and data loading) of one batch overlaps the
    forward+backward of the next. Same rows, same order, same bytes; ``flush`` writes the batch in flight (also
    after an error: a resumed run starts after it). ``exact``: with ``--fast``, the exact model, compared with the
    fast one on the first batch (``agreement``)."""

    def __init__(self, scorer: TISScorer, writer: LabelWriter, out_dir: Path, exact=None):
        self.scorer, self.writer, self.out_dir, self.exact = scorer, writer, out_dir, exact
        self.pending: list[tuple] = []
        self.agreement: dict = {}

    def add(self, emb, lab, labs, names, noise, rows) -> None:
        """Queue a batch's scores; write the previous batch's rows. labs: the labels as a host list."""
        s = self.scorer.score(emb, lab, noise)
        if self.exact is not None and not self.agreement:
            self._compare(s, emb, lab, noise)
        s, ready = s.detach(), None
        if s.device.type == "cuda":
            host = torch.empty(s.shape, dtype=s.dtype, pin_memory=True)
            host.copy_(s, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            s = host
        self.flush()
        self.pending.append((s, ready, labs, names, rows))

    def _compare(self, s, emb, lab, noise) -> None:
        ref = self.scorer.score(emb, lab, noise, model=self.exact)
        k = min(20, ref.shape[1])
        self.agreement.update(max_abs_diff=(s.double() - ref.double()).abs().max().item(),
                              max_abs_score=ref.abs().max().item(),
                              top20_overlap=top_overlap(s.float(), ref.float(), k))
        print(f"--fast vs exact on the first batch: max |diff| {self.agreement['max_abs_diff']:.3g} (max |score| "
              f"{self.agreement['max_abs_score']:.3g}), top-{k} position overlap {self.agreement['top20_overlap']:.4f}")

    def flush(self) -> None:
        """Write the rows of the batch in flight (waiting for its scores to reach the host)."""
        while self.pending:
            s, ready, labs, names, rows = self.pending.pop(0)
            if ready is not None:
                ready.synchronize()
            s = s.cpu()
            s = (s.double() if self.scorer.authors else s.float()).numpy()  # (B, 256)
            for j in rows:
                if not np.isfinite(s[j]).all():
                    raise CortexError(f"non-finite TIS for image {names[j]} (label {labs[j]}, file "
                                      f"{tis_file(self.out_dir, labs[j])}): the IEM or the embedding {names[j]} "
                                      f"produces NaN/Inf gradients; check the checkpoint and this embedding")
                self.writer.write(labs[j], names[j], s[j])


def _score_in_split_order(batches: _Batches, scorer: TISScorer, writer: LabelWriter, pipe: _ScoreWriter, keep: set,
                          desc: str, progress: bool) -> None:
    """The authors' loop: every batch of the split in order, noise drawn for each (kept in step); only the rows of
    this shard's labels still to score are written."""
    opened: dict[int, set[str] | None] = {}
    it = iter(batches.loader())  # created before seeding: the iterator itself draws from the global RNG
    scorer.start()
    for emb, lab, names in tqdm(it, total=len(it), desc=desc, unit="batch", disable=not progress):
        emb, lab, labs = batches.on_device(emb, lab)
        noise = scorer.noise(emb, names)  # (S, B, 256, 16, 16)
        rows = []
        for j, (name, l) in enumerate(zip(names, labs)):
            if l in keep:
                if l not in opened:
                    opened[l] = writer.open(l)
                if opened[l] and name in opened[l]:
                    rows.append(j)
        if rows:
            pipe.add(emb, lab, labs, names, noise, rows)


def _score_by_label(batches: _Batches, scorer: TISScorer, writer: LabelWriter, pipe: _ScoreWriter, mine: list[int],
                    by_label: dict, name_of, desc: str, progress: bool) -> None:
    """Label by label (a batch holds consecutive images of one label): the images still to score of each."""
    bar = tqdm(total=sum(len(v) for v in by_label.values()), desc=desc, unit="img", disable=not progress)
    for l in mine:
        rest = writer.open(l)
        idx = [i for i in by_label[l] if rest and name_of(i) in rest]
        bar.update(len(by_label[l]) - len(idx))
        for emb, lab, names in batches.loader(Subset(batches.dataset, idx)):
            emb, lab, labs = batches.on_device(emb, lab)
            pipe.add(emb, lab, labs, names, scorer.noise(emb, names), range(len(names)))
            bar.update(len(names))
    bar.close()


# ----------------------------------------------------------------------------- TIS_computation.py


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
