// model.cpp: Python-free inference for models saved by cpuformer.save(): GPT (logits, KV-cached generation),
// TransformerClassifier (hidden states, logits), BertModel (hidden states, sentence embeddings) and
// Seq2SeqTransformer (greedy and beam-search translation).
//
// This file only loads and assembles: it checks a file's config against its tensors, maps the tensors onto the
// core's Transformer block (block.h: BlockConfig, BlockWeights of LinearRefs, exactly as the Python layers'
// _block_parts do) and composes the models of python/cpuformer/models from block_forward / block_decode,
// linear_forward, layer/RMS norms and embeddings. The arithmetic is the core's, shared with Python.
#include "cpuformer/model.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <random>
#include <set>

#include <deque>

#include "cpuformer/activations.h"
#include "cpuformer/block.h"
#include "cpuformer/embedding.h"
#include "cpuformer/layernorm.h"
#include "cpuformer/linear.h"
#include "cpuformer/matmul.h"
#include "cpuformer/quantize.h"
#include "cpuformer/softmax.h"
#include "json.h"
#include "no_throw.h"

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
  // An integer that older files may lack (added with a later option): `fallback` when absent.
  std::int64_t integer_or(const std::string& key, std::int64_t fallback, std::int64_t lo, std::int64_t hi) {
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return fallback;
    return integer(key, lo, hi);
  }
  double positive(const std::string& key, double fallback) {  // finite and > 0 (rope_theta)
    const Json* v = j_.find(key);
    if (!v || v->type == Json::kNull) return fallback;
    if (v->type != Json::kNumber || !(v->number > 0) || !std::isfinite(v->number)) {
      error("'" + key + "' must be a finite number > 0");
      return fallback;
    }
    return v->number;
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
  if (name == "silu") return Activation::kSilu;
  return Activation::kGeluTanh;  // gelu_tanh, and Hugging Face's gelu_new / gelu_pytorch_tanh
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

// ---------------------------------------------------------------------------------------------------------------
// Shared by every model: the tensors, the prepared Linear weights, and the block assembly.

// One block: its configuration and weights (pointers into the model's tensors and prepared weights).
struct Layer {
  BlockConfig cfg;
  BlockWeights w;
};

// A final norm (GPT's ln_f, an encoder's or decoder's norm): LayerNorm or RMSNorm over rows of C.
struct Norm {
  NormKind kind = NormKind::kLayerNorm;
  NormRef ref;
  float eps = 1e-5f;
  void apply(float* out, const float* in, std::int64_t rows, std::int64_t C) const {
    if (kind == NormKind::kLayerNorm)
      layernorm_forward(out, nullptr, nullptr, in, ref.weight, ref.bias, rows, C, eps);
    else
      rmsnorm_forward(out, nullptr, in, ref.weight, rows, C, eps);
  }
};

class ModelBase : public Model {
 public:
  Weights weights;
  LoadOptions options;
  // Prepared forms of the Linear weights (deques: the LinearRefs point into them, and they never move).
  std::deque<PackedMatrix> packed;
  std::deque<Int8Weight> int8;

  // A Linear's weight rows [row0, row0 + out) of `weight` (in columns), bias likewise, prepared as the load
  // options ask (Python prepares each slice of MultiheadAttention's in_proj the same way: per-channel, so a slice
  // quantizes to the rows of the whole).
  LinearRef prepare(const float* weight, const float* bias, std::int64_t out, std::int64_t in,
                    std::int64_t row0 = 0) {
    LinearRef l;
    l.in = in, l.out = out;
    if (!weight) return l;
    l.weight = weight + row0 * in;
    l.bias = bias ? bias + row0 : nullptr;
    if (options.weights == LoadOptions::kPacked) {
      packed.push_back(sgemm_pack_b(true, in, out, l.weight, in));
      l.packed = &packed.back();
    } else if (options.weights == LoadOptions::kInt8) {
      int8.push_back(quantize_weight_int8(l.weight, out, in, in));
      l.int8 = &int8.back();
    }
    return l;
  }
  // `name`.weight (out, in) and the optional `name`.bias (out).
  LinearRef linear(ParamReader& r, const std::string& name, std::int64_t out, std::int64_t in) {
    const float* w = r.get(name + ".weight", {out, in});
    const float* b = r.get(name + ".bias", {out}, true);
    return r.status.ok() ? prepare(w, b, out, in) : LinearRef{};
  }
  NormRef norm(ParamReader& r, const std::string& name, std::int64_t C, bool with_bias = true) {
    NormRef n;
    n.weight = r.get(name + ".weight", {C});
    if (with_bias) n.bias = r.get(name + ".bias", {C}, true);
    return n;
  }

  // One nn.TransformerEncoderLayer / TransformerDecoderLayer (decoder: cross-attention too), as their
  // _block_parts map them: self_attn.qkv = in_proj rows [q|k|v], cross_attn.q = in_proj rows [0, C), cross_attn.kv
  // = rows [C, 3C); norm1, norm2 (norm3 in a decoder) = norm1, norm_ff (cross: norm2); ff.up/down = linear1/2.
  Layer torch_layer(ParamReader& r, const std::string& p, std::int64_t C, std::int64_t F, std::int64_t H,
                    bool norm_first, Activation act, float eps, bool decoder) {
    Layer L;
    if (r.status.ok() && (C % H)) r.status = Status::error("config: hidden size is not divisible by the heads");
    L.cfg.d_model = C, L.cfg.num_heads = H, L.cfg.norm_eps = eps, L.cfg.norm_first = norm_first;
    L.cfg.activation = act, L.cfg.cross_attention = decoder;
    const float* in_w = r.get(p + "self_attn.in_proj_weight", {3 * C, C});
    const float* in_b = r.get(p + "self_attn.in_proj_bias", {3 * C}, true);
    if (r.status.ok()) L.w.self_attn.qkv = prepare(in_w, in_b, 3 * C, C);
    L.w.self_attn.o = linear(r, p + "self_attn.out_proj", C, C);
    if (decoder) {
      const float* x_w = r.get(p + "multihead_attn.in_proj_weight", {3 * C, C});
      const float* x_b = r.get(p + "multihead_attn.in_proj_bias", {3 * C}, true);
      if (r.status.ok()) {
        L.w.cross_attn.q = prepare(x_w, x_b, C, C, 0);
        L.w.cross_attn.kv = prepare(x_w, x_b, 2 * C, C, C);
      }
      L.w.cross_attn.o = linear(r, p + "multihead_attn.out_proj", C, C);
    }
    L.w.ff.up = linear(r, p + "linear1", F, C);
    L.w.ff.down = linear(r, p + "linear2", C, F);
    L.w.norm1 = norm(r, p + "norm1", C);
    if (decoder) {
      L.w.norm2 = norm(r, p + "norm2", C);
      L.w.norm_ff = norm(r, p + "norm3", C);
    } else {
      L.w.norm_ff = norm(r, p + "norm2", C);
    }
    return L;
  }
};

// Checks every assembled block as the core will (sizes, presence) and turns its exception into a status.
Status check_blocks(const std::vector<Layer>& layers) {
  for (const Layer& L : layers) block_check(L.cfg, L.w);
  return Status();
}

// ---------------------------------------------------------------------------------------------------------------

class GptModel : public ModelBase {
 public:
  std::vector<Layer> blocks;
  const float *wte = nullptr, *wpe = nullptr;
  bool sinusoidal = false;
  Norm ln_f;
  LinearRef head;
  std::int64_t V = 0, block_size = 0, C = 0;

  std::string kind() const override { return "GPT"; }

  Status init(const Json& cfg_json) {
    Config cfg(cfg_json);
    V = cfg.integer("vocab_size", 1, kMaxSize), block_size = cfg.integer("block_size", 1, kMaxLength);
    C = cfg.integer("n_embd", 1, kMaxSize);
    const std::int64_t layers = cfg.integer("n_layer", 0, kMaxSize), H = cfg.integer("n_head", 1, kMaxSize);
    const float eps = static_cast<float>(cfg.number("layer_norm_eps", 1e-5));
    const std::string positional = cfg.choice("positional", {"learned", "sinusoidal", "rotary", "alibi"});
    const bool tied = cfg.flag("tie_weights", true);
    const Activation act = activation_named(cfg.choice("activation", {"gelu", "gelu_tanh", "relu", "silu"}));
    const bool rms = cfg.choice("norm", {"layer_norm", "rms_norm"}) == "rms_norm";
    const std::int64_t n_kv = cfg.integer_or("n_kv_head", 0, 0, kMaxSize);
    const bool gated = cfg.flag("gated", false), bias = cfg.flag("bias", true);
    const std::int64_t d_ff = cfg.integer_or("d_ff", 0, 0, kMaxSize);
    const double theta = cfg.positive("rope_theta", 10000.0);
    if (!cfg.status.ok()) return cfg.status;
    if (C % H) return Status::error("config: hidden size is not divisible by the heads");
    const std::int64_t KVH = n_kv ? n_kv : H;
    if (H % KVH) return Status::error("config: 'n_kv_head' must divide 'n_head'");
    const std::int64_t F = d_ff ? d_ff : 4 * C, D = C / H;
    // Python's rule: the classic GPT-2 block (torch's TransformerEncoderLayer names) unless a Llama-style option.
    const bool table = positional == "learned" || positional == "sinusoidal";
    const bool classic = !rms && table && !gated && bias && KVH == H;
    Status st = check_layers(weights, "blocks.", "n_layer", layers);
    if (!st.ok()) return st;
    ParamReader r(weights);
    wte = r.get("wte.weight", {V, C});
    if (positional == "learned") wpe = r.get("wpe.weight", {block_size, C});
    sinusoidal = positional == "sinusoidal";
    for (std::int64_t i = 0; i < layers && r.status.ok(); ++i) {
      const std::string p = "blocks." + std::to_string(i) + ".";
      if (classic) {
        blocks.push_back(torch_layer(r, p, C, F, H, true, act, eps, false));
        continue;
      }
      // TransformerBlock (Hugging Face Llama names).
      Layer L;
      L.cfg.d_model = C, L.cfg.num_heads = H, L.cfg.num_kv_heads = KVH, L.cfg.head_dim = D;
      L.cfg.norm = rms ? NormKind::kRMSNorm : NormKind::kLayerNorm, L.cfg.norm_eps = eps;
      L.cfg.norm_first = true, L.cfg.activation = act;
      L.cfg.position = positional == "rotary"  ? PositionKind::kRotary
                       : positional == "alibi" ? PositionKind::kAlibi
                                               : PositionKind::kNone;
      L.cfg.rotary.theta = theta;
      L.w.self_attn.q = linear(r, p + "self_attn.q_proj", H * D, C);
      L.w.self_attn.k = linear(r, p + "self_attn.k_proj", KVH * D, C);
      L.w.self_attn.v = linear(r, p + "self_attn.v_proj", KVH * D, C);
      L.w.self_attn.o = linear(r, p + "self_attn.o_proj", C, H * D);
      if (gated) L.w.ff.gate = linear(r, p + "mlp.gate_proj", F, C);
      L.w.ff.up = linear(r, p + "mlp.up_proj", F, C);
      L.w.ff.down = linear(r, p + "mlp.down_proj", C, F);
      L.w.norm1 = norm(r, p + "input_layernorm", C, !rms);
      L.w.norm_ff = norm(r, p + "post_attention_layernorm", C, !rms);
      blocks.push_back(L);
    }
    ln_f.kind = rms ? NormKind::kRMSNorm : NormKind::kLayerNorm, ln_f.eps = eps;
    ln_f.ref = norm(r, "ln_f", C, !rms);
    const float* head_w = tied ? wte : r.get("lm_head.weight", {V, C});
    if (r.status.ok()) head = prepare(head_w, nullptr, V, C);  // the tied head too, as GPT._freeze_weights
    hidden_size_ = C;
    return r.status.ok() ? check_blocks(blocks) : r.status;
  }

  // Token embeddings plus position rows start.. (learned or sinusoidal; none for rotary / ALiBi) for n tokens.
  void embed(const std::int64_t* ids, std::int64_t n, std::int64_t start, std::int64_t period, float* x) const {
    embedding_forward(x, ids, wte, n, V, C);
    if (!wpe && !sinusoidal) return;
    std::vector<float> buf;
    if (sinusoidal) buf = sinusoidal_rows(start, period, C);
    const float* pe = wpe ? wpe + start * C : buf.data();
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < C; ++c) x[i * C + c] += pe[(i % period) * C + c];
  }

  // Logits (B*T, V) of ids (B, T) at positions 0..T-1: GPT.forward.
  void forward(const std::int64_t* ids, std::int64_t B, std::int64_t T, std::vector<float>* y) const {
    std::vector<float> x(static_cast<size_t>(B * T * C));
    embed(ids, B * T, 0, T, x.data());
    BlockInput in;
    in.B = B, in.T = T, in.causal = true;
    for (const Layer& L : blocks) block_forward(x.data(), x.data(), L.cfg, L.w, in);
    ln_f.apply(x.data(), x.data(), B * T, C);
    y->resize(static_cast<size_t>(B * T * V));
    linear_forward(y->data(), V, x.data(), C, B * T, head);
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
      std::vector<float> y;
      forward(ids.data(), B, T, &y);
      out->swap(y);
      return Status();
    });
  }

  // GPT._step_cached: tokens ids[0..n) at positions start.. through block_decode over the caches; the last
  // position's logits.
  void step(const std::int64_t* ids, std::int64_t n, std::int64_t start, std::vector<KVCache>& caches,
            std::vector<float>* logits) const {
    std::vector<float> x(static_cast<size_t>(n * C));
    embed(ids, n, start, n, x.data());
    const std::int64_t final_row = n - 1;  // the last block carries only it past its keys and values
    for (size_t l = 0; l < blocks.size(); ++l)
      block_decode(x.data(), x.data(), blocks[l].cfg, blocks[l].w, 1, n, nullptr, caches[l], nullptr, nullptr,
                   l + 1 == blocks.size() ? &final_row : nullptr);
    std::vector<float> last(static_cast<size_t>(C));
    ln_f.apply(last.data(), x.data(), 1, C);
    logits->resize(static_cast<size_t>(V));
    linear_forward(logits->data(), V, last.data(), C, 1, head);
  }

  // The next token from the last position's logits. Non-finite logits (from non-finite weights) never index out
  // of range: NaN ranks lowest, and a distribution that does not sum to a positive finite number falls back to
  // the top-ranked token.
  std::int64_t pick(const float* logits, const GenerateOptions& opts, std::mt19937_64& rng) const {
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
      std::vector<KVCache> caches(blocks.size());
      std::vector<float> logits;
      bool cached = false;  // the caches hold every position of `ids` but the last
      for (int i = 0; i < max_new_tokens; ++i) {
        const std::int64_t total = static_cast<std::int64_t>(ids.size());
        const float* last = nullptr;
        if (total <= block_size) {  // as GPT.generate with use_cache: the prompt once, then one token a step
          if (!cached) {
            for (size_t l = 0; l < blocks.size(); ++l)
              caches[l].reset(1, window, blocks[l].cfg.kv_heads() * blocks[l].cfg.head_size());
            step(ids.data(), total, 0, caches, &logits);
          } else {
            step(ids.data() + total - 1, 1, total - 1, caches, &logits);
          }
          cached = true;
          last = logits.data();
        } else {  // past the position table: GPT.forward over the last block_size tokens
          forward(ids.data() + total - block_size, 1, block_size, &logits);
          last = logits.data() + (block_size - 1) * V;
        }
        const std::int64_t next = pick(last, opts, rng);
        ids.push_back(next);
        if (opts.eos_id >= 0 && next == opts.eos_id) break;
      }
      out->swap(ids);
      return Status();
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------

class EncoderModel : public ModelBase {
 public:
  std::vector<Layer> blocks;
  std::string model_kind;
  // classifier
  const float *emb = nullptr, *cls = nullptr, *pos = nullptr;
  Norm final_norm;  // the classifier's encoder.norm (norm_first only)
  bool has_final_norm = false;
  LinearRef head;
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
      blocks.push_back(torch_layer(r, "encoder.layers." + std::to_string(i) + ".", C, F, H, norm_first,
                                   Activation::kGeluErf, 1e-5f, false));
    if (norm_first) final_norm.ref = norm(r, "encoder.norm", C), has_final_norm = true;
    head = linear(r, "head", classes, C);
    hidden_size_ = C;
    return r.status.ok() ? check_blocks(blocks) : r.status;
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
      blocks.push_back(torch_layer(r, "layers." + std::to_string(i) + ".", C, F, H, false, act, eps, false));
    hidden_size_ = C;
    return r.status.ok() ? check_blocks(blocks) : r.status;
  }

  // The encoder blocks over x (B, T, C) in place; padding (B*T, 1 = padding) may be empty.
  void run_blocks(float* x, std::int64_t B, std::int64_t T, const std::vector<std::uint8_t>& padding) const {
    BlockInput in;
    in.B = B, in.T = T, in.key_padding = padding.empty() ? nullptr : padding.data();
    for (const Layer& L : blocks) block_forward(x, x, L.cfg, L.w, in);
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
      if (has_final_norm) final_norm.apply(x.data(), x.data(), B * T2, C);
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
      linear_forward(y.data(), classes, pooled.data(), C, B, head);
      logits->swap(y);
      return Status();
    });
  }
};


// ---------------------------------------------------------------------------------------------------------------
// Seq2SeqTransformer: source/target embeddings scaled by sqrt(d_model) plus sinusoidal positions, the encoder and
// decoder stacks (nn.Transformer: final norms on both), the generator head; greedy and beam-search translation.

class Seq2SeqModel : public ModelBase {
 public:
  std::vector<Layer> encoder, decoder;
  const float *src_emb = nullptr, *tgt_emb = nullptr;
  Norm enc_norm, dec_norm;
  LinearRef generator;
  std::int64_t Vs = 0, Vt = 0, C = 0, max_len = 0, pad_id = 0, bos_id = 0, eos_id = 0;
  float scale = 1.0f;

  std::string kind() const override { return "Seq2SeqTransformer"; }

  Status init(const Json& j) {
    Config cfg(j);
    Vs = cfg.integer("src_vocab_size", 1, kMaxSize), Vt = cfg.integer("tgt_vocab_size", 1, kMaxSize);
    C = cfg.integer("d_model", 1, kMaxSize);
    const std::int64_t H = cfg.integer("nhead", 1, kMaxSize), ne = cfg.integer("num_encoder_layers", 0, kMaxSize),
                       nd = cfg.integer("num_decoder_layers", 0, kMaxSize),
                       F = cfg.integer("dim_feedforward", 1, kMaxSize);
    max_len = cfg.integer("max_len", 1, kMaxLength);
    const std::int64_t vmin = std::min(Vs, Vt);
    pad_id = cfg.integer("pad_id", 0, vmin - 1), bos_id = cfg.integer("bos_id", 0, Vt - 1);
    eos_id = cfg.integer("eos_id", 0, Vt - 1);
    const bool norm_first = cfg.flag("norm_first", true);
    if (!cfg.status.ok()) return cfg.status;
    Status st = check_layers(weights, "transformer.encoder.layers.", "num_encoder_layers", ne);
    if (st.ok()) st = check_layers(weights, "transformer.decoder.layers.", "num_decoder_layers", nd);
    if (!st.ok()) return st;
    ParamReader r(weights);
    src_emb = r.get("src_embedding.weight", {Vs, C});
    tgt_emb = r.get("tgt_embedding.weight", {Vt, C});
    for (std::int64_t i = 0; i < ne && r.status.ok(); ++i)
      encoder.push_back(torch_layer(r, "transformer.encoder.layers." + std::to_string(i) + ".", C, F, H, norm_first,
                                    Activation::kRelu, 1e-5f, false));
    for (std::int64_t i = 0; i < nd && r.status.ok(); ++i)
      decoder.push_back(torch_layer(r, "transformer.decoder.layers." + std::to_string(i) + ".", C, F, H, norm_first,
                                    Activation::kRelu, 1e-5f, true));
    enc_norm.ref = norm(r, "transformer.encoder.norm", C);
    dec_norm.ref = norm(r, "transformer.decoder.norm", C);
    generator = linear(r, "generator", Vt, C);
    scale = static_cast<float>(std::sqrt(static_cast<double>(C)));
    hidden_size_ = C;
    if (!r.status.ok()) return r.status;
    st = check_blocks(encoder);
    return st.ok() ? check_blocks(decoder) : st;
  }

  // Embeddings * sqrt(d_model) + the sinusoidal rows of positions pos[i] (PositionalEncoding, eval mode).
  void embed(const float* table, std::int64_t vocab, const std::int64_t* ids, std::int64_t n,
             const std::vector<float>& pe, const std::int64_t* row_of, float* x) const {
    embedding_forward(x, ids, table, n, vocab, C);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < C; ++c) x[i * C + c] = x[i * C + c] * scale + pe[row_of[i] * C + c];
  }

  // The encoder's output (B, S, C) and the source padding (B, S): Seq2SeqTransformer._encode.
  void encode_source(const std::vector<std::int64_t>& src, std::int64_t B, std::int64_t S, std::vector<float>* memory,
                     std::vector<std::uint8_t>* pad) const {
    pad->resize(static_cast<size_t>(B * S));
    std::vector<std::int64_t> rows(static_cast<size_t>(B * S));
    for (std::int64_t i = 0; i < B * S; ++i) (*pad)[i] = src[i] == pad_id, rows[i] = i % S;
    memory->resize(static_cast<size_t>(B * S * C));
    embed(src_emb, Vs, src.data(), B * S, sinusoidal_rows(0, S, C), rows.data(), memory->data());
    BlockInput in;
    in.B = B, in.T = S, in.key_padding = pad->data();
    for (const Layer& L : encoder) block_forward(memory->data(), memory->data(), L.cfg, L.w, in);
    enc_norm.apply(memory->data(), memory->data(), B * S, C);
  }

  // One decoder step: token tok[b] of each of the n rows at position `pos` (the decoder's key/value caches hold
  // the earlier ones); the generator's logits (n, Vt). A padding token is a masked key in Python's decode
  // (tgt_key_padding_mask): here it is not appended to the cache (new_tokens 0), which attends the same way.
  void step(const std::vector<std::int64_t>& tok, std::int64_t n, std::int64_t pos, std::vector<KVCache>& self,
            const std::vector<KVCache>& cross, const std::uint8_t* memory_padding, std::vector<float>* logits) const {
    std::vector<float> x(static_cast<size_t>(n * C));
    const std::vector<std::int64_t> zero(static_cast<size_t>(n), 0);
    embed(tgt_emb, Vt, tok.data(), n, sinusoidal_rows(pos, 1, C), zero.data(), x.data());
    std::vector<std::int64_t> fresh(static_cast<size_t>(n));
    for (std::int64_t b = 0; b < n; ++b) fresh[b] = tok[b] != pad_id;
    for (size_t l = 0; l < decoder.size(); ++l)
      block_decode(x.data(), x.data(), decoder[l].cfg, decoder[l].w, n, 1, fresh.data(), self[l], &cross[l],
                   memory_padding);
    dec_norm.apply(x.data(), x.data(), n, C);
    logits->resize(static_cast<size_t>(n * Vt));
    linear_forward(logits->data(), Vt, x.data(), C, n, generator);
  }

  Status position_error(std::int64_t length) const {
    return Status::error("translate: target length " + std::to_string(length) + " exceeds max_len " +
                         std::to_string(max_len) + " (the position table)");
  }

  // Token ids up to the first EOS or padding: Seq2SeqTransformer._strip.
  std::vector<std::int64_t> strip(const std::int64_t* ids, std::int64_t n) const {
    std::vector<std::int64_t> out;
    for (std::int64_t i = 0; i < n && ids[i] != eos_id && ids[i] != pad_id; ++i) out.push_back(ids[i]);
    return out;
  }

  std::vector<KVCache> new_caches(std::int64_t B, std::int64_t capacity) const {
    std::vector<KVCache> caches(decoder.size());
    for (size_t l = 0; l < decoder.size(); ++l)
      caches[l].reset(B, capacity, decoder[l].cfg.kv_heads() * decoder[l].cfg.head_size());
    return caches;
  }

  Status greedy(const std::vector<float>& memory, const std::vector<std::uint8_t>& pad, std::int64_t B,
                std::int64_t S, int steps, std::vector<std::vector<std::int64_t>>* out) const {
    std::vector<KVCache> cross(decoder.size());
    for (size_t l = 0; l < decoder.size(); ++l)
      block_cross_cache(memory.data(), B, S, decoder[l].cfg, decoder[l].w, cross[l]);
    std::vector<KVCache> self = new_caches(B, std::max<std::int64_t>(1, std::min<std::int64_t>(steps, max_len)));
    std::vector<std::vector<std::int64_t>> ys(static_cast<size_t>(B), std::vector<std::int64_t>{bos_id});
    std::vector<bool> done(static_cast<size_t>(B), false);
    std::vector<std::int64_t> tok(static_cast<size_t>(B));
    std::vector<float> logits;
    for (int s = 0; s < steps; ++s) {
      if (s + 1 > max_len) return position_error(s + 1);
      for (std::int64_t b = 0; b < B; ++b) tok[b] = ys[b].back();
      step(tok, B, s, self, cross, pad.data(), &logits);
      bool all = true;
      for (std::int64_t b = 0; b < B; ++b) {
        const float* row = logits.data() + b * Vt;
        const std::int64_t best = std::max_element(row, row + Vt) - row;  // the first maximum, as numpy's argmax
        const std::int64_t next = done[b] ? pad_id : best;
        if (next == eos_id) done[b] = true;
        ys[b].push_back(next);
        all = all && done[b];
      }
      if (all) break;
    }
    out->clear();
    for (const auto& row : ys) out->push_back(strip(row.data() + 1, static_cast<std::int64_t>(row.size()) - 1));
    return Status();
  }

  // Seq2SeqTransformer._beam for source row `row`, step for step: candidates are each beam's beam_size best
  // tokens, sorted by score (stable: beam order, then token order), the best beam_size unfinished kept; a
  // candidate ending in EOS is finished with its score divided by ((5 + length) / 6) ^ alpha.
  Status beam(const std::vector<float>& memory, const std::vector<std::uint8_t>& pad, std::int64_t row,
              std::int64_t S, int steps, int beam_size, double alpha, std::vector<std::int64_t>* out) const {
    std::vector<KVCache> base(decoder.size()), cross;
    for (size_t l = 0; l < decoder.size(); ++l)
      block_cross_cache(memory.data() + row * S * C, 1, S, decoder[l].cfg, decoder[l].w, base[l]);
    std::vector<KVCache> self = new_caches(1, std::max<std::int64_t>(1, std::min<std::int64_t>(steps, max_len)));
    struct Hyp {
      std::vector<std::int64_t> seq;
      double score;
      std::int64_t parent;
    };
    const auto penalty = [&](size_t length) { return std::pow((5.0 + static_cast<double>(length) - 1.0) / 6.0, alpha); };
    std::vector<Hyp> beams{{{bos_id}, 0.0, 0}};
    std::vector<std::pair<std::vector<std::int64_t>, double>> finished;
    std::vector<float> logits, logp;
    std::vector<std::uint8_t> mpad;
    std::int64_t cross_rows = 0;
    for (int s = 0; s < steps; ++s) {
      if (s + 1 > max_len) return position_error(s + 1);
      const std::int64_t n = static_cast<std::int64_t>(beams.size());
      if (n != cross_rows) {  // the memory repeated for n beams
        cross = base;
        const std::vector<std::int64_t> zeros(static_cast<size_t>(n), 0);
        for (auto& c : cross) c.reorder(zeros.data(), n);
        mpad.clear();
        for (std::int64_t i = 0; i < n; ++i) mpad.insert(mpad.end(), pad.begin() + row * S, pad.begin() + (row + 1) * S);
        cross_rows = n;
      }
      std::vector<std::int64_t> tok(static_cast<size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) tok[i] = beams[i].seq.back();
      step(tok, n, s, self, cross, mpad.data(), &logits);
      logp.resize(logits.size());
      log_softmax_forward(logp.data(), logits.data(), n, Vt);
      std::vector<Hyp> candidates;
      std::vector<std::int64_t> order(static_cast<size_t>(Vt));
      for (std::int64_t i = 0; i < n; ++i) {
        const float* lp = logp.data() + i * Vt;
        for (std::int64_t t = 0; t < Vt; ++t) order[t] = t;
        std::partial_sort(order.begin(), order.begin() + beam_size, order.end(), [&](std::int64_t a, std::int64_t b) {
          return lp[a] > lp[b] || (lp[a] == lp[b] && a < b);
        });
        for (int k = 0; k < beam_size; ++k) {
          Hyp h{beams[i].seq, beams[i].score + static_cast<double>(lp[order[k]]), i};
          h.seq.push_back(order[k]);
          candidates.push_back(std::move(h));
        }
      }
      std::stable_sort(candidates.begin(), candidates.end(),
                       [](const Hyp& a, const Hyp& b) { return a.score > b.score; });
      std::vector<Hyp> next;
      for (Hyp& c : candidates) {
        if (c.seq.back() == eos_id)
          finished.emplace_back(c.seq, c.score / penalty(c.seq.size()));
        else
          next.push_back(std::move(c));
        if (static_cast<int>(next.size()) == beam_size) break;
      }
      beams.swap(next);
      if (beams.empty()) break;
      if (static_cast<int>(finished.size()) >= beam_size) {
        double best_finished = -INFINITY, best_open = -INFINITY;
        for (const auto& f : finished) best_finished = std::max(best_finished, f.second);
        for (const Hyp& b : beams) best_open = std::max(best_open, b.score / penalty(b.seq.size()));
        if (best_finished > best_open) break;
      }
      std::vector<std::int64_t> parents;
      for (const Hyp& b : beams) parents.push_back(b.parent);
      for (auto& c : self) c.reorder(parents.data(), static_cast<std::int64_t>(parents.size()));
    }
    if (finished.empty())
      for (const Hyp& b : beams) finished.emplace_back(b.seq, b.score / penalty(b.seq.size()));
    size_t best = 0;  // the first maximum, as Python's max
    for (size_t i = 1; i < finished.size(); ++i)
      if (finished[i].second > finished[best].second) best = i;
    const auto& seq = finished[best].first;
    *out = strip(seq.data() + 1, static_cast<std::int64_t>(seq.size()) - 1);
    return Status();
  }

  Status translate(const std::vector<std::int64_t>& src, std::int64_t B, std::int64_t S, int steps, int beam_size,
                   double length_penalty, std::vector<std::vector<std::int64_t>>* out) const override {
    if (!out) return Status::error("translate: null output");
    Status st = check_ids(src, B, S, Vs);
    if (!st.ok()) return st;
    if (S > max_len)
      return Status::error("translate: source length " + std::to_string(S) + " exceeds max_len " +
                           std::to_string(max_len));
    if (steps < 0) return Status::error("translate: max_len must be >= 0");
    if (beam_size < 1) return Status::error("translate: beam_size must be >= 1");
    if (beam_size >= Vt)
      return Status::error("translate: beam_size must be smaller than the target vocabulary (" + std::to_string(Vt) +
                           "), got " + std::to_string(beam_size));
    if (!std::isfinite(length_penalty) || std::fabs(length_penalty) > 10)
      return Status::error("translate: length_penalty must be a finite number in [-10, 10]");
    st = check_output_size(B * S, C);
    if (!st.ok()) return st;
    return no_throw([&] {
      std::vector<float> memory;
      std::vector<std::uint8_t> pad;
      encode_source(src, B, S, &memory, &pad);
      std::vector<std::vector<std::int64_t>> result;
      if (beam_size == 1) {
        Status s = greedy(memory, pad, B, S, steps, &result);
        if (!s.ok()) return s;
      } else {
        result.resize(static_cast<size_t>(B));
        for (std::int64_t b = 0; b < B; ++b) {
          Status s = beam(memory, pad, b, S, steps, beam_size, length_penalty, &result[b]);
          if (!s.ok()) return s;
        }
      }
      out->swap(result);
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

Status Model::translate(const std::vector<std::int64_t>&, std::int64_t, std::int64_t, int, int, double,
                        std::vector<std::vector<std::int64_t>>*) const {
  return Status::error(kind() + " is not a translation model (Seq2SeqTransformer is)");
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
                   const std::string& name, const LoadOptions& options, std::unique_ptr<Model>* out) {
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
  if (options.weights != LoadOptions::kFloat32 && options.weights != LoadOptions::kPacked &&
      options.weights != LoadOptions::kInt8)
    return fail("LoadOptions: unknown weights form");
  if (cls == "GPT") {
    auto m = std::make_unique<GptModel>();
    m->weights = std::move(tensors), m->options = options;
    st = m->init(config);
    model = std::move(m);
  } else if (cls == "TransformerClassifier" || cls == "BertModel") {
    auto m = std::make_unique<EncoderModel>();
    m->weights = std::move(tensors), m->options = options;
    st = cls == "BertModel" ? m->init_bert(config) : m->init_classifier(config);
    model = std::move(m);
  } else if (cls == "Seq2SeqTransformer") {
    auto m = std::make_unique<Seq2SeqModel>();
    m->weights = std::move(tensors), m->options = options;
    st = m->init(config);
    model = std::move(m);
  } else {
    return fail("model class " + quoted(cls) + " is not supported by the C++ runtime (GPT, TransformerClassifier, "
                "BertModel, Seq2SeqTransformer)");
  }
  if (!st.ok()) return fail(st.message());
  *out = std::move(model);
  return Status();
}

}  // namespace

Status Model::load(const std::string& path, std::unique_ptr<Model>* out, const LoadOptions& options) {
  if (!out) return Status::error("Model::load: null output");
  out->reset();
  return no_throw([&] {
    std::map<std::string, Tensor> tensors;
    std::map<std::string, std::string> meta;
    Status st = read_safetensors(path, &tensors, &meta);
    return st.ok() ? build_model(tensors, meta, path, options, out) : st;
  });
}

Status Model::load_from_buffer(const void* data, std::size_t size, std::unique_ptr<Model>* out,
                               const LoadOptions& options) {
  if (!out) return Status::error("Model::load_from_buffer: null output");
  out->reset();
  return no_throw([&] {
    std::map<std::string, Tensor> tensors;
    std::map<std::string, std::string> meta;
    Status st = read_safetensors_buffer(data, size, &tensors, &meta);
    return st.ok() ? build_model(tensors, meta, "", options, out) : st;
  });
}

}  // namespace cpuformer
