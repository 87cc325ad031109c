"""The C++ Transformer block (cpuformer.nn.TransformerBlock and the layers over it): forward and backward against
transformers' own decoder layers (Llama, Llama 3 scaling, Qwen2, Qwen3, Mistral, Gemma) and a float64 torch
reference for the other variants (ALiBi, T5 relative bias, interleaved and partial rotary, post-norm LayerNorm,
masks), incremental decoding against the full forward, beams, threads."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cpuformer  # noqa: E402
from cpuformer import nn  # noqa: E402
from testutil import assert_same_in_threads  # noqa: E402

TOL = 2e-4


def rel(a, b, floor=1e-6):
    """Largest difference relative to the reference's largest value (at least ``floor``: a gradient that is zero
    in exact arithmetic, such as a key bias's under softmax, is float32 rounding noise on our side)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


def randomize(module: "torch.nn.Module", rng, std=0.3):
    """Replace every parameter by random values (norm weights around 1), so no test passes on zeros or ones."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name and p.ndim == 1) else 0.0
            p.copy_(torch.tensor(base + std * rng.standard_normal(p.shape), dtype=p.dtype))


# -- transformers' decoder layers ------------------------------------------------------------------------------

def _hf_case(kind):
    """(transformers config, TransformerBlock kwargs)."""
    common = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, max_position_embeddings=256)
    ours = dict(num_kv_heads=2, norm="rms_norm", norm_eps=1e-6, activation="silu", gated=True, position="rotary")
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=500.0)
        ours.update(rope_theta=500.0)
    elif kind == "llama3":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16, rope_theta=10000.0)
        cfg = transformers.LlamaConfig(**common, rope_scaling=scaling)
        ours.update(rope_scaling=scaling)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        ours.update(attention_bias=True)  # q, k, v biases (o_proj has none: patched below)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16)
        ours.update(qk_norm=True, head_dim=16)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=5)
        ours.update(sliding_window=5)
    elif kind == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=16, hidden_activation="gelu_pytorch_tanh")
        ours.update(head_dim=16, norm_one_plus=True, activation="gelu_tanh")
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    return cfg, ours


def _hf_layer(kind, cfg):
    mod = {"llama": "llama", "llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
           "gemma": "gemma"}[kind]
    m = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"])
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma": "Gemma"}[mod]
    layer = getattr(m, f"{prefix}DecoderLayer")(cfg, layer_idx=0)
    rotary = getattr(m, f"{prefix}RotaryEmbedding")(config=cfg)
    return layer, rotary


def _causal_mask(T, window=None, offset=0):
    q = torch.arange(T)[:, None] + offset
    k = torch.arange(T + offset)[None, :]
    ok = k <= q
    if window:
        ok &= k > q - window
    return torch.where(ok, 0.0, float("-inf"))[None, None]


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "qwen3", "mistral", "gemma"])
def test_decoder_layer_matches_transformers(kind):
    rng = np.random.default_rng(1)
    cfg, kw = _hf_case(kind)
    layer, rotary = _hf_layer(kind, cfg)
    randomize(layer, rng)
    if kind == "gemma":  # GemmaRMSNorm scales by 1 + w: keep w around 0
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if "norm" in n:
                    p.sub_(1.0)
    ours = nn.TransformerBlock(32, 4, 48, **kw)
    sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
    if kind == "qwen2":
        ours.self_attn.o_proj.bias = None  # Qwen2: biases on q, k, v only
        object.__setattr__(ours.self_attn.o_proj, "bias", None)
    ours.load_state_dict(sd)
    B, T = 2, 19
    x = rng.standard_normal((B, T, 32)).astype(np.float32)
    g = rng.standard_normal((B, T, 32)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    pos = torch.arange(T)[None].expand(B, T)
    cos_sin = rotary(xt, pos)
    yt = layer(xt, attention_mask=_causal_mask(T, kw.get("sliding_window")), position_ids=pos,
               position_embeddings=cos_sin)
    yt = yt[0] if isinstance(yt, tuple) else yt
    (yt * torch.tensor(g)).sum().backward()
    y = ours(x, is_causal=True)
    assert rel(y, yt.detach().numpy()) <= TOL
    assert rel(ours.backward(g), xt.grad.numpy()) <= TOL
    ours_params = dict(ours.named_parameters())
    for name, p in layer.named_parameters():
        assert rel(ours_params[name].grad, p.grad.numpy(), 0.05) <= TOL, name
    # the eval-mode forward without saving (inference) gives the same output
    ours.eval()
    np.testing.assert_allclose(ours.inference(x, is_causal=True), y, rtol=0, atol=1e-6)


# -- a float64 reference for the other variants ----------------------------------------------------------------

def _t5_bucket(rel_pos, bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    return T5Attention._relative_position_bucket(rel_pos, bidirectional=bidirectional, num_buckets=num_buckets,
                                                 max_distance=max_distance)


def _rotate(x, pos, rotary_dim, theta, layout):
    """Rotary on (B, T, H, D) float64, written out independently of the kernels."""
    D = x.shape[-1]
    r = rotary_dim or D
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = pos[..., None].double() * inv  # (B, T, r/2)
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    xr, rest = x[..., :r], x[..., r:]
    if layout == "half":
        a, b = xr[..., : r // 2], xr[..., r // 2:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    return torch.cat([out, rest], -1)


def _reference(block: "nn.TransformerBlock", kw: dict, x, causal, padding=None, additive=None):
    """The block in float64 torch, from its parameters and config; returns (out, input tensor, param tensors)."""
    P = {n: torch.tensor(p.data.astype(np.float64), requires_grad=True) for n, p in block.named_parameters()}
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    B, T, C = x.shape
    H, KVH, D = block.num_heads, block.num_kv_heads, block.head_dim
    eps = kw.get("norm_eps", 1e-6)

    def norm(h, name):
        if kw.get("norm", "rms_norm") == "rms_norm":
            return h * torch.rsqrt((h * h).mean(-1, keepdim=True) + eps) * P[name + ".weight"]
        out = torch.nn.functional.layer_norm(h, (C,), eps=eps)
        out = out * P[name + ".weight"]
        return out + P[name + ".bias"] if name + ".bias" in P else out

    def lin(h, name):
        y = h @ P[name + ".weight"].T
        return y + P[name + ".bias"] if name + ".bias" in P else y

    def act(u):
        a = kw.get("activation", "silu")
        return {"silu": torch.nn.functional.silu, "relu": torch.relu,
                "gelu": torch.nn.functional.gelu,
                "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh")}[a](u)

    def attention(h):
        q = lin(h, "self_attn.q_proj").view(B, T, H, D)
        k = lin(h, "self_attn.k_proj").view(B, T, KVH, D)
        v = lin(h, "self_attn.v_proj").view(B, T, KVH, D)
        pos = torch.arange(T)[None].expand(B, T)
        if kw.get("position") == "rotary":
            q = _rotate(q, pos, kw.get("rotary_dim"), kw.get("rope_theta", 10000.0), kw.get("rotary_layout", "half"))
            k = _rotate(k, pos, kw.get("rotary_dim"), kw.get("rope_theta", 10000.0), kw.get("rotary_layout", "half"))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = k.repeat_interleave(H // KVH, 1)
        v = v.repeat_interleave(H // KVH, 1)
        scale = kw.get("attention_scale") or 1 / math.sqrt(D)
        s = q @ k.transpose(-1, -2) * scale
        qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
        if kw.get("position") == "alibi":
            slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], dtype=torch.float64)
            s = s + slopes[:, None, None] * (ki - qi)
        if kw.get("position") == "relative":
            bucket = _t5_bucket(ki - qi, kw.get("relative_bidirectional", True), kw.get("relative_num_buckets", 32),
                                kw.get("relative_max_distance", 128))
            s = s + P["self_attn.relative_attention_bias.weight"][bucket].permute(2, 0, 1)
        if causal:
            s = s.masked_fill(ki > qi, float("-inf"))
        if kw.get("sliding_window"):
            s = s.masked_fill(ki <= qi - kw["sliding_window"], float("-inf"))
        if additive is not None:
            add = torch.tensor(additive.astype(np.float64))
            s = s + (add[:, None] if add.ndim == 3 else add)
        if padding is not None:
            s = s.masked_fill(torch.tensor(padding)[:, None, None, :], float("-inf"))
        a = torch.softmax(s, -1) @ v
        return lin(a.transpose(1, 2).reshape(B, T, H * D), "self_attn.o_proj")

    def mlp(h):
        up = lin(h, "mlp.up_proj")
        hidden = act(lin(h, "mlp.gate_proj")) * up if kw.get("gated", True) else act(up)
        return lin(hidden, "mlp.down_proj")

    if kw.get("norm_first", True):
        h = xt + attention(norm(xt, "input_layernorm"))
        out = h + mlp(norm(h, "post_attention_layernorm"))
    else:
        h = norm(xt + attention(xt), "input_layernorm")
        out = norm(h + mlp(h), "post_attention_layernorm")
    return out, xt, P


VARIANTS = {
    "alibi-gqa": dict(position="alibi", num_kv_heads=2),
    "t5-relative-bidirectional": dict(position="relative", relative_num_buckets=8, relative_max_distance=12,
                                      attention_scale=1.0, activation="relu", gated=False),
    "t5-relative-causal": dict(position="relative", relative_bidirectional=False, relative_num_buckets=6,
                               relative_max_distance=9, activation="gelu", gated=True),
    "rotary-interleaved-partial": dict(position="rotary", rotary_layout="interleaved", rotary_dim=4, rope_theta=100.0),
    "rotary-half-partial-mqa": dict(position="rotary", rotary_dim=6, num_kv_heads=1),
    "post-norm-layernorm": dict(norm="layer_norm", norm_first=False, norm_bias=True, attention_bias=True,
                                mlp_bias=True, position="none", activation="gelu_tanh", gated=False),
    "layernorm-no-bias-window": dict(norm="layer_norm", norm_bias=False, position="rotary", sliding_window=3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "additive"])
def test_block_variants_match_float64_reference(variant, causal, masks):
    kw = dict(VARIANTS[variant])
    rng = np.random.default_rng(abs(hash((variant, causal, masks))) % 2**32)
    nn.init.manual_seed(5)
    block = nn.TransformerBlock(24, 4, 20, norm_eps=1e-5, **kw)
    for p in block.parameters():
        p.data[...] += 0.2 * rng.standard_normal(p.data.shape).astype(np.float32)
    kw.setdefault("norm_eps", 1e-5)
    B, T = 3, 11
    x = rng.standard_normal((B, T, 24)).astype(np.float32)
    g = rng.standard_normal((B, T, 24)).astype(np.float32)
    padding = additive = None
    if masks == "padding":
        padding = np.zeros((B, T), bool)
        padding[1, 9:] = True  # trailing keys only: no query row is left with no key to see
        padding[2, 10:] = True
    elif masks == "additive":  # (T, T), or per batch row with a relative bias (combined into one per-call bias)
        shape = (B, T, T) if kw.get("position") == "relative" else (T, T)
        additive = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    ref, xt, P = _reference(block, kw, x, causal, padding, additive)
    (ref * torch.tensor(g.astype(np.float64))).sum().backward()
    y = block(x, is_causal=causal, key_padding_mask=padding, attn_mask=additive)
    assert rel(y, ref.detach().numpy()) <= TOL
    assert rel(block.backward(g), xt.grad.numpy()) <= TOL
    for name, p in block.named_parameters():
        assert rel(p.grad, P[name].grad.numpy(), 0.05) <= TOL, name


def test_dropout_is_seeded_and_backward_consistent():
    """Training-mode dropout: the backward regenerates the forward's masks (finite differences along a random
    direction with the same seed)."""
    rng = np.random.default_rng(3)
    nn.init.manual_seed(9)
    block = nn.TransformerBlock(16, 2, 24, dropout=0.3, position="rotary")
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    g = rng.standard_normal((2, 7, 16)).astype(np.float32)
    cfg = block.block_config
    w = block._weights()
    saved = cpuformer._core.BlockSaved()
    y = cpuformer._core.block_forward_train(cfg, w, x, 1234, saved, is_causal=True)
    y2 = cpuformer._core.block_forward_train(cfg, w, x, 1234, cpuformer._core.BlockSaved(), is_causal=True)
    np.testing.assert_array_equal(y, y2)  # same seed, same masks
    assert not np.allclose(y, cpuformer._core.block_forward(cfg, w, x, is_causal=True))  # dropout did something
    _, grads = block._weights_and_grads()
    dx, _ = cpuformer._core.block_backward(cfg, w, grads, g, saved)
    d = rng.standard_normal(x.shape)
    eps = 1e-3

    def f(z):
        out = cpuformer._core.block_forward_train(cfg, w, z.astype(np.float32), 1234, cpuformer._core.BlockSaved(),
                                                  is_causal=True)
        return float((out.astype(np.float64) * g).sum())

    numeric = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
    assert abs(numeric - float((dx * d).sum())) <= 2e-2 * max(1.0, abs(numeric))


@pytest.mark.parametrize("kind", ["gated-pre-norm", "gelu-post-norm"])
def test_feed_forward_activation_not_kept_when_nothing_reads_it(kind):
    """keep_ff_activation = False (what fine-tuning sets when the MLP's down projection is frozen and has no
    adapter): the forward's output, the input gradient and every other gradient are bitwise those of a forward that
    kept it; a down-projection gradient is refused by name instead of read from memory that was not kept."""
    rng = np.random.default_rng(11)
    nn.init.manual_seed(4)
    kw = VARIANTS["post-norm-layernorm"] if kind == "gelu-post-norm" else dict(position="rotary", gated=True)
    block = nn.TransformerBlock(16, 2, 24, **kw)
    x = rng.standard_normal((2, 9, 16)).astype(np.float32)
    g = rng.standard_normal((2, 9, 16)).astype(np.float32)
    cfg, w = block.block_config, block._weights()
    outs = []
    for keep in (True, False):
        _, grads = block._weights_and_grads()
        grads = {k: np.zeros_like(v) for k, v in grads.items() if not k.startswith("ff.down.")}
        saved = cpuformer._core.BlockSaved()
        saved.keep_ff_activation = keep
        y = cpuformer._core.block_forward_train(cfg, w, x, 0, saved, is_causal=True)
        # a forward of another block in between: the work buffers this thread shares between layers are reused
        cpuformer._core.block_forward_train(cfg, w, 2 * x, 0, cpuformer._core.BlockSaved(), is_causal=True)
        dx, _ = cpuformer._core.block_backward(cfg, w, grads, g, saved)
        outs.append((y, dx, grads))
        if not keep:
            _, with_down = block._weights_and_grads()
            with pytest.raises(ValueError, match="keep_ff_activation"):
                cpuformer._core.block_backward(cfg, w, with_down, g, saved)
    (y1, dx1, g1), (y2, dx2, g2) = outs
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)


# -- incremental decoding --------------------------------------------------------------------------------------

DECODE = {
    "llama-gqa": dict(num_kv_heads=2),
    "alibi": dict(position="alibi"),
    "relative-causal": dict(position="relative", relative_bidirectional=False, relative_num_buckets=8,
                            relative_max_distance=16),
    "window": dict(sliding_window=4),
    "qk-norm-interleaved": dict(qk_norm=True, rotary_layout="interleaved"),
}


@pytest.mark.parametrize("variant", sorted(DECODE))
def test_decode_equals_full_forward(variant):
    """Prompts of different lengths in one batch, then one token at a time: every position's output equals the
    full causal forward of that row alone."""
    rng = np.random.default_rng(11)
    nn.init.manual_seed(2)
    block = nn.TransformerBlock(32, 4, 40, **DECODE[variant]).eval()
    lengths = [5, 1, 3]
    steps = 4
    total = max(lengths) + steps
    seqs = [rng.standard_normal((lengths[b] + steps, 32)).astype(np.float32) for b in range(3)]
    cache = block.new_cache(3, total)
    prompt = np.zeros((3, max(lengths), 32), np.float32)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b][:n]
    out = block.decode(prompt, cache, new_tokens=np.array(lengths))
    assert cache.length == lengths
    got = [[out[b, :n]] for b, n in enumerate(lengths)]
    for s in range(steps):
        x = np.stack([seqs[b][lengths[b] + s] for b in range(3)])[:, None]
        got_s = block.decode(x, cache)
        for b in range(3):
            got[b].append(got_s[b])
    for b in range(3):
        full = block(seqs[b][None], is_causal=True)[0]
        np.testing.assert_allclose(np.concatenate(got[b]), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", sorted(DECODE) + ["post-norm", "cross-attention"])
def test_decode_output_rows_equal_those_rows_of_the_full_decode(variant):
    """output_rows: one position per row carried past the keys and values (a prompt's last token in the last
    block) gives that row of the full decode, and the cache it leaves is the full decode's bit for bit, so the
    steps after it agree too."""
    rng = np.random.default_rng(12)
    nn.init.manual_seed(3)
    if variant == "cross-attention":  # torch's decoder layer (post-norm)
        block = nn.TransformerDecoderLayer(32, 4, 40, batch_first=True).eval()
    else:
        kw = dict(norm_first=False) if variant == "post-norm" else DECODE[variant]
        block = nn.TransformerBlock(32, 4, 40, **kw).eval()
    lengths = np.array([5, 1, 3])
    prompt = rng.standard_normal((3, 5, 32)).astype(np.float32)
    extra = {}
    if variant == "cross-attention":
        memory = rng.standard_normal((3, 6, 32)).astype(np.float32)
        pad = np.zeros((3, 6), bool)
        pad[1, 4:] = True
        extra = dict(cross=block.cross_cache(memory), memory_key_padding_mask=pad)
    full_cache, some_cache = block.new_cache(3, 8), block.new_cache(3, 8)
    full = block.decode(prompt, full_cache, new_tokens=lengths, **extra)
    for rows in (lengths - 1, np.array([0, 0, 1])):
        cache = block.new_cache(3, 8)
        some = block.decode(prompt, cache, new_tokens=lengths, output_rows=rows, **extra)
        assert some.shape == (3, 1, 32)
        np.testing.assert_allclose(some[:, 0], full[np.arange(3), rows], rtol=0, atol=2e-5)
        assert cache.length == full_cache.length
    block.decode(prompt, some_cache, new_tokens=lengths, output_rows=lengths - 1, **extra)
    nxt = rng.standard_normal((3, 1, 32)).astype(np.float32)
    np.testing.assert_array_equal(block.decode(nxt, some_cache, **extra), block.decode(nxt, full_cache, **extra))
    with pytest.raises(ValueError, match=r"output_rows\[1\]"):
        block.decode(prompt, block.new_cache(3, 8), new_tokens=lengths, output_rows=np.array([4, 1, 2]), **extra)
    with pytest.raises(ValueError, match="output_rows must have shape"):
        block.decode(prompt, block.new_cache(3, 8), new_tokens=lengths, output_rows=np.array([4, 0]), **extra)


def test_cache_reorder_for_beams():
    rng = np.random.default_rng(4)
    nn.init.manual_seed(4)
    block = nn.TransformerBlock(16, 2, 24).eval()
    a = rng.standard_normal((2, 6, 16)).astype(np.float32)
    cache = block.new_cache(2, 8)
    block.decode(a, cache)
    cache.reorder(np.array([1, 1, 0], np.int64))  # three beams: two from row 1, one from row 0
    assert cache.batch == 3 and cache.length == [6, 6, 6]
    nxt = rng.standard_normal((3, 1, 16)).astype(np.float32)
    got = block.decode(nxt, cache)
    for i, src in enumerate([1, 1, 0]):
        full = block(np.concatenate([a[src], nxt[i]])[None], is_causal=True)[0, -1]
        np.testing.assert_allclose(got[i, 0], full, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="row 5"):
        cache.reorder(np.array([5], np.int64))
    with pytest.raises(ValueError, match="capacity"):
        block.decode(rng.standard_normal((3, 3, 16)).astype(np.float32), cache)


@pytest.mark.parametrize("rows", [[2, 0, 1], [1, 0, 2], [0, 0, 0], [2, 2], [1], [3, 1, 1, 0, 2, 3, 0], [0, 1, 2, 3]])
def test_cache_reorder_moves_rows_of_different_lengths(rows):
    """Any map (cycles, one source for many rows, fewer or more rows): each new row continues its source row."""
    rng = np.random.default_rng(5)
    nn.init.manual_seed(5)
    block = nn.TransformerBlock(16, 2, 24).eval()
    lengths = [5, 2, 7, 3]
    prompts = rng.standard_normal((4, 7, 16)).astype(np.float32)
    cache = block.new_cache(4, 12)
    block.decode(prompts, cache, new_tokens=np.array(lengths))
    cache.reorder(np.array(rows, np.int64))
    assert cache.batch == len(rows) and cache.length == [lengths[r] for r in rows]
    nxt = rng.standard_normal((len(rows), 1, 16)).astype(np.float32)
    got = block.decode(nxt, cache)
    for i, src in enumerate(rows):
        full = block(np.concatenate([prompts[src, :lengths[src]], nxt[i]])[None], is_causal=True)[0, -1]
        np.testing.assert_allclose(got[i, 0], full, rtol=0, atol=2e-5)


def test_threads_share_one_eval_block():
    """Many threads calling one eval-mode block get their single-thread results."""
    rng = np.random.default_rng(8)
    nn.init.manual_seed(8)
    block = nn.TransformerBlock(32, 4, 48, num_kv_heads=2).eval()
    xs = [rng.standard_normal((2, 5 + i, 32)).astype(np.float32) for i in range(6)]
    assert_same_in_threads([lambda x=x: block(x, is_causal=True) for x in xs], repeats=20)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="num_kv_heads"):
        nn.TransformerBlock(32, 4, 48, num_kv_heads=3)
    with pytest.raises(ValueError, match="position"):
        nn.TransformerBlock(32, 4, 48, position="spiral")
    with pytest.raises(ValueError, match="rotary_dim"):
        nn.TransformerBlock(32, 4, 48, rotary_dim=5)
    with pytest.raises(TypeError, match="unknown argument"):
        cpuformer._core.BlockConfig(d_model=8, num_heads=2, bogus=1)
    block = nn.TransformerBlock(32, 4, 48)
    with pytest.raises(ValueError, match="input must be"):
        block(np.zeros((2, 3, 31), np.float32))
    with pytest.raises(ValueError, match="grad_output must have"):
        block(np.zeros((2, 3, 32), np.float32))
        block.backward(np.zeros((2, 4, 32), np.float32))
    with pytest.raises(ValueError, match="key_padding_mask"):
        block(np.zeros((2, 3, 32), np.float32), key_padding_mask=np.zeros((2, 4), bool))


@pytest.mark.parametrize("activation,hf_act", [("silu", "silu"), ("gelu_tanh", "gelu_pytorch_tanh"),
                                               ("gelu", "gelu")])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_feed_forward_matches_llama_mlp(activation, hf_act, bias):
    from transformers.models.llama.modeling_llama import LlamaMLP
    rng = np.random.default_rng(12)
    cfg = transformers.LlamaConfig(hidden_size=20, intermediate_size=36, hidden_act=hf_act, mlp_bias=bias,
                                   num_attention_heads=2, num_key_value_heads=2)
    mlp = LlamaMLP(cfg)
    randomize(mlp, rng)
    ff = nn.FeedForward(20, 36, activation=activation, bias=bias, gated=True)
    sd = {k.replace("gate_proj", "linear_gate").replace("up_proj", "linear1").replace("down_proj", "linear2"):
          v.detach().numpy() for k, v in mlp.state_dict().items()}
    ff.load_state_dict(sd)
    x = rng.standard_normal((3, 7, 20)).astype(np.float32)
    g = rng.standard_normal((3, 7, 20)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = mlp(xt)
    (yt * torch.tensor(g)).sum().backward()
    assert rel(ff(x), yt.detach().numpy()) <= TOL
    assert rel(ff.backward(g), xt.grad.numpy()) <= TOL
    for ours, theirs in (("linear_gate", "gate_proj"), ("linear1", "up_proj"), ("linear2", "down_proj")):
        assert rel(getattr(ff, ours).weight.grad, getattr(mlp, theirs).weight.grad.numpy(), 0.05) <= TOL
        if bias:
            assert rel(getattr(ff, ours).bias.grad, getattr(mlp, theirs).bias.grad.numpy(), 0.05) <= TOL
    ff.eval()
    y = ff(x)
    np.testing.assert_allclose(nn.freeze(ff)(x), y, rtol=0, atol=1e-5)
    q = nn.quantize_dynamic(ff)(x)
    assert rel(q, y) < 0.05


@pytest.mark.parametrize("llama", [False, True])
def test_gpt_generates_prompts_of_different_lengths_in_one_batch(llama):
    from cpuformer.models import GPT
    nn.init.manual_seed(21)
    kw = dict(norm="rms_norm", positional="rotary", activation="silu", gated=True, n_kv_head=1, bias=False,
              tie_weights=False) if llama else {}
    model = GPT(50, 32, 2, 4, 32, **kw).eval()
    rng = np.random.default_rng(21)
    prompts = [rng.integers(0, 50, n) for n in (1, 6, 3)]
    got = model.generate(prompts, 8, greedy=True)
    for p, g in zip(prompts, got):
        np.testing.assert_array_equal(g, model.generate(p[None], 8, greedy=True)[0])
    # past the position window the rows fall back to one at a time, with the same results
    far = model.generate(prompts, 30, greedy=True)
    for p, g in zip(prompts, far):
        np.testing.assert_array_equal(g, model.generate(p[None], 30, greedy=True)[0])
