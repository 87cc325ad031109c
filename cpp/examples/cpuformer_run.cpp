// cpuformer_run: run a model saved by cpuformer.save() from plain C++ (no Python).
//
//   cpuformer_run MODEL generate IDS [MAX_NEW [TOP_K [TEMPERATURE [SEED]]]]   ids out (greedy when TOP_K is 0)
//   cpuformer_run MODEL logits   IDS                                          last position's logits (GPT)
//   cpuformer_run MODEL classify IDS [BATCH]                                  class logits per row
//   cpuformer_run MODEL embed    IDS [BATCH [MASK]]                           mean-pooled hidden states per row
//
// IDS and MASK are comma-separated integers (BATCH rows of equal length). Output: numbers separated by spaces,
// one row per line. Exit status 1 with a message on stderr for any error.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cpuformer/model.h"

static std::vector<std::int64_t> parse_ids(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) ids.push_back(std::stoll(item));
  return ids;
}

static int fail(const std::string& message) {
  std::cerr << "cpuformer_run: " << message << "\n";
  return 1;
}

static void print_rows(const std::vector<float>& v, std::int64_t rows) {
  const std::int64_t cols = static_cast<std::int64_t>(v.size()) / rows;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) std::printf(c ? " %.8g" : "%.8g", v[r * cols + c]);
    std::printf("\n");
  }
}

int main(int argc, char** argv) {
  if (argc < 4) return fail("usage: cpuformer_run MODEL {generate|logits|classify|embed} IDS [...]");
  std::unique_ptr<cpuformer::Model> model;
  cpuformer::Status st = cpuformer::Model::load(argv[1], &model);
  if (!st.ok()) return fail(st.message());
  const std::string command = argv[2];
  std::vector<std::int64_t> ids;
  try {
    ids = parse_ids(argv[3]);
  } catch (const std::exception&) {
    return fail("IDS must be comma-separated integers");
  }
  if (ids.empty()) return fail("IDS is empty");
  if (command == "generate") {
    cpuformer::GenerateOptions opts;
    const int max_new = argc > 4 ? std::atoi(argv[4]) : 20;
    opts.top_k = argc > 5 ? std::atoi(argv[5]) : 0;
    opts.greedy = opts.top_k == 0;
    opts.temperature = argc > 6 ? static_cast<float>(std::atof(argv[6])) : 1.0f;
    opts.seed = argc > 7 ? std::strtoull(argv[7], nullptr, 10) : 0;
    std::vector<std::int64_t> out;
    st = model->generate(ids, max_new, opts, &out);
    if (!st.ok()) return fail(st.message());
    for (size_t i = 0; i < out.size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(out[i]));
    std::printf("\n");
    return 0;
  }
  const std::int64_t batch = argc > 4 ? std::atoll(argv[4]) : 1;
  if (batch < 1 || static_cast<std::int64_t>(ids.size()) % batch) return fail("IDS do not split into BATCH rows");
  const std::int64_t T = static_cast<std::int64_t>(ids.size()) / batch;
  std::vector<float> out;
  if (command == "logits") {
    st = model->logits(ids, batch, T, &out);
    if (st.ok()) {  // the last position of each row
      const std::int64_t V = static_cast<std::int64_t>(out.size()) / (batch * T);
      std::vector<float> last;
      for (std::int64_t b = 0; b < batch; ++b)
        last.insert(last.end(), out.begin() + ((b + 1) * T - 1) * V, out.begin() + (b + 1) * T * V);
      out = last;
    }
  } else if (command == "classify") {
    st = model->classify(ids, batch, T, &out);
  } else if (command == "embed") {
    std::vector<std::int64_t> mask = argc > 5 ? parse_ids(argv[5]) : std::vector<std::int64_t>{};
    st = model->sentence_embeddings(ids, batch, T, mask, &out);
  } else {
    return fail("unknown command '" + command + "'");
  }
  if (!st.ok()) return fail(st.message());
  print_rows(out, batch);
  return 0;
}
