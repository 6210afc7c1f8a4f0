// Fused S-AdaLN modulation (CPU): y = LayerNorm(x) * (1 + scale) + shift, optionally fused with the gated
// residual x_new = x + gate * h. See modulate.h for the contract; the math is fp32 whatever the storage.
//
// Parallelism: the B*N rows are cut into chunks of at most kRowsPerChunk rows of one sample; the chunks are
// split into one contiguous range per OpenMP thread ("part"). Per-row statistics are computed in cache
// (rows are C floats). The token reductions of the backward (dscale, dshift, dgate: sums over n) are
// accumulated per chunk in fp32, flushed per chunk into per-part fp64 partials [samples of the part, C], and
// the partials are summed at the end (parallel over channels): no [B, N, C] temporary.
//
// Vectorisation: plain loops with `#pragma omp simd`, compiled twice: for the x86-64 baseline (SSE2) and,
// through `__attribute__((target("avx2,fma")))`, for AVX2+FMA; the AVX2 variant is picked at run time when
// the CPU supports it (MG_CPU_ISA=baseline forces the baseline). No -march flag is needed, so the binary
// runs on any x86-64 machine.
#include "modulate.h"

#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mg {
namespace {

using bf16_t = uint16_t;  // bfloat16 storage: the high half of an IEEE float


constexpr int64_t kRowsPerChunk = 32;       // rows per fp32 accumulation chunk (flushed to fp64 afterwards)
constexpr int64_t kSerialElements = 1 << 15;  // below this many elements run on one thread

// ---- storage <-> fp32 -----------------------------------------------------------------------------------
template <typename T>
struct IO;

template <>
struct IO<float> {
  static MG_INLINE float ld(const float* p, int64_t i) { return p[i]; }
  static MG_INLINE float st(float* p, int64_t i, float v) {  // store, return the value as stored
    p[i] = v;
    return v;
  }
};

template <>
struct IO<bf16_t> {
  static MG_INLINE float ld(const bf16_t* p, int64_t i) {
    uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static MG_INLINE float st(bf16_t* p, int64_t i, float v) {
    // Round to nearest even, NaN -> canonical quiet NaN: the same as c10::BFloat16(float).
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bf16_t b = (v != v) ? static_cast<bf16_t>(0x7FC0) : static_cast<bf16_t>(r);
    p[i] = b;
    uint32_t back = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &back, sizeof(f));
    return f;
  }
};

// ---- forward ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdArgs {
  const T* x;
  const T* h;         // residual branch (RES only)
  const float* gate;  // [BsG, C] (GATED only)
  const float* shift; // [BsH, C]
  const float* scale1;  // 1 + scale, [BsS, C]
  T* x_new;           // RES only
  T* y;
  float* mean;
  float* rstd;
  int64_t C;
  int64_t bs_gate, bs_shift, bs_scale;  // 1 or B
  float eps;
};

// Rows [r0, r1), all of sample b.
template <typename T, bool RES, bool GATED>
MG_INLINE void fwd_chunk_impl(const FwdArgs<T>& a, int64_t r0, int64_t r1, int64_t b) {
  const int64_t C = a.C;
  const float invC = 1.0f / static_cast<float>(C);
  const float* __restrict sc1 = a.scale1 + (a.bs_scale == 1 ? 0 : b) * C;
  const float* __restrict sh = a.shift + (a.bs_shift == 1 ? 0 : b) * C;
  const float* __restrict gt = GATED ? a.gate + (a.bs_gate == 1 ? 0 : b) * C : nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = a.x + r * C;
    T* __restrict yr = a.y + r * C;
    float sum = 0.f;
    const T* src = xr;
    if constexpr (RES) {
      const T* __restrict hr = a.h + r * C;
      T* __restrict xn = a.x_new + r * C;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) {
        float hv = IO<T>::ld(hr, c);
        float v = IO<T>::ld(xr, c) + (GATED ? gt[c] * hv : hv);
        sum += IO<T>::st(xn, c, v);  // statistics of the rounded x_new
      }
      src = xn;
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += IO<T>::ld(xr, c);
    }
    const T* __restrict s = src;
    const float mu = sum * invC;
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < C; ++c) {
      float d = IO<T>::ld(s, c) - mu;
      sq += d * d;
    }
    const float rs = 1.0f / std::sqrt(sq * invC + a.eps);
    const float nmr = -mu * rs;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float xh = IO<T>::ld(s, c) * rs + nmr;
      IO<T>::st(yr, c, xh * sc1[c] + sh[c]);
    }
    a.mean[r] = mu;
    a.rstd[r] = rs;
  }
}

template <typename T, bool RES, bool GATED>
void fwd_chunk_base(const FwdArgs<T>& a, int64_t r0, int64_t r1, int64_t b) {
  fwd_chunk_impl<T, RES, GATED>(a, r0, r1, b);
}
#if MG_HAVE_AVX2_VARIANT
template <typename T, bool RES, bool GATED>
MG_TARGET_AVX2 void fwd_chunk_avx2(const FwdArgs<T>& a, int64_t r0, int64_t r1, int64_t b) {
  fwd_chunk_impl<T, RES, GATED>(a, r0, r1, b);
}
#endif

// ---- backward --------------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
  const T* dy;
  const T* dxnew;     // HAS_DXN only
  const T* h;         // RES only
  const float* gate;  // GATED only
  const T* x;         // x (plain) or x_new (residual)
  const float* scale1;  // 1 + scale
  const float* mean;
  const float* rstd;
  T* dx;
  T* dh;  // RES only
  int64_t C;
  int64_t bs_gate, bs_scale;
};

// Rows [r0, r1) of sample b. acc: 3*C fp32 scratch (dscale, dshift, dgate); pS/pH/pG: fp64 partials to
// add this chunk's sums into (pG only when GATED).
template <typename T, bool RES, bool HAS_DXN, bool GATED>
MG_INLINE void bwd_chunk_impl(const BwdArgs<T>& a, int64_t r0, int64_t r1, int64_t b, float* acc, double* pS,
                              double* pH, double* pG) {
  const int64_t C = a.C;
  const float invC = 1.0f / static_cast<float>(C);
  const float* __restrict sc1 = a.scale1 + (a.bs_scale == 1 ? 0 : b) * C;
  const float* __restrict gt = GATED ? a.gate + (a.bs_gate == 1 ? 0 : b) * C : nullptr;
  float* __restrict accS = acc;
  float* __restrict accH = acc + C;
  float* __restrict accG = acc + 2 * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    accS[c] = 0.f;
    accH[c] = 0.f;
  }
  if constexpr (GATED) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) accG[c] = 0.f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = a.x + r * C;
    const T* __restrict dyr = a.dy + r * C;
    const float mu = a.mean[r];
    const float rs = a.rstd[r];
    const float nmr = -mu * rs;
    float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < C; ++c) {
      float xh = IO<T>::ld(xr, c) * rs + nmr;
      float d = IO<T>::ld(dyr, c);
      float g = d * sc1[c];
      sg += g;
      sgx += g * xh;
      accS[c] += d * xh;
      accH[c] += d;
    }
    const float ma = sg * invC;
    const float mb = sgx * invC;
    T* __restrict dxr = a.dx + r * C;
    if constexpr (RES) {
      const T* __restrict hr = a.h + r * C;
      const T* __restrict dxnr = HAS_DXN ? a.dxnew + r * C : nullptr;
      T* __restrict dhr = a.dh + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float xh = IO<T>::ld(xr, c) * rs + nmr;
        float g = IO<T>::ld(dyr, c) * sc1[c];
        float v = rs * (g - ma - xh * mb);
        if constexpr (HAS_DXN) v += IO<T>::ld(dxnr, c);
        IO<T>::st(dxr, c, v);
        if constexpr (GATED) {
          IO<T>::st(dhr, c, v * gt[c]);
          accG[c] += v * IO<T>::ld(hr, c);
        } else {
          IO<T>::st(dhr, c, v);
        }
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float xh = IO<T>::ld(xr, c) * rs + nmr;
        float g = IO<T>::ld(dyr, c) * sc1[c];
        IO<T>::st(dxr, c, rs * (g - ma - xh * mb));
      }
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    pS[c] += static_cast<double>(accS[c]);
    pH[c] += static_cast<double>(accH[c]);
  }
  if constexpr (GATED) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) pG[c] += static_cast<double>(accG[c]);
  }
}

template <typename T, bool RES, bool HAS_DXN, bool GATED>
void bwd_chunk_base(const BwdArgs<T>& a, int64_t r0, int64_t r1, int64_t b, float* acc, double* pS, double* pH,
                    double* pG) {
  bwd_chunk_impl<T, RES, HAS_DXN, GATED>(a, r0, r1, b, acc, pS, pH, pG);
}
#if MG_HAVE_AVX2_VARIANT
template <typename T, bool RES, bool HAS_DXN, bool GATED>
MG_TARGET_AVX2 void bwd_chunk_avx2(const BwdArgs<T>& a, int64_t r0, int64_t r1, int64_t b, float* acc, double* pS,
                                   double* pH, double* pG) {
  bwd_chunk_impl<T, RES, HAS_DXN, GATED>(a, r0, r1, b, acc, pS, pH, pG);
}
#endif


template <typename T, bool RES, bool GATED>
auto pick_fwd() {
#if MG_HAVE_AVX2_VARIANT
  if (use_avx2()) return &fwd_chunk_avx2<T, RES, GATED>;
#endif
  return &fwd_chunk_base<T, RES, GATED>;
}

template <typename T, bool RES, bool HAS_DXN, bool GATED>
auto pick_bwd() {
#if MG_HAVE_AVX2_VARIANT
  if (use_avx2()) return &bwd_chunk_avx2<T, RES, HAS_DXN, GATED>;
#endif
  return &bwd_chunk_base<T, RES, HAS_DXN, GATED>;
}

// ---- work partition ---------------------------------------------------------------------------------------
// Chunks: kRowsPerChunk rows of one sample; chunk k is rows [n0, n1) of sample k / cps. Parts: contiguous
// ranges of chunks, one per thread.
struct Partition {
  int64_t B, N, cps, nchunks, nparts;
  Partition(int64_t B_, int64_t N_, int64_t C) : B(B_), N(N_) {
    cps = N > 0 ? (N + kRowsPerChunk - 1) / kRowsPerChunk : 0;
    nchunks = B * cps;
    int64_t nt = 1;
#ifdef _OPENMP
    if (B * N * C >= kSerialElements) nt = std::max<int64_t>(1, at::get_num_threads());
#endif
    nparts = std::max<int64_t>(1, std::min(nt, nchunks));
  }
  int64_t k0(int64_t p) const { return nchunks * p / nparts; }
  int64_t k1(int64_t p) const { return nchunks * (p + 1) / nparts; }
  int64_t sample(int64_t k) const { return k / cps; }
  int64_t row0(int64_t k) const { return sample(k) * N + (k % cps) * kRowsPerChunk; }
  int64_t row1(int64_t k) const { return sample(k) * N + std::min(N, (k % cps + 1) * kRowsPerChunk); }
};

template <typename T, typename Fn>
void run_fwd(Fn fn, const FwdArgs<T>& a, const Partition& P) {
#pragma omp parallel for schedule(static, 1) num_threads(P.nparts) if (P.nparts > 1)
  for (int64_t p = 0; p < P.nparts; ++p) {
    for (int64_t k = P.k0(p); k < P.k1(p); ++k) fn(a, P.row0(k), P.row1(k), P.sample(k));
  }
}

// Per-part fp64 partial slots for one [Bs, C] reduction: one slot when Bs == 1, else one per sample the part
// touches.
struct Slots {
  std::vector<int64_t> first_sample, offset;  // per part; offset in units of C
  int64_t total = 0;
  Slots(const Partition& P, int64_t Bs) : first_sample(P.nparts), offset(P.nparts) {
    for (int64_t p = 0; p < P.nparts; ++p) {
      const int64_t k0 = P.k0(p), k1 = P.k1(p);
      int64_t n = 0;
      first_sample[p] = k1 > k0 ? P.sample(k0) : 0;
      if (k1 > k0) n = Bs == 1 ? 1 : P.sample(k1 - 1) - P.sample(k0) + 1;
      offset[p] = total;
      total += n;
    }
  }
  // slot of sample b in part p
  int64_t slot(int64_t p, int64_t b, int64_t Bs) const { return offset[p] + (Bs == 1 ? 0 : b - first_sample[p]); }
  bool has(const Partition& P, int64_t p, int64_t b, int64_t Bs) const {
    const int64_t k0 = P.k0(p), k1 = P.k1(p);
    if (k1 <= k0) return false;
    return Bs == 1 || (b >= P.sample(k0) && b <= P.sample(k1 - 1));
  }
};

void reduce_slots(const std::vector<double>& part, const Slots& S, const Partition& P, int64_t Bs, int64_t C,
                  float* out) {
  const int64_t total = Bs * C;
#pragma omp parallel for schedule(static) num_threads(P.nparts) if (P.nparts > 1 && total >= 4096)
  for (int64_t j = 0; j < total; ++j) {
    const int64_t b = j / C, c = j % C;
    double s = 0.0;
    for (int64_t p = 0; p < P.nparts; ++p)
      if (S.has(P, p, b, Bs)) s += part[S.slot(p, b, Bs) * C + c];
    out[j] = static_cast<float>(s);
  }
}

template <typename T, typename Fn>
void run_bwd(Fn fn, const BwdArgs<T>& a, const Partition& P, bool gated, float* dscale, float* dshift,
             float* dgate) {
  const int64_t C = a.C;
  Slots SS(P, a.bs_scale), SG(P, gated ? a.bs_gate : 1);
  std::vector<double> pS(SS.total * C, 0.0), pH(SS.total * C, 0.0), pG(gated ? SG.total * C : 0, 0.0);
  std::vector<float> scratch(P.nparts * 3 * C);
#pragma omp parallel for schedule(static, 1) num_threads(P.nparts) if (P.nparts > 1)
  for (int64_t p = 0; p < P.nparts; ++p) {
    float* acc = scratch.data() + p * 3 * C;
    for (int64_t k = P.k0(p); k < P.k1(p); ++k) {
      const int64_t b = P.sample(k);
      const int64_t ss = SS.slot(p, b, a.bs_scale) * C;
      double* g = gated ? pG.data() + SG.slot(p, b, a.bs_gate) * C : nullptr;
      fn(a, P.row0(k), P.row1(k), b, acc, pS.data() + ss, pH.data() + ss, g);
    }
  }
  reduce_slots(pS, SS, P, a.bs_scale, C, dscale);
  reduce_slots(pH, SS, P, a.bs_scale, C, dshift);
  if (gated) reduce_slots(pG, SG, P, a.bs_gate, C, dgate);
}

// ---- argument checks -----------------------------------------------------------------------------------------
void check_main(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), name, " must be a tensor, got None");
#ifdef MG_WITH_CUDA
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), name, " must be a CPU or CUDA tensor, got device ",
              x.device());
#else
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got device ", x.device(),
              ": this mgkernels._C was built without CUDA (rebuild with a CUDA build of torch and nvcc, or "
              "move the tensors to the CPU)");
#endif
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", x.scalar_type(), " (convert it with .float() or .bfloat16())");
  TORCH_CHECK(x.dim() == 3, name, " must be 3-D [B, N, C], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous (call .contiguous() on it)");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x, const char* xname) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on the same device as ", xname, " (", x.device(),
              "), got ", t.device());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, const char* xname) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  check_same_device(t, name, x, xname);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of ", xname, " (", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have the shape of ", xname, " ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() on it)");
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x, const char* xname) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  check_same_device(t, name, x, xname);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type(),
              " (pass it as .float())");
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(t.dim() == 2 && (t.size(0) == B || t.size(0) == 1) && t.size(1) == C, name,
              " must have shape [B, C] or [1, C] = [", B, ", ", C, "] or [1, ", C, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() on it)");
}

void check_stat(const at::Tensor& t, const char* name, const at::Tensor& x, const char* xname) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  check_same_device(t, name, x, xname);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), name, " must have shape [B, N] = [",
              x.size(0), ", ", x.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() on it)");
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
}

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---- CPU drivers ----------------------------------------------------------------------------------------------
template <typename T>
void fwd_cpu_typed(const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
                   const at::Tensor& scale, double eps, const at::Tensor& x_new, const at::Tensor& y,
                   const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  if (B * N == 0) return;
  at::Tensor scale1 = scale + 1.0;  // [Bs, C], tiny
  const bool res = h.defined(), gated = gate.defined();
  FwdArgs<T> a;
  a.x = reinterpret_cast<const T*>(x.data_ptr());
  a.h = res ? reinterpret_cast<const T*>(h.data_ptr()) : nullptr;
  a.gate = gated ? gate.data_ptr<float>() : nullptr;
  a.shift = shift.data_ptr<float>();
  a.scale1 = scale1.data_ptr<float>();
  a.x_new = res ? reinterpret_cast<T*>(x_new.data_ptr()) : nullptr;
  a.y = reinterpret_cast<T*>(y.data_ptr());
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.C = C;
  a.bs_gate = gated ? gate.size(0) : 1;
  a.bs_shift = shift.size(0);
  a.bs_scale = scale.size(0);
  a.eps = static_cast<float>(eps);
  Partition P(B, N, C);
  if (!res)
    run_fwd(pick_fwd<T, false, false>(), a, P);
  else if (gated)
    run_fwd(pick_fwd<T, true, true>(), a, P);
  else
    run_fwd(pick_fwd<T, true, false>(), a, P);
}

template <typename T>
void bwd_cpu_typed(const at::Tensor& dy, const at::Tensor& dxnew, const at::Tensor& h, const at::Tensor& gate,
                   const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
                   const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& dgate, const at::Tensor& dshift,
                   const at::Tensor& dscale) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  if (B * N == 0 || C == 0) return;  // dscale/dshift/dgate were allocated as zeros
  at::Tensor scale1 = scale + 1.0;
  const bool res = h.defined(), gated = gate.defined(), has_dxn = dxnew.defined();
  BwdArgs<T> a;
  a.dy = reinterpret_cast<const T*>(dy.data_ptr());
  a.dxnew = has_dxn ? reinterpret_cast<const T*>(dxnew.data_ptr()) : nullptr;
  a.h = res ? reinterpret_cast<const T*>(h.data_ptr()) : nullptr;
  a.gate = gated ? gate.data_ptr<float>() : nullptr;
  a.x = reinterpret_cast<const T*>(x.data_ptr());
  a.scale1 = scale1.data_ptr<float>();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dx = reinterpret_cast<T*>(dx.data_ptr());
  a.dh = res ? reinterpret_cast<T*>(dh.data_ptr()) : nullptr;
  a.C = C;
  a.bs_gate = gated ? gate.size(0) : 1;
  a.bs_scale = scale.size(0);
  Partition P(B, N, C);
  float* dS = dscale.data_ptr<float>();
  float* dH = dshift.data_ptr<float>();
  float* dG = gated ? dgate.data_ptr<float>() : nullptr;
  if (!res)
    run_bwd(pick_bwd<T, false, false, false>(), a, P, false, dS, dH, dG);
  else if (has_dxn && gated)
    run_bwd(pick_bwd<T, true, true, true>(), a, P, true, dS, dH, dG);
  else if (has_dxn)
    run_bwd(pick_bwd<T, true, true, false>(), a, P, false, dS, dH, dG);
  else if (gated)
    run_bwd(pick_bwd<T, true, false, true>(), a, P, true, dS, dH, dG);
  else
    run_bwd(pick_bwd<T, true, false, false>(), a, P, false, dS, dH, dG);
}

// Shared by the plain and residual variants: h / gate / x_new undefined for the plain one.
void fwd_any(const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
             const at::Tensor& scale, double eps, const at::Tensor& x_new, const at::Tensor& y,
             const at::Tensor& mean, const at::Tensor& rstd) {
  if (x.is_cuda()) {
#ifdef MG_WITH_CUDA
    modulate_fwd_cuda(x, h, gate, shift, scale, eps, x_new, y, mean, rstd);
    return;
#else
    TORCH_CHECK(false, "mgkernels._C was built without CUDA");
#endif
  }
  if (x.scalar_type() == at::kFloat)
    fwd_cpu_typed<float>(x, h, gate, shift, scale, eps, x_new, y, mean, rstd);
  else
    fwd_cpu_typed<bf16_t>(x, h, gate, shift, scale, eps, x_new, y, mean, rstd);
}

void bwd_any(const at::Tensor& dy, const at::Tensor& dxnew, const at::Tensor& h, const at::Tensor& gate,
             const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
             const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& dgate, const at::Tensor& dshift,
             const at::Tensor& dscale) {
  if (x.is_cuda()) {
#ifdef MG_WITH_CUDA
    modulate_bwd_cuda(dy, dxnew, h, gate, x, scale, mean, rstd, dx, dh, dgate, dshift, dscale);
    return;
#else
    TORCH_CHECK(false, "mgkernels._C was built without CUDA");
#endif
  }
  if (x.scalar_type() == at::kFloat)
    bwd_cpu_typed<float>(dy, dxnew, h, gate, x, scale, mean, rstd, dx, dh, dgate, dshift, dscale);
  else
    bwd_cpu_typed<bf16_t>(dy, dxnew, h, gate, x, scale, mean, rstd, dx, dh, dgate, dshift, dscale);
}

at::Tensor stats_like(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
}

}  // namespace

// ---- entry points ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                             const at::Tensor& scale, double eps) {
  check_main(x, "x");
  check_param(shift, "shift", x, "x");
  check_param(scale, "scale", x, "x");
  check_eps(eps);
  at::Tensor y = at::empty_like(x), mean = stats_like(x), rstd = stats_like(x);
  fwd_any(x, at::Tensor(), at::Tensor(), shift, scale, eps, at::Tensor(), y, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& scale, const at::Tensor& mean,
                                                             const at::Tensor& rstd) {
  check_main(x, "x");
  check_like(dy, "dy", x, "x");
  check_param(scale, "scale", x, "x");
  check_stat(mean, "mean", x, "x");
  check_stat(rstd, "rstd", x, "x");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dscale = at::zeros_like(scale), dshift = at::zeros_like(scale);
  bwd_any(dy, at::Tensor(), at::Tensor(), at::Tensor(), x, scale, mean, rstd, dx, at::Tensor(), at::Tensor(),
          dshift, dscale);
  return {dx, dscale, dshift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_fwd(
    const at::Tensor& x, const at::Tensor& h, const c10::optional<at::Tensor>& gate, const at::Tensor& shift,
    const at::Tensor& scale, double eps) {
  check_main(x, "x");
  check_like(h, "h", x, "x");
  at::Tensor g;
  if (present(gate)) {
    g = *gate;
    check_param(g, "gate", x, "x");
  }
  check_param(shift, "shift", x, "x");
  check_param(scale, "scale", x, "x");
  check_eps(eps);
  at::Tensor x_new = at::empty_like(x), y = at::empty_like(x), mean = stats_like(x), rstd = stats_like(x);
  fwd_any(x, h, g, shift, scale, eps, x_new, y, mean, rstd);
  return {x_new, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_bwd(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dxnew, const at::Tensor& h,
    const c10::optional<at::Tensor>& gate, const at::Tensor& x_new, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_main(x_new, "x_new");
  check_like(dy, "dy", x_new, "x_new");
  at::Tensor dxn, g;
  if (present(dxnew)) {
    dxn = *dxnew;
    check_like(dxn, "dxnew", x_new, "x_new");
  }
  check_like(h, "h", x_new, "x_new");
  if (present(gate)) {
    g = *gate;
    check_param(g, "gate", x_new, "x_new");
  }
  check_param(scale, "scale", x_new, "x_new");
  check_stat(mean, "mean", x_new, "x_new");
  check_stat(rstd, "rstd", x_new, "x_new");
  at::Tensor dx = at::empty_like(x_new), dh = at::empty_like(x_new);
  at::Tensor dscale = at::zeros_like(scale), dshift = at::zeros_like(scale);
  at::Tensor dgate = g.defined() ? at::zeros_like(g) : at::empty({0}, scale.options());
  bwd_any(dy, dxn, h, g, x_new, scale, mean, rstd, dx, dh, g.defined() ? dgate : at::Tensor(), dshift, dscale);
  return {dx, dh, dgate, dshift, dscale};
}

std::string modulate_cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace mg
