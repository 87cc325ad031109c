// gemm_internal.h (private): GEMM entry points for kernels that are already inside a parallel loop.
#pragma once

#include "cpuformer/common.h"

namespace cpuformer::detail {

// sgemm on the calling thread only (no parallel region), for tiles already in cache (attention): A is read in
// place rather than packed.
void sgemm_single_thread(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha, const float* A,
                         index_t lda, const float* B, index_t ldb, float beta, float* C, index_t ldc,
                         const float* bias = nullptr);

}  // namespace cpuformer::detail
