"""Model files: ``cpuformer.save(model, path)`` / ``cpuformer.load(path)``.

One safetensors file: the parameters under their state-dict names, and in the metadata the model class and its
constructor arguments as JSON, enough to rebuild the architecture. No pickle. The round trip is bit-exact.

A file is untrusted input: before anything is built, the config is checked against the tensors in the file (each
size must be the one a tensor has, each layer count the number of layers present, each id inside its vocabulary),
so a damaged or hostile file raises :class:`SafetensorsError` instead of allocating without bound, looping or
failing somewhere inside a constructor.
"""
from __future__ import annotations

import inspect
import json
import math
import re
from typing import Mapping

import numpy as np

from .io import SafetensorsError, load_safetensors, parse_json, save_safetensors

__all__ = ["save", "load", "check_config"]

FORMAT = "cpuformer-model"
VERSION = "1"

MAX_INT = 2**31 - 1  # no size or count in a model config is larger
MAX_LENGTH = 2**20  # positions: the C++ runtime's bound too


def _classes():
    from .models import GPT, BertModel, Seq2SeqTransformer, TransformerClassifier
    return {c.__name__: c for c in (GPT, TransformerClassifier, Seq2SeqTransformer, BertModel)}


# What fixes each size of a model's config in its tensors: {config key: (tensor name, axis)}.
_SIZES = {
    "GPT": {"vocab_size": ("wte.weight", 0), "n_embd": ("wte.weight", 1)},
    "TransformerClassifier": {"vocab_size": ("embedding.weight", 0), "d_model": ("embedding.weight", 1),
                              "num_classes": ("head.weight", 0),
                              "dim_feedforward": ("encoder.layers.0.linear1.weight", 0)},
    "Seq2SeqTransformer": {"src_vocab_size": ("src_embedding.weight", 0), "d_model": ("src_embedding.weight", 1),
                           "tgt_vocab_size": ("tgt_embedding.weight", 0),
                           "dim_feedforward": ("transformer.encoder.layers.0.linear1.weight", 0)},
    "BertModel": {"vocab_size": ("word_embeddings.weight", 0), "hidden_size": ("word_embeddings.weight", 1),
                  "max_position_embeddings": ("position_embeddings.weight", 0),
                  "type_vocab_size": ("token_type_embeddings.weight", 0),
                  "intermediate_size": ("layers.0.linear1.weight", 0)},
}
# {config key: tensor-name prefix of each layer}: the count must be the number of layers 0..n-1 in the file.
_LAYERS = {
    "GPT": {"n_layer": "blocks."},
    "TransformerClassifier": {"num_layers": "encoder.layers."},
    "Seq2SeqTransformer": {"num_encoder_layers": "transformer.encoder.layers.",
                           "num_decoder_layers": "transformer.decoder.layers."},
    "BertModel": {"num_hidden_layers": "layers."},
}
# (heads key, width key): the heads must divide the width.
_HEADS = {"GPT": ("n_head", "n_embd"), "TransformerClassifier": ("nhead", "d_model"),
          "Seq2SeqTransformer": ("nhead", "d_model"), "BertModel": ("num_attention_heads", "hidden_size")}
# {id key: vocabulary size keys it must index}.
_IDS = {"TransformerClassifier": {"pad_id": ("vocab_size",)},
        "Seq2SeqTransformer": {"pad_id": ("src_vocab_size", "tgt_vocab_size"), "bos_id": ("tgt_vocab_size",),
                               "eos_id": ("tgt_vocab_size",)}}


# {length key: the learned position table that must have that many rows (plus extra), when it is learned}.
_LENGTHS = {"GPT": {"block_size": ("wpe.weight", 0)}, "TransformerClassifier": {"max_len": ("pos.weight", 1)},
            "Seq2SeqTransformer": {"max_len": (None, 0)}, "BertModel": {"max_position_embeddings": (None, 0)}}


def _check_value(key: str, value, kind: str, where: str) -> None:
    """A config value against its constructor annotation ("int", "float", "bool" or "str"; the model classes take
    only these)."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
            raise SafetensorsError(f"{where}: config {key} must be an integer in [0, {MAX_INT}], got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SafetensorsError(f"{where}: config {key} must be a finite number, got {value!r}")
        if key.endswith(("eps", "epsilon")) and value < 0:
            raise SafetensorsError(f"{where}: config {key} must be >= 0, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise SafetensorsError(f"{where}: config {key} must be true or false, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise SafetensorsError(f"{where}: config {key} must be a string, got {value!r}")
    else:
        raise SafetensorsError(f"{where}: config {key} has no checkable type ({kind})")


def check_config(cls, config, tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """Check a model config against the tensors that will be loaded into it, before anything is built: the
    constructor's arguments and their types (from its signature), every size against the tensor that carries it,
    every layer count against the layers present, heads dividing the width, ids inside their vocabularies, and
    lengths within [1, 2**20] (learned position tables: their tensors' rows). Returns the complete arguments."""
    name = cls.__name__
    if not isinstance(config, dict):
        raise SafetensorsError(f"{where}: the model config must be a JSON object, got {type(config).__name__}")
    signature = inspect.signature(cls.__init__)
    params = {k: p for k, p in signature.parameters.items() if k != "self"}
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise SafetensorsError(f"{where}: config has keys {unknown} that {name} does not take")
    cfg = {}
    for key, p in params.items():
        if key in config:
            _check_value(key, config[key], str(p.annotation), where)
            cfg[key] = config[key]
        elif p.default is inspect.Parameter.empty:
            raise SafetensorsError(f"{where}: config lacks {key}, which {name} needs")
        else:
            cfg[key] = p.default

    def dim(tensor: str, axis: int, key: str) -> int:
        t = tensors.get(tensor)
        if t is None or t.ndim <= axis:
            raise SafetensorsError(f"{where}: config {key} needs tensor {tensor} (with at least {axis + 1} "
                                   "dimensions), which the file lacks")
        return t.shape[axis]

    for key, prefix in _LAYERS.get(name, {}).items():
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        present = {int(m.group(1)) for m in map(pattern.match, tensors) if m}
        if cfg[key] < 1 or cfg[key] != len(present) or max(present) != len(present) - 1:
            raise SafetensorsError(f"{where}: config {key} is {cfg[key]} but the file holds layers "
                                   f"{sorted(present)[:8]}{'...' if len(present) > 8 else ''} under {prefix}N")
    for key, (tensor, axis) in _SIZES.get(name, {}).items():
        if cfg[key] != dim(tensor, axis, key):
            raise SafetensorsError(f"{where}: config {key} is {cfg[key]} but {tensor} has shape "
                                   f"{tensors[tensor].shape}")
    heads, width = _HEADS[name]
    if cfg[heads] < 1 or cfg[width] % cfg[heads]:
        raise SafetensorsError(f"{where}: config {heads} ({cfg[heads]}) must be >= 1 and divide {width} "
                               f"({cfg[width]})")
    for key, vocabularies in _IDS.get(name, {}).items():
        for vocab in vocabularies:
            if not 0 <= cfg[key] < cfg[vocab]:
                raise SafetensorsError(f"{where}: config {key} ({cfg[key]}) is outside [0, {vocab} = {cfg[vocab]})")
    for key, (table, extra) in _LENGTHS[name].items():
        if not 1 <= cfg[key] <= MAX_LENGTH:  # a sinusoidal table is computed on use, so only bound the length
            raise SafetensorsError(f"{where}: config {key} must be in [1, {MAX_LENGTH}], got {cfg[key]}")
        if table is not None and cfg.get("positional") == "learned" and cfg[key] + extra != dim(table, 0, key):
            raise SafetensorsError(f"{where}: config {key} is {cfg[key]} but {table} has shape "
                                   f"{tensors[table].shape}")
    if name == "GPT":
        _check_gpt_block(cfg, tensors, where)
    return cfg


def _check_gpt_block(cfg: dict, tensors: Mapping[str, np.ndarray], where: str) -> None:
    """GPT's feed-forward width (d_ff, 0 = 4 x n_embd) and key/value heads (n_kv_head, 0 = n_head) against the
    first block's tensors, whichever block layout the file holds."""
    ff = cfg["d_ff"] or 4 * cfg["n_embd"]
    for tensor in ("blocks.0.linear1.weight", "blocks.0.mlp.up_proj.weight"):
        if tensor in tensors and tensors[tensor].shape[0] != ff:
            raise SafetensorsError(f"{where}: config d_ff ({cfg['d_ff']}, width {ff}) but {tensor} has shape "
                                   f"{tensors[tensor].shape}")
    kvh = cfg["n_kv_head"] or cfg["n_head"]
    if kvh > cfg["n_head"] or cfg["n_head"] % kvh:
        raise SafetensorsError(f"{where}: config n_kv_head ({cfg['n_kv_head']}) must divide n_head ({cfg['n_head']})")
    k = tensors.get("blocks.0.self_attn.k_proj.weight")
    if k is not None and k.shape[0] != kvh * (cfg["n_embd"] // cfg["n_head"]):
        raise SafetensorsError(f"{where}: config n_kv_head ({cfg['n_kv_head']}) but blocks.0.self_attn.k_proj.weight "
                               f"has shape {k.shape}")


def save(model, path: str) -> None:
    """Write ``model`` (a cpuformer model with a ``config``) to ``path`` atomically."""
    config = getattr(model, "config", None)
    if config is None or type(model).__name__ not in _classes():
        raise TypeError(f"save: {type(model).__name__} is not a cpuformer model with a config "
                        f"(one of {sorted(_classes())})")
    meta = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__, "config": json.dumps(config)}
    save_safetensors(path, {name: p.data for name, p in model.named_parameters()}, meta)


def load(path: str):
    """Rebuild the model saved at ``path`` and load its weights. A file that is not a cpuformer model, an unknown
    class or a config that disagrees with the tensors raises :class:`SafetensorsError` (a ``ValueError``) naming
    the problem; nothing is built until the config has been checked against the tensors."""
    tensors, meta = load_safetensors(path)
    if meta.get("format") not in (FORMAT, "cpuformer-checkpoint"):
        raise SafetensorsError(f"{path}: not a cpuformer model file (metadata format {meta.get('format')!r})")
    if meta.get("format") == FORMAT and meta.get("version") != VERSION:
        raise SafetensorsError(f"{path}: model file version {meta.get('version')!r}; this cpuformer reads {VERSION}")
    cls = _classes().get(meta.get("model_class", ""))
    if cls is None:
        raise SafetensorsError(f"{path}: unknown model class {meta.get('model_class')!r}")
    if "config" not in meta:
        raise SafetensorsError(f"{path}: the metadata has no model config")
    config = check_config(cls, parse_json(meta["config"], f"{path}: model config"), tensors, path)
    try:
        model = cls(**config)
    except (TypeError, ValueError, NotImplementedError) as exc:  # settings the constructor itself refuses
        raise SafetensorsError(f"{path}: bad model config ({exc})") from None
    try:
        model.load_state_dict(tensors)
    except (KeyError, ValueError) as exc:
        raise SafetensorsError(f"{path}: the tensors do not match the config: {exc}") from None
    model.eval()
    return model
