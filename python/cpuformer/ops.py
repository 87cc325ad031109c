"""Functional kernels: forward and backward of every op the layers use.

Conventions
-----------
* Float inputs are used without a copy when they are ``float32`` C-contiguous numpy arrays. Anything else that
  ``numpy.asarray`` reads as real numbers (float64, float16, integer arrays, lists, torch CPU tensors) is
  **converted to a float32 C-contiguous copy**. Complex, boolean, object and string data raise ``TypeError``.
* Id and label inputs must be integers (any integer dtype; converted to int64); floats raise ``TypeError``.
* Zero-size dimensions, wrong ranks and mismatched shapes raise ``ValueError`` naming the argument and shapes;
  ids or labels out of range raise ``IndexError``. Checks happen before anything is computed.
* Every kernel releases the GIL while it runs, so Python threads can call kernels concurrently.
* An array the op writes into must not share memory with an input or another output (``ValueError``).
* Backward functions return input gradients; parameter gradients are returned as new arrays unless the function
  says it accumulates into an array you pass.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from . import _core

__all__ = [
    "matmul", "gemm", "softmax", "softmax_backward", "log_softmax", "log_softmax_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward", "gelu", "gelu_backward", "relu", "relu_backward",
    "bias_activation", "bias_activation_backward", "dropout", "dropout_backward", "add",
    "embedding", "embedding_backward", "cross_entropy", "cross_entropy_with_grad", "adamw_step", "sum_squares",
    "bias_grad", "attention", "attention_backward", "attention_weights", "feed_forward", "feed_forward_backward",
    "rms_norm", "rms_norm_backward", "silu", "silu_backward", "gated", "gated_backward", "rotary", "rotary_backward",
    "rotary_inv_freq", "alibi_slopes", "relative_position_bucket", "relative_position_bias",
    "relative_position_bias_backward",
]

_GELU_KINDS = {"none": "gelu", "tanh": "gelu_tanh"}


def _f32(x, name: str) -> np.ndarray:
    """x as a float32 C-contiguous array: no copy when it already is one."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. a tensor that needs .detach()
        raise TypeError(f"{name}: cannot read {type(x).__name__} as an array ({exc})") from exc
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (float32 preferred), got dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float32, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)


def _opt_f32(x, name: str) -> Optional[np.ndarray]:
    return None if x is None else _f32(x, name)


def _ids(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise IndexError(f"{name}: id {arr.max()} is out of range")  # would wrap to a negative int64
    return np.asarray(arr, dtype=np.int64, order="C")


def _int_arg(value, name: str, minimum: Optional[int] = 0) -> int:
    """An integer argument (Python or numpy int, not bool) >= minimum (None: any int64)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    low = -(2**63) if minimum is None else minimum
    if not low <= value < 2**63:
        raise ValueError(f"{name} must be an integer in [{low}, 2**63), got {value}")
    return int(value)


def _finite_scalar(value, name: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    return v


# ---------------------------------------------------------------------------------------------------------------
# matmul


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False, bias=None, alpha: float = 1.0):
    """``alpha * op(a) @ op(b) + bias``, where ``op(x)`` is ``x`` or its last-two-axes transpose.

    ``a`` and ``b`` are 2-D, or 3-D for a batch; a 2-D operand is broadcast over the other's batch (as
    ``np.matmul`` does on the op()-ed operands). ``bias`` (length N) is added to every row, fused into the GEMM.
    """
    return _core.matmul(_f32(a, "a"), _f32(b, "b"), bool(transpose_a), bool(transpose_b),
                        None if bias is None else _f32(bias, "bias"),
                        1.0 if alpha == 1.0 else _finite_scalar(alpha, "alpha"))


def gemm(a, b, out: np.ndarray, *, transpose_a: bool = False, transpose_b: bool = False, alpha: float = 1.0,
         beta: float = 0.0, bias=None) -> np.ndarray:
    """In place: ``out = alpha * op(a) @ op(b) + beta * out + bias``; ``beta=1`` accumulates (gradients).

    ``out`` must be a writable float32 C-contiguous array of the result's shape (it is never converted).
    """
    _core.gemm(_f32(a, "a"), _f32(b, "b"), out, bool(transpose_a), bool(transpose_b),
               _finite_scalar(alpha, "alpha"), _finite_scalar(beta, "beta"), _opt_f32(bias, "bias"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# softmax


def softmax(x) -> np.ndarray:
    """Softmax over the last axis (stable: the row max is subtracted). A row of all ``-inf`` gives zeros."""
    return _core.softmax(_f32(x, "x"))


def softmax_backward(grad_output, output) -> np.ndarray:
    """Gradient of softmax from its output ``y``: ``y * (dy - sum(y * dy))``."""
    return _core.softmax_backward(_f32(grad_output, "grad_output"), _f32(output, "output"))


def log_softmax(x) -> np.ndarray:
    """``x - logsumexp(x)`` over the last axis."""
    return _core.log_softmax(_f32(x, "x"))


def log_softmax_backward(grad_output, output) -> np.ndarray:
    """Gradient of log-softmax from its output: ``dy - exp(y) * sum(dy)``."""
    return _core.log_softmax_backward(_f32(grad_output, "grad_output"), _f32(output, "output"))


# ---------------------------------------------------------------------------------------------------------------
# layer norm


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """Layer normalization over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    return layer_norm_forward(x, weight, bias, eps)[0]


def layer_norm_forward(x, weight=None, bias=None, eps: float = 1e-5) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`layer_norm`, also returning ``mean`` and ``rstd`` (shape ``x.shape[:-1]``) for backward."""
    eps = _finite_scalar(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _core.layer_norm(_f32(x, "x"), _opt_f32(weight, "weight"), _opt_f32(bias, "bias"), eps)


def layer_norm_backward(grad_output, x, weight, mean, rstd, *, need_param_grads: bool = True):
    """Returns ``(dx, dweight, dbias)`` (the last two ``None`` when ``need_param_grads`` is false)."""
    return _core.layer_norm_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), _opt_f32(weight, "weight"),
                                     _f32(mean, "mean"), _f32(rstd, "rstd"), bool(need_param_grads))


# ---------------------------------------------------------------------------------------------------------------
# activations


def _gelu_kind(approximate: str) -> str:
    if approximate not in _GELU_KINDS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _GELU_KINDS[approximate]


def gelu(x, approximate: str = "none") -> np.ndarray:
    """GELU: ``x * Phi(x)`` (``approximate="none"``, erf form) or the tanh approximation (``"tanh"``)."""
    return _core.activation(_f32(x, "x"), None, _gelu_kind(approximate))


def gelu_backward(grad_output, x, approximate: str = "none") -> np.ndarray:
    """``grad_output * gelu'(x)`` with ``x`` the input given to :func:`gelu`."""
    return _core.activation_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), None,
                                     _gelu_kind(approximate), False)[0]


def relu(x) -> np.ndarray:
    """``max(x, 0)``."""
    return _core.activation(_f32(x, "x"), None, "relu")


def relu_backward(grad_output, x) -> np.ndarray:
    """``grad_output * (x > 0)``."""
    return _core.activation_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), None, "relu", False)[0]


def silu(x) -> np.ndarray:
    """SiLU (swish): ``x * sigmoid(x)``."""
    return _core.activation(_f32(x, "x"), None, "silu")


def silu_backward(grad_output, x) -> np.ndarray:
    """``grad_output * silu'(x)``, ``silu'(x) = s (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    return _core.activation_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), None, "silu", False)[0]


def _activation_kind(activation: str) -> str:
    kinds = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "silu": "silu", "swish": "silu",
             "identity": "identity"}
    if activation not in kinds:
        raise ValueError(f"activation must be one of {sorted(kinds)}, got {activation!r}")
    return kinds[activation]


def bias_activation(x, bias, activation: str = "gelu") -> np.ndarray:
    """``act(x + bias)`` in one pass (bias over the last axis); ``activation`` is relu, gelu, gelu_tanh, silu
    (alias swish) or identity."""
    return _core.activation(_f32(x, "x"), _opt_f32(bias, "bias"), _activation_kind(activation))


def bias_activation_backward(grad_output, x, bias, activation: str = "gelu"):
    """Returns ``(dx, dbias)`` for :func:`bias_activation`: ``dx = dy * act'(x + bias)``, ``dbias`` its column
    sums, in one pass."""
    return _core.activation_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), _opt_f32(bias, "bias"),
                                     _activation_kind(activation), bias is not None)


def gated(gate, up, activation: str = "silu") -> np.ndarray:
    """Gated linear unit ``act(gate) * up`` (SwiGLU with ``"silu"``, GeGLU with ``"gelu"``/``"gelu_tanh"``,
    ReGLU with ``"relu"``); ``gate`` and ``up`` have one shape."""
    return _core.gated(_f32(gate, "gate"), _f32(up, "up"), _activation_kind(activation))


def gated_backward(grad_output, gate, up, activation: str = "silu") -> Tuple[np.ndarray, np.ndarray]:
    """Returns ``(dgate, dup)`` for :func:`gated`: ``dgate = dy * up * act'(gate)``, ``dup = dy * act(gate)``."""
    return _core.gated_backward(_f32(grad_output, "grad_output"), _f32(gate, "gate"), _f32(up, "up"),
                                _activation_kind(activation))


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm


def _rms_eps(eps) -> float:
    if eps is None:  # torch.nn.RMSNorm: eps=None means torch.finfo(float32).eps
        return float(np.finfo(np.float32).eps)
    eps = _finite_scalar(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def rms_norm(x, weight=None, eps: Optional[float] = None, one_plus: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """RMSNorm over the last axis: ``y = x / sqrt(mean(x^2) + eps) * w`` with ``w = weight`` (or ``1 + weight``
    with ``one_plus``, Gemma's form; no scale when ``weight`` is None). ``eps=None`` is float32's machine epsilon,
    as ``torch.nn.RMSNorm``. Returns ``(y, rstd)``, ``rstd`` (shape ``x.shape[:-1]``) kept for backward."""
    return _core.rms_norm(_f32(x, "x"), _opt_f32(weight, "weight"), _rms_eps(eps), bool(one_plus))


def rms_norm_backward(grad_output, x, weight, rstd, one_plus: bool = False, *, need_weight_grad: bool = True):
    """Returns ``(dx, dweight)`` for :func:`rms_norm` (``dweight`` None when ``need_weight_grad`` is false or
    ``weight`` is None)."""
    return _core.rms_norm_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), _opt_f32(weight, "weight"),
                                   _f32(rstd, "rstd"), bool(one_plus), bool(need_weight_grad) and weight is not None)


# ---------------------------------------------------------------------------------------------------------------
# position information: rotary embeddings, ALiBi, T5 relative position bias

_SCALING_KEYS = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings"}


def _rope_scaling(scaling) -> Tuple[float, float, float, float, int]:
    """An HF-style ``rope_scaling`` dict as (linear_factor, llama3_factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings)."""
    none = (1.0, 0.0, 1.0, 4.0, 8192)
    if scaling is None:
        return none
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict like transformers' rope_scaling or None, got {type(scaling).__name__}")
    unknown = sorted(set(scaling) - _SCALING_KEYS)
    if unknown:
        raise ValueError(f"scaling: unsupported key(s) {unknown}; known: {sorted(_SCALING_KEYS)}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return none

    def need(key):
        if key not in scaling:
            raise ValueError(f"scaling: rope_type {kind!r} needs {key!r}")
        v = _finite_scalar(scaling[key], f"scaling[{key!r}]")
        if v <= 0:
            raise ValueError(f"scaling[{key!r}] must be > 0, got {v}")
        return v

    if kind == "linear":
        return (need("factor"), 0.0, 1.0, 4.0, 8192)
    if kind == "llama3":
        orig = scaling.get("original_max_position_embeddings")
        if orig is None:
            raise ValueError("scaling: rope_type 'llama3' needs 'original_max_position_embeddings'")
        orig = _int_arg(orig, "scaling['original_max_position_embeddings']", 1)
        low, high = need("low_freq_factor"), need("high_freq_factor")
        if not high > low:
            raise ValueError(f"scaling: high_freq_factor ({high}) must exceed low_freq_factor ({low})")
        return (1.0, need("factor"), low, high, orig)
    raise ValueError(f"scaling: rope_type must be 'default', 'linear' or 'llama3', got {kind!r}")


def _rotary_dim(rotary_dim, head_dim: int) -> int:
    if rotary_dim is None:
        return 0
    rotary_dim = _int_arg(rotary_dim, "rotary_dim", 2)
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and <= head_dim ({head_dim}), got {rotary_dim}")
    return rotary_dim


def _layout(layout: str) -> str:
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' (NeoX/Llama) or 'interleaved' (GPT-J), got {layout!r}")
    return layout


def rotary_inv_freq(head_dim: int, rotary_dim: Optional[int] = None, theta: float = 10000.0,
                    scaling=None) -> np.ndarray:
    """The ``rotary_dim // 2`` inverse frequencies (float32), as transformers' rope init functions compute them."""
    head_dim = _int_arg(head_dim, "head_dim", 2)
    return _core.rotary_inv_freq(head_dim, _rotary_dim(rotary_dim, head_dim), _finite_scalar(theta, "theta"),
                                 *_rope_scaling(scaling))


def _rotary(x, num_heads, positions, offset, rotary_dim, layout, theta, scaling, backward: bool):
    name = "grad_output" if backward else "x"
    x = _f32(x, name)
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} must be (B, T, heads * head_dim) or (B, T, heads, head_dim), got shape {x.shape}")
    B, T = x.shape[:2]
    if x.ndim == 4:
        if num_heads is None:
            num_heads = x.shape[2]
        num_heads = _int_arg(num_heads, "num_heads", 1)
        head_dim = x.shape[3]
    else:
        num_heads = _heads(num_heads, x.shape[2])
        head_dim = x.shape[2] // num_heads
    pos = off = None
    if positions is not None:
        if offset is not None:
            raise ValueError("give positions or offset, not both")
        pos = _ids(positions, "positions")
        if pos.ndim == 1:
            pos = pos[None]
        if pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
            raise ValueError(f"positions must have shape ({B}, {T}), (1, {T}) or ({T},), got {np.shape(positions)}")
        pos = np.ascontiguousarray(np.broadcast_to(pos, (B, T)))
    elif offset is not None:
        off = _ids(offset, "offset")
        if off.ndim == 0:
            off = np.full(B, int(off), np.int64)
        if off.shape != (B,):
            raise ValueError(f"offset must be an int or have shape ({B},), got {np.shape(offset)}")
    return _core.rotary(x, num_heads, pos, off, _rotary_dim(rotary_dim, head_dim), _layout(layout),
                        _finite_scalar(theta, "theta"), *_rope_scaling(scaling), backward=backward)


def rotary(x, num_heads: Optional[int], positions=None, offset=None, rotary_dim: Optional[int] = None,
           layout: str = "half", theta: float = 10000.0, scaling=None) -> np.ndarray:
    """Rotary position embedding (RoPE) of every head's first ``rotary_dim`` features (default: all), returned as a
    new array; features past ``rotary_dim`` pass through.

    ``x``: (B, T, num_heads * head_dim) or (B, T, num_heads, head_dim). Row (b, t) sits at ``positions[b, t]``
    (positions (B, T), (1, T) or (T,)), else at ``offset[b] + t`` (``offset`` an int or (B,)), else at t.
    ``layout="half"`` pairs features (i, i + rotary_dim/2) as transformers' Llama/NeoX ``rotate_half``;
    ``"interleaved"`` pairs (2i, 2i + 1) as GPT-J. ``scaling``: None or a transformers ``rope_scaling`` dict
    with ``rope_type`` "default", "linear" (``factor``) or "llama3" (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``)."""
    return _rotary(x, num_heads, positions, offset, rotary_dim, layout, theta, scaling, False)


def rotary_backward(grad_output, num_heads: Optional[int], positions=None, offset=None,
                    rotary_dim: Optional[int] = None, layout: str = "half", theta: float = 10000.0,
                    scaling=None) -> np.ndarray:
    """Gradient of :func:`rotary` (the same arguments): ``grad_output`` rotated by the opposite angles."""
    return _rotary(grad_output, num_heads, positions, offset, rotary_dim, layout, theta, scaling, True)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes (float32, one per head) as BLOOM's ``build_alibi_tensor`` (and MPT) compute them."""
    return _core.alibi_slopes(_int_arg(num_heads, "num_heads", 1))


def _bias_args(bidirectional, num_buckets, max_distance):
    return (bool(bidirectional), _int_arg(num_buckets, "num_buckets", 1), _int_arg(max_distance, "max_distance", 1))


def relative_position_bucket(relative_positions, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """T5's bucket of each relative position (key - query), exactly as transformers'
    ``T5Attention._relative_position_bucket``; int64, the input's shape."""
    rel = _ids(relative_positions, "relative_positions")
    if rel.size == 0:
        raise ValueError(f"relative_positions has a zero-size dimension: shape {rel.shape}")
    return _core.relative_position_bucket(rel, *_bias_args(bidirectional, num_buckets, max_distance))


def relative_position_bias(table, T: int, S: int, query_offset: int = 0, bidirectional: bool = True,
                           num_buckets: Optional[int] = None, max_distance: int = 128) -> np.ndarray:
    """T5's position bias (num_heads, T, S): ``table[bucket(s - (query_offset + t)), h]``, with ``table``
    (num_buckets, num_heads) laid out as transformers' ``relative_attention_bias.weight``. ``num_buckets``
    defaults to ``table.shape[0]``."""
    table = _f32(table, "table")
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (num_buckets, num_heads), got shape {table.shape}")
    nb = table.shape[0] if num_buckets is None else num_buckets
    return _core.relative_position_bias(table, _int_arg(T, "T", 1), _int_arg(S, "S", 1),
                                        _int_arg(query_offset, "query_offset", None),
                                        *_bias_args(bidirectional, nb, max_distance))


def relative_position_bias_backward(grad_output, table_grad: np.ndarray, query_offset: int = 0,
                                    bidirectional: bool = True, num_buckets: Optional[int] = None,
                                    max_distance: int = 128) -> np.ndarray:
    """Accumulate the gradient of :func:`relative_position_bias` into ``table_grad`` (a writable float32
    (num_buckets, num_heads) array) from ``grad_output`` (num_heads, T, S); deterministic. Returns it."""
    if not isinstance(table_grad, np.ndarray) or table_grad.ndim != 2:
        raise ValueError("table_grad must be a 2-D float32 numpy array (num_buckets, num_heads)")
    nb = table_grad.shape[0] if num_buckets is None else num_buckets
    _core.relative_position_bias_backward(_f32(grad_output, "grad_output"), table_grad,
                                          _int_arg(query_offset, "query_offset", None),
                                          *_bias_args(bidirectional, nb, max_distance))
    return table_grad


# ---------------------------------------------------------------------------------------------------------------
# dropout, residual


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def _check_p(p, name: str = "p") -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def dropout(x, p: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Inverted dropout: returns ``(y, keep_mask)`` with ``y = x * keep / (1 - p)``. The mask is a pure function
    of ``(seed, element index)``: the same seed gives the same mask whatever the thread count."""
    return _core.dropout(_f32(x, "x"), _check_p(p), _seed(seed))


def dropout_backward(grad_output, p: float, seed: int) -> np.ndarray:
    """Gradient of :func:`dropout` with the same ``p`` and ``seed`` (the mask is regenerated, not stored)."""
    return _core.dropout_backward(_f32(grad_output, "grad_output"), _check_p(p), _seed(seed))


def add(a, b) -> np.ndarray:
    """Residual add ``a + b`` (same shapes)."""
    return _core.add(_f32(a, "a"), _f32(b, "b"))


# ---------------------------------------------------------------------------------------------------------------
# embedding


def embedding(ids, weight) -> np.ndarray:
    """``weight[ids]``: ids of any shape, result ``ids.shape + (C,)``. Ids outside ``[0, V)`` raise IndexError."""
    return _core.embedding(_ids(ids, "ids"), _f32(weight, "weight"))


def embedding_backward(grad_output, ids, weight_grad: np.ndarray, *, padding_idx: Optional[int] = None) -> np.ndarray:
    """Accumulate ``weight_grad[ids[t]] += grad_output[t]`` in place (deterministic, thread-safe); positions whose
    id is ``padding_idx`` get none. ``weight_grad`` must be a writable float32 (V, C) array. Returns it."""
    _core.embedding_backward(weight_grad, _f32(grad_output, "grad_output"), _ids(ids, "ids"),
                             -1 if padding_idx is None else _int_arg(padding_idx, "padding_idx", None))
    return weight_grad


# ---------------------------------------------------------------------------------------------------------------
# loss


def _ce_args(logits, targets):
    logits = _f32(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, classes), got shape {logits.shape}")
    return logits, _ids(targets, "targets")


def _check_loss(loss: float) -> float:
    if not np.isfinite(loss):
        raise ValueError(f"cross_entropy: the loss is not finite ({loss}); logits contain inf or NaN")
    return loss


def cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0) -> float:
    """Mean cross-entropy of ``logits`` (N, V) against integer ``targets`` (N,), as ``torch.nn.functional
    .cross_entropy``: targets equal to ``ignore_index`` are left out of the mean; ``label_smoothing`` mixes the
    one-hot target with the uniform distribution. Non-finite logits raise ValueError."""
    logits, targets = _ce_args(logits, targets)
    loss, _, _ = _core.cross_entropy(logits, targets, _int_arg(ignore_index, "ignore_index", None), float(label_smoothing), False, 1.0, False)
    return _check_loss(loss)


def cross_entropy_with_grad(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0, *,
                            grad_scale: float = 1.0, inplace: bool = False) -> Tuple[float, np.ndarray]:
    """Fused forward + backward: ``(mean loss, d loss / d logits * grad_scale)``. With ``inplace=True`` the
    gradient overwrites ``logits`` (which must then be a float32 C-contiguous array), saving an (N, V) buffer."""
    logits, targets = _ce_args(logits, targets)
    loss, grad, _ = _core.cross_entropy(logits, targets, _int_arg(ignore_index, "ignore_index", None), float(label_smoothing), True,
                                        _finite_scalar(grad_scale, "grad_scale"), bool(inplace))
    return _check_loss(loss), grad


# ---------------------------------------------------------------------------------------------------------------
# optimizer


def adamw_step(param: np.ndarray, grad, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, *, lr: float, step: int,
               beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
               grad_scale: float = 1.0) -> None:
    """One AdamW update (as ``torch.optim.AdamW``), in place on ``param``, ``exp_avg``, ``exp_avg_sq`` (writable
    float32 arrays of one shape); ``grad * grad_scale`` is the gradient used. ``step`` counts from 1."""
    step = _int_arg(step, "step", 1)
    _core.adamw_step(param, _f32(grad, "grad"), exp_avg, exp_avg_sq, _finite_scalar(lr, "lr"), float(beta1),
                     float(beta2), float(eps), _finite_scalar(weight_decay, "weight_decay"), step,
                     _finite_scalar(grad_scale, "grad_scale"))


def sum_squares(x) -> float:
    """Sum of squares accumulated in float64 (for the global gradient norm)."""
    return _core.sum_squares(_f32(x, "x"))


def bias_grad(grad_output, out: np.ndarray) -> np.ndarray:
    """Accumulate ``out += grad_output.sum(all leading axes)`` (the gradient of a bias), deterministically."""
    _core.bias_grad(out, _f32(grad_output, "grad_output"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# attention


def _rows_f32(x, name: str) -> np.ndarray:
    """Like _f32 but keeps strided views whose last axis is contiguous (the q/k/v thirds of a fused projection)."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 3 and x.strides[-1] == 4 \
            and min(x.strides) >= 0:
        return x
    return _f32(x, name)


def _check_additive(mask: np.ndarray, name: str) -> None:
    """An additive mask holds finite values or -inf: NaN or +inf would turn whole output rows into NaN."""
    if np.isnan(mask).any() or np.isposinf(mask).any():
        raise ValueError(f"{name} contains NaN or +inf (an additive mask holds finite values or -inf)")


def attention_masks(attn_mask, key_padding_mask, batch: int, num_heads: int, tgt_len: int, src_len: int):
    """Normalise PyTorch-style masks for the kernels: returns ``(additive float32 mask or None, uint8 key padding
    or None)``. ``attn_mask``: boolean (True = not allowed) or additive float, shape (T, S), (B, T, S),
    (B*num_heads, T, S) or (B or 1, num_heads or 1, T, S). ``key_padding_mask``: (B, S), boolean/integer
    (True = padding) or additive float."""
    additive = None
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == np.bool_:
            additive = np.where(m, np.float32(-np.inf), np.float32(0.0))
        elif m.dtype.kind in "fiu":
            additive = np.ascontiguousarray(m, dtype=np.float32)
        else:
            raise TypeError(f"attn_mask must be boolean or float, got dtype {m.dtype}")
        _check_additive(additive, "attn_mask")
    padding = None
    if key_padding_mask is not None:
        kp = np.asarray(key_padding_mask)
        if kp.shape != (batch, src_len):
            raise ValueError(f"key_padding_mask must have shape ({batch}, {src_len}), got {kp.shape}")
        if kp.dtype == np.bool_ or kp.dtype.kind in "iu":
            padding = np.ascontiguousarray(kp != 0, dtype=np.uint8)
        elif kp.dtype.kind == "f":  # additive per key: fold into a (B, T, S) additive mask
            _check_additive(kp, "key_padding_mask")
            extra = np.broadcast_to(kp.astype(np.float32)[:, None, :], (batch, tgt_len, src_len))
            if additive is None:
                additive = np.ascontiguousarray(extra)
            elif additive.ndim == 4:  # (B or 1, H or 1, T, S) + per-key values: (B, H or 1, T, S)
                additive = np.ascontiguousarray(additive + extra[:, None], dtype=np.float32)
            elif additive.ndim == 3 and additive.shape[0] == batch * num_heads and num_heads > 1:
                additive = (additive.reshape(batch, num_heads, tgt_len, src_len) + extra[:, None]).reshape(
                    batch * num_heads, tgt_len, src_len)
            else:
                additive = np.ascontiguousarray(additive + extra, dtype=np.float32)
        else:
            raise TypeError(f"key_padding_mask must be boolean or float, got dtype {kp.dtype}")
    return additive, padding


def _heads(num_heads, embed: int) -> int:
    """num_heads as an int >= 1 that divides the embedding size (checked before anything divides by it)."""
    num_heads = _int_arg(num_heads, "num_heads", 1)
    if embed % num_heads:
        raise ValueError(f"embed size {embed} is not divisible by num_heads {num_heads}")
    return num_heads


def _scale(scale, embed: int, num_heads: int) -> float:
    return 1.0 / math.sqrt(embed // num_heads) if scale is None else _finite_scalar(scale, "scale")


def _kv_heads(num_kv_heads, num_heads: int) -> int:
    if num_kv_heads is None:
        return num_heads
    num_kv_heads = _int_arg(num_kv_heads, "num_kv_heads", 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    return num_kv_heads


def _positions(batch: int, num_heads: int, window, query_offset, key_length, alibi_slopes) -> dict:
    """The positional keyword arguments of the _core attention functions: window (int >= 0), query_offset and
    key_length (an int or a (B,) integer array, as int64 (B,)), alibi_slopes ((num_heads,) float32)."""
    out = {"window": _int_arg(window, "window", 0)}
    for name, value in (("query_offset", query_offset), ("key_length", key_length)):
        if value is None:
            continue
        arr = _ids(value, name)
        if arr.ndim == 0:
            arr = np.full(batch, arr, np.int64)
        if arr.shape != (batch,):
            raise ValueError(f"{name} must be an int or have shape ({batch},), got {arr.shape}")
        out[name] = arr
    if alibi_slopes is not None:
        slopes = _f32(alibi_slopes, "alibi_slopes")
        if slopes.shape != (num_heads,):
            raise ValueError(f"alibi_slopes must have shape ({num_heads},), got {slopes.shape}")
        if not np.isfinite(slopes).all():
            raise ValueError("alibi_slopes must be finite")
        out["alibi_slopes"] = slopes
    return out


_ATTENTION_DOC = """
    ``query`` (B, T, num_heads * head_dim), ``key`` and ``value`` (B, S, num_kv_heads * head_dim). Masks follow
    PyTorch: ``attn_mask`` boolean (True = not allowed) or additive float, (T, S), (B, T, S), (B*num_heads, T, S) or
    (B or 1, num_heads or 1, T, S); ``key_padding_mask`` (B, S), True = padding; ``is_causal`` lets query t see keys
    s <= pos(t). ``num_kv_heads`` (grouped-query / multi-query attention): query head h reads key/value head
    h // (num_heads // num_kv_heads); None = num_heads. ``window`` > 0: a sliding window, query at pos p sees keys
    s > p - window (with ``is_causal``: p - window < s <= p). ``query_offset`` (int or (B,)): query t of batch b is
    at position pos(t) = query_offset[b] + t (decoding over a cache; default t). ``key_length`` (int or (B,)): keys
    s >= key_length[b] are invisible and never read. ``alibi_slopes`` (num_heads,): score += slope[h] * (s - pos(t)).
    A query whose keys are all masked gets zeros."""


def attention(query, key, value, num_heads: int = 1, *, attn_mask=None, key_padding_mask=None,
              is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0, seed: int = 0,
              need_lse: bool = False, num_kv_heads: Optional[int] = None, window: int = 0, query_offset=None,
              key_length=None, alibi_slopes=None):
    """Fused multi-head scaled dot-product attention, ``softmax(q k^T * scale + mask) v`` per head; ``scale``
    defaults to 1/sqrt(head_dim). The (T, S) score matrix is never built. Returns ``(output (B, T, E),
    lse (B, num_heads, T) or None)``; keep ``lse`` for :func:`attention_backward`.
    """
    q, k, v = _rows_f32(query, "query"), _rows_f32(key, "key"), _rows_f32(value, "value")
    if q.ndim != 3:
        raise ValueError(f"query must be 3-D (batch, length, embed), got shape {q.shape}")
    if k.ndim != 3:
        raise ValueError(f"key must be 3-D (batch, length, embed), got shape {k.shape}")
    num_heads = _heads(num_heads, q.shape[2])
    kvh = _kv_heads(num_kv_heads, num_heads)
    pos = _positions(q.shape[0], num_heads, window, query_offset, key_length, alibi_slopes)
    additive, padding = attention_masks(attn_mask, key_padding_mask, q.shape[0], num_heads, q.shape[1], k.shape[1])
    return _core.attention(q, k, v, num_heads, additive, padding, bool(is_causal), _scale(scale, q.shape[2], num_heads),
                           _check_p(dropout_p, "dropout_p"), _seed(seed), bool(need_lse), num_kv_heads=kvh, **pos)


def _sum_to(x: np.ndarray, shape) -> np.ndarray:
    """x summed over the axes that broadcasting ``shape`` up to x.shape added or stretched."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_backward(grad_output, query, key, value, output, lse, num_heads: int = 1, *, attn_mask=None,
                       key_padding_mask=None, is_causal: bool = False, scale: Optional[float] = None,
                       dropout_p: float = 0.0, seed: int = 0, grad_query=None, grad_key=None, grad_value=None,
                       num_kv_heads: Optional[int] = None, window: int = 0, query_offset=None, key_length=None,
                       alibi_slopes=None, grad_attn_mask=None):
    """Gradients of :func:`attention` with respect to query, key and value, recomputed tile by tile from ``lse``.
    Pass ``grad_query``/``grad_key``/``grad_value`` (writable float32 arrays or views with a contiguous last axis)
    to have them written in place, e.g. into the thirds of a fused (B, T, 3E) buffer. ``grad_attn_mask``: a
    writable float32 C-contiguous array with ``attn_mask``'s shape into which the gradient with respect to the
    (additive) ``attn_mask`` is ACCUMULATED (summed over the axes the mask broadcasts over; deterministic).
    Returns ``(dq, dk, dv)``."""
    q, k, v = _rows_f32(query, "query"), _rows_f32(key, "key"), _rows_f32(value, "value")
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError("query and key must be 3-D (batch, length, embed)")
    dq = np.empty(q.shape, np.float32) if grad_query is None else grad_query
    dk = np.empty(k.shape, np.float32) if grad_key is None else grad_key
    dv = np.empty(v.shape, np.float32) if grad_value is None else grad_value
    num_heads = _heads(num_heads, q.shape[2])
    kvh = _kv_heads(num_kv_heads, num_heads)
    pos = _positions(q.shape[0], num_heads, window, query_offset, key_length, alibi_slopes)
    additive, padding = attention_masks(attn_mask, key_padding_mask, q.shape[0], num_heads, q.shape[1], k.shape[1])
    dmask, fold = grad_attn_mask, None
    if grad_attn_mask is not None:
        if attn_mask is None:
            raise ValueError("grad_attn_mask needs attn_mask (it is the gradient with respect to it)")
        if not isinstance(grad_attn_mask, np.ndarray):
            raise TypeError(f"grad_attn_mask must be a numpy float32 array, got {type(grad_attn_mask).__name__}")
        if grad_attn_mask.shape != np.shape(attn_mask):
            raise ValueError(f"grad_attn_mask must have attn_mask's shape {np.shape(attn_mask)}, "
                             f"got {grad_attn_mask.shape}")
        if additive.shape != grad_attn_mask.shape:  # a float key_padding_mask was folded into the mask
            dmask, fold = np.zeros(additive.shape, np.float32), grad_attn_mask
    _core.attention_backward(_rows_f32(grad_output, "grad_output"), q, k, v, _rows_f32(output, "output"),
                             _f32(lse, "lse"), dq, dk, dv, num_heads, additive, padding, bool(is_causal),
                             _scale(scale, q.shape[2], num_heads), _check_p(dropout_p, "dropout_p"), _seed(seed),
                             num_kv_heads=kvh, grad_attn_mask=dmask, **pos)
    if fold is not None:
        fold += _sum_to(dmask, fold.shape)
    return dq, dk, dv


def attention_weights(query, key, num_heads: int = 1, *, attn_mask=None, key_padding_mask=None,
                      is_causal: bool = False, scale: Optional[float] = None, num_kv_heads: Optional[int] = None,
                      window: int = 0, query_offset=None, key_length=None, alibi_slopes=None) -> np.ndarray:
    """The attention probabilities, (B, num_heads, T, S), for inspection and plots (this materialises them)."""
    q, k = _rows_f32(query, "query"), _rows_f32(key, "key")
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError("query and key must be 3-D (batch, length, embed)")
    num_heads = _heads(num_heads, q.shape[2])
    kvh = _kv_heads(num_kv_heads, num_heads)
    pos = _positions(q.shape[0], num_heads, window, query_offset, key_length, alibi_slopes)
    additive, padding = attention_masks(attn_mask, key_padding_mask, q.shape[0], num_heads, q.shape[1], k.shape[1])
    return _core.attention_weights(q, k, num_heads, additive, padding, bool(is_causal),
                                   _scale(scale, q.shape[2], num_heads), num_kv_heads=kvh, **pos)


for _f in (attention, attention_backward, attention_weights):
    _f.__doc__ += _ATTENTION_DOC
del _f


# ---------------------------------------------------------------------------------------------------------------
# feed-forward


def feed_forward(x, w1, b1, w2, b2, activation: str = "relu", *, dropout_p: float = 0.0, seed: int = 0,
                 u_out: Optional[np.ndarray] = None, a_out: Optional[np.ndarray] = None, w_gate=None, b_gate=None):
    """``dropout(act(x @ w1.T + b1)) @ w2.T + b2`` over the last axis of ``x``; weights in PyTorch's Linear layout
    (``w1`` (F, C), ``w2`` (C, F)). With ``w_gate`` (F, C) (and ``b_gate``) the gated form (SwiGLU / GeGLU):
    ``dropout(act(x @ w_gate.T + b_gate) * (x @ w1.T + b1)) @ w2.T + b2``. Returns ``(out, u, a)``; ``u``
    (pre-activations, (rows, F) or gated (rows, 2F) = [gate | up]) and ``a`` are kept for
    :func:`feed_forward_backward`. ``u_out`` / ``a_out``: float32 buffers to write them into (a layer reuses its
    own across steps; fresh multi-megabyte arrays cost page faults every call)."""
    return _core.feedforward(_f32(x, "x"), _f32(w1, "w1"), _opt_f32(b1, "b1"), _f32(w2, "w2"), _opt_f32(b2, "b2"),
                             _activation_kind(activation), _check_p(dropout_p, "dropout_p"), _seed(seed),
                             u_out, a_out, None if w_gate is None else _f32(w_gate, "w_gate"),
                             _opt_f32(b_gate, "b_gate"))


def feed_forward_backward(grad_output, x, u, a, w1, w2, grad_w1, grad_b1, grad_w2, grad_b2,
                          activation: str = "relu", *, dropout_p: float = 0.0, seed: int = 0,
                          workspace: Optional[np.ndarray] = None, w_gate=None, grad_w_gate=None,
                          grad_b_gate=None) -> np.ndarray:
    """Returns dx; accumulates into ``grad_w1``, ``grad_b1``, ``grad_w2``, ``grad_b2`` (and, gated,
    ``grad_w_gate``, ``grad_b_gate``) (writable float32 arrays; the bias gradients may be None). ``workspace``: a
    (rows, F) ((rows, 3F) gated) float32 scratch buffer to reuse across calls."""
    return _core.feedforward_backward(_f32(grad_output, "grad_output"), _f32(x, "x"), u, a, _f32(w1, "w1"),
                                      _f32(w2, "w2"), grad_w1, grad_b1, grad_w2, grad_b2,
                                      _activation_kind(activation), _check_p(dropout_p, "dropout_p"), _seed(seed),
                                      workspace, None if w_gate is None else _f32(w_gate, "w_gate"), grad_w_gate,
                                      grad_b_gate)
