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

// A string from a file, quoted for an error message: one short printable line whatever the file holds (bytes
// outside printable ASCII as \xNN, cut after 80 bytes).
inline std::string quoted(const std::string& s) {
  static const char hex[] = "0123456789abcdef";
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 80; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out + (s.size() > 80 ? "...'" : "'");
}

// Parse a complete JSON text. Nesting deeper than 64 levels (the parser recurses), more than 2^21 values (each costs
// ~100 bytes in memory), trailing characters or any syntax error is an error.
Status parse_json(const std::string& text, Json* out);
Status parse_json(const char* begin, const char* end, Json* out);  // the same for the bytes [begin, end)

}  // namespace cpuformer
