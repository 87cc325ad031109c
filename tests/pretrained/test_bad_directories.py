"""Broken model directories: cpuformer.models.from_pretrained raises FileNotFoundError (a file is missing) or
ValueError (anything else) whose message names the file and, where relevant, the tensor or config key at fault."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from hf_testlib import edit_config, load, names  # noqa: E402

SHARD = r"model-\d{5}-of-\d{5}\.safetensors"


def _copy(fixture, tmp_path, name="broken"):
    dest = tmp_path / name
    shutil.copytree(fixture[0], dest)
    return dest


def _edit_weights(directory, fn, file="model.safetensors"):
    path = os.path.join(str(directory), file)
    tensors = safetensors_numpy.load_file(path)
    tensors = fn(dict(tensors))
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config_json(bert_model, tmp_path):
    d = _copy(bert_model, tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match=names("config.json")):
        load(d)


def test_empty_directory_and_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=names("config.json")):
        load(tmp_path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "no-such-directory")


def test_unknown_model_type(bert_model, tmp_path):
    d = _copy(bert_model, tmp_path)
    edit_config(d, lambda c: {**c, "model_type": "frobnicator"})
    with pytest.raises(ValueError, match=names("config.json", "model_type", "frobnicator")):
        load(d)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},  # the pre-rope_type spelling
    {"rope_type": "dynamic", "factor": 2.0},
], ids=["yarn", "yarn-legacy-type-key", "dynamic"])
@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling(llama, tmp_path, rope, form):
    """Both the transformers 4 form (top-level rope_theta + rope_scaling) and the 5 form (rope_parameters)."""
    d = _copy(llama, tmp_path)

    def set_rope(cfg):
        theta = cfg.pop("rope_parameters")["rope_theta"]
        if form == "rope_scaling":
            cfg["rope_theta"], cfg["rope_scaling"] = theta, rope
        else:
            cfg["rope_parameters"] = {**rope, "rope_theta": theta}
        return cfg
    edit_config(d, set_rope)
    kind = rope.get("rope_type", rope.get("type"))
    with pytest.raises(ValueError, match=names("config.json", kind)):
        load(d)


def test_missing_weights(llama, tmp_path):
    d = _copy(llama, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=names("model.safetensors")):
        load(d)


def test_only_pytorch_model_bin(bert_model, tmp_path):
    """Pickled weights are not read: the message says which file is wanted."""
    d = _copy(bert_model, tmp_path)
    os.remove(d / "model.safetensors")
    torch.save(bert_model[1].state_dict(), d / "pytorch_model.bin")
    with pytest.raises((FileNotFoundError, ValueError), match=names("model.safetensors")):
        load(d)


@pytest.mark.parametrize("fixture,tensor", [
    ("bert_model", "encoder.layer.1.output.dense.weight"),
    ("llama", "model.layers.1.mlp.down_proj.weight"),
    ("llama", "model.norm.weight"),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
])
def test_missing_tensor(request, tmp_path, fixture, tensor):
    d = _copy(request.getfixturevalue(fixture), tmp_path)

    def drop(t):
        assert tensor in t, sorted(t)
        del t[tensor]
        return t
    _edit_weights(d, drop)
    with pytest.raises(ValueError, match=names("model.safetensors", tensor.split(".", 1)[1])):
        load(d)


@pytest.mark.parametrize("fixture,tensor,shape", [
    ("bert_model", "encoder.layer.0.attention.self.key.weight", (32, 31)),
    ("llama", "model.layers.0.self_attn.k_proj.weight", (24, 32)),
    ("llama", "model.embed_tokens.weight", (119, 32)),
    ("gpt2", "transformer.h.1.attn.c_attn.weight", (32, 32)),
])
def test_tensor_of_the_wrong_shape(request, tmp_path, fixture, tensor, shape):
    import numpy as np
    d = _copy(request.getfixturevalue(fixture), tmp_path)

    def reshape(t):
        assert tensor in t and t[tensor].shape != shape
        t[tensor] = np.zeros(shape, np.float32)
        return t
    _edit_weights(d, reshape)
    with pytest.raises(ValueError, match=names("model.safetensors", tensor.split(".", 1)[1])):
        load(d)


def _index(d):
    with open(d / "model.safetensors.index.json") as f:
        return json.load(f)


def _write_index(d, index):
    with open(d / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)


def test_shards_disagree_with_the_index(sharded_llama, tmp_path):
    """The index maps a tensor to a shard that does not hold it."""
    d = _copy(sharded_llama, tmp_path)
    index = _index(d)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    tensor = "model.layers.1.mlp.down_proj.weight"
    index["weight_map"][tensor] = next(f for f in files if f != index["weight_map"][tensor])
    _write_index(d, index)
    with pytest.raises(ValueError, match=names(tensor.split(".", 1)[1])) as info:
        load(d)
    assert re.search(r"index\.json|" + SHARD, str(info.value)), str(info.value)


def test_index_names_a_missing_shard(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path)
    shard = _index(d)["weight_map"]["model.norm.weight"]
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=names(shard)):
        load(d)


def test_index_without_a_tensor_of_a_shard(sharded_llama, tmp_path):
    """A tensor the model needs is missing from the index (its shard still holds it): the index is authoritative."""
    d = _copy(sharded_llama, tmp_path)
    index = _index(d)
    tensor = "model.layers.0.input_layernorm.weight"
    del index["weight_map"][tensor]
    _write_index(d, index)
    with pytest.raises(ValueError, match=names(tensor.split(".", 1)[1])):
        load(d)


# config.json values that contradict the weights; the message names config.json or the weights file, and the key or
# the tensor whose shape disagrees
@pytest.mark.parametrize("fixture,key,value", [
    ("bert_model", "hidden_size", 48),
    ("bert_model", "vocab_size", 100),
    ("bert_model", "intermediate_size", 40),
    ("llama", "num_key_value_heads", 2),
    ("llama", "hidden_size", 64),
    ("qwen3", "head_dim", 8),
    ("llama", "num_hidden_layers", 3),
])
def test_config_contradicts_the_weights(request, tmp_path, fixture, key, value):
    d = _copy(request.getfixturevalue(fixture), tmp_path)
    edit_config(d, lambda c: {**c, key: value})
    with pytest.raises(ValueError) as info:
        load(d)
    msg = str(info.value)
    assert re.search(r"config\.json|model\.safetensors", msg), msg
    assert re.search(re.escape(key) + r"|\.weight|\.bias|layers\.2", msg), msg
