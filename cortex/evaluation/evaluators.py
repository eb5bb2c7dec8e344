"""Independent image classifiers that check an explanation in pixel space ("evaluators", SPEC §5).

* **Real (ImageNet)**: torchvision ``vit_b_16, vit_b_32, resnet18, resnet50`` with their ImageNet
  weights, loaded through torchvision's weights API (``get_model_weights(name).DEFAULT``). Offline:
  put torchvision's weight file (named as torchvision names it, e.g. ``resnet18-f37072fd.pth``) in a
  folder and pass ``--weights_dir`` (a ``TORCH_HOME`` folder, with ``hub/checkpoints/`` inside, works
  too), or set ``TORCH_HOME``. Absent weights that cannot be downloaded are a clear ``CortexError``.
* **Trained on the dataset** (the synthetic world, or your own labelled images): torchvision architectures
  trained on the dataset's decoded images by ``VQGAN_explanation/train_evaluators.py`` -- small ones from
  scratch (``weights=None``), or torchvision's ImageNet models fine-tuned from their ImageNet weights when a
  local weight file is found (never downloaded) -- and stored as ``checkpoints/evaluators/<arch>.pth``;
  ``--evaluators synthetic`` (alias ``trained``) loads all of them. Each checkpoint records the dataset it
  was trained on (folder, labels, class names, a hash of its split CSVs: ``dataset_record``); the eval
  scripts refuse an evaluator of another dataset (``check_evaluator_dataset``).

Every evaluator is an ``Evaluator`` module: it takes images ``(B, 3, H, W)`` with values in
``[0, 1]`` (a masked patch is 0, black), normalises them with the ImageNet mean/std and returns raw
logits. Class index = label (the VQGAN dataset's labels are ImageNet class ids).

Resizing to the net's input size (224 for the ImageNet nets): the eval scripts score **uint8** images
(``evaluator_logits``), which go through the authors' pipeline -- a PIL image, torchvision's
``transforms.Resize((224, 224))`` on it (PIL's bilinear resize), ``ToTensor`` -- so the scores equal
theirs. Float tensors passed straight to ``forward`` (training the synthetic evaluators) are resized with
``F.interpolate`` (bilinear, antialiased), up to 1/255 away from the PIL result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cli import make_parser, positive_int
from ..utils import CortexError, atomic_torch_save

REAL_EVALUATORS = ("vit_b_16", "vit_b_32", "resnet18", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
SYNTHETIC = "synthetic"
TRAINED = "trained"  # alias of SYNTHETIC: the evaluators train_evaluators.py trained on this dataset
AUTO = "auto"
EVALUATOR_SUBDIR = "evaluators"  # under checkpoints/


class Evaluator(nn.Module):
    """An image classifier with its preprocessing: ``[0, 1]`` images -> resize -> normalise -> logits."""

    def __init__(self, name: str, net: nn.Module, input_size: int | None, num_classes: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, source: str = ""):
        super().__init__()
        self.name, self.net, self.input_size, self.num_classes, self.source = name, net, input_size, num_classes, source
        self.meta: dict = {}  # a trained evaluator's checkpoint meta (summary, settings, dataset record)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> float (B, 3, S, S) in [0, 1], S = ``input_size``, as the authors'
        ``transforms.Compose([Resize((S, S)), ToTensor()])`` on PIL images (no-op resize when H = W = S)."""
        if images.dtype != torch.uint8:
            raise CortexError(f"Evaluator.to_input takes uint8 images, got {images.dtype}")
        S = self.input_size
        if not S or tuple(images.shape[-2:]) == (S, S):
            return images.float() / 255.0  # = ToTensor
        from PIL import Image
        from torchvision import transforms

        tf = transforms.Compose([transforms.Resize((S, S)), transforms.ToTensor()])
        arr = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)
        return torch.stack([tf(Image.fromarray(a)) for a in arr])

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1]
        x = images.float()
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.net((x - self.mean) / self.std)  # (B, num_classes)

    def extra_repr(self) -> str:
        return f"name={self.name}, input_size={self.input_size}, num_classes={self.num_classes}"


def _freeze(ev: Evaluator, device) -> Evaluator:
    ev = ev.to(device).eval()
    for p in ev.parameters():
        p.requires_grad_(False)
    return ev


# ----------------------------------------------------------------------------- real (ImageNet) evaluators

def imagenet_weights(name: str):
    """torchvision's default ImageNet weights enum entry of ``name``."""
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise CortexError(f"--evaluators {name}: not a torchvision model with ImageNet weights; use any of "
                          f"{', '.join(REAL_EVALUATORS)} (or 'synthetic' on the synthetic world)") from None


def weight_file_name(name: str) -> str:
    """File name torchvision gives the weights of ``name``, e.g. ``resnet18-f37072fd.pth``."""
    return Path(urlparse(imagenet_weights(name).url).path).name


def _weights_folder(weights_dir) -> Path | None:
    return Path(weights_dir).expanduser() if weights_dir else None


def find_local_weights(name: str, weights_dir=None) -> Path | None:
    """The local copy of ``name``'s weights: ``<weights_dir>/<file>``, ``<weights_dir>/hub/checkpoints/<file>``
    (a TORCH_HOME folder), ``<weights_dir>/checkpoints/<file>``, else torch hub's cache (``$TORCH_HOME``)."""
    fname = weight_file_name(name)
    cands = []
    wd = _weights_folder(weights_dir)
    if wd is not None:
        cands += [wd / fname, wd / "hub" / "checkpoints" / fname, wd / "checkpoints" / fname]
    cands.append(Path(torch.hub.get_dir()) / "checkpoints" / fname)
    return next((c for c in cands if c.is_file()), None)


def load_imagenet_evaluator(name: str, weights_dir=None, download: bool = True, device="cpu") -> Evaluator:
    """torchvision ``name`` with its ImageNet weights, as an ``Evaluator`` (resize 224, ImageNet norm).

    A local copy (``find_local_weights``) is loaded without network; else, with ``download``,
    torchvision's weights API fetches it (into ``weights_dir`` when given, else torch hub's cache).
    """
    from torchvision.models import get_model

    weights = imagenet_weights(name)
    fname = weight_file_name(name)
    local = find_local_weights(name, weights_dir)
    wd = _weights_folder(weights_dir)
    where = f"{wd} (or {wd}/hub/checkpoints/)" if wd else f"the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'}"
    how = (f"Download {weights.url} on a machine with network access and put {fname} in a folder passed as "
           f"--weights_dir (or into $TORCH_HOME/hub/checkpoints/); on the synthetic world use --evaluators synthetic.")
    if local is None and not download:
        raise CortexError(f"ImageNet weights of evaluator {name} not found: no {fname} in {where}, and downloading "
                          f"is switched off (--no_download). {how}")
    if local is not None:
        try:
            state = weights.get_state_dict(model_dir=str(local.parent), progress=False, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways (EOF, unpickling, ...)
            raise CortexError(f"{local}: cannot read the weights of evaluator {name} ({type(e).__name__}: {e}); "
                              f"is the file complete? {how}") from e
    else:
        print(f"downloading the ImageNet weights of {name} ({weights.url})")
        try:
            state = weights.get_state_dict(model_dir=str(wd) if wd else None, progress=False, check_hash=True,
                                           weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as e:  # URLError is an OSError; bad hash RuntimeError
            raise CortexError(f"ImageNet weights of evaluator {name} not found in {where} and cannot be downloaded "
                              f"({type(e).__name__}: {e}). {how}") from e
    net = get_model(name, weights=None)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CortexError(f"{local or fname}: these are not torchvision's {name} weights ({str(e)[:300]})") from e
    return _freeze(Evaluator(name, net, IMAGENET_SIZE, len(weights.meta["categories"]), source=str(local or weights.url)),
                   device)


# ----------------------------------------------------------------------------- synthetic-world evaluators

def _vit(patch_px: int):
    def build(num_classes: int, image_size: int) -> nn.Module:
        from torchvision.models import VisionTransformer

        if image_size % patch_px:
            raise CortexError(f"vit with {patch_px}-px patches needs an image size that is a multiple of {patch_px}, "
                              f"got {image_size}")
        return VisionTransformer(image_size=image_size, patch_size=patch_px, num_layers=2, num_heads=4,
                                 hidden_dim=64, mlp_dim=128, num_classes=num_classes)
    return build


def _shufflenet_tiny(num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2([2, 4, 2], [24, 48, 96, 192, 512], num_classes=num_classes)


def _resnet10(num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import ResNet
    from torchvision.models.resnet import BasicBlock

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


# Small torchvision architectures for the 64-px synthetic world (all built with random weights).
# Any other torchvision classification model name works too (torchvision.models.get_model(name, weights=None)).
SYNTHETIC_ARCHS = {
    "vit_tiny_8": _vit(8),          # torchvision VisionTransformer, 8-px patches, 2 layers, width 64
    "vit_tiny_16": _vit(16),        # same with 16-px patches (like vit_b_16 vs vit_b_32)
    "shufflenet_tiny": _shufflenet_tiny,  # torchvision ShuffleNetV2, stages [2,4,2], channels up to 512
    "resnet10": _resnet10,          # torchvision ResNet, BasicBlock [1,1,1,1]
}
DEFAULT_SYNTHETIC_ARCHS = ("vit_tiny_8", "vit_tiny_16", "resnet10")


def build_synthetic_net(arch: str, num_classes: int, image_size: int) -> nn.Module:
    if arch in SYNTHETIC_ARCHS:
        return SYNTHETIC_ARCHS[arch](num_classes, image_size)
    from torchvision.models import get_model, list_models

    if arch not in list_models():
        raise CortexError(f"--archs {arch}: unknown; use {', '.join(SYNTHETIC_ARCHS)} or a torchvision model name")
    return get_model(arch, weights=None, num_classes=num_classes)


def net_input_size(net: nn.Module, image_size: int) -> int:
    """The input size an evaluator feeds ``net``: a torchvision ViT's fixed ``image_size`` (224 for vit_b_16),
    else the dataset's ``image_size`` (CNNs take any size)."""
    return int(getattr(net, "image_size", None) or image_size)


def has_imagenet_weights(arch: str) -> bool:
    """Whether torchvision publishes ImageNet weights for ``arch`` (the small SYNTHETIC_ARCHS have none)."""
    if arch in SYNTHETIC_ARCHS:
        return False
    from torchvision.models import get_model_weights

    try:
        get_model_weights(arch)
    except (ValueError, KeyError):
        return False
    return True


def replace_head(net: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last ``nn.Linear`` of a torchvision classifier (``fc``, ``heads.head``, ``classifier[-1]``) for
    a fresh ``Linear(in_features, num_classes)``: the same modules as ``get_model(arch, num_classes=...)``."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    old = net.get_submodule(name)
    setattr(parent, name.rpartition(".")[2], nn.Linear(old.in_features, num_classes))
    return net


def pretrained_net(arch: str, num_classes: int, weights_dir=None) -> tuple[nn.Module | None, Path | None]:
    """torchvision ``arch`` with its ImageNet weights from a **local** file (``find_local_weights``; never
    downloaded) and a new ``num_classes`` head, or ``(None, None)`` when ``arch`` has no ImageNet weights or no
    local copy is found (then the caller trains from scratch). An unreadable file is a CortexError."""
    if not has_imagenet_weights(arch):
        return None, None
    local = find_local_weights(arch, weights_dir)
    if local is None:
        return None, None
    ev = load_imagenet_evaluator(arch, weights_dir, download=False)
    net = replace_head(ev.net, num_classes)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.train(), local


# ----------------------------------------------------------------------------- which dataset an evaluator knows

DATASET_FILES = ("train_embeddings.csv", "validation_embeddings.csv", "test_embeddings.csv")


def dataset_record(data_dir) -> dict:
    """What an evaluator trained on ``data_dir`` records about it: ``{data_dir, labels, class_names,
    num_classes, content_hash}``. labels: the sorted labels of the train split; content_hash: SHA-256 over
    the three split CSVs (file names, labels and token ids of every image), so that a regenerated or another
    dataset in the same folder is told apart, and a copy of the dataset elsewhere is recognised."""
    import hashlib

    from ..data.formats import dataset_info, read_split

    data_dir = Path(data_dir)
    h = hashlib.sha256()
    for name in DATASET_FILES:
        f = data_dir / name
        if not f.is_file():
            raise CortexError(f"{f} not found: the evaluators are tied to a dataset's split CSVs; generate the "
                              f"dataset first (generate_dataset.py) or check --data_dir")
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    info = dataset_info(data_dir)
    labels = sorted({r.label for r in read_split(data_dir, "train")})
    return {"data_dir": str(data_dir.absolute()), "labels": labels, "class_names": info.get("class_names"),
            "num_classes": info.get("num_classes", (max(labels) + 1) if labels else 0),
            "content_hash": h.hexdigest()}


def describe_dataset(rec: dict) -> str:
    labels = rec.get("labels") or []
    shown = ", ".join(map(str, labels[:6])) + (", ..." if len(labels) > 6 else "")
    return f"{rec.get('data_dir')} ({len(labels)} labels: {shown}; content hash {str(rec.get('content_hash'))[:12]})"


def evaluator_dataset(path) -> dict | None:
    """The ``dataset`` record stored in an evaluator checkpoint (None: written before evaluators recorded it)."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    return (d.get("meta") or {}).get("dataset") if isinstance(d, dict) else None


def check_evaluator_dataset(name: str, path, trained_on: dict | None, data_dir, current: dict | None = None) -> dict:
    """CortexError unless the evaluator ``name`` (checkpoint ``path``) was trained on ``data_dir``'s dataset
    (same content hash). A checkpoint without a record gets one warning line. Returns the dataset's record (computed
    once: pass it back as ``current``), or ``current`` unchanged for a checkpoint without a record."""
    if trained_on is None:
        print(f"warning: evaluator {name} ({path}) does not record which dataset it was trained on (written by an "
              f"older train_evaluators.py); cannot check it against {data_dir}. Retrain it with train_evaluators.py "
              f"--overwrite", file=sys.stderr, flush=True)
        return current
    current = current or dataset_record(data_dir)
    if trained_on.get("content_hash") != current["content_hash"]:
        raise CortexError(f"evaluator {name} ({path}) was trained on another dataset: {describe_dataset(trained_on)}, "
                          f"not on {describe_dataset(current)}. Train evaluators on this dataset into their own folder: "
                          f"python train_evaluators.py --data_dir {data_dir} --evaluator_dir <folder>, then pass the "
                          f"same --evaluator_dir to the eval script (or --evaluators with ImageNet models if its "
                          f"labels are ImageNet class ids)")
    return current


def synthetic_dir(checkpoint_dir) -> Path:
    return Path(checkpoint_dir) / EVALUATOR_SUBDIR


def save_synthetic_evaluator(path, net: nn.Module, arch: str, num_classes: int, image_size: int,
                             meta: dict | None = None) -> None:
    """One file: ``{arch, num_classes, image_size, mean, std, state_dict, meta}`` (loads with weights_only)."""
    atomic_torch_save({"arch": arch, "num_classes": int(num_classes), "image_size": int(image_size),
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                       "meta": dict(meta or {})}, path)


def load_synthetic_evaluator(path, device="cpu") -> Evaluator:
    path = Path(path)
    if not path.is_file():
        raise CortexError(f"evaluator checkpoint not found: {path}; train them with train_evaluators.py")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise CortexError(f"{path}: cannot read this evaluator checkpoint ({e}); retrain with train_evaluators.py") from e
    if not isinstance(d, dict) or not {"arch", "num_classes", "image_size", "state_dict"} <= set(d):
        raise CortexError(f"{path}: not an evaluator checkpoint written by train_evaluators.py")
    net = build_synthetic_net(d["arch"], d["num_classes"], d["image_size"])
    net.load_state_dict(d["state_dict"], strict=True)
    ev = Evaluator(d["arch"], net, d["image_size"], d["num_classes"], d.get("mean", IMAGENET_MEAN),
                   d.get("std", IMAGENET_STD), source=str(path))
    ev.meta = dict(d.get("meta") or {})  # the training summary, settings and ``dataset`` record (train_evaluators.py)
    return _freeze(ev, device)


def evaluator_folder(paths, evaluator_dir=None) -> Path:
    """Where the trained evaluators live: ``--evaluator_dir``, else ``<checkpoint_dir>/evaluators``."""
    return Path(evaluator_dir).absolute() if evaluator_dir else synthetic_dir(paths.checkpoint_dir)


def synthetic_checkpoints(checkpoint_dir=None, folder=None) -> list[Path]:
    """The ``*.pth`` of ``folder`` (default ``<checkpoint_dir>/evaluators``)."""
    return sorted((Path(folder) if folder is not None else synthetic_dir(checkpoint_dir)).glob("*.pth"))


# ----------------------------------------------------------------------------- choosing evaluators

def evaluator_parser() -> argparse.ArgumentParser:
    """``--evaluators``, ``--weights_dir``, ``--no_download``, ``--eval_batch_size`` (shared by the eval scripts)."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("evaluators (independent image classifiers)")
    g.add_argument("--evaluators", nargs="+", default=[AUTO],
                   help=f"'{SYNTHETIC}' or '{TRAINED}' (every checkpoints/{EVALUATOR_SUBDIR}/*.pth from "
                        f"train_evaluators.py; refused unless trained on this dataset), ImageNet models among "
                        f"{', '.join(REAL_EVALUATORS)}, or '{AUTO}': this dataset's trained evaluators when they "
                        f"exist, else the four ImageNet models (an error on the synthetic world or on your own "
                        f"labelled images, whose labels are not ImageNet ids)")
    g.add_argument("--evaluator_dir", default=None,
                   help=f"folder of the evaluators train_evaluators.py trained (default: <checkpoint_dir>/"
                        f"{EVALUATOR_SUBDIR}); give each dataset its own")
    g.add_argument("--weights_dir", default=None,
                   help="folder with torchvision's ImageNet weight files (e.g. resnet18-f37072fd.pth) for offline "
                        "use; a TORCH_HOME folder works too (default: torch hub's cache, $TORCH_HOME)")
    g.add_argument("--no_download", action="store_true", help="never try to download ImageNet weights")
    g.add_argument("--eval_batch_size", type=positive_int, default=64, help="images per evaluator forward pass")
    return p


def is_synthetic_dataset(data_dir) -> bool:
    from ..data.formats import dataset_info

    return (Path(data_dir) / "synthetic_vq.pt").exists() or dataset_info(data_dir).get("source") == SYNTHETIC


def trained_for(paths, folder) -> list[Path]:
    """The evaluator checkpoints of ``folder`` trained on ``paths.data_dir``'s dataset (or not recording one)."""
    ckpts = synthetic_checkpoints(folder=folder)
    if not ckpts or not all((Path(paths.data_dir) / f).is_file() for f in DATASET_FILES):
        return []
    want = dataset_record(paths.data_dir)["content_hash"]
    out = []
    for c in ckpts:
        try:
            rec = evaluator_dataset(c)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported when it is loaded
            rec = None
        if rec is None or rec.get("content_hash") == want:
            out.append(c)
    return out


def resolve_evaluator_names(names, paths, evaluator_dir=None) -> list[str]:
    """``--evaluators`` as given, with ``auto`` resolved: this dataset's trained evaluators when
    ``checkpoints/evaluators/`` holds some (on the synthetic world: any), else the four ImageNet models -- unless
    the dataset's labels are not ImageNet class ids (the synthetic world, your own labelled images), which is a
    CortexError saying to run train_evaluators.py."""
    from ..data.formats import dataset_info

    names = [SYNTHETIC if n == TRAINED else n for n in (names or [AUTO])]
    folder = evaluator_folder(paths, evaluator_dir)
    if names == [AUTO]:
        synthetic = is_synthetic_dataset(paths.data_dir)
        if trained_for(paths, folder) or (synthetic and synthetic_checkpoints(folder=folder)):
            return [SYNTHETIC]
        own = dataset_info(paths.data_dir).get("source") == "images"
        if synthetic or own:
            what = "the synthetic world" if synthetic else "your own labelled images (--source images)"
            raise CortexError(f"the dataset {paths.data_dir} is {what}: its labels are not ImageNet class ids, and no "
                              f"evaluators trained on it are in {folder}. Run "
                              f"train_evaluators.py on it first (see docs/evaluation.md, 'Your own labels'), or pass "
                              f"--evaluators {' '.join(REAL_EVALUATORS)} if its labels are ImageNet class ids")
        return list(REAL_EVALUATORS)
    return names


def load_evaluators(names, paths, device="cpu", weights_dir=None, download: bool = True,
                    num_classes: int | None = None, evaluator_dir=None) -> list[Evaluator]:
    """Evaluators by name ('synthetic'/'trained' expands to every checkpoint of ``checkpoints/evaluators/``);
    checks their class count, and that trained ones were trained on ``paths.data_dir`` (CortexError if not)."""
    out, current = [], None
    folder = evaluator_folder(paths, evaluator_dir)
    for name in resolve_evaluator_names(names, paths, evaluator_dir):
        own = folder / f"{name}.pth"
        if name == SYNTHETIC:
            ckpts = synthetic_checkpoints(folder=folder)
            if not ckpts:
                raise CortexError(f"--evaluators {SYNTHETIC}: no checkpoints in {folder}; run train_evaluators.py "
                                  f"first")
        elif own.is_file() and name not in REAL_EVALUATORS:
            ckpts = [own]
        else:
            out.append(load_imagenet_evaluator(name, weights_dir, download, device))
            continue
        for c in ckpts:
            ev = load_synthetic_evaluator(c, device)
            current = check_evaluator_dataset(ev.name, c, ev.meta.get("dataset"), paths.data_dir, current)
            out.append(ev)
    if num_classes is not None:
        for ev in out:
            if ev.num_classes < num_classes:
                raise CortexError(f"evaluator {ev.name} predicts {ev.num_classes} classes but the dataset has "
                                  f"{num_classes} labels; use evaluators trained on this dataset "
                                  f"(train_evaluators.py, --evaluators {TRAINED})")
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise CortexError(f"--evaluators: the same evaluator twice ({names})")
    return out


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def evaluator_logits(evaluator: Evaluator, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits ``(N, C)`` (CPU float32) of ``images`` ``(N, 3, H, W)``, in batches.

    uint8 images (what the eval scripts score) are resized the authors' way (``Evaluator.to_input``: PIL +
    torchvision transforms); float images in [0, 1] go to ``forward`` as they are.
    """
    device = evaluator.mean.device
    outs = []
    for i in range(0, images.shape[0], max(1, batch_size)):
        x = images[i : i + batch_size]
        x = evaluator.to_input(x) if x.dtype == torch.uint8 else x
        outs.append(evaluator(x.to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, evaluator.num_classes)


def class_logit_prob(logits: torch.Tensor, classes) -> tuple[np.ndarray, np.ndarray]:
    """Logit and softmax probability of ``classes`` (N,) in each row of ``logits`` (N, C)."""
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.long).view(-1, 1)
    lg = logits.gather(1, classes)[:, 0]
    pr = logits.softmax(1).gather(1, classes)[:, 0]
    return lg.numpy().astype(np.float64), pr.numpy().astype(np.float64)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)
