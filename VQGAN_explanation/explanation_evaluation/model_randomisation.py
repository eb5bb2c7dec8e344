"""Sanity check of the attributions by cascading model randomisation (Adebayo et al., NeurIPS 2018).

    cd VQGAN_explanation/explanation_evaluation
    python model_randomisation.py --model 1                       # smoothgrad and smoothgrad_x_input
    python model_randomisation.py --model 1 --num_images 64 --nsamples 20

An attribution that explains the IEM must change when the IEM's weights are destroyed. Starting from the
trained IEM (stage 0), the layers with parameters are re-initialised one by one from the top (the output
layer first; cascading: earlier stages stay randomised), and after each stage the TIS of the same images
(same SmoothGrad noise) are computed with cortex.attribution.scorer.TISScorer. Reported per stage: the Spearman
rank correlation between the trained and the randomised IEM's 256 TIS of an image, mean (and std) over the
images. Stage 0 is 1 by construction; a sane attribution falls towards 0 as layers are randomised (an edge
detector would not). The target of each image is its label.

Writes results/Explanation/model_{m}/model_randomisation.csv (columns model,attribution,stage,layer,
spearman_mean,spearman_std,images) and model_randomisation.png beside it.
"""
import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from cortex.attribution.attributions import ATTRIBUTIONS
from cortex.attribution.scorer import TISConfig, TISScorer
from cortex.cli import make_parser, model_parser, nonneg_float, paths_parser, positive_int, run_main, runtime_parser
from cortex.iem.registry import model_choices
from cortex.paths import ExperimentPaths
from cortex.provenance import verify, write_output_record
from cortex.utils import CortexError, atomic_write, get_device, save_run_args

EXPERIMENT = "vqgan"
COLUMNS = ["model", "attribution", "stage", "layer", "spearman_mean", "spearman_std", "images"]


def get_args_parser():
    p = make_parser("model_randomisation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[model_parser(model_choices("vqgan")), paths_parser(__file__, up=1), runtime_parser()])
    p.add_argument("--attributions", nargs="+", choices=sorted(ATTRIBUTIONS),
                   default=["smoothgrad", "smoothgrad_x_input"], help="attributions to check (default: %(default)s)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="images to explain (default: %(default)s)")
    p.add_argument("--num_images", type=positive_int, default=64, help="images (a seeded sample; default: %(default)s)")
    p.add_argument("--nsamples", type=positive_int, default=20, help="SmoothGrad noise draws (default: %(default)s)")
    p.add_argument("--stdev_spread", type=nonneg_float, default=0.2, help="SmoothGrad noise level (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="images per attribution call")
    p.add_argument("--max_stages", type=positive_int, default=None,
                   help="randomise only the top K layers (default: all layers with parameters)")
    return p


# ----------------------------------------------------------------------------- randomisation

def randomisable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules that own parameters, top first (reverse registration order: output layer first; the root's own
    parameters, e.g. a ViT's cls token and position embedding, come last as ``<root>``)."""
    layers = [(name or "<root>", m) for name, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))]
    return layers[::-1]


@torch.no_grad()
def reinitialise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw the parameters a module owns (not its children's): matrices and kernels ~ N(0, 1/fan_in),
    a 1-d ``weight`` (a norm layer's scale) ~ N(1, 0.1), other vectors (biases) ~ N(0, 0.1)."""
    for name, p in module.named_parameters(recurse=False):
        if p.dim() >= 2:
            new = torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5
        elif name == "weight":
            new = 1.0 + 0.1 * torch.randn(p.shape, generator=generator)
        else:
            new = 0.1 * torch.randn(p.shape, generator=generator)
        p.copy_(new.to(p.device, p.dtype))


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``: ``(N, P) x (N, P) -> (N,)``."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, 0.0)


def scores_of(model, x, y, attribution: str, batch_size: int, seed: int, **settings) -> np.ndarray:
    """TIS ``(N, 256)`` of the images ``x`` ``(N, 256, 16, 16)`` for targets ``y``: a ``TISScorer`` with image ``i``'s
    noise seeded by ``image_seed(seed, i)`` (the same draws at every stage). settings: ``TISConfig`` fields
    (nsamples, stdev_spread, ...)."""
    scorer = TISScorer(model, TISConfig(attribution=attribution, seed=seed, **settings), device=x.device)
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        noise = scorer.noise(xb, range(s, s + xb.shape[0]))
        out.append(scorer.score(xb, yb, noise).detach().cpu().double().numpy())
    return np.concatenate(out)


def cascading_randomisation(model, x, y, attributions, seed: int = 0, batch_size: int = 16,
                            max_stages: int | None = None, **opts) -> list[dict]:
    """Rows ``{attribution, stage, layer, spearman_mean, spearman_std, images}``; stage 0 = the trained IEM,
    stage k = the top k layers re-initialised (all layers, or the top ``max_stages``).

    model is modified in place (pass a copy). x ``(N, 256, 16, 16)``, y ``(N,)`` targets; opts go to the
    ``TISConfig`` of the scores (nsamples, stdev_spread, ...).
    """
    model.eval()
    trained = {a: scores_of(model, x, y, a, batch_size, seed, **opts) for a in attributions}
    g = torch.Generator().manual_seed(seed)
    rows = []
    stages = [("(trained)", None)] + randomisable_layers(model)[:max_stages]
    from tqdm import tqdm

    for stage, (name, module) in enumerate(tqdm(stages, desc="cascading randomisation", unit="layer")):
        if module is not None:
            reinitialise(module, g)
        for a in attributions:
            now = trained[a] if stage == 0 else scores_of(model, x, y, a, batch_size, seed, **opts)
            rho = rowwise_spearman(trained[a], now)
            rows.append(dict(attribution=a, stage=stage, layer=name, spearman_mean=float(rho.mean()),
                             spearman_std=float(rho.std()), images=int(rho.size)))
    return rows


def plot_randomisation(rows: list[dict], out: Path, title: str) -> Path:
    """Mean Spearman correlation per stage, one line per attribution, with a ± std band over images (Agg, saved to
    ``out``); the y range covers the whole band."""
    from cortex.figures import MAX_WIDTH_IN, _plt, save_figure

    plt = _plt()
    n_stages = len({r["stage"] for r in rows})
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, max(3.5, 0.22 * n_stages + 1.5)), 3.0))
    lows, highs = [-0.1], [1.0]
    for a in dict.fromkeys(r["attribution"] for r in rows):
        rs = [r for r in rows if r["attribution"] == a]
        m, s = np.array([r["spearman_mean"] for r in rs]), np.array([r["spearman_std"] for r in rs])
        ax.plot([r["stage"] for r in rs], m, "-o", ms=2.5, lw=1.2, label=a)
        ax.fill_between([r["stage"] for r in rs], m - s, m + s, alpha=0.15)
        lows.append(np.nanmin(m - s))
        highs.append(np.nanmax(m + s))
    layers = [r["layer"] for r in rows if r["attribution"] == rows[0]["attribution"]]
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=70, fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylim(max(-1.05, min(lows) - 0.05), min(1.05, max(highs) + 0.05))  # the whole ± std band
    ax.set_ylabel("Spearman ρ with trained TIS\n(mean ± std over images)")
    ax.set_xlabel("layers re-initialised, from the top")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


# ----------------------------------------------------------------------------- script

def main(args):
    from cortex.data.formats import EmbeddingDataset
    from cortex.iem.checkpoints import load_iem

    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    used = verify(paths, args.model, split=args.split)  # the IEM was trained on this dataset (cortex.provenance)
    out_dir = paths.explanation_dir(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out_dir, "model_randomisation_args.json")
    device = get_device(args.device, args.gpu)
    model = load_iem(paths.best_ckpt(args.model), EXPERIMENT, args.model, args.num_classes, args.width,
                     args.depth).to(device)
    ds = EmbeddingDataset(paths.data_dir, args.split)
    if len(ds) == 0:
        raise CortexError(f"{paths.data_dir}: the {args.split} split is empty; pass --split")
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(ds), size=min(args.num_images, len(ds)), replace=False))
    items = [ds[int(i)] for i in pick]
    x = torch.stack([torch.as_tensor(e) for e, _, _ in items]).float().to(device)  # (N, 256, 16, 16)
    y = torch.as_tensor([int(l) for _, l, _ in items], device=device)  # (N,)
    rows = cascading_randomisation(model, x, y, args.attributions, seed=args.seed, batch_size=args.batch_size,
                                   max_stages=args.max_stages, nsamples=args.nsamples, stdev_spread=args.stdev_spread)
    out = out_dir / "model_randomisation.csv"
    with atomic_write(out) as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([args.model, r["attribution"], r["stage"], r["layer"], f"{r['spearman_mean']:.6f}",
                        f"{r['spearman_std']:.6f}", r["images"]])
    write_output_record(out, used)  # <out>.source.json: the IEM and dataset it used
    fig = plot_randomisation(rows, out.with_suffix(".png"),
                             f"Model randomisation, Net{args.model}, {len(pick)} {args.split} images")
    for a in args.attributions:
        rs = [r for r in rows if r["attribution"] == a]
        print(f"{a}: Spearman {rs[0]['spearman_mean']:.2f} (trained) -> {rs[1]['spearman_mean']:.2f} (top layer "
              f"{rs[1]['layer']}) -> {rs[-1]['spearman_mean']:.2f} (all {len(rs) - 1} layers randomised)")
    print(f"-> {out} and {fig}")
    return rows


if __name__ == "__main__":
    run_main(main, get_args_parser)
