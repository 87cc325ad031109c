// random.h (private): counter-based randomness for dropout. Element i's draw depends only on (seed, i), so masks
// are independent of the thread count and backward regenerates them instead of storing them.
#pragma once

#include <cmath>
#include <cstdint>

namespace cpuformer::detail {

// splitmix64 finaliser
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// p * 2^24: an element is kept when its 24 random bits are >= this.
inline std::uint32_t dropout_threshold(float p) { return static_cast<std::uint32_t>(std::llround(double(p) * (1 << 24))); }

inline bool dropout_keep(std::uint64_t seed, std::uint64_t counter, std::uint32_t threshold) {
  const std::uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ULL + counter + 0x632be59bd9b4e019ULL);
  return static_cast<std::uint32_t>(h >> 40) >= threshold;
}

}  // namespace cpuformer::detail
