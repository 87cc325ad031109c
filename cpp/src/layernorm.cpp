// layernorm.cpp: LayerNorm and RMSNorm over the last axis, inp (rows, C), forward and backward.
// Backward is parallel over rows for dinp, with per-thread partial sums for dweight/dbias that are then reduced
// in a fixed order (deterministic for a fixed thread count), as PyTorch's CPU kernel does.
#include "cpuformer/layernorm.h"

#include <cmath>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace cpuformer {
namespace {

constexpr index_t kMinElemsPerThread = 1 << 14;

index_t rows_per_chunk(index_t C) { return std::max<index_t>(1, kMinElemsPerThread / std::max<index_t>(1, C)); }

// Mean and variance of one row; double accumulation over a two-pass scheme (no catastrophic cancellation).
void row_moments(const float* x, index_t C, float& mean, float& var) {
  double s = 0.0;
  for (index_t j = 0; j < C; ++j) s += x[j];
  const double m = s / C;
  double ss = 0.0;
  for (index_t j = 0; j < C; ++j) {
    const double d = x[j] - m;
    ss += d * d;
  }
  mean = static_cast<float>(m);
  var = static_cast<float>(ss / C);
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static void row_moments_avx2(const float* x, index_t C, float& mean, float& var) {
  using namespace simd;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  index_t j = 0;
  for (; j + 16 <= C; j += 16) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + j));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + j + 8));
  }
  double s = hsum(_mm256_add_ps(s0, s1));
  for (; j < C; ++j) s += x[j];
  const float m = static_cast<float>(s / C);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 q0 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
  for (j = 0; j + 16 <= C; j += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
    const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm);
    q0 = _mm256_fmadd_ps(d0, d0, q0);
    q1 = _mm256_fmadd_ps(d1, d1, q1);
  }
  double ss = hsum(_mm256_add_ps(q0, q1));
  for (; j < C; ++j) ss += static_cast<double>(x[j] - m) * (x[j] - m);
  mean = m;
  var = static_cast<float>(ss / C);
}
#endif

// y = (x - mean) * rstd * weight + bias (weight, bias may be null)
void normalize_row_scalar(float* y, const float* x, const float* weight, const float* bias, index_t C, float m,
                          float rs) {
  for (index_t j = 0; j < C; ++j) {
    float v = (x[j] - m) * rs;
    if (weight) v *= weight[j];
    if (bias) v += bias[j];
    y[j] = v;
  }
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static void normalize_row_avx2(float* y, const float* x, const float* weight, const float* bias,
                                              index_t C, float m, float rs) {
  using namespace simd;
  const __m256 vm = _mm256_set1_ps(m), vr = _mm256_set1_ps(rs);
  index_t j = 0;
  for (; j + kWidth <= C; j += kWidth) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vr);
    if (weight) v = _mm256_mul_ps(v, _mm256_loadu_ps(weight + j));
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(y + j, v);
  }
  normalize_row_scalar(y + j, x + j, weight ? weight + j : nullptr, bias ? bias + j : nullptr, C - j, m, rs);
}
#endif

void normalize_row(float* y, const float* x, const float* weight, const float* bias, index_t C, float m, float rs) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return normalize_row_avx2(y, x, weight, bias, C, m, rs);
#endif
  normalize_row_scalar(y, x, weight, bias, C, m, rs);
}

void moments(const float* x, index_t C, float& mean, float& var) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return row_moments_avx2(x, C, mean, var);
#endif
  row_moments(x, C, mean, var);
}

// One row of the backward: dx = rstd * (g - mean(g) - xh * mean(g * xh)) with g = dy * weight and
// xh = (x - mean) * rstd; the row's dweight (dy * xh) and dbias (dy) terms go into double partials pw, pb (null
// when not needed). Columns from j0 on (the tail the vector path leaves; 0 for the scalar path) are handled here.
void backward_row_scalar(float* dx, double* pw, double* pb, const float* dy, const float* x, const float* weight,
                         index_t C, float m, float rs, bool accumulate, index_t j0 = 0, double sum_g = 0.0,
                         double sum_gx = 0.0) {
  for (index_t j = j0; j < C; ++j) {
    const float xh = (x[j] - m) * rs;
    const float g = weight ? dy[j] * weight[j] : dy[j];
    sum_g += g;
    sum_gx += static_cast<double>(g) * xh;
    if (pw) {
      pw[j] += static_cast<double>(dy[j]) * xh;
      pb[j] += dy[j];
    }
  }
  const float mg = static_cast<float>(sum_g / C), mgx = static_cast<float>(sum_gx / C);
  for (index_t j = 0; j < C; ++j) {
    const float xh = (x[j] - m) * rs;
    const float g = weight ? dy[j] * weight[j] : dy[j];
    const float v = rs * (g - mg - xh * mgx);
    dx[j] = accumulate ? dx[j] + v : v;
  }
}

#ifdef CPUFORMER_HAVE_AVX2
// pd[0..8) += a * b (or += a when b is null), widened to double.
CPUFORMER_AVX2 static inline void add_wide(double* pd, __m256 a, const __m256* b) {
  __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
  if (b) {
    lo = _mm256_mul_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(*b)));
    hi = _mm256_mul_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(*b, 1)));
  }
  _mm256_storeu_pd(pd, _mm256_add_pd(_mm256_loadu_pd(pd), lo));
  _mm256_storeu_pd(pd + 4, _mm256_add_pd(_mm256_loadu_pd(pd + 4), hi));
}

CPUFORMER_AVX2 static void backward_row_avx2(float* dx, double* pw, double* pb, const float* dy, const float* x,
                                             const float* weight, index_t C, float m, float rs, bool accumulate) {
  using namespace simd;
  const __m256 vm = _mm256_set1_ps(m), vr = _mm256_set1_ps(rs);
  __m256 sg = _mm256_setzero_ps(), sgx = _mm256_setzero_ps();
  index_t j = 0;
  for (; j + kWidth <= C; j += kWidth) {
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vr);
    const __m256 d = _mm256_loadu_ps(dy + j);
    const __m256 g = weight ? _mm256_mul_ps(d, _mm256_loadu_ps(weight + j)) : d;
    sg = _mm256_add_ps(sg, g);
    sgx = _mm256_fmadd_ps(g, xh, sgx);
    if (pw) {
      add_wide(pw + j, d, &xh);
      add_wide(pb + j, d, nullptr);
    }
  }
  const index_t tail = j;
  // The scalar routine finishes the tail columns' sums and does the whole second pass when C is not a multiple
  // of 8; otherwise the vector second pass below runs.
  if (tail != C)
    return backward_row_scalar(dx, pw, pb, dy, x, weight, C, m, rs, accumulate, tail, hsum(sg), hsum(sgx));
  const __m256 mg = _mm256_set1_ps(static_cast<float>(static_cast<double>(hsum(sg)) / C));
  const __m256 mgx = _mm256_set1_ps(static_cast<float>(static_cast<double>(hsum(sgx)) / C));
  for (j = 0; j < C; j += kWidth) {
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vr);
    const __m256 d = _mm256_loadu_ps(dy + j);
    const __m256 g = weight ? _mm256_mul_ps(d, _mm256_loadu_ps(weight + j)) : d;
    __m256 v = _mm256_mul_ps(vr, _mm256_sub_ps(_mm256_sub_ps(g, mg), _mm256_mul_ps(xh, mgx)));
    if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(dx + j), v);
    _mm256_storeu_ps(dx + j, v);
  }
}
#endif

void backward_row(float* dx, double* pw, double* pb, const float* dy, const float* x, const float* weight,
                  index_t C, float m, float rs, bool accumulate) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return backward_row_avx2(dx, pw, pb, dy, x, weight, C, m, rs, accumulate);
#endif
  backward_row_scalar(dx, pw, pb, dy, x, weight, C, m, rs, accumulate);
}


// ---------------------------------------------------------------------------------------------------------------
// RMSNorm

// sum of x[j] * y[j] over a row (x * x for the mean square): double accumulation on the scalar path, two float
// vector accumulators reduced into double on the AVX2 path (as the LayerNorm moments).
double row_dot_scalar(const float* x, const float* y, index_t C) {
  double s = 0.0;
  for (index_t j = 0; j < C; ++j) s += static_cast<double>(x[j]) * y[j];
  return s;
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static double row_dot_avx2(const float* x, const float* y, index_t C) {
  using namespace simd;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  index_t j = 0;
  for (; j + 16 <= C; j += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(y + j + 8), s1);
  }
  double s = hsum(_mm256_add_ps(s0, s1));
  for (; j < C; ++j) s += static_cast<double>(x[j]) * y[j];
  return s;
}
#endif

double row_dot(const float* x, const float* y, index_t C) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return row_dot_avx2(x, y, C);
#endif
  return row_dot_scalar(x, y, C);
}

// The effective scale w[j] (weight, or 1 + weight when one_plus; 1 without a weight).
inline float scale_of(const float* weight, index_t j, bool one_plus) {
  return weight ? (one_plus ? 1.0f + weight[j] : weight[j]) : 1.0f;
}

}  // namespace

namespace {

// The rows' input: inp's row, or with a and b their sum, written into sum's row just before the norm reads it.
inline const float* row_input(const float* inp, float* sum, const float* a, const float* b, index_t r, index_t C) {
  if (!a) return inp + r * C;
  float* x = sum + r * C;
  for (index_t j = 0; j < C; ++j) x[j] = a[r * C + j] + b[r * C + j];
  return x;
}

void layernorm_rows(float* out, float* mean, float* rstd, const float* inp, float* sum, const float* a,
                    const float* b, const float* weight, const float* bias, index_t r0, index_t r1, index_t C,
                    float eps) {
  for (index_t r = r0; r < r1; ++r) {
    const float* x = row_input(inp, sum, a, b, r, C);
    float m, var;
    moments(x, C, m, var);
    const float rs = 1.0f / std::sqrt(var + eps);
    normalize_row(out + r * C, x, weight, bias, C, m, rs);
    if (mean) mean[r] = m;
    if (rstd) rstd[r] = rs;
  }
}

void check_norm(const char* name, index_t rows, index_t C, float eps) {
  CPUFORMER_CHECK(rows >= 0 && C >= 1, name, ": bad size rows=", rows, " C=", C);
  CPUFORMER_CHECK(eps >= 0.0f && std::isfinite(eps), name, ": eps must be finite and >= 0, got ", eps);
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, index_t rows, index_t C, float eps) {
  check_norm("layernorm_forward", rows, C, eps);
  detail::parallel_for(rows, rows_per_chunk(C), [&](index_t r0, index_t r1, int) {
    layernorm_rows(out, mean, rstd, inp, nullptr, nullptr, nullptr, weight, bias, r0, r1, C, eps);
  });
}

void residual_layernorm_forward(float* out, float* sum, float* mean, float* rstd, const float* a, const float* b,
                                const float* weight, const float* bias, index_t rows, index_t C, float eps) {
  check_norm("residual_layernorm_forward", rows, C, eps);
  detail::parallel_for(rows, rows_per_chunk(C), [&](index_t r0, index_t r1, int) {
    layernorm_rows(out, mean, rstd, nullptr, sum, a, b, weight, bias, r0, r1, C, eps);
  });
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, index_t rows, index_t C,
                        bool accumulate_dinp) {
  CPUFORMER_CHECK(rows >= 0 && C >= 1, "layernorm_backward: bad size rows=", rows, " C=", C);
  const int nt = detail::kernel_threads();
  const bool need_params = dweight || dbias;
  // Per-thread partial sums of dweight (first C) and dbias (next C).
  std::vector<double> partial(need_params ? static_cast<size_t>(nt) * 2 * C : 0, 0.0);
  std::vector<char> used(nt, 0);
  detail::parallel_for(rows, rows_per_chunk(C), [&](index_t r0, index_t r1, int t) {
    double* pw = need_params ? partial.data() + static_cast<size_t>(t) * 2 * C : nullptr;
    used[t] = 1;
    for (index_t r = r0; r < r1; ++r)
      backward_row(dinp + r * C, pw, pw ? pw + C : nullptr, dout + r * C, inp + r * C, weight, C, mean[r], rstd[r],
                   accumulate_dinp);
  });
  if (!need_params) return;
  for (index_t j = 0; j < C; ++j) {  // fixed reduction order over threads
    double w = 0.0, b = 0.0;
    for (int t = 0; t < nt; ++t) {
      if (!used[t]) continue;
      w += partial[static_cast<size_t>(t) * 2 * C + j];
      b += partial[static_cast<size_t>(t) * 2 * C + C + j];
    }
    if (dweight) dweight[j] += static_cast<float>(w);
    if (dbias) dbias[j] += static_cast<float>(b);
  }
}

namespace {

void rmsnorm_rows(float* out, float* rstd, const float* inp, float* sum, const float* a, const float* b,
                  const float* weight, index_t r0, index_t r1, index_t C, float eps, bool one_plus) {
  for (index_t r = r0; r < r1; ++r) {
    const float* x = row_input(inp, sum, a, b, r, C);
    float* y = out + r * C;
    const float ms = static_cast<float>(row_dot(x, x, C) / C);
    const float rs = 1.0f / std::sqrt(ms + eps);
    // (x * rstd) * w: the order of torch.nn.RMSNorm, LlamaRMSNorm and Gemma's (x * rstd) * (1 + w)
    if (!weight) {
      for (index_t j = 0; j < C; ++j) y[j] = x[j] * rs;
    } else if (one_plus) {
      for (index_t j = 0; j < C; ++j) y[j] = x[j] * rs * (1.0f + weight[j]);
    } else {
      for (index_t j = 0; j < C; ++j) y[j] = x[j] * rs * weight[j];
    }
    if (rstd) rstd[r] = rs;
  }
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, index_t rows, index_t C,
                     float eps, bool one_plus) {
  check_norm("rmsnorm_forward", rows, C, eps);
  detail::parallel_for(rows, rows_per_chunk(C), [&](index_t r0, index_t r1, int) {
    rmsnorm_rows(out, rstd, inp, nullptr, nullptr, nullptr, weight, r0, r1, C, eps, one_plus);
  });
}

void residual_rmsnorm_forward(float* out, float* sum, float* rstd, const float* a, const float* b,
                              const float* weight, index_t rows, index_t C, float eps, bool one_plus) {
  check_norm("residual_rmsnorm_forward", rows, C, eps);
  detail::parallel_for(rows, rows_per_chunk(C), [&](index_t r0, index_t r1, int) {
    rmsnorm_rows(out, rstd, nullptr, sum, a, b, weight, r0, r1, C, eps, one_plus);
  });
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, index_t rows, index_t C, bool one_plus, bool accumulate_dinp) {
  CPUFORMER_CHECK(rows >= 0 && C >= 1, "rmsnorm_backward: bad size rows=", rows, " C=", C);
  CPUFORMER_CHECK(rows == 0 || rstd, "rmsnorm_backward: rstd (saved by the forward) is required");
  const int nt = detail::kernel_threads();
  std::vector<double> partial(dweight ? static_cast<size_t>(nt) * C : 0, 0.0);
  std::vector<char> used(nt, 0);
  detail::parallel_for(rows, rows_per_chunk(C), [&](index_t r0, index_t r1, int t) {
    double* pw = dweight ? partial.data() + static_cast<size_t>(t) * C : nullptr;
    used[t] = 1;
    std::vector<float> g(static_cast<size_t>(C));
    for (index_t r = r0; r < r1; ++r) {
      const float* x = inp + r * C;
      const float* dy = dout + r * C;
      float* dx = dinp + r * C;
      const float rs = rstd[r];
      // y = xh * w with xh = x * rs:  dx = rs * (g - xh * mean(g * xh)), g = dy * w;  dw += dy * xh
      for (index_t j = 0; j < C; ++j) g[j] = dy[j] * scale_of(weight, j, one_plus);
      const float mgx = static_cast<float>(row_dot(g.data(), x, C) * rs / C);  // mean(g * xh)
      for (index_t j = 0; j < C; ++j) {
        const float xh = x[j] * rs;
        const float v = rs * (g[j] - xh * mgx);
        dx[j] = accumulate_dinp ? dx[j] + v : v;
        if (pw) pw[j] += static_cast<double>(dy[j]) * xh;
      }
    }
  });
  if (!dweight) return;
  for (index_t j = 0; j < C; ++j) {  // fixed reduction order over threads
    double w = 0.0;
    for (int t = 0; t < nt; ++t)
      if (used[t]) w += partial[static_cast<size_t>(t) * C + j];
    dweight[j] += static_cast<float>(w);
  }
}

}  // namespace cpuformer
