// cpp/src/unicode.h (private to the core): Unicode data and algorithms for the tokenizers, each from the Unicode
// version the `tokenizers` library uses for that purpose (see tokenizers.md §5.1). The data lives in the generated
// unicode_data.cpp (tools/gen_unicode_data.py); the algorithms in unicode.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cpuformer::unicode {

enum class Category : std::uint8_t { Cn = 0, Lu, Ll, Lt, Lm, Lo, Mn, Mc, Me, Nd, Nl, No, Pc, Pd, Ps, Pe, Pi, Pf, Po,
                                     Sm, Sc, Sk, So, Zs, Zl, Zp, Cc, Cf, Cs, Co };

// General category of cp as of Unicode `version` (8 = unicode_categories crate, used by BertNormalizer,
// BertPreTokenizer, Punctuation; 16 = Oniguruma and the Rust regex crate; 17 = Rust std). Chars newer than that
// version are Cn. Invalid code points (> 0x10FFFF) are Cn. Only 8, 16 and 17 are tables: a version below 16 reads
// the 8.0 table, above 16 the 17.0 one. Surrogates are Cs and private use Co in every version.
Category category(char32_t cp, int version);
const char* category_name(Category c);   // "Lu", "Cn", ...

bool is_white_space(char32_t cp);        // the White_Space property (Rust char::is_whitespace, Oniguruma \s)
// Alphabetic (16.0), for the Rust regex crate's \w. Exact for chars assigned by 15.0; for 15.1/16.0 chars it is GC
// L*/Nl only (Other_Alphabetic marks of those versions are not in our sources; \w contains all M chars anyway).
bool is_alphabetic(char32_t cp);

// Rust char::to_lowercase (17.0, full mapping, no context): appends 1..3 chars to out.
void to_lower(char32_t cp, std::u32string* out);

enum class Form { NFD, NFKD, NFC, NFKC };
// Normalize text (Unicode 9.0 data, as unicode-normalization-alignments 0.1). out gets the result; changes (may be
// null) gets one entry per output char in the `tokenizers` NormalizedString::transform convention: 0 = this char
// replaces the next source char, +1 = inserted (no source char consumed), -n = replaces the next source char and
// deletes n more after it. Replaying `changes` over the input reproduces the alignment rules of tokenizers.md
// §4.2 (decomposition: each output char takes its source char's range; composition: the composed char takes the
// first source char's range). Canonical reordering moves each change with its char (checked against tokenizers
// 0.23.3; §4.2's "positional" holds only when all changes in the run are 0): NFD of "ḋ" U+0323 gives changes
// 0, 0, +1 and ranges d (0,1), U+0323 (1,2), U+0307 (1,2) -- an inserted char copies the range of the source char
// before the current position, as NormalizedString::transform does.
void normalize(const std::u32string& text, Form form, std::u32string* out, std::vector<int>* changes);

// GC M* (Mn, Mc, Me) as of Unicode 9.0: unicode-normalization-alignments' is_combining_mark, which the StripAccents
// normalizer deletes. Checked against tokenizers 0.23.3 over every code point.
bool is_combining_mark(char32_t cp);

// Grapheme_Cluster_Break and Extended_Pictographic (UCD 15.0), and extended grapheme cluster boundaries (UAX #29
// rules GB1-GB13, GB999), for the Precompiled normalizer (crate unicode-segmentation, `graphemes(true)`). Rule GB9c
// (Indic conjuncts, 15.1) is not applied: it joins clusters of 9+ bytes only, which Precompiled handles char by char
// either way. Chars assigned after 15.0 are Other here.
enum class GraphemeBreak : std::uint8_t { Other = 0, CR, LF, Control, Extend, ZWJ, RegionalIndicator, Prepend,
                                          SpacingMark, L, V, T, LV, LVT };
GraphemeBreak grapheme_break(char32_t cp);
bool is_extended_pictographic(char32_t cp);
// Start of every extended grapheme cluster of s[0, n) (starts[0] = 0 when n > 0), appended to *starts.
void grapheme_starts(const char32_t* s, std::size_t n, std::vector<std::size_t>* starts);

// Canonical combining class (9.0) of cp; 0 for chars newer than 9.0.
std::uint8_t combining_class(char32_t cp);

// UTF-8 <-> UTF-32. Invalid UTF-8 (the tokenizer gets std::string from users) is an error: returns false (strict:
// no overlong forms, surrogates or values above U+10FFFF). byte_offsets: if non-null, the byte offset where each
// code point starts, plus a final entry = in.size(). append_utf8 writes U+FFFD for a surrogate or cp > U+10FFFF.
bool utf8_to_utf32(const std::string& in, std::u32string* out, std::vector<std::size_t>* byte_offsets = nullptr);
void append_utf8(char32_t cp, std::string* out);

const char* unicode_data_versions();   // e.g. "categories 8.0/16.0/17.0, normalization 9.0, lowercase 17.0"

}  // namespace cpuformer::unicode
