"""Transformer encoder and decoder layers, their stacks, and the encoder-decoder Transformer.

Names, arguments and state-dict layouts follow ``torch.nn.Transformer*`` (``self_attn.*``, ``multihead_attn.*``,
``linear1.*``, ``linear2.*``, ``norm1..3.*``, ``layers.N.*``), so ``load_state_dict(torch_module.state_dict())``
works directly. Inputs are batch-first (B, T, d_model). Post-norm by default (the paper's), pre-norm with
``norm_first=True``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import _core, ops
from . import init, quantized
from .attention import MultiheadAttention
from .block import BlockLayer, linear_entries, norm_entries
from .layers import Dropout, LayerNorm, Linear, activation_name
from .module import Module, ModuleList

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
           "Transformer", "generate_square_subsequent_mask"]


def generate_square_subsequent_mask(size: int) -> np.ndarray:
    """Additive causal mask (size, size): 0 on and below the diagonal, -inf above (PyTorch's helper)."""
    return np.triu(np.full((size, size), -np.inf, np.float32), k=1)


def _check_batch_first(batch_first: bool, layer: str) -> None:
    if not batch_first:
        raise NotImplementedError(f"{layer}: only batch_first=True is supported (inputs are (batch, length, "
                                  "d_model)); transpose sequence-first data before calling")


def _in_proj_entries(weights: dict, grads, part: str, mha: MultiheadAttention, i0: int, i1: int) -> None:
    """Rows [i0*E, i1*E) of a MultiheadAttention's packed in_proj (0..3: Q, K, V) as the block part ``part``."""
    E = mha.embed_dim
    weights[part + ".weight"] = mha._w(i0, i1)
    if mha.in_proj_bias is not None:
        weights[part + ".bias"] = mha._b(i0, i1)
    if mha._frozen is not None:
        if (i0, i1) not in mha._frozen:  # per-channel scales: a slice quantizes to the same values
            mha._frozen[(i0, i1)] = quantized.same_kind(mha._frozen[(0, 3)], mha._w(i0, i1))
        prepared = mha._frozen[(i0, i1)]
        weights[part + (".int8" if isinstance(prepared, _core.Int8Weight) else ".packed")] = prepared
    if grads is not None:
        grads[part + ".weight"] = mha.in_proj_weight.grad[i0 * E: i1 * E]
        if mha.in_proj_bias is not None:
            grads[part + ".bias"] = mha.in_proj_bias.grad[i0 * E: i1 * E]


def _layer_config(layer, cross: bool) -> dict:
    return dict(d_model=layer.d_model, num_heads=layer.self_attn.num_heads, norm_eps=layer.layer_norm_eps,
                norm_first=layer.norm_first, activation=layer.activation, cross_attention=cross,
                dropout=layer.dropout_p, ff_dropout=layer.dropout_p, attention_dropout=layer.dropout_p)


def _record(mha: MultiheadAttention, result):
    """Keep the probabilities in ``last_attn_weights`` when record_attention asked for them."""
    if isinstance(result, tuple):
        object.__setattr__(mha, "last_attn_weights", result[1])
        return result[0]
    object.__setattr__(mha, "last_attn_weights", None)
    return result


class TransformerEncoderLayer(BlockLayer):
    """Self-attention then feed-forward, each with a residual connection and layer norm: one C++ block call
    per forward and per backward (:mod:`cpuformer.nn.block`).

    post-norm: ``x = norm1(x + drop1(sa(x))); x = norm2(x + drop2(ff(x)))``;
    pre-norm (``norm_first``): ``x = x + drop1(sa(norm1(x))); x = x + drop2(ff(norm2(x)))``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True, norm_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        _check_batch_first(batch_first, "TransformerEncoderLayer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        dim_feedforward = ops._int_arg(dim_feedforward, "TransformerEncoderLayer: dim_feedforward", 1)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.activation = activation_name(activation)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.norm_first = bool(norm_first)
        self.d_model = int(d_model)
        self.dropout_p, self.layer_norm_eps = float(dropout), float(self.norm1.eps)
        self.block_config  # validate now

    def _block_config(self) -> dict:
        return _layer_config(self, False)

    def _block_parts(self, weights: dict, grads) -> None:
        _in_proj_entries(weights, grads, "self_attn.qkv", self.self_attn, 0, 3)
        linear_entries(weights, grads, "self_attn.o", self.self_attn.out_proj)
        linear_entries(weights, grads, "ff.up", self.linear1)
        linear_entries(weights, grads, "ff.down", self.linear2)
        norm_entries(weights, grads, "norm1", self.norm1)
        norm_entries(weights, grads, "norm_ff", self.norm2)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = ops._f32(src, "src")
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"TransformerEncoderLayer: src must be (batch, length, {self.d_model}), got {x.shape}")
        return _record(self.self_attn, self._run(x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                                 is_causal=is_causal, need_weights=self.self_attn.record_weights))

    def backward(self, grad_output):
        return self._run_backward(grad_output)[0]


class TransformerDecoderLayer(BlockLayer):
    """Causal self-attention, cross-attention over the encoder's output (memory), feed-forward; each with a
    residual connection and layer norm (post-norm by default, pre-norm with ``norm_first``): one C++ block call
    per forward and per backward. ``backward`` returns ``(d_tgt, d_memory)``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True, norm_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        _check_batch_first(batch_first, "TransformerDecoderLayer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        dim_feedforward = ops._int_arg(dim_feedforward, "TransformerDecoderLayer: dim_feedforward", 1)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.activation = activation_name(activation)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.norm_first = bool(norm_first)
        self.d_model = int(d_model)
        self.dropout_p, self.layer_norm_eps = float(dropout), float(self.norm1.eps)
        self.block_config  # validate now

    def _block_config(self) -> dict:
        return _layer_config(self, True)

    def _block_parts(self, weights: dict, grads) -> None:
        _in_proj_entries(weights, grads, "self_attn.qkv", self.self_attn, 0, 3)
        linear_entries(weights, grads, "self_attn.o", self.self_attn.out_proj)
        _in_proj_entries(weights, grads, "cross_attn.q", self.multihead_attn, 0, 1)
        _in_proj_entries(weights, grads, "cross_attn.kv", self.multihead_attn, 1, 3)
        linear_entries(weights, grads, "cross_attn.o", self.multihead_attn.out_proj)
        linear_entries(weights, grads, "ff.up", self.linear1)
        linear_entries(weights, grads, "ff.down", self.linear2)
        norm_entries(weights, grads, "norm1", self.norm1)
        norm_entries(weights, grads, "norm2", self.norm2)
        norm_entries(weights, grads, "norm_ff", self.norm3)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False):
        x = ops._f32(tgt, "tgt")
        mem = ops._f32(memory, "memory")
        for name, a in (("tgt", x), ("memory", mem)):
            if a.ndim != 3 or a.shape[2] != self.d_model:
                raise ValueError(f"TransformerDecoderLayer: {name} must be (batch, length, {self.d_model}), got "
                                 f"{a.shape}")
        if x.shape[0] != mem.shape[0]:
            raise ValueError(f"TransformerDecoderLayer: tgt and memory must have the same batch, got {x.shape} and "
                             f"{mem.shape}")
        if memory_is_causal:  # query t sees memory positions s <= t
            causal = np.triu(np.full((x.shape[1], mem.shape[1]), -np.inf, np.float32), 1)
            if memory_mask is None:
                memory_mask = causal
            else:
                add, _ = ops.attention_masks(memory_mask, None, x.shape[0], self.self_attn.num_heads, x.shape[1],
                                             mem.shape[1])
                memory_mask = add + causal
        return _record(self.self_attn, self._run(
            x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, is_causal=tgt_is_causal, memory=mem,
            memory_mask=memory_mask, memory_key_padding_mask=memory_key_padding_mask,
            need_weights=self.self_attn.record_weights))

    def backward(self, grad_output) -> Tuple[np.ndarray, np.ndarray]:
        return self._run_backward(grad_output)


class _LayerStack(Module):
    """``num_layers`` copies of a layer (independent weights, identical at start, as PyTorch's deep copies) as
    ``layers.N`` and an optional final ``norm``."""

    def __init__(self, layer: Module, num_layers: int, norm: Optional[LayerNorm]) -> None:
        super().__init__()
        num_layers = ops._int_arg(num_layers, f"{type(self).__name__}: num_layers", 1)
        self.layers = ModuleList(layer.clone() for _ in range(num_layers))
        if norm is not None:
            self.norm = norm
        else:
            object.__setattr__(self, "norm", None)
        self.num_layers = int(num_layers)


class TransformerEncoder(_LayerStack):
    """A stack of encoder layers and an optional final ``norm``."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: Optional[LayerNorm] = None,
                 enable_nested_tensor: bool = True) -> None:
        super().__init__(encoder_layer, num_layers, norm)

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal: Optional[bool] = None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return x if self.norm is None else self.norm(x)

    def backward(self, grad_output):
        g = grad_output if self.norm is None else self.norm.backward(grad_output)
        for layer in reversed(list(self.layers)):
            g = layer.backward(g)
        return g


class TransformerDecoder(_LayerStack):
    """A stack of decoder layers and an optional final ``norm``. ``backward`` returns ``(d_tgt, d_memory)`` with
    d_memory summed over the layers."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: Optional[LayerNorm] = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return x if self.norm is None else self.norm(x)

    def backward(self, grad_output) -> Tuple[np.ndarray, np.ndarray]:
        g = grad_output if self.norm is None else self.norm.backward(grad_output)
        d_memory = None
        for layer in reversed(list(self.layers)):
            g, dm = layer.backward(g)
            d_memory = dm if d_memory is None else d_memory + dm
        return g, d_memory


class Transformer(Module):
    """The encoder-decoder Transformer of "Attention Is All You Need" (``torch.nn.Transformer``'s layout:
    ``encoder.layers.N.*``, ``encoder.norm.*``, ``decoder.layers.N.*``, ``decoder.norm.*``). Weights with 2 or
    more dimensions are Xavier-uniform initialised, as PyTorch does. ``forward(src, tgt, ...)`` returns the
    decoder output; ``backward`` returns ``(d_src, d_tgt)``."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1, activation="relu",
                 custom_encoder: Optional[Module] = None, custom_decoder: Optional[Module] = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = True, norm_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        _check_batch_first(batch_first, "Transformer")
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            True, norm_first, bias)
            self.encoder = TransformerEncoder(layer, num_encoder_layers, LayerNorm(d_model, layer_norm_eps, bias=bias))
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            True, norm_first, bias)
            self.decoder = TransformerDecoder(layer, num_decoder_layers, LayerNorm(d_model, layer_norm_eps, bias=bias))
        for p in self.parameters():
            if p.data.ndim > 1:
                p.data[...] = init.xavier_uniform(p.data.shape)
        self.d_model, self.nhead = int(d_model), int(nhead)

    generate_square_subsequent_mask = staticmethod(generate_square_subsequent_mask)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal: Optional[bool] = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False):
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    def backward(self, grad_output) -> Tuple[np.ndarray, np.ndarray]:
        d_tgt, d_memory = self.decoder.backward(grad_output)
        return self.encoder.backward(d_memory), d_tgt
