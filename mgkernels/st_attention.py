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

Algorithm: flash-attention-2. The forward saves ``lse: [B, H, T*S]`` (fp32, natural log, indexed by token).
Sequences longer than a packed tile (spatial, S = 256) take the flash loop over key blocks. Short sequences
(temporal, T <= 64; <= 32 in fp32) are *packed*: several sequences share one 64-row tile under a
block-diagonal mask, so the matmuls run on wgmma and there are 4-8x fewer programs; one fused backward kernel
then computes delta, dQ, dK and dV of a packed tile (q/k/v/o/dO read once). The head dim is split into
power-of-two parts (72 = 64 + 16, see :mod:`mgkernels._tiles`) and row strides are passed so that 16-byte
alignment is visible to the compiler. fp32 accumulation; fp32/fp16/bf16 inputs (float64 and other dtypes use
the PyTorch reference).

One-pass backward of the flash path (one kernel, ``_st_attn_bwd_kernel``; :mod:`mgkernels.gated_cross_attn` uses
the same scheme). A program owns one key block (BLOCK_N keys) of one split of a sequence's queries
(``SPLIT_ROWS`` = 256 queries: the whole sequence at S = 256). Pass A loops over the split's queries in blocks
of BLOCK_M = 16 and keeps dK, dV in registers: delta = rowsum(dO * O), P^T, dV += P^T dO, dP^T, dS^T, dK += dS^T
Q -- 4 GEMMs, q / dO / o / lse read once per key block (L2 hits after the first) -- and stores each dS^T tile
(q's dtype) in a scratch buffer. The last of the split's key-block programs to arrive (an acq_rel counter:
the hand-off never waits) then computes dQ = dS K over all keys (1 GEMM, wgmma M = 64) and drops the split's dS from L2
(``discard.global.L2``). So every input is read from DRAM once and every gradient written once, 5 GEMMs instead
of the 7 of a dK/dV + dQ pair, and no fp32 dQ accumulator, no float atomics on dQ (deterministic while a
sequence is one split). The dS scratch is assumed to stay in L2 between its store and its read (they happen
within one program lifetime, in programs that run side by side; ~13 MB in flight on an H100 / H200 of 50 MB L2)
and is never written back. Sequences longer than a split (S > 256) add a reduction of the key blocks' dK / dV
partials over the splits: fp32 atomics into an accumulator that the split first to arrive zero-fills
(``split_open`` / ``split_close`` in :mod:`mgkernels._tiles`). Why not a dQ accumulator (FA2/3): a single pass
that keeps dK, dV and a dQ tile in registers needs more than the 168 registers of 3 CTAs/SM at 64 x 64 tiles in
Triton (measured with the compile report), and an fp32 dQ accumulator costs a memset, the atomics and a
conversion pass over 2x the dQ bytes.

Dispatch (:mod:`mgkernels.dispatch`): ``triton``, ``csrc`` (fp32 CPU tensors: the C++ short-sequence
attention of :mod:`mgkernels._cpu_attention`, reading the same qkv views) or ``ref`` is chosen at run time
inside the custom ops ``mgkernels::st_attention_fwd`` and ``mgkernels::st_attention_bwd``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _cpu_attention
from ._common import pow2, providers_for, tl, triton
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
from .dispatch import attention_route, choose, interpreter_enabled

__all__ = ["st_attention", "st_attention_ref", "STAttentionFunction", "MODES"]

MODES = ("spatial", "temporal")
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
#
# Tiles. A program owns BLOCK_M query rows of one head. Long sequences (spatial: S tokens) take the
# flash-attention-2 loop over key blocks. Short sequences (temporal: T frames, or tiny frames) are *packed*:
# PACK = BLOCK_M // LP sequences of (padded) length LP share one tile, and a block-diagonal mask keeps them
# apart, so the matmuls are big enough for wgmma and there are PACK x fewer programs.
# Head dim: split into D0 + D1 (see mgkernels._tiles). Grid: 1-D, the query/key block index fastest, so the
# programs that share a sequence's K/V run side by side (L2 hits) and there is no 65,535 grid-axis limit.
# Row strides arrive divided by VEC (elements per 16 bytes) and are multiplied back by the constexpr VEC.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _tile_rows(pid, NB, H, NGP, G, L, GS, IS, BLOCK: tl.constexpr, PACK: tl.constexpr, LP: tl.constexpr):
    """Decode a program id into (b, h, block index, the tile's token indices [BLOCK] int64, row validity,
    pack slot of every row)."""
    blk = pid % NB
    rest = pid // NB
    h = rest % H
    rest = rest // H
    gp = rest % NGP
    b = rest // NGP
    r = tl.arange(0, BLOCK)
    if PACK > 1:
        slot = r // LP
        i = r % LP
    else:
        slot = r * 0
        i = blk * BLOCK + r
    g = gp * PACK + slot
    ok = (i < L) & (g < G)
    tok = g.to(tl.int64) * GS + i.to(tl.int64) * IS
    return b, h, blk, tok, ok, slot

@triton.jit
def _st_attn_fwd_kernel(
    QKV, OUT, LSE,
    s_qb, s_qn, s_q3, s_qh, s_qd,
    s_ob, s_on, s_oc,
    s_lb, s_lh, s_ln,
    H, G, L, GS, IS, NGP, NM,
    sm_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1A: tl.constexpr, VEC: tl.constexpr,
    PACK: tl.constexpr, LP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b, h, blk, tok_m, ok_m, slot_m = _tile_rows(pid, NM, H, NGP, G, L, GS, IS, BLOCK_M, PACK, LP)
    q_base = QKV + b * (s_qb * VEC) + h * (s_qh * VEC)
    k_base = q_base + s_q3 * VEC
    v_base = k_base + s_q3 * VEC
    rows_m = tok_m * (s_qn * VEC)
    q0, q1 = load_head(q_base, rows_m, ok_m, s_qd, HEAD_DIM, D0, D1)

    if PACK > 1:  # packed short sequences: the keys are the tile's own rows, block-diagonal mask
        k0, k1 = load_head(k_base, rows_m, ok_m, s_qd, HEAD_DIM, D0, D1)
        v0, v1 = load_head(v_base, rows_m, ok_m, s_qd, HEAD_DIM, D0, D1)
        s = dot_heads(q0, q1, k0, k1, D1, DOT_FP32) * sm_scale_log2
        s = tl.where(ok_m[None, :] & (slot_m[:, None] == slot_m[None, :]), s, float("-inf"))
        m_i = tl.max(s, 1)
        m_i = tl.where(m_i == float("-inf"), 0.0, m_i)  # an empty pack slot: p = 0 instead of NaN
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc0 = mm(p.to(v0.dtype), v0, tl.zeros([BLOCK_M, D0], tl.float32), DOT_FP32)
        acc1 = tl.zeros([BLOCK_M, D1A], tl.float32)
        if D1 > 0:
            acc1 = mm(p.to(v1.dtype), v1, acc1, DOT_FP32)
    else:  # flash-attention-2 over the key blocks of one sequence
        g_tok = (pid // NM // H % NGP).to(tl.int64) * GS  # first token of the sequence
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1A], tl.float32)
        for start_n in range(0, L, BLOCK_N):
            j = start_n + tl.arange(0, BLOCK_N)
            ok_n = j < L
            rows_n = (g_tok + j.to(tl.int64) * IS) * (s_qn * VEC)
            k0, k1 = load_head(k_base, rows_n, ok_n, s_qd, HEAD_DIM, D0, D1)
            v0, v1 = load_head(v_base, rows_n, ok_n, s_qd, HEAD_DIM, D0, D1)
            s = dot_heads(q0, q1, k0, k1, D1, DOT_FP32) * sm_scale_log2
            s = tl.where(ok_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds a valid key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc0 = mm(p.to(v0.dtype), v0, acc0 * alpha[:, None], DOT_FP32)
            if D1 > 0:
                acc1 = mm(p.to(v1.dtype), v1, acc1 * alpha[:, None], DOT_FP32)
            m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    inv = 1.0 / l_safe
    o_rows = tok_m * (s_on * VEC) + (h * HEAD_DIM) * s_oc
    store_head(OUT + b * (s_ob * VEC), o_rows, ok_m, s_oc, acc0 * inv[:, None], acc1 * inv[:, None],
               HEAD_DIM, D0, D1)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log
    tl.store(LSE + b * s_lb + h * s_lh + tok_m * s_ln, lse, mask=ok_m)

@triton.jit
def _st_attn_bwd_kernel(
    QKV, OUT, DO, LSE, DQKV, DS, CNT, KCNT, DKV,
    s_qb, s_qn, s_q3, s_qh, s_qd,
    s_ob, s_on, s_oc,
    s_db, s_dn, s_dc,
    s_lb, s_lh, s_ln,
    s_gb, s_gn, s_g3, s_gh, s_gd,
    H, G, L, GS, IS, NGP, NN, NQS, SEQ0,
    sm_scale, sm_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1A: tl.constexpr, VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, CQ: tl.constexpr, LK: tl.constexpr,
    SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, DISCARD: tl.constexpr,
):  # fmt: skip
    # program (sequence, query split, key block), the key block fastest: the one-pass backward (module docstring)
    pid = tl.program_id(0).to(tl.int64)
    kb = pid % NN
    qs = pid // NN % NQS
    ls = pid // NN // NQS  # sequence of this launch
    seq = SEQ0 + ls  # (b, group, h)
    h = seq % H
    b = seq // H // NGP
    g_tok = (seq // H % NGP) * GS  # first token of the sequence
    j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = j < L
    tok_n = g_tok + j.to(tl.int64) * IS
    q_base = QKV + b * (s_qb * VEC) + h * (s_qh * VEC)
    k_base = q_base + s_q3 * VEC
    k0, k1 = load_head(k_base, tok_n * (s_qn * VEC), ok_n, s_qd, HEAD_DIM, D0, D1)
    v0, v1 = load_head(k_base + s_q3 * VEC, tok_n * (s_qn * VEC), ok_n, s_qd, HEAD_DIM, D0, D1)
    o_base = OUT + b * (s_ob * VEC) + (h * HEAD_DIM) * s_oc
    do_base = DO + b * (s_db * VEC) + (h * HEAD_DIM) * s_dc
    l_base = LSE + b * s_lb + h * s_lh
    g_base = DQKV + b * (s_gb * VEC) + h * (s_gh * VEC)
    ds_base = DS + (ls * NQS + qs) * (CQ * LK)  # dS of this split: [CQ query rows, LK key columns]
    kv_acc = DKV + (ls * NN + kb) * (2 * BLOCK_N * (D0 + D1A))
    if SPLIT:
        split_open(kv_acc, KCNT + 3 * (ls * NN + kb), BLOCK_N, D0, D1A)
    m_tok = g_tok + (qs * CQ) * IS  # the split's first query token
    LR = L - (qs * CQ).to(tl.int32)  # queries from the split's first on (masks: keeps L's divisibility by 16)
    LM = tl.where(qs < NQS - 1, CQ, LR)  # the split's queries

    # pass A: dK, dV of the key block over the split's queries; dS^T of each query block stored (for dQ)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1A], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1A], tl.float32)
    for start_m in range(0, LM, BLOCK_M):
        i = start_m + tl.arange(0, BLOCK_M)
        ok_m = i < LR
        tok_m = m_tok + i.to(tl.int64) * IS
        q0, q1 = load_head(q_base, tok_m * (s_qn * VEC), ok_m, s_qd, HEAD_DIM, D0, D1)
        do0, do1 = load_head(do_base, tok_m * (s_dn * VEC), ok_m, s_dc, HEAD_DIM, D0, D1)
        o0, o1 = load_head(o_base, tok_m * (s_on * VEC), ok_m, s_oc, HEAD_DIM, D0, D1)
        delta = row_dot(o0, o1, do0, do1, D1)
        lse = tl.load(l_base + tok_m * s_ln, mask=ok_m, other=0.0) * 1.4426950408889634
        sT = dot_heads(k0, k1, q0, q1, D1, DOT_FP32) * sm_scale_log2 - lse[None, :]  # [BN, BM], base 2
        pT = tl.exp2(tl.where(ok_n[:, None] & ok_m[None, :], sT, float("-inf")))  # padding keys: 0 (dS enters dQ)
        dv0 = mm(pT.to(do0.dtype), do0, dv0, DOT_FP32)
        if D1 > 0:
            dv1 = mm(pT.to(do1.dtype), do1, dv1, DOT_FP32)
        dsT = (pT * (dot_heads(v0, v1, do0, do1, D1, DOT_FP32) - delta[None, :])).to(q0.dtype)
        dk0 = mm(dsT, q0, dk0, DOT_FP32)
        if D1 > 0:
            dk1 = mm(dsT, q1, dk1, DOT_FP32)
        tl.store(ds_base + i[None, :] * LK + j[:, None], dsT)  # padding rows / keys: 0

    write = True
    if SPLIT:
        dk0, dk1, dv0, dv1, write = split_close(kv_acc, KCNT + 3 * (ls * NN + kb), NQS, dk0, dk1, dv0, dv1, D1,
                                                DISCARD)
    g_rows = tok_n * (s_gn * VEC)
    store_head(g_base + s_g3 * VEC, g_rows, ok_n & write, s_gd, dk0 * sm_scale, dk1 * sm_scale, HEAD_DIM, D0, D1)
    store_head(g_base + 2 * s_g3 * VEC, g_rows, ok_n & write, s_gd, dv0, dv1, HEAD_DIM, D0, D1)

    # dQ: the last of the split's NN programs computes dQ = dS K over all keys (the others' dS: L2 reads)
    if arrive(CNT + ls * NQS + qs, NN):
        for start_q in range(0, LM, BLOCK_Q):
            iq = start_q + tl.arange(0, BLOCK_Q)
            ok_q = iq < LR
            dq0 = tl.zeros([BLOCK_Q, D0], tl.float32)
            dq1 = tl.zeros([BLOCK_Q, D1A], tl.float32)
            for start_n in range(0, L, BLOCK_N):
                jn = start_n + tl.arange(0, BLOCK_N)
                ok_jn = jn < L
                kn0, kn1 = load_head(k_base, (g_tok + jn.to(tl.int64) * IS) * (s_qn * VEC), ok_jn, s_qd, HEAD_DIM,
                                     D0, D1)
                ds = tl.load(ds_base + iq[:, None] * LK + jn[None, :], mask=ok_q[:, None], other=0.0,
                             cache_modifier=".cg")
                dq0 = mm(ds, kn0, dq0, DOT_FP32)
                if D1 > 0:
                    dq1 = mm(ds, kn1, dq1, DOT_FP32)
            store_head(g_base, (m_tok + iq.to(tl.int64) * IS) * (s_gn * VEC), ok_q, s_gd, dq0 * sm_scale,
                       dq1 * sm_scale, HEAD_DIM, D0, D1)
        if DISCARD:  # the split's dS is dead: drop it from L2
            tl.debug_barrier()
            for start_q in range(0, LM, BLOCK_Q):
                for start_n in range(0, L, BLOCK_N):
                    discard_l2(row_lines(ds_base + start_q * LK + start_n, BLOCK_Q, BLOCK_N, LK))


@triton.jit
def _st_attn_bwd_packed_kernel(
    QKV, OUT, DO, LSE, DQKV,
    s_qb, s_qn, s_q3, s_qh, s_qd,
    s_ob, s_on, s_oc,
    s_db, s_dn, s_dc,
    s_lb, s_lh, s_ln,
    s_gb, s_gn, s_g3, s_gh, s_gd,
    H, G, L, GS, IS, NGP,
    sm_scale, sm_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1A: tl.constexpr, VEC: tl.constexpr,
    PACK: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    # whole sequences in one tile (PACK of them, block-diagonal): delta, dQ, dK, dV in one program
    pid = tl.program_id(0).to(tl.int64)
    b, h, blk, tok, ok, slot = _tile_rows(pid, 1, H, NGP, G, L, GS, IS, BLOCK, PACK, LP)
    q_base = QKV + b * (s_qb * VEC) + h * (s_qh * VEC)
    rows = tok * (s_qn * VEC)
    q0, q1 = load_head(q_base, rows, ok, s_qd, HEAD_DIM, D0, D1)
    k0, k1 = load_head(q_base + s_q3 * VEC, rows, ok, s_qd, HEAD_DIM, D0, D1)
    v0, v1 = load_head(q_base + 2 * s_q3 * VEC, rows, ok, s_qd, HEAD_DIM, D0, D1)
    o0, o1 = load_head(OUT + b * (s_ob * VEC) + (h * HEAD_DIM) * s_oc, tok * (s_on * VEC), ok, s_oc,
                       HEAD_DIM, D0, D1)
    do0, do1 = load_head(DO + b * (s_db * VEC) + (h * HEAD_DIM) * s_dc, tok * (s_dn * VEC), ok, s_dc,
                         HEAD_DIM, D0, D1)
    delta = row_dot(o0, o1, do0, do1, D1)
    lse = tl.load(LSE + b * s_lb + h * s_lh + tok * s_ln, mask=ok, other=0.0) * 1.4426950408889634

    p = tl.exp2(dot_heads(q0, q1, k0, k1, D1, DOT_FP32) * sm_scale_log2 - lse[:, None])  # [BLOCK, BLOCK]
    p = tl.where(ok[:, None] & ok[None, :] & (slot[:, None] == slot[None, :]), p, 0.0)
    ds = p * (dot_heads(do0, do1, v0, v1, D1, DOT_FP32) - delta[:, None])
    pT = tl.trans(p).to(do0.dtype)
    dsT = tl.trans(ds)
    g_base = DQKV + b * (s_gb * VEC) + h * (s_gh * VEC)
    g_rows = tok * (s_gn * VEC)
    dv0 = mm(pT, do0, tl.zeros([BLOCK, D0], tl.float32), DOT_FP32)
    dv1 = tl.zeros([BLOCK, D1A], tl.float32)
    if D1 > 0:
        dv1 = mm(pT, do1, dv1, DOT_FP32)
    store_head(g_base + 2 * s_g3 * VEC, g_rows, ok, s_gd, dv0, dv1, HEAD_DIM, D0, D1)
    dq0 = mm(ds.to(k0.dtype), k0, tl.zeros([BLOCK, D0], tl.float32), DOT_FP32)
    dq1 = tl.zeros([BLOCK, D1A], tl.float32)
    if D1 > 0:
        dq1 = mm(ds.to(k1.dtype), k1, dq1, DOT_FP32)
    store_head(g_base, g_rows, ok, s_gd, dq0 * sm_scale, dq1 * sm_scale, HEAD_DIM, D0, D1)
    dk0 = mm(dsT.to(q0.dtype), q0, tl.zeros([BLOCK, D0], tl.float32), DOT_FP32)
    dk1 = tl.zeros([BLOCK, D1A], tl.float32)
    if D1 > 0:
        dk1 = mm(dsT.to(q1.dtype), q1, dk1, DOT_FP32)
    store_head(g_base + s_g3 * VEC, g_rows, ok, s_gd, dk0 * sm_scale, dk1 * sm_scale, HEAD_DIM, D0, D1)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _geometry(T: int, S: int, mode: str) -> tuple[int, int, int, int]:
    """(G groups per batch element, L sequence length, GS group stride, IS element stride) in tokens."""
    return (T, S, S, 1) if mode == "spatial" else (S, T, 1, S)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs: exact fp32 dots (IEEE, no TF32). Under the interpreter every dot runs in fp32 (it is
    # exact there and the interpreter mishandles low-precision arithmetic). On GPU fp16/bf16 tiles feed the
    # tensor cores directly with fp32 accumulation.
    return dtype == torch.float32 or interpreter_enabled()


# Tile configurations: the same on the GPU and under the CPU interpreter (the tests exercise what the GPU
# runs). Each was checked in the sm_90 compile report (bench/compile_report.py): no spills, 128-bit loads,
# HGMMA for fp16/bf16. fp32 runs exact IEEE products on the FMA units: smaller tiles.
_PACK = {"tc": (64, 4), "fp32": (32, 8)}  # (rows, warps) of a packed tile; sequences up to `rows` are packed
_FLASH = {  # forward: (BLOCK_M, BLOCK_N, warps, stages); backward: (BLOCK_M, BLOCK_N, BLOCK_Q, warps, stages)
    "tc": dict(fwd=(64, 64, 4, 2), bwd=(16, 64, 64, 4, 1)),
    "fp32": dict(fwd=(32, 32, 4, 2), bwd=(16, 32, 32, 4, 1)),
}
def _config(L: int, D: int, dtype: torch.dtype) -> dict:
    kind = "fp32" if dtype == torch.float32 else "tc"
    D0, D1 = head_split(D)
    lp = pow2(L)
    rows, warps = _PACK[kind]
    cfg = dict(D0=D0, D1=D1, D1A=D1 or 16, HEAD_DIM=D, packed=lp <= rows, fp32=kind == "fp32")
    if cfg["packed"]:
        cfg.update(PACK=rows // lp, LP=lp, BLOCK=rows, warps=warps)
    cfg.update(_FLASH[kind])
    return cfg


def _st_attention_fwd_triton(qkv: torch.Tensor, T: int, S: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, _, H, D = qkv.shape
    G, L, GS, IS = _geometry(T, S, mode)
    o = torch.empty(B, N, H * D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, H, N, device=qkv.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    cfg = _config(L, D, qkv.dtype)
    vec = vec_for([qkv, o], D)
    heads = dict(HEAD_DIM=D, D0=cfg["D0"], D1=cfg["D1"], D1A=cfg["D1A"], VEC=vec, DOT_FP32=_dot_fp32(qkv.dtype))
    if cfg["packed"]:
        pack, lp, bm, bn, warps, stages = cfg["PACK"], cfg["LP"], cfg["BLOCK"], cfg["BLOCK"], cfg["warps"], 1
    else:
        pack, lp = 1, 1
        bm, bn, warps, stages = cfg["fwd"]
    ngp = triton.cdiv(G, pack)
    nm = triton.cdiv(L, bm) if pack == 1 else 1
    _st_attn_fwd_kernel[(B * ngp * H * nm,)](
        qkv, o, lse,
        *div_rows(qkv, vec), *div_rows(o, vec), *lse.stride(),
        H, G, L, GS, IS, ngp, nm,
        D**-0.5 * _LOG2E,
        PACK=pack, LP=lp, BLOCK_M=bm, BLOCK_N=bn, **heads, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o, lse


def _st_attention_bwd_triton(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, T: int,
                             S: int, mode: str, rows_per_split: int | None = None) -> torch.Tensor:  # fmt: skip
    B, N, _, H, D = qkv.shape
    G, L, GS, IS = _geometry(T, S, mode)
    dqkv = torch.empty(B, N, 3, H, D, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv
    cfg = _config(L, D, qkv.dtype)
    vec = vec_for([qkv, o, do, dqkv], D)
    heads = dict(HEAD_DIM=D, D0=cfg["D0"], D1=cfg["D1"], D1A=cfg["D1A"], VEC=vec, DOT_FP32=_dot_fp32(qkv.dtype))
    scale = D**-0.5
    qs, os_, ds_, gs = div_rows(qkv, vec), div_rows(o, vec), div_rows(do, vec), div_rows(dqkv, vec)
    if cfg["packed"]:
        ngp = triton.cdiv(G, cfg["PACK"])
        _st_attn_bwd_packed_kernel[(B * ngp * H,)](
            qkv, o, do, lse, dqkv,
            *qs, *os_, *ds_, *lse.stride(), *gs,
            H, G, L, GS, IS, ngp, scale, scale * _LOG2E,
            PACK=cfg["PACK"], LP=cfg["LP"], BLOCK=cfg["BLOCK"], **heads, num_warps=cfg["warps"], num_stages=1,
        )  # fmt: skip
        return dqkv

    # one-pass backward (module docstring): programs (sequence, query split, key block); dS scratch of every
    # split of the launch's sequences, fp32 dK / dV sums when a sequence has several splits, zeroed counters
    bm, bn, bq, warps, stages = cfg["bwd"]
    nn_ = triton.cdiv(L, bn)
    cq = split_rows(L, max(bm, bq), rows_per_split)
    nqs = triton.cdiv(L, cq)
    split = nqs > 1
    seqs = B * G * H
    chunk = max(1, min(seqs, SCRATCH_BYTES // (nqs * cq * nn_ * bn * qkv.element_size())))  # sequences per launch
    ds = torch.empty(chunk * nqs * cq * nn_ * bn, device=qkv.device, dtype=qkv.dtype)
    dkv = torch.empty(chunk * nn_ * 2 * bn * (cfg["D0"] + cfg["D1A"]) if split else 1, device=qkv.device,
                      dtype=torch.float32)
    discard = not interpreter_enabled() and bn * qkv.element_size() % 128 == 0  # whole 128-byte lines
    regs = {} if cfg["fp32"] else {"maxnreg": MAXNREG}  # fp16 / bf16: <= 168 registers, 3 CTAs per SM
    for seq0 in range(0, seqs, chunk):
        n = min(chunk, seqs - seq0)
        cnt = torch.zeros(n * nqs + (3 * n * nn_ if split else 0), device=qkv.device, dtype=torch.int32)
        kcnt = cnt[n * nqs:] if split else cnt
        _st_attn_bwd_kernel[(n * nqs * nn_,)](
            qkv, o, do, lse, dqkv, ds, cnt, kcnt, dkv,
            *qs, *os_, *ds_, *lse.stride(), *gs,
            H, G, L, GS, IS, G, nn_, nqs, seq0, scale, scale * _LOG2E,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_Q=bq, CQ=cq, LK=nn_ * bn, SPLIT=split, **heads,
            DISCARD=discard, num_warps=warps, num_stages=stages, **regs,
        )  # fmt: skip
    return dqkv


# ----------------------------------------------------------------------------------------------------------
# Custom ops (run-time dispatch; opaque to torch.compile)
# ----------------------------------------------------------------------------------------------------------


def _provider(qkv: torch.Tensor) -> str:
    """Triton on CUDA (or where asked), the C++ kernel on an fp32 CPU tensor when it is built, else the reference."""
    implemented = ("triton", "csrc", "ref") if _cpu_attention.usable(qkv) else ("triton", "ref")
    return choose("st_attention", qkv, providers_for(qkv, implemented), csrc_fn="attention_fwd")


@torch.library.custom_op("mgkernels::st_attention_fwd", mutates_args=())
def st_attention_fwd(qkv: torch.Tensor, T: int, S: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T*S, H*D] in qkv's dtype, lse [B, H, T*S] fp32 natural-log log-sum-exp by token)."""
    _check(qkv, T, S, mode)
    provider = _provider(qkv)
    if provider == "triton":
        return _st_attention_fwd_triton(qkv, T, S, mode)
    if provider == "csrc":
        return torch.ops.mgkernels.csrc_st_attention_fwd(qkv, T, S, mode)
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
    provider = _provider(qkv)
    if provider == "triton":
        return _st_attention_bwd_triton(do, qkv, o, lse, T, S, mode)
    if provider == "csrc":
        return torch.ops.mgkernels.csrc_st_attention_bwd(do, qkv, o, lse, T, S, mode)
    return _ref_bwd(do, qkv, T, S, mode)


@st_attention_bwd.register_fake
def _(do, qkv, o, lse, T, S, mode):
    return qkv.new_empty(qkv.shape)


# ----------------------------------------------------------------------------------------------------------
# Autograd + functional API
# ----------------------------------------------------------------------------------------------------------


def _op_pair(csrc: bool):
    """(forward, backward): the C++ kernel's dispatcher operators, or the custom ops (provider chosen at run time)."""
    m = torch.ops.mgkernels
    return (m.csrc_st_attention_fwd, m.csrc_st_attention_bwd) if csrc else (m.st_attention_fwd, m.st_attention_bwd)


class STAttentionFunction(torch.autograd.Function):
    """o = st_attention(qkv); backward returns dqkv in qkv's [B, T*S, 3, H, D] layout. ``csrc``: through the C++
    kernel's dispatcher operators (``torch.ops.mgkernels.csrc_*``, no custom-op layer) instead of the custom ops."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, T: int, S: int, mode: str, csrc: bool) -> torch.Tensor:
        o, lse = _op_pair(csrc)[0](qkv, T, S, mode)
        ctx.save_for_backward(qkv, o, lse)
        ctx.geometry = (T, S, mode, csrc)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        qkv, o, lse = ctx.saved_tensors
        T, S, mode, csrc = ctx.geometry
        dqkv = _op_pair(csrc)[1](do, qkv, o, lse, T, S, mode)
        return dqkv, None, None, None, None


def st_attention(qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """Spatial (``mode="spatial"``) or temporal (``mode="temporal"``) self-attention of STDiT.

    ``qkv: [B, T*S, 3, H, D]`` (any strides) -> ``o: [B, T*S, H*D]`` in token order; differentiable.
    """
    _check(qkv, T, S, mode)
    T, S, mode = int(T), int(S), str(mode)
    route = attention_route(qkv, _cpu_attention.usable(qkv), lambda: _provider(qkv))  # see mgkernels.dispatch
    if route == "ref":
        # SDPA under autograd (ATen's fused CPU attention and its backward) beats the custom op's reference pair,
        # which recomputes the scores for the LSE and again in the hand-written backward (1.3-1.7x on the demo's
        # CPU training step, docs/demo_recipe.md section 11); under compile on a CPU it is traced
        return st_attention_ref(qkv, T, S, mode)
    csrc = route == "csrc"  # the C++ operators, no custom-op layer (eager, and in compiled graphs)
    if csrc and not (torch.is_grad_enabled() and qkv.requires_grad):
        return _op_pair(True)[0](qkv, T, S, mode)[0]
    return STAttentionFunction.apply(qkv, T, S, mode, csrc)
