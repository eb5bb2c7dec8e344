"""Which IEMs each experiment has (SPEC §4): ``build_model``, and telling a state dict's net from its keys."""
from __future__ import annotations

import math
import re

from torch import nn

from cortex.iem.architectures import (EMBED_DIM, GRID, PAPER_WIDTH, ModelArgumentError, PostLNTransformer,
                                      ResSENet, VGGNet, ViTBN)

EXPERIMENTS = ("vqgan", "dalle")
MODEL_IDS = {"vqgan": (1, 2, 3, 4), "dalle": (1, 2, 3)}
DEFAULT_NUM_CLASSES = {"vqgan": 1000, "dalle": 2}
DEFAULT_DEPTH = {("vqgan", 4): 12, ("dalle", 3): 6}  # transformer layers; other nets have no depth
FOLDERS = {"vqgan": "VQGAN_explanation", "dalle": "Dalle_explanation"}


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


def has_depth(experiment: str, model_id: int) -> bool:
    """Whether the net is a transformer (has a ``depth``)."""
    return (experiment, model_id) in DEFAULT_DEPTH


def build_model(experiment: str, model_id: int, num_classes: int, width: int = PAPER_WIDTH,
                depth: int | None = None, code_dim: int | None = None, grid=None) -> nn.Module:
    """ClassificationNet{model_id} of ``experiment`` ("vqgan" | "dalle"), randomly initialised.

    ``depth`` (transformer layers) applies to VQGAN Net4 (default 12) and Dalle Net3 (default 6)
    and is ignored by the convolutional nets. ``code_dim`` D (default 256) and ``grid`` (h, w) (default
    16 x 16): the embeddings ``(B, D, h, w)`` the net reads (``cortex.data.formats.dataset_geometry`` of a dataset).
    """
    _check_model_id(experiment, model_id)
    key = (experiment, model_id)
    if depth is None:
        depth = DEFAULT_DEPTH.get(key)
    geo = dict(code_dim=EMBED_DIM if code_dim is None else code_dim, grid=(GRID, GRID) if grid is None else grid)
    if key in (("vqgan", 1), ("dalle", 1)):
        return VGGNet(num_classes, width, variant=1, **geo)
    if key == ("vqgan", 2):
        return VGGNet(num_classes, width, variant=2, **geo)
    if key in (("vqgan", 3), ("dalle", 2)):
        return ResSENet(num_classes, width, **geo)
    if key == ("vqgan", 4):
        return ViTBN(num_classes, width, depth, **geo)
    return PostLNTransformer(num_classes, width, depth, **geo)       # ("dalle", 3)


# ============================================================================ state-dict inspection

# (experiment, model_id) -> (key of the first layer, key of the final layer); both weights'
# dim 0 give width and num_classes.
_SIGNATURE = {
    ("vqgan", 1): ("conv1_1.weight", "fc3.weight"),
    ("vqgan", 2): ("conv1_1.weight", "fc3.weight"),
    ("vqgan", 3): ("layer1.0.conv1.weight", "fc2.weight"),
    ("vqgan", 4): ("proj.0.weight", "fc.weight"),
    ("dalle", 1): ("conv1_1.weight", "fc3.weight"),
    ("dalle", 2): ("layer1.0.conv1.weight", "fc2.weight"),
    ("dalle", 3): ("proj.weight", "fc.weight"),
}


def identify_architecture(state_dict, experiment: str) -> int | None:
    """Which ClassificationNet of ``experiment`` a state dict belongs to (by its key set), else None."""
    _check_experiment(experiment)
    keys = set(state_dict)
    vgg = "conv1_1.weight" in keys and "fc3.weight" in keys
    resse = "layer1.0.conv1.weight" in keys and "layer1.0.se.fc1.weight" in keys
    vit_bn = "pos_embed" in keys and "proj.0.weight" in keys and "final_norm.weight" in keys
    post_ln = "proj.weight" in keys and "norm.weight" in keys and "pos_embed" not in keys
    if experiment == "vqgan":
        if vgg:
            return 2 if "conv3_1.weight" in keys else 1
        if resse:
            return 3
        if vit_bn:
            return 4
        return None
    if vgg and "conv3_1.weight" not in keys:
        return 1
    if resse:
        return 2
    if post_ln:
        return 3
    return None


def _shape(state_dict, key: str) -> tuple[int, ...]:
    return tuple(state_dict[key].shape)


def infer_hparams(state_dict, experiment: str, model_id: int) -> dict:
    """``{"width", "num_classes", "depth", "code_dim", "grid"}`` read off the state-dict shapes (missing ones
    are None). ``code_dim`` is the first layer's input size; ``grid`` only the ViT's ``pos_embed`` tells (as a
    square grid of its h*w positions; the other nets' weights do not depend on the grid)."""
    first, last = _SIGNATURE[(experiment, model_id)]
    out = {"width": None, "num_classes": None, "depth": None, "code_dim": None, "grid": None}
    if first in state_dict:
        out["width"] = _shape(state_dict, first)[0]
        out["code_dim"] = _shape(state_dict, first)[1]
    if "pos_embed" in state_dict:
        n = _shape(state_dict, "pos_embed")[1] - 1
        g = math.isqrt(max(n, 0))
        out["grid"] = [g, g] if g * g == n and n > 0 else None
    if last in state_dict:
        out["num_classes"] = _shape(state_dict, last)[0]
    if has_depth(experiment, model_id):
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.(\d+)\.", k))}
        out["depth"] = max(layers) + 1 if layers else None
    return out


