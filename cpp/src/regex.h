// cpp/src/regex.h (private to the core): a small backtracking regex engine with Oniguruma semantics for the
// subset that `tokenizer.json` pre-tokenizer and normalizer patterns use (tokenizers.md §3). Used by Split/Replace
// (pattern type Regex) and ByteLevel (the GPT-2 pattern).
//
// Supported syntax (Oniguruma/Ruby meaning; anything else is a compile error naming the construct and its position):
//   literals (any char not special; `}` and `]` are literal outside a class), `.` (any char but U+000A),
//   `|` (ordered alternation, the first alternative that matches wins), `(...)`, `(?:...)`, `(?<name>...)` (groups
//   only group: captures are not reported), `(?i:...)`, `(?-i:...)`, `(?i)`/`(?-i)` at the start of the pattern or
//   of a group, `(?=...)`, `(?!...)`, `(?>...)`, anchors `^ $` (line: after/before U+000A), `\A \z \Z \b \B`,
//   quantifiers `? * + {n} {n,} {n,m} {,m}` greedy, lazy (`??` `*?` `+?` `{..}?`) and possessive (`?+ *+ ++`),
//   classes `[...]` / `[^...]` with chars, ranges, escapes and the class escapes below,
//   `\s \S` (White_Space), `\d \D` (GC Nd), `\w \W` (Alphabetic, M, Nd, Pc, and from Oniguruma's Latin-1 table
//   U+00B2 U+00B3 U+00B9 U+00BC-00BE; no Join_Control), `\p{X} \P{X} \p{^X}` with X a general category (L, Lu,
//   Ll, Lt, Lm, Lo, LC, M, Mn, Mc, Me, N, Nd, Nl, No, P.., S.., Z.., C.., or the long names such as Letter or
//   Uppercase_Letter or Combining_Mark; case, spaces, `-` and `_` ignored), escapes
//   `\t \n \r \f \v \a \e \xHH \x{H..} \uHHHH` and backslash + any ASCII punctuation or space.
//   Unicode data: General Category and Alphabetic from Unicode 16.0, White_Space (tokenizers.md §5.1).
// Case-insensitive matching `(?i...)` applies Oniguruma's Unicode case folding to literal chars: an ASCII letter
//   matches both cases, plus U+017F LATIN SMALL LETTER LONG S for s/S and U+212A KELVIN SIGN for k/K (and U+017F and
//   U+212A as pattern chars match those sets); in a class under (?i) each ASCII letter adds the same set. Under (?i)
//   these are errors, because Oniguruma would apply case folding that this engine does not implement: a non-ASCII
//   literal other than U+017F/U+212A, a non-ASCII class member, `\w \W \b \B \p{..} \P{..}` (only `.` and
//   `\s \S \d \D` are allowed), and adjacent literal pairs that a multi-char fold could match (ss, st, ff, fi, fl:
//   `ß`, `ﬆ`, `ﬁ`, ...).
// Also errors: backreferences, lookbehind, named references, \h \R \X \K \G, POSIX brackets, nested classes and
//   `&&`, a `{` that is not a well-formed interval, a quantifier on a quantifier, on an anchor or on a lookahead,
//   a count {n,..} with n >= 2 on a subexpression that can match empty (`*`, `+`, `?`, {0,m}, {1,m} on one are
//   fine: unbounded loops get Oniguruma's empty check), an unbounded quantifier whose body itself holds
//   an unbounded quantifier (exponential backtracking), `{n,m}+` (in Ruby syntax a quantifier on a quantifier, not
//   possessive), counts above 1000, group nesting deeper than 100, programs over 200000 instructions, and options
//   other than i.
//
// Matching is a backtracking VM with an explicit heap stack (no recursion, so long inputs never overflow the C++
// stack); a greedy/lazy/possessive quantifier on a single char class keeps one stack entry for the whole run, so
// the tokenizer patterns run in linear time on long runs of one class (100k chars in about a millisecond).
// Not reproduced: Oniguruma's search optimizations (each start position is a full match attempt, so a pattern that
// scans far and then fails at every position, such as `(?:a|b)*c` on a long a/b run, is quadratic) and its retry
// limit (10M backtracks per match attempt, after which `tokenizers` panics; here such patterns, e.g. `(a|a)*b`,
// just take exponential time). The tokenizer.json patterns are not affected.
// A compiled Regex is immutable and find_all uses no shared mutable state: safe to use from several threads.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace cpuformer::regex {

struct Program;

class Regex {
 public:
  Regex() = default;

  // Compile; on an unsupported or malformed pattern returns false and sets *error (the message names the construct
  // and its char position in the pattern). A pattern that is not valid UTF-8 is an error too.
  static bool compile(const std::string& pattern, Regex* out, std::string* error);

  // All successive non-overlapping leftmost matches in utf8 text, as [begin, end) byte offsets, as the `onig` crate's
  // find_iter yields them (the loop `tokenizers` uses): each search starts where the last match ended; an empty match
  // that ends where the previous match ended is dropped and the search restarts one char further on. Other empty
  // matches are returned (they still split the text). Invalid UTF-8 bytes are each treated as one char U+FFFD.
  // An empty (not compiled) Regex returns nothing.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(const std::string& utf8) const;

  // The same on code points: [begin, end) indices into text.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(const std::u32string& text) const;

  bool valid() const { return program_ != nullptr; }
  const std::string& pattern() const;

 private:
  std::shared_ptr<const Program> program_;
};

}  // namespace cpuformer::regex
