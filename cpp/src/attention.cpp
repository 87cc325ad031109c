// attention.cpp: fused multi-head scaled dot-product attention, forward and backward, flash-style.
//
// Forward, per (b, kv head) in parallel with dynamic scheduling (split into runs of query blocks, then into parts of
// the kv head's group of query heads, when there are too few pairs for the threads); the keys and values are packed
// for the GEMMs once per task and shared by the group's query heads. Per query block and query head:
//   for each block of kBlockK keys that some row of the block can see (causal limit, window start, key length):
//     S = scale * Q K^T (GEMM), add masks, online softmax: m' = max(m, rowmax S), P = exp(S - m'),
//     l = l * exp(m - m') + rowsum P, O = O * exp(m - m') + P V (GEMM)
//   O /= l, lse = m + log l.
// Backward, per (b, kv head) in parallel (dK, dV accumulate over the group's query heads and the query blocks inside
// one task: no races, and no dependence on the thread count; K^T, V^T and K packed once, each query block's dO and
// Q once):
//   D = rowsum(dO * O); for each (query head, query block, key block): recompute S and P = exp(S - lse),
//   dV += P^T dO, dP = dO V^T, dS = P * (dP - D), dQ += scale dS K, dK += scale dS^T Q   (five GEMMs).
// The gradient of the additive mask is dS itself. When every slice of the mask that a task writes belongs to that
// task alone it is added in the same pass; when the mask is broadcast over axes that several tasks cover (a (T, S)
// mask, or a per-batch mask with grouped heads), a second pass owns the mask's rows instead: tasks over (mask slice,
// query block), each summing over the broadcast (b, h) in a fixed order (recomputing S and dP: two more GEMMs).
// On the "amx" SIMD path long sequences run the score and value products on AMX tiles (amx_attention below); the
// backward passes recompute their scores on the same tiles, so P = exp(S - lse) is the forward's P bit for bit.
// See the shared design note kernels.md section 2 (PyTorch's CPU flash attention, ggml).
#include "cpuformer/attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "amx_internal.h"
#include "gemm_internal.h"
#include "parallel.h"
#include "random.h"
#include "rowops.h"
#include "simd.h"

namespace cpuformer {
namespace {

constexpr index_t kBlockK = 256;
constexpr index_t kMaxBlockQ = 256;

// Query rows per tile. Taller tiles read each packed key block fewer times at long T; short sequences keep enough
// tiles to share between threads when there are few (b, h) pairs. With keys packed once per (b, h), 64, 128 and
// 256 rows measured within 2% of each other at T = 128..2048 (one thread).
// Up to this many query rows, attention_forward reads keys and values in place (matmul.cpp's few-rows path).
constexpr index_t kFewQueryRows = 4;
index_t block_q(index_t T) { return T >= 768 ? 256 : T >= 192 ? 128 : 64; }
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

index_t kv_heads(const AttentionConfig& c) { return c.KVH == 0 ? c.H : c.KVH; }

void check_config(const char* who, const AttentionConfig& c) {
  CPUFORMER_CHECK(c.B >= 1 && c.H >= 1 && c.T >= 1 && c.S >= 1 && c.D >= 1, who, ": bad sizes B=", c.B,
                  " H=", c.H, " T=", c.T, " S=", c.S, " D=", c.D);
  CPUFORMER_CHECK(std::isfinite(c.scale), who, ": scale must be finite");
  CPUFORMER_CHECK(c.dropout_p >= 0.0f && c.dropout_p < 1.0f, who, ": dropout_p must be in [0, 1), got ",
                  c.dropout_p);
  CPUFORMER_CHECK(c.KVH >= 0 && c.KVH <= c.H && c.H % kv_heads(c) == 0, who, ": num_kv_heads (KVH=", c.KVH,
                  ") must divide the number of heads H=", c.H);
}

void check_mask(const char* who, const AttentionMask& m, const AttentionConfig& c) {
  CPUFORMER_CHECK(m.window >= 0, who, ": window must be >= 0, got ", m.window);
  if (m.query_offset)
    for (index_t b = 0; b < c.B; ++b)
      CPUFORMER_CHECK(m.query_offset[b] >= 0 && m.query_offset[b] <= std::numeric_limits<index_t>::max() - c.T, who,
                      ": query_offset[", b, "] = ", m.query_offset[b], " must be >= 0");
  if (m.key_length)
    for (index_t b = 0; b < c.B; ++b)
      CPUFORMER_CHECK(m.key_length[b] >= 0 && m.key_length[b] <= c.S, who, ": key_length[", b, "] = ",
                      m.key_length[b], " is outside [0, S=", c.S, "]");
  if (m.alibi_slopes)
    for (index_t h = 0; h < c.H; ++h)
      CPUFORMER_CHECK(std::isfinite(m.alibi_slopes[h]), who, ": alibi_slopes[", h, "] must be finite");
}

// Pointers to row t of head h of batch b.
inline const float* at(const ConstHeadTensor& x, index_t b, index_t t, index_t h, index_t D) {
  return x.data + b * x.sb + t * x.st + h * D;
}
inline float* at(const HeadTensor& x, index_t b, index_t t, index_t h, index_t D) {
  return x.data + b * x.sb + t * x.st + h * D;
}

// One (batch, query head) and what its rows see: the key/value head g, the position of query 0, and how many keys
// exist at all (key_length).
struct Rows {
  index_t b, h, g, off, keys;
};
Rows rows_of(const AttentionMask& m, const AttentionConfig& c, index_t b, index_t h) {
  return {b, h, h / (c.H / kv_heads(c)), m.query_offset ? m.query_offset[b] : 0,
          m.key_length ? m.key_length[b] : c.S};
}

// Keys [lo, hi) that some query of rows t0 .. t0+bq-1 may see (lo == hi: none). Tiles outside are skipped.
struct KeyRange {
  index_t lo, hi;
};
KeyRange key_range(const AttentionMask& m, const Rows& r, index_t t0, index_t bq) {
  index_t hi = r.keys;
  if (m.causal) hi = std::min(hi, r.off + t0 + bq);
  const index_t lo = m.window > 0 ? std::max<index_t>(0, r.off + t0 - m.window + 1) : 0;
  return {lo, std::max(lo, hi)};
}

// Add the masks to a score tile S (rows t0.., key columns s0..; ld = row stride of the tile). Columns are always
// below the key length (callers never make tiles past it).
void mask_tile(float* S, index_t ld, index_t bq, index_t bk, const Rows& r, index_t t0, index_t s0,
               const AttentionMask& m, const AttentionConfig& c) {
  const index_t p0 = r.off + t0;  // position of the tile's first query
  if (m.additive) {
    for (index_t i = 0; i < bq; ++i) {
      const float* add = m.additive + r.b * m.add_sb + r.h * m.add_sh + (t0 + i) * m.add_st + s0;
      float* row = S + i * ld;
      for (index_t j = 0; j < bk; ++j) row[j] += add[j];
    }
  }
  if (m.alibi_slopes) {  // + slope * (s - pos(t)), exact integers converted once per element
    const float slope = m.alibi_slopes[r.h];
    for (index_t i = 0; i < bq; ++i) {
      float* row = S + i * ld;
      const index_t base = s0 - (p0 + i);
      for (index_t j = 0; j < bk; ++j) row[j] += slope * static_cast<float>(base + j);
    }
  }
  if (m.key_padding) {
    const std::uint8_t* pad = m.key_padding + r.b * c.S + s0;
    for (index_t j = 0; j < bk; ++j)
      if (pad[j])
        for (index_t i = 0; i < bq; ++i) S[i * ld + j] = kNegInf;
  }
  if (m.causal && s0 + bk - 1 > p0) {  // the tile crosses the diagonal: key s > pos(t) is invisible
    for (index_t i = 0; i < bq; ++i)
      for (index_t j = std::max<index_t>(0, p0 + i + 1 - s0); j < bk; ++j) S[i * ld + j] = kNegInf;
  }
  if (m.window > 0 && s0 <= p0 + bq - 1 - m.window) {  // some key s <= pos(t) - window is in the tile
    for (index_t i = 0; i < bq; ++i) {
      const index_t j_end = std::min(bk, p0 + i - m.window + 1 - s0);
      for (index_t j = 0; j < j_end; ++j) S[i * ld + j] = kNegInf;
    }
  }
}

// The score tile S = scale * Q[t0:t0+bq] K[s0:s0+bk]^T + masks (ld = row stride of S); K^T comes from packed_kt
// when given (a PackedKeyBlocks block), else it is read in place. Forward, backward and the weights path all go
// through here (amx_score_tile instead on the amx path), and packing does not change the arithmetic, so backward
// recomputes exactly the forward's scores.
void score_tile(float* S, index_t ld, index_t bq, index_t bk, const Rows& r, index_t t0, index_t s0,
                const ConstHeadTensor& q, const ConstHeadTensor& k, const float* packed_kt, const AttentionMask& m,
                const AttentionConfig& c) {
  if (packed_kt)
    detail::sgemm_single_thread_packed(false, bq, bk, c.D, c.scale, at(q, r.b, t0, r.h, c.D), q.st, packed_kt, 0.0f,
                                       S, ld);
  else
    detail::sgemm_single_thread(false, true, bq, bk, c.D, c.scale, at(q, r.b, t0, r.h, c.D), q.st,
                                at(k, r.b, s0, r.g, c.D), k.st, 0.0f, S, ld);
  mask_tile(S, ld, bq, bk, r, t0, s0, m, c);
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

// P = exp(S - lse) in place; a fully masked row (lse = -inf) is all zeros.
void probs_from_lse(float* P, index_t ld, index_t bq, index_t bk, const float* lse_rows) {
  for (index_t i = 0; i < bq; ++i) {
    float* row = P + i * ld;
    if (lse_rows[i] == kNegInf) {
      for (index_t j = 0; j < bk; ++j) row[j] = 0.0f;
    } else {
      detail::row_exp_sum(row, row, bk, lse_rows[i]);
    }
  }
}

// dS = P * (dP - D) in place over dP.
void grad_scores(float* dS, const float* P, index_t ld, index_t bq, index_t bk, const float* d_rows) {
  for (index_t i = 0; i < bq; ++i) {
    const float* p = P + i * ld;
    float* g = dS + i * ld;
    const float di = d_rows[i];
    for (index_t j = 0; j < bk; ++j) g[j] = p[j] * (g[j] - di);
  }
}

// dadditive[b, h, t0.., s0..] += dS (at the mask's strides).
void add_mask_grad(float* dadd, const AttentionMask& m, const Rows& r, index_t t0, index_t s0, index_t bq,
                   index_t bk, const float* dS, index_t ld) {
  for (index_t i = 0; i < bq; ++i) {
    float* dst = dadd + r.b * m.add_sb + r.h * m.add_sh + (t0 + i) * m.add_st + s0;
    const float* g = dS + i * ld;
    for (index_t j = 0; j < bk; ++j) dst[j] += g[j];
  }
}

// D_t = dO_t . O_t for rows t0 .. t0+bq-1 of (b, h).
void rows_dot(float* d, const ConstHeadTensor& dout, const ConstHeadTensor& out, index_t b, index_t h, index_t t0,
              index_t bq, index_t D) {
  for (index_t i = 0; i < bq; ++i) {
    const float* o = at(out, b, t0 + i, h, D);
    const float* g = at(dout, b, t0 + i, h, D);
    // Eight running sums (lanes of one vector where there are vectors; the same order, so the same bits, on every
    // path): one sum would chain D dependent additions per row.
    double acc[8] = {};
    index_t e = 0;
    for (; e + 8 <= D; e += 8)
      for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(o[e + l]) * g[e + l];
    for (; e < D; ++e) acc[0] += static_cast<double>(o[e]) * g[e];
    d[i] = static_cast<float>(((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])));
  }
}

// Grow-only per-thread scratch.
struct Scratch {
  std::vector<float> scores, probs, dropped, m, l, d, shift, sums;
  // Packed operands of one (batch, kv head): keys (as K^T and as K), values (as V or V^T), and one query block's rows.
  detail::AlignedBuffer keys_t, keys, values, rows;
  // The amx path: K and V as tiles; one query block's rows and probabilities split into bf16 planes.
  detail::AlignedBuffer keys_amx, values_amx, planes;
};
thread_local Scratch t_scratch;

// One key-side operand of a (batch, kv head), packed for the GEMMs block by block (kBlockK keys) on first use, so
// every query block and query head reuses it: x^T (D x keys: the products whose columns are keys) or x (keys x D:
// the products that sum over keys). A block is packed whole (up to the key length), so a product over only part of
// it (a causal block cut at the diagonal) must read x in place instead.
class PackedKeyBlocks {
 public:
  PackedKeyBlocks(detail::AlignedBuffer& buffer, bool transposed, index_t n_blocks, index_t D)
      : slot_(transposed ? detail::packed_b_size(D, kBlockK) : detail::packed_b_size(kBlockK, D)),
        D_(D),
        transposed_(transposed),
        packed_(static_cast<size_t>(n_blocks), 0),
        data_(buffer.get(std::max<index_t>(1, n_blocks) * slot_)) {}

  // Block kb of x, whose first row is x0 (row stride `stride`, n_keys rows in the block).
  const float* block(index_t kb, const float* x0, index_t stride, index_t n_keys) {
    float* p = data_ + kb * slot_;
    if (!packed_[kb]) {
      if (transposed_) detail::pack_b(p, true, D_, n_keys, x0, stride);
      else detail::pack_b(p, false, n_keys, D_, x0, stride);
      packed_[kb] = 1;
    }
    return p;
  }

 private:
  index_t slot_, D_;
  bool transposed_;
  std::vector<unsigned char> packed_;
  float* data_;
};

// The "amx" path (long sequences on AMX CPUs): the products on AMX tiles (amx_internal.h: float32 operands split
// exactly into bf16 terms; about 2^-21 relative error per product, like the float32 GEMM on that path). Each query
// block's rows are scaled and split once, each key block's K and V once per task; score tiles cover whole key blocks
// (S = (scale Q) K^T, the tiles stored straight into S), and with no dropout the exponentials go straight into P's
// split planes for O += P V. Measured against the AVX-512 kernel (2 threads, 3 interleaved runs): 0.80-0.95x at
// T = 2048 (causal too), 0.85-0.97x at T = 512 and at causal T = 1024; level at T = 128-256, behind for causal
// T < 1024 (whole score blocks past the diagonal: 0.7 ms against 0.57 at T = 128).
bool amx_attention(const AttentionMask& m, const AttentionConfig& c) {
  return detail::use_amx() && c.T >= (m.causal ? 1024 : 512) && c.D <= detail::amx_max_split_a_k;
}

// K (keys: the B of S = Q K^T, transposed) or V (the B of O += P V) of a (batch, kv head) split into AMX tiles block
// by block on first use.
class AmxKeyBlocks {
 public:
  AmxKeyBlocks(detail::AlignedBuffer& buffer, bool keys, index_t n_blocks, index_t D)
      : slot_(keys ? detail::amx_split_b_words(kBlockK, D) : detail::amx_split_b_words(D, kBlockK)),
        D_(D),
        keys_(keys),
        split_(static_cast<size_t>(n_blocks), 0),
        data_(n_blocks > 0 ? reinterpret_cast<std::uint32_t*>(buffer.get(n_blocks * slot_)) : nullptr) {}

  // Block kb of x, whose first row is x0 (row stride `stride`, n_keys rows in the block).
  const std::uint32_t* block(index_t kb, const float* x0, index_t stride, index_t n_keys) {
    std::uint32_t* p = data_ + kb * slot_;
    if (!split_[kb]) {
      detail::AmxGemm g{};
      g.trans_b = keys_;
      g.N = keys_ ? n_keys : D_;
      g.K = keys_ ? D_ : n_keys;
      g.B = x0;
      g.ldb = stride;
      detail::amx_split_b_here(g, p);
      split_[kb] = detail::amx_all_finite(x0, n_keys, D_, stride) ? 1 : 2;
    }
    return p;
  }
  // Whether block kb (split already) holds only finite values.
  bool finite(index_t kb) const { return split_[kb] == 1; }

 private:
  index_t slot_, D_;
  bool keys_;
  std::vector<unsigned char> split_;  // 0: not split yet; 1: split, all finite; 2: split, not all finite
  std::uint32_t* data_;
};

// C (rows x cols, row stride ldc) = A B (+ C when accumulate) on the calling thread's tiles, the tiles' sums
// stored straight into C; A from its split planes or from A itself (rows x K, row stride lda), B from its tiles.
void amx_product(index_t rows, index_t cols, index_t K, const std::uint16_t* a_planes, const float* A, index_t lda,
                 const std::uint32_t* b_tiles, bool accumulate, float* C, index_t ldc) {
  detail::AmxGemm g{};
  g.M = rows;
  g.N = cols;
  g.K = K;
  g.alpha = 1.0f;
  g.planes = a_planes;
  g.A = A;
  g.lda = lda;
  g.tiles = b_tiles;
  g.beta = accumulate ? 1.0f : 0.0f;
  g.C = C;
  g.ldc = ldc;
  g.direct_c = true;
  detail::amx_gemm_share(g, 0, rows, 0, cols);
}

// Rows t0 .. t0+bq-1 of (b, h)'s queries, times the scale, split into planes (at most kMaxBlockQ rows; scaled: a
// kMaxBlockQ x D scratch).
void amx_split_queries(std::uint16_t* planes, float* scaled, const ConstHeadTensor& q, const Rows& r, index_t t0,
                       index_t bq, const AttentionConfig& c) {
  for (index_t i = 0; i < bq; ++i) {
    const float* row = at(q, r.b, t0 + i, r.h, c.D);
    for (index_t d = 0; d < c.D; ++d) scaled[i * c.D + d] = c.scale * row[d];
  }
  detail::AmxGemm g{};
  g.M = bq;
  g.K = c.D;
  g.A = scaled;
  g.lda = c.D;
  detail::amx_split_a(g, planes);
}

// score_tile on the amx path: S over the whole key block (full keys from s0; the forward's tile, whatever bk the
// caller then reads), masks on its first bk columns.
void amx_score_tile(float* S, index_t ld, index_t bq, index_t bk, index_t full, const Rows& r, index_t t0, index_t s0,
                    const std::uint16_t* q_planes, const std::uint32_t* k_tiles, const AttentionMask& m,
                    const AttentionConfig& c) {
  amx_product(bq, full, c.D, q_planes, nullptr, 0, k_tiles, false, S, ld);
  mask_tile(S, ld, bq, bk, r, t0, s0, m, c);
}

// The amx path's per-thread operands: one query block's planes (and P's, kMaxBlockQ x kBlockK) and scaled rows.
struct AmxRows {
  std::uint16_t* q_planes = nullptr;
  std::uint16_t* p_planes = nullptr;
  float* scaled = nullptr;
  AmxRows() = default;
  AmxRows(Scratch& s, index_t D) {
    const index_t q_words = detail::amx_split_a_words(kMaxBlockQ, D);
    const index_t p_words = detail::amx_split_a_words(kMaxBlockQ, kBlockK);
    q_planes = reinterpret_cast<std::uint16_t*>(s.planes.get((q_words + p_words) / 2 + kMaxBlockQ * D));
    p_planes = q_planes + q_words;
    scaled = reinterpret_cast<float*>(p_planes + p_words);
  }
};

}  // namespace

void attention_forward(HeadTensor out, float* lse, ConstHeadTensor q, ConstHeadTensor k, ConstHeadTensor v,
                       const AttentionMask& mask, const AttentionConfig& c) {
  check_config("attention_forward", c);
  check_mask("attention_forward", mask, c);
  const index_t D = c.D, KVH = kv_heads(c), group = c.H / KVH;
  const index_t block = block_q(c.T), n_qblocks = (c.T + block - 1) / block;
  // Each task packs the keys and values it reads once, so whole (batch, kv head) pairs are best; they are split into
  // runs of query blocks, then into parts of the head group, only when there are too few to keep every thread busy.
  const index_t want = 3 * detail::kernel_threads(), pairs = c.B * KVH;
  const index_t n_chunks0 = std::min(n_qblocks, std::max<index_t>(1, (want + pairs - 1) / pairs));
  const index_t per_task = (n_qblocks + n_chunks0 - 1) / n_chunks0, n_chunks = (n_qblocks + per_task - 1) / per_task;
  const index_t n_hsplit =
      std::min(group, std::max<index_t>(1, (want + pairs * n_chunks - 1) / (pairs * n_chunks)));
  detail::parallel_for_dynamic(pairs * n_hsplit * n_chunks, [&](index_t task, int) {
    const index_t chunk = task % n_chunks, hs = (task / n_chunks) % n_hsplit, bg = task / (n_chunks * n_hsplit);
    const index_t b = bg / KVH, g = bg % KVH;
    const index_t h_begin = g * group + group * hs / n_hsplit, h_end = g * group + group * (hs + 1) / n_hsplit;
    const index_t qb_begin = chunk * per_task, qb_end = std::min(n_qblocks, (chunk + 1) * per_task);
    Rows r = rows_of(mask, c, b, h_begin);
    const index_t t_last = (qb_end - 1) * block;
    const index_t n_kblocks = (key_range(mask, r, t_last, std::min(block, c.T - t_last)).hi + kBlockK - 1) / kBlockK;
    Scratch& s = t_scratch;
    s.scores.resize(kMaxBlockQ * kBlockK);
    float* S = s.scores.data();
    const bool amx = amx_attention(mask, c);
    PackedKeyBlocks keys_t(s.keys_t, true, amx ? 0 : n_kblocks, D), values(s.values, false, amx ? 0 : n_kblocks, D);
    AmxKeyBlocks keys_amx(s.keys_amx, true, amx ? n_kblocks : 0, D);
    AmxKeyBlocks values_amx(s.values_amx, false, amx ? n_kblocks : 0, D);
    const AmxRows amx_rows = amx ? AmxRows(s, D) : AmxRows{};
    const bool fused = amx && c.dropout_p == 0.0f;  // the exponentials straight into P's planes (no dropout)
    s.shift.resize(block);
    s.sums.resize(block);
    // Decoding (a few query rows): each key and value is used once per head, so packing them would cost as much as
    // the products; the GEMM's few-rows path reads them in place.
    const bool pack_keys = c.T > kFewQueryRows;
    for (index_t qb = qb_begin; qb < qb_end; ++qb) {
      const index_t t0 = qb * block, bq = std::min(block, c.T - t0);
      const KeyRange kr = key_range(mask, r, t0, bq);
      for (index_t h = h_begin; h < h_end; ++h) {
        r.h = h;
        s.m.assign(bq, kNegInf);
        s.l.assign(bq, 0.0f);
        float* O = at(out, b, t0, h, D);
        // The first key block's product writes O (beta 0: its rows that see nothing yet have P = 0, so O = 0 there),
        // later ones add to it; O is zeroed only when no key block is visible at all.
        float beta = 0.0f;
        if (amx) amx_split_queries(amx_rows.q_planes, amx_rows.scaled, q, r, t0, bq, c);
        for (index_t kb = kr.lo / kBlockK, s0 = kb * kBlockK; s0 < kr.hi; s0 += kBlockK, ++kb) {
          const index_t full = std::min(kBlockK, r.keys - s0), bk = amx ? full : std::min(kBlockK, kr.hi - s0);
          const bool whole = pack_keys && bk == full && !amx;
          const float* kt = whole ? keys_t.block(kb, at(k, b, s0, g, D), k.st, full) : nullptr;
          const float* vb = whole ? values.block(kb, at(v, b, s0, g, D), v.st, full) : nullptr;
          if (amx)
            amx_score_tile(S, kBlockK, bq, bk, full, r, t0, s0, amx_rows.q_planes,
                           keys_amx.block(kb, at(k, b, s0, g, D), k.st, full), mask, c);
          else
            score_tile(S, kBlockK, bq, bk, r, t0, s0, q, k, kt, mask, c);
          // Online softmax: row i's new running max m_new and the sum of exp(S - m_new) over this block rescale
          // what O and l hold so far.
          const auto update = [&](index_t i, float m_new, double row_sum) {
            if (s.m[i] == kNegInf) {  // first visible keys: O and l are still zero
              s.l[i] = static_cast<float>(row_sum);
            } else {
              const float correction = std::exp(s.m[i] - m_new);
              s.l[i] = static_cast<float>(s.l[i] * correction + row_sum);
              if (correction != 1.0f) detail::row_scale(O + i * out.st, D, correction);
            }
            s.m[i] = m_new;
          };
          for (index_t i = 0; i < bq; ++i) {
            float* row = S + i * kBlockK;
            const float block_max = detail::row_max(row, bk);  // NaN when a score is: kept, not skipped by fmax
            const float m_new = std::isnan(block_max) ? block_max : std::fmax(s.m[i], block_max);
            if (fused) {
              s.shift[i] = m_new;  // exponentials below, straight into P's planes
            } else if (m_new == kNegInf) {  // nothing visible yet in this row
              for (index_t j = 0; j < bk; ++j) row[j] = 0.0f;
            } else {
              update(i, m_new, detail::row_exp_sum(row, row, bk, m_new));
            }
          }
          const std::uint32_t* v_tiles = amx ? values_amx.block(kb, at(v, b, s0, g, D), v.st, full) : nullptr;
          if (fused) {
            detail::amx_exp_split(S, kBlockK, bq, bk, s.shift.data(), amx_rows.p_planes, s.sums.data(),
                                  values_amx.finite(kb));
            for (index_t i = 0; i < bq; ++i)
              if (s.shift[i] != kNegInf) update(i, s.shift[i], s.sums[i]);
          }
          if (c.dropout_p > 0.0f) dropout_tile(S, kBlockK, bq, bk, b, h, t0, s0, c);
          if (amx)
            amx_product(bq, D, bk, fused ? amx_rows.p_planes : nullptr, S, kBlockK, v_tiles, beta != 0.0f, O, out.st);
          else if (whole)
            detail::sgemm_single_thread_packed(false, bq, D, bk, 1.0f, S, kBlockK, vb, beta, O, out.st);
          else
            detail::sgemm_single_thread(false, false, bq, D, bk, 1.0f, S, kBlockK, at(v, b, s0, g, D), v.st, beta,
                                        O, out.st);
          beta = 1.0f;
        }
        if (beta == 0.0f)
          for (index_t i = 0; i < bq; ++i)
            for (index_t d = 0; d < D; ++d) O[i * out.st + d] = 0.0f;
        for (index_t i = 0; i < bq; ++i) {
          const bool empty = s.l[i] == 0.0f;  // every key masked: output 0, lse -inf
          detail::row_scale(O + i * out.st, D, empty ? 0.0f : 1.0f / s.l[i]);
          if (lse) lse[(b * c.H + h) * c.T + t0 + i] = empty ? kNegInf : s.m[i] + std::log(s.l[i]);
        }
      }
    }
  });
}

namespace {

// The additive mask's gradient when its broadcast axes span several backward tasks: tasks over (mask slice, query
// block), each owning its rows of dadditive and summing over the (b, h) that share the slice in a fixed order, so
// there are no races and the result does not depend on the thread count. Recomputes S and dP tile by tile.
void additive_grad_pass(float* dadd, ConstHeadTensor dout, ConstHeadTensor q, ConstHeadTensor k, ConstHeadTensor v,
                        ConstHeadTensor out, const float* lse, const AttentionMask& m, const AttentionConfig& c) {
  const index_t D = c.D, block = block_q(c.T), n_qblocks = (c.T + block - 1) / block;
  const index_t nb = m.add_sb != 0 ? c.B : 1, nh = m.add_sh != 0 ? c.H : 1;
  const index_t n_q = m.add_st != 0 ? n_qblocks : 1;  // a mask broadcast over queries: one task owns all rows
  detail::parallel_for_dynamic(nb * nh * n_q, [&](index_t task, int) {
    const index_t qt = task % n_q, slice = task / n_q, mb = slice / nh, mh = slice % nh;
    const index_t qb_begin = n_q == 1 ? 0 : qt, qb_end = n_q == 1 ? n_qblocks : qt + 1;
    const index_t b_begin = nb == 1 ? 0 : mb, b_end = nb == 1 ? c.B : mb + 1;
    const index_t h_begin = nh == 1 ? 0 : mh, h_end = nh == 1 ? c.H : mh + 1;
    Scratch& s = t_scratch;
    s.scores.resize(kMaxBlockQ * kBlockK);
    s.probs.resize(kMaxBlockQ * kBlockK);
    s.d.resize(kMaxBlockQ);
    float* P = s.scores.data();
    float* dS = s.probs.data();
    const bool amx = amx_attention(m, c);  // the forward's score tiles (see attention_backward)
    const AmxRows amx_rows = amx ? AmxRows(s, D) : AmxRows{};
    for (index_t b = b_begin; b < b_end; ++b)
      for (index_t h = h_begin; h < h_end; ++h) {
        const Rows r = rows_of(m, c, b, h);
        AmxKeyBlocks keys_amx(s.keys_amx, true, amx ? (c.S + kBlockK - 1) / kBlockK : 0, D);
        for (index_t qb = qb_begin; qb < qb_end; ++qb) {
          const index_t t0 = qb * block, bq = std::min(block, c.T - t0);
          const KeyRange kr = key_range(m, r, t0, bq);
          if (kr.lo >= kr.hi) continue;
          rows_dot(s.d.data(), dout, out, b, h, t0, bq, D);
          const float* dout_rows = at(dout, b, t0, h, D);
          if (amx) amx_split_queries(amx_rows.q_planes, amx_rows.scaled, q, r, t0, bq, c);
          for (index_t s0 = kr.lo / kBlockK * kBlockK; s0 < kr.hi; s0 += kBlockK) {
            const index_t bk = std::min(kBlockK, kr.hi - s0), full = std::min(kBlockK, r.keys - s0);
            if (amx)
              amx_score_tile(P, kBlockK, bq, bk, full, r, t0, s0, amx_rows.q_planes,
                             keys_amx.block(s0 / kBlockK, at(k, b, s0, r.g, D), k.st, full), m, c);
            else
              score_tile(P, kBlockK, bq, bk, r, t0, s0, q, k, nullptr, m, c);
            probs_from_lse(P, kBlockK, bq, bk, lse + (b * c.H + h) * c.T + t0);
            detail::sgemm_single_thread(false, true, bq, bk, D, 1.0f, dout_rows, dout.st, at(v, b, s0, r.g, D), v.st,
                                        0.0f, dS, kBlockK);
            if (c.dropout_p > 0.0f) dropout_tile(dS, kBlockK, bq, bk, b, h, t0, s0, c);
            grad_scores(dS, P, kBlockK, bq, bk, s.d.data());
            add_mask_grad(dadd, m, r, t0, s0, bq, bk, dS, kBlockK);
          }
        }
      }
  });
}

}  // namespace

void attention_backward(HeadTensor dq, HeadTensor dk, HeadTensor dv, ConstHeadTensor dout, ConstHeadTensor q,
                        ConstHeadTensor k, ConstHeadTensor v, ConstHeadTensor out, const float* lse,
                        const AttentionMask& mask, const AttentionConfig& c, float* dadditive) {
  check_config("attention_backward", c);
  check_mask("attention_backward", mask, c);
  CPUFORMER_CHECK(lse != nullptr, "attention_backward: lse from the forward is required");
  CPUFORMER_CHECK(dadditive == nullptr || mask.additive != nullptr,
                  "attention_backward: dadditive needs an additive mask");
  const index_t D = c.D, KVH = kv_heads(c), group = c.H / KVH;
  // Each task (b, kv head) writes the mask slices of its own (b, h): its alone unless the mask is broadcast over
  // an axis that other tasks also cover.
  const bool dadd_here = dadditive && (mask.add_sb != 0 || c.B == 1) && (mask.add_sh != 0 || KVH == 1);
  detail::parallel_for_dynamic(c.B * KVH, [&](index_t bg, int) {
    const index_t b = bg / KVH, g = bg % KVH;
    Rows r = rows_of(mask, c, b, g * group);
    Scratch& s = t_scratch;
    s.scores.resize(kMaxBlockQ * kBlockK);
    s.probs.resize(kMaxBlockQ * kBlockK);
    s.d.resize(c.T);
    float* P = s.scores.data();
    float* dS = s.probs.data();
    for (index_t t = 0; t < c.S; ++t) {
      float* dkr = at(dk, b, t, g, D);
      float* dvr = at(dv, b, t, g, D);
      for (index_t d = 0; d < D; ++d) dkr[d] = dvr[d] = 0.0f;
    }
    const index_t block = block_q(c.T), t_last = (c.T - 1) / block * block;
    const index_t n_kblocks = (key_range(mask, r, t_last, c.T - t_last).hi + kBlockK - 1) / kBlockK;
    PackedKeyBlocks keys_t(s.keys_t, true, n_kblocks, D), values_t(s.values, true, n_kblocks, D),
        keys(s.keys, false, n_kblocks, D);
    // The forward's score tiles, the same bits: on the amx path its products (the other products stay here).
    const bool amx = amx_attention(mask, c);
    AmxKeyBlocks keys_amx(s.keys_amx, true, amx ? n_kblocks : 0, D);
    const AmxRows amx_rows = amx ? AmxRows(s, D) : AmxRows{};
    // One query block's dO and Q rows, packed as the B of dV += P^T dO and dK += dS^T Q.
    const index_t rows_slot = detail::packed_b_size(block, D);
    float* packed_dout = s.rows.get(2 * rows_slot);
    float* packed_q = packed_dout + rows_slot;
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      r.h = h;
      rows_dot(s.d.data(), dout, out, b, h, 0, c.T, D);  // D_t = dO_t . O_t, and dQ starts at zero
      for (index_t t = 0; t < c.T; ++t) {
        float* dqr = at(dq, b, t, h, D);
        for (index_t d = 0; d < D; ++d) dqr[d] = 0.0f;
      }
      const float* lse_bh = lse + (b * c.H + h) * c.T;
      for (index_t t0 = 0; t0 < c.T; t0 += block) {
        const index_t bq = std::min(block, c.T - t0);
        const KeyRange kr = key_range(mask, r, t0, bq);
        if (kr.lo >= kr.hi) continue;  // no key visible to these rows: zero gradients
        const float* dout_rows = at(dout, b, t0, h, D);
        detail::pack_b(packed_dout, false, bq, D, dout_rows, dout.st);
        detail::pack_b(packed_q, false, bq, D, at(q, b, t0, h, D), q.st);
        if (amx) amx_split_queries(amx_rows.q_planes, amx_rows.scaled, q, r, t0, bq, c);
        for (index_t kb = kr.lo / kBlockK, s0 = kb * kBlockK; s0 < kr.hi; s0 += kBlockK, ++kb) {
          const index_t bk = std::min(kBlockK, kr.hi - s0), full = std::min(kBlockK, r.keys - s0);
          const float* kt = keys_t.block(kb, at(k, b, s0, g, D), k.st, full);
          const float* vt = values_t.block(kb, at(v, b, s0, g, D), v.st, full);
          const float* kn = keys.block(kb, at(k, b, s0, g, D), k.st, full);
          const bool whole = bk == full;  // else the causal diagonal cuts the block: read K and V in place
          if (amx)
            amx_score_tile(P, kBlockK, bq, bk, full, r, t0, s0, amx_rows.q_planes,
                           keys_amx.block(kb, at(k, b, s0, g, D), k.st, full), mask, c);
          else
            score_tile(P, kBlockK, bq, bk, r, t0, s0, q, k, whole ? kt : nullptr, mask, c);
          probs_from_lse(P, kBlockK, bq, bk, lse_bh + t0);
          // dP = dO V^T (into dS), through the dropout mask when there is one.
          if (whole)
            detail::sgemm_single_thread_packed(false, bq, bk, D, 1.0f, dout_rows, dout.st, vt, 0.0f, dS, kBlockK);
          else
            detail::sgemm_single_thread(false, true, bq, bk, D, 1.0f, dout_rows, dout.st, at(v, b, s0, g, D), v.st,
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
                                             at(dv, b, s0, g, D), dv.st);
          grad_scores(dS, P, kBlockK, bq, bk, s.d.data() + t0);
          if (dadd_here) add_mask_grad(dadditive, mask, r, t0, s0, bq, bk, dS, kBlockK);
          if (whole)
            detail::sgemm_single_thread_packed(false, bq, D, bk, c.scale, dS, kBlockK, kn, 1.0f,
                                               at(dq, b, t0, h, D), dq.st);
          else
            detail::sgemm_single_thread(false, false, bq, D, bk, c.scale, dS, kBlockK, at(k, b, s0, g, D), k.st,
                                        1.0f, at(dq, b, t0, h, D), dq.st);
          detail::sgemm_single_thread_packed(true, bk, D, bq, c.scale, dS, kBlockK, packed_q, 1.0f,
                                             at(dk, b, s0, g, D), dk.st);
        }
      }
    }
  });
  if (dadditive && !dadd_here) additive_grad_pass(dadditive, dout, q, k, v, out, lse, mask, c);
}

void attention_weights(float* weights, ConstHeadTensor q, ConstHeadTensor k, const AttentionMask& mask,
                       const AttentionConfig& c) {
  check_config("attention_weights", c);
  check_mask("attention_weights", mask, c);
  const index_t block = block_q(c.T), n_qblocks = (c.T + block - 1) / block;
  detail::parallel_for_dynamic(c.B * c.H * n_qblocks, [&](index_t task, int) {
    const index_t qb = task % n_qblocks, bh = task / n_qblocks, b = bh / c.H, h = bh % c.H;
    const index_t t0 = qb * block, bq = std::min(block, c.T - t0);
    const Rows r = rows_of(mask, c, b, h);
    float* W = weights + (bh * c.T + t0) * c.S;
    if (r.keys > 0) score_tile(W, c.S, bq, r.keys, r, t0, 0, q, k, nullptr, mask, c);  // keys past the length:
    for (index_t i = 0; i < bq; ++i)                                                     // never read, invisible
      for (index_t j = r.keys; j < c.S; ++j) W[i * c.S + j] = kNegInf;
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
