// cpuformer/common.h: shared conventions of the C++ core.
//
// Dimension legend used in every kernel comment:
//   B batch, T sequence length, C channels (d_model), NH heads, HS head size, V vocabulary,
//   M, N, K the GEMM sizes of C[M,N] = A[M,K] * B[K,N].
// All tensors are float32, row-major, contiguous unless a leading dimension (ld*) says otherwise.
//
// Argument order everywhere: outputs, then saved-for-backward caches, then inputs, then parameters, then sizes.
// Backward kernels overwrite input gradients (dinp) and ACCUMULATE (+=) into parameter gradients (dweight, dbias).
//
// Errors: functions never abort or exit. Bad arguments throw std::invalid_argument (Python: ValueError) and
// out-of-range ids throw std::out_of_range (Python: IndexError), always before any output is written.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace cpuformer {

using index_t = std::int64_t;

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace cpuformer

// CPUFORMER_CHECK(cond, msg...): throw std::invalid_argument("msg...") when cond is false.
#define CPUFORMER_CHECK(cond, ...)                                                    \
  do {                                                                                \
    if (!(cond)) throw std::invalid_argument(::cpuformer::detail::concat(__VA_ARGS__)); \
  } while (0)
