"""GPT: a decoder-only Transformer language model (pre-norm causal self-attention blocks), with key/value-cached
generation (greedy, temperature, top-k, top-p)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .. import ops
from ..nn import quantized
from ..nn import (Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, PositionalEncoding, RMSNorm,
                  TransformerBlock, TransformerEncoderLayer, init)
from ..nn.module import check_grad_shape

__all__ = ["GPT", "sample_next"]


def _sampling_args(temperature, top_k, top_p):
    """Checked sampling settings: temperature finite and >= 0, top_k an int >= 1, top_p in (0, 1]."""
    temperature = ops._finite_scalar(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        top_k = ops._int_arg(top_k, "top_k", 1)
    if top_p is not None:
        top_p = float(top_p)
        if not 0 < top_p <= 1:  # (NaN fails this too)
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return temperature, top_k, top_p


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, greedy: bool = False) -> np.ndarray:
    """Next ids (B,) from last-position logits (B, V): greedy (argmax), or sampling at ``temperature`` from the
    ``top_k`` most likely tokens and/or the smallest set whose probability reaches ``top_p``."""
    temperature, top_k, top_p = _sampling_args(temperature, top_k, top_p)
    if greedy or temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


class GPT(Module):
    """Token embedding ``wte`` + positions (``learned`` table or ``sinusoidal``) -> ``n_layer`` pre-norm blocks
    (causal self-attention, feed-forward of 4 x n_embd with ``activation`` "gelu" or "gelu_tanh" as GPT-2) ->
    ``ln_f`` -> logits, the head tied to ``wte`` unless ``tie_weights=False`` (then ``lm_head``). ``forward(ids)``
    returns logits (B, T, vocab_size); ``backward`` takes their gradient.

    A Llama-style decoder with the options ``norm="rms_norm"``, ``positional="rotary"`` (``rope_theta``) or
    ``"alibi"``, ``activation="silu"`` with ``gated=True`` (SwiGLU), ``n_kv_head`` (grouped-query attention;
    0 = ``n_head``), ``bias=False``, ``d_ff`` (0 = 4 x n_embd) and ``tie_weights=False``: its blocks are
    :class:`cpuformer.nn.TransformerBlock` (Hugging Face Llama names). Every block runs as one C++ call.
    Saved models run in the C++ runtime either way."""

    def __init__(self, vocab_size: int, block_size: int = 128, n_layer: int = 4, n_head: int = 4, n_embd: int = 256,
                 dropout: float = 0.0, positional: str = "learned", tie_weights: bool = True,
                 activation: str = "gelu", layer_norm_eps: float = 1e-5, norm: str = "layer_norm",
                 n_kv_head: int = 0, gated: bool = False, bias: bool = True, d_ff: int = 0,
                 rope_theta: float = 10000.0) -> None:
        super().__init__()
        if positional not in ("learned", "sinusoidal", "rotary", "alibi"):
            raise ValueError(f"positional must be 'learned', 'sinusoidal', 'rotary' or 'alibi', got {positional!r}")
        if norm not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm must be 'layer_norm' or 'rms_norm', got {norm!r}")
        n_kv_head = ops._int_arg(n_kv_head, "n_kv_head", 0)
        d_ff = ops._int_arg(d_ff, "d_ff", 0)
        self.config = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, dropout=dropout, positional=positional, tie_weights=tie_weights,
                           activation=activation, layer_norm_eps=layer_norm_eps, norm=norm, n_kv_head=n_kv_head,
                           gated=gated, bias=bias, d_ff=d_ff, rope_theta=rope_theta)
        ff = d_ff or 4 * n_embd
        self.wte = Embedding(vocab_size, n_embd)
        self.wte.weight.data[...] = init.normal((vocab_size, n_embd), 0.02)
        # The classic GPT-2 block (torch.nn.TransformerEncoderLayer's names) unless a Llama-style option is asked.
        classic = (norm == "layer_norm" and positional in ("learned", "sinusoidal") and not gated and bias
                   and n_kv_head in (0, n_head))
        if positional in ("learned", "sinusoidal"):
            self.wpe = PositionalEncoding(n_embd, block_size, dropout, learned=positional == "learned")
        else:
            object.__setattr__(self, "wpe", None)
            self.drop = Dropout(dropout)
        if classic:
            self.blocks = ModuleList(TransformerEncoderLayer(n_embd, n_head, ff, dropout, activation,
                                                             layer_norm_eps, norm_first=True)
                                     for _ in range(n_layer))
        else:
            self.blocks = ModuleList(
                TransformerBlock(n_embd, n_head, ff, num_kv_heads=n_kv_head or n_head, norm=norm,
                                 norm_eps=layer_norm_eps, norm_first=True, activation=activation, gated=gated,
                                 attention_bias=bias, mlp_bias=bias, norm_bias=bias,
                                 position=positional if positional in ("rotary", "alibi") else "none",
                                 rope_theta=rope_theta, dropout=dropout)
                for _ in range(n_layer))
        self.ln_f = RMSNorm(n_embd, eps=layer_norm_eps) if norm == "rms_norm" else LayerNorm(n_embd, eps=layer_norm_eps,
                                                                                             bias=bias)
        if not tie_weights:
            self.lm_head = Linear(n_embd, vocab_size, bias=False)
        self.block_size, self.n_head, self.n_embd, self.vocab_size = block_size, n_head, n_embd, vocab_size
        self._h = None

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        x = self.wte(ids)
        return self.wpe(x) if self.wpe is not None else self.drop(x)

    def _embed_backward(self, dx: np.ndarray) -> None:
        dx = self.wpe.backward(dx) if self.wpe is not None else self.drop.backward(dx)
        self.wte.backward(dx)

    def _head_weight(self):
        return self.wte.weight if self.config["tie_weights"] else self.lm_head.weight

    _frozen = None  # the tied output head prepared for inference (quantize_dynamic / freeze)

    def _freeze_weights(self, make) -> int:
        if not self.config["tie_weights"]:
            return 0  # lm_head is a Linear and prepares itself
        object.__setattr__(self, "_frozen", make(self.wte.weight.data))
        return 1

    def _logits(self, h2: np.ndarray) -> np.ndarray:
        if self._frozen is not None:
            quantized.require_inference(self)
            return quantized.linear(h2, self._frozen, None, self.wte.weight.data)
        if not self.config["tie_weights"] and self.lm_head._frozen is not None:
            return self.lm_head(h2)
        return ops.matmul(h2, self._head_weight().data, transpose_b=True)

    def forward(self, ids):
        ids = ops._ids(ids, "ids")
        if ids.ndim != 2:
            raise ValueError(f"GPT: ids must be (batch, length), got shape {ids.shape}")
        if ids.shape[1] > self.block_size:
            raise ValueError(f"GPT: sequence length {ids.shape[1]} exceeds block_size {self.block_size}")
        x = self._embed(ids)
        self._shape = ids.shape
        for block in self.blocks:
            x = block(x, is_causal=True)
        h = self.ln_f(x)
        B, T, C = h.shape
        h2 = h.reshape(B * T, C)
        self._h = h2
        return self._logits(h2).reshape(B, T, self.vocab_size)

    def backward(self, grad_output):
        if quantized.is_frozen(self):
            quantized.no_backward(self)
        if self._h is None:
            raise RuntimeError("GPT.backward called before forward")
        g = ops._f32(grad_output, "grad_output")
        B, T = self._shape
        check_grad_shape(g, (B, T, self.vocab_size), "GPT")
        V = self.vocab_size
        g2 = g.reshape(B * T, V)
        W = self._head_weight()
        ops.gemm(g2, self._h, W.grad, transpose_a=True, beta=1.0)  # head (tied: into wte's gradient)
        dx = self.ln_f.backward(ops.matmul(g2, W.data).reshape(B, T, self.n_embd))
        for block in reversed(list(self.blocks)):
            dx = block.backward(dx)
        self._embed_backward(dx)
        return None

    # -- generation -----------------------------------------------------------------------------------------------
    def _step_cached(self, ids: np.ndarray, caches, start: int) -> np.ndarray:
        """Run ``ids`` (B, n) at positions start..start+n-1 through the blocks, attending over and extending their
        key/value caches (the C++ block's decode step); returns the last position's logits (B, V). Each new token
        costs O(start) attention work instead of re-running the prefix."""
        n = ids.shape[1]
        x = self.wte.weight.data[ids]
        if self.wpe is not None:
            x = x + self.wpe.rows(start, start + n)
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, cache)
        return self._logits(self.ln_f(x[:, -1]))

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, greedy: bool = False, seed: Optional[int] = None,
                 use_cache: bool = True, eos_id: Optional[int] = None,
                 do_sample: Optional[bool] = None) -> np.ndarray:
        """Continue ``ids`` (B, T0) by ``max_new_tokens`` tokens; returns (B, T0 + new).

        Greedy by default, as transformers' ``generate``: ``do_sample=True`` samples at ``temperature`` from the
        ``top_k`` / ``top_p`` filtered distribution (``seed`` makes it reproducible); ``do_sample=False`` (or
        ``greedy=True``) takes the most likely token. Left unset, ``do_sample`` follows the arguments, as before it
        existed: sampling when ``temperature``, ``top_k``, ``top_p`` or ``seed`` is given, greedy otherwise.

        With ``use_cache`` (default)
        keys and values are cached, so each new token costs O(T) work; past ``block_size`` (and without the cache)
        the last ``block_size`` tokens are re-run each step. Stops early when every row has produced ``eos_id``.

        ``ids`` may also be a list of prompts of different lengths: they run as one batch (each row at its own
        positions in the blocks' caches) and a list of arrays (prompt + continuation) comes back; greedy results
        equal each prompt's own."""
        if do_sample is None:
            do_sample = not greedy and (temperature != 1.0 or top_k is not None or top_p is not None
                                        or seed is not None)
        elif do_sample and greedy:
            raise ValueError("generate: greedy=True and do_sample=True contradict each other")
        greedy = not do_sample
        if isinstance(ids, (list, tuple)) and len(ids) and all(np.ndim(r) == 1 for r in ids) and \
                len({len(r) for r in ids}) > 1:
            return self._generate_ragged([ops._ids(r, f"ids[{i}]") for i, r in enumerate(ids)], max_new_tokens,
                                         temperature, top_k, top_p, greedy, seed, use_cache, eos_id)
        ids = ops._ids(ids, "ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"generate: ids must be (batch >= 1, length >= 1), got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise IndexError(f"generate: id {bad} is out of range [0, {self.vocab_size})")
        max_new_tokens = ops._int_arg(max_new_tokens, "max_new_tokens", 0)
        _sampling_args(temperature, top_k, top_p)
        if eos_id is not None:
            eos_id = ops._int_arg(eos_id, "eos_id", 0)
        if seed is not None:
            ops._seed(seed)
        was_training = self.training
        self.eval()
        rng = np.random.default_rng(seed)
        out = ids.copy()
        B = ids.shape[0]
        done = np.zeros(B, bool)
        caches = None
        try:
            for _ in range(max_new_tokens):
                total = out.shape[1]
                if use_cache and total <= self.block_size:
                    if caches is None:
                        caches = [block.new_cache(B, self.block_size) for block in self.blocks]
                        logits = self._step_cached(out, caches, 0)
                    else:
                        logits = self._step_cached(out[:, -1:], caches, total - 1)
                else:
                    logits = self.forward(out[:, -self.block_size:])[:, -1]
                nxt = sample_next(logits, rng, temperature, top_k, top_p, greedy)
                if eos_id is not None:
                    nxt = np.where(done, eos_id, nxt)
                    done |= nxt == eos_id
                out = np.concatenate([out, nxt[:, None].astype(np.int64)], axis=1)
                if use_cache and out.shape[1] > self.block_size:
                    caches = None  # past the position table: fall back to re-running the window
                if eos_id is not None and done.all():
                    break
        finally:
            self.train(was_training)
        return out

    def _generate_ragged(self, prompts, max_new_tokens, temperature, top_k, top_p, greedy, seed, use_cache, eos_id):
        lengths = np.array([len(p) for p in prompts], np.int64)
        max_new_tokens = ops._int_arg(max_new_tokens, "max_new_tokens", 0)
        if lengths.min() < 1:
            raise ValueError("generate: every prompt needs at least one id")
        for i, p in enumerate(prompts):
            if p.min() < 0 or p.max() >= self.vocab_size:
                raise IndexError(f"generate: ids[{i}] holds an id out of range [0, {self.vocab_size})")
        if not use_cache or lengths.max() + max_new_tokens > self.block_size:  # past the window: row by row
            return [self.generate(p[None], max_new_tokens, temperature, top_k, top_p, greedy, seed, use_cache,
                                  eos_id, do_sample=not greedy)[0] for p in prompts]
        _sampling_args(temperature, top_k, top_p)
        if eos_id is not None:
            eos_id = ops._int_arg(eos_id, "eos_id", 0)
        rng = np.random.default_rng(seed)
        B, P = len(prompts), int(lengths.max())
        padded = np.zeros((B, P), np.int64)
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = p
        was_training = self.training
        self.eval()
        try:
            caches = [block.new_cache(B, self.block_size) for block in self.blocks]
            x = self.wte.weight.data[padded]
            if self.wpe is not None:
                x = x + self.wpe.rows(0, P)[None]
            for block, cache in zip(self.blocks, caches):
                x = block.decode(x, cache, new_tokens=lengths)
            h = x[np.arange(B), lengths - 1]  # each row's last real position
            outs = [list(p) for p in prompts]
            done = np.zeros(B, bool)
            for step in range(max_new_tokens):
                logits = self._logits(self.ln_f(h))
                nxt = sample_next(logits, rng, temperature, top_k, top_p, greedy)
                if eos_id is not None:
                    nxt = np.where(done, eos_id, nxt)
                    done |= nxt == eos_id
                for b in range(B):
                    outs[b].append(int(nxt[b]))
                if (eos_id is not None and done.all()) or step == max_new_tokens - 1:
                    break
                x = self.wte.weight.data[nxt][:, None]
                if self.wpe is not None:
                    x = x + self.wpe.rows(0, self.block_size)[lengths + step][:, None]
                for block, cache in zip(self.blocks, caches):
                    x = block.decode(x, cache)
                h = x[:, 0]
        finally:
            self.train(was_training)
        return [np.array(o, np.int64) for o in outs]

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token (6 x parameters + attention)."""
        return 6 * self.num_parameters() + 12 * len(self.blocks) * self.n_embd * self.block_size
