"""Benchmark: the seed's SmoothGrad loop vs cortex.attribution.smoothgrad, and TIS parsing.

    python bench/bench_tis.py                       # Net1 at the paper's width (512), batch 25, 1 draw
    python bench/bench_tis.py --nsamples 2 --width 128

1. SmoothGrad. On the same (random-init) IEM and the same 25 random embeddings, under identical noise
   (batch-scoped, as the seed), time
   - the seed's algorithm, re-implemented faithfully here and ONLY here: for each draw, one forward
     of the noisy batch, then one ``torch.autograd.grad(output[j, target[j]], noisy, retain_graph=True,
     create_graph=True)`` per sample ``j`` (cost ~ batch^2 per draw);
   - ours: one forward/backward of the summed target logits over all noisy copies;
   and print the ratio and the max abs difference of the per-position scores (channel max).
2. Parsing. Time reading a TIS file of ``--rows`` rows with ``cortex.tis.read_tis_file`` (one numpy
   parse per file) against a csv + ``ast.literal_eval`` per row reader (the seed's), and the full
   statistics of one label (one argsort per image, reused for n = 1, 5, 10, 20) against re-reading and
   re-sorting for every n.

Numbers vary with the machine load; the ratio is what counts.
"""
from __future__ import annotations

import argparse
import ast
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortex.attribution import image_seed, noise_scale, reduce_channels, smoothgrad, standard_noise  # noqa: E402
from cortex.stats import TOP_NS, label_statistics  # noqa: E402
from cortex.tis import read_tis_file  # noqa: E402
from cortex.utils import format_list  # noqa: E402


def seed_smoothgrad(model, inputs, target, noise, stdev_spread):
    """The seed's SmoothGrad (kept only in this benchmark): per draw, per sample, create_graph=True.

    noise: standard normal (S, B, 256, 16, 16); sd over the whole batch, as the seed.
    """
    stdev = stdev_spread * (torch.max(inputs) - torch.min(inputs))
    total_gradients = torch.zeros_like(inputs)
    for i in range(noise.shape[0]):
        noisy_input = inputs + noise[i] * stdev
        noisy_input.requires_grad_()
        output = model(noisy_input)
        for j in range(len(target)):
            grad = torch.autograd.grad(outputs=output[j, target[j]], inputs=noisy_input,
                                       retain_graph=True, create_graph=True)[0]
            total_gradients[j] += grad[j]
    return total_gradients / noise.shape[0]


def bench_smoothgrad(args):
    from cortex.models import build_model

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads) if args.threads else None
    model = build_model("vqgan", args.model, args.num_classes, width=args.width).eval()
    g = torch.Generator().manual_seed(args.seed)
    codebook = torch.randn(1024, 256, generator=g)
    ids = torch.randint(0, 1024, (args.batch_size, 256), generator=g)
    x = codebook[ids].transpose(1, 2).reshape(args.batch_size, 256, 16, 16).contiguous()  # (B, 256, 16, 16)
    t = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    z = standard_noise(args.nsamples, x.shape[1:], seeds=[image_seed(args.seed, i) for i in range(args.batch_size)])
    print(f"SmoothGrad: Net{args.model} width {args.width}, {args.num_classes} classes, batch {args.batch_size}, "
          f"{args.nsamples} draw(s), {torch.get_num_threads()} threads")

    # warm-up (allocator, kernels) on a tiny slice, for both
    smoothgrad(model, x[:2], t[:2], noise=z[:1, :2], noise_scope="batch")
    seed_smoothgrad(model, x[:2], t[:2], z[:1, :2], args.stdev_spread)

    t0 = time.perf_counter()
    ours = smoothgrad(model, x, t, noise=z, stdev_spread=args.stdev_spread, noise_scope="batch",
                      max_copies_per_pass=args.max_copies_per_pass)
    t_ours = time.perf_counter() - t0
    print(f"  ours (batched):            {t_ours:8.2f} s")
    t0 = time.perf_counter()
    ref = seed_smoothgrad(model, x, t, z, args.stdev_spread).detach()
    t_seed = time.perf_counter() - t0
    print(f"  seed (per-sample loop):    {t_seed:8.2f} s")
    s_ours, s_ref = reduce_channels(ours, "max"), reduce_channels(ref, "max")
    diff = (s_ours - s_ref).abs().max().item()
    scale = s_ref.abs().max().item()
    print(f"  speed-up: {t_seed / t_ours:.1f}x   max |score diff| = {diff:.3g} (max |score| = {scale:.3g}); "
          f"noise sd {noise_scale(x, args.stdev_spread, 'batch').item():.3g}")
    return {"ours_s": t_ours, "seed_s": t_seed, "ratio": t_seed / t_ours, "max_abs_diff": diff, "max_abs_score": scale}


def _ast_reader(path):
    names, scores = [], []
    with open(path, newline="") as f:
        r = csv.reader(f)
        next(r)
        for row in r:
            names.append(row[0])
            scores.append(ast.literal_eval(row[2]))
    return names, np.asarray(scores)


def _seed_statistics(path, ids_of, top_ns=TOP_NS):
    """Seed-style: re-read the file (ast) and re-sort each image for every n."""
    out = {}
    for n in top_ns:
        names, scores = _ast_reader(path)
        counter = {}
        for name, s in zip(names, scores):
            top = np.argsort(s)[-n:][::-1]
            for tok in ids_of[name][top]:
                counter[int(tok)] = counter.get(int(tok), 0) + 1
        out[n] = counter
    return out


def bench_parsing(args):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "label_0.csv"
        names = [f"0_{i}.npy" for i in range(args.rows)]
        scores = rng.normal(size=(args.rows, 256)).astype(np.float32) * 1e-3
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label", "contribution"])
            for n, s in zip(names, scores):
                w.writerow([n, 0, format_list(s)])
        ids = rng.integers(0, 16384, size=(args.rows, 256))
        ids_of = dict(zip(names, ids))
        print(f"Parsing a TIS file of {args.rows} rows ({path.stat().st_size / 1e6:.1f} MB)")
        t0 = time.perf_counter()
        _, _, ours = read_tis_file(path)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ref = _ast_reader(path)
        t_ast = time.perf_counter() - t0
        assert np.array_equal(ours, ref)
        print(f"  read_tis_file: {t_ours:.3f} s   ast.literal_eval: {t_ast:.3f} s   speed-up {t_ast / t_ours:.1f}x")
        t0 = time.perf_counter()
        n2, _, sc = read_tis_file(path)
        label_statistics(n2, ids, sc)
        t_stats = time.perf_counter() - t0
        t0 = time.perf_counter()
        _seed_statistics(path, ids_of)
        t_seed_stats = time.perf_counter() - t0
        print(f"  statistics of one label (n = 1, 5, 10, 20): ours {t_stats:.3f} s   seed-style {t_seed_stats:.3f} s   "
              f"speed-up {t_seed_stats / t_stats:.1f}x")
    return {"parse_ratio": t_ast / t_ours, "stats_ratio": t_seed_stats / t_stats}


def get_args_parser():
    p = argparse.ArgumentParser("bench_tis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=int, default=1, choices=(1, 2, 3, 4))
    p.add_argument("--width", type=int, default=512, help="IEM width (paper: 512)")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=25, help="as the seed README's example")
    p.add_argument("--nsamples", type=int, default=1, help="noise draws (paper: 20; fewer keeps the seed's loop short)")
    p.add_argument("--stdev_spread", type=float, default=0.2)
    p.add_argument("--max_copies_per_pass", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rows", type=int, default=1300, help="rows of the parsing benchmark's TIS file (ImageNet: ~1300/label)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_smoothgrad", action="store_true")
    p.add_argument("--skip_parsing", action="store_true")
    return p


def main(args):
    out = {}
    if not args.skip_parsing:
        out.update(bench_parsing(args))
    if not args.skip_smoothgrad:
        out.update(bench_smoothgrad(args))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
