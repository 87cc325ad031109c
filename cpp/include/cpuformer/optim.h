// cpuformer/optim.h: optimizer updates, one pass over memory.
#pragma once

#include "cpuformer/common.h"

namespace cpuformer {

// AdamW (decoupled weight decay, as torch.optim.AdamW), for step >= 1, on n elements:
//   g = grad * grad_scale (grad_scale carries gradient clipping / accumulation averaging)
//   param -= lr * weight_decay * param
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
//   param -= (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
void adamw_step(float* param, float* m, float* v, const float* grad, index_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, long long step, float grad_scale = 1.0f);

// Sum of squares in double (for the global gradient norm).
double sum_squares(const float* x, index_t n);

}  // namespace cpuformer
