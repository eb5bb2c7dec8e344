"""The IEM registry (SPEC §4): one entry per ClassificationNet of each experiment.

An entry carries everything the rest of the code needs to know about an IEM: its architecture class and
fixed constructor arguments, its default depth (transformers only), the state-dict signature that tells its
checkpoints apart from the other nets', and its ``--fast`` flags. The scripts' ``--model`` choices
(:func:`model_choices`), :func:`build_model`, checkpoint identification (:func:`identify_architecture`,
:func:`infer_hparams`), the experiment folders' ``ClassificationNet{m}`` names (:func:`authors_class`) and
``--fast``'s bf16 allow-list all read these entries. A new IEM is one class (``cortex.iem.architectures``)
plus one :func:`register_iem` call::

    register_iem(IEMEntry("vqgan", 5, MyNet, signature=StateDictSignature(first="stem.weight", last="head.weight",
                                                                            requires=("stem.weight", "head.weight"))))
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import nn

from cortex.iem.architectures import (EMBED_DIM, GRID, PAPER_WIDTH, ModelArgumentError, PostLNTransformer,
                                      ResSENet, VGGNet, ViTBN)

EXPERIMENTS = ("vqgan", "dalle")
DEFAULT_NUM_CLASSES = {"vqgan": 1000, "dalle": 2}
FOLDERS = {"vqgan": "VQGAN_explanation", "dalle": "Dalle_explanation"}


@dataclass(frozen=True)
class StateDictSignature:
    """How to recognise an IEM's state dict and read its sizes off it.

    ``requires``: keys every checkpoint of the net has; ``absent``: keys none has (they tell it from a sibling,
    e.g. VQGAN Net1 has no ``conv3_1``). ``first``: the first layer's weight, whose dim 0 is ``width`` and dim 1
    the token embedding's size ``code_dim``; ``last``: the classifier's weight, whose dim 0 is ``num_classes``.
    """
    first: str
    last: str
    requires: tuple[str, ...]
    absent: tuple[str, ...] = ()

    def matches(self, keys: set) -> bool:
        return all(k in keys for k in self.requires) and not any(k in keys for k in self.absent)


_VGG = StateDictSignature("conv1_1.weight", "fc3.weight", requires=("conv1_1.weight", "fc3.weight"),
                          absent=("conv3_1.weight",))
_VGG_CONV3 = StateDictSignature("conv1_1.weight", "fc3.weight",
                                requires=("conv1_1.weight", "fc3.weight", "conv3_1.weight"))
_RESSE = StateDictSignature("layer1.0.conv1.weight", "fc2.weight",
                            requires=("layer1.0.conv1.weight", "layer1.0.se.fc1.weight"))
_VIT_BN = StateDictSignature("proj.0.weight", "fc.weight", requires=("pos_embed", "proj.0.weight", "final_norm.weight"))
_POST_LN = StateDictSignature("proj.weight", "fc.weight", requires=("proj.weight", "norm.weight"), absent=("pos_embed",))


@dataclass(frozen=True)
class IEMEntry:
    """ClassificationNet{model_id} of ``experiment``: ``cls(num_classes, width, **kwargs[, depth=...],
    code_dim=..., grid=...)``.

    ``depth``: the default number of transformer layers, None for a net without layers (``--depth`` is then
    ignored). ``bf16``: ``--fast`` may run it under bf16 autocast on CUDA (allowed only where the bf16 TIS keep
    >= 99 % of the exact top-20 positions: measured on an H100 at paper width, VQGAN Net3 99.8 %; Net1 75 %,
    Net4 98.8 % are not allowed). ``description``: one line for the authors' class's docstring.
    """
    experiment: str
    model_id: int
    cls: type
    signature: StateDictSignature
    kwargs: dict = field(default_factory=dict)
    depth: int | None = None
    bf16: bool = False
    description: str = ""


IEMS: dict[tuple[str, int], IEMEntry] = {}
MODEL_IDS: dict[str, tuple[int, ...]] = {e: () for e in EXPERIMENTS}   # kept in step with IEMS by register_iem


def register_iem(entry: IEMEntry) -> IEMEntry:
    """Add ``entry`` (replacing one with the same experiment and model id); returns it."""
    if entry.experiment not in EXPERIMENTS:
        raise ModelArgumentError(f"unknown experiment {entry.experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    IEMS[(entry.experiment, entry.model_id)] = entry
    MODEL_IDS[entry.experiment] = tuple(sorted(m for e, m in IEMS if e == entry.experiment))
    return entry


def unregister_iem(experiment: str, model_id: int) -> None:
    """Remove an entry added by :func:`register_iem` (tests)."""
    del IEMS[(experiment, model_id)]
    MODEL_IDS[experiment] = tuple(sorted(m for e, m in IEMS if e == experiment))


for _entry in (
    IEMEntry("vqgan", 1, VGGNet, _VGG, {"variant": 1}, description="VGG-like: 2 x 4 conv layers, fc 4096-4096"),
    IEMEntry("vqgan", 2, VGGNet, _VGG_CONV3, {"variant": 2}, description="Net1 plus conv3_1, conv3_2; fc 4096-2048"),
    IEMEntry("vqgan", 3, ResSENet, _RESSE, bf16=True, description="ResNet with squeeze-excitation"),
    IEMEntry("vqgan", 4, ViTBN, _VIT_BN, depth=12, description="Pre-LN ViT with BatchNorm, 12 layers by default"),
    IEMEntry("dalle", 1, VGGNet, _VGG, {"variant": 1}, description="VGG-like, as VQGAN_explanation's Net1"),
    IEMEntry("dalle", 2, ResSENet, _RESSE, description="ResNet with squeeze-excitation, as VQGAN_explanation's Net3"),
    IEMEntry("dalle", 3, PostLNTransformer, _POST_LN, depth=6,
             description="Post-LN transformer, 6 layers by default, fixed sinusoidal positions"),
):
    register_iem(_entry)


def _check_experiment(experiment: str) -> str:
    if experiment not in EXPERIMENTS:
        raise ModelArgumentError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    return experiment


def _check_model_id(experiment: str, model_id: int) -> int:
    choices = MODEL_IDS[_check_experiment(experiment)]
    if model_id not in choices or isinstance(model_id, bool):
        raise ModelArgumentError(
            f"--model {model_id!r} is not an IEM of {FOLDERS[experiment]}; "
            f"valid choices: {', '.join(map(str, choices))}")
    return model_id


def iem_entry(experiment: str, model_id: int) -> IEMEntry:
    """The registry entry of ClassificationNet{model_id} of ``experiment`` (ModelArgumentError if none)."""
    return IEMS[(experiment, _check_model_id(experiment, model_id))]


def model_choices(experiment: str) -> tuple[int, ...]:
    """The ``--model`` choices of ``experiment``'s scripts."""
    return MODEL_IDS[_check_experiment(experiment)]


def has_depth(experiment: str, model_id: int) -> bool:
    """Whether the net is a transformer (has a ``depth``)."""
    return iem_entry(experiment, model_id).depth is not None


def default_depth(experiment: str, model_id: int) -> int | None:
    """The net's default number of transformer layers (None for a net without layers)."""
    return iem_entry(experiment, model_id).depth


def bf16_allowed(net: tuple[str, int] | None) -> bool:
    """Whether ``--fast`` may use bf16 autocast (on CUDA) for ``net`` = ``(experiment, model_id)``."""
    return net is not None and tuple(net) in IEMS and IEMS[tuple(net)].bf16


def build_model(experiment: str, model_id: int, num_classes: int, width: int = PAPER_WIDTH,
                depth: int | None = None, code_dim: int | None = None, grid=None) -> nn.Module:
    """ClassificationNet{model_id} of ``experiment`` ("vqgan" | "dalle"), randomly initialised.

    ``depth`` (transformer layers) applies to the nets with a default depth (VQGAN Net4: 12, Dalle Net3: 6)
    and is ignored by the others. ``code_dim`` D (default 256) and ``grid`` (h, w) (default 16 x 16): the
    embeddings ``(B, D, h, w)`` the net reads (``cortex.data.formats.dataset_geometry`` of a dataset).
    """
    entry = iem_entry(experiment, model_id)
    layers = {} if entry.depth is None else {"depth": entry.depth if depth is None else depth}
    geo = dict(code_dim=EMBED_DIM if code_dim is None else code_dim, grid=(GRID, GRID) if grid is None else grid)
    return entry.cls(num_classes, width, **entry.kwargs, **layers, **geo)


def authors_class(experiment: str, model_id: int) -> type:
    """``ClassificationNet{model_id}`` under the authors' name and defaults (``num_classes`` of the experiment,
    ``width`` 512, the default ``depth``): ``ClassificationNet1()`` builds the paper's net. The experiment
    folders' ``model.py`` export these."""
    entry = iem_entry(experiment, model_id)
    n_classes = DEFAULT_NUM_CLASSES[experiment]
    if entry.depth is None:
        def __init__(self, num_classes: int = n_classes, width: int = PAPER_WIDTH):
            entry.cls.__init__(self, num_classes, width, **entry.kwargs)
    else:
        def __init__(self, num_classes: int = n_classes, width: int = PAPER_WIDTH, depth: int = entry.depth):
            entry.cls.__init__(self, num_classes, width, **entry.kwargs, depth=depth)
    name = f"ClassificationNet{model_id}"
    doc = f"{entry.description} (SPEC §4 {FOLDERS[experiment]} Net{model_id})."
    return type(name, (entry.cls,), {"__init__": __init__, "__doc__": doc, "__qualname__": name,
                                      "__module__": entry.cls.__module__})


# ============================================================================ state-dict inspection

def identify_architecture(state_dict, experiment: str) -> int | None:
    """Which ClassificationNet of ``experiment`` a state dict belongs to (by its key set), else None."""
    keys = set(state_dict)
    for model_id in MODEL_IDS[_check_experiment(experiment)]:
        if IEMS[(experiment, model_id)].signature.matches(keys):
            return model_id
    return None


def _shape(state_dict, key: str) -> tuple[int, ...]:
    return tuple(state_dict[key].shape)


def infer_hparams(state_dict, experiment: str, model_id: int) -> dict:
    """``{"width", "num_classes", "depth", "code_dim", "grid"}`` read off the state-dict shapes (missing ones
    are None). ``code_dim`` is the first layer's input size; ``grid`` only the ViT's ``pos_embed`` tells (as a
    square grid of its h*w positions; the other nets' weights do not depend on the grid)."""
    sig = iem_entry(experiment, model_id).signature
    out = {"width": None, "num_classes": None, "depth": None, "code_dim": None, "grid": None}
    if sig.first in state_dict:
        out["width"] = _shape(state_dict, sig.first)[0]
        out["code_dim"] = _shape(state_dict, sig.first)[1]
    if "pos_embed" in state_dict:
        n = _shape(state_dict, "pos_embed")[1] - 1
        g = math.isqrt(max(n, 0))
        out["grid"] = [g, g] if g * g == n and n > 0 else None
    if sig.last in state_dict:
        out["num_classes"] = _shape(state_dict, sig.last)[0]
    if has_depth(experiment, model_id):
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.(\d+)\.", k))}
        out["depth"] = max(layers) + 1 if layers else None
    return out
