// cpuformer/matmul.h: single-precision GEMM.
#pragma once

#include <cstdlib>
#include <memory>

#include "cpuformer/common.h"

namespace cpuformer {

// C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C + bias[N]   (bias broadcast over rows; may be null)
//   op(A) = A (A is M x K, row stride lda) or A^T (A stored K x M) when trans_a; likewise op(B).
//   beta == 0 means C is write-only (its old contents, even NaN, are ignored).
// Packed panels, cache blocking, a 6x16 AVX2/FMA register-blocked micro-kernel, OpenMP over blocks.
void sgemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha, const float* A, index_t lda,
           const float* B, index_t ldb, float beta, float* C, index_t ldc, const float* bias = nullptr);

// The same over `batch` independent problems at element strides stride_a/b/c (stride 0 broadcasts an operand).
void sgemm_strided_batched(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha,
                           const float* A, index_t lda, index_t stride_a, const float* B, index_t ldb,
                           index_t stride_b, float beta, float* C, index_t ldc, index_t stride_c, index_t batch,
                           const float* bias = nullptr);

// op(B) packed once into the GEMM's panel layout, for many products with the same B (inference weights): packing
// costs a pass over B on every sgemm call, up to a tenth of the time at 128 rows.
struct PackedTiles;  // op(B) split into AMX tiles' bf16 terms (matmul.cpp), made at its first product that uses them
struct PackedMatrix {
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  index_t K = 0, N = 0, size = 0;
  index_t kc = 0;  // K block the panels are cut at (the SIMD path's when packed; 0: the default, 256)
  bool trans_b = false;  // packed from B^T (a Linear's (out, in) weight): sgemm_packed chooses kernels as sgemm does
  std::unique_ptr<float, FreeDeleter> storage;  // 64-byte aligned
  // On the "amx" path, products of 128 rows or more run on AMX tiles from B split once (1.5x the panels' bytes,
  // kept from the first such product on) instead of split on every call; smaller products read the panels.
  std::shared_ptr<PackedTiles> tiles;
};
// amx_tiles = false leaves the panels alone (no AMX tile copy, whatever the rows: for weights whose 128-row products
// are rare, such as a decoder's prompt, the copy would cost memory for good and pay once).
PackedMatrix sgemm_pack_b(bool trans_b, index_t K, index_t N, const float* B, index_t ldb, bool amx_tiles = true);

// C[M,N] = A[M,K] * op(B) + bias (alpha 1, beta 0, A not transposed, row stride lda), with B from sgemm_pack_b.
void sgemm_packed(index_t M, const float* A, index_t lda, const PackedMatrix& B, float* C, index_t ldc,
                  const float* bias = nullptr);

// Plain triple loop with double accumulation: the reference the tests and the C++ test program compare against.
void sgemm_ref(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha, const float* A,
               index_t lda, const float* B, index_t ldb, float beta, float* C, index_t ldc,
               const float* bias = nullptr);

}  // namespace cpuformer
