// cpuformer/attention.h: fused scaled dot-product attention over heads, forward and backward (flash-style).
//
// out = softmax(scale * Q K^T + mask) V per (batch b, head h), without ever building the (T, S) score matrix:
// keys are processed in tiles with an online softmax, and only the log-sum-exp of each query row (B, H, T) is saved
// for backward, which recomputes the probabilities tile by tile. Memory is O(B T C), not O(B H T S).
//
// Tensors are batch-first with heads side by side in the last axis, addressed by strides so that a fused QKV
// projection (B, T, 3C) can be read in place: element (b, t, h, d) of a HeadTensor is data[b*sb + t*st + h*D + d].
//
// A query row whose keys are all masked gives an output of zeros (never NaN), lse = -inf and zero gradients.
#pragma once

#include <cstdint>

#include "cpuformer/common.h"

namespace cpuformer {

struct HeadTensor {
  float* data;
  index_t sb, st;  // element strides of batch and time
};
struct ConstHeadTensor {
  const float* data;
  index_t sb, st;
};

struct AttentionMask {
  // Additive float mask (0 / -inf or any value), element (b, h, t, s) at additive[b*sb + h*sh + t*st + s]:
  // (T, S) -> sb = sh = 0; (B, T, S) -> sh = 0; (B*H, T, S) -> sb = H*sh.
  const float* additive = nullptr;
  index_t add_sb = 0, add_sh = 0, add_st = 0;
  const std::uint8_t* key_padding = nullptr;  // (B, S): nonzero = this key is padding
  bool causal = false;                        // query t sees keys s <= pos(t) (top-left aligned, as is_causal)
  // Positions for decoding over a cache: query t of batch b sits at pos(t) = query_offset[b] + t (null: t). The
  // causal rule, the sliding window and ALiBi use pos(t); keys s >= key_length[b] are invisible (null: none).
  const std::int64_t* query_offset = nullptr;  // (B)
  const std::int64_t* key_length = nullptr;    // (B)
  index_t window = 0;                   // sliding window (Mistral): query sees keys s > pos(t) - window; 0 = none
  const float* alibi_slopes = nullptr;  // (H): score += slope[h] * (s - pos(t))  (ALiBi)
};

struct AttentionConfig {
  index_t B, H, T, S, D;    // batch, heads, query length, key length, head size
  float scale;              // usually 1 / sqrt(D)
  float dropout_p = 0.0f;   // dropout on the attention probabilities (training); mask regenerated in backward
  std::uint64_t seed = 0;   // dropout seed: keep(b, h, t, s) is a pure function of (seed, b, h, t, s)
  // Grouped-query / multi-query attention: K and V hold KVH heads (H a multiple of KVH); query head h reads key
  // and value head h / (H / KVH). 0 = H (plain multi-head).
  index_t KVH = 0;
};

// q (B, T, H*D), k and v (B, S, KVH*D) (the caller makes sure the strided views are that wide); out (B, T, H*D)
// overwritten; lse (B, H, T) may be null (inference). Key tiles that no query of a tile can see (past the causal
// limit or key_length, before the window) are skipped and their K/V rows never read.
void attention_forward(HeadTensor out, float* lse, ConstHeadTensor q, ConstHeadTensor k, ConstHeadTensor v,
                       const AttentionMask& mask, const AttentionConfig& cfg);

// dq (B, T, H*D), dk and dv (B, S, KVH*D) overwritten; needs the forward's out and lse. dadditive (may be null;
// needs mask.additive): the gradient with respect to mask.additive (a learned position bias), ACCUMULATED at the
// mask's own strides (summed over broadcast axes, i.e. those with stride 0; the slices of distinct (b, h) must
// either coincide or be disjoint). Results do not depend on the thread count.
void attention_backward(HeadTensor dq, HeadTensor dk, HeadTensor dv, ConstHeadTensor dout, ConstHeadTensor q,
                        ConstHeadTensor k, ConstHeadTensor v, ConstHeadTensor out, const float* lse,
                        const AttentionMask& mask, const AttentionConfig& cfg, float* dadditive = nullptr);

// The attention probabilities themselves, weights (B, H, T, S), for inspection (materialises them; no dropout).
void attention_weights(float* weights, ConstHeadTensor q, ConstHeadTensor k, const AttentionMask& mask,
                       const AttentionConfig& cfg);

}  // namespace cpuformer
