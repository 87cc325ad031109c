// cpuformer/activations.h: element-wise activations (optionally fused with a bias add), dropout, residual add.
#pragma once

#include <cstdint>

#include "cpuformer/common.h"

namespace cpuformer {

enum class Activation { kIdentity, kRelu, kGeluErf, kGeluTanh, kSilu };  // kSilu: x * sigmoid(x)

// out[r, c] = act(inp[r, c] + bias[c]); bias may be null. out may alias inp.
void activation_forward(float* out, const float* inp, const float* bias, index_t rows, index_t cols,
                        Activation act);
// dinp = dout * act'(inp + bias), where inp is the PRE-activation input given to forward; dinp may alias dout.
// dbias += column sums of dinp when dbias is non-null (the fused bias gradient).
void activation_backward(float* dinp, float* dbias, const float* dout, const float* inp, const float* bias,
                         index_t rows, index_t cols, Activation act);

// Gated linear unit (SwiGLU, GeGLU, ReGLU): out[r, c] = act(gate[r, c]) * up[r, c], rows at strides ldg, ldu,
// ldo. out may alias up.
void gated_forward(float* out, index_t ldo, const float* gate, index_t ldg, const float* up, index_t ldu, index_t rows,
                   index_t cols, Activation act);
// dgate = dout * up * act'(gate), dup = dout * act(gate) (overwritten). Each element's inputs are read before its
// outputs are written, so dgate or dup may be dout itself (same strides); they must not overlap gate or up otherwise.
void gated_backward(float* dgate, index_t lddg, float* dup, index_t lddu, const float* dout, index_t ldo,
                    const float* gate, index_t ldg, const float* up, index_t ldu, index_t rows, index_t cols,
                    Activation act);

// dbias[c] += sum over rows of dout[r, c] (the gradient of a bias added to every row); rows ld floats apart (ld < 0:
// cols). Each column is summed in row order in double: the same bits for any thread count and SIMD path.
void bias_backward(float* dbias, const float* dout, index_t rows, index_t cols, index_t ld = -1);

// Inverted dropout: out = inp * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn from a counter-based hash of
// (seed, element index), so the mask does not depend on the thread count and backward regenerates it
// instead of storing it. mask (uint8, may be null) receives the keep flags.
void dropout_forward(float* out, std::uint8_t* mask, const float* inp, index_t n, float p, std::uint64_t seed);
// dinp = dout * keep / (1 - p) with keep regenerated from (seed, index).
void dropout_backward(float* dinp, const float* dout, index_t n, float p, std::uint64_t seed);

// out = a + b (out may alias a or b).
void residual_forward(float* out, const float* a, const float* b, index_t n);

}  // namespace cpuformer
