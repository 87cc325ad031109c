// pretrained.cpp: Hugging Face model directories (config.json + safetensors) assembled from the core's Transformer
// block, as transformers computes each family (see ../shared/design/models.md for the facts this follows).
//
// Loading maps the weight files (safetensors.h) and points the block's LinearRefs at the tensors where they lie:
// float32 in place, float16/bfloat16 as 16-bit LinearRefs (converted inside the product, half.h), everything small
// converted once. Each family is described by the same few pieces: embeddings (word, positions of one of a few
// kinds, token types, scale, norm), a stack of blocks, a final norm, and a head program (linear / activation /
// norm steps). Forward passes, generation and beam search are written once over those pieces.
#include "cpuformer/pretrained.h"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <fstream>
#include <limits>
#include <new>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include "cpuformer/activations.h"
#include "cpuformer/block.h"
#include "cpuformer/embedding.h"
#include "cpuformer/half.h"
#include "cpuformer/layernorm.h"
#include "cpuformer/linear.h"
#include "cpuformer/matmul.h"
#include "cpuformer/quantize.h"
#include "cpuformer/safetensors.h"
#include "cpuformer/softmax.h"
#include "json.h"
#include "no_throw.h"
#include "parallel.h"
#include "sampling.h"

namespace cpuformer {
namespace {

constexpr std::int64_t kMaxSize = std::int64_t{1} << 30;

Status read_text(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::error(path + ": cannot open the file");
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  if (out->size() > (std::size_t{64} << 20)) return Status::error(path + ": larger than 64 MiB");
  return Status();
}

bool file_exists(const std::string& path) { return static_cast<bool>(std::ifstream(path)); }

// config.json values: absent or null keys take the family's default; present keys must have the right type and
// range. The first problem is kept in `status` and names the file and key.
class HFConfig {
 public:
  HFConfig(const Json& j, std::string path) : j_(j), path_(std::move(path)) {}
  Status status;
  std::int64_t forced_labels = 0;  // PretrainedOptions::num_labels: the label count of a new task head

  const Json* get(const std::string& key) const {
    const Json* v = j_.find(key);
    return v && v->type != Json::kNull ? v : nullptr;
  }
  bool has(const std::string& key) const { return get(key) != nullptr; }
  bool written(const std::string& key) const { return j_.find(key) != nullptr; }  // present, null included
  // An integer in [lo, hi]; `fallback` when absent (a fallback < lo makes the key required).
  std::int64_t integer(const std::string& key, std::int64_t fallback, std::int64_t lo = 1,
                       std::int64_t hi = kMaxSize) {
    const Json* v = get(key);
    if (!v) {
      if (fallback < lo) error("'" + key + "' is required");
      return fallback;
    }
    if (v->type != Json::kNumber || v->number != std::floor(v->number) || v->number < static_cast<double>(lo) ||
        v->number > static_cast<double>(hi)) {
      error("'" + key + "' must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
      return std::max(lo, fallback);
    }
    return static_cast<std::int64_t>(v->number);
  }
  // The first present key of several aliases (GPT-2's n_embd for hidden_size, ...).
  std::int64_t integer(std::initializer_list<const char*> keys, std::int64_t fallback, std::int64_t lo = 1,
                       std::int64_t hi = kMaxSize) {
    for (const char* k : keys)
      if (has(k)) return integer(k, fallback, lo, hi);
    return integer(*keys.begin(), fallback, lo, hi);
  }
  double real(const std::string& key, double fallback, double lo, double hi) {
    const Json* v = get(key);
    if (!v) return fallback;
    if (v->type != Json::kNumber || !(v->number >= lo && v->number <= hi)) {
      error("'" + key + "' must be a number in [" + num(lo) + ", " + num(hi) + "]");
      return fallback;
    }
    return v->number;
  }
  bool flag(const std::string& key, bool fallback) {
    const Json* v = get(key);
    if (!v) return fallback;
    if (v->type != Json::kBool) error("'" + key + "' must be true or false");
    return v->boolean;
  }
  std::string str(const std::string& key, const std::string& fallback) {
    const Json* v = get(key);
    if (!v) return fallback;
    if (v->type != Json::kString) error("'" + key + "' must be a string");
    return v->str;
  }
  // A token id or a list of them (eos_token_id); empty when absent.
  std::vector<std::int64_t> ids(const std::string& key) {
    std::vector<std::int64_t> out;
    const Json* v = get(key);
    if (!v) return out;
    const auto one = [&](const Json& x) {
      if (x.type != Json::kNumber || x.number != std::floor(x.number) || x.number < 0 || x.number > 1e12)
        error("'" + key + "' must be a token id or a list of them");
      else
        out.push_back(static_cast<std::int64_t>(x.number));
    };
    if (v->type == Json::kArray)
      for (const Json& x : v->items) one(x);
    else
      one(*v);
    return out;
  }
  void error(const std::string& what) {
    if (status.ok()) status = Status::error(path_ + ": " + what);
  }
  const std::string& path() const { return path_; }

 private:
  static std::string num(double x) {
    std::ostringstream s;
    s << x;
    return s.str();
  }
  const Json& j_;
  std::string path_;
};

Activation activation_of(HFConfig& cfg, const std::string& key, const std::string& fallback) {
  const std::string a = cfg.str(key, fallback);
  if (a == "gelu") return Activation::kGeluErf;
  if (a == "gelu_new" || a == "gelu_pytorch_tanh" || a == "gelu_python_tanh" || a == "gelu_fast")
    return Activation::kGeluTanh;
  if (a == "relu") return Activation::kRelu;
  if (a == "silu" || a == "swish") return Activation::kSilu;
  cfg.error("'" + key + "' = " + quoted(a) + " is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)");
  return Activation::kGeluErf;
}

// An embedding-like matrix (rows, cols) in float32 or 16 bits.
struct Table {
  const float* f = nullptr;
  const std::uint16_t* h = nullptr;
  HalfType ht = HalfType::kBF16;
  index_t rows = 0, cols = 0;
  bool present() const { return f || h; }
  void gather(float* out, const std::int64_t* ids, index_t n) const {
    if (f)
      embedding_forward(out, ids, f, n, rows, cols);
    else
      embedding_forward_half(out, ids, h, ht, n, rows, cols);
  }
  LinearRef as_linear() const {  // rows = outputs (a tied LM head)
    LinearRef l;
    l.in = cols, l.out = rows, l.weight = f, l.half = h, l.half_type = ht;
    return l;
  }
};

struct Norm {
  bool present = false;
  NormKind kind = NormKind::kLayerNorm;
  NormRef ref;
  float eps = 1e-5f;
  bool one_plus = false;
  void apply(float* out, const float* in, index_t rows, index_t C) const {
    if (!present) {
      if (out != in) std::memcpy(out, in, sizeof(float) * static_cast<size_t>(rows * C));
      return;
    }
    if (kind == NormKind::kLayerNorm)
      layernorm_forward(out, nullptr, nullptr, in, ref.weight, ref.bias, rows, C, eps);
    else
      rmsnorm_forward(out, nullptr, in, ref.weight, rows, C, eps, one_plus);
  }
};

// A float32 copy the loader owns. Large ones are mapped straight from the kernel: their pages come zeroed on first
// touch, which the conversion itself makes on the kernel threads, and go back whole when the copy is dropped (a
// packed or int8 load drops each one once prepared: freed heap blocks had stayed resident, up to 1 GB of them). A
// zero-filled std::vector faulted every page on one thread before the conversion wrote it again: converting a
// 0.5B-parameter bf16 checkpoint to float32 took 0.96-1.04 s, now 0.45-0.51 (3 interleaved runs). (Transparent
// huge pages on request, MADV_HUGEPAGE, measured 0.3 s at best but 1.0-3.5 s in half the runs: compaction stalls.)
class FloatBuffer {
 public:
  FloatBuffer(size_t n, bool zero) : n_(n), bytes_(std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64)) {
#if defined(__unix__) || defined(__APPLE__)
    if (bytes_ >= (size_t(1) << 20)) {
      void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      p_ = static_cast<float*>(p), mapped_ = true;  // zero pages
      return;
    }
#endif
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes_));
    if (!p_) throw std::bad_alloc();
    if (zero) std::fill(p_, p_ + n, 0.0f);
  }
  FloatBuffer(FloatBuffer&& o) noexcept : p_(o.p_), n_(o.n_), bytes_(o.bytes_), mapped_(o.mapped_) {
    o.p_ = nullptr, o.n_ = 0;
  }
  FloatBuffer(const FloatBuffer&) = delete;
  FloatBuffer& operator=(const FloatBuffer&) = delete;
  FloatBuffer& operator=(FloatBuffer&&) = delete;
  ~FloatBuffer() {
#if defined(__unix__) || defined(__APPLE__)
    if (mapped_) {
      if (p_) munmap(p_, bytes_);
      return;
    }
#endif
    std::free(p_);
  }
  float* data() { return p_; }
  const float* data() const { return p_; }
  size_t size() const { return n_; }
  float* begin() { return p_; }
  float* end() { return p_ + n_; }

 private:
  float* p_ = nullptr;
  size_t n_ = 0, bytes_ = 0;
  bool mapped_ = false;
};

// The weight files of a directory plus what loading converted or prepared. Lookups follow transformers' prefix
// rule (`prefix` + name, or the name alone) and its legacy LayerNorm gamma/beta names; the first problem is kept in
// `status`, naming the tensor and its file.
class Checkpoint {
 public:
  std::unique_ptr<SafetensorsMap> map;
  std::string prefix;  // "bert.", "model.", ...
  std::string where;   // the weight file (or the index) for messages
  PretrainedOptions opt;
  Status status;
  std::deque<FloatBuffer> owned_f;
  std::deque<std::vector<std::uint16_t>> owned_h;
  std::deque<PackedMatrix> packed;
  std::deque<Int8Weight> int8;
  bool amx_tiles = true;  // packed weights may keep AMX tiles (sgemm_pack_b): not a decoder's, see load_decoder

  const TensorView* lookup(const std::string& name) const {
    for (const std::string& n : {prefix + name, name}) {
      if (const TensorView* t = map->find(n)) return t;
      const auto legacy = [&](const char* from, const char* to) -> const TensorView* {
        const std::size_t len = std::strlen(from);
        if (n.size() > len && n.compare(n.size() - len, len, from) == 0)
          return map->find(n.substr(0, n.size() - len) + to);
        return nullptr;
      };
      if (const TensorView* t = legacy(".weight", ".gamma")) return t;
      if (const TensorView* t = legacy(".bias", ".beta")) return t;
    }
    return nullptr;
  }
  bool has(const std::string& name) const { return lookup(name) != nullptr; }

  const TensorView* find(const std::string& name, const std::vector<std::int64_t>& shape, bool optional) {
    if (!status.ok()) return nullptr;
    const TensorView* t = lookup(name);
    if (!t)  // a head weight created by an earlier request for it
      for (const TensorView& v : fresh_views)
        if (v.name == name) t = &v;
    if (!t && !optional && fresh_allowed(name)) t = fresh(name, shape);
    if (!t) {
      if (!optional)
        status = Status::error(where + ": no tensor '" + prefix + name + "'" + (prefix.empty() ? "" : " (nor '" + name + "')") +
                               ", which config.json implies");
      return nullptr;
    }
    if (t->shape != shape) {
      status = Status::error(t->file + ": tensor '" + t->name + "' has shape " + shape_str(t->shape) +
                             " but config.json implies " + shape_str(shape));
      return nullptr;
    }
    if (t->dtype != DType::kF32 && t->dtype != DType::kF16 && t->dtype != DType::kBF16) {
      status = Status::error(t->file + ": tensor '" + t->name + "' has dtype " + dtype_name(t->dtype) +
                             " (F32, F16 or BF16 expected)");
      return nullptr;
    }
    return t;
  }

  // A task head the checkpoint lacks (from_pretrained(dir, task=...)): created as transformers initialises it,
  // weights ~ N(0, init_std), biases zero, and reported in `created`.
  std::vector<std::string> fresh_prefixes;
  double init_std = 0.02;
  std::uint64_t init_seed = 0;
  std::vector<std::string> created;
  std::deque<TensorView> fresh_views;
  bool fresh_allowed(const std::string& name) const {
    for (const std::string& p : fresh_prefixes)
      if (name.compare(0, p.size(), p) == 0) return true;
    return false;
  }
  const TensorView* fresh(const std::string& name, const std::vector<std::int64_t>& shape) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    owned_f.emplace_back(static_cast<size_t>(n), true);
    FloatBuffer& v = owned_f.back();
    const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    if (!bias) {
      std::mt19937_64 rng(init_seed + created.size());
      std::normal_distribution<double> normal(0.0, init_std);
      for (float& x : v) x = static_cast<float>(normal(rng));
    }
    TensorView t;
    t.name = name, t.dtype = DType::kF32, t.shape = shape;
    t.data = reinterpret_cast<const unsigned char*>(v.data()), t.nbytes = static_cast<std::uint64_t>(n) * 4;
    t.file = "(new)";
    fresh_views.push_back(t);
    created.push_back(name);
    return &fresh_views.back();
  }
  bool is_fresh(const std::string& name) const { return std::find(created.begin(), created.end(), name) != created.end(); }
  std::map<const void*, std::string> names;  // every weight pointer handed out -> its tensor name (LoRA targets)

  // float32 values: the mapped tensor itself when it is aligned float32, else a converted copy.
  // Trainable models copy every tensor once (by its name in the file) into a writable parameter.
  const float* floats(const std::string& name, const std::vector<std::int64_t>& shape, bool optional = false) {
    const TensorView* t = find(name, shape, optional);
    if (!t) return nullptr;
    const bool fresh_head = is_fresh(t->name);  // new heads are always trainable parameters
    if (!opt.trainable && !fresh_head && t->dtype == DType::kF32 &&
        reinterpret_cast<std::uintptr_t>(t->data) % alignof(float) == 0) {
      names[t->data] = t->name;
      return reinterpret_cast<const float*>(t->data);
    }
    if (auto it = converted.find(t->name); it != converted.end()) return it->second;
    float* f = convert(*t);
    converted[t->name] = f;
    names[f] = t->name;
    if (opt.trainable || fresh_head) params.push_back({t->name, t->shape, f});
    return f;
  }
  struct Param {
    std::string name;
    std::vector<std::int64_t> shape;
    float* data;
  };
  std::vector<Param> params;                 // trainable models: every tensor used, in load order
  std::map<std::string, float*> converted;   // tensor name -> its float32 copy
  Table table(const std::string& name, std::int64_t rows, std::int64_t cols, bool optional = false) {
    Table tb;
    tb.rows = rows, tb.cols = cols;
    const TensorView* t = find(name, {rows, cols}, optional);
    if (!t) return tb;
    // A 16-bit table stays 16-bit for its lookups (exact conversions of the rows read) unless float32 was asked
    // for or it is trained, whatever form the Linear weights take (a tied int8/packed head: tied()).
    if ((t->dtype == DType::kF16 || t->dtype == DType::kBF16) && opt.dtype == PretrainedOptions::kAuto &&
        !opt.trainable) {
      tb.h = half_data(*t), tb.ht = t->dtype == DType::kF16 ? HalfType::kF16 : HalfType::kBF16;
      if (reinterpret_cast<const void*>(tb.h) == t->data) mapped_tables[tb.h] = t;
    } else {
      tb.f = floats(name, {rows, cols});
    }
    return tb;
  }
  // A Linear layer: `wname` (out, in) (or (in, out) for GPT-2's Conv1D) and the optional bias `bname`.
  LinearRef linear(const std::string& wname, const std::string& bname, std::int64_t out, std::int64_t in,
                   bool in_out = false, bool bias_required = false) {
    LinearRef l;
    l.in = in, l.out = out, l.in_out = in_out;
    const TensorView* t = find(wname, in_out ? std::vector<std::int64_t>{in, out} : std::vector<std::int64_t>{out, in},
                               false);
    // a new head's Linear gets a new (zero) bias, as transformers' nn.Linear has one
    if (!bname.empty()) l.bias = floats(bname, {out}, !bias_required && !(t && is_fresh(t->name)));
    if (!t) return l;
    if (keeps_half(*t)) {
      l.half = half_data(*t), l.half_type = t->dtype == DType::kF16 ? HalfType::kF16 : HalfType::kBF16;
      l.bf16_activations = opt.bf16_activations;
      ++half_linears;
      names[l.half] = t->name;
      return l;
    }
    if (opt.weights == LoadOptions::kInt8 && !opt.trainable && !in_out && !is_fresh(t->name) &&
        (t->dtype == DType::kF16 || t->dtype == DType::kBF16)) {
      // int8 from 16-bit weights: rows converted a block at a time (in L2) straight into the quantizer, never a
      // float copy of the whole weight (its allocation, zeroing and page faults were a third of an int8 load)
      const std::uint16_t* h = half_data(*t);
      const HalfType ht = t->dtype == DType::kF16 ? HalfType::kF16 : HalfType::kBF16;
      int8.push_back(quantize_weight_int8_blocked(
          out, in,
          [&](index_t r0, index_t r1, float* rows) {
            half_to_float_n(rows, h + r0 * in, (r1 - r0) * in, ht);
            release_pages(*t, r0 * in * 2, (r1 - r0) * in * 2);
          },
          std::max<index_t>(1, (index_t(1) << 18) / in)));
      l.int8 = &int8.back();
      return l;
    }
    l.weight = floats(wname, in_out ? std::vector<std::int64_t>{in, out} : std::vector<std::int64_t>{out, in});
    return prepare(l);
  }
  // A Linear over a table's rows (a tied head), prepared like the others.
  // An int8 or packed head over a 16-bit table is prepared from a float copy of it, dropped once prepared (with
  // the table's mapped pages the conversion read: lookups touch only their rows).
  LinearRef tied(const Table& tb) {
    if (!tb.h) return prepare(tb.as_linear());
    if (opt.weights == LoadOptions::kFloat32 || opt.trainable) {
      LinearRef l = tb.as_linear();
      l.bf16_activations = opt.bf16_activations;
      ++half_linears;
      return l;
    }
    const auto mapped = mapped_tables.find(tb.h);
    const auto release = [&](index_t r0, index_t r1) {
      if (mapped != mapped_tables.end()) release_range(tb.h + r0 * tb.cols, (r1 - r0) * tb.cols * 2);
    };
    LinearRef l = tb.as_linear();
    l.half = nullptr;
    if (opt.weights == LoadOptions::kInt8) {  // a block of rows at a time: no float copy of the whole table
      int8.push_back(quantize_weight_int8_blocked(tb.rows, tb.cols, [&](index_t r0, index_t r1, float* out) {
        half_to_float_n(out, tb.h + r0 * tb.cols, (r1 - r0) * tb.cols, tb.ht);
        release(r0, r1);
      }));
      l.int8 = &int8.back();
      return l;
    }
    std::vector<float> f(static_cast<size_t>(tb.rows * tb.cols));
    half_to_float_n(f.data(), tb.h, tb.rows * tb.cols, tb.ht);
    release(0, tb.rows);
    l.weight = f.data();
    l = prepare(l);
    l.weight = nullptr;  // only the prepared form serves the head
    return l;
  }
  std::map<const std::uint16_t*, const TensorView*> mapped_tables;  // 16-bit tables read in place
  std::int64_t half_linears = 0;  // Linear layers (heads included) whose weights stay 16-bit

  std::uint64_t owned_bytes() const {
    std::uint64_t n = 0;
    for (const auto& v : owned_f) n += v.size() * sizeof(float);
    for (const auto& v : owned_h) n += v.size() * 2;
    for (const auto& p : packed) n += static_cast<std::uint64_t>(p.size) * sizeof(float);
    for (const auto& q : int8) n += q.packed.size() + (q.scale.size() + q.col_sum.size()) * 4;
    return n;
  }

 private:
  static std::string shape_str(const std::vector<std::int64_t>& s) {
    std::string r = "(";
    for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + (s.size() == 1 ? ",)" : ")");
  }
  bool keeps_half(const TensorView& t) const {
    return (t.dtype == DType::kF16 || t.dtype == DType::kBF16) && opt.dtype == PretrainedOptions::kAuto &&
           opt.weights == LoadOptions::kFloat32 && !opt.trainable;
  }
  const std::uint16_t* half_data(const TensorView& t) {
    if (reinterpret_cast<std::uintptr_t>(t.data) % 2 == 0) return reinterpret_cast<const std::uint16_t*>(t.data);
    owned_h.emplace_back(static_cast<size_t>(t.numel()));  // an unaligned tensor (old writers): copied
    std::memcpy(owned_h.back().data(), t.data, static_cast<size_t>(t.nbytes));
    return owned_h.back().data();
  }
  float* convert(const TensorView& t) {
    const std::size_t item = dtype_size(t.dtype);
    owned_f.emplace_back(item ? static_cast<size_t>(t.nbytes / item) : 0, false);
    Status st = tensor_to_float(t, owned_f.back().data());
    if (!st.ok() && status.ok()) status = st;
    release_pages(t);
    return owned_f.back().data();
  }
  // A converted tensor's mapped pages are not read again: let the kernel drop them from this process's resident
  // set now (they stay in the page cache), so converting at load does not hold the file and its copy at once.
  // (Or bytes [offset, offset + nbytes) of it.)
  static void release_pages(const TensorView& t, std::int64_t offset = 0, std::int64_t nbytes = -1) {
    if (t.file != "(new)") release_range(t.data + offset, nbytes < 0 ? static_cast<std::int64_t>(t.nbytes) : nbytes);
  }
  // Only for memory mapped from a file (MADV_DONTNEED would zero anonymous memory).
  static void release_range(const void* data, std::int64_t nbytes) {
#if defined(__unix__) || defined(__APPLE__)
    static const std::uintptr_t page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<std::uintptr_t>(data), end = begin + static_cast<std::uintptr_t>(nbytes);
    const std::uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;  // whole pages only
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
#else
    (void)data, (void)nbytes;
#endif
  }
  LinearRef prepare(LinearRef l) {
    if (!l.weight || opt.weights == LoadOptions::kFloat32 || opt.trainable) return l;
    if (auto it = names.find(l.weight); it != names.end() && is_fresh(it->second)) return l;  // a new, trainable head
    std::vector<float> transposed;
    const float* w = l.weight;
    if (l.in_out) {  // the prepared forms take (out, in)
      transposed.resize(static_cast<size_t>(l.in * l.out));
      for (index_t i = 0; i < l.in; ++i)
        for (index_t o = 0; o < l.out; ++o) transposed[o * l.in + i] = w[i * l.out + o];
      w = transposed.data();
    }
    if (opt.weights == LoadOptions::kPacked) {
      packed.push_back(sgemm_pack_b(true, l.in, l.out, w, l.in, amx_tiles));
      l.packed = &packed.back();
    } else {
      int8.push_back(quantize_weight_int8(w, l.out, l.in, l.in));
      l.int8 = &int8.back();
    }
    // A converted copy is no longer needed: the prepared form serves every product.
    if (!owned_f.empty() && l.weight == owned_f.back().data()) {
      for (auto it = converted.begin(); it != converted.end(); ++it)
        if (it->second == l.weight) {
          converted.erase(it);
          break;
        }
      owned_f.pop_back();
      l.weight = nullptr;
    }
    l.in_out = false;
    if (!l.weight) return l;
    if (transposed.size()) l.weight = nullptr;  // the (in, out) original cannot serve the (out, in) fallback
    return l;
  }
};

struct Layer {
  BlockConfig cfg;
  BlockWeights w;
};

// One step of a head: y = linear(x), act(x), tanh(x) or norm(x), over rows of the current width.
struct HeadOp {
  enum Kind { kLinear, kAct, kTanh, kNorm } kind = kLinear;
  LinearRef lin;
  Activation act = Activation::kIdentity;
  Norm norm;
};

enum class Positions {
  kNone,      // rotary / relative bias inside the blocks (or nothing)
  kArange,    // learned table row offset + t (BERT, GPT-2, BART (offset 2), ViT)
  kPadding,   // RoBERTa / MPNet: pad + cumulative count of non-pad ids, pad for pad tokens
  kSinusoid,  // Marian: a fixed table of sin | cos halves
};

// Embeddings and a stack of blocks: an encoder, a decoder, or one side of an encoder-decoder.
struct Stack {
  Table word;
  float embed_scale = 1.0f;
  Positions positions = Positions::kNone;
  Table position;  // kArange / kPadding
  std::vector<float> sinusoid;
  std::int64_t position_offset = 0, pad = 0, max_positions = 0;
  Table token_type;
  Norm embed_norm;
  std::vector<Layer> layers;
  Norm final_norm;
  index_t C = 0;
  // Training: rows of the tables that get no gradient (transformers' padding_idx; -1: none), and the dropout on
  // the embeddings' output.
  std::int64_t word_padding_idx = -1, position_padding_idx = -1;
  float embed_dropout = 0.0f;
};

// The config's dropout probabilities for training: sublayer outputs and embeddings, attention probabilities, the
// feed-forward's hidden activations.
void set_dropout(Stack& s, float hidden, float attention, float ff) {
  s.embed_dropout = hidden;
  for (Layer& L : s.layers) L.cfg.dropout = hidden, L.cfg.attention_dropout = attention, L.cfg.ff_dropout = ff;
}

// Marian's sinusoid: sin of the first ceil(d/2) columns, cos of the rest, computed in float64 (models.md 2.13).
std::vector<float> marian_sinusoid(std::int64_t P, std::int64_t d) {
  std::vector<float> s(static_cast<size_t>(P * d));
  const std::int64_t half = (d + 1) / 2;
  for (std::int64_t p = 0; p < P; ++p)
    for (std::int64_t j = 0; j < d; ++j) {
      const std::int64_t k = j < half ? j : j - half;
      const double angle = static_cast<double>(p) / std::pow(10000.0, 2.0 * static_cast<double>(k) / static_cast<double>(d));
      s[p * d + j] = static_cast<float>(j < half ? std::sin(angle) : std::cos(angle));
    }
  return s;
}

}  // namespace

struct PretrainedModel::Impl {
  Checkpoint ck;
  Kind kind = Kind::kEncoder;
  Head head = Head::kBase;
  std::string model_type, architecture, dir;
  std::int64_t V = 0, C = 0, labels = 0, pad_id = -1, start_id = -1, max_pos = 0;
  std::vector<std::int64_t> eos;
  Stack enc, dec;  // encoder-only and vision models use enc; decoders use dec; seq2seq both
  std::vector<HeadOp> pooler, head_ops;
  bool head_on_first = false;  // the head reads the first token's hidden state (sequence classification)
  bool head_on_pooler = false;  // ... of the pooler's output (BERT)
  bool decoder_positions_from_mask = false;
  LinearRef lm_head;
  const float* final_logits_bias = nullptr;
  float output_scale = 1.0f;  // T5 v1.0: decoder output * d_model^-0.5 before the tied head
  // Vision
  std::int64_t image = 0, patch = 0, channels = 0;
  LinearRef patch_proj;
  const float *cls_token = nullptr, *vit_positions = nullptr;  // (1, 1, C), (1, 1 + patches, C)
  // Generation rules (generation_config.json, else config.json)
  std::vector<std::int64_t> bad_words;
  std::int64_t forced_bos = -1, forced_eos = -1, min_length = 0, no_repeat_ngram = 0;
  int early_stopping = 0;  // 0 false, 1 true, 2 "never"
  // Fine-tuning: gradient buffers of the parameters that require them (by the parameter's data pointer).
  std::map<const float*, std::vector<float>> grads;
  // LoRA adapters, one per adapted module.
  struct Lora {
    std::string module;
    std::vector<float> a, b;
    LoraAdapter ref;
  };
  std::deque<Lora> loras;
  // Every Linear of the model (blocks, heads, the LM head, ViT's patch projection), for LoRA.
  template <class Fn>
  void for_each_linear(Fn&& fn) {
    for (Stack* s : {&enc, &dec})
      for (Layer& L : s->layers) {
        for (AttentionWeights* a : {&L.w.self_attn, &L.w.cross_attn})
          for (LinearRef* l : {&a->qkv, &a->q, &a->k, &a->v, &a->kv, &a->o}) fn(*l);
        for (LinearRef* l : {&L.w.ff.up, &L.w.ff.gate, &L.w.ff.down}) fn(*l);
      }
    for (auto* ops : {&pooler, &head_ops})
      for (HeadOp& op : *ops)
        if (op.kind == HeadOp::kLinear) fn(op.lin);
    fn(lm_head);
    fn(patch_proj);
  }

  // ------------------------------------------------------------------------------------------- forward pieces

  // Embeddings of ids (B, T) into x (B*T, C): word * scale + positions + token types, then the embedding norm.
  // `start` (B, may be null) is the position of each row's first token for kArange / kSinusoid tables.
  void embed(const Stack& s, const std::int64_t* ids, index_t B, index_t T, const std::int64_t* type_ids,
             const std::int64_t* start, float* x) const {
    embed_raw(s, ids, B, T, type_ids, start, x);
    s.embed_norm.apply(x, x, B * T, s.C);
  }

  // The position-table row of each token (kArange / kPadding / kSinusoid), checked against the table.
  std::vector<std::int64_t> position_rows(const Stack& s, const std::int64_t* ids, index_t B, index_t T,
                                          const std::int64_t* start) const {
    std::vector<std::int64_t> pos(static_cast<size_t>(B * T));
    for (index_t b = 0; b < B; ++b) {
      std::int64_t count = 0;
      for (index_t t = 0; t < T; ++t) {
        const std::int64_t id = ids[b * T + t];
        if (s.positions == Positions::kPadding)
          pos[b * T + t] = id == s.pad ? s.pad : s.pad + ++count;
        else
          pos[b * T + t] = std::max<std::int64_t>(0, (start ? start[b] : 0) + t) + s.position_offset;
      }
    }
    const index_t P = s.positions == Positions::kSinusoid ? s.max_positions : s.position.rows;
    for (const std::int64_t p : pos)
      if (p >= P)
        throw std::invalid_argument("position " + std::to_string(p - s.position_offset) + " is past the model's " +
                                    std::to_string(P - s.position_offset) + " positions");
    return pos;
  }

  // word * scale + positions + token types (before the embedding norm).
  void embed_raw(const Stack& s, const std::int64_t* ids, index_t B, index_t T, const std::int64_t* type_ids,
                 const std::int64_t* start, float* x) const {
    const index_t n = B * T, Cs = s.C;
    s.word.gather(x, ids, n);
    if (s.embed_scale != 1.0f)
      for (index_t i = 0; i < n * Cs; ++i) x[i] *= s.embed_scale;
    if (s.positions != Positions::kNone) {
      const std::vector<std::int64_t> pos = position_rows(s, ids, B, T, start);
      std::vector<float> rows(static_cast<size_t>(n * Cs));
      if (s.positions == Positions::kSinusoid) {
        for (index_t i = 0; i < n; ++i)
          std::memcpy(&rows[i * Cs], &s.sinusoid[pos[i] * Cs], sizeof(float) * static_cast<size_t>(Cs));
      } else {
        s.position.gather(rows.data(), pos.data(), n);
      }
      for (index_t i = 0; i < n * Cs; ++i) x[i] += rows[i];
    }
    if (s.token_type.present()) {
      std::vector<std::int64_t> zeros;
      if (!type_ids) zeros.assign(static_cast<size_t>(n), 0), type_ids = zeros.data();
      std::vector<float> rows(static_cast<size_t>(n * Cs));
      s.token_type.gather(rows.data(), type_ids, n);
      for (index_t i = 0; i < n * Cs; ++i) x[i] += rows[i];
    }
  }

  // A stack over x (B*T, C) in place.
  void run_stack(const Stack& s, float* x, const BlockInput& in) const {
    for (const Layer& L : s.layers) block_forward(x, x, L.cfg, L.w, in);
    s.final_norm.apply(x, x, in.B * in.T, s.C);
  }

  // Runs a head program over rows (rows, width) -> out (rows, final width).
  static void run_head(const std::vector<HeadOp>& ops, const float* x, index_t rows, index_t width,
                       std::vector<float>* out) {
    std::vector<float> cur(x, x + rows * width), next;
    for (const HeadOp& op : ops) {
      switch (op.kind) {
        case HeadOp::kLinear:
          next.resize(static_cast<size_t>(rows * op.lin.out));
          linear_forward(next.data(), op.lin.out, cur.data(), width, rows, op.lin);
          width = op.lin.out;
          cur.swap(next);
          break;
        case HeadOp::kAct:
          activation_forward(cur.data(), cur.data(), nullptr, rows, width, op.act);
          break;
        case HeadOp::kTanh:
          for (float& v : cur) v = std::tanh(v);
          break;
        case HeadOp::kNorm:
          op.norm.apply(cur.data(), cur.data(), rows, width);
          break;
      }
    }
    out->swap(cur);
  }

  // Checks ids (B, T) against the vocabulary and the mask's form; fills the key padding (1 = padding).
  void check_inputs(const std::int64_t* ids, index_t B, index_t T, const std::int64_t* mask, index_t vocab,
                    std::vector<std::uint8_t>* padding) const {
    CPUFORMER_CHECK(B >= 1 && T >= 1, "input_ids must be (batch >= 1, length >= 1), got (", B, ", ", T, ")");
    CPUFORMER_CHECK(B <= kMaxSize / T, "input_ids is too large");
    for (index_t i = 0; i < B * T; ++i)
      CPUFORMER_CHECK(ids[i] >= 0 && ids[i] < vocab, "input_ids: id ", ids[i], " at position ", i,
                      " is outside the vocabulary [0, ", vocab, ")");
    padding->clear();
    if (!mask) return;
    padding->resize(static_cast<size_t>(B * T));
    for (index_t i = 0; i < B * T; ++i) {
      CPUFORMER_CHECK(mask[i] == 0 || mask[i] == 1, "attention_mask must hold 0 and 1, got ", mask[i]);
      (*padding)[i] = mask[i] == 0;
    }
  }

  // Decoders: each row's first real token (left padding) and count; rows must be one run of real tokens.
  static void real_span(const std::int64_t* mask, index_t B, index_t T, std::vector<std::int64_t>* first,
                        std::vector<std::int64_t>* count) {
    first->assign(static_cast<size_t>(B), 0);
    count->assign(static_cast<size_t>(B), T);
    if (!mask) return;
    for (index_t b = 0; b < B; ++b) {
      const std::int64_t* m = mask + b * T;
      index_t t0 = 0;
      while (t0 < T && !m[t0]) ++t0;
      index_t t1 = t0;
      while (t1 < T && m[t1]) ++t1;
      for (index_t t = t1; t < T; ++t)
        CPUFORMER_CHECK(!m[t], "attention_mask row ", b, " must be one run of 1s (left or right padding)");
      CPUFORMER_CHECK(t1 > t0, "attention_mask row ", b, " has no tokens");
      (*first)[b] = t0, (*count)[b] = t1 - t0;
    }
  }

  // Encoder stack hidden states (B*T, C).
  void encode(const Stack& s, const std::int64_t* ids, index_t B, index_t T, const std::int64_t* mask,
              const std::int64_t* type_ids, std::vector<float>* x, std::vector<std::uint8_t>* padding) const {
    check_inputs(ids, B, T, mask, s.word.rows, padding);
    if (type_ids && s.token_type.present())
      for (index_t i = 0; i < B * T; ++i)
        CPUFORMER_CHECK(type_ids[i] >= 0 && type_ids[i] < s.token_type.rows, "token_type_ids: ", type_ids[i],
                        " is outside [0, ", s.token_type.rows, ")");
    x->resize(static_cast<size_t>(B * T * s.C));
    embed(s, ids, B, T, type_ids, nullptr, x->data());
    BlockInput in;
    in.B = B, in.T = T;
    in.key_padding = padding->empty() ? nullptr : padding->data();
    run_stack(s, x->data(), in);
  }

  // Decoder-only stack hidden states (B*T, C) with causal attention; left padding shifts positions.
  void decode_full(const std::int64_t* ids, index_t B, index_t T, const std::int64_t* mask,
                   std::vector<float>* x) const {
    std::vector<std::uint8_t> padding;
    check_inputs(ids, B, T, mask, dec.word.rows, &padding);
    std::vector<std::int64_t> first, count, offset(static_cast<size_t>(B));
    real_span(mask, B, T, &first, &count);
    for (index_t b = 0; b < B; ++b) offset[b] = -first[b];
    x->resize(static_cast<size_t>(B * T * C));
    embed(dec, ids, B, T, nullptr, offset.data(), x->data());
    BlockInput in;
    in.B = B, in.T = T, in.causal = true;
    in.key_padding = padding.empty() ? nullptr : padding.data();
    in.position_offset = offset.data();
    run_stack(dec, x->data(), in);
  }

  void lm_logits(const float* x, index_t rows, std::vector<float>* out) const {
    std::vector<float> scaled;
    if (output_scale != 1.0f) {
      scaled.assign(x, x + rows * C);
      for (float& v : scaled) v *= output_scale;
      x = scaled.data();
    }
    out->resize(static_cast<size_t>(rows * V));
    linear_forward(out->data(), V, x, C, rows, lm_head);
    if (final_logits_bias)
      for (index_t r = 0; r < rows; ++r)
        for (index_t v = 0; v < V; ++v) (*out)[r * V + v] += final_logits_bias[v];
  }

  // Encoder-decoder: the encoder's output (B*S, C) and padding.
  void encode_source(const std::int64_t* src, index_t B, index_t S, const std::int64_t* mask,
                     std::vector<float>* memory, std::vector<std::uint8_t>* padding) const {
    encode(enc, src, B, S, mask, nullptr, memory, padding);
  }
};

PretrainedModel::PretrainedModel() : impl_(new Impl) {}
PretrainedModel::~PretrainedModel() = default;

namespace {

using Impl = PretrainedModel::Impl;

// The logits processors transformers builds from the generation config, in its order: min length, no repeated
// n-grams, banned words, forced first / last token. `seq` holds the row's tokens so far (cur_len of them).
void process_logits(const Impl& m, float* logits, std::int64_t V, const std::vector<std::int64_t>& eos,
                    const std::int64_t* seq, std::int64_t cur_len, std::int64_t max_length) {
  const float ninf = -std::numeric_limits<float>::infinity();
  if (cur_len < m.min_length)
    for (std::int64_t e : eos) logits[e] = ninf;
  const std::int64_t n = m.no_repeat_ngram;
  if (n > 0 && cur_len + 1 >= n) {
    for (std::int64_t i = 0; i + n <= cur_len; ++i) {  // every earlier n-gram whose first n-1 match the tail
      bool same = true;
      for (std::int64_t j = 0; j < n - 1 && same; ++j) same = seq[i + j] == seq[cur_len - n + 1 + j];
      // A finished row holds pad ids, which may lie outside the vocabulary (its logits are unused).
      const std::int64_t banned = seq[i + n - 1];
      if (same && banned >= 0 && banned < V) logits[banned] = ninf;
    }
  }
  for (std::int64_t w : m.bad_words) logits[w] = ninf;
  const auto force = [&](std::int64_t id) {
    for (std::int64_t v = 0; v < V; ++v) logits[v] = v == id ? 0.0f : ninf;
  };
  if (m.forced_bos >= 0 && cur_len == 1) force(m.forced_bos);
  if (m.forced_eos >= 0 && cur_len == max_length - 1) force(m.forced_eos);
}

bool is_eos(const std::vector<std::int64_t>& eos, std::int64_t id) {
  return std::find(eos.begin(), eos.end(), id) != eos.end();
}

// Final norm + head for the given rows of x (rows picked by index) -> logits (n, V).
void rows_to_logits(const Impl& m, const Stack& s, const float* x, const std::vector<std::int64_t>& rows,
                    std::vector<float>* logits) {
  const index_t n = static_cast<index_t>(rows.size());
  std::vector<float> h(static_cast<size_t>(n * m.C));
  for (index_t i = 0; i < n; ++i)
    std::memcpy(&h[i * m.C], x + rows[i] * m.C, sizeof(float) * static_cast<size_t>(m.C));
  s.final_norm.apply(h.data(), h.data(), n, m.C);
  m.lm_logits(h.data(), n, logits);
}

// One decoder step over caches: tokens (B) at positions pos (B) -> the stack's output rows (B, C) before the final
// norm.
void decoder_step(const Impl& m, const Stack& s, const std::int64_t* tokens, index_t B, const std::int64_t* pos,
                  std::vector<KVCache>& caches, const std::vector<KVCache>* cross, const std::uint8_t* memory_padding,
                  std::vector<float>* x) {
  x->resize(static_cast<size_t>(B * m.C));
  m.embed(s, tokens, B, 1, nullptr, pos, x->data());
  for (std::size_t l = 0; l < s.layers.size(); ++l)
    block_decode(x->data(), x->data(), s.layers[l].cfg, s.layers[l].w, B, 1, nullptr, caches[l],
                 cross ? &(*cross)[l] : nullptr, memory_padding);
}

// At least `needed` positions in every cache, doubling (amortised O(1) per token).
void grow_caches(std::vector<KVCache>& caches, index_t needed) {
  for (KVCache& c : caches)
    if (needed > c.capacity) c.reserve(std::max(needed, 2 * c.capacity));
}

void reset_caches(const Stack& s, index_t B, index_t capacity, std::vector<KVCache>* caches) {
  caches->resize(s.layers.size());
  for (std::size_t l = 0; l < s.layers.size(); ++l) {
    const BlockConfig& c = s.layers[l].cfg;
    (*caches)[l].reset(B, capacity, c.kv_heads() * c.head_size());
  }
}

std::int64_t pick(const float* logits, std::int64_t V, const GenerationOptions& o, std::mt19937_64& rng) {
  return choose_token(logits, V, !o.do_sample, o.temperature, o.top_k, o.top_p, rng);
}

void check_generation(const GenerationOptions& o) {
  CPUFORMER_CHECK(o.max_new_tokens >= 0 && o.max_new_tokens <= (1 << 20), "max_new_tokens must be in [0, 2^20]");
  CPUFORMER_CHECK(std::isfinite(o.temperature) && o.temperature >= 0, "temperature must be finite and >= 0");
  CPUFORMER_CHECK(o.top_k >= 0, "top_k must be >= 0");
  CPUFORMER_CHECK(o.top_p > 0 && o.top_p <= 1, "top_p must be in (0, 1]");
  CPUFORMER_CHECK(o.num_beams >= 1 && o.num_beams <= 256, "num_beams must be in [1, 256]");
  CPUFORMER_CHECK(std::isfinite(o.length_penalty) && std::fabs(o.length_penalty) <= 100,
                  "length_penalty must be finite");
}

// Decoder-only generation (transformers' _sample loop): the prompt's real tokens fill each row's cache, then one
// token per step for every row; finished rows receive pad.
void decoder_generate(const Impl& m, const std::int64_t* ids, index_t B, index_t T, const std::int64_t* mask,
                      const GenerationOptions& o, std::vector<std::int64_t>* out, std::int64_t* produced) {
  check_generation(o);
  std::vector<std::uint8_t> padding;
  m.check_inputs(ids, B, T, mask, m.dec.word.rows, &padding);
  std::vector<std::int64_t> first, count;
  Impl::real_span(mask, B, T, &first, &count);
  const std::vector<std::int64_t> eos = o.no_eos ? std::vector<std::int64_t>{}
                                                 : (o.eos_token_ids.empty() ? m.eos : o.eos_token_ids);
  for (std::int64_t e : eos) CPUFORMER_CHECK(e >= 0 && e < m.V, "eos_token_id ", e, " is outside the vocabulary");
  const std::int64_t pad = o.pad_token_id >= 0 ? o.pad_token_id : (m.pad_id >= 0 ? m.pad_id : (eos.empty() ? 0 : eos[0]));
  const index_t Tr = *std::max_element(count.begin(), count.end());
  const index_t steps = o.max_new_tokens;
  std::vector<std::int64_t> seqs(static_cast<size_t>(B * (T + steps)), pad);  // row-major (B, T + steps)
  for (index_t b = 0; b < B; ++b) std::copy(ids + b * T, ids + b * T + T, &seqs[b * (T + steps)]);
  *produced = 0;
  if (steps == 0) {
    out->assign(ids, ids + B * T);
    return;
  }
  // Prefill: each row's real tokens first.
  std::vector<std::int64_t> compact(static_cast<size_t>(B * Tr), 0), zero(static_cast<size_t>(B), 0);
  for (index_t b = 0; b < B; ++b)
    std::copy(ids + b * T + first[b], ids + b * T + first[b] + count[b], &compact[b * Tr]);
  // The caches grow as tokens come (doubling), so a large max_new_tokens costs memory only when it is used.
  std::vector<KVCache> caches;
  reset_caches(m.dec, B, Tr + std::min<index_t>(steps, 64), &caches);
  std::vector<float> x(static_cast<size_t>(B * Tr * m.C));
  m.embed(m.dec, compact.data(), B, Tr, nullptr, zero.data(), x.data());
  // The last block carries only each row's last real token past its keys and values: x's first B rows.
  std::vector<std::int64_t> last(static_cast<size_t>(B)), all(static_cast<size_t>(B));
  for (index_t b = 0; b < B; ++b) last[b] = count[b] - 1, all[b] = b;
  const std::size_t L = m.dec.layers.size();
  for (std::size_t l = 0; l < L; ++l)
    block_decode(x.data(), x.data(), m.dec.layers[l].cfg, m.dec.layers[l].w, B, Tr, count.data(), caches[l], nullptr,
                 nullptr, l + 1 == L ? last.data() : nullptr);
  std::vector<float> logits;
  rows_to_logits(m, m.dec, x.data(), all, &logits);
  std::mt19937_64 rng(o.seed);
  std::vector<std::uint8_t> done(static_cast<size_t>(B), 0);
  std::vector<std::int64_t> tok(static_cast<size_t>(B)), pos(static_cast<size_t>(B));
  const std::int64_t max_length = T + steps;
  for (index_t s = 0; s < steps; ++s) {
    bool all_done = true;
    for (index_t b = 0; b < B; ++b) {
      float* row = &logits[b * m.V];
      process_logits(m, row, m.V, eos, &seqs[b * (T + steps)], T + s, max_length);
      tok[b] = done[b] ? pad : pick(row, m.V, o, rng);
      seqs[b * (T + steps) + T + s] = tok[b];
      if (!done[b] && is_eos(eos, tok[b])) done[b] = 1;
      if (tok[b] >= m.V) tok[b] = 0;  // a finished row's input (its outputs are unused): keep it in range
      all_done = all_done && done[b];
    }
    *produced = s + 1;
    if (all_done || s + 1 == steps) break;
    for (index_t b = 0; b < B; ++b) pos[b] = caches[0].length[b];
    grow_caches(caches, *std::max_element(pos.begin(), pos.end()) + 1);
    decoder_step(m, m.dec, tok.data(), B, pos.data(), caches, nullptr, nullptr, &x);
    rows_to_logits(m, m.dec, x.data(), all, &logits);
  }
  out->resize(static_cast<size_t>(B * (T + *produced)));
  for (index_t b = 0; b < B; ++b)
    std::copy(&seqs[b * (T + steps)], &seqs[b * (T + steps)] + T + *produced, &(*out)[b * (T + *produced)]);
}

void log_softmax_rows(float* x, index_t rows, index_t V) { log_softmax_forward(x, x, rows, V); }

// Encoder-decoder generation: the encoder runs once; greedy / sampling as transformers' _sample, or its beam search
// (_beam_search: 2 * num_beams candidates per row, finished hypotheses scored by sum / length ^ length_penalty,
// its early-stopping heuristic).
void seq2seq_generate_impl(const Impl& m, const std::int64_t* src, index_t B, index_t S, const std::int64_t* mask,
                           const GenerationOptions& o, std::vector<std::int64_t>* out, std::int64_t* length) {
  check_generation(o);
  std::vector<float> memory;
  std::vector<std::uint8_t> padding;
  m.encode_source(src, B, S, mask, &memory, &padding);
  const std::vector<std::int64_t> eos = o.no_eos ? std::vector<std::int64_t>{}
                                                 : (o.eos_token_ids.empty() ? m.eos : o.eos_token_ids);
  for (std::int64_t e : eos) CPUFORMER_CHECK(e >= 0 && e < m.V, "eos_token_id ", e, " is outside the vocabulary");
  const std::int64_t pad = o.pad_token_id >= 0 ? o.pad_token_id : (m.pad_id >= 0 ? m.pad_id : (eos.empty() ? 0 : eos[0]));
  const index_t K = o.num_beams, steps = o.max_new_tokens, max_length = 1 + steps, rows = B * K;
  // Every row of the beam search sees its source: memory and padding repeated K times.
  std::vector<float> mem_k;
  std::vector<std::uint8_t> pad_k;
  const float* mem = memory.data();
  const std::uint8_t* mp = padding.empty() ? nullptr : padding.data();
  if (K > 1) {
    mem_k.resize(static_cast<size_t>(rows * S * m.C));
    if (mp) pad_k.resize(static_cast<size_t>(rows * S));
    for (index_t r = 0; r < rows; ++r) {
      std::memcpy(&mem_k[r * S * m.C], &memory[(r / K) * S * m.C], sizeof(float) * static_cast<size_t>(S * m.C));
      if (mp) std::memcpy(&pad_k[r * S], &padding[(r / K) * S], static_cast<size_t>(S));
    }
    mem = mem_k.data(), mp = mp ? pad_k.data() : nullptr;
  }
  std::vector<KVCache> cache, cross(m.dec.layers.size());
  reset_caches(m.dec, rows, std::min<index_t>(max_length, 64), &cache);
  for (std::size_t l = 0; l < m.dec.layers.size(); ++l)
    block_cross_cache(mem, rows, S, m.dec.layers[l].cfg, m.dec.layers[l].w, cross[l]);
  std::vector<std::int64_t> all(static_cast<size_t>(rows)), pos(static_cast<size_t>(rows));
  for (index_t r = 0; r < rows; ++r) all[r] = r;
  std::vector<float> x, logits;
  const auto step = [&](const std::int64_t* tokens, index_t n) {  // logits (n, V) of the next position
    for (index_t r = 0; r < n; ++r) pos[r] = cache[0].length[r];
    grow_caches(cache, *std::max_element(pos.begin(), pos.begin() + n) + 1);
    decoder_step(m, m.dec, tokens, n, pos.data(), cache, &cross, mp, &x);
    rows_to_logits(m, m.dec, x.data(), all, &logits);
  };
  std::mt19937_64 rng(o.seed);
  if (K == 1) {
    std::vector<std::int64_t> seqs(static_cast<size_t>(B * max_length), pad), tok(static_cast<size_t>(B), m.start_id);
    std::vector<std::uint8_t> done(static_cast<size_t>(B), 0);
    for (index_t b = 0; b < B; ++b) seqs[b * max_length] = m.start_id;
    index_t len = 1;
    while (len < max_length) {
      step(tok.data(), B);
      bool all_done = true;
      for (index_t b = 0; b < B; ++b) {
        float* row = &logits[b * m.V];
        process_logits(m, row, m.V, eos, &seqs[b * max_length], len, max_length);
        tok[b] = done[b] ? pad : pick(row, m.V, o, rng);
        seqs[b * max_length + len] = tok[b];
        if (!done[b] && is_eos(eos, tok[b])) done[b] = 1;
        if (tok[b] >= m.V) tok[b] = 0;  // a finished row's input (its outputs are unused): keep it in range
        all_done = all_done && done[b];
      }
      ++len;
      if (all_done) break;
    }
    out->resize(static_cast<size_t>(B * len));
    for (index_t b = 0; b < B; ++b) std::copy(&seqs[b * max_length], &seqs[b * max_length] + len, &(*out)[b * len]);
    *length = len;
    return;
  }
  CPUFORMER_CHECK(!o.do_sample, "beam search with sampling is not supported");
  // transformers' fill value for unused positions: pad, unless pad is 0 or absent (its `pad or eos[0]`).
  const std::int64_t fill = eos.empty() ? -1 : (pad > 0 ? pad : eos[0]);
  const float kNeg = -1.0e9f;
  const index_t keep = std::max<index_t>(2, 1 + static_cast<index_t>(eos.size())) * K;
  // transformers takes the top (1 + eos ids) * beams of the beams x vocabulary candidates: there must be as many.
  CPUFORMER_CHECK(keep <= K * m.V, "beam search keeps max(2, 1 + eos ids) * num_beams = ", keep,
                  " candidates, more than num_beams * vocab_size = ", K * m.V, " (too many eos_token_id values)");
  std::vector<std::int64_t> run_seq(static_cast<size_t>(rows * max_length), fill);
  std::vector<float> run_score(static_cast<size_t>(rows), 0.0f);
  std::vector<std::int64_t> fin_seq(static_cast<size_t>(rows * max_length), fill), fin_len(static_cast<size_t>(rows), 0);
  std::vector<float> fin_score(static_cast<size_t>(rows), kNeg);
  std::vector<std::uint8_t> fin(static_cast<size_t>(rows), 0), heuristic(static_cast<size_t>(B), 1);
  for (index_t r = 0; r < rows; ++r) {
    run_seq[r * max_length] = m.start_id;
    if (r % K) run_score[r] = kNeg;
  }
  std::vector<std::int64_t> tok(static_cast<size_t>(rows), m.start_id), src_rows(static_cast<size_t>(rows));
  index_t cur = 1;
  while (cur < max_length) {
    step(tok.data(), rows);
    log_softmax_rows(logits.data(), rows, m.V);
    for (index_t r = 0; r < rows; ++r)
      process_logits(m, &logits[r * m.V], m.V, eos, &run_seq[r * max_length], cur, max_length);
    std::vector<std::int64_t> new_seq(static_cast<size_t>(rows * max_length));
    std::vector<float> new_score(static_cast<size_t>(rows));
    bool any_open = false, all_hit = true;
    for (index_t b = 0; b < B; ++b) {
      // The `keep` best (beam, token) continuations by accumulated log-probability.
      // Each beam's own best `keep` (a bounded heap over its row, no K * V array), then the best of their union:
      // the same candidates, in the same order, as sorting all K * V.
      const auto before = [](const std::pair<float, std::int64_t>& a, const std::pair<float, std::int64_t>& c) {
        return a.first > c.first || (a.first == c.first && a.second < c.second);
      };
      std::vector<std::pair<float, std::int64_t>> cand;
      cand.reserve(static_cast<size_t>(K * keep));
      const index_t per_beam = std::min<index_t>(keep, m.V);
      for (index_t k = 0; k < K; ++k) {
        const float* row = &logits[(b * K + k) * m.V];
        const float base = run_score[b * K + k];
        const std::size_t first = cand.size();
        for (index_t v = 0; v < m.V; ++v) {
          const std::pair<float, std::int64_t> c{row[v] + base, k * m.V + v};
          if (static_cast<index_t>(cand.size() - first) < per_beam) {
            cand.push_back(c);
            std::push_heap(cand.begin() + first, cand.end(), before);  // the heap's front is its worst
          } else if (before(c, cand[first])) {
            std::pop_heap(cand.begin() + first, cand.end(), before);
            cand.back() = c;
            std::push_heap(cand.begin() + first, cand.end(), before);
          }
        }
      }
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), before);
      std::vector<std::uint8_t> hit(static_cast<size_t>(keep));
      for (index_t i = 0; i < keep; ++i)
        hit[i] = is_eos(eos, cand[i].second % m.V) || cur + 1 >= max_length;
      // Running beams for the next step: the best K that did not stop.
      std::vector<index_t> order(static_cast<size_t>(keep));
      for (index_t i = 0; i < keep; ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t c) {
        return cand[a].first + (hit[a] ? kNeg : 0.0f) > cand[c].first + (hit[c] ? kNeg : 0.0f);
      });
      for (index_t k = 0; k < K; ++k) {
        const auto& c = cand[order[k]];
        const index_t from = b * K + c.second / m.V;
        std::copy(&run_seq[from * max_length], &run_seq[from * max_length] + max_length, &new_seq[(b * K + k) * max_length]);
        new_seq[(b * K + k) * max_length + cur] = c.second % m.V;
        new_score[b * K + k] = c.first + (hit[order[k]] ? kNeg : 0.0f);
        src_rows[b * K + k] = from;
      }
      // Finished hypotheses: the top K candidates that stopped, merged with the finished ones by score.
      const float denom = static_cast<float>(std::pow(static_cast<double>(cur + 1 - 1), o.length_penalty));
      const bool full = m.early_stopping == 1 &&
                        std::all_of(&fin[b * K], &fin[b * K] + K, [](std::uint8_t f) { return f != 0; });
      struct Entry { float score; bool from_new; index_t idx; };
      std::vector<Entry> merged;
      for (index_t k = 0; k < K; ++k) merged.push_back({fin_score[b * K + k], false, k});
      for (index_t i = 0; i < keep; ++i) {
        float sc = cand[i].first / denom;
        if (full) sc += kNeg;
        if (!heuristic[b]) sc += kNeg;
        if (!(hit[i] && i < K)) sc += kNeg;
        merged.push_back({sc, true, i});
      }
      std::stable_sort(merged.begin(), merged.end(), [](const Entry& a, const Entry& c) { return a.score > c.score; });
      std::vector<std::int64_t> nf_seq(static_cast<size_t>(K * max_length));
      std::vector<float> nf_score(static_cast<size_t>(K));
      std::vector<std::uint8_t> nf(static_cast<size_t>(K));
      std::vector<std::int64_t> nf_len(static_cast<size_t>(K));
      for (index_t k = 0; k < K; ++k) {
        const Entry& e = merged[k];
        if (e.from_new) {
          const auto& c = cand[e.idx];
          const index_t from = b * K + c.second / m.V;
          std::copy(&run_seq[from * max_length], &run_seq[from * max_length] + max_length, &nf_seq[k * max_length]);
          nf_seq[k * max_length + cur] = c.second % m.V;
          nf_len[k] = cur + 1;
          nf[k] = hit[e.idx] && e.idx < K;
        } else {
          std::copy(&fin_seq[(b * K + e.idx) * max_length], &fin_seq[(b * K + e.idx) * max_length] + max_length,
                    &nf_seq[k * max_length]);
          nf_len[k] = fin_len[b * K + e.idx];
          nf[k] = fin[b * K + e.idx];
        }
        nf_score[k] = e.score;
      }
      std::copy(nf_seq.begin(), nf_seq.end(), &fin_seq[b * K * max_length]);
      for (index_t k = 0; k < K; ++k)
        fin_score[b * K + k] = nf_score[k], fin[b * K + k] = nf[k], fin_len[b * K + k] = nf_len[k];
      for (index_t i = 0; i < keep; ++i) all_hit = all_hit && hit[i];
    }
    run_seq.swap(new_seq);
    run_score.swap(new_score);
    for (index_t r = 0; r < rows; ++r) tok[r] = run_seq[r * max_length + cur];
    for (auto& c : cache) c.reorder(src_rows.data(), rows);
    ++cur;
    // The early-stopping heuristic: can a running beam still beat the worst finished one?
    for (index_t b = 0; b < B; ++b) {
      const double best_len = (m.early_stopping == 2 && o.length_penalty > 0) ? static_cast<double>(max_length - 1)
                                                                               : static_cast<double>(cur - 1);
      const float best = static_cast<float>(run_score[b * K] / std::pow(best_len, o.length_penalty));
      const float worst = *std::min_element(&fin_score[b * K], &fin_score[b * K] + K);
      bool improvable = false;
      for (index_t k = 0; k < K; ++k) improvable = improvable || best > (fin[b * K + k] ? worst : kNeg);
      heuristic[b] = heuristic[b] && improvable;
      if (heuristic[b]) any_open = true;
    }
    bool open_beam = true;
    if (m.early_stopping == 1) open_beam = !std::all_of(fin.begin(), fin.end(), [](std::uint8_t f) { return f != 0; });
    if (!any_open || !open_beam || all_hit) break;
  }
  std::int64_t L = 1;
  for (index_t b = 0; b < B; ++b) L = std::max(L, fin_len[b * K] ? fin_len[b * K] : cur);
  out->resize(static_cast<size_t>(B * L));
  for (index_t b = 0; b < B; ++b)
    std::copy(&fin_seq[b * K * max_length], &fin_seq[b * K * max_length] + L, &(*out)[b * L]);
  *length = L;
}

}  // namespace

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The head an architecture name asks for (the part after the family's prefix).
Status head_of(const std::string& arch, Impl& m) {
  using H = PretrainedModel::Head;
  if (ends_with(arch, "LMHeadModel")) m.head = H::kCausalLM;  // GPT2LMHeadModel (before the plain *Model rule)
  else if (ends_with(arch, "MTModel")) m.head = H::kSeq2SeqLM;  // MarianMTModel
  else if (arch.empty() || ends_with(arch, "Model")) m.head = H::kBase;
  else if (ends_with(arch, "ForSequenceClassification")) m.head = H::kSequenceClassification;
  else if (ends_with(arch, "ForTokenClassification")) m.head = H::kTokenClassification;
  else if (ends_with(arch, "ForQuestionAnswering")) m.head = H::kQuestionAnswering;
  else if (ends_with(arch, "ForMaskedLM")) m.head = H::kMaskedLM;
  else if (ends_with(arch, "ForCausalLM") || ends_with(arch, "LMHeadModel")) m.head = H::kCausalLM;
  else if (ends_with(arch, "ForConditionalGeneration") || ends_with(arch, "MTModel")) m.head = H::kSeq2SeqLM;
  else if (ends_with(arch, "ForImageClassification")) m.head = H::kImageClassification;
  else return Status::error("architecture " + quoted(arch) + " is not supported");
  return Status();
}

std::int64_t label_count(HFConfig& cfg) {
  if (cfg.forced_labels > 0) return cfg.forced_labels;
  if (const Json* v = cfg.get("id2label"))
    if (v->type == Json::kObject && !v->members.empty()) return static_cast<std::int64_t>(v->members.size());
  return cfg.integer("num_labels", 2);
}

HeadOp lin_op(LinearRef l) {
  HeadOp op;
  op.kind = HeadOp::kLinear, op.lin = l;
  return op;
}
HeadOp act_op(Activation a) {
  HeadOp op;
  op.kind = HeadOp::kAct, op.act = a;
  return op;
}
HeadOp tanh_op() {
  HeadOp op;
  op.kind = HeadOp::kTanh;
  return op;
}
HeadOp norm_op(const Norm& n) {
  HeadOp op;
  op.kind = HeadOp::kNorm, op.norm = n;
  return op;
}

Norm layer_norm(Checkpoint& ck, const std::string& name, std::int64_t C, float eps) {
  Norm n;
  n.present = true, n.kind = NormKind::kLayerNorm, n.eps = eps;
  n.ref.weight = ck.floats(name + ".weight", {C});
  n.ref.bias = ck.floats(name + ".bias", {C}, true);
  return n;
}
Norm rms_norm(Checkpoint& ck, const std::string& name, std::int64_t C, float eps, bool one_plus = false) {
  Norm n;
  n.present = true, n.kind = NormKind::kRMSNorm, n.eps = eps;
  n.ref.weight = ck.floats(name + ".weight", {C});
  n.one_plus = one_plus;
  return n;
}

// `name`.weight (out, in) + optional `name`.bias.
LinearRef dense(Checkpoint& ck, const std::string& name, std::int64_t out, std::int64_t in, bool in_out = false) {
  return ck.linear(name + ".weight", name + ".bias", out, in, in_out);
}
LinearRef dense_nobias(Checkpoint& ck, const std::string& name, std::int64_t out, std::int64_t in) {
  return ck.linear(name + ".weight", "", out, in);
}

// ------------------------------------------------------------------------------------------------- encoders

Status load_encoder(Impl& m, HFConfig& cfg) {
  Checkpoint& ck = m.ck;
  const std::string& t = m.model_type;
  const bool distil = t == "distilbert", mpnet = t == "mpnet", roberta = t == "roberta" || t == "xlm-roberta";
  ck.prefix = distil ? "distilbert." : mpnet ? "mpnet." : roberta ? "roberta." : "bert.";
  const std::int64_t H = cfg.integer({"hidden_size", "dim"}, distil ? 768 : 768);
  const std::int64_t L = cfg.integer({"num_hidden_layers", "n_layers"}, distil ? 6 : 12);
  const std::int64_t nH = cfg.integer({"num_attention_heads", "n_heads"}, 12);
  const std::int64_t I = cfg.integer({"intermediate_size", "hidden_dim"}, 3072);
  const Activation act = activation_of(cfg, distil ? "activation" : "hidden_act", "gelu");
  const float eps = distil ? 1e-12f : static_cast<float>(cfg.real("layer_norm_eps", 1e-12, 0, 1));
  const std::int64_t P = cfg.integer("max_position_embeddings", 512);
  m.V = cfg.integer("vocab_size", roberta ? 50265 : 30522);
  const std::int64_t types = (distil || mpnet) ? 0 : cfg.integer("type_vocab_size", 2);
  m.pad_id = mpnet ? 1 : cfg.integer("pad_token_id", roberta ? 1 : 0, 0);
  const std::string pe = cfg.str("position_embedding_type", "absolute");
  if (pe != "absolute") cfg.error("position_embedding_type " + quoted(pe) + " is not supported (absolute)");
  if (!cfg.status.ok()) return cfg.status;
  if (H % nH) return Status::error(cfg.path() + ": hidden size " + std::to_string(H) + " is not divisible by the heads");
  m.C = H;
  Stack& s = m.enc;
  s.C = H;
  s.word = ck.table("embeddings.word_embeddings.weight", m.V, H);
  s.position = ck.table("embeddings.position_embeddings.weight", P, H);
  s.positions = (roberta || mpnet) ? Positions::kPadding : Positions::kArange;
  s.pad = m.pad_id;
  m.max_pos = (roberta || mpnet) ? P - m.pad_id - 1 : P;
  if (types) s.token_type = ck.table("embeddings.token_type_embeddings.weight", types, H);
  s.embed_norm = layer_norm(ck, "embeddings.LayerNorm", H, eps);
  const float* rel = mpnet ? ck.floats("encoder.relative_attention_bias.weight", {32, nH}) : nullptr;
  for (std::int64_t i = 0; i < L && ck.status.ok(); ++i) {
    Layer Ly;
    BlockConfig& c = Ly.cfg;
    c.d_model = H, c.num_heads = nH, c.norm_eps = eps, c.activation = act;
    BlockWeights& w = Ly.w;
    const std::string p = (distil ? "transformer.layer." : "encoder.layer.") + std::to_string(i) + ".";
    if (distil) {
      w.self_attn.q = dense(ck, p + "attention.q_lin", H, H);
      w.self_attn.k = dense(ck, p + "attention.k_lin", H, H);
      w.self_attn.v = dense(ck, p + "attention.v_lin", H, H);
      w.self_attn.o = dense(ck, p + "attention.out_lin", H, H);
      w.norm1 = layer_norm(ck, p + "sa_layer_norm", H, eps).ref;
      w.ff.up = dense(ck, p + "ffn.lin1", I, H);
      w.ff.down = dense(ck, p + "ffn.lin2", H, I);
      w.norm_ff = layer_norm(ck, p + "output_layer_norm", H, eps).ref;
    } else {
      const std::string a = mpnet ? p + "attention.attn." : p + "attention.self.";
      w.self_attn.q = dense(ck, a + (mpnet ? "q" : "query"), H, H);
      w.self_attn.k = dense(ck, a + (mpnet ? "k" : "key"), H, H);
      w.self_attn.v = dense(ck, a + (mpnet ? "v" : "value"), H, H);
      w.self_attn.o = dense(ck, mpnet ? a + "o" : p + "attention.output.dense", H, H);
      w.norm1 = layer_norm(ck, mpnet ? p + "attention.LayerNorm" : p + "attention.output.LayerNorm", H, eps).ref;
      w.ff.up = dense(ck, p + "intermediate.dense", I, H);
      w.ff.down = dense(ck, p + "output.dense", H, I);
      w.norm_ff = layer_norm(ck, p + "output.LayerNorm", H, eps).ref;
    }
    if (mpnet) {  // T5's bidirectional buckets, 32 of them, max distance 128, fixed in transformers' code
      c.position = PositionKind::kRelativeBias;
      c.relative.num_buckets = 32, c.relative.max_distance = 128, c.relative.bidirectional = true;
      w.self_attn.relative_table = rel;
    }
    s.layers.push_back(Ly);
  }
  if (ck.has("pooler.dense.weight")) {
    m.pooler = {lin_op(dense(ck, "pooler.dense", H, H)), tanh_op()};
  }
  s.word_padding_idx = m.pad_id;
  if (roberta || mpnet) s.position_padding_idx = m.pad_id;
  set_dropout(s, static_cast<float>(cfg.real(distil ? "dropout" : "hidden_dropout_prob", 0.1, 0, 1)),
              static_cast<float>(cfg.real(distil ? "attention_dropout" : "attention_probs_dropout_prob", 0.1, 0, 1)),
              0.0f);
  using Hd = PretrainedModel::Head;
  if (m.head == Hd::kSequenceClassification) {
    m.labels = label_count(cfg);
    m.head_on_first = true;
    if (t == "bert") {
      if (m.pooler.empty()) return Status::error("the checkpoint has no pooler for BertForSequenceClassification");
      m.head_on_pooler = true;
      m.head_ops = {lin_op(dense(ck, "classifier", m.labels, H))};
    } else if (distil) {
      m.head_ops = {lin_op(dense(ck, "pre_classifier", H, H)), act_op(Activation::kRelu),
                    lin_op(dense(ck, "classifier", m.labels, H))};
    } else {
      m.head_ops = {lin_op(dense(ck, "classifier.dense", H, H)), tanh_op(),
                    lin_op(dense(ck, "classifier.out_proj", m.labels, H))};
    }
  } else if (m.head == Hd::kTokenClassification) {
    m.labels = label_count(cfg);
    m.head_ops = {lin_op(dense(ck, "classifier", m.labels, H))};
  } else if (m.head == Hd::kQuestionAnswering) {
    m.labels = 2;
    m.head_ops = {lin_op(dense(ck, "qa_outputs", 2, H))};
  } else if (m.head == Hd::kMaskedLM) {
    std::string d, act_norm, decoder, bias;
    Activation ha = act;
    if (t == "bert") {
      d = "cls.predictions.transform.dense", act_norm = "cls.predictions.transform.LayerNorm";
      decoder = "cls.predictions.decoder", bias = "cls.predictions.bias";
    } else if (distil) {
      d = "vocab_transform", act_norm = "vocab_layer_norm", decoder = "vocab_projector", bias = "vocab_projector.bias";
    } else {
      d = "lm_head.dense", act_norm = "lm_head.layer_norm", decoder = "lm_head.decoder", bias = "lm_head.bias";
      ha = Activation::kGeluErf;
    }
    LinearRef out = ck.has(decoder + ".weight") ? dense_nobias(ck, decoder, m.V, H) : ck.tied(s.word);
    out.bias = ck.floats(bias, {m.V}, true);
    if (!out.bias) out.bias = ck.floats(decoder + ".bias", {m.V});
    m.head_ops = {lin_op(dense(ck, d, H, H)), act_op(ha), norm_op(layer_norm(ck, act_norm, H, distil ? 1e-12f : eps)),
                  lin_op(out)};
  } else if (m.head != Hd::kBase) {
    return Status::error(cfg.path() + ": architecture " + quoted(m.architecture) + " is not an encoder head");
  }
  return ck.status;
}

// ------------------------------------------------------------------------------------------------- decoders

Status rotary_of(HFConfig& cfg, std::int64_t head_dim, std::int64_t max_pos, RotaryConfig* r) {
  r->head_dim = head_dim, r->layout = RotaryLayout::kHalf;
  const Json* params = cfg.get("rope_parameters");
  const Json* scaling = cfg.get("rope_scaling");
  const Json* p = params ? params : scaling;
  r->theta = cfg.real("rope_theta", 10000.0, 1e-6, 1e30);
  if (p && p->type != Json::kObject) return Status::error(cfg.path() + ": 'rope_scaling' must be an object");
  const auto num = [&](const char* key, double fallback) {
    const Json* v = p ? p->find(key) : nullptr;
    return v && v->type == Json::kNumber ? v->number : fallback;
  };
  std::string type = "default";
  if (p) {
    if (const Json* v = p->find("rope_type"); v && v->type == Json::kString) type = v->str;
    else if (const Json* v2 = p->find("type"); v2 && v2->type == Json::kString) type = v2->str;
    r->theta = num("rope_theta", r->theta);
  }
  const double partial = cfg.real("partial_rotary_factor", num("partial_rotary_factor", 1.0), 0, 1);
  if (partial != 1.0)
    return Status::error(cfg.path() + ": partial_rotary_factor " + std::to_string(partial) +
                         " is not supported by this family (transformers rotates the whole head)");
  if (!(r->theta > 0)) return Status::error(cfg.path() + ": rope_theta must be > 0");
  if (type == "default") return Status();
  if (type == "linear") {
    r->linear_factor = num("factor", 1.0);
    if (!(r->linear_factor > 0)) return Status::error(cfg.path() + ": rope scaling factor must be > 0");
    return Status();
  }
  if (type == "llama3") {
    r->llama3_factor = num("factor", 8.0);
    r->low_freq_factor = num("low_freq_factor", 1.0), r->high_freq_factor = num("high_freq_factor", 4.0);
    // (range-checked as a double: casting 1e300 or inf to an integer is undefined)
    const double original = num("original_max_position_embeddings", static_cast<double>(max_pos));
    const bool original_ok = original >= 1 && original <= static_cast<double>(kMaxSize);
    r->original_max_position = original_ok ? static_cast<index_t>(original) : 0;
    if (!(r->llama3_factor > 0) || !(r->high_freq_factor > r->low_freq_factor) || !original_ok)
      return Status::error(cfg.path() + ": invalid llama3 rope scaling parameters");
    return Status();
  }
  return Status::error(cfg.path() + ": rope scaling type " + quoted(type) +
                       " is not supported (default, linear, llama3)");
}

Status load_decoder(Impl& m, HFConfig& cfg) {
  Checkpoint& ck = m.ck;
  // Packed weights without AMX tiles: a decoder's products of 128+ rows are its prompts, one per request, and the
  // tiles would keep 1.5x the float32 weights (gigabytes at 0.5B parameters) for them.
  ck.amx_tiles = false;
  const std::string& t = m.model_type;
  Stack& s = m.dec;
  if (t == "gpt2") {
    ck.prefix = "transformer.";
    const std::int64_t H = cfg.integer({"n_embd", "hidden_size"}, 768), L = cfg.integer({"n_layer", "num_hidden_layers"}, 12);
    const std::int64_t nH = cfg.integer({"n_head", "num_attention_heads"}, 12);
    const std::int64_t I = cfg.has("n_inner") ? cfg.integer("n_inner", 4 * H) : 4 * H;
    const Activation act = activation_of(cfg, "activation_function", "gelu_new");
    const float eps = static_cast<float>(cfg.real("layer_norm_epsilon", 1e-5, 0, 1));
    const std::int64_t P = cfg.integer({"n_positions", "max_position_embeddings"}, 1024);
    m.V = cfg.integer("vocab_size", 50257);
    const bool scaled = cfg.flag("scale_attn_weights", true), by_layer = cfg.flag("scale_attn_by_inverse_layer_idx", false);
    if (cfg.flag("add_cross_attention", false)) cfg.error("add_cross_attention is not supported");
    if (!cfg.status.ok()) return cfg.status;
    if (H % nH) return Status::error(cfg.path() + ": n_embd is not divisible by n_head");
    m.C = s.C = H, m.max_pos = P;
    s.word = ck.table("wte.weight", m.V, H);
    s.position = ck.table("wpe.weight", P, H);
    s.positions = Positions::kArange;
    for (std::int64_t i = 0; i < L && ck.status.ok(); ++i) {
      Layer Ly;
      BlockConfig& c = Ly.cfg;
      c.d_model = H, c.num_heads = nH, c.norm_eps = eps, c.activation = act, c.norm_first = true;
      const float base = scaled ? 1.0f / std::sqrt(static_cast<float>(H / nH)) : 1.0f;
      c.attention_scale = by_layer ? base / static_cast<float>(i + 1) : base;
      const std::string p = "h." + std::to_string(i) + ".";
      Ly.w.self_attn.qkv = dense(ck, p + "attn.c_attn", 3 * H, H, true);
      Ly.w.self_attn.o = dense(ck, p + "attn.c_proj", H, H, true);
      Ly.w.ff.up = dense(ck, p + "mlp.c_fc", I, H, true);
      Ly.w.ff.down = dense(ck, p + "mlp.c_proj", H, I, true);
      Ly.w.norm1 = layer_norm(ck, p + "ln_1", H, eps).ref;
      Ly.w.norm_ff = layer_norm(ck, p + "ln_2", H, eps).ref;
      s.layers.push_back(Ly);
    }
    s.final_norm = layer_norm(ck, "ln_f", H, eps);
    set_dropout(s, static_cast<float>(cfg.real("resid_pdrop", 0.1, 0, 1)),
                static_cast<float>(cfg.real("attn_pdrop", 0.1, 0, 1)), 0.0f);
    s.embed_dropout = static_cast<float>(cfg.real("embd_pdrop", 0.1, 0, 1));
  } else {
    ck.prefix = "model.";
    const bool gemma = t == "gemma", qwen2 = t == "qwen2", qwen3 = t == "qwen3", mistral = t == "mistral";
    const std::int64_t H = cfg.integer("hidden_size", 4096), L = cfg.integer("num_hidden_layers", 32);
    const std::int64_t nH = cfg.integer("num_attention_heads", 32);
    const std::int64_t nKV = cfg.integer("num_key_value_heads", mistral ? 8 : nH);
    const std::int64_t D = cfg.integer("head_dim", qwen3 ? 128 : gemma ? 256 : H / std::max<std::int64_t>(nH, 1));
    const std::int64_t I = cfg.integer("intermediate_size", 11008);
    std::string act_name = cfg.str("hidden_act", gemma ? "gelu_pytorch_tanh" : "silu");
    if (gemma && act_name == "gelu") act_name = "gelu_pytorch_tanh";  // transformers v5 rewrites Gemma's legacy "gelu"
    Activation act = Activation::kSilu;
    if (act_name == "silu" || act_name == "swish") act = Activation::kSilu;
    else if (act_name == "gelu_pytorch_tanh" || act_name == "gelu_new" || act_name == "gelu_fast") act = Activation::kGeluTanh;
    else if (act_name == "gelu") act = Activation::kGeluErf;
    else if (act_name == "relu") act = Activation::kRelu;
    else cfg.error("hidden_act " + quoted(act_name) + " is not supported");
    const float eps = static_cast<float>(cfg.real("rms_norm_eps", 1e-6, 0, 1));
    const std::int64_t P = cfg.integer("max_position_embeddings", 2048);
    m.V = cfg.integer("vocab_size", 32000);
    const bool attn_bias = cfg.flag("attention_bias", false), mlp_bias = cfg.flag("mlp_bias", false);
    std::int64_t window = 0;
    std::vector<bool> sliding(static_cast<size_t>(L), false);
    if (mistral) {
      window = cfg.get("sliding_window") ? cfg.integer("sliding_window", 4096) : (cfg.written("sliding_window") ? 0 : 4096);
      std::fill(sliding.begin(), sliding.end(), window > 0);
    } else if (qwen2 || qwen3) {
      if (cfg.flag("use_sliding_window", false)) {
        window = cfg.integer("sliding_window", 4096);
        const std::int64_t from = cfg.integer("max_window_layers", 28, 0);
        for (std::int64_t i = 0; i < L; ++i) sliding[i] = i >= from;
      }
    }
    if (const Json* lt = cfg.get("layer_types"); lt && window > 0) {
      if (lt->type != Json::kArray || static_cast<std::int64_t>(lt->items.size()) != L) cfg.error("'layer_types' must list every layer");
      else
        for (std::int64_t i = 0; i < L; ++i) sliding[i] = lt->items[i].type == Json::kString && lt->items[i].str == "sliding_attention";
    }
    if (gemma && cfg.flag("use_bidirectional_attention", false)) cfg.error("use_bidirectional_attention is not supported");
    RotaryConfig rope;
    if (!cfg.status.ok()) return cfg.status;
    Status st = rotary_of(cfg, D, P, &rope);
    if (!st.ok()) return st;
    if (nH % nKV) return Status::error(cfg.path() + ": num_key_value_heads must divide num_attention_heads");
    m.C = s.C = H, m.max_pos = 0;
    s.word = ck.table("embed_tokens.weight", m.V, H);
    if (gemma) s.embed_scale = std::sqrt(static_cast<float>(H));
    for (std::int64_t i = 0; i < L && ck.status.ok(); ++i) {
      Layer Ly;
      BlockConfig& c = Ly.cfg;
      c.d_model = H, c.num_heads = nH, c.num_kv_heads = nKV, c.head_dim = D;
      c.norm = NormKind::kRMSNorm, c.norm_eps = eps, c.norm_first = true, c.activation = act;
      c.norm_one_plus = gemma;  // Gemma's norm weights are offsets from one
      c.position = PositionKind::kRotary, c.rotary = rope;
      c.sliding_window = sliding[i] ? window : 0;
      c.qk_norm = qwen3;
      const std::string p = "layers." + std::to_string(i) + ".";
      const bool qkv_bias = qwen2 || attn_bias;
      const auto proj = [&](const std::string& n, std::int64_t out, std::int64_t in, bool bias) {
        return bias ? ck.linear(n + ".weight", n + ".bias", out, in, false, true) : dense_nobias(ck, n, out, in);
      };
      Ly.w.self_attn.q = proj(p + "self_attn.q_proj", nH * D, H, qkv_bias);
      Ly.w.self_attn.k = proj(p + "self_attn.k_proj", nKV * D, H, qkv_bias);
      Ly.w.self_attn.v = proj(p + "self_attn.v_proj", nKV * D, H, qkv_bias);
      Ly.w.self_attn.o = proj(p + "self_attn.o_proj", H, nH * D, attn_bias && !qwen2);
      if (qwen3) {
        Ly.w.self_attn.q_norm = ck.floats(p + "self_attn.q_norm.weight", {D});
        Ly.w.self_attn.k_norm = ck.floats(p + "self_attn.k_norm.weight", {D});
      }
      Ly.w.ff.gate = proj(p + "mlp.gate_proj", I, H, mlp_bias);
      Ly.w.ff.up = proj(p + "mlp.up_proj", I, H, mlp_bias);
      Ly.w.ff.down = proj(p + "mlp.down_proj", H, I, mlp_bias);
      Ly.w.norm1 = rms_norm(ck, p + "input_layernorm", H, eps, gemma).ref;
      Ly.w.norm_ff = rms_norm(ck, p + "post_attention_layernorm", H, eps, gemma).ref;
      s.layers.push_back(Ly);
    }
    s.final_norm = rms_norm(ck, "norm", H, eps, gemma);
    set_dropout(s, 0.0f, static_cast<float>(cfg.real("attention_dropout", 0.0, 0, 1)), 0.0f);
    s.word_padding_idx = cfg.integer("pad_token_id", gemma ? 0 : -1, -1);
  }
  if (m.head != PretrainedModel::Head::kCausalLM)
    return Status::error(cfg.path() + ": architecture " + quoted(m.architecture) +
                         " is not supported for " + t + " (the causal LM head)");
  // The head: lm_head.weight when the file has it (transformers' presence rule), else the tied embedding.
  m.lm_head = ck.map->find("lm_head.weight") ? dense_nobias(ck, "lm_head", m.V, m.C) : ck.tied(s.word);
  return ck.status;
}

// ------------------------------------------------------------------------------------------ encoder-decoders

Status load_seq2seq(Impl& m, HFConfig& cfg) {
  Checkpoint& ck = m.ck;
  const std::string& t = m.model_type;
  if (m.head != PretrainedModel::Head::kSeq2SeqLM)
    return Status::error(cfg.path() + ": architecture " + quoted(m.architecture) + " is not supported for " + t +
                         " (ForConditionalGeneration / MTModel)");
  if (t == "t5") {
    ck.prefix = "";
    const std::int64_t d = cfg.integer("d_model", 512), dkv = cfg.integer("d_kv", 64), dff = cfg.integer("d_ff", 2048);
    const std::int64_t Le = cfg.integer("num_layers", 6), Ld = cfg.integer("num_decoder_layers", Le);
    const std::int64_t nH = cfg.integer("num_heads", 8);
    RelativeBiasConfig rel;
    rel.num_buckets = cfg.integer("relative_attention_num_buckets", 32, 4);
    rel.max_distance = cfg.integer("relative_attention_max_distance", 128, 2);
    const float eps = static_cast<float>(cfg.real("layer_norm_epsilon", 1e-6, 0, 1));
    const std::string ff = cfg.str("feed_forward_proj", "relu");
    const bool gated = ff.rfind("gated-", 0) == 0;
    std::string act_name = gated ? ff.substr(6) : ff;
    Activation act = Activation::kRelu;
    if (act_name == "relu") act = Activation::kRelu;
    else if (act_name == "gelu" && gated) act = Activation::kGeluTanh;  // "gated-gelu" means gelu_new
    else if (act_name == "gelu") act = Activation::kGeluErf;
    else if (act_name == "gelu_new") act = Activation::kGeluTanh;
    else if (act_name == "silu") act = Activation::kSilu;
    else cfg.error("feed_forward_proj " + quoted(ff) + " is not supported");
    m.V = cfg.integer("vocab_size", 32128);
    const bool tie = !cfg.written("tie_word_embeddings") || cfg.flag("tie_word_embeddings", true);
    m.pad_id = cfg.integer("pad_token_id", 0, 0);
    if (!cfg.status.ok()) return cfg.status;
    m.C = d;
    Table shared = ck.has("shared.weight") ? ck.table("shared.weight", m.V, d) : ck.table("encoder.embed_tokens.weight", m.V, d);
    for (int side = 0; side < 2 && ck.status.ok(); ++side) {
      Stack& s = side ? m.dec : m.enc;
      const std::string root = side ? "decoder." : "encoder.";
      s.C = d, s.word = shared;
      const std::int64_t L = side ? Ld : Le;
      const float* table = ck.floats(root + "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                     {rel.num_buckets, nH});
      for (std::int64_t i = 0; i < L && ck.status.ok(); ++i) {
        Layer Ly;
        BlockConfig& c = Ly.cfg;
        c.d_model = d, c.num_heads = nH, c.head_dim = dkv, c.norm = NormKind::kRMSNorm, c.norm_eps = eps;
        c.norm_first = true, c.activation = act, c.attention_scale = 1.0f, c.cross_attention = side == 1;
        c.position = PositionKind::kRelativeBias, c.relative = rel, c.relative.bidirectional = side == 0;
        const std::string p = root + "block." + std::to_string(i) + ".layer.";
        const auto attn = [&](const std::string& a, AttentionWeights& w) {
          w.q = dense_nobias(ck, a + ".q", nH * dkv, d);
          w.k = dense_nobias(ck, a + ".k", nH * dkv, d);
          w.v = dense_nobias(ck, a + ".v", nH * dkv, d);
          w.o = dense_nobias(ck, a + ".o", d, nH * dkv);
        };
        attn(p + "0.SelfAttention", Ly.w.self_attn);
        Ly.w.self_attn.relative_table = table;
        Ly.w.norm1 = rms_norm(ck, p + "0.layer_norm", d, eps).ref;
        std::string f = p + "1.";
        if (side) {
          attn(p + "1.EncDecAttention", Ly.w.cross_attn);
          Ly.w.norm2 = rms_norm(ck, p + "1.layer_norm", d, eps).ref;
          f = p + "2.";
        }
        if (gated) {
          Ly.w.ff.gate = dense_nobias(ck, f + "DenseReluDense.wi_0", dff, d);
          Ly.w.ff.up = dense_nobias(ck, f + "DenseReluDense.wi_1", dff, d);
        } else {
          Ly.w.ff.up = dense_nobias(ck, f + "DenseReluDense.wi", dff, d);
        }
        Ly.w.ff.down = dense_nobias(ck, f + "DenseReluDense.wo", d, dff);
        Ly.w.norm_ff = rms_norm(ck, f + "layer_norm", d, eps).ref;
        s.layers.push_back(Ly);
      }
      s.final_norm = rms_norm(ck, root + "final_layer_norm", d, eps);
      const float drop = static_cast<float>(cfg.real("dropout_rate", 0.1, 0, 1));
      set_dropout(s, drop, drop, drop);
    }
    const bool own_head = ck.map->find("lm_head.weight") != nullptr;
    m.lm_head = own_head ? dense_nobias(ck, "lm_head", m.V, d) : ck.tied(shared);
    if (tie) m.output_scale = 1.0f / std::sqrt(static_cast<float>(d));
    m.start_id = cfg.integer("decoder_start_token_id", m.pad_id, 0);
    return ck.status;
  }
  // BART and Marian: post-norm layers with q/k/v/out projections, learned (BART) or sinusoidal (Marian) positions.
  ck.prefix = "model.";
  const bool marian = t == "marian";
  const std::int64_t d = cfg.integer("d_model", 1024);
  const std::int64_t Le = cfg.integer("encoder_layers", 12), Ld = cfg.integer("decoder_layers", 12);
  const std::int64_t He = cfg.integer("encoder_attention_heads", 16), Hd = cfg.integer("decoder_attention_heads", 16);
  const std::int64_t Fe = cfg.integer("encoder_ffn_dim", 4096), Fd = cfg.integer("decoder_ffn_dim", 4096);
  const Activation act = activation_of(cfg, "activation_function", "gelu");
  const bool scale = cfg.flag("scale_embedding", false);
  const std::int64_t P = cfg.integer("max_position_embeddings", 1024);
  m.V = cfg.integer("vocab_size", marian ? 58101 : 50265);
  if (marian) {
    if (cfg.has("decoder_vocab_size") && cfg.integer("decoder_vocab_size", m.V) != m.V)
      cfg.error("a decoder_vocab_size different from vocab_size is not supported");
    if (!cfg.flag("share_encoder_decoder_embeddings", true)) cfg.error("separate encoder/decoder embeddings are not supported");
    if (cfg.flag("normalize_before", false) || cfg.flag("normalize_embedding", false))
      cfg.error("normalize_before / normalize_embedding are not supported");
  }
  m.pad_id = cfg.integer("pad_token_id", marian ? m.V - 1 : 1, 0);
  m.start_id = cfg.integer("decoder_start_token_id", marian ? m.pad_id : 2, 0);
  if (!cfg.status.ok()) return cfg.status;
  m.C = d;
  Table shared = ck.has("shared.weight") ? ck.table("shared.weight", m.V, d) : ck.table("encoder.embed_tokens.weight", m.V, d);
  if (!ck.status.ok()) return ck.status;  // (the table's shape bounds d before the sinusoid below is built)
  // Marian's position table is computed, not stored: refuse sizes no checkpoint has before allocating P x d floats.
  if (marian && P > (std::int64_t{1} << 26) / d)
    return Status::error(cfg.path() + ": max_position_embeddings " + std::to_string(P) + " x d_model " +
                         std::to_string(d) + " is too large for the sinusoidal position table");
  std::vector<float> sinusoid = marian ? marian_sinusoid(P, d) : std::vector<float>();
  for (int side = 0; side < 2 && ck.status.ok(); ++side) {
    Stack& s = side ? m.dec : m.enc;
    const std::string root = side ? "decoder." : "encoder.";
    s.C = d, s.word = shared, s.embed_scale = scale ? std::sqrt(static_cast<float>(d)) : 1.0f;
    if (marian) {
      s.positions = Positions::kSinusoid, s.sinusoid = sinusoid, s.max_positions = P;
    } else {
      s.positions = Positions::kArange, s.position_offset = 2;
      s.position = ck.table(root + "embed_positions.weight", P + 2, d);
      s.embed_norm = layer_norm(ck, root + "layernorm_embedding", d, 1e-5f);
    }
    const std::int64_t L = side ? Ld : Le, nH = side ? Hd : He, F = side ? Fd : Fe;
    if (d % nH) return Status::error(cfg.path() + ": d_model is not divisible by the attention heads");
    for (std::int64_t i = 0; i < L && ck.status.ok(); ++i) {
      Layer Ly;
      BlockConfig& c = Ly.cfg;
      c.d_model = d, c.num_heads = nH, c.norm_eps = 1e-5f, c.activation = act, c.cross_attention = side == 1;
      const std::string p = root + "layers." + std::to_string(i) + ".";
      const auto attn = [&](const std::string& a, AttentionWeights& w) {
        w.q = dense(ck, a + ".q_proj", d, d);
        w.k = dense(ck, a + ".k_proj", d, d);
        w.v = dense(ck, a + ".v_proj", d, d);
        w.o = dense(ck, a + ".out_proj", d, d);
      };
      attn(p + "self_attn", Ly.w.self_attn);
      Ly.w.norm1 = layer_norm(ck, p + "self_attn_layer_norm", d, 1e-5f).ref;
      if (side) {
        attn(p + "encoder_attn", Ly.w.cross_attn);
        Ly.w.norm2 = layer_norm(ck, p + "encoder_attn_layer_norm", d, 1e-5f).ref;
      }
      Ly.w.ff.up = dense(ck, p + "fc1", F, d);
      Ly.w.ff.down = dense(ck, p + "fc2", d, F);
      Ly.w.norm_ff = layer_norm(ck, p + "final_layer_norm", d, 1e-5f).ref;
      s.layers.push_back(Ly);
    }
    set_dropout(s, static_cast<float>(cfg.real("dropout", 0.1, 0, 1)),
                static_cast<float>(cfg.real("attention_dropout", 0.0, 0, 1)),
                static_cast<float>(cfg.real("activation_dropout", 0.0, 0, 1)));
    s.word_padding_idx = m.pad_id;
  }
  m.max_pos = P;
  m.lm_head = ck.map->find("lm_head.weight") ? dense_nobias(ck, "lm_head", m.V, d) : ck.tied(shared);
  m.final_logits_bias = ck.floats("final_logits_bias", {1, m.V}, true);
  return ck.status;
}

// ------------------------------------------------------------------------------------------------------ ViT

Status load_vit(Impl& m, HFConfig& cfg) {
  Checkpoint& ck = m.ck;
  ck.prefix = "vit.";
  const std::int64_t H = cfg.integer("hidden_size", 768), L = cfg.integer("num_hidden_layers", 12);
  const std::int64_t nH = cfg.integer("num_attention_heads", 12), I = cfg.integer("intermediate_size", 3072);
  const Activation act = activation_of(cfg, "hidden_act", "gelu");
  const float eps = static_cast<float>(cfg.real("layer_norm_eps", 1e-12, 0, 1));
  m.image = cfg.integer("image_size", 224), m.patch = cfg.integer("patch_size", 16), m.channels = cfg.integer("num_channels", 3);
  if (!cfg.status.ok()) return cfg.status;
  if (H % nH) return Status::error(cfg.path() + ": hidden_size is not divisible by the heads");
  if (m.image % m.patch) return Status::error(cfg.path() + ": image_size is not a multiple of patch_size");
  const std::int64_t N = (m.image / m.patch) * (m.image / m.patch), K = m.channels * m.patch * m.patch;
  m.C = H;
  Stack& s = m.enc;
  s.C = H;
  m.cls_token = ck.floats("embeddings.cls_token", {1, 1, H});
  const float* pos = ck.floats("embeddings.position_embeddings", {1, N + 1, H});
  m.vit_positions = pos;
  const float* pw = ck.floats("embeddings.patch_embeddings.projection.weight", {H, m.channels, m.patch, m.patch});
  m.patch_proj.in = K, m.patch_proj.out = H, m.patch_proj.weight = pw;
  m.patch_proj.bias = ck.floats("embeddings.patch_embeddings.projection.bias", {H}, true);
  for (std::int64_t i = 0; i < L && ck.status.ok(); ++i) {
    Layer Ly;
    BlockConfig& c = Ly.cfg;
    c.d_model = H, c.num_heads = nH, c.norm_eps = eps, c.activation = act, c.norm_first = true;
    const std::string p = "encoder.layer." + std::to_string(i) + ".";
    Ly.w.self_attn.q = dense(ck, p + "attention.attention.query", H, H);
    Ly.w.self_attn.k = dense(ck, p + "attention.attention.key", H, H);
    Ly.w.self_attn.v = dense(ck, p + "attention.attention.value", H, H);
    Ly.w.self_attn.o = dense(ck, p + "attention.output.dense", H, H);
    Ly.w.norm1 = layer_norm(ck, p + "layernorm_before", H, eps).ref;
    Ly.w.ff.up = dense(ck, p + "intermediate.dense", I, H);
    Ly.w.ff.down = dense(ck, p + "output.dense", H, I);
    Ly.w.norm_ff = layer_norm(ck, p + "layernorm_after", H, eps).ref;
    s.layers.push_back(Ly);
  }
  s.final_norm = layer_norm(ck, "layernorm", H, eps);
  set_dropout(s, static_cast<float>(cfg.real("hidden_dropout_prob", 0.0, 0, 1)),
              static_cast<float>(cfg.real("attention_probs_dropout_prob", 0.0, 0, 1)), 0.0f);
  if (ck.has("pooler.dense.weight")) m.pooler = {lin_op(dense(ck, "pooler.dense", H, H)), tanh_op()};
  if (m.head == PretrainedModel::Head::kImageClassification) {
    m.labels = label_count(cfg);
    m.head_on_first = true;
    m.head_ops = {lin_op(dense(ck, "classifier", m.labels, H))};
  } else if (m.head != PretrainedModel::Head::kBase) {
    return Status::error(cfg.path() + ": architecture " + quoted(m.architecture) + " is not supported for vit");
  }
  return ck.status;
}

// Token conventions and generation rules: generation_config.json over config.json.
Status load_generation(Impl& m, HFConfig& cfg, const std::string& dir) {
  std::vector<std::int64_t> eos = cfg.ids("eos_token_id");
  std::string text;
  Json gj;
  const std::string gpath = dir + "/generation_config.json";
  if (file_exists(gpath)) {
    Status st = read_text(gpath, &text);
    if (st.ok()) st = parse_json(text, &gj);
    if (!st.ok()) return Status::error(gpath + ": " + st.message());
    if (gj.type != Json::kObject) return Status::error(gpath + ": expected a JSON object");
  }
  if (gj.type != Json::kObject) gj.type = Json::kObject;  // no file: an empty object
  HFConfig g(gj, gpath);
  HFConfig* src[2] = {&g, &cfg};
  const auto ids = [&](const char* key) {
    for (HFConfig* c : src)
      if (c->has(key)) return c->ids(key);
    return std::vector<std::int64_t>{};
  };
  const auto one = [&](const char* key, std::int64_t fallback) {
    std::vector<std::int64_t> v = ids(key);
    return v.empty() ? fallback : v[0];
  };
  if (!ids("eos_token_id").empty()) eos = ids("eos_token_id");
  m.eos.clear();  // an eos outside the vocabulary can never be produced (tiny test models keep GPT-2's 50256)
  for (std::int64_t e : eos)
    if (e < m.V) m.eos.push_back(e);
  if (m.kind != PretrainedModel::Kind::kEncoder || m.model_type != "roberta") m.pad_id = one("pad_token_id", m.pad_id);
  m.start_id = one("decoder_start_token_id", m.start_id);
  m.forced_bos = one("forced_bos_token_id", -1), m.forced_eos = one("forced_eos_token_id", -1);
  for (HFConfig* c : src) {
    if (!c->has("bad_words_ids")) continue;
    const Json* b = c->get("bad_words_ids");
    if (b->type != Json::kArray) return Status::error(c->path() + ": 'bad_words_ids' must be a list of lists");
    for (const Json& w : b->items) {
      if (w.type != Json::kArray || w.items.size() != 1 || w.items[0].type != Json::kNumber)
        return Status::error(c->path() + ": only single-token bad_words_ids are supported");
      const double id = w.items[0].number;  // (an integer in range before the cast: 1e300 cast is undefined)
      if (id != std::floor(id) || id < 0 || id >= static_cast<double>(m.V))
      {
        std::ostringstream v;
        v << id;
        return Status::error(c->path() + ": bad_words_ids " + v.str() + " is not a token id of the vocabulary");
      }
      m.bad_words.push_back(static_cast<std::int64_t>(w.items[0].number));
    }
    break;
  }
  for (HFConfig* c : src)
    if (c->has("min_length")) { m.min_length = c->integer("min_length", 0, 0); break; }
  for (HFConfig* c : src)
    if (c->has("no_repeat_ngram_size")) { m.no_repeat_ngram = c->integer("no_repeat_ngram_size", 0, 0, 1000); break; }
  for (HFConfig* c : src)
    if (c->has("early_stopping")) {
      const Json* e = c->get("early_stopping");
      m.early_stopping = e->type == Json::kBool ? (e->boolean ? 1 : 0) : (e->type == Json::kString && e->str == "never" ? 2 : 0);
      break;
    }
  for (HFConfig* c : {&g, &cfg})
    if (!c->status.ok()) return c->status;
  const std::int64_t V = m.V;
  const auto check = [&](std::int64_t id, const char* what) -> Status {
    if (id >= V) return Status::error(dir + ": " + what + " " + std::to_string(id) + " is outside the vocabulary");
    return Status();
  };
  for (std::int64_t w : m.bad_words) if (Status s = check(w, "bad_words_ids"); !s.ok() || w < 0) return s.ok() ? Status::error(dir + ": bad_words_ids must be >= 0") : s;
  for (std::int64_t x : {m.start_id, m.forced_bos, m.forced_eos})
    if (Status s = check(x, "token id"); !s.ok()) return s;
  if (m.kind == PretrainedModel::Kind::kSeq2Seq && m.start_id < 0)
    return Status::error(dir + ": no decoder_start_token_id");
  return Status();
}

}  // namespace

// --------------------------------------------------------------------------------------------------- public API

Status PretrainedModel::load(const std::string& directory, std::unique_ptr<PretrainedModel>* out,
                             const PretrainedOptions& options) {
  return no_throw([&]() -> Status {
    if (!out) return Status::error("load: null output");
    const std::string cpath = directory + "/config.json";
    if (!file_exists(cpath)) return Status::not_found(directory + ": no config.json (a Hugging Face model directory is expected)");
    std::string text;
    Status st = read_text(cpath, &text);
    Json j;
    if (st.ok()) st = parse_json(text, &j);
    if (!st.ok()) return Status::error(cpath + ": " + st.message());
    if (j.type != Json::kObject) return Status::error(cpath + ": expected a JSON object");
    HFConfig cfg(j, cpath);
    std::unique_ptr<PretrainedModel> model(new PretrainedModel());
    Impl& m = *model->impl_;
    m.dir = directory;
    m.model_type = cfg.str("model_type", "");
    if (const Json* a = cfg.get("architectures"); a && a->type == Json::kArray && !a->items.empty() &&
                                                  a->items[0].type == Json::kString)
      m.architecture = a->items[0].str;
    if (!cfg.status.ok()) return cfg.status;
    const std::string& t = m.model_type;
    if (t == "bert" || t == "roberta" || t == "xlm-roberta" || t == "distilbert" || t == "mpnet") m.kind = Kind::kEncoder;
    else if (t == "gpt2" || t == "llama" || t == "mistral" || t == "qwen2" || t == "qwen3" || t == "gemma") m.kind = Kind::kDecoder;
    else if (t == "marian" || t == "bart" || t == "t5") m.kind = Kind::kSeq2Seq;
    else if (t == "vit") m.kind = Kind::kVision;
    else
      return Status::error(cpath + ": model_type " + quoted(t) +
                           " is not supported (bert, roberta, xlm-roberta, distilbert, mpnet, gpt2, llama, mistral, "
                           "qwen2, qwen3, gemma, marian, bart, t5, vit)");
    st = head_of(m.architecture, m);
    if (!st.ok()) return Status::error(cpath + ": " + st.message());
    if (!options.task.empty()) {  // a task head on a checkpoint that may lack it
      const std::string& task = options.task;
      Head want = task == "text-classification"    ? Head::kSequenceClassification
                  : task == "token-classification" ? Head::kTokenClassification
                  : task == "question-answering"   ? Head::kQuestionAnswering
                  : task == "image-classification" ? Head::kImageClassification
                                                   : Head::kBase;
      if (want == Head::kBase)
        return Status::error("task " + quoted(task) + " is not supported (text-classification, token-classification, "
                             "question-answering, image-classification)");
      if ((m.kind == Kind::kVision) != (want == Head::kImageClassification) ||
          (m.kind != Kind::kEncoder && m.kind != Kind::kVision))
        return Status::error("task " + quoted(task) + " needs " +
                             (want == Head::kImageClassification ? "a ViT" : "an encoder (bert, roberta, xlm-roberta, "
                                                                             "distilbert, mpnet)") +
                             " checkpoint, not " + quoted(t));
      if (m.head != Head::kBase && m.head != want)
        return Status::error(cpath + ": architecture " + quoted(m.architecture) + " already has another head");
      m.head = want;
      m.ck.fresh_prefixes = {"classifier", "pre_classifier", "qa_outputs", "pooler."};
      m.ck.init_std = cfg.real("initializer_range", 0.02, 0, 10);
      m.ck.init_seed = options.init_seed;
    }
    cfg.forced_labels = options.num_labels;
    if (m.architecture.empty()) {  // no architectures: the family's usual model
      if (m.kind == Kind::kDecoder) m.head = Head::kCausalLM;
      if (m.kind == Kind::kSeq2Seq) m.head = Head::kSeq2SeqLM;
    }
    st = SafetensorsMap::open_directory(directory, &m.ck.map);
    if (!st.ok()) return st;
    m.ck.opt = options;
    m.ck.where = directory + (file_exists(directory + "/model.safetensors") ? "/model.safetensors"
                                                                          : "/model.safetensors.index.json");
    switch (m.kind) {
      case Kind::kEncoder: st = load_encoder(m, cfg); break;
      case Kind::kDecoder: st = load_decoder(m, cfg); break;
      case Kind::kSeq2Seq: st = load_seq2seq(m, cfg); break;
      case Kind::kVision: st = load_vit(m, cfg); break;
    }
    if (!st.ok()) return st;
    if (options.bf16_activations && m.ck.half_linears == 0)  // never a silently different (or unchanged) model
      return Status::error(directory + ": bf16 activations apply to 16-bit weights kept 16-bit, and this load has "
                           "none (a float32 checkpoint, dtype float32, or packed/int8/trainable weights)");
    for (const Stack* s : {&m.enc, &m.dec})
      for (const Layer& L : s->layers) block_check(L.cfg, L.w);
    st = load_generation(m, cfg, directory);
    if (!st.ok()) return st;
    *out = std::move(model);
    return Status();
  });
}

PretrainedModel::Kind PretrainedModel::kind() const { return impl_->kind; }
PretrainedModel::Head PretrainedModel::head() const { return impl_->head; }
const std::string& PretrainedModel::model_type() const { return impl_->model_type; }
const std::string& PretrainedModel::architecture() const { return impl_->architecture; }
std::int64_t PretrainedModel::hidden_size() const { return impl_->C; }
std::int64_t PretrainedModel::vocab_size() const { return impl_->V; }
std::int64_t PretrainedModel::num_labels() const { return impl_->labels; }
bool PretrainedModel::has_pooler() const { return !impl_->pooler.empty(); }
std::int64_t PretrainedModel::pad_token_id() const { return impl_->pad_id; }
std::int64_t PretrainedModel::decoder_start_token_id() const { return impl_->start_id; }
const std::vector<std::int64_t>& PretrainedModel::eos_token_ids() const { return impl_->eos; }
std::int64_t PretrainedModel::max_positions() const { return impl_->max_pos; }
std::uint64_t PretrainedModel::mapped_bytes() const { return impl_->ck.map->mapped_bytes(); }
std::uint64_t PretrainedModel::owned_bytes() const { return impl_->ck.owned_bytes(); }
std::int64_t PretrainedModel::head_width() const {
  switch (impl_->head) {
    case Head::kMaskedLM: case Head::kCausalLM: case Head::kSeq2SeqLM: return impl_->V;
    case Head::kBase: return impl_->C;
    default: return impl_->labels;
  }
}

Status PretrainedModel::hidden_states(const std::int64_t* ids, std::int64_t B, std::int64_t T,
                                      const std::int64_t* attention_mask, const std::int64_t* token_type_ids,
                                      std::vector<float>* out) const {
  return no_throw([&]() -> Status {
    const Impl& m = *impl_;
    if (!out || !ids) return Status::error("hidden_states: null argument");
    if (m.kind == Kind::kEncoder) {
      std::vector<std::uint8_t> padding;
      m.encode(m.enc, ids, B, T, attention_mask, token_type_ids, out, &padding);
      return Status();
    }
    if (m.kind == Kind::kDecoder) {
      m.decode_full(ids, B, T, attention_mask, out);
      return Status();
    }
    if (m.kind == Kind::kSeq2Seq) {  // the encoder's output
      std::vector<std::uint8_t> padding;
      m.encode_source(ids, B, T, attention_mask, out, &padding);
      return Status();
    }
    return Status::error("hidden_states: a vision model takes pixel values (vision_forward)");
  });
}

Status PretrainedModel::pooler_output(const std::int64_t* ids, std::int64_t B, std::int64_t T,
                                      const std::int64_t* attention_mask, const std::int64_t* token_type_ids,
                                      std::vector<float>* out) const {
  const Impl& m = *impl_;
  if (m.pooler.empty()) return Status::error("pooler_output: the checkpoint has no pooler");
  std::vector<float> h;
  Status st = hidden_states(ids, B, T, attention_mask, token_type_ids, &h);
  if (!st.ok()) return st;
  return no_throw([&]() -> Status {
    std::vector<float> first(static_cast<size_t>(B * m.C));
    for (std::int64_t b = 0; b < B; ++b) std::memcpy(&first[b * m.C], &h[b * T * m.C], sizeof(float) * m.C);
    Impl::run_head(m.pooler, first.data(), B, m.C, out);
    return Status();
  });
}

Status PretrainedModel::head_output(const std::int64_t* ids, std::int64_t B, std::int64_t T,
                                    const std::int64_t* attention_mask, const std::int64_t* token_type_ids,
                                    std::vector<float>* out) const {
  const Impl& m = *impl_;
  if (m.kind == Kind::kSeq2Seq || m.kind == Kind::kVision)
    return Status::error("head_output: use seq2seq_logits / vision_forward for this model");
  std::vector<float> h;
  Status st = hidden_states(ids, B, T, attention_mask, token_type_ids, &h);
  if (!st.ok()) return st;
  return no_throw([&]() -> Status {
    if (!out) return Status::error("head_output: null output");
    if (m.head == Head::kBase) {
      out->swap(h);
      return Status();
    }
    if (m.head == Head::kCausalLM) {
      m.lm_logits(h.data(), B * T, out);
      return Status();
    }
    if (m.head_on_first) {
      std::vector<float> first(static_cast<size_t>(B * m.C));
      for (std::int64_t b = 0; b < B; ++b) std::memcpy(&first[b * m.C], &h[b * T * m.C], sizeof(float) * m.C);
      if (m.head_on_pooler) {
        std::vector<float> pooled;
        Impl::run_head(m.pooler, first.data(), B, m.C, &pooled);
        first.swap(pooled);
      }
      Impl::run_head(m.head_ops, first.data(), B, m.C, out);
      return Status();
    }
    Impl::run_head(m.head_ops, h.data(), B * T, m.C, out);
    return Status();
  });
}

Status PretrainedModel::generate(const std::int64_t* ids, std::int64_t B, std::int64_t T,
                                 const std::int64_t* attention_mask, const GenerationOptions& options,
                                 std::vector<std::int64_t>* out, std::int64_t* new_tokens) const {
  return no_throw([&]() -> Status {
    if (impl_->kind != Kind::kDecoder) return Status::error("generate: not a decoder model (seq2seq_generate for encoder-decoders)");
    if (!out || !ids || !new_tokens) return Status::error("generate: null argument");
    decoder_generate(*impl_, ids, B, T, attention_mask, options, out, new_tokens);
    return Status();
  });
}

Status PretrainedModel::seq2seq_logits(const std::int64_t* src, std::int64_t B, std::int64_t S,
                                       const std::int64_t* src_mask, const std::int64_t* decoder_ids, std::int64_t Td,
                                       std::vector<float>* out) const {
  return no_throw([&]() -> Status {
    const Impl& m = *impl_;
    if (m.kind != Kind::kSeq2Seq) return Status::error("seq2seq_logits: not an encoder-decoder model");
    if (!out || !src || !decoder_ids) return Status::error("seq2seq_logits: null argument");
    std::vector<float> memory, x;
    std::vector<std::uint8_t> padding, dpad;
    m.encode_source(src, B, S, src_mask, &memory, &padding);
    m.check_inputs(decoder_ids, B, Td, nullptr, m.dec.word.rows, &dpad);
    x.resize(static_cast<size_t>(B * Td * m.C));
    m.embed(m.dec, decoder_ids, B, Td, nullptr, nullptr, x.data());
    BlockInput in;
    in.B = B, in.T = Td, in.causal = true;
    in.memory = memory.data(), in.S = S, in.memory_padding = padding.empty() ? nullptr : padding.data();
    m.run_stack(m.dec, x.data(), in);
    m.lm_logits(x.data(), B * Td, out);
    return Status();
  });
}

Status PretrainedModel::seq2seq_generate(const std::int64_t* src, std::int64_t B, std::int64_t S,
                                         const std::int64_t* src_mask, const GenerationOptions& options,
                                         std::vector<std::int64_t>* out, std::int64_t* length) const {
  return no_throw([&]() -> Status {
    if (impl_->kind != Kind::kSeq2Seq) return Status::error("seq2seq_generate: not an encoder-decoder model");
    if (!out || !src || !length) return Status::error("seq2seq_generate: null argument");
    seq2seq_generate_impl(*impl_, src, B, S, src_mask, options, out, length);
    return Status();
  });
}

Status PretrainedModel::vision_forward(const float* pixels, std::int64_t B, std::int64_t C, std::int64_t H,
                                       std::int64_t W, bool pooled, std::vector<float>* out) const {
  return no_throw([&]() -> Status {
    const Impl& m = *impl_;
    if (m.kind != Kind::kVision) return Status::error("vision_forward: not a vision model");
    if (!out || !pixels) return Status::error("vision_forward: null argument");
    if (B < 1 || C != m.channels || H != m.image || W != m.image)
      return Status::error("pixel_values must be (batch, " + std::to_string(m.channels) + ", " +
                           std::to_string(m.image) + ", " + std::to_string(m.image) + "), got (" + std::to_string(B) +
                           ", " + std::to_string(C) + ", " + std::to_string(H) + ", " + std::to_string(W) + ")");
    if (B > (1 << 20)) return Status::error("pixel_values: batch too large");
    for (std::int64_t i = 0; i < B * C * H * W; ++i)
      if (!std::isfinite(pixels[i])) return Status::error("pixel_values holds a non-finite value");
    const std::int64_t P = m.patch, G = m.image / P, N = G * G, K = C * P * P, D = m.C, T = N + 1;
    // Patches in row-major grid order, each flattened (channel, row, column): the convolution as one product.
    std::vector<float> patches(static_cast<size_t>(B * N * K));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t gy = 0; gy < G; ++gy)
        for (std::int64_t gx = 0; gx < G; ++gx) {
          float* dst = &patches[((b * N) + gy * G + gx) * K];
          for (std::int64_t c = 0; c < C; ++c)
            for (std::int64_t i = 0; i < P; ++i)
              std::memcpy(dst + (c * P + i) * P, pixels + ((b * C + c) * H + gy * P + i) * W + gx * P,
                          sizeof(float) * static_cast<size_t>(P));
        }
    std::vector<float> emb(static_cast<size_t>(B * N * D)), x(static_cast<size_t>(B * T * D));
    linear_forward(emb.data(), D, patches.data(), K, B * N, m.patch_proj);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t c = 0; c < D; ++c) x[b * T * D + c] = m.cls_token[c] + m.vit_positions[c];
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t c = 0; c < D; ++c)
          x[(b * T + 1 + n) * D + c] = emb[(b * N + n) * D + c] + m.vit_positions[(1 + n) * D + c];
    }
    BlockInput in;
    in.B = B, in.T = T;
    m.run_stack(m.enc, x.data(), in);
    if (m.head == Head::kBase && !pooled) {
      out->swap(x);
      return Status();
    }
    std::vector<float> first(static_cast<size_t>(B * D));
    for (std::int64_t b = 0; b < B; ++b) std::memcpy(&first[b * D], &x[b * T * D], sizeof(float) * D);
    if (pooled) {
      if (m.pooler.empty()) return Status::error("pooler_output: the checkpoint has no pooler");
      Impl::run_head(m.pooler, first.data(), B, D, out);
      return Status();
    }
    Impl::run_head(m.head_ops, first.data(), B, D, out);
    return Status();
  });
}

Status sentence_pooling(const float* hidden, std::int64_t B, std::int64_t T, std::int64_t C,
                        const std::int64_t* attention_mask, const PoolingModes& modes, std::vector<float>* out) {
  return no_throw([&]() -> Status {
    if (!hidden || !out) return Status::error("sentence_pooling: null argument");
    if (B < 1 || T < 1 || C < 1) return Status::error("sentence_pooling: empty input");
    const int n = modes.count();
    if (n == 0) return Status::error("sentence_pooling: no pooling mode enabled");
    out->assign(static_cast<size_t>(B * n * C), 0.0f);
    for (std::int64_t b = 0; b < B; ++b) {
      const float* h = hidden + b * T * C;
      const auto m = [&](std::int64_t t) -> float { return attention_mask ? static_cast<float>(attention_mask[b * T + t]) : 1.0f; };
      float* o = &(*out)[b * n * C];
      std::int64_t slot = 0;
      const auto next = [&]() { return o + (slot++) * C; };
      if (modes.cls) std::memcpy(next(), h, sizeof(float) * C);
      if (modes.max) {
        float* d = next();
        for (std::int64_t c = 0; c < C; ++c) {
          float best = -std::numeric_limits<float>::infinity();
          for (std::int64_t t = 0; t < T; ++t) best = std::max(best, m(t) ? h[t * C + c] : -1e9f);
          d[c] = best;
        }
      }
      float count = 0, wcount = 0;
      for (std::int64_t t = 0; t < T; ++t) count += m(t), wcount += m(t) * static_cast<float>(t + 1);
      if (modes.mean || modes.mean_sqrt_len) {
        std::vector<float> sum(static_cast<size_t>(C), 0.0f);
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t c = 0; c < C; ++c) sum[c] += h[t * C + c] * m(t);
        const float denom = std::max(count, 1e-9f);
        if (modes.mean) {
          float* d = next();
          for (std::int64_t c = 0; c < C; ++c) d[c] = sum[c] / denom;
        }
        if (modes.mean_sqrt_len) {
          float* d = next();
          for (std::int64_t c = 0; c < C; ++c) d[c] = sum[c] / std::sqrt(denom);
        }
      }
      if (modes.weighted_mean) {
        float* d = next();
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t c = 0; c < C; ++c) d[c] += h[t * C + c] * m(t) * static_cast<float>(t + 1);
        for (std::int64_t c = 0; c < C; ++c) d[c] /= std::max(wcount, 1e-9f);
      }
      if (modes.last_token) {
        float* d = next();
        std::int64_t last = T - 1;  // the last real token (T - 1 when there is none, as sentence-transformers)
        while (last >= 0 && !m(last)) --last;
        if (last < 0) last = T - 1;
        const float scale = m(last);
        for (std::int64_t c = 0; c < C; ++c) d[c] = h[last * C + c] * scale;
      }
      if (modes.normalize) {
        double ss = 0;
        for (std::int64_t c = 0; c < n * C; ++c) ss += static_cast<double>(o[c]) * o[c];
        const float norm = std::max(static_cast<float>(std::sqrt(ss)), 1e-12f);
        for (std::int64_t c = 0; c < n * C; ++c) o[c] /= norm;
      }
    }
    return Status();
  });
}

}  // namespace cpuformer

namespace cpuformer {

Status read_sentence_config(const std::string& directory, PoolingModes* modes, std::int64_t* max_seq_length) {
  return no_throw([&]() -> Status {
    if (!modes || !max_seq_length) return Status::error("read_sentence_config: null argument");
    *modes = PoolingModes();
    *max_seq_length = 0;
    const auto load = [](const std::string& path, Json* j) -> Status {
      std::string text;
      Status st = read_text(path, &text);
      if (st.ok()) st = parse_json(text, j);
      return st.ok() ? Status() : Status::error(path + ": " + st.message());
    };
    const std::string mpath = directory + "/modules.json";
    if (!file_exists(mpath)) return Status();
    Json modules;
    Status st = load(mpath, &modules);
    if (!st.ok()) return st;
    if (modules.type != Json::kArray) return Status::error(mpath + ": expected a list of modules");
    for (const Json& mod : modules.items) {
      const Json* type = mod.find("type");
      const Json* path = mod.find("path");
      if (!type || type->type != Json::kString) return Status::error(mpath + ": a module without a type");
      const std::string kind = type->str.substr(type->str.rfind('.') + 1);
      const std::string sub = directory + "/" + (path && path->type == Json::kString ? path->str : "");
      if (kind == "Normalize") {
        modes->normalize = true;
      } else if (kind == "Pooling") {
        const std::string ppath = sub + "/config.json";
        if (!file_exists(ppath)) continue;
        Json pc;
        st = load(ppath, &pc);
        if (!st.ok()) return st;
        HFConfig c(pc, ppath);
        modes->cls = c.flag("pooling_mode_cls_token", false), modes->max = c.flag("pooling_mode_max_tokens", false);
        modes->mean = c.flag("pooling_mode_mean_tokens", true);
        modes->mean_sqrt_len = c.flag("pooling_mode_mean_sqrt_len_tokens", false);
        modes->weighted_mean = c.flag("pooling_mode_weightedmean_tokens", false);
        modes->last_token = c.flag("pooling_mode_lasttoken", false);
        if (!c.flag("include_prompt", true)) c.error("include_prompt=false is not supported");
        if (!c.status.ok()) return c.status;
      } else if (kind == "Transformer") {
        const std::string spath = sub + "/sentence_bert_config.json";
        if (!file_exists(spath)) continue;
        Json sc;
        st = load(spath, &sc);
        if (!st.ok()) return st;
        HFConfig c(sc, spath);
        *max_seq_length = c.integer("max_seq_length", 0, 0);
        if (!c.status.ok()) return c.status;
      } else {
        return Status::error(mpath + ": module type " + quoted(type->str) +
                             " is not supported here (Transformer, Pooling, Normalize)");
      }
    }
    return Status();
  });
}

}  // namespace cpuformer

namespace cpuformer {

// ------------------------------------------------------------------------------------------ continuous batching

struct DecoderBatch::Impl {
  std::shared_ptr<const PretrainedModel> owner;
  const PretrainedModel::Impl* m = nullptr;
  std::int64_t slots = 0, capacity = 0;
  std::vector<KVCache> caches;                      // one per layer, `slots` rows
  std::vector<std::vector<std::int64_t>> history;   // each slot's tokens (the rules look at them)
  std::vector<std::int64_t> max_length;             // each slot's prompt + max_new_tokens

  void logits_of(const float* x, index_t rows, const std::vector<std::int64_t>& which, std::vector<float>* out) {
    std::vector<std::int64_t> all(static_cast<size_t>(rows));
    for (index_t r = 0; r < rows; ++r) all[r] = r;
    rows_to_logits(*m, m->dec, x, all, out);
    for (index_t r = 0; r < rows; ++r) {
      const auto& h = history[which[r]];
      process_logits(*m, &(*out)[r * m->V], m->V, m->eos, h.data(), static_cast<std::int64_t>(h.size()),
                     max_length[which[r]]);
    }
  }
};

DecoderBatch::DecoderBatch() : impl_(new Impl) {}
DecoderBatch::~DecoderBatch() = default;

Status DecoderBatch::create(std::shared_ptr<const PretrainedModel> model, std::int64_t slots, std::int64_t capacity,
                            std::unique_ptr<DecoderBatch>* out) {
  return no_throw([&]() -> Status {
    if (!model || !out) return Status::error("DecoderBatch: null argument");
    if (model->kind() != PretrainedModel::Kind::kDecoder) return Status::error("DecoderBatch: not a decoder model");
    if (slots < 1 || slots > 4096) return Status::error("DecoderBatch: slots must be in [1, 4096]");
    if (capacity < 1 || capacity > (1 << 20)) return Status::error("DecoderBatch: capacity must be in [1, 2^20]");
    const PretrainedModel::Impl& m = *model->impl_;
    if (m.max_pos && capacity > m.max_pos)
      return Status::error("DecoderBatch: capacity " + std::to_string(capacity) + " is past the model's " +
                           std::to_string(m.max_pos) + " positions");
    std::unique_ptr<DecoderBatch> b(new DecoderBatch());
    Impl& d = *b->impl_;
    d.owner = std::move(model), d.m = &m, d.slots = slots, d.capacity = capacity;
    reset_caches(m.dec, slots, capacity, &d.caches);
    d.history.assign(static_cast<size_t>(slots), {});
    d.max_length.assign(static_cast<size_t>(slots), 0);
    *out = std::move(b);
    return Status();
  });
}

Status DecoderBatch::prefill(std::int64_t slot, const std::vector<std::int64_t>& prompt, std::int64_t max_new_tokens,
                             std::vector<float>* logits) {
  return no_throw([&]() -> Status {
    Impl& d = *impl_;
    const PretrainedModel::Impl& m = *d.m;
    if (!logits) return Status::error("prefill: null output");
    if (slot < 0 || slot >= d.slots) return Status::error("prefill: slot " + std::to_string(slot) + " out of range");
    const auto T = static_cast<index_t>(prompt.size());
    if (T < 1) return Status::error("prefill: the prompt is empty");
    if (max_new_tokens < 0 || T + max_new_tokens > d.capacity)
      return Status::error("prefill: prompt (" + std::to_string(T) + ") + max_new_tokens (" +
                           std::to_string(max_new_tokens) + ") exceeds the capacity " + std::to_string(d.capacity));
    std::vector<std::uint8_t> none;
    m.check_inputs(prompt.data(), 1, T, nullptr, m.dec.word.rows, &none);
    // The prompt alone through one-row caches, then its keys and values into the slot's row.
    std::vector<KVCache> one;
    reset_caches(m.dec, 1, T, &one);
    std::vector<float> x(static_cast<size_t>(T * m.C));
    const std::int64_t zero = 0;
    m.embed(m.dec, prompt.data(), 1, T, nullptr, &zero, x.data());
    const std::int64_t last = T - 1;  // the last block carries only the last token past its keys and values
    for (std::size_t l = 0; l < m.dec.layers.size(); ++l) {
      block_decode(x.data(), x.data(), m.dec.layers[l].cfg, m.dec.layers[l].w, 1, T, nullptr, one[l], nullptr, nullptr,
                   l + 1 == m.dec.layers.size() ? &last : nullptr);
      KVCache& c = d.caches[l];
      std::copy_n(one[l].k.data(), T * c.width, c.k.data() + slot * c.capacity * c.width);
      std::copy_n(one[l].v.data(), T * c.width, c.v.data() + slot * c.capacity * c.width);
      c.length[slot] = T;
    }
    d.history[slot] = prompt;
    d.max_length[slot] = T + max_new_tokens;
    d.logits_of(x.data(), 1, {slot}, logits);
    return Status();
  });
}

Status DecoderBatch::step(const std::vector<std::int64_t>& slots, const std::vector<std::int64_t>& tokens,
                          std::vector<float>* logits) {
  return no_throw([&]() -> Status {
    Impl& d = *impl_;
    const PretrainedModel::Impl& m = *d.m;
    if (!logits) return Status::error("step: null output");
    if (slots.size() != tokens.size() || slots.empty()) return Status::error("step: one token per slot, at least one");
    std::vector<std::int64_t> feed(static_cast<size_t>(d.slots), 0), n_new(static_cast<size_t>(d.slots), 0),
        pos(static_cast<size_t>(d.slots));
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const std::int64_t s = slots[i];
      if (s < 0 || s >= d.slots) return Status::error("step: slot " + std::to_string(s) + " out of range");
      if (n_new[s]) return Status::error("step: slot " + std::to_string(s) + " listed twice");
      if (d.history[s].empty()) return Status::error("step: slot " + std::to_string(s) + " was not prefilled");
      if (tokens[i] < 0 || tokens[i] >= m.V)
        return Status::error("step: token " + std::to_string(tokens[i]) + " is outside the vocabulary");
      if (d.caches[0].length[s] >= d.capacity) return Status::error("step: slot " + std::to_string(s) + " is full");
      feed[s] = tokens[i], n_new[s] = 1;
    }
    for (std::int64_t s = 0; s < d.slots; ++s) pos[s] = d.caches[0].length[s];
    std::vector<float> x(static_cast<size_t>(d.slots * m.C));
    m.embed(m.dec, feed.data(), d.slots, 1, nullptr, pos.data(), x.data());
    for (std::size_t l = 0; l < m.dec.layers.size(); ++l)
      block_decode(x.data(), x.data(), m.dec.layers[l].cfg, m.dec.layers[l].w, d.slots, 1, n_new.data(), d.caches[l]);
    std::vector<float> rows(slots.size() * static_cast<size_t>(m.C));
    for (std::size_t i = 0; i < slots.size(); ++i) {
      std::copy_n(&x[slots[i] * m.C], m.C, &rows[i * m.C]);
      d.history[slots[i]].push_back(tokens[i]);
    }
    d.logits_of(rows.data(), static_cast<index_t>(slots.size()), slots, logits);
    return Status();
  });
}

std::int64_t DecoderBatch::length(std::int64_t slot) const {
  return slot >= 0 && slot < impl_->slots ? static_cast<std::int64_t>(impl_->history[slot].size()) : 0;
}
std::int64_t DecoderBatch::slots() const { return impl_->slots; }
std::int64_t DecoderBatch::capacity() const { return impl_->capacity; }
std::int64_t DecoderBatch::vocab_size() const { return impl_->m->V; }

struct TokenSampler::Impl {
  GenerationOptions o;
  std::mt19937_64 rng;
};
TokenSampler::TokenSampler(const GenerationOptions& options) : impl_(new Impl{options, std::mt19937_64(options.seed)}) {}
TokenSampler::~TokenSampler() = default;
std::int64_t TokenSampler::next(const float* logits, std::int64_t V) { return pick(logits, V, impl_->o, impl_->rng); }

}  // namespace cpuformer

namespace cpuformer {

// ------------------------------------------------------------------------------------------------ fine-tuning

namespace {

using PImpl = PretrainedModel::Impl;

// One stack's training forward: its inputs and everything its backward needs.
struct StackRun {
  index_t B = 0, T = 0;
  std::vector<std::int64_t> ids, types, start, pos;
  std::vector<std::uint8_t> padding;
  BlockInput in;
  std::vector<float> raw, emb_mean, emb_rstd;   // the embeddings before their norm, and its statistics
  std::uint64_t seed = 0;
  bool dropout = true, recompute = false;
  std::vector<std::vector<float>> inputs;       // recompute: each block's input
  std::vector<BlockSaved> saved;                // one per block (one in all when recomputing)
  std::vector<float> pre_final, fin_mean, fin_rstd;
};

void norm_train_forward(const Norm& n, float* out, std::vector<float>* mean, std::vector<float>* rstd,
                        const float* in, index_t rows, index_t C) {
  mean->resize(static_cast<size_t>(rows)), rstd->resize(static_cast<size_t>(rows));
  if (n.kind == NormKind::kLayerNorm)
    layernorm_forward(out, mean->data(), rstd->data(), in, n.ref.weight, n.ref.bias, rows, C, n.eps);
  else
    rmsnorm_forward(out, rstd->data(), in, n.ref.weight, rows, C, n.eps, n.one_plus);
}

}  // namespace

struct TrainState::Impl {
  const PretrainedModel* model = nullptr;
  TrainOptions options;
  bool valid = false;
  StackRun enc, dec;
  std::vector<float> memory;                 // seq2seq: the encoder's output
  std::vector<std::vector<float>> head_in;   // each head step's input
  std::vector<HeadOp> head_ops;
  index_t head_rows = 0;
  bool first_only = false;                   // the head read each row's first token
  std::vector<float> lm_in;                  // causal / seq2seq LM: the (scaled) hidden states
  std::vector<float> patches;                // vision
  index_t out_size = 0;
};

TrainState::TrainState() : impl(new Impl) {}
TrainState::~TrainState() = default;

namespace {

struct Trainer {
  const PImpl& m;
  const std::map<const float*, std::vector<float>>& grads;

  float* g(const float* p) const {
    if (!p) return nullptr;
    auto it = grads.find(p);
    return it == grads.end() ? nullptr : const_cast<float*>(it->second.data());
  }
  LinearGrads lg(const LinearRef& l) const { return {g(l.weight), g(l.bias)}; }

  // LoRA dropout of this step: copies of the model's adapters with training set and each one's mask seed
  // (lora_dropout_seed(step seed, its index)), the model's own adapters untouched (inference may run meanwhile).
  // Forward and backward build the same copies from the step's seed, so the masks are regenerated, never stored.
  std::deque<LoraAdapter> lora_copies{};
  std::map<const LoraAdapter*, const LoraAdapter*> lora_of{};

  void lora_step(std::uint64_t step_seed, bool dropout) {
    std::uint64_t index = 0;
    for (const auto& l : m.loras) {
      if (dropout && l.ref.dropout > 0.0f) {
        lora_copies.push_back(l.ref);
        lora_copies.back().training = true;
        lora_copies.back().seed = lora_dropout_seed(step_seed, index);
        lora_of[&l.ref] = &lora_copies.back();
      }
      ++index;
    }
  }
  // w with this step's adapter (itself when it has none that drops).
  LinearRef lin(const LinearRef& w) const {
    if (!w.lora || lora_of.empty()) return w;
    auto it = lora_of.find(w.lora);
    if (it == lora_of.end()) return w;
    LinearRef c = w;
    c.lora = it->second;
    return c;
  }
  BlockWeights block(const BlockWeights& w) const {
    BlockWeights c = w;
    if (lora_of.empty()) return c;
    for (AttentionWeights* a : {&c.self_attn, &c.cross_attn})
      for (LinearRef* l : {&a->qkv, &a->q, &a->k, &a->v, &a->kv, &a->o}) *l = lin(*l);
    for (LinearRef* l : {&c.ff.up, &c.ff.gate, &c.ff.down}) *l = lin(*l);
    return c;
  }
  AttentionGrads ag(const AttentionWeights& a) const {
    AttentionGrads r;
    r.qkv = lg(a.qkv), r.q = lg(a.q), r.k = lg(a.k), r.v = lg(a.v), r.kv = lg(a.kv), r.o = lg(a.o);
    r.q_norm = g(a.q_norm), r.k_norm = g(a.k_norm), r.relative_table = g(a.relative_table);
    return r;
  }
  BlockGrads bg(const BlockWeights& w) const {
    BlockGrads r;
    r.self_attn = ag(w.self_attn), r.cross_attn = ag(w.cross_attn);
    r.norm1 = {g(w.norm1.weight), g(w.norm1.bias)}, r.norm2 = {g(w.norm2.weight), g(w.norm2.bias)};
    r.norm_ff = {g(w.norm_ff.weight), g(w.norm_ff.bias)};
    r.ff.up_w = g(w.ff.up.weight), r.ff.up_b = g(w.ff.up.bias), r.ff.gate_w = g(w.ff.gate.weight);
    r.ff.gate_b = g(w.ff.gate.bias), r.ff.down_w = g(w.ff.down.weight), r.ff.down_b = g(w.ff.down.bias);
    return r;
  }

  void norm_backward(const Norm& n, float* din, const float* dout, const float* in, const std::vector<float>& mean,
                     const std::vector<float>& rstd, index_t rows, index_t C) const {
    if (n.kind == NormKind::kLayerNorm)
      layernorm_backward(din, g(n.ref.weight), g(n.ref.bias), dout, in, n.ref.weight, mean.data(), rstd.data(), rows,
                         C);
    else
      rmsnorm_backward(din, g(n.ref.weight), dout, in, n.ref.weight, rstd.data(), rows, C, n.one_plus);
  }

  // Embeddings (with their norm and dropout) of r.ids into x (B*T, C).
  void embed_forward(const Stack& s, StackRun& r, float* x) const {
    const index_t n = r.B * r.T;
    m.embed_raw(s, r.ids.data(), r.B, r.T, r.types.empty() ? nullptr : r.types.data(),
                r.start.empty() ? nullptr : r.start.data(), x);
    if (s.positions != Positions::kNone && s.positions != Positions::kSinusoid)
      r.pos = m.position_rows(s, r.ids.data(), r.B, r.T, r.start.empty() ? nullptr : r.start.data());
    if (s.embed_norm.present) {
      r.raw.assign(x, x + n * s.C);
      norm_train_forward(s.embed_norm, x, &r.emb_mean, &r.emb_rstd, r.raw.data(), n, s.C);
    }
    if (r.dropout && s.embed_dropout > 0) dropout_forward(x, nullptr, x, n * s.C, s.embed_dropout, r.seed);
  }
  void embed_backward(const Stack& s, StackRun& r, float* dx) const {
    const index_t n = r.B * r.T, C = s.C;
    if (r.dropout && s.embed_dropout > 0) dropout_backward(dx, dx, n * C, s.embed_dropout, r.seed);
    std::vector<float> d(dx, dx + n * C);
    if (s.embed_norm.present) norm_backward(s.embed_norm, d.data(), dx, r.raw.data(), r.emb_mean, r.emb_rstd, n, C);
    if (float* gp = g(s.position.f); gp && !r.pos.empty())
      embedding_backward(gp, d.data(), r.pos.data(), n, s.position.rows, C, s.position_padding_idx);
    if (float* gt = g(s.token_type.f)) {
      std::vector<std::int64_t> zeros;
      const std::int64_t* types = r.types.empty() ? (zeros.assign(static_cast<size_t>(n), 0), zeros.data()) : r.types.data();
      embedding_backward(gt, d.data(), types, n, s.token_type.rows, C, -1);
    }
    if (float* gw = g(s.word.f)) {
      if (s.embed_scale != 1.0f)
        for (float& v : d) v *= s.embed_scale;
      embedding_backward(gw, d.data(), r.ids.data(), n, s.word.rows, C, s.word_padding_idx);
    }
  }

  // Whether backward reads the feed-forward's activation: for its down projection's weight gradient or adapter.
  bool keeps_ff_activation(const BlockWeights& w) const { return g(w.ff.down.weight) != nullptr || w.ff.down.lora; }

  // The blocks and the final norm over x (B*T, C) in place.
  void blocks_forward(const Stack& s, StackRun& r, std::vector<float>& x) const {
    const index_t L = static_cast<index_t>(s.layers.size()), n = r.B * r.T * s.C;
    r.saved.resize(r.recompute ? 1 : static_cast<size_t>(L));
    r.inputs.assign(r.recompute ? static_cast<size_t>(L) : 0, {});
    std::vector<float> y(static_cast<size_t>(n));
    for (index_t l = 0; l < L; ++l) {
      BlockConfig c = s.layers[l].cfg;
      if (!r.dropout) c.dropout = c.attention_dropout = c.ff_dropout = 0.0f;
      if (r.recompute) r.inputs[l] = x;
      const BlockWeights w = block(s.layers[l].w);
      BlockSaved& sv = r.saved[r.recompute ? 0 : l];
      sv.keep_ff_activation = keeps_ff_activation(w);
      block_forward_train(y.data(), x.data(), c, w, r.in, r.seed + 1 + l, sv);
      x.swap(y);
    }
    if (s.final_norm.present) {
      r.pre_final = x;
      norm_train_forward(s.final_norm, x.data(), &r.fin_mean, &r.fin_rstd, r.pre_final.data(), r.B * r.T, s.C);
    }
  }
  // dx (B*T, C) of the stack's output -> of its embeddings (in place); dmemory accumulated for cross-attention.
  void blocks_backward(const Stack& s, StackRun& r, std::vector<float>& dx, float* dmemory) const {
    const index_t L = static_cast<index_t>(s.layers.size()), rows = r.B * r.T;
    std::vector<float> d(dx.size());
    if (s.final_norm.present) {
      norm_backward(s.final_norm, d.data(), dx.data(), r.pre_final.data(), r.fin_mean, r.fin_rstd, rows, s.C);
      dx.swap(d);
    }
    std::vector<float> tmp;
    for (index_t l = L - 1; l >= 0; --l) {
      BlockConfig c = s.layers[l].cfg;
      if (!r.dropout) c.dropout = c.attention_dropout = c.ff_dropout = 0.0f;
      BlockSaved& sv = r.saved[r.recompute ? 0 : l];
      const BlockWeights w = block(s.layers[l].w);
      if (r.recompute) {  // the block's activations again, from its input and its dropout seed
        tmp.resize(dx.size());
        sv.keep_ff_activation = keeps_ff_activation(w);
        block_forward_train(tmp.data(), r.inputs[l].data(), c, w, r.in, r.seed + 1 + l, sv);
      }
      block_backward(d.data(), dmemory, dx.data(), c, w, bg(w), sv);
      dx.swap(d);
    }
  }

  void head_forward(TrainState::Impl& st, const std::vector<HeadOp>& ops, const float* x, index_t rows,
                    index_t width, std::vector<float>* out) const {
    st.head_ops = ops;
    st.head_in.clear();
    st.head_rows = rows;
    std::vector<float> cur(x, x + rows * width);
    for (const HeadOp& op : ops) {
      st.head_in.push_back(cur);
      switch (op.kind) {
        case HeadOp::kLinear: {
          std::vector<float> next(static_cast<size_t>(rows * op.lin.out));
          linear_forward(next.data(), op.lin.out, cur.data(), width, rows, lin(op.lin));
          width = op.lin.out;
          cur.swap(next);
          break;
        }
        case HeadOp::kAct: activation_forward(cur.data(), cur.data(), nullptr, rows, width, op.act); break;
        case HeadOp::kTanh:
          for (float& v : cur) v = std::tanh(v);
          break;
        case HeadOp::kNorm: op.norm.apply(cur.data(), cur.data(), rows, width); break;
      }
    }
    out->swap(cur);
  }
  // d(out) -> d(head input) (rows, width of the first step's input).
  std::vector<float> head_backward(TrainState::Impl& st, const float* dout, index_t out_width) const {
    const index_t rows = st.head_rows;
    std::vector<float> dy(dout, dout + rows * out_width), dx;
    for (index_t i = static_cast<index_t>(st.head_ops.size()) - 1; i >= 0; --i) {
      const HeadOp& op = st.head_ops[i];
      const std::vector<float>& in = st.head_in[i];
      const index_t width = static_cast<index_t>(in.size()) / rows;
      dx.assign(in.size(), 0.0f);
      switch (op.kind) {
        case HeadOp::kLinear:
          linear_backward(dx.data(), width, false, g(op.lin.weight), g(op.lin.bias), dy.data(), op.lin.out, in.data(),
                          width, rows, lin(op.lin));
          break;
        case HeadOp::kAct: activation_backward(dx.data(), nullptr, dy.data(), in.data(), nullptr, rows, width, op.act); break;
        case HeadOp::kTanh:
          for (std::size_t j = 0; j < dx.size(); ++j) {
            const float t = std::tanh(in[j]);
            dx[j] = dy[j] * (1.0f - t * t);
          }
          break;
        case HeadOp::kNorm: {
          std::vector<float> mean, rstd, tmp(in.size());
          norm_train_forward(op.norm, tmp.data(), &mean, &rstd, in.data(), rows, width);
          norm_backward(op.norm, dx.data(), dy.data(), in.data(), mean, rstd, rows, width);
          break;
        }
      }
      dy.swap(dx);
    }
    return dy;
  }
};

}  // namespace

namespace {
// Each adapter's gradient pointers follow its parameters' requires_grad.
void refresh_lora_grads(PretrainedModel::Impl& m) {
  for (auto& l : m.loras) {
    auto ga = m.grads.find(l.a.data()), gb = m.grads.find(l.b.data());
    l.ref.grad_a = ga == m.grads.end() ? nullptr : ga->second.data();
    l.ref.grad_b = gb == m.grads.end() ? nullptr : gb->second.data();
  }
}
}  // namespace

std::vector<PretrainedModel::Parameter> PretrainedModel::parameters() const {
  std::vector<Parameter> out;
  for (const auto& p : impl_->ck.params) {
    auto it = impl_->grads.find(p.data);
    out.push_back({p.name, p.shape, p.data, it == impl_->grads.end() ? nullptr : it->second.data()});
  }
  return out;
}

Status PretrainedModel::set_requires_grad(const std::string& name, bool requires_grad) {
  return no_throw([&]() -> Status {
    Impl& m = *impl_;
    for (const auto& p : m.ck.params) {
      if (p.name != name) continue;
      if (p.data == m.final_logits_bias) return Status::error(name + " is a buffer, not a parameter");
      if (!requires_grad) {
        m.grads.erase(p.data);
      } else if (!m.grads.count(p.data)) {
        std::int64_t n = 1;
        for (auto d : p.shape) n *= d;
        m.grads[p.data].assign(static_cast<size_t>(n), 0.0f);
      }
      refresh_lora_grads(m);
      return Status();
    }
    return Status::error("set_requires_grad: no parameter named " + quoted(name) +
                         (m.ck.opt.trainable ? "" : " (the model was not loaded trainable: only new heads and LoRA "
                                                    "adapters are parameters)"));
  });
}

void PretrainedModel::zero_grad() {
  // One even split of all the gradients' elements between the threads (a MiniLM's 90 MB took 12 ms on one).
  std::vector<std::pair<float*, index_t>> spans;
  index_t total = 0;
  for (auto& [p, g] : impl_->grads) {
    spans.emplace_back(g.data(), static_cast<index_t>(g.size()));
    total += static_cast<index_t>(g.size());
  }
  detail::parallel_for(total, 1 << 18, [&](index_t i0, index_t i1, int) {
    index_t offset = 0;
    for (const auto& [data, n] : spans) {
      const index_t b = std::max(i0, offset), e = std::min(i1, offset + n);
      if (b < e) std::memset(data + (b - offset), 0, sizeof(float) * static_cast<size_t>(e - b));
      offset += n;
      if (offset >= i1) break;
    }
  });
}

Status PretrainedModel::train_forward(const TrainInputs& in, const TrainOptions& options, TrainState* state,
                                      std::vector<float>* out) {
  return no_throw([&]() -> Status {
    Impl& m = *impl_;
    if (!state || !out) return Status::error("train_forward: null argument");
    TrainState::Impl& st = *state->impl;
    // The blocks' saved activations and work buffers are kept from step to step (grown, never shrunk): fresh
    // multi-megabyte buffers cost a page fault and a zeroed page per 4 KB on every step (a tenth of a MiniLM step).
    std::vector<BlockSaved> enc_saved = std::move(st.enc.saved), dec_saved = std::move(st.dec.saved);
    st = TrainState::Impl();
    st.enc.saved = std::move(enc_saved), st.dec.saved = std::move(dec_saved);
    st.model = this, st.options = options;
    Trainer tr{m, m.grads};
    tr.lora_step(options.seed, options.dropout);
    const auto setup = [&](StackRun& r, const std::int64_t* ids, index_t B, index_t T, const std::int64_t* types,
                           std::uint64_t seed) {
      r.B = B, r.T = T, r.seed = seed, r.dropout = options.dropout, r.recompute = options.recompute;
      r.ids.assign(ids, ids + B * T);
      if (types) r.types.assign(types, types + B * T);
      r.in.B = B, r.in.T = T;
    };
    if (m.kind == Kind::kVision) {
      if (!in.pixels) return Status::error("train_forward: a vision model needs pixels");
      if (in.B < 1 || in.C != m.channels || in.H != m.image || in.W != m.image)
        return Status::error("train_forward: pixel_values must be (batch, " + std::to_string(m.channels) + ", " +
                             std::to_string(m.image) + ", " + std::to_string(m.image) + ")");
      const index_t B = in.B, P = m.patch, G = m.image / P, N = G * G, K = in.C * P * P, D = m.C, T = N + 1;
      st.patches.resize(static_cast<size_t>(B * N * K));
      for (index_t b = 0; b < B; ++b)
        for (index_t gy = 0; gy < G; ++gy)
          for (index_t gx = 0; gx < G; ++gx)
            for (index_t c = 0; c < in.C; ++c)
              for (index_t i = 0; i < P; ++i)
                std::memcpy(&st.patches[((b * N + gy * G + gx) * K) + (c * P + i) * P],
                            in.pixels + ((b * in.C + c) * in.H + gy * P + i) * in.W + gx * P, sizeof(float) * P);
      std::vector<float> emb(static_cast<size_t>(B * N * D)), x(static_cast<size_t>(B * T * D));
      linear_forward(emb.data(), D, st.patches.data(), K, B * N, tr.lin(m.patch_proj));
      for (index_t b = 0; b < B; ++b) {
        for (index_t c = 0; c < D; ++c) x[b * T * D + c] = m.cls_token[c] + m.vit_positions[c];
        for (index_t n = 0; n < N; ++n)
          for (index_t c = 0; c < D; ++c)
            x[(b * T + 1 + n) * D + c] = emb[(b * N + n) * D + c] + m.vit_positions[(1 + n) * D + c];
      }
      StackRun& r = st.enc;
      r.B = B, r.T = T, r.seed = options.seed, r.dropout = options.dropout, r.recompute = options.recompute;
      r.in.B = B, r.in.T = T;
      tr.blocks_forward(m.enc, r, x);
      if (m.head == Head::kBase) {
        st.head_rows = B * T;
        out->swap(x);
      } else {
        std::vector<float> first(static_cast<size_t>(B * D));
        for (index_t b = 0; b < B; ++b) std::memcpy(&first[b * D], &x[b * T * D], sizeof(float) * D);
        st.first_only = true;
        tr.head_forward(st, m.head_ops, first.data(), B, D, out);
      }
      st.out_size = static_cast<index_t>(out->size());
      st.valid = true;
      return Status();
    }
    if (!in.ids) return Status::error("train_forward: null input ids");
    if (m.kind == Kind::kSeq2Seq) {
      if (!in.decoder_ids || in.Td < 1) return Status::error("train_forward: an encoder-decoder needs decoder_ids");
      StackRun& e = st.enc;
      setup(e, in.ids, in.B, in.T, nullptr, options.seed);
      m.check_inputs(in.ids, in.B, in.T, in.attention_mask, m.enc.word.rows, &e.padding);
      e.in.key_padding = e.padding.empty() ? nullptr : e.padding.data();
      st.memory.resize(static_cast<size_t>(in.B * in.T * m.C));
      tr.embed_forward(m.enc, e, st.memory.data());
      tr.blocks_forward(m.enc, e, st.memory);
      StackRun& d = st.dec;
      setup(d, in.decoder_ids, in.B, in.Td, nullptr, options.seed + 7919);
      std::vector<std::uint8_t> none;
      m.check_inputs(in.decoder_ids, in.B, in.Td, nullptr, m.dec.word.rows, &none);
      d.in.causal = true, d.in.memory = st.memory.data(), d.in.S = in.T;
      d.in.memory_padding = e.in.key_padding;
      std::vector<float> x(static_cast<size_t>(in.B * in.Td * m.C));
      tr.embed_forward(m.dec, d, x.data());
      tr.blocks_forward(m.dec, d, x);
      st.lm_in = x;
      if (m.output_scale != 1.0f)
        for (float& v : st.lm_in) v *= m.output_scale;
      out->resize(static_cast<size_t>(in.B * in.Td * m.V));
      linear_forward(out->data(), m.V, st.lm_in.data(), m.C, in.B * in.Td, tr.lin(m.lm_head));
      if (m.final_logits_bias)
        for (index_t r = 0; r < in.B * in.Td; ++r)
          for (index_t v = 0; v < m.V; ++v) (*out)[r * m.V + v] += m.final_logits_bias[v];
      st.head_rows = in.B * in.Td;
      st.out_size = static_cast<index_t>(out->size());
      st.valid = true;
      return Status();
    }
    const bool decoder = m.kind == Kind::kDecoder;
    const Stack& s = decoder ? m.dec : m.enc;
    StackRun& r = decoder ? st.dec : st.enc;
    setup(r, in.ids, in.B, in.T, decoder ? nullptr : in.token_type_ids, options.seed);
    m.check_inputs(in.ids, in.B, in.T, in.attention_mask, s.word.rows, &r.padding);
    r.in.key_padding = r.padding.empty() ? nullptr : r.padding.data();
    if (decoder) {
      std::vector<std::int64_t> first, count;
      PImpl::real_span(in.attention_mask, in.B, in.T, &first, &count);
      r.start.resize(static_cast<size_t>(in.B));
      for (index_t b = 0; b < in.B; ++b) r.start[b] = -first[b];
      r.in.causal = true, r.in.position_offset = r.start.data();
    } else if (in.token_type_ids && s.token_type.present()) {
      for (index_t i = 0; i < in.B * in.T; ++i)
        if (in.token_type_ids[i] < 0 || in.token_type_ids[i] >= s.token_type.rows)
          return Status::error("token_type_ids: " + std::to_string(in.token_type_ids[i]) + " is out of range");
    }
    std::vector<float> x(static_cast<size_t>(in.B * in.T * m.C));
    tr.embed_forward(s, r, x.data());
    tr.blocks_forward(s, r, x);
    const index_t rows = in.B * in.T;
    if (m.head == Head::kBase) {
      st.head_rows = rows;
      out->swap(x);
    } else if (m.head == Head::kCausalLM) {
      st.lm_in = x;
      st.head_rows = rows;
      out->resize(static_cast<size_t>(rows * m.V));
      linear_forward(out->data(), m.V, x.data(), m.C, rows, tr.lin(m.lm_head));
    } else {
      std::vector<HeadOp> ops = m.head_on_pooler ? m.pooler : std::vector<HeadOp>{};
      ops.insert(ops.end(), m.head_ops.begin(), m.head_ops.end());
      if (m.head_on_first) {
        std::vector<float> first(static_cast<size_t>(in.B * m.C));
        for (index_t b = 0; b < in.B; ++b) std::memcpy(&first[b * m.C], &x[b * in.T * m.C], sizeof(float) * m.C);
        st.first_only = true;
        tr.head_forward(st, ops, first.data(), in.B, m.C, out);
      } else {
        tr.head_forward(st, ops, x.data(), rows, m.C, out);
      }
    }
    st.out_size = static_cast<index_t>(out->size());
    st.valid = true;
    return Status();
  });
}

Status PretrainedModel::train_backward(TrainState* state, const float* dout) {
  return no_throw([&]() -> Status {
    Impl& m = *impl_;
    if (!state || !dout) return Status::error("train_backward: null argument");
    TrainState::Impl& st = *state->impl;
    if (!st.valid || st.model != this) return Status::error("train_backward: no train_forward of this model to go back through");
    st.valid = false;
    Trainer tr{m, m.grads};
    tr.lora_step(st.options.seed, st.options.dropout);
    // d(stack output) from d(out), through the head.
    const auto through_head = [&](index_t B, index_t T) {
      std::vector<float> dx(static_cast<size_t>(B * T * m.C), 0.0f);
      if (m.head == Head::kBase) {
        std::copy(dout, dout + B * T * m.C, dx.begin());
      } else if (m.head == Head::kCausalLM || m.head == Head::kSeq2SeqLM) {
        linear_backward(dx.data(), m.C, false, tr.g(m.lm_head.weight), tr.g(m.lm_head.bias), dout, m.V,
                        st.lm_in.data(), m.C, B * T, tr.lin(m.lm_head));
        if (m.output_scale != 1.0f)
          for (float& v : dx) v *= m.output_scale;
      } else {
        const index_t width = st.out_size / st.head_rows;
        std::vector<float> dh = tr.head_backward(st, dout, width);
        if (st.first_only) {
          for (index_t b = 0; b < B; ++b) std::copy_n(&dh[b * m.C], m.C, &dx[b * T * m.C]);
        } else {
          dx.swap(dh);
        }
      }
      return dx;
    };
    if (m.kind == Kind::kVision) {
      StackRun& r = st.enc;
      const index_t B = r.B, T = r.T, D = m.C, N = T - 1, K = m.patch_proj.in;
      std::vector<float> dx = through_head(B, T);
      tr.blocks_backward(m.enc, r, dx, nullptr);
      if (float* gc = tr.g(m.cls_token))
        for (index_t b = 0; b < B; ++b)
          for (index_t c = 0; c < D; ++c) gc[c] += dx[b * T * D + c];
      if (float* gp = tr.g(m.vit_positions))
        for (index_t b = 0; b < B; ++b)
          for (index_t i = 0; i < T * D; ++i) gp[i] += dx[b * T * D + i];
      std::vector<float> demb(static_cast<size_t>(B * N * D));
      for (index_t b = 0; b < B; ++b) std::copy_n(&dx[(b * T + 1) * D], N * D, &demb[b * N * D]);
      float* gw = tr.g(m.patch_proj.weight);
      float* gb = tr.g(m.patch_proj.bias);
      const LinearRef proj = tr.lin(m.patch_proj);
      if (gw || gb || (proj.lora && (proj.lora->grad_a || proj.lora->grad_b)))
        linear_backward(nullptr, K, false, gw, gb, demb.data(), D, st.patches.data(), K, B * N, proj);
      return Status();
    }
    if (m.kind == Kind::kSeq2Seq) {
      StackRun& d = st.dec;
      StackRun& e = st.enc;
      std::vector<float> dx = through_head(d.B, d.T);
      std::vector<float> dmem(st.memory.size(), 0.0f);
      tr.blocks_backward(m.dec, d, dx, dmem.data());
      tr.embed_backward(m.dec, d, dx.data());
      tr.blocks_backward(m.enc, e, dmem, nullptr);
      tr.embed_backward(m.enc, e, dmem.data());
      return Status();
    }
    const bool decoder = m.kind == Kind::kDecoder;
    const Stack& s = decoder ? m.dec : m.enc;
    StackRun& r = decoder ? st.dec : st.enc;
    std::vector<float> dx = through_head(r.B, r.T);
    tr.blocks_backward(s, r, dx, nullptr);
    tr.embed_backward(s, r, dx.data());
    return Status();
  });
}

}  // namespace cpuformer

namespace cpuformer {

std::vector<std::string> PretrainedModel::new_parameters() const { return impl_->ck.created; }


Status PretrainedModel::add_lora(const std::vector<std::string>& targets, bool regex, std::int64_t r, double alpha,
                                 double dropout, std::uint64_t seed, std::vector<std::string>* modules) {
  return no_throw([&]() -> Status {
    Impl& m = *impl_;
    if (r < 1 || r > 4096) return Status::error("add_lora: r must be in [1, 4096]");
    if (!std::isfinite(alpha) || alpha <= 0) return Status::error("add_lora: alpha must be finite and > 0");
    // [0, 1) as a float too (a double just below 1 rounds to 1.0f: a division by zero)
    if (!(dropout >= 0 && static_cast<float>(dropout) < 1.0f))
      return Status::error("add_lora: dropout must be in [0, 1), got " + std::to_string(dropout));
    if (targets.empty()) return Status::error("add_lora: no target modules");
    std::vector<std::regex> patterns;
    if (regex)
      for (const std::string& t : targets) patterns.emplace_back(t, std::regex::ECMAScript);
    const auto matches = [&](const std::string& module) {
      for (std::size_t i = 0; i < targets.size(); ++i) {
        if (regex ? std::regex_match(module, patterns[i])
                  : (module == targets[i] || (module.size() > targets[i].size() &&
                                               module.compare(module.size() - targets[i].size() - 1,
                                                              targets[i].size() + 1, "." + targets[i]) == 0)))
          return true;
      }
      return false;
    };
    std::map<std::string, Impl::Lora*> by_module;
    for (auto& l : m.loras) by_module[l.module] = &l;
    std::vector<std::string> added;
    Status st;
    const void* tied = m.dec.word.f ? static_cast<const void*>(m.dec.word.f) : static_cast<const void*>(m.dec.word.h);
    m.for_each_linear([&](LinearRef& lin) {
      const void* w = lin.weight ? static_cast<const void*>(lin.weight) : static_cast<const void*>(lin.half);
      if (!w || !st.ok() || w == tied) return;  // the tied LM head is the embedding, not a Linear
      auto it = m.ck.names.find(w);
      if (it == m.ck.names.end()) return;
      std::string module = it->second;
      if (module.size() > 7 && module.compare(module.size() - 7, 7, ".weight") == 0) module.resize(module.size() - 7);
      if (!matches(module)) return;
      if (lin.packed || lin.int8) {
        st = Status::error("add_lora: " + module + " is packed or int8; load with weights=\"float32\" for LoRA");
        return;
      }
      Impl::Lora*& slot = by_module[module];
      if (!slot) {
        m.loras.emplace_back();
        Impl::Lora& l = m.loras.back();
        l.module = module;
        l.a.resize(static_cast<size_t>(r * lin.in));
        l.b.assign(static_cast<size_t>(lin.out * r), 0.0f);
        std::mt19937_64 rng(seed + m.loras.size());
        const double bound = 1.0 / std::sqrt(static_cast<double>(lin.in));  // kaiming_uniform_(a=sqrt(5))
        std::uniform_real_distribution<double> u(-bound, bound);
        for (float& x : l.a) x = static_cast<float>(u(rng));
        l.ref.a = l.a.data(), l.ref.b = l.b.data(), l.ref.r = r, l.ref.scale = static_cast<float>(alpha / r);
        l.ref.dropout = static_cast<float>(dropout);  // training stays false: only a training step's copies drop
        m.ck.params.push_back({module + ".lora_A.weight", {r, lin.in}, l.a.data()});
        m.ck.params.push_back({module + ".lora_B.weight", {lin.out, r}, l.b.data()});
        m.grads[l.a.data()].assign(l.a.size(), 0.0f);
        m.grads[l.b.data()].assign(l.b.size(), 0.0f);
        added.push_back(module);
        slot = &l;
      } else if (slot->ref.r != r || slot->ref.dropout != static_cast<float>(dropout)) {
        st = Status::error("add_lora: " + module + " already has an adapter of another rank or dropout");
        return;
      }
      lin.lora = &slot->ref;
    });
    if (!st.ok()) return st;
    if (added.empty()) return Status::error("add_lora: no Linear module matches the targets");
    refresh_lora_grads(m);
    if (modules) *modules = added;
    return Status();
  });
}

Status PretrainedModel::merge_lora() {
  return no_throw([&]() -> Status {
    Impl& m = *impl_;
    if (m.loras.empty()) return Status();
    Status st;
    m.for_each_linear([&](LinearRef& lin) {
      if (!lin.lora || !st.ok()) return;
      bool owned = false;
      for (const auto& p : m.ck.params) owned = owned || p.data == lin.weight;
      if (!owned) {
        st = Status::error("merge_lora: the base weights are the mapped files' (read-only); load with trainable=true "
                           "to merge, or keep the adapters");
        return;
      }
    });
    if (!st.ok()) return st;
    std::set<const LoraAdapter*> merged;
    m.for_each_linear([&](LinearRef& lin) {
      if (!lin.lora) return;
      const LoraAdapter& l = *lin.lora;
      if (merged.insert(&l).second) {
        float* w = const_cast<float*>(lin.weight);  // an owned parameter (checked above)
        if (lin.in_out)  // W (in, out) += scale A^T B^T
          sgemm(true, true, lin.in, lin.out, l.r, l.scale, l.a, lin.in, l.b, l.r, 1.0f, w, lin.out);
        else             // W (out, in) += scale B A
          sgemm(false, false, lin.out, lin.in, l.r, l.scale, l.b, l.r, l.a, lin.in, 1.0f, w, lin.in);
      }
      lin.lora = nullptr;
    });
    for (const auto& l : m.loras) {
      m.grads.erase(l.a.data()), m.grads.erase(l.b.data());
      auto& ps = m.ck.params;
      ps.erase(std::remove_if(ps.begin(), ps.end(),
                              [&](const Checkpoint::Param& p) { return p.data == l.a.data() || p.data == l.b.data(); }),
               ps.end());
    }
    m.loras.clear();
    return Status();
  });
}

}  // namespace cpuformer
