// cpuformer/linear.h: a Linear layer's weight in any of its forms, and its product, y = x W^T + b.
//
// The weight is read where it lies: PyTorch's (out, in) layout, or the (in, out) layout of GPT-2's Conv1D
// (`in_out`), so checkpoints are never transposed at load. For inference it may also be prepared once: packed
// into the GEMM's panels (freeze) or quantized to int8 (quantize_dynamic); the product then uses that form. A
// checkpoint's bf16/f16 weight may also be used as it lies (`half`, e.g. memory-mapped), converted inside the product.
#pragma once

#include <cstdint>

#include "cpuformer/common.h"
#include "cpuformer/half.h"
#include "cpuformer/matmul.h"
#include "cpuformer/quantize.h"

namespace cpuformer {

// A LoRA adapter on a Linear layer (PEFT's layout): y += scale * (dropout(x) A^T) B^T with A (r, in), B (out, r),
// scale = alpha / r. Gradients of A and B are accumulated into grad_a / grad_b when they are non-null.
//
// Dropout (PEFT's lora_dropout) acts on the adapter's input only (the base product sees x as it is), and only when
// `training`: element (i, j) of x (row i, column j) is kept when lora_dropout_keep(seed, i * in + j, dropout) and
// then scaled by 1 / (1 - dropout). The mask is a function of (seed, element) alone, so backward regenerates it
// (nothing is stored) and it does not depend on the thread count. A model's own adapters keep training = false (its
// inference and merge never drop); a training step uses copies with training set and a seed of its own per adapter.
struct LoraAdapter {
  const float* a = nullptr;
  const float* b = nullptr;
  index_t r = 0;
  float scale = 0.0f;
  float* grad_a = nullptr;
  float* grad_b = nullptr;
  float dropout = 0.0f;     // in [0, 1)
  bool training = false;    // apply the dropout
  std::uint64_t seed = 0;   // the mask's seed (training)
};

// Whether dropout keeps element `counter` under `seed` (the draw of LoraAdapter's mask; element (i, j) of an
// (rows, in) input is counter i * in + j).
bool lora_dropout_keep(std::uint64_t seed, std::uint64_t counter, float dropout);

// The seed of adapter `index` (its position among a model's adapters) in the training step seeded `step_seed`:
// every adapter gets its own mask, every step new ones.
std::uint64_t lora_dropout_seed(std::uint64_t step_seed, std::uint64_t index);

struct LinearRef {
  index_t in = 0, out = 0;
  const float* weight = nullptr;  // (out, in), or (in, out) when in_out; may be null when a prepared form is given
  const float* bias = nullptr;    // (out) or null
  bool in_out = false;
  const PackedMatrix* packed = nullptr;  // op(weight) packed by sgemm_pack_b (float32, inference)
  const Int8Weight* int8 = nullptr;      // int8 per-channel weight (inference)
  const std::uint16_t* half = nullptr;   // 16-bit weight in weight's layout (inference; training only needs dx)
  HalfType half_type = HalfType::kBF16;
  bool bf16_activations = false;         // with `half`: products with x rounded to bf16 (gemm_half's option)

  const LoraAdapter* lora = nullptr;     // an adapter added to the product (fine-tuning), or null
  bool present() const { return weight || packed || int8 || half; }
};

// y[rows, out] (row stride ldy) = x[rows, in] (row stride ldx) W^T + b, through whichever form w holds (int8 first,
// then packed; a packed product of 1-4 rows reads the float weight when it has one: streaming W once beats packing;
// then the float weight, then the 16-bit one).
void linear_forward(float* y, index_t ldy, const float* x, index_t ldx, index_t rows, const LinearRef& w);

// dx[rows, in] = dy W (overwritten, or added when accumulate_dx; dx may be null: no input gradient);
// dweight += dy^T x in the weight's own layout, dbias += column sums of dy (either may be null: frozen).
// Needs the float weight, or, for dx only, the 16-bit one (dweight with only a 16-bit weight throws
// std::invalid_argument: gradients of 16-bit weights are not supported; frozen ones need only dx).
void linear_backward(float* dx, index_t lddx, bool accumulate_dx, float* dweight, float* dbias, const float* dy,
                     index_t lddy, const float* x, index_t ldx, index_t rows, const LinearRef& w);

}  // namespace cpuformer
