"""Helpers shared by the op files: broadcast canonicalisation of per-sample vectors and launch heuristics."""

from __future__ import annotations

import functools

import torch


def per_sample(p: torch.Tensor, B: int, C: int, name: str) -> torch.Tensor:
    """A per-sample modulation vector as ``[Bs, C]`` with ``Bs`` in {1, B}.

    Accepted: ``[C]`` and ``[1, C]``/``[1, 1, C]`` (shared by the batch), ``[B, C]`` and ``[B, 1, C]``.
    """
    if p.shape[-1] != C:
        raise ValueError(f"{name} must end in the channel size {C}; got shape {list(p.shape)}")
    if p.ndim == 1:
        return p.view(1, C)
    if p.ndim == 2 and p.shape[0] in (1, B):
        return p
    if p.ndim == 3 and p.shape[1] == 1 and p.shape[0] in (1, B):
        return p.view(p.shape[0], C)
    raise ValueError(f"{name} must be [C], [B, C] or [B, 1, C] with B = {B}, C = {C}; got shape {list(p.shape)}")


def check_tokens(x: torch.Tensor, name: str = "x") -> tuple[int, int, int]:
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, N, C]; got shape {list(x.shape)} (reshape leading axes into B, N)")
    return tuple(x.shape)  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_chunks(x: torch.Tensor, B: int, N: int) -> int:
    """Programs per sample for row-wise kernels that loop over tokens: enough to fill the GPU (about 4
    programs per SM over the batch), few under the CPU interpreter (each program costs milliseconds there)."""
    if x.is_cuda:
        target = 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        return max(1, min(N, -(-target // B)))
    return max(1, min(N, 2))


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/fp16/bf16 storage, fp64 math for fp64 (used by gradcheck on the ref path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
