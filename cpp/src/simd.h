// simd.h (private): the only file that includes <immintrin.h>.
//
// AVX2/FMA code is compiled with a per-function target attribute (CPUFORMER_AVX2) rather than -mavx2 on whole
// files, so one build carries both paths and picks one at run time from CPUID: a machine without AVX2 never
// executes an AVX2 instruction. Helpers here are `static inline` so no AVX2 copy of a shared inline function can
// leak into the scalar path through the linker.
#pragma once

#include <cmath>
#include <cstdint>

namespace cpuformer::detail {
bool use_avx2();    // the SIMD path in use now (runtime.cpp): true on the "avx2" and "avx512" paths
bool use_avx512();  // the "avx512" or "amx" path: the GEMM's AVX-512 micro-kernel; every other kernel runs AVX2 code
bool use_amx();     // the "amx" path: float32 and bf16-weight products of 16+ rows on AMX tiles (amx.cpp)
bool use_f16c();    // use_avx2() and the CPU has F16C: the 16-bit weight kernels (half.cpp) run their AVX2 code

// Intel AMX (Linux, runtime.cpp): the CPU has the tile unit with its INT8 / BF16 products, the OS saves the tile
// state, and this process has the kernel's permission to use the tile data (asked once, on the first call).
bool amx_int8_usable();
bool amx_bf16_usable();
// The tile palette of both AMX products (int8 in quantize.cpp, bf16 in half.cpp) for a block of rows (1..32) x 32
// columns: C tiles 0-3 (row half h, 16-column panel p at 2h + p; 16 rows of 64 bytes), A tiles 4, 5 (the row
// halves, 64 bytes of k; with one row half, both tiles have its rows), B tiles 6, 7 (the panels: 16 rows of 64
// bytes). Loaded by every caller before its tiles:
// other libraries' AMX code may have run on the thread in between.
void amx_configure(int rows);
void amx_release();  // back to the initial state: the tile data need not be saved on context switches
}

#if !defined(CPUFORMER_FORCE_SCALAR) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define CPUFORMER_HAVE_AVX2 1
// GCC 12's AVX-512 headers initialise placeholders from themselves (__Y = __Y), which -Wuninitialized flags at every
// use (GCC PR105593): silenced for warnings located in those headers only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#define CPUFORMER_AVX2 __attribute__((target("avx2,fma")))
// The 16-bit weight kernels (half.cpp): AVX2 + FMA + F16C (vcvtph2ps), reached only when use_f16c().
#define CPUFORMER_F16C __attribute__((target("avx2,fma,f16c")))
// AVX-512 code (the GEMM micro-kernels; exp, erf and the element-wise activations over 16 lanes with the AVX2
// code's operations lane for lane, so with its bits) likewise:
// per function, reached only when use_avx512(). Left out of
// sanitizer builds (CPUFORMER_NO_AVX512, set by CMake): under GCC 12's -fsanitize=address the packed-A AVX-512
// kernel computes wrong products (no report), while release builds match the float64 reference and the AVX2 path
// bit for bit; until that is understood the sanitizer builds check the AVX2 and scalar paths.
// AMX instructions as inline assembly with their memory effects declared ("memory"): GCC 12's intrinsics declare
// neither the 64 bytes ldtilecfg reads nor tileloadd's reads, so the stores that prepare them could be dropped.
#if defined(__linux__) && defined(__x86_64__)
#define CPUFORMER_HAVE_AMX 1
#define CPUFORMER_TILE_LOADD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define CPUFORMER_TILE_STORED(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define CPUFORMER_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define CPUFORMER_TILE_DPBUSD(c, a, b) __asm__ volatile("tdpbusd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define CPUFORMER_TILE_DPBF16PS(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#endif
#if !defined(CPUFORMER_NO_AVX512)
#define CPUFORMER_HAVE_AVX512 1
#define CPUFORMER_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace cpuformer::simd {

constexpr int kWidth = 8;  // floats per __m256

// Mask for loading/storing the first n (0..8) lanes.
CPUFORMER_AVX2 static inline __m256i tail_mask(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

CPUFORMER_AVX2 static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

CPUFORMER_AVX2 static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x), under 1 ulp in the normal range (Cephes expf scheme: x = n ln2 + r, |r| <= ln2 / 2, 2^n from exponent bits, degree-5
// polynomial). n is rounded by adding 1.5 * 2^23 + 127, which leaves n + 127 in the low mantissa bits, so one
// shift makes 2^n (no floor, no float-to-int conversion): 15 instructions, the softmax's inner loop.
// Below about -87.7 the result is exactly 0 (n + 127 = 0 makes 2^n = 0; -inf included); above 88.37 it saturates
// at exp(88.37) (every caller passes x <= 0 or a clamped x); NaN propagates.
CPUFORMER_AVX2 static inline __m256 exp_ps(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);  // operand order keeps a NaN x
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);             // rounds to n = -127
  const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(shifted, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 one = _mm256_set1_ps(1.0f);
  y = _mm256_fmadd_ps(_mm256_fmadd_ps(y, r, one), r, one);  // 1 + r (1 + r P(r)) = 1 + r + r^2 P(r)
  const __m256 pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23));
  return _mm256_mul_ps(y, pow2n);
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7; PyTorch's vectorised erf uses the same).
CPUFORMER_AVX2 static inline __m256 erf_ps(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
  const __m256 r = _mm256_fnmadd_ps(p, e, one);
  return _mm256_or_ps(r, sign);
}

#ifdef CPUFORMER_HAVE_AVX512
// exp_ps over 16 lanes: the same operations on each lane, so the same bits (callers keep the 8-lane order of any
// sums, so results do not depend on the path).
CPUFORMER_AVX512 static inline __m512 exp512_ps(__m512 x) {
  const __m512 magic = _mm512_set1_ps(12583039.0f);
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-88.0f), x);
  const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(shifted, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 one = _mm512_set1_ps(1.0f);
  y = _mm512_fmadd_ps(_mm512_fmadd_ps(y, r, one), r, one);
  const __m512 pow2n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(shifted), 23));
  return _mm512_mul_ps(y, pow2n);
}

// erf_ps over 16 lanes, the same operations on each lane.
CPUFORMER_AVX512 static inline __m512 erf512_ps(__m512 x) {
  const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.0f));
  const __m512 ax = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), x);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax, one));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax)));
  const __m512 r = _mm512_fnmadd_ps(p, e, one);
  return _mm512_or_ps(r, sign);
}
#endif

}  // namespace cpuformer::simd
#endif
