// activations.cpp: ReLU / GELU (erf and tanh forms) / SiLU fused with an optional bias add, gated units (SwiGLU,
// GeGLU, ReGLU), dropout, residual add.
#include "cpuformer/activations.h"

#include <cmath>
#include <initializer_list>
#include <vector>

#include "parallel.h"
#include "random.h"
#include "simd.h"

namespace cpuformer {
namespace {

constexpr index_t kMinElemsPerThread = 1 << 15;
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1/sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2/pi)
constexpr float kGeluCoef = 0.044715f;

index_t rows_per_chunk(index_t cols) { return std::max<index_t>(1, kMinElemsPerThread / std::max<index_t>(1, cols)); }

// Tanh-GELU through e = exp(2u), u = sqrt(2/pi) (x + 0.044715 x^3), r = 1 / (e + 1): then 1 + tanh u = 2 e r and
// 1 - tanh^2 u = 4 e r^2 without the cancellation of 1 - t*t near saturation. |u| <= 40 already gives tanh = +-1
// in float and keeps e finite.
constexpr float kTanhClamp = 40.0f;
inline void tanh_parts(float x, float& e, float& r) {
  float u = kSqrt2OverPi * (x + kGeluCoef * x * x * x);
  u = std::fmin(std::fmax(u, -kTanhClamp), kTanhClamp);
  e = std::exp(2.0f * u);
  r = 1.0f / (e + 1.0f);
}

// sigmoid(x) = 1 / (1 + exp(-x)): exp(-x) overflows to +inf for x < -88.7, giving exactly 0 (never NaN), and
// underflows to 0 for large x, giving 1; so SiLU x * sigmoid(x) is finite wherever x is.
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

float act_scalar(float x, Activation act) {
  switch (act) {
    case Activation::kRelu: return x > 0.0f ? x : 0.0f;
    case Activation::kGeluErf: return 0.5f * x * (1.0f + std::erf(x * kSqrt1_2));
    case Activation::kGeluTanh: {
      float e, r;
      tanh_parts(x, e, r);
      return x * (e * r);  // 0.5 x (1 + tanh u) = x e / (e + 1); e * r first, x * e can overflow
    }
    case Activation::kSilu: return x * sigmoid(x);
    default: return x;
  }
}

// d act / dx at x
float act_grad_scalar(float x, Activation act) {
  switch (act) {
    case Activation::kRelu: return x > 0.0f ? 1.0f : 0.0f;  // PyTorch: relu'(0) = 0
    case Activation::kGeluErf:
      return 0.5f * (1.0f + std::erf(x * kSqrt1_2)) + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
    case Activation::kGeluTanh: {
      float e, r;
      tanh_parts(x, e, r);
      const float one_plus_t = 2.0f * e * r, sech2 = one_plus_t * 2.0f * r;  // 1 - tanh^2 = 4e / (e + 1)^2
      return 0.5f * one_plus_t + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x * x);
    }
    case Activation::kSilu: {  // s (1 + x (1 - s))
      const float sg = sigmoid(x);
      return sg * (1.0f + x * (1.0f - sg));
    }
    default: return 1.0f;
  }
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static inline void tanh_parts_avx2(__m256 x, __m256& e, __m256& r) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  __m256 u = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi), _mm256_fmadd_ps(_mm256_set1_ps(kGeluCoef), x3, x));
  u = _mm256_min_ps(_mm256_set1_ps(kTanhClamp), _mm256_max_ps(_mm256_set1_ps(-kTanhClamp), u));
  e = simd::exp_ps(_mm256_add_ps(u, u));
  r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}

// 1 / (1 + exp(-x)); exp_ps saturates at exp(88.37) for x < -88.37, which leaves sigmoid at about 3e-39 there
// (SiLU within 1e-36 of 0) instead of +inf / NaN.
CPUFORMER_AVX2 static inline __m256 sigmoid_avx2(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, simd::exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

CPUFORMER_AVX2 static inline __m256 act_avx2(__m256 x, Activation act) {
  using namespace simd;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  switch (act) {
    case Activation::kRelu: return _mm256_max_ps(x, _mm256_setzero_ps());
    case Activation::kGeluErf:
      return _mm256_mul_ps(_mm256_mul_ps(half, x),
                           _mm256_add_ps(one, erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(kSqrt1_2)))));
    case Activation::kGeluTanh: {
      __m256 e, r;
      tanh_parts_avx2(x, e, r);
      return _mm256_mul_ps(x, _mm256_mul_ps(e, r));
    }
    case Activation::kSilu: return _mm256_mul_ps(x, sigmoid_avx2(x));
    default: return x;
  }
}

CPUFORMER_AVX2 static inline __m256 act_grad_avx2(__m256 x, Activation act) {
  using namespace simd;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  switch (act) {
    case Activation::kRelu:
      return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ), one);
    case Activation::kGeluErf: {
      const __m256 cdf = _mm256_mul_ps(half, _mm256_add_ps(one, erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(kSqrt1_2)))));
      const __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(kInvSqrt2Pi),
                                       exp_ps(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(x, x))));
      return _mm256_fmadd_ps(x, pdf, cdf);
    }
    case Activation::kGeluTanh: {
      __m256 e, r;
      tanh_parts_avx2(x, e, r);
      const __m256 one_plus_t = _mm256_mul_ps(_mm256_add_ps(e, e), r);
      const __m256 sech2 = _mm256_mul_ps(one_plus_t, _mm256_add_ps(r, r));
      const __m256 du = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi),
                                      _mm256_fmadd_ps(_mm256_set1_ps(3.0f * kGeluCoef), _mm256_mul_ps(x, x), one));
      return _mm256_fmadd_ps(half, one_plus_t, _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_mul_ps(sech2, du)));
    }
    case Activation::kSilu: {
      const __m256 sg = sigmoid_avx2(x);
      return _mm256_mul_ps(sg, _mm256_fmadd_ps(x, _mm256_sub_ps(one, sg), one));
    }
    default: return one;
  }
}

#endif

#ifdef CPUFORMER_HAVE_AVX512
CPUFORMER_AVX512 static inline void tanh_parts_avx512(__m512 x, __m512& e, __m512& r) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  __m512 u = _mm512_mul_ps(_mm512_set1_ps(kSqrt2OverPi), _mm512_fmadd_ps(_mm512_set1_ps(kGeluCoef), x3, x));
  u = _mm512_min_ps(_mm512_set1_ps(kTanhClamp), _mm512_max_ps(_mm512_set1_ps(-kTanhClamp), u));
  e = simd::exp512_ps(_mm512_add_ps(u, u));
  r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
}

// 1 / (1 + exp(-x)); exp_ps saturates at exp(88.37) for x < -88.37, which leaves sigmoid at about 3e-39 there
// (SiLU within 1e-36 of 0) instead of +inf / NaN.
CPUFORMER_AVX512 static inline __m512 sigmoid_avx512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, simd::exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

CPUFORMER_AVX512 static inline __m512 act_avx512(__m512 x, Activation act) {
  using namespace simd;
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  switch (act) {
    case Activation::kRelu: return _mm512_max_ps(x, _mm512_setzero_ps());
    case Activation::kGeluErf:
      return _mm512_mul_ps(_mm512_mul_ps(half, x),
                           _mm512_add_ps(one, erf512_ps(_mm512_mul_ps(x, _mm512_set1_ps(kSqrt1_2)))));
    case Activation::kGeluTanh: {
      __m512 e, r;
      tanh_parts_avx512(x, e, r);
      return _mm512_mul_ps(x, _mm512_mul_ps(e, r));
    }
    case Activation::kSilu: return _mm512_mul_ps(x, sigmoid_avx512(x));
    default: return x;
  }
}

CPUFORMER_AVX512 static inline __m512 act_grad_avx512(__m512 x, Activation act) {
  using namespace simd;
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  switch (act) {
    case Activation::kRelu:
      return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), one);
    case Activation::kGeluErf: {
      const __m512 cdf = _mm512_mul_ps(half, _mm512_add_ps(one, erf512_ps(_mm512_mul_ps(x, _mm512_set1_ps(kSqrt1_2)))));
      const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(kInvSqrt2Pi),
                                       exp512_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(x, x))));
      return _mm512_fmadd_ps(x, pdf, cdf);
    }
    case Activation::kGeluTanh: {
      __m512 e, r;
      tanh_parts_avx512(x, e, r);
      const __m512 one_plus_t = _mm512_mul_ps(_mm512_add_ps(e, e), r);
      const __m512 sech2 = _mm512_mul_ps(one_plus_t, _mm512_add_ps(r, r));
      const __m512 du = _mm512_mul_ps(_mm512_set1_ps(kSqrt2OverPi),
                                      _mm512_fmadd_ps(_mm512_set1_ps(3.0f * kGeluCoef), _mm512_mul_ps(x, x), one));
      return _mm512_fmadd_ps(half, one_plus_t, _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_mul_ps(sech2, du)));
    }
    case Activation::kSilu: {
      const __m512 sg = sigmoid_avx512(x);
      return _mm512_mul_ps(sg, _mm512_fmadd_ps(x, _mm512_sub_ps(one, sg), one));
    }
    default: return one;
  }
}

// The AVX2 loops 16 lanes at a time: the vector part of each row ([0, cols rounded down to 8)) in 16-lane groups,
// the last one masked, the rest scalar as there; every element goes through the AVX2 code's operations (and the
// bias sums through its order), so the results are its bits.
CPUFORMER_AVX512 static inline __mmask16 lanes(index_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
}

CPUFORMER_AVX512 static void forward_rows_avx512(float* out, const float* inp, const float* bias, index_t r0,
                                                 index_t r1, index_t cols, Activation act) {
  const index_t vec = cols / simd::kWidth * simd::kWidth;
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * cols;
    float* y = out + r * cols;
    for (index_t j = 0; j < vec; j += 16) {
      const __mmask16 m = lanes(vec - j);
      __m512 v = _mm512_maskz_loadu_ps(m, x + j);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
      _mm512_mask_storeu_ps(y + j, m, act_avx512(v, act));
    }
    for (index_t j = vec; j < cols; ++j) y[j] = act_scalar(bias ? x[j] + bias[j] : x[j], act);
  }
}

CPUFORMER_AVX512 static void backward_rows_avx512(float* dinp, double* dbias_part, const float* dout,
                                                  const float* inp, const float* bias, index_t r0, index_t r1,
                                                  index_t cols, Activation act) {
  const index_t vec = cols / simd::kWidth * simd::kWidth;
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * cols;
    const float* dy = dout + r * cols;
    float* dx = dinp + r * cols;
    for (index_t j = 0; j < vec; j += 16) {
      const __mmask16 m = lanes(vec - j);
      __m512 v = _mm512_maskz_loadu_ps(m, x + j);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
      _mm512_mask_storeu_ps(dx + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + j), act_grad_avx512(v, act)));
    }
    for (index_t j = vec; j < cols; ++j) dx[j] = dy[j] * act_grad_scalar(bias ? x[j] + bias[j] : x[j], act);
    if (dbias_part)
      for (index_t j = 0; j < cols; ++j) dbias_part[j] += dx[j];
  }
}
#endif

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static void forward_rows_avx2(float* out, const float* inp, const float* bias, index_t r0, index_t r1,
                                             index_t cols, Activation act) {
  using namespace simd;
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * cols;
    float* y = out + r * cols;
    index_t j = 0;
    for (; j + kWidth <= cols; j += kWidth) {
      __m256 v = _mm256_loadu_ps(x + j);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
      _mm256_storeu_ps(y + j, act_avx2(v, act));
    }
    for (; j < cols; ++j) y[j] = act_scalar(bias ? x[j] + bias[j] : x[j], act);
  }
}

CPUFORMER_AVX2 static void backward_rows_avx2(float* dinp, double* dbias_part, const float* dout, const float* inp,
                                              const float* bias, index_t r0, index_t r1, index_t cols,
                                              Activation act) {
  using namespace simd;
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * cols;
    const float* dy = dout + r * cols;
    float* dx = dinp + r * cols;
    index_t j = 0;
    for (; j + kWidth <= cols; j += kWidth) {
      __m256 v = _mm256_loadu_ps(x + j);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
      const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dy + j), act_grad_avx2(v, act));
      _mm256_storeu_ps(dx + j, g);
    }
    for (; j < cols; ++j) dx[j] = dy[j] * act_grad_scalar(bias ? x[j] + bias[j] : x[j], act);
    if (dbias_part)
      for (j = 0; j < cols; ++j) dbias_part[j] += dx[j];
  }
}
#endif

void forward_rows_scalar(float* out, const float* inp, const float* bias, index_t r0, index_t r1, index_t cols,
                         Activation act) {
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = 0; j < cols; ++j) {
      const float v = bias ? inp[r * cols + j] + bias[j] : inp[r * cols + j];
      out[r * cols + j] = act_scalar(v, act);
    }
}

void backward_rows_scalar(float* dinp, double* dbias_part, const float* dout, const float* inp, const float* bias,
                          index_t r0, index_t r1, index_t cols, Activation act) {
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = 0; j < cols; ++j) {
      const float v = bias ? inp[r * cols + j] + bias[j] : inp[r * cols + j];
      const float g = dout[r * cols + j] * act_grad_scalar(v, act);
      dinp[r * cols + j] = g;
      if (dbias_part) dbias_part[j] += g;
    }
}


// Gated units: out = act(gate) * up; backward dgate = dout * up * act'(gate), dup = dout * act(gate). Every element
// is read before its outputs are written, so out may alias up (and dgate/dup the matching elements of dout).
void gated_forward_scalar(float* out, index_t ldo, const float* gate, index_t ldg, const float* up, index_t ldu,
                          index_t r0, index_t r1, index_t cols, Activation act, index_t j0 = 0) {
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = j0; j < cols; ++j) out[r * ldo + j] = act_scalar(gate[r * ldg + j], act) * up[r * ldu + j];
}

void gated_backward_scalar(float* dgate, index_t lddg, float* dup, index_t lddu, const float* dout, index_t ldo,
                           const float* gate, index_t ldg, const float* up, index_t ldu, index_t r0, index_t r1,
                           index_t cols, Activation act, index_t j0 = 0) {
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = j0; j < cols; ++j) {
      const float d = dout[r * ldo + j], g = gate[r * ldg + j], u = up[r * ldu + j];
      const float a = act_scalar(g, act), da = act_grad_scalar(g, act);
      dgate[r * lddg + j] = d * u * da;
      dup[r * lddu + j] = d * a;
    }
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static void gated_forward_avx2(float* out, index_t ldo, const float* gate, index_t ldg, const float* up,
                                              index_t ldu, index_t r0, index_t r1, index_t cols, Activation act) {
  using namespace simd;
  const index_t vec = cols / kWidth * kWidth;
  for (index_t r = r0; r < r1; ++r) {
    const float *g = gate + r * ldg, *u = up + r * ldu;
    float* o = out + r * ldo;
    for (index_t j = 0; j < vec; j += kWidth)
      _mm256_storeu_ps(o + j, _mm256_mul_ps(act_avx2(_mm256_loadu_ps(g + j), act), _mm256_loadu_ps(u + j)));
  }
  if (vec < cols) gated_forward_scalar(out, ldo, gate, ldg, up, ldu, r0, r1, cols, act, vec);
}

CPUFORMER_AVX2 static void gated_backward_avx2(float* dgate, index_t lddg, float* dup, index_t lddu, const float* dout,
                                               index_t ldo, const float* gate, index_t ldg, const float* up,
                                               index_t ldu, index_t r0, index_t r1, index_t cols, Activation act) {
  using namespace simd;
  const index_t vec = cols / kWidth * kWidth;
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = 0; j < vec; j += kWidth) {
      const __m256 d = _mm256_loadu_ps(dout + r * ldo + j), g = _mm256_loadu_ps(gate + r * ldg + j),
                   u = _mm256_loadu_ps(up + r * ldu + j);
      const __m256 a = act_avx2(g, act), da = act_grad_avx2(g, act);
      _mm256_storeu_ps(dgate + r * lddg + j, _mm256_mul_ps(_mm256_mul_ps(d, u), da));
      _mm256_storeu_ps(dup + r * lddu + j, _mm256_mul_ps(d, a));
    }
  if (vec < cols) gated_backward_scalar(dgate, lddg, dup, lddu, dout, ldo, gate, ldg, up, ldu, r0, r1, cols, act, vec);
}
#endif

#ifdef CPUFORMER_HAVE_AVX512
CPUFORMER_AVX512 static void gated_forward_avx512(float* out, index_t ldo, const float* gate, index_t ldg,
                                                  const float* up, index_t ldu, index_t r0, index_t r1, index_t cols,
                                                  Activation act) {
  const index_t vec = cols / simd::kWidth * simd::kWidth;
  for (index_t r = r0; r < r1; ++r) {
    const float *g = gate + r * ldg, *u = up + r * ldu;
    float* o = out + r * ldo;
    for (index_t j = 0; j < vec; j += 16) {
      const __mmask16 m = lanes(vec - j);
      _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(act_avx512(_mm512_maskz_loadu_ps(m, g + j), act),
                                                    _mm512_maskz_loadu_ps(m, u + j)));
    }
  }
  if (vec < cols) gated_forward_scalar(out, ldo, gate, ldg, up, ldu, r0, r1, cols, act, vec);
}

CPUFORMER_AVX512 static void gated_backward_avx512(float* dgate, index_t lddg, float* dup, index_t lddu,
                                                   const float* dout, index_t ldo, const float* gate, index_t ldg,
                                                   const float* up, index_t ldu, index_t r0, index_t r1, index_t cols,
                                                   Activation act) {
  const index_t vec = cols / simd::kWidth * simd::kWidth;
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = 0; j < vec; j += 16) {
      const __mmask16 m = lanes(vec - j);
      const __m512 d = _mm512_maskz_loadu_ps(m, dout + r * ldo + j), g = _mm512_maskz_loadu_ps(m, gate + r * ldg + j),
                   u = _mm512_maskz_loadu_ps(m, up + r * ldu + j);
      const __m512 a = act_avx512(g, act), da = act_grad_avx512(g, act);
      _mm512_mask_storeu_ps(dgate + r * lddg + j, m, _mm512_mul_ps(_mm512_mul_ps(d, u), da));
      _mm512_mask_storeu_ps(dup + r * lddu + j, m, _mm512_mul_ps(d, a));
    }
  if (vec < cols) gated_backward_scalar(dgate, lddg, dup, lddu, dout, ldo, gate, ldg, up, ldu, r0, r1, cols, act, vec);
}
#endif

void check_gated(const char* who, index_t rows, index_t cols, std::initializer_list<index_t> lds) {
  CPUFORMER_CHECK(rows >= 0 && cols >= 0, who, ": negative size rows=", rows, " cols=", cols);
  for (index_t ld : lds)
    CPUFORMER_CHECK(rows <= 1 || ld >= cols, who, ": row stride ", ld, " is below cols = ", cols);
}

}  // namespace

void activation_forward(float* out, const float* inp, const float* bias, index_t rows, index_t cols,
                        Activation act) {
  CPUFORMER_CHECK(rows >= 0 && cols >= 0, "activation_forward: negative size");
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
#ifdef CPUFORMER_HAVE_AVX512
    if (detail::use_avx512()) return forward_rows_avx512(out, inp, bias, r0, r1, cols, act);
#endif
#ifdef CPUFORMER_HAVE_AVX2
    if (detail::use_avx2()) return forward_rows_avx2(out, inp, bias, r0, r1, cols, act);
#endif
    forward_rows_scalar(out, inp, bias, r0, r1, cols, act);
  });
}

void activation_backward(float* dinp, float* dbias, const float* dout, const float* inp, const float* bias,
                         index_t rows, index_t cols, Activation act) {
  CPUFORMER_CHECK(rows >= 0 && cols >= 0, "activation_backward: negative size");
  const int nt = detail::kernel_threads();
  std::vector<double> partial(dbias ? static_cast<size_t>(nt) * cols : 0, 0.0);
  std::vector<char> used(nt, 0);
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int t) {
    double* part = dbias ? partial.data() + static_cast<size_t>(t) * cols : nullptr;
    used[t] = 1;
#ifdef CPUFORMER_HAVE_AVX512
    if (detail::use_avx512()) return backward_rows_avx512(dinp, part, dout, inp, bias, r0, r1, cols, act);
#endif
#ifdef CPUFORMER_HAVE_AVX2
    if (detail::use_avx2()) return backward_rows_avx2(dinp, part, dout, inp, bias, r0, r1, cols, act);
#endif
    backward_rows_scalar(dinp, part, dout, inp, bias, r0, r1, cols, act);
  });
  if (!dbias) return;
  for (index_t j = 0; j < cols; ++j) {
    double s = 0.0;
    for (int t = 0; t < nt; ++t)
      if (used[t]) s += partial[static_cast<size_t>(t) * cols + j];
    dbias[j] += static_cast<float>(s);
  }
}

namespace {
// acc[c] += row[c] for c < n, in double: each column's sum in row order (the same bits on every path; the wider
// paths only take more columns per instruction).
void add_row_scalar(double* acc, const float* row, index_t n) {
  for (index_t c = 0; c < n; ++c) acc[c] += row[c];
}
#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 void add_row_avx2(double* acc, const float* row, index_t n) {
  for (index_t c = 0; c < n; ++c) acc[c] += row[c];
}
#endif
#ifdef CPUFORMER_HAVE_AVX512
CPUFORMER_AVX512 void add_row_avx512(double* acc, const float* row, index_t n) {
  for (index_t c = 0; c < n; ++c) acc[c] += row[c];
}
#endif
}  // namespace

void bias_backward(float* dbias, const float* dout, index_t rows, index_t cols, index_t ld) {
  if (ld < 0) ld = cols;
  CPUFORMER_CHECK(rows >= 0 && cols >= 0 && (rows <= 1 || ld >= cols), "bias_backward: bad size rows=", rows,
                  " cols=", cols, " ld=", ld);
  auto add_row = add_row_scalar;
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) add_row = add_row_avx2;
#endif
#ifdef CPUFORMER_HAVE_AVX512
  if (detail::use_avx512()) add_row = add_row_avx512;
#endif
  // Threads own column ranges and sum rows in order: deterministic, no partial buffers.
  detail::parallel_for(cols, std::max<index_t>(16, (1 << 14) / std::max<index_t>(1, rows)),
                       [&](index_t c0, index_t c1, int) {
                         std::vector<double> acc(static_cast<size_t>(c1 - c0), 0.0);
                         for (index_t r = 0; r < rows; ++r) add_row(acc.data(), dout + r * ld + c0, c1 - c0);
                         for (index_t c = c0; c < c1; ++c) dbias[c] += static_cast<float>(acc[c - c0]);
                       });
}

void dropout_forward(float* out, std::uint8_t* mask, const float* inp, index_t n, float p, std::uint64_t seed) {
  CPUFORMER_CHECK(n >= 0, "dropout_forward: negative size");
  CPUFORMER_CHECK(p >= 0.0f && p < 1.0f, "dropout_forward: p must be in [0, 1), got ", p);
  const std::uint32_t threshold = detail::dropout_threshold(p);
  const float scale = 1.0f / (1.0f - p);
  detail::parallel_for(n, kMinElemsPerThread, [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) {
      const bool keep = detail::dropout_keep(seed, static_cast<std::uint64_t>(i), threshold);
      out[i] = keep ? inp[i] * scale : 0.0f;
      if (mask) mask[i] = keep;
    }
  });
}

void dropout_backward(float* dinp, const float* dout, index_t n, float p, std::uint64_t seed) {
  CPUFORMER_CHECK(n >= 0, "dropout_backward: negative size");
  CPUFORMER_CHECK(p >= 0.0f && p < 1.0f, "dropout_backward: p must be in [0, 1), got ", p);
  const std::uint32_t threshold = detail::dropout_threshold(p);
  const float scale = 1.0f / (1.0f - p);
  detail::parallel_for(n, kMinElemsPerThread, [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) dinp[i] = detail::dropout_keep(seed, static_cast<std::uint64_t>(i), threshold) ? dout[i] * scale : 0.0f;
  });
}

void residual_forward(float* out, const float* a, const float* b, index_t n) {
  CPUFORMER_CHECK(n >= 0, "residual_forward: negative size");
  detail::parallel_for(n, kMinElemsPerThread * 4, [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) out[i] = a[i] + b[i];
  });
}

void gated_forward(float* out, index_t ldo, const float* gate, index_t ldg, const float* up, index_t ldu, index_t rows,
                   index_t cols, Activation act) {
  check_gated("gated_forward", rows, cols, {ldo, ldg, ldu});
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
#ifdef CPUFORMER_HAVE_AVX512
    if (detail::use_avx512()) return gated_forward_avx512(out, ldo, gate, ldg, up, ldu, r0, r1, cols, act);
#endif
#ifdef CPUFORMER_HAVE_AVX2
    if (detail::use_avx2()) return gated_forward_avx2(out, ldo, gate, ldg, up, ldu, r0, r1, cols, act);
#endif
    gated_forward_scalar(out, ldo, gate, ldg, up, ldu, r0, r1, cols, act);
  });
}

void gated_backward(float* dgate, index_t lddg, float* dup, index_t lddu, const float* dout, index_t ldo,
                    const float* gate, index_t ldg, const float* up, index_t ldu, index_t rows, index_t cols,
                    Activation act) {
  check_gated("gated_backward", rows, cols, {lddg, lddu, ldo, ldg, ldu});
  detail::parallel_for(rows, rows_per_chunk(cols), [&](index_t r0, index_t r1, int) {
#ifdef CPUFORMER_HAVE_AVX512
    if (detail::use_avx512())
      return gated_backward_avx512(dgate, lddg, dup, lddu, dout, ldo, gate, ldg, up, ldu, r0, r1, cols, act);
#endif
#ifdef CPUFORMER_HAVE_AVX2
    if (detail::use_avx2())
      return gated_backward_avx2(dgate, lddg, dup, lddu, dout, ldo, gate, ldg, up, ldu, r0, r1, cols, act);
#endif
    gated_backward_scalar(dgate, lddg, dup, lddu, dout, ldo, gate, ldg, up, ldu, r0, r1, cols, act);
  });
}

}  // namespace cpuformer
