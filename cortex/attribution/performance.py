"""How the attributions run the IEM, and the TIS run's performance helpers (re-exported by
:mod:`cortex.attribution.attributions`):

- ``eval_mode`` / ``target_logits``: the model in eval mode, the raw target logit of each row;
- ``scratch`` / ``draw_pieces`` / ``fill_copies`` / ``accumulate_draws``: SmoothGrad's reused copy buffer and its
  per-draw pieces (``smoothgrad_from_noise``);
- the memory budget: ``available_memory_bytes``, ``memory_per_copy``, ``copies_for_budget``;
- ``--fast``: ``fold_batchnorm``, ``prepare_fast`` and ``top_overlap`` (the exact-vs-fast check).

None of them changes a score (``--fast`` is recorded in ``tis_config.json``: with bf16 it does).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from cortex.iem.registry import bf16_allowed


# ----------------------------------------------------------------------------- running the model

@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards.

    A model already wholly in eval mode is left untouched (no ``train()`` walk over every module twice per
    call: a fixed per-batch cost of the TIS loop)."""
    if not any(m.training for m in model.modules()):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

def target_logits(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Raw target logit of each row of ``x``: ``(N,)``."""
    out = model(x)
    return out.gather(1, target.reshape(-1, 1).to(out.device)).squeeze(1)


# ----------------------------------------------------------------------------- SmoothGrad's copy buffers

def scratch(workspace: dict | None, name: str, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, taken from ``workspace[name]`` when it is large enough (same dtype
    and device), else allocated (and stored there when ``workspace`` is a dict). Contents are garbage."""
    numel = 1
    for d in shape:
        numel *= int(d)
    t = workspace.get(name) if workspace is not None else None
    if t is None or t.dtype != dtype or t.device != torch.device(device) or t.numel() < numel:
        t = torch.empty(numel, dtype=dtype, device=device)
        if workspace is not None:
            workspace[name] = t
    return t[:numel].view(*shape)


def draw_pieces(start: int, stop: int, B: int) -> list[tuple[int, int, int, int]]:
    """Copies ``[start, stop)`` (copy ``j = s*B + b``) cut into per-draw pieces ``(s, b0, b1, r0)``.

    Piece ``(s, b0, b1, r0)``: draw ``s`` of images ``b0..b1-1``, rows ``r0..r0+b1-b0-1`` of the chunk.
    Pure Python integers: cutting a chunk never waits for the device.
    """
    pieces, j = [], start
    while j < stop:
        s, b0 = divmod(j, B)
        b1 = min(B, b0 + stop - j)
        pieces.append((s, b0, b1, j - start))
        j += b1 - b0
    return pieces


@torch.no_grad()
def fill_copies(buf: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, sd: torch.Tensor | None,
                pieces: list[tuple[int, int, int, int]]) -> None:
    """Write a chunk's noisy copies into ``buf`` ``(>= m, C, H, W)``: rows of piece ``(s, b0, b1, r0)`` are
    ``x[b0:b1] + noise[s, b0:b1] * sd[b0:b1]`` (``sd`` None: noise already scaled). x ``(B, C, H, W)``,
    noise ``(S, B, C, H, W)``, sd ``(B, 1, 1, 1)``. Same float32 operations as ``x + noise * sd``.

    Consecutive whole draws (``b0 = 0, b1 = B``) are written by one broadcast multiply and one add, so a chunk
    of whole draws costs two kernels whatever ``S``."""
    B, i = x.shape[0], 0
    while i < len(pieces):
        s, b0, b1, r0 = pieces[i]
        k = i + 1
        while b0 == 0 and b1 == B and k < len(pieces) and pieces[k][1:3] == (0, B):
            k += 1
        nd, nb = k - i, b1 - b0  # nd draws of images b0..b1-1
        rows = buf[r0:r0 + nd * nb].view(nd, nb, *x.shape[1:])  # (nd, nb, C, H, W)
        if sd is None:
            torch.add(x[b0:b1], noise[s:s + nd, b0:b1], out=rows)
        else:
            torch.mul(noise[s:s + nd, b0:b1], sd[b0:b1], out=rows)
            rows.add_(x[b0:b1])
        i = k


@torch.no_grad()
def accumulate_draws(total: torch.Tensor, grad: torch.Tensor, pieces: list[tuple[int, int, int, int]]) -> None:
    """Add a chunk's per-copy gradients ``grad`` ``(m, C, H, W)`` to the float64 sums ``total`` ``(B, C, H, W)``.

    One slice ``add_`` per piece ``(s, b0, b1, r0)``, pieces in draw order, the float32 gradient widened to
    float64 inside the add: every image's draws are summed in ascending ``s`` whatever the chunking (the
    same sums as adding ``grad.double()`` copy by copy)."""
    for s, b0, b1, r0 in pieces:
        total[b0:b1].add_(grad[r0:r0 + b1 - b0])


# ----------------------------------------------------------------------------- performance: memory budget

def available_memory_bytes(device) -> tuple[int, str]:
    """Memory free for the TIS copies on ``device``: ``(bytes, where it was read)``.

    CUDA: the GPU's free memory (``torch.cuda.mem_get_info``); CPU: ``MemAvailable`` of ``/proc/meminfo``,
    else ``psutil.virtual_memory().available``, else 8 GiB (a guess, said so).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable of /proc/meminfo"
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "psutil available memory"
    except ImportError:
        return 8 << 30, "unknown (assumed 8 GiB)"


def _saved_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward of ``x``."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        target_logits(model, x, target).sum()
    return sum(seen.values())


def memory_per_copy(model: nn.Module, example: torch.Tensor, target: torch.Tensor | int = 0) -> int:
    """Measured bytes one noisy copy costs in a forward+backward pass of ``model``.

    example ``(1, C, H, W)`` (or more rows: the first is used), on the model's device. CUDA: peak allocated
    memory of a 4-copy minus a 2-copy forward+backward, halved (the weights cancel out). CPU: bytes of the
    tensors autograd saves for backward in a 3-copy minus a 1-copy forward, halved, times 1.5 for the
    transient buffers of forward and backward, plus the copy, its gradient and its float64 sum.
    """
    x = example[:1].detach()
    t = torch.as_tensor(target, device=x.device).long().reshape(-1)[:1]
    extra = 3 * x.numel() * x.element_size() + x.numel() * 8
    with eval_mode(model), torch.enable_grad():
        if x.device.type == "cuda":
            peaks = []
            for n in (2, 4):
                torch.cuda.synchronize(x.device)
                torch.cuda.reset_peak_memory_stats(x.device)
                base = torch.cuda.memory_allocated(x.device)
                xs = x.expand(n, *x.shape[1:]).clone().requires_grad_(True)
                (g,) = torch.autograd.grad(target_logits(model, xs, t.expand(n)).sum(), xs)
                del g, xs
                torch.cuda.synchronize(x.device)
                peaks.append(torch.cuda.max_memory_allocated(x.device) - base)
            per = (peaks[1] - peaks[0]) / 2
            return int(max(per, peaks[0] / 2, 1)) + extra
        s1 = _saved_bytes(model, x, t)
        s3 = _saved_bytes(model, x.expand(3, *x.shape[1:]).clone(), t.expand(3))
    return int(max((s3 - s1) / 2, 1) * 1.5) + extra


def copies_for_budget(budget_bytes: float, per_copy_bytes: int, cap: int = 1 << 16) -> int:
    """Copies per forward+backward pass that fit ``budget_bytes``: ``floor(budget / per copy)``, >= 1."""
    return int(max(1, min(cap, budget_bytes // max(per_copy_bytes, 1))))


# ----------------------------------------------------------------------------- performance: --fast

def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the conv/linear feeding it.

    Traces ``model`` with ``torch.fx``; a ``BatchNorm2d`` whose input is the output of a ``Conv2d`` used
    only by it (or a ``BatchNorm1d`` on the 2-D output of a ``Linear``, or a ``models.ChannelBatchNorm`` on
    the channel axis of a ``Linear``'s ``(B, L, C)`` output; eval-mode Dropouts between them are skipped)
    is removed and the conv/linear
    weights become ``W * g / sqrt(var + eps)``, bias ``(b - mean) * g / sqrt(var + eps) + beta``. In eval
    mode the result equals the model up to float rounding. Returns ``(folded model, number of folds)``;
    the original is untouched. A model fx cannot trace is returned as an eval copy with 0 folds.
    """
    import copy

    import torch.fx as fx

    base = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(base)
    except Exception:  # noqa: BLE001 - untraceable models simply run unfolded
        return base, 0
    mods = dict(gm.named_modules())
    folds = 0
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        prev = node.args[0]
        # eval-mode Dropout is the identity: look through it (the ViT's MLP ends with one)
        while (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(mods[prev.target], nn.Dropout)
               and len(prev.users) == 1):
            prev = prev.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        lin = mods[prev.target]
        # BatchNorm1d on a (N, C) Linear output, or on the channel (last) axis of a (B, L, C) one
        # (models.ChannelBatchNorm), normalises the Linear's output features
        bn1d_ok = type(bn) is nn.BatchNorm1d or type(bn).__name__ == "ChannelBatchNorm"
        ok = (type(bn) is nn.BatchNorm2d and type(lin) is nn.Conv2d) or (bn1d_ok and type(lin) is nn.Linear)
        if not ok or bn.running_mean is None:
            continue
        with torch.no_grad():
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            w = lin.weight
            lin.weight = nn.Parameter(w * scale.reshape(-1, *([1] * (w.dim() - 1))), requires_grad=False)
            b = lin.bias if lin.bias is not None else torch.zeros_like(bn.running_mean)
            lin.bias = nn.Parameter((b - bn.running_mean) * scale + shift, requires_grad=False)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        folds += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), folds


class _FastWrapper(nn.Module):
    """Runs ``inner`` on channels-last inputs, optionally under bf16 autocast; float32 logits out."""

    def __init__(self, inner: nn.Module, bf16: bool):
        super().__init__()
        self.inner, self.bf16 = inner, bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 256, 16, 16) -> (B, num_classes)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.inner(x).float()
        return self.inner(x)


def prepare_fast(model: nn.Module, device, net: tuple[str, int] | None = None) -> tuple[nn.Module, dict]:
    """The ``--fast`` model: BatchNorm folded, channels-last, bf16 autocast on CUDA only for the nets whose
    registry entry allows it (``cortex.iem.registry.bf16_allowed``).

    Returns ``(model on device in eval mode, info)`` with info ``{"bn_folds", "channels_last", "bf16"}``
    (recorded in ``tis_config.json``: it changes the scores beyond float rounding when bf16 is on).
    """
    device = torch.device(device)
    folded, n = fold_batchnorm(model.to(device))
    folded = folded.to(device).to(memory_format=torch.channels_last)
    for p in folded.parameters():
        p.requires_grad_(False)
    bf16 = device.type == "cuda" and bf16_allowed(net)
    return _FastWrapper(folded, bf16).eval(), {"bn_folds": n, "channels_last": True, "bf16": bf16}


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 20) -> float:
    """Mean over rows of ``|top-k positions of a  &  top-k positions of b| / k``; a, b ``(B, P)``."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    inter = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb)]
    return sum(inter) / (k * max(len(inter), 1))
