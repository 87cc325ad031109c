// fuzz_tokenizer_json.cpp: a coverage-guided (libFuzzer) target for tokenizer.json files. Each input is a whole
// file's text: the JSON parser, every component's reader (Tokenizer::from_json) and, when a file loads, encoding and
// decoding of a few texts (ASCII, accents, CJK, emoji, whitespace runs, added-token-like brackets, and the input's
// own first bytes when they are valid UTF-8), so that whatever the file declares also runs through the pipeline.
// Any crash, sanitizer report, leak or self-contradicting result is a finding; error statuses are expected.
//
// Build as fuzz_model_file.cpp says (CPUFORMER_BUILD_FUZZERS, clang); seeds: small tokenizer.json files of every
// model kind, written by `python cpp/fuzz/make_tokenizer_seeds.py DIR` (needs the `tokenizers` package). Long run:
//   build-fuzz/cpuformer_fuzz_tokenizer_json -dict=cpp/fuzz/tokenizer_json.dict -max_len=65536 -timeout=10 \
//     -rss_limit_mb=2048 -max_total_time=3600 -jobs=2 -workers=2 tokenizer-corpus
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cpuformer/tokenizer.h"

namespace {

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_tokenizer_json: %s\n", what);
    std::abort();
  }
}

// An encoding's vectors all have one length, and its offsets lie inside the text they index.
void check(const cpuformer::Encoding& e, std::size_t text_bytes, std::size_t pair_bytes) {
  const std::size_t n = e.ids.size();
  expect(e.tokens.size() == n && e.type_ids.size() == n && e.attention_mask.size() == n &&
             e.special_tokens_mask.size() == n && e.offsets.size() == n && e.char_offsets.size() == n,
         "encoding vectors of different lengths");
  for (std::size_t i = 0; i < n; ++i) {
    const auto [b, end] = e.offsets[i];
    expect(b <= end && end <= std::max(text_bytes, pair_bytes), "offsets outside the text");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string json(reinterpret_cast<const char*>(data), size);
  std::unique_ptr<cpuformer::Tokenizer> tok;
  const cpuformer::Status st = cpuformer::Tokenizer::from_json(json, &tok);
  expect(st.ok() == static_cast<bool>(tok), "load status and tokenizer disagree");
  expect(st.ok() || !st.message().empty(), "an error without a message");
  if (!tok) return 0;
  std::vector<std::string> texts = {"", "Hello, world!", "  Two  spaces\tand\nlines ",
                                    "Caf\xc3\xa9 na\xc3\xafve \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80\xe2\x80\x8d!",
                                    "[CLS] <s> [MASK] </s> <unk> x"};
  texts.push_back(json.substr(0, 64));  // may be invalid UTF-8: then an error status, which is fine
  for (const std::string& text : texts) {
    cpuformer::Encoding enc;
    if (!tok->encode(text, nullptr, true, &enc).ok()) continue;
    check(enc, text.size(), 0);
    std::string decoded;
    (void)tok->decode(enc.ids, true, &decoded);
    (void)tok->decode(enc.ids, false, &decoded);
    const std::string pair = "and a pair";
    if (tok->encode(text, &pair, true, &enc).ok()) check(enc, text.size(), pair.size());
  }
  std::vector<cpuformer::Encoding> batch;
  if (tok->encode_batch(texts, nullptr, true, &batch).ok()) expect(batch.size() == texts.size(), "batch size");
  std::string token;
  (void)tok->id_to_token(0, &token);
  (void)tok->id_to_token(-1, &token);
  (void)tok->token_to_id("[UNK]");
  return 0;
}
