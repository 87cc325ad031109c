"""The Python-free C++ runtime (cpp/examples/cpuformer_run) against the Python models on the same saved files.

.ci/run builds the example and points CPUFORMER_RUN at it; elsewhere the test builds it with CMake into a temporary
folder (skipped when cmake or a compiler is missing)."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import cpuformer
from cpuformer.models import GPT, BertModel, TransformerClassifier, mean_pool

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
