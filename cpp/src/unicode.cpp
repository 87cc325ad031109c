// unicode.cpp: Unicode algorithms for the tokenizers (cpp/src/unicode.h): category and property look-ups over the
// generated tables (unicode_data.cpp), lowercase, NFD/NFKD/NFC/NFKC with `tokenizers`-style change lists, UTF-8.
#include "unicode.h"

#include <algorithm>
#include <cstddef>

#include "unicode_data.h"

namespace cpuformer::unicode {
namespace {

constexpr char32_t kMaxCodePoint = 0x10FFFF;
constexpr char32_t kBlockMask = (char32_t{1} << 7) - 1;

// Hangul syllables (Unicode §3.12), composed and decomposed by formula.
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

// Decode one char of a block pool string (see the generator's ALPHABET: chars 35..126 without '?' and '\\').
inline unsigned decode(char c) {
  unsigned v = static_cast<unsigned char>(c) - 35u;
  if (c > '?') --v;
  if (c > '\\') --v;
  return v;
}

inline unsigned block_lookup(const std::uint16_t* index, const char* blocks, char32_t cp) {
  const std::size_t block = index[cp >> data::block_shift];
  return decode(blocks[(block << data::block_shift) + (cp & kBlockMask)]);
}

// Category of cp >= table_limit (the generator asserts this rule for all three versions).
Category high_category(char32_t cp) {
  if (cp == 0xE0001 || (cp >= 0xE0020 && cp <= 0xE007F)) return Category::Cf;
  if (cp >= 0xE0100 && cp <= 0xE01EF) return Category::Mn;
  if ((cp >= 0xF0000 && cp <= 0xFFFFD) || (cp >= 0x100000 && cp <= 0x10FFFD)) return Category::Co;
  return Category::Cn;
}

bool in_ranges(const std::uint32_t* ranges, std::size_t size, char32_t cp) {
  // ranges: sorted (first, last) pairs; find the last pair with first <= cp.
  std::size_t lo = 0, hi = size / 2;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (ranges[2 * mid] <= cp) lo = mid + 1; else hi = mid;
  }
  return lo > 0 && cp <= ranges[2 * (lo - 1) + 1];
}

// Decomposition of cp (9.0, not Hangul): pointer into the pool and length, or length 0 when none of this kind.
struct Decomp { const std::uint32_t* chars; std::size_t size; };

Decomp decomposition(char32_t cp, bool compat) {
  if (cp < 0xA0 || cp >= data::table_limit) return {nullptr, 0};
  const std::size_t n = data::decomp_entries_size / 2;
  std::size_t lo = 0, hi = n;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    const char32_t key = data::decomp_entries[2 * mid] & 0x1FFFFF;
    if (key < cp) lo = mid + 1; else hi = mid;
  }
  if (lo == n || (data::decomp_entries[2 * lo] & 0x1FFFFF) != cp) return {nullptr, 0};
  const std::uint32_t w0 = data::decomp_entries[2 * lo], w1 = data::decomp_entries[2 * lo + 1];
  const std::size_t len = compat ? (w0 >> 26) & 31 : (w0 >> 21) & 31;
  const std::size_t start = compat ? w1 >> 16 : w1 & 0xFFFF;
  return {data::decomp_pool + start, len};
}

// Primary composite of (a, b), or 0.
char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const std::size_t n = data::compositions_size / 3;
  std::size_t lo = 0, hi = n;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    const char32_t x = data::compositions[3 * mid], y = data::compositions[3 * mid + 1];
    if (x < a || (x == a && y < b)) lo = mid + 1; else hi = mid;
  }
  if (lo < n && data::compositions[3 * lo] == a && data::compositions[3 * lo + 1] == b)
    return data::compositions[3 * lo + 2];
  return 0;
}

}  // namespace

Category category(char32_t cp, int version) {
  if (cp > kMaxCodePoint) return Category::Cn;
  if (cp >= data::table_limit) return high_category(cp);
  const int v = version < 16 ? 0 : version == 16 ? 1 : 2;
  const std::size_t per_version = data::table_limit >> data::block_shift;
  return static_cast<Category>(block_lookup(data::gc_index + v * per_version, data::gc_blocks, cp));
}

const char* category_name(Category c) {
  static const char* const names[] = {"Cn", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No",
                                      "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs",
                                      "Zl", "Zp", "Cc", "Cf", "Cs", "Co"};
  const auto i = static_cast<std::size_t>(c);
  return i < sizeof(names) / sizeof(names[0]) ? names[i] : "Cn";
}

bool is_combining_mark(char32_t cp) {
  return in_ranges(data::combining_mark9, data::combining_mark9_size, cp);
}

GraphemeBreak grapheme_break(char32_t cp) {
  if (cp >= 0x20 && cp < 0x7F) return GraphemeBreak::Other;
  const std::uint32_t* r = data::grapheme_break;
  std::size_t lo = 0, hi = data::grapheme_break_size / 3;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (r[3 * mid] <= cp) lo = mid + 1; else hi = mid;
  }
  if (lo > 0 && cp <= r[3 * (lo - 1) + 1]) return static_cast<GraphemeBreak>(r[3 * (lo - 1) + 2]);
  return GraphemeBreak::Other;
}

bool is_extended_pictographic(char32_t cp) {
  if (cp < 0xA9) return false;
  return in_ranges(data::extended_pictographic, data::extended_pictographic_size, cp);
}

void grapheme_starts(const char32_t* s, std::size_t n, std::vector<std::size_t>* starts) {
  using B = GraphemeBreak;
  if (n == 0) return;
  starts->push_back(0);
  B prev = grapheme_break(s[0]);
  bool emoji = is_extended_pictographic(s[0]);  // GB11: ExtPict Extend* so far (before a ZWJ)
  bool emoji_zwj = false;                        // GB11: ExtPict Extend* ZWJ just before
  std::size_t ri_run = prev == B::RegionalIndicator ? 1 : 0;  // RIs ending at the previous char
  for (std::size_t i = 1; i < n; ++i) {
    const B cur = grapheme_break(s[i]);
    const bool pict = is_extended_pictographic(s[i]);
    bool join;
    if (prev == B::CR && cur == B::LF) join = true;                                                    // GB3
    else if (prev == B::CR || prev == B::LF || prev == B::Control) join = false;                      // GB4
    else if (cur == B::CR || cur == B::LF || cur == B::Control) join = false;                         // GB5
    else if (prev == B::L && (cur == B::L || cur == B::V || cur == B::LV || cur == B::LVT)) join = true;  // GB6
    else if ((prev == B::LV || prev == B::V) && (cur == B::V || cur == B::T)) join = true;           // GB7
    else if ((prev == B::LVT || prev == B::T) && cur == B::T) join = true;                            // GB8
    else if (cur == B::Extend || cur == B::ZWJ || cur == B::SpacingMark) join = true;                 // GB9, 9a
    else if (prev == B::Prepend) join = true;                                                         // GB9b
    else if (emoji_zwj && pict) join = true;                                                          // GB11
    else if (prev == B::RegionalIndicator && cur == B::RegionalIndicator) join = ri_run % 2 == 1;     // GB12, 13
    else join = false;                                                                                // GB999
    if (!join) starts->push_back(i);
    // GB11 state
    emoji_zwj = emoji && cur == B::ZWJ;
    if (pict) emoji = true;
    else if (cur != B::Extend) emoji = false;
    ri_run = cur == B::RegionalIndicator ? ri_run + 1 : 0;
    prev = cur;
  }
}

bool is_white_space(char32_t cp) {
  if (cp < 0x80) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  return in_ranges(data::white_space, data::white_space_size, cp);
}

bool is_alphabetic(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(data::alphabetic, data::alphabetic_size, cp);
}

void to_lower(char32_t cp, std::u32string* out) {
  if (cp < 0x80) {
    out->push_back(cp >= 'A' && cp <= 'Z' ? cp + 0x20 : cp);
    return;
  }
  if (cp == 0x130) {   // the only multi-char lowercase (SpecialCasing, unconditional)
    out->push_back(U'i');
    out->push_back(0x307);
    return;
  }
  const std::size_t n = data::lower_pairs_size / 2;
  std::size_t lo = 0, hi = n;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (data::lower_pairs[2 * mid] < cp) lo = mid + 1; else hi = mid;
  }
  out->push_back(lo < n && data::lower_pairs[2 * lo] == cp ? static_cast<char32_t>(data::lower_pairs[2 * lo + 1])
                                                           : cp);
}

std::uint8_t combining_class(char32_t cp) {
  if (cp < 0x300 || cp >= data::table_limit) return 0;
  return data::ccc_values[block_lookup(data::ccc_index, data::ccc_blocks, cp)];
}

void normalize(const std::u32string& text, Form form, std::u32string* out, std::vector<int>* changes) {
  const bool compat = form == Form::NFKD || form == Form::NFKC;
  const bool comp = form == Form::NFC || form == Form::NFKC;
  // 1. Full decomposition. Each source char gives k >= 1 chars: the first replaces it (change 0), the others are
  //    inserted (+1), so every one of them takes the source char's range.
  std::u32string d;
  std::vector<int> ch;
  d.reserve(text.size());
  ch.reserve(text.size());
  for (char32_t c : text) {
    if (c >= kSBase && c < kSBase + kSCount) {
      const char32_t s = c - kSBase;
      d.push_back(kLBase + s / kNCount);
      d.push_back(kVBase + (s % kNCount) / kTCount);
      ch.push_back(0);
      ch.push_back(1);
      if (s % kTCount != 0) {
        d.push_back(kTBase + s % kTCount);
        ch.push_back(1);
      }
      continue;
    }
    const Decomp dec = decomposition(c, compat);
    if (dec.size == 0) {
      d.push_back(c);
      ch.push_back(0);
      continue;
    }
    for (std::size_t i = 0; i < dec.size; ++i) {
      d.push_back(static_cast<char32_t>(dec.chars[i]));
      ch.push_back(i == 0 ? 0 : 1);
    }
  }
  // 2. Canonical reordering: stable sort of each run of non-starters by CCC. Each change moves with its char (as in
  //    unicode-normalization-alignments), so a moved inserted char (+1) takes the range of whichever source char
  //    precedes it after the sort: "ḋ" + U+0323 -> d (0,1), U+0323 (1,2), U+0307 (1,2).
  std::vector<std::uint8_t> cc(d.size());
  for (std::size_t i = 0; i < d.size(); ++i) cc[i] = combining_class(d[i]);
  for (std::size_t i = 0; i < d.size();) {
    if (cc[i] == 0) { ++i; continue; }
    std::size_t j = i;
    while (j < d.size() && cc[j] != 0) ++j;
    if (j - i > 1) {
      // insertion sort: runs are short, and it is stable
      for (std::size_t a = i + 1; a < j; ++a) {
        const char32_t c = d[a];
        const std::uint8_t k = cc[a];
        const int change = ch[a];
        std::size_t b = a;
        while (b > i && cc[b - 1] > k) {
          d[b] = d[b - 1];
          cc[b] = cc[b - 1];
          ch[b] = ch[b - 1];
          --b;
        }
        d[b] = c;
        cc[b] = k;
        ch[b] = change;
      }
    }
    i = j;
  }
  if (!comp) {
    *out = std::move(d);
    if (changes) *changes = std::move(ch);
    return;
  }
  // 3. Canonical composition. A char that composes into the last starter vanishes; the starter absorbs the source
  //    chars it consumed (a change c consumes 1 - c source chars), so the composite keeps the starter's range.
  std::u32string r;
  std::vector<int> rch;
  r.reserve(d.size());
  rch.reserve(d.size());
  std::size_t starter = SIZE_MAX;
  int last_cc = 0;
  for (std::size_t i = 0; i < d.size(); ++i) {
    const char32_t c = d[i];
    const int k = cc[i];
    if (starter != SIZE_MAX) {
      const bool adjacent = r.size() == starter + 1;
      if (adjacent || (last_cc != 0 && last_cc < k)) {
        const char32_t composite = compose(r[starter], c);
        if (composite != 0) {
          r[starter] = composite;
          rch[starter] += ch[i] - 1;
          continue;
        }
      }
    }
    if (k == 0) starter = r.size();
    r.push_back(c);
    rch.push_back(ch[i]);
    last_cc = k;
  }
  *out = std::move(r);
  if (changes) *changes = std::move(rch);
}

bool utf8_to_utf32(const std::string& in, std::u32string* out, std::vector<std::size_t>* byte_offsets) {
  out->clear();
  if (byte_offsets) byte_offsets->clear();
  const auto* s = reinterpret_cast<const unsigned char*>(in.data());
  const std::size_t n = in.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned b0 = s[i];
    char32_t cp;
    std::size_t len;
    if (b0 < 0x80) { cp = b0; len = 1; }
    else if (b0 >= 0xC2 && b0 <= 0xDF) { cp = b0 & 0x1F; len = 2; }
    else if (b0 >= 0xE0 && b0 <= 0xEF) { cp = b0 & 0x0F; len = 3; }
    else if (b0 >= 0xF0 && b0 <= 0xF4) { cp = b0 & 0x07; len = 4; }
    else return false;
    if (n - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const unsigned b = s[i + k];
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    // overlong forms, surrogates, beyond U+10FFFF
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > kMaxCodePoint)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    if (byte_offsets) byte_offsets->push_back(i);
    out->push_back(cp);
    i += len;
  }
  if (byte_offsets) byte_offsets->push_back(n);
  return true;
}

void append_utf8(char32_t cp, std::string* out) {
  if (cp > kMaxCodePoint || (cp >= 0xD800 && cp <= 0xDFFF)) cp = 0xFFFD;
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

const char* unicode_data_versions() {
  return "categories 8.0/16.0/17.0, white_space 15.0 (= 16.0 = 17.0), alphabetic 16.0, normalization 9.0, "
         "lowercase 17.0";
}

}  // namespace cpuformer::unicode
