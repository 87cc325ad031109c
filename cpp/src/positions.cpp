// positions.cpp: rotary position embeddings (RoPE), ALiBi slopes and T5's bucketed relative position bias.
//
// Numerics follow transformers (float32 throughout, in the order its torch code evaluates):
//   inv_freq[i] = 1 / theta^(float(2i) / float(d))  (float32 division, pow rounded to float32, float32 reciprocal)
//   angle = float(pos) * inv_freq[i]                 (a float32 product), cos/sin in float32
//   y1 = x1 * cos - x2 * sin, y2 = x2 * cos + x1 * sin (no FMA contraction: -ffp-contract=off)
// so outputs agree with transformers' apply_rotary_pos_emb up to the last-bit differences of the pow/sin/cos
// implementations.
#include "cpuformer/positions.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"

namespace cpuformer {
namespace {

constexpr index_t kMinElemsPerThread = 1 << 14;

index_t rotary_dim_of(const RotaryConfig& cfg) { return cfg.rotary_dim == 0 ? cfg.head_dim : cfg.rotary_dim; }

void check_rotary_config(const RotaryConfig& cfg) {
  CPUFORMER_CHECK(cfg.head_dim >= 2, "rotary: head_dim must be >= 2, got ", cfg.head_dim);
  const index_t rd = rotary_dim_of(cfg);
  CPUFORMER_CHECK(cfg.rotary_dim >= 0 && rd >= 2 && rd <= cfg.head_dim && rd % 2 == 0,
                  "rotary: rotary_dim must be even and in [2, head_dim=", cfg.head_dim, "], got ", cfg.rotary_dim);
  CPUFORMER_CHECK(std::isfinite(cfg.theta) && cfg.theta > 0.0, "rotary: theta must be finite and > 0, got ",
                  cfg.theta);
  CPUFORMER_CHECK(std::isfinite(cfg.linear_factor) && cfg.linear_factor > 0.0,
                  "rotary: linear scaling factor must be finite and > 0, got ", cfg.linear_factor);
  CPUFORMER_CHECK(std::isfinite(cfg.llama3_factor) && cfg.llama3_factor >= 0.0,
                  "rotary: llama3 factor must be finite and >= 0 (0: no llama3 scaling), got ", cfg.llama3_factor);
  if (cfg.llama3_factor > 0.0) {
    CPUFORMER_CHECK(cfg.linear_factor == 1.0, "rotary: linear and llama3 scaling cannot be combined");
    CPUFORMER_CHECK(std::isfinite(cfg.low_freq_factor) && std::isfinite(cfg.high_freq_factor) &&
                        cfg.low_freq_factor > 0.0 && cfg.high_freq_factor > cfg.low_freq_factor,
                    "rotary: llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got low_freq_factor=",
                    cfg.low_freq_factor, " high_freq_factor=", cfg.high_freq_factor);
    CPUFORMER_CHECK(cfg.original_max_position >= 1,
                    "rotary: llama3 original_max_position_embeddings must be >= 1, got ", cfg.original_max_position);
  }
}

// Row (b, t) of x rotated by +angle (sign = 1) or -angle (sign = -1).
void rotate(HeadTensor x, index_t B, index_t T, index_t heads, const std::int64_t* positions,
            const std::int64_t* offset, const RotaryConfig& cfg, float sign, const char* who) {
  check_rotary_config(cfg);
  CPUFORMER_CHECK(B >= 0 && T >= 0 && heads >= 1, who, ": bad size B=", B, " T=", T, " heads=", heads);
  CPUFORMER_CHECK(T <= 1 || x.st >= heads * cfg.head_dim, who, ": time stride ", x.st, " is below heads * head_dim = ",
                  heads * cfg.head_dim);
  CPUFORMER_CHECK(B <= 1 || x.sb >= 0, who, ": negative batch stride");
  if (B == 0 || T == 0) return;
  const std::vector<float> inv = rotary_inv_freq(cfg);
  const index_t rd = rotary_dim_of(cfg), half = rd / 2, D = cfg.head_dim;
  const bool interleaved = cfg.layout == RotaryLayout::kInterleaved;
  // cos/sin cost about as much as rotating 8 heads' worth of pairs
  const index_t per_row = heads * rd + 8 * rd;
  detail::parallel_for(B * T, std::max<index_t>(1, kMinElemsPerThread / per_row), [&](index_t r0, index_t r1, int) {
    std::vector<float> cs(static_cast<size_t>(rd));
    float* c = cs.data();
    float* s = c + half;
    for (index_t r = r0; r < r1; ++r) {
      const index_t b = r / T, t = r % T;
      const std::int64_t pos = positions ? positions[r] : (offset ? offset[b] : 0) + t;
      const float fp = static_cast<float>(pos);
      for (index_t i = 0; i < half; ++i) {
        const float a = fp * inv[i];
        c[i] = std::cos(a);
        s[i] = sign * std::sin(a);
      }
      float* row = x.data + b * x.sb + t * x.st;
      for (index_t h = 0; h < heads; ++h) {
        float* v = row + h * D;
        if (interleaved) {
          for (index_t i = 0; i < half; ++i) {
            const float x1 = v[2 * i], x2 = v[2 * i + 1];
            v[2 * i] = x1 * c[i] - x2 * s[i];
            v[2 * i + 1] = x2 * c[i] + x1 * s[i];
          }
        } else {
          float* v2 = v + half;
          for (index_t i = 0; i < half; ++i) {
            const float x1 = v[i], x2 = v2[i];
            v[i] = x1 * c[i] - x2 * s[i];
            v2[i] = x2 * c[i] + x1 * s[i];
          }
        }
      }
    }
  });
}

void check_bias_config(const RelativeBiasConfig& cfg) {
  const index_t n = cfg.bidirectional ? cfg.num_buckets / 2 : cfg.num_buckets;
  CPUFORMER_CHECK(n / 2 >= 1, "relative position bias: num_buckets must be >= ", cfg.bidirectional ? 4 : 2,
                  (cfg.bidirectional ? " when bidirectional" : " when causal"), ", got ", cfg.num_buckets);
  CPUFORMER_CHECK(cfg.max_distance > n / 2, "relative position bias: max_distance must exceed the exact range ", n / 2,
                  " (num_buckets ", cfg.num_buckets, (cfg.bidirectional ? ", bidirectional" : ", causal"),
                  "), got ", cfg.max_distance);
}

// Bucket with the configuration already checked.
index_t bucket_of(std::int64_t rel, const RelativeBiasConfig& cfg) {
  index_t n = cfg.num_buckets, bucket = 0;
  std::uint64_t r;  // |rel| (bidirectional) or max(-rel, 0) (causal), without int64 overflow at INT64_MIN
  if (cfg.bidirectional) {
    n /= 2;
    if (rel > 0) bucket += n;
    r = rel < 0 ? 0 - static_cast<std::uint64_t>(rel) : static_cast<std::uint64_t>(rel);
  } else {
    r = rel < 0 ? 0 - static_cast<std::uint64_t>(rel) : 0;
  }
  const index_t exact = n / 2;
  if (r < static_cast<std::uint64_t>(exact)) return bucket + static_cast<index_t>(r);
  // transformers: max_exact + (log(r.float() / max_exact) / math.log(max_distance / max_exact)
  //                             * (num_buckets - max_exact)).to(long), then min(., num_buckets - 1); each step float32
  const float ratio = static_cast<float>(r) / static_cast<float>(exact);
  const float denom = static_cast<float>(std::log(static_cast<double>(cfg.max_distance) / static_cast<double>(exact)));
  const float v = std::log(ratio) / denom * static_cast<float>(n - exact);
  const index_t large = v >= static_cast<float>(n - 1 - exact) ? n - 1 : exact + static_cast<index_t>(v);
  return bucket + large;
}

// bucket[k] for k = s - t + T - 1 in [0, T + S - 1): the bucket depends only on s - t.
std::vector<index_t> bucket_table(index_t T, index_t S, std::int64_t query_offset, const RelativeBiasConfig& cfg) {
  std::vector<index_t> buckets(static_cast<size_t>(T + S - 1));
  for (index_t k = 0; k < T + S - 1; ++k) buckets[k] = bucket_of(k - (T - 1) - query_offset, cfg);
  return buckets;
}

}  // namespace

std::vector<float> rotary_inv_freq(const RotaryConfig& cfg) {
  check_rotary_config(cfg);
  const index_t rd = rotary_dim_of(cfg), half = rd / 2;
  const float base = static_cast<float>(cfg.theta);
  std::vector<float> inv(static_cast<size_t>(half));
  for (index_t i = 0; i < half; ++i) {
    // torch: 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), float32
    const float e = static_cast<float>(2 * i) / static_cast<float>(rd);
    const float p = static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
    inv[i] = 1.0f / p;
  }
  if (cfg.linear_factor != 1.0) {
    const float f = static_cast<float>(cfg.linear_factor);
    for (auto& v : inv) v /= f;  // _compute_linear_scaling_rope_parameters: inv_freq /= factor
  }
  if (cfg.llama3_factor > 0.0) {  // _compute_llama3_parameters, op by op in float32
    const float factor = static_cast<float>(cfg.llama3_factor);
    const float lf = static_cast<float>(cfg.low_freq_factor);
    const double old_len = static_cast<double>(cfg.original_max_position);
    const float low_wavelen = static_cast<float>(old_len / cfg.low_freq_factor);
    const float high_wavelen = static_cast<float>(old_len / cfg.high_freq_factor);
    const float two_pi = static_cast<float>(6.283185307179586), old_len_f = static_cast<float>(old_len);
    const float span = static_cast<float>(cfg.high_freq_factor - cfg.low_freq_factor);
    for (auto& v : inv) {
      const float wavelen = (1.0f / v) * two_pi;  // 2 * math.pi / inv_freq = inv_freq.reciprocal() * (2 pi)
      const float llama = wavelen > low_wavelen ? v / factor : v;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const float smooth = ((1.0f / wavelen) * old_len_f - lf) / span;
        v = (1.0f - smooth) * llama / factor + smooth * llama;
      } else {
        v = llama;
      }
    }
  }
  return inv;
}

void rotary_forward(HeadTensor x, index_t B, index_t T, index_t heads, const std::int64_t* positions,
                    const std::int64_t* offset, const RotaryConfig& cfg) {
  rotate(x, B, T, heads, positions, offset, cfg, 1.0f, "rotary_forward");
}

void rotary_backward(HeadTensor dx, index_t B, index_t T, index_t heads, const std::int64_t* positions,
                     const std::int64_t* offset, const RotaryConfig& cfg) {
  rotate(dx, B, T, heads, positions, offset, cfg, -1.0f, "rotary_backward");
}

std::vector<float> alibi_slopes(index_t num_heads) {
  CPUFORMER_CHECK(num_heads >= 1, "alibi_slopes: num_heads must be >= 1, got ", num_heads);
  // transformers' BLOOM build_alibi_tensor: base = float32(2^(-(2^-(log2(p) - 3)))) = 2^(-8/p) for the closest
  // power of two p <= num_heads, slopes base^1..base^p; the remaining heads take the odd powers 1, 3, 5, ... of
  // float32(2^(-8/(2p))).
  index_t p = 1;
  while (p * 2 <= num_heads) p *= 2;
  const auto base_for = [](index_t q) {
    return static_cast<float>(std::pow(2.0, -std::pow(2.0, -(std::log2(static_cast<double>(q)) - 3.0))));
  };
  std::vector<float> slopes;
  slopes.reserve(static_cast<size_t>(num_heads));
  const double base = base_for(p);
  for (index_t k = 1; k <= p; ++k) slopes.push_back(static_cast<float>(std::pow(base, static_cast<double>(k))));
  if (p != num_heads) {
    const double extra = base_for(2 * p);
    const index_t remaining = std::min(p, num_heads - p);
    for (index_t k = 0; k < remaining; ++k)
      slopes.push_back(static_cast<float>(std::pow(extra, static_cast<double>(2 * k + 1))));
  }
  return slopes;
}

index_t relative_position_bucket(std::int64_t relative_position, const RelativeBiasConfig& cfg) {
  check_bias_config(cfg);
  return bucket_of(relative_position, cfg);
}

void relative_bias_forward(float* bias, const float* table, index_t heads, index_t T, index_t S,
                           std::int64_t query_offset, const RelativeBiasConfig& cfg) {
  check_bias_config(cfg);
  CPUFORMER_CHECK(heads >= 1 && T >= 0 && S >= 0, "relative_bias_forward: bad size heads=", heads, " T=", T, " S=", S);
  if (T == 0 || S == 0) return;
  const std::vector<index_t> buckets = bucket_table(T, S, query_offset, cfg);
  detail::parallel_for(heads * T, std::max<index_t>(1, kMinElemsPerThread / S), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
      const index_t h = r / T, t = r % T;
      float* out = bias + r * S;
      const index_t* bk = buckets.data() + (T - 1 - t);  // bk[s] = bucket(s - t)
      for (index_t s = 0; s < S; ++s) out[s] = table[bk[s] * heads + h];
    }
  });
}

void relative_bias_backward(float* dtable, const float* dbias, index_t heads, index_t T, index_t S,
                            std::int64_t query_offset, const RelativeBiasConfig& cfg) {
  check_bias_config(cfg);
  CPUFORMER_CHECK(heads >= 1 && T >= 0 && S >= 0, "relative_bias_backward: bad size heads=", heads, " T=", T, " S=", S);
  if (T == 0 || S == 0) return;
  const std::vector<index_t> buckets = bucket_table(T, S, query_offset, cfg);
  const index_t nb = cfg.num_buckets;
  // Threads own heads (each head's column of dtable): deterministic, no shared partial sums.
  detail::parallel_for(heads, std::max<index_t>(1, kMinElemsPerThread / std::max<index_t>(1, T * S)),
                       [&](index_t h0, index_t h1, int) {
                         std::vector<double> acc(static_cast<size_t>(nb));
                         for (index_t h = h0; h < h1; ++h) {
                           std::fill(acc.begin(), acc.end(), 0.0);
                           for (index_t t = 0; t < T; ++t) {
                             const float* g = dbias + (h * T + t) * S;
                             const index_t* bk = buckets.data() + (T - 1 - t);
                             for (index_t s = 0; s < S; ++s) acc[bk[s]] += g[s];
                           }
                           for (index_t b = 0; b < nb; ++b) dtable[b * heads + h] += static_cast<float>(acc[b]);
                         }
                       });
}

}  // namespace cpuformer
