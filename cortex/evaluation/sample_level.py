"""Sample-level evaluation (``eval/sample_image_level_explanation.py``): for each test image, the ids at its top-n
TIS positions (n = 5, 10, ..., 50) and, as control, the ids at n random positions; every position holding one of
those ids is blacked out; the evaluators score the masked variants against the true label."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..utils import CortexError
from .explain import DEFAULT_NS, mask_grid, score_batched
from .masking import AUTHORS_RANDOM_SEED, authors_random_draws, draw_masks, mask_images, prefix_masks, ranking


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
    random_draws: ``{filename: [positions for n in ns]}`` from :func:`cortex.evaluation.masking.authors_random_draws`
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
                              f"over the whole split with cortex.evaluation.masking.authors_random_draws")
        masks = np.zeros((len(records), 1 + 2 * K, n_pos), dtype=bool)
        for i, r in enumerate(records):
            masks[i, 1:1 + K] = prefix_masks(r.ids, ranking(scores[i], n_pos), ns)
            masks[i, 1 + K:] = draw_masks(r.ids, random_draws[r.filename])
        res = score_batched(evaluators, images, masks, [label] * len(records), batch_size, grid)
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
