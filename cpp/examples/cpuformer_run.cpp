// cpuformer_run: run a model saved by cpuformer.save() from plain C++ (no Python).
//
//   cpuformer_run MODEL generate IDS [MAX_NEW [TOP_K [TEMPERATURE [SEED]]]]   ids out (greedy when TOP_K is 0)
//   cpuformer_run MODEL logits   IDS                                          last position's logits (GPT)
//   cpuformer_run MODEL classify IDS [BATCH]                                  class logits per row
//   cpuformer_run MODEL embed    IDS [BATCH [MASK]]                           mean-pooled hidden states per row
//
// IDS and MASK are comma-separated integers (BATCH rows of equal length). Output: numbers separated by spaces,
// one row per line. Exit status 1 with a message on stderr for any error: bad arguments and any model file,
// however malformed, included (never a crash).
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cpuformer/model.h"

// Whole-text integer parsing: "5x", "", " 5" or out-of-range values are errors, not silently 5 or 0.
static bool parse_int(const std::string& text, long long lo, long long hi, long long* value) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno || *end != '\0' || v < lo || v > hi) return false;
  *value = v;
  return true;
}

static bool parse_ids(const std::string& text, std::vector<std::int64_t>* ids) {
  std::stringstream ss(text);
  std::string item;
  long long v;
  while (std::getline(ss, item, ',')) {
    if (!parse_int(item, LLONG_MIN, LLONG_MAX, &v)) return false;
    ids->push_back(v);
  }
  return true;
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
  std::vector<std::int64_t> ids;  // an empty list, negative counts, NaN temperatures: the model reports them
  if (!parse_ids(argv[3], &ids)) return fail("IDS must be comma-separated integers");
  long long arg = 0;
  if (command == "generate") {
    cpuformer::GenerateOptions opts;
    int max_new = 20;
    if (argc > 4) {
      if (!parse_int(argv[4], INT_MIN, INT_MAX, &arg)) return fail("MAX_NEW must be an integer");
      max_new = static_cast<int>(arg);
    }
    if (argc > 5) {
      if (!parse_int(argv[5], INT_MIN, INT_MAX, &arg)) return fail("TOP_K must be an integer");
      opts.top_k = static_cast<int>(arg);
    }
    opts.greedy = opts.top_k == 0;
    if (argc > 6) {
      char* end = nullptr;
      opts.temperature = std::strtof(argv[6], &end);
      if (end == argv[6] || *end != '\0') return fail("TEMPERATURE must be a number");
    }
    if (argc > 7) {
      if (!parse_int(argv[7], 0, LLONG_MAX, &arg)) return fail("SEED must be an integer >= 0");
      opts.seed = static_cast<std::uint64_t>(arg);
    }
    std::vector<std::int64_t> out;
    st = model->generate(ids, max_new, opts, &out);
    if (!st.ok()) return fail(st.message());
    for (size_t i = 0; i < out.size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(out[i]));
    std::printf("\n");
    return 0;
  }
  std::int64_t batch = 1;
  if (argc > 4) {
    if (!parse_int(argv[4], 1, LLONG_MAX, &arg)) return fail("BATCH must be an integer >= 1");
    batch = arg;
  }
  if (static_cast<std::int64_t>(ids.size()) % batch) return fail("IDS do not split into BATCH rows");
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
    std::vector<std::int64_t> mask;
    if (argc > 5 && !parse_ids(argv[5], &mask)) return fail("MASK must be comma-separated integers");
    st = model->sentence_embeddings(ids, batch, T, mask, &out);
  } else {
    return fail("unknown command '" + command + "'");
  }
  if (!st.ok()) return fail(st.message());
  print_rows(out, batch);
  return 0;
}
