"""Helpers shared by the op files: broadcast canonicalisation of per-sample vectors and launch heuristics."""

from __future__ import annotations

import contextvars
import functools

import torch

# The one Triton import guard of the package. Without Triton (a CPU-only install) the op files still import:
# @triton.jit leaves the kernel functions as plain (never called) Python functions, and the dispatcher runs
# the PyTorch reference / csrc providers (an explicit MG_KERNELS=triton raises KernelUnavailable).
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/test_package.py in a subprocess

    class _NoTriton:
        constexpr = int  # annotations of kernel parameters

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels take
CSRC_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels store


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def providers_for(x: torch.Tensor, implemented: tuple[str, ...]) -> tuple[str, ...]:
    """The providers of ``implemented`` that take x's dtype (float64 and other dtypes: the reference only)."""
    ok = {"triton": x.dtype in TRITON_DTYPES, "csrc": x.dtype in CSRC_DTYPES, "ref": True}
    return tuple(p for p in implemented if ok[p])


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


# Set by mgkernels.aot.compile_only: launch heuristics then size grids for that many SMs on any tensor
# (meta tensors while compiling ahead of time for a GPU this machine does not have).
_target_sms: contextvars.ContextVar[int | None] = contextvars.ContextVar("mgkernels_target_sms", default=None)


def set_target_sm_count(sms: int | None) -> contextvars.Token:
    return _target_sms.set(sms)


def reset_target_sm_count(token: contextvars.Token) -> None:
    _target_sms.reset(token)


def target_sm_count(x: torch.Tensor) -> int | None:
    """SMs of the GPU the launch is for: x's CUDA device, the ahead-of-time target, or None (CPU interpreter)."""
    if x.is_cuda:
        return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return _target_sms.get()


def row_chunks(x: torch.Tensor, B: int, N: int, rows_per_program: int = 1, per_sm: int = 4) -> int:
    """Programs per sample for row-wise kernels that loop over tokens: one full wave on the GPU (``per_sm``
    resident programs per SM, the kernel's occupancy from the sm_90 compile report, rounded down so no
    program waits for a second wave), few under the CPU interpreter (each program costs milliseconds there)."""
    sms = target_sm_count(x)
    if sms is not None:
        return max(1, min(-(-N // rows_per_program), per_sm * sms // B))
    return max(1, min(N, 2))


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def row_tile(C: int, streams: int, esize: int = 2) -> dict:
    """Tile of the row-wise (LayerNorm-style) kernels that load ``streams`` [B, N, C] tensors of ``esize``-byte
    elements per row: ROWS rows of BLOCK_C >= C columns per step, about 16 KB loaded per step and program
    (modulate's bf16 forward at C = 1152: 4 rows of 2048, 4 x 2.3 KB in flight), 4 warps (128 threads: eight
    128-bit loads per thread and step). Chosen with the sm_90 compile report: no spills, 3-4 programs per
    SM, >= 27 KB of loads in flight per SM (what an H100/H200 SM needs to stream at its share of the
    bandwidth)."""
    block = pow2(C)
    rows = max(1, min(16, 16384 // (block * streams * esize)))
    return dict(ROWS=rows, BLOCK_C=block, num_warps=4 if block <= 4096 else 8)


def row_split(x: torch.Tensor, B: int, N: int, rows_per_step: int, per_sm: int = 4) -> tuple[int, int]:
    """(programs per sample, tokens per program): tokens per program a multiple of ``rows_per_step``."""
    chunks = row_chunks(x, B, N, rows_per_step, per_sm)
    rows = cdiv(cdiv(N, chunks), rows_per_step) * rows_per_step
    return cdiv(N, rows), rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/fp16/bf16 storage, fp64 math for fp64 (used by gradcheck on the ref path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
