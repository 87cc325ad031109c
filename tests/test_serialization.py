"""cpuformer.save / cpuformer.load: bit-exact round trips, clear errors for wrong files."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cpuformer
from cpuformer.io import SafetensorsError, load_safetensors, save_safetensors
from cpuformer.models import GPT, Seq2SeqTransformer, TransformerClassifier


@pytest.mark.parametrize("make", [
    lambda: GPT(50, block_size=12, n_layer=2, n_head=2, n_embd=16, activation="gelu_tanh"),
    lambda: TransformerClassifier(40, 3, d_model=16, nhead=2, num_layers=1, dim_feedforward=24, pooling="cls"),
    lambda: Seq2SeqTransformer(30, 35, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                               dim_feedforward=24),
], ids=["gpt", "classifier", "seq2seq"])
def test_save_load_round_trip_is_bit_exact(tmp_path, make):
    model = make()
    for p in model.parameters():  # weights that are not the initial ones
        p.data += np.random.default_rng(0).standard_normal(p.shape).astype(np.float32) * 0.01
    path = str(tmp_path / "model.safetensors")
    cpuformer.save(model, path)
    again = cpuformer.load(path)
    assert type(again) is type(model) and again.config == model.config and not again.training
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and p1.data.tobytes() == p2.data.tobytes()
    ids = np.array([[4, 5, 6, 7]])
    model.eval()
    if isinstance(model, Seq2SeqTransformer):
        np.testing.assert_array_equal(model(ids, ids), again(ids, ids))
    else:
        np.testing.assert_array_equal(model(ids), again(ids))


def test_load_errors(tmp_path):
    model = GPT(20, block_size=8, n_layer=1, n_head=2, n_embd=8)
    path = str(tmp_path / "m.safetensors")
    cpuformer.save(model, path)
    tensors, meta = load_safetensors(path)
    bad = str(tmp_path / "bad.safetensors")
    save_safetensors(bad, tensors, {**meta, "config": json.dumps({**json.loads(meta["config"]), "n_embd": 16})})
    with pytest.raises(SafetensorsError, match="config n_embd is 16 but wte.weight has shape"):
        cpuformer.load(bad)
    save_safetensors(bad, tensors, {**meta, "model_class": "Llama"})
    with pytest.raises(SafetensorsError, match="unknown model class 'Llama'"):
        cpuformer.load(bad)
    save_safetensors(bad, tensors, {"format": "something-else"})
    with pytest.raises(SafetensorsError, match="not a cpuformer model file"):
        cpuformer.load(bad)
    with pytest.raises(FileNotFoundError):
        cpuformer.load(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="not a cpuformer model"):
        cpuformer.save(cpuformer.nn.Linear(2, 2), path)
