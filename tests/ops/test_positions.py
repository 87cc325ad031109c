"""Rotary embeddings, ALiBi slopes and T5 relative position buckets/bias against float64 references and against
transformers' own code (Llama, GPT-NeoX, GPT-J, BLOOM, T5)."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import ops
from testutil import assert_close, randn

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # short original context: all three llama3 regions occur


# ---------------------------------------------------------------------------------------------------------------
# float64 references


def ref_inv_freq(rotary_dim, theta=10000.0, scaling=None):
    """transformers' formulas in float64 (the float32 rounding of the kernel is compared with a tolerance)."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        f, lo, hi, L = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings"))
        wl = 2 * np.pi / inv
        smooth = (L / wl - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv
        inv = np.where(wl < L / hi, inv, np.where(wl > L / lo, inv / f, mid))
    return inv


def ref_rotary(x, pos, inv_freq, rotary_dim, layout, sign=1.0):
    """x (B, T, H, D) float64; pos (B, T); angles as transformers forms them: float32 pos * float32 inv_freq."""
    ang = (pos.astype(np.float32)[..., None] * inv_freq.astype(np.float32)).astype(np.float64)  # (B, T, rd/2)
    c, s = np.cos(ang)[:, :, None, :], sign * np.sin(ang)[:, :, None, :]
    y = x.astype(np.float64).copy()
    half = rotary_dim // 2
    if layout == "half":
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        y[..., :half], y[..., half:rotary_dim] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        y[..., 0:rotary_dim:2], y[..., 1:rotary_dim:2] = x1 * c - x2 * s, x2 * c + x1 * s
    return y


CASES = [  # (B, T, H, D, rotary_dim)
    (1, 1, 1, 2, None), (2, 5, 3, 8, None), (3, 7, 2, 6, 4), (2, 4, 4, 16, 8), (1, 3, 5, 10, 2), (2, 33, 3, 64, None)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("where", ["default", "offset", "positions"])
def test_rotary_vs_float64(rng, threads, case, layout, where):
    B, T, H, D, rd = case
    x = randn(rng, B, T, H, D)
    theta = float(rng.choice([10000.0, 500000.0, 1e6]))
    if where == "default":
        pos, kw = np.broadcast_to(np.arange(T), (B, T)), {}
    elif where == "offset":
        off = rng.integers(0, 3000, B)
        pos, kw = off[:, None] + np.arange(T), {"offset": off}
    else:
        pos = rng.integers(0, 5000, (B, T))
        kw = {"positions": pos}
    inv = ops.rotary_inv_freq(D, rd, theta)
    assert_close(inv, ref_inv_freq(rd or D, theta), rtol=2e-7, atol=0, what="inv_freq")
    y = ops.rotary(x, H, rotary_dim=rd, layout=layout, theta=theta, **kw)  # 4-D input
    ref = ref_rotary(x, pos, inv, rd or D, layout)
    # angle = float32(pos * inv) up to 5000 rad: float32 sin/cos of the same float32 angle agree to ~1e-7
    assert_close(y, ref, rtol=1e-5, atol=2e-6, what="rotary")
    if rd is not None:
        np.testing.assert_array_equal(y[..., rd:], x[..., rd:])  # the features past rotary_dim pass through
    y3 = ops.rotary(x.reshape(B, T, H * D), H, rotary_dim=rd, layout=layout, theta=theta, **kw)  # 3-D input
    np.testing.assert_array_equal(y3, y.reshape(B, T, H * D))
    # the gradient is the transpose: <rotary(x), g> = <x, rotary_backward(g)>, and it inverts the rotation
    g = randn(rng, B, T, H, D)
    dx = ops.rotary_backward(g, H, rotary_dim=rd, layout=layout, theta=theta, **kw)
    assert_close(dx, ref_rotary(g, pos, inv, rd or D, layout, sign=-1.0), rtol=1e-5, atol=2e-6, what="backward")
    lhs = (y.astype(np.float64) * g).sum()
    rhs = (x.astype(np.float64) * dx).sum()
    assert abs(lhs - rhs) <= 1e-5 * (np.abs(x).sum() + 1)
    assert_close(ops.rotary_backward(y, H, rotary_dim=rd, layout=layout, theta=theta, **kw), x, rtol=1e-5,
                 atol=2e-6, what="inverse")


def test_rotary_positions_broadcast_and_negative(rng):
    x = randn(rng, 3, 4, 2, 8)
    pos = np.array([5, -3, 0, 70000])
    y = ops.rotary(x, 2, positions=pos)
    np.testing.assert_array_equal(y, ops.rotary(x, 2, positions=np.broadcast_to(pos, (3, 4))))
    np.testing.assert_array_equal(y, ops.rotary(x, 2, positions=pos[None]))
    assert_close(y, ref_rotary(x, np.broadcast_to(pos, (3, 4)), ops.rotary_inv_freq(8), 8, "half"), rtol=1e-5,
                 atol=2e-6)
    np.testing.assert_array_equal(ops.rotary(x, 2, offset=7), ops.rotary(x, 2, offset=np.full(3, 7)))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rotary_inv_freq_scaling_vs_float64(scaling):
    for theta, D in [(10000.0, 16), (500000.0, 128), (10000.0, 6)]:
        inv = ops.rotary_inv_freq(D, theta=theta, scaling=scaling)
        assert inv.dtype == np.float32 and inv.shape == (D // 2,)
        assert_close(inv, ref_inv_freq(D, theta, scaling), rtol=1e-6, atol=0, what=f"theta={theta} D={D}")


def _ulps(a, b):
    return np.abs(a.astype(np.float32).view(np.int32).astype(np.int64) - b.astype(np.float32).view(np.int32))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3,
                                     dict(LLAMA3, factor=32.0, original_max_position_embeddings=8192)])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rotary_vs_transformers_llama(rng, scaling, theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    B, T, H, D = 2, 9, 3, 32
    kw = {} if scaling is None else {"rope_scaling": dict(scaling)}
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=1, rope_theta=theta,
                      max_position_embeddings=20000, **kw)
    rope = LlamaRotaryEmbedding(cfg)
    inv = ops.rotary_inv_freq(D, theta=theta, scaling=scaling)
    assert _ulps(inv, rope.inv_freq.numpy()).max() <= 1, "inv_freq more than 1 ulp from transformers'"
    q, k = randn(rng, B, T, H, D), randn(rng, B, T, 1, D)
    pos = np.sort(rng.integers(0, 12000, (B, T)), axis=1)
    cos, sin = rope(torch.from_numpy(q), torch.from_numpy(pos))
    tq, tk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin)
    assert_close(ops.rotary(q, H, positions=pos, theta=theta, scaling=scaling), tq.transpose(1, 2).numpy(),
                 rtol=1e-5, atol=2e-5, what="q")
    assert_close(ops.rotary(k.reshape(B, T, D), 1, positions=pos, theta=theta, scaling=scaling),
                 tk.transpose(1, 2).reshape(B, T, D).numpy(), rtol=1e-5, atol=2e-5, what="k")
    # the gradient matches torch autograd through transformers' function
    tq_in = torch.from_numpy(q).transpose(1, 2).requires_grad_()
    g = randn(rng, B, T, H, D)
    out, _ = apply_rotary_pos_emb(tq_in, tq_in, cos, sin)
    out.backward(torch.from_numpy(g).transpose(1, 2))
    assert_close(ops.rotary_backward(g, H, positions=pos, theta=theta, scaling=scaling),
                 tq_in.grad.transpose(1, 2).numpy(), rtol=1e-5, atol=2e-5, what="grad")


@pytest.mark.parametrize("factor", [0.25, 0.5])
def test_partial_rotary_vs_transformers_gpt_neox(rng, factor):
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb
    B, T, H, D = 2, 6, 2, 24
    cfg = GPTNeoXConfig(hidden_size=H * D, num_attention_heads=H, rotary_pct=factor)
    cfg.rope_parameters["partial_rotary_factor"] = factor
    rope = GPTNeoXRotaryEmbedding(cfg)
    rd = int(D * factor)
    assert rope.inv_freq.shape[0] == rd // 2
    assert _ulps(ops.rotary_inv_freq(D, rd), rope.inv_freq.numpy()).max() <= 1
    q = randn(rng, B, T, H, D)
    pos = rng.integers(0, 2000, (B, T))
    cos, sin = rope(torch.from_numpy(q), torch.from_numpy(pos))
    tq, _ = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(q).transpose(1, 2), cos, sin)
    assert_close(ops.rotary(q, H, positions=pos, rotary_dim=rd), tq.transpose(1, 2).numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_interleaved_vs_transformers_gptj(rng, rotary_dim):
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions
    B, T, H, D = 2, 7, 3, 16
    rd = rotary_dim or D
    table = create_sinusoidal_positions(3000, rd)
    x = randn(rng, B, T, H, D)
    pos = rng.integers(0, 3000, (B, T))
    sincos = table[torch.from_numpy(pos)]
    sin, cos = torch.split(sincos, rd // 2, dim=-1)
    t = torch.from_numpy(x.copy())
    t[..., :rd] = apply_rotary_pos_emb(t[..., :rd], sin, cos)  # as GPTJAttention does for rotary_dim
    assert_close(ops.rotary(x, H, positions=pos, rotary_dim=rotary_dim, layout="interleaved"), t.numpy(),
                 rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# ALiBi


@pytest.mark.parametrize("num_heads", list(range(1, 13)) + [16, 20, 24, 32, 40, 64])
def test_alibi_slopes_vs_bloom(num_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)  # (H, 1, 2)
    expected = alibi[:, 0, 1].numpy()  # position 1: the slope itself
    slopes = ops.alibi_slopes(num_heads)
    assert slopes.dtype == np.float32 and slopes.shape == (num_heads,)
    assert _ulps(slopes, expected).max() <= 1, (slopes, expected)
    # the paper's sequence, in float64, for powers of two (BLOOM raises a float32-rounded base to the k-th power:
    # k half-ulps of relative error)
    if num_heads & (num_heads - 1) == 0:
        k = np.arange(1, num_heads + 1)
        err = np.abs(slopes / 2.0 ** (-8.0 * k / num_heads) - 1)
        assert (err <= 6e-8 * (k + 1)).all()


# ---------------------------------------------------------------------------------------------------------------
# T5 relative position buckets and bias


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    return T5Attention._relative_position_bucket(torch.from_numpy(np.asarray(rel, np.int64)),
                                                 bidirectional=bidirectional, num_buckets=num_buckets,
                                                 max_distance=max_distance).numpy()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64), (10, 30), (6, 7), (33, 100),
                                                      (64, 1000), (4, 3), (32, 17)])
def test_relative_position_bucket_vs_t5(bidirectional, num_buckets, max_distance):
    if bidirectional and num_buckets < 4:
        pytest.skip("too few buckets for both signs")
    rel = np.concatenate([np.arange(-3000, 3001), [-10**6, 10**6, -2**40, 2**40, 2**62, -2**62]]).astype(np.int64)
    got = ops.relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert got.dtype == np.int64 and got.shape == rel.shape
    np.testing.assert_array_equal(got, t5_bucket(rel, bidirectional, num_buckets, max_distance))
    assert got.min() >= 0 and got.max() < num_buckets
    two_d = rel[:3000].reshape(30, 100)
    np.testing.assert_array_equal(ops.relative_position_bucket(two_d, bidirectional, num_buckets, max_distance),
                                  got[:3000].reshape(30, 100))


def ref_bias(table, T, S, off, bidirectional, max_distance):
    rel = np.arange(S)[None, :] - (off + np.arange(T)[:, None])
    b = t5_bucket(rel, bidirectional, table.shape[0], max_distance)
    return table[b].transpose(2, 0, 1), b


@pytest.mark.parametrize("T,S,off", [(1, 1, 0), (5, 5, 0), (3, 17, 14), (1, 300, 299), (40, 7, 0), (9, 9, -4),
                                     (130, 150, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_forward_backward(rng, threads, T, S, off, bidirectional):
    nb, H, md = 12, 3, 40
    table = randn(rng, nb, H)
    bias = ops.relative_position_bias(table, T, S, query_offset=off, bidirectional=bidirectional, max_distance=md)
    ref, buckets = ref_bias(table, T, S, off, bidirectional, md)
    np.testing.assert_array_equal(bias, ref)
    g = randn(rng, H, T, S)
    start = randn(rng, nb, H)
    tg = start.copy()
    assert ops.relative_position_bias_backward(g, tg, query_offset=off, bidirectional=bidirectional,
                                               max_distance=md) is tg
    expected = start.astype(np.float64)
    for h in range(H):
        np.add.at(expected[:, h], buckets.ravel(), g[h].astype(np.float64).ravel())
    assert_close(tg, expected, rtol=1e-5, atol=1e-5, what="table_grad")


def test_relative_position_bias_vs_t5_compute_bias(rng):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention
    cfg = T5Config(d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128)
    for is_decoder in (False, True):
        cfg.is_decoder = is_decoder
        attn = T5Attention(cfg, has_relative_attention_bias=True)
        with torch.no_grad():
            attn.relative_attention_bias.weight.copy_(torch.from_numpy(randn(rng, 32, 4)))
        table = attn.relative_attention_bias.weight.detach().numpy()
        for T, S, past in [(7, 7, 0), (1, 200, 199), (33, 300, 100)]:
            ref = attn.compute_bias(T, S, past_seen_tokens=past)[0].detach().numpy()
            got = ops.relative_position_bias(table, T, S, query_offset=past, bidirectional=not is_decoder)
            np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize("call,word", [
    (lambda x: ops.rotary(x, 2, rotary_dim=3), "rotary_dim"),
    (lambda x: ops.rotary(x, 2, rotary_dim=10), "rotary_dim"),
    (lambda x: ops.rotary(x, 2, layout="neox-ish"), "layout"),
    (lambda x: ops.rotary(x, 2, theta=-1.0), "theta"),
    (lambda x: ops.rotary(x, 2, theta=float("nan")), "theta"),
    (lambda x: ops.rotary(x, 3), "num_heads"),
    (lambda x: ops.rotary(x.reshape(2, 3, 2, 8), 4), "num_heads"),
    (lambda x: ops.rotary(x, 2, positions=np.zeros((2, 4), np.int64)), "positions"),
    (lambda x: ops.rotary(x, 2, offset=np.zeros(3, np.int64)), "offset"),
    (lambda x: ops.rotary(x, 2, positions=np.zeros(3, np.int64), offset=1), "offset"),
    (lambda x: ops.rotary(x, 2, scaling={"rope_type": "linear"}), "factor"),
    (lambda x: ops.rotary(x, 2, scaling={"rope_type": "linear", "factor": 0.0}), "factor"),
    (lambda x: ops.rotary(x, 2, scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type"),
    (lambda x: ops.rotary(x, 2, scaling=dict(LLAMA3, high_freq_factor=0.5)), "high_freq_factor"),
    (lambda x: ops.rotary(x, 2, scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     "low_freq_factor"),
    (lambda x: ops.rotary(x, 2, scaling=dict(LLAMA3, beta_fast=32)), "beta_fast"),
    (lambda x: ops.rotary(x[0], 2), "x"),
    (lambda x: ops.rotary_inv_freq(1), "head_dim"),
    (lambda x: ops.alibi_slopes(0), "num_heads"),
    (lambda x: ops.relative_position_bucket(np.arange(3), True, 2, 128), "num_buckets"),
    (lambda x: ops.relative_position_bucket(np.arange(3), False, 32, 16), "max_distance"),
    (lambda x: ops.relative_position_bias(np.zeros((32, 4), np.float32), 0, 3), "T"),
    (lambda x: ops.relative_position_bias(np.zeros((32, 4), np.float32), 3, 0), "S"),
    (lambda x: ops.relative_position_bias(np.zeros((32, 4), np.float32), 3, 3, num_buckets=16), "table"),
    (lambda x: ops.relative_position_bias_backward(np.zeros((3, 2, 2), np.float32), np.zeros((32, 4), np.float32)),
     "grad_output"),
    (lambda x: ops.relative_position_bias_backward(np.zeros((4, 2, 2), np.float32), np.zeros((16, 4), np.float32),
                                                   num_buckets=32), "table_grad"),
])
def test_bad_arguments(rng, call, word):
    x = randn(rng, 2, 3, 16)
    with pytest.raises(ValueError, match=word):
        call(x)


def test_rotary_bad_types(rng):
    x = randn(rng, 2, 3, 16)
    with pytest.raises(TypeError, match="positions"):
        ops.rotary(x, 2, positions=np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="scaling"):
        ops.rotary(x, 2, scaling="llama3")
    g = np.zeros((4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="table_grad"):  # never converted: it is written
        ops.relative_position_bias_backward(g, np.asfortranarray(np.zeros((32, 4), np.float32)))
    with pytest.raises(TypeError, match="table_grad"):
        ops.relative_position_bias_backward(g, np.zeros((32, 4), np.float64))


# ---------------------------------------------------------------------------------------------------------------
# layers


def test_rotary_embedding_layer(rng):
    from cpuformer import nn
    layer = nn.RotaryEmbedding(8, rotary_dim=6, theta=500000.0, scaling=dict(LLAMA3))
    assert layer.state_dict() == {} and list(layer.parameters()) == []
    x, pos = randn(rng, 2, 5, 3 * 8), rng.integers(0, 900, (2, 5))
    y = layer(x, 3, positions=pos)
    np.testing.assert_array_equal(y, ops.rotary(x, 3, positions=pos, rotary_dim=6, theta=500000.0, scaling=LLAMA3))
    pos[:] = 0  # the layer keeps its own copy for backward
    g = randn(rng, 2, 5, 24)
    assert_close((y.astype(np.float64) * g).sum(), (x.astype(np.float64) * layer.backward(g)).sum(), rtol=1e-5,
                 atol=1e-4)
    np.testing.assert_array_equal(layer(x.reshape(2, 5, 3, 8)).reshape(2, 5, 24), layer(x))  # heads inferred
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(g[0])
    with pytest.raises(ValueError, match="rotary_dim"):
        nn.RotaryEmbedding(8, rotary_dim=10)
    with pytest.raises(ValueError, match="layout"):
        nn.RotaryEmbedding(8, layout="x")


def test_relative_position_bias_layer(rng):
    from cpuformer import nn
    layer = nn.RelativePositionBias(16, 50, num_heads=3, bidirectional=False)
    assert layer.weight.shape == (16, 3) and list(layer.state_dict()) == ["weight"]
    bias = layer(4, 9, query_offset=5)
    np.testing.assert_array_equal(bias, ref_bias(layer.weight.data, 4, 9, 5, False, 50)[0])
    g = randn(rng, 3, 4, 9)
    assert layer.backward(g) is None
    once = layer.weight.grad.copy()
    layer(4, 9, query_offset=5)
    layer.backward(g)
    assert_close(layer.weight.grad, 2 * once, rtol=1e-6, atol=0)
    assert abs(once.sum() - g.astype(np.float64).sum()) < 1e-3  # every bias element lands in one bucket
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(g[:, :3])
    with pytest.raises(TypeError):
        nn.RelativePositionBias(32, 128, 8)  # num_heads is keyword-only
    with pytest.raises(ValueError, match="num_buckets"):
        nn.RelativePositionBias(2, num_heads=2)
