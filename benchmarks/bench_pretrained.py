"""Hugging Face models loaded by cpuformer.models.from_pretrained, beside PyTorch+transformers, onnxruntime and
CTranslate2 on the same weights (issue 15).

Usage: python benchmarks/bench_pretrained.py [--threads 2] [--rounds 5] [--quick] [--only embed|decoder|translate]
                                             [--decoder-layers 24] [--cache DIR]
Models: random weights at real shapes, built locally with transformers from a config and written with
save_pretrained (safetensors) into --cache (default ~/.cache/cpuformer-bench; nothing is downloaded); ONNX exports
and CTranslate2 conversions of the same directories are made there too and reused by later runs.
Sections:
  embed      sentence embeddings (last hidden state, mean-pooled), MiniLM-shaped and BERT-base-shaped BERT, batch 1
             and 32, T=128; float32 and int8.
  decoder    a Qwen2-0.5B-shaped decoder with bf16 weights on disk: load time, RSS after load, prompt latency (128
             tokens, time to the first new token) and decode tokens/s (greedy, 64 new tokens, eos disabled).
  translate  a Marian-shaped translation model (opus-mt shape): sentences/s for 16 source sentences of 20-28 tokens,
             greedy and beam 4, 32 new tokens with eos disabled in every engine (so every engine decodes 32 steps).
Every engine/precision runs in its own fresh subprocess (its load time and RSS are its own; no engine's thread pool or
allocator shares a process with another's); the parent interleaves them round by round (rotating the order, pausing
before each switch, best of --reps per round, median over rounds: the protocol of benchmarks/_timing.py and
shared/design/kernels.md section 0). Each table has a calibration row: numpy float32 matmul GFLOP/s, timed in its own
subprocess inside the same rounds, so a drifting machine shows up there. Any engine that is not installed or fails to
load prints why and is skipped.
Memory: the workers of a section are alive together (interleaving needs that); the full decoder section holds about
10 GB (fp32 copies in torch, cpuformer and CTranslate2). The memory columns are per process, so unaffected by that.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import _loops_for, loadavg, peak_rss_kib  # noqa: E402

# ------------------------------------------------------------------------------------------------ configuration

EMBED_SHAPES = {  # name -> BertConfig fields
    "MiniLM": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, max_position_embeddings=512),
    "BERT-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=512),
}
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
                 hidden_act="silu", use_sliding_window=False)
MARIAN = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
              encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=58101, activation_function="swish",
              scale_embedding=True, static_position_embeddings=True, max_position_embeddings=512,
              pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100, forced_eos_token_id=None)
QUICK = {
    "embed": {"tiny-BERT": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                vocab_size=1000, max_position_embeddings=128)},
    "decoder": dict(QWEN2_05B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=1000, bos_token_id=999, eos_token_id=999),
    "marian": dict(MARIAN, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=1001,
                   pad_token_id=1000, decoder_start_token_id=1000),
}
PRECISION = {"fp32": "float32", "packed": "float32", "bf16": "bf16", "bf16act": "bf16", "int8": "int8"}


def kib_to_mib(k: float) -> float:
    return k / 1024.0  # peak_rss_kib() is in KiB


def statm_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------ building the models

class FakeTokenizer:
    """What CTranslate2's converters read from a tokenizer (the vocabulary and special tokens), for a random model
    with no real tokenizer: token i is "t<i>", the special tokens keep their ids."""

    def __init__(self, vocab_size: int, specials: dict) -> None:
        self.tokens = [f"t{i}" for i in range(vocab_size)]
        for attr, (tok, idx) in specials.items():
            if idx is not None and 0 <= idx < vocab_size:
                self.tokens[idx] = tok
            setattr(self, attr, tok if idx is not None and 0 <= idx < vocab_size else None)
        for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if not hasattr(self, attr):
                setattr(self, attr, None)
        self.special_tokens_map = {}

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}

    def convert_ids_to_tokens(self, i):
        return self.tokens[i]


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def build_dir(cache: str, kind: str, fields: dict, dtype: str = "float32") -> str:
    """A transformers model directory with random weights (seed 0) for this config, made once and reused."""
    out = os.path.join(cache, f"{kind}-{_digest([fields, dtype])}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**fields))  # with the pooler: CTranslate2 wants it
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    elif kind == "marian":
        model = transformers.MarianMTModel(transformers.MarianConfig(**fields))
    else:
        raise ValueError(kind)
    model.eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    print(f"  built {kind} {out} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def ct2_dir(src: str, quantization: str, specials: dict) -> str:
    """A CTranslate2 conversion of a transformers directory (made once); raises if the converter cannot do it."""
    out = f"{src}.ct2-{quantization}"
    if os.path.isfile(os.path.join(out, "model.bin")):
        return out
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            cfg = json.load(open(os.path.join(src, "config.json")))
            return FakeTokenizer(cfg["vocab_size"], specials)

        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if model.config.model_type == "bert" and not hasattr(model.config, "position_embedding_type"):
                model.config.position_embedding_type = "absolute"  # transformers 5 dropped it; the converter asserts
            return model

    t0 = time.perf_counter()
    Converter(src).convert(out, quantization=quantization, force=True)
    print(f"  converted to CTranslate2 {quantization}: {out} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def onnx_files(src: str, seq_len: int) -> dict:
    """torch.onnx.export of the transformers BertModel (last_hidden_state, dynamic batch and length), plus its
    onnxruntime dynamic int8 quantization. Returns {"fp32": path, "int8": path} for what worked; failures print."""
    out = {}
    fp32 = os.path.join(src, "model.onnx")
    if not os.path.isfile(fp32):
        try:
            import torch
            import transformers
            model = transformers.BertModel.from_pretrained(src).eval()
            model.config.return_dict = False
            ids = torch.ones(2, seq_len, dtype=torch.int64)

            class LastHidden(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.m(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids)[0]

            axes = {0: "batch", 1: "seq"}
            with torch.no_grad():
                torch.onnx.export(LastHidden(model), (ids, ids, ids * 0), fp32 + ".tmp", dynamo=False,
                                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                                  output_names=["last_hidden_state"], opset_version=17,
                                  dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                                "last_hidden_state": axes})
            os.replace(fp32 + ".tmp", fp32)
        except Exception as exc:  # noqa: BLE001 - an optional engine
            print(f"  onnx export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); ort skipped")
            return out
    out["fp32"] = fp32
    int8 = os.path.join(src, "model.int8.onnx")
    if not os.path.isfile(int8):
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(fp32, int8 + ".tmp.onnx", weight_type=QuantType.QInt8)
            os.replace(int8 + ".tmp.onnx", int8)
        except Exception as exc:  # noqa: BLE001
            print(f"  onnxruntime int8 quantization failed ({type(exc).__name__}: {exc}); ort int8 skipped")
            return out
    out["int8"] = int8
    return out


# ------------------------------------------------------------------------------------ engines (in the workers)

def set_threads(threads: int, torch_too: bool = False) -> None:
    if torch_too:
        import torch
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass


def load_engine(spec: dict):
    """Import the engine's libraries (before the RSS baseline) and return (load function, run function maker)."""
    eng, section, threads = spec["engine"], spec["section"], spec["threads"]
    lib = eng.split("-")[0]
    if lib == "calib":
        import numpy as np
        n = spec["calib_n"]
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        return (lambda: None), (lambda model, case: ((lambda: a @ a), None)), {}
    import numpy as np
    if lib == "cpf":
        import cpuformer
        from cpuformer.models import from_pretrained
        from cpuformer.models.pretrained import mean_pool
        cpuformer.set_num_threads(threads)
        prec = eng.split("-")[1]
        kw = {"fp32": dict(dtype="float32"), "packed": dict(dtype="float32", weights="packed"),
              "bf16": dict(dtype=None), "bf16act": dict(dtype=None, activations="bfloat16"),
              "int8": dict(dtype=None, weights="int8")}[prec]

        def load():
            return from_pretrained(spec["dir"], **kw)

        def case(m, c):
            ids, mask = np.array(c["ids"], np.int64), np.array(c["mask"], np.int64)
            if section == "embed":
                types = np.zeros_like(ids)
                return (lambda: mean_pool(m.hidden_states(ids, mask, types), mask)), "embedding"
            if section == "decoder":
                return (lambda: m.generate(ids, c["new"], attention_mask=mask, eos_token_id=[])[:, ids.shape[1]:]), \
                    "tokens"
            return (lambda: m.generate(ids, c["new"], attention_mask=mask, num_beams=c["beams"], eos_token_id=[])), \
                "tokens"
        return load, case, {"memory": lambda m: m.memory}
    if lib == "torch":
        import torch
        import transformers
        set_threads(threads, torch_too=True)
        with open(os.path.join(spec["dir"], "config.json")) as f:  # transformers imports model code lazily:
            for arch in json.load(f).get("architectures") or []:    # do it before the RSS baseline
                getattr(transformers, arch, None)
        transformers.MarianMTModel, transformers.BertModel  # noqa: B018
        prec = eng.split("-")[1]

        def load():
            with torch.no_grad():
                if section == "embed":
                    m = transformers.BertModel.from_pretrained(spec["dir"], dtype=torch.float32).eval()
                    if prec == "int8":
                        from torch.ao.quantization import quantize_dynamic
                        m = quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
                    return m
                if section == "decoder":
                    dt = torch.bfloat16 if prec == "bf16" else torch.float32
                    m = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=dt).eval()
                else:
                    m = transformers.MarianMTModel.from_pretrained(spec["dir"], dtype=torch.float32).eval()
                gc_ = m.generation_config  # eos disabled: every engine generates exactly max_new_tokens
                gc_.eos_token_id = None
                gc_.forced_eos_token_id = None
                gc_.bad_words_ids = None
                return m

        def case(m, c):
            ids, mask = torch.tensor(c["ids"]), torch.tensor(c["mask"])
            if section == "embed":
                types = torch.zeros_like(ids)
                fm = mask[..., None].float()

                def run():
                    with torch.inference_mode():
                        h = m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
                        return ((h * fm).sum(1) / fm.sum(1).clamp(min=1e-9)).numpy()
                return run, "embedding"

            def gen():
                with torch.inference_mode():
                    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=c["new"], do_sample=False,
                                     num_beams=c.get("beams", 1), pad_token_id=c["pad"], eos_token_id=None,
                                     use_cache=True)
                return out[:, ids.shape[1]:].numpy() if section == "decoder" else out.numpy()
            return gen, "tokens"
        return load, case, {}
    if lib == "ort":
        import onnxruntime
        prec = eng.split("-")[1]

        def load():
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            return onnxruntime.InferenceSession(spec["onnx"][prec], opts, providers=["CPUExecutionProvider"])

        def case(s, c):
            ids, mask = np.array(c["ids"], np.int64), np.array(c["mask"], np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            m = mask[..., None].astype(np.float32)
            return (lambda: (s.run(None, feeds)[0] * m).sum(1) / np.maximum(m.sum(1), 1e-9)), "embedding"
        return load, case, {}
    if lib == "ct2":
        import ctranslate2
        prec = eng.split("-")[1]
        compute = {"fp32": "float32", "int8": "int8"}[prec]
        cls = {"embed": ctranslate2.Encoder, "decoder": ctranslate2.Generator, "translate": ctranslate2.Translator}

        def load():
            return cls[section](spec["ct2"][prec], device="cpu", compute_type=compute, intra_threads=threads,
                                inter_threads=1)

        def case(m, c):
            ids, mask = np.array(c["ids"], np.int64), np.array(c["mask"], np.int64)
            lens = mask.sum(1)
            if section == "embed":
                rows = [list(map(int, r[:n])) for r, n in zip(ids, lens)]
                mf = mask[..., None].astype(np.float32)

                def run():
                    h = np.asarray(m.forward_batch(rows).last_hidden_state)
                    return (h * mf).sum(1) / np.maximum(mf.sum(1), 1e-9)
                return run, "embedding"
            vocab = spec["ct2_vocab"]
            rows = [[vocab[int(t)] for t in r[:n]] for r, n in zip(ids, lens)]
            index = {t: i for i, t in enumerate(vocab)}
            if section == "decoder":
                def gen():
                    res = m.generate_batch(rows, max_length=c["new"], min_length=c["new"], sampling_topk=1,
                                           beam_size=1, include_prompt_in_result=False, end_token=[])
                    return np.array([[index[t] for t in r.sequences[0]] for r in res])
                return gen, "tokens"

            def tr():
                res = m.translate_batch(rows, beam_size=c["beams"], max_decoding_length=c["new"],
                                        min_decoding_length=c["new"], end_token=[])
                return np.array([[c["start"]] + [index[t] for t in r.hypotheses[0]] for r in res])
            return tr, "tokens"
        return load, case, {}
    raise ValueError(eng)


def summarize(kind, out):
    import numpy as np
    a = np.asarray(out)
    if kind == "embedding":
        return {"embedding": a.astype(float).round(6).tolist()}
    if kind == "tokens":
        return {"tokens": a.astype(int).tolist()}
    return {}


def worker(spec: dict) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; the protocol has the original stdout to itself

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    try:
        load, case_of, extra = load_engine(spec)
        gc.collect()
        base_peak, base_now = peak_rss_kib(), statm_mib()
        t0 = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - t0
        gc.collect()
        info = {"load_s": load_s, "peak_load_mib": kib_to_mib(peak_rss_kib()
                                                              - base_peak),
                "rss_load_mib": statm_mib() - base_now}
        if "memory" in extra:
            info["memory"] = extra["memory"](model)
        send({"ok": True, **info})
    except Exception as exc:  # noqa: BLE001
        send({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
              "trace": traceback.format_exc()[-2000:]})
        return
    fns = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "case":
                fn, kind = case_of(model, cmd["case"])
                out = fn()  # warm-up (first touch of mapped weights, thread pools, caches)
                loops = _loops_for(fn, cmd["min_sample_s"]) if cmd["min_sample_s"] > 0 else 1
                fns[cmd["name"]] = (fn, loops)
                gc.collect()
                send({"ok": True, "loops": loops, **summarize(kind, out),
                      "peak_run_mib": kib_to_mib(peak_rss_kib() - base_peak)})
            elif cmd["op"] == "time":
                fn, loops = fns[cmd["name"]]
                ts = []
                for _ in range(cmd["reps"]):
                    t0 = time.perf_counter()
                    for _ in range(loops):
                        fn()
                    ts.append((time.perf_counter() - t0) / loops)
                send({"ok": True, "t": min(ts)})
            elif cmd["op"] == "quit":
                break
        except Exception as exc:  # noqa: BLE001
            send({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                  "trace": traceback.format_exc()[-2000:]})


# ------------------------------------------------------------------------------------------------ the parent

class Worker:
    """One engine in its own process running `script --worker @spec.json` (this file by default; bench_finetune.py
    runs its own workers through this class), answering JSON commands line by line."""

    def __init__(self, spec: dict, threads: int, script: str = __file__) -> None:
        self.name = spec["engine"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads) if self.name == "calib" else "1")
        # The spec (inputs included) goes through a file: a command-line argument is limited to 128 KiB.
        import tempfile
        fd, self.spec_path = tempfile.mkstemp(prefix="bench-spec-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", "@" + self.spec_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.info = self._recv()
        self.alive = self.info.get("ok", False)
        self.error = self.info.get("error")

    def _recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            return {"ok": False, "error": "worker died: " + (err.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        if not self.alive:
            return {"ok": False, "error": self.error}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        r = self._recv()
        if not r.get("ok"):
            self.alive, self.error = False, r.get("error")
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.spec_path):  # a worker that died before reading it
            os.unlink(self.spec_path)
        self.proc.stderr.close()
        self.proc.stdout.close()


def available(lib: str) -> bool:
    mod = {"cpf": "cpuformer", "torch": "transformers", "ort": "onnxruntime", "ct2": "ctranslate2",
           "calib": "numpy"}[lib]
    import importlib.util
    ok = importlib.util.find_spec(mod) is not None
    if lib == "torch":
        ok = ok and importlib.util.find_spec("torch") is not None
    return ok


def start_workers(engines: list, spec: dict, args) -> list:
    workers = []
    for eng in engines:
        lib = eng.split("-")[0]
        if not available(lib):
            print(f"  {eng}: not installed")
            continue
        s = dict(spec, engine=eng)
        if lib == "ct2" and eng.split("-")[1] not in s.get("ct2", {}):
            print(f"  {eng}: skipped ({s.get('ct2_error', 'no conversion')})")
            continue
        if lib == "ort" and eng.split("-")[1] not in s.get("onnx", {}):
            print(f"  {eng}: skipped (no ONNX model)")
            continue
        w = Worker(s, args.threads)
        if not w.alive:
            print(f"  {eng}: failed to load: {w.error}")
            w.close()
            continue
        workers.append(w)
    return workers


def interleave(workers: list, cases: dict, args, min_sample_s: float, reps: int) -> dict:
    """{case: {engine: [best time of each round]}} and the engines' outputs, timed as _timing.compare_rounds does
    (rotation, pause before each switch, best of reps), each engine in its own process."""
    outputs = {}
    for cname, case in cases.items():
        for w in workers:
            r = w.ask(op="case", name=cname, case=case, min_sample_s=min_sample_s if w.name != "calib" else 0.005)
            if not r.get("ok"):
                print(f"  {w.name}: {cname} failed: {r.get('error')}")
            outputs.setdefault(cname, {})[w.name] = r
    times = {c: {w.name: [] for w in workers} for c in cases}
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for cname in cases:
            for w in order:
                if not w.alive:
                    continue
                time.sleep(args.pause)
                res = w.ask(op="time", name=cname, reps=max(reps, 3) if w.name == "calib" else reps)
                if res.get("ok"):
                    times[cname][w.name].append(res["t"])
    return times, outputs


def fmt_ms(v):
    return f"{v * 1e3:10.1f}" if v >= 0.01 else f"{v * 1e3:10.2f}"


def ratio_base(eng: str, have: set) -> str:
    prec = eng.split("-")[1] if "-" in eng else "fp32"
    base = {"fp32": "cpf-fp32", "packed": "cpf-fp32", "bf16": "cpf-bf16", "bf16act": "cpf-bf16",
            "int8": "cpf-int8"}.get(prec, "cpf-fp32")
    return base if base in have else "cpf-fp32"


def print_table(title: str, times: dict, workers: list, per_call_unit: tuple, extra_cols=None) -> None:
    """per_call_unit: (label, count) -> a throughput column count / median seconds."""
    have = {w.name for w in workers}
    label, count = per_call_unit
    hdr = (f"{'engine':<12}{'median ms':>10}{'min ms':>10}{'ratio':>7}{label:>12}{'rounds':>7}"
           + "".join(f"{h:>{wd}}" for h, wd, _ in (extra_cols or [])))
    print(f"\n{title}")
    print(hdr)
    print("-" * len(hdr))
    med = {e: statistics.median(v) for e, v in times.items() if v}
    for w in workers:
        e = w.name
        if e == "calib" or e not in med:
            continue
        base = ratio_base(e, have)
        ratio = f"{med[e] / med[base]:7.2f}" if base in med else f"{'-':>7}"
        print(f"{e:<12}{fmt_ms(med[e])}{fmt_ms(min(times[e]))}{ratio}{count / med[e]:12.1f}{len(times[e]):7d}"
              + "".join(f"{fn(e):>{wd}}" for _, wd, fn in (extra_cols or [])))
    if "calib" in med:
        n = CALIB_N
        gf = [2 * n ** 3 / t / 1e9 for t in times["calib"]]
        print(f"{'calibration':<12}{fmt_ms(med['calib'])}{fmt_ms(min(times['calib']))}{'':>7}"
              f"{statistics.median(gf):9.1f} GF/s  (numpy {n}^3 float32 matmul, OPENBLAS_NUM_THREADS=threads; "
              f"rounds min {min(gf):.1f} max {max(gf):.1f} GFLOP/s)")


CALIB_N = 512


def memory_lines(workers: list) -> None:
    for w in workers:
        if "memory" in w.info:
            m = w.info["memory"]
            print(f"  {w.name} model.memory: mapped {m['mapped'] / 2**20:.1f} MiB, owned {m['owned'] / 2**20:.1f} MiB")


def cosine_col(outputs: dict, cname: str, ref: str = "cpf-fp32"):
    import numpy as np

    def col(e):
        a, b = outputs.get(cname, {}).get(e, {}), outputs.get(cname, {}).get(ref, {})
        if "embedding" not in a or "embedding" not in b:
            return "-"
        x, y = np.array(a["embedding"]), np.array(b["embedding"])
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        return f"{cos.min():.6f}"
    return col


def token_col(outputs: dict, cname: str, ref: str = "cpf-fp32"):
    import numpy as np

    def col(e):
        a, b = outputs.get(cname, {}).get(e, {}), outputs.get(cname, {}).get(ref, {})
        if "tokens" not in a or "tokens" not in b:
            return "-"
        x, y = np.array(a["tokens"]), np.array(b["tokens"])
        if x.shape != y.shape:
            return f"shape {x.shape}"
        return f"{(x == y).all(1).sum()}/{len(x)} rows, {(x == y).mean():.2f}"
    return col


def close_all(workers):
    for w in workers:
        w.close()


def load_rounds(engines: list, spec: dict, args) -> dict:
    """{engine: [load seconds]}: each engine loaded in a fresh process, one at a time with every other worker
    closed, interleaved round by round (rotating the order, pausing before each). The load of a worker started
    while the section's others are alive depends on what was started before it: right after the float32 and
    packed workers (which allocate and free gigabytes) an int8 load measured 1.65 s in cpuformer and 2.4 s in
    CTranslate2, against 0.6-1.0 s later in the same sequence."""
    out = {e: [] for e in engines}
    for r in range(args.rounds):
        for i in range(len(engines)):
            eng = engines[(i + r) % len(engines)]
            time.sleep(args.pause)
            w = Worker(dict(spec, engine=eng), args.threads)
            if w.alive:
                out[eng].append(w.info["load_s"])
            w.close()
    return out


def header(args, title):
    print(f"\n=== {title} === threads {args.threads}; loadavg before {loadavg()}", flush=True)


def section_embed(args, cache):
    import numpy as np
    shapes = QUICK["embed"] if args.quick else EMBED_SHAPES
    T = 32 if args.quick else 128
    batches = (1, 4) if args.quick else (1, 32)
    engines = ["cpf-fp32", "cpf-packed", "cpf-int8", "torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ct2-fp32",
               "ct2-int8", "calib"]
    for name, fields in shapes.items():
        header(args, f"sentence embeddings, {name}-shaped BERT ({fields['num_hidden_layers']}x"
                     f"{fields['hidden_size']}, {fields['num_attention_heads']} heads), T={T}")
        d = build_dir(cache, "bert", fields)
        spec = {"section": "embed", "dir": d, "threads": args.threads, "calib_n": CALIB_N, "ct2": {}, "onnx": {}}
        if available("ct2"):
            for p, q in (("fp32", "float32"), ("int8", "int8")):
                try:
                    spec["ct2"][p] = ct2_dir(d, q, {"unk_token": ("[UNK]", 100), "pad_token": ("[PAD]", 0)})
                except Exception as exc:  # noqa: BLE001
                    spec["ct2_error"] = f"conversion failed: {type(exc).__name__}: {exc}"
        if available("ort") and available("torch"):
            spec["onnx"] = onnx_files(d, T)
        workers = start_workers(engines, spec, args)
        rng = np.random.default_rng(0)
        cases = {}
        for B in batches:
            ids = rng.integers(min(1000, fields["vocab_size"] // 2), fields["vocab_size"] - 1, size=(B, T))
            cases[f"B={B}"] = {"ids": ids.tolist(), "mask": np.ones_like(ids).tolist()}
        for cname in cases:  # one interleaved run per batch size, all engines
            times, outputs = interleave(workers, {cname: cases[cname]}, args, min_sample_s=0.005,
                                        reps=3 if (cname == "B=1" or args.quick) else 1)
            B = int(cname.split("=")[1])
            print_table(f"{name}, batch {B}, T={T}: ms per batch (ratio = engine / cpuformer at the same precision)",
                        times[cname], workers, ("seq/s", B),
                        [("cos vs cpf-fp32", 17, cosine_col(outputs, cname))])
        memory_lines(workers)
        close_all(workers)
        print(f"loadavg after: {loadavg()}", flush=True)


def section_decoder(args, cache):
    import numpy as np
    fields = dict(QUICK["decoder"] if args.quick else QWEN2_05B)
    if args.decoder_layers is not None:
        fields["num_hidden_layers"] = args.decoder_layers
    prompt_len, new = (16, 8) if args.quick else (128, 64)
    header(args, f"Qwen2-0.5B-shaped decoder ({fields['num_hidden_layers']} layers, hidden {fields['hidden_size']}, "
                 f"vocab {fields['vocab_size']}), bf16 weights on disk; prompt {prompt_len}, {new} new tokens greedy")
    d = build_dir(cache, "qwen2", fields, "bfloat16")
    print(f"  weights on disk: {sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20:.1f} MiB "
          f"({d})")
    spec = {"section": "decoder", "dir": d, "threads": args.threads, "calib_n": CALIB_N, "ct2": {}}
    if available("ct2"):
        specials = {"bos_token": ("<|endoftext|>", fields["bos_token_id"]),
                    "eos_token": ("<|endoftext|>", fields["eos_token_id"])}
        for p, q in (("fp32", "float32"), ("int8", "int8")):
            try:
                spec["ct2"][p] = ct2_dir(d, q, specials)
            except Exception as exc:  # noqa: BLE001
                spec["ct2_error"] = f"conversion failed: {type(exc).__name__}: {exc}"
                print(f"  CTranslate2 {q}: {spec['ct2_error'][:200]}")
        if spec["ct2"]:
            spec["ct2_vocab"] = json.load(open(os.path.join(next(iter(spec["ct2"].values())), "vocabulary.json")))
    engines = ["cpf-fp32", "cpf-packed", "cpf-bf16", "cpf-bf16act", "cpf-int8", "torch-fp32", "torch-bf16", "ct2-fp32",
               "ct2-int8", "calib"]
    workers = start_workers(engines, spec, args)
    ids = np.random.default_rng(0).integers(0, fields["vocab_size"] - 1, size=(1, prompt_len))
    base = {"ids": ids.tolist(), "mask": np.ones_like(ids).tolist(), "pad": 0}
    cases = {"prompt": dict(base, new=1), "generate": dict(base, new=new)}
    times, outputs = interleave(workers, cases, args, min_sample_s=0.0, reps=1)
    med = {c: {e: statistics.median(v) for e, v in t.items() if v} for c, t in times.items()}
    have = {w.name for w in workers}
    hdr = (f"{'engine':<12}{'load s':>8}{'RSS load':>10}{'peak load':>10}{'peak run':>10}{'prompt ms':>11}"
           f"{'min':>8}{'ratio':>7}{'gen ms':>10}{'decode tok/s':>13}{'ratio':>7}  same tokens as cpf-fp32")
    print(f"\nQwen2-shaped decoder, batch 1: load and memory (MiB, each engine in a fresh process), prompt latency "
          f"(time to the first new token after {prompt_len} prompt tokens), decode")
    print(hdr)
    print("-" * len(hdr))
    dec = {}
    for e in med["generate"]:
        if e in med["prompt"] and med["generate"][e] > med["prompt"][e]:
            dec[e] = (new - 1) / (med["generate"][e] - med["prompt"][e])
    tok = token_col(outputs, "generate")
    for w in workers:
        e = w.name
        if e == "calib" or e not in med["prompt"]:
            continue
        b = ratio_base(e, have)
        pr = f"{med['prompt'][e] / med['prompt'][b]:7.2f}" if b in med["prompt"] else f"{'-':>7}"
        dr = f"{dec[b] / dec[e]:7.2f}" if e in dec and b in dec else f"{'-':>7}"
        peak_run = outputs["generate"][e].get("peak_run_mib", float("nan"))
        print(f"{e:<12}{w.info['load_s']:8.2f}{w.info['rss_load_mib']:10.0f}{w.info['peak_load_mib']:10.0f}"
              f"{peak_run:10.0f}{fmt_ms(med['prompt'][e]):>11}{min(times['prompt'][e]) * 1e3:8.1f}{pr}"
              f"{fmt_ms(med['generate'][e])}{f'{dec[e]:13.2f}' if e in dec else f'{chr(45):>13}'}{dr}  {tok(e)}")
    if "calib" in med["prompt"]:
        gf = [2 * CALIB_N ** 3 / t / 1e9 for t in times["prompt"]["calib"] + times["generate"]["calib"]]
        print(f"{'calibration':<12} numpy {CALIB_N}^3 float32 matmul, timed in every round: median "
              f"{statistics.median(gf):.1f} GFLOP/s (min {min(gf):.1f}, max {max(gf):.1f})")
    print(f"load s: from_pretrained / Generator() on a warm page cache (the files were just written or read), each "
          f"started after the engines above it, which stay alive (the line after the memory lines loads each alone); "
          f"RSS load: resident growth over the process after imports; peak load / peak run: peak RSS (VmHWM) growth over "
          f"that baseline after loading / after the first {new}-token generate (memory-mapped weights, cpuformer's "
          f"bf16, count once touched: file pages, shared with the page cache). decode tok/s = {new - 1} / "
          f"(generate - prompt), medians. Ratios are time ratios engine / cpuformer at the same precision (fp32 vs "
          f"cpf-fp32, bf16 vs cpf-bf16, int8 vs cpf-int8; > 1: cpuformer faster); the decode ratio is "
          f"cpuformer tok/s / engine tok/s.")
    if "cpf-bf16act" in med["prompt"] and "torch-bf16" in med["prompt"]:
        # cpf-bf16act: activations="bfloat16", the products' precision of PyTorch's bf16 (its norms, attention and
        # residuals stay float32): the like-for-like row against torch-bf16
        pa, pt = med["prompt"]["cpf-bf16act"], med["prompt"]["torch-bf16"]
        da, dt = dec.get("cpf-bf16act"), dec.get("torch-bf16")
        print(f"bf16 at equal product precision (cpf-bf16act = activations='bfloat16', as PyTorch's bf16 rounds "
              f"them): prompt torch-bf16 / cpf-bf16act = {pt / pa:.2f}"
              + (f", decode cpf-bf16act / torch-bf16 tok/s = {da / dt:.2f}" if da and dt else ""))
    memory_lines(workers)
    close_all(workers)
    loads = load_rounds([w.name for w in workers if w.name != "calib"], spec, args)
    print(f"load s, each engine alone in a fresh process ({args.rounds} interleaved rounds, the other workers closed): "
          + ", ".join(f"{e} {statistics.median(v):.2f}" for e, v in loads.items() if v))
    print(f"loadavg after: {loadavg()}", flush=True)


def section_translate(args, cache):
    import numpy as np
    fields = dict(QUICK["marian"] if args.quick else MARIAN)
    batch, new = (4, 8) if args.quick else (16, 32)
    header(args, f"Marian-shaped translation (d_model {fields['d_model']}, {fields['encoder_layers']}+"
                 f"{fields['decoder_layers']} layers, vocab {fields['vocab_size']}), {batch} sentences, "
                 f"{new} new tokens")
    d = build_dir(cache, "marian", fields)
    V, pad, eos = fields["vocab_size"], fields["pad_token_id"], fields["eos_token_id"]
    spec = {"section": "translate", "dir": d, "threads": args.threads, "calib_n": CALIB_N, "ct2": {}}
    if available("ct2"):
        specials = {"eos_token": ("</s>", eos), "unk_token": ("<unk>", 1), "pad_token": ("<pad>", pad)}
        for p, q in (("fp32", "float32"), ("int8", "int8")):
            try:
                spec["ct2"][p] = ct2_dir(d, q, specials)
            except Exception as exc:  # noqa: BLE001
                spec["ct2_error"] = f"conversion failed: {type(exc).__name__}: {exc}"
                print(f"  CTranslate2 {q}: {spec['ct2_error'][:200]}")
        if spec["ct2"]:
            p0 = next(iter(spec["ct2"].values()))
            vf = [f for f in ("shared_vocabulary.json", "source_vocabulary.json")
                  if os.path.isfile(os.path.join(p0, f))]
            spec["ct2_vocab"] = json.load(open(os.path.join(p0, vf[0])))
    engines = ["cpf-fp32", "cpf-packed", "cpf-int8", "torch-fp32", "ct2-fp32", "ct2-int8", "calib"]
    workers = start_workers(engines, spec, args)
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 29, size=batch) if not args.quick else rng.integers(6, 11, size=batch)
    L = int(lens.max())
    ids = np.full((batch, L), pad, np.int64)
    mask = np.zeros((batch, L), np.int64)
    for i, n in enumerate(lens):
        ids[i, :n - 1] = rng.integers(2, V - 1, size=n - 1)
        ids[i, n - 1] = eos
        mask[i, :n] = 1
    base = {"ids": ids.tolist(), "mask": mask.tolist(), "pad": pad, "new": new,
            "start": fields["decoder_start_token_id"]}
    cases = {"greedy": dict(base, beams=1), "beam 4": dict(base, beams=4)}
    times, outputs = interleave(workers, cases, args, min_sample_s=0.0, reps=1)
    for cname in cases:
        print_table(f"Marian, {batch} sentences of {int(lens.min())}-{L} tokens, {cname}, {new} new tokens: ms per "
                    f"batch", times[cname], workers, ("sent/s", batch),
                    [("same tokens as cpf-fp32", 26, token_col(outputs, cname))])
    print("eos disabled everywhere (cpuformer eos_token_id=[]; transformers generation_config eos/forced_eos None; "
          "CTranslate2 end_token=[] with min_decoding_length = max_decoding_length), so every engine decodes "
          f"exactly {new} steps per sentence.")
    memory_lines(workers)
    close_all(workers)
    print(f"loadavg after: {loadavg()}", flush=True)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        arg = sys.argv[2]
        if arg.startswith("@"):
            with open(arg[1:]) as f:
                spec = json.load(f)
            os.unlink(arg[1:])
        else:
            spec = json.loads(arg)
        worker(spec)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 2)")
    parser.add_argument("--pause", type=float, default=None,
                        help="seconds before each switch of engine (default 0.25, --quick 0.1), so that the previous "
                             "engine's OpenMP/OpenBLAS workers stop spinning before the next one runs")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds (smoke test, < 1 minute)")
    parser.add_argument("--only", choices=["embed", "decoder", "translate"])
    parser.add_argument("--decoder-layers", type=int, default=None, help="layers of the Qwen2-shaped decoder (24)")
    parser.add_argument("--cache", default=os.environ.get("CPUFORMER_BENCH_CACHE",
                                                          os.path.expanduser("~/.cache/cpuformer-bench")))
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.pause is None:
        args.pause = 0.1 if args.quick else 0.25
    os.makedirs(args.cache, exist_ok=True)
    import warnings
    warnings.filterwarnings("ignore")
    vers = []
    for mod in ("cpuformer", "numpy", "torch", "transformers", "onnxruntime", "ctranslate2"):
        try:
            m = __import__(mod)
            vers.append(f"{mod} {m.__version__}")
        except ImportError:
            vers.append(f"{mod} not installed")
    import cpuformer
    print(", ".join(vers) + f"; cpuformer SIMD {cpuformer.build_info()['simd']}")
    print(f"threads {args.threads} per engine (cpuformer.set_num_threads, torch.set_num_threads + 1 inter-op, "
          f"onnxruntime intra_op_num_threads, CTranslate2 intra_threads, OMP/MKL_NUM_THREADS; numpy OpenBLAS 1 "
          f"except the calibration); rounds {args.rounds}; pause {args.pause} s; os.cpu_count() {os.cpu_count()}; "
          f"loadavg {loadavg()}")
    t0 = time.perf_counter()
    for name, fn in (("embed", section_embed), ("decoder", section_decoder), ("translate", section_translate)):
        if args.only in (None, name):
            fn(args, args.cache)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; loadavg at the end {loadavg()}")


if __name__ == "__main__":
    main()
