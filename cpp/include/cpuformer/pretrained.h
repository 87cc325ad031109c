// cpuformer/pretrained.h: Hugging Face model directories run by the C++ core, with no Python and no conversion.
//
//   #include "cpuformer/pretrained.h"
//   std::unique_ptr<cpuformer::PretrainedModel> model;
//   cpuformer::Status st = cpuformer::PretrainedModel::load("all-MiniLM-L6-v2/", &model);
//   std::vector<float> hidden;
//   st = model->hidden_states(ids.data(), B, T, mask.data(), nullptr, &hidden);      // (B, T, hidden_size)
//
// A directory holds config.json (model_type, architectures) and model.safetensors, or model.safetensors.index.json
// with its shards. The weights are memory-mapped and used where they lie: float32 tensors are read in place,
// float16 / bfloat16 Linear weights and embedding tables stay 16-bit (converted inside the products), small
// tensors (norms, biases) are converted once. PretrainedOptions::dtype = kFloat32 converts everything at load;
// `weights` packs or quantizes the Linear weights as cpuformer's own models do (LoadOptions).
//
// Families (model_type) and heads (architectures[0]):
//   encoders  bert, roberta, xlm-roberta, distilbert, mpnet: *Model (hidden states; pooler_output when the
//             checkpoint has a pooler), *ForSequenceClassification, *ForTokenClassification,
//             *ForQuestionAnswering (B, T, 2: start, end), *ForMaskedLM
//   decoders  gpt2, llama, mistral, qwen2, qwen3, gemma: *ForCausalLM / GPT2LMHeadModel (logits, generation)
//   seq2seq   marian, bart, t5: *ForConditionalGeneration / MarianMTModel (logits, greedy and beam search)
//   vision    vit: ViTModel, ViTForImageClassification
// Every layer runs through the core's Transformer block (block.h), as cpuformer's own models do. Anything the
// loader does not implement (an unknown model_type, a rope scaling type, a config option that changes the
// computation) is an error Status naming it, never a silently different model. A loaded model is immutable and
// may be called from many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpuformer/model.h"

namespace cpuformer {

struct PretrainedOptions {
  enum DType { kAuto, kFloat32 };
  DType dtype = kAuto;                              // kAuto: 16-bit weights stay 16-bit
  LoadOptions::Weights weights = LoadOptions::kFloat32;  // kPacked / kInt8: prepared Linear weights
  // With 16-bit weights kept 16-bit: their products take the activations rounded to bf16 (PyTorch's bf16
  // precision for those products; norms, attention and the residual stream stay float32). On AMX CPUs one tile
  // product instead of three: about 1.7x faster prompts and batches. Refused when no weight stays 16-bit.
  bool bf16_activations = false;
  // Fine-tuning: every tensor copied into writable float32 parameters (parameters()), gradients on request.
  bool trainable = false;
  // A task head for an encoder (or ViT) checkpoint that has none, as transformers' *For<Task>.from_pretrained:
  // "text-classification", "token-classification", "question-answering" (or "image-classification" for ViT).
  // Its weights are created (N(0, initializer_range), biases zero) and listed by new_parameters(); they are always
  // trainable parameters. num_labels > 0 overrides the config's label count.
  std::string task;
  std::int64_t num_labels = 0;
  std::uint64_t init_seed = 0;
};

struct GenerationOptions {
  std::int64_t max_new_tokens = 20;
  bool do_sample = false;
  float temperature = 1.0f;
  std::int64_t top_k = 0;  // 0: all
  float top_p = 1.0f;
  std::uint64_t seed = 0;
  // Token ids that end a sequence (empty: the model's eos_token_id from generation_config.json / config.json);
  // pad_token_id pads finished rows (-1: the model's, else the first eos).
  std::vector<std::int64_t> eos_token_ids;
  bool no_eos = false;  // never stop early
  std::int64_t pad_token_id = -1;
  // Encoder-decoders: beam search with num_beams > 1, scored as transformers does (sum of log-probabilities
  // divided by length ^ length_penalty).
  std::int64_t num_beams = 1;
  double length_penalty = 1.0;
};

// Fine-tuning: inputs of one training step, and what its forward keeps for backward (owned by the caller).
struct TrainInputs {
  const std::int64_t* ids = nullptr;  // (B, T) text models; the source for encoder-decoders
  std::int64_t B = 0, T = 0;
  const std::int64_t* attention_mask = nullptr;
  const std::int64_t* token_type_ids = nullptr;
  const std::int64_t* decoder_ids = nullptr;  // (B, Td) encoder-decoders
  std::int64_t Td = 0;
  const float* pixels = nullptr;  // (B, C, H, W) vision
  std::int64_t C = 0, H = 0, W = 0;
};
struct TrainOptions {
  bool dropout = true;      // the config's dropout probabilities (hidden, attention) and LoRA's; false: deterministic
  std::uint64_t seed = 0;   // the dropout masks' seed
  bool recompute = false;   // keep only each block's input; recompute its activations during backward
};
class TrainState {
 public:
  TrainState();
  ~TrainState();
  struct Impl;
  std::unique_ptr<Impl> impl;
};

class PretrainedModel {
 public:
  enum class Kind { kEncoder, kDecoder, kSeq2Seq, kVision };
  enum class Head {
    kBase,                    // *Model: hidden states
    kSequenceClassification,  // (B, num_labels)
    kTokenClassification,     // (B, T, num_labels)
    kQuestionAnswering,       // (B, T, 2): start and end logits
    kMaskedLM,                // (B, T, V)
    kCausalLM,                // (B, T, V)
    kSeq2SeqLM,               // (B, T_dec, V)
    kImageClassification,     // (B, num_labels)
  };

  static Status load(const std::string& directory, std::unique_ptr<PretrainedModel>* out,
                     const PretrainedOptions& options = PretrainedOptions());
  virtual ~PretrainedModel();

  Kind kind() const;
  Head head() const;
  const std::string& model_type() const;
  const std::string& architecture() const;
  std::int64_t hidden_size() const;
  std::int64_t vocab_size() const;
  std::int64_t num_labels() const;  // classification heads; 2 for question answering
  bool has_pooler() const;
  // The width of head_output's last axis (labels, 2, or the vocabulary).
  std::int64_t head_width() const;
  // Token id conventions from config.json / generation_config.json (-1 when absent).
  std::int64_t pad_token_id() const;
  std::int64_t decoder_start_token_id() const;
  const std::vector<std::int64_t>& eos_token_ids() const;
  std::int64_t max_positions() const;  // the longest input the position table allows (0: unbounded)
  // Bytes of the memory-mapped weight files, and of the weights the model holds in its own memory.
  std::uint64_t mapped_bytes() const;
  std::uint64_t owned_bytes() const;

  // Text models. ids (B*T); attention_mask (B*T, 1 = token, 0 = padding; null: all tokens); token_type_ids (null:
  // zeros). Encoders: right padding. Decoders: left or right padding; positions count only real tokens (as
  // transformers' generate numbers them), so a padded row equals the unpadded one.
  // The last hidden states (B, T, hidden) of an encoder or decoder stack (decoders: after the final norm).
  Status hidden_states(const std::int64_t* ids, std::int64_t B, std::int64_t T, const std::int64_t* attention_mask,
                       const std::int64_t* token_type_ids, std::vector<float>* out) const;
  // tanh(dense(hidden[:, 0])) (B, hidden), checkpoints with a pooler.
  Status pooler_output(const std::int64_t* ids, std::int64_t B, std::int64_t T, const std::int64_t* attention_mask,
                       const std::int64_t* token_type_ids, std::vector<float>* out) const;
  // The architecture's head on top: classification, token classification, QA, masked or causal LM logits.
  Status head_output(const std::int64_t* ids, std::int64_t B, std::int64_t T, const std::int64_t* attention_mask,
                     const std::int64_t* token_type_ids, std::vector<float>* out) const;
  // Decoders: continue each row (left padding in attention_mask allowed). out (B, T + n) row-major: the input then
  // the new tokens (finished rows padded); *new_tokens = n.
  Status generate(const std::int64_t* ids, std::int64_t B, std::int64_t T, const std::int64_t* attention_mask,
                  const GenerationOptions& options, std::vector<std::int64_t>* out, std::int64_t* new_tokens) const;

  // Encoder-decoders. Logits (B, Td, V) of decoder_ids (B, Td) given the source (B, S).
  Status seq2seq_logits(const std::int64_t* src, std::int64_t B, std::int64_t S, const std::int64_t* src_mask,
                        const std::int64_t* decoder_ids, std::int64_t Td, std::vector<float>* out) const;
  // out (B, L) starting with decoder_start_token_id, finished rows padded with pad; *length = L.
  Status seq2seq_generate(const std::int64_t* src, std::int64_t B, std::int64_t S, const std::int64_t* src_mask,
                          const GenerationOptions& options, std::vector<std::int64_t>* out,
                          std::int64_t* length) const;

  // Vision: pixel_values (B, C, H, W) -> ViTModel: hidden states (B, 1 + patches, hidden); classification: logits.
  Status vision_forward(const float* pixels, std::int64_t B, std::int64_t C, std::int64_t H, std::int64_t W,
                        bool pooled, std::vector<float>* out) const;

  // ---- Fine-tuning (loaded with PretrainedOptions::trainable) ----
  struct Parameter {
    std::string name;                  // as in the checkpoint's files (tied tensors appear once)
    std::vector<std::int64_t> shape;
    float* data = nullptr;             // writable float32
    float* grad = nullptr;             // null: frozen (no gradient work at all)
  };
  std::vector<Parameter> parameters() const;
  // Gives a parameter a zeroed gradient (requires_grad) or frees it (frozen). Buffers, such as Marian/BART's
  // final_logits_bias, are not parameters.
  Status set_requires_grad(const std::string& name, bool requires_grad);
  void zero_grad();
  // The head weights this load created (PretrainedOptions::task), by name.
  std::vector<std::string> new_parameters() const;
  // LoRA (PEFT's layout and initialisation): adapters A (r, in) ~ U(-1/sqrt(in), 1/sqrt(in)), B (out, r) = 0 on
  // every Linear whose module name (the weight's checkpoint name without ".weight") matches `targets` (regex:
  // an ECMAScript full match of one pattern; else PEFT's list rule: the name equals a target or ends with
  // "." + target). y += (alpha / r) B A x, in inference too. The adapters are parameters named
  // "<module>.lora_A.weight" / ".lora_B.weight" that require gradients. `modules` receives the adapted names.
  // `dropout` in [0, 1): PEFT's lora_dropout on each adapter's input, in train_forward only (with
  // TrainOptions::dropout): adapter i (the i-th added, counting earlier add_lora calls) draws its mask from
  // lora_dropout_seed(TrainOptions::seed, i) (linear.h), so a step's masks follow from its seed alone.
  Status add_lora(const std::vector<std::string>& targets, bool regex, std::int64_t r, double alpha, double dropout,
                  std::uint64_t seed, std::vector<std::string>* modules);
  // Folds every adapter into its weight (W += (alpha / r) B A) and removes the adapters; needs float32 weights of
  // the model's own (a trainable load).
  Status merge_lora();
  // The head's output as head_output / seq2seq_logits / vision_forward give it (the last hidden states for *Model
  // heads), with dropout; `state` keeps what backward needs.
  Status train_forward(const TrainInputs& inputs, const TrainOptions& options, TrainState* state,
                       std::vector<float>* out);
  // d(loss)/d(out) -> gradients accumulated (+=) into the parameters that require them.
  Status train_backward(TrainState* state, const float* dout);

  struct Impl;

 private:
  friend class DecoderBatch;
  PretrainedModel();
  std::unique_ptr<Impl> impl_;
};

// Continuous batching for decoders (a server's generation loop): `slots` sequences share decode steps. prefill
// starts a sequence in a slot (its prompt through the model alone, then its keys and values copied into the slot);
// step appends one token to each listed slot, all of them in one batched pass. Both return next-token logits with
// the model's generation rules applied (banned words, min length, no-repeat n-grams, forced eos at the slot's last
// step), so sampling them (TokenSampler) gives what generate() gives. One DecoderBatch is driven by one thread at a
// time; the model it runs may serve other callers meanwhile.
class DecoderBatch {
 public:
  static Status create(std::shared_ptr<const PretrainedModel> model, std::int64_t slots, std::int64_t capacity,
                       std::unique_ptr<DecoderBatch>* out);
  ~DecoderBatch();
  // Starts slot afresh with `prompt` (1 <= size, size + max_new_tokens <= capacity): logits (V).
  Status prefill(std::int64_t slot, const std::vector<std::int64_t>& prompt, std::int64_t max_new_tokens,
                 std::vector<float>* logits);
  // Appends tokens[i] to slots[i] (distinct slots, each prefilled): logits (n, V).
  Status step(const std::vector<std::int64_t>& slots, const std::vector<std::int64_t>& tokens,
              std::vector<float>* logits);
  std::int64_t length(std::int64_t slot) const;  // tokens held (prompt + appended)
  std::int64_t slots() const;
  std::int64_t capacity() const;
  std::int64_t vocab_size() const;

  struct Impl;

 private:
  DecoderBatch();
  std::unique_ptr<Impl> impl_;
};

// The next token from one row of logits: greedy (argmax), or sampling with temperature / top-k / top-p from its own
// seeded generator (one per sequence), exactly as generate() chooses.
class TokenSampler {
 public:
  explicit TokenSampler(const GenerationOptions& options);
  ~TokenSampler();
  std::int64_t next(const float* logits, std::int64_t V);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// sentence-transformers pooling of hidden states (B, T, C) under attention_mask (B, T; null: all tokens): the
// enabled modes concatenated in the order cls, max, mean, mean_sqrt_len, weightedmean, lasttoken (as
// sentence_transformers.models.Pooling), then optionally L2-normalised (e / max(|e|, 1e-12)). out (B, modes * C).
struct PoolingModes {
  bool cls = false, max = false, mean = true, mean_sqrt_len = false, weighted_mean = false, last_token = false;
  bool normalize = false;
  int count() const { return cls + max + mean + mean_sqrt_len + weighted_mean + last_token; }
};
// A sentence-transformers directory's pooling (1_Pooling/config.json), normalisation (a Normalize module in
// modules.json) and max_seq_length (sentence_bert_config.json; 0 when absent). A directory without modules.json
// gets mean pooling, no normalisation. Dense modules and include_prompt=false are errors.
Status read_sentence_config(const std::string& directory, PoolingModes* modes, std::int64_t* max_seq_length);
Status sentence_pooling(const float* hidden, std::int64_t B, std::int64_t T, std::int64_t C,
                        const std::int64_t* attention_mask, const PoolingModes& modes, std::vector<float>* out);

}  // namespace cpuformer
