"""IEM training on PyTorch Lightning (one GPU, DDP, SLURM nodes: same script) and top-k testing.

Outputs are the authors' formats: plain ``state_dict`` files ``model.pth`` (every epoch) and
``best_model.pth`` (lowest validation loss), and the training-log lines
``Epoch [e/E], Training Loss: x.xxxx`` / ``Validation Loss: x.xxxx, Accuracy: yy.yy%``.
Lightning's own resumable checkpoint is ``<model_dir>/lightning/last.ckpt``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import EmbeddingDataset, resolve_num_classes
from .models import build_model, load_iem, save_iem
from .utils import CortexError, atomic_write, save_run_args

# experiment -> (paper defaults, default number of classes)
TRAIN_DEFAULTS = {
    "vqgan": dict(epochs=80, batch_size=512, lr=1e-3, weight_decay=1e-4, step_size=20, gamma=0.1),
    "dalle": dict(epochs=10, batch_size=256, lr=1e-3, weight_decay=1e-4, step_size=5, gamma=0.1),
}
DEFAULT_CLASSES = {"vqgan": 1000, "dalle": 2}


def train_parser(experiment: str) -> argparse.ArgumentParser:
    """Optimisation and distribution flags (defaults: the paper's for ``experiment``)."""
    d = TRAIN_DEFAULTS[experiment]
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="epochs (default: %(default)s)")
    g.add_argument("--batch_size", type=int, default=d["batch_size"], help="batch size per device (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (default: %(default)s)")
    g.add_argument("--weight_decay", type=float, default=d["weight_decay"], help="Adam weight decay (default: %(default)s)")
    g.add_argument("--step_size", type=int, default=d["step_size"], help="StepLR step in epochs (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=d["gamma"], help="StepLR factor (default: %(default)s)")
    g.add_argument("--resume", nargs="?", const="last", default=None,
                   help="resume from <model_dir>/lightning/last.ckpt (no value) or from the given .ckpt; "
                        "'--resume auto': resume if that checkpoint exists, else start fresh (SLURM requeue)")
    g = p.add_argument_group("distribution (PyTorch Lightning)")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: %(default)s)")
    g.add_argument("--devices", default="1", help="devices per node, e.g. 1, 4 or auto (default: %(default)s)")
    g.add_argument("--num_nodes", type=int, default=1, help="nodes, e.g. SLURM --nodes (default: %(default)s)")
    g.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ... (default: %(default)s)")
    g.add_argument("--precision", default="32-true", help="32-true, 16-mixed, bf16-mixed (default: %(default)s)")
    return p


# ----------------------------------------------------------------------------- Lightning parts

def _lightning():
    import pytorch_lightning as pl

    return pl


def make_module(model, args, lookup=None, shuffle_generator: torch.Generator | None = None):
    """lookup: ``cortex.data.TokenLookup`` turning id batches (compact layout) into embeddings on the device.
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


def make_paper_outputs_callback(model_dir: Path, log_path: Path, epochs: int, meta: dict):
    """Writes the authors' files after every epoch (rank zero only)."""
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
            elif not self.resumed and trainer.is_global_zero:
                # a fresh run owns a new log: two runs started in the same minute (e.g. two SLURM jobs
                # training different models) must not append to one training_log_<minute>.txt
                self.log_path = claim_new_file(self.log_path)

        def on_train_epoch_end(self, trainer, module):  # runs after this epoch's validation
            if trainer.sanity_checking or not trainer.is_global_zero:
                return
            m = trainer.callback_metrics
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


def claim_new_file(path: Path) -> Path:
    """Create ``path`` (else ``<stem>_2<suffix>``, ``_3``, ...) atomically (O_EXCL) and return the created path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        p = path if i == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")
        try:
            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return p
        except FileExistsError:
            continue
    raise CortexError(f"{path.parent}: could not create a new training log next to {path.name}")


def trim_training_log(path: Path, epochs_done: int) -> None:
    """Drop the lines of epochs after ``epochs_done`` (and a torn last line) from a training log."""
    lines = Path(path).read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        m = re.match(r"Epoch \[(\d+)/\d+\]", line)
        if (m and int(m.group(1)) > epochs_done) or not line.endswith("\n"):
            break
        keep.append(line)
    if len(keep) < len(lines):
        print(f"{path}: resuming after epoch {epochs_done}; dropped {len(lines) - len(keep)} later line(s)")
        with atomic_write(path) as f:
            f.writelines(keep)


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
        raise CortexError("--gpu/--device cuda/--accelerator gpu given, but CUDA is not available; use --device cpu")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return acc, devices


def train_iem(args, paths, experiment: str) -> dict:
    """Train ClassificationNet{args.model} on paths.data_dir; returns {'best': path, 'last': path, 'log': path}."""
    pl = _lightning()
    pl.seed_everything(args.seed, workers=True, verbose=False)
    num_classes = resolve_num_classes(args.num_classes, paths.data_dir, DEFAULT_CLASSES[experiment])
    train_set = EmbeddingDataset(paths.data_dir, "train", num_classes, layout=args.data_layout, return_ids=True)
    val_set = EmbeddingDataset(paths.data_dir, "validation", num_classes, layout=args.data_layout, return_ids=True)
    width = args.width or 512
    model = build_model(experiment, args.model, num_classes, width=width, depth=args.depth)
    meta = dict(experiment=experiment, model_id=args.model, num_classes=num_classes, width=width, depth=args.depth)

    model_dir = paths.model_dir(args.model)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, model_dir, "train_args.json")
    log_path = paths.log_dir / f"training_log_{time.strftime('%Y%m%d_%H%M')}.txt"
    ckpt_path = None
    if args.resume == "auto":  # same command line for a first run and a requeued one (SLURM)
        auto = model_dir / "lightning" / "last.ckpt"
        print(f"--resume auto: {'resuming from ' + str(auto) if auto.exists() else 'no checkpoint yet, starting fresh'}")
        args.resume = "last" if auto.exists() else None
    if args.resume:
        ckpt_path = model_dir / "lightning" / "last.ckpt" if args.resume == "last" else Path(args.resume)
        if not ckpt_path.exists():
            raise CortexError(f"--resume: checkpoint not found: {ckpt_path}; train without --resume first")
        logs = sorted(paths.log_dir.glob("training_log_*.txt"))
        log_path = logs[-1] if logs else log_path  # continue the same log

    # persistent_workers stays off: a resumed run must create its loader iterators once per epoch, as an
    # uninterrupted run does, because each creation draws worker seeds from the shuffle generator (train) and
    # from the global RNG that dropout uses (val); with persistent workers a resumed run would draw once more.
    loader = dict(batch_size=args.batch_size, num_workers=args.num_workers, persistent_workers=False)
    g = torch.Generator().manual_seed(args.seed)  # shuffle order; its state travels in last.ckpt
    train_loader = DataLoader(train_set, shuffle=True, generator=g, drop_last=False, **loader)
    val_loader = DataLoader(val_set, shuffle=False, **loader)

    from pytorch_lightning.callbacks import ModelCheckpoint

    accelerator, devices = _accelerator_and_devices(args)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, logger=False, default_root_dir=str(model_dir),
        num_sanity_val_steps=0, deterministic="warn",
        callbacks=[
            make_paper_outputs_callback(model_dir, log_path, args.epochs, meta),
            ModelCheckpoint(dirpath=model_dir / "lightning", filename="last", save_top_k=1, monitor=None,
                            enable_version_counter=False),
        ],
    )
    trainer.fit(make_module(model, args, train_set.lookup, shuffle_generator=g), train_loader, val_loader,
                ckpt_path=str(ckpt_path) if ckpt_path else None)
    return {"best": model_dir / "best_model.pth", "last": model_dir / "model.pth", "log": log_path}


# ----------------------------------------------------------------------------- testing

@torch.no_grad()
def topk_accuracy(model, loader, device, ks=(1, 3, 5, 10), lookup=None) -> dict:
    """Top-k accuracy in percent; k larger than the number of classes counts every image correct.

    lookup: turns the loader's id batches (compact layout) into embeddings on ``device``.
    """
    model.eval().to(device)
    correct = {k: 0 for k in ks}
    n = 0
    for x, y, _ in tqdm(loader, desc="testing", unit="batch"):
        x = x.to(device)
        logits = model(lookup(x) if lookup is not None else x)  # (B, C)
        y = y.to(device)
        top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
        for k in ks:
            correct[k] += (top[:, :k] == y[:, None]).any(1).sum().item()
        n += len(y)
    if n == 0:
        raise CortexError("the test split is empty")
    return {k: 100.0 * c / n for k, c in correct.items()}


def write_csv_row(path, header: list[str], row: list) -> None:
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(row)


def test_iem(args, paths, experiment: str, ks=(1, 3, 5, 10)) -> dict:
    """Evaluate best_model.pth on the test split and write testing_results.csv."""
    from .utils import get_device

    device = get_device(args.device, args.gpu)
    model = load_iem(paths.best_ckpt(args.model), experiment, args.model, num_classes=args.num_classes,
                     width=args.width, depth=args.depth)
    num_classes = model_num_classes(model)
    test_set = EmbeddingDataset(paths.data_dir, "test", num_classes, layout=args.data_layout, return_ids=True)
    loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    acc = topk_accuracy(model, loader, device, ks, lookup=test_set.lookup)
    return acc


def model_num_classes(model) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features
