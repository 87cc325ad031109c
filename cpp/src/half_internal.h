// half_internal.h (private): the 16-bit conversion for kernels already inside a parallel loop.
#pragma once

#include <cstdint>

#include "cpuformer/half.h"

namespace cpuformer::detail {

// half_to_float_n on the calling thread only (no parallel region).
void half_to_float_serial(float* dst, const std::uint16_t* src, index_t n, HalfType t);

}  // namespace cpuformer::detail
