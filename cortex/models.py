"""The Information Extraction Models (IEMs) of SPEC §4, ``build_model`` and IEM checkpoint I/O.

Every IEM reads a token-based embedding ``(B, 256, 16, 16)`` and returns raw logits
``(B, num_classes)``. Other tokenizers (issue 15): ``code_dim`` D and ``grid`` (h, w) build a net for
``(B, D, h, w)`` embeddings -- the first layer takes D channels, the transformers' positions are h*w+1
long, and the VGG nets average-pool their map to 4x4 when it is not already 4x4. The defaults (256,
16 x 16) build exactly the paper's nets. One class per distinct architecture, shared by both experiments:

=====================  ==========================  =================
class                  VQGAN_explanation           Dalle_explanation
=====================  ==========================  =================
``VGGNet``             Net1 (variant 1), Net2 (2)  Net1 (variant 1)
``ResSENet``           Net3                        Net2
``ViTBN``              Net4                        -
``PostLNTransformer``  -                           Net3
=====================  ==========================  =================

At the default ``width=512`` the state-dict keys and shapes equal
``shared/fixtures/state_dict_shapes.json``, so the authors' checkpoints load with
``strict=True``. A smaller ``width`` (a multiple of 8) scales every hidden size with it
(fc 4096 = 8·width, 2048 = 4·width, 1024 = 2·width, MLP 2048 = 4·width) for tests and CPU demos.

Checkpoints: ``save_iem`` writes the plain ``state_dict`` plus a ``config.json`` beside it;
``load_iem`` rebuilds the net (from explicit values, else ``config.json``, else the state-dict
shapes, else the paper defaults) and loads it strictly, with errors that say what to do.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from cortex.utils import CortexError, atomic_torch_save, atomic_write

EMBED_DIM = 256        # channels of a token embedding (VQGAN codebook vectors)
GRID = 16              # tokens per side: 16 x 16 = 256 positions
NUM_POSITIONS = GRID * GRID
PAPER_WIDTH = 512
NUM_HEADS = 8

EXPERIMENTS = ("vqgan", "dalle")
MODEL_IDS = {"vqgan": (1, 2, 3, 4), "dalle": (1, 2, 3)}
DEFAULT_NUM_CLASSES = {"vqgan": 1000, "dalle": 2}
DEFAULT_DEPTH = {("vqgan", 4): 12, ("dalle", 3): 6}  # transformer layers; other nets have no depth
FOLDERS = {"vqgan": "VQGAN_explanation", "dalle": "Dalle_explanation"}


class ModelArgumentError(CortexError, ValueError):
    """A bad model argument (``--model``, ``--width``, ``--depth``, ...): a CortexError and a ValueError."""


def _check_width(width: int) -> int:
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0 or width % NUM_HEADS:
        raise ModelArgumentError(
            f"--width {width!r}: the IEM width must be a positive multiple of {NUM_HEADS} "
            f"(it is split over {NUM_HEADS} attention heads); the paper uses {PAPER_WIDTH}")
    return width


def _check_depth(depth: int) -> int:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
        raise ModelArgumentError(f"--depth {depth!r}: the number of transformer layers must be a positive integer")
    return depth


def _check_geometry(code_dim: int, grid) -> tuple[int, tuple[int, int]]:
    """``(D, (h, w))`` as positive ints, else a ModelArgumentError."""
    from cortex.data.formats import check_geometry

    try:
        h, w, d = check_geometry(grid, code_dim, "IEM geometry")
    except CortexError as e:
        raise ModelArgumentError(str(e)) from None
    return d, (h, w)


def _check_num_classes(num_classes: int) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ModelArgumentError(f"--num_classes {num_classes!r}: must be a positive integer")
    return num_classes


# ============================================================================ VGG-like (Net1, Net2)

class VGGNet(nn.Module):
    """VGG-like IEM: VQGAN Net1 / Dalle Net1 (``variant=1``) and VQGAN Net2 (``variant=2``).

    ``conv1_1..conv1_4`` (3x3, pad 1) + ``bn1_i`` + ReLU, ``maxpool1``; ``conv2_1..conv2_4`` +
    ``bn2_i`` + ReLU, ``maxpool2``; variant 2 adds ``conv3_1, conv3_2`` (+ ``bn3_i``, ReLU);
    flatten (width·4·4) -> ``fc1`` 8·width + ``bn_fc1`` + ReLU + Dropout(0.5) -> ``fc2`` (8·width for
    variant 1, 4·width for variant 2) + ``bn_fc2`` + ReLU -> ``fc3`` (num_classes).
    ``code_dim`` D: input channels of ``conv1_1``; ``grid`` (h, w), each side >= 4: after the two max-pools
    the (h/4, w/4) map is average-pooled to 4x4 (skipped at 16 x 16, where it already is 4x4).
    """

    def __init__(self, num_classes: int, width: int = PAPER_WIDTH, variant: int = 1, code_dim: int = EMBED_DIM,
                 grid=(GRID, GRID)):
        super().__init__()
        if variant not in (1, 2):
            raise ModelArgumentError(f"VGGNet variant must be 1 or 2, got {variant!r}")
        self.num_classes, self.width = _check_num_classes(num_classes), _check_width(width)
        self.code_dim, self.grid = _check_geometry(code_dim, grid)
        if min(self.grid) < 4:
            raise ModelArgumentError(f"grid {self.grid}: the VGG IEMs (ClassificationNet1/2) max-pool twice and need "
                                     f"at least 4x4 tokens; use the ResNet or a transformer IEM")
        self.variant, self.depth = variant, None
        w = width

        def conv_bn(prefix: str, i: int, c_in: int) -> None:
            setattr(self, f"conv{prefix}_{i}", nn.Conv2d(c_in, w, kernel_size=3, padding=1))
            setattr(self, f"bn{prefix}_{i}", nn.BatchNorm2d(w))

        for i in range(1, 5):
            conv_bn("1", i, self.code_dim if i == 1 else w)
        self.maxpool1 = nn.MaxPool2d(2, 2)
        for i in range(1, 5):
            conv_bn("2", i, w)
        self.maxpool2 = nn.MaxPool2d(2, 2)
        self.block_sizes = {"1": 4, "2": 4}
        if variant == 2:
            for i in range(1, 3):
                conv_bn("3", i, w)
            self.block_sizes["3"] = 2

        hidden2 = 8 * w if variant == 1 else 4 * w
        self.fc1 = nn.Linear(w * (GRID // 4) ** 2, 8 * w)
        self.bn_fc1 = nn.BatchNorm1d(8 * w)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8 * w, hidden2)
        self.bn_fc2 = nn.BatchNorm1d(hidden2)
        self.fc3 = nn.Linear(hidden2, num_classes)

    def _block(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        for i in range(1, self.block_sizes[prefix] + 1):
            x = F.relu(getattr(self, f"bn{prefix}_{i}")(getattr(self, f"conv{prefix}_{i}")(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (B, 256, 16, 16) | (B, D, h, w)
        x = self.maxpool1(self._block(x, "1"))                # (B, w, 8, 8)
        x = self.maxpool2(self._block(x, "2"))                # (B, w, 4, 4) | (B, w, h/4, w/4)
        if (self.grid[0] // 4, self.grid[1] // 4) != (4, 4):  # static (not x.shape): fx-traceable for --fast
            x = F.adaptive_avg_pool2d(x, 4)                   # (B, w, 4, 4)
        if self.variant == 2:
            x = self._block(x, "3")                           # (B, w, 4, 4)
        x = torch.flatten(x, 1)                               # (B, w*16)
        x = self.dropout(F.relu(self.bn_fc1(self.fc1(x))))    # (B, 8w)
        x = F.relu(self.bn_fc2(self.fc2(x)))                  # (B, 8w | 4w)
        return self.fc3(x)                                    # (B, num_classes)


# ============================================================================ ResNet + SE (VQGAN Net3, Dalle Net2)

class SEBlock(nn.Module):
    """Squeeze-excitation: global mean -> ``fc1`` C->C/16 (floor 1) -> ReLU -> ``fc2`` -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, C, H, W)
        s = x.mean(dim=(2, 3))                                 # (B, C)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))       # (B, C)
        return x * s[:, :, None, None]                         # (B, C, H, W)


class ResSEBlock(nn.Module):
    """``conv1`` 3x3 ``bn1`` ReLU ``conv2`` 3x3 ``bn2``, + ``shortcut``, then ``se``, then ReLU.

    The shortcut is a 1x1 conv (stride ``stride``, no bias) + BN when the shape changes, else identity.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        self.se = SEBlock(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, C_in, H, W)
        out = F.relu(self.bn1(self.conv1(x)))                  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        out = self.se(out)
        return F.relu(out)                                     # (B, C_out, H/s, W/s)


class ResSENet(nn.Module):
    """ResNet with squeeze-excitation: VQGAN Net3 / Dalle Net2.

    ``layer1`` = 3 blocks 256->width (first stride 2), ``layer2`` = 3 blocks width->width (first
    stride 2); adaptive avg-pool -> ``fc1`` 4·width + ``bn_fc1`` + ReLU + Dropout(0.4) -> ``fc2``.
    ``code_dim`` D: input channels of ``layer1``'s first block; any ``grid`` (h, w) (recorded only).
    """

    def __init__(self, num_classes: int, width: int = PAPER_WIDTH, blocks: int = 3, code_dim: int = EMBED_DIM,
                 grid=(GRID, GRID)):
        super().__init__()
        self.num_classes, self.width, self.depth = _check_num_classes(num_classes), _check_width(width), None
        self.code_dim, self.grid = _check_geometry(code_dim, grid)
        w = width
        self.layer1 = self._make_layer(self.code_dim, w, blocks, stride=2)
        self.layer2 = self._make_layer(w, w, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(w, 4 * w)
        self.bn_fc1 = nn.BatchNorm1d(4 * w)
        self.dropout = nn.Dropout(0.4)
        self.fc2 = nn.Linear(4 * w, num_classes)

    @staticmethod
    def _make_layer(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [ResSEBlock(c_in, c_out, stride)]
        layers += [ResSEBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, 256, 16, 16)
        x = self.layer1(x)                                     # (B, w, 8, 8)
        x = self.layer2(x)                                     # (B, w, 4, 4)
        x = torch.flatten(self.pool(x), 1)                     # (B, w)
        x = self.dropout(F.relu(self.bn_fc1(self.fc1(x))))     # (B, 4w)
        return self.fc2(x)                                     # (B, num_classes)


# ============================================================================ transformers (VQGAN Net4, Dalle Net3)

def embedding_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """``(B, 256, 16, 16)`` -> ``(B, 256 positions, 256 channels)``, positions row-major (p = r*16 + k)."""
    return x.flatten(2).transpose(1, 2)


def _mlp(dim: int, hidden: int, dropout: float, final_dropout: bool) -> nn.Sequential:
    """Linear, GELU, Dropout, Linear[, Dropout]: state-dict names ``mlp.0`` and ``mlp.3``."""
    layers = [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)]
    if final_dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _pre_classifier(dim: int, dropout: float) -> nn.Sequential:
    """Linear dim->2·dim, LayerNorm, GELU, Dropout (``pre_classifier.0`` / ``.1``)."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Dropout(dropout))


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the embedding channel of a ``(B, L, D)`` sequence (statistics over B and L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, L, D)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ViTBNLayer(nn.Module):
    """Pre-LN encoder layer with BatchNorm after the attention and the MLP (VQGAN Net4).

    x = x + Dropout(bn_attn(MHA(norm1(x)))); x = x + bn_mlp(mlp(norm2(x))).
    """

    def __init__(self, dim: int, heads: int = NUM_HEADS, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.bn_attn = ChannelBatchNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio * dim, dropout, final_dropout=True)
        self.bn_mlp = ChannelBatchNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, L, D)
        h = self.norm1(x)
        h, _ = self.self_attn(h, h, h, need_weights=False)     # attends across the L positions
        x = x + self.dropout(self.bn_attn(h))
        x = x + self.bn_mlp(self.mlp(self.norm2(x)))
        return x                                               # (B, L, D)


class ViTBN(nn.Module):
    """ViT with BatchNorm (VQGAN Net4).

    Positions as a sequence of 256 vectors -> ``proj`` (Linear 256->width, LayerNorm, GELU) ->
    ·√width -> prepend ``cls_token`` -> + ``pos_embed`` (1, 257, width) -> Dropout(0.2) ->
    ``depth`` ``ViTBNLayer`` (``encoder.i``) -> ``final_norm`` -> cls -> ``pre_classifier`` -> ``fc``.
    Every dropout (embedding, attention weights, attention branch, both MLP dropouts, pre-classifier)
    is 0.2, as the authors' ClassificationNet4. ``code_dim`` D: ``proj`` input; ``grid`` (h, w): ``pos_embed``
    is (1, h*w+1, width).
    """

    def __init__(self, num_classes: int, width: int = PAPER_WIDTH, depth: int = 12, dropout: float = 0.2,
                 code_dim: int = EMBED_DIM, grid=(GRID, GRID)):
        super().__init__()
        self.num_classes, self.width = _check_num_classes(num_classes), _check_width(width)
        self.depth = _check_depth(depth)
        self.code_dim, self.grid = _check_geometry(code_dim, grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, width))
        self.proj = nn.Sequential(nn.Linear(self.code_dim, width), nn.LayerNorm(width), nn.GELU())
        self.embed_dropout = nn.Dropout(0.2)
        self.encoder = nn.ModuleList([ViTBNLayer(width, NUM_HEADS, 4, dropout) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width)
        self.pre_classifier = _pre_classifier(width, dropout)
        self.fc = nn.Linear(2 * width, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, 256, 16, 16)
        x = self.proj(embedding_to_sequence(x))                # (B, 256, w)
        x = x * math.sqrt(self.width)
        cls = self.cls_token.expand(x.shape[0], -1, -1)        # (B, 1, w)
        x = torch.cat([cls, x], dim=1) + self.pos_embed        # (B, 257, w)
        x = self.embed_dropout(x)
        for layer in self.encoder:
            x = layer(x)                                       # (B, 257, w)
        x = self.final_norm(x)[:, 0]                           # (B, w) the cls token
        return self.fc(self.pre_classifier(x))                 # (B, num_classes)


class PostLNLayer(nn.Module):
    """Post-LN encoder layer (Dalle Net3): x = norm1(x + Dropout(MHA(x))); x = norm2(x + Dropout(mlp(x))).

    As the authors' layer, ``mlp`` itself ends with a Dropout (Linear, GELU, Dropout, Linear, Dropout), so the
    MLP branch is dropped out twice after its last Linear (``mlp.4`` then ``dropout2``).
    """

    def __init__(self, dim: int, heads: int = NUM_HEADS, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        # batch_first=True: attention runs across positions. The seed fed (B, 257, D) to a
        # sequence-first MHA, so it attended across the images of a batch; same state dict.
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = _mlp(dim, mlp_ratio * dim, dropout, final_dropout=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, L, D)
        h, _ = self.self_attn(x, x, x, need_weights=False)
        x = self.norm1(x + self.dropout1(h))
        x = self.norm2(x + self.dropout2(self.mlp(x)))
        return x                                               # (B, L, D)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine position table ``(length, dim)`` (Vaswani et al.): sin on even, cos on odd channels."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]                          # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (D/2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class PostLNTransformer(nn.Module):
    """Post-LN transformer (Dalle Net3).

    ``proj`` Linear 256->width (no norm) -> prepend zero-initialised ``cls_token`` -> + fixed
    sinusoidal positions (a non-persistent buffer, not in the state dict) -> Dropout(0.1) ->
    ``depth`` ``PostLNLayer`` (``encoder.i``) -> ``norm`` -> cls -> ``pre_classifier`` -> ``fc``.
    ``code_dim`` D: ``proj`` input; ``grid`` (h, w): the positions are h*w+1 long.
    """

    def __init__(self, num_classes: int, width: int = PAPER_WIDTH, depth: int = 6, dropout: float = 0.1,
                 code_dim: int = EMBED_DIM, grid=(GRID, GRID)):
        super().__init__()
        self.num_classes, self.width = _check_num_classes(num_classes), _check_width(width)
        self.depth = _check_depth(depth)
        self.code_dim, self.grid = _check_geometry(code_dim, grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.proj = nn.Linear(self.code_dim, width)
        n_pos = self.grid[0] * self.grid[1]
        self.register_buffer("positions", sinusoidal_positions(n_pos + 1, width)[None], persistent=False)
        self.embed_dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList([PostLNLayer(width, NUM_HEADS, 4, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pre_classifier = _pre_classifier(width, dropout)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, 256, 16, 16)
        x = self.proj(embedding_to_sequence(x))                # (B, 256, w)
        cls = self.cls_token.expand(x.shape[0], -1, -1)        # (B, 1, w)
        x = torch.cat([cls, x], dim=1) + self.positions        # (B, 257, w)
        x = self.embed_dropout(x)
        for layer in self.encoder:
            x = layer(x)                                       # (B, 257, w)
        x = self.norm(x)[:, 0]                                 # (B, w) the cls token
        return self.fc(self.pre_classifier(x))                 # (B, num_classes)


# ============================================================================ build

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


def _torch_load(path: Path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    except (RuntimeError, EOFError, OSError) as e:
        raise CortexError(f"{path}: cannot read the checkpoint ({e}); is it a torch .pth file?") from None
    # Lightning checkpoints may pickle hyper-parameters (e.g. an argparse Namespace); the file is
    # the user's own checkpoint, so fall back to a full unpickle.
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a readable checkpoint"
        raise CortexError(f"{path}: cannot read the checkpoint ({e}); is it a torch .pth file?") from None


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
    sd = unwrap_state_dict(_torch_load(path, map_location), where=str(path))

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
                "depth": DEFAULT_DEPTH.get((experiment, model_id)), **_GEOMETRY}
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
