// linear.cpp: y = x W^T + b for a weight in any of its forms (float in either layout, packed, int8, 16-bit), and its
// backward. The one place a Linear layer's product is defined: the Transformer block, the feed-forward network and
// the model heads all go through here.
#include "cpuformer/linear.h"

#include <algorithm>
#include <vector>

#include "cpuformer/activations.h"
#include "parallel.h"
#include "random.h"

namespace cpuformer {

namespace {

bool lora_drops(const LoraAdapter& l) { return l.training && l.dropout > 0.0f; }

// The adapter's input goes through dropout a block of rows at a time: a block's dropped copy (about 64K floats) is
// all the memory the mask costs, however many rows there are.
index_t lora_block_rows(index_t in) { return std::max<index_t>(1, (index_t(1) << 16) / in); }

// out[i, j] (row stride ldo; set, or added when accumulate) = src[i, j] / (1 - p) where the adapter's mask keeps
// element (r0 + i, j) of its input, else 0: the dropout of rows [r0, r0 + n) forward, and its backward.
void lora_mask_rows(float* out, index_t ldo, bool accumulate, const float* src, index_t lds, index_t r0, index_t n,
                    index_t in, const LoraAdapter& l) {
  const std::uint32_t threshold = detail::dropout_threshold(l.dropout);
  const float inv = 1.0f / (1.0f - l.dropout);
  detail::parallel_for(n, std::max<index_t>(1, 8192 / in), [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) {
      const std::uint64_t base = static_cast<std::uint64_t>(r0 + i) * static_cast<std::uint64_t>(in);
      const float* s = src + i * lds;
      float* o = out + i * ldo;
      for (index_t j = 0; j < in; ++j) {
        const float v = detail::dropout_keep(l.seed, base + static_cast<std::uint64_t>(j), threshold) ? s[j] * inv
                                                                                                       : 0.0f;
        o[j] = accumulate ? o[j] + v : v;
      }
    }
  });
}

// t (rows, r) = dropout(x) A^T: the adapter's low-rank projection.
std::vector<float> lora_down(const float* x, index_t ldx, index_t rows, const LinearRef& w) {
  const LoraAdapter& l = *w.lora;
  std::vector<float> t(static_cast<size_t>(rows * l.r));
  if (!lora_drops(l)) {
    sgemm(false, true, rows, l.r, w.in, 1.0f, x, ldx, l.a, w.in, 0.0f, t.data(), l.r);
    return t;
  }
  const index_t block = std::min(rows, lora_block_rows(w.in));
  std::vector<float> xd(static_cast<size_t>(block * w.in));
  for (index_t r0 = 0; r0 < rows; r0 += block) {
    const index_t n = std::min(block, rows - r0);
    lora_mask_rows(xd.data(), w.in, false, x + r0 * ldx, ldx, r0, n, w.in, l);
    sgemm(false, true, n, l.r, w.in, 1.0f, xd.data(), w.in, l.a, w.in, 0.0f, t.data() + r0 * l.r, l.r);
  }
  return t;
}

void check_lora(const LinearRef& w) {
  CPUFORMER_CHECK(w.lora->a && w.lora->b && w.lora->r >= 1, "linear: a LoRA adapter needs A, B and r >= 1");
  CPUFORMER_CHECK(w.lora->dropout >= 0.0f && w.lora->dropout < 1.0f,
                  "linear: LoRA dropout must be in [0, 1), got ", w.lora->dropout);
}

// The adapter's backward with dropout, a block of rows at a time (u = dy B, rows x r): dB += scale dy^T
// (dropout(x) A^T), dA += scale u^T dropout(x), dx += dropout'(scale u A), the mask regenerated from its seed.
void lora_backward_dropped(float* dx, index_t lddx, const float* dy, index_t lddy, const float* x, index_t ldx,
                           index_t rows, const LinearRef& w, const float* u) {
  const LoraAdapter& l = *w.lora;
  const index_t block = std::min(rows, lora_block_rows(w.in));
  std::vector<float> buf(static_cast<size_t>(block * w.in)), t(static_cast<size_t>(block * l.r));
  for (index_t r0 = 0; r0 < rows; r0 += block) {
    const index_t n = std::min(block, rows - r0);
    const float* ub = u + r0 * l.r;
    if (l.grad_a || l.grad_b) {
      lora_mask_rows(buf.data(), w.in, false, x + r0 * ldx, ldx, r0, n, w.in, l);
      if (l.grad_b) {
        sgemm(false, true, n, l.r, w.in, 1.0f, buf.data(), w.in, l.a, w.in, 0.0f, t.data(), l.r);
        sgemm(true, false, w.out, l.r, n, l.scale, dy + r0 * lddy, lddy, t.data(), l.r, 1.0f, l.grad_b, l.r);
      }
      if (l.grad_a) sgemm(true, false, l.r, w.in, n, l.scale, ub, l.r, buf.data(), w.in, 1.0f, l.grad_a, w.in);
    }
    if (dx) {
      sgemm(false, false, n, w.in, l.r, l.scale, ub, l.r, l.a, w.in, 0.0f, buf.data(), w.in);
      lora_mask_rows(dx + r0 * lddx, lddx, true, buf.data(), w.in, r0, n, w.in, l);
    }
  }
}

}  // namespace

bool lora_dropout_keep(std::uint64_t seed, std::uint64_t counter, float dropout) {
  return detail::dropout_keep(seed, counter, detail::dropout_threshold(dropout));
}

std::uint64_t lora_dropout_seed(std::uint64_t step_seed, std::uint64_t index) {
  // hashed apart from the step's other dropout streams (the embeddings' step_seed, the blocks' step_seed + 1 + l)
  return detail::mix64(detail::mix64(step_seed ^ 0x4c6f52416472704fULL) + index);
}

void linear_forward(float* y, index_t ldy, const float* x, index_t ldx, index_t rows, const LinearRef& w) {
  CPUFORMER_CHECK(w.in >= 1 && w.out >= 1 && rows >= 0 && ldx >= w.in && ldy >= w.out,
                  "linear_forward: bad sizes in=", w.in, " out=", w.out, " rows=", rows);
  if (rows == 0) return;
  if (w.int8) {
    linear_int8(x, rows, ldx, *w.int8, w.bias, y, ldy);
  } else if (w.packed && !(rows <= 4 && w.weight)) {
    sgemm_packed(rows, x, ldx, *w.packed, y, ldy, w.bias);
  } else if (!w.weight && w.half) {  // (out, in) is H (N x K) against x: trans_h; (in, out) is H (K x N)
    gemm_half(!w.in_out, rows, w.out, w.in, x, ldx, w.half, w.in_out ? w.out : w.in, w.half_type, false, y, ldy,
              w.bias, w.bf16_activations);
  } else {
    CPUFORMER_CHECK(w.weight != nullptr, "linear_forward: no weight");
    if (w.in_out)
      sgemm(false, false, rows, w.out, w.in, 1.0f, x, ldx, w.weight, w.out, 0.0f, y, ldy, w.bias);
    else
      sgemm(false, true, rows, w.out, w.in, 1.0f, x, ldx, w.weight, w.in, 0.0f, y, ldy, w.bias);
  }
  if (w.lora) {  // y += scale (dropout(x) A^T) B^T, accumulated by the GEMM into the base product
    check_lora(w);
    const std::vector<float> t = lora_down(x, ldx, rows, w);
    sgemm(false, true, rows, w.out, w.lora->r, w.lora->scale, t.data(), w.lora->r, w.lora->b, w.lora->r, 1.0f, y, ldy);
  }
}

void linear_backward(float* dx, index_t lddx, bool accumulate_dx, float* dweight, float* dbias, const float* dy,
                     index_t lddy, const float* x, index_t ldx, index_t rows, const LinearRef& w) {
  CPUFORMER_CHECK(w.weight != nullptr || w.half != nullptr,
                  "linear_backward: needs the float or 16-bit weight (packed and int8 weights are inference-only)");
  CPUFORMER_CHECK(w.weight != nullptr || dweight == nullptr,
                  "linear_backward: weight gradients of a 16-bit (bf16/f16) weight are not supported; freeze it "
                  "(dweight = null) or use a float32 weight");
  CPUFORMER_CHECK(w.in >= 1 && w.out >= 1 && rows >= 0 && ldx >= w.in && lddy >= w.out,
                  "linear_backward: bad sizes in=", w.in, " out=", w.out, " rows=", rows);
  if (rows == 0) return;
  if (dweight) {
    if (w.in_out)  // dW (in, out) += x^T dy
      sgemm(true, false, w.in, w.out, rows, 1.0f, x, ldx, dy, lddy, 1.0f, dweight, w.out);
    else           // dW (out, in) += dy^T x
      sgemm(true, false, w.out, w.in, rows, 1.0f, dy, lddy, x, ldx, 1.0f, dweight, w.in);
  }
  if (dbias) {
    bias_backward(dbias, dy, rows, w.out, lddy);  // rows may be strided (one projection's columns of a fused buffer)
  }
  if (dx) {
    const float beta = accumulate_dx ? 1.0f : 0.0f;
    if (!w.weight)  // 16-bit weight: dx = dy W; (out, in) is H (K = out x N = in), (in, out) is H^T
      gemm_half(w.in_out, rows, w.in, w.out, dy, lddy, w.half, w.in_out ? w.out : w.in, w.half_type, accumulate_dx,
                dx, lddx);
    else if (w.in_out)
      sgemm(false, true, rows, w.in, w.out, 1.0f, dy, lddy, w.weight, w.out, beta, dx, lddx);
    else
      sgemm(false, false, rows, w.in, w.out, 1.0f, dy, lddy, w.weight, w.in, beta, dx, lddx);
  }
  if (w.lora && (dx || w.lora->grad_a || w.lora->grad_b)) {
    check_lora(w);
    const LoraAdapter& l = *w.lora;
    std::vector<float> u(static_cast<size_t>(rows * l.r));  // u = dy B (rows, r)
    sgemm(false, false, rows, l.r, w.out, 1.0f, dy, lddy, l.b, l.r, 0.0f, u.data(), l.r);
    if (lora_drops(l)) {
      lora_backward_dropped(dx, lddx, dy, lddy, x, ldx, rows, w, u.data());
      return;
    }
    if (l.grad_b) {  // dB += scale dy^T (x A^T)
      const std::vector<float> t = lora_down(x, ldx, rows, w);
      sgemm(true, false, w.out, l.r, rows, l.scale, dy, lddy, t.data(), l.r, 1.0f, l.grad_b, l.r);
    }
    if (l.grad_a) sgemm(true, false, l.r, w.in, rows, l.scale, u.data(), l.r, x, ldx, 1.0f, l.grad_a, w.in);
    if (dx) sgemm(false, false, rows, w.in, l.r, l.scale, u.data(), l.r, l.a, w.in, 1.0f, dx, lddx);
  }
}

}  // namespace cpuformer
