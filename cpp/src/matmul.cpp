// matmul.cpp: single-precision GEMM, C = alpha * op(A) * op(B) + beta * C + bias.
//
// Structure (GotoBLAS/BLIS "five loops around a micro-kernel", see shared design note kernels.md section 1):
//   for jc (NC columns of C)        B panel kc x nc packed once per (jc, pc), shared by all threads (L3)
//     for pc (KC of the K dimension)
//       for ic (MC rows, split over threads)   A block mc x kc packed per thread (L2)
//         for jr (NR-wide B slivers, L1) / for ir (MR-tall A slivers): 6x16 micro-kernel in registers
//         (AVX-512 path: 12x32 tiles, i.e. pairs of the same 16-wide B slivers by pairs of 6-row A slivers)
// Transposes are absorbed by the pack routines; the micro-kernel only sees packed, zero-padded panels, so any
// M, N, K (1 and odd sizes included) runs the same full-tile kernel and edges are cut at write-back.
#include "cpuformer/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "amx_internal.h"
#include "gemm_internal.h"
#include "parallel.h"
#include "simd.h"

namespace cpuformer {
namespace {

constexpr int MR = 6;    // micro-tile rows (broadcasts of A)
constexpr int NR = 16;   // micro-tile columns (two 8-float vectors of B)
constexpr index_t KC = detail::kGemmKC;  // 256: B sliver KC x NR = 16 KiB, half of L1d
constexpr index_t MC = 144;   // A block MC x KC = 144 KiB in a 512 KiB L2
constexpr index_t NC = 4080;  // B panel KC x NC = 4 MiB in L3 (amx.cpp's kPackedNc reads these panels)
// AVX-512 path (Sapphire Rapids: 48 KiB L1d, 2 MiB L2 per core). NC stays that of the AVX2 path. K blocks of
// KC_AVX512 = 512 when it packs B itself, and in the PackedMatrix panels sgemm_pack_b cuts while it is the path in
// use (PackedMatrix::kc records the cut; either path reads either cut): half the read-modify-write passes over C, one
// K block for K = 384/512 layers (+3..17% on 2 threads for the feed-forward and MiniLM shapes). So for K > 256 the
// two paths cut each element's sum at different places and round differently (tests: float64 reference there,
// bitwise at K <= 256 and for one PackedMatrix). Attention's blocks (pack_b, sgemm_single_thread_packed) keep KC.
// MC: 96 to 384 measured the same within noise on 2 threads (1024^3, 4096x3072x768, 4096x768x3072, 2048^3).
constexpr index_t MC_AVX512 = 144;
// K block of the AVX-512 path when it packs B itself (B panels from pack_b / PackedMatrix keep KC: their layout).
#ifndef CPUFORMER_KC_AVX512
#define CPUFORMER_KC_AVX512 512
#endif
constexpr index_t KC_AVX512 = CPUFORMER_KC_AVX512;

// Below this many multiply-adds per thread a GEMM runs on fewer threads: waking a parked worker (tens of
// microseconds on a VM) costs more than a small product takes.
constexpr index_t kMinMacsPerThread = 64 * 64 * 64 + 1;  // 64^3 and below: one thread (as OpenBLAS)
// At or below this many multiply-adds the A operand is read in place instead of packed.
constexpr index_t kDirectMaxMacs = 128 * 128 * 128;

thread_local detail::AlignedBuffer t_pack_a;
thread_local detail::AlignedBuffer t_pack_b;

struct GemmArgs {
  bool trans_a, trans_b;
  index_t M, N, K;
  float alpha;
  const float* A;
  index_t lda;
  const float* B;
  index_t ldb;
  float beta;
  float* C;
  index_t ldc;
  const float* bias;
  bool prefer_direct_a = false;  // A is a small tile already in cache (attention): never pack it
};

// ---------------------------------------------------------------------------------------------------------------
// Packing. A sliver: for each k, MR consecutive rows (dst[k*MR + r]). B sliver: for each k, NR consecutive columns
// (dst[k*NR + c]). Rows/columns past the edge are zero so the kernel always computes a full tile.

void pack_a_sliver_scalar(float* d, const GemmArgs& g, index_t i0, index_t p0, index_t kc, int mr) {
  if (g.trans_a) {  // op(A)[i, k] = A[k, i]: the MR values of one k are contiguous
    for (index_t k = 0; k < kc; ++k) {
      const float* src = g.A + (p0 + k) * g.lda + i0;
      int r = 0;
      for (; r < mr; ++r) d[k * MR + r] = src[r];
      for (; r < MR; ++r) d[k * MR + r] = 0.0f;
    }
  } else {  // op(A)[i, k] = A[i, k]: gather MR row streams
    const float* rows[MR];
    for (int r = 0; r < MR; ++r) rows[r] = g.A + (i0 + std::min(r, mr - 1)) * g.lda + p0;
    for (index_t k = 0; k < kc; ++k) {
      for (int r = 0; r < MR; ++r) d[k * MR + r] = r < mr ? rows[r][k] : 0.0f;
    }
  }
}

#ifdef CPUFORMER_HAVE_AVX2
// Transpose the 8x8 block whose rows are r0..r7 and store its row j (column j of the input) 8 wide at o + j * step,
// in ascending j: with step < 8 each store overwrites the previous one's tail (the A packing relies on this).
CPUFORMER_AVX2 static inline void transpose8x8_store(float* o, index_t step, __m256 r0, __m256 r1, __m256 r2,
                                                     __m256 r3, __m256 r4, __m256 r5, __m256 r6, __m256 r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(o + 0 * step, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(o + 1 * step, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(o + 2 * step, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(o + 3 * step, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(o + 4 * step, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(o + 5 * step, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(o + 6 * step, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(o + 7 * step, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// Full slivers only. A^T: the 6 values of one k are contiguous (a 4-float and a 2-float move). A: 8 k-values of
// each of the 6 rows, transposed in registers as an 8x8 block with two zero rows; each transposed row is stored
// 8 wide at a 6-float step, so the next store overwrites its 2 zero lanes and the last one writes 2 floats past
// the block's 48 (the caller's buffer has kPackASlack for the final sliver).
CPUFORMER_AVX2 static void pack_a_sliver_avx2(float* d, const GemmArgs& g, index_t i0, index_t p0, index_t kc) {
  static_assert(MR == 6, "the transposes below are written for 6-row slivers");
  if (g.trans_a) {
    const float* src = g.A + p0 * g.lda + i0;
    for (index_t k = 0; k < kc; ++k, src += g.lda) {
      _mm_storeu_ps(d + k * MR, _mm_loadu_ps(src));
      // 64-bit moves through the unaligned-safe integer forms (_mm_load_sd would dereference a misaligned double*).
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d + k * MR + 4),
                       _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 4)));
    }
    return;
  }
  const float* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = g.A + (i0 + r) * g.lda + p0;
  index_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    const __m256 zero = _mm256_setzero_ps();
    transpose8x8_store(d + k * MR, MR, _mm256_loadu_ps(rows[0] + k), _mm256_loadu_ps(rows[1] + k),
                       _mm256_loadu_ps(rows[2] + k), _mm256_loadu_ps(rows[3] + k), _mm256_loadu_ps(rows[4] + k),
                       _mm256_loadu_ps(rows[5] + k), zero, zero);
  }
  for (; k < kc; ++k)
    for (int r = 0; r < MR; ++r) d[k * MR + r] = rows[r][k];
}
#endif

// Floats past an A block that pack_a_block may write (the AVX2 transpose's last overlapping store).
constexpr index_t kPackASlack = 8;

void pack_a_block(float* dst, const GemmArgs& g, index_t i0, index_t p0, index_t mc, index_t kc) {
  for (index_t s = 0; s < mc; s += MR) {
    const int mr = static_cast<int>(std::min<index_t>(MR, mc - s));
#ifdef CPUFORMER_HAVE_AVX2
    if (mr == MR && detail::use_avx2()) {
      pack_a_sliver_avx2(dst + s * kc, g, i0 + s, p0, kc);
      continue;
    }
#endif
    pack_a_sliver_scalar(dst + s * kc, g, i0 + s, p0, kc, mr);
  }
}

void pack_b_sliver_scalar(float* d, const GemmArgs& g, index_t p0, index_t j0, index_t kc, int nr) {
  if (g.trans_b) {  // op(B)[k, j] = B[j, k]: each column j is a contiguous run along k
    for (int c = 0; c < NR; ++c) {
      if (c < nr) {
        const float* src = g.B + (j0 + c) * g.ldb + p0;
        for (index_t k = 0; k < kc; ++k) d[k * NR + c] = src[k];
      } else {
        for (index_t k = 0; k < kc; ++k) d[k * NR + c] = 0.0f;
      }
    }
  } else {  // op(B)[k, j] = B[k, j]: NR contiguous floats per k
    for (index_t k = 0; k < kc; ++k) {
      const float* src = g.B + (p0 + k) * g.ldb + j0;
      int c = 0;
      for (; c < nr; ++c) d[k * NR + c] = src[c];
      for (; c < NR; ++c) d[k * NR + c] = 0.0f;
    }
  }
}

#ifdef CPUFORMER_HAVE_AVX2
// Transposed B (the forward of a Linear layer, W^T): load 8 k-values from each of 8 columns, transpose the 8x8
// block in registers, store 8 rows of the sliver. Edges fall back to the scalar routine.
CPUFORMER_AVX2 static void transpose8_store(float* d, const float* const* src, index_t k, int col0) {
  transpose8x8_store(d + k * NR + col0, NR, _mm256_loadu_ps(src[0] + k), _mm256_loadu_ps(src[1] + k),
                     _mm256_loadu_ps(src[2] + k), _mm256_loadu_ps(src[3] + k), _mm256_loadu_ps(src[4] + k),
                     _mm256_loadu_ps(src[5] + k), _mm256_loadu_ps(src[6] + k), _mm256_loadu_ps(src[7] + k));
}

#ifdef CPUFORMER_HAVE_AVX512
// Transposed B on the AVX-512 path: 16 k-values of each of the sliver's 16 columns (rows of B), transposed as one
// 16x16 block (64 shuffles per 256 floats; the AVX2 8x8 route takes 96), stored as 16 whole k rows of the sliver.
// Returns how many k were packed (a multiple of 16); the caller packs the rest. Same layout as the AVX2 routine.
// (GCC 12 flags _mm512_undefined_ps() inside the shuffle intrinsics as "maybe uninitialized": a false positive.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
CPUFORMER_AVX512 static index_t pack_b_t16_avx512(float* d, const float* src, index_t ldb, index_t kc) {
  index_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    __m512 t[16], u[16];
#pragma GCC unroll 8
    for (int c = 0; c < 16; c += 2) {
      const __m512 r0 = _mm512_loadu_ps(src + c * ldb + k), r1 = _mm512_loadu_ps(src + (c + 1) * ldb + k);
      t[c] = _mm512_unpacklo_ps(r0, r1);  // per 128-bit lane L: r0[4L] r1[4L] r0[4L+1] r1[4L+1]
      t[c + 1] = _mm512_unpackhi_ps(r0, r1);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 16; q += 4) {  // u[q + c], lane L: rows q..q+3 of column 4L + c
      u[q + 0] = _mm512_shuffle_ps(t[q], t[q + 2], 0x44);
      u[q + 1] = _mm512_shuffle_ps(t[q], t[q + 2], 0xEE);
      u[q + 2] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0x44);
      u[q + 3] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 v = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), w = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
      const __m512 x = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const __m512 y = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      _mm512_storeu_ps(d + (k + c) * NR, _mm512_shuffle_f32x4(v, x, 0x88));
      _mm512_storeu_ps(d + (k + 4 + c) * NR, _mm512_shuffle_f32x4(v, x, 0xDD));
      _mm512_storeu_ps(d + (k + 8 + c) * NR, _mm512_shuffle_f32x4(w, y, 0x88));
      _mm512_storeu_ps(d + (k + 12 + c) * NR, _mm512_shuffle_f32x4(w, y, 0xDD));
    }
  }
  return k;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

CPUFORMER_AVX2 static void pack_b_sliver_avx2(float* d, const GemmArgs& g, index_t p0, index_t j0, index_t kc,
                                              int nr) {
  if (!g.trans_b) {
    if (nr == NR) {
      for (index_t k = 0; k < kc; ++k) {
        const float* src = g.B + (p0 + k) * g.ldb + j0;
        _mm256_store_ps(d + k * NR, _mm256_loadu_ps(src));
        _mm256_store_ps(d + k * NR + 8, _mm256_loadu_ps(src + 8));
      }
      return;
    }
    pack_b_sliver_scalar(d, g, p0, j0, kc, nr);
    return;
  }
  if (nr != NR) {
    pack_b_sliver_scalar(d, g, p0, j0, kc, nr);
    return;
  }
  const float* src[NR];
  for (int c = 0; c < NR; ++c) src[c] = g.B + (j0 + c) * g.ldb + p0;
  index_t k = 0;
#ifdef CPUFORMER_HAVE_AVX512
  if (detail::use_avx512()) k = pack_b_t16_avx512(d, src[0], g.ldb, kc);
#endif
  for (; k + 8 <= kc; k += 8) {
    transpose8_store(d, src, k, 0);
    transpose8_store(d, src + 8, k, 8);
  }
  for (; k < kc; ++k)
    for (int c = 0; c < NR; ++c) d[k * NR + c] = src[c][k];
}
#endif

void pack_b_sliver(float* d, const GemmArgs& g, index_t p0, index_t j0, index_t kc, int nr) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return pack_b_sliver_avx2(d, g, p0, j0, kc, nr);
#endif
  pack_b_sliver_scalar(d, g, p0, j0, kc, nr);
}

#ifdef CPUFORMER_HAVE_AVX2
// Untransposed B, full slivers [s0, s1) of a panel (sliver s at d + s * NR * kc, columns j0 + s * NR on): walk the
// source row by row, copying up to kRowGroup slivers' worth of each row (512 contiguous bytes), rather than sliver
// by sliver (64 bytes per row, a new page every other row for wide B). Same layout as pack_b_sliver.
CPUFORMER_AVX2 static void pack_b_rows_avx2(float* d, const GemmArgs& g, index_t p0, index_t j0, index_t kc,
                                            index_t s0, index_t s1) {
  constexpr index_t kRowGroup = 8;
  for (index_t sg = s0; sg < s1; sg += kRowGroup) {
    const index_t ns = std::min(kRowGroup, s1 - sg);
    const float* src = g.B + p0 * g.ldb + j0 + sg * NR;
    float* dst = d + sg * NR * kc;
    for (index_t k = 0; k < kc; ++k, src += g.ldb) {
      for (index_t q = 0; q < ns; ++q) {
        float* o = dst + q * NR * kc + k * NR;
        _mm256_store_ps(o, _mm256_loadu_ps(src + q * NR));
        _mm256_store_ps(o + 8, _mm256_loadu_ps(src + q * NR + 8));
      }
    }
  }
}
#endif

// Slivers [s0, s1) of the B panel at rows p0.., columns j0.. (nc wide), each at d + s * NR * kc.
void pack_b_slivers(float* d, const GemmArgs& g, index_t p0, index_t j0, index_t kc, index_t nc, index_t s0,
                    index_t s1) {
#ifdef CPUFORMER_HAVE_AVX2
  const index_t full = nc / NR;  // slivers with all NR columns
  if (!g.trans_b && detail::use_avx2() && s0 < std::min(s1, full)) {
    pack_b_rows_avx2(d, g, p0, j0, kc, s0, std::min(s1, full));
    s0 = std::min(s1, full);
  }
#endif
  for (index_t s = s0; s < s1; ++s)
    pack_b_sliver(d + s * NR * kc, g, p0, j0 + s * NR, kc, static_cast<int>(std::min<index_t>(NR, nc - s * NR)));
}

// ---------------------------------------------------------------------------------------------------------------
// Micro-kernels: acc[MR x NR] = sum_k a[k, :] outer b[k, :], then C = alpha * acc + beta * C (+ bias), only the
// top-left mr x nr of the tile is written. beta == 0 never reads C.

void tile_writeback(const float* acc, float* c, index_t ldc, float alpha, float beta, const float* bias, int mr,
                    int nr) {
  for (int r = 0; r < mr; ++r) {
    for (int j = 0; j < nr; ++j) {
      float v = alpha * acc[r * NR + j];
      if (beta != 0.0f) v += beta * c[r * ldc + j];
      if (bias) v += bias[j];
      c[r * ldc + j] = v;
    }
  }
}

void kernel_scalar(index_t kc, const float* a, const float* b, float* c, index_t ldc, float alpha, float beta,
                   const float* bias, int mr, int nr) {
  float acc[MR * NR] = {};
  for (index_t k = 0; k < kc; ++k) {
    for (int r = 0; r < MR; ++r) {
      const float ar = a[k * MR + r];
      for (int j = 0; j < NR; ++j) acc[r * NR + j] += ar * b[k * NR + j];
    }
  }
  tile_writeback(acc, c, ldc, alpha, beta, bias, mr, nr);
}

#ifdef CPUFORMER_HAVE_AVX2
CPUFORMER_AVX2 static inline void row_writeback(float* c, __m256 x0, __m256 x1, __m256 alpha, float beta,
                                                __m256 bias0, __m256 bias1) {
  x0 = _mm256_fmadd_ps(x0, alpha, bias0);
  x1 = _mm256_fmadd_ps(x1, alpha, bias1);
  if (beta != 0.0f) {
    const __m256 vb = _mm256_set1_ps(beta);
    x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), x0);
    x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), x1);
  }
  _mm256_storeu_ps(c, x0);
  _mm256_storeu_ps(c + 8, x1);
}

// 12 named accumulators (an indexed array made GCC spill them to the stack on every k step).
// Element (r, k) of the A sliver is a[r * rs + k * ks]: packed slivers have rs = 1, ks = MR; small problems read
// A in place (rs = lda, ks = 1 for A, or rs = 1, ks = lda for A^T). Rows past mr are clamped, never read.
CPUFORMER_AVX2 __attribute__((always_inline)) static inline void kernel_avx2_body(
    index_t kc, const float* a, index_t rs, index_t ks, const float* b, float* c, index_t ldc, float alpha,
    float beta, const float* bias, int mr, int nr) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  // C is revisited once per K block and usually comes from memory: start loading the tile now (as BLIS does).
  for (int r = 0; r < mr; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + NR - 1), _MM_HINT_T0);
  }
  const float* a0 = a;
  const float* a1 = a + std::min(1, mr - 1) * rs;
  const float* a2 = a + std::min(2, mr - 1) * rs;
  const float* a3 = a + std::min(3, mr - 1) * rs;
  const float* a4 = a + std::min(4, mr - 1) * rs;
  const float* a5 = a + std::min(5, mr - 1) * rs;
#pragma GCC unroll 4
  for (index_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    const index_t o = k * ks;
    if (ks == MR) _mm_prefetch(reinterpret_cast<const char*>(a + o + 8 * MR), _MM_HINT_T0);
    __m256 av = _mm256_broadcast_ss(a0 + o);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a1 + o);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a2 + o);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a3 + o);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a4 + o);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a5 + o);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
    b += NR;
  }
  if (mr == MR && nr == NR) {
    const __m256 va = _mm256_set1_ps(alpha);
    const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    row_writeback(c + 0 * ldc, c00, c01, va, beta, bias0, bias1);
    row_writeback(c + 1 * ldc, c10, c11, va, beta, bias0, bias1);
    row_writeback(c + 2 * ldc, c20, c21, va, beta, bias0, bias1);
    row_writeback(c + 3 * ldc, c30, c31, va, beta, bias0, bias1);
    row_writeback(c + 4 * ldc, c40, c41, va, beta, bias0, bias1);
    row_writeback(c + 5 * ldc, c50, c51, va, beta, bias0, bias1);
    return;
  }
  alignas(32) float acc[MR * NR];
  _mm256_store_ps(acc + 0 * NR, c00), _mm256_store_ps(acc + 0 * NR + 8, c01);
  _mm256_store_ps(acc + 1 * NR, c10), _mm256_store_ps(acc + 1 * NR + 8, c11);
  _mm256_store_ps(acc + 2 * NR, c20), _mm256_store_ps(acc + 2 * NR + 8, c21);
  _mm256_store_ps(acc + 3 * NR, c30), _mm256_store_ps(acc + 3 * NR + 8, c31);
  _mm256_store_ps(acc + 4 * NR, c40), _mm256_store_ps(acc + 4 * NR + 8, c41);
  _mm256_store_ps(acc + 5 * NR, c50), _mm256_store_ps(acc + 5 * NR + 8, c51);
  tile_writeback(acc, c, ldc, alpha, beta, bias, mr, nr);
}

CPUFORMER_AVX2 static void kernel_avx2(index_t kc, const float* a, const float* b, float* c, index_t ldc,
                                       float alpha, float beta, const float* bias, int mr, int nr) {
  kernel_avx2_body(kc, a, 1, MR, b, c, ldc, alpha, beta, bias, mr, nr);
}

CPUFORMER_AVX2 static void kernel_avx2_direct(index_t kc, const float* a, index_t rs, index_t ks, const float* b,
                                              float* c, index_t ldc, float alpha, float beta, const float* bias,
                                              int mr, int nr) {
  kernel_avx2_body(kc, a, rs, ks, b, c, ldc, alpha, beta, bias, mr, nr);
}
#endif

#ifdef CPUFORMER_HAVE_AVX512
// ---------------------------------------------------------------------------------------------------------------
// AVX-512 micro-kernel: a tile of MA groups of MR = 6 rows (MA = 1, 2) by NB B slivers of NR = 16 columns (NB = 1, 2),
// 12 x 32 when whole: 24 zmm accumulators, per k two zmm loads of B (one per sliver) and 12 broadcast FMAs per B
// load pair. It reads the very panels the AVX2 kernel does (6-row A slivers, 16-wide B slivers: packed layouts,
// PackedMatrix and attention's packed blocks are shared by both paths), a 12 x 32 tile being two A slivers times two
// B slivers. Each element is accumulated from zero by one FMA per k in ascending k, exactly as in kernel_avx2_body,
// and written back per 6 x 16 sub-tile with the AVX2 path's arithmetic (fused for a whole sub-tile, tile_writeback's
// for a cut one): with the same KC the two paths give bitwise identical results.
//
// A: group g's row r is at a_g + r * rs + k * ks. PACKED: a packed sliver (rs = 1, ks = MR, rows past the edge are
// zeros, so all 6 rows are read at constant offsets); otherwise A in place, rows past mr clamped (never read past).

template <bool kFull>
CPUFORMER_AVX512 static inline void row_writeback_512(float* c, __m512 x, __m512 va, float beta, const float* bias,
                                                      __mmask16 m) {
  if (kFull) {  // as row_writeback: alpha * acc + bias fused, then beta * c fused
    x = _mm512_fmadd_ps(x, va, bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps());
    if (beta != 0.0f) x = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_loadu_ps(c), x);
    _mm512_storeu_ps(c, x);
  } else {  // as tile_writeback: v = alpha * acc; v += beta * c; v += bias, each rounded
    x = _mm512_mul_ps(x, va);
    if (beta != 0.0f) x = _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(m, c)));
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias));
    _mm512_mask_storeu_ps(c, m, x);
  }
}

template <int MA, int NB, bool PACKED, bool PREFETCH_A = false>
CPUFORMER_AVX512 __attribute__((always_inline)) static inline void kernel_avx512_body(
    index_t kc, const float* a0, const float* a1, index_t rs, index_t ks, const float* b0, const float* b1, float* c,
    index_t ldc, float alpha, float beta, const float* bias, int mr, int nr) {
  constexpr int R = MA * MR;
  __m512 acc[R][NB];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < NB; ++h) acc[r][h] = _mm512_setzero_ps();
  for (int r = 0; r < mr; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + NB * NR - 1), _MM_HINT_T0);
  }
  const float* ap[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const int rr = PACKED ? r % MR : std::min(r, mr - 1) - (r / MR) * MR;
    ap[r] = (r < MR ? a0 : a1) + rr * rs;
  }
#pragma GCC unroll 4
  for (index_t k = 0; k < kc; ++k) {
    // Unaligned loads: pack_b's callers promise 32-byte alignment only (64 in practice: free on aligned data).
    const __m512 bv0 = _mm512_loadu_ps(b0 + k * NR);
    const __m512 bv1 = NB == 2 ? _mm512_loadu_ps(b1 + k * NR) : bv0;
    if (PACKED) {
      _mm_prefetch(reinterpret_cast<const char*>(a0 + k * MR + 8 * MR), _MM_HINT_T0);
      if (MA == 2) _mm_prefetch(reinterpret_cast<const char*>(a1 + k * MR + 8 * MR), _MM_HINT_T0);
    }
    if (PREFETCH_A && k % 16 == 0) {  // A rows along k from memory (gemm_wide_bt's W): 12 streams, 4 lines ahead
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(ap[r] + (k + 64) * ks), _MM_HINT_T0);
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(PACKED ? (r < MR ? a0 : a1)[k * MR + r % MR] : ap[r][k * ks]);
      acc[r][0] = _mm512_fmadd_ps(av, bv0, acc[r][0]);
      if (NB == 2) acc[r][NB - 1] = _mm512_fmadd_ps(av, bv1, acc[r][NB - 1]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 2
  for (int h = 0; h < NB; ++h) {
    const int nrh = std::min(NR, nr - h * NR);
    if (nrh <= 0) break;
    const __mmask16 m = static_cast<__mmask16>((1u << nrh) - 1u);
    const float* bh = bias ? bias + h * NR : nullptr;
#pragma GCC unroll 2
    for (int g = 0; g < MA; ++g) {
      const int mrg = std::min(MR, mr - g * MR);
      if (mrg <= 0) break;
      float* cg = c + g * MR * ldc + h * NR;
      if (mrg == MR && nrh == NR) {
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) row_writeback_512<true>(cg + r * ldc, acc[g * MR + r][h], va, beta, bh, m);
      } else {
        for (int r = 0; r < mrg; ++r) {
          // acc[..][h] with a runtime r would force the array to memory; select by a switch over constants.
          __m512 x = acc[g * MR][h];
#pragma GCC unroll 6
          for (int q = 1; q < MR; ++q)
            if (q == r) x = acc[g * MR + q][h];
          row_writeback_512<false>(cg + r * ldc, x, va, beta, bh, m);
        }
      }
    }
  }
}

template <int MA, int NB>
CPUFORMER_AVX512 static void kernel_avx512(index_t kc, const float* a0, const float* b0, float* c, index_t ldc,
                                           float alpha, float beta, const float* bias, int mr, int nr) {
  // Packed: the second A sliver follows the first (kc * MR floats on), the second B sliver likewise (kc * NR).
  kernel_avx512_body<MA, NB, true>(kc, a0, a0 + kc * MR, 1, MR, b0, b0 + kc * NR, c, ldc, alpha, beta, bias, mr, nr);
}

template <int MA, int NB>
CPUFORMER_AVX512 static void kernel_avx512_direct(index_t kc, const float* a0, index_t rs, index_t ks,
                                                  const float* b0, float* c, index_t ldc, float alpha, float beta,
                                                  const float* bias, int mr, int nr) {
  kernel_avx512_body<MA, NB, false>(kc, a0, a0 + MR * rs, rs, ks, b0, b0 + kc * NR, c, ldc, alpha, beta, bias, mr,
                                    nr);
}

// The same reading A's rows (ks == 1) from memory: each row's next lines fetched ahead (gemm_wide_bt).
template <int MA, int NB>
CPUFORMER_AVX512 static void kernel_avx512_direct_rows(index_t kc, const float* a0, index_t rs, index_t ks,
                                                       const float* b0, float* c, index_t ldc, float alpha, float beta,
                                                       const float* bias, int mr, int nr) {
  kernel_avx512_body<MA, NB, false, true>(kc, a0, a0 + MR * rs, rs, ks, b0, b0 + kc * NR, c, ldc, alpha, beta, bias,
                                          mr, nr);
}

using Kernel512Fn = void (*)(index_t, const float*, const float*, float*, index_t, float, float, const float*, int,
                             int);
using Kernel512DirectFn = void (*)(index_t, const float*, index_t, index_t, const float*, float*, index_t, float,
                                   float, const float*, int, int);
constexpr Kernel512Fn kKernels512[2][2] = {{kernel_avx512<1, 1>, kernel_avx512<1, 2>},
                                           {kernel_avx512<2, 1>, kernel_avx512<2, 2>}};
constexpr Kernel512DirectFn kKernels512Direct[2][2] = {
    {kernel_avx512_direct<1, 1>, kernel_avx512_direct<1, 2>},
    {kernel_avx512_direct<2, 1>, kernel_avx512_direct<2, 2>}};
constexpr Kernel512DirectFn kKernels512DirectRows[2][2] = {
    {kernel_avx512_direct_rows<1, 1>, kernel_avx512_direct_rows<1, 2>},
    {kernel_avx512_direct_rows<2, 1>, kernel_avx512_direct_rows<2, 2>}};
#endif

using KernelFn = void (*)(index_t, const float*, const float*, float*, index_t, float, float, const float*, int, int);

KernelFn select_kernel() {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2()) return kernel_avx2;
#endif
  return kernel_scalar;
}

// ---------------------------------------------------------------------------------------------------------------
// The blocked driver, run by every thread of a team (tid of nt). b_panel is shared by the team.

// A barrier of the GEMM's own team. With nt == 1 it must do nothing: an orphaned `omp barrier` binds to whatever
// team encloses the call (the batch loop of sgemm_strided_batched runs single-threaded GEMMs inside one).
inline void team_barrier(int nt) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp barrier
  }
#else
  (void)nt;
#endif
}

// b_panels holds two panels: the team packs the next K block into one while stragglers may still read the other,
// so one barrier per K block suffices.
// With `prepacked` (sgemm_pack_b's layout: the (jc, pc) panels in loop order) B is read as given: no packing, and
// no barrier, since nothing is written that another thread reads.
void gemm_team(const GemmArgs& g, float* b_panels, index_t panel_size, int tid, int nt,
               const float* prepacked = nullptr, index_t prepacked_kc = KC) {
  const KernelFn kernel = select_kernel();
#ifdef CPUFORMER_HAVE_AVX512
  const bool avx512 = detail::use_avx512();
#else
  const bool avx512 = false;
#endif
  // Row blocks a multiple of the tile height (AVX-512: two A slivers), so only the last 6-row group of M can be cut,
  // on either path (their results stay identical).
  const index_t tile_m = avx512 ? 2 * MR : MR;
  const index_t mc_max = avx512 ? MC_AVX512 : MC;
  // Split the rows when there are at least as many rows as columns (and a block of rows per thread): each thread
  // takes an even share counted in whole tiles (tile_m rows; only M's last tile can be cut), cut into blocks of at
  // most mc_max rows, each a multiple of tile_m. Otherwise (N >= M: wide products, short M) every thread takes all
  // rows and an even share of the B slivers, which it packs itself (no barrier) and keeps in its own L2: +4..15% on
  // 2 threads for 256x1024x1024, 512x2048x2048, 1024^3 against splitting rows there. Which thread computes an
  // element never changes its bits.
  const bool split_rows = (g.M + mc_max - 1) / mc_max >= nt && g.N < g.M;
  const index_t tiles = (g.M + tile_m - 1) / tile_m;
  const index_t m0 = split_rows ? std::min(g.M, tiles * tid / nt * tile_m) : 0;
  const index_t m1 = split_rows ? std::min(g.M, tiles * (tid + 1) / nt * tile_m) : g.M;
  const index_t my_blocks = std::max<index_t>(1, (m1 - m0 + mc_max - 1) / mc_max);
  index_t mc = (m1 - m0 + my_blocks - 1) / my_blocks;
  mc = std::max(tile_m, (mc + tile_m - 1) / tile_m * tile_m);
#ifdef CPUFORMER_HAVE_AVX2
  // Small problems: packing A costs as much as it saves, so the kernel reads A in place (BLIS "sup" style).
  const bool direct_a = detail::use_avx2() && (g.prefer_direct_a || g.M * g.N * g.K <= kDirectMaxMacs);
  const index_t a_rs = g.trans_a ? 1 : g.lda, a_ks = g.trans_a ? g.lda : 1;
#else
  const bool direct_a = false;
#endif
  const index_t kc_max = prepacked ? prepacked_kc : avx512 ? KC_AVX512 : KC;
  float* a_pack = direct_a ? nullptr : t_pack_a.get(mc * kc_max + kPackASlack);

  int parity = 0;
  index_t packed_offset = 0;
  for (index_t jc = 0; jc < g.N; jc += NC) {
    const index_t nc = std::min(NC, g.N - jc);
    const index_t slivers = (nc + NR - 1) / NR;
    for (index_t pc = 0; pc < g.K; pc += kc_max) {
      const index_t kc = std::min(kc_max, g.K - pc);
      const bool first = pc == 0, last = pc + kc == g.K;
      const float beta = first ? g.beta : 1.0f;
      const float* b_panel;
      if (prepacked) {
        b_panel = prepacked + packed_offset;
        packed_offset += slivers * NR * kc;
      } else {
        float* panel = b_panels + parity * panel_size;
        parity ^= 1;
        // Splitting columns, a thread's slivers are fixed by the column block's width: entering a new block (the
        // last one may be narrower), wait until every thread is done with the previous ones, whose panels the new
        // shares overlap.
        if (!split_rows && jc > 0 && pc == 0) team_barrier(nt);
        // Likewise when the K block is shorter than the others (the last one): its slivers sit closer together
        // (s * NR * kc), so a thread's new share in this buffer can overlap the slivers a slower thread is still
        // reading from the block two back. (Full-size K blocks keep every thread's share where it was.)
        if (!split_rows && pc > 0 && kc != kc_max) team_barrier(nt);
        // 1. The team packs the B panel together.
        pack_b_slivers(panel, g, pc, jc, kc, nc, slivers * tid / nt, slivers * (tid + 1) / nt);
        // Splitting columns, a thread packs exactly the slivers it multiplies by: nothing else to wait for.
        if (split_rows) team_barrier(nt);
        b_panel = panel;
      }
      // 2. Each thread takes whole row blocks (or, for short M, a share of the B slivers of every block).
      const index_t s0 = split_rows ? 0 : slivers * tid / nt;
      const index_t s1 = split_rows ? slivers : slivers * (tid + 1) / nt;
      if (s0 < s1) {
        for (index_t ic = m0; ic < m1; ic += mc) {
          const index_t mcur = std::min(mc, m1 - ic);
          if (!direct_a) pack_a_block(a_pack, g, ic, pc, mcur, kc);
#ifdef CPUFORMER_HAVE_AVX512
          if (avx512) {  // 12 x 32 tiles: pairs of B slivers by pairs of A slivers
            for (index_t s = s0; s < s1; s += 2) {
              const int nb = static_cast<int>(std::min<index_t>(2, s1 - s));
              const index_t j = jc + s * NR;
              const int nr = static_cast<int>(std::min<index_t>(nb * NR, g.N - j));
              const float* bs = b_panel + s * NR * kc;
              const float* bias = last && g.bias ? g.bias + j : nullptr;
              for (index_t ir = 0; ir < mcur; ir += 2 * MR) {
                const int mr = static_cast<int>(std::min<index_t>(2 * MR, mcur - ir));
                const int ma = mr > MR ? 2 : 1;
                float* c = g.C + (ic + ir) * g.ldc + j;
                if (direct_a)
                  kKernels512Direct[ma - 1][nb - 1](kc, g.A + (ic + ir) * a_rs + pc * a_ks, a_rs, a_ks, bs, c, g.ldc,
                                                    g.alpha, beta, bias, mr, nr);
                else
                  kKernels512[ma - 1][nb - 1](kc, a_pack + ir * kc, bs, c, g.ldc, g.alpha, beta, bias, mr, nr);
              }
            }
            continue;
          }
#endif
          for (index_t s = s0; s < s1; ++s) {
            const index_t j = jc + s * NR;
            const int nr = static_cast<int>(std::min<index_t>(NR, g.N - j));
            const float* bs = b_panel + s * NR * kc;
            const float* bias = last && g.bias ? g.bias + j : nullptr;
            for (index_t ir = 0; ir < mcur; ir += MR) {
              const int mr = static_cast<int>(std::min<index_t>(MR, mcur - ir));
              float* c = g.C + (ic + ir) * g.ldc + j;
#ifdef CPUFORMER_HAVE_AVX2
              if (direct_a) {
                kernel_avx2_direct(kc, g.A + (ic + ir) * a_rs + pc * a_ks, a_rs, a_ks, bs, c, g.ldc, g.alpha, beta,
                                   bias, mr, nr);
                continue;
              }
#endif
              kernel(kc, a_pack + ir * kc, bs, c, g.ldc, g.alpha, beta, bias, mr, nr);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Few rows (decoding one token, batch-1 inference): the product is bound by reading B once, so B is read in place
// rather than packed (packing would copy all of B on every call). Threads split the N columns.

constexpr index_t kSmallM = 4;

void small_m_scalar(const GemmArgs& g, index_t n0, index_t n1) {
  for (index_t i = 0; i < g.M; ++i)
    for (index_t j = n0; j < n1; ++j) {
      float acc = 0.0f;
      for (index_t k = 0; k < g.K; ++k) {
        const float a = g.trans_a ? g.A[k * g.lda + i] : g.A[i * g.lda + k];
        acc += a * (g.trans_b ? g.B[j * g.ldb + k] : g.B[k * g.ldb + j]);
      }
      float v = g.alpha * acc;
      if (g.beta != 0.0f) v += g.beta * g.C[i * g.ldc + j];
      if (g.bias) v += g.bias[j];
      g.C[i * g.ldc + j] = v;
    }
}

#ifdef CPUFORMER_HAVE_AVX2
// C[i, j] for j in [n0, n1): B^T stored (N x K, rows contiguous along K) -> one dot product per column, four
// columns at a time so each load of A's row feeds four FMAs.
CPUFORMER_AVX2 static void small_m_dot_avx2(const GemmArgs& g, const float* a, float* out, index_t n0, index_t n1) {
  using namespace simd;
  const index_t K = g.K;
  index_t j = n0;
  for (; j + 4 <= n1; j += 4) {
    const float* b0 = g.B + j * g.ldb;
    const float* b1 = b0 + g.ldb;
    const float* b2 = b1 + g.ldb;
    const float* b3 = b2 + g.ldb;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    index_t k = 0;
    for (; k + kWidth <= K; k += kWidth) {
      const __m256 av = _mm256_loadu_ps(a + k);
      s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + k), s0);
      s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + k), s1);
      s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + k), s2);
      s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + k), s3);
    }
    float r0 = hsum(s0), r1 = hsum(s1), r2 = hsum(s2), r3 = hsum(s3);
    for (; k < K; ++k) r0 += a[k] * b0[k], r1 += a[k] * b1[k], r2 += a[k] * b2[k], r3 += a[k] * b3[k];
    out[j] = r0, out[j + 1] = r1, out[j + 2] = r2, out[j + 3] = r3;
  }
  for (; j < n1; ++j) {
    const float* b = g.B + j * g.ldb;
    __m256 s = _mm256_setzero_ps();
    index_t k = 0;
    for (; k + kWidth <= K; k += kWidth) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s);
    float r = hsum(s);
    for (; k < K; ++k) r += a[k] * b[k];
    out[j] = r;
  }
}

// B stored K x N (rows contiguous along N): out[n0:n1] = sum_k a[k] * B[k, n0:n1].
CPUFORMER_AVX2 static void small_m_axpy_avx2(const GemmArgs& g, const float* a, float* out, index_t n0, index_t n1) {
  using namespace simd;
  for (index_t j = n0; j < n1; ++j) out[j] = 0.0f;
  for (index_t k = 0; k < g.K; ++k) {
    const __m256 av = _mm256_set1_ps(a[k]);
    const float* b = g.B + k * g.ldb;
    index_t j = n0;
    for (; j + kWidth <= n1; j += kWidth)
      _mm256_storeu_ps(out + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(b + j), _mm256_loadu_ps(out + j)));
    for (; j < n1; ++j) out[j] += a[k] * b[j];
  }
}
#endif

void small_m_range(const GemmArgs& g, index_t n0, index_t n1) {
#ifdef CPUFORMER_HAVE_AVX2
  if (detail::use_avx2() && !g.trans_a) {
    std::vector<float> acc(static_cast<size_t>(g.N));
    for (index_t i = 0; i < g.M; ++i) {
      const float* a = g.A + i * g.lda;
      if (g.trans_b) small_m_dot_avx2(g, a, acc.data(), n0, n1);
      else small_m_axpy_avx2(g, a, acc.data(), n0, n1);
      float* c = g.C + i * g.ldc;
      for (index_t j = n0; j < n1; ++j) {
        float v = g.alpha * acc[j];
        if (g.beta != 0.0f) v += g.beta * c[j];
        if (g.bias) v += g.bias[j];
        c[j] = v;
      }
    }
    return;
  }
#endif
  small_m_scalar(g, n0, n1);
}

// K == 0: the product is empty, C = beta * C + bias.
void gemm_empty_k(const GemmArgs& g) {
  for (index_t i = 0; i < g.M; ++i) {
    for (index_t j = 0; j < g.N; ++j) {
      float v = g.beta != 0.0f ? g.beta * g.C[i * g.ldc + j] : 0.0f;
      if (g.bias) v += g.bias[j];
      g.C[i * g.ldc + j] = v;
    }
  }
}

#ifdef CPUFORMER_HAVE_AVX512
// x W^T with few rows and a wide W (N x K, rows along K: a Linear weight, an output layer): the blocked path packs
// B = W^T, transposing all of W on every call, which at these heights costs about what the products do (Marian's
// 58101-word output layer at 64 rows: a fifth of a beam-search step). Instead compute C^T = W A^T: W is the
// kernel's A operand, read in place (the direct kernel), A^T is packed once (K x M, small), and each tile of C^T is
// written back transposed. The same products summed in the same order in the same K blocks, and each element of C
// written back with the formula the blocked path uses for it (fused for an element of a whole 6 x 16 tile, rounded
// step by step at the edges): bitwise the blocked path's result (tests: every shape against it).
// Measured (2 threads, Sapphire Rapids) against the blocked path: 0.63-0.9x its time with N >= 4M, K >= 128 and up
// to 128 rows (64 x 512 x 58101: 0.77x, 128 x 3072 x 768: 0.90x); level or behind with fewer columns or a short K.
// Also ahead of the AMX float32 product at 128 rows with weights read from memory (128 x 896 x 4864: 4.8 against
// 5.5 ms, 128 x 768 x 2304: 2.1 against 3.0): there it goes first.
constexpr index_t kWideMinRows = kSmallM + 1, kWideMaxRows = 128, kWideMinK = 128;

bool wide_bt_shape(index_t M, index_t N, index_t K) {
  return detail::use_avx512() && M >= kWideMinRows && M <= kWideMaxRows && N >= 4 * M && K >= kWideMinK;
}

bool wide_bt_applies(const GemmArgs& g) { return g.trans_b && !g.prefer_direct_a && wide_bt_shape(g.M, g.N, g.K); }

// C[m0.., n0..] from a tile of C^T (local: rows n, 32 columns m; mr x nr used), as tile_writeback / row_writeback_512
// would write each element on the blocked path: fused in whole tiles (m < m_whole, n < n_whole), else rounded step
// by step.
CPUFORMER_AVX512 static void write_transposed(const float* local, int mr, int nr, const GemmArgs& g, index_t m0,
                                              index_t n0, index_t m_whole, index_t n_whole, float beta,
                                              const float* bias) {
  alignas(64) float t[NR * NR];
  const __mmask16 lanes = static_cast<__mmask16>((1u << mr) - 1u);
  const __mmask16 whole_n =
      n_whole > n0 ? static_cast<__mmask16>((1u << std::min<index_t>(NR, n_whole - n0)) - 1u) : __mmask16(0);
  const __m512 va = _mm512_set1_ps(g.alpha), vbeta = _mm512_set1_ps(beta);
  const __m512 vbias = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
  for (int h = 0; h * NR < nr; ++h) {
    pack_b_t16_avx512(t, local + h * NR, 2 * NR, NR);  // t[j * NR + r] = local[r][h * NR + j]
    for (int j = 0; j < std::min(NR, nr - h * NR); ++j) {
      const index_t m = m0 + h * NR + j;
      float* c = g.C + m * g.ldc + n0;
      const __m512 acc = _mm512_load_ps(t + j * NR);
      __m512 fused = _mm512_fmadd_ps(acc, va, vbias), rounded = _mm512_mul_ps(acc, va);
      if (beta != 0.0f) {
        const __m512 cv = _mm512_maskz_loadu_ps(lanes, c);
        fused = _mm512_fmadd_ps(vbeta, cv, fused);
        rounded = _mm512_add_ps(rounded, _mm512_mul_ps(vbeta, cv));
      }
      if (bias) rounded = _mm512_add_ps(rounded, vbias);
      _mm512_mask_storeu_ps(c, lanes, _mm512_mask_blend_ps(m < m_whole ? whole_n : __mmask16(0), rounded, fused));
    }
  }
}

void gemm_wide_bt(const GemmArgs& g, int nt) {
  const index_t M = g.M, N = g.N, K = g.K, mp = (M + NR - 1) / NR * NR, slivers = mp / NR;
  // A^T as the kernel's B operand, every K block of it (KC_AVX512 rows each, mp columns).
  float* at = t_pack_b.get(K * mp);
  const GemmArgs ga{false, !g.trans_a, K, M, M, 1.0f, nullptr, 0, g.A, g.lda, 0.0f, nullptr, 0, nullptr};
  for (index_t pc = 0; pc < K; pc += KC_AVX512)
    pack_b_slivers(at + pc * mp, ga, pc, 0, std::min(KC_AVX512, K - pc), M, 0, slivers);
  const index_t m_whole = M / MR * MR, n_whole = N / NR * NR;  // elements of whole tiles on the blocked path
  const index_t tiles = (N + 2 * MR - 1) / (2 * MR);
  const auto run = [&](int tid, int team) {
    alignas(64) float local[NR * 2 * NR] = {};  // 12 rows of C^T written, 16 read (the transposes)
    for (index_t t = tiles * tid / team; t < tiles * (tid + 1) / team; ++t) {
      const index_t n0 = t * 2 * MR;
      const int mr = static_cast<int>(std::min<index_t>(2 * MR, N - n0));
      for (index_t pc = 0; pc < K; pc += KC_AVX512) {
        const index_t kc = std::min(KC_AVX512, K - pc);
        const bool first = pc == 0, last = pc + kc == K;
        const float beta = first ? g.beta : 1.0f;
        const float* bias = last ? g.bias : nullptr;
        for (index_t s = 0; s < slivers; s += 2) {
          const index_t m0 = s * NR;
          const int nb = static_cast<int>(std::min<index_t>(2, slivers - s));
          const int nr = static_cast<int>(std::min<index_t>(nb * NR, M - m0));
          // The first column pair meets W's rows in memory: fetch ahead; later pairs find them in cache.
          const Kernel512DirectFn kernel = (s == 0 ? kKernels512DirectRows : kKernels512Direct)[mr > MR ? 1 : 0][nb - 1];
          kernel(kc, g.B + n0 * g.ldb + pc, g.ldb, 1, at + pc * mp + s * NR * kc, local, 2 * NR, 1.0f, 0.0f, nullptr,
                 mr, nr);
          write_transposed(local, mr, nr, g, m0, n0, m_whole, n_whole, beta, bias);
        }
      }
    }
  };
  if (nt <= 1) return run(0, 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  run(omp_get_thread_num(), omp_get_num_threads());
#else
  run(0, 1);
#endif
}
#endif

int threads_for(index_t M, index_t N, index_t K) {
  const index_t macs = M * N * K;
  const index_t useful = std::max<index_t>(1, macs / kMinMacsPerThread);
  return static_cast<int>(std::min<index_t>(detail::kernel_threads(), useful));
}

void gemm_run(const GemmArgs& g, int nt) {
  if (g.M == 0 || g.N == 0) return;
  if (g.K == 0) return gemm_empty_k(g);
  if (g.M <= kSmallM && !g.trans_a) {
    // Bound by reading B: split the columns so each thread streams its own part of B (chunks of 64 columns).
    const index_t chunks = (g.N + 63) / 64;
    const int team = static_cast<int>(std::min<index_t>(nt, std::max<index_t>(1, g.N * g.K / (1 << 16))));
    if (team <= 1) return small_m_range(g, 0, g.N);
    detail::parallel_for(chunks, 1, [&](index_t c0, index_t c1, int) {
      small_m_range(g, c0 * 64, std::min(g.N, c1 * 64));
    });
    return;
  }
  // The "amx" path (amx_internal.h); tiles already in cache (attention) stay on the AVX-512 kernel.
  if (!g.prefer_direct_a && detail::amx_swapped_applies(g.M, g.N, g.K)) {
    // C^T = op(B)^T op(A)^T: op(B)^T is op(B) read the other way (not transposed when B is N x K), op(A)^T likewise.
    detail::AmxGemm ag{!g.trans_b, !g.trans_a, g.N, g.M, g.K, g.alpha, g.B, g.ldb, g.A, nullptr, g.lda,
                       g.beta, g.C, g.ldc, g.bias};
    ag.c_transposed = true;
    return detail::amx_gemm(ag, nt);
  }
#ifdef CPUFORMER_HAVE_AVX512
  if (wide_bt_applies(g)) return gemm_wide_bt(g, nt);
#endif
  if (!g.prefer_direct_a && detail::amx_float32_applies(g.M, g.N, g.K)) {
    const detail::AmxGemm ag{g.trans_a, g.trans_b, g.M, g.N, g.K, g.alpha, g.A, g.lda, g.B, nullptr, g.ldb,
                             g.beta, g.C, g.ldc, g.bias};
    return detail::amx_gemm(ag, nt);
  }
  const index_t panel = std::max(KC, KC_AVX512) * ((std::min(NC, g.N) + NR - 1) / NR * NR);
  float* b_panels = t_pack_b.get(2 * panel);
  if (nt <= 1) return gemm_team(g, b_panels, panel, 0, 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  gemm_team(g, b_panels, panel, omp_get_thread_num(), omp_get_num_threads());
#else
  gemm_team(g, b_panels, panel, 0, 1);
#endif
}

void check_args(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const float* A, index_t lda,
                const float* B, index_t ldb, const float* C, index_t ldc) {
  CPUFORMER_CHECK(M >= 0 && N >= 0 && K >= 0, "sgemm: negative size M=", M, " N=", N, " K=", K);
  CPUFORMER_CHECK(lda >= std::max<index_t>(1, trans_a ? M : K), "sgemm: lda=", lda, " too small");
  CPUFORMER_CHECK(ldb >= std::max<index_t>(1, trans_b ? K : N), "sgemm: ldb=", ldb, " too small");
  CPUFORMER_CHECK(ldc >= std::max<index_t>(1, N), "sgemm: ldc=", ldc, " too small");
  CPUFORMER_CHECK(M * N == 0 || C, "sgemm: C is null");
  CPUFORMER_CHECK(M * N * K == 0 || (A && B), "sgemm: A or B is null");
}

}  // namespace

void sgemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha, const float* A, index_t lda,
           const float* B, index_t ldb, float beta, float* C, index_t ldc, const float* bias) {
  check_args(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
  const GemmArgs g{trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias};
  gemm_run(g, threads_for(M, N, K));
}

index_t detail::packed_b_size(index_t K, index_t N, index_t /*kc: the size does not depend on it*/) {
  index_t total = 0;
  for (index_t jc = 0; jc < N; jc += NC) total += (std::min(NC, N - jc) + NR - 1) / NR * NR * K;
  return total;
}

void detail::pack_b(float* dst, bool trans_b, index_t K, index_t N, const float* B, index_t ldb, index_t kc_max) {
  const GemmArgs g{false, trans_b, 0, N, K, 1.0f, nullptr, 0, B, ldb, 0.0f, nullptr, 0, nullptr};
  for (index_t jc = 0; jc < N; jc += NC) {  // the order gemm_team walks the panels
    const index_t nc = std::min(NC, N - jc), slivers = (nc + NR - 1) / NR;
    for (index_t pc = 0; pc < K; pc += kc_max) {
      const index_t kc = std::min(kc_max, K - pc);
      pack_b_slivers(dst, g, pc, jc, kc, nc, 0, slivers);
      dst += slivers * NR * kc;
    }
  }
}

void detail::sgemm_single_thread_packed(bool trans_a, index_t M, index_t N, index_t K, float alpha, const float* A,
                                        index_t lda, const float* packed_b, float beta, float* C, index_t ldc) {
  CPUFORMER_CHECK(M >= 0 && N >= 0 && K >= 1 && lda >= std::max<index_t>(1, trans_a ? M : K) &&
                      ldc >= std::max<index_t>(1, N) && A && packed_b && C,
                  "sgemm_single_thread_packed: bad sizes M=", M, " N=", N, " K=", K, " lda=", lda, " ldc=", ldc);
  if (M == 0 || N == 0) return;
  const GemmArgs g{trans_a, false, M, N, K, alpha, A, lda, nullptr, 0, beta, C, ldc, nullptr, true};
  gemm_team(g, nullptr, 0, 0, 1, packed_b);
}

struct PackedTiles {
  std::once_flag once;
  detail::AlignedBuffer words;  // 32-bit words (the size of a float)
};

namespace {

// B's AMX tiles, split from the panels by the first caller (the others wait for it): read-only after that, so a
// packed model stays safe to call from many threads.
const std::uint32_t* split_tiles(const PackedMatrix& B, const detail::AmxGemm& g) {
  PackedTiles& t = *B.tiles;
  std::call_once(t.once, [&] {
    detail::amx_split_b(g, reinterpret_cast<std::uint32_t*>(t.words.get(detail::amx_split_b_words(B.N, B.K))));
  });
  return reinterpret_cast<const std::uint32_t*>(t.words.data);
}

}  // namespace

PackedMatrix sgemm_pack_b(bool trans_b, index_t K, index_t N, const float* B, index_t ldb, bool amx_tiles) {
  CPUFORMER_CHECK(K > 0 && N > 0 && B != nullptr && ldb >= (trans_b ? K : N),
                  "sgemm_pack_b: bad sizes K=", K, " N=", N, " ldb=", ldb);
  PackedMatrix p;
  p.K = K;
  p.N = N;
  p.trans_b = trans_b;
  // Cut at the K block of the path in use (either path reads either cut: only rounding depends on it).
  p.kc = detail::use_avx512() ? KC_AVX512 : KC;
  p.size = detail::packed_b_size(K, N, p.kc);
  p.storage.reset(static_cast<float*>(std::aligned_alloc(64, ((p.size * sizeof(float) + 63) / 64) * 64)));
  if (!p.storage) throw std::bad_alloc();
  detail::pack_b(p.storage.get(), trans_b, K, N, B, ldb, p.kc);
  if (amx_tiles) p.tiles = std::make_shared<PackedTiles>();
  return p;
}

void sgemm_packed(index_t M, const float* A, index_t lda, const PackedMatrix& B, float* C, index_t ldc,
                  const float* bias) {
  CPUFORMER_CHECK(B.storage && M >= 0 && lda >= B.K && ldc >= B.N, "sgemm_packed: bad sizes M=", M, " lda=", lda,
                  " ldc=", ldc);
  if (M == 0) return;
  const GemmArgs g{false, false, M, B.N, B.K, 1.0f, A, lda, nullptr, 0, 0.0f, C, ldc, bias};
  const int nt = threads_for(M, B.N, B.K);
  const index_t kc = B.kc > 0 ? B.kc : KC;
  // The tiles read the panels: the same bits as sgemm, which takes the AMX product for the same shapes (a packed
  // x W^T of a shape sgemm computes as C^T = W A^T stays on the blocked kernel: the same bits as that).
#ifdef CPUFORMER_HAVE_AVX512
  const bool wide = B.trans_b && wide_bt_shape(M, B.N, B.K);
#else
  const bool wide = false;
#endif
  // With B split once (PackedMatrix::tiles), the tiles pay off from 128 rows at every width (MiniLM's layers at 128
  // rows: 11.1 against 13.2 ms per forward, measured); without, where the per-call split does.
  const bool split_once = B.tiles && M >= 128 && B.N >= 32 && B.K >= 32 && detail::use_amx();
  if (kc % 32 == 0 && !split_once && detail::amx_swapped_applies(M, B.N, B.K)) {  // as sgemm: the same planes
    detail::AmxGemm ag{true, true, B.N, M, B.K, 1.0f, nullptr, 0, A, nullptr, lda, 0.0f, C, ldc, bias};
    ag.packed_a = B.storage.get();
    ag.packed_a_kc = kc;
    ag.c_transposed = true;
    return detail::amx_gemm(ag, nt);
  }
  if (kc % 32 == 0 && (split_once || (!wide && detail::amx_float32_applies(M, B.N, B.K)))) {
    detail::AmxGemm ag{false, false, M, B.N, B.K, 1.0f, A, lda, nullptr, nullptr, 0, 0.0f, C, ldc, bias};
    ag.packed = B.storage.get();
    ag.packed_kc = kc;
    if (split_once) ag.tiles = split_tiles(B, ag);
    return detail::amx_gemm(ag, nt);
  }
  if (nt <= 1) return gemm_team(g, nullptr, 0, 0, 1, B.storage.get(), kc);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  gemm_team(g, nullptr, 0, omp_get_thread_num(), omp_get_num_threads(), B.storage.get(), kc);
#else
  gemm_team(g, nullptr, 0, 0, 1, B.storage.get(), kc);
#endif
}

void sgemm_strided_batched(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha,
                           const float* A, index_t lda, index_t stride_a, const float* B, index_t ldb,
                           index_t stride_b, float beta, float* C, index_t ldc, index_t stride_c, index_t batch,
                           const float* bias) {
  check_args(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
  CPUFORMER_CHECK(batch >= 0, "sgemm_strided_batched: negative batch ", batch);
  CPUFORMER_CHECK(batch <= 1 || stride_c >= M * ldc, "sgemm_strided_batched: stride_c=", stride_c,
                  " makes outputs overlap");
  const auto args = [&](index_t b) {
    return GemmArgs{trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda, B + b * stride_b, ldb,
                    beta, C + b * stride_c, ldc, bias};
  };
  const int per_problem = threads_for(M, N, K);
  const int all = detail::kernel_threads();
  if (per_problem >= all || batch < 2) {
    // Big problems: thread inside each one.
    for (index_t b = 0; b < batch; ++b) gemm_run(args(b), per_problem);
    return;
  }
  // Many small problems (attention heads, sequences): one thread per problem, problems split over the team.
  detail::parallel_for(batch, std::max<index_t>(1, kMinMacsPerThread / std::max<index_t>(1, M * N * K)),
                       [&](index_t b0, index_t b1, int) {
                         for (index_t b = b0; b < b1; ++b) gemm_run(args(b), 1);
                       });
}

void detail::sgemm_single_thread(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha,
                                 const float* A, index_t lda, const float* B, index_t ldb, float beta, float* C,
                                 index_t ldc, const float* bias) {
  check_args(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
  gemm_run(GemmArgs{trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, true}, 1);
}

void sgemm_ref(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha, const float* A,
               index_t lda, const float* B, index_t ldb, float beta, float* C, index_t ldc, const float* bias) {
  check_args(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
  for (index_t i = 0; i < M; ++i) {
    for (index_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (index_t k = 0; k < K; ++k) {
        const double a = trans_a ? A[k * lda + i] : A[i * lda + k];
        const double b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += a * b;
      }
      double v = alpha * acc;
      if (beta != 0.0f) v += static_cast<double>(beta) * C[i * ldc + j];
      if (bias) v += bias[j];
      C[i * ldc + j] = static_cast<float>(v);
    }
  }
}

}  // namespace cpuformer
