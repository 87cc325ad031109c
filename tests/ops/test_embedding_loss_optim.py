"""embedding, cross-entropy and AdamW against float64 references (and torch, when installed)."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import _core, ops
from testutil import assert_close, randn, rel_err

try:
    import torch
except ImportError:  # torch is a test-only dependency
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


# ------------------------------------------------------------------------------------------------ embedding

@pytest.mark.parametrize("ids_shape,V,C", [((1,), 1, 1), ((7,), 5, 3), ((3, 11), 50, 17), ((4, 64), 1000, 256)])
def test_embedding_forward_backward(rng, threads, ids_shape, V, C):
    w = randn(rng, V, C)
    ids = rng.integers(0, V, size=ids_shape)
    out = ops.embedding(ids, w)
    np.testing.assert_array_equal(out, w[ids])
    dout = randn(rng, *ids_shape, C)
    dw = randn(rng, V, C)  # accumulates into existing contents
    ref = dw.astype(np.float64).copy()
    np.add.at(ref, ids.reshape(-1), dout.reshape(-1, C).astype(np.float64))
    ops.embedding_backward(dout, ids, dw)
    assert_close(dw, ref, rtol=1e-5, atol=1e-5)


def test_embedding_backward_duplicates_and_padding(threads):
    w_grad = np.zeros((4, 3), np.float32)
    ids = np.array([1, 1, 1, 0, 2, 2])
    dout = np.arange(18, dtype=np.float32).reshape(6, 3)
    ops.embedding_backward(dout, ids, w_grad, padding_idx=2)
    np.testing.assert_array_equal(w_grad[1], dout[:3].sum(0))
    np.testing.assert_array_equal(w_grad[0], dout[3])
    assert (w_grad[2] == 0).all() and (w_grad[3] == 0).all()


def test_embedding_errors(rng):
    w = randn(rng, 10, 4)
    with pytest.raises(IndexError, match="id 10 at position 2 is out of range for a vocabulary of 10"):
        ops.embedding(np.array([0, 1, 10]), w)
    with pytest.raises(IndexError, match="-1"):
        ops.embedding(np.array([-1]), w)
    with pytest.raises(TypeError, match="integer"):
        ops.embedding(np.array([0.0, 1.0]), w)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        ops.embedding(np.array([0]), randn(rng, 10))
    g = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        ops.embedding_backward(randn(rng, 3, 5), np.array([0, 1, 2]), g)
    with pytest.raises(IndexError):
        ops.embedding_backward(randn(rng, 1, 4), np.array([11]), g)
    assert (g == 0).all()  # nothing written on error


# ------------------------------------------------------------------------------------------------ cross-entropy

def ref_cross_entropy(logits, targets, ignore_index, smoothing):
    x = logits.astype(np.float64)
    m = x.max(1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]
    valid = targets != ignore_index
    V = x.shape[1]
    t = np.where(valid, targets, 0)
    nll = lse - x[np.arange(len(t)), t]
    smooth = lse - x.mean(1)
    per = (1 - smoothing) * nll + smoothing * smooth
    n = valid.sum()
    loss = (per * valid).sum() / n if n else 0.0
    p = np.exp(x - lse[:, None])
    onehot = np.zeros_like(x)
    onehot[np.arange(len(t)), t] = 1
    grad = (p - (1 - smoothing) * onehot - smoothing / V) * valid[:, None] / max(n, 1)
    return loss, grad


@pytest.mark.parametrize("N,V", [(1, 1), (1, 2), (5, 7), (33, 100), (8, 50257)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_forward_backward(rng, simd, threads, N, V, smoothing):
    logits = randn(rng, N, V, scale=4.0)
    targets = rng.integers(0, V, size=N)
    if N > 2:
        targets[1] = -100
    loss, grad = ops.cross_entropy_with_grad(logits, targets, label_smoothing=smoothing)
    ref_loss, ref_grad = ref_cross_entropy(logits, targets, -100, smoothing)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert abs(ops.cross_entropy(logits, targets, label_smoothing=smoothing) - loss) < 1e-12
    # p - 1 cancels near p = 1: the error is absolute in probability units (float32 eps), divided by n_valid.
    n_valid = max(1, int((targets != -100).sum()))
    assert_close(grad, ref_grad, rtol=1e-4, atol=5e-7 / n_valid)


def test_cross_entropy_inplace_and_grad_scale(rng):
    logits = randn(rng, 6, 40)
    targets = rng.integers(0, 40, size=6)
    ref_loss, ref_grad = ref_cross_entropy(logits, targets, -100, 0.0)
    buf = logits.copy()
    loss, grad = ops.cross_entropy_with_grad(buf, targets, grad_scale=0.5, inplace=True)
    assert grad is buf
    assert abs(loss - ref_loss) < 1e-5
    assert_close(buf, 0.5 * ref_grad, rtol=1e-4, atol=1e-7)


def test_cross_entropy_large_logits_are_stable(simd):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4 + 1]], np.float32)
    loss, grad = ops.cross_entropy_with_grad(logits, np.array([1, 2]))
    ref_loss, ref_grad = ref_cross_entropy(logits, np.array([1, 2]), -100, 0.0)
    assert np.isfinite(loss) and abs(loss - ref_loss) < 1e-3
    assert_close(grad, ref_grad, atol=1e-6)


def test_cross_entropy_all_ignored_is_zero(rng):
    loss, grad = ops.cross_entropy_with_grad(randn(rng, 3, 5), np.full(3, -100))
    assert loss == 0.0 and (grad == 0).all()


@needs_torch
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_matches_torch(rng, smoothing):
    logits = randn(rng, 20, 33, scale=2)
    targets = rng.integers(0, 33, size=20)
    targets[::4] = 3  # any ignore_index value
    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(targets), ignore_index=3,
                                               label_smoothing=smoothing)
    t_loss.backward()
    loss, grad = ops.cross_entropy_with_grad(logits, targets, ignore_index=3, label_smoothing=smoothing)
    assert abs(loss - t_loss.item()) < 1e-5
    assert rel_err(grad, t_logits.grad.numpy()) < 1e-5


def test_cross_entropy_errors(rng):
    logits = randn(rng, 4, 5)
    with pytest.raises(IndexError, match="target 5 at position 2 is out of range for 5 classes"):
        ops.cross_entropy(logits, np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\)"):
        ops.cross_entropy(logits, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        ops.cross_entropy(logits, np.array([0.0, 1, 2, 3]))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.cross_entropy(randn(rng, 4), np.array([0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(logits, np.array([0, 1, 2, 3]), label_smoothing=1.5)
    bad = logits.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        ops.cross_entropy(bad, np.array([0, 1, 2, 3]))


# ------------------------------------------------------------------------------------------------ AdamW

def ref_adamw(p, g, m, v, lr, b1, b2, eps, wd, step):
    p, g, m, v = (a.astype(np.float64) for a in (p, g, m, v))
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat = m / (1 - b1**step)
    vhat = v / (1 - b2**step)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


@pytest.mark.parametrize("n", [1, 7, 100003])
def test_adamw_step_matches_reference(rng, threads, n):
    p, m = randn(rng, n), randn(rng, n, scale=0.1)
    v = np.abs(randn(rng, n, scale=0.1))
    g = randn(rng, n)
    for step in (1, 2, 10):
        rp, rm, rv = ref_adamw(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        ops.adamw_step(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        assert_close(m, rm, rtol=1e-5, atol=1e-7)
        assert_close(v, rv, rtol=1e-5, atol=1e-8)
        assert_close(p, rp, rtol=1e-5, atol=1e-6)


@needs_torch
def test_adamw_matches_torch_over_steps(rng):
    p0 = randn(rng, 5, 13)
    grads = [randn(rng, 5, 13) for _ in range(5)]
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, 1):
        tp.grad = torch.tensor(g)
        opt.step()
        ops.adamw_step(p, g, m, v, lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-7, weight_decay=0.05, step=step)
    assert rel_err(p, tp.detach().numpy()) < 1e-6


def test_adamw_paths_give_the_same_bits():
    """The AVX2 and AVX-512 updates spell the scalar loop's operations lane for lane (no contraction; sqrt and
    division correctly rounded), leaving their tails to it: every SIMD path gives the same bits, at sizes around the
    8/16-lane edges and across the threads' split, with a gradient scale, tiny, huge, zero and non-finite values."""
    from testutil import SIMD_PATHS
    results = {}
    try:
        for path in SIMD_PATHS:
            _core.set_simd_path(path)
            out = []
            for n in (1, 7, 8, 9, 15, 16, 17, 33, 100, 65543):
                rng = np.random.default_rng(n)
                p, g = randn(rng, n), randn(rng, n, scale=3.0)
                m, v = randn(rng, n, scale=0.1), np.abs(randn(rng, n, scale=0.1))
                special = np.array([0.0, -0.0, 1e-30, -1e-30, 3e18, -3e18, np.inf, np.nan], np.float32)
                g.flat[::5] = special[np.arange(len(g.flat[::5])) % len(special)]
                for step in (1, 3):
                    ops.adamw_step(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                                   step=step, grad_scale=0.37)
                out += [p.copy(), m.copy(), v.copy()]
            results[path] = out
    finally:
        _core.set_simd_path("auto")
    first = results[SIMD_PATHS[0]]
    for path, out in results.items():
        for a, b in zip(first, out):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=path)


def test_adamw_grad_scale_and_sum_squares(rng):
    g = randn(rng, 1000)
    assert abs(ops.sum_squares(g) - (g.astype(np.float64) ** 2).sum()) < 1e-9 * (g.astype(np.float64) ** 2).sum()
    p1, m1, v1 = np.ones(1000, np.float32), np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    p2, m2, v2 = p1.copy(), m1.copy(), v1.copy()
    ops.adamw_step(p1, g, m1, v1, lr=0.1, step=1, grad_scale=0.5)
    ops.adamw_step(p2, g * 0.5, m2, v2, lr=0.1, step=1)
    np.testing.assert_array_equal(p1, p2)


def test_adamw_errors(rng):
    p, g = np.zeros(4, np.float32), np.zeros(4, np.float32)
    m, v = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="step"):
        ops.adamw_step(p, g, m, v, lr=0.1, step=0)
    with pytest.raises(ValueError, match="same shape"):
        ops.adamw_step(p, g, np.zeros(5, np.float32), v, lr=0.1, step=1)
    with pytest.raises(TypeError, match="float32"):
        ops.adamw_step(p.astype(np.float64), g, m, v, lr=0.1, step=1)
    with pytest.raises(ValueError, match="lr"):
        ops.adamw_step(p, g, m, v, lr=float("inf"), step=1)
    with pytest.raises(ValueError, match="betas"):
        ops.adamw_step(p, g, m, v, lr=0.1, beta1=1.0, step=1)
