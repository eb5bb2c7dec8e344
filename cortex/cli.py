"""Parent argparse parsers shared by the scripts of both experiment folders."""
from __future__ import annotations

import argparse
import os

BIAS_TYPES = ("doctor_gender", "doctor_color")


def paths_parser(root_default: str = ".") -> argparse.ArgumentParser:
    """Where data, checkpoints, results and logs live (relative to the experiment folder)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("paths")
    g.add_argument("--root", default=root_default,
                   help="experiment folder that holds datasets/ checkpoints/ results/ logs/ (default: %(default)s)")
    g.add_argument("--data_dir", default=None, help="dataset folder (default: <root>/datasets[/<bias_type>/embeddings])")
    g.add_argument("--checkpoint_dir", default=None, help="checkpoint folder (default: <root>/checkpoints[/<bias_type>])")
    g.add_argument("--results_dir", default=None, help="results folder (default: <root>/results[/<bias_type>])")
    g.add_argument("--log_dir", default=None, help="log folder (default: <root>/logs[/<bias_type>])")
    return p


def runtime_parser() -> argparse.ArgumentParser:
    """Seed and device."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0, help="random seed; same seed, same results (default: %(default)s)")
    g.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA when present, else CPU)")
    g.add_argument("--gpu", type=int, default=None, help="GPU index, as in the seed README (same as --device cuda:G)")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    return p


def data_parser() -> argparse.ArgumentParser:
    """How the IEM scripts (train, test, TIS) read the dataset."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--data_layout", choices=("auto", "files", "compact"), default="auto",
                   help="files: the authors' per-image .npy; compact: codebook.npy + the CSVs' token ids (the "
                        "loader ships ids, the embedding is looked up on the compute device; same tensors); "
                        "auto: compact when <data_dir>/codebook.npy exists, else files (default: %(default)s)")
    return p


def compact_parser() -> argparse.ArgumentParser:
    """compact_dataset.py: build codebook.npy from the authors' per-image files."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("compact layout")
    g.add_argument("--n_codes", type=int, default=None,
                   help="codebook size, e.g. 16384 for the paper's VQGAN (default: the VQGAN's, else the largest "
                        "id in the CSVs + 1)")
    g.add_argument("--vqgan_config", default=None,
                   help="optional taming VQGAN YAML of the model that made the data: its full codebook is written "
                        "(codes no image uses included) and every file is checked against it")
    g.add_argument("--vqgan_ckpt", default=None, help="its checkpoint (with --vqgan_config)")
    g.add_argument("--tolerance", type=float, default=1e-5,
                   help="allowed |file - codebook| per value, times (1 + |value|): float rounding of taming's "
                        "straight-through z_q (default: %(default)s; 0 = bit-exact)")
    g.add_argument("--force", action="store_true", help="overwrite an existing codebook.npy")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def merge_parser() -> argparse.ArgumentParser:
    """merge_datasets.py: one dataset from folders generated separately."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("merging")
    g.add_argument("--inputs", nargs="+", required=True,
                   help="dataset folders to merge, e.g. datasets_0-499 datasets_500-999 (the output is --data_dir)")
    g.add_argument("--copy", action="store_true",
                   help="copy the per-image files and PNGs instead of hard-linking them")
    g.add_argument("--force", action="store_true", help="merge into a --data_dir that already holds CSVs")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def model_parser(model_choices=(1, 2, 3, 4), default_model: int | None = None) -> argparse.ArgumentParser:
    """Which IEM, its width, and the number of classes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", type=int, choices=model_choices, default=default_model,
                   required=default_model is None, help="IEM architecture: ClassificationNet{m} (SPEC §4)")
    g.add_argument("--width", type=int, default=None,
                   help="IEM width (paper: 512). Default: read from the checkpoint's config.json, else 512")
    g.add_argument("--depth", type=int, default=None,
                   help="transformer layers for the ViT nets (paper: 12 VQGAN Net4, 6 Dalle Net3); default as paper")
    g.add_argument("--num_classes", type=int, default=None,
                   help="number of labels. Default: datasets/dataset_info.json, else 1000 (VQGAN) / 2 (DALL-E-mini)")
    return p


def bias_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--bias_type", choices=BIAS_TYPES, default="doctor_gender",
                   help="which attribute the IEM predicts (default: %(default)s)")
    return p


def env_int(name: str, default: int | None) -> int | None:
    """Integer from an environment variable (e.g. SLURM_ARRAY_TASK_ID), else ``default``."""
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default
