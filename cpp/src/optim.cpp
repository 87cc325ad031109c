// optim.cpp: AdamW update in one pass over (param, m, v, grad); sum of squares for gradient-norm clipping.
#include "cpuformer/optim.h"

#include <cmath>
#include <vector>

#include "parallel.h"

namespace cpuformer {

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
  const float decay = 1.0f - lr * weight_decay;
  detail::parallel_for(n, 1 << 15, [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) {
      const float g = grad[i] * grad_scale;
      const float mi = beta1 * m[i] + (1.0f - beta1) * g;
      const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
      m[i] = mi;
      v[i] = vi;
      param[i] = param[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
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
