"""Codebook-level evaluation (``eval/codebook_level_explanation.py``): the tokens (Gumbel-softmax over the codebook)
or the embedding of a region are optimised so that the IEM's target logit rises; the result is decoded (nearest
code -> VQ decoder) and scored by the evaluators."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import trange

from ..data.formats import GRID, embedding_to_ids, ids_to_embedding, square_grid
from ..data import real_common
from ..data.tokenizers import SyntheticTokenizer, TamingTokenizer, as_tokenizer
from ..utils import CortexError
from .evaluators import class_logit_prob, evaluator_logits


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"0:5,1:6"`` -> [(0, 5), (1, 6)] (source label : target label)."""
    pairs = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        a, sep, b = part.partition(":")
        if not sep:
            raise CortexError(f"--pairs {text!r}: write source:target pairs separated by commas, e.g. 0:5,1:6")
        try:
            pairs.append((int(a), int(b)))
        except ValueError:
            raise CortexError(f"--pairs {text!r}: labels must be integers (e.g. 0:5,1:6)") from None
    if not pairs:
        raise CortexError(f"--pairs {text!r}: no pairs")
    return pairs


PAPER_LABELS = tuple(l for l in range(10, 21) if l != 15)  # the paper's source labels; target = 30 - label


PAPER_TARGET_SUM = 30


def label_pairs(labels=None, target_sum: int | None = None, pairs: str | None = None) -> list[tuple[int, int]]:
    """(source, target) pairs: ``--pairs`` if given, else each of ``labels`` (default: the paper's 10..20 except
    15) with target ``target_sum - label`` (default 30)."""
    if pairs:
        return parse_pairs(pairs)
    labels = PAPER_LABELS if labels is None else labels
    target_sum = PAPER_TARGET_SUM if target_sum is None else target_sum
    return [(int(l), int(target_sum) - int(l)) for l in labels]


def codebook_pairs(present_labels, n_classes: int, labels=None, target_sum: int | None = None,
                   pairs: str | None = None) -> tuple[list[tuple[int, int]], str | None]:
    """The codebook-level (source, target) pairs and a note when they are not the ones asked for.

    Explicit ``pairs`` / ``labels`` / ``target_sum`` are used as given. With none of them: the paper's pairs
    (labels 10..20 except 15, target 30 - label) when each source has test images (``present_labels``) and
    each target is a class (< ``n_classes``); otherwise the paper's rule carried over to the labels present --
    sorted present labels ``L``, pairs ``L[i] -> L[K-1-i]`` (the paper mirrors 10..20 around its middle and
    drops the middle label 15, which would map to itself) -- with a note saying so.
    """
    if pairs or labels is not None or target_sum is not None:
        return label_pairs(labels, target_sum, pairs), None
    paper = label_pairs()
    present = sorted({int(l) for l in present_labels if 0 <= int(l) < n_classes})
    if all(s in present and 0 <= t < n_classes for s, t in paper):
        return paper, None
    K = len(present)
    mirrored = [(present[i], present[K - 1 - i]) for i in range(K) if i != K - 1 - i]
    if not mirrored:
        raise CortexError(f"the paper's labels 10..20 are not in this dataset and it has fewer than two labels "
                          f"({present}); pass --pairs source:target")
    note = (f"note: the paper's label pairs 10..20 (except 15) -> 30 - label are not all in this dataset (test labels "
            f"{present[0]}..{present[-1]}, {n_classes} classes); using the same mirror rule on the labels present: "
            + ", ".join(f"{s}->{t}" for s, t in mirrored) + " (choose others with --pairs or --labels/--target_sum)")
    return mirrored, note


def default_region(grid=(GRID, GRID)) -> tuple[tuple[int, int], tuple[int, int]]:
    """The codebook-level region of a (h, w) grid, ``((r0, r1), (c0, c1))`` inclusive: the central quarter of each
    side, placed as the paper's rows/cols 7..10 of 16 (a side s = round(n/4) (>= 1) starting at n/2 - s/2 + 1,
    kept inside the grid): 7..10 at 16, 4..5 at 8, 13..20 at 32."""
    def side(n: int) -> tuple[int, int]:
        s = max(1, round(n / 4))
        start = max(0, min(n // 2 - s // 2 + 1, n - s))
        return start, start + s - 1

    return side(int(grid[0])), side(int(grid[1]))


def region_positions(rows=(7, 10), cols=(7, 10), grid=(GRID, GRID)) -> np.ndarray:
    """Row-major positions ``r*w + c`` of the token rows r0..r1 x cols c0..c1 (inclusive) of an (h, w) grid."""
    h, w = int(grid[0]), int(grid[1])
    r0, r1 = int(rows[0]), int(rows[1])
    c0, c1 = int(cols[0]), int(cols[1])
    if not (0 <= r0 <= r1 < h and 0 <= c0 <= c1 < w):
        raise CortexError(f"--rows {r0} {r1} --cols {c0} {c1}: the region must lie in the {h}x{w} token grid "
                          f"(rows 0..{h - 1}, cols 0..{w - 1}, first <= last)")
    rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
    return (rr * w + cc).reshape(-1)


def gumbel_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp_(1e-10, 1 - 1e-10)
    return (-torch.log(-torch.log(u))).to(device)


def straight_through_gumbel(logits: torch.Tensor, noise: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard one-hot rows in the forward pass, soft Gumbel-softmax gradient in the backward pass."""
    soft = F.softmax((logits + noise) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def _assemble(base_seq: torch.Tensor, region: torch.Tensor, region_emb: torch.Tensor, grid=None) -> torch.Tensor:
    """Replace the region's positions of (B, h*w pos, C) by region_emb (B, k, C) -> (B, C, h, w).

    grid: (h, w); default the square grid of the positions (16 x 16 for 256)."""
    h, w = square_grid(base_seq.shape[1]) if grid is None else grid
    seq = base_seq.clone()
    seq[:, region] = region_emb
    return seq.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], h, w)


@dataclass
class OptimizationTrace:
    """The original ids and the discrete ids at each checkpoint of an optimisation (SPEC §5).

    ``steps`` are the authors' 0-based step indices ``0, every, 2*every, ..., steps - 1``; checkpoint t's ids
    are, in token mode, the Gumbel sample drawn at that step (the one the IEM saw), in embedding mode the
    embedding after that step's update snapped to its nearest codes.
    """

    initial_ids: torch.Tensor            # (B, 256) long, the original ids
    initial_iem_target_logit: np.ndarray  # (B,)
    steps: list[int]
    ids: list[torch.Tensor]              # each (B, 256) long
    iem_target_logit: list[np.ndarray]   # IEM target logit of the discrete ids at each checkpoint


def checkpoint_steps(steps: int, eval_every: int) -> list[int]:
    """The authors' check ``step % every == 0 or step == steps - 1`` over ``step in range(steps)``."""
    every = max(1, int(eval_every)) if eval_every else int(steps)
    return sorted(set(range(0, int(steps), every)) | {int(steps) - 1})


@torch.no_grad()
def _iem_target(iem, codebook, ids, targets, grid=None) -> np.ndarray:
    lg = iem(ids_to_embedding(codebook, ids, grid))
    return lg.gather(1, targets.view(-1, 1))[:, 0].float().cpu().numpy()


def optimize_tokens(iem, codebook: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, region, steps: int,
                    lr: float, eval_every: int, seed: int = 0, tau: float = 1.0, init_std: float = 1.0,
                    progress: bool = True, grid=None) -> OptimizationTrace:
    """Token mode: Gumbel-softmax logits over the codebook for the region's positions only.

    ids (B, h*w) original ids (256 for 16x16; grid (h, w) default: the square grid); codebook (n_codes, D);
    targets (B,); region: positions to optimise (k,). Positions outside the
    region keep their original id (the authors pin them with logits +-300, which never lets the Gumbel
    sample move them). Each step draws one hard straight-through Gumbel-softmax sample (temperature
    ``tau``) per region position, builds ``one_hot @ codebook`` and minimises the sum over images of -IEM
    target logit with Adam (the images' parameters are independent, so batching them changes nothing).
    At each checkpoint step the ids are that step's Gumbel sample, as the authors decode it.
    """
    device = codebook.device
    region = torch.as_tensor(np.asarray(region), dtype=torch.long, device=device)
    ids = ids.to(device)
    targets = targets.to(device)
    B, n_codes = ids.shape[0], codebook.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    logits = (torch.randn(B, len(region), n_codes, generator=g) * init_std).to(device).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    base_seq = codebook[ids].detach()  # (B, h*w, C)
    cb = codebook.detach()
    trace = OptimizationTrace(ids.cpu().clone(), _iem_target(iem, cb, ids, targets, grid), [], [], [])
    checks = set(checkpoint_steps(steps, eval_every))
    for step in trange(steps, desc="token optimisation", disable=not progress, leave=False):
        one_hot = straight_through_gumbel(logits, gumbel_noise(logits.shape, g, device), tau)  # (B, k, n_codes)
        emb = _assemble(base_seq, region, one_hot @ cb, grid)  # (B, C, h, w)
        loss = -iem(emb).gather(1, targets.view(-1, 1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in checks:
            cur = ids.clone()
            cur[:, region] = one_hot.detach().argmax(-1)
            _record(trace, step, cur, iem, cb, targets, grid)
    return trace


def _record(trace: OptimizationTrace, step: int, ids: torch.Tensor, iem, cb, targets, grid=None) -> None:
    trace.steps.append(int(step))
    trace.ids.append(ids.cpu())
    trace.iem_target_logit.append(_iem_target(iem, cb, ids, targets, grid))


def optimize_embedding(iem, codebook: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, region, steps: int,
                       lr: float, eval_every: int, progress: bool = True, grid=None) -> OptimizationTrace:
    """Embedding mode: Adam on the (B, D, h, w) embedding (the paper's (B, 256, 16, 16)), gradient masked to the
    region; grid (h, w) default: the square grid of the ids' positions.

    At each checkpoint step (after that step's update) every position snaps to its nearest codebook entry
    (outside the region that is the original id, as those entries never move)."""
    device = codebook.device
    ids, targets = ids.to(device), targets.to(device)
    cb = codebook.detach()
    h, w = square_grid(ids.shape[1]) if grid is None else grid
    emb = ids_to_embedding(cb, ids, (h, w)).clone().requires_grad_(True)  # (B, C, h, w)
    mask = torch.zeros(h * w, device=device)
    mask[torch.as_tensor(np.asarray(region), device=device)] = 1
    mask = mask.view(1, 1, h, w)
    opt = torch.optim.Adam([emb], lr=lr)
    trace = OptimizationTrace(ids.cpu().clone(), _iem_target(iem, cb, ids, targets, grid), [], [], [])
    checks = set(checkpoint_steps(steps, eval_every))
    for step in trange(steps, desc="embedding optimisation", disable=not progress, leave=False):
        loss = -iem(emb).gather(1, targets.view(-1, 1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        emb.grad.mul_(mask)
        opt.step()
        if step in checks:
            _record(trace, step, embedding_to_ids(cb, emb.detach()), iem, cb, targets, grid)
    return trace


def decoded_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """VQ decoder output (B, 3, H, W), nominally in [-1, 1] -> uint8 (B, 3, H, W) as the authors convert it:
    ``uint8(clip(255 * (x + 1) / 2, 0, 255))`` in float32, truncated (not rounded)."""
    x = images.detach().float().cpu()
    return (255 * ((x + 1.0) / 2.0)).clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def decode_ids(vq, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Token ids (B, h*w) (256 for 16x16) -> uint8 images (B, 3, H, W) through the VQ decoder (taming, synthetic, or any other
    tokenizer adapter of :mod:`cortex.data.tokenizers`, e.g. a diffusers VQModel, through its own ``decode``:
    :func:`cortex.data.real_common.decode_ids`), ``batch_size`` images at a time, converted as the authors
    (:func:`decoded_to_uint8`)."""
    tok = as_tokenizer(vq)
    if not isinstance(tok, (TamingTokenizer, SyntheticTokenizer)):  # diffusers VQModel / custom tokenizer
        # the tokenizer's own grid, else (a dataset encoded at another --resolution) the square grid of the ids
        grid = tok.grid if tok.grid[0] * tok.grid[1] == ids.shape[1] else square_grid(ids.shape[1])
        return torch.cat([decoded_to_uint8(real_common.decode_ids(tok, ids[s:s + batch_size], grid))
                          for s in range(0, ids.shape[0], batch_size)])
    cb = vq.quantize.embedding.weight
    outs = []
    for s in range(0, ids.shape[0], batch_size):
        quant = ids_to_embedding(cb, ids[s:s + batch_size].to(cb.device))  # (b, C, 16, 16)
        outs.append(decoded_to_uint8(vq.decode(quant)))
    return torch.cat(outs)


SCORE_KEYS = ("orig_logit", "tgt_logit", "orig_prob", "tgt_prob")


def score_trace(evaluators, vq, trace: OptimizationTrace, labels, targets, batch_size: int = 64,
                decode_batch: int = 16):
    """Decode the original ids and every checkpoint of ``trace`` and score them (uint8 images, as the authors).

    Returns ``scores[name] = dict(initial={key: (B,)}, **{key: (T, B)})`` for the keys ``SCORE_KEYS`` over the
    T checkpoints, and the decoded uint8 images of the original and of the last checkpoint.
    """
    labels, targets = np.asarray(labels), np.asarray(targets)
    T, B = len(trace.steps), len(labels)
    scores = {ev.name: {k: np.zeros((T, B)) for k in SCORE_KEYS} for ev in evaluators}
    for ev in evaluators:
        scores[ev.name]["initial"] = {}
    first = last = None
    for t, ids in enumerate([trace.initial_ids] + trace.ids):
        imgs = decode_ids(vq, ids, decode_batch)
        if t == 0:
            first = imgs
        if t == T:
            last = imgs
        for ev in evaluators:
            lg = evaluator_logits(ev, imgs, batch_size)
            vals = dict(zip(("orig_logit", "orig_prob"), class_logit_prob(lg, labels)))
            vals.update(zip(("tgt_logit", "tgt_prob"), class_logit_prob(lg, targets)))
            s = scores[ev.name]
            for k in SCORE_KEYS:
                if t == 0:
                    s["initial"][k] = vals[k]
                else:
                    s[k][t - 1] = vals[k]
    return scores, first, last


def best_checkpoints(tgt_prob: np.ndarray) -> np.ndarray:
    """The authors' choice per image over the T checkpoints (T, B): the first with the highest target prob,
    if above their starting value 0; -1 where no checkpoint beats 0 (their row then keeps zeros)."""
    tgt_prob = np.asarray(tgt_prob)
    b = tgt_prob.argmax(0)  # first maximum
    return np.where(tgt_prob.max(0) > 0, b, -1)


def best_rows(scores: dict) -> tuple[list[dict], dict]:
    """Per evaluator: ``initial_*`` = the original image, ``final_*`` = each image's best checkpoint
    (:func:`best_checkpoints`), each averaged over images with ``np.mean`` as the authors.
    Returns (CSV rows, {name: best checkpoint index (B,), -1 = none})."""
    rows, best = [], {}
    for name, s in scores.items():
        b = best_checkpoints(s["tgt_prob"])
        best[name] = b
        cols = np.arange(b.size)
        final = {k: np.where(b >= 0, s[k][np.maximum(b, 0), cols], 0.0) for k in SCORE_KEYS}
        ini = s["initial"]
        rows.append({"model": name,
                     "initial_original_logit": np.mean(ini["orig_logit"]), "initial_target_logit": np.mean(ini["tgt_logit"]),
                     "initial_original_prob": np.mean(ini["orig_prob"]), "initial_target_prob": np.mean(ini["tgt_prob"]),
                     "final_original_logit": np.mean(final["orig_logit"]), "final_target_logit": np.mean(final["tgt_logit"]),
                     "final_original_prob": np.mean(final["orig_prob"]), "final_target_prob": np.mean(final["tgt_prob"])})
    return rows, best
