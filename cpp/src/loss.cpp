// loss.cpp: cross-entropy over logits with ignore_index and label smoothing, forward and backward in one call.
//
// Per row, one pass computes the max and sum of exp (logsumexp), a second writes the gradient, in place over the
// logits when asked: no (N, V) probability tensor, stable for 50k vocabularies.
#include "cpuformer/loss.h"

#include <cmath>
#include <limits>
#include <vector>

#include "cpuformer/softmax.h"
#include "parallel.h"
#include "simd.h"

namespace cpuformer {
namespace {

// logsumexp and the plain sum of a row, in double.
void row_stats(const float* x, index_t V, double& lse, double& sum) {
  float m = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < V; ++j) m = std::fmax(m, x[j]);
  double s = 0.0, total = 0.0;
  for (index_t j = 0; j < V; ++j) {
    s += std::exp(static_cast<double>(x[j]) - m);
    total += x[j];
  }
  lse = m + std::log(s);
  sum = total;
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static void row_stats_avx2(const float* x, index_t V, double& lse, double& sum) {
  using namespace simd;
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  index_t j = 0;
  for (; j + kWidth <= V; j += kWidth) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
  float m = hmax(vm);
  for (; j < V; ++j) m = std::fmax(m, x[j]);
  const __m256 bm = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps(), vt = _mm256_setzero_ps();
  double s = 0.0, total = 0.0;
  // Flush the float lanes into double every 1024 elements to keep 50k-long sums accurate.
  for (j = 0; j + kWidth <= V;) {
    const index_t stop = std::min(V - (V - j) % kWidth, j + 1024);
    for (; j < stop; j += kWidth) {
      const __m256 v = _mm256_loadu_ps(x + j);
      vs = _mm256_add_ps(vs, exp_ps(_mm256_sub_ps(v, bm)));
      vt = _mm256_add_ps(vt, v);
    }
    s += hsum(vs);
    total += hsum(vt);
    vs = _mm256_setzero_ps();
    vt = _mm256_setzero_ps();
  }
  for (; j < V; ++j) {
    s += std::exp(static_cast<double>(x[j]) - m);
    total += x[j];
  }
  lse = m + std::log(s);
  sum = total;
}
#endif

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
      double lse, total;
#ifdef CPUFORMER_HAVE_AVX2
      if (detail::use_avx2())
        row_stats_avx2(x, V, lse, total);
      else
#endif
        row_stats(x, V, lse, total);
      const index_t tgt = targets[r];
      const double nll = lse - x[tgt];
      acc += (1.0 - s) * nll + s * (lse - total / V);
      if (dx) {
        const float scale = static_cast<float>(grad_scale * inv_valid);
        const float flse = static_cast<float>(lse);
        const float smooth = static_cast<float>(s / V);
        const float xt = x[tgt];  // read before dx (possibly aliasing x) is written
        for (index_t j = 0; j < V; ++j) dx[j] = (std::exp(x[j] - flse) - smooth) * scale;
        dx[tgt] = (std::exp(xt - flse) - smooth - static_cast<float>(1.0 - s)) * scale;
      }
    }
    partial[t] = acc;
  });
  double loss = 0.0;
  for (int t = 0; t < nt; ++t) loss += partial[t];
  return loss * inv_valid;
}

}  // namespace cpuformer
