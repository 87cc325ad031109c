// runtime.cpp: thread count, SIMD path selection (CPUID at start-up), build information.
#include "cpuformer/runtime.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "parallel.h"
#include "simd.h"

#if defined(__linux__)
#include <sched.h>
#include <unistd.h>
#endif

namespace cpuformer {
namespace {

// CPUs this process may run on, capped by a cgroup v2 CPU quota (containers), at least 1.
int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);  // "4" or "4,2": the first level counts
    if (n >= 1) return n;
  }
  int n = 1;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  std::ifstream quota_file("/sys/fs/cgroup/cpu.max");
  std::string quota, period;
  if (quota_file >> quota >> period && quota != "max") {
    const double q = std::atof(quota.c_str()), p = std::atof(period.c_str());
    if (q > 0 && p > 0) n = std::max(1, std::min(n, static_cast<int>(q / p + 0.5)));
  }
#endif
  return std::max(1, n);
}

std::atomic<int> g_threads{0};        // 0: not decided yet
std::atomic<long> g_owner_pid{0};     // the process that first used threads, or last called set_num_threads

long current_pid() {
#if defined(__linux__)
  return static_cast<long>(getpid());
#else
  return 0;
#endif
}

bool detect_avx2_fma() {
#ifdef CPUFORMER_HAVE_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool initial_simd_choice() {
  const char* env = std::getenv("CPUFORMER_SIMD");
  if (env && std::strcmp(env, "scalar") == 0) return false;
  return detect_avx2_fma();
}

std::atomic<bool> g_use_avx2{initial_simd_choice()};

}  // namespace

namespace detail {
bool use_avx2() { return g_use_avx2.load(std::memory_order_relaxed); }

int kernel_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = default_threads();
    g_threads.store(n);
  }
  if (n > 1) {
    // libgomp's pool does not survive fork(): a child entering a parallel region can hang. A forked child
    // therefore runs serially until it chooses a thread count itself.
    long expected = 0;
    const long pid = current_pid();
    if (!g_owner_pid.compare_exchange_strong(expected, pid) && expected != pid) return 1;
  }
  return n;
}
}  // namespace detail

void set_num_threads(int n) {
  CPUFORMER_CHECK(n >= 1, "set_num_threads: n must be >= 1, got ", n);
  g_threads.store(n);
  g_owner_pid.store(current_pid());
}

int get_num_threads() {
  int n = g_threads.load();
  if (n == 0) n = detail::kernel_threads();
  return n;
}

bool cpu_supports_avx2_fma() { return detect_avx2_fma(); }

bool build_has_avx2() {
#ifdef CPUFORMER_HAVE_AVX2
  return true;
#else
  return false;
#endif
}

void set_simd_path(const std::string& path) {
  if (path == "scalar") {
    g_use_avx2.store(false);
  } else if (path == "avx2") {
    CPUFORMER_CHECK(build_has_avx2(), "set_simd_path: this build has no AVX2 kernels (CPUFORMER_FORCE_SCALAR)");
    CPUFORMER_CHECK(detect_avx2_fma(), "set_simd_path: this CPU lacks AVX2/FMA");
    g_use_avx2.store(true);
  } else if (path == "auto") {
    g_use_avx2.store(initial_simd_choice());
  } else {
    CPUFORMER_CHECK(false, "set_simd_path: path must be 'auto', 'avx2' or 'scalar', got '", path, "'");
  }
}

std::string get_simd_path() { return detail::use_avx2() ? "avx2" : "scalar"; }

bool build_has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

std::string library_version() {
#ifdef CPUFORMER_VERSION
  return CPUFORMER_VERSION;
#else
  return "unknown";
#endif
}

}  // namespace cpuformer
