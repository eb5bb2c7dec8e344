"""The synthetic bias world of Dalle_explanation (SPEC §6): a "doctor" with a gender and a skin-colour attribute.

One world serves both bias types, as one generator (DALL-E-mini) serves both in the paper:

* the codebook and background are those of :class:`cortex.data.synthetic.SyntheticWorld` (shared Zipf background
  pool, distractors), built with five extra disjoint token groups: ``doctor`` (the shared object, the same
  tokens whatever the labels), ``gender_0`` / ``gender_1`` (male / female) and ``color_0`` / ``color_1``
  (light / dark skin);
* every image is background + one doctor object (a square of ``doctor_size`` tokens) + two small attribute
  objects (squares of ``attribute_size`` tokens, not overlapping each other): one drawn from its gender
  group, one from its colour group;
* the ``doctor_gender`` dataset labels images by their gender attribute (0 male, 1 female) and draws the
  colour attribute 50/50, independently; ``doctor_color`` the other way round (0 light, 1 dark). So each IEM
  must find its own attribute and ignore the other. In a fraction ``attribute_dropout`` of the labelled
  images (both labels alike) the labelled attribute is not drawn, so "female" cannot be read as "no male
  tokens" without a cost;
* the background pool is large and only mildly skewed (384 tokens, Zipf 0.3): with the VQGAN world's 48
  tokens at Zipf 1.1 one background token fills ~20 % of every grid, and such a token in a label's top list
  decides the per-image counts (and Cliff's delta) alone;
* the neutral-prompt set (``datasets/doctor_original/information/results_none.csv``) is shared by both bias
  types: each of its images carries a gender *and* a colour attribute; exactly ``round(gender_ratio * N)``
  images carry gender 0 (male) and ``round(color_ratio * N)`` colour 0 (light), assigned by two independent
  seeded permutations. Image ``i``'s tokens depend only on ``(seed, i)`` and its two attributes, so sweeping
  a ratio flips attributes of some images and changes nothing else.

The truth (attribute token sets, the ratio, the expected sign of Cliff's delta) is written to each bias type's
``datasets/{bias_type}/embeddings/ground_truth.json``; ``concept_tokens`` there are the attribute tokens, so
``cortex.analysis.recovery.concept_recovery`` scores the Dalle IEMs too.
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cortex.data.formats import GRID, N_POS
from cortex.data.writer import to_uint8
from cortex.data.synthetic import SyntheticWorld, WorldConfig
from cortex.utils import CortexError, atomic_write, format_list

# bias type -> (attribute, names of labels 0 and 1)
ATTRIBUTES = {"doctor_gender": ("gender", ("male", "female")), "doctor_color": ("color", ("light", "dark"))}
ATTRIBUTE_OF = {a: bt for bt, (a, _) in ATTRIBUTES.items()}
GROUP_HUES = {"doctor": 0.55, "gender_0": 0.68, "gender_1": 0.88, "color_0": 0.12, "color_1": 0.30}
NEUTRAL_HEADER = ["filename", "indices", "gender", "color"]


@dataclass
class BiasWorldConfig:
    n_codes: int = 1024
    attribute_tokens: int = 12  # tokens per attribute value (male, female, light, dark)
    doctor_tokens: int = 64  # the shared "doctor" object's tokens
    n_background: int = 384  # a large, mildly skewed pool: no token covers much of a grid, as in real VQGAN grids
    n_distractors: int = 16
    distractors_per_image: int = 6
    zipf: float = 0.3
    doctor_size: tuple = (4, 6)  # side of the doctor square, in tokens
    attribute_size: tuple = (3, 4)  # side of each attribute square
    # labelled images whose attribute is not visible (both labels alike); test accuracy <= 1 - dropout / 2. At 0.2 the
    # tiny IEMs memorise the coin-flip images and the best-validation epoch, the accuracy (81-91 %) and the bias
    # verdicts vary with the seed and the CPU; at 0.05 both CPUs give 94-99 % (docs/bias_detection.md)
    attribute_dropout: float = 0.05
    group_cosine: float = 0.5  # cosine between two codes of one group (doctor, male, ...): alike codes lie close
    patch_size: int = 4
    seed: int = 0

    def key(self) -> dict:
        """JSON-able identity of the world (same key, same codebook and token groups)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class BiasWorld:
    """Token bookkeeping and sampling of the bias world (see the module docstring)."""

    def __init__(self, config: BiasWorldConfig):
        c = self.config = config
        for name, (lo, hi) in (("--doctor_size", c.doctor_size), ("--attribute_size", c.attribute_size)):
            if not 1 <= lo <= hi <= GRID:
                raise CortexError(f"{name} {lo} {hi}: need 1 <= MIN <= MAX <= {GRID}")
        if not 0.0 <= c.group_cosine < 1.0:
            raise CortexError(f"--group_cosine {c.group_cosine}: must be in [0, 1)")
        if not 0.0 <= c.attribute_dropout < 1.0:
            raise CortexError(f"--attribute_dropout {c.attribute_dropout}: must be in [0, 1)")
        if 2 * c.attribute_size[1] ** 2 > N_POS:
            raise CortexError(f"--attribute_size {c.attribute_size}: two attribute squares do not fit a 16x16 grid")
        wc = WorldConfig(num_classes=0, n_codes=c.n_codes, concept_tokens=0, n_background=c.n_background,
                         n_distractors=c.n_distractors, distractors_per_image=c.distractors_per_image, zipf=c.zipf,
                         object_size=tuple(c.doctor_size), concept_layout="object", patch_size=c.patch_size,
                         seed=c.seed)
        groups = {"doctor": c.doctor_tokens}
        groups.update({g: c.attribute_tokens for g in ("gender_0", "gender_1", "color_0", "color_1")})
        if min(groups.values()) < 1:
            raise CortexError("--attribute_tokens and --doctor_tokens must be >= 1")
        need = sum(groups.values()) + c.n_background + c.n_distractors
        if need > c.n_codes:
            raise CortexError(f"--n_codes {c.n_codes} is too small for the bias world: it needs {need} distinct tokens "
                              f"(--doctor_tokens {c.doctor_tokens} + 4 x --attribute_tokens {c.attribute_tokens} + "
                              f"--n_background {c.n_background} + --n_distractors {c.n_distractors}); raise --n_codes "
                              f"or lower the others")
        self.world = SyntheticWorld.build(wc, extra_groups=groups)
        self.groups = self.world.extra

    # ------------------------------------------------------------------ model
    def make_vq(self):
        """The toy VQ model: attribute and doctor tokens rendered in their own hues; as in a trained VQGAN
        (and as the concept codes of ``SyntheticWorld``), the codes of one group share a direction:
        ``sqrt(cos) * centre + sqrt(1 - cos) * code`` with ``cos = group_cosine``, norms kept on average."""
        vq = self.world.make_vq(colour_groups={GROUP_HUES[g]: toks for g, toks in self.groups.items()})
        cos = self.config.group_cosine
        if cos > 0:
            g = torch.Generator().manual_seed(self.config.seed * 7919 + 17)
            with torch.no_grad():
                w = vq.quantize.embedding.weight
                shared = {a: torch.randn(w.shape[1], generator=g) for a in ("gender", "color")}
                for name in sorted(self.groups):
                    toks = torch.as_tensor(self.groups[name])
                    centre = torch.randn(w.shape[1], generator=g)
                    attribute = name.split("_")[0]
                    if attribute in shared:  # male and female codes are both "face" codes: half of the centre is shared
                        centre = (centre + shared[attribute]) / 2 ** 0.5
                    w[toks] = cos ** 0.5 * centre + (1 - cos) ** 0.5 * w[toks]
        return vq

    def attribute_tokens(self, attribute: str, value: int) -> list[int]:
        return list(self.groups[f"{attribute}_{value}"])

    # ------------------------------------------------------------------ sampling
    def _square(self, rng: np.random.Generator, size_range, avoid: set, tries: int = 64) -> np.ndarray:
        lo, hi = size_range
        s = int(rng.integers(lo, hi + 1))
        pos = None
        for _ in range(tries):
            r0, c0 = rng.integers(0, GRID - s + 1, size=2)
            rows, cols = np.meshgrid(np.arange(r0, r0 + s), np.arange(c0, c0 + s), indexing="ij")
            pos = (rows * GRID + cols).reshape(-1)
            if not avoid.intersection(pos.tolist()):
                break
        return pos

    def sample(self, rng: np.random.Generator, gender: int, color: int, hide: str | None = None) -> np.ndarray:
        """(256,) ids: background + doctor object + a gender square + a colour square (disjoint squares).

        hide: ``"gender"`` or ``"color"`` leaves that attribute's square as background (not visible).
        """
        ids = self.world.background_grid(rng)
        self.world.place(ids, self.groups["doctor"], rng, layout="object")
        taken: set = set()
        for attribute, value in (("gender", gender), ("color", color)):
            pos = self._square(rng, self.config.attribute_size, taken)
            tokens = rng.choice(self.groups[f"{attribute}_{value}"], size=pos.size)
            if attribute != hide:
                ids[pos] = tokens
            taken.update(pos.tolist())
        return ids

    def sampler(self, bias_type: str):
        """``sampler(label, rng) -> ids`` for ``cortex.data.synthetic.write_world``: the label is the bias type's
        attribute, the other attribute is drawn 50/50; with probability ``attribute_dropout`` the labelled
        attribute is not visible (same rate for both labels)."""
        attribute, _ = _attribute(bias_type)
        p = self.config.attribute_dropout

        def draw(label: int, rng: np.random.Generator) -> np.ndarray:
            other = int(rng.integers(2))
            hide = attribute if rng.random() < p else None
            if attribute == "gender":
                return self.sample(rng, int(label), other, hide)
            return self.sample(rng, other, int(label), hide)

        return draw

    def labelled_world(self) -> SyntheticWorld:
        """The SyntheticWorld seen as a 2-label world (``write_world`` loops over its labels)."""
        return dataclasses.replace(self.world, config=dataclasses.replace(self.world.config, num_classes=2))

    # ------------------------------------------------------------------ truth
    def ground_truth(self, bias_type: str, neutral: dict | None = None) -> dict:
        attribute, names = _attribute(bias_type)
        other = "color" if attribute == "gender" else "gender"
        gt = {
            "world": "synthetic_bias",
            "bias_type": bias_type,
            "attribute": attribute,
            "attribute_names": {"0": names[0], "1": names[1]},
            "num_classes": 2,
            "n_codes": self.config.n_codes,
            "concept_tokens": {str(v): self.attribute_tokens(attribute, v) for v in (0, 1)},
            "doctor_tokens": list(self.groups["doctor"]),
            "other_attribute": {"attribute": other, "names": dict(enumerate(ATTRIBUTES[ATTRIBUTE_OF[other]][1])),
                                "tokens": {str(v): self.attribute_tokens(other, v) for v in (0, 1)}},
            "background_tokens": sorted(self.world.background),
            "distractor_tokens": list(self.world.distractors),
            "config": self.config.key(),
        }
        if neutral is not None:
            ratio = float(neutral[f"{attribute}_ratio"])
            n = int(neutral["n_images"])
            n0 = int(neutral[f"{attribute}_counts"]["0"])
            sign = 0 if n0 * 2 == n else (1 if n0 * 2 > n else -1)
            lean = None if sign == 0 else (0 if sign > 0 else 1)
            gt["neutral_set"] = {
                "csv": neutral["csv"],
                "n_images": n,
                "bias_ratio": ratio,
                "bias_ratio_meaning": f"fraction of neutral-prompt images carrying attribute 0 ({names[0]}) tokens",
                "images_per_label": neutral[f"{attribute}_counts"],
                "generation_args": neutral.get("args", {}),
            }
            gt["expected_direction"] = {
                "sign_of_cliff_delta_label_0": sign,
                "leans_to_label": lean,
                "text": ("no bias planted" if lean is None else
                         f"the neutral prompt over-represents label {lean} ({names[lean]}): "
                         f"Cliff's delta of label {lean} > 0, of label {1 - lean} < 0"),
            }
        return gt


def _attribute(bias_type: str):
    if bias_type not in ATTRIBUTES:
        raise CortexError(f"--bias_type {bias_type!r}: use one of {', '.join(ATTRIBUTES)}")
    return ATTRIBUTES[bias_type]


def neutral_assignment(n: int, ratio: float, seed: int, attribute: str) -> np.ndarray:
    """(n,) attribute values: exactly ``round(ratio * n)`` zeros, placed by a seeded permutation."""
    if not 0.0 <= ratio <= 1.0:
        raise CortexError(f"--{attribute}_ratio {ratio}: must be in [0, 1] (fraction of neutral images with "
                          f"attribute 0)")
    n0 = int(round(ratio * n))
    perm = np.random.default_rng([seed, 7, 0 if attribute == "gender" else 1]).permutation(n)
    return (perm >= n0).astype(np.int64)  # perm < n0 -> attribute 0


def write_neutral_set(csv_path, world: BiasWorld, vq, n_images: int, gender_ratio: float, color_ratio: float,
                      image_dir=None) -> dict:
    """The neutral-prompt set: ``csv_path`` with header ``filename,indices,gender,color``.

    gender/color are the true attributes of each image (0/1; bias detection reads only ``indices``).
    image_dir: where the decoded PNGs go (``<image_dir>/<filename>``), None for none. Returns the info dict.
    """
    if n_images < 1:
        raise CortexError(f"--neutral_images {n_images}: need at least one neutral-prompt image")
    seed = world.config.seed
    gender = neutral_assignment(n_images, gender_ratio, seed, "gender")
    color = neutral_assignment(n_images, color_ratio, seed, "color")
    rows = []
    for i in tqdm(range(n_images), desc="neutral-prompt set", unit="img"):
        rng = np.random.default_rng([seed, 5, i])
        ids = world.sample(rng, int(gender[i]), int(color[i]))
        name = f"none_{i}.png"
        if image_dir is not None:
            img = to_uint8(vq.decode_ids(torch.from_numpy(ids)[None]))[0]
            out = Path(image_dir) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out, "wb") as f:
                Image.fromarray(img).save(f, format="PNG")
        rows.append([name, format_list(ids), int(gender[i]), int(color[i])])
    with atomic_write(csv_path) as f:
        w = csv.writer(f)
        w.writerow(NEUTRAL_HEADER)
        w.writerows(rows)
    return {
        "csv": str(csv_path),
        "n_images": n_images,
        "gender_ratio": gender_ratio,
        "color_ratio": color_ratio,
        "gender_counts": {"0": int((gender == 0).sum()), "1": int((gender == 1).sum())},
        "color_counts": {"0": int((color == 0).sum()), "1": int((color == 1).sum())},
    }
