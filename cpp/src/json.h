// json.h (private): the small JSON value and parser used for safetensors headers and model configs.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "cpuformer/model.h"

namespace cpuformer {

struct Json {
  enum Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = kNull;
  bool boolean = false;
  double number = 0.0;
  std::string str;
  std::vector<Json> items;                             // array
  std::vector<std::pair<std::string, Json>> members;   // object, in file order
  const Json* find(const std::string& key) const;      // object member or nullptr
};

// Parse a complete JSON text. Nesting deeper than 64 levels (the parser recurses), more than 2^21 values (each costs
// ~100 bytes in memory), trailing characters or any syntax error is an error.
Status parse_json(const std::string& text, Json* out);

}  // namespace cpuformer
