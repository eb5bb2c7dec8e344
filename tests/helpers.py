"""Test helpers: run an experiment script's main() in-process (see cortex.scripts)."""
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
