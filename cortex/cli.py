"""Command-line plumbing shared by every script of both experiment folders.

* validated argument types (``positive_int``, ``int_in(1, 256)``, ...): a flag that makes no sense fails at parse
  time with argparse's own ``error: argument --width: must be an integer >= 1, got '0'``;
* the parent parsers (paths, runtime, data, model, ...) the scripts combine with ``parents=[...]``; every parser
  is built with ``allow_abbrev=False`` (``--epoch`` is not silently taken for ``--epochs``);
* ``run_main(main, get_args_parser)``: the ``if __name__ == "__main__":`` path of every script. A
  ``CortexError`` (or a disk-full / read-only / permission error) prints ``error: <message>`` on stderr and exits
  with status 2; the traceback only with ``--debug`` or ``CORTEX_DEBUG=1``; SIGTERM (SLURM's preemption / time
  limit) and SIGINT (Ctrl-C) print one line and exit with status 143 / 130 (``install_stop_handlers``);
* ``quiet_third_party()``: no Lightning tips, platform lines, model summaries or deprecation noise unless
  ``--verbose``.

Nothing heavy is imported here (no torch): parsers build in milliseconds.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

BIAS_TYPES = ("doctor_gender", "doctor_color")

# ----------------------------------------------------------------------------- validated argument types


def _number(text, kind, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def int_in(lo: int | None = None, hi: int | None = None):
    """argparse ``type=``: an integer with ``lo <= value <= hi`` (either bound may be None = open)."""
    if lo is not None and hi is not None:
        what = f"an integer in {lo}..{hi}"
    elif lo is not None:
        what = f"an integer >= {lo}"
    elif hi is not None:
        what = f"an integer <= {hi}"
    else:
        what = "an integer"

    def parse(text) -> int:
        v = _number(text, int, what)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """argparse ``type=``: a finite float in the interval [lo, hi] (``lo_open``/``hi_open``: that end excluded)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    what = "a number" + (" " + " and ".join(parts) if parts else "")

    def parse(text) -> float:
        v = _number(text, float, what)
        bad = v != v or v in (float("inf"), float("-inf"))
        bad |= lo is not None and (v <= lo if lo_open else v < lo)
        bad |= hi is not None and (v >= hi if hi_open else v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    parse.__name__ = what
    return parse


positive_int = int_in(1)          # widths, batch sizes, epochs, counts of things that must exist
nonneg_int = int_in(0)            # workers, labels, optional counts
seed_int = int_in(0, 2**32 - 1)   # numpy's seed range
# top-n token positions: 1..256 whatever the dataset's grid, because a flag is checked before any dataset is read.
# 256 is the paper's 16 x 16 grid: a dataset with a larger grid (e.g. 32 x 32) cannot ask for more than its top 256.
position_int = int_in(1, 256)
positive_float = float_in(0, lo_open=True)
nonneg_float = float_in(0)
fraction = float_in(0, 1)         # probabilities and ratios


# ----------------------------------------------------------------------------- parsers


class CortexArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``train.py: error: unrecognized arguments: --epoch 3 (did you mean
    --epochs?); python train.py -h lists every flag`` instead of the whole usage; exit status 2 as argparse's."""

    def suggestions(self, words) -> list[str]:
        """``--flag (did you mean --close?)`` for each unknown ``--flag`` with a close match (difflib)."""
        import difflib

        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        out = []
        for w in words:
            if w.startswith("--"):
                close = difflib.get_close_matches(w.split("=", 1)[0], known, n=1, cutoff=0.6)
                if close:
                    out.append(f"{w.split('=', 1)[0]}: did you mean {close[0]}?")
        return out

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            tips = self.suggestions(message.split(":", 1)[1].split())
            hint = f" ({'; '.join(tips)})" if tips else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; -h lists every flag\n")


def make_parser(*args, **kwargs) -> argparse.ArgumentParser:
    """A ``CortexArgumentParser`` with ``allow_abbrev=False`` (an unknown ``--epoch`` is an error, with a
    one-line ``did you mean --epochs?`` instead of the whole usage)."""
    kwargs.setdefault("allow_abbrev", False)
    return CortexArgumentParser(*args, **kwargs)


def experiment_folder(script, up: int = 0) -> Path:
    """The experiment folder of a script: its own folder, or ``up`` levels above it (``eval/`` scripts: 1)."""
    return Path(script).resolve().parents[up]


def paths_parser(script=None, up: int = 0) -> argparse.ArgumentParser:
    """Where data, checkpoints, results and logs live, plus ``--verbose``/``--debug`` (every script has it).

    ``paths_parser(__file__)``: ``--root`` defaults to the script's own folder (``paths_parser(__file__, up=1)``
    for the ``eval/`` and ``explanation_evaluation/`` scripts: the experiment folder above them), so a script
    finds its folder from any working directory. A relative ``--root`` typed by the user is relative to the
    current directory. Without ``script`` the default is the current directory.
    """
    root_default = str(experiment_folder(script, up)) if script is not None else "."
    p = make_parser(add_help=False)
    g = p.add_argument_group("paths")
    g.add_argument("--root", default=root_default,
                   help="experiment folder that holds datasets/ checkpoints/ results/ logs/ (default: %(default)s)")
    g.add_argument("--data_dir", default=None, help="dataset folder (default: <root>/datasets[/<bias_type>/embeddings])")
    g.add_argument("--checkpoint_dir", default=None, help="checkpoint folder (default: <root>/checkpoints[/<bias_type>])")
    g.add_argument("--results_dir", default=None, help="results folder (default: <root>/results[/<bias_type>])")
    g.add_argument("--log_dir", default=None, help="log folder (default: <root>/logs)")
    add_message_flags(p)
    return p


def add_message_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--verbose``, ``--debug``, ``--quiet``: every script's message flags (part of ``paths_parser``)."""
    g = p.add_argument_group("messages")
    g.add_argument("--verbose", action="store_true",
                   help="print every argument and the libraries' own messages (Lightning's summaries, warnings)")
    g.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also CORTEX_DEBUG=1)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars (tqdm's and Lightning's): a log file keeps only the result lines")
    return p


def runtime_parser() -> argparse.ArgumentParser:
    """Seed and device."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="random seed; same seed, same results (default: %(default)s)")
    g.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA when present, else CPU; CUDA asked "
                        "for on a machine without it: a warning, then the CPU)")
    g.add_argument("--gpu", type=nonneg_int, default=None,
                   help="GPU index, as in the seed README (same as --device cuda:G)")
    g.add_argument("--num_workers", type=nonneg_int, default=0, help="DataLoader workers (default: %(default)s)")
    return p


def data_parser() -> argparse.ArgumentParser:
    """How the IEM scripts (train, test, TIS) read the dataset."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--data_layout", choices=("auto", "files", "compact"), default="auto",
                   help="files: the authors' per-image .npy; compact: codebook.npy + the CSVs' token ids (the "
                        "loader ships ids, the embedding is looked up on the compute device; same tensors); "
                        "auto: compact when <data_dir>/codebook.npy exists, else files (default: %(default)s)")
    return p


def add_vqgan_args(group, config_help: str, ckpt_help: str = "its checkpoint (with --vqgan_config)") -> None:
    """``--vqgan_config`` / ``--vqgan_ckpt``, a taming VQGAN as YAML + checkpoint, added to ``group`` (a parser or
    an argument group); each script says in ``config_help`` / ``ckpt_help`` what it uses the VQGAN for."""
    group.add_argument("--vqgan_config", default=None, help=config_help)
    group.add_argument("--vqgan_ckpt", default=None, help=ckpt_help)


def compact_parser() -> argparse.ArgumentParser:
    """compact_dataset.py: build codebook.npy from the authors' per-image files."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("compact layout")
    g.add_argument("--n_codes", type=positive_int, default=None,
                   help="codebook size, e.g. 16384 for the paper's VQGAN (default: the VQGAN's, else the largest "
                        "id in the CSVs + 1)")
    add_vqgan_args(g, "optional taming VQGAN YAML of the model that made the data: its full codebook is written "
                      "(codes no image uses included) and every file is checked against it")
    g.add_argument("--tolerance", type=nonneg_float, default=1e-5,
                   help="allowed |file - codebook| per value, times (1 + |value|): float rounding of taming's "
                        "straight-through z_q (default: %(default)s; 0 = bit-exact)")
    g.add_argument("--force", action="store_true", help="overwrite an existing codebook.npy")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def merge_parser() -> argparse.ArgumentParser:
    """merge_datasets.py: one dataset from folders generated separately."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("merging")
    g.add_argument("--inputs", nargs="+", required=True,
                   help="dataset folders to merge, e.g. datasets_0-499 datasets_500-999 (the output is --data_dir)")
    g.add_argument("--copy", action="store_true",
                   help="copy the per-image files and PNGs instead of hard-linking them")
    g.add_argument("--force", action="store_true", help="merge into a --data_dir that already holds CSVs")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def model_parser(model_choices, default_model: int | None = None) -> argparse.ArgumentParser:
    """Which IEM (``--model`` among ``model_choices``: ``cortex.iem.registry.model_choices(experiment)``),
    its width, and the number of classes."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", type=int, choices=model_choices, default=default_model,
                   required=default_model is None, help="IEM architecture: ClassificationNet{m} (SPEC §4)")
    g.add_argument("--width", type=positive_int, default=None,
                   help="IEM width (paper: 512). Default: read from the checkpoint's config.json, else 512")
    g.add_argument("--depth", type=positive_int, default=None,
                   help="transformer layers for the ViT nets (paper: 12 VQGAN Net4, 6 Dalle Net3); default as paper")
    g.add_argument("--num_classes", type=int_in(2), default=None,
                   help="number of labels. Default: datasets/dataset_info.json, else 1000 (VQGAN) / 2 (DALL-E-mini)")
    return p


def label_subset_parser(allow_partial_help: str) -> argparse.ArgumentParser:
    """Which labels / images an explanation evaluation covers, and whether incomplete inputs are skipped."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("which labels")
    g.add_argument("--labels", type=nonneg_int, nargs="+", default=None, help="evaluate only these labels (default: all)")
    g.add_argument("--max_images_per_label", type=positive_int, default=None,
                   help="first N images of each label (default: all)")
    g.add_argument("--allow_partial", action="store_true", help=allow_partial_help)
    return p


def bias_parser() -> argparse.ArgumentParser:
    p = make_parser(add_help=False)
    p.add_argument("--bias_type", choices=BIAS_TYPES, default="doctor_gender",
                   help="which attribute the IEM predicts (default: %(default)s)")
    return p


# ----------------------------------------------------------------------------- running a script

# OSError numbers that mean "this folder cannot be written": the reason shown, and what to do
WRITE_ERRORS = {
    errno.ENOSPC: ("disk full", "free space or choose another --results_dir (or --checkpoint_dir, --root)"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another --results_dir (or --checkpoint_dir, --root)"),
    errno.EROFS: ("read-only file system", "choose another --results_dir (or --root)"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or choose another --results_dir (or --root)"),
    errno.EPERM: ("permission denied", "fix the folder's permissions or choose another --results_dir (or --root)"),
}

# (logger names, warning message patterns) silenced by quiet_third_party
_NOISY_LOGGERS = tuple(
    f"{pkg}{sub}" for pkg in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    for sub in ("", ".utilities", ".utilities.rank_zero", ".callbacks", ".callbacks.model_summary", ".trainer",
                ".accelerators", ".strategies", ".loops", ".core", ".loggers", ".plugins", ".tuner", ".profilers",
                ".overrides"))
_NOISY_WARNINGS = (
    r".*LeafSpec.*",                       # torch >= 2.9 deprecation inside Lightning's _pytree
    r".*does not have many workers.*",     # Lightning's DataLoader advice (num_workers is a flag here)
    r".*litlogger.*",
    r".*Consider setting `persistent_workers=True`.*",
    r".*is deprecated.*torch\.utils\._pytree.*",
    r".*Checkpoint directory .* exists and is not empty.*",  # resume writes into its own folder on purpose
)
# ours: cortex.attribution.tis prints a banner on stderr and also warns (for callers that catch it); the warnings module would
# print the same text again. Appended after every other filter, so a catcher (pytest.warns, -W) still sees it.
_REPEATED_WARNINGS = (r"the IEM's accuracy is near chance",)
_quiet_state = {"filters": []}


def debug_requested(args=None) -> bool:
    """``--debug`` on the command line or ``CORTEX_DEBUG`` set to anything but ''/0."""
    return bool(getattr(args, "debug", False)) or os.environ.get("CORTEX_DEBUG", "") not in ("", "0")


def quiet_third_party(verbose: bool = False) -> None:
    """One place for third-party noise: Lightning's tips ("litlogger"), GPU/TPU/HPU availability lines, model
    summaries and "`Trainer.fit` stopped" lines (INFO logs), and known deprecation/advice warnings.

    ``verbose=True`` restores them (the libraries' defaults). Safe to call before or after Lightning is imported
    (Lightning sets its top logger to INFO when imported, so the sub-package loggers are set too).
    """
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if "pytorch_lightning" in sys.modules or verbose:
        logging.getLogger("pytorch_lightning").setLevel(logging.INFO if verbose else logging.WARNING)
    for f in _quiet_state["filters"]:  # ours only, never the user's own filters
        if f in warnings.filters:
            warnings.filters.remove(f)
    _quiet_state["filters"] = []
    if not verbose:
        for pattern in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
            _quiet_state["filters"].append(warnings.filters[0])
        for pattern in _REPEATED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, append=True)
            _quiet_state["filters"].append(warnings.filters[-1])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # in case a TensorFlow import sneaks in (tensorboard)


_progress_state: dict = {}


def set_progress_bars(enabled: bool) -> None:
    """Every tqdm progress bar on (the default) or off (``--quiet``), in one place: tqdm bars created while off
    are disabled whatever their call site says (Lightning's bar is a tqdm too; ``train_iem`` also switches it
    off). Reversible: ``set_progress_bars(True)`` restores tqdm."""
    if enabled and not _progress_state:
        return
    from tqdm import std

    original = _progress_state.setdefault("init", std.tqdm.__init__)
    if enabled:
        std.tqdm.__init__ = original
        _progress_state.clear()
        return

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init


def dangling_symlink(name) -> Path | None:
    """The first component of path ``name`` (itself or a parent) that is a symbolic link to nothing, else None."""
    if name in (None, ""):
        return None
    path = Path(os.fsdecode(name)).absolute()
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return p
    return None


def write_error_message(e: OSError) -> str | None:
    """``cannot write <folder>: disk full — free space or ...`` for the OSErrors of WRITE_ERRORS, else None.

    The folder is the one holding ``e.filename`` (``atomic_write`` fills it in when the OS did not).
    """
    link = dangling_symlink(e.filename)
    if link is not None:  # mkdir through it: "File exists"; open through it: "No such file"
        return (f"cannot write {Path(os.fsdecode(e.filename)).absolute()}: {link} is a symbolic link to "
                f"{os.readlink(link)}, which does not exist — create that folder (or mount its disk), or remove the "
                f"link")
    if e.errno not in WRITE_ERRORS:
        return None
    reason, todo = WRITE_ERRORS[e.errno]
    name = e.filename if e.filename not in (None, "") else None
    if name is None:
        where = "the output folder"
    else:
        path = Path(os.fsdecode(name)).absolute()
        where = str(path if path.is_dir() else path.parent)
    return f"cannot write {where}: {reason} — {todo}"


SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


def install_stop_handlers() -> dict:
    """SIGTERM and SIGINT raise ``cortex.utils.Interrupted`` (a KeyboardInterrupt) in the main thread.

    The first signal unwinds the run like Ctrl-C: every ``finally`` runs (locks released, temp files removed,
    partial outputs kept for ``--resume``, training's unfinished marker kept). A second signal while that
    happens ends the process at once (status 128 + signal). Lightning composes its own SIGTERM handler with
    this one during ``fit`` (it runs first: it stops DDP children); without it Lightning would end the run
    with ``SystemExit`` and status 0. Returns the state ``run_main`` reads: ``{"signum": None or int}``.
    """
    from .utils import Interrupted

    state = {"signum": None, "previous": {s: signal.getsignal(s) for s in SIGNAL_NAMES}}

    def handler(signum, frame):
        if state["signum"] is not None:  # a second signal while unwinding: stop now
            os._exit(128 + state["signum"])
        state["signum"] = signum
        raise Interrupted(signum)

    for s in SIGNAL_NAMES:
        signal.signal(s, handler)
    return state


def restore_stop_handlers(state: dict) -> None:
    """The handlers ``install_stop_handlers`` replaced (``run_main`` called in-process, e.g. by a test)."""
    for s, h in state["previous"].items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def stop_message(script: str, signum: int, resumable: bool) -> str:
    """The one line printed when a run is stopped by a signal."""
    what = SIGNAL_NAMES.get(signum, f"signal {signum}")
    todo = ("rerun the same command with --resume to continue it" if resumable
            else "rerun the same command (its finished outputs are kept or redone)")
    return (f"{script}: stopped by {what}; nothing unfinished is marked as finished (exit status {128 + signum}); "
            f"{todo}")


def run_main(main, get_args_parser, argv: list | None = None):
    """The ``if __name__ == "__main__":`` path of every script: ``run_main(main, get_args_parser)``.

    Parses ``argv`` (default: the command line) with ``allow_abbrev=False``, prints one-line summaries instead of
    third-party noise (``--verbose`` for all of it) and calls ``main(args)``. A ``CortexError``, or an OSError of
    a full disk / read-only file system / denied permission, prints ``error: <message>`` on stderr and exits with
    status 2 (argparse's own status for a bad flag); ``--debug`` or ``CORTEX_DEBUG=1`` shows the traceback
    instead. SIGTERM / SIGINT: one line (``stop_message``) on stderr, exit status 143 / 130 (SLURM records a
    failure), no traceback. ``cortex.scripts.run_script`` (demo, tests) calls ``main`` directly and lets every
    error propagate.
    """
    from .utils import CortexError, Interrupted, release_writer_locks, set_running_script

    parser = get_args_parser()
    parser.allow_abbrev = False
    args = parser.parse_args(argv)
    quiet_third_party(verbose=getattr(args, "verbose", False))
    set_progress_bars(not getattr(args, "quiet", False))
    script = getattr(main, "__globals__", {}).get("__file__") or sys.argv[0]
    set_running_script(script)  # for the settings line
    debug = debug_requested(args)
    stop = install_stop_handlers()
    try:
        return main(args)
    except CortexError as e:
        release_writer_locks(failed=True)
        if debug:
            raise
        message = str(e)
    except OSError as e:
        release_writer_locks(failed=True)
        message = write_error_message(e)
        if debug or message is None:
            raise
    except (Interrupted, SystemExit) as e:
        # Interrupted: our handler; SystemExit after a signal: Lightning's own ending of a stopped fit
        signum = e.signum if isinstance(e, Interrupted) else stop["signum"]
        if signum is None:
            raise
        resumable = any("--resume" in a.option_strings for a in parser._actions)
        sys.stdout.flush()
        bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
        start = "\n" if bars is not None and getattr(bars, "_instances", None) else ""  # end a live bar's line
        print(start + stop_message(Path(script).name, signum, resumable), file=sys.stderr, flush=True)
        os._exit(128 + signum)  # no interpreter teardown: DataLoader workers / atexit hooks would print more
    finally:
        restore_stop_handlers(stop)
        release_writer_locks()  # main returned (run in-process); after an error already done, with cleanup
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def env_int(name: str, default: int | None) -> int | None:
    """Integer from an environment variable (e.g. SLURM_ARRAY_TASK_ID), else ``default``."""
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default
