"""Module bookkeeping, modes, initialisation, positional encodings and bad input to layers."""
from __future__ import annotations

import math

import numpy as np
import pytest

import cpuformer.nn as nn
from testutil import assert_close, randn


def test_named_parameters_state_dict_and_zero_grad():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                     "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                     "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
    assert list(layer.state_dict()) == names
    for p in layer.parameters():
        p.grad += 1
    layer.zero_grad()
    assert all((p.grad == 0).all() for p in layer.parameters())
    assert layer.num_parameters() == sum(p.data.size for p in layer.parameters())


def test_stack_layers_are_independent_copies():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 3)
    a, b = enc.layers[0].linear1.weight.data, enc.layers[1].linear1.weight.data
    np.testing.assert_array_equal(a, b)  # identical at start, as PyTorch's deep copies
    a[0, 0] += 1
    assert a[0, 0] != b[0, 0]


def test_train_eval_reaches_every_layer(rng):
    model = nn.Transformer(8, 2, 1, 1, 16, dropout=0.5)
    model.eval()
    assert all(not m.training for m in model.modules())
    src, tgt = randn(rng, 2, 5, 8), randn(rng, 2, 4, 8)
    y1, y2 = model(src, tgt), model(src, tgt)
    np.testing.assert_array_equal(y1, y2)  # no dropout in eval mode
    model.train()
    assert all(m.training for m in model.modules())
    assert np.abs(model(src, tgt) - y1).max() > 1e-3  # dropout active (attention, feed-forward, residual)


def test_manual_seed_makes_models_and_dropout_reproducible(rng):
    x = randn(rng, 2, 6, 8)
    outs = []
    for _ in range(2):
        nn.init.manual_seed(123)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3)
        outs.append(layer(x))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_load_state_dict_errors():
    lin = nn.Linear(3, 4)
    with pytest.raises(KeyError, match="missing keys \\['bias'\\]"):
        lin.load_state_dict({"weight": np.zeros((4, 3))})
    with pytest.raises(KeyError, match="unexpected keys \\['extra'\\]"):
        lin.load_state_dict({"weight": np.zeros((4, 3)), "bias": np.zeros(4), "extra": np.zeros(1)})
    before = lin.weight.data.copy()
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\), expected \(4, 3\)"):
        lin.load_state_dict({"weight": np.zeros((3, 4)), "bias": np.zeros(4)})
    with pytest.raises(ValueError, match="non-finite"):
        lin.load_state_dict({"weight": np.full((4, 3), np.nan), "bias": np.zeros(4)})
    np.testing.assert_array_equal(lin.weight.data, before)  # nothing changed on error
    missing, unexpected = lin.load_state_dict({"weight": np.ones((4, 3))}, strict=False)
    assert missing == ["bias"] and unexpected == [] and (lin.weight.data == 1).all()


def test_sinusoidal_positional_encoding_matches_the_paper(rng):
    pe = nn.PositionalEncoding(6, max_len=50)
    x = np.zeros((1, 10, 6), np.float32)
    y = pe(x)[0]
    for pos in (0, 3, 9):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert math.isclose(y[pos, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(y[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-6)
    g = randn(rng, 1, 10, 6)
    np.testing.assert_array_equal(pe.backward(g), g)
    assert list(pe.state_dict()) == []  # the fixed table is not a parameter


def test_learned_positional_encoding_gradient(rng):
    pe = nn.PositionalEncoding(4, max_len=8, learned=True)
    x = randn(rng, 3, 5, 4)
    assert_close(pe(x), x + pe.weight.data[None, :5])
    g = randn(rng, 3, 5, 4)
    pe.backward(g)
    assert_close(pe.weight.grad[:5], g.sum(0), rtol=1e-6)
    assert (pe.weight.grad[5:] == 0).all()
    with pytest.raises(ValueError, match="exceeds max_len 8"):
        pe(randn(rng, 1, 9, 4))


def test_layer_input_errors(rng):
    with pytest.raises(ValueError, match="last dimension 3"):
        nn.Linear(3, 2)(randn(rng, 4, 5))
    with pytest.raises(ValueError, match="must be a positive multiple of num_heads"):
        nn.MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match=r"query must be \(batch, length, embed_dim\) with embed_dim 8"):
        nn.MultiheadAttention(8, 2)(randn(rng, 2, 3, 6), randn(rng, 2, 3, 6), randn(rng, 2, 3, 6))
    with pytest.raises(ValueError, match="src must be"):
        nn.TransformerEncoderLayer(8, 2, 16)(randn(rng, 3, 8))
    with pytest.raises(ValueError, match="activation must be"):
        nn.TransformerEncoderLayer(8, 2, 16, activation="mish")
    with pytest.raises(NotImplementedError, match="batch_first=True"):
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=False)
    with pytest.raises(IndexError, match="out of range"):
        nn.Embedding(5, 3)(np.array([[1, 5]]))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Linear(3, 2).backward(randn(rng, 1, 2))
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(1.5)
    with pytest.raises(TypeError, match="not a Module"):
        nn.Sequential(nn.Linear(2, 2), "relu")


@pytest.mark.parametrize("prepare", [None, nn.freeze, nn.quantize_dynamic])
def test_reused_workspace_never_leaks_into_results(rng, prepare):
    """Layers keep their saved hidden activations in arrays reused from step to step: outputs handed out stay
    intact after later calls, and a backward uses the latest forward's saves (as a fresh layer would)."""
    layer = nn.TransformerEncoderLayer(12, 3, 40, dropout=0.0, activation="gelu")
    x1, x2, g = randn(rng, 2, 5, 12), randn(rng, 2, 5, 12), randn(rng, 2, 5, 12)
    if prepare is not None:
        layer = prepare(layer)
    out1 = layer(x1)
    kept = out1.copy()
    out2 = layer(x2)
    np.testing.assert_array_equal(out1, kept)
    assert not np.shares_memory(out1, out2)
    if prepare is not None:
        return
    dx = layer.backward(g)
    fresh = layer.clone()
    fresh.zero_grad()
    layer.zero_grad()
    layer(x1), layer(x2)
    dx_again = layer.backward(g)
    fresh(x2)
    np.testing.assert_array_equal(dx_again, fresh.backward(g))
    np.testing.assert_array_equal(dx_again, dx)
    for (name, p), (_, q) in zip(layer.named_parameters(), fresh.named_parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)


def test_no_grad_keeps_nothing_for_backward_in_eval_mode(rng):
    """Under cpuformer.no_grad() an eval-mode forward gives the same bits and keeps nothing: a backward after it
    raises (never the gradient of an earlier forward); outside it, forward and backward pair as before. Training
    mode still keeps what backward needs; the switch is per thread, nests, and works as a decorator."""
    import threading

    import cpuformer
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x, g = randn(rng, 2, 5, 16), randn(rng, 2, 5, 16)
    want = layer(x)
    dx = layer.backward(g)
    assert cpuformer.is_grad_enabled()
    with cpuformer.no_grad():
        assert not cpuformer.is_grad_enabled()
        with nn.no_grad():
            np.testing.assert_array_equal(layer(x), want)
        assert not cpuformer.is_grad_enabled()
        seen = []
        other = threading.Thread(target=lambda: seen.append(cpuformer.is_grad_enabled()))
        other.start()
        other.join()
        assert seen == [True]
    assert cpuformer.is_grad_enabled()
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(g)
    np.testing.assert_array_equal(layer(x), want)
    np.testing.assert_array_equal(layer.backward(g), dx)

    @cpuformer.no_grad()
    def infer(v):
        return layer(v)
    np.testing.assert_array_equal(infer(x), want)
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(g)
    layer.train()
    with cpuformer.no_grad():
        layer(x)
    np.testing.assert_array_equal(layer.backward(g), dx)
