"""The one taming-transformers import shim and the ``(config.yaml, checkpoint.ckpt) -> model`` loader.

taming-transformers (PyPI ``taming-transformers-rom1504`` 0.0.6, the build that has ``VectorQuantizer2``)
was written for PyTorch-Lightning 1.x and transformers 4.x. Under current libraries two imports break:

* ``taming.main`` imports ``pytorch_lightning.utilities.distributed.rank_zero_only``
  (now ``pytorch_lightning.utilities.rank_zero``): we register an alias module;
* ``taming.modules.transformer.mingpt`` imports ``top_k_top_p_filtering`` from ``transformers``,
  which current transformers no longer has: we provide the function (:func:`top_k_top_p_filtering`)
  through a stub ``transformers`` module that exists only while mingpt is imported (a real
  ``transformers`` already imported is patched instead). transformers is never needed.

:func:`import_taming` applies the shim (idempotent; nothing happens when ``cortex`` is imported).
:func:`load_taming_model` builds a model from a taming YAML through OmegaConf and taming's
``instantiate_from_config`` and loads a Lightning checkpoint (``state_dict`` inside) or a plain
state dict. For inference it replaces every ``lossconfig`` by ``torch.nn.Identity`` (the VQGAN's
``VQLPIPSWithDiscriminator`` would download VGG weights; taming's own notebooks do the same) and
drops every nested ``ckpt_path`` (the cin_transformer config points its ``first_stage_config`` at
the authors' absolute paths): the one checkpoint given loads every sub-model.

``DistanceVQModel`` (also ``VQGAN_explanation/new_vqgan.py``'s ``VQModel``) is a taming ``VQModel``
whose ``encode`` also returns the quantiser's squared distances to every code. It is created on
first access (module ``__getattr__``), so ``target: cortex.data.taming_compat.DistanceVQModel`` works in a
config and importing this module stays free.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from cortex.utils import CortexError, torch_load_checkpoint

_APPLIED = False
_DISTANCE_CLS = None

INSTALL_HINT = ("taming-transformers is not installed in this environment. Install the pinned build: "
                "pip install taming-transformers-rom1504==0.0.6 einops requests omegaconf "
                "(see requirements.txt); the synthetic source needs none of it.")


# ----------------------------------------------------------------------------- the shim

def top_k_top_p_filtering(logits, top_k: int | None = 0, top_p: float | None = 1.0,
                          filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
    """transformers' old ``top_k_top_p_filtering``: keep the ``top_k`` largest logits and the
    smallest set whose probability mass exceeds ``top_p``; the rest become ``filter_value``.

    logits: (B, vocab). ``top_k`` None/0 and ``top_p`` None/1.0 switch the filter off. Returns a new
    tensor (the old function also wrote into ``logits``; mingpt only uses the return value).
    """
    top_k = int(top_k or 0)
    top_p = 1.0 if top_p is None else float(top_p)
    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        if min_tokens_to_keep > 1:
            remove[..., :min_tokens_to_keep] = False
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
        remove[..., 0] = False
        remove = remove.scatter(-1, sorted_idx, remove)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def _shim_lightning() -> None:
    try:
        importlib.import_module("pytorch_lightning.utilities.distributed")
        return
    except ImportError:
        pass
    from pytorch_lightning.utilities import rank_zero as rz
    import pytorch_lightning.utilities as plu

    mod = types.ModuleType("pytorch_lightning.utilities.distributed")
    mod.rank_zero_only = rz.rank_zero_only
    for name in ("rank_zero_info", "rank_zero_warn", "rank_zero_debug"):
        if hasattr(rz, name):
            setattr(mod, name, getattr(rz, name))
    sys.modules[mod.__name__] = mod
    plu.distributed = mod


def _import_mingpt() -> None:
    name = "taming.modules.transformer.mingpt"
    if name in sys.modules:
        return
    real = sys.modules.get("transformers")
    if real is not None:
        if not hasattr(real, "top_k_top_p_filtering"):
            real.top_k_top_p_filtering = top_k_top_p_filtering
        importlib.import_module(name)
        return
    stub = types.ModuleType("transformers")
    stub.top_k_top_p_filtering = top_k_top_p_filtering
    sys.modules["transformers"] = stub  # only while mingpt imports; a later `import transformers` is the real one
    try:
        importlib.import_module(name)
    finally:
        if sys.modules.get("transformers") is stub:
            del sys.modules["transformers"]


def import_taming():
    """Make taming-transformers importable under current libraries; returns the ``taming`` package.

    Idempotent. Raises CortexError when taming (or a library it needs) is not installed.
    """
    global _APPLIED
    if _APPLIED:
        return sys.modules["taming"]
    if importlib.util.find_spec("taming") is None:
        raise CortexError(INSTALL_HINT)
    try:
        _shim_lightning()
        _import_mingpt()
        importlib.import_module("taming.main")
        importlib.import_module("taming.models.vqgan")
        importlib.import_module("taming.models.cond_transformer")
    except ImportError as e:
        raise CortexError(f"taming-transformers is installed but does not import ({e}). {INSTALL_HINT}") from e
    if not hasattr(sys.modules["taming.modules.vqvae.quantize"], "VectorQuantizer2"):
        raise CortexError("the installed taming package has no VectorQuantizer2 (taming-transformers 0.0.1?). "
                          + INSTALL_HINT)
    _APPLIED = True
    return sys.modules["taming"]


def instantiate_from_config(config):
    """taming's ``instantiate_from_config`` (after the shim)."""
    import_taming()
    from taming.main import instantiate_from_config as inst

    return inst(config)


# ----------------------------------------------------------------------------- configs and checkpoints

def load_config(config_path):
    """OmegaConf config of a taming YAML (``model:`` section if present, else the whole file)."""
    from omegaconf import OmegaConf

    path = Path(config_path)
    if not path.is_file():
        raise CortexError(f"taming config not found: {path}. Pass the model's YAML (e.g. "
                          f"vqgan_imagenet_f16_16384/configs/model.yaml) with --vqgan_config / --transformer_config.")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise CortexError(f"{path}: not a readable YAML config ({e})") from e
    if "model" in cfg:
        cfg = cfg.model
    if "target" not in cfg:
        raise CortexError(f"{path}: no 'target' (nor 'model.target') entry; is this a taming model config?")
    return cfg


def prepare_config_for_inference(cfg, keep_loss: bool = False):
    """Copy of ``cfg`` with every ``lossconfig`` -> ``torch.nn.Identity`` and every ``ckpt_path`` -> None."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def walk(node):
        if isinstance(node, DictConfig):
            for key in list(node.keys()):
                if key == "lossconfig" and not keep_loss:
                    node[key] = {"target": "torch.nn.Identity"}
                elif key == "ckpt_path":
                    node[key] = None
                else:
                    walk(node[key])
        elif isinstance(node, ListConfig):
            for item in node:
                walk(item)

    walk(cfg)
    return cfg


def read_state_dict(ckpt_path) -> dict:
    """The state dict inside a Lightning checkpoint (``state_dict``) or a plain state dict file."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CortexError(f"checkpoint not found: {path}. Download it as docs/real_vqgan_data.md says "
                          f"(e.g. vqgan_imagenet_f16_16384/checkpoints/last.ckpt) or fix --vqgan_ckpt / "
                          f"--transformer_ckpt.")
    obj = torch_load_checkpoint(path, "cpu", hint="is the download complete?", note_full_unpickle=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(
            torch.is_tensor(v) for v in obj.values()):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CortexError(f"{path}: neither a Lightning checkpoint (a dict with 'state_dict') nor a plain "
                          f"state dict of tensors")
    return obj


def _is_loss_key(key: str) -> bool:
    return key.startswith("loss.") or ".loss." in key


def _few(keys, n=5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_checked(model, state_dict: dict, ckpt_path, config_path=None) -> None:
    """``model.load_state_dict`` that names the file and a few missing/unexpected/mis-shaped keys.

    Loss weights (``loss.*``, e.g. LPIPS/discriminator in VQGAN checkpoints) are ignored: the loss is
    replaced by Identity for inference. When no key fits but all of them sit under one prefix (the
    VQGAN inside a cin_transformer checkpoint, ``first_stage_model.*``), that part is loaded.
    """
    own = model.state_dict()
    if own and not any(k in state_dict for k in own):
        # e.g. the VQGAN inside a cin_transformer checkpoint: keys under "first_stage_model."
        prefixes = {k[: -len(o)] for k in state_dict for o in own if k.endswith("." + o)}
        for prefix in sorted(prefixes, key=len):
            if all(prefix + k in state_dict for k in own):
                print(f"note: using the '{prefix}*' weights of {Path(ckpt_path).name}")
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
                break
    sd = {k: v for k, v in state_dict.items() if not (_is_loss_key(k) and k not in own)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model): {_few(shapes, 3)}")
        cfg = f" built from {config_path}" if config_path else ""
        raise CortexError(f"{ckpt_path}: the checkpoint does not fit the model{cfg}: " + "; ".join(parts)
                          + ". Is this the checkpoint that goes with that config (VQGAN config with the VQGAN "
                            "checkpoint, cin_transformer config with the transformer checkpoint)?")
    model.load_state_dict(sd, strict=True)


def load_taming_model(config_path, ckpt_path=None, device="cpu", keep_loss: bool = False):
    """Build a taming model from its YAML and load its weights; returns it in eval mode on ``device``.

    config_path: taming YAML (``model: {target, params}`` or ``{target, params}``).
    ckpt_path: Lightning ``.ckpt`` (``state_dict`` inside) or plain state dict; None keeps the random
    initialisation (for tests and timing). Every nested ``ckpt_path`` of the config is dropped and every
    ``lossconfig`` becomes ``torch.nn.Identity`` (unless ``keep_loss``), so one file loads everything.
    """
    import_taming()
    cfg = prepare_config_for_inference(load_config(config_path), keep_loss=keep_loss)
    sd = read_state_dict(ckpt_path) if ckpt_path is not None else None  # check the file before building
    try:
        model = instantiate_from_config(cfg)
    except (ImportError, AttributeError) as e:
        raise CortexError(f"{config_path}: cannot build target {cfg.get('target')!r} ({e})") from e
    except TypeError as e:
        raise CortexError(f"{config_path}: the params do not fit {cfg.get('target')!r} ({e})") from e
    if sd is not None:
        load_state_dict_checked(model, sd, ckpt_path, config_path)
    model = model.eval().to(torch.device(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- VQModel with distances

def vq_distances(quantize, h):
    """Squared distances of every encoder vector to every code, as taming's VectorQuantizer2 computes them.

    h: (B, C, H, W) pre-quantisation features -> (B, H*W, n_codes), row-major positions; argmin over the
    last axis equals the quantiser's indices (same formula, same order of operations).
    """
    from einops import rearrange  # a taming dependency, imported with it

    z = rearrange(h, "b c h w -> b h w c").contiguous()
    zf = z.view(-1, quantize.e_dim)
    w = quantize.embedding.weight
    d = (torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(w ** 2, dim=1)
         - 2 * torch.einsum("bd,dn->bn", zf, rearrange(w, "n d -> d n")))
    return d.view(h.shape[0], h.shape[2] * h.shape[3], -1)


def _make_distance_vqmodel():
    global _DISTANCE_CLS
    if _DISTANCE_CLS is not None:
        return _DISTANCE_CLS
    import_taming()
    from taming.models.vqgan import VQModel

    class DistanceVQModel(VQModel):
        """taming ``VQModel`` whose ``encode`` returns ``quant, emb_loss, info, distances``.

        distances: (B, h*w, n_codes) squared L2 distance of each position's encoder output to each code
        (row-major positions; ``distances.argmin(-1)`` are the token ids). ``forward`` is unchanged.
        """

        def encode(self, x):
            h = self.quant_conv(self.encoder(x))
            quant, emb_loss, info = self.quantize(h)
            return quant, emb_loss, info, vq_distances(self.quantize, h)

        def forward(self, input):
            quant, diff = self.encode(input)[:2]
            return self.decode(quant), diff

    DistanceVQModel.__module__ = __name__
    DistanceVQModel.__qualname__ = "DistanceVQModel"
    _DISTANCE_CLS = DistanceVQModel
    return DistanceVQModel


def __getattr__(name):  # PEP 562: the class exists once taming is imported, on first access
    if name == "DistanceVQModel":
        return _make_distance_vqmodel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
