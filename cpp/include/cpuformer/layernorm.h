// cpuformer/layernorm.h: layer normalization over the last axis, inp (rows, C).
#pragma once

#include "cpuformer/common.h"

namespace cpuformer {

// out = (inp - mean) * rstd * weight + bias; saves mean and rstd (rows) for backward.
// weight and bias may be null (no affine transform); mean/rstd may be null in inference.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, index_t rows, index_t C, float eps);

// The post-norm residual and its norm in one pass over each row: sum = a + b (kept: the norm's input, for
// backward), out = layernorm(sum). The same values as residual_forward then layernorm_forward. sum may alias a or b.
void residual_layernorm_forward(float* out, float* sum, float* mean, float* rstd, const float* a, const float* b,
                                const float* weight, const float* bias, index_t rows, index_t C, float eps);

// dinp = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight   (dinp overwritten;
// when accumulate_dinp is true it is added to dinp instead, which fuses the residual-branch sum)
// dweight += sum_rows(dout * xhat), dbias += sum_rows(dout)   (either may be null)
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, index_t rows, index_t C,
                        bool accumulate_dinp = false);

// RMSNorm: out = inp * rstd * w, rstd = 1 / sqrt(mean(inp^2) + eps), w = weight or (one_plus) 1 + weight (Gemma);
// weight may be null (no scale). rstd (rows) saved for backward; may be null in inference.
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, index_t rows, index_t C,
                     float eps, bool one_plus = false);
// sum = a + b, out = rmsnorm(sum), as residual_layernorm_forward.
void residual_rmsnorm_forward(float* out, float* sum, float* rstd, const float* a, const float* b,
                              const float* weight, index_t rows, index_t C, float eps, bool one_plus = false);
// dinp overwritten (or accumulated with accumulate_dinp); dweight += sum_rows(dout * inp * rstd) (may be null).
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, index_t rows, index_t C, bool one_plus = false, bool accumulate_dinp = false);

}  // namespace cpuformer
