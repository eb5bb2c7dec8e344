"""Loading throughput of the two dataset layouts, side by side, on the same synthetic dataset.

    python bench/bench_loading.py [--images 2000] [--n_codes 16384]

Prints images/s for the authors' layout (one .npy per image) and the compact layout (codebook.npy +
token ids), plus the ratio and the disk footprint of each. Both go through cortex.data.EmbeddingDataset
and a DataLoader with the same batch size, as train.py does.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cortex.data import DatasetWriter, EmbeddingDataset


def get_args_parser():
    p = argparse.ArgumentParser("Dataset loading benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="training images")
    p.add_argument("--n_codes", type=int, default=16384, help="codebook size (the paper's VQGAN)")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp folder, removed after)")
    return p


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the files' cached pages, so the next read comes from disk."""
    for p in folder.rglob("*.npy"):
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def throughput(ds, batch_size, repeats, cold_dir: Path | None = None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if cold_dir is not None:
            drop_page_cache(cold_dir)
        t = time.perf_counter()
        for x, y, _ in DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)):
            pass
        best = min(best, time.perf_counter() - t)
    return len(ds) / best


def main(args):
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="cortex_bench_"))
    try:
        rng = np.random.default_rng(0)
        cb = rng.normal(size=(args.n_codes, 256)).astype(np.float32)
        w = DatasetWriter(scratch, cb, layout="files")
        for i in range(args.images):
            w.add("train", f"{i % 10}_{i}.npy", i % 10, rng.integers(0, args.n_codes, 256))
        w.close({"num_classes": 10})
        files = EmbeddingDataset(scratch, "train", layout="files")
        compact = EmbeddingDataset(scratch, "train", layout="compact")
        assert all(torch.equal(files[i][0], compact[i][0]) for i in range(0, len(files), max(1, len(files) // 20)))
        t_cold = throughput(files, args.batch_size, args.repeats, cold_dir=scratch / "train")
        t_files = throughput(files, args.batch_size, args.repeats)
        t_compact = throughput(compact, args.batch_size, args.repeats)
        size_files = du(scratch / "train")
        size_compact = (scratch / "codebook.npy").stat().st_size + (scratch / "train_embeddings.csv").stat().st_size
        print(f"{'layout':<26}{'images/s':>12}{'disk MB':>12}")
        print(f"{'files, cold page cache':<26}{t_cold:>12.0f}{size_files / 2**20:>12.1f}")
        print(f"{'files, warm page cache':<26}{t_files:>12.0f}{size_files / 2**20:>12.1f}")
        print(f"{'compact':<26}{t_compact:>12.0f}{size_compact / 2**20:>12.1f}")
        print(f"compact / files throughput: {t_compact / t_cold:.1f}x cold, {t_compact / t_files:.1f}x warm "
              f"(disk: {size_files / size_compact:.0f}x smaller)")
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
