// cpuformer/softmax.h: softmax and log-softmax over the last axis of a (rows, cols) matrix.
#pragma once

#include "cpuformer/common.h"

namespace cpuformer {

// out = softmax(inp) row-wise, stable (the row max is subtracted). A row of all -inf gives zeros.
void softmax_forward(float* out, const float* inp, index_t rows, index_t cols);
// dinp = out * (dout - sum(out * dout))
void softmax_backward(float* dinp, const float* dout, const float* out, index_t rows, index_t cols);
// out = inp - logsumexp(inp)
void log_softmax_forward(float* out, const float* inp, index_t rows, index_t cols);
// dinp = dout - exp(out) * sum(dout)
void log_softmax_backward(float* dinp, const float* dout, const float* out, index_t rows, index_t cols);

}  // namespace cpuformer
