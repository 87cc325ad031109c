// cpuformer/tokenizer.h: Hugging Face `tokenizer.json` tokenizers run by the C++ core, with no Python.
//
//   #include "cpuformer/tokenizer.h"
//   std::unique_ptr<cpuformer::Tokenizer> tok;
//   cpuformer::Status st = cpuformer::Tokenizer::from_file("model_dir/tokenizer.json", &tok);
//   if (!st.ok()) { std::cerr << st.message() << "\n"; return 1; }
//   cpuformer::Encoding enc;
//   st = tok->encode("Hello world!", nullptr, /*add_special_tokens=*/true, &enc);   // enc.ids, enc.offsets, ...
//   std::string text;
//   st = tok->decode(enc.ids, /*skip_special_tokens=*/true, &text);
//
// The goal is the same ids, tokens, offsets, masks and decoded text as the `tokenizers` library (0.23) for the
// same file. Supported components (anything else is an error Status naming it, never an approximation):
//   normalizers     BertNormalizer, Lowercase, NFC, NFD, NFKC, NFKD, Strip, Replace, Prepend, Nmt, ByteLevel,
//                   StripAccents, Precompiled (SentencePiece charsmaps, matched per grapheme cluster as the
//                   library does, including its offset shift after a deletion at the very start), Sequence
//   pre-tokenizers  BertPreTokenizer, Whitespace, WhitespaceSplit, Punctuation, Digits, Metaspace, Split, ByteLevel,
//                   CharDelimiterSplit, FixedLength, Sequence (not yet: UnicodeScripts)
//   models          WordPiece, BPE (dropout must be null or 0), Unigram, WordLevel
//   post-processors TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence
//   decoders        WordPiece, ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, BPEDecoder, CTC, Sequence
//   Regex patterns (Split, Replace, ByteLevel's GPT-2 pattern) run on cpuformer's Oniguruma-compatible engine; a
//   construct it does not support is an error when the file is loaded.
//   added tokens    special or not; single_word, lstrip, rstrip, normalized
//   truncation and padding from the file's "truncation"/"padding" fields, or set with set_truncation/set_padding.
//
// Threads: a loaded Tokenizer is immutable; every method except set_truncation/set_padding is const and keeps its
// scratch per call, so one Tokenizer may be used from several threads at once (not while it is being configured).
// Errors: every function returns a Status (a malformed file, a bad argument, invalid UTF-8, an unknown id or out of
// memory); none throws or aborts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpuformer/model.h"  // Status

namespace cpuformer {

// One encoded sequence (or pair). All vectors have the same length.
struct Encoding {
  std::vector<std::int64_t> ids;
  std::vector<std::string> tokens;
  std::vector<std::int64_t> type_ids;
  std::vector<std::int64_t> attention_mask;       // 1 for real tokens, 0 for padding
  std::vector<std::int64_t> special_tokens_mask;  // 1 for tokens the post-processor added and for padding
  std::vector<std::int64_t> word_ids;             // index of the pre-tokenized word, -1 for specials and padding
  std::vector<std::int64_t> sequence_ids;         // 0 (first text), 1 (pair), -1 for specials and padding
  // Offsets into the original text of the token's sequence (for a pair, the second text's tokens are relative to
  // the second text): [start, end) in UTF-8 bytes, and the same in Unicode code points (what Python's
  // `tokenizers` returns). Specials and padding have (0, 0).
  std::vector<std::pair<std::size_t, std::size_t>> offsets;
  std::vector<std::pair<std::size_t, std::size_t>> char_offsets;
  std::size_t size() const { return ids.size(); }
};

enum class Direction { Right, Left };

struct TruncationParams {
  enum class Strategy { LongestFirst, OnlyFirst, OnlySecond };
  std::size_t max_length = 512;
  Strategy strategy = Strategy::LongestFirst;
  Direction direction = Direction::Right;
  // Overflowing windows are not returned, so stride has no effect on the encoding (as in `tokenizers`, it only
  // shapes the overflow). It must be smaller than max_length.
  std::size_t stride = 0;
};

struct PaddingParams {
  bool fixed = false;            // false: pad to the longest in the batch; true: to `length`
  std::size_t length = 0;        // for fixed
  Direction direction = Direction::Right;
  std::size_t pad_to_multiple_of = 0;  // 0 = none
  std::int64_t pad_id = 0;
  std::int64_t pad_type_id = 0;
  std::string pad_token = "[PAD]";
};

class Tokenizer {
 public:
  // Load a tokenizer.json file, or its text.
  static Status from_file(const std::string& path, std::unique_ptr<Tokenizer>* out);
  static Status from_json(const std::string& json_text, std::unique_ptr<Tokenizer>* out);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encode one text (pair == nullptr) or a pair, then truncate, post-process and pad with this tokenizer's
  // settings. Text must be valid UTF-8.
  Status encode(const std::string& text, const std::string* pair, bool add_special_tokens, Encoding* out) const;
  // Encode many texts over threads (cpuformer's thread count); pairs (if non-null) must have texts.size() entries.
  // Padding to the longest is over the whole batch.
  Status encode_batch(const std::vector<std::string>& texts, const std::vector<std::string>* pairs,
                      bool add_special_tokens, std::vector<Encoding>* out) const;
  // The same with explicit truncation and padding (nullptr: none) instead of this tokenizer's own settings.
  Status encode_batch_with(const std::vector<std::string>& texts, const std::vector<std::string>* pairs,
                           bool add_special_tokens, const TruncationParams* truncation,
                           const PaddingParams* padding, std::vector<Encoding>* out) const;

  // ids -> text through the decoder. With skip_special_tokens, special added tokens are left out. An id that is
  // not in the vocabulary is an error (the `tokenizers` library silently drops it).
  Status decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens, std::string* out) const;

  // -1 when the token is not in the vocabulary (added tokens included).
  std::int64_t token_to_id(const std::string& token) const;
  // false when the id is unknown.
  bool id_to_token(std::int64_t id, std::string* out) const;
  // Number of distinct tokens, with or without the added tokens that are not in the model's vocabulary.
  std::size_t vocab_size(bool with_added_tokens = true) const;

  const std::optional<TruncationParams>& truncation() const;
  const std::optional<PaddingParams>& padding() const;
  Status set_truncation(const std::optional<TruncationParams>& params);  // checks stride < max_length
  void set_padding(const std::optional<PaddingParams>& params);

  struct Impl;

 private:
  Tokenizer();
  std::unique_ptr<Impl> impl_;
};

}  // namespace cpuformer
