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

// Every path returns the same value: the largest element (max is exact, so the order does not matter), or NaN when
// any element is NaN (a softmax row with a NaN is NaN throughout, never mistaken for a fully masked row).
float row_max_scalar(const float* x, index_t n) {
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (index_t j = 0; j < n; ++j) {
    m = std::fmax(m, x[j]);
    nan |= std::isnan(x[j]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
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
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), vnan = _mm256_setzero_ps();
  index_t j = 0;
  for (; j + kWidth <= n; j += kWidth) {
    const __m256 v = _mm256_loadu_ps(x + j);
    vm = _mm256_max_ps(vm, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  const float m = hmax(vm), rest = row_max_scalar(x + j, n - j);
  if (_mm256_movemask_ps(vnan) || std::isnan(rest)) return std::numeric_limits<float>::quiet_NaN();
  return std::fmax(m, rest);
}

#ifdef CPUFORMER_HAVE_AVX512
// row_max_avx2's value with 16 lanes and two independent chains (max is exact: any order gives the same result).
CPUFORMER_AVX512 static float row_max_avx512(const float* x, index_t n) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = lowest, m1 = lowest;
  __mmask16 nan = 0;
  index_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
  }
  for (; j < n; j += 16) {
    const __mmask16 k = static_cast<__mmask16>(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1u);
    const __m512 a = _mm512_mask_loadu_ps(lowest, k, x + j);
    m0 = _mm512_max_ps(m0, a);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}
#endif

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

#ifdef CPUFORMER_HAVE_AVX512
CPUFORMER_AVX512 static void row_scale_avx512(float* x, index_t n, float s) {  // element-wise: the same bits
  const __m512 vs = _mm512_set1_ps(s);
  for (index_t j = 0; j < n; j += 16) {
    const __mmask16 k = static_cast<__mmask16>(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), vs));
  }
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
#ifdef CPUFORMER_HAVE_AVX512
  if (use_avx512()) return row_max_avx512(x, n);
#endif
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
#ifdef CPUFORMER_HAVE_AVX512
  if (use_avx512()) return row_scale_avx512(x, n, s);
#endif
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
