// Fused S-AdaLN modulation (CUDA): compiled by setup.py only when torch is a CUDA build and nvcc is found
// (MG_WITH_CUDA). Arguments arrive validated by the entry points in modulate.cpp (same device, documented
// dtypes and shapes, contiguous); outputs are allocated there.
//
// Forward: one block per row (C elements): block-reduce the sum, then the centred sum of squares (the row is
// re-read from L1/L2), then write y. Residual variant: x_new = x + gate * h is stored rounded to the storage
// dtype first and the statistics are taken from the stored values (each thread re-reads only what it wrote).
// Backward: kernel 1, one block per row, computes the two row means of LayerNorm's backward and writes dx (and
// dh); kernel 2 computes per-(chunk of rows, channel) partial sums of the token reductions (dscale, dshift,
// dgate) into a small [chunks, C] buffer, and at::sum over the chunks of each sample finishes the reduction:
// a two-pass, deterministic reduction without atomics and without a [B, N, C] temporary.
#include "modulate.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace mg {
namespace {

constexpr int kBlock = 256;          // threads per row block
constexpr int kColTile = 32;         // channels per column-reduction block (one warp wide)
constexpr int kRowThreads = 8;       // rows processed in parallel per column-reduction block
constexpr int64_t kRowsPerChunk = 64;  // rows of one sample per partial-sum chunk

template <typename T>
struct CIO;

template <>
struct CIO<float> {
  static __device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ float st(float* p, int64_t i, float v) {
    p[i] = v;
    return v;
  }
};

template <>
struct CIO<at::BFloat16> {
  static __device__ __forceinline__ float ld(const at::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
  static __device__ __forceinline__ float st(at::BFloat16* p, int64_t i, float v) {
    const at::BFloat16 b(v);  // round to nearest even
    p[i] = b;
    return static_cast<float>(b);
  }
};

// Sum of v over the block (blockDim.x == kBlock, a multiple of 32). red: __shared__ float[33].
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous call's readers of red[] are done
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (kBlock / 32) ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  return red[32];
}

__device__ __forceinline__ int64_t param_row(int64_t bs, int64_t b) { return bs == 1 ? 0 : b; }

// ---- forward ---------------------------------------------------------------------------------------------
template <typename T, bool RES, bool GATED>
__global__ void __launch_bounds__(kBlock) fwd_kernel(const T* __restrict__ x, const T* __restrict__ h,
                                                     const float* __restrict__ gate, const float* __restrict__ shift,
                                                     const float* __restrict__ scale, T* x_new, T* __restrict__ y,
                                                     float* __restrict__ mean, float* __restrict__ rstd, int64_t N,
                                                     int64_t C, int64_t bs_gate, int64_t bs_shift, int64_t bs_scale,
                                                     float eps) {
  __shared__ float red[33];
  const int64_t row = blockIdx.x;
  const int64_t b = row / N;
  const float* sc = scale + param_row(bs_scale, b) * C;
  const float* sh = shift + param_row(bs_shift, b) * C;
  const T* xr = x + row * C;
  T* yr = y + row * C;
  const float invC = 1.0f / static_cast<float>(C);

  float s = 0.f;
  const T* src = xr;
  if (RES) {
    const T* hr = h + row * C;
    T* xn = x_new + row * C;
    const float* g = GATED ? gate + param_row(bs_gate, b) * C : nullptr;
    for (int64_t c = threadIdx.x; c < C; c += kBlock) {
      const float hv = CIO<T>::ld(hr, c);
      const float v = CIO<T>::ld(xr, c) + (GATED ? g[c] * hv : hv);
      s += CIO<T>::st(xn, c, v);  // statistics of the stored (rounded) x_new
    }
    src = xn;  // each thread re-reads only the elements it wrote itself
  } else {
    for (int64_t c = threadIdx.x; c < C; c += kBlock) s += CIO<T>::ld(xr, c);
  }
  const float mu = block_sum(s, red) * invC;
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kBlock) {
    const float d = CIO<T>::ld(src, c) - mu;
    sq += d * d;
  }
  const float var = block_sum(sq, red) * invC;
  const float rs = rsqrtf(var + eps);
  for (int64_t c = threadIdx.x; c < C; c += kBlock) {
    const float xh = (CIO<T>::ld(src, c) - mu) * rs;
    CIO<T>::st(yr, c, xh * (1.0f + sc[c]) + sh[c]);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// ---- backward, kernel 1: dx (and dh) per row ---------------------------------------------------------------
// coef[row] = (mean_c(g), mean_c(g * xhat)) with g = dy * (1 + scale), kept for kernel 2 (dgate).
template <typename T, bool RES, bool HAS_DXN, bool GATED>
__global__ void __launch_bounds__(kBlock) bwd_row_kernel(const T* __restrict__ dy, const T* __restrict__ dxnew,
                                                         const float* __restrict__ gate, const T* __restrict__ x,
                                                         const float* __restrict__ scale,
                                                         const float* __restrict__ mean,
                                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                                         T* __restrict__ dh, float2* __restrict__ coef, int64_t N,
                                                         int64_t C, int64_t bs_gate, int64_t bs_scale) {
  __shared__ float red[33];
  const int64_t row = blockIdx.x;
  const int64_t b = row / N;
  const float* sc = scale + param_row(bs_scale, b) * C;
  const T* xr = x + row * C;
  const T* dyr = dy + row * C;
  const float mu = mean[row], rs = rstd[row];
  const float invC = 1.0f / static_cast<float>(C);

  float sg = 0.f, sgx = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kBlock) {
    const float xh = (CIO<T>::ld(xr, c) - mu) * rs;
    const float g = CIO<T>::ld(dyr, c) * (1.0f + sc[c]);
    sg += g;
    sgx += g * xh;
  }
  const float ma = block_sum(sg, red) * invC;
  const float mb = block_sum(sgx, red) * invC;
  if (threadIdx.x == 0) coef[row] = make_float2(ma, mb);

  T* dxr = dx + row * C;
  const T* dxnr = HAS_DXN ? dxnew + row * C : nullptr;
  T* dhr = RES ? dh + row * C : nullptr;
  const float* g = GATED ? gate + param_row(bs_gate, b) * C : nullptr;
  for (int64_t c = threadIdx.x; c < C; c += kBlock) {
    const float xh = (CIO<T>::ld(xr, c) - mu) * rs;
    const float gg = CIO<T>::ld(dyr, c) * (1.0f + sc[c]);
    float v = rs * (gg - ma - xh * mb);
    if (HAS_DXN) v += CIO<T>::ld(dxnr, c);
    CIO<T>::st(dxr, c, v);
    if (RES) CIO<T>::st(dhr, c, GATED ? v * g[c] : v);
  }
}

// ---- backward, kernel 2: partial token sums per (chunk of rows of one sample, channel) ----------------------
// grid: (chunks = B * cps, ceil(C / kColTile)); block: (kColTile, kRowThreads).
// pS/pH/pG: [chunks, C] partial sums of dy * xhat, dy, dxt * h (pG only when GATED).
template <typename T, bool HAS_DXN, bool GATED>
__global__ void __launch_bounds__(kColTile* kRowThreads)
    bwd_col_kernel(const T* __restrict__ dy, const T* __restrict__ dxnew, const T* __restrict__ h,
                   const T* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ mean,
                   const float* __restrict__ rstd, const float2* __restrict__ coef, float* __restrict__ pS,
                   float* __restrict__ pH, float* __restrict__ pG, int64_t N, int64_t C, int64_t cps,
                   int64_t bs_scale) {
  __shared__ float sm[3][kRowThreads][kColTile + 1];
  const int64_t chunk = blockIdx.x;
  const int64_t b = chunk / cps;
  const int64_t n0 = (chunk % cps) * kRowsPerChunk;
  const int64_t n1 = N < n0 + kRowsPerChunk ? N : n0 + kRowsPerChunk;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColTile + tx;
  float aS = 0.f, aH = 0.f, aG = 0.f;
  if (c < C) {
    const float sc1 = 1.0f + scale[param_row(bs_scale, b) * C + c];
    for (int64_t n = n0 + ty; n < n1; n += kRowThreads) {
      const int64_t row = b * N + n;
      const int64_t i = row * C + c;
      const float rs = rstd[row];
      const float xh = (CIO<T>::ld(x, i) - mean[row]) * rs;
      const float d = CIO<T>::ld(dy, i);
      aS += d * xh;
      aH += d;
      if (GATED) {
        const float2 k = coef[row];
        float v = rs * (d * sc1 - k.x - xh * k.y);
        if (HAS_DXN) v += CIO<T>::ld(dxnew, i);
        aG += v * CIO<T>::ld(h, i);
      }
    }
  }
  sm[0][ty][tx] = aS;
  sm[1][ty][tx] = aH;
  sm[2][ty][tx] = aG;
  __syncthreads();
  if (ty == 0 && c < C) {
    float s = 0.f, hh = 0.f, gg = 0.f;
#pragma unroll
    for (int j = 0; j < kRowThreads; ++j) {
      s += sm[0][j][tx];
      hh += sm[1][j][tx];
      gg += sm[2][j][tx];
    }
    pS[chunk * C + c] = s;
    pH[chunk * C + c] = hh;
    if (GATED) pG[chunk * C + c] = gg;
  }
}

// Second pass: out[Bs, C] = sum of the partials [B * cps, C] over the chunks of each sample (all when Bs == 1).
void finish(const at::Tensor& partial, int64_t B, int64_t cps, const at::Tensor& out) {
  const int64_t C = partial.size(1);
  out.copy_(partial.view({out.size(0), (B * cps) / out.size(0), C}).sum(1));
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename T>
void fwd_typed(const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
               const at::Tensor& scale, double eps, const at::Tensor& x_new, const at::Tensor& y,
               const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t rows = B * N;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "modulate (CUDA): B * N = ", rows, " rows is more than one launch supports");
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool res = h.defined(), gated = gate.defined();
  const int64_t bs_gate = gated ? gate.size(0) : 1;
#define MG_FWD_LAUNCH(RES, GATED)                                                                               \
  fwd_kernel<T, RES, GATED><<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(                               \
      cptr<T>(x), cptr<T>(h), cptr<float>(gate), cptr<float>(shift), cptr<float>(scale), mptr<T>(x_new),       \
      mptr<T>(y), mptr<float>(mean), mptr<float>(rstd), N, C, bs_gate, shift.size(0), scale.size(0),           \
      static_cast<float>(eps))
  if (!res)
    MG_FWD_LAUNCH(false, false);
  else if (gated)
    MG_FWD_LAUNCH(true, true);
  else
    MG_FWD_LAUNCH(true, false);
#undef MG_FWD_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void bwd_typed(const at::Tensor& dy, const at::Tensor& dxnew, const at::Tensor& h, const at::Tensor& gate,
               const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
               const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& dgate, const at::Tensor& dshift,
               const at::Tensor& dscale) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t rows = B * N;
  if (rows == 0 || C == 0) return;  // dscale/dshift/dgate were allocated as zeros
  TORCH_CHECK(rows <= INT32_MAX, "modulate (CUDA): B * N = ", rows, " rows is more than one launch supports");
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool res = h.defined(), gated = gate.defined(), has_dxn = dxnew.defined();
  const int64_t bs_gate = gated ? gate.size(0) : 1, bs_scale = scale.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor coef = at::empty({rows, 2}, f32);
  float2* coef_p = reinterpret_cast<float2*>(coef.data_ptr<float>());

#define MG_ROW_LAUNCH(RES, HAS_DXN, GATED)                                                                       \
  bwd_row_kernel<T, RES, HAS_DXN, GATED><<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(                   \
      cptr<T>(dy), cptr<T>(dxnew), cptr<float>(gate), cptr<T>(x), cptr<float>(scale), cptr<float>(mean),         \
      cptr<float>(rstd), mptr<T>(dx), mptr<T>(dh), coef_p, N, C, bs_gate, bs_scale)
  if (!res)
    MG_ROW_LAUNCH(false, false, false);
  else if (has_dxn && gated)
    MG_ROW_LAUNCH(true, true, true);
  else if (has_dxn)
    MG_ROW_LAUNCH(true, true, false);
  else if (gated)
    MG_ROW_LAUNCH(true, false, true);
  else
    MG_ROW_LAUNCH(true, false, false);
#undef MG_ROW_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t cps = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t chunks = B * cps;
  at::Tensor pS = at::empty({chunks, C}, f32), pH = at::empty({chunks, C}, f32);
  at::Tensor pG = gated ? at::empty({chunks, C}, f32) : at::Tensor();
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((C + kColTile - 1) / kColTile));
  const dim3 block(kColTile, kRowThreads);
#define MG_COL_LAUNCH(HAS_DXN, GATED)                                                                             \
  bwd_col_kernel<T, HAS_DXN, GATED><<<grid, block, 0, stream>>>(                                                \
      cptr<T>(dy), cptr<T>(dxnew), cptr<T>(h), cptr<T>(x), cptr<float>(scale), cptr<float>(mean),               \
      cptr<float>(rstd), coef_p, mptr<float>(pS), mptr<float>(pH), mptr<float>(pG), N, C, cps, bs_scale)
  if (gated && has_dxn)
    MG_COL_LAUNCH(true, true);
  else if (gated)
    MG_COL_LAUNCH(false, true);
  else
    MG_COL_LAUNCH(false, false);
#undef MG_COL_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  finish(pS, B, cps, dscale);
  finish(pH, B, cps, dshift);
  if (gated) finish(pG, B, cps, dgate);
}

}  // namespace

void modulate_fwd_cuda(const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
                       const at::Tensor& scale, double eps, const at::Tensor& x_new, const at::Tensor& y,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kFloat)
    fwd_typed<float>(x, h, gate, shift, scale, eps, x_new, y, mean, rstd);
  else
    fwd_typed<at::BFloat16>(x, h, gate, shift, scale, eps, x_new, y, mean, rstd);
}

void modulate_bwd_cuda(const at::Tensor& dy, const at::Tensor& dxnew, const at::Tensor& h, const at::Tensor& gate,
                       const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& dgate,
                       const at::Tensor& dshift, const at::Tensor& dscale) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kFloat)
    bwd_typed<float>(dy, dxnew, h, gate, x, scale, mean, rstd, dx, dh, dgate, dshift, dscale);
  else
    bwd_typed<at::BFloat16>(dy, dxnew, h, gate, x, scale, mean, rstd, dx, dh, dgate, dshift, dscale);
}

}  // namespace mg
