// Fused S-AdaLN modulation for STDiT: y = LayerNorm(x) * (1 + scale) + shift (LayerNorm without affine,
// biased variance, fp32 math), optionally fused with the gated residual x_new = x + gate * h.
//
// Storage: x / h / dy / dxnew / outputs y, x_new, dx, dh are contiguous [B, N, C] float32 or bfloat16;
// shift / scale / gate are contiguous float32 [Bs, C] with Bs == B or Bs == 1 (broadcast over the batch);
// mean / rstd are float32 [B, N]; dscale / dshift / dgate are float32 [Bs, C].
//
// The entry points (modulate.cpp) validate their arguments and run on the CPU (OpenMP + SIMD), or, when the
// extension was compiled with nvcc (MG_WITH_CUDA) and x is a CUDA tensor, call the CUDA versions below.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace mg {

// Exported to Python (registered in mg_ext.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                             const at::Tensor& scale, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& scale, const at::Tensor& mean,
                                                             const at::Tensor& rstd);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_fwd(
    const at::Tensor& x, const at::Tensor& h, const c10::optional<at::Tensor>& gate, const at::Tensor& shift,
    const at::Tensor& scale, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_bwd(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dxnew, const at::Tensor& h,
    const c10::optional<at::Tensor>& gate, const at::Tensor& x_new, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd);

// Which CPU code path the kernels use at run time ("avx2" or "baseline"); MG_CPU_ISA=baseline forces baseline.
std::string modulate_cpu_isa();

#ifdef MG_WITH_CUDA
// CUDA implementations (modulate_cuda.cu). Arguments are already validated by the entry points: same device,
// dtypes and shapes as documented above; gate / dxnew may be undefined tensors (meaning "absent").
// Outputs are allocated by the caller and passed in.
void modulate_fwd_cuda(const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
                       const at::Tensor& scale, double eps, const at::Tensor& x_new, const at::Tensor& y,
                       const at::Tensor& mean, const at::Tensor& rstd);

void modulate_bwd_cuda(const at::Tensor& dy, const at::Tensor& dxnew, const at::Tensor& h, const at::Tensor& gate,
                       const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& dgate,
                       const at::Tensor& dshift, const at::Tensor& dscale);
#endif

}  // namespace mg
