"""IEM checkpoint I/O: ``save_iem`` writes the plain ``state_dict`` plus a ``config.json`` beside it;
``load_iem`` rebuilds the net (from explicit values, else ``config.json``, else the state-dict shapes, else the
paper defaults) and loads it strictly, with errors that say what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cortex.iem.architectures import EMBED_DIM, GRID, PAPER_WIDTH
from cortex.iem.registry import (DEFAULT_NUM_CLASSES, EXPERIMENTS, FOLDERS, _check_experiment, _check_model_id,
                                 build_model, default_depth, identify_architecture, infer_hparams)
from cortex.utils import CortexError, atomic_torch_save, atomic_write, torch_load_checkpoint

_PREFIXES = ("module.", "model.", "_orig_mod.")


def unwrap_state_dict(obj, where: str = "checkpoint") -> dict:
    """A plain ``{name: tensor}`` dict from a checkpoint object.

    Accepts a plain state dict, or a dict with a ``state_dict`` / ``model`` entry (Lightning,
    custom trainers); strips a ``module.`` (DDP), ``model.`` (Lightning), ``_orig_mod.``
    (torch.compile) prefix. When only some keys carry ``model.`` (a LightningModule with other
    state, e.g. a loss weight), only those are kept.
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for entry in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CortexError(f"{where}: not a state dict: expected a {{name: tensor}} mapping "
                          f"(or one under 'state_dict' / 'model')")
    sd = dict(obj)
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    if not any(identify_architecture(sd, e) for e in EXPERIMENTS):
        sub = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        if sub and any(identify_architecture(sub, e) for e in EXPERIMENTS):
            sd = sub
    return sd


# ============================================================================ save / load

_HPARAMS = ("num_classes", "width", "depth")
_GEOMETRY = {"code_dim": EMBED_DIM, "grid": [GRID, GRID]}  # recorded in config.json only when not these


def _model_meta(model_or_state_dict) -> dict:
    """width / num_classes / depth / code_dim / grid from a model's attributes (built by ``build_model``)."""
    if isinstance(model_or_state_dict, nn.Module):
        out = {k: getattr(model_or_state_dict, k) for k in (*_HPARAMS, *_GEOMETRY) if hasattr(model_or_state_dict, k)}
        if "grid" in out:
            out["grid"] = list(out["grid"])
        return out
    return {}


def save_iem(model_or_state_dict, path, meta: dict) -> Path:
    """Write the plain ``state_dict`` to ``path`` and ``config.json`` beside it (both atomically).

    ``meta`` must name the ``experiment``; ``model_id``, ``num_classes``, ``width`` and ``depth``
    are taken from ``meta``, else from the model, else from the state-dict shapes. ``code_dim`` and
    ``grid`` [h, w] likewise, written only when they differ from the paper's 256 and [16, 16] (so the
    paper-geometry config.json is unchanged). Extra ``meta`` keys are kept in ``config.json``.
    Returns the path of ``config.json``.
    """
    path = Path(path)
    sd = unwrap_state_dict(model_or_state_dict)
    experiment = meta.get("experiment")
    _check_experiment(experiment)
    found = identify_architecture(sd, experiment)
    model_id = meta.get("model_id") or found
    if model_id is None:
        raise CortexError(f"save_iem({path}): cannot tell which ClassificationNet of {experiment} this is; "
                          f"pass meta['model_id']")
    _check_model_id(experiment, model_id)
    if found is not None and found != model_id:
        raise CortexError(f"save_iem({path}): meta says ClassificationNet{model_id} but the weights are "
                          f"a ClassificationNet{found} of {experiment}")
    inferred = infer_hparams(sd, experiment, model_id)
    config = dict(meta)
    config.update(experiment=experiment, model_id=int(model_id))
    for k in (*_HPARAMS, *_GEOMETRY):
        v = meta.get(k)
        if v is None:
            v = _model_meta(model_or_state_dict).get(k, inferred[k])
        if k in _GEOMETRY:
            v = None if v is None else (list(v) if k == "grid" else int(v))
            if v is None or v == _GEOMETRY[k]:
                config.pop(k, None)
                continue
        config[k] = v
    atomic_torch_save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}, path)
    config_path = path.parent / "config.json"
    with atomic_write(config_path) as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config_path


def _read_config(path: Path, experiment: str, model_id: int) -> dict:
    """The ``config.json`` beside ``path`` if it describes this experiment/net, else ``{}``."""
    cfg_path = path.parent / "config.json"
    if not cfg_path.exists():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CortexError(f"{cfg_path}: unreadable config ({e}); fix or delete it") from None
    if cfg.get("experiment", experiment) != experiment or cfg.get("model_id", model_id) != model_id:
        return {}
    return cfg


# written by train.py beside model.pth / best_model.pth while a run is unfinished (removed when its last epoch
# is saved): a run killed, stopped by SIGTERM or failed keeps it, and load_iem refuses its checkpoints
UNFINISHED_MARKER = "training_unfinished.json"


def check_training_finished(path, model_id) -> None:
    """CortexError when ``path``'s folder holds the marker of an unfinished training run (``UNFINISHED_MARKER``)."""
    marker = Path(path).parent / UNFINISHED_MARKER
    if not marker.exists():
        return
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = {}
    done = (f"{info.get('epochs_done') or 0} of {info['epochs']} epochs done; " if "epochs" in info else "")
    raise CortexError(f"{path}: its training run is unfinished ({done}{marker} is there: the run was stopped, "
                      f"killed or failed, or is running now); its weights are not a finished IEM. Continue it with "
                      f"python train.py --model {model_id} --resume (same settings), or train anew with --overwrite")


def load_iem(path, experiment: str, model_id: int, num_classes: int | None = None, width: int | None = None,
             depth: int | None = None, map_location="cpu", code_dim: int | None = None, grid=None) -> nn.Module:
    """Load ClassificationNet{model_id} of ``experiment`` from ``path``, strictly, in eval mode.

    Each of ``num_classes`` / ``width`` / ``depth`` / ``code_dim`` / ``grid`` left as None comes from the ``config.json``
    beside the checkpoint when present, else from the state-dict shapes, else the paper default.
    Raises ``CortexError`` for a missing file, a checkpoint of another architecture, or a shape
    mismatch (naming the first bad key).
    """
    _check_model_id(experiment, model_id)
    path = Path(path)
    if not path.is_file():
        raise CortexError(f"checkpoint not found: {path}; train it first with train.py --model {model_id}")
    check_training_finished(path, model_id)
    sd = unwrap_state_dict(torch_load_checkpoint(path, map_location), where=str(path))

    found = identify_architecture(sd, experiment)
    if found is None:
        other = [e for e in EXPERIMENTS if e != experiment and identify_architecture(sd, e)]
        hint = (f" (it looks like a {FOLDERS[other[0]]} ClassificationNet{identify_architecture(sd, other[0])} "
                f"checkpoint)") if other else ""
        raise CortexError(f"{path} is not a checkpoint of any {FOLDERS[experiment]} IEM{hint}; "
                          f"first keys: {list(sd)[:3]}")
    if found != model_id:
        raise CortexError(f"{path} holds a ClassificationNet{found} checkpoint ({experiment}), "
                          f"but --model {model_id} was given; pass --model {found}")

    given = {"num_classes": num_classes, "width": width, "depth": depth, "code_dim": code_dim, "grid": grid}
    config = _read_config(path, experiment, model_id)
    inferred = infer_hparams(sd, experiment, model_id)
    defaults = {"num_classes": DEFAULT_NUM_CLASSES[experiment], "width": PAPER_WIDTH,
                "depth": default_depth(experiment, model_id), **_GEOMETRY}
    hp, source = {}, {}
    for k in given:
        for src, table in (("argument", given), ("config.json", config), ("checkpoint shapes", inferred),
                           ("paper default", defaults)):
            if table.get(k) is not None:
                hp[k], source[k] = table[k], src
                break
        else:
            hp[k], source[k] = None, "none"

    model = build_model(experiment, model_id, hp["num_classes"], hp["width"], hp["depth"], hp["code_dim"], hp["grid"])
    _check_compatible(model.state_dict(), sd, path, hp, source)
    model.load_state_dict(sd, strict=True)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _check_compatible(expected: dict, got: dict, path: Path, hp: dict, source: dict) -> None:
    """Raise a CortexError naming the first missing/unexpected/mis-shaped key."""
    used = ", ".join(f"{k}={v} (from {source[k]})" for k, v in hp.items() if v is not None)
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CortexError(f"{path}: {what} ({len(missing)} missing, {len(unexpected)} unexpected) for a net "
                          f"built with {used}; check --depth")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(got[k].shape):
            raise CortexError(f"{path}: {k} has shape {list(got[k].shape)} in the checkpoint but "
                              f"{list(v.shape)} in the net built with {used}; check --width / --num_classes "
                              f"(or config.json beside the checkpoint)")
