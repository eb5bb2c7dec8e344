"""Writing a dataset in the authors' layout (SPEC §3), resumably: ``DatasetWriter``; ``to_uint8`` for its PNGs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cortex.data.formats import (CSV_HEADER, DEFAULT_GRID, EMB_DIM, SPLITS, _natural_key, canonical_split,
                                 check_geometry, image_path, split_csv, split_npy_dir, write_token_indices)
from cortex.utils import CortexError, atomic_save_npy, atomic_write, format_list, parse_int_list


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded (what the dataset's PNGs hold)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()



class DatasetWriter:
    """Writes a dataset in the authors' layout, resumably.

    Rows are appended (flushed) to ``{split}_embeddings.csv.partial``; ``close()`` sorts them and
    renames to the final CSV, then writes the token-index pickles, ``codebook.npy`` and
    ``dataset_info.json``. ``done(split)`` lists the filenames already written, so a restarted run
    skips them. layout: ``files`` (per-image .npy), ``compact`` (codebook only) or ``both``.
    codebook: (n_codes, D); grid: the token grid (h, w) of every image (default 16 x 16; a generator whose
    grid depends on its resolution may set ``writer.grid`` before the first ``add``). ``close`` records
    ``grid_size`` and ``code_dim`` in ``dataset_info.json`` when the geometry is not the paper's.
    """

    def __init__(self, data_dir, codebook: np.ndarray, layout: str = "files", grid=None):
        if layout not in ("files", "compact", "both"):
            raise CortexError(f"--layout {layout!r}: use files, compact or both")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.codebook = np.asarray(codebook, dtype=np.float32)
        self.layout = layout
        self.grid = DEFAULT_GRID if grid is None else check_geometry(grid, 1, "DatasetWriter grid")[:2]
        self._files = {}

    def _partial(self, split: str) -> Path:
        return split_csv(self.data_dir, split).with_suffix(".csv.partial")

    def _rows(self, split: str) -> list[list[str]]:
        p = self._partial(split)
        if not p.exists():
            return []
        with open(p, newline="", encoding="utf-8-sig") as f:
            return [r for r in csv.reader(f) if len(r) == 3]  # a torn last line is dropped

    def done(self, split: str) -> set[str]:
        return {r[0] for r in self._rows(canonical_split(split))}

    def add(self, split: str, filename: str, label: int, ids, image: np.ndarray | None = None) -> None:
        """ids: (h*w,) ints (256 by default); image: (H, W, 3) uint8 or None."""
        split = canonical_split(split)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        h, w = self.grid
        if ids.shape != (h * w,):
            raise CortexError(f"{filename}: expected {h * w} token ids ({h}x{w} grid), got {ids.size}")
        if self.layout in ("files", "both"):
            emb = self.codebook[ids].T.reshape(self.codebook.shape[1], h, w)  # (D, h, w)
            atomic_save_npy(split_npy_dir(self.data_dir, split) / filename, np.ascontiguousarray(emb))
        if image is not None:
            out = image_path(self.data_dir, filename)
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out, "wb") as f:
                Image.fromarray(image).save(f, format="PNG")
        if split not in self._files:
            self._files[split] = open(self._partial(split), "a", newline="", encoding="utf-8")
        f = self._files[split]
        csv.writer(f).writerow([filename, int(label), format_list(ids)])
        f.flush()

    def close(self, info: dict | None = None) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        for split in SPLITS:
            rows = self._rows(split)
            if not rows:
                continue
            rows.sort(key=lambda r: (int(r[1]), _natural_key(r[0])))
            with atomic_write(split_csv(self.data_dir, split)) as f:
                w = csv.writer(f)
                w.writerow(CSV_HEADER)
                w.writerows(rows)
            self._partial(split).unlink()
            if split in ("train", "test"):
                write_token_indices(self.data_dir, split, {r[0]: parse_int_list(r[2]).tolist() for r in rows})
        atomic_save_npy(self.data_dir / "codebook.npy", self.codebook)
        if info is not None:
            if "grid_size" in info or (tuple(self.grid), self.codebook.shape[1]) != (DEFAULT_GRID, EMB_DIM):
                info = {**info, "grid_size": list(self.grid), "code_dim": int(self.codebook.shape[1])}
            with atomic_write(self.data_dir / "dataset_info.json") as f:
                json.dump(info, f, indent=2, sort_keys=True)
