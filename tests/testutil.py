"""Helpers shared by the test modules (import them from here: ``from testutil import assert_close``; a test directory
with its own conftest.py would shadow ``from conftest import ...``): the SIMD paths of this machine and build, random
data, tolerances."""
from __future__ import annotations

import numpy as np

import cpuformer

_INFO = cpuformer.build_info()
# Every path this machine and build have: "amx" (float32 and bf16-weight products on AMX tiles) and "avx512" (the
# GEMM's AVX-512 kernel, AVX2 elsewhere) where the CPU offers them.
SIMD_PATHS = (["amx"] if _INFO.get("cpu_amx") and "amx" in _INFO["simd_compiled"] else []) + \
    (["avx512"] if _INFO.get("cpu_avx512") and "avx512" in _INFO["simd_compiled"] else []) + \
    (["avx2", "scalar"] if _INFO["cpu_avx2_fma"] and _INFO["simd_compiled"] != "scalar" else ["scalar"])

def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bad = err > atol + rtol * np.abs(expected)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements off; max abs err {err.max():.3g}, "
                           f"max rel err {(err / (np.abs(expected) + 1e-30)).max():.3g}")


def rel_err(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


def assert_same_in_threads(runs, repeats=10, expected=None):
    """Each zero-argument callable in ``runs`` (returning an array or a tuple of arrays), called on its own thread
    ``repeats`` times while the others run, returns what it returned when called alone; or, given ``expected``
    (one result per run), returns that from its very first call, the threads starting together."""
    import threading
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    start = threading.Barrier(len(runs)) if expected is not None else None
    expected = [as_tuple(run()) for run in runs] if expected is None else [as_tuple(e) for e in expected]
    errors = []

    def work(i):
        if start is not None:
            start.wait()
        for _ in range(repeats):
            if not all(np.array_equal(g, e) for g, e in zip(as_tuple(runs[i]()), expected[i])):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"calls {sorted(set(errors))} differed from their serial results"
