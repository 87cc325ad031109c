"""Regression tests for the reliability issue: thread-safe inference, aliasing outputs, exact gradient shapes, bad
arguments that used to be accepted or to raise the wrong exception, and damaged model files. Each test failed on
the code before the fix."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import cpuformer
from cpuformer import models, nn, ops
from cpuformer.io import SafetensorsError, load_safetensors, save_safetensors
from cpuformer.nn.module import Workspace


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------- concurrent inference

def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    return a == b  # token lists


def _hammer(call, inputs, refs, threads=6, rounds=40):
    """Call from several threads at once (started together); count results that differ from the single-thread
    reference for the same input."""
    bad = []
    start = threading.Barrier(threads)

    def work(i):
        start.wait()
        for _ in range(rounds):
            if not _same(call(inputs[i % len(inputs)]), refs[i % len(refs)]):
                bad.append(i)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(bad)


def _models():
    nn.init.manual_seed(0)
    return {
        "gpt": models.GPT(64, block_size=32, n_layer=2, n_head=4, n_embd=64),
        "classifier": models.TransformerClassifier(64, 3, d_model=64, nhead=4, num_layers=2, dim_feedforward=256,
                                                   max_len=32),
        "bert": models.BertModel(64, 64, 2, 4, 256, 32),
        "seq2seq": models.Seq2SeqTransformer(64, 64, d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                             dim_feedforward=256, max_len=32),
    }


@pytest.mark.parametrize("variant", ["float", "frozen", "int8"])
@pytest.mark.parametrize("name", ["gpt", "classifier", "bert", "seq2seq"])
def test_one_eval_model_called_from_many_threads_gives_the_single_thread_results(name, variant):
    model = _models()[name].eval()
    if variant == "frozen":
        model = cpuformer.freeze(model)
    elif variant == "int8":
        model = cpuformer.quantize_dynamic(model)
    # Same shapes in every thread: the shared feed-forward scratch was reused across threads at one shape.
    xs = [np.random.default_rng(i).integers(1, 64, (2, 16)) for i in range(6)]
    call = (lambda x: model(x, x)) if name == "seq2seq" else model
    refs = [call(x) for x in xs]
    assert _hammer(call, xs, refs) == 0


def test_generation_and_translation_from_many_threads():
    ms = _models()
    gpt, s2s = ms["gpt"].eval(), ms["seq2seq"].eval()
    prompts = [np.random.default_rng(i).integers(1, 64, (1, 5)) for i in range(4)]
    refs = [gpt.generate(p, 8, seed=0) for p in prompts]
    assert _hammer(lambda p: gpt.generate(p, 8, seed=0), prompts, refs, threads=4, rounds=5) == 0
    srcs = [np.random.default_rng(i).integers(4, 64, (2, 7)) for i in range(4)]
    refs = [s2s.translate(s, max_len=6) for s in srcs]
    assert _hammer(lambda s: s2s.translate(s, max_len=6), srcs, refs, threads=4, rounds=5) == 0


def test_kernels_from_many_threads_match_single_thread(rng):
    q, k, v = randn(rng, 2, 33, 16), randn(rng, 2, 21, 16), randn(rng, 2, 21, 16)
    w1, w2 = randn(rng, 40, 16), randn(rng, 16, 40)
    calls = [lambda: ops.attention(q, k, v, 4, is_causal=True)[0], lambda: ops.matmul(q[0], w1, transpose_b=True),
             lambda: ops.feed_forward(q, w1, None, w2, None, "gelu")[0], lambda: ops.layer_norm(q),
             lambda: ops.softmax(q)]
    refs = [c() for c in calls]
    assert _hammer(lambda i: calls[i](), list(range(len(calls))), refs, threads=5, rounds=30) == 0


def test_workspace_arrays_are_per_thread():
    ws = Workspace()
    mine = ws.get("u", (4, 8))
    assert ws.get("u", (4, 8)) is mine  # reused within a thread (no page faults every step)
    other = []
    t = threading.Thread(target=lambda: other.append(ws.get("u", (4, 8))))
    t.start()
    t.join()
    assert other[0] is not mine and not np.shares_memory(other[0], mine)


def test_training_mode_refuses_a_second_thread():
    nn.init.manual_seed(0)
    model = models.GPT(32, block_size=8, n_layer=1, n_head=2, n_embd=16)  # training mode
    ids = np.ones((2, 8), np.int64)
    logits = model(ids)
    error = []

    def other():
        try:
            model.backward(np.ones_like(logits))
        except RuntimeError as exc:
            error.append(str(exc))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert error and "another thread" in error[0]
    model.backward(np.ones_like(logits))  # the forward's own thread may


def test_a_training_forward_refuses_a_concurrent_one():
    started, release = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def forward(self, x):
            started.set()
            release.wait(10)
            return x

    layer = Slow()  # training mode
    t = threading.Thread(target=layer, args=(np.ones(3, np.float32),))
    t.start()
    started.wait(10)
    try:
        with pytest.raises(RuntimeError, match="already running in another thread"):
            layer(np.ones(3, np.float32))
    finally:
        release.set()
        t.join()
    layer(np.ones(3, np.float32))  # once the other forward has finished
    layer._training_call = (-1, 1)  # as if another thread's forward were running: eval-mode calls go on
    layer.eval()
    layer(np.ones(3, np.float32))


# -------------------------------------------------------------------------------------------------- aliasing

def test_outputs_that_alias_inputs_are_refused(rng):
    a, b = randn(rng, 4, 4), randn(rng, 4, 4)
    with pytest.raises(ValueError, match="out must not share memory with b"):
        ops.gemm(a, b, b, beta=1.0)
    with pytest.raises(ValueError, match="out must not share memory with a"):
        ops.gemm(a[:, :4], b, a)
    q = randn(rng, 1, 4, 8)
    o, lse = ops.attention(q, q, q, 2, need_lse=True)
    buf = np.zeros_like(q)
    with pytest.raises(ValueError, match="grad_key and grad_value must not share memory"):
        ops.attention_backward(q, q, q, q, o, lse, 2, grad_key=buf, grad_value=buf)
    qc = q.copy()
    with pytest.raises(ValueError, match="grad_query must not share memory with query"):
        ops.attention_backward(np.ones_like(q), qc, q.copy(), q.copy(), o, lse, 2, grad_query=qc)
    p = randn(rng, 5)
    with pytest.raises(ValueError, match="param must not share memory with grad"):
        ops.adamw_step(p, p, np.zeros(5, np.float32), np.zeros(5, np.float32), lr=0.1, step=1)
    m = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq must not share memory"):
        ops.adamw_step(randn(rng, 5), randn(rng, 5), m[:5], m[2:7], lr=0.1, step=1)
    w = randn(rng, 5, 3)
    with pytest.raises(ValueError, match="weight_grad must not share memory with grad_output"):
        ops.embedding_backward(w[:2], np.array([1, 2]), w)
    with pytest.raises(ValueError, match="bias_grad must not share memory"):
        ops.bias_grad(w, w[0])
    x, w1, w2 = randn(rng, 3, 4), randn(rng, 6, 4), randn(rng, 4, 6)
    out, u, act = ops.feed_forward(x, w1, None, w2, None)
    with pytest.raises(ValueError, match="grad_w1 must not share memory with w1"):
        ops.feed_forward_backward(np.ones_like(x), x, u, act, w1, w2, w1, None, np.zeros_like(w2), None)


def test_disjoint_strided_views_of_one_buffer_are_accepted(rng):
    # The fused QKV layout: dq, dk, dv are interleaved thirds of one (B, T, 3E) buffer and share no element.
    q, k, v = randn(rng, 2, 5, 8), randn(rng, 2, 5, 8), randn(rng, 2, 5, 8)
    o, lse = ops.attention(q, k, v, 2, need_lse=True)
    g = randn(rng, 2, 5, 8)
    fused = np.empty((2, 5, 24), np.float32)
    ops.attention_backward(g, q, k, v, o, lse, 2, grad_query=fused[..., :8], grad_key=fused[..., 8:16],
                           grad_value=fused[..., 16:])
    ref = ops.attention_backward(g, q, k, v, o, lse, 2)
    for i in range(3):
        np.testing.assert_array_equal(fused[..., 8 * i:8 * (i + 1)], ref[i])


def test_read_only_attention_inputs_are_accepted(rng):
    q = randn(rng, 1, 4, 8)
    ro = q.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(ops.attention(ro, ro, ro, 2)[0], ops.attention(q, q, q, 2)[0])
    np.testing.assert_array_equal(ops.attention_weights(ro, ro, 2), ops.attention_weights(q, q, 2))


# ---------------------------------------------------------------------------------------------- bad arguments

def test_generate_rejects_bad_ids_and_settings():
    nn.init.manual_seed(0)
    m = models.GPT(64, block_size=32, n_layer=1, n_head=4, n_embd=32).eval()
    with pytest.raises(IndexError, match="id -1 is out of range"):
        m.generate([[-1, 3]], 3)
    with pytest.raises(IndexError, match="id 64 is out of range"):
        m.generate([[1, 64]], 3)
    with pytest.raises(ValueError, match="temperature must be finite"):
        m.generate([[1, 3]], 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        m.generate([[1, 3]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate([[1, 3]], 3, top_p=float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        m.generate([[1, 3]], 3, top_k=0)
    with pytest.raises(TypeError, match="max_new_tokens"):
        m.generate([[1, 3]], 2.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate([[1, 3]], -1)
    with pytest.raises(ValueError, match="temperature must be finite"):
        models.gpt.sample_next(np.zeros((1, 4), np.float32), np.random.default_rng(0), float("nan"))


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_from_a_one_token_prompt(use_cache):
    nn.init.manual_seed(0)
    m = models.GPT(40, block_size=16, n_layer=2, n_head=2, n_embd=16).eval()
    out = m.generate([[5]], 6, greedy=True, use_cache=use_cache)
    assert out.shape == (1, 7) and out[0, 0] == 5
    ids = out[:, :1]
    for _ in range(6):  # greedy by hand, without the cache
        ids = np.concatenate([ids, m(ids)[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)


def test_gradients_must_have_exactly_the_output_shape(rng):
    lin = nn.Linear(3, 2)
    lin(randn(rng, 2, 3, 3))
    with pytest.raises(ValueError, match=r"Linear.backward: grad_output must have the forward output's shape \(2, 3, 2\)"):
        lin.backward(randn(rng, 3, 2, 2))  # same size, permuted
    emb = nn.Embedding(9, 3)
    emb(np.array([[1, 2], [3, 4], [5, 6]]))
    with pytest.raises(ValueError, match="ids.shape"):
        emb.backward(randn(rng, 2, 3, 3))
    with pytest.raises(ValueError, match="ids.shape"):
        ops.embedding_backward(randn(rng, 2, 3, 3), np.array([[1, 2], [3, 4], [5, 6]]), np.zeros((9, 3), np.float32))
    nn.init.manual_seed(0)
    gpt = models.GPT(10, block_size=8, n_layer=1, n_head=2, n_embd=8)
    gpt(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="GPT.backward"):
        gpt.backward(randn(rng, 3, 2, 10))
    pe = nn.PositionalEncoding(4, 8, learned=True)
    pe(randn(rng, 2, 3, 4))
    with pytest.raises(ValueError, match="PositionalEncoding.backward"):
        pe.backward(randn(rng, 3, 2, 4))
    drop = nn.Dropout(0.5)
    drop(randn(rng, 2, 3, 4))
    with pytest.raises(ValueError, match="Dropout.backward"):
        drop.backward(randn(rng, 3, 2, 4))


def test_zero_dimensional_inputs_are_not_reshaped(rng):
    with pytest.raises(ValueError, match="dimensions, got shape"):
        ops.softmax(1.5)
    with pytest.raises(ValueError, match="dimensions, got shape"):
        ops.layer_norm(np.float32(2.0))
    assert ops.embedding(3, randn(rng, 5, 4)).shape == (4,)  # as torch: a 0-d id gives one row


def test_nan_in_either_mask_is_refused(rng):
    q = randn(rng, 1, 4, 8)
    kp = np.zeros((1, 4), np.float32)
    kp[0, 1] = np.nan
    with pytest.raises(ValueError, match="key_padding_mask contains NaN"):
        ops.attention(q, q, q, 2, key_padding_mask=kp)
    am = np.zeros((4, 4), np.float32)
    am[1, 2] = np.nan
    with pytest.raises(ValueError, match="attn_mask contains NaN"):
        ops.attention(q, q, q, 2, attn_mask=am)
    am[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        ops.attention_weights(q, q, 2, attn_mask=am)
    kp[0, 1] = -np.inf  # -inf is a legitimate additive mask
    assert np.isfinite(ops.attention(q, q, q, 2, key_padding_mask=kp)[0]).all()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_max_len_is_one_rule(pooling):
    m = models.TransformerClassifier(10, 2, d_model=8, nhead=2, num_layers=1, dim_feedforward=8, max_len=3,
                                     pooling=pooling).eval()
    assert m(np.ones((1, 3), np.int64)).shape == (1, 2)
    with pytest.raises(ValueError, match="sequence length 4 exceeds max_len 3"):
        m(np.ones((1, 4), np.int64))


@pytest.mark.parametrize("fn", ["attention", "attention_weights", "attention_backward"])
@pytest.mark.parametrize("heads,error,match", [(0, ValueError, r"integer in \[1"), (-1, ValueError, r"integer in \[1"),
                                               (16, ValueError, "not divisible"), (2.0, TypeError, "int"),
                                               (True, TypeError, "int")])
def test_attention_num_heads_checked_before_use(rng, fn, heads, error, match):
    q = randn(rng, 1, 4, 8)
    o, lse = ops.attention(q, q, q, 2, need_lse=True)
    call = {"attention": lambda: ops.attention(q, q, q, heads),
            "attention_weights": lambda: ops.attention_weights(q, q, heads),
            "attention_backward": lambda: ops.attention_backward(q, q, q, q, o, lse, heads)}[fn]
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------ model files

def _edited(tmp_path, model, config_edit=None, raw_config=None, header_edit=None):
    src = str(tmp_path / "src.safetensors")
    cpuformer.save(model, src)
    tensors, meta = load_safetensors(src)
    config = json.loads(meta["config"])
    if config_edit:
        config.update(config_edit)
    meta["config"] = raw_config if raw_config is not None else json.dumps(config)
    dst = str(tmp_path / "bad.safetensors")
    save_safetensors(dst, tensors, meta)
    if header_edit:
        raw = open(dst, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header_edit(header)
        body = json.dumps(header).encode()
        open(dst, "wb").write(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    return dst


def _gpt(**kw):
    nn.init.manual_seed(0)
    return models.GPT(17, block_size=8, n_layer=2, n_head=2, n_embd=8, **kw)


def _first_tensor(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


@pytest.mark.parametrize("case,match", [
    (dict(raw_config="[" * 100000), "not valid JSON"),
    (dict(config_edit={"n_layer": 2**63}), "n_layer must be an integer"),
    (dict(config_edit={"n_layer": 10**5}), "n_layer is 100000 but the file holds layers"),
    (dict(config_edit={"n_layer": 10**9}), "n_layer is 1000000000"),
    (dict(config_edit={"block_size": 9}), "block_size is 9 but wpe.weight"),
    (dict(config_edit={"n_embd": True}), "n_embd must be an integer"),
    (dict(config_edit={"vocab_size": 10**9}), "vocab_size is 1000000000 but wte.weight"),
    (dict(config_edit={"dropout": float("nan")}), "dropout must be a finite number"),
    (dict(config_edit={"n_head": 3}), "n_head"),
    (dict(config_edit={"bogus": 1}), "does not take"),
    (dict(config_edit={"positional": "rope"}), "positional"),
    (dict(header_edit=lambda h: _first_tensor(h).update(shape=[2**64 + 16])), "bytes for shape"),
    (dict(header_edit=lambda h: _first_tensor(h).update(dtype={"a": 1})), "unsupported dtype"),
    (dict(header_edit=lambda h: _first_tensor(h).update(shape=[True, 16])), "bad shape"),
])
def test_damaged_model_files_raise_safetensors_error(tmp_path, case, match):
    path = _edited(tmp_path, _gpt(), **case)
    with pytest.raises(SafetensorsError, match=match):
        cpuformer.load(path)


def test_damaged_config_of_sinusoidal_and_classifier_files(tmp_path):
    with pytest.raises(SafetensorsError, match=r"block_size must be in \[1, 1048576\], got 100000000"):
        cpuformer.load(_edited(tmp_path, _gpt(positional="sinusoidal"), {"block_size": 10**8}))
    clf = models.TransformerClassifier(17, 3, d_model=8, nhead=2, num_layers=1, dim_feedforward=16, max_len=8)
    with pytest.raises(SafetensorsError, match="pad_id must be an integer"):
        cpuformer.load(_edited(tmp_path, clf, {"pad_id": -0.0}))
    with pytest.raises(SafetensorsError, match="pad_id"):
        cpuformer.load(_edited(tmp_path, clf, {"pad_id": 17}))
    # a file that passes every check still loads, bit-exact
    again = cpuformer.load(_edited(tmp_path, clf))
    np.testing.assert_array_equal(again.embedding.weight.data, clf.embedding.weight.data)
