"""GELU (erf, tanh), ReLU, fused bias+activation, dropout and residual add."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cpuformer import _core, ops
from testutil import assert_close, randn

_erf = np.vectorize(math.erf)


def ref_gelu(x, approximate):
    x = x.astype(np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def ref_gelu_grad(x, approximate):
    x = x.astype(np.float64)
    if approximate == "tanh":
        c = np.sqrt(2 / np.pi)
        t = np.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + _erf(x / np.sqrt(2))) + x * np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)


SHAPES = [(1,), (7,), (3, 9), (4, 5, 33), (256, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_forward_backward(rng, simd, threads, shape, approximate):
    x = randn(rng, *shape, scale=3.0)
    # Absolute tolerance: float32 erf/tanh approximations are accurate to ~1.5e-7 absolute (as PyTorch's).
    assert_close(ops.gelu(x, approximate), ref_gelu(x, approximate), rtol=1e-5, atol=2e-6)
    dy = randn(rng, *shape)
    dx = ops.gelu_backward(dy, x, approximate)
    assert_close(dx, dy * ref_gelu_grad(x, approximate), rtol=1e-5, atol=2e-6)


def test_gelu_extremes(simd):
    x = np.array([-1e4, -30, -10, -1e-6, 0, 1e-6, 10, 30, 1e4, np.inf, -np.inf], np.float32)
    for approximate in ("none", "tanh"):
        y = ops.gelu(x[:-2], approximate)
        assert_close(y, ref_gelu(x[:-2], approximate), rtol=1e-6, atol=1e-7)
    assert np.isnan(ops.gelu(np.array([np.nan], np.float32)))[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_forward_backward(rng, simd, threads, shape):
    x = randn(rng, *shape)
    x.flat[0] = 0.0  # relu'(0) = 0, as PyTorch
    np.testing.assert_array_equal(ops.relu(x), np.maximum(x, 0))
    dy = randn(rng, *shape)
    np.testing.assert_array_equal(ops.relu_backward(dy, x), dy * (x > 0))


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "identity"])
def test_bias_activation_fused(rng, simd, threads, activation):
    x, bias, dy = randn(rng, 37, 45), randn(rng, 45), randn(rng, 37, 45)
    pre = x.astype(np.float64) + bias
    f = {"relu": lambda z: np.maximum(z, 0), "gelu": lambda z: ref_gelu(z, "none"),
         "gelu_tanh": lambda z: ref_gelu(z, "tanh"), "identity": lambda z: z}[activation]
    g = {"relu": lambda z: (z > 0).astype(np.float64), "gelu": lambda z: ref_gelu_grad(z, "none"),
         "gelu_tanh": lambda z: ref_gelu_grad(z, "tanh"), "identity": lambda z: np.ones_like(z)}[activation]
    assert_close(ops.bias_activation(x, bias, activation), f(pre), rtol=1e-5, atol=2e-6)
    dx, dbias = ops.bias_activation_backward(dy, x, bias, activation)
    assert_close(dx, dy * g(pre), rtol=1e-5, atol=2e-6)
    assert_close(dbias, (dy * g(pre)).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_activation_in_place(rng, simd, activation):
    x, bias = randn(rng, 19, 33), randn(rng, 33)
    expected = _core.activation(x, bias, activation)
    y = x.copy()
    assert _core.activation(y, bias, activation, inplace=True) is y
    np.testing.assert_array_equal(y, expected)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="x must be writable"):
        _core.activation(y, bias, activation, inplace=True)


def test_gelu_finite_difference(rng):
    x = rng.standard_normal(50) * 3
    for approximate in ("none", "tanh"):
        h = 1e-3
        num = (ref_gelu(x + h, approximate) - ref_gelu(x - h, approximate)) / (2 * h)
        assert_close(ops.gelu_backward(np.ones(50), x, approximate), num, rtol=1e-4, atol=1e-5)


def test_dropout_statistics_and_backward(rng, threads):
    x = randn(rng, 200, 500)
    p = 0.3
    y, mask = ops.dropout(x, p, seed=123)
    keep = mask.mean()
    assert abs(keep - (1 - p)) < 0.01  # 1e5 draws: std ~1.5e-3
    np.testing.assert_allclose(y, np.where(mask, x / (1 - p), 0), rtol=1e-6)
    dy = randn(rng, 200, 500)
    np.testing.assert_allclose(ops.dropout_backward(dy, p, seed=123), np.where(mask, dy / (1 - p), 0), rtol=1e-6)
    y2, mask2 = ops.dropout(x, p, seed=124)
    assert (mask2 != mask).mean() > 0.3  # another seed, another mask


def test_dropout_same_mask_for_any_thread_count(rng):
    import cpuformer
    x = randn(rng, 300, 301)
    before = cpuformer.get_num_threads()
    try:
        cpuformer.set_num_threads(1)
        y1, _ = ops.dropout(x, 0.5, seed=7)
        cpuformer.set_num_threads(2)
        y2, _ = ops.dropout(x, 0.5, seed=7)
    finally:
        cpuformer.set_num_threads(before)
    np.testing.assert_array_equal(y1, y2)


def test_dropout_p_zero_is_identity(rng):
    x = randn(rng, 10, 10)
    y, mask = ops.dropout(x, 0.0, seed=1)
    np.testing.assert_array_equal(y, x)
    assert mask.all()


def test_add(rng, threads):
    a, b = randn(rng, 3, 100, 77), randn(rng, 3, 100, 77)
    np.testing.assert_array_equal(ops.add(a, b), a + b)


def test_activation_errors(rng):
    x = randn(rng, 4, 8)
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(x, approximate="fast")
    with pytest.raises(ValueError, match="activation must be"):
        ops.bias_activation(x, randn(rng, 8), "mish")  # ("swish" is SiLU's alias)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.bias_activation(x, randn(rng, 9))
    with pytest.raises(ValueError, match="same shape"):
        ops.relu_backward(x, randn(rng, 4, 9))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        ops.dropout(x, 1.0, seed=1)
    with pytest.raises(TypeError, match="seed"):
        ops.dropout(x, 0.1, seed=1.5)
    with pytest.raises(ValueError, match="same shape"):
        ops.add(x, randn(rng, 8, 4))


@pytest.mark.skipif("avx512" not in __import__("testutil").SIMD_PATHS, reason="no AVX-512 on this CPU or build")
def test_avx512_activations_bitwise_equal_avx2():
    """The AVX-512 path runs the element-wise activations 16 lanes at a time with the AVX2 code's operations (the
    last group masked, the same scalar tail): forward, backward, fused bias (and its gradient) and gated units give
    the AVX2 path's bits at every width around the 8/16-lane edges, with extreme and non-finite inputs."""
    outs = {}
    try:
        for path in ("avx2", "avx512"):
            _core.set_simd_path(path)
            res = []
            for cols in (1, 7, 8, 9, 15, 16, 17, 23, 24, 31, 32, 33, 47, 100):
                rng = np.random.default_rng(cols)
                x = randn(rng, 5, cols, scale=3.0)
                x.flat[::7] = np.array([0.0, -0.0, 40.0, -40.0, 95.0, -95.0, np.inf, -np.inf, np.nan],
                                       np.float32)[np.arange(len(x.flat[::7])) % 9]
                g, b = randn(rng, 5, cols), randn(rng, cols)
                for approximate in ("none", "tanh"):
                    res += [ops.gelu(x, approximate), ops.gelu_backward(g, x, approximate)]
                res += [ops.relu(x), ops.relu_backward(g, x), ops.silu(x), ops.silu_backward(g, x)]
                for act in ("gelu", "gelu_tanh", "relu", "silu"):
                    res += [ops.bias_activation(x, b, act), *ops.bias_activation_backward(g, x, b, act)]
                for act in ("silu", "gelu", "gelu_tanh", "relu"):
                    res += [ops.gated(x, g, act), *ops.gated_backward(b * g, x, g, act)]
            outs[path] = res
    finally:
        _core.set_simd_path("auto")
    assert len(outs["avx2"]) == len(outs["avx512"])
    for i, (a, b) in enumerate(zip(outs["avx2"], outs["avx512"])):
        np.testing.assert_array_equal(a, b, err_msg=str(i))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 17), (300, 33), (4096, 3)])
def test_bias_grad_sums_rows_in_double(rng, simd, threads, shape):
    """out += grad_output summed over every leading axis, each column in row order in double: against float64, and
    the same bits on every SIMD path and thread count (the sums are ordered, not split)."""
    g = randn(rng, *shape, scale=3.0)
    out0 = randn(rng, shape[-1])
    out = ops.bias_grad(g, out0.copy())
    ref = out0.astype(np.float64) + g.reshape(-1, shape[-1]).astype(np.float64).sum(0)
    assert_close(out, ref, rtol=1e-6, atol=1e-6, what="bias_grad")
    sums = np.cumsum(g.reshape(-1, shape[-1]).astype(np.float64), 0)[-1]  # in row order, in double
    np.testing.assert_array_equal(out, out0 + sums.astype(np.float32))
