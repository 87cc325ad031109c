// cpuformer/bpe_trainer.h: byte-level BPE training that writes a `tokenizer.json` (issue 13).
//
//   cpuformer::BpeTrainerOptions opt;
//   opt.vocab_size = 5000; opt.min_frequency = 2; opt.special_tokens = {"<pad>", "<unk>"};
//   cpuformer::BpeTrainer trainer(opt);
//   cpuformer::Status st = trainer.feed_file("corpus.txt");      // or trainer.feed(text) per sequence
//   cpuformer::BpeTrainResult result;
//   if (st.ok()) st = trainer.train(&result);
//   std::string json = cpuformer::BpeTrainer::to_json(result);   // GPT-2 layout tokenizer.json
//
// The goal is the same vocab and merges as the `tokenizers` library (0.23) trained with
//   Tokenizer(BPE()), pre_tokenizers.ByteLevel(add_prefix_space=False),
//   trainers.BpeTrainer(vocab_size, min_frequency, special_tokens, initial_alphabet=ByteLevel.alphabet())
// (what `ByteLevelBPETokenizer().train(...)` does), fed the same sequences:
//   - words: the GPT-2 regex split of each sequence (matches and the gaps between them), counted over the corpus;
//     feed_file feeds each line of a file with its line ending, as `Tokenizer.train(files)` does;
//   - vocab: the special tokens in order (duplicates once), then the 256 byte-level chars sorted by code point
//     (a char equal to a special token is not added again), then one token per merge;
//   - merges: the pair with the highest count first; equal counts: the smaller (left id, right id) first; counts are
//     updated incrementally exactly as `tokenizers`' trainer does (a max-heap of pairs with lazily refreshed
//     counts and the words each pair occurs in), including its quirks (a merge whose result string is already in
//     the vocab adds no token); training stops when the vocab has vocab_size tokens, when no pair is left, or when
//     the best pair's count is below min_frequency (and always below 1).
// Not supported (the options do not exist): limit_alphabet, continuing_subword_prefix, end_of_word_suffix,
// max_token_length, dropout.
// Errors: Status (invalid UTF-8 in a file or text, an unreadable file, an empty special token); none throws.
// Single-threaded; a BpeTrainer is not safe to feed from several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpuformer/model.h"  // Status

namespace cpuformer {

struct BpeTrainerOptions {
  std::size_t vocab_size = 8000;              // including special tokens and the 256-char alphabet
  std::uint64_t min_frequency = 2;            // a pair is merged only if it occurs at least this often
  std::vector<std::string> special_tokens;    // first in the vocab, added as special added tokens
};

struct BpeTrainResult {
  std::vector<std::string> vocab;                              // token (byte-level chars) by id
  std::vector<std::pair<std::string, std::string>> merges;     // in rank order
  std::vector<std::pair<std::string, std::size_t>> special_tokens;  // (content, id), duplicates removed
};

class BpeTrainer {
 public:
  explicit BpeTrainer(BpeTrainerOptions options) : options_(std::move(options)) {}

  // Count the words of one sequence (UTF-8; invalid UTF-8 is an error and counts nothing).
  Status feed(const std::string& text);
  // Count the words of every line of a file (each line with its "\n"); invalid UTF-8 is an error naming the file.
  Status feed_file(const std::string& path);

  // Train on everything fed so far (the trainer can be fed more and trained again).
  Status train(BpeTrainResult* out) const;

  // The trained tokenizer as `tokenizer.json` text: ByteLevel pre-tokenizer (add_prefix_space false), BPE model,
  // ByteLevel post-processor and decoder, special tokens as special added tokens.
  static std::string to_json(const BpeTrainResult& result);

  // Distinct words counted so far (raw UTF-8, before the byte-level mapping).
  std::size_t num_words() const { return words_.size(); }

 private:
  BpeTrainerOptions options_;
  std::unordered_map<std::string, std::uint64_t> words_;
};

}  // namespace cpuformer
