"""python -m cpuformer <command>: see cpuformer.cli (``info`` prints the build and self-checks the kernels)."""
from __future__ import annotations

import time

import numpy as np

import cpuformer
from cpuformer import ops


def info() -> int:
    for key, value in cpuformer.build_info().items():
        print(f"{key:>14}: {value}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 384)).astype(np.float32)
    b = rng.standard_normal((384, 640)).astype(np.float32)
    c = ops.matmul(a, b)
    err = np.abs(c - a.astype(np.float64) @ b).max()
    ops.matmul(a, b)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        ops.matmul(a, b)
    dt = (time.perf_counter() - t0) / reps
    print(f"   self-check: matmul 512x384 @ 384x640 max abs error {err:.2e}, {2 * 512 * 384 * 640 / dt / 1e9:.0f} GFLOP/s")
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    from .cli import main
    raise SystemExit(main())
