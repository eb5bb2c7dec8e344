"""Reading and writing the authors' dataset layout (SPEC §3).

Two layouts give identical tensors:

* **files** (the authors'): ``{split}_embeddings.csv`` + one float32 ``.npy`` of shape (256, 16, 16)
  per row in ``train/``, ``val/`` or ``test/``;
* **compact**: the same CSVs + ``codebook.npy`` (n_codes, 256); an embedding is rebuilt as
  ``codebook[ids].T.reshape(256, 16, 16)``. Lossless for real VQGAN data and ~1000x smaller.

CSV rows look like ``0_12.npy,0,"[5, 16383, ...]"`` and are read with the csv module.

Other tokenizers: a dataset of an ``h x w`` grid of ``D``-d codes records ``grid_size`` [h, w] and
``code_dim`` D in ``dataset_info.json`` (:func:`dataset_geometry`); its rows then hold ``h*w`` ids and its
embeddings are ``(D, h, w)``. Without those keys (the authors' data) the geometry is the paper's 16 x 16 x 256.
"""
from __future__ import annotations

import csv
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cortex.utils import CortexError, atomic_write, file_sha256, generator_command, parse_int_list

GRID = 16
N_POS = GRID * GRID  # 256 token positions per image, row-major p = row*16 + col
EMB_DIM = 256
EMB_SHAPE = (EMB_DIM, GRID, GRID)
DEFAULT_GRID = (GRID, GRID)
CSV_HEADER = ["filename", "label", "indices"]

# split name -> (CSV file, per-image .npy folder)
SPLITS = {
    "train": ("train_embeddings.csv", "train"),
    "validation": ("validation_embeddings.csv", "val"),
    "test": ("test_embeddings.csv", "test"),
}
SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


def dataset_files() -> tuple[str, ...]:
    """The files that define a dataset's tensors: the split CSVs and ``codebook.npy``."""
    return tuple(v[0] for v in SPLITS.values()) + ("codebook.npy",)


def dataset_hashes(data_dir) -> dict[str, str | None]:
    """``{file: sha256 or None}`` of the split CSVs and ``codebook.npy`` of a dataset (what defines its tensors;
    the IEM's ``config.json`` records them, ``cortex.provenance`` compares them)."""
    return {name: file_sha256(Path(data_dir) / name) for name in dataset_files()}


def canonical_split(split: str) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise CortexError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def split_csv(data_dir, split: str) -> Path:
    return Path(data_dir) / SPLITS[canonical_split(split)][0]


def split_npy_dir(data_dir, split: str) -> Path:
    return Path(data_dir) / SPLITS[canonical_split(split)][1]


@dataclass
class Record:
    filename: str
    label: int
    ids: np.ndarray  # (256,) int64 token ids, row-major


def require_split(data_dir, split: str) -> Path:
    """``{split}_embeddings.csv`` of ``data_dir``; a CortexError saying what to do when it or the folder is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CortexError(
            f"dataset folder not found: {data_dir}. Generate one ({generator_command(data_dir)} --source synthetic) "
            f"or download the authors' data into it, or pass --data_dir.")
    path = split_csv(data_dir, split)
    if not path.exists():
        raise CortexError(f"split CSV not found: {path}. The dataset in {data_dir} has no {split} split; "
                          f"regenerate it or pass the right --data_dir.")
    return path


def read_split(data_dir, split: str, num_classes: int | None = None, n_pos: int | None = None) -> list[Record]:
    """Rows of ``{split}_embeddings.csv``; every problem is a CortexError naming file and line.

    n_pos: ids per row (default: h*w of :func:`dataset_geometry`, 256 for the authors' data)."""
    data_dir = Path(data_dir)
    path = require_split(data_dir, split)
    if n_pos is None:
        n_pos = n_positions(data_dir)
    n_codes = codebook_size(data_dir)
    records = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a header saved with a BOM (Excel) reads as-is
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != CSV_HEADER:
            raise CortexError(f"{path}: header must be 'filename,label,indices', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{path}:{lineno}"
            if len(row) != 3:
                raise CortexError(f"{where}: expected 3 fields (filename,label,\"[ids]\"), got {len(row)}; "
                                  f"is the indices list quoted?")
            try:
                label = int(row[1])
            except ValueError:
                raise CortexError(f"{where}: label {row[1]!r} is not an integer") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise CortexError(f"{where}: label {label} is outside 0..{(num_classes or 1) - 1}; "
                                  f"pass the right --num_classes")
            ids = parse_int_list(row[2], where=where)
            if ids.shape != (n_pos,):
                raise CortexError(f"{where}: expected {n_pos} token ids, got {ids.size} (one per position of the "
                                  f"dataset's token grid, dataset_info.json grid_size; 16x16 when absent)")
            if ids.min() < 0:
                raise CortexError(f"{where}: negative token id {int(ids.min())}")
            if n_codes is not None and ids.max() >= n_codes:
                raise CortexError(f"{where}: token id {int(ids.max())} of image {row[0]} is not in the codebook (it "
                                  f"has {n_codes} codes, ids 0..{n_codes - 1}; {codebook_size_source(data_dir)})")
            records.append(Record(row[0], label, ids))
    if not records:
        raise CortexError(f"{path}: no rows")
    return records


def codebook_size(data_dir) -> int | None:
    """The number of codes of a dataset's codebook: ``n_codes`` of ``dataset_info.json``, else the rows of
    ``codebook.npy`` (its header only), else None (unknown: ids are not range-checked)."""
    n = dataset_info(data_dir).get("n_codes")
    if isinstance(n, int) and n > 0:
        return n
    path = Path(data_dir) / "codebook.npy"
    try:
        return int(np.load(path, mmap_mode="r").shape[0]) if path.exists() else None
    except (ValueError, OSError, IndexError):
        return None  # load_codebook names a corrupt codebook where it is used


def codebook_size_source(data_dir) -> str:
    return ("n_codes of " if dataset_info(data_dir).get("n_codes") else "rows of ") + str(
        Path(data_dir) / ("dataset_info.json" if dataset_info(data_dir).get("n_codes") else "codebook.npy"))


def load_npy(path, what: str = "embedding") -> np.ndarray:
    """``np.load`` of a float32 ``.npy``; a truncated/corrupt file or another dtype is a CortexError naming it.

    Other dtypes are refused rather than cast: an int64 or float16 file is not what the generator wrote (the
    authors' embeddings are float32 codebook vectors), so casting would hide a wrong or lossy file.
    """
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CortexError(f"{what} file not found: {path}") from None
    except (ValueError, EOFError, OSError) as e:
        raise CortexError(f"{path}: cannot read this {what} .npy ({str(e)[:120]}); the file is truncated or corrupt "
                          f"(an interrupted copy or generation?): regenerate or re-download it") from None
    if arr.dtype != np.float32:
        raise CortexError(f"{path}: {what} has dtype {arr.dtype}, expected float32 (the authors' format); it was not "
                          f"written by generate_dataset.py: regenerate it (or convert it yourself if the values are "
                          f"right: np.save(path, arr.astype(np.float32)))")
    return arr


def load_embedding_file(path, shape: tuple[int, int, int] = EMB_SHAPE) -> np.ndarray:
    """One per-image embedding ``.npy``: float32 ``shape`` (default (256, 16, 16)), else a CortexError naming it."""
    arr = load_npy(path, "embedding")
    if arr.shape != tuple(shape):
        raise CortexError(f"{path}: embedding must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def load_codebook(data_dir, code_dim: int | None = None) -> np.ndarray:
    """``codebook.npy`` (n_codes, D); D = ``code_dim`` or the dataset's (:func:`dataset_geometry`, 256 by default)."""
    path = Path(data_dir) / "codebook.npy"
    if not path.exists():
        raise CortexError(f"codebook not found: {path} (needed by the compact layout). Pass --data_layout files "
                          f"to read the per-image .npy files, or build it from them: python compact_dataset.py")
    dim = dataset_geometry(data_dir)[2] if code_dim is None else int(code_dim)
    cb = load_npy(path, "codebook")
    if cb.ndim != 2 or cb.shape[1] != dim:
        raise CortexError(f"{path}: codebook must have shape (n_codes, {dim}) (code_dim of "
                          f"{Path(data_dir) / 'dataset_info.json'}, 256 when absent), got {cb.shape}")
    bad = ~np.isfinite(cb).all(axis=1) if np.issubdtype(cb.dtype, np.floating) else np.zeros(len(cb), bool)
    if bad.any():  # one NaN entry makes every loss NaN: refused before a run starts (and replaces anything)
        rows = np.flatnonzero(bad)
        raise CortexError(f"{path}: {len(rows)} of {len(cb)} codebook entries hold NaN or Inf (first: token id "
                          f"{rows[0]}); rebuild it ({generator_command(data_dir)} --overwrite, or python "
                          f"compact_dataset.py --force)")
    return cb


def square_grid(n_pos: int) -> tuple[int, int]:
    """(g, g) for ``n_pos = g*g`` positions; a non-square count is a CortexError (pass the grid explicitly)."""
    g = int(round(int(n_pos) ** 0.5))
    if g * g != int(n_pos) or g <= 0:
        raise CortexError(f"{n_pos} token positions are not a square grid; pass grid=(h, w)")
    return g, g


def ids_to_embedding(codebook: torch.Tensor, ids: torch.Tensor, grid=None) -> torch.Tensor:
    """Token-based embedding. codebook (n_codes, D), ids (B, h*w) any integer dtype -> (B, D, h, w).

    grid: (h, w); default the square grid of ``ids.shape[1]`` positions (16 x 16 for the paper's 256 ids).
    """
    h, w = square_grid(ids.shape[1]) if grid is None else (int(grid[0]), int(grid[1]))
    emb = torch.nn.functional.embedding(ids.long(), codebook)  # (B, h*w positions, D channels)
    # contiguous NCHW, as np.load gives: a channels-last view would change the convolutions' rounding
    return emb.transpose(1, 2).reshape(ids.shape[0], codebook.shape[1], h, w).contiguous()


def embedding_to_ids(codebook: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Nearest codebook entry per position. emb (B, D, h, w) -> ids (B, h*w)."""
    z = emb.flatten(2).transpose(1, 2)  # (B, h*w positions, D channels)
    d = torch.cdist(z, codebook.to(z)[None].expand(z.shape[0], -1, -1))  # (B, h*w, n_codes)
    return d.argmin(-1)


def dataset_info(data_dir) -> dict:
    path = Path(data_dir) / "dataset_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_geometry(grid, code_dim, where: str = "") -> tuple[int, int, int]:
    """``(h, w, D)`` as positive ints, else a CortexError naming ``where``."""
    try:
        h, w = (int(grid[0]), int(grid[1])) if isinstance(grid, (list, tuple)) else (int(grid), int(grid))
        d = int(code_dim)
    except (TypeError, ValueError, IndexError):
        raise CortexError(f"{where}: grid_size must be [h, w] and code_dim an integer, got {grid!r} / "
                          f"{code_dim!r}") from None
    if min(h, w, d) <= 0:
        raise CortexError(f"{where}: grid_size {[h, w]} and code_dim {d} must be positive")
    return h, w, d


def dataset_geometry(data_dir, info: dict | None = None) -> tuple[int, int, int]:
    """``(h, w, D)``: the token grid and code dimension of a dataset, from ``dataset_info.json``'s ``grid_size``
    [h, w] and ``code_dim``; absent keys (the authors' data) give the paper's 16, 16, 256.
    info: the dataset's ``dataset_info`` when the caller has already read it."""
    info = dataset_info(data_dir) if info is None else info
    return check_geometry(info.get("grid_size", DEFAULT_GRID), info.get("code_dim", EMB_DIM),
                          str(Path(data_dir) / "dataset_info.json"))


def n_positions(data_dir) -> int:
    """h*w token positions per image of a dataset (256 for the authors' data)."""
    h, w, _ = dataset_geometry(data_dir)
    return h * w


def resolve_num_classes(flag: int | None, data_dir, default: int) -> int:
    """--num_classes, else datasets/dataset_info.json, else the paper's (1000 VQGAN, 2 DALL-E-mini)."""
    if flag is not None:
        return flag
    return int(dataset_info(data_dir).get("num_classes", default))


LAYOUTS = ("auto", "files", "compact")


def detect_layout(data_dir, split: str) -> str:
    """``auto``: the compact layout when ``codebook.npy`` exists (same tensors, far less to read), else files."""
    if (Path(data_dir) / "codebook.npy").exists():
        return "compact"
    if split_npy_dir(data_dir, split).is_dir():
        return "files"
    raise CortexError(f"{data_dir}: neither the per-image folder {split_npy_dir(data_dir, split).name}/ "
                      f"nor codebook.npy exists; cannot build embeddings for split {split}. Generate the "
                      f"dataset, or build codebook.npy from the per-image files (python compact_dataset.py)")


def check_codebook_against_files(data_dir, split: str, records: list[Record], codebook: torch.Tensor, grid,
                                 max_deviation: float = 0.0, n: int = 3) -> None:
    """When a dataset has both layouts, the compact one must give the per-image files' tensors: the first,
    middle and last image of the split (those whose ``.npy`` exists) are looked up in ``codebook`` and compared
    with their files (tolerance: ``codebook_max_deviation`` of ``dataset_info.json``, else float rounding).
    A ``codebook.npy`` of another dataset or VQ model is a CortexError naming both files."""
    folder = split_npy_dir(data_dir, split)
    if not records or not folder.is_dir():
        return
    picks = sorted({0, len(records) // 2, len(records) - 1})[:n]
    for i in picks:
        r = records[i]
        path = folder / r.filename
        if not path.exists():
            continue
        ids = torch.as_tensor(np.asarray(r.ids, dtype=np.int64)).reshape(1, -1)
        looked_up = ids_to_embedding(codebook, ids, grid)[0].numpy()  # (D, h, w)
        stored = load_npy(path)
        if stored.shape != looked_up.shape or not np.allclose(stored, looked_up, rtol=1e-5,
                                                               atol=max(2 * float(max_deviation), 1e-6)):
            diff = (float(np.abs(stored - looked_up).max()) if stored.shape == looked_up.shape
                    else f"shape {stored.shape} vs {looked_up.shape}")
            raise CortexError(f"{Path(data_dir) / 'codebook.npy'} disagrees with the per-image file {path} (largest "
                              f"difference {diff}): the codebook is not the one these embeddings were made with. "
                              f"Rebuild it from the files: python compact_dataset.py --data_dir {data_dir} --force, "
                              f"or read the files with --data_layout files")


class TokenLookup:
    """Turns a loader's batch into embeddings on the compute device.

    A batch ``x`` is either embeddings ``(B, 256, 16, 16)`` float (passed through) or token ids ``(B, 256)``
    integer (looked up in ``codebook`` (n_codes, 256), copied once to ``x``'s device). With the compact
    layout the loader ships 512 bytes of ids per image instead of a 256 KiB float tensor, and the gather
    runs where the model runs (on a GPU: at memory speed, after a tiny host-to-device copy).
    """

    def __init__(self, codebook: torch.Tensor | None = None, grid=None):
        self.codebook = codebook
        self.grid = grid  # (h, w); None: the square grid of the ids (16 x 16 for 256 ids)
        self._on: dict[tuple, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if x.is_floating_point():
            return x if dtype is None else x.to(dtype)
        if self.codebook is None:
            raise CortexError("got token ids but no codebook.npy to look them up in; load the dataset with "
                              "the compact layout")
        dtype = dtype or self.codebook.dtype
        key = (x.device, dtype)
        cb = self._on.get(key)
        if cb is None:
            cb = self._on[key] = self.codebook.to(device=x.device, dtype=dtype)
        return ids_to_embedding(cb, x, self.grid)  # (B, D, h, w)


class EmbeddingDataset(Dataset):
    """One split as ``(embedding (256, 16, 16) float32, label, filename)`` items.

    Another tokenizer's dataset gives ``(D, h, w)`` embeddings and ``(h*w,)`` ids: ``grid`` (h, w) and
    ``code_dim`` D come from its ``dataset_info.json`` (:func:`dataset_geometry`).

    layout: ``"files"`` (per-image .npy), ``"compact"`` (codebook.npy + ids) or ``"auto"`` (compact if
    ``codebook.npy`` exists, else files). labels: keep only these labels (e.g. one shard's labels).
    return_ids: with the compact layout, items carry the ``(256,)`` int16/int32 token ids instead of the
    embedding; ``dataset.lookup(batch_on_device)`` builds ``(B, 256, 16, 16)`` where the model runs.
    Files-layout items are embeddings whatever this flag says (``lookup`` passes them through).
    """

    def __init__(self, data_dir, split: str, num_classes: int | None = None, layout: str = "auto",
                 labels=None, return_ids: bool = False):
        self.data_dir = Path(data_dir)
        self.split = canonical_split(split)
        if layout not in LAYOUTS:
            raise CortexError(f"unknown layout {layout!r}: use {', '.join(LAYOUTS)}")
        info = dataset_info(self.data_dir)  # read once: geometry, codebook width, codebook_max_deviation
        h, w, self.code_dim = dataset_geometry(self.data_dir, info)
        self.grid, self.n_pos = (h, w), h * w
        self.emb_shape = (self.code_dim, h, w)
        self.records = read_split(self.data_dir, self.split, num_classes, n_pos=self.n_pos)
        if labels is not None:
            keep = set(int(l) for l in labels)
            self.records = [r for r in self.records if r.label in keep]
        self.layout = detect_layout(self.data_dir, self.split) if layout == "auto" else layout
        self.codebook = None
        if self.layout == "compact":
            self.codebook = torch.from_numpy(load_codebook(self.data_dir, self.code_dim))
            n = self.codebook.shape[0]
            for r in self.records:
                if r.ids.max(initial=0) >= n:
                    raise CortexError(f"{split_csv(self.data_dir, self.split)}: {r.filename} has token id "
                                      f"{int(r.ids.max())} but codebook.npy has only {n} codes")
            # int16 holds ids < 32768 (the paper's 16,384 codes): 512 bytes per image on the wire
            id_dtype = np.int16 if n <= np.iinfo(np.int16).max + 1 else np.int32
            ids = np.array([r.ids for r in self.records], id_dtype).reshape(-1, self.n_pos)  # (N, h*w); (0, h*w) if none
            self.ids = torch.from_numpy(ids)
            dev = info.get("codebook_max_deviation", 0)
            check_codebook_against_files(self.data_dir, self.split, self.records, self.codebook, self.grid, dev)
            if layout == "auto" and dev and split_npy_dir(self.data_dir, self.split).is_dir():
                print(f"note: {self.data_dir}/codebook.npy matches the per-image files up to {dev:.3g} (float "
                      f"rounding, see compact_dataset.py); --data_layout files reads the files' exact values")
        else:
            self.npy_dir = split_npy_dir(self.data_dir, self.split)
            if not self.npy_dir.is_dir():
                raise CortexError(f"embedding folder not found: {self.npy_dir}")
        self.return_ids = bool(return_ids) and self.layout == "compact"
        self.lookup = TokenLookup(self.codebook, self.grid)
        self.labels = [r.label for r in self.records]

    def __len__(self):
        return len(self.records)

    def embedding(self, i: int) -> torch.Tensor:
        r = self.records[i]
        if self.layout == "compact":
            return ids_to_embedding(self.codebook, self.ids[i : i + 1], self.grid)[0]
        path = self.npy_dir / r.filename
        if not path.exists():
            raise CortexError(f"embedding file not found: {path} (row {r.filename} of "
                              f"{split_csv(self.data_dir, self.split)})")
        return torch.from_numpy(load_embedding_file(path, self.emb_shape))  # (D, h, w) float32

    def __getitem__(self, i: int):
        x = self.ids[i] if self.return_ids else self.embedding(i)
        return x, self.records[i].label, self.records[i].filename

    def __getitems__(self, indices):
        """Batched fetch used by DataLoader: the compact layout gathers a whole batch in one op."""
        if self.layout != "compact":
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.long)
        xs = self.ids[idx] if self.return_ids else ids_to_embedding(self.codebook, self.ids[idx], self.grid)
        return [(xs[j], self.records[i].label, self.records[i].filename) for j, i in enumerate(indices)]


def token_indices_path(data_dir, split: str) -> Path:
    return Path(data_dir) / f"{canonical_split(split)}_token_indices.pkl"


def write_token_indices(data_dir, split: str, cache: dict) -> Path:
    """Write ``{split}_token_indices.pkl`` (the authors' format) and, beside it, ``.pkl.source.json``: the
    sha256 of the pickle and of the CSV it was built from (:func:`load_token_indices` trusts only those)."""
    path = token_indices_path(data_dir, split)
    with atomic_write(path, "wb") as f:
        pickle.dump(cache, f)
    with atomic_write(path.with_name(path.name + ".source.json")) as f:
        json.dump({"csv": split_csv(data_dir, split).name, "csv_sha256": file_sha256(split_csv(data_dir, split)),
                   "pkl_sha256": file_sha256(path)}, f, indent=2)
    return path


def load_token_indices(data_dir, split: str = "train") -> dict[str, list[int]]:
    """``{split}_token_indices.pkl`` (filename -> list of 256 ids, the authors' format), built from the CSV when
    missing or not current. Current is decided by content, not time: the pickle's ``.pkl.source.json`` records
    the sha256 of the pickle and of the CSV it was built from, and both must equal the files' now (an edited
    pickle, an edited, regenerated or merged CSV, or a pickle with no record -- the authors' download -- is
    rebuilt; kept in memory only when the folder is read-only)."""
    split = canonical_split(split)
    path = token_indices_path(data_dir, split)
    csv_path = split_csv(data_dir, split)
    if path.exists():
        rec_path = path.with_name(path.name + ".source.json")
        try:
            rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        except ValueError:
            rec = {}
        if (csv_path.exists() and rec.get("csv_sha256") == file_sha256(csv_path)
                and rec.get("pkl_sha256") == file_sha256(path)):
            with open(path, "rb") as f:
                return pickle.load(f)
        why = "has no record of its CSV" if not rec else "does not match"
        print(f"{path} {why} {csv_path.name} (content check): rebuilding it from the CSV")
    cache = {r.filename: r.ids.tolist() for r in read_split(data_dir, split)}
    try:
        write_token_indices(data_dir, split, cache)
    except OSError as e:
        print(f"note: could not write {path} ({e}); using the token indices read from {csv_path.name}")
    return cache


def image_path(data_dir, filename: str) -> Path:
    """``datasets/images/<a>/<b>.png`` for the embedding file ``<a>_<b>.npy``."""
    stem = Path(filename).stem
    a, _, b = stem.partition("_")
    return Path(data_dir) / "images" / a / f"{b}.png"


def _natural_key(name: str):
    """``0_2.npy`` before ``0_10.npy``."""
    stem = Path(name).stem
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in stem.replace("-", "_").split("_"))
