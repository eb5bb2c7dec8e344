"""Small helpers every script uses: atomic writes, devices, seeding, list literals, run records."""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np


class CortexError(RuntimeError):
    """A user-facing error: the message names the file or flag and says what to do."""


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_write(path, mode: str = "w", newline: str | None = "", encoding: str | None = "utf-8",
                 fsync: bool = False):
    """Open a temp file beside ``path``; on success rename it over ``path``.

    An interrupted (killed) run never leaves a half-written file that a later step would trust.
    ``fsync=True`` also survives a power loss, at a large cost per file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    kwargs = {} if "b" in mode else {"newline": newline, "encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_npy(path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def require_file(path, what: str, hint: str) -> Path:
    """Return ``Path(path)`` or raise a CortexError naming the file and what to do."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"{what} not found: {path}. {hint}")
    return path


# ----------------------------------------------------------------------------- list literals

def parse_int_list(text: str, *, where: str = "") -> np.ndarray:
    """Parse ``"[5, 16383, ...]"`` into an int64 array without ``ast.literal_eval``."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise CortexError(f"{where}: expected a list literal like '[5, 7, ...]', got {text[:40]!r}")
    try:
        return np.array(body[1:-1].split(","), dtype=np.int64) if body[1:-1].strip() else np.zeros(0, np.int64)
    except ValueError as e:
        raise CortexError(f"{where}: malformed list literal ({e})") from None


def parse_float_list(text: str, *, where: str = "") -> np.ndarray:
    """Parse ``"[0.1, -2e-3, ...]"`` into a float64 array (``nan`` accepted, then caught by callers)."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise CortexError(f"{where}: expected a list literal like '[0.1, 0.2, ...]', got {text[:40]!r}")
    try:
        return np.array(body[1:-1].split(","), dtype=np.float64)
    except ValueError as e:
        raise CortexError(f"{where}: malformed list literal ({e})") from None


def format_list(values) -> str:
    """Inverse of the parsers: ``[1, 2, 3]`` / ``[0.25, 1e-05]`` (Python ``repr`` of each value)."""
    return "[" + ", ".join(repr(v) for v in np.asarray(values).tolist()) + "]"


# ----------------------------------------------------------------------------- runs

def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_device(device: str | None = None, gpu: int | None = None):
    """``--device`` wins (``cpu``, ``cuda``, ``cuda:1``); else ``--gpu g`` means ``cuda:g``;
    else CUDA when present, CPU otherwise. Asking for CUDA on a machine without it is an error."""
    import torch

    if device in (None, "", "auto"):
        if gpu is not None and gpu >= 0 and torch.cuda.is_available():
            device = f"cuda:{gpu}"
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CortexError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def save_run_args(args, out_dir, name: str = "args.json", quiet: bool = False) -> Path:
    """Print the run's arguments and save them as JSON beside its outputs (DINO habit)."""
    d = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    d["_argv"] = sys.argv
    if not quiet:
        print("\n".join(f"{k}: {v}" for k, v in sorted(d.items()) if not k.startswith("_")))
    out = Path(out_dir) / name
    with atomic_write(out) as f:
        json.dump(d, f, indent=2, default=str)
    return out
