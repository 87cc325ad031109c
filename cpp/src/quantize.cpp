// quantize.cpp: int8 weight quantization and the dynamically quantized Linear product (see quantize.h).
//
// Packed weight layout: panels of 16 output columns; inside a panel, groups of 4 consecutive k, and in a group the
// 4 bytes of column 0, then column 1, ... (64 bytes). One broadcast 32-bit load of 4 activation bytes then meets
// 16 columns in two vpmaddubsw + two vpmaddwd: 4 products per int32 lane, accumulated exactly.
#include "cpuformer/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "parallel.h"
#include "simd.h"

namespace cpuformer {
using detail::parallel_for;

namespace {

constexpr index_t kPanel = 16;  // output columns per packed panel
constexpr index_t kGroup = 4;   // k values per 32-bit group
constexpr int kMaxRows = 4;     // activation rows per micro-kernel call

index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

// Round half to even for |v| < 2^22 without libm (adding 1.5 * 2^23 leaves the integer in the mantissa); the
// AVX2 path's vcvtps2dq rounds the same way, so both paths quantize identically.
inline float round_even(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// ---- activation rows ------------------------------------------------------------------------------------------

struct RowQuant {
  float scale;  // NaN when the row holds a non-finite value
  std::int32_t zero;
  float inv;
};

inline RowQuant row_params(float lo, float hi, bool finite) {
  if (!finite) return {std::numeric_limits<float>::quiet_NaN(), 0, 0.0f};
  float scale = (hi - lo) / 127.0f;  // lo <= 0 <= hi, so 0 is exactly representable
  if (!(scale >= 1e-30f)) return {1.0f, 0, 0.0f};  // all (near) zero: every q is 0
  const float inv = 1.0f / scale;
  const float z = std::min(127.0f, std::max(0.0f, round_even(-lo * inv)));
  return {scale, static_cast<std::int32_t>(z), inv};
}

void quantize_row_scalar(const float* x, index_t K, std::uint8_t* q, RowQuant* out) {
  float lo = 0.0f, hi = 0.0f, poison = 0.0f;
  for (index_t k = 0; k < K; ++k) {
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
    poison += x[k] * 0.0f;  // NaN if any element is NaN or infinite
  }
  const RowQuant p = row_params(lo, hi, poison == 0.0f);
  for (index_t k = 0; k < K; ++k) {
    const float v = round_even(x[k] * p.inv) + static_cast<float>(p.zero);
    q[k] = static_cast<std::uint8_t>(std::min(127.0f, std::max(0.0f, v)));
  }
  *out = p;
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 void quantize_row_avx2(const float* x, index_t K, std::uint8_t* q, RowQuant* out) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps(), vpoison = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  index_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
    vpoison = _mm256_add_ps(vpoison, _mm256_mul_ps(v, zero));
  }
  float lo = -simd::hmax(_mm256_sub_ps(zero, vlo)), hi = simd::hmax(vhi), poison = simd::hsum(vpoison);
  for (; k < K; ++k) {
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
    poison += x[k] * 0.0f;
  }
  const RowQuant p = row_params(lo, hi, poison == 0.0f);
  const __m256 inv = _mm256_set1_ps(p.inv);
  const __m256i zp = _mm256_set1_epi32(p.zero);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i top = _mm256_set1_epi8(127);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i i0 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv)), zp);
    __m256i i1 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv)), zp);
    __m256i i2 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), inv)), zp);
    __m256i i3 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), inv)), zp);
    __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));  // clamps at 0
    b = _mm256_min_epu8(_mm256_permutevar8x32_epi32(b, order), top);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), b);
  }
  for (; k < K; ++k) {
    const float v = round_even(x[k] * p.inv) + static_cast<float>(p.zero);
    q[k] = static_cast<std::uint8_t>(std::min(127.0f, std::max(0.0f, v)));
  }
  *out = p;
}
#endif

void quantize_rows(const float* x, index_t M, index_t K, index_t ldx, std::uint8_t* qa, index_t ldq, RowQuant* rq) {
  parallel_for(M, std::max<index_t>(1, 16384 / std::max<index_t>(K, 1)), [&](index_t m0, index_t m1, int) {
    for (index_t m = m0; m < m1; ++m) {
      std::uint8_t* q = qa + m * ldq;
#ifdef CPUFORMER_HAVE_AVX2
      if (detail::use_avx2()) {
        quantize_row_avx2(x + m * ldx, K, q, rq + m);
      } else
#endif
        quantize_row_scalar(x + m * ldx, K, q, rq + m);
      std::fill(q + K, q + ldq, std::uint8_t(0));  // padding meets zero weights
    }
  });
}

// ---- the product ----------------------------------------------------------------------------------------------

struct Tile {
  const std::uint8_t* a;  // first activation row of the tile, rows ldq apart
  index_t ldq, groups;
  const std::int8_t* panel;
  const RowQuant* rq;
  const float* scale;          // 16 weight scales of the panel
  const std::int32_t* col_sum;  // 16 column sums
  const float* bias;           // the panel's biases (cols of them) or null
  float* y;                    // output tile, rows ldy apart
  index_t ldy, cols;           // cols <= 16 stored
};

inline void finish_scalar(const Tile& t, int rows, const std::int32_t acc[kMaxRows][kPanel]) {
  for (int r = 0; r < rows; ++r)
    for (index_t j = 0; j < t.cols; ++j) {
      const std::int32_t d = acc[r][j] - t.rq[r].zero * t.col_sum[j];
      const float s = t.rq[r].scale * t.scale[j];
      t.y[r * t.ldy + j] = static_cast<float>(d) * s + (t.bias ? t.bias[j] : 0.0f);
    }
}

void tile_scalar(const Tile& t, int rows) {
  std::int32_t acc[kMaxRows][kPanel] = {};
  for (int r = 0; r < rows; ++r) {
    const std::uint8_t* a = t.a + r * t.ldq;
    for (index_t g = 0; g < t.groups; ++g) {
      const std::int8_t* w = t.panel + g * kPanel * kGroup;
      for (index_t j = 0; j < kPanel; ++j) {
        std::int32_t s = 0;
        for (index_t b = 0; b < kGroup; ++b) s += std::int32_t(a[g * kGroup + b]) * std::int32_t(w[j * kGroup + b]);
        acc[r][j] += s;
      }
    }
  }
  finish_scalar(t, rows, acc);
}

#ifdef CPUFORMER_HAVE_AVX2
template <int R>
CPUFORMER_AVX2 void tile_avx2(const Tile& t) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const std::int8_t* w = t.panel;
  for (index_t g = 0; g < t.groups; ++g, w += kPanel * kGroup) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    for (int r = 0; r < R; ++r) {
      std::int32_t four;
      std::memcpy(&four, t.a + r * t.ldq + g * kGroup, 4);
      const __m256i a = _mm256_set1_epi32(four);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w1), ones));
    }
  }
  const __m256i cs0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.col_sum));
  const __m256i cs1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.col_sum + 8));
  const __m256 sw0 = _mm256_loadu_ps(t.scale), sw1 = _mm256_loadu_ps(t.scale + 8);
  const __m256i m0 = simd::tail_mask(static_cast<int>(std::min<index_t>(t.cols, 8)));
  const __m256i m1 = simd::tail_mask(static_cast<int>(std::max<index_t>(t.cols - 8, 0)));
  const __m256 b0 = t.bias ? _mm256_maskload_ps(t.bias, m0) : _mm256_setzero_ps();  // never past the last column
  const __m256 b1 = t.bias ? _mm256_maskload_ps(t.bias + 8, m1) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const __m256i z = _mm256_set1_epi32(t.rq[r].zero);
    const __m256 sa = _mm256_set1_ps(t.rq[r].scale);
    const __m256 d0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][0], _mm256_mullo_epi32(z, cs0)));
    const __m256 d1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][1], _mm256_mullo_epi32(z, cs1)));
    const __m256 y0 = _mm256_add_ps(_mm256_mul_ps(d0, _mm256_mul_ps(sa, sw0)), b0);
    const __m256 y1 = _mm256_add_ps(_mm256_mul_ps(d1, _mm256_mul_ps(sa, sw1)), b1);
    float* y = t.y + r * t.ldy;
    if (t.cols == kPanel) {  // masked stores are slow (microcoded on AMD): only for the last, partial panel
      _mm256_storeu_ps(y, y0);
      _mm256_storeu_ps(y + 8, y1);
    } else {
      _mm256_maskstore_ps(y, m0, y0);
      _mm256_maskstore_ps(y + 8, m1, y1);
    }
  }
}
#endif

void run_tile(const Tile& t, int rows) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) {
    switch (rows) {
      case 1: return tile_avx2<1>(t);
      case 2: return tile_avx2<2>(t);
      case 3: return tile_avx2<3>(t);
      default: return tile_avx2<4>(t);
    }
  }
#endif
  tile_scalar(t, rows);
}

}  // namespace

std::vector<std::int8_t> Int8Weight::unpack() const {
  std::vector<std::int8_t> out(static_cast<size_t>(n * k));
  const index_t groups = round_up(k, kGroup) / kGroup;
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < k; ++j) {
      const index_t p = i / kPanel, c = i % kPanel, g = j / kGroup, b = j % kGroup;
      out[i * k + j] = packed[((p * groups + g) * kPanel + c) * kGroup + b];
    }
  return out;
}

Int8Weight quantize_weight_int8(const float* w, index_t N, index_t K, index_t ldw) {
  CPUFORMER_CHECK(N > 0 && K > 0 && ldw >= K, "quantize_weight_int8: bad sizes N=", N, " K=", K, " ldw=", ldw);
  for (index_t i = 0; i < N; ++i)
    for (index_t j = 0; j < K; ++j)
      CPUFORMER_CHECK(std::isfinite(w[i * ldw + j]), "quantize_weight_int8: weight[", i, ", ", j, "] is not finite");
  Int8Weight q;
  q.n = N;
  q.k = K;
  const index_t np = round_up(N, kPanel), groups = round_up(K, kGroup) / kGroup;
  q.packed.assign(static_cast<size_t>(np * groups * kGroup), 0);
  q.scale.assign(static_cast<size_t>(np), 0.0f);
  q.col_sum.assign(static_cast<size_t>(np), 0);
  for (index_t i = 0; i < N; ++i) {
    const float* row = w + i * ldw;
    float amax = 0.0f;
    for (index_t j = 0; j < K; ++j) amax = std::max(amax, std::fabs(row[j]));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    q.scale[i] = scale;
    const index_t p = i / kPanel, c = i % kPanel;
    std::int32_t sum = 0;
    for (index_t j = 0; j < K; ++j) {
      // Division, not a reciprocal: this runs once per weight, and the nearest level should be exact.
      const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[j] / scale)));
      const auto qv = static_cast<std::int8_t>(v);
      q.packed[((p * groups + j / kGroup) * kPanel + c) * kGroup + j % kGroup] = qv;
      sum += qv;
    }
    q.col_sum[i] = sum;
  }
  return q;
}

void quantize_rows_u7(const float* x, index_t M, index_t K, index_t ldx, std::uint8_t* qa, index_t ldq,
                      float* scale, std::int32_t* zero_point) {
  CPUFORMER_CHECK(M >= 0 && K > 0 && ldx >= K && ldq >= K, "quantize_rows_u7: bad sizes");
  std::vector<RowQuant> rq(static_cast<size_t>(M));
  quantize_rows(x, M, K, ldx, qa, ldq, rq.data());
  for (index_t m = 0; m < M; ++m) {
    scale[m] = rq[m].scale;
    zero_point[m] = rq[m].zero;
  }
}

void linear_int8(const float* x, index_t M, index_t ldx, const Int8Weight& w, const float* bias, float* y,
                 index_t ldy) {
  CPUFORMER_CHECK(w.n > 0 && w.k > 0 && !w.packed.empty(), "linear_int8: empty quantized weight");
  CPUFORMER_CHECK(M >= 0 && ldx >= w.k && ldy >= w.n, "linear_int8: bad sizes M=", M, " ldx=", ldx, " ldy=", ldy);
  if (M == 0) return;
  const index_t N = w.n, ldq = round_up(w.k, kGroup), groups = ldq / kGroup;
  const index_t panels = round_up(N, kPanel) / kPanel;
  std::vector<std::uint8_t> qa(static_cast<size_t>(M * ldq));
  std::vector<RowQuant> rq(static_cast<size_t>(M));
  quantize_rows(x, M, w.k, ldx, qa.data(), ldq, rq.data());
  // Rows in chunks whose quantized activations stay in L2 while every panel of the chunk passes over them.
  const index_t mc = std::max<index_t>(kMaxRows, std::min(M, round_up(std::max<index_t>(1, 96 * 1024 / ldq), 4)));
  const index_t chunks = (M + mc - 1) / mc, tasks = chunks * panels;
  const index_t macs_per_task = mc * kPanel * ldq;
  parallel_for(tasks, std::max<index_t>(1, 262144 / std::max<index_t>(1, macs_per_task)),
               [&](index_t t0, index_t t1, int) {
                 for (index_t task = t0; task < t1; ++task) {
                   const index_t c = task / panels, p = task % panels;
                   const index_t m_end = std::min(M, (c + 1) * mc), n0 = p * kPanel;
                   Tile t;
                   t.ldq = ldq;
                   t.groups = groups;
                   t.panel = w.packed.data() + p * groups * kPanel * kGroup;
                   t.scale = w.scale.data() + n0;
                   t.col_sum = w.col_sum.data() + n0;
                   t.bias = bias ? bias + n0 : nullptr;
                   t.ldy = ldy;
                   t.cols = std::min(kPanel, N - n0);
                   for (index_t m = c * mc; m < m_end; m += kMaxRows) {
                     t.a = qa.data() + m * ldq;
                     t.rq = rq.data() + m;
                     t.y = y + m * ldy + n0;
                     run_tile(t, static_cast<int>(std::min<index_t>(kMaxRows, m_end - m)));
                   }
                 }
               });
}

}  // namespace cpuformer
