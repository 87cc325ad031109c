"""cpuformer: a CPU-only Transformer library with a C++17 / OpenMP / AVX2 core.

The arithmetic lives in the compiled extension ``cpuformer._core``; this package gives the Python API:
``cpuformer.ops`` (functional kernels, forward and backward) and ``cpuformer.nn`` (layers with PyTorch's names).
"""
from __future__ import annotations

from . import _core, data, io, models, nn, ops, plot, train
from ._core import get_num_threads

__version__ = _core.build_info()["version"]

__all__ = ["ops", "nn", "models", "train", "data", "io", "build_info", "set_num_threads", "get_num_threads", "__version__"]


def build_info() -> dict:
    """What this build is and how it runs: ``version``, ``compiler``, ``openmp`` (bool), ``simd`` (the path in
    use: ``"avx2"`` or ``"scalar"``), ``simd_compiled``, ``cpu_avx2_fma`` and ``num_threads``."""
    return _core.build_info()


def set_num_threads(n: int) -> None:
    """Set the number of threads every cpuformer kernel uses (default: ``OMP_NUM_THREADS`` if set, else the CPUs
    this process may run on). Does not change other libraries' thread pools."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _core.set_num_threads(n)
