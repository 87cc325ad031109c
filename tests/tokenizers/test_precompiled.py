"""StripAccents and Precompiled normalizers (cpp/src/tokenizer.cpp) against the `tokenizers` library (test oracle).

Normalizers are observed through a probe tokenizer: no pre-tokenizer and a BPE model whose vocabulary is only the
256 byte-fallback tokens, so every normalized char comes out as its UTF-8 bytes, each token carrying the char's
offsets. Comparing ids and offsets with the library compares the normalized text and its alignments exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import cpuformer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers as N  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")


def probe(normalizer):
    vocab = {"<unk>": 0}
    for b in range(256):
        vocab["<0x%02X>" % b] = b + 1
    ref = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    ref.normalizer = normalizer
    ref.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return cpuformer.Tokenizer.from_str(ref.to_str()), ref


def check(ours, ref, texts):
    a = ours.encode_batch(texts)
    b = ref.encode_batch(texts)
    for text, x, y in zip(texts, a, b):
        if x.ids != y.ids or [tuple(o) for o in x.offsets] != y.offsets:
            got = ours.decode(x.ids)
            want = ref.decode(y.ids)
            assert got == want, f"normalized text differs for {text!r}"
            assert [tuple(o) for o in x.offsets] == y.offsets, f"offsets differ for {text!r} -> {want!r}"
            assert x.ids == y.ids, text


# ---------------------------------------------------------------------------------------------------------------
# StripAccents: deletes GC M* of Unicode 9.0 (no decomposition)

def test_strip_accents_every_code_point():
    ours, ref = probe(N.StripAccents())
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    # each char followed by "x": a deleted char must leave the next char's offsets intact
    texts = ["".join(chr(c) + "x" for c in cps[i:i + 4096]) for i in range(0, len(cps), 4096)]
    check(ours, ref, texts)
    removed = sum(1 for c in cps if N.StripAccents().normalize_str(chr(c)) == "")
    assert removed == 2097  # Unicode 9.0 M*, as the oracle 0.23.3 has it


def test_strip_accents_after_nfd():
    ours, ref = probe(N.Sequence([N.NFD(), N.StripAccents(), N.Lowercase()]))
    texts = ["Tiếng Việt", "\u0301\u0302start", "Ångström ﬁ é", "각 한국어", "", "a\u20dd\u0488b", "ṩ\u0323"]
    check(ours, ref, texts)
