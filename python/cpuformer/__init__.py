"""cpuformer: a CPU-only Transformer library with a C++17 / OpenMP / AVX2 core.

The arithmetic lives in the compiled extension ``cpuformer._core``; this package gives the Python API:
``cpuformer.ops`` (functional kernels, forward and backward) and ``cpuformer.nn`` (layers with PyTorch's names).
"""
from __future__ import annotations

import os as _os

# libgomp's threads spin for ~300,000 iterations (10-30 ms) after each parallel region before sleeping. When the
# cores are shared with other work, a spinning thread holds the core its descheduled partner needs, and every
# barrier stalls for a time slice (measured: a small GPT step took 304 ms instead of 5 ms). A short spin keeps
# back-to-back kernels fast and degrades gracefully under load: 30,000 keeps the threads awake between a forward's
# kernels (a MiniLM int8 batch-1 call: 5-7 ms; at 1000 they slept and every region paid a wake-up, 11 ms; at 5000
# some did, 5-23 ms) and costs 2x beside a process that keeps a core busy (21 ms against 11; the README has the
# figures). libgomp reads this once, when it is loaded: set before our extension loads it; a user's own
# GOMP_SPINCOUNT / OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from . import _core, data, io, models, nn, ops, plot, train
from ._core import get_num_threads
from .nn.module import is_grad_enabled, no_grad
from .nn.quantized import freeze, quantize_dynamic
from .serialization import load, save
from .tokenizer import Tokenizer
from .bpe import train_bpe
from . import pipelines
from .pipelines import pipeline

__version__ = _core.build_info()["version"]

__all__ = ["ops", "nn", "models", "train", "data", "io", "save", "load", "quantize_dynamic", "freeze", "Tokenizer",
           "train_bpe", "pipeline", "pipelines", "build_info", "set_num_threads", "get_num_threads", "no_grad",
           "is_grad_enabled", "__version__"]


def build_info() -> dict:
    """What this build is and how it runs: ``version``, ``compiler``, ``openmp`` (bool), ``simd`` (the path in
    use: ``"amx"`` (``"avx512"`` plus AMX tiles for large float32 and bf16-weight products), ``"avx512"`` (the
    GEMM's AVX-512 kernel; every other kernel runs AVX2), ``"avx2"`` or ``"scalar"``), ``simd_compiled``
    (``"amx+avx512+avx2+scalar"``, ``"avx512+avx2+scalar"``, ``"avx2+scalar"`` or ``"scalar"``), ``cpu_avx2_fma``,
    ``cpu_avx512``, ``cpu_amx``, ``int8_kernel`` (the int8 Linear kernel in use: ``"amx"``, ``"avx512vnni"``, ``"avxvnni"``, ``"avx2"`` or
    ``"scalar"``) and ``num_threads``."""
    return _core.build_info()


def set_num_threads(n: int) -> None:
    """Set the number of threads every cpuformer kernel uses (default: ``OMP_NUM_THREADS`` if set, else the CPUs
    this process may run on). Does not change other libraries' thread pools."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _core.set_num_threads(n)
