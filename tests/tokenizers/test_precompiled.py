"""StripAccents and Precompiled normalizers (cpp/src/tokenizer.cpp) against the `tokenizers` library (test oracle).

Normalizers are observed through a probe tokenizer: no pre-tokenizer and a BPE model whose vocabulary is only the
256 byte-fallback tokens, so every normalized char comes out as its UTF-8 bytes, each token carrying the char's
offsets. Comparing ids and offsets with the library compares the normalized text and its alignments exactly.
"""
from __future__ import annotations

import json

import pytest

import cpuformer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers as N  # noqa: E402

from _corpus import read_lines  # noqa: E402


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


# ---------------------------------------------------------------------------------------------------------------
# Precompiled: charsmaps of SentencePiece models trained here (sentencepiece is test-only)

RULES = ["nmt_nfkc", "nfkc", "nmt_nfkc_cf"]


def _varint(b, i):
    r = s = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << s
        s += 7
        if x < 0x80:
            return r, i


def _proto_field(b, num):
    """The first length-delimited field `num` of a protobuf message (no protobuf package needed)."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            _, i = _varint(b, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n, i = _varint(b, i)
            if f == num:
                return b[i:i + n]
            i += n
        else:
            raise ValueError("unexpected wire type %d" % wt)
    return b""




@pytest.fixture(scope="module")
def spm_models():
    spm = pytest.importorskip("sentencepiece")
    import io
    lines = read_lines("multi30k/train.de", 1000) + read_lines("multi30k/train.fr", 500)
    if not lines:
        pytest.skip("shared/data/multi30k is missing")
    out = {}
    for rule in RULES + ["identity"]:
        m = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=m, vocab_size=200,
                                       model_type="unigram", normalization_rule_name=rule, minloglevel=2)
        proto = m.getvalue()
        out[rule] = (proto, _proto_field(_proto_field(proto, 3), 2))
    return out


@pytest.fixture(scope="module")
def corpus():
    texts = read_lines("multi30k/test.de", 300) + read_lines("multi30k/test.fr", 300)
    texts += read_lines("sst2/train.tsv", 300, column=0, skip_header=True)
    return texts


HARD = ["", " ", "   ", "a  b   c", "  lead and trail  ", "ＡＢＣ１２３！？", "ﬁ ﬂ ﬃ Ǆ ㎏ ℌ", "①½²", "\x01ab", "a\x01b",
        "\x01\x02\x7fab", "\x7f", "\r\n x\r\ny\n\r", "\t\x0b\x0c", "Tiếng Việt", "e\u0301 a\u0308\u0301 x\u0323\u0307",
        "\u0301start", "각 한국어", "\u1100\u1161\u11a8 \u1100\u1161", "👨‍👩‍👧 👍🏽 🇩🇪🇫🇷🇺", "❤️ ✌🏿 🏳️‍🌈",
        "\u00a0\u3000\u200b\u200d\ufeff\u2581", "\u00ad soft", "ｶﾞｷﾞ ｱ", "Ⅻ ⅷ", "İstanbul ΣΑΣ ß", "\ud7a3\u11a8",
        "क्षत्रिय", "\u0e01\u0e33", "\u0915\u093f", "x\u200dy", "\U0001F1E6", "a\u0903b", "\u0600\u0661"]


def test_precompiled_corpus_and_hard_cases(spm_models, corpus):
    for rule in RULES:
        ours, ref = probe(N.Precompiled(spm_models[rule][1]))
        check(ours, ref, HARD + corpus)


def test_precompiled_every_code_point(spm_models):
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    ours, ref = probe(N.Precompiled(spm_models["nmt_nfkc"][1]))
    # "\n" is a cluster break on both sides: each char is its own cluster (an "x" after it would be, too, but
    # combining marks would join the x before them)
    texts = ["".join(chr(c) + "\n" for c in cps[i:i + 4096]) for i in range(0, len(cps), 4096)]
    check(ours, ref, texts)
    # each char after "a", and the first char of a text (the start-deletion offset shift)
    bmp = cps[:0xF800]
    check(ours, ref, ["".join("a" + chr(c) for c in bmp[i:i + 4096]) for i in range(0, len(bmp), 4096)])
    check(ours, ref, [chr(c) + "ab" for c in range(0x20)] + [chr(c) + "b" for c in range(0x7F, 0xC0)])
    ours, ref = probe(N.Precompiled(spm_models["nmt_nfkc_cf"][1]))
    check(ours, ref, ["".join(chr(c) + "\n" for c in bmp[i:i + 4096]) for i in range(0, len(bmp), 4096)])


def test_precompiled_random_strings(spm_models):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    alphabet = st.one_of(
        st.sampled_from(list("ab \n\r\t\x01\x7f\u200d\u200b\u00a0\u3000\u0301\u0308\u0323\u20dd\u0903\u093f\u094d"
                             "\u0915ＡＢ１ﬁ①½ｶﾞ\u1100\u1161\u11a8각\U0001F1E9\U0001F1EA👨👩\U0001F3FD❤\ufe0f️ßİ\u0600")),
        st.characters(max_codepoint=0x10FFFF, blacklist_categories=("Cs",)))
    tokers = [probe(N.Precompiled(spm_models[r][1])) for r in RULES]

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.text(alphabet, max_size=24), min_size=1, max_size=8))
    def run(texts):
        for ours, ref in tokers:
            check(ours, ref, texts)

    run()


def t5_like(proto, charsmap, seq=False):
    """A T5-style tokenizer.json (Precompiled + Metaspace + Unigram) from a SentencePiece model, via the library."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import pre_tokenizers
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    ref = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    norm = N.Precompiled(charsmap)
    if seq:
        norm = N.Sequence([norm, N.Replace(tokenizers.Regex(" {2,}"), "▁")])
    ref.normalizer = norm
    ref.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    ref.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return cpuformer.Tokenizer.from_str(ref.to_str()), ref


def test_t5_like_tokenizer(spm_models, corpus):
    texts = HARD + corpus
    for rule in RULES:
        for seq in (False, True):
            ours, ref = t5_like(*spm_models[rule], seq=seq)
            a, b = ours.encode_batch(texts), ref.encode_batch(texts)
            for text, x, y in zip(texts, a, b):
                assert x.tokens == y.tokens, text
                assert x.ids == y.ids, text
                assert [tuple(o) for o in x.offsets] == y.offsets, text
                assert ours.decode(x.ids) == ref.decode(y.ids), text


def test_malformed_charsmaps(spm_models):
    import base64
    good = spm_models["nmt_nfkc"][1]
    ours, ref = probe(N.Precompiled(good))
    spec = json.loads(ref.to_str())
    assert spec["normalizer"]["type"] == "Precompiled"

    def load(b64):
        d = json.loads(json.dumps(spec))
        d["normalizer"]["precompiled_charsmap"] = b64
        return cpuformer.Tokenizer.from_str(json.dumps(d))

    def enc(b):
        return base64.b64encode(bytes(b)).decode()

    trie = int.from_bytes(good[:4], "little")
    cases = {
        "not valid base64": ["@@@@", good_b64[:-1] if (good_b64 := enc(good)) else "", "QQ=", "QR=="],
        "too short": ["", enc(b"\x00\x00")],
        "does not fit": [enc(good[:4 + trie - 4]), enc((trie + 2).to_bytes(4, "little") + good[4:]),
                         enc(b"\xff\xff\xff\xff" + good[4:])],
        "empty trie": [enc(b"\x00\x00\x00\x00abc")],
        "past the end": [enc(good[:4 + trie]), enc(good[:4] + b"\xff\xff\xff\xff" + good[8:])],
        "UTF-8": [enc(good + b"\xff")],
    }
    for what, blobs in cases.items():
        for b64 in blobs:
            with pytest.raises(ValueError, match=r"precompiled_charsmap"):
                load(b64)
    # a string blob cut short: replacement offsets past the end
    with pytest.raises(ValueError, match="past the end"):
        load(enc(good[:4 + trie + 100]))
    # random corruptions: a clear error or a working normalizer, never a crash
    import random
    rng = random.Random(0)
    for _ in range(200):
        b = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(4, 4 + trie)] = rng.randrange(256)
        try:
            tok = load(enc(b))
        except ValueError as e:
            assert "precompiled_charsmap" in str(e)
            continue
        tok.encode_batch(HARD)
    assert load(enc(good)).encode("ＡＢ").tokens == ours.encode("ＡＢ").tokens


def test_identity_rule_has_no_charsmap(spm_models):
    # SentencePiece's "identity" rule has an empty charsmap: the library rejects it, and so do we
    assert spm_models["identity"][1] == b""
    with pytest.raises(Exception):
        N.Precompiled(b"")
