"""IEM training on PyTorch Lightning (one GPU, DDP, SLURM nodes: same script).

Outputs are the authors' formats: plain ``state_dict`` files ``model.pth`` (every epoch) and
``best_model.pth`` (lowest validation loss), and the training-log lines
``Epoch [e/E], Training Loss: x.xxxx`` / ``Validation Loss: x.xxxx, Accuracy: yy.yy%``.
Lightning's own resumable checkpoint is ``<model_dir>/lightning/last.ckpt``, written through a temp file and
renamed (``AtomicCheckpointIO``); the one before it is kept as ``last.prev.ckpt`` and used when ``last.ckpt``
cannot be loaded (disk full during a save, a kill). Training curves: Lightning's ``CSVLogger`` writes
``<model_dir>/lightning/metrics.csv`` (TensorBoard events in ``lightning/tensorboard/`` when tensorboard is
installed) and ``run_files.plot_loss_curves`` draws ``<model_dir>/loss_curves.png`` from the training log after every epoch.
"""
from __future__ import annotations

import argparse
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cortex.cli import make_parser, nonneg_float, positive_float, positive_int
from cortex.data.formats import EmbeddingDataset, dataset_hashes, resolve_num_classes
from cortex.iem.checkpoints import UNFINISHED_MARKER, save_iem
from cortex.iem.registry import DEFAULT_NUM_CLASSES, build_model
from cortex.iem.run_files import (capped_batch_size, check_resume_settings, claim_new_file, make_atomic_checkpoint_io,
                                  make_loggers, mark_unfinished, plot_loss_curves, prepare_fresh_run,
                                  resolve_resume_checkpoint, trim_metrics_csv, trim_training_log)
from cortex.utils import CortexError, Interrupted, folder_writer_lock, save_run_args, warn_no_cuda

# experiment -> the paper's optimisation settings
TRAIN_DEFAULTS = {
    "vqgan": dict(epochs=80, batch_size=512, lr=1e-3, weight_decay=1e-4, step_size=20, gamma=0.1),
    "dalle": dict(epochs=10, batch_size=256, lr=1e-3, weight_decay=1e-4, step_size=5, gamma=0.1),
}


def train_parser(experiment: str) -> argparse.ArgumentParser:
    """Optimisation and distribution flags (defaults: the paper's for ``experiment``)."""
    d = TRAIN_DEFAULTS[experiment]
    p = make_parser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=d["epochs"], help="epochs (default: %(default)s)")
    g.add_argument("--batch_size", type=positive_int, default=d["batch_size"], help="batch size per device (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=d["lr"], help="Adam learning rate (default: %(default)s)")
    g.add_argument("--weight_decay", type=nonneg_float, default=d["weight_decay"], help="Adam weight decay (default: %(default)s)")
    g.add_argument("--step_size", type=positive_int, default=d["step_size"], help="StepLR step in epochs (default: %(default)s)")
    g.add_argument("--gamma", type=positive_float, default=d["gamma"], help="StepLR factor (default: %(default)s)")
    g.add_argument("--resume", nargs="?", const="last", default=None,
                   help="resume from <model_dir>/lightning/last.ckpt (no value; last.prev.ckpt when last.ckpt is "
                        "unreadable) or from the given .ckpt; '--resume auto': resume if that checkpoint exists, "
                        "else start fresh (SLURM requeue). The run's settings (lr, batch size, ...) must be unchanged")
    g.add_argument("--overwrite", action="store_true",
                   help="train from scratch over an already trained ClassificationNet{m} (its model.pth, "
                        "best_model.pth and Lightning checkpoints are deleted first); without it train.py refuses")
    g = p.add_argument_group("distribution (PyTorch Lightning)")
    g.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto",
                   help="cpu, gpu or auto: the GPU when there is one (default: %(default)s); gpu on a machine "
                        "without CUDA is an error")
    g.add_argument("--devices", default="1", help="devices per node, e.g. 1, 4 or auto (default: %(default)s)")
    g.add_argument("--num_nodes", type=positive_int, default=1, help="nodes, e.g. SLURM --nodes (default: %(default)s)")
    g.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ... (default: %(default)s)")
    g.add_argument("--precision", default="32-true", help="32-true, 16-mixed, bf16-mixed (default: %(default)s)")
    return p


# ----------------------------------------------------------------------------- Lightning parts

def _lightning():
    import pytorch_lightning as pl  # Lightning takes seconds to import; only training needs it

    return pl


def make_module(model, args, lookup=None, shuffle_generator: torch.Generator | None = None):
    """lookup: ``cortex.data.formats.TokenLookup`` turning id batches (compact layout) into embeddings on the device.
    shuffle_generator: the train loader's generator; its state and the dropout RNG travel in last.ckpt, so a
    resumed run draws the same batches and dropout masks as an uninterrupted one (bit-exact weights)."""
    pl = _lightning()

    class IEMModule(pl.LightningModule):
        """Cross-entropy training of an IEM; Adam + StepLR as the paper."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.lookup = lookup
            self.shuffle_generator = shuffle_generator

        def forward(self, x):  # (B, 256, 16, 16) -> (B, C)
            return self.model(x)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            # compact layout: the batch arrived as token ids (B, 256); gather the embedding here, on the device
            x, y, names = batch
            if self.lookup is not None:
                x = self.lookup(x, dtype=next(self.model.parameters()).dtype)  # (B, 256, 16, 16)
            return x, y, names

        def training_step(self, batch, batch_idx):
            x, y, names = batch
            loss = F.cross_entropy(self.model(x), y)
            own_bad = not bool(torch.isfinite(loss))
            world = self.trainer.world_size
            # DDP: every rank must skip the same batches (Lightning refuses ``return None`` there, and a
            # rank that skipped alone would leave the others waiting in the gradient all-reduce).
            bad = self.trainer.strategy.reduce_boolean_decision(own_bad, all=False) if world > 1 else own_bad
            self._skip_step = bad
            if bad:
                why = f"loss is {loss.item()} (files {names[0]} ...)" if own_bad else "non-finite loss on another rank"
                print(f"\nskipping batch {batch_idx}: {why}")
                if world == 1:
                    return None
                # a zero loss reaching every parameter keeps DDP's all-reduce in step; the update itself is
                # dropped in on_before_optimizer_step, so the batch changes nothing (as on one process)
                return sum(p.sum() for p in self.model.parameters()) * 0.0
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
            return loss

        def on_before_optimizer_step(self, optimizer):
            if getattr(self, "_skip_step", False):
                optimizer.zero_grad(set_to_none=True)  # Adam skips parameters without a gradient

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            logits = self.model(x)
            self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=len(y))
            acc = (logits.argmax(1) == y).float().mean() * 100
            self.log("val_acc", acc, on_epoch=True, sync_dist=True, batch_size=len(y))

        def on_save_checkpoint(self, checkpoint):
            # saved after the epoch's validation: the states the next epoch of an uninterrupted run starts from
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()  # this rank's current device (set by Lightning)
            if self.shuffle_generator is not None:
                rng["shuffle"] = self.shuffle_generator.get_state()
            checkpoint["cortex_rng"] = rng

        def on_load_checkpoint(self, checkpoint):
            rng = checkpoint.get("cortex_rng")
            if rng is None:  # a checkpoint from before the RNG states were saved: resume, not bit-exact
                return
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                # runs before Lightning moves the model (self.device is still cpu): the current device is the
                # rank's own, so no device argument
                torch.cuda.set_rng_state(rng["cuda"])
            if self.shuffle_generator is not None and "shuffle" in rng:
                self.shuffle_generator.set_state(rng["shuffle"])

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.step_size, gamma=args.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    return IEMModule()


def make_paper_outputs_callback(model_dir: Path, log_path: Path, epochs: int, meta: dict,
                                curves_path: Path | None = None, metrics_path: Path | None = None):
    """Writes the authors' files after every epoch (rank zero only), and ``curves_path`` (loss_curves.png) from
    the training log. metrics_path: the CSVLogger's metrics.csv, trimmed like the log when a run resumes."""
    pl = _lightning()

    class PaperOutputs(pl.Callback):
        def __init__(self):
            self.best = math.inf
            self.log_path = Path(log_path)
            self.resumed = False

        def on_train_start(self, trainer, module):
            # Resumed (after a kill or a requeue): continue the run's own log, without the lines of epochs
            # the checkpoint does not contain (written after the last checkpoint, before the kill).
            if self.resumed and trainer.is_global_zero and self.log_path.exists():
                trim_training_log(self.log_path, trainer.current_epoch)
                if metrics_path is not None:
                    trim_metrics_csv(metrics_path, trainer.current_epoch)
            elif not self.resumed and trainer.is_global_zero:
                # a fresh run owns a new log: two runs started in the same minute (e.g. two SLURM jobs
                # training different models) must not append to one training_log_<minute>.txt
                self.log_path = claim_new_file(self.log_path)

        def on_train_epoch_end(self, trainer, module):  # runs after this epoch's validation
            if trainer.sanity_checking or not trainer.is_global_zero:
                return
            m = trainer.callback_metrics
            if "train_loss" not in m:  # no batch had a finite loss (every one skipped): the weights never changed
                raise CortexError(f"epoch {trainer.current_epoch + 1}: the loss of every training batch was NaN or "
                                  f"Inf, so nothing was learnt; check the dataset's embeddings (codebook.npy or the "
                                  f"per-image .npy files) for NaN/Inf values, or lower --lr")
            tr = float(m.get("train_loss", float("nan")))
            vl = float(m.get("val_loss", float("nan")))
            va = float(m.get("val_acc", float("nan")))
            e = trainer.current_epoch + 1
            lines = [f"Epoch [{e}/{epochs}], Training Loss: {tr:.4f}", f"Validation Loss: {vl:.4f}, Accuracy: {va:.2f}%"]
            print("\n" + "\n".join(lines))
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write("\n".join(lines) + "\n")
            state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
            save_iem(state, model_dir / "model.pth", meta)
            if vl < self.best:
                self.best = vl
                save_iem(state, model_dir / "best_model.pth", meta)
                print(f"best validation loss so far: saved {model_dir / 'best_model.pth'}")
            mark_unfinished(model_dir, epochs, e)
            if curves_path is not None:
                try:  # a figure must never stop a long training run
                    plot_loss_curves(self.log_path, curves_path, title=f"{model_dir.name} ({self.log_path.name})")
                except Exception as err:  # noqa: BLE001
                    print(f"warning: could not draw {curves_path}: {err}")

        def state_dict(self):
            return {"best": self.best, "log_name": self.log_path.name}

        def load_state_dict(self, state):
            self.best = state.get("best", math.inf)
            self.resumed = True
            # the run's own log (by name, inside this run's --log_dir), not merely the newest one in logs/
            own = self.log_path.parent / state.get("log_name", "")
            if state.get("log_name") and own.exists():
                self.log_path = own

    return PaperOutputs()


def _accelerator_and_devices(args):
    """--device/--gpu (seed flags) map onto Lightning's accelerator/devices."""
    acc, devices = args.accelerator, args.devices
    if getattr(args, "device", None):
        if args.device.startswith("cuda"):
            acc = "gpu"
            idx = args.device.partition(":")[2]
            devices = [int(idx)] if idx else devices
        elif args.device == "cpu":
            acc = "cpu"
    elif getattr(args, "gpu", None) is not None and args.gpu >= 0:
        acc, devices = "gpu", [args.gpu]
    if acc == "gpu" and not torch.cuda.is_available():
        if args.accelerator == "gpu":  # asked for explicitly: Lightning's own rule, an error
            raise CortexError("--accelerator gpu: CUDA is not available on this machine; use --accelerator auto "
                              "(the GPU when there is one, else the CPU) or --accelerator cpu")
        # --gpu/--device (the seed's flags): one warning line, then the CPU (as get_device)
        warn_no_cuda(f"--device {args.device}" if getattr(args, "device", None) else f"--gpu {args.gpu}")
        acc, devices = "cpu", 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return acc, devices


def train_iem(args, paths, experiment: str) -> dict:
    """Train ClassificationNet{args.model} on paths.data_dir.

    Returns ``{'best', 'last', 'log', 'curves', 'metrics'}`` paths. A fresh run refuses to replace a trained IEM
    without ``--overwrite``; a resumed one refuses other training settings (``check_resume_settings``).
    """

    pl = _lightning()
    if args.resume and getattr(args, "overwrite", False):
        raise CortexError("--resume and --overwrite contradict each other: --resume continues the run in the "
                          "checkpoint folder, --overwrite starts it again from scratch; pass one")
    accelerator, devices = _accelerator_and_devices(args)  # before anything is written: --accelerator gpu w/o CUDA
    pl.seed_everything(args.seed, workers=True, verbose=False)
    num_classes = resolve_num_classes(args.num_classes, paths.data_dir, DEFAULT_NUM_CLASSES[experiment])
    train_set = EmbeddingDataset(paths.data_dir, "train", num_classes, layout=args.data_layout, return_ids=True)
    val_set = EmbeddingDataset(paths.data_dir, "validation", num_classes, layout=args.data_layout, return_ids=True)
    args.batch_size = capped_batch_size(args.batch_size, len(train_set), experiment)
    width = args.width or 512
    model = build_model(experiment, args.model, num_classes, width=width, depth=args.depth,
                        code_dim=train_set.code_dim, grid=train_set.grid)  # the dataset's (D, h, w) embeddings
    meta = dict(experiment=experiment, model_id=args.model, num_classes=num_classes, width=width, depth=args.depth,
                code_dim=train_set.code_dim, grid=list(train_set.grid),  # recorded only when not 256 / 16x16
                dataset=dataset_hashes(paths.data_dir))  # the data it is trained on (checked by cortex.provenance)

    model_dir = paths.model_dir(args.model)
    model_dir.mkdir(parents=True, exist_ok=True)
    # the data checks above passed; from here on this process owns model_dir (a second train.py is refused)
    with folder_writer_lock(model_dir, f"a training run of ClassificationNet{args.model}",
                            "wait for it to end, or train into another --checkpoint_dir"):
        return _fit_iem(args, paths, model, meta, train_set, val_set, model_dir, accelerator, devices)


def _fit_iem(args, paths, model, meta: dict, train_set, val_set, model_dir: Path, accelerator, devices) -> dict:
    """train_iem's run, under model_dir's writer lock: resume or replace, fit, mark finished."""
    pl = _lightning()
    verbose = bool(getattr(args, "verbose", False))  # Lightning's INFO lines: cortex.cli.quiet_third_party
    log_path = paths.log_dir / f"training_log_{time.strftime('%Y%m%d_%H%M')}.txt"
    ckpt_path = resolve_resume_checkpoint(args, model_dir)
    if ckpt_path is None:  # the marker goes down before the old IEM is deleted
        prepare_fresh_run(model_dir, getattr(args, "overwrite", False), args.model, epochs=args.epochs)
    else:
        check_resume_settings(model_dir / "train_args.json", args)
    mark_unfinished(model_dir, args.epochs, None)
    if ckpt_path is not None:
        logs = sorted(paths.log_dir.glob("training_log_*.txt"))
        log_path = logs[-1] if logs else log_path  # an old checkpoint without its log's name: the newest log
    args.resume = str(ckpt_path) if ckpt_path else None  # what this run actually resumed from, in train_args.json
    save_run_args(args, model_dir, "train_args.json")

    # persistent_workers stays off: a resumed run must create its loader iterators once per epoch, as an
    # uninterrupted run does, because each creation draws worker seeds from the shuffle generator (train) and
    # from the global RNG that dropout uses (val); with persistent workers a resumed run would draw once more.
    loader = dict(batch_size=args.batch_size, num_workers=args.num_workers, persistent_workers=False)
    g = torch.Generator().manual_seed(args.seed)  # shuffle order; its state travels in last.ckpt
    # a last batch of one image would stop BatchNorm1d (training mode needs two values per channel): drop it
    drop_last = len(train_set) % args.batch_size == 1
    train_loader = DataLoader(train_set, shuffle=True, generator=g, drop_last=drop_last, **loader)
    val_loader = DataLoader(val_set, shuffle=False, **loader)

    from pytorch_lightning.callbacks import ModelCheckpoint

    lightning_dir = model_dir / "lightning"
    curves, metrics = paths.loss_curves(args.model), paths.metrics_csv(args.model)
    outputs = make_paper_outputs_callback(model_dir, log_path, args.epochs, meta, curves, metrics)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, default_root_dir=str(model_dir),
        logger=make_loggers(lightning_dir, fresh=ckpt_path is None), log_every_n_steps=1,
        enable_model_summary=verbose, num_sanity_val_steps=0, deterministic="warn",
        enable_progress_bar=not getattr(args, "quiet", False),
        plugins=[make_atomic_checkpoint_io()],
        callbacks=[
            outputs,
            ModelCheckpoint(dirpath=lightning_dir, filename="last", save_top_k=1, monitor=None,
                            enable_version_counter=False),
        ],
    )
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(make_module(model, args, train_set.lookup, shuffle_generator=g), train_loader, val_loader,
                    ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SIGTERMException:  # Lightning's own stop (a DDP rank told by rank 0): a SystemExit with status 0
        raise Interrupted(signal.SIGTERM) from None
    if trainer.interrupted or trainer.current_epoch < args.epochs:
        raise CortexError(f"training stopped after {trainer.current_epoch} of {args.epochs} epochs; continue it "
                          f"with --resume")
    if trainer.is_global_zero:
        (model_dir / UNFINISHED_MARKER).unlink(missing_ok=True)  # every epoch saved: the IEM is finished
    return {"best": model_dir / "best_model.pth", "last": model_dir / "model.pth", "log": outputs.log_path,
            "curves": curves, "metrics": metrics}


