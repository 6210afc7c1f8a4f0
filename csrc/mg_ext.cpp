// mgkernels._C: the pybind11 extension built by setup.py from csrc/.
// Fused CPU (and, with nvcc, CUDA) operators register here; this file holds the module definition and
// the build facts that `modelgrow env` and the kernel dispatcher read.
#include <torch/extension.h>

#include "attention.h"
#include "modulate.h"

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

  // S-AdaLN modulation (csrc/modulate.cpp; CUDA in csrc/modulate_cuda.cu when built with nvcc).
  m.def("modulate_fwd", &mg::modulate_fwd, py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("eps"),
        "y = LayerNorm(x) * (1 + scale) + shift -> (y, mean, rstd)");
  m.def("modulate_bwd", &mg::modulate_bwd, py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("mean"),
        py::arg("rstd"), "Backward of modulate_fwd -> (dx, dscale, dshift)");
  m.def("residual_modulate_fwd", &mg::residual_modulate_fwd, py::arg("x"), py::arg("h"), py::arg("gate"),
        py::arg("shift"), py::arg("scale"), py::arg("eps"),
        "x_new = x + gate * h (gate None: 1); y = LayerNorm(x_new) * (1 + scale) + shift -> (x_new, y, mean, rstd)");
  m.def("residual_modulate_bwd", &mg::residual_modulate_bwd, py::arg("dy"), py::arg("dxnew"), py::arg("h"),
        py::arg("gate"), py::arg("x_new"), py::arg("scale"), py::arg("mean"), py::arg("rstd"),
        "Backward of residual_modulate_fwd -> (dx, dh, dgate, dshift, dscale); dgate is empty when gate is None");
  // Short-sequence softmax attention, fp32 CPU (csrc/attention.cpp): STDiT's spatial / temporal / cross-attention.
  m.def("attention_fwd", &mg::attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("o"),
        py::arg("lse"), "o = softmax(q k^T / sqrt(D) [+ key mask]) v into o, log-sum-exp into lse (5-D views)");
  m.def("attention_bwd", &mg::attention_bwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("o"),
        py::arg("lse"), py::arg("dout"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        "Backward of attention_fwd: writes dq, dk, dv (views shaped like q, k, v)");
  m.def("modulate_cpu_isa", &mg::modulate_cpu_isa,
        "CPU code path of the modulate kernels chosen at run time: 'avx2' or 'baseline' (MG_CPU_ISA=baseline)");
}
