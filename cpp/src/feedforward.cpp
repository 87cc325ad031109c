// feedforward.cpp: position-wise feed-forward network (Linear -> activation [x gate] -> dropout -> Linear), forward
// and backward, composed from the Linear product (bias in the GEMM's write-back) and single-pass element-wise
// kernels.
#include "cpuformer/feedforward.h"

namespace cpuformer {
namespace {

void check_sizes(const char* who, const FeedForwardWeights& w) {
  CPUFORMER_CHECK(w.up.present() && w.down.present(), who, ": up and down weights are required");
  CPUFORMER_CHECK(w.up.in >= 1 && w.up.out >= 1 && w.down.in == w.up.out && w.down.out == w.up.in, who,
                  ": weight sizes disagree (up ", w.up.out, "x", w.up.in, ", down ", w.down.out, "x", w.down.in, ")");
  CPUFORMER_CHECK(!w.gated() || (w.gate.in == w.up.in && w.gate.out == w.up.out), who,
                  ": gate must have the up projection's size");
}

}  // namespace

void feedforward_forward(float* out, float* u, float* a, const float* x, const FeedForwardWeights& w, index_t rows,
                         Activation act, float dropout_p, std::uint64_t seed) {
  check_sizes("feedforward_forward", w);
  CPUFORMER_CHECK(rows >= 0, "feedforward_forward: negative rows");
  if (rows == 0) return;
  const index_t C = w.up.in, F = w.up.out;
  if (w.gated()) {  // u = [gate(x) | up(x)], a = act(gate) * up
    linear_forward(u, 2 * F, x, C, rows, w.gate);
    linear_forward(u + F, 2 * F, x, C, rows, w.up);
    gated_forward(a, F, u, 2 * F, u + F, 2 * F, rows, F, act);
  } else {  // u = up(x), a = act(u)
    linear_forward(u, F, x, C, rows, w.up);
    activation_forward(a, u, nullptr, rows, F, act);
  }
  if (dropout_p > 0.0f) dropout_forward(a, nullptr, a, rows * F, dropout_p, seed);
  linear_forward(out, C, a, F, rows, w.down);
}

void feedforward_backward(float* dx, bool accumulate_dx, const FeedForwardGrads& g, const float* dout,
                          const float* x, const float* u, const float* a, const FeedForwardWeights& w,
                          float* scratch, index_t rows, Activation act, float dropout_p, std::uint64_t seed) {
  check_sizes("feedforward_backward", w);
  CPUFORMER_CHECK(rows >= 0, "feedforward_backward: negative rows");
  if (rows == 0) return;
  const index_t C = w.up.in, F = w.up.out;
  float* da = scratch;
  linear_backward(da, F, false, g.down_w, g.down_b, dout, C, a, F, rows, w.down);  // da = dout W2, dW2 += dout^T a
  if (dropout_p > 0.0f) dropout_backward(da, da, rows * F, dropout_p, seed);
  if (w.gated()) {
    float* dgu = scratch + rows * F;  // [d gate | d up] (rows, 2F)
    gated_backward(dgu, 2 * F, dgu + F, 2 * F, da, F, u, 2 * F, u + F, 2 * F, rows, F, act);
    linear_backward(dx, C, accumulate_dx, g.gate_w, g.gate_b, dgu, 2 * F, x, C, rows, w.gate);
    linear_backward(dx, C, true, g.up_w, g.up_b, dgu + F, 2 * F, x, C, rows, w.up);
  } else {
    activation_backward(da, g.up_b, da, u, nullptr, rows, F, act);  // du = da * act'(u), db1 += sums
    linear_backward(dx, C, accumulate_dx, g.up_w, nullptr, da, F, x, C, rows, w.up);
  }
}

void feedforward_forward(float* out, float* u, float* a, const float* x, const float* w1, const float* b1,
                         const float* w2, const float* b2, index_t rows, index_t C, index_t F, Activation act,
                         float dropout_p, std::uint64_t seed) {
  CPUFORMER_CHECK(rows >= 1 && C >= 1 && F >= 1, "feedforward_forward: bad sizes rows=", rows, " C=", C, " F=", F);
  FeedForwardWeights w;
  w.up = LinearRef{C, F, w1, b1};
  w.down = LinearRef{F, C, w2, b2};
  feedforward_forward(out, u, a, x, w, rows, act, dropout_p, seed);
}

void feedforward_backward(float* dx, float* dw1, float* db1, float* dw2, float* db2, const float* dout,
                          const float* x, const float* u, const float* a, const float* w1, const float* w2,
                          float* scratch, index_t rows, index_t C, index_t F, Activation act, float dropout_p,
                          std::uint64_t seed) {
  CPUFORMER_CHECK(rows >= 1 && C >= 1 && F >= 1, "feedforward_backward: bad sizes rows=", rows, " C=", C, " F=", F);
  FeedForwardWeights w;
  w.up = LinearRef{C, F, w1, nullptr};
  w.down = LinearRef{F, C, w2, nullptr};
  feedforward_backward(dx, false, FeedForwardGrads{dw1, db1, nullptr, nullptr, dw2, db2}, dout, x, u, a, w, scratch,
                       rows, act, dropout_p, seed);
}

}  // namespace cpuformer
