"""MultiheadAttention with PyTorch's names, arguments and weight layout, running the fused C++ attention kernel."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import ops
from . import init, quantized
from .layers import Linear
from .module import Module, Parameter

__all__ = ["MultiheadAttention", "record_attention", "attention_maps"]


def record_attention(module: Module, enabled: bool = True) -> None:
    """Make every attention layer inside ``module`` keep its probabilities (B, heads, T, S) after each forward,
    even when called with ``need_weights=False`` (as the Transformer layers do). Costs a materialising pass."""
    for m in module.modules():
        if isinstance(m, MultiheadAttention):
            object.__setattr__(m, "record_weights", bool(enabled))


def attention_maps(module: Module) -> dict:
    """``{layer name: weights}`` of the attention layers' most recent forward (see :func:`record_attention`)."""
    return {name: m.last_attn_weights for name, m in module.named_modules()
            if isinstance(m, MultiheadAttention) and m.last_attn_weights is not None}


class MultiheadAttention(Module):
    """Multi-head attention: project to Q, K, V, split into heads, attend, concatenate, project out.

    Weights as ``torch.nn.MultiheadAttention``: packed ``in_proj_weight`` (3E, E) (rows of Wq, then Wk, then Wv),
    ``in_proj_bias`` (3E), ``out_proj.weight`` (E, E), ``out_proj.bias``; ``load_state_dict(torch_mha.state_dict())``
    works directly. Inputs are **batch-first by default** (B, T, E) (PyTorch's default is ``batch_first=False``);
    ``batch_first=False`` takes (T, B, E).

    Masks as PyTorch: ``attn_mask`` boolean (True = not allowed) or additive float, (T, S) or (B*num_heads, T, S);
    ``key_padding_mask`` (B, S), True = padding; ``is_causal`` lets query t attend keys s <= t (applied even without
    ``attn_mask``). A query whose keys are all masked gets a zero output (PyTorch gives NaN there).

    ``forward`` returns ``(output, weights)``; weights are ``None`` unless ``need_weights`` (the default, as in
    PyTorch), in which case the attention probabilities are computed on a separate, materialising path:
    (B, T, S) averaged over heads, or (B, num_heads, T, S). The most recent ones stay in ``last_attn_weights``.
    Dropout on the attention probabilities happens inside the fused kernel (training mode); the returned
    weights are those before dropout.

    ``backward(grad_output)`` returns ``(d_query, d_key, d_value)``; for self-attention the caller sums them.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = True) -> None:
        super().__init__()
        embed_dim = ops._int_arg(embed_dim, "MultiheadAttention: embed_dim", 1)
        num_heads = ops._int_arg(num_heads, "MultiheadAttention: num_heads", 1)
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        if add_bias_kv or add_zero_attn or (kdim not in (None, embed_dim)) or (vdim not in (None, embed_dim)):
            raise NotImplementedError("MultiheadAttention: add_bias_kv, add_zero_attn and kdim/vdim != embed_dim "
                                      "are not supported")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.dropout = int(embed_dim), int(num_heads), float(dropout)
        self.head_dim = embed_dim // num_heads
        self.batch_first = bool(batch_first)
        E = embed_dim
        self.in_proj_weight = Parameter(init.xavier_uniform((3 * E, E)))
        if bias:
            self.in_proj_bias = Parameter(np.zeros(3 * E, np.float32))
        else:
            object.__setattr__(self, "in_proj_bias", None)
        self.out_proj = Linear(E, E, bias=bias)
        if bias:
            self.out_proj.bias.data[...] = 0.0
        object.__setattr__(self, "last_attn_weights", None)
        object.__setattr__(self, "record_weights", False)  # see record_attention()
        self._saved = None

    # -- helpers --------------------------------------------------------------------------------------------------
    def _w(self, i0: int, i1: int) -> np.ndarray:
        return self.in_proj_weight.data[i0 * self.embed_dim: i1 * self.embed_dim]

    def _b(self, i0: int, i1: int):
        return None if self.in_proj_bias is None else self.in_proj_bias.data[i0 * self.embed_dim:
                                                                             i1 * self.embed_dim]

    _frozen = None  # {(i0, i1): those in_proj rows prepared for inference} (quantize_dynamic / freeze)

    def _freeze_weights(self, make) -> int:
        object.__setattr__(self, "_frozen", {(0, 3): make(self.in_proj_weight.data)})
        return 1

    def in_projection(self, x2: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """``x2`` (rows, E) through the packed projection's rows [i0*E, i1*E) (0..3: Q, K, V), with the bias."""
        if self._frozen is not None:
            quantized.require_inference(self)
            if (i0, i1) not in self._frozen:  # per-channel scales: a slice quantizes to the same values
                self._frozen[(i0, i1)] = quantized.same_kind(self._frozen[(0, 3)], self._w(i0, i1))
            return quantized.linear(x2, self._frozen[(i0, i1)], self._b(i0, i1), self._w(i0, i1))
        return ops.matmul(x2, self._w(i0, i1), transpose_b=True, bias=self._b(i0, i1))

    def _project(self, x: np.ndarray, i0: int, i1: int) -> np.ndarray:
        B, L, _ = x.shape
        y = self.in_projection(x.reshape(B * L, self.embed_dim), i0, i1)
        return y.reshape(B, L, (i1 - i0) * self.embed_dim)

    def _input(self, x, name: str) -> np.ndarray:
        x = ops._f32(x, name)
        if x.ndim != 3 or x.shape[2] != self.embed_dim:
            layout = "(batch, length, embed_dim)" if self.batch_first else "(length, batch, embed_dim)"
            raise ValueError(f"MultiheadAttention: {name} must be {layout} with embed_dim {self.embed_dim}, "
                             f"got shape {x.shape}")
        return x if self.batch_first else np.ascontiguousarray(x.transpose(1, 0, 2))

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                is_causal: bool = False, average_attn_weights: bool = True):
        same_kv = key is value
        self_attn = query is key and same_kv
        q_in = self._input(query, "query")
        k_in = q_in if self_attn else self._input(key, "key")
        v_in = k_in if same_kv else self._input(value, "value")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != q_in.shape[0]:
            raise ValueError(f"MultiheadAttention: batch and length of key {k_in.shape} and value {v_in.shape} must "
                             f"match, and their batch that of query {q_in.shape}")
        E = self.embed_dim
        if self_attn:  # one GEMM for Q, K and V; the kernel reads the thirds in place
            qkv = self._project(q_in, 0, 3)
            q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        elif same_kv:
            q = self._project(q_in, 0, 1)
            kv = self._project(k_in, 1, 3)
            k, v = kv[..., :E], kv[..., E:]
        else:
            q, k, v = self._project(q_in, 0, 1), self._project(k_in, 1, 2), self._project(v_in, 2, 3)
        B, T, S = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        additive, padding = ops.attention_masks(attn_mask, key_padding_mask, B, self.num_heads, T, S)
        p = self.dropout if self.training else 0.0
        seed = init.next_seed() if p > 0.0 else 0
        mask_kw = dict(attn_mask=additive, key_padding_mask=padding, is_causal=bool(is_causal))
        attn, lse = ops.attention(q, k, v, self.num_heads, dropout_p=p, seed=seed, need_lse=True, **mask_kw)
        out = self.out_proj(attn)
        weights = None
        if need_weights or self.record_weights:
            weights = ops.attention_weights(q, k, self.num_heads, **mask_kw)
            if need_weights and average_attn_weights:
                weights = weights.mean(axis=1)
        object.__setattr__(self, "last_attn_weights", weights)
        if not need_weights:
            weights = None
        self._saved = dict(mode="self" if self_attn else "kv" if same_kv else "qkv", q_in=q_in, k_in=k_in,
                           v_in=v_in, q=q, k=k, v=v, attn=attn, lse=lse, p=p, seed=seed, mask=mask_kw)
        return self._to_layout(out), weights  # weights are (B, ...) in either layout, as PyTorch's

    # -- backward -------------------------------------------------------------------------------------------------
    def _attention_grads(self, grad_output):
        """Through out_proj and the attention kernel: returns the projected-input gradients in one buffer laid out
        like the forward's projections (B, T, 3E) for self-attention, else dq (B, T, E) and dkv (B, S, 2E) or
        separate dk, dv."""
        if self._frozen is not None:
            quantized.no_backward(self)
        s = self._saved
        if s is None:
            raise RuntimeError("MultiheadAttention.backward called before forward")
        g = ops._f32(grad_output, "grad_output")
        if not self.batch_first:
            g = np.ascontiguousarray(g.transpose(1, 0, 2))
        dattn = self.out_proj.backward(g)
        E = self.embed_dim
        B, T, S = s["q"].shape[0], s["q"].shape[1], s["k"].shape[1]
        if s["mode"] == "self":
            dqkv = np.empty((B, T, 3 * E), np.float32)
            dq, dk, dv = dqkv[..., :E], dqkv[..., E:2 * E], dqkv[..., 2 * E:]
            bufs = (dqkv,)
        elif s["mode"] == "kv":
            dq = np.empty((B, T, E), np.float32)
            dkv = np.empty((B, S, 2 * E), np.float32)
            dk, dv = dkv[..., :E], dkv[..., E:]
            bufs = (dq, dkv)
        else:
            dq, dk, dv = (np.empty((B, L, E), np.float32) for L in (T, S, S))
            bufs = (dq, dk, dv)
        ops.attention_backward(dattn, s["q"], s["k"], s["v"], s["attn"], s["lse"], self.num_heads,
                               dropout_p=s["p"], seed=s["seed"], grad_query=dq, grad_key=dk, grad_value=dv,
                               **s["mask"])
        return bufs

    def _accumulate_in_proj(self, dproj: np.ndarray, x: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """Weight/bias gradients of the projection rows [i0*E, i1*E) and the input gradient dproj @ W."""
        E = self.embed_dim
        d2 = dproj.reshape(-1, (i1 - i0) * E)
        ops.gemm(d2, x.reshape(-1, E), self.in_proj_weight.grad[i0 * E: i1 * E], transpose_a=True, beta=1.0)
        if self.in_proj_bias is not None:
            ops.bias_grad(d2, self.in_proj_bias.grad[i0 * E: i1 * E])
        return ops.matmul(d2, self._w(i0, i1)).reshape(x.shape)

    def _to_layout(self, x: np.ndarray) -> np.ndarray:
        return x if self.batch_first else np.ascontiguousarray(x.transpose(1, 0, 2))

    def backward(self, grad_output) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(d_query, d_key, d_value)`` (for self-attention, sum them: or call ``backward_self``)."""
        bufs = self._attention_grads(grad_output)
        s, E = self._saved, self.embed_dim
        if s["mode"] == "self":
            (dqkv,) = bufs
            x = s["q_in"]
            grads = [self._accumulate_in_proj(np.ascontiguousarray(dqkv[..., i * E:(i + 1) * E]), x, i, i + 1)
                     for i in range(3)]
        elif s["mode"] == "kv":
            dq, dkv = bufs
            grads = [self._accumulate_in_proj(dq, s["q_in"], 0, 1)]
            grads += [self._accumulate_in_proj(np.ascontiguousarray(dkv[..., i * E:(i + 1) * E]), s["k_in"], 1 + i,
                                               2 + i) for i in range(2)]
        else:
            grads = [self._accumulate_in_proj(d, s[name], i, i + 1)
                     for i, (d, name) in enumerate(zip(bufs, ("q_in", "k_in", "v_in")))]
        return tuple(self._to_layout(g) for g in grads)

    def backward_self(self, grad_output) -> np.ndarray:
        """For self-attention (query is key is value): the summed input gradient, with one GEMM for Q, K and V."""
        if self._saved is None or self._saved["mode"] != "self":
            raise RuntimeError("backward_self needs a preceding self-attention forward (query is key is value)")
        (dqkv,) = self._attention_grads(grad_output)
        return self._to_layout(self._accumulate_in_proj(dqkv, self._saved["q_in"], 0, 3))

    def backward_query_memory(self, grad_output) -> Tuple[np.ndarray, np.ndarray]:
        """For cross-attention over one memory (key is value): ``(d_query, d_memory)`` with d_memory summed over
        the key and value paths in one GEMM."""
        if self._saved is None or self._saved["mode"] == "qkv":
            raise RuntimeError("backward_query_memory needs a preceding forward with key is value")
        if self._saved["mode"] == "self":
            d = self.backward_self(grad_output)
            return d, np.zeros_like(d)
        dq, dkv = self._attention_grads(grad_output)
        s = self._saved
        return (self._to_layout(self._accumulate_in_proj(dq, s["q_in"], 0, 1)),
                self._to_layout(self._accumulate_in_proj(dkv, s["k_in"], 1, 3)))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")
