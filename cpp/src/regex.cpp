// regex.cpp: the pre-tokenizer regex engine (see regex.h for the supported syntax and the semantics).
// Pattern -> AST (recursive descent, depth bounded) -> program for a backtracking VM with an explicit stack.
#include "regex.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

#include "unicode.h"

namespace cpuformer::regex {

namespace {

constexpr int kUnicodeVersion = 16;      // Oniguruma in tokenizers (tokenizers.md §5.1)
constexpr int kMaxCount = 1000;          // largest {n,m} count
constexpr int kMaxDepth = 100;           // group nesting
constexpr std::size_t kMaxProgram = 200000;
constexpr std::uint32_t kInf = std::numeric_limits<std::uint32_t>::max();

// Per-char property bits: bit k = General Category k (unicode::Category), then White_Space and \w.
constexpr std::uint32_t kSpaceBit = 1u << 30;
constexpr std::uint32_t kWordBit = 1u << 31;
constexpr std::uint32_t cat_bit(unicode::Category c) { return 1u << static_cast<unsigned>(c); }

using unicode::Category;

std::uint32_t cats(std::initializer_list<Category> list) {
  std::uint32_t m = 0;
  for (Category c : list) m |= cat_bit(c);
  return m;
}

// Oniguruma's \w for UTF-8: Alphabetic, M, Nd, Pc (no Join_Control), except that chars below 256 come from its
// ISO-8859-1 ctype table, which also counts the superscripts and fractions U+00B2 U+00B3 U+00B9 U+00BC-00BE
// (checked exhaustively against tokenizers 0.23.3).
bool is_word_char(char32_t c) {
  if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE)) return true;
  Category g = unicode::category(c, kUnicodeVersion);
  if (g == Category::Mn || g == Category::Mc || g == Category::Me || g == Category::Nd || g == Category::Pc)
    return true;
  return unicode::is_alphabetic(c);
}

std::uint32_t props_of(char32_t c, bool need_word) {
  std::uint32_t p = cat_bit(unicode::category(c, kUnicodeVersion));
  if (unicode::is_white_space(c)) p |= kSpaceBit;
  if (need_word && is_word_char(c)) p |= kWordBit;
  return p;
}

// One member test of a class: a code point range, or "has any of these property bits"; neg inverts it.
struct Item {
  bool is_range = true;
  bool neg = false;
  char32_t lo = 0, hi = 0;
  std::uint32_t mask = 0;
};

struct CharSet {
  bool negated = false;
  std::vector<Item> items;
  std::uint64_t ascii[2] = {0, 0};   // precomputed result for chars < 128

  bool slow_match(char32_t c, std::uint32_t props) const {
    bool hit = false;
    for (const Item& it : items) {
      bool m = it.is_range ? (c >= it.lo && c <= it.hi) : (props & it.mask) != 0;
      if (m != it.neg) { hit = true; break; }
    }
    return hit != negated;
  }
  bool match(char32_t c, std::uint32_t props) const {
    if (c < 128) return (ascii[c >> 6] >> (c & 63)) & 1u;
    return slow_match(c, props);
  }
  void finish(bool need_word) {
    for (char32_t c = 0; c < 128; ++c)
      if (slow_match(c, props_of(c, need_word))) ascii[c >> 6] |= std::uint64_t{1} << (c & 63);
  }
};

enum class Op : std::uint8_t {
  kSet,           // a = set
  kRepeatSet,     // a = set, b = min, c = max, mode
  kSplit,         // try x first, then y
  kJump,          // x
  kAssert,        // a = AssertKind
  kAtomicStart,
  kAtomicEnd,
  kPosLookStart,
  kPosLookEnd,
  kNegLookStart,  // x = continuation when the body fails
  kNegLookEnd,
  kIterStart,     // an unbounded loop's body starts here: remember the position
  kIterEnd,       // x = loop head; y = loop exit, taken when this iteration matched empty (Oniguruma's empty check)
  kMatch,
};
enum class Mode : std::uint8_t { kGreedy, kLazy, kPossessive };
enum class AssertKind : std::uint8_t { kBol, kEol, kBegin, kEnd, kEndNl, kWordB, kNotWordB };

struct Inst {
  Op op;
  Mode mode = Mode::kGreedy;
  std::uint32_t a = 0, b = 0, c = 0;
  std::uint32_t x = 0, y = 0;
};

enum class Kind : std::uint8_t { kEmpty, kSet, kConcat, kAlt, kRepeat, kPosLook, kNegLook, kAtomic, kAssert };

struct Node {
  Kind kind = Kind::kEmpty;
  std::uint32_t set = 0;
  std::vector<int> kids;
  std::uint32_t min = 0, max = 0;
  Mode mode = Mode::kGreedy;
  AssertKind assert_kind = AssertKind::kBol;
  std::size_t pos = 0;   // position in the pattern, for messages
  bool is_dot = false;   // the set is `.`
};

std::string hex(char32_t c) {
  static const char* d = "0123456789ABCDEF";
  std::string s;
  for (int sh = 20; sh >= 0; sh -= 4) s += d[(c >> sh) & 15];
  s.erase(0, std::min(s.find_first_not_of('0'), s.size() - 4));
  return "U+" + s;
}

}  // namespace

struct Program {
  std::string pattern;
  std::vector<CharSet> sets;
  std::vector<Inst> code;
  bool need_props = false;   // some set looks at properties of non-ASCII chars
  bool need_word = false;    // \w \W \b \B
};

namespace {

class Parser {
 public:
  Parser(const std::u32string& p, Program* prog) : p_(p), prog_(prog) {}

  bool parse(int* root, std::string* error) {
    bool ok = parse_alt(0, true, root) && (i_ == p_.size() || fail("unmatched ')'")) && check_anychar_head(*root);
    if (!ok) *error = err_;
    return ok;
  }

  // Oniguruma's search assumes that a pattern starting with `.*` that fails at s also fails up to the next newline
  // and skips there (ANCR_ANYCHAR_INF). That is wrong when a zero-width test (\b \B $ \z \Z or a positive
  // lookahead) comes first, e.g. `\B.*\n`; such patterns are rejected rather than run differently.
  bool check_anychar_head(int id) {
    const Node& n = nodes[id];
    if (n.kind == Kind::kAlt) {
      for (int k : n.kids)
        if (!check_anychar_head(k)) return false;
      return true;
    }
    if (n.kind != Kind::kConcat) return true;
    bool risky = false;
    for (int k : n.kids) {
      const Node& c = nodes[k];
      if (c.kind == Kind::kAssert) {
        if (c.assert_kind != AssertKind::kBol && c.assert_kind != AssertKind::kBegin) risky = true;
        continue;
      }
      if (c.kind == Kind::kPosLook) {
        risky = true;
        continue;
      }
      if (c.kind == Kind::kEmpty || c.kind == Kind::kNegLook) continue;
      if (risky && c.kind == Kind::kRepeat && c.max == kInf && nodes[c.kids[0]].is_dot)
        return fail_at("a leading anchor or lookahead followed by `.*` (Oniguruma's search skips to the next line "
                       "after a failed attempt here)", c.pos);
      return true;
    }
    return true;
  }
  std::vector<Node> nodes;

 private:
  const std::u32string& p_;
  Program* prog_;
  std::size_t i_ = 0;
  std::string err_;
  bool icase_ = false;
  char32_t prev_ci_literal_ = 0;   // last literal parsed under (?i) with only groups/quantifiers since (0 = none)

  bool fail(const std::string& what) { return fail_at(what, i_); }
  bool fail_at(const std::string& what, std::size_t at) {
    if (err_.empty()) err_ = "regex: " + what + " at position " + std::to_string(at) + " is not supported";
    return false;
  }
  bool more() const { return i_ < p_.size(); }
  char32_t peek(std::size_t k = 0) const { return i_ + k < p_.size() ? p_[i_ + k] : 0; }

  int add(Node n) {
    nodes.push_back(std::move(n));
    return static_cast<int>(nodes.size() - 1);
  }
  int add_set(CharSet s, std::size_t pos) {
    prog_->sets.push_back(std::move(s));
    Node n;
    n.kind = Kind::kSet;
    n.set = static_cast<std::uint32_t>(prog_->sets.size() - 1);
    n.pos = pos;
    return add(std::move(n));
  }
  static CharSet single(char32_t c) {
    CharSet s;
    s.items.push_back(Item{true, false, c, c, 0});
    return s;
  }

  // alternation: alt := concat ('|' concat)*
  bool parse_alt(int depth, bool group_start, int* out) {
    if (depth > kMaxDepth) return fail("group nesting deeper than " + std::to_string(kMaxDepth));
    const bool saved_icase = icase_;
    // (?i) / (?-i) at the start of the pattern or of a group: applies to the whole group (all alternatives).
    while (group_start && peek() == '(' && peek(1) == '?') {
      std::size_t j = i_ + 2;
      bool on = true;
      if (j < p_.size() && p_[j] == '-') { on = false; ++j; }
      if (j + 1 < p_.size() && p_[j] == 'i' && p_[j + 1] == ')') {
        icase_ = on;
        i_ = j + 2;
      } else {
        break;
      }
    }
    std::vector<int> alts;
    for (;;) {
      int c = -1;
      if (!parse_concat(depth, &c)) return false;
      alts.push_back(c);
      if (peek() == '|' && more()) {
        ++i_;
        prev_ci_literal_ = 0;
        continue;
      }
      break;
    }
    icase_ = saved_icase;
    if (alts.size() == 1) {
      *out = alts[0];
    } else {
      Node n;
      n.kind = Kind::kAlt;
      n.kids = std::move(alts);
      *out = add(std::move(n));
    }
    return true;
  }

  bool parse_concat(int depth, int* out) {
    std::vector<int> items;
    while (more() && peek() != '|' && peek() != ')') {
      int atom = -1;
      std::size_t at = i_;
      if (!parse_atom(depth, &atom)) return false;
      if (!parse_quantifiers(atom, at, &atom)) return false;
      items.push_back(atom);
    }
    if (items.size() == 1) {
      *out = items[0];
    } else {
      Node n;
      n.kind = items.empty() ? Kind::kEmpty : Kind::kConcat;
      n.kids = std::move(items);
      *out = add(std::move(n));
    }
    return true;
  }

  // Reads a decimal number (at most 9 digits) at i_; returns false if there is none.
  bool read_number(std::uint32_t* v) {
    std::size_t start = i_;
    std::uint64_t x = 0;
    while (more() && peek() >= '0' && peek() <= '9' && i_ - start < 9) x = x * 10 + (p_[i_++] - '0');
    *v = static_cast<std::uint32_t>(x);
    return i_ > start;
  }

  // Is there a well-formed interval {n}, {n,}, {n,m}, {,m} at i_? Fills min/max and the length.
  bool interval_at(std::uint32_t* mn, std::uint32_t* mx, std::size_t* len) {
    std::size_t save = i_;
    bool ok = false;
    if (peek() == '{') {
      ++i_;
      std::uint32_t a = 0, b = 0;
      bool has_a = read_number(&a);
      if (peek() == '}' && has_a) {
        ++i_;
        *mn = a;
        *mx = a;
        ok = true;
      } else if (peek() == ',') {
        ++i_;
        bool has_b = read_number(&b);
        if (peek() == '}' && (has_a || has_b)) {
          ++i_;
          *mn = has_a ? a : 0;
          *mx = has_b ? b : kInf;
          ok = true;
        }
      }
    }
    *len = i_ - save;
    i_ = save;
    return ok;
  }

  bool invalid_target(int id) const {
    const Node& n = nodes[id];
    if (n.kind == Kind::kAssert || n.kind == Kind::kPosLook || n.kind == Kind::kNegLook) return true;
    if (n.kind == Kind::kAlt)
      for (int k : n.kids)
        if (invalid_target(k)) return true;
    return false;
  }

  bool parse_quantifiers(int atom, std::size_t atom_pos, int* out) {
    bool quantified = false;
    for (;;) {
      std::uint32_t mn = 0, mx = 0;
      std::size_t len = 0;
      char32_t c = peek();
      bool is_interval = false;
      if (c == '*') { mn = 0; mx = kInf; len = 1; }
      else if (c == '+') { mn = 1; mx = kInf; len = 1; }
      else if (c == '?') { mn = 0; mx = 1; len = 1; }
      else if (c == '{' && interval_at(&mn, &mx, &len)) { is_interval = true; }
      else break;
      if (quantified) return fail("a quantifier following a quantifier");
      // Oniguruma rejects ("target of repeat operator is invalid") an anchor or lookahead, or an alternation with
      // such an alternative; unlike Oniguruma this also rejects them inside capture and (?i:) groups.
      if (invalid_target(atom)) return fail("a quantifier on an anchor or lookahead (or an alternation with one)");
      if (mn > kMaxCount || (mx != kInf && mx > kMaxCount))
        return fail("a repeat count above " + std::to_string(kMaxCount));
      if (mx != kInf && mn > mx) return fail("a repeat range {n,m} with n > m");
      i_ += len;
      Mode mode = Mode::kGreedy;
      if (peek() == '?') { mode = Mode::kLazy; ++i_; }
      else if (peek() == '+') {
        if (is_interval) return fail("'+' after an interval (a quantifier on a quantifier in Oniguruma's Ruby syntax)");
        mode = Mode::kPossessive;
        ++i_;
      }
      if (nodes[atom].kind == Kind::kEmpty) {   // a repeated empty group is still empty
        quantified = true;
        continue;
      }
      Node n;
      n.kind = Kind::kRepeat;
      n.kids = {atom};
      n.min = mn;
      n.max = mx;
      n.mode = mode;
      n.pos = atom_pos;
      atom = add(std::move(n));
      quantified = true;
    }
    *out = atom;
    return true;
  }

  // A literal char, with (?i) folding. Sets the "previous literal" used for the multi-char fold check.
  bool literal(char32_t c, std::size_t pos, int* out) {
    if (!icase_) {
      *out = add_set(single(c), pos);
      return true;
    }
    char32_t lower = c;
    CharSet s;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == 0x017F || c == 0x212A) {
      if (c == 0x017F) lower = 's';
      else if (c == 0x212A) lower = 'k';
      else lower = c | 0x20;
      s = single(lower);
      s.items.push_back(Item{true, false, lower - 32, lower - 32, 0});
      if (lower == 's') s.items.push_back(Item{true, false, 0x017F, 0x017F, 0});
      if (lower == 'k') s.items.push_back(Item{true, false, 0x212A, 0x212A, 0});
    } else if (c < 128) {
      s = single(c);
    } else {
      return fail_at("the non-ASCII char " + hex(c) + " under case-insensitive matching (?i)", pos);
    }
    if (prev_ci_literal_ != 0) {
      static const char* pairs[] = {"ss", "st", "ff", "fi", "fl"};
      for (const char* pr : pairs)
        if (prev_ci_literal_ == static_cast<char32_t>(pr[0]) && lower == static_cast<char32_t>(pr[1]))
          return fail_at(std::string("the char pair '") + pr +
                             "' under (?i) (Oniguruma matches it against a multi-char case fold such as U+00DF or "
                             "a ligature)",
                         pos);
    }
    prev_ci_literal_ = lower;
    *out = add_set(std::move(s), pos);
    return true;
  }

  bool parse_atom(int depth, int* out) {
    const std::size_t at = i_;
    const char32_t c = p_[i_];
    if (c == '(') return parse_group(depth, out);
    if (c == '*' || c == '+' || c == '?') return fail("a quantifier with nothing to repeat");
    if (c == '{') {
      std::uint32_t a, b;
      std::size_t len;
      if (interval_at(&a, &b, &len)) return fail("a quantifier with nothing to repeat");
      return fail("a '{' that does not start an interval {n,m} (escape it as \\{)");
    }
    if (c == '[') {
      prev_ci_literal_ = 0;
      CharSet s;
      if (!parse_class(&s)) return false;
      *out = add_set(std::move(s), at);
      return true;
    }
    if (c == '.') {
      ++i_;
      prev_ci_literal_ = 0;
      CharSet s = single('\n');
      s.negated = true;
      *out = add_set(std::move(s), at);
      nodes[*out].is_dot = true;
      return true;
    }
    if (c == '^' || c == '$') {
      ++i_;
      prev_ci_literal_ = 0;
      Node n;
      n.kind = Kind::kAssert;
      n.assert_kind = c == '^' ? AssertKind::kBol : AssertKind::kEol;
      *out = add(std::move(n));
      return true;
    }
    if (c == '\\') return parse_escape(out);
    ++i_;
    return literal(c, at, out);
  }

  bool parse_group(int depth, int* out) {
    const std::size_t at = i_;
    ++i_;   // '('
    Kind kind = Kind::kEmpty;   // kEmpty = plain group
    bool saved_icase = icase_;
    if (peek() == '?') {
      char32_t k = peek(1);
      if (k == ':') { i_ += 2; }
      else if (k == '=') { i_ += 2; kind = Kind::kPosLook; }
      else if (k == '!') { i_ += 2; kind = Kind::kNegLook; }
      else if (k == '>') { i_ += 2; kind = Kind::kAtomic; }
      else if (k == '<' && (peek(2) == '=' || peek(2) == '!')) { return fail("lookbehind (?<= / (?<!"); }
      else if (k == '<') {
        std::size_t j = i_ + 2;
        while (j < p_.size() && ((p_[j] >= 'a' && p_[j] <= 'z') || (p_[j] >= 'A' && p_[j] <= 'Z') ||
                                 (p_[j] >= '0' && p_[j] <= '9') || p_[j] == '_'))
          ++j;
        if (j == i_ + 2 || j >= p_.size() || p_[j] != '>') return fail("a malformed named group (?<name>...)");
        i_ = j + 1;
      } else if (k == 'i' && peek(2) == ':') { i_ += 3; icase_ = true; }
      else if (k == '-' && peek(2) == 'i' && peek(3) == ':') { i_ += 4; icase_ = false; }
      else if ((k == 'i' || (k == '-' && peek(2) == 'i')) && peek(k == 'i' ? 2 : 3) == ')') {
        return fail("an inline option (?i)/(?-i) that is not at the start of the pattern or of a group");
      } else {
        return fail("the group construct (?" + std::string(1, k < 128 && k >= 32 ? static_cast<char>(k) : '?') +
                    "...) (only (?:  (?i:  (?-i:  (?=  (?!  (?>  (?<name> are)");
      }
    }
    int body = -1;
    if (!parse_alt(depth + 1, true, &body)) return false;
    icase_ = saved_icase;
    if (peek() != ')' || !more()) return fail_at("an unclosed group '('", at);
    ++i_;
    if (kind == Kind::kEmpty) {
      *out = body;
      return true;
    }
    prev_ci_literal_ = 0;
    Node n;
    n.kind = kind;
    n.kids = {body};
    n.pos = at;
    *out = add(std::move(n));
    return true;
  }

  bool hex_digits(std::size_t max_digits, std::size_t min_digits, char32_t* v) {
    std::uint32_t x = 0;
    std::size_t n = 0;
    while (n < max_digits && more()) {
      char32_t c = peek();
      int d = (c >= '0' && c <= '9') ? int(c - '0') : (c >= 'a' && c <= 'f') ? int(c - 'a' + 10)
              : (c >= 'A' && c <= 'F') ? int(c - 'A' + 10) : -1;
      if (d < 0) break;
      x = x * 16 + static_cast<std::uint32_t>(d);
      ++n;
      ++i_;
    }
    *v = x;
    return n >= min_digits;
  }

  // Parses a char escape (after the backslash, i_ at the letter). Returns 1 = char (in *cp), 0 = not a char escape
  // (i_ unchanged), -1 = error.
  int char_escape(char32_t* cp) {
    const std::size_t at = i_ - 1;
    char32_t c = peek();
    switch (c) {
      case 't': ++i_; *cp = '\t'; return 1;
      case 'n': ++i_; *cp = '\n'; return 1;
      case 'r': ++i_; *cp = '\r'; return 1;
      case 'f': ++i_; *cp = '\f'; return 1;
      case 'v': ++i_; *cp = '\v'; return 1;
      case 'a': ++i_; *cp = 0x07; return 1;
      case 'e': ++i_; *cp = 0x1B; return 1;
      case 'x':
        ++i_;
        if (peek() == '{') {
          ++i_;
          if (!hex_digits(8, 1, cp) || peek() != '}') return fail_at("a malformed \\x{...} escape", at), -1;
          ++i_;
        } else if (!hex_digits(2, 1, cp)) {
          return fail_at("a malformed \\xHH escape", at), -1;
        }
        if (*cp > 0x10FFFF || (*cp >= 0xD800 && *cp <= 0xDFFF)) return fail_at("an invalid code point escape", at), -1;
        return 1;
      case 'u':
        ++i_;
        if (!hex_digits(4, 4, cp)) return fail_at("a malformed \\uHHHH escape", at), -1;
        if (*cp >= 0xD800 && *cp <= 0xDFFF) return fail_at("a surrogate escape", at), -1;
        return 1;
      default:
        break;
    }
    if (c >= 128 || (c < 128 && !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))) {
      if (c == 0) return fail_at("a trailing backslash", at), -1;
      ++i_;
      *cp = c;
      return 1;
    }
    return 0;
  }

  // Property/class escapes (\s \S \d \D \w \W \p{..} \P{..}); i_ at the letter. Returns 1 = item, 0 = not one,
  // -1 = error.
  int class_escape(Item* item) {
    const std::size_t at = i_ - 1;
    char32_t c = peek();
    Item it;
    it.is_range = false;
    switch (c) {
      case 's': case 'S': it.mask = kSpaceBit; it.neg = c == 'S'; ++i_; break;
      case 'd': case 'D': it.mask = cat_bit(Category::Nd); it.neg = c == 'D'; ++i_; break;
      case 'w': case 'W':
        if (icase_) return fail_at("\\w or \\W under case-insensitive matching (?i)", at), -1;
        it.mask = kWordBit; it.neg = c == 'W'; prog_->need_word = true; ++i_; break;
      case 'p': case 'P': {
        it.neg = c == 'P';
        ++i_;
        if (peek() != '{') return fail_at("\\p without {...}", at), -1;
        ++i_;
        if (peek() == '^') { it.neg = !it.neg; ++i_; }
        std::string name;
        while (more() && peek() != '}') {
          char32_t d = p_[i_++];
          if (d == ' ' || d == '_' || d == '-') continue;
          if (d >= 128) return fail_at("the property name in \\p{...}", at), -1;
          name += static_cast<char>((d >= 'A' && d <= 'Z') ? d + 32 : d);
        }
        if (!more()) return fail_at("an unclosed \\p{", at), -1;
        ++i_;
        std::uint32_t m = 0;
        if (!property_mask(name, &m))
          return fail_at("the property \\p{" + name + "} (only general categories are)", at), -1;
        if (icase_) return fail_at("a property \\p{..} under case-insensitive matching (?i)", at), -1;
        it.mask = m;
        break;
      }
      default:
        return 0;
    }
    prog_->need_props = true;
    *item = it;
    return 1;
  }

  static bool property_mask(const std::string& n, std::uint32_t* m) {
    using C = Category;
    struct Entry { const char* short_name; const char* long_name; std::uint32_t mask; };
    const Entry table[] = {
        {"l", "letter", cats({C::Lu, C::Ll, C::Lt, C::Lm, C::Lo})},
        {"lc", "casedletter", cats({C::Lu, C::Ll, C::Lt})},
        {"lu", "uppercaseletter", cat_bit(C::Lu)},
        {"ll", "lowercaseletter", cat_bit(C::Ll)},
        {"lt", "titlecaseletter", cat_bit(C::Lt)},
        {"lm", "modifierletter", cat_bit(C::Lm)},
        {"lo", "otherletter", cat_bit(C::Lo)},
        {"m", "mark", cats({C::Mn, C::Mc, C::Me})},
        {"", "combiningmark", cats({C::Mn, C::Mc, C::Me})},
        {"mn", "nonspacingmark", cat_bit(C::Mn)},
        {"mc", "spacingmark", cat_bit(C::Mc)},
        {"me", "enclosingmark", cat_bit(C::Me)},
        {"n", "number", cats({C::Nd, C::Nl, C::No})},
        {"nd", "decimalnumber", cat_bit(C::Nd)},
        {"nl", "letternumber", cat_bit(C::Nl)},
        {"no", "othernumber", cat_bit(C::No)},
        {"p", "punctuation", cats({C::Pc, C::Pd, C::Ps, C::Pe, C::Pi, C::Pf, C::Po})},
        {"pc", "connectorpunctuation", cat_bit(C::Pc)},
        {"pd", "dashpunctuation", cat_bit(C::Pd)},
        {"ps", "openpunctuation", cat_bit(C::Ps)},
        {"pe", "closepunctuation", cat_bit(C::Pe)},
        {"pi", "initialpunctuation", cat_bit(C::Pi)},
        {"pf", "finalpunctuation", cat_bit(C::Pf)},
        {"po", "otherpunctuation", cat_bit(C::Po)},
        {"s", "symbol", cats({C::Sm, C::Sc, C::Sk, C::So})},
        {"sm", "mathsymbol", cat_bit(C::Sm)},
        {"sc", "currencysymbol", cat_bit(C::Sc)},
        {"sk", "modifiersymbol", cat_bit(C::Sk)},
        {"so", "othersymbol", cat_bit(C::So)},
        {"z", "separator", cats({C::Zs, C::Zl, C::Zp})},
        {"zs", "spaceseparator", cat_bit(C::Zs)},
        {"zl", "lineseparator", cat_bit(C::Zl)},
        {"zp", "paragraphseparator", cat_bit(C::Zp)},
        {"c", "other", cats({C::Cc, C::Cf, C::Cs, C::Co, C::Cn})},
        {"cc", "control", cat_bit(C::Cc)},
        {"cf", "format", cat_bit(C::Cf)},
        {"cs", "surrogate", cat_bit(C::Cs)},
        {"co", "privateuse", cat_bit(C::Co)},
        {"cn", "unassigned", cat_bit(C::Cn)},
    };
    for (const Entry& e : table) {
      if ((e.short_name[0] != 0 && n == e.short_name) || n == e.long_name) {
        *m = e.mask;
        return true;
      }
    }
    return false;
  }

  bool parse_escape(int* out) {
    const std::size_t at = i_;
    ++i_;   // backslash
    if (!more()) return fail_at("a trailing backslash", at);
    char32_t c = peek();
    Node n;
    n.kind = Kind::kAssert;
    n.pos = at;
    switch (c) {
      case 'A': n.assert_kind = AssertKind::kBegin; break;
      case 'z': n.assert_kind = AssertKind::kEnd; break;
      case 'Z': n.assert_kind = AssertKind::kEndNl; break;
      case 'b': n.assert_kind = AssertKind::kWordB; break;
      case 'B': n.assert_kind = AssertKind::kNotWordB; break;
      default: n.kind = Kind::kEmpty; break;
    }
    if (n.kind == Kind::kAssert) {
      ++i_;
      if (c == 'b' || c == 'B') {
        if (icase_) return fail_at("\\b or \\B under case-insensitive matching (?i)", at);
        prog_->need_word = true;
        prog_->need_props = true;
      }
      prev_ci_literal_ = 0;
      *out = add(std::move(n));
      return true;
    }
    Item item;
    int r = class_escape(&item);
    if (r < 0) return false;
    if (r > 0) {
      prev_ci_literal_ = 0;
      CharSet s;
      s.items.push_back(item);
      *out = add_set(std::move(s), at);
      return true;
    }
    char32_t cp = 0;
    r = char_escape(&cp);
    if (r < 0) return false;
    if (r > 0) return literal(cp, at, out);
    if (c >= '1' && c <= '9') return fail_at("a backreference \\" + std::string(1, static_cast<char>(c)), at);
    return fail_at("the escape \\" + std::string(1, static_cast<char>(c)), at);
  }

  bool parse_class(CharSet* out) {
    const std::size_t at = i_;
    ++i_;   // '['
    CharSet s;
    if (peek() == '^') { s.negated = true; ++i_; }
    if (peek() == ']') return fail("']' right after '[' (an empty class or a literal ']'; escape it as \\])");
    for (;;) {
      if (!more()) return fail_at("an unclosed class '['", at);
      char32_t c = peek();
      if (c == ']') { ++i_; break; }
      if (c == '[') return fail("a nested class or POSIX bracket inside [...]");
      if (c == '&' && peek(1) == '&') return fail("class intersection &&");
      const std::size_t item_at = i_;
      char32_t lo = 0;
      bool is_char = true;
      if (c == '\\') {
        ++i_;
        if (!more()) return fail_at("a trailing backslash", item_at);
        char32_t e = peek();
        if (e == 'b') return fail_at("\\b inside a class", item_at);
        Item item;
        int r = class_escape(&item);
        if (r < 0) return false;
        if (r > 0) {
          s.items.push_back(item);
          is_char = false;
        } else {
          r = char_escape(&lo);
          if (r < 0) return false;
          if (r == 0) {
            if (e >= '0' && e <= '9') return fail_at("a backreference or octal escape inside a class", item_at);
            return fail_at("the escape \\" + std::string(1, static_cast<char>(e)) + " inside a class", item_at);
          }
        }
      } else {
        ++i_;
        lo = c;
      }
      if (!is_char) {
        if (peek() == '-' && peek(1) != ']') return fail("a range whose start is a class escape");
        continue;
      }
      char32_t hi = lo;
      if (peek() == '-' && peek(1) != ']' && more()) {
        ++i_;
        char32_t d = peek();
        if (d == '[') return fail("a nested class inside [...]");
        if (d == '\\') {
          ++i_;
          if (!more()) return fail("a trailing backslash");
          if (peek() == 's' || peek() == 'S' || peek() == 'd' || peek() == 'D' || peek() == 'w' || peek() == 'W' ||
              peek() == 'p' || peek() == 'P')
            return fail("a range whose end is a class escape");
          int r = char_escape(&hi);
          if (r < 0) return false;
          if (r == 0) return fail("the escape in a range end");
        } else {
          ++i_;
          hi = d;
        }
        if (hi < lo) return fail_at("an empty range (end below start)", item_at);
      }
      s.items.push_back(Item{true, false, lo, hi, 0});
      if (icase_) {
        // Case-fold closure of ASCII members (other case, plus U+017F for s and U+212A for k); non-ASCII members
        // would need the full folding data.
        if (hi >= 128)
          return fail_at("a non-ASCII class member under case-insensitive matching (?i)", item_at);
        for (char32_t ch = lo; ch <= hi; ++ch) {
          if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))) continue;
          const char32_t other = ch ^ 0x20;
          s.items.push_back(Item{true, false, other, other, 0});
          if ((ch | 0x20) == 's') s.items.push_back(Item{true, false, 0x017F, 0x017F, 0});
          if ((ch | 0x20) == 'k') s.items.push_back(Item{true, false, 0x212A, 0x212A, 0});
        }
      }
    }
    *out = std::move(s);
    return true;
  }
};

bool nullable(const std::vector<Node>& nodes, int id) {
  const Node& n = nodes[id];
  switch (n.kind) {
    case Kind::kSet: return false;
    case Kind::kConcat:
      for (int k : n.kids)
        if (!nullable(nodes, k)) return false;
      return true;
    case Kind::kAlt:
      for (int k : n.kids)
        if (nullable(nodes, k)) return true;
      return false;
    case Kind::kRepeat: return n.min == 0 || nullable(nodes, n.kids[0]);
    case Kind::kAtomic: return nullable(nodes, n.kids[0]);
    default: return true;
  }
}

bool has_unbounded(const std::vector<Node>& nodes, int id) {
  const Node& n = nodes[id];
  if (n.kind == Kind::kRepeat && n.max == kInf) return true;
  for (int k : n.kids)
    if (has_unbounded(nodes, k)) return true;
  return false;
}

class Compiler {
 public:
  Compiler(const std::vector<Node>& nodes, Program* prog) : nodes_(nodes), code_(prog->code) {}

  bool compile(int id, std::string* error) {
    if (!emit(id)) {
      *error = err_;
      return false;
    }
    push(Inst{Op::kMatch});
    return true;
  }

 private:
  const std::vector<Node>& nodes_;
  std::vector<Inst>& code_;
  std::string err_;

  std::uint32_t here() const { return static_cast<std::uint32_t>(code_.size()); }
  std::uint32_t push(Inst in) {
    code_.push_back(in);
    return here() - 1;
  }
  bool fail(const std::string& what, std::size_t pos) {
    err_ = "regex: " + what + " at position " + std::to_string(pos) + " is not supported";
    return false;
  }

  bool emit(int id) {
    if (code_.size() > kMaxProgram) return fail("a pattern this large (compiled program too long)", nodes_[id].pos);
    const Node& n = nodes_[id];
    switch (n.kind) {
      case Kind::kEmpty: return true;
      case Kind::kSet: {
        Inst in{Op::kSet};
        in.a = n.set;
        push(in);
        return true;
      }
      case Kind::kConcat:
        for (int k : n.kids)
          if (!emit(k)) return false;
        return true;
      case Kind::kAlt: {
        std::vector<std::uint32_t> jumps;
        for (std::size_t k = 0; k < n.kids.size(); ++k) {
          std::uint32_t split = 0;
          const bool last = k + 1 == n.kids.size();
          if (!last) split = push(Inst{Op::kSplit});
          if (!last) code_[split].x = here();
          if (!emit(n.kids[k])) return false;
          if (!last) {
            jumps.push_back(push(Inst{Op::kJump}));
            code_[split].y = here();
          }
        }
        for (std::uint32_t j : jumps) code_[j].x = here();
        return true;
      }
      case Kind::kAssert: {
        Inst in{Op::kAssert};
        in.a = static_cast<std::uint32_t>(n.assert_kind);
        push(in);
        return true;
      }
      case Kind::kAtomic:
        push(Inst{Op::kAtomicStart});
        if (!emit(n.kids[0])) return false;
        push(Inst{Op::kAtomicEnd});
        return true;
      case Kind::kPosLook:
        push(Inst{Op::kPosLookStart});
        if (!emit(n.kids[0])) return false;
        push(Inst{Op::kPosLookEnd});
        return true;
      case Kind::kNegLook: {
        std::uint32_t start = push(Inst{Op::kNegLookStart});
        if (!emit(n.kids[0])) return false;
        push(Inst{Op::kNegLookEnd});
        code_[start].x = here();
        return true;
      }
      case Kind::kRepeat: return emit_repeat(n);
    }
    return false;
  }

  bool emit_repeat(const Node& n) {
    const Node& body = nodes_[n.kids[0]];
    if (body.kind == Kind::kSet) {
      Inst in{Op::kRepeatSet};
      in.mode = n.mode;
      in.a = body.set;
      in.b = n.min;
      in.c = n.max;
      push(in);
      return true;
    }
    // A body that can match empty: bounded repeats are expanded as usual; unbounded loops get Oniguruma's empty
    // check (an iteration that matched empty leaves the loop instead of jumping back).
    const bool body_nullable = nullable(nodes_, n.kids[0]);
    const bool empty_check = n.max == kInf && body_nullable;
    // Oniguruma also empty-checks the mandatory iterations of {n,..} with n >= 2 (an empty one ends the repeat
    // early), which a plain expansion does not reproduce (found by the differential test).
    if (body_nullable && n.min >= 2)
      return fail("a repeat count {n,...} with n >= 2 on a subexpression that can match empty", n.pos);
    if (n.max == kInf && has_unbounded(nodes_, n.kids[0]))
      return fail("an unbounded quantifier on a subexpression with an unbounded quantifier (nested quantifiers)",
                  n.pos);
    if (n.mode == Mode::kPossessive) push(Inst{Op::kAtomicStart});
    for (std::uint32_t k = 0; k < n.min; ++k)
      if (!emit(n.kids[0])) return false;
    const bool lazy = n.mode == Mode::kLazy;
    if (n.max == kInf) {
      std::uint32_t loop = push(Inst{Op::kSplit});
      std::uint32_t body_at = here();
      if (empty_check) push(Inst{Op::kIterStart});
      if (!emit(n.kids[0])) return false;
      Inst j{empty_check ? Op::kIterEnd : Op::kJump};
      j.x = loop;
      std::uint32_t end = push(j);
      code_[end].y = here();
      code_[loop].x = lazy ? here() : body_at;
      code_[loop].y = lazy ? body_at : here();
    } else {
      std::vector<std::uint32_t> splits;
      for (std::uint32_t k = n.min; k < n.max; ++k) {
        std::uint32_t s = push(Inst{Op::kSplit});
        splits.push_back(s);
        std::uint32_t body_at = here();
        if (!emit(n.kids[0])) return false;
        (lazy ? code_[s].y : code_[s].x) = body_at;
      }
      for (std::uint32_t s : splits) (lazy ? code_[s].x : code_[s].y) = here();
    }
    if (n.mode == Mode::kPossessive) push(Inst{Op::kAtomicEnd});
    return true;
  }
};

// Lenient UTF-8 decoding: each byte of an invalid sequence becomes U+FFFD. offsets gets n+1 entries.
void decode(const std::string& s, std::u32string* out, std::vector<std::size_t>* offsets) {
  out->clear();
  offsets->clear();
  out->reserve(s.size());
  offsets->reserve(s.size() + 1);
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    offsets->push_back(i);
    unsigned c = b[i];
    std::size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    char32_t cp = 0xFFFD;
    bool ok = len != 0 && i + len <= n;
    if (ok) {
      cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
      for (std::size_t k = 1; k < len; ++k) {
        if ((b[i + k] & 0xC0) != 0x80) { ok = false; break; }
        cp = (cp << 6) | (b[i + k] & 0x3F);
      }
      static const char32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
      if (ok && (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
    }
    if (ok) {
      out->push_back(cp);
      i += len;
    } else {
      out->push_back(0xFFFD);
      i += 1;
    }
  }
  offsets->push_back(n);
}

enum class FrameKind : std::uint8_t { kBranch, kGreedy, kLazy, kAtomic, kPosLook, kNegLook, kIter };
struct Frame {
  FrameKind kind;
  std::uint32_t pc;
  std::size_t pos;
  std::size_t aux;   // greedy: lowest position; lazy: highest position
};

class Matcher {
 public:
  Matcher(const Program& prog, const std::u32string& text) : prog_(prog), text_(text), n_(text.size()) {
    if (prog.need_props) {
      props_.resize(n_);
      for (std::size_t i = 0; i < n_; ++i)
        if (text[i] >= 128 || prog.need_word) props_[i] = props_of(text[i], prog.need_word);
    }
  }

  // Backtracking steps one match attempt may take: Oniguruma's default retry limit (ONIG_DEFAULT_RETRY_LIMIT_IN_MATCH,
  // where the tokenizers library fails too). Without it a hostile pattern in a tokenizer.json, such as (a|aa)*c,
  // would take exponential time: instead run() throws, and the tokenizer reports an error Status.
  static constexpr std::size_t kRetryLimit = 10'000'000;

  // The end of the match starting at start, or npos.
  std::size_t run(std::size_t start) {
    stack_.clear();
    std::uint32_t pc = 0;
    std::size_t pos = start;
    std::size_t backtracks = 0;
    const std::vector<Inst>& code = prog_.code;
    for (;;) {
      const Inst& in = code[pc];
      bool ok = true;
      switch (in.op) {
        case Op::kSet:
          if (pos < n_ && match(in.a, pos)) { ++pos; ++pc; } else { ok = false; }
          break;
        case Op::kRepeatSet: {
          const std::size_t room = n_ - pos;
          const std::size_t limit = in.c == kInf ? room : std::min<std::size_t>(in.c, room);
          if (in.mode == Mode::kLazy) {
            std::size_t k = 0;
            while (k < in.b && k < limit && match(in.a, pos + k)) ++k;
            if (k < in.b) { ok = false; break; }
            if (k < limit) stack_.push_back(Frame{FrameKind::kLazy, pc, pos + k, pos + limit});
            pos += k;
            ++pc;
          } else {
            std::size_t k = 0;
            while (k < limit && match(in.a, pos + k)) ++k;
            if (k < in.b) { ok = false; break; }
            if (in.mode == Mode::kGreedy && k > in.b) stack_.push_back(Frame{FrameKind::kGreedy, pc + 1, pos + k,
                                                                            pos + in.b});
            pos += k;
            ++pc;
          }
          break;
        }
        case Op::kSplit:
          stack_.push_back(Frame{FrameKind::kBranch, in.y, pos, 0});
          pc = in.x;
          break;
        case Op::kJump: pc = in.x; break;
        case Op::kAssert:
          if (check(static_cast<AssertKind>(in.a), pos)) ++pc; else ok = false;
          break;
        case Op::kAtomicStart:
          stack_.push_back(Frame{FrameKind::kAtomic, 0, pos, 0});
          ++pc;
          break;
        case Op::kPosLookStart:
          stack_.push_back(Frame{FrameKind::kPosLook, 0, pos, 0});
          ++pc;
          break;
        case Op::kNegLookStart:
          stack_.push_back(Frame{FrameKind::kNegLook, in.x, pos, 0});
          ++pc;
          break;
        case Op::kAtomicEnd:
          cut();
          ++pc;
          break;
        case Op::kPosLookEnd:
          pos = cut();
          ++pc;
          break;
        case Op::kNegLookEnd:
          cut();
          ok = false;
          break;
        case Op::kIterStart:
          stack_.push_back(Frame{FrameKind::kIter, 0, pos, 0});
          ++pc;
          break;
        case Op::kIterEnd: {
          // The innermost iteration marker is this loop's (unbounded loops do not nest: has_unbounded).
          std::size_t k = stack_.size();
          while (k > 0 && stack_[k - 1].kind != FrameKind::kIter) --k;
          pc = (k > 0 && stack_[k - 1].pos == pos) ? in.y : in.x;
          break;
        }
        case Op::kMatch: return pos;
      }
      if (ok) continue;
      // Backtrack.
      if (++backtracks > kRetryLimit)
        throw std::runtime_error("regex " + prog_.pattern.substr(0, 80) + ": more than 10,000,000 backtracking " +
                                 "steps at one position (Oniguruma's retry limit)");
      for (;;) {
        if (stack_.empty()) return npos;
        Frame& f = stack_.back();
        bool resumed = true;
        switch (f.kind) {
          case FrameKind::kBranch:
            pc = f.pc;
            pos = f.pos;
            stack_.pop_back();
            break;
          case FrameKind::kGreedy:
            --f.pos;
            pos = f.pos;
            pc = f.pc;
            if (f.pos == f.aux) stack_.pop_back();
            break;
          case FrameKind::kLazy:
            if (f.pos < f.aux && match(code[f.pc].a, f.pos)) {
              ++f.pos;
              pos = f.pos;
              pc = f.pc + 1;
              if (f.pos == f.aux) stack_.pop_back();
            } else {
              stack_.pop_back();
              resumed = false;
            }
            break;
          case FrameKind::kNegLook:   // the body failed: the negative lookahead holds
            pc = f.pc;
            pos = f.pos;
            stack_.pop_back();
            break;
          default:   // atomic / positive lookahead / iteration marker: their body failed
            stack_.pop_back();
            resumed = false;
            break;
        }
        if (resumed) break;
      }
    }
  }

  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

 private:
  const Program& prog_;
  const std::u32string& text_;
  const std::size_t n_;
  std::vector<std::uint32_t> props_;
  std::vector<Frame> stack_;

  bool match(std::uint32_t set, std::size_t pos) const {
    const char32_t c = text_[pos];
    return prog_.sets[set].match(c, (c < 128 || !prog_.need_props) ? 0 : props_[pos]);
  }
  bool word_at(std::size_t pos) const { return pos < n_ && (props_[pos] & kWordBit) != 0; }
  bool check(AssertKind k, std::size_t pos) const {
    switch (k) {
      // Oniguruma's begin-line: never at the end of a non-empty string, even after a newline.
      case AssertKind::kBol: return pos == 0 || (text_[pos - 1] == '\n' && pos != n_);
      case AssertKind::kEol: return pos == n_ || text_[pos] == '\n';
      case AssertKind::kBegin: return pos == 0;
      case AssertKind::kEnd: return pos == n_;
      case AssertKind::kEndNl: return pos == n_ || (pos + 1 == n_ && text_[pos] == '\n');
      case AssertKind::kWordB: return (pos > 0 && word_at(pos - 1)) != word_at(pos);
      case AssertKind::kNotWordB: return (pos > 0 && word_at(pos - 1)) == word_at(pos);
    }
    return false;
  }
  // Removes the innermost atomic/lookahead marker and everything above it; returns the marker's position.
  std::size_t cut() {
    while (!stack_.empty()) {
      Frame f = stack_.back();
      stack_.pop_back();
      if (f.kind == FrameKind::kAtomic || f.kind == FrameKind::kPosLook || f.kind == FrameKind::kNegLook)
        return f.pos;
    }
    return 0;   // unreachable: every end instruction has its start marker below
  }
};

}  // namespace

bool Regex::compile(const std::string& pattern, Regex* out, std::string* error) {
  std::string scratch;
  if (error == nullptr) error = &scratch;
  error->clear();
  auto prog = std::make_shared<Program>();
  prog->pattern = pattern;
  std::u32string p;
  std::vector<std::size_t> offs;
  decode(pattern, &p, &offs);
  for (std::size_t k = 0; k < p.size(); ++k) {
    if (p[k] == 0xFFFD && offs[k + 1] - offs[k] == 1) {
      *error = "regex: invalid UTF-8 in the pattern at byte " + std::to_string(offs[k]);
      return false;
    }
  }
  Parser parser(p, prog.get());
  int root = -1;
  if (!parser.parse(&root, error)) return false;
  Compiler compiler(parser.nodes, prog.get());
  if (!compiler.compile(root, error)) return false;
  for (CharSet& s : prog->sets) {
    s.finish(prog->need_word);
    for (const Item& it : s.items)
      if (!it.is_range) prog->need_props = true;
  }
  if (prog->need_word) prog->need_props = true;
  if (out != nullptr) out->program_ = std::move(prog);
  return true;
}

const std::string& Regex::pattern() const {
  static const std::string empty;
  return program_ ? program_->pattern : empty;
}

std::vector<std::pair<std::size_t, std::size_t>> Regex::find_all(const std::u32string& text) const {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  if (!program_) return out;
  Matcher m(*program_, text);
  const std::size_t n = text.size();
  // The onig crate's FindMatches::next (6.4, used by tokenizers): an empty match ending where the previous match
  // ended is dropped and the search restarts one char further; every other match is yielded.
  std::size_t last_end = 0;
  bool have_last = false;
  std::size_t last_match_end = 0;
  while (last_end <= n) {
    std::size_t s = last_end, e = Matcher::npos;
    for (; s <= n; ++s) {
      e = m.run(s);
      if (e != Matcher::npos) break;
    }
    if (e == Matcher::npos) break;
    if (e == s && have_last && last_match_end == e) {
      last_end += 1;
      continue;
    }
    last_end = e;
    last_match_end = e;
    have_last = true;
    out.emplace_back(s, e);
  }
  return out;
}

std::vector<std::pair<std::size_t, std::size_t>> Regex::find_all(const std::string& utf8) const {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  if (!program_) return out;
  std::u32string text;
  std::vector<std::size_t> offsets;
  decode(utf8, &text, &offsets);
  out = find_all(text);
  for (auto& span : out) span = {offsets[span.first], offsets[span.second]};
  return out;
}

}  // namespace cpuformer::regex
