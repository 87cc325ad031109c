// cpuformer/model.h: load a cpuformer model file and run inference from C++, with no Python.
//
//   #include "cpuformer/model.h"
//   std::unique_ptr<cpuformer::Model> model;
//   cpuformer::Status st = cpuformer::Model::load("model.safetensors", &model);
//   if (!st.ok()) { std::cerr << st.message() << "\n"; return 1; }
//   std::vector<int64_t> out;
//   st = model->generate({2, 17, 5}, 50, cpuformer::GenerateOptions{}, &out);   // GPT: ids in, ids out
//
// Models: GPT (classic GPT-2 blocks, or the Llama-style options: RMSNorm, rotary or ALiBi positions, gated SiLU,
// grouped-query attention, no biases, an untied head), TransformerClassifier, BertModel and Seq2SeqTransformer
// (greedy and beam-search translation). Every layer runs through the core's Transformer block (block.h), the same
// code Python's layers call, so results equal Python's. LoadOptions prepares every Linear weight once: packed
// float32 (cpuformer.nn.freeze) or int8 (cpuformer.nn.quantize_dynamic), the same kernels as Python's.
//
// Files are the ones cpuformer.save() writes (safetensors: tensors + the model class and its config as JSON in the
// metadata). Every function returns a Status instead of throwing (out of memory included); a malformed file
// (truncated, header past the end, offsets out of bounds or overlapping, unknown dtype, JSON nested deeper than 64
// levels, a config whose sizes disagree with the tensors or exceed the limits below) is an error status, never a
// crash or an out-of-bounds read. The sizes a config implies are checked against the file's tensors before
// anything is allocated, so the memory a load uses is a small multiple of the file's size. Tokenization stays the
// caller's job.
//
// Config limits: sequence lengths (block_size, max_len, max_position_embeddings) <= 2^20; other sizes <= 2^30;
// layer counts equal the layers the tensors hold; vocabulary, hidden and feed-forward sizes equal tensor shapes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace cpuformer {

class Status {
 public:
  Status() = default;
  static Status error(std::string message) {
    Status s;
    s.ok_ = false;
    s.message_ = std::move(message);
    return s;
  }
  // An error because a file or directory does not exist (Python raises FileNotFoundError for it).
  static Status not_found(std::string message) {
    Status s = error(std::move(message));
    s.not_found_ = true;
    return s;
  }
  bool ok() const { return ok_; }
  bool is_not_found() const { return not_found_; }
  const std::string& message() const { return message_; }

 private:
  bool ok_ = true;
  bool not_found_ = false;
  std::string message_;
};

struct GenerateOptions {
  bool greedy = true;        // argmax; otherwise sample from the top_k tokens at `temperature`
  int top_k = 0;             // 0 = all tokens
  float temperature = 1.0f;
  std::uint64_t seed = 0;
  std::int64_t eos_id = -1;  // stop after this token (-1: never)
};

// A float32 tensor from a safetensors file.
struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

// Parse a safetensors file defensively: every offset and size is checked against the file; the outputs (either may
// be null) are written only on success. Tensors are converted to float32 (from F32, F16, BF16 or F64; any other
// dtype is an error). The file is parsed by the same code as SafetensorsMap's (safetensors.h).
Status read_safetensors(const std::string& path, std::map<std::string, Tensor>* tensors,
                        std::map<std::string, std::string>* metadata);
// The same for a file's bytes already in memory (any alignment; the buffer is only read during the call).
Status read_safetensors_buffer(const void* data, std::size_t size, std::map<std::string, Tensor>* tensors,
                               std::map<std::string, std::string>* metadata);

// How a model's Linear weights are held for inference: as read (float32), packed once into the GEMM's panels
// (Python's cpuformer.nn.freeze: the same results as float32 to a few ulp), or int8 per output channel with
// activations quantized per row at run time (Python's cpuformer.nn.quantize_dynamic: the same results).
struct LoadOptions {
  enum Weights { kFloat32, kPacked, kInt8 };
  Weights weights = kFloat32;
};

// A loaded model is immutable: every inference method is const and keeps its scratch per call, so one model may be
// called from any number of threads at once.
class Model {
 public:
  virtual ~Model() = default;
  static Status load(const std::string& path, std::unique_ptr<Model>* out,
                     const LoadOptions& options = LoadOptions());
  // The same from a model file's bytes in memory (the model copies what it needs).
  static Status load_from_buffer(const void* data, std::size_t size, std::unique_ptr<Model>* out,
                                 const LoadOptions& options = LoadOptions());

  // "GPT", "TransformerClassifier", "BertModel" or "Seq2SeqTransformer".
  virtual std::string kind() const = 0;

  // Encoders (BertModel, TransformerClassifier): the last hidden states (B, T, C), row-major. ids (B*T);
  // attention_mask (B*T, 1 = token, 0 = padding) may be empty (the classifier derives it from its pad id).
  // T <= max_len (TransformerClassifier, either pooling) or max_position_embeddings (BertModel), as in Python.
  virtual Status encode(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                        const std::vector<std::int64_t>& attention_mask, std::vector<float>* hidden) const;
  // Mean of the hidden states over the tokens (B, C).
  Status sentence_embeddings(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                             const std::vector<std::int64_t>& attention_mask, std::vector<float>* embeddings) const;
  // TransformerClassifier: class logits (B, num_classes).
  virtual Status classify(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                          std::vector<float>* logits) const;
  // GPT: next-token logits for every position (B, T, vocab); T <= block_size.
  virtual Status logits(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                        std::vector<float>* out) const;
  // GPT: continue one prompt (1 or more ids, any length: past block_size the last block_size ids are used, as in
  // Python) by up to max_new_tokens >= 0 (key/value cache: each new token costs O(T)). top_k >= 0, temperature
  // finite and >= 0 (0 = greedy); anything else is an error status.
  virtual Status generate(const std::vector<std::int64_t>& prompt, int max_new_tokens, const GenerateOptions& opts,
                          std::vector<std::int64_t>* out) const;

  // Seq2SeqTransformer: translate each source row of src_ids (B, S; pad_id marks padding) as Python's
  // translate(src, max_len, beam_size, length_penalty): greedy when beam_size == 1, else beam search with the GNMT
  // length penalty ((5 + length) / 6) ^ length_penalty. The encoder runs once; the decoder extends key/value caches
  // one token per step. out receives B id lists without BOS/EOS. max_len >= 0, 1 <= beam_size < target vocabulary,
  // |length_penalty| <= 10; S and the decoded length are bounded by the config's max_len, as in Python.
  virtual Status translate(const std::vector<std::int64_t>& src_ids, std::int64_t B, std::int64_t S, int max_len,
                           int beam_size, double length_penalty, std::vector<std::vector<std::int64_t>>* out) const;

  std::int64_t hidden_size() const { return hidden_size_; }

 protected:
  std::int64_t hidden_size_ = 0;
};

}  // namespace cpuformer
