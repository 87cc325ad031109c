// cpuformer/positions.h: position information inside attention: rotary embeddings (RoPE), ALiBi slopes and the
// T5-style bucketed relative position bias.
#pragma once

#include <cstdint>
#include <vector>

#include "cpuformer/attention.h"
#include "cpuformer/common.h"

namespace cpuformer {

// Rotary position embedding of each head's first rotary_dim features, in place, as Hugging Face applies it.
//   kHalf ("neox", Llama/Qwen/Mistral/Gemma in transformers): pairs (i, i + rotary_dim/2);
//   kInterleaved (GPT-J, Meta's original Llama code): pairs (2i, 2i + 1).
// Pair i turns by angle pos * inv_freq[i], inv_freq[i] = theta^(-2i/rotary_dim), optionally rescaled.
enum class RotaryLayout { kHalf, kInterleaved };

struct RotaryConfig {
  index_t head_dim = 0;
  index_t rotary_dim = 0;  // even, <= head_dim; 0 = head_dim (partial_rotary_factor * head_dim otherwise)
  RotaryLayout layout = RotaryLayout::kHalf;
  double theta = 10000.0;
  double linear_factor = 1.0;  // rope_type "linear": inv_freq divided by it in float32, as transformers does
  // rope_type "llama3" (Llama 3.1+) when llama3_factor > 0: long wavelengths divided by the factor, short kept,
  // those between interpolated smoothly.
  double llama3_factor = 0.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  index_t original_max_position = 8192;
};

// The rotary_dim / 2 inverse frequencies (float32, as transformers' rope init functions return them).
std::vector<float> rotary_inv_freq(const RotaryConfig& cfg);

// x: rows (b, t) of `heads` heads of head_dim features side by side (HeadTensor strides; heads * head_dim <= st).
// Row (b, t) has position positions[b * T + t] when positions is non-null, else offset[b] + t (offset null: t).
// forward rotates by +angle; backward (the gradient, x holding dL/dy) by -angle. cos/sin computed per position
// in float32 from float32 angle = float(pos) * inv_freq, as transformers does.
void rotary_forward(HeadTensor x, index_t B, index_t T, index_t heads, const std::int64_t* positions,
                    const std::int64_t* offset, const RotaryConfig& cfg);
void rotary_backward(HeadTensor dx, index_t B, index_t T, index_t heads, const std::int64_t* positions,
                     const std::int64_t* offset, const RotaryConfig& cfg);

// ALiBi slopes for num_heads heads (the geometric sequence of the paper, with the closest-power-of-two rule for
// other head counts, as BLOOM and MPT compute them).
std::vector<float> alibi_slopes(index_t num_heads);

// T5's relative position bucket of (key position - query position), exactly as transformers'
// T5Attention._relative_position_bucket (its float32 logarithm included). Needs num_buckets >= 4 (bidirectional) or
// >= 2 (causal) and max_distance > the exact range (num_buckets/4 or /2); std::invalid_argument otherwise.
// (INT64_MIN, whose magnitude torch.abs overflows, gets the farthest bucket here.)
struct RelativeBiasConfig {
  index_t num_buckets = 32, max_distance = 128;
  bool bidirectional = true;  // encoders; decoders (causal) use one-sided buckets
};
index_t relative_position_bucket(std::int64_t relative_position, const RelativeBiasConfig& cfg);

// bias (heads, T, S) = table[bucket(s - (query_offset + t)), h] with table (num_buckets, heads) (the layout of
// transformers' relative_attention_bias.weight). backward accumulates dbias (heads, T, S) into dtable.
void relative_bias_forward(float* bias, const float* table, index_t heads, index_t T, index_t S,
                           std::int64_t query_offset, const RelativeBiasConfig& cfg);
void relative_bias_backward(float* dtable, const float* dbias, index_t heads, index_t T, index_t S,
                            std::int64_t query_offset, const RelativeBiasConfig& cfg);

}  // namespace cpuformer
