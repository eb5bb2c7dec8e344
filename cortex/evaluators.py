"""Independent image classifiers that check an explanation in pixel space ("evaluators", SPEC §5).

* **Real (ImageNet)**: torchvision ``vit_b_16, vit_b_32, resnet18, resnet50`` with their ImageNet
  weights, loaded through torchvision's weights API (``get_model_weights(name).DEFAULT``). Offline:
  put torchvision's weight file (named as torchvision names it, e.g. ``resnet18-f37072fd.pth``) in a
  folder and pass ``--weights_dir`` (a ``TORCH_HOME`` folder, with ``hub/checkpoints/`` inside, works
  too), or set ``TORCH_HOME``. Absent weights that cannot be downloaded are a clear ``CortexError``.
* **Synthetic world**: small torchvision architectures (``weights=None``) trained on the world's
  rendered images by ``VQGAN_explanation/train_evaluators.py`` and stored as
  ``checkpoints/evaluators/<arch>.pth``; ``--evaluators synthetic`` loads all of them.

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
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cli import make_parser, positive_int
from .utils import CortexError, atomic_torch_save

REAL_EVALUATORS = ("vit_b_16", "vit_b_32", "resnet18", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
SYNTHETIC = "synthetic"
AUTO = "auto"
EVALUATOR_SUBDIR = "evaluators"  # under checkpoints/


class Evaluator(nn.Module):
    """An image classifier with its preprocessing: ``[0, 1]`` images -> resize -> normalise -> logits."""

    def __init__(self, name: str, net: nn.Module, input_size: int | None, num_classes: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, source: str = ""):
        super().__init__()
        self.name, self.net, self.input_size, self.num_classes, self.source = name, net, input_size, num_classes, source
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
    return _freeze(Evaluator(d["arch"], net, d["image_size"], d["num_classes"], d.get("mean", IMAGENET_MEAN),
                             d.get("std", IMAGENET_STD), source=str(path)), device)


def synthetic_checkpoints(checkpoint_dir) -> list[Path]:
    return sorted(synthetic_dir(checkpoint_dir).glob("*.pth"))


# ----------------------------------------------------------------------------- choosing evaluators

def evaluator_parser() -> argparse.ArgumentParser:
    """``--evaluators``, ``--weights_dir``, ``--no_download``, ``--eval_batch_size`` (shared by the eval scripts)."""
    p = make_parser(add_help=False)
    g = p.add_argument_group("evaluators (independent image classifiers)")
    g.add_argument("--evaluators", nargs="+", default=[AUTO],
                   help=f"'synthetic' (every checkpoints/{EVALUATOR_SUBDIR}/*.pth from train_evaluators.py), "
                        f"ImageNet models among {', '.join(REAL_EVALUATORS)}, or '{AUTO}': synthetic when those "
                        f"checkpoints exist and the dataset is the synthetic world, else the four ImageNet models")
    g.add_argument("--weights_dir", default=None,
                   help="folder with torchvision's ImageNet weight files (e.g. resnet18-f37072fd.pth) for offline "
                        "use; a TORCH_HOME folder works too (default: torch hub's cache, $TORCH_HOME)")
    g.add_argument("--no_download", action="store_true", help="never try to download ImageNet weights")
    g.add_argument("--eval_batch_size", type=positive_int, default=64, help="images per evaluator forward pass")
    return p


def is_synthetic_dataset(data_dir) -> bool:
    from .data import dataset_info

    return (Path(data_dir) / "synthetic_vq.pt").exists() or dataset_info(data_dir).get("source") == SYNTHETIC


def resolve_evaluator_names(names, paths) -> list[str]:
    names = list(names or [AUTO])
    if names == [AUTO]:
        if synthetic_checkpoints(paths.checkpoint_dir) and is_synthetic_dataset(paths.data_dir):
            return [SYNTHETIC]
        if is_synthetic_dataset(paths.data_dir):
            raise CortexError(f"the dataset {paths.data_dir} is the synthetic world, but no evaluator checkpoints "
                              f"are in {synthetic_dir(paths.checkpoint_dir)}: run train_evaluators.py first (or pass "
                              f"--evaluators {' '.join(REAL_EVALUATORS)} for ImageNet classifiers)")
        return list(REAL_EVALUATORS)
    return names


def load_evaluators(names, paths, device="cpu", weights_dir=None, download: bool = True,
                    num_classes: int | None = None) -> list[Evaluator]:
    """Evaluators by name ('synthetic' expands to every synthetic checkpoint); checks their class count."""
    out = []
    for name in resolve_evaluator_names(names, paths):
        if name == SYNTHETIC:
            ckpts = synthetic_checkpoints(paths.checkpoint_dir)
            if not ckpts:
                raise CortexError(f"--evaluators synthetic: no checkpoints in {synthetic_dir(paths.checkpoint_dir)}; "
                                  f"run train_evaluators.py first")
            out += [load_synthetic_evaluator(c, device) for c in ckpts]
        elif (synthetic_dir(paths.checkpoint_dir) / f"{name}.pth").is_file() and name not in REAL_EVALUATORS:
            out.append(load_synthetic_evaluator(synthetic_dir(paths.checkpoint_dir) / f"{name}.pth", device))
        else:
            out.append(load_imagenet_evaluator(name, weights_dir, download, device))
    if num_classes is not None:
        for ev in out:
            if ev.num_classes < num_classes:
                raise CortexError(f"evaluator {ev.name} predicts {ev.num_classes} classes but the dataset has "
                                  f"{num_classes} labels; use evaluators trained on this dataset "
                                  f"(train_evaluators.py, --evaluators synthetic)")
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
