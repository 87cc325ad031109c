"""Transformer encoder and decoder layers, their stacks, and the encoder-decoder Transformer.

Names, arguments and state-dict layouts follow ``torch.nn.Transformer*`` (``self_attn.*``, ``multihead_attn.*``,
``linear1.*``, ``linear2.*``, ``norm1..3.*``, ``layers.N.*``), so ``load_state_dict(torch_module.state_dict())``
works directly. Inputs are batch-first (B, T, d_model). Post-norm by default (the paper's), pre-norm with
``norm_first=True``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import ops
from . import init
from .attention import MultiheadAttention
from .layers import Dropout, FeedForwardMixin, LayerNorm
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


class TransformerEncoderLayer(FeedForwardMixin, Module):
    """Self-attention then feed-forward, each with a residual connection and layer norm.

    post-norm: ``x = norm1(x + drop1(sa(x))); x = norm2(x + drop2(ff(x)))``;
    pre-norm (``norm_first``): ``x = x + drop1(sa(norm1(x))); x = x + drop2(ff(norm2(x)))``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True, norm_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        _check_batch_first(batch_first, "TransformerEncoderLayer")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self._init_ff(d_model, dim_feedforward, dropout, activation, bias)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.norm_first = bool(norm_first)
        self.d_model = int(d_model)

    def _sa(self, x, src_mask, src_key_padding_mask, is_causal):
        return self.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, need_weights=False,
                              is_causal=is_causal)[0]

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = ops._f32(src, "src")
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"TransformerEncoderLayer: src must be (batch, length, {self.d_model}), got {x.shape}")
        if self.norm_first:
            x = x + self.dropout1(self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal))
            return x + self.dropout2(self._ff(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self._sa(x, src_mask, src_key_padding_mask, is_causal)))
        return self.norm2(x + self.dropout2(self._ff(x)))

    def backward(self, grad_output):
        g = ops._f32(grad_output, "grad_output")
        if self.norm_first:
            g = g + self.norm2.backward(self._ff_backward(self.dropout2.backward(g)))
            return g + self.norm1.backward(self.self_attn.backward_self(self.dropout1.backward(g)))
        g = self.norm2.backward(g)
        g = g + self._ff_backward(self.dropout2.backward(g))
        g = self.norm1.backward(g)
        return g + self.self_attn.backward_self(self.dropout1.backward(g))


class TransformerDecoderLayer(FeedForwardMixin, Module):
    """Causal self-attention, cross-attention over the encoder's output (memory), feed-forward; each with a
    residual connection and layer norm (post-norm by default, pre-norm with ``norm_first``).
    ``backward`` returns ``(d_tgt, d_memory)``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True, norm_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        _check_batch_first(batch_first, "TransformerDecoderLayer")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self._init_ff(d_model, dim_feedforward, dropout, activation, bias)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.norm_first = bool(norm_first)
        self.d_model = int(d_model)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False):
        x = ops._f32(tgt, "tgt")
        mem = ops._f32(memory, "memory")
        for name, a in (("tgt", x), ("memory", mem)):
            if a.ndim != 3 or a.shape[2] != self.d_model:
                raise ValueError(f"TransformerDecoderLayer: {name} must be (batch, length, {self.d_model}), got "
                                 f"{a.shape}")

        def sa(h):
            return self.self_attn(h, h, h, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  need_weights=False, is_causal=tgt_is_causal)[0]

        def ca(h):
            return self.multihead_attn(h, mem, mem, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                                       need_weights=False, is_causal=memory_is_causal)[0]

        if self.norm_first:
            x = x + self.dropout1(sa(self.norm1(x)))
            x = x + self.dropout2(ca(self.norm2(x)))
            return x + self.dropout3(self._ff(self.norm3(x)))
        x = self.norm1(x + self.dropout1(sa(x)))
        x = self.norm2(x + self.dropout2(ca(x)))
        return self.norm3(x + self.dropout3(self._ff(x)))

    def backward(self, grad_output) -> Tuple[np.ndarray, np.ndarray]:
        g = ops._f32(grad_output, "grad_output")
        if self.norm_first:
            g = g + self.norm3.backward(self._ff_backward(self.dropout3.backward(g)))
            dq, dmem = self.multihead_attn.backward_query_memory(self.dropout2.backward(g))
            g = g + self.norm2.backward(dq)
            return g + self.norm1.backward(self.self_attn.backward_self(self.dropout1.backward(g))), dmem
        g = self.norm3.backward(g)
        g = g + self._ff_backward(self.dropout3.backward(g))
        g = self.norm2.backward(g)
        dq, dmem = self.multihead_attn.backward_query_memory(self.dropout2.backward(g))
        g = self.norm1.backward(g + dq)
        return g + self.self_attn.backward_self(self.dropout1.backward(g)), dmem


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
