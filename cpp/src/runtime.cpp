// runtime.cpp: thread count, SIMD path selection (CPUID at start-up), build information.
#include "cpuformer/runtime.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <string>

#include "parallel.h"
#include "simd.h"

#ifdef CPUFORMER_HAVE_AVX2
#include <cpuid.h>
#endif

#if defined(__linux__)
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <cstdint>

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

// F16C (CPUID.1:ECX bit 29; half-precision conversions). Every AVX2 CPU so far has it, but a hypervisor may hide it.
bool detect_f16c() {
#ifdef CPUFORMER_HAVE_AVX2
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return detect_avx2_fma() && __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
#else
  return false;
#endif
}

// AVX-512 F/DQ/BW/VL (what the GEMM kernel is compiled for) and an OS that saves the opmask and zmm state on
// context switches: XCR0 bits 1-2 (SSE, AVX) and 5-7 (opmask, ZMM0-15 upper halves, ZMM16-31). libgcc's
// __builtin_cpu_supports checks XCR0 too on recent GCC; the explicit check keeps older runtimes safe.
bool detect_avx512() {
#ifdef CPUFORMER_HAVE_AVX512
  if (!detect_avx2_fma()) return false;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")))
    return false;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6u) == 0xE6u;
#else
  return false;
#endif
}

#ifdef CPUFORMER_HAVE_AMX
// CPUID.(7,0):EDX bits 24 (AMX-TILE), 25 (AMX-INT8), 22 (AMX-BF16); XCR0 bits 17, 18 (tile config and data);
// then Linux's permission for the 8 KiB of tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), which a
// process must ask for before its first tile instruction.
unsigned detect_amx() {
  static const unsigned bits = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24))) return 0u;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return 0u;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x60000u) != 0x60000u) return 0u;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return 0u;
    __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx);
    return edx;
  }();
  return bits;
}

struct alignas(64) AmxConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};
#endif

enum Path : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

bool detect_amx_path() {
#if defined(CPUFORMER_HAVE_AMX) && defined(CPUFORMER_HAVE_AVX512)
  // VBMI: amx.cpp pairs bf16 halves with one byte permutation (every AMX CPU so far has it)
  return detect_avx512() && __builtin_cpu_supports("avx512vbmi") && ((detect_amx() >> 22) & 1u);
#else
  return false;
#endif
}

int best_path() {
  return detect_amx_path() ? kAmx : detect_avx512() ? kAvx512 : detect_avx2_fma() ? kAvx2 : kScalar;
}

// CPUFORMER_SIMD=scalar|avx2|avx512 caps the start-up choice at that path (a path the CPU or build lacks falls back
// to the best one it has below it); unset or anything else: the best the CPU offers.
int initial_simd_choice() {
  const int best = best_path();
  const char* env = std::getenv("CPUFORMER_SIMD");
  if (!env) return best;
  if (std::strcmp(env, "scalar") == 0) return kScalar;
  if (std::strcmp(env, "avx2") == 0) return std::min<int>(best, kAvx2);
  if (std::strcmp(env, "avx512") == 0) return std::min<int>(best, kAvx512);
  return best;
}

std::atomic<int> g_path{initial_simd_choice()};

}  // namespace

namespace detail {
bool use_avx2() { return g_path.load(std::memory_order_relaxed) >= kAvx2; }
bool use_avx512() { return g_path.load(std::memory_order_relaxed) >= kAvx512; }
bool use_amx() { return g_path.load(std::memory_order_relaxed) == kAmx; }
bool use_f16c() {
  static const bool f16c = detect_f16c();  // CPUID once
  return f16c && use_avx2();
}

#ifdef CPUFORMER_HAVE_AMX
bool amx_int8_usable() { return (detect_amx() >> 25) & 1u; }
bool amx_bf16_usable() { return (detect_amx() >> 22) & 1u; }

void amx_configure(int rows) {
  const int rows0 = std::min(rows, 16), rows1 = std::max(rows - 16, 0);
  AmxConfig c;
  for (int t : {0, 1, 4}) c.rows[t] = static_cast<std::uint8_t>(rows0), c.colsb[t] = 64;
  if (rows1)
    for (int t : {2, 3, 5}) c.rows[t] = static_cast<std::uint8_t>(rows1), c.colsb[t] = 64;
  else  // one row half: tile 5 is a second A tile for it
    c.rows[5] = static_cast<std::uint8_t>(rows0), c.colsb[5] = 64;
  for (int t : {6, 7}) c.rows[t] = 16, c.colsb[t] = 64;
  __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory");
}

void amx_release() { __asm__ volatile("tilerelease" ::); }
#else
bool amx_int8_usable() { return false; }
bool amx_bf16_usable() { return false; }
void amx_configure(int) {}
void amx_release() {}
#endif

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
bool cpu_supports_avx512() { return detect_avx512(); }
bool cpu_supports_amx() { return detect_amx_path(); }
bool cpu_supports_f16c() { return detect_f16c(); }

bool build_has_avx2() {
#ifdef CPUFORMER_HAVE_AVX2
  return true;
#else
  return false;
#endif
}

bool build_has_avx512() {
#ifdef CPUFORMER_HAVE_AVX512
  return true;
#else
  return false;
#endif
}

bool build_has_amx() {
#if defined(CPUFORMER_HAVE_AMX) && defined(CPUFORMER_HAVE_AVX512)
  return true;
#else
  return false;
#endif
}

void set_simd_path(const std::string& path) {
  if (path == "scalar") {
    g_path.store(kScalar);
  } else if (path == "avx2") {
    CPUFORMER_CHECK(build_has_avx2(), "set_simd_path: this build has no AVX2 kernels (CPUFORMER_FORCE_SCALAR)");
    CPUFORMER_CHECK(detect_avx2_fma(), "set_simd_path: this CPU lacks AVX2/FMA");
    g_path.store(kAvx2);
  } else if (path == "amx") {
    CPUFORMER_CHECK(build_has_amx(), "set_simd_path: this build has no AMX kernels (Linux x86-64 with AVX-512 only)");
    CPUFORMER_CHECK(detect_amx_path(), "set_simd_path: this CPU (or OS) lacks AVX-512 with AMX-BF16");
    g_path.store(kAmx);
  } else if (path == "avx512") {
    CPUFORMER_CHECK(build_has_avx512(), "set_simd_path: this build has no AVX-512 kernels (CPUFORMER_FORCE_SCALAR)");
    CPUFORMER_CHECK(detect_avx512(), "set_simd_path: this CPU (or OS) lacks AVX-512 F/DQ/BW/VL");
    g_path.store(kAvx512);
  } else if (path == "auto") {
    g_path.store(initial_simd_choice());
  } else {
    CPUFORMER_CHECK(false, "set_simd_path: path must be 'auto', 'amx', 'avx512', 'avx2' or 'scalar', got '", path, "'");
  }
}

std::string get_simd_path() {
  switch (g_path.load(std::memory_order_relaxed)) {
    case kAmx: return "amx";
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

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
