"""RMSNorm (plain and Gemma's 1 + w), SiLU and gated units (SwiGLU, GeGLU, ReGLU) against torch autograd and
transformers' RMSNorm modules."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import nn, ops
from testutil import assert_close, randn

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(1, 1), (1, 7), (5, 16), (3, 4, 33), (64, 256), (2, 1000), (300, 128)]  # the last: 2 threads


def torch_grads(fn, *arrays, grad_output):
    ts = [torch.from_numpy(a.copy()).requires_grad_() for a in arrays]
    out = fn(*ts)
    out.backward(torch.from_numpy(grad_output))
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_vs_torch(rng, simd, threads, shape, eps, affine):
    C = shape[-1]
    x = randn(rng, *shape, scale=2.0) + 0.5
    w = randn(rng, C) if affine else None
    dy = randn(rng, *shape)
    norm = torch.nn.RMSNorm(C, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(w))
    tx = torch.from_numpy(x.copy()).requires_grad_()
    ty = norm(tx)
    ty.backward(torch.from_numpy(dy))
    y, rstd = ops.rms_norm(x, w, eps)
    assert rstd.shape == shape[:-1]
    assert_close(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5, what="y")
    e = np.finfo(np.float32).eps if eps is None else eps
    assert_close(rstd, 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1) + e), rtol=1e-6, atol=0, what="rstd")
    dx, dw = ops.rms_norm_backward(dy, x, w, rstd)
    assert_close(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-5, what="dx")
    if affine:
        assert_close(dw, norm.weight.grad.numpy(), rtol=1e-5, atol=1e-5 * np.sqrt(x.size / C), what="dw")
    else:
        assert dw is None


@pytest.mark.parametrize("shape", [(1, 5), (4, 9, 24), (16, 128)])
def test_rms_norm_vs_llama_and_gemma(rng, simd, threads, shape):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    C = shape[-1]
    x, w, dy = randn(rng, *shape, scale=3.0), randn(rng, C), randn(rng, *shape)
    for module, one_plus in ((LlamaRMSNorm(C, eps=1e-6), False), (GemmaRMSNorm(C, eps=1e-6), True)):
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w))
        tx = torch.from_numpy(x.copy()).requires_grad_()
        ty = module(tx)
        ty.backward(torch.from_numpy(dy))
        y, rstd = ops.rms_norm(x, w, 1e-6, one_plus=one_plus)
        assert_close(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5, what=type(module).__name__)
        dx, dw = ops.rms_norm_backward(dy, x, w, rstd, one_plus)
        assert_close(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-5, what="dx")
        assert_close(dw, module.weight.grad.numpy(), rtol=1e-5, atol=1e-5 * np.sqrt(x.size / C), what="dw")


def test_rms_norm_errors(rng):
    x = randn(rng, 3, 8)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, np.ones(7, np.float32))
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, None, -1.0)
    y, rstd = ops.rms_norm(x)
    with pytest.raises(ValueError, match="rstd"):
        ops.rms_norm_backward(x, x, None, rstd[:2])
    with pytest.raises(ValueError, match="grad_output"):
        ops.rms_norm_backward(x[:2], x, None, rstd)


def test_rms_norm_layer(rng):
    C = 12
    layer = nn.RMSNorm(C)
    ref = torch.nn.RMSNorm(C)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(randn(rng, C)))
    layer.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x, dy = randn(rng, 2, 5, C), randn(rng, 2, 5, C)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    ty = ref(tx)
    ty.backward(torch.from_numpy(dy))
    assert_close(layer(x), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert_close(layer.backward(dy), tx.grad.numpy(), rtol=1e-5, atol=1e-5)
    layer(x)
    layer.backward(dy)  # gradients accumulate
    assert_close(layer.weight.grad, 2 * ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(dy[0])
    gemma = nn.RMSNorm(C, eps=1e-6, one_plus=True)
    np.testing.assert_array_equal(gemma.weight.data, 0)  # (1 + w) starts as the identity scale
    assert_close(gemma(x), ops.rms_norm(x, None, 1e-6)[0], rtol=1e-6, atol=1e-6)
    assert nn.RMSNorm(C, elementwise_affine=False).state_dict() == {}


# ---------------------------------------------------------------------------------------------------------------
# SiLU and gated units


def test_silu_vs_torch(rng, simd, threads):
    x = np.concatenate([randn(rng, 997, scale=4.0),
                        np.array([-1e4, -100, -88.5, -30, -1e-6, 0, 1e-6, 30, 88.5, 100, 1e4], np.float32)])
    dy = randn(rng, x.size)
    y, (dx,) = torch_grads(F.silu, x, grad_output=dy)
    assert_close(ops.silu(x), y, rtol=1e-6, atol=1e-6, what="silu")
    assert_close(ops.silu_backward(dy, x), dx, rtol=1e-5, atol=1e-6, what="silu'")
    assert np.isfinite(ops.silu(x)).all() and np.isfinite(ops.silu_backward(dy, x)).all()
    # fused bias + silu, and the silu module
    xb, b = randn(rng, 5, 19), randn(rng, 19)
    g = randn(rng, 5, 19)
    y, (dxb, db) = torch_grads(lambda t, u: F.silu(t + u), xb, b, grad_output=g)
    assert_close(ops.bias_activation(xb, b, "silu"), y, rtol=1e-6, atol=1e-6)
    dx2, db2 = ops.bias_activation_backward(g, xb, b, "swish")
    assert_close(dx2, dxb, rtol=1e-5, atol=1e-6)
    assert_close(db2, db, rtol=1e-5, atol=1e-5)
    layer = nn.SiLU()
    assert_close(layer(xb), F.silu(torch.from_numpy(xb)).numpy(), rtol=1e-6, atol=1e-6)
    assert_close(layer.backward(g), ops.silu_backward(g, xb), rtol=0, atol=0)


GATED = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}


@pytest.mark.parametrize("activation", sorted(GATED))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 9), (2, 5, 33), (64, 200), (700, 96)])
def test_gated_vs_torch(rng, simd, threads, activation, shape):
    gate, up, dy = randn(rng, *shape, scale=2.0), randn(rng, *shape), randn(rng, *shape)
    gate.flat[0] = 0.0  # relu'(0) = 0 as torch
    act = GATED[activation]
    y, (dgate, dup) = torch_grads(lambda g, u: act(g) * u, gate, up, grad_output=dy)
    # act(gate) and act'(gate) are good to ~1e-6 absolute (the vector erf: 1.5e-7 times |x|/2, as PyTorch's own),
    # which the product scales by |up| and |dy|
    def close(actual, expected, scale, what):
        err = np.abs(actual.astype(np.float64) - expected)
        bad = err > 1e-5 * np.abs(expected) + 1e-6 * (1 + np.abs(scale))
        assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} off, max abs err {err.max():.3g}"

    close(ops.gated(gate, up, activation), y, up, "out")
    got_dgate, got_dup = ops.gated_backward(dy, gate, up, activation)
    close(got_dgate, dgate, dy * up, "dgate")
    close(got_dup, dup, dy, "dup")


def test_gated_errors(rng):
    g = randn(rng, 3, 4)
    with pytest.raises(ValueError, match="up"):
        ops.gated(g, g[:, :3])
    with pytest.raises(ValueError, match="activation"):
        ops.gated(g, g, "tanhh")
    with pytest.raises(ValueError, match="grad_output"):
        ops.gated_backward(g[:2], g, g)


def test_activation_names():
    from cpuformer.nn.layers import activation_name
    assert activation_name("silu") == activation_name("swish") == activation_name(nn.SiLU()) == "silu"
    with pytest.raises(ValueError, match="silu"):
        activation_name("mish")
