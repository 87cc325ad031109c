// block.cpp: the Transformer block (block.h): sublayers (self-attention, cross-attention, feed-forward), each with
// its norm, dropout and residual, composed from the core's kernels. Training forward, backward, inference forward
// and incremental decoding share the sublayer functions below, so each piece of arithmetic is written once.
#include "cpuformer/block.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "cpuformer/layernorm.h"
#include "parallel.h"

namespace cpuformer {
namespace {

// Sizes derived from a config.
struct Dims {
  index_t C, H, KVH, D, qdim, kvdim, width;  // width: a fused q|k|v row
  float scale;
  explicit Dims(const BlockConfig& c)
      : C(c.d_model),
        H(c.num_heads),
        KVH(c.kv_heads()),
        D(c.head_size()),
        qdim(H * D),
        kvdim(KVH * D),
        width(qdim + 2 * kvdim),
        scale(c.attention_scale > 0.0f ? c.attention_scale : 1.0f / std::sqrt(static_cast<float>(D))) {}
};

std::uint64_t sub_seed(std::uint64_t seed, std::uint64_t k) {  // splitmix64 of (seed, k): independent streams
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (k + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

void check_linear(const LinearRef& l, index_t in, index_t out, const char* name) {
  CPUFORMER_CHECK(l.present(), "block: missing weight ", name);
  CPUFORMER_CHECK(l.in == in && l.out == out, "block: ", name, " is ", l.out, "x", l.in, ", expected ", out, "x", in);
}

void check_attention(const AttentionWeights& a, const Dims& d, bool cross, const char* who) {
  std::string n = who;
  if (!cross && a.qkv.present()) {
    check_linear(a.qkv, d.C, d.width, (n + ".qkv").c_str());
  } else {
    check_linear(a.q, d.C, d.qdim, (n + ".q").c_str());
    if (cross && a.kv.present()) {
      check_linear(a.kv, d.C, 2 * d.kvdim, (n + ".kv").c_str());
    } else {
      check_linear(a.k, d.C, d.kvdim, (n + ".k").c_str());
      check_linear(a.v, d.C, d.kvdim, (n + ".v").c_str());
    }
  }
  check_linear(a.o, d.qdim, d.C, (n + ".o").c_str());
}

// Norm of a sublayer: forward saves (a, b) = (mean, rstd) for LayerNorm, (unused, rstd) for RMSNorm.
void norm_forward(const BlockConfig& c, const NormRef& n, float* out, float* sa, float* sb, const float* x,
                  index_t rows, index_t C) {
  if (c.norm == NormKind::kLayerNorm)
    layernorm_forward(out, sa, sb, x, n.weight, n.bias, rows, C, c.norm_eps);
  else
    rmsnorm_forward(out, sb, x, n.weight, rows, C, c.norm_eps, c.norm_one_plus);
}

void norm_backward(const BlockConfig& c, const NormRef& n, const NormGrads& g, float* dx, bool accumulate,
                   const float* dy, const float* x, const float* sa, const float* sb, index_t rows, index_t C) {
  if (c.norm == NormKind::kLayerNorm)
    layernorm_backward(dx, g.weight, n.bias ? g.bias : nullptr, dy, x, n.weight, sa, sb, rows, C, accumulate);
  else
    rmsnorm_backward(dx, g.weight, dy, x, n.weight, sb, rows, C, c.norm_one_plus, accumulate);
}

float* grow(std::vector<float>& v, index_t n) {
  if (static_cast<index_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// dst[0, n) = src[0, n) on the kernel threads: a multi-megabyte copy on one thread leaves the other cores idle.
void copy_floats(float* dst, const float* src, index_t n) {
  detail::parallel_for(n, index_t(1) << 16, [&](index_t i0, index_t i1, int) {
    std::memcpy(dst + i0, src + i0, sizeof(float) * (i1 - i0));
  });
}

// RMSNorm over each head of the q (or k) columns of a fused row (heads side by side at row stride ld), in place;
// pre (rows, heads*D) receives the values before, rstd (rows*heads) the statistics, when non-null.
void head_norm_forward(float* x, index_t ld, index_t rows, index_t heads, index_t D, const float* weight,
                       const BlockConfig& c, float* pre, float* rstd, std::vector<float>& tmp) {
  const index_t w = heads * D;
  float* t = grow(tmp, rows * w);
  for (index_t r = 0; r < rows; ++r) std::memcpy(t + r * w, x + r * ld, sizeof(float) * w);
  if (pre) std::memcpy(pre, t, sizeof(float) * rows * w);
  rmsnorm_forward(t, rstd, t, weight, rows * heads, D, c.norm_eps, c.norm_one_plus);
  for (index_t r = 0; r < rows; ++r) std::memcpy(x + r * ld, t + r * w, sizeof(float) * w);
}

void head_norm_backward(float* dx, index_t ld, index_t rows, index_t heads, index_t D, const float* weight,
                        float* dweight, const BlockConfig& c, const float* pre, const float* rstd,
                        std::vector<float>& tmp) {
  const index_t w = heads * D;
  float* t = grow(tmp, 2 * rows * w);
  float* dt = t + rows * w;
  for (index_t r = 0; r < rows; ++r) std::memcpy(t + r * w, dx + r * ld, sizeof(float) * w);
  rmsnorm_backward(dt, dweight, t, pre, weight, rstd, rows * heads, D, c.norm_one_plus, false);
  for (index_t r = 0; r < rows; ++r) std::memcpy(dx + r * ld, dt + r * w, sizeof(float) * w);
}

RotaryConfig rotary_of(const BlockConfig& c, const Dims& d) {
  RotaryConfig r = c.rotary;
  r.head_dim = d.D;
  return r;
}

// The self-attention mask of one call. A relative position bias lives in `bias`: (H, T, S), or (B, H, T, S) with
// the caller's additive mask added when there is one (relative_bias_into builds it).
AttentionMask self_mask(const BlockConfig& c, const Dims& d, const BlockInput& in, index_t S,
                        std::vector<float>& bias, const std::vector<float>& slopes) {
  AttentionMask m;
  m.key_padding = in.key_padding;
  m.additive = in.additive, m.add_sb = in.add_sb, m.add_sh = in.add_sh, m.add_st = in.add_st;
  m.causal = in.causal;
  m.window = c.sliding_window;
  if (c.position == PositionKind::kAlibi) m.alibi_slopes = slopes.data();
  if (c.position == PositionKind::kRelativeBias) {
    m.additive = bias.data(), m.add_sh = in.T * S, m.add_st = S;
    m.add_sb = in.additive ? d.H * in.T * S : 0;
  }
  return m;
}

// The relative position bias of a (B, T) call into `bias`, combined with the caller's additive mask if any.
void relative_bias_into(std::vector<float>& bias, const float* table, const BlockConfig& c, const Dims& d,
                        const BlockInput& in) {
  const index_t T = in.T, HTT = d.H * T * T;
  if (!in.additive) {
    bias.resize(static_cast<size_t>(HTT));
    relative_bias_forward(bias.data(), table, d.H, T, T, 0, c.relative);
    return;
  }
  std::vector<float> rel(static_cast<size_t>(HTT));
  relative_bias_forward(rel.data(), table, d.H, T, T, 0, c.relative);
  bias.resize(static_cast<size_t>(in.B * HTT));
  for (index_t b = 0; b < in.B; ++b)
    for (index_t h = 0; h < d.H; ++h)
      for (index_t t = 0; t < T; ++t) {
        const float* add = in.additive + b * in.add_sb + h * in.add_sh + t * in.add_st;
        const float* r = rel.data() + (h * T + t) * T;
        float* out = bias.data() + ((b * d.H + h) * T + t) * T;
        for (index_t s = 0; s < T; ++s) out[s] = r[s] + add[s];
      }
}

AttentionConfig attention_config(const Dims& d, index_t B, index_t T, index_t S, float dropout, std::uint64_t seed) {
  AttentionConfig a{B, d.H, T, S, d.D, d.scale, dropout, seed};
  a.KVH = d.KVH;
  return a;
}

// Projects h (rows, C) to a fused q|k|v buffer (rows, width): one GEMM for fused weights, three into its columns
// otherwise.
void project_qkv(float* qkv, const float* h, index_t rows, const AttentionWeights& w, const Dims& d) {
  if (w.qkv.present()) {
    linear_forward(qkv, d.width, h, d.C, rows, w.qkv);
  } else {
    linear_forward(qkv, d.width, h, d.C, rows, w.q);
    linear_forward(qkv + d.qdim, d.width, h, d.C, rows, w.k);
    linear_forward(qkv + d.qdim + d.kvdim, d.width, h, d.C, rows, w.v);
  }
}

void project_qkv_backward(float* dh, bool accumulate, const float* dqkv, const float* h, index_t rows,
                          const AttentionWeights& w, const AttentionGrads& g, const Dims& d) {
  if (w.qkv.present()) {
    linear_backward(dh, d.C, accumulate, g.qkv.weight, g.qkv.bias, dqkv, d.width, h, d.C, rows, w.qkv);
  } else {
    linear_backward(dh, d.C, accumulate, g.q.weight, g.q.bias, dqkv, d.width, h, d.C, rows, w.q);
    linear_backward(dh, d.C, true, g.k.weight, g.k.bias, dqkv + d.qdim, d.width, h, d.C, rows, w.k);
    linear_backward(dh, d.C, true, g.v.weight, g.v.bias, dqkv + d.qdim + d.kvdim, d.width, h, d.C, rows, w.v);
  }
}

// Cross-attention keys and values of memory (rows, C) into kv (rows, 2 kvdim) = [k | v].
void project_kv(float* kv, const float* mem, index_t rows, const AttentionWeights& w, const Dims& d) {
  if (w.kv.present()) {
    linear_forward(kv, 2 * d.kvdim, mem, d.C, rows, w.kv);
  } else {
    linear_forward(kv, 2 * d.kvdim, mem, d.C, rows, w.k);
    linear_forward(kv + d.kvdim, 2 * d.kvdim, mem, d.C, rows, w.v);
  }
}

// Where training's forward keeps one sublayer's values (null pointers: inference, nothing kept).
struct SelfSaves {
  float *qkv, *q_pre, *k_pre, *q_rstd, *k_rstd, *attn, *lse;
};

// The self-attention sublayer's buffers in S (BlockSaved or AttentionLayerSaved): q|k|v and the attention output
// always (work buffers), lse and the q/k norms' inputs and statistics only when kept for backward. Backward calls
// it again with keep: the buffers already have their sizes, so nothing moves.
template <class S>
SelfSaves self_saves(S& s, const BlockConfig& c, const Dims& d, index_t B, index_t T, bool keep) {
  const index_t rows = B * T;
  SelfSaves ss{grow(s.qkv, rows * d.width), nullptr, nullptr, nullptr, nullptr, grow(s.attn, rows * d.qdim), nullptr};
  if (keep) {
    ss.lse = grow(s.lse, B * d.H * T);
    if (c.qk_norm) {
      ss.q_pre = grow(s.q_pre, rows * d.qdim), ss.k_pre = grow(s.k_pre, rows * d.kvdim);
      float* r = grow(s.qk_rstd, rows * (d.H + d.KVH));
      ss.q_rstd = r, ss.k_rstd = r + rows * d.H;
    }
  }
  return ss;
}

// Self-attention of h (B*T, C) -> y (B*T, C).
void self_attention_forward(float* y, const float* h, const BlockConfig& c, const Dims& d, const AttentionWeights& w,
                            const BlockInput& in, float dropout, std::uint64_t seed, const SelfSaves& s,
                            float* attn_weights, std::vector<float>& bias, std::vector<float>& tmp) {
  const index_t B = in.B, T = in.T, rows = B * T;
  std::vector<float> local_qkv, local_attn;
  float* qkv = s.qkv ? s.qkv : grow(local_qkv, rows * d.width);
  float* attn = s.attn ? s.attn : grow(local_attn, rows * d.qdim);
  project_qkv(qkv, h, rows, w, d);
  if (c.qk_norm) {
    head_norm_forward(qkv, d.width, rows, d.H, d.D, w.q_norm, c, s.q_pre, s.q_rstd, tmp);
    head_norm_forward(qkv + d.qdim, d.width, rows, d.KVH, d.D, w.k_norm, c, s.k_pre, s.k_rstd, tmp);
  }
  if (c.position == PositionKind::kRotary) {
    const RotaryConfig rc = rotary_of(c, d);
    rotary_forward(HeadTensor{qkv, T * d.width, d.width}, B, T, d.H, nullptr, in.position_offset, rc);
    rotary_forward(HeadTensor{qkv + d.qdim, T * d.width, d.width}, B, T, d.KVH, nullptr, in.position_offset, rc);
  }
  std::vector<float> slopes;
  if (c.position == PositionKind::kAlibi) slopes = alibi_slopes(d.H);
  if (c.position == PositionKind::kRelativeBias) {
    relative_bias_into(bias, w.relative_table, c, d, in);
  }
  const AttentionMask mask = self_mask(c, d, in, T, bias, slopes);
  const AttentionConfig ac = attention_config(d, B, T, T, dropout, seed);
  const ConstHeadTensor q{qkv, T * d.width, d.width}, k{qkv + d.qdim, T * d.width, d.width},
      v{qkv + d.qdim + d.kvdim, T * d.width, d.width};
  attention_forward(HeadTensor{attn, T * d.qdim, d.qdim}, s.lse, q, k, v, mask, ac);
  if (attn_weights) attention_weights(attn_weights, q, k, mask, ac);
  linear_forward(y, d.C, attn, d.qdim, rows, w.o);
}

// The gradient of the fused projection's output, dqkv (B*T, width), from dy: through the output projection, the
// attention, the rotary positions and the q/k norms (parameter gradients accumulated on the way). Returns a
// pointer into scratch.
float* self_attention_backward_to_qkv(const float* dy, const BlockConfig& c, const Dims& d, const AttentionWeights& w,
                                      const AttentionGrads& g, const BlockInput& in, float dropout, std::uint64_t seed,
                                      const SelfSaves& s, std::vector<float>& bias, std::vector<float>& scratch,
                                      std::vector<float>& tmp) {
  const index_t B = in.B, T = in.T, rows = B * T;
  float* dattn = grow(scratch, rows * (d.qdim + d.width));
  float* dqkv = dattn + rows * d.qdim;
  linear_backward(dattn, d.qdim, false, g.o.weight, g.o.bias, dy, d.C, s.attn, d.qdim, rows, w.o);
  std::vector<float> slopes;
  if (c.position == PositionKind::kAlibi) slopes = alibi_slopes(d.H);
  const AttentionMask mask = self_mask(c, d, in, T, bias, slopes);  // bias: kept from the forward
  const AttentionConfig ac = attention_config(d, B, T, T, dropout, seed);
  std::vector<float> dbias;
  if (c.position == PositionKind::kRelativeBias && g.relative_table) dbias.assign(bias.size(), 0.0f);
  const float* qkv = s.qkv;
  attention_backward(HeadTensor{dqkv, T * d.width, d.width}, HeadTensor{dqkv + d.qdim, T * d.width, d.width},
                     HeadTensor{dqkv + d.qdim + d.kvdim, T * d.width, d.width},
                     ConstHeadTensor{dattn, T * d.qdim, d.qdim}, ConstHeadTensor{qkv, T * d.width, d.width},
                     ConstHeadTensor{qkv + d.qdim, T * d.width, d.width},
                     ConstHeadTensor{qkv + d.qdim + d.kvdim, T * d.width, d.width},
                     ConstHeadTensor{s.attn, T * d.qdim, d.qdim}, s.lse, mask, ac,
                     dbias.empty() ? nullptr : dbias.data());
  if (!dbias.empty()) {
    const index_t HTT = d.H * T * T;
    for (index_t b = 1; b < static_cast<index_t>(dbias.size()) / HTT; ++b)  // combined with a per-call mask
      for (index_t i = 0; i < HTT; ++i) dbias[i] += dbias[b * HTT + i];
    relative_bias_backward(g.relative_table, dbias.data(), d.H, T, T, 0, c.relative);
  }
  if (c.position == PositionKind::kRotary) {
    const RotaryConfig rc = rotary_of(c, d);
    rotary_backward(HeadTensor{dqkv, T * d.width, d.width}, B, T, d.H, nullptr, in.position_offset, rc);
    rotary_backward(HeadTensor{dqkv + d.qdim, T * d.width, d.width}, B, T, d.KVH, nullptr, in.position_offset, rc);
  }
  if (c.qk_norm) {
    head_norm_backward(dqkv, d.width, rows, d.H, d.D, w.q_norm, g.q_norm, c, s.q_pre, s.q_rstd, tmp);
    head_norm_backward(dqkv + d.qdim, d.width, rows, d.KVH, d.D, w.k_norm, g.k_norm, c, s.k_pre, s.k_rstd, tmp);
  }
  return dqkv;
}

// dh (B*T, C) = gradient of the self-attention input (added when accumulate), from dy.
void self_attention_backward(float* dh, bool accumulate, const float* dy, const float* h, const BlockConfig& c,
                             const Dims& d, const AttentionWeights& w, const AttentionGrads& g, const BlockInput& in,
                             float dropout, std::uint64_t seed, const SelfSaves& s, std::vector<float>& bias,
                             std::vector<float>& scratch, std::vector<float>& tmp) {
  const float* dqkv = self_attention_backward_to_qkv(dy, c, d, w, g, in, dropout, seed, s, bias, scratch, tmp);
  project_qkv_backward(dh, accumulate, dqkv, h, in.B * in.T, w, g, d);
}

AttentionMask cross_mask(const BlockInput& in, bool causal) {
  AttentionMask m;
  m.key_padding = in.memory_padding;
  m.additive = in.memory_additive, m.add_sb = in.mem_add_sb, m.add_sh = in.mem_add_sh, m.add_st = in.mem_add_st;
  m.causal = causal;
  return m;
}

// Attention of queries from xq (B*T, C) over keys from xk and values from xv (B*S, C) -> y (B*T, C): a decoder's
// cross-attention (xk == xv, the memory) or torch's MultiheadAttention with three inputs. q (B*T, qdim) and
// kv (B*S, 2 kvdim) = [k | v] are kept when given. One k|v GEMM when xk == xv and the weights are fused.
void cross_attention_forward(float* y, const float* xq, const float* xk, const float* xv, const Dims& d,
                             const AttentionWeights& w, const BlockInput& in, bool causal, float dropout,
                             std::uint64_t seed, float* q_save, float* kv_save, float* attn_save, float* lse,
                             float* attn_weights) {
  const index_t B = in.B, T = in.T, S = in.S, kvw = 2 * d.kvdim;
  std::vector<float> lq, lkv, la;
  float* q = q_save ? q_save : grow(lq, B * T * d.qdim);
  float* kv = kv_save ? kv_save : grow(lkv, B * S * kvw);
  float* attn = attn_save ? attn_save : grow(la, B * T * d.qdim);
  linear_forward(q, d.qdim, xq, d.C, B * T, w.q);
  if (xk == xv) {
    project_kv(kv, xk, B * S, w, d);
  } else {
    linear_forward(kv, kvw, xk, d.C, B * S, w.k);
    linear_forward(kv + d.kvdim, kvw, xv, d.C, B * S, w.v);
  }
  const AttentionMask mask = cross_mask(in, causal);
  const AttentionConfig ac = attention_config(d, B, T, S, dropout, seed);
  const ConstHeadTensor qt{q, T * d.qdim, d.qdim}, kt{kv, S * kvw, kvw};
  attention_forward(HeadTensor{attn, T * d.qdim, d.qdim}, lse, qt, kt, ConstHeadTensor{kv + d.kvdim, S * kvw, kvw},
                    mask, ac);
  if (attn_weights) attention_weights(attn_weights, qt, kt, mask, ac);
  linear_forward(y, d.C, attn, d.qdim, B * T, w.o);
}

// dxq (overwritten, or added with accumulate); dxk and dxv ACCUMULATED (the same buffer when xk == xv).
void cross_attention_backward(float* dxq, bool accumulate, float* dxk, float* dxv, const float* dy, const float* xq,
                              const float* xk, const float* xv, const Dims& d, const AttentionWeights& w,
                              const AttentionGrads& g, const BlockInput& in, bool causal, float dropout,
                              std::uint64_t seed, const float* q, const float* kv, const float* attn,
                              const float* lse, std::vector<float>& scratch) {
  const index_t B = in.B, T = in.T, S = in.S, kvw = 2 * d.kvdim;
  float* dattn = grow(scratch, B * T * 2 * d.qdim + B * S * kvw);
  float* dq = dattn + B * T * d.qdim;
  float* dkv = dq + B * T * d.qdim;
  linear_backward(dattn, d.qdim, false, g.o.weight, g.o.bias, dy, d.C, attn, d.qdim, B * T, w.o);
  attention_backward(HeadTensor{dq, T * d.qdim, d.qdim}, HeadTensor{dkv, S * kvw, kvw},
                     HeadTensor{dkv + d.kvdim, S * kvw, kvw}, ConstHeadTensor{dattn, T * d.qdim, d.qdim},
                     ConstHeadTensor{q, T * d.qdim, d.qdim}, ConstHeadTensor{kv, S * kvw, kvw},
                     ConstHeadTensor{kv + d.kvdim, S * kvw, kvw}, ConstHeadTensor{attn, T * d.qdim, d.qdim}, lse,
                     cross_mask(in, causal), attention_config(d, B, T, S, dropout, seed));
  linear_backward(dxq, d.C, accumulate, g.q.weight, g.q.bias, dq, d.qdim, xq, d.C, B * T, w.q);
  if (xk == xv && dxk == dxv && w.kv.present()) {
    linear_backward(dxk, d.C, true, g.kv.weight, g.kv.bias, dkv, kvw, xk, d.C, B * S, w.kv);
  } else {  // each of k and v on its own (halves of a fused k|v weight when that is what there is)
    LinearRef k = w.k, v = w.v;
    LinearGrads gk = g.k, gv = g.v;
    if (w.kv.present()) {
      CPUFORMER_CHECK(w.kv.weight && !w.kv.in_out, "attention backward: needs the float (out, in) k|v weight");
      k = LinearRef{d.C, d.kvdim, w.kv.weight, w.kv.bias};
      v = LinearRef{d.C, d.kvdim, w.kv.weight + d.kvdim * d.C, w.kv.bias ? w.kv.bias + d.kvdim : nullptr};
      gk = LinearGrads{g.kv.weight, g.kv.bias};
      gv = LinearGrads{g.kv.weight ? g.kv.weight + d.kvdim * d.C : nullptr, g.kv.bias ? g.kv.bias + d.kvdim : nullptr};
    }
    linear_backward(dxk, d.C, true, gk.weight, gk.bias, dkv, kvw, xk, d.C, B * S, k);
    linear_backward(dxv, d.C, true, gv.weight, gv.bias, dkv + d.kvdim, kvw, xv, d.C, B * S, v);
  }
}

void check_input(const BlockConfig& c, const BlockInput& in, const char* who) {
  CPUFORMER_CHECK(in.B >= 1 && in.T >= 1, who, ": B and T must be >= 1, got B=", in.B, " T=", in.T);
  if (c.cross_attention)
    CPUFORMER_CHECK(in.memory != nullptr && in.S >= 1, who, ": a cross-attention block needs the memory (S >= 1)");
}

// Residual step after a sublayer's output y: pre-norm x_next = x + drop(y); post-norm sum = x + drop(y) (into
// `sum`), x_next = norm(sum).
void dropout_inplace(float* y, index_t n, float p, std::uint64_t seed) {
  if (p > 0.0f) dropout_forward(y, nullptr, y, n, p, seed);
}

// One forward (train when saved is non-null) of the whole block.
void forward_impl(float* out, const float* x, const BlockConfig& c, const BlockWeights& w, const BlockInput& in,
                  std::uint64_t seed, BlockSaved* sv, float* attn_weights) {
  block_check(c, w);
  check_input(c, in, sv ? "block_forward_train" : "block_forward");
  const Dims d(c);
  const index_t B = in.B, T = in.T, rows = B * T, n = rows * d.C;
  const bool train = sv != nullptr;
  const float p_res = train ? c.dropout : 0.0f, p_ff = train ? c.ff_dropout : 0.0f,
              p_att = train ? c.attention_dropout : 0.0f;
  static thread_local BlockSaved t_work;  // inference: this thread's buffers, reused from call to call
  // Training keeps per layer only what backward reads. This thread's work buffers (one set for every layer) hold
  // the rest: the sublayers' outputs, pre-norm sublayers' normalised inputs (backward recomputes them from the
  // kept input and statistics) and the feed-forward activation when nothing needs it (keep_ff_activation false).
  struct TrainWork {
    std::vector<float> y, normed, a;
  };
  static thread_local TrainWork t_train;
  BlockSaved& s = train ? *sv : t_work;
  s.valid = false;
  if (train) s.in = in, s.seed = seed;
  std::vector<float>& tmp = s.tmp;
  float* y = grow(train ? t_train.y : s.y, n);
  // The residual stream: cur holds the current x; for training every stage is kept.
  float* cur = grow(s.x0, n);
  copy_floats(cur, x, n);
  auto sublayer = [&](int i, std::vector<float>& in_vec, std::vector<float>& normed, std::vector<float>& sa,
                      std::vector<float>& sb, float* xn, const NormRef& nr, auto&& run) {
    float* xin = in_vec.data();
    const float* h = xin;
    if (c.norm_first) {
      float* hn = grow(train ? t_train.normed : normed, n);
      norm_forward(c, nr, hn, grow(sa, rows), grow(sb, rows), xin, rows, d.C);
      h = hn;
    }
    run(y, h);
    dropout_inplace(y, n, p_res, sub_seed(seed, 10 + i));
    if (c.norm_first) {
      residual_forward(xn, xin, y, n);
    } else {  // normed keeps the sum (the norm's input)
      float* sum = grow(normed, n);
      if (c.norm == NormKind::kLayerNorm)
        residual_layernorm_forward(xn, sum, grow(sa, rows), grow(sb, rows), xin, y, nr.weight, nr.bias, rows, d.C,
                                   c.norm_eps);
      else
        residual_rmsnorm_forward(xn, sum, grow(sb, rows), xin, y, nr.weight, rows, d.C, c.norm_eps,
                                 c.norm_one_plus);
    }
  };
  auto run_self = [&](float* yy, const float* h) {
    const SelfSaves ss = self_saves(s, c, d, B, T, train);
    self_attention_forward(yy, h, c, d, w.self_attn, in, p_att, sub_seed(seed, 1), ss, attn_weights, s.bias, tmp);
  };
  auto run_cross = [&](float* yy, const float* h) {
    float* q = grow(s.cq, rows * d.qdim);
    float* kv = grow(s.ckv, B * in.S * 2 * d.kvdim);
    float* attn = grow(s.cattn, rows * d.qdim);
    float* lse = train ? grow(s.clse, B * d.H * T) : nullptr;
    cross_attention_forward(yy, h, in.memory, in.memory, d, w.cross_attn, in, false, p_att, sub_seed(seed, 2), q, kv,
                            attn, lse, nullptr);
  };
  auto run_ff = [&](float* yy, const float* h) {
    const index_t F = w.ff.up.out;
    float* u = grow(s.u, rows * feedforward_u_width(w.ff));
    float* a = grow(train && !s.keep_ff_activation ? t_train.a : s.a, rows * F);
    feedforward_forward(yy, u, a, h, w.ff, rows, c.activation, p_ff, sub_seed(seed, 3));
  };
  sublayer(0, s.x0, s.normed1, s.stat1a, s.stat1b, grow(s.x1, n), w.norm1, run_self);
  std::vector<float>* last = &s.x1;
  if (c.cross_attention) {
    sublayer(1, s.x1, s.normed2, s.stat2a, s.stat2b, grow(s.x2, n), w.norm2, run_cross);
    last = &s.x2;
  }
  sublayer(2, *last, s.normed3, s.stat3a, s.stat3b, out, w.norm_ff, run_ff);  // x was copied: out may alias it
  if (train) s.valid = true;
}

}  // namespace

void block_check(const BlockConfig& c, const BlockWeights& w) {
  CPUFORMER_CHECK(c.d_model >= 1 && c.num_heads >= 1, "block: d_model and num_heads must be >= 1");
  CPUFORMER_CHECK(c.num_kv_heads >= 0 && c.num_heads % c.kv_heads() == 0, "block: num_kv_heads (", c.num_kv_heads,
                  ") must divide num_heads (", c.num_heads, ")");
  CPUFORMER_CHECK(c.head_dim > 0 || c.d_model % c.num_heads == 0, "block: d_model (", c.d_model,
                  ") must be a multiple of num_heads (", c.num_heads, ") unless head_dim is given");
  CPUFORMER_CHECK(c.head_dim >= 0 && c.sliding_window >= 0, "block: head_dim and sliding_window must be >= 0");
  CPUFORMER_CHECK(c.norm_eps >= 0.0f && std::isfinite(c.norm_eps), "block: norm_eps must be finite and >= 0");
  for (float p : {c.dropout, c.ff_dropout, c.attention_dropout})
    CPUFORMER_CHECK(p >= 0.0f && p < 1.0f, "block: dropout probabilities must be in [0, 1), got ", p);
  CPUFORMER_CHECK(std::isfinite(c.attention_scale) && c.attention_scale >= 0.0f, "block: bad attention_scale");
  const Dims d(c);
  check_attention(w.self_attn, d, false, "self_attn");
  if (c.cross_attention) check_attention(w.cross_attn, d, true, "cross_attn");
  if (c.qk_norm)
    CPUFORMER_CHECK(w.self_attn.q_norm && w.self_attn.k_norm, "block: qk_norm needs q_norm and k_norm weights");
  if (c.position == PositionKind::kRelativeBias)
    CPUFORMER_CHECK(w.self_attn.relative_table != nullptr, "block: a relative position bias needs its table");
  if (c.position == PositionKind::kRotary) {
    const index_t r = c.rotary.rotary_dim ? c.rotary.rotary_dim : d.D;
    CPUFORMER_CHECK(r % 2 == 0 && r >= 2 && r <= d.D, "block: rotary_dim (", r, ") must be even and <= head_dim (",
                    d.D, ")");
  }
  if (c.norm == NormKind::kRMSNorm)
    CPUFORMER_CHECK(!w.norm1.bias && !w.norm2.bias && !w.norm_ff.bias, "block: RMSNorm has no bias");
  check_linear(w.ff.up, d.C, w.ff.up.out, "ff.up");
  CPUFORMER_CHECK(w.ff.up.out >= 1, "block: feed-forward width must be >= 1");
  check_linear(w.ff.down, w.ff.up.out, d.C, "ff.down");
  if (w.ff.gated()) check_linear(w.ff.gate, d.C, w.ff.up.out, "ff.gate");
}

void block_forward(float* out, const float* x, const BlockConfig& cfg, const BlockWeights& w, const BlockInput& in,
                   float* attn_weights) {
  forward_impl(out, x, cfg, w, in, 0, nullptr, attn_weights);
}

void block_forward_train(float* out, const float* x, const BlockConfig& cfg, const BlockWeights& w,
                         const BlockInput& in, std::uint64_t seed, BlockSaved& saved, float* attn_weights) {
  forward_impl(out, x, cfg, w, in, seed, &saved, attn_weights);
}

void block_backward(float* dx, float* dmemory, const float* dout, const BlockConfig& c, const BlockWeights& w,
                    const BlockGrads& g, BlockSaved& s) {
  CPUFORMER_CHECK(s.valid, "block_backward: no training forward to differentiate (call block_forward_train first)");
  block_check(c, w);
  const BlockInput& in = s.in;
  CPUFORMER_CHECK(!c.cross_attention || dmemory != nullptr, "block_backward: a cross-attention block needs dmemory");
  const Dims d(c);
  const index_t B = in.B, T = in.T, rows = B * T, n = rows * d.C;
  const std::uint64_t seed = s.seed;
  // Backward's work buffers: this thread's own, kept from call to call and shared by every layer it runs (fresh
  // multi-megabyte buffers per call cost a page fault per 4 KB; one set per layer would add to training's peak).
  struct Work {
    std::vector<float> tmp, dy, dsum, scratch, normed;
  };
  static thread_local Work t_back;
  std::vector<float>&tmp = t_back.tmp, &dy = t_back.dy, &dsum = t_back.dsum, &scratch = t_back.scratch;
  grow(dy, n);
  // The gradient of the residual stream, in place in dx (one copy of dout rather than two through a buffer).
  float* const gcur = dx;
  if (dx != dout) copy_floats(dx, dout, n);
  // One sublayer backward: g (d of the sublayer's output stream) -> d of its input stream, in place in gcur.
  auto sublayer = [&](int i, std::vector<float>& in_vec, std::vector<float>& normed, std::vector<float>& sa,
                      std::vector<float>& sb, const NormRef& nr, const NormGrads& ng, auto&& run_back) {
    const float p_res = c.dropout;
    if (c.norm_first) {
      // x_next = x + drop(y(norm(x))): dy = drop'(g); dh = y'(dy); dx = g + norm'(dh). Without dropout dy is g
      // itself (run_back only reads it; gcur changes after).
      const float* dyy = gcur;
      if (p_res > 0.0f) {
        dropout_backward(dy.data(), gcur, n, p_res, sub_seed(seed, 10 + i));
        dyy = dy.data();
      }
      float* dh = grow(dsum, n);
      // The sublayer's input, normalised again (the forward did not keep it): the same rows, the same bits.
      float* h = grow(t_back.normed, n);
      norm_forward(c, nr, h, sa.data(), sb.data(), in_vec.data(), rows, d.C);
      run_back(dh, false, dyy, h);
      norm_backward(c, nr, ng, gcur, true, dh, in_vec.data(), sa.data(), sb.data(), rows, d.C);
    } else {
      // x_next = norm(x + drop(y(x))): ds = norm'(g); dy = drop'(ds); dx = ds + y'(dy)
      float* ds = grow(dsum, n);
      norm_backward(c, nr, ng, ds, false, gcur, normed.data(), sa.data(), sb.data(), rows, d.C);
      const float* dyy = ds;  // without dropout dy is ds itself (run_back reads it and writes gcur only)
      if (p_res > 0.0f) {
        dropout_backward(dy.data(), ds, n, p_res, sub_seed(seed, 10 + i));
        dyy = dy.data();
      }
      copy_floats(gcur, ds, n);
      run_back(gcur, true, dyy, in_vec.data());
    }
  };
  const float p_att = c.attention_dropout;
  auto back_ff = [&](float* dh, bool acc, const float* dyy, const float* h) {
    float* sc = grow(scratch, rows * feedforward_scratch_width(w.ff));
    CPUFORMER_CHECK(s.keep_ff_activation || (!g.ff.down_w && !w.ff.down.lora),
                    "block_backward: the down projection's gradient needs the activation the forward did not keep "
                    "(keep_ff_activation)");
    feedforward_backward(dh, acc, g.ff, dyy, h, s.u.data(), s.keep_ff_activation ? s.a.data() : nullptr, w.ff, sc,
                         rows, c.activation, c.ff_dropout, sub_seed(seed, 3));
  };
  auto back_cross = [&](float* dh, bool acc, const float* dyy, const float* h) {
    cross_attention_backward(dh, acc, dmemory, dmemory, dyy, h, in.memory, in.memory, d, w.cross_attn, g.cross_attn, in,
                             false, p_att, sub_seed(seed, 2), s.cq.data(), s.ckv.data(), s.cattn.data(),
                             s.clse.data(), scratch);
  };
  auto back_self = [&](float* dh, bool acc, const float* dyy, const float* h) {
    const SelfSaves ss = self_saves(s, c, d, B, T, true);
    self_attention_backward(dh, acc, dyy, h, c, d, w.self_attn, g.self_attn, in, p_att, sub_seed(seed, 1), ss, s.bias,
                            scratch, tmp);
  };
  sublayer(2, c.cross_attention ? s.x2 : s.x1, s.normed3, s.stat3a, s.stat3b, w.norm_ff, g.norm_ff, back_ff);
  if (c.cross_attention) sublayer(1, s.x1, s.normed2, s.stat2a, s.stat2b, w.norm2, g.norm2, back_cross);
  sublayer(0, s.x0, s.normed1, s.stat1a, s.stat1b, w.norm1, g.norm1, back_self);
}

// ---------------------------------------------------------------------------------------------------------------
// The attention sublayer alone.

void attention_layer_forward(float* out, const float* xq, const float* xk, const float* xv, const BlockConfig& c,
                             const AttentionWeights& w, const BlockInput& in, bool causal, std::uint64_t seed,
                             AttentionLayerSaved* s, float* attn_weights) {
  const Dims d(c);
  const bool self = xq == xk && xk == xv;
  CPUFORMER_CHECK(in.B >= 1 && in.T >= 1 && (self || in.S >= 1), "attention_layer_forward: bad sizes B=", in.B,
                  " T=", in.T, " S=", in.S);
  check_attention(w, d, !self, "attention");
  const float p = s ? c.attention_dropout : 0.0f;
  static thread_local AttentionLayerSaved t_work;  // inference: this thread's buffers, reused from call to call
  AttentionLayerSaved& b = s ? *s : t_work;
  b.valid = false;
  const index_t rows = in.B * in.T;
  if (self) {
    const SelfSaves ss = self_saves(b, c, d, in.B, in.T, s != nullptr);
    self_attention_forward(out, xq, c, d, w, in, p, seed, ss, attn_weights, b.bias, b.tmp);
  } else {
    CPUFORMER_CHECK(c.position == PositionKind::kNone && !c.qk_norm,
                    "attention_layer_forward: positions and q/k norms apply to self-attention only");
    float* q = grow(b.q, rows * d.qdim);
    float* kv = grow(b.kv, in.B * in.S * 2 * d.kvdim);
    float* attn = grow(b.attn, rows * d.qdim);
    float* lse = s ? grow(s->lse, in.B * d.H * in.T) : nullptr;
    cross_attention_forward(out, xq, xk, xv, d, w, in, causal, p, seed, q, kv, attn, lse, attn_weights);
  }
  if (s) {
    s->in = in, s->self = self, s->causal = causal, s->dropout = p, s->seed = seed;
    s->xq = xq, s->xk = xk, s->xv = xv, s->valid = true;
  }
}

void attention_layer_backward(float* dxq, float* dxk, float* dxv, const float* dout, const BlockConfig& c,
                              const AttentionWeights& w, const AttentionGrads& g, AttentionLayerSaved& s) {
  CPUFORMER_CHECK(s.valid, "attention_layer_backward: no training forward to differentiate");
  const Dims d(c);
  const BlockInput& in = s.in;
  const index_t rows = in.B * in.T;
  if (!s.self) {
    if (dxk != dxq) std::fill(dxk, dxk + in.B * in.S * d.C, 0.0f);
    if (dxv != dxk && dxv != dxq) std::fill(dxv, dxv + in.B * in.S * d.C, 0.0f);
    cross_attention_backward(dxq, false, dxk, dxv, dout, s.xq, s.xk, s.xv, d, w, g, in, s.causal, s.dropout, s.seed,
                             s.q.data(), s.kv.data(), s.attn.data(), s.lse.data(), s.scratch);
    return;
  }
  const SelfSaves ss = self_saves(s, c, d, in.B, in.T, true);
  if (dxq == dxk && dxk == dxv) {  // the summed input gradient: one GEMM through the fused projection
    self_attention_backward(dxq, false, dout, s.xq, c, d, w, g, in, s.dropout, s.seed, ss, s.bias, s.scratch, s.tmp);
    return;
  }
  // Each input's own gradient: the projection's q, k and v parts separately (float weights, as training has).
  AttentionWeights parts = w;
  AttentionGrads pg = g;
  if (w.qkv.present()) {
    CPUFORMER_CHECK(w.qkv.weight && !w.qkv.in_out, "attention_layer_backward: needs the float (out, in) weight");
    const index_t offs[3] = {0, d.qdim, d.qdim + d.kvdim}, outs[3] = {d.qdim, d.kvdim, d.kvdim};
    LinearRef* dst[3] = {&parts.q, &parts.k, &parts.v};
    LinearGrads* gdst[3] = {&pg.q, &pg.k, &pg.v};
    for (int i = 0; i < 3; ++i) {
      *dst[i] = LinearRef{d.C, outs[i], w.qkv.weight + offs[i] * d.C, w.qkv.bias ? w.qkv.bias + offs[i] : nullptr};
      *gdst[i] = LinearGrads{g.qkv.weight ? g.qkv.weight + offs[i] * d.C : nullptr,
                             g.qkv.bias ? g.qkv.bias + offs[i] : nullptr};
    }
  }
  const float* dqkv =
      self_attention_backward_to_qkv(dout, c, d, w, g, in, s.dropout, s.seed, ss, s.bias, s.scratch, s.tmp);
  float* dx[3] = {dxq, dxk, dxv};
  const LinearRef* lr[3] = {&parts.q, &parts.k, &parts.v};
  const LinearGrads* lg[3] = {&pg.q, &pg.k, &pg.v};
  const index_t col[3] = {0, d.qdim, d.qdim + d.kvdim};
  for (int i = 0; i < 3; ++i)
    linear_backward(dx[i], d.C, false, lg[i]->weight, lg[i]->bias, dqkv + col[i], d.width, s.xq, d.C, rows, *lr[i]);
}

// ---------------------------------------------------------------------------------------------------------------
// Incremental decoding.

void KVCache::reset(index_t b, index_t cap, index_t wdt) {
  CPUFORMER_CHECK(b >= 1 && cap >= 1 && wdt >= 1, "KVCache: batch, capacity and width must be >= 1");
  batch = b, capacity = cap, width = wdt;
  k.assign(static_cast<size_t>(b * cap * wdt), 0.0f);
  v.assign(static_cast<size_t>(b * cap * wdt), 0.0f);
  length.assign(static_cast<size_t>(b), 0);
}

void KVCache::reserve(index_t cap) {
  if (cap <= capacity) return;
  const index_t old_row = capacity * width, row = cap * width;
  std::vector<float> nk(static_cast<size_t>(batch * row), 0.0f), nv(static_cast<size_t>(batch * row), 0.0f);
  for (index_t b = 0; b < batch; ++b) {
    std::copy_n(k.data() + b * old_row, length[b] * width, nk.data() + b * row);
    std::copy_n(v.data() + b * old_row, length[b] * width, nv.data() + b * row);
  }
  k.swap(nk), v.swap(nv);
  capacity = cap;
}

void KVCache::reorder(const std::int64_t* rows, index_t n) {
  CPUFORMER_CHECK(n >= 1, "KVCache::reorder: n must be >= 1");
  for (index_t i = 0; i < n; ++i)
    CPUFORMER_CHECK(rows[i] >= 0 && rows[i] < batch, "KVCache::reorder: row ", rows[i], " outside [0, ", batch, ")");
  // In place, once per beam-search step: rows that keep their own data are not touched, and only the sources that
  // a move would overwrite are saved first (a fresh copy of the whole cache each step cost more than the moves).
  const index_t row = capacity * width;
  std::vector<std::uint8_t> moved(static_cast<size_t>(std::max(n, batch)), 0), needed(static_cast<size_t>(batch), 0);
  for (index_t i = 0; i < n; ++i)
    if (rows[i] != i) moved[i] = 1, needed[rows[i]] = 1;
  std::vector<index_t> saved_slot(static_cast<size_t>(batch), -1);
  index_t n_saved = 0;
  for (index_t j = 0; j < batch; ++j)
    if (needed[j] && moved[j]) saved_slot[j] = n_saved++;
  std::vector<float> saved(static_cast<size_t>(2 * n_saved * row));
  std::vector<std::int64_t> saved_len(static_cast<size_t>(batch));
  for (index_t j = 0; j < batch; ++j) {
    saved_len[j] = length[j];
    if (saved_slot[j] < 0) continue;
    float* dst = saved.data() + 2 * saved_slot[j] * row;
    std::copy_n(k.data() + j * row, length[j] * width, dst);  // only the filled part matters
    std::copy_n(v.data() + j * row, length[j] * width, dst + row);
  }
  if (n > batch) {
    k.resize(static_cast<size_t>(n * row)), v.resize(static_cast<size_t>(n * row));
    length.resize(static_cast<size_t>(n));
  }
  for (index_t i = 0; i < n; ++i) {
    if (!moved[i]) continue;
    const index_t j = rows[i], len = saved_len[j] * width;
    const float* sk = saved_slot[j] >= 0 ? saved.data() + 2 * saved_slot[j] * row : k.data() + j * row;
    const float* sv = saved_slot[j] >= 0 ? saved.data() + (2 * saved_slot[j] + 1) * row : v.data() + j * row;
    std::copy_n(sk, len, k.data() + i * row);
    std::copy_n(sv, len, v.data() + i * row);
    length[i] = saved_len[j];
  }
  if (n < batch) {
    k.resize(static_cast<size_t>(n * row)), v.resize(static_cast<size_t>(n * row));
    length.resize(static_cast<size_t>(n));
  }
  batch = n;
}

void block_cross_cache(const float* memory, index_t B, index_t S, const BlockConfig& c, const BlockWeights& w,
                       KVCache& cache) {
  block_check(c, w);
  CPUFORMER_CHECK(c.cross_attention, "block_cross_cache: not a cross-attention block");
  CPUFORMER_CHECK(B >= 1 && S >= 1, "block_cross_cache: B and S must be >= 1");
  const Dims d(c);
  cache.reset(B, S, d.kvdim);
  std::vector<float> kv(static_cast<size_t>(B * S * 2 * d.kvdim));
  project_kv(kv.data(), memory, B * S, w.cross_attn, d);
  for (index_t r = 0; r < B * S; ++r) {
    std::copy_n(kv.data() + r * 2 * d.kvdim, d.kvdim, cache.k.data() + r * d.kvdim);
    std::copy_n(kv.data() + r * 2 * d.kvdim + d.kvdim, d.kvdim, cache.v.data() + r * d.kvdim);
  }
  std::fill(cache.length.begin(), cache.length.end(), S);
}

void block_decode(float* out, const float* x, const BlockConfig& c, const BlockWeights& w, index_t B, index_t T,
                  const std::int64_t* new_tokens, KVCache& cache, const KVCache* cross,
                  const std::uint8_t* memory_padding, const std::int64_t* output_rows) {
  block_check(c, w);
  const Dims d(c);
  CPUFORMER_CHECK(B >= 1 && T >= 1, "block_decode: B and T must be >= 1");
  CPUFORMER_CHECK(cache.batch == B && cache.width == d.kvdim, "block_decode: the cache holds ", cache.batch,
                  " rows of width ", cache.width, ", expected ", B, " rows of width ", d.kvdim);
  CPUFORMER_CHECK(!c.cross_attention || (cross && cross->batch == B && cross->width == d.kvdim),
                  "block_decode: a cross-attention block needs its cross cache (block_cross_cache) for these rows");
  std::vector<std::int64_t> offset(cache.length), n_new(static_cast<size_t>(B), T), key_len(static_cast<size_t>(B));
  index_t S = 0;
  for (index_t b = 0; b < B; ++b) {
    if (new_tokens) n_new[b] = new_tokens[b];
    CPUFORMER_CHECK(n_new[b] >= 0 && n_new[b] <= T, "block_decode: new_tokens[", b, "] must be in [0, ", T, "]");
    key_len[b] = offset[b] + n_new[b];
    CPUFORMER_CHECK(key_len[b] <= cache.capacity, "block_decode: row ", b, " would hold ", key_len[b],
                    " positions, past the cache's capacity ", cache.capacity);
    S = std::max<index_t>(S, std::max<std::int64_t>(key_len[b], 1));
    CPUFORMER_CHECK(!output_rows || (output_rows[b] >= 0 && output_rows[b] < std::max<std::int64_t>(n_new[b], 1)),
                    "block_decode: output_rows[", b, "] must be one of the row's new positions [0, ", n_new[b], ")");
  }
  const index_t rows = B * T, n = rows * d.C;
  // With output_rows only one position per row goes on past the keys and values (the queries, the output
  // projection, the feed-forward): Tq positions per row, q_offset their positions.
  const index_t Tq = output_rows ? 1 : T, rows_q = B * Tq, n_q = rows_q * d.C;
  std::vector<std::int64_t> q_offset(offset);
  if (output_rows)
    for (index_t b = 0; b < B; ++b) q_offset[b] += output_rows[b];
  // Every buffer below is written in full before it is read: no zero fill (a 128-token prompt through a 0.5B model
  // zeroed ~200 MB of fresh pages per call).
  const auto buffer = [](index_t count) { return std::unique_ptr<float[]>(new float[static_cast<size_t>(count)]); };
  std::vector<float> cur(x, x + n), tmp;
  const auto y = buffer(n), h = buffer(n);
  // A sublayer over `r` rows of cur: norm (first or after), run(y, input), residual. `keep` (self-attention with
  // output_rows) runs on all rows, then cur keeps only the output rows before the residual.
  auto sublayer = [&](const NormRef& nr, auto&& run, bool keep = false) {
    const index_t r = keep ? rows : rows_q;
    std::vector<float> sa(static_cast<size_t>(r)), sb(static_cast<size_t>(r));
    const float* in = cur.data();
    if (c.norm_first) {
      norm_forward(c, nr, h.get(), sa.data(), sb.data(), cur.data(), r, d.C);
      in = h.get();
    }
    run(y.get(), in);
    if (keep && output_rows) {
      for (index_t b = 0; b < B; ++b)  // row b's output position moves to row b (never past it: in place)
        std::memmove(cur.data() + b * d.C, cur.data() + (b * T + output_rows[b]) * d.C, sizeof(float) * d.C);
      cur.resize(static_cast<size_t>(n_q));
    }
    residual_forward(cur.data(), cur.data(), y.get(), n_q);
    if (!c.norm_first) norm_forward(c, nr, cur.data(), sa.data(), sb.data(), cur.data(), rows_q, d.C);
  };
  // Self-attention over the cache.
  sublayer(w.norm1, [&](float* yy, const float* hh) {
    const auto qkv_buffer = buffer(rows * d.width), attn = buffer(rows * d.qdim);
    float* const qkv = qkv_buffer.get();
    project_qkv(qkv, hh, rows, w.self_attn, d);
    if (c.qk_norm) {
      head_norm_forward(qkv, d.width, rows, d.H, d.D, w.self_attn.q_norm, c, nullptr, nullptr, tmp);
      head_norm_forward(qkv + d.qdim, d.width, rows, d.KVH, d.D, w.self_attn.k_norm, c, nullptr, nullptr, tmp);
    }
    if (c.position == PositionKind::kRotary) {
      const RotaryConfig rc = rotary_of(c, d);
      rotary_forward(HeadTensor{qkv, T * d.width, d.width}, B, T, d.H, nullptr, offset.data(), rc);
      rotary_forward(HeadTensor{qkv + d.qdim, T * d.width, d.width}, B, T, d.KVH, nullptr, offset.data(), rc);
    }
    for (index_t b = 0; b < B; ++b)  // append the real new keys and values
      for (index_t t = 0; t < n_new[b]; ++t) {
        const float* row = qkv + (b * T + t) * d.width;
        const index_t at = (b * cache.capacity + offset[b] + t) * d.kvdim;
        std::copy_n(row + d.qdim, d.kvdim, cache.k.data() + at);
        std::copy_n(row + d.qdim + d.kvdim, d.kvdim, cache.v.data() + at);
      }
    AttentionMask m;
    m.causal = true;
    m.query_offset = q_offset.data();
    m.key_length = key_len.data();
    m.window = c.sliding_window;
    std::vector<float> slopes, bias;
    if (c.position == PositionKind::kAlibi) slopes = alibi_slopes(d.H), m.alibi_slopes = slopes.data();
    if (c.position == PositionKind::kRelativeBias) {
      bias.resize(static_cast<size_t>(B * d.H * Tq * S));
      for (index_t b = 0; b < B; ++b)
        relative_bias_forward(bias.data() + b * d.H * Tq * S, w.self_attn.relative_table, d.H, Tq, S, q_offset[b],
                              c.relative);
      m.additive = bias.data(), m.add_sb = d.H * Tq * S, m.add_sh = Tq * S, m.add_st = S;
    }
    // the queries: every new position's, or each row's output position's
    std::vector<float> picked;
    const float* q = qkv;
    index_t ldq = d.width;
    if (output_rows) {
      picked.resize(static_cast<size_t>(B * d.qdim));
      for (index_t b = 0; b < B; ++b)
        std::copy_n(qkv + (b * T + output_rows[b]) * d.width, d.qdim, picked.data() + b * d.qdim);
      q = picked.data(), ldq = d.qdim;
    }
    const index_t cs = cache.capacity * d.kvdim;
    attention_forward(HeadTensor{attn.get(), Tq * d.qdim, d.qdim}, nullptr, ConstHeadTensor{q, Tq * ldq, ldq},
                      ConstHeadTensor{cache.k.data(), cs, d.kvdim}, ConstHeadTensor{cache.v.data(), cs, d.kvdim}, m,
                      attention_config(d, B, Tq, S, 0.0f, 0));
    linear_forward(yy, d.C, attn.get(), d.qdim, rows_q, w.self_attn.o);
  }, true);
  if (c.cross_attention) {
    sublayer(w.norm2, [&](float* yy, const float* hh) {
      const auto q = buffer(rows_q * d.qdim), attn = buffer(rows_q * d.qdim);
      linear_forward(q.get(), d.qdim, hh, d.C, rows_q, w.cross_attn.q);
      AttentionMask m;
      m.key_padding = memory_padding;
      const index_t Sm = cross->capacity, cs = Sm * d.kvdim;
      attention_forward(HeadTensor{attn.get(), Tq * d.qdim, d.qdim}, nullptr,
                        ConstHeadTensor{q.get(), Tq * d.qdim, d.qdim}, ConstHeadTensor{cross->k.data(), cs, d.kvdim},
                        ConstHeadTensor{cross->v.data(), cs, d.kvdim}, m, attention_config(d, B, Tq, Sm, 0.0f, 0));
      linear_forward(yy, d.C, attn.get(), d.qdim, rows_q, w.cross_attn.o);
    });
  }
  sublayer(w.norm_ff, [&](float* yy, const float* hh) {
    const index_t F = w.ff.up.out;
    const auto u = buffer(rows_q * feedforward_u_width(w.ff)), a = buffer(rows_q * F);
    feedforward_forward(yy, u.get(), a.get(), hh, w.ff, rows_q, c.activation, 0.0f, 0);
  });
  for (index_t b = 0; b < B; ++b) cache.length[b] = key_len[b];
  std::memcpy(out, cur.data(), sizeof(float) * n_q);
}

}  // namespace cpuformer
