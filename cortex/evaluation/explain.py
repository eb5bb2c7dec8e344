"""Explanation evaluation: the logic behind ``VQGAN_explanation/eval/*.py`` (SPEC §5).

* **Sample level** (:mod:`cortex.evaluation.sample_level`): blacking out the ids at an image's top-n TIS
  positions vs n random positions;
* **Concept level** (:mod:`cortex.evaluation.concept_level`): masking a label's concept tokens vs the frequency
  baseline's;
* **Codebook level** (:mod:`cortex.evaluation.codebook_level`): optimising a region's tokens or embedding towards
  a target label.

This module holds what the three share: the CSV columns, loading and masking images, batched scoring, the result
files and the scripts' setup.

Speed: a label's TIS file is read once, its test images are loaded once (``load_images``), the
top-n / random-n masks for all n are prefixes of one ranking per image, and masked variants are
scored in batches of ``eval_batch_size`` images per evaluator forward pass.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..attribution.tis import check_iem_not_near_chance
from ..data.formats import GRID, N_POS, Record, dataset_info, image_path, read_split, square_grid
from ..paths import ExperimentPaths
from ..utils import CortexError, atomic_write, get_device, seed_everything
from .evaluators import class_logit_prob, evaluator_logits, load_evaluators, to_unit
from .masking import mask_images

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
    :func:`cortex.evaluation.masking.mask_images`) for 256 positions; else the square grid of ``n_pos``."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != n_pos:
            raise CortexError(f"a {h}x{w} token grid has {h * w} positions, but the token ids have {n_pos}")
        return None if (h, w) == (GRID, GRID) else (h, w)
    return None if n_pos == N_POS else square_grid(n_pos)


def score_batched(evaluators, images: torch.Tensor, masks: np.ndarray, labels, batch_size: int, grid=None):
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
    ``config.json``) is near chance: its TIS then explain noise. Uses ``cortex.attribution.tis.check_iem_not_near_chance``;
    ``num_classes`` defaults to the dataset's (``dataset_info.json``, else the train split's labels).
    Returns True when it warned."""
    n = num_classes or dataset_info(paths.data_dir).get("num_classes")
    if not n:
        n = len({r.label for r in read_split(paths.data_dir, "train")})
    return bool(check_iem_not_near_chance(paths.best_ckpt(model), paths.testing_results(model), int(n),
                                          what="explanations (and so this evaluation)"))
