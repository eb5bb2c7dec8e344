"""``--source cin_transformer`` (SPEC §6): class-conditional token grids sampled with taming's ImageNet
``cin_transformer`` (top-k / top-p / temperature, as taming's ``scripts/sample_fast.py``), decoded by its first
stage and written through a :class:`cortex.data.writer.DatasetWriter`."""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from cortex.data.formats import GRID, N_POS
from cortex.data.real_common import (_arg, _base_info, _check_grid, _sub_seed, decode_ids, first_stage, parse_classes,
                                     parse_splits, split_counts, split_of_index)
from cortex.data.writer import to_uint8
from cortex.utils import CortexError


def sample_class_conditional(model, labels, top_k=600, top_p=0.92, temperature=1.0, callback=None):
    """Class-conditional token grids from a Net2NetTransformer, as taming's ``sample_fast.py``.

    labels: (B,) class ids (LongTensor on the model's device) -> ids (B, 256) in raster order.
    Uses the global torch RNG: seed it before calling.
    """
    from taming.modules.transformer.mingpt import sample_with_past  # taming: optional, imported on use

    if getattr(model, "be_unconditional", False):
        raise CortexError("the transformer is unconditional; --source cin_transformer needs a class-conditional one")
    with torch.no_grad():
        _, c = model.encode_to_c(labels)  # (B, 1) class tokens (Labelator: the label itself)
        c = c.reshape(labels.shape[0], -1).long()
        idx = sample_with_past(c, model.transformer, steps=N_POS, temperature=temperature,
                               sample_logits=True, top_k=int(top_k or 0),  # 0: no top-k (top-p still applies)
                               top_p=top_p if top_p is not None and top_p < 1.0 else None, callback=callback)
        return model.permuter(idx, reverse=True)



def _check_transformer(model, classes) -> None:
    vocab = model.transformer.config.vocab_size
    n = first_stage(model).quantize.n_e
    if n > vocab:
        raise CortexError(f"the transformer's vocabulary ({vocab}) is smaller than the VQGAN codebook ({n})")
    n_classes = getattr(model.cond_stage_model, "n_classes", None)
    if n_classes is not None and max(classes) >= n_classes:
        raise CortexError(f"--classes goes up to {max(classes)} but the transformer knows {n_classes} classes")
    if model.transformer.get_block_size() < N_POS + 1:
        raise CortexError(f"the transformer's block_size {model.transformer.get_block_size()} is shorter than "
                          f"1 class token + {N_POS} image tokens")


def generate_cin(args, writer, device, model) -> dict:

    grid = _check_grid(model)
    if grid != (GRID, GRID):
        raise CortexError(f"--source cin_transformer samples {N_POS} tokens (taming's 16x16 cin_transformer); "
                          f"this model's first stage gives a {grid[0]}x{grid[1]} token grid")
    classes = parse_classes(_arg(args, "classes", "0-999"))
    _check_transformer(model, classes)
    n = int(_arg(args, "images_per_class", 100))
    if n <= 0:
        raise CortexError("--images_per_class must be positive")
    bs = max(1, int(_arg(args, "batch_size", 25)))
    fractions = parse_splits(_arg(args, "splits", "0.8,0.1,0.1"))
    seed = int(_arg(args, "seed", 0))
    top_k, top_p = int(_arg(args, "top_k", 600)), float(_arg(args, "top_p", 0.92))
    temperature = float(_arg(args, "temperature", 1.0))
    save_images = not getattr(args, "no_images", False)
    done = set().union(*(writer.done(s) for s in ("train", "validation", "test")))

    batches = []  # (class, [indices]) chunks; a chunk with anything missing is redrawn whole (same seed)
    for c in classes:
        for start in range(0, n, bs):
            idx = list(range(start, min(start + bs, n)))
            if any(f"{c}_{i}.npy" not in done for i in idx):
                batches.append((c, idx))
    todo = sum(sum(f"{c}_{i}.npy" not in done for i in idx) for c, idx in batches)
    print(f"cin_transformer: {len(classes)} classes x {n} images, {len(classes) * n - todo} already done, "
          f"{todo} to sample in {len(batches)} batches (top_k {top_k}, top_p {top_p}, temperature {temperature})")
    t0 = time.time()
    with tqdm(total=todo, desc="sampling", unit="img") as bar:
        for c, idx in batches:
            torch.manual_seed(_sub_seed(seed, "cin", c, idx[0]))
            labels = torch.full((len(idx),), c, dtype=torch.long, device=device)
            ids = sample_class_conditional(model, labels, top_k, top_p, temperature)
            imgs = to_uint8(decode_ids(model, ids)) if save_images else [None] * len(idx)
            ids = ids.cpu().numpy()
            for j, i in enumerate(idx):
                name = f"{c}_{i}.npy"
                if name in done:
                    continue
                writer.add(split_of_index(i, n, fractions), name, c, ids[j], imgs[j])
                bar.update(1)
    dt = time.time() - t0
    if todo:
        print(f"sampled {todo} images in {dt:.1f} s ({dt / todo:.3f} s/image on {device})")
    info = _base_info(model, "cin_transformer", args)
    info.update({
        "num_classes": max(classes) + 1,
        "classes": classes,
        "images_per_class": n,
        "top_k": top_k, "top_p": top_p, "temperature": temperature, "batch_size": bs, "seed": seed,
        "splits": list(fractions),
        "split_sizes": dict(zip(("train", "validation", "test"),
                                (len(classes) * k for k in split_counts(n, fractions)))),
        "transformer_config": str(_arg(args, "transformer_config", "")),
        "transformer_ckpt": str(_arg(args, "transformer_ckpt", "")),
    })
    return info
