"""Randomized bad-input driver for every public op, layer and model, and for model files (run by tests/test_fuzz.py
in child processes, so a crash or a hang is caught and reported by case number instead of killing pytest).

    python tests/fuzz_driver.py ops|layers|models|files|tokenizers SEED COUNT [FOLDER]

Each case starts from valid arguments, replaces one or two of them with a bad value (wrong dtype, rank or shape, 0-d,
zero-size, non-contiguous, read-only, NaN/inf, out-of-range ids, aliasing another argument, wrong Python types) and
calls; damaged model files also go through the memory-mapped reader (cpuformer.io.open_safetensors), alone and as
sharded Hugging Face directories. Allowed outcomes: a result, or TypeError / ValueError / IndexError (or their
subclasses) / RuntimeError (a documented misuse such as backward before forward) / NotImplementedError. Anything
else (ZeroDivisionError, OverflowError, MemoryError, AttributeError, KeyError, RecursionError, a signal, a hang) is a
defect. The driver prints "CASE n: description" before each case and exits 3 on an unexpected exception, printing it.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import numpy as np

import cpuformer
from cpuformer import models, nn, ops
from cpuformer.io import SafetensorsError, load_safetensors, save_safetensors

ALLOWED = (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError)


class Case:
    """Valid arguments for one call: ``args`` by name, with each argument's kind."""

    def __init__(self, name, fn, **args):
        self.name, self.fn, self.args = name, fn, args  # args: name -> (kind, value)

    def call(self, values):
        return self.fn(**values)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------- valid op calls

def op_cases(rng):
    B, T, S, H = (int(v) for v in rng.integers(1, 4, 4))
    D = int(rng.integers(1, 5))
    E, F, V, N = H * D, int(rng.integers(1, 9)), int(rng.integers(2, 9)), int(rng.integers(1, 9))
    x, g = f32(rng, B, T, E), f32(rng, B, T, E)
    q, k, v = f32(rng, B, T, E), f32(rng, B, S, E), f32(rng, B, S, E)
    o, lse = ops.attention(q, k, v, H, need_lse=True)
    y = ops.softmax(x)
    _, mean, rstd = ops.layer_norm_forward(x)
    w1, w2 = f32(rng, F, E), f32(rng, E, F)
    _, u, a = ops.feed_forward(x, w1, None, w2, None)
    ids = rng.integers(0, V, (B, T))
    return [
        Case("matmul", ops.matmul, a=("f", f32(rng, N, E)), b=("f", f32(rng, F, E)), transpose_b=("bool", True),
             bias=("f", f32(rng, F)), alpha=("float", 0.5)),
        Case("gemm", ops.gemm, a=("f", f32(rng, N, E)), b=("f", f32(rng, E, F)), out=("out", f32(rng, N, F)),
             beta=("float", 1.0), bias=("f", f32(rng, F))),
        Case("softmax", ops.softmax, x=("f", x)),
        Case("log_softmax", ops.log_softmax, x=("f", x)),
        Case("softmax_backward", ops.softmax_backward, grad_output=("f", g), output=("f", y)),
        Case("log_softmax_backward", ops.log_softmax_backward, grad_output=("f", g), output=("f", y)),
        Case("layer_norm", ops.layer_norm, x=("f", x), weight=("f", f32(rng, E)), bias=("f", f32(rng, E)),
             eps=("float", 1e-5)),
        Case("layer_norm_backward", ops.layer_norm_backward, grad_output=("f", g), x=("f", x),
             weight=("f", f32(rng, E)), mean=("f", mean), rstd=("f", rstd)),
        Case("gelu", ops.gelu, x=("f", x), approximate=("str", "tanh")),
        Case("gelu_backward", ops.gelu_backward, grad_output=("f", g), x=("f", x)),
        Case("relu", ops.relu, x=("f", x)),
        Case("relu_backward", ops.relu_backward, grad_output=("f", g), x=("f", x)),
        Case("bias_activation", ops.bias_activation, x=("f", x), bias=("f", f32(rng, E)), activation=("str", "gelu")),
        Case("bias_activation_backward", ops.bias_activation_backward, grad_output=("f", g), x=("f", x),
             bias=("f", f32(rng, E)), activation=("str", "relu")),
        Case("dropout", ops.dropout, x=("f", x), p=("float", 0.3), seed=("int", 5)),
        Case("dropout_backward", ops.dropout_backward, grad_output=("f", g), p=("float", 0.3), seed=("int", 5)),
        Case("add", ops.add, a=("f", x), b=("f", g)),
        Case("embedding", ops.embedding, ids=("ids", ids), weight=("f", f32(rng, V, E))),
        Case("embedding_backward", ops.embedding_backward, grad_output=("f", x), ids=("ids", ids),
             weight_grad=("out", f32(rng, V, E)), padding_idx=("int", 0)),
        Case("cross_entropy", ops.cross_entropy, logits=("f", f32(rng, N, V)), targets=("ids", rng.integers(0, V, N)),
             ignore_index=("int", -100), label_smoothing=("float", 0.1)),
        Case("cross_entropy_with_grad", ops.cross_entropy_with_grad, logits=("out", f32(rng, N, V)),
             targets=("ids", rng.integers(0, V, N)), grad_scale=("float", 1.0), inplace=("bool", True)),
        Case("adamw_step", ops.adamw_step, param=("out", f32(rng, N, F)), grad=("f", f32(rng, N, F)),
             exp_avg=("out", f32(rng, N, F)), exp_avg_sq=("out", np.abs(f32(rng, N, F))), lr=("float", 1e-3),
             step=("int", 1), weight_decay=("float", 0.01)),
        Case("sum_squares", ops.sum_squares, x=("f", x)),
        Case("bias_grad", ops.bias_grad, grad_output=("f", g), out=("out", f32(rng, E))),
        Case("attention", ops.attention, query=("f", q), key=("f", k), value=("f", v), num_heads=("int", H),
             attn_mask=("mask", np.zeros((T, S), np.float32)), key_padding_mask=("mask", np.zeros((B, S), bool)),
             is_causal=("bool", False), dropout_p=("float", 0.1), need_lse=("bool", True)),
        Case("attention_backward", ops.attention_backward, grad_output=("f", g), query=("f", q), key=("f", k),
             value=("f", v), output=("f", o), lse=("f", lse), num_heads=("int", H),
             grad_query=("out", np.empty_like(q)), grad_key=("out", np.empty_like(k)),
             grad_value=("out", np.empty_like(v)), is_causal=("bool", True)),
        Case("attention_weights", ops.attention_weights, query=("f", q), key=("f", k), num_heads=("int", H),
             key_padding_mask=("mask", np.zeros((B, S), bool))),
        Case("feed_forward", ops.feed_forward, x=("f", x), w1=("f", w1), b1=("f", f32(rng, F)), w2=("f", w2),
             b2=("f", f32(rng, E)), activation=("str", "gelu"), u_out=("out", np.empty((B * T, F), np.float32)),
             a_out=("out", np.empty((B * T, F), np.float32))),
        Case("feed_forward_backward", ops.feed_forward_backward, grad_output=("f", g), x=("f", x), u=("f", u),
             a=("f", a), w1=("f", w1), w2=("f", w2), grad_w1=("out", np.zeros_like(w1)),
             grad_b1=("out", np.zeros(F, np.float32)), grad_w2=("out", np.zeros_like(w2)),
             grad_b2=("out", np.zeros(E, np.float32)), workspace=("out", np.empty((B * T, F), np.float32))),
    ]


# --------------------------------------------------------------------------------------------------- bad values

def bad_array(rng, value, others):
    """A bad replacement for an array argument."""
    v = np.asarray(value)
    choices = [
        lambda: v.astype(np.complex64), lambda: v.astype(object), lambda: np.array(["a"] * max(v.size, 1)),
        lambda: None, lambda: "text", lambda: 3.5, lambda: [], lambda: {"a": 1},
        lambda: v.reshape(-1)[0] if v.size else np.float32(1),  # 0-d
        lambda: np.empty((0,) + v.shape[1:], v.dtype),  # zero-size
        lambda: v[None],  # rank + 1
        lambda: v.reshape(-1),  # rank changed
        lambda: v[0] if v.ndim > 1 else v[None, None],
        lambda: np.asarray(rng.standard_normal(tuple(int(d) for d in rng.integers(1, 6, v.ndim))), v.dtype),
        lambda: np.asarray(rng.standard_normal(tuple(int(d) for d in rng.integers(1, 6, v.ndim + 1))), v.dtype),
        lambda: np.repeat(v, 2, axis=-1)[..., ::2] if v.ndim else v,  # non-contiguous
        lambda: np.ascontiguousarray(np.swapaxes(v, 0, -1)) if v.ndim > 1 else v,  # a permutation of the shape
        lambda: np.full_like(v, np.nan) if v.dtype.kind == "f" else v,
        lambda: np.full_like(v, np.inf) if v.dtype.kind == "f" else v,
        lambda: np.full_like(v, -np.inf) if v.dtype.kind == "f" else v,
        lambda: v.astype(np.float64), lambda: v.astype(np.float16), lambda: v.astype(np.int32),
        lambda: v.astype(bool),
        lambda: readonly(v),
        lambda: others[int(rng.integers(len(others)))] if others else v,  # alias of another argument
        lambda: np.asfortranarray(v) if v.ndim > 1 else v,
        lambda: v.view(np.uint8) if v.dtype.itemsize > 1 and v.ndim else v,
    ]
    return choices[int(rng.integers(len(choices)))]()


def readonly(v):
    v = np.array(v)
    v.flags.writeable = False
    return v


def bad_ids(rng, value, others):
    v = np.asarray(value)
    choices = [
        lambda: np.full_like(v, -1), lambda: np.full_like(v, 10**6), lambda: np.full_like(v, 2**62),
        lambda: v.astype(np.uint64) + np.uint64(2**63), lambda: v.astype(np.float32), lambda: v.astype(bool),
        lambda: v.reshape(-1)[:1].reshape(()), lambda: np.empty((0,) + v.shape[1:], np.int64), lambda: v[None],
        lambda: v.astype(np.int8), lambda: v.astype(np.uint8), lambda: [[1, 2], [3]], lambda: "ids", lambda: None,
        lambda: np.repeat(v, 2, axis=-1)[..., ::2], lambda: bad_array(rng, v.astype(np.float32), others),
    ]
    return choices[int(rng.integers(len(choices)))]()


BAD_SCALARS = [float("nan"), float("inf"), -float("inf"), -1, 0, -(2**63), 2**64, 10**30, 1e30, -1e-30, 0.5, 1.0,
               1.5, "x", None, True, False, [1], np.float32("nan"), np.int64(-5), 2**31, 7]


def bad_value(rng, kind, value, others):
    if kind in ("f", "out", "mask"):
        return bad_array(rng, value, others)
    if kind == "ids":
        return bad_ids(rng, value, others)
    if kind == "str":
        return [None, "", "GELU", "tanh ", 3, "identity", "none", "relu"][int(rng.integers(8))]
    return BAD_SCALARS[int(rng.integers(len(BAD_SCALARS)))]


def mutate(rng, case: Case):
    values = {name: val for name, (_, val) in case.args.items()}
    arrays = [val for kind, val in case.args.values() if isinstance(val, np.ndarray)]
    names = list(case.args)
    changed = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        name = names[int(rng.integers(len(names)))]
        kind, val = case.args[name]
        values[name] = bad_value(rng, kind, val, [a for a in arrays if a is not val])
        changed.append(name)
    return values, changed


def describe(values, changed):
    def show(v):
        if isinstance(v, np.ndarray):
            return f"array{v.shape}:{v.dtype}{'' if v.flags.writeable else ':ro'}"
        return repr(v)[:40]
    return ", ".join(f"{n}={show(values[n])}" for n in changed)


def run_case(n, label, thunk):
    print(f"CASE {n}: {label}", flush=True)
    try:
        thunk()
    except ALLOWED:
        pass
    except BaseException:  # anything else is a defect: report it and stop
        print(f"UNEXPECTED in case {n}: {label}\n{traceback.format_exc()}", flush=True)
        sys.exit(3)


def fuzz_ops(rng, count):
    for n in range(count):
        cases = op_cases(rng)
        case = cases[n % len(cases)]
        values, changed = mutate(rng, case)
        run_case(n, f"{case.name}({describe(values, changed)})", lambda: case.call(values))


# ------------------------------------------------------------------------------------------------ layers, models

def layer_factories(rng):
    E, H = 8, 2
    return {
        "Linear": (lambda: nn.Linear(E, 5), lambda: f32(rng, 2, 3, E)),
        "Embedding": (lambda: nn.Embedding(11, E, padding_idx=0), lambda: rng.integers(0, 11, (2, 3))),
        "PositionalEncoding": (lambda: nn.PositionalEncoding(E, 16, 0.1, learned=bool(rng.integers(2))),
                               lambda: f32(rng, 2, 5, E)),
        "LayerNorm": (lambda: nn.LayerNorm(E), lambda: f32(rng, 2, 3, E)),
        "Dropout": (lambda: nn.Dropout(0.2), lambda: f32(rng, 2, 3, E)),
        "ReLU": (nn.ReLU, lambda: f32(rng, 2, 3, E)),
        "GELU": (lambda: nn.GELU("tanh"), lambda: f32(rng, 2, 3, E)),
        "FeedForward": (lambda: nn.FeedForward(E, 16, 0.1, "gelu"), lambda: f32(rng, 2, 3, E)),
        "MultiheadAttention": (lambda: nn.MultiheadAttention(E, H, 0.1), lambda: f32(rng, 2, 3, E)),
        "TransformerEncoderLayer": (lambda: nn.TransformerEncoderLayer(E, H, 16, 0.1, norm_first=bool(rng.integers(2))),
                                    lambda: f32(rng, 2, 3, E)),
        "TransformerDecoderLayer": (lambda: nn.TransformerDecoderLayer(E, H, 16, 0.1), lambda: f32(rng, 2, 3, E)),
    }


def call_layer(layer, name, x, extra):
    if name == "MultiheadAttention":
        return layer(x, x, x, **extra)[0]
    if name == "TransformerDecoderLayer":
        return layer(x, extra.pop("memory", x), **extra)
    return layer(x, **extra)


MASK_KW = {"MultiheadAttention": ("attn_mask", "key_padding_mask", "is_causal"),
           "TransformerEncoderLayer": ("src_mask", "src_key_padding_mask", "is_causal"),
           "TransformerDecoderLayer": ("tgt_mask", "memory_key_padding_mask", "tgt_is_causal", "memory")}


def fuzz_layers(rng, count):
    ctor_bad = {"Linear": lambda v: nn.Linear(v, 4), "Embedding": lambda v: nn.Embedding(v, 4),
                "LayerNorm": lambda v: nn.LayerNorm(v), "Dropout": lambda v: nn.Dropout(v),
                "GELU": lambda v: nn.GELU(v), "FeedForward": lambda v: nn.FeedForward(8, v),
                "MultiheadAttention": lambda v: nn.MultiheadAttention(8, v),
                "PositionalEncoding": lambda v: nn.PositionalEncoding(8, v),
                "TransformerEncoderLayer": lambda v: nn.TransformerEncoderLayer(8, 2, 16, v)}
    for n in range(count):
        factories = layer_factories(rng)
        name = list(factories)[n % len(factories)]
        make, data = factories[name]
        what = int(rng.integers(5))
        if what == 0 and name in ctor_bad:  # constructor with a bad argument
            # (not 2**31: a valid request for a 2**31-row layer is a 32 GiB allocation, answered by MemoryError)
            ctor_values = [v for v in BAD_SCALARS if not (isinstance(v, int) and 2**20 < v < 2**63)]
            v = ctor_values[int(rng.integers(len(ctor_values)))]
            run_case(n, f"{name}({v!r})", lambda: ctor_bad[name](v))
            continue
        layer = make()
        if rng.random() < 0.5:
            layer.eval()
        x = data()
        if what == 1:  # bad input
            bad = bad_ids(rng, x, []) if name == "Embedding" else bad_array(rng, x, [])
            run_case(n, f"{name}.forward(bad {type(bad).__name__})", lambda: call_layer(layer, name, bad, {}))
        elif what == 2:  # bad masks / extras
            extra = {}
            for key in MASK_KW.get(name, ()):
                if rng.random() < 0.6:
                    extra[key] = bad_value(rng, "bool" if "causal" in key else "mask",
                                           np.zeros((x.shape[0], x.shape[1]), bool), [x])
            run_case(n, f"{name}.forward(x, {sorted(extra)})", lambda: call_layer(layer, name, x, extra))
        elif what == 3:  # backward before forward, or with a bad gradient
            def go():
                if rng.random() < 0.7:
                    y = call_layer(layer, name, x, {})
                    layer.backward(bad_array(rng, np.asarray(y, np.float32), [x]))
                else:
                    layer.backward(np.ones((2, 3, 8), np.float32))
            run_case(n, f"{name}.backward(bad)", go)
        else:  # valid forward + backward must work
            def go():
                y = call_layer(layer, name, x, {})
                if layer.training and name != "Embedding":
                    layer.backward(np.ones_like(y))
            run_case(n, f"{name} valid", go)


def model_factories():
    return {
        "GPT": lambda: models.GPT(13, block_size=8, n_layer=1, n_head=2, n_embd=8),
        "TransformerClassifier": lambda: models.TransformerClassifier(13, 3, d_model=8, nhead=2, num_layers=1,
                                                                      dim_feedforward=16, max_len=8),
        "Seq2SeqTransformer": lambda: models.Seq2SeqTransformer(13, 11, d_model=8, nhead=2, num_encoder_layers=1,
                                                                num_decoder_layers=1, dim_feedforward=16, max_len=10),
        "BertModel": lambda: models.BertModel(13, 8, 1, 2, 16, 10),
    }


def fuzz_models(rng, count):
    for n in range(count):
        factories = model_factories()
        name = list(factories)[n % len(factories)]
        model = factories[name]()
        if rng.random() < 0.5:
            model.eval()
        if rng.random() < 0.15:
            model = cpuformer.quantize_dynamic(model) if rng.random() < 0.5 else cpuformer.freeze(model)
        ids = rng.integers(0, 11, (2, 4))
        bad = bad_ids(rng, ids, [])
        what = int(rng.integers(4))
        if what == 0:
            if name == "Seq2SeqTransformer":
                thunk = lambda: model(bad, ids) if rng.random() < 0.5 else model(ids, bad)  # noqa: E731
            else:
                thunk = lambda: model(bad)  # noqa: E731
            run_case(n, f"{name}(bad ids {describe({'ids': bad}, ['ids'])})", thunk)
        elif what == 1 and name == "GPT":
            kw = {k: BAD_SCALARS[int(rng.integers(len(BAD_SCALARS)))]
                  for k in ("max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "seed") if rng.random() < 0.4}
            steps = kw.get("max_new_tokens")
            if isinstance(steps, int) and not isinstance(steps, bool) and steps > 20:
                kw["max_new_tokens"] = 3  # a valid request for 2**64 tokens would just run long
            kw.setdefault("max_new_tokens", 3)
            prompt = bad if rng.random() < 0.3 else ids[:1, :int(rng.integers(1, 4))]
            run_case(n, f"GPT.generate({describe({'p': prompt}, ['p'])}, {kw})", lambda: model.generate(prompt, **kw))
        elif what == 1 and name == "Seq2SeqTransformer":
            kw = {k: BAD_SCALARS[int(rng.integers(len(BAD_SCALARS)))]
                  for k in ("beam_size", "length_penalty") if rng.random() < 0.5}
            run_case(n, f"translate({kw})", lambda: model.translate(ids, max_len=4, **kw))
        elif what == 2 and name == "BertModel":
            kw = {k: bad_ids(rng, ids, []) for k in ("attention_mask", "token_type_ids") if rng.random() < 0.6}
            run_case(n, f"BertModel(ids, {sorted(kw)})", lambda: model(ids, **kw))
        else:
            def go():
                y = model(ids, ids) if name == "Seq2SeqTransformer" else model(ids)
                if model.training:
                    model.backward(bad_array(rng, np.asarray(y, np.float32), []))
            run_case(n, f"{name} backward(bad)", go)


# ------------------------------------------------------------------------------------------------- model files

def mutate_file(rng, raw: bytes, folder: str) -> bytes:
    """A damaged copy of a model file: flipped bytes, a cut, or an edited header/config."""
    what = int(rng.integers(4))
    if what == 0:
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        return bytes(b)
    if what == 1:
        return raw[: int(rng.integers(len(raw)))]
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    config = json.loads(meta["config"])
    huge = [2**63, 2**64 + 16, 10**9, 10**5, -1, -0.0, 0, 1.5, True, None, "x", [1], {"a": 1}, float("nan"), 3]
    if what == 2:  # edit the config
        key = list(config)[int(rng.integers(len(config)))]
        config[key] = huge[int(rng.integers(len(huge)))]
        meta["config"] = json.dumps(config) if rng.random() < 0.9 else "[" * int(rng.integers(1, 200000))
    else:  # edit a tensor entry
        names = [k for k in header if k != "__metadata__"]
        entry = header[names[int(rng.integers(len(names)))]]
        field = ["dtype", "shape", "data_offsets"][int(rng.integers(3))]
        entry[field] = [huge[int(rng.integers(len(huge)))]] if rng.random() < 0.5 else huge[int(rng.integers(len(huge)))]
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + raw[8 + n:]


def read_map(m):
    """Read every byte of every tensor of an opened SafetensorsMap (a view outside the mapping would crash here) and
    check that it agrees with itself."""
    assert isinstance(m.metadata(), dict) and len(m) == len(m.keys())
    for name in m.keys():
        a = m.tensor(name)
        assert a.shape == m.shape(name) and not a.flags.writeable and isinstance(m.dtype(name), str), name
        assert len(a.tobytes()) == a.nbytes, name


def open_map(path):
    """_core.SafetensorsMap.open on a damaged file or directory: a ValueError, or a map that reads back whole. A
    shard the damaged index names may not exist: FileNotFoundError is then the documented outcome."""
    try:
        m = cpuformer.io.open_safetensors(path)
    except FileNotFoundError:
        if os.path.isdir(path):
            return
        raise
    read_map(m)


SHARD_NAMES = ["../s1.safetensors", "/etc/passwd", "", ".", "..", "a\\b", "nope.safetensors", "s1.safetensors",
               "s2.safetensors", "model.safetensors.index.json"]


def shard_folder(rng, raw, target):
    """A damaged two-shard Hugging Face directory made from one model file: the index, a shard or the
    index's shard names edited, or a shard deleted."""
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    whole = os.path.join(target, "whole.safetensors")
    with open(whole, "wb") as f:
        f.write(raw)
    tensors, meta = load_safetensors(whole)
    os.remove(whole)
    names = sorted(tensors)
    weight_map = {name: f"s{1 + i % 2}.safetensors" for i, name in enumerate(names)}
    for shard in ("s1.safetensors", "s2.safetensors"):
        save_safetensors(os.path.join(target, shard), {n: tensors[n] for n in names if weight_map[n] == shard}, meta)
    what = int(rng.integers(4))
    if what == 2:  # a tensor moved to another (or a bad) shard name
        weight_map[names[int(rng.integers(len(names)))]] = SHARD_NAMES[int(rng.integers(len(SHARD_NAMES)))]
    index = json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    if what == 0:
        index = mutate_json_text(rng, index)
    with open(os.path.join(target, "model.safetensors.index.json"), "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(index)
    shard = os.path.join(target, f"s{1 + int(rng.integers(2))}.safetensors")
    if what == 1:
        damaged = mutate_file(rng, open(shard, "rb").read(), target)
        with open(shard, "wb") as f:
            f.write(damaged)
    elif what == 3:
        os.remove(shard)


def fuzz_files(rng, count, folder):
    sources = []
    for name, make in model_factories().items():
        path = os.path.join(folder, f"{name}.safetensors")
        cpuformer.save(make(), path)
        sources.append(open(path, "rb").read())
    sinusoidal = os.path.join(folder, "gpt-sin.safetensors")
    cpuformer.save(models.GPT(13, block_size=8, n_layer=2, n_head=2, n_embd=8, positional="sinusoidal"), sinusoidal)
    sources.append(open(sinusoidal, "rb").read())
    target = os.path.join(folder, "mutated.safetensors")
    target_dir = os.path.join(folder, "mutated-dir")
    for n in range(count):
        source = sources[n % len(sources)]
        if n % 4 == 3:  # a damaged sharded directory, through the mapped reader
            shard_folder(rng, source, target_dir)
            run_case(n, f"SafetensorsMap.open(sharded mutation of source {n % len(sources)})",
                     lambda: open_map(target_dir))
            continue
        raw = mutate_file(rng, source, folder)
        with open(target, "wb") as f:
            f.write(raw)

        def go():
            open_map(target)  # the mapped reader first: it validates what cpuformer.load's reader does, and more
            try:
                model = cpuformer.load(target)
            except SafetensorsError:
                return
            # a file that still loads must be a working model
            ids = np.array([[1, 2, 3]])
            model(ids, ids) if isinstance(model, models.Seq2SeqTransformer) else model(ids)

        run_case(n, f"load(mutation of source {n % len(sources)})", go)


# ---------------------------------------------------------------------------------------------- tokenizer files

def mutate_json_text(rng, text: str) -> str:
    """A damaged tokenizer.json: flipped characters, a cut, or a value replaced inside the parsed tree."""
    what = int(rng.integers(3))
    if what == 0:
        chars = list(text)
        for _ in range(int(rng.integers(1, 6))):
            chars[int(rng.integers(len(chars)))] = chr(int(rng.choice([0, 0x22, 0x5c, 0x7b, 0x5d, 0xe9, 0x1f600,
                                                                        int(rng.integers(32, 127))])))
        return "".join(chars)
    if what == 1:
        return text[: int(rng.integers(len(text)))]
    tree = json.loads(text)
    values = [None, -1, 2**63, 1.5, "x", "", [], {}, True, "\ud800", {"type": "Nope"}, [[1, 2]], 10**9]

    def walk(node, depth=0):  # replace one value somewhere in the tree
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            return
        key = keys[int(rng.integers(len(keys)))]
        if depth > 1 and rng.random() < 0.4 or not isinstance(node[key], (dict, list)):
            node[key] = values[int(rng.integers(len(values)))]
        else:
            walk(node[key], depth + 1)

    walk(tree)
    return json.dumps(tree)


TOKENIZER_TEXTS = ["", "Hello, world!", "  Two  spaces\tand\nlines ", "Café naïve 中文 😀\u200d!", "[CLS] [MASK] x",
                   "a" * 300]


def fuzz_tokenizers(rng, count, folder):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cpp", "fuzz"))
    import make_tokenizer_seeds  # needs the tokenizers package (a test-only reference)

    make_tokenizer_seeds.main(folder)
    sources = [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder))]
    good = [cpuformer.Tokenizer.from_str(src) for src in sources]
    for n in range(count):
        if n % 3:  # a damaged file
            text = mutate_json_text(rng, sources[n % len(sources)])

            def go():
                tok = cpuformer.Tokenizer.from_str(text)
                for t in TOKENIZER_TEXTS:
                    enc = tok.encode(t, "pair" if rng.random() < 0.3 else None)
                    tok.decode(enc.ids)
            run_case(n, f"Tokenizer.from_str(mutation of source {n % len(sources)})", go)
        else:  # bad arguments to a good tokenizer
            tok = good[n % len(good)]
            bad = BAD_SCALARS[int(rng.integers(len(BAD_SCALARS)))]
            calls = [lambda: tok.encode(bad), lambda: tok.encode("x", bad), lambda: tok.decode([bad]),
                     lambda: tok.decode(bad_ids(rng, np.arange(3), [])), lambda: tok.encode_batch([bad, "x"]),
                     lambda: tok.id_to_token(bad), lambda: tok.token_to_id(bad),
                     lambda: tok.enable_truncation(bad), lambda: tok.enable_padding(length=bad),
                     lambda: tok(["a", "b c"], padding=bad, truncation=True, max_length=4, return_tensors="np"),
                     lambda: tok("\ud800"), lambda: tok.encode("a\x00b" * 50)]
            i = int(rng.integers(len(calls)))
            run_case(n, f"tokenizer call {i} with {bad!r}", calls[i])
            tok.no_padding()
            tok.no_truncation()


if __name__ == "__main__":
    kind, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    nn.init.manual_seed(seed)
    warnings.simplefilter("ignore", RuntimeWarning)  # NaN/inf inputs are the point here
    if kind == "ops":
        fuzz_ops(rng, count)
    elif kind == "layers":
        fuzz_layers(rng, count)
    elif kind == "models":
        fuzz_models(rng, count)
    elif kind == "files":
        fuzz_files(rng, count, sys.argv[4])
    elif kind == "tokenizers":
        fuzz_tokenizers(rng, count, sys.argv[4])
    else:
        raise SystemExit(f"unknown kind {kind}")
    print("DONE", flush=True)
