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


# ----------------------------------------------------------------------------------------------------------
# One-pass attention backwards (mgkernels.st_attention, mgkernels.gated_cross_attn): the queries of a sequence
# are cut into splits of SPLIT_ROWS; the dS of a split lives in L2 from its key blocks' pass to its dQ (256 rows
# x 64 keys x 2 bytes per program: ~13 MB for the ~400 programs an H100 / H200 holds at once, well inside its
# 50 MB L2). One launch allocates at most SCRATCH_BYTES of dS (larger problems run as several launches).
# ----------------------------------------------------------------------------------------------------------

SPLIT_ROWS = 256
SCRATCH_BYTES = 1 << 29
MAXNREG = 168  # registers per thread of the backward kernels: 3 CTAs of 4 warps per SM (ptxas fits them spill-free)


def split_rows(L: int, block: int, rows: int | None = None) -> int:
    """Query rows of one split: a multiple of ``block``, at most ``rows`` (default SPLIT_ROWS) and no more than
    the L queries need."""
    return max(block, min(rows or SPLIT_ROWS, -(-L // block) * block) // block * block)


# ----------------------------------------------------------------------------------------------------------
# Cross-program hand-offs of the one-pass attention backwards (see mgkernels.st_attention): a program publishes
# its stores with ``arrive`` and the last of ``n`` arrivals continues with everything the others stored; scratch
# that is dead after it is read is dropped from L2 with ``discard_l2`` (never written back to DRAM).
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def arrive(CNT, n):
    """True in the last of the n programs that arrive at counter CNT (int32, starting at 0). Every thread's
    earlier stores are visible to that program's later (L1-bypassing: ``cache_modifier=".cg"``) loads: CTA
    barrier + acq_rel atomic (one thread) + CTA barrier."""
    tl.debug_barrier()
    last = tl.atomic_add(CNT, 1, sem="acq_rel") == n - 1
    tl.debug_barrier()
    return last


@triton.jit
def discard_l2(lines):
    """Drop the 128-byte L2 lines that start at the pointers ``lines`` (any shape, 128-byte aligned) without
    writing them back: their contents become undefined. Callers place a CTA barrier before it (every thread's
    loads of the lines done). GPU only (inline PTX; the CPU interpreter has no L2)."""
    tl.inline_asm_elementwise("discard.global.L2 [$1], 128;\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def row_lines(base, R: tl.constexpr, C: tl.constexpr, stride):
    """Pointers to the 128-byte lines of an [R, C] tile at ``base`` with row stride ``stride`` elements (rows of
    C elements starting on 128-byte boundaries; C times the element size a multiple of 128 bytes)."""
    per: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth  # elements per line
    return (base + tl.arange(0, R).to(tl.int64)[:, None] * stride + (tl.arange(0, C // per) * per)[None, :])


@triton.jit
def _tile_lines(base, NBYTES: tl.constexpr):
    """Pointers to the 128-byte lines of NBYTES contiguous bytes at ``base`` (NBYTES / 128 a power of two)."""
    return base + tl.arange(0, NBYTES // 128).to(tl.int64) * (1024 // base.dtype.element_ty.primitive_bitwidth)


@triton.jit
def split_open(ACC, CNT, R: tl.constexpr, D0: tl.constexpr, DA: tl.constexpr):
    """Start of a program whose dK / dV are partial (its keys' queries are split over several programs): the
    first of them to arrive zero-fills the group's fp32 accumulators ``ACC`` (dk0 [R, D0], dk1 [R, DA], dv0,
    dv1, contiguous) and raises the flag. ``CNT``: the group's 3 int32 counters (ticket, flag, done)."""
    if tl.atomic_add(CNT, 1, sem="relaxed") == 0:
        r = tl.arange(0, R)
        t0 = r[:, None] * D0 + tl.arange(0, D0)[None, :]
        t1 = R * D0 + r[:, None] * DA + tl.arange(0, DA)[None, :]
        tl.store(ACC + t0, tl.zeros([R, D0], tl.float32))
        tl.store(ACC + t1, tl.zeros([R, DA], tl.float32))
        tl.store(ACC + R * (D0 + DA) + t0, tl.zeros([R, D0], tl.float32))
        tl.store(ACC + R * (D0 + DA) + t1, tl.zeros([R, DA], tl.float32))
        tl.debug_barrier()
        tl.atomic_xchg(CNT + 1, 1, sem="release")


@triton.jit
def split_close(ACC, CNT, n, dk0, dk1, dv0, dv1, D1: tl.constexpr, DISCARD: tl.constexpr):
    """End of such a program: add its partial dK / dV to the accumulators (fp32 atomics, in L2) once they are
    zero (the flag: set by a running program, so this never waits for one that has not started); the last of
    the n programs gets the sums and True (and drops the accumulators from L2), the others False."""
    R: tl.constexpr = dk0.shape[0]
    D0: tl.constexpr = dk0.shape[1]
    DA: tl.constexpr = dk1.shape[1]
    r = tl.arange(0, R)
    t0 = r[:, None] * D0 + tl.arange(0, D0)[None, :]
    t1 = R * D0 + r[:, None] * DA + tl.arange(0, DA)[None, :]
    ready = tl.atomic_add(CNT + 1, 0, sem="acquire")
    while ready == 0:
        ready = tl.atomic_add(CNT + 1, 0, sem="acquire")
    tl.debug_barrier()
    tl.atomic_add(ACC + t0, dk0, sem="relaxed")
    tl.atomic_add(ACC + R * (D0 + DA) + t0, dv0, sem="relaxed")
    if D1 > 0:
        tl.atomic_add(ACC + t1, dk1, sem="relaxed")
        tl.atomic_add(ACC + R * (D0 + DA) + t1, dv1, sem="relaxed")
    last = arrive(CNT + 2, n)
    if last:
        dk0 = tl.load(ACC + t0, cache_modifier=".cg")
        dv0 = tl.load(ACC + R * (D0 + DA) + t0, cache_modifier=".cg")
        if D1 > 0:
            dk1 = tl.load(ACC + t1, cache_modifier=".cg")
            dv1 = tl.load(ACC + R * (D0 + DA) + t1, cache_modifier=".cg")
        if DISCARD:
            tl.debug_barrier()
            discard_l2(_tile_lines(ACC, R * D0 * 4))
            discard_l2(_tile_lines(ACC + R * D0, R * DA * 4))
            discard_l2(_tile_lines(ACC + R * (D0 + DA), R * D0 * 4))
            discard_l2(_tile_lines(ACC + R * (2 * D0 + DA), R * DA * 4))
    return dk0, dk1, dv0, dv1, last
