"""The TIS scorer: token importance scores of batches, built from the TIS settings (captum style).

    config = TISConfig(attribution="smoothgrad", nsamples=20, seed=0)
    scorer = TISScorer(model, config, device="cpu", codebook=None, copies=None)
    scorer.start()                              # the authors' scope: seeds the global generator once
    noise = scorer.noise(emb, keys)             # per scope, see below; None for a deterministic attribution
    scores = scorer.score(emb, target, noise)   # (B, h*w): float64 for the authors' scope, else float32

emb ``(B, 256, 16, 16)`` (``(B, D, h, w)`` for another tokenizer), target ``(B,)`` long. The scorer owns the noise
of every scope: ``"sample"`` draws image ``b``'s noise from a generator seeded by ``image_seed(seed, keys[b])``
(the filename in a TIS run, the image index in the model-randomisation check), so a score depends neither on the
batch nor on sharding or resuming; ``"batch"`` uses the same draws with one scale over the batch; ``"authors"``
draws, per batch and per sample, one ``torch.normal`` over the batch from the global CPU generator after
``start()`` (``attributions.authors_noise``: the authors' stream; call ``noise`` for every batch of the split in
order, also the batches that need no scores, to keep the stream in step). Used by ``compute_tis``
(:mod:`cortex.attribution.tis`) and ``model_randomisation.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..utils import CortexError
from .attributions import (ATTRIBUTIONS, NOISE_SCOPES, authors_noise, get_attribution, image_seed, reduce_channels,
                           smoothgrad_from_noise, standard_noise, token_scores)
from .performance import available_memory_bytes, copies_for_budget, memory_per_copy


@dataclass
class TISConfig:
    """The TIS settings: everything that changes the scores is in ``score_key`` (-> ``tis_config.json``)."""

    attribution: str = "smoothgrad"
    method: str | None = None          # channel reduction; None = the attribution's natural one
    nsamples: int = 20
    stdev_spread: float = 0.2
    noise_scope: str = "sample"
    seed: int = 0
    ig_steps: int = 32
    fast: bool = False                 # BN folding + channels-last (+ bf16 for allowed nets on CUDA)
    max_copies_per_pass: int | None = None  # memory knob (None: from max_memory_gb; 0: all); not in the key
    max_memory_gb: float | None = None      # memory budget (None: 50% of the free memory); not in the key

    def __post_init__(self):
        get_attribution(self.attribution)
        if self.method in ("ave", "avg"):
            self.method = "mean"
        if self.noise_scope not in NOISE_SCOPES:
            raise CortexError(f"--noise_scope {self.noise_scope!r}: use one of {', '.join(NOISE_SCOPES)}")
        if self.noise_scope == "authors" and self.attribution != "smoothgrad":
            raise CortexError(f"--noise_scope authors reproduces the authors' SmoothGrad; it cannot be used with "
                              f"--attribution {self.attribution}")
        if self.nsamples < 1:
            raise CortexError(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise CortexError(f"--max_memory_gb must be > 0, got {self.max_memory_gb}")

    @property
    def reduction(self) -> str:
        return self.method or ATTRIBUTIONS[self.attribution].reduction

    def score_key(self) -> dict:
        """The settings that change the scores (the memory knobs are left out)."""
        d = asdict(self)
        d.pop("max_copies_per_pass")
        d.pop("max_memory_gb")
        d["method"] = self.reduction
        a = ATTRIBUTIONS[self.attribution]
        if not a.stochastic:
            for k in ("nsamples", "stdev_spread", "noise_scope", "seed"):
                d.pop(k)
        if self.attribution != "integrated_gradients":
            d.pop("ig_steps")
        return d


class TISScorer:
    """Scores of batches for one ``TISConfig`` (see the module docstring). model: the IEM (eval mode, on
    ``device``); codebook ``(n_codes, D)``: the baseline of integrated gradients / occlusion (its mean vector; zeros
    when None); copies: noisy / interpolated / occluded copies per forward+backward pass (None: all at once)."""

    def __init__(self, model: torch.nn.Module, config: TISConfig, device="cpu", codebook=None,
                 copies: int | None = None):
        self.model, self.config, self.device, self.copies = model, config, torch.device(device), copies
        self.attribution = ATTRIBUTIONS[config.attribution]
        self.authors = config.noise_scope == "authors"
        self.workspace: dict = {}  # buffers reused from batch to batch (smoothgrad's copy buffer)
        cb = None if codebook is None else torch.as_tensor(codebook, dtype=torch.float32, device=self.device)
        self.opts = dict(nsamples=config.nsamples, stdev_spread=config.stdev_spread, noise_scope=config.noise_scope,
                         codebook=cb, n_steps=config.ig_steps, max_copies_per_pass=copies, workspace=self.workspace)

    def start(self) -> None:
        """The authors' scope: ``torch.manual_seed(seed)`` once, before the first batch's noise."""
        if self.authors:
            torch.manual_seed(self.config.seed)

    def noise(self, emb: torch.Tensor, keys) -> torch.Tensor | None:
        """The noise of one batch ``(nsamples, B, ...)`` (authors: already scaled), or None (deterministic)."""
        if self.authors:
            return authors_noise(emb, self.config.nsamples, self.config.stdev_spread)
        if not self.attribution.stochastic:
            return None
        return standard_noise(self.config.nsamples, emb.shape[1:],
                              seeds=[image_seed(self.config.seed, k) for k in keys], device=self.device)

    def score(self, emb: torch.Tensor, target: torch.Tensor, noise, model: torch.nn.Module | None = None):
        """Per-position TIS ``(B, h*w)`` of ``model`` (default: the scorer's) for the targets."""
        model = self.model if model is None else model
        if self.authors:
            g = smoothgrad_from_noise(model, emb, target, noise, self.copies, out_dtype=torch.float64,
                                      workspace=self.workspace)
            return reduce_channels(g, self.config.reduction)
        return token_scores(self.config.attribution, model, emb, target, method=self.config.reduction, noise=noise,
                            **self.opts)


def resolve_copies(config: TISConfig, model, device, shape=(256, 16, 16)) -> int | None:
    """Copies per forward+backward pass: ``max_copies_per_pass`` if given (0: all), else from the budget.
    shape: one embedding (D, h, w), the paper's (256, 16, 16) by default."""
    if config.max_copies_per_pass is not None:
        return config.max_copies_per_pass or None
    free, where = available_memory_bytes(device)
    budget = config.max_memory_gb * 2 ** 30 if config.max_memory_gb else 0.5 * free
    per = memory_per_copy(model, torch.zeros(1, *shape, device=device))
    copies = copies_for_budget(budget, per)
    src = f"--max_memory_gb {config.max_memory_gb}" if config.max_memory_gb else f"50% of {free / 2**30:.1f} GiB ({where})"
    print(f"memory: budget {budget / 2**30:.2f} GiB ({src}), {per / 2**20:.1f} MiB per copy (measured) -> "
          f"{copies} copies per forward+backward pass")
    return copies
