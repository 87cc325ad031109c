// loss.cpp: cross-entropy over logits with ignore_index and label smoothing, forward and backward in one call.
//
// Per row, one pass computes the max and sum of exp (logsumexp), a second writes the gradient, in place over the
// logits when asked: no (N, V) probability tensor, stable for 50k vocabularies.
#include "cpuformer/loss.h"

#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "rowops.h"
#include "simd.h"

namespace cpuformer {
namespace {

// Row statistics: the max m, log(sum exp(x - m)) and the plain sum of the row (the latter two in double).
// lse = m + log_s; keeping m and log_s apart lets the gradient use exp((x - m) - log_s), exact even when |x| is
// large enough that a float lse would lose digits.
void row_stats(const float* x, index_t V, bool need_sum, float& m, double& log_s, double& sum) {
  m = detail::row_max(x, V);
  log_s = std::log(detail::row_exp_sum(nullptr, x, V, m));
  double total = 0.0;
  if (need_sum)  // only label smoothing needs it
    for (index_t j = 0; j < V; ++j) total += x[j];
  sum = total;
}

// dx[j] = (exp((x[j] - m) - log_s) - smooth) * scale for a whole row (dx may alias x).
void softmax_grad_row_scalar(float* dx, const float* x, index_t V, float m, float log_s, float smooth, float scale) {
  for (index_t j = 0; j < V; ++j) dx[j] = (std::exp((x[j] - m) - log_s) - smooth) * scale;
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static void softmax_grad_row_avx2(float* dx, const float* x, index_t V, float m, float log_s,
                                                 float smooth, float scale) {
  using namespace simd;
  const __m256 vm = _mm256_set1_ps(m), vl = _mm256_set1_ps(log_s), vs = _mm256_set1_ps(smooth),
               vc = _mm256_set1_ps(scale);
  index_t j = 0;
  for (; j + kWidth <= V; j += kWidth) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vl));
    _mm256_storeu_ps(dx + j, _mm256_mul_ps(_mm256_sub_ps(e, vs), vc));
  }
  softmax_grad_row_scalar(dx + j, x + j, V - j, m, log_s, smooth, scale);
}
#endif

void softmax_grad_row(float* dx, const float* x, index_t V, float m, float log_s, float smooth, float scale) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return softmax_grad_row_avx2(dx, x, V, m, log_s, smooth, scale);
#endif
  softmax_grad_row_scalar(dx, x, V, m, log_s, smooth, scale);
}

}  // namespace

double cross_entropy_forward_backward(float* dlogits, const float* logits, const std::int64_t* targets, index_t N,
                                      index_t V, std::int64_t ignore_index, float label_smoothing,
                                      float grad_scale, index_t* n_valid_out) {
  CPUFORMER_CHECK(N >= 0 && V >= 1, "cross_entropy: bad size N=", N, " V=", V);
  CPUFORMER_CHECK(label_smoothing >= 0.0f && label_smoothing <= 1.0f,
                  "cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  index_t n_valid = 0;
  for (index_t i = 0; i < N; ++i) {
    if (targets[i] == ignore_index) continue;
    if (targets[i] < 0 || targets[i] >= V)
      throw std::out_of_range(detail::concat("cross_entropy: target ", targets[i], " at position ", i,
                                             " is out of range for ", V, " classes"));
    ++n_valid;
  }
  if (n_valid_out) *n_valid_out = n_valid;
  const double s = label_smoothing;
  const double inv_valid = n_valid ? 1.0 / n_valid : 0.0;
  const int nt = detail::kernel_threads();
  std::vector<double> partial(nt, 0.0);
  detail::parallel_for(N, std::max<index_t>(1, (1 << 15) / V), [&](index_t r0, index_t r1, int t) {
    double acc = 0.0;
    for (index_t r = r0; r < r1; ++r) {
      const float* x = logits + r * V;
      float* dx = dlogits ? dlogits + r * V : nullptr;
      if (targets[r] == ignore_index) {
        if (dx)
          for (index_t j = 0; j < V; ++j) dx[j] = 0.0f;
        continue;
      }
      float m;
      double log_s, total;
      row_stats(x, V, s > 0.0, m, log_s, total);
      const index_t tgt = targets[r];
      const double nll = (static_cast<double>(m) - x[tgt]) + log_s;
      acc += (1.0 - s) * nll + s * ((static_cast<double>(m) - total / V) + log_s);
      if (dx) {
        const float scale = static_cast<float>(grad_scale * inv_valid);
        const float fls = static_cast<float>(log_s);
        const float smooth = static_cast<float>(s / V);
        const float xt = x[tgt];  // read before dx (possibly aliasing x) is written
        softmax_grad_row(dx, x, V, m, fls, smooth, scale);
        dx[tgt] = (std::exp((xt - m) - fls) - smooth - static_cast<float>(1.0 - s)) * scale;
      }
    }
    partial[t] = acc;
  });
  double loss = 0.0;
  for (int t = 0; t < nt; ++t) loss += partial[t];
  return loss * inv_valid;
}

}  // namespace cpuformer
