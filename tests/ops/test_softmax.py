"""softmax / log-softmax forward and backward against float64 references."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import ops
from testutil import assert_close, randn

SHAPES = [(1,), (1, 1), (3, 7), (5, 8), (2, 3, 17), (64, 1000), (4, 50257)]


def ref_softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_forward_backward(rng, simd, threads, shape):
    x = randn(rng, *shape, scale=3.0)
    y = ops.softmax(x)
    ref = ref_softmax(x)
    assert_close(y, ref, rtol=1e-5, atol=1e-7, what="softmax")
    dy = randn(rng, *shape)
    dx = ops.softmax_backward(dy, y)
    ref_dx = ref * (dy - (ref * dy).sum(-1, keepdims=True))
    assert_close(dx, ref_dx, rtol=1e-4, atol=1e-6, what="softmax backward")


@pytest.mark.parametrize("shape", SHAPES)
def test_log_softmax_forward_backward(rng, simd, threads, shape):
    x = randn(rng, *shape, scale=3.0)
    y = ops.log_softmax(x)
    ref = np.log(ref_softmax(x))
    assert_close(y, ref, rtol=1e-5, atol=1e-5, what="log_softmax")
    dy = randn(rng, *shape)
    dx = ops.log_softmax_backward(dy, y)
    ref_dx = dy - np.exp(ref) * dy.astype(np.float64).sum(-1, keepdims=True)
    assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5, what="log_softmax backward")


def test_softmax_is_stable_for_large_logits(simd):
    x = np.array([[1000.0, 1000.0, -1000.0], [-1e30, 0.0, 88.0]], np.float32)
    y = ops.softmax(x)
    assert np.isfinite(y).all()
    assert_close(y, ref_softmax(x), atol=1e-7)


def test_fully_masked_row_gives_zeros(simd):
    x = np.array([[-np.inf] * 9, [0.0, -np.inf, 1.0, -np.inf, -np.inf, 2.0, 0.5, -np.inf, 0.0]], np.float32)
    y = ops.softmax(x)
    assert (y[0] == 0).all()
    assert_close(y[1], ref_softmax(x[1:2])[0], atol=1e-7)


def test_softmax_finite_difference(rng):
    x = rng.standard_normal((3, 11))
    dy = rng.standard_normal((3, 11))
    y = ops.softmax(x)
    dx = ops.softmax_backward(dy, y)
    h = 1e-3
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = ((ref_softmax(xp) - ref_softmax(xm)) * dy).sum() / (2 * h)
    assert_close(dx, num, rtol=1e-3, atol=1e-5)


def test_softmax_errors(rng):
    with pytest.raises(ValueError, match="zero-size"):
        ops.softmax(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        ops.softmax_backward(randn(rng, 3, 4), randn(rng, 3, 5))
    with pytest.raises(TypeError, match="real numbers"):
        ops.softmax(np.array(["a", "b"]))


@pytest.mark.skipif("avx512" not in __import__("testutil").SIMD_PATHS, reason="no AVX-512 on this CPU or build")
def test_avx512_exponentials_bitwise_equal_avx2(rng):
    """The AVX-512 path computes the row exponentials 16 at a time with exp_ps's operations lane for lane and adds
    them in the AVX2 loop's order: softmax, log-softmax, cross-entropy and attention (forward and backward) give
    the AVX2 path's bits, at widths around the 8/16-lane groups and the 1024-element flushes, with -inf entries."""
    from cpuformer import _core
    outs = {}
    try:
        for path in ("avx2", "avx512"):
            _core.set_simd_path(path)
            res = []
            for cols in (1, 7, 8, 15, 16, 17, 24, 31, 33, 1023, 1024, 1025, 1040, 2063):
                x = randn(np.random.default_rng(cols), 3, cols, scale=4.0)
                x[1, ::5] = -np.inf
                res += [ops.softmax(x), ops.log_softmax(x)]
                targets = np.arange(3) % cols
                res.append(np.float64(ops.cross_entropy(x[[0, 2]], targets[:2])))
            q, k, v = (randn(np.random.default_rng(i), 2, 300, 48) for i in range(3))
            out, lse = ops.attention(q, k, v, 3, is_causal=True, need_lse=True)
            g = randn(np.random.default_rng(9), 2, 300, 48)
            res += [out, lse, *ops.attention_backward(g, q, k, v, out, lse, 3, is_causal=True)]
            outs[path] = res
    finally:
        _core.set_simd_path("auto")
    for a, b in zip(outs["avx2"], outs["avx512"]):
        np.testing.assert_array_equal(a, b)


def test_nan_rows_are_nan_on_every_path():
    """A row with a NaN is NaN throughout on every SIMD path (the row max keeps it: never a 'fully masked' row of
    zeros, never a finite row that hides it), for softmax, log-softmax and attention."""
    from cpuformer import _core
    from testutil import SIMD_PATHS
    x = randn(np.random.default_rng(0), 4, 37)
    x[1, :] = -np.inf
    x[1, 20] = np.nan          # NaN among -inf only
    x[2, 36] = np.nan          # in the scalar tail
    x[3, 5] = np.nan           # in a vector group
    q, k, v = (randn(np.random.default_rng(i), 1, 40, 8) for i in range(3))
    q[0, 7, 3] = np.nan        # one query row's scores are all NaN
    try:
        for path in SIMD_PATHS:
            _core.set_simd_path(path)
            for y in (ops.softmax(x), ops.log_softmax(x)):
                assert np.isnan(y[1:]).all(), path
                assert np.isfinite(y[0]).all(), path
            out, _ = ops.attention(q, k, v, 2)
            assert np.isnan(out[0, 7, :4]).all() and np.isfinite(np.delete(out[0], 7, 0)).all(), path
    finally:
        _core.set_simd_path("auto")
