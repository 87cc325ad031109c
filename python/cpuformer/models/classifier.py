"""TransformerClassifier: embedding + positional encoding + encoder + pooling + linear head."""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..nn import (Embedding, LayerNorm, Linear, Module, Parameter, PositionalEncoding, TransformerEncoder,
                  TransformerEncoderLayer, init)

__all__ = ["TransformerClassifier"]


class TransformerClassifier(Module):
    """Sequence classifier. ``forward(ids)`` with ids (B, T) (``pad_id`` marks padding) returns logits
    (B, num_classes). ``pooling="mean"`` averages the encoder output over non-padding tokens; ``"cls"`` prepends a
    learned CLS vector and uses its output. Embeddings are scaled by sqrt(d_model) as in the paper."""

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 512, dropout: float = 0.1, max_len: int = 512, pooling: str = "mean",
                 pad_id: int = 0, positional: str = "sinusoidal", norm_first: bool = True) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, d_model=d_model, nhead=nhead,
                           num_layers=num_layers, dim_feedforward=dim_feedforward, dropout=dropout, max_len=max_len,
                           pooling=pooling, pad_id=pad_id, positional=positional, norm_first=norm_first)
        self.embedding = Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.embedding.weight.data[...] = init.normal((vocab_size, d_model), d_model ** -0.5)
        self.embedding.weight.data[pad_id] = 0.0
        if pooling == "cls":
            self.cls = Parameter(init.normal((d_model,), 0.02))
        self.pos = PositionalEncoding(d_model, max_len + 1, dropout, learned=positional == "learned")
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, "gelu", norm_first=norm_first)
        self.encoder = TransformerEncoder(layer, num_layers, norm=LayerNorm(d_model) if norm_first else None)
        self.head = Linear(d_model, num_classes)
        self.d_model, self.pad_id, self.pooling = d_model, pad_id, pooling
        self._saved = None

    def forward(self, ids):
        ids = ops._ids(ids, "ids")
        if ids.ndim != 2:
            raise ValueError(f"TransformerClassifier: ids must be (batch, length), got shape {ids.shape}")
        if ids.shape[1] > self.config["max_len"]:  # the C++ runtime applies the same rule, whatever the pooling
            raise ValueError(f"TransformerClassifier: sequence length {ids.shape[1]} exceeds max_len "
                             f"{self.config['max_len']}")
        scale = math.sqrt(self.d_model)
        pad = ids == self.pad_id
        x = self.embedding(ids) * scale
        if self.pooling == "cls":
            x = np.concatenate([np.broadcast_to(self.cls.data, (x.shape[0], 1, self.d_model)), x], axis=1)
            pad = np.concatenate([np.zeros((x.shape[0], 1), bool), pad], axis=1)
        h = self.encoder(self.pos(x), src_key_padding_mask=pad)
        if self.pooling == "cls":
            pooled = h[:, 0]
            weights = None
        else:
            keep = (~pad).astype(np.float32)
            weights = keep / np.maximum(keep.sum(1, keepdims=True), 1.0)  # (B, T): mean over real tokens
            pooled = np.einsum("btc,bt->bc", h, weights).astype(np.float32)
        self._saved = (h.shape, weights)
        return self.head(pooled)

    def backward(self, grad_output):
        shape, weights = self._saved
        dpooled = self.head.backward(grad_output)
        if self.pooling == "cls":
            dh = np.zeros(shape, np.float32)
            dh[:, 0] = dpooled
        else:
            dh = (dpooled[:, None, :] * weights[:, :, None]).astype(np.float32)
        dx = self.pos.backward(self.encoder.backward(dh))
        if self.pooling == "cls":
            self.cls.grad += dx[:, 0].sum(0)
            dx = dx[:, 1:]
        self.embedding.backward(np.ascontiguousarray(dx) * math.sqrt(self.d_model))
        return None
