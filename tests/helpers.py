"""Test helpers: run an experiment script's main() in-process (see cortex.scripts)."""
import csv

import numpy as np
import torch
from torch import nn

from cortex.scripts import REPO, load_script, run_script  # noqa: F401


class LinearIEM(nn.Module):
    """A linear IEM over the (B, 256, 16, 16) embedding, seeded: hand-checkable logits."""

    def __init__(self, n_classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.w = nn.Parameter(torch.randn(n_classes, 256))

    def forward(self, x):  # (B, 256, 16, 16)
        return torch.einsum("kc,bchw->bk", self.w, x)


def compact_dataset(d, n_classes: int, per_label: int, n_codes: int = 24):
    """A seeded compact-layout train split: ``per_label`` images of random ids for each of ``n_classes`` labels."""
    from cortex.data.writer import DatasetWriter

    rng = np.random.default_rng(0)
    w = DatasetWriter(d, rng.normal(size=(n_codes, 256)).astype(np.float32), layout="compact")
    for k in range(n_classes):
        for j in range(per_label):
            w.add("train", f"{k}_{j}.npy", k, rng.integers(0, n_codes, 256))
    w.close({"num_classes": n_classes})
    return d


def write_sectioned_stats(path, n_images: int, rows, top_ns=(1, 5, 10, 20)):
    """A TIS statistics file in the authors' sectioned format, the same ``(token, count, files)`` rows per n."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"Total Images: {n_images}"])
        for n in top_ns:
            w.writerow([f"Top {n} Tokens"])
            w.writerow(["Token", "Frequency", "Files"])
            w.writerows(rows)


def write_frequency_baseline(path, rows):
    """A frequency-baseline file (``Token,Count``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Token", "Count"])
        w.writerows(rows)
