"""Spatial / temporal self-attention of STDiT read straight from the fused qkv projection (fwd + bwd).

Shapes and semantics
--------------------
``qkv``: ``[B, T*S, 3, H, D]`` -- ``Linear(C, 3C)(x).view(B, T*S, 3, H, D)`` of STDiT's token stream
``x: [B, T*S, C]`` (frames outermost: token ``n = t*S + s``; index 0/1/2 of dim 2 = q/k/v; ``C = H*D``).
Any strides (a slice of a larger tensor, transposed storage, ...): they are read from the tensor.

``mode="spatial"``: for every ``(b, t)``, softmax attention among the ``S`` tokens of frame ``t``.
``mode="temporal"``: for every ``(b, s)``, attention among the ``T`` tokens ``{t*S + s}`` (a strided gather:
consecutive sequence elements are ``S`` tokens apart).

Every head independently, ``scale = D**-0.5``, no mask, no dropout. Output ``o: [B, T*S, H*D]`` in the
original token order (``o[b, n, h*D:(h+1)*D]`` is head ``h``'s output for token ``n``) -- what the output
projection consumes. The gradient w.r.t. ``qkv`` is ONE tensor ``dqkv: [B, T*S, 3, H, D]`` (the layout the
qkv linear's output gradient needs). No permute / contiguous copies anywhere in the Triton path.

Both modes are one kernel family: a *group* is one attention sequence (``(b, t)`` spatial, ``(b, s)``
temporal); group ``g`` of batch ``b`` holds tokens ``n = g*GS + i*IS`` for ``i < L`` with
``(G, L, GS, IS) = (T, S, S, 1)`` spatial and ``(S, T, 1, S)`` temporal.

Algorithm: flash-attention-2. The forward saves ``lse: [B, H, T*S]`` (fp32, natural log, indexed by token);
the backward computes ``delta = rowsum(dO * O)`` (preprocess kernel), then a dK/dV kernel (loop over query
blocks) and a dQ kernel (loop over key blocks) -- deterministic, no atomics. When a whole sequence fits
one tile (temporal mode with ``T <= 32``, ``T <= 16`` for fp32; small frames) a single fused backward kernel
computes delta, dQ, dK and dV of a group-head at once (one launch, q/k/v/o/dO read once). fp32 accumulation; fp32/fp16/bf16 inputs (float64 and other dtypes use the
PyTorch reference).

Dispatch (:mod:`mgkernels.dispatch`): ``triton`` or ``ref`` is chosen at run time inside the custom ops
``mgkernels::st_attention_fwd`` and ``mgkernels::st_attention_bwd``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import choose, interpreter_enabled

try:  # Triton is optional: without it only the reference runs.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _HAS_TRITON = False

__all__ = ["st_attention", "st_attention_ref", "STAttentionFunction", "MODES"]

MODES = ("spatial", "temporal")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


def _check(qkv: torch.Tensor, T: int, S: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"st_attention: unknown mode {mode!r}; use one of {MODES}")
    if qkv.dim() != 5:
        raise ValueError(
            f"st_attention: qkv must be [B, T*S, 3, H, D] (the qkv linear's output viewed as "
            f".view(B, T*S, 3, H, D)); got rank {qkv.dim()} with shape {list(qkv.shape)}"
        )
    if int(T) < 1 or int(S) < 1:
        raise ValueError(f"st_attention: T and S must be >= 1; got T={T}, S={S}")
    if qkv.shape[1] != T * S:
        raise ValueError(
            f"st_attention: qkv.shape[1] = {qkv.shape[1]} is not T*S = {T}*{S} = {T * S}; pass the number of "
            f"frames T and spatial tokens per frame S of this token stream"
        )
    if qkv.shape[2] != 3:
        raise ValueError(
            f"st_attention: qkv.shape[2] must be 3 (q, k, v); got {qkv.shape[2]} -- view the qkv linear's "
            f"output as [B, T*S, 3, H, D]"
        )


# ----------------------------------------------------------------------------------------------------------
# Reference (fallback, benchmark baseline, what torch.compile(ref) compiles)
# ----------------------------------------------------------------------------------------------------------


def _to_groups(qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """[B, T*S, K, H, D] -> [K, B*G, H, L, D] (a copy): the sequences of ``mode`` as SDPA batches."""
    B, _, K, H, D = qkv.shape
    x = qkv.unflatten(1, (T, S))  # [B, T, S, 3, H, D]
    if mode == "spatial":
        return x.permute(3, 0, 1, 4, 2, 5).reshape(K, B * T, H, S, D)  # [K, B*T, H, S, D]
    return x.permute(3, 0, 2, 4, 1, 5).reshape(K, B * S, H, T, D)  # [K, B*S, H, T, D]


def _from_groups(y: torch.Tensor, B: int, T: int, S: int, mode: str) -> torch.Tensor:
    """[B*G, H, L, X] -> [B, T*S, H, X] in token order."""
    H, X = y.shape[1], y.shape[-1]
    if mode == "spatial":
        return y.view(B, T, H, S, X).permute(0, 1, 3, 2, 4).reshape(B, T * S, H, X)
    return y.view(B, S, H, T, X).permute(0, 3, 1, 2, 4).reshape(B, T * S, H, X)


def st_attention_ref(qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """PyTorch reference: permute copies + ``F.scaled_dot_product_attention`` + permute back.

    ``qkv: [B, T*S, 3, H, D]`` -> ``o: [B, T*S, H*D]``; see the module docstring.
    """
    _check(qkv, T, S, mode)
    B, N, _, H, D = qkv.shape
    q, k, v = _to_groups(qkv, T, S, mode).unbind(0)  # 3 x [B*G, H, L, D]
    o = F.scaled_dot_product_attention(q, k, v)  # [B*G, H, L, D]
    return _from_groups(o, B, T, S, mode).reshape(B, N, H * D)


def _ref_lse(qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """fp32 log-sum-exp of the scaled scores, [B, H, T*S] by token (computed in chunks of groups)."""
    B, N, _, H, D = qkv.shape
    q, k, _ = _to_groups(qkv, T, S, mode).unbind(0)  # [B*G, H, L, D]
    BG, L = q.shape[0], q.shape[2]
    chunk = max(1, (1 << 25) // max(1, H * L * L))
    out = []
    for i in range(0, BG, chunk):
        s = (q[i : i + chunk].float() @ k[i : i + chunk].float().transpose(-1, -2)) * D**-0.5
        out.append(torch.logsumexp(s, dim=-1))  # [chunk, H, L]
    lse = torch.cat(out, 0).unsqueeze(-1)  # [B*G, H, L, 1]
    return _from_groups(lse, B, T, S, mode).squeeze(-1).transpose(1, 2).contiguous()  # [B, H, N]


def _ref_bwd(do: torch.Tensor, qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """dqkv by explicit attention backward math on the permuted tensors, in fp32 (fp64 for fp64 inputs).

    (Autograd is not available inside a custom op's body, so this does not differentiate the reference.)
    """
    B, N, _, H, D = qkv.shape
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    scale = D**-0.5
    q, k, v = _to_groups(qkv, T, S, mode).unbind(0)  # [B*G, H, L, D]
    dog = _to_groups(do.reshape(B, N, 1, H, D), T, S, mode)[0]  # [B*G, H, L, D]
    BG, L = q.shape[0], q.shape[2]
    chunk = max(1, (1 << 24) // max(1, H * L * L))
    grads = []
    for i in range(0, BG, chunk):
        qc, kc, vc, dc = (t[i : i + chunk].to(acc) for t in (q, k, v, dog))
        p = torch.softmax((qc @ kc.transpose(-1, -2)) * scale, dim=-1)  # [c, H, L, L]
        dv = p.transpose(-1, -2) @ dc
        dp = dc @ vc.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        grads.append(torch.stack((ds @ kc * scale, ds.transpose(-1, -2) @ qc * scale, dv), 0))
    g = torch.cat(grads, 1).to(qkv.dtype)  # [3, B*G, H, L, D]
    return torch.stack([_from_groups(g[j], B, T, S, mode) for j in range(3)], 2)  # [B, N, 3, H, D]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _mm(a, b, DOT_FP32: tl.constexpr):
        """a @ b with an fp32 result; fp32 operands use exact IEEE fp32 (never TF32)."""
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _st_attn_fwd_kernel(
        QKV, OUT, LSE,
        s_qb, s_qn, s_q3, s_qh, s_qd,
        s_ob, s_on, s_oc,
        s_lb, s_lh, s_ln,
        H, G, L, D, GS, IS,
        sm_scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        # program (group-head, query block); group-head on axis 0 (no 65535 limit there)
        pid = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        h = pid % H
        bg = pid // H
        g = bg % G
        b = bg // G
        tok0 = g * GS  # first token of the group (int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < L
        mask_d = offs_d < D
        tok_m = tok0 + offs_m.to(tl.int64) * IS  # token index of every query row

        q_base = QKV + b * s_qb + h * s_qh
        d_off = (offs_d.to(tl.int64) * s_qd)[None, :]
        q = tl.load(q_base + (tok_m * s_qn)[:, None] + d_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + offs_n0
            mask_n = offs_n < L
            tok_n = tok0 + offs_n.to(tl.int64) * IS
            kv_off = (tok_n * s_qn)[:, None] + d_off
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(q_base + s_q3 + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(q_base + 2 * s_q3 + kv_off, mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _mm(q, tl.trans(k), DOT_FP32) * sm_scale_log2  # [BM, BN], log2 domain
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has >= 1 valid key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_FP32)
            m_i = m_new

        acc = acc / l_i[:, None]
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
        o_ptrs = OUT + b * s_ob + (tok_m * s_on)[:, None] + ((h * D + offs_d) * s_oc)[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(LSE + b * s_lb + h * s_lh + tok_m * s_ln, lse, mask=mask_m)

    @triton.jit
    def _st_attn_bwd_delta_kernel(
        OUT, DO, DELTA,
        s_ob, s_on, s_oc,
        s_db, s_dn, s_dc,
        s_lb, s_lh, s_ln,
        N, H, D,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # delta[b, h, n] = sum_d dO[b, n, h*D + d] * O[b, n, h*D + d]; program (token block, b*H + h)
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        h = pid_bh % H
        b = pid_bh // H
        offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_t = offs_t < N
        mask = mask_t[:, None] & (offs_d < D)[None, :]
        col = (h * D + offs_d).to(tl.int64)
        o = tl.load(OUT + b * s_ob + (offs_t * s_on)[:, None] + (col * s_oc)[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * s_db + (offs_t * s_dn)[:, None] + (col * s_dc)[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + b * s_lb + h * s_lh + offs_t * s_ln, delta, mask=mask_t)

    @triton.jit
    def _st_attn_bwd_dkdv_kernel(
        QKV, DO, LSE, DELTA, DQKV,
        s_qb, s_qn, s_q3, s_qh, s_qd,
        s_db, s_dn, s_dc,
        s_lb, s_lh, s_ln,
        s_gb, s_gn, s_g3, s_gh, s_gd,
        H, G, L, D, GS, IS,
        sm_scale, sm_scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        # program (group-head, key block): dK, dV of BLOCK_N keys, looping over all query blocks
        pid = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        h = pid % H
        bg = pid // H
        g = bg % G
        b = bg // G
        tok0 = g * GS

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < L
        mask_d = offs_d < D
        tok_n = tok0 + offs_n.to(tl.int64) * IS

        q_base = QKV + b * s_qb + h * s_qh
        d_off = (offs_d.to(tl.int64) * s_qd)[None, :]
        do_base = DO + b * s_db
        do_col = ((h * D + offs_d).to(tl.int64) * s_dc)[None, :]
        l_base = b * s_lb + h * s_lh

        kv_off = (tok_n * s_qn)[:, None] + d_off
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(q_base + s_q3 + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(q_base + 2 * s_q3 + kv_off, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + offs_m0
            mask_m = offs_m < L
            tok_m = tok0 + offs_m.to(tl.int64) * IS
            qm = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_base + (tok_m * s_qn)[:, None] + d_off, mask=qm, other=0.0)
            do = tl.load(do_base + (tok_m * s_dn)[:, None] + do_col, mask=qm, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + l_base + tok_m * s_ln, mask=mask_m, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + l_base + tok_m * s_ln, mask=mask_m, other=0.0)
            sT = _mm(k, tl.trans(q), DOT_FP32)  # [BN, BM]
            pT = tl.exp2(sT * sm_scale_log2 - lse[None, :])
            pT = tl.where(mask_m[None, :], pT, 0.0)
            dv += _mm(pT.to(do.dtype), do, DOT_FP32)
            dpT = _mm(v, tl.trans(do), DOT_FP32)  # [BN, BM]
            dsT = pT * (dpT - delta[None, :])
            dk += _mm(dsT.to(q.dtype), q, DOT_FP32)
        dk = dk * sm_scale

        g_off = DQKV + b * s_gb + h * s_gh + (tok_n * s_gn)[:, None] + (offs_d.to(tl.int64) * s_gd)[None, :]
        tl.store(g_off + s_g3, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
        tl.store(g_off + 2 * s_g3, dv.to(DQKV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _st_attn_bwd_dq_kernel(
        QKV, DO, LSE, DELTA, DQKV,
        s_qb, s_qn, s_q3, s_qh, s_qd,
        s_db, s_dn, s_dc,
        s_lb, s_lh, s_ln,
        s_gb, s_gn, s_g3, s_gh, s_gd,
        H, G, L, D, GS, IS,
        sm_scale, sm_scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        # program (group-head, query block): dQ of BLOCK_M queries, looping over all key blocks
        pid = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        h = pid % H
        bg = pid // H
        g = bg % G
        b = bg // G
        tok0 = g * GS

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < L
        mask_d = offs_d < D
        tok_m = tok0 + offs_m.to(tl.int64) * IS

        q_base = QKV + b * s_qb + h * s_qh
        d_off = (offs_d.to(tl.int64) * s_qd)[None, :]
        l_base = b * s_lb + h * s_lh
        qm = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + (tok_m * s_qn)[:, None] + d_off, mask=qm, other=0.0)
        do = tl.load(
            DO + b * s_db + (tok_m * s_dn)[:, None] + ((h * D + offs_d).to(tl.int64) * s_dc)[None, :],
            mask=qm, other=0.0,
        )  # fmt: skip
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + l_base + tok_m * s_ln, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_base + tok_m * s_ln, mask=mask_m, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + offs_n0
            mask_n = offs_n < L
            tok_n = tok0 + offs_n.to(tl.int64) * IS
            kv_off = (tok_n * s_qn)[:, None] + d_off
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(q_base + s_q3 + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(q_base + 2 * s_q3 + kv_off, mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _mm(q, tl.trans(k), DOT_FP32)  # [BM, BN]
            p = tl.exp2(s * sm_scale_log2 - lse[:, None])
            p = tl.where(mask_n[None, :], p, 0.0)
            dp = _mm(do, tl.trans(v), DOT_FP32)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, DOT_FP32)
        dq = dq * sm_scale

        g_ptrs = DQKV + b * s_gb + h * s_gh + (tok_m * s_gn)[:, None] + (offs_d.to(tl.int64) * s_gd)[None, :]
        tl.store(g_ptrs, dq.to(DQKV.dtype.element_ty), mask=qm)

    @triton.jit
    def _st_attn_bwd_single_kernel(
        QKV, OUT, DO, LSE, DQKV,
        s_qb, s_qn, s_q3, s_qh, s_qd,
        s_ob, s_on, s_oc,
        s_db, s_dn, s_dc,
        s_lb, s_lh, s_ln,
        s_gb, s_gn, s_g3, s_gh, s_gd,
        H, G, L, D, GS, IS,
        sm_scale, sm_scale_log2,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        # whole sequence in one tile (L <= BLOCK): delta, dQ, dK, dV of one group-head in one program
        pid = tl.program_id(0).to(tl.int64)
        h = pid % H
        bg = pid // H
        g = bg % G
        b = bg // G
        tok0 = g * GS

        offs = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        mask_l = offs < L
        mask_d = offs_d < D
        mask = mask_l[:, None] & mask_d[None, :]
        tok = tok0 + offs.to(tl.int64) * IS
        d64 = offs_d.to(tl.int64)
        col = h * D + d64

        q_ptrs = QKV + b * s_qb + h * s_qh + (tok * s_qn)[:, None] + (d64 * s_qd)[None, :]
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        k = tl.load(q_ptrs + s_q3, mask=mask, other=0.0)
        v = tl.load(q_ptrs + 2 * s_q3, mask=mask, other=0.0)
        o = tl.load(OUT + b * s_ob + (tok * s_on)[:, None] + (col * s_oc)[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * s_db + (tok * s_dn)[:, None] + (col * s_dc)[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(LSE + b * s_lb + h * s_lh + tok * s_ln, mask=mask_l, other=0.0) * 1.4426950408889634
        if DOT_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            do = do.to(tl.float32)

        s = _mm(q, tl.trans(k), DOT_FP32)  # [BLOCK(q), BLOCK(k)]
        p = tl.exp2(s * sm_scale_log2 - lse[:, None])
        p = tl.where(mask_l[:, None] & mask_l[None, :], p, 0.0)
        dv = _mm(tl.trans(p).to(do.dtype), do, DOT_FP32)
        dp = _mm(do, tl.trans(v), DOT_FP32)
        ds = p * (dp - delta[:, None])
        dq = _mm(ds.to(k.dtype), k, DOT_FP32) * sm_scale
        dk = _mm(tl.trans(ds).to(q.dtype), q, DOT_FP32) * sm_scale

        g_ptrs = DQKV + b * s_gb + h * s_gh + (tok * s_gn)[:, None] + (d64 * s_gd)[None, :]
        out_ty = DQKV.dtype.element_ty
        tl.store(g_ptrs, dq.to(out_ty), mask=mask)
        tl.store(g_ptrs + s_g3, dk.to(out_ty), mask=mask)
        tl.store(g_ptrs + 2 * s_g3, dv.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _geometry(T: int, S: int, mode: str) -> tuple[int, int, int, int]:
    """(G groups per batch element, L sequence length, GS group stride, IS element stride) in tokens."""
    return (T, S, S, 1) if mode == "spatial" else (S, T, 1, S)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs: exact fp32 dots (IEEE, no TF32). Under the interpreter every dot runs in fp32 (it is
    # exact there and the interpreter mishandles low-precision arithmetic). On GPU fp16/bf16 tiles feed the
    # tensor cores directly with fp32 accumulation.
    return dtype == torch.float32 or interpreter_enabled()


def _fwd_config(L: int, D: int, dtype: torch.dtype) -> dict:
    """Forward tiles. GPU choices were checked spill-free with ptxas for sm_90 at BLOCK_D = 64 / 128 (D = 72)."""
    BLOCK_D = max(16, _pow2(D))
    fit = max(16, _pow2(L))  # tl.dot needs every tile dimension >= 16; a short sequence is one tile
    if interpreter_enabled():  # small, unequal tiles: CPU tests exercise the multi-block loops
        return dict(BLOCK_M=min(fit, 32), BLOCK_N=min(fit, 16), BLOCK_D=BLOCK_D, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: smaller tiles
        bm, bn, warps, stages = (64, 32, 8, 2) if BLOCK_D <= 128 else (32, 16, 8, 2)
    elif BLOCK_D <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif BLOCK_D <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    bm, bn = min(fit, bm), min(fit, bn)
    if dtype != torch.float32 and bm < 64:  # short sequences: small tiles, 4 warps
        warps = 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D, num_warps=warps, num_stages=stages)


def _bwd_config(L: int, D: int, dtype: torch.dtype) -> dict:
    """Backward tiles: the fused single-tile kernel when the sequence fits ``SINGLE`` rows, else the
    dK/dV kernel (``KV_M`` queries per inner step x ``KV_N`` keys per program) and the dQ kernel
    (``Q_M`` queries per program x ``Q_N`` keys per inner step). GPU choices checked spill-free with ptxas."""
    BLOCK_D = max(16, _pow2(D))
    fit = max(16, _pow2(L))
    if interpreter_enabled():
        single, sw, kv, q = 32, 4, (16, 32, 4), (32, 16, 4)
    elif dtype == torch.float32:
        single, sw = 16, (4 if BLOCK_D <= 128 else 8)
        kv, q = ((16, 32, 8), (32, 32, 4)) if BLOCK_D <= 128 else ((16, 16, 8), (16, 16, 8))
    elif BLOCK_D <= 128:
        single, sw = 32, (8 if BLOCK_D == 128 and fit == 32 else 4)
        kv, q = (32, 64, 8 if BLOCK_D == 128 else 4), (64, 32, 4)
    else:
        single, sw, kv, q = 16, 8, (16, 32, 8), (32, 16, 8)
    return dict(
        BLOCK_D=BLOCK_D, SINGLE=fit <= single, BLOCK=fit, single_warps=sw,
        KV_M=min(fit, kv[0]), KV_N=min(fit, kv[1]), kv_warps=kv[2],
        Q_M=min(fit, q[0]), Q_N=min(fit, q[1]), q_warps=q[2],
        BLOCK_T=max(16, 2048 // BLOCK_D), num_stages=1 if interpreter_enabled() else 2,
    )  # fmt: skip


def _st_attention_fwd_triton(qkv: torch.Tensor, T: int, S: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, _, H, D = qkv.shape
    G, L, GS, IS = _geometry(T, S, mode)
    o = torch.empty(B, N, H * D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, H, N, device=qkv.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    cfg = _fwd_config(L, D, qkv.dtype)
    grid = (B * G * H, triton.cdiv(L, cfg["BLOCK_M"]))
    _st_attn_fwd_kernel[grid](
        qkv, o, lse,
        *qkv.stride(), *o.stride(), *lse.stride(),
        H, G, L, D, GS, IS,
        D**-0.5 * _LOG2E,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], DOT_FP32=_dot_fp32(qkv.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return o, lse


def _st_attention_bwd_triton(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, T: int,
                             S: int, mode: str) -> torch.Tensor:  # fmt: skip
    B, N, _, H, D = qkv.shape
    G, L, GS, IS = _geometry(T, S, mode)
    dqkv = torch.empty(B, N, 3, H, D, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv
    cfg = _bwd_config(L, D, qkv.dtype)
    dot_fp32 = _dot_fp32(qkv.dtype)
    scale = D**-0.5
    common = (H, G, L, D, GS, IS, scale, scale * _LOG2E)
    if cfg["SINGLE"]:
        _st_attn_bwd_single_kernel[(B * G * H,)](
            qkv, o, do, lse, dqkv,
            *qkv.stride(), *o.stride(), *do.stride(), *lse.stride(), *dqkv.stride(),
            *common,
            BLOCK=cfg["BLOCK"], BLOCK_D=cfg["BLOCK_D"], DOT_FP32=dot_fp32,
            num_warps=cfg["single_warps"], num_stages=1,
        )  # fmt: skip
        return dqkv

    delta = torch.empty(B, H, N, device=qkv.device, dtype=torch.float32)
    _st_attn_bwd_delta_kernel[(triton.cdiv(N, cfg["BLOCK_T"]), B * H)](
        o, do, delta,
        *o.stride(), *do.stride(), *delta.stride(),
        N, H, D,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], num_warps=4,
    )  # fmt: skip
    args = (qkv, do, lse, delta, dqkv, *qkv.stride(), *do.stride(), *lse.stride(), *dqkv.stride(), *common)
    _st_attn_bwd_dkdv_kernel[(B * G * H, triton.cdiv(L, cfg["KV_N"]))](
        *args, BLOCK_M=cfg["KV_M"], BLOCK_N=cfg["KV_N"], BLOCK_D=cfg["BLOCK_D"], DOT_FP32=dot_fp32,
        num_warps=cfg["kv_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    _st_attn_bwd_dq_kernel[(B * G * H, triton.cdiv(L, cfg["Q_M"]))](
        *args, BLOCK_M=cfg["Q_M"], BLOCK_N=cfg["Q_N"], BLOCK_D=cfg["BLOCK_D"], DOT_FP32=dot_fp32,
        num_warps=cfg["q_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return dqkv


# ----------------------------------------------------------------------------------------------------------
# Custom ops (run-time dispatch; opaque to torch.compile)
# ----------------------------------------------------------------------------------------------------------


def _provider(qkv: torch.Tensor) -> str:
    if not _HAS_TRITON or qkv.dtype not in _TRITON_DTYPES:
        return "ref"
    return choose("st_attention", qkv, ("triton", "ref"))


@torch.library.custom_op("mgkernels::st_attention_fwd", mutates_args=())
def st_attention_fwd(qkv: torch.Tensor, T: int, S: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T*S, H*D] in qkv's dtype, lse [B, H, T*S] fp32 natural-log log-sum-exp by token)."""
    _check(qkv, T, S, mode)
    if _provider(qkv) == "triton":
        return _st_attention_fwd_triton(qkv, T, S, mode)
    return st_attention_ref(qkv, T, S, mode).contiguous(), _ref_lse(qkv, T, S, mode)


@st_attention_fwd.register_fake
def _(qkv, T, S, mode):
    _check(qkv, T, S, mode)
    B, N, _, H, D = qkv.shape
    return qkv.new_empty(B, N, H * D), qkv.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("mgkernels::st_attention_bwd", mutates_args=())
def st_attention_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, T: int, S: int,
                     mode: str) -> torch.Tensor:  # fmt: skip
    """dqkv [B, T*S, 3, H, D] (contiguous, qkv's dtype) from dO [B, T*S, H*D] and the forward's o, lse."""
    _check(qkv, T, S, mode)
    if _provider(qkv) == "triton":
        return _st_attention_bwd_triton(do, qkv, o, lse, T, S, mode)
    return _ref_bwd(do, qkv, T, S, mode)


@st_attention_bwd.register_fake
def _(do, qkv, o, lse, T, S, mode):
    return qkv.new_empty(qkv.shape)


# ----------------------------------------------------------------------------------------------------------
# Autograd + functional API
# ----------------------------------------------------------------------------------------------------------


class STAttentionFunction(torch.autograd.Function):
    """o = st_attention(qkv); backward returns dqkv in qkv's [B, T*S, 3, H, D] layout."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
        o, lse = torch.ops.mgkernels.st_attention_fwd(qkv, T, S, mode)
        ctx.save_for_backward(qkv, o, lse)
        ctx.geometry = (T, S, mode)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        qkv, o, lse = ctx.saved_tensors
        T, S, mode = ctx.geometry
        dqkv = torch.ops.mgkernels.st_attention_bwd(do, qkv, o, lse, T, S, mode)
        return dqkv, None, None, None


def st_attention(qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """Spatial (``mode="spatial"``) or temporal (``mode="temporal"``) self-attention of STDiT.

    ``qkv: [B, T*S, 3, H, D]`` (any strides) -> ``o: [B, T*S, H*D]`` in token order; differentiable.
    """
    _check(qkv, T, S, mode)
    return STAttentionFunction.apply(qkv, int(T), int(S), str(mode))
