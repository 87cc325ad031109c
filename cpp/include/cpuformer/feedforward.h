// cpuformer/feedforward.h: the position-wise feed-forward network, out = dropout(act(x W1^T + b1)) W2^T + b2.
#pragma once

#include <cstdint>

#include "cpuformer/activations.h"
#include "cpuformer/common.h"

namespace cpuformer {

// x (rows, C), w1 (F, C), b1 (F), w2 (C, F), b2 (C) in PyTorch's Linear layout; biases may be null.
// Saves u = x W1^T + b1 and a = dropout(act(u)) (both (rows, F)) for backward. The bias is added in the GEMM's
// write-back and the activation (with dropout, when p > 0) in one pass over u.
void feedforward_forward(float* out, float* u, float* a, const float* x, const float* w1, const float* b1,
                         const float* w2, const float* b2, index_t rows, index_t C, index_t F, Activation act,
                         float dropout_p = 0.0f, std::uint64_t seed = 0);

// dx overwritten; dw1, db1, dw2, db2 accumulated (biases' may be null). The activation derivative and the b1
// gradient are one pass; the dropout mask is regenerated from (seed, index). `scratch` (rows * F floats, contents
// ignored and overwritten) holds the hidden-layer gradient: callers that train keep one and pass it every step,
// since a fresh multi-megabyte buffer per call costs page faults on first touch.
void feedforward_backward(float* dx, float* dw1, float* db1, float* dw2, float* db2, const float* dout,
                          const float* x, const float* u, const float* a, const float* w1, const float* w2,
                          float* scratch, index_t rows, index_t C, index_t F, Activation act,
                          float dropout_p = 0.0f, std::uint64_t seed = 0);

}  // namespace cpuformer
