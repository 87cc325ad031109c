"""Load: 64 concurrent clients, ~150 mixed requests (embeddings, streamed and non-streamed completions, chat,
malformed bodies, streams the client abandons): no 5xx, every valid greedy answer equal to the request alone, and the
engine empty afterwards."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from serving_testlib import RunningServer, httpx, wait_until

PROMPTS = ["the cat sat on", "a dog ran in the park", "we walked home under", "numbers like 42",
           "she said the movie", "it is a truly"]
TEXTS = ["The cat sits outside", "A man is playing guitar", "I love pasta", "Do you like pizza?",
         "The new movie is awesome", "The weather is nice today"]
MAX_TOKENS = 8


def _expected(model, prompt):
    ids = model.tokenizer.encode(prompt).ids
    out = model.generate(np.asarray([ids]), max_new_tokens=MAX_TOKENS)[0, len(ids):].tolist()
    eos = set(model._core.eos_token_ids)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return model.tokenizer.decode(out[:cut])


async def _sse_text(response):
    text = ""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            text += ev["choices"][0]["text"]
    return text


def test_mixed_load(llama_dir, minilm_dir):
    from cpuformer.models import SentenceEncoder
    gen = RunningServer(llama_dir, model_name="llm", max_batch=8, max_queue=256, max_output_tokens=16,
                        max_input_tokens=48)
    emb = RunningServer(minilm_dir, model_name="emb", max_queue=256, embed_batch=16)
    try:
        want_text = {p: _expected(gen.state.model, p) for p in PROMPTS}
        want_emb = dict(zip(TEXTS, SentenceEncoder.from_pretrained(minilm_dir).encode(TEXTS)))
        kinds = ["embed", "complete", "stream", "malformed", "cancel", "complete", "stream", "embed", "chat"]
        jobs = [(kinds[i % len(kinds)], i) for i in range(150)]
        statuses, failures = [], []

        async def one(client, kind, i):
            p, t = PROMPTS[i % len(PROMPTS)], TEXTS[i % len(TEXTS)]
            body = {"model": "llm", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
            if kind == "embed":
                r = await client.post(emb.url + "/v1/embeddings", json={"model": "emb", "input": t,
                                                                        "encoding_format": "float"})
                statuses.append(r.status_code)
                if not np.allclose(r.json()["data"][0]["embedding"], want_emb[t], rtol=0, atol=2e-6):
                    failures.append((kind, i))
            elif kind == "complete":
                r = await client.post(gen.url + "/v1/completions", json=body)
                statuses.append(r.status_code)
                if r.json()["choices"][0]["text"] != want_text[p]:
                    failures.append((kind, i, r.json()["choices"][0]["text"], want_text[p]))
            elif kind == "stream":
                async with client.stream("POST", gen.url + "/v1/completions", json={**body, "stream": True}) as r:
                    statuses.append(r.status_code)
                    text = await _sse_text(r)
                if text != want_text[p]:
                    failures.append((kind, i, text, want_text[p]))
            elif kind == "chat":
                r = await client.post(gen.url + "/v1/chat/completions", json={
                    "model": "llm", "messages": [{"role": "user", "content": p}], "max_tokens": MAX_TOKENS,
                    "temperature": 0, "seed": i})
                statuses.append(r.status_code)
                assert r.json()["choices"][0]["message"]["role"] == "assistant"
            elif kind == "malformed":
                bad = [b"{", json.dumps({"model": "llm", "prompt": p, "n": 3}).encode(),
                       json.dumps({"model": "llm", "messages": "x"}).encode(),
                       json.dumps({"model": "emb", "input": [None]}).encode()][i % 4]
                url = gen.url + ("/v1/chat/completions" if i % 4 == 2 else "/v1/completions")
                if i % 4 == 3:
                    url = emb.url + "/v1/embeddings"
                r = await client.post(url, content=bad, headers={"content-type": "application/json"})
                statuses.append(r.status_code)
                if r.status_code != 400:
                    failures.append((kind, i, r.status_code))
            else:  # cancel: read the first event of a stream, then hang up
                async with client.stream("POST", gen.url + "/v1/completions",
                                         json={**body, "max_tokens": 16, "stream": True}) as r:
                    statuses.append(r.status_code)
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break

        async def main():
            sem = asyncio.Semaphore(64)
            limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                async def guarded(kind, i):
                    async with sem:
                        await one(client, kind, i)
                await asyncio.gather(*(guarded(k, i) for k, i in jobs))

        t0 = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - t0
        assert len(statuses) == len(jobs)
        assert not [s for s in statuses if s >= 500]
        assert not failures, failures[:5]
        assert wait_until(lambda: gen.engine.active_count == 0 and gen.engine.waiting_count == 0)
        assert elapsed < 60, elapsed
        # the engine is still healthy
        r = httpx.post(gen.url + "/v1/completions", json={"model": "llm", "prompt": PROMPTS[0],
                                                           "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.json()["choices"][0]["text"] == want_text[PROMPTS[0]]
    finally:
        gen.stop()
        emb.stop()
