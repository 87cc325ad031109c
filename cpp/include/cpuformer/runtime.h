// cpuformer/runtime.h: threads, SIMD path selection and build information.
#pragma once

#include <string>

namespace cpuformer {

// Number of threads every kernel uses. Default: OMP_NUM_THREADS when set, else the CPUs this process may run on.
// In a child created by fork() after threads were used, kernels run single-threaded (libgomp's pool does not
// survive fork) until set_num_threads() is called in the child.
void set_num_threads(int n);  // n >= 1
int get_num_threads();

// Which SIMD kernels run: "avx2" (AVX2 + FMA) or "scalar". Chosen at start-up from CPUID; the environment
// variable CPUFORMER_SIMD=scalar forces the portable path. set_simd_path("avx2") throws if the CPU or the build
// lacks it.
void set_simd_path(const std::string& path);
std::string get_simd_path();
bool cpu_supports_avx2_fma();   // what this CPU offers
bool build_has_avx2();          // false when built with CPUFORMER_FORCE_SCALAR

bool build_has_openmp();
std::string compiler_version();
std::string library_version();

}  // namespace cpuformer
