// safetensors.cpp: a defensive reader for safetensors files, with the small JSON parser it needs.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__":
// {str: str}}, then the tensor bytes (offsets relative to the data section). Every length, offset and size is
// checked before it is used; tensors are copied out, so the data may have any alignment.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <new>

#include "cpuformer/half.h"
#include "json.h"
#include "unicode.h"
#include "cpuformer/model.h"

namespace cpuformer {

// ---------------------------------------------------------------------------------------------------------------
// JSON

namespace {

constexpr int kMaxDepth = 64;
// Each parsed value costs ~100 bytes of memory for a few bytes of text: capping the count keeps a header of
// "[0,0,0,...]" from turning 100 MB of text into gigabytes. Real headers hold ~10 values per tensor.
constexpr size_t kMaxValues = size_t{1} << 21;
constexpr std::uint64_t kMaxHeaderBytes = 100u * 1024 * 1024;

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
  size_t values_ = 0;

  Status fail(const std::string& what) const { return Status::error("JSON: " + what); }

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  Status value(Json* out, int depth) {
    if (depth > kMaxDepth) return fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    if (++values_ > kMaxValues) return fail("more than " + std::to_string(kMaxValues) + " values");
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

  // Four hex digits at p_ (consumed on success).
  bool hex4(unsigned* out) {
    if (end_ - p_ < 4) return false;
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = p_[i];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<unsigned>(h - 'A' + 10);
      else return false;
    }
    p_ += 4;
    *out = v;
    return true;
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
          unsigned cp = 0;
          if (!hex4(&cp)) return fail("bad \\u escape");
          // A surrogate pair (\uD83D\uDE00, as json.dumps writes chars above U+FFFF) is one char; a lone
          // surrogate becomes U+FFFD.
          if (cp >= 0xD800 && cp <= 0xDBFF && end_ - p_ >= 6 && p_[0] == '\\' && p_[1] == 'u') {
            const char* save = p_;
            p_ += 2;
            unsigned lo = 0;
            if (hex4(&lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else {
              p_ = save;
            }
          }
          unicode::append_utf8(static_cast<char32_t>(cp), out);  // a lone surrogate becomes U+FFFD
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

namespace {

// Where the bytes come from (a file or a memory buffer). The parser checks every range against size() first, so
// read() is only asked for bytes that exist.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual std::uint64_t size() const = 0;
  virtual bool read(std::uint64_t offset, size_t n, void* dst) = 0;
};

class BufferSource : public ByteSource {
 public:
  BufferSource(const void* data, size_t size) : data_(static_cast<const unsigned char*>(data)), size_(size) {}
  std::uint64_t size() const override { return size_; }
  bool read(std::uint64_t offset, size_t n, void* dst) override {
    if (n) std::memcpy(dst, data_ + offset, n);
    return true;
  }

 private:
  const unsigned char* data_;
  size_t size_;
};

// Reads tensor by tensor, so a large file is never held in memory twice.
class FileSource : public ByteSource {
 public:
  explicit FileSource(const std::string& path) : f_(path, std::ios::binary | std::ios::ate) {
    if (f_) size_ = static_cast<std::uint64_t>(std::max<std::streamoff>(f_.tellg(), 0));
  }
  bool is_open() const { return static_cast<bool>(f_); }
  std::uint64_t size() const override { return size_; }
  bool read(std::uint64_t offset, size_t n, void* dst) override {
    f_.seekg(static_cast<std::streamoff>(offset));
    f_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    return static_cast<bool>(f_);
  }

 private:
  std::ifstream f_;
  std::uint64_t size_ = 0;
};

// A whole number in [0, max] (JSON numbers are doubles; max stays well below 2^53, so the value is exact).
bool whole(const Json& v, double max) {
  return v.type == Json::kNumber && v.number >= 0 && v.number <= max && v.number == std::floor(v.number);
}

// The one parser behind read_safetensors and read_safetensors_buffer. `name` prefixes error messages. The outputs
// are written only on success.
Status parse_safetensors(ByteSource& src, const std::string& name, std::map<std::string, Tensor>* tensors_out,
                         std::map<std::string, std::string>* metadata_out) {
  const auto fail = [&](const std::string& what) { return Status::error(name.empty() ? what : name + ": " + what); };
  const std::uint64_t size = src.size();
  if (size < 8) return fail("too short for a safetensors header (" + std::to_string(size) + " bytes)");
  unsigned char len_bytes[8];
  if (!src.read(0, 8, len_bytes)) return fail("cannot read the header length");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > size - 8) return fail("header length " + std::to_string(n) + " runs past the end of the file");
  if (n > kMaxHeaderBytes) return fail("header length " + std::to_string(n) + " is over the 100 MiB limit");
  std::string header(static_cast<size_t>(n), '\0');
  if (!src.read(8, header.size(), &header[0])) return fail("cannot read the header");
  Json root;
  Status st = parse_json(header, &root);
  if (!st.ok()) return fail(st.message());
  if (root.type != Json::kObject) return fail("the header is not a JSON object");
  const std::uint64_t data_size = size - 8 - n;

  struct Span {
    std::uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
  bool seen_metadata = false;
  std::vector<unsigned char> raw;
  for (const auto& [tname, info] : root.members) {
    if (tname == "__metadata__") {
      if (seen_metadata) return fail("__metadata__ appears twice");
      seen_metadata = true;
      if (info.type != Json::kObject) return fail("__metadata__ must be an object");
      for (const auto& [k, v] : info.members) {
        if (v.type != Json::kString) return fail("__metadata__ values must be strings");
        if (!metadata.emplace(k, v.str).second) return fail("__metadata__ key " + quoted(k) + " appears twice");
      }
      continue;
    }
    const Json* dtype = info.find("dtype");
    const Json* shape = info.find("shape");
    const Json* offsets = info.find("data_offsets");
    if (!dtype || dtype->type != Json::kString || !shape || shape->type != Json::kArray || !offsets ||
        offsets->type != Json::kArray || offsets->items.size() != 2)
      return fail("entry " + quoted(tname) + " is malformed");
    size_t itemsize;
    if (dtype->str == "F32") itemsize = 4;
    else if (dtype->str == "F16" || dtype->str == "BF16") itemsize = 2;
    else return fail("tensor " + quoted(tname) + ": unsupported dtype " + quoted(dtype->str) + " (F32, F16, BF16)");
    if (shape->items.size() > 8) return fail("tensor " + quoted(tname) + ": more than 8 dimensions");
    Tensor t;
    for (const Json& d : shape->items) {
      if (!whole(d, 1e15)) return fail("tensor " + quoted(tname) + ": bad shape (dimensions are integers >= 0)");
      t.shape.push_back(static_cast<std::int64_t>(d.number));
    }
    // The element count, bounded by the data section at every step: no product can overflow, and a shape that
    // the bytes cannot hold fails here, before anything is allocated.
    const bool empty = std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end();
    std::uint64_t count = empty ? 0 : 1;
    for (const std::int64_t d : t.shape) {
      if (empty) break;
      const auto dim = static_cast<std::uint64_t>(d);
      if (count > data_size / itemsize / dim)
        return fail("tensor " + quoted(tname) + ": shape larger than the data section (" + std::to_string(data_size) +
                    " bytes)");
      count *= dim;
    }
    std::uint64_t se[2];
    for (int i = 0; i < 2; ++i) {
      if (!whole(offsets->items[i], 1e15)) return fail("tensor " + quoted(tname) + ": bad data_offsets");
      se[i] = static_cast<std::uint64_t>(offsets->items[i].number);
    }
    if (se[0] > se[1] || se[1] > data_size)
      return fail("tensor " + quoted(tname) + ": data_offsets [" + std::to_string(se[0]) + ", " + std::to_string(se[1]) +
                  "] outside the data section (" + std::to_string(data_size) + " bytes)");
    if (se[1] - se[0] != count * itemsize)
      return fail("tensor " + quoted(tname) + ": " + std::to_string(se[1] - se[0]) + " bytes for " +
                  std::to_string(count) + " elements of " + dtype->str);
    spans.push_back({se[0], se[1], &tname});
    raw.resize(static_cast<size_t>(se[1] - se[0]));
    if (!src.read(8 + n + se[0], raw.size(), raw.data())) return fail("tensor " + quoted(tname) + ": cannot read its bytes");
    t.data.resize(static_cast<size_t>(count));
    const HalfType half_type = dtype->str == "BF16" ? HalfType::kBF16 : HalfType::kF16;  // when itemsize == 2
    for (size_t i = 0; i < t.data.size(); ++i) {  // little-endian on disk; copies, so any alignment works
      if (itemsize == 4) {
        std::uint32_t bits = raw[4 * i] | (raw[4 * i + 1] << 8) | (raw[4 * i + 2] << 16) |
                             (static_cast<std::uint32_t>(raw[4 * i + 3]) << 24);
        std::memcpy(&t.data[i], &bits, 4);
      } else {
        const std::uint16_t h = static_cast<std::uint16_t>(raw[2 * i] | (raw[2 * i + 1] << 8));
        t.data[i] = half_to_float(h, half_type);
      }
    }
    if (!tensors.emplace(tname, std::move(t)).second) return fail("tensor " + quoted(tname) + " appears twice");
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      return fail("tensors " + quoted(*spans[i - 1].name) + " and " + quoted(*spans[i].name) + " overlap");
  if (tensors_out) *tensors_out = std::move(tensors);
  if (metadata_out) *metadata_out = std::move(metadata);
  return Status();
}

// The public readers report allocation failures and any other exception as a Status.
template <class Fn>
Status no_throw(const std::string& name, Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Status::error(name + "out of memory reading safetensors data");
  } catch (const std::exception& e) {
    return Status::error(name + e.what());
  }
}

}  // namespace

Status read_safetensors(const std::string& path, std::map<std::string, Tensor>* tensors,
                        std::map<std::string, std::string>* metadata) {
  return no_throw(path + ": ", [&] {
    FileSource src(path);
    if (!src.is_open()) return Status::error(path + ": cannot open the file");
    return parse_safetensors(src, path, tensors, metadata);
  });
}

Status read_safetensors_buffer(const void* data, size_t size, std::map<std::string, Tensor>* tensors,
                               std::map<std::string, std::string>* metadata) {
  return no_throw("", [&] {
    if (!data && size) return Status::error("null buffer");
    BufferSource src(data, size);
    return parse_safetensors(src, "", tensors, metadata);
  });
}

}  // namespace cpuformer
