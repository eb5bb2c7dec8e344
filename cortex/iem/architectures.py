"""The Information Extraction Models (IEMs) of SPEC §4: one class per distinct architecture.

Every IEM reads a token-based embedding ``(B, 256, 16, 16)`` and returns raw logits
``(B, num_classes)``. Other tokenizers: ``code_dim`` D and ``grid`` (h, w) build a net for
``(B, D, h, w)`` embeddings -- the first layer takes D channels, the transformers' positions are h*w+1
long, and the VGG nets average-pool their map to 4x4 when it is not already 4x4. The defaults (256,
16 x 16) build exactly the paper's nets. The classes are shared by both experiments
(``cortex.iem.registry`` says which ClassificationNet each one is):

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
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from cortex.data.formats import check_geometry
from cortex.utils import CortexError

EMBED_DIM = 256        # channels of a token embedding (VQGAN codebook vectors)
GRID = 16              # tokens per side: 16 x 16 = 256 positions
NUM_POSITIONS = GRID * GRID
PAPER_WIDTH = 512
NUM_HEADS = 8


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


def _init_sequence_model(model: nn.Module, num_classes: int, width: int, depth: int, code_dim: int, grid) -> None:
    """What both transformer IEMs set first: the checked sizes and ``cls_token`` (1, 1, width), registered
    before anything else (the authors' state-dict order)."""
    model.num_classes, model.width = _check_num_classes(num_classes), _check_width(width)
    model.depth = _check_depth(depth)
    model.code_dim, model.grid = _check_geometry(code_dim, grid)
    model.cls_token = nn.Parameter(torch.zeros(1, 1, width))


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
        _init_sequence_model(self, num_classes, width, depth, code_dim, grid)
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
        _init_sequence_model(self, num_classes, width, depth, code_dim, grid)
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

