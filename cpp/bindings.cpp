// bindings.cpp: the cpuformer._core extension. Validation, allocation and GIL release only; the arithmetic lives
// in the C++ core (cpp/src). Users call the cpuformer.ops wrappers, which convert inputs to float32/int64 first;
// these functions accept exactly float32 (and int64 ids) C-contiguous arrays and say so otherwise.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
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

// Exactly float32, C-contiguous, no zero-size dimension; optionally a fixed rank range.
F32 f32(const py::handle& obj, const char* name, int min_ndim = 0, int max_ndim = 64, bool writable = false) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array, got " + std::string(py::str(py::type::of(obj))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(name) + " must be float32, got " + std::string(py::str(a.dtype())));
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
  return F32::ensure(a);
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
  value_error("activation must be 'relu', 'gelu' (erf), 'gelu_tanh' or 'identity', got '" + name + "'");
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

F32 activation_fwd(const py::object& x_obj, const py::object& bias_obj, const std::string& kind) {
  const F32 x = f32(x_obj, "x", 1);
  const auto [rows, cols] = rows_cols(x);
  const auto bias_arr = opt_f32(bias_obj, "bias");
  const float* bias = opt_vec(bias_arr, "bias", cols);
  const Activation act = activation_of(kind);
  F32 y = empty_like(x);
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
  if (dout.size() != n * C || dout.shape(dout.ndim() - 1) != C)
    value_error("embedding_backward: grad_output must have shape ids.shape + (" + std::to_string(C) + ",), got " +
                shape_of(dout) + " for ids " + shape_of(ids));
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

py::dict build_info() {
  py::dict d;
  d["version"] = library_version();
  d["compiler"] = compiler_version();
  d["openmp"] = build_has_openmp();
  d["simd"] = get_simd_path();
  d["simd_compiled"] = build_has_avx2() ? "avx2+scalar" : "scalar";
  d["cpu_avx2_fma"] = cpu_supports_avx2_fma();
  d["num_threads"] = get_num_threads();
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "cpuformer C++ core (private: use cpuformer.ops)";
  // C++ exceptions map to Python ones: invalid_argument -> ValueError, out_of_range -> IndexError.

  m.def("build_info", &build_info, "Compiler, OpenMP, SIMD path and thread count of this build.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Threads used by every kernel (>= 1).");
  m.def("get_num_threads", &get_num_threads);
  m.def("set_simd_path", &set_simd_path, py::arg("path"), "'auto', 'avx2' or 'scalar'.");
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
  m.def("activation", &activation_fwd, py::arg("x"), py::arg("bias"), py::arg("kind"));
  m.def("activation_backward", &activation_bwd, py::arg("grad_output"), py::arg("x"), py::arg("bias"),
        py::arg("kind"), py::arg("need_dbias") = false, "Returns (dx, dbias or None).");
  m.def("dropout", &dropout_fwd, py::arg("x"), py::arg("p"), py::arg("seed"), "Returns (y, keep_mask).");
  m.def("dropout_backward", &dropout_bwd, py::arg("grad_output"), py::arg("p"), py::arg("seed"));
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
}
