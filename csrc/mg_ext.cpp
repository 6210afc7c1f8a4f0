// mgkernels._C: the pybind11 extension built by setup.py from csrc/.
// Fused CPU (and, with nvcc, CUDA) operators register here; this file holds the module definition and
// the build facts that `modelgrow env` and the kernel dispatcher read.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
  info["omp_max_threads"] = 1;
#endif
#ifdef MG_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#if defined(__AVX512F__)
  info["simd"] = "avx512";
#elif defined(__AVX2__)
  info["simd"] = "avx2";
#elif defined(__ARM_NEON)
  info["simd"] = "neon";
#else
  info["simd"] = "baseline";
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef MG_TORCH_VERSION
  info["torch_version"] = std::string(MG_TORCH_VERSION);  // the torch it was built against
#else
  info["torch_version"] = std::string("unknown");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ModelGrow fused operators (CPU; CUDA when built with nvcc)";
  m.def("build_info", &build_info, "How this extension was compiled: OpenMP, SIMD level, CUDA, compiler.");
}
