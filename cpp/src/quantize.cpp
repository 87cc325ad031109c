// quantize.cpp: int8 weight quantization and the dynamically quantized Linear product (see quantize.h).
//
// Packed weight layout: panels of 16 output columns; inside a panel, groups of 4 consecutive k, and in a group the
// 4 bytes of column 0, then column 1, ... (64 bytes). One broadcast 32-bit load of 4 activation bytes then meets
// 16 columns in two vpmaddubsw + two vpmaddwd: 4 products per int32 lane, accumulated exactly. The same 64 bytes are
// exactly one zmm operand of AVX-512 VNNI's vpdpbusd (16 int32 lanes x 4 u8*s8 products, no saturation), and two ymm
// operands of AVX-VNNI's 256-bit form, so the VNNI kernels read the same panels.
//
// Kernels (int8_kernel_name): "amx", "avx512vnni", "avxvnni", "avx2", "scalar". Every one sums the same integers exactly in
// int32 and dequantizes with the same float operations in the same order (no FMA: -ffp-contract=off), so all give
// bitwise identical outputs; they differ only in speed. The VNNI kernels are compiled with per-function target
// attributes like the AVX2 ones and chosen at run time from CPUID (and XCR0 for the zmm state), and only while the
// SIMD path is AVX2 (set_simd_path("scalar") selects the scalar kernel).
//
// AMX (Sapphire Rapids and later): the panel layout is also AMX's: 16 consecutive 4-k groups of a panel (1 KiB) are
// one B tile for tdpbusd (16 rows of 16 columns x 4 bytes). Each call multiplies 32 rows by 32 columns in four
// int32 tiles, 64 k per step, then dequantizes like the AVX-512 kernel. Fewer than 16 rows (decoding) go to the
// AVX-512 VNNI kernel, which streams the weights as fast. Linux only: the tile data state needs arch_prctl's
// permission, asked once.
#include "cpuformer/quantize.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>

#include "parallel.h"
#include "simd.h"

// VNNI needs GCC >= 11 or clang >= 12 for the avxvnni target; both carry avx512vnni too.
#if defined(CPUFORMER_HAVE_AVX2) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define CPUFORMER_HAVE_VNNI 1
#include <cpuid.h>
#define CPUFORMER_AVX512VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define CPUFORMER_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#if defined(CPUFORMER_HAVE_AMX)
#define CPUFORMER_AMX_INT8 1
#endif
#endif

namespace cpuformer {
using detail::parallel_for;

namespace {

constexpr index_t kPanel = 16;  // output columns per packed panel
constexpr index_t kGroup = 4;   // k values per 32-bit group
constexpr int kMaxRows = 4;     // activation rows per micro-kernel call (scalar, AVX2, AVX-VNNI)
constexpr int kMaxRowsZmm = 8;  // rows per AVX-512 VNNI call, which also takes two panels: 16 zmm accumulators

// ---- kernel choice --------------------------------------------------------------------------------------------

enum class Kernel : int { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };
constexpr int kNumKernels = 5;
constexpr const char* kKernelNames[] = {"scalar", "avx2", "avxvnni", "avx512vnni", "amx"};
constexpr int kAmxRows = 32;         // rows per AMX call: two 16-row A tiles
constexpr index_t kAmxMinRows = 16;  // fewer rows go to the AVX-512 VNNI kernel
constexpr index_t kAmxGroups = 16;   // 4-k groups per tile step (64 bytes of each activation row)
constexpr int kAuto = -1, kInvalid = -2;

int parse_kernel(const std::string& name) {
  if (name == "auto" || name.empty()) return kAuto;
  if (name == "vnni") return static_cast<int>(Kernel::kAvx512Vnni);
  for (int i = 0; i < kNumKernels; ++i)
    if (name == kKernelNames[i]) return i;
  return kInvalid;
}

#ifdef CPUFORMER_HAVE_VNNI
// XCR0: which register state the OS saves on a context switch (0 without OSXSAVE).
std::uint64_t read_xcr0() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (std::uint64_t(hi) << 32) | lo;
}

// CPUID.(EAX=7, ECX=1):EAX bit 4 (clang's __builtin_cpu_supports does not know "avxvnni").
bool cpuid_avxvnni() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
}
#endif


bool cpu_has(Kernel k) {
  switch (k) {
    case Kernel::kScalar: return true;
#ifdef CPUFORMER_HAVE_AVX2
    case Kernel::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#ifdef CPUFORMER_HAVE_VNNI
    case Kernel::kAvxVnni:  // VEX-encoded: needs the ymm state (XCR0 bits 1, 2)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpuid_avxvnni() &&
             (read_xcr0() & 0x6) == 0x6;
    case Kernel::kAvx512Vnni:  // plus opmask, upper zmm0-15 and zmm16-31 (XCR0 bits 5, 6, 7)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             (read_xcr0() & 0xe6) == 0xe6;
#endif
#ifdef CPUFORMER_AMX_INT8
    case Kernel::kAmx:  // dequantizes and takes the small products with AVX-512 VNNI
      return cpu_has(Kernel::kAvx512Vnni) && detail::amx_int8_usable();
#endif
    default: return false;
  }
}

Kernel best_kernel() {
  static const Kernel best = cpu_has(Kernel::kAmx)         ? Kernel::kAmx
                             : cpu_has(Kernel::kAvx512Vnni) ? Kernel::kAvx512Vnni
                             : cpu_has(Kernel::kAvxVnni)  ? Kernel::kAvxVnni
                             : cpu_has(Kernel::kAvx2)     ? Kernel::kAvx2
                                                          : Kernel::kScalar;
  return best;
}

// kAuto, or the kernel CPUFORMER_INT8 / set_int8_kernel forces (an unknown or unavailable name in the environment
// means auto: a bad variable must not break import).
int initial_choice() {
  const char* env = std::getenv("CPUFORMER_INT8");
  const int c = env ? parse_kernel(env) : kAuto;
  return c >= 0 && cpu_has(static_cast<Kernel>(c)) ? c : kAuto;
}

std::atomic<int> g_choice{initial_choice()};

// The kernel linear_int8 uses now: scalar whenever the SIMD path is (CPUFORMER_SIMD=scalar, set_simd_path).
Kernel active_kernel() {
  if (!detail::use_avx2()) return Kernel::kScalar;
  const int c = g_choice.load(std::memory_order_relaxed);
  return c >= 0 ? static_cast<Kernel>(c) : best_kernel();
}

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

#ifdef CPUFORMER_HAVE_VNNI
// The AVX2 row quantization on zmm: the same min/max, the same products and conversion (round to nearest even),
// the same clamp to [0, 127], so the same bytes.
CPUFORMER_AVX512VNNI void quantize_row_avx512(const float* x, index_t K, std::uint8_t* q, RowQuant* out) {
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps(), vpoison = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  index_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
    vpoison = _mm512_add_ps(vpoison, _mm512_mul_ps(v, zero));
  }
  if (k < K) {  // zeros in the masked-off lanes change neither the range (it holds 0) nor the poison
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + k);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
    vpoison = _mm512_add_ps(vpoison, _mm512_mul_ps(v, zero));
  }
  const RowQuant p =
      row_params(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi), _mm512_reduce_add_ps(vpoison) == 0.0f);
  const __m512 inv = _mm512_set1_ps(p.inv);
  const __m512i zp = _mm512_set1_epi32(p.zero), lo = _mm512_setzero_si512(), hi = _mm512_set1_epi32(127);
  k = 0;
  // 64 at a time as the AVX2 code does it: saturating packs (to int16, then to u8 clamping at 0), one permute back
  // into order and a minimum with 127; vpmovdb costs two shuffles per 16.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i top = _mm512_set1_epi8(127);
  for (; k + 64 <= K; k += 64) {
    const __m512i i0 = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv)), zp);
    const __m512i i1 = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 16), inv)), zp);
    const __m512i i2 = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 32), inv)), zp);
    const __m512i i3 = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 48), inv)), zp);
    const __m512i b = _mm512_packus_epi16(_mm512_packs_epi32(i0, i1), _mm512_packs_epi32(i2, i3));
    _mm512_storeu_si512(q + k, _mm512_min_epu8(_mm512_permutexvar_epi32(order, b), top));
  }
  for (; k + 16 <= K; k += 16) {
    __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv)), zp);
    i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(i));
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + k), inv)), zp);
    i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, tail, i);
  }
  *out = p;
}
#endif

void quantize_rows(const float* x, index_t M, index_t K, index_t ldx, std::uint8_t* qa, index_t ldq, RowQuant* rq) {
  const Kernel kern = active_kernel();
  (void)kern;  // only SIMD builds choose
  parallel_for(M, std::max<index_t>(1, 16384 / std::max<index_t>(K, 1)), [&](index_t m0, index_t m1, int) {
    for (index_t m = m0; m < m1; ++m) {
      std::uint8_t* q = qa + m * ldq;
#ifdef CPUFORMER_HAVE_VNNI
      if (kern == Kernel::kAvx512Vnni || kern == Kernel::kAmx) {
        quantize_row_avx512(x + m * ldx, K, q, rq + m);
      } else
#endif
#ifdef CPUFORMER_HAVE_AVX2
      if (kern != Kernel::kScalar) {
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
  const float* scale;          // 16 weight scales per panel (padded to whole panels)
  const std::int32_t* col_sum;  // 16 column sums per panel
  const float* bias;           // the panel's biases (cols of them) or null
  float* y;                    // output tile, rows ldy apart
  index_t ldy, cols;           // cols stored: <= 16, or <= 32 (two panels) for the AVX-512 kernel
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
// Dequantizes and stores R rows of one 16-column panel from two ymm int32 sums per row.
template <int R>
CPUFORMER_AVX2 static inline void finish_avx2(const Tile& t, const __m256i (&acc)[R][2]) {
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
  finish_avx2<R>(t, acc);
}
#endif

#ifdef CPUFORMER_HAVE_VNNI
// acc + four u8*s8 products per int32 lane. GCC 12 copies every accumulator to a scratch register and back around
// the vpdpbusd intrinsics (two extra moves per instruction in the inner loop, a third of its speed); the inline asm
// ties the accumulator to the destination. VEX vs EVEX is explicit: a CPU with AVX-VNNI only must not see EVEX.
CPUFORMER_AVX512VNNI static inline __m512i dpbusd_zmm(__m512i acc, __m512i a, __m512i w) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(a), "v"(w));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, a, w);
#endif
}

CPUFORMER_AVXVNNI static inline __m256i dpbusd_ymm_vex(__m256i acc, __m256i a, __m256i w) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("%{vex%} vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+x"(acc) : "x"(a), "x"(w));
  return acc;
#else
  return _mm256_dpbusd_avx_epi32(acc, a, w);
#endif
}

// AVX-VNNI (VEX, 256-bit): the AVX2 kernel with one vpdpbusd in place of vpmaddubsw + vpmaddwd + vpaddd. With one
// or two rows, two sets of sums over alternate groups keep more than two vpdpbusd chains in flight; integer sums
// are associative, so the split changes no bit.
template <int R>
CPUFORMER_AVXVNNI static inline __attribute__((always_inline)) void dp_group_avxvnni(
    __m256i (&acc)[R][2], const std::int8_t* w, const std::uint8_t* a, index_t ldq) {
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
  for (int r = 0; r < R; ++r) {
    std::int32_t four;
    std::memcpy(&four, a + r * ldq, 4);
    const __m256i av = _mm256_set1_epi32(four);
    acc[r][0] = dpbusd_ymm_vex(acc[r][0], av, w0);
    acc[r][1] = dpbusd_ymm_vex(acc[r][1], av, w1);
  }
}

template <int R>
CPUFORMER_AVXVNNI void tile_avxvnni(const Tile& t) {
  constexpr index_t kGroupBytes = kPanel * kGroup;
  __m256i acc[R][2], acc2[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc2[r][0] = acc2[r][1] = _mm256_setzero_si256();
  const std::int8_t* w = t.panel;
  const std::uint8_t* a = t.a;
  index_t g = 0;
  if (R <= 2)
    for (; g + 2 <= t.groups; g += 2, w += 2 * kGroupBytes, a += 2 * kGroup) {
      dp_group_avxvnni<R>(acc, w, a, t.ldq);
      dp_group_avxvnni<R>(acc2, w + kGroupBytes, a + kGroup, t.ldq);
    }
  for (; g < t.groups; ++g, w += kGroupBytes, a += kGroup) dp_group_avxvnni<R>(acc, w, a, t.ldq);
  if (R <= 2)
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_add_epi32(acc[r][0], acc2[r][0]);
      acc[r][1] = _mm256_add_epi32(acc[r][1], acc2[r][1]);
    }
  finish_avx2<R>(t, acc);
}

// Dequantizes and stores `rows` rows of panel p (columns p * 16 ...) from their int32 sums, row r's at
// sums[r * stride]: the same float operations as finish_scalar and finish_avx2, 16 lanes at a time.
CPUFORMER_AVX512VNNI static inline __attribute__((always_inline)) void finish_zmm(const Tile& t, int p, int rows,
                                                                                const __m512i* sums, int stride) {
  const index_t j0 = p * kPanel, cols = std::min<index_t>(kPanel, t.cols - j0);
  const __mmask16 m = static_cast<__mmask16>(cols >= kPanel ? 0xffffu : (1u << cols) - 1);
  const __m512i cs = _mm512_loadu_si512(t.col_sum + j0);  // padded to whole panels
  const __m512 sw = _mm512_loadu_ps(t.scale + j0);
  const __m512 b = t.bias ? _mm512_maskz_loadu_ps(m, t.bias + j0) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    const __m512i z = _mm512_set1_epi32(t.rq[r].zero);
    const __m512 sa = _mm512_set1_ps(t.rq[r].scale);
    const __m512i sum = _mm512_load_si512(sums + r * stride);
    const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_mullo_epi32(z, cs)));
    const __m512 y = _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(sa, sw)), b);
    if (cols == kPanel)
      _mm512_storeu_ps(t.y + r * t.ldy + j0, y);
    else
      _mm512_mask_storeu_ps(t.y + r * t.ldy + j0, m, y);
  }
}

// AVX-512 VNNI: R rows (1..8) times P panels (1, 2) of 16 columns, one zmm accumulator each; per 4-k group one
// 64-byte load per panel, one 4-byte broadcast per row and R * P vpdpbusd. Small tiles (R * P <= 4) keep two sets
// of sums over alternate groups so that at least eight independent vpdpbusd chains hide its latency.
template <int R, int P>
CPUFORMER_AVX512VNNI static inline __attribute__((always_inline)) void dp_group_avx512(
    __m512i (&acc)[R][P], const std::int8_t* w, index_t panel_bytes, const std::uint8_t* a, index_t ldq) {
  __m512i wv[P];
  for (int p = 0; p < P; ++p) wv[p] = _mm512_loadu_si512(w + p * panel_bytes);
  for (int r = 0; r < R; ++r) {
    std::int32_t four;
    std::memcpy(&four, a + r * ldq, 4);
    const __m512i av = _mm512_set1_epi32(four);
    for (int p = 0; p < P; ++p) acc[r][p] = dpbusd_zmm(acc[r][p], av, wv[p]);
  }
}

template <int R, int P>
CPUFORMER_AVX512VNNI void tile_avx512vnni(const Tile& t) {
  constexpr bool kSplit = R * P <= 4;
  constexpr index_t kGroupBytes = kPanel * kGroup;
  __m512i acc[R][P], acc2[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = acc2[r][p] = _mm512_setzero_si512();
  const index_t panel_bytes = t.groups * kGroupBytes;
  const std::int8_t* w = t.panel;
  const std::uint8_t* a = t.a;
  index_t g = 0;
  if (kSplit)
    for (; g + 2 <= t.groups; g += 2, w += 2 * kGroupBytes, a += 2 * kGroup) {
      dp_group_avx512<R, P>(acc, w, panel_bytes, a, t.ldq);
      dp_group_avx512<R, P>(acc2, w + kGroupBytes, panel_bytes, a + kGroup, t.ldq);
    }
  for (; g < t.groups; ++g, w += kGroupBytes, a += kGroup) dp_group_avx512<R, P>(acc, w, panel_bytes, a, t.ldq);
  if (kSplit)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_add_epi32(acc[r][p], acc2[r][p]);
  for (int p = 0; p < P; ++p) finish_zmm(t, p, R, &acc[0][p], P);
}

template <int P>
void run_tile_avx512vnni(const Tile& t, int rows) {
  switch (rows) {
    case 1: return tile_avx512vnni<1, P>(t);
    case 2: return tile_avx512vnni<2, P>(t);
    case 3: return tile_avx512vnni<3, P>(t);
    case 4: return tile_avx512vnni<4, P>(t);
    case 5: return tile_avx512vnni<5, P>(t);
    case 6: return tile_avx512vnni<6, P>(t);
    case 7: return tile_avx512vnni<7, P>(t);
    default: return tile_avx512vnni<8, P>(t);
  }
}

#ifdef CPUFORMER_AMX_INT8
// One k step of 16 groups: A halves from a (rows lda apart), B panels from w (panel_bytes apart, rows 64 apart).
template <int H, int P>
CPUFORMER_AVX512VNNI static inline __attribute__((always_inline)) void amx_step(const std::uint8_t* a, index_t lda,
                                                                        const std::int8_t* w, index_t panel_bytes) {
  CPUFORMER_TILE_LOADD(6, w, 64);
  if (P == 2) CPUFORMER_TILE_LOADD(7, w + panel_bytes, 64);
  CPUFORMER_TILE_LOADD(4, a, lda);
  CPUFORMER_TILE_DPBUSD(0, 4, 6);
  if (P == 2) CPUFORMER_TILE_DPBUSD(1, 4, 7);
  if (H == 2) {
    CPUFORMER_TILE_LOADD(5, a + 16 * lda, lda);
    CPUFORMER_TILE_DPBUSD(2, 5, 6);
    if (P == 2) CPUFORMER_TILE_DPBUSD(3, 5, 7);
  }
}

// rows (<= 16 * H, configured by amx_configure(rows)) times P panels.
template <int H, int P>
CPUFORMER_AVX512VNNI void tile_amx(const Tile& t, int rows) {
  constexpr index_t kStepBytes = kAmxGroups * kPanel * kGroup;  // one B tile
  CPUFORMER_TILE_ZERO(0);
  if (P == 2) CPUFORMER_TILE_ZERO(1);
  if (H == 2) {
    CPUFORMER_TILE_ZERO(2);
    if (P == 2) CPUFORMER_TILE_ZERO(3);
  }
  const index_t panel_bytes = t.groups * kPanel * kGroup, full = t.groups / kAmxGroups * kAmxGroups;
  for (index_t g = 0; g < full; g += kAmxGroups)
    amx_step<H, P>(t.a + g * kGroup, t.ldq, t.panel + g * kPanel * kGroup, panel_bytes);
  if (full < t.groups) {
    // The last groups, copied with zero padding: no tile row reads past an activation row or the packed weight.
    alignas(64) std::uint8_t a[kAmxRows][64] = {};
    alignas(64) std::int8_t w[2][kStepBytes] = {};
    const index_t tail = t.groups - full;
    for (int r = 0; r < rows; ++r) std::memcpy(a[r], t.a + r * t.ldq + full * kGroup, tail * kGroup);
    for (int p = 0; p < P; ++p)
      std::memcpy(w[p], t.panel + p * panel_bytes + full * kPanel * kGroup, tail * kPanel * kGroup);
    amx_step<H, P>(a[0], 64, w[0], kStepBytes);
  }
  alignas(64) std::int32_t acc[kAmxRows][2 * kPanel];
  constexpr index_t kAccStride = 2 * kPanel * sizeof(std::int32_t);
  CPUFORMER_TILE_STORED(0, acc[0], kAccStride);
  if (P == 2) CPUFORMER_TILE_STORED(1, acc[0] + kPanel, kAccStride);
  if (H == 2) {
    CPUFORMER_TILE_STORED(2, acc[16], kAccStride);
    if (P == 2) CPUFORMER_TILE_STORED(3, acc[16] + kPanel, kAccStride);
  }
  for (int p = 0; p < P; ++p) finish_zmm(t, p, rows, reinterpret_cast<const __m512i*>(acc[0] + p * kPanel), 2);
}

void run_tile_amx(const Tile& t, int rows) {
  if (rows > 16) return t.cols > kPanel ? tile_amx<2, 2>(t, rows) : tile_amx<2, 1>(t, rows);
  return t.cols > kPanel ? tile_amx<1, 2>(t, rows) : tile_amx<1, 1>(t, rows);
}
#endif
#endif

// rows <= rows_per_tile(kern) and, but for the AVX-512 kernel, one panel (t.cols <= 16).
void run_tile(Kernel kern, const Tile& t, int rows) {
  switch (kern) {
#ifdef CPUFORMER_HAVE_VNNI
    case Kernel::kAvx512Vnni:
      if (t.cols > kPanel) return run_tile_avx512vnni<2>(t, rows);
      return run_tile_avx512vnni<1>(t, rows);
    case Kernel::kAvxVnni:
      switch (rows) {
        case 1: return tile_avxvnni<1>(t);
        case 2: return tile_avxvnni<2>(t);
        case 3: return tile_avxvnni<3>(t);
        default: return tile_avxvnni<4>(t);
      }
#endif
#ifdef CPUFORMER_HAVE_AVX2
    case Kernel::kAvx2:
      switch (rows) {
        case 1: return tile_avx2<1>(t);
        case 2: return tile_avx2<2>(t);
        case 3: return tile_avx2<3>(t);
        default: return tile_avx2<4>(t);
      }
#endif
    default: return tile_scalar(t, rows);
  }
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

namespace {

Int8Weight empty_int8_weight(index_t N, index_t K) {
  Int8Weight q;
  q.n = N;
  q.k = K;
  const index_t np = round_up(N, kPanel), groups = round_up(K, kGroup) / kGroup;
  q.packed.assign(static_cast<size_t>(np * groups * kGroup), 0);
  q.scale.assign(static_cast<size_t>(np), 0.0f);
  q.col_sum.assign(static_cast<size_t>(np), 0);
  return q;
}

// Row i of the weight (K floats, finite: checked by the callers) into q's panel layout, scale and column sum.
void quantize_weight_row(Int8Weight& q, index_t i, const float* row) {
  const index_t K = q.k, groups = round_up(K, kGroup) / kGroup;
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

#ifdef CPUFORMER_HAVE_AVX512
// quantize_weight_row's arithmetic 16 weights at a time (the same division, round-to-nearest-even and clamp per
// weight, the same exact maximum and sum): the same bytes, scale and sum.
CPUFORMER_AVX512 static void quantize_weight_row_avx512(Int8Weight& q, index_t i, const float* row) {
  const index_t K = q.k, groups = round_up(K, kGroup) / kGroup;
  const auto lanes = [&](index_t j) {
    return static_cast<__mmask16>(K - j >= 16 ? 0xFFFFu : (1u << (K - j)) - 1u);
  };
  __m512 vmax = _mm512_setzero_ps();
  for (index_t j = 0; j < K; j += 16)
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes(j), row + j)));
  const float amax = _mm512_reduce_max_ps(vmax);
  const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  q.scale[i] = scale;
  const index_t p = i / kPanel, c = i % kPanel;
  const __m512 vs = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  __m512i sum = _mm512_setzero_si512();
  for (index_t j = 0; j < K; j += 16) {
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(lanes(j), row + j), vs);
    const __m512 nearest = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_min_ps(hi, _mm512_max_ps(lo, nearest));
    const __m512i qi = _mm512_cvtps_epi32(r);
    sum = _mm512_add_epi32(sum, qi);
    alignas(16) std::int32_t bytes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm512_cvtsepi32_epi8(qi));
    for (index_t t = 0; t < 4 && j / kGroup + t < groups; ++t)
      std::memcpy(&q.packed[((p * groups + j / kGroup + t) * kPanel + c) * kGroup], &bytes[t], kGroup);
  }
  q.col_sum[i] = _mm512_reduce_add_epi32(sum);
}
#endif

// Rows [r0, r1) of the weight (w holds row r0 first, rows ldw apart) into q, on the kernel threads. Each thread
// takes whole panels: every 64-byte line of the layout belongs to one panel, so no two threads write one line.
void quantize_weight_rows(Int8Weight& q, index_t r0, index_t r1, const float* w, index_t ldw) {
  const index_t p0 = r0 / kPanel, p1 = (r1 + kPanel - 1) / kPanel;
  parallel_for(p1 - p0, std::max<index_t>(1, (index_t(1) << 16) / (kPanel * q.k)), [&](index_t a, index_t b, int) {
    for (index_t i = std::max(r0, (p0 + a) * kPanel); i < std::min(r1, (p0 + b) * kPanel); ++i) {
#ifdef CPUFORMER_HAVE_AVX512
      if (detail::use_avx512()) {
        quantize_weight_row_avx512(q, i, w + (i - r0) * ldw);
        continue;
      }
#endif
      quantize_weight_row(q, i, w + (i - r0) * ldw);
    }
  });
}

// Every weight of rows [r0, r1) finite, else an error naming the first that is not (checked on the kernel threads;
// the error is raised outside them).
void check_finite_rows(const float* w, index_t r0, index_t r1, index_t K, index_t ldw) {
  std::atomic<bool> bad{false};
  parallel_for(r1 - r0, std::max<index_t>(1, (index_t(1) << 16) / K), [&](index_t a, index_t b, int) {
    std::uint32_t any = 0;  // an exponent of all ones: inf or NaN
    for (index_t i = a; i < b; ++i)
      for (index_t j = 0; j < K; ++j) {
        std::uint32_t bits;
        std::memcpy(&bits, w + i * ldw + j, sizeof bits);
        any |= static_cast<std::uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
      }
    if (any) bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return;
  for (index_t i = r0; i < r1; ++i)
    for (index_t j = 0; j < K; ++j)
      CPUFORMER_CHECK(std::isfinite(w[(i - r0) * ldw + j]), "quantize_weight_int8: weight[", i, ", ", j,
                      "] is not finite");
}

}  // namespace

Int8Weight quantize_weight_int8(const float* w, index_t N, index_t K, index_t ldw) {
  CPUFORMER_CHECK(N > 0 && K > 0 && ldw >= K, "quantize_weight_int8: bad sizes N=", N, " K=", K, " ldw=", ldw);
  check_finite_rows(w, 0, N, K, ldw);
  Int8Weight q = empty_int8_weight(N, K);
  quantize_weight_rows(q, 0, N, w, ldw);
  return q;
}

Int8Weight quantize_weight_int8_blocked(index_t N, index_t K,
                                        const std::function<void(index_t, index_t, float*)>& fill,
                                        index_t block_rows) {
  CPUFORMER_CHECK(N > 0 && K > 0 && block_rows >= 0, "quantize_weight_int8: bad sizes N=", N, " K=", K);
  Int8Weight q = empty_int8_weight(N, K);
  const index_t block = block_rows > 0 ? block_rows : std::max<index_t>(1, (1 << 22) / K);  // ~16 MiB of floats
  std::vector<float> rows(static_cast<size_t>(std::min(N, block) * K));
  for (index_t r0 = 0; r0 < N; r0 += block) {
    const index_t r1 = std::min(N, r0 + block);
    fill(r0, r1, rows.data());
    check_finite_rows(rows.data(), r0, r1, K, K);
    quantize_weight_rows(q, r0, r1, rows.data(), K);
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
  // The quantized rows go to a per-thread scratch buffer kept between calls (up to kKeepScratch bytes): a fresh
  // zero-filled vector cost a memset plus, at batch 32 x 128 tokens, a page fault per 4 KiB (an mmap'd block) on
  // every call. quantize_rows writes every byte, padding included. Calls from other threads use their own.
  constexpr size_t kKeepScratch = size_t(16) << 20;
  thread_local std::unique_ptr<std::uint8_t[]> scratch;
  thread_local size_t scratch_size = 0;
  const size_t need = static_cast<size_t>(M * ldq);
  std::unique_ptr<std::uint8_t[]> once;
  std::uint8_t* qa_buf;
  if (need <= scratch_size) {
    qa_buf = scratch.get();
  } else if (need <= kKeepScratch) {
    scratch.reset(new std::uint8_t[need]);  // uninitialised
    scratch_size = need;
    qa_buf = scratch.get();
  } else {
    once.reset(new std::uint8_t[need]);
    qa_buf = once.get();
  }
  std::vector<RowQuant> rq(static_cast<size_t>(M));
  quantize_rows(x, M, w.k, ldx, qa_buf, ldq, rq.data());
  // Tasks: chunks of rows whose quantized activations stay in L2 while every panel of the chunk passes over them,
  // times blocks of panels (two for AVX-512: 32 columns per tile). Threads take contiguous runs of tasks, so at
  // batch 1 each streams its own slice of the packed weights once.
  Kernel kern = active_kernel();
  if (kern == Kernel::kAmx && M < kAmxMinRows) kern = Kernel::kAvx512Vnni;
  const bool zmm = kern == Kernel::kAvx512Vnni || kern == Kernel::kAmx;
  const int rows_per_tile = kern == Kernel::kAmx ? kAmxRows : zmm ? kMaxRowsZmm : kMaxRows;
  const index_t block = zmm ? 2 : 1;
  const index_t blocks = (panels + block - 1) / block;
  const index_t mc =
      std::max<index_t>(rows_per_tile, std::min(M, round_up(std::max<index_t>(1, 96 * 1024 / ldq), rows_per_tile)));
  const index_t chunks = (M + mc - 1) / mc, tasks = chunks * blocks;
  const index_t macs_per_task = std::min(mc, M) * block * kPanel * ldq;
  parallel_for(tasks, std::max<index_t>(1, 262144 / std::max<index_t>(1, macs_per_task)),
               [&](index_t t0, index_t t1, int) {
                 int configured = 0;  // rows of the AMX tile configuration this range loaded (0: none)
                 (void)configured;
                 for (index_t task = t0; task < t1; ++task) {
                   const index_t c = task / blocks, p = task % blocks * block;
                   const index_t m_end = std::min(M, (c + 1) * mc), n0 = p * kPanel;
                   Tile t;
                   t.ldq = ldq;
                   t.groups = groups;
                   t.panel = w.packed.data() + p * groups * kPanel * kGroup;
                   t.scale = w.scale.data() + n0;
                   t.col_sum = w.col_sum.data() + n0;
                   t.bias = bias ? bias + n0 : nullptr;
                   t.ldy = ldy;
                   t.cols = std::min(block * kPanel, N - n0);
                   for (index_t m = c * mc; m < m_end; m += rows_per_tile) {
                     t.a = qa_buf + m * ldq;
                     t.rq = rq.data() + m;
                     t.y = y + m * ldy + n0;
                     const int rows = static_cast<int>(std::min<index_t>(rows_per_tile, m_end - m));
#ifdef CPUFORMER_AMX_INT8
                     if (kern == Kernel::kAmx) {
                       // Configured here, not cached per thread: other libraries' AMX code may run in between.
                       if (rows != configured) detail::amx_configure(rows);
                       configured = rows;
                       run_tile_amx(t, rows);
                       continue;
                     }
#endif
                     run_tile(kern, t, rows);
                   }
                 }
#ifdef CPUFORMER_AMX_INT8
                 if (configured) detail::amx_release();
#endif
               });
}

std::string int8_kernel_name() { return kKernelNames[static_cast<int>(active_kernel())]; }

void set_int8_kernel(const std::string& name) {
  const int c = parse_kernel(name);
  CPUFORMER_CHECK(c != kInvalid, "set_int8_kernel: name must be 'auto', 'amx', 'avx512vnni' (or 'vnni'), 'avxvnni', "
                  "'avx2' or 'scalar', got '", name, "'");
  CPUFORMER_CHECK(c == kAuto || cpu_has(static_cast<Kernel>(c)), "set_int8_kernel: this CPU or build lacks '", name,
                  "'");
  g_choice.store(c);
}

std::vector<std::string> int8_kernels_available() {
  std::vector<std::string> out;
  for (int i = kNumKernels - 1; i >= 0; --i)
    if (cpu_has(static_cast<Kernel>(i))) out.push_back(kKernelNames[i]);
  return out;
}

}  // namespace cpuformer
