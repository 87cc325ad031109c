// amx_internal.h (private): float32 products on Intel AMX tiles (amx.cpp), behind the float32 GEMM (matmul.cpp)
// and the 16-bit weight products (half.cpp) on the "amx" SIMD path.
//
// tdpbf16ps multiplies bf16 tiles and sums in float32. A float32 operand is split exactly into three bf16 terms,
// x = x0 + x1 + x2 (the top, middle and low 8 bits of its 24-bit significand, by truncation). A bf16 operand is
// its own single term. The product keeps every term pair whose size can reach 2^-16 of |a||b|:
//   float32 x bf16:    a0 b, a1 b, a2 b           (exact products; only the float32 sums round)
//   float32 x float32: a0 b0, a1 b0, a0 b1, a2 b0, a1 b1, a0 b2
// The six leave out a1 b2 + a2 b1 + a2 b2 < 2^-21 |a||b| (about 8 float32 roundings of one product; the sums over K
// round as the float32 GEMM's do). bf16 inputs are read with denormals as zero, so terms below 2^-126 (operands below
// about 2^-110) drop out: products of such tiny values lose precision that the AVX-512 path ("avx512") keeps.
#pragma once

#include <cstdint>

#include "cpuformer/common.h"

namespace cpuformer::detail {

struct AmxGemm {
  // C[M, N] (row stride ldc) = alpha op(A) op(B) + beta C + bias[N]; beta == 0 ignores C's old values.
  bool trans_a, trans_b;
  index_t M, N, K;
  float alpha;
  const float* A;  // op(A) = A (M x K) or A^T (A is K x M)
  index_t lda;
  const float* B;         // op(B) = B (K x N) or B^T (B is N x K), float32 ...
  const std::uint16_t* H;  // ... or bf16 ...
  index_t ldb;
  float beta;
  float* C;
  index_t ldc;
  const float* bias;
  const float* packed = nullptr;  // ... or op(B) packed by sgemm_pack_b (detail::pack_b's layout), ...
  index_t packed_kc = 0;          // ... cut at K blocks of this size (a multiple of 32); exactly one of B, H, packed
  // With H: op(A) already holds bf16 values (activations rounded by the caller), so it is one term instead of the
  // exact split's three: one tile product per pair of tiles.
  bool prerounded = false;
  // ... or op(B) already split into B tiles by amx_split_b (with float32 A only).
  const std::uint32_t* tiles = nullptr;
  // op(A) given as bf16 values (M x K, row stride ldha), one term each, which the tiles read in place: no split
  // (with float32 B, K a multiple of 32: the tiles read whole 32-k steps of each row).
  const std::uint16_t* HA = nullptr;
  index_t ldha = 0;
  // op(A) read from sgemm_pack_b's panels (with trans_a): the panels of a K x M matrix, cut at K blocks of
  // packed_a_kc (a multiple of 16), instead of from A.
  const float* packed_a = nullptr;
  index_t packed_a_kc = 0;
  // ... or op(A) already split by amx_split_a (K at most 512: one k block), which the tiles read in place.
  const std::uint16_t* planes = nullptr;
  // C holds the product's transpose: C[n, m] (row stride ldc) = alpha op(A) op(B)[m, n] + beta C[n, m] + bias[m]
  // (the bias runs along op(A)'s rows). The swapped product computes X W^T as (W X^T)^T this way.
  bool c_transposed = false;
  // The tiles' sums start from C (or zero when beta == 0) and are stored straight back (alpha 1, beta 0 or 1, no
  // bias; columns of a partial 16-column panel go the usual way): C's products accumulate in the tiles' order, so
  // the bits differ from the usual C + (op(A) op(B)).
  bool direct_c = false;
};

// Whether the AMX product runs now (the "amx" SIMD path) and pays off for these sizes: with a float32 op(B), whose
// split and packing cost about as much per element as a few rows of products, or with bf16 weights.
bool amx_float32_applies(index_t M, index_t N, index_t K);
bool amx_bf16_applies(index_t M, index_t N, index_t K);
// Whether C = op(A) op(B) of a few rows and many more columns runs swapped, as C^T = op(B)^T op(A)^T with
// c_transposed: the weights' side is then split in place (not transposed), the small op(A) packed instead.
bool amx_swapped_applies(index_t M, index_t N, index_t K);
// The same for bf16 weights read in place (C = x W^T: no weight packing to save, so from fewer columns on).
bool amx_swapped_bf16_applies(index_t M, index_t N, index_t K);

// Rows [r0, r1) x columns [n0, n1) of C on the calling thread (its own scratch: callers may run many at once).
void amx_gemm_share(const AmxGemm& g, index_t r0, index_t r1, index_t n0, index_t n1);

// All of C, on up to nt threads (shares of columns, and of rows when there are few columns).
void amx_gemm(const AmxGemm& g, int nt);

// op(B) of g (float32 B or packed panels) split into the B tiles of every k block and 32 columns, in the order
// amx_gemm reads them with g.tiles: amx_split_b_words() 32-bit words at dst (64-byte aligned).
index_t amx_split_b_words(index_t N, index_t K);
void amx_split_b(const AmxGemm& g, std::uint32_t* dst);
void amx_split_b_here(const AmxGemm& g, std::uint32_t* dst);  // the same on the calling thread

// op(A) of g (float32, K at most amx_max_split_a_k) split into its three bf16 planes, as amx_gemm reads them with
// g.planes: amx_split_a_words() 16-bit words at dst (64-byte aligned). On the calling thread.
constexpr index_t amx_max_split_a_k = 512;
index_t amx_split_a_words(index_t M, index_t K);
void amx_split_a(const AmxGemm& g, std::uint16_t* dst);

// Whether every element of rows x cols (row stride ld) is finite.
bool amx_all_finite(const float* x, index_t rows, index_t cols, index_t ld);

// P = exp(S - shift[i]) of rows x n scores (row stride lds; n at most 512) straight into amx_split_a's planes of P
// (rows x n), and each row's sum of P into sums[i]; a row whose shift is -inf is zeros. Attention's softmax: P is
// never written as float32 and read back to be split. finite_b: the other operand (V) is all finite, so a term of
// P may be zero (the split skips amx_internal's care for 0 x inf) when the row's shift is finite.
void amx_exp_split(const float* S, index_t lds, index_t rows, index_t n, const float* shift, std::uint16_t* planes,
                   float* sums, bool finite_b);

}  // namespace cpuformer::detail
