// test_core.cpp: a Python-free test of the C++ core. It links only cpuformer_core (proving that deployments without
// Python can use it) and checks kernels against plain double-precision references, on both SIMD paths, plus the
// error contract (exceptions, nothing written). Built with -DCPUFORMER_BUILD_TESTS=ON; run by ctest and by .ci/run,
// also under -DCPUFORMER_SANITIZE=ON (AddressSanitizer + UBSan).
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpuformer.h"

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
                                            std::to_string(tb));
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

int main() {
  std::mt19937 gen(1234);
  std::vector<std::string> paths = {"scalar"};
  if (cpuformer::build_has_avx2() && cpuformer::cpu_supports_avx2_fma()) paths.push_back("avx2");
  for (const auto& path : paths) {
    cpuformer::set_simd_path(path);
    for (int threads : {1, 2}) {
      cpuformer::set_num_threads(threads);
      test_sgemm(gen);
      test_softmax_layernorm_ce(gen);
      test_prepared_weights(gen);
    }
  }
  test_errors();
  test_safetensors_fuzz(gen);
  const int passed = g_checks - g_failures;
  std::printf("cpuformer C++ core, %s, OpenMP %s\n", cpuformer::compiler_version().c_str(),
              cpuformer::build_has_openmp() ? "on" : "off");
  std::printf("core: %d passed, %d failed\n", passed, g_failures);
  return g_failures == 0 ? 0 : 1;
}
