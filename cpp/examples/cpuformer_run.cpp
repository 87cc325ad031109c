// cpuformer_run: run a model saved by cpuformer.save() from plain C++ (no Python).
//
//   cpuformer_run MODEL generate IDS [MAX_NEW [TOP_K [TEMPERATURE [SEED]]]]   ids out (greedy when TOP_K is 0)
//   cpuformer_run MODEL logits   IDS                                          last position's logits (GPT)
//   cpuformer_run MODEL classify IDS [BATCH]                                  class logits per row
//   cpuformer_run MODEL embed    IDS [BATCH [MASK]]                           mean-pooled hidden states per row
//   cpuformer_run MODEL translate IDS [MAX_LEN [BEAM [BATCH [LENGTH_PENALTY]]]]  Seq2SeqTransformer: target ids per
//                                                                             source row (greedy when BEAM is 1)
//
// Options before MODEL: --frozen (Linear weights packed once, as cpuformer.nn.freeze) or --int8 (int8 weights, as
// cpuformer.nn.quantize_dynamic); for a Hugging Face DIR with 16-bit weights, --bf16-activations (their products
// take bf16-rounded activations, as from_pretrained(activations="bfloat16")).
//
// IDS and MASK are comma-separated integers (BATCH rows of equal length). Output: numbers separated by spaces,
// one row per line.
//
// Text in, text out: when MODEL is a directory holding model.safetensors and tokenizer.json (a Hugging Face
// tokenizer file), the arguments are texts, encoded by cpuformer's tokenizer:
//   cpuformer_run DIR generate "a prompt" [MAX_NEW [TOP_K [TEMPERATURE [SEED]]]]   the decoded prompt + continuation
//   cpuformer_run DIR embed    "text" ["text" ...]                                  one embedding row per text
//   cpuformer_run DIR classify "text" ["text" ...]                                  class logits per text
//   cpuformer_run DIR logits   "text"                                               last position's logits
//   cpuformer_run DIR tokenize "text"                                               ids, then tokens, one per line
//   cpuformer_run DIR translate "text" [MAX_LEN [BEAM]]                             the decoded translation
// Several texts are padded to the longest (the tokenizer's pad token) with an attention mask.
//
// Hugging Face model directories (config.json + safetensors + tokenizer.json; cpuformer/pretrained.h):
//   cpuformer_run DIR embed    "text" [...]     sentence embeddings (the directory's sentence-transformers pooling
//                                               and normalisation; mean pooling without one)
//   cpuformer_run DIR classify "text" [...]     logits per text (sequence classification heads)
//   cpuformer_run DIR generate "a prompt" [MAX_NEW [TOP_K [TEMPERATURE [SEED]]]]   prompt + continuation
//   cpuformer_run DIR translate "text" [MAX_NEW [BEAMS]]                          encoder-decoders
//
// Exit status 1 with a message on stderr for any error: bad arguments and any model or tokenizer file, however
// malformed, included (never a crash).
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "cpuformer/model.h"
#include "cpuformer/pretrained.h"
#include "cpuformer/tokenizer.h"

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

static bool is_directory(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

// The tokenizer's pad id: its padding settings, else a "[PAD]" or "<pad>" token, else 0.
static std::int64_t pad_id(const cpuformer::Tokenizer& tok) {
  if (tok.padding()) return tok.padding()->pad_id;
  for (const char* name : {"[PAD]", "<pad>", "<|pad|>"})
    if (tok.token_to_id(name) >= 0) return tok.token_to_id(name);
  return 0;
}

// Encode texts as one padded batch: ids and attention mask (B*T), and T; truncated when `truncation` is given.
static cpuformer::Status encode_texts(const cpuformer::Tokenizer& tok, const std::vector<std::string>& texts,
                                      std::vector<std::int64_t>* ids, std::vector<std::int64_t>* mask,
                                      std::int64_t* T, const cpuformer::TruncationParams* truncation = nullptr) {
  cpuformer::PaddingParams padding;
  if (tok.padding()) padding = *tok.padding();
  padding.fixed = false;
  padding.pad_id = pad_id(tok);
  std::vector<cpuformer::Encoding> encodings;
  cpuformer::Status st = tok.encode_batch_with(texts, nullptr, true, truncation, &padding, &encodings);
  if (!st.ok()) return st;
  *T = static_cast<std::int64_t>(encodings[0].size());
  if (*T == 0) return cpuformer::Status::error("the text encodes to no tokens");
  for (const auto& e : encodings) {
    ids->insert(ids->end(), e.ids.begin(), e.ids.end());
    mask->insert(mask->end(), e.attention_mask.begin(), e.attention_mask.end());
  }
  return cpuformer::Status();
}

// generate's optional MAX_NEW TOP_K TEMPERATURE SEED, from argv[first] on.
static bool generate_options(int argc, char** argv, int first, int* max_new, cpuformer::GenerateOptions* opts,
                             std::string* error) {
  long long arg = 0;
  if (argc > first) {
    if (!parse_int(argv[first], INT_MIN, INT_MAX, &arg)) return *error = "MAX_NEW must be an integer", false;
    *max_new = static_cast<int>(arg);
  }
  if (argc > first + 1) {
    if (!parse_int(argv[first + 1], INT_MIN, INT_MAX, &arg)) return *error = "TOP_K must be an integer", false;
    opts->top_k = static_cast<int>(arg);
  }
  opts->greedy = opts->top_k == 0;
  if (argc > first + 2) {
    char* end = nullptr;
    opts->temperature = std::strtof(argv[first + 2], &end);
    if (end == argv[first + 2] || *end != '\0') return *error = "TEMPERATURE must be a number", false;
  }
  if (argc > first + 3) {
    if (!parse_int(argv[first + 3], 0, LLONG_MAX, &arg)) return *error = "SEED must be an integer >= 0", false;
    opts->seed = static_cast<std::uint64_t>(arg);
  }
  return true;
}

static cpuformer::LoadOptions load_options;
static bool bf16_activations = false;

static void print_ids(const std::vector<std::int64_t>& ids) {
  for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(ids[i]));
  std::printf("\n");
}

// translate's optional MAX_LEN BEAM, from argv[first] on.
static bool translate_options(int argc, char** argv, int first, int* max_len, int* beam, std::string* error) {
  long long arg = 0;
  if (argc > first) {
    if (!parse_int(argv[first], INT_MIN, INT_MAX, &arg)) return *error = "MAX_LEN must be an integer", false;
    *max_len = static_cast<int>(arg);
  }
  if (argc > first + 1) {
    if (!parse_int(argv[first + 1], INT_MIN, INT_MAX, &arg)) return *error = "BEAM must be an integer", false;
    *beam = static_cast<int>(arg);
  }
  return true;
}

// MODEL is a directory with model.safetensors and tokenizer.json: texts in, text or numbers out.
static int run_text(const std::string& dir, int argc, char** argv) {
  std::unique_ptr<cpuformer::Tokenizer> tok;
  cpuformer::Status st = cpuformer::Tokenizer::from_file(dir + "/tokenizer.json", &tok);
  if (!st.ok()) return fail(st.message());
  const std::string command = argv[2];
  if (command == "tokenize") {
    cpuformer::Encoding e;
    st = tok->encode(argv[3], nullptr, true, &e);
    if (!st.ok()) return fail(st.message());
    for (size_t i = 0; i < e.size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(e.ids[i]));
    std::printf("\n");
    for (const std::string& t : e.tokens) std::printf("%s\n", t.c_str());
    return 0;
  }
  std::unique_ptr<cpuformer::Model> model;
  st = cpuformer::Model::load(dir + "/model.safetensors", &model, load_options);
  if (!st.ok()) return fail(st.message());
  if (command == "translate") {  // one tokenizer for both sides
    int max_len = 60, beam = 1;
    std::string error;
    if (!translate_options(argc, argv, 4, &max_len, &beam, &error)) return fail(error);
    cpuformer::Encoding e;
    st = tok->encode(argv[3], nullptr, true, &e);
    if (st.ok() && e.ids.empty()) st = cpuformer::Status::error("the text encodes to no tokens");
    std::vector<std::vector<std::int64_t>> out;
    if (st.ok())
      st = model->translate(e.ids, 1, static_cast<std::int64_t>(e.ids.size()), max_len, beam, 0.6, &out);
    std::string text;
    if (st.ok()) st = tok->decode(out[0], true, &text);
    if (!st.ok()) return fail(st.message());
    std::printf("%s\n", text.c_str());
    return 0;
  }
  if (command == "generate") {
    cpuformer::GenerateOptions opts;
    int max_new = 20;
    std::string error;
    if (!generate_options(argc, argv, 4, &max_new, &opts, &error)) return fail(error);
    cpuformer::Encoding e;
    st = tok->encode(argv[3], nullptr, true, &e);
    std::vector<std::int64_t> out;
    if (st.ok()) st = model->generate(e.ids, max_new, opts, &out);
    std::string text;
    if (st.ok()) st = tok->decode(out, true, &text);
    if (!st.ok()) return fail(st.message());
    std::printf("%s\n", text.c_str());
    return 0;
  }
  const std::vector<std::string> texts(argv + 3, argv + argc);
  if (command == "logits" && texts.size() != 1) return fail("logits takes one text");
  std::vector<std::int64_t> ids, mask;
  std::int64_t T = 0;
  st = encode_texts(*tok, texts, &ids, &mask, &T);
  if (!st.ok()) return fail(st.message());
  const std::int64_t batch = static_cast<std::int64_t>(texts.size());
  std::vector<float> out;
  if (command == "embed") {
    st = model->sentence_embeddings(ids, batch, T, mask, &out);
  } else if (command == "classify") {
    st = model->classify(ids, batch, T, &out);
  } else if (command == "logits") {
    st = model->logits(ids, 1, T, &out);
    if (st.ok()) out.erase(out.begin(), out.end() - static_cast<std::int64_t>(out.size()) / T);
  } else {
    return fail("unknown command '" + command + "'");
  }
  if (!st.ok()) return fail(st.message());
  print_rows(out, batch);
  return 0;
}

// DIR is a Hugging Face model directory (config.json): the families of cpuformer/pretrained.h, texts in.
static int run_pretrained(const std::string& dir, int argc, char** argv) {
  std::unique_ptr<cpuformer::Tokenizer> tok;
  cpuformer::Status st = cpuformer::Tokenizer::from_file(dir + "/tokenizer.json", &tok);
  if (!st.ok()) return fail(st.message());
  cpuformer::PretrainedOptions options;
  options.weights = load_options.weights;
  options.bf16_activations = bf16_activations;
  std::unique_ptr<cpuformer::PretrainedModel> model;
  st = cpuformer::PretrainedModel::load(dir, &model, options);
  if (!st.ok()) return fail(st.message());
  const std::string command = argv[2];
  using Kind = cpuformer::PretrainedModel::Kind;
  if (command == "generate" || command == "translate") {
    cpuformer::GenerateOptions g;
    int max_new = 20, beams = 1;
    std::string error;
    if (command == "generate" && !generate_options(argc, argv, 4, &max_new, &g, &error)) return fail(error);
    if (command == "translate" && !translate_options(argc, argv, 4, &max_new, &beams, &error)) return fail(error);
    cpuformer::GenerationOptions o;
    o.max_new_tokens = max_new, o.do_sample = !g.greedy, o.top_k = g.top_k, o.temperature = g.temperature;
    o.seed = g.seed, o.num_beams = beams;
    cpuformer::Encoding e;
    st = tok->encode(argv[3], nullptr, true, &e);
    if (st.ok() && e.ids.empty()) st = cpuformer::Status::error("the text encodes to no tokens");
    if (!st.ok()) return fail(st.message());
    const auto T = static_cast<std::int64_t>(e.ids.size());
    std::vector<std::int64_t> out;
    std::int64_t n = 0;
    if (command == "generate") {
      if (model->kind() != Kind::kDecoder) return fail("generate needs a decoder model (translate for encoder-decoders)");
      st = model->generate(e.ids.data(), 1, T, nullptr, o, &out, &n);
    } else {
      if (model->kind() != Kind::kSeq2Seq) return fail("translate needs an encoder-decoder model");
      st = model->seq2seq_generate(e.ids.data(), 1, T, nullptr, o, &out, &n);
    }
    std::string text;
    if (st.ok()) st = tok->decode(out, true, &text);
    if (!st.ok()) return fail(st.message());
    std::printf("%s\n", text.c_str());
    return 0;
  }
  const std::vector<std::string> texts(argv + 3, argv + argc);
  std::vector<std::int64_t> ids, mask;
  std::int64_t T = 0;
  cpuformer::PoolingModes pooling;
  std::int64_t max_len = 0;
  if (command == "embed") {
    st = cpuformer::read_sentence_config(dir, &pooling, &max_len);
    if (!st.ok()) return fail(st.message());
  }
  // sentence-transformers truncates to max_seq_length (encode_texts passes its truncation explicitly: the
  // tokenizer's own setting would not reach encode_batch_with)
  cpuformer::TruncationParams trunc;
  trunc.max_length = static_cast<std::size_t>(max_len);
  st = encode_texts(*tok, texts, &ids, &mask, &T, max_len > 0 ? &trunc : nullptr);
  if (!st.ok()) return fail(st.message());
  const auto batch = static_cast<std::int64_t>(texts.size());
  std::vector<float> out;
  if (command == "embed") {
    std::vector<float> hidden;
    st = model->hidden_states(ids.data(), batch, T, mask.data(), nullptr, &hidden);
    if (st.ok()) st = cpuformer::sentence_pooling(hidden.data(), batch, T, model->hidden_size(), mask.data(), pooling, &out);
  } else if (command == "classify") {
    if (model->head() != cpuformer::PretrainedModel::Head::kSequenceClassification)
      return fail("classify needs a *ForSequenceClassification model");
    st = model->head_output(ids.data(), batch, T, mask.data(), nullptr, &out);
  } else {
    return fail("unknown command '" + command + "' for a Hugging Face directory (embed, classify, generate, translate)");
  }
  if (!st.ok()) return fail(st.message());
  print_rows(out, batch);
  return 0;
}

static bool is_file(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

int main(int argc, char** argv) {
  while (argc > 1 && std::string(argv[1]).compare(0, 2, "--") == 0) {  // options before MODEL
    const std::string option = argv[1];
    if (option == "--int8")
      load_options.weights = cpuformer::LoadOptions::kInt8;
    else if (option == "--frozen")
      load_options.weights = cpuformer::LoadOptions::kPacked;
    else if (option == "--bf16-activations")
      bf16_activations = true;
    else
      return fail("unknown option '" + option + "' (--int8, --frozen, --bf16-activations)");
    argv[1] = argv[0];
    ++argv, --argc;
  }
  if (argc < 4) return fail("usage: cpuformer_run [--int8|--frozen] MODEL {generate|logits|classify|embed|translate} "
                            "IDS [...], or cpuformer_run [--int8|--frozen] DIR "
                            "{generate|logits|classify|embed|translate|tokenize} TEXT [...]");
  if (is_directory(argv[1]) && is_file(std::string(argv[1]) + "/config.json"))
    return run_pretrained(argv[1], argc, argv);
  if (bf16_activations) return fail("--bf16-activations applies to Hugging Face directories (config.json)");
  if (is_directory(argv[1])) return run_text(argv[1], argc, argv);
  std::unique_ptr<cpuformer::Model> model;
  cpuformer::Status st = cpuformer::Model::load(argv[1], &model, load_options);
  if (!st.ok()) return fail(st.message());
  const std::string command = argv[2];
  std::vector<std::int64_t> ids;  // an empty list, negative counts, NaN temperatures: the model reports them
  if (!parse_ids(argv[3], &ids)) return fail("IDS must be comma-separated integers");
  long long arg = 0;
  if (command == "generate") {
    cpuformer::GenerateOptions opts;
    int max_new = 20;
    std::string error;
    if (!generate_options(argc, argv, 4, &max_new, &opts, &error)) return fail(error);
    std::vector<std::int64_t> out;
    st = model->generate(ids, max_new, opts, &out);
    if (!st.ok()) return fail(st.message());
    print_ids(out);
    return 0;
  }
  if (command == "translate") {
    int max_len = 60, beam = 1;
    std::string error;
    if (!translate_options(argc, argv, 4, &max_len, &beam, &error)) return fail(error);
    std::int64_t rows = 1;
    if (argc > 6) {
      if (!parse_int(argv[6], 1, LLONG_MAX, &arg)) return fail("BATCH must be an integer >= 1");
      rows = arg;
    }
    double penalty = 0.6;
    if (argc > 7) {
      char* end = nullptr;
      penalty = std::strtod(argv[7], &end);
      if (end == argv[7] || *end != '\0') return fail("LENGTH_PENALTY must be a number");
    }
    if (static_cast<std::int64_t>(ids.size()) % rows) return fail("IDS do not split into BATCH rows");
    std::vector<std::vector<std::int64_t>> out;
    st = model->translate(ids, rows, static_cast<std::int64_t>(ids.size()) / rows, max_len, beam, penalty, &out);
    if (!st.ok()) return fail(st.message());
    for (const auto& row : out) print_ids(row);
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
