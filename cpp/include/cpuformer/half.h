// cpuformer/half.h: 16-bit floating-point weights (bfloat16 and IEEE float16), kept 16-bit in memory.
//
// Checkpoints (Llama, Qwen, Gemma) ship BF16 or F16 weights. Kept as they are (memory-mapped), they take half the
// memory of float32 and half the bandwidth that bounds decoding; the products below convert them on the fly and
// compute in float32. Source pointers need only their natural 2-byte alignment (what an mmap'd file guarantees).
#pragma once

#include <cstdint>

#include "cpuformer/common.h"

namespace cpuformer {

enum class HalfType : std::uint8_t {
  kF16,   // IEEE 754 binary16: 1 sign, 5 exponent, 10 mantissa bits
  kBF16,  // bfloat16: the top 16 bits of a float32
};

// Exact: every 16-bit value is a float32. bf16: bits << 16 (payloads kept). f16: subnormals, infinities and NaN
// included; a NaN comes out quiet with its payload (as F16C's vcvtph2ps makes it, so every SIMD path gives the
// same bits).
float half_to_float(std::uint16_t bits, HalfType t);

// dst[i] = half_to_float(src[i], t) for i < n, vectorised (AVX2 + F16C where the CPU has it and the SIMD path is
// not "scalar"; the results are the same bits on every path). Any 2-byte-aligned src.
void half_to_float_n(float* dst, const std::uint16_t* src, index_t n, HalfType t);

// Round to nearest, ties to even. Overflow gives +-inf (f16: |x| >= 65520); NaN stays NaN (quiet, sign and the
// payload's top bits kept); f16 underflows through the subnormals to +-0.
std::uint16_t float_to_half(float x, HalfType t);
void float_to_half_n(std::uint16_t* dst, const float* src, index_t n, HalfType t);

// C[rows, N] (row stride ldc) = A[rows, K] (row stride lda) op(H) + bias[N] (bias may be null), plus C's previous
// values when accumulate. H is a 16-bit matrix with row stride ldh: op(H) = H^T when trans_h (H is N x K, as a
// PyTorch (out, in) weight against x), else H (K x N).
//   rows <= 4 (decoding): one fused pass that reads each weight element once, converting in registers.
//   more rows: each thread converts blocks of its own share of H to float32 (1 MB, its own buffer) and multiplies
//   them with the float32 GEMM.
// The results equal the float32 product with half_to_float(H) up to float32 rounding.
// bf16_activations: A's values are first rounded to bf16 (nearest even), as PyTorch's bf16 computation has them,
// and those are multiplied (exact products, float32 sums): on the "amx" path one tile product per pair instead of
// the three that keep A's float32 precision.
void gemm_half(bool trans_h, index_t rows, index_t N, index_t K, const float* A, index_t lda, const std::uint16_t* H,
               index_t ldh, HalfType t, bool accumulate, float* C, index_t ldc, const float* bias = nullptr,
               bool bf16_activations = false);

}  // namespace cpuformer
