// half.cpp: bfloat16 / float16 conversions and products with 16-bit weights converted on the fly.
//
// Paths: AVX2 + F16C (use_f16c(); the "avx512" and "amx" paths add an AVX-512 few-rows dot and AMX tiles) and scalar.
// Conversions give the same bits on every path; products differ only in float32 summation order.
#include "cpuformer/half.h"

#include <algorithm>
#include <cstring>

#include "cpuformer/matmul.h"
#include "amx_internal.h"
#include "gemm_internal.h"
#include "half_internal.h"
#include "parallel.h"
#include "simd.h"

namespace cpuformer {
namespace {

inline float bits_to_float(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint32_t float_to_bits(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) return bits_to_float(sign | float_to_bits(static_cast<float>(mant) * 0x1p-24f));  // 0, subnormal: exact
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0u));  // inf, quiet NaN
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t x = float_to_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x0040u);  // NaN: stays one
  x += 0x7FFFu + ((x >> 16) & 1u);  // ties to even; a carry into the exponent is the correct rounding (to inf too)
  return static_cast<std::uint16_t>(x >> 16);
}

inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t x = float_to_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  std::uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00u | static_cast<std::uint16_t>((ax >> 13) & 0x3FFu);  // quiet NaN
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 (halfway above the largest f16, 65504): inf
  if (ax < 0x38800000u) {
    // Below 2^-14 (f16 subnormals): adding 0.5 leaves |f| rounded to a multiple of 2^-24 (the float ulp in [0.5, 1))
    // by the FPU's own ties-to-even; the mantissa bits then hold the f16 mantissa (1024: the smallest normal).
    const float sum = bits_to_float(ax) + 0.5f;
    return sign | static_cast<std::uint16_t>(float_to_bits(sum) - float_to_bits(0.5f));
  }
  ax += ((15u - 127u) << 23) + 0xFFFu + ((ax >> 13) & 1u);  // rebias, round to nearest even at bit 13
  return sign | static_cast<std::uint16_t>(ax >> 13);
}

template <HalfType T>
inline float to_float(std::uint16_t h) {
  return T == HalfType::kBF16 ? bf16_to_float(h) : f16_to_float(h);
}

void convert_scalar(float* dst, const std::uint16_t* src, index_t n, HalfType t) {
  if (t == HalfType::kBF16)
    for (index_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  else
    for (index_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
}

#ifdef CPUFORMER_HAVE_AVX2
// Eight 16-bit values (unaligned load) as floats: bf16 by widening to 32 bits and shifting into the top half, f16 by
// F16C's exact conversion.
template <HalfType T>
CPUFORMER_F16C inline __m256 load8(const std::uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (T == HalfType::kBF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else
    return _mm256_cvtph_ps(h);
}

template <HalfType T>
CPUFORMER_F16C void convert_avx2(float* dst, const std::uint16_t* src, index_t n) {
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = load8<T>(src + i), b = load8<T>(src + i + 8);
    _mm256_storeu_ps(dst + i, a);
    _mm256_storeu_ps(dst + i + 8, b);
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<T>(src + i));
  for (; i < n; ++i) dst[i] = to_float<T>(src[i]);
}
#endif

// Serial conversion of one run of values (kernels call it inside their own parallel loops).
void convert(float* dst, const std::uint16_t* src, index_t n, HalfType t) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_f16c()) {
    if (t == HalfType::kBF16) convert_avx2<HalfType::kBF16>(dst, src, n);
    else convert_avx2<HalfType::kF16>(dst, src, n);
    return;
  }
#endif
  convert_scalar(dst, src, n, t);
}

// ---------------------------------------------------------------------------------------------------------------
// Few rows (decoding): bound by reading H, so each thread streams its own share of H exactly once, converting in
// registers. Two forms, by how H lies against the output:
//   dot  (trans_h, H is N x K): C[r, j] = A[r, :] . H[j, :]   threads split the rows j of H
//   axpy (H is K x N):          C[r, :] = sum_k A[r, k] H[k, :] threads split the columns of H

struct HalfGemm {
  bool trans_h;
  index_t rows, N, K;
  const float* A;
  index_t lda;
  const std::uint16_t* H;
  index_t ldh;
  HalfType t;
  bool accumulate;
  float* C;
  index_t ldc;
  const float* bias;
  bool bf16_activations;  // A already rounded to bf16 (gemm_half did it): AMX's one-term product

  void store(index_t r, index_t j, float acc) const {
    float* c = C + r * ldc + j;
    float v = accumulate ? acc + *c : acc;
    if (bias) v += bias[j];
    *c = v;
  }
};

constexpr index_t kSmallRows = 4;
// Axpy form: accumulator floats per column block (16 KB, in L1): 4096 columns for one row, 1024 for four. Wide
// blocks keep H's runs long (8 KB for one row), which the hardware prefetchers stream well.
constexpr index_t kAxpyFloats = 4096;

template <HalfType T>
void dot_scalar(const HalfGemm& g, index_t j0, index_t j1) {
  for (index_t j = j0; j < j1; ++j) {
    const std::uint16_t* h = g.H + j * g.ldh;
    float acc[kSmallRows] = {};
    for (index_t k = 0; k < g.K; ++k) {
      const float w = to_float<T>(h[k]);
      for (index_t r = 0; r < g.rows; ++r) acc[r] += g.A[r * g.lda + k] * w;
    }
    for (index_t r = 0; r < g.rows; ++r) g.store(r, j, acc[r]);
  }
}

template <HalfType T>
void axpy_scalar(const HalfGemm& g, index_t n0, index_t n1) {
  constexpr index_t kCols = kAxpyFloats / kSmallRows;
  float acc[kSmallRows][kCols];
  for (index_t c0 = n0; c0 < n1; c0 += kCols) {
    const index_t nc = std::min(kCols, n1 - c0);
    for (index_t r = 0; r < g.rows; ++r) std::fill(acc[r], acc[r] + nc, 0.0f);
    for (index_t k = 0; k < g.K; ++k) {
      const std::uint16_t* h = g.H + k * g.ldh + c0;
      for (index_t c = 0; c < nc; ++c) {
        const float w = to_float<T>(h[c]);
        for (index_t r = 0; r < g.rows; ++r) acc[r][c] += g.A[r * g.lda + k] * w;
      }
    }
    for (index_t r = 0; r < g.rows; ++r)
      for (index_t c = 0; c < nc; ++c) g.store(r, c0 + c, acc[r][c]);
  }
}

#ifdef CPUFORMER_HAVE_AVX2
// NJ rows of H (j .. j + NJ - 1) against the R rows of A: R x NJ vector accumulators (at most 11 registers).
template <HalfType T, int R, int NJ>
CPUFORMER_F16C void dot_block_avx2(const HalfGemm& g, index_t j) {
  const index_t K = g.K;
  const std::uint16_t* h[NJ];
  for (int u = 0; u < NJ; ++u) h[u] = g.H + (j + u) * g.ldh;
  __m256 acc[R][NJ];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NJ; ++u) acc[r][u] = _mm256_setzero_ps();
  index_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_loadu_ps(g.A + r * g.lda + k);
    for (int u = 0; u < NJ; ++u) {
      const __m256 w = load8<T>(h[u] + k);
      for (int r = 0; r < R; ++r) acc[r][u] = _mm256_fmadd_ps(a[r], w, acc[r][u]);
    }
  }
  for (int u = 0; u < NJ; ++u) {
    float tail[R] = {};
    for (index_t kk = k; kk < K; ++kk) {
      const float w = to_float<T>(h[u][kk]);
      for (int r = 0; r < R; ++r) tail[r] += g.A[r * g.lda + kk] * w;
    }
    for (int r = 0; r < R; ++r) g.store(r, j + u, simd::hsum(acc[r][u]) + tail[r]);
  }
}

template <HalfType T, int R>
CPUFORMER_F16C void dot_avx2(const HalfGemm& g, index_t j0, index_t j1) {
  constexpr int NJ = R <= 2 ? 4 : 2;
  index_t j = j0;
  for (; j + NJ <= j1; j += NJ) dot_block_avx2<T, R, NJ>(g, j);
  for (; j < j1; ++j) dot_block_avx2<T, R, 1>(g, j);
}

// Columns [n0, n1) in blocks of kAxpyFloats / R: the block's R accumulator rows stay in L1 while four rows of H at a time
// stream past (four sequential streams; each accumulator load/store serves four multiply-adds).
template <HalfType T, int R>
CPUFORMER_F16C void axpy_avx2(const HalfGemm& g, index_t n0, index_t n1) {
  constexpr index_t kCols = kAxpyFloats / R / 64 * 64;  // a multiple of 8: every acc[r] stays 32-byte aligned
  alignas(32) float acc[R][kCols];
  for (index_t c0 = n0; c0 < n1; c0 += kCols) {
    const index_t nc = std::min(kCols, n1 - c0), nv = nc / 8 * 8;
    for (int r = 0; r < R; ++r) std::fill(acc[r], acc[r] + nc, 0.0f);
    index_t k = 0;
    for (; k + 4 <= g.K; k += 4) {
      const std::uint16_t* h0 = g.H + k * g.ldh + c0;
      const std::uint16_t* h1 = h0 + g.ldh;
      const std::uint16_t* h2 = h1 + g.ldh;
      const std::uint16_t* h3 = h2 + g.ldh;
      __m256 x[R][4];
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < 4; ++u) x[r][u] = _mm256_set1_ps(g.A[r * g.lda + k + u]);
      for (index_t c = 0; c < nv; c += 8) {
        const __m256 w0 = load8<T>(h0 + c), w1 = load8<T>(h1 + c), w2 = load8<T>(h2 + c), w3 = load8<T>(h3 + c);
        for (int r = 0; r < R; ++r) {
          __m256 s = _mm256_load_ps(acc[r] + c);
          s = _mm256_fmadd_ps(x[r][0], w0, s);
          s = _mm256_fmadd_ps(x[r][1], w1, s);
          s = _mm256_fmadd_ps(x[r][2], w2, s);
          s = _mm256_fmadd_ps(x[r][3], w3, s);
          _mm256_store_ps(acc[r] + c, s);
        }
      }
      for (index_t c = nv; c < nc; ++c)
        for (int u = 0; u < 4; ++u) {
          const float w = to_float<T>(g.H[(k + u) * g.ldh + c0 + c]);
          for (int r = 0; r < R; ++r) acc[r][c] += g.A[r * g.lda + k + u] * w;
        }
    }
    for (; k < g.K; ++k) {
      const std::uint16_t* h = g.H + k * g.ldh + c0;
      for (int r = 0; r < R; ++r) {
        const __m256 x = _mm256_set1_ps(g.A[r * g.lda + k]);
        for (index_t c = 0; c < nv; c += 8)
          _mm256_store_ps(acc[r] + c, _mm256_fmadd_ps(x, load8<T>(h + c), _mm256_load_ps(acc[r] + c)));
        for (index_t c = nv; c < nc; ++c) acc[r][c] += g.A[r * g.lda + k] * to_float<T>(h[c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (index_t c = 0; c < nc; ++c) g.store(r, c0 + c, acc[r][c]);
  }
}

#ifdef CPUFORMER_HAVE_AVX512
// Sixteen 16-bit values (the lanes of mask; zeros elsewhere) as floats, as load8.
template <HalfType T>
CPUFORMER_AVX512 inline __m512 load16(const std::uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if constexpr (T == HalfType::kBF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else
    return _mm512_cvtph_ps(h);
}

// dot_block_avx2 sixteen k at a time (the tail masked), each row's line 1 KB ahead fetched as it goes: the AVX2 loop
// read one row of a 151936 x 896 bf16 head at 10 GB/s on one thread (float32 weights stream at 16), this one at
// 14-15 (28-29 GB/s on two threads, 21 before; 3 runs).
template <HalfType T, int R, int NJ>
CPUFORMER_AVX512 void dot_block_avx512(const HalfGemm& g, index_t j) {
  constexpr index_t kAhead = 512;  // values
  const index_t K = g.K;
  const std::uint16_t* h[NJ];
  for (int u = 0; u < NJ; ++u) h[u] = g.H + (j + u) * g.ldh;
  __m512 acc[R][NJ];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NJ; ++u) acc[r][u] = _mm512_setzero_ps();
  for (index_t k = 0; k < K; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(K - k >= 16 ? 0xFFFFu : (1u << (K - k)) - 1u);
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_maskz_loadu_ps(m, g.A + r * g.lda + k);
    for (int u = 0; u < NJ; ++u) {
      _mm_prefetch(reinterpret_cast<const char*>(h[u] + k + kAhead), _MM_HINT_T0);
      const __m512 w = load16<T>(h[u] + k, m);
      for (int r = 0; r < R; ++r) acc[r][u] = _mm512_fmadd_ps(a[r], w, acc[r][u]);
    }
  }
  for (int u = 0; u < NJ; ++u)
    for (int r = 0; r < R; ++r) g.store(r, j + u, _mm512_reduce_add_ps(acc[r][u]));
}

template <HalfType T, int R>
CPUFORMER_AVX512 void dot_avx512(const HalfGemm& g, index_t j0, index_t j1) {
  constexpr int NJ = R <= 2 ? 4 : 2;
  index_t j = j0;
  for (; j + NJ <= j1; j += NJ) dot_block_avx512<T, R, NJ>(g, j);
  for (; j < j1; ++j) dot_block_avx512<T, R, 1>(g, j);
}
#endif

template <HalfType T, int R>
void small_rows_avx2(const HalfGemm& g, index_t n0, index_t n1) {
#ifdef CPUFORMER_HAVE_AVX512
  if (g.trans_h && detail::use_avx512()) return dot_avx512<T, R>(g, n0, n1);
#endif
  if (g.trans_h) dot_avx2<T, R>(g, n0, n1);
  else axpy_avx2<T, R>(g, n0, n1);
}

template <HalfType T>
void small_rows_avx2(const HalfGemm& g, index_t n0, index_t n1) {
  switch (g.rows) {
    case 1: return small_rows_avx2<T, 1>(g, n0, n1);
    case 2: return small_rows_avx2<T, 2>(g, n0, n1);
    case 3: return small_rows_avx2<T, 3>(g, n0, n1);
    default: return small_rows_avx2<T, 4>(g, n0, n1);
  }
}
#endif

// Outputs [n0, n1) of every row.
template <HalfType T>
void small_rows_range(const HalfGemm& g, index_t n0, index_t n1) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_f16c()) return small_rows_avx2<T>(g, n0, n1);
#endif
  if (g.trans_h) dot_scalar<T>(g, n0, n1);
  else axpy_scalar<T>(g, n0, n1);
}

void small_rows(const HalfGemm& g) {
  // Split the outputs so each thread streams its own part of H; at least 64K weights per thread (as the float GEMM's
  // few-row path), and the axpy form's columns in multiples of 64 (whole 128-byte runs of each row of H).
  const index_t unit = g.trans_h ? 1 : 64;
  const index_t units = (g.N + unit - 1) / unit;
  const index_t min_units = std::max<index_t>(1, (index_t(1) << 16) / (unit * g.K));
  detail::parallel_for(units, min_units, [&](index_t u0, index_t u1, int) {
    const index_t n0 = u0 * unit, n1 = std::min(g.N, u1 * unit);
    if (g.t == HalfType::kBF16) small_rows_range<HalfType::kBF16>(g, n0, n1);
    else small_rows_range<HalfType::kF16>(g, n0, n1);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// More rows: the GEMM is compute-bound, so blocks of op(H) are converted to float32 and multiplied by the GEMM.
// Each thread takes a share of the output columns (whole 64-column groups) and, when there are too few columns for
// every thread, of the rows; it converts only its own columns of H, block by block, into its own buffer and
// multiplies them on its own (sgemm_single_thread): one parallel region and no barriers per call, and no shared
// mutable state (one model may run on many threads at once). A block is kKBlock x up to kBlockFloats / kKBlock
// floats (1 MB): it stays in the thread's L2 between its conversion and the GEMM's packing, and converting costs one
// pass per weight against the rows' multiply-adds. kKBlock is a multiple of the GEMM's K blocks (256, 512), so K is
// cut where sgemm itself cuts it.

constexpr index_t kKBlock = 512;
constexpr index_t kBlockFloats = index_t(1) << 18;
constexpr index_t kMinMacsPerThread = 64 * 64 * 64 + 1;  // as the GEMM: below this a thread costs more than it saves

thread_local detail::AlignedBuffer t_half_block;

// Rows [r0, r1) x columns [n0, n1) of C.
void blocked_share(const HalfGemm& g, index_t r0, index_t r1, index_t n0, index_t n1) {
  const index_t kb = std::min(g.K, kKBlock);
  const index_t nb = std::min(n1 - n0, std::max<index_t>(64, kBlockFloats / kb / 64 * 64));
  float* buf = t_half_block.get(kb * nb);
  for (index_t k0 = 0; k0 < g.K; k0 += kb) {
    const index_t kc = std::min(kb, g.K - k0);
    const bool first = k0 == 0, last = k0 + kc == g.K;
    for (index_t j0 = n0; j0 < n1; j0 += nb) {
      const index_t nc = std::min(nb, n1 - j0);
      // op(H)'s block: trans_h: H[j0:j0+nc, k0:k0+kc] as nc runs of kc; else H[k0:k0+kc, j0:j0+nc], kc runs of nc.
      const index_t runs = g.trans_h ? nc : kc, len = g.trans_h ? kc : nc;
      const std::uint16_t* src = g.H + (g.trans_h ? j0 * g.ldh + k0 : k0 * g.ldh + j0);
      for (index_t i = 0; i < runs; ++i) convert(buf + i * len, src + i * g.ldh, len, g.t);
      detail::sgemm_single_thread(false, g.trans_h, r1 - r0, nc, kc, 1.0f, g.A + r0 * g.lda + k0, g.lda, buf, len,
                                  first && !g.accumulate ? 0.0f : 1.0f, g.C + r0 * g.ldc + j0, g.ldc,
                                  last && g.bias ? g.bias + j0 : nullptr);
    }
  }
}


void blocked(const HalfGemm& g) {
  const index_t useful = std::max<index_t>(1, g.rows * g.N * g.K / kMinMacsPerThread);
  const index_t nt = std::min<index_t>(detail::kernel_threads(), useful);
  const index_t groups = (g.N + 63) / 64;
  const index_t col_shares = std::min(nt, groups);
  const index_t row_shares = std::max<index_t>(1, std::min(nt / col_shares, g.rows / 48));  // >= 48 rows each
  // bf16 on the "amx" path: AMX tiles (amx.cpp), the activations split exactly into bf16 terms
  const bool amx = g.t == HalfType::kBF16 && detail::amx_bf16_applies(g.rows, g.N, g.K);
  detail::AmxGemm ag{false, g.trans_h, g.rows, g.N, g.K, 1.0f, g.A, g.lda, nullptr, g.H, g.ldh,
                     g.accumulate ? 1.0f : 0.0f, g.C, g.ldc, g.bias};
  ag.prerounded = g.bf16_activations;
  if (amx && g.trans_h && !g.bf16_activations && g.K % 32 == 0 && detail::amx_swapped_bf16_applies(g.rows, g.N, g.K)) {
    // Swapped, as the float32 product (matmul.cpp): C^T = H x^T, H's rows read by the tiles in place (no
    // transpose of the weights), x^T split and packed once per thread.
    detail::AmxGemm sw{false, true, g.N, g.rows, g.K, 1.0f, nullptr, 0, g.A, nullptr, g.lda,
                       g.accumulate ? 1.0f : 0.0f, g.C, g.ldc, g.bias};
    sw.HA = g.H;
    sw.ldha = g.ldh;
    sw.c_transposed = true;
    return detail::amx_gemm(sw, static_cast<int>(nt));
  }
  detail::parallel_for(col_shares * row_shares, 1, [&](index_t s0, index_t s1, int) {
    for (index_t s = s0; s < s1; ++s) {
      const index_t c = s % col_shares, r = s / col_shares;
      const index_t r0 = g.rows * r / row_shares, r1 = g.rows * (r + 1) / row_shares;
      const index_t n0 = std::min(g.N, groups * c / col_shares * 64), n1 = std::min(g.N, groups * (c + 1) / col_shares * 64);
      if (amx) {
        detail::amx_gemm_share(ag, r0, r1, n0, n1);
        continue;
      }
      blocked_share(g, r0, r1, n0, n1);
    }
  });
}

// dst[r, :] = src[r, :] rounded to bf16 (nearest even; NaN stays NaN, a carry past the largest finite is inf),
// kept as float32 values.
#ifdef CPUFORMER_HAVE_AVX512
CPUFORMER_AVX512 static void round_bf16_avx512(float* dst, const float* src, index_t n) {
  const __m512i one = _mm512_set1_epi32(1), half_ulp = _mm512_set1_epi32(0x7FFF);
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i inf = _mm512_set1_epi32(0x7F800000), quiet = _mm512_set1_epi32(0x00400000);
  for (index_t i = 0; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
    const __m512i x = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, src + i));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, half_ulp), _mm512_and_si512(_mm512_srli_epi32(x, 16), one));
    r = _mm512_and_si512(r, top);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs_bits), inf);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_and_si512(_mm512_or_si512(x, quiet), top));
    _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(r));
  }
}
#endif

thread_local detail::AlignedBuffer t_rounded;

void round_rows_to_bf16(float* dst, const float* src, index_t lds, index_t rows, index_t K) {
  detail::parallel_for(rows, std::max<index_t>(1, (index_t(1) << 16) / K), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
#ifdef CPUFORMER_HAVE_AVX512
      if (detail::use_avx512()) {
        round_bf16_avx512(dst + r * K, src + r * lds, K);
        continue;
      }
#endif
      for (index_t k = 0; k < K; ++k) dst[r * K + k] = bf16_to_float(float_to_bf16(src[r * lds + k]));
    }
  });
}

}  // namespace

void detail::half_to_float_serial(float* dst, const std::uint16_t* src, index_t n, HalfType t) {
  convert(dst, src, n, t);
}

float half_to_float(std::uint16_t bits, HalfType t) {
  return t == HalfType::kBF16 ? bf16_to_float(bits) : f16_to_float(bits);
}

void half_to_float_n(float* dst, const std::uint16_t* src, index_t n, HalfType t) {
  CPUFORMER_CHECK(n >= 0, "half_to_float_n: n must be >= 0, got ", n);
  detail::parallel_for(n, index_t(1) << 16, [&](index_t i0, index_t i1, int) { convert(dst + i0, src + i0, i1 - i0, t); });
}

std::uint16_t float_to_half(float x, HalfType t) { return t == HalfType::kBF16 ? float_to_bf16(x) : float_to_f16(x); }

void float_to_half_n(std::uint16_t* dst, const float* src, index_t n, HalfType t) {
  CPUFORMER_CHECK(n >= 0, "float_to_half_n: n must be >= 0, got ", n);
  if (t == HalfType::kBF16)
    for (index_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  else
    for (index_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
}

void gemm_half(bool trans_h, index_t rows, index_t N, index_t K, const float* A, index_t lda, const std::uint16_t* H,
               index_t ldh, HalfType t, bool accumulate, float* C, index_t ldc, const float* bias,
               bool bf16_activations) {
  CPUFORMER_CHECK(rows >= 0 && N >= 1 && K >= 1, "gemm_half: bad sizes rows=", rows, " N=", N, " K=", K);
  CPUFORMER_CHECK(lda >= K && ldc >= N && ldh >= (trans_h ? K : N), "gemm_half: bad strides lda=", lda, " ldc=", ldc,
                  " ldh=", ldh, " for N=", N, " K=", K);
  CPUFORMER_CHECK(t == HalfType::kBF16 || t == HalfType::kF16, "gemm_half: unknown HalfType ", int(t));
  if (rows == 0) return;
  CPUFORMER_CHECK(A && H && C, "gemm_half: null A, H or C");
  if (bf16_activations) {  // every path then multiplies the rounded values (AMX: as one bf16 term)
    float* rounded = t_rounded.get(rows * K);  // the calling thread's: no page faults per call
    round_rows_to_bf16(rounded, A, lda, rows, K);
    A = rounded, lda = K;
  }
  const HalfGemm g{trans_h, rows, N, K, A, lda, H, ldh, t, accumulate, C, ldc, bias, bf16_activations};
  if (rows <= kSmallRows) small_rows(g);
  else blocked(g);
}

}  // namespace cpuformer
