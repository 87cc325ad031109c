"""cpp/src/unicode.{h,cpp}: Unicode tables and algorithms against the `tokenizers` library (the test-only oracle).

Each table is checked over every code point (surrogates excluded: they cannot cross into Rust) through the
`tokenizers` component that uses it, so the Unicode version of each table is tested, not assumed (tokenizers.md §5.1):
General Category 8.0 (BertPreTokenizer, BertNormalizer), 16.0 (Oniguruma `\\p{..}` in Split), 17.0 (Rust
`is_numeric` in Digits), White_Space and Alphabetic (Rust regex `\\w`/`\\s` in Whitespace), lowercase 17.0
(Lowercase), normalization 9.0 (NFD/NFKD/NFC/NFKC, including the alignments).
"""
from __future__ import annotations

import pytest

from cpuformer import _core

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import PreTokenizedString, Regex, normalizers, pre_tokenizers  # noqa: E402

ALL = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
CHUNK = 0x10000
FORMS = ["NFD", "NFKD", "NFC", "NFKC"]
ORACLE_NORMALIZER = {"NFD": normalizers.NFD, "NFKD": normalizers.NFKD, "NFC": normalizers.NFC,
                     "NFKC": normalizers.NFKC}


def chunks(cps, size=CHUNK):
    for i in range(0, len(cps), size):
        yield cps[i:i + size]


def cat(cp, version):
    return _core._unicode_category(cp, version)


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, a[max(0, i - 3):i + 3], b[max(0, i - 3):i + 3]
    return min(len(a), len(b)), a[-3:], b[-3:]


def test_versions_string():
    v = _core._unicode_versions()
    assert "8.0" in v and "16.0" in v and "17.0" in v and "normalization 9.0" in v and "lowercase 17.0" in v


# ---------------------------------------------------------------------------------------------------------------
# General Category
def test_category_basics():
    assert cat(ord("A"), 8) == "Lu" and cat(ord("a"), 16) == "Ll" and cat(ord("5"), 17) == "Nd"
    assert cat(0x0301, 8) == "Mn" and cat(0x00A0, 16) == "Zs" and cat(0x2028, 17) == "Zl"
    assert cat(0xD800, 17) == "Cs" and cat(0xE000, 8) == "Co" and cat(0x10FFFD, 16) == "Co"
    assert cat(0x10FFFF, 17) == "Cn" and cat(0x110000, 17) == "Cn" and cat(0xFFFFFFFF, 8) == "Cn"
    assert cat(0xE0001, 8) == "Cf" and cat(0xE0100, 16) == "Mn"
    # Age: 😀 (6.1) everywhere; 🥰 (11.0) not in 8.0; Garay (16.0); Beria Erfe (17.0)
    assert [cat(0x1F600, v) for v in (8, 16, 17)] == ["So", "So", "So"]
    assert [cat(0x1F970, v) for v in (8, 16, 17)] == ["Cn", "So", "So"]
    assert [cat(0x10D50, v) for v in (8, 16, 17)] == ["Cn", "Lu", "Lu"]
    assert [cat(0x16EA0, v) for v in (8, 16, 17)] == ["Cn", "Cn", "Lu"]
    # GC changes after 8.0 (the 8.0 value is what unicode_categories has)
    assert [cat(0x1885, v) for v in (8, 16)] == ["Lo", "Mn"]
    assert [cat(0x1734, v) for v in (8, 16)] == ["Mn", "Mc"]
    assert [cat(0xA9BD, v) for v in (8, 16)] == ["Mc", "Mn"]
    assert [cat(0x111C9, v) for v in (8, 16)] == ["Po", "Mn"]
    assert [cat(0x166D, v) for v in (8, 16)] == ["Po", "So"]


CATEGORIES = ["Cn", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi",
              "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co"]   # unicode.h's order


def matched_by(pattern, cps):
    """Code points of cps (one string) that the Oniguruma pattern matches, via Split(..., 'removed')."""
    kept = set()
    text = "".join(map(chr, cps))
    for _, (s, e) in pre_tokenizers.Split(Regex(pattern), "removed").pre_tokenize_str(text):
        kept.update(range(s, e))
    return {cps[i] for i in range(len(cps)) if i not in kept}


def test_category_16_is_oniguruma():
    """Unicode 16.0 categories = Oniguruma's \\p{..} (Split/Replace regexes), over every code point: five regexes, the
    k-th matching the categories whose index has bit k set, give each char's category exactly."""
    index = {c: 0 for c in ALL}
    for bit in range(5):
        pattern = "[" + "".join(r"\p{%s}" % gc for i, gc in enumerate(CATEGORIES) if i >> bit & 1 and gc != "Cs") + "]"
        for c in matched_by(pattern, ALL):
            index[c] |= 1 << bit
    bad = [(hex(c), CATEGORIES[index[c]], cat(c, 16)) for c in ALL if CATEGORIES[index[c]] != cat(c, 16)]
    assert not bad, bad[:10]


def test_category_8_is_bert():
    """Unicode 8.0 categories = unicode_categories: punctuation (BertPreTokenizer), Mn (strip_accents) and
    Cc/Cf/Co (clean_text), over every code point."""
    # Punctuation: each char between two 'a's is isolated iff it is punctuation; whitespace (Rust) is removed.
    text = "".join("a" + chr(c) for c in ALL) + "a"
    got = set()
    for piece, (s, e) in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(text):
        if e - s == 1 and s % 2 == 1:
            got.add(ALL[s // 2])
    ascii_punct = {c for c in range(0x21, 0x7F) if not chr(c).isalnum()}
    want = {c for c in ALL if (cat(c, 8).startswith("P") or c in ascii_punct)
            and not _core._unicode_property(c, "white_space")}
    assert got == want, sorted(got ^ want)[:10]
    # Mn: strip_accents is NFD then drop Mn (8.0); compare per chunk against our NFD + filter.
    strip = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True,
                                       lowercase=False)
    for part in chunks(ALL):
        text = "".join(chr(c) + " " for c in part)
        nfd, _ = _core._unicode_normalize(text, "NFD")
        want = "".join(ch for ch in nfd if cat(ord(ch), 8) != "Mn")
        got = strip.normalize_str(text)
        assert got == want, first_difference(got, want)
    # Control: clean_text deletes Cc/Cf/Co (8.0) except \t\n\r, U+0000 and U+FFFD; maps whitespace to ' '.
    clean = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                       lowercase=False)
    text = "".join(chr(c) for c in ALL)
    got = clean.normalize_str(text)

    def cleaned(c):
        if c in (0, 0xFFFD) or (cat(c, 8) in ("Cc", "Cf", "Co") and c not in (9, 10, 13)):
            return ""
        return " " if c in (9, 10, 13) or _core._unicode_property(c, "white_space") else chr(c)

    want = "".join(cleaned(c) for c in ALL)
    assert got == want, first_difference(got, want)


def test_category_17_numeric_is_rust():
    """Unicode 17.0 categories = Rust std: char::is_numeric (N*) in the Digits pre-tokenizer."""
    text = "".join("a" + chr(c) for c in ALL) + "a"
    got = set()
    for piece, (s, e) in pre_tokenizers.Digits(individual_digits=True).pre_tokenize_str(text):
        if e - s == 1 and s % 2 == 1:
            got.add(ALL[s // 2])
    want = {c for c in ALL if cat(c, 17) in ("Nd", "Nl", "No")}
    assert got == want, sorted(got ^ want)[:10]


# ---------------------------------------------------------------------------------------------------------------
# White_Space, Alphabetic
def test_white_space():
    ws = [c for c in range(0x110000) if _core._unicode_property(c, "white_space")]
    assert ws == [*range(9, 14), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                  0x3000]
    assert matched_by(r"\s", ALL) == set(ws)   # Oniguruma \s


def test_alphabetic_word_chars_are_rust_regex():
    """Rust regex \\w = Alphabetic ∪ M ∪ Nd ∪ Pc ∪ Join_Control (16.0), \\s = White_Space: Whitespace pre-tokenizer
    (\\w+|[^\\w\\s]+) over every code point."""
    text = "".join("a" + chr(c) for c in ALL) + "a"
    pieces = pre_tokenizers.Whitespace().pre_tokenize_str(text)
    word, space = set(), set()
    covered = set()
    for piece, (s, e) in pieces:
        covered.update(range(s, e))
        if piece.startswith("a") and e - s > 1:   # a run of word chars: every odd position in it is a word char
            word.update(ALL[i // 2] for i in range(s + 1, e, 2))
    space = {ALL[i // 2] for i in range(1, len(text), 2) if i not in covered}

    def is_word(c):
        return (_core._unicode_property(c, "alphabetic") or cat(c, 16) in ("Mn", "Mc", "Me", "Nd", "Pc")
                or c in (0x200C, 0x200D))

    want_word = {c for c in ALL if is_word(c)}
    want_space = {c for c in ALL if _core._unicode_property(c, "white_space")}
    assert space == want_space
    assert word == want_word, sorted(word ^ want_word)[:10]


# ---------------------------------------------------------------------------------------------------------------
# Lowercase
def test_lowercase_is_rust_17():
    assert _core._unicode_lower("AİΣΑΣ\U00016EA0") == "ai\u0307σασ\U00016EBB"
    lower = normalizers.Lowercase()
    for part in chunks(ALL):
        text = "".join(map(chr, part))
        got, want = _core._unicode_lower(text), lower.normalize_str(text)
        assert got == want, first_difference(got, want)


@pytest.mark.parametrize("bad", [b"\xff", b"\x80", b"a\xc3", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
                                 b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xe2(\xa1"])
def test_utf8_rejects_invalid(bad):
    """_unicode_lower goes through utf8_to_utf32: overlong forms, surrogates, > U+10FFFF, truncation are errors."""
    with pytest.raises(ValueError):
        _core._unicode_lower(bad)


def test_utf8_round_trip_edges():
    text = "\x00\x7f\x80\u07ff\u0800\ud7ff\ue000\uffff\U00010000\U0010ffff"
    assert _core._unicode_lower(text) == text
    assert _core._unicode_lower(text.encode()) == text


# ---------------------------------------------------------------------------------------------------------------
# Normalization
@pytest.mark.parametrize("form", FORMS)
def test_normalize_every_code_point(form):
    oracle = ORACLE_NORMALIZER[form]()
    for part in chunks(ALL):
        text = "".join(map(chr, part))
        got, changes = _core._unicode_normalize(text, form)
        want = oracle.normalize_str(text)
        assert got == want, first_difference(got, want)
        assert len(changes) == len(got)
        assert sum(1 - c for c in changes) == len(text)


def test_combining_classes():
    """CCC (9.0) of every code point: a mark after U+0345 (ccc 240) moves before it iff 0 < ccc < 240."""
    nfd = normalizers.NFD()
    for part in chunks(ALL):
        text = "".join("a\u0345" + chr(c) + " " for c in part)
        got, _ = _core._unicode_normalize(text, "NFD")
        want = nfd.normalize_str(text)
        assert got == want, first_difference(got, want)


SAMPLES = [
    "",
    "hello",
    "e\u0301a\u0300\u0316b",                       # composition, reordering
    "x\u0345\u0316\u0301y",                         # reordering only
    "\u1e0b\u0323 \u1e0d\u0307 d\u0307\u0323 d\u0323\u0307",   # dot above/below in every order
    "\u0041\u030a \u212b \u00c5 \u0041\u0328\u0301",           # Å forms, singleton (Angstrom)
    "\uac00\uac01 \u1100\u1161\u11a8 \u1100\u1161 \uac00\u11a8 \u1100\u0301\u1161",   # Hangul LV/LVT, blocked
    "\ufb01\ufb03 \u2460 \u00bd \u3300 \ufdfa \u1e9b\u0323",       # compatibility expansions
    "\u0130\u0049\u0307 \u03a3\u0391\u03a3",                        # İ
    "\U0001f600\U0001f44d\U0001f3fd a\u200dz \U0001f468\u200d\U0001f469\u200d\U0001f467",   # emoji, ZWJ
    "\u0f73\u0f75\u0f81 \u0344 \u0958 \u2adc\u0338",               # non-starter decompositions, exclusions
    "\u0915\u093c \u09c7\u09be \u0b47\u0b3e \u0dd9\u0dcf\u0dca \u1025\u102e",   # Indic two-part vowels
    "\U000110a5\U000110ba \U00011131\U00011127 \U0001d15e\U0001d165",
    "\u0301abc \u0301\u0301e",                      # leading marks
    "\U0001fbf0\U0001fbf9 \ua7f2 \U00010781",       # decompositions newer than 9.0: unchanged
    "Tiếng Việt: Nguyễn Thị Minh Khai, phở",
    "Ελληνικά ά ά ᾅ ῼ",
    "日本語のテキスト ｶﾀｶﾅ ﾊﾟ ガ ｶﾞ",
    "Ａｂｃ１２３ ﹏ ㈱ ㍻ ㎏",
    "z\u0301\u0302\u0303\u0304\u0305\u0306\u0307\u0308\u0309\u030a\u030b\u0316\u0317\u0318\u0319",
]


def replay(n_source, changes):
    """Per output char, the source char range under tokenizers' NormalizedString::transform rules."""
    out, pos = [], 0
    for c in changes:
        if c > 0:
            out.append((pos - 1, pos) if pos > 0 else (0, 0))
        else:
            out.append((pos, pos + 1))
            pos += 1 - c
    assert pos == n_source
    return out


def oracle_alignments(text, form):
    p = PreTokenizedString(text)
    p.normalize(lambda ns: getattr(ns, form.lower())())
    pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated").pre_tokenize(p)
    return [(s, e) for _, (s, e), _ in p.get_splits("original", "char")]


@pytest.mark.parametrize("form", FORMS)
def test_normalize_alignments(form):
    oracle = ORACLE_NORMALIZER[form]()
    for text in SAMPLES:
        got, changes = _core._unicode_normalize(text, form)
        assert got == oracle.normalize_str(text), text
        assert replay(len(text), changes) == oracle_alignments(text, form), (form, text, got, changes)


@pytest.mark.parametrize("form", FORMS)
def test_normalize_alignments_every_decomposable_char(form):
    """Alignments for each code point that changes under the form, with marks around it."""
    oracle = ORACLE_NORMALIZER[form]()
    changing = [c for c in ALL if oracle.normalize_str(chr(c)) != chr(c)]
    for part in chunks(changing, 500):
        text = "".join("a" + chr(c) + "\u0316\u0301" for c in part)
        got, changes = _core._unicode_normalize(text, form)
        assert got == oracle.normalize_str(text)
        assert replay(len(text), changes) == oracle_alignments(text, form)


def test_normalize_rejects_bad_form():
    with pytest.raises(ValueError):
        _core._unicode_normalize("a", "NFX")
