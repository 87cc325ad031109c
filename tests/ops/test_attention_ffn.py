"""Fused attention and feed-forward kernels: against float64 NumPy references, their gradients against float64
finite differences, the dropout path, peak memory at long sequences, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cpuformer import ops
from testutil import assert_close, randn


def ref_attention(q, k, v, H, additive=None, padding=None, causal=False):
    """float64 reference: q (B, T, E), k/v (B, S, E); additive (T, S)/(B, T, S)/(B*H, T, S); padding (B, S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, E = q.shape
    S, D = k.shape[1], E // H
    qh = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    kh = k.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    vh = v.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(D)
    if additive is not None:
        a = np.asarray(additive, np.float64)
        s = s + (a.reshape(B, H, T, S) if a.ndim == 3 and a.shape[0] == B * H else
                 a[:, None] if a.ndim == 3 else a)
    if padding is not None:
        s = np.where(np.asarray(padding)[:, None, None, :], -np.inf, s)
    if causal:
        s = np.where(np.triu(np.ones((T, S), bool), 1), -np.inf, s)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(B, T, E), p


# Head sizes 1-8 and 20 (partial 16-wide GEMM slivers), 264 (two K panels of the packed keys); key counts across
# several 256-key blocks; 1600 queries make several query blocks per task, so later blocks reuse packed keys.
SHAPES = [(1, 1, 1, 4, 1), (2, 5, 7, 12, 3), (1, 70, 300, 16, 2), (2, 129, 129, 20, 4), (1, 3, 520, 8, 1),
          (1, 300, 300, 40, 2), (1, 20, 270, 264, 1), (1, 1600, 1600, 24, 1)]


@pytest.mark.parametrize("B,T,S,E,H", SHAPES)
@pytest.mark.parametrize("mask", ["none", "causal", "padding", "additive", "per_head"])
def test_attention_matches_float64_reference(rng, simd, threads, B, T, S, E, H, mask):
    q, k, v = randn(rng, B, T, E), randn(rng, B, S, E), randn(rng, B, S, E)
    kw, ref_kw = {}, {}
    if mask == "causal":
        kw = ref_kw = {"is_causal": True}
    elif mask == "padding":
        pad = rng.random((B, S)) < 0.3
        pad[:, 0] = False
        kw, ref_kw = {"key_padding_mask": pad}, {"padding": pad}
    elif mask == "additive":
        a = randn(rng, B, T, S)
        kw, ref_kw = {"attn_mask": a}, {"additive": a}
    elif mask == "per_head":
        a = np.where(rng.random((B * H, T, S)) < 0.5, -np.inf, 0.0).astype(np.float32)
        a[..., 0] = 0.0
        kw, ref_kw = {"attn_mask": a}, {"additive": a}
    out, lse = ops.attention(q, k, v, H, need_lse=True, **kw)
    ref, p = ref_attention(q, k, v, H, causal=ref_kw.get("is_causal", False), additive=ref_kw.get("additive"),
                           padding=ref_kw.get("padding"))
    assert_close(out, ref, rtol=1e-4, atol=2e-6)
    assert_close(ops.attention_weights(q, k, H, **kw), p, rtol=1e-4, atol=1e-7)
    g = randn(rng, B, T, E)
    dq, dk, dv = ops.attention_backward(g, q, k, v, out, lse, H, **kw)
    # float64 analytic gradients of the reference
    D = E // H
    g64 = g.astype(np.float64).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    qh = q.astype(np.float64).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    kh = k.astype(np.float64).reshape(B, S, H, D).transpose(0, 2, 1, 3)
    vh = v.astype(np.float64).reshape(B, S, H, D).transpose(0, 2, 1, 3)
    dvh = p.transpose(0, 1, 3, 2) @ g64
    dp = g64 @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(D)
    back = lambda x, L: x.transpose(0, 2, 1, 3).reshape(B, L, E)  # noqa: E731
    for ours, theirs in ((dq, back(ds @ kh, T)), (dk, back(ds.transpose(0, 1, 3, 2) @ qh, S)), (dv, back(dvh, S))):
        assert_close(ours, theirs, rtol=1e-3, atol=2e-5 * max(1.0, np.abs(theirs).max()))


def test_attention_gradients_match_float64_finite_differences(rng):
    B, T, S, E, H = 1, 4, 6, 6, 2
    q, k, v = (rng.standard_normal((B, L, E)) for L in (T, S, S))
    pad = np.zeros((B, S), bool)
    pad[0, 4] = True
    g = rng.standard_normal((B, T, E))
    out, lse = ops.attention(q, k, v, H, key_padding_mask=pad, is_causal=True, need_lse=True)
    grads = ops.attention_backward(g, q, k, v, out, lse, H, key_padding_mask=pad, is_causal=True)
    f = lambda qq, kk, vv: (ref_attention(qq, kk, vv, H, padding=pad, causal=True)[0] * g).sum()  # noqa: E731
    h = 1e-5
    for which, grad in enumerate(grads):
        args = [q, k, v]
        num = np.zeros_like(args[which])
        for idx in np.ndindex(*num.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            num[idx] = (f(*plus) - f(*minus)) / (2 * h)
        assert_close(grad, num, rtol=1e-3, atol=1e-5)


def test_attention_reads_strided_views_of_a_fused_projection(rng):
    B, T, E, H = 2, 9, 12, 3
    qkv = randn(rng, B, T, 3 * E)
    q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
    out, lse = ops.attention(q, k, v, H, need_lse=True)
    ref, _ = ref_attention(q, k, v, H)
    assert_close(out, ref, rtol=1e-4, atol=2e-6)
    dqkv = np.full((B, T, 3 * E), np.nan, np.float32)
    g = randn(rng, B, T, E)
    ops.attention_backward(g, q, k, v, out, lse, H, grad_query=dqkv[..., :E], grad_key=dqkv[..., E:2 * E],
                           grad_value=dqkv[..., 2 * E:])
    dq, dk, dv = ops.attention_backward(g, q.copy(), k.copy(), v.copy(), out, lse, H)
    np.testing.assert_array_equal(dqkv, np.concatenate([dq, dk, dv], axis=-1))


def test_attention_dropout(rng, threads):
    B, T, S, E, H = 2, 16, 16, 8, 2
    q, k, v = randn(rng, B, T, E), randn(rng, B, S, E), randn(rng, B, S, E)
    out1, lse = ops.attention(q, k, v, H, dropout_p=0.3, seed=5, need_lse=True)
    out2, _ = ops.attention(q, k, v, H, dropout_p=0.3, seed=5)
    np.testing.assert_array_equal(out1, out2)  # the mask is a function of the seed
    assert np.abs(out1 - ops.attention(q, k, v, H, dropout_p=0.3, seed=6)[0]).max() > 1e-3
    # Unbiased: the mean over many seeds approaches the output without dropout.
    mean = np.mean([ops.attention(q, k, v, H, dropout_p=0.3, seed=s)[0] for s in range(300)], axis=0)
    assert np.abs(mean - ops.attention(q, k, v, H)[0]).mean() < 0.05
    # Backward regenerates the same mask: directional derivative of sum(g * out) matches the gradient.
    g = randn(rng, B, T, E)
    dq, dk, dv = ops.attention_backward(g, q, k, v, out1, lse, H, dropout_p=0.3, seed=5)
    dirs = [randn(rng, *a.shape) for a in (q, k, v)]
    h = 1e-2
    f = lambda s: float((ops.attention(q + s * dirs[0], k + s * dirs[1], v + s * dirs[2], H, dropout_p=0.3,  # noqa
                                       seed=5)[0].astype(np.float64) * g).sum())
    numeric = (f(h) - f(-h)) / (2 * h)
    analytic = sum(float((d.astype(np.float64) * x).sum()) for d, x in zip((dq, dk, dv), dirs))
    assert abs(numeric - analytic) < 1e-2 * max(1.0, abs(analytic))


def ref_ffn(x, w1, b1, w2, b2, act):
    x, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2))
    u = x @ w1.T + b1
    if act == "relu":
        a = np.maximum(u, 0)
    else:
        from math import erf
        a = 0.5 * u * (1 + np.vectorize(erf)(u / np.sqrt(2)))
    return a @ w2.T + b2


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("rows,C,F", [(1, 1, 1), (7, 5, 9), (130, 32, 72)])
def test_feed_forward_forward_backward(rng, threads, act, rows, C, F):
    x, w1, b1, w2, b2 = randn(rng, rows, C), randn(rng, F, C), randn(rng, F), randn(rng, C, F), randn(rng, C)
    out, u, a = ops.feed_forward(x, w1, b1, w2, b2, act)
    assert_close(out, ref_ffn(x, w1, b1, w2, b2, act), rtol=1e-4, atol=1e-4)
    g = randn(rng, rows, C)
    grads = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    dx = ops.feed_forward_backward(g, x, u, a, w1, w2, *grads, act)
    # float64 central differences of the reference, for x and every parameter
    args = [x.astype(np.float64), w1.astype(np.float64), b1.astype(np.float64), w2.astype(np.float64),
            b2.astype(np.float64)]
    f = lambda *a_: (ref_ffn(*a_, act) * g).sum()  # noqa: E731
    h = 1e-6
    for i, ours in enumerate([dx] + grads):
        num = np.zeros_like(args[i])
        for idx in list(np.ndindex(*num.shape))[:60]:  # a sample of entries keeps the test fast
            p_, m_ = [a_.copy() for a_ in args], [a_.copy() for a_ in args]
            p_[i][idx] += h
            m_[i][idx] -= h
            num[idx] = (f(*p_) - f(*m_)) / (2 * h)
        flat = [idx for idx in list(np.ndindex(*num.shape))[:60]]
        o = np.array([ours[idx] for idx in flat])
        n = np.array([num[idx] for idx in flat])
        assert_close(o, n, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(n).max()))


def test_feed_forward_dropout_backward_uses_the_same_mask(rng):
    rows, C, F = 6, 4, 10
    x, w1, b1, w2, b2 = randn(rng, rows, C), randn(rng, F, C), randn(rng, F), randn(rng, C, F), randn(rng, C)
    out, u, a = ops.feed_forward(x, w1, b1, w2, b2, "relu", dropout_p=0.5, seed=11)
    keep = ops.dropout(np.ones((rows, F), np.float32), 0.5, seed=11)[1]
    np.testing.assert_allclose(a, np.where(keep, np.maximum(u, 0) * 2, 0), rtol=1e-6)
    g = randn(rng, rows, C)
    grads = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    dx = ops.feed_forward_backward(g, x, u, a, w1, w2, *grads, "relu", dropout_p=0.5, seed=11)
    da = (g.astype(np.float64) @ w2) * keep * 2 * (u > 0)
    assert_close(dx, da @ w1, rtol=1e-4, atol=1e-5)
    assert_close(grads[0], da.T @ x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_feed_forward_into_reused_buffers(rng, threads, act):
    """u_out / a_out / workspace (what a layer reuses between steps) give the same bits as fresh arrays, even when
    they hold garbage (NaN) from before, and are refused when their shape is wrong or they alias an input."""
    rows, C, F = 37, 12, 20
    x, w1, b1, w2, b2 = randn(rng, rows, C), randn(rng, F, C), randn(rng, F), randn(rng, C, F), randn(rng, C)
    g = randn(rng, rows, C)
    out, u, a = ops.feed_forward(x, w1, b1, w2, b2, act, dropout_p=0.25, seed=5)
    grads = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    dx = ops.feed_forward_backward(g, x, u, a, w1, w2, *grads, act, dropout_p=0.25, seed=5)
    u_buf, a_buf, work = (np.full((rows, F), np.nan, np.float32) for _ in range(3))
    out2, u2, a2 = ops.feed_forward(x, w1, b1, w2, b2, act, dropout_p=0.25, seed=5, u_out=u_buf, a_out=a_buf)
    assert u2 is u_buf and a2 is a_buf
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(u2, u)
    np.testing.assert_array_equal(a2, a)
    grads2 = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    dx2 = ops.feed_forward_backward(g, x, u2, a2, w1, w2, *grads2, act, dropout_p=0.25, seed=5, workspace=work)
    np.testing.assert_array_equal(dx2, dx)
    for ours, ref in zip(grads2, grads):
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError, match=r"u_out must have shape \(37, 20\)"):
        ops.feed_forward(x, w1, b1, w2, b2, act, u_out=np.zeros((rows, F + 1), np.float32))
    with pytest.raises(ValueError, match="a_out must not share memory"):
        ops.feed_forward(x, w1, b1, w2, b2, act, u_out=u_buf, a_out=u_buf)
    with pytest.raises(TypeError, match="a_out must be float32"):
        ops.feed_forward(x, w1, b1, w2, b2, act, a_out=np.zeros((rows, F)))
    with pytest.raises(ValueError, match="workspace must not share memory"):
        ops.feed_forward_backward(g, x, u, a, w1, w2, *grads, act, workspace=a)
    with pytest.raises(ValueError, match="workspace must have shape"):
        ops.feed_forward_backward(g, x, u, a, w1, w2, *grads, act, workspace=np.zeros((rows, C), np.float32))


_MEMORY_SCRIPT = r"""
import json, resource, numpy as np
import cpuformer.nn as nn
T, C, H = 8192, 256, 4
layer = nn.MultiheadAttention(C, H).eval()
x = np.random.default_rng(0).standard_normal((1, T, C)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y, _ = layer(x, x, x, need_weights=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_bytes": (after - before) * 1024, "finite": bool(np.isfinite(y).all())}))
"""


def test_attention_memory_at_8192_tokens():
    """One attention layer, T=8192, C=256, 4 heads, batch 1, eval: the peak memory growth of the forward must be far
    below a T x T x heads float32 score tensor (1 GiB). Measured in a fresh process (ru_maxrss)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    scores = 8192 * 8192 * 4 * 4
    assert result["finite"]
    # inputs/outputs/projections are ~8192*256*4*5 bytes = 40 MiB; allow 3x that, still 1/8 of the score tensor
    assert result["growth_bytes"] < scores / 8, f"peak growth {result['growth_bytes'] / 2**20:.0f} MiB"


def test_attention_errors(rng):
    q = randn(rng, 2, 5, 8)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ops.attention(q, q, q, 3)
    with pytest.raises(ValueError, match="must be 3-D"):
        ops.attention(q[0], q[0], q[0], 2)
    with pytest.raises(ValueError, match="k and v must be"):
        ops.attention(q, randn(rng, 2, 5, 4), randn(rng, 2, 5, 4), 2)
    with pytest.raises(ValueError, match="k and v must be"):
        ops.attention(q, randn(rng, 3, 5, 8), randn(rng, 3, 5, 8), 2)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(5, 6\)"):
        ops.attention(q, randn(rng, 2, 6, 8), randn(rng, 2, 6, 8), 2, attn_mask=np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        ops.attention(q, q, q, 2, key_padding_mask=np.zeros((2, 4), bool))
    with pytest.raises(TypeError, match="attn_mask must be boolean or float"):
        ops.attention(q, q, q, 2, attn_mask=np.array([["a"] * 5] * 5))
    with pytest.raises(ValueError, match="NaN"):
        ops.attention(q, q, q, 2, attn_mask=np.full((5, 5), np.nan, np.float32))
    with pytest.raises(ValueError, match="zero-size"):
        ops.attention(np.zeros((2, 0, 8), np.float32), q, q, 2)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, q, q, 2, dropout_p=1.0)
    out, lse = ops.attention(q, q, q, 2, need_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape"):
        ops.attention_backward(q, q, q, q, out, lse[:, :1], 2)
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros_like(q)
        ro.flags.writeable = False
        ops.attention_backward(q, q, q, q, out, lse, 2, grad_query=ro)
    with pytest.raises(ValueError, match="linear1.weight must have shape"):
        ops.feed_forward(randn(rng, 3, 4), randn(rng, 6, 5), None, randn(rng, 4, 6), None)
    with pytest.raises(ValueError, match="linear2.weight must have shape"):
        ops.feed_forward(randn(rng, 3, 4), randn(rng, 6, 4), None, randn(rng, 4, 7), None)
