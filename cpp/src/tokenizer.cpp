// tokenizer.cpp: Hugging Face tokenizer.json tokenizers (see cpp/include/cpuformer/tokenizer.h and
// shared/design/tokenizers.md). The behaviour follows the `tokenizers` library; the code is our own.
//
// Text is handled as code points. A piece of text being normalized (`Piece`, the library's NormalizedString) keeps,
// for every current char, the byte range [start, end) of the ORIGINAL text it came from (absolute, so slicing needs
// no shift), which is all the library's per-byte alignments say: every byte of a char carries the same range.
#include "cpuformer/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <fstream>
#include <new>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "json.h"
#include "parallel.h"
#include "regex.h"
#include "unicode.h"

namespace cpuformer {

namespace {

namespace uni = ::cpuformer::unicode;
using Range = std::pair<std::size_t, std::size_t>;

// ---------------------------------------------------------------------------------------------------------------
// Text helpers

std::string to_utf8(const char32_t* s, std::size_t n) {
  std::string out;
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) uni::append_utf8(s[i], &out);
  return out;
}
std::string to_utf8(const std::u32string& s) { return to_utf8(s.data(), s.size()); }

std::size_t utf8_len(char32_t c) { return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4; }

bool is_ws(char32_t c) { return uni::is_white_space(c); }  // Rust char::is_whitespace, regex \s

// The Rust regex crate's \w (Unicode 16.0): Alphabetic, M, Nd, Pc, Join_Control.
bool is_word_char(char32_t c) {
  if (c == 0x200C || c == 0x200D) return true;
  if (uni::is_alphabetic(c)) return true;
  const auto g = uni::category(c, 16);
  using G = uni::Category;
  return g == G::Mn || g == G::Mc || g == G::Me || g == G::Nd || g == G::Pc;
}

// BertPreTokenizer / Punctuation: ASCII punctuation or GC P* (Unicode 8.0, the unicode_categories crate).
bool is_bert_punct(char32_t c) {
  if ((c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~'))
    return true;
  const auto g = uni::category(c, 8);
  using G = uni::Category;
  return g == G::Pc || g == G::Pd || g == G::Ps || g == G::Pe || g == G::Pi || g == G::Pf || g == G::Po;
}

// Rust char::is_numeric (Unicode 17.0): Nd, Nl, No.
bool is_numeric(char32_t c) {
  const auto g = uni::category(c, 17);
  using G = uni::Category;
  return g == G::Nd || g == G::Nl || g == G::No;
}

// BertNormalizer's "Chinese" ranges, with the library's 2B920 start (Google's BERT has 2B820).
bool is_chinese_char(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

// ---------------------------------------------------------------------------------------------------------------
// Piece: text with per-char original byte ranges

struct Piece {
  std::u32string s;
  std::vector<Range> al;   // one per char of s
  std::size_t shift = 0;   // original start of this piece: the range an insertion at the very start gets
};

// The library's NormalizedString::transform: `changes[i]` for output char i: 0 = replaces the next source char,
// +1 = inserted, -n = replaces the next source char and deletes n more; `initial` source chars are skipped first.
void apply_changes(Piece* p, std::u32string&& out, const std::vector<int>& changes, std::size_t initial = 0) {
  std::vector<Range> al;
  al.reserve(out.size());
  std::size_t pos = initial;
  const std::size_t n = p->al.size();
  for (std::size_t i = 0; i < out.size(); ++i) {
    const int ch = changes[i];
    if (ch > 0) {
      al.push_back(pos > 0 && pos - 1 < n ? p->al[pos - 1] : Range{p->shift, p->shift});
    } else {
      al.push_back(pos < n ? p->al[pos] : (n ? p->al[n - 1] : Range{p->shift, p->shift}));
      pos += 1 + static_cast<std::size_t>(-ch);
    }
  }
  p->s = std::move(out);
  p->al = std::move(al);
}

Piece slice(const Piece& p, std::size_t b, std::size_t e) {
  Piece q;
  q.s = p.s.substr(b, e - b);
  q.al.assign(p.al.begin() + static_cast<std::ptrdiff_t>(b), p.al.begin() + static_cast<std::ptrdiff_t>(e));
  if (q.al.empty()) {
    q.shift = b < p.al.size() ? p.al[b].first : p.shift;
  } else {
    q.shift = q.al[0].first;
    for (const auto& a : q.al) q.shift = std::min(q.shift, a.first);
  }
  return q;
}

// A list of (range, is_match) covering a piece, as the library's Pattern::find_matches gives it.
using Matches = std::vector<std::pair<Range, bool>>;

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// NormalizedString::split: pieces according to the behavior; empty pieces are dropped.
void split_by(const Piece& p, Matches m, Behavior b, std::vector<Piece>* out) {
  std::vector<std::pair<Range, bool>> sp;  // (range, remove)
  switch (b) {
    case Behavior::Removed: sp = m; break;
    case Behavior::Isolated:
      for (auto& x : m) sp.push_back({x.first, false});
      break;
    case Behavior::Contiguous: {
      bool prev = false;
      for (auto& x : m) {
        if (x.second == prev && !sp.empty()) sp.back().first.second = x.first.second;
        else sp.push_back({x.first, false});
        prev = x.second;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool prev = false;
      for (auto& x : m) {
        if (x.second && !prev && !sp.empty()) sp.back().first.second = x.first.second;
        else sp.push_back({x.first, false});
        prev = x.second;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool prev = false;
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->second && !prev && !sp.empty()) sp.back().first.first = it->first.first;
        else sp.push_back({it->first, false});
        prev = it->second;
      }
      std::reverse(sp.begin(), sp.end());
      break;
    }
  }
  for (const auto& x : sp) {
    if (x.second || x.first.first >= x.first.second) continue;
    out->push_back(slice(p, x.first.first, x.first.second));
  }
}

template <class Pred>
Matches char_matches(const std::u32string& s, Pred pred) {
  Matches m;
  if (s.empty()) return {{{0, 0}, false}};
  std::size_t last = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (pred(s[i])) {
      if (last < i) m.push_back({{last, i}, false});
      m.push_back({{i, i + 1}, true});
      last = i + 1;
    }
  }
  if (last < s.size()) m.push_back({{last, s.size()}, false});
  return m;
}

Matches spans_to_matches(const std::vector<Range>& spans, std::size_t n) {
  Matches m;
  if (n == 0) return {{{0, 0}, false}};
  std::size_t prev = 0;
  for (const auto& sp : spans) {
    if (prev != sp.first) m.push_back({{prev, sp.first}, false});
    m.push_back({sp, true});
    prev = sp.second;
  }
  if (prev != n) m.push_back({{prev, n}, false});
  return m;
}

std::vector<Range> literal_spans(const std::u32string& s, const std::u32string& pat) {
  std::vector<Range> r;
  if (pat.empty()) return r;
  std::size_t i = 0;
  while (true) {
    const std::size_t f = s.find(pat, i);
    if (f == std::u32string::npos) break;
    r.push_back({f, f + pat.size()});
    i = f + pat.size();
  }
  return r;
}

// A Split/Replace pattern: a literal string or a regex.
struct Pattern {
  bool is_regex = false;
  std::u32string literal;
  regex::Regex re;
  std::vector<Range> find(const std::u32string& s) const {
    if (!is_regex) return literal_spans(s, literal);
    return re.find_all(s);
  }
  Matches matches(const std::u32string& s) const {
    if (!is_regex && literal.empty()) return {{{0, s.size()}, false}};
    return spans_to_matches(find(s), s.size());
  }
};

// ---------------------------------------------------------------------------------------------------------------
// JSON access with error messages that name the field

Status err(const std::string& where, const std::string& what) { return Status::error("tokenizer.json: " + where + ": " + what); }

const char* type_name(const Json& v) {
  switch (v.type) {
    case Json::kNull: return "null";
    case Json::kBool: return "a bool";
    case Json::kNumber: return "a number";
    case Json::kString: return "a string";
    case Json::kArray: return "an array";
    case Json::kObject: return "an object";
  }
  return "?";
}

Status need(const Json& obj, const char* key, const std::string& where, const Json** out) {
  const Json* v = obj.find(key);
  if (!v) return err(where, std::string("missing field '") + key + "'");
  *out = v;
  return Status();
}

// The parts of a Sequence component: obj[key] must be an array of components, each read by parse (one level deeper).
template <class T, class Parse>
Status parse_parts(const Json& obj, const char* key, const std::string& where, int depth, Parse parse,
                   std::vector<std::unique_ptr<T>>* parts) {
  const Json* list;
  Status st = need(obj, key, where, &list);
  if (!st.ok()) return st;
  if (list->type != Json::kArray) return err(where + "." + key, "expected an array");
  for (std::size_t i = 0; i < list->items.size(); ++i) {
    std::unique_ptr<T> part;
    st = parse(list->items[i], where + "." + key + "[" + std::to_string(i) + "]", depth + 1, &part);
    if (!st.ok()) return st;
    parts->push_back(std::move(part));
  }
  return Status();
}

Status as_bool(const Json& v, const std::string& where, bool* out) {
  if (v.type != Json::kBool) return err(where, std::string("expected a bool, got ") + type_name(v));
  *out = v.boolean;
  return Status();
}
Status as_string(const Json& v, const std::string& where, std::string* out) {
  if (v.type != Json::kString) return err(where, std::string("expected a string, got ") + type_name(v));
  std::u32string tmp;
  if (!uni::utf8_to_utf32(v.str, &tmp)) return err(where, "the string is not valid UTF-8");
  *out = v.str;
  return Status();
}
Status as_uint(const Json& v, const std::string& where, std::uint64_t max, std::uint64_t* out) {
  const bool ok = v.type == Json::kNumber && v.number >= 0 && v.number <= static_cast<double>(max) &&
                  v.number == static_cast<double>(static_cast<std::uint64_t>(v.number));
  if (!ok) {
    std::ostringstream os;
    os.precision(17);
    os << "expected an integer in [0, " << max << "], got ";
    if (v.type == Json::kNumber) os << v.number;
    else os << type_name(v);
    return err(where, os.str());
  }
  *out = static_cast<std::uint64_t>(v.number);
  return Status();
}

// Optional fields: absent or null keep the default.
Status opt_bool(const Json& obj, const char* key, const std::string& where, bool* out) {
  const Json* v = obj.find(key);
  if (!v || v->type == Json::kNull) return Status();
  return as_bool(*v, where + "." + key, out);
}
Status req_bool(const Json& obj, const char* key, const std::string& where, bool* out) {
  const Json* v;
  Status st = need(obj, key, where, &v);
  if (!st.ok()) return st;
  return as_bool(*v, where + "." + key, out);
}
Status req_string(const Json& obj, const char* key, const std::string& where, std::string* out) {
  const Json* v;
  Status st = need(obj, key, where, &v);
  if (!st.ok()) return st;
  return as_string(*v, where + "." + key, out);
}
// Absent or null -> *present = false.
Status opt_string(const Json& obj, const char* key, const std::string& where, std::string* out, bool* present) {
  const Json* v = obj.find(key);
  *present = false;
  if (!v || v->type == Json::kNull) return Status();
  *present = true;
  return as_string(*v, where + "." + key, out);
}

constexpr std::uint64_t kMaxId = (std::uint64_t{1} << 31) - 1;
constexpr std::uint64_t kMaxLen = std::uint64_t{1} << 40;

Status parse_behavior(const Json& obj, const std::string& where, bool required, Behavior* out) {
  const Json* v = obj.find("behavior");
  if (!v || v->type == Json::kNull) {
    if (required) return err(where, "missing field 'behavior'");
    return Status();
  }
  std::string s;
  Status st = as_string(*v, where + ".behavior", &s);
  if (!st.ok()) return st;
  if (s == "Removed") *out = Behavior::Removed;
  else if (s == "Isolated") *out = Behavior::Isolated;
  else if (s == "MergedWithPrevious") *out = Behavior::MergedWithPrevious;
  else if (s == "MergedWithNext") *out = Behavior::MergedWithNext;
  else if (s == "Contiguous") *out = Behavior::Contiguous;
  else return err(where + ".behavior", "unknown behavior " + quoted(s));
  return Status();
}

Status parse_pattern(const Json& obj, const std::string& where, Pattern* out) {
  const Json* v;
  Status st = need(obj, "pattern", where, &v);
  if (!st.ok()) return st;
  const std::string w = where + ".pattern";
  if (v->type != Json::kObject || v->members.size() != 1)
    return err(w, "expected {\"String\": ...} or {\"Regex\": ...}");
  const std::string& kind = v->members[0].first;
  std::string text;
  st = as_string(v->members[0].second, w + "." + kind, &text);
  if (!st.ok()) return st;
  if (kind == "String") {
    out->is_regex = false;
    uni::utf8_to_utf32(text, &out->literal);
  } else if (kind == "Regex") {
    out->is_regex = true;
    std::string error;
    if (!regex::Regex::compile(text, &out->re, &error))
      return err(w + ".Regex", "regex pattern " + quoted(text) + " is not supported: " + error);
  } else {
    return err(w, "unknown pattern kind " + quoted(kind) + " (expected String or Regex)");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------
// Normalizers

struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void normalize(Piece* p) const = 0;
};

void lowercase_piece(Piece* p) {
  std::u32string out;
  std::vector<Range> al;
  out.reserve(p->s.size());
  al.reserve(p->s.size());
  std::u32string tmp;
  for (std::size_t i = 0; i < p->s.size(); ++i) {
    const char32_t c = p->s[i];
    if (c < 0x80) {
      out.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
      al.push_back(p->al[i]);
      continue;
    }
    tmp.clear();
    uni::to_lower(c, &tmp);
    for (char32_t l : tmp) {  // every char of a multi-char result takes the source char's range
      out.push_back(l);
      al.push_back(p->al[i]);
    }
  }
  p->s = std::move(out);
  p->al = std::move(al);
}

void normalize_form(Piece* p, uni::Form form) {
  std::u32string out;
  std::vector<int> changes;
  uni::normalize(p->s, form, &out, &changes);
  apply_changes(p, std::move(out), changes);
}

template <class Keep>
void filter_piece(Piece* p, Keep keep) {
  std::size_t j = 0;
  for (std::size_t i = 0; i < p->s.size(); ++i) {
    if (keep(p->s[i])) {
      p->s[j] = p->s[i];
      p->al[j] = p->al[i];
      ++j;
    }
  }
  p->s.resize(j);
  p->al.resize(j);
}

struct BertNormalizer : Normalizer {
  bool clean_text = true, chinese = true, strip_accents = false, lowercase = true;
  void normalize(Piece* p) const override {
    using G = uni::Category;
    if (clean_text) {
      filter_piece(p, [](char32_t c) {
        if (c == 0 || c == 0xFFFD) return false;
        if (c == '\t' || c == '\n' || c == '\r') return true;
        const auto g = uni::category(c, 8);
        return !(g == G::Cc || g == G::Cf || g == G::Co);
      });
      for (auto& c : p->s)
        if (c == '\t' || c == '\n' || c == '\r' || is_ws(c)) c = ' ';
    }
    if (chinese) {
      bool any = false;
      for (char32_t c : p->s) any = any || is_chinese_char(c);
      if (any) {
        std::u32string out;
        std::vector<Range> al;
        for (std::size_t i = 0; i < p->s.size(); ++i) {
          const char32_t c = p->s[i];
          if (is_chinese_char(c)) {
            out.push_back(' ');
            out.push_back(c);
            out.push_back(' ');
            al.insert(al.end(), 3, p->al[i]);
          } else {
            out.push_back(c);
            al.push_back(p->al[i]);
          }
        }
        p->s = std::move(out);
        p->al = std::move(al);
      }
    }
    if (strip_accents) {
      bool ascii = true;
      for (char32_t c : p->s) ascii = ascii && c < 0x80;
      if (!ascii) {
        normalize_form(p, uni::Form::NFD);
        filter_piece(p, [](char32_t c) { return uni::category(c, 8) != G::Mn; });
      }
    }
    if (lowercase) lowercase_piece(p);
  }
};

struct LowercaseN : Normalizer {
  void normalize(Piece* p) const override { lowercase_piece(p); }
};

struct FormN : Normalizer {
  uni::Form form;
  explicit FormN(uni::Form f) : form(f) {}
  void normalize(Piece* p) const override { normalize_form(p, form); }
};

struct StripAccentsN : Normalizer {  // deletes GC M* (9.0); does not decompose first
  void normalize(Piece* p) const override { filter_piece(p, [](char32_t c) { return !uni::is_combining_mark(c); }); }
};

struct StripN : Normalizer {
  bool left = true, right = true;
  void normalize(Piece* p) const override {
    std::size_t b = 0, e = p->s.size();
    if (left)
      while (b < e && is_ws(p->s[b])) ++b;
    if (right)
      while (e > b && is_ws(p->s[e - 1])) --e;
    if (b == 0 && e == p->s.size()) return;
    p->s = p->s.substr(b, e - b);
    p->al = std::vector<Range>(p->al.begin() + static_cast<std::ptrdiff_t>(b),
                               p->al.begin() + static_cast<std::ptrdiff_t>(e));
  }
};

struct ReplaceN : Normalizer {
  Pattern pattern;
  std::u32string content;
  void normalize(Piece* p) const override {
    const auto spans = pattern.find(p->s);
    if (spans.empty()) return;
    std::u32string out;
    std::vector<Range> al;
    std::size_t last = 0;
    for (const auto& sp : spans) {
      out.append(p->s, last, sp.first - last);
      al.insert(al.end(), p->al.begin() + static_cast<std::ptrdiff_t>(last),
                p->al.begin() + static_cast<std::ptrdiff_t>(sp.first));
      // Each replacement char takes the range of the last matched char ((0,0) for an empty match at the start).
      const Range a = sp.second > 0 ? p->al[sp.second - 1] : Range{p->shift, p->shift};
      for (char32_t c : content) {
        out.push_back(c);
        al.push_back(a);
      }
      last = sp.second;
    }
    out.append(p->s, last, std::u32string::npos);
    al.insert(al.end(), p->al.begin() + static_cast<std::ptrdiff_t>(last), p->al.end());
    p->s = std::move(out);
    p->al = std::move(al);
  }
};

struct PrependN : Normalizer {
  std::u32string prefix;
  void normalize(Piece* p) const override {
    if (p->s.empty() || prefix.empty()) return;
    const Range a = p->al[0];
    p->s.insert(0, prefix);
    p->al.insert(p->al.begin(), prefix.size(), a);
  }
};

struct NmtN : Normalizer {
  void normalize(Piece* p) const override {
    filter_piece(p, [](char32_t c) {
      return !((c >= 0x01 && c <= 0x08) || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || c == 0x8F ||
               c == 0x9F);
    });
    for (auto& c : p->s)
      if (c == 0x09 || c == 0x0A || c == 0x0C || c == 0x0D || c == 0x1680 || (c >= 0x200B && c <= 0x200F) ||
          c == 0x2028 || c == 0x2029 || c == 0x2581 || c == 0xFEFF || c == 0xFFFD)
        c = ' ';
  }
};

// Precompiled: SentencePiece's precompiled charsmap (tokenizers.md §2.3). A darts-clone double array of u32 units
// maps UTF-8 keys to byte offsets into a blob of NUL-terminated replacement strings. Matching follows the library
// (not SentencePiece): per extended grapheme cluster, a cluster under 6 bytes with any prefix match is replaced
// whole by the SHORTEST match's string; otherwise each char is looked up on its own. Changes are recorded as the
// library's `replace` helper does, including its quirk: a deletion adds its count to the last change recorded so
// far, so a deletion before any output is lost and every later char's offsets shift left (the library's bug, kept).
struct PrecompiledN : Normalizer {
  std::vector<std::uint32_t> units;
  std::string strings;  // the blob after the trie (valid UTF-8; NUL-terminated entries)

  static std::uint32_t offset_of(std::uint32_t u) { return (u >> 10) << ((u & 0x200u) >> 6); }
  static std::uint32_t label_of(std::uint32_t u) { return u & ((1u << 31) | 0xFFu); }
  static bool has_leaf(std::uint32_t u) { return (u >> 8) & 1u; }
  static std::uint32_t value_of(std::uint32_t u) { return u & 0x7FFFFFFFu; }

  // Shortest prefix match of key[0, n): the replacement's start in `strings`, or -1. Bounds were checked at load.
  std::int64_t shortest(const char* key, std::size_t n) const {
    std::size_t pos = offset_of(units[0]);
    for (std::size_t i = 0; i < n; ++i) {
      const auto c = static_cast<unsigned char>(key[i]);
      if (c == 0) break;
      pos ^= c;
      const std::uint32_t u = units[pos];
      if (label_of(u) != c) return -1;
      pos ^= offset_of(u);
      if (has_leaf(u)) return value_of(units[pos]);
    }
    return -1;
  }

  // Load-time check that every walk stays inside the arrays and every value is a valid string start.
  static bool validate(const std::vector<std::uint32_t>& a, const std::string& strings, std::string* why) {
    const std::size_t n = a.size();
    if (n == 0) { *why = "empty trie"; return false; }
    std::vector<char> seen(n, 0);
    std::vector<std::size_t> stack;
    auto visit_base = [&](std::size_t base) {
      if ((base | 0xFFu) >= n) return false;
      if (!seen[base]) { seen[base] = 1; stack.push_back(base); }
      return true;
    };
    if (!visit_base(offset_of(a[0]))) { *why = "trie offset past the end"; return false; }
    while (!stack.empty()) {
      const std::size_t base = stack.back();
      stack.pop_back();
      for (std::uint32_t c = 1; c < 256; ++c) {
        const std::uint32_t u = a[base ^ c];
        if (label_of(u) != c) continue;
        const std::size_t next = base ^ c ^ offset_of(u);
        if (has_leaf(u)) {
          if (next >= n) { *why = "trie offset past the end"; return false; }
          const std::uint32_t v = value_of(a[next]);
          if (v >= strings.size()) { *why = "replacement offset past the end of the strings"; return false; }
          if ((static_cast<unsigned char>(strings[v]) & 0xC0u) == 0x80u) {
            *why = "replacement offset inside a UTF-8 char";
            return false;
          }
        }
        if (!visit_base(next)) { *why = "trie offset past the end"; return false; }
      }
    }
    return true;
  }

  std::u32string replacement(std::int64_t start) const {
    const std::size_t b = static_cast<std::size_t>(start);
    std::size_t e = strings.find('\0', b);
    if (e == std::string::npos) e = strings.size();
    std::u32string r;
    uni::utf8_to_utf32(strings.substr(b, e - b), &r);  // valid: the blob is checked UTF-8, b a char start
    return r;
  }

  // The library's `replace`: new chars get 0; extra ones at the end +1; fewer: the last change so far gets -diff.
  static void replace(std::u32string* out, std::vector<int>* changes, std::size_t old_count,
                      const std::u32string& now) {
    for (char32_t c : now) {
      out->push_back(c);
      changes->push_back(0);
    }
    const std::ptrdiff_t diff = static_cast<std::ptrdiff_t>(now.size()) - static_cast<std::ptrdiff_t>(old_count);
    if (diff > 0) {
      for (std::size_t k = 0; k < static_cast<std::size_t>(diff); ++k) (*changes)[changes->size() - 1 - k] = 1;
    } else if (diff < 0 && !changes->empty()) {
      changes->back() += static_cast<int>(diff);
    }
  }

  void normalize(Piece* p) const override {
    const std::size_t n = p->s.size();
    if (n == 0) return;
    std::vector<std::size_t> starts;
    uni::grapheme_starts(p->s.data(), n, &starts);
    starts.push_back(n);
    std::u32string out;
    std::vector<int> changes;
    out.reserve(n);
    changes.reserve(n);
    bool modified = false;
    std::string key;
    for (std::size_t g = 0; g + 1 < starts.size(); ++g) {
      const std::size_t b = starts[g], e = starts[g + 1];
      key.clear();
      for (std::size_t i = b; i < e; ++i) uni::append_utf8(p->s[i], &key);
      if (key.size() < 6) {
        const std::int64_t m = shortest(key.data(), key.size());
        if (m >= 0) {
          modified = true;
          replace(&out, &changes, e - b, replacement(m));
          continue;
        }
      }
      for (std::size_t i = b; i < e; ++i) {
        key.clear();
        uni::append_utf8(p->s[i], &key);
        const std::int64_t m = shortest(key.data(), key.size());
        if (m >= 0) {
          modified = true;
          replace(&out, &changes, 1, replacement(m));
        } else {
          out.push_back(p->s[i]);
          changes.push_back(0);
        }
      }
    }
    if (modified) apply_changes(p, std::move(out), changes);
  }
};

bool base64_decode(const std::string& in, std::string* out) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (in.size() % 4 != 0) return false;
  out->clear();
  out->reserve(in.size() / 4 * 3);
  for (std::size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    int pad = 0;
    if (last && in[i + 3] == '=') pad = in[i + 2] == '=' ? 2 : 1;
    std::uint32_t acc = 0;
    for (int k = 0; k < 4; ++k) {
      int v = 0;
      if (k < 4 - pad) {
        v = val(in[i + static_cast<std::size_t>(k)]);
        if (v < 0) return false;
      }
      acc = acc << 6 | static_cast<std::uint32_t>(v);
    }
    if ((pad == 1 && (acc & 0xFFu)) || (pad == 2 && (acc & 0xFFFFu))) return false;  // non-canonical last symbol
    out->push_back(static_cast<char>(acc >> 16));
    if (pad < 2) out->push_back(static_cast<char>((acc >> 8) & 0xFF));
    if (pad < 1) out->push_back(static_cast<char>(acc & 0xFF));
  }
  return true;
}

Status parse_precompiled(const std::string& b64, const std::string& where, std::unique_ptr<Normalizer>* out) {
  std::string blob;
  if (!base64_decode(b64, &blob)) return err(where, "not valid base64");
  if (blob.size() < 4) return err(where, "too short for a charsmap (" + std::to_string(blob.size()) + " bytes)");
  const auto* d = reinterpret_cast<const unsigned char*>(blob.data());
  const std::size_t trie_bytes = static_cast<std::size_t>(d[0]) | static_cast<std::size_t>(d[1]) << 8 |
                                 static_cast<std::size_t>(d[2]) << 16 | static_cast<std::size_t>(d[3]) << 24;
  if (trie_bytes % 4 != 0 || trie_bytes > blob.size() - 4)
    return err(where, "trie size " + std::to_string(trie_bytes) + " does not fit the " +
                          std::to_string(blob.size()) + "-byte map");
  auto n = std::make_unique<PrecompiledN>();
  n->units.resize(trie_bytes / 4);
  for (std::size_t i = 0; i < n->units.size(); ++i) {
    const unsigned char* q = d + 4 + 4 * i;
    n->units[i] = static_cast<std::uint32_t>(q[0]) | static_cast<std::uint32_t>(q[1]) << 8 |
                  static_cast<std::uint32_t>(q[2]) << 16 | static_cast<std::uint32_t>(q[3]) << 24;
  }
  n->strings = blob.substr(4 + trie_bytes);
  std::u32string check;
  if (!uni::utf8_to_utf32(n->strings, &check)) return err(where, "the replacement strings are not valid UTF-8");
  std::string why;
  if (!PrecompiledN::validate(n->units, n->strings, &why)) return err(where, why);
  *out = std::move(n);
  return Status();
}

void byte_level_chars(Piece* p);

struct ByteLevelN : Normalizer {
  void normalize(Piece* p) const override { byte_level_chars(p); }
};

struct SequenceN : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> items;
  void normalize(Piece* p) const override {
    for (const auto& n : items) n->normalize(p);
  }
};

Status parse_normalizer(const Json& j, const std::string& where, int depth, std::unique_ptr<Normalizer>* out) {
  if (depth > 16) return err(where, "Sequence nested too deeply");
  if (j.type != Json::kObject) return err(where, std::string("expected an object, got ") + type_name(j));
  std::string type;
  Status st = req_string(j, "type", where, &type);
  if (!st.ok()) return st;
  if (type == "BertNormalizer") {
    auto n = std::make_unique<BertNormalizer>();
    if (!(st = opt_bool(j, "clean_text", where, &n->clean_text)).ok()) return st;
    if (!(st = opt_bool(j, "handle_chinese_chars", where, &n->chinese)).ok()) return st;
    if (!(st = opt_bool(j, "lowercase", where, &n->lowercase)).ok()) return st;
    n->strip_accents = n->lowercase;  // null or absent: follows lowercase
    if (!(st = opt_bool(j, "strip_accents", where, &n->strip_accents)).ok()) return st;
    *out = std::move(n);
  } else if (type == "Lowercase") {
    *out = std::make_unique<LowercaseN>();
  } else if (type == "NFC") {
    *out = std::make_unique<FormN>(uni::Form::NFC);
  } else if (type == "NFD") {
    *out = std::make_unique<FormN>(uni::Form::NFD);
  } else if (type == "NFKC") {
    *out = std::make_unique<FormN>(uni::Form::NFKC);
  } else if (type == "NFKD") {
    *out = std::make_unique<FormN>(uni::Form::NFKD);
  } else if (type == "Precompiled") {
    std::string b64;
    if (!(st = req_string(j, "precompiled_charsmap", where, &b64)).ok()) return st;
    return parse_precompiled(b64, where + ".precompiled_charsmap", out);
  } else if (type == "StripAccents") {
    *out = std::make_unique<StripAccentsN>();
  } else if (type == "Strip") {
    auto n = std::make_unique<StripN>();
    if (!(st = req_bool(j, "strip_left", where, &n->left)).ok()) return st;
    if (!(st = req_bool(j, "strip_right", where, &n->right)).ok()) return st;
    *out = std::move(n);
  } else if (type == "Replace") {
    auto n = std::make_unique<ReplaceN>();
    if (!(st = parse_pattern(j, where, &n->pattern)).ok()) return st;
    std::string content;
    if (!(st = req_string(j, "content", where, &content)).ok()) return st;
    uni::utf8_to_utf32(content, &n->content);
    if (!n->pattern.is_regex && n->pattern.literal.empty()) return err(where + ".pattern", "empty pattern");
    *out = std::move(n);
  } else if (type == "Prepend") {
    auto n = std::make_unique<PrependN>();
    std::string s;
    if (!(st = req_string(j, "prepend", where, &s)).ok()) return st;
    uni::utf8_to_utf32(s, &n->prefix);
    *out = std::move(n);
  } else if (type == "Nmt") {
    *out = std::make_unique<NmtN>();
  } else if (type == "ByteLevel") {
    *out = std::make_unique<ByteLevelN>();
  } else if (type == "Sequence") {
    auto n = std::make_unique<SequenceN>();
    if (!(st = parse_parts(j, "normalizers", where, depth, parse_normalizer, &n->items)).ok()) return st;
    *out = std::move(n);
  } else {
    return err(where, "normalizer type " + quoted(type) + " is not supported yet");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------
// Pre-tokenizers: each turns one piece into pieces (empty ones are dropped by the caller).

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  virtual void split(Piece&& p, std::vector<Piece>* out) const = 0;
};

struct BertPre : PreTokenizer {
  void split(Piece&& p, std::vector<Piece>* out) const override {
    // Split on whitespace (removed), then isolate each punctuation char: one pass does both.
    std::size_t start = 0;
    const std::size_t n = p.s.size();
    for (std::size_t i = 0; i < n; ++i) {
      const char32_t c = p.s[i];
      const bool ws = is_ws(c);
      if (ws || is_bert_punct(c)) {
        if (start < i) out->push_back(slice(p, start, i));
        if (!ws) out->push_back(slice(p, i, i + 1));
        start = i + 1;
      }
    }
    if (start < n) out->push_back(slice(p, start, n));
  }
};

struct WhitespacePre : PreTokenizer {  // \w+|[^\w\s]+, gaps dropped
  void split(Piece&& p, std::vector<Piece>* out) const override {
    const std::size_t n = p.s.size();
    std::size_t i = 0;
    while (i < n) {
      const char32_t c = p.s[i];
      if (is_word_char(c)) {
        std::size_t j = i + 1;
        while (j < n && is_word_char(p.s[j])) ++j;
        out->push_back(slice(p, i, j));
        i = j;
      } else if (!is_ws(c)) {
        std::size_t j = i + 1;
        while (j < n && !is_word_char(p.s[j]) && !is_ws(p.s[j])) ++j;
        out->push_back(slice(p, i, j));
        i = j;
      } else {
        ++i;
      }
    }
  }
};

struct WhitespaceSplitPre : PreTokenizer {
  void split(Piece&& p, std::vector<Piece>* out) const override {
    split_by(p, char_matches(p.s, is_ws), Behavior::Removed, out);
  }
};

struct PunctuationPre : PreTokenizer {
  Behavior behavior = Behavior::Isolated;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    split_by(p, char_matches(p.s, is_bert_punct), behavior, out);
  }
};

struct DigitsPre : PreTokenizer {
  bool individual = false;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    split_by(p, char_matches(p.s, is_numeric), individual ? Behavior::Isolated : Behavior::Contiguous, out);
  }
};

struct SplitPre : PreTokenizer {
  Pattern pattern;
  Behavior behavior = Behavior::Removed;
  bool invert = false;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    Matches m = pattern.matches(p.s);
    if (invert)
      for (auto& x : m) x.second = !x.second;
    split_by(p, std::move(m), behavior, out);
  }
};

// GPT-2's byte <-> char map: printable bytes map to themselves, the other 68 to U+0100... in byte order.
struct ByteMap {
  char32_t to_char[256];
  std::unordered_map<char32_t, unsigned char> to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[b] = keep ? static_cast<char32_t>(b) : static_cast<char32_t>(0x100 + n++);
      to_byte[to_char[b]] = static_cast<unsigned char>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

const char* kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct ByteLevelPre : PreTokenizer {
  bool add_prefix_space = true, use_regex = true;
  regex::Regex re;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    if (add_prefix_space && !p.s.empty() && p.s[0] != ' ') {
      p.s.insert(p.s.begin(), U' ');
      p.al.insert(p.al.begin(), p.al[0]);
    }
    std::vector<Piece> parts;
    if (use_regex) {
      split_by(p, spans_to_matches(re.find_all(p.s), p.s.size()), Behavior::Isolated, &parts);
    } else {
      parts.push_back(std::move(p));
    }
    for (auto& q : parts) {
      if (q.s.empty()) continue;
      byte_level_chars(&q);
      out->push_back(std::move(q));
    }
  }
};

// Each UTF-8 byte of each char becomes its GPT-2 byte char, with the char's range.
void byte_level_chars(Piece* p) {
  const ByteMap& bm = byte_map();
  std::u32string s;
  std::vector<Range> al;
  s.reserve(p->s.size());
  al.reserve(p->s.size());
  std::string buf;
  for (std::size_t i = 0; i < p->s.size(); ++i) {
    buf.clear();
    uni::append_utf8(p->s[i], &buf);
    for (unsigned char b : buf) {
      s.push_back(bm.to_char[b]);
      al.push_back(p->al[i]);
    }
  }
  p->s = std::move(s);
  p->al = std::move(al);
}

struct CharDelimiterPre : PreTokenizer {
  char32_t delimiter = ' ';
  void split(Piece&& p, std::vector<Piece>* out) const override {
    const char32_t d = delimiter;
    split_by(p, char_matches(p.s, [d](char32_t c) { return c == d; }), Behavior::Removed, out);
  }
};

struct FixedLengthPre : PreTokenizer {
  std::size_t length = 5;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    for (std::size_t b = 0; b < p.s.size(); b += length) out->push_back(slice(p, b, std::min(p.s.size(), b + length)));
  }
};

enum class PrependScheme { Always, First, Never };

Status parse_prepend_scheme(const Json& j, const std::string& where, PrependScheme* out) {
  Status st;
  bool present = false;
  std::string s;
  if (!(st = opt_string(j, "prepend_scheme", where, &s, &present)).ok()) return st;
  if (present) {
    if (s == "always") *out = PrependScheme::Always;
    else if (s == "first") *out = PrependScheme::First;
    else if (s == "never") *out = PrependScheme::Never;
    else return err(where + ".prepend_scheme", "expected \"always\", \"first\" or \"never\", got " + quoted(s));
  }
  bool apsp = true;
  if (!(st = opt_bool(j, "add_prefix_space", where, &apsp)).ok()) return st;
  if (!apsp && *out != PrependScheme::Never)
    return err(where, "add_prefix_space false needs prepend_scheme \"never\"");
  return Status();
}

struct MetaspacePre : PreTokenizer {
  char32_t replacement = 0x2581;
  PrependScheme scheme = PrependScheme::Always;
  bool split_ = true;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    for (auto& c : p.s)
      if (c == ' ') c = replacement;  // each replacement keeps its space's range
    const bool prepend = !p.s.empty() && p.s[0] != replacement &&
                         (scheme == PrependScheme::Always || (scheme == PrependScheme::First && p.shift == 0));
    if (prepend) {
      p.s.insert(p.s.begin(), replacement);
      p.al.insert(p.al.begin(), p.al[0]);
    }
    if (!split_) {
      out->push_back(std::move(p));
      return;
    }
    const char32_t r = replacement;
    split_by(p, char_matches(p.s, [r](char32_t c) { return c == r; }), Behavior::MergedWithNext, out);
  }
};

struct SequencePre : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> items;
  void split(Piece&& p, std::vector<Piece>* out) const override {
    std::vector<Piece> cur;
    cur.push_back(std::move(p));
    for (const auto& t : items) {
      std::vector<Piece> next;
      for (auto& q : cur) {
        if (q.s.empty()) continue;
        t->split(std::move(q), &next);
      }
      cur = std::move(next);
    }
    for (auto& q : cur)
      if (!q.s.empty()) out->push_back(std::move(q));
  }
};

Status parse_bytelevel_common(const Json& j, const std::string& where, bool* apsp, bool* trim, bool* use_regex) {
  Status st;
  if (apsp && !(st = opt_bool(j, "add_prefix_space", where, apsp)).ok()) return st;
  if (trim && !(st = opt_bool(j, "trim_offsets", where, trim)).ok()) return st;
  if (use_regex && !(st = opt_bool(j, "use_regex", where, use_regex)).ok()) return st;
  return Status();
}

Status parse_pre(const Json& j, const std::string& where, int depth, std::unique_ptr<PreTokenizer>* out) {
  if (depth > 16) return err(where, "Sequence nested too deeply");
  if (j.type != Json::kObject) return err(where, std::string("expected an object, got ") + type_name(j));
  std::string type;
  Status st = req_string(j, "type", where, &type);
  if (!st.ok()) return st;
  if (type == "BertPreTokenizer") {
    *out = std::make_unique<BertPre>();
  } else if (type == "Whitespace") {
    *out = std::make_unique<WhitespacePre>();
  } else if (type == "WhitespaceSplit") {
    *out = std::make_unique<WhitespaceSplitPre>();
  } else if (type == "Punctuation") {
    auto p = std::make_unique<PunctuationPre>();
    if (!(st = parse_behavior(j, where, false, &p->behavior)).ok()) return st;
    *out = std::move(p);
  } else if (type == "Digits") {
    auto p = std::make_unique<DigitsPre>();
    if (!(st = req_bool(j, "individual_digits", where, &p->individual)).ok()) return st;
    *out = std::move(p);
  } else if (type == "Split") {
    auto p = std::make_unique<SplitPre>();
    if (!(st = parse_pattern(j, where, &p->pattern)).ok()) return st;
    if (!(st = parse_behavior(j, where, true, &p->behavior)).ok()) return st;
    if (!(st = req_bool(j, "invert", where, &p->invert)).ok()) return st;
    *out = std::move(p);
  } else if (type == "ByteLevel") {
    auto p = std::make_unique<ByteLevelPre>();
    if (!(st = parse_bytelevel_common(j, where, &p->add_prefix_space, nullptr, &p->use_regex)).ok()) return st;
    if (p->use_regex) {
      std::string error;
      if (!regex::Regex::compile(kGpt2Pattern, &p->re, &error))
        return err(where, "ByteLevel's GPT-2 regex is not supported: " + error);
    }
    *out = std::move(p);
  } else if (type == "CharDelimiterSplit") {
    auto p = std::make_unique<CharDelimiterPre>();
    std::string d;
    if (!(st = req_string(j, "delimiter", where, &d)).ok()) return st;
    std::u32string u;
    uni::utf8_to_utf32(d, &u);
    if (u.size() != 1) return err(where + ".delimiter", "expected exactly one character");
    p->delimiter = u[0];
    *out = std::move(p);
  } else if (type == "FixedLength") {
    auto p = std::make_unique<FixedLengthPre>();
    const Json* v = j.find("length");
    if (v && v->type != Json::kNull) {
      std::uint64_t n;
      if (!(st = as_uint(*v, where + ".length", kMaxLen, &n)).ok()) return st;
      if (n == 0) return err(where + ".length", "must be at least 1");
      p->length = static_cast<std::size_t>(n);
    }
    *out = std::move(p);
  } else if (type == "Metaspace") {
    auto p = std::make_unique<MetaspacePre>();
    std::string rep;
    if (!(st = req_string(j, "replacement", where, &rep)).ok()) return st;
    std::u32string u;
    uni::utf8_to_utf32(rep, &u);
    if (u.size() != 1) return err(where + ".replacement", "expected exactly one character");
    p->replacement = u[0];
    if (!(st = parse_prepend_scheme(j, where, &p->scheme)).ok()) return st;
    if (!(st = opt_bool(j, "split", where, &p->split_)).ok()) return st;
    *out = std::move(p);
  } else if (type == "Sequence") {
    auto p = std::make_unique<SequencePre>();
    if (!(st = parse_parts(j, "pretokenizers", where, depth, parse_pre, &p->items)).ok()) return st;
    *out = std::move(p);
  } else {
    return err(where, "pre-tokenizer type " + quoted(type) + " is not supported yet");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------
// Models. A token's offsets are byte offsets into the piece's UTF-8.

// A byte trie: child(node, byte) (0 = none; the root is 0 and never a child), value(node) (-1 = not a piece).
struct Trie_ {
  std::vector<std::int64_t> values{-1};
  std::unordered_map<std::uint64_t, std::uint32_t> edges;
  std::uint32_t child(std::uint32_t node, unsigned char b) const {
    auto it = edges.find((std::uint64_t{node} << 8) | b);
    return it == edges.end() ? 0 : it->second;
  }
  std::int64_t value(std::uint32_t node) const { return values[node]; }
  void insert(const std::string& s, std::int64_t value) {
    std::uint32_t node = 0;
    for (unsigned char b : s) {
      const std::uint64_t key = (std::uint64_t{node} << 8) | b;
      auto it = edges.find(key);
      if (it == edges.end()) {
        const auto next = static_cast<std::uint32_t>(values.size());
        values.push_back(-1);
        edges.emplace(key, next);
        node = next;
      } else {
        node = it->second;
      }
    }
    if (value >= 0) values[node] = value;
  }
};

struct Tok {
  std::int64_t id;
  std::string value;
  std::size_t b, e;
};

struct Vocab {
  std::unordered_map<std::string, std::int64_t> to_id;
  std::unordered_map<std::int64_t, std::string> to_token;
  std::int64_t get(const std::string& s) const {
    auto it = to_id.find(s);
    return it == to_id.end() ? -1 : it->second;
  }
};

Status parse_vocab_object(const Json& j, const std::string& where, Vocab* v) {
  if (j.type != Json::kObject) return err(where, std::string("expected an object, got ") + type_name(j));
  v->to_id.reserve(j.members.size());
  for (const auto& m : j.members) {
    std::uint64_t id;
    Status st = as_uint(m.second, where + "[" + quoted(m.first) + "]", kMaxId, &id);
    if (!st.ok()) return st;
    std::u32string tmp;
    if (!uni::utf8_to_utf32(m.first, &tmp)) return err(where, "a token is not valid UTF-8: " + quoted(m.first));
    v->to_id[m.first] = static_cast<std::int64_t>(id);
  }
  for (const auto& kv : v->to_id) v->to_token[kv.second] = kv.first;
  return Status();
}

struct TokModel {
  Vocab vocab;
  virtual ~TokModel() = default;
  // Tokens for one piece (given as UTF-8 and as code points).
  virtual Status tokenize(const std::string& utf8, const std::u32string& cps, std::vector<Tok>* out) const = 0;
};

struct WordPiece : TokModel {
  std::string unk = "[UNK]", prefix = "##";
  std::size_t max_chars = 100;
  Status tokenize(const std::string& w, const std::u32string& cps, std::vector<Tok>* out) const override {
    auto unk_token = [&]() -> Status {
      const std::int64_t id = vocab.get(unk);
      if (id < 0) return Status::error("WordPiece: the unk token " + quoted(unk) + " is not in the vocabulary");
      out->push_back({id, unk, 0, w.size()});
      return Status();
    };
    if (cps.size() > max_chars) return unk_token();
    std::vector<std::size_t> cb(cps.size() + 1, 0);  // byte offset of each char
    for (std::size_t i = 0; i < cps.size(); ++i) cb[i + 1] = cb[i] + utf8_len(cps[i]);
    const std::size_t first = out->size();
    std::size_t start = 0;
    std::string sub;
    while (start < cps.size()) {
      std::size_t end = cps.size();
      bool found = false;
      while (start < end) {
        sub.clear();
        if (start > 0) sub = prefix;
        sub.append(w, cb[start], cb[end] - cb[start]);
        const std::int64_t id = vocab.get(sub);
        if (id >= 0) {
          out->push_back({id, sub, cb[start], cb[end]});
          found = true;
          break;
        }
        --end;
      }
      if (!found) {
        out->resize(first);
        return unk_token();
      }
      start = end;
    }
    return Status();
  }
};

// BPE merges: (left id, right id) -> (rank, merged id) in an open-addressing table (ids are < 2^31).
class MergeMap {
 public:
  struct Entry {
    std::uint64_t key = kEmpty;
    std::int64_t rank = 0, new_id = 0;
  };
  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < 2 * n + 2) cap <<= 1;
    table_.assign(cap, Entry{});
    size_ = 0;
  }
  // Insert or overwrite (a later duplicate wins, as the library's hash map insert does).
  void set(std::int64_t a, std::int64_t b, std::int64_t rank, std::int64_t new_id) {
    if (2 * (size_ + 1) > table_.size()) grow();
    Entry* e = slot(key(a, b));
    if (e->key == kEmpty) ++size_;
    *e = {key(a, b), rank, new_id};
  }
  const Entry* find(std::int64_t a, std::int64_t b) const {
    if (table_.empty()) return nullptr;
    const Entry* e = slot(key(a, b));
    return e->key == kEmpty ? nullptr : e;
  }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  static std::uint64_t key(std::int64_t a, std::int64_t b) {
    return (static_cast<std::uint64_t>(a) << 32) | static_cast<std::uint64_t>(b);
  }
  static std::size_t hash(std::uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return static_cast<std::size_t>(k);
  }
  Entry* slot(std::uint64_t k) const {
    const std::size_t mask = table_.size() - 1;
    std::size_t i = hash(k) & mask;
    while (table_[i].key != kEmpty && table_[i].key != k) i = (i + 1) & mask;
    return const_cast<Entry*>(&table_[i]);
  }
  void grow() {
    std::vector<Entry> old = std::move(table_);
    reserve(std::max<std::size_t>(16, old.size()));
    for (const auto& e : old)
      if (e.key != kEmpty) {
        *slot(e.key) = e;
        ++size_;
      }
  }
  std::vector<Entry> table_;
  std::size_t size_ = 0;
};

struct BPE : TokModel {
  MergeMap merges;
  bool has_unk = false, has_prefix = false, has_suffix = false;
  std::string unk, prefix, suffix;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::int64_t byte_ids[256];

  struct Sym {
    std::int64_t id;
    std::ptrdiff_t prev, next;
    std::size_t len;
  };
  struct Merge {
    std::size_t pos;
    std::int64_t rank, new_id;
  };
  struct MergeCmp {  // the lowest rank first, then the leftmost position
    bool operator()(const Merge& a, const Merge& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };

  // Words shorter than 256 bytes are cached per thread (as the library caches them, up to 10,000 words): the cache
  // is thread_local and tagged with this model's serial number, so a shared BPE stays immutable and thread-safe.
  static constexpr std::size_t kCacheWordBytes = 256, kCacheWords = 10000;
  const std::uint64_t serial = next_serial();
  static std::uint64_t next_serial() {
    static std::atomic<std::uint64_t> n{0};
    return ++n;
  }
  struct Cache {
    std::uint64_t owner = 0;
    std::unordered_map<std::string, std::vector<std::pair<std::int64_t, std::size_t>>> words;  // (id, bytes)
  };

  void emit(const std::vector<std::pair<std::int64_t, std::size_t>>& word, std::vector<Tok>* out) const {
    std::size_t pos = 0;
    for (const auto& [id, len] : word) {
      auto it = vocab.to_token.find(id);
      out->push_back({id, it == vocab.to_token.end() ? std::string() : it->second, pos, pos + len});
      pos += len;
    }
  }

  Status tokenize(const std::string& w, const std::u32string& cps, std::vector<Tok>* out) const override {
    if (w.empty()) return Status();
    if (ignore_merges) {
      const std::int64_t id = vocab.get(w);
      if (id >= 0) {
        out->push_back({id, w, 0, w.size()});
        return Status();
      }
    }
    std::vector<std::pair<std::int64_t, std::size_t>> word;
    if (w.size() >= kCacheWordBytes) {
      Status st = merge_word(w, cps, &word);
      if (!st.ok()) return st;
      emit(word, out);
      return Status();
    }
    thread_local Cache cache;
    if (cache.owner != serial) {
      cache.words.clear();
      cache.owner = serial;
    }
    auto it = cache.words.find(w);
    if (it != cache.words.end()) {
      emit(it->second, out);
      return Status();
    }
    Status st = merge_word(w, cps, &word);
    if (!st.ok()) return st;
    emit(word, out);
    if (cache.words.size() < kCacheWords) cache.words.emplace(w, std::move(word));
    return Status();
  }

  // The symbols of w after all merges, as (id, byte length).
  Status merge_word(const std::string& w, const std::u32string& cps,
                    std::vector<std::pair<std::int64_t, std::size_t>>* word) const {
    std::vector<Sym> syms;
    syms.reserve(w.size());
    auto add = [&](std::int64_t id, std::size_t len) {
      const std::ptrdiff_t n = static_cast<std::ptrdiff_t>(syms.size());
      syms.push_back({id, n - 1, -1, len});
      if (n > 0) syms[n - 1].next = n;
    };
    bool have_unk = false;
    std::int64_t unk_id = -1;
    std::size_t unk_len = 0;
    std::string s;
    std::size_t bpos = 0;
    for (std::size_t i = 0; i < cps.size(); ++i) {
      const std::size_t byte_len = utf8_len(cps[i]);
      s.clear();
      if (i > 0 && has_prefix) s = prefix;
      s.append(w, bpos, byte_len);
      if (i + 1 == cps.size() && has_suffix) s += suffix;
      bpos += byte_len;
      const std::int64_t id = vocab.get(s);
      if (id >= 0) {
        if (have_unk) {
          add(unk_id, unk_len);
          have_unk = false;
        }
        add(id, byte_len);
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (unsigned char b : s) all = all && byte_ids[b] >= 0;
        if (all) {
          for (unsigned char b : s) add(byte_ids[b], 1);
          continue;
        }
      }
      if (has_unk) {
        const std::int64_t uid = vocab.get(unk);
        if (uid < 0) return Status::error("BPE: the unk token " + quoted(unk) + " is not in the vocabulary");
        if (have_unk && fuse_unk) {
          unk_len += byte_len;
        } else {
          if (have_unk) add(unk_id, unk_len);
          have_unk = true;
          unk_id = uid;
          unk_len = byte_len;
        }
      }
    }
    if (have_unk) add(unk_id, unk_len);

    std::priority_queue<Merge, std::vector<Merge>, MergeCmp> queue;
    for (std::size_t i = 0; i + 1 < syms.size(); ++i) {
      const auto* m = merges.find(syms[i].id, syms[i + 1].id);
      if (m) queue.push({i, m->rank, m->new_id});
    }
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      Sym& cur = syms[top.pos];
      if (cur.len == 0 || cur.next < 0) continue;
      const std::size_t next_pos = static_cast<std::size_t>(cur.next);
      const Sym right = syms[next_pos];
      const auto* m = merges.find(cur.id, right.id);
      if (!m || m->new_id != top.new_id) continue;
      cur.id = top.new_id;
      cur.len += right.len;
      cur.next = right.next;
      syms[next_pos].len = 0;
      if (right.next >= 0 && static_cast<std::size_t>(right.next) < syms.size())
        syms[static_cast<std::size_t>(right.next)].prev = static_cast<std::ptrdiff_t>(top.pos);
      if (cur.prev >= 0) {
        const auto* pm = merges.find(syms[static_cast<std::size_t>(cur.prev)].id, cur.id);
        if (pm) queue.push({static_cast<std::size_t>(cur.prev), pm->rank, pm->new_id});
      }
      if (cur.next >= 0 && static_cast<std::size_t>(cur.next) < syms.size()) {
        const auto* nm = merges.find(cur.id, syms[static_cast<std::size_t>(cur.next)].id);
        if (nm) queue.push({top.pos, nm->rank, nm->new_id});
      }
    }
    for (const auto& sy : syms)
      if (sy.len > 0) word->push_back({sy.id, sy.len});
    return Status();
  }
};

struct WordLevel : TokModel {
  std::string unk = "<unk>";
  Status tokenize(const std::string& w, const std::u32string&, std::vector<Tok>* out) const override {
    std::int64_t id = vocab.get(w);
    if (id >= 0) {
      out->push_back({id, w, 0, w.size()});
      return Status();
    }
    id = vocab.get(unk);
    if (id < 0) return Status::error("WordLevel: the unk token " + quoted(unk) + " is not in the vocabulary");
    out->push_back({id, unk, 0, w.size()});
    return Status();
  }
};

// Unigram: Viterbi over a byte trie of the pieces; a char no single piece covers is an unk edge of one char scored
// min(score) - 10; adjacent unks are fused; an unk string may become byte-fallback tokens.
struct Unigram : TokModel {
  std::vector<double> scores;  // per id
  std::int64_t unk_id = -1;
  bool byte_fallback = false;
  double min_score = 0;
  Trie_ trie;

  // Words shorter than 256 bytes are cached per thread, as for BPE (same library behaviour, no shared state).
  const std::uint64_t serial = BPE::next_serial();
  struct Cache {
    std::uint64_t owner = 0;
    std::unordered_map<std::string, std::vector<Tok>> words;
  };
  Status tokenize(const std::string& w, const std::u32string& cps, std::vector<Tok>* out) const override {
    if (w.size() >= 256) return viterbi(w, cps, out);
    thread_local Cache cache;
    if (cache.owner != serial) {
      cache.words.clear();
      cache.owner = serial;
    }
    auto it = cache.words.find(w);
    if (it != cache.words.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return Status();
    }
    const std::size_t first = out->size();
    Status st = viterbi(w, cps, out);
    if (st.ok() && cache.words.size() < 10000)
      cache.words.emplace(w, std::vector<Tok>(out->begin() + static_cast<std::ptrdiff_t>(first), out->end()));
    return st;
  }

  Status viterbi(const std::string& w, const std::u32string& cps, std::vector<Tok>* out) const {
    const std::size_t n = w.size();
    if (n == 0) return Status();
    struct Node {
      std::int64_t id = -1;
      double score = 0;
      std::ptrdiff_t start = -1;
    };
    std::vector<Node> best(n + 1);
    const double unk_score = min_score - 10.0;
    std::size_t pos = 0;
    for (std::size_t ci = 0; ci < cps.size(); ++ci) {
      const std::size_t mblen = utf8_len(cps[ci]);
      const double here = best[pos].score;
      bool single = false;
      std::uint32_t node = 0;
      for (std::size_t k = pos; k < n; ++k) {
        node = trie.child(node, static_cast<unsigned char>(w[k]));
        if (node == 0) break;
        const std::int64_t id = trie.value(node);
        if (id < 0) continue;
        const std::size_t end = k + 1;
        Node& t = best[end];
        const double cand = scores[static_cast<std::size_t>(id)] + here;
        if (t.start < 0 || cand > t.score) {
          t.score = cand;
          t.start = static_cast<std::ptrdiff_t>(pos);
          t.id = id;
        }
        if (end - pos == mblen) single = true;
      }
      if (!single) {
        if (unk_id < 0) return Status::error("Unigram: a character has no piece and the model has no unk_id");
        Node& t = best[pos + mblen];
        const double cand = unk_score + here;
        if (t.start < 0 || cand > t.score) {
          t.score = cand;
          t.start = static_cast<std::ptrdiff_t>(pos);
          t.id = unk_id;
        }
      }
      pos += mblen;
    }
    std::vector<std::pair<std::size_t, std::size_t>> pieces;  // byte ranges, back to front
    std::size_t end = n, unk_end = 0;
    bool in_unk = false;
    while (end > 0) {
      const Node& nd = best[end];
      const auto start = static_cast<std::size_t>(nd.start);
      if (nd.id == unk_id) {
        if (!in_unk) unk_end = end;
        in_unk = true;
      } else {
        if (in_unk) pieces.push_back({end, unk_end});
        in_unk = false;
        pieces.push_back({start, end});
      }
      end = start;
    }
    if (in_unk) pieces.push_back({0, unk_end});
    std::reverse(pieces.begin(), pieces.end());
    for (const auto& pc : pieces) {
      const std::string s = w.substr(pc.first, pc.second - pc.first);
      std::int64_t id = vocab.get(s);
      if (id < 0 && byte_fallback) {
        static const char hex[] = "0123456789ABCDEF";
        std::vector<std::int64_t> ids;
        for (unsigned char b : s) {
          const std::int64_t bid = vocab.get(std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">");
          if (bid < 0) break;
          ids.push_back(bid);
        }
        if (ids.size() == s.size()) {
          for (std::size_t k = 0; k < s.size(); ++k) {
            const unsigned char b = static_cast<unsigned char>(s[k]);
            out->push_back({ids[k], std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">", pc.first, pc.second});
          }
          continue;
        }
      }
      if (id < 0) {
        if (unk_id < 0) return Status::error("Unigram: an unknown piece and the model has no unk_id");
        id = unk_id;
      }
      out->push_back({id, s, pc.first, pc.second});
    }
    return Status();
  }
};

Status parse_model(const Json& j, std::unique_ptr<TokModel>* out) {
  const std::string where = "model";
  if (j.type != Json::kObject) return err(where, std::string("expected an object, got ") + type_name(j));
  std::string type;
  Status st;
  const Json* t = j.find("type");
  if (t) {
    if (!(st = as_string(*t, "model.type", &type)).ok()) return st;
  } else {
    return err(where, "missing field 'type'");
  }
  const Json* vocab;
  if (type == "WordPiece") {
    auto m = std::make_unique<WordPiece>();
    if (!(st = need(j, "vocab", where, &vocab)).ok()) return st;
    if (!(st = parse_vocab_object(*vocab, "model.vocab", &m->vocab)).ok()) return st;
    if (!(st = req_string(j, "unk_token", where, &m->unk)).ok()) return st;
    if (!(st = req_string(j, "continuing_subword_prefix", where, &m->prefix)).ok()) return st;
    const Json* mx;
    if (!(st = need(j, "max_input_chars_per_word", where, &mx)).ok()) return st;
    std::uint64_t v;
    if (!(st = as_uint(*mx, "model.max_input_chars_per_word", kMaxLen, &v)).ok()) return st;
    m->max_chars = static_cast<std::size_t>(v);
    *out = std::move(m);
  } else if (type == "BPE") {
    auto m = std::make_unique<BPE>();
    if (!(st = need(j, "vocab", where, &vocab)).ok()) return st;
    if (!(st = parse_vocab_object(*vocab, "model.vocab", &m->vocab)).ok()) return st;
    const Json* d = j.find("dropout");
    if (d && d->type != Json::kNull) {
      if (d->type != Json::kNumber) return err("model.dropout", "expected a number or null");
      if (d->number != 0.0) return err("model.dropout", "BPE dropout is not supported (it is random; use null)");
    }
    if (!(st = opt_string(j, "unk_token", where, &m->unk, &m->has_unk)).ok()) return st;
    if (!(st = opt_string(j, "continuing_subword_prefix", where, &m->prefix, &m->has_prefix)).ok()) return st;
    if (!(st = opt_string(j, "end_of_word_suffix", where, &m->suffix, &m->has_suffix)).ok()) return st;
    if (!(st = opt_bool(j, "fuse_unk", where, &m->fuse_unk)).ok()) return st;
    if (!(st = opt_bool(j, "byte_fallback", where, &m->byte_fallback)).ok()) return st;
    if (!(st = opt_bool(j, "ignore_merges", where, &m->ignore_merges)).ok()) return st;
    static const char hex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const std::string code = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
      m->byte_ids[b] = m->vocab.get(code);
    }
    const Json* merges;
    if (!(st = need(j, "merges", where, &merges)).ok()) return st;
    if (merges->type != Json::kArray) return err("model.merges", "expected an array");
    const std::size_t plen = m->has_prefix ? m->prefix.size() : 0;
    m->merges.reserve(merges->items.size());
    for (std::size_t r = 0; r < merges->items.size(); ++r) {
      const Json& item = merges->items[r];
      const std::string w = "model.merges[" + std::to_string(r) + "]";
      std::string a, b;
      if (item.type == Json::kString) {
        const std::size_t sp = item.str.find(' ');
        if (sp == std::string::npos) return err(w, "expected \"a b\" (two tokens separated by a space)");
        a = item.str.substr(0, sp);
        b = item.str.substr(sp + 1);
      } else if (item.type == Json::kArray && item.items.size() == 2 && item.items[0].type == Json::kString &&
                 item.items[1].type == Json::kString) {
        a = item.items[0].str;
        b = item.items[1].str;
      } else {
        return err(w, "expected a string \"a b\" or a pair [\"a\", \"b\"]");
      }
      const std::int64_t ia = m->vocab.get(a), ib = m->vocab.get(b);
      if (ia < 0) return err(w, "token " + quoted(a) + " is not in the vocabulary");
      if (ib < 0) return err(w, "token " + quoted(b) + " is not in the vocabulary");
      if (b.size() < plen) return err(w, "token " + quoted(b) + " is shorter than continuing_subword_prefix");
      const std::string merged = a + b.substr(plen);
      const std::int64_t in = m->vocab.get(merged);
      if (in < 0) return err(w, "merged token " + quoted(merged) + " is not in the vocabulary");
      m->merges.set(ia, ib, static_cast<std::int64_t>(r), in);
    }
    *out = std::move(m);
  } else if (type == "WordLevel") {
    auto m = std::make_unique<WordLevel>();
    if (!(st = need(j, "vocab", where, &vocab)).ok()) return st;
    if (!(st = parse_vocab_object(*vocab, "model.vocab", &m->vocab)).ok()) return st;
    if (!(st = req_string(j, "unk_token", where, &m->unk)).ok()) return st;
    *out = std::move(m);
  } else if (type == "Unigram") {
    auto m = std::make_unique<Unigram>();
    if (!(st = need(j, "vocab", where, &vocab)).ok()) return st;
    if (vocab->type != Json::kArray) return err("model.vocab", "expected an array of [piece, score]");
    if (vocab->items.empty()) return err("model.vocab", "the vocabulary is empty");
    if (vocab->items.size() > kMaxId) return err("model.vocab", "too many pieces");
    m->scores.reserve(vocab->items.size());
    for (std::size_t i = 0; i < vocab->items.size(); ++i) {
      const Json& it = vocab->items[i];
      const std::string w = "model.vocab[" + std::to_string(i) + "]";
      if (it.type != Json::kArray || it.items.size() != 2 || it.items[1].type != Json::kNumber)
        return err(w, "expected [piece, score]");
      std::string piece;
      if (!(st = as_string(it.items[0], w + "[0]", &piece)).ok()) return st;
      const auto id = static_cast<std::int64_t>(i);
      m->vocab.to_id[piece] = id;  // a duplicate piece: the last id wins, as in the library
      m->vocab.to_token[id] = piece;
      m->scores.push_back(it.items[1].number);
      m->min_score = i == 0 ? it.items[1].number : std::min(m->min_score, it.items[1].number);
      if (!piece.empty()) m->trie.insert(piece, -1);
    }
    for (const auto& kv : m->vocab.to_id)
      if (!kv.first.empty()) m->trie.insert(kv.first, kv.second);
    const Json* u = j.find("unk_id");
    if (u && u->type != Json::kNull) {
      std::uint64_t uid;
      if (!(st = as_uint(*u, "model.unk_id", kMaxId, &uid)).ok()) return st;
      if (uid >= vocab->items.size()) return err("model.unk_id", "is not an id of the vocabulary");
      m->unk_id = static_cast<std::int64_t>(uid);
    }
    if (!(st = opt_bool(j, "byte_fallback", where, &m->byte_fallback)).ok()) return st;
    *out = std::move(m);
  } else {
    return err("model.type", "model type " + quoted(type) + " is not supported yet");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------
// Encodings under construction and post-processors

struct Enc {  // Encoding plus what post-processing needs
  Encoding e;
  void push(std::int64_t id, std::string tok, std::int64_t type, std::int64_t special, std::int64_t word,
            std::int64_t seq, Range off, Range coff) {
    e.ids.push_back(id);
    e.tokens.push_back(std::move(tok));
    e.type_ids.push_back(type);
    e.attention_mask.push_back(1);
    e.special_tokens_mask.push_back(special);
    e.word_ids.push_back(word);
    e.sequence_ids.push_back(seq);
    e.offsets.push_back(off);
    e.char_offsets.push_back(coff);
  }
  void append(const Encoding& o) {
    auto cat = [](auto& a, const auto& b) { a.insert(a.end(), b.begin(), b.end()); };
    cat(e.ids, o.ids);
    cat(e.tokens, o.tokens);
    cat(e.type_ids, o.type_ids);
    cat(e.attention_mask, o.attention_mask);
    cat(e.special_tokens_mask, o.special_tokens_mask);
    cat(e.word_ids, o.word_ids);
    cat(e.sequence_ids, o.sequence_ids);
    cat(e.offsets, o.offsets);
    cat(e.char_offsets, o.char_offsets);
  }
  void truncate(std::size_t n, Direction d) {
    if (e.size() <= n) return;
    auto cut = [&](auto& v) {
      if (d == Direction::Right) v.resize(n);
      else v.erase(v.begin(), v.end() - static_cast<std::ptrdiff_t>(n));
    };
    cut(e.ids);
    cut(e.tokens);
    cut(e.type_ids);
    cut(e.attention_mask);
    cut(e.special_tokens_mask);
    cut(e.word_ids);
    cut(e.sequence_ids);
    cut(e.offsets);
    cut(e.char_offsets);
  }
};

struct PostProcessor {
  virtual ~PostProcessor() = default;
  virtual std::size_t added_tokens(bool pair) const = 0;
  virtual void process(std::vector<Encoding>* encs, bool add_special_tokens) const = 0;
};

// ByteLevel offset trimming (the post-processor and RobertaProcessing): offsets shrink past leading/trailing
// 'Ġ' or whitespace chars of the token.
void trim_offsets(Encoding* e, bool add_prefix_space) {
  const char32_t g = byte_map().to_char[static_cast<unsigned char>(' ')];
  std::u32string u;
  for (std::size_t i = 0; i < e->size(); ++i) {
    u.clear();
    uni::utf8_to_utf32(e->tokens[i], &u);
    std::size_t lead = 0, trail = 0;
    while (lead < u.size() && (u[lead] == g || is_ws(u[lead]))) ++lead;
    while (trail < u.size() && (u[u.size() - 1 - trail] == g || is_ws(u[u.size() - 1 - trail]))) ++trail;
    if (lead == 0 && trail == 0) continue;
    for (Range* off : {&e->offsets[i], &e->char_offsets[i]}) {
      std::size_t l = lead;
      if (l > 0) {
        const bool is_first = i == 0 || off->first == 0;
        if (is_first && add_prefix_space && l == 1) l = 0;
        off->first = std::min(off->first + l, off->second);
      }
      if (trail > 0 && off->second >= trail) off->second = std::max(off->second - trail, off->first);
    }
  }
}

struct SpecialTok {
  std::vector<std::int64_t> ids;
  std::vector<std::string> tokens;
};

struct TemplatePiece {
  bool is_seq;
  int seq;               // 0 = A, 1 = B
  std::string special;   // name in special_tokens
  std::int64_t type_id;
};

struct TemplatePost : PostProcessor {
  std::vector<TemplatePiece> single, pair;
  std::unordered_map<std::string, SpecialTok> specials;
  std::size_t count(const std::vector<TemplatePiece>& t) const {
    std::size_t n = 0;
    for (const auto& p : t)
      if (!p.is_seq) n += specials.at(p.special).ids.size();
    return n;
  }
  std::size_t added_tokens(bool is_pair) const override { return count(is_pair ? pair : single); }
  void process(std::vector<Encoding>* encs, bool add) const override {
    const auto& t = encs->size() > 1 ? pair : single;
    Enc out;
    for (const auto& p : t) {
      if (p.is_seq) {
        const std::size_t i = static_cast<std::size_t>(p.seq);
        if (i >= encs->size()) continue;
        Encoding e = (*encs)[i];
        std::fill(e.type_ids.begin(), e.type_ids.end(), p.type_id);
        std::fill(e.sequence_ids.begin(), e.sequence_ids.end(), static_cast<std::int64_t>(i));
        out.append(e);
      } else if (add) {
        const SpecialTok& s = specials.at(p.special);
        for (std::size_t k = 0; k < s.ids.size(); ++k)
          out.push(s.ids[k], s.tokens[k], p.type_id, 1, -1, -1, {0, 0}, {0, 0});
      }
    }
    encs->clear();
    encs->push_back(std::move(out.e));
  }
};

struct BertPost : PostProcessor {
  std::string cls, sep;
  std::int64_t cls_id = 0, sep_id = 0;
  std::size_t added_tokens(bool is_pair) const override { return is_pair ? 3 : 2; }
  void process(std::vector<Encoding>* encs, bool add) const override {
    if (!add) return;
    Enc out;
    out.push(cls_id, cls, 0, 1, -1, -1, {0, 0}, {0, 0});
    out.append((*encs)[0]);
    out.push(sep_id, sep, 0, 1, -1, -1, {0, 0}, {0, 0});
    if (encs->size() > 1) {
      Encoding b = (*encs)[1];
      std::fill(b.type_ids.begin(), b.type_ids.end(), 1);
      out.append(b);
      out.push(sep_id, sep, 1, 1, -1, -1, {0, 0}, {0, 0});
    }
    encs->clear();
    encs->push_back(std::move(out.e));
  }
};

struct RobertaPost : PostProcessor {
  std::string cls, sep;
  std::int64_t cls_id = 0, sep_id = 2;
  bool trim = true, add_prefix_space = true;
  std::size_t added_tokens(bool is_pair) const override { return is_pair ? 4 : 2; }
  void process(std::vector<Encoding>* encs, bool add) const override {
    for (auto& e : *encs) {
      if (trim) trim_offsets(&e, add_prefix_space);
      std::fill(e.type_ids.begin(), e.type_ids.end(), 0);
    }
    if (!add) return;
    Enc out;
    out.push(cls_id, cls, 0, 1, -1, -1, {0, 0}, {0, 0});
    out.append((*encs)[0]);
    out.push(sep_id, sep, 0, 1, -1, -1, {0, 0}, {0, 0});
    if (encs->size() > 1) {
      out.push(sep_id, sep, 0, 1, -1, -1, {0, 0}, {0, 0});
      out.append((*encs)[1]);
      out.push(sep_id, sep, 0, 1, -1, -1, {0, 0}, {0, 0});
    }
    encs->clear();
    encs->push_back(std::move(out.e));
  }
};

struct ByteLevelPost : PostProcessor {
  bool trim = true, add_prefix_space = true;
  std::size_t added_tokens(bool) const override { return 0; }
  void process(std::vector<Encoding>* encs, bool) const override {
    if (trim)
      for (auto& e : *encs) trim_offsets(&e, add_prefix_space);
  }
};

struct SequencePost : PostProcessor {
  std::vector<std::unique_ptr<PostProcessor>> items;
  std::size_t added_tokens(bool is_pair) const override {
    std::size_t n = 0;
    for (const auto& p : items) n += p->added_tokens(is_pair);
    return n;
  }
  void process(std::vector<Encoding>* encs, bool add) const override {
    for (const auto& p : items) p->process(encs, add);
  }
};

Status parse_token_id_pair(const Json& j, const char* key, const std::string& where, std::string* tok,
                           std::int64_t* id) {
  const Json* v;
  Status st = need(j, key, where, &v);
  if (!st.ok()) return st;
  const std::string w = where + "." + key;
  if (v->type != Json::kArray || v->items.size() != 2) return err(w, "expected [token, id]");
  if (!(st = as_string(v->items[0], w + "[0]", tok)).ok()) return st;
  std::uint64_t u;
  if (!(st = as_uint(v->items[1], w + "[1]", kMaxId, &u)).ok()) return st;
  *id = static_cast<std::int64_t>(u);
  return Status();
}

Status parse_template(const Json& j, const char* key, const std::string& where, std::vector<TemplatePiece>* out) {
  const Json* v;
  Status st = need(j, key, where, &v);
  if (!st.ok()) return st;
  const std::string w = where + "." + key;
  if (v->type != Json::kArray) return err(w, "expected an array of {\"Sequence\": ...} / {\"SpecialToken\": ...}");
  for (std::size_t i = 0; i < v->items.size(); ++i) {
    const Json& it = v->items[i];
    const std::string wi = w + "[" + std::to_string(i) + "]";
    if (it.type != Json::kObject || it.members.size() != 1)
      return err(wi, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
    const std::string& kind = it.members[0].first;
    const Json& body = it.members[0].second;
    if (body.type != Json::kObject) return err(wi + "." + kind, "expected an object");
    TemplatePiece p;
    std::string id;
    if (!(st = req_string(body, "id", wi + "." + kind, &id)).ok()) return st;
    const Json* tv;
    if (!(st = need(body, "type_id", wi + "." + kind, &tv)).ok()) return st;
    std::uint64_t type_id;
    if (!(st = as_uint(*tv, wi + "." + kind + ".type_id", kMaxId, &type_id)).ok()) return st;
    p.type_id = static_cast<std::int64_t>(type_id);
    if (kind == "Sequence") {
      p.is_seq = true;
      if (id == "A") p.seq = 0;
      else if (id == "B") p.seq = 1;
      else return err(wi + ".Sequence.id", "expected \"A\" or \"B\"");
    } else if (kind == "SpecialToken") {
      p.is_seq = false;
      p.seq = -1;
      p.special = id;
    } else {
      return err(wi, "unknown template piece " + quoted(kind));
    }
    out->push_back(std::move(p));
  }
  return Status();
}

Status parse_post(const Json& j, const std::string& where, int depth, std::unique_ptr<PostProcessor>* out) {
  if (depth > 16) return err(where, "Sequence nested too deeply");
  if (j.type != Json::kObject) return err(where, std::string("expected an object, got ") + type_name(j));
  std::string type;
  Status st = req_string(j, "type", where, &type);
  if (!st.ok()) return st;
  if (type == "TemplateProcessing") {
    auto p = std::make_unique<TemplatePost>();
    if (!(st = parse_template(j, "single", where, &p->single)).ok()) return st;
    if (!(st = parse_template(j, "pair", where, &p->pair)).ok()) return st;
    const Json* sp;
    if (!(st = need(j, "special_tokens", where, &sp)).ok()) return st;
    if (sp->type != Json::kObject) return err(where + ".special_tokens", "expected an object");
    for (const auto& m : sp->members) {
      const std::string w = where + ".special_tokens[" + quoted(m.first) + "]";
      if (m.second.type != Json::kObject) return err(w, "expected an object");
      const Json *ids, *toks;
      if (!(st = need(m.second, "ids", w, &ids)).ok()) return st;
      if (!(st = need(m.second, "tokens", w, &toks)).ok()) return st;
      if (ids->type != Json::kArray || toks->type != Json::kArray || ids->items.size() != toks->items.size())
        return err(w, "'ids' and 'tokens' must be arrays of the same length");
      SpecialTok s;
      for (std::size_t k = 0; k < ids->items.size(); ++k) {
        std::uint64_t u;
        std::string t;
        if (!(st = as_uint(ids->items[k], w + ".ids[" + std::to_string(k) + "]", kMaxId, &u)).ok()) return st;
        if (!(st = as_string(toks->items[k], w + ".tokens[" + std::to_string(k) + "]", &t)).ok()) return st;
        s.ids.push_back(static_cast<std::int64_t>(u));
        s.tokens.push_back(t);
      }
      p->specials[m.first] = std::move(s);
    }
    for (const auto* t : {&p->single, &p->pair})
      for (const auto& piece : *t)
        if (!piece.is_seq && !p->specials.count(piece.special))
          return err(where, "the template uses special token " + quoted(piece.special) +
                                " that special_tokens does not define");
    *out = std::move(p);
  } else if (type == "BertProcessing") {
    auto p = std::make_unique<BertPost>();
    if (!(st = parse_token_id_pair(j, "sep", where, &p->sep, &p->sep_id)).ok()) return st;
    if (!(st = parse_token_id_pair(j, "cls", where, &p->cls, &p->cls_id)).ok()) return st;
    *out = std::move(p);
  } else if (type == "RobertaProcessing") {
    auto p = std::make_unique<RobertaPost>();
    if (!(st = parse_token_id_pair(j, "sep", where, &p->sep, &p->sep_id)).ok()) return st;
    if (!(st = parse_token_id_pair(j, "cls", where, &p->cls, &p->cls_id)).ok()) return st;
    if (!(st = opt_bool(j, "trim_offsets", where, &p->trim)).ok()) return st;
    if (!(st = opt_bool(j, "add_prefix_space", where, &p->add_prefix_space)).ok()) return st;
    *out = std::move(p);
  } else if (type == "ByteLevel") {
    auto p = std::make_unique<ByteLevelPost>();
    if (!(st = parse_bytelevel_common(j, where, &p->add_prefix_space, &p->trim, nullptr)).ok()) return st;
    *out = std::move(p);
  } else if (type == "Sequence") {
    auto p = std::make_unique<SequencePost>();
    if (!(st = parse_parts(j, "processors", where, depth, parse_post, &p->items)).ok()) return st;
    *out = std::move(p);
  } else {
    return err(where, "post-processor type " + quoted(type) + " is not supported yet");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------
// Decoders

struct Decoder {
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>* tokens) const = 0;
};

void replace_all(std::string* s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  std::size_t i = 0;
  while (true) {
    const std::size_t f = s->find(from, i);
    if (f == std::string::npos) break;
    out.append(*s, i, f - i);
    out += to;
    i = f + from.size();
  }
  if (i == 0) return;
  out.append(*s, i, std::string::npos);
  *s = std::move(out);
}

struct WordPieceDec : Decoder {
  std::string prefix = "##";
  bool cleanup = true;
  void decode_chain(std::vector<std::string>* tokens) const override {
    for (std::size_t i = 0; i < tokens->size(); ++i) {
      std::string& t = (*tokens)[i];
      if (i != 0) {
        if (t.compare(0, prefix.size(), prefix) == 0) t.erase(0, prefix.size());
        else t.insert(0, " ");
      }
      if (cleanup) {
        static const char* const kPairs[][2] = {{" .", "."},       {" ?", "?"},     {" !", "!"},
                                                {" ,", ","},       {" ' ", "'"},    {" n't", "n't"},
                                                {" 'm", "'m"},     {" do not", " don't"},
                                                {" 's", "'s"},     {" 've", "'ve"}, {" 're", "'re"}};
        for (const auto& p : kPairs) replace_all(&t, p[0], p[1]);
      }
    }
  }
};

// String::from_utf8_lossy: one U+FFFD per maximal invalid subsequence.
std::string utf8_lossy(const std::string& b) {
  std::string out;
  out.reserve(b.size());
  const std::size_t n = b.size();
  std::size_t i = 0;
  auto u = [&](std::size_t k) { return static_cast<unsigned char>(b[k]); };
  while (i < n) {
    const unsigned char c = u(i);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
      ++i;
      continue;
    }
    std::size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) need = 2, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC) need = 2;
    else if (c == 0xED) need = 2, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF) need = 2;
    else if (c == 0xF0) need = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) need = 3, hi = 0x8F;
    std::size_t k = 1;
    bool ok = need > 0;
    while (ok && k <= need) {
      if (i + k >= n) {
        ok = false;
        break;
      }
      const unsigned char d = u(i + k);
      const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (d < l || d > h) {
        ok = false;
        break;
      }
      ++k;
    }
    if (ok) {
      out.append(b, i, need + 1);
      i += need + 1;
    } else {
      out += "\xEF\xBF\xBD";
      i += k;  // the valid prefix (at least the lead byte) is one maximal invalid subsequence
    }
  }
  return out;
}

struct ByteLevelDec : Decoder {
  void decode_chain(std::vector<std::string>* tokens) const override {
    const ByteMap& bm = byte_map();
    std::string bytes;
    std::u32string u;
    for (const auto& t : *tokens) {
      u.clear();
      uni::utf8_to_utf32(t, &u);
      bool all = true;
      for (char32_t c : u) all = all && bm.to_byte.count(c);
      if (all) {
        for (char32_t c : u) bytes.push_back(static_cast<char>(bm.to_byte.at(c)));
      } else {
        bytes += t;
      }
    }
    tokens->assign(1, utf8_lossy(bytes));
  }
};

struct MetaspaceDec : Decoder {
  char32_t replacement = 0x2581;
  PrependScheme scheme = PrependScheme::Always;
  void decode_chain(std::vector<std::string>* tokens) const override {
    std::u32string u;
    for (std::size_t i = 0; i < tokens->size(); ++i) {
      u.clear();
      uni::utf8_to_utf32((*tokens)[i], &u);
      std::string t;
      for (char32_t c : u) {
        if (c == replacement) {
          if (i == 0 && scheme != PrependScheme::Never) continue;  // every one in the first token (as the library)
          t.push_back(' ');
        } else {
          uni::append_utf8(c, &t);
        }
      }
      (*tokens)[i] = std::move(t);
    }
  }
};

struct ByteFallbackDec : Decoder {
  void decode_chain(std::vector<std::string>* tokens) const override {
    auto hexval = [](char c) {
      return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    };
    std::vector<std::string> out;
    std::string bytes;
    std::u32string tmp;
    auto flush = [&]() {
      if (bytes.empty()) return;
      tmp.clear();
      if (uni::utf8_to_utf32(bytes, &tmp)) out.push_back(bytes);
      else out.insert(out.end(), bytes.size(), "\xEF\xBF\xBD");  // one U+FFFD per byte
      bytes.clear();
    };
    for (auto& t : *tokens) {
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && hexval(t[3]) >= 0 && hexval(t[4]) >= 0) {
        bytes.push_back(static_cast<char>(hexval(t[3]) * 16 + hexval(t[4])));
        continue;
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    *tokens = std::move(out);
  }
};

struct FuseDec : Decoder {
  void decode_chain(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const auto& t : *tokens) all += t;
    tokens->assign(1, std::move(all));
  }
};

struct StripDec : Decoder {
  char32_t content = ' ';
  std::size_t start = 0, stop = 0;
  void decode_chain(std::vector<std::string>* tokens) const override {
    std::u32string u;
    for (auto& t : *tokens) {
      u.clear();
      uni::utf8_to_utf32(t, &u);
      std::size_t b = 0, e = u.size();
      while (b < start && b < u.size() && u[b] == content) ++b;
      for (std::size_t i = 0; i < stop && i < u.size(); ++i) {
        if (u[u.size() - 1 - i] != content) break;
        e = u.size() - 1 - i;
      }
      t = b < e ? to_utf8(u.data() + b, e - b) : std::string();
    }
  }
};

struct ReplaceDec : Decoder {
  Pattern pattern;
  std::u32string content;
  void decode_chain(std::vector<std::string>* tokens) const override {
    std::u32string u;
    for (auto& t : *tokens) {
      u.clear();
      uni::utf8_to_utf32(t, &u);
      const auto spans = pattern.find(u);
      if (spans.empty()) continue;
      std::u32string r;
      std::size_t last = 0;
      for (const auto& sp : spans) {
        r.append(u, last, sp.first - last);
        r += content;
        last = sp.second;
      }
      r.append(u, last, std::u32string::npos);
      t = to_utf8(r);
    }
  }
};

struct BPEDec : Decoder {
  std::string suffix = "</w>";
  void decode_chain(std::vector<std::string>* tokens) const override {
    for (std::size_t i = 0; i < tokens->size(); ++i)
      replace_all(&(*tokens)[i], suffix, i + 1 == tokens->size() ? "" : " ");
  }
};

void wordpiece_cleanup(std::string* t) {
  static const char* const kPairs[][2] = {{" .", "."},   {" ?", "?"},     {" !", "!"},   {" ,", ","},
                                          {" ' ", "'"},  {" n't", "n't"}, {" 'm", "'m"}, {" do not", " don't"},
                                          {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& p : kPairs) replace_all(t, p[0], p[1]);
}

struct CTCDec : Decoder {
  std::string pad = "<pad>", delimiter = "|";
  bool cleanup = true;
  void decode_chain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    for (std::size_t i = 0; i < tokens->size(); ++i) {
      if (i > 0 && (*tokens)[i] == (*tokens)[i - 1]) continue;  // consecutive duplicates
      std::string t = (*tokens)[i];
      replace_all(&t, pad, "");
      if (cleanup) {
        wordpiece_cleanup(&t);
        replace_all(&t, delimiter, " ");
      }
      if (!t.empty()) out.push_back(std::move(t));
    }
    *tokens = std::move(out);
  }
};

struct SequenceDec : Decoder {
  std::vector<std::unique_ptr<Decoder>> items;
  void decode_chain(std::vector<std::string>* tokens) const override {
    for (const auto& d : items) d->decode_chain(tokens);
  }
};

Status parse_decoder(const Json& j, const std::string& where, int depth, std::unique_ptr<Decoder>* out) {
  if (depth > 16) return err(where, "Sequence nested too deeply");
  if (j.type != Json::kObject) return err(where, std::string("expected an object, got ") + type_name(j));
  std::string type;
  Status st = req_string(j, "type", where, &type);
  if (!st.ok()) return st;
  if (type == "WordPiece") {
    auto d = std::make_unique<WordPieceDec>();
    if (!(st = req_string(j, "prefix", where, &d->prefix)).ok()) return st;
    if (!(st = req_bool(j, "cleanup", where, &d->cleanup)).ok()) return st;
    *out = std::move(d);
  } else if (type == "ByteLevel") {
    *out = std::make_unique<ByteLevelDec>();
  } else if (type == "Metaspace") {
    auto d = std::make_unique<MetaspaceDec>();
    std::string rep;
    if (!(st = req_string(j, "replacement", where, &rep)).ok()) return st;
    std::u32string u;
    uni::utf8_to_utf32(rep, &u);
    if (u.size() != 1) return err(where + ".replacement", "expected exactly one character");
    d->replacement = u[0];
    if (!(st = parse_prepend_scheme(j, where, &d->scheme)).ok()) return st;
    *out = std::move(d);
  } else if (type == "CTC") {
    auto d = std::make_unique<CTCDec>();
    if (!(st = req_string(j, "pad_token", where, &d->pad)).ok()) return st;
    if (!(st = req_string(j, "word_delimiter_token", where, &d->delimiter)).ok()) return st;
    if (!(st = req_bool(j, "cleanup", where, &d->cleanup)).ok()) return st;
    *out = std::move(d);
  } else if (type == "ByteFallback") {
    *out = std::make_unique<ByteFallbackDec>();
  } else if (type == "Fuse") {
    *out = std::make_unique<FuseDec>();
  } else if (type == "Strip") {
    auto d = std::make_unique<StripDec>();
    std::string c;
    if (!(st = req_string(j, "content", where, &c)).ok()) return st;
    std::u32string u;
    uni::utf8_to_utf32(c, &u);
    if (u.size() != 1) return err(where + ".content", "expected exactly one character");
    d->content = u[0];
    const Json* v;
    std::uint64_t n;
    if (!(st = need(j, "start", where, &v)).ok() || !(st = as_uint(*v, where + ".start", kMaxLen, &n)).ok()) return st;
    d->start = static_cast<std::size_t>(n);
    if (!(st = need(j, "stop", where, &v)).ok() || !(st = as_uint(*v, where + ".stop", kMaxLen, &n)).ok()) return st;
    d->stop = static_cast<std::size_t>(n);
    *out = std::move(d);
  } else if (type == "Replace") {
    auto d = std::make_unique<ReplaceDec>();
    if (!(st = parse_pattern(j, where, &d->pattern)).ok()) return st;
    std::string content;
    if (!(st = req_string(j, "content", where, &content)).ok()) return st;
    uni::utf8_to_utf32(content, &d->content);
    if (!d->pattern.is_regex && d->pattern.literal.empty()) return err(where + ".pattern", "empty pattern");
    *out = std::move(d);
  } else if (type == "BPEDecoder") {
    auto d = std::make_unique<BPEDec>();
    if (!(st = req_string(j, "suffix", where, &d->suffix)).ok()) return st;
    *out = std::move(d);
  } else if (type == "Sequence") {
    auto d = std::make_unique<SequenceDec>();
    if (!(st = parse_parts(j, "decoders", where, depth, parse_decoder, &d->items)).ok()) return st;
    *out = std::move(d);
  } else {
    return err(where, "decoder type " + quoted(type) + " is not supported yet");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------
// Added tokens: a trie over code points, matched leftmost-longest

struct AddedToken {
  std::string content;
  std::string shown;  // what id_to_token and decode give: the normalized form for normalized tokens (tokenizers 0.23)
  std::int64_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

struct Trie {
  std::vector<std::int64_t> terminal{-1};  // added-token index per node, -1 if none
  std::unordered_map<std::uint64_t, std::uint32_t> edges;
  bool empty() const { return terminal.size() == 1; }
  void insert(const std::u32string& s, std::int64_t value) {
    std::uint32_t node = 0;
    for (char32_t c : s) {
      const std::uint64_t key = (std::uint64_t{node} << 21) | c;
      auto it = edges.find(key);
      if (it == edges.end()) {
        const auto next = static_cast<std::uint32_t>(terminal.size());
        terminal.push_back(-1);
        edges.emplace(key, next);
        node = next;
      } else {
        node = it->second;
      }
    }
    terminal[node] = value;  // a duplicate pattern: the last one wins, as in the library
  }
  // Longest match starting at i: (length, value) or (0, -1).
  std::pair<std::size_t, std::int64_t> longest(const std::u32string& s, std::size_t i) const {
    std::uint32_t node = 0;
    std::pair<std::size_t, std::int64_t> best{0, -1};
    for (std::size_t k = i; k < s.size(); ++k) {
      auto it = edges.find((std::uint64_t{node} << 21) | s[k]);
      if (it == edges.end()) break;
      node = it->second;
      if (terminal[node] >= 0) best = {k + 1 - i, terminal[node]};
    }
    return best;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre;
  std::unique_ptr<TokModel> model;
  std::unique_ptr<PostProcessor> post;
  std::unique_ptr<Decoder> decoder;
  std::vector<AddedToken> added;                        // in file order (ids assigned as the library does)
  std::unordered_map<std::string, std::int64_t> added_to_id;
  std::unordered_map<std::int64_t, std::size_t> added_by_id;  // id -> index in added
  std::unordered_set<std::string> special_set;
  Trie raw_trie, norm_trie;
  std::optional<TruncationParams> truncation;
  std::optional<PaddingParams> padding;

  // One piece of a sequence: text not yet tokenized, or an added token.
  struct Split {
    Piece p;
    std::int64_t token = -1;  // index into added, or -1
  };

  // The library's AddedVocabulary::find_matches + split: splits p by the trie's matches.
  void split_added(Piece&& p, const Trie& trie, std::vector<Split>* out) const {
    const std::u32string& s = p.s;
    if (trie.empty() || s.empty()) {
      if (!s.empty()) out->push_back({std::move(p), -1});
      return;
    }
    std::size_t start_offset = 0, i = 0;
    auto emit = [&](std::size_t b, std::size_t e, std::int64_t tok) {
      if (b < e) out->push_back({slice(p, b, e), tok});
    };
    while (i < s.size()) {
      const auto m = trie.longest(s, i);
      if (m.first == 0) {
        ++i;
        continue;
      }
      std::size_t start = i, stop = i + m.first;
      i = stop;
      const AddedToken& t = added[static_cast<std::size_t>(m.second)];
      if (t.single_word) {
        const bool start_space = start == 0 || !is_word_char(s[start - 1]);
        const bool stop_space = stop == s.size() || !is_word_char(s[stop]);
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {
        std::size_t ns = start;
        while (ns > 0 && is_ws(s[ns - 1])) --ns;
        start = std::max(ns, start_offset);
      }
      if (t.rstrip)
        while (stop < s.size() && is_ws(s[stop])) ++stop;
      if (start_offset < start) emit(start_offset, start, -1);
      emit(start, stop, m.second);
      start_offset = stop;
    }
    if (start_offset != s.size()) emit(start_offset, s.size(), -1);
  }

  Status encode_one(const std::string& text, std::int64_t type_id, std::int64_t seq_id, Encoding* out) const {
    std::u32string cps;
    std::vector<std::size_t> boff;
    if (!uni::utf8_to_utf32(text, &cps, &boff)) return Status::error("encode: the text is not valid UTF-8");
    Piece root;
    root.s = std::move(cps);
    root.al.resize(root.s.size());
    for (std::size_t i = 0; i < root.s.size(); ++i) root.al[i] = {boff[i], boff[i + 1]};
    std::vector<Split> pass1, splits;
    split_added(std::move(root), raw_trie, &pass1);
    for (auto& sp : pass1) {
      if (sp.token >= 0) {
        splits.push_back(std::move(sp));
        continue;
      }
      if (normalizer) normalizer->normalize(&sp.p);
      split_added(std::move(sp.p), norm_trie, &splits);
    }
    Enc enc;
    std::vector<Piece> words;
    std::vector<Tok> toks;
    std::int64_t word = 0;
    auto char_of = [&](std::size_t b) -> std::size_t {
      return static_cast<std::size_t>(std::lower_bound(boff.begin(), boff.end(), b) - boff.begin());
    };
    auto char_range = [&](Range r) -> Range {
      if (r.first == 0 && r.second == 0) return {0, 0};
      const std::size_t n = boff.size() - 1;
      std::size_t cs = r.first >= text.size() ? n : char_of(r.first);
      if (cs < boff.size() && boff[cs] != r.first && cs > 0) --cs;  // inside a char: that char
      std::size_t ce = 0;
      if (r.second > 0) {
        std::size_t k = char_of(r.second - 1);
        if (k < boff.size() && boff[k] != r.second - 1 && k > 0) --k;
        ce = k + 1;
      }
      return {cs, ce};
    };
    std::string utf8;
    for (auto& sp : splits) {
      if (sp.p.s.empty()) continue;
      if (sp.token >= 0) {
        const AddedToken& t = added[static_cast<std::size_t>(sp.token)];
        Range r{sp.p.al[0].first, sp.p.al[0].second};
        for (const auto& a : sp.p.al) r = {std::min(r.first, a.first), std::max(r.second, a.second)};
        enc.push(t.id, to_utf8(sp.p.s), type_id, 0, word, seq_id, r, char_range(r));
        ++word;
        continue;
      }
      words.clear();
      if (pre) pre->split(std::move(sp.p), &words);
      else words.push_back(std::move(sp.p));
      for (const auto& w : words) {
        if (w.s.empty()) continue;
        utf8 = to_utf8(w.s);
        toks.clear();
        Status st = model->tokenize(utf8, w.s, &toks);
        if (!st.ok()) return st;
        if (!toks.empty()) {
          std::vector<std::size_t> cb(w.s.size() + 1, 0);
          for (std::size_t i = 0; i < w.s.size(); ++i) cb[i + 1] = cb[i] + utf8_len(w.s[i]);
          auto char_at = [&](std::size_t b) {  // the char containing byte b of the piece
            return static_cast<std::size_t>(std::upper_bound(cb.begin(), cb.end(), b) - cb.begin()) - 1;
          };
          // The original range of chars [c0, c1] is the min start and max end of their ranges: with ranges in
          // order (the usual case) that is al[c0].first and al[c1].second, without a scan per token (a token may
          // span a long piece: Unigram's byte-fallback tokens each cover the whole fused unknown span).
          bool ordered = true;
          for (std::size_t i = 1; i < w.al.size() && ordered; ++i)
            ordered = w.al[i - 1].first <= w.al[i].first && w.al[i - 1].second <= w.al[i].second;
          for (auto& t : toks) {
            Range r;
            if (t.b >= t.e) {
              r = {w.shift + t.b, w.shift + t.e};
            } else {
              const std::size_t c0 = char_at(t.b), c1 = char_at(t.e - 1);
              if (ordered) {
                r = {w.al[c0].first, w.al[c1].second};
              } else {
                r = w.al[c0];
                for (std::size_t c = c0; c <= c1 && c < w.al.size(); ++c)
                  r = {std::min(r.first, w.al[c].first), std::max(r.second, w.al[c].second)};
              }
            }
            enc.push(t.id, std::move(t.value), type_id, 0, word, seq_id, r, char_range(r));
          }
        }
        ++word;
      }
    }
    *out = std::move(enc.e);
    return Status();
  }

  Status truncate(Encoding* a, Encoding* b, const TruncationParams& tp, std::size_t max_length) const {
    Enc ea{std::move(*a)}, eb;
    if (b) eb.e = std::move(*b);
    Status st;
    auto done = [&]() {
      *a = std::move(ea.e);
      if (b) *b = std::move(eb.e);
      return st;
    };
    if (max_length == 0) {
      ea.truncate(0, tp.direction);
      if (b) eb.truncate(0, tp.direction);
      return done();
    }
    const std::size_t total = ea.e.size() + (b ? eb.e.size() : 0);
    if (total <= max_length) return done();
    const std::size_t to_remove = total - max_length;
    if (tp.strategy == TruncationParams::Strategy::LongestFirst) {
      if (b) {
        std::size_t n1 = ea.e.size(), n2 = eb.e.size();
        bool swap = false;
        if (n1 > n2) {
          swap = true;
          std::swap(n1, n2);
        }
        if (n1 > max_length) n2 = n1;
        else n2 = std::max(n1, max_length - n1);
        if (n1 + n2 > max_length) {
          n1 = max_length / 2;
          n2 = n1 + max_length % 2;
        }
        if (swap) std::swap(n1, n2);
        ea.truncate(n1, tp.direction);
        eb.truncate(n2, tp.direction);
      } else {
        ea.truncate(total - to_remove, tp.direction);
      }
    } else {
      Enc* target = nullptr;
      if (tp.strategy == TruncationParams::Strategy::OnlyFirst) target = &ea;
      else if (b) target = &eb;
      else st = Status::error("truncation: strategy only_second needs a pair of sequences");
      if (target) {
        const std::size_t n = target->e.size();
        if (n > to_remove) target->truncate(n - to_remove, tp.direction);
        else st = Status::error("truncation: the sequence to truncate is too short to respect max_length");
      }
    }
    return done();
  }

  static void pad(Encoding* e, std::size_t target, const PaddingParams& pp) {
    if (e->size() >= target) return;
    const std::size_t n = target - e->size();
    const bool left = pp.direction == Direction::Left;
    auto fill = [&](auto& v, const auto& value) {
      using T = typename std::decay_t<decltype(v)>::value_type;
      if (left) v.insert(v.begin(), n, T(value));
      else v.insert(v.end(), n, T(value));
    };
    fill(e->ids, pp.pad_id);
    fill(e->tokens, pp.pad_token);
    fill(e->type_ids, pp.pad_type_id);
    fill(e->attention_mask, 0);
    fill(e->special_tokens_mask, 1);
    fill(e->word_ids, -1);
    fill(e->sequence_ids, -1);
    fill(e->offsets, Range{0, 0});
    fill(e->char_offsets, Range{0, 0});
  }

  static std::size_t pad_length(std::size_t n, const PaddingParams& pp) {
    std::size_t len = pp.fixed ? pp.length : n;
    if (pp.pad_to_multiple_of > 0 && len % pp.pad_to_multiple_of > 0)
      len += pp.pad_to_multiple_of - len % pp.pad_to_multiple_of;
    return len;
  }

  Status encode_full(const std::string& text, const std::string* pair, bool add_special,
                     const TruncationParams* tp, const PaddingParams* pp, Encoding* out) const {
    Encoding a, b;
    Status st = encode_one(text, 0, 0, &a);
    if (!st.ok()) return st;
    if (pair) {
      st = encode_one(*pair, 1, 1, &b);
      if (!st.ok()) return st;
    }
    if (tp) {
      const std::size_t n_added = post ? post->added_tokens(pair != nullptr) : 0;
      std::size_t max_length = tp->max_length;
      if (add_special && n_added > 0) {
        if (max_length < n_added)
          return Status::error("truncation: max_length " + std::to_string(max_length) + " is smaller than the " +
                               std::to_string(n_added) + " special tokens the post-processor adds");
        max_length -= n_added;
      }
      st = truncate(&a, pair ? &b : nullptr, *tp, max_length);
      if (!st.ok()) return st;
    }
    std::vector<Encoding> encs;
    encs.push_back(std::move(a));
    if (pair) encs.push_back(std::move(b));
    if (post) post->process(&encs, add_special);
    Enc merged;
    for (const auto& e : encs) merged.append(e);
    if (pp) pad(&merged.e, pad_length(merged.e.size(), *pp), *pp);
    *out = std::move(merged.e);
    return Status();
  }
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

namespace {

Status parse_truncation(const Json& j, TruncationParams* out) {
  const std::string where = "truncation";
  if (j.type != Json::kObject) return err(where, std::string("expected an object or null, got ") + type_name(j));
  Status st;
  const Json* v;
  std::uint64_t u;
  if (!(st = need(j, "max_length", where, &v)).ok()) return st;
  if (!(st = as_uint(*v, "truncation.max_length", kMaxLen, &u)).ok()) return st;
  out->max_length = static_cast<std::size_t>(u);
  if (!(st = need(j, "stride", where, &v)).ok()) return st;
  if (!(st = as_uint(*v, "truncation.stride", kMaxLen, &u)).ok()) return st;
  out->stride = static_cast<std::size_t>(u);
  std::string s;
  if (!(st = req_string(j, "strategy", where, &s)).ok()) return st;
  if (s == "LongestFirst") out->strategy = TruncationParams::Strategy::LongestFirst;
  else if (s == "OnlyFirst") out->strategy = TruncationParams::Strategy::OnlyFirst;
  else if (s == "OnlySecond") out->strategy = TruncationParams::Strategy::OnlySecond;
  else return err("truncation.strategy", "unknown strategy " + quoted(s));
  bool present;
  if (!(st = opt_string(j, "direction", where, &s, &present)).ok()) return st;
  if (present) {
    if (s == "Right") out->direction = Direction::Right;
    else if (s == "Left") out->direction = Direction::Left;
    else return err("truncation.direction", "expected \"Right\" or \"Left\"");
  }
  return Status();
}

Status parse_padding(const Json& j, PaddingParams* out) {
  const std::string where = "padding";
  if (j.type != Json::kObject) return err(where, std::string("expected an object or null, got ") + type_name(j));
  Status st;
  const Json* v;
  std::uint64_t u;
  if (!(st = need(j, "strategy", where, &v)).ok()) return st;
  if (v->type == Json::kString && v->str == "BatchLongest") {
    out->fixed = false;
  } else if (v->type == Json::kObject && v->members.size() == 1 && v->members[0].first == "Fixed") {
    if (!(st = as_uint(v->members[0].second, "padding.strategy.Fixed", kMaxLen, &u)).ok()) return st;
    out->fixed = true;
    out->length = static_cast<std::size_t>(u);
  } else {
    return err("padding.strategy", "expected \"BatchLongest\" or {\"Fixed\": n}");
  }
  std::string s;
  if (!(st = req_string(j, "direction", where, &s)).ok()) return st;
  if (s == "Right") out->direction = Direction::Right;
  else if (s == "Left") out->direction = Direction::Left;
  else return err("padding.direction", "expected \"Right\" or \"Left\"");
  v = j.find("pad_to_multiple_of");
  if (v && v->type != Json::kNull) {
    if (!(st = as_uint(*v, "padding.pad_to_multiple_of", kMaxLen, &u)).ok()) return st;
    out->pad_to_multiple_of = static_cast<std::size_t>(u);
  }
  if (!(st = need(j, "pad_id", where, &v)).ok()) return st;
  if (!(st = as_uint(*v, "padding.pad_id", kMaxId, &u)).ok()) return st;
  out->pad_id = static_cast<std::int64_t>(u);
  if (!(st = need(j, "pad_type_id", where, &v)).ok()) return st;
  if (!(st = as_uint(*v, "padding.pad_type_id", kMaxId, &u)).ok()) return st;
  out->pad_type_id = static_cast<std::int64_t>(u);
  if (!(st = req_string(j, "pad_token", where, &out->pad_token)).ok()) return st;
  return Status();
}

Status build(const std::string& text, Tokenizer::Impl* t) {
  Json root;
  Status st = parse_json(text, &root);
  if (!st.ok()) return Status::error("tokenizer.json: " + st.message());
  if (root.type != Json::kObject) return err("top level", "expected an object");
  std::string version;
  if (!(st = req_string(root, "version", "top level", &version)).ok()) return st;
  if (version != "1.0") return err("version", "expected \"1.0\", got " + quoted(version));
  const Json* v;
  if (!(st = need(root, "model", "top level", &v)).ok()) return st;
  if (!(st = parse_model(*v, &t->model)).ok()) return st;
  if ((v = root.find("normalizer")) && v->type != Json::kNull)
    if (!(st = parse_normalizer(*v, "normalizer", 0, &t->normalizer)).ok()) return st;
  if ((v = root.find("pre_tokenizer")) && v->type != Json::kNull)
    if (!(st = parse_pre(*v, "pre_tokenizer", 0, &t->pre)).ok()) return st;
  if ((v = root.find("post_processor")) && v->type != Json::kNull)
    if (!(st = parse_post(*v, "post_processor", 0, &t->post)).ok()) return st;
  if ((v = root.find("decoder")) && v->type != Json::kNull)
    if (!(st = parse_decoder(*v, "decoder", 0, &t->decoder)).ok()) return st;
  if ((v = root.find("truncation")) && v->type != Json::kNull) {
    TruncationParams tp;
    if (!(st = parse_truncation(*v, &tp)).ok()) return st;
    if (tp.max_length > 0 && tp.stride >= tp.max_length)
      return err("truncation.stride", "must be smaller than max_length");
    t->truncation = tp;
  }
  if ((v = root.find("padding")) && v->type != Json::kNull) {
    PaddingParams pp;
    if (!(st = parse_padding(*v, &pp)).ok()) return st;
    t->padding = pp;
  }
  // Added tokens: re-added in file order as the library does (the JSON id is not used).
  if ((v = root.find("added_tokens")) && v->type != Json::kNull) {
    if (v->type != Json::kArray) return err("added_tokens", "expected an array");
    const auto model_size = static_cast<std::int64_t>(t->model->vocab.to_id.size());
    std::int64_t max_added = -1;
    for (std::size_t i = 0; i < v->items.size(); ++i) {
      const Json& a = v->items[i];
      const std::string w = "added_tokens[" + std::to_string(i) + "]";
      if (a.type != Json::kObject) return err(w, "expected an object");
      AddedToken tok;
      if (!(st = req_string(a, "content", w, &tok.content)).ok()) return st;
      if (!(st = req_bool(a, "single_word", w, &tok.single_word)).ok()) return st;
      if (!(st = req_bool(a, "lstrip", w, &tok.lstrip)).ok()) return st;
      if (!(st = req_bool(a, "rstrip", w, &tok.rstrip)).ok()) return st;
      if (!(st = req_bool(a, "normalized", w, &tok.normalized)).ok()) return st;
      if (!(st = opt_bool(a, "special", w, &tok.special)).ok()) return st;
      const Json* idv = a.find("id");
      std::uint64_t unused;
      if (idv && !(st = as_uint(*idv, w + ".id", kMaxId, &unused)).ok()) return st;
      if (tok.content.empty()) continue;
      if (tok.special) t->special_set.insert(tok.content);
      if (t->added_to_id.count(tok.content)) continue;
      std::int64_t id = t->model->vocab.get(tok.content);
      if (id < 0) id = max_added < 0 ? model_size : (max_added >= model_size || model_size == 0 ? max_added + 1 : model_size);
      max_added = std::max(max_added, id);
      tok.id = id;
      t->added_to_id[tok.content] = id;
      t->added_by_id[id] = t->added.size();
      t->added.push_back(tok);
    }
    // Patterns: specials first, then the others, as the library orders them (a later duplicate wins).
    for (int pass = 0; pass < 2; ++pass) {
      for (std::size_t i = 0; i < t->added.size(); ++i) {
        const AddedToken& a = t->added[i];
        if (a.special != (pass == 0)) continue;
        std::u32string u;
        uni::utf8_to_utf32(a.content, &u);
        t->added[i].shown = a.content;
        if (a.normalized) {
          if (t->normalizer) {
            Piece p;
            p.s = u;
            p.al.assign(u.size(), Range{0, 0});
            t->normalizer->normalize(&p);
            u = p.s;
            t->added[i].shown = to_utf8(u);
          }
          if (!u.empty()) t->norm_trie.insert(u, static_cast<std::int64_t>(i));
        } else {
          t->raw_trie.insert(u, static_cast<std::int64_t>(i));
        }
      }
    }
  }
  return Status();
}

}  // namespace

Status Tokenizer::from_json(const std::string& json_text, std::unique_ptr<Tokenizer>* out) {
  try {
    std::unique_ptr<Tokenizer> t(new Tokenizer());
    Status st = build(json_text, t->impl_.get());
    if (!st.ok()) return st;
    *out = std::move(t);
    return Status();
  } catch (const std::bad_alloc&) {
    return Status::error("tokenizer.json: out of memory");
  } catch (const std::exception& e) {
    return Status::error(std::string("tokenizer.json: ") + e.what());
  }
}

Status Tokenizer::from_file(const std::string& path, std::unique_ptr<Tokenizer>* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::error("cannot open " + quoted(path));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return Status::error("cannot read " + quoted(path));
  Status st = from_json(ss.str(), out);
  if (!st.ok()) return Status::error(path + ": " + st.message());
  return st;
}

Status Tokenizer::encode(const std::string& text, const std::string* pair, bool add_special_tokens,
                         Encoding* out) const {
  try {
    const auto& tp = impl_->truncation;
    const auto& pp = impl_->padding;
    return impl_->encode_full(text, pair, add_special_tokens, tp ? &*tp : nullptr, pp ? &*pp : nullptr, out);
  } catch (const std::bad_alloc&) {
    return Status::error("encode: out of memory");
  } catch (const std::exception& e) {
    return Status::error(std::string("encode: ") + e.what());
  }
}

Status Tokenizer::encode_batch(const std::vector<std::string>& texts, const std::vector<std::string>* pairs,
                               bool add_special_tokens, std::vector<Encoding>* out) const {
  const auto& tp = impl_->truncation;
  const auto& pp = impl_->padding;
  return encode_batch_with(texts, pairs, add_special_tokens, tp ? &*tp : nullptr, pp ? &*pp : nullptr, out);
}

Status Tokenizer::encode_batch_with(const std::vector<std::string>& texts, const std::vector<std::string>* pairs,
                                    bool add_special_tokens, const TruncationParams* truncation,
                                    const PaddingParams* padding, std::vector<Encoding>* out) const {
  if (pairs && pairs->size() != texts.size())
    return Status::error("encode_batch: " + std::to_string(texts.size()) + " texts but " +
                         std::to_string(pairs->size()) + " pairs");
  if (truncation && truncation->max_length > 0 && truncation->stride >= truncation->max_length)
    return Status::error("truncation: stride must be smaller than max_length");
  try {
    std::vector<Encoding> res(texts.size());
    std::vector<Status> errors(texts.size());
    std::atomic<bool> failed{false};
    const auto n = static_cast<index_t>(texts.size());
    detail::parallel_for_dynamic(n, [&](index_t i, int) {
      if (failed.load(std::memory_order_relaxed)) return;
      const auto k = static_cast<std::size_t>(i);
      try {
        errors[k] = impl_->encode_full(texts[k], pairs ? &(*pairs)[k] : nullptr, add_special_tokens, truncation,
                                       padding, &res[k]);
      } catch (const std::bad_alloc&) {
        errors[k] = Status::error("encode_batch: out of memory");
      } catch (const std::exception& e) {
        errors[k] = Status::error(std::string("encode_batch: ") + e.what());
      }
      if (!errors[k].ok()) failed.store(true, std::memory_order_relaxed);
    });
    for (std::size_t k = 0; k < texts.size(); ++k)
      if (!errors[k].ok()) return Status::error("text " + std::to_string(k) + ": " + errors[k].message());
    if (padding && !res.empty()) {
      std::size_t longest = 0;
      for (const auto& e : res) longest = std::max(longest, e.size());
      const std::size_t len = Impl::pad_length(longest, *padding);
      for (auto& e : res) Impl::pad(&e, len, *padding);
    }
    *out = std::move(res);
    return Status();
  } catch (const std::bad_alloc&) {
    return Status::error("encode_batch: out of memory");
  }
}

Status Tokenizer::decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens, std::string* out) const {
  try {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      std::string t;
      if (!id_to_token(ids[i], &t))
        return Status::error("decode: id " + std::to_string(ids[i]) + " (position " + std::to_string(i) +
                             ") is not in the vocabulary");
      if (skip_special_tokens && impl_->special_set.count(t)) continue;
      tokens.push_back(std::move(t));
    }
    std::string res;
    if (impl_->decoder) {
      impl_->decoder->decode_chain(&tokens);
      for (const auto& t : tokens) res += t;
    } else {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        if (i) res += ' ';
        res += tokens[i];
      }
    }
    *out = std::move(res);
    return Status();
  } catch (const std::bad_alloc&) {
    return Status::error("decode: out of memory");
  }
}

std::int64_t Tokenizer::token_to_id(const std::string& token) const {
  auto it = impl_->added_to_id.find(token);
  if (it != impl_->added_to_id.end()) return it->second;
  return impl_->model->vocab.get(token);
}

bool Tokenizer::id_to_token(std::int64_t id, std::string* out) const {
  auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) {
    *out = impl_->added[it->second].shown;
    return true;
  }
  auto jt = impl_->model->vocab.to_token.find(id);
  if (jt == impl_->model->vocab.to_token.end()) return false;
  *out = jt->second;
  return true;
}

std::size_t Tokenizer::vocab_size(bool with_added_tokens) const {
  const auto& v = impl_->model->vocab.to_id;
  if (!with_added_tokens) return v.size();
  std::size_t n = v.size();
  for (const auto& a : impl_->added)
    if (!v.count(a.content)) ++n;
  return n;
}

const std::optional<TruncationParams>& Tokenizer::truncation() const { return impl_->truncation; }
const std::optional<PaddingParams>& Tokenizer::padding() const { return impl_->padding; }

Status Tokenizer::set_truncation(const std::optional<TruncationParams>& params) {
  if (params && params->max_length > 0 && params->stride >= params->max_length)
    return Status::error("truncation: stride must be smaller than max_length");
  impl_->truncation = params;
  return Status();
}

void Tokenizer::set_padding(const std::optional<PaddingParams>& params) { impl_->padding = params; }

}  // namespace cpuformer
