"""Attention variants of the fused kernel: grouped-query / multi-query heads, sliding windows (with and without
causal), ALiBi, decoding positions (query offsets and key lengths per batch row), additive masks broadcast over batch
or heads and their gradient. Checked against a float64 NumPy reference that materialises the scores (forward, lse,
weights, dq/dk/dv and the mask gradient), float64 finite differences of that reference, torch's
scaled_dot_product_attention(enable_gqa=True), odd sizes, thread-count independence, and bad arguments."""
from __future__ import annotations

import numpy as np
import pytest

import cpuformer
from cpuformer import _core, ops
from testutil import SIMD_PATHS, assert_close, assert_same_in_threads, randn


def _mask4(a, B, H, T, S):
    """An additive mask in any accepted layout as a (B|1, H|1, T, S) float64 view."""
    a = np.asarray(a, np.float64)
    if a.ndim == 2:
        return a[None, None]
    if a.ndim == 3:
        return a.reshape(B, H, T, S) if a.shape[0] == B * H and H > 1 else a[:, None]
    return a


def ref(q, k, v, H, kvh=None, additive=None, padding=None, causal=False, window=0, offset=None, key_length=None,
        slopes=None, grad=None):
    """float64 reference with materialised scores. Returns out (B, T, E), p (B, H, T, S), lse (B, H, T) and, when
    grad (B, T, E) is given, (dq, dk, dv, dscores (B, H, T, S))."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, E = q.shape
    S, D = k.shape[1], E // H
    kvh = kvh or H
    G = H // kvh
    qh = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(B, S, kvh, D).transpose(0, 2, 1, 3), G, axis=1)
    vh = np.repeat(v.reshape(B, S, kvh, D).transpose(0, 2, 1, 3), G, axis=1)
    scale = 1 / np.sqrt(D)
    s = qh @ kh.transpose(0, 1, 3, 2) * scale
    if additive is not None:
        s = s + _mask4(additive, B, H, T, S)
    pos = (np.zeros(B, np.int64) if offset is None else np.broadcast_to(np.asarray(offset), (B,)))[:, None] + \
        np.arange(T)[None]  # (B, T)
    sidx = np.arange(S)
    if slopes is not None:
        s = s + np.asarray(slopes, np.float64)[None, :, None, None] * (sidx[None, None, None] - pos[:, None, :, None])
    vis = np.ones((B, 1, T, S), bool)
    if padding is not None:
        vis &= ~np.asarray(padding, bool)[:, None, None, :]
    if causal:
        vis &= sidx[None, None, None] <= pos[:, None, :, None]
    if window:
        vis &= sidx[None, None, None] > pos[:, None, :, None] - window
    if key_length is not None:
        vis &= sidx[None, None, None] < np.broadcast_to(np.asarray(key_length), (B,))[:, None, None, None]
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    with np.errstate(divide="ignore"):
        lse = np.where(z[..., 0] > 0, m[..., 0] + np.log(z[..., 0]), -np.inf)
    out = (p @ vh).transpose(0, 2, 1, 3).reshape(B, T, E)
    if grad is None:
        return out, p, lse
    g = np.asarray(grad, np.float64).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dp = g @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    group_sum = lambda x: x.reshape(B, kvh, G, S, D).sum(2)  # noqa: E731
    dq = (ds @ kh * scale).transpose(0, 2, 1, 3).reshape(B, T, E)
    dk = group_sum(ds.transpose(0, 1, 3, 2) @ qh * scale).transpose(0, 2, 1, 3).reshape(B, S, kvh * D)
    dv = group_sum(p.transpose(0, 1, 3, 2) @ g).transpose(0, 2, 1, 3).reshape(B, S, kvh * D)
    return out, p, lse, (dq, dk, dv, ds)


def reduce_mask_grad(ds, shape, B, H):
    """The (B, H, T, S) score gradient summed down to an additive mask's layout."""
    T, S = ds.shape[2:]
    if len(shape) == 2:
        return ds.sum((0, 1))
    if len(shape) == 3:
        return ds.reshape(B * H, T, S) if shape[0] == B * H and H > 1 else ds.sum(1)
    return ds.sum(tuple(i for i in (0, 1) if shape[i] == 1), keepdims=True)


def alibi(H):
    return (2.0 ** (-8.0 * np.arange(1, H + 1) / H)).astype(np.float32)


def make_case(rng, B, T, S, H, kvh, positions, extra):
    """Keyword arguments of ops.attention and of ref for one combination."""
    kw = {}
    if positions in ("causal", "window_causal", "decode", "decode_window"):
        kw["is_causal"] = True
    if positions in ("window", "window_causal", "decode_window"):
        kw["window"] = max(1, min(S, T) // 2)
    if positions in ("decode", "decode_window"):
        kw["key_length"] = rng.integers(max(1, S // 2), S + 1, B)
        kw["query_offset"] = np.maximum(kw["key_length"] - T, 0) + rng.integers(0, 2, B)
    if extra == "alibi":
        kw["alibi_slopes"] = alibi(H)
    elif extra == "mask_ts":  # broadcast over batch and heads
        kw["attn_mask"] = randn(rng, T, S)
    elif extra == "mask_bts":  # broadcast over heads
        kw["attn_mask"] = randn(rng, B, T, S)
    elif extra == "mask_1hts":  # broadcast over batch (a learned per-head position bias)
        kw["attn_mask"] = randn(rng, 1, H, T, S)
    elif extra == "mask_bhts":
        kw["attn_mask"] = randn(rng, B * H, T, S)
    elif extra == "padding":
        pad = rng.random((B, S)) < 0.3
        pad[:, 0] = False
        kw["key_padding_mask"] = pad
    rkw = dict(kvh=kvh, additive=kw.get("attn_mask"), padding=kw.get("key_padding_mask"),
               causal=kw.get("is_causal", False), window=kw.get("window", 0), offset=kw.get("query_offset"),
               key_length=kw.get("key_length"), slopes=kw.get("alibi_slopes"))
    return kw, rkw


POSITIONS = ["none", "causal", "window", "window_causal", "decode", "decode_window"]
EXTRAS = ["none", "alibi", "mask_ts", "mask_bts", "mask_1hts", "mask_bhts", "padding"]
KV = [(4, 4), (4, 2), (4, 1)]  # (H, KVH): multi-head, grouped-query, multi-query


def run_and_check(rng, B, T, S, D, H, kvh, positions, extra, grad_tol=1e-3):
    E = H * D
    q, k, v = randn(rng, B, T, E), randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D)
    g = randn(rng, B, T, E)
    kw, rkw = make_case(rng, B, T, S, H, kvh, positions, extra)
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, **kw)
    r_out, r_p, r_lse, (r_dq, r_dk, r_dv, r_ds) = ref(q, k, v, H, grad=g, **rkw)
    assert_close(out, r_out, rtol=1e-4, atol=2e-6, what="out")
    fin = np.isfinite(r_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    assert_close(lse[fin], r_lse[fin], rtol=1e-5, atol=1e-5, what="lse")
    assert_close(ops.attention_weights(q, k, H, num_kv_heads=kvh, **kw), r_p, rtol=1e-4, atol=1e-7, what="weights")
    dmask = None
    if "attn_mask" in kw:
        dmask = np.zeros(kw["attn_mask"].shape, np.float32)
        kw = dict(kw, grad_attn_mask=dmask)
    dq, dk, dv = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, **kw)
    grads = [("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)]
    if dmask is not None:
        grads.append(("dmask", dmask, reduce_mask_grad(r_ds, dmask.shape, B, H)))
    for name, ours, theirs in grads:
        assert_close(ours, theirs, rtol=grad_tol, atol=2e-5 * max(1.0, np.abs(theirs).max()), what=name)


@pytest.mark.parametrize("H,kvh", KV)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("extra", EXTRAS)
def test_every_combination_matches_float64_reference(rng, simd, H, kvh, positions, extra):
    run_and_check(rng, 2, 5, 7, 3, H, kvh, positions, extra)


# Odd sizes: T = 1 (decoding), S = 1, D = 1, T != S, sizes that are not multiples of the 64..256-row query tiles and
# 256-key tiles, T > 256 so several query tiles and key tiles are crossed (and windows skip whole key tiles).
ODD = [(1, 1, 1, 1, 2, 1), (2, 1, 9, 1, 4, 2), (2, 7, 1, 2, 2, 2), (1, 300, 520, 4, 4, 2), (1, 257, 300, 3, 2, 1),
       (2, 70, 600, 16, 2, 2), (1, 520, 520, 8, 2, 1)]
ODD_OPTIONS = [("decode", "none"), ("window_causal", "alibi"), ("window", "mask_1hts"), ("causal", "mask_ts"),
               ("decode_window", "mask_bts")]


@pytest.mark.parametrize("B,T,S,D,H,kvh", ODD)
@pytest.mark.parametrize("positions,extra", ODD_OPTIONS)
def test_odd_sizes(rng, threads, B, T, S, D, H, kvh, positions, extra):
    run_and_check(rng, B, T, S, D, H, kvh, positions, extra, grad_tol=2e-3)


def test_sliding_window_skips_tiles_at_long_sequences(rng):
    # A 64-key window over 1100 keys with queries at the end of a cache: most key tiles are invisible.
    B, T, S, D, H, kvh = 2, 300, 1100, 8, 2, 1
    q, k, v, g = randn(rng, B, T, H * D), randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D), randn(rng, B, T, H * D)
    kw = dict(is_causal=True, window=64, query_offset=np.array([800, 750]), key_length=np.array([1100, 1050]))
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, **kw)
    r_out, _, _, (r_dq, r_dk, r_dv, _) = ref(q, k, v, H, kvh=kvh, causal=True, window=64, offset=kw["query_offset"],
                                             key_length=kw["key_length"], grad=g)
    assert_close(out, r_out, rtol=1e-4, atol=2e-6)
    for ours, theirs in zip(ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, **kw),
                            (r_dq, r_dk, r_dv)):
        assert_close(ours, theirs, rtol=1e-3, atol=2e-5 * max(1.0, np.abs(theirs).max()))


def test_keys_past_key_length_are_never_read(rng, threads):
    """A decode cache holds garbage past each row's length: NaN there must not reach the output or gradients."""
    B, T, S, D, H, kvh = 3, 4, 300, 8, 4, 2
    q, g = randn(rng, B, T, H * D), randn(rng, B, T, H * D)
    k, v = randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D)
    length = np.array([300, 261, 5])
    for b, n in enumerate(length):
        k[b, n:] = np.nan
        v[b, n:] = np.nan
    kw = dict(is_causal=True, key_length=length, query_offset=length - T, alibi_slopes=alibi(H))
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, **kw)
    assert np.isfinite(out).all()
    dq, dk, dv = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, **kw)
    assert np.isfinite(dq).all()
    for b, n in enumerate(length):
        assert np.isfinite(dk[b, :n]).all() and np.isfinite(dv[b, :n]).all()
        assert (dk[b, n:] == 0).all() and (dv[b, n:] == 0).all()
    w = ops.attention_weights(q, k, H, num_kv_heads=kvh, **kw)
    assert np.isfinite(w).all()
    kc, vc = np.nan_to_num(k), np.nan_to_num(v)
    r_out, r_p, _ = ref(q, kc, vc, H, kvh=kvh, causal=True, key_length=length, offset=length - T,
                        slopes=kw["alibi_slopes"])
    assert_close(out, r_out, rtol=1e-4, atol=2e-6)
    assert_close(w, r_p, rtol=1e-4, atol=1e-7)


def test_fully_masked_rows(rng, threads):
    """key_length 0, a window that ends before the first key, and causal rows before every key: zeros, lse = -inf,
    zero gradients (including the mask's)."""
    B, T, S, D, H, kvh = 3, 6, 9, 4, 4, 2
    q, k, v, g = randn(rng, B, T, H * D), randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D), randn(rng, B, T, H * D)
    mask = randn(rng, T, S)
    kw = dict(is_causal=True, window=2, key_length=np.array([0, 3, 9]), query_offset=np.array([0, 5, 0]),
              attn_mask=mask)
    # batch 0: no keys; batch 1: positions 5..10, window keeps s > pos - 2, but only 3 keys exist: all masked.
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, **kw)
    assert (out[:2] == 0).all() and np.isneginf(lse[:2]).all()
    assert np.isfinite(lse[2]).all()
    dmask = np.zeros_like(mask)
    dq, dk, dv = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, grad_attn_mask=dmask, **kw)
    for x in (dq, dk, dv):
        assert (x[:2] == 0).all()
    r_out, _, _, (r_dq, r_dk, r_dv, r_ds) = ref(q, k, v, H, kvh=kvh, causal=True, window=2, additive=mask,
                                                 key_length=kw["key_length"], offset=kw["query_offset"], grad=g)
    assert_close(out, r_out, rtol=1e-4, atol=2e-6)
    assert_close(dmask, r_ds.sum((0, 1)), rtol=1e-3, atol=1e-5)
    assert (ops.attention_weights(q, k, H, num_kv_heads=kvh, **kw)[:2] == 0).all()


def test_gradients_match_float64_finite_differences(rng):
    """Dropout-free central differences of the float64 reference against our dq, dk, dv and mask gradient, with GQA,
    a causal sliding window, ALiBi, offsets and key lengths and a mask broadcast over batch."""
    B, T, S, D, H, kvh = 2, 3, 6, 2, 4, 2
    q, k, v = rng.standard_normal((B, T, H * D)), rng.standard_normal((B, S, kvh * D)), \
        rng.standard_normal((B, S, kvh * D))
    mask = rng.standard_normal((1, H, T, S))
    g = rng.standard_normal((B, T, H * D))
    pkw = dict(is_causal=True, window=3, query_offset=np.array([2, 1]), key_length=np.array([6, 4]),
               alibi_slopes=alibi(H))
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, attn_mask=mask, **pkw)
    dmask = np.zeros(mask.shape, np.float32)
    grads = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, attn_mask=mask, grad_attn_mask=dmask,
                                   **pkw)
    rkw = dict(kvh=kvh, causal=True, window=3, offset=pkw["query_offset"], key_length=pkw["key_length"],
               slopes=pkw["alibi_slopes"].astype(np.float64))
    f = lambda qq, kk, vv, mm: (ref(qq, kk, vv, H, additive=mm, **rkw)[0] * g).sum()  # noqa: E731
    h = 1e-5
    args = [q, k, v, mask]
    for which, grad in enumerate(list(grads) + [dmask]):
        num = np.zeros_like(args[which])
        for idx in np.ndindex(*num.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            num[idx] = (f(*plus) - f(*minus)) / (2 * h)
        assert_close(grad, num, rtol=1e-3, atol=1e-5, what=f"argument {which}")


@pytest.mark.parametrize("H,kvh", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_sdpa_enable_gqa_parity(rng, H, kvh, causal):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B, T, S, D = 2, 37, 37 if causal else 53, 8
    q, k, v, g = randn(rng, B, T, H * D), randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D), randn(rng, B, T, H * D)
    mask = randn(rng, B, H, T, S)
    heads = lambda x, n: torch.tensor(x).reshape(B, -1, n, D).transpose(1, 2).requires_grad_()  # noqa: E731
    tq, tk, tv = heads(q, H), heads(k, kvh), heads(v, kvh)
    tm = torch.tensor(mask).requires_grad_()
    # torch allows a float mask or is_causal, not both: fold the causal rule into its mask.
    tmask = tm + (torch.triu(torch.full((T, S), float("-inf")), 1) if causal else 0)
    to = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, enable_gqa=True)
    to.backward(torch.tensor(g).reshape(B, T, H, D).transpose(1, 2))
    back = lambda t: t.detach().transpose(1, 2).reshape(B, t.shape[2], -1).numpy()  # noqa: E731
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, attn_mask=mask, is_causal=causal, need_lse=True)
    assert_close(out, back(to), rtol=1e-4, atol=1e-5)
    dmask = np.zeros_like(mask)
    dq, dk, dv = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, attn_mask=mask, is_causal=causal,
                                        grad_attn_mask=dmask)
    for ours, theirs in ((dq, back(tq.grad)), (dk, back(tk.grad)), (dv, back(tv.grad)), (dmask, tm.grad.numpy())):
        assert_close(ours, theirs, rtol=1e-3, atol=1e-5)


# The "amx" path runs long sequences' products on AMX tiles (T >= 512, causal T >= 1024): scores of whole key blocks
# from scaled, split queries; the exponentials straight into P's split planes; backward recomputes the forward's
# scores on the same tiles. Sizes cross key blocks and query tiles with partial ones (D = 24: a partial 16-column
# panel of O; S = 1100: a last key block of 76).
AMX_CASES = [("none", "none", 4, 4), ("window", "mask_1hts", 4, 2), ("decode", "mask_bts", 4, 1),
             ("none", "mask_ts", 2, 2), ("causal", "padding", 4, 2), ("window_causal", "alibi", 2, 1),
             ("decode_window", "mask_bhts", 2, 2)]


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("positions,extra,H,kvh", AMX_CASES)
def test_amx_path_matches_float64_reference(rng, threads, positions, extra, H, kvh):
    _core.set_simd_path("amx")
    try:
        T = 1030 if "causal" in positions or "decode" in positions else 600
        run_and_check(rng, 1, T, 1100, 24, H, kvh, positions, extra, grad_tol=2e-3)
        # float32 precision, not merely close: a dropped term product (2^-16 of a product) would show
        q, k, v = randn(rng, 1, T, H * 24), randn(rng, 1, 1100, kvh * 24), randn(rng, 1, 1100, kvh * 24)
        kw, rkw = make_case(rng, 1, T, 1100, H, kvh, positions, extra)
        out = ops.attention(q, k, v, H, num_kv_heads=kvh, **kw)[0]
        r_out = ref(q, k, v, H, grad=randn(rng, 1, T, H * 24), **rkw)[0]
        assert np.linalg.norm(out - r_out) < 1e-6 * np.linalg.norm(r_out)
    finally:
        _core.set_simd_path("auto")


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
@pytest.mark.parametrize("where", ["v_inf", "v_nan", "v_both_infs", "q_inf", "k_nan"])
def test_amx_path_non_finite_like_avx512(rng, where):
    B, T, E, H = 1, 600, 64, 2
    q, k, v = randn(rng, B, T, E), randn(rng, B, T, E), randn(rng, B, T, E)
    x = {"v": v, "q": q, "k": k}[where[0]]
    x[0, 300, 40] = np.nan if where.endswith("nan") else np.inf
    if where == "v_both_infs":
        x[0, 301, 40] = -np.inf
    outs = {}
    try:
        for path in ("amx", "avx512"):
            _core.set_simd_path(path)
            outs[path] = ops.attention(q, k, v, H)[0]
    finally:
        _core.set_simd_path("auto")
    np.testing.assert_array_equal(np.isnan(outs["amx"]), np.isnan(outs["avx512"]))
    np.testing.assert_array_equal(np.isinf(outs["amx"]), np.isinf(outs["avx512"]))
    assert np.isnan(outs["amx"]).any() or np.isinf(outs["amx"]).any()
    fine = np.isfinite(outs["amx"])
    assert_close(outs["amx"][fine], outs["avx512"][fine], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
def test_amx_path_from_many_threads_at_once(rng):
    """Each caller's tiles, planes and split keys are its own: callers at once get the single-caller results."""
    B, T, E, H = 1, 520, 32, 2
    inputs = [[randn(rng, B, T, E) for _ in range(3)] for _ in range(6)]
    _core.set_simd_path("amx")
    try:
        assert_same_in_threads([lambda x=x: ops.attention(*x, H)[0] for x in inputs], repeats=5)
    finally:
        _core.set_simd_path("auto")


@pytest.mark.parametrize("extra", ["mask_ts", "mask_bts", "mask_1hts", "mask_bhts"])
@pytest.mark.parametrize("kvh", [4, 2, 1])
@pytest.mark.parametrize("T,S,dropout", [(150, 290, 0.1), (1030, 1100, 0.0), (1030, 1100, 0.1)])  # long: amx path
def test_results_do_not_depend_on_the_thread_count(rng, extra, kvh, T, S, dropout):
    B, D, H = 3, 8, 4
    q, k, v, g = randn(rng, B, T, H * D), randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D), randn(rng, B, T, H * D)
    kw, _ = make_case(rng, B, T, S, H, kvh, "decode_window", extra)
    kw["alibi_slopes"] = alibi(H)
    results = []
    before = cpuformer.get_num_threads()
    try:
        for n in (1, 2, 1):
            cpuformer.set_num_threads(n)
            out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, dropout_p=dropout, seed=3, **kw)
            dmask = np.zeros(kw["attn_mask"].shape, np.float32)
            grads = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, dropout_p=dropout, seed=3,
                                           grad_attn_mask=dmask, **kw)
            results.append((out, lse, *grads, dmask))
    finally:
        cpuformer.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_gqa_dropout_equals_multi_head_with_repeated_keys(rng, threads):
    """The dropout keep mask is a function of (seed, b, h, t, s): GQA gives what multi-head attention over the
    repeated keys and values gives, and its key/value gradients are the group sums."""
    B, T, S, D, H, kvh = 2, 40, 33, 4, 6, 2
    q, k, v, g = randn(rng, B, T, H * D), randn(rng, B, S, kvh * D), randn(rng, B, S, kvh * D), randn(rng, B, T, H * D)

    def rep(x):
        return np.ascontiguousarray(np.repeat(x.reshape(B, S, kvh, D), H // kvh, axis=2).reshape(B, S, H * D))

    kw = dict(dropout_p=0.3, seed=11, is_causal=True, window=9)
    out, lse = ops.attention(q, k, v, H, num_kv_heads=kvh, need_lse=True, **kw)
    out_m, lse_m = ops.attention(q, rep(k), rep(v), H, need_lse=True, **kw)
    assert_close(out, out_m, rtol=1e-6, atol=1e-7)
    dq, dk, dv = ops.attention_backward(g, q, k, v, out, lse, H, num_kv_heads=kvh, **kw)
    dq_m, dk_m, dv_m = ops.attention_backward(g, q, rep(k), rep(v), out_m, lse_m, H, **kw)
    group = lambda x: x.reshape(B, S, kvh, H // kvh, D).sum(3).reshape(B, S, kvh * D)  # noqa: E731
    assert_close(dq, dq_m, rtol=1e-5, atol=1e-6)
    assert_close(dk, group(dk_m), rtol=1e-5, atol=1e-6)
    assert_close(dv, group(dv_m), rtol=1e-5, atol=1e-6)


def test_mask_gradient_accumulates_and_folds_float_key_padding(rng):
    B, T, S, D, H = 2, 5, 6, 3, 2
    q, k, v, g = randn(rng, B, T, H * D), randn(rng, B, S, H * D), randn(rng, B, S, H * D), randn(rng, B, T, H * D)
    mask = randn(rng, T, S)
    kp = np.where(rng.random((B, S)) < 0.3, -np.inf, rng.standard_normal((B, S))).astype(np.float32)
    kp[:, 0] = 0.0
    out, lse = ops.attention(q, k, v, H, attn_mask=mask, key_padding_mask=kp, need_lse=True)
    start = randn(rng, T, S)
    dmask = start.copy()
    ops.attention_backward(g, q, k, v, out, lse, H, attn_mask=mask, key_padding_mask=kp, grad_attn_mask=dmask)
    ops.attention_backward(g, q, k, v, out, lse, H, attn_mask=mask, key_padding_mask=kp, grad_attn_mask=dmask)
    *_, (_, _, _, r_ds) = ref(q, k, v, H, additive=mask[None] + kp[:, None, :], grad=g)
    assert_close(dmask, start + 2 * r_ds.sum((0, 1)), rtol=1e-3, atol=1e-5)


def test_bad_arguments_raise_value_errors_naming_them(rng):
    B, T, S, D, H = 2, 5, 6, 4, 4
    q, k, v = randn(rng, B, T, H * D), randn(rng, B, S, 2 * D), randn(rng, B, S, 2 * D)
    out, lse = ops.attention(q, k, v, H, num_kv_heads=2, need_lse=True)
    cases = [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(num_kv_heads=4), "k and v must be"),  # key/value are 2 heads wide
        (dict(num_kv_heads=2, window=-1), "window"),
        (dict(num_kv_heads=2, query_offset=np.array([0, -1])), "query_offset"),
        (dict(num_kv_heads=2, query_offset=np.array([0, 1, 2])), "query_offset"),
        (dict(num_kv_heads=2, key_length=np.array([6, 7])), "key_length"),
        (dict(num_kv_heads=2, key_length=-1), "key_length"),
        (dict(num_kv_heads=2, alibi_slopes=np.ones(3)), "alibi_slopes"),
        (dict(num_kv_heads=2, alibi_slopes=np.array([1, np.nan, 1, 1])), "alibi_slopes"),
        (dict(num_kv_heads=2, attn_mask=np.zeros((1, 3, T, S))), "attn_mask"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            ops.attention(q, k, v, H, **kw)
        with pytest.raises(ValueError, match=name):
            ops.attention_backward(q, q, k, v, out, lse, H, **kw)
        with pytest.raises(ValueError, match=name):
            ops.attention_weights(q, k, H, **kw)
    mask = randn(rng, T, S)
    with pytest.raises(ValueError, match="grad_attn_mask"):
        ops.attention_backward(q, q, k, v, out, lse, H, num_kv_heads=2, grad_attn_mask=np.zeros((T, S), np.float32))
    with pytest.raises(ValueError, match="grad_attn_mask"):
        ops.attention_backward(q, q, k, v, out, lse, H, num_kv_heads=2, attn_mask=mask,
                               grad_attn_mask=np.zeros((T, S + 1), np.float32))
    with pytest.raises(ValueError, match="grad_attn_mask must not share memory with attn_mask"):
        ops.attention_backward(q, q, k, v, out, lse, H, num_kv_heads=2, attn_mask=mask, grad_attn_mask=mask)
    ro = np.zeros((T, S), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        ops.attention_backward(q, q, k, v, out, lse, H, num_kv_heads=2, attn_mask=mask, grad_attn_mask=ro)
    # The bindings check that strided key/value views are as wide as num_kv_heads * head_dim.
    kv = randn(rng, B, S, 3 * D)
    with pytest.raises(ValueError, match="k and v must be"):
        _core.attention(q, kv[..., :D], kv[..., D:2 * D], H, None, None, False, 0.5, 0.0, 0, False, num_kv_heads=2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        _core.attention(q, k, v, H, None, None, False, 0.5, 0.0, 0, False, num_kv_heads=-1)
    with pytest.raises(ValueError, match="key_length"):
        _core.attention(q, k, v, H, None, None, False, 0.5, 0.0, 0, False, num_kv_heads=2,
                        key_length=np.array([1, 7]))
    with pytest.raises(ValueError, match="grad_key"):  # outputs are (B, S, num_kv_heads * head_dim)
        ops.attention_backward(q, q, k, v, out, lse, H, num_kv_heads=2, grad_key=np.zeros((B, S, H * D), np.float32))


def test_scalar_positions_broadcast_over_batch(rng):
    B, T, S, D, H = 3, 1, 10, 4, 2
    q, k, v = randn(rng, B, T, H * D), randn(rng, B, S, H * D), randn(rng, B, S, H * D)
    a = ops.attention(q, k, v, H, is_causal=True, query_offset=7, key_length=8)[0]
    b = ops.attention(q, k, v, H, is_causal=True, query_offset=np.full(B, 7), key_length=[8, 8, 8])[0]
    np.testing.assert_array_equal(a, b)
    assert_close(a, ref(q, k, v, H, causal=True, offset=7, key_length=8)[0], rtol=1e-4, atol=2e-6)

