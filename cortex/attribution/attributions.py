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

How the model is run (eval mode, SmoothGrad's copy buffers) and the performance helpers (memory budget,
``--fast``) live in :mod:`cortex.attribution.performance`; their names are importable from here too.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .performance import (accumulate_draws, available_memory_bytes, copies_for_budget,  # noqa: F401
                          draw_pieces, eval_mode, fill_copies, fold_batchnorm, memory_per_copy, prepare_fast,
                          scratch, target_logits, top_overlap)

NOISE_SCOPES = ("sample", "batch", "authors")
REDUCTIONS = ("max", "mean", "sum")


# ----------------------------------------------------------------------------- helpers

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


def _check(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got {tuple(inputs.shape)}")
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
    if target.numel() != inputs.shape[0]:
        raise ValueError(f"target has {target.numel()} entries for {inputs.shape[0]} inputs")
    return target


# ----------------------------------------------------------------------------- SmoothGrad

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
                logits = target_logits(model, copies, targets[start:stop])
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
        ref = target_logits(model, x, target)  # (B,)
        img = torch.arange(B, device=x.device).repeat_interleave(P)
        pos = torch.arange(P, device=x.device).repeat(B)
        for start in range(0, B * P, chunk):
            bi, pi = img[start:start + chunk], pos[start:start + chunk]
            copies = x[bi].clone()  # (n, C, H, W)
            r, c = pi // W, pi % W
            ar = torch.arange(len(bi), device=x.device)
            copies[ar, :, r, c] = base[bi, :, r, c]
            drops[bi, pi] = ref[bi] - target_logits(model, copies, target[bi])
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
