// parallel.h (private): the one threading abstraction every kernel uses.
//
// parallel_for splits [0, n) into one contiguous chunk per thread (a static partition that depends only on n and
// the thread count, so results are bitwise reproducible for a fixed thread count). Small work runs serially:
// opening a parallel region costs microseconds, more than tiny ops take.
#pragma once

#include <algorithm>

#include "cpuformer/common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cpuformer::detail {

// Threads kernels may use now: get_num_threads(), or 1 in a forked child that has not called set_num_threads.
int kernel_threads();

// fn(begin, end, thread_index) over [0, n); at most one chunk per thread, each at least min_chunk long.
template <class Fn>
void parallel_for(index_t n, index_t min_chunk, Fn&& fn) {
  if (n <= 0) return;
  int nt = kernel_threads();
  const index_t max_useful = std::max<index_t>(1, n / std::max<index_t>(1, min_chunk));
  if (max_useful < nt) nt = static_cast<int>(max_useful);
  if (nt <= 1) {
    fn(index_t(0), n, 0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const index_t begin = n * t / team, end = n * (t + 1) / team;
    if (begin < end) fn(begin, end, t);
  }
#else
  fn(index_t(0), n, 0);
#endif
}

// fn(i, thread_index) for each i in [0, n), handed out one at a time (dynamic schedule): for tasks of uneven cost,
// such as causal attention blocks.
template <class Fn>
void parallel_for_dynamic(index_t n, Fn&& fn) {
  if (n <= 0) return;
  const int nt = static_cast<int>(std::min<index_t>(kernel_threads(), n));
  if (nt <= 1) {
    for (index_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (index_t i = 0; i < n; ++i) fn(i, omp_get_thread_num());
#else
  for (index_t i = 0; i < n; ++i) fn(i, 0);
#endif
}

}  // namespace cpuformer::detail
