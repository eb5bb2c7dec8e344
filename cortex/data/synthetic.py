"""The embedded synthetic world: a seeded toy VQ model with planted concept tokens.

It stands in for a taming VQGAN everywhere (no download): ``SyntheticVQ`` has the taming interface
the pipeline uses (``quantize.embedding.weight``, ``encode``, ``decode``), and ``SyntheticWorld``
draws token grids whose concepts are known, so explanations can be scored against the truth.

* codebook: ``n_codes`` Gaussian 256-d vectors;
* decoder: every code is a small coloured, textured ``patch_size`` x ``patch_size`` patch; the concept
  tokens of a class share the class's hue (so an image classifier can see the concept), background
  tokens are dull;
* an image of class ``y``: background tokens drawn with a skewed (Zipf) frequency from a pool shared by
  all classes (so the most *frequent* tokens of every class are background: the frequency baseline is
  fooled, as on real data), a few distractor tokens anywhere, and class ``y``'s concept tokens either as
  one object of random size and place (``object``) or at random positions (``scattered``).
"""
from __future__ import annotations

import colorsys
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cortex.data.formats import EMB_DIM, GRID, N_POS, embedding_to_ids, ids_to_embedding
from cortex.data.writer import to_uint8
from cortex.utils import CortexError, atomic_torch_save, atomic_write


# ----------------------------------------------------------------------------- the toy VQ model

class _Quantize(nn.Module):
    def __init__(self, n_codes: int):
        super().__init__()
        self.embedding = nn.Embedding(n_codes, EMB_DIM)


class SyntheticVQ(nn.Module):
    """A VQ "autoencoder" with a taming-like interface over a fixed codebook and patch renderer.

    quantize.embedding.weight: (n_codes, 256); patches: (n_codes, 3, P, P) in [-1, 1].
    """

    def __init__(self, codebook: torch.Tensor, patches: torch.Tensor):
        super().__init__()
        n_codes = codebook.shape[0]
        self.quantize = _Quantize(n_codes)
        with torch.no_grad():
            self.quantize.embedding.weight.copy_(codebook)
        self.register_buffer("patches", patches.float())
        self.patch_size = patches.shape[-1]
        self.image_size = GRID * self.patch_size

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, 256) -> images (B, 3, 16P, 16P) in [-1, 1]."""
        B, P = ids.shape[0], self.patch_size
        tiles = self.patches[ids]  # (B, 256, 3, P, P)
        tiles = tiles.view(B, GRID, GRID, 3, P, P).permute(0, 3, 1, 4, 2, 5)  # (B, 3, 16, P, 16, P)
        return tiles.reshape(B, 3, GRID * P, GRID * P)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant (B, 256, 16, 16) -> images (B, 3, 16P, 16P); each position snaps to its nearest code."""
        return self.decode_ids(self.nearest_ids(quant))

    def nearest_ids(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, 256, 16, 16) -> (B, 256) nearest codebook ids."""
        return embedding_to_ids(self.codebook.detach(), quant.detach())

    def encode(self, images: torch.Tensor):
        """images (B, 3, 16P, 16P) in [-1, 1] -> (quant (B, 256, 16, 16), 0.0, (None, None, ids (B*256,)))

        Each patch maps to the code whose rendered patch is nearest (L2), as taming's ``encode`` returns.
        """
        B, P = images.shape[0], self.patch_size
        x = images.view(B, 3, GRID, P, GRID, P).permute(0, 2, 4, 1, 3, 5).reshape(B, N_POS, -1)
        bank = self.patches.reshape(self.patches.shape[0], -1)
        ids = torch.cdist(x, bank[None].expand(B, -1, -1)).argmin(-1)  # (B, 256)
        quant = ids_to_embedding(self.codebook.detach(), ids)
        return quant, torch.zeros(()), (None, None, ids.reshape(-1))


def save_vq(vq: SyntheticVQ, path) -> None:
    atomic_torch_save({"codebook": vq.codebook.detach().cpu(), "patches": vq.patches.cpu()}, path)


def load_vq(path, device="cpu") -> SyntheticVQ:
    path = Path(path)
    if not path.exists():
        raise CortexError(f"synthetic VQ model not found: {path}; run generate_dataset.py --source synthetic first")
    d = torch.load(path, map_location="cpu", weights_only=True)
    return SyntheticVQ(d["codebook"], d["patches"]).to(device).eval()


# ----------------------------------------------------------------------------- the world

@dataclass
class WorldConfig:
    num_classes: int = 10
    n_codes: int = 512
    concept_tokens: int = 8  # planted concept tokens per class (disjoint between classes)
    n_background: int = 48  # background pool shared by all classes
    n_distractors: int = 16  # distractor pool (uniform over classes)
    distractors_per_image: int = 6
    zipf: float = 1.1  # skew of the background frequency
    object_size: tuple = (4, 6)  # min, max side of the square object, in tokens
    concept_layout: str = "object"  # object | scattered
    patch_size: int = 4
    seed: int = 0
    null_classes: int = 0  # extra labels after the planted ones with NO concept (background + distractors only)
    hard_negatives: int = 0  # positions per image holding other classes' concept tokens (every label, null ones too)

    @property
    def total_classes(self) -> int:
        """Planted classes plus null classes: the labels ``0 .. total_classes - 1`` of the dataset."""
        return self.num_classes + self.null_classes


@dataclass
class SyntheticWorld:
    """Token bookkeeping of a world: which ids are concepts of which class, background, distractors."""

    config: WorldConfig
    concept_tokens: dict = field(default_factory=dict)  # label -> list[int]
    background: list = field(default_factory=list)
    background_p: list = field(default_factory=list)
    distractors: list = field(default_factory=list)
    hues: dict = field(default_factory=dict)  # label -> hue in [0, 1)
    extra: dict = field(default_factory=dict)  # name -> list[int], further disjoint token groups

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: WorldConfig, extra_groups: dict | None = None):
        """Partition the codebook ids. extra_groups: name -> size of further disjoint token groups."""
        c = config
        need = c.num_classes * c.concept_tokens + c.n_background + c.n_distractors
        need += sum((extra_groups or {}).values())
        if need > c.n_codes:
            raise CortexError(f"--n_codes {c.n_codes} is too small: the world needs {need} distinct tokens "
                              f"(classes x concept tokens + background + distractors)")
        if c.concept_layout not in ("object", "scattered"):
            raise CortexError(f"--concept_layout {c.concept_layout!r}: use object or scattered")
        rng = np.random.default_rng([c.seed, 1])
        perm = rng.permutation(c.n_codes).tolist()
        world = cls(config=c)
        for y in range(c.num_classes):
            world.concept_tokens[y] = sorted(perm[:c.concept_tokens])
            del perm[:c.concept_tokens]
            world.hues[y] = (y / max(c.num_classes, 1) + 0.05) % 1.0
        world.background = perm[:c.n_background]
        del perm[:c.n_background]
        w = 1.0 / np.arange(1, c.n_background + 1) ** c.zipf
        world.background_p = (w / w.sum()).tolist()
        world.distractors = sorted(perm[:c.n_distractors])
        del perm[:c.n_distractors]
        for name, size in (extra_groups or {}).items():
            world.extra[name] = sorted(perm[:size])
            del perm[:size]
        return world

    def make_vq(self, colour_groups: dict | None = None) -> SyntheticVQ:
        """The VQ model: Gaussian codebook + rendered patches (concepts in their class hue).

        colour_groups: optional {hue: [ids]} for further coloured token groups (e.g. a bias world).
        """
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 7919 + 13)
        codebook = torch.randn(c.n_codes, EMB_DIM, generator=g)
        # As in a trained VQGAN, codes that look alike lie close: a class's concept codes share a direction
        # (cosine ~0.5 between them), and keep the norm of the other codes.
        for y, toks in self.concept_tokens.items():
            centre = torch.randn(EMB_DIM, generator=g)
            codebook[toks] = (centre + codebook[toks]) / 2 ** 0.5
        rng = np.random.default_rng([c.seed, 2])
        hue = rng.random(c.n_codes)
        sat = rng.uniform(0.0, 0.25, c.n_codes)  # dull by default
        val = rng.uniform(0.25, 0.75, c.n_codes)
        groups = {self.hues[y]: toks for y, toks in self.concept_tokens.items()}
        groups.update(colour_groups or {})
        for h, toks in groups.items():
            toks = np.asarray(toks)
            hue[toks] = (h + rng.uniform(-0.03, 0.03, toks.size)) % 1.0
            sat[toks] = rng.uniform(0.7, 1.0, toks.size)
            val[toks] = rng.uniform(0.7, 1.0, toks.size)
        patches = render_patches(hue, sat, val, c.patch_size, rng)
        return SyntheticVQ(codebook, patches)

    # ------------------------------------------------------------------ sampling
    def background_grid(self, rng: np.random.Generator) -> np.ndarray:
        """(256,) background ids with a few distractors."""
        ids = rng.choice(self.background, size=N_POS, p=self.background_p)
        k = min(self.config.distractors_per_image, N_POS)
        if k and self.distractors:
            pos = rng.choice(N_POS, size=k, replace=False)
            ids[pos] = rng.choice(self.distractors, size=k)
        return ids.astype(np.int64)

    def concept_positions(self, rng: np.random.Generator, layout: str | None = None) -> np.ndarray:
        """Positions that carry the concept: one square object, or as many scattered positions."""
        lo, hi = self.config.object_size
        s = int(rng.integers(lo, hi + 1))
        if (layout or self.config.concept_layout) == "object":
            r0, c0 = rng.integers(0, GRID - s + 1, size=2)
            rows, cols = np.meshgrid(np.arange(r0, r0 + s), np.arange(c0, c0 + s), indexing="ij")
            return (rows * GRID + cols).reshape(-1)
        return np.sort(rng.choice(N_POS, size=s * s, replace=False))

    def place(self, ids: np.ndarray, tokens, rng: np.random.Generator, layout: str | None = None) -> np.ndarray:
        pos = self.concept_positions(rng, layout)
        ids[pos] = rng.choice(tokens, size=pos.size)
        return pos

    def sample(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """(256,) token ids of one image of class ``label``."""
        ids = self.background_grid(rng)
        pos = np.zeros(0, np.int64)
        if label in self.concept_tokens:  # a null label (>= num_classes) carries no concept
            pos = self.place(ids, self.concept_tokens[label], rng)
        k = self.config.hard_negatives
        others = [t for y, toks in self.concept_tokens.items() if y != label for t in toks]
        if k and others:  # hard negatives: other classes' concept tokens, outside the concept
            free = np.setdiff1d(np.arange(N_POS), pos)
            ids[rng.choice(free, size=min(k, free.size), replace=False)] = rng.choice(others, size=min(k, free.size))
        return ids

    def ground_truth(self) -> dict:
        return {
            "world": "synthetic",
            "layout": self.config.concept_layout,
            "num_classes": self.config.total_classes,
            "null_labels": list(range(self.config.num_classes, self.config.total_classes)),
            "n_codes": self.config.n_codes,
            "concept_tokens": {str(k): v for k, v in self.concept_tokens.items()},
            "background_tokens": sorted(self.background),
            "distractor_tokens": self.distractors,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()},
        }


def render_patches(hue, sat, val, P: int, rng: np.random.Generator) -> torch.Tensor:
    """(n_codes, 3, P, P) patches in [-1, 1]: a colour modulated by a random stripe texture."""
    n = len(hue)
    rgb = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, sat, val)], dtype=np.float32)
    yy, xx = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    theta = rng.uniform(0, np.pi, n)[:, None, None]
    freq = rng.uniform(0.5, 2.0, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    tex = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)  # (n, P, P)
    img = rgb[:, :, None, None] * (0.8 + 0.2 * tex[:, None])  # (n, 3, P, P) in [0, 1]
    return torch.from_numpy(np.clip(img, 0, 1) * 2 - 1).float()


def write_world(data_dir, writer, world: SyntheticWorld, vq: SyntheticVQ, counts: dict, seed: int,
                sampler=None, label_name: str = "label") -> None:
    """Sample ``counts[split]`` images per class into ``writer`` (resumable) with decoded PNGs.

    sampler(label, rng) -> ids overrides ``world.sample``. Each image's rng is seeded by
    (seed, label, index), so the data do not depend on the order or on resuming.
    """
    sampler = sampler or world.sample
    jobs = []
    for y in range(world.config.total_classes):
        idx = 0
        for split in ("train", "validation", "test"):
            for _ in range(counts.get(split, 0)):
                jobs.append((split, y, idx))
                idx += 1
    done = {s: writer.done(s) for s in ("train", "validation", "test")}
    for split, y, idx in tqdm(jobs, desc="synthetic images", unit="img"):
        name = f"{y}_{idx}.npy"
        if name in done[split]:
            continue
        rng = np.random.default_rng([seed, 3, y, idx])
        ids = sampler(y, rng)
        img = to_uint8(vq.decode_ids(torch.from_numpy(ids)[None]))[0]
        writer.add(split, name, y, ids, img)


def write_json(path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
