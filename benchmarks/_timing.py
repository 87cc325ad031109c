"""Shared timing protocol for the benchmarks (see README "Performance").

The machine is shared and noisy, so libraries are compared in the same run, interleaved: each round runs every
library (rotating the order), pausing briefly before switching so the previous library's spinning worker threads
(OpenBLAS spins about 0.1 s after a call, libgomp a little less) release the cores; within a round a library gets a few consecutive repetitions and keeps its
best; the figure reported is the median over rounds of those bests.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _loops_for(fn: Callable[[], object], min_sample_s: float) -> int:
    """How many back-to-back calls make one sample last at least min_sample_s (as timeit does)."""
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_sample_s / one) + 1)


def compare(fns: Dict[str, Callable[[], object]], rounds: int = 5, reps: int = 3, pause: float = 0.15,
            budget_s: float = 20.0, min_sample_s: float = 0.005) -> Dict[str, float]:
    """Median-of-rounds of the best-of-reps time per call (seconds) of each callable, interleaved. A sample is
    a loop of back-to-back calls lasting at least min_sample_s, so microsecond calls are timed reliably."""
    return {n: statistics.median(v) for n, v in compare_rounds(fns, rounds, reps, pause, budget_s,
                                                                 min_sample_s).items()}


def paired_ratio(rounds: Dict[str, list], ours: str, ref: str) -> float:
    """Median over rounds of ours / ref, each round's two times taken back to back: load that drifts between
    rounds (other tenants of the host) cancels in each pair, so this moves less than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(rounds[ours], rounds[ref]))


def compare_rounds(fns: Dict[str, Callable[[], object]], rounds: int = 5, reps: int = 3, pause: float = 0.15,
                   budget_s: float = 20.0, min_sample_s: float = 0.005,
                   clock: Callable[[], float] = time.perf_counter) -> Dict[str, list]:
    """As :func:`compare`, but every round's best time per callable (seconds), in round order. ``clock`` may be
    ``time.process_time`` (CPU seconds of the whole process: with one thread per library, robust to other tenants
    taking the cores, which wall-clock time is not)."""
    names = list(fns)
    for name in names:  # warm up: first-touch buffers, start thread pools
        fns[name]()
    loops = {n: _loops_for(fns[n], min_sample_s) for n in names}
    best: Dict[str, list] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            time.sleep(pause)
            fn, n = fns[name], loops[name]
            ts = []
            for _ in range(reps):
                t0 = clock()
                for _ in range(n):
                    fn()
                ts.append((clock() - t0) / n)
            best[name].append(min(ts))
        if time.perf_counter() - start > budget_s and r >= 2:
            break
    return best


def threads_line(n: int) -> str:
    return (f"threads: {n} (cpuformer set_num_threads, torch.set_num_threads, OPENBLAS_NUM_THREADS="
            f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}), loadavg before: {loadavg()}")


def peak_rss_kib() -> float:
    """This process's peak resident set size in KiB: VmHWM, the peak of its own address space. (ru_maxrss also
    carries the peak of the process it was forked from, through exec: a worker started by a parent that built a
    multi-GB model would start from that parent's peak and under-count its own growth.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss_growth_mib(step: Callable[[], object]) -> float:
    """Run ``step()`` once while a thread samples the resident set size every 0.5 ms; returns the peak growth over
    the RSS before the call, in MiB. (ru_maxrss cannot see below an earlier peak, such as torch's import.)"""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample)
    th.start()
    try:
        step()
    finally:
        done[0] = True
        th.join()
    return (max(peak[0], rss()) - base) / 2**20
