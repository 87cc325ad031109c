// test_core.cpp: a Python-free test of the C++ core. It links only cpuformer_core (proving that deployments without
// Python can use it) and checks kernels against plain double-precision references, on both SIMD paths, plus the
// error contract (exceptions, nothing written). Built with -DCPUFORMER_BUILD_TESTS=ON; run by ctest and by .ci/run,
// also under -DCPUFORMER_SANITIZE=ON (AddressSanitizer + UBSan).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "cpuformer.h"
#include "cpuformer/model.h"
#include "../fuzz/model_files.h"

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

std::vector<float> random_vec(std::mt19937& gen, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

double max_rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, mag = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(double(a[i]) - b[i]));
    mag = std::max(mag, std::fabs(double(b[i])));
  }
  return err / mag;
}

void test_sgemm(std::mt19937& gen) {
  const int shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {6, 16, 256}, {13, 33, 257}, {145, 97, 300}, {64, 64, 64},
                           {200, 4100, 20}};
  for (auto& s : shapes) {
    const int M = s[0], N = s[1], K = s[2];
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        auto A = random_vec(gen, size_t(M) * K), B = random_vec(gen, size_t(K) * N), bias = random_vec(gen, N);
        auto C = random_vec(gen, size_t(M) * N);
        auto R = C;
        const int lda = ta ? M : K, ldb = tb ? K : N;
        cpuformer::sgemm(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 0.25f, C.data(), N, bias.data());
        cpuformer::sgemm_ref(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 0.25f, R.data(), N, bias.data());
        check(max_rel_err(C, R) < 1e-5, "sgemm " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                                            std::to_string(K) + " ta=" + std::to_string(ta) + " tb=" +
                                            std::to_string(tb) + " path=" + cpuformer::get_simd_path() +
                                            " threads=" + std::to_string(cpuformer::get_num_threads()));
      }
  }
  // Strided batch with a broadcast (stride 0) operand.
  const int batch = 5, M = 17, N = 40, K = 33;
  auto A = random_vec(gen, size_t(batch) * M * K), B = random_vec(gen, size_t(K) * N);
  std::vector<float> C(size_t(batch) * M * N), R(C.size());
  cpuformer::sgemm_strided_batched(false, false, M, N, K, 1.0f, A.data(), K, M * K, B.data(), N, 0, 0.0f, C.data(),
                                   N, M * N, batch);
  for (int b = 0; b < batch; ++b)
    cpuformer::sgemm_ref(false, false, M, N, K, 1.0f, A.data() + b * M * K, K, B.data(), N, 0.0f,
                         R.data() + b * M * N, N);
  check(max_rel_err(C, R) < 1e-5, "sgemm_strided_batched");
}

// The AVX-512 GEMM against the AVX2 one over odd shapes around the 12x32 tile, strided operands and C, alpha/beta,
// bias, beta = 0 over NaN garbage, packed weights and batches, on 1 and 2 threads. Bitwise equal (same per-element k
// order, same write-back arithmetic per 6x16 sub-tile) where both cut K alike: K <= 256 (one K block on both paths),
// packed weights and batches. For K > 256 the AVX-512 path packs B in K blocks of 512, not 256, so its sums are
// rounded differently: there both are checked against the float64 reference (same tolerance as test_sgemm).
void test_sgemm_avx512_equals_avx2(std::mt19937& gen) {
  if (!(cpuformer::build_has_avx512() && cpuformer::cpu_supports_avx512())) {
    std::printf("(no AVX-512 here: AVX-512 vs AVX2 GEMM comparison skipped)\n");
    return;
  }
  const int shapes[][3] = {{1, 1, 1},    {2, 3, 1},     {4, 70, 33},    {5, 17, 1},     {6, 16, 8},
                           {7, 17, 9},   {11, 31, 2},   {12, 32, 256},  {13, 33, 257},  {18, 48, 100},
                           {23, 47, 513}, {25, 15, 40}, {64, 64, 64},   {97, 95, 96},   {130, 70, 600},
                           {145, 97, 300}, {150, 200, 255}, {289, 31, 513}, {300, 4100, 20}, {37, 4097, 7}};
  const int nan_bits = 0x7fc00000;
  float qnan;
  std::memcpy(&qnan, &nan_bits, sizeof qnan);
  int mismatches = 0, cases = 0;
  for (int threads : {1, 2}) {
    cpuformer::set_num_threads(threads);
    for (auto& s : shapes) {
      const int M = s[0], N = s[1], K = s[2];
      for (int variant = 0; variant < 8; ++variant) {
        const bool ta = variant & 1, tb = variant & 2, tight = variant & 4;
        const int pad = tight ? 0 : 3;  // strided operands and C
        const int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
        auto A = random_vec(gen, size_t(ta ? K : M) * lda), B = random_vec(gen, size_t(tb ? N : K) * ldb);
        auto bias = random_vec(gen, N), C0 = random_vec(gen, size_t(M) * ldc);
        const float beta = variant % 3 == 0 ? 0.0f : 0.75f, alpha = variant % 2 ? 1.0f : -0.5f;
        if (beta == 0.0f) std::fill(C0.begin(), C0.end(), qnan);  // never read
        std::vector<float> out[2];
        for (int p = 0; p < 2; ++p) {
          cpuformer::set_simd_path(p ? "avx512" : "avx2");
          out[p] = C0;
          cpuformer::sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, out[p].data(), ldc,
                           variant & 4 ? nullptr : bias.data());
        }
        ++cases;
        if (K > 256) {
          std::vector<float> R = C0;
          cpuformer::sgemm_ref(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, R.data(), ldc,
                               variant & 4 ? nullptr : bias.data());
          for (int p = 0; p < 2; ++p)  // padding columns of C are untouched, so compare whole buffers
            if (!(max_rel_err(out[p], R) < 1e-5)) {
              ++mismatches;
              std::printf("%s off the reference: sgemm %dx%dx%d variant %d threads %d\n", p ? "avx512" : "avx2", M,
                          N, K, variant, threads);
            }
        } else if (std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)) != 0) {
          ++mismatches;
          std::printf("avx512 != avx2: sgemm %dx%dx%d variant %d threads %d\n", M, N, K, variant, threads);
        }
      }
      // prepacked weights: a PackedMatrix packed under either path (its K cut: 256 or 512) is read by both alike
      for (const char* pack_path : {"avx2", "avx512"}) {
        auto X = random_vec(gen, size_t(M) * K), W = random_vec(gen, size_t(N) * K), bias = random_vec(gen, N);
        cpuformer::set_simd_path(pack_path);
        const cpuformer::PackedMatrix packed = cpuformer::sgemm_pack_b(true, K, N, W.data(), K);
        std::vector<float> out[2];
        for (int p = 0; p < 2; ++p) {
          cpuformer::set_simd_path(p ? "avx512" : "avx2");
          out[p].assign(size_t(M) * N, qnan);
          cpuformer::sgemm_packed(M, X.data(), K, packed, out[p].data(), N, bias.data());
        }
        std::vector<float> R(size_t(M) * N);
        cpuformer::sgemm_ref(false, true, M, N, K, 1.0f, X.data(), K, W.data(), K, 0.0f, R.data(), N, bias.data());
        ++cases;
        if (out[0] != out[1] || !(max_rel_err(out[1], R) < 1e-5)) {
          ++mismatches;
          std::printf("avx512 != avx2 (or off the reference): sgemm_packed %dx%dx%d packed under %s threads %d\n", M,
                      N, K, pack_path, threads);
        }
      }
    }
    {  // strided batch: single-threaded GEMMs inside the batch loop
      const int batch = 7, M = 19, N = 45, K = 70;
      auto A = random_vec(gen, size_t(batch) * M * K), B = random_vec(gen, size_t(batch) * K * N);
      std::vector<float> out[2];
      for (int p = 0; p < 2; ++p) {
        cpuformer::set_simd_path(p ? "avx512" : "avx2");
        out[p].assign(size_t(batch) * M * N, 0.0f);
        cpuformer::sgemm_strided_batched(false, true, M, N, K, 1.0f, A.data(), K, M * K, B.data(), K, N * K, 0.0f,
                                         out[p].data(), N, M * N, batch);
      }
      ++cases;
      if (out[0] != out[1]) {
        ++mismatches;
        std::printf("avx512 != avx2: sgemm_strided_batched threads %d\n", threads);
      }
    }
  }
  cpuformer::set_simd_path("auto");
  check(mismatches == 0, "AVX-512 GEMM equal to AVX2 (bitwise up to K 256) (" + std::to_string(mismatches) + " of " +
                             std::to_string(cases) + " cases differ)");
}

void test_softmax_layernorm_ce(std::mt19937& gen) {
  const int rows = 9, cols = 77;
  auto x = random_vec(gen, rows * cols, 3.0f);
  std::vector<float> y(x.size());
  cpuformer::softmax_forward(y.data(), x.data(), rows, cols);
  double worst = 0;
  for (int r = 0; r < rows; ++r) {
    double m = -1e30, s = 0;
    for (int j = 0; j < cols; ++j) m = std::max(m, double(x[r * cols + j]));
    for (int j = 0; j < cols; ++j) s += std::exp(x[r * cols + j] - m);
    for (int j = 0; j < cols; ++j)
      worst = std::max(worst, std::fabs(y[r * cols + j] - std::exp(x[r * cols + j] - m) / s));
  }
  check(worst < 1e-6, "softmax_forward");

  std::vector<float> out(x.size()), mean(rows), rstd(rows), w = random_vec(gen, cols), b = random_vec(gen, cols);
  cpuformer::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), rows, cols, 1e-5f);
  worst = 0;
  for (int r = 0; r < rows; ++r) {
    double mu = 0, var = 0;
    for (int j = 0; j < cols; ++j) mu += x[r * cols + j];
    mu /= cols;
    for (int j = 0; j < cols; ++j) var += (x[r * cols + j] - mu) * (x[r * cols + j] - mu);
    var /= cols;
    for (int j = 0; j < cols; ++j) {
      const double ref = (x[r * cols + j] - mu) / std::sqrt(var + 1e-5) * w[j] + b[j];
      worst = std::max(worst, std::fabs(out[r * cols + j] - ref));
    }
  }
  check(worst < 1e-4, "layernorm_forward");
  {  // the fused post-norm residual: the bits of residual_forward then the norm; a sum written over its input a
    const int n = rows * cols;
    std::mt19937 own(17);  // its own stream: the tests after this one keep their data
    std::vector<float> a = random_vec(own, n), sum(n), ref_sum(n), ref_out(n), ref_mean(rows), ref_rstd(rows);
    cpuformer::residual_forward(ref_sum.data(), a.data(), x.data(), n);
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<float> in_place = a;
      float* s = kind ? in_place.data() : sum.data();
      if (kind == 0) {
        cpuformer::layernorm_forward(ref_out.data(), ref_mean.data(), ref_rstd.data(), ref_sum.data(), w.data(),
                                     b.data(), rows, cols, 1e-5f);
        cpuformer::residual_layernorm_forward(out.data(), s, mean.data(), rstd.data(), a.data(), x.data(), w.data(),
                                              b.data(), rows, cols, 1e-5f);
      } else {
        cpuformer::rmsnorm_forward(ref_out.data(), ref_rstd.data(), ref_sum.data(), w.data(), rows, cols, 1e-6f,
                                   true);
        cpuformer::residual_rmsnorm_forward(out.data(), s, rstd.data(), in_place.data(), x.data(), w.data(), rows,
                                            cols, 1e-6f, true);
      }
      check(std::vector<float>(s, s + n) == ref_sum && out == ref_out && rstd == ref_rstd &&
                (kind || mean == ref_mean),
            kind ? "residual_rmsnorm_forward" : "residual_layernorm_forward");
    }
    bool threw = false;  // bad arguments: std::invalid_argument, nothing written
    try {
      cpuformer::residual_layernorm_forward(out.data(), sum.data(), mean.data(), rstd.data(), a.data(), x.data(),
                                            w.data(), b.data(), rows, cols, -1.0f);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    try {
      cpuformer::residual_rmsnorm_forward(out.data(), sum.data(), rstd.data(), a.data(), x.data(), w.data(), rows, 0,
                                          1e-6f);
      threw = false;
    } catch (const std::invalid_argument&) {
    }
    check(threw, "residual_layernorm_forward / residual_rmsnorm_forward: bad eps or C throws");
  }

  std::vector<std::int64_t> targets = {0, 5, 76, -100, 3, 3, 9, 1, 2};
  std::vector<float> grad(x.size());
  const double loss =
      cpuformer::cross_entropy_forward_backward(grad.data(), x.data(), targets.data(), rows, cols, -100, 0.0f);
  double ref = 0;
  for (int r = 0; r < rows; ++r) {
    if (targets[r] == -100) continue;
    double m = -1e30, s = 0;
    for (int j = 0; j < cols; ++j) m = std::max(m, double(x[r * cols + j]));
    for (int j = 0; j < cols; ++j) s += std::exp(x[r * cols + j] - m);
    ref += m + std::log(s) - x[r * cols + targets[r]];
  }
  check(std::fabs(loss - ref / 8) < 1e-5, "cross_entropy loss");
}

void test_errors() {
  std::vector<float> w(4 * 3, 1.0f), out(2 * 3, -7.0f);
  std::vector<std::int64_t> ids = {1, 4};
  bool threw = false;
  try {
    cpuformer::embedding_forward(out.data(), ids.data(), w.data(), 2, 4, 3);
  } catch (const std::out_of_range&) {
    threw = true;
  }
  check(threw, "embedding id out of range throws std::out_of_range");
  check(out[0] == -7.0f, "embedding writes nothing on error");
  threw = false;
  try {
    cpuformer::sgemm(false, false, 2, 2, 2, 1.0f, w.data(), 1, w.data(), 2, 0.0f, out.data(), 2);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "sgemm with lda < K throws std::invalid_argument");
  threw = false;
  try {
    cpuformer::set_num_threads(0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "set_num_threads(0) throws");
}

// Attention variants against a double-precision reference that materialises the scores: grouped-query heads, a
// causal sliding window, query offsets and key lengths per batch row (one row with no keys at all), ALiBi, and a
// (T, S) additive mask broadcast over batch and heads together with its gradient; then 1 vs 2 threads bitwise, and
// the argument checks.
void test_attention_variants(std::mt19937& gen) {
  using cpuformer::index_t;
  const index_t B = 3, H = 4, KVH = 2, T = 70, S = 300, D = 5, G = H / KVH, window = 40;
  const float scale = 1.0f / std::sqrt(float(D));
  auto q = random_vec(gen, size_t(B * T * H * D)), k = random_vec(gen, size_t(B * S * KVH * D)),
       v = random_vec(gen, size_t(B * S * KVH * D)), add = random_vec(gen, size_t(T * S)),
       dout = random_vec(gen, size_t(B * T * H * D));
  std::vector<float> slopes(H);
  for (index_t h = 0; h < H; ++h) slopes[h] = std::pow(2.0f, -8.0f * float(h + 1) / float(H));
  const std::vector<std::int64_t> offset = {0, 230, 10}, length = {70, 300, 0};
  cpuformer::AttentionMask mask;
  mask.additive = add.data();
  mask.add_st = S;  // (T, S): add_sb = add_sh = 0
  mask.causal = true;
  mask.window = window;
  mask.query_offset = offset.data();
  mask.key_length = length.data();
  mask.alibi_slopes = slopes.data();
  cpuformer::AttentionConfig cfg{B, H, T, S, D, scale};
  cfg.KVH = KVH;
  const auto qi = [&](index_t b, index_t t, index_t h) { return size_t(((b * T + t) * H + h) * D); };
  const auto ki = [&](index_t b, index_t s, index_t g) { return size_t(((b * S + s) * KVH + g) * D); };

  // Reference: probabilities, output, lse and all gradients in double.
  std::vector<double> ro(q.size()), rdq(q.size()), rdk(k.size()), rdv(v.size()), rdadd(add.size()),
      rlse(size_t(B * H * T));
  std::vector<double> p(static_cast<size_t>(S)), dp(static_cast<size_t>(S));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < T; ++t) {
        const index_t g = h / G, pos = offset[b] + t;
        double mx = -INFINITY;
        for (index_t s = 0; s < S; ++s) {
          const bool visible = s < length[b] && s <= pos && s > pos - window;
          double acc = 0;
          for (index_t d = 0; d < D; ++d) acc += double(q[qi(b, t, h) + d]) * k[ki(b, s, g) + d];
          p[s] = visible ? acc * scale + add[t * S + s] + double(slopes[h]) * double(s - pos) : -INFINITY;
          mx = std::max(mx, p[s]);
        }
        double z = 0;
        for (index_t s = 0; s < S; ++s) z += p[s] = mx == -INFINITY ? 0.0 : std::exp(p[s] - mx);
        rlse[(b * H + h) * T + t] = z > 0 ? mx + std::log(z) : -INFINITY;
        double dsum = 0;
        for (index_t s = 0; s < S; ++s) {
          p[s] = z > 0 ? p[s] / z : 0.0;
          double acc = 0;
          for (index_t d = 0; d < D; ++d) {
            ro[qi(b, t, h) + d] += p[s] * v[ki(b, s, g) + d];
            acc += double(dout[qi(b, t, h) + d]) * v[ki(b, s, g) + d];
          }
          dp[s] = acc;
          dsum += p[s] * acc;
        }
        for (index_t s = 0; s < S; ++s) {
          const double ds = p[s] * (dp[s] - dsum);
          rdadd[t * S + s] += ds;
          for (index_t d = 0; d < D; ++d) {
            rdq[qi(b, t, h) + d] += ds * scale * k[ki(b, s, g) + d];
            rdk[ki(b, s, g) + d] += ds * scale * q[qi(b, t, h) + d];
            rdv[ki(b, s, g) + d] += p[s] * dout[qi(b, t, h) + d];
          }
        }
      }
  const auto rel = [](const std::vector<float>& a, const std::vector<double>& r) {
    double err = 0, mag = 1e-30;
    for (size_t i = 0; i < a.size(); ++i) {
      if (std::isinf(r[i]) || std::isinf(a[i])) {
        if (a[i] != r[i]) return 1e30;
        continue;
      }
      err = std::max(err, std::fabs(a[i] - r[i]));
      mag = std::max(mag, std::fabs(r[i]));
    }
    return err / mag;
  };
  std::vector<std::vector<float>> first;
  for (int threads : {1, 2}) {
    cpuformer::set_num_threads(threads);
    std::vector<float> out(q.size()), lse(rlse.size()), dq(q.size()), dk(k.size()), dv(v.size()), dadd(add.size());
    const cpuformer::ConstHeadTensor cq{q.data(), T * H * D, H * D}, ck{k.data(), S * KVH * D, KVH * D},
        cv{v.data(), S * KVH * D, KVH * D}, cdo{dout.data(), T * H * D, H * D}, co{out.data(), T * H * D, H * D};
    cpuformer::attention_forward({out.data(), T * H * D, H * D}, lse.data(), cq, ck, cv, mask, cfg);
    cpuformer::attention_backward({dq.data(), T * H * D, H * D}, {dk.data(), S * KVH * D, KVH * D},
                                  {dv.data(), S * KVH * D, KVH * D}, cdo, cq, ck, cv, co, lse.data(), mask, cfg,
                                  dadd.data());
    const std::string tag = " (threads " + std::to_string(threads) + ")";
    check(rel(out, ro) < 1e-5, "attention variants: output" + tag);
    check(rel(lse, rlse) < 1e-5, "attention variants: lse, -inf for the batch row without keys" + tag);
    check(rel(dq, rdq) < 1e-4 && rel(dk, rdk) < 1e-4 && rel(dv, rdv) < 1e-4, "attention variants: dq, dk, dv" + tag);
    check(rel(dadd, rdadd) < 1e-4, "attention variants: gradient of a broadcast additive mask" + tag);
    std::vector<std::vector<float>> all = {out, lse, dq, dk, dv, dadd};
    if (first.empty()) first = all;
    else check(all == first, "attention variants: 1 and 2 threads give identical results");
  }
  // Argument checks: std::invalid_argument before anything is written.
  const auto throws = [&](cpuformer::AttentionMask m, cpuformer::AttentionConfig c) {
    std::vector<float> out(q.size(), -7.0f);
    try {
      cpuformer::attention_forward({out.data(), T * H * D, H * D}, nullptr, {q.data(), T * H * D, H * D},
                                   {k.data(), S * KVH * D, KVH * D}, {v.data(), S * KVH * D, KVH * D}, m, c);
    } catch (const std::invalid_argument&) {
      return out[0] == -7.0f;
    }
    return false;
  };
  cpuformer::AttentionConfig bad = cfg;
  bad.KVH = 3;
  check(throws(mask, bad), "attention: H % KVH != 0 throws");
  cpuformer::AttentionMask m2 = mask;
  m2.window = -1;
  check(throws(m2, cfg), "attention: window < 0 throws");
  const std::vector<std::int64_t> too_long = {70, 301, 0}, negative = {0, -1, 0};
  m2 = mask;
  m2.key_length = too_long.data();
  check(throws(m2, cfg), "attention: key_length > S throws");
  m2 = mask;
  m2.query_offset = negative.data();
  check(throws(m2, cfg), "attention: negative query_offset throws");
}

// A valid safetensors file, then thousands of mutated copies (flipped bytes, truncations): the reader must return
// an error or a consistent result, never crash or read out of bounds (this program runs under ASan in CI).
void test_safetensors_fuzz(std::mt19937& gen) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F16","shape":[4],)"
      R"("data_offsets":[24,32]},"__metadata__":{"format":"cpuformer-model","config":"{\"x\": [1, 2.5e3]}"}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  file += header;
  for (int i = 0; i < 32; ++i) file.push_back(static_cast<char>(i * 7));
  const std::string path = "cpuformer_fuzz.safetensors";
  const auto write = [&](const std::string& bytes) {
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  };
  write(file);
  std::map<std::string, cpuformer::Tensor> tensors;
  std::map<std::string, std::string> meta;
  check(cpuformer::read_safetensors(path, &tensors, &meta).ok() && tensors["a"].data.size() == 6 &&
            tensors["b"].data.size() == 4 && meta["format"] == "cpuformer-model",
        "safetensors: a valid file reads");
  int errors = 0;
  std::uniform_int_distribution<size_t> pos(0, file.size() - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int trial = 0; trial < 3000; ++trial) {
    std::string m = file;
    const int flips = 1 + trial % 4;
    for (int k = 0; k < flips; ++k) m[pos(gen)] = static_cast<char>(byte(gen));
    if (trial % 5 == 0) m.resize(pos(gen));
    write(m);
    tensors.clear();
    const cpuformer::Status st = cpuformer::read_safetensors(path, &tensors, nullptr);
    errors += !st.ok();
    for (const auto& [name, t] : tensors) {  // whatever parsed is self-consistent
      std::int64_t n = 1;
      for (auto d : t.shape) n *= d;
      if (st.ok()) check(n == static_cast<std::int64_t>(t.data.size()), "safetensors fuzz: sizes agree");
    }
  }
  check(errors > 1000, "safetensors fuzz: mutated files are rejected");
  std::unique_ptr<cpuformer::Model> model;
  check(!cpuformer::Model::load(path, &model).ok() && !model, "Model::load of a broken file is an error");
  std::remove(path.c_str());
}


// ---------------------------------------------------------------------------------------------------------------
// The model runtime (cpuformer/model.h) on tiny model files built in memory (cpp/fuzz/model_files.h).

using cpuformer_testing::ModelSpec;

std::unique_ptr<cpuformer::Model> load_spec(const ModelSpec& spec, cpuformer::Status* st = nullptr) {
  const std::string bytes = spec.file();
  std::unique_ptr<cpuformer::Model> m;
  const cpuformer::Status s = cpuformer::Model::load_from_buffer(bytes.data(), bytes.size(), &m);
  if (st) *st = s;
  return m;
}

// The error message of loading `spec`, or "" when it loads.
std::string load_error(const ModelSpec& spec) {
  cpuformer::Status st;
  auto m = load_spec(spec, &st);
  if (st.ok() != static_cast<bool>(m)) return "(status and model disagree)";
  return st.ok() ? "" : st.message();
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string replaced(std::string s, const std::string& from, const std::string& to) {
  const size_t at = s.find(from);
  if (at != std::string::npos) s.replace(at, from.size(), to);
  return s;
}

// Greedy continuation computed without the key/value cache: logits() of the last block_size ids each step.
std::vector<std::int64_t> greedy_reference(cpuformer::Model& m, std::vector<std::int64_t> ids, int n,
                                           std::int64_t block_size) {
  for (int i = 0; i < n; ++i) {
    const std::int64_t keep = std::min<std::int64_t>(ids.size(), block_size);
    std::vector<std::int64_t> window(ids.end() - keep, ids.end());
    std::vector<float> logits;
    if (!m.logits(window, 1, keep, &logits).ok()) return {};
    const float* last = logits.data() + logits.size() - 11;  // vocabulary 11
    ids.push_back(std::max_element(last, last + 11) - last);
  }
  return ids;
}

void test_model_generate() {
  for (const bool learned : {true, false}) {
    const std::string name = learned ? "GPT learned" : "GPT sinusoidal";
    auto m = load_spec(cpuformer_testing::tiny_gpt(learned, learned));
    check(m && m->kind() == "GPT", name + ": loads from a buffer");
    if (!m) continue;
    // Prompt lengths 1 (the first step allocates the cache), within, at and past block_size 6; 0 to 9 new tokens.
    for (const int len : {1, 2, 6, 8})
      for (const int n : {0, 1, 4, 9}) {
        std::vector<std::int64_t> prompt;
        for (int i = 0; i < len; ++i) prompt.push_back((3 * i + 5) % 11);
        std::vector<std::int64_t> out;
        const cpuformer::Status st = m->generate(prompt, n, cpuformer::GenerateOptions{}, &out);
        check(st.ok() && out == greedy_reference(*m, prompt, n, 6),
              name + ": cached greedy generation = uncached, prompt " + std::to_string(len) + ", new " +
                  std::to_string(n) + (st.ok() ? "" : " (" + st.message() + ")"));
      }
    cpuformer::GenerateOptions sample;
    sample.greedy = false, sample.top_k = 3, sample.temperature = 0.7f, sample.seed = 9;
    std::vector<std::int64_t> a, b;
    check(m->generate({4}, 12, sample, &a).ok() && m->generate({4}, 12, sample, &b).ok() && a == b &&
              a.size() == 13 && *std::min_element(a.begin(), a.end()) >= 0 &&
              *std::max_element(a.begin(), a.end()) < 11,
          name + ": top-k sampling is seeded and in range");
    // Every bad argument is an error status, and `out` is left alone.
    const auto nan = std::nanf(""), inf = INFINITY;
    struct Bad {
      std::vector<std::int64_t> prompt;
      int n;
      int top_k;
      float temperature;
      const char* why;
    };
    for (const Bad& c : {Bad{{}, 3, 0, 1.0f, "empty prompt"}, Bad{{11}, 3, 0, 1.0f, "id out of range"},
                         Bad{{-1}, 3, 0, 1.0f, "negative id"}, Bad{{1}, -1, 0, 1.0f, "negative max_new_tokens"},
                         Bad{{1}, 3, -2, 1.0f, "negative top_k"}, Bad{{1}, 3, 2, nan, "NaN temperature"},
                         Bad{{1}, 3, 2, -0.5f, "negative temperature"}, Bad{{1}, 3, 2, inf, "infinite temperature"}}) {
      cpuformer::GenerateOptions o;
      o.greedy = c.top_k == 0, o.top_k = c.top_k, o.temperature = c.temperature;
      std::vector<std::int64_t> out = {42};
      const cpuformer::Status st = m->generate(c.prompt, c.n, o, &out);
      check(!st.ok() && !st.message().empty() && out == std::vector<std::int64_t>{42},
            name + ": generate with " + c.why + " is an error");
    }
    std::vector<float> logits;
    check(!m->logits({1, 2, 3, 4, 5, 6, 7}, 1, 7, &logits).ok(), name + ": logits past block_size is an error");
    check(!m->logits({}, std::int64_t{1} << 32, std::int64_t{1} << 32, &logits).ok(),
          name + ": B*T overflowing int64 is an error");
    check(!m->classify({1}, 1, 1, &logits).ok() && !m->encode({1}, 1, 1, {}, &logits).ok(),
          name + ": encoder calls are errors");
  }
}

// The Llama-style GPT (rotary, GQA, gated SiLU, RMSNorm): cached generation through block_decode equals logits()
// of the whole window each step, in every weight form.
void test_model_llama_generate() {
  const std::string bytes = cpuformer_testing::tiny_llama_gpt().file();
  for (const auto form : {cpuformer::LoadOptions::kFloat32, cpuformer::LoadOptions::kPacked,
                          cpuformer::LoadOptions::kInt8}) {
    std::unique_ptr<cpuformer::Model> m;
    cpuformer::LoadOptions options;
    options.weights = form;
    check(cpuformer::Model::load_from_buffer(bytes.data(), bytes.size(), &m, options).ok(), "llama GPT: loads");
    if (!m) continue;
    for (const int len : {1, 3, 8})
      for (const int n : {0, 4, 9}) {
        std::vector<std::int64_t> prompt, out;
        for (int i = 0; i < len; ++i) prompt.push_back((3 * i + 5) % 11);
        const cpuformer::Status st = m->generate(prompt, n, cpuformer::GenerateOptions{}, &out);
        // int8: one row's activations quantize the same alone or among others, so the reference agrees too
        check(st.ok() && out == greedy_reference(*m, prompt, n, 6),
              "llama GPT: cached greedy generation = uncached, form " + std::to_string(form) + ", prompt " +
                  std::to_string(len) + ", new " + std::to_string(n));
      }
  }
}

void test_model_encoders() {
  for (const bool mean_pool : {true, false}) {
    const std::string name = mean_pool ? "classifier mean" : "classifier cls";
    auto m = load_spec(cpuformer_testing::tiny_classifier(mean_pool, !mean_pool));
    check(m && m->kind() == "TransformerClassifier", name + ": loads");
    if (!m) continue;
    std::vector<float> logits;
    check(m->classify({1, 2, 3, 4, 5, 6, 7, 0, 0, 0}, 2, 5, &logits).ok() && logits.size() == 6,
          name + ": max_len tokens classify");
    const cpuformer::Status st = m->classify({1, 2, 3, 4, 5, 6}, 1, 6, &logits);
    check(!st.ok() && contains(st.message(), "sequence length 6 exceeds max_len 5"),
          name + ": more than max_len tokens is an error (" + st.message() + ")");
    check(!m->classify({1, 2, 13}, 1, 3, &logits).ok(), name + ": id out of range is an error");
    check(!m->classify({1, 2, 3}, 2, 2, &logits).ok(), name + ": ids that are not B*T are an error");
  }
  auto bert = load_spec(cpuformer_testing::tiny_bert());
  check(bert && bert->kind() == "BertModel", "BertModel: loads");
  if (bert) {
    std::vector<float> e;
    check(bert->sentence_embeddings({1, 2, 3, 4, 5, 6, 0, 0}, 2, 4, {1, 1, 1, 1, 1, 1, 0, 0}, &e).ok() &&
              e.size() == 16,
          "BertModel: sentence embeddings");
    check(bert->sentence_embeddings({1, 2, 3, 4}, 1, 4, {0, 0, 0, 0}, &e).ok(), "BertModel: an all-padding row");
    check(!bert->sentence_embeddings({1, 2, 3, 4}, 1, 4, {1, 1}, &e).ok(), "BertModel: a short mask is an error");
    const cpuformer::Status st = bert->encode({1, 2, 3, 4, 5, 6, 7}, 1, 7, {}, &e);
    check(!st.ok() && contains(st.message(), "exceeds max_position_embeddings 6"),
          "BertModel: more than max_position_embeddings tokens is an error");
    std::vector<std::int64_t> out;
    check(!bert->generate({1}, 1, cpuformer::GenerateOptions{}, &out).ok(), "BertModel: generate is an error");
  }
}

// Configs and headers whose sizes the tensors do not justify fail at load, quickly and before allocating.
// One loaded model called from several threads at once gives each call its single-thread result (inference keeps
// its scratch per call; sinusoidal positions are computed per call, not grown in a shared table).
void test_model_threads() {
  const std::vector<std::int64_t> ids{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  for (const auto& [name, spec] : cpuformer_testing::tiny_models())
    for (const auto form : {cpuformer::LoadOptions::kFloat32, cpuformer::LoadOptions::kPacked,
                            cpuformer::LoadOptions::kInt8}) {
      const std::string bytes = spec.file();
      std::unique_ptr<cpuformer::Model> m;
      cpuformer::LoadOptions options;
      options.weights = form;
      const cpuformer::Status loaded = cpuformer::Model::load_from_buffer(bytes.data(), bytes.size(), &m, options);
      const std::string label = name + (form == cpuformer::LoadOptions::kInt8     ? " int8"
                                        : form == cpuformer::LoadOptions::kPacked ? " packed"
                                                                                  : "");
      check(loaded.ok(), label + ": loads (" + loaded.message() + ")");
      if (!m) continue;
      const bool gpt = m->kind() == "GPT", s2s = m->kind() == "Seq2SeqTransformer";
      // Each thread uses its own sequence length, so a shared buffer would be resized under another call.
      const auto call = [&](int i, std::vector<float>* f, std::vector<std::int64_t>* g) {
        const std::int64_t T = 2 + i % 4;
        const std::vector<std::int64_t> x(ids.begin(), ids.begin() + 2 * T);
        if (s2s) {  // greedy and beam search (beams 2, 3), two source rows
          std::vector<std::vector<std::int64_t>> out;
          if (!m->translate(x, 2, T, 3 + i, 1 + i % 3, 0.6, &out).ok() || out.size() != 2) return false;
          g->clear();
          for (const auto& row : out) g->insert(g->end(), row.begin(), row.end()), g->push_back(-1);
          return true;
        }
        if (!gpt) return m->encode(x, 2, T, {}, f).ok();
        return m->logits(x, 2, T, f).ok() && m->generate({x[0]}, 3 + i, cpuformer::GenerateOptions{}, g).ok();
      };
      std::vector<std::vector<float>> ref_f(4);
      std::vector<std::vector<std::int64_t>> ref_g(4);
      bool ok = true;
      for (int i = 0; i < 4; ++i) ok = ok && call(i, &ref_f[i], &ref_g[i]);
      std::vector<int> bad(4, 0);
      std::vector<std::thread> threads;
      for (int i = 0; i < 4; ++i)
        threads.emplace_back([&, i] {
          for (int r = 0; r < 20; ++r) {
            std::vector<float> f;
            std::vector<std::int64_t> g;
            if (!call(i, &f, &g) || f != ref_f[i] || g != ref_g[i]) ++bad[i];
          }
        });
      for (auto& t : threads) t.join();
      check(ok && bad == std::vector<int>(4, 0),
            label + ": concurrent calls on one model give single-thread results");
    }
}

void test_model_file_validation() {
  const auto start = std::chrono::steady_clock::now();
  const ModelSpec gpt = cpuformer_testing::tiny_gpt(false, true), clf = cpuformer_testing::tiny_classifier();
  check(load_error(gpt).empty(), "validation: the tiny GPT loads");
  struct Case {
    ModelSpec spec;
    const char* expect;  // part of the message
  };
  auto with_config = [](ModelSpec m, const std::string& from, const std::string& to) {
    m.config = replaced(m.config, from, to);
    return m;
  };
  ModelSpec extra_layer = gpt, gap = gpt, huge_index = gpt, bad_shape = gpt, short_tensor = gpt;
  cpuformer_testing::add_layer(&extra_layer.tensors, "blocks.2.", 8, 32);
  for (auto& t : gap.tensors) t.name = replaced(t.name, "blocks.1.", "blocks.7.");
  huge_index.tensors[1].name = "blocks.99999999999999999999999.self_attn.in_proj_weight";
  bad_shape.tensors[0].shape = {8, 11};
  short_tensor.tensors[0].shape = {11, 7};
  const std::vector<Case> cases = {
      {with_config(gpt, "\"block_size\": 6", "\"block_size\": 1000000000"), "'block_size' must be an integer"},
      {with_config(clf, "\"max_len\": 5", "\"max_len\": 1000000000"), "'max_len' must be an integer"},
      {with_config(gpt, "\"n_layer\": 2", "\"n_layer\": 9223372036854775808"), "'n_layer' must be an integer"},
      {with_config(gpt, "\"n_layer\": 2", "\"n_layer\": 1000000"), "'n_layer' is 1000000 but the file holds 2"},
      {with_config(gpt, "\"n_layer\": 2", "\"n_layer\": 3"), "'n_layer' is 3 but the file holds 2"},
      {with_config(gpt, "\"n_layer\": 2", "\"n_layer\": \"2\""), "'n_layer' must be an integer"},
      {with_config(gpt, "\"n_layer\": 2", "\"n_layer\": 2.5"), "'n_layer' must be an integer"},
      {with_config(gpt, "\"n_layer\": 2, ", ""), "'n_layer' must be an integer"},
      {with_config(gpt, "\"n_head\": 2", "\"n_head\": 3"), "not divisible by the heads"},
      {with_config(gpt, "\"n_head\": 2", "\"n_head\": -2"), "'n_head' must be an integer"},
      {with_config(gpt, "\"vocab_size\": 11", "\"vocab_size\": 12"), "'wte.weight' has shape"},
      {with_config(gpt, "\"positional\": \"sinusoidal\"", "\"positional\": \"rope\""), "'positional' must be"},
      {with_config(gpt, "\"tie_weights\": true", "\"tie_weights\": 1"), "'tie_weights' must be true or false"},
      {with_config(gpt, "\"layer_norm_eps\": 1e-05", "\"layer_norm_eps\": -1"), "'layer_norm_eps'"},
      {with_config(clf, "\"pad_id\": 0", "\"pad_id\": 13"), "'pad_id' must be an integer in [0, 12]"},
      {with_config(gpt, gpt.config, std::string(100000, '[')), "nesting deeper than 64"},
      {with_config(gpt, gpt.config, "[]"), "not a JSON object"},
      {extra_layer, "'n_layer' is 2 but the file holds 3"},
      {gap, "skip an index"},
      {huge_index, "unexpected tensor"},
      {bad_shape, "'wte.weight' has shape (8,11,)"},
      {short_tensor, "'wte.weight' has shape (11,7,)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string err = load_error(cases[i].spec);
    check(contains(err, cases[i].expect), "validation case " + std::to_string(i) + ": expected '" +
                                              cases[i].expect + "', got '" + err + "'");
  }
  // Headers: shapes whose element count overflows, nesting bombs, value-count bombs, duplicate names.
  const auto header_file = [](const std::string& header) {
    std::string f(8, '\0');
    for (int i = 0; i < 8; ++i) f[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
    return f + header + std::string(64, '\0');
  };
  std::string many = "{\"x\":[";
  for (int i = 0; i < (1 << 21) + 1; ++i) many += "0,";
  many.back() = ']';
  many += "}";
  const std::vector<std::pair<std::string, std::string>> headers = {
      {R"({"a":{"dtype":"F32","shape":[18446744073709551632],"data_offsets":[0,64]}})", "bad shape"},
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,64]}})", "larger than the data"},
      {R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", "bad shape"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
       R"("a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})",
       "appears twice"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
       R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
       "overlap"},
      {R"({"a":{"dtype":"I64","shape":[4],"data_offsets":[0,32]}})", "unsupported dtype"},
      {std::string(100000, '['), "nesting deeper than 64"},
      {many, "more than 2097152 values"},
  };
  for (const auto& [header, expect] : headers) {
    const std::string f = header_file(header);
    std::map<std::string, cpuformer::Tensor> tensors = {{"untouched", {}}};
    const cpuformer::Status st = cpuformer::read_safetensors_buffer(f.data(), f.size(), &tensors, nullptr);
    check(!st.ok() && contains(st.message(), expect) && tensors.count("untouched"),
          "header '" + header.substr(0, 60) + "': expected '" + expect + "', got '" + st.message() + "'");
  }
  std::unique_ptr<cpuformer::Model> m;
  check(!cpuformer::Model::load_from_buffer(nullptr, 10, &m).ok() &&
            !cpuformer::Model::load_from_buffer("", 0, &m).ok(),
        "load_from_buffer of no bytes is an error");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  check(seconds < 20, "validation is quick (" + std::to_string(seconds) + " s)");
}

// The file and buffer loaders are one implementation: the same file gives the same results through both.
void test_model_file_and_buffer() {
  const std::string bytes = cpuformer_testing::tiny_gpt().file(), path = "cpuformer_tiny_gpt.safetensors";
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  std::unique_ptr<cpuformer::Model> a, b;
  std::vector<float> la, lb;
  check(cpuformer::Model::load(path, &a).ok() &&
            cpuformer::Model::load_from_buffer(bytes.data(), bytes.size(), &b).ok() &&
            a->logits({1, 2, 3}, 1, 3, &la).ok() && b->logits({1, 2, 3}, 1, 3, &lb).ok() && la == lb && la.size() == 33,
        "Model::load and load_from_buffer agree");
  const cpuformer::Status st = cpuformer::Model::load("no/such/file.safetensors", &a);
  check(!st.ok() && !a && contains(st.message(), "cannot open"), "Model::load of a missing file is an error");
  std::remove(path.c_str());
}

// SafetensorsMap (safetensors.h): every whole-byte dtype, views that point at the file's own bytes, the same
// validation as read_safetensors, and Hugging Face directories (single file, sharded, broken indexes).
std::string st_file(const std::string& header, const std::string& data) {
  std::string f(8, '\0');
  for (int i = 0; i < 8; ++i) f[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  return f + header + data;
}

void write_file(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

void test_safetensors_map() {
  using cpuformer::DType;
  using cpuformer::SafetensorsMap;
  const std::pair<DType, size_t> sizes[] = {
      {DType::kBool, 1}, {DType::kU8, 1},  {DType::kI8, 1},   {DType::kF8E5M2, 1}, {DType::kF8E4M3, 1},
      {DType::kF8E8M0, 1}, {DType::kF8E4M3FNUZ, 1}, {DType::kF8E5M2FNUZ, 1}, {DType::kI16, 2}, {DType::kU16, 2},
      {DType::kF16, 2},  {DType::kBF16, 2}, {DType::kI32, 4},  {DType::kU32, 4},    {DType::kF32, 4},
      {DType::kI64, 8},  {DType::kU64, 8},  {DType::kF64, 8},  {DType::kC64, 8}};
  for (const auto& [d, size] : sizes)
    check(cpuformer::dtype_size(d) == size, std::string("dtype_size(") + cpuformer::dtype_name(d) + ")");
  check(std::string(cpuformer::dtype_name(DType::kF8E4M3FNUZ)) == "F8_E4M3FNUZ" &&
            std::string(cpuformer::dtype_name(DType::kBF16)) == "BF16",
        "dtype_name spells the file's names");

  // 1.5f, -2.0f (F32); 1.0, -2.0 (F16); 1.5, -2.0 (BF16); 0.25 (F64); 7 (I64); 3 bytes (U8, F8_E4M3, BOOL). The
  // header is padded with spaces to a multiple of 8, as the official writer does.
  std::string header =
      R"({"f32":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"f16":{"dtype":"F16","shape":[2],)"
      R"("data_offsets":[8,12]},"bf16":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]},)"
      R"("f64":{"dtype":"F64","shape":[],"data_offsets":[16,24]},"i64":{"dtype":"I64","shape":[1,1],)"
      R"("data_offsets":[24,32]},"u8":{"dtype":"U8","shape":[3],"data_offsets":[32,35]},)"
      R"("f8":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[35,36]},"b":{"dtype":"BOOL","shape":[0],)"
      R"("data_offsets":[36,36]},"__metadata__":{"format":"pt"}})";
  header += std::string((8 - header.size() % 8) % 8, ' ');
  const std::string data = std::string("\x00\x00\xc0\x3f\x00\x00\x00\xc0", 8) + std::string("\x00\x3c\x00\xc0", 4) +
                           std::string("\xc0\x3f\x00\xc0", 4) + std::string("\x00\x00\x00\x00\x00\x00\xd0\x3f", 8) +
                           std::string("\x07\x00\x00\x00\x00\x00\x00\x00", 8) + "abcd";
  const std::string file = st_file(header, data);
  std::unique_ptr<SafetensorsMap> map;
  cpuformer::Status st = SafetensorsMap::open_buffer(file.data(), file.size(), &map);
  check(st.ok() && map && map->tensors().size() == 8 && map->metadata().at("format") == "pt" &&
            map->mapped_bytes() == file.size(),
        "open_buffer of a valid file: " + st.message());
  if (!map) return;
  const unsigned char* base = nullptr;
  bool views_ok = true;
  for (const auto& [name, v] : map->tensors()) {
    views_ok &= v.name == name && v.nbytes == static_cast<std::uint64_t>(v.numel()) * cpuformer::dtype_size(v.dtype);
    if (name == "f32") base = v.data;  // offset 0 of the data section
  }
  check(views_ok, "views: nbytes = numel * dtype size");
  const cpuformer::TensorView* u8 = map->find("u8");
  check(u8 && base && u8->data == base + 32 && std::memcmp(u8->data, "abc", 3) == 0 &&
            std::memcmp(base, data.data(), data.size()) == 0 && map->find("f8")->dtype == DType::kF8E4M3 &&
            map->find("b")->numel() == 0 && map->find("f64")->shape.empty() && !map->find("nope"),
        "views point at the (copied) file bytes");
  std::vector<float> f;
  check(cpuformer::tensor_to_float(*map->find("f32"), &f).ok() && f == std::vector<float>{1.5f, -2.0f},
        "tensor_to_float F32");
  check(cpuformer::tensor_to_float(*map->find("f16"), &f).ok() && f == std::vector<float>{1.0f, -2.0f},
        "tensor_to_float F16");
  check(cpuformer::tensor_to_float(*map->find("bf16"), &f).ok() && f == std::vector<float>{1.5f, -2.0f},
        "tensor_to_float BF16");
  check(cpuformer::tensor_to_float(*map->find("f64"), &f).ok() && f == std::vector<float>{0.25f},
        "tensor_to_float F64");
  st = cpuformer::tensor_to_float(*map->find("i64"), &f);
  check(!st.ok() && contains(st.message(), "'i64'") && contains(st.message(), "unsupported dtype 'I64'") &&
            f == std::vector<float>{0.25f},
        "tensor_to_float I64 is an error, output untouched: " + st.message());
  float into[3] = {7.0f, 7.0f, 7.0f};  // the caller's buffer: written in place, nothing past the tensor's elements
  check(cpuformer::tensor_to_float(*map->find("bf16"), into).ok() && into[0] == 1.5f && into[1] == -2.0f &&
            into[2] == 7.0f,
        "tensor_to_float BF16 into a buffer");
  check(cpuformer::tensor_to_float(*map->find("f32"), into).ok() && into[0] == 1.5f && into[1] == -2.0f,
        "tensor_to_float F32 into a buffer");
  st = cpuformer::tensor_to_float(*map->find("i64"), into);
  check(!st.ok() && contains(st.message(), "unsupported dtype 'I64'") && into[0] == 1.5f,
        "tensor_to_float I64 into a buffer is an error, buffer untouched: " + st.message());
  st = cpuformer::tensor_to_float(*map->find("f32"), static_cast<float*>(nullptr));
  check(!st.ok() && contains(st.message(), "null output"), "tensor_to_float into a null buffer: " + st.message());

  // Bad headers: the same checks as read_safetensors, messages naming the tensor.
  const std::vector<std::pair<std::string, std::string>> bad = {
      {R"({"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", "tensor 'a': dtype 'F4' packs elements below"},
      {R"({"a":{"dtype":"Q8","shape":[2],"data_offsets":[0,2]}})", "tensor 'a': unsupported dtype 'Q8'"},
      {R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,8]}})", "tensor 'a': 8 bytes for 2 elements of I64"},
      {R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
       "tensors 'a' and 'b' overlap"},
      {R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
       "tensor 'a' appears twice"},
      {R"({"a":{"dtype":"U8","shape":[80],"data_offsets":[0,80]}})", "tensor 'a': shape larger than the data"},
      {R"({"a":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}})", "more than 8 dimensions"},
      {R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[63,65]}})", "outside the data section"},
      {R"({"a":{"dtype":"U8","shape":[2]}})", "entry 'a' is malformed"},
      {R"({"a":)", "JSON"},
      {"[]", "not a JSON object"},
  };
  for (const auto& [h, expect] : bad) {
    const std::string f2 = st_file(h, std::string(64, '\0'));
    st = SafetensorsMap::open_buffer(f2.data(), f2.size(), &map);
    check(!st.ok() && !map && contains(st.message(), expect),
          "open_buffer '" + h.substr(0, 50) + "': expected '" + expect + "', got '" + st.message() + "'");
  }
  st = SafetensorsMap::open_buffer(file.data(), 7, &map);
  check(!st.ok() && contains(st.message(), "too short"), "open_buffer of 7 bytes");
  std::string past = file;
  past[3] = static_cast<char>(0x10);  // 256 MiB
  st = SafetensorsMap::open_buffer(past.data(), past.size(), &map);
  check(!st.ok() && contains(st.message(), "runs past the end"), "open_buffer: header past the end");
  check(!SafetensorsMap::open_buffer(nullptr, 10, &map).ok(), "open_buffer of a null buffer");

  // Files and directories (under the working directory, removed after).
  namespace fs = std::filesystem;
  const fs::path dir = fs::path("cpuformer_st_dir");
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string dirs = dir.string();
  const auto index_with = [&](const std::string& weight_map) {
    write_file((dir / "model.safetensors.index.json").string(),
               R"({"metadata": {"total_size": 12}, "weight_map": {)" + weight_map + "}}");
  };
  st = SafetensorsMap::open_directory(dirs, &map);
  check(!st.ok() && st.is_not_found() && contains(st.message(), "no model.safetensors or"), "empty directory");
  write_file((dir / "s1.safetensors").string(),
             st_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}})",
                     data.substr(0, 8)));
  write_file((dir / "s2.safetensors").string(),
             st_file(R"({"y":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", data.substr(12, 4)));
  index_with(R"("x": "s1.safetensors", "y": "s2.safetensors")");
  st = SafetensorsMap::open_directory(dirs, &map);
  check(st.ok() && map->tensors().size() == 2 && map->find("y")->dtype == DType::kBF16 &&
            map->find("y")->file == (dir / "s2.safetensors").string() && map->metadata().at("format") == "pt" &&
            std::memcmp(map->find("x")->data, data.data(), 8) == 0,
        "sharded directory opens: " + st.message());
  const std::vector<std::pair<std::string, std::string>> bad_index = {
      {R"("x": "s1.safetensors", "y": "s3.safetensors")", "shard 's3.safetensors' does not exist"},
      {R"("x": "s1.safetensors", "y": "../s2.safetensors")", "shard '../s2.safetensors' (of tensor 'y') is not a plain"},
      {R"("x": "s1.safetensors", "y": "/tmp/s2.safetensors")", "is not a plain file name"},
      {R"("x": "s1.safetensors", "y": "s2.safetensors", "z": "s2.safetensors")",
       "tensor 'z' is not in its shard 's2.safetensors'"},
      {R"("x": "s1.safetensors", "y": "s1.safetensors")", "tensor 'y' is not in its shard 's1.safetensors'"},
      {R"("x": "s1.safetensors")", ""},  // s2 is not named: ignored
      {R"("x": 3)", "tensor 'x' must map to a file name"},
  };
  for (const auto& [wm, expect] : bad_index) {
    index_with(wm);
    st = SafetensorsMap::open_directory(dirs, &map);
    const bool ok = expect.empty() ? st.ok() && map->tensors().size() == 1
                                   : !st.ok() && !map && contains(st.message(), expect) &&
                                         contains(st.message(), "model.safetensors.index.json");
    check(ok, "index {" + wm + "}: expected '" + expect + "', got '" + st.message() + "'");
  }
  // A tensor in two shards: the second copy is in a shard the index does not map it to.
  write_file((dir / "s2.safetensors").string(),
             st_file(R"({"y":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},)"
                     R"("x":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}})",
                     data.substr(8, 8)));
  index_with(R"("x": "s1.safetensors", "y": "s2.safetensors")");
  st = SafetensorsMap::open_directory(dirs, &map);
  check(!st.ok() && contains(st.message(), "tensor 'x' is in shard 's2.safetensors' but the index maps it to "
                                           "'s1.safetensors'"),
        "a tensor in two shards: " + st.message());
  index_with(R"("y": "s2.safetensors")");
  st = SafetensorsMap::open_directory(dirs, &map);
  check(!st.ok() && contains(st.message(), "shards disagree with the index: tensor 'x' is in shard 's2.safetensors' "
                                           "but not in the weight_map"),
        "a shard tensor the index does not list: " + st.message());
  // model.safetensors wins over the index; open_file and read_safetensors agree.
  write_file((dir / "model.safetensors").string(), file);
  st = SafetensorsMap::open_directory(dirs, &map);
  check(st.ok() && map->tensors().size() == 8, "model.safetensors is preferred: " + st.message());
  std::map<std::string, cpuformer::Tensor> tensors;
  st = cpuformer::read_safetensors((dir / "model.safetensors").string(), &tensors, nullptr);
  check(!st.ok() && contains(st.message(), "model.safetensors: tensor 'b': unsupported dtype 'BOOL'"),
        "read_safetensors names the file and the tensor it cannot convert: " + st.message());
  write_file((dir / "cut.safetensors").string(), file.substr(0, file.size() - 1));
  st = SafetensorsMap::open_file((dir / "cut.safetensors").string(), &map);
  check(!st.ok() && contains(st.message(), "cut.safetensors: tensor 'f8': data_offsets [35, 36] outside"),
        "a truncated file: " + st.message());
  st = SafetensorsMap::open_file((dir / "missing.safetensors").string(), &map);
  check(!st.ok() && st.is_not_found() && contains(st.message(), "missing.safetensors: cannot open"),
        "a missing file: " + st.message());
  st = SafetensorsMap::open_file(dirs, &map);
  check(!st.ok() && !st.is_not_found() && contains(st.message(), "is a directory"), "open_file of a directory");
  fs::remove_all(dir);
}
}  // namespace

// Prepared inference weights: packed float32 equals sgemm; int8 equals the same integer arithmetic in double.
void test_prepared_weights(std::mt19937& gen) {
  const int shapes[][3] = {{1, 1, 1}, {5, 17, 3}, {9, 40, 300}, {130, 33, 257}};
  for (auto& s : shapes) {
    const int M = s[0], N = s[1], K = s[2];
    auto X = random_vec(gen, size_t(M) * K), W = random_vec(gen, size_t(N) * K), bias = random_vec(gen, N);
    std::vector<float> Y(size_t(M) * N), R(Y.size());
    const cpuformer::PackedMatrix packed = cpuformer::sgemm_pack_b(true, K, N, W.data(), K);
    cpuformer::sgemm_packed(M, X.data(), K, packed, Y.data(), N, bias.data());
    cpuformer::sgemm_ref(false, true, M, N, K, 1.0f, X.data(), K, W.data(), K, 0.0f, R.data(), N, bias.data());
    const std::string shape = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
    check(max_rel_err(Y, R) < 1e-5, "sgemm_packed " + shape);

    const cpuformer::Int8Weight q = cpuformer::quantize_weight_int8(W.data(), N, K, K);
    const std::vector<std::int8_t> qv = q.unpack();
    std::vector<std::uint8_t> qa(size_t(M) * K);
    std::vector<float> sa(M);
    std::vector<std::int32_t> za(M);
    cpuformer::quantize_rows_u7(X.data(), M, K, K, qa.data(), K, sa.data(), za.data());
    cpuformer::linear_int8(X.data(), M, K, q, bias.data(), Y.data(), N);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += (double(qa[m * K + k]) - za[m]) * qv[n * K + k];
        R[m * N + n] = float(acc * double(sa[m]) * double(q.scale[n]) + bias[n]);
      }
    check(max_rel_err(Y, R) < 1e-5, "linear_int8 " + shape);
  }
}

// quantize_weight_int8_blocked (a weight fed a block of rows at a time) equals quantizing the whole weight, for
// blocks that cut the 16-row panels anywhere; a non-finite value in a later block is refused with its row.
void test_int8_quantize_blocked() {
  std::mt19937 gen(17);  // its own stream: the other tests' draws stay as they were
  for (int block : {1, 5, 16, 37, 0}) {
    const int N = 83, K = 29;
    auto W = random_vec(gen, size_t(N) * K);
    const cpuformer::Int8Weight whole = cpuformer::quantize_weight_int8(W.data(), N, K, K);
    int calls = 0;
    const cpuformer::Int8Weight blocked = cpuformer::quantize_weight_int8_blocked(
        N, K, [&](cpuformer::index_t r0, cpuformer::index_t r1, float* out) {
          ++calls;
          std::copy(W.begin() + r0 * K, W.begin() + r1 * K, out);
        }, block);
    check(blocked.packed == whole.packed && blocked.scale == whole.scale && blocked.col_sum == whole.col_sum &&
              calls == (block ? (N + block - 1) / block : 1),
          "quantize_weight_int8_blocked == whole, block " + std::to_string(block));
    W[size_t(70) * K + 3] = std::numeric_limits<float>::infinity();
    bool threw = false;
    try {
      cpuformer::quantize_weight_int8_blocked(
          N, K, [&](cpuformer::index_t r0, cpuformer::index_t r1, float* out) {
            std::copy(W.begin() + r0 * K, W.begin() + r1 * K, out);
          }, block);
    } catch (const std::invalid_argument& e) {
      threw = std::string(e.what()).find("weight[70, 3]") != std::string::npos;
    }
    check(threw, "quantize_weight_int8_blocked refuses a non-finite weight, block " + std::to_string(block));
  }
}

// Every int8 kernel this CPU has (AVX-512 VNNI, AVX-VNNI, AVX2, scalar) gives the scalar kernel's bits: M = 1..37,
// N and K off the panel and group sizes, strided x and y (the gaps are left alone), NaN/Inf and zero rows.
void test_int8_kernels(std::mt19937& gen) {
  const std::vector<std::string> kernels = cpuformer::int8_kernels_available();
  check(!kernels.empty() && kernels.back() == "scalar", "int8_kernels_available ends with scalar");
  std::uniform_int_distribution<int> small(1, 75);
  int mismatches = 0, cases = 0;
  for (int M = 1; M <= 37; ++M) {
    // (M 20 and 33 also cover the AMX kernel's 64-k steps and their tails)
    const int K = M == 2 ? 1031 : M == 20 ? 200 : M == 33 ? 130 : small(gen), N = M == 3 ? 300 : small(gen);
    const int ldx = K + 3, ldy = N + 5;
    auto X = random_vec(gen, size_t(M) * ldx, 4.0f), W = random_vec(gen, size_t(N) * K), bias = random_vec(gen, N);
    if (M > 4) {
      std::fill(X.begin() + 2 * ldx, X.begin() + 2 * ldx + K, 0.0f);  // a zero row
      X[size_t(M - 1) * ldx + K / 2] = std::numeric_limits<float>::quiet_NaN();
      X[size_t(M - 2) * ldx] = -std::numeric_limits<float>::infinity();
    }
    const cpuformer::Int8Weight q = cpuformer::quantize_weight_int8(W.data(), N, K, K);
    std::vector<float> ref(size_t(M) * ldy, 777.0f), y(ref.size());
    cpuformer::set_int8_kernel("scalar");
    cpuformer::linear_int8(X.data(), M, ldx, q, M % 2 ? bias.data() : nullptr, ref.data(), ldy);
    for (const auto& k : kernels) {
      cpuformer::set_int8_kernel(k);
      std::fill(y.begin(), y.end(), 777.0f);
      cpuformer::linear_int8(X.data(), M, ldx, q, M % 2 ? bias.data() : nullptr, y.data(), ldy);
      ++cases;
      for (size_t i = 0; i < y.size(); ++i)
        if (!(std::memcmp(&y[i], &ref[i], 4) == 0 || (std::isnan(y[i]) && std::isnan(ref[i])))) {
          ++mismatches;
          break;
        }
    }
    bool gaps = true, nan_rows = true;
    for (int m = 0; m < M; ++m) {
      for (int j = N; j < ldy; ++j) gaps = gaps && ref[size_t(m) * ldy + j] == 777.0f;
      const bool bad = M > 4 && m >= M - 2;
      for (int j = 0; j < N; ++j) nan_rows = nan_rows && std::isnan(ref[size_t(m) * ldy + j]) == bad;
    }
    check(gaps && nan_rows, "linear_int8 M=" + std::to_string(M) + ": strided gaps kept, NaN exactly in bad rows");
  }
  cpuformer::set_int8_kernel("auto");
  check(mismatches == 0, "int8 kernels bitwise equal to scalar (" + std::to_string(mismatches) + " of " +
                             std::to_string(cases) + " differ)");
}

// Rotary embeddings (strided rows, both layouts, partial rotary_dim), ALiBi slopes, T5 buckets and bias, RMSNorm,
// SiLU and gated units against double-precision references.
void test_positions_norms(std::mt19937& gen) {
  using namespace cpuformer;
  {  // rotary on a fused (B, T, 3 * heads * D) buffer: only the first third's heads turn, by the right angle
    const index_t B = 2, T = 5, H = 3, D = 8, st = 3 * H * D;
    for (int interleaved = 0; interleaved < 2; ++interleaved)
      for (index_t rd : {index_t(0), index_t(4)}) {
        RotaryConfig cfg;
        cfg.head_dim = D;
        cfg.rotary_dim = rd;
        cfg.theta = 500000.0;
        cfg.layout = interleaved ? RotaryLayout::kInterleaved : RotaryLayout::kHalf;
        const index_t R = rd ? rd : D, half = R / 2;
        auto x = random_vec(gen, size_t(B * T * st));
        auto y = x;
        const std::int64_t offset[2] = {3, 1000};
        rotary_forward(HeadTensor{y.data(), T * st, st}, B, T, H, nullptr, offset, cfg);
        const std::vector<float> inv = rotary_inv_freq(cfg);
        double err = 0;
        bool rest_same = true;
        for (index_t b = 0; b < B; ++b)
          for (index_t t = 0; t < T; ++t)
            for (index_t j = 0; j < st; ++j) {
              const index_t at = b * T * st + t * st + j, h = j / D, d = j % D;
              if (h >= H || d >= R) {
                rest_same = rest_same && x[at] == y[at];
                continue;
              }
              const index_t i = interleaved ? d / 2 : d % half;
              const bool first = interleaved ? d % 2 == 0 : d < half;
              const index_t partner = interleaved ? (first ? d + 1 : d - 1) : (first ? d + half : d - half);
              const double a = double(float(offset[b] + t) * inv[i]);
              const double xp = x[at - d + partner];
              const double ref = first ? x[at] * std::cos(a) - xp * std::sin(a) : x[at] * std::cos(a) + xp * std::sin(a);
              err = std::max(err, std::fabs(ref - y[at]));
            }
        check(err < 1e-5 && rest_same, "rotary_forward strided, interleaved=" + std::to_string(interleaved) +
                                           " rotary_dim=" + std::to_string(rd));
        rotary_backward(HeadTensor{y.data(), T * st, st}, B, T, H, nullptr, offset, cfg);
        check(max_rel_err(y, x) < 1e-5, "rotary_backward inverts rotary_forward");
      }
    RotaryConfig bad;
    bad.head_dim = 8;
    bad.rotary_dim = 3;
    bool threw = false;
    try {
      rotary_inv_freq(bad);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    check(threw, "rotary: odd rotary_dim rejected");
    RotaryConfig l3;
    l3.head_dim = 16;
    l3.llama3_factor = 8.0;
    l3.original_max_position = 64;
    const auto base = rotary_inv_freq(RotaryConfig{16}), scaled = rotary_inv_freq(l3);
    // wavelength 2 pi / inv < 16 kept, > 64 divided by 8, between interpolated
    bool ok = true;
    for (size_t i = 0; i < base.size(); ++i) {
      const double wl = 2 * M_PI / base[i];
      if (wl < 16) ok = ok && scaled[i] == base[i];
      else if (wl > 64) ok = ok && std::fabs(scaled[i] - base[i] / 8) <= 1e-7 * base[i];
      else ok = ok && scaled[i] < base[i] && scaled[i] > base[i] / 8;
    }
    check(ok, "rotary llama3 scaling regions");
  }
  {  // ALiBi
    const auto s8 = alibi_slopes(8), s12 = alibi_slopes(12);
    bool ok = s12.size() == 12;
    for (int k = 0; k < 8; ++k) ok = ok && s8[k] == std::ldexp(1.0f, -(k + 1)) && s12[k] == s8[k];
    for (int k = 0; k < 4; ++k) ok = ok && std::fabs(s12[8 + k] - std::pow(2.0, -0.5 * (2 * k + 1))) < 1e-7;
    check(ok, "alibi_slopes 8 and 12 heads");
  }
  {  // T5 buckets: values of transformers' T5Attention._relative_position_bucket
    RelativeBiasConfig enc{8, 20, true}, dec{32, 128, false}, t5{32, 128, true};
    const index_t want_enc[10] = {2, 2, 2, 2, 1, 0, 5, 6, 6, 6};  // relative positions -5..4
    bool ok = true;
    for (int i = 0; i < 10; ++i) ok = ok && relative_position_bucket(i - 5, enc) == want_enc[i];
    ok = ok && relative_position_bucket(0, t5) == 0 && relative_position_bucket(1, t5) == 17 &&
         relative_position_bucket(-1, t5) == 1 && relative_position_bucket(-8, t5) == 8 &&
         relative_position_bucket(200, t5) == 31 && relative_position_bucket(INT64_MIN, t5) == 15 &&
         relative_position_bucket(5, dec) == 0 && relative_position_bucket(-5, dec) == 5 &&
         relative_position_bucket(-200, dec) == 31 && relative_position_bucket(-16, dec) == 16;
    check(ok, "relative_position_bucket T5 values");
    const index_t H = 3, T = 4, S = 6, nb = 32;
    auto table = random_vec(gen, size_t(nb * H)), dbias = random_vec(gen, size_t(H * T * S));
    std::vector<float> bias(size_t(H * T * S)), dtable(size_t(nb * H), 0.0f);
    relative_bias_forward(bias.data(), table.data(), H, T, S, 2, dec);
    relative_bias_backward(dtable.data(), dbias.data(), H, T, S, 2, dec);
    bool fwd = true;
    std::vector<double> ref(size_t(nb * H), 0.0);
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < T; ++t)
        for (index_t s = 0; s < S; ++s) {
          const index_t bk = relative_position_bucket(s - (2 + t), dec);
          fwd = fwd && bias[(h * T + t) * S + s] == table[bk * H + h];
          ref[bk * H + h] += dbias[(h * T + t) * S + s];
        }
    double err = 0;
    for (size_t i = 0; i < ref.size(); ++i) err = std::max(err, std::fabs(ref[i] - dtable[i]));
    check(fwd && err < 1e-5, "relative_bias_forward/backward");
  }
  {  // RMSNorm (plain and 1 + w), against double references of y, dx, dw
    const index_t rows = 7, C = 37;
    auto x = random_vec(gen, size_t(rows * C)), w = random_vec(gen, size_t(C)), dy = random_vec(gen, size_t(rows * C));
    for (int one_plus = 0; one_plus < 2; ++one_plus) {
      std::vector<float> y(x.size()), rstd(rows), dx(x.size(), 1.0f), dw(size_t(C), 0.5f);
      rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), rows, C, 1e-6f, one_plus);
      rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), rows, C, one_plus, true);
      std::vector<float> ry(x.size()), rdx(x.size()), rdw(size_t(C), 0.5f);
      std::vector<double> accw(size_t(C), 0.0);
      for (index_t r = 0; r < rows; ++r) {
        double ss = 0, gx = 0;
        for (index_t j = 0; j < C; ++j) ss += double(x[r * C + j]) * x[r * C + j];
        const double rs = 1 / std::sqrt(ss / C + 1e-6);
        for (index_t j = 0; j < C; ++j) {
          const double we = one_plus ? 1.0 + w[j] : w[j];
          ry[r * C + j] = float(x[r * C + j] * rs * we);
          gx += dy[r * C + j] * we * x[r * C + j] * rs;
          accw[j] += dy[r * C + j] * x[r * C + j] * rs;
        }
        for (index_t j = 0; j < C; ++j) {
          const double we = one_plus ? 1.0 + w[j] : w[j];
          rdx[r * C + j] = float(1.0 + rs * (dy[r * C + j] * we - x[r * C + j] * rs * gx / C));  // accumulated onto 1
        }
      }
      for (index_t j = 0; j < C; ++j) rdw[j] = float(0.5 + accw[j]);
      check(max_rel_err(y, ry) < 1e-5 && max_rel_err(dx, rdx) < 1e-5 && max_rel_err(dw, rdw) < 1e-5,
            "rmsnorm forward/backward one_plus=" + std::to_string(one_plus));
    }
  }
  {  // SiLU and SwiGLU on strided rows
    const index_t rows = 5, cols = 19, ld = 2 * cols;
    auto gu = random_vec(gen, size_t(rows * ld), 3.0f), dout = random_vec(gen, size_t(rows * cols));
    std::vector<float> out(size_t(rows * cols)), dg(size_t(rows * ld)), act(size_t(rows * cols));
    gated_forward(out.data(), cols, gu.data(), ld, gu.data() + cols, ld, rows, cols, Activation::kSilu);
    gated_backward(dg.data(), ld, dg.data() + cols, ld, dout.data(), cols, gu.data(), ld, gu.data() + cols, ld, rows,
                   cols, Activation::kSilu);
    std::vector<float> ro(out.size()), rdg(dg.size());
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c) {
        const double g = gu[r * ld + c], u = gu[r * ld + cols + c], s = 1 / (1 + std::exp(-g)), d = dout[r * cols + c];
        ro[r * cols + c] = float(g * s * u);
        rdg[r * ld + c] = float(d * u * s * (1 + g * (1 - s)));
        rdg[r * ld + cols + c] = float(d * g * s);
      }
    check(max_rel_err(out, ro) < 1e-5 && max_rel_err(dg, rdg) < 1e-5, "gated silu strided");
    std::vector<float> big = {-1e4f, -100.0f, -88.5f, 0.0f, 88.5f, 1e4f};
    activation_forward(act.data(), big.data(), nullptr, 1, index_t(big.size()), Activation::kSilu);
    check(std::fabs(act[0]) < 1e-30f && std::fabs(act[1]) < 1e-30f && act[3] == 0.0f && act[4] == 88.5f &&
              act[5] == 1e4f,
          "silu saturates without NaN");
  }
}

// ---- 16-bit (bf16/f16) weights: conversions, products, embedding (cpuformer/half.h) ----

std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// f16 value by its definition (double arithmetic): a reference independent of the library's bit manipulation.
double f16_value(std::uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  double v = exp == 0 ? std::ldexp(double(mant), -24) : exp == 31 ? (mant ? std::nan("") : INFINITY)
                                                                  : std::ldexp(1.0 + mant / 1024.0, exp - 15);
  return sign ? -v : v;
}

// Exhaustive over all 65536 values of each kind (path-independent bits), plus rounding cases.
void test_half_conversions(std::mt19937& gen) {
  using cpuformer::HalfType;
  using cpuformer::index_t;
  const std::string path = " path=" + cpuformer::get_simd_path();
  std::vector<std::uint16_t> all(65536 + 1);
  for (int i = 0; i < 65536; ++i) all[i + 1] = static_cast<std::uint16_t>(i);
  std::vector<float> vec(65536);
  for (HalfType t : {HalfType::kF16, HalfType::kBF16}) {
    const std::string kind = t == HalfType::kF16 ? "f16" : "bf16";
    // all.data() + 1: 2-byte but not 4/16-byte aligned, as in a memory-mapped file; odd lengths leave tails.
    cpuformer::half_to_float_n(vec.data(), all.data() + 1, 65536, t);
    int bad_scalar = 0, bad_vec = 0, bad_trip = 0;
    for (int i = 0; i < 65536; ++i) {
      const auto h = static_cast<std::uint16_t>(i);
      const float f = cpuformer::half_to_float(h, t);
      if (t == HalfType::kBF16) {
        if (float_bits(f) != std::uint32_t(i) << 16) ++bad_scalar;
      } else {
        const double v = f16_value(h);
        if (std::isnan(v) ? !(std::isnan(f) && (float_bits(f) & 0x400000u) &&
                              ((float_bits(f) >> 13) & 0x3FFu) == ((h & 0x3FFu) | 0x200u) && (float_bits(f) >> 31) == (h >> 15))
                          : !(double(f) == v && std::signbit(f) == bool(h >> 15)))
          ++bad_scalar;
      }
      if (float_bits(vec[i]) != float_bits(f)) ++bad_vec;
      const std::uint16_t back = cpuformer::float_to_half(f, t);
      if (std::isnan(f) ? !std::isnan(cpuformer::half_to_float(back, t)) : back != h) ++bad_trip;
    }
    check(bad_scalar == 0, "half_to_float exact, all " + kind + " values: " + std::to_string(bad_scalar) + " wrong");
    check(bad_vec == 0, "half_to_float_n == half_to_float, " + kind + path + ": " + std::to_string(bad_vec) + " differ");
    check(bad_trip == 0, "float_to_half(half_to_float(h)) == h, " + kind + ": " + std::to_string(bad_trip) + " differ");
    for (int n : {1, 7, 9, 15, 17, 33}) {  // short and odd runs from odd offsets
      std::vector<float> part(n + 1, -1.0f);
      cpuformer::half_to_float_n(part.data(), all.data() + 1 + 12345, n, t);
      bool ok = part[n] == -1.0f;
      for (int i = 0; i < n; ++i) ok = ok && float_bits(part[i]) == float_bits(vec[12345 + i]);
      check(ok, "half_to_float_n n=" + std::to_string(n) + " " + kind + path);
    }
  }
  // Ties to even, overflow, subnormals.
  const auto f16 = [](float x) { return cpuformer::float_to_half(x, HalfType::kF16); };
  const auto bf16 = [](float x) { return cpuformer::float_to_half(x, HalfType::kBF16); };
  check(f16(1.0f + 0x1p-11f) == 0x3C00 && f16(1.0f + 3 * 0x1p-11f) == 0x3C02 && f16(-2.0f) == 0xC000 &&
            f16(-0.0f) == 0x8000,
        "float_to_half f16 ties to even");
  check(f16(65504.0f) == 0x7BFF && f16(65519.0f) == 0x7BFF && f16(65520.0f) == 0x7C00 && f16(1e30f) == 0x7C00 &&
            f16(-INFINITY) == 0xFC00,
        "float_to_half f16 overflow");
  check(f16(0x1p-24f) == 0x0001 && f16(0x1p-25f) == 0x0000 && f16(1.5f * 0x1p-25f) == 0x0001 &&
            f16(3 * 0x1p-25f) == 0x0002 && f16(0x1p-14f - 0x1p-25f) == 0x0400 && f16(-0x1p-30f) == 0x8000,
        "float_to_half f16 subnormals");
  check(bf16(1.0f + 0x1p-8f) == 0x3F80 && bf16(1.0f + 3 * 0x1p-8f) == 0x3F82 &&
            bf16(std::numeric_limits<float>::max()) == 0x7F80 && bf16(-INFINITY) == 0xFF80,
        "float_to_half bf16 ties to even, overflow");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::uint32_t snan_bits = 0x7F800001u;  // signalling NaN whose payload is below bf16's bits
  float snan;
  std::memcpy(&snan, &snan_bits, 4);
  check(std::isnan(cpuformer::half_to_float(f16(nan), HalfType::kF16)) &&
            std::isnan(cpuformer::half_to_float(bf16(nan), HalfType::kBF16)) &&
            std::isnan(cpuformer::half_to_float(f16(snan), HalfType::kF16)) &&
            std::isnan(cpuformer::half_to_float(bf16(snan), HalfType::kBF16)),
        "float_to_half keeps NaN");
  // Random floats of all magnitudes: the nearest value, ties to even (checked against the neighbours in double).
  std::uniform_int_distribution<std::uint32_t> bits(0, 0xFFFFFFFFu);
  int bad = 0;
  for (int i = 0; i < 20000; ++i) {
    std::uint32_t b = bits(gen);
    if ((b & 0x7F800000u) == 0x7F800000u) continue;
    if (i % 2) b = (b & 0x807FFFFFu) | ((100u + b % 50u) << 23);  // half the samples in the f16 range
    float x;
    std::memcpy(&x, &b, 4);
    const std::uint16_t h = f16(x);
    const double v = f16_value(h), xd = x;
    if (std::isinf(v)) {
      if (std::fabs(xd) < 65520.0) ++bad;
      continue;
    }
    for (int d : {-1, 1}) {
      const int nb = int(h & 0x7FFF) + d;
      if (nb < 0 || nb > 0x7BFF) continue;
      const double nv = f16_value(static_cast<std::uint16_t>((h & 0x8000) | nb));
      const double e = std::fabs(v - xd), ne = std::fabs(nv - xd);
      if (ne < e || (ne == e && (h & 1))) ++bad;
    }
  }
  check(bad == 0, "float_to_half f16 nearest, ties to even (random floats): " + std::to_string(bad) + " wrong");
}

// Largest |y - ref| / (|x| |op(W)| + |bias|) of the same element: float32 rounding relative to the terms summed, so a
// single output whose terms cancel (out = 1) is not judged by its tiny value.
double max_err_vs_terms(const std::vector<float>& y, const std::vector<float>& ref, int rows, int out, int ldy,
                        const std::vector<float>& x, int ldx, const std::vector<float>& w, bool in_out, int in,
                        const float* bias) {
  std::vector<float> ax(x.size()), aw(w.size()), ab(out, 0.0f), mag(size_t(rows) * ldy);
  for (size_t i = 0; i < x.size(); ++i) ax[i] = std::fabs(x[i]);
  for (size_t i = 0; i < w.size(); ++i) aw[i] = std::fabs(w[i]);
  for (int j = 0; j < out && bias; ++j) ab[j] = std::fabs(bias[j]);
  cpuformer::sgemm_ref(false, !in_out, rows, out, in, 1.0f, ax.data(), ldx, aw.data(), in_out ? out : in, 0.0f,
                       mag.data(), ldy, ab.data());
  double err = 0;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < out; ++j) {
      const size_t i = size_t(r) * ldy + j;
      err = std::max(err, std::fabs(double(y[i]) - ref[i]) / (double(mag[i]) + 1e-30));
    }
  return err;
}

// linear_forward / linear_backward with only a 16-bit weight against the float32 product with the converted weight.
void test_half_linear(std::mt19937& gen) {
  using cpuformer::HalfType;
  using cpuformer::index_t;
  const std::string where = " path=" + cpuformer::get_simd_path() + " threads=" + std::to_string(cpuformer::get_num_threads());
  const int sizes[] = {1, 7, 33, 300};
  for (HalfType t : {HalfType::kF16, HalfType::kBF16})
    for (int in_out = 0; in_out < 2; ++in_out)
      for (int rows : {1, 2, 3, 4, 5, 17, 130})
        for (int in : sizes)
          for (int out : sizes) {
            const bool with_bias = (rows + in + out) % 2 == 0 || rows == 1;
            if (rows == 130 && in * out > 300 * 33) continue;  // keep the double reference quick
            auto W = random_vec(gen, size_t(in) * out), X = random_vec(gen, size_t(rows) * in), bias = random_vec(gen, out);
            std::vector<std::uint16_t> H(W.size());
            cpuformer::float_to_half_n(H.data(), W.data(), index_t(W.size()), t);
            cpuformer::half_to_float_n(W.data(), H.data(), index_t(W.size()), t);  // the weight the product uses
            std::vector<float> Y(size_t(rows) * out, NAN), R(Y.size());
            cpuformer::LinearRef w;
            w.in = in, w.out = out, w.half = H.data(), w.half_type = t, w.in_out = in_out;
            w.bias = with_bias ? bias.data() : nullptr;
            cpuformer::linear_forward(Y.data(), out, X.data(), in, rows, w);
            cpuformer::sgemm_ref(false, !in_out, rows, out, in, 1.0f, X.data(), in, W.data(), in_out ? out : in, 0.0f,
                                 R.data(), out, w.bias);
            check(max_err_vs_terms(Y, R, rows, out, out, X, in, W, in_out, in, w.bias) < 1e-5,
                  std::string("linear_forward half ") + (t == HalfType::kF16 ? "f16" : "bf16") + " rows=" +
                      std::to_string(rows) + " in=" + std::to_string(in) + " out=" + std::to_string(out) +
                      " in_out=" + std::to_string(in_out) + " bias=" + std::to_string(with_bias) + where);
          }
  // Several K and N blocks of the converted-block path, strided x and y (the gaps stay untouched), and dx.
  for (int in_out = 0; in_out < 2; ++in_out)
    for (int rows : {3, 9}) {
      const int in = 1100, out = 300, ldx = in + 5, ldy = out + 3;
      auto W = random_vec(gen, size_t(in) * out), X = random_vec(gen, size_t(rows) * ldx), bias = random_vec(gen, out);
      std::vector<std::uint16_t> H(W.size());
      cpuformer::float_to_half_n(H.data(), W.data(), index_t(W.size()), HalfType::kBF16);
      cpuformer::half_to_float_n(W.data(), H.data(), index_t(W.size()), HalfType::kBF16);
      std::vector<float> Y(size_t(rows) * ldy, -3.0f), R(Y.size(), -3.0f);
      cpuformer::LinearRef w;
      w.in = in, w.out = out, w.half = H.data(), w.in_out = in_out, w.bias = bias.data();
      cpuformer::linear_forward(Y.data(), ldy, X.data(), ldx, rows, w);
      cpuformer::sgemm_ref(false, !in_out, rows, out, in, 1.0f, X.data(), ldx, W.data(), in_out ? out : in, 0.0f,
                           R.data(), ldy, bias.data());
      bool gaps = true;
      for (int r = 0; r < rows; ++r)
        for (int c = out; c < ldy; ++c) gaps = gaps && Y[r * ldy + c] == -3.0f;
      const std::string shape = " rows=" + std::to_string(rows) + " in_out=" + std::to_string(in_out) + where;
      check(max_rel_err(Y, R) < 1e-5 && gaps, "linear_forward half, strided, K and N blocks" + shape);

      // dx = dy W, overwritten and accumulated; the float weight's backward is the reference.
      auto dY = random_vec(gen, size_t(rows) * out);
      std::vector<float> dX(size_t(rows) * in, 1.5f), dR(dX.size(), 1.5f);
      cpuformer::LinearRef wf = w;
      wf.half = nullptr, wf.weight = W.data();
      for (bool acc : {false, true}) {
        cpuformer::linear_backward(dX.data(), in, acc, nullptr, nullptr, dY.data(), out, X.data(), ldx, rows, w);
        cpuformer::linear_backward(dR.data(), in, acc, nullptr, nullptr, dY.data(), out, X.data(), ldx, rows, wf);
        check(max_rel_err(dX, dR) < 1e-5, std::string("linear_backward half dx accumulate=") + (acc ? "1" : "0") + shape);
      }
      std::vector<float> dW(W.size(), 0.0f);
      bool threw = false;
      try {
        cpuformer::linear_backward(dX.data(), in, false, dW.data(), nullptr, dY.data(), out, X.data(), ldx, rows, w);
      } catch (const std::invalid_argument&) {
        threw = true;
      }
      check(threw, "linear_backward with a half weight and dweight throws std::invalid_argument");
    }
}

// LoRA dropout at the Linear level: y = x W^T + scale (m x / (1 - p)) A^T B^T and its gradients against a
// double-precision reference with the mask from lora_dropout_keep (several row blocks, strided x / y / dx), a probe
// that reads the mask off the product itself, finite differences, and the p = 0 / eval paths.
void test_lora_dropout(std::mt19937& gen) {
  using cpuformer::index_t;
  const std::string where = " path=" + cpuformer::get_simd_path() + " threads=" + std::to_string(cpuformer::get_num_threads());
  const float p = 0.3f;
  const std::uint64_t seed = 0x1234567ULL;
  const auto keep = [&](std::uint64_t s, index_t i, index_t j, index_t in) {
    return cpuformer::lora_dropout_keep(s, std::uint64_t(i) * std::uint64_t(in) + std::uint64_t(j), p);
  };
  for (int in_out = 0; in_out < 2; ++in_out) {
    // 300 inputs: 218 rows per dropout block, so 500 rows take three blocks
    const int rows = 500, in = 300, out = 23, r = 5, ldx = in + 3, ldy = out + 2, lddx = in + 4;
    const float scale = 1.7f;
    auto W = random_vec(gen, size_t(in) * out), X = random_vec(gen, size_t(rows) * ldx), bias = random_vec(gen, out);
    auto A = random_vec(gen, size_t(r) * in), Bm = random_vec(gen, size_t(out) * r);
    auto dY = random_vec(gen, size_t(rows) * ldy);
    std::vector<float> gA(A.size(), 0.5f), gB(Bm.size(), -0.25f);
    cpuformer::LoraAdapter l;
    l.a = A.data(), l.b = Bm.data(), l.r = r, l.scale = scale, l.dropout = p, l.training = true, l.seed = seed;
    l.grad_a = gA.data(), l.grad_b = gB.data();
    cpuformer::LinearRef w;
    w.in = in, w.out = out, w.weight = W.data(), w.bias = bias.data(), w.in_out = in_out, w.lora = &l;
    std::vector<float> Y(size_t(rows) * ldy, -3.0f);
    cpuformer::linear_forward(Y.data(), ldy, X.data(), ldx, rows, w);
    // the reference, in double: xd = m x / (1 - p), t = xd A^T, u = dy B
    std::vector<double> xd(size_t(rows) * in), t(size_t(rows) * r, 0.0), u(size_t(rows) * r, 0.0);
    size_t dropped = 0;
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < in; ++j) {
        const bool k = keep(seed, i, j, in);
        dropped += !k;
        xd[size_t(i) * in + j] = k ? double(X[size_t(i) * ldx + j]) / (1.0 - double(p)) : 0.0;
      }
    for (int i = 0; i < rows; ++i)
      for (int k = 0; k < r; ++k) {
        for (int j = 0; j < in; ++j) t[size_t(i) * r + k] += xd[size_t(i) * in + j] * A[size_t(k) * in + j];
        for (int o = 0; o < out; ++o) u[size_t(i) * r + k] += double(dY[size_t(i) * ldy + o]) * Bm[size_t(o) * r + k];
      }
    double err = 0, mag = 1e-30;
    bool gaps = true;
    for (int i = 0; i < rows; ++i) {
      for (int o = 0; o < out; ++o) {
        double ref = bias[o];
        for (int j = 0; j < in; ++j)
          ref += double(X[size_t(i) * ldx + j]) * (in_out ? W[size_t(j) * out + o] : W[size_t(o) * in + j]);
        for (int k = 0; k < r; ++k) ref += double(scale) * t[size_t(i) * r + k] * Bm[size_t(o) * r + k];
        err = std::max(err, std::fabs(ref - Y[size_t(i) * ldy + o])), mag = std::max(mag, std::fabs(ref));
      }
      for (int o = out; o < ldy; ++o) gaps = gaps && Y[size_t(i) * ldy + o] == -3.0f;
    }
    const std::string shape = " in_out=" + std::to_string(in_out) + where;
    const double frac = double(dropped) / (double(rows) * in);
    check(err / mag < 1e-5 && gaps, "LoRA dropout forward vs double reference" + shape);
    check(std::fabs(frac - p) < 0.01, "LoRA dropout drops about p of the input, got " + std::to_string(frac) + shape);

    // Backward, dx overwritten then accumulated: dx = dy W + m / (1 - p) (scale u A), dA += scale u^T xd,
    // dB += scale dy^T t.
    for (bool acc : {false, true}) {
      std::vector<float> dX(size_t(rows) * lddx, 0.75f), dW(W.size(), 0.0f);
      std::fill(gA.begin(), gA.end(), 0.5f), std::fill(gB.begin(), gB.end(), -0.25f);
      cpuformer::linear_backward(dX.data(), lddx, acc, dW.data(), nullptr, dY.data(), ldy, X.data(), ldx, rows, w);
      double ex = 0, mx = 1e-30, ea = 0, ma = 1e-30, eb = 0, mb = 1e-30;
      bool dx_gaps = true;
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < in; ++j) {
          double base = acc ? 0.75 : 0.0, lo = 0.0;
          for (int o = 0; o < out; ++o)
            base += double(dY[size_t(i) * ldy + o]) * (in_out ? W[size_t(j) * out + o] : W[size_t(o) * in + j]);
          for (int k = 0; k < r; ++k) lo += double(scale) * u[size_t(i) * r + k] * A[size_t(k) * in + j];
          const double ref = base + (keep(seed, i, j, in) ? lo / (1.0 - double(p)) : 0.0);
          ex = std::max(ex, std::fabs(ref - dX[size_t(i) * lddx + j])), mx = std::max(mx, std::fabs(ref));
        }
        for (int j = in; j < lddx; ++j) dx_gaps = dx_gaps && dX[size_t(i) * lddx + j] == 0.75f;
      }
      for (int k = 0; k < r; ++k)
        for (int j = 0; j < in; ++j) {
          double ref = 0.5;
          for (int i = 0; i < rows; ++i) ref += double(scale) * u[size_t(i) * r + k] * xd[size_t(i) * in + j];
          ea = std::max(ea, std::fabs(ref - gA[size_t(k) * in + j])), ma = std::max(ma, std::fabs(ref));
        }
      for (int o = 0; o < out; ++o)
        for (int k = 0; k < r; ++k) {
          double ref = -0.25;
          for (int i = 0; i < rows; ++i) ref += double(scale) * dY[size_t(i) * ldy + o] * t[size_t(i) * r + k];
          eb = std::max(eb, std::fabs(ref - gB[size_t(o) * r + k])), mb = std::max(mb, std::fabs(ref));
        }
      const std::string s = " accumulate=" + std::to_string(acc) + shape;
      check(ex / mx < 1e-5 && dx_gaps, "LoRA dropout dx vs double reference" + s);
      check(ea / ma < 1e-5, "LoRA dropout grad A vs double reference" + s);
      check(eb / mb < 1e-5, "LoRA dropout grad B vs double reference" + s);
    }

    // Not training (a model's own adapter: inference, merge): no dropout, bitwise the p = 0 adapter's product.
    cpuformer::LoraAdapter off = l, zero = l;
    off.training = false, zero.dropout = 0.0f;
    std::vector<float> Y1(Y.size()), Y2(Y.size());
    cpuformer::LinearRef w1 = w, w2 = w;
    w1.lora = &off, w2.lora = &zero;
    cpuformer::linear_forward(Y1.data(), ldy, X.data(), ldx, rows, w1);
    cpuformer::linear_forward(Y2.data(), ldy, X.data(), ldx, rows, w2);
    check(Y1 == Y2 && Y1 != Y, "LoRA dropout off (training=false) equals p=0, and differs from dropout" + shape);
  }

  // Probe: W = 0, A = B = I, x = 1, scale = 1 -> y = m / (1 - p): the product's own mask equals lora_dropout_keep's;
  // another seed gives another mask.
  {
    const int rows = 40, n = 64;
    std::vector<float> I(size_t(n) * n, 0.0f), W(size_t(n) * n, 0.0f), X(size_t(rows) * n, 1.0f), Y(X.size());
    for (int i = 0; i < n; ++i) I[size_t(i) * n + i] = 1.0f;
    cpuformer::LoraAdapter l;
    l.a = I.data(), l.b = I.data(), l.r = n, l.scale = 1.0f, l.dropout = p, l.training = true;
    cpuformer::LinearRef w;
    w.in = n, w.out = n, w.weight = W.data(), w.lora = &l;
    std::vector<std::vector<bool>> masks;
    for (std::uint64_t s : {seed, seed + 1}) {
      l.seed = s;
      cpuformer::linear_forward(Y.data(), n, X.data(), n, rows, w);
      bool same = true;
      std::vector<bool> m(Y.size());
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < n; ++j) {
          const float y = Y[size_t(i) * n + j];
          same = same && (keep(s, i, j, n) ? y == 1.0f / (1.0f - p) : y == 0.0f);
          m[size_t(i) * n + j] = y != 0.0f;
        }
      check(same, "LoRA dropout probe: the product's mask is lora_dropout_keep's" + where);
      masks.push_back(m);
    }
    check(masks[0] != masks[1], "LoRA dropout: another seed, another mask" + where);
    const std::uint64_t s0 = cpuformer::lora_dropout_seed(7, 0), s1 = cpuformer::lora_dropout_seed(7, 1),
                        s2 = cpuformer::lora_dropout_seed(8, 0);
    check(s0 != s1 && s0 != s2 && s1 != s2 && s0 == cpuformer::lora_dropout_seed(7, 0),
          "lora_dropout_seed: a seed per (step, adapter), the same again for the same pair");
  }

  // Finite differences of L = sum(dy * y) in double over a tiny float product (eps large against float rounding;
  // L is linear in A and B, so central differences are exact but for rounding).
  {
    const int rows = 3, in = 4, out = 2, r = 2;
    auto W = random_vec(gen, size_t(in) * out), X = random_vec(gen, size_t(rows) * in);
    auto A = random_vec(gen, size_t(r) * in), Bm = random_vec(gen, size_t(out) * r), dY = random_vec(gen, size_t(rows) * out);
    std::vector<float> gA(A.size(), 0.0f), gB(Bm.size(), 0.0f), dX(X.size());
    cpuformer::LoraAdapter l;
    l.a = A.data(), l.b = Bm.data(), l.r = r, l.scale = 0.8f, l.dropout = 0.5f, l.training = true, l.seed = 99;
    l.grad_a = gA.data(), l.grad_b = gB.data();
    cpuformer::LinearRef w;
    w.in = in, w.out = out, w.weight = W.data(), w.lora = &l;
    const auto loss = [&]() {
      std::vector<float> Y(size_t(rows) * out);
      cpuformer::linear_forward(Y.data(), out, X.data(), in, rows, w);
      double s = 0;
      for (size_t i = 0; i < Y.size(); ++i) s += double(Y[i]) * dY[i];
      return s;
    };
    cpuformer::linear_backward(dX.data(), in, false, nullptr, nullptr, dY.data(), out, X.data(), in, rows, w);
    double worst = 0;
    for (auto [v, g] : {std::make_pair(&A, &gA), std::make_pair(&Bm, &gB), std::make_pair(&X, &dX)})
      for (size_t i = 0; i < v->size(); ++i) {
        const float keep_v = (*v)[i], eps = 1e-2f;
        (*v)[i] = keep_v + eps;
        const double up = loss();
        (*v)[i] = keep_v - eps;
        const double down = loss();
        (*v)[i] = keep_v;
        const double fd = (up - down) / (2.0 * eps);
        worst = std::max(worst, std::fabs(fd - (*g)[i]) / std::max(1.0, std::fabs(fd)));
      }
    check(worst < 1e-3, "LoRA dropout gradients vs finite differences, worst " + std::to_string(worst) + where);
  }

  // A dropout outside [0, 1) is an error, not a silent product.
  {
    std::vector<float> W(4, 1.0f), A(2, 1.0f), Bm(2, 1.0f), X(2, 1.0f), Y(2);
    cpuformer::LoraAdapter l;
    l.a = A.data(), l.b = Bm.data(), l.r = 1, l.scale = 1.0f, l.dropout = 1.0f, l.training = true;
    cpuformer::LinearRef w;
    w.in = 2, w.out = 2, w.weight = W.data(), w.lora = &l;
    bool threw = false;
    try {
      cpuformer::linear_forward(Y.data(), 2, X.data(), 2, 1, w);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    check(threw, "LoRA dropout 1.0 throws std::invalid_argument");
  }
}

void test_half_embedding(std::mt19937& gen) {
  using cpuformer::HalfType;
  using cpuformer::index_t;
  const int V = 50, C = 37, n = 23;
  auto table = random_vec(gen, size_t(V) * C);
  std::vector<std::uint16_t> H(table.size());
  std::vector<std::int64_t> ids(n);
  for (int i = 0; i < n; ++i) ids[i] = (i * 17 + 3) % V;
  for (HalfType t : {HalfType::kF16, HalfType::kBF16}) {
    cpuformer::float_to_half_n(H.data(), table.data(), index_t(H.size()), t);
    std::vector<float> out(size_t(n) * C);
    cpuformer::embedding_forward_half(out.data(), ids.data(), H.data(), t, n, V, C);
    bool ok = true;
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < C; ++c) ok = ok && out[i * C + c] == cpuformer::half_to_float(H[ids[i] * C + c], t);
    check(ok, "embedding_forward_half path=" + cpuformer::get_simd_path());
    std::vector<std::int64_t> bad = {1, V};
    std::fill(out.begin(), out.end(), -7.0f);
    bool threw = false;
    try {
      cpuformer::embedding_forward_half(out.data(), bad.data(), H.data(), t, 2, V, C);
    } catch (const std::out_of_range&) {
      threw = true;
    }
    check(threw && out[0] == -7.0f, "embedding_forward_half id out of range throws, writes nothing");
  }
}

// A Hugging Face directory written from C++: config.json text and a safetensors file built in memory, a 1-layer
// Llama (grouped-query attention, 2 of 4 heads) with random weights rounded to bfloat16, stored once as F32 and once
// as BF16. The BF16 copy holds exactly the same values, so both give the same logits to float rounding.
struct TinyLlamaDir {
  static constexpr int V = 40, H = 16, I = 24, nH = 4, nKV = 2, D = 4;
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> shapes = {
      {"model.embed_tokens.weight", {V, H}},
      {"model.layers.0.self_attn.q_proj.weight", {nH * D, H}},
      {"model.layers.0.self_attn.k_proj.weight", {nKV * D, H}},
      {"model.layers.0.self_attn.v_proj.weight", {nKV * D, H}},
      {"model.layers.0.self_attn.o_proj.weight", {H, nH * D}},
      {"model.layers.0.mlp.gate_proj.weight", {I, H}},
      {"model.layers.0.mlp.up_proj.weight", {I, H}},
      {"model.layers.0.mlp.down_proj.weight", {H, I}},
      {"model.layers.0.input_layernorm.weight", {H}},
      {"model.layers.0.post_attention_layernorm.weight", {H}},
      {"model.norm.weight", {H}},
      {"lm_head.weight", {V, H}}};
  std::map<std::string, std::vector<float>> values;  // bfloat16-representable

  explicit TinyLlamaDir(std::mt19937& gen) {
    for (const auto& [name, shape] : shapes) {
      std::int64_t n = 1;
      for (std::int64_t d : shape) n *= d;
      const bool norm = shape.size() == 1;
      auto v = random_vec(gen, static_cast<size_t>(n), norm ? 0.2f : 1.0f / std::sqrt(float(shape.back())));
      if (norm)
        for (float& x : v) x += 1.0f;
      std::vector<std::uint16_t> h(v.size());
      cpuformer::float_to_half_n(h.data(), v.data(), n, cpuformer::HalfType::kBF16);
      cpuformer::half_to_float_n(v.data(), h.data(), n, cpuformer::HalfType::kBF16);
      values[name] = v;
    }
  }
  static std::string config(const std::string& extra = "") {
    return R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 40, "hidden_size": 16,)"
           R"( "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,)"
           R"( "head_dim": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,)"
           R"( "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": false)" +
           extra + "}";
  }
  // The safetensors bytes in F32 or BF16, leaving out `skip` and giving `reshape` the shape (3, 3).
  std::string file(bool bf16, const std::string& skip = "", const std::string& reshape = "") const {
    std::string header = "{", data;
    for (const auto& [name, shape] : shapes) {
      if (name == skip) continue;
      const std::vector<float>& v = values.at(name);
      std::string bytes;
      if (bf16) {
        std::vector<std::uint16_t> h(v.size());
        cpuformer::float_to_half_n(h.data(), v.data(), cpuformer::index_t(v.size()), cpuformer::HalfType::kBF16);
        bytes.assign(reinterpret_cast<const char*>(h.data()), h.size() * 2);
      } else {
        bytes.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
      }
      std::string dims;
      if (name == reshape) {
        dims = "3,3";
        bytes.resize(9 * (bf16 ? 2 : 4));
      } else {
        for (size_t i = 0; i < shape.size(); ++i) dims += (i ? "," : "") + std::to_string(shape[i]);
      }
      header += std::string(header.size() > 1 ? "," : "") + "\"" + name + "\":{\"dtype\":\"" + (bf16 ? "BF16" : "F32") +
                "\",\"shape\":[" + dims + "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
                std::to_string(data.size() + bytes.size()) + "]}";
      data += bytes;
    }
    header += "}";
    header += std::string((8 - header.size() % 8) % 8, ' ');
    return st_file(header, data);
  }
  // A directory `name` under the temporary folder holding config.json (unless empty) and model.safetensors.
  static std::string write(const std::string& name, const std::string& config_text, const std::string& weights) {
    const auto dir = std::filesystem::temp_directory_path() / ("cpuformer_test_" + name + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    if (!config_text.empty()) write_file((dir / "config.json").string(), config_text);
    write_file((dir / "model.safetensors").string(), weights);
    return dir.string();
  }
};

void test_pretrained_directories() {
  using cpuformer::PretrainedModel;
  std::mt19937 gen(77);
  const TinyLlamaDir tiny(gen);
  const std::string f32_dir = TinyLlamaDir::write("llama_f32", TinyLlamaDir::config(), tiny.file(false));
  const std::string bf16_dir = TinyLlamaDir::write("llama_bf16", TinyLlamaDir::config(), tiny.file(true));
  std::unique_ptr<PretrainedModel> f32, bf16;
  cpuformer::Status st = PretrainedModel::load(f32_dir, &f32);
  check(st.ok() && f32, "pretrained: a C++-written F32 Llama directory loads: " + st.message());
  st = PretrainedModel::load(bf16_dir, &bf16);
  check(st.ok() && bf16, "pretrained: the BF16 copy loads: " + st.message());
  if (!f32 || !bf16) return;
  check(f32->kind() == PretrainedModel::Kind::kDecoder && f32->head() == PretrainedModel::Head::kCausalLM &&
            f32->vocab_size() == TinyLlamaDir::V && f32->hidden_size() == TinyLlamaDir::H &&
            f32->eos_token_ids() == std::vector<std::int64_t>{2} && f32->pad_token_id() == 0,
        "pretrained: kind, head, sizes and token ids from config.json");
  const std::uint64_t f32_bytes = std::filesystem::file_size(f32_dir + "/model.safetensors");
  const std::uint64_t bf16_bytes = std::filesystem::file_size(bf16_dir + "/model.safetensors");
  check(f32->mapped_bytes() == f32_bytes && bf16->mapped_bytes() == bf16_bytes && f32->owned_bytes() == 0,
        "pretrained: the weight file is mapped, float32 used in place");
  check(bf16->owned_bytes() <= 3 * TinyLlamaDir::H * sizeof(float),
        "pretrained: bfloat16 matrices stay 16-bit (only the norms converted), owned " +
            std::to_string(bf16->owned_bytes()));

  // logits: finite, equal between the F32 and BF16 files to float rounding, a padded row equal to the row alone
  const std::vector<std::int64_t> ids = {5, 9, 3, 17, 33, 8, 0, 0, 12, 7, 21, 30};  // (2, 6)
  const std::vector<std::int64_t> mask = {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1};     // row 1 left-padded
  std::vector<float> a, b, alone;
  st = f32->head_output(ids.data(), 2, 6, mask.data(), nullptr, &a);
  check(st.ok() && a.size() == size_t(2 * 6 * TinyLlamaDir::V), "pretrained: head_output (B, T, V): " + st.message());
  st = bf16->head_output(ids.data(), 2, 6, mask.data(), nullptr, &b);
  check(st.ok() && b.size() == a.size(), "pretrained: BF16 head_output: " + st.message());
  check(std::all_of(a.begin(), a.end(), [](float x) { return std::isfinite(x); }), "pretrained: logits are finite");
  check(a.size() == b.size() && max_rel_err(b, a) < 1e-5,
        "pretrained: BF16-on-disk logits equal the F32 ones (exactly representable weights), rel err " +
            std::to_string(a.size() == b.size() ? max_rel_err(b, a) : -1.0));
  st = f32->head_output(ids.data() + 8, 1, 4, nullptr, nullptr, &alone);
  const std::vector<float> padded_tail(a.begin() + (6 + 2) * TinyLlamaDir::V, a.end());
  check(st.ok() && max_rel_err(padded_tail, alone) < 1e-5, "pretrained: a left-padded row equals the row alone");

  // generation: deterministic, the same from both files, sampling reproducible by seed
  cpuformer::GenerationOptions g;
  g.max_new_tokens = 12, g.no_eos = true;
  std::vector<std::int64_t> g1, g2, g3;
  std::int64_t n1 = 0, n2 = 0, n3 = 0;
  st = f32->generate(ids.data(), 2, 6, mask.data(), g, &g1, &n1);
  check(st.ok() && n1 == 12 && g1.size() == size_t(2 * 18), "pretrained: generate 12 tokens: " + st.message());
  f32->generate(ids.data(), 2, 6, mask.data(), g, &g2, &n2);
  bf16->generate(ids.data(), 2, 6, mask.data(), g, &g3, &n3);
  check(g1 == g2 && g1 == g3, "pretrained: greedy generation is deterministic and equal from F32 and BF16 files");
  bool in_vocab = std::all_of(g1.begin(), g1.end(), [](std::int64_t t) { return t >= 0 && t < TinyLlamaDir::V; });
  check(in_vocab && std::equal(ids.begin(), ids.begin() + 6, g1.begin()), "pretrained: generate keeps the prompt");
  g.do_sample = true, g.top_k = 10, g.temperature = 0.8f, g.seed = 5;
  f32->generate(ids.data(), 2, 6, mask.data(), g, &g1, &n1);
  f32->generate(ids.data(), 2, 6, mask.data(), g, &g2, &n2);
  check(g1 == g2, "pretrained: sampling with a seed is reproducible");
  st = f32->generate(ids.data(), 2, 6, mask.data(), [] {
    cpuformer::GenerationOptions o;
    o.max_new_tokens = std::int64_t{1} << 40;
    return o;
  }(), &g1, &n1);
  check(!st.ok() && st.message().find("max_new_tokens") != std::string::npos, "pretrained: huge max_new_tokens refused");
  const std::vector<std::int64_t> bad_ids = {5, 40};
  st = f32->head_output(bad_ids.data(), 1, 2, nullptr, nullptr, &a);
  check(!st.ok() && st.message().find("vocabulary") != std::string::npos, "pretrained: an id past the vocabulary");

  // error Statuses naming what is wrong
  const auto load_error = [](const std::string& dir) {
    std::unique_ptr<PretrainedModel> m;
    cpuformer::Status s = PretrainedModel::load(dir, &m);
    return std::make_pair(s, m == nullptr);
  };
  auto [missing_cfg, none1] = load_error(TinyLlamaDir::write("no_config", "", tiny.file(false)));
  check(!missing_cfg.ok() && missing_cfg.is_not_found() && none1 &&
            missing_cfg.message().find("config.json") != std::string::npos,
        "pretrained: missing config.json is a not-found Status naming it: " + missing_cfg.message());
  std::string cfg = TinyLlamaDir::config();
  cfg.replace(cfg.find("\"llama\""), 7, "\"frobnicator\"");
  auto [unknown, none2] = load_error(TinyLlamaDir::write("unknown_type", cfg, tiny.file(false)));
  check(!unknown.ok() && !unknown.is_not_found() && none2 && unknown.message().find("frobnicator") != std::string::npos &&
            unknown.message().find("model_type") != std::string::npos,
        "pretrained: unknown model_type: " + unknown.message());
  auto [missing, none3] = load_error(
      TinyLlamaDir::write("missing_tensor", TinyLlamaDir::config(), tiny.file(false, "model.layers.0.mlp.up_proj.weight")));
  check(!missing.ok() && none3 && missing.message().find("model.layers.0.mlp.up_proj.weight") != std::string::npos,
        "pretrained: a missing tensor is named: " + missing.message());
  auto [shape, none4] = load_error(TinyLlamaDir::write("wrong_shape", TinyLlamaDir::config(),
                                                       tiny.file(true, "", "model.layers.0.self_attn.k_proj.weight")));
  check(!shape.ok() && none4 && shape.message().find("model.layers.0.self_attn.k_proj.weight") != std::string::npos &&
            shape.message().find("(3, 3)") != std::string::npos && shape.message().find("(8, 16)") != std::string::npos,
        "pretrained: a misshapen tensor is named with both shapes: " + shape.message());
  auto [yarn, none5] = load_error(TinyLlamaDir::write(
      "yarn", TinyLlamaDir::config(R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4.0})"), tiny.file(false)));
  check(!yarn.ok() && none5 && yarn.message().find("yarn") != std::string::npos &&
            yarn.message().find("config.json") != std::string::npos,
        "pretrained: rope_scaling yarn is refused by name: " + yarn.message());
  // llama3 rope scaling whose original_max_position_embeddings no int64 holds (a double-to-int cast is undefined)
  auto [rope, none7] = load_error(TinyLlamaDir::write(
      "llama3_huge", TinyLlamaDir::config(R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,)"
                                          R"( "original_max_position_embeddings": 1e300})"),
      tiny.file(false)));
  check(!rope.ok() && none7 && rope.message().find("llama3") != std::string::npos,
        "pretrained: llama3 original_max_position_embeddings 1e300 refused: " + rope.message());
  cfg = TinyLlamaDir::config();
  cfg.replace(cfg.find("\"num_hidden_layers\": 1,"), 23, "\"num_hidden_layers\": 1000000000,");
  auto [huge, none6] = load_error(TinyLlamaDir::write("huge_layers", cfg, tiny.file(false)));
  check(!huge.ok() && none6 && huge.message().find("model.layers.1.") != std::string::npos,
        "pretrained: num_hidden_layers past the file is a missing tensor, not an allocation: " + huge.message());
  for (const char* n : {"llama_f32", "llama_bf16", "no_config", "unknown_type", "missing_tensor", "wrong_shape",
                        "yarn", "huge_layers", "llama3_huge"})
    std::filesystem::remove_all(std::filesystem::temp_directory_path() /
                                ("cpuformer_test_" + std::string(n) + "_" + std::to_string(::getpid())));
}

int main() {
  std::mt19937 gen(1234);
  std::vector<std::string> paths = {"scalar"};
  if (cpuformer::build_has_avx2() && cpuformer::cpu_supports_avx2_fma()) paths.push_back("avx2");
  if (cpuformer::build_has_avx512() && cpuformer::cpu_supports_avx512()) paths.push_back("avx512");
  for (const auto& path : paths) {
    cpuformer::set_simd_path(path);
    for (int threads : {1, 2}) {
      cpuformer::set_num_threads(threads);
      test_sgemm(gen);
      test_softmax_layernorm_ce(gen);
      test_prepared_weights(gen);
      test_int8_kernels(gen);
      test_positions_norms(gen);
      test_half_linear(gen);
      test_lora_dropout(gen);
    }
    test_half_conversions(gen);
    test_int8_quantize_blocked();
    test_half_embedding(gen);
  }
  test_sgemm_avx512_equals_avx2(gen);
  test_errors();
  test_attention_variants(gen);
  test_safetensors_fuzz(gen);
  test_model_generate();
  test_model_llama_generate();
  test_model_encoders();
  test_model_threads();
  test_model_file_validation();
  test_model_file_and_buffer();
  test_safetensors_map();
  test_pretrained_directories();
  const int passed = g_checks - g_failures;
  std::printf("cpuformer C++ core, %s, OpenMP %s\n", cpuformer::compiler_version().c_str(),
              cpuformer::build_has_openmp() ? "on" : "off");
  std::printf("core: %d passed, %d failed\n", passed, g_failures);
  return g_failures == 0 ? 0 : 1;
}
