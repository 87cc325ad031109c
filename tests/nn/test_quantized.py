"""quantize_dynamic: int8 Linear weights through whole layers and models (inference only)."""
from __future__ import annotations

import numpy as np
import pytest

import cpuformer
from cpuformer import nn
from cpuformer.models import GPT, Seq2SeqTransformer, TransformerClassifier

from testutil import SIMD_PATHS, rel_err


def _close_but_quantized(q, f, bound):
    """The int8 result is near the float one, and not identical (the int8 path really ran)."""
    err = rel_err(q, f)
    assert 0 < err < bound, err


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer(rng, norm_first, activation):
    nn.init.manual_seed(1)
    layer = nn.TransformerEncoderLayer(48, 4, 80, dropout=0.1, activation=activation, norm_first=norm_first).eval()
    x = rng.standard_normal((3, 11, 48)).astype(np.float32)
    pad = np.zeros((3, 11), bool)
    pad[1, 7:] = True
    q = nn.quantize_dynamic(layer)
    for kw in ({}, {"src_key_padding_mask": pad}, {"is_causal": True}):
        _close_but_quantized(q(x, **kw), layer(x, **kw), 0.03)


def test_decoder_layer_cross_attention(rng):
    nn.init.manual_seed(2)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0).eval()
    tgt = rng.standard_normal((2, 5, 32)).astype(np.float32)
    memory = rng.standard_normal((2, 9, 32)).astype(np.float32)
    q = nn.quantize_dynamic(layer)
    _close_but_quantized(q(tgt, memory, tgt_is_causal=True), layer(tgt, memory, tgt_is_causal=True), 0.03)
    # separate query / key / value inputs take the per-projection slices
    mha = nn.MultiheadAttention(32, 4).eval()
    qm = nn.quantize_dynamic(mha)
    k, v = memory, rng.standard_normal((2, 9, 32)).astype(np.float32)
    _close_but_quantized(qm(tgt, k, v, need_weights=False)[0], mha(tgt, k, v, need_weights=False)[0], 0.03)


def test_gpt_tied_head_and_generation(rng):
    nn.init.manual_seed(3)
    model = GPT(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    ids = rng.integers(0, 97, (2, 20))
    q = cpuformer.quantize_dynamic(model)
    assert q._frozen is not None  # the tied head is quantized too
    _close_but_quantized(q(ids), model(ids), 0.05)
    # rows are quantized independently, so the KV-cache path gives the full forward's tokens
    a = q.generate(ids[:, :4], 12, greedy=True, use_cache=True)
    b = q.generate(ids[:, :4], 12, greedy=True, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_untied_head_classifier_and_seq2seq(rng):
    nn.init.manual_seed(4)
    gpt = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_weights=False).eval()
    ids = rng.integers(0, 50, (2, 9))
    qg = nn.quantize_dynamic(gpt)
    assert qg.lm_head._frozen is not None and qg._frozen is None
    _close_but_quantized(qg(ids), gpt(ids), 0.05)
    clf = TransformerClassifier(60, 3, d_model=32, nhead=4, num_layers=2, dim_feedforward=48).eval()
    cids = rng.integers(1, 60, (4, 10))
    _close_but_quantized(nn.quantize_dynamic(clf)(cids), clf(cids), 0.05)
    s2s = Seq2SeqTransformer(40, 41, d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                             dim_feedforward=48).eval()
    src, tgt = rng.integers(3, 40, (2, 7)), rng.integers(3, 41, (2, 6))
    _close_but_quantized(nn.quantize_dynamic(s2s)(src, tgt), s2s(src, tgt), 0.05)


def test_original_untouched_and_inference_only(rng):
    nn.init.manual_seed(5)
    model = GPT(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16)
    q = nn.quantize_dynamic(model)
    assert nn.is_quantized(q) and not nn.is_quantized(model)
    assert model.training and not q.training
    assert all(p.data.flags.writeable for p in model.parameters())
    ids = rng.integers(0, 30, (1, 8))
    out = q(ids)
    with pytest.raises(RuntimeError, match="inference-only"):
        q.backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        q.train()(ids)
    with pytest.raises(RuntimeError, match="read-only"):
        q.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="already quantized"):
        nn.quantize_dynamic(q)
    with pytest.raises(ValueError, match="no Linear weights"):
        nn.quantize_dynamic(nn.LayerNorm(4))
    lin = nn.quantize_dynamic(nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="inference-only"):
        lin.backward(np.ones((2, 3), np.float32))


def test_save_writes_float_weights(tmp_path, rng):
    nn.init.manual_seed(6)
    model = GPT(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16).eval()
    q = nn.quantize_dynamic(model)
    path = tmp_path / "m.safetensors"
    cpuformer.save(q, path)
    loaded = cpuformer.load(path)
    assert not nn.is_quantized(loaded)
    ids = rng.integers(0, 30, (2, 8))
    np.testing.assert_array_equal(loaded.eval()(ids), model(ids))
    np.testing.assert_allclose(nn.quantize_dynamic(loaded)(ids), q(ids), rtol=0, atol=0)


def test_freeze_is_exact_and_inference_only(rng):
    nn.init.manual_seed(7)
    model = GPT(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    frozen = nn.freeze(model)
    assert nn.is_frozen(frozen) and not nn.is_quantized(frozen) and not nn.is_frozen(model)
    ids = rng.integers(0, 97, (2, 20))
    np.testing.assert_array_equal(frozen(ids), model(ids))
    np.testing.assert_array_equal(frozen.generate(ids[:, :3], 10, greedy=True), model.generate(ids[:, :3], 10,
                                                                                                  greedy=True))
    layer = nn.TransformerDecoderLayer(32, 4, 64).eval()
    tgt, memory = rng.standard_normal((2, 5, 32)).astype(np.float32), rng.standard_normal((2, 9, 32)).astype(np.float32)
    np.testing.assert_array_equal(nn.freeze(layer)(tgt, memory), layer(tgt, memory))
    with pytest.raises(ValueError, match="already frozen"):
        nn.quantize_dynamic(frozen)
    with pytest.raises(RuntimeError, match="inference-only"):
        frozen.backward(np.ones((2, 20, 97), np.float32))


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
def test_freeze_amx_tiles_within_float32_precision_or_off(rng):
    """On the amx path a frozen model's products of 128+ rows run on tiles split once (within 1e-5 of the float
    model); amx_tiles=False keeps the float model's bits, and weights re-prepared for a slice keep the choice."""
    from cpuformer import _core
    nn.init.manual_seed(8)
    model = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True).eval()
    x = rng.standard_normal((4, 40, 64)).astype(np.float32)  # 160 rows
    _core.set_simd_path("amx")
    try:
        ref = model(x)
        tiled, panels = nn.freeze(model), nn.freeze(model, amx_tiles=False)
        assert rel_err(tiled(x), ref) < 1e-5
        np.testing.assert_array_equal(panels(x), ref)
        for frozen, want in ((tiled, True), (panels, False)):
            kinds = {w.amx_tiles for m in frozen.modules() for w in
                     (m._frozen.values() if isinstance(getattr(m, "_frozen", None), dict)
                      else [m._frozen] if getattr(m, "_frozen", None) is not None else [])}
            assert kinds == {want}
    finally:
        _core.set_simd_path("auto")


def test_freeze_amx_tiles_must_be_a_bool():
    layer = nn.Linear(8, 4)
    with pytest.raises(TypeError, match="amx_tiles must be True or False"):
        nn.freeze(layer, amx_tiles="no")
    with pytest.raises(TypeError):
        cpuformer._core.pack_linear_weight(np.zeros((4, 8), np.float32), amx_tiles=None)


def test_int8_kernels_give_the_same_model_outputs(rng):
    """Whole models on every int8 kernel this CPU has (AVX-512 VNNI, AVX-VNNI, AVX2, scalar): the same bits."""
    from cpuformer import _core
    nn.init.manual_seed(5)
    model = GPT(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=40).eval()
    clf = TransformerClassifier(60, 3, d_model=36, nhead=4, num_layers=1, dim_feedforward=52).eval()
    ids, cids = rng.integers(0, 61, (3, 13)), rng.integers(1, 60, (5, 9))
    q, qc = cpuformer.quantize_dynamic(model), nn.quantize_dynamic(clf)
    results = {}
    try:
        for name in _core.int8_kernels():
            _core.set_int8_kernel(name)
            results[name] = (q(ids), q.generate(ids[:1, :3], 6, greedy=True, use_cache=True), qc(cids))
    finally:
        _core.set_int8_kernel("auto")
    ref = results["scalar"]
    for name, got in results.items():
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r, err_msg=name)
