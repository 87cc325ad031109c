// embedding.cpp: token embedding lookup (gather) and its backward (deterministic scatter-add).
#include "cpuformer/embedding.h"

#include <cstring>

#include "half_internal.h"
#include "parallel.h"

namespace cpuformer {
namespace {

void check_ids(const char* who, const std::int64_t* ids, index_t n, index_t V, std::int64_t allowed = -1) {
  for (index_t t = 0; t < n; ++t) {
    if ((ids[t] < 0 || ids[t] >= V) && !(allowed >= 0 && ids[t] == allowed))
      throw std::out_of_range(detail::concat(who, ": id ", ids[t], " at position ", t,
                                             " is out of range for a vocabulary of ", V));
  }
}

}  // namespace

void embedding_forward(float* out, const std::int64_t* ids, const float* weight, index_t n, index_t V, index_t C) {
  CPUFORMER_CHECK(n >= 0 && V >= 1 && C >= 1, "embedding_forward: bad size n=", n, " V=", V, " C=", C);
  check_ids("embedding_forward", ids, n, V);
  detail::parallel_for(n, std::max<index_t>(1, (1 << 14) / C), [&](index_t t0, index_t t1, int) {
    for (index_t t = t0; t < t1; ++t)
      std::memcpy(out + t * C, weight + ids[t] * C, static_cast<size_t>(C) * sizeof(float));
  });
}

void embedding_forward_half(float* out, const std::int64_t* ids, const std::uint16_t* weight, HalfType t, index_t n,
                            index_t V, index_t C) {
  CPUFORMER_CHECK(n >= 0 && V >= 1 && C >= 1, "embedding_forward_half: bad size n=", n, " V=", V, " C=", C);
  check_ids("embedding_forward_half", ids, n, V);
  detail::parallel_for(n, std::max<index_t>(1, (1 << 14) / C), [&](index_t t0, index_t t1, int) {
    for (index_t i = t0; i < t1; ++i) detail::half_to_float_serial(out + i * C, weight + ids[i] * C, C, t);
  });
}

void embedding_backward(float* dweight, const float* dout, const std::int64_t* ids, index_t n, index_t V,
                        index_t C, std::int64_t padding_idx) {
  CPUFORMER_CHECK(n >= 0 && V >= 1 && C >= 1, "embedding_backward: bad size n=", n, " V=", V, " C=", C);
  check_ids("embedding_backward", ids, n, V);
  // Each thread owns a column range and walks every token in order: no two threads touch the same float,
  // duplicates are summed in token order, and the result does not depend on timing.
  detail::parallel_for(C, 16, [&](index_t c0, index_t c1, int) {
    for (index_t t = 0; t < n; ++t) {
      if (padding_idx >= 0 && ids[t] == padding_idx) continue;
      float* dst = dweight + ids[t] * C;
      const float* src = dout + t * C;
      for (index_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  });
}

}  // namespace cpuformer
