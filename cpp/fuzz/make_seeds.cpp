// make_seeds.cpp: writes the model-file fuzzer's seed corpus into a folder: the tiny valid models of
// model_files.h (every kind the runtime loads) and one plain file with F16 and BF16 tensors.
//   cpuformer_fuzz_seeds DIR
#include <cstdio>
#include <string>

#include "model_files.h"

static bool write(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  return std::fclose(f) == 0 && ok;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: cpuformer_fuzz_seeds DIR (an existing folder)\n");
    return 2;
  }
  const std::string dir = argv[1];
  int written = 0;
  const auto models = cpuformer_testing::tiny_models();
  for (const auto& [name, spec] : models) written += write(dir + "/" + name, spec.file());
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[4],)"
      R"("data_offsets":[8,16]},"__metadata__":{"format":"cpuformer-model","config":"{}"}})";
  std::string halves(8, '\0');
  for (int i = 0; i < 8; ++i) halves[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  written += write(dir + "/half_floats", halves + header + std::string("\x00\x3c\x00\xc0\xff\x7b\x01\x00"
                                                                       "\x80\x3f\x00\xc0\x80\x7f\xc0\xff", 16));
  if (written != static_cast<int>(models.size()) + 1) {
    std::fprintf(stderr, "cpuformer_fuzz_seeds: cannot write into %s\n", dir.c_str());
    return 1;
  }
  return 0;
}
