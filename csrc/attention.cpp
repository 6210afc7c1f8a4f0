// Short-sequence softmax attention on the CPU (fp32), forward and backward; contract in attention.h.
//
// Why: at the demo's sizes (16 tokens per frame, 4 frames, 48 text tokens, head dim 16) ATen's CPU flash
// kernel spends its time in per-block set-up, not arithmetic: 0.2-0.5 ms per call for ~2 MFLOP
// (docs/demo_recipe.md section 17). Here a task is one (sample, group, head) sequence, held whole in a
// per-thread scratch buffer, and the tasks are split over ATen's intra-op threads (at::parallel_for).
//
// A task's keys (K scaled by D^-0.5, V) are gathered once into the scratch as rows. Queries go in blocks of
// QB = 8, the SIMD lane of the scores and the softmax: s[j, l] = k_j . q_l, the row max, exp and sum are
// lane-wise (no horizontal reductions), o^T[d, l] = sum_j v[j, d] p[j, l], lse = max + log(sum). Backward of a
// block: p = exp(s - lse) recomputed; delta_l = do_l . o_l; dp[j, l] = do_l . v_j; ds = p (dp - delta); then
// per query (the head dim as the lane) dq = scale sum_j ds_j k_j, dv_j += p_j do, dk_j += scale ds_j q. dk / dv
// are accumulated in the scratch and written once per task (a task owns its keys: no races, and the result
// does not depend on the thread count).
//
// exp: a branch-free Cephes-style polynomial (range reduction by ln 2, degree-6 polynomial, exponent by bit
// arithmetic; relative error ~2e-7 on [-87, 0], exactly 0 below -87) that the compiler vectorises; std::exp
// would stay scalar without -ffast-math. A masked key's score gets -1e30 added, so its probability is exactly 0.
#include "attention.h"

#include "cpu_isa.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>

namespace mg {
namespace {

struct V5 {  // element (b, g, l, h, d) at p + b*sb + g*sg + l*sl + h*sh + d
  float* p;
  int64_t sb, sg, sl, sh;
  MG_INLINE float* row(int64_t b, int64_t g, int64_t h) const { return p + b * sb + g * sg + h * sh; }
};

struct Args {
  V5 q, k, v, o, lse, dout, dq, dk, dv;  // lse: (b, g, l, h) with no d
  const bool* mask;                       // [B, Lk] or nullptr
  int64_t G, Lq, Lk, H, D;
  float scale;
};

constexpr int QB = 8;  // queries per block: the SIMD lane of scores and softmax (one AVX2 register)

// 8 floats as one value (GCC vector extension: one ymm register with AVX2, two xmm on the baseline). Local
// accumulators of this type stay in registers; `#pragma omp simd` over a local array kept them on the stack
// (a store-to-load chain per FMA: 3x slower at the demo's sizes).
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // for loads / stores at any float address

MG_INLINE v8 ld8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
MG_INLINE void st8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
MG_INLINE v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
MG_INLINE v8 vmax(v8 a, v8 b) { return a > b ? a : b; }

MG_INLINE v8 fast_exp(v8 x) {
  const v8 x_in = x;
  x = vmax(x, splat(-87.0f));
  x = x < splat(88.0f) ? x : splat(88.0f);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no rounding instruction needed on the baseline)
  const v8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  v8 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v8 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  const v8 two_n = reinterpret_cast<const v8&>(e);
  return x_in < splat(-87.0f) ? splat(0.0f) : y * two_n;  // exact 0 below (a masked key, or p < 1.7e-38)
}

constexpr float kMasked = -1e30f;  // added to a masked key's score: never the row max while a key is valid

// Scratch floats a task needs: kr, vr, dk, dv [Lk, D]; mk [Lk]; per query block qt, gt, ot [D, QB] and st, dst
// [Lk, QB].
int64_t scratch_floats(int64_t Lk, int64_t D) { return 4 * Lk * D + Lk + 3 * D * QB + 2 * Lk * QB; }

// The key side of a task, gathered once: kr = scale * K and vr = V as rows [Lk, D]; mk: 0 for a valid key,
// kMasked for a masked one. Returns the number of valid keys.
template <int DT>
MG_INLINE int64_t load_keys(const Args& a, int64_t b, int64_t g, int64_t h, float* __restrict kr,
                            float* __restrict vr, float* __restrict mk) {
  const int64_t Lk = a.Lk, D = DT > 0 ? DT : a.D;
  const float* kb = a.k.row(b, g, h);
  const float* vb = a.v.row(b, g, h);
  int64_t nvalid = 0;
  for (int64_t j = 0; j < Lk; ++j) {
    const bool valid = a.mask == nullptr || a.mask[b * Lk + j];
    mk[j] = valid ? 0.0f : kMasked;
    nvalid += valid;
    const float* __restrict kj = kb + j * a.k.sl;
    const float* __restrict vj = vb + j * a.v.sl;
    for (int64_t d = 0; d < D; ++d) {
      kr[j * D + d] = kj[d] * a.scale;
      vr[j * D + d] = vj[d];
    }
  }
  return nvalid;
}

// xt[d, l] = row (i0 + l)[d] of a [L, D] view with row stride sl, for l < QB; lanes past the last row repeat it
// (finite values whose results are never stored).
template <int DT>
MG_INLINE void gather_block(const float* base, int64_t sl, int64_t i0, int64_t nb, float* __restrict xt, int64_t Dr) {
  const int64_t D = DT > 0 ? DT : Dr;
  for (int l = 0; l < QB; ++l) {
    const float* __restrict x = base + (i0 + std::min<int64_t>(l, nb - 1)) * sl;
    for (int64_t d = 0; d < D; ++d) xt[d * QB + l] = x[d];
  }
}

// out[r, :] = bias[r] + sum_k A[r*ar + k*ak] * B[k, :] for R rows at once: R independent register accumulators
// (a single one is a chain of dependent FMAs, latency-bound), the QB lanes in one vector.
template <int R>
MG_INLINE void lane_gemm(const float* __restrict A, int64_t ar, int64_t ak, const float* __restrict B, int64_t K,
                         const float* __restrict bias, float* __restrict out) {
  v8 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = splat(bias == nullptr ? 0.0f : bias[r]);
  for (int64_t k = 0; k < K; ++k) {
    const v8 bk = ld8(B + k * QB);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += A[r * ar + k * ak] * bk;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) st8(out + r * QB, acc[r]);
}

// out[j, :] = bias[j] + sum_d yr[j, d] * xt[d, :] for every key j (scores, or dp): 4 keys at a time.
MG_INLINE void block_dots(const float* __restrict yr, const float* __restrict xt, const float* __restrict bias,
                          float* __restrict out, int64_t Lk, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= Lk; j += 4) lane_gemm<4>(yr + j * D, D, 1, xt, D, bias == nullptr ? nullptr : bias + j, out + j * QB);
  for (; j < Lk; ++j) lane_gemm<1>(yr + j * D, D, 1, xt, D, bias == nullptr ? nullptr : bias + j, out + j * QB);
}

// out[d, :] = sum_j yr[j, d] * w[j, :] for every d (o^T = V^T P, dq^T = K^T dS): 8 head-dim rows at a time.
MG_INLINE void block_rows(const float* __restrict yr, const float* __restrict w, float* __restrict out, int64_t Lk,
                          int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) lane_gemm<8>(yr + d, 1, D, w, Lk, nullptr, out + d * QB);
  for (; d < D; ++d) lane_gemm<1>(yr + d, 1, D, w, Lk, nullptr, out + d * QB);
}

// DT: the head dim as a compile-time constant (16 / 32 / 64: loops of known length), or 0 for any other D.
template <int DT>
MG_INLINE void fwd_task(const Args& a, int64_t t, float* scratch) {
  const int64_t Lq = a.Lq, Lk = a.Lk, D = DT > 0 ? DT : a.D;
  const int64_t h = t % a.H, g = (t / a.H) % a.G, b = t / (a.H * a.G);
  float* __restrict kr = scratch;
  float* __restrict vr = kr + Lk * D;
  float* __restrict mk = vr + Lk * D;
  float* __restrict qt = mk + Lk;      // [D, QB]
  float* __restrict ot = qt + D * QB;  // [D, QB]
  float* __restrict st = ot + D * QB;  // [Lk, QB]
  const int64_t nvalid = load_keys<DT>(a, b, g, h, kr, vr, mk);
  const float* qb = a.q.row(b, g, h);
  float* ob = a.o.row(b, g, h);
  float* lb = a.lse.row(b, g, h);
  if (nvalid == 0) {  // no valid key: o = 0, lse = +inf
    for (int64_t i = 0; i < Lq; ++i) {
      for (int64_t d = 0; d < D; ++d) ob[i * a.o.sl + d] = 0.0f;
      lb[i * a.lse.sl] = std::numeric_limits<float>::infinity();
    }
    return;
  }
  for (int64_t i0 = 0; i0 < Lq; i0 += QB) {
    const int64_t nb = std::min<int64_t>(QB, Lq - i0);
    gather_block<DT>(qb, a.q.sl, i0, nb, qt, D);
    block_dots(kr, qt, mk, st, Lk, D);  // scaled, masked scores [Lk, QB]
    v8 m = splat(kMasked), sum = splat(0.0f);
    for (int64_t j = 0; j < Lk; ++j) m = vmax(m, ld8(st + j * QB));
    for (int64_t j = 0; j < Lk; ++j) {
      const v8 e = fast_exp(ld8(st + j * QB) - m);  // a masked key: exactly 0
      st8(st + j * QB, e);
      sum += e;
    }
    block_rows(vr, st, ot, Lk, D);  // o^T[d, l] = sum_j v[j, d] p[j, l]
    for (int64_t l = 0; l < nb; ++l) {
      const float inv = 1.0f / sum[l];
      float* __restrict oi = ob + (i0 + l) * a.o.sl;
      for (int64_t d = 0; d < D; ++d) oi[d] = ot[d * QB + l] * inv;
      lb[(i0 + l) * a.lse.sl] = m[l] + std::log(sum[l]);
    }
  }
}

template <int DT>
MG_INLINE void bwd_task(const Args& a, int64_t t, float* scratch) {
  const int64_t Lq = a.Lq, Lk = a.Lk, D = DT > 0 ? DT : a.D;
  const int64_t h = t % a.H, g = (t / a.H) % a.G, b = t / (a.H * a.G);
  float* __restrict kr = scratch;
  float* __restrict vr = kr + Lk * D;
  float* __restrict dk = vr + Lk * D;    // [Lk, D]
  float* __restrict dv = dk + Lk * D;    // [Lk, D]
  float* __restrict mk = dv + Lk * D;
  float* __restrict qt = mk + Lk;        // [D, QB]
  float* __restrict gt = qt + D * QB;    // dO^T, then dq^T [D, QB]
  float* __restrict pt = gt + D * QB;    // P [Lk, QB]
  float* __restrict dst = pt + Lk * QB;  // dS [Lk, QB]
  const int64_t nvalid = load_keys<DT>(a, b, g, h, kr, vr, mk);
  const float* qb = a.q.row(b, g, h);
  const float* ob = a.o.row(b, g, h);
  const float* gb = a.dout.row(b, g, h);
  const float* lb = a.lse.row(b, g, h);
  float* dqb = a.dq.row(b, g, h);
  float* dkb = a.dk.row(b, g, h);
  float* dvb = a.dv.row(b, g, h);
  if (nvalid == 0) {  // no valid key: every gradient is 0
    for (int64_t i = 0; i < Lq; ++i)
      for (int64_t d = 0; d < D; ++d) dqb[i * a.dq.sl + d] = 0.0f;
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t d = 0; d < D; ++d) dkb[j * a.dk.sl + d] = 0.0f, dvb[j * a.dv.sl + d] = 0.0f;
    return;
  }
  for (int64_t x = 0; x < 2 * Lk * D; ++x) dk[x] = 0.0f;  // dk and dv are adjacent
  for (int64_t i0 = 0; i0 < Lq; i0 += QB) {
    const int64_t nb = std::min<int64_t>(QB, Lq - i0);
    gather_block<DT>(qb, a.q.sl, i0, nb, qt, D);
    gather_block<DT>(gb, a.dout.sl, i0, nb, gt, D);
    v8 lse = splat(0.0f), delta = splat(0.0f);
    for (int l = 0; l < QB; ++l) {
      const int64_t i = i0 + std::min<int64_t>(l, nb - 1);
      const float* __restrict oi = ob + i * a.o.sl;
      const float* __restrict gi = gb + i * a.dout.sl;
      float dl = 0.0f;
      for (int64_t d = 0; d < D; ++d) dl += gi[d] * oi[d];
      delta[l] = dl;
      lse[l] = lb[i * a.lse.sl];
    }
    block_dots(kr, qt, mk, pt, Lk, D);        // scaled, masked scores
    block_dots(vr, gt, nullptr, dst, Lk, D);  // dp[j, l] = do_l . v_j
    for (int64_t j = 0; j < Lk; ++j) {
      const v8 p = fast_exp(ld8(pt + j * QB) - lse);
      st8(pt + j * QB, p);
      st8(dst + j * QB, p * (ld8(dst + j * QB) - delta));
    }
    block_rows(kr, dst, gt, Lk, D);  // dq^T[d, l] = sum_j ds[j, l] k_j[d] (kr is scaled); dO^T is no longer needed
    for (int64_t l = 0; l < nb; ++l) {
      float* __restrict dqi = dqb + (i0 + l) * a.dq.sl;
      for (int64_t d = 0; d < D; ++d) dqi[d] = gt[d * QB + l];
    }
    for (int64_t j = 0; j < Lk; ++j) {  // dv_j += sum_l p[j, l] do_l, dk_j += scale sum_l ds[j, l] q_l
      float* __restrict dvj = dv + j * D;
      float* __restrict dkj = dk + j * D;
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {  // the block's rows summed in registers, one load / store per 8 floats
        v8 av = ld8(dvj + d), ak = ld8(dkj + d);
        for (int64_t l = 0; l < nb; ++l) {
          av += pt[j * QB + l] * ld8(gb + (i0 + l) * a.dout.sl + d);
          ak += (dst[j * QB + l] * a.scale) * ld8(qb + (i0 + l) * a.q.sl + d);
        }
        st8(dvj + d, av);
        st8(dkj + d, ak);
      }
      for (; d < D; ++d) {
        float sv = dvj[d], sk = dkj[d];
        for (int64_t l = 0; l < nb; ++l) {
          sv += pt[j * QB + l] * gb[(i0 + l) * a.dout.sl + d];
          sk += (dst[j * QB + l] * a.scale) * qb[(i0 + l) * a.q.sl + d];
        }
        dvj[d] = sv;
        dkj[d] = sk;
      }
    }
  }
  for (int64_t j = 0; j < Lk; ++j) {
    float* __restrict dkj = dkb + j * a.dk.sl;
    float* __restrict dvj = dvb + j * a.dv.sl;
    for (int64_t d = 0; d < D; ++d) {
      dkj[d] = dk[j * D + d];
      dvj[d] = dv[j * D + d];
    }
  }
}

template <bool BWD, int DT>
MG_INLINE void range_impl(const Args& a, int64_t t0, int64_t t1, float* scratch) {
  for (int64_t t = t0; t < t1; ++t) {
    if constexpr (BWD) bwd_task<DT>(a, t, scratch);
    else fwd_task<DT>(a, t, scratch);
  }
}

template <bool BWD, int DT>
void run_range_base(const Args& a, int64_t t0, int64_t t1, float* scratch) {
  range_impl<BWD, DT>(a, t0, t1, scratch);
}
#if MG_HAVE_AVX2_VARIANT
template <bool BWD, int DT>
MG_TARGET_AVX2 void run_range_avx2(const Args& a, int64_t t0, int64_t t1, float* scratch) {
  range_impl<BWD, DT>(a, t0, t1, scratch);
}
#endif

using RangeFn = void (*)(const Args&, int64_t, int64_t, float*);

template <bool BWD, int DT>
RangeFn pick_range() {
#if MG_HAVE_AVX2_VARIANT
  if (use_avx2()) return &run_range_avx2<BWD, DT>;
#endif
  return &run_range_base<BWD, DT>;
}

template <bool BWD>
void run(const Args& a, int64_t B) {
  const RangeFn fn = a.D == 16 ? pick_range<BWD, 16>() : a.D == 32 ? pick_range<BWD, 32>()
                     : a.D == 64 ? pick_range<BWD, 64>() : pick_range<BWD, 0>();
  const int64_t tasks = B * a.G * a.H;
  const int64_t per_task = a.Lq * a.Lk * a.D * (BWD ? 4 : 2);  // multiply-adds
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, per_task));
  const int64_t nscratch = scratch_floats(a.Lk, a.D);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(static_cast<size_t>(nscratch));
    fn(a, t0, t1, scratch.data());
  });
}

// ---- argument checks ---------------------------------------------------------------------------------------
void check_view(const at::Tensor& t, const char* name, int64_t dims, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "mgkernels attention (csrc): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mgkernels attention (csrc): ", name,
              " must be float32 (other dtypes use the PyTorch reference), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims && t.sizes() == shape, "mgkernels attention (csrc): ", name, " must have shape ",
              shape, ", got ", t.sizes());
  TORCH_CHECK(dims == 4 || t.size(4) <= 1 || t.stride(4) == 1, "mgkernels attention (csrc): ", name,
              " needs a unit stride on the head dim (got strides ", t.strides(), "); pass a contiguous tensor");
}

V5 view(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
               const at::Tensor& o, const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 5, "mgkernels attention (csrc): q must be [B, G, Lq, H, D], got ", q.sizes());
  const int64_t B = q.size(0), G = q.size(1), Lq = q.size(2), H = q.size(3), D = q.size(4);
  TORCH_CHECK(k.dim() == 5, "mgkernels attention (csrc): k must be [B, G, Lk, H, D], got ", k.sizes());
  const int64_t Lk = k.size(2);
  TORCH_CHECK(Lk >= 1, "mgkernels attention (csrc): k/v need at least one key");
  check_view(q, "q", 5, {B, G, Lq, H, D});
  check_view(k, "k", 5, {B, G, Lk, H, D});
  check_view(v, "v", 5, {B, G, Lk, H, D});
  check_view(o, "o", 5, {B, G, Lq, H, D});
  check_view(lse, "lse", 4, {B, G, Lq, H});
  Args a{};
  a.q = view(q), a.k = view(k), a.v = view(v), a.o = view(o), a.lse = view(lse);
  a.mask = nullptr;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 2 &&
                    m.size(0) == B && m.size(1) == Lk,
                "mgkernels attention (csrc): mask must be a contiguous CPU bool [B, Lk] = [", B, ", ", Lk,
                "], got ", m.scalar_type(), " ", m.sizes());
    a.mask = m.data_ptr<bool>();
  }
  a.G = G, a.Lq = Lq, a.Lk = Lk, a.H = H, a.D = D;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  return a;
}

}  // namespace

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, const at::Tensor& o, const at::Tensor& lse) {
  Args a = make_args(q, k, v, mask, o, lse);
  if (q.numel() == 0) return;
  run<false>(a, q.size(0));
}

void attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, const at::Tensor& o, const at::Tensor& lse,
                   const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Args a = make_args(q, k, v, mask, o, lse);
  check_view(dout, "dout", 5, q.sizes());
  check_view(dq, "dq", 5, q.sizes());
  check_view(dk, "dk", 5, k.sizes());
  check_view(dv, "dv", 5, k.sizes());
  a.dout = view(dout), a.dq = view(dq), a.dk = view(dk), a.dv = view(dv);
  if (k.numel() == 0) return;
  run<true>(a, q.size(0));
}

}  // namespace mg
