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

from cortex.data.formats import GRID, N_POS, Record, ids_to_embedding, image_path, embedding_to_ids, square_grid
from .evaluators import class_logit_prob, evaluator_logits, to_unit
from .masking import draw_masks, mask_images, positions_with_ids, prefix_masks, ranking
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


def mask_grid(n_pos: int, grid=None):
    """The ``grid=`` to mask ``n_pos`` positions with: ``grid`` (h, w) if given; None (the paper's 16 x 16 path of
    :func:`cortex.masking.mask_images`) for 256 positions; else the square grid of ``n_pos``."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != n_pos:
            raise CortexError(f"a {h}x{w} token grid has {h * w} positions, but the token ids have {n_pos}")
        return None if (h, w) == (GRID, GRID) else (h, w)
    return None if n_pos == N_POS else square_grid(n_pos)


def _score_batched(evaluators, images: torch.Tensor, masks: np.ndarray, labels, batch_size: int, grid=None):
    """Score ``masks`` (N, V, h*w) applied to ``images`` (N, 3, H, W): {name: (logits (N, V), probs (N, V))}.

    Variants of several images share a forward pass (about ``batch_size`` variants per pass). grid: the token
    grid (h, w) (default: 16 x 16 for 256 positions, else the square grid, :func:`mask_grid`).
    """
    N, V = masks.shape[:2]
    grid = mask_grid(masks.shape[-1], grid)
    per = max(1, batch_size // V)
    res = {ev.name: (np.zeros((N, V)), np.zeros((N, V))) for ev in evaluators}
    for s in range(0, N, per):
        e = min(N, s + per)
        m = torch.from_numpy(masks[s:e].reshape(-1, masks.shape[-1]))
        imgs = images[s:e].repeat_interleave(V, dim=0)  # (b*V, 3, H, W)
        variants = mask_images(imgs, m, grid)
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


def sample_level(evaluators, label_data, ns=DEFAULT_NS, random_draws: dict | None = None, batch_size: int = 64,
                 n_examples: int = 8, progress: bool = True, grid=None) -> SampleLevelResult:
    """Sample-level explanation evaluation, with the authors' numbers (SPEC §5).

    label_data: iterable of ``(label, records, scores, images)`` per label -- records (N) with ids,
    scores (N, 256) their TIS rows (read once per label), images (N, 3, H, W) uint8 (loaded once); labels
    ascending and each label's images in the split CSV's order, as the authors iterate them.
    random_draws: ``{filename: [positions for n in ns]}`` from :func:`cortex.masking.authors_random_draws`
    over the whole split (default: drawn here over the images given, in the order given).
    For each image: variant 0 is the unmasked image; variants 1..K mask the ids at the top-n TIS
    positions (n in ``ns``); K+1..2K the ids at the n randomly drawn positions.

    Rows as the authors compute them: ``Avg_* = mean over images`` (numpy's mean of the per-image values in
    image order), ``*_Diff = Avg(masked) - Avg(original)`` (negative when masking hurts), and the
    ``original`` row's diffs are the integer 0.

    Another tokenizer's grid: records hold h*w ids and scores are (N, h*w); ``grid`` (h, w) (default: 16 x 16 for
    256 ids, else the square grid, :func:`mask_grid`) maps positions onto pixels.
    """
    import random

    from tqdm import tqdm

    from .masking import AUTHORS_RANDOM_SEED, authors_random_draws

    ns = list(ns)
    K = len(ns)
    blocks, examples = [], []
    rng = random.Random(AUTHORS_RANDOM_SEED) if random_draws is None else None
    bar = tqdm(desc="sample level", unit="img", disable=not progress)
    for label, records, scores, images in label_data:
        if len(records) == 0:
            continue
        n_pos = len(records[0].ids)
        if rng is not None:  # no draws given: one seeded stream over the images in the order given
            random_draws = authors_random_draws([r.filename for r in records], ns, rng=rng, n_pos=n_pos)
        missing = [r.filename for r in records if r.filename not in random_draws]
        if missing:
            raise CortexError(f"sample level: no random draws for image {missing[0]} (label {label}); draw them "
                              f"over the whole split with cortex.masking.authors_random_draws")
        masks = np.zeros((len(records), 1 + 2 * K, n_pos), dtype=bool)
        for i, r in enumerate(records):
            masks[i, 1:1 + K] = prefix_masks(r.ids, ranking(scores[i], n_pos), ns)
            masks[i, 1 + K:] = draw_masks(r.ids, random_draws[r.filename])
        res = _score_batched(evaluators, images, masks, [label] * len(records), batch_size, grid)
        blocks.append(([r.filename for r in records], label, res, masks.sum(-1).astype(np.int16)))
        if len(examples) < n_examples:
            mid = ns[min(1, K - 1)]
            v = 1 + ns.index(mid)
            examples.append(dict(filename=records[0].filename, label=label, image=images[0].numpy(),
                                 scores=np.asarray(scores[0]), top_n=mid,
                                 masked=mask_images(images[0], torch.from_numpy(masks[0, v]),
                                                    mask_grid(n_pos, grid))[0].numpy(),
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
        avg = lambda a, v: np.mean(np.ascontiguousarray(a[:, v]))  # noqa: E731 - the authors' np.mean of a list
        lg0, pr0 = avg(lg, 0), avg(pr, 0)
        out.rows.append({"Model": ev.name, "Num_Masked_Tokens": 0, "Method": "original", "Avg_Logits": lg0,
                         "Avg_Probs": pr0, "Logits_Diff": 0, "Probs_Diff": 0})
        for n in ns:
            for method in ("target", "random"):
                v = order[(method, n)]
                al, ap = avg(lg, v), avg(pr, v)
                out.rows.append({"Model": ev.name, "Num_Masked_Tokens": n, "Method": method, "Avg_Logits": al,
                                 "Avg_Probs": ap, "Logits_Diff": al - lg0, "Probs_Diff": ap - pr0})
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


def concept_level(evaluators, label_data, batch_size: int = 64, progress: bool = True,
                  grid=None) -> ConceptLevelResult:
    """Concept-level explanation evaluation.

    label_data: iterable of ``(label, records, images, concept_tokens, baseline_tokens)``; grid: the token grid
    (h, w) of records with h*w ids (default: 16 x 16 for 256 ids, else the square grid, :func:`mask_grid`).
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
        ids = np.stack([r.ids for r in records])  # (N, h*w)
        masks = np.stack([np.zeros_like(ids, dtype=bool), positions_with_ids(ids, concept),
                          positions_with_ids(ids, baseline)], axis=1)  # (N, 3, h*w)
        res = _score_batched(evaluators, images, masks, [label] * len(records), batch_size, grid)
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
        a = np.concatenate(acc[ev.name])  # (N, 6): logit orig/target/baseline, prob orig/target/baseline
        # the authors: per image orig - masked (Python floats), summed image after image, / count
        rows.append({"Model": ev.name, "Avg_Diff_Target": sequential_mean(a[:, 0] - a[:, 1]),
                     "Avg_Diff_Baseline": sequential_mean(a[:, 0] - a[:, 2]),
                     "Avg_Original_Prob": sequential_mean(a[:, 3]),
                     "Avg_Masked_Prob_Target": sequential_mean(a[:, 4]),
                     "Avg_Masked_Prob_Baseline": sequential_mean(a[:, 5])})
    overall = {"Model": "Overall"}
    for c in CONCEPT_COLUMNS[1:]:
        overall[c] = sequential_mean([r[c] for r in rows])
    rows.append(overall)
    return ConceptLevelResult(rows, blocks, per_label)


def sequential_mean(values) -> float:
    """``(((0 + v0) + v1) + ...) / n`` in float64, left to right: the authors' ``+=`` loop then ``/ count``
    (``np.mean`` sums pairwise and Python >= 3.12's ``sum`` compensates, both differ in the last bits)."""
    total, n = 0.0, 0
    for v in values:
        total += float(v)
        n += 1
    if n == 0:
        raise CortexError("mean of no values")
    return total / n


# ----------------------------------------------------------------------------- paired statistic

PAIRED_COLUMNS = ["Model", "Metric", "Mean_Paired_Diff", "CI_Low", "CI_High", "Std", "N", "Confidence", "CI_Method"]
PAIRED_METRICS = {"logit_drop": 0, "prob_drop": 1}  # metric -> index into (logits, probs)


def paired_t_interval(d, confidence: float = 0.95) -> dict:
    """Mean of the paired differences ``d`` (n,) and its Student-t confidence interval.

    ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)`` with ``sd`` the sample standard deviation (ddof 1);
    with n = 1 the interval is NaN (no spread to estimate). Returns ``dict(mean, low, high, std, n)``.
    """
    from scipy import stats as st

    d = np.asarray(d, dtype=np.float64).reshape(-1)
    n = d.size
    if n == 0:
        raise CortexError("paired statistic of no images")
    mean = float(d.mean())
    if n == 1:
        return dict(mean=mean, low=float("nan"), high=float("nan"), std=float("nan"), n=1)
    sd = float(d.std(ddof=1))
    half = float(st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
    return dict(mean=mean, low=mean - half, high=mean + half, std=sd, n=n)


def concept_paired_stats(result: "ConceptLevelResult", confidence: float = 0.95) -> list[dict]:
    """The paired statistic of the concept-level evaluation (rows with ``PAIRED_COLUMNS``).

    Per image and evaluator: CORTEX's drop minus the frequency baseline's drop, i.e.
    ``(orig - masked_CORTEX) - (orig - masked_baseline) = masked_baseline - masked_CORTEX``, for the target
    logit (metric ``logit_drop``) and its softmax prob (``prob_drop``). Positive = masking CORTEX's tokens
    hurts the evaluator more than masking as many frequency-baseline tokens. Per evaluator: the mean over
    images with a 95% Student-t interval (:func:`paired_t_interval`); row ``Overall``: the same over the
    per-image mean of the evaluators' differences (one value per image, so n = images).
    """
    names = list(result.blocks[0][2]) if result.blocks else []
    rows = []
    per_metric_overall = {}
    for metric, k in PAIRED_METRICS.items():
        diffs = {}
        for name in names:
            a = np.concatenate([b[2][name][k] for b in result.blocks])  # (N, 3): original, CORTEX, baseline
            diffs[name] = a[:, 2] - a[:, 1]
        per_metric_overall[metric] = np.mean(np.stack([diffs[n] for n in names]), axis=0)
        for name in names:
            rows.append(_paired_row(name, metric, diffs[name], confidence))
    for metric, d in per_metric_overall.items():
        rows.append(_paired_row("Overall", metric, d, confidence))
    return rows


def _paired_row(model, metric, d, confidence) -> dict:
    ci = paired_t_interval(d, confidence)
    return {"Model": model, "Metric": metric, "Mean_Paired_Diff": ci["mean"], "CI_Low": ci["low"],
            "CI_High": ci["high"], "Std": ci["std"], "N": ci["n"], "Confidence": confidence,
            "CI_Method": "student_t"}


def paired_stats_path(results_csv) -> Path:
    """``..._results_top{n}_token{k}.csv`` -> ``..._results_top{n}_token{k}_paired.csv`` (beside it)."""
    p = Path(results_csv)
    return p.with_name(f"{p.stem}_paired.csv")


def read_paired_stats(results_csv) -> list[dict]:
    """The paired statistic written beside a concept-level results CSV (for reports, e.g. the demo):
    rows of ``PAIRED_COLUMNS`` with numbers as float / int. A missing file is a CortexError."""
    p = paired_stats_path(results_csv)
    if not p.is_file():
        raise CortexError(f"paired statistic not found: {p}; rerun sample_concept_level_explanation.py")
    out = []
    for r in read_rows(p):
        r = dict(r)
        for c in ("Mean_Paired_Diff", "CI_Low", "CI_High", "Std", "Confidence"):
            r[c] = float(r[c])
        r["N"] = int(r["N"])
        out.append(r)
    return out


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
    from tqdm import trange

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
    from tqdm import trange

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
    tokenizer adapter of :mod:`cortex.data.tokenizers`, e.g. a diffusers VQModel, through its own ``decode``)."""
    from cortex.data.tokenizers import SyntheticTokenizer, TamingTokenizer, as_tokenizer

    tok = as_tokenizer(vq)
    if not isinstance(tok, (TamingTokenizer, SyntheticTokenizer)):  # diffusers VQModel / custom tokenizer
        # the tokenizer's own grid, else (a dataset encoded at another --resolution) the square grid of the ids
        grid = tok.grid if tok.grid[0] * tok.grid[1] == ids.shape[1] else square_grid(ids.shape[1])
        return torch.cat([decoded_to_uint8(tok.decode(ids[s:s + batch_size].reshape(-1, *grid)))
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


# ----------------------------------------------------------------------------- files

def write_rows(path, columns: list[str], rows, float_fmt: str | None = None) -> Path:
    """A CSV with ``columns`` (atomic) from an iterable of dicts.

    Floats are written at full precision as the authors' ``csv`` writers write them (``repr``: the shortest
    text that reads back to the same float64; ``nan`` as ``nan``), unless ``float_fmt`` (e.g. ``"{:.3f}"``)
    is given for a human-facing summary. numpy integers are written as integers.
    """
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return repr(float(v)) if float_fmt is None else float_fmt.format(float(v))
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

def check_eval_dataset(paths, split: str = "test", images: bool = True) -> list[Record]:
    """The eval scripts' first step, before any evaluator is loaded (no weight download on a missing dataset).

    Reads ``{split}_embeddings.csv`` of ``paths.data_dir`` (a missing folder or CSV is a CortexError naming it
    and how to get it) and, with ``images``, checks that every image's decoded PNG
    ``datasets/images/<a>/<b>.png`` exists. Returns the split's records.
    """
    from cortex.data.formats import read_split

    data_dir = Path(paths.data_dir)
    if not data_dir.is_dir():
        raise CortexError(f"dataset folder not found: {data_dir}. The eval scripts need the dataset the IEM was "
                          f"trained on: generate it (cd VQGAN_explanation; python generate_dataset.py) or download "
                          f"the authors' datasets/ into it, or pass --data_dir / --root.")
    records = read_split(data_dir, split)
    if images:
        missing = [r.filename for r in records if not image_path(data_dir, r.filename).is_file()]
        if missing:
            raise CortexError(f"{len(missing)} of {len(records)} {split} images are missing under {data_dir / 'images'} "
                              f"(e.g. {image_path(data_dir, missing[0])}, the decoded image of {missing[0]}). The eval "
                              f"scripts mask the decoded images: regenerate the dataset with its images "
                              f"(generate_dataset.py without --no_images) or copy the authors' datasets/images/.")
    return records


def evaluated_labels(records: list[Record], labels, max_per_label: int | None, split: str,
                     data_dir) -> dict[int, list[Record]]:
    """``records_by_label`` of the ``--labels`` / ``--max_images_per_label`` subset; a ``--labels`` entry with no
    image in the split is a CortexError."""
    by_label = records_by_label(records, labels, max_per_label)
    missing = sorted(set(labels or ()) - set(by_label))
    if missing:
        raise CortexError(f"--labels {missing}: no {split} images of them in {data_dir}")
    return by_label


def eval_setup(args, experiment: str = "vqgan", device=None):
    """Shared start of the eval scripts: paths, device, seed, evaluators (``args`` from evaluator_parser).

    Call it *after* checking the dataset and inputs (``check_eval_dataset``), so that a missing dataset
    is reported before evaluator weights are looked for or downloaded. ``device``: one the script already
    resolved (default: ``--device`` / ``--gpu``). Returns ``(paths, device, evaluators)``.
    """
    from cortex.data.formats import dataset_info
    from .evaluators import load_evaluators
    from .paths import ExperimentPaths
    from .utils import get_device, seed_everything

    paths = ExperimentPaths.from_args(args, experiment)
    device = get_device(args.device, args.gpu) if device is None else device
    seed_everything(args.seed)
    n = dataset_info(paths.data_dir).get("num_classes")
    evaluators = load_evaluators(args.evaluators, paths, device, weights_dir=args.weights_dir,
                                 download=not args.no_download, num_classes=n,
                                 evaluator_dir=getattr(args, "evaluator_dir", None))
    print("evaluators: " + ", ".join(f"{e.name} ({e.source})" for e in evaluators))
    return paths, device, evaluators


def warn_if_near_chance(paths, model: int, num_classes: int | None = None) -> bool:
    """Warn loudly when IEM ``model``'s known accuracy (test.py's ``testing_results.csv``, its checkpoint's
    ``config.json``) is near chance: its TIS then explain noise. Uses ``cortex.tis.check_iem_not_near_chance``;
    ``num_classes`` defaults to the dataset's (``dataset_info.json``, else the train split's labels).
    Returns True when it warned."""
    from cortex.data.formats import dataset_info, read_split
    from .tis import check_iem_not_near_chance

    n = num_classes or dataset_info(paths.data_dir).get("num_classes")
    if not n:
        n = len({r.label for r in read_split(paths.data_dir, "train")})
    return bool(check_iem_not_near_chance(paths.best_ckpt(model), paths.testing_results(model), int(n),
                                          what="explanations (and so this evaluation)"))


def output_suffix(attribution: str) -> str:
    """'' for the paper's SmoothGrad TIS, '_<attribution>' for the others (outputs never collide)."""
    from .paths import PAPER_ATTRIBUTION

    return "" if attribution == PAPER_ATTRIBUTION else f"_{attribution}"
