"""IEM training on PyTorch Lightning (one GPU, DDP, SLURM nodes: same script) and top-k testing.

Outputs are the authors' formats: plain ``state_dict`` files ``model.pth`` (every epoch) and
``best_model.pth`` (lowest validation loss), and the training-log lines
``Epoch [e/E], Training Loss: x.xxxx`` / ``Validation Loss: x.xxxx, Accuracy: yy.yy%``.
Lightning's own resumable checkpoint is ``<model_dir>/lightning/last.ckpt``, written through a temp file and
renamed (``AtomicCheckpointIO``); the one before it is kept as ``last.prev.ckpt`` and used when ``last.ckpt``
cannot be loaded (disk full during a save, a kill). Training curves: Lightning's ``CSVLogger`` writes
``<model_dir>/lightning/metrics.csv`` (TensorBoard events in ``lightning/tensorboard/`` when tensorboard is
installed) and ``plot_loss_curves`` draws ``<model_dir>/loss_curves.png`` from the training log after every epoch.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cortex.data.formats import EmbeddingDataset, resolve_num_classes
from cortex.iem.checkpoints import UNFINISHED_MARKER, load_iem, save_iem
from cortex.iem.registry import build_model
from cortex.cli import make_parser, nonneg_float, positive_float, positive_int
from cortex.utils import CortexError, Interrupted, atomic_write, folder_writer_lock, save_run_args, warn_no_cuda

# experiment -> (paper defaults, default number of classes)
TRAIN_DEFAULTS = {
    "vqgan": dict(epochs=80, batch_size=512, lr=1e-3, weight_decay=1e-4, step_size=20, gamma=0.1),
    "dalle": dict(epochs=10, batch_size=256, lr=1e-3, weight_decay=1e-4, step_size=5, gamma=0.1),
}
DEFAULT_CLASSES = {"vqgan": 1000, "dalle": 2}
# train_args.json keys a resumed run must share with the run it continues: they change what is trained. --epochs
# may grow (train longer); seed, devices, workers and the data layout (same tensors) may change.
RESUME_MUST_MATCH = ("model", "num_classes", "width", "depth", "lr", "batch_size", "weight_decay", "step_size",
                     "gamma", "precision")
# what a fresh run replaces in <model_dir> (with --overwrite)
RUN_OUTPUTS = ("model.pth", "best_model.pth", "config.json", "loss_curves.png", "lightning")


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
    import pytorch_lightning as pl

    return pl


# ----------------------------------------------------------------------------- crash-safe checkpoints

def previous_checkpoint(path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``: the checkpoint saved before the current one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_checkpoint_save(checkpoint: dict, path) -> None:
    """``torch.save`` to a temp file beside ``path`` (``utils.atomic_write``, flushed and fsynced), then rename
    it over ``path``.

    A save that fails mid-way (disk full, a kill) leaves ``path`` as it was and removes the temp file. The
    replaced checkpoint becomes ``last.prev.ckpt`` (so a checkpoint that later turns out unreadable still has
    a good predecessor).
    """
    path = Path(path)
    with atomic_write(path, "wb") as f:  # temp file beside path, removed on failure, renamed over path on success
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())  # durable before the previous checkpoint is rotated away
        if path.exists():
            os.replace(path, previous_checkpoint(path))  # a kill right here: last.prev.ckpt is found by resume


def make_atomic_checkpoint_io():
    """Lightning CheckpointIO plugin whose saves go through ``atomic_checkpoint_save``."""
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__} does not take storage_options")
            atomic_checkpoint_save(checkpoint, path)

    return AtomicCheckpointIO()


def checkpoint_problem(path) -> str | None:
    """None when ``path`` loads as a Lightning checkpoint, else why not (truncated, corrupt, not one)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, unpickling error, ...
        return f"{type(e).__name__}: {e}".strip()[:200]
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "not a PyTorch Lightning checkpoint (no state_dict)"
    return None


def resolve_resume_checkpoint(args, model_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from, or None for a fresh run (``--resume auto`` with none yet).

    ``--resume`` / ``--resume auto``: ``<model_dir>/lightning/last.ckpt``; when it does not load (a save cut
    short by a full disk or a kill), the reason is printed and ``last.prev.ckpt`` is used. ``--resume FILE``:
    that file, which must load.
    """
    if not args.resume:
        return None
    if args.resume not in ("last", "auto"):
        path = Path(args.resume)
        if not path.exists():
            raise CortexError(f"--resume: checkpoint not found: {path}; train without --resume first")
        why = checkpoint_problem(path)
        if why:
            raise CortexError(f"--resume {path}: the checkpoint cannot be loaded ({why}); pass another .ckpt")
        return path
    last = model_dir / "lightning" / "last.ckpt"
    tried = []
    for cand in (last, previous_checkpoint(last)):
        if not cand.exists():
            continue
        why = checkpoint_problem(cand)
        if why is None:
            if tried:
                print(f"--resume: {tried[-1][0]} cannot be loaded ({tried[-1][1]}); resuming from the previous "
                      f"checkpoint {cand} instead (one epoch earlier)")
            else:
                print(f"--resume{' auto' if args.resume == 'auto' else ''}: resuming from {cand}")
            return cand
        print(f"warning: {cand} cannot be loaded ({why})")
        tried.append((cand, why))
    if tried:
        raise CortexError(f"--resume: no loadable checkpoint in {last.parent} ({'; '.join(f'{p.name}: {w}' for p, w in tried)}); "
                          f"start over with --overwrite (and without --resume)")
    if args.resume == "auto":  # same command line for a first run and a requeued one (SLURM)
        print(f"--resume auto: no checkpoint in {last.parent} yet, starting fresh")
        return None
    raise CortexError(f"--resume: checkpoint not found: {last}; train without --resume first")


def check_resume_settings(old_args_path: Path, args) -> None:
    """Refuse a resume whose training settings differ from the run it continues (``train_args.json``).

    Lightning restores the optimizer and scheduler from the checkpoint, so a new ``--lr`` would silently not
    apply while train_args.json recorded it. Runs without a train_args.json (older ones) are not checked.
    """
    if not old_args_path.exists():
        return
    try:
        old = json.loads(old_args_path.read_text())
    except (OSError, ValueError) as e:
        raise CortexError(f"{old_args_path}: unreadable ({e}); resume needs the run's recorded settings") from None
    new = json.loads(json.dumps(vars(args), default=str))
    diff = [f"--{k} {old.get(k)} -> {new.get(k)}" for k in RESUME_MUST_MATCH
            if k in old and old.get(k) != new.get(k)]
    if diff:
        raise CortexError(f"--resume continues a run trained with other settings ({old_args_path}): "
                          f"{', '.join(diff)}. Resume with the run's settings, or train anew with --overwrite "
                          f"(without --resume)")


def mark_unfinished(model_dir: Path, epochs: int, epochs_done: int | None) -> None:
    """Write ``<model_dir>/training_unfinished.json`` (``cortex.iem.checkpoints.UNFINISHED_MARKER``): while it exists,
    ``load_iem`` refuses the folder's model.pth / best_model.pth. Rank 0 only; removed when the last epoch is
    saved."""
    from cortex.utils import is_primary_process

    if not is_primary_process():
        return
    info = {"epochs": int(epochs), "epochs_done": epochs_done, "pid": os.getpid(),
            "note": "train.py has not finished this run; continue it with --resume"}
    with atomic_write(model_dir / UNFINISHED_MARKER) as f:
        json.dump(info, f, indent=1)


def prepare_fresh_run(model_dir: Path, overwrite: bool, model_id: int, epochs: int | None = None) -> None:
    """A fresh run must not replace a trained IEM silently: refuse, or with ``--overwrite`` delete its outputs
    (``epochs`` given: after writing the unfinished marker, so a kill mid-way leaves nothing that looks finished)."""
    found = [n for n in RUN_OUTPUTS[:2] + ("lightning/last.ckpt",) if (model_dir / n).exists()]
    if not found:
        return
    if not overwrite:
        raise CortexError(f"{model_dir} already holds a trained ClassificationNet{model_id} ({', '.join(found)}). "
                          f"Pass --overwrite to train it again from scratch (its files are replaced), --resume to "
                          f"continue it, or another --checkpoint_dir")
    print(f"--overwrite: deleting the previous ClassificationNet{model_id} run in {model_dir}")
    if epochs is not None:
        mark_unfinished(model_dir, epochs, None)
    for n in RUN_OUTPUTS:
        p = model_dir / n
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # every DDP rank runs this
        else:
            p.unlink(missing_ok=True)


def capped_batch_size(batch_size: int, n_train: int, experiment: str) -> int:
    """DALL-E-mini: a batch over a tenth of the training set is lowered to ``max(2, n_train // 10)``, with a note.

    The paper's batch 256 suits its thousands of generated images; on a 600-image set it gives 3 steps per
    epoch and the IEM stays at chance for all 10 epochs. VQGAN batches are left as given.
    """
    cap = max(2, n_train // 10)
    if experiment != "dalle" or batch_size <= cap:
        return batch_size
    print(f"note: --batch_size {batch_size} is more than a tenth of the {n_train} training images; using "
          f"{cap} so that an epoch has about 10 optimisation steps (pass --batch_size {cap} or less to silence this)")
    return cap


# ----------------------------------------------------------------------------- training curves

def read_training_log(path) -> dict[str, list[float]]:
    """Per-epoch values of an authors'-format training log: ``{'epoch', 'train_loss', 'val_loss', 'val_acc'}``.

    Lines ``Epoch [e/E], Training Loss: x`` and ``Validation Loss: x, Accuracy: y%``; a later line for the same
    epoch (a resumed run) replaces an earlier one.
    """
    rows: dict[int, dict] = {}
    epoch = None
    for line in Path(path).read_text().splitlines():
        m = re.match(r"Epoch \[(\d+)/\d+\], Training Loss: (\S+)", line)
        if m:
            epoch = int(m.group(1))
            rows[epoch] = {"train_loss": float(m.group(2))}
            continue
        m = re.match(r"Validation Loss: ([^,]+), Accuracy: ([^%]+)%", line)
        if m and epoch in rows:
            rows[epoch].update(val_loss=float(m.group(1)), val_acc=float(m.group(2)))
    epochs = sorted(rows)
    nan = float("nan")
    return {"epoch": epochs, **{k: [rows[e].get(k, nan) for e in epochs] for k in ("train_loss", "val_loss", "val_acc")}}


def plot_loss_curves(log_path, out_path, title: str = "") -> Path:
    """``loss_curves.png`` from a training log: train and validation loss (left axis) and validation accuracy
    (right axis, percent) per epoch. Matplotlib Agg; the PNG is written atomically. Returns ``out_path``."""
    from cortex.plots import _plt, _save

    h = read_training_log(log_path)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.5, 2.6))  # one column of a paper
    ax.plot(h["epoch"], h["train_loss"], "o-", label="train loss")
    ax.plot(h["epoch"], h["val_loss"], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy loss")
    ax2 = ax.twinx()
    ax2.plot(h["epoch"], h["val_acc"], "^--", color="tab:green", label="validation accuracy")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=7)
    ax.set_title(title or Path(log_path).name)
    return _save(fig, out_path)


def make_loggers(log_dir: Path, fresh: bool) -> list:
    """Lightning's CSVLogger (``<log_dir>/metrics.csv``) and, when installed, TensorBoard (``<log_dir>/tensorboard``).

    A resumed run appends to metrics.csv (Lightning's own writer would delete it, since last.ckpt lives in the same
    folder); a fresh run starts a new one. Both loggers write on rank 0 only.
    """
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class ResumableWriter(ExperimentWriter):
        def _check_log_dir_exists(self):
            if fresh:
                Path(self.metrics_file_path).unlink(missing_ok=True)
            elif os.path.isfile(self.metrics_file_path):  # keep the columns: appended rows line up
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

    class ResumableCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = ResumableWriter(log_dir=self.log_dir)
            return self._experiment

    loggers = [ResumableCSVLogger(save_dir=str(log_dir), name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(log_dir), name="tensorboard", version="",
                                         default_hp_metric=False))
    return loggers


def trim_metrics_csv(path: Path, epochs_done: int) -> None:
    """Drop the rows of epochs ``>= epochs_done`` (0-based, logged after the checkpoint a run resumes from)."""
    if not Path(path).exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "epoch" not in rows[0]:
        return
    col = rows[0].index("epoch")
    keep = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col] and float(r[col]) < epochs_done]
    if len(keep) < len(rows):
        with atomic_write(path) as f:
            csv.writer(f).writerows(keep)


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


def claim_new_file(path: Path) -> Path:
    """Create ``path`` (else ``<stem>_2<suffix>``, ``_3``, ...) atomically (O_EXCL) and return the created path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        p = path if i == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")
        try:
            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # minus the umask
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
    from cortex.provenance import dataset_hashes

    pl = _lightning()
    if args.resume and getattr(args, "overwrite", False):
        raise CortexError("--resume and --overwrite contradict each other: --resume continues the run in the "
                          "checkpoint folder, --overwrite starts it again from scratch; pass one")
    accelerator, devices = _accelerator_and_devices(args)  # before anything is written: --accelerator gpu w/o CUDA
    pl.seed_everything(args.seed, workers=True, verbose=False)
    num_classes = resolve_num_classes(args.num_classes, paths.data_dir, DEFAULT_CLASSES[experiment])
    train_set = EmbeddingDataset(paths.data_dir, "train", num_classes, layout=args.data_layout, return_ids=True)
    val_set = EmbeddingDataset(paths.data_dir, "validation", num_classes, layout=args.data_layout, return_ids=True)
    args.batch_size = capped_batch_size(args.batch_size, len(train_set), experiment)
    width = args.width or 512
    model = build_model(experiment, args.model, num_classes, width=width, depth=args.depth,
                        code_dim=train_set.code_dim, grid=train_set.grid)  # the dataset's (D, h, w) embeddings
    meta = dict(experiment=experiment, model_id=args.model, num_classes=num_classes, width=width, depth=args.depth,
                code_dim=train_set.code_dim, grid=list(train_set.grid),  # recorded only when not 256 / 16x16
                dataset=dataset_hashes(paths.data_dir))  # the data it is trained on (cortex.provenance)

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


def test_iem(args, paths, experiment: str, ks=(1, 3, 5, 10), used: dict | None = None) -> dict:
    """Top-k accuracies (percent) of best_model.pth on the test split, after checking that the checkpoint was
    trained on this dataset (``cortex.provenance.verify``); ``used`` is filled with the ids of the inputs."""
    from cortex.provenance import verify
    from cortex.utils import get_device

    (used if used is not None else {}).update(verify(paths, args.model, split="test"))
    device = get_device(args.device, args.gpu)
    model = load_iem(paths.best_ckpt(args.model), experiment, args.model, num_classes=args.num_classes,
                     width=args.width, depth=args.depth)
    num_classes = model_num_classes(model)
    test_set = EmbeddingDataset(paths.data_dir, "test", num_classes, layout=args.data_layout, return_ids=True)
    loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    acc = topk_accuracy(model, loader, device, ks, lookup=test_set.lookup)
    acc["num_classes"] = num_classes  # for topk_line: top-k is n/a when k > classes
    return acc


def topk_line(acc: dict, ks) -> str:
    """``Top-1: 83.33%, Top-3: 100.00%, Top-5: n/a (3 classes)``: a top-k with k above the number of classes
    (``acc["num_classes"]``) would count every image correct, so it is not shown."""
    n = acc.get("num_classes")
    return ", ".join(f"Top-{k}: n/a ({n} classes)" if n is not None and k > n else f"Top-{k}: {acc[k]:.2f}%"
                     for k in ks)


def model_num_classes(model) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features
