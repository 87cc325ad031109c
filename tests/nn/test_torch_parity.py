"""Every layer against its PyTorch equivalent: weights copied from the torch module with load_state_dict, outputs and
every gradient (inputs and parameters) compared on random data in eval mode, max relative error <= 1e-4.
Skipped when torch is not installed (it is a test-only dependency; .ci/run installs torch==2.13.0)."""
from __future__ import annotations

import numpy as np
import pytest

import cpuformer.nn as cnn

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
TOL = 1e-4


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def tensor(x, grad=True):
    return torch.tensor(x, requires_grad=grad)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def check_params(ours: cnn.Module, theirs, what=""):
    t_params = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(t_params), f"{what}: parameter names differ: {set(ours_params) ^ set(t_params)}"
    for name, p in ours_params.items():
        tg = t_params[name].grad
        tg = np.zeros(p.shape, np.float32) if tg is None else tg.numpy()
        if np.abs(tg).max() == 0:
            assert np.abs(p.grad).max() < 1e-6, f"{what}: {name} gradient should be zero"
            continue
        assert rel(p.grad, tg) <= TOL, f"{what}: gradient of {name} off by {rel(p.grad, tg):.2e}"


def state_from(torch_module):
    return torch_module.state_dict()


# ------------------------------------------------------------------------------------------------ basic layers

@pytest.mark.parametrize("shape,out,bias", [((1, 1), 1, True), ((5, 7), 3, False), ((2, 9, 13), 17, True)])
def test_linear(rng, shape, out, bias):
    t = torch.nn.Linear(shape[-1], out, bias=bias)
    ours = cnn.Linear(shape[-1], out, bias=bias)
    ours.load_state_dict(t.state_dict())
    x, g = randn(rng, *shape), randn(rng, *shape[:-1], out)
    xt = tensor(x)
    yt = t(xt)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(x), yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL
    check_params(ours, t, "Linear")


def test_embedding_with_padding(rng):
    t = torch.nn.Embedding(11, 6, padding_idx=3)
    ours = cnn.Embedding(11, 6, padding_idx=3)
    ours.load_state_dict(t.state_dict())
    ids = rng.integers(0, 11, size=(3, 8))
    ids[0, :3] = 3
    g = randn(rng, 3, 8, 6)
    yt = t(torch.tensor(ids))
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(ids), yt.detach().numpy()) == 0
    assert ours.backward(g) is None
    check_params(ours, t, "Embedding")


@pytest.mark.parametrize("C,affine,eps", [(3, True, 1e-5), (7, True, 1e-12), (64, False, 1e-5)])
def test_layer_norm(rng, C, affine, eps):
    t = torch.nn.LayerNorm(C, eps=eps, elementwise_affine=affine)
    ours = cnn.LayerNorm(C, eps=eps, elementwise_affine=affine)
    if affine:  # non-trivial affine parameters
        with torch.no_grad():
            t.weight.copy_(torch.randn(C))
            t.bias.copy_(torch.randn(C))
        ours.load_state_dict(t.state_dict())
    x, g = randn(rng, 4, 5, C) * 3 + 1, randn(rng, 4, 5, C)
    xt = tensor(x)
    yt = t(xt)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(x), yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL
    check_params(ours, t, "LayerNorm")


@pytest.mark.parametrize("ours,theirs", [(cnn.ReLU(), torch.nn.ReLU()), (cnn.GELU(), torch.nn.GELU()),
                                         (cnn.GELU("tanh"), torch.nn.GELU(approximate="tanh"))])
def test_activations(rng, ours, theirs):
    x, g = randn(rng, 3, 33) * 3, randn(rng, 3, 33)
    xt = tensor(x)
    yt = theirs(xt)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(x), yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL


def test_sequential_and_state_dict_roundtrip(rng):
    t = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ours = cnn.Sequential(cnn.Linear(5, 8), cnn.ReLU(), cnn.Linear(8, 3))
    ours.load_state_dict(t.state_dict())
    x, g = randn(rng, 6, 5), randn(rng, 6, 3)
    xt = tensor(x)
    yt = t(xt)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(x), yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL
    check_params(ours, t, "Sequential")
    # and back: torch takes our state dict
    t2 = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    t2.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    assert rel(t2(torch.tensor(x)).detach().numpy(), yt.detach().numpy()) == 0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feed_forward(rng, activation):
    t = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU() if activation == "relu" else torch.nn.GELU(),
                            torch.nn.Linear(20, 12))
    ours = cnn.FeedForward(12, 20, activation=activation).eval()
    sd = t.state_dict()
    ours.load_state_dict({"linear1.weight": sd["0.weight"], "linear1.bias": sd["0.bias"],
                          "linear2.weight": sd["2.weight"], "linear2.bias": sd["2.bias"]})
    x, g = randn(rng, 3, 5, 12), randn(rng, 3, 5, 12)
    xt = tensor(x)
    yt = t(xt)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(x), yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL
    for ours_name, t_name in (("linear1.weight", "0.weight"), ("linear1.bias", "0.bias"),
                              ("linear2.weight", "2.weight"), ("linear2.bias", "2.bias")):
        p = dict(ours.named_parameters())[ours_name]
        assert rel(p.grad, dict(t.named_parameters())[t_name].grad.numpy()) <= TOL


# ------------------------------------------------------------------------------------------------ attention

def causal_bool(T, S):
    return np.triu(np.ones((T, S), bool), k=1)


MASKS = ["none", "bool", "float", "per_head", "padding", "causal", "causal+padding"]


def make_masks(kind, rng, B, H, T, S):
    """(torch kwargs, our kwargs): no query row is fully masked (PyTorch gives NaN there)."""
    if kind == "none":
        return {}, {}
    if kind == "bool":
        m = rng.random((T, S)) < 0.3
        m[:, 0] = False
        return {"attn_mask": torch.tensor(m)}, {"attn_mask": m}
    if kind == "float":
        m = (rng.standard_normal((T, S)) * 2).astype(np.float32)
        return {"attn_mask": torch.tensor(m)}, {"attn_mask": m}
    if kind == "per_head":
        m = rng.random((B * H, T, S)) < 0.4
        m[..., -1] = False
        return {"attn_mask": torch.tensor(m)}, {"attn_mask": m}
    pad = np.zeros((B, S), bool)
    pad[0, S // 2 + 1:] = True
    if kind == "padding":
        return {"key_padding_mask": torch.tensor(pad)}, {"key_padding_mask": pad}
    c = causal_bool(T, S)
    if kind == "causal":
        return {"attn_mask": torch.tensor(c)}, {"is_causal": True}
    return ({"attn_mask": torch.tensor(c), "key_padding_mask": torch.tensor(pad)},
            {"is_causal": True, "key_padding_mask": pad})


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("B,T,S,E,H,mode", [(2, 7, 7, 16, 4, "self"), (2, 5, 9, 15, 3, "kv"), (1, 1, 1, 8, 2, "self"),
                                            (3, 6, 4, 12, 2, "qkv"), (2, 70, 70, 24, 2, "self")])
def test_multihead_attention(rng, mask, B, T, S, E, H, mode):
    if mode == "self" and T != S:
        pytest.skip("self-attention has T == S")
    t = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():  # non-zero biases, so their gradients are exercised
        t.in_proj_bias.copy_(torch.randn(3 * E))
        t.out_proj.bias.copy_(torch.randn(E))
    t.eval()
    ours = cnn.MultiheadAttention(E, H).eval()
    ours.load_state_dict(t.state_dict())
    tk, ok = make_masks(mask, rng, B, H, T, S)
    q = randn(rng, B, T, E)
    k = q if mode == "self" else randn(rng, B, S, E)
    v = k if mode in ("self", "kv") else randn(rng, B, S, E)
    g = randn(rng, B, T, E)
    qt = tensor(q)
    kt = qt if mode == "self" else tensor(k)
    vt = kt if mode in ("self", "kv") else tensor(v)
    yt, wt = t(qt, kt, vt, need_weights=True, **tk)
    (yt * torch.tensor(g)).sum().backward()
    y, w = ours(q, k, v, need_weights=True, **ok)
    assert rel(y, yt.detach().numpy()) <= TOL
    assert rel(w, wt.detach().numpy()) <= TOL
    dq, dk, dv = ours.backward(g)
    if mode == "self":
        assert rel(dq + dk + dv, qt.grad.numpy()) <= TOL
    elif mode == "kv":
        assert rel(dq, qt.grad.numpy()) <= TOL and rel(dk + dv, kt.grad.numpy()) <= TOL
    else:
        for ours_g, theirs in ((dq, qt), (dk, kt), (dv, vt)):
            assert rel(ours_g, theirs.grad.numpy()) <= TOL
    check_params(ours, t, "MultiheadAttention")


def test_multihead_attention_weights_per_head_and_no_bias(rng):
    t = torch.nn.MultiheadAttention(12, 3, bias=False, batch_first=True).eval()
    ours = cnn.MultiheadAttention(12, 3, bias=False).eval()
    ours.load_state_dict(t.state_dict())
    assert set(ours.state_dict()) == set(t.state_dict())
    x = randn(rng, 2, 5, 12)
    yt, wt = t(torch.tensor(x), torch.tensor(x), torch.tensor(x), average_attn_weights=False)
    y, w = ours(x, x, x, average_attn_weights=False)
    assert w.shape == (2, 3, 5, 5)
    assert rel(w, wt.detach().numpy()) <= TOL and rel(y, yt.detach().numpy()) <= TOL
    _, none = ours(x, x, x, need_weights=False)
    assert none is None


def test_multihead_attention_sequence_first(rng):
    t = torch.nn.MultiheadAttention(8, 2).eval()  # torch's default layout: (T, B, E)
    ours = cnn.MultiheadAttention(8, 2, batch_first=False).eval()
    ours.load_state_dict(t.state_dict())
    x, g = randn(rng, 5, 3, 8), randn(rng, 5, 3, 8)
    xt = tensor(x)
    yt, _ = t(xt, xt, xt)
    (yt * torch.tensor(g)).sum().backward()
    y, _ = ours(x, x, x)
    assert rel(y, yt.detach().numpy()) <= TOL
    assert rel(sum(ours.backward(g)), xt.grad.numpy()) <= TOL


def test_fully_masked_rows_give_zeros_not_nan(rng):
    ours = cnn.MultiheadAttention(8, 2).eval()
    x = randn(rng, 2, 4, 8)
    pad = np.zeros((2, 4), bool)
    pad[1] = True  # every key of the second sequence is padding
    y, w = ours(x, x, x, key_padding_mask=pad)
    assert np.isfinite(y).all() and np.isfinite(w).all()
    # the attention output of the masked sequence is zero, so its output is the out_proj bias alone
    np.testing.assert_allclose(y[1], np.broadcast_to(ours.out_proj.bias.data, (4, 8)), atol=1e-6)
    assert (w[1] == 0).all()
    grads = ours.backward(np.ones_like(y))
    assert all(np.isfinite(gr).all() for gr in grads)


# ------------------------------------------------------------------------------------------------ transformer layers

ENC_CASES = [dict(norm_first=False, activation="relu", mask="none"), dict(norm_first=True, activation="gelu", mask="causal"),
             dict(norm_first=False, activation="gelu", mask="padding"), dict(norm_first=True, activation="relu",
                                                                               mask="float")]


def enc_masks(kind, rng, B, T):
    if kind == "none":
        return {}, {}
    if kind == "causal":
        m = torch.nn.Transformer.generate_square_subsequent_mask(T)
        return {"src_mask": m, "is_causal": True}, {"is_causal": True}
    if kind == "float":
        m = (rng.standard_normal((T, T))).astype(np.float32)
        return {"src_mask": torch.tensor(m)}, {"src_mask": m}
    pad = np.zeros((B, T), bool)
    pad[B - 1, max(1, T - 2):] = True  # never a whole row: torch gives NaN there
    return {"src_key_padding_mask": torch.tensor(pad)}, {"src_key_padding_mask": pad}


@pytest.mark.parametrize("case", ENC_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("B,T,d,H,F", [(2, 9, 16, 4, 24), (1, 1, 10, 2, 7)])
def test_transformer_encoder_layer(rng, case, B, T, d, H, F):
    t = torch.nn.TransformerEncoderLayer(d, H, F, dropout=0.0, activation=case["activation"], batch_first=True,
                                         norm_first=case["norm_first"]).eval()
    ours = cnn.TransformerEncoderLayer(d, H, F, dropout=0.0, activation=case["activation"],
                                       norm_first=case["norm_first"]).eval()
    ours.load_state_dict(t.state_dict())
    tk, ok = enc_masks(case["mask"], rng, B, T)
    x, g = randn(rng, B, T, d), randn(rng, B, T, d)
    xt = tensor(x)
    yt = t(xt, **tk)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ours(x, **ok), yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL
    check_params(ours, t, "TransformerEncoderLayer")


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_decoder_layer(rng, norm_first, activation):
    B, T, S, d, H, F = 2, 6, 9, 12, 3, 20
    t = torch.nn.TransformerDecoderLayer(d, H, F, dropout=0.0, activation=activation, batch_first=True,
                                         norm_first=norm_first).eval()
    ours = cnn.TransformerDecoderLayer(d, H, F, dropout=0.0, activation=activation, norm_first=norm_first).eval()
    ours.load_state_dict(t.state_dict())
    x, mem, g = randn(rng, B, T, d), randn(rng, B, S, d), randn(rng, B, T, d)
    pad = np.zeros((B, S), bool)
    pad[0, S - 3:] = True
    xt, mt = tensor(x), tensor(mem)
    yt = t(xt, mt, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T), tgt_is_causal=True,
           memory_key_padding_mask=torch.tensor(pad))
    (yt * torch.tensor(g)).sum().backward()
    y = ours(x, mem, tgt_is_causal=True, memory_key_padding_mask=pad)
    assert rel(y, yt.detach().numpy()) <= TOL
    d_tgt, d_mem = ours.backward(g)
    assert rel(d_tgt, xt.grad.numpy()) <= TOL
    assert rel(d_mem, mt.grad.numpy()) <= TOL
    check_params(ours, t, "TransformerDecoderLayer")


def test_encoder_and_decoder_stacks(rng):
    d, H, F = 16, 2, 24
    te = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(d, H, F, 0.0, batch_first=True), 2,
                                     norm=torch.nn.LayerNorm(d), enable_nested_tensor=False).eval()
    td = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(d, H, F, 0.0, batch_first=True), 2,
                                     norm=torch.nn.LayerNorm(d)).eval()
    oe = cnn.TransformerEncoder(cnn.TransformerEncoderLayer(d, H, F, 0.0), 2, norm=cnn.LayerNorm(d)).eval()
    od = cnn.TransformerDecoder(cnn.TransformerDecoderLayer(d, H, F, 0.0), 2, norm=cnn.LayerNorm(d)).eval()
    oe.load_state_dict(te.state_dict())
    od.load_state_dict(td.state_dict())
    assert list(oe.state_dict()) == list(te.state_dict())
    src, tgt, g = randn(rng, 2, 7, d), randn(rng, 2, 5, d), randn(rng, 2, 5, d)
    st, tt = tensor(src), tensor(tgt)
    mem_t = te(st)
    yt = td(tt, mem_t, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True)
    (yt * torch.tensor(g)).sum().backward()
    mem = oe(src)
    y = od(tgt, mem, tgt_is_causal=True)
    assert rel(y, yt.detach().numpy()) <= TOL
    d_tgt, d_mem = od.backward(g)
    d_src = oe.backward(d_mem)
    assert rel(d_tgt, tt.grad.numpy()) <= TOL and rel(d_src, st.grad.numpy()) <= TOL
    check_params(oe, te, "TransformerEncoder")
    check_params(od, td, "TransformerDecoder")


def test_transformer_encoder_decoder(rng):
    d, H = 16, 4
    t = torch.nn.Transformer(d, H, 2, 1, 32, dropout=0.0, batch_first=True).eval()
    ours = cnn.Transformer(d, H, 2, 1, 32, dropout=0.0).eval()
    assert list(ours.state_dict()) == list(t.state_dict())
    ours.load_state_dict(t.state_dict())
    src, tgt, g = randn(rng, 3, 8, d), randn(rng, 3, 6, d), randn(rng, 3, 6, d)
    src_pad = np.zeros((3, 8), bool)
    src_pad[2, 5:] = True
    st, tt = tensor(src), tensor(tgt)
    yt = t(st, tt, tgt_mask=t.generate_square_subsequent_mask(6), src_key_padding_mask=torch.tensor(src_pad),
           memory_key_padding_mask=torch.tensor(src_pad), tgt_is_causal=True)
    (yt * torch.tensor(g)).sum().backward()
    y = ours(src, tgt, tgt_is_causal=True, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
    assert rel(y, yt.detach().numpy()) <= TOL
    d_src, d_tgt = ours.backward(g)
    assert rel(d_src, st.grad.numpy()) <= TOL and rel(d_tgt, tt.grad.numpy()) <= TOL
    check_params(ours, t, "Transformer")
