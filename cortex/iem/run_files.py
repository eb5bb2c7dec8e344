"""The files of a training run: crash-safe Lightning checkpoints, resuming (which checkpoint, same settings), the
unfinished-run marker, a fresh run's clean-up, the training log and its loss curves."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch

from cortex.figures import _plt, _save
from cortex.iem.checkpoints import UNFINISHED_MARKER
from cortex.utils import CortexError, atomic_write, is_primary_process

# train_args.json keys a resumed run must share with the run it continues: they change what is trained. --epochs
# may grow (train longer); seed, devices, workers and the data layout (same tensors) may change.
RESUME_MUST_MATCH = ("model", "num_classes", "width", "depth", "lr", "batch_size", "weight_decay", "step_size",
                     "gamma", "precision")
# what a fresh run replaces in <model_dir> (with --overwrite)
RUN_OUTPUTS = ("model.pth", "best_model.pth", "config.json", "loss_curves.png", "lightning")


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


