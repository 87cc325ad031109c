// cpuformer/block.h: one Transformer block, the single definition behind training, Python inference and the C++
// runtime.
//
//   post-norm (the paper, BERT):  x = norm1(x + drop(attn(x)));  [x = norm2(x + drop(cross(x, mem)));]
//                                 x = normF(x + drop(ff(x)))
//   pre-norm (GPT, Llama, T5):    x = x + drop(attn(norm1(x)));  [x = x + drop(cross(norm2(x), mem));]
//                                 x = x + drop(ff(normF(x)))
//
// attn is multi-head, grouped-query or multi-query attention with optional rotary positions, ALiBi, a T5-style
// relative position bias, per-head q/k RMSNorm (Qwen3), sliding window; cross attends over an encoder's output;
// ff is plain or gated (feedforward.h). Norms are LayerNorm (with or without bias) or RMSNorm (optionally 1 + w).
// Weights are read in place in their checkpoint layouts (LinearRef); prepared (packed, int8) forms serve inference.
//
// Entry points:
//   block_forward_train / block_backward: the caller owns a BlockSaved holding what backward needs;
//   block_forward: inference, scratch per call (one block may be run by many threads at once);
//   block_decode: incremental decoding over a key/value cache (rows of different lengths; reorder for beams).
// Flash-style attention throughout: memory O(B T C), never O(T^2).
#pragma once

#include <cstdint>
#include <vector>

#include "cpuformer/activations.h"
#include "cpuformer/attention.h"
#include "cpuformer/common.h"
#include "cpuformer/feedforward.h"
#include "cpuformer/linear.h"
#include "cpuformer/positions.h"

namespace cpuformer {

enum class NormKind { kLayerNorm, kRMSNorm };
enum class PositionKind { kNone, kRotary, kAlibi, kRelativeBias };

struct BlockConfig {
  index_t d_model = 0, num_heads = 0;
  index_t num_kv_heads = 0;  // 0: num_heads; must divide num_heads
  index_t head_dim = 0;      // 0: d_model / num_heads
  NormKind norm = NormKind::kLayerNorm;
  float norm_eps = 1e-5f;
  bool norm_one_plus = false;  // RMSNorm scaled by 1 + weight (Gemma)
  bool norm_first = false;
  bool qk_norm = false;  // RMSNorm (eps norm_eps) over each head of q and k, weights (head_dim) (Qwen3)
  Activation activation = Activation::kRelu;
  bool cross_attention = false;  // a decoder block of an encoder-decoder: self, cross, feed-forward
  float attention_scale = 0.0f;  // 0: 1/sqrt(head_dim); T5 uses 1 (no scaling)
  index_t sliding_window = 0;    // self-attention sees only the last `sliding_window` positions (0: all)
  PositionKind position = PositionKind::kNone;
  RotaryConfig rotary;           // position == kRotary (head_dim filled in from the block's)
  RelativeBiasConfig relative;   // position == kRelativeBias (self-attention only)
  // Dropout (training): on each sublayer's output before the residual add, on the feed-forward's hidden
  // activations, and on the attention probabilities.
  float dropout = 0.0f, ff_dropout = 0.0f, attention_dropout = 0.0f;

  index_t kv_heads() const { return num_kv_heads ? num_kv_heads : num_heads; }
  index_t head_size() const { return head_dim ? head_dim : (num_heads ? d_model / num_heads : 0); }
};

struct NormRef {
  const float* weight = nullptr;  // (C); null: no scale (LayerNorm elementwise_affine=False)
  const float* bias = nullptr;    // (C) or null
};

struct AttentionWeights {
  // Projections, either fused (qkv: rows [q | k | v], torch MHA's in_proj, GPT-2's c_attn; for cross-attention
  // q plus kv: rows [k | v]) or separate (q, k, v). Output projection o.
  LinearRef qkv, q, k, v, kv, o;
  const float* q_norm = nullptr;          // (head_dim), qk_norm only
  const float* k_norm = nullptr;
  const float* relative_table = nullptr;  // (num_buckets, num_heads), kRelativeBias only
};

struct BlockWeights {
  AttentionWeights self_attn, cross_attn;
  NormRef norm1, norm2, norm_ff;  // norm1: self-attention's; norm2: cross-attention's; norm_ff: feed-forward's
  FeedForwardWeights ff;
};

struct LinearGrads {
  float* weight = nullptr;
  float* bias = nullptr;
};
struct AttentionGrads {
  LinearGrads qkv, q, k, v, kv, o;
  float *q_norm = nullptr, *k_norm = nullptr, *relative_table = nullptr;
};
struct NormGrads {
  float* weight = nullptr;
  float* bias = nullptr;
};
// Accumulated (+=). Null pointers are frozen parameters: no gradient and no weight-gradient GEMM.
struct BlockGrads {
  AttentionGrads self_attn, cross_attn;
  NormGrads norm1, norm2, norm_ff;
  FeedForwardGrads ff;
};

// One call's inputs besides x.
struct BlockInput {
  index_t B = 0, T = 0;
  const std::uint8_t* key_padding = nullptr;  // (B, T): nonzero = padding key (self-attention)
  const float* additive = nullptr;            // additive self-attention mask at the strides below (see attention.h)
  index_t add_sb = 0, add_sh = 0, add_st = 0;
  bool causal = false;
  const std::int64_t* position_offset = nullptr;  // (B): row t of batch b is at position offset[b] + t (null: t)
  // Cross-attention (cross_attention blocks): the encoder output (B, S, d_model) and its padding (B, S).
  const float* memory = nullptr;
  index_t S = 0;
  const std::uint8_t* memory_padding = nullptr;
  const float* memory_additive = nullptr;
  index_t mem_add_sb = 0, mem_add_sh = 0, mem_add_st = 0;
};

// What training's forward keeps for backward. Owned by the caller; grown as needed, reused from step to step.
struct BlockSaved {
  BlockInput in;
  std::uint64_t seed = 0;
  bool valid = false;
  std::vector<float> x0, normed1, stat1a, stat1b, qkv, q_pre, k_pre, qk_rstd, attn, lse, bias;
  std::vector<float> x1, normed2, stat2a, stat2b, cq, ckv, cattn, clse;
  std::vector<float> x2, normed3, stat3a, stat3b, u, a;
  std::vector<float> y, tmp;  // inference's work buffers (training's and backward's are the calling thread's own)
  // Set by the caller before the training forward: false when no gradient of the feed-forward's down projection
  // (and no adapter on it) is wanted, so its input activation need not be kept (a frozen or LoRA-only MLP).
  bool keep_ff_activation = true;
};

// Checks a configuration and weights (sizes, presence, divisibility); throws std::invalid_argument naming the
// first problem. Every entry point runs it.
void block_check(const BlockConfig& cfg, const BlockWeights& w);

// Inference: x (B, T, d_model) -> out (B, T, d_model) (out may alias x). attn_weights (B, H, T, T), when non-null,
// receives the self-attention probabilities (materialised, for inspection). Its work buffers are the calling
// thread's own, kept from call to call (fresh multi-megabyte buffers would cost page faults on every call); no
// state is shared between threads.
void block_forward(float* out, const float* x, const BlockConfig& cfg, const BlockWeights& w, const BlockInput& in,
                   float* attn_weights = nullptr);

// Training forward: as block_forward, with dropout (seeded by `seed`) and everything backward needs in `saved`.
void block_forward_train(float* out, const float* x, const BlockConfig& cfg, const BlockWeights& w,
                         const BlockInput& in, std::uint64_t seed, BlockSaved& saved, float* attn_weights = nullptr);

// dx (B, T, d_model) overwritten; dmemory (B, S, d_model), cross-attention blocks only, ACCUMULATED (the memory
// feeds every decoder block); parameter gradients accumulated into g.
void block_backward(float* dx, float* dmemory, const float* dout, const BlockConfig& cfg, const BlockWeights& w,
                    const BlockGrads& g, BlockSaved& saved);

// The attention sublayer alone, as torch.nn.MultiheadAttention: out = o(attention(q(xq), k(xk), v(xv))), the
// same code as the block's. Self-attention when xq == xk == xv (B, T, C) (one fused projection; the config's
// positions and q/k norms apply; masks from in.key_padding / in.additive / in.causal); otherwise keys and values
// over in.S positions (one k|v GEMM when xk == xv and the weights are fused; masks from in.memory_padding /
// in.memory_additive and `causal`). The config's attention_dropout applies when training (then `saved` is given).
struct AttentionLayerSaved {
  BlockInput in;
  bool self = true, causal = false, valid = false;
  float dropout = 0.0f;
  std::uint64_t seed = 0;
  const float *xq = nullptr, *xk = nullptr, *xv = nullptr;  // the inputs: the caller keeps them until backward
  std::vector<float> qkv, q_pre, k_pre, qk_rstd, attn, lse, bias, q, kv, scratch, tmp;
};
void attention_layer_forward(float* out, const float* xq, const float* xk, const float* xv, const BlockConfig& cfg,
                             const AttentionWeights& w, const BlockInput& in, bool causal, std::uint64_t seed,
                             AttentionLayerSaved* saved, float* attn_weights = nullptr);
// Input gradients (overwritten): dxq, dxk, dxv may all be one buffer (self-attention: their sum, one GEMM) or
// distinct (each input's own); parameter gradients accumulated.
void attention_layer_backward(float* dxq, float* dxk, float* dxv, const float* dout, const BlockConfig& cfg,
                              const AttentionWeights& w, const AttentionGrads& g, AttentionLayerSaved& saved);

// Key/value cache of one block for incremental decoding: rows of `capacity` positions of kv_heads * head_dim keys
// and values, length[b] of them filled.
struct KVCache {
  index_t batch = 0, capacity = 0, width = 0;
  std::vector<float> k, v;
  std::vector<std::int64_t> length;
  void reset(index_t batch, index_t capacity, index_t width);
  // Grows every row to `capacity` positions, keeping what they hold (generation grows its caches as it goes).
  void reserve(index_t capacity);
  // Beam search: new row i becomes old row rows[i] (n rows; n may differ from batch).
  void reorder(const std::int64_t* rows, index_t n);
};

// Projects an encoder output (B, S, d_model) to the cross-attention keys and values once (a cross_attention
// block's), for every decode step: cache rows of S positions, all filled.
void block_cross_cache(const float* memory, index_t B, index_t S, const BlockConfig& cfg, const BlockWeights& w,
                       KVCache& cache);

// Incremental decoding: x (B, T, d_model) are the next T positions of each row, appended to `cache` at its row's
// length; new_tokens (B, may be null: all T) says how many of them are real for each row (a batch of prompts of
// different lengths: the rest are ignored and not kept). Attends over the cache (causal, window, positions from
// the row's length). Cross-attention blocks read `cross` (block_cross_cache) with memory_padding (B, S).
// output_rows (B, may be null: every position) names one new position per row whose output alone is wanted (a
// prompt's last token in the last block): every real position's keys and values still go into the cache, and out
// is then (B, d_model).
void block_decode(float* out, const float* x, const BlockConfig& cfg, const BlockWeights& w, index_t B, index_t T,
                  const std::int64_t* new_tokens, KVCache& cache, const KVCache* cross = nullptr,
                  const std::uint8_t* memory_padding = nullptr, const std::int64_t* output_rows = nullptr);

}  // namespace cpuformer
