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

NOISE_SCOPES = ("sample", "batch")
REDUCTIONS = ("max", "mean", "sum")


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
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
    ``"batch"``: over the whole batch, shape ``(1, 1, 1, 1)`` (the seed code; depends on ``--batch_size``).
    """
    if noise_scope not in NOISE_SCOPES:
        raise ValueError(f"noise_scope must be one of {NOISE_SCOPES}, got {noise_scope!r}")
    x = inputs.detach()
    if noise_scope == "batch":
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

def smoothgrad_from_noise(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, noise: torch.Tensor,
                          max_copies_per_pass: int | None = None) -> torch.Tensor:
    """Mean input-gradient of the raw target logit over the noisy copies ``inputs + noise``.

    inputs ``(B, C, H, W)``; target ``(B,)``; noise ``(S, B, C, H, W)`` already scaled.
    Returns ``(B, C, H, W)``: ``1/S * sum_s d logit_target(inputs + noise[s]) / d x``.

    The ``S*B`` copies go through the model in chunks of at most ``max_copies_per_pass`` (default:
    all at once): one forward and one backward of the summed target logits per chunk. In eval mode the
    copies do not interact, so each copy receives exactly the gradient of its own target logit.
    """
    target = _check(inputs, target)
    S, B = noise.shape[0], noise.shape[1]
    if tuple(noise.shape[1:]) != tuple(inputs.shape):
        raise ValueError(f"noise {tuple(noise.shape)} does not match inputs {tuple(inputs.shape)}")
    x = inputs.detach()
    total = torch.zeros_like(x)
    n = S * B
    chunk = n if not max_copies_per_pass or max_copies_per_pass <= 0 else int(max_copies_per_pass)
    img_of_copy = torch.arange(B, device=x.device).repeat(S)  # copy j = s*B + b -> image b
    noise_flat = noise.reshape(n, *x.shape[1:])
    with eval_mode(model), torch.enable_grad():
        for start in range(0, n, chunk):
            idx = img_of_copy[start:start + chunk]
            copies = (x[idx] + noise_flat[start:start + chunk].to(x.device, x.dtype)).requires_grad_(True)
            logits = _target_logits(model, copies, target[idx])
            (grad,) = torch.autograd.grad(logits.sum(), copies)
            total.index_add_(0, idx, grad.detach())
    return total / S


def smoothgrad(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, nsamples: int = 20,
               stdev_spread: float = 0.2, noise_scope: str = "sample", seeds: Sequence[int] | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               max_copies_per_pass: int | None = None) -> torch.Tensor:
    """SmoothGrad of the raw target logit (SPEC §1 step 2), without absolute value.

    inputs ``(B, 256, 16, 16)``; target ``(B,)`` long. Returns ``(B, 256, 16, 16)``.

    ``nsamples`` Gaussian draws with standard deviation ``stdev_spread * (max - min)`` taken per image
    (``noise_scope="sample"``) or over the whole batch (``"batch"``, as the seed code). The draws come
    from ``noise`` (standard normal, ``(nsamples, B, 256, 16, 16)``) if given, else from per-image
    generators seeded by ``seeds`` (see ``image_seed``; makes scores independent of the batch), else
    from ``generator``/the global RNG. ``max_copies_per_pass`` bounds the noisy copies per
    forward/backward (memory knob).
    """
    target = _check(inputs, target)
    B = inputs.shape[0]
    if noise is None:
        noise = standard_noise(nsamples, inputs.shape[1:], seeds=seeds, generator=generator, batch_size=B,
                               device=inputs.device, dtype=inputs.dtype)
    elif noise.shape[0] != nsamples:
        nsamples = noise.shape[0]
    sd = noise_scale(inputs, stdev_spread, noise_scope)  # (B|1, 1, 1, 1)
    scaled = noise.to(inputs.device, inputs.dtype) * sd.unsqueeze(0)
    return smoothgrad_from_noise(model, inputs, target, scaled, max_copies_per_pass)


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
