"""GEMM throughput: cpuformer.ops.matmul beside numpy (OpenBLAS) and torch (when installed), in one run.

Usage: python benchmarks/bench_matmul.py [--threads 2] [--quick]
Prints GFLOP/s (2*M*N*K / time) for square sizes 64..2048 in the NN, NT and TN variants and for
transformer-shaped products, and the ratio of cpuformer to the faster of numpy and torch.
"""
from __future__ import annotations

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds (smoke test)")
args = parser.parse_args()
# numpy's OpenBLAS reads its thread count at import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

import numpy as np  # noqa: E402

import cpuformer  # noqa: E402
from cpuformer import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, threads_line  # noqa: E402

try:
    import torch
    torch.set_num_threads(args.threads)
except ImportError:
    torch = None

cpuformer.set_num_threads(args.threads)
rng = np.random.default_rng(0)

squares = [64, 256, 1024] if args.quick else [64, 128, 256, 512, 1024, 2048]
cases = [(f"{n}^3", n, n, n, v) for v in ("NN", "NT", "TN") for n in squares]
cases += [(name, M, N, K, v) for name, M, N, K in
          [("4096x768 @ 768x3072", 4096, 3072, 768), ("4096x3072 @ 3072x768", 4096, 768, 3072),
           ("1024x256 @ 256x1024", 1024, 1024, 256)] for v in ("NN", "NT", "TN")]
if args.quick:
    cases = cases[:len(squares) * 3]

print(f"cpuformer {cpuformer.__version__}  {cpuformer.build_info()['simd']}  numpy {np.__version__}  "
      f"torch {torch.__version__ if torch else 'not installed'}")
print(threads_line(args.threads))
# Noise floor: numpy timed against itself with the same protocol (ratio 1.00 on a quiet machine).
a = rng.standard_normal((1024, 1024)).astype(np.float32)
t = compare({"numpy": lambda: a @ a, "numpy again": lambda: a @ a})
print(f"calibration, numpy 1024^3 against itself: ratio {t['numpy'] / t['numpy again']:.2f}")
hdr = f"{'shape':<24}{'op':<4}{'cpuformer':>11}{'numpy':>9}{'torch':>9}{'ratio':>8}"
print(hdr)
print("-" * len(hdr))
ratios = []
for name, M, N, K, v in cases:
    ta, tb = v[0] == "T", v[1] == "T"
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    an, bn = (a.T if ta else a), (b.T if tb else b)
    fns = {"cpuformer": lambda: ops.matmul(a, b, transpose_a=ta, transpose_b=tb), "numpy": lambda: an @ bn}
    if torch is not None:
        at, bt = torch.from_numpy(a), torch.from_numpy(b)
        at, bt = (at.T if ta else at), (bt.T if tb else bt)
        fns["torch"] = lambda: torch.matmul(at, bt)
    big = M * N * K >= 2**30
    t = compare(fns, rounds=5 if not big else 4, reps=3 if not big else 2)
    gf = {k: 2 * M * N * K / s / 1e9 for k, s in t.items()}
    best_ref = max(gf["numpy"], gf.get("torch", 0.0))
    ratio = gf["cpuformer"] / best_ref
    ratios.append(ratio)
    print(f"{name:<24}{v:<4}{gf['cpuformer']:>11.1f}{gf['numpy']:>9.1f}"
          f"{gf.get('torch', float('nan')):>9.1f}{ratio:>8.2f}", flush=True)
print(f"GFLOP/s; ratio = cpuformer / max(numpy, torch). Geometric mean ratio {np.exp(np.mean(np.log(ratios))):.2f}")
