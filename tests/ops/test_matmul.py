"""matmul / gemm against a float64 NumPy reference: every transpose combination, odd/tiny/large shapes, batches,
fused bias, alpha/beta, both SIMD paths, 1 and 2 threads."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import ops
from testutil import SIMD_PATHS, assert_same_in_threads, randn, rel_err

# Sizes around the micro-tile (6x16), the blocking (MC=144, KC=256) and odd values.
SHAPES = [(1, 1, 1), (1, 7, 5), (5, 1, 3), (2, 3, 1), (6, 16, 8), (7, 17, 9), (15, 33, 31), (64, 64, 64),
          (97, 95, 96), (143, 145, 257), (150, 200, 255), (289, 31, 513), (13, 4100, 17),
          (1, 2304, 768), (3, 1000, 333), (4, 70, 1025)]  # M <= 4: the small-M path reads B in place


def ref_matmul(a, b, ta, tb):
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    a64 = np.swapaxes(a64, -1, -2) if ta else a64
    b64 = np.swapaxes(b64, -1, -2) if tb else b64
    return a64 @ b64


def operand(rng, rows, cols, transposed, batch=None):
    shape = (cols, rows) if transposed else (rows, cols)
    return randn(rng, *(((batch,) if batch else ()) + shape))


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_matches_float64_reference(rng, simd, M, N, K, ta, tb):
    a = operand(rng, M, K, ta)
    b = operand(rng, K, N, tb)
    c = ops.matmul(a, b, transpose_a=ta, transpose_b=tb)
    ref = ref_matmul(a, b, ta, tb)
    assert c.shape == (M, N) and c.dtype == np.float32
    # Worst-case float32 summation bound for K-blocked accumulation (KC=256 terms, then K/256 block sums),
    # element by element, relative to |op(a)| @ |op(b)|.
    bound = 2 * (min(K, 256) + K / 256 + 2) * 2.0**-24 * ref_matmul(np.abs(a), np.abs(b), ta, tb)
    err = np.abs(c - ref)
    assert (err <= bound + 1e-30).all(), f"max err/bound {(err / (bound + 1e-30)).max():.3g}"
    assert rel_err(c, ref) < 1e-5


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (31, 47, 300), (300, 70, 20)])
def test_matmul_bias_and_alpha(rng, simd, M, N, K):
    a, b, bias = randn(rng, M, K), randn(rng, N, K), randn(rng, N)
    c = ops.matmul(a, b, transpose_b=True, bias=bias, alpha=0.5)
    ref = 0.5 * ref_matmul(a, b, False, True) + bias
    assert rel_err(c, ref) < 1e-5


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True)])
def test_gemm_accumulates_with_beta(rng, simd, ta, tb):
    M, N, K = 37, 70, 290
    a, b = operand(rng, M, K, ta), operand(rng, K, N, tb)
    out = randn(rng, M, N)
    expected = 2.0 * ref_matmul(a, b, ta, tb) + 0.75 * out.astype(np.float64)
    ops.gemm(a, b, out, transpose_a=ta, transpose_b=tb, alpha=2.0, beta=0.75)
    assert rel_err(out, expected) < 1e-5


def test_gemm_beta_zero_ignores_nan_in_out(rng):
    a, b = randn(rng, 9, 20), randn(rng, 20, 18)
    out = np.full((9, 18), np.nan, np.float32)
    ops.gemm(a, b, out, beta=0.0)
    assert rel_err(out, ref_matmul(a, b, False, False)) < 1e-5


@pytest.mark.parametrize("batch,M,N,K", [(1, 5, 7, 9), (3, 17, 33, 65), (12, 64, 64, 32), (5, 130, 20, 300)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False)])
def test_batched_matmul(rng, simd, threads, batch, M, N, K, ta, tb):
    a = operand(rng, M, K, ta, batch)
    b = operand(rng, K, N, tb, batch)
    c = ops.matmul(a, b, transpose_a=ta, transpose_b=tb)
    assert c.shape == (batch, M, N)
    assert rel_err(c, ref_matmul(a, b, ta, tb)) < 1e-5


def test_batched_broadcasts_a_2d_operand(rng):
    a = randn(rng, 4, 10, 24)
    w = randn(rng, 24, 8)
    assert rel_err(ops.matmul(a, w), ref_matmul(a, w, False, False)) < 1e-5
    assert rel_err(ops.matmul(w.T.copy(), a, transpose_b=True),
                   ref_matmul(w.T.copy(), a, False, True)) < 1e-5


def test_large_square_two_threads_equals_one(rng):
    import cpuformer
    a, b = randn(rng, 700, 600), randn(rng, 600, 650)
    before = cpuformer.get_num_threads()
    try:
        cpuformer.set_num_threads(1)
        c1 = ops.matmul(a, b)
        cpuformer.set_num_threads(2)
        c2 = ops.matmul(a, b)
    finally:
        cpuformer.set_num_threads(before)
    # Each output element is summed in the same order (the K blocking does not depend on threads).
    np.testing.assert_array_equal(c1, c2)
    assert rel_err(c1, ref_matmul(a, b, False, False)) < 1e-5


def test_simd_paths_agree(rng):
    from cpuformer import _core
    a, b = randn(rng, 123, 321), randn(rng, 321, 77)
    _core.set_simd_path("scalar")
    try:
        cs = ops.matmul(a, b)
    finally:
        _core.set_simd_path("auto")
    ca = ops.matmul(a, b)
    assert rel_err(cs, ca) < 1e-5


# Around the AVX-512 12x32 tile (two 6-row A slivers x two 16-wide B slivers), the blocking and the direct/small-M paths.
ODD_SHAPES = [(1, 1, 1), (2, 3, 1), (4, 70, 33), (5, 17, 1), (6, 16, 8), (7, 31, 2), (11, 33, 9), (12, 32, 256),
              (13, 47, 257), (18, 48, 100), (23, 15, 513), (25, 64, 40), (97, 95, 96), (130, 70, 600),
              (145, 97, 300), (289, 31, 513), (300, 4100, 20), (37, 4097, 7), (1, 2304, 768), (3, 1000, 333),
              # x W^T with 5-128 rows, N >= 4M, K >= 128: the AVX-512 path computes C^T = W A^T (gemm_wide_bt)
              (5, 20, 128), (13, 100, 256), (29, 131, 200), (64, 300, 256), (128, 515, 129), (7, 4100, 256),
              (100, 1100, 600)]


@pytest.mark.skipif("avx512" not in SIMD_PATHS, reason="no AVX-512 on this CPU or build")
@pytest.mark.parametrize("threads_", [1, 2])
def test_avx512_gemm_bitwise_equals_avx2(rng, threads_):
    """Same per-element k order and per-6x16-sub-tile write-back arithmetic: identical bits where both paths cut K
    alike (K <= 256). For K > 256 the AVX-512 path packs B in K blocks of 512 (AVX2: 256), so its sums round
    differently: there both paths are held to the float64 reference instead."""
    import cpuformer
    from cpuformer import _core
    before = cpuformer.get_num_threads()
    cpuformer.set_num_threads(threads_)
    try:
        for M, N, K in ODD_SHAPES:
            for ta, tb in [(False, False), (False, True), (True, False), (True, True)]:
                a, b = operand(rng, M, K, ta), operand(rng, K, N, tb)
                bias = randn(rng, N)
                c0 = randn(rng, M, N)
                outs = []
                for path in ("avx2", "avx512"):
                    _core.set_simd_path(path)
                    c = c0.copy()
                    ops.gemm(a, b, c, transpose_a=ta, transpose_b=tb, alpha=0.5, beta=0.75, bias=bias)
                    nan_out = np.full((M, N), np.nan, np.float32)
                    ops.gemm(a, b, nan_out, transpose_a=ta, transpose_b=tb, beta=0.0)
                    outs.append((c, nan_out, ops.matmul(a, b, transpose_a=ta, transpose_b=tb, bias=bias)))
                if K <= 256:
                    for x, y in zip(*outs):
                        np.testing.assert_array_equal(x, y, err_msg=f"{M}x{N}x{K} ta={ta} tb={tb}")
                else:
                    ref = ref_matmul(a, b, ta, tb)
                    for c, nan_out, mm in outs:
                        assert rel_err(c, 0.5 * ref + 0.75 * c0.astype(np.float64) + bias) < 1e-5
                        assert rel_err(nan_out, ref) < 1e-5
                        assert rel_err(mm, ref + bias) < 1e-5
                assert rel_err(outs[1][2], ref_matmul(a, b, ta, tb) + bias) < 1e-5
    finally:
        _core.set_simd_path("auto")
        cpuformer.set_num_threads(before)


@pytest.mark.skipif("avx512" not in SIMD_PATHS, reason="no AVX-512 on this CPU or build")
@pytest.mark.parametrize("threads_", [1, 2])
def test_wide_transposed_b_bitwise_equals_blocked_path(rng, threads_):
    """x W^T with few rows and a wide W is computed as C^T = W A^T (no transpose of W): the same bits as the blocked
    path, which B given untransposed takes (same K blocks of 512, each element written back as it would be there:
    fused inside whole 6x16 tiles, rounded step by step at the edges), for alpha, beta, bias and several K blocks."""
    import cpuformer
    from cpuformer import _core
    before = cpuformer.get_num_threads()
    cpuformer.set_num_threads(threads_)
    _core.set_simd_path("avx512")
    try:
        for M, N, K in [(5, 20, 128), (6, 96, 512), (17, 69, 513), (64, 58101 // 8, 512), (96, 385, 1100),
                        (128, 512, 2048), (61, 4099, 300)]:
            for ta in (False, True):
                a, w = operand(rng, M, K, ta), randn(rng, N, K)
                wt = np.ascontiguousarray(w.T)
                bias, c0 = randn(rng, N), randn(rng, M, N)
                for alpha, beta, b in [(1.0, 0.0, None), (1.0, 0.0, bias), (0.5, 0.75, bias), (-1.25, 1.0, None)]:
                    wide, blocked = c0.copy(), c0.copy()
                    ops.gemm(a, w, wide, transpose_a=ta, transpose_b=True, alpha=alpha, beta=beta, bias=b)
                    ops.gemm(a, wt, blocked, transpose_a=ta, alpha=alpha, beta=beta, bias=b)
                    msg = f"{M}x{N}x{K} ta={ta} alpha={alpha} beta={beta} bias={b is not None}"
                    assert wide.tobytes() == blocked.tobytes(), msg
                    ref = alpha * ref_matmul(a, w, ta, True) + beta * c0.astype(np.float64)
                    assert rel_err(wide, ref + (0 if b is None else b)) < 1e-5, msg
    finally:
        _core.set_simd_path("auto")
        cpuformer.set_num_threads(before)


@pytest.mark.skipif("avx512" not in SIMD_PATHS, reason="no AVX-512 on this CPU or build")
def test_avx512_attention_bitwise_equals_avx2(rng):
    """Attention's products go through the single-thread GEMM entry points (packed key blocks included)."""
    from cpuformer import _core
    q, k, v = randn(rng, 2, 75, 64), randn(rng, 2, 130, 64), randn(rng, 2, 130, 64)
    g = randn(rng, 2, 75, 64)
    outs = []
    try:
        for path in ("avx2", "avx512"):
            _core.set_simd_path(path)
            out, lse = ops.attention(q, k, v, 4, need_lse=True, is_causal=False)
            grads = ops.attention_backward(g, q, k, v, out, lse, 4)
            outs.append((out, lse, *grads))
    finally:
        _core.set_simd_path("auto")
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x, y)


def test_no_copy_for_float32_contiguous_and_conversion_otherwise(rng):
    a64 = rng.standard_normal((8, 5))
    b64 = rng.standard_normal((5, 3))
    assert rel_err(ops.matmul(a64, b64), a64 @ b64) < 1e-5  # float64 input converted
    nc = randn(rng, 5, 8).T  # non-contiguous view converted
    assert rel_err(ops.matmul(nc, b64), nc.astype(np.float64) @ b64) < 1e-5
    assert rel_err(ops.matmul([[1, 2]], [[3], [4]]), np.array([[11.0]])) == 0


def test_matmul_errors(rng):
    a = randn(rng, 4, 5)
    with pytest.raises(ValueError, match=r"inner dimensions differ.*\(4, 5\)"):
        ops.matmul(a, randn(rng, 4, 5))
    with pytest.raises(ValueError, match=r"a must have 2..3 dimensions, got shape \(5,\)"):
        ops.matmul(randn(rng, 5), a)
    with pytest.raises(ValueError, match="zero-size"):
        ops.matmul(np.zeros((0, 5), np.float32), randn(rng, 5, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ops.matmul(randn(rng, 2, 3, 4), randn(rng, 3, 4, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        ops.matmul(a, randn(rng, 5, 3), bias=randn(rng, 4))
    with pytest.raises(TypeError, match="real numbers"):
        ops.matmul(a.astype(np.complex64), a.T)
    with pytest.raises(TypeError, match="real numbers"):
        ops.matmul(np.ones((2, 2), bool), np.ones((2, 2), np.float32))
    with pytest.raises(TypeError):
        ops.matmul("abc", a)
    out = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\)"):
        ops.gemm(a, randn(rng, 5, 3), out)
    with pytest.raises(TypeError, match="float32"):
        ops.gemm(a, randn(rng, 5, 3), np.zeros((4, 3)))
    ro = np.zeros((4, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        ops.gemm(a, randn(rng, 5, 3), ro)
    with pytest.raises(ValueError, match="finite"):
        ops.matmul(a, randn(rng, 5, 3), alpha=float("nan"))


# The "amx" path: float32 operands split exactly into three bf16 terms each, six term products on AMX tiles (for
# products of 128+ rows and columns with 1024+ of either: below that the AVX-512 kernel runs). 96-256 rows with at
# least twice as many columns run swapped, as C^T = op(B)^T op(A)^T written back transposed: (97, 4099, 65) has a
# ragged last 16 rows and columns past one 4080-column panel, (256, 600, 1100) three K blocks, (130, 1025, 100),
# (128, 1024, 64) and (200, 1031, 1025) are swapped too, (1030, 129, 65) and the rest not.
AMX_SHAPES = [(128, 1024, 64), (130, 1025, 100), (1030, 129, 65), (1041, 130, 1100), (200, 1031, 1025),
              (1100, 200, 70), (97, 4099, 65), (256, 600, 1100)]


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("M,N,K", AMX_SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_amx_gemm_alpha_beta_bias(rng, threads, M, N, K, ta, tb):
    from cpuformer import _core
    a, b = operand(rng, M, K, ta), operand(rng, K, N, tb)
    out, bias = randn(rng, M, N), randn(rng, N)
    expected = 0.5 * ref_matmul(a, b, ta, tb) + 0.75 * out.astype(np.float64) + bias
    mag = 0.5 * ref_matmul(np.abs(a), np.abs(b), ta, tb) + 0.75 * np.abs(out) + np.abs(bias)
    _core.set_simd_path("amx")
    try:
        ops.gemm(a, b, out, transpose_a=ta, transpose_b=tb, alpha=0.5, beta=0.75, bias=bias)
    finally:
        _core.set_simd_path("auto")
    err = np.abs(out - expected) / mag
    assert err.max() < 2.0**-21 + 2 * (min(K, 512) + K / 512 + 3) * 2.0**-24, f"{err.max():.3g}"


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("ta", [False, True])
def test_amx_gemm_keeps_float32_precision(rng, ta):
    # Positive operands (errors add up instead of cancelling) over a wide range of magnitudes, 64 terms per output:
    # the float32 products stay within a few 2^-24 of the sum (the AVX-512 kernel's 5e-7 here); leaving out any
    # one of the six term products shows as 1.3e-5 or more, rounding an operand to bf16 as far more.
    from cpuformer import _core
    a = (np.abs(rng.standard_normal((1024, 64))) * np.exp(rng.uniform(-20, 20, (1024, 1)))).astype(np.float32)
    b = (np.abs(rng.standard_normal((64, 160))) * np.exp(rng.uniform(-20, 20, (1, 160)))).astype(np.float32)
    _core.set_simd_path("amx")
    try:
        c = ops.matmul(np.ascontiguousarray(a.T) if ta else a, b, transpose_a=ta)
    finally:
        _core.set_simd_path("auto")
    ref = ref_matmul(a, b, False, False)
    assert (np.abs(c - ref) / ref).max() < 2.0**-19


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("M,N,tb", [(1030, 140, False), (130, 700, True)], ids=["blocked", "swapped"])
def test_amx_gemm_non_finite_like_avx512(rng, M, N, tb):
    from cpuformer import _core
    a, b = randn(rng, M, 90), randn(rng, 90, N)
    a[3, 4], a[10, 0], a[20, 89] = np.inf, -np.inf, np.nan
    b[5, 7], b[0, 139], b[1, 139] = np.nan, np.inf, np.inf
    a[30, :] = 0.0  # 0 x inf = NaN in both
    if tb:  # x W^T of 130 rows: the swapped product
        b = np.ascontiguousarray(b.T)
    outs = {}
    for path in ("amx", "avx512"):
        _core.set_simd_path(path)
        try:
            outs[path] = ops.matmul(a, b, transpose_b=tb)
        finally:
            _core.set_simd_path("auto")
    np.testing.assert_array_equal(np.isnan(outs["amx"]), np.isnan(outs["avx512"]))
    np.testing.assert_array_equal(np.isinf(outs["amx"]), np.isinf(outs["avx512"]))
    fine = np.isfinite(outs["avx512"])
    assert rel_err(outs["amx"][fine], outs["avx512"][fine]) < 1e-5


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("M,N,K", [(97, 4099, 1100), (128, 384, 384), (120, 2000, 96), (256, 515, 530)])
def test_amx_swapped_packed_panels_keep_the_float_bits(rng, threads, M, N, K):
    """x W^T of 96-256 rows runs swapped (W's rows split in place, x^T packed, C written back transposed). Weights
    packed once (sgemm_pack_b's panels, read back as W's rows) give sgemm's bits: without AMX tiles at every row
    count, and with them below 128 rows (where the tiles are not used). Each K block and panel boundary is crossed."""
    from cpuformer import _core
    x, w, bias = randn(rng, M, K), randn(rng, N, K), randn(rng, N)
    _core.set_simd_path("amx")
    try:
        want = ops.matmul(x, w, transpose_b=True, bias=bias)
        for amx_tiles in (False, True):
            got = np.full((M, N), np.nan, np.float32)
            _core.linear_packed(x, _core.pack_linear_weight(w, amx_tiles), bias, got)
            if amx_tiles and M >= 128:
                assert rel_err(got, want) < 1e-5
            else:
                assert got.tobytes() == want.tobytes(), f"amx_tiles={amx_tiles}"
    finally:
        _core.set_simd_path("auto")
    ref = ref_matmul(x, w, False, True) + bias
    mag = ref_matmul(np.abs(x), np.abs(w), False, True) + np.abs(bias)
    assert (np.abs(want - ref) / mag).max() < 2.0**-21 + 2 * (min(K, 512) + K / 512 + 3) * 2.0**-24


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
def test_amx_products_from_many_threads(rng):
    """Callers on several threads at once (each with its own tile configuration and scratch) get their serial
    results: float32 GEMMs above the AMX threshold (130-151 rows against 1030+ columns: swapped), bf16-weight and
    int8 products of 16+ rows, and x W^T of a few rows as C^T = W A^T."""
    from cpuformer import _core
    runs = []
    for i in range(4):
        a, b = randn(rng, 130 + 7 * i, 96), randn(rng, 1030 + 5 * i, 96)
        h = _core.float_to_half(randn(rng, 70 + i, 200), "bf16")
        x = randn(rng, 20 + i, 200)
        q = _core.quantize_weight_int8(randn(rng, 50 + i, 200))
        w = randn(rng, 300 + 9 * i, 200)
        runs.append(lambda a=a, b=b, h=h, x=x, q=q, w=w: (
            ops.matmul(a, b, transpose_b=True), _core.linear_half(x, h, None, "bf16"),
            _core.linear_int8(x, q, None), ops.matmul(x, w, transpose_b=True)))
    assert_same_in_threads(runs)
