#!/usr/bin/env python3
"""Generate cpp/src/unicode_data.cpp: the Unicode tables of cpuformer's tokenizers (see cpp/src/unicode.h and
shared design note tokenizers.md §5).

Each table comes from the Unicode version that the `tokenizers` component it serves uses:

  table                         version  source
  General Category "8"          8.0      UCD 15.0 UnicodeData.txt, chars with DerivedAge <= 8.0, plus the GC changes
                                         8.0 -> 15.0 listed in GC8_PATCHES (the crate `unicode_categories` 0.1)
  General Category "16"         16.0     unicodedata2 16.0.0 (Oniguruma, Rust regex crate)
  General Category "17"         17.0     unicodedata2 17.0.x (Rust std)
  White_Space                   15.0     PropList.txt (unchanged since 6.x; the same set in 16.0 and 17.0)
  Alphabetic "16"               16.0     DerivedCoreProperties.txt 15.0 Alphabetic, plus chars assigned after 15.0
                                         (by unicodedata2 16.0.0) with GC L* or Nl.  Other_Alphabetic of 15.1/16.0
                                         marks is not known here; it does not matter for the regex crate's \\w,
                                         which contains every M char anyway.
  lowercase                     17.0     UnicodeData.txt 15.0 simple lowercase + SpecialCasing.txt unconditional
                                         mappings; chars assigned after 15.0 (unicodedata2 17.0.x) with GC Lu/Lt get
                                         the lowercase whose name has SMALL for CAPITAL (unicodedata2 has no case
                                         data).  Verified against Rust std through the `tokenizers` Lowercase
                                         normalizer over every code point (tests/tokenizers/test_unicode.py).
  CCC, decompositions,          9.0      UCD 15.0 UnicodeData.txt / DerivedNormalizationProps.txt restricted to
  composition                            DerivedAge <= 9.0 (these properties are stable once assigned)
  combining marks (M*)          9.0      UCD 15.0 GC M* restricted to DerivedAge <= 9.0, plus MARK9_PATCHES
  Grapheme_Cluster_Break,       15.0     auxiliary/GraphemeBreakProperty.txt and emoji/emoji-data.txt of UCD 15.0
  Extended_Pictographic                  (Precompiled's clusters, crate unicode-segmentation; see unicode.h)

Unicode 18.0 (the unicodedata2 in the dev venv) is not used.

Inputs (all offline here):
  * Debian package `unicode-data` 15.0: apt-get install -y unicode-data  -> /usr/share/unicode/*.txt
  * unicodedata2 16.0.0 and 17.0.1 from PyPI, installed side by side (they are one module name, so each is read in
    a subprocess):  pip install --no-deps --target /tmp/ud_16.0.0 unicodedata2==16.0.0
                    pip install --no-deps --target /tmp/ud_17.0.1 unicodedata2==17.0.1

Usage: python3 tools/gen_unicode_data.py [--ucd /usr/share/unicode] [--ud16 DIR] [--ud17 DIR] [-o FILE]
The build does not run this; the output is committed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MAX = 0x110000
CATS = ["Cn", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf",
        "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co"]
CAT_ID = {c: i for i, c in enumerate(CATS)}

# General Category changes between 8.0 and 15.0 among chars assigned in 8.0: the 8.0 value. Found with the
# `tokenizers` oracle over every code point, which sees what the 8.0 table is used for: P* (BertPreTokenizer), Mn
# (BertNormalizer strip_accents) and Cc/Cf/Co (clean_text); see tests/tokenizers/test_unicode.py. Changes between
# other categories (say Lo -> Lm) are not observable there and not patched.
GC8_PATCHES = {
    0x166D: "Po",                 # CANADIAN SYLLABICS CHI SIGN: Po -> So in 12.0
    0x1885: "Lo", 0x1886: "Lo",   # MONGOLIAN LETTER ALI GALI BALUDA / THREE BALUDA: Lo -> Mn in 9.0
    0x1734: "Mn",                 # HANUNOO SIGN PAMUDPOD: Mn -> Mc in 14.0
    0xA9BD: "Mc",                 # JAVANESE CONSONANT SIGN KERET: Mc -> Mn in 12.0
    0x111C9: "Po",                # SHARADA SANDHI MARK: Po -> Mn in 11.0
}

# Combining marks (GC M*) of Unicode 9.0, for the StripAccents normalizer (`is_combining_mark` of the crate
# unicode-normalization-alignments): UCD 15.0 M* chars with DerivedAge <= 9.0, corrected by the GC changes 9.0 -> 15.0
# that enter or leave M*. Found with the `tokenizers` oracle over every code point (tests/tokenizers/test_precompiled.py).
MARK9_PATCHES = {
    0x1CF2: True, 0x1CF3: True,   # VEDIC SIGN ARDHAVISARGA / ROTATED ARDHAVISARGA: Mc -> Lo in 10.0
    0x111C9: False,               # SHARADA SANDHI MARK: Po -> Mn in 11.0
}

# Grapheme_Cluster_Break values, in the order of unicode.h's GraphemeBreak
GCB = ["Other", "CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark", "L", "V", "T",
       "LV", "LVT"]
GCB_ID = {n: i for i, n in enumerate(GCB)}

BLOCK = 128      # two-level table block size
LIMIT = 0x40000  # two-level tables cover [0, LIMIT); above it unicode.cpp uses high_category() (checked below)
# Printable characters for the block pools, which are string literals (no backslash, quote or question mark)
ALPHABET = "".join(chr(c) for c in range(35, 127) if chr(c) not in "\\?")


def high_category(c):
    """The General Category of every c >= LIMIT, in 8.0, 16.0 and 17.0 (asserted by the generator)."""
    if c == 0xE0001 or 0xE0020 <= c <= 0xE007F:
        return "Cf"
    if 0xE0100 <= c <= 0xE01EF:
        return "Mn"
    if 0xF0000 <= c <= 0xFFFFD or 0x100000 <= c <= 0x10FFFD:
        return "Co"
    return "Cn"


def parse_ranges(path, want=None):
    """Yield (first, last, fields) from a UCD 'XXXX..YYYY ; value ; ...' file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = [x.strip() for x in line.split(";")]
            if want is not None and fields[1] != want:
                continue
            r = fields[0].split("..")
            yield int(r[0], 16), int(r[-1], 16), fields


def parse_unicode_data(path):
    rows = {}
    with open(path, encoding="utf-8") as f:
        pending = None
        for line in f:
            fields = line.rstrip("\n").split(";")
            cp = int(fields[0], 16)
            if fields[1].endswith(", First>"):
                pending = cp
                continue
            if fields[1].endswith(", Last>"):
                for c in range(pending, cp + 1):
                    rows[c] = fields
                pending = None
                continue
            rows[cp] = fields
    return rows


def unicodedata2_dump(path):
    """Categories and (for capital letters) names from the unicodedata2 installed in `path`."""
    code = (
        "import json, sys, unicodedata2 as u\n"
        "cats = ''.join(chr(65 + %r.index(u.category(chr(c)))) for c in range(0x110000))\n"
        "names = {c: u.name(chr(c), '') for c in range(0x110000) if u.category(chr(c)) in ('Lu', 'Lt', 'Ll')}\n"
        "json.dump({'version': u.unidata_version, 'cats': cats, 'names': names}, sys.stdout)\n" % (CATS,))
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    return d["version"], [ord(ch) - 65 for ch in d["cats"]], {int(k): v for k, v in d["names"].items()}


def two_level(values, pool, pool_index):
    """Index (one entry per block) into the shared block pool, adding new blocks."""
    index = []
    for b in range(0, LIMIT, BLOCK):
        block = tuple(values[b:b + BLOCK])
        if block not in pool_index:
            pool_index[block] = len(pool)
            pool.append(block)
        index.append(pool_index[block])
    return index


def ranges_of(pred):
    out, start = [], None
    for c in range(MAX + 1):
        if c < MAX and pred(c):
            if start is None:
                start = c
        elif start is not None:
            out.append((start, c - 1))
            start = None
    return out


def c_string(name, values, per_line=120):
    text = "".join(ALPHABET[v] for v in values)
    lines = ['    "%s"' % text[i:i + per_line] for i in range(0, len(text), per_line)]
    return "const char %s[] =\n%s;\nconst std::size_t %s_size = %d;\n" % (name, "\n".join(lines), name, len(values))


def c_array(ctype, name, values, per_line=24):
    lines = []
    for i in range(0, len(values), per_line):
        lines.append("    " + ",".join(str(v) for v in values[i:i + per_line]) + ",")
    return "const %s %s[] = {\n%s\n};\nconst std::size_t %s_size = %d;\n" % (ctype, name, "\n".join(lines), name,
                                                                         len(values))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ucd", default="/usr/share/unicode")
    ap.add_argument("--ud16", default="/tmp/ud_16.0.0")
    ap.add_argument("--ud17", default="/tmp/ud_17.0.1")
    ap.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "..", "cpp", "src",
                                                           "unicode_data.cpp"))
    args = ap.parse_args()

    ucd = args.ucd
    with open(os.path.join(ucd, "ReadMe.txt"), encoding="utf-8") as f:
        readme = f.read()
    assert "15.0.0" in readme, "expected UCD 15.0.0 in " + ucd
    rows = parse_unicode_data(os.path.join(ucd, "UnicodeData.txt"))
    age = {}
    for a, b, fields in parse_ranges(os.path.join(ucd, "DerivedAge.txt")):
        v = tuple(int(x) for x in fields[1].split("."))
        for c in range(a, b + 1):
            age[c] = v

    v16, cat16, _ = unicodedata2_dump(args.ud16)
    v17, cat17, names17 = unicodedata2_dump(args.ud17)
    assert v16 == "16.0.0", v16
    assert v17.startswith("17.0"), v17

    # --- General Category -------------------------------------------------------------------------------------
    cat15 = [CAT_ID[rows[c][2]] if c in rows else 0 for c in range(MAX)]
    cat8 = [cat15[c] if age.get(c, (99,)) <= (8, 0) else 0 for c in range(MAX)]
    for c, gc in GC8_PATCHES.items():
        assert age[c] <= (8, 0) and CATS[cat8[c]] != gc
        cat8[c] = CAT_ID[gc]
    # Sanity: 16.0 and 17.0 agree with 15.0 on chars assigned in 15.0, except a handful of GC changes.
    changed = [c for c in range(MAX) if cat15[c] and cat16[c] != cat15[c]]
    assert len(changed) < 40, changed
    for c in range(LIMIT, MAX):
        want = CAT_ID[high_category(c)]
        assert cat8[c] == want and cat16[c] == want and cat17[c] == want, hex(c)
    pool, pool_index = [], {}
    gc_index = [two_level(cat8, pool, pool_index), two_level(cat16, pool, pool_index),
                two_level(cat17, pool, pool_index)]

    # --- White_Space, Alphabetic ----------------------------------------------------------------------------------
    white = [(a, b) for a, b, _ in parse_ranges(os.path.join(ucd, "PropList.txt"), "White_Space")]
    alpha15 = set()
    for a, b, _ in parse_ranges(os.path.join(ucd, "DerivedCoreProperties.txt"), "Alphabetic"):
        alpha15.update(range(a, b + 1))
    letters = {CAT_ID[x] for x in ("Lu", "Ll", "Lt", "Lm", "Lo", "Nl")}
    alpha16 = ranges_of(lambda c: c in alpha15 or (c not in age and cat16[c] in letters))

    # --- lowercase (17.0) -------------------------------------------------------------------------------------------
    lower = {}
    for c, f in rows.items():
        if f[13]:
            lower[c] = [int(f[13], 16)]
    special = {}
    for a, _, fields in parse_ranges(os.path.join(ucd, "SpecialCasing.txt")):
        if len(fields) > 4 and fields[4]:
            continue          # conditional (Final_Sigma, tr, az, lt, ...): Rust to_lowercase ignores them
        low = [int(x, 16) for x in fields[1].split()]
        if low != [a]:
            special[a] = low
    by_name = {n: c for c, n in names17.items()}
    for c in range(MAX):
        if c in age or CATS[cat17[c]] not in ("Lu", "Lt"):
            continue
        n = names17.get(c, "")
        small = by_name.get(n.replace("CAPITAL", "SMALL"))
        if small is not None and small != c:
            lower[c] = [small]
    for c, low in special.items():
        lower[c] = low
    multi = {c: v for c, v in lower.items() if len(v) > 1}
    assert list(multi) == [0x130], multi
    lower_pairs = sorted((c, v[0]) for c, v in lower.items() if len(v) == 1 and v[0] != c)

    # --- normalization (9.0) ----------------------------------------------------------------------------------------
    def old(c):
        return age.get(c, (99,)) <= (9, 0)

    ccc = [int(rows[c][3]) if c in rows and old(c) else 0 for c in range(MAX)]
    raw = {}   # cp -> (is_compat, [cps])
    for c, f in rows.items():
        if f[5] and old(c) and not (0xAC00 <= c <= 0xD7A3):
            parts = f[5].split()
            compat = parts[0].startswith("<")
            raw[c] = (compat, [int(x, 16) for x in (parts[1:] if compat else parts)])

    def full(c, compat):
        if c in raw and (compat or not raw[c][0]):
            out = []
            for x in raw[c][1]:
                out.extend(full(x, compat))
            return out
        return [c]

    fce = set()
    for a, b, _ in parse_ranges(os.path.join(ucd, "DerivedNormalizationProps.txt"), "Full_Composition_Exclusion"):
        fce.update(c for c in range(a, b + 1) if old(c))
    comp = []
    for c, (compat, d) in raw.items():
        if not compat and len(d) == 2 and c not in fce:
            comp.append((d[0], d[1], c))
    comp.sort()
    # decomposition entries: cp, canonical (start, len) and compatibility (start, len) in one pool
    dpool, dpool_index, dentries = [], {}, []

    def intern(seq):
        key = tuple(seq)
        if key not in dpool_index:
            dpool_index[key] = len(dpool)
            dpool.extend(seq)
        return dpool_index[key]

    for c in sorted(raw):
        canon = full(c, False)
        kompat = full(c, True)
        cs = intern(canon) if canon != [c] else 0
        cl = len(canon) if canon != [c] else 0
        ks = intern(kompat)
        kl = len(kompat)
        assert cl < 32 and kl < 32 and ks < (1 << 16) and cs < (1 << 16)
        dentries.append((c, cs, cl, ks, kl))
    assert not any(ccc[LIMIT:]) and all(c < LIMIT for c in raw)
    ccc_values = sorted(set(ccc))
    assert len(ccc_values) <= len(ALPHABET)
    ccc_id = {v: i for i, v in enumerate(ccc_values)}
    ccc_pool, ccc_pool_index = [], {}
    ccc_index = two_level([ccc_id[v] for v in ccc], ccc_pool, ccc_pool_index)

    # --- combining marks (9.0) -------------------------------------------------------------------------------------
    marks = {CAT_ID["Mn"], CAT_ID["Mc"], CAT_ID["Me"]}
    mark9 = {c for c in range(MAX) if cat15[c] in marks and old(c)}
    for c, is_mark in MARK9_PATCHES.items():
        assert old(c) and (c in mark9) != is_mark
        if is_mark:
            mark9.add(c)
        else:
            mark9.discard(c)
    mark9_ranges = ranges_of(lambda c: c in mark9)

    # --- Grapheme_Cluster_Break, Extended_Pictographic (15.0) -------------------------------------------------------
    gcb_ranges = []
    for a, b, fields in parse_ranges(os.path.join(ucd, "auxiliary", "GraphemeBreakProperty.txt")):
        gcb_ranges.append((a, b, GCB_ID[fields[1]]))
    gcb_ranges.sort()
    assert all(x[1] < y[0] for x, y in zip(gcb_ranges, gcb_ranges[1:]))
    ext_pict = sorted((a, b) for a, b, _ in parse_ranges(os.path.join(ucd, "emoji", "emoji-data.txt"),
                                                          "Extended_Pictographic"))

    # --- emit ---------------------------------------------------------------------------------------------------------
    o = []
    o.append("// GENERATED by tools/gen_unicode_data.py; do not edit. Unicode data for cpp/src/unicode.h.\n"
             "// Versions: General Category 8.0 (UCD 15.0 filtered by DerivedAge, with patches), 16.0 and %s\n"
             "// (unicodedata2), White_Space 15.0 (= 16.0 = 17.0), Alphabetic 16.0, lowercase 17.0,\n"
             "// normalization 9.0 (UCD 15.0 filtered by DerivedAge).\n" % v17)
    o.append('#include "unicode_data.h"\n\nnamespace cpuformer::unicode::data {\n\n')
    o.append("const int block_shift = %d;\nconst char32_t table_limit = 0x%X;\n" % (BLOCK.bit_length() - 1, LIMIT))
    o.append("// Block pools are strings: entry = position of the char in alphabet.\n")
    o.append("const char alphabet[] = \"%s\";\n" % ALPHABET)
    o.append("// General Category below table_limit: per version (8, 16, 17) one index of %d blocks into a shared pool\n"
             "// of %d-entry blocks of Category values\n" % (LIMIT // BLOCK, BLOCK))
    o.append(c_array("std::uint16_t", "gc_index", gc_index[0] + gc_index[1] + gc_index[2]))
    o.append(c_string("gc_blocks", [v for blk in pool for v in blk]))
    o.append("// White_Space ranges (first, last)\n")
    o.append(c_array("std::uint32_t", "white_space", [x for r in white for x in r], 12))
    o.append("// Alphabetic 16.0 ranges (first, last)\n")
    o.append(c_array("std::uint32_t", "alphabetic", [x for r in alpha16 for x in r], 12))
    o.append("// lowercase 17.0, simple one-char mappings (cp, lower), sorted; U+0130 is handled in unicode.cpp\n")
    o.append(c_array("std::uint32_t", "lower_pairs", [x for r in lower_pairs for x in r], 12))
    o.append("// canonical combining class 9.0 below table_limit (0 above): index into a pool of %d-entry blocks of\n"
             "// ids into ccc_values\n" % BLOCK)
    o.append(c_array("std::uint8_t", "ccc_values", ccc_values))
    o.append(c_array("std::uint16_t", "ccc_index", ccc_index))
    o.append(c_string("ccc_blocks", [v for blk in ccc_pool for v in blk]))
    o.append("// decompositions 9.0 (Hangul syllables excluded: by formula), fully decomposed, sorted by cp; per char two\n"
             "// words: cp | canonical length << 21 | compatibility length << 26 (canonical length 0 = none), and\n"
             "// canonical pool start | compatibility pool start << 16\n")
    o.append(c_array("std::uint32_t", "decomp_entries",
                     [x for (c, cs, cl, ks, kl) in dentries for x in (c | cl << 21 | kl << 26, cs | ks << 16)], 12))
    o.append(c_array("std::uint32_t", "decomp_pool", dpool, 16))
    o.append("// canonical compositions 9.0 (first, second, composite), sorted; Full_Composition_Exclusion removed\n")
    o.append(c_array("std::uint32_t", "compositions", [x for e in comp for x in e], 12))
    o.append("// combining marks (GC M*) 9.0 ranges (first, last), for StripAccents\n")
    o.append(c_array("std::uint32_t", "combining_mark9", [x for r in mark9_ranges for x in r], 12))
    o.append("// Grapheme_Cluster_Break 15.0 ranges (first, last, value: %s), sorted; other chars are Other (0)\n"
             % ", ".join("%d %s" % (i, n) for i, n in enumerate(GCB)))
    o.append(c_array("std::uint32_t", "grapheme_break", [x for r in gcb_ranges for x in r], 12))
    o.append("// Extended_Pictographic 15.0 ranges (first, last)\n")
    o.append(c_array("std::uint32_t", "extended_pictographic", [x for r in ext_pict for x in r], 12))
    o.append("\n}  // namespace cpuformer::unicode::data\n")
    text = "".join(o)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print("wrote %s: %d bytes; gc pool %d blocks, ccc pool %d blocks, %d decompositions (pool %d), %d compositions, "
          "%d lowercase pairs, %d alphabetic ranges, GC 15->16 changes %s" % (
              args.output, len(text), len(pool), len(ccc_pool), len(dentries), len(dpool), len(comp),
              len(lower_pairs), len(alpha16), ["%04X" % c for c in changed]))


if __name__ == "__main__":
    main()
