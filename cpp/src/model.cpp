// model.cpp: Python-free inference for models saved by cpuformer.save(): GPT (logits, KV-cached generation),
// TransformerClassifier (hidden states, logits) and BertModel (hidden states, sentence embeddings).
//
// The forward passes mirror python/cpuformer/models exactly, built from the same kernels (GEMM with fused bias,
// fused attention, fused feed-forward, layer norm), so results agree with Python to float32 rounding.
#include "cpuformer/model.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <random>
#include <set>

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

// Limits on config values. Lengths size position tables and caches; other sizes must also match tensor shapes,
// and the cap keeps every product of two of them (3*C*C, F*C) well inside int64.
constexpr std::int64_t kMaxLength = std::int64_t{1} << 20;
constexpr std::int64_t kMaxSize = std::int64_t{1} << 30;

// The model config (a JSON object; cpuformer.save writes every key). Integers must be present and whole, within
// [lo, hi]; numbers, flags and strings take their default when absent but must have their type when present. The
// first problem is kept in `status` (the values returned after one are placeholders, not to be used).
class Config {
 public:
  explicit Config(const Json& j) : j_(j) {}
  Status status;

  std::int64_t integer(const std::string& key, std::int64_t lo, std::int64_t hi) {
    const Json* v = j_.find(key);
    if (!v || v->type != Json::kNumber || v->number != std::floor(v->number) || v->number < static_cast<double>(lo) ||
        v->number > static_cast<double>(hi)) {
      error("'" + key + "' must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
      return lo;
    }
    return static_cast<std::int64_t>(v->number);
  }
  double number(const std::string& key, double fallback) {  // finite and >= 0 (layer-norm epsilons)
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return fallback;
    if (v->type != Json::kNumber || !(v->number >= 0) || v->number > 1.0) {
      error("'" + key + "' must be a number in [0, 1]");
      return fallback;
    }
    return v->number;
  }
  bool flag(const std::string& key, bool fallback) {
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return fallback;
    if (v->type != Json::kBool) error("'" + key + "' must be true or false");
    return v->boolean;
  }
  // One of `choices` (the first is the default).
  std::string choice(const std::string& key, const std::vector<std::string>& choices) {
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return choices[0];
    if (v->type == Json::kString && std::find(choices.begin(), choices.end(), v->str) != choices.end()) return v->str;
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "'" : ", '") + c + "'";
    error("'" + key + "' must be one of " + list);
    return choices[0];
  }
  void error(const std::string& what) {
    if (status.ok()) status = Status::error("config: " + what);
  }

 private:
  const Json& j_;
};

// How many layers the tensors hold: names prefix + "<i>." for i = 0..n-1, without gaps. A config's layer count
// must equal it, so a huge count is an error at once rather than a long loop.
Status layer_count(const Weights& w, const std::string& prefix, std::int64_t* n) {
  std::set<std::int64_t> seen;
  for (const auto& kv : w) {
    const std::string& name = kv.first;
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    size_t i = prefix.size();
    std::int64_t index = 0;
    while (i < name.size() && name[i] >= '0' && name[i] <= '9' && index <= kMaxSize)
      index = index * 10 + (name[i++] - '0');
    if (i == prefix.size() || i >= name.size() || name[i] != '.')
      return Status::error("unexpected tensor " + quoted(name) + " (layer tensors are " + prefix + "<index>.<name>)");
    seen.insert(index);
  }
  *n = static_cast<std::int64_t>(seen.size());
  if (!seen.empty() && *seen.rbegin() != *n - 1)
    return Status::error("the layer tensors " + prefix + "<index>.* skip an index (highest " +
                         std::to_string(*seen.rbegin()) + ", " + std::to_string(*n) + " layers)");
  return Status();
}

// Checks a config's layer count against the tensors.
Status check_layers(const Weights& w, const std::string& prefix, const std::string& key, std::int64_t layers) {
  std::int64_t n = 0;
  Status st = layer_count(w, prefix, &n);
  if (st.ok() && n != layers)
    st = Status::error("config: '" + key + "' is " + std::to_string(layers) + " but the file holds " +
                       std::to_string(n) + " layers");
  return st;
}

// A config's activation name (values Config::choice has already checked) as a kernel activation.
Activation activation_named(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGeluErf;
  return Activation::kGeluTanh;  // gelu_tanh, and Hugging Face's gelu_new / gelu_pytorch_tanh
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

// Scratch buffers reused across the layers of one call. Each call owns its own (never a member of the model), so
// one loaded model can serve many threads at once.
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

// Rows [start, start + n) of the paper's sinusoidal position table, width d (the same double-precision formula as
// cpuformer.nn.layers.sinusoidal_table). Computed per call: the model keeps no table, so concurrent calls share
// nothing mutable and a config's maximum length alone allocates nothing.
std::vector<float> sinusoidal_rows(std::int64_t start, std::int64_t n, std::int64_t d) {
  std::vector<float> pe(static_cast<size_t>(n * d));
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t i = 0; i < d; i += 2) {
      const double angle =
          static_cast<double>(start + t) * std::exp(static_cast<double>(i) * (-std::log(10000.0) / d));
      pe[t * d + i] = static_cast<float>(std::sin(angle));
      if (i + 1 < d) pe[t * d + i + 1] = static_cast<float>(std::cos(angle));
    }
  return pe;
}

// ids must hold B*T values (B, T >= 1), each in [0, vocab). Written so that B*T cannot overflow.
Status check_ids(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, std::int64_t vocab) {
  const auto n = static_cast<std::int64_t>(ids.size());
  if (B < 1 || T < 1 || B > n / T || B * T != n)
    return Status::error("ids must hold B*T values with B, T >= 1 (B " + std::to_string(B) + ", T " +
                         std::to_string(T) + ", " + std::to_string(n) + " ids)");
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      return Status::error("id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                           " is out of range for a vocabulary of " + std::to_string(vocab));
  return Status();
}

// Rows * width must fit in memory's address range (the caller's ids bound the rows, the tensors the width).
Status check_output_size(std::int64_t rows, std::int64_t width) {
  if (rows > (std::int64_t{1} << 40) / width) return Status::error("the output would be too large");
  return Status();
}

// Kernels throw on bad arguments and allocations may fail: the runtime API reports a Status instead.
template <class Fn>
Status no_throw(Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Status::error("out of memory");
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
  std::int64_t V = 0, block_size = 0, C = 0;
  float eps = 1e-5f;

  std::string kind() const override { return "GPT"; }

  Status init(const Json& cfg_json) {
    Config cfg(cfg_json);
    V = cfg.integer("vocab_size", 1, kMaxSize), block_size = cfg.integer("block_size", 1, kMaxLength);
    C = cfg.integer("n_embd", 1, kMaxSize);
    const std::int64_t layers = cfg.integer("n_layer", 0, kMaxSize), H = cfg.integer("n_head", 1, kMaxSize);
    eps = static_cast<float>(cfg.number("layer_norm_eps", 1e-5));
    const bool learned = cfg.choice("positional", {"learned", "sinusoidal"}) == "learned";
    const bool tied = cfg.flag("tie_weights", true);
    const Activation act = activation_named(cfg.choice("activation", {"gelu", "gelu_tanh", "relu"}));
    if (!cfg.status.ok()) return cfg.status;
    Status st = check_layers(weights, "blocks.", "n_layer", layers);
    if (!st.ok()) return st;
    ParamReader r(weights);
    wte = r.get("wte.weight", {V, C});
    if (learned) wpe = r.get("wpe.weight", {block_size, C});
    for (std::int64_t i = 0; i < layers && r.status.ok(); ++i)
      blocks.push_back(read_block(r, "blocks." + std::to_string(i) + ".", C, 4 * C, H, true, act, eps));
    lnf_w = r.get("ln_f.weight", {C});
    lnf_b = r.get("ln_f.bias", {C}, true);
    head = tied ? wte : r.get("lm_head.weight", {V, C});
    hidden_size_ = C;
    return r.status;
  }

  // Position rows start..start+n-1 (<= block_size): the learned table's, or sinusoidal rows computed into buf.
  const float* positions(std::int64_t start, std::int64_t n, std::vector<float>* buf) const {
    if (wpe) return wpe + start * C;
    *buf = sinusoidal_rows(start, n, C);
    return buf->data();
  }

  // Hidden states after ln_f for ids (B, T) at positions 0..T-1.
  void hidden(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, std::vector<float>* x) const {
    x->resize(static_cast<size_t>(B * T * C));
    embedding_forward(x->data(), ids.data(), wte, B * T, V, C);
    std::vector<float> buf;
    const float* pe = positions(0, T, &buf);
    Work work;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t c = 0; c < C; ++c) (*x)[(b * T + t) * C + c] += pe[t * C + c];
    for (const Block& L : blocks) block_forward(L, x->data(), B, T, nullptr, true, work);
    layernorm_forward(x->data(), nullptr, nullptr, x->data(), lnf_w, lnf_b, B * T, C, eps);
  }

  Status logits(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                std::vector<float>* out) const override {
    if (!out) return Status::error("logits: null output");
    Status st = check_ids(ids, B, T, V);
    if (st.ok() && T > block_size)
      st = Status::error("sequence length " + std::to_string(T) + " exceeds block_size " + std::to_string(block_size));
    if (st.ok()) st = check_output_size(B * T, V);
    if (!st.ok()) return st;
    return no_throw([&] {
      std::vector<float> x, y(static_cast<size_t>(B * T * V));
      hidden(ids, B, T, &x);
      sgemm(false, true, B * T, V, C, 1.0f, x.data(), C, head, C, 0.0f, y.data(), V);
      out->swap(y);
      return Status();
    });
  }

  // One step with the key/value cache: tokens ids[0..n) at positions start..start+n-1; returns the last logits.
  // The caches hold at least start+n positions.
  void step(const std::int64_t* ids, std::int64_t n, std::int64_t start, std::vector<std::vector<float>>& kc,
            std::vector<std::vector<float>>& vc, Work& work, std::vector<float>* logits) const {
    std::vector<float> x(static_cast<size_t>(n * C)), buf;
    embedding_forward(x.data(), ids, wte, n, V, C);
    const float* pe = positions(start, n, &buf);
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t c = 0; c < C; ++c) x[t * C + c] += pe[t * C + c];
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

  // The next token from the last position's logits. Non-finite logits (from non-finite weights) never index out
  // of range: NaN ranks lowest, and a distribution that does not sum to a positive finite number falls back to
  // the top-ranked token.
  std::int64_t pick(const std::vector<float>& logits, const GenerateOptions& opts, std::mt19937_64& rng) const {
    const auto score = [&](std::int64_t j) { return std::isnan(logits[j]) ? -INFINITY : logits[j]; };
    const auto better = [&](std::int64_t a, std::int64_t b) {
      return score(a) > score(b) || (score(a) == score(b) && a < b);
    };
    if (opts.greedy || opts.temperature == 0.0f) {
      std::int64_t best = 0;
      for (std::int64_t j = 1; j < V; ++j)
        if (better(j, best)) best = j;
      return best;
    }
    std::vector<std::int64_t> order(V);
    for (std::int64_t j = 0; j < V; ++j) order[j] = j;
    const std::int64_t k = opts.top_k > 0 ? std::min<std::int64_t>(opts.top_k, V) : V;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
    std::vector<double> p(k);
    const double top = score(order[0]);
    double sum = 0;
    for (std::int64_t j = 0; j < k; ++j) sum += p[j] = std::exp((score(order[j]) - top) / opts.temperature);
    if (!(sum > 0) || !std::isfinite(sum)) return order[0];
    double u = std::uniform_real_distribution<double>(0.0, sum)(rng);
    std::int64_t j = 0;
    while (j < k - 1 && u >= p[j]) u -= p[j++];
    return order[j];
  }

  Status generate(const std::vector<std::int64_t>& prompt, int max_new_tokens, const GenerateOptions& opts,
                  std::vector<std::int64_t>* out) const override {
    if (!out) return Status::error("generate: null output");
    if (prompt.empty()) return Status::error("generate: the prompt is empty (it needs at least one id)");
    Status st = check_ids(prompt, 1, static_cast<std::int64_t>(prompt.size()), V);
    if (!st.ok()) return st;
    if (max_new_tokens < 0) return Status::error("generate: max_new_tokens must be >= 0");
    if (opts.top_k < 0) return Status::error("generate: top_k must be >= 0");
    if (!(opts.temperature >= 0) || !std::isfinite(opts.temperature))
      return Status::error("generate: temperature must be a finite number >= 0");
    return no_throw([&] {
      std::vector<std::int64_t> ids = prompt;
      std::mt19937_64 rng(opts.seed);
      // The cache holds positions 0..window-1: never more than block_size, nor than this call can reach.
      const std::int64_t window =
          std::min<std::int64_t>(block_size, static_cast<std::int64_t>(prompt.size()) + max_new_tokens);
      std::vector<std::vector<float>> kc(blocks.size()), vc(blocks.size());
      std::vector<float> logits;
      Work work;
      std::int64_t cached = -1;  // the cache holds positions 0..cached-1 of `ids`; -1: nothing cached yet
      for (int i = 0; i < max_new_tokens; ++i) {
        const std::int64_t total = static_cast<std::int64_t>(ids.size());
        if (total <= block_size && cached == total - 1) {
          step(ids.data() + total - 1, 1, total - 1, kc, vc, work, &logits);  // one new token: O(total) attention
        } else {  // first step, or past the position table: run the last block_size tokens from position 0
          const std::int64_t keep = std::min(total, block_size);
          for (size_t l = 0; l < blocks.size(); ++l)
            kc[l].assign(static_cast<size_t>(window * C), 0.0f), vc[l].assign(static_cast<size_t>(window * C), 0.0f);
          step(ids.data() + total - keep, keep, 0, kc, vc, work, &logits);
        }
        cached = total <= block_size ? total : -1;
        const std::int64_t next = pick(logits, opts, rng);
        ids.push_back(next);
        if (opts.eos_id >= 0 && next == opts.eos_id) break;
      }
      out->swap(ids);
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
  // classifier
  const float *emb = nullptr, *cls = nullptr, *pos = nullptr, *norm_w = nullptr, *norm_b = nullptr,
              *head_w = nullptr, *head_b = nullptr;
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
    V = cfg.integer("vocab_size", 1, kMaxSize), classes = cfg.integer("num_classes", 1, kMaxSize);
    C = cfg.integer("d_model", 1, kMaxSize);
    const std::int64_t H = cfg.integer("nhead", 1, kMaxSize), layers = cfg.integer("num_layers", 0, kMaxSize),
                       F = cfg.integer("dim_feedforward", 1, kMaxSize);
    max_len = cfg.integer("max_len", 1, kMaxLength), pad_id = cfg.integer("pad_id", 0, V - 1);
    mean_pool = cfg.choice("pooling", {"mean", "cls"}) == "mean";
    const bool learned = cfg.choice("positional", {"sinusoidal", "learned"}) == "learned";
    const bool norm_first = cfg.flag("norm_first", true);
    if (!cfg.status.ok()) return cfg.status;
    Status st = check_layers(weights, "encoder.layers.", "num_layers", layers);
    if (!st.ok()) return st;
    ParamReader r(weights);
    emb = r.get("embedding.weight", {V, C});
    if (!mean_pool) cls = r.get("cls", {C});
    if (learned) pos = r.get("pos.weight", {max_len + 1, C});
    for (std::int64_t i = 0; i < layers && r.status.ok(); ++i)
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
    V = cfg.integer("vocab_size", 1, kMaxSize), C = cfg.integer("hidden_size", 1, kMaxSize);
    const std::int64_t layers = cfg.integer("num_hidden_layers", 0, kMaxSize),
                       H = cfg.integer("num_attention_heads", 1, kMaxSize),
                       F = cfg.integer("intermediate_size", 1, kMaxSize);
    max_len = cfg.integer("max_position_embeddings", 1, kMaxLength);
    types = cfg.integer("type_vocab_size", 1, kMaxSize);
    eps = static_cast<float>(cfg.number("layer_norm_eps", 1e-12));
    const Activation act =
        activation_named(cfg.choice("hidden_act", {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu"}));
    if (!cfg.status.ok()) return cfg.status;
    Status st = check_layers(weights, "layers.", "num_hidden_layers", layers);
    if (!st.ok()) return st;
    ParamReader r(weights);
    emb = r.get("word_embeddings.weight", {V, C});
    pos_emb = r.get("position_embeddings.weight", {max_len, C});
    type_emb = r.get("token_type_embeddings.weight", {types, C});
    emb_norm_w = r.get("embeddings_norm.weight", {C});
    emb_norm_b = r.get("embeddings_norm.bias", {C}, true);
    for (std::int64_t i = 0; i < layers && r.status.ok(); ++i)
      blocks.push_back(read_block(r, "layers." + std::to_string(i) + ".", C, F, H, false, act, eps));
    hidden_size_ = C;
    return r.status;
  }

  // Shared encoder pass; padding (B*T) 1 = padding.
  void run_blocks(float* x, std::int64_t B, std::int64_t T, const std::vector<std::uint8_t>& padding) const {
    Work work;
    for (const Block& L : blocks) block_forward(L, x, B, T, padding.empty() ? nullptr : padding.data(), false, work);
  }

  Status encode(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                const std::vector<std::int64_t>& attention_mask, std::vector<float>* hidden) const override {
    if (!hidden) return Status::error("encode: null output");
    Status st = check_ids(ids, B, T, V);
    if (!st.ok()) return st;
    if (!attention_mask.empty() && static_cast<std::int64_t>(attention_mask.size()) != B * T)
      return Status::error("attention_mask must hold B*T values");
    // One rule for both models and both poolings, the same as Python's: at most max_len tokens per row (the
    // classifier's position table has max_len + 1 rows, the extra one for a CLS position in front).
    if (T > max_len)
      return Status::error("sequence length " + std::to_string(T) + " exceeds " +
                           (model_kind == "BertModel" ? "max_position_embeddings " : "max_len ") +
                           std::to_string(max_len));
    st = check_output_size(B * (T + 1), C);
    if (!st.ok()) return st;
    return no_throw([&] {
      std::vector<std::uint8_t> padding;
      std::vector<float> x;
      if (model_kind == "BertModel") {
        if (!attention_mask.empty()) {
          padding.resize(B * T);
          for (std::int64_t i = 0; i < B * T; ++i) padding[i] = attention_mask[i] == 0;
        }
        x.resize(static_cast<size_t>(B * T * C));
        embedding_forward(x.data(), ids.data(), emb, B * T, V, C);
        for (std::int64_t i = 0; i < B * T; ++i)  // + position + token type 0
          for (std::int64_t c = 0; c < C; ++c) x[i * C + c] += pos_emb[(i % T) * C + c] + type_emb[c];
        layernorm_forward(x.data(), nullptr, nullptr, x.data(), emb_norm_w, emb_norm_b, B * T, C, eps);
        run_blocks(x.data(), B, T, padding);
        hidden->swap(x);
        return Status();
      }
      // TransformerClassifier: embeddings * sqrt(d) (+ CLS in front), positions, encoder, final norm
      const std::int64_t T2 = mean_pool ? T : T + 1, off = mean_pool ? 0 : 1;
      padding.assign(B * T2, 0);
      x.assign(static_cast<size_t>(B * T2 * C), 0.0f);
      std::vector<float> e(static_cast<size_t>(B * T * C));
      embedding_forward(e.data(), ids.data(), emb, B * T, V, C);
      const float scale = std::sqrt(static_cast<float>(C));
      const std::vector<float> sinusoidal = pos ? std::vector<float>() : sinusoidal_rows(0, T2, C);
      const float* pe = pos ? pos : sinusoidal.data();
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t t = 0; t < T2; ++t) {
          float* row = x.data() + (b * T2 + t) * C;
          for (std::int64_t c = 0; c < C; ++c)
            row[c] = (t < off ? cls[c] : e[(b * T + t - off) * C + c] * scale) + pe[t * C + c];
          if (t >= off) padding[b * T2 + t] = ids[b * T + t - off] == pad_id;
        }
      }
      run_blocks(x.data(), B, T2, padding);
      if (norm_w) layernorm_forward(x.data(), nullptr, nullptr, x.data(), norm_w, norm_b, B * T2, C, 1e-5f);
      hidden->swap(x);
      return Status();
    });
  }

  Status classify(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                  std::vector<float>* logits) const override {
    if (model_kind != "TransformerClassifier") return Model::classify(ids, B, T, logits);
    if (!logits) return Status::error("classify: null output");
    std::vector<float> h;
    Status st = encode(ids, B, T, {}, &h);
    if (!st.ok()) return st;
    return no_throw([&] {
      std::vector<float> pooled(static_cast<size_t>(B * C), 0.0f), y(static_cast<size_t>(B * classes));
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
      sgemm(false, true, B, classes, C, 1.0f, pooled.data(), C, head_w, C, 0.0f, y.data(), classes, head_b);
      logits->swap(y);
      return Status();
    });
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

Status Model::encode(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, const std::vector<std::int64_t>&,
                     std::vector<float>*) const {
  return Status::error(kind() + " has no encoder hidden states (BertModel, TransformerClassifier do)");
}
Status Model::classify(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, std::vector<float>*) const {
  return Status::error(kind() + " is not a classifier (TransformerClassifier is)");
}
Status Model::logits(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, std::vector<float>*) const {
  return Status::error(kind() + " is not a language model (GPT is)");
}
Status Model::generate(const std::vector<std::int64_t>&, int, const GenerateOptions&,
                       std::vector<std::int64_t>*) const {
  return Status::error(kind() + " is not a language model (GPT is)");
}

Status Model::sentence_embeddings(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                                  const std::vector<std::int64_t>& attention_mask, std::vector<float>* embeddings) const {
  if (!embeddings) return Status::error("sentence_embeddings: null output");
  std::vector<float> h;
  Status st = encode(ids, B, T, attention_mask, &h);  // checks ids, B, T and the mask
  if (!st.ok()) return st;
  return no_throw([&] {
    const std::int64_t C = hidden_size_, T2 = static_cast<std::int64_t>(h.size()) / (B * C);
    const std::int64_t off = T2 - T;  // a CLS position in front is not averaged
    std::vector<float> e(static_cast<size_t>(B * C), 0.0f);
    for (std::int64_t b = 0; b < B; ++b) {
      double count = 0;
      for (std::int64_t t = 0; t < T; ++t) count += attention_mask.empty() || attention_mask[b * T + t] != 0;
      for (std::int64_t t = 0; t < T; ++t) {
        if (!attention_mask.empty() && attention_mask[b * T + t] == 0) continue;
        for (std::int64_t c = 0; c < C; ++c)
          e[b * C + c] += h[(b * T2 + t + off) * C + c] / static_cast<float>(std::max(count, 1e-9));
      }
    }
    embeddings->swap(e);
    return Status();
  });
}

namespace {

// Builds a model from a file's tensors and metadata; `name` prefixes error messages.
Status build_model(std::map<std::string, Tensor>& tensors, std::map<std::string, std::string>& meta,
                   const std::string& name, std::unique_ptr<Model>* out) {
  const auto fail = [&](const std::string& what) { return Status::error(name.empty() ? what : name + ": " + what); };
  const std::string& format = meta["format"];
  if (format != "cpuformer-model" && format != "cpuformer-checkpoint")
    return fail("not a cpuformer model file (metadata format " + quoted(format) + ")");
  if (format == "cpuformer-model" && meta["version"] != "1")
    return fail("model file version " + quoted(meta["version"]) + "; this runtime reads 1");
  Json config;
  Status st = parse_json(meta["config"], &config);
  if (st.ok() && config.type != Json::kObject) st = Status::error("not a JSON object");
  if (!st.ok()) return fail("bad model config: " + st.message());
  const std::string& cls = meta["model_class"];
  std::unique_ptr<Model> model;
  if (cls == "GPT") {
    auto m = std::make_unique<GptModel>();
    m->weights = std::move(tensors);
    st = m->init(config);
    model = std::move(m);
  } else if (cls == "TransformerClassifier" || cls == "BertModel") {
    auto m = std::make_unique<EncoderModel>();
    m->weights = std::move(tensors);
    st = cls == "BertModel" ? m->init_bert(config) : m->init_classifier(config);
    model = std::move(m);
  } else {
    return fail("model class " + quoted(cls) + " is not supported by the C++ runtime (GPT, TransformerClassifier, "
                "BertModel)");
  }
  if (!st.ok()) return fail(st.message());
  *out = std::move(model);
  return Status();
}

}  // namespace

Status Model::load(const std::string& path, std::unique_ptr<Model>* out) {
  if (!out) return Status::error("Model::load: null output");
  out->reset();
  return no_throw([&] {
    std::map<std::string, Tensor> tensors;
    std::map<std::string, std::string> meta;
    Status st = read_safetensors(path, &tensors, &meta);
    return st.ok() ? build_model(tensors, meta, path, out) : st;
  });
}

Status Model::load_from_buffer(const void* data, std::size_t size, std::unique_ptr<Model>* out) {
  if (!out) return Status::error("Model::load_from_buffer: null output");
  out->reset();
  return no_throw([&] {
    std::map<std::string, Tensor> tensors;
    std::map<std::string, std::string> meta;
    Status st = read_safetensors_buffer(data, size, &tensors, &meta);
    return st.ok() ? build_model(tensors, meta, "", out) : st;
  });
}

}  // namespace cpuformer
