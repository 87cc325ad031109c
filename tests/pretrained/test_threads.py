"""One loaded Hugging Face model called from 8 Python threads at once (the bindings release the GIL) gives exactly
the results of sequential calls: encoder forward passes, decoder generation (greedy and seeded sampling, padded
batches) and encoder-decoder greedy and beam search."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_testlib import V, load, left_padded, rand_ids, right_padded  # noqa: E402

THREADS = 8


def _hammer(call, inputs, rounds):
    """Every thread runs call(inputs[j]) for all j (each thread from its own starting point, all started together);
    returns {j: [results]}."""
    results = {j: [] for j in range(len(inputs))}
    errors = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def work(i):
        try:
            start.wait()
            for r in range(rounds):
                for k in range(len(inputs)):
                    j = (i + r + k) % len(inputs)
                    out = call(inputs[j])
                    with lock:
                        results[j].append(out)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    return results


def _check(call, inputs, rounds=3):
    refs = [call(x) for x in inputs]  # sequential first
    results = _hammer(call, inputs, rounds)
    for j, ref in enumerate(refs):
        assert len(results[j]) == THREADS * rounds
        for out in results[j]:
            if isinstance(ref, tuple):
                for a, b in zip(out, ref):
                    np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_array_equal(out, ref)
    return refs


def _batches(seed, B, T, lo=3, hi=V):
    return [rand_ids(seed + i, (B, T), lo, hi) for i in range(4)]


@pytest.mark.parametrize("name", ["bert_seqcls", "bert_qa", "roberta_model", "distilbert_seqcls"])
def test_encoder_forward_from_many_threads(name, request):
    model = load(request.getfixturevalue(name)[0])
    inputs = []
    for i, ids in enumerate(_batches(10, 3, 12)):
        ids, mask = right_padded(ids, [12, 7 - i % 3, 3], model._core.pad_token_id)
        inputs.append((ids, mask))
    _check(lambda a: model(a[0], attention_mask=a[1]), inputs)
    _check(lambda a: model.hidden_states(a[0], attention_mask=a[1]), inputs)


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_decoder_generation_from_many_threads(name, request):
    model = load(request.getfixturevalue(name)[0])
    inputs = []
    for i, ids in enumerate(_batches(20, 2, 6)):
        ids, mask = left_padded(ids, [6, 3 + i % 3], 0)
        inputs.append((ids, mask))
    greedy = _check(lambda a: model.generate(a[0], 10, attention_mask=a[1], eos_token_id=[]), inputs)
    assert all(g.shape == (2, 16) for g in greedy)
    _check(lambda a: model.generate(a[0], 8, attention_mask=a[1], do_sample=True, top_k=20, temperature=0.9,
                                    seed=7), inputs)
    _check(lambda a: model(a[0], attention_mask=a[1]), inputs)


@pytest.mark.parametrize("name", ["t5", "marian", "bart"])
def test_seq2seq_beam_search_from_many_threads(name, request):
    model = load(request.getfixturevalue(name)[0])
    pad = model._core.pad_token_id
    inputs = []
    for i, ids in enumerate(_batches(30, 2, 9, hi=V - 1)):
        ids, mask = right_padded(ids, [9, 4 + i % 4], pad)
        inputs.append((ids, mask))
    beams = _check(lambda a: model.generate(a[0], 8, attention_mask=a[1], num_beams=3), inputs, rounds=2)
    assert all(b.shape[0] == 2 for b in beams)
    _check(lambda a: model.generate(a[0], 8, attention_mask=a[1]), inputs, rounds=2)


def test_vit_from_many_threads(vit_cls):
    model = load(vit_cls[0])
    inputs = [np.random.default_rng(i).standard_normal((2, 3, 32, 32)).astype(np.float32) for i in range(4)]
    _check(model, inputs)


def test_mixed_calls_on_one_model_from_many_threads(t5):
    """Greedy, beam search and logits of one model interleaved across threads."""
    model = load(t5[0])
    src = rand_ids(40, (2, 7), 3, V)
    dec = rand_ids(41, (2, 4), 3, V)
    calls = [lambda: model.generate(src, 6, num_beams=4), lambda: model.generate(src, 6),
             lambda: model(src, decoder_input_ids=dec), lambda: model.encoder_hidden_states(src)]
    _check(lambda k: calls[k](), list(range(len(calls))), rounds=3)
