"""Token attributions for an IEM (captum style).

Every attribution is a function

    attr(model, inputs, target, **opts) -> Tensor

with ``inputs`` the token-based embeddings ``(B, 256, 16, 16)``, ``target`` the class index of each
image ``(B,)`` long, and the result one attribution value per input element ``(B, 256, 16, 16)``.
``reduce_channels`` turns it into one score per grid position ``(B, 256)``, flattened row-major
(``p = row * 16 + col``), which is the Token Importance Score (TIS) of SPEC §1.

- ``smoothgrad``            the paper's score: mean gradient of the raw target logit at noisy copies.
- ``smoothgrad_x_input``    SmoothGrad times the embedding (what each element contributes to first order).
- ``integrated_gradients``  captum's IntegratedGradients from a baseline (mean codebook vector).
- ``occlusion``             target-logit drop when one position's token is replaced by the baseline.

``ATTRIBUTIONS[name].reduction`` is each attribution's natural channel reduction (``max`` for the
paper's SmoothGrad, ``sum`` for the contribution scores, ``mean`` for occlusion whose value is
broadcast over the channels). All functions run the model in eval mode (restored afterwards), so
BatchNorm/Dropout never mix the images of a batch and one backward of the summed target logits gives
every copy the gradient of its own logit.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from cortex.iem.registry import bf16_allowed

NOISE_SCOPES = ("sample", "batch", "authors")
REDUCTIONS = ("max", "mean", "sum")


# ----------------------------------------------------------------------------- helpers

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


def image_seed(seed: int, key) -> int:
    """A 63-bit generator seed derived from ``(seed, key)``; ``key`` is an image index or filename.

    Stable across runs, machines and Python versions (no ``hash()``), so an image gets the same noise
    whatever batch it lands in.
    """
    h = hashlib.blake2b(f"{int(seed)}\x1f{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def standard_noise(nsamples: int, shape: Sequence[int], seeds: Sequence[int] | None = None,
                   generator: torch.Generator | None = None, batch_size: int | None = None,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard-normal draws ``(nsamples, B, *shape)``.

    With ``seeds`` (one int per image, e.g. from ``image_seed``) image ``b``'s draws come from its own
    generator seeded by ``seeds[b]``, so they do not depend on the other images of the batch. The draws
    are made on ``device`` (CUDA draws are fast but differ from CPU draws: the same seed gives the same
    scores on the same kind of device). Otherwise all draws come from ``generator`` (or the global RNG)
    in one stream of ``batch_size`` images.
    """
    shape = tuple(shape)
    if seeds is not None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        per_image = []
        for s in seeds:
            g = torch.Generator(device=dev)
            g.manual_seed(int(s))
            per_image.append(torch.randn((nsamples, *shape), generator=g, dtype=dtype, device=dev))
        z = torch.stack(per_image, dim=1) if per_image else torch.zeros((nsamples, 0, *shape), dtype=dtype, device=dev)
    else:
        if batch_size is None:
            raise ValueError("standard_noise: give seeds or batch_size")
        z = torch.randn((nsamples, batch_size, *shape), generator=generator, dtype=dtype)
    return z.to(device) if device is not None else z


def noise_scale(inputs: torch.Tensor, stdev_spread: float, noise_scope: str = "sample") -> torch.Tensor:
    """SmoothGrad's standard deviation ``stdev_spread * (max - min)``.

    ``noise_scope="sample"``: per image, shape ``(B, 1, 1, 1)`` (a score depends only on its image);
    ``"batch"`` / ``"authors"``: over the whole batch, shape ``(1, 1, 1, 1)`` (the seed code; depends on
    ``--batch_size``).
    """
    if noise_scope not in NOISE_SCOPES:
        raise ValueError(f"noise_scope must be one of {NOISE_SCOPES}, got {noise_scope!r}")
    x = inputs.detach()
    if noise_scope in ("batch", "authors"):
        return (stdev_spread * (x.max() - x.min())).reshape(1, *([1] * (x.dim() - 1)))
    flat = x.reshape(x.shape[0], -1)
    rng = flat.max(dim=1).values - flat.min(dim=1).values
    return (stdev_spread * rng).reshape(-1, *([1] * (x.dim() - 1)))


def _target_logits(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Raw target logit of each row of ``x``: ``(N,)``."""
    out = model(x)
    return out.gather(1, target.reshape(-1, 1).to(out.device)).squeeze(1)


def _check(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got {tuple(inputs.shape)}")
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
    if target.numel() != inputs.shape[0]:
        raise ValueError(f"target has {target.numel()} entries for {inputs.shape[0]} inputs")
    return target


# ----------------------------------------------------------------------------- SmoothGrad

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


def smoothgrad_from_noise(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, noise: torch.Tensor,
                          max_copies_per_pass: int | None = None, out_dtype: torch.dtype | None = None,
                          noise_sd: torch.Tensor | None = None, workspace: dict | None = None) -> torch.Tensor:
    """Mean input-gradient of the raw target logit over the noisy copies ``inputs + noise * noise_sd``.

    inputs ``(B, C, H, W)``; target ``(B,)``; noise ``(S, B, C, H, W)``, already scaled when ``noise_sd`` is
    None, else standard normal and scaled here by ``noise_sd`` (``(B, 1, 1, 1)`` or ``(1, 1, 1, 1)``, see
    ``noise_scale``; the same float32 product as scaling it beforehand, without a scaled copy of the noise).
    Returns ``(B, C, H, W)``: ``1/S * sum_s d logit_target(inputs + noise[s]) / d x``, in ``out_dtype``
    (default: the inputs' dtype).

    The ``S*B`` copies (copy ``j = s*B + b``: draw ``s`` of image ``b``) go through the model in chunks of
    at most ``max_copies_per_pass`` (default: all at once): one forward and one backward of the summed
    target logits per chunk. In eval mode the copies do not interact, so each copy receives exactly the
    gradient of its own target logit. The per-copy gradients are summed in float64 in draw order (as the
    authors' script does), so the result does not depend on the chunking.

    Performance: a chunk is cut into per-draw pieces with Python integers (``draw_pieces``); each piece
    is written into one reused copy buffer (noise x sd, + inputs) and its gradient added, widened to float64
    on the fly, to the ``(B, C, H, W)`` float64 sum with one slice ``add_``. No mask, no ``index_add``, no
    float64 copy of the gradients and no host-device synchronisation inside the loop: on a GPU the whole call
    is queued without waiting. ``workspace`` (a dict kept by the caller across calls, e.g. one per TIS run)
    keeps the copy buffer from one call to the next (on CPU this saves the page faults of a fresh buffer).
    """
    target = _check(inputs, target)
    S, B = noise.shape[0], noise.shape[1]
    if tuple(noise.shape[1:]) != tuple(inputs.shape):
        raise ValueError(f"noise {tuple(noise.shape)} does not match inputs {tuple(inputs.shape)}")
    x = inputs.detach()
    noise = noise.detach().to(x.device, x.dtype)
    sd = None
    if noise_sd is not None:
        sd = noise_sd.detach().to(x.device, x.dtype)
        sd = sd.expand(B, *sd.shape[1:]) if sd.shape[0] == 1 else sd  # (B, 1, 1, 1)
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)  # (B, C, H, W)
    n = S * B
    chunk = n if not max_copies_per_pass or max_copies_per_pass <= 0 else min(int(max_copies_per_pass), n)
    targets = target.repeat(S)  # (S*B,): target of copy j = s*B + b is target[b]
    buf = scratch(workspace, "copies", (chunk, *x.shape[1:]), x.dtype, x.device)  # (chunk, C, H, W), reused
    with eval_mode(model):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            pieces = draw_pieces(start, stop, B)
            fill_copies(buf, x, noise, sd, pieces)
            copies = buf[:stop - start].detach().requires_grad_(True)  # (m, C, H, W)
            with torch.enable_grad():
                logits = _target_logits(model, copies, targets[start:stop])
                (grad,) = torch.autograd.grad(logits.sum(), copies)
            accumulate_draws(total, grad, pieces)
            del logits, grad, copies
    return (total / S).to(out_dtype or x.dtype)


def smoothgrad(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, nsamples: int = 20,
               stdev_spread: float = 0.2, noise_scope: str = "sample", seeds: Sequence[int] | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               max_copies_per_pass: int | None = None, workspace: dict | None = None) -> torch.Tensor:
    """SmoothGrad of the raw target logit (SPEC §1 step 2), without absolute value.

    inputs ``(B, 256, 16, 16)``; target ``(B,)`` long. Returns ``(B, 256, 16, 16)``.

    ``nsamples`` Gaussian draws with standard deviation ``stdev_spread * (max - min)`` taken per image
    (``noise_scope="sample"``) or over the whole batch (``"batch"``, as the seed code; ``"authors"``: also
    the seed's random stream, see ``authors_noise``; its result is float64 as the seed's). The draws come
    from ``noise`` (standard normal, ``(nsamples, B, 256, 16, 16)``) if given, else from per-image
    generators seeded by ``seeds`` (see ``image_seed``; makes scores independent of the batch), else
    from ``generator``/the global RNG. ``max_copies_per_pass`` bounds the noisy copies per
    forward/backward (memory knob); ``workspace`` keeps buffers across calls (see ``smoothgrad_from_noise``).
    Neither changes the result.
    """
    target = _check(inputs, target)
    B = inputs.shape[0]
    if noise is None and noise_scope == "authors":
        scaled = authors_noise(inputs, nsamples, stdev_spread)
        return smoothgrad_from_noise(model, inputs, target, scaled, max_copies_per_pass, out_dtype=torch.float64,
                                     workspace=workspace)
    if noise is None:
        noise = standard_noise(nsamples, inputs.shape[1:], seeds=seeds, generator=generator, batch_size=B,
                               device=inputs.device, dtype=inputs.dtype)
    elif noise.shape[0] != nsamples:
        nsamples = noise.shape[0]
    sd = noise_scale(inputs, stdev_spread, noise_scope)  # (B|1, 1, 1, 1); the noise is scaled chunk by chunk
    return smoothgrad_from_noise(model, inputs, target, noise, max_copies_per_pass,
                                 out_dtype=torch.float64 if noise_scope == "authors" else None, noise_sd=sd,
                                 workspace=workspace)


def authors_noise(inputs: torch.Tensor, nsamples: int, stdev_spread: float) -> torch.Tensor:
    """The authors' SmoothGrad noise for one batch, drawn exactly as their ``TIS_computation.py``.

    inputs ``(B, C, H, W)``. Returns the scaled noise ``(nsamples, B, C, H, W)`` on the inputs' device.
    Their loop: ``stdev = stdev_spread * (max(batch) - min(batch))`` (one scale for the whole batch),
    then for each of the ``nsamples`` draws one ``torch.normal(mean=0, std=stdev, size=batch.shape)``
    from the *global CPU* generator (then moved to the device). Calling this once per batch, batches in
    the dataset's order after one ``torch.manual_seed(seed)``, reproduces their draws on any device;
    calling it for a batch that needs no scores keeps the stream in step (resume, shards).
    """
    x = inputs.detach()
    stdev = stdev_spread * (torch.max(x) - torch.min(x))
    draws = [torch.normal(mean=0, std=stdev, size=x.shape).to(x.device) for _ in range(nsamples)]
    return torch.stack(draws)  # (S, B, C, H, W)


def smoothgrad_x_input(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, **smoothgrad_opts) -> torch.Tensor:
    """SmoothGrad times the input, elementwise: ``(B, 256, 16, 16)``.

    Reduced with ``sum`` over channels it is the first-order contribution of each position's token
    (gradient · embedding). Options as ``smoothgrad``.
    """
    return smoothgrad(model, inputs, target, **smoothgrad_opts) * inputs.detach()


# ----------------------------------------------------------------------------- baselines

def baseline_tensor(inputs: torch.Tensor, baseline: torch.Tensor | None = None,
                    codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Baseline of the same shape as ``inputs`` ``(B, C, H, W)``.

    ``baseline`` may be a full tensor, a per-channel vector ``(C,)`` or a scalar; otherwise the mean
    codebook vector (``codebook`` ``(n_codes, C)``) at every position; otherwise zeros.
    """
    if baseline is None and codebook is not None:
        cb = torch.as_tensor(codebook)
        baseline = cb.float().mean(dim=0)
    if baseline is None:
        return torch.zeros_like(inputs)
    b = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    if b.dim() == 1:
        b = b.reshape(1, -1, 1, 1)
    return b.expand_as(inputs).contiguous()


# ----------------------------------------------------------------------------- integrated gradients

def integrated_gradients(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *,
                         baseline: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
                         n_steps: int = 32, max_copies_per_pass: int | None = None) -> torch.Tensor:
    """Integrated gradients (captum) from ``baseline_tensor(inputs, baseline, codebook)``.

    inputs ``(B, 256, 16, 16)``; target ``(B,)``. Returns ``(B, 256, 16, 16)`` whose sum over all
    elements approximates ``logit(x) - logit(baseline)``. ``max_copies_per_pass`` is captum's
    ``internal_batch_size``.
    """
    from captum.attr import IntegratedGradients

    target = _check(inputs, target)
    base = baseline_tensor(inputs, baseline, codebook)
    with eval_mode(model), torch.enable_grad():
        ig = IntegratedGradients(model)
        attr = ig.attribute(inputs.detach(), baselines=base, target=target, n_steps=n_steps,
                            internal_batch_size=max_copies_per_pass or None)
    return attr.detach()


# ----------------------------------------------------------------------------- occlusion

@torch.no_grad()
def occlusion(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *,
              baseline: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
              max_copies_per_pass: int | None = None) -> torch.Tensor:
    """Token occlusion: ``logit(x) - logit(x with position p replaced by the baseline vector)``.

    inputs ``(B, C, H, W)``; target ``(B,)``. Returns ``(B, C, H, W)`` with each position's drop
    broadcast over the channels (reduce with ``mean``/``max`` to get it back). The ``B * H * W``
    occluded copies run in batches of ``max_copies_per_pass`` (default 256).
    """
    target = _check(inputs, target)
    x = inputs.detach()
    B, C, H, W = x.shape
    P = H * W
    base = baseline_tensor(x, baseline, codebook)
    chunk = int(max_copies_per_pass) if max_copies_per_pass and max_copies_per_pass > 0 else 256
    drops = torch.empty(B, P, dtype=x.dtype, device=x.device)
    with eval_mode(model):
        ref = _target_logits(model, x, target)  # (B,)
        img = torch.arange(B, device=x.device).repeat_interleave(P)
        pos = torch.arange(P, device=x.device).repeat(B)
        for start in range(0, B * P, chunk):
            bi, pi = img[start:start + chunk], pos[start:start + chunk]
            copies = x[bi].clone()  # (n, C, H, W)
            r, c = pi // W, pi % W
            ar = torch.arange(len(bi), device=x.device)
            copies[ar, :, r, c] = base[bi, :, r, c]
            drops[bi, pi] = ref[bi] - _target_logits(model, copies, target[bi])
    return drops.reshape(B, 1, H, W).expand(B, C, H, W).contiguous()


# ----------------------------------------------------------------------------- reduction and registry

def reduce_channels(attr: torch.Tensor, method: str = "max") -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W)`` per-position scores, row-major (``p = row * W + col``).

    ``method``: ``max`` (the paper's default), ``mean`` (the seed's ``ave``; ``ave`` accepted) or ``sum``.
    """
    method = {"ave": "mean", "avg": "mean"}.get(method, method)
    if method == "max":
        red = attr.max(dim=1).values
    elif method == "mean":
        red = attr.mean(dim=1)
    elif method == "sum":
        red = attr.sum(dim=1)
    else:
        raise ValueError(f"method must be one of max, mean (ave), sum; got {method!r}")
    return red.reshape(attr.shape[0], -1)


@dataclass(frozen=True)
class Attribution:
    name: str
    fn: Callable[..., torch.Tensor]
    reduction: str       # natural channel reduction
    stochastic: bool     # uses noise (seeds matter)
    uses_baseline: bool  # uses the mean codebook vector


ATTRIBUTIONS: dict[str, Attribution] = {
    "smoothgrad": Attribution("smoothgrad", smoothgrad, "max", True, False),
    "smoothgrad_x_input": Attribution("smoothgrad_x_input", smoothgrad_x_input, "sum", True, False),
    "integrated_gradients": Attribution("integrated_gradients", integrated_gradients, "sum", False, True),
    "occlusion": Attribution("occlusion", occlusion, "mean", False, True),
}


# Where the paper's SmoothGrad is known to fail (docs/attributions.md, docs/bias_detection.md), by what it is used for.
_SMOOTHGRAD_FAILS = {
    "bias": "its bias sign changes with the training seed (planted direction found on 2-3 of 5 seeds, "
            "docs/bias_detection.md#across-seeds)",
    "concept tokens": "it finds one attribute's tokens only and keeps a rank correlation of ~0.7 with the trained "
                      "IEM's scores after randomising the model (docs/attributions.md)",
}


def smoothgrad_caveat(attribution: str, use: str) -> str | None:
    """The one console line a script prints when it uses the paper's SmoothGrad for ``use`` (``"bias"`` or
    ``"concept tokens"``): where SmoothGrad is known to fail, and the alternative; None for other attributions."""
    if attribution != "smoothgrad":
        return None
    return (f"note: --attribution smoothgrad (the paper's, the default) for {use}: {_SMOOTHGRAD_FAILS[use]}; "
            "check with --attribution smoothgrad_x_input")


def print_smoothgrad_caveat(attribution: str, use: str) -> None:
    line = smoothgrad_caveat(attribution, use)
    if line:
        print(line, flush=True)


def get_attribution(name: str) -> Attribution:
    try:
        return ATTRIBUTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attribution {name!r}; choose from {sorted(ATTRIBUTIONS)}") from None


def _accepted(fn: Callable, opts: dict) -> dict:
    """The subset of ``opts`` that ``fn`` (or ``smoothgrad`` for ``smoothgrad_x_input``) accepts."""
    target = smoothgrad if fn is smoothgrad_x_input else fn
    names = set(inspect.signature(target).parameters)
    return {k: v for k, v in opts.items() if k in names and v is not None}


def attribute(name: str, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, **opts) -> torch.Tensor:
    """Run attribution ``name`` with the options it accepts (others are ignored): ``(B, 256, 16, 16)``."""
    a = get_attribution(name)
    return a.fn(model, inputs, target, **_accepted(a.fn, opts))


def token_scores(name: str, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                 method: str | None = None, **opts) -> torch.Tensor:
    """Per-position TIS ``(B, 256)``: attribution ``name`` reduced over channels by ``method``
    (default: the attribution's natural reduction, ``max`` for the paper's SmoothGrad)."""
    a = get_attribution(name)
    return reduce_channels(attribute(name, model, inputs, target, **opts), method or a.reduction)


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
        _target_logits(model, x, target).sum()
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
                (g,) = torch.autograd.grad(_target_logits(model, xs, t.expand(n)).sum(), xs)
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
