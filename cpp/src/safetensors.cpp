// safetensors.cpp: a defensive reader for safetensors files and Hugging Face weight directories (memory-mapped,
// safetensors.h; float32 copies, model.h), with the small JSON parser it needs.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__":
// {str: str}}, then the tensor bytes (offsets relative to the data section). Every length, offset and size is
// checked before it is used; views make no assumption about alignment.
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <set>
#include <system_error>

#ifndef _WIN32
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#include "cpuformer/half.h"
#include "json.h"
#include "unicode.h"
#include "cpuformer/model.h"
#include "cpuformer/safetensors.h"

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
Status parse_json(const char* begin, const char* end, Json* out) { return JsonParser(begin, end).parse(out); }

const Json* Json::find(const std::string& key) const {
  if (type != kObject) return nullptr;
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// dtypes

namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kBool, "BOOL", 1},         {DType::kU8, "U8", 1},
    {DType::kI8, "I8", 1},             {DType::kF8E5M2, "F8_E5M2", 1},
    {DType::kF8E4M3, "F8_E4M3", 1},    {DType::kF8E8M0, "F8_E8M0", 1},
    {DType::kF8E4M3FNUZ, "F8_E4M3FNUZ", 1}, {DType::kF8E5M2FNUZ, "F8_E5M2FNUZ", 1},
    {DType::kI16, "I16", 2},           {DType::kU16, "U16", 2},
    {DType::kF16, "F16", 2},           {DType::kBF16, "BF16", 2},
    {DType::kI32, "I32", 4},           {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},           {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},           {DType::kF64, "F64", 8},
    {DType::kC64, "C64", 8},
};
constexpr std::size_t kNumDTypes = sizeof(kDTypes) / sizeof(kDTypes[0]);

constexpr bool in_enum_order() {
  for (std::size_t i = 0; i < kNumDTypes; ++i)
    if (static_cast<std::size_t>(kDTypes[i].dtype) != i) return false;
  return true;
}
static_assert(in_enum_order() && kNumDTypes == static_cast<std::size_t>(DType::kC64) + 1,
              "kDTypes lists every DType in enum order");

const DTypeInfo* dtype_info(DType d) {
  const auto i = static_cast<std::size_t>(d);
  return i < kNumDTypes ? &kDTypes[i] : nullptr;
}

bool dtype_from_name(const std::string& name, DType* out) {
  for (const DTypeInfo& d : kDTypes)
    if (name == d.name) {
      *out = d.dtype;
      return true;
    }
  return false;
}

// The format's sub-byte dtypes: elements packed several to a byte, which byte offsets cannot address one by one.
bool sub_byte_dtype(const std::string& name) { return name == "F4" || name == "F6_E2M3" || name == "F6_E3M2"; }

}  // namespace

std::size_t dtype_size(DType dtype) {
  const DTypeInfo* d = dtype_info(dtype);
  return d ? d->size : 0;
}

const char* dtype_name(DType dtype) {
  const DTypeInfo* d = dtype_info(dtype);
  return d ? d->name : "?";
}

std::int64_t TensorView::numel() const {
  // A zero anywhere first: [10^15, 10^15, 0] is a valid empty shape whose partial products would overflow.
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  std::int64_t n = 1;
  for (const std::int64_t d : shape) n *= d;  // bounded by the file's size when the parser made the view
  return n;
}

// ---------------------------------------------------------------------------------------------------------------
// The safetensors parser

namespace {

// A whole number in [0, max] (JSON numbers are doubles; max stays well below 2^53, so the value is exact).
bool whole(const Json& v, double max) {
  return v.type == Json::kNumber && v.number >= 0 && v.number <= max && v.number == std::floor(v.number);
}

// The one parser behind SafetensorsMap and read_safetensors*: validates a whole file's bytes [bytes, bytes + size)
// and makes views into them. Only the length and the header are read, never a tensor's bytes, so that a mapped
// file's data pages stay untouched. `file` prefixes messages ("" for none). The outputs are written only on success.
Status parse_safetensors(const unsigned char* bytes, std::uint64_t size, const std::string& file,
                         std::map<std::string, TensorView>* views_out,
                         std::map<std::string, std::string>* metadata_out) {
  const auto fail = [&](const std::string& what) { return Status::error(file.empty() ? what : file + ": " + what); };
  if (size < 8) return fail("too short for a safetensors header (" + std::to_string(size) + " bytes)");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > size - 8) return fail("header length " + std::to_string(n) + " runs past the end of the file");
  if (n > kMaxHeaderBytes) return fail("header length " + std::to_string(n) + " is over the 100 MiB limit");
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  Json root;
  Status st = parse_json(header, header + n, &root);  // skips trailing spaces: writers pad the header with them
  if (!st.ok()) return fail(st.message());
  if (root.type != Json::kObject) return fail("the header is not a JSON object");
  const unsigned char* data = bytes + 8 + n;
  const std::uint64_t data_size = size - 8 - n;

  struct Span {
    std::uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  std::map<std::string, TensorView> views;
  std::map<std::string, std::string> metadata;
  bool seen_metadata = false;
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
    const std::string tensor = "tensor " + quoted(tname);
    const Json* dtype = info.find("dtype");
    const Json* shape = info.find("shape");
    const Json* offsets = info.find("data_offsets");
    if (!dtype || dtype->type != Json::kString || !shape || shape->type != Json::kArray || !offsets ||
        offsets->type != Json::kArray || offsets->items.size() != 2)
      return fail("entry " + quoted(tname) + " is malformed");
    TensorView v;
    if (!dtype_from_name(dtype->str, &v.dtype))
      return fail(tensor + ": " +
                  (sub_byte_dtype(dtype->str) ? "dtype " + quoted(dtype->str) + " packs elements below a byte, which "
                                                "is not supported"
                                              : "unsupported dtype " + quoted(dtype->str)));
    const std::uint64_t itemsize = dtype_size(v.dtype);
    if (shape->items.size() > 8) return fail(tensor + ": more than 8 dimensions");
    for (const Json& d : shape->items) {
      if (!whole(d, 1e15)) return fail(tensor + ": bad shape (dimensions are integers >= 0)");
      v.shape.push_back(static_cast<std::int64_t>(d.number));
    }
    // The element count, bounded by the data section at every step: no product can overflow, and a shape that
    // the bytes cannot hold fails here, before anything is allocated.
    const bool empty = std::find(v.shape.begin(), v.shape.end(), 0) != v.shape.end();
    std::uint64_t count = empty ? 0 : 1;
    for (const std::int64_t d : v.shape) {
      if (empty) break;
      const auto dim = static_cast<std::uint64_t>(d);
      if (count > data_size / itemsize / dim)
        return fail(tensor + ": shape larger than the data section (" + std::to_string(data_size) + " bytes)");
      count *= dim;
    }
    std::uint64_t se[2];
    for (int i = 0; i < 2; ++i) {
      if (!whole(offsets->items[i], 1e15)) return fail(tensor + ": bad data_offsets");
      se[i] = static_cast<std::uint64_t>(offsets->items[i].number);
    }
    if (se[0] > se[1] || se[1] > data_size)
      return fail(tensor + ": data_offsets [" + std::to_string(se[0]) + ", " + std::to_string(se[1]) +
                  "] outside the data section (" + std::to_string(data_size) + " bytes)");
    if (se[1] - se[0] != count * itemsize)
      return fail(tensor + ": " + std::to_string(se[1] - se[0]) + " bytes for " + std::to_string(count) +
                  " elements of " + dtype->str);
    spans.push_back({se[0], se[1], &tname});
    v.name = tname;
    v.data = data + se[0];
    v.nbytes = se[1] - se[0];
    v.file = file;
    if (!views.emplace(tname, std::move(v)).second) return fail(tensor + " appears twice");
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      return fail("tensors " + quoted(*spans[i - 1].name) + " and " + quoted(*spans[i].name) + " overlap");
  if (views_out) *views_out = std::move(views);
  if (metadata_out) *metadata_out = std::move(metadata);
  return Status();
}

// The public functions report allocation failures and any other exception as a Status. prefix: "path: " or "".
template <class Fn>
Status no_throw(const std::string& prefix, Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Status::error(prefix + "out of memory reading safetensors data");
  } catch (const std::exception& e) {
    return Status::error(prefix + e.what());
  }
}

std::string prefix_of(const std::string& path) { return path.empty() ? "" : path + ": "; }

// Little-endian loads that work at any alignment and on any host byte order.
std::uint64_t load_le(const unsigned char* p, int n) {
  std::uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

Status tensor_to_float(const TensorView& t, float* out) {
  const std::string where = prefix_of(t.file) + "tensor " + quoted(t.name);
  const DType d = t.dtype;
  if (d != DType::kF32 && d != DType::kF16 && d != DType::kBF16 && d != DType::kF64)
    return Status::error(where + ": unsupported dtype " + quoted(dtype_name(d)) + " for float32 (F32, F16, BF16, F64)");
  const std::uint64_t itemsize = dtype_size(d);
  if (t.nbytes % itemsize || (t.nbytes && !t.data)) return Status::error(where + ": inconsistent view");
  const size_t n = static_cast<size_t>(t.nbytes / itemsize);
  if (!out && n) return Status::error(where + ": null output");
  return no_throw(where + ": ", [&] {
    const unsigned char* p = t.data;
    if ((d == DType::kF16 || d == DType::kBF16)) {  // the one 16-bit conversion (half.h)
      const HalfType ht = d == DType::kF16 ? HalfType::kF16 : HalfType::kBF16;
      if (reinterpret_cast<std::uintptr_t>(p) % 2 == 0) {
        half_to_float_n(out, reinterpret_cast<const std::uint16_t*>(p), static_cast<index_t>(n), ht);
      } else {
        for (size_t i = 0; i < n; ++i, p += 2) out[i] = half_to_float(static_cast<std::uint16_t>(load_le(p, 2)), ht);
      }
      return Status();
    }
    for (size_t i = 0; i < n; ++i, p += itemsize) {
      if (d == DType::kF64) {
        const std::uint64_t bits = load_le(p, 8);
        double x;
        std::memcpy(&x, &bits, 8);
        out[i] = static_cast<float>(x);
      } else {  // F32
        const auto bits = static_cast<std::uint32_t>(load_le(p, 4));
        std::memcpy(&out[i], &bits, 4);
      }
    }
    return Status();
  });
}

Status tensor_to_float(const TensorView& t, std::vector<float>* out) {
  if (!out) return Status::error(prefix_of(t.file) + "tensor " + quoted(t.name) + ": null output");
  const std::uint64_t itemsize = dtype_size(t.dtype);
  std::vector<float> v(itemsize ? static_cast<size_t>(t.nbytes / itemsize) : 0);
  Status st = tensor_to_float(t, v.data());
  if (st.ok()) *out = std::move(v);
  return st;
}

// ---------------------------------------------------------------------------------------------------------------
// SafetensorsMap

struct SafetensorsMap::File {
  std::string path;
  const unsigned char* bytes = nullptr;
  std::uint64_t size = 0;
  std::vector<unsigned char> copy;  // the bytes when they are not mapped: a buffer, or a file mmap refused
  void* mapping = nullptr;
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
#ifndef _WIN32
    if (mapping) munmap(mapping, static_cast<size_t>(size));
#endif
  }
};

SafetensorsMap::SafetensorsMap() = default;
SafetensorsMap::~SafetensorsMap() = default;

const TensorView* SafetensorsMap::find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

// Builds maps; a friend of SafetensorsMap, so that File stays out of the public header.
class SafetensorsLoader {
 public:
  using File = SafetensorsMap::File;
  struct Parsed {
    std::unique_ptr<File> file;
    std::map<std::string, TensorView> views;
    std::map<std::string, std::string> metadata;
  };

  static std::unique_ptr<SafetensorsMap> make() { return std::unique_ptr<SafetensorsMap>(new SafetensorsMap()); }

  // Moves a parsed file into the map. Tensor names are unique across files (open_directory checks before).
  static void add(SafetensorsMap* m, Parsed&& p) {
    m->mapped_bytes_ += p.file->size;
    for (auto& [name, v] : p.views) m->tensors_.emplace(name, std::move(v));
    for (auto& [k, v] : p.metadata) m->metadata_.emplace(k, std::move(v));  // an earlier file wins a clash
    m->files_.push_back(std::move(p.file));
  }

  static Status parse(std::unique_ptr<File> file, Parsed* out) {
    Status st = parse_safetensors(file->bytes, file->size, file->path, &out->views, &out->metadata);
    if (st.ok()) out->file = std::move(file);
    return st;
  }

  // The whole file in memory: where mmap is unavailable or refuses the file.
  static Status read_whole(const std::string& path, File* f) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) {
      std::error_code ec;
      const std::string msg = path + ": cannot open the file";
      return std::filesystem::exists(path, ec) ? Status::error(msg) : Status::not_found(msg);
    }
    const std::streamoff size = in.tellg();
    if (size < 0 || static_cast<std::uint64_t>(size) > SIZE_MAX) return Status::error(path + ": cannot size the file");
    f->copy.resize(static_cast<size_t>(size));
    in.seekg(0);
    if (size > 0 && !in.read(reinterpret_cast<char*>(f->copy.data()), size))
      return Status::error(path + ": cannot read the file");
    f->bytes = f->copy.data();
    f->size = static_cast<std::uint64_t>(size);
    return Status();
  }

  // Maps the file read-only (MAP_PRIVATE: this process never sees a copy-on-write page, since it never writes).
  static Status load(const std::string& path, std::unique_ptr<File>* out) {
    if (path.find('\0') != std::string::npos) return Status::error(quoted(path) + ": a path with a NUL byte");
    auto f = std::make_unique<File>();
    f->path = path;
#ifdef _WIN32
    Status st = read_whole(path, f.get());
    if (!st.ok()) return st;
#else
    // O_NONBLOCK: opening a FIFO would otherwise wait for a writer (anything but a regular file is refused below).
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      const int e = errno;
      const std::string msg = path + ": cannot open the file (" + std::generic_category().message(e) + ")";
      return e == ENOENT || e == ENOTDIR ? Status::not_found(msg) : Status::error(msg);
    }
    struct stat info {};
    const bool stat_ok = fstat(fd, &info) == 0;
    if (!stat_ok || !S_ISREG(info.st_mode)) {
      ::close(fd);
      return Status::error(path + (!stat_ok ? ": cannot stat the file"
                                   : S_ISDIR(info.st_mode) ? ": is a directory, not a file" : ": not a regular file"));
    }
    const auto size = static_cast<std::uint64_t>(info.st_size);
    if (size > 0 && size <= SIZE_MAX) {
      void* p = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (p != MAP_FAILED) {
        f->mapping = p;
        f->bytes = static_cast<const unsigned char*>(p);
        f->size = size;
      }
    }
    ::close(fd);  // the mapping keeps the file
    if (size > 0 && !f->mapping) {
      Status st = read_whole(path, f.get());
      if (!st.ok()) return st;
    }
#endif
    *out = std::move(f);
    return Status();
  }

  static Status open_file(const std::string& path, std::unique_ptr<SafetensorsMap>* out) {
    std::unique_ptr<File> file;
    Status st = load(path, &file);
    Parsed p;
    if (st.ok()) st = parse(std::move(file), &p);
    if (!st.ok()) return st;
    auto m = make();
    add(m.get(), std::move(p));
    *out = std::move(m);
    return Status();
  }

  // A shard named by an index: one file directly inside the directory, never a path out of it.
  static bool plain_file_name(const std::string& s) {
    if (s.empty() || s == "." || s == "..") return false;
    for (const char c : s)
      if (c == '/' || c == '\\' || c == '\0') return false;
#ifdef _WIN32
    if (s.find(':') != std::string::npos) return false;  // "C:x" is relative to a drive
#endif
    return true;
  }

  static Status open_directory(const std::string& dir, std::unique_ptr<SafetensorsMap>* out) {
    namespace fs = std::filesystem;
    if (dir.find('\0') != std::string::npos) return Status::error(quoted(dir) + ": a path with a NUL byte");
    std::error_code ec;
    const fs::path d(dir);
    if (!fs::is_directory(d, ec))
      return fs::exists(d, ec) ? Status::error(dir + ": not a directory")
                               : Status::not_found(dir + ": no such directory");
    const std::string single = (d / "model.safetensors").string();
    if (fs::exists(single, ec)) return open_file(single, out);
    const std::string index = (d / "model.safetensors.index.json").string();
    if (!fs::exists(index, ec))
      return Status::not_found(dir + ": no model.safetensors or model.safetensors.index.json");
    const auto fail = [&](const std::string& what) { return Status::error(index + ": " + what); };

    const std::uintmax_t index_size = fs::file_size(index, ec);
    if (!ec && index_size > kMaxHeaderBytes) return fail("over the 100 MiB limit");
    File text;
    Status st = read_whole(index, &text);
    if (!st.ok()) return st;
    if (text.size > kMaxHeaderBytes) return fail("over the 100 MiB limit");  // (it grew meanwhile)
    Json root;
    const char* begin = reinterpret_cast<const char*>(text.bytes);
    st = parse_json(begin, begin + text.size, &root);
    if (!st.ok()) return fail(st.message());
    if (root.type != Json::kObject) return fail("not a JSON object");
    const Json* meta = root.find("metadata");
    if (meta && meta->type != Json::kObject && meta->type != Json::kNull) return fail("'metadata' must be an object");
    const Json* weight_map = root.find("weight_map");
    if (!weight_map || weight_map->type != Json::kObject)
      return fail("'weight_map' must be an object {tensor name: shard file}");
    std::map<std::string, std::string> shard_of;
    for (const auto& [tensor, shard] : weight_map->members) {
      if (shard.type != Json::kString) return fail("weight_map: tensor " + quoted(tensor) + " must map to a file name");
      if (!plain_file_name(shard.str))
        return fail("weight_map: shard " + quoted(shard.str) + " (of tensor " + quoted(tensor) +
                    ") is not a plain file name inside the directory");
      if (!shard_of.emplace(tensor, shard.str).second)
        return fail("weight_map: tensor " + quoted(tensor) + " appears twice");
    }
    std::set<std::string> shards;
    for (const auto& [tensor, shard] : shard_of) shards.insert(shard);

    auto m = make();
    for (const std::string& shard : shards) {
      const std::string path = (d / shard).string();
      if (!fs::exists(path, ec))
        return Status::not_found(index + ": shard " + quoted(shard) + " does not exist (" + path + ")");
      std::unique_ptr<File> file;
      Parsed p;
      st = load(path, &file);
      if (st.ok()) st = parse(std::move(file), &p);
      if (!st.ok()) return st;
      // Each tensor of a shard must be mapped to it: so none is in two shards, and none is silently dropped.
      for (const auto& [tensor, view] : p.views) {
        const auto it = shard_of.find(tensor);
        if (it == shard_of.end())
          return fail("shards disagree with the index: tensor " + quoted(tensor) + " is in shard " + quoted(shard) +
                      " but not in the weight_map");
        if (it->second != shard)
          return fail("shards disagree with the index: tensor " + quoted(tensor) + " is in shard " + quoted(shard) +
                      " but the index maps it to " + cpuformer::quoted(it->second));
      }
      add(m.get(), std::move(p));
    }
    for (const auto& [tensor, shard] : shard_of)
      if (!m->find(tensor)) return fail("tensor " + quoted(tensor) + " is not in its shard " + quoted(shard));
    *out = std::move(m);
    return Status();
  }

  static Status open_buffer(const void* data, std::size_t size, std::unique_ptr<SafetensorsMap>* out) {
    if (!data && size) return Status::error("null buffer");
    auto file = std::make_unique<File>();
    const auto* b = static_cast<const unsigned char*>(data);
    file->copy.assign(b, b + size);
    file->bytes = file->copy.data();
    file->size = size;
    Parsed p;
    Status st = parse(std::move(file), &p);
    if (!st.ok()) return st;
    auto m = make();
    add(m.get(), std::move(p));
    *out = std::move(m);
    return Status();
  }
};

Status SafetensorsMap::open_file(const std::string& path, std::unique_ptr<SafetensorsMap>* out) {
  if (!out) return Status::error(path + ": null output");
  out->reset();
  return no_throw(prefix_of(path), [&] { return SafetensorsLoader::open_file(path, out); });
}

Status SafetensorsMap::open_directory(const std::string& dir, std::unique_ptr<SafetensorsMap>* out) {
  if (!out) return Status::error(dir + ": null output");
  out->reset();
  return no_throw(prefix_of(dir), [&] { return SafetensorsLoader::open_directory(dir, out); });
}

Status SafetensorsMap::open_buffer(const void* data, std::size_t size, std::unique_ptr<SafetensorsMap>* out) {
  if (!out) return Status::error("null output");
  out->reset();
  return no_throw("", [&] { return SafetensorsLoader::open_buffer(data, size, out); });
}

// ---------------------------------------------------------------------------------------------------------------
// The float32 readers (model.h), over the same parser

namespace {

Status to_float_tensors(const std::map<std::string, TensorView>& views, std::map<std::string, Tensor>* out) {
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, v] : views) {
    Tensor t;
    t.shape = v.shape;
    Status st = tensor_to_float(v, &t.data);
    if (!st.ok()) return st;
    tensors.emplace(name, std::move(t));
  }
  if (out) *out = std::move(tensors);
  return Status();
}

}  // namespace

Status read_safetensors(const std::string& path, std::map<std::string, Tensor>* tensors,
                        std::map<std::string, std::string>* metadata) {
  return no_throw(path + ": ", [&] {
    std::unique_ptr<SafetensorsMap> map;
    Status st = SafetensorsMap::open_file(path, &map);
    if (st.ok()) st = to_float_tensors(map->tensors(), tensors);
    if (st.ok() && metadata) *metadata = map->metadata();
    return st;
  });
}

Status read_safetensors_buffer(const void* data, size_t size, std::map<std::string, Tensor>* tensors,
                               std::map<std::string, std::string>* metadata) {
  return no_throw("", [&] {
    if (!data && size) return Status::error("null buffer");
    // Views straight into the caller's buffer: it is only read during this call.
    std::map<std::string, TensorView> views;
    std::map<std::string, std::string> meta;
    Status st = parse_safetensors(static_cast<const unsigned char*>(data), size, "", &views, &meta);
    if (st.ok()) st = to_float_tensors(views, tensors);
    if (st.ok() && metadata) *metadata = std::move(meta);
    return st;
  });
}

}  // namespace cpuformer
