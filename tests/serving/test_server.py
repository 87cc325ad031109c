"""The OpenAI-compatible server against the official openai client: embeddings equal SentenceEncoder.encode,
greedy completions equal model.generate, chat through the template, streaming, stop strings, errors, limits."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from serving_testlib import RunningServer, httpx, wait_until

openai = pytest.importorskip("openai")


def expected_text(model, ids, max_tokens, **kw):
    """What the server must answer: generate() alone, cut before the first eos, decoded."""
    out = model.generate(np.asarray([ids]), max_new_tokens=max_tokens, **kw)[0, len(ids):].tolist()
    eos = set(model._core.eos_token_ids)
    for i, t in enumerate(out):
        if t in eos:
            return model.tokenizer.decode(out[:i]), "stop"
    return model.tokenizer.decode(out), "length"


PROMPTS = ["the cat sat on", "a dog ran in the park", "we walked home under", "numbers like 42",
           "she said the movie", "it is a truly"]


# ---------------------------------------------------------------------------------------------- embeddings

def test_embeddings_equal_sentence_encoder(minilm_server, minilm_dir):
    from cpuformer.models import SentenceEncoder
    enc = SentenceEncoder.from_pretrained(minilm_dir)
    client = minilm_server.client()
    texts = ["The cat sits outside", "A man is playing guitar", "I love pasta", "Ünïcödé tëxt ✓"]
    want = enc.encode(texts)
    got = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, rtol=0, atol=2e-6)
    floats = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], rtol=0, atol=2e-6)
    counts = [len(ids) for ids in enc.tokenizer(texts)["input_ids"]]
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(counts)


def test_concurrent_embeddings_are_batched(minilm_server, minilm_dir):
    from cpuformer.models import SentenceEncoder
    enc = SentenceEncoder.from_pretrained(minilm_dir)
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(24)]
    before = minilm_server.engine.batches
    results = [None] * len(texts)

    def one(i):
        r = httpx.post(minilm_server.url + "/v1/embeddings", json={"model": "minilm", "input": texts[i]}, timeout=30)
        results[i] = r.json()["data"][0]["embedding"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.array(results), enc.encode(texts), rtol=0, atol=2e-6)
    assert minilm_server.engine.batches - before < len(texts)  # some requests shared a batch


def test_embeddings_errors(minilm_server):
    url = minilm_server.url + "/v1/embeddings"
    cases = [({"model": "minilm", "input": ""}, 400, "input"), ({"model": "minilm", "input": []}, 400, "input"),
             ({"model": "minilm", "input": [1, 2]}, 400, "input"), ({"model": "minilm"}, 400, "input"),
             ({"model": "other", "input": "x"}, 404, "model"), ({"input": "x"}, 400, "model"),
             ({"model": "minilm", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
             ({"model": 3, "input": "x"}, 400, "model")]
    for body, status, param in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(minilm_server.url + "/v1/completions", json={"model": "minilm", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"


# ---------------------------------------------------------------------------------------------- completions

def test_models_and_health(llama_server):
    assert httpx.get(llama_server.url + "/health").json()["status"] == "ok"
    models = llama_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    r = httpx.get(llama_server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_greedy_completions_equal_generate(llama_server):
    model = llama_server.state.model
    client = llama_server.client()
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt).ids
        for n in (1, 7, 20):
            want, reason = expected_text(model, ids, n)
            got = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=n, temperature=0)
            assert got.choices[0].text == want, (prompt, n)
            assert got.choices[0].finish_reason == reason
            assert got.usage.prompt_tokens == len(ids)
    ids = model.tokenizer.encode(PROMPTS[0]).ids
    got = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=9, temperature=0)
    assert got.choices[0].text == expected_text(model, ids, 9)[0]


def test_seeded_sampling_equals_generate(llama_server):
    model = llama_server.state.model
    client = llama_server.client()
    ids = model.tokenizer.encode(PROMPTS[1]).ids
    for seed in (0, 7, 12345):
        want, _ = expected_text(model, ids, 12, do_sample=True, temperature=0.9, top_p=0.95, seed=seed)
        got = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=12, temperature=0.9,
                                        top_p=0.95, seed=seed)
        assert got.choices[0].text == want


def test_gpt2_completions(gpt2_dir):
    server = RunningServer(gpt2_dir, model_name="g", max_batch=2, max_output_tokens=16, max_input_tokens=32)
    try:
        model = server.state.model
        client = server.client()
        for prompt in PROMPTS[:3]:
            ids = model.tokenizer.encode(prompt).ids
            want, reason = expected_text(model, ids, 16)
            got = client.completions.create(model="g", prompt=prompt, max_tokens=16, temperature=0)
            assert (got.choices[0].text, got.choices[0].finish_reason) == (want, reason)
    finally:
        server.stop()


def test_chat_completion_uses_the_template(llama_server, llama_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = llama_server.state.model
    messages = [{"role": "system", "content": "you are a helpful assistant ."},
                {"role": "user", "content": "hello there , how are you ?"},
                {"role": "assistant", "content": "the cat sat on the mat ."},
                {"role": "user", "content": "tell me a story about the cat ."}]
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    want, reason = expected_text(model, ids, 15)
    got = llama_server.client().chat.completions.create(model="tiny-llama", messages=messages, max_tokens=15,
                                                        temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == reason
    assert got.usage.prompt_tokens == len(ids)
    # content parts are joined text
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there , how are you ?"}]}]
    a = llama_server.client().chat.completions.create(model="tiny-llama", messages=parts, max_tokens=5,
                                                      temperature=0)
    b = llama_server.client().chat.completions.create(model="tiny-llama", messages=[
        {"role": "user", "content": "hello there , how are you ?"}], max_tokens=5, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_concatenates_to_the_text(llama_server):
    client = llama_server.client()
    for prompt in PROMPTS[:4]:
        full = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    msgs = [{"role": "user", "content": "what is 42 ?"}]
    full = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the raw stream ends with [DONE]
    with httpx.stream("POST", llama_server.url + "/v1/completions",
                      json={"model": "tiny-llama", "prompt": "the cat", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_strings(llama_server):
    client = llama_server.client()
    model = llama_server.state.model
    prompt = PROMPTS[0]
    ids = model.tokenizer.encode(prompt).ids
    full, _ = expected_text(model, ids, 24)
    assert len(full) > 12
    for stop in (full[5:8], [full[10:12], "zzzz"], full[3:4]):
        stops = [stop] if isinstance(stop, str) else stop
        cut = min(full.find(s) for s in stops if s in full)
        got = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
        assert got.choices[0].text == full[:cut] and got.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0,
                                                stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    got = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stop="qqq")
    assert got.choices[0].text == full


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny-llama", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny-llama", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "tiny-llama", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-llama", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny-llama", "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": "tiny-llama", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "tiny-llama", "prompt": "the cat " * 80}, 400, "prompt"),
    ({"model": "tiny-llama", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny-llama", "prompt": [10 ** 9]}, 400, "prompt"),
    ({"model": "tiny-llama", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "tiny-llama", "prompt": {"a": 1}}, 400, "prompt"),
    ({"model": "tiny-llama"}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_completion_errors(llama_server, body, status, param):
    r = httpx.post(llama_server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [None, [], "hi", [{"role": "user"}], [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": 5}], [{"role": "tool", "content": "x"}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]])
def test_chat_errors(llama_server, messages):
    body = {"model": "tiny-llama", "max_tokens": 2}
    if messages is not None:
        body["messages"] = messages
    r = httpx.post(llama_server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("messages")


def test_bad_bodies_are_4xx(llama_server):
    url = llama_server.url + "/v1/chat/completions"
    for raw in (b"", b"[1, 2]", b"\xff\xfe", b"null", b'{"model": "tiny-llama", "messages": [{"role": "user", '):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(url).status_code == 405
    assert llama_server.engine.active_count == 0


def test_queue_full_is_429(llama_dir):
    server = RunningServer(llama_dir, model_name="m", max_batch=1, max_queue=2, max_output_tokens=8,
                           max_input_tokens=16)
    try:
        server.engine.pause()
        results = []

        def one():
            r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "the cat", "max_tokens": 4,
                                                                 "temperature": 0}, timeout=30)
            results.append(r)
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: server.engine.waiting_count == 2)
        with pytest.raises(openai.RateLimitError) as info:
            server.client().completions.create(model="m", prompt="the cat", max_tokens=4)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "rate_limit_exceeded"
        server.engine.resume()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200, 200]
        assert results[0].json()["choices"][0]["text"] == results[1].json()["choices"][0]["text"]
    finally:
        server.stop()


def test_api_key(llama_dir):
    server = RunningServer(llama_dir, model_name="m", api_key="sekret", max_output_tokens=8, max_input_tokens=16)
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open
        got = server.client(api_key="sekret").completions.create(model="m", prompt="the cat", max_tokens=3)
        assert got.usage.completion_tokens >= 1
    finally:
        server.stop()


def test_disconnect_mid_stream_frees_the_slot(llama_server):
    engine = llama_server.engine
    engine.step_delay = 0.05  # 24 tokens take > 1 s: the client leaves long before the end
    try:
        cancelled = engine.cancelled
        with httpx.stream("POST", llama_server.url + "/v1/completions",
                          json={"model": "tiny-llama", "prompt": "the cat", "max_tokens": 24, "temperature": 0,
                                "stream": True, "stop": "impossible stop"}) as r:
            it = r.iter_lines()
            first = next(line for line in it if line)
            assert first.startswith("data: ")
            assert engine.active_count == 1
        assert wait_until(lambda: engine.active_count == 0, timeout=5)
        assert engine.cancelled == cancelled + 1
    finally:
        engine.step_delay = 0.0
    got = llama_server.client().completions.create(model="tiny-llama", prompt="the cat", max_tokens=5,
                                                   temperature=0)
    assert got.choices[0].finish_reason in ("length", "stop")
    assert engine.active_count == 0


def test_timeout(llama_dir):
    server = RunningServer(llama_dir, model_name="m", timeout=0.3, max_output_tokens=24, max_input_tokens=16)
    try:
        server.engine.step_delay = 0.1
        r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "the cat", "max_tokens": 24,
                                                             "temperature": 0, "stop": "impossible stop"}, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        assert wait_until(lambda: server.engine.active_count == 0)
    finally:
        server.stop()


def test_client_gone_before_a_plain_answer_frees_the_slot(llama_server):
    engine = llama_server.engine
    engine.step_delay = 0.05
    try:
        cancelled = engine.cancelled
        with pytest.raises(httpx.TimeoutException):
            httpx.post(llama_server.url + "/v1/completions", timeout=0.3,
                       json={"model": "tiny-llama", "prompt": "the cat", "max_tokens": 24, "temperature": 0,
                             "stop": "impossible stop"})
        assert wait_until(lambda: engine.active_count == 0, timeout=3)  # long before its 24 steps (1.2 s)
        assert engine.cancelled == cancelled + 1
    finally:
        engine.step_delay = 0.0


def test_an_error_fails_only_its_request(llama_server):
    """Requests put straight into the engine: a prompt the DecoderBatch refuses fails alone; the others are served."""
    import asyncio
    from cpuformer.serving.engine import GenerationRequest
    engine, model = llama_server.engine, llama_server.state.model
    ids = model.tokenizer.encode(PROMPTS[2]).ids

    async def go():
        loop = asyncio.get_running_loop()
        good = [GenerationRequest(loop, ids, 6, model.tokenizer, temperature=0) for _ in range(2)]
        bad = GenerationRequest(loop, [10 ** 6], 6, model.tokenizer, temperature=0)
        for r in (good[0], bad, good[1]):
            engine.submit(r)
        out = []
        for r in (good[0], bad, good[1]):
            evs = []
            while not evs or evs[-1][0] not in ("done", "error"):
                evs.append(await r.events.get())
            out.append(evs)
        return out
    g0, b, g1 = asyncio.run(go())
    want, reason = expected_text(model, ids, 6)
    for evs in (g0, g1):
        assert "".join(e[1] for e in evs if e[0] == "text") == want and evs[-1][:2] == ("done", reason)
    assert b[-1][0] == "error" and b[-1][1] == 400 and "vocabulary" in b[-1][2]
    assert engine.active_count == 0
