"""Basic layers: Linear, Embedding, PositionalEncoding, LayerNorm, RMSNorm, Dropout, ReLU, GELU, SiLU, FeedForward,
and the position layers RotaryEmbedding and RelativePositionBias.

Batch-first; the arithmetic runs in the C++ kernels of :mod:`cpuformer.ops`. Initialisation follows PyTorch's
defaults and draws from :mod:`cpuformer.nn.init`'s generator (``cpuformer.nn.init.manual_seed``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .. import _core, ops
from . import init, quantized
from .module import Module, Parameter, Workspace, check_grad_shape, thread_state

__all__ = ["Linear", "Embedding", "PositionalEncoding", "LayerNorm", "RMSNorm", "Dropout", "ReLU", "GELU", "SiLU",
           "FeedForward", "RotaryEmbedding", "RelativePositionBias", "feed_forward_apply", "feed_forward_grad"]


def _as_input(x, name: str = "input") -> np.ndarray:
    """float32 C-contiguous (no copy when it already is), at least 1-D."""
    arr = ops._f32(x, name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension")
    return arr


def _check_last_dim(x: np.ndarray, size: int, layer: str, name: str = "input") -> None:
    if x.shape[-1] != size:
        raise ValueError(f"{layer}: {name} must have last dimension {size}, got shape {x.shape}")


class Linear(Module):
    """``y = x W^T + b`` over the last axis; ``weight`` (out_features, in_features), ``bias`` (out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = ops._int_arg(in_features, "Linear: in_features", 1)
        self.out_features = ops._int_arg(out_features, "Linear: out_features", 1)
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's default (kaiming_uniform with a=sqrt(5))
        self.weight = Parameter(init.uniform((out_features, in_features), bound))
        if bias:
            self.bias = Parameter(init.uniform((out_features,), bound))
        else:
            object.__setattr__(self, "bias", None)
        self._x = None

    _frozen = None  # the weight prepared for inference (quantize_dynamic: int8; freeze: packed float32)

    def _freeze_weights(self, make) -> int:
        object.__setattr__(self, "_frozen", make(self.weight.data))
        return 1

    def forward(self, x):
        x = _as_input(x)
        _check_last_dim(x, self.in_features, "Linear")
        if self._frozen is not None:
            return self._frozen_forward(x)
        x2 = x.reshape(-1, self.in_features)
        y = ops.matmul(x2, self.weight.data, transpose_b=True, bias=None if self.bias is None else self.bias.data)
        self._x, self._lead = x2, x.shape[:-1]
        return y.reshape(self._lead + (self.out_features,))

    def _frozen_forward(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        quantized.require_inference(self)
        return quantized.linear(x, self._frozen, None if self.bias is None else self.bias.data, self.weight.data, out)

    def backward(self, grad_output):
        if self._frozen is not None:
            quantized.no_backward(self)
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, self._lead + (self.out_features,), "Linear")
        g2 = g.reshape(-1, self.out_features)
        ops.gemm(g2, self._x, self.weight.grad, transpose_a=True, beta=1.0)  # dW += g^T x
        if self.bias is not None:
            ops.bias_grad(g2, self.bias.grad)
        return ops.matmul(g2, self.weight.data).reshape(self._lead + (self.in_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table ``weight`` (num_embeddings, embedding_dim), initialised N(0, 1) as PyTorch's; the row
    ``padding_idx`` starts at zero and receives no gradient. ``backward`` returns None (ids have no gradient)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        num_embeddings = ops._int_arg(num_embeddings, "Embedding: num_embeddings", 1)
        embedding_dim = ops._int_arg(embedding_dim, "Embedding: embedding_dim", 1)
        if padding_idx is not None:
            padding_idx = ops._int_arg(padding_idx, "Embedding: padding_idx", None)
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} outside [0, {num_embeddings})")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim), 1.0))
        if padding_idx is not None:
            self.weight.data[padding_idx] = 0.0
        self._ids = None

    def forward(self, ids):
        self._ids = ops._ids(ids, "ids")
        return ops.embedding(self._ids, self.weight.data)

    def backward(self, grad_output):
        if self._ids is None:
            raise RuntimeError("Embedding.backward called before forward")
        ops.embedding_backward(grad_output, self._ids, self.weight.grad, padding_idx=self.padding_idx)
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """The paper's table: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * (-math.log(10000.0) / d_model))
    pe = np.zeros((max_len, d_model), np.float64)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div[: d_model // 2])
    return pe.astype(np.float32)


class PositionalEncoding(Module):
    """Adds position information to (B, T, d_model) inputs, then dropout: the fixed sinusoidal table of
    "Attention Is All You Need" (default), or a learned table ``weight`` (max_len, d_model) when ``learned``."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, learned: bool = False) -> None:
        super().__init__()
        self.d_model = ops._int_arg(d_model, "PositionalEncoding: d_model", 1)
        self.max_len = ops._int_arg(max_len, "PositionalEncoding: max_len", 1)
        self.learned = bool(learned)
        if learned:
            self.weight = Parameter(init.normal((max_len, d_model), 0.02))
        else:  # computed on use, up to the longest sequence seen: max_len alone allocates nothing
            object.__setattr__(self, "_table", np.zeros((0, self.d_model), np.float32))
        self.dropout = Dropout(dropout)
        self._shape = None

    def forward(self, x):
        x = _as_input(x)
        if x.ndim != 3:
            raise ValueError(f"PositionalEncoding: input must be (batch, length, d_model), got shape {x.shape}")
        _check_last_dim(x, self.d_model, "PositionalEncoding")
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"PositionalEncoding: sequence length {T} exceeds max_len {self.max_len}")
        self._shape = x.shape
        return self.dropout(x + self.rows(0, T)[None])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Position rows [start, stop) (stop <= max_len): the learned weight's, or the sinusoidal table's."""
        if self.learned:
            return self.weight.data[start:stop]
        table = self._table
        if table.shape[0] < stop:  # grow by doubling; a concurrent caller may compute the same rows, harmlessly
            table = sinusoidal_table(min(self.max_len, max(stop, 2 * table.shape[0], 64)), self.d_model)
            object.__setattr__(self, "_table", table)
        return table[start:stop]

    def backward(self, grad_output):
        if self._shape is None:
            raise RuntimeError("PositionalEncoding.backward called before forward")
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, self._shape, "PositionalEncoding")
        g = self.dropout.backward(g)
        if self.learned:
            self.weight.grad[: self._shape[1]] += g.sum(axis=0)
        return g

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, learned={self.learned}"


class LayerNorm(Module):
    """Layer normalization over the last axis with ``weight`` (ones) and ``bias`` (zeros)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"LayerNorm: only the last axis can be normalised, got normalized_shape={shape}")
        self.normalized_shape = (ops._int_arg(shape[0], "LayerNorm: normalized_shape", 1),)
        self.eps = ops._finite_scalar(eps, "LayerNorm: eps")
        if self.eps < 0:
            raise ValueError(f"LayerNorm: eps must be >= 0, got {eps}")
        C = self.normalized_shape[0]
        if elementwise_affine:
            self.weight = Parameter(np.ones(C, np.float32))
            if bias:
                self.bias = Parameter(np.zeros(C, np.float32))
            else:
                object.__setattr__(self, "bias", None)
        else:
            object.__setattr__(self, "weight", None)
            object.__setattr__(self, "bias", None)
        self._saved = None

    def forward(self, x):
        x = _as_input(x)
        _check_last_dim(x, self.normalized_shape[0], "LayerNorm")
        y, mean, rstd = ops.layer_norm_forward(x, None if self.weight is None else self.weight.data,
                                               None if self.bias is None else self.bias.data, self.eps)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, grad_output):
        if self._saved is None:
            raise RuntimeError("LayerNorm.backward called before forward")
        x, mean, rstd = self._saved
        dx, dw, db = ops.layer_norm_backward(grad_output, x, None if self.weight is None else self.weight.data,
                                             mean, rstd, need_param_grads=self.weight is not None)
        if self.weight is not None:
            self.weight.grad += dw
            if self.bias is not None:
                self.bias.grad += db
        return dx

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class RMSNorm(Module):
    """RMS normalization over the last axis, ``torch.nn.RMSNorm``'s signature and state dict (``weight``, ones):
    ``y = x / sqrt(mean(x^2) + eps) * weight``; ``eps=None`` is float32's machine epsilon. With ``one_plus`` the
    scale is ``1 + weight`` and ``weight`` starts at zeros (Gemma's RMSNorm and checkpoints)."""

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 one_plus: bool = False) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"RMSNorm: only the last axis can be normalised, got normalized_shape={shape}")
        self.normalized_shape = (ops._int_arg(shape[0], "RMSNorm: normalized_shape", 1),)
        if eps is not None:
            eps = ops._finite_scalar(eps, "RMSNorm: eps")
            if eps < 0:
                raise ValueError(f"RMSNorm: eps must be >= 0, got {eps}")
        self.eps = eps
        self.one_plus = bool(one_plus)
        C = self.normalized_shape[0]
        if elementwise_affine:
            self.weight = Parameter(np.zeros(C, np.float32) if self.one_plus else np.ones(C, np.float32))
        else:
            object.__setattr__(self, "weight", None)
        self._saved = None

    def forward(self, x):
        x = _as_input(x)
        _check_last_dim(x, self.normalized_shape[0], "RMSNorm")
        y, rstd = ops.rms_norm(x, None if self.weight is None else self.weight.data, self.eps, self.one_plus)
        self._saved = (x, rstd)
        return y

    def backward(self, grad_output):
        if self._saved is None:
            raise RuntimeError("RMSNorm.backward called before forward")
        x, rstd = self._saved
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, x.shape, "RMSNorm")
        dx, dw = ops.rms_norm_backward(g, x, None if self.weight is None else self.weight.data, rstd, self.one_plus,
                                       need_weight_grad=self.weight is not None)
        if self.weight is not None:
            self.weight.grad += dw
        return dx

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"
                + (", one_plus=True" if self.one_plus else ""))


class RotaryEmbedding(Module):
    """Rotary position embedding (RoPE) of query or key heads, no parameters. ``forward(x, num_heads,
    positions=None)`` rotates each head's first ``rotary_dim`` features (default: all of ``head_dim``) of ``x``
    (B, T, num_heads * head_dim) or (B, T, num_heads, head_dim), row (b, t) at ``positions[b, t]`` (default t;
    (B, T), (1, T) or (T,)); ``backward(grad)`` rotates back with what the last forward saved (a layer applied to
    both q and k needs one instance each, or :func:`cpuformer.ops.rotary_backward`). ``layout``: "half"
    (transformers' Llama/NeoX ``rotate_half``) or "interleaved" (GPT-J); ``scaling``: a transformers
    ``rope_scaling`` dict ("linear" or "llama3") or None."""

    def __init__(self, head_dim: int, rotary_dim: Optional[int] = None, theta: float = 10000.0,
                 layout: str = "half", scaling=None) -> None:
        super().__init__()
        self.head_dim = ops._int_arg(head_dim, "RotaryEmbedding: head_dim", 2)
        self.rotary_dim = self.head_dim if rotary_dim is None else rotary_dim
        self.theta = theta
        self.layout = layout
        self.scaling = None if scaling is None else dict(scaling)
        # validates every argument now rather than at the first forward
        self._args = dict(rotary_dim=self.rotary_dim, layout=layout, theta=theta, scaling=self.scaling)
        ops.rotary_inv_freq(self.head_dim, self.rotary_dim, theta, self.scaling)
        ops._layout(layout)
        self._saved = None

    def inv_freq(self) -> np.ndarray:
        return ops.rotary_inv_freq(self.head_dim, self.rotary_dim, self.theta, self.scaling)

    def forward(self, x, num_heads: Optional[int] = None, positions=None):
        x = _as_input(x)
        if x.ndim == 3 and num_heads is None and x.shape[-1] % self.head_dim == 0:
            num_heads = x.shape[-1] // self.head_dim
        if num_heads is not None:
            num_heads = ops._int_arg(num_heads, "RotaryEmbedding: num_heads", 1)
        if x.ndim == 4:
            expected = x.shape[:2] + (num_heads or x.shape[2], self.head_dim)
        else:
            expected = None if num_heads is None or x.ndim != 3 else x.shape[:2] + (num_heads * self.head_dim,)
        if x.shape != expected:
            raise ValueError(f"RotaryEmbedding: input must be (B, T, num_heads * {self.head_dim}) or "
                             f"(B, T, num_heads, {self.head_dim}); got shape {x.shape} with num_heads={num_heads}")
        if positions is not None:
            positions = ops._ids(positions, "positions").copy()  # kept for backward
        y = ops.rotary(x, num_heads, positions, **self._args)
        self._saved = (x.shape, num_heads, positions)
        return y

    def backward(self, grad_output):
        if self._saved is None:
            raise RuntimeError("RotaryEmbedding.backward called before forward")
        shape, num_heads, positions = self._saved
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, shape, "RotaryEmbedding")
        return ops.rotary_backward(g, num_heads, positions, **self._args)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, theta={self.theta}, "
                f"layout={self.layout!r}, scaling={self.scaling}")


class RelativePositionBias(Module):
    """T5's bucketed relative position bias: ``weight`` (num_buckets, num_heads), as transformers'
    ``relative_attention_bias.weight`` (initialised N(0, 1) like an Embedding). ``forward(T, S, query_offset=0)``
    returns the additive attention bias (num_heads, T, S) for queries at ``query_offset + t`` and keys at ``s``;
    ``backward(grad)`` accumulates into ``weight.grad`` and returns None. ``bidirectional``: encoder buckets (both
    signs), else causal decoder buckets. ``num_heads`` is keyword-only (it has no default)."""

    def __init__(self, num_buckets: int = 32, max_distance: int = 128, *, num_heads: int,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.num_buckets = ops._int_arg(num_buckets, "RelativePositionBias: num_buckets", 1)
        self.max_distance = ops._int_arg(max_distance, "RelativePositionBias: max_distance", 1)
        self.num_heads = ops._int_arg(num_heads, "RelativePositionBias: num_heads", 1)
        self.bidirectional = bool(bidirectional)
        ops.relative_position_bucket(np.zeros(1, np.int64), self.bidirectional, self.num_buckets, self.max_distance)
        self.weight = Parameter(init.normal((self.num_buckets, self.num_heads), 1.0))
        self._saved = None

    def _args(self):
        return dict(bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance)

    def forward(self, T: int, S: int, query_offset: int = 0):
        T = ops._int_arg(T, "RelativePositionBias: T", 1)
        S = ops._int_arg(S, "RelativePositionBias: S", 1)
        query_offset = ops._int_arg(query_offset, "RelativePositionBias: query_offset", None)
        bias = ops.relative_position_bias(self.weight.data, T, S, query_offset, **self._args())
        self._saved = (T, S, query_offset)
        return bias

    def backward(self, grad_output):
        if self._saved is None:
            raise RuntimeError("RelativePositionBias.backward called before forward")
        T, S, query_offset = self._saved
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, (self.num_heads, T, S), "RelativePositionBias")
        ops.relative_position_bias_backward(g, self.weight.grad, query_offset, **self._args())
        return None

    def extra_repr(self) -> str:
        return (f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, num_heads={self.num_heads}, "
                f"bidirectional={self.bidirectional}")


class Dropout(Module):
    """Inverted dropout in training mode (identity in eval mode). Each forward draws a seed from
    :mod:`cpuformer.nn.init`'s generator; backward regenerates the same mask from it."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self._seed = None

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def forward(self, x):
        if not self.active:
            self._seed = None
            return x
        self._seed = init.next_seed()
        y = ops.dropout(x, self.p, self._seed)[0]
        self._shape = y.shape
        return y

    def backward(self, grad_output):
        if self._seed is None:
            return grad_output
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, self._shape, "Dropout")
        return ops.dropout_backward(g, self.p, self._seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLU(Module):
    def __init__(self) -> None:
        super().__init__()
        self._x = None

    def forward(self, x):
        self._x = _as_input(x)
        return ops.relu(self._x)

    def backward(self, grad_output):
        return ops.relu_backward(grad_output, self._x)


class GELU(Module):
    """GELU, exact (``approximate="none"``) or the tanh approximation (``"tanh"``)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        ops._gelu_kind(approximate)
        self.approximate = approximate
        self._x = None

    def forward(self, x):
        self._x = _as_input(x)
        return ops.gelu(self._x, self.approximate)

    def backward(self, grad_output):
        return ops.gelu_backward(grad_output, self._x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SiLU(Module):
    """SiLU (swish): ``x * sigmoid(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self._x = None

    def forward(self, x):
        self._x = _as_input(x)
        return ops.silu(self._x)

    def backward(self, grad_output):
        if self._x is None:
            raise RuntimeError("SiLU.backward called before forward")
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, self._x.shape, "SiLU")
        return ops.silu_backward(g, self._x)


_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


def activation_name(activation) -> str:
    """"relu", "gelu" (exact), "gelu_tanh", "silu" (alias "swish"), or a ReLU/GELU/SiLU module instance, as a
    kernel activation name."""
    if isinstance(activation, ReLU):
        return "relu"
    if isinstance(activation, GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    if isinstance(activation, SiLU):
        return "silu"
    if not isinstance(activation, str) or activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'relu', 'gelu', 'gelu_tanh' or 'silu', got {activation!r}")
    return _ACTIVATIONS[activation]


def feed_forward_apply(linear1: Linear, linear2: Linear, x, activation: str, dropout_p: float,
                       workspace: Optional[Workspace] = None, gate: Optional[Linear] = None):
    """``linear2(dropout(act(linear1(x))))`` (with ``gate``: ``linear2(dropout(act(gate(x)) * linear1(x)))``) in one
    fused C++ call; returns ``(out, saved)`` for :func:`feed_forward_grad`. With a ``workspace`` the saved hidden
    activations live in its arrays (overwritten by the next call)."""
    x = _as_input(x)
    _check_last_dim(x, linear1.in_features, "FeedForward")
    rows, F = x.size // x.shape[-1], linear1.out_features
    linears = (linear1, linear2) if gate is None else (linear1, linear2, gate)
    frozen = [lin._frozen is not None for lin in linears]
    if all(frozen):  # prepared for inference: no dropout, no saves
        h = linear1._frozen_forward(x)
        kind = ops._activation_kind(activation)
        if gate is None:
            a = _core.activation(h, None, kind, True)
        else:
            a = ops.gated(gate._frozen_forward(x), h, activation)
        return linear2._frozen_forward(a), "frozen"
    if any(frozen):
        raise RuntimeError("feed-forward: its Linear layers must all be frozen (or quantized), or none")
    seed = init.next_seed() if dropout_p > 0.0 else 0
    u_width = F if gate is None else 2 * F
    u_out, a_out = (None, None) if workspace is None else (workspace.get("u", (rows, u_width)),
                                                           workspace.get("a", (rows, F)))
    out, u, a = ops.feed_forward(x, linear1.weight.data, None if linear1.bias is None else linear1.bias.data,
                                 linear2.weight.data, None if linear2.bias is None else linear2.bias.data,
                                 activation, dropout_p=dropout_p, seed=seed, u_out=u_out, a_out=a_out,
                                 w_gate=None if gate is None else gate.weight.data,
                                 b_gate=None if gate is None or gate.bias is None else gate.bias.data)
    return out, (x, u, a, dropout_p, seed, activation)


def feed_forward_grad(linear1: Linear, linear2: Linear, saved, grad_output, workspace: Optional[Workspace] = None,
                      gate: Optional[Linear] = None):
    """Input gradient of :func:`feed_forward_apply`; accumulates the parameter gradients."""
    if saved is None:
        raise RuntimeError("feed-forward backward called before forward")
    if isinstance(saved, str):
        quantized.no_backward(linear1)
    x, u, a, p, seed, activation = saved
    F = linear1.out_features
    scratch = None if workspace is None else workspace.get("grad_hidden", (u.shape[0], F if gate is None else 3 * F))
    return ops.feed_forward_backward(
        grad_output, x, u, a, linear1.weight.data, linear2.weight.data, linear1.weight.grad,
        None if linear1.bias is None else linear1.bias.grad, linear2.weight.grad,
        None if linear2.bias is None else linear2.bias.grad, activation, dropout_p=p, seed=seed, workspace=scratch,
        w_gate=None if gate is None else gate.weight.data, grad_w_gate=None if gate is None else gate.weight.grad,
        grad_b_gate=None if gate is None or gate.bias is None else gate.bias.grad)


class FeedForward(Module):
    """Position-wise feed-forward network ``linear2(dropout(act(linear1(x))))``, fused in the C++ core (bias in
    the GEMM write-back, activation and dropout in one pass); with ``gated=True`` the gated form (SwiGLU with
    ``activation="silu"``, GeGLU with "gelu"): ``linear2(dropout(act(linear_gate(x)) * linear1(x)))``."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, activation="relu",
                 bias: bool = True, gated: bool = False) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        if gated:
            self.linear_gate = Linear(d_model, dim_feedforward, bias=bias)
        else:
            object.__setattr__(self, "linear_gate", None)
        self.activation = activation_name(activation)
        self._ff_dropout = float(dropout)
        object.__setattr__(self, "_ff_workspace", Workspace())

    def forward(self, x):
        # what backward needs is kept per thread (the workspace's arrays are per thread too)
        out, thread_state(self).saved = feed_forward_apply(self.linear1, self.linear2, x, self.activation,
                                                           self._ff_dropout if self.training else 0.0,
                                                           self._ff_workspace, self.linear_gate)
        return out

    def backward(self, grad_output):
        return feed_forward_grad(self.linear1, self.linear2, getattr(thread_state(self), "saved", None), grad_output,
                                 self._ff_workspace, self.linear_gate)

    def extra_repr(self) -> str:
        return (f"activation={self.activation!r}, dropout={self._ff_dropout}"
                + (", gated=True" if self.linear_gate is not None else ""))
