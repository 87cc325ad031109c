// bindings.cpp: the cpuformer._core extension. Validation, allocation and GIL release only; the arithmetic lives
// in the C++ core (cpp/src). Users call the cpuformer.ops wrappers, which convert inputs to float32/int64 first;
// these functions accept exactly float32 (and int64 ids) C-contiguous arrays and say so otherwise.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cpuformer.h"

namespace py = pybind11;
using namespace cpuformer;

namespace {

using F32 = py::array_t<float, py::array::c_style>;
using I64 = py::array_t<std::int64_t, py::array::c_style>;

std::string shape_of(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) os << ",";
  os << ")";
  return os.str();
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

// The bytes [lo, hi) that an array's elements span (strides may be negative or zero).
std::pair<const char*, const char*> extent(const py::array& a) {
  const char* lo = static_cast<const char*>(a.data());
  const char* hi = lo;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (a.shape(i) == 0) return {lo, lo};
    const py::ssize_t span = a.strides(i) * (a.shape(i) - 1);
    (span < 0 ? lo : hi) += span;
  }
  return {lo, hi + a.itemsize()};
}

// Whether two arrays have an element in common (numpy.shares_memory). Disjoint extents never do and contiguous
// ones with intersecting extents always do; only interleaved strided views (the q, k, v thirds of one fused
// buffer) need numpy's exact test.
bool shares_memory(const py::array& a, const py::array& b) {
  const auto [alo, ahi] = extent(a);
  const auto [blo, bhi] = extent(b);
  if (!(alo < bhi && blo < ahi)) return false;
  const auto contiguous = [](const py::array& x) { return (x.flags() & py::array::c_style) != 0; };
  if (contiguous(a) && contiguous(b)) return true;
  return py::module_::import("numpy").attr("shares_memory")(a, b).cast<bool>();
}

// A named array argument, for the aliasing check below.
struct Arg {
  const py::array* array;  // null: an optional argument that was not given
  const char* name;
};

// Every op that writes into a caller's array checks, once, before any work: no output shares memory with an
// input or with another output (in-place updates such as `out = beta * out + ...` list the array as an output
// only). Outputs aliasing inputs would silently read values the kernel already overwrote.
void check_disjoint(std::initializer_list<Arg> outputs, std::initializer_list<Arg> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    if (!o->array) continue;
    for (auto other = std::next(o); other != outputs.end(); ++other)
      if (other->array && shares_memory(*o->array, *other->array))
        value_error(std::string(o->name) + " and " + other->name + " must not share memory (they are both written)");
    for (const Arg& in : inputs)
      if (in.array && shares_memory(*o->array, *in.array))
        value_error(std::string(o->name) + " must not share memory with " + in.name +
                    " (it is written while " + in.name + " is read)");
  }
}

template <class T>
const py::array* opt_arg(const std::optional<T>& a) {
  return a ? &*a : nullptr;
}

// Exactly dtype T (`what` names it in messages), C-contiguous, no zero-size dimension; optionally a fixed rank
// range and writability.
template <class T>
py::array_t<T, py::array::c_style> typed_array(const py::handle& obj, const char* name, const std::string& what,
                                               int min_ndim, int max_ndim, bool writable) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array, got " + std::string(py::str(py::type::of(obj))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must be " + what + ", got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) value_error(std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) value_error(std::string(name) + " must be writable");
  if (a.ndim() < min_ndim || a.ndim() > max_ndim) {
    std::ostringstream os;
    os << name << " must have " << min_ndim;
    if (max_ndim != min_ndim) os << ".." << max_ndim;
    os << " dimensions, got shape " << shape_of(a);
    value_error(os.str());
  }
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) == 0) value_error(std::string(name) + " has a zero-size dimension: shape " + shape_of(a));
  return py::array_t<T, py::array::c_style>::ensure(a);
}

// Exactly float32, C-contiguous, no zero-size dimension; optionally a fixed rank range.
F32 f32(const py::handle& obj, const char* name, int min_ndim = 0, int max_ndim = 64, bool writable = false) {
  return typed_array<float>(obj, name, "float32", min_ndim, max_ndim, writable);
}

I64 i64(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy int64 array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<std::int64_t>()))
    throw py::type_error(std::string(name) + " must be int64, got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) value_error(std::string(name) + " must be C-contiguous");
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) == 0) value_error(std::string(name) + " has a zero-size dimension: shape " + shape_of(a));
  return I64::ensure(a);
}

// Optional float32 vector of exactly n elements (bias, weight).
const float* opt_vec(const std::optional<F32>& v, const char* name, py::ssize_t n) {
  if (!v) return nullptr;
  if (v->ndim() != 1 || v->shape(0) != n) {
    std::ostringstream os;
    os << name << " must have shape (" << n << ",), got " << shape_of(*v);
    value_error(os.str());
  }
  return v->data();
}

std::optional<F32> opt_f32(const py::object& obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return f32(obj, name, 1, 1);
}

void same_shape(const py::array& a, const char* an, const py::array& b, const char* bn) {
  bool same = a.ndim() == b.ndim();
  for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
  if (!same) value_error(std::string(an) + " and " + bn + " must have the same shape, got " + shape_of(a) + " and " +
                         shape_of(b));
}

std::vector<py::ssize_t> shape_vec(const py::array& a) { return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()); }

F32 empty_like(const py::array& a) { return F32(shape_vec(a)); }

// (rows, last) view of an array of rank >= 1.
std::pair<index_t, index_t> rows_cols(const py::array& a) {
  const index_t cols = a.shape(a.ndim() - 1);
  return {static_cast<index_t>(a.size()) / cols, cols};
}

Activation activation_of(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu" || name == "gelu_erf" || name == "none") return Activation::kGeluErf;
  if (name == "gelu_tanh" || name == "tanh") return Activation::kGeluTanh;
  if (name == "identity") return Activation::kIdentity;
  if (name == "silu" || name == "swish") return Activation::kSilu;
  value_error("activation must be 'relu', 'gelu' (erf), 'gelu_tanh', 'silu' or 'identity', got '" + name + "'");
}

// ---------------------------------------------------------------------------------------------------------------
// matmul: 2-D x 2-D, or batched 3-D with a 2-D operand broadcast over the batch (np.matmul on the op()-ed operands).

struct MatmulShape {
  index_t batch, M, N, K, stride_a, stride_b;
};

MatmulShape matmul_shape(const F32& a, const F32& b, bool ta, bool tb) {
  if (a.ndim() < 2 || a.ndim() > 3 || b.ndim() < 2 || b.ndim() > 3)
    value_error("matmul: a and b must be 2-D or 3-D, got shapes " + shape_of(a) + " and " + shape_of(b));
  const auto dims = [](const F32& x, bool t) {
    const index_t r = x.shape(x.ndim() - 2), c = x.shape(x.ndim() - 1);
    return t ? std::make_pair(c, r) : std::make_pair(r, c);
  };
  const auto [M, Ka] = dims(a, ta);
  const auto [Kb, N] = dims(b, tb);
  if (Ka != Kb) {
    std::ostringstream os;
    os << "matmul: inner dimensions differ: op(a) is " << M << "x" << Ka << " (a " << shape_of(a)
       << (ta ? ", transposed" : "") << "), op(b) is " << Kb << "x" << N << " (b " << shape_of(b)
       << (tb ? ", transposed" : "") << ")";
    value_error(os.str());
  }
  const index_t ba = a.ndim() == 3 ? a.shape(0) : 1, bb = b.ndim() == 3 ? b.shape(0) : 1;
  if (a.ndim() == 3 && b.ndim() == 3 && ba != bb)
    value_error("matmul: batch sizes differ: a " + shape_of(a) + ", b " + shape_of(b));
  const index_t batch = std::max(ba, bb);
  const index_t sa = a.ndim() == 3 ? M * Ka : 0, sb = b.ndim() == 3 ? Ka * N : 0;
  return {batch, M, N, Ka, sa, sb};
}

F32 matmul(const py::object& a_obj, const py::object& b_obj, bool transpose_a, bool transpose_b,
           const py::object& bias_obj, float alpha) {
  const F32 a = f32(a_obj, "a", 2, 3), b = f32(b_obj, "b", 2, 3);
  const auto s = matmul_shape(a, b, transpose_a, transpose_b);
  const auto bias_arr = opt_f32(bias_obj, "bias");
  const float* bias = opt_vec(bias_arr, "bias", s.N);
  const bool batched = a.ndim() == 3 || b.ndim() == 3;
  F32 c = batched ? F32({s.batch, s.M, s.N}) : F32({s.M, s.N});
  const float *pa = a.data(), *pb = b.data();
  float* pc = c.mutable_data();
  const index_t lda = a.shape(a.ndim() - 1), ldb = b.shape(b.ndim() - 1);
  {
    py::gil_scoped_release nogil;
    sgemm_strided_batched(transpose_a, transpose_b, s.M, s.N, s.K, alpha, pa, lda, s.stride_a, pb, ldb, s.stride_b,
                          0.0f, pc, s.N, s.M * s.N, s.batch, bias);
  }
  return c;
}

// In place: c = alpha * op(a) op(b) + beta * c (+ bias). Used for gradient accumulation (beta = 1).
void gemm_inplace(const py::object& a_obj, const py::object& b_obj, const py::object& c_obj, bool transpose_a,
                  bool transpose_b, float alpha, float beta, const py::object& bias_obj) {
  const F32 a = f32(a_obj, "a", 2, 3), b = f32(b_obj, "b", 2, 3);
  F32 c = f32(c_obj, "out", 2, 3, true);
  const auto s = matmul_shape(a, b, transpose_a, transpose_b);
  const bool batched = a.ndim() == 3 || b.ndim() == 3;
  const bool ok = batched ? (c.ndim() == 3 && c.shape(0) == s.batch && c.shape(1) == s.M && c.shape(2) == s.N)
                          : (c.ndim() == 2 && c.shape(0) == s.M && c.shape(1) == s.N);
  if (!ok) {
    std::ostringstream os;
    os << "gemm: out must have shape " << (batched ? "(" + std::to_string(s.batch) + ", " : "(") << s.M << ", "
       << s.N << "), got " << shape_of(c);
    value_error(os.str());
  }
  const auto bias_arr = opt_f32(bias_obj, "bias");
  const float* bias = opt_vec(bias_arr, "bias", s.N);
  check_disjoint({{&c, "out"}}, {{&a, "a"}, {&b, "b"}, {opt_arg(bias_arr), "bias"}});
  const float *pa = a.data(), *pb = b.data();
  float* pc = c.mutable_data();
  const index_t lda = a.shape(a.ndim() - 1), ldb = b.shape(b.ndim() - 1);
  py::gil_scoped_release nogil;
  sgemm_strided_batched(transpose_a, transpose_b, s.M, s.N, s.K, alpha, pa, lda, s.stride_a, pb, ldb, s.stride_b,
                        beta, pc, s.N, s.M * s.N, s.batch, bias);
}

// ---------------------------------------------------------------------------------------------------------------

F32 softmax_fwd(const py::object& x_obj, bool log) {
  const F32 x = f32(x_obj, "x", 1);
  F32 y = empty_like(x);
  const auto [rows, cols] = rows_cols(x);
  const float* px = x.data();
  float* py_ = y.mutable_data();
  py::gil_scoped_release nogil;
  (log ? log_softmax_forward : softmax_forward)(py_, px, rows, cols);
  return y;
}

F32 softmax_bwd(const py::object& dy_obj, const py::object& y_obj, bool log) {
  const F32 dy = f32(dy_obj, "grad_output", 1), y = f32(y_obj, "output", 1);
  same_shape(dy, "grad_output", y, "output");
  F32 dx = empty_like(y);
  const auto [rows, cols] = rows_cols(y);
  const float *pdy = dy.data(), *py_ = y.data();
  float* pdx = dx.mutable_data();
  py::gil_scoped_release nogil;
  (log ? log_softmax_backward : softmax_backward)(pdx, pdy, py_, rows, cols);
  return dx;
}

py::tuple layer_norm_fwd(const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, float eps) {
  const F32 x = f32(x_obj, "x", 1);
  const auto [rows, C] = rows_cols(x);
  const auto w_arr = opt_f32(w_obj, "weight"), b_arr = opt_f32(b_obj, "bias");
  const float* w = opt_vec(w_arr, "weight", C);
  const float* b = opt_vec(b_arr, "bias", C);
  if (!(eps >= 0.0f) || !std::isfinite(eps)) value_error("layer_norm: eps must be finite and >= 0");
  F32 y = empty_like(x);
  F32 mean(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim() - 1));
  F32 rstd(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim() - 1));
  const float* px = x.data();
  float *py_ = y.mutable_data(), *pm = mean.mutable_data(), *pr = rstd.mutable_data();
  {
    py::gil_scoped_release nogil;
    layernorm_forward(py_, pm, pr, px, w, b, rows, C, eps);
  }
  return py::make_tuple(y, mean, rstd);
}

py::tuple layer_norm_bwd(const py::object& dy_obj, const py::object& x_obj, const py::object& w_obj,
                         const py::object& mean_obj, const py::object& rstd_obj, bool need_params) {
  const F32 dy = f32(dy_obj, "grad_output", 1), x = f32(x_obj, "x", 1);
  same_shape(dy, "grad_output", x, "x");
  const auto [rows, C] = rows_cols(x);
  const auto w_arr = opt_f32(w_obj, "weight");
  const float* w = opt_vec(w_arr, "weight", C);
  const F32 mean = f32(mean_obj, "mean"), rstd = f32(rstd_obj, "rstd");
  if (mean.size() != rows || rstd.size() != rows)
    value_error("layer_norm_backward: mean and rstd must hold one value per row (" + std::to_string(rows) + ")");
  F32 dx = empty_like(x);
  py::object dw = py::none(), db = py::none();
  float *pdw = nullptr, *pdb = nullptr;
  if (need_params) {
    F32 dwa(std::vector<py::ssize_t>{C}), dba(std::vector<py::ssize_t>{C});
    std::fill(dwa.mutable_data(), dwa.mutable_data() + C, 0.0f);
    std::fill(dba.mutable_data(), dba.mutable_data() + C, 0.0f);
    pdw = dwa.mutable_data();
    pdb = dba.mutable_data();
    dw = dwa;
    db = dba;
  }
  const float *pdy = dy.data(), *px = x.data(), *pm = mean.data(), *pr = rstd.data();
  float* pdx = dx.mutable_data();
  {
    py::gil_scoped_release nogil;
    layernorm_backward(pdx, pdw, pdb, pdy, px, w, pm, pr, rows, C);
  }
  return py::make_tuple(dx, dw, db);
}

F32 activation_fwd(const py::object& x_obj, const py::object& bias_obj, const std::string& kind, bool inplace) {
  const F32 x = f32(x_obj, "x", 1, 64, inplace);
  const auto [rows, cols] = rows_cols(x);
  const auto bias_arr = opt_f32(bias_obj, "bias");
  const float* bias = opt_vec(bias_arr, "bias", cols);
  const Activation act = activation_of(kind);
  if (inplace) check_disjoint({{&x, "x"}}, {{opt_arg(bias_arr), "bias"}});
  F32 y = inplace ? x : empty_like(x);  // element-wise: y may be x
  const float* px = x.data();
  float* py_ = y.mutable_data();
  py::gil_scoped_release nogil;
  activation_forward(py_, px, bias, rows, cols, act);
  return y;
}

py::tuple activation_bwd(const py::object& dy_obj, const py::object& x_obj, const py::object& bias_obj,
                         const std::string& kind, bool need_dbias) {
  const F32 dy = f32(dy_obj, "grad_output", 1), x = f32(x_obj, "x", 1);
  same_shape(dy, "grad_output", x, "x");
  const auto [rows, cols] = rows_cols(x);
  const auto bias_arr = opt_f32(bias_obj, "bias");
  const float* bias = opt_vec(bias_arr, "bias", cols);
  const Activation act = activation_of(kind);
  F32 dx = empty_like(x);
  py::object db = py::none();
  float* pdb = nullptr;
  if (need_dbias) {
    F32 dba(std::vector<py::ssize_t>{cols});
    std::fill(dba.mutable_data(), dba.mutable_data() + cols, 0.0f);
    pdb = dba.mutable_data();
    db = dba;
  }
  const float *pdy = dy.data(), *px = x.data();
  float* pdx = dx.mutable_data();
  {
    py::gil_scoped_release nogil;
    activation_backward(pdx, pdb, pdy, px, bias, rows, cols, act);
  }
  return py::make_tuple(dx, db);
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm, gated units

py::tuple rms_norm_fwd(const py::object& x_obj, const py::object& w_obj, float eps, bool one_plus) {
  const F32 x = f32(x_obj, "x", 1);
  const auto [rows, C] = rows_cols(x);
  const auto w_arr = opt_f32(w_obj, "weight");
  const float* w = opt_vec(w_arr, "weight", C);
  if (!(eps >= 0.0f) || !std::isfinite(eps)) value_error("rms_norm: eps must be finite and >= 0");
  F32 y = empty_like(x);
  F32 rstd(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim() - 1));
  const float* px = x.data();
  float *py_ = y.mutable_data(), *pr = rstd.mutable_data();
  {
    py::gil_scoped_release nogil;
    rmsnorm_forward(py_, pr, px, w, rows, C, eps, one_plus);
  }
  return py::make_tuple(y, rstd);
}

py::tuple rms_norm_bwd(const py::object& dy_obj, const py::object& x_obj, const py::object& w_obj,
                       const py::object& rstd_obj, bool one_plus, bool need_weight_grad) {
  const F32 dy = f32(dy_obj, "grad_output", 1), x = f32(x_obj, "x", 1);
  same_shape(dy, "grad_output", x, "x");
  const auto [rows, C] = rows_cols(x);
  const auto w_arr = opt_f32(w_obj, "weight");
  const float* w = opt_vec(w_arr, "weight", C);
  const F32 rstd = f32(rstd_obj, "rstd");
  if (rstd.size() != rows)
    value_error("rms_norm_backward: rstd must hold one value per row (" + std::to_string(rows) + "), got shape " +
                shape_of(rstd));
  F32 dx = empty_like(x);
  py::object dw = py::none();
  float* pdw = nullptr;
  if (need_weight_grad) {
    F32 dwa(std::vector<py::ssize_t>{C});
    std::fill(dwa.mutable_data(), dwa.mutable_data() + C, 0.0f);
    pdw = dwa.mutable_data();
    dw = dwa;
  }
  const float *pdy = dy.data(), *px = x.data(), *pr = rstd.data();
  float* pdx = dx.mutable_data();
  {
    py::gil_scoped_release nogil;
    rmsnorm_backward(pdx, pdw, pdy, px, w, pr, rows, C, one_plus, false);
  }
  return py::make_tuple(dx, dw);
}

F32 gated_fwd(const py::object& gate_obj, const py::object& up_obj, const std::string& kind) {
  const F32 gate = f32(gate_obj, "gate", 1), up = f32(up_obj, "up", 1);
  same_shape(gate, "gate", up, "up");
  const Activation act = activation_of(kind);
  const auto [rows, cols] = rows_cols(gate);
  F32 out = empty_like(gate);
  const float *pg = gate.data(), *pu = up.data();
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  gated_forward(po, cols, pg, cols, pu, cols, rows, cols, act);
  return out;
}

py::tuple gated_bwd(const py::object& dy_obj, const py::object& gate_obj, const py::object& up_obj,
                    const std::string& kind) {
  const F32 dy = f32(dy_obj, "grad_output", 1), gate = f32(gate_obj, "gate", 1), up = f32(up_obj, "up", 1);
  same_shape(gate, "gate", up, "up");
  same_shape(dy, "grad_output", gate, "gate");
  const Activation act = activation_of(kind);
  const auto [rows, cols] = rows_cols(gate);
  F32 dgate = empty_like(gate), dup = empty_like(up);
  const float *pdy = dy.data(), *pg = gate.data(), *pu = up.data();
  float *pdg = dgate.mutable_data(), *pdu = dup.mutable_data();
  {
    py::gil_scoped_release nogil;
    gated_backward(pdg, cols, pdu, cols, pdy, cols, pg, cols, pu, cols, rows, cols, act);
  }
  return py::make_tuple(dgate, dup);
}

// ---------------------------------------------------------------------------------------------------------------
// positions: rotary embeddings, ALiBi slopes, T5 relative position buckets and bias

RotaryConfig rotary_config(index_t head_dim, index_t rotary_dim, const std::string& layout, double theta,
                           double linear_factor, double llama3_factor, double low_freq_factor,
                           double high_freq_factor, index_t original_max_position) {
  RotaryConfig cfg;
  if (rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2)
    value_error("rotary_dim must be even and in [2, head_dim=" + std::to_string(head_dim) + "] (0: head_dim), got " +
                std::to_string(rotary_dim));
  if (layout == "half" || layout == "neox") cfg.layout = RotaryLayout::kHalf;
  else if (layout == "interleaved" || layout == "gptj") cfg.layout = RotaryLayout::kInterleaved;
  else value_error("layout must be 'half' or 'interleaved', got '" + layout + "'");
  if (!std::isfinite(theta) || !(theta > 0.0)) value_error("theta must be finite and > 0");
  cfg.head_dim = head_dim;
  cfg.rotary_dim = rotary_dim;
  cfg.theta = theta;
  cfg.linear_factor = linear_factor;
  cfg.llama3_factor = llama3_factor;
  cfg.low_freq_factor = low_freq_factor;
  cfg.high_freq_factor = high_freq_factor;
  cfg.original_max_position = original_max_position;
  return cfg;  // the scaling fields are checked by the kernel (std::invalid_argument -> ValueError) before any work
}

F32 rotary_inv_freq_py(index_t head_dim, index_t rotary_dim, double theta, double linear_factor,
                       double llama3_factor, double low_freq_factor, double high_freq_factor,
                       index_t original_max_position) {
  if (head_dim < 2) value_error("head_dim must be >= 2, got " + std::to_string(head_dim));
  const RotaryConfig cfg = rotary_config(head_dim, rotary_dim, "half", theta, linear_factor, llama3_factor,
                                         low_freq_factor, high_freq_factor, original_max_position);
  const std::vector<float> inv = rotary_inv_freq(cfg);
  F32 out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(inv.size())});
  std::copy(inv.begin(), inv.end(), out.mutable_data());
  return out;
}

// x (B, T, heads * head_dim) or (B, T, heads, head_dim); returns a rotated copy (backward: by -angle).
F32 rotary_py(const py::object& x_obj, index_t num_heads, const py::object& positions_obj,
              const py::object& offset_obj, index_t rotary_dim, const std::string& layout, double theta,
              double linear_factor, double llama3_factor, double low_freq_factor, double high_freq_factor,
              index_t original_max_position, bool backward) {
  const char* xname = backward ? "grad_output" : "x";
  const F32 x = f32(x_obj, xname, 3, 4);
  const index_t B = x.shape(0), T = x.shape(1);
  index_t heads, D;
  if (x.ndim() == 4) {
    heads = x.shape(2);
    D = x.shape(3);
    if (num_heads != heads)
      value_error("num_heads " + std::to_string(num_heads) + " does not match " + xname + "'s shape " + shape_of(x));
  } else {
    if (num_heads < 1) value_error("num_heads must be >= 1, got " + std::to_string(num_heads));
    if (x.shape(2) % num_heads)
      value_error("embed size " + std::to_string(x.shape(2)) + " is not divisible by num_heads " +
                  std::to_string(num_heads));
    heads = num_heads;
    D = x.shape(2) / num_heads;
  }
  if (D < 2) value_error("head_dim must be >= 2, got " + std::to_string(D));
  const RotaryConfig cfg = rotary_config(D, rotary_dim, layout, theta, linear_factor, llama3_factor, low_freq_factor,
                                         high_freq_factor, original_max_position);
  I64 positions, offset;
  const std::int64_t *pp = nullptr, *po = nullptr;
  if (!positions_obj.is_none()) {
    if (!offset_obj.is_none()) value_error("give positions or offset, not both");
    positions = i64(positions_obj, "positions");
    if (positions.ndim() != 2 || positions.shape(0) != B || positions.shape(1) != T)
      value_error("positions must have shape (" + std::to_string(B) + ", " + std::to_string(T) + "), got " +
                  shape_of(positions));
    pp = positions.data();
  } else if (!offset_obj.is_none()) {
    offset = i64(offset_obj, "offset");
    if (offset.ndim() != 1 || offset.shape(0) != B)
      value_error("offset must have shape (" + std::to_string(B) + ",), got " + shape_of(offset));
    po = offset.data();
  }
  rotary_inv_freq(cfg);  // validates the scaling arguments before anything is allocated
  F32 y = empty_like(x);
  std::copy(x.data(), x.data() + x.size(), y.mutable_data());
  const HeadTensor ht{y.mutable_data(), T * heads * D, heads * D};
  {
    py::gil_scoped_release nogil;
    (backward ? rotary_backward : rotary_forward)(ht, B, T, heads, pp, po, cfg);
  }
  return y;
}

F32 alibi_slopes_py(index_t num_heads) {
  if (num_heads < 1) value_error("num_heads must be >= 1, got " + std::to_string(num_heads));
  const std::vector<float> s = alibi_slopes(num_heads);
  F32 out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(s.size())});
  std::copy(s.begin(), s.end(), out.mutable_data());
  return out;
}

RelativeBiasConfig bias_config(bool bidirectional, index_t num_buckets, index_t max_distance) {
  RelativeBiasConfig cfg;
  cfg.bidirectional = bidirectional;
  cfg.num_buckets = num_buckets;
  cfg.max_distance = max_distance;
  const index_t n = bidirectional ? num_buckets / 2 : num_buckets;
  if (n / 2 < 1)
    value_error(std::string("num_buckets must be >= ") + (bidirectional ? "4 when bidirectional" : "2 when causal") +
                ", got " + std::to_string(num_buckets));
  if (max_distance <= n / 2)
    value_error("max_distance must be > " + std::to_string(n / 2) + " (the exact range for num_buckets " +
                std::to_string(num_buckets) + "), got " + std::to_string(max_distance));
  return cfg;
}

I64 relative_bucket_py(const py::object& rel_obj, bool bidirectional, index_t num_buckets, index_t max_distance) {
  const I64 rel = i64(rel_obj, "relative_positions");
  const RelativeBiasConfig cfg = bias_config(bidirectional, num_buckets, max_distance);
  I64 out(shape_vec(rel));
  const std::int64_t* pr = rel.data();
  std::int64_t* po = out.mutable_data();
  const index_t n = rel.size();
  py::gil_scoped_release nogil;
  for (index_t i = 0; i < n; ++i) po[i] = relative_position_bucket(pr[i], cfg);
  return out;
}

void check_table(const F32& table, const char* name, index_t num_buckets) {
  if (table.ndim() != 2 || table.shape(0) != num_buckets)
    value_error(std::string(name) + " must have shape (num_buckets=" + std::to_string(num_buckets) +
                ", num_heads), got " + shape_of(table));
}

F32 relative_bias_py(const py::object& table_obj, index_t T, index_t S, std::int64_t query_offset, bool bidirectional,
                     index_t num_buckets, index_t max_distance) {
  const F32 table = f32(table_obj, "table", 2, 2);
  const RelativeBiasConfig cfg = bias_config(bidirectional, num_buckets, max_distance);
  check_table(table, "table", num_buckets);
  if (T < 1) value_error("T must be >= 1, got " + std::to_string(T));
  if (S < 1) value_error("S must be >= 1, got " + std::to_string(S));
  const index_t H = table.shape(1);
  F32 bias(std::vector<py::ssize_t>{H, T, S});
  const float* pt = table.data();
  float* pb = bias.mutable_data();
  py::gil_scoped_release nogil;
  relative_bias_forward(pb, pt, H, T, S, query_offset, cfg);
  return bias;
}

void relative_bias_bwd(const py::object& dbias_obj, const py::object& dtable_obj, std::int64_t query_offset,
                       bool bidirectional, index_t num_buckets, index_t max_distance) {
  const F32 dbias = f32(dbias_obj, "grad_output", 3, 3);
  F32 dtable = f32(dtable_obj, "table_grad", 2, 2, true);
  const RelativeBiasConfig cfg = bias_config(bidirectional, num_buckets, max_distance);
  check_table(dtable, "table_grad", num_buckets);
  const index_t H = dtable.shape(1), T = dbias.shape(1), S = dbias.shape(2);
  if (dbias.shape(0) != H)
    value_error("grad_output must have shape (num_heads=" + std::to_string(H) + ", T, S), got " + shape_of(dbias));
  check_disjoint({{&dtable, "table_grad"}}, {{&dbias, "grad_output"}});
  const float* pg = dbias.data();
  float* pt = dtable.mutable_data();
  py::gil_scoped_release nogil;
  relative_bias_backward(pt, pg, H, T, S, query_offset, cfg);
}

void check_p(float p) {
  if (!(p >= 0.0f && p < 1.0f)) value_error("dropout: p must be in [0, 1), got " + std::to_string(p));
}

py::tuple dropout_fwd(const py::object& x_obj, float p, std::uint64_t seed) {
  const F32 x = f32(x_obj, "x", 1);
  check_p(p);
  F32 y = empty_like(x);
  py::array_t<std::uint8_t, py::array::c_style> mask(shape_vec(x));
  const float* px = x.data();
  float* py_ = y.mutable_data();
  std::uint8_t* pm = mask.mutable_data();
  const index_t n = x.size();
  {
    py::gil_scoped_release nogil;
    dropout_forward(py_, pm, px, n, p, seed);
  }
  return py::make_tuple(y, mask.attr("astype")("bool"));
}

F32 dropout_bwd(const py::object& dy_obj, float p, std::uint64_t seed) {
  const F32 dy = f32(dy_obj, "grad_output", 1);
  check_p(p);
  F32 dx = empty_like(dy);
  const float* pdy = dy.data();
  float* pdx = dx.mutable_data();
  const index_t n = dy.size();
  py::gil_scoped_release nogil;
  dropout_backward(pdx, pdy, n, p, seed);
  return dx;
}

// The keep flags (rows, cols) of a LoRA adapter's dropout mask under its seed (linear.h's lora_dropout_keep).
py::array lora_dropout_mask_py(std::uint64_t seed, std::int64_t rows, std::int64_t cols, float p) {
  if (rows < 0 || cols < 0) value_error("lora_dropout_mask: rows and cols must be >= 0");
  check_p(p);
  py::array_t<bool, py::array::c_style> keep({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
  bool* pk = keep.mutable_data();
  py::gil_scoped_release nogil;
  for (std::int64_t i = 0; i < rows * cols; ++i) pk[i] = lora_dropout_keep(seed, static_cast<std::uint64_t>(i), p);
  return keep;
}

F32 add(const py::object& a_obj, const py::object& b_obj) {
  const F32 a = f32(a_obj, "a"), b = f32(b_obj, "b");
  same_shape(a, "a", b, "b");
  F32 out = empty_like(a);
  const float *pa = a.data(), *pb = b.data();
  float* po = out.mutable_data();
  const index_t n = a.size();
  py::gil_scoped_release nogil;
  residual_forward(po, pa, pb, n);
  return out;
}

F32 embedding_fwd(const py::object& ids_obj, const py::object& w_obj) {
  const I64 ids = i64(ids_obj, "ids");
  const F32 w = f32(w_obj, "weight", 2, 2);
  const index_t V = w.shape(0), C = w.shape(1), n = ids.size();
  auto shape = shape_vec(ids);
  shape.push_back(C);
  F32 out(shape);
  const std::int64_t* pi = ids.data();
  const float* pw = w.data();
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  embedding_forward(po, pi, pw, n, V, C);
  return out;
}

void embedding_bwd(const py::object& dweight_obj, const py::object& dout_obj, const py::object& ids_obj,
                   std::int64_t padding_idx) {
  F32 dw = f32(dweight_obj, "weight_grad", 2, 2, true);
  const F32 dout = f32(dout_obj, "grad_output", 1);
  const I64 ids = i64(ids_obj, "ids");
  const index_t V = dw.shape(0), C = dw.shape(1), n = ids.size();
  auto expected = shape_vec(ids);
  expected.push_back(C);
  if (shape_vec(dout) != expected)
    value_error("embedding_backward: grad_output must have shape ids.shape + (" + std::to_string(C) + ",), got " +
                shape_of(dout) + " for ids " + shape_of(ids));
  check_disjoint({{&dw, "weight_grad"}}, {{&dout, "grad_output"}, {&ids, "ids"}});
  const std::int64_t* pi = ids.data();
  const float* pd = dout.data();
  float* pw = dw.mutable_data();
  py::gil_scoped_release nogil;
  embedding_backward(pw, pd, pi, n, V, C, padding_idx);
}

py::tuple cross_entropy(const py::object& logits_obj, const py::object& targets_obj, std::int64_t ignore_index,
                        float label_smoothing, bool compute_grad, float grad_scale, bool inplace) {
  const F32 logits = f32(logits_obj, "logits", 2, 2, inplace);
  const I64 targets = i64(targets_obj, "targets");
  const index_t N = logits.shape(0), V = logits.shape(1);
  if (targets.ndim() != 1 || targets.shape(0) != N)
    value_error("cross_entropy: targets must have shape (" + std::to_string(N) + ",) to match logits " +
                shape_of(logits) + ", got " + shape_of(targets));
  if (!(label_smoothing >= 0.0f && label_smoothing <= 1.0f))
    value_error("cross_entropy: label_smoothing must be in [0, 1], got " + std::to_string(label_smoothing));
  if (compute_grad && inplace) check_disjoint({{&logits, "logits"}}, {{&targets, "targets"}});
  py::object grad = py::none();
  float* pg = nullptr;
  if (compute_grad) {
    if (inplace) {
      pg = const_cast<float*>(logits.data());
      grad = logits;
    } else {
      F32 g({N, V});
      pg = g.mutable_data();
      grad = g;
    }
  }
  const float* pl = logits.data();
  const std::int64_t* pt = targets.data();
  double loss;
  index_t n_valid = 0;
  {
    py::gil_scoped_release nogil;
    loss = cross_entropy_forward_backward(pg, pl, pt, N, V, ignore_index, label_smoothing, grad_scale, &n_valid);
  }
  return py::make_tuple(loss, grad, n_valid);
}

void adamw(const py::object& p_obj, const py::object& g_obj, const py::object& m_obj, const py::object& v_obj,
           float lr, float beta1, float beta2, float eps, float weight_decay, long long step, float grad_scale) {
  F32 p = f32(p_obj, "param", 0, 64, true), m = f32(m_obj, "exp_avg", 0, 64, true),
      v = f32(v_obj, "exp_avg_sq", 0, 64, true);
  const F32 g = f32(g_obj, "grad");
  same_shape(p, "param", g, "grad");
  same_shape(p, "param", m, "exp_avg");
  same_shape(p, "param", v, "exp_avg_sq");
  check_disjoint({{&p, "param"}, {&m, "exp_avg"}, {&v, "exp_avg_sq"}}, {{&g, "grad"}});
  float *pp = p.mutable_data(), *pm = m.mutable_data(), *pv = v.mutable_data();
  const float* pg = g.data();
  const index_t n = p.size();
  py::gil_scoped_release nogil;
  adamw_step(pp, pm, pv, pg, n, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
}

double sum_sq(const py::object& x_obj) {
  const F32 x = f32(x_obj, "x");
  const float* px = x.data();
  const index_t n = x.size();
  py::gil_scoped_release nogil;
  return sum_squares(px, n);
}

// ---------------------------------------------------------------------------------------------------------------
// attention: q (B, T, E), k and v (B, S, E) with heads side by side along E. They may be strided views (for example
// the q, k and v thirds of a fused (B, T, 3E) projection) as long as the last axis is contiguous.

struct HeadArg {
  py::array arr;  // keeps the buffer alive
  float* data;
  index_t B, T, E, sb, st;
};

HeadArg head_arg(const py::handle& obj, const char* name, bool writable) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy float32 array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(name) + " must be float32, got " + std::string(py::str(a.dtype())));
  if (a.ndim() != 3) value_error(std::string(name) + " must be 3-D (batch, length, embed), got shape " + shape_of(a));
  for (int i = 0; i < 3; ++i)
    if (a.shape(i) == 0) value_error(std::string(name) + " has a zero-size dimension: shape " + shape_of(a));
  const auto f = static_cast<py::ssize_t>(sizeof(float));
  if (a.strides(2) != f || a.strides(0) < 0 || a.strides(1) < 0 || a.strides(0) % f || a.strides(1) % f)
    value_error(std::string(name) + " must have a contiguous last axis and non-negative strides");
  if (writable && !a.writeable()) value_error(std::string(name) + " must be writable");
  // Inputs are only read (ConstHeadTensor), so read-only arrays are fine: no mutable_data() for them.
  float* data = const_cast<float*>(static_cast<const float*>(a.data()));
  return {a, data, a.shape(0), a.shape(1), a.shape(2), a.strides(0) / f, a.strides(1) / f};
}

struct MaskArgs {
  F32 additive_arr;
  py::array_t<std::uint8_t, py::array::c_style> padding_arr;
  I64 offset_arr, length_arr;
  F32 slopes_arr;
  AttentionMask mask;
};

// The positional options of attention (decoding over a cache, sliding window, ALiBi), checked here so the errors
// name the Python argument.
struct PositionArgs {
  index_t window = 0;
  py::object query_offset = py::none(), key_length = py::none(), alibi_slopes = py::none();
};

// An optional (B,) int64 vector whose values lie in [lo, hi].
I64 batch_vector(const py::object& obj, const char* name, index_t B, index_t lo, index_t hi) {
  I64 a = i64(obj, name);
  if (a.ndim() != 1 || a.shape(0) != B)
    value_error(std::string(name) + " must have shape (" + std::to_string(B) + ",), got " + shape_of(a));
  for (index_t b = 0; b < B; ++b)
    if (a.data()[b] < lo || a.data()[b] > hi) {
      std::ostringstream os;
      os << name << "[" << b << "] = " << a.data()[b] << " is out of range: must be in [" << lo << ", " << hi << "]";
      value_error(os.str());
    }
  return a;
}

MaskArgs mask_args(const py::object& attn_mask, const py::object& key_padding_mask, bool causal, index_t B,
                   index_t H, index_t T, index_t S, const PositionArgs& pos = {}) {
  MaskArgs m;
  m.mask.causal = causal;
  if (!attn_mask.is_none()) {
    m.additive_arr = f32(attn_mask, "attn_mask", 2, 4);
    const auto& a = m.additive_arr;
    const py::ssize_t nd = a.ndim();
    const index_t lead = nd >= 3 ? a.shape(0) : 1;
    bool ok = a.shape(nd - 2) == T && a.shape(nd - 1) == S;
    if (nd == 3) ok = ok && (lead == B || lead == B * H);
    if (nd == 4) ok = ok && (lead == B || lead == 1) && (a.shape(1) == H || a.shape(1) == 1);
    if (!ok) {
      std::ostringstream os;
      os << "attn_mask must have shape (" << T << ", " << S << "), (" << B << ", " << T << ", " << S << "), ("
         << B * H << ", " << T << ", " << S << ") or (" << B << " or 1, " << H << " or 1, " << T << ", " << S
         << "), got " << shape_of(a);
      value_error(os.str());
    }
    m.mask.additive = a.data();
    m.mask.add_st = S;
    if (nd == 4) {
      m.mask.add_sh = a.shape(1) == H && H > 1 ? T * S : 0;
      m.mask.add_sb = lead == B && B > 1 ? a.shape(1) * T * S : 0;
    } else if (nd == 3 && lead == B * H && H > 1) {
      m.mask.add_sh = T * S;
      m.mask.add_sb = H * T * S;
    } else if (nd == 3) {
      m.mask.add_sb = T * S;
    }
  }
  if (!key_padding_mask.is_none()) {
    auto kp = py::reinterpret_borrow<py::array>(key_padding_mask);
    if (!kp.dtype().is(py::dtype::of<std::uint8_t>()))
      throw py::type_error("key_padding_mask must be uint8 (cpuformer.ops converts bool masks)");
    m.padding_arr = py::array_t<std::uint8_t, py::array::c_style>::ensure(kp);
    if (!m.padding_arr || m.padding_arr.ndim() != 2 || m.padding_arr.shape(0) != B || m.padding_arr.shape(1) != S)
      value_error("key_padding_mask must have shape (" + std::to_string(B) + ", " + std::to_string(S) + "), got " +
                  shape_of(kp));
    m.mask.key_padding = m.padding_arr.data();
  }
  if (pos.window < 0) value_error("window must be >= 0 (0 = no sliding window), got " + std::to_string(pos.window));
  m.mask.window = pos.window;
  if (!pos.query_offset.is_none()) {
    m.offset_arr = batch_vector(pos.query_offset, "query_offset", B, 0, std::numeric_limits<index_t>::max() - T);
    m.mask.query_offset = m.offset_arr.data();
  }
  if (!pos.key_length.is_none()) {
    m.length_arr = batch_vector(pos.key_length, "key_length", B, 0, S);
    m.mask.key_length = m.length_arr.data();
  }
  if (!pos.alibi_slopes.is_none()) {
    m.slopes_arr = f32(pos.alibi_slopes, "alibi_slopes", 1, 1);
    if (m.slopes_arr.shape(0) != H)
      value_error("alibi_slopes must have shape (" + std::to_string(H) + ",), got " + shape_of(m.slopes_arr));
    for (index_t h = 0; h < H; ++h)
      if (!std::isfinite(m.slopes_arr.data()[h])) value_error("alibi_slopes must be finite");
    m.mask.alibi_slopes = m.slopes_arr.data();
  }
  return m;
}

// The mask and position arrays, for the aliasing check of the ops that write.
std::vector<Arg> mask_inputs(const MaskArgs& m) {
  std::vector<Arg> v;
  if (m.mask.additive) v.push_back({&m.additive_arr, "attn_mask"});
  if (m.mask.key_padding) v.push_back({&m.padding_arr, "key_padding_mask"});
  if (m.mask.query_offset) v.push_back({&m.offset_arr, "query_offset"});
  if (m.mask.key_length) v.push_back({&m.length_arr, "key_length"});
  if (m.mask.alibi_slopes) v.push_back({&m.slopes_arr, "alibi_slopes"});
  return v;
}

// q (B, T, H*D); k and v (B, S, KVH*D): KVH = num_kv_heads (0: num_heads) key/value heads, each read by
// num_heads / KVH query heads (grouped-query attention).
AttentionConfig attention_config(const HeadArg& q, const HeadArg& k, const HeadArg& v, index_t num_heads,
                                 float scale, float dropout_p, std::uint64_t seed, index_t num_kv_heads = 0) {
  if (num_heads < 1) value_error("num_heads must be >= 1");
  if (q.E % num_heads) value_error("embed size " + std::to_string(q.E) + " is not divisible by num_heads " +
                                   std::to_string(num_heads));
  if (num_kv_heads < 0) value_error("num_kv_heads must be >= 1");
  const index_t kvh = num_kv_heads == 0 ? num_heads : num_kv_heads;
  if (num_heads % kvh)
    value_error("num_kv_heads " + std::to_string(kvh) + " must divide num_heads " + std::to_string(num_heads));
  const index_t D = q.E / num_heads, kv_e = kvh * D;
  if (k.B != q.B || v.B != q.B || k.E != kv_e || v.E != kv_e || v.T != k.T) {
    std::ostringstream os;
    os << "attention: q (B, T, E) = (" << q.B << ", " << q.T << ", " << q.E << "), k and v must be (" << q.B
       << ", S, " << kv_e << ") with the same S";
    if (kvh != num_heads) os << " (num_kv_heads " << kvh << " x head size " << D << ")";
    os << "; got k (" << k.B << ", " << k.T << ", " << k.E << "), v (" << v.B << ", " << v.T << ", " << v.E << ")";
    value_error(os.str());
  }
  if (!(dropout_p >= 0.0f && dropout_p < 1.0f)) value_error("dropout_p must be in [0, 1)");
  if (!std::isfinite(scale)) value_error("scale must be finite");
  AttentionConfig c{q.B, num_heads, q.T, k.T, D, scale, dropout_p, seed};
  c.KVH = kvh;
  return c;
}

ConstHeadTensor as_const(const HeadArg& a) { return {a.data, a.sb, a.st}; }
HeadTensor as_mut(const HeadArg& a) { return {a.data, a.sb, a.st}; }

py::tuple attention_fwd(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj,
                        index_t num_heads, const py::object& attn_mask, const py::object& key_padding_mask,
                        bool is_causal, float scale, float dropout_p, std::uint64_t seed, bool need_lse,
                        index_t num_kv_heads, index_t window, const py::object& query_offset,
                        const py::object& key_length, const py::object& alibi_slopes) {
  const HeadArg q = head_arg(q_obj, "query", false), k = head_arg(k_obj, "key", false),
                v = head_arg(v_obj, "value", false);
  const AttentionConfig cfg = attention_config(q, k, v, num_heads, scale, dropout_p, seed, num_kv_heads);
  const MaskArgs m = mask_args(attn_mask, key_padding_mask, is_causal, cfg.B, cfg.H, cfg.T, cfg.S,
                               {window, query_offset, key_length, alibi_slopes});
  F32 out({q.B, q.T, q.E});
  py::object lse_obj = py::none();
  float* lse = nullptr;
  if (need_lse) {
    F32 l({cfg.B, cfg.H, cfg.T});
    lse = l.mutable_data();
    lse_obj = l;
  }
  const HeadTensor o{out.mutable_data(), q.T * q.E, q.E};
  {
    py::gil_scoped_release nogil;
    attention_forward(o, lse, as_const(q), as_const(k), as_const(v), m.mask, cfg);
  }
  return py::make_tuple(out, lse_obj);
}

void attention_bwd(const py::object& dout_obj, const py::object& q_obj, const py::object& k_obj,
                   const py::object& v_obj, const py::object& out_obj, const py::object& lse_obj,
                   const py::object& dq_obj, const py::object& dk_obj, const py::object& dv_obj, index_t num_heads,
                   const py::object& attn_mask, const py::object& key_padding_mask, bool is_causal, float scale,
                   float dropout_p, std::uint64_t seed, index_t num_kv_heads, index_t window,
                   const py::object& query_offset, const py::object& key_length, const py::object& alibi_slopes,
                   const py::object& grad_attn_mask) {
  const HeadArg q = head_arg(q_obj, "query", false), k = head_arg(k_obj, "key", false),
                v = head_arg(v_obj, "value", false), out = head_arg(out_obj, "output", false),
                dout = head_arg(dout_obj, "grad_output", false), dq = head_arg(dq_obj, "grad_query", true),
                dk = head_arg(dk_obj, "grad_key", true), dv = head_arg(dv_obj, "grad_value", true);
  const AttentionConfig cfg = attention_config(q, k, v, num_heads, scale, dropout_p, seed, num_kv_heads);
  const auto same = [](const HeadArg& a, const HeadArg& b) { return a.B == b.B && a.T == b.T && a.E == b.E; };
  if (!same(out, q) || !same(dout, q) || !same(dq, q) || !same(dk, k) || !same(dv, v))
    value_error("attention_backward: output, grad_output and grad_query must match query's shape, grad_key and "
                "grad_value those of key and value");
  const F32 lse = f32(lse_obj, "lse", 3, 3);
  if (lse.shape(0) != cfg.B || lse.shape(1) != cfg.H || lse.shape(2) != cfg.T)
    value_error("lse must have shape (B, num_heads, T) = (" + std::to_string(cfg.B) + ", " + std::to_string(cfg.H) +
                ", " + std::to_string(cfg.T) + "), got " + shape_of(lse));
  const MaskArgs m = mask_args(attn_mask, key_padding_mask, is_causal, cfg.B, cfg.H, cfg.T, cfg.S,
                               {window, query_offset, key_length, alibi_slopes});
  std::optional<F32> dmask;
  if (!grad_attn_mask.is_none()) {
    if (!m.mask.additive) value_error("grad_attn_mask needs attn_mask (it is the gradient with respect to it)");
    dmask = f32(grad_attn_mask, "grad_attn_mask", 1, 64, true);
    same_shape(*dmask, "grad_attn_mask", m.additive_arr, "attn_mask");
  }
  const std::vector<Arg> masks = mask_inputs(m);
  for (const Arg& out_arg : {Arg{&dq.arr, "grad_query"}, Arg{&dk.arr, "grad_key"}, Arg{&dv.arr, "grad_value"},
                             Arg{opt_arg(dmask), "grad_attn_mask"}})
    for (const Arg& in : masks)
      if (out_arg.array && shares_memory(*out_arg.array, *in.array))
        value_error(std::string(out_arg.name) + " must not share memory with " + in.name + " (it is written while " +
                    in.name + " is read)");
  check_disjoint({{&dq.arr, "grad_query"}, {&dk.arr, "grad_key"}, {&dv.arr, "grad_value"},
                  {opt_arg(dmask), "grad_attn_mask"}},
                 {{&dout.arr, "grad_output"}, {&q.arr, "query"}, {&k.arr, "key"}, {&v.arr, "value"},
                  {&out.arr, "output"}, {&lse, "lse"}});
  float* pdmask = dmask ? dmask->mutable_data() : nullptr;
  py::gil_scoped_release nogil;
  attention_backward(as_mut(dq), as_mut(dk), as_mut(dv), as_const(dout), as_const(q), as_const(k), as_const(v),
                     as_const(out), lse.data(), m.mask, cfg, pdmask);
}

F32 attention_probs(const py::object& q_obj, const py::object& k_obj, index_t num_heads,
                    const py::object& attn_mask, const py::object& key_padding_mask, bool is_causal, float scale,
                    index_t num_kv_heads, index_t window, const py::object& query_offset,
                    const py::object& key_length, const py::object& alibi_slopes) {
  const HeadArg q = head_arg(q_obj, "query", false), k = head_arg(k_obj, "key", false);
  const AttentionConfig cfg = attention_config(q, k, k, num_heads, scale, 0.0f, 0, num_kv_heads);
  const MaskArgs m = mask_args(attn_mask, key_padding_mask, is_causal, cfg.B, cfg.H, cfg.T, cfg.S,
                               {window, query_offset, key_length, alibi_slopes});
  F32 w({cfg.B, cfg.H, cfg.T, cfg.S});
  float* pw = w.mutable_data();
  {
    py::gil_scoped_release nogil;
    attention_weights(pw, as_const(q), as_const(k), m.mask, cfg);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------------------
// feed-forward: x (..., C), w1 (F, C), b1 (F), w2 (C, F), b2 (C)

struct FfnShapes {
  index_t rows, C, F;
};

FfnShapes ffn_shapes(const F32& x, const F32& w1, const F32& w2) {
  const auto [rows, C] = rows_cols(x);
  if (w1.ndim() != 2 || w1.shape(1) != C)
    value_error("linear1.weight must have shape (dim_feedforward, " + std::to_string(C) + "), got " + shape_of(w1));
  const index_t F = w1.shape(0);
  if (w2.ndim() != 2 || w2.shape(0) != C || w2.shape(1) != F)
    value_error("linear2.weight must have shape (" + std::to_string(C) + ", " + std::to_string(F) + "), got " +
                shape_of(w2));
  return {rows, C, F};
}

// A caller's reusable (rows, F) buffer (None: a fresh one): writable float32, C-contiguous, disjoint from `inputs`.
F32 hidden_buffer(const py::object& obj, const char* name, py::ssize_t rows, py::ssize_t F,
                  const std::vector<const py::array*>& inputs) {
  if (obj.is_none()) return F32({rows, F});
  F32 buf = f32(obj, name, 2, 2, true);
  if (buf.shape(0) != rows || buf.shape(1) != F)
    value_error(std::string(name) + " must have shape (" + std::to_string(rows) + ", " + std::to_string(F) +
                "), got " + shape_of(buf));
  for (const py::array* in : inputs)
    if (in && shares_memory(buf, *in)) value_error(std::string(name) + " must not share memory with the other arrays");
  return buf;
}

// The gate of a gated network (SwiGLU/GeGLU): w_gate (F, C) like linear1, b_gate (F) or None.
struct GateArgs {
  std::optional<F32> w, b;
  const float* bias = nullptr;
};
GateArgs gate_args(const py::object& w_obj, const py::object& b_obj, const FfnShapes& s) {
  GateArgs g;
  if (w_obj.is_none()) {
    if (!b_obj.is_none()) value_error("gate.bias given without gate.weight");
    return g;
  }
  g.w = f32(w_obj, "gate.weight", 2, 2);
  if (g.w->shape(0) != s.F || g.w->shape(1) != s.C)
    value_error("gate.weight must have shape (" + std::to_string(s.F) + ", " + std::to_string(s.C) + "), got " +
                shape_of(*g.w));
  g.b = opt_f32(b_obj, "gate.bias");
  g.bias = opt_vec(g.b, "gate.bias", s.F);
  return g;
}

FeedForwardWeights ffn_weights(const FfnShapes& s, const float* w1, const float* b1, const float* w2,
                               const float* b2, const GateArgs& g) {
  FeedForwardWeights w;
  w.up = LinearRef{s.C, s.F, w1, b1};
  w.down = LinearRef{s.F, s.C, w2, b2};
  if (g.w) w.gate = LinearRef{s.C, s.F, g.w->data(), g.bias};
  return w;
}

py::tuple feedforward_fwd(const py::object& x_obj, const py::object& w1_obj, const py::object& b1_obj,
                          const py::object& w2_obj, const py::object& b2_obj, const std::string& kind,
                          float dropout_p, std::uint64_t seed, const py::object& u_obj, const py::object& a_obj,
                          const py::object& wg_obj, const py::object& bg_obj) {
  const F32 x = f32(x_obj, "x", 1), w1 = f32(w1_obj, "linear1.weight", 2, 2), w2 = f32(w2_obj, "linear2.weight", 2, 2);
  const FfnShapes s = ffn_shapes(x, w1, w2);
  const auto b1_arr = opt_f32(b1_obj, "linear1.bias"), b2_arr = opt_f32(b2_obj, "linear2.bias");
  const float* b1 = opt_vec(b1_arr, "linear1.bias", s.F);
  const float* b2 = opt_vec(b2_arr, "linear2.bias", s.C);
  const GateArgs g = gate_args(wg_obj, bg_obj, s);
  check_p(dropout_p);
  const Activation act = activation_of(kind);
  F32 out = empty_like(x);
  const std::vector<const py::array*> ins{&x, &w1, &w2, opt_arg(b1_arr), opt_arg(b2_arr), opt_arg(g.w), opt_arg(g.b)};
  F32 u = hidden_buffer(u_obj, "u_out", s.rows, g.w ? 2 * s.F : s.F, ins);
  std::vector<const py::array*> ins_u = ins;
  ins_u.push_back(&u);
  F32 a = hidden_buffer(a_obj, "a_out", s.rows, s.F, ins_u);
  float *po = out.mutable_data(), *pu = u.mutable_data(), *pa = a.mutable_data();
  const FeedForwardWeights w = ffn_weights(s, w1.data(), b1, w2.data(), b2, g);
  const float* px = x.data();
  {
    py::gil_scoped_release nogil;
    feedforward_forward(po, pu, pa, px, w, s.rows, act, dropout_p, seed);
  }
  return py::make_tuple(out, u, a);
}

float* opt_grad(const py::object& obj, const char* name, const std::vector<py::ssize_t>& shape,
                std::optional<F32>& keep) {
  if (obj.is_none()) return nullptr;
  keep = f32(obj, name, 1, 2, true);
  bool ok = keep->ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = keep->shape(i) == shape[i];
  if (!ok) value_error(std::string(name) + " has the wrong shape " + shape_of(*keep));
  return keep->mutable_data();
}

F32 feedforward_bwd(const py::object& dout_obj, const py::object& x_obj, const py::object& u_obj,
                    const py::object& a_obj, const py::object& w1_obj, const py::object& w2_obj,
                    const py::object& dw1_obj, const py::object& db1_obj, const py::object& dw2_obj,
                    const py::object& db2_obj, const std::string& kind, float dropout_p, std::uint64_t seed,
                    const py::object& workspace_obj, const py::object& wg_obj, const py::object& dwg_obj,
                    const py::object& dbg_obj) {
  const F32 x = f32(x_obj, "x", 1), w1 = f32(w1_obj, "linear1.weight", 2, 2), w2 = f32(w2_obj, "linear2.weight", 2, 2);
  const FfnShapes s = ffn_shapes(x, w1, w2);
  const GateArgs g = gate_args(wg_obj, py::none(), s);
  const index_t uw = g.w ? 2 * s.F : s.F;
  const F32 dout = f32(dout_obj, "grad_output", 1), u = f32(u_obj, "u", 2, 2), a = f32(a_obj, "a", 2, 2);
  same_shape(dout, "grad_output", x, "x");
  if (u.shape(0) != s.rows || u.shape(1) != uw || a.shape(0) != s.rows || a.shape(1) != s.F)
    value_error("feedforward_backward: saved activations must have shape (rows, " + std::string(g.w ? "2 * " : "") +
                "dim_feedforward) and (rows, dim_feedforward)");
  std::optional<F32> k1, k2, k3, k4, k5, k6;
  float* dw1 = opt_grad(dw1_obj, "linear1.weight.grad", {s.F, s.C}, k1);
  float* db1 = opt_grad(db1_obj, "linear1.bias.grad", {s.F}, k2);
  float* dw2 = opt_grad(dw2_obj, "linear2.weight.grad", {s.C, s.F}, k3);
  float* db2 = opt_grad(db2_obj, "linear2.bias.grad", {s.C}, k4);
  float* dwg = opt_grad(dwg_obj, "gate.weight.grad", {s.F, s.C}, k5);
  float* dbg = opt_grad(dbg_obj, "gate.bias.grad", {s.F}, k6);
  if (!dw1 || !dw2 || (g.w && !dwg)) value_error("feedforward_backward: the weight gradients are required");
  check_disjoint({{opt_arg(k1), "grad_w1"}, {opt_arg(k2), "grad_b1"}, {opt_arg(k3), "grad_w2"}, {opt_arg(k4), "grad_b2"},
                  {opt_arg(k5), "grad_w_gate"}, {opt_arg(k6), "grad_b_gate"}},
                 {{&dout, "grad_output"}, {&x, "x"}, {&u, "u"}, {&a, "a"}, {&w1, "w1"}, {&w2, "w2"},
                  {opt_arg(g.w), "w_gate"}});
  check_p(dropout_p);
  const Activation act = activation_of(kind);
  std::vector<const py::array*> operands{&dout, &x, &u, &a, &w1, &w2, opt_arg(g.w)};
  for (const auto* grad : {&k1, &k2, &k3, &k4, &k5, &k6})
    if (*grad) operands.push_back(&**grad);
  F32 work = hidden_buffer(workspace_obj, "workspace", s.rows, g.w ? 3 * s.F : s.F, operands);
  F32 dx = empty_like(x);
  float *pdx = dx.mutable_data(), *pwork = work.mutable_data();
  const float *pdo = dout.data(), *px = x.data(), *pu = u.data(), *pa = a.data();
  const FeedForwardWeights w = ffn_weights(s, w1.data(), nullptr, w2.data(), nullptr, g);
  const FeedForwardGrads grads{dw1, db1, dwg, dbg, dw2, db2};
  {
    py::gil_scoped_release nogil;
    feedforward_backward(pdx, false, grads, pdo, px, pu, pa, w, pwork, s.rows, act, dropout_p, seed);
  }
  return dx;
}

void bias_grad(const py::object& dbias_obj, const py::object& dout_obj) {
  F32 db = f32(dbias_obj, "bias_grad", 1, 1, true);
  const F32 dout = f32(dout_obj, "grad_output", 1);
  const auto [rows, cols] = rows_cols(dout);
  if (db.shape(0) != cols)
    value_error("bias_grad must have shape (" + std::to_string(cols) + ",), got " + shape_of(db));
  check_disjoint({{&db, "bias_grad"}}, {{&dout, "grad_output"}});
  float* pdb = db.mutable_data();
  const float* pdo = dout.data();
  py::gil_scoped_release nogil;
  bias_backward(pdb, pdo, rows, cols);
}

py::dict build_info() {
  py::dict d;
  d["version"] = library_version();
  d["compiler"] = compiler_version();
  d["openmp"] = build_has_openmp();
  d["simd"] = get_simd_path();
  d["simd_compiled"] = build_has_amx()      ? "amx+avx512+avx2+scalar"
                       : build_has_avx512() ? "avx512+avx2+scalar"
                       : build_has_avx2()   ? "avx2+scalar"
                                            : "scalar";
  d["cpu_avx2_fma"] = cpu_supports_avx2_fma();
  d["int8_kernel"] = int8_kernel_name();
  d["cpu_avx512"] = cpu_supports_avx512();
  d["cpu_amx"] = cpu_supports_amx();
  d["num_threads"] = get_num_threads();
  return d;
}

// ---------------------------------------------------------------------------------------------------------------
// int8 dynamic quantization (inference-time Linear layers).

std::shared_ptr<Int8Weight> quantize_weight(const py::object& wobj) {
  F32 w = f32(wobj, "weight", 2, 2);
  auto q = std::make_shared<Int8Weight>();
  py::gil_scoped_release nogil;
  *q = quantize_weight_int8(w.data(), w.shape(0), w.shape(1), w.shape(1));
  return q;
}

// x (..., in) -> y (..., out) = x W^T + bias through a prepared weight (int8 or packed): validation, then
// run(x, rows, bias, y) with the GIL released.
template <class Run>
F32 prepared_linear(const char* name, const py::object& xobj, index_t in, index_t out, const py::object& bobj,
                    const py::object& out_obj, Run run) {
  F32 x = f32(xobj, "x", 1);
  const auto [rows, cols] = rows_cols(x);
  if (cols != in) {
    std::ostringstream os;
    os << name << ": x's last dimension must be in_features " << in << ", got shape " << shape_of(x);
    value_error(os.str());
  }
  auto b = opt_f32(bobj, "bias");
  const float* bias = opt_vec(b, "bias", out);
  auto shape = shape_vec(x);
  shape.back() = out;
  F32 y = out_obj.is_none() ? F32(shape) : f32(out_obj, "out", 1, 64, true);
  if (shape_vec(y) != shape)
    value_error(std::string(name) + ": out must have shape " + shape_of(F32(shape)) + ", got " + shape_of(y));
  check_disjoint({{&y, "out"}}, {{&x, "x"}, {opt_arg(b), "bias"}});
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    run(x.data(), rows, bias, yp);
  }
  return y;
}

F32 linear_int8_fwd(const py::object& xobj, const Int8Weight& w, const py::object& bobj, const py::object& out) {
  return prepared_linear("linear_int8", xobj, w.k, w.n, bobj, out,
                         [&](const float* x, index_t rows, const float* bias, float* y) {
                           linear_int8(x, rows, w.k, w, bias, y, w.n);
                         });
}

std::shared_ptr<PackedMatrix> pack_linear_weight(const py::object& wobj, bool amx_tiles) {
  F32 w = f32(wobj, "weight", 2, 2);
  auto p = std::make_shared<PackedMatrix>();
  py::gil_scoped_release nogil;
  *p = sgemm_pack_b(true, w.shape(1), w.shape(0), w.data(), w.shape(1), amx_tiles);  // x @ W^T: B = W^T
  return p;
}

F32 linear_packed_fwd(const py::object& xobj, const PackedMatrix& w, const py::object& bobj, const py::object& out) {
  return prepared_linear("linear_packed", xobj, w.K, w.N, bobj, out,
                         [&](const float* x, index_t rows, const float* bias, float* y) {
                           sgemm_packed(rows, x, w.K, w, y, w.N, bias);
                         });
}

py::tuple quantize_rows(const py::object& xobj) {
  F32 x = f32(xobj, "x", 2, 2);
  const index_t M = x.shape(0), K = x.shape(1);
  py::array_t<std::uint8_t> q({M, K});
  F32 scale(std::vector<py::ssize_t>{M});
  py::array_t<std::int32_t> zero(std::vector<py::ssize_t>{M});
  auto qp = q.mutable_data();
  auto sp = scale.mutable_data();
  auto zp = zero.mutable_data();
  {
    py::gil_scoped_release nogil;
    quantize_rows_u7(x.data(), M, K, K, qp, K, sp, zp);
  }
  return py::make_tuple(q, scale, zero);
}

}  // namespace

// ---- Private Unicode test hooks (issue 13; tests/tokenizers/test_unicode.py), over cpp/src/unicode.h ----
#include "src/unicode.h"

namespace {

py::tuple unicode_normalize_py(const std::u32string& text, const std::string& form) {
  namespace u = cpuformer::unicode;
  u::Form f;
  if (form == "NFD") f = u::Form::NFD;
  else if (form == "NFKD") f = u::Form::NFKD;
  else if (form == "NFC") f = u::Form::NFC;
  else if (form == "NFKC") f = u::Form::NFKC;
  else throw py::value_error("form must be NFD, NFKD, NFC or NFKC");
  std::u32string out;
  std::vector<int> changes;
  u::normalize(text, f, &out, &changes);
  return py::make_tuple(out, changes);
}

// Goes through utf8_to_utf32 / append_utf8 so that the tests cover them too; bytes are accepted (invalid UTF-8
// raises ValueError).
std::string unicode_lower_py(const std::string& text) {
  std::u32string in, lower;
  if (!cpuformer::unicode::utf8_to_utf32(text, &in)) throw py::value_error("invalid UTF-8");
  for (char32_t c : in) cpuformer::unicode::to_lower(c, &lower);
  std::string out;
  for (char32_t c : lower) cpuformer::unicode::append_utf8(c, &out);
  return out;
}

bool unicode_property_py(std::uint32_t cp, const std::string& name) {
  if (name == "white_space") return cpuformer::unicode::is_white_space(cp);
  if (name == "alphabetic") return cpuformer::unicode::is_alphabetic(cp);
  throw py::value_error("property must be white_space or alphabetic");
}

}  // namespace

// ---- Private regex test hook (issue 13; tests/tokenizers/test_regex.py), over cpp/src/regex.h ----
#include "src/regex.h"

namespace {

// All matches of pattern in text as (begin, end) **char** (code point) offsets; ValueError for an unsupported pattern.
// Runs the UTF-8 entry point (byte offsets, as the tokenizer uses it) and maps the bytes back to chars.
std::vector<std::pair<std::size_t, std::size_t>> regex_find_all_py(const std::string& pattern,
                                                                   const std::string& text) {
  cpuformer::regex::Regex re;
  std::string error;
  if (!cpuformer::regex::Regex::compile(pattern, &re, &error)) throw py::value_error(error);
  py::gil_scoped_release release;
  std::vector<std::pair<std::size_t, std::size_t>> spans = re.find_all(text);
  std::vector<std::size_t> char_at(text.size() + 1, 0);   // char index of each byte that starts a char
  std::size_t chars = 0;
  for (std::size_t b = 0; b < text.size(); ++b)
    if ((static_cast<unsigned char>(text[b]) & 0xC0) != 0x80) char_at[b] = chars++;
  char_at[text.size()] = chars;
  for (auto& span : spans) span = {char_at[span.first], char_at[span.second]};
  return spans;
}

}  // namespace

// ---- Tokenizers (issue 13; python/cpuformer/tokenizer.py), over cpuformer/tokenizer.h ----
#include "cpuformer/tokenizer.h"

namespace {

[[noreturn]] void tok_fail(const Status& st) { throw py::value_error(st.message()); }

Direction tok_direction(const std::string& d) {
  if (d == "right") return Direction::Right;
  if (d == "left") return Direction::Left;
  throw py::value_error("direction must be 'right' or 'left', got '" + d + "'");
}

// (max_length, strategy, direction, stride) with strategy longest_first / only_first / only_second.
TruncationParams tok_truncation(const py::tuple& t) {
  TruncationParams p;
  p.max_length = t[0].cast<std::size_t>();
  const auto s = t[1].cast<std::string>();
  if (s == "longest_first") p.strategy = TruncationParams::Strategy::LongestFirst;
  else if (s == "only_first") p.strategy = TruncationParams::Strategy::OnlyFirst;
  else if (s == "only_second") p.strategy = TruncationParams::Strategy::OnlySecond;
  else throw py::value_error("strategy must be 'longest_first', 'only_first' or 'only_second', got '" + s + "'");
  p.direction = tok_direction(t[2].cast<std::string>());
  p.stride = t[3].cast<std::size_t>();
  if (p.max_length > 0 && p.stride >= p.max_length) throw py::value_error("stride must be smaller than max_length");
  return p;
}

// (length or None for the longest, direction, pad_to_multiple_of or None, pad_id, pad_type_id, pad_token).
PaddingParams tok_padding(const py::tuple& t) {
  PaddingParams p;
  p.fixed = !t[0].is_none();
  if (p.fixed) p.length = t[0].cast<std::size_t>();
  p.direction = tok_direction(t[1].cast<std::string>());
  if (!t[2].is_none()) p.pad_to_multiple_of = t[2].cast<std::size_t>();
  p.pad_id = t[3].cast<std::int64_t>();
  p.pad_type_id = t[4].cast<std::int64_t>();
  p.pad_token = t[5].cast<std::string>();
  return p;
}

py::object tok_truncation_dict(const std::optional<TruncationParams>& p) {
  if (!p) return py::none();
  static const char* const strategies[] = {"longest_first", "only_first", "only_second"};
  py::dict d;
  d["max_length"] = p->max_length;
  d["stride"] = p->stride;
  d["strategy"] = strategies[static_cast<int>(p->strategy)];
  d["direction"] = p->direction == Direction::Right ? "right" : "left";
  return std::move(d);
}

py::object tok_padding_dict(const std::optional<PaddingParams>& p) {
  if (!p) return py::none();
  py::dict d;
  d["length"] = p->fixed ? py::cast(p->length) : py::none();
  d["pad_to_multiple_of"] = p->pad_to_multiple_of ? py::cast(p->pad_to_multiple_of) : py::none();
  d["pad_id"] = p->pad_id;
  d["pad_type_id"] = p->pad_type_id;
  d["pad_token"] = p->pad_token;
  d["direction"] = p->direction == Direction::Right ? "right" : "left";
  return std::move(d);
}

std::shared_ptr<Tokenizer> tok_load(const std::string& source, bool is_path) {
  std::unique_ptr<Tokenizer> t;
  Status st;
  {
    py::gil_scoped_release nogil;
    st = is_path ? Tokenizer::from_file(source, &t) : Tokenizer::from_json(source, &t);
  }
  if (!st.ok()) tok_fail(st);
  return std::shared_ptr<Tokenizer>(std::move(t));
}

Encoding tok_encode(const Tokenizer& t, const py::bytes& text, const py::object& pair, bool add_special_tokens) {
  std::string a = text, b;
  const bool has_pair = !pair.is_none();
  if (has_pair) b = pair.cast<py::bytes>();
  Encoding e;
  Status st;
  {
    py::gil_scoped_release nogil;
    st = t.encode(a, has_pair ? &b : nullptr, add_special_tokens, &e);
  }
  if (!st.ok()) tok_fail(st);
  return e;
}

// own_settings: the tokenizer's truncation/padding; otherwise the given ones (None: off).
std::vector<Encoding> tok_encode_batch(const Tokenizer& t, const std::vector<py::bytes>& texts,
                                       const py::object& pairs, bool add_special_tokens, bool own_settings,
                                       const py::object& truncation, const py::object& padding) {
  std::vector<std::string> a(texts.begin(), texts.end()), b;
  const bool has_pairs = !pairs.is_none();
  if (has_pairs)
    for (const auto& p : pairs.cast<std::vector<py::bytes>>()) b.push_back(p);
  std::optional<TruncationParams> tp;
  std::optional<PaddingParams> pp;
  if (!own_settings) {
    if (!truncation.is_none()) tp = tok_truncation(truncation.cast<py::tuple>());
    if (!padding.is_none()) pp = tok_padding(padding.cast<py::tuple>());
  }
  std::vector<Encoding> out;
  Status st;
  {
    py::gil_scoped_release nogil;
    st = own_settings ? t.encode_batch(a, has_pairs ? &b : nullptr, add_special_tokens, &out)
                      : t.encode_batch_with(a, has_pairs ? &b : nullptr, add_special_tokens, tp ? &*tp : nullptr,
                                            pp ? &*pp : nullptr, &out);
  }
  if (!st.ok()) tok_fail(st);
  return out;
}

// input_ids, attention_mask, token_type_ids as (B, T) int64 arrays; all encodings must have the same length.
py::tuple tok_arrays(const std::vector<Encoding>& encs) {
  const std::size_t B = encs.size(), T = B ? encs[0].size() : 0;
  for (const auto& e : encs)
    if (e.size() != T)
      throw py::value_error("the encodings have different lengths (" + std::to_string(T) + " and " +
                            std::to_string(e.size()) + "): use padding to get arrays");
  I64 ids({B, T}), mask({B, T}), types({B, T});
  auto* pi = ids.mutable_data();
  auto* pm = mask.mutable_data();
  auto* pt = types.mutable_data();
  for (std::size_t i = 0; i < B; ++i) {
    std::copy(encs[i].ids.begin(), encs[i].ids.end(), pi + i * T);
    std::copy(encs[i].attention_mask.begin(), encs[i].attention_mask.end(), pm + i * T);
    std::copy(encs[i].type_ids.begin(), encs[i].type_ids.end(), pt + i * T);
  }
  return py::make_tuple(ids, mask, types);
}

py::str tok_decode(const Tokenizer& t, const std::vector<std::int64_t>& ids, bool skip_special_tokens) {
  std::string out;
  Status st;
  {
    py::gil_scoped_release nogil;
    st = t.decode(ids, skip_special_tokens, &out);
  }
  if (!st.ok()) tok_fail(st);
  return py::str(out);
}

}  // namespace

// ---- BPE trainer (issue 13; python/cpuformer/bpe.py), over cpuformer/bpe_trainer.h ----
#include "cpuformer/bpe_trainer.h"

namespace {

// Train on the files (each line a sequence) then the texts (each a sequence); returns the tokenizer.json text.
// ValueError for invalid UTF-8 (naming the file) or an unreadable file.
py::str bpe_train_py(const std::vector<std::string>& files, const std::vector<std::string>& texts,
                     std::size_t vocab_size, std::uint64_t min_frequency,
                     const std::vector<std::string>& special_tokens) {
  std::string json;
  Status st;
  {
    py::gil_scoped_release nogil;
    BpeTrainerOptions opt;
    opt.vocab_size = vocab_size;
    opt.min_frequency = min_frequency;
    opt.special_tokens = special_tokens;
    BpeTrainer trainer(opt);
    for (const std::string& f : files) {
      st = trainer.feed_file(f);
      if (!st.ok()) break;
    }
    for (std::size_t i = 0; st.ok() && i < texts.size(); ++i) st = trainer.feed(texts[i]);
    BpeTrainResult result;
    if (st.ok()) st = trainer.train(&result);
    if (st.ok()) json = BpeTrainer::to_json(result);
  }
  if (!st.ok()) throw py::value_error(st.message());
  return py::str(json);
}

// ---------------------------------------------------------------------------------------------------------------
// The Transformer block (block.h). A BlockConfig is built once per layer from keyword arguments; weights and
// gradients come as dicts of arrays named "<part>.<field>" (see block_weights below), read in place.

NormKind norm_kind_of(const std::string& s) {
  if (s == "layer_norm") return NormKind::kLayerNorm;
  if (s == "rms_norm") return NormKind::kRMSNorm;
  value_error("norm must be 'layer_norm' or 'rms_norm', got '" + s + "'");
}

BlockConfig make_block_config(const py::kwargs& kw) {
  BlockConfig c;
  static const char* known[] = {"d_model", "num_heads", "num_kv_heads", "head_dim", "norm", "norm_eps",
                                "norm_one_plus", "norm_first", "qk_norm", "activation", "cross_attention",
                                "attention_scale", "sliding_window", "position", "rotary_dim", "rotary_layout",
                                "rope_theta", "rope_scaling", "relative_num_buckets", "relative_max_distance",
                                "relative_bidirectional", "dropout", "ff_dropout", "attention_dropout"};
  for (auto item : kw) {
    const std::string key = py::str(item.first);
    if (std::find(std::begin(known), std::end(known), key) == std::end(known))
      throw py::type_error("BlockConfig: unknown argument '" + key + "'");
  }
  auto get = [&](const char* k) -> py::object { return kw.contains(k) ? py::reinterpret_borrow<py::object>(kw[k]) : py::none(); };
  auto integer = [&](const char* k, index_t fallback, index_t lo) {
    py::object v = get(k);
    if (v.is_none()) return fallback;
    if (py::isinstance<py::bool_>(v) || !py::isinstance<py::int_>(v)) throw py::type_error(std::string("BlockConfig: ") + k + " must be an int");
    const index_t i = v.cast<index_t>();
    if (i < lo || i > (index_t{1} << 30)) value_error(std::string("BlockConfig: ") + k + " must be in [" + std::to_string(lo) + ", 2^30], got " + std::to_string(i));
    return i;
  };
  auto number = [&](const char* k, double fallback) {
    py::object v = get(k);
    if (v.is_none()) return fallback;
    const double d = v.cast<double>();
    if (!std::isfinite(d)) value_error(std::string("BlockConfig: ") + k + " must be finite");
    return d;
  };
  auto flag = [&](const char* k, bool fallback) {
    py::object v = get(k);
    return v.is_none() ? fallback : v.cast<bool>();
  };
  auto text = [&](const char* k, const char* fallback) {
    py::object v = get(k);
    return v.is_none() ? std::string(fallback) : v.cast<std::string>();
  };
  c.d_model = integer("d_model", 0, 1);
  c.num_heads = integer("num_heads", 0, 1);
  if (!c.d_model || !c.num_heads) value_error("BlockConfig: d_model and num_heads are required");
  c.num_kv_heads = integer("num_kv_heads", 0, 0);
  c.head_dim = integer("head_dim", 0, 0);
  c.norm = norm_kind_of(text("norm", "layer_norm"));
  c.norm_eps = static_cast<float>(number("norm_eps", 1e-5));
  c.norm_one_plus = flag("norm_one_plus", false);
  c.norm_first = flag("norm_first", false);
  c.qk_norm = flag("qk_norm", false);
  c.activation = activation_of(text("activation", "relu"));
  c.cross_attention = flag("cross_attention", false);
  c.attention_scale = static_cast<float>(number("attention_scale", 0.0));
  c.sliding_window = integer("sliding_window", 0, 0);
  const std::string pos = text("position", "none");
  if (pos == "none") c.position = PositionKind::kNone;
  else if (pos == "rotary") c.position = PositionKind::kRotary;
  else if (pos == "alibi") c.position = PositionKind::kAlibi;
  else if (pos == "relative") c.position = PositionKind::kRelativeBias;
  else value_error("BlockConfig: position must be 'none', 'rotary', 'alibi' or 'relative', got '" + pos + "'");
  c.rotary.rotary_dim = integer("rotary_dim", 0, 0);
  const std::string layout = text("rotary_layout", "half");
  if (layout != "half" && layout != "interleaved") value_error("BlockConfig: rotary_layout must be 'half' or 'interleaved'");
  c.rotary.layout = layout == "half" ? RotaryLayout::kHalf : RotaryLayout::kInterleaved;
  c.rotary.theta = number("rope_theta", 10000.0);
  if (!(c.rotary.theta > 0)) value_error("BlockConfig: rope_theta must be > 0");
  py::object scaling = get("rope_scaling");
  if (!scaling.is_none()) {
    py::dict s = scaling.cast<py::dict>();
    const std::string type = s.contains("rope_type") ? s["rope_type"].cast<std::string>()
                             : s.contains("type") ? s["type"].cast<std::string>() : "default";
    auto sget = [&](const char* k, double fallback) { return s.contains(k) ? s[k].cast<double>() : fallback; };
    if (type == "linear") {
      c.rotary.linear_factor = sget("factor", 1.0);
      if (!(c.rotary.linear_factor > 0)) value_error("BlockConfig: rope_scaling factor must be > 0");
    } else if (type == "llama3") {
      c.rotary.llama3_factor = sget("factor", 8.0);
      c.rotary.low_freq_factor = sget("low_freq_factor", 1.0);
      c.rotary.high_freq_factor = sget("high_freq_factor", 4.0);
      c.rotary.original_max_position = static_cast<index_t>(sget("original_max_position_embeddings", 8192));
      if (!(c.rotary.llama3_factor > 0) || !(c.rotary.high_freq_factor > c.rotary.low_freq_factor))
        value_error("BlockConfig: llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor");
    } else if (type != "default") {
      value_error("BlockConfig: rope_scaling type '" + type + "' is not supported ('linear', 'llama3', 'default')");
    }
  }
  c.relative.num_buckets = integer("relative_num_buckets", 32, 2);
  c.relative.max_distance = integer("relative_max_distance", 128, 2);
  c.relative.bidirectional = flag("relative_bidirectional", true);
  c.dropout = static_cast<float>(number("dropout", 0.0));
  c.ff_dropout = static_cast<float>(number("ff_dropout", 0.0));
  c.attention_dropout = static_cast<float>(number("attention_dropout", 0.0));
  for (float p : {c.dropout, c.ff_dropout, c.attention_dropout})
    if (!(p >= 0.0f && p < 1.0f)) value_error("BlockConfig: dropout probabilities must be in [0, 1)");
  if (c.num_heads % c.kv_heads()) value_error("BlockConfig: num_kv_heads (" + std::to_string(c.num_kv_heads) + ") must divide num_heads (" + std::to_string(c.num_heads) + ")");
  if (!c.head_dim && c.d_model % c.num_heads) value_error("BlockConfig: d_model (" + std::to_string(c.d_model) + ") must be a multiple of num_heads (" + std::to_string(c.num_heads) + ") unless head_dim is given");
  const index_t rd = c.rotary.rotary_dim ? c.rotary.rotary_dim : c.head_size();
  if (c.position == PositionKind::kRotary && (rd % 2 || rd < 2 || rd > c.head_size()))
    value_error("BlockConfig: rotary_dim (" + std::to_string(rd) + ") must be even, >= 2 and <= head_dim (" +
                std::to_string(c.head_size()) + ")");
  return c;
}

// Reads the named arrays of a block's weights (or gradients) from a dict, checking dtypes and shapes against the
// config. Names: {self_attn,cross_attn}.{qkv,q,k,v,kv,o}.{weight,bias,packed,int8,in_out}, self_attn.q_norm,
// self_attn.k_norm, self_attn.relative_table, {norm1,norm2,norm_ff}.{weight,bias}, ff.{up,gate,down}.{...}.
struct BlockArrays {
  const BlockConfig& c;
  const py::dict& d;
  bool grads;
  std::vector<std::string> used;
  index_t F = 0;

  py::object find(const std::string& key) {
    if (!d.contains(key.c_str())) return py::none();
    used.push_back(key);
    py::object v = d[key.c_str()];
    return v;
  }
  float* array(const std::string& key, std::vector<index_t> shape) {
    py::object v = find(key);
    if (v.is_none()) return nullptr;
    F32 a = f32(v, key.c_str(), static_cast<int>(shape.size()), static_cast<int>(shape.size()), grads);
    for (size_t i = 0; i < shape.size(); ++i)
      if (a.shape(i) != shape[i]) {
        std::ostringstream os;
        os << key << " must have shape (";
        for (size_t j = 0; j < shape.size(); ++j) os << (j ? ", " : "") << shape[j];
        os << (shape.size() == 1 ? ",)" : ")") << ", got " << shape_of(a);
        value_error(os.str());
      }
    return grads ? a.mutable_data() : const_cast<float*>(a.data());
  }
  LinearRef linear(const std::string& p, index_t in, index_t out) {
    LinearRef r;
    r.in = in, r.out = out;
    py::object io = find(p + ".in_out");
    r.in_out = !io.is_none() && io.cast<bool>();
    r.weight = array(p + ".weight", r.in_out ? std::vector<index_t>{in, out} : std::vector<index_t>{out, in});
    r.bias = array(p + ".bias", {out});
    py::object packed = find(p + ".packed"), int8 = find(p + ".int8");
    if (!packed.is_none()) {
      r.packed = &packed.cast<const PackedMatrix&>();
      if (r.packed->K != in || r.packed->N != out) value_error(p + ".packed has the wrong size");
    }
    if (!int8.is_none()) {
      r.int8 = &int8.cast<const Int8Weight&>();
      if (r.int8->k != in || r.int8->n != out) value_error(p + ".int8 has the wrong size");
    }
    return r;
  }
  LinearGrads grad(const std::string& p, index_t in, index_t out, bool in_out) {
    return LinearGrads{array(p + ".weight", in_out ? std::vector<index_t>{in, out} : std::vector<index_t>{out, in}),
                       array(p + ".bias", {out})};
  }
  void check_all_used() {
    for (auto item : d) {
      const std::string key = py::str(item.first);
      if (std::find(used.begin(), used.end(), key) == used.end())
        value_error("block: unexpected " + std::string(grads ? "gradient" : "weight") + " '" + key + "'");
    }
  }
};

index_t ff_width(const py::dict& w) {
  for (const char* k : {"ff.up.weight", "ff.up.packed", "ff.up.int8"}) {
    if (!w.contains(k)) continue;
    py::object v = w[k];
    if (py::isinstance<PackedMatrix>(v)) return v.cast<const PackedMatrix&>().N;
    if (py::isinstance<Int8Weight>(v)) return v.cast<const Int8Weight&>().n;
    auto a = py::reinterpret_borrow<py::array>(v);
    if (a.ndim() != 2) value_error("ff.up.weight must be 2-D");
    const bool in_out = w.contains("ff.up.in_out") && w["ff.up.in_out"].cast<bool>();
    return a.shape(in_out ? 1 : 0);
  }
  value_error("block: missing weight 'ff.up.weight'");
}

void read_attention(BlockArrays& a, const std::string& p, bool cross, AttentionWeights& w) {
  const BlockConfig& c = a.c;
  const index_t C = c.d_model, D = c.head_size(), qd = c.num_heads * D, kd = c.kv_heads() * D;
  if (!cross) w.qkv = a.linear(p + ".qkv", C, qd + 2 * kd);
  w.q = a.linear(p + ".q", C, qd);
  w.k = a.linear(p + ".k", C, kd);
  w.v = a.linear(p + ".v", C, kd);
  if (cross) w.kv = a.linear(p + ".kv", C, 2 * kd);
  w.o = a.linear(p + ".o", qd, C);
  w.q_norm = a.array(p + ".q_norm", {D});
  w.k_norm = a.array(p + ".k_norm", {D});
  w.relative_table = a.array(p + ".relative_table", {c.relative.num_buckets, c.num_heads});
}

BlockWeights block_weights(const BlockConfig& c, const py::dict& d) {
  BlockArrays a{c, d, false, {}, 0};
  BlockWeights w;
  read_attention(a, "self_attn", false, w.self_attn);
  if (c.cross_attention) read_attention(a, "cross_attn", true, w.cross_attn);
  for (auto [name, n] : {std::pair<const char*, NormRef*>{"norm1", &w.norm1}, {"norm2", &w.norm2}, {"norm_ff", &w.norm_ff}}) {
    n->weight = a.array(std::string(name) + ".weight", {c.d_model});
    n->bias = a.array(std::string(name) + ".bias", {c.d_model});
  }
  const index_t F = ff_width(d);
  w.ff.up = a.linear("ff.up", c.d_model, F);
  w.ff.gate = a.linear("ff.gate", c.d_model, F);
  w.ff.down = a.linear("ff.down", F, c.d_model);
  a.check_all_used();
  block_check(c, w);
  return w;
}

void read_attention_grads(BlockArrays& a, const std::string& p, const AttentionWeights& w, AttentionGrads& g) {
  const BlockConfig& c = a.c;
  const index_t C = c.d_model, D = c.head_size(), qd = c.num_heads * D, kd = c.kv_heads() * D;
  g.qkv = a.grad(p + ".qkv", C, qd + 2 * kd, w.qkv.in_out);
  g.q = a.grad(p + ".q", C, qd, w.q.in_out);
  g.k = a.grad(p + ".k", C, kd, w.k.in_out);
  g.v = a.grad(p + ".v", C, kd, w.v.in_out);
  g.kv = a.grad(p + ".kv", C, 2 * kd, w.kv.in_out);
  g.o = a.grad(p + ".o", qd, C, w.o.in_out);
  g.q_norm = a.array(p + ".q_norm", {D});
  g.k_norm = a.array(p + ".k_norm", {D});
  g.relative_table = a.array(p + ".relative_table", {c.relative.num_buckets, c.num_heads});
}

BlockGrads block_grads(const BlockConfig& c, const BlockWeights& w, const py::dict& d) {
  BlockArrays a{c, d, true, {}, 0};
  BlockGrads g;
  read_attention_grads(a, "self_attn", w.self_attn, g.self_attn);
  if (c.cross_attention) read_attention_grads(a, "cross_attn", w.cross_attn, g.cross_attn);
  for (auto [name, n] : {std::pair<const char*, NormGrads*>{"norm1", &g.norm1}, {"norm2", &g.norm2}, {"norm_ff", &g.norm_ff}}) {
    n->weight = a.array(std::string(name) + ".weight", {c.d_model});
    n->bias = a.array(std::string(name) + ".bias", {c.d_model});
  }
  const index_t F = w.ff.up.out;
  const LinearGrads up = a.grad("ff.up", c.d_model, F, w.ff.up.in_out), gate = a.grad("ff.gate", c.d_model, F, w.ff.gate.in_out),
                    down = a.grad("ff.down", F, c.d_model, w.ff.down.in_out);
  g.ff = FeedForwardGrads{up.weight, up.bias, gate.weight, gate.bias, down.weight, down.bias};
  a.check_all_used();
  return g;
}

// What a training forward keeps, with the call's mask arrays (their pointers are in s.in) kept alive.
struct PyBlockSaved {
  BlockSaved s;
  py::object memory, key_padding, additive, memory_padding, memory_additive, offset;
};

struct BlockCall {
  F32 x;
  BlockInput in;
  MaskArgs self_m, mem_m;
  std::optional<F32> memory;
  std::optional<I64> offset;
};

BlockCall block_call(const BlockConfig& c, const py::object& x_obj, const py::object& key_padding_mask,
                     const py::object& attn_mask, bool is_causal, const py::object& position_offset,
                     const py::object& memory, const py::object& memory_key_padding_mask,
                     const py::object& memory_mask) {
  BlockCall call;
  call.x = f32(x_obj, "x", 3, 3);
  if (call.x.shape(2) != c.d_model)
    value_error("x must be (batch, length, " + std::to_string(c.d_model) + "), got " + shape_of(call.x));
  const index_t B = call.x.shape(0), T = call.x.shape(1);
  BlockInput& in = call.in;
  in.B = B, in.T = T, in.causal = is_causal;
  call.self_m = mask_args(attn_mask, key_padding_mask, is_causal, B, c.num_heads, T, T);
  in.key_padding = call.self_m.mask.key_padding;
  in.additive = call.self_m.mask.additive;
  in.add_sb = call.self_m.mask.add_sb, in.add_sh = call.self_m.mask.add_sh, in.add_st = call.self_m.mask.add_st;
  if (!position_offset.is_none()) {
    call.offset = i64(position_offset, "position_offset");
    if (call.offset->ndim() != 1 || call.offset->shape(0) != B)
      value_error("position_offset must have shape (" + std::to_string(B) + ",), got " + shape_of(*call.offset));
    for (index_t b = 0; b < B; ++b)
      if (call.offset->data()[b] < 0 || call.offset->data()[b] > (index_t{1} << 30))
        value_error("position_offset values must be in [0, 2^30]");
    in.position_offset = call.offset->data();
  }
  if (c.cross_attention) {
    if (memory.is_none()) value_error("memory is required by a cross-attention block");
    call.memory = f32(memory, "memory", 3, 3);
    if (call.memory->shape(0) != B || call.memory->shape(2) != c.d_model)
      value_error("memory must be (" + std::to_string(B) + ", S, " + std::to_string(c.d_model) + "), got " +
                  shape_of(*call.memory));
    in.memory = call.memory->data();
    in.S = call.memory->shape(1);
    call.mem_m = mask_args(memory_mask, memory_key_padding_mask, false, B, c.num_heads, T, in.S);
    in.memory_padding = call.mem_m.mask.key_padding;
    in.memory_additive = call.mem_m.mask.additive;
    in.mem_add_sb = call.mem_m.mask.add_sb, in.mem_add_sh = call.mem_m.mask.add_sh, in.mem_add_st = call.mem_m.mask.add_st;
  } else if (!memory.is_none()) {
    value_error("memory given to a block without cross-attention");
  }
  return call;
}

py::object block_fwd(const BlockConfig& c, const py::dict& weights, const py::object& x, const py::object& key_padding_mask,
                     const py::object& attn_mask, bool is_causal, const py::object& position_offset,
                     const py::object& memory, const py::object& memory_key_padding_mask, const py::object& memory_mask,
                     bool need_weights, std::optional<std::uint64_t> seed, PyBlockSaved* saved) {
  const BlockWeights w = block_weights(c, weights);
  BlockCall call = block_call(c, x, key_padding_mask, attn_mask, is_causal, position_offset, memory,
                              memory_key_padding_mask, memory_mask);
  const index_t B = call.in.B, T = call.in.T;
  F32 out({B, T, c.d_model});
  std::optional<F32> probs;
  if (need_weights) probs = F32({B, c.num_heads, T, T});
  {
    py::gil_scoped_release nogil;
    if (saved)
      block_forward_train(out.mutable_data(), call.x.data(), c, w, call.in, *seed, saved->s,
                          probs ? probs->mutable_data() : nullptr);
    else
      block_forward(out.mutable_data(), call.x.data(), c, w, call.in, probs ? probs->mutable_data() : nullptr);
  }
  if (saved) {  // keep what s.in points to
    saved->memory = call.memory ? py::object(*call.memory) : py::none();
    saved->key_padding = py::object(call.self_m.padding_arr);
    saved->additive = py::object(call.self_m.additive_arr);
    saved->memory_padding = py::object(call.mem_m.padding_arr);
    saved->memory_additive = py::object(call.mem_m.additive_arr);
    saved->offset = call.offset ? py::object(*call.offset) : py::none();
  }
  if (need_weights) return py::make_tuple(out, *probs);
  return std::move(out);
}

py::tuple block_bwd(const BlockConfig& c, const py::dict& weights, const py::dict& grads, const py::object& dout_obj,
                    PyBlockSaved& saved) {
  if (!saved.s.valid) value_error("block_backward: no training forward to differentiate");
  const BlockWeights w = block_weights(c, weights);
  const BlockGrads g = block_grads(c, w, grads);
  F32 dout = f32(dout_obj, "grad_output", 3, 3);
  const index_t B = saved.s.in.B, T = saved.s.in.T;
  if (dout.shape(0) != B || dout.shape(1) != T || dout.shape(2) != c.d_model)
    value_error("grad_output must have the forward output's shape (" + std::to_string(B) + ", " + std::to_string(T) +
                ", " + std::to_string(c.d_model) + "), got " + shape_of(dout));
  F32 dx({B, T, c.d_model});
  std::optional<F32> dmem;
  if (c.cross_attention) {
    dmem = F32({B, saved.s.in.S, c.d_model});
    std::fill(dmem->mutable_data(), dmem->mutable_data() + dmem->size(), 0.0f);
  }
  {
    py::gil_scoped_release nogil;
    block_backward(dx.mutable_data(), dmem ? dmem->mutable_data() : nullptr, dout.data(), c, w, g, saved.s);
  }
  return py::make_tuple(dx, dmem ? py::object(*dmem) : py::none());
}

py::object block_decode_py(const BlockConfig& c, const py::dict& weights, const py::object& x_obj, KVCache& cache,
                           const py::object& new_tokens, const KVCache* cross, const py::object& memory_key_padding_mask,
                           const py::object& output_rows) {
  const BlockWeights w = block_weights(c, weights);
  F32 x = f32(x_obj, "x", 3, 3);
  if (x.shape(2) != c.d_model) value_error("x must be (batch, length, " + std::to_string(c.d_model) + ")");
  const index_t B = x.shape(0), T = x.shape(1);
  std::optional<I64> n_new;
  if (!new_tokens.is_none()) {
    n_new = i64(new_tokens, "new_tokens");
    if (n_new->ndim() != 1 || n_new->shape(0) != B) value_error("new_tokens must have shape (" + std::to_string(B) + ",)");
  }
  MaskArgs mm;
  if (!memory_key_padding_mask.is_none()) {
    if (!cross) value_error("memory_key_padding_mask needs the cross cache");
    mm = mask_args(py::none(), memory_key_padding_mask, false, B, c.num_heads, T, cross->capacity);
  }
  std::optional<I64> rows;
  if (!output_rows.is_none()) {
    rows = i64(output_rows, "output_rows");
    if (rows->ndim() != 1 || rows->shape(0) != B) value_error("output_rows must have shape (" + std::to_string(B) + ",)");
  }
  F32 out({B, rows ? 1 : T, c.d_model});
  {
    py::gil_scoped_release nogil;
    block_decode(out.mutable_data(), x.data(), c, w, B, T, n_new ? n_new->data() : nullptr, cache, cross,
                 mm.mask.key_padding, rows ? rows->data() : nullptr);
  }
  return std::move(out);
}



// The attention sublayer alone (MultiheadAttention): weights "attn.{qkv,q,k,v,kv,o}.*" as the block's parts.
struct PyAttentionSaved {
  AttentionLayerSaved s;
  py::object xq, xk, xv, padding, additive;
};

AttentionWeights attention_layer_weights(const BlockConfig& c, const py::dict& d, bool self) {
  BlockArrays a{c, d, false, {}, 0};
  AttentionWeights w;
  read_attention(a, "attn", !self, w);
  a.check_all_used();
  return w;
}

py::object attention_layer_fwd(const BlockConfig& c, const py::dict& weights, const py::object& xq_obj,
                               const py::object& xk_obj, const py::object& xv_obj, const py::object& key_padding_mask,
                               const py::object& attn_mask, bool is_causal, std::uint64_t seed,
                               PyAttentionSaved* saved, bool need_weights) {
  const bool self = xq_obj.is(xk_obj) && xk_obj.is(xv_obj);
  F32 xq = f32(xq_obj, "query", 3, 3);
  F32 xk = self ? xq : f32(xk_obj, "key", 3, 3);
  F32 xv = self ? xq : (xv_obj.is(xk_obj) ? xk : f32(xv_obj, "value", 3, 3));
  const index_t B = xq.shape(0), T = xq.shape(1), S = xk.shape(1);
  for (const F32* a : {&xq, &xk, &xv})
    if (a->shape(2) != c.d_model) value_error("query, key and value must have last dimension " + std::to_string(c.d_model));
  if (xk.shape(0) != B || xv.shape(0) != B || xv.shape(1) != S)
    value_error("key and value must be (" + std::to_string(B) + ", S, " + std::to_string(c.d_model) + ") with one S");
  const AttentionWeights w = attention_layer_weights(c, weights, self);
  BlockInput in;
  in.B = B, in.T = T, in.S = S;
  MaskArgs m = mask_args(attn_mask, key_padding_mask, is_causal, B, c.num_heads, T, S);
  if (self) {
    in.key_padding = m.mask.key_padding, in.causal = is_causal;
    in.additive = m.mask.additive, in.add_sb = m.mask.add_sb, in.add_sh = m.mask.add_sh, in.add_st = m.mask.add_st;
  } else {
    in.memory_padding = m.mask.key_padding;
    in.memory_additive = m.mask.additive, in.mem_add_sb = m.mask.add_sb, in.mem_add_sh = m.mask.add_sh;
    in.mem_add_st = m.mask.add_st;
  }
  F32 out({B, T, c.d_model});
  std::optional<F32> probs;
  if (need_weights) probs = F32({B, c.num_heads, T, S});
  {
    py::gil_scoped_release nogil;
    attention_layer_forward(out.mutable_data(), xq.data(), xk.data(), xv.data(), c, w, in, is_causal, seed,
                            saved ? &saved->s : nullptr, probs ? probs->mutable_data() : nullptr);
  }
  if (saved) {  // keep the inputs and masks s.in points to
    saved->xq = xq, saved->xk = xk, saved->xv = xv;
    saved->padding = py::object(m.padding_arr), saved->additive = py::object(m.additive_arr);
  }
  if (need_weights) return py::make_tuple(out, *probs);
  return std::move(out);
}

// mode "separate": (d_query, d_key, d_value); "summed" (self-attention): (d_input,); "query_memory" (key is value):
// (d_query, d_memory).
py::tuple attention_layer_bwd(const BlockConfig& c, const py::dict& weights, const py::dict& grads,
                              const py::object& dout_obj, PyAttentionSaved& saved, const std::string& mode) {
  AttentionLayerSaved& s = saved.s;
  if (!s.valid) value_error("attention backward: no training forward to differentiate");
  if (mode != "separate" && mode != "summed" && mode != "query_memory")
    value_error("mode must be 'separate', 'summed' or 'query_memory', got '" + mode + "'");
  if (mode == "summed" && !s.self) value_error("the summed input gradient needs a self-attention forward");
  if (mode == "query_memory" && (s.self || s.xk != s.xv))
    value_error("the (query, memory) gradients need a forward with key is value (not self-attention)");
  const AttentionWeights w = attention_layer_weights(c, weights, s.self);
  BlockArrays a{c, grads, true, {}, 0};
  AttentionGrads g;
  read_attention_grads(a, "attn", w, g);
  a.check_all_used();
  F32 dout = f32(dout_obj, "grad_output", 3, 3);
  const index_t B = s.in.B, T = s.in.T, S = s.self ? s.in.T : s.in.S, C = c.d_model;
  if (dout.shape(0) != B || dout.shape(1) != T || dout.shape(2) != C)
    value_error("grad_output must have the forward output's shape (" + std::to_string(B) + ", " + std::to_string(T) +
                ", " + std::to_string(C) + "), got " + shape_of(dout));
  F32 dq({B, T, C});
  std::optional<F32> dk, dv;
  if (mode != "summed") dk = F32({B, S, C});
  if (mode == "separate") dv = F32({B, S, C});
  {
    py::gil_scoped_release nogil;
    float* pq = dq.mutable_data();
    float* pk = dk ? dk->mutable_data() : pq;
    float* pv = dv ? dv->mutable_data() : pk;
    attention_layer_backward(pq, pk, pv, dout.data(), c, w, g, s);
  }
  if (mode == "summed") return py::make_tuple(dq);
  if (mode == "query_memory") return py::make_tuple(dq, *dk);
  return py::make_tuple(dq, *dk, *dv);
}

}  // namespace

// ---- Memory-mapped safetensors files and Hugging Face directories (python/cpuformer/io.py open_safetensors), over
// cpuformer/safetensors.h. tensor() returns read-only numpy views of the mapped bytes whose base is the map's Python
// object, so the mapping lives as long as any view. ----
#include <cstring>
#include <filesystem>

namespace {

[[noreturn]] void st_fail(const Status& st) {
  if (st.is_not_found()) {
    py::set_error(PyExc_FileNotFoundError, st.message().c_str());
    throw py::error_already_set();
  }
  throw py::value_error(st.message());
}

std::shared_ptr<SafetensorsMap> st_open(const std::string& path) {
  std::unique_ptr<SafetensorsMap> map;
  Status st;
  {
    py::gil_scoped_release nogil;
    std::error_code ec;
    st = std::filesystem::is_directory(path, ec) ? SafetensorsMap::open_directory(path, &map)
                                                 : SafetensorsMap::open_file(path, &map);
  }
  if (!st.ok()) st_fail(st);
  return std::shared_ptr<SafetensorsMap>(std::move(map));
}

const TensorView& st_view(const SafetensorsMap& map, const std::string& name) {
  const TensorView* v = map.find(name);
  if (!v) throw py::key_error("no tensor '" + name + "' in the safetensors map");
  return *v;
}

// numpy has no bfloat16 or 8-bit float types: those come as their raw bits (uint16, uint8).
py::dtype st_numpy_dtype(DType d) {
  switch (d) {
    case DType::kBool: return py::dtype("?");
    case DType::kI8: return py::dtype("i1");
    case DType::kI16: return py::dtype("<i2");
    case DType::kU16: case DType::kBF16: return py::dtype("<u2");
    case DType::kF16: return py::dtype("<f2");
    case DType::kI32: return py::dtype("<i4");
    case DType::kU32: return py::dtype("<u4");
    case DType::kF32: return py::dtype("<f4");
    case DType::kI64: return py::dtype("<i8");
    case DType::kU64: return py::dtype("<u8");
    case DType::kF64: return py::dtype("<f8");
    case DType::kC64: return py::dtype("<c8");
    default: return py::dtype("u1");  // U8 and the F8 formats
  }
}

py::array st_tensor(const py::object& self, const std::string& name) {
  const TensorView& v = st_view(self.cast<const SafetensorsMap&>(), name);
  const py::dtype dt = st_numpy_dtype(v.dtype);
  const std::vector<py::ssize_t> shape(v.shape.begin(), v.shape.end());
  const auto align = static_cast<std::uintptr_t>(dt.attr("alignment").cast<int>());
  py::array a;
  if (reinterpret_cast<std::uintptr_t>(v.data) % align == 0) {
    a = py::array(dt, shape, v.data, self);  // no copy: `self` as the base keeps the mapping alive
  } else {
    a = py::array(dt, shape);  // unaligned (old writers did not pad the header): a copy
    if (v.nbytes) std::memcpy(a.mutable_data(), v.data, static_cast<size_t>(v.nbytes));
  }
  a.attr("setflags")(py::arg("write") = false);
  return a;
}

py::list st_keys(const SafetensorsMap& map) {
  py::list names;
  for (const auto& [name, v] : map.tensors()) names.append(py::str(name));
  return names;
}

void bind_safetensors_map(py::module_& m) {
  py::class_<SafetensorsMap, std::shared_ptr<SafetensorsMap>>(
      m, "SafetensorsMap",
      "Safetensors file(s) mapped read-only: a file, or a Hugging Face directory (model.safetensors, or "
      "model.safetensors.index.json and its shards). Opening reads only the headers; tensor() views the bytes.")
      .def_static("open", &st_open, py::arg("path"),
                  "Open a .safetensors file or a model directory. ValueError for a malformed one, FileNotFoundError "
                  "for a missing file, directory or shard.")
      .def("keys", &st_keys, "Tensor names, sorted.")
      .def("__iter__", [](const SafetensorsMap& map) { return py::iter(st_keys(map)); })
      .def("__len__", [](const SafetensorsMap& map) { return map.tensors().size(); })
      .def("__contains__", [](const SafetensorsMap& map, const py::object& name) {
        return py::isinstance<py::str>(name) && map.find(name.cast<std::string>()) != nullptr;
      })
      .def("dtype", [](const SafetensorsMap& map, const std::string& name) {
        return std::string(dtype_name(st_view(map, name).dtype));
      }, py::arg("name"), "The file's dtype name: 'F32', 'BF16', ...")
      .def("shape", [](const SafetensorsMap& map, const std::string& name) {
        const TensorView& v = st_view(map, name);
        py::tuple t(v.shape.size());
        for (size_t i = 0; i < v.shape.size(); ++i) t[i] = py::int_(v.shape[i]);
        return t;
      }, py::arg("name"))
      .def("tensor", &st_tensor, py::arg("name"),
           "A read-only numpy array viewing the mapped bytes (a copy only when they are unaligned). F16 is float16; "
           "BF16 comes as its raw bits (uint16), the F8 formats as uint8, C64 as complex64.")
      .def("metadata", [](const SafetensorsMap& map) {
        py::dict d;
        for (const auto& [k, v] : map.metadata()) d[py::str(k)] = py::str(v);
        return d;
      }, "The files' __metadata__, merged.")
      .def_property_readonly("mapped_bytes", &SafetensorsMap::mapped_bytes, "Total size of the files held.")
      .def("__repr__", [](const SafetensorsMap& map) {
        return "<SafetensorsMap: " + std::to_string(map.tensors().size()) + " tensors, " +
               std::to_string(map.mapped_bytes()) + " bytes>";
      });
}

}  // namespace

// ===== 16-bit (bf16/f16) weights: conversions, linear, embedding (cpuformer/half.h) =====
// Arrays of 16-bit values travel as numpy uint16 (numpy has no bfloat16; an f16 array is passed as .view(np.uint16)).
namespace {

using U16 = py::array_t<std::uint16_t, py::array::c_style>;

HalfType half_kind(const std::string& kind) {
  if (kind == "bf16") return HalfType::kBF16;
  if (kind == "f16") return HalfType::kF16;
  value_error("kind must be 'bf16' or 'f16', got '" + kind + "'");
}

// Exactly uint16, C-contiguous, no zero-size dimension; optionally a fixed rank range (as f32() for float32).
U16 u16(const py::handle& obj, const char* name, int min_ndim = 0, int max_ndim = 64) {
  return typed_array<std::uint16_t>(obj, name, "uint16 (the 16-bit patterns; float16 arrays: .view(np.uint16))",
                                    min_ndim, max_ndim, false);
}

F32 half_to_float_py(const py::object& aobj, const std::string& kind) {
  const HalfType t = half_kind(kind);
  const U16 a = u16(aobj, "a");
  F32 out(shape_vec(a));
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  half_to_float_n(po, a.data(), static_cast<index_t>(a.size()), t);
  return out;
}

U16 float_to_half_py(const py::object& aobj, const std::string& kind) {
  const HalfType t = half_kind(kind);
  const F32 a = f32(aobj, "a");
  U16 out(shape_vec(a));
  std::uint16_t* po = out.mutable_data();
  py::gil_scoped_release nogil;
  float_to_half_n(po, a.data(), static_cast<index_t>(a.size()), t);
  return out;
}

// x (..., in) -> x W^T + bias with W (out, in), or x W + bias with W (in, out) when in_out.
F32 linear_half_py(const py::object& xobj, const py::object& wobj, const py::object& bobj, const std::string& kind,
                   bool in_out, bool bf16_activations) {
  const HalfType t = half_kind(kind);
  const U16 w = u16(wobj, "weight", 2, 2);
  const index_t in = w.shape(in_out ? 0 : 1), out = w.shape(in_out ? 1 : 0);
  LinearRef ref;
  ref.in = in, ref.out = out, ref.half = w.data(), ref.half_type = t, ref.in_out = in_out;
  ref.bf16_activations = bf16_activations;
  return prepared_linear("linear_half", xobj, in, out, bobj, py::none(),
                         [&](const float* x, index_t rows, const float* bias, float* y) {
                           ref.bias = bias;
                           linear_forward(y, out, x, in, rows, ref);
                         });
}

F32 embedding_half_py(const py::object& ids_obj, const py::object& table_obj, const std::string& kind) {
  const HalfType t = half_kind(kind);
  const I64 ids = i64(ids_obj, "ids");
  const U16 table = u16(table_obj, "table", 2, 2);
  const index_t V = table.shape(0), C = table.shape(1), n = ids.size();
  auto shape = shape_vec(ids);
  shape.push_back(C);
  F32 out(shape);
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  embedding_forward_half(po, ids.data(), table.data(), t, n, V, C);
  return out;
}

void def_half(py::module_& m) {
  m.def("half_to_float", &half_to_float_py, py::arg("a"), py::arg("kind"),
        "uint16 array of bf16 ('bf16') or float16 ('f16') bit patterns -> float32 array of the same shape (exact).");
  m.def("float_to_half", &float_to_half_py, py::arg("a"), py::arg("kind"),
        "float32 array -> uint16 bit patterns of bf16 ('bf16') or float16 ('f16'), round to nearest even.");
  m.def("linear_half", &linear_half_py, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("kind") = "bf16", py::arg("in_out") = false, py::arg("bf16_activations") = false,
        "x (..., in) @ W^T + bias with a 16-bit weight W (out, in) (or x @ W with W (in, out) when in_out), converted "
        "to float32 inside the product; bf16_activations: x rounded to bf16 first (PyTorch's bf16 precision).");
  m.def("embedding_half", &embedding_half_py, py::arg("ids"), py::arg("table"), py::arg("kind"),
        "Rows of a 16-bit (V, C) table -> float32 (..., C).");
}

}  // namespace
// ===== end of 16-bit weights =====

// ---- Hugging Face model directories (issue 15; python/cpuformer/models/hub.py), over cpuformer/pretrained.h ----
#include "cpuformer/pretrained.h"

namespace {

// A Status from loading or running a pretrained model: FileNotFoundError for a missing file or directory,
// ValueError for everything else (bad files, bad arguments).
[[noreturn]] void pretrained_fail(const Status& st) {
  const std::string& msg = st.message();
  if (st.is_not_found()) {
    PyErr_SetString(PyExc_FileNotFoundError, msg.c_str());
    throw py::error_already_set();
  }
  value_error(msg);
}

// (B, T) int64 ids and an optional mask / type ids of the same shape.
struct TextArgs {
  I64 ids;
  std::optional<I64> mask, types;
  index_t B = 0, T = 0;
};
TextArgs text_args(const py::object& ids, const py::object& mask, const py::object& types, const char* ids_name) {
  TextArgs a{i64(ids, ids_name), std::nullopt, std::nullopt};
  if (a.ids.ndim() != 2) value_error(std::string(ids_name) + " must be (batch, length), got shape " + shape_of(a.ids));
  a.B = a.ids.shape(0), a.T = a.ids.shape(1);
  const auto other = [&](const py::object& o, const char* n) -> std::optional<I64> {
    if (o.is_none()) return std::nullopt;
    I64 x = i64(o, n);
    if (x.ndim() != 2 || x.shape(0) != a.B || x.shape(1) != a.T)
      value_error(std::string(n) + " must have the shape of " + ids_name + " " + shape_of(a.ids) + ", got " + shape_of(x));
    return x;
  };
  a.mask = other(mask, "attention_mask");
  a.types = other(types, "token_type_ids");
  return a;
}
const std::int64_t* opt_data(const std::optional<I64>& a) { return a ? a->data() : nullptr; }

// The vector becomes the array's memory (no copy: a (B, T, V) float32 logits array is hundreds of MB, and a copy
// doubled the peak of every call returning one).
F32 to_f32(std::vector<float>&& v, std::vector<py::ssize_t> shape) {
  py::ssize_t n = 1;
  for (py::ssize_t d : shape) n *= d;
  if (n != static_cast<py::ssize_t>(v.size())) throw std::logic_error("to_f32: the shape does not match the data");
  if (v.empty()) return F32(shape);
  auto* owner = new std::vector<float>(std::move(v));
  py::capsule free_with_array(owner, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return F32(shape, owner->data(), free_with_array);
}

const char* kind_name(PretrainedModel::Kind k) {
  switch (k) {
    case PretrainedModel::Kind::kEncoder: return "encoder";
    case PretrainedModel::Kind::kDecoder: return "decoder";
    case PretrainedModel::Kind::kSeq2Seq: return "seq2seq";
    default: return "vision";
  }
}
const char* head_name(PretrainedModel::Head h) {
  using H = PretrainedModel::Head;
  switch (h) {
    case H::kBase: return "base";
    case H::kSequenceClassification: return "sequence-classification";
    case H::kTokenClassification: return "token-classification";
    case H::kQuestionAnswering: return "question-answering";
    case H::kMaskedLM: return "masked-lm";
    case H::kCausalLM: return "causal-lm";
    case H::kSeq2SeqLM: return "seq2seq-lm";
    default: return "image-classification";
  }
}

std::shared_ptr<PretrainedModel> pretrained_load(const std::string& dir, const std::string& dtype,
                                                 const std::string& weights, bool trainable, const std::string& task,
                                                 std::int64_t num_labels, std::uint64_t init_seed,
                                                 const std::string& activations) {
  PretrainedOptions o;
  o.trainable = trainable, o.task = task, o.num_labels = num_labels, o.init_seed = init_seed;
  if (activations == "bfloat16") o.bf16_activations = true;
  else if (activations != "float32")
    value_error("activations must be 'float32' or 'bfloat16', got '" + activations + "'");
  if (dtype == "float32") o.dtype = PretrainedOptions::kFloat32;
  else if (dtype != "auto") value_error("dtype must be 'auto' or 'float32', got '" + dtype + "'");
  if (weights == "packed") o.weights = LoadOptions::kPacked;
  else if (weights == "int8") o.weights = LoadOptions::kInt8;
  else if (weights != "float32") value_error("weights must be 'float32', 'packed' or 'int8', got '" + weights + "'");
  std::unique_ptr<PretrainedModel> model;
  Status st;
  {
    py::gil_scoped_release nogil;
    st = PretrainedModel::load(dir, &model, o);
  }
  if (!st.ok()) pretrained_fail(st);
  return std::shared_ptr<PretrainedModel>(std::move(model));
}

GenerationOptions generation_options(std::int64_t max_new_tokens, bool do_sample, float temperature,
                                     std::int64_t top_k, float top_p, const py::object& eos, std::int64_t pad,
                                     std::uint64_t seed, std::int64_t num_beams, double length_penalty) {
  GenerationOptions o;
  o.max_new_tokens = max_new_tokens, o.do_sample = do_sample, o.temperature = temperature, o.top_k = top_k;
  o.top_p = top_p, o.pad_token_id = pad, o.seed = seed, o.num_beams = num_beams, o.length_penalty = length_penalty;
  if (!eos.is_none()) {
    o.eos_token_ids = eos.cast<std::vector<std::int64_t>>();
    o.no_eos = o.eos_token_ids.empty();  // an empty list: never stop early
  }
  return o;
}

void check_sampling(const GenerationOptions& o) {
  if (!std::isfinite(o.temperature) || o.temperature < 0) value_error("temperature must be finite and >= 0");
  if (o.top_k < 0) value_error("top_k must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) value_error("top_p must be in (0, 1]");
}

}  // namespace

void bind_pretrained(py::module_& m) {
  using PM = PretrainedModel;
  py::class_<PM, std::shared_ptr<PM>>(m, "_PretrainedModel",
                                     "A Hugging Face model directory run by the C++ core (cpuformer/pretrained.h).")
      .def_static("load", &pretrained_load, py::arg("directory"), py::arg("dtype") = "auto",
                  py::arg("weights") = "float32", py::arg("trainable") = false, py::arg("task") = "",
                  py::arg("num_labels") = 0, py::arg("init_seed") = 0, py::arg("activations") = "float32")
      .def("new_parameters", &PM::new_parameters)
      .def("add_lora", [](PM& p, const std::vector<std::string>& targets, bool regex, std::int64_t r, double alpha,
                          std::uint64_t seed, double dropout) {
            std::vector<std::string> modules;
            Status st = p.add_lora(targets, regex, r, alpha, dropout, seed, &modules);
            if (!st.ok()) pretrained_fail(st);
            return modules;
          }, py::arg("targets"), py::arg("regex"), py::arg("r"), py::arg("alpha"), py::arg("seed") = 0,
          py::arg("dropout") = 0.0)
      .def("merge_lora", [](PM& p) {
            Status st = p.merge_lora();
            if (!st.ok()) pretrained_fail(st);
          })
      .def("parameters", [](py::object self) {
            // (name, data, grad or None): numpy views of the model's own buffers, kept alive by the model.
            auto& p = self.cast<PM&>();
            py::list out;
            for (const auto& prm : p.parameters()) {
              std::vector<py::ssize_t> shape(prm.shape.begin(), prm.shape.end());
              py::array data(py::dtype::of<float>(), shape, prm.data, self);
              py::object grad = prm.grad ? py::object(py::array(py::dtype::of<float>(), shape, prm.grad, self))
                                         : py::object(py::none());
              out.append(py::make_tuple(prm.name, data, grad));
            }
            return out;
          })
      .def("set_requires_grad", [](PM& p, const std::string& name, bool on) {
            Status st = p.set_requires_grad(name, on);
            if (!st.ok()) pretrained_fail(st);
          }, py::arg("name"), py::arg("requires_grad"))
      .def("zero_grad", &PM::zero_grad)
      .def("train_forward", [](PM& p, TrainState& state, const py::object& ids, const py::object& mask,
                               const py::object& types, const py::object& dec, const py::object& pixels, bool dropout,
                               std::uint64_t seed, bool recompute) {
            TrainInputs in;
            std::optional<TextArgs> a, d;
            std::optional<F32> px;
            if (!pixels.is_none()) {
              px = f32(pixels, "pixel_values", 4, 4);
              in.pixels = px->data(), in.B = px->shape(0), in.C = px->shape(1), in.H = px->shape(2), in.W = px->shape(3);
            } else {
              a = text_args(ids, mask, types, "input_ids");
              in.ids = a->ids.data(), in.B = a->B, in.T = a->T;
              in.attention_mask = opt_data(a->mask), in.token_type_ids = opt_data(a->types);
              if (!dec.is_none()) {
                d = text_args(dec, py::none(), py::none(), "decoder_input_ids");
                if (d->B != a->B) value_error("decoder_input_ids must have the batch size of input_ids");
                in.decoder_ids = d->ids.data(), in.Td = d->T;
              }
            }
            TrainOptions o;
            o.dropout = dropout, o.seed = seed, o.recompute = recompute;
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.train_forward(in, o, &state, &out);
            }
            if (!st.ok()) pretrained_fail(st);
            const auto n = static_cast<py::ssize_t>(out.size());
            return to_f32(std::move(out), {n});
          }, py::arg("state"), py::arg("input_ids") = py::none(), py::arg("attention_mask") = py::none(),
          py::arg("token_type_ids") = py::none(), py::arg("decoder_input_ids") = py::none(),
          py::arg("pixel_values") = py::none(), py::arg("dropout") = true, py::arg("seed") = 0,
          py::arg("recompute") = false,
          "The head's output, flattened (reshape it as the inference call's); keeps what backward needs in state.")
      .def("train_backward", [](PM& p, TrainState& state, const py::object& dout) {
            F32 d = f32(dout, "grad_output");
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.train_backward(&state, d.data());
            }
            if (!st.ok()) pretrained_fail(st);
          }, py::arg("state"), py::arg("grad_output"))
      .def_property_readonly("kind", [](const PM& p) { return kind_name(p.kind()); })
      .def_property_readonly("head", [](const PM& p) { return head_name(p.head()); })
      .def_property_readonly("model_type", &PM::model_type)
      .def_property_readonly("architecture", &PM::architecture)
      .def_property_readonly("hidden_size", &PM::hidden_size)
      .def_property_readonly("vocab_size", &PM::vocab_size)
      .def_property_readonly("num_labels", &PM::num_labels)
      .def_property_readonly("has_pooler", &PM::has_pooler)
      .def_property_readonly("pad_token_id", &PM::pad_token_id)
      .def_property_readonly("decoder_start_token_id", &PM::decoder_start_token_id)
      .def_property_readonly("eos_token_ids", &PM::eos_token_ids)
      .def_property_readonly("max_positions", &PM::max_positions)
      .def_property_readonly("mapped_bytes", &PM::mapped_bytes)
      .def_property_readonly("owned_bytes", &PM::owned_bytes)
      .def("hidden_states", [](const PM& p, const py::object& ids, const py::object& mask, const py::object& types) {
            TextArgs a = text_args(ids, mask, types, "input_ids");
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.hidden_states(a.ids.data(), a.B, a.T, opt_data(a.mask), opt_data(a.types), &out);
            }
            if (!st.ok()) pretrained_fail(st);
            return to_f32(std::move(out), {a.B, a.T, static_cast<py::ssize_t>(p.hidden_size())});
          }, py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("token_type_ids") = py::none())
      .def("pooler_output", [](const PM& p, const py::object& ids, const py::object& mask, const py::object& types) {
            TextArgs a = text_args(ids, mask, types, "input_ids");
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.pooler_output(a.ids.data(), a.B, a.T, opt_data(a.mask), opt_data(a.types), &out);
            }
            if (!st.ok()) pretrained_fail(st);
            return to_f32(std::move(out), {a.B, static_cast<py::ssize_t>(p.hidden_size())});
          }, py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("token_type_ids") = py::none())
      .def("head_output", [](const PM& p, const py::object& ids, const py::object& mask, const py::object& types) {
            TextArgs a = text_args(ids, mask, types, "input_ids");
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.head_output(a.ids.data(), a.B, a.T, opt_data(a.mask), opt_data(a.types), &out);
            }
            if (!st.ok()) pretrained_fail(st);
            const auto w = static_cast<py::ssize_t>(p.head_width());
            if (p.head() == PM::Head::kSequenceClassification) return to_f32(std::move(out), {a.B, w});
            return to_f32(std::move(out), {a.B, a.T, w});
          }, py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("token_type_ids") = py::none())
      .def("generate", [](const PM& p, const py::object& ids, const py::object& mask, std::int64_t max_new_tokens,
                          bool do_sample, float temperature, std::int64_t top_k, float top_p, const py::object& eos,
                          std::int64_t pad, std::uint64_t seed) {
            TextArgs a = text_args(ids, mask, py::none(), "input_ids");
            GenerationOptions o = generation_options(max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad,
                                                     seed, 1, 1.0);
            std::vector<std::int64_t> out;
            std::int64_t n = 0;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.generate(a.ids.data(), a.B, a.T, opt_data(a.mask), o, &out, &n);
            }
            if (!st.ok()) pretrained_fail(st);
            I64 r({a.B, static_cast<py::ssize_t>(a.T + n)});
            std::copy(out.begin(), out.end(), r.mutable_data());
            return r;
          }, py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("max_new_tokens") = 20,
          py::arg("do_sample") = false, py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
          py::arg("eos_token_id") = py::none(), py::arg("pad_token_id") = -1, py::arg("seed") = 0)
      .def("seq2seq_logits", [](const PM& p, const py::object& src, const py::object& mask, const py::object& dec) {
            TextArgs a = text_args(src, mask, py::none(), "input_ids");
            TextArgs d = text_args(dec, py::none(), py::none(), "decoder_input_ids");
            if (d.B != a.B) value_error("decoder_input_ids must have the batch size of input_ids");
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.seq2seq_logits(a.ids.data(), a.B, a.T, opt_data(a.mask), d.ids.data(), d.T, &out);
            }
            if (!st.ok()) pretrained_fail(st);
            return to_f32(std::move(out), {a.B, d.T, static_cast<py::ssize_t>(p.vocab_size())});
          }, py::arg("input_ids"), py::arg("attention_mask"), py::arg("decoder_input_ids"))
      .def("seq2seq_generate", [](const PM& p, const py::object& src, const py::object& mask,
                                  std::int64_t max_new_tokens, std::int64_t num_beams, double length_penalty,
                                  bool do_sample, float temperature, std::int64_t top_k, float top_p,
                                  const py::object& eos, std::int64_t pad, std::uint64_t seed) {
            TextArgs a = text_args(src, mask, py::none(), "input_ids");
            GenerationOptions o = generation_options(max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad,
                                                     seed, num_beams, length_penalty);
            std::vector<std::int64_t> out;
            std::int64_t L = 0;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.seq2seq_generate(a.ids.data(), a.B, a.T, opt_data(a.mask), o, &out, &L);
            }
            if (!st.ok()) pretrained_fail(st);
            I64 r({a.B, static_cast<py::ssize_t>(L)});
            std::copy(out.begin(), out.end(), r.mutable_data());
            return r;
          }, py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("max_new_tokens") = 20,
          py::arg("num_beams") = 1, py::arg("length_penalty") = 1.0, py::arg("do_sample") = false,
          py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
          py::arg("eos_token_id") = py::none(), py::arg("pad_token_id") = -1, py::arg("seed") = 0)
      .def("vision_forward", [](const PM& p, const py::object& pixels, bool pooled) {
            F32 x = f32(pixels, "pixel_values", 4, 4);
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = p.vision_forward(x.data(), x.shape(0), x.shape(1), x.shape(2), x.shape(3), pooled, &out);
            }
            if (!st.ok()) pretrained_fail(st);
            const auto B = x.shape(0);
            const auto n = static_cast<py::ssize_t>(out.size()) / B;
            if (!pooled && p.head() == PM::Head::kBase)
              return to_f32(std::move(out), {B, n / static_cast<py::ssize_t>(p.hidden_size()),
                                             static_cast<py::ssize_t>(p.hidden_size())});
            return to_f32(std::move(out), {B, n});
          }, py::arg("pixel_values"), py::arg("pooled") = false);
  py::class_<TrainState>(m, "_TrainState", "What one training forward of a pretrained model keeps for backward.")
      .def(py::init<>());
  py::class_<DecoderBatch>(m, "_DecoderBatch",
                           "Continuous batching over a decoder's key/value caches (cpuformer/pretrained.h).")
      .def(py::init([](std::shared_ptr<PM> model, std::int64_t slots, std::int64_t capacity) {
             std::unique_ptr<DecoderBatch> b;
             Status st = DecoderBatch::create(std::move(model), slots, capacity, &b);
             if (!st.ok()) pretrained_fail(st);
             return b;
           }), py::arg("model"), py::arg("slots"), py::arg("capacity"))
      .def("prefill", [](DecoderBatch& b, std::int64_t slot, const std::vector<std::int64_t>& prompt,
                         std::int64_t max_new_tokens) {
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = b.prefill(slot, prompt, max_new_tokens, &out);
            }
            if (!st.ok()) pretrained_fail(st);
            return to_f32(std::move(out), {static_cast<py::ssize_t>(b.vocab_size())});
          }, py::arg("slot"), py::arg("prompt"), py::arg("max_new_tokens"))
      .def("step", [](DecoderBatch& b, const std::vector<std::int64_t>& slots, const std::vector<std::int64_t>& tokens) {
            std::vector<float> out;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = b.step(slots, tokens, &out);
            }
            if (!st.ok()) pretrained_fail(st);
            return to_f32(std::move(out), {static_cast<py::ssize_t>(slots.size()), static_cast<py::ssize_t>(b.vocab_size())});
          }, py::arg("slots"), py::arg("tokens"))
      .def("length", &DecoderBatch::length, py::arg("slot"))
      .def_property_readonly("slots", &DecoderBatch::slots)
      .def_property_readonly("capacity", &DecoderBatch::capacity);
  py::class_<TokenSampler>(m, "_TokenSampler", "generate()'s choice of the next token, one per sequence.")
      .def(py::init([](bool do_sample, float temperature, std::int64_t top_k, float top_p, std::uint64_t seed) {
             GenerationOptions o = generation_options(1, do_sample, temperature, top_k, top_p, py::none(), -1, seed, 1, 1.0);
             check_sampling(o);
             return std::make_unique<TokenSampler>(o);
           }), py::arg("do_sample") = false, py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
           py::arg("seed") = 0)
      .def("next", [](TokenSampler& t, const py::object& logits) {
            F32 l = f32(logits, "logits", 1, 1);
            return t.next(l.data(), l.shape(0));
          }, py::arg("logits"));
  m.def("sentence_pooling", [](const py::object& hidden, const py::object& mask, const std::vector<std::string>& modes,
                               bool normalize) {
        F32 h = f32(hidden, "hidden", 3, 3);
        std::optional<I64> am;
        if (!mask.is_none()) {
          am = i64(mask, "attention_mask");
          if (am->ndim() != 2 || am->shape(0) != h.shape(0) || am->shape(1) != h.shape(1))
            value_error("attention_mask must be (batch, length) of hidden " + shape_of(h) + ", got " + shape_of(*am));
        }
        PoolingModes pm;
        pm.mean = false, pm.normalize = normalize;
        for (const std::string& mode : modes) {
          if (mode == "cls") pm.cls = true;
          else if (mode == "max") pm.max = true;
          else if (mode == "mean") pm.mean = true;
          else if (mode == "mean_sqrt_len") pm.mean_sqrt_len = true;
          else if (mode == "weightedmean") pm.weighted_mean = true;
          else if (mode == "lasttoken") pm.last_token = true;
          else value_error("unknown pooling mode '" + mode + "' (cls, max, mean, mean_sqrt_len, weightedmean, lasttoken)");
        }
        std::vector<float> out;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = sentence_pooling(h.data(), h.shape(0), h.shape(1), h.shape(2), opt_data(am), pm, &out);
        }
        if (!st.ok()) pretrained_fail(st);
        return to_f32(std::move(out), {h.shape(0), static_cast<py::ssize_t>(pm.count()) * h.shape(2)});
      }, py::arg("hidden"), py::arg("attention_mask"), py::arg("modes"), py::arg("normalize") = false,
      "sentence-transformers pooling: the modes' vectors concatenated (cls, max, mean, mean_sqrt_len, weightedmean, "
      "lasttoken order), optionally L2-normalised.");
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "cpuformer C++ core (private: use cpuformer.ops)";
  // C++ exceptions map to Python ones: invalid_argument -> ValueError, out_of_range -> IndexError.

  m.def("build_info", &build_info, "Compiler, OpenMP, SIMD path and thread count of this build.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Threads used by every kernel (>= 1).");
  m.def("get_num_threads", &get_num_threads);
  m.def("set_simd_path", &set_simd_path, py::arg("path"), "'auto', 'avx512', 'avx2' or 'scalar'.");
  m.def("get_simd_path", &get_simd_path);

  m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("transpose_a") = false,
        py::arg("transpose_b") = false, py::arg("bias") = py::none(), py::arg("alpha") = 1.0f,
        "alpha * op(a) @ op(b) + bias; 2-D or batched 3-D (a 2-D operand broadcasts over the batch).");
  m.def("gemm", &gemm_inplace, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("transpose_a") = false,
        py::arg("transpose_b") = false, py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f,
        py::arg("bias") = py::none(), "In place: out = alpha * op(a) @ op(b) + beta * out + bias.");
  m.def("softmax", [](const py::object& x) { return softmax_fwd(x, false); }, py::arg("x"));
  m.def("log_softmax", [](const py::object& x) { return softmax_fwd(x, true); }, py::arg("x"));
  m.def("softmax_backward", [](const py::object& dy, const py::object& y) { return softmax_bwd(dy, y, false); },
        py::arg("grad_output"), py::arg("output"));
  m.def("log_softmax_backward",
        [](const py::object& dy, const py::object& y) { return softmax_bwd(dy, y, true); }, py::arg("grad_output"),
        py::arg("output"));
  m.def("layer_norm", &layer_norm_fwd, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        "Returns (y, mean, rstd).");
  m.def("layer_norm_backward", &layer_norm_bwd, py::arg("grad_output"), py::arg("x"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("need_param_grads") = true, "Returns (dx, dweight, dbias).");
  m.def("activation", &activation_fwd, py::arg("x"), py::arg("bias"), py::arg("kind"), py::arg("inplace") = false,
        "act(x + bias); with inplace, written over x (which must be a writable float32 array) and returned.");
  m.def("activation_backward", &activation_bwd, py::arg("grad_output"), py::arg("x"), py::arg("bias"),
        py::arg("kind"), py::arg("need_dbias") = false, "Returns (dx, dbias or None).");
  m.def("rms_norm", &rms_norm_fwd, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("one_plus") = false,
        "RMSNorm over the last axis: x * rstd * w (w = weight, or 1 + weight with one_plus). Returns (y, rstd).");
  m.def("rms_norm_backward", &rms_norm_bwd, py::arg("grad_output"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
        py::arg("one_plus") = false, py::arg("need_weight_grad") = true, "Returns (dx, dweight or None).");
  m.def("gated", &gated_fwd, py::arg("gate"), py::arg("up"), py::arg("kind"), "act(gate) * up.");
  m.def("gated_backward", &gated_bwd, py::arg("grad_output"), py::arg("gate"), py::arg("up"), py::arg("kind"),
        "Returns (dgate, dup).");
  m.def("rotary_inv_freq", &rotary_inv_freq_py, py::arg("head_dim"), py::arg("rotary_dim"), py::arg("theta"),
        py::arg("linear_factor"), py::arg("llama3_factor"), py::arg("low_freq_factor"), py::arg("high_freq_factor"),
        py::arg("original_max_position"), "The rotary_dim / 2 inverse frequencies (float32).");
  m.def("rotary", &rotary_py, py::arg("x"), py::arg("num_heads"), py::arg("positions"), py::arg("offset"),
        py::arg("rotary_dim"), py::arg("layout"), py::arg("theta"), py::arg("linear_factor"),
        py::arg("llama3_factor"), py::arg("low_freq_factor"), py::arg("high_freq_factor"),
        py::arg("original_max_position"), py::arg("backward") = false,
        "Rotary embedding of x (B, T, E) or (B, T, H, D): a rotated copy (backward: rotated by -angle).");
  m.def("alibi_slopes", &alibi_slopes_py, py::arg("num_heads"));
  m.def("relative_position_bucket", &relative_bucket_py, py::arg("relative_positions"), py::arg("bidirectional"),
        py::arg("num_buckets"), py::arg("max_distance"));
  m.def("relative_position_bias", &relative_bias_py, py::arg("table"), py::arg("T"), py::arg("S"),
        py::arg("query_offset"), py::arg("bidirectional"), py::arg("num_buckets"), py::arg("max_distance"),
        "bias (H, T, S) = table[bucket(s - (query_offset + t)), h].");
  m.def("relative_position_bias_backward", &relative_bias_bwd, py::arg("grad_output"), py::arg("table_grad"),
        py::arg("query_offset"), py::arg("bidirectional"), py::arg("num_buckets"), py::arg("max_distance"),
        "Accumulates grad_output (H, T, S) into table_grad (num_buckets, H).");
  m.def("dropout", &dropout_fwd, py::arg("x"), py::arg("p"), py::arg("seed"), "Returns (y, keep_mask).");
  m.def("dropout_backward", &dropout_bwd, py::arg("grad_output"), py::arg("p"), py::arg("seed"));
  m.def("lora_dropout_mask", &lora_dropout_mask_py, py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("p"),
        "Keep flags (rows, cols) of a LoRA adapter's dropout mask under its seed (element (i, j): counter "
        "i * cols + j).");
  m.def("lora_dropout_seed", &lora_dropout_seed, py::arg("step_seed"), py::arg("index"),
        "The mask seed of a model's adapter `index` (in the order added) in the training step seeded step_seed.");
  m.def("add", &add, py::arg("a"), py::arg("b"));
  m.def("embedding", &embedding_fwd, py::arg("ids"), py::arg("weight"));
  m.def("embedding_backward", &embedding_bwd, py::arg("weight_grad"), py::arg("grad_output"), py::arg("ids"),
        py::arg("padding_idx") = -1, "Accumulates into weight_grad in place.");
  m.def("cross_entropy", &cross_entropy, py::arg("logits"), py::arg("targets"), py::arg("ignore_index") = -100,
        py::arg("label_smoothing") = 0.0f, py::arg("compute_grad") = false, py::arg("grad_scale") = 1.0f,
        py::arg("inplace") = false, "Returns (mean loss, dlogits or None, number of counted targets).");
  m.def("adamw_step", &adamw, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("grad_scale") = 1.0f, "In-place AdamW update of param, exp_avg, exp_avg_sq.");
  m.def("sum_squares", &sum_sq, py::arg("x"));
  m.def("feedforward", &feedforward_fwd, py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("activation"), py::arg("dropout_p") = 0.0f, py::arg("seed") = 0, py::arg("u_out") = py::none(),
        py::arg("a_out") = py::none(), py::arg("w_gate") = py::none(), py::arg("b_gate") = py::none(),
        "Returns (out, u, a): u = x W1^T + b1 (gated: [x Wg^T + bg | x W1^T + b1], (rows, 2F)) and a = "
        "dropout(act(u)) (gated: dropout(act(gate) * up)) are saved for backward (written into u_out and a_out when "
        "given: buffers reused across calls).");
  m.def("feedforward_backward", &feedforward_bwd, py::arg("grad_output"), py::arg("x"), py::arg("u"), py::arg("a"),
        py::arg("w1"), py::arg("w2"), py::arg("grad_w1"), py::arg("grad_b1"), py::arg("grad_w2"), py::arg("grad_b2"),
        py::arg("activation"), py::arg("dropout_p") = 0.0f, py::arg("seed") = 0, py::arg("workspace") = py::none(),
        py::arg("w_gate") = py::none(), py::arg("grad_w_gate") = py::none(), py::arg("grad_b_gate") = py::none(),
        "Returns dx; accumulates into the weight and bias gradients given. workspace: a (rows, F) scratch buffer "
        "((rows, 3F) gated) reused across calls (None: a fresh one).");
  m.def("bias_grad", &bias_grad, py::arg("bias_grad"), py::arg("grad_output"),
        "bias_grad += column sums of grad_output (over all leading axes).");
  m.def("attention", &attention_fwd, py::arg("query"), py::arg("key"), py::arg("value"), py::arg("num_heads"),
        py::arg("attn_mask") = py::none(), py::arg("key_padding_mask") = py::none(), py::arg("is_causal") = false,
        py::arg("scale"), py::arg("dropout_p") = 0.0f, py::arg("seed") = 0, py::arg("need_lse") = false,
        py::arg("num_kv_heads") = 0, py::arg("window") = 0, py::arg("query_offset") = py::none(),
        py::arg("key_length") = py::none(), py::arg("alibi_slopes") = py::none(),
        "Fused attention: returns (output (B, T, E), lse (B, H, T) or None). num_kv_heads 0 = num_heads.");
  m.def("attention_backward", &attention_bwd, py::arg("grad_output"), py::arg("query"), py::arg("key"),
        py::arg("value"), py::arg("output"), py::arg("lse"), py::arg("grad_query"), py::arg("grad_key"),
        py::arg("grad_value"), py::arg("num_heads"), py::arg("attn_mask") = py::none(),
        py::arg("key_padding_mask") = py::none(), py::arg("is_causal") = false, py::arg("scale"),
        py::arg("dropout_p") = 0.0f, py::arg("seed") = 0, py::arg("num_kv_heads") = 0, py::arg("window") = 0,
        py::arg("query_offset") = py::none(), py::arg("key_length") = py::none(),
        py::arg("alibi_slopes") = py::none(), py::arg("grad_attn_mask") = py::none(),
        "Writes the gradients into grad_query/key/value; accumulates the attn_mask gradient into grad_attn_mask.");
  m.def("attention_weights", &attention_probs, py::arg("query"), py::arg("key"), py::arg("num_heads"),
        py::arg("attn_mask") = py::none(), py::arg("key_padding_mask") = py::none(), py::arg("is_causal") = false,
        py::arg("scale"), py::arg("num_kv_heads") = 0, py::arg("window") = 0, py::arg("query_offset") = py::none(),
        py::arg("key_length") = py::none(), py::arg("alibi_slopes") = py::none(),
        "Attention probabilities (B, H, T, S).");
  py::class_<Int8Weight, std::shared_ptr<Int8Weight>>(m, "Int8Weight",
                                                       "A Linear weight quantized to int8 per output channel.")
      .def_readonly("out_features", &Int8Weight::n)
      .def_readonly("in_features", &Int8Weight::k)
      .def_property_readonly("scale", [](const Int8Weight& w) {
        return F32(std::vector<py::ssize_t>{w.n}, w.scale.data());
      })
      .def_property_readonly("nbytes", [](const Int8Weight& w) {
        return w.packed.size() + 4 * (w.scale.size() + w.col_sum.size());
      })
      .def("__copy__", [](const Int8Weight& w) { return std::make_shared<Int8Weight>(w); })
      .def("__deepcopy__", [](const Int8Weight& w, py::dict) { return std::make_shared<Int8Weight>(w); })
      .def("values", [](const Int8Weight& w) {
        const auto v = w.unpack();
        return py::array_t<std::int8_t>({w.n, w.k}, v.data());
      }, "The int8 values as an (out_features, in_features) array.");
  m.def("quantize_weight_int8", &quantize_weight, py::arg("weight"),
        "Symmetric per-output-channel int8 quantization of a (out_features, in_features) weight.");
  m.def("linear_int8", &linear_int8_fwd, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("out") = py::none(),
        "x @ weight^T + bias with x quantized per row to 7-bit unsigned at run time (int32 accumulation); written "
        "into out when given.");
  py::class_<PackedMatrix, std::shared_ptr<PackedMatrix>>(m, "PackedWeight",
                                                          "A float32 Linear weight packed for the GEMM kernel.")
      .def_readonly("in_features", &PackedMatrix::K)
      .def_readonly("out_features", &PackedMatrix::N)
      .def_property_readonly("nbytes", [](const PackedMatrix& p) { return p.size * 4; })
      .def_property_readonly("amx_tiles", [](const PackedMatrix& p) { return p.tiles != nullptr; },
                             "Whether products of 128+ rows on the amx path split it once into AMX tiles and keep "
                             "them (1.5x nbytes more), or read the panels.");
  m.def("pack_linear_weight", &pack_linear_weight, py::arg("weight"), py::arg("amx_tiles").noconvert() = true,
        "Pack a (out_features, in_features) weight once for linear_packed; amx_tiles=False: never split it into "
        "AMX tiles (products keep the unpacked product's kernels and bits).");
  m.def("linear_packed", &linear_packed_fwd, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("out") = py::none(),
        "x @ weight^T + bias with a weight from pack_linear_weight; written into out when given.");
  m.def("quantize_rows_u7", &quantize_rows, py::arg("x"), "Returns (q uint8, scale, zero_point) per row.");
  m.def("int8_kernel", &int8_kernel_name,
        "The kernel linear_int8 uses now: 'avx512vnni', 'avxvnni', 'avx2' or 'scalar' (all give the same bits).");
  m.def("set_int8_kernel", &set_int8_kernel, py::arg("name"),
        "Force 'avx512vnni' ('vnni'), 'avxvnni', 'avx2' or 'scalar', or 'auto' (initially CPUFORMER_INT8 or auto); "
        "a scalar SIMD path still selects 'scalar'.");
  m.def("int8_kernels", &int8_kernels_available, "The int8 kernels this CPU and build can run, fastest first.");
  // Private Unicode test hooks (cpp/src/unicode.h).
  m.def("_unicode_normalize", &unicode_normalize_py, py::arg("text"), py::arg("form"),
        "(normalized text, tokenizers-style change per output char) for NFD/NFKD/NFC/NFKC (Unicode 9.0).");
  m.def("_unicode_category", [](std::uint32_t cp, int version) {
    return std::string(cpuformer::unicode::category_name(cpuformer::unicode::category(cp, version)));
  }, py::arg("cp"), py::arg("version"), "General Category of cp as of Unicode 8, 16 or 17.");
  m.def("_unicode_lower", &unicode_lower_py, py::arg("text"), "Rust char::to_lowercase per char (Unicode 17.0).");
  m.def("_unicode_property", &unicode_property_py, py::arg("cp"), py::arg("name"),
        "White_Space (name 'white_space') or Alphabetic 16.0 ('alphabetic').");
  m.def("_unicode_versions", &cpuformer::unicode::unicode_data_versions, "Unicode versions of the tables.");
  // Private regex test hook (cpp/src/regex.h).
  m.def("_regex_find_all", &regex_find_all_py, py::arg("pattern"), py::arg("text"),
        "All matches of an Oniguruma-subset pattern as (begin, end) char offsets; ValueError if unsupported.");
  // Tokenizers (issue 13): wrapped by cpuformer.Tokenizer (python/cpuformer/tokenizer.py).
  py::class_<Encoding>(m, "_Encoding")
      .def_readonly("ids", &Encoding::ids)
      .def_readonly("tokens", &Encoding::tokens)
      .def_readonly("type_ids", &Encoding::type_ids)
      .def_readonly("attention_mask", &Encoding::attention_mask)
      .def_readonly("special_tokens_mask", &Encoding::special_tokens_mask)
      .def_readonly("word_ids", &Encoding::word_ids)
      .def_readonly("sequence_ids", &Encoding::sequence_ids)
      .def_readonly("byte_offsets", &Encoding::offsets)
      .def_readonly("offsets", &Encoding::char_offsets)
      .def("__len__", &Encoding::size);
  py::class_<Tokenizer, std::shared_ptr<Tokenizer>>(m, "_Tokenizer")
      .def_static("from_file", [](const std::string& path) { return tok_load(path, true); }, py::arg("path"))
      .def_static("from_str", [](const std::string& json) { return tok_load(json, false); }, py::arg("json"))
      .def("encode", &tok_encode, py::arg("text"), py::arg("pair"), py::arg("add_special_tokens"))
      .def("encode_batch", &tok_encode_batch, py::arg("texts"), py::arg("pairs"), py::arg("add_special_tokens"),
           py::arg("own_settings"), py::arg("truncation"), py::arg("padding"))
      .def("decode", &tok_decode, py::arg("ids"), py::arg("skip_special_tokens"))
      .def("token_to_id", [](const Tokenizer& t, const std::string& s) -> py::object {
        const auto id = t.token_to_id(s);
        return id < 0 ? py::none() : py::cast(id);
      })
      .def("id_to_token", [](const Tokenizer& t, std::int64_t id) -> py::object {
        std::string s;
        return t.id_to_token(id, &s) ? py::object(py::str(s)) : py::none();
      })
      .def("vocab_size", &Tokenizer::vocab_size, py::arg("with_added_tokens"))
      .def("get_truncation", [](const Tokenizer& t) { return tok_truncation_dict(t.truncation()); })
      .def("get_padding", [](const Tokenizer& t) { return tok_padding_dict(t.padding()); })
      .def("set_truncation", [](Tokenizer& t, const py::object& p) {
        Status st = t.set_truncation(p.is_none() ? std::nullopt
                                                 : std::optional<TruncationParams>(tok_truncation(p.cast<py::tuple>())));
        if (!st.ok()) tok_fail(st);
      })
      .def("set_padding", [](Tokenizer& t, const py::object& p) {
        t.set_padding(p.is_none() ? std::nullopt : std::optional<PaddingParams>(tok_padding(p.cast<py::tuple>())));
      });
  m.def("_tokenizer_arrays", &tok_arrays, py::arg("encodings"));
  // BPE trainer (issue 13): wrapped by cpuformer.train_bpe (python/cpuformer/bpe.py).
  m.def("_bpe_train", &bpe_train_py, py::arg("files"), py::arg("texts"), py::arg("vocab_size"),
        py::arg("min_frequency"), py::arg("special_tokens"), "Byte-level BPE training; the tokenizer.json text.");
  // The Transformer block (block.h): wrapped by cpuformer.nn's Transformer layers (python/cpuformer/nn/block.py).
  py::class_<BlockConfig>(m, "BlockConfig", "A Transformer block's configuration (see cpp/include/cpuformer/block.h).")
      .def(py::init(&make_block_config))
      .def_readonly("d_model", &BlockConfig::d_model)
      .def_readonly("num_heads", &BlockConfig::num_heads)
      .def_property_readonly("num_kv_heads", &BlockConfig::kv_heads)
      .def_property_readonly("head_dim", &BlockConfig::head_size)
      .def_readonly("cross_attention", &BlockConfig::cross_attention)
      .def("__copy__", [](const BlockConfig& c) { return c; })
      .def("__deepcopy__", [](const BlockConfig& c, py::dict) { return c; });
  py::class_<PyBlockSaved>(m, "BlockSaved", "What a training-mode block forward keeps for its backward.")
      .def(py::init<>())
      .def_property_readonly("valid", [](const PyBlockSaved& s) { return s.s.valid; })
      .def_property(
          "keep_ff_activation", [](const PyBlockSaved& s) { return s.s.keep_ff_activation; },
          [](PyBlockSaved& s, bool keep) { s.s.keep_ff_activation = keep; },
          "False: the next training forward keeps no copy of the feed-forward activation (its backward then refuses "
          "a gradient of the down projection)")
      .def("__deepcopy__", [](const PyBlockSaved&, py::dict) { return PyBlockSaved(); });
  py::class_<KVCache>(m, "KVCache", "A block's key/value cache for incremental decoding.")
      .def(py::init([](index_t batch, index_t capacity, index_t width) {
             if (batch < 1 || capacity < 1 || width < 1 || batch * capacity * width > (index_t{1} << 34))
               value_error("KVCache: batch, capacity and width must be >= 1 (and their product <= 2^34)");
             KVCache c;
             c.reset(batch, capacity, width);
             return c;
           }),
           py::arg("batch"), py::arg("capacity"), py::arg("width"))
      .def_readonly("batch", &KVCache::batch)
      .def_readonly("capacity", &KVCache::capacity)
      .def_readonly("width", &KVCache::width)
      .def_property_readonly("length", [](const KVCache& c) { return c.length; })
      .def("reorder", [](KVCache& c, const py::object& rows) {
             I64 r = i64(rows, "rows");
             if (r.ndim() != 1) value_error("rows must be 1-D");
             c.reorder(r.data(), r.shape(0));
           }, py::arg("rows"), "Beam search: new row i = old row rows[i].")
      .def("copy", [](const KVCache& c) { return c; }, "An independent copy.");
  m.def("block_forward", [](const BlockConfig& c, const py::dict& w, const py::object& x, const py::object& kpm,
                            const py::object& am, bool causal, const py::object& off, const py::object& mem,
                            const py::object& mkpm, const py::object& mm, bool need_weights) {
          return block_fwd(c, w, x, kpm, am, causal, off, mem, mkpm, mm, need_weights, std::nullopt, nullptr);
        }, py::arg("config"), py::arg("weights"), py::arg("x"), py::arg("key_padding_mask") = py::none(),
        py::arg("attn_mask") = py::none(), py::arg("is_causal") = false, py::arg("position_offset") = py::none(),
        py::arg("memory") = py::none(), py::arg("memory_key_padding_mask") = py::none(),
        py::arg("memory_mask") = py::none(), py::arg("need_weights") = false,
        "Inference forward of one block: out, or (out, self-attention probabilities (B, H, T, T)).");
  m.def("block_forward_train", [](const BlockConfig& c, const py::dict& w, const py::object& x, std::uint64_t seed,
                                  PyBlockSaved& saved, const py::object& kpm, const py::object& am, bool causal,
                                  const py::object& off, const py::object& mem, const py::object& mkpm,
                                  const py::object& mm, bool need_weights) {
          return block_fwd(c, w, x, kpm, am, causal, off, mem, mkpm, mm, need_weights, seed, &saved);
        }, py::arg("config"), py::arg("weights"), py::arg("x"), py::arg("seed"), py::arg("saved"),
        py::arg("key_padding_mask") = py::none(), py::arg("attn_mask") = py::none(), py::arg("is_causal") = false,
        py::arg("position_offset") = py::none(), py::arg("memory") = py::none(),
        py::arg("memory_key_padding_mask") = py::none(), py::arg("memory_mask") = py::none(),
        py::arg("need_weights") = false, "Training forward: as block_forward, keeping what backward needs in saved.");
  m.def("block_backward", &block_bwd, py::arg("config"), py::arg("weights"), py::arg("grads"),
        py::arg("grad_output"), py::arg("saved"),
        "(d_x, d_memory or None); parameter gradients accumulated into the grads dict's arrays.");
  m.def("block_cross_cache", [](const BlockConfig& c, const py::dict& weights, const py::object& memory) {
          const BlockWeights w = block_weights(c, weights);
          F32 mem = f32(memory, "memory", 3, 3);
          if (mem.shape(2) != c.d_model) value_error("memory must be (batch, length, d_model)");
          KVCache cache;
          py::gil_scoped_release nogil;
          block_cross_cache(mem.data(), mem.shape(0), mem.shape(1), c, w, cache);
          return cache;
        }, py::arg("config"), py::arg("weights"), py::arg("memory"));
  m.def("block_decode", &block_decode_py, py::arg("config"), py::arg("weights"), py::arg("x"), py::arg("cache"),
        py::arg("new_tokens") = py::none(), py::arg("cross") = nullptr, py::arg("memory_key_padding_mask") = py::none(),
        py::arg("output_rows") = py::none(),
        "Next positions of each row over the block's cache (appended); output_rows (B,): only that position's "
        "output per row, (B, 1, d_model).");
  py::class_<PyAttentionSaved>(m, "AttentionSaved", "What a training-mode attention forward keeps for backward.")
      .def(py::init<>())
      .def_property_readonly("valid", [](const PyAttentionSaved& s) { return s.s.valid; })
      .def_property_readonly("self_attention", [](const PyAttentionSaved& s) { return s.s.self; })
      .def("__deepcopy__", [](const PyAttentionSaved&, py::dict) { return PyAttentionSaved(); });
  m.def("attention_layer_forward", &attention_layer_fwd, py::arg("config"), py::arg("weights"), py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("key_padding_mask") = py::none(), py::arg("attn_mask") = py::none(),
        py::arg("is_causal") = false, py::arg("seed") = 0, py::arg("saved") = nullptr, py::arg("need_weights") = false,
        "MultiheadAttention's forward through the block's attention sublayer (self-attention when query is key is "
        "value): out, or (out, probabilities (B, H, T, S)). With `saved`: training (dropout) and kept for backward.");
  m.def("attention_layer_backward", &attention_layer_bwd, py::arg("config"), py::arg("weights"), py::arg("grads"),
        py::arg("grad_output"), py::arg("saved"), py::arg("mode") = "separate",
        "mode 'separate': (d_query, d_key, d_value); 'summed' (self-attention): (d_input,); 'query_memory' (key is "
        "value): (d_query, d_memory).");
  bind_safetensors_map(m);  // memory-mapped safetensors (the block above PYBIND11_MODULE)
  def_half(m);  // 16-bit weights (the block above PYBIND11_MODULE)

  bind_pretrained(m);
}
