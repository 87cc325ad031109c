"""Continuous batching (_core._DecoderBatch + _TokenSampler, what the server's generation loop runs): sequences that
join and leave a shared batch get exactly what generate() gives each of them alone."""
from __future__ import annotations

import pytest

from cpuformer import _core

from hf_testlib import load, rand_ids

pytest.importorskip("transformers")


def _run_batched(model, prompts, new_tokens, samplers, slots=3, join_every=2):
    """Prompts join a batch of `slots` slots one every `join_every` steps (as requests arrive); each leaves after
    its new_tokens. Returns each prompt's generated tokens."""
    batch = _core._DecoderBatch(model._core, slots, 64)
    pending = list(range(len(prompts)))
    active = {}  # slot -> [prompt index, last token, produced]
    out = {i: [] for i in range(len(prompts))}
    step = 0
    while pending or active:
        free = [s for s in range(slots) if s not in active]
        if pending and free and step % join_every == 0:
            i = pending.pop(0)
            logits = batch.prefill(free[0], list(prompts[i]), new_tokens[i])
            tok = samplers[i].next(logits)
            out[i].append(tok)
            active[free[0]] = [i, tok]
        elif active:
            slots_now = sorted(active)
            logits = batch.step(slots_now, [active[s][1] for s in slots_now])
            for row, s in enumerate(slots_now):
                i = active[s][0]
                tok = samplers[i].next(logits[row])
                out[i].append(tok)
                active[s][1] = tok
        for s in [s for s, (i, _) in active.items() if len(out[i]) >= new_tokens[i]]:
            del active[s]
        step += 1
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_joining_and_leaving_equals_generate_alone(request, name):
    path, _ = request.getfixturevalue(name)
    model = load(path)
    V = model._core.vocab_size
    lengths, news = [5, 9, 3, 7, 11], [6, 3, 8, 5, 4]
    prompts = [rand_ids(40 + i, (n,), 3, V - 3) for i, n in enumerate(lengths)]
    greedy = [_core._TokenSampler() for _ in prompts]
    got = _run_batched(model, prompts, news, greedy)
    for i, p in enumerate(prompts):
        want = model.generate(p[None], max_new_tokens=news[i], eos_token_id=[])[0, len(p):]
        assert got[i] == list(want), f"prompt {i}: batched {got[i]} vs alone {list(want)}"


def test_sampling_with_a_seed_equals_generate(llama):
    model = load(llama[0])
    V = model._core.vocab_size
    prompts = [rand_ids(60 + i, (n,), 3, V - 3) for i, n in enumerate([4, 6, 8])]
    samplers = [_core._TokenSampler(True, 0.8, 20, 0.9, 100 + i) for i in range(3)]
    got = _run_batched(model, prompts, [7, 7, 7], samplers, slots=2, join_every=1)
    for i, p in enumerate(prompts):
        want = model.generate(p[None], max_new_tokens=7, eos_token_id=[], do_sample=True, temperature=0.8, top_k=20,
                              top_p=0.9, seed=100 + i)[0, len(p):]
        assert got[i] == list(want)


def test_decoder_batch_rejects_bad_calls(llama):
    model = load(llama[0])
    batch = _core._DecoderBatch(model._core, 2, 16)
    with pytest.raises(ValueError, match="slot 5 out of range"):
        batch.prefill(5, [1, 2], 4)
    with pytest.raises(ValueError, match="capacity"):
        batch.prefill(0, list(range(1, 14)), 8)
    with pytest.raises(ValueError, match="not prefilled"):
        batch.step([1], [3])
    batch.prefill(0, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.step([0], [10 ** 6])
    with pytest.raises(ValueError, match="listed twice"):
        batch.step([0, 0], [3, 4])
    with pytest.raises(ValueError, match="top_p"):
        _core._TokenSampler(True, 1.0, 0, 1.5, 0)


def test_decoder_batch_needs_a_decoder(bert_model):
    with pytest.raises(ValueError, match="not a decoder"):
        _core._DecoderBatch(load(bert_model[0])._core, 1, 4)
