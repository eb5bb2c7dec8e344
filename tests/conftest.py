"""Shared fixtures: a tiny synthetic world (a few images, small codebook) built once per session."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_WORLD = ["--num_classes", "3", "--train_per_class", "8", "--val_per_class", "2", "--test_per_class", "3",
              "--n_codes", "64", "--concept_tokens", "4", "--n_background", "16", "--n_distractors", "4",
              "--object_size", "3", "4", "--patch_size", "2"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """An experiment folder whose datasets/ holds a tiny synthetic world (files + compact layouts)."""
    from tests.helpers import run_script

    root = tmp_path_factory.mktemp("vqgan_root")
    run_script("VQGAN_explanation/generate_dataset.py", ["--root", root, "--layout", "both", *TINY_WORLD])
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dominated by per-op overhead; two threads on shared cores are ~10x slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
