"""linear_int8 (each int8 kernel this CPU has) beside float32 matmul and linear_packed, at inference shapes.

Usage: python benchmarks/bench_int8.py [--threads 2] [--repeat 7]
Prints the median ms per call; int8 rows also give the speedup over linear_packed (float32, weights packed once).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import cpuformer
from cpuformer import _core

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeat", type=int, default=7)
args = parser.parse_args()
cpuformer.set_num_threads(args.threads)

SHAPES = [(1, 384, 1536), (1, 768, 3072), (128, 384, 1536), (32 * 128, 384, 384)]


def median_ms(fn, min_time=0.2):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e3)
    return float(np.median(times))


kernels = getattr(_core, "int8_kernels", lambda: ["default"])()
print(f"load average {os.getloadavg()[0]:.2f}, threads {args.threads}, int8 kernels {kernels}")
print(f"{'M x K x N':>18} {'matmul':>9} {'packed':>9} " + " ".join(f"{k:>16}" for k in kernels))
rng = np.random.default_rng(0)
for M, K, N in SHAPES:
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    out = np.empty((M, N), np.float32)
    packed = _core.pack_linear_weight(w)
    qw = _core.quantize_weight_int8(w)
    t_mm = median_ms(lambda: _core.matmul(x, w, transpose_b=True, bias=b))
    t_pk = median_ms(lambda: _core.linear_packed(x, packed, b, out))
    cells = []
    for k in kernels:
        if k != "default":
            _core.set_int8_kernel(k)
        t = median_ms(lambda: _core.linear_int8(x, qw, b, out))
        cells.append(f"{t:8.3f} ({t_pk / t:4.2f}x)")
    if kernels != ["default"]:
        _core.set_int8_kernel("auto")
    print(f"{f'{M}x{K}x{N}':>18} {t_mm:9.3f} {t_pk:9.3f} " + " ".join(f"{c:>16}" for c in cells))
