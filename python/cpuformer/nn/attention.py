"""MultiheadAttention with PyTorch's names, arguments and weight layout, running the fused C++ attention kernel."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import _core, ops
from . import init, quantized
from .block import linear_entries
from .layers import Linear
from .module import Module, Parameter, check_grad_shape, thread_state

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

    def _prepared(self, i0: int, i1: int):
        if (i0, i1) not in self._frozen:  # per-channel scales: a slice quantizes to the same values
            self._frozen[(i0, i1)] = quantized.same_kind(self._frozen[(0, 3)], self._w(i0, i1))
        return self._frozen[(i0, i1)]

    def in_projection(self, x2: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """``x2`` (rows, E) through the packed projection's rows [i0*E, i1*E) (0..3: Q, K, V), with the bias."""
        if self._frozen is not None:
            quantized.require_inference(self)
            return quantized.linear(x2, self._prepared(i0, i1), self._b(i0, i1), self._w(i0, i1))
        return ops.matmul(x2, self._w(i0, i1), transpose_b=True, bias=self._b(i0, i1))

    def _parts(self, mode: str, grads: bool):
        """The block's attention parts (``attn.*``) for a forward of ``mode`` ("self", "kv", "qkv"), and their
        gradient arrays."""
        E = self.embed_dim
        spans = {"self": (("qkv", 0, 3),), "kv": (("q", 0, 1), ("kv", 1, 3)),
                 "qkv": (("q", 0, 1), ("k", 1, 2), ("v", 2, 3))}[mode]
        weights, grad = {}, ({} if grads else None)
        for part, i0, i1 in spans:
            weights[f"attn.{part}.weight"] = self._w(i0, i1)
            if self.in_proj_bias is not None:
                weights[f"attn.{part}.bias"] = self._b(i0, i1)
            if self._frozen is not None:
                prepared = self._prepared(i0, i1)
                weights[f"attn.{part}.{'int8' if isinstance(prepared, _core.Int8Weight) else 'packed'}"] = prepared
            if grads:
                grad[f"attn.{part}.weight"] = self.in_proj_weight.grad[i0 * E: i1 * E]
                if self.in_proj_bias is not None:
                    grad[f"attn.{part}.bias"] = self.in_proj_bias.grad[i0 * E: i1 * E]
        linear_entries(weights, grad, "attn.o", self.out_proj)
        return weights, grad

    def _config(self, training: bool):
        key = "_train_config" if training else "_eval_config"
        cfg = self.__dict__.get(key)
        if cfg is None:
            cfg = _core.BlockConfig(d_model=self.embed_dim, num_heads=self.num_heads,
                                    attention_dropout=self.dropout if training else 0.0)
            object.__setattr__(self, key, cfg)
        return cfg

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
        B, T, S = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        additive, padding = ops.attention_masks(attn_mask, key_padding_mask, B, self.num_heads, T, S)
        mode = "self" if self_attn else "kv" if same_kv else "qkv"
        weights, _ = self._parts(mode, False)
        want = bool(need_weights or self.record_weights)
        kw = dict(key_padding_mask=padding, attn_mask=additive, is_causal=bool(is_causal), need_weights=want)
        if self._frozen is not None:  # inference only, nothing kept
            quantized.require_inference(self)
            result = _core.attention_layer_forward(self._config(False), weights, q_in, k_in, v_in, **kw)
        else:  # what backward needs, per thread (eval-mode forwards may run in many threads)
            local = thread_state(self)
            if getattr(local, "saved", None) is None:
                local.saved = _core.AttentionSaved()
            training = self.training and self.dropout > 0.0
            local.mode, local.shape, local.training = mode, (B, T, self.embed_dim), training
            result = _core.attention_layer_forward(self._config(training), weights, q_in, k_in, v_in,
                                                   seed=init.next_seed() if training else 0, saved=local.saved, **kw)
        out, weights_out = (result if want else (result, None))
        if weights_out is not None and need_weights and average_attn_weights:
            weights_out = weights_out.mean(axis=1)
        object.__setattr__(self, "last_attn_weights", weights_out if want else None)
        return self._to_layout(out), (weights_out if need_weights else None)

    # -- backward -------------------------------------------------------------------------------------------------
    def _backward(self, grad_output, mode: str):
        if self._frozen is not None:
            quantized.no_backward(self)
        local = thread_state(self)
        saved = getattr(local, "saved", None)
        if saved is None or not saved.valid:
            raise RuntimeError("MultiheadAttention.backward called before forward")
        g = ops._f32(grad_output, "grad_output")
        if not self.batch_first:
            g = np.ascontiguousarray(g.transpose(1, 0, 2))
        check_grad_shape(g, local.shape, "MultiheadAttention")
        weights, grads = self._parts(local.mode, True)
        if mode == "separate" and local.mode == "kv":  # each of k and v on its own: their halves of the weight
            weights, grads = self._parts("qkv", True)
        grads_out = _core.attention_layer_backward(self._config(local.training), weights, grads, g, saved, mode)
        return tuple(self._to_layout(d) for d in grads_out)

    def _to_layout(self, x: np.ndarray) -> np.ndarray:
        return x if self.batch_first else np.ascontiguousarray(x.transpose(1, 0, 2))

    def backward(self, grad_output) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(d_query, d_key, d_value)`` (for self-attention, sum them: or call ``backward_self``)."""
        return self._backward(grad_output, "separate")

    def backward_self(self, grad_output) -> np.ndarray:
        """For self-attention (query is key is value): the summed input gradient, with one GEMM for Q, K and V."""
        if getattr(thread_state(self), "mode", None) != "self":
            raise RuntimeError("backward_self needs a preceding self-attention forward (query is key is value)")
        return self._backward(grad_output, "summed")[0]

    def backward_query_memory(self, grad_output) -> Tuple[np.ndarray, np.ndarray]:
        """For cross-attention over one memory (key is value): ``(d_query, d_memory)`` with d_memory summed over
        the key and value paths in one GEMM."""
        mode = getattr(thread_state(self), "mode", None)
        if mode is None or mode == "qkv":
            raise RuntimeError("backward_query_memory needs a preceding forward with key is value")
        if mode == "self":
            d = self.backward_self(grad_output)
            return d, np.zeros_like(d)
        return self._backward(grad_output, "query_memory")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")
