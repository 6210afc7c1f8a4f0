// CPU code-path selection shared by the C++ kernels (csrc/modulate.cpp, csrc/attention.cpp).
//
// Every kernel body is an always-inline function compiled twice: into a baseline x86-64 wrapper and into a
// wrapper marked `target("avx2,fma")`; `use_avx2()` picks the second at run time when the CPU has AVX2 + FMA
// (MG_CPU_ISA=baseline forces the baseline). No -march flag is needed, so the binary runs on any x86-64 CPU.
#pragma once

#include <cstdlib>
#include <string>

#define MG_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define MG_HAVE_AVX2_VARIANT 1
#define MG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MG_HAVE_AVX2_VARIANT 0
#define MG_TARGET_AVX2
#endif

namespace mg {

inline bool use_avx2() {
  static const bool v = [] {
#if MG_HAVE_AVX2_VARIANT
    const char* env = std::getenv("MG_CPU_ISA");
    if (env != nullptr && std::string(env) == "baseline") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return v;
}

}  // namespace mg
