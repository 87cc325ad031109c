"""Pretrained weights from Hugging Face checkpoints on local disk (never a download): BERT-family encoders and
GPT-2. ``from_pretrained(directory)`` reads ``config.json`` (``model_type`` "bert" or "gpt2") and
``model.safetensors`` (or ``pytorch_model.bin`` through torch, when torch is installed)."""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from .. import ops
from ..io import load_safetensors, parse_json
from ..serialization import check_config
from ..nn import Embedding, LayerNorm, Linear, Module, ModuleList, TransformerEncoderLayer
from .gpt import GPT

__all__ = ["BertModel", "from_pretrained", "mean_pool"]

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def mean_pool(hidden: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Sentence embeddings: the mean of the hidden states (B, T, H) over the tokens where attention_mask is 1."""
    if attention_mask is None:
        return hidden.mean(axis=1)
    m = np.asarray(attention_mask, np.float32)[..., None]
    return ((hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)).astype(np.float32)


class BertModel(Module):
    """A BERT-family encoder (``transformers.BertModel``'s architecture, inference): word + position + token-type
    embeddings, embedding LayerNorm, post-norm encoder layers, and the pooler. ``model(input_ids,
    attention_mask=None, token_type_ids=None)`` returns the last hidden state (B, T, hidden) as a numpy array
    (attention_mask: 1 = attend, 0 = padding, as Hugging Face); ``pooled(hidden)`` is the pooler output."""

    def __init__(self, vocab_size: int, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
                 pooler: bool = True) -> None:
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertModel: unsupported hidden_act {hidden_act!r}")
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                           max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
                           layer_norm_eps=layer_norm_eps, hidden_act=hidden_act, pooler=pooler)
        self.word_embeddings = Embedding(vocab_size, hidden_size)
        self.position_embeddings = Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = Embedding(type_vocab_size, hidden_size)
        self.embeddings_norm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = ModuleList(TransformerEncoderLayer(hidden_size, num_attention_heads, intermediate_size, 0.0,
                                                         _ACTIVATIONS[hidden_act], layer_norm_eps)
                                 for _ in range(num_hidden_layers))
        if pooler:
            self.pooler = Linear(hidden_size, hidden_size)
        self.eval()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        ids = ops._ids(input_ids, "input_ids")
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
        B, T = ids.shape
        if T > self.config["max_position_embeddings"]:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config['max_position_embeddings']}")
        types = np.zeros_like(ids) if token_type_ids is None else ops._ids(token_type_ids, "token_type_ids")
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids must have shape {ids.shape}, got {types.shape}")
        padding = None
        if attention_mask is not None:
            am = np.asarray(attention_mask)
            if am.shape != ids.shape:
                raise ValueError(f"attention_mask must have shape {ids.shape}, got {am.shape}")
            padding = am == 0
        x = (self.word_embeddings(ids) + self.position_embeddings.weight.data[:T] + self.token_type_embeddings(types))
        x = self.embeddings_norm(x)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x

    def pooled(self, hidden: np.ndarray) -> np.ndarray:
        """The pooler output: tanh(dense(hidden[:, 0]))."""
        return np.tanh(self.pooler(hidden[:, 0]))


# ------------------------------------------------------------------------------------------------ weight mapping

def _read_weights(directory: str) -> Dict[str, np.ndarray]:
    st = os.path.join(directory, "model.safetensors")
    if os.path.isfile(st):
        tensors, _ = load_safetensors(st)
        return tensors
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        try:
            import torch
        except ImportError as exc:
            raise ImportError(f"{binary} is a PyTorch pickle; reading it needs torch (or convert the checkpoint to "
                              "model.safetensors)") from exc
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _strip(weights: Dict[str, np.ndarray], prefixes) -> Dict[str, np.ndarray]:
    out = {}
    for k, v in weights.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k.replace(".gamma", ".weight").replace(".beta", ".bias")] = v
    return out


def _bert_state(w: Dict[str, np.ndarray], n_layers: int, pooler: bool) -> Dict[str, np.ndarray]:
    w = _strip(w, ("bert.",))
    sd = {"word_embeddings.weight": w["embeddings.word_embeddings.weight"],
          "position_embeddings.weight": w["embeddings.position_embeddings.weight"],
          "token_type_embeddings.weight": w["embeddings.token_type_embeddings.weight"],
          "embeddings_norm.weight": w["embeddings.LayerNorm.weight"],
          "embeddings_norm.bias": w["embeddings.LayerNorm.bias"]}
    for i in range(n_layers):
        h, o = f"encoder.layer.{i}.", f"layers.{i}."
        sd[o + "self_attn.in_proj_weight"] = np.concatenate(
            [w[h + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
        sd[o + "self_attn.in_proj_bias"] = np.concatenate(
            [w[h + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        pairs = {"self_attn.out_proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
                 "linear1": "intermediate.dense", "linear2": "output.dense", "norm2": "output.LayerNorm"}
        for ours, theirs in pairs.items():
            sd[o + ours + ".weight"] = w[h + theirs + ".weight"]
            sd[o + ours + ".bias"] = w[h + theirs + ".bias"]
    if pooler:
        sd["pooler.weight"], sd["pooler.bias"] = w["pooler.dense.weight"], w["pooler.dense.bias"]
    return sd


def _gpt2_state(w: Dict[str, np.ndarray], n_layers: int) -> Dict[str, np.ndarray]:
    w = _strip(w, ("transformer.",))
    sd = {"wte.weight": w["wte.weight"], "wpe.weight": w["wpe.weight"], "ln_f.weight": w["ln_f.weight"],
          "ln_f.bias": w["ln_f.bias"]}
    for i in range(n_layers):
        h, o = f"h.{i}.", f"blocks.{i}."
        # GPT-2's Conv1D stores weights (in, out): transposed relative to Linear
        sd[o + "self_attn.in_proj_weight"] = w[h + "attn.c_attn.weight"].T
        sd[o + "self_attn.in_proj_bias"] = w[h + "attn.c_attn.bias"]
        sd[o + "self_attn.out_proj.weight"] = w[h + "attn.c_proj.weight"].T
        sd[o + "self_attn.out_proj.bias"] = w[h + "attn.c_proj.bias"]
        sd[o + "linear1.weight"] = w[h + "mlp.c_fc.weight"].T
        sd[o + "linear1.bias"] = w[h + "mlp.c_fc.bias"]
        sd[o + "linear2.weight"] = w[h + "mlp.c_proj.weight"].T
        sd[o + "linear2.bias"] = w[h + "mlp.c_proj.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd[o + ours + ".weight"] = w[h + theirs + ".weight"]
            sd[o + ours + ".bias"] = w[h + theirs + ".bias"]
    return sd


def from_pretrained(directory: str):
    """Build the model described by ``directory/config.json`` and load its weights (see module docstring). The
    model's ``tokenizer`` is the directory's (a :class:`cpuformer.Tokenizer`), or None when it has none."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, "rb") as f:
            cfg = parse_json(f.read(), config_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face model directory is expected)") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    kind = cfg.get("model_type")
    weights = _read_weights(directory)
    if kind not in ("bert", "gpt2"):
        raise ValueError(f"{config_path}: model_type {kind!r} is not supported (bert, gpt2)")
    try:
        if kind == "bert":
            has_pooler = any(k.endswith("pooler.dense.weight") for k in weights)
            cls, n_layers = BertModel, cfg["num_hidden_layers"]
            args = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=n_layers,
                        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
                        max_position_embeddings=cfg["max_position_embeddings"],
                        type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                        hidden_act=cfg.get("hidden_act", "gelu"), pooler=has_pooler)
        else:
            cls, n_layers = GPT, cfg["n_layer"]
            args = dict(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=n_layers,
                        n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0, positional="learned",
                        tie_weights=True,
                        activation=_ACTIVATIONS.get(cfg.get("activation_function", "gelu_new"), "gelu_tanh"),
                        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5))
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"{config_path}: the layer count must be an integer >= 1, got {n_layers!r}")
        state = _bert_state(weights, n_layers, has_pooler) if kind == "bert" else _gpt2_state(weights, n_layers)
    except KeyError as exc:
        raise ValueError(f"{directory}: checkpoint or config lacks {exc}") from None
    # Every size is checked against the checkpoint's tensors before the model is built.
    model = cls(**check_config(cls, args, state, directory))
    model.load_state_dict(state)
    model.eval()
    model.tokenizer = _tokenizer_of(directory)
    return model


def _tokenizer_of(directory: str):
    """The directory's tokenizer (tokenizer.json, or vocab.txt / vocab.json + merges.txt), or None without one."""
    from ..tokenizer import Tokenizer
    try:
        return Tokenizer.from_pretrained(directory)
    except FileNotFoundError:
        return None
