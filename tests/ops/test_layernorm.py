"""layer_norm forward and backward against float64 references and finite differences."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import ops
from testutil import assert_close, randn


def ref_ln(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    xh = (x - mu) / np.sqrt(var + eps)
    y = xh * (1.0 if w is None else w) + (0.0 if b is None else b)
    return y, mu[..., 0], 1 / np.sqrt(var[..., 0] + eps), xh


def ref_ln_backward(dy, x, w, eps):
    _, _, rstd, xh = ref_ln(x, w, None, eps)
    dy = dy.astype(np.float64)
    g = dy * (1.0 if w is None else w)
    C = x.shape[-1]
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    axes = tuple(range(x.ndim - 1))
    return dx, (dy * xh).sum(axes), dy.sum(axes)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 16), (3, 4, 33), (128, 768), (2, 1000)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_forward_backward(rng, simd, threads, shape, affine):
    C = shape[-1]
    x = randn(rng, *shape, scale=2.0) + 3.0  # an offset tests the two-pass variance
    w = randn(rng, C) if affine else None
    b = randn(rng, C) if affine else None
    y, mean, rstd = ops.layer_norm_forward(x, w, b, eps=1e-5)
    ry, rmu, rrstd, _ = ref_ln(x, w, b, 1e-5)
    assert_close(y, ry, rtol=1e-4, atol=2e-5, what="y")
    assert mean.shape == shape[:-1] and rstd.shape == shape[:-1]
    assert_close(mean, rmu, rtol=1e-5, atol=1e-6, what="mean")
    assert_close(rstd, rrstd, rtol=1e-4, what="rstd")
    dy = randn(rng, *shape)
    dx, dw, db = ops.layer_norm_backward(dy, x, w, mean, rstd)
    rdx, rdw, rdb = ref_ln_backward(dy, x, w, 1e-5)
    assert_close(dx, rdx, rtol=1e-3, atol=1e-4 * np.abs(rdx).max(), what="dx")
    assert_close(dw, rdw, rtol=1e-3, atol=1e-4 * np.abs(rdw).max(), what="dweight")
    assert_close(db, rdb, rtol=1e-4, atol=1e-4, what="dbias")


def test_layer_norm_matches_finite_differences(rng):
    x = rng.standard_normal((2, 6))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    dy = rng.standard_normal((2, 6))
    _, mean, rstd = ops.layer_norm_forward(x, w, b)
    dx, dw, db = ops.layer_norm_backward(dy, x, w, mean, rstd)
    f = lambda xx, ww, bb: (ref_ln(xx, ww, bb, 1e-5)[0] * dy).sum()
    h = 1e-4
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(*arr.shape):
            p, m = arr.copy(), arr.copy()
            p[idx] += h
            m[idx] -= h
            args_p = [p if arr is t else t for t in (x, w, b)]
            args_m = [m if arr is t else t for t in (x, w, b)]
            num[idx] = (f(*args_p) - f(*args_m)) / (2 * h)
        assert_close(grad, num, rtol=1e-3, atol=1e-4)


def test_layer_norm_constant_row(simd):
    x = np.full((2, 9), 4.0, np.float32)
    y = ops.layer_norm(x, eps=1e-5)
    assert (y == 0).all()


def test_layer_norm_errors(rng):
    x = randn(rng, 4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(x, randn(rng, 7))
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, eps=float("nan"))
    with pytest.raises(ValueError, match="zero-size"):
        ops.layer_norm(np.zeros((0, 8), np.float32))
    _, mean, rstd = ops.layer_norm_forward(x)
    with pytest.raises(ValueError, match="one value per row"):
        ops.layer_norm_backward(x, x, None, mean[:3], rstd)
