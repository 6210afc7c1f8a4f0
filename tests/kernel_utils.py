"""Shared helpers for kernel tests: the DESIGN tolerance policy and device/dtype selection.

Tolerance policy (DESIGN.md, convention 3): compare with a float64 reference; the kernel's error may be at
most 2x the error PyTorch makes doing the same math in the same dtype, plus a small atol.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton runs natively on CUDA, through the interpreter on CPU; the interpreter computes bf16 arithmetic
# wrongly, so bf16 is a CUDA-only dtype in kernel tests.
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_policy(ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, atol: float | None = None,
                  name: str = "output") -> None:
    """|ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol (max over elements)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    atol = ATOL[ours.dtype] if atol is None else atol
    e_ours, e_torch = max_err(ours, ref64), max_err(torch_same_dtype, ref64)
    assert e_ours <= 2 * e_torch + atol, f"{name}: error {e_ours:.3e} > 2 x torch's {e_torch:.3e} + {atol:.1e}"
