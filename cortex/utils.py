"""Small helpers every script uses: atomic writes, devices, seeding, list literals, run records."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import fcntl
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np


class CortexError(RuntimeError):
    """A user-facing error: the message names the file or flag and says what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (SLURM's preemption / time limit) or SIGINT (Ctrl-C) received by a script run through
    ``cortex.cli.run_main``: raised by its signal handler, it unwinds like Ctrl-C (every ``finally`` runs: locks
    released, temp files removed, partial files kept for ``--resume``); ``run_main`` prints one line and exits
    with status 128 + the signal number (143 / 130). A ``KeyboardInterrupt`` so that Lightning and DataLoader
    workers treat it as one."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


# ----------------------------------------------------------------------------- files

def current_umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", newline: str | None = "", encoding: str | None = "utf-8",
                 fsync: bool = False):
    """Open a temp file beside ``path``; on success rename it over ``path``.

    An interrupted (killed) run never leaves a half-written file that a later step would trust.
    ``fsync=True`` also survives a power loss, at a large cost per file.
    The file gets the permissions of a plain ``open()`` (0666 minus the umask: 0644 under umask 022), not
    ``mkstemp``'s private 0600. An OSError raised while writing (disk full, ...) names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    kwargs = {} if "b" in mode else {"newline": newline, "encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os_error = e
        while os_error is not None and not isinstance(os_error, OSError):
            os_error = os_error.__context__  # torch.save: "RuntimeError: unexpected pos" raised over the ENOSPC
        if os_error is not None and not os_error.filename:
            os_error.filename = str(path)  # a failed write() names no file; the error message should
        if os_error is not None and os_error is not e and isinstance(e, Exception):
            raise os_error from e  # the disk-full error, not the library's confusing one (run_main names it)
        raise


def atomic_save_npy(path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def torch_load_checkpoint(path, map_location="cpu", hint: str = "is it a torch .pth file?",
                          note_full_unpickle: bool = False):
    """``torch.load`` of a checkpoint the user chose, tensors only first; a file that pickles more than tensors
    (Lightning hyper-parameters or callback classes) is loaded with the full unpickler (with a printed note when
    ``note_full_unpickle``). An unreadable file is a CortexError naming it, ending with ``hint``."""
    import pickle

    import torch

    def unreadable(e):
        return CortexError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:200]}); {hint}")

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's "weights only load failed": more than tensors
        pass
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, OSError, ...: not a readable checkpoint
        raise unreadable(e) from None
    if note_full_unpickle:
        print(f"note: {Path(path).name} holds more than tensors (a Lightning 1.x checkpoint); loading it with "
              f"torch.load(weights_only=False). Load only checkpoints from a source you trust.")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a readable checkpoint"
        raise unreadable(e) from None


# ----------------------------------------------------------------------------- locks

def open_lock(path) -> int:
    """Open (create) a lock file; 0666 minus the umask, as every output."""
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def lock_fd(fd: int, shared: bool = False, block: bool = False) -> bool:
    """``flock`` an open lock file, exclusive unless ``shared`` (an fd's existing lock is converted); False when
    ``block`` is off and another process holds a conflicting lock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB))
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def try_lock(path, shared: bool = False) -> int | None:
    """Non-blocking ``flock`` on ``path`` (created), exclusive unless ``shared``: the fd, or None when another
    process holds a conflicting lock."""
    fd = open_lock(path)
    try:
        if lock_fd(fd, shared):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def blocking_lock(path):
    """Exclusive blocking ``flock`` on ``path`` for a short critical section."""
    fd = open_lock(path)
    try:
        lock_fd(fd, block=True)
        yield
    finally:
        unlock(fd)


WRITER_LOCK = "writer.lock"


@contextlib.contextmanager
def folder_writer_lock(folder, what: str, hint: str = "wait for it to end, or choose another output folder"):
    """Hold the exclusive ``<folder>/writer.lock`` while a script writes ``folder`` (training, evaluators,
    analysis). A second writer is refused at once with a CortexError naming the folder and ``what`` it is.

    ``flock`` is released by the kernel when the process ends, however it ends (kill -9 included): a lock
    file left on disk means nothing. Not taken on a non-zero DDP rank (``is_primary_process``): rank 0 holds it
    for the run.
    """
    if not is_primary_process():
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = try_lock(folder / WRITER_LOCK)
    if fd is None:
        raise CortexError(f"{folder}: another process is writing {what} into this folder now (it holds "
                          f"{folder / WRITER_LOCK}); {hint}")
    try:
        yield
    finally:
        unlock(fd)


_held_locks = {"stack": None, "folders": set()}


def hold_writer_lock(folder, what: str, hint: str = "wait for it to end, or choose another output folder") -> None:
    """``folder_writer_lock`` held until the running script's ``main`` ends (``cortex.cli.run_main``: the process
    ends; ``cortex.scripts.run_script``: ``release_writer_locks``). For scripts whose ``main`` writes one folder;
    a folder this process already holds is not locked twice."""
    key = os.path.realpath(folder)
    if key in _held_locks["folders"]:
        return
    made = [p for p in [Path(key), *Path(key).parents] if not p.exists()]  # the folders the lock creates
    stack = _held_locks["stack"] = _held_locks["stack"] or contextlib.ExitStack()
    stack.enter_context(folder_writer_lock(folder, what, hint))
    _held_locks["folders"].add(key)
    _held_locks.setdefault("made", []).extend(made)


def release_writer_locks(failed: bool = False) -> None:
    """Release every lock ``hold_writer_lock`` took in this process; ``failed``: also remove the folders it
    created that hold nothing but the lock file and the run's args.json (a run refused at its checks leaves no
    empty output folder)."""
    stack, _held_locks["stack"] = _held_locks["stack"], None
    made, _held_locks["made"] = _held_locks.get("made", []), []
    _held_locks["folders"].clear()
    if stack is not None:
        stack.close()
    for folder in made if failed else []:  # deepest first; this run made them, so their lock and args are its own
        with contextlib.suppress(OSError):
            if {p.name for p in folder.iterdir()} <= {WRITER_LOCK, "args.json"}:
                for name in (WRITER_LOCK, "args.json"):
                    (folder / name).unlink(missing_ok=True)
                folder.rmdir()


def is_primary_process() -> bool:
    """False in a process launched as a non-zero rank of a distributed run (Lightning's DDP launcher, srun
    tasks): ``RANK``, ``LOCAL_RANK``, ``NODE_RANK`` and ``SLURM_PROCID`` all unset or 0 means rank 0."""
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def generator_command(data_dir) -> str:
    """``python /abs/<experiment>/generate_dataset.py`` for a dataset folder inside an experiment folder (the
    script found in one of ``data_dir``'s parents: ``<root>/datasets``, ``<root>/datasets/<bias>/embeddings``),
    else ``python generate_dataset.py``."""
    here = Path(os.path.abspath(data_dir))
    for folder in list(here.parents)[:3]:
        if (folder / "generate_dataset.py").is_file():
            return f"python {folder / 'generate_dataset.py'}"
    return "python generate_dataset.py"


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


def warn_no_cuda(flag: str) -> None:
    """The one-line warning when CUDA is asked for (``flag``, e.g. ``--gpu 0``) on a machine without it."""
    print(f"warning: {flag}: CUDA is not available on this machine; running on the CPU", file=sys.stderr, flush=True)


def get_device(device: str | None = None, gpu: int | None = None):
    """``--device`` wins (``cpu``, ``cuda``, ``cuda:1``); else ``--gpu g`` means ``cuda:g``;
    else CUDA when present, CPU otherwise. CUDA asked for on a machine without it: a one-line warning
    (stderr) and the CPU. A malformed ``--device`` is a CortexError."""
    import torch

    if device in (None, "", "auto"):
        if gpu is not None and gpu >= 0:
            device, flag = f"cuda:{gpu}", f"--gpu {gpu}"
        else:
            device, flag = ("cuda" if torch.cuda.is_available() else "cpu"), None
    else:
        flag = f"--device {device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CortexError(f"--device {device}: not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warn_no_cuda(flag)
        return torch.device("cpu")
    return dev


_running = {"script": None}

# not settings: where things go and how much is printed (the one-line summary leaves them out)
_NOT_SETTINGS = {"root", "data_dir", "checkpoint_dir", "results_dir", "log_dir", "verbose", "debug", "no_progress",
                 "quiet"}


def set_running_script(path) -> None:
    """Name the script whose ``main`` runs now (``cortex.cli.run_main``, ``cortex.scripts.run_script``)."""
    _running["script"] = str(path) if path is not None else None


def settings_line(d: dict, out_dir) -> str:
    """``train.py: model=1 width=32 epochs=10 ... -> /abs/out_dir``: the given settings on one line.

    Path flags, message flags and unset (None / False) values are left out; lists are comma-joined.
    """
    script = Path(_running["script"] or sys.argv[0] or "cortex").name
    parts = []
    for k, v in d.items():
        if k.startswith("_") or k in _NOT_SETTINGS or v is None or v is False:
            continue
        v = ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v
        parts.append(f"{k}={v}" if v is not True else k)
    return f"{script}: {' '.join(parts)} -> {Path(out_dir).absolute()}"


def save_run_args(args, out_dir, name: str = "args.json", quiet: bool = False) -> Path:
    """Save the run's arguments as JSON beside its outputs (DINO habit) and print one settings line
    (``settings_line``); ``--verbose`` prints every argument, one per line, as before; ``quiet``: nothing."""
    d = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    d["_argv"] = sys.argv
    if not quiet:
        if d.get("verbose"):
            print("\n".join(f"{k}: {v}" for k, v in sorted(d.items()) if not k.startswith("_")))
        else:
            print(settings_line(d, out_dir), flush=True)
    out = Path(out_dir) / name
    with atomic_write(out) as f:
        json.dump(d, f, indent=2, default=str)
    return out


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path) -> str | None:
    """sha256 of a file's bytes (``None`` when it does not exist); hashed once per process and file version."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
