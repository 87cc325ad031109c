// sampling.h (private): choosing the next token from a row of logits, shared by every generating model.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace cpuformer {

// Greedy: the first maximum (NaN ranks lowest), as argmax. Otherwise transformers' order of warpers: divide by
// temperature, keep the top_k best (0: all), keep the smallest set whose probability reaches top_p (1: all),
// sample. A distribution that does not sum to a positive finite number falls back to the best token.
inline std::int64_t choose_token(const float* logits, std::int64_t V, bool greedy, float temperature,
                                 std::int64_t top_k, float top_p, std::mt19937_64& rng) {
  const auto score = [&](std::int64_t j) { return std::isnan(logits[j]) ? -INFINITY : logits[j]; };
  const auto better = [&](std::int64_t a, std::int64_t b) {
    return score(a) > score(b) || (score(a) == score(b) && a < b);
  };
  if (greedy || temperature == 0.0f) {
    std::int64_t best = 0;
    for (std::int64_t j = 1; j < V; ++j)
      if (better(j, best)) best = j;
    return best;
  }
  std::vector<std::int64_t> order(static_cast<size_t>(V));
  for (std::int64_t j = 0; j < V; ++j) order[j] = j;
  const std::int64_t k = top_k > 0 ? std::min<std::int64_t>(top_k, V) : V;
  std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
  std::vector<double> p(static_cast<size_t>(k));
  const double top = score(order[0]);
  double sum = 0;
  for (std::int64_t j = 0; j < k; ++j) sum += p[j] = std::exp((score(order[j]) - top) / temperature);
  if (!(sum > 0) || !std::isfinite(sum)) return order[0];
  std::int64_t keep = k;
  if (top_p < 1.0f) {  // the smallest prefix whose mass reaches top_p (at least one token)
    double mass = 0;
    for (keep = 0; keep < k;) {
      mass += p[keep++] / sum;
      if (mass >= top_p) break;
    }
    sum = 0;
    for (std::int64_t j = 0; j < keep; ++j) sum += p[j];
  }
  double u = std::uniform_real_distribution<double>(0.0, sum)(rng);
  std::int64_t j = 0;
  while (j < keep - 1 && u >= p[j]) u -= p[j++];
  return order[j];
}

}  // namespace cpuformer
