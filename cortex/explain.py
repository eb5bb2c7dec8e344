"""Explanation evaluation: the logic behind ``VQGAN_explanation/eval/*.py`` (SPEC §5).

* **Sample level** (``sample_level``): for each test image, the ids at its top-n TIS positions
  (n = 5, 10, ..., 50) and, as control, the ids at n random positions; every position holding one of
  those ids is blacked out; the evaluators score the masked variants against the true label.
* **Concept level** (``concept_level``): per label, the first ``token_num`` tokens of section
  ``Top {top_n} Tokens`` of its TIS statistics (CORTEX) vs the ``token_num`` most frequent tokens
  (frequency baseline); every position holding one of them is masked.
* **Codebook level** (``optimize_tokens`` / ``optimize_embedding``): the tokens (Gumbel-softmax over
  the codebook) or the embedding of a region are optimised so that the IEM's target logit rises;
  the result is decoded (nearest code -> VQ decoder) and scored by the evaluators.

Speed: a label's TIS file is read once, its test images are loaded once (``load_images``), the
top-n / random-n masks for all n are prefixes of one ranking per image, and masked variants are
scored in batches of ``eval_batch_size`` images per evaluator forward pass.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import GRID, N_POS, Record, ids_to_embedding, image_path, embedding_to_ids
from .evaluators import Evaluator, class_logit_prob, evaluator_logits, to_unit
from .masking import mask_images, positions_with_ids, prefix_masks, random_positions, ranking
from .utils import CortexError, atomic_write

SAMPLE_COLUMNS = ["Model", "Num_Masked_Tokens", "Method", "Avg_Logits", "Avg_Probs", "Logits_Diff", "Probs_Diff"]
CONCEPT_COLUMNS = ["Model", "Avg_Diff_Target", "Avg_Diff_Baseline", "Avg_Original_Prob", "Avg_Masked_Prob_Target",
                   "Avg_Masked_Prob_Baseline"]
CODEBOOK_COLUMNS = ["model", "initial_original_logit", "initial_target_logit", "initial_original_prob",
                    "initial_target_prob", "final_original_logit", "final_target_logit", "final_original_prob",
                    "final_target_prob"]
PER_IMAGE_COLUMNS = ["filename", "label", "evaluator", "method", "num_tokens", "masked_positions", "logit", "prob"]
DEFAULT_NS = tuple(range(5, 51, 5))


# ----------------------------------------------------------------------------- images

def load_images(data_dir, records: list[Record], vq=None, progress: bool = False) -> torch.Tensor:
    """The decoded images ``datasets/images/<a>/<b>.png`` of ``records``, read once: (N, 3, H, W) uint8.

    A missing PNG is decoded from its token ids with ``vq`` (e.g. the synthetic world's decoder) when
    given, else it is a CortexError naming the file.
    """
    from PIL import Image
    from tqdm import tqdm

    out, size = [], None
    for r in tqdm(records, desc="loading images", unit="img", disable=not progress, leave=False):
        p = image_path(data_dir, r.filename)
        if p.is_file():
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))  # (H, W, 3)
            t = torch.from_numpy(a.copy()).permute(2, 0, 1)
        elif vq is not None:
            with torch.no_grad():
                dec = vq.decode_ids(torch.as_tensor(r.ids)[None].to(next(vq.buffers()).device))
            t = (to_unit(dec[0].cpu()) * 255).round().to(torch.uint8)
        else:
            raise CortexError(f"image not found: {p} (decoded image of {r.filename}). The eval scripts score the "
                              f"decoded images; regenerate the dataset with images (generate_dataset.py) or copy "
                              f"the authors' datasets/images/ folder.")
        if t.shape[-1] != t.shape[-2] or (size is not None and t.shape != size):
            raise CortexError(f"{p}: image of shape {tuple(t.shape)}; all images must be square and of one size")
        size = t.shape
        out.append(t)
    return torch.stack(out) if out else torch.zeros(0, 3, 16, 16, dtype=torch.uint8)


def records_by_label(records: list[Record], labels=None, max_per_label: int | None = None) -> dict[int, list[Record]]:
    by = defaultdict(list)
    keep = None if labels is None else set(int(l) for l in labels)
    for r in records:
        if keep is None or r.label in keep:
            by[r.label].append(r)
    if max_per_label is not None:
        by = {k: v[:max_per_label] for k, v in by.items()}
    return dict(sorted(by.items()))


def _score_batched(evaluators, images: torch.Tensor, masks: np.ndarray, labels, batch_size: int):
    """Score ``masks`` (N, V, 256) applied to ``images`` (N, 3, H, W): {name: (logits (N, V), probs (N, V))}.

    Variants of several images share a forward pass (about ``batch_size`` variants per pass).
    """
    N, V = masks.shape[:2]
    per = max(1, batch_size // V)
    res = {ev.name: (np.zeros((N, V)), np.zeros((N, V))) for ev in evaluators}
    for s in range(0, N, per):
        e = min(N, s + per)
        m = torch.from_numpy(masks[s:e].reshape(-1, N_POS))
        imgs = images[s:e].repeat_interleave(V, dim=0)  # (b*V, 3, H, W)
        variants = mask_images(imgs, m)
        tgt = np.repeat(np.asarray(labels[s:e]), V)
        for ev in evaluators:
            lg, pr = class_logit_prob(evaluator_logits(ev, variants, batch_size), tgt)
            res[ev.name][0][s:e] = lg.reshape(e - s, V)
            res[ev.name][1][s:e] = pr.reshape(e - s, V)
    return res


# ----------------------------------------------------------------------------- sample level

@dataclass
class SampleLevelResult:
    rows: list[dict]          # the CSV rows (SAMPLE_COLUMNS)
    blocks: list[tuple]       # per label: (filenames, label, {evaluator: (logits (N, V), probs (N, V))}, counts (N, V))
    ns: list[int]
    examples: list[dict]      # a few images with their TIS (for the figure)

    def variants(self):
        """(method, n, variant index) of the 1 + 2K variants of each image."""
        K = len(self.ns)
        return ([("original", 0, 0)] + [("target", n, 1 + j) for j, n in enumerate(self.ns)]
                + [("random", n, 1 + K + j) for j, n in enumerate(self.ns)])

    def per_image(self):
        """Rows (PER_IMAGE_COLUMNS) per image, evaluator, method and n -- generated, not stored."""
        for names, label, res, counts in self.blocks:
            for ev_name, (lg, pr) in res.items():
                for i, fn in enumerate(names):
                    for method, n, v in self.variants():
                        yield dict(filename=fn, label=label, evaluator=ev_name, method=method, num_tokens=n,
                                   masked_positions=int(counts[i, v]), logit=float(lg[i, v]), prob=float(pr[i, v]))


def sample_level(evaluators, label_data, ns=DEFAULT_NS, seed: int = 0, batch_size: int = 64,
                 n_examples: int = 8, progress: bool = True) -> SampleLevelResult:
    """Sample-level explanation evaluation.

    label_data: iterable of ``(label, records, scores, images)`` per label -- records (N) with ids,
    scores (N, 256) their TIS rows (read once per label), images (N, 3, H, W) uint8 (loaded once).
    For each image: variant 0 is the unmasked image; variants 1..K mask the ids at the top-n TIS
    positions (n in ``ns``); K+1..2K the ids at n random positions (seeded by (seed, filename)).
    """
    from tqdm import tqdm

    ns = list(ns)
    K = len(ns)
    blocks, examples = [], []
    bar = tqdm(desc="sample level", unit="img", disable=not progress)
    for label, records, scores, images in label_data:
        if len(records) == 0:
            continue
        masks = np.zeros((len(records), 1 + 2 * K, N_POS), dtype=bool)
        for i, r in enumerate(records):
            masks[i, 1:1 + K] = prefix_masks(r.ids, ranking(scores[i]), ns)
            masks[i, 1 + K:] = prefix_masks(r.ids, random_positions(seed, r.filename), ns)
        res = _score_batched(evaluators, images, masks, [label] * len(records), batch_size)
        blocks.append(([r.filename for r in records], label, res, masks.sum(-1).astype(np.int16)))
        if len(examples) < n_examples:
            mid = ns[min(1, K - 1)]
            v = 1 + ns.index(mid)
            examples.append(dict(filename=records[0].filename, label=label, image=images[0].numpy(),
                                 scores=np.asarray(scores[0]), top_n=mid,
                                 masked=mask_images(images[0], torch.from_numpy(masks[0, v]))[0].numpy(),
                                 probs={name: (res[name][1][0, 0], res[name][1][0, v]) for name in res}))
        bar.update(len(records))
    bar.close()
    if not blocks:
        raise CortexError("sample level: no test images to evaluate")
    out = SampleLevelResult([], blocks, ns, examples)
    order = {(m, n): v for m, n, v in out.variants()}
    for ev in evaluators:
        lg = np.concatenate([b[2][ev.name][0] for b in blocks])  # (N, V)
        pr = np.concatenate([b[2][ev.name][1] for b in blocks])
        for method, n in [("original", 0)] + [(m, n) for n in ns for m in ("target", "random")]:
            v = order[(method, n)]
            out.rows.append({"Model": ev.name, "Num_Masked_Tokens": n, "Method": method,
                             "Avg_Logits": lg[:, v].mean(), "Avg_Probs": pr[:, v].mean(),
                             "Logits_Diff": (lg[:, 0] - lg[:, v]).mean(), "Probs_Diff": (pr[:, 0] - pr[:, v]).mean()})
    return out


# ----------------------------------------------------------------------------- concept level

@dataclass
class ConceptLevelResult:
    rows: list[dict]        # CONCEPT_COLUMNS, the last one "Overall"
    blocks: list[tuple]     # per label: (filenames, label, {evaluator: (logits (N, 3), probs (N, 3))}, counts (N, 3),
                            #             (0, n concept tokens, n baseline tokens))
    per_label: list[dict]   # label, evaluator, n_images, concept/baseline token counts, mean probs

    def per_image(self):
        """Rows (PER_IMAGE_COLUMNS; method original / target / baseline) -- generated, not stored."""
        for names, label, res, counts, ntok in self.blocks:
            for ev_name, (lg, pr) in res.items():
                for i, fn in enumerate(names):
                    for v, method in enumerate(("original", "target", "baseline")):
                        yield dict(filename=fn, label=label, evaluator=ev_name, method=method, num_tokens=ntok[v],
                                   masked_positions=int(counts[i, v]), logit=float(lg[i, v]), prob=float(pr[i, v]))


def concept_level(evaluators, label_data, batch_size: int = 64, progress: bool = True) -> ConceptLevelResult:
    """Concept-level explanation evaluation.

    label_data: iterable of ``(label, records, images, concept_tokens, baseline_tokens)``.
    Each image: variant 0 unmasked, 1 every position whose id is a concept token masked, 2 every
    position whose id is a baseline token masked. Diff = original logit - masked logit.
    """
    from tqdm import tqdm

    acc = defaultdict(list)
    blocks, per_label = [], []
    bar = tqdm(desc="concept level", unit="img", disable=not progress)
    for label, records, images, concept, baseline in label_data:
        if len(records) == 0:
            continue
        ids = np.stack([r.ids for r in records])  # (N, 256)
        masks = np.stack([np.zeros_like(ids, dtype=bool), positions_with_ids(ids, concept),
                          positions_with_ids(ids, baseline)], axis=1)  # (N, 3, 256)
        res = _score_batched(evaluators, images, masks, [label] * len(records), batch_size)
        counts = masks.sum(-1)
        blocks.append(([r.filename for r in records], label, res, counts, (0, len(concept), len(baseline))))
        for name, (lg, pr) in res.items():
            acc[name].append(np.stack([lg[:, 0], lg[:, 1], lg[:, 2], pr[:, 0], pr[:, 1], pr[:, 2]], axis=1))
            per_label.append(dict(label=label, evaluator=name, images=len(records), concept_tokens=len(concept),
                                  baseline_tokens=len(baseline),
                                  masked_positions_target=float(counts[:, 1].mean()),
                                  masked_positions_baseline=float(counts[:, 2].mean()),
                                  original_prob=float(pr[:, 0].mean()), masked_prob_target=float(pr[:, 1].mean()),
                                  masked_prob_baseline=float(pr[:, 2].mean())))
        bar.update(len(records))
    bar.close()
    if not acc:
        raise CortexError("concept level: no test images to evaluate")
    rows = []
    for ev in evaluators:
        a = np.concatenate(acc[ev.name])  # (N, 6)
        rows.append({"Model": ev.name, "Avg_Diff_Target": (a[:, 0] - a[:, 1]).mean(),
                     "Avg_Diff_Baseline": (a[:, 0] - a[:, 2]).mean(), "Avg_Original_Prob": a[:, 3].mean(),
                     "Avg_Masked_Prob_Target": a[:, 4].mean(), "Avg_Masked_Prob_Baseline": a[:, 5].mean()})
    overall = {"Model": "Overall"}
    for c in CONCEPT_COLUMNS[1:]:
        overall[c] = float(np.mean([r[c] for r in rows]))
    rows.append(overall)
    return ConceptLevelResult(rows, blocks, per_label)


# ----------------------------------------------------------------------------- codebook level

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


def label_pairs(labels=None, target_sum: int = 30, pairs: str | None = None) -> list[tuple[int, int]]:
    """(source, target) pairs: ``--pairs`` if given, else each of ``labels`` with target ``target_sum - label``."""
    if pairs:
        return parse_pairs(pairs)
    return [(int(l), int(target_sum) - int(l)) for l in labels]


def region_positions(rows=(7, 10), cols=(7, 10)) -> np.ndarray:
    """Row-major positions of the token rows r0..r1 x cols c0..c1 (inclusive)."""
    r0, r1 = int(rows[0]), int(rows[1])
    c0, c1 = int(cols[0]), int(cols[1])
    if not (0 <= r0 <= r1 < GRID and 0 <= c0 <= c1 < GRID):
        raise CortexError(f"--rows {r0} {r1} --cols {c0} {c1}: the region must lie in the {GRID}x{GRID} token grid "
                          f"(0..{GRID - 1}, first <= last)")
    rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
    return (rr * GRID + cc).reshape(-1)


def gumbel_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp_(1e-10, 1 - 1e-10)
    return (-torch.log(-torch.log(u))).to(device)


def straight_through_gumbel(logits: torch.Tensor, noise: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard one-hot rows in the forward pass, soft Gumbel-softmax gradient in the backward pass."""
    soft = F.softmax((logits + noise) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def _assemble(base_seq: torch.Tensor, region: torch.Tensor, region_emb: torch.Tensor) -> torch.Tensor:
    """Replace the region's positions of (B, 256 pos, C) by region_emb (B, k, C) -> (B, C, 16, 16)."""
    seq = base_seq.clone()
    seq[:, region] = region_emb
    return seq.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], GRID, GRID)


@dataclass
class OptimizationTrace:
    """Discrete token ids of each image at each checkpoint step (step 0 = the original)."""

    steps: list[int]
    ids: list[torch.Tensor]          # each (B, 256) long
    iem_target_logit: list[np.ndarray]  # IEM target logit of the discrete ids at each checkpoint


def _checkpoints(steps: int, eval_every: int) -> set[int]:
    every = max(1, int(eval_every)) if eval_every else steps
    return set(range(every, steps + 1, every)) | {steps}


@torch.no_grad()
def _iem_target(iem, codebook, ids, targets) -> np.ndarray:
    lg = iem(ids_to_embedding(codebook, ids))
    return lg.gather(1, targets.view(-1, 1))[:, 0].float().cpu().numpy()


def optimize_tokens(iem, codebook: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, region, steps: int,
                    lr: float, eval_every: int, seed: int = 0, tau: float = 1.0, init_std: float = 1.0,
                    progress: bool = True) -> OptimizationTrace:
    """Token mode: Gumbel-softmax logits over the codebook for the region's positions only.

    ids (B, 256) original ids; targets (B,); region: positions to optimise (k,). Positions outside the
    region keep their original id (their embedding is a constant). Each step draws one hard
    straight-through Gumbel-softmax sample (temperature ``tau``) per region position, builds
    ``one_hot @ codebook`` and minimises the sum over images of -IEM target logit with Adam (the
    images' parameters are independent, so batching them changes nothing). At each checkpoint the
    region's ids are the argmax of the logits.
    """
    from tqdm import trange

    device = codebook.device
    region = torch.as_tensor(np.asarray(region), dtype=torch.long, device=device)
    ids = ids.to(device)
    targets = targets.to(device)
    B, n_codes = ids.shape[0], codebook.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    logits = (torch.randn(B, len(region), n_codes, generator=g) * init_std).to(device).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    base_seq = codebook[ids].detach()  # (B, 256, C)
    cb = codebook.detach()
    trace = OptimizationTrace([0], [ids.cpu().clone()], [_iem_target(iem, cb, ids, targets)])
    checks = _checkpoints(steps, eval_every)
    for step in trange(1, steps + 1, desc="token optimisation", disable=not progress, leave=False):
        one_hot = straight_through_gumbel(logits, gumbel_noise(logits.shape, g, device), tau)  # (B, k, n_codes)
        emb = _assemble(base_seq, region, one_hot @ cb)  # (B, C, 16, 16)
        loss = -iem(emb).gather(1, targets.view(-1, 1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in checks:
            cur = ids.clone()
            cur[:, region] = logits.detach().argmax(-1)
            trace.steps.append(step)
            trace.ids.append(cur.cpu())
            trace.iem_target_logit.append(_iem_target(iem, cb, cur, targets))
    return trace


def optimize_embedding(iem, codebook: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, region, steps: int,
                       lr: float, eval_every: int, progress: bool = True) -> OptimizationTrace:
    """Embedding mode: Adam on the (B, 256, 16, 16) embedding, gradient masked to the region.

    At each checkpoint every position snaps to its nearest codebook entry (outside the region that is
    the original id, as those entries never move)."""
    from tqdm import trange

    device = codebook.device
    ids, targets = ids.to(device), targets.to(device)
    cb = codebook.detach()
    emb = ids_to_embedding(cb, ids).clone().requires_grad_(True)  # (B, C, 16, 16)
    mask = torch.zeros(N_POS, device=device)
    mask[torch.as_tensor(np.asarray(region), device=device)] = 1
    mask = mask.view(1, 1, GRID, GRID)
    opt = torch.optim.Adam([emb], lr=lr)
    trace = OptimizationTrace([0], [ids.cpu().clone()], [_iem_target(iem, cb, ids, targets)])
    checks = _checkpoints(steps, eval_every)
    for step in trange(1, steps + 1, desc="embedding optimisation", disable=not progress, leave=False):
        loss = -iem(emb).gather(1, targets.view(-1, 1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        emb.grad.mul_(mask)
        opt.step()
        if step in checks:
            cur = embedding_to_ids(cb, emb.detach())
            trace.steps.append(step)
            trace.ids.append(cur.cpu())
            trace.iem_target_logit.append(_iem_target(iem, cb, cur, targets))
    return trace


@torch.no_grad()
def decode_ids(vq, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Token ids (B, 256) -> images (B, 3, H, W) in [0, 1] through the VQ decoder (taming or synthetic)."""
    cb = vq.quantize.embedding.weight
    outs = []
    for s in range(0, ids.shape[0], batch_size):
        quant = ids_to_embedding(cb, ids[s:s + batch_size].to(cb.device))  # (b, C, 16, 16)
        outs.append(to_unit(vq.decode(quant)).cpu())
    return torch.cat(outs)


def score_trace(evaluators, vq, trace: OptimizationTrace, labels, targets, batch_size: int = 64,
                decode_batch: int = 16):
    """Decode every checkpoint of ``trace`` and score it.

    Returns ``scores[name] = dict(orig_logit, tgt_logit, orig_prob, tgt_prob)``, each (T, B) over the
    T checkpoints, and the decoded images of the first and last checkpoints.
    """
    labels, targets = np.asarray(labels), np.asarray(targets)
    T, B = len(trace.steps), len(labels)
    scores = {ev.name: {k: np.zeros((T, B)) for k in ("orig_logit", "tgt_logit", "orig_prob", "tgt_prob")}
              for ev in evaluators}
    first = last = None
    for t, ids in enumerate(trace.ids):
        imgs = decode_ids(vq, ids, decode_batch)
        if t == 0:
            first = imgs
        if t == T - 1:
            last = imgs
        for ev in evaluators:
            lg = evaluator_logits(ev, imgs, batch_size)
            s = scores[ev.name]
            s["orig_logit"][t], s["orig_prob"][t] = class_logit_prob(lg, labels)
            s["tgt_logit"][t], s["tgt_prob"][t] = class_logit_prob(lg, targets)
    return scores, first, last


def best_rows(scores: dict) -> tuple[list[dict], dict]:
    """Per evaluator: initial (checkpoint 0) and final = the checkpoint with the best target prob of each
    image (searched over steps > 0), averaged over images. Returns (CSV rows, {name: best index (B,)})."""
    rows, best = [], {}
    for name, s in scores.items():
        T, B = s["tgt_prob"].shape
        if T > 1:
            b = 1 + s["tgt_prob"][1:].argmax(0)  # (B,)
        else:
            b = np.zeros(B, dtype=int)
        cols = np.arange(B)
        best[name] = b
        rows.append({"model": name,
                     "initial_original_logit": s["orig_logit"][0].mean(), "initial_target_logit": s["tgt_logit"][0].mean(),
                     "initial_original_prob": s["orig_prob"][0].mean(), "initial_target_prob": s["tgt_prob"][0].mean(),
                     "final_original_logit": s["orig_logit"][b, cols].mean(),
                     "final_target_logit": s["tgt_logit"][b, cols].mean(),
                     "final_original_prob": s["orig_prob"][b, cols].mean(),
                     "final_target_prob": s["tgt_prob"][b, cols].mean()})
    return rows, best


# ----------------------------------------------------------------------------- files

def write_rows(path, columns: list[str], rows, float_fmt: str = "{:.6f}") -> Path:
    """A CSV with ``columns`` (atomic) from an iterable of dicts; floats formatted with ``float_fmt``."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return float_fmt.format(float(v))
        if isinstance(v, np.integer):
            return int(v)
        return v

    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([fmt(r.get(c, "")) for c in columns])
    return Path(path)


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- script helpers

def eval_setup(args, experiment: str = "vqgan"):
    """Shared start of the eval scripts: paths, device, seed, evaluators (``args`` from evaluator_parser).

    Returns ``(paths, device, evaluators)``.
    """
    from .data import dataset_info
    from .evaluators import load_evaluators
    from .paths import ExperimentPaths
    from .utils import get_device, seed_everything

    paths = ExperimentPaths.from_args(args, experiment)
    device = get_device(args.device, args.gpu)
    seed_everything(args.seed)
    n = dataset_info(paths.data_dir).get("num_classes")
    evaluators = load_evaluators(args.evaluators, paths, device, weights_dir=args.weights_dir,
                                 download=not args.no_download, num_classes=n)
    print("evaluators: " + ", ".join(f"{e.name} ({e.source})" for e in evaluators))
    return paths, device, evaluators


def output_suffix(attribution: str) -> str:
    """'' for the paper's SmoothGrad TIS, '_<attribution>' for the others (outputs never collide)."""
    from .paths import PAPER_ATTRIBUTION

    return "" if attribution == PAPER_ATTRIBUTION else f"_{attribution}"
