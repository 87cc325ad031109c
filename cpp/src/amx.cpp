// amx.cpp: float32 products on AMX tiles (see amx_internal.h for the arithmetic and its error).
//
// Layout. Per block of at most 512 k, a thread's rows of op(A) are split into bf16 planes (plane t: rows x kcp, kcp
// = the block's k rounded up to 32 and zero-padded). Per 32 columns op(B)'s block is packed into B tiles: tile
// (t, p, s) of term t, 16-column panel p and k step s holds in its row i, for each column, the bf16 pair
// (k = 32 s + 2 i, + 1). Every 32-row block then runs the k steps with its four C tiles (amx_configure's palette)
// against each 32 columns of a 384-column block, and adds them to C.
#include "amx_internal.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "gemm_internal.h"
#include "parallel.h"
#include "simd.h"

namespace cpuformer::detail {

#if defined(CPUFORMER_HAVE_AMX) && defined(CPUFORMER_HAVE_AVX512)
namespace {

constexpr index_t kStepK = 32;            // k per tile step: 16 pairs
constexpr index_t kKBlock = 512;          // k per block
// With bf16 weights (one B term) twice the k per block: half the passes that add each block's sums into C (the B
// block, 384 x 1024 x 2 bytes, and the A planes of up to 128 rows still fit a 2 MiB L2 together).
constexpr index_t kKBlockBf16 = 1024;
constexpr index_t kColBlock = 384;        // columns per packed block of op(B): 384 x 512 x 3 terms x 2 bytes in L2
constexpr index_t kMaxPlaneBytes = index_t(16) << 20;  // the split rows of one k block, at most
constexpr index_t kTileWords = 16 * 16;   // 32-bit words per tile
constexpr index_t kPackedNc = 4080;       // the column panels of detail::pack_b (matmul.cpp's NC)

thread_local AlignedBuffer t_planes, t_btiles;

inline __mmask16 first_n16(index_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}
inline __mmask32 first_n32(index_t n) {
  return static_cast<__mmask32>(n >= 32 ? 0xFFFFFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}

// The amx path's AVX-512 code: VBMI for the one-instruction pairing of bf16 halves (every AMX CPU has it; the path's
// detection checks).
#define CPUFORMER_AMX_SIMD __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vbmi,avx2,fma")))

// x = t[0] + t[1] + t[2] exactly, each t a float whose low 16 bits are zero (a bf16 in the top half). Non-finite
// values stay in t[0] (NaN made quiet so the truncation cannot leave an infinity). Every term of a nonzero x has
// x's sign: a term that would be 0 becomes +-2^-126 (the smallest normal; its products with finite values vanish
// below float32's resolution of the sums), so that a product with an infinity is that infinity, never 0 x inf.
CPUFORMER_AMX_SIMD static inline __attribute__((always_inline)) void split3(__m512 x, __m512i (&t)[3]) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i xb = _mm512_castps_si512(x);
  const __mmask16 bad = _mm512_fpclass_ps_mask(x, 0x99), nan = _mm512_fpclass_ps_mask(x, 0x81);  // inf or NaN; NaN
  t[0] = _mm512_and_si512(_mm512_mask_or_epi32(xb, nan, xb, _mm512_set1_epi32(0x00400000)), top);
  const __m512 r1 = _mm512_maskz_sub_ps(static_cast<__mmask16>(~bad), x, _mm512_castsi512_ps(t[0]));  // exact
  t[1] = _mm512_and_si512(_mm512_castps_si512(r1), top);
  t[2] = _mm512_castps_si512(_mm512_sub_ps(r1, _mm512_castsi512_ps(t[1])));  // exact, at most 8 significant bits
  const __mmask16 nonzero = _mm512_test_epi32_mask(xb, abs_bits);
  // x's sign | 2^-126
  const __m512i tiny = _mm512_ternarylogic_epi32(xb, _mm512_set1_epi32(static_cast<int>(0x80000000u)),
                                                 _mm512_set1_epi32(0x00800000), 0xEA);
  for (int i = 1; i < 3; ++i)
    t[i] = _mm512_mask_mov_epi32(t[i], _mm512_mask_testn_epi32_mask(nonzero, t[i], abs_bits), tiny);
}

// The bytes of the top halves of 32 words of two vectors (vpermt2b's index): 32 bf16 in order.
alignas(64) constexpr std::uint8_t kTopHalves[64] = {
    2,  3,  6,  7,  10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31, 34,  35,  38,  39,  42,  43,
    46, 47, 50, 51, 54, 55, 58, 59, 62, 63, 66, 67, 70, 71, 74, 75, 78, 79,  82,  83,  86,  87,
    90, 91, 94, 95, 98, 99, 102, 103, 106, 107, 110, 111, 114, 115, 118, 119, 122, 123, 126, 127};

// 32 consecutive floats (lo, then hi) as the 32 bf16 of each of their three terms, in order: per term the top
// halves of the two splits, paired by one byte permutation.
CPUFORMER_AMX_SIMD static inline __attribute__((always_inline)) void split3_32(__m512 lo, __m512 hi,
                                                                            __m512i (&t)[3]) {
  __m512i l[3], h[3];
  split3(lo, l);
  split3(hi, h);
  const __m512i index = _mm512_load_si512(kTopHalves);
  for (int i = 0; i < 3; ++i) t[i] = _mm512_permutex2var_epi8(l[i], index, h[i]);
}

// split3_32 of finite values that only meet finite values: a term may be 0 (0 x inf cannot happen), no NaN to
// quieten, so four instructions a vector instead of split3's dozen.
CPUFORMER_AMX_SIMD static inline __attribute__((always_inline)) void split3_32_finite(__m512 lo, __m512 hi,
                                                                                   __m512i (&t)[3]) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512i l[3], h[3];
  for (int half = 0; half < 2; ++half) {
    const __m512 x = half ? hi : lo;
    __m512i (&r)[3] = half ? h : l;
    r[0] = _mm512_and_si512(_mm512_castps_si512(x), top);
    const __m512 r1 = _mm512_sub_ps(x, _mm512_castsi512_ps(r[0]));  // exact
    r[1] = _mm512_and_si512(_mm512_castps_si512(r1), top);
    r[2] = _mm512_castps_si512(_mm512_sub_ps(r1, _mm512_castsi512_ps(r[1])));  // exact
  }
  const __m512i index = _mm512_load_si512(kTopHalves);
  for (int i = 0; i < 3; ++i) t[i] = _mm512_permutex2var_epi8(l[i], index, h[i]);
}

// Row i of each term's B tile from 16 columns of two consecutive k (even, odd): per column the bf16 pair.
CPUFORMER_AMX_SIMD static inline __attribute__((always_inline)) void store_pairs3(__m512 even, __m512 odd,
                                                                               std::uint32_t* const (&tile)[3], int i) {
  __m512i e[3], o[3];
  split3(even, e);
  split3(odd, o);
  for (int t = 0; t < 3; ++t) _mm512_store_si512(tile[t] + i * 16, _mm512_or_si512(_mm512_srli_epi32(e[t], 16), o[t]));
}

// r[c] (16 rows of 16 words) becomes its transpose: r[i] word c = the old r[c] word i.
CPUFORMER_AMX_SIMD static inline __attribute__((always_inline)) void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // a 4 x 4 transpose of 128-bit lanes among r[j], r[4 + j], r[8 + j], r[12 + j]
    const __m512i t0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), t1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const __m512i t2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i t3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(t0, t2, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t0, t2, 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(t1, t3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(t1, t3, 0xdd);
  }
}

// op(A)'s rows [m0, m0 + rows) x k [k0, k0 + kc) as three planes (see the top of the file).
CPUFORMER_AMX_SIMD void split_a(const AmxGemm& g, index_t m0, index_t rows, index_t k0, index_t kc, index_t kcp,
                              std::uint16_t* planes) {
  std::uint16_t* plane[3] = {planes, planes + rows * kcp, planes + 2 * rows * kcp};
  const int terms = g.prerounded ? 1 : 3;
  __m512i t[3];
  if (!g.trans_a) {
    // The rows come from memory one short run each, too short for the hardware to see a stream: each line of the
    // row two ahead is fetched as this row's line at the same k is split.
    for (index_t r = 0; r < rows; ++r) {
      const float* a = g.A + (m0 + r) * g.lda + k0;
      const char* ahead = reinterpret_cast<const char*>(a + 2 * g.lda);
      for (index_t k = 0; k < kcp; k += 32) {  // kcp: a multiple of 32
        if (r + 2 < rows && k < kc) _mm_prefetch(ahead + k * sizeof(float), _MM_HINT_T0);
        if (r + 2 < rows && k + 16 < kc) _mm_prefetch(ahead + (k + 16) * sizeof(float), _MM_HINT_T0);
        split3_32(_mm512_maskz_loadu_ps(first_n16(kc - k), a + k),
                  _mm512_maskz_loadu_ps(first_n16(kc - k - 16), a + k + 16), t);
        for (int p = 0; p < terms; ++p) _mm512_store_si512(plane[p] + r * kcp + k, t[p]);
      }
    }
    return;
  }
  // A is K x M: 16 x 16 blocks transposed on the way, two k blocks at a time through rows of 32 k on the stack. Per
  // chunk of 64 rows of op(A) the k steps go outermost: each step reads 256 contiguous bytes of 32 rows of A (which
  // the prefetchers follow) and its planes' 196 KB stay in L2 (2-7% faster weight-gradient products than one
  // 16-row strip at a time down all of k).
  // From packed panels, 16 rows of op(A) (one panel's 16 columns, m a multiple of 16) at 16 k from k (a multiple of
  // 16, so inside one K block) are 16 floats apart.
  const index_t kstep = g.packed_a ? 16 : g.lda;
  const auto at = [&](index_t k, index_t m) -> const float* {
    if (!g.packed_a) return g.A + k * g.lda + m;
    const index_t jc = m / kPackedNc * kPackedNc, pc = k / g.packed_a_kc * g.packed_a_kc;
    const index_t kcb = std::min(g.packed_a_kc, g.K - pc), panels = (std::min(kPackedNc, g.M - jc) + 15) / 16;
    return g.packed_a + jc * g.K + pc * panels * 16 + (m - jc) * kcb + (k - pc) * 16;
  };
  constexpr index_t kRowChunk = 64;
  alignas(64) float rows32[16][32];
  for (index_t mc = 0; mc < rows; mc += kRowChunk) {
    for (index_t k = 0; k < kcp; k += 32) {
      for (index_t m = mc; m < std::min(rows, mc + kRowChunk); m += 16) {
        const __mmask16 mm = first_n16(rows - m);
        const index_t mn = std::min<index_t>(16, rows - m);
        for (int h = 0; h < 2; ++h) {
          const index_t kh = k + 16 * h;
          __m512i r[16];
          // 16 rows at a stride of M floats, a page or more apart: each line of the block two ahead (k + 32) is
          // fetched now.
          if (kh + 32 < kc) {
            const float* ahead = at(k0 + kh + 32, m0 + m);
            for (int i = 0; i < 16; ++i)
              if (kh + 32 + i < kc) _mm_prefetch(reinterpret_cast<const char*>(ahead + i * kstep), _MM_HINT_T0);
          }
          const float* src = kh < kc ? at(k0 + kh, m0 + m) : nullptr;
          for (int i = 0; i < 16; ++i)
            r[i] = kh + i < kc ? _mm512_castps_si512(_mm512_maskz_loadu_ps(mm, src + i * kstep))
                               : _mm512_setzero_si512();
          transpose16(r);
          for (index_t j = 0; j < mn; ++j) _mm512_store_si512(rows32[j] + 16 * h, r[j]);
        }
        for (index_t j = 0; j < mn; ++j) {
          split3_32(_mm512_load_ps(rows32[j]), _mm512_load_ps(rows32[j] + 16), t);
          for (int p = 0; p < terms; ++p) _mm512_store_si512(plane[p] + (m + j) * kcp + k, t[p]);
        }
      }
    }
  }
}

// op(B)'s columns [j0, j0 + 16 * panels) x k [k0, k0 + kc) as B tiles of each term: tile (t, p, s) at
// b + ((t * 2 + p) * steps + s) * 256 words. Past N or K: zeros.
CPUFORMER_AMX_SIMD void pack_b(const AmxGemm& g, index_t j0, int panels, index_t k0, index_t kc, index_t steps,
                             std::uint32_t* b) {
  CPUFORMER_CHECK(g.packed || g.H || g.trans_b, "amx pack_b: a float32 B that is not transposed goes to pack_b_rows");
  const int terms = g.H ? 1 : 3;
  if (g.packed) {  // sgemm_pack_b's panels: rows of 16 consecutive columns, zero-padded, read like B (K x N)
    for (int p = 0; p < panels; ++p) {
      const index_t n0 = j0 + 16 * p, jc = n0 / kPackedNc * kPackedNc;
      const index_t slivers = (std::min(kPackedNc, g.N - jc) + 15) / 16;
      for (index_t s = 0; s < steps; ++s) {
        const index_t k = k0 + s * kStepK, kn = std::min<index_t>(kStepK, k0 + kc - k);
        const index_t pc = k / g.packed_kc * g.packed_kc, kcb = std::min(g.packed_kc, g.K - pc);
        const float* sliver = g.packed + jc * g.K + pc * slivers * 16 + (n0 - jc) / 16 * 16 * kcb + (k - pc) * 16;
        std::uint32_t* tile[3];
        for (int t = 0; t < 3; ++t) tile[t] = b + ((t * 2 + p) * steps + s) * kTileWords;
        for (int i = 0; i < 16; ++i)
          store_pairs3(2 * i < kn ? _mm512_load_ps(sliver + 2 * i * 16) : _mm512_setzero_ps(),
                       2 * i + 1 < kn ? _mm512_load_ps(sliver + (2 * i + 1) * 16) : _mm512_setzero_ps(), tile, i);
      }
    }
    return;
  }
  for (int p = 0; p < panels; ++p)
    for (index_t s = 0; s < steps; ++s) {
      const index_t n0 = j0 + 16 * p, k = k0 + s * kStepK, kn = std::min<index_t>(kStepK, k0 + kc - k);
      std::uint32_t* tile[3];
      for (int t = 0; t < terms; ++t) tile[t] = b + ((t * 2 + p) * steps + s) * kTileWords;
      if (g.trans_b) {  // B is N x K: the 32 k of column n are one run of row n, transposed on the way
        __m512i r[3][16];
        for (int c = 0; c < 16; ++c) {
          if (n0 + c >= g.N) {
            for (int t = 0; t < terms; ++t) r[t][c] = _mm512_setzero_si512();
          } else if (g.H) {
            // rows of H are 16 streams at a stride: fetch each a few steps ahead (the hardware does not keep up)
            _mm_prefetch(reinterpret_cast<const char*>(g.H + (n0 + c) * g.ldb + k + 4 * kStepK), _MM_HINT_T0);
            r[0][c] = _mm512_maskz_loadu_epi16(first_n32(kn), g.H + (n0 + c) * g.ldb + k);
          } else {
            const float* src = g.B + (n0 + c) * g.ldb + k;
            // 16 row streams, as for H
            _mm_prefetch(reinterpret_cast<const char*>(src + 4 * kStepK), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(src + 4 * kStepK + 16), _MM_HINT_T0);
            __m512i t[3];
            split3_32(_mm512_maskz_loadu_ps(first_n16(kn), src), _mm512_maskz_loadu_ps(first_n16(kn - 16), src + 16),
                      t);
            for (int i = 0; i < 3; ++i) r[i][c] = t[i];
          }
        }
        for (int t = 0; t < terms; ++t) {
          transpose16(r[t]);
          for (int i = 0; i < 16; ++i) _mm512_store_si512(tile[t] + i * 16, r[t][i]);
        }
      } else {  // bf16 B that is K x N: rows k + 2i and k + 2i + 1 interleaved (float32 B: pack_b_rows)
        const __mmask16 nm = first_n16(g.N - n0);
        for (int i = 0; i < 16; ++i) {
          const __m256i e = 2 * i < kn ? _mm256_maskz_loadu_epi16(nm, g.H + (k + 2 * i) * g.ldb + n0)
                                       : _mm256_setzero_si256();
          const __m256i o = 2 * i + 1 < kn ? _mm256_maskz_loadu_epi16(nm, g.H + (k + 2 * i + 1) * g.ldb + n0)
                                           : _mm256_setzero_si256();
          _mm512_store_si512(tile[0] + i * 16, _mm512_or_si512(_mm512_cvtepu16_epi32(e),
                                                                _mm512_slli_epi32(_mm512_cvtepu16_epi32(o), 16)));
        }
      }
    }
}

// pack_b for a whole column block [j0, j1) of a float32 B that is K x N (not transposed): the same tiles, at b + q *
// pw words for the block's pair q, written row pair by row pair so that B is read along its rows (pack_b's order
// reads 64 bytes of each of 512 rows per panel, a pattern no prefetcher follows).
CPUFORMER_AMX_SIMD void pack_b_rows(const AmxGemm& g, index_t j0, index_t j1, index_t k0, index_t kc, index_t steps,
                                    std::uint32_t* b, index_t pw) {
  const index_t panels = (j1 - j0 + 15) / 16;
  for (index_t s = 0; s < steps; ++s) {
    const index_t k = k0 + s * kStepK, kn = std::min<index_t>(kStepK, k0 + kc - k);
    for (int i = 0; i < 16; ++i) {
      const float* even = 2 * i < kn ? g.B + (k + 2 * i) * g.ldb : nullptr;
      const float* odd = 2 * i + 1 < kn ? g.B + (k + 2 * i + 1) * g.ldb : nullptr;
      for (index_t pp = 0; pp < panels; ++pp) {
        const index_t n0 = j0 + 16 * pp;
        const __mmask16 nm = first_n16(g.N - n0);
        std::uint32_t* tile[3];
        for (int t = 0; t < 3; ++t) tile[t] = b + (pp / 2) * pw + ((t * 2 + pp % 2) * steps + s) * kTileWords;
        store_pairs3(even ? _mm512_maskz_loadu_ps(nm, even + n0) : _mm512_setzero_ps(),
                     odd ? _mm512_maskz_loadu_ps(nm, odd + n0) : _mm512_setzero_ps(), tile, i);
      }
    }
  }
}

// The tile instructions name their tiles in the instruction, so each combination is spelled out.
template <int P>
static inline __attribute__((always_inline)) void load_b(const std::uint32_t* b, index_t panel_words) {
  CPUFORMER_TILE_LOADD(6, b, 64);
  if (P == 2) CPUFORMER_TILE_LOADD(7, b + panel_words, 64);
}
template <int P>
static inline __attribute__((always_inline)) void dp_rows4() {  // C tiles of the first 16 rows += tile 4 x B
  CPUFORMER_TILE_DPBF16PS(0, 4, 6);
  if (P == 2) CPUFORMER_TILE_DPBF16PS(1, 4, 7);
}
template <int P>
static inline __attribute__((always_inline)) void dp_rows5() {  // the same from tile 5
  CPUFORMER_TILE_DPBF16PS(0, 5, 6);
  if (P == 2) CPUFORMER_TILE_DPBF16PS(1, 5, 7);
}
template <int P>
static inline __attribute__((always_inline)) void dp_halves() {  // both row halves: tile 4 (first), tile 5 (next)
  CPUFORMER_TILE_DPBF16PS(0, 4, 6);
  if (P == 2) CPUFORMER_TILE_DPBF16PS(1, 4, 7);
  CPUFORMER_TILE_DPBF16PS(2, 5, 6);
  if (P == 2) CPUFORMER_TILE_DPBF16PS(3, 5, 7);
}

// Rows of memory that a block's k steps fetch into L2 while its tiles run, one 64-byte line of each row per step
// (the line of the step's k): `rows` rows from `at`, `ld` bytes apart.
struct Prefetch {
  const char* at = nullptr;
  index_t ld = 0;
  int rows = 0;
};

// One block of up to 32 rows (H = 2 row halves, or 1) x 32 columns (P = 2 panels, or 1) over `steps` k steps;
// NB = the terms of B (1: bf16, 3: float32), NA those of A (3, or 1 for prerounded activations with NB 1). A planes:
// rows lda bytes apart, planes plane_bytes apart.
// The sums start from zero and go to acc (32 floats a row), or with c (direct C: row stride ldc floats) start from
// c's values when load_c (else zero) and go back to c.
template <int H, int P, int NB, int NA = 3>
void tile_block(const std::uint16_t* a, index_t lda, index_t plane_bytes, const std::uint32_t* b, index_t steps,
                float (*acc)[32], float* c, index_t ldc, bool load_c, const Prefetch& pf) {
  const index_t cb = ldc * static_cast<index_t>(sizeof(float));
  if (c && load_c) {
    CPUFORMER_TILE_LOADD(0, c, cb);
    if (P == 2) CPUFORMER_TILE_LOADD(1, c + 16, cb);
    if (H == 2) {
      CPUFORMER_TILE_LOADD(2, c + 16 * ldc, cb);
      if (P == 2) CPUFORMER_TILE_LOADD(3, c + 16 * ldc + 16, cb);
    }
  } else {
    CPUFORMER_TILE_ZERO(0);
    if (P == 2) CPUFORMER_TILE_ZERO(1);
    if (H == 2) {
      CPUFORMER_TILE_ZERO(2);
      if (P == 2) CPUFORMER_TILE_ZERO(3);
    }
  }
  const char* ab = reinterpret_cast<const char*>(a);
  const index_t panel_words = steps * kTileWords, term_words = 2 * panel_words, half = 16 * lda;
  // A term t into tile 4 (and its second row half into tile 5), or with one row half into tile 4 or 5
  auto a_at = [&](int t) { return ab + t * plane_bytes; };
  for (index_t s = 0; s < steps; ++s, ab += kStepK * 2) {
    const std::uint32_t* bs = b + s * kTileWords;
    for (int r = 0; r < pf.rows; ++r) _mm_prefetch(pf.at + r * pf.ld + s * kStepK * 2, _MM_HINT_T1);
    load_b<P>(bs, panel_words);  // B term 0 with A terms 0, 1, 2
    if (NA == 1 && NB == 3) {  // one bf16 A term (weights, swapped) against float32 B's three terms, in order
      CPUFORMER_TILE_LOADD(4, a_at(0), lda);
      if (H == 2) CPUFORMER_TILE_LOADD(5, a_at(0) + half, lda);
      for (int t = 0; t < 3; ++t) {
        if (t > 0) load_b<P>(bs + t * term_words, panel_words);
        if (H == 2) dp_halves<P>();
        else dp_rows4<P>();
      }
      continue;
    }
    if (NA == 1) {  // one A term (activations already bf16) against bf16 B: its rows into tile 4 (and 5)
      CPUFORMER_TILE_LOADD(4, a_at(0), lda);
      if (H == 2) {
        CPUFORMER_TILE_LOADD(5, a_at(0) + half, lda);
        dp_halves<P>();
      } else {
        dp_rows4<P>();
      }
      continue;
    }
    if (H == 2) {
      for (int t = 0; t < 3; ++t) {
        CPUFORMER_TILE_LOADD(4, a_at(t), lda);
        CPUFORMER_TILE_LOADD(5, a_at(t) + half, lda);
        dp_halves<P>();
      }
      if (NB == 3) {  // B term 1 with A terms 1, 0; B term 2 with A term 0 (still in tiles 4, 5)
        load_b<P>(bs + term_words, panel_words);
        CPUFORMER_TILE_LOADD(4, a_at(1), lda);
        CPUFORMER_TILE_LOADD(5, a_at(1) + half, lda);
        dp_halves<P>();
        CPUFORMER_TILE_LOADD(4, a_at(0), lda);
        CPUFORMER_TILE_LOADD(5, a_at(0) + half, lda);
        dp_halves<P>();
        load_b<P>(bs + 2 * term_words, panel_words);
        dp_halves<P>();
      }
    } else {  // tiles 4 and 5 in turn
      CPUFORMER_TILE_LOADD(4, a_at(0), lda);
      CPUFORMER_TILE_LOADD(5, a_at(1), lda);
      dp_rows4<P>();
      CPUFORMER_TILE_LOADD(4, a_at(2), lda);
      dp_rows5<P>();
      dp_rows4<P>();
      if (NB == 3) {
        load_b<P>(bs + term_words, panel_words);
        CPUFORMER_TILE_LOADD(4, a_at(0), lda);
        dp_rows5<P>();  // A term 1, still in tile 5
        dp_rows4<P>();
        load_b<P>(bs + 2 * term_words, panel_words);
        dp_rows4<P>();
      }
    }
  }
  if (c) {
    CPUFORMER_TILE_STORED(0, c, cb);
    if (P == 2) CPUFORMER_TILE_STORED(1, c + 16, cb);
    if (H == 2) {
      CPUFORMER_TILE_STORED(2, c + 16 * ldc, cb);
      if (P == 2) CPUFORMER_TILE_STORED(3, c + 16 * ldc + 16, cb);
    }
    return;
  }
  constexpr index_t kAccStride = 32 * sizeof(float);
  CPUFORMER_TILE_STORED(0, acc[0], kAccStride);
  if (P == 2) CPUFORMER_TILE_STORED(1, acc[0] + 16, kAccStride);
  if (H == 2) {
    CPUFORMER_TILE_STORED(2, acc[16], kAccStride);
    if (P == 2) CPUFORMER_TILE_STORED(3, acc[16] + 16, kAccStride);
  }
}

template <int NB, int NA = 3>
void run_block(int rows, int panels, const std::uint16_t* a, index_t lda, index_t plane_bytes,
               const std::uint32_t* b, index_t steps, float (*acc)[32], float* c = nullptr, index_t ldc = 0,
               bool load_c = false, const Prefetch& pf = Prefetch{}) {
  if (rows > 16) {
    if (panels == 2) tile_block<2, 2, NB, NA>(a, lda, plane_bytes, b, steps, acc, c, ldc, load_c, pf);
    else tile_block<2, 1, NB, NA>(a, lda, plane_bytes, b, steps, acc, c, ldc, load_c, pf);
  } else {
    if (panels == 2) tile_block<1, 2, NB, NA>(a, lda, plane_bytes, b, steps, acc, c, ldc, load_c, pf);
    else tile_block<1, 1, NB, NA>(a, lda, plane_bytes, b, steps, acc, c, ldc, load_c, pf);
  }
}

// C's rows [r0, r0 + rows) x columns [j0, j0 + 32) += alpha acc: the first k block also scales the old C by beta
// (or ignores it when beta == 0), the last adds the bias.
CPUFORMER_AMX_SIMD void write_block(const AmxGemm& g, const float (*acc)[32], index_t r0, int rows, index_t j0,
                                  bool first, bool last) {
  const __m512 alpha = _mm512_set1_ps(g.alpha), beta = _mm512_set1_ps(g.beta);
  if (g.c_transposed) {  // each 16 x 16 quarter transposed: C's row j0 + c, its columns r0 .. r0 + 16
    for (int hr = 0; hr * 16 < rows; ++hr) {
      const __mmask16 m = first_n16(rows - 16 * hr);
      const __m512 bias = last && g.bias ? _mm512_maskz_loadu_ps(m, g.bias + r0 + 16 * hr) : _mm512_setzero_ps();
      for (int hc = 0; hc < 2; ++hc) {
        if (j0 + 16 * hc >= g.N) break;
        __m512i t[16];
        for (int i = 0; i < 16; ++i) t[i] = _mm512_loadu_si512(acc[16 * hr + i] + 16 * hc);
        transpose16(t);
        for (int c = 0; c < 16 && j0 + 16 * hc + c < g.N; ++c) {
          float* out = g.C + (j0 + 16 * hc + c) * g.ldc + r0 + 16 * hr;
          __m512 v = _mm512_mul_ps(alpha, _mm512_castsi512_ps(t[c]));
          if (!first) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), v);
          else if (g.beta != 0.0f) v = _mm512_add_ps(v, _mm512_mul_ps(beta, _mm512_maskz_loadu_ps(m, out)));
          _mm512_mask_storeu_ps(out, m, _mm512_add_ps(v, bias));
        }
      }
    }
    return;
  }
  for (int h = 0; h < 2; ++h) {
    const index_t c0 = h * 16;
    if (j0 + c0 >= g.N) break;
    const __mmask16 m = first_n16(g.N - j0 - c0);
    const __m512 bias = last && g.bias ? _mm512_maskz_loadu_ps(m, g.bias + j0 + c0) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      float* c = g.C + (r0 + r) * g.ldc + j0 + c0;
      __m512 v = _mm512_mul_ps(alpha, _mm512_loadu_ps(acc[r] + c0));
      if (!first) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), v);
      else if (g.beta != 0.0f) v = _mm512_add_ps(v, _mm512_mul_ps(beta, _mm512_maskz_loadu_ps(m, c)));
      _mm512_mask_storeu_ps(c, m, _mm512_add_ps(v, bias));
    }
  }
}

}  // namespace

// Measured on 2 cores of a Sapphire Rapids Xeon against the AVX-512 GEMM: 1.2x at 128 x 384 x 1536, 1.55x at
// 2048 x 384 x 1536, even at 512^3, behind below (0.5x at 16 rows); with K >= 1024 ahead from 256 x 256 on
// (1.07-1.1x at 384 x 384 x 2048 and 256 x 256 x 1024, the weight gradients of small layers).
bool amx_float32_applies(index_t M, index_t N, index_t K) {
  return M >= 128 && N >= 128 && K >= 64 && (M >= 1024 || N >= 1024 || K >= 1024) && use_amx();
}

bool amx_bf16_applies(index_t M, index_t N, index_t K) { return M >= 16 && N >= 16 && K >= 16 && use_amx(); }

// Measured against the unswapped products (2 threads): 0.77-0.9x at 96-128 rows (128 x 1152 x 384: 0.27 against
// 0.36 ms; 128 x 30522 x 384: 9.0 against 13.1), 0.91-0.95x at 256 rows; behind at 512 rows, with N < 2M, and at
// 64 rows or fewer once the weights come from memory (64 x 16384 x 1024: 1.5x), where the split is met too few
// times.
bool amx_swapped_applies(index_t M, index_t N, index_t K) {
  return M >= 96 && M <= 256 && N >= 2 * M && K >= 64 && use_amx();
}

// With bf16 weights the unswapped product packs the weights into B tiles on every call and the swapped one reads
// their rows in place: measured (2 threads, weights from memory) 0.72-0.87x the unswapped time at 128 x 128 x 896
// (a Qwen2-0.5B key or value projection), 0.81-0.87x at 256 x 128 x 896, 0.79-0.86x at 256 x 192 x 1024, 0.92x at
// 200 x 200 x 2048; level at 128 x 64 x 896, behind at 256 x 64 x 896 (1.3x).
bool amx_swapped_bf16_applies(index_t M, index_t N, index_t K) {
  return M >= 96 && M <= 256 && 2 * N >= M && K >= 64 && use_amx();
}

namespace {

// The layout of amx_split_b: per k block of kKBlock (the last one shorter), every 32 columns' pair of B tiles in
// order, each pack_b's (pw words for that block's steps); the whole blocks before block k0 / kKBlock take this
// many words each.
index_t split_block_words(index_t N, index_t K) {
  return (N + 31) / 32 * (3 * 2 * ((std::min(K, kKBlock) + kStepK - 1) / kStepK) * kTileWords);
}
template <class Word>
Word* split_block(const AmxGemm& g, Word* tiles, index_t k0) {
  return tiles + k0 / std::min(g.K, kKBlock) * split_block_words(g.N, g.K);
}

}  // namespace

void amx_gemm_share(const AmxGemm& g, index_t r0, index_t r1, index_t n0, index_t n1) {
  if (r0 >= r1 || n0 >= n1) return;
  CPUFORMER_CHECK(!g.prerounded || g.H, "amx_gemm: prerounded needs bf16 weights (H)");
  CPUFORMER_CHECK(!g.tiles || (!g.H && !g.prerounded), "amx_gemm: split tiles hold float32 B");
  CPUFORMER_CHECK(!g.HA || (g.B && !g.H && !g.trans_a && g.K % kStepK == 0),
                  "amx_gemm: bf16 A needs float32 B and K % 32 == 0");
  CPUFORMER_CHECK(!g.planes || (g.K <= kKBlock && !g.H && !g.HA), "amx_gemm: split planes need K <= 512");
  CPUFORMER_CHECK(!g.direct_c || (g.alpha == 1.0f && (g.beta == 0.0f || g.beta == 1.0f) && !g.bias &&
                                  !g.c_transposed && !g.H && !g.HA && !g.prerounded),
                  "amx_gemm: direct C needs alpha 1, beta 0 or 1, float32 terms, no bias");
  const int nb = g.H ? 1 : 3, na = g.prerounded || g.HA ? 1 : 3;
  const index_t kb = std::min(g.K, g.H || g.HA ? kKBlockBf16 : kKBlock);
  const index_t kbp = (kb + kStepK - 1) / kStepK * kStepK, max_steps = kbp / kStepK;
  // Rows split per k block at once (up to kMaxPlaneBytes of planes), so each is split once; per block of kColBlock
  // columns op(B) is packed once per k block and stays in L2 while every 32-row block of the rows meets it.
  // With one column block the split rows are met once: each 32-row block is split just before its tiles instead,
  // into planes that stay in L2 (all rows' planes at once would be written out past L2 and read back).
  const bool just_in_time = !g.planes && n1 - n0 <= kColBlock && (!g.trans_a || g.packed_a);
  const index_t span = just_in_time ? r1 - r0
                                    : std::min(r1 - r0, std::max<index_t>(32, kMaxPlaneBytes / (6 * kbp) / 32 * 32));
  const index_t pair_words = nb * 2 * max_steps * kTileWords;
  auto* planes = g.planes || g.HA
                     ? nullptr
                     : reinterpret_cast<std::uint16_t*>(t_planes.get(3 * (just_in_time ? 32 : span) * kbp / 2));
  auto* b = g.tiles ? nullptr : reinterpret_cast<std::uint32_t*>(t_btiles.get(kColBlock / 32 * pair_words));
  alignas(64) float acc[32][32];
  int configured = 0;  // the rows amx_configure last set here (0: none yet)
  for (index_t rs = r0; rs < r1; rs += span) {
    const index_t rows = std::min(span, r1 - rs);
    for (index_t k0 = 0; k0 < g.K; k0 += kb) {
      const index_t kc = std::min(kb, g.K - k0), kcp = (kc + kStepK - 1) / kStepK * kStepK, steps = kcp / kStepK;
      const index_t lda = kcp * 2, pw = nb * 2 * steps * kTileWords;
      const bool first = k0 == 0, last = k0 + kc == g.K;
      if (!just_in_time && !g.HA && !g.planes) split_a(g, rs, rows, k0, kc, kcp, planes);
      for (index_t jb = n0; jb < n1; jb += kColBlock) {
        const index_t je = std::min(n1, jb + kColBlock), pairs = (je - jb + 31) / 32;
        const std::uint32_t* bb = b;  // the block's pairs, pw words apart
        if (g.tiles) bb = split_block(g, g.tiles, k0) + jb / 32 * pw;  // split already
        else if (g.B && !g.trans_b)
          pack_b_rows(g, jb, je, k0, kc, steps, b, pw);
        else
          for (index_t q = 0; q < pairs; ++q)
            pack_b(g, jb + 32 * q, jb + 32 * q + 16 < je ? 2 : 1, k0, kc, steps, b + q * pw);
        for (index_t m = 0; m < rows; m += 32) {
          const int rb = static_cast<int>(std::min<index_t>(32, rows - m));
          if (rb != configured) amx_configure(rb);  // per call: other code may have used the tiles in between
          configured = rb;
          if (just_in_time && !g.HA) split_a(g, rs + m, rb, k0, kc, kcp, planes);
          const index_t plane_bytes = (g.planes ? g.M : just_in_time ? rb : rows) * kcp * 2;
          const std::uint16_t* a = g.HA       ? g.HA + (rs + m) * g.ldha + k0
                                   : g.planes ? g.planes + (rs + m) * kcp
                                   : just_in_time ? planes
                                                  : planes + m * kcp;
          const index_t a_stride = g.HA ? g.ldha * 2 : lda;
          for (index_t q = 0; q < pairs; ++q) {
            const int panels = jb + 32 * q + 16 < je ? 2 : 1;
            const std::uint32_t* bq = bb + q * pw;
            // C's lines of this block, fetched while the tiles run: write_block's stores otherwise wait on each line
            // in turn (8-17% of a 2048 x 1536 x 384 product)
            if (!g.c_transposed) {
              for (int r = 0; r < rb; ++r) {
                const char* c = reinterpret_cast<const char*>(g.C + (rs + m + r) * g.ldc + jb + 32 * q);
                _mm_prefetch(c, _MM_HINT_T0);
                if (panels == 2) _mm_prefetch(c + 64, _MM_HINT_T0);
              }
            } else {  // C's rows are this block's columns, its columns the block's rows
              const index_t cols = std::min<index_t>(32, g.N - jb - 32 * q);
              for (index_t j = 0; j < cols; ++j) {
                const char* c = reinterpret_cast<const char*>(g.C + (jb + 32 * q + j) * g.ldc + rs + m);
                _mm_prefetch(c, _MM_HINT_T0);
                if (rb > 16) _mm_prefetch(c + 64, _MM_HINT_T0);
              }
            }
            // Direct C: the tiles start from C and are stored back, when the block's columns are whole panels.
            if (g.direct_c && jb + 32 * q + 16 * panels <= g.N) {
              run_block<3>(rb, panels, a, lda, plane_bytes, bq, steps, acc, g.C + (rs + m) * g.ldc + jb + 32 * q,
                           g.ldc, !first || g.beta != 0.0f);
              continue;
            }
            if (g.HA) {
              // bf16 weights read in place: the first of the block's passes would wait on memory for each of its
              // tiles, so each pass fetches its share of the next block's rows into L2 instead.
              Prefetch pf;
              const index_t next = m + 32, next_rows = std::min<index_t>(32, rows - next);
              if (next_rows > 0) {
                const index_t per = (next_rows + pairs - 1) / pairs, r_lo = std::min(next_rows, q * per);
                pf.at = reinterpret_cast<const char*>(g.HA + (rs + next + r_lo) * g.ldha + k0);
                pf.ld = a_stride;
                pf.rows = static_cast<int>(std::min(next_rows, r_lo + per) - r_lo);
              }
              run_block<3, 1>(rb, panels, a, a_stride, plane_bytes, bq, steps, acc, nullptr, 0, false, pf);
            }
            else if (na == 1) run_block<1, 1>(rb, panels, a, lda, plane_bytes, bq, steps, acc);
            else if (nb == 1) run_block<1>(rb, panels, a, lda, plane_bytes, bq, steps, acc);
            else run_block<3>(rb, panels, a, lda, plane_bytes, bq, steps, acc);
            write_block(g, acc, rs + m, rb, jb + 32 * q, first, last);
          }
        }
      }
    }
  }
  if (configured) amx_release();
}

void amx_gemm(const AmxGemm& g, int nt) {
  // Each thread splits its rows of op(A) and packs its columns of op(B), both in proportion to K: so of the ways to
  // cut C into nt shares (row shares x column shares, whole 32-row and 64-column groups) take the one that
  // prepares the fewest elements per thread, M / rows + N / cols.
  const index_t row_groups = (g.M + 31) / 32, col_groups = (g.N + 63) / 64;
  index_t rs = 1, cs = 1;
  double best = -1.0;
  for (index_t r = 1; r <= nt; ++r) {
    if (nt % r != 0 || r > row_groups || nt / r > col_groups) continue;
    const double cost = double(g.M) / r + double(g.N) / (nt / r);
    if (best < 0 || cost < best) best = cost, rs = r, cs = nt / r;
  }
  if (rs * cs == 1) return amx_gemm_share(g, 0, g.M, 0, g.N);
  parallel_for(rs * cs, 1, [&](index_t s0, index_t s1, int) {
    for (index_t s = s0; s < s1; ++s) {
      const index_t c = s % cs, r = s / cs;
      amx_gemm_share(g, std::min(g.M, row_groups * r / rs * 32), std::min(g.M, row_groups * (r + 1) / rs * 32),
                     std::min(g.N, col_groups * c / cs * 64), std::min(g.N, col_groups * (c + 1) / cs * 64));
    }
  });
}

index_t amx_split_b_words(index_t N, index_t K) {
  const index_t kb = std::min(K, kKBlock);
  return (K + kb - 1) / kb * split_block_words(N, K);
}

// Columns [32 q0, 32 q1) of amx_split_b's tiles on the calling thread.
static void split_b_pairs(const AmxGemm& g, std::uint32_t* dst, index_t q0, index_t q1) {
  const index_t kb = std::min(g.K, kKBlock);
  for (index_t k0 = 0; k0 < g.K; k0 += kb) {
    const index_t kc = std::min(kb, g.K - k0), steps = (kc + kStepK - 1) / kStepK, pw = 3 * 2 * steps * kTileWords;
    std::uint32_t* block = split_block(g, dst, k0);
    if (g.B && !g.trans_b) {
      pack_b_rows(g, 32 * q0, std::min(g.N, 32 * q1), k0, kc, steps, block + q0 * pw, pw);
    } else {
      for (index_t q = q0; q < q1; ++q) pack_b(g, 32 * q, 32 * q + 16 < g.N ? 2 : 1, k0, kc, steps, block + q * pw);
    }
  }
}

void amx_split_b(const AmxGemm& g, std::uint32_t* dst) {
  CPUFORMER_CHECK(!g.H && !g.tiles, "amx_split_b: float32 B only");
  parallel_for((g.N + 31) / 32, 8, [&](index_t q0, index_t q1, int) { split_b_pairs(g, dst, q0, q1); });
}

void amx_split_b_here(const AmxGemm& g, std::uint32_t* dst) {
  CPUFORMER_CHECK(!g.H && !g.tiles, "amx_split_b: float32 B only");
  split_b_pairs(g, dst, 0, (g.N + 31) / 32);
}

CPUFORMER_AMX_SIMD bool amx_all_finite(const float* x, index_t rows, index_t cols, index_t ld) {
  __mmask16 bad = 0;
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; c += 16) {
      const __mmask16 m = first_n16(cols - c);
      bad |= _mm512_mask_fpclass_ps_mask(m, _mm512_maskz_loadu_ps(m, x + r * ld + c), 0x99);  // inf or NaN
    }
  return bad == 0;
}

// exp(x - m) of the lanes in mask, zeros elsewhere (exp of a masked-off lane's 0 - m would not be 0).
CPUFORMER_AMX_SIMD static inline __attribute__((always_inline)) __m512 masked_exp(const float* x, __mmask16 mask,
                                                                               __m512 m) {
  return _mm512_maskz_mov_ps(mask, simd::exp512_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x), m)));
}

CPUFORMER_AMX_SIMD void amx_exp_split(const float* S, index_t lds, index_t rows, index_t n, const float* shift,
                                     std::uint16_t* planes, float* sums, bool finite_b) {
  CPUFORMER_CHECK(n <= kKBlock, "amx_exp_split: at most 512 columns");
  const index_t kcp = (n + kStepK - 1) / kStepK * kStepK;
  std::uint16_t* plane[3] = {planes, planes + rows * kcp, planes + 2 * rows * kcp};
  for (index_t i = 0; i < rows; ++i) {
    const float* x = S + i * lds;
    if (shift[i] == -std::numeric_limits<float>::infinity()) {  // nothing visible: P = 0
      for (int t = 0; t < 3; ++t)
        for (index_t k = 0; k < kcp; k += 32) _mm512_store_si512(plane[t] + i * kcp + k, _mm512_setzero_si512());
      sums[i] = 0.0f;
      continue;
    }
    const __m512 m = _mm512_set1_ps(shift[i]);
    const bool simple = finite_b && std::isfinite(shift[i]);
    __m512 acc_lo = _mm512_setzero_ps(), acc_hi = _mm512_setzero_ps();  // two chains, not one
    __m512i t[3];
    for (index_t k = 0; k < kcp; k += 32) {
      const __mmask16 lo = first_n16(n - k), hi = first_n16(n - k - 16);
      const __m512 e_lo = masked_exp(x + k, lo, m), e_hi = masked_exp(x + k + 16, hi, m);
      acc_lo = _mm512_add_ps(acc_lo, e_lo);
      acc_hi = _mm512_add_ps(acc_hi, e_hi);
      if (simple) split3_32_finite(e_lo, e_hi, t);  // P finite, V finite
      else split3_32(e_lo, e_hi, t);
      for (int p = 0; p < 3; ++p) _mm512_store_si512(plane[p] + i * kcp + k, t[p]);
    }
    sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo, acc_hi));
  }
}

index_t amx_split_a_words(index_t M, index_t K) { return 3 * M * ((K + kStepK - 1) / kStepK * kStepK); }

void amx_split_a(const AmxGemm& g, std::uint16_t* dst) {
  CPUFORMER_CHECK(g.K <= kKBlock && !g.prerounded && !g.HA && !g.packed_a, "amx_split_a: float32 A, K <= 512");
  split_a(g, 0, g.M, 0, g.K, (g.K + kStepK - 1) / kStepK * kStepK, dst);
}

#else  // no AMX in this build: never applies

bool amx_float32_applies(index_t, index_t, index_t) { return false; }
bool amx_bf16_applies(index_t, index_t, index_t) { return false; }
bool amx_swapped_applies(index_t, index_t, index_t) { return false; }
bool amx_swapped_bf16_applies(index_t, index_t, index_t) { return false; }
void amx_gemm_share(const AmxGemm&, index_t, index_t, index_t, index_t) {}
void amx_gemm(const AmxGemm&, int) {}
index_t amx_split_b_words(index_t, index_t) { return 0; }
void amx_split_b(const AmxGemm&, std::uint32_t*) {}
void amx_split_b_here(const AmxGemm&, std::uint32_t*) {}
index_t amx_split_a_words(index_t, index_t) { return 0; }
void amx_split_a(const AmxGemm&, std::uint16_t*) {}
void amx_exp_split(const float*, index_t, index_t, index_t, const float*, std::uint16_t*, float*, bool) {}
bool amx_all_finite(const float*, index_t, index_t, index_t) { return true; }

#endif

}  // namespace cpuformer::detail
