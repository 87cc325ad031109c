// cpuformer/feedforward.h: the position-wise feed-forward network, plain or gated:
//   plain:  out = down(dropout(act(up(x))))                       (Transformer, BERT, GPT-2: linear1/linear2)
//   gated:  out = down(dropout(act(gate(x)) * up(x)))              (SwiGLU / GeGLU: Llama, Gemma, T5 v1.1)
// The weights are LinearRefs (PyTorch layout, any prepared form for inference), so the same definition serves
// training, Python inference and the C++ runtime.
#pragma once

#include <cstdint>

#include "cpuformer/activations.h"
#include "cpuformer/common.h"
#include "cpuformer/linear.h"

namespace cpuformer {

struct FeedForwardWeights {
  LinearRef up;    // (F, C): linear1 / up_proj / wi_1
  LinearRef gate;  // (F, C): gate_proj / wi_0; absent = not gated
  LinearRef down;  // (C, F): linear2 / down_proj / wo
  bool gated() const { return gate.present(); }
};
struct FeedForwardGrads {  // accumulated; any may be null (a frozen parameter gets no gradient work)
  float *up_w = nullptr, *up_b = nullptr, *gate_w = nullptr, *gate_b = nullptr, *down_w = nullptr,
        *down_b = nullptr;
};

// Hidden widths of the saved buffers: u holds the pre-activations (rows, F), or (rows, 2F) = [gate | up] when
// gated; a holds the hidden activations after dropout (rows, F). Backward's scratch: rows * F (plain), 3F (gated).
inline index_t feedforward_u_width(const FeedForwardWeights& w) { return w.gated() ? 2 * w.up.out : w.up.out; }
inline index_t feedforward_scratch_width(const FeedForwardWeights& w) { return w.gated() ? 3 * w.up.out : w.up.out; }

// x (rows, C) -> out (rows, C); u and a as above (saved for backward in training, scratch in inference).
void feedforward_forward(float* out, float* u, float* a, const float* x, const FeedForwardWeights& w, index_t rows,
                         Activation act, float dropout_p = 0.0f, std::uint64_t seed = 0);

// dx overwritten (added when accumulate_dx); parameter gradients accumulated.
void feedforward_backward(float* dx, bool accumulate_dx, const FeedForwardGrads& g, const float* dout,
                          const float* x, const float* u, const float* a, const FeedForwardWeights& w,
                          float* scratch, index_t rows, Activation act, float dropout_p = 0.0f,
                          std::uint64_t seed = 0);

// The plain network with float weights as raw pointers (w1 (F, C), b1 (F), w2 (C, F), b2 (C); biases may be null).
void feedforward_forward(float* out, float* u, float* a, const float* x, const float* w1, const float* b1,
                         const float* w2, const float* b2, index_t rows, index_t C, index_t F, Activation act,
                         float dropout_p = 0.0f, std::uint64_t seed = 0);
void feedforward_backward(float* dx, float* dw1, float* db1, float* dw2, float* db2, const float* dout,
                          const float* x, const float* u, const float* a, const float* w1, const float* w2,
                          float* scratch, index_t rows, index_t C, index_t F, Activation act,
                          float dropout_p = 0.0f, std::uint64_t seed = 0);

}  // namespace cpuformer
