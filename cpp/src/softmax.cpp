// softmax.cpp: softmax / log-softmax over rows of a (rows, cols) matrix, forward and backward.
// Parallel over rows; each row is three passes (max, exp-and-sum, scale) that stay in L1/L2 for typical widths.
#include "cpuformer/softmax.h"

#include <cmath>
#include <limits>

#include "parallel.h"
#include "rowops.h"
#include "simd.h"

namespace cpuformer {
namespace {

constexpr index_t kMinElemsPerThread = 1 << 14;

index_t rows_per_chunk(index_t cols) { return std::max<index_t>(1, kMinElemsPerThread / std::max<index_t>(1, cols)); }

float row_max_scalar(const float* x, index_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < n; ++j) m = std::fmax(m, x[j]);
  return m;
}

double row_exp_sum_scalar(float* out, const float* x, index_t n, float shift) {
  double s = 0.0;
  for (index_t j = 0; j < n; ++j) {
    const float e = std::exp(x[j] - shift);
    if (out) out[j] = e;
    s += e;
  }
  return s;
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static float row_max_avx2(const float* x, index_t n) {
  using namespace simd;
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  index_t j = 0;
  for (; j + kWidth <= n; j += kWidth) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
  float m = hmax(vm);
  for (; j < n; ++j) m = std::fmax(m, x[j]);
  return m;
}

CPUFORMER_AVX2 static double row_exp_sum_avx2(float* out, const float* x, index_t n, float shift) {
  using namespace simd;
  const __m256 bm = _mm256_set1_ps(shift);
  double s = 0.0;
  index_t j = 0;
  // Flush the float lanes into double every 1024 elements to keep long (50k) sums accurate.
  while (j + kWidth <= n) {
    __m256 vs = _mm256_setzero_ps();
    const index_t stop = std::min(n - (n - j) % kWidth, j + 1024);
    for (; j < stop; j += kWidth) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), bm));
      if (out) _mm256_storeu_ps(out + j, e);
      vs = _mm256_add_ps(vs, e);
    }
    s += hsum(vs);
  }
  if (j < n) {
    const __m256i mask = tail_mask(static_cast<int>(n - j));
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), bm));
    e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
    if (out) _mm256_maskstore_ps(out + j, mask, e);
    s += hsum(e);
  }
  return s;
}
#endif

#ifdef CPUFORMER_HAVE_AVX512
// row_exp_sum_avx2 with the exponentials 16 at a time: each 8-lane half is added into the 8-lane sums in the order
// the AVX2 loop adds them, so the sum and the values are bitwise the AVX2 path's (the exponentials were half the
// time of long-sequence attention).
CPUFORMER_AVX512 static double row_exp_sum_avx512(float* out, const float* x, index_t n, float shift) {
  using namespace simd;
  const __m512 bm = _mm512_set1_ps(shift);
  double s = 0.0;
  index_t j = 0;
  while (j + kWidth <= n) {
    __m256 vs = _mm256_setzero_ps();
    const index_t stop = std::min(n - (n - j) % kWidth, j + 1024);
    for (; j + 2 * kWidth <= stop; j += 2 * kWidth) {
      const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), bm));
      if (out) _mm512_storeu_ps(out + j, e);
      vs = _mm256_add_ps(vs, _mm512_castps512_ps256(e));
      vs = _mm256_add_ps(vs, _mm512_extractf32x8_ps(e, 1));
    }
    for (; j < stop; j += kWidth) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm512_castps512_ps256(bm)));
      if (out) _mm256_storeu_ps(out + j, e);
      vs = _mm256_add_ps(vs, e);
    }
    s += hsum(vs);
  }
  if (j < n) {
    const __m256i mask = tail_mask(static_cast<int>(n - j));
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), _mm512_castps512_ps256(bm)));
    e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
    if (out) _mm256_maskstore_ps(out + j, mask, e);
    s += hsum(e);
  }
  return s;
}
#endif

// The row max m and sum of exp(x - m); writes exp(x - m) to out when out is non-null. s = 0 for an all -inf row.
void exp_sum_row(float* out, const float* x, index_t n, float& m, double& s) {
  m = detail::row_max(x, n);
  s = m == -std::numeric_limits<float>::infinity() ? 0.0 : detail::row_exp_sum(out, x, n, m);
}

void check_sizes(const char* who, index_t rows, index_t cols) {
  CPUFORMER_CHECK(rows >= 0 && cols >= 0, who, ": negative size rows=", rows, " cols=", cols);
}

}  // namespace

namespace detail {
float row_max(const float* x, index_t n) {
#ifdef CPUFORMER_HAVE_AVX2
  if (use_avx2()) return row_max_avx2(x, n);
#endif
  return row_max_scalar(x, n);
}

double row_exp_sum(float* out, const float* x, index_t n, float shift) {
#ifdef CPUFORMER_HAVE_AVX512
  if (use_avx512()) return row_exp_sum_avx512(out, x, n, shift);
#endif
#ifdef CPUFORMER_HAVE_AVX2
  if (use_avx2()) return row_exp_sum_avx2(out, x, n, shift);
#endif
  return row_exp_sum_scalar(out, x, n, shift);
}

void row_scale(float* x, index_t n, float s) {
  for (index_t j = 0; j < n; ++j) x[j] *= s;
}
}  // namespace detail

void softmax_forward(float* out, const float* inp, index_t rows, index_t cols) {
  check_sizes("softmax_forward", rows, cols);
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
      float* y = out + r * cols;
      float m;
      double s;
      exp_sum_row(y, inp + r * cols, cols, m, s);
      if (s == 0.0) {  // fully masked row: zeros, never NaN
        for (index_t j = 0; j < cols; ++j) y[j] = 0.0f;
        continue;
      }
      detail::row_scale(y, cols, static_cast<float>(1.0 / s));
    }
  });
}

void log_softmax_forward(float* out, const float* inp, index_t rows, index_t cols) {
  check_sizes("log_softmax_forward", rows, cols);
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
      const float* x = inp + r * cols;
      float m;
      double s;
      exp_sum_row(nullptr, x, cols, m, s);
      const float lse = s == 0.0 ? -std::numeric_limits<float>::infinity()
                                 : m + static_cast<float>(std::log(s));
      float* y = out + r * cols;
      for (index_t j = 0; j < cols; ++j) y[j] = x[j] - lse;
    }
  });
}

void softmax_backward(float* dinp, const float* dout, const float* out, index_t rows, index_t cols) {
  check_sizes("softmax_backward", rows, cols);
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
      const float* y = out + r * cols;
      const float* dy = dout + r * cols;
      double dot = 0.0;
      for (index_t j = 0; j < cols; ++j) dot += static_cast<double>(y[j]) * dy[j];
      const float d = static_cast<float>(dot);
      float* dx = dinp + r * cols;
      for (index_t j = 0; j < cols; ++j) dx[j] = y[j] * (dy[j] - d);
    }
  });
}

void log_softmax_backward(float* dinp, const float* dout, const float* out, index_t rows, index_t cols) {
  check_sizes("log_softmax_backward", rows, cols);
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
      const float* y = out + r * cols;
      const float* dy = dout + r * cols;
      double sum = 0.0;
      for (index_t j = 0; j < cols; ++j) sum += dy[j];
      const float s = static_cast<float>(sum);
      float* dx = dinp + r * cols;
      for (index_t j = 0; j < cols; ++j) dx[j] = dy[j] - std::exp(y[j]) * s;
    }
  });
}

}  // namespace cpuformer
