"""Layers with PyTorch's names, arguments and weight layouts, forward and backward (no autograd: each layer's
``backward(grad_output)`` returns input gradients and accumulates parameter gradients)."""
from __future__ import annotations

from . import init
from .attention import MultiheadAttention, attention_maps, record_attention
from .layers import (GELU, Dropout, Embedding, FeedForward, LayerNorm, Linear, PositionalEncoding, RelativePositionBias,
                     ReLU, RMSNorm, RotaryEmbedding, SiLU)
from .module import Module, ModuleList, Parameter, Sequential, is_grad_enabled, no_grad
from .quantized import freeze, is_frozen, is_quantized, quantize_dynamic
from .block import KVCache, TransformerBlock
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer, generate_square_subsequent_mask)

__all__ = ["init", "Parameter", "Module", "Sequential", "ModuleList", "Linear", "Embedding", "PositionalEncoding",
           "LayerNorm", "RMSNorm", "Dropout", "ReLU", "GELU", "SiLU", "FeedForward", "RotaryEmbedding",
           "RelativePositionBias", "MultiheadAttention", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "Transformer",
           "generate_square_subsequent_mask", "TransformerBlock", "KVCache", "record_attention", "attention_maps",
           "quantize_dynamic", "is_quantized", "freeze", "is_frozen", "no_grad", "is_grad_enabled"]
