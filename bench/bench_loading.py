"""Loading throughput of the two dataset layouts, side by side, on the same synthetic dataset.

    python bench/bench_loading.py [--images 2000] [--n_codes 16384] [--device cpu|cuda]

Every row goes through cortex.data.formats.EmbeddingDataset and a shuffled DataLoader with train.py's batch size,
and is timed twice:

* **loader**: what the DataLoader hands to the training/TIS step per second. The authors' layout reads
  one 256 KiB ``.npy`` per image; the compact layout, as train.py / test.py / TIS_computation.py use it
  (``return_ids=True``), ships the image's 256 token ids (512 bytes).
* **ready on device**: the same plus moving the batch to ``--device`` and, for id batches, the codebook
  lookup there (``dataset.lookup``), i.e. until the ``(B, 256, 16, 16)`` float tensor the IEM takes sits on
  the device. On a GPU the lookup runs at memory speed; on a CPU it is a 256 KiB copy per image, as
  reading a file is, so there the end-to-end gain is small.

The "compact, embeddings in the loader" row is the compact layout without the id path (the gather
happens in the loader, on the CPU), for comparison.
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

from cortex.data.formats import EmbeddingDataset
from cortex.data.writer import DatasetWriter
from cortex.utils import get_device


def get_args_parser():
    p = argparse.ArgumentParser("Dataset loading benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="training images")
    p.add_argument("--n_codes", type=int, default=16384, help="codebook size (the paper's VQGAN)")
    p.add_argument("--batch_size", type=int, default=512, help="train.py's VQGAN default")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (train.py's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    p.add_argument("--device", default=None, help="where the batch must end up (default: CUDA when present)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp folder, removed after)")
    return p


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the files' cached pages, so the next read comes from disk (not on tmpfs)."""
    os.sync()  # dirty pages (the files were just written) are not dropped
    for p in folder.rglob("*.npy"):
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def throughput(ds, args, device=None, cold_dir: Path | None = None) -> float:
    """Images per second of one shuffled pass (best of --repeats); with ``device``, until the embedding is there."""
    best = float("inf")
    for _ in range(args.repeats):
        if cold_dir is not None:
            drop_page_cache(cold_dir)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(0), pin_memory=device is not None
                            and device.type == "cuda")
        t = time.perf_counter()
        for x, y, _ in loader:
            if device is not None:
                x = ds.lookup(x.to(device, non_blocking=True))  # (B, 256, 16, 16) float32 on the device
                y = y.to(device, non_blocking=True)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return len(ds) / best


def main(args):
    device = get_device(args.device)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="cortex_bench_"))
    try:
        rng = np.random.default_rng(0)
        cb = rng.normal(size=(args.n_codes, 256)).astype(np.float32)
        w = DatasetWriter(scratch, cb, layout="both")
        for i in range(args.images):
            w.add("train", f"{i % 10}_{i}.npy", i % 10, rng.integers(0, args.n_codes, 256))
        w.close({"num_classes": 10})
        files = EmbeddingDataset(scratch, "train", layout="files", return_ids=True)  # files: always embeddings
        compact_emb = EmbeddingDataset(scratch, "train", layout="compact")
        compact_ids = EmbeddingDataset(scratch, "train", layout="compact", return_ids=True)
        check = next(iter(DataLoader(compact_ids, batch_size=64)))[0]
        assert torch.equal(compact_ids.lookup(check), torch.stack([files[i][0] for i in range(64)]))

        size_files = du(scratch / "train")
        size_compact = (scratch / "codebook.npy").stat().st_size + (scratch / "train_embeddings.csv").stat().st_size
        rows = [  # name, dataset, cold page cache?, disk bytes
            ("files, cold page cache", files, True, size_files),
            ("files, warm page cache", files, False, size_files),
            ("compact, embeddings in the loader", compact_emb, False, size_compact),
            ("compact, ids (train/TIS path)", compact_ids, False, size_compact),
        ]
        res = {}
        for name, ds, cold, _ in rows:
            cold_dir = scratch / "train" if cold else None
            res[name] = (throughput(ds, args, cold_dir=cold_dir), throughput(ds, args, device, cold_dir=cold_dir))

        print(f"{args.images} images, {args.n_codes} codes, batch {args.batch_size}, {args.num_workers} workers, "
              f"device {device}, {torch.get_num_threads()} threads")
        print(f"{'layout':<36}{'loader img/s':>14}{'ready on ' + device.type + ' img/s':>22}{'disk MB':>10}")
        for name, _, _, size in rows:
            loader_t, ready_t = res[name]
            print(f"{name:<36}{loader_t:>14.0f}{ready_t:>22.0f}{size / 2**20:>10.1f}")
        ids_l, ids_r = res["compact, ids (train/TIS path)"]
        for which in ("cold", "warm"):
            f_l, f_r = res[f"files, {which} page cache"]
            print(f"compact ids / files ({which} page cache): loader {ids_l / f_l:.0f}x, "
                  f"ready on {device.type} {ids_r / f_r:.1f}x")
        print(f"disk: compact is {size_files / size_compact:.0f}x smaller")
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
