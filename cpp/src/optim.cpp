// optim.cpp: AdamW update in one pass over (param, m, v, grad); sum of squares for gradient-norm clipping.
#include "cpuformer/optim.h"

#include <cmath>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace cpuformer {
namespace {

// One AdamW update's constants (float, as the scalar loop computes them).
struct AdamwConsts {
  float grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_sqrt_bc2, eps, decay;
};

// Elements [i0, i1): the update as written, each operation rounded in this order (no contraction), so every path
// gives the same bits (correctly rounded sqrt and division included). The vector paths below spell the same
// operations lane for lane and leave their tails here.
void adamw_scalar(float* param, float* m, float* v, const float* grad, index_t i0, index_t i1, const AdamwConsts& k) {
  for (index_t i = i0; i < i1; ++i) {
    const float g = grad[i] * k.grad_scale;
    const float mi = k.beta1 * m[i] + k.one_minus_beta1 * g;
    const float vi = k.beta2 * v[i] + k.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = param[i] * k.decay - k.step_size * mi / (std::sqrt(vi) * k.inv_sqrt_bc2 + k.eps);
  }
}

// The scalar loop does not vectorise (std::sqrt keeps errno semantics): it ran at ~13 GB/s where the update is
// bound by memory (28 bytes per element) at about twice that.
#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 void adamw_avx2(float* param, float* m, float* v, const float* grad, index_t i0, index_t i1,
                               const AdamwConsts& k) {
  const __m256 scale = _mm256_set1_ps(k.grad_scale), b1 = _mm256_set1_ps(k.beta1), c1 = _mm256_set1_ps(k.one_minus_beta1),
               b2 = _mm256_set1_ps(k.beta2), c2 = _mm256_set1_ps(k.one_minus_beta2),
               step = _mm256_set1_ps(k.step_size), inv = _mm256_set1_ps(k.inv_sqrt_bc2), eps = _mm256_set1_ps(k.eps),
               decay = _mm256_set1_ps(k.decay);
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(grad + i), scale);
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + i)), _mm256_mul_ps(c1, g));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + i)), _mm256_mul_ps(_mm256_mul_ps(c2, g), g));
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    const __m256 den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), inv), eps);
    const __m256 upd = _mm256_div_ps(_mm256_mul_ps(step, mi), den);
    _mm256_storeu_ps(param + i, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(param + i), decay), upd));
  }
  adamw_scalar(param, m, v, grad, i, i1, k);
}
#endif

#ifdef CPUFORMER_HAVE_AVX512
CPUFORMER_AVX512 void adamw_avx512(float* param, float* m, float* v, const float* grad, index_t i0, index_t i1,
                                   const AdamwConsts& k) {
  const __m512 scale = _mm512_set1_ps(k.grad_scale), b1 = _mm512_set1_ps(k.beta1), c1 = _mm512_set1_ps(k.one_minus_beta1),
               b2 = _mm512_set1_ps(k.beta2), c2 = _mm512_set1_ps(k.one_minus_beta2),
               step = _mm512_set1_ps(k.step_size), inv = _mm512_set1_ps(k.inv_sqrt_bc2), eps = _mm512_set1_ps(k.eps),
               decay = _mm512_set1_ps(k.decay);
  index_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(grad + i), scale);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(b1, _mm512_loadu_ps(m + i)), _mm512_mul_ps(c1, g));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, _mm512_loadu_ps(v + i)), _mm512_mul_ps(_mm512_mul_ps(c2, g), g));
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    const __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), inv), eps);
    const __m512 upd = _mm512_div_ps(_mm512_mul_ps(step, mi), den);
    _mm512_storeu_ps(param + i, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(param + i), decay), upd));
  }
  adamw_scalar(param, m, v, grad, i, i1, k);
}
#endif

}  // namespace

void adamw_step(float* param, float* m, float* v, const float* grad, index_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, long long step, float grad_scale) {
  CPUFORMER_CHECK(n >= 0, "adamw_step: negative size");
  CPUFORMER_CHECK(step >= 1, "adamw_step: step must be >= 1, got ", step);
  CPUFORMER_CHECK(std::isfinite(lr) && lr >= 0.0f, "adamw_step: lr must be finite and >= 0, got ", lr);
  CPUFORMER_CHECK(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f,
                  "adamw_step: betas must be in [0, 1), got ", beta1, ", ", beta2);
  CPUFORMER_CHECK(eps > 0.0f && std::isfinite(eps), "adamw_step: eps must be > 0, got ", eps);
  CPUFORMER_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0f, "adamw_step: bad weight_decay ", weight_decay);
  // Bias corrections in double, hoisted (as torch's fused kernel): step_size = lr / bc1, denominator uses sqrt(bc2).
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const AdamwConsts k{grad_scale,   beta1, 1.0f - beta1, beta2, 1.0f - beta2, step_size,
                      inv_sqrt_bc2, eps,   1.0f - lr * weight_decay};
  detail::parallel_for(n, 1 << 15, [&](index_t i0, index_t i1, int) {
#ifdef CPUFORMER_HAVE_AVX512
    if (detail::use_avx512()) return adamw_avx512(param, m, v, grad, i0, i1, k);
#endif
#ifdef CPUFORMER_HAVE_AVX2
    if (detail::use_avx2()) return adamw_avx2(param, m, v, grad, i0, i1, k);
#endif
    adamw_scalar(param, m, v, grad, i0, i1, k);
  });
}

double sum_squares(const float* x, index_t n) {
  CPUFORMER_CHECK(n >= 0, "sum_squares: negative size");
  const int nt = detail::kernel_threads();
  std::vector<double> partial(nt, 0.0);
  detail::parallel_for(n, 1 << 16, [&](index_t i0, index_t i1, int t) {
    double s = 0.0;
    for (index_t i = i0; i < i1; ++i) s += static_cast<double>(x[i]) * x[i];
    partial[t] = s;
  });
  double s = 0.0;
  for (double p : partial) s += p;
  return s;
}

}  // namespace cpuformer
