// cpuformer/quantize.h: int8 weights for inference-time Linear layers (dynamic quantization).
//
// Weights: symmetric int8 per output channel, q = round(w / s), s = max|w[n,:]| / 127, q in [-127, 127].
// Activations: quantized per row at run time, asymmetric unsigned 7-bit, x ~ sa * (qa - za), qa, za in [0, 127].
// The product accumulates exactly in int32 and is dequantized once per output:
//   y[m,n] = sa[m] * s[n] * (sum_k qa[m,k] q[n,k] - za[m] * sum_k q[n,k]) + bias[n].
// Why 7 bits: AVX2 has no int8 dot product without saturation (vpmaddubsw adds two u8*s8 products into int16);
// with qa <= 127 and |q| <= 127 that pair sum stays below 32767, so the AVX2 and scalar paths agree exactly
// (the same choice as fbgemm's reduce_range on CPUs without VNNI). With VNNI (vpdpbusd: four u8*s8 products into
// int32, no saturation) the 7-bit range is kept, so every kernel sums the same integers and dequantizes them the
// same way: the outputs are bitwise identical whichever kernel runs.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cpuformer/common.h"

namespace cpuformer {

// A Linear weight (N outputs x K inputs) quantized and packed for linear_int8.
struct Int8Weight {
  index_t n = 0, k = 0;
  std::vector<std::int8_t> packed;  // ceil(N/16) panels of ceil(K/4) groups of 16 columns x 4 consecutive k
  std::vector<float> scale;         // per output channel
  std::vector<std::int32_t> col_sum;  // sum over k of q[n, k], for the activation zero point

  // The quantized values as a plain row-major N x K array (for tests and inspection).
  std::vector<std::int8_t> unpack() const;
};

// Quantizes w (N x K, row stride ldw). Throws std::invalid_argument on non-finite weights.
Int8Weight quantize_weight_int8(const float* w, index_t N, index_t K, index_t ldw);
// The same, with the weight given a block of rows at a time: fill(r0, r1, rows) writes rows [r0, r1) of it (row
// stride K) into `rows`. For a weight held in another form (a 16-bit table), so that no float copy of all of it
// exists at once. Same result as quantize_weight_int8 on the whole weight. block_rows: rows per call (0: ~16 MiB).
Int8Weight quantize_weight_int8_blocked(index_t N, index_t K,
                                        const std::function<void(index_t, index_t, float*)>& fill,
                                        index_t block_rows = 0);

// y[M,N] (row stride ldy) = dynamically quantized x[M,K] (row stride ldx) times w^T, plus bias (may be null).
// A row of x holding NaN or Inf gives a row of NaN.
void linear_int8(const float* x, index_t M, index_t ldx, const Int8Weight& w, const float* bias, float* y,
                 index_t ldy);

// The per-row activation quantization linear_int8 applies (exposed for tests): qa (M x K), scale and zero point.
void quantize_rows_u7(const float* x, index_t M, index_t K, index_t ldx, std::uint8_t* qa, index_t ldq,
                      float* scale, std::int32_t* zero_point);

// The kernel linear_int8 uses now: "amx" (AMX tiles for 16 rows or more, AVX-512 VNNI below; Linux), "avx512vnni"
// (AVX-512 VNNI, zmm), "avxvnni" (AVX-VNNI, ymm), "avx2" or "scalar". By default the fastest this CPU has (VNNI
// also needs the OS to save the zmm/ymm state, AMX the kernel's permission for the tile data), and always
// "scalar" while the SIMD path is scalar (CPUFORMER_SIMD=scalar, set_simd_path("scalar")).
std::string int8_kernel_name();

// Forces an int8 kernel ("amx", "avx512vnni" or its alias "vnni", "avxvnni", "avx2", "scalar"), or "auto" for the default;
// a forced SIMD kernel still yields to a scalar SIMD path. The environment variable CPUFORMER_INT8 sets the initial
// choice (ignored when unknown or unavailable). Throws std::invalid_argument for an unknown name or a kernel this
// CPU or build lacks. Process-wide, like set_simd_path; every kernel gives the same bits.
void set_int8_kernel(const std::string& name);

// The int8 kernels this CPU and build can run, fastest first (always ends with "scalar").
std::vector<std::string> int8_kernels_available();

}  // namespace cpuformer
