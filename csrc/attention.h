// Softmax attention of short sequences on the CPU (fp32): STDiT's spatial / temporal self-attention and its
// text cross-attention at the sizes where ATen's CPU flash kernel is dominated by per-block overhead (a few to
// a few hundred keys, head dims up to a few hundred).
//
// Layout: q is a 5-D view [B, G, Lq, H, D], k / v are [B, G, Lk, H, D]: G independent sequence groups per
// sample (spatial: G = T frames of L = S tokens; temporal: G = S positions of L = T frames; cross-attention:
// G = 1), any strides except a unit stride on D. So the caller passes views of the fused qkv projection or of
// [B, N, H, D] tensors and nothing is permuted or copied. mask: optional bool [B, Lk] key-padding mask (true =
// attend); a sample with no valid key gets o = 0 and zero gradients (never NaN).
//
// Forward writes o (a view of the same 5-D shape as q) and lse, a float32 view [B, G, Lq, H] of the natural-log
// log-sum-exp of the scaled scores (+inf for a row with no valid key). Backward recomputes the probabilities
// from lse and writes dq, dk, dv (views shaped like q, k, v). Math in fp32 with scale = D^-0.5.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace mg {

// Exported to Python (registered in mg_ext.cpp).
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, const at::Tensor& o, const at::Tensor& lse);

void attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, const at::Tensor& o, const at::Tensor& lse,
                   const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

}  // namespace mg
