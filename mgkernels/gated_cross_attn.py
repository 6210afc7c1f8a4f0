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

Gradients: ``dx = dout``; with ``g = tanh(lam)`` the attention sees ``g * dout`` (flash-attention-2
backward with the fp32 log-sum-exp saved by the forward); ``dlam = (1 - g^2) * sum(dout * o)`` summed over
everything (scalar ``lam``) or per head (``[H]`` ``lam``), where ``o`` is the un-gated attention output, which
the forward writes as a second output only when a gradient is needed (it cannot be recovered from ``out``
when ``g = 0``).

Layout of this file (one op per file): reference -> Triton kernels -> launchers -> ``torch.library`` custom
ops (``mgkernels::gated_cross_attn_fwd`` / ``mgkernels::gated_cross_attn_bwd``, provider chosen at run time
by :func:`mgkernels.dispatch.choose`) -> ``torch.autograd.Function`` -> :func:`gated_cross_attn`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import choose, interpreter_enabled

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - installs without Triton run the reference

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    _HAS_TRITON = False

__all__ = ["gated_cross_attn", "gated_cross_attn_ref"]

_OP = "gated_cross_attn"
_MAX_D = 256  # largest head dim the Triton kernels take (BLOCK_D = 256); larger uses the reference


# ----------------------------------------------------------------------------------------------------------
# Reference (PyTorch): the fallback provider, the benchmark baseline, what torch.compile(ref) compiles.
# ----------------------------------------------------------------------------------------------------------

def _gate(lam: Tensor, H: int) -> Tensor:
    """tanh(lam) as ``[H]`` in fp32 (fp64 for an fp64 lam); a scalar lam is broadcast to every head."""
    return torch.tanh(lam.to(torch.promote_types(lam.dtype, torch.float32))).reshape(-1).expand(H)


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
# Triton kernels. Grids: axis 0 = b * H + h (no 65535 limit), axis 1 = block of queries / keys.
# Scores are kept in base-2 units (qk_scale = log2(e) / sqrt(D)) so the softmax uses exp2; LSE is stored in
# natural-log units, +inf for a row with no valid key (so exp2(s - lse) = 0 in the backward).
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
    H, N, L, D, qk_scale,
    HAS_MASK: tl.constexpr, SAVE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_ok = offs_m < N
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kv_end = L
    if HAS_MASK:  # keys after the sample's last valid one are never visited
        kv_end = tl.load(KV_END + b)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        keep = offs_n < L
        if HAS_MASK:
            mv = tl.load(MASK + b * smb + offs_n * sml, mask=keep, other=0)
            keep = keep & (mv != 0)
        kt = tl.load(k_base + offs_n[None, :] * skl + offs_d[:, None] * skd,
                     mask=keep[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 units
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid (-inf) - (-inf)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :] * svd,
                     mask=keep[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_F32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]  # rows with no valid key: acc = 0 -> o = 0

    g = tl.load(G + h).to(tl.float32)
    xv = tl.load(X + b * sxb + h * sxh + offs_m[:, None] * sxn + offs_d[None, :] * sxd, mask=md_ok, other=0.0)
    out = xv.to(tl.float32) + g * o
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=md_ok)
    if SAVE:
        tl.store(OATT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
                 o.to(OATT.dtype.element_ty), mask=md_ok)
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
        tl.store(LSE + b * slb + h * slh + offs_m * sln, lse, mask=m_ok)


@triton.jit
def _gca_bwd_preprocess_kernel(
    DOUT, OATT, DOT,
    sdb, sdn, sdh, sdd,
    s_ob, s_on, s_oh, s_od,
    stb, sth, stn,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DOT[b, h, n] = sum_d dout * o (fp32, un-gated): delta = g * DOT, and dlam = (1 - g^2) * sum DOT."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_ok = offs_m < N
    md_ok = m_ok[:, None] & (offs_d < D)[None, :]
    do = tl.load(DOUT + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=md_ok, other=0.0)
    o = tl.load(OATT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od, mask=md_ok, other=0.0)
    dot = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DOT + b * stb + h * sth + offs_m * stn, dot, mask=m_ok)


@triton.jit
def _gca_bwd_dkdv_kernel(
    Q, K, V, DOUT, G, MASK, KV_END, LSE, DOT, DK, DV,
    sqb, sqn, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    sdb, sdn, sdh, sdd,
    smb, sml,
    slb, slh, sln,
    stb, sth, stn,
    sdkb, sdkl, sdkh, sdkd,
    sdvb, sdvl, sdvh, sdvd,
    H, N, L, D, qk_scale, sm_scale,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of keys per program, looping over every query block (deterministic, no atomics)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    n_ok = offs_n < L
    d_ok = offs_d < D
    keep = n_ok
    if HAS_MASK:
        mv = tl.load(MASK + b * smb + offs_n * sml, mask=n_ok, other=0)
        keep = keep & (mv != 0)
    kd_keep = keep[:, None] & d_ok[None, :]

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :] * skd, mask=kd_keep, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :] * svd, mask=kd_keep, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    g = tl.load(G + h).to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # un-gated: sum p^T dout (times g at the end)
    q_base = Q + b * sqb + h * sqh
    do_base = DOUT + b * sdb + h * sdh
    m_end = N
    if HAS_MASK:  # a block of padding keys: dk = dv = 0 without visiting the queries
        m_end = tl.where(tl.max(keep.to(tl.int32), axis=0) > 0, N, 0)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < N
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=md_ok, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + b * slb + h * slh + offs_m * sln, mask=m_ok, other=float("inf"))
        dot = tl.load(DOT + b * stb + h * sth + offs_m * stn, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(st - (lse * 1.4426950408889634)[None, :])
        pt = tl.where(keep[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * g  # d(attn) = g * dout
        dst = pt * (dpt - (g * dot)[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)

    dk = dk * sm_scale
    dv = dv * g
    nd_ok = n_ok[:, None] & d_ok[None, :]  # masked keys get an exact 0
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkl + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvl + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _gca_bwd_dq_kernel(
    Q, K, V, DOUT, G, MASK, KV_END, LSE, DOT, DQ,
    sqb, sqn, sqh, sqd,
    skb, skl, skh, skd,
    svb, svl, svh, svd,
    sdb, sdn, sdh, sdd,
    smb, sml,
    slb, slh, sln,
    stb, sth, stn,
    sdqb, sdqn, sdqh, sdqd,
    H, N, L, D, qk_scale, sm_scale,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of queries per program, looping over every key block."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_ok = offs_m < N
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    do = tl.load(DOUT + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=md_ok, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * slb + h * slh + offs_m * sln, mask=m_ok, other=float("inf")) * 1.4426950408889634
    g = tl.load(G + h).to(tl.float32)
    delta = g * tl.load(DOT + b * stb + h * sth + offs_m * stn, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kv_end = L
    if HAS_MASK:  # keys after the sample's last valid one are never visited
        kv_end = tl.load(KV_END + b)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        keep = offs_n < L
        if HAS_MASK:
            mv = tl.load(MASK + b * smb + offs_n * sml, mask=keep, other=0)
            keep = keep & (mv != 0)
        kd_keep = keep[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :] * skd, mask=kd_keep, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :] * svd, mask=kd_keep, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(keep[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * g
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=md_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers: allocate outputs, pick block sizes with a simple heuristic, launch.
# ----------------------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _fwd_config(D: int, L: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the forward / dQ kernels."""
    block_d = max(16, _next_pow2(D))
    if interpreter_enabled():  # small tiles: every loop runs several blocks, the interpreter stays quick
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    wide = dtype == torch.float32 or block_d > 128
    block_m = 64 if wide else 128
    block_n = min(32 if block_d > 128 else 64, max(16, _next_pow2(L)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=8 if block_d >= 128 and block_m >= 128 else 4, num_stages=2 if wide else 3)


def _bwd_config(D: int, L: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the two backward kernels."""
    block_d = max(16, _next_pow2(D))
    if interpreter_enabled():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    wide = dtype == torch.float32 or block_d > 128
    block = 32 if wide else 64
    return dict(BLOCK_M=block, BLOCK_N=min(block, max(16, _next_pow2(L))), BLOCK_D=block_d,
                num_warps=4 if block_d <= 64 else 8, num_stages=1 if block_d > 128 else 2)


def _launch_kw(cfg: dict, block_m: int | None, block_n: int | None) -> dict:
    cfg = dict(cfg)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    if interpreter_enabled():  # launch options the interpreter has no use for
        cfg.pop("num_warps"), cfg.pop("num_stages")
    return cfg


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
    # The interpreter cannot do bf16 arithmetic (it holds bf16 as uint16): upcast tiles before tl.dot there.
    return interpreter_enabled() and dtype == torch.bfloat16


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 (and fp64) tiles: exact IEEE products (TF32 would miss the fp32 tolerance); fp16 / bf16 tiles use
    # the tensor cores as always ("tf32" is Triton's NVIDIA default and only affects fp32 operands).
    return "tf32" if dtype in (torch.float16, torch.bfloat16) and not _dot_f32(dtype) else "ieee"


def _triton_fwd(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None, save: bool,
                block_m: int | None = None, block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    B, N, H, D = q.shape
    L = k.shape[1]
    x4 = x.unflatten(-1, (H, D)) if x.dim() == 3 else x
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    out4 = out.unflatten(-1, (H, D)) if out.dim() == 3 else out
    o = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype) if save else q.new_empty(0)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if save else q.new_empty(0, dtype=torch.float32)
    if out.numel() == 0:
        return out, o, lse
    g = _gate(lam, H).float().contiguous()
    m, kv_end, smb, sml = _mask_arg(mask, q)
    o_t = o if save else out4  # placeholder pointer when not saving
    o_st = o.stride() if save else (0, 0, 0, 0)
    l_t = lse if save else g
    l_st = lse.stride() if save else (0, 0, 0)
    cfg = _launch_kw(_fwd_config(D, L, q.dtype), block_m, block_n)
    grid = (B * H, triton.cdiv(N, cfg["BLOCK_M"]))
    _gca_fwd_kernel[grid](
        q, k, v, x4, g, m, kv_end, out4, o_t, l_t,
        *q.stride(), *k.stride(), *v.stride(), *x4.stride(), smb, sml, *out4.stride(), *o_st, *l_st,
        H, N, L, D, math.log2(math.e) / math.sqrt(D),
        HAS_MASK=mask is not None, SAVE=save, DOT_F32=_dot_f32(q.dtype), DOT_PREC=_dot_prec(q.dtype), **cfg,
    )
    return out, o, lse


def _triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None, o: Tensor,
                lse: Tensor, block_m: int | None = None,
                block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, H, D = q.shape
    L = k.shape[1]
    d4 = dout.unflatten(-1, (H, D)) if dout.dim() == 3 else dout
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    g = _gate(lam, H).float().contiguous()
    dot = torch.zeros((B, H, N), device=q.device, dtype=torch.float32)
    if dq.numel() and dk.numel():
        m, kv_end, smb, sml = _mask_arg(mask, q)
        cfg = _launch_kw(_bwd_config(D, L, q.dtype), block_m, block_n)
        scale = 1.0 / math.sqrt(D)
        qk_scale = scale * math.log2(math.e)
        dot_f32 = _dot_f32(q.dtype)
        pre_bm = 16 if interpreter_enabled() else 64
        _gca_bwd_preprocess_kernel[(B * H, triton.cdiv(N, pre_bm))](
            d4, o, dot, *d4.stride(), *o.stride(), *dot.stride(), H, N, D,
            BLOCK_M=pre_bm, BLOCK_D=cfg["BLOCK_D"],
        )
        common = (*q.stride(), *k.stride(), *v.stride(), *d4.stride(), smb, sml, *lse.stride(), *dot.stride())
        _gca_bwd_dkdv_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_N"]))](
            q, k, v, d4, g, m, kv_end, lse, dot, dk, dv, *common, *dk.stride(), *dv.stride(),
            H, N, L, D, qk_scale, scale, HAS_MASK=mask is not None, DOT_F32=dot_f32, DOT_PREC=_dot_prec(q.dtype), **cfg,
        )
        _gca_bwd_dq_kernel[(B * H, triton.cdiv(N, cfg["BLOCK_M"]))](
            q, k, v, d4, g, m, kv_end, lse, dot, dq, *common, *dq.stride(),
            H, N, L, D, qk_scale, scale, HAS_MASK=mask is not None, DOT_F32=dot_f32, DOT_PREC=_dot_prec(q.dtype), **cfg,
        )
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    dlam = _dlam_from_dot(dot.sum(dim=(0, 2)), lam, H)
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
    ct = torch.promote_types(x.dtype, torch.float32)
    g = _gate(lam, H).to(ct).view(1, 1, H, 1)
    out = (x.unflatten(-1, (H, D)) if x.dim() == 3 else x).to(ct) + g * o.to(ct)
    out = out.reshape(x.shape).to(x.dtype).contiguous()
    if not save:
        return out, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return out, o.contiguous(), _ref_lse(q, k, mask)


def _ref_bwd(dout, q, k, v, lam, mask, o):
    """Explicit attention backward in PyTorch (fp32, or fp64 for fp64 inputs); no autograd, no Triton.
    (Autograd cannot be used here: a custom op's body runs below the autograd dispatch key.)"""
    B, N, H, D = q.shape
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(D)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    d4 = (dout.unflatten(-1, (H, D)) if dout.dim() == 3 else dout).to(ct)
    oc = o.to(ct)
    g = _gate(lam, H).to(ct).view(1, 1, H, 1)
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
    dlam = _dlam_from_dot(dot.sum(dim=(0, 1)), lam, H)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dlam)


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile; the provider is chosen inside, at run time).
# ----------------------------------------------------------------------------------------------------------

def _providers(q: Tensor) -> tuple[str, ...]:
    return ("triton", "ref") if _HAS_TRITON and q.shape[-1] <= _MAX_D else ("ref",)


@torch.library.custom_op("mgkernels::gated_cross_attn_fwd", mutates_args=())
def gated_cross_attn_fwd(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None,
                         save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, o, lse): out like x; o ``[B, N, H, D]`` (q's dtype) and lse ``[B, H, N]`` fp32 when ``save``,
    else empty tensors."""
    if choose(_OP, q, _providers(q)) == "triton":
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
    if choose(_OP, q, _providers(q)) == "triton":
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
    if q.dim() != 4:
        raise ValueError(f"gated_cross_attn: q must be [B, N, H, D], got shape {tuple(q.shape)}")
    B, N, H, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or tuple(k.shape[2:]) != (H, D):
        raise ValueError(f"gated_cross_attn: k must be [B, L, H, D] = [{B}, L, {H}, {D}] to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"gated_cross_attn: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError("gated_cross_attn: k/v have L = 0 keys; pass at least one key (use an all-False mask "
                         "row for a sample with no caption)")
    if tuple(x.shape) not in ((B, N, H, D), (B, N, H * D)):
        raise ValueError(f"gated_cross_attn: x (the residual) must be [B, N, H, D] = {(B, N, H, D)} or "
                         f"[B, N, H*D] = {(B, N, H * D)}, got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"gated_cross_attn: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}; cast them to the same dtype")
    if not x.is_floating_point() or not lam.is_floating_point():
        raise ValueError(f"gated_cross_attn: x and lam must be floating point, got {x.dtype} and {lam.dtype}")
    if tuple(lam.shape) not in ((), (1,), (H,)):
        raise ValueError(f"gated_cross_attn: lam must have shape [], [1] or [H] = [{H}], got "
                         f"{tuple(lam.shape)}; use one gate per head or one for all heads")
    if mask is not None and tuple(mask.shape) != (B, k.shape[1]):
        raise ValueError(f"gated_cross_attn: mask must be the key-padding mask [B, L] = [{B}, {k.shape[1]}], "
                         f"got {tuple(mask.shape)}")
    devs = {t.device for t in (x, q, k, v, lam) + (() if mask is None else (mask,))}
    if len(devs) != 1:
        raise ValueError(f"gated_cross_attn: all tensors must be on one device, got {sorted(map(str, devs))}")


def gated_cross_attn(x: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x + tanh(lam) * softmax(q k^T / sqrt(D) + mask) v`` in one fused pass (see the module docstring)."""
    _check(x, q, k, v, lam, mask)
    if mask is not None:
        mask = mask.detach()
    grad = torch.is_grad_enabled()
    save = grad and any(t.requires_grad for t in (q, k, v, lam))
    if grad and (save or x.requires_grad):
        return GatedCrossAttnFunction.apply(x, q, k, v, lam, mask, save)
    out, _, _ = torch.ops.mgkernels.gated_cross_attn_fwd(x, q, k, v, lam, mask, False)
    return out
