// gemm_internal.h (private): GEMM entry points for kernels that are already inside a parallel loop.
#pragma once

#include <cstdlib>
#include <new>

#include "cpuformer/common.h"

namespace cpuformer::detail {

// Grow-only 64-byte-aligned float scratch (packed panels are read with aligned loads); one per thread, so no
// allocation per call once warm.
struct AlignedBuffer {
  float* data = nullptr;
  index_t capacity = 0;
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data); }
  float* get(index_t n) {
    if (n > capacity) {
      std::free(data);
      data = nullptr;
      capacity = 0;
      const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data) throw std::bad_alloc();
      capacity = n;
    }
    return data;
  }
};

// sgemm on the calling thread only (no parallel region), for tiles already in cache (attention): A is read in
// place rather than packed.
void sgemm_single_thread(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha, const float* A,
                         index_t lda, const float* B, index_t ldb, float beta, float* C, index_t ldc,
                         const float* bias = nullptr);

// K block of the packed-B layout from pack_b (and of the AVX2 path); the AVX-512 path packs its own B in blocks of 512.
constexpr index_t kGemmKC = 256;

// op(B) (K x N) packed into the GEMM's panel layout at dst (packed_b_size(K, N) floats, 32-byte aligned), so a tile
// that many products share (attention's keys and values) is packed once rather than on every call. kc: the K block
// the panels are cut at (sgemm_single_thread_packed reads kGemmKC; sgemm_pack_b records its own in PackedMatrix).
index_t packed_b_size(index_t K, index_t N, index_t kc = kGemmKC);
void pack_b(float* dst, bool trans_b, index_t K, index_t N, const float* B, index_t ldb, index_t kc = kGemmKC);

// sgemm_single_thread with B from pack_b(K, N) (A read in place).
void sgemm_single_thread_packed(bool trans_a, index_t M, index_t N, index_t K, float alpha, const float* A,
                                index_t lda, const float* packed_b, float beta, float* C, index_t ldc);

}  // namespace cpuformer::detail
