"""One small interface over every VQ image tokenizer CORTEX explains.

A VQ tokenizer turns an image into an ``h x w`` grid of token ids, each an index into a codebook of
``n_codes`` vectors of dimension ``D``. CORTEX only needs four things from it: the codebook, ``encode``,
``decode`` and the grid/image geometry. :class:`VQTokenizer` is that interface; adapters wrap

* taming-transformers ``VQModel`` / ``Net2NetTransformer`` (the paper's f16 VQGAN, 16x16 x 256-d):
  :class:`TamingTokenizer`, loaded from ``(config.yaml, last.ckpt)`` by :func:`load_tokenizer`;
* diffusers ``VQModel`` (aMUSEd, Kandinsky; codebook ``quantize.embedding.weight``): :class:`DiffusersTokenizer`,
  loaded from a folder written by ``VQModel.save_pretrained`` (never downloaded);
* the embedded synthetic world (:class:`cortex.data.synthetic.SyntheticVQ`): :class:`SyntheticTokenizer`;
* anything else in a few lines: :class:`CallableTokenizer`.

Conventions (all adapters): images are ``(B, 3, H, W)`` floats in ``[-1, 1]``; ids are ``(B, h, w)`` int64,
row-major, so ``ids.reshape(B, h*w)`` is the dataset's ``indices`` list (position ``p = row*w + col``);
``codebook`` is ``(n_codes, D)`` float32 on the model's device; ``decode`` snaps nothing: it renders
exactly the given ids. Everything runs under ``torch.no_grad``.

Wrapping another model, e.g. a LlamaGen / Janus VQ-16 tokenizer (24x24 grid of 8-d L2-normalised codes)::

    import torch.nn.functional as F
    from cortex.data.tokenizers import CallableTokenizer

    vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)      # LlamaGen's own code
    vq.load_state_dict(torch.load("vq_ds16_c2i.pt")["model"]); vq.eval()

    def encode(x):                                  # (B, 3, 384, 384) in [-1, 1] -> (B, 24, 24)
        _, _, (_, _, ids) = vq.encode(x)
        return ids.reshape(x.shape[0], 24, 24)

    def decode(ids):                                # (B, 24, 24) -> (B, 3, 384, 384)
        return vq.decode_code(ids.reshape(ids.shape[0], -1), shape=(ids.shape[0], 8, 24, 24))

    tok = CallableTokenizer(F.normalize(vq.quantize.embedding.weight, dim=-1), encode, decode,
                            grid=(24, 24), image_size=384, name="llamagen-vq16")

:func:`as_tokenizer` turns any supported model object into its adapter (a tokenizer passes through), so
functions that used to take a taming model accept any of them.

The registry (:data:`TOKENIZERS`) holds one :class:`TokenizerEntry` per ``--tokenizer`` kind: its adapter, how
to load it from files and which model objects it wraps. ``--tokenizer`` choices, :func:`load_tokenizer`,
:func:`as_tokenizer`, :func:`tokenizer_for_dataset`, ``generate_dataset.py --source images``, the token
gallery and the codebook-level evaluation all go through it, so a new tokenizer is one adapter plus one
:func:`register_tokenizer` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cortex.data.formats import GRID, dataset_info
from cortex.data.synthetic import SyntheticVQ, load_vq
from cortex.data.taming_compat import load_taming_model
from cortex.utils import CortexError


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise CortexError(f"a grid/image size is (height, width), got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class VQTokenizer:
    """Base class: a codebook, ``encode``, ``decode`` and the geometry.

    Subclasses set ``codebook`` (n_codes, D), ``grid`` (h, w), ``image_size`` (H, W) and ``name``, and
    implement ``_encode`` / ``_decode``; the public methods add no_grad, dtype and shape checks.
    """

    name: str = "vq"
    kind: str = "custom"

    def __init__(self, codebook: torch.Tensor, grid, image_size, name: str | None = None):
        codebook = torch.as_tensor(codebook)
        if codebook.ndim != 2:
            raise CortexError(f"{name or self.name}: the codebook must be (n_codes, D), got {tuple(codebook.shape)}")
        self.codebook = codebook.detach()
        self.grid = _pair(grid)
        self.image_size = _pair(image_size)
        if name:
            self.name = name
        h, w = self.grid
        H, W = self.image_size
        if h <= 0 or w <= 0 or H % h or W % w:
            raise CortexError(f"{self.name}: image size {H}x{W} is not a whole number of {h}x{w} token patches")

    # ------------------------------------------------------------------ geometry
    @property
    def n_codes(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def code_dim(self) -> int:
        """D, the dimension of one code (256 for taming's VQGAN, 8 for LlamaGen VQ-16)."""
        return int(self.codebook.shape[1])

    @property
    def n_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per token, (H / h, W / w): the patch a masking evaluation blacks out."""
        return self.image_size[0] // self.grid[0], self.image_size[1] // self.grid[1]

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    def grid_at(self, resolution: int) -> tuple[int, int]:
        """Token grid of a square ``resolution`` px image (convolutional tokenizers scale with the input)."""
        ph, pw = self.patch_size
        return resolution // ph, resolution // pw

    def info(self) -> dict:
        """What a dataset records about its tokenizer (``dataset_info.json``)."""
        return {"tokenizer": self.kind, "tokenizer_name": self.name, "n_codes": self.n_codes,
                "code_dim": self.code_dim, "grid_size": list(self.grid), "image_size_hw": list(self.image_size),
                "patch_size": list(self.patch_size)}

    # ------------------------------------------------------------------ encode / decode
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, h, w) int64 (h, w = the grid at that resolution)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise CortexError(f"{self.name}.encode: images must be (B, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            ids = self._encode(images.to(self.device))
        ids = ids.long()
        want = self.grid_at(images.shape[-1]) if images.shape[-1] == images.shape[-2] else None
        if ids.ndim == 2 and want and ids.shape[1] == want[0] * want[1]:
            ids = ids.reshape(ids.shape[0], *want)
        if ids.ndim != 3 or ids.shape[0] != images.shape[0]:
            raise CortexError(f"{self.name}.encode returned ids of shape {tuple(ids.shape)}; expected (B, h, w)")
        return ids

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) (or (B, h*w) for this tokenizer's grid) -> images (B, 3, H, W) in about [-1, 1]."""
        ids = torch.as_tensor(ids).long().to(self.device)
        if ids.ndim == 2:
            if ids.shape[1] != self.n_positions:
                raise CortexError(f"{self.name}.decode: {ids.shape[1]} ids per image, the grid "
                                  f"{self.grid[0]}x{self.grid[1]} needs {self.n_positions}")
            ids = ids.reshape(ids.shape[0], *self.grid)
        if ids.ndim != 3:
            raise CortexError(f"{self.name}.decode: ids must be (B, h, w), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_codes):
            raise CortexError(f"{self.name}.decode: token ids must lie in 0..{self.n_codes - 1}, got "
                              f"{int(ids.min())}..{int(ids.max())}")
        with torch.no_grad():
            return self._decode(ids)

    def decode_token(self, token: int) -> torch.Tensor:
        """The image of a grid filled with one token: (3, H, W) -- what the code "looks like" on its own."""
        ids = torch.full((1, *self.grid), int(token), dtype=torch.long)
        return self.decode(ids)[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token-based embedding: ids (B, h, w) -> (B, D, h, w), ``E[c, r, k] = codebook[ids[r, k], c]``."""
        ids = torch.as_tensor(ids).long().to(self.device)
        return self.codebook[ids].permute(0, 3, 1, 2).contiguous()

    def _encode(self, images):  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, ids):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, n_codes={self.n_codes}, D={self.code_dim}, "
                f"grid={self.grid[0]}x{self.grid[1]}, image={self.image_size[0]}x{self.image_size[1]})")


class CallableTokenizer(VQTokenizer):
    """Any tokenizer from a codebook and two functions (see the module docstring for a LlamaGen example).

    codebook: (n_codes, D); encode_fn(images (B, 3, H, W)) -> ids (B, h, w) or (B, h*w);
    decode_fn(ids (B, h, w)) -> images (B, 3, H, W); grid: h or (h, w); image_size: H or (H, W).
    """

    def __init__(self, codebook, encode_fn, decode_fn, grid, image_size, name: str = "custom"):
        super().__init__(codebook, grid, image_size, name)
        self._encode_fn, self._decode_fn = encode_fn, decode_fn

    def _encode(self, images):
        return self._encode_fn(images)

    def _decode(self, ids):
        return self._decode_fn(ids)


class SyntheticTokenizer(VQTokenizer):
    """The embedded synthetic world's :class:`~cortex.data.synthetic.SyntheticVQ` (16x16 grid, 256-d codes)."""

    kind = "synthetic"

    def __init__(self, vq, name: str = "synthetic"):
        super().__init__(vq.codebook, GRID, vq.image_size, name)
        self.model = vq

    def _encode(self, images):
        b = images.shape[0]
        return self.model.encode(images)[2][2].reshape(b, *self.grid)

    def _decode(self, ids):
        return self.model.decode_ids(ids.reshape(ids.shape[0], -1))


class TamingTokenizer(VQTokenizer):
    """A taming-transformers ``VQModel`` (or the first stage of a ``Net2NetTransformer``).

    Grid: ``encoder.resolution / 2**(num_resolutions - 1)`` per side (16x16 for the paper's f16 VQGAN at
    256 px); codes ``quantize.embedding.weight`` (n_codes, embed_dim).
    """

    kind = "taming"

    def __init__(self, model, name: str = "taming"):
        vq = getattr(model, "first_stage_model", model)
        try:
            codebook = vq.quantize.embedding.weight
            enc = vq.encoder
        except AttributeError:
            raise CortexError(f"{type(vq).__name__} has no quantize.embedding / encoder (not a taming VQModel?)") from None
        res = int(enc.resolution)
        factor = 2 ** (int(enc.num_resolutions) - 1)
        super().__init__(codebook, res // factor, res, name)
        self.model = vq

    def _encode(self, images):
        out = self.model.encode(images)  # quant, emb_loss, (perplexity, min_encodings, ids)
        quant, ids = out[0], out[2][2]
        return ids.reshape(quant.shape[0], quant.shape[2], quant.shape[3])

    def _decode(self, ids):
        b, h, w = ids.shape
        z = self.model.quantize.get_codebook_entry(ids.reshape(-1), shape=(b, h, w, self.code_dim))
        return self.model.decode(z)


class DiffusersTokenizer(VQTokenizer):
    """A diffusers ``VQModel`` (aMUSEd / Kandinsky style).

    ids = ``model.quantize(model.encode(x).latents)[2][2]``; decode looks the ids up in
    ``quantize.embedding`` and calls ``model.decode(z, force_not_quantize=True)``. Grid:
    ``sample_size / 2**(len(block_out_channels) - 1)`` per side.
    """

    kind = "diffusers"

    def __init__(self, model, name: str = "diffusers"):
        try:
            codebook = model.quantize.embedding.weight
            cfg = model.config
        except AttributeError:
            raise CortexError(f"{type(model).__name__} has no quantize.embedding / config (not a diffusers VQModel?)") from None
        res = int(cfg.sample_size if not isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size[0])
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        super().__init__(codebook, res // factor, res, name)
        self.model = model

    def _encode(self, images):
        h = self.model.encode(images).latents  # (B, D, h, w)
        ids = self.model.quantize(h)[2][2]  # (B*h*w,) or (B*h*w, 1)
        return ids.reshape(h.shape[0], h.shape[2], h.shape[3])

    def _decode(self, ids):
        b, h, w = ids.shape
        shape = (b, h, w, self.code_dim)
        if getattr(self.model.config, "lookup_from_codebook", False):
            return self.model.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample
        z = self.model.quantize.get_codebook_entry(ids.reshape(-1), shape=shape)  # (B, D, h, w)
        return self.model.decode(z, force_not_quantize=True).sample


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class TokenizerEntry:
    """One ``--tokenizer`` kind.

    ``load(config, ckpt, device) -> VQTokenizer``: the tokenizer from its files (what ``config`` and ``ckpt``
    are is the kind's own: a YAML + checkpoint for taming, a folder for diffusers, ``synthetic_vq.pt``);
    ``wraps(model) -> bool``: whether ``adapter(model)`` wraps this model object (:func:`as_tokenizer`);
    ``encodes_images``: offered by ``generate_dataset.py --source images --tokenizer``.
    """
    kind: str
    adapter: type
    load: Callable
    wraps: Callable = lambda model: False
    encodes_images: bool = True


TOKENIZERS: dict[str, TokenizerEntry] = {}


def register_tokenizer(entry: TokenizerEntry) -> TokenizerEntry:
    """Add ``entry`` (replacing one of the same kind); returns it."""
    TOKENIZERS[entry.kind] = entry
    return entry


def unregister_tokenizer(kind: str) -> None:
    """Remove a kind added by :func:`register_tokenizer` (tests)."""
    del TOKENIZERS[kind]


def tokenizer_kinds(images_only: bool = False) -> tuple[str, ...]:
    """The registered ``--tokenizer`` kinds (``images_only``: those that encode image folders)."""
    return tuple(k for k, e in TOKENIZERS.items() if e.encodes_images or not images_only)


def as_tokenizer(obj) -> VQTokenizer:
    """A tokenizer for ``obj``: a VQTokenizer (returned as is), or a model some registered adapter wraps (a
    SyntheticVQ, a taming VQModel / Net2NetTransformer, a diffusers VQModel)."""
    if isinstance(obj, VQTokenizer):
        return obj
    for entry in TOKENIZERS.values():
        if entry.wraps(obj):
            return entry.adapter(obj)
    raise CortexError(f"no tokenizer adapter for {type(obj).__module__}.{type(obj).__name__}; wrap it with "
                      f"cortex.data.tokenizers.CallableTokenizer(codebook, encode_fn, decode_fn, grid, image_size)")


def load_diffusers_vq(folder, device="cpu"):
    """A diffusers ``VQModel`` from a local ``save_pretrained`` folder (config.json + weights); never downloads."""
    if not folder:
        raise CortexError("--tokenizer_config is required: the folder written by VQModel.save_pretrained")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CortexError(f"--tokenizer_config {folder}: not a diffusers model folder (no config.json). Pass the "
                          f"folder written by VQModel.save_pretrained (for aMUSEd: the 'vqvae' sub-folder).")
    try:
        from diffusers import VQModel
    except ImportError as e:
        raise CortexError(f"diffusers is not installed ({e}); pip install diffusers (pinned in requirements.txt)") from e
    try:
        model = VQModel.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise CortexError(f"--tokenizer_config {folder}: cannot load a diffusers VQModel ({str(e)[:300]})") from e
    model = model.eval().to(torch.device(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_taming(config, ckpt, device) -> VQTokenizer:
    if not config or not ckpt:
        raise CortexError("--tokenizer taming needs the VQGAN YAML (--tokenizer_config or --vqgan_config) and "
                          "its checkpoint (--vqgan_ckpt)")
    return TamingTokenizer(load_taming_model(config, ckpt, device))


def _load_diffusers(config, ckpt, device) -> VQTokenizer:
    if not config:
        raise CortexError("--tokenizer diffusers needs --tokenizer_config <folder written by VQModel.save_pretrained>")
    return DiffusersTokenizer(load_diffusers_vq(config, device), name=Path(config).name or "diffusers")


def _load_synthetic(config, ckpt, device) -> VQTokenizer:
    path = Path(config) if config else None
    if path is not None and path.is_dir():
        path = path / "synthetic_vq.pt"
    if path is None:
        raise CortexError("--tokenizer synthetic needs the world's synthetic_vq.pt (or its dataset folder)")
    return SyntheticTokenizer(load_vq(path, device))


def _is_synthetic(model) -> bool:
    return isinstance(model, SyntheticVQ)


def _is_taming(model) -> bool:
    vq = getattr(model, "first_stage_model", model)
    return hasattr(vq, "quantize") and hasattr(vq, "encoder") and hasattr(getattr(vq, "encoder"), "num_resolutions")


# as_tokenizer tries the entries in this order
register_tokenizer(TokenizerEntry("synthetic", SyntheticTokenizer, _load_synthetic, _is_synthetic, encodes_images=False))
register_tokenizer(TokenizerEntry("taming", TamingTokenizer, _load_taming, _is_taming))
register_tokenizer(TokenizerEntry("diffusers", DiffusersTokenizer, _load_diffusers,
                                  lambda model: type(model).__module__.startswith("diffusers")))


def load_tokenizer(kind: str, config=None, ckpt=None, device="cpu") -> VQTokenizer:
    """Load a tokenizer of a registered ``kind`` from files.

    kind ``taming``: config = taming YAML, ckpt = its checkpoint; ``diffusers``: config = a
    ``save_pretrained`` folder; ``synthetic``: config = ``synthetic_vq.pt`` (or the dataset folder holding it).
    """
    if kind not in TOKENIZERS:
        raise CortexError(f"--tokenizer {kind!r}: use one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].load(config, ckpt, device)


def tokenizer_for_dataset(data_dir, kind: str | None = None, config=None, ckpt=None, device="cpu") -> VQTokenizer:
    """The tokenizer that made a dataset.

    kind/config/ckpt given: :func:`load_tokenizer`. Otherwise from ``dataset_info.json``: the synthetic world's
    ``synthetic_vq.pt``, or the ``tokenizer`` + ``tokenizer_config`` (+ ``vqgan_ckpt``) recorded by
    ``generate_dataset.py --source images``.
    """
    data_dir = Path(data_dir)
    if kind not in (None, "auto"):
        if kind == "synthetic" and not config:
            config = data_dir
        return load_tokenizer(kind, config, ckpt, device)
    info = dataset_info(data_dir)
    if info.get("source") == "synthetic" or (data_dir / "synthetic_vq.pt").is_file():
        return load_tokenizer("synthetic", data_dir, device=device)
    recorded = info.get("tokenizer")
    cfg = config or info.get("tokenizer_config") or info.get("vqgan_config")
    ck = ckpt or info.get("vqgan_ckpt")
    if recorded in TOKENIZERS and cfg:
        return load_tokenizer(recorded, cfg, ck, device)
    raise CortexError(f"{data_dir}/dataset_info.json does not say which tokenizer made this dataset; pass "
                      f"--tokenizer taming|diffusers with --tokenizer_config (and --vqgan_ckpt for taming)")
