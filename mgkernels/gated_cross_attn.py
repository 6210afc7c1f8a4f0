"""Gated tanh cross-attention with the residual fused into the epilogue (ModelGrow's LLM cross-attention).

    out = x + tanh(lam) * softmax(q k^T / sqrt(D) + mask) v            (per batch b, head h)

Shapes (B batch, N query tokens, L key tokens, H heads, D head dim):

* ``q``: ``[B, N, H, D]`` -- queries (video tokens).
* ``k``, ``v``: ``[B, L, H, D]`` -- keys / values (the text condition); ``L >= 1``.
* ``x``: the residual, ``[B, N, H, D]`` or ``[B, N, H*D]``; ``out`` has ``x``'s shape and dtype.
* ``lam``: the gate parameter, shape ``[]`` or ``[1]`` (one gate for every head) or ``[H]`` (one per head);
  the gate is ``tanh(lam)``, so ``lam = 0`` gives ``out == x`` exactly.
* ``mask``: optional key-padding mask ``[B, L]`` (bool, or any dtype where non-zero means "real token").
  ``True`` keys are attended to; the valid keys need not be a prefix. A sample whose mask is all ``False``
  attends to nothing: its attention output is 0 and ``out = x`` (never NaN). ``None``: every key is valid.

``q``, ``k``, ``v`` share one floating dtype (fp32 / fp16 / bf16); any strides are accepted (they are read
from the tensors, nothing is copied). Softmax statistics and all accumulation are fp32.

Gradients: ``dx = dout``; with ``g = tanh(lam)`` the attention sees ``g * dout`` (flash-attention backward
with the fp32 log-sum-exp saved by the forward); ``dlam = (1 - g^2) * sum(dout * o)`` summed over
everything (scalar ``lam``) or per head (``[H]`` ``lam``), where ``o`` is the un-gated attention output, which
the forward writes as a second output only when a gradient is needed (it cannot be recovered from ``out``
when ``g = 0``). The backward is one kernel, the one-pass scheme of :mod:`mgkernels.st_attention`: a program
per (b, h, split of 256 queries, key block) keeps dK, dV in registers over its queries, stores dS, and the
split's last key block computes dQ = dS K; dK / dV of the 16 splits of N = 4096 queries are summed with fp32
atomics in L2 (the first split to arrive zero-fills the accumulator; the last writes dk, dv).

The plain cross-attention ``cross_attn(q, k, v, mask) = softmax(q k^T / sqrt(D) + mask) v`` runs the same
kernels without gate and residual (``GATED=False``); it is what STDiT's T5 and LLM cross-attention call
(their output projection sits between the attention and any gate, so the model fuses the gate, the residual
and the next LayerNorm + modulation in :mod:`mgkernels.residual_modulate` instead).

Kernels: flash-attention-2 forward, one-pass backward, head dim split 64 + 16 for D = 72 and 16-byte-aligned
strides (see :mod:`mgkernels._tiles`), 1-D grids. In the sm_90 compile report (``bench/results/sm90-aot``) every
fp16 / bf16 kernel is spill-free, on HGMMA, with 128-bit loads of q/k/v/o; the fp32 forward no longer spills.

Layout of this file (one op per file): reference -> Triton kernels -> launchers -> ``torch.library`` custom
ops (``mgkernels::gated_cross_attn_fwd`` / ``_bwd`` and ``mgkernels::cross_attn_fwd`` / ``_bwd``, provider
chosen at run time by :func:`mgkernels.dispatch.choose`) -> ``torch.autograd.Function`` ->
:func:`gated_cross_attn` / :func:`cross_attn`. On an fp32 CPU tensor ``cross_attn`` has a ``csrc`` provider
too: the C++ short-sequence attention of :mod:`mgkernels._cpu_attention` (``gated_cross_attn`` has none).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu_attention
from ._common import compute_dtype, providers_for, tl, triton
from ._tiles import (
    MAXNREG,
    SCRATCH_BYTES,
    arrive,
    discard_l2,
    div_rows,
    dot_heads,
    head_split,
    load_head,
    mm,
    row_dot,
    row_lines,
    split_close,
    split_open,
    split_rows,
    store_head,
    vec_for,
)
from .dispatch import attention_route, choose, eager_ref, interpreter_enabled, traced_ref

__all__ = ["cross_attn", "gated_cross_attn", "gated_cross_attn_ref"]

_OP = "gated_cross_attn"
_MAX_D = 256  # largest head dim the Triton kernels take (BLOCK_D = 256); larger uses the reference


# ----------------------------------------------------------------------------------------------------------
# Reference (PyTorch): the fallback provider, the benchmark baseline, what torch.compile(ref) compiles.
# ----------------------------------------------------------------------------------------------------------

def _gate(lam: Tensor, H: int) -> Tensor:
    """tanh(lam) as ``[H]`` in fp32 (fp64 for an fp64 lam); a scalar lam is broadcast to every head."""
    return torch.tanh(lam.to(compute_dtype(lam.dtype))).reshape(-1).expand(H)


def _ref_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Un-gated ``softmax(q k^T / sqrt(D) + mask) v`` as ``[B, N, H, D]`` in q's dtype; empty mask rows -> 0."""
    attn_mask, has_any = None, None
    if mask is not None:
        valid = mask if mask.dtype == torch.bool else mask != 0
        has_any = valid.any(dim=-1)  # [B]
        # An all-False row would make SDPA produce NaN: let it attend everywhere, then zero it.
        attn_mask = (valid | ~has_any[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    o = o.transpose(1, 2)
    if has_any is not None:
        o = o * has_any[:, None, None, None].to(o.dtype)
    return o


def gated_cross_attn_ref(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
                         mask: Tensor | None = None) -> Tensor:
    """Pure PyTorch ``x + tanh(lam) * SDPA(q, k, v, mask)`` (same shapes and broadcast rules as the op)."""
    B, N, H, D = q.shape
    o = _ref_attention(q, k, v, mask)
    g = torch.tanh(lam).reshape(-1).to(o.dtype)
    g = g.view(1, 1, -1, 1) if g.numel() == H and H != 1 else g.reshape(())
    return x + (g * o).reshape(x.shape).to(x.dtype)


def _ref_lse(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """fp32 log-sum-exp of the scaled, masked scores, ``[B, H, N]``; ``+inf`` for rows with no valid key."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bnhd,blhd->bhnl", q.float(), k.float()) * scale
    if mask is not None:
        valid = mask if mask.dtype == torch.bool else mask != 0
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. 1-D grids, the query / key block index fastest (the programs sharing one (b, h)'s K / V run
# side by side). Head dim split D0 + D1 and row strides divided by VEC as in mgkernels._tiles. Scores are kept
# in base-2 units (qk_scale = log2(e) / sqrt(D)) so the softmax uses exp2; LSE is stored in natural-log units,
# +inf for a row with no valid key (so exp2(s - lse) = 0 in the backward). GATED=False computes the plain
# cross-attention o (STDiT's T5 and LLM cross-attention, whose output projection comes before any gate).
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _gca_fwd_kernel(
    Q, K, V, X, G, MASK, KV_END, OUT, OATT, LSE,
    sqb, sqn, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    sxb, sxn, sxh, sxd,
    smb, sml,
    sob, son, soh, sod,
    s_ob, s_on, s_oh, s_od,
    slb, slh, sln,
    H, N, L, NM, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1A: tl.constexpr, VEC: tl.constexpr,
    HAS_MASK: tl.constexpr, GATED: tl.constexpr, SAVE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % NM
    h = pid // NM % H
    b = pid // NM // H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_ok = offs_m < N
    q0, q1 = load_head(Q + b * (sqb * VEC) + h * (sqh * VEC), offs_m * (sqn * VEC), m_ok, sqd, HEAD_DIM, D0, D1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1A], dtype=tl.float32)
    k_base = K + b * (skb * VEC) + h * (skh * VEC)
    v_base = V + b * (svb * VEC) + h * (svh * VEC)
    kv_end = L
    if HAS_MASK:  # keys after the sample's last valid one are never visited
        kv_end = tl.load(KV_END + b)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        keep = offs_n < L
        if HAS_MASK:
            keep = keep & (tl.load(MASK + b * smb + offs_n * sml, mask=keep, other=0) != 0)
        k0, k1 = load_head(k_base, offs_n * (skl * VEC), keep, skd, HEAD_DIM, D0, D1)
        s = dot_heads(q0, q1, k0, k1, D1, DOT_FP32) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 units
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid (-inf) - (-inf)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0, v1 = load_head(v_base, offs_n * (svl * VEC), keep, svd, HEAD_DIM, D0, D1)
        acc0 = mm(p.to(v0.dtype), v0, acc0 * alpha[:, None], DOT_FP32)
        if D1 > 0:
            acc1 = mm(p.to(v1.dtype), v1, acc1 * alpha[:, None], DOT_FP32)
        m_i = m_new

    has = l_i > 0.0
    inv = (1.0 / tl.where(has, l_i, 1.0))[:, None]  # rows with no valid key: acc = 0 -> o = 0
    o0 = acc0 * inv
    o1 = acc1 * inv
    out_rows = offs_m * (son * VEC)
    out_base = OUT + b * (sob * VEC) + h * (soh * VEC)
    if GATED:
        g = tl.load(G + h).to(tl.float32)
        x0, x1 = load_head(X + b * (sxb * VEC) + h * (sxh * VEC), offs_m * (sxn * VEC), m_ok, sxd, HEAD_DIM, D0, D1)
        store_head(out_base, out_rows, m_ok, sod, x0.to(tl.float32) + g * o0, x1.to(tl.float32) + g * o1,
                   HEAD_DIM, D0, D1)
        if SAVE:
            store_head(OATT + b * (s_ob * VEC) + h * (s_oh * VEC), offs_m * (s_on * VEC), m_ok, s_od, o0, o1,
                       HEAD_DIM, D0, D1)
    else:
        store_head(out_base, out_rows, m_ok, sod, o0, o1, HEAD_DIM, D0, D1)
    if SAVE:
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
        tl.store(LSE + b * slb + h * slh + offs_m * sln, lse, mask=m_ok)


@triton.jit
def _gca_bwd_kernel(
    Q, K, V, DOUT, OATT, G, MASK, KV_END, LSE, DOT, DQ, DK, DV, DS, CNT, KCNT, DKV,
    sqb, sqn, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    sdb, sdn, sdh, sdd,
    s_ob, s_on, s_oh, s_od,
    smb, sml,
    slb, slh, sln,
    stb, sth, stn,
    sdqb, sdqn, sdqh, sdqd,
    sdkb, sdkl, sdkh, sdkd,
    sdvb, sdvl, sdvh, sdvd,
    H, N, L, NN, NQS, SEQ0, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1A: tl.constexpr, VEC: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr, CQ: tl.constexpr, LK: tl.constexpr, SPLIT: tl.constexpr, DISCARD: tl.constexpr,
):
    """One-pass backward (see mgkernels.st_attention): program (b, h, query split, key block), the key block
    fastest. Pass A: dK, dV of the key block over the split's queries (delta = g * rowsum(dout * o) on the way,
    stored for dlam by key block 0), dS^T of every query block stored; dK / dV summed over the query splits in
    L2 (split_open / split_close) when there are several; the last of the split's key blocks computes
    dQ = dS K from all of them."""
    pid = tl.program_id(0).to(tl.int64)
    kb = pid % NN
    qs = pid // NN % NQS
    lbh = pid // NN // NQS  # (b, h) pair of this launch
    bh = SEQ0 + lbh
    h = bh % H
    b = bh // H

    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = offs_n < L
    keep = n_ok
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * smb + offs_n * sml, mask=n_ok, other=0) != 0)
    k_base = K + b * (skb * VEC) + h * (skh * VEC)
    k0, k1 = load_head(k_base, offs_n * (skl * VEC), keep, skd, HEAD_DIM, D0, D1)
    v0, v1 = load_head(V + b * (svb * VEC) + h * (svh * VEC), offs_n * (svl * VEC), keep, svd, HEAD_DIM, D0, D1)
    g = tl.load(G + h).to(tl.float32)
    q_base = Q + b * (sqb * VEC) + h * (sqh * VEC)
    do_base = DOUT + b * (sdb * VEC) + h * (sdh * VEC)
    o_base = OATT + b * (s_ob * VEC) + h * (s_oh * VEC)
    ds_base = DS + (lbh * NQS + qs) * (CQ * LK)  # dS of this split: [CQ query rows, LK key columns]
    kv_acc = DKV + (lbh * NN + kb) * (2 * BLOCK_N * (D0 + D1A))
    if SPLIT:
        split_open(kv_acc, KCNT + 3 * (lbh * NN + kb), BLOCK_N, D0, D1A)
    m0 = qs * CQ  # the split's first query
    NR = (N - m0).to(tl.int32)  # queries from it on (masks: keeps N's divisibility by 16)
    NM = tl.where(qs < NQS - 1, CQ, NR)  # the split's queries
    kv_end = L
    if HAS_MASK:  # keys after the sample's last valid one are never visited (their dK = dV = 0, dS unused)
        kv_end = tl.load(KV_END + b)
    m_end = tl.where(kb * BLOCK_N < kv_end, NM, 0)

    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1A], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)  # un-gated: sum p^T dout (times g at the end)
    dv1 = tl.zeros([BLOCK_N, D1A], dtype=tl.float32)
    for start_m in range(0, m_end, BLOCK_M):
        i = start_m + tl.arange(0, BLOCK_M)
        m_ok = i < NR
        offs_m = m0 + i.to(tl.int64)
        q0, q1 = load_head(q_base, offs_m * (sqn * VEC), m_ok, sqd, HEAD_DIM, D0, D1)
        do0, do1 = load_head(do_base, offs_m * (sdn * VEC), m_ok, sdd, HEAD_DIM, D0, D1)
        o0, o1 = load_head(o_base, offs_m * (s_on * VEC), m_ok, s_od, HEAD_DIM, D0, D1)
        dot = row_dot(do0, do1, o0, o1, D1)  # un-gated: delta = g * dot, dlam = (1 - g^2) * sum dot
        tl.store(DOT + b * stb + h * sth + offs_m * stn, dot, mask=m_ok & (kb == 0))
        lse = tl.load(LSE + b * slb + h * slh + offs_m * sln, mask=m_ok, other=float("inf"))
        st = dot_heads(k0, k1, q0, q1, D1, DOT_FP32) * qk_scale - (lse * 1.4426950408889634)[None, :]
        pt = tl.math.exp2(tl.where(keep[:, None], st, float("-inf")))  # [BLOCK_N, BLOCK_M]; masked keys: 0
        dv0 = mm(pt.to(do0.dtype), do0, dv0, DOT_FP32)
        if D1 > 0:
            dv1 = mm(pt.to(do1.dtype), do1, dv1, DOT_FP32)
        dst = (pt * (dot_heads(v0, v1, do0, do1, D1, DOT_FP32) * g - (g * dot)[None, :])).to(q0.dtype)
        dk0 = mm(dst, q0, dk0, DOT_FP32)
        if D1 > 0:
            dk1 = mm(dst, q1, dk1, DOT_FP32)
        tl.store(ds_base + i[None, :] * LK + offs_n[:, None], dst)  # padding rows, masked / padding keys: 0

    write = True
    if SPLIT:
        dk0, dk1, dv0, dv1, write = split_close(kv_acc, KCNT + 3 * (lbh * NN + kb), NQS, dk0, dk1, dv0, dv1, D1,
                                                DISCARD)
    # masked keys get an exact 0
    store_head(DK + b * (sdkb * VEC) + h * (sdkh * VEC), offs_n * (sdkl * VEC), n_ok & write, sdkd, dk0 * sm_scale,
               dk1 * sm_scale, HEAD_DIM, D0, D1)
    store_head(DV + b * (sdvb * VEC) + h * (sdvh * VEC), offs_n * (sdvl * VEC), n_ok & write, sdvd, dv0 * g, dv1 * g,
               HEAD_DIM, D0, D1)

    # dQ: the last of the split's NN programs computes dQ = dS K over the keys up to kv_end
    if arrive(CNT + lbh * NQS + qs, NN):
        for start_q in range(0, NM, BLOCK_Q):
            iq = start_q + tl.arange(0, BLOCK_Q)
            q_ok = iq < NR
            dq0 = tl.zeros([BLOCK_Q, D0], dtype=tl.float32)
            dq1 = tl.zeros([BLOCK_Q, D1A], dtype=tl.float32)
            for start_n in range(0, kv_end, BLOCK_N):
                jn = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
                kn0, kn1 = load_head(k_base, jn * (skl * VEC), jn < L, skd, HEAD_DIM, D0, D1)
                ds = tl.load(ds_base + iq[:, None] * LK + jn[None, :], mask=q_ok[:, None], other=0.0,
                             cache_modifier=".cg")
                dq0 = mm(ds, kn0, dq0, DOT_FP32)
                if D1 > 0:
                    dq1 = mm(ds, kn1, dq1, DOT_FP32)
            store_head(DQ + b * (sdqb * VEC) + h * (sdqh * VEC), (m0 + iq.to(tl.int64)) * (sdqn * VEC), q_ok, sdqd,
                       dq0 * sm_scale, dq1 * sm_scale, HEAD_DIM, D0, D1)
        if DISCARD:  # the split's dS is dead: drop it from L2
            tl.debug_barrier()
            for start_q in range(0, NM, BLOCK_Q):
                for start_n in range(0, kv_end, BLOCK_N):
                    discard_l2(row_lines(ds_base + start_q * LK + start_n, BLOCK_Q, BLOCK_N, LK))


# ----------------------------------------------------------------------------------------------------------
# Launchers: allocate outputs, pick tiles (the same on the GPU and under the CPU interpreter, so the tests run
# what the GPU runs; each checked in the sm_90 compile report: no spills, 128-bit loads, HGMMA for fp16 /
# bf16), launch.
# ----------------------------------------------------------------------------------------------------------

# "tc": fp16 / bf16 on tensor cores, "fp32": exact IEEE fp32. Forward: (BLOCK_M, BLOCK_N, warps, stages);
# backward: (BLOCK_M, BLOCK_N, BLOCK_Q, warps, stages) -- pass A's query block x key block, dQ's query block.
_TILES = {
    "tc": dict(fwd=(64, 32, 4, 3), bwd=(16, 64, 64, 4, 1)),
    "fp32": dict(fwd=(32, 32, 4, 2), bwd=(16, 32, 32, 4, 1)),
}


def _tiles(kernel: str, dtype: torch.dtype, block_m: int | None, block_n: int | None) -> dict:
    bm, bn, *bq, warps, stages = _TILES["fp32" if dtype == torch.float32 else "tc"][kernel]
    cfg = dict(BLOCK_M=block_m or bm, BLOCK_N=block_n or bn, **({"BLOCK_Q": bq[0]} if bq else {}))
    if not interpreter_enabled():  # launch options the interpreter has no use for
        cfg.update(num_warps=warps, num_stages=stages)
    return cfg


def _heads(D: int, dtype: torch.dtype, tensors: list[Tensor]) -> dict:
    D0, D1 = head_split(D)
    vec = vec_for(tensors, D)
    return dict(HEAD_DIM=D, D0=D0, D1=D1, D1A=D1 or 16, VEC=vec, DOT_FP32=_dot_f32(dtype))


def _mask_arg(mask: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """(mask as uint8 [B, L], kv_end int32 [B] = 1 + index of the sample's last valid key (0: none), strides)."""
    if mask is None:
        return like, like, 0, 0  # never read (HAS_MASK=False)
    m = mask if mask.dtype == torch.bool else mask != 0
    pos = torch.arange(1, m.shape[1] + 1, device=m.device, dtype=torch.int32)
    kv_end = torch.where(m, pos, 0).amax(dim=1).to(torch.int32).contiguous()  # [B], tiny
    m = m.view(torch.uint8)  # [B, L] bytes
    return m, kv_end, m.stride(0), m.stride(1)


def _dot_f32(dtype: torch.dtype) -> bool:
    # fp32 tiles: exact IEEE products (TF32 would miss the fp32 tolerance). The interpreter cannot do bf16 /
    # fp16 arithmetic reliably (it holds bf16 as uint16): upcast tiles before tl.dot there. On the GPU fp16 /
    # bf16 tiles feed the tensor cores directly.
    return dtype == torch.float32 or interpreter_enabled()


def _triton_fwd(x: Tensor | None, q: Tensor, k: Tensor, v: Tensor, lam: Tensor | None, mask: Tensor | None,
                save: bool, block_m: int | None = None,
                block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gated (``lam`` given): (out = x + tanh(lam) o, o if save, lse if save). Plain (``lam is None``, x
    ignored): (o, empty, lse if save)."""
    B, N, H, D = q.shape
    L = k.shape[1]
    gated = lam is not None
    if gated:
        x4 = x.unflatten(-1, (H, D)) if x.dim() == 3 else x
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        out4 = out.unflatten(-1, (H, D)) if out.dim() == 3 else out
    else:
        out = out4 = x4 = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype)
    o = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype) if save and gated else q.new_empty(0)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if save else q.new_empty(0, dtype=torch.float32)
    if out.numel() == 0:
        return out, o, lse
    g = _gate(lam, H).float().contiguous() if gated else lse
    m, kv_end, smb, sml = _mask_arg(mask, q)
    o_t = o if save and gated else out4  # placeholder pointer when there is no separate o to save
    heads = _heads(D, q.dtype, [q, k, v, x4, out4, o_t])  # VEC = 1 unless all share one element size
    vec = heads["VEC"]
    l_st = lse.stride() if save else (0, 0, 0)
    cfg = _tiles("fwd", q.dtype, block_m, block_n)
    nm = triton.cdiv(N, cfg["BLOCK_M"])
    _gca_fwd_kernel[(B * H * nm,)](
        q, k, v, x4, g, m, kv_end, out4, o_t, lse if save else g,
        *div_rows(q, vec), *div_rows(k, vec), *div_rows(v, vec), *div_rows(x4, vec), smb, sml, *div_rows(out4, vec), *div_rows(o_t, vec),
        *l_st, H, N, L, nm, math.log2(math.e) / math.sqrt(D),
        HAS_MASK=mask is not None, GATED=gated, SAVE=save, **heads, **cfg,
    )  # fmt: skip
    return out, o, lse


def _triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor | None, mask: Tensor | None, o: Tensor,
                lse: Tensor, block_m: int | None = None, block_n: int | None = None,
                rows_per_split: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dlam) from dout (gated: d out; plain, ``lam is None``: d o, and dlam is None). One kernel
    (``_gca_bwd_kernel``), launched once per group of (b, h) pairs whose dS scratch fits SCRATCH_BYTES."""
    B, N, H, D = q.shape
    L = k.shape[1]
    d4 = dout.unflatten(-1, (H, D)) if dout.dim() == 3 else dout
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    g = _gate(lam, H).float().contiguous() if lam is not None else torch.ones(H, device=q.device)
    dot = torch.zeros((B, H, N), device=q.device, dtype=torch.float32)
    if dq.numel() and dk.numel():
        m, kv_end, smb, sml = _mask_arg(mask, q)
        scale = 1.0 / math.sqrt(D)
        heads = _heads(D, q.dtype, [q, k, v, o, dq, dk, dv, d4])
        vec = heads["VEC"]
        cfg = _tiles("bwd", q.dtype, block_m, block_n)
        bm, bn, bq = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_Q"]
        nn_ = triton.cdiv(L, bn)
        cq = split_rows(N, max(bm, bq), rows_per_split)
        nqs = triton.cdiv(N, cq)
        split = nqs > 1
        pairs = B * H
        chunk = max(1, min(pairs, SCRATCH_BYTES // (nqs * cq * nn_ * bn * q.element_size())))  # (b, h) per launch
        ds = torch.empty(chunk * nqs * cq * nn_ * bn, device=q.device, dtype=q.dtype)
        dkv = torch.empty(chunk * nn_ * 2 * bn * (heads["D0"] + heads["D1A"]) if split else 1, device=q.device,
                          dtype=torch.float32)
        strides = (*div_rows(q, vec), *div_rows(k, vec), *div_rows(v, vec), *div_rows(d4, vec), *div_rows(o, vec),
                   smb, sml, *lse.stride(), *dot.stride(), *div_rows(dq, vec), *div_rows(dk, vec), *div_rows(dv, vec))
        discard = not interpreter_enabled() and bn * q.element_size() % 128 == 0  # whole 128-byte lines
        regs = {} if interpreter_enabled() or q.dtype == torch.float32 else {"maxnreg": MAXNREG}  # 3 CTAs/SM
        for seq0 in range(0, pairs, chunk):
            n = min(chunk, pairs - seq0)
            cnt = torch.zeros(n * nqs + (3 * n * nn_ if split else 0), device=q.device, dtype=torch.int32)
            _gca_bwd_kernel[(n * nqs * nn_,)](
                q, k, v, d4, o, g, m, kv_end, lse, dot, dq, dk, dv, ds, cnt, cnt[n * nqs:] if split else cnt, dkv,
                *strides, H, N, L, nn_, nqs, seq0, scale * math.log2(math.e), scale,
                HAS_MASK=mask is not None, CQ=cq, LK=nn_ * bn, SPLIT=split, DISCARD=discard,
                **heads, **cfg, **regs,
            )  # fmt: skip
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    dlam = _dlam_from_dot(dot.sum(dim=(0, 2)), lam, H) if lam is not None else None
    return dq, dk, dv, dlam


def _dlam_from_dot(dot_h: Tensor, lam: Tensor, H: int) -> Tensor:
    """dlam = (1 - g^2) * sum(dout * o): per head ``[H]``, summed for a scalar lam; lam's shape and dtype."""
    g = _gate(lam, H)
    d = (1.0 - g * g) * dot_h
    if lam.numel() == 1:
        d = d.sum()
    return d.reshape(lam.shape).to(lam.dtype)


# ----------------------------------------------------------------------------------------------------------
# Reference provider for the custom ops (same outputs as the Triton launchers).
# ----------------------------------------------------------------------------------------------------------

def _ref_fwd(x, q, k, v, lam, mask, save):
    B, N, H, D = q.shape
    o = _ref_attention(q, k, v, mask)
    ct = compute_dtype(x.dtype)
    g = _gate(lam, H).to(ct).view(1, 1, H, 1)
    out = (x.unflatten(-1, (H, D)) if x.dim() == 3 else x).to(ct) + g * o.to(ct)
    out = out.reshape(x.shape).to(x.dtype).contiguous()
    if not save:
        return out, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return out, o.contiguous(), _ref_lse(q, k, mask)


def _ref_bwd(dout, q, k, v, lam, mask, o):
    """Explicit attention backward in PyTorch (fp32, or fp64 for fp64 inputs); no autograd, no Triton.
    (Autograd cannot be used here: a custom op's body runs below the autograd dispatch key.) ``lam=None``:
    the plain cross-attention (gate 1, no dlam)."""
    B, N, H, D = q.shape
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    d4 = (dout.unflatten(-1, (H, D)) if dout.dim() == 3 else dout).to(ct)
    oc = o.to(ct)
    g = (_gate(lam, H).to(ct) if lam is not None else torch.ones(H, dtype=ct, device=q.device)).view(1, 1, H, 1)
    s = torch.einsum("bnhd,blhd->bhnl", qc, kc) * scale
    has_any = None
    if mask is not None:
        valid = mask if mask.dtype == torch.bool else mask != 0
        has_any = valid.any(dim=-1)
        s = s.masked_fill(~(valid | ~has_any[:, None])[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if has_any is not None:
        p = p * has_any[:, None, None, None].to(ct)  # a sample with no valid key: p = 0
    do = g * d4  # d(attn)
    dot = (d4 * oc).sum(dim=-1)  # [B, N, H], un-gated
    dv = torch.einsum("bhnl,bnhd->blhd", p, do)
    dp = torch.einsum("bnhd,blhd->bhnl", do, vc)
    ds = p * (dp - (g.view(1, 1, H) * dot).permute(0, 2, 1)[..., None])
    dq = torch.einsum("bhnl,blhd->bnhd", ds, kc) * scale
    dk = torch.einsum("bhnl,bnhd->blhd", ds, qc) * scale
    dlam = _dlam_from_dot(dot.sum(dim=(0, 1)), lam, H) if lam is not None else None
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dlam)


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile; the provider is chosen inside, at run time).
# ----------------------------------------------------------------------------------------------------------

def _provider(q: Tensor, op: str = _OP) -> str:
    """Triton for fp32 / fp16 / bf16 and head dims up to _MAX_D (where asked / on CUDA); for the plain
    cross-attention on an fp32 CPU tensor the C++ kernel when it is built; else the reference."""
    implemented = ("triton", "ref") if q.shape[-1] <= _MAX_D else ("ref",)
    if op == "cross_attn" and _cpu_attention.usable(q):
        implemented = ("csrc", *implemented)
    return choose(op, q, providers_for(q, implemented), csrc_fn="attention_fwd")


@torch.library.custom_op("mgkernels::gated_cross_attn_fwd", mutates_args=())
def gated_cross_attn_fwd(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None,
                         save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, o, lse): out like x; o ``[B, N, H, D]`` (q's dtype) and lse ``[B, H, N]`` fp32 when ``save``,
    else empty tensors."""
    if _provider(q) == "triton":
        return _triton_fwd(x, q, k, v, lam, mask, save)
    return _ref_fwd(x, q, k, v, lam, mask, save)


@gated_cross_attn_fwd.register_fake
def _(x, q, k, v, lam, mask, save):
    B, N, H, D = q.shape
    out = x.new_empty(x.shape)
    if not save:
        return out, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return out, q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("mgkernels::gated_cross_attn_bwd", mutates_args=())
def gated_cross_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None,
                         o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dlam) from the forward's saved o and lse. dx is dout itself, returned by the autograd
    Function (a custom op may not return an alias of its input, and a copy would be wasted bandwidth)."""
    if _provider(q) == "triton":
        return _triton_bwd(dout, q, k, v, lam, mask, o, lse)
    return _ref_bwd(dout, q, k, v, lam, mask, o)


@gated_cross_attn_bwd.register_fake
def _(dout, q, k, v, lam, mask, o, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape)


# ----------------------------------------------------------------------------------------------------------
# Autograd + functional API.
# ----------------------------------------------------------------------------------------------------------

class GatedCrossAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, v, lam, mask, save):
        out, o, lse = torch.ops.mgkernels.gated_cross_attn_fwd(x, q, k, v, lam, mask, save)
        ctx.save = save
        if save:
            ctx.save_for_backward(q, k, v, lam, mask, o, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        need = ctx.needs_input_grad
        dx = dout if need[0] else None
        if not ctx.save or not any(need[1:5]):
            return dx, None, None, None, None, None, None
        q, k, v, lam, mask, o, lse = ctx.saved_tensors
        dq, dk, dv, dlam = torch.ops.mgkernels.gated_cross_attn_bwd(dout, q, k, v, lam, mask, o, lse)
        return (dx, dq if need[1] else None, dk if need[2] else None, dv if need[3] else None,
                dlam if need[4] else None, None, None)


def _check(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None) -> None:
    _check_qkv(q, k, v, mask, "gated_cross_attn")
    B, N, H, D = q.shape
    if tuple(x.shape) not in ((B, N, H, D), (B, N, H * D)):
        raise ValueError(f"gated_cross_attn: x (the residual) must be [B, N, H, D] = {(B, N, H, D)} or "
                         f"[B, N, H*D] = {(B, N, H * D)}, got {tuple(x.shape)}")
    if not x.is_floating_point() or not lam.is_floating_point():
        raise ValueError(f"gated_cross_attn: x and lam must be floating point, got {x.dtype} and {lam.dtype}")
    if tuple(lam.shape) not in ((), (1,), (H,)):
        raise ValueError(f"gated_cross_attn: lam must have shape [], [1] or [H] = [{H}], got "
                         f"{tuple(lam.shape)}; use one gate per head or one for all heads")
    devs = {t.device for t in (x, q, lam)}
    if len(devs) != 1:
        raise ValueError(f"gated_cross_attn: all tensors must be on one device, got {sorted(map(str, devs))}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, op: str) -> None:
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, N, H, D], got shape {tuple(q.shape)}")
    B, N, H, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or tuple(k.shape[2:]) != (H, D):
        raise ValueError(f"{op}: k must be [B, L, H, D] = [{B}, L, {H}, {D}] to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError(f"{op}: k/v have L = 0 keys; pass at least one key (use an all-False mask "
                         "row for a sample with no caption)")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"{op}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}; cast them to the same dtype")
    if mask is not None and tuple(mask.shape) != (B, k.shape[1]):
        raise ValueError(f"{op}: mask must be the key-padding mask [B, L] = [{B}, {k.shape[1]}], "
                         f"got {tuple(mask.shape)}")
    devs = {t.device for t in (q, k, v) + (() if mask is None else (mask,))}
    if len(devs) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devs))}")


def gated_cross_attn(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x + tanh(lam) * softmax(q k^T / sqrt(D) + mask) v`` in one fused pass (see the module docstring)."""
    _check(x, q, k, v, lam, mask)
    if mask is not None:
        mask = mask.detach()
    if traced_ref(q) or eager_ref(lambda: _provider(q)):  # see mgkernels.dispatch (traced_ref, eager_ref)
        return _ref_fwd(x, q, k, v, lam, mask, False)[0]  # differentiable: plain torch ops
    grad = torch.is_grad_enabled()
    save = grad and any(t.requires_grad for t in (q, k, v, lam))
    if grad and (save or x.requires_grad):
        return GatedCrossAttnFunction.apply(x, q, k, v, lam, mask, save)
    out, _, _ = torch.ops.mgkernels.gated_cross_attn_fwd(x, q, k, v, lam, mask, False)
    return out


# ----------------------------------------------------------------------------------------------------------
# The plain (un-gated, no residual) cross-attention: STDiT's T5 and LLM cross-attention. Its output feeds
# the output projection, so the gate and the residual cannot follow in this kernel's epilogue; the model
# fuses them (and the next LayerNorm + modulation) into mgkernels.residual_modulate instead.
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("mgkernels::cross_attn_fwd", mutates_args=())
def cross_attn_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, save: bool) -> tuple[Tensor, Tensor]:
    """(o ``[B, N, H, D]`` in q's dtype, lse ``[B, H, N]`` fp32 when ``save`` else empty)."""
    provider = _provider(q, "cross_attn")
    if provider == "triton":
        o, _, lse = _triton_fwd(None, q, k, v, None, mask, save)
        return o, lse
    if provider == "csrc":
        return torch.ops.mgkernels.csrc_cross_attn_fwd(q, k, v, mask, save)
    lse = _ref_lse(q, k, mask) if save else q.new_empty(0, dtype=torch.float32)
    return _ref_attention(q, k, v, mask).contiguous(), lse


@cross_attn_fwd.register_fake
def _(q, k, v, mask, save):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((B, H, N) if save else (0,), dtype=torch.float32)


@torch.library.custom_op("mgkernels::cross_attn_bwd", mutates_args=())
def cross_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, o: Tensor,
                   lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from dO and the forward's o, lse."""
    provider = _provider(q, "cross_attn")
    if provider == "triton":
        return _triton_bwd(do, q, k, v, None, mask, o, lse)[:3]
    if provider == "csrc":
        return torch.ops.mgkernels.csrc_cross_attn_bwd(do, q, k, v, mask, o, lse)
    return _ref_bwd(do, q, k, v, None, mask, o)[:3]


@cross_attn_bwd.register_fake
def _(do, q, k, v, mask, o, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _cross_op_pair(csrc: bool):
    """(forward, backward): the C++ kernel's dispatcher operators, or the custom ops (provider chosen at run time)."""
    m = torch.ops.mgkernels
    return (m.csrc_cross_attn_fwd, m.csrc_cross_attn_bwd) if csrc else (m.cross_attn_fwd, m.cross_attn_bwd)


class CrossAttnFunction(torch.autograd.Function):
    """o = cross_attn(q, k, v, mask); ``csrc``: through the C++ kernel's dispatcher operators
    (``torch.ops.mgkernels.csrc_*``, no custom-op layer) instead of the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, mask, save, csrc):
        o, lse = _cross_op_pair(csrc)[0](q, k, v, mask, save)
        if save:
            ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.csrc = csrc
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask, o, lse = ctx.saved_tensors
        dq, dk, dv = _cross_op_pair(ctx.csrc)[1](do, q, k, v, mask, o, lse)
        return dq, dk, dv, None, None, None


def cross_attn(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(D) + mask) v`` -> ``[B, N, H, D]``: q ``[B, N, H, D]``, k / v ``[B, L, H, D]``
    (any strides, e.g. slices of one ``[B, L, 2, H, D]`` projection), ``mask`` the key-padding mask
    ``[B, L]`` (a sample with no valid key gets 0, not NaN). Same kernels as :func:`gated_cross_attn`."""
    _check_qkv(q, k, v, mask, "cross_attn")
    if mask is not None:
        mask = mask.detach()
    route = attention_route(q, _cpu_attention.usable(q), lambda: _provider(q, "cross_attn"))  # mgkernels.dispatch
    if route == "ref":
        return _ref_attention(q, k, v, mask)
    csrc = route == "csrc"  # the C++ operators, no custom-op layer (eager, and in compiled graphs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return CrossAttnFunction.apply(q, k, v, mask, True, csrc)
    return _cross_op_pair(csrc)[0](q, k, v, mask, False)[0]
