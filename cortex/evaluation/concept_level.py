"""Concept-level evaluation (``eval/sample_concept_level_explanation.py``): per label, the first ``token_num``
tokens of section ``Top {top_n} Tokens`` of its TIS statistics (CORTEX) vs the ``token_num`` most frequent tokens
(frequency baseline); every position holding one of them is masked. Its paired statistic (masked vs original, per
image) with a Student-t interval."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..utils import CortexError
from .explain import CONCEPT_COLUMNS, read_rows, score_batched
from .masking import positions_with_ids


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
    acc = defaultdict(list)
    blocks, per_label = [], []
    bar = tqdm(desc="concept level", unit="img", disable=not progress)
    for label, records, images, concept, baseline in label_data:
        if len(records) == 0:
            continue
        ids = np.stack([r.ids for r in records])  # (N, h*w)
        masks = np.stack([np.zeros_like(ids, dtype=bool), positions_with_ids(ids, concept),
                          positions_with_ids(ids, baseline)], axis=1)  # (N, 3, h*w)
        res = score_batched(evaluators, images, masks, [label] * len(records), batch_size, grid)
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
