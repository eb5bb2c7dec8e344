"""Cliff's delta: sorting + searchsorted (cortex.analysis.cliffs_delta.cliffs_delta) against the double loop.

    python bench/bench_cliff.py                 # 10,000 x 10,000 values (the size of the issue)
    python bench/bench_cliff.py --n 20000 --loop_sample 1000

Inputs are per-image token counts: random integers in [0, 30) (many ties), as in bias detection.
Two baselines, both timed and stated in the output:

* numpy brute force: every pair compared, vectorised in chunks of 1024 x-values (exact, timed in full);
* the seed's pure-Python double loop: a full 10^8-iteration loop takes tens of seconds to minutes, so it runs
  on the first --loop_sample values of x and y and its time is extrapolated linearly in the number of
  pairs (time x (n m) / (s s)).
"""
import argparse
import time

import numpy as np

from cortex.analysis.cliffs_delta import cliffs_delta, cliffs_delta_brute, cliffs_delta_loop


def best_of(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def get_args_parser():
    p = argparse.ArgumentParser("bench_cliff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="values in each sample (default: %(default)s)")
    p.add_argument("--high", type=int, default=30, help="integers drawn from [0, high) (default: %(default)s)")
    p.add_argument("--loop_sample", type=int, default=1000,
                   help="values of x and y the pure-Python loop runs on before extrapolating (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    rng = np.random.default_rng(args.seed)
    x = rng.integers(0, args.high, args.n)
    y = rng.integers(0, args.high, args.n) + 1  # shifted: delta clearly negative
    n, m = x.size, y.size
    t_fast, d_fast = best_of(lambda: cliffs_delta(x, y), args.repeat)
    t_np, d_np = best_of(lambda: cliffs_delta_brute(x, y), max(1, args.repeat - 2))
    s = min(args.loop_sample, n)
    t_loop_s, d_loop_s = best_of(lambda: cliffs_delta_loop(x[:s], y[:s]), 1)
    t_loop = t_loop_s * (n * m) / (s * s)
    assert d_fast == d_np, (d_fast, d_np)
    assert abs(cliffs_delta(x[:s], y[:s]) - d_loop_s) < 1e-12
    print(f"Cliff's delta of {n:,} x {m:,} integer values in [0, {args.high}) (delta = {d_fast:+.6f}, "
          f"seed's halved value {d_fast / 2:+.6f})")
    print(f"{'method':<52}{'time':>12}{'speed-up of sort':>20}")
    print(f"{'sort + searchsorted, O((n+m) log(n+m))':<52}{t_fast * 1e3:>10.2f}ms{1:>19.0f}x")
    print(f"{'numpy brute force, all pairs in chunks (measured)':<52}{t_np * 1e3:>10.1f}ms{t_np / t_fast:>19,.0f}x")
    print(f"{f'pure-Python double loop (extrapolated from {s}x{s})':<52}{t_loop:>11.1f}s{t_loop / t_fast:>19,.0f}x")
    print(f"  (loop measured: {t_loop_s:.3f} s for {s * s:,} pairs; extrapolated linearly to {n * m:,} pairs)")
    return {"fast_s": t_fast, "numpy_brute_s": t_np, "loop_s_extrapolated": t_loop}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
