"""The Transformer block of the C++ core (``cpp/include/cpuformer/block.h``) as layers: one C++ call per forward
and one per backward.

:class:`BlockLayer` is the machinery every block-shaped layer shares (``TransformerEncoderLayer``,
``TransformerDecoderLayer`` and :class:`TransformerBlock`): a subclass says how its parameters map onto the block's
parts (``_block_parts``) and which configuration it has (``_block_config``); forward, backward, inference and
incremental decoding are the same code for all. Eval-mode forwards keep nothing on the layer (thread-safe); a
training forward keeps the block's saved state for ``backward``.

:class:`TransformerBlock` is the configurable modern block (RMSNorm, rotary / ALiBi / relative positions,
grouped-query attention, gated feed-forward, q/k norms, sliding window) with Hugging Face's Llama names:
``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .. import _core, ops
from . import init, quantized
from .layers import LayerNorm, Linear, RMSNorm, activation_name
from .module import Module, Parameter, check_grad_shape, is_grad_enabled, thread_state

__all__ = ["BlockLayer", "TransformerBlock", "KVCache"]

KVCache = _core.KVCache


def _prepared_key(prepared) -> str:
    return "int8" if isinstance(prepared, _core.Int8Weight) else "packed"


def linear_entries(weights: dict, grads: Optional[dict], part: str, linear: Linear) -> None:
    """A :class:`Linear` as the block part ``part`` (weight, bias, its prepared form; gradients)."""
    weights[part + ".weight"] = linear.weight.data
    if linear.bias is not None:
        weights[part + ".bias"] = linear.bias.data
    if linear._frozen is not None:
        weights[f"{part}.{_prepared_key(linear._frozen)}"] = linear._frozen
    if grads is not None:
        grads[part + ".weight"] = linear.weight.grad
        if linear.bias is not None:
            grads[part + ".bias"] = linear.bias.grad


def norm_entries(weights: dict, grads: Optional[dict], part: str, norm: Module) -> None:
    """A LayerNorm or RMSNorm as the block's norm ``part``."""
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if p is not None:
            weights[f"{part}.{name}"] = p.data
            if grads is not None:
                grads[f"{part}.{name}"] = p.grad


def _mask(attn_mask, key_padding_mask, B: int, H: int, T: int, S: int):
    return ops.attention_masks(attn_mask, key_padding_mask, B, H, T, S)


class BlockLayer(Module):
    """Base of the layers that run as one C++ Transformer block. Subclasses implement ``_block_config()`` (keyword
    arguments of ``_core.BlockConfig``, built once) and ``_block_parts(weights, grads)`` (fills the dicts)."""

    def _block_config(self) -> dict:
        raise NotImplementedError

    def _block_parts(self, weights: dict, grads: Optional[dict]) -> None:
        raise NotImplementedError

    @property
    def block_config(self):
        cfg = self.__dict__.get("_config_obj")
        if cfg is None:
            cfg = _core.BlockConfig(**self._block_config())
            object.__setattr__(self, "_config_obj", cfg)
        return cfg

    def _weights(self) -> dict:
        weights: Dict[str, object] = {}
        self._block_parts(weights, None)
        return weights

    def _weights_and_grads(self) -> Tuple[dict, dict]:
        weights: Dict[str, object] = {}
        grads: Dict[str, object] = {}
        self._block_parts(weights, grads)
        return weights, grads

    def _dropout_active(self) -> bool:
        kw = self._block_config()
        return any(kw.get(k, 0.0) > 0.0 for k in ("dropout", "ff_dropout", "attention_dropout"))

    def _run(self, x, *, attn_mask=None, key_padding_mask=None, is_causal=False, position_offset=None,
             memory=None, memory_mask=None, memory_key_padding_mask=None, need_weights=False, keep=True):
        """One forward through the C++ block, keeping what backward needs unless ``keep`` is false (eval mode
        only) or the weights are prepared for inference. Returns ``out`` or ``(out, self-attention probabilities (B, H, T, T))``."""
        cfg = self.block_config
        x = ops._f32(x, "x")
        if x.ndim != 3 or x.shape[2] != cfg.d_model:
            raise ValueError(f"{type(self).__name__}: input must be (batch, length, {cfg.d_model}), got shape "
                             f"{x.shape}")
        B, T = x.shape[:2]
        additive, padding = _mask(attn_mask, key_padding_mask, B, cfg.num_heads, T, T)
        kw = dict(key_padding_mask=padding, attn_mask=additive, is_causal=bool(is_causal),
                  need_weights=bool(need_weights))
        if position_offset is not None:
            kw["position_offset"] = ops._ids(position_offset, "position_offset").reshape(-1)
        if cfg.cross_attention:
            memory = ops._f32(memory, "memory")
            if memory.ndim != 3:
                raise ValueError(f"memory must be (batch, length, d_model), got shape {memory.shape}")
            madd, mpad = _mask(memory_mask, memory_key_padding_mask, B, cfg.num_heads, T, memory.shape[1])
            kw.update(memory=memory, memory_key_padding_mask=mpad, memory_mask=madd)
        weights = self._weights()
        prepared = any(k.endswith((".packed", ".int8")) for k in weights)
        if prepared:  # frozen / int8: inference only
            quantized.require_inference(self)
        if prepared or not (self.training or (keep and is_grad_enabled())):  # nothing kept
            if keep and not self.training:  # under no_grad: a backward now would be one without its forward
                thread_state(self).saved = None
            return _core.block_forward(cfg, weights, x, **kw)
        # A float model keeps what backward needs, in training and in eval mode alike (as PyTorch's autograd
        # does outside no_grad): per thread, so eval-mode forwards from many threads never share a buffer.
        local = thread_state(self)
        if getattr(local, "saved", None) is None:
            local.saved = _core.BlockSaved()
        local.shape = x.shape
        if self.training:
            seed = init.next_seed() if self._dropout_active() else 0
            return _core.block_forward_train(cfg, weights, x, seed, local.saved, **kw)
        return _core.block_forward_train(self.eval_block_config, weights, x, 0, local.saved, **kw)

    @property
    def eval_block_config(self):
        """The configuration without dropout (eval mode)."""
        cfg = self.__dict__.get("_eval_config_obj")
        if cfg is None:
            kw = dict(self._block_config(), dropout=0.0, ff_dropout=0.0, attention_dropout=0.0)
            cfg = _core.BlockConfig(**kw)
            object.__setattr__(self, "_eval_config_obj", cfg)
        return cfg

    def inference(self, x, **kwargs):
        """The forward without keeping anything for backward (generation, pipelines): same results as an
        eval-mode call."""
        return self._run(x, keep=False, **kwargs)

    def _run_backward(self, grad_output):
        """``(d_x, d_memory or None)``; parameter gradients accumulated."""
        local = thread_state(self)
        saved = getattr(local, "saved", None)
        if saved is None or not saved.valid:
            if quantized.is_frozen(self):
                quantized.no_backward(self)
            raise RuntimeError(f"{type(self).__name__}.backward called before forward (or after an eval-mode "
                               "forward under cpuformer.no_grad(), which keeps nothing for it)")
        g = ops._f32(grad_output, "grad_output")
        check_grad_shape(g, local.shape, type(self).__name__)
        weights, grads = self._weights_and_grads()
        cfg = self.block_config if self.training else self.eval_block_config
        return _core.block_backward(cfg, weights, grads, g, saved)

    # -- incremental decoding -------------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty key/value cache for ``batch`` rows of up to ``capacity`` positions."""
        cfg = self.block_config
        return KVCache(int(batch), int(capacity), cfg.num_kv_heads * cfg.head_dim)

    def cross_cache(self, memory) -> KVCache:
        """The cross-attention keys and values of an encoder output, computed once for every decode step."""
        return _core.block_cross_cache(self.block_config, self._weights(), ops._f32(memory, "memory"))

    def decode(self, x, cache: KVCache, new_tokens=None, cross: Optional[KVCache] = None,
               memory_key_padding_mask=None, output_rows=None) -> np.ndarray:
        """The next positions ``x`` (B, T, d_model) of each row, attending over and appended to ``cache``
        (``new_tokens`` (B,): how many of the T are real per row). ``output_rows`` (B,): only that new position's
        output per row is computed past the keys and values (a prompt's last token in a stack's last block), and
        the result is (B, 1, d_model). Inference only."""
        if self.training:
            raise RuntimeError(f"{type(self).__name__}.decode runs in eval mode: call .eval() first")
        mpad = None
        if memory_key_padding_mask is not None:
            mpad = np.ascontiguousarray(np.asarray(memory_key_padding_mask) != 0, dtype=np.uint8)
        nt = None if new_tokens is None else ops._ids(new_tokens, "new_tokens").reshape(-1)
        rows = None if output_rows is None else ops._ids(output_rows, "output_rows").reshape(-1)
        return _core.block_decode(self.block_config, self._weights(), ops._f32(x, "x"), cache, nt, cross, mpad, rows)


class _Parts(Module):
    """A named group of parameters inside a block (``self_attn``, ``mlp``); the block runs them."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is part of a TransformerBlock and is run by it")


class TransformerBlock(BlockLayer):
    """A configurable pre- or post-norm Transformer block (decoder-only and encoder models alike).

    Names follow Hugging Face's Llama (``self_attn.q_proj`` ... ``o_proj``, ``self_attn.q_norm``/``k_norm``,
    ``mlp.gate_proj``/``up_proj``/``down_proj``, ``input_layernorm``, ``post_attention_layernorm``), and
    ``self_attn.relative_attention_bias.weight`` (num_buckets, num_heads) for a T5-style relative bias.

    Options: ``num_kv_heads`` (grouped-query; default ``num_heads``), ``head_dim``, ``norm`` ("layer_norm" or
    "rms_norm"), ``norm_one_plus`` (Gemma's 1 + w), ``norm_first``, ``activation`` ("gelu", "gelu_tanh", "relu",
    "silu"), ``gated`` (SwiGLU/GeGLU), ``attention_bias``/``mlp_bias``/``norm_bias``, ``position`` ("none",
    "rotary", "alibi", "relative") with ``rope_theta``, ``rotary_dim``, ``rotary_layout`` ("half"/"interleaved"),
    ``rope_scaling`` (Hugging Face's dict: "linear", "llama3"), ``relative_num_buckets``,
    ``relative_max_distance``, ``relative_bidirectional``; ``qk_norm``, ``sliding_window``, ``attention_scale``
    (None: 1/sqrt(head_dim)), ``dropout``.

    ``forward(x, attn_mask=None, key_padding_mask=None, is_causal=False, position_offset=None)``;
    ``backward(grad) -> d_x``.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, norm: str = "rms_norm", norm_eps: float = 1e-6,
                 norm_one_plus: bool = False, norm_first: bool = True, activation: str = "silu", gated: bool = True,
                 attention_bias: bool = False, mlp_bias: bool = False, norm_bias: bool = False,
                 position: str = "rotary", rope_theta: float = 10000.0, rotary_dim: Optional[int] = None,
                 rotary_layout: str = "half", rope_scaling: Optional[dict] = None, relative_num_buckets: int = 32,
                 relative_max_distance: int = 128, relative_bidirectional: bool = True, qk_norm: bool = False,
                 sliding_window: Optional[int] = None, attention_scale: Optional[float] = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        C = ops._int_arg(d_model, "TransformerBlock: d_model", 1)
        H = ops._int_arg(num_heads, "TransformerBlock: num_heads", 1)
        F = ops._int_arg(dim_feedforward, "TransformerBlock: dim_feedforward", 1)
        KVH = H if num_kv_heads is None else ops._int_arg(num_kv_heads, "TransformerBlock: num_kv_heads", 1)
        if H % KVH:
            raise ValueError(f"TransformerBlock: num_kv_heads ({KVH}) must divide num_heads ({H})")
        if head_dim is None:
            if C % H:
                raise ValueError(f"TransformerBlock: d_model ({C}) must be a multiple of num_heads ({H}) unless "
                                 "head_dim is given")
            D = C // H
        else:
            D = ops._int_arg(head_dim, "TransformerBlock: head_dim", 1)
        if norm not in ("layer_norm", "rms_norm"):
            raise ValueError(f"TransformerBlock: norm must be 'layer_norm' or 'rms_norm', got {norm!r}")
        if position not in ("none", "rotary", "alibi", "relative"):
            raise ValueError(f"TransformerBlock: position must be 'none', 'rotary', 'alibi' or 'relative', got "
                             f"{position!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TransformerBlock: dropout must be in [0, 1), got {dropout}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.dim_feedforward = C, H, KVH, D, F
        self.norm_first, self.gated, self.position = bool(norm_first), bool(gated), position
        self.activation = activation_name(activation)
        attn = _Parts()
        attn.q_proj = Linear(C, H * D, bias=attention_bias)
        attn.k_proj = Linear(C, KVH * D, bias=attention_bias)
        attn.v_proj = Linear(C, KVH * D, bias=attention_bias)
        attn.o_proj = Linear(H * D, C, bias=attention_bias)
        if qk_norm:
            attn.q_norm = RMSNorm(D, eps=norm_eps, one_plus=norm_one_plus)
            attn.k_norm = RMSNorm(D, eps=norm_eps, one_plus=norm_one_plus)
        if position == "relative":
            attn.relative_attention_bias = _Parts()
            attn.relative_attention_bias.weight = Parameter(init.normal((relative_num_buckets, H), 1.0))
        self.self_attn = attn
        mlp = _Parts()
        if gated:
            mlp.gate_proj = Linear(C, F, bias=mlp_bias)
        mlp.up_proj = Linear(C, F, bias=mlp_bias)
        mlp.down_proj = Linear(F, C, bias=mlp_bias)
        self.mlp = mlp

        def make_norm():
            if norm == "rms_norm":
                return RMSNorm(C, eps=norm_eps, one_plus=norm_one_plus)
            return LayerNorm(C, eps=norm_eps, bias=norm_bias)

        self.input_layernorm = make_norm()
        self.post_attention_layernorm = make_norm()
        self._config_kw = dict(
            d_model=C, num_heads=H, num_kv_heads=KVH, head_dim=D, norm=norm, norm_eps=float(norm_eps),
            norm_one_plus=bool(norm_one_plus), norm_first=bool(norm_first), qk_norm=bool(qk_norm),
            activation=self.activation, position=position, rope_theta=float(rope_theta),
            rotary_dim=0 if rotary_dim is None else int(rotary_dim), rotary_layout=rotary_layout,
            rope_scaling=rope_scaling, relative_num_buckets=int(relative_num_buckets),
            relative_max_distance=int(relative_max_distance), relative_bidirectional=bool(relative_bidirectional),
            sliding_window=0 if sliding_window is None else int(sliding_window),
            attention_scale=0.0 if attention_scale is None else float(attention_scale),
            dropout=float(dropout), ff_dropout=0.0, attention_dropout=float(dropout))
        self.block_config  # validate now

    def _block_config(self) -> dict:
        return self._config_kw

    def _block_parts(self, weights: dict, grads: Optional[dict]) -> None:
        a = self.self_attn
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            linear_entries(weights, grads, "self_attn." + ours, getattr(a, theirs))
        if "q_norm" in a._modules:
            for n in ("q_norm", "k_norm"):
                weights["self_attn." + n] = getattr(a, n).weight.data
                if grads is not None:
                    grads["self_attn." + n] = getattr(a, n).weight.grad
        if "relative_attention_bias" in a._modules:
            p = a.relative_attention_bias.weight
            weights["self_attn.relative_table"] = p.data
            if grads is not None:
                grads["self_attn.relative_table"] = p.grad
        if self.gated:
            linear_entries(weights, grads, "ff.gate", self.mlp.gate_proj)
        linear_entries(weights, grads, "ff.up", self.mlp.up_proj)
        linear_entries(weights, grads, "ff.down", self.mlp.down_proj)
        norm_entries(weights, grads, "norm1", self.input_layernorm)
        norm_entries(weights, grads, "norm_ff", self.post_attention_layernorm)

    def forward(self, x, attn_mask=None, key_padding_mask=None, is_causal: bool = False, position_offset=None,
                need_weights: bool = False):
        return self._run(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                         position_offset=position_offset, need_weights=need_weights)

    def backward(self, grad_output):
        return self._run_backward(grad_output)[0]

    def extra_repr(self) -> str:
        kw = self._config_kw
        return (f"d_model={kw['d_model']}, num_heads={kw['num_heads']}, num_kv_heads={kw['num_kv_heads']}, "
                f"head_dim={kw['head_dim']}, dim_feedforward={self.dim_feedforward}, norm={kw['norm']!r}, "
                f"norm_first={kw['norm_first']}, activation={kw['activation']!r}, gated={self.gated}, "
                f"position={kw['position']!r}")
