"""int8 dynamic quantization kernels against a float64 NumPy model of the same scheme (quantize.h)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import cpuformer
from cpuformer import _core

from testutil import SIMD_PATHS, assert_same_in_threads, rel_err


def ref_weight(w):
    scale = np.abs(w).max(axis=1) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127)
    return q, scale


def ref_rows(x):
    lo = np.minimum(x.min(axis=1), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=1), 0).astype(np.float32)
    scale = ((hi - lo) / np.float32(127)).astype(np.float32)
    zero_rows = ~(scale >= 1e-30)
    scale[zero_rows] = 1
    inv = (np.float32(1) / scale).astype(np.float32)
    inv[zero_rows] = 0
    zp = np.clip(np.rint(-lo * inv), 0, 127)
    q = np.clip(np.rint((x * inv[:, None]).astype(np.float32)) + zp[:, None], 0, 127)
    return q, scale, zp


def ref_linear(x, w, b):
    """The exact integer product of quantize.h, dequantized in float64."""
    qw, sw = ref_weight(w)
    qa, sa, za = ref_rows(x)
    acc = qa.astype(np.float64) @ qw.T.astype(np.float64) - za[:, None] * qw.sum(axis=1)[None, :]
    y = acc * (sa[:, None].astype(np.float64) * sw[None, :].astype(np.float64))
    return y if b is None else y + b


SHAPES = [(1, 1, 1), (1, 3, 5), (2, 4, 16), (3, 5, 17), (4, 16, 16), (5, 33, 31), (7, 64, 40), (9, 100, 3),
          (64, 768, 96), (130, 257, 66)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_int8_matches_reference(simd, threads, rng, M, K, N, with_bias):
    x = rng.standard_normal((M, K)).astype(np.float32) * 2 + 0.3
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw = _core.quantize_weight_int8(w)
    y = _core.linear_int8(x, qw, b)
    expected = ref_linear(x, w, b)
    assert y.shape == (M, N) and y.dtype == np.float32
    # int32 accumulation is exact; only the float32 dequantization rounds
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-6 * np.abs(expected).max())
    # and the quantization error against float32 is bounded (7-bit activations, 8-bit weights)
    assert rel_err(y, x.astype(np.float64) @ w.T.astype(np.float64) + (0 if b is None else b)) < 0.05


def test_weight_values_and_scales(rng):
    w = rng.standard_normal((19, 23)).astype(np.float32)
    w[3] = 0.0  # an all-zero channel quantizes to zeros with scale 1
    qw = _core.quantize_weight_int8(w)
    q, scale = ref_weight(w)
    np.testing.assert_array_equal(qw.values(), q.astype(np.int8))
    np.testing.assert_array_equal(qw.scale, scale)
    assert (qw.out_features, qw.in_features) == (19, 23)
    assert np.abs(qw.values()).max() == 127
    assert qw.nbytes < w.nbytes  # int8 panels (padded) + per-channel scale and column sum


@pytest.mark.parametrize("N,K", [(1, 1), (37, 5), (16, 17), (33, 100), (300, 129)])
def test_weight_quantization_on_every_path(simd, threads, rng, N, K):
    """The weight quantizer (16 weights at a time on AVX-512, row by row elsewhere; panels split over threads)
    gives the reference's values and scales on every path: exact ties round to even, all-zero rows get scale 1."""
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[0, 0] = 127.0  # scale 1 for row 0: its ties are exact
    if K >= 5:
        w[0, 1:5] = [2.5, -3.5, 0.5, -126.5]
    if N > 3:
        w[3] = 0.0
    qw = _core.quantize_weight_int8(w)
    q, scale = ref_weight(w)
    np.testing.assert_array_equal(qw.values(), q.astype(np.int8))
    np.testing.assert_array_equal(qw.scale, scale)
    if K >= 5:
        np.testing.assert_array_equal(qw.values()[0, 1:5], [2, -4, 0, -126])


def test_row_quantization(simd, rng):
    x = rng.standard_normal((6, 45)).astype(np.float32)
    x[1] = 0.0
    x[2] = np.abs(x[2])  # all positive: zero point 0
    x[3] = -np.abs(x[3])  # all negative: zero point 127
    q, scale, zp = _core.quantize_rows_u7(x)
    rq, rs, rz = ref_rows(x)
    np.testing.assert_array_equal(q, rq.astype(np.uint8))
    np.testing.assert_array_equal(scale, rs)
    np.testing.assert_array_equal(zp, rz.astype(np.int32))
    assert q.max() <= 127 and zp[2] == 0 and zp[3] == 127 and (q[1] == 0).all()
    # dequantizing recovers x within half a step
    back = scale[:, None] * (q.astype(np.float32) - zp[:, None])
    assert (np.abs(back - x) <= scale[:, None] * 0.5 + 1e-6).all()


INT8_KERNELS = _core.int8_kernels()  # this CPU's, fastest first; every one must give the same bits


@pytest.fixture(params=INT8_KERNELS)
def int8_kernel(request):
    """Run the test once per int8 kernel this CPU has (under the AVX2 SIMD path where there is one)."""
    _core.set_simd_path(SIMD_PATHS[0])
    _core.set_int8_kernel(request.param)
    assert _core.int8_kernel() == (request.param if SIMD_PATHS[0] != "scalar" else "scalar")
    yield request.param
    _core.set_int8_kernel("auto")
    _core.set_simd_path("auto")


def _on_kernel(name, fn):
    _core.set_int8_kernel(name)
    try:
        return fn()
    finally:
        _core.set_int8_kernel("auto")


def test_paths_and_threads_agree(rng):
    x = rng.standard_normal((37, 200)).astype(np.float32)
    w = rng.standard_normal((45, 200)).astype(np.float32)
    qw = _core.quantize_weight_int8(w)
    outs = []
    before = cpuformer.get_num_threads()
    for path in SIMD_PATHS:
        _core.set_simd_path(path)
        for kernel in INT8_KERNELS:
            _core.set_int8_kernel(kernel)
            for t in (1, 2):
                cpuformer.set_num_threads(t)
                outs.append(_core.linear_int8(x, qw, None))
    _core.set_int8_kernel("auto")
    _core.set_simd_path("auto")
    cpuformer.set_num_threads(before)
    assert len(outs) == 2 * len(SIMD_PATHS) * len(INT8_KERNELS)
    for o in outs[1:]:  # exact int32 sums, the same float dequantization: the same bits on every path
        np.testing.assert_array_equal(o, outs[0])


def _odd_case(rng, M, K, N):
    x = (rng.standard_normal((M, K)) * rng.uniform(0.01, 30)).astype(np.float32)
    if M > 3:
        x[rng.integers(0, M)] = 0.0  # a zero row: scale 1, every q 0
        x[rng.integers(0, M)] = np.abs(x[0])  # all positive: zero point 0
    if M > 6:
        x[rng.integers(0, M), rng.integers(0, K)] = np.nan
        x[rng.integers(0, M), rng.integers(0, K)] = -np.inf
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[rng.integers(0, N)] = 0.0
    b = rng.standard_normal(N).astype(np.float32) if rng.integers(0, 2) else None
    return x, w, b


def test_int8_kernels_bitwise_equal_on_odd_shapes(rng, threads):
    """Every int8 kernel (AVX-512 VNNI, AVX-VNNI, AVX2, scalar) gives the scalar path's bits: M = 1..37 (every row
    remainder of the 4- and 8-row tiles), N off multiples of 16 and 32, K off multiples of 4 and of 8 groups, NaN,
    Inf and zero rows; the row quantization too."""
    shapes = [(M, int(rng.integers(1, 70)), int(rng.integers(1, 90))) for M in range(1, 38)]
    shapes += [(1, 3072, 33), (2, 769, 3072), (3, 1023, 47), (8, 767, 100), (9, 5, 31), (16, 2, 17), (1, 1, 1)]
    for M, K, N in shapes:
        x, w, b = _odd_case(rng, M, K, N)
        qw = _core.quantize_weight_int8(w)
        ref = _on_kernel("scalar", lambda: (_core.linear_int8(x, qw, b), _core.quantize_rows_u7(x)))
        bad = ~np.isfinite(x).all(axis=1)
        assert np.isnan(ref[0][bad]).all() and np.isfinite(ref[0][~bad]).all()
        for kernel in INT8_KERNELS:
            got = _on_kernel(kernel, lambda: (_core.linear_int8(x, qw, b), _core.quantize_rows_u7(x)))
            np.testing.assert_array_equal(got[0], ref[0], err_msg=f"{kernel} M={M} K={K} N={N}")
            for g, r in zip(got[1], ref[1]):
                np.testing.assert_array_equal(g, r, err_msg=f"{kernel} rows M={M} K={K}")


def test_int8_kernels_bitwise_equal_on_tile_shapes(rng, threads):
    """Shapes around the AMX kernel's tiles (16 and 32 rows, 16 and 32 columns, 64-k steps and their tails): every
    kernel still gives the scalar kernel's bits, with NaN/Inf and zero rows among the rows."""
    shapes = [(M, K, N) for M in (15, 16, 17, 31, 32, 33, 47, 64, 100) for K, N in
              ((int(rng.choice([4, 60, 63, 64, 65, 127, 128, 200, 384, 1031])), int(rng.choice([1, 16, 17, 32, 33, 95]))),)]
    shapes += [(130, 384, 384), (64, 1536, 100), (40, 64, 48), (33, 66, 31)]
    for M, K, N in shapes:
        x, w, b = _odd_case(rng, M, K, N)
        qw = _core.quantize_weight_int8(w)
        ref = _on_kernel("scalar", lambda: _core.linear_int8(x, qw, b))
        for kernel in INT8_KERNELS:
            got = _on_kernel(kernel, lambda: _core.linear_int8(x, qw, b))
            np.testing.assert_array_equal(got, ref, err_msg=f"{kernel} M={M} K={K} N={N}")


def test_int8_kernel_matches_reference(int8_kernel, rng):
    for M, K, N in [(1, 37, 50), (11, 130, 33), (33, 64, 64)]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        y = _core.linear_int8(x, _core.quantize_weight_int8(w), b)
        expected = ref_linear(x, w, b)
        np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-6 * np.abs(expected).max())


def test_int8_kernel_choice():
    names = _core.int8_kernels()
    assert names[-1] == "scalar" and set(names) <= {"amx", "avx512vnni", "avxvnni", "avx2", "scalar"}
    assert cpuformer.build_info()["int8_kernel"] == _core.int8_kernel()
    try:
        _core.set_simd_path("scalar")  # the scalar SIMD path wins over any int8 choice
        for name in names:
            _core.set_int8_kernel(name)
            assert _core.int8_kernel() == "scalar"
        _core.set_simd_path("auto")
        for name in names:
            _core.set_int8_kernel(name)
            assert _core.int8_kernel() == (name if cpuformer.build_info()["simd"] != "scalar" else "scalar")
        if "avx512vnni" in names:
            _core.set_int8_kernel("vnni")
            assert _core.int8_kernel() == "avx512vnni"
        _core.set_int8_kernel("auto")
        assert _core.int8_kernel() == (names[0] if cpuformer.build_info()["simd"] != "scalar" else "scalar")
        with pytest.raises(ValueError, match="must be 'auto'"):
            _core.set_int8_kernel("avx1024")
        for missing in {"amx", "avx512vnni", "avxvnni", "avx2"} - set(names):
            with pytest.raises(ValueError, match="lacks"):
                _core.set_int8_kernel(missing)
    finally:
        _core.set_int8_kernel("auto")
        _core.set_simd_path("auto")


@pytest.mark.parametrize("env,expected", [({"CPUFORMER_INT8": "avx2"}, "avx2"), ({"CPUFORMER_INT8": "scalar"}, "scalar"),
                                          ({"CPUFORMER_INT8": "bogus"}, "auto"), ({"CPUFORMER_SIMD": "scalar"}, "scalar"),
                                          ({"CPUFORMER_INT8": "vnni", "CPUFORMER_SIMD": "scalar"}, "scalar")])
def test_int8_kernel_environment(env, expected):
    names = _core.int8_kernels()
    if SIMD_PATHS[0] == "scalar":
        expected = "scalar"
    elif expected == "auto":
        expected = names[0]
    elif expected not in names:
        expected = names[0]  # unavailable here: ignored
    code = "from cpuformer import _core; print(_core.int8_kernel())"
    clean = {k: v for k, v in os.environ.items() if k not in ("CPUFORMER_INT8", "CPUFORMER_SIMD")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expected


def test_batched_input_and_deepcopy(rng):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    qw = _core.quantize_weight_int8(w)
    y = _core.linear_int8(x, qw)
    assert y.shape == (2, 3, 5)
    np.testing.assert_array_equal(y.reshape(6, 5), _core.linear_int8(x.reshape(6, 8), qw))
    q2 = copy.deepcopy(qw)
    np.testing.assert_array_equal(q2.values(), qw.values())
    np.testing.assert_array_equal(_core.linear_int8(x, q2), y)


def test_nonfinite_rows_give_nan(int8_kernel, rng):
    x = rng.standard_normal((4, 20)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 0] = np.inf
    qw = _core.quantize_weight_int8(rng.standard_normal((7, 20)).astype(np.float32))
    y = _core.linear_int8(x, qw)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    assert np.isfinite(y[[0, 3]]).all()


def test_bad_input(rng):
    w = rng.standard_normal((4, 6)).astype(np.float32)
    qw = _core.quantize_weight_int8(w)
    with pytest.raises(ValueError, match="in_features 6"):
        _core.linear_int8(np.zeros((2, 5), np.float32), qw)
    with pytest.raises(TypeError, match="float32"):
        _core.linear_int8(np.zeros((2, 6), np.float64), qw)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        _core.linear_int8(np.zeros((2, 6), np.float32), qw, np.zeros(3, np.float32))
    x = rng.standard_normal((3, 6)).astype(np.float32)
    out = np.full((3, 4), np.nan, np.float32)  # an out buffer: written over, same bits as a fresh result
    assert _core.linear_int8(x, qw, None, out) is out
    np.testing.assert_array_equal(out, _core.linear_int8(x, qw))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\)"):
        _core.linear_int8(x, qw, None, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        wide = np.zeros((3, 6), np.float32)
        _core.linear_packed(wide, _core.pack_linear_weight(np.zeros((6, 6), np.float32)), None, wide)
    with pytest.raises(ValueError, match="not finite"):
        bad = w.copy()
        bad[2, 1] = np.nan
        _core.quantize_weight_int8(bad)
    big = rng.standard_normal((1000, 129)).astype(np.float32)  # rows checked on both threads: the first is named
    big[950, 7], big[960, 0], big[700, 128] = np.inf, np.nan, -np.inf
    with pytest.raises(ValueError, match=r"weight\[700, 128\] is not finite"):
        _core.quantize_weight_int8(big)
    with pytest.raises(ValueError, match="dimensions"):
        _core.quantize_weight_int8(np.zeros(6, np.float32))


def test_releases_gil(rng):
    x = rng.standard_normal((1024, 1024)).astype(np.float32)
    qw = _core.quantize_weight_int8(rng.standard_normal((1024, 1024)).astype(np.float32))
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)

    t = threading.Thread(target=spin)
    t.start()
    try:
        for _ in range(3):
            _core.linear_int8(x, qw)
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 10


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 3, 2), (7, 300, 33), (64, 257, 4100), (130, 1000, 70),
                                   (300, 4100, 20), (128, 96, 4200), (1030, 129, 65), (200, 1025, 1100)])
def test_packed_weight_matches_matmul(simd, threads, rng, M, K, N):
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed = _core.pack_linear_weight(w)
    assert (packed.in_features, packed.out_features) == (K, N)
    y = _core.linear_packed(x, packed, b)
    expected = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert rel_err(y, expected) < 1e-5
    # The same panels and kernel as an unpacked product (on the amx path, the same tiles): the same bits; except
    # where the amx path splits the packed weight once and runs the tiles at 128 rows or more, whatever the width
    # (test_packed_weight_split_once_on_amx), where an unpacked product of that shape may take the AVX-512 kernel.
    if M > 4 and not (simd == "amx" and M >= 128 and min(N, K) >= 32):
        np.testing.assert_array_equal(y, _core.matmul(x, w, transpose_b=True, bias=b))
    with pytest.raises(ValueError, match=f"in_features {K}"):
        _core.linear_packed(np.zeros((2, K + 1), np.float32), packed)
    out = np.full((M, N), np.nan, np.float32)  # a reused buffer: written over, same bits
    assert _core.linear_packed(x, packed, b, out) is out
    np.testing.assert_array_equal(out, y)


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("M,K,N", [(128, 32, 32), (130, 1000, 70), (1030, 129, 65), (128, 384, 1536),
                                   (200, 1100, 33), (129, 40, 1025), (127, 384, 384)])
def test_packed_weight_split_once_on_amx(threads, rng, M, K, N):
    """On the amx path a packed weight is split into AMX tile terms at its first product of 128+ rows and kept:
    float32 precision (as the per-call split's products), the same bits on later calls, at either thread count,
    and for rows the AVX-512 kernel still computes (127) as before."""
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    _core.set_simd_path("amx")
    try:
        packed = _core.pack_linear_weight(w)
        y = _core.linear_packed(x, packed, b)
        again = _core.linear_packed(x, packed, b)
        before = cpuformer.get_num_threads()
        cpuformer.set_num_threads(3 - threads)
        try:
            other_threads = _core.linear_packed(x, packed, b)
        finally:
            cpuformer.set_num_threads(before)
        fresh = _core.linear_packed(x, _core.pack_linear_weight(w), b)
        unpacked = _core.matmul(x, w, transpose_b=True, bias=b)
    finally:
        _core.set_simd_path("auto")
    expected = x.astype(np.float64) @ w.T.astype(np.float64) + b
    mag = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64) + np.abs(b)
    err = np.abs(y - expected) / mag
    assert err.max() < 2.0**-21 + 2 * (min(K, 512) + K / 512 + 3) * 2.0**-24, f"{err.max():.3g}"
    for other in (again, other_threads, fresh):
        np.testing.assert_array_equal(other, y)
    if M < 128:
        np.testing.assert_array_equal(y, unpacked)


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
def test_packed_weight_first_split_from_many_threads(rng):
    """Threads whose first products with one packed weight start together (one splits it, the others wait for
    it) get the serial result, every call."""
    x = [rng.standard_normal((130 + 9 * i, 200)).astype(np.float32) for i in range(4)]
    w = rng.standard_normal((300, 200)).astype(np.float32)
    _core.set_simd_path("amx")
    try:
        serial = _core.pack_linear_weight(w)
        expected = [_core.linear_packed(xi, serial) for xi in x]
        for _ in range(3):
            shared = _core.pack_linear_weight(w)
            assert_same_in_threads([lambda xi=xi: _core.linear_packed(xi, shared) for xi in x], 5, expected)
    finally:
        _core.set_simd_path("auto")
