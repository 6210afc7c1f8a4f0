"""Tile helpers shared by the attention kernels: head-dim splitting, aligned strides, split matmuls.

Head dim without padding waste. ``tl.arange`` and the tensor cores want power-of-two tile widths, and a head
dim such as 72 (STDiT-XL/2) padded to 128 wastes 44% of every matmul. Instead the head dim is covered by a
main part ``D0`` (the largest power of two <= D, at least 16) and a tail ``D1`` (the next power of two >= the
rest, at least 16, 0 when D is a power of two): 72 = 64 + 16 (80 computed, 10% waste), 96 = 64 + 32, 40 =
32 + 16. Every q/k/v/o tile is loaded as two tiles and every matmul over the head dim is two ``tl.dot``
(K split: ``a0 @ b0 + a1 @ b1``; N split: two accumulators).

Vectorised loads. Triton proves 16-byte alignment of a row only if every stride it multiplies is a known
multiple of 16 bytes; integer arguments are only specialised as "divisible by 16 elements", so a head stride
of 72 elements (144 bytes) leaves the loads scalar. Launchers therefore pass row strides divided by ``VEC``
(elements per 16 bytes) and the kernels multiply by the constexpr ``VEC`` again: the alignment becomes
visible to the compiler. :func:`vec_for` returns 1 (no claim, always correct) when a stride or a base pointer
is not a multiple of 16 bytes or the head dim is not contiguous.
"""

from __future__ import annotations

import torch

from ._common import pow2, tl, triton


def head_split(D: int) -> tuple[int, int]:
    """(D0, D1): power-of-two main part and tail (0: none) covering head dim D with the least padding."""
    if D <= 16:
        return 16, 0
    d0 = 1 << (int(D).bit_length() - 1)
    rest = D - d0
    return d0, (0 if rest == 0 else max(16, pow2(rest)))


def padded_head(D: int) -> int:
    d0, d1 = head_split(D)
    return d0 + d1


def vec_for(tensors: list[torch.Tensor], D: int) -> int:
    """Elements per 16 bytes when, in every tensor, the last stride (head dim / channel) is 1 and every other
    stride and the base pointer are multiples of 16 bytes, and the head dim D keeps head offsets h * D
    aligned too; else 1 (no alignment claim: always correct, scalar loads)."""
    esize = tensors[0].element_size()
    vec = max(1, 16 // esize)
    if D % vec or any(t.element_size() != esize for t in tensors):
        return 1
    if any(t.stride()[-1] != 1 or any(int(s) % vec for s in t.stride()[:-1]) for t in tensors):
        return 1
    if any(t.device.type != "meta" and t.data_ptr() % 16 for t in tensors):
        return 1
    return vec


def div_rows(t: torch.Tensor, vec: int) -> tuple[int, ...]:
    """t's strides with the row strides divided by vec (exact: vec_for checked them), the last one kept."""
    st = t.stride()
    return tuple(s // vec for s in st[:-1]) + (st[-1],)


@triton.jit
def mm(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b with an fp32 accumulator; fp32 operands use exact IEEE fp32 products (never TF32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_head(base, rows, row_ok, s_d, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """Rows of one head: ``rows`` int64 [R] element offsets of each row's d = 0 element from ``base``.
    Returns (t0 [R, D0], t1 [R, D1]); t1 is t0 when there is no tail (D1 = 0). Padding columns read 0."""
    d0 = tl.arange(0, D0)
    t0 = tl.load(base + rows[:, None] + (d0 * s_d)[None, :], mask=row_ok[:, None] & (d0 < HEAD_DIM)[None, :],
                 other=0.0)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        t1 = tl.load(base + rows[:, None] + (d1 * s_d)[None, :], mask=row_ok[:, None] & (d1 < HEAD_DIM)[None, :],
                     other=0.0)
    else:
        t1 = t0
    return t0, t1


@triton.jit
def store_head(base, rows, row_ok, s_d, t0, t1, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """Store the two parts of a head tile (see :func:`load_head`), cast to the destination's dtype."""
    d0 = tl.arange(0, D0)
    ty = base.dtype.element_ty
    tl.store(base + rows[:, None] + (d0 * s_d)[None, :], t0.to(ty), mask=row_ok[:, None] & (d0 < HEAD_DIM)[None, :])
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        tl.store(base + rows[:, None] + (d1 * s_d)[None, :], t1.to(ty),
                 mask=row_ok[:, None] & (d1 < HEAD_DIM)[None, :])


@triton.jit
def dot_heads(a0, a1, b0, b1, D1: tl.constexpr, DOT_FP32: tl.constexpr):
    """a @ b^T over the split head dim: a0 @ b0^T + a1 @ b1^T ([Ra, Rb] fp32)."""
    s = mm(a0, tl.trans(b0), tl.zeros([a0.shape[0], b0.shape[0]], tl.float32), DOT_FP32)
    if D1 > 0:
        s = mm(a1, tl.trans(b1), s, DOT_FP32)
    return s


@triton.jit
def row_dot(a0, a1, b0, b1, D1: tl.constexpr):
    """Row-wise sum over the split head dim of a * b in fp32: [R]."""
    r = tl.sum(a0.to(tl.float32) * b0.to(tl.float32), 1)
    if D1 > 0:
        r += tl.sum(a1.to(tl.float32) * b1.to(tl.float32), 1)
    return r
