"""Mutated Hugging Face model directories (config.json, generation_config.json, the safetensors bytes and header,
model.safetensors.index.json) and absurd call arguments, each loaded and run in a child process (this file run as a
script) so that a crash, an abort or a hang fails the test with the case that caused it instead of killing pytest.

Allowed outcomes: the load raises ValueError / FileNotFoundError / KeyError / TypeError; or it succeeds and a small
forward and generate call then succeed or raise ValueError / IndexError (TypeError too for arguments of the wrong
Python type). Anything else is a defect: a signal, another exception, a case slower than SLOW seconds (a hang), or an
"out of memory" error (an absurd size must be refused before it is allocated; the child runs under an address-space
limit so that such an allocation fails instead of swapping). Seeded and deterministic; CPUFORMER_FUZZ_SEED=N picks
another draw, CPUFORMER_FUZZ_LONG=1 runs ten times as many cases."""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import traceback

SEED = int(os.environ.get("CPUFORMER_FUZZ_SEED", "20261201"))
SCALE = 10 if os.environ.get("CPUFORMER_FUZZ_LONG") == "1" else 1
SLOW = 5.0  # seconds: a case slower than this is reported as a hang
LOAD_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)
CALL_ERRORS = (ValueError, IndexError)

# ------------------------------------------------------------------------------------------------ the child process


def _limit_memory():
    try:
        import resource
        limit = 6 << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


def _small_calls(model):
    """A forward and a short generation sized from what the model says about itself."""
    import numpy as np

    import cpuformer.models as M
    core = model._core
    V = max(1, core.vocab_size)
    ids = (np.arange(10).reshape(2, 5) * 7 + 3) % V
    if isinstance(model, M.EncoderModel):
        model(ids, attention_mask=np.array([[1] * 5, [1, 1, 1, 0, 0]]))
        model.hidden_states(ids)
    elif isinstance(model, M.CausalLM):
        model(ids)
        model.generate(ids, max_new_tokens=3)
        model.generate(ids, max_new_tokens=3, attention_mask=np.array([[0, 1, 1, 1, 1], [1] * 5]), do_sample=True,
                       top_k=5, seed=1)
    elif isinstance(model, M.Seq2SeqLM):
        model(ids, decoder_input_ids=ids[:, :2] % V)
        model.generate(ids, max_new_tokens=3)
        model.generate(ids, max_new_tokens=3, num_beams=2)
    else:
        cfg = model.config
        size = cfg.get("image_size") if isinstance(cfg.get("image_size"), int) else 32
        ch = cfg.get("num_channels") if isinstance(cfg.get("num_channels"), int) else 3
        if 0 < size <= 64 and 0 < ch <= 4:
            model(np.zeros((1, ch, size, size), np.float32) + 0.5)
        model(np.zeros((1, 3, 32, 32), np.float32))


def _run_call(model, call):
    """A named call with absurd arguments (see CALLS)."""
    import numpy as np
    kind, kw = call
    V = model._core.vocab_size
    ids = kw.pop("ids", None)
    ids = (np.arange(6).reshape(2, 3) + 3) % max(V, 1) if ids is None else np.asarray(ids)
    if kind == "call":
        return model(ids, **kw)
    if kind == "generate":
        return model.generate(ids, **kw)
    if kind == "pixels":
        return model(np.asarray(kw["pixels"], np.float32))
    raise AssertionError(kind)


def _drive(manifest_path, first):
    """Runs the cases of the manifest from index `first`; prints CASE before each, exits 3 on a defect."""
    _limit_memory()
    import cpuformer.models as M
    with open(manifest_path) as f:
        cases = json.load(f)
    for i in range(first, len(cases)):
        case = cases[i]
        print(f"CASE {i}: {case['what']}", flush=True)
        t0 = time.perf_counter()
        stage = "load"
        try:
            model = M.from_pretrained(case["dir"])
            stage = "call"
            if case.get("calls"):
                for call in case["calls"]:
                    try:
                        _run_call(model, (call[0], dict(call[1])))
                    except CALL_ERRORS + (TypeError,) as exc:
                        if "out of memory" in str(exc):
                            raise
            else:
                _small_calls(model)
            print(f"OUTCOME {i}: ok", flush=True)
        except (LOAD_ERRORS if stage == "load" else CALL_ERRORS) as exc:
            print(f"OUTCOME {i}: {stage} {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            if "out of memory" in str(exc):
                print(f"DEFECT {i}: {stage}: an absurd size reached the allocator: {exc}", flush=True)
                sys.exit(3)
        except BaseException:  # noqa: BLE001 - anything else is the defect being looked for
            print(f"DEFECT {i}: {stage}: {traceback.format_exc()}", flush=True)
            sys.exit(3)
        took = time.perf_counter() - t0
        if took > SLOW:
            print(f"DEFECT {i}: took {took:.1f} s", flush=True)
            sys.exit(3)
    print("DONE", flush=True)


if __name__ == "__main__":
    _drive(sys.argv[1], int(sys.argv[2]))
    sys.exit(0)

# ------------------------------------------------------------------------------------------------ the parent (pytest)

import pytest  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("transformers")

HUGE = [2 ** 40, 10 ** 9, 2 ** 31, 2 ** 30, 2 ** 63 - 1, 1e308, 1e300, -1e308, 1e-300]
WEIRD = [None, -1, 0, -7, 1.5, 0.5, True, False, "", "abc", "NaN", [], [1, 2], {}, {"a": {"b": [None]}}, 1e999,
         -1e999] + HUGE
SIZES = ["num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings", "num_labels", "type_vocab_size", "d_model",
         "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
         "relative_attention_max_distance", "image_size", "patch_size", "num_channels", "pad_token_id",
         "eos_token_id", "bos_token_id", "decoder_start_token_id", "sliding_window", "max_window_layers"]
ARCHS = ["BertModel", "BertForMaskedLM", "BertForQuestionAnswering", "LlamaForCausalLM", "LlamaModel",
         "T5ForConditionalGeneration", "T5EncoderModel", "ViTForImageClassification", "GPT2LMHeadModel",
         "MarianMTModel", "Frobnicator", "", "ForSequenceClassification", "Model"]
TYPES = ["bert", "roberta", "distilbert", "mpnet", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "t5",
         "bart", "marian", "vit", "xlm-roberta", "frob", "", "BERT"]
ROPE = [{"type": "yarn", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "llama3"},
        {"rope_type": "llama3", "factor": -1}, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                                                  "high_freq_factor": 1},
        {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 1e300},
        {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": -1e300},
        {"rope_type": "llama3", "factor": 1e300, "low_freq_factor": -1e300, "high_freq_factor": 1e300},
        {"rope_type": "linear", "factor": 0}, {"rope_type": "linear", "factor": 1e-300},
        {"rope_type": "linear", "factor": 1e308}, {"rope_type": "linear"}, {"rope_type": 5}, {"type": None},
        {"rope_type": "default", "rope_theta": -1}, {"rope_type": "default", "rope_theta": 1e308},
        {"partial_rotary_factor": 0.5}, {}, "linear", [1, 2], 3]
ID2LABEL = [{}, {"0": "a"}, {"a": "x", "b": "y"}, {"0": 1, "1": None}, {"-1": "x"}, ["a", "b"], "x", 5,
            {str(i): str(i) for i in range(1000)}, {"0": {"nested": True}}]
GENERATION = {
    "eos_token_id": [-1, 2 ** 40, [1, -1], [], [[1]], "2", 1e300, [2 ** 63 - 1], list(range(200))],
    "pad_token_id": [-5, 2 ** 40, 10 ** 12, 1e300, "x", 1.5],
    "bos_token_id": [-5, 2 ** 40],
    "decoder_start_token_id": [-1, 2 ** 40, 10 ** 12, None, "0"],
    "forced_bos_token_id": [-1, 2 ** 40, 119, 0, "x"],
    "forced_eos_token_id": [-1, 2 ** 40, 119, 0],
    "bad_words_ids": [[[1e300]], [[-1e300]], [[-5]], [[1, 2]], [[]], [1], "x", [[2 ** 40]], [[0.5]], [["a"]]],
    "min_length": [-1, 2 ** 40, 10 ** 9, 1.5, "x"],
    "no_repeat_ngram_size": [-1, 2 ** 40, 1, 2, 3, 1000, 1001],
    "early_stopping": ["never", "sometimes", 1, None, [True]],
    "max_new_tokens": [2 ** 40, -1], "max_length": [2 ** 40, -1], "num_beams": [0, 10 ** 9],
}
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "XYZ", "", 5, None]


def _write(path, data):
    """Replace a file (the case folders hold hard links to the fixture's files: never write through one)."""
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def _read_header(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:], raw


def _write_header(path, header, body, pad=True):
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    _write(path, struct.pack("<Q", len(text)) + text + body)


def _mutate_config(rng, cfg):
    cfg = dict(cfg)
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.choice(["delete", "weird", "weird", "size", "size", "arch", "type", "rope", "id2label",
                         "nested", "generation_key"])
        if op == "delete" and cfg:
            k = rng.choice(sorted(cfg))
            del cfg[k]
            what.append(f"del {k}")
        elif op == "weird" and cfg:
            k = rng.choice(sorted(cfg))
            cfg[k] = rng.choice(WEIRD)
            what.append(f"{k}={cfg[k]!r}"[:80])
        elif op == "size":
            k = rng.choice(SIZES)
            cfg[k] = rng.choice(HUGE + [-1, 0, 1, 3, 7, 1e9])
            what.append(f"{k}={cfg[k]!r}")
        elif op == "arch":
            cfg["architectures"] = rng.choice([[rng.choice(ARCHS)], [], None, "BertModel", [5], [None, "x"]])
            what.append(f"architectures={cfg['architectures']!r}")
        elif op == "type":
            cfg["model_type"] = rng.choice(TYPES + [None, 5, ["bert"]])
            what.append(f"model_type={cfg['model_type']!r}")
        elif op == "rope":
            # transformers 5 writes rope_parameters, older versions rope_scaling: damage the one the loader reads
            key = "rope_parameters" if "rope_parameters" in cfg and rng.random() < 0.8 else "rope_scaling"
            if key == "rope_scaling":
                cfg.pop("rope_parameters", None)
            cfg[key] = rng.choice(ROPE)
            what.append(f"{key}={cfg[key]!r}")
        elif op == "id2label":
            cfg["id2label"] = rng.choice(ID2LABEL)
            what.append("id2label=" + repr(cfg["id2label"])[:60])
            if rng.random() < 0.5:
                cfg["num_labels"] = rng.choice([1, 2, 3, 4, 0, -1, 2 ** 40])
                what.append(f"num_labels={cfg['num_labels']}")
        elif op == "nested":
            k = rng.choice(sorted(cfg) or ["x"])
            cfg[k] = {"value": cfg.get(k), "list": [cfg.get(k)] * 3}
            what.append(f"{k} nested")
        else:
            k = rng.choice(sorted(GENERATION))
            cfg[k] = rng.choice(GENERATION[k])
            what.append(f"{k}={cfg[k]!r}"[:60])
    return cfg, "config: " + ", ".join(what)


def _mutate_generation(rng, gen):
    gen = dict(gen or {})
    what = []
    for _ in range(rng.choice([1, 2, 3])):
        k = rng.choice(sorted(GENERATION))
        gen[k] = rng.choice(GENERATION[k])
        what.append(f"{k}={gen[k]!r}"[:60])
    return gen, "generation_config: " + ", ".join(what)


def _mutate_weights(rng, path):
    """One damage to a safetensors file; returns its description."""
    header, body, raw = _read_header(path)
    names = sorted(k for k in header if k != "__metadata__")
    op = rng.choice(["truncate", "flip", "flip", "dtype", "shape", "shape", "offsets", "length", "drop",
                     "rename", "garbage_header", "nan"])
    if op == "truncate":
        n = rng.randrange(0, len(raw))
        _write(path, raw[:n])
        return f"truncated to {n} of {len(raw)} bytes"
    if op == "flip":
        hl = 8 + struct.unpack("<Q", raw[:8])[0]
        data = bytearray(raw)
        for _ in range(rng.choice([1, 2, 4])):
            i = rng.randrange(0, min(hl, len(data)))
            data[i] ^= 1 << rng.randrange(8)
        _write(path, bytes(data))
        return "header bits flipped"
    name = rng.choice(names)
    t = header[name]
    if op == "dtype":
        t["dtype"] = rng.choice(DTYPES)
        what = f"{name} dtype {t['dtype']!r}"
    elif op == "shape":
        shape = list(t["shape"])
        choice = rng.choice(["add", "drop", "neg", "huge", "swap", "zero", "wrong_type"])
        if choice == "add":
            shape.append(1)
        elif choice == "drop" and shape:
            shape.pop()
        elif choice == "neg" and shape:
            shape[0] = -shape[0]
        elif choice == "huge":
            shape = [2 ** 62, 2 ** 62] if rng.random() < 0.5 else [2 ** 40] + shape[1:]
        elif choice == "swap":
            shape = shape[::-1]
        elif choice == "zero":
            shape = [0] + shape[1:]
        else:
            shape = [str(s) for s in shape] if rng.random() < 0.5 else {"a": 1}
        t["shape"] = shape
        what = f"{name} shape {shape!r}"
    elif op == "offsets":
        a, b = t["data_offsets"]
        t["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a, 2 ** 63], [-8, b], [a, a], [0, len(body) + 8],
                                        [a + 1, b + 1], [a, "x"], None])
        what = f"{name} data_offsets {t['data_offsets']!r}"
    elif op == "length":
        _write(path, struct.pack("<Q", rng.choice([0, 1, 2 ** 63, 2 ** 64 - 1, len(raw), 7])) + raw[8:])
        return "header length field"
    elif op == "drop":
        del header[name]
        what = f"{name} dropped"
    elif op == "rename":
        header[name + ".x"] = header.pop(name)
        what = f"{name} renamed"
    elif op == "garbage_header":
        _write_header(path, rng.choice([[], "x", None, 5, {"a": 1}, {"__metadata__": 5}]), body)
        return "header not a tensor table"
    else:  # NaN / inf values in a float32 tensor: loading must not care; the calls may give NaN, not crash
        if t["dtype"] != "F32":
            return "unchanged"
        a, _ = t["data_offsets"]
        data = bytearray(body)
        data[a:a + 8] = struct.pack("<ff", float("nan"), float("inf"))
        _write_header(path, header, bytes(data), pad=False)
        return f"{name} NaN/inf values"
    _write_header(path, header, body, pad=False)
    return "weights: " + what


def _mutate_index(rng, directory):
    path = os.path.join(directory, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    wm = index.get("weight_map", {})
    names = sorted(wm)
    op = rng.choice(["missing_shard", "traversal", "absolute", "non_string", "no_map", "map_type", "move",
                     "drop", "extra", "not_json", "shard_gone", "self"])
    name = rng.choice(names)
    if op == "missing_shard":
        wm[name] = "model-99999-of-99999.safetensors"
    elif op == "traversal":
        wm[name] = "../" + os.path.basename(directory) + "/" + wm[name]
    elif op == "absolute":
        wm[name] = "/etc/passwd"
    elif op == "non_string":
        wm[name] = rng.choice([None, 5, ["a"], {"b": 1}])
    elif op == "no_map":
        index.pop("weight_map", None)
    elif op == "map_type":
        index["weight_map"] = rng.choice([[], "x", None, 5])
    elif op == "move":
        wm[name] = rng.choice(sorted(set(wm.values())))
    elif op == "drop":
        del wm[name]
    elif op == "extra":
        wm["model.extra.weight"] = wm[name]
    elif op == "not_json":
        _write(path, b"{\"weight_map\": {")
        return "index: not JSON"
    elif op == "shard_gone":
        os.unlink(os.path.join(directory, wm[name]))
        return f"index: shard {wm[name]} removed"
    else:
        wm[name] = "model.safetensors.index.json"
    _write(path, json.dumps(index))
    return f"index: {op} {name}"


def _make_cases(rng, base, root, count):
    """`count` mutated copies of the directory `base` under `root`: [{dir, what}]."""
    files = sorted(os.listdir(base))
    weights = [f for f in files if f.endswith(".safetensors")]
    sharded = "model.safetensors.index.json" in files
    cases = []
    for i in range(count):
        d = os.path.join(root, f"case{i:04d}")
        shutil.copytree(base, d, copy_function=os.link)
        kinds = ["config"] * 5 + ["generation"] * 2 + ["weights"] * 3 + (["index"] * 3 if sharded else [])
        kind = rng.choice(kinds)
        if kind == "config":
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            cfg, what = _mutate_config(rng, cfg)
            raw = rng.random()
            text = json.dumps(cfg) if raw > 0.05 else rng.choice(["", "[1, 2]", "{", "null", "\xff\xfe", "5"])
            _write(os.path.join(d, "config.json"), text)
            if raw <= 0.05:
                what = f"config: raw {text!r}"
        elif kind == "generation":
            p = os.path.join(d, "generation_config.json")
            gen = json.load(open(p)) if os.path.exists(p) else {}
            gen, what = _mutate_generation(rng, gen)
            _write(p, json.dumps(gen) if rng.random() > 0.05 else rng.choice(["", "[]", "{", "7"]))
        elif kind == "weights":
            what = _mutate_weights(rng, os.path.join(d, rng.choice(weights)))
        else:
            what = _mutate_index(rng, d)
        cases.append({"dir": d, "what": f"{os.path.basename(base)}: {what}"})
    return cases


def _run_cases(cases, tmp_path, timeout=60):
    """Runs every case in child processes, restarting after each defect; returns the defects found."""
    manifest = os.path.join(str(tmp_path), "manifest.json")
    with open(manifest, "w") as f:
        json.dump(cases, f)
    defects, first, finished = [], 0, 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while first < len(cases):
        try:
            out = subprocess.run([sys.executable, __file__, manifest, str(first)], capture_output=True, text=True,
                                 timeout=timeout, env=env)
            stdout, rc = out.stdout, out.returncode
            stderr = out.stderr
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rc, stderr = "timeout", ""
        lines = stdout.strip().splitlines()
        finished += sum(line.startswith("OUTCOME ") for line in lines)
        if rc == 0 and lines and lines[-1] == "DONE":
            break
        at = [line for line in lines if line.startswith("CASE ")]
        if not at:
            defects.append(f"the driver failed before any case: {rc}\n{stderr[-2000:]}")
            break
        n = int(at[-1].split()[1].rstrip(":"))
        how = f"signal {-rc}" if isinstance(rc, int) and rc < 0 else ("hang" if rc == "timeout" else f"exit {rc}")
        detail = "\n".join(line for line in lines if line.startswith("DEFECT"))[-1500:]
        defects.append(f"{at[-1]}  -> {how}\n{detail}\n{stderr[-800:]}")
        first = n + 1
    assert finished + len(defects) == len(cases), f"{finished} cases finished, {len(defects)} defects, {len(cases)} cases"
    return defects


BASES = ["bert_seqcls", "llama", "t5", "vit_cls", "sharded_llama", "marian"]
COUNTS = {"bert_seqcls": 400, "llama": 400, "t5": 300, "vit_cls": 200, "sharded_llama": 300, "marian": 200}


@pytest.mark.parametrize("base", BASES)
def test_mutated_directories_load_or_refuse_never_crash(base, request, tmp_path):
    directory = request.getfixturevalue(base)[0]
    rng = random.Random(f"{SEED}-{base}")
    cases = _make_cases(rng, directory, str(tmp_path), COUNTS[base] * SCALE)
    defects = _run_cases(cases, tmp_path, timeout=60 * SCALE)
    assert not defects, f"{len(defects)} defect(s) (seed {SEED}):\n" + "\n\n".join(defects)


# absurd call arguments on valid directories: (fixture, [(kind, kwargs)])
CALLS = {
    "llama": [
        ("generate", dict(max_new_tokens=2 ** 40)), ("generate", dict(max_new_tokens=-1)),
        ("generate", dict(max_new_tokens=2 ** 20 + 1)), ("generate", dict(max_new_tokens=2 ** 63 - 1)),
        ("generate", dict(max_new_tokens=2 ** 64)), ("generate", dict(max_new_tokens=3, temperature=float("nan"),
                                                                       do_sample=True)),
        ("generate", dict(max_new_tokens=3, temperature=float("inf"), do_sample=True)),
        ("generate", dict(max_new_tokens=3, top_k=2 ** 40, do_sample=True)),
        ("generate", dict(max_new_tokens=3, top_p=float("nan"), do_sample=True)),
        ("generate", dict(max_new_tokens=3, eos_token_id=[2 ** 40])),
        ("generate", dict(max_new_tokens=3, eos_token_id=[-1])),
        ("generate", dict(max_new_tokens=3, eos_token_id=[5] * 1000)),
        ("generate", dict(max_new_tokens=3, pad_token_id=2 ** 40)),
        ("generate", dict(max_new_tokens=3, seed=-1)),
        ("generate", dict(max_new_tokens=3, ids=[[2 ** 40, 1]])),
        ("generate", dict(max_new_tokens=3, ids=[[-1, 1]])),
        ("generate", dict(max_new_tokens=3, ids=[[1, 2]], attention_mask=[[0, 0]])),
        ("generate", dict(max_new_tokens=3, ids=[[1, 2]], attention_mask=[[1, 2]])),
        ("generate", dict(max_new_tokens=3, ids=[[1, 2, 3]], attention_mask=[[1, 0, 1]])),
        ("generate", dict(max_new_tokens=3, ids=[[1.5, 2]])),
        ("generate", dict(max_new_tokens=3, ids=[[]])),
        ("generate", dict(max_new_tokens=3, ids=[[1]] * 0)),
        ("generate", dict(max_new_tokens=3, ids=[[[1]]])),
        ("call", dict(ids=[[1] * 3000])),
        ("call", dict(ids=[[1, 2]], attention_mask=[[1]])),
    ],
    "t5": [
        ("generate", dict(max_new_tokens=2 ** 40)), ("generate", dict(max_new_tokens=3, num_beams=0)),
        ("generate", dict(max_new_tokens=3, num_beams=10 ** 6)), ("generate", dict(max_new_tokens=3, num_beams=256)),
        ("generate", dict(max_new_tokens=3, num_beams=2, length_penalty=float("nan"))),
        ("generate", dict(max_new_tokens=3, num_beams=2, length_penalty=1e300)),
        ("generate", dict(max_new_tokens=3, num_beams=2, eos_token_id=[1] * 300)),
        ("generate", dict(max_new_tokens=3, num_beams=64, eos_token_id=list(range(100)))),
        ("generate", dict(max_new_tokens=3, num_beams=2, eos_token_id=[])),
        ("generate", dict(max_new_tokens=3, num_beams=2, do_sample=True)),
        ("generate", dict(max_new_tokens=3, pad_token_id=2 ** 40)),
        ("generate", dict(max_new_tokens=3, num_beams=3, pad_token_id=2 ** 40)),
        ("call", dict(decoder_input_ids=[[2 ** 40]])), ("call", dict(decoder_input_ids=[[1]] * 5)),
        ("call", dict(decoder_input_ids=[[]])), ("call", dict()),
    ],
    "bert_seqcls": [
        ("call", dict(ids=[[1] * 65])), ("call", dict(token_type_ids=[[5, 0, 0], [0, 0, 0]])),
        ("call", dict(token_type_ids=[[-1, 0, 0], [0, 0, 0]])), ("call", dict(attention_mask=[[0, 0, 0]] * 2)),
        ("call", dict(ids=[[1, 2, 3]], attention_mask=[[1, 1, 1], [1, 1, 1]])),
        ("call", dict(ids=[[2 ** 62]])), ("call", dict(ids=[["a"]])),
    ],
    "vit_cls": [
        ("pixels", dict(pixels=[[[[0.0]]]])), ("pixels", dict(pixels=[[[[float("nan")] * 32] * 32] * 3])),
        ("pixels", dict(pixels=[[[[0.0] * 32] * 32] * 4])), ("pixels", dict(pixels=[])),
    ],
}


def test_absurd_call_arguments_are_refused_quickly(request, tmp_path):
    cases = []
    for name, calls in CALLS.items():
        directory = request.getfixturevalue(name)[0]
        for call in calls:
            cases.append({"dir": directory, "what": f"{name}: {call[0]} {call[1]!r}"[:160], "calls": [list(call)]})
    defects = _run_cases(cases, tmp_path)
    assert not defects, f"{len(defects)} defect(s):\n" + "\n\n".join(defects)


def test_generation_config_pad_beyond_the_vocabulary_with_no_repeat_ngram(llama, tmp_path):
    """A finished row is padded with the model's pad id; with no_repeat_ngram_size the n-gram ban looked that pad up
    as a logit index (pad_token_id 10**12 from generation_config.json wrote far outside the logits)."""
    d = tmp_path / "llama"
    shutil.copytree(llama[0], d)
    gen = json.load(open(d / "generation_config.json"))
    gen.update(no_repeat_ngram_size=2, pad_token_id=10 ** 12)
    json.dump(gen, open(d / "generation_config.json", "w"))
    import numpy as np

    import cpuformer.models as M
    model = M.from_pretrained(str(d))
    rng = np.random.default_rng(0)
    for _ in range(40):  # a batch in which row 0 stops first while row 1 runs on (the rows see the pad)
        ids = rng.integers(3, 120, (2, 3))
        free = model.generate(ids, max_new_tokens=8, eos_token_id=[])
        eos = int(free[0, 3])
        if eos not in free[1, 3:]:
            break
    out = model.generate(ids, max_new_tokens=8, eos_token_id=[eos])
    assert out[0, 3] == eos and (out[0, 4:] == 10 ** 12).all()
    np.testing.assert_array_equal(out[1], free[1, :out.shape[1]])
