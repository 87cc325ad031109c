// cpuformer/embedding.h: token embedding lookup.
#pragma once

#include <cstdint>

#include "cpuformer/common.h"
#include "cpuformer/half.h"

namespace cpuformer {

// out[t, :] = weight[ids[t], :] for t < n; ids are checked against V first (std::out_of_range, nothing written).
void embedding_forward(float* out, const std::int64_t* ids, const float* weight, index_t n, index_t V, index_t C);

// The same lookup from a 16-bit table (bf16 or f16, V x C), each row converted to float32 (exactly).
void embedding_forward_half(float* out, const std::int64_t* ids, const std::uint16_t* weight, HalfType t, index_t n,
                            index_t V, index_t C);

// dweight[ids[t], :] += dout[t, :], deterministic and thread-safe: threads own disjoint column ranges.
// Rows whose id equals padding_idx (when padding_idx >= 0) get no gradient, as in PyTorch.
void embedding_backward(float* dweight, const float* dout, const std::int64_t* ids, index_t n, index_t V,
                        index_t C, std::int64_t padding_idx = -1);

}  // namespace cpuformer
