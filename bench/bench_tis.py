"""Benchmark: SmoothGrad vs its forward+backward lower bound, --fast, the seed's loop, and TIS parsing.

    python bench/bench_tis.py                                  # CPU, Net1/3/4 at width 512, a few minutes
    python bench/bench_tis.py --device cuda --images 25 --nsamples 20  # on a GPU: device, images/s, peak memory
    python bench/bench_tis.py --device cuda --images 25 --nsamples 20 --repeats 5 --compute_tis --skip_parsing
    python bench/bench_tis.py --images 2 --width 32 --nets 1 --seed_loop   # quick smoke test

0. Lower bound (per net of ``--nets``, paper width by default): ``cortex.attribution.attributions.smoothgrad`` on
   ``--images`` embeddings x ``--nsamples`` draws, against the bare forward+backward of the same noisy
   copies in the same chunks (nothing else: no noise, no bookkeeping); the ratio should stay <= 1.1x.
   A breakdown follows: forward+backward, building the noisy copies, the float64 accumulation (each timed
   alone over the same chunks) and the rest; plus the per-image noise draw, a per-batch cost of
   ``compute_tis`` outside ``smoothgrad``. Then (unless ``--skip_fast``) the ``--fast`` model (BatchNorm
   folded, channels-last, bf16 only where allowed): its speed-up
   and the top-20 position overlap of its scores with the exact ones (same noise).

1. (``--seed_loop``) SmoothGrad vs the seed. On the same (random-init) IEM and the same 25 random embeddings, under identical noise
   (batch-scoped, as the seed), time
   - the seed's algorithm, re-implemented faithfully here and ONLY here: for each draw, one forward
     of the noisy batch, then one ``torch.autograd.grad(output[j, target[j]], noisy, retain_graph=True,
     create_graph=True)`` per sample ``j`` (cost ~ batch^2 per draw);
   - ours: one forward/backward of the summed target logits over all noisy copies;
   and print the ratio and the max abs difference of the per-position scores (channel max).
2. (``--compute_tis``) ``cortex.attribution.tis.compute_tis`` end to end (noise, scores, CSV rows written) against
   ``smoothgrad`` alone on the same ``--tis_batches`` batches: the per-batch costs outside ``smoothgrad``.
3. Parsing. Time reading a TIS file of ``--rows`` rows with ``cortex.attribution.store.read_tis_file`` (one numpy
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

from cortex.attribution.attributions import image_seed, noise_scale, reduce_channels, smoothgrad, standard_noise  # noqa: E402
from cortex.attribution.scorer import TISConfig, TISScorer  # noqa: E402
from cortex.analysis.ranking import TOP_NS  # noqa: E402
from cortex.analysis.statistics import label_statistics
from cortex.attribution.store import read_tis_file  # noqa: E402
from cortex.iem.registry import model_choices  # noqa: E402
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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats=1):
    """Best wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def overhead_breakdown(x, z, sd, copies, device, repeats=1) -> dict:
    """Time smoothgrad's work besides forward+backward, each part alone over all chunks of ``copies`` copies.

    x ``(B, 256, 16, 16)``; z standard noise ``(S, B, 256, 16, 16)``; sd ``(B, 1, 1, 1)``. Returns seconds:
    ``copies_s`` (``attribution.fill_copies``: noise x sd + inputs), ``accumulate_s``
    (``attribution.accumulate_draws``: the float64 sums in draw order, on a stand-in gradient) and
    ``noise_s`` (``attribution.standard_noise`` with per-image seeds: a per-batch cost of ``compute_tis``).
    """
    from cortex.attribution.performance import accumulate_draws, draw_pieces, fill_copies

    S, B = z.shape[:2]
    n = S * B
    cuts = [draw_pieces(s0, min(s0 + copies, n), B) for s0 in range(0, n, copies)]
    buf = torch.empty((copies, *x.shape[1:]), dtype=x.dtype, device=x.device)
    grad = torch.randn_like(buf)
    sdb = sd.expand(B, *sd.shape[1:])

    def fill():
        for pieces in cuts:
            fill_copies(buf, x, z, sdb, pieces)

    def accumulate():
        total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for pieces in cuts:
            accumulate_draws(total, grad, pieces)

    def noise():
        standard_noise(S, x.shape[1:], seeds=[image_seed(0, i) for i in range(B)], device=device)

    return {"copies_s": _timed(fill, device, repeats)[0], "accumulate_s": _timed(accumulate, device, repeats)[0],
            "noise_s": _timed(noise, device, repeats)[0]}


def bench_lower_bound(args):
    """SmoothGrad / (forward+backward of the same copies) and --fast, for each net of --nets."""
    from cortex.attribution.performance import (available_memory_bytes, copies_for_budget, memory_per_copy,
                                                prepare_fast, top_overlap)
    from cortex.iem.registry import build_model

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.images} images x {args.nsamples} draws, width {args.width}")
    out = {}
    for m in args.nets:
        torch.manual_seed(args.seed)
        model = build_model("vqgan", m, args.num_classes, width=args.width).to(device).eval()
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.images, 256, 16, 16, generator=g).to(device)  # (B, 256, 16, 16)
        t = torch.randint(0, args.num_classes, (args.images,), generator=g).to(device)
        z = TISScorer(model, TISConfig(nsamples=args.nsamples, seed=args.seed), device).noise(x, range(args.images))
        copies = args.max_copies_per_pass
        if copies is None:
            free, _ = available_memory_bytes(device)
            copies = copies_for_budget(0.5 * free, memory_per_copy(model, x[:1]))
        copies = min(copies, args.images * args.nsamples)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ws = {}  # the buffers compute_tis keeps from batch to batch
        t_ours, ours = _timed(lambda: smoothgrad(model, x, t, noise=z, stdev_spread=args.stdev_spread,
                                                 max_copies_per_pass=copies, workspace=ws), device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        noisy = (x.unsqueeze(0) + z).reshape(-1, *x.shape[1:])  # (S*B, 256, 16, 16)
        tt = t.repeat(args.nsamples)

        def bare():
            for s0 in range(0, noisy.shape[0], copies):
                c = noisy[s0:s0 + copies].detach().requires_grad_(True)
                torch.autograd.grad(model(c).gather(1, tt[s0:s0 + copies, None]).sum(), c)  # input grad only
        with torch.enable_grad():
            t_low, _ = _timed(bare, device, args.repeats)
        parts = overhead_breakdown(x, z, noise_scale(x, args.stdev_spread, "sample"), copies, device, args.repeats)
        other = t_ours - t_low - parts["copies_s"] - parts["accumulate_s"]
        n_img = args.images / t_ours
        print(f"  Net{m}: smoothgrad {t_ours:7.3f} s ({n_img:.2f} images/s, {copies} copies/pass"
              + (f", GPU peak {peak:.2f} GiB" if peak is not None else "") + f")  lower bound {t_low:7.3f} s  "
              f"ratio {t_ours / t_low:.3f}x")
        print(f"         breakdown: forward+backward {t_low:.4f} s, noisy copies {parts['copies_s']:.4f} s, float64 "
              f"accumulation {parts['accumulate_s']:.4f} s, other {other:.4f} s (setup, Python; < 0: timing noise); "
              f"outside smoothgrad, per batch: drawing the noise {parts['noise_s']:.4f} s")
        out[f"net{m}"] = {"ours_s": t_ours, "lower_s": t_low, "ratio": t_ours / t_low, **parts, "other_s": other,
                          "images_per_s": n_img, "gpu_peak_gib": peak}
        if args.skip_fast:
            continue
        fast, info = prepare_fast(model, device, ("vqgan", m))
        t_fast, f = _timed(lambda: smoothgrad(fast, x, t, noise=z, stdev_spread=args.stdev_spread,
                                              max_copies_per_pass=copies, workspace=ws), device, args.repeats)
        so, sf = reduce_channels(ours, "max"), reduce_channels(f, "max")
        ov = top_overlap(sf.float(), so.float(), 20)
        print(f"         --fast ({info['bn_folds']} BN folded, bf16 {'on' if info['bf16'] else 'off'}): {t_fast:7.3f} s  "
              f"speed-up {t_ours / t_fast:.2f}x  top-20 overlap {ov:.4f}  max |diff| {(sf - so).abs().max().item():.3g}")
        out[f"net{m}"].update(fast_s=t_fast, fast_speedup=t_ours / t_fast, fast_top20=ov)
    return out


class _MemoryDataset(torch.utils.data.Dataset):
    """``compute_tis``'s dataset interface over in-memory embeddings: items ``(emb, label, filename)``."""

    def __init__(self, x, labels):
        self.x, self.labels = x, [int(l) for l in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i], f"{self.labels[i]}_{i}.npy"


def bench_compute_tis(args):
    """End to end: ``cortex.attribution.tis.compute_tis`` (noise, scores, CSV rows) against ``smoothgrad`` alone.

    For each net of --nets: ``--tis_batches`` batches of ``--images`` images (two labels), scored and written
    to a temporary folder (after one warm-up run), against the same batches through ``smoothgrad`` only
    (noise drawn beforehand). The ratio shows the per-batch costs outside ``smoothgrad`` that the
    pipelining of ``compute_tis`` (next batch queued before the rows of the previous one are written) hides.
    """
    from cortex.iem.registry import build_model
    from cortex.attribution.tis import TISConfig, compute_tis

    device = torch.device(args.device)
    n = args.images * args.tis_batches
    out = {}
    for m in args.nets:
        torch.manual_seed(args.seed)
        model = build_model("vqgan", m, args.num_classes, width=args.width).to(device).eval()
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(n, 256, 16, 16, generator=g)  # (N, 256, 16, 16) on the host, as a dataset's
        labels = [i * 2 // n for i in range(n)]
        ds = _MemoryDataset(x, labels)
        copies = args.max_copies_per_pass or 0
        cfg = TISConfig(nsamples=args.nsamples, stdev_spread=args.stdev_spread, max_copies_per_pass=copies)
        with tempfile.TemporaryDirectory() as d:
            run = [0]

            def tis():
                run[0] += 1
                compute_tis(model, ds, Path(d) / f"r{run[0]}", cfg, batch_size=args.images, device=device,
                            progress=False)
            t_tis, _ = _timed(tis, device, args.repeats)
        xs = [x[i:i + args.images].to(device) for i in range(0, n, args.images)]
        scorer = TISScorer(model, TISConfig(nsamples=args.nsamples, seed=args.seed), device)
        zs = [scorer.noise(b, range(i, i + len(b))) for i, b in zip(range(0, n, args.images), xs)]
        ts = [torch.tensor(labels[i:i + args.images], device=device) for i in range(0, n, args.images)]
        ws = {}

        def sg_only():
            for b, z, t in zip(xs, zs, ts):
                smoothgrad(model, b, t, noise=z, stdev_spread=args.stdev_spread, max_copies_per_pass=copies,
                           workspace=ws)
        t_sg, _ = _timed(sg_only, device, args.repeats)
        print(f"  Net{m}: compute_tis {n} images in {t_tis:.3f} s ({n / t_tis:.2f} images/s, CSV files written)  "
              f"smoothgrad alone {t_sg:.3f} s  ratio {t_tis / t_sg:.3f}x")
        out[f"tis_net{m}"] = {"compute_tis_s": t_tis, "smoothgrad_s": t_sg, "ratio": t_tis / t_sg}
    return out


def bench_smoothgrad(args):
    from cortex.iem.registry import build_model

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
    p.add_argument("--model", type=int, default=1, choices=model_choices("vqgan"))
    p.add_argument("--width", type=int, default=512, help="IEM width (paper: 512)")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=25, help="seed-loop comparison: as the seed README's example")
    p.add_argument("--nets", type=int, nargs="+", default=[1, 3, 4], help="lower-bound section: VQGAN nets")
    p.add_argument("--images", type=int, default=4, help="lower-bound section: images (GPU: e.g. 25)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (lower-bound section)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up (best is kept)")
    p.add_argument("--seed_loop", action="store_true", help="also time the seed's per-sample loop (slow)")
    p.add_argument("--nsamples", type=int, default=2, help="noise draws (paper: 20; fewer keeps the CPU run short)")
    p.add_argument("--stdev_spread", type=float, default=0.2)
    p.add_argument("--max_copies_per_pass", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rows", type=int, default=1300, help="rows of the parsing benchmark's TIS file (ImageNet: ~1300/label)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_lower_bound", action="store_true")
    p.add_argument("--skip_parsing", action="store_true")
    p.add_argument("--skip_fast", action="store_true", help="lower-bound section: do not time the --fast model")
    p.add_argument("--compute_tis", action="store_true",
                   help="also time compute_tis end to end (files written) against smoothgrad alone")
    p.add_argument("--tis_batches", type=int, default=4, help="compute_tis section: batches of --images images")
    return p


def main(args):
    out = {}
    if not args.skip_lower_bound:
        out.update(bench_lower_bound(args))
    if args.compute_tis:
        out.update(bench_compute_tis(args))
    if args.seed_loop:
        out.update(bench_smoothgrad(args))
    if not args.skip_parsing:
        out.update(bench_parsing(args))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
