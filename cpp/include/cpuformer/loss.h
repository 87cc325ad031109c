// cpuformer/loss.h: cross-entropy over logits, fused forward + backward.
#pragma once

#include <cstdint>

#include "cpuformer/common.h"

namespace cpuformer {

// logits (N, V), targets (N). Rows whose target == ignore_index count for nothing.
// Loss per row (as PyTorch): (1 - s) * (lse - x[t]) + s * (lse - mean_j x[j]), s = label_smoothing.
// Returns the MEAN loss over the non-ignored rows (0 when there are none), accumulated in double.
// If dlogits is non-null it receives d(mean loss)/d(logits) * grad_scale
//   = (softmax(x) - (1 - s) * onehot(t) - s / V) * grad_scale / n_valid   (zero rows for ignored targets).
// dlogits may alias logits (computed in place, no extra V-sized buffer). Targets outside [0, V) other than
// ignore_index throw std::out_of_range before anything is written. n_valid_out (may be null) gets the count.
double cross_entropy_forward_backward(float* dlogits, const float* logits, const std::int64_t* targets, index_t N,
                                      index_t V, std::int64_t ignore_index, float label_smoothing,
                                      float grad_scale = 1.0f, index_t* n_valid_out = nullptr);

}  // namespace cpuformer
