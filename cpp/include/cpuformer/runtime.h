// cpuformer/runtime.h: threads, SIMD path selection and build information.
#pragma once

#include <string>

namespace cpuformer {

// Number of threads every kernel uses. Default: OMP_NUM_THREADS when set, else the CPUs this process may run on.
// In a child created by fork() after threads were used, kernels run single-threaded (libgomp's pool does not
// survive fork) until set_num_threads() is called in the child.
void set_num_threads(int n);  // n >= 1
int get_num_threads();

// Which SIMD kernels run: "amx", "avx512", "avx2" (AVX2 + FMA) or "scalar". Chosen at start-up from CPUID (and, for
// AVX-512, the OS's XSAVE state: XCR0 must enable the zmm/opmask registers): "amx" where the CPU has AVX-512 and
// AMX-BF16 and Linux lets the process use the tiles, else "avx512" where the CPU has AVX-512 F/DQ/BW/VL, else "avx2"
// where it has AVX2 + FMA, else "scalar". "amx" is "avx512" with the float32 GEMM's products of 16+ rows and
// columns (and the 16-bit weight products of 16+ rows) on AMX tiles: each float32 operand split exactly into three
// bf16 terms and the six largest term products summed in float32, an error below 2^-21 of |a||b| per product
// (float32 rounds one product to 2^-24) plus the float32 sums' own; operands below about 2^-110 lose precision
// (bf16 denormals read as zero). "avx512" keeps exact float32 products. On "avx512" only the GEMM (sgemm and everything
// built on it: linear layers, attention's products, packed weights) runs AVX-512 code; every other kernel runs its
// AVX2 code, and the GEMM's results are bitwise identical to the "avx2" path's (same per-element summation order and
// K blocking). The environment variable CPUFORMER_SIMD=avx512|avx2|scalar caps the start-up choice (avx2: no
// AVX-512 code at all); CPUFORMER_SIMD=amx or unset: the best the CPU offers. set_simd_path("amx"/"avx512"/"avx2")
// throws if the CPU or the build lacks it; "auto" returns to the start-up choice. Builds with CPUFORMER_FORCE_SCALAR
// have none of them.
void set_simd_path(const std::string& path);
std::string get_simd_path();
bool cpu_supports_avx2_fma();   // what this CPU offers
bool cpu_supports_avx512();     // AVX-512 F/DQ/BW/VL usable (CPU and OS)
bool cpu_supports_amx();        // AVX-512 and AMX-BF16 usable (CPU, OS, and Linux's permission for the tiles)
bool cpu_supports_f16c();       // AVX2/FMA and F16C: the 16-bit weight kernels (half.h) run AVX2 code off "scalar"
bool build_has_avx2();          // false when built with CPUFORMER_FORCE_SCALAR
bool build_has_avx512();        // false when built with CPUFORMER_FORCE_SCALAR
bool build_has_amx();           // Linux x86-64 builds with AVX-512 code

bool build_has_openmp();
std::string compiler_version();
std::string library_version();

}  // namespace cpuformer
