// model.cpp: Python-free inference for models saved by cpuformer.save(): GPT (logits, KV-cached generation),
// TransformerClassifier (hidden states, logits) and BertModel (hidden states, sentence embeddings).
//
// The forward passes mirror python/cpuformer/models exactly, built from the same kernels (GEMM with fused bias,
// fused attention, fused feed-forward, layer norm), so results agree with Python to float32 rounding.
#include "cpuformer/model.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "cpuformer/activations.h"
#include "cpuformer/attention.h"
#include "cpuformer/embedding.h"
#include "cpuformer/feedforward.h"
#include "cpuformer/layernorm.h"
#include "cpuformer/matmul.h"
#include "json.h"

namespace cpuformer {
namespace {

using Weights = std::map<std::string, Tensor>;

// Reads parameters by state-dict name, checking shapes; the first problem is kept in `status`.
class ParamReader {
 public:
  explicit ParamReader(const Weights& w) : w_(w) {}
  Status status;

  const float* get(const std::string& name, std::vector<std::int64_t> shape, bool optional = false) {
    auto it = w_.find(name);
    if (it == w_.end()) {
      if (!optional && status.ok()) status = Status::error("missing tensor '" + name + "'");
      return nullptr;
    }
    if (it->second.shape != shape && status.ok()) {
      std::string want = "(", got = "(";
      for (auto d : shape) want += std::to_string(d) + ",";
      for (auto d : it->second.shape) got += std::to_string(d) + ",";
      status = Status::error("tensor '" + name + "' has shape " + got + ") but the config implies " + want + ")");
      return nullptr;
    }
    return it->second.data.data();
  }

 private:
  const Weights& w_;
};

// Config values (a flat JSON object), with defaults and range checks.
class Config {
 public:
  explicit Config(const Json& j) : j_(j) {}
  Status status;

  std::int64_t integer(const std::string& key, std::int64_t fallback, std::int64_t lo = 1) {
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return fallback;
    if (v->type != Json::kNumber || v->number != std::floor(v->number) || v->number < lo || v->number > 1e9) {
      if (status.ok()) status = Status::error("config: '" + key + "' must be an integer >= " + std::to_string(lo));
      return fallback;
    }
    return static_cast<std::int64_t>(v->number);
  }
  double number(const std::string& key, double fallback) {
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return fallback;
    if (v->type != Json::kNumber) {
      if (status.ok()) status = Status::error("config: '" + key + "' must be a number");
      return fallback;
    }
    return v->number;
  }
  bool flag(const std::string& key, bool fallback) {
    const Json* v = j_.find(key);
    return v && v->type == Json::kBool ? v->boolean : fallback;
  }
  std::string text(const std::string& key, const std::string& fallback) {
    const Json* v = j_.find(key);
    return v && v->type == Json::kString ? v->str : fallback;
  }

 private:
  const Json& j_;
};

Activation activation_named(const std::string& name, Status* status) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGeluErf;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (status->ok()) *status = Status::error("config: unknown activation '" + name + "'");
  return Activation::kRelu;
}

// ---------------------------------------------------------------------------------------------------------------
// One Transformer encoder layer (the weights of nn.TransformerEncoderLayer), inference only.

struct Block {
  const float *in_w, *in_b, *out_w, *out_b, *l1_w, *l1_b, *l2_w, *l2_b, *n1_w, *n1_b, *n2_w, *n2_b;
  std::int64_t C, F, H;
  bool norm_first;
  Activation act;
  float eps;
};

Block read_block(ParamReader& r, const std::string& p, std::int64_t C, std::int64_t F, std::int64_t H,
                 bool norm_first, Activation act, float eps) {
  Block b{};
  b.in_w = r.get(p + "self_attn.in_proj_weight", {3 * C, C});
  b.in_b = r.get(p + "self_attn.in_proj_bias", {3 * C}, true);
  b.out_w = r.get(p + "self_attn.out_proj.weight", {C, C});
  b.out_b = r.get(p + "self_attn.out_proj.bias", {C}, true);
  b.l1_w = r.get(p + "linear1.weight", {F, C});
  b.l1_b = r.get(p + "linear1.bias", {F}, true);
  b.l2_w = r.get(p + "linear2.weight", {C, F});
  b.l2_b = r.get(p + "linear2.bias", {C}, true);
  b.n1_w = r.get(p + "norm1.weight", {C});
  b.n1_b = r.get(p + "norm1.bias", {C}, true);
  b.n2_w = r.get(p + "norm2.weight", {C});
  b.n2_b = r.get(p + "norm2.bias", {C}, true);
  b.C = C, b.F = F, b.H = H, b.norm_first = norm_first, b.act = act, b.eps = eps;
  if (r.status.ok() && (C % H)) r.status = Status::error("config: hidden size is not divisible by the heads");
  return b;
}

// Scratch buffers reused across layers and calls.
struct Work {
  std::vector<float> h, qkv, att, proj, u, a, ff;
  void reserve(std::int64_t rows, std::int64_t C, std::int64_t F) {
    h.resize(rows * C), qkv.resize(rows * 3 * C), att.resize(rows * C), proj.resize(rows * C);
    u.resize(rows * F), a.resize(rows * F), ff.resize(rows * C);
  }
};

// out = out_proj(attention(qkv(in))) over (B, T) rows; keys are the same rows (self-attention).
void self_attention(const Block& L, const float* in, float* out, std::int64_t B, std::int64_t T,
                    const std::uint8_t* padding, bool causal, Work& w) {
  const std::int64_t C = L.C, rows = B * T;
  sgemm(false, true, rows, 3 * C, C, 1.0f, in, C, L.in_w, C, 0.0f, w.qkv.data(), 3 * C, L.in_b);
  AttentionMask mask;
  mask.key_padding = padding;
  mask.causal = causal;
  const AttentionConfig cfg{B, L.H, T, T, C / L.H, 1.0f / std::sqrt(static_cast<float>(C / L.H))};
  const ConstHeadTensor q{w.qkv.data(), T * 3 * C, 3 * C}, k{w.qkv.data() + C, T * 3 * C, 3 * C},
      v{w.qkv.data() + 2 * C, T * 3 * C, 3 * C};
  attention_forward(HeadTensor{w.att.data(), T * C, C}, nullptr, q, k, v, mask, cfg);
  sgemm(false, true, rows, C, C, 1.0f, w.att.data(), C, L.out_w, C, 0.0f, out, C, L.out_b);
}

void feed_forward(const Block& L, const float* in, float* out, std::int64_t rows, Work& w) {
  feedforward_forward(out, w.u.data(), w.a.data(), in, L.l1_w, L.l1_b, L.l2_w, L.l2_b, rows, L.C, L.F, L.act);
}

void add_into(float* x, const float* y, std::int64_t n) { residual_forward(x, x, y, n); }

// x (B, T, C) in place, as nn.TransformerEncoderLayer.forward (eval mode).
void block_forward(const Block& L, float* x, std::int64_t B, std::int64_t T, const std::uint8_t* padding,
                   bool causal, Work& w) {
  const std::int64_t rows = B * T, n = rows * L.C;
  w.reserve(rows, L.C, L.F);
  if (L.norm_first) {
    layernorm_forward(w.h.data(), nullptr, nullptr, x, L.n1_w, L.n1_b, rows, L.C, L.eps);
    self_attention(L, w.h.data(), w.proj.data(), B, T, padding, causal, w);
    add_into(x, w.proj.data(), n);
    layernorm_forward(w.h.data(), nullptr, nullptr, x, L.n2_w, L.n2_b, rows, L.C, L.eps);
    feed_forward(L, w.h.data(), w.ff.data(), rows, w);
    add_into(x, w.ff.data(), n);
  } else {
    self_attention(L, x, w.proj.data(), B, T, padding, causal, w);
    add_into(w.proj.data(), x, n);
    layernorm_forward(x, nullptr, nullptr, w.proj.data(), L.n1_w, L.n1_b, rows, L.C, L.eps);
    feed_forward(L, x, w.ff.data(), rows, w);
    add_into(w.ff.data(), x, n);
    layernorm_forward(x, nullptr, nullptr, w.ff.data(), L.n2_w, L.n2_b, rows, L.C, L.eps);
  }
}

// The paper's sinusoidal table (same double-precision formula as cpuformer.nn.layers.sinusoidal_table).
std::vector<float> sinusoidal(std::int64_t max_len, std::int64_t d) {
  std::vector<float> pe(static_cast<size_t>(max_len * d), 0.0f);
  for (std::int64_t pos = 0; pos < max_len; ++pos)
    for (std::int64_t i = 0; i < d; i += 2) {
      const double angle = static_cast<double>(pos) * std::exp(static_cast<double>(i) * (-std::log(10000.0) / d));
      pe[pos * d + i] = static_cast<float>(std::sin(angle));
      if (i + 1 < d) pe[pos * d + i + 1] = static_cast<float>(std::cos(angle));
    }
  return pe;
}

Status check_ids(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, std::int64_t vocab) {
  if (B < 1 || T < 1 || static_cast<std::int64_t>(ids.size()) != B * T)
    return Status::error("ids must hold B*T = " + std::to_string(B * T) + " values (B, T >= 1), got " +
                         std::to_string(ids.size()));
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      return Status::error("id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                           " is out of range for a vocabulary of " + std::to_string(vocab));
  return Status();
}

template <class Fn>
Status guarded(Fn&& fn) {  // kernels throw on bad arguments; the runtime API reports a Status instead
  try {
    return fn();
  } catch (const std::exception& e) {
    return Status::error(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------------------

class GptModel : public Model {
 public:
  Weights weights;
  std::vector<Block> blocks;
  const float *wte = nullptr, *wpe = nullptr, *lnf_w = nullptr, *lnf_b = nullptr, *head = nullptr;
  std::vector<float> table;  // sinusoidal positions
  std::int64_t V = 0, block_size = 0, C = 0;
  float eps = 1e-5f;
  Work work;

  std::string kind() const override { return "GPT"; }

  Status init(const Json& cfg_json) {
    Config cfg(cfg_json);
    V = cfg.integer("vocab_size", 0), block_size = cfg.integer("block_size", 128), C = cfg.integer("n_embd", 256);
    const std::int64_t layers = cfg.integer("n_layer", 4), H = cfg.integer("n_head", 4);
    eps = static_cast<float>(cfg.number("layer_norm_eps", 1e-5));
    const bool learned = cfg.text("positional", "learned") == "learned", tied = cfg.flag("tie_weights", true);
    Status st = cfg.status;
    const Activation act = activation_named(cfg.text("activation", "gelu"), &st);
    if (!st.ok()) return st;
    ParamReader r(weights);
    wte = r.get("wte.weight", {V, C});
    if (learned) wpe = r.get("wpe.weight", {block_size, C});
    else table = sinusoidal(block_size, C), wpe = table.data();
    for (std::int64_t i = 0; i < layers; ++i)
      blocks.push_back(read_block(r, "blocks." + std::to_string(i) + ".", C, 4 * C, H, true, act, eps));
    lnf_w = r.get("ln_f.weight", {C});
    lnf_b = r.get("ln_f.bias", {C}, true);
    head = tied ? wte : r.get("lm_head.weight", {V, C});
    hidden_size_ = C;
    return r.status;
  }

  // Hidden states after ln_f for ids (B, T) at positions 0..T-1.
  void hidden(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, std::vector<float>* x) {
    x->resize(static_cast<size_t>(B * T * C));
    embedding_forward(x->data(), ids.data(), wte, B * T, V, C);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t c = 0; c < C; ++c) (*x)[(b * T + t) * C + c] += wpe[t * C + c];
    for (const Block& L : blocks) block_forward(L, x->data(), B, T, nullptr, true, work);
    layernorm_forward(x->data(), nullptr, nullptr, x->data(), lnf_w, lnf_b, B * T, C, eps);
  }

  Status logits(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                std::vector<float>* out) override {
    Status st = check_ids(ids, B, T, V);
    if (!st.ok()) return st;
    if (T > block_size) return Status::error("sequence length exceeds block_size " + std::to_string(block_size));
    return guarded([&] {
      std::vector<float> x;
      hidden(ids, B, T, &x);
      out->resize(static_cast<size_t>(B * T * V));
      sgemm(false, true, B * T, V, C, 1.0f, x.data(), C, head, C, 0.0f, out->data(), V);
      return Status();
    });
  }

  // One step with the key/value cache: tokens ids[0..n) at positions start..start+n-1; returns the last logits.
  void step(const std::int64_t* ids, std::int64_t n, std::int64_t start, std::vector<std::vector<float>>& kc,
            std::vector<std::vector<float>>& vc, std::vector<float>* logits) {
    std::vector<float> x(static_cast<size_t>(n * C));
    embedding_forward(x.data(), ids, wte, n, V, C);
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t c = 0; c < C; ++c) x[t * C + c] += wpe[(start + t) * C + c];
    work.reserve(n, C, 4 * C);
    for (size_t l = 0; l < blocks.size(); ++l) {
      const Block& L = blocks[l];
      layernorm_forward(work.h.data(), nullptr, nullptr, x.data(), L.n1_w, L.n1_b, n, C, eps);
      sgemm(false, true, n, 3 * C, C, 1.0f, work.h.data(), C, L.in_w, C, 0.0f, work.qkv.data(), 3 * C, L.in_b);
      for (std::int64_t t = 0; t < n; ++t) {
        std::copy_n(work.qkv.data() + t * 3 * C + C, C, kc[l].data() + (start + t) * C);
        std::copy_n(work.qkv.data() + t * 3 * C + 2 * C, C, vc[l].data() + (start + t) * C);
      }
      AttentionMask mask;
      mask.causal = n > 1;  // prefill from position 0; single new tokens see the whole cache
      const std::int64_t S = start + n, D = C / L.H;
      const AttentionConfig cfg{1, L.H, n, S, D, 1.0f / std::sqrt(static_cast<float>(D))};
      attention_forward(HeadTensor{work.att.data(), n * C, C}, nullptr, ConstHeadTensor{work.qkv.data(), n * 3 * C, 3 * C},
                        ConstHeadTensor{kc[l].data(), S * C, C}, ConstHeadTensor{vc[l].data(), S * C, C}, mask, cfg);
      sgemm(false, true, n, C, C, 1.0f, work.att.data(), C, L.out_w, C, 0.0f, work.proj.data(), C, L.out_b);
      add_into(x.data(), work.proj.data(), n * C);
      layernorm_forward(work.h.data(), nullptr, nullptr, x.data(), L.n2_w, L.n2_b, n, C, eps);
      feed_forward(L, work.h.data(), work.ff.data(), n, work);
      add_into(x.data(), work.ff.data(), n * C);
    }
    std::vector<float> last(C);
    layernorm_forward(last.data(), nullptr, nullptr, x.data() + (n - 1) * C, lnf_w, lnf_b, 1, C, eps);
    logits->resize(V);
    sgemm(false, true, 1, V, C, 1.0f, last.data(), C, head, C, 0.0f, logits->data(), V);
  }

  Status generate(const std::vector<std::int64_t>& prompt, int max_new_tokens, const GenerateOptions& opts,
                  std::vector<std::int64_t>* out) override {
    Status st = check_ids(prompt, 1, static_cast<std::int64_t>(prompt.size()), V);
    if (!st.ok()) return st;
    if (opts.temperature < 0 || !std::isfinite(opts.temperature)) return Status::error("temperature must be >= 0");
    return guarded([&] {
      *out = prompt;
      std::mt19937_64 rng(opts.seed);
      std::vector<std::vector<float>> kc(blocks.size()), vc(blocks.size());
      std::vector<float> logits;
      std::int64_t cached = 0;  // the cache holds positions 0..cached-1 of `out`
      for (int i = 0; i < max_new_tokens; ++i) {
        const std::int64_t total = static_cast<std::int64_t>(out->size());
        if (total <= block_size && cached == total - 1) {
          step(out->data() + total - 1, 1, total - 1, kc, vc, &logits);  // one new token: O(total) attention
        } else {  // first call, or past the position table: run the last block_size tokens from position 0
          const std::int64_t keep = std::min(total, block_size);
          for (size_t l = 0; l < blocks.size(); ++l)
            kc[l].assign(static_cast<size_t>(block_size * C), 0.0f), vc[l].assign(static_cast<size_t>(block_size * C), 0.0f);
          step(out->data() + total - keep, keep, 0, kc, vc, &logits);
        }
        cached = total <= block_size ? total : -1;
        std::int64_t next = 0;
        if (opts.greedy || opts.temperature == 0.0f) {
          next = std::max_element(logits.begin(), logits.end()) - logits.begin();
        } else {
          std::vector<std::int64_t> order(V);
          for (std::int64_t j = 0; j < V; ++j) order[j] = j;
          const std::int64_t k = opts.top_k > 0 ? std::min<std::int64_t>(opts.top_k, V) : V;
          std::partial_sort(order.begin(), order.begin() + k, order.end(),
                            [&](std::int64_t a, std::int64_t b) { return logits[a] > logits[b]; });
          std::vector<double> p(k);
          const double top = logits[order[0]];
          double sum = 0;
          for (std::int64_t j = 0; j < k; ++j) sum += p[j] = std::exp((logits[order[j]] - top) / opts.temperature);
          double u = std::uniform_real_distribution<double>(0.0, sum)(rng);
          std::int64_t j = 0;
          while (j < k - 1 && u >= p[j]) u -= p[j++];
          next = order[j];
        }
        out->push_back(next);
        if (opts.eos_id >= 0 && next == opts.eos_id) break;
      }
      return Status();
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------

class EncoderModel : public Model {
 public:
  Weights weights;
  std::vector<Block> blocks;
  std::string model_kind;
  Work work;
  // classifier
  const float *emb = nullptr, *cls = nullptr, *pos = nullptr, *norm_w = nullptr, *norm_b = nullptr,
              *head_w = nullptr, *head_b = nullptr;
  std::vector<float> table;
  std::int64_t V = 0, C = 0, classes = 0, max_len = 0, pad_id = 0;
  bool mean_pool = true;
  float eps = 1e-5f;
  // BERT
  const float *pos_emb = nullptr, *type_emb = nullptr, *emb_norm_w = nullptr, *emb_norm_b = nullptr;
  std::int64_t types = 0;

  std::string kind() const override { return model_kind; }

  Status init_classifier(const Json& j) {
    model_kind = "TransformerClassifier";
    Config cfg(j);
    V = cfg.integer("vocab_size", 0), classes = cfg.integer("num_classes", 2), C = cfg.integer("d_model", 128);
    const std::int64_t H = cfg.integer("nhead", 4), layers = cfg.integer("num_layers", 2),
                       F = cfg.integer("dim_feedforward", 512);
    max_len = cfg.integer("max_len", 512), pad_id = cfg.integer("pad_id", 0, 0);
    mean_pool = cfg.text("pooling", "mean") == "mean";
    const bool learned = cfg.text("positional", "sinusoidal") == "learned", norm_first = cfg.flag("norm_first", true);
    if (!cfg.status.ok()) return cfg.status;
    ParamReader r(weights);
    emb = r.get("embedding.weight", {V, C});
    if (!mean_pool) cls = r.get("cls", {C});
    if (learned) pos = r.get("pos.weight", {max_len + 1, C});
    else table = sinusoidal(max_len + 1, C), pos = table.data();
    for (std::int64_t i = 0; i < layers; ++i)
      blocks.push_back(read_block(r, "encoder.layers." + std::to_string(i) + ".", C, F, H, norm_first,
                                  Activation::kGeluErf, 1e-5f));
    if (norm_first) norm_w = r.get("encoder.norm.weight", {C}), norm_b = r.get("encoder.norm.bias", {C}, true);
    head_w = r.get("head.weight", {classes, C});
    head_b = r.get("head.bias", {classes}, true);
    hidden_size_ = C;
    return r.status;
  }

  Status init_bert(const Json& j) {
    model_kind = "BertModel";
    Config cfg(j);
    V = cfg.integer("vocab_size", 0), C = cfg.integer("hidden_size", 768);
    const std::int64_t layers = cfg.integer("num_hidden_layers", 12), H = cfg.integer("num_attention_heads", 12),
                       F = cfg.integer("intermediate_size", 3072);
    max_len = cfg.integer("max_position_embeddings", 512), types = cfg.integer("type_vocab_size", 2);
    eps = static_cast<float>(cfg.number("layer_norm_eps", 1e-12));
    Status st = cfg.status;
    const std::string act_name = cfg.text("hidden_act", "gelu");
    const Activation act = activation_named(act_name == "gelu_new" ? "gelu_tanh" : act_name, &st);
    if (!st.ok()) return st;
    ParamReader r(weights);
    emb = r.get("word_embeddings.weight", {V, C});
    pos_emb = r.get("position_embeddings.weight", {max_len, C});
    type_emb = r.get("token_type_embeddings.weight", {types, C});
    emb_norm_w = r.get("embeddings_norm.weight", {C});
    emb_norm_b = r.get("embeddings_norm.bias", {C}, true);
    for (std::int64_t i = 0; i < layers; ++i)
      blocks.push_back(read_block(r, "layers." + std::to_string(i) + ".", C, F, H, false, act, eps));
    hidden_size_ = C;
    return r.status;
  }

  // Shared encoder pass; padding (B*T) 1 = padding.
  void run_blocks(float* x, std::int64_t B, std::int64_t T, const std::vector<std::uint8_t>& padding) {
    for (const Block& L : blocks) block_forward(L, x, B, T, padding.empty() ? nullptr : padding.data(), false, work);
  }

  Status encode(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                const std::vector<std::int64_t>& attention_mask, std::vector<float>* hidden) override {
    Status st = check_ids(ids, B, T, V);
    if (!st.ok()) return st;
    if (!attention_mask.empty() && static_cast<std::int64_t>(attention_mask.size()) != B * T)
      return Status::error("attention_mask must hold B*T values");
    if (T > max_len) return Status::error("sequence length exceeds " + std::to_string(max_len));
    return guarded([&] {
      std::vector<std::uint8_t> padding;
      if (model_kind == "BertModel") {
        if (!attention_mask.empty()) {
          padding.resize(B * T);
          for (std::int64_t i = 0; i < B * T; ++i) padding[i] = attention_mask[i] == 0;
        }
        hidden->resize(static_cast<size_t>(B * T * C));
        embedding_forward(hidden->data(), ids.data(), emb, B * T, V, C);
        for (std::int64_t i = 0; i < B * T; ++i)  // + position + token type 0
          for (std::int64_t c = 0; c < C; ++c) (*hidden)[i * C + c] += pos_emb[(i % T) * C + c] + type_emb[c];
        layernorm_forward(hidden->data(), nullptr, nullptr, hidden->data(), emb_norm_w, emb_norm_b, B * T, C, eps);
        run_blocks(hidden->data(), B, T, padding);
        return Status();
      }
      // TransformerClassifier: embeddings * sqrt(d) (+ CLS in front), positions, encoder, final norm
      const std::int64_t T2 = mean_pool ? T : T + 1, off = mean_pool ? 0 : 1;
      padding.assign(B * T2, 0);
      hidden->assign(static_cast<size_t>(B * T2 * C), 0.0f);
      std::vector<float> e(static_cast<size_t>(B * T * C));
      embedding_forward(e.data(), ids.data(), emb, B * T, V, C);
      const float scale = std::sqrt(static_cast<float>(C));
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t t = 0; t < T2; ++t) {
          float* row = hidden->data() + (b * T2 + t) * C;
          for (std::int64_t c = 0; c < C; ++c)
            row[c] = (t < off ? cls[c] : e[(b * T + t - off) * C + c] * scale) + pos[t * C + c];
          if (t >= off) padding[b * T2 + t] = ids[b * T + t - off] == pad_id;
        }
      }
      run_blocks(hidden->data(), B, T2, padding);
      if (norm_w) layernorm_forward(hidden->data(), nullptr, nullptr, hidden->data(), norm_w, norm_b, B * T2, C, 1e-5f);
      return Status();
    });
  }

  Status classify(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                  std::vector<float>* logits) override {
    if (model_kind != "TransformerClassifier") return Model::classify(ids, B, T, logits);
    std::vector<float> h;
    Status st = encode(ids, B, T, {}, &h);
    if (!st.ok()) return st;
    return guarded([&] {
      std::vector<float> pooled(static_cast<size_t>(B * C), 0.0f);
      const std::int64_t T2 = mean_pool ? T : T + 1;
      for (std::int64_t b = 0; b < B; ++b) {
        if (!mean_pool) {
          std::copy_n(h.data() + b * T2 * C, C, pooled.data() + b * C);
          continue;
        }
        std::int64_t count = 0;
        for (std::int64_t t = 0; t < T; ++t) count += ids[b * T + t] != pad_id;
        const float w = 1.0f / static_cast<float>(std::max<std::int64_t>(count, 1));
        for (std::int64_t t = 0; t < T; ++t)
          if (ids[b * T + t] != pad_id)
            for (std::int64_t c = 0; c < C; ++c) pooled[b * C + c] += h[(b * T + t) * C + c] * w;
      }
      logits->resize(static_cast<size_t>(B * classes));
      sgemm(false, true, B, classes, C, 1.0f, pooled.data(), C, head_w, C, 0.0f, logits->data(), classes, head_b);
      return Status();
    });
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

Status Model::encode(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, const std::vector<std::int64_t>&,
                     std::vector<float>*) {
  return Status::error(kind() + " has no encoder hidden states (BertModel, TransformerClassifier do)");
}
Status Model::classify(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, std::vector<float>*) {
  return Status::error(kind() + " is not a classifier (TransformerClassifier is)");
}
Status Model::logits(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, std::vector<float>*) {
  return Status::error(kind() + " is not a language model (GPT is)");
}
Status Model::generate(const std::vector<std::int64_t>&, int, const GenerateOptions&, std::vector<std::int64_t>*) {
  return Status::error(kind() + " is not a language model (GPT is)");
}

Status Model::sentence_embeddings(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                                  const std::vector<std::int64_t>& attention_mask, std::vector<float>* embeddings) {
  std::vector<float> h;
  Status st = encode(ids, B, T, attention_mask, &h);
  if (!st.ok()) return st;
  const std::int64_t C = hidden_size_, T2 = static_cast<std::int64_t>(h.size()) / (B * C);
  const std::int64_t off = T2 - T;  // a CLS position in front is not averaged
  embeddings->assign(static_cast<size_t>(B * C), 0.0f);
  for (std::int64_t b = 0; b < B; ++b) {
    double count = 0;
    for (std::int64_t t = 0; t < T; ++t) count += attention_mask.empty() || attention_mask[b * T + t] != 0;
    for (std::int64_t t = 0; t < T; ++t) {
      if (!attention_mask.empty() && attention_mask[b * T + t] == 0) continue;
      for (std::int64_t c = 0; c < C; ++c)
        (*embeddings)[b * C + c] += h[(b * T2 + t + off) * C + c] / static_cast<float>(std::max(count, 1e-9));
    }
  }
  return Status();
}

Status Model::load(const std::string& path, std::unique_ptr<Model>* out) {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> meta;
  Status st = read_safetensors(path, &tensors, &meta);
  if (!st.ok()) return st;
  if (meta["format"] != "cpuformer-model" && meta["format"] != "cpuformer-checkpoint")
    return Status::error(path + ": not a cpuformer model file (metadata format '" + meta["format"] + "')");
  Json config;
  st = parse_json(meta["config"], &config);
  if (!st.ok() || config.type != Json::kObject) return Status::error(path + ": bad model config: " + st.message());
  const std::string& cls = meta["model_class"];
  if (cls == "GPT") {
    auto m = std::make_unique<GptModel>();
    m->weights = std::move(tensors);
    st = m->init(config);
    *out = std::move(m);
  } else if (cls == "TransformerClassifier" || cls == "BertModel") {
    auto m = std::make_unique<EncoderModel>();
    m->weights = std::move(tensors);
    st = cls == "BertModel" ? m->init_bert(config) : m->init_classifier(config);
    *out = std::move(m);
  } else {
    return Status::error(path + ": model class '" + cls + "' is not supported by the C++ runtime "
                         "(GPT, TransformerClassifier, BertModel)");
  }
  if (!st.ok()) {
    out->reset();
    return Status::error(path + ": " + st.message());
  }
  return Status();
}

}  // namespace cpuformer
