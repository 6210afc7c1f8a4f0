"""The C++ short-sequence attention of the csrc extension (``csrc/attention.cpp``), as the ``csrc`` provider of
:mod:`mgkernels.st_attention` and :func:`mgkernels.gated_cross_attn.cross_attn` on fp32 CPU tensors.

The kernel reads 5-D views ``[B, G, L, H, D]`` (G sequence groups per sample) with any strides but a unit one on
the head dim, so the callers pass views of the fused qkv projection or of ``[B, N, H, D]`` tensors: nothing is
permuted or copied. At the demo's sizes (16 tokens per frame, 4 frames, 48 text tokens, head dim 16) it
replaces ATen's CPU flash-attention kernel, whose per-call set-up dominates there (docs/demo_recipe.md
section 17).

The extension registers it twice: as the pybind functions :func:`forward` / :func:`backward` call (views in,
outputs written in place), and as dispatcher operators with the layouts of the Python custom ops
(``torch.ops.mgkernels.csrc_st_attention_fwd`` / ``_bwd``, ``csrc_cross_attn_fwd`` / ``_bwd``,
``csrc/attention_ops.cpp``), which build the views and outputs in C++. The functional APIs call the operators
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


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (or size 1), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A key-padding mask as the kernel takes it: contiguous bool (non-zero = attend)."""
    if mask is None:
        return None
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, o: torch.Tensor,
            lse: torch.Tensor) -> None:
    """Writes ``o`` (``[B, G, Lq, H, D]``, q's shape) and ``lse`` (fp32 ``[B, G, Lq, H]``, natural log, +inf for a
    row with no valid key); q ``[B, G, Lq, H, D]``, k / v ``[B, G, Lk, H, D]``, mask bool ``[B, Lk]`` or None."""
    _ext.ext().attention_fwd(q, k, v, mask, o, lse)


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, o: torch.Tensor,
             lse: torch.Tensor, do: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Writes ``dq``, ``dk``, ``dv`` (views shaped like q, k, v) from ``do`` (o's shape) and the forward's o, lse."""
    _ext.ext().attention_bwd(q, k, v, mask, o, lse, do, dq, dk, dv)


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

