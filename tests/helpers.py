"""Test helpers: load an experiment script as a module and run its main() in-process."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """Import ``REPO/relpath`` (e.g. ``VQGAN_explanation/train.py``) as a fresh module.

    The script's folder goes first on ``sys.path`` so its ``import model`` / ``import dataset`` resolve
    to that folder's files, as when it is run from a shell inside the folder.
    """
    path = REPO / relpath
    folder = str(path.parent)
    for name in ("model", "dataset"):  # the two folders both have model.py / dataset.py
        sys.modules.pop(name, None)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(folder)
    return mod


def run_script(relpath: str, argv: list[str]):
    """Parse ``argv`` with the script's own parser and call its ``main``; returns main's result."""
    mod = load_script(relpath)
    args = mod.get_args_parser().parse_args([str(a) for a in argv])
    return mod.main(args)
