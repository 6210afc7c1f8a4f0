"""The C++ short-sequence attention of the csrc extension (``csrc/attention.cpp``), as the ``csrc`` provider of
:mod:`mgkernels.st_attention` and :func:`mgkernels.gated_cross_attn.cross_attn` on fp32 CPU tensors.

The kernel reads 5-D views ``[B, G, L, H, D]`` (G sequence groups per sample) with any strides but a unit one on
the head dim, so the callers pass views of the fused qkv projection or of ``[B, N, H, D]`` tensors: nothing is
permuted or copied. At the demo's sizes (16 tokens per frame, 4 frames, 48 text tokens, head dim 16) it
replaces ATen's CPU flash-attention kernel, whose per-call set-up dominates there (docs/demo_recipe.md
section 17).

The extension registers it twice: as the pybind functions ``mgkernels._C.attention_fwd`` / ``attention_bwd``
(5-D views in, outputs written in place; what the tests drive directly), and as dispatcher operators with the
layouts of the Python custom ops (``torch.ops.mgkernels.csrc_st_attention_fwd`` / ``_bwd``,
``csrc_cross_attn_fwd`` / ``_bwd``, ``csrc/attention_ops.cpp``), which build the views and outputs in C++. The functional APIs call the operators
through their autograd Functions (``csrc=True``), eagerly and inside ``torch.compile`` graphs, where they run
without entering Python; the operators' fake (shape) functions are registered here.
"""

from __future__ import annotations

import torch

from . import _ext

# Whether the built extension has the attention kernels and operators (an extension built before them does
# not); a module constant, so torch.compile can guard on it.
AVAILABLE = (_ext.ext_available() and hasattr(_ext.ext(), "attention_fwd")
             and hasattr(torch.ops.mgkernels, "csrc_st_attention_fwd"))


def usable(t: torch.Tensor) -> bool:
    """The csrc attention can take ``t`` (a CPU fp32 tensor, extension built with the kernels)."""
    return AVAILABLE and t.device.type == "cpu" and t.dtype == torch.float32


if AVAILABLE:
    @torch.library.register_fake("mgkernels::csrc_st_attention_fwd")
    def _(qkv, T, S, mode):
        B, N, _, H, D = qkv.shape
        return qkv.new_empty(B, N, H * D), qkv.new_empty(B, H, N, dtype=torch.float32)

    @torch.library.register_fake("mgkernels::csrc_st_attention_bwd")
    def _(dout, qkv, o, lse, T, S, mode):
        return qkv.new_empty(qkv.shape)

    @torch.library.register_fake("mgkernels::csrc_cross_attn_fwd")
    def _(q, k, v, mask, save):
        B, N, H, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, H, N) if save else (0,), dtype=torch.float32)

    @torch.library.register_fake("mgkernels::csrc_cross_attn_bwd")
    def _(dout, q, k, v, mask, o, lse):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

