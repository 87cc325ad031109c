// attention.cpp: fused multi-head scaled dot-product attention, forward and backward, flash-style.
//
// Forward, per (b, h) in parallel with dynamic scheduling (split into runs of query blocks when there are too few
// (b, h) pairs for the threads); the keys and values are packed for the GEMMs once per task. Per query block:
//   for each block of kBlockK keys (only up to the diagonal when causal):
//     S = scale * Q K^T (GEMM), add masks, online softmax: m' = max(m, rowmax S), P = exp(S - m'),
//     l = l * exp(m - m') + rowsum P, O = O * exp(m - m') + P V (GEMM)
//   O /= l, lse = m + log l.
// Backward, per (b, h) in parallel (dK, dV accumulate over query blocks inside one thread: no races; K^T, V^T and K
// packed once, each query block's dO and Q once):
//   D = rowsum(dO * O); for each (query block, key block): recompute S and P = exp(S - lse),
//   dV += P^T dO, dP = dO V^T, dS = P * (dP - D), dQ += scale dS K, dK += scale dS^T Q   (five GEMMs).
// See the shared design note kernels.md section 2 (PyTorch's CPU flash attention, ggml).
#include "cpuformer/attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gemm_internal.h"
#include "parallel.h"
#include "random.h"
#include "rowops.h"

namespace cpuformer {
namespace {

constexpr index_t kBlockK = 256;
constexpr index_t kMaxBlockQ = 256;

// Query rows per tile. Taller tiles read each packed key block fewer times at long T; short sequences keep enough
// tiles to share between threads when there are few (b, h) pairs. With keys packed once per (b, h), 64, 128 and
// 256 rows measured within 2% of each other at T = 128..2048 (one thread).
index_t block_q(index_t T) { return T >= 768 ? 256 : T >= 192 ? 128 : 64; }
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_config(const char* who, const AttentionConfig& c) {
  CPUFORMER_CHECK(c.B >= 1 && c.H >= 1 && c.T >= 1 && c.S >= 1 && c.D >= 1, who, ": bad sizes B=", c.B,
                  " H=", c.H, " T=", c.T, " S=", c.S, " D=", c.D);
  CPUFORMER_CHECK(std::isfinite(c.scale), who, ": scale must be finite");
  CPUFORMER_CHECK(c.dropout_p >= 0.0f && c.dropout_p < 1.0f, who, ": dropout_p must be in [0, 1), got ",
                  c.dropout_p);
}

// Pointers to row t of head h of batch b.
inline const float* at(const ConstHeadTensor& x, index_t b, index_t t, index_t h, index_t D) {
  return x.data + b * x.sb + t * x.st + h * D;
}
inline float* at(const HeadTensor& x, index_t b, index_t t, index_t h, index_t D) {
  return x.data + b * x.sb + t * x.st + h * D;
}

// Keys past this one are never visible to the query block ending at t_end (exclusive).
index_t key_limit(const AttentionMask& m, const AttentionConfig& c, index_t t_end) {
  return m.causal ? std::min(c.S, t_end) : c.S;
}

// Add the masks to a score tile S (rows t0.., key columns s0..; ld = row stride of the tile).
void mask_tile(float* S, index_t ld, index_t bq, index_t bk, index_t b, index_t h, index_t t0, index_t s0,
               const AttentionMask& m, const AttentionConfig& c) {
  if (m.additive) {
    for (index_t i = 0; i < bq; ++i) {
      const float* add = m.additive + b * m.add_sb + h * m.add_sh + (t0 + i) * m.add_st + s0;
      float* row = S + i * ld;
      for (index_t j = 0; j < bk; ++j) row[j] += add[j];
    }
  }
  if (m.key_padding) {
    const std::uint8_t* pad = m.key_padding + b * c.S + s0;
    for (index_t j = 0; j < bk; ++j)
      if (pad[j])
        for (index_t i = 0; i < bq; ++i) S[i * ld + j] = kNegInf;
  }
  if (m.causal && s0 + bk - 1 > t0) {  // the tile crosses the diagonal
    for (index_t i = 0; i < bq; ++i)
      for (index_t j = std::max<index_t>(0, t0 + i + 1 - s0); j < bk; ++j) S[i * ld + j] = kNegInf;
  }
}

// The score tile S = scale * Q[t0:t0+bq] K[s0:s0+bk]^T + masks (ld = row stride of S); K^T comes from packed_kt
// when given (a PackedKeyBlocks block), else it is read in place. Forward, backward and the weights path all go
// through here, and packing does not change the arithmetic, so backward recomputes exactly the forward's scores.
void score_tile(float* S, index_t ld, index_t bq, index_t bk, index_t b, index_t h, index_t t0, index_t s0,
                const ConstHeadTensor& q, const ConstHeadTensor& k, const float* packed_kt, const AttentionMask& m,
                const AttentionConfig& c) {
  if (packed_kt)
    detail::sgemm_single_thread_packed(false, bq, bk, c.D, c.scale, at(q, b, t0, h, c.D), q.st, packed_kt, 0.0f, S,
                                       ld);
  else
    detail::sgemm_single_thread(false, true, bq, bk, c.D, c.scale, at(q, b, t0, h, c.D), q.st,
                                at(k, b, s0, h, c.D), k.st, 0.0f, S, ld);
  mask_tile(S, ld, bq, bk, b, h, t0, s0, m, c);
}

// Dropout on a probability tile: P[i, j] *= keep(b, h, t0 + i, s0 + j) / (1 - p).
void dropout_tile(float* P, index_t ld, index_t bq, index_t bk, index_t b, index_t h, index_t t0, index_t s0,
                  const AttentionConfig& c) {
  const std::uint32_t threshold = detail::dropout_threshold(c.dropout_p);
  const float scale = 1.0f / (1.0f - c.dropout_p);
  for (index_t i = 0; i < bq; ++i) {
    const std::uint64_t row = static_cast<std::uint64_t>(((b * c.H + h) * c.T + t0 + i) * c.S + s0);
    float* p = P + i * ld;
    for (index_t j = 0; j < bk; ++j)
      p[j] = detail::dropout_keep(c.seed, row + static_cast<std::uint64_t>(j), threshold) ? p[j] * scale : 0.0f;
  }
}

// Grow-only per-thread scratch.
struct Scratch {
  std::vector<float> scores, probs, dropped, m, l, d;
  // Packed operands of one (batch, head): keys (as K^T and as K), values (as V or V^T), and one query block's rows.
  detail::AlignedBuffer keys_t, keys, values, rows;
};
thread_local Scratch t_scratch;

// One key-side operand of a (batch, head), packed for the GEMMs block by block (kBlockK keys) on first use, so every
// query block reuses it: x^T (D x keys: the products whose columns are keys) or x (keys x D: the products that sum
// over keys). Blocks are first used in order; causal query blocks reach further keys as they go. A block is packed
// whole, so a product over only part of it (a causal block cut at the diagonal) must read x in place instead.
class PackedKeyBlocks {
 public:
  PackedKeyBlocks(detail::AlignedBuffer& buffer, bool transposed, index_t n_blocks, index_t D)
      : slot_(transposed ? detail::packed_b_size(D, kBlockK) : detail::packed_b_size(kBlockK, D)),
        D_(D),
        transposed_(transposed),
        data_(buffer.get(n_blocks * slot_)) {}

  // Block kb of x, whose first row is x0 (row stride `stride`, n_keys rows in the block).
  const float* block(index_t kb, const float* x0, index_t stride, index_t n_keys) {
    float* p = data_ + kb * slot_;
    if (kb == n_packed_) {
      if (transposed_) detail::pack_b(p, true, D_, n_keys, x0, stride);
      else detail::pack_b(p, false, n_keys, D_, x0, stride);
      ++n_packed_;
    }
    return p;
  }

 private:
  index_t slot_, D_, n_packed_ = 0;
  bool transposed_;
  float* data_;
};

// Query blocks per forward task. Each task packs the keys and values it reads once, so whole (batch, head) pairs
// are best; they are split only when there are too few of them to keep every thread busy.
index_t qblocks_per_task(index_t bh_count, index_t n_qblocks) {
  const index_t want_tasks = 3 * detail::kernel_threads();
  const index_t chunks = std::min(n_qblocks, std::max<index_t>(1, (want_tasks + bh_count - 1) / bh_count));
  return (n_qblocks + chunks - 1) / chunks;
}

}  // namespace

void attention_forward(HeadTensor out, float* lse, ConstHeadTensor q, ConstHeadTensor k, ConstHeadTensor v,
                       const AttentionMask& mask, const AttentionConfig& c) {
  check_config("attention_forward", c);
  const index_t D = c.D, block = block_q(c.T), n_qblocks = (c.T + block - 1) / block;
  const index_t per_task = qblocks_per_task(c.B * c.H, n_qblocks), n_chunks = (n_qblocks + per_task - 1) / per_task;
  detail::parallel_for_dynamic(c.B * c.H * n_chunks, [&](index_t task, int) {
    const index_t chunk = task % n_chunks, bh = task / n_chunks, b = bh / c.H, h = bh % c.H;
    const index_t qb_end = std::min(n_qblocks, (chunk + 1) * per_task);
    const index_t n_kblocks = (key_limit(mask, c, std::min(c.T, qb_end * block)) + kBlockK - 1) / kBlockK;
    Scratch& s = t_scratch;
    s.scores.resize(kMaxBlockQ * kBlockK);
    float* S = s.scores.data();
    PackedKeyBlocks keys_t(s.keys_t, true, n_kblocks, D), values(s.values, false, n_kblocks, D);
    for (index_t qb = chunk * per_task; qb < qb_end; ++qb) {
      const index_t t0 = qb * block, bq = std::min(block, c.T - t0);
      s.m.assign(bq, kNegInf);
      s.l.assign(bq, 0.0f);
      float* O = at(out, b, t0, h, D);
      for (index_t i = 0; i < bq; ++i)
        for (index_t d = 0; d < D; ++d) O[i * out.st + d] = 0.0f;
      const index_t s_end = key_limit(mask, c, t0 + bq);
      for (index_t s0 = 0, kb = 0; s0 < s_end; s0 += kBlockK, ++kb) {
        const index_t bk = std::min(kBlockK, s_end - s0), full = std::min(kBlockK, c.S - s0);
        const float* kt = keys_t.block(kb, at(k, b, s0, h, D), k.st, full);
        const float* vb = values.block(kb, at(v, b, s0, h, D), v.st, full);
        const bool whole = bk == full;
        score_tile(S, kBlockK, bq, bk, b, h, t0, s0, q, k, whole ? kt : nullptr, mask, c);
        for (index_t i = 0; i < bq; ++i) {  // online softmax
          float* row = S + i * kBlockK;
          const float m_new = std::fmax(s.m[i], detail::row_max(row, bk));
          if (m_new == kNegInf) {  // nothing visible yet in this row
            for (index_t j = 0; j < bk; ++j) row[j] = 0.0f;
            continue;
          }
          const double row_sum = detail::row_exp_sum(row, row, bk, m_new);
          if (s.m[i] == kNegInf) {  // first visible keys: O and l are still zero
            s.l[i] = static_cast<float>(row_sum);
          } else {
            const float correction = std::exp(s.m[i] - m_new);
            s.l[i] = static_cast<float>(s.l[i] * correction + row_sum);
            if (correction != 1.0f) detail::row_scale(O + i * out.st, D, correction);
          }
          s.m[i] = m_new;
        }
        if (c.dropout_p > 0.0f) dropout_tile(S, kBlockK, bq, bk, b, h, t0, s0, c);
        if (whole)
          detail::sgemm_single_thread_packed(false, bq, D, bk, 1.0f, S, kBlockK, vb, 1.0f, O, out.st);
        else
          detail::sgemm_single_thread(false, false, bq, D, bk, 1.0f, S, kBlockK, at(v, b, s0, h, D), v.st, 1.0f, O,
                                      out.st);
      }
      for (index_t i = 0; i < bq; ++i) {
        const bool empty = s.l[i] == 0.0f;  // every key masked: output 0, lse -inf
        detail::row_scale(O + i * out.st, D, empty ? 0.0f : 1.0f / s.l[i]);
        if (lse) lse[bh * c.T + t0 + i] = empty ? kNegInf : s.m[i] + std::log(s.l[i]);
      }
    }
  });
}

void attention_backward(HeadTensor dq, HeadTensor dk, HeadTensor dv, ConstHeadTensor dout, ConstHeadTensor q,
                        ConstHeadTensor k, ConstHeadTensor v, ConstHeadTensor out, const float* lse,
                        const AttentionMask& mask, const AttentionConfig& c, float* dadditive) {
  check_config("attention_backward", c);
  CPUFORMER_CHECK(dadditive == nullptr, "attention_backward: dadditive is not implemented yet");
  CPUFORMER_CHECK(lse != nullptr, "attention_backward: lse from the forward is required");
  const index_t D = c.D;
  detail::parallel_for_dynamic(c.B * c.H, [&](index_t bh, int) {
    const index_t b = bh / c.H, h = bh % c.H;
    Scratch& s = t_scratch;
    s.scores.resize(kMaxBlockQ * kBlockK);
    s.probs.resize(kMaxBlockQ * kBlockK);
    s.d.resize(c.T);
    float* P = s.scores.data();
    float* dS = s.probs.data();
    for (index_t t = 0; t < c.T; ++t) {  // D_t = dO_t . O_t, and dQ starts at zero
      const float* o = at(out, b, t, h, D);
      const float* g = at(dout, b, t, h, D);
      double acc = 0.0;
      for (index_t d = 0; d < D; ++d) acc += static_cast<double>(o[d]) * g[d];
      s.d[t] = static_cast<float>(acc);
      float* dqr = at(dq, b, t, h, D);
      for (index_t d = 0; d < D; ++d) dqr[d] = 0.0f;
    }
    for (index_t t = 0; t < c.S; ++t) {
      float* dkr = at(dk, b, t, h, D);
      float* dvr = at(dv, b, t, h, D);
      for (index_t d = 0; d < D; ++d) dkr[d] = dvr[d] = 0.0f;
    }
    const float* lse_bh = lse + bh * c.T;
    const index_t block = block_q(c.T);
    const index_t n_kblocks = (key_limit(mask, c, c.T) + kBlockK - 1) / kBlockK;
    PackedKeyBlocks keys_t(s.keys_t, true, n_kblocks, D), values_t(s.values, true, n_kblocks, D),
        keys(s.keys, false, n_kblocks, D);
    // One query block's dO and Q rows, packed as the B of dV += P^T dO and dK += dS^T Q.
    const index_t rows_slot = detail::packed_b_size(block, D);
    float* packed_dout = s.rows.get(2 * rows_slot);
    float* packed_q = packed_dout + rows_slot;
    for (index_t t0 = 0; t0 < c.T; t0 += block) {
      const index_t bq = std::min(block, c.T - t0);
      const float* dout_rows = at(dout, b, t0, h, D);
      detail::pack_b(packed_dout, false, bq, D, dout_rows, dout.st);
      detail::pack_b(packed_q, false, bq, D, at(q, b, t0, h, D), q.st);
      const index_t s_end = key_limit(mask, c, t0 + bq);
      for (index_t s0 = 0, kb = 0; s0 < s_end; s0 += kBlockK, ++kb) {
        const index_t bk = std::min(kBlockK, s_end - s0), full = std::min(kBlockK, c.S - s0);
        const float* kt = keys_t.block(kb, at(k, b, s0, h, D), k.st, full);
        const float* vt = values_t.block(kb, at(v, b, s0, h, D), v.st, full);
        const float* kn = keys.block(kb, at(k, b, s0, h, D), k.st, full);
        const bool whole = bk == full;  // else the causal diagonal cuts the block: read K and V in place
        score_tile(P, kBlockK, bq, bk, b, h, t0, s0, q, k, whole ? kt : nullptr, mask, c);
        for (index_t i = 0; i < bq; ++i) {  // P = exp(S - lse); a fully masked row (lse = -inf) is all zeros
          float* row = P + i * kBlockK;
          if (lse_bh[t0 + i] == kNegInf) {
            for (index_t j = 0; j < bk; ++j) row[j] = 0.0f;
          } else {
            detail::row_exp_sum(row, row, bk, lse_bh[t0 + i]);
          }
        }
        // dP = dO V^T (into dS), through the dropout mask when there is one.
        if (whole)
          detail::sgemm_single_thread_packed(false, bq, bk, D, 1.0f, dout_rows, dout.st, vt, 0.0f, dS, kBlockK);
        else
          detail::sgemm_single_thread(false, true, bq, bk, D, 1.0f, dout_rows, dout.st, at(v, b, s0, h, D), v.st,
                                      0.0f, dS, kBlockK);
        const float* p_kept = P;
        if (c.dropout_p > 0.0f) {
          dropout_tile(dS, kBlockK, bq, bk, b, h, t0, s0, c);
          // dV += (P * keep / (1 - p))^T dO: the dropped probabilities, while P itself is kept for dS.
          s.dropped.assign(P, P + kMaxBlockQ * kBlockK);
          dropout_tile(s.dropped.data(), kBlockK, bq, bk, b, h, t0, s0, c);
          p_kept = s.dropped.data();
        }
        detail::sgemm_single_thread_packed(true, bk, D, bq, 1.0f, p_kept, kBlockK, packed_dout, 1.0f,
                                           at(dv, b, s0, h, D), dv.st);
        for (index_t i = 0; i < bq; ++i) {  // dS = P * (dP - D)
          const float* p = P + i * kBlockK;
          float* g = dS + i * kBlockK;
          const float di = s.d[t0 + i];
          for (index_t j = 0; j < bk; ++j) g[j] = p[j] * (g[j] - di);
        }
        if (whole)
          detail::sgemm_single_thread_packed(false, bq, D, bk, c.scale, dS, kBlockK, kn, 1.0f, at(dq, b, t0, h, D),
                                             dq.st);
        else
          detail::sgemm_single_thread(false, false, bq, D, bk, c.scale, dS, kBlockK, at(k, b, s0, h, D), k.st,
                                      1.0f, at(dq, b, t0, h, D), dq.st);
        detail::sgemm_single_thread_packed(true, bk, D, bq, c.scale, dS, kBlockK, packed_q, 1.0f,
                                           at(dk, b, s0, h, D), dk.st);
      }
    }
  });
}

void attention_weights(float* weights, ConstHeadTensor q, ConstHeadTensor k, const AttentionMask& mask,
                       const AttentionConfig& c) {
  check_config("attention_weights", c);
  const index_t block = block_q(c.T), n_qblocks = (c.T + block - 1) / block;
  detail::parallel_for_dynamic(c.B * c.H * n_qblocks, [&](index_t task, int) {
    const index_t qb = task % n_qblocks, bh = task / n_qblocks, b = bh / c.H, h = bh % c.H;
    const index_t t0 = qb * block, bq = std::min(block, c.T - t0);
    float* W = weights + (bh * c.T + t0) * c.S;
    score_tile(W, c.S, bq, c.S, b, h, t0, 0, q, k, nullptr, mask, c);
    for (index_t i = 0; i < bq; ++i) {
      float* row = W + i * c.S;
      const float m = detail::row_max(row, c.S);
      if (m == kNegInf) {  // fully masked: zeros (scaling -inf by 0 would give NaN)
        for (index_t j = 0; j < c.S; ++j) row[j] = 0.0f;
        continue;
      }
      detail::row_scale(row, c.S, static_cast<float>(1.0 / detail::row_exp_sum(row, row, c.S, m)));
    }
  });
}

}  // namespace cpuformer
