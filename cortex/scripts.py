"""Run an experiment script's ``main`` in this process, exactly as its shell command would.

``run_script("VQGAN_explanation/train.py", ["--model", "1"])`` parses the argv with the script's own
``get_args_parser()`` and calls its ``main(args)``: the same code path as ``cd VQGAN_explanation;
python train.py --model 1``, without paying the interpreter and library start-up again. The demo and
the tests use it.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(path):
    """Import a script (absolute, or relative to the repo) as a fresh module.

    The script's folder goes first on ``sys.path`` so its ``import model`` / ``import dataset`` resolve to
    that folder's files, as when it is run from a shell inside the folder.
    """
    path = Path(path)
    path = path if path.is_absolute() else REPO / path
    folder = str(path.parent)
    for name in ("model", "dataset"):  # both experiment folders have a model.py and a dataset.py
        sys.modules.pop(name, None)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(folder)
    return mod


def run_script(path, argv: list):
    """Parse ``argv`` with the script's own parser and call its ``main``; returns main's result.

    As the shell path (``cortex.cli.run_main``): no flag abbreviations, third-party noise off unless
    ``--verbose``, the settings line names the script. Unlike it, every error propagates (a ``CortexError`` is
    raised, not printed): the demo stops at the failing step and the tests assert on the exception.
    """
    from .cli import quiet_third_party, set_progress_bars
    from .utils import release_writer_locks, set_running_script

    mod = load_script(path)
    parser = mod.get_args_parser()
    parser.allow_abbrev = False
    args = parser.parse_args([str(a) for a in argv])
    quiet_third_party(verbose=getattr(args, "verbose", False))
    set_progress_bars(not getattr(args, "quiet", False))
    set_running_script(path)
    try:
        result = mod.main(args)
    except BaseException:
        release_writer_locks(failed=True)  # the folders main locked (a shell run's locks end with its process)
        raise
    finally:
        set_running_script(None)
        set_progress_bars(True)
    release_writer_locks()
    return result
