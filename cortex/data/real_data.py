"""Real VQGAN datasets (SPEC §6): class-conditional sampling with taming's ``cin_transformer``
(:mod:`cortex.data.cin_transformer`) and encoding of image folders (here), written in the authors' layout through
:class:`cortex.data.writer.DatasetWriter`; what both share is in :mod:`cortex.data.real_common`.

Design: the writer needs the codebook when it is built, so loading and generating are two calls and
the model is loaded once::

    from cortex.data import real_data
    real_data.add_real_source_args(parser)                      # flags of both real sources
    ...
    model, codebook = real_data.load_vq_for_dataset(args, device)   # (taming model, (n_codes, 256) float32)
    writer = DatasetWriter(data_dir, codebook, layout)
    info = real_data.generate_real(args, writer, device, model=model)   # resumes: skips writer.done(split)
    writer.close(info)                                          # CSVs, pickles, codebook.npy, dataset_info.json

(:func:`build_real_dataset` does these four lines, and ``generate_real(args, data_dir, device)`` with a
folder instead of a writer builds the writer with ``args.layout`` and closes it itself.) ``args.source`` is ``"cin_transformer"`` or
``"images"``; ``args.seed`` is read when present (default 0).

* ``cin_transformer``: for each class of ``--classes`` draw ``--images_per_class`` token grids with the
  transformer (top-k / top-p / temperature, taming's ``sample_with_past``, as taming's
  ``scripts/sample_fast.py``), decode them with its first stage; image ``i`` of class ``c`` is
  ``{c}_{i}.npy`` with label ``c`` (ImageNet ids are kept, so the evaluators' classes match), and the
  first ``train`` fraction of each class's indices goes to train, the next to validation, the rest to
  test (``--splits``). Batches never mix classes and each batch is seeded from ``(seed, class, first
  index)``: an image depends only on the seed, the class, its index and ``--batch_size``, not on which
  other classes are asked for, and a resumed run draws the same images.
* ``images``: labels from the sorted sub-folder names of ``--image_dir`` (0..K-1, names saved as
  ``class_names``) or from ``--labels_csv`` (``filename,label[,split]``, paths relative to
  ``--image_dir``); each image is resized (shorter side) and center-cropped to the model's resolution,
  encoded, and its decode is saved as the PNG. Image ``k`` (sorted path order) of label ``l`` is
  ``{l}_{k}.npy``; its split is drawn per label with the seed (or taken from the CSV's ``split``
  column). ``image_sources.csv`` in the dataset folder maps each file back to its source picture.

:func:`encode_neutral_set` writes the DALL-E-mini neutral-prompt CSV (``filename,indices``) from a folder.
Token ids are row-major (``p = row*16 + col``); only 16x16 grids with 256-d codes fit the layout.

Every model argument (``model``) may be a taming ``VQModel`` / ``Net2NetTransformer``, a diffusers ``VQModel``,
a :class:`~cortex.data.synthetic.SyntheticVQ` or any :class:`cortex.data.tokenizers.VQTokenizer`: encoding and decoding
go through :func:`cortex.data.tokenizers.as_tokenizer`. ``--source images --tokenizer diffusers --tokenizer_config
<save_pretrained folder>`` encodes a folder with a diffusers ``VQModel``; ``dataset_info.json`` records the
tokenizer (``tokenizer``, ``code_dim``, ``grid_size``, ``patch_size``, ``tokenizer_config``).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cortex.cli import add_vqgan_args, float_in, nonneg_int, positive_float, positive_int
from cortex.data.cin_transformer import generate_cin
from cortex.data.formats import canonical_split
from cortex.data.real_common import (_arg, _base_info, _check_grid, _sub_seed, codebook_of, decode_ids, encode_ids,
                                     first_stage, model_resolution, parse_splits, split_of_index)
from cortex.data.taming_compat import load_taming_model
from cortex.data.tokenizers import load_tokenizer, tokenizer_kinds
from cortex.data.writer import DatasetWriter, to_uint8
from cortex.utils import CortexError, atomic_write, format_list

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SOURCES = ("cin_transformer", "images")


# ----------------------------------------------------------------------------- flags

def add_real_source_args(parser: argparse.ArgumentParser):
    """Add the flags of ``--source cin_transformer`` and ``--source images`` to ``parser``."""
    g = parser.add_argument_group("real VQGAN sources (--source cin_transformer | images), see docs/real_vqgan_data.md")
    add_vqgan_args(g, "taming VQGAN YAML for --source images, e.g. vqgan_imagenet_f16_16384/configs/model.yaml",
                   "its checkpoint, e.g. vqgan_imagenet_f16_16384/checkpoints/last.ckpt")
    g.add_argument("--tokenizer", choices=tokenizer_kinds(images_only=True), default=None,
                   help="images: which VQ tokenizer encodes the folder: taming (a VQGAN YAML + checkpoint, the "
                        "default), diffusers (a VQModel folder written by save_pretrained, e.g. aMUSEd's vqvae) or "
                        "another registered kind (cortex.data.tokenizers.TOKENIZERS)")
    g.add_argument("--tokenizer_config", default=None,
                   help="images: --tokenizer diffusers: the save_pretrained folder (config.json + weights; nothing is "
                        "downloaded); --tokenizer taming: the VQGAN YAML (same as --vqgan_config, with --vqgan_ckpt)")
    g.add_argument("--transformer_config", default=None,
                   help="taming Net2NetTransformer YAML for --source cin_transformer, e.g. "
                        "2021-04-03T19-39-50_cin_transformer/configs/2021-04-03T19-39-50-project.yaml")
    g.add_argument("--transformer_ckpt", default=None,
                   help="its checkpoint (holds the VQGAN too), e.g. 2021-04-03T19-39-50_cin_transformer/checkpoints/last.ckpt")
    g.add_argument("--classes", default="0-999",
                   help="cin_transformer: class ids to sample, ranges and lists, e.g. 0-999 or 1,5,7 or 0-9,20 "
                        "(default: %(default)s)")
    g.add_argument("--images_per_class", type=positive_int, default=100,
                   help="cin_transformer: images sampled per class (default: %(default)s)")
    g.add_argument("--top_k", type=nonneg_int, default=600,
                   help="cin_transformer: keep the k most likely tokens per step, 0 = all (default: %(default)s, "
                        "as taming's README)")
    g.add_argument("--top_p", type=float_in(0, 1, lo_open=True), default=0.92,
                   help="cin_transformer: nucleus mass, 1.0 = off (default: %(default)s, as taming's README)")
    g.add_argument("--temperature", type=positive_float, default=1.0,
                   help="cin_transformer: softmax temperature (default: %(default)s)")
    g.add_argument("--batch_size", type=positive_int, default=25,
                   help="images per forward pass (default: %(default)s; same seed + same batch size = same images)")
    g.add_argument("--splits", default="0.8,0.1,0.1",
                   help="train,validation,test fractions per class (default: %(default)s)")
    g.add_argument("--image_dir", default=None,
                   help="images: folder with one sub-folder per label (sorted names -> labels 0..K-1), or the "
                        "folder the --labels_csv paths are relative to")
    g.add_argument("--labels_csv", default=None,
                   help="images: CSV with header filename,label[,split] instead of sub-folder labels")
    g.add_argument("--resolution", type=positive_int, default=None,
                   help="images: resize (shorter side) + center-crop size (default: the VQGAN's training resolution). "
                        "Any size works: the token grid is the size divided by the tokenizer's downsampling factor "
                        "(256 px -> 16x16 for an f16 VQGAN), recorded in dataset_info.json")
    g.add_argument("--neutral_image_dir", default=None,
                   help="DALL-E-mini: folder of neutral-prompt pictures to encode into results_none.csv")
    g.add_argument("--no_images", action="store_true",
                   help="do not save the decoded PNGs under images/ (faster; masking evaluations need them)")
    return g


def load_vq_for_dataset(args, device):
    """Load the model ``args.source`` needs; returns ``(model, codebook (n_codes, 256) float32)``.

    cin_transformer: the Net2NetTransformer of --transformer_config/--transformer_ckpt (its first stage is
    the VQGAN). images: with ``--tokenizer diffusers`` a :class:`cortex.data.tokenizers.DiffusersTokenizer` from the
    ``save_pretrained`` folder --tokenizer_config; with ``--tokenizer taming`` (default) the VQModel of
    --vqgan_config (or --tokenizer_config) + --vqgan_ckpt, else the first stage of the transformer.
    """
    source = getattr(args, "source", None)
    kind = _arg(args, "tokenizer", "taming")
    if kind not in tokenizer_kinds(images_only=True):
        raise CortexError(f"--tokenizer {kind!r}: use one of {', '.join(tokenizer_kinds(images_only=True))}")
    if source == "cin_transformer":
        if kind != "taming":
            raise CortexError("--source cin_transformer samples with taming's transformer; --tokenizer must be taming")
        if not (getattr(args, "transformer_config", None) and getattr(args, "transformer_ckpt", None)):
            raise CortexError("--source cin_transformer needs --transformer_config and --transformer_ckpt "
                              "(taming's ImageNet cin_transformer; see docs/real_vqgan_data.md)")
        model = load_taming_model(args.transformer_config, args.transformer_ckpt, device)
        if not hasattr(model, "transformer") or not hasattr(model, "first_stage_model"):
            raise CortexError(f"{args.transformer_config}: builds {type(model).__name__}, not a Net2NetTransformer")
    elif source == "images" and kind != "taming":   # diffusers or another registered tokenizer
        model = load_tokenizer(kind, _arg(args, "tokenizer_config"), device=device)
    elif source == "images":
        vq_config = _arg(args, "vqgan_config") or _arg(args, "tokenizer_config")
        if vq_config and getattr(args, "vqgan_ckpt", None):
            model = load_taming_model(vq_config, args.vqgan_ckpt, device)
        elif getattr(args, "transformer_config", None) and getattr(args, "transformer_ckpt", None):
            model = first_stage(load_taming_model(args.transformer_config, args.transformer_ckpt, device))
        else:
            raise CortexError("--source images needs --vqgan_config and --vqgan_ckpt (e.g. taming's "
                              "vqgan_imagenet_f16_16384; see docs/real_vqgan_data.md), or --tokenizer diffusers "
                              "--tokenizer_config <VQModel.save_pretrained folder>")
    else:
        raise CortexError(f"--source {source!r}: the real sources are {', '.join(SOURCES)}")
    return model, codebook_of(model)


# ----------------------------------------------------------------------------- images

def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def list_labelled_images(image_dir, labels_csv=None):
    """``([(path, label, split-or-None)], class_names-or-None)`` from sub-folders or a labels CSV."""
    image_dir = Path(image_dir) if image_dir else None
    if labels_csv:
        csv_path = Path(labels_csv)
        if not csv_path.is_file():
            raise CortexError(f"--labels_csv not found: {csv_path}")
        base = image_dir or csv_path.parent
        items = []
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
                raise CortexError(f"{csv_path}: header must start with filename,label (optional split column)")
            for lineno, row in enumerate(reader, start=2):
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise CortexError(f"{csv_path}:{lineno}: label {row['label']!r} is not an integer") from None
                if label < 0:
                    raise CortexError(f"{csv_path}:{lineno}: negative label {label}")
                path = base / row["filename"]
                if not path.is_file():
                    raise CortexError(f"{csv_path}:{lineno}: image not found: {path}")
                split = (row.get("split") or "").strip() or None
                items.append((path, label, canonical_split(split) if split else None))
        if not items:
            raise CortexError(f"{csv_path}: no rows")
        return items, None
    if image_dir is None or not image_dir.is_dir():
        raise CortexError(f"--image_dir {image_dir} is not a folder; --source images needs a folder with one "
                          f"sub-folder of pictures per label (or --labels_csv)")
    names = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise CortexError(f"{image_dir}: no sub-folders; put each label's pictures in its own sub-folder "
                          f"(sorted names -> labels 0..K-1) or pass --labels_csv")
    items = []
    for label, name in enumerate(names):
        files = _list_images(image_dir / name)
        if not files:
            raise CortexError(f"{image_dir / name}: no images ({', '.join(IMAGE_EXTS)})")
        items += [(p, label, None) for p in files]
    return items, names


def load_image(path, resolution: int):
    """Picture -> (3, R, R) float tensor in [-1, 1]: shorter side resized to R (bicubic), center crop."""

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32)
    except OSError as e:
        raise CortexError(f"cannot read image {path} ({e})") from e
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def plan_image_dataset(items, fractions, seed: int):
    """Filenames and splits: image k (sorted source order) of label l is ``{l}_{k}.npy``; splits drawn
    per label with the seed unless the CSV gave them. Returns [(filename, label, split, path)]."""
    by_label: dict[int, list] = {}
    for path, label, split in sorted(items, key=lambda t: (t[1], str(t[0]))):
        by_label.setdefault(label, []).append((path, split))
    plan = []
    for label, rows in sorted(by_label.items()):
        n = len(rows)
        order = np.random.default_rng(_sub_seed(seed, "split", label)).permutation(n)
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)  # item k's place in the shuffled order
        for k, (path, split) in enumerate(rows):
            plan.append((f"{label}_{k}.npy", label, split or split_of_index(int(pos[k]), n, fractions), path))
    return plan


def _write_sources(data_dir: Path, plan, image_dir) -> None:
    """``image_sources.csv`` (filename,label,split,source); a changed folder under an old dataset is an error."""
    base = Path(image_dir).resolve() if image_dir else None
    rows = []
    for name, label, split, path in plan:
        p = Path(path).resolve()
        src = str(p.relative_to(base)) if base is not None and p.is_relative_to(base) else str(p)
        rows.append([name, str(label), split, src])
    out = data_dir / "image_sources.csv"
    if out.exists():
        with open(out, newline="", encoding="utf-8") as f:
            old = [r for r in csv.reader(f)][1:]
        if old != rows:
            raise CortexError(f"{out}: the images or their labels/splits changed since this dataset was started "
                              f"(resuming would mix two numberings). Use a new --data_dir, or delete the folder.")
        return
    with atomic_write(out) as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "split", "source"])
        w.writerows(rows)


def generate_images(args, writer, device, model) -> dict:

    resolution = int(_arg(args, "resolution", 0)) or model_resolution(model)
    grid = _check_grid(model, resolution, "--resolution: ")
    if writer.done("train") or writer.done("validation") or writer.done("test"):
        if tuple(writer.grid) != grid:
            raise CortexError(f"{writer.data_dir}: resuming a dataset with a {writer.grid} token grid, but "
                              f"--resolution {resolution} gives {grid}; use the first run's --resolution")
    writer.grid = grid  # (h, w) at this resolution: the rows hold h*w ids, the files (D, h, w)
    items, class_names = list_labelled_images(_arg(args, "image_dir"), _arg(args, "labels_csv"))
    fractions = parse_splits(_arg(args, "splits", "0.8,0.1,0.1"))
    seed = int(_arg(args, "seed", 0))
    bs = max(1, int(_arg(args, "batch_size", 25)))
    save_images = not getattr(args, "no_images", False)
    plan = plan_image_dataset(items, fractions, seed)
    _write_sources(writer.data_dir, plan, _arg(args, "image_dir"))
    done = set().union(*(writer.done(s) for s in ("train", "validation", "test")))
    todo = [row for row in plan if row[0] not in done]
    print(f"images: {len(plan)} pictures, {len(plan) - len(todo)} already done, {len(todo)} to encode at {resolution} px")
    t0 = time.time()
    with tqdm(total=len(todo), desc="encoding", unit="img") as bar:
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            x = torch.stack([load_image(p, resolution) for _, _, _, p in chunk]).to(device)
            ids = encode_ids(model, x)  # (B, h*w)
            imgs = to_uint8(decode_ids(model, ids, grid)) if save_images else [None] * len(chunk)
            ids = ids.cpu().numpy()
            for j, (name, label, split, _) in enumerate(chunk):
                writer.add(split, name, label, ids[j], imgs[j])
            bar.update(len(chunk))
    if todo:
        dt = time.time() - t0
        print(f"encoded {len(todo)} images in {dt:.1f} s ({dt / len(todo):.3f} s/image on {device})")
    labels = sorted({row[1] for row in plan})
    info = _base_info(model, "images", args, grid)
    info.update({
        "num_classes": (len(class_names) if class_names else max(labels) + 1),
        "class_names": class_names,
        "image_dir": str(_arg(args, "image_dir", "")),
        "labels_csv": str(_arg(args, "labels_csv", "")) or None,
        "resolution": resolution,
        "splits": list(fractions), "seed": seed,
        "split_sizes": {sp: sum(row[2] == sp for row in plan) for sp in ("train", "validation", "test")},
        "vqgan_config": str(_arg(args, "vqgan_config") or (_arg(args, "tokenizer_config") if info["tokenizer"] == "taming"
                                                           else None) or _arg(args, "transformer_config", "")),
        "vqgan_ckpt": str(_arg(args, "vqgan_ckpt", _arg(args, "transformer_ckpt", ""))),
    })
    return info


# ----------------------------------------------------------------------------- entry points

def generate_real(args, writer, device, model=None) -> dict:
    """Run ``args.source`` (cin_transformer | images); returns the dataset_info dict.

    writer: a :class:`cortex.data.formats.DatasetWriter` (the caller closes it with the returned info), or a
    dataset folder: then the writer is built here with ``args.layout`` (default ``files``) and closed
    with the info. model: from :func:`load_vq_for_dataset` (loaded here when None). Resumable: files in
    ``writer.done(split)`` are skipped.
    """
    device = torch.device(device)
    source = getattr(args, "source", None)
    if source not in SOURCES:
        raise CortexError(f"--source {source!r}: the real sources are {', '.join(SOURCES)}")
    if model is None:
        model, codebook = load_vq_for_dataset(args, device)
    else:
        codebook = codebook_of(model)
    own_writer = not isinstance(writer, DatasetWriter)
    if own_writer:
        writer = DatasetWriter(writer, codebook, getattr(args, "layout", None) or "files")
    elif writer.codebook.shape != codebook.shape or not np.array_equal(writer.codebook, codebook):
        raise CortexError(f"the DatasetWriter for {writer.data_dir} holds another codebook than the model "
                          f"({writer.codebook.shape} vs {codebook.shape}); build it with load_vq_for_dataset's codebook")
    if source == "cin_transformer":
        info = generate_cin(args, writer, device, model)
    else:
        info = generate_images(args, writer, device, model)
    if own_writer:
        writer.close(info)
    return info


def build_real_dataset(args, data_dir, layout: str, device) -> dict:
    """load_vq_for_dataset + DatasetWriter + generate_real + close; returns the info dict."""

    model, codebook = load_vq_for_dataset(args, device)
    writer = DatasetWriter(data_dir, codebook, layout)
    info = generate_real(args, writer, device, model=model)
    writer.close(info)
    return info


def encode_neutral_set(args, out_csv, model, device, image_dir=None) -> Path:
    """Encode every picture of a folder (sorted, recursive) into ``out_csv`` with header ``filename,indices``
    (filename relative to the folder, indices a quoted list of 256 ids): the DALL-E-mini neutral-prompt set
    ``datasets/doctor_original/information/results_none.csv``. image_dir: default --neutral_image_dir,
    else --image_dir. Resolution and batch size from --resolution / --batch_size."""

    folder = image_dir or _arg(args, "neutral_image_dir") or _arg(args, "image_dir")
    if not folder or not Path(folder).is_dir():
        raise CortexError(f"neutral-prompt image folder not found: {folder}; pass --neutral_image_dir")
    folder = Path(folder)
    files = _list_images(folder)
    if not files:
        raise CortexError(f"{folder}: no images ({', '.join(IMAGE_EXTS)})")
    device = torch.device(device)
    resolution = int(_arg(args, "resolution", 0)) or model_resolution(model)
    _check_grid(model, resolution, "--resolution: ")
    bs = max(1, int(_arg(args, "batch_size", 25)))
    rows = []
    for start in tqdm(range(0, len(files), bs), desc="neutral set", unit="batch"):
        chunk = files[start:start + bs]
        x = torch.stack([load_image(p, resolution) for p in chunk]).to(device)
        ids = encode_ids(model, x).cpu().numpy()
        rows += [[p.relative_to(folder).as_posix(), format_list(i)] for p, i in zip(chunk, ids)]
    out = Path(out_csv)
    with atomic_write(out) as f:
        w = csv.writer(f)
        w.writerow(["filename", "indices"])
        w.writerows(rows)
    print(f"wrote {len(rows)} token grids to {out}")
    return out
