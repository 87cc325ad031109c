"""Tokenizers, padding, readers, metrics, optimizers, schedules and the safetensors reader/writer."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cpuformer.nn as nn
from cpuformer.data import (CharTokenizer, ReadReport, Seq2SeqDataset, WordTokenizer, batch_indices, load_tokenizer,
                            pad_sequences, read_parallel, read_tsv)
from cpuformer.io import SafetensorsError, load_safetensors, save_safetensors
from cpuformer.train import SGD, AdamW, bleu, inverse_sqrt, precision_recall_f1, warmup_cosine, warmup_linear

try:
    import torch
except ImportError:
    torch = None


# ------------------------------------------------------------------------------------------------ tokenizers

def test_char_tokenizer_round_trip_and_save(tmp_path):
    text = "To be, or not to be: that is the question.\nÉté!"
    tok = CharTokenizer.from_corpus([text])
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("to be?", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.encode("?") == [tok.unk_id]
    tok.save(str(tmp_path / "tok.json"))
    again = load_tokenizer(str(tmp_path / "tok.json"))
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos


def test_word_tokenizer_vocabulary_limits():
    corpus = ["the cat sat on the mat .", "the dog sat !", "a cat"]
    tok = WordTokenizer.from_corpus(corpus, min_freq=2)
    assert tok.itos[4:] == ["the", "cat", "sat"]  # by frequency, ties alphabetical
    small = WordTokenizer.from_corpus(corpus, max_size=5)
    assert len(small) == 5 and small.itos[4] == "the"
    assert tok.decode(tok.encode("The cat sat .")) == "the cat sat"  # "." is rare -> <unk>, dropped by decode
    assert tok.decode(tok.encode("The cat sat ."), skip_special=False) == "the cat sat <unk>"
    assert tok.encode("the unicorn") == [tok.stoi["the"], tok.unk_id]
    assert WordTokenizer.split("Don't stop, Bob!") == ["don't", "stop", ",", "bob", "!"]
    assert tok.decode([tok.stoi["the"], tok.eos_id, tok.stoi["cat"]]) == "the"  # stops at EOS


def test_tokenizer_errors(tmp_path):
    tok = CharTokenizer.from_corpus(["abc"])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([99])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "bpe", "tokens": []}))
    with pytest.raises(ValueError, match="not a cpuformer tokenizer"):
        load_tokenizer(str(bad))
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(str(bad))


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_char_tokenizer_round_trips_any_text(text):
    tok = CharTokenizer.from_corpus([text])
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------------ padding, batching

def test_pad_sequences_keras_semantics():
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    np.testing.assert_array_equal(pad_sequences(seqs, maxlen=4), [[0, 1, 2, 3], [0, 0, 0, 4], [6, 7, 8, 9]])
    np.testing.assert_array_equal(pad_sequences(seqs, maxlen=4, padding="post", truncating="post", value=-1),
                                  [[1, 2, 3, -1], [4, -1, -1, -1], [5, 6, 7, 8]])
    assert pad_sequences(seqs).shape == (3, 5)
    assert pad_sequences([[]], maxlen=2).tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="padding"):
        pad_sequences(seqs, padding="middle")


def test_batch_indices_cover_everything_once_and_bucket():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=1000)
    batches = batch_indices(1000, 32, np.random.default_rng(1), lengths=lengths, bucket=True)
    allidx = np.sort(np.concatenate(batches))
    np.testing.assert_array_equal(allidx, np.arange(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 10  # similar lengths together
    again = batch_indices(1000, 32, np.random.default_rng(1), lengths=lengths, bucket=True)
    assert all((a == b).all() for a, b in zip(batches, again))  # seeded


def test_seq2seq_dataset_shifts_and_pads():
    ds = Seq2SeqDataset([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0, bos_id=2, eos_id=3)
    (src, tgt_in), tgt_out = ds[np.array([0, 1])]
    np.testing.assert_array_equal(src, [[5, 6], [7, 0]])
    np.testing.assert_array_equal(tgt_in, [[2, 8, 9, 10], [2, 11, 0, 0]])
    np.testing.assert_array_equal(tgt_out, [[8, 9, 10, 3], [11, 3, -100, -100]])


# ------------------------------------------------------------------------------------------------ readers

def test_read_tsv_header_errors_and_skipping(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbad\t0\nbroken line\nworse\tx\n")
    with pytest.raises(ValueError, match=r"data.tsv:4: expected 2 tab-separated fields, found 1"):
        read_tsv(str(path), label_column=1)
    report = ReadReport()
    rows = read_tsv(str(path), label_column=1, skip_malformed=True, report=report)
    assert rows == [("good film", 1), ("bad", 0)]
    assert report.skipped == 2 and report.skipped_lines == [4, 5]


def test_read_parallel_checks_line_counts(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.fr").write_text("un\ndeux\n")
    (tmp_path / "b.fr").write_text("un\n")
    assert read_parallel(str(tmp_path / "a.en"), str(tmp_path / "a.fr")) == [("one", "un"), ("two", "deux")]
    with pytest.raises(ValueError, match="has 2 lines but"):
        read_parallel(str(tmp_path / "a.en"), str(tmp_path / "b.fr"))


# ------------------------------------------------------------------------------------------------ metrics

def test_precision_recall_f1_macro():
    pred = np.array([0, 1, 1, 1, 0, 2])
    gold = np.array([0, 1, 0, 1, 1, 2])
    m = precision_recall_f1(pred, gold)
    # class 0: p=1/2 r=1/2; class 1: p=2/3 r=2/3; class 2: p=1 r=1
    assert math.isclose(m["precision"], (0.5 + 2 / 3 + 1) / 3)
    assert math.isclose(m["recall"], (0.5 + 2 / 3 + 1) / 3)
    assert math.isclose(m["f1"], (0.5 + 2 / 3 + 1) / 3)


def test_bleu_known_values():
    assert math.isclose(bleu([["a", "b", "c", "d", "e"]], [["a", "b", "c", "d", "e"]]), 100.0)
    assert bleu([["x", "y", "z", "w"]], [["a", "b", "c", "d"]]) == 0.0
    # hand-computed: hyp "the cat sat on the mat", ref "the cat is on the mat"
    h, r = "the cat sat on the mat".split(), "the cat is on the mat".split()
    p = [5 / 6, 3 / 5, 1 / 4]  # modified 1-, 2-, 3-gram precisions; no 4-gram matches, so BLEU-4 is 0
    expected = 100 * math.exp(sum(math.log(x) for x in p) / 3)
    assert math.isclose(bleu([h], [r], max_n=3), expected, rel_tol=1e-9)
    assert bleu([h], [r], smooth="none") == 0.0
    # sacreBLEU's default "exp" smoothing: the zero 4-gram count becomes 1 / (2 * 3 4-grams)
    smoothed = 100 * math.exp((sum(math.log(x) for x in p) + math.log(1 / 6)) / 4)
    assert math.isclose(bleu([h], [r]), smoothed, rel_tol=1e-9)
    short = bleu([["the", "cat"]], [["the", "cat", "sat", "on", "the", "mat"]], max_n=2)
    assert math.isclose(short, 100 * math.exp(1 - 3))  # brevity penalty exp(1 - 6/2)


# ------------------------------------------------------------------------------------------------ optimizers

@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("kind", ["adamw", "sgd", "sgd_nesterov"])
def test_optimizers_match_torch(rng, kind):
    lin = nn.Linear(6, 5)
    t_lin = torch.nn.Linear(6, 5)
    t_lin.load_state_dict({k: torch.tensor(v.copy()) for k, v in lin.state_dict().items()})
    if kind == "adamw":
        ours = AdamW(lin, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, decay_filter=lambda n, p: True)
        theirs = torch.optim.AdamW(t_lin.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        ours = SGD(lin, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=kind == "sgd_nesterov")
        theirs = torch.optim.SGD(t_lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01,
                                 nesterov=kind == "sgd_nesterov")
    for _ in range(4):
        g_w, g_b = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
        lin.weight.grad[...], lin.bias.grad[...] = g_w, g_b
        t_lin.weight.grad, t_lin.bias.grad = torch.tensor(g_w), torch.tensor(g_b)
        ours.step()
        theirs.step()
    np.testing.assert_allclose(lin.weight.data, t_lin.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.bias.data, t_lin.bias.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_skips_decay_on_biases_and_norms_by_default():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    opt = AdamW(layer, lr=1e-3)
    assert opt.decay["linear1.weight"] and opt.decay["self_attn.in_proj_weight"]
    assert not opt.decay["linear1.bias"] and not opt.decay["norm1.weight"]


def test_schedules():
    s = warmup_cosine(1.0, 10, 110, min_lr=0.1)
    assert math.isclose(s(0), 0.1) and math.isclose(s(9), 1.0)
    assert math.isclose(s(60), 0.55) and math.isclose(s(110), 0.1)
    lin = warmup_linear(2.0, 4, 14)
    assert math.isclose(lin(3), 2.0) and math.isclose(lin(9), 1.0) and lin(20) == 0.0
    inv = inverse_sqrt(512, warmup_steps=4000)
    peak = 512 ** -0.5 * 4000 ** -0.5
    assert math.isclose(inv(3999), peak) and inv(100) < peak and inv(20000) < peak


# ------------------------------------------------------------------------------------------------ safetensors

def test_safetensors_round_trip_is_bit_exact(tmp_path, rng):
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32), "ids": np.arange(7, dtype=np.int64),
               "h": rng.standard_normal(4).astype(np.float16), "flag": np.array([True, False]),
               "scalar": np.float32(2.5).reshape(())}
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, tensors, {"config": '{"a": 1}'})
    loaded, meta = load_safetensors(path)
    assert meta == {"config": '{"a": 1}'}
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert loaded[k].tobytes() == v.tobytes()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert (8 + n) % 8 == 0  # data section aligned


def _write_raw(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("case", ["truncated", "header_past_end", "bad_json", "unknown_dtype", "out_of_bounds",
                                  "size_mismatch", "overlap", "not_object"])
def test_safetensors_rejects_malformed_files(tmp_path, case):
    path = str(tmp_path / "bad.safetensors")
    good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "truncated":
        open(path, "wb").write(b"\x01\x02")
    elif case == "header_past_end":
        open(path, "wb").write((10**6).to_bytes(8, "little") + b"{}")
    elif case == "bad_json":
        open(path, "wb").write((4).to_bytes(8, "little") + b"{{{{")
    elif case == "unknown_dtype":
        _write_raw(path, {"a": {**good, "dtype": "Q7"}}, bytes(8))
    elif case == "out_of_bounds":
        _write_raw(path, {"a": {**good, "data_offsets": [0, 800]}}, bytes(8))
    elif case == "size_mismatch":
        _write_raw(path, {"a": {**good, "shape": [3]}}, bytes(8))
    elif case == "overlap":
        _write_raw(path, {"a": good, "b": {**good, "data_offsets": [4, 12]}}, bytes(16))
    elif case == "not_object":
        _write_raw(path, [1, 2])
    with pytest.raises(SafetensorsError):
        load_safetensors(path)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300))
def test_safetensors_reader_never_crashes_on_mutated_files(tmp_path_factory, noise, cut):
    folder = tmp_path_factory.mktemp("fuzz")
    path = os.path.join(folder, "m.safetensors")
    save_safetensors(path, {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.int64)})
    raw = bytearray(open(path, "rb").read())
    for i, byte in enumerate(noise):  # flip bytes across header and data
        raw[(i * 37 + cut) % len(raw)] ^= byte
    raw = raw[: max(0, len(raw) - cut % 40)]
    open(path, "wb").write(bytes(raw))
    try:
        tensors, _ = load_safetensors(path)
    except SafetensorsError:
        return
    for t in tensors.values():  # whatever parsed is self-consistent
        assert isinstance(t, np.ndarray)


def test_bleu_matches_sacrebleu_on_real_sentences():
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    from cpuformer.train.metrics import tokenize_13a
    from data_path import DATA
    data = os.path.join(DATA, "multi30k")
    if not os.path.isdir(data):
        pytest.skip("../shared/data is not beside the checkout")
    refs = []
    for lang in ("en", "de", "fr"):
        with open(os.path.join(data, f"validation.{lang}"), encoding="utf-8") as f:
            refs += f.read().splitlines()[:400]
    odd = ["3.5, 1,000 a-b 2-3 &amp; &quot;x&quot; <skipped> 1.2.3 «é» ‘q’ $5 x/y", "", "  spaced   out  ", "x-\ny"]
    for line in refs + odd:
        assert tokenize_13a(line) == Tokenizer13a()(line).split(), line
    rng = np.random.default_rng(0)
    for trial in range(6):  # shuffled words, cut sentences, empty ones: every smoothing and brevity branch
        hyps = []
        for r in refs:
            words = r.split()
            choice = rng.integers(4)
            hyps.append(" ".join(rng.permutation(words)) if choice == 0 else r[: rng.integers(len(r) + 1)]
                        if choice == 1 else "" if choice == 2 and trial % 2 else r)
        assert math.isclose(bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, [refs]).score, rel_tol=1e-9, abs_tol=1e-9)
    for hyp, ref in (("the cat", "the cat sat on the mat"), ("x y z w", "a b c d"), ("", "a b"), ("a b", "")):
        assert math.isclose(bleu([hyp], [ref]), sacrebleu.corpus_bleu([hyp], [[ref]]).score, abs_tol=1e-9)
