"""16-bit weights: x @ W^T with W in float32 beside the same W kept bf16 (and f16), converted inside the product.

Usage: python benchmarks/bench_half.py [--threads 2] [--rounds 5] [--out 896] [--in 4864]
Prints the median ms per call (interleaved rounds, benchmarks/_timing.py) and the weight bandwidth, bytes of W read
per second: at M = 1 (decoding) the product is bound by reading W, so a 16-bit W should take about half the time.
At M = 128 it is compute-bound; GFLOP/s (2 M N K / time) shows what the conversion costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import cpuformer
from cpuformer import _core

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare_rounds, loadavg  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--out", type=int, default=896, help="out_features (Qwen2-0.5B's down_proj: 896)")
parser.add_argument("--in", dest="n_in", type=int, default=4864, help="in_features (Qwen2-0.5B's down_proj: 4864)")
args = parser.parse_args()
cpuformer.set_num_threads(args.threads)

rng = np.random.default_rng(0)
N, K = args.out, args.n_in
w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
halves = {kind: _core.float_to_half(w, kind) for kind in ("bf16", "f16")}
bias = rng.standard_normal(N).astype(np.float32)

# One thread: CPU time of the process (robust to other tenants taking the cores); more: wall-clock time.
clock = time.process_time if args.threads == 1 else time.perf_counter
print(f"W {N}x{K} (out x in), threads {args.threads} ({'CPU' if args.threads == 1 else 'wall'} time), "
      f"SIMD path {_core.get_simd_path()}, loadavg before: {loadavg()}")
print(f"{'M':>5} {'form':>8} {'ms':>9} {'GB/s of W':>10} {'GFLOP/s':>8} {'vs f32':>7}")
for M in (1, 128):
    x = rng.standard_normal((M, K)).astype(np.float32)
    fns = {"float32": lambda: _core.matmul(x, w, transpose_b=True, bias=bias)}
    for kind, h in halves.items():
        fns[kind] = (lambda h=h, kind=kind: _core.linear_half(x, h, bias, kind))
    rounds = compare_rounds(fns, rounds=args.rounds, reps=3, budget_s=5.0, min_sample_s=0.02, clock=clock)
    times = {name: statistics.median(v) for name, v in rounds.items()}
    for name, t in times.items():
        nbytes = w.nbytes if name == "float32" else halves[name].nbytes
        print(f"{M:>5} {name:>8} {t * 1e3:9.3f} {nbytes / t / 1e9:10.1f} {2 * M * N * K / t / 1e9:8.1f} "
              f"{times['float32'] / t:6.2f}x")
