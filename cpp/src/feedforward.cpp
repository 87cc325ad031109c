// feedforward.cpp: position-wise feed-forward network (Linear -> activation -> dropout -> Linear), forward and
// backward, composed from the GEMM (bias in its write-back) and single-pass element-wise kernels.
#include "cpuformer/feedforward.h"

#include "cpuformer/matmul.h"

namespace cpuformer {

void feedforward_forward(float* out, float* u, float* a, const float* x, const float* w1, const float* b1,
                         const float* w2, const float* b2, index_t rows, index_t C, index_t F, Activation act,
                         float dropout_p, std::uint64_t seed) {
  CPUFORMER_CHECK(rows >= 1 && C >= 1 && F >= 1, "feedforward_forward: bad sizes rows=", rows, " C=", C, " F=", F);
  sgemm(false, true, rows, F, C, 1.0f, x, C, w1, C, 0.0f, u, F, b1);     // u = x W1^T + b1
  activation_forward(a, u, nullptr, rows, F, act);                       // a = act(u)
  if (dropout_p > 0.0f) dropout_forward(a, nullptr, a, rows * F, dropout_p, seed);
  sgemm(false, true, rows, C, F, 1.0f, a, F, w2, F, 0.0f, out, C, b2);   // out = a W2^T + b2
}

void feedforward_backward(float* dx, float* dw1, float* db1, float* dw2, float* db2, const float* dout,
                          const float* x, const float* u, const float* a, const float* w1, const float* w2,
                          float* scratch, index_t rows, index_t C, index_t F, Activation act, float dropout_p,
                          std::uint64_t seed) {
  CPUFORMER_CHECK(rows >= 1 && C >= 1 && F >= 1, "feedforward_backward: bad sizes rows=", rows, " C=", C, " F=", F);
  sgemm(true, false, C, F, rows, 1.0f, dout, C, a, F, 1.0f, dw2, F);     // dW2 += dout^T a
  if (db2) bias_backward(db2, dout, rows, C);
  float* da = scratch;
  sgemm(false, false, rows, F, C, 1.0f, dout, C, w2, F, 0.0f, da, F);  // da = dout W2
  if (dropout_p > 0.0f) dropout_backward(da, da, rows * F, dropout_p, seed);
  activation_backward(da, db1, da, u, nullptr, rows, F, act);           // du = da * act'(u), db1 += sums
  sgemm(true, false, F, C, rows, 1.0f, da, F, x, C, 1.0f, dw1, C);      // dW1 += du^T x
  sgemm(false, false, rows, C, F, 1.0f, da, F, w1, C, 0.0f, dx, C);     // dx = du W1
}

}  // namespace cpuformer
