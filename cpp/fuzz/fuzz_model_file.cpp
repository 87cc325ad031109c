// fuzz_model_file.cpp: a coverage-guided (libFuzzer) target for model files. Each input is a whole file's bytes:
// the safetensors reader and its JSON parser (read_safetensors_buffer, and SafetensorsMap::open_buffer, whose views
// are read byte by byte and must agree with the float32 reader), the config checks and model construction
// (Model::load_from_buffer) and, when a file loads, a few small inference calls, so that whatever values the
// tensors hold (NaN, Inf, huge) also go through the kernels. Any crash, sanitizer report, leak, or a result that
// contradicts itself is a finding; error statuses are the expected outcome for most inputs.
//
// Build (clang only; ASan + UBSan) and seed corpus (tiny valid GPT / classifier / BERT files):
//   cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCPUFORMER_BUILD_FUZZERS=ON \
//     -DCPUFORMER_BUILD_PYTHON=OFF -DCPUFORMER_OPENMP=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
//   cmake --build build-fuzz -j 2 --target cpuformer_fuzz_model_file cpuformer_fuzz_seeds
//   build-fuzz/cpuformer_fuzz_seeds fuzz-corpus
// A long run (an hour, 2 workers; findings are written as crash-*/leak-*/timeout-* files, reproduce one with
// `build-fuzz/cpuformer_fuzz_model_file crash-...`):
//   build-fuzz/cpuformer_fuzz_model_file -dict=cpp/fuzz/model_file.dict -max_len=65536 -timeout=10 \
//     -rss_limit_mb=2048 -max_total_time=3600 -jobs=2 -workers=2 fuzz-corpus
// .ci/run runs the same for about a minute.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cpuformer/model.h"
#include "cpuformer/safetensors.h"

namespace {

// A broken invariant: abort, so libFuzzer records the input.
void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_model_file: %s\n", what);
    std::abort();
  }
}

void run_model(cpuformer::Model& m) {
  std::vector<float> out;
  std::vector<std::int64_t> ids;
  if (m.kind() == "GPT") {
    cpuformer::GenerateOptions opts;
    expect(m.generate({0}, 3, opts, &ids).ok() && ids.size() >= 2, "greedy generation from one id failed");
    opts.greedy = false, opts.top_k = 2, opts.temperature = 0.5f;
    expect(m.generate({0, 0}, 2, opts, &ids).ok(), "sampled generation failed");
    const cpuformer::Status st = m.logits({0}, 1, 1, &out);
    expect(st.ok(), "logits of one id failed");
  } else if (m.kind() == "Seq2SeqTransformer") {
    std::vector<std::vector<std::int64_t>> t;
    (void)m.translate({0, 0}, 1, 2, 3, 1, 0.6, &t);
    (void)m.translate({0, 0}, 1, 2, 3, 2, 0.6, &t);
  } else {
    // Two tokens may exceed a max_len of 1: then an error status, which is fine.
    if (m.kind() == "TransformerClassifier") (void)m.classify({0, 0}, 1, 2, &out);
    (void)m.sentence_embeddings({0, 0, 0, 0}, 2, 2, {1, 0, 1, 1}, &out);
  }
}

// The mapped reader on the same bytes: it accepts every file the float32 reader does (and more dtypes), its views
// lie inside its copy of the file (ASan checks each byte read), and their float32 values equal the reader's.
void check_map(const std::uint8_t* data, std::size_t size, const std::map<std::string, cpuformer::Tensor>& tensors) {
  std::unique_ptr<cpuformer::SafetensorsMap> map;
  const cpuformer::Status st = cpuformer::SafetensorsMap::open_buffer(data, size, &map);
  expect(st.ok() == static_cast<bool>(map), "open_buffer status and map disagree");
  if (!tensors.empty()) expect(st.ok(), "open_buffer rejects a file read_safetensors_buffer reads");
  if (!map) return;
  unsigned sum = 0;
  for (const auto& [name, v] : map->tensors()) {
    expect(v.name == name && v.nbytes == static_cast<std::uint64_t>(v.numel()) * cpuformer::dtype_size(v.dtype),
           "a view's size and shape disagree");
    for (std::uint64_t i = 0; i < v.nbytes; ++i) sum += v.data[i];
    std::vector<float> f;
    if (!cpuformer::tensor_to_float(v, &f).ok()) continue;
    expect(f.size() == static_cast<std::size_t>(v.numel()), "tensor_to_float size");
    const auto it = tensors.find(name);
    if (it != tensors.end())
      expect(it->second.data.size() == f.size() &&
                 (f.empty() || std::memcmp(f.data(), it->second.data.data(), f.size() * sizeof(float)) == 0),
             "the mapped and float32 readers disagree");
  }
  volatile unsigned sink = sum;  // keeps the reads
  (void)sink;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::map<std::string, cpuformer::Tensor> tensors;
  std::map<std::string, std::string> metadata;
  if (cpuformer::read_safetensors_buffer(data, size, &tensors, &metadata).ok()) {
    for (const auto& [name, t] : tensors) {  // what a successful read returns is self-consistent
      std::uint64_t n = 1;
      for (const std::int64_t d : t.shape) {
        expect(d >= 0, "negative dimension");
        n *= static_cast<std::uint64_t>(d);
      }
      expect(n == t.data.size(), "shape and data size disagree");
    }
  } else {
    expect(tensors.empty() && metadata.empty(), "a failed read wrote its outputs");
  }
  check_map(data, size, tensors);
  std::unique_ptr<cpuformer::Model> model;
  const cpuformer::Status st = cpuformer::Model::load_from_buffer(data, size, &model);
  expect(st.ok() == static_cast<bool>(model), "load status and model disagree");
  expect(st.ok() || !st.message().empty(), "an error without a message");
  if (model) run_model(*model);
  return 0;
}
