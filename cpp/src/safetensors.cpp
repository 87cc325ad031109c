// safetensors.cpp: a defensive reader for safetensors files, with the small JSON parser it needs.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__":
// {str: str}}, then the tensor bytes (offsets relative to the data section). Every length, offset and size is
// checked before it is used; tensors are copied out, so the data may have any alignment.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>

#include "json.h"
#include "cpuformer/model.h"

namespace cpuformer {

// ---------------------------------------------------------------------------------------------------------------
// JSON

namespace {

constexpr int kMaxDepth = 64;

class JsonParser {
 public:
  JsonParser(const char* begin, const char* end) : p_(begin), end_(end) {}

  Status parse(Json* out) {
    Status st = value(out, 0);
    if (!st.ok()) return st;
    skip_ws();
    if (p_ != end_) return fail("trailing characters after the JSON value");
    return Status();
  }

 private:
  const char* p_;
  const char* end_;

  Status fail(const std::string& what) const { return Status::error("JSON: " + what); }

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  Status value(Json* out, int depth) {
    if (depth > kMaxDepth) return fail("nesting too deep");
    skip_ws();
    if (p_ >= end_) return fail("unexpected end");
    switch (*p_) {
      case '{': return object(out, depth);
      case '[': return array(out, depth);
      case '"':
        out->type = Json::kString;
        return string(&out->str);
      case 't': return literal("true", out, Json::kBool, true);
      case 'f': return literal("false", out, Json::kBool, false);
      case 'n': return literal("null", out, Json::kNull, false);
      default: return number(out);
    }
  }

  Status literal(const char* word, Json* out, Json::Type type, bool b) {
    const size_t n = std::strlen(word);
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return fail("invalid literal");
    p_ += n;
    out->type = type;
    out->boolean = b;
    return Status();
  }

  Status number(Json* out) {
    const char* start = p_;
    while (p_ < end_ && (std::isdigit(static_cast<unsigned char>(*p_)) || *p_ == '-' || *p_ == '+' || *p_ == '.' ||
                         *p_ == 'e' || *p_ == 'E'))
      ++p_;
    if (p_ == start || p_ - start > 64) return fail("invalid number");
    const std::string text(start, p_);
    char* parsed_end = nullptr;
    const double v = std::strtod(text.c_str(), &parsed_end);
    if (parsed_end != text.c_str() + text.size() || !std::isfinite(v)) return fail("invalid number '" + text + "'");
    out->type = Json::kNumber;
    out->number = v;
    return Status();
  }

  static void append_utf8(std::string* s, unsigned cp) {
    if (cp < 0x80) {
      s->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      s->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      s->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      s->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      s->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  Status string(std::string* out) {
    ++p_;  // opening quote
    out->clear();
    while (p_ < end_ && *p_ != '"') {
      char c = *p_++;
      if (static_cast<unsigned char>(c) < 0x20) return fail("control character in a string");
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (p_ >= end_) return fail("unterminated escape");
      c = *p_++;
      switch (c) {
        case '"': case '\\': case '/': out->push_back(c); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          if (end_ - p_ < 4) return fail("short \\u escape");
          unsigned cp = 0;
          for (int i = 0; i < 4; ++i) {
            const char h = *p_++;
            cp <<= 4;
            if (h >= '0' && h <= '9') cp |= h - '0';
            else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
            else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
            else return fail("bad \\u escape");
          }
          append_utf8(out, cp >= 0xD800 && cp <= 0xDFFF ? 0xFFFD : cp);  // lone surrogates -> U+FFFD
          break;
        }
        default: return fail("unknown escape");
      }
    }
    if (p_ >= end_) return fail("unterminated string");
    ++p_;  // closing quote
    return Status();
  }

  Status array(Json* out, int depth) {
    ++p_;
    out->type = Json::kArray;
    skip_ws();
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      return Status();
    }
    while (true) {
      out->items.emplace_back();
      Status st = value(&out->items.back(), depth + 1);
      if (!st.ok()) return st;
      skip_ws();
      if (p_ >= end_) return fail("unterminated array");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == ']') {
        ++p_;
        return Status();
      }
      return fail("expected ',' or ']'");
    }
  }

  Status object(Json* out, int depth) {
    ++p_;
    out->type = Json::kObject;
    skip_ws();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return Status();
    }
    while (true) {
      skip_ws();
      if (p_ >= end_ || *p_ != '"') return fail("expected a string key");
      std::string key;
      Status st = string(&key);
      if (!st.ok()) return st;
      skip_ws();
      if (p_ >= end_ || *p_ != ':') return fail("expected ':'");
      ++p_;
      out->members.emplace_back(std::move(key), Json());
      st = value(&out->members.back().second, depth + 1);
      if (!st.ok()) return st;
      skip_ws();
      if (p_ >= end_) return fail("unterminated object");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == '}') {
        ++p_;
        return Status();
      }
      return fail("expected ',' or '}'");
    }
  }
};

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      std::uint32_t m = mant;
      do {
        ++e;
        m <<= 1;
      } while (!(m & 0x400));
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

Status parse_json(const std::string& text, Json* out) { return JsonParser(text.data(), text.data() + text.size()).parse(out); }

const Json* Json::find(const std::string& key) const {
  if (type != kObject) return nullptr;
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors

Status read_safetensors(const std::string& path, std::map<std::string, Tensor>* tensors,
                        std::map<std::string, std::string>* metadata) {
  const auto fail = [&](const std::string& what) { return Status::error(path + ": " + what); };
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return fail("cannot open the file");
  const std::streamoff size = f.tellg();
  if (size < 8) return fail("too short for a safetensors header (" + std::to_string(size) + " bytes)");
  f.seekg(0);
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > 100u * 1024 * 1024 || n > static_cast<std::uint64_t>(size) - 8)
    return fail("header length " + std::to_string(n) + " runs past the end of the file");
  std::string header(static_cast<size_t>(n), '\0');
  f.read(&header[0], static_cast<std::streamsize>(n));
  if (!f) return fail("cannot read the header");
  Json root;
  Status st = parse_json(header, &root);
  if (!st.ok()) return fail(st.message());
  if (root.type != Json::kObject) return fail("the header is not a JSON object");
  const std::uint64_t data_size = static_cast<std::uint64_t>(size) - 8 - n;

  struct Span {
    std::uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (const auto& [name, info] : root.members) {
    if (name == "__metadata__") {
      if (info.type != Json::kObject) return fail("__metadata__ must be an object");
      for (const auto& [k, v] : info.members) {
        if (v.type != Json::kString) return fail("__metadata__ values must be strings");
        if (metadata) (*metadata)[k] = v.str;
      }
      continue;
    }
    const Json* dtype = info.find("dtype");
    const Json* shape = info.find("shape");
    const Json* offsets = info.find("data_offsets");
    if (!dtype || dtype->type != Json::kString || !shape || shape->type != Json::kArray || !offsets ||
        offsets->type != Json::kArray || offsets->items.size() != 2)
      return fail("entry '" + name + "' is malformed");
    size_t itemsize;
    if (dtype->str == "F32") itemsize = 4;
    else if (dtype->str == "F16" || dtype->str == "BF16") itemsize = 2;
    else return fail("tensor '" + name + "': unsupported dtype " + dtype->str + " (F32, F16, BF16)");
    Tensor t;
    std::uint64_t count = 1;
    for (const Json& d : shape->items) {
      if (d.type != Json::kNumber || d.number < 0 || d.number != std::floor(d.number) || d.number > 1e15)
        return fail("tensor '" + name + "': bad shape");
      const auto dim = static_cast<std::uint64_t>(d.number);
      if (dim && count > std::numeric_limits<std::uint64_t>::max() / 16 / dim)
        return fail("tensor '" + name + "': shape too large");
      count *= dim;
      t.shape.push_back(static_cast<std::int64_t>(dim));
    }
    std::uint64_t se[2];
    for (int i = 0; i < 2; ++i) {
      const Json& o = offsets->items[i];
      if (o.type != Json::kNumber || o.number < 0 || o.number != std::floor(o.number) || o.number > 1e18)
        return fail("tensor '" + name + "': bad data_offsets");
      se[i] = static_cast<std::uint64_t>(o.number);
    }
    if (se[0] > se[1] || se[1] > data_size)
      return fail("tensor '" + name + "': data_offsets [" + std::to_string(se[0]) + ", " + std::to_string(se[1]) +
                  "] outside the data section (" + std::to_string(data_size) + " bytes)");
    if (se[1] - se[0] != count * itemsize)
      return fail("tensor '" + name + "': " + std::to_string(se[1] - se[0]) + " bytes for " + std::to_string(count) +
                  " elements of " + dtype->str);
    spans.push_back({se[0], se[1], name});
    std::vector<unsigned char> raw(static_cast<size_t>(se[1] - se[0]));
    f.seekg(static_cast<std::streamoff>(8 + n + se[0]));
    f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
    if (!f) return fail("tensor '" + name + "': cannot read its bytes");
    t.data.resize(static_cast<size_t>(count));
    for (size_t i = 0; i < t.data.size(); ++i) {  // little-endian on disk; copies, so any alignment works
      if (itemsize == 4) {
        std::uint32_t bits = raw[4 * i] | (raw[4 * i + 1] << 8) | (raw[4 * i + 2] << 16) |
                             (static_cast<std::uint32_t>(raw[4 * i + 3]) << 24);
        std::memcpy(&t.data[i], &bits, 4);
      } else {
        const std::uint16_t h = static_cast<std::uint16_t>(raw[2 * i] | (raw[2 * i + 1] << 8));
        if (dtype->str == "BF16") {
          const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
          std::memcpy(&t.data[i], &bits, 4);
        } else {
          t.data[i] = half_to_float(h);
        }
      }
    }
    if (tensors) (*tensors)[name] = std::move(t);
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      return fail("tensors '" + spans[i - 1].name + "' and '" + spans[i].name + "' overlap");
  return Status();
}

}  // namespace cpuformer
