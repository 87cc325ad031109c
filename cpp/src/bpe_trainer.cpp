// Byte-level BPE trainer (cpuformer/bpe_trainer.h): the `tokenizers` BpeTrainer algorithm, written for cpuformer.
#include "cpuformer/bpe_trainer.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <queue>
#include <sstream>

#include "regex.h"

namespace cpuformer {
namespace {

// GPT-2's pre-tokenizer pattern, as the `tokenizers` ByteLevel pre-tokenizer uses it.
const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

const regex::Regex& gpt2_regex() {
  static const regex::Regex re = [] {
    regex::Regex r;
    std::string error;
    regex::Regex::compile(kGpt2Pattern, &r, &error);  // a fixed, supported pattern: never fails
    return r;
  }();
  return re;
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in order.
std::array<char32_t, 256> byte_level_chars() {
  std::array<char32_t, 256> cp{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    cp[b] = keep ? static_cast<char32_t>(b) : next++;
  }
  return cp;
}

void put_utf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {  // the byte-level chars are all below U+0800; kept general for 3 bytes
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// Strict UTF-8 (as Rust's str): no overlongs, surrogates or code points above U+10FFFF. Returns the byte offset of
// the first invalid sequence, or npos.
std::size_t invalid_utf8_at(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string::npos;
}

void json_string(const std::string& s, std::string* out) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          *out += buf;
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

using PairKey = std::uint64_t;  // (left id << 32) | right id: ordering the keys orders the pairs lexicographically
inline PairKey pair_key(std::uint32_t a, std::uint32_t b) { return (static_cast<PairKey>(a) << 32) | b; }

// A heap entry: a pair, the count it had when pushed, and the words it was seen in (an index into a pool).
struct Entry {
  std::uint64_t count;
  PairKey pair;
  std::uint32_t pos;
};
// std::priority_queue pops the largest: higher count first; equal counts: the smaller pair first.
struct EntryLess {
  bool operator()(const Entry& x, const Entry& y) const {
    if (x.count != y.count) return x.count < y.count;
    return x.pair > y.pair;
  }
};

}  // namespace

Status BpeTrainer::feed(const std::string& text) {
  const std::size_t bad = invalid_utf8_at(text);
  if (bad != std::string::npos)
    return Status::error("BpeTrainer: the text is not valid UTF-8 (byte offset " + std::to_string(bad) + ")");
  // The ByteLevel pre-tokenizer splits with the regex, keeping both the matches and the gaps between them
  // (SplitDelimiterBehavior::Isolated); the pattern can not match empty, so every span is a non-empty word.
  std::size_t last = 0;
  for (const auto& m : gpt2_regex().find_all(text)) {
    if (m.first > last) ++words_[text.substr(last, m.first - last)];
    if (m.second > m.first) ++words_[text.substr(m.first, m.second - m.first)];
    last = m.second;
  }
  if (last < text.size()) ++words_[text.substr(last)];
  return Status();
}

Status BpeTrainer::feed_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::error("BpeTrainer: can not open '" + path + "'");
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return Status::error("BpeTrainer: can not read '" + path + "'");
  const std::size_t bad = invalid_utf8_at(data);
  if (bad != std::string::npos)
    return Status::error("BpeTrainer: '" + path + "' is not valid UTF-8 (byte offset " + std::to_string(bad) + ")");
  // One sequence per line, with its line ending (tokenizers reads files with lines_with_ending).
  std::size_t start = 0;
  std::string line;
  while (start < data.size()) {
    std::size_t nl = data.find('\n', start);
    const std::size_t end = nl == std::string::npos ? data.size() : nl + 1;
    line.assign(data, start, end - start);
    Status st = feed(line);
    if (!st.ok()) return st;
    start = end;
  }
  return Status();
}

Status BpeTrainer::train(BpeTrainResult* out) const {
  for (const std::string& sp : options_.special_tokens) {
    if (sp.empty()) return Status::error("BpeTrainer: a special token is empty");
    if (invalid_utf8_at(sp) != std::string::npos) return Status::error("BpeTrainer: a special token is not valid UTF-8");
  }
  std::unordered_map<std::string, std::uint32_t> word_to_id;
  std::vector<std::string> id_to_word;
  auto add_token = [&](const std::string& s) {
    if (word_to_id.count(s)) return;
    word_to_id.emplace(s, static_cast<std::uint32_t>(id_to_word.size()));
    id_to_word.push_back(s);
  };
  // 1. Special tokens, 2. the byte-level alphabet sorted by code point.
  for (const std::string& sp : options_.special_tokens) add_token(sp);
  const std::array<char32_t, 256> cps = byte_level_chars();
  std::array<char32_t, 256> sorted = cps;
  std::sort(sorted.begin(), sorted.end());
  for (char32_t c : sorted) {
    std::string s;
    put_utf8(c, &s);
    add_token(s);
  }
  std::array<std::uint32_t, 256> byte_id{};
  for (int b = 0; b < 256; ++b) {
    std::string s;
    put_utf8(cps[b], &s);
    byte_id[b] = word_to_id.at(s);
  }

  // 3. Words as symbol ids, 4. pair counts and the words each pair is in.
  std::vector<std::vector<std::uint32_t>> words;
  std::vector<std::int64_t> counts;
  words.reserve(words_.size());
  counts.reserve(words_.size());
  for (const auto& wc : words_) {
    std::vector<std::uint32_t> syms;
    syms.reserve(wc.first.size());
    for (unsigned char b : wc.first) syms.push_back(byte_id[b]);
    words.push_back(std::move(syms));
    counts.push_back(static_cast<std::int64_t>(wc.second));
  }
  std::unordered_map<PairKey, std::int64_t> pair_counts;
  std::unordered_map<PairKey, std::vector<std::uint32_t>> where;  // pair -> words (each once, in order)
  for (std::size_t i = 0; i < words.size(); ++i) {
    const auto& w = words[i];
    for (std::size_t j = 0; j + 1 < w.size(); ++j) {
      const PairKey k = pair_key(w[j], w[j + 1]);
      pair_counts[k] += counts[i];
      auto& v = where[k];
      if (v.empty() || v.back() != i) v.push_back(static_cast<std::uint32_t>(i));
    }
  }

  std::vector<std::vector<std::uint32_t>> pool;  // position sets of the heap entries
  std::vector<std::uint32_t> free_slots;
  std::priority_queue<Entry, std::vector<Entry>, EntryLess> queue;
  auto push_where = [&]() {
    for (auto& pw : where) {
      const std::int64_t c = pair_counts[pw.first];
      if (c <= 0) continue;
      std::uint32_t slot;
      if (!free_slots.empty()) {
        slot = free_slots.back();
        free_slots.pop_back();
      } else {
        slot = static_cast<std::uint32_t>(pool.size());
        pool.emplace_back();
      }
      pool[slot].swap(pw.second);
      queue.push(Entry{static_cast<std::uint64_t>(c), pw.first, slot});
    }
    where.clear();
  };
  push_where();

  // 5. Merges.
  std::vector<PairKey> merges;
  std::vector<std::uint32_t> scratch;
  while (word_to_id.size() < options_.vocab_size && !queue.empty()) {
    Entry top = queue.top();
    queue.pop();
    const std::uint64_t current = static_cast<std::uint64_t>(pair_counts[top.pair]);
    if (top.count != current) {  // stale: push back with the count it has now
      top.count = current;
      queue.push(top);
      continue;
    }
    if (top.count < 1 || options_.min_frequency > top.count) break;

    const std::uint32_t a = static_cast<std::uint32_t>(top.pair >> 32);
    const std::uint32_t b = static_cast<std::uint32_t>(top.pair & 0xFFFFFFFFu);
    const std::string token = id_to_word[a] + id_to_word[b];
    add_token(token);  // no new token if the string is already in the vocab
    const std::uint32_t rep = word_to_id.at(token);
    merges.push_back(top.pair);

    std::vector<std::uint32_t> pos;
    pos.swap(pool[top.pos]);
    free_slots.push_back(top.pos);
    for (std::uint32_t wi : pos) {
      std::vector<std::uint32_t>& w = words[wi];
      const std::size_t n = w.size();
      if (n < 2) continue;
      const std::int64_t cnt = counts[wi];
      auto change = [&](std::uint32_t x, std::uint32_t y, int delta) {
        const PairKey k = pair_key(x, y);
        pair_counts[k] += delta * cnt;
        if (delta > 0) {
          auto& v = where[k];
          if (v.empty() || v.back() != wi) v.push_back(wi);
        }
      };
      // Left to right, non-overlapping, as tokenizers' Word::merge (same changes: the merged pair's own count
      // is not reduced, only its neighbours').
      scratch.clear();
      std::size_t r = 0;
      while (r < n) {
        if (w[r] == a && r + 1 < n && w[r + 1] == b) {
          if (!scratch.empty()) {
            change(scratch.back(), a, -1);
            change(scratch.back(), rep, +1);
          }
          if (r + 2 < n) {
            change(b, w[r + 2], -1);
            change(rep, w[r + 2], +1);
          }
          scratch.push_back(rep);
          r += 2;
        } else {
          scratch.push_back(w[r]);
          ++r;
        }
      }
      if (scratch.size() != n) w.assign(scratch.begin(), scratch.end());
    }
    push_where();
  }

  // The model keeps one rank per pair: a pair merged twice keeps its last rank.
  std::unordered_map<PairKey, std::size_t> last_rank;
  for (std::size_t r = 0; r < merges.size(); ++r) last_rank[merges[r]] = r;
  BpeTrainResult result;
  for (std::size_t r = 0; r < merges.size(); ++r) {
    if (last_rank[merges[r]] != r) continue;
    result.merges.emplace_back(id_to_word[static_cast<std::uint32_t>(merges[r] >> 32)],
                               id_to_word[static_cast<std::uint32_t>(merges[r] & 0xFFFFFFFFu)]);
  }
  for (const std::string& sp : options_.special_tokens) {
    bool seen = false;
    for (const auto& have : result.special_tokens) seen = seen || have.first == sp;
    if (!seen) result.special_tokens.emplace_back(sp, word_to_id.at(sp));
  }
  result.vocab = std::move(id_to_word);
  *out = std::move(result);
  return Status();
}

std::string BpeTrainer::to_json(const BpeTrainResult& result) {
  std::string j;
  j += "{\"version\":\"1.0\",\"truncation\":null,\"padding\":null,\"added_tokens\":[";
  for (std::size_t i = 0; i < result.special_tokens.size(); ++i) {
    if (i) j += ',';
    j += "{\"id\":" + std::to_string(result.special_tokens[i].second) + ",\"content\":";
    json_string(result.special_tokens[i].first, &j);
    j += ",\"single_word\":false,\"lstrip\":false,\"rstrip\":false,\"normalized\":false,\"special\":true}";
  }
  const std::string byte_level = "{\"type\":\"ByteLevel\",\"add_prefix_space\":";
  const std::string rest = ",\"trim_offsets\":true,\"use_regex\":true}";
  j += "],\"normalizer\":null,\"pre_tokenizer\":" + byte_level + "false" + rest;
  j += ",\"post_processor\":" + byte_level + "true" + rest;
  j += ",\"decoder\":" + byte_level + "true" + rest;
  j += ",\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,\"continuing_subword_prefix\":null,"
       "\"end_of_word_suffix\":null,\"fuse_unk\":false,\"byte_fallback\":false,\"ignore_merges\":false,\"vocab\":{";
  for (std::size_t i = 0; i < result.vocab.size(); ++i) {
    if (i) j += ',';
    json_string(result.vocab[i], &j);
    j += ':' + std::to_string(i);
  }
  j += "},\"merges\":[";
  for (std::size_t i = 0; i < result.merges.size(); ++i) {
    if (i) j += ',';
    j += '[';
    json_string(result.merges[i].first, &j);
    j += ',';
    json_string(result.merges[i].second, &j);
    j += ']';
  }
  j += "]}}";
  return j;
}

}  // namespace cpuformer
