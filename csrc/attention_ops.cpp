// The C++ attention (attention.cpp) as dispatcher operators: torch.ops.mgkernels.csrc_st_attention_fwd / _bwd
// and csrc_cross_attn_fwd / _bwd, CPU kernels here, fake (shape) kernels in mgkernels/_cpu_attention.py.
//
// Why operators and not only the pybind functions: at the demo's sizes the kernel runs 60-200 us a call, and the
// Python around it (five to ten views of the qkv projection, the output allocations, the torch.library custom
// op) cost another 30-70 us (docs/demo_recipe.md section 17). Here the views and allocations are C++, and a
// compiled graph calls the operator through the dispatcher without entering Python. The layouts are those of the
// Python custom ops they stand in for (mgkernels/st_attention.py, mgkernels/gated_cross_attn.py):
//   st_attention: qkv [B, T*S, 3, H, D] (any strides, unit stride on D or a copy is made) -> o [B, T*S, H*D],
//                 lse [B, H, T*S]; spatial attends over the S tokens of a frame, temporal over the T frames of a
//                 position. The backward returns dqkv [B, T*S, 3, H, D] (contiguous).
//   cross_attn:   q [B, N, H, D], k / v [B, L, H, D], mask [B, L] (any dtype, non-zero = attend) or None ->
//                 o [B, N, H, D], lse [B, H, N] (empty [0] unless save). The backward returns dq, dk, dv.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "attention.h"

namespace {

at::Tensor unit_last(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// A by-token [B, T*S, H, X] view as the kernel's [B, G, L, H, X]: spatial groups are frames, temporal groups are
// token positions (a transposed view; nothing is copied).
at::Tensor grouped(const at::Tensor& t, int64_t T, int64_t S, bool spatial) {
  at::Tensor x = t.unflatten(1, {T, S});
  return spatial ? x : x.transpose(1, 2);
}

bool st_check(const at::Tensor& qkv, int64_t T, int64_t S, c10::string_view mode) {
  TORCH_CHECK(mode == "spatial" || mode == "temporal",
              "mgkernels.csrc_st_attention: mode must be 'spatial' or 'temporal', got '", std::string(mode), "'");
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3,
              "mgkernels.csrc_st_attention: qkv must be [B, T*S, 3, H, D], got ", qkv.sizes());
  TORCH_CHECK(T >= 1 && S >= 1 && qkv.size(1) == T * S, "mgkernels.csrc_st_attention: qkv has ", qkv.size(1),
              " tokens, not T*S = ", T, "*", S);
  return mode == "spatial";
}

std::tuple<at::Tensor, at::Tensor> st_attention_fwd(const at::Tensor& qkv_in, int64_t T, int64_t S,
                                                    c10::string_view mode) {
  const bool spatial = st_check(qkv_in, T, S, mode);
  const at::Tensor qkv = unit_last(qkv_in);
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  at::Tensor o = at::empty({B, N, H, D}, qkv.options());
  at::Tensor lse = at::empty({B, H, N}, qkv.options().dtype(at::kFloat));
  mg::attention_fwd(grouped(qkv.select(2, 0), T, S, spatial), grouped(qkv.select(2, 1), T, S, spatial),
                    grouped(qkv.select(2, 2), T, S, spatial), c10::nullopt, grouped(o, T, S, spatial),
                    grouped(lse.transpose(1, 2), T, S, spatial));
  return {o.view({B, N, H * D}), lse};
}

at::Tensor st_attention_bwd(const at::Tensor& dout, const at::Tensor& qkv_in, const at::Tensor& o,
                            const at::Tensor& lse, int64_t T, int64_t S, c10::string_view mode) {
  const bool spatial = st_check(qkv_in, T, S, mode);
  const at::Tensor qkv = unit_last(qkv_in);
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  at::Tensor dqkv = at::empty({B, N, 3, H, D}, qkv.options());
  auto g = [&](const at::Tensor& t) { return grouped(t, T, S, spatial); };
  mg::attention_bwd(g(qkv.select(2, 0)), g(qkv.select(2, 1)), g(qkv.select(2, 2)), c10::nullopt,
                    g(unit_last(o.reshape({B, N, H, D}))), g(lse.transpose(1, 2)),
                    g(unit_last(dout.reshape({B, N, H, D}))), g(dqkv.select(2, 0)), g(dqkv.select(2, 1)),
                    g(dqkv.select(2, 2)));
  return dqkv;
}

c10::optional<at::Tensor> key_mask(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return c10::nullopt;
  const at::Tensor& m = *mask;
  return (m.scalar_type() == at::kBool ? m : m.ne(0)).contiguous();
}

void cross_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "mgkernels.csrc_cross_attn: q, k, v must be "
              "[B, N, H, D], [B, L, H, D], [B, L, H, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
}

std::tuple<at::Tensor, at::Tensor> cross_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const c10::optional<at::Tensor>& mask, bool save) {
  cross_check(q, k, v);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor o = at::empty({B, N, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  mg::attention_fwd(unit_last(q).unsqueeze(1), unit_last(k).unsqueeze(1), unit_last(v).unsqueeze(1),
                    key_mask(mask), o.unsqueeze(1), lse.transpose(1, 2).unsqueeze(1));
  return {o, save ? lse : at::empty({0}, q.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attn_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const c10::optional<at::Tensor>& mask,
                                                               const at::Tensor& o, const at::Tensor& lse) {
  cross_check(q, k, v);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  mg::attention_bwd(unit_last(q).unsqueeze(1), unit_last(k).unsqueeze(1), unit_last(v).unsqueeze(1),
                    key_mask(mask), unit_last(o).unsqueeze(1), lse.transpose(1, 2).unsqueeze(1),
                    unit_last(dout).unsqueeze(1), dq.unsqueeze(1), dk.unsqueeze(1), dv.unsqueeze(1));
  return {dq, dk, dv};
}

}  // namespace

// A fragment: the Python custom ops (torch.library.custom_op) define the rest of the mgkernels namespace.
TORCH_LIBRARY_FRAGMENT(mgkernels, m) {
  m.def("csrc_st_attention_fwd(Tensor qkv, int T, int S, str mode) -> (Tensor, Tensor)");
  m.def("csrc_st_attention_bwd(Tensor dout, Tensor qkv, Tensor o, Tensor lse, int T, int S, str mode) -> Tensor");
  m.def("csrc_cross_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool save) -> (Tensor, Tensor)");
  m.def("csrc_cross_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor o, Tensor lse) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mgkernels, CPU, m) {
  m.impl("csrc_st_attention_fwd", &st_attention_fwd);
  m.impl("csrc_st_attention_bwd", &st_attention_bwd);
  m.impl("csrc_cross_attn_fwd", &cross_attn_fwd);
  m.impl("csrc_cross_attn_bwd", &cross_attn_bwd);
}
