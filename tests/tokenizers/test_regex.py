"""cpp/src/regex.{h,cpp}: the pre-tokenizer regex engine against the `tokenizers` library (the test-only oracle).

The oracle is `pre_tokenizers.Split(Regex(p), behavior="isolated")`, which runs Oniguruma through the `onig` crate's
find_iter: every match and every gap between matches is one piece, so comparing piece offsets compares the matches
(tokenizers.md §2.4, §3.3). Where a piece's kind matters (a char class over all code points), behavior="removed"
keeps only the gaps. `_core._regex_find_all(pattern, text)` returns (begin, end) **char** offsets, empty matches
included; it runs the UTF-8 entry point (byte offsets) and maps the bytes back to chars.
"""
from __future__ import annotations

import os
import random
import time

import pytest

from cpuformer import _core

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, pre_tokenizers  # noqa: E402

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35 = QWEN2.replace(r"\p{L}+", r"[\p{L}\p{M}]+").replace(r"[^\s\p{L}\p{N}]+", r"[^\s\p{L}\p{M}\p{N}]+")
O200K = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
CLIP = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# cl100k as tiktoken writes it, minus `\p{N}{1,3}+` (a quantifier on a quantifier in Oniguruma's Ruby syntax).
CL100K_TIKTOKEN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|"
                   r"\s++$|\s*[\r\n]|\s+(?!\S)|\s")
PATTERNS = {"gpt2": GPT2, "llama3": LLAMA3, "qwen2": QWEN2, "qwen35": QWEN35, "o200k": O200K, "clip": CLIP,
            "cl100k_tiktoken": CL100K_TIKTOKEN}

from data_path import DATA  # CPUFORMER_TEST_DATA, else ../shared/data

HARD = [
    "", "a", " ", "  ", "\n", "\r\n", "\t", "'", "'s", "x'", "Hello world", "Hello, world!  How are you?",
    "I'M here, you'LL see, they'Re, we'VE, she'D, it'S, don'T", "x'ſa 'ſ 'ſt 'K 'k \u212a'\u212a",
    "'s's'S'ſ't'T're'RE'rE've'VE'm'M'll'LL'lL'd'D", "I’m curly apostrophe", "''''s''",
    "  x  y  ", "x  \t  y", "(hello) x\t\tfoo", "end   ", "   start", " \u00a0x\u00a0\u00a0y", "a\u3000\u3000b",
    "123456 ½12345 1,234.56 ١٢٣٤٥ ١٢٣ x2y3 ²³", "Ⅷ ⅷ 𝟙𝟚𝟛",
    "😀😀!!\r\nfoo", "  \t\nfoo", "a\n\n\nb", "a \n \n b", "a\r\rb", "line1\r\nline2\r\n", "\x85\u2028\u2029x",
    "👨‍👩‍👧‍👦 family 🇩🇪 flag 👍🏽 thumbs", "e\u0301 NFD a\u0308b \u0301x", "中文字符 test 日本語のテキスト 한국어",
    "مرحبا بالعالم ١٢٣", "नमस्ते दुनिया", "ไทย ภาษา", "Ελληνικά ΣΊΣΥΦΟΣ", "Ǆǅǆ ǈ ʰʲ", "ß SS ﬆ ﬁ",
    "tab\tseparated\tvalues", "x\x00y\x01z\x1f", "\ufeffbom \u200bzwsp \u200dzwj", "a/b/c\n/d", "foo's bar'll",
    "\U0001F600\U0001F601 \U00010348 \U000E0001", "CamelCaseWord HTTPServer iPhone XMLHttpRequest",
]


def oracle_pieces(pattern, text):
    return [off for _, off in pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]


def my_pieces(pattern, text):
    """Isolated-split pieces from our matches (empty matches split a gap but make no piece, as in tokenizers)."""
    out, prev = [], 0
    for s, e in _core._regex_find_all(pattern, text):
        assert prev <= s <= e <= len(text)
        if prev != s:
            out.append((prev, s))
        if s != e:
            out.append((s, e))
        prev = e
    if prev != len(text):
        out.append((prev, len(text)))
    return out


def assert_same(pattern, text):
    mine, expected = my_pieces(pattern, text), oracle_pieces(pattern, text)
    if mine != expected:
        i = next((k for k, (a, b) in enumerate(zip(mine, expected)) if a != b), min(len(mine), len(expected)))
        pytest.fail(f"pattern {pattern!r} text {text[:200]!r}: first difference at piece {i}: "
                    f"ours {mine[i:i + 3]} vs tokenizers {expected[i:i + 3]}")


@pytest.mark.parametrize("name", list(PATTERNS))
def test_hard_cases(name):
    for text in HARD:
        assert_same(PATTERNS[name], text)


def read_lines(path, limit):
    with open(path, encoding="utf-8") as f:
        return [line for _, line in zip(range(limit), f)]


@pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data not present")
@pytest.mark.parametrize("name", list(PATTERNS))
def test_real_text(name):
    files = ["multi30k/train.en", "multi30k/train.de", "multi30k/train.fr", "sst2/train_sentences.tsv",
             "tinyshakespeare/input.txt"]
    lines = []
    for f in files:
        lines += read_lines(os.path.join(DATA, f), 800)
    # Blocks of 40 lines keep the newlines (and Llama 3's newline rules) in play; also check a CRLF version.
    for i in range(0, len(lines), 40):
        block = "".join(lines[i:i + 40])
        assert_same(PATTERNS[name], block)
        if i % 400 == 0:
            assert_same(PATTERNS[name], block.replace("\n", "\r\n"))


def test_bytelevel_builtin_regex_is_gpt2():
    # ByteLevel's built-in splitting (use_regex) must be exactly the GPT-2 pattern: compare the piece offsets.
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in HARD:
        assert [off for _, off in bl.pre_tokenize_str(text)] == my_pieces(GPT2, text), text


LONG = {
    "letters": "a" * 100_000, "spaces_then_word": " " * 100_000 + "a", "word_then_spaces": "x" + " " * 100_000,
    "punct": "!" * 100_000, "digits": "7" * 100_000, "newlines": "\n" * 100_000 + "x",
    "tabs_spaces": " \t" * 50_000 + "a",
    "apostrophes": "'" * 100_000, "cjk": "中" * 100_000, "spaces_newlines": (" " * 999 + "\n") * 100,
    "marks": "a" + "\u0301" * 100_000, "words": "hello world " * 10_000, "upper": "A" * 100_000,
    "camel": "aB" * 50_000, "crlf": "\r\n" * 50_000, "emoji": "😀" * 100_000,
}


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2", "o200k"])
def test_long_runs_fast_and_equal(name):
    pattern = PATTERNS[name]
    for text in LONG.values():
        t0 = time.perf_counter()
        _core._regex_find_all(pattern, text)
        took = time.perf_counter() - t0
        assert took < 0.5, (name, text[:10], took)   # linear: a few ms in practice
        assert_same(pattern, text)


def test_long_runs_no_stack_overflow():
    # Runs that push one backtracking entry per iteration (a group under a quantifier) live on the heap.
    text = "ab" * 200_000
    assert _core._regex_find_all(r"(?:ab)+", text) == [(0, len(text))]
    assert _core._regex_find_all(r"(?:a|b)+", text) == [(0, len(text))]
    assert _core._regex_find_all(r"(?:a|b)+?c|b", "ab" * 500)[:2] == [(1, 2), (3, 4)]   # quadratic: keep it short
    assert _core._regex_find_all(r"(?:x|\s)+(?!\S)", " " * 300_000 + "a") == [(0, 299_999)]


SEMANTICS = [
    # onig find_iter and empty matches
    ("x*", "ab"), ("a|(?=c)", "abc"), ("a|(?=b)", "abb"), ("a|", "bab"), ("x?", "abc"), ("(?=a)", "aba"),
    ("(?!a)", "ab"), (r"\b", "ab c"), (r"\B", "ab c"), ("$", "a\nb"), ("^", "a\nb"), ("a{,2}", "aaaaa"),
    # anchors and dot
    ("a$", "a\nb a"), ("^b", "a\nb b"), (".", "a\r\n\u2028\x85b"), (r"a\Z", "a\n"), (r"a\z", "a\n"),
    (r"\A\s+|\s+\z", "  ab  "), (r"\bfoo\b", "foo foobar"),
    # case folding
    (r"(?i:k)", "kK\u212a"), (r"(?i:\u212a)", "kK\u212a"), (r"(?i:'s)", "'s'S'\u017f"), (r"(?i:\u017f)", "sS\u017f"),
    (r"(?i:'S)", "'s'ſ"), (r"(?i)'ll", "'LL'Ll"), (r"(?-i:a)", "aA"), (r"(?i:a(?-i:b))", "AB Ab aB"),
    (r"(?i:[0-9'])", "1'"), (r"(?i:.)", "aé"), (r"(?i:\s\d)", " 1"), (r"(?i)(?:'s|'t)", "'T'S"),
    (r"(?i:[sdmt])", "sSſdDmMtT"), (r"(?i:[^s])", "sSſx"), (r"(?i:[k-m])", "kK\u212alLmM"),
    # quantifiers
    (r" {2,}", "a  b   c d"), ("a*?b", "aab"), ("(?:ab)+?", "ababab"), ("a??b", "ab b"), ("a{1,3}?", "aaaa"),
    ("(?:ab){2,}", "abababab"), ("(?:a|b)*c", "abbac"), ("a{2}", "aaaaa"), ("(?:a|ab)(?:c|bcd)", "abcd"),
    (r"(?>a+)b|a", "aaab aa"), ("a++b|a", "aab aa"), ("a?+a", "a aa"), (r"\s++$", "a  \nb  "),
    # classes and escapes
    (r"\x41\x{42}\u0043", "ABC"), (r"[\x00-\x1f]+", "a\x01\x02b"), (r"[a-c-]+", "ab-d"), ("[-a]+", "-a-b"),
    (r"[\]\-]", "]-"), (r"\.\*", "a.*b"), ("}", "}}"), ("]", "]"), (r"[\p{Lu}\d]+", "AB12cd"), (r"\P{L}+", "ab12!c"),
    (r"\p{^L}+", "ab12!c"), (r"[^\P{L}]+", "ab12!c"), (r"\p{Zs}", "a\u3000b\u00a0"), (r"\p{Cn}", "a\U000e0080"),
    (r"\p{C}", "a\x01\u200b\ue000"), (r"\t\n\r\f\v\a\e", "\t\n\r\f\v\a\x1b"), (r"\p{Uppercase Letter}", "aA"),
    (r"\p{l}", "ab1"), (r"\p{Letter}+", "ab1"), (r"\p{LC}", "aǅʰ"), (r"\p{Combining_Mark}", "a\u0301"),
    ("a*\\s?+^", "s\na\n"), ("^", ""), ("^", "\n"), ("(?:)*a", "aa"), ("^.*b", "ab\nxb"), (".*b", "xa\nb"),
    # empty-matching loop bodies (Oniguruma's empty check)
    ("(?:a?)+b", "aab b"), ("(?:a|)*", "aab"), ("(?:|a)*", "aab"), ("(?:a?b?)*?c", "abbc c"), ("(?:x|a?)+b", "axab b"),
    (r"(?<x>ab)+", "ababc"), (r"\w+", "a_\u200d\u0301Ⅷ!½Ⓐ"), (r"\d", "1\u0663½Ⅷ"),
    (r"\s", "\x1c\x85\u180e\u200b\ufeff\xa0 "),
]


def test_semantics():
    for pattern, text in SEMANTICS:
        assert_same(pattern, text)


def test_empty_matches_are_reported():
    # onig's find_iter: an empty match right where the last match ended is dropped, other empty matches are kept.
    assert _core._regex_find_all("x*", "ab") == [(0, 0), (1, 1), (2, 2)]
    assert _core._regex_find_all("a|(?=c)", "abc") == [(0, 1), (2, 2)]
    assert _core._regex_find_all("a*", "baa") == [(0, 0), (1, 3)]
    assert _core._regex_find_all("a", "") == []
    assert _core._regex_find_all("", "") == [(0, 0)]


ALL_TEXT = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def matched_mask(spans, n):
    mask = bytearray(n)
    for s, e in spans:
        mask[s:e] = b"\x01" * (e - s)
    return mask


@pytest.mark.parametrize("pattern", [r"\w", r"\s", r"\d", r"[^\s\p{L}\p{N}]", r"(?i:[a-z])"])
def test_classes_over_every_code_point(pattern):
    # Which chars each class matches, over all of Unicode (the \w case found Oniguruma's Latin-1 quirk: ² ³ ¹ ¼ ½ ¾).
    gaps = pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(ALL_TEXT)
    expected = bytearray(b"\x01" * len(ALL_TEXT))
    for _, (s, e) in gaps:
        expected[s:e] = bytes(e - s)
    mine = matched_mask(_core._regex_find_all(pattern, ALL_TEXT), len(ALL_TEXT))
    if mine != expected:
        diff = [hex(ord(ALL_TEXT[i])) for i in range(len(ALL_TEXT)) if mine[i] != expected[i]][:20]
        pytest.fail(f"{pattern}: differs at {diff}")


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

INTERESTING = list("aZkKsStTlLmMdDrReEvV'’ \t\n\r0123456789.,!?-_/()\"") + [
    "\u017f", "\u212a", "\u00a0", "\u0085", "\u2028", "\u3000", "\u200d", "\u200b", "\u0301", "\u0308", "\u00bd",
    "\u0663", "\u2167", "é", "ß", "中", "日", "한", "ا", "न", "\u094d", "😀", "👍", "\U0001F3FD", "\x00", "\x1f",
    "\ufeff", "ǅ", "ʰ", "Σ", "\U000E0001", "\ue000",
]
TEXTS = st.lists(st.one_of(st.sampled_from(INTERESTING), st.characters(exclude_categories=("Cs",))),
                 max_size=60).map("".join)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=TEXTS)
def test_random_text(text):
    for name in ("gpt2", "llama3", "qwen2", "o200k"):
        assert_same(PATTERNS[name], text)


ATOMS = ["a", "b", "'", "s", "k", " ", r"\s", r"\S", r"\d", r"\w", r"\W", r"\p{L}", r"\p{N}", r"\P{L}", ".", "[ab]",
         r"[^a\s]", r"[\p{L}\d]", r"\n", r"\r", r"[\r\n]", "x", "^", "$", r"\b", r"\B", r"\A", r"\z", r"\Z"]
QUANTS = ["", "", "", "?", "*", "+", "{2}", "{1,3}", "{2,}", "{,2}", "??", "*?", "+?", "?+", "*+", "++", "{1,2}?"]
FUZZ_TEXT = list("abskSK' \t\n\r1x!é中😀") + ["\u017f", "\u212a", "\u0301", "\xa0"]


def random_pattern(rnd, depth=0):
    k = rnd.random()
    if depth > 2 or k < 0.5:
        parts = []
        for _ in range(rnd.randint(1, 3)):
            atom = rnd.choice(ATOMS)
            if atom not in ("^", "$", r"\b", r"\B", r"\A", r"\z", r"\Z"):
                atom += rnd.choice(QUANTS)
            parts.append(atom)
        return "".join(parts)
    if k < 0.7:
        return "|".join(random_pattern(rnd, depth + 1) for _ in range(rnd.randint(2, 3)))
    group = rnd.choice(["(?:", "(?=", "(?!", "(?>", "(?i:", "("])
    quant = rnd.choice(QUANTS) if group in ("(?:", "(?>", "(?i:", "(") else ""
    tail = random_pattern(rnd, depth + 1) if rnd.random() < 0.3 else ""
    return group + random_pattern(rnd, depth + 1) + ")" + quant + tail


def test_random_patterns():
    # Differential test of the syntax we support: every pattern we accept must be accepted by Oniguruma and give
    # the same splits; patterns we reject are counted (nested/empty-matching quantifiers, (?i) with \p or \w, ...).
    rnd = random.Random(1234)
    accepted = 0
    for _ in range(1500):
        pattern = random_pattern(rnd)
        try:
            _core._regex_find_all(pattern, "")
        except ValueError:
            continue
        Regex(pattern)   # raises if Oniguruma rejects what we accept
        accepted += 1
        for _ in range(8):
            assert_same(pattern, "".join(rnd.choice(FUZZ_TEXT) for _ in range(rnd.randint(0, 12))))
    assert accepted > 1000


ERRORS = [
    (r"(a)\1", "backreference"), (r"(?<=a)b", "lookbehind"), (r"(?<!a)b", "lookbehind"), (r"\k<x>", "escape \\k"),
    (r"(?:a*)*", "nested quantifiers"), (r"\B.*\n", "skips to the next line"),
    (r"(?=a).*+b", "skips to the next line"), (r"(?:a?){2}", "n >= 2"), (r"(?:\Ax?){2,}", "n >= 2"), (r"(?:a+)+b", "nested quantifiers"),
    (r"a**", "quantifier following a quantifier"), (r"a{2}+", "'+' after an interval"), (r"*a", "nothing to repeat"),
    (r"a{1001}", "above 1000"), (r"[[:alpha:]]", "nested class"), (r"[a&&b]", "intersection"),
    (r"\p{Latin}", "property"), (r"\p{L&}", "property"), (r"(?i:é)", "non-ASCII char"), (r"(?i:ss)", "pair 'ss'"),
    (r"(?i:\p{L})", "(?i)"), (r"(?i:\w)", "(?i)"), (r"a(?i)b", "inline option"), (r"(?x)a", "group construct"),
    (r"(?m:.)", "group construct"), (r"\h", "escape \\h"), (r"\R", "escape \\R"), (r"\G", "escape \\G"),
    (r"a{", "'{'"), (r"(a", "unclosed group"), (r"a)", "unmatched ')'"), (r"[a", "unclosed class"),
    (r"[]a]", "']' right after '['"), (r"[z-a]", "empty range"), ("\\", "trailing backslash"),
    (r"\p{L", "unclosed \\p{"), (r"(?=a)*", "anchor or lookahead"), (r"^+", "anchor or lookahead"),
    ("(" * 150 + ")" * 150, "nesting"), (r"(?:a|\Z){2}", "anchor or lookahead"),
    (r"(?:a|(?:b|(?=c)))+", "anchor or lookahead"), (r"\xZZ", "\\xHH"), (r"(?#c)", "group construct"),
]


@pytest.mark.parametrize("pattern,construct", ERRORS)
def test_unsupported_patterns_are_clear_errors(pattern, construct):
    with pytest.raises(ValueError, match="position") as info:
        _core._regex_find_all(pattern, "abc")
    assert construct in str(info.value), str(info.value)


def test_exponential_patterns_stop_at_the_retry_limit():
    """A hostile pattern (in a tokenizer.json anyone can write) fails fast at Oniguruma's retry limit instead of
    taking exponential time; through a tokenizer it is an error for that text, never a hang."""
    import json

    import cpuformer

    for pattern, text in [("(a|a)*b", "a" * 40), ("(a|aa)*c", "a" * 60), ("(?:a|b|ab)*c", "ab" * 40)]:
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="retry limit"):
            _core._regex_find_all(pattern, text)
        assert time.perf_counter() - start < 5
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a|aa)*c"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"}}
    tok = cpuformer.Tokenizer.from_str(json.dumps(spec))
    assert tok.encode("aac").ids == [0]
    with pytest.raises((ValueError, RuntimeError), match="retry limit"):
        tok.encode("a" * 60)
    with pytest.raises((ValueError, RuntimeError), match="retry limit"):
        tok.encode_batch(["aac", "a" * 60])
