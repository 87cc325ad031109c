"""The package imports, reports its build, and manages threads."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest

import cpuformer
from cpuformer import _core, ops


def test_build_info_fields():
    info = cpuformer.build_info()
    assert set(info) >= {"version", "compiler", "openmp", "simd", "num_threads"}
    assert info["simd"] in ("amx", "avx512", "avx2", "scalar")
    assert info["simd_compiled"] in ("amx+avx512+avx2+scalar", "avx512+avx2+scalar", "avx2+scalar", "scalar")
    assert info["cpu_amx"] in (True, False) and (not info["cpu_amx"] or info["cpu_avx512"])
    assert isinstance(info["openmp"], bool)
    assert info["num_threads"] == cpuformer.get_num_threads() >= 1
    assert cpuformer.__version__ == info["version"]


def test_set_num_threads_roundtrip_and_errors():
    before = cpuformer.get_num_threads()
    try:
        cpuformer.set_num_threads(1)
        assert cpuformer.get_num_threads() == 1
        assert cpuformer.build_info()["num_threads"] == 1
        cpuformer.set_num_threads(3)
        assert cpuformer.get_num_threads() == 3
    finally:
        cpuformer.set_num_threads(before)
    with pytest.raises(ValueError, match="n must be >= 1"):
        cpuformer.set_num_threads(0)
    with pytest.raises(TypeError):
        cpuformer.set_num_threads(1.5)


def test_omp_num_threads_is_honoured():
    code = "import cpuformer; print(cpuformer.get_num_threads())"
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_simd_env_var_forces_scalar():
    code = "import cpuformer; print(cpuformer.build_info()['simd'])"
    env = dict(os.environ, CPUFORMER_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_simd_env_var_caps_at_avx2():
    if not cpuformer.build_info()["cpu_avx2_fma"] or cpuformer.build_info()["simd_compiled"] == "scalar":
        pytest.skip("no AVX2 on this CPU or build")
    code = "import cpuformer; print(cpuformer.build_info()['simd'])"
    env = dict(os.environ, CPUFORMER_SIMD="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "avx2"


def test_default_simd_path_is_the_best_available():
    info = cpuformer.build_info()
    code = "import cpuformer; print(cpuformer.build_info()['simd'])"
    env = {k: v for k, v in os.environ.items() if k != "CPUFORMER_SIMD"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if info["cpu_amx"] and "amx" in info["simd_compiled"]:
        expected = "amx"
    elif info["cpu_avx512"] and "avx512" in info["simd_compiled"]:
        expected = "avx512"
    elif info["cpu_avx2_fma"] and info["simd_compiled"] != "scalar":
        expected = "avx2"
    else:
        expected = "scalar"
    assert out.stdout.strip() == expected


def test_set_simd_path_avx512():
    info = cpuformer.build_info()
    try:
        if info["cpu_avx512"] and "avx512" in info["simd_compiled"]:
            _core.set_simd_path("avx512")
            assert _core.get_simd_path() == cpuformer.build_info()["simd"] == "avx512"
            _core.set_simd_path("avx2")
            assert _core.get_simd_path() == "avx2"
        else:
            with pytest.raises(ValueError, match="AVX-512"):
                _core.set_simd_path("avx512")
    finally:
        _core.set_simd_path("auto")


def test_set_simd_path_amx_and_env_cap():
    info = cpuformer.build_info()
    try:
        if info["cpu_amx"] and "amx" in info["simd_compiled"]:
            _core.set_simd_path("amx")
            assert _core.get_simd_path() == cpuformer.build_info()["simd"] == "amx"
            code = "import cpuformer; print(cpuformer.build_info()['simd'])"
            env = dict(os.environ, CPUFORMER_SIMD="avx512")
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            assert out.stdout.strip() == "avx512"
        else:
            with pytest.raises(ValueError, match="AMX"):
                _core.set_simd_path("amx")
    finally:
        _core.set_simd_path("auto")


def test_set_simd_path_rejects_unknown():
    with pytest.raises(ValueError, match="path must be"):
        _core.set_simd_path("sse9")


def test_import_leaves_subnormals_alone():
    # A -ffast-math build would set FTZ/DAZ process-wide at load time.
    assert np.finfo(np.float32).smallest_subnormal > 0
    assert np.float32(1e-45) > 0


def _child_matmul(q):
    a = np.ones((256, 256), np.float32)
    q.put(float(ops.matmul(a, a)[0, 0]))


def test_fork_after_threads_does_not_hang():
    # libgomp's pool does not survive fork(): the child must fall back to one thread instead of hanging.
    a = np.ones((512, 512), np.float32)
    ops.matmul(a, a)  # start the parent's thread pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_matmul, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("forked child hung in a threaded kernel")
    assert q.get(timeout=5) == 256.0


def test_kernels_release_the_gil():
    # While one thread is inside a long kernel, another Python thread must keep running (it could not if the
    # kernel held the GIL).
    import threading
    a = np.ones((1024, 1024), np.float32)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        progressed = 0
        for _ in range(5):
            before = counter[0]
            ops.matmul(a, a)  # tens of milliseconds
            progressed = max(progressed, counter[0] - before)
    finally:
        stop.set()
        t.join()
    assert progressed > 1000
