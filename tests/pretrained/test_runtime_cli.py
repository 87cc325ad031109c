"""The Python-free C++ runtime (cpp/examples/cpuformer_run) on Hugging Face model directories with a tokenizer.json:
embed, classify, generate and translate against the Python API on the same directory (the same tokenizer, the same
core), and its error exits (a one-line message on stderr and exit status 1, never a crash).

The binary is found as tests/test_cpp_runtime.py finds it (its `runner` fixture: CPUFORMER_RUN, else a CMake build
into a temporary folder)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_testlib import SENTENCES, half_copy, load, wordpiece_tokenizer_json, write_st_dir  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "_cpuformer_tests_cpp_runtime", os.path.join(os.path.dirname(__file__), "..", "test_cpp_runtime.py"))
_rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rt)
runner = _rt.runner  # the module-scoped fixture that locates or builds cpuformer_run

TEXTS = ["the cat sat on the mat .", "a dog ran in the park", "numbers like 42 appear here too ."]


def cli(exe, *args, ok=True):
    out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def numbers(out):
    return np.array([[float(v) for v in line.split()] for line in out.stdout.strip().splitlines()], np.float32)


def with_tokenizer(fixture, tmp_path, name):
    """A copy of a fixture directory with the tiny WordPiece tokenizer (ids < the models' vocabulary of 120)."""
    d = tmp_path / name
    shutil.copytree(fixture[0], d)
    tok = wordpiece_tokenizer_json(d)
    assert len(tok) <= 120
    return str(d)


def encode(model, texts):
    enc = model.tokenizer(list(texts), padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def test_embed_matches_mean_pooling_in_python(runner, bert_model, tmp_path):
    d = with_tokenizer(bert_model, tmp_path, "bert")
    model = load(d)
    ids, mask = encode(model, TEXTS)
    h = model.hidden_states(ids, attention_mask=mask)
    m = mask[..., None].astype(np.float32)
    expected = (h * m).sum(1) / m.sum(1)
    got = numbers(cli(runner, d, "embed", *TEXTS))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling,normalize", [(["mean"], False), (["cls"], True), (["max", "mean"], True)])
def test_embed_of_a_sentence_transformers_directory_matches_sentence_encoder(runner, st_base, tmp_path, pooling,
                                                                             normalize):
    import cpuformer.models as M
    d = write_st_dir(tmp_path / "st", st_base, pooling, normalize=normalize, max_seq_length=6)
    expected = M.SentenceEncoder.from_pretrained(d).encode(TEXTS)  # truncated to 6 tokens, as the CLI must
    got = numbers(cli(runner, d, "embed", *TEXTS))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert_seqcls", "roberta_seqcls", "distilbert_seqcls"])
def test_classify_matches_python_logits(runner, request, tmp_path, name):
    d = with_tokenizer(request.getfixturevalue(name), tmp_path, name)
    model = load(d)
    ids, mask = encode(model, TEXTS)
    expected = model(ids, attention_mask=mask)
    got = numbers(cli(runner, d, "classify", *TEXTS))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
def test_generate_matches_python_generate_and_decode(runner, request, tmp_path, name):
    d = with_tokenizer(request.getfixturevalue(name), tmp_path, name)
    model = load(d)
    for text in SENTENCES[:3]:
        ids = np.array([model.tokenizer.encode(text).ids])
        out = model.generate(ids, 12)
        expected = model.tokenizer.decode(out[0].tolist())
        got = cli(runner, d, "generate", text, 12).stdout
        assert got == expected + "\n"
    # sampling: TOP_K 5, temperature 0.8, seed 3 (the same generator as the Python API)
    ids = np.array([model.tokenizer.encode(SENTENCES[0]).ids])
    out = model.generate(ids, 8, do_sample=True, top_k=5, temperature=0.8, seed=3)
    assert cli(runner, d, "generate", SENTENCES[0], 8, 5, 0.8, 3).stdout == model.tokenizer.decode(out[0].tolist()) + "\n"


def test_generate_with_bf16_activations_matches_python(runner, llama, tmp_path):
    import torch
    d, _ = half_copy(llama[1], torch.bfloat16, tmp_path / "bf16")
    wordpiece_tokenizer_json(d)
    model = load(d, activations="bfloat16")
    ids = np.array([model.tokenizer.encode(SENTENCES[1]).ids])
    expected = model.tokenizer.decode(model.generate(ids, 12)[0].tolist())
    assert cli(runner, "--bf16-activations", d, "generate", SENTENCES[1], 12).stdout == expected + "\n"
    f32 = with_tokenizer(llama, tmp_path, "f32")
    out = cli(runner, "--bf16-activations", f32, "generate", SENTENCES[1], 4, ok=False)
    assert out.returncode != 0 and "bf16 activations" in out.stderr


@pytest.mark.parametrize("name", ["t5", "marian", "bart"])
@pytest.mark.parametrize("beams", [1, 3])
def test_translate_matches_python_seq2seq_generate_and_decode(runner, request, tmp_path, name, beams):
    d = with_tokenizer(request.getfixturevalue(name), tmp_path, name)
    model = load(d)
    for text in SENTENCES[:3]:
        ids = np.array([model.tokenizer.encode(text).ids])
        out = model.generate(ids, 10, num_beams=beams)
        expected = model.tokenizer.decode(out[0].tolist())
        got = cli(runner, d, "translate", text, 10, beams).stdout
        assert got == expected + "\n"


def _one_line_error(out):
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpuformer_run: "), out.stderr
    return lines[0]


def test_error_exits(runner, llama, bert_seqcls, t5, tmp_path):
    dec = with_tokenizer(llama, tmp_path, "llama")
    enc = with_tokenizer(bert_seqcls, tmp_path, "bert")
    s2s = with_tokenizer(t5, tmp_path, "t5")
    _one_line_error(cli(runner, tmp_path / "no-such-dir", "embed", "x", ok=False))
    assert "unknown command" in _one_line_error(cli(runner, enc, "frobnicate", "x", ok=False))
    assert "decoder" in _one_line_error(cli(runner, enc, "generate", "x", ok=False))
    assert "encoder-decoder" in _one_line_error(cli(runner, dec, "translate", "x", ok=False))
    assert "classify" in _one_line_error(cli(runner, dec, "classify", "x", ok=False))
    _one_line_error(cli(runner, dec, "generate", "x", "many", ok=False))
    _one_line_error(cli(runner, dec, "generate", "x", -1, ok=False))
    _one_line_error(cli(runner, dec, "generate", "x", 2 ** 31 - 1, ok=False))  # past max_new_tokens' 2^20
    _one_line_error(cli(runner, s2s, "translate", "x", 5, 0, ok=False))
    _one_line_error(cli(runner, s2s, "translate", "x", 5, 100000, ok=False))
    _one_line_error(cli(runner, dec, ok=False))  # usage
    _one_line_error(cli(runner, "--bogus", dec, "generate", "x", ok=False))
    # a damaged directory: no tokenizer, a bad config, a truncated weight file
    broken = tmp_path / "broken"
    shutil.copytree(dec, broken)
    os.remove(broken / "tokenizer.json")
    assert "tokenizer.json" in _one_line_error(cli(runner, broken, "generate", "x", ok=False))
    shutil.copy(os.path.join(dec, "tokenizer.json"), broken / "tokenizer.json")
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": -3}')
    assert "vocab_size" in _one_line_error(cli(runner, broken, "generate", "x", ok=False))
    shutil.copy(os.path.join(dec, "config.json"), broken / "config.json")
    raw = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    assert "model.safetensors" in _one_line_error(cli(runner, broken, "generate", "x", ok=False))
    # an empty text encodes to [CLS] [SEP]; a text of only unknown characters still runs
    cli(runner, enc, "classify", "", "☃☃")
