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

}  // namespace cpuformer::detail
