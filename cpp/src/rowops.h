// rowops.h (private): row primitives shared by softmax, attention and the loss (implemented in softmax.cpp).
#pragma once

#include "cpuformer/common.h"

namespace cpuformer::detail {

// max of x[0..n), -inf for an empty or all -inf row, NaN when any element is NaN (the same value on every path).
float row_max(const float* x, index_t n);
// Writes out[j] = exp(x[j] - shift) (out may alias x, or be null) and returns the sum, accumulated in float lanes
// and flushed to double. exp of -inf (and of anything below about -87) is exactly 0.
double row_exp_sum(float* out, const float* x, index_t n, float shift);
// x[j] *= s
void row_scale(float* x, index_t n, float s);

}  // namespace cpuformer::detail
