// attention.cpp: fused multi-head scaled dot-product attention, forward and backward, flash-style.
//
// Forward, per (b, h, block of query rows), in parallel with dynamic scheduling (causal blocks differ in work):
//   for each block of kBlockK keys (only up to the diagonal when causal):
//     S = scale * Q K^T (GEMM), add masks, online softmax: m' = max(m, rowmax S), P = exp(S - m'),
//     l = l * exp(m - m') + rowsum P, O = O * exp(m - m') + P V (GEMM)
//   O /= l, lse = m + log l.
// Backward, per (b, h) in parallel (dK, dV accumulate over query blocks inside one thread: no races):
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

// Query rows per tile. Each tile re-packs its K and V blocks for the GEMMs, so long sequences use taller tiles
// (fewer re-packs); short ones keep enough tiles to share between threads. PyTorch's CPU kernel picks 32/64/256
// by the same reasoning.
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

// The score tile S = scale * Q[t0:t0+bq] K[s0:s0+bk]^T + masks (ld = row stride of S). Forward, backward and the
// weights path all go through here, so backward recomputes exactly the scores forward used.
void score_tile(float* S, index_t ld, index_t bq, index_t bk, index_t b, index_t h, index_t t0, index_t s0,
                const ConstHeadTensor& q, const ConstHeadTensor& k, const AttentionMask& m, const AttentionConfig& c) {
  detail::sgemm_single_thread(false, true, bq, bk, c.D, c.scale, at(q, b, t0, h, c.D), q.st, at(k, b, s0, h, c.D),
                              k.st, 0.0f, S, ld);
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
  detail::AlignedBuffer keys, values;  // packed K^T and V blocks of one (batch, head)
};
thread_local Scratch t_scratch;

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
  // Packed sizes of one key block: K^T as the score product's B (D x kBlockK), V as the P.V product's B.
  const index_t k_slot = detail::packed_b_size(D, kBlockK), v_slot = detail::packed_b_size(kBlockK, D);
  detail::parallel_for_dynamic(c.B * c.H * n_chunks, [&](index_t task, int) {
    const index_t chunk = task % n_chunks, bh = task / n_chunks, b = bh / c.H, h = bh % c.H;
    const index_t qb_end = std::min(n_qblocks, (chunk + 1) * per_task);
    const index_t n_kblocks = (key_limit(mask, c, std::min(c.T, qb_end * block)) + kBlockK - 1) / kBlockK;
    Scratch& s = t_scratch;
    s.scores.resize(kMaxBlockQ * kBlockK);
    float* S = s.scores.data();
    float* packed_k = s.keys.get(n_kblocks * k_slot);
    float* packed_v = s.values.get(n_kblocks * v_slot);
    index_t n_packed = 0;  // key blocks packed so far (causal query blocks reach further keys as they go)
    for (index_t qb = chunk * per_task; qb < qb_end; ++qb) {
      const index_t t0 = qb * block, bq = std::min(block, c.T - t0);
      s.m.assign(bq, kNegInf);
      s.l.assign(bq, 0.0f);
      float* O = at(out, b, t0, h, D);
      for (index_t i = 0; i < bq; ++i)
        for (index_t d = 0; d < D; ++d) O[i * out.st + d] = 0.0f;
      const index_t s_end = key_limit(mask, c, t0 + bq);
      for (index_t s0 = 0, kb = 0; s0 < s_end; s0 += kBlockK, ++kb) {
        const index_t bk = std::min(kBlockK, s_end - s0);
        const index_t full = std::min(kBlockK, c.S - s0);
        if (kb == n_packed) {
          detail::pack_b(packed_k + kb * k_slot, true, D, full, at(k, b, s0, h, D), k.st);
          detail::pack_b(packed_v + kb * v_slot, false, full, D, at(v, b, s0, h, D), v.st);
          ++n_packed;
        }
        // A block that the causal limit cuts short (on the diagonal) does not match the packed layout: unpacked.
        const bool use_packed = bk == full;
        if (use_packed)
          detail::sgemm_single_thread_packed(bq, bk, D, c.scale, at(q, b, t0, h, D), q.st, packed_k + kb * k_slot,
                                             0.0f, S, kBlockK);
        else
          detail::sgemm_single_thread(false, true, bq, bk, D, c.scale, at(q, b, t0, h, D), q.st,
                                      at(k, b, s0, h, D), k.st, 0.0f, S, kBlockK);
        mask_tile(S, kBlockK, bq, bk, b, h, t0, s0, mask, c);
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
        if (use_packed)
          detail::sgemm_single_thread_packed(bq, D, bk, 1.0f, S, kBlockK, packed_v + kb * v_slot, 1.0f, O, out.st);
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
                        const AttentionMask& mask, const AttentionConfig& c) {
  check_config("attention_backward", c);
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
    for (index_t t0 = 0; t0 < c.T; t0 += block) {
      const index_t bq = std::min(block, c.T - t0);
      const index_t s_end = key_limit(mask, c, t0 + bq);
      for (index_t s0 = 0; s0 < s_end; s0 += kBlockK) {
        const index_t bk = std::min(kBlockK, s_end - s0);
        score_tile(P, kBlockK, bq, bk, b, h, t0, s0, q, k, mask, c);
        for (index_t i = 0; i < bq; ++i) {  // P = exp(S - lse); a fully masked row (lse = -inf) is all zeros
          float* row = P + i * kBlockK;
          if (lse_bh[t0 + i] == kNegInf) {
            for (index_t j = 0; j < bk; ++j) row[j] = 0.0f;
          } else {
            detail::row_exp_sum(row, row, bk, lse_bh[t0 + i]);
          }
        }
        // dP = dO V^T (into dS), through the dropout mask when there is one.
        detail::sgemm_single_thread(false, true, bq, bk, D, 1.0f, at(dout, b, t0, h, D), dout.st,
                                    at(v, b, s0, h, D), v.st, 0.0f, dS, kBlockK);
        if (c.dropout_p > 0.0f) {
          dropout_tile(dS, kBlockK, bq, bk, b, h, t0, s0, c);
          // dV += (P * keep / (1 - p))^T dO: the dropped probabilities, while P itself is kept for dS.
          s.dropped.assign(P, P + kMaxBlockQ * kBlockK);
          dropout_tile(s.dropped.data(), kBlockK, bq, bk, b, h, t0, s0, c);
          detail::sgemm_single_thread(true, false, bk, D, bq, 1.0f, s.dropped.data(), kBlockK,
                                      at(dout, b, t0, h, D), dout.st, 1.0f, at(dv, b, s0, h, D), dv.st);
        } else {
          detail::sgemm_single_thread(true, false, bk, D, bq, 1.0f, P, kBlockK, at(dout, b, t0, h, D), dout.st,
                                      1.0f, at(dv, b, s0, h, D), dv.st);
        }
        for (index_t i = 0; i < bq; ++i) {  // dS = P * (dP - D)
          const float* p = P + i * kBlockK;
          float* g = dS + i * kBlockK;
          const float di = s.d[t0 + i];
          for (index_t j = 0; j < bk; ++j) g[j] = p[j] * (g[j] - di);
        }
        detail::sgemm_single_thread(false, false, bq, D, bk, c.scale, dS, kBlockK, at(k, b, s0, h, D), k.st, 1.0f,
                                    at(dq, b, t0, h, D), dq.st);
        detail::sgemm_single_thread(true, false, bk, D, bq, c.scale, dS, kBlockK, at(q, b, t0, h, D), q.st, 1.0f,
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
    score_tile(W, c.S, bq, c.S, b, h, t0, 0, q, k, mask, c);
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
