"""Fused gated residual + S-AdaLN: ``x_new = x + gate * h; y = LayerNorm(x_new) * (1 + scale) + shift``.

The pattern between every pair of STDiT sub-blocks (a branch output joins the residual stream, and the next
branch reads its modulated LayerNorm), done in one pass over memory: read x, h; write x_new, y.

Shapes: x, h ``[B, N, C]`` (same shape; h may have another float dtype, it is upcast); gate, shift, scale
``[B, 1, C]``, ``[B, C]`` or ``[C]``; ``gate=None`` means 1 (an un-gated residual such as STDiT's
cross-attention). Returns ``(x_new, y)``, both with x's dtype. LayerNorm statistics are taken from x_new
rounded to x's dtype (what is stored and what the next residual add reads), in fp32 (fp64 for fp64).
Backward: dx (= d x_new total), dh, dgate, dshift, dscale; token reductions as in ``modulate``.

Providers (mgkernels.dispatch): ``triton`` (CUDA, or the CPU interpreter), ``csrc`` (C++ extension, CPU),
``ref`` (PyTorch).
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import check_tokens, compute_dtype, per_sample, providers_for, row_split, row_tile, tl, triton
from .dispatch import choose, traced_ref
from .modulate import _reduce_to, ln_modulate_bwd_ref
from .modulate import _traced as _modulate_traced

PROVIDERS = ("triton", "csrc", "ref")
# resident programs per SM of the forward / backward kernels at C = 1152 by element size (sm_90 compile
# report): each grid is one full wave of that many programs per SM
_PER_SM = {2: (4, 3), 4: (5, 2)}


# ---------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------


def residual_modulate_ref(x, h, gate, shift, scale, eps: float = 1e-6):
    """The plain PyTorch expression (test oracle in fp64, benchmark baseline, torch.compile target)."""
    B, N, C = check_tokens(x)
    shift, scale = per_sample(shift, B, C, "shift")[:, None], per_sample(scale, B, C, "scale")[:, None]
    x_new = x + (h if gate is None else per_sample(gate, B, C, "gate")[:, None] * h)
    return x_new, torch.nn.functional.layer_norm(x_new, (C,), eps=eps) * (1 + scale) + shift


def _fwd_ref(x, h, gate, shift, scale, eps):
    cd = compute_dtype(x.dtype)
    upd = h.to(cd) if gate is None else gate.to(cd)[:, None] * h.to(cd)
    x_new = (x.to(cd) + upd).to(x.dtype)
    xf = x_new.to(cd)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[..., None]) * rstd[..., None] * (1 + scale.to(cd)[:, None]) + shift.to(cd)[:, None]
    return x_new, y.to(x.dtype), mean, rstd


def _bwd_ref(dy, dxnew, h, gate, x_new, scale, mean, rstd):
    cd = compute_dtype(x_new.dtype)
    xhat = (x_new.to(cd) - mean.to(cd)[..., None]) * rstd.to(cd)[..., None]
    dxt, ds, dsh = ln_modulate_bwd_ref(dy.to(cd), xhat, rstd.to(cd), scale.to(cd))
    if dxnew is not None:
        dxt = dxt + dxnew.to(cd)

    def tokens_sum(t, like):  # [B, N, C] -> [Bs, C] with Bs = like.shape[0]
        t = t.sum(1)
        return t.sum(0, keepdim=True) if like.shape[0] == 1 else t

    dscale, dshift = tokens_sum(ds, scale), tokens_sum(dsh, scale)
    if gate is None:
        dh, dgate = x_new.new_empty(0), dxt.new_empty(0)
    else:
        dh, dgate = (dxt * gate.to(cd)[:, None]).to(h.dtype), tokens_sum(dxt * h.to(cd), gate)
    return dxt.to(x_new.dtype), dh, dgate, dshift, dscale


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _resmod_fwd_kernel(
    X, H, GATE, SHIFT, SCALE, XN, Y, MEAN, RSTD,
    N, C, rows_per_prog,
    stride_xb, stride_xn, stride_xc,
    stride_hb, stride_hn, stride_hc,
    stride_gb, stride_sb,
    eps,
    HAS_GATE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (b, chunk of rows_per_prog tokens); ROWS rows per step (see mgkernels._common.row_tile)
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = tl.load(SHIFT + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    one_plus_scale = 1.0 + tl.load(SCALE + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for i in range(0, rows_per_prog, ROWS):
        n = chunk * rows_per_prog + i + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
        rmask = n < N
        m = rmask[:, None] & cmask[None, :]
        row = b * N + n
        x = tl.load(X + b * stride_xb + (n * stride_xn)[:, None] + (cols * stride_xc)[None, :], mask=m,
                    other=0.0).to(tl.float32)
        h = tl.load(H + b * stride_hb + (n * stride_hn)[:, None] + (cols * stride_hc)[None, :], mask=m,
                    other=0.0).to(tl.float32)
        if HAS_GATE:
            xn = x + gate * h
        else:
            xn = x + h
        xn_st = xn.to(XN.dtype.element_ty)
        tl.store(XN + (row * C)[:, None] + cols[None, :], xn_st, mask=m)
        xn = xn_st.to(tl.float32)
        mean = tl.sum(xn, axis=1) / C
        xc = tl.where(m, xn - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        y = xc * rstd[:, None] * one_plus_scale + shift
        tl.store(Y + (row * C)[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + row, mean, mask=rmask)
        tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit
def _resmod_bwd_kernel(
    DY, DXN, H, GATE, XN, SCALE, MEAN, RSTD,
    DX, DH, DGATE_P, DSCALE_P, DSHIFT_P,
    N, C, rows_per_prog, n_chunks,
    stride_dyb, stride_dyn, stride_dyc,
    stride_db, stride_dn, stride_dc,
    stride_hb, stride_hn, stride_hc,
    stride_gb, stride_sb,
    HAS_GATE: tl.constexpr,
    HAS_DXN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    one_plus_scale = 1.0 + tl.load(SCALE + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, rows_per_prog, ROWS):
        n = chunk * rows_per_prog + i + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
        rmask = n < N
        m = rmask[:, None] & cmask[None, :]
        row = b * N + n
        dy = tl.load(DY + b * stride_dyb + (n * stride_dyn)[:, None] + (cols * stride_dyc)[None, :], mask=m,
                     other=0.0).to(tl.float32)
        xn = tl.load(XN + (row * C)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0)
        xhat = tl.where(m, (xn - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * one_plus_scale
        c1 = tl.sum(g, axis=1) / C
        c2 = tl.sum(g * xhat, axis=1) / C
        dxt = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        if HAS_DXN:
            dxt += tl.load(DXN + b * stride_db + (n * stride_dn)[:, None] + (cols * stride_dc)[None, :], mask=m,
                           other=0.0).to(tl.float32)
        tl.store(DX + (row * C)[:, None] + cols[None, :], dxt.to(DX.dtype.element_ty), mask=m)
        if HAS_GATE:
            h = tl.load(H + b * stride_hb + (n * stride_hn)[:, None] + (cols * stride_hc)[None, :], mask=m,
                        other=0.0).to(tl.float32)
            tl.store(DH + (row * C)[:, None] + cols[None, :], (dxt * gate).to(DH.dtype.element_ty), mask=m)
            acc_gate += tl.sum(dxt * h, axis=0)
        acc_scale += tl.sum(dy * xhat, axis=0)
        acc_shift += tl.sum(dy, axis=0)
    part = (b * n_chunks + chunk) * C
    tl.store(DSCALE_P + part + cols, acc_scale, mask=cmask)
    tl.store(DSHIFT_P + part + cols, acc_shift, mask=cmask)
    if HAS_GATE:
        tl.store(DGATE_P + part + cols, acc_gate, mask=cmask)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------


def _fwd_triton(x, h, gate, shift, scale, eps):
    B, N, C = x.shape
    shift, scale = shift.contiguous(), scale.contiguous()
    gate_t = gate.contiguous() if gate is not None else shift
    x_new = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    y = torch.empty_like(x_new)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    tile = row_tile(C, streams=2, esize=x.element_size())
    chunks, rows = row_split(x, B, N, tile["ROWS"], per_sm=_PER_SM.get(x.element_size(), (4, 3))[0])
    _resmod_fwd_kernel[(B, chunks)](
        x, h, gate_t, shift, scale, x_new, y, mean, rstd,
        N, C, rows,
        x.stride(0), x.stride(1), x.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        0 if gate_t.shape[0] == 1 else C, 0 if shift.shape[0] == 1 else C,
        eps,
        HAS_GATE=gate is not None, **tile,
    )
    return x_new, y, mean, rstd


def _bwd_triton(dy, dxnew, h, gate, x_new, scale, mean, rstd):
    B, N, C = x_new.shape
    scale = scale.contiguous()
    x_new = x_new.contiguous()  # saved output of the forward: already contiguous
    gate_t = gate.contiguous() if gate is not None else scale
    dxn_t = dxnew if dxnew is not None else dy
    dx = torch.empty((B, N, C), dtype=x_new.dtype, device=x_new.device)
    dh = torch.empty((B, N, C), dtype=h.dtype, device=h.device) if gate is not None else dx.new_empty(0)
    tile = row_tile(C, streams=4, esize=x_new.element_size())
    chunks, rows = row_split(x_new, B, N, tile["ROWS"], per_sm=_PER_SM.get(x_new.element_size(), (4, 3))[1])
    parts = torch.empty((3, B, chunks, C), dtype=torch.float32, device=x_new.device)
    _resmod_bwd_kernel[(B, chunks)](
        dy, dxn_t, h, gate_t, x_new, scale, mean, rstd,
        dx, dh, parts[2], parts[0], parts[1],
        N, C, rows, chunks,
        dy.stride(0), dy.stride(1), dy.stride(2),
        dxn_t.stride(0), dxn_t.stride(1), dxn_t.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        0 if gate_t.shape[0] == 1 else C, 0 if scale.shape[0] == 1 else C,
        HAS_GATE=gate is not None, HAS_DXN=dxnew is not None, **tile,
    )
    red = lambda t, p: t.sum((0, 1) if p.shape[0] == 1 else (1,)).view(p.shape[0], C)  # noqa: E731
    dscale, dshift = red(parts[0], scale), red(parts[1], scale)
    dgate = red(parts[2], gate_t) if gate is not None else dx.new_empty(0, dtype=torch.float32)
    return dx, dh, dgate, dshift, dscale


def _fwd_csrc(x, h, gate, shift, scale, eps):
    g = gate.float().contiguous() if gate is not None else None
    return tuple(_ext.ext().residual_modulate_fwd(
        x.contiguous(), h.to(x.dtype).contiguous(), g, shift.float().contiguous(), scale.float().contiguous(), eps))


def _bwd_csrc(dy, dxnew, h, gate, x_new, scale, mean, rstd):
    g = gate.float().contiguous() if gate is not None else None
    dxn = dxnew.to(x_new.dtype).contiguous() if dxnew is not None else None
    dx, dh, dgate, dshift, dscale = _ext.ext().residual_modulate_bwd(
        dy.to(x_new.dtype).contiguous(), dxn, h.to(x_new.dtype).contiguous(), g, x_new.contiguous(),
        scale.float().contiguous(), mean, rstd)
    if gate is None:
        dh = dx.new_empty(0)
    return dx, dh.to(h.dtype), dgate, dshift, dscale


def _provider(x: torch.Tensor, csrc_fn: str) -> str:
    return choose("residual_modulate", x, providers_for(x, PROVIDERS), csrc_fn)


# ---------------------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mgkernels::residual_modulate_fwd", mutates_args=())
def residual_modulate_fwd(
    x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = {"triton": _fwd_triton, "csrc": _fwd_csrc, "ref": _fwd_ref}[_provider(x, "residual_modulate_fwd")]
    return impl(x, h, gate, shift, scale, eps)


@residual_modulate_fwd.register_fake
def _(x, h, gate, shift, scale, eps):
    B, N, _ = x.shape
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((B, N), dtype=stat), x.new_empty((B, N), dtype=stat)


@torch.library.custom_op("mgkernels::residual_modulate_bwd", mutates_args=())
def residual_modulate_bwd(
    dy: torch.Tensor, dxnew: torch.Tensor | None, h: torch.Tensor, gate: torch.Tensor | None,
    x_new: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = {"triton": _bwd_triton, "csrc": _bwd_csrc, "ref": _bwd_ref}[_provider(x_new, "residual_modulate_bwd")]
    return impl(dy, dxnew, h, gate, x_new, scale, mean, rstd)


@residual_modulate_bwd.register_fake
def _(dy, dxnew, h, gate, x_new, scale, mean, rstd):
    red = torch.float64 if x_new.dtype == torch.float64 else torch.float32
    dh = h.new_empty(h.shape) if gate is not None else x_new.new_empty(0)
    dgate = gate.new_empty(gate.shape, dtype=red) if gate is not None else x_new.new_empty(0, dtype=red)
    return (x_new.new_empty(x_new.shape), dh, dgate,
            scale.new_empty(scale.shape, dtype=red), scale.new_empty(scale.shape, dtype=red))


# ---------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------


class ResidualModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, gate, shift, scale, eps):
        B, N, C = check_tokens(x)
        if h.shape != x.shape:
            raise ValueError(f"h must have x's shape {list(x.shape)}; got {list(h.shape)}")
        vecs = [per_sample(p, B, C, n) for p, n in ((shift, "shift"), (scale, "scale"))]
        if gate is not None:
            vecs.append(per_sample(gate, B, C, "gate"))
        if len({v.shape[0] for v in vecs}) > 1:
            vecs = [v.expand(B, C) for v in vecs]
        shift2, scale2 = vecs[0], vecs[1]
        gate2 = vecs[2] if gate is not None else None
        x_new, y, mean, rstd = torch.ops.mgkernels.residual_modulate_fwd(x, h, gate2, shift2, scale2, eps)
        ctx.save_for_backward(h, gate2, x_new, scale2, mean, rstd)
        ctx.meta = [(p.shape, p.dtype) if p is not None else None for p in (gate, shift, scale)]
        ctx.x_dtype = x.dtype
        return x_new, y

    @staticmethod
    def backward(ctx, dxnew, dy):
        h, gate2, x_new, scale2, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x_new)
        dx, dh, dgate, dshift, dscale = torch.ops.mgkernels.residual_modulate_bwd(
            dy, dxnew, h, gate2, x_new, scale2, mean, rstd)
        gate_m, shift_m, scale_m = ctx.meta
        if gate_m is None:
            dh, dgate = dx.to(h.dtype), None
        else:
            dgate = _reduce_to(dgate, gate_m[0]).to(gate_m[1])
        return (dx.to(ctx.x_dtype), dh, dgate, _reduce_to(dshift, shift_m[0]).to(shift_m[1]),
                _reduce_to(dscale, scale_m[0]).to(scale_m[1]), None)


# ---------------------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------------------


def residual_modulate(x, h, gate, shift, scale, eps: float = 1e-6):
    """``x_new = x + gate * h`` (gate None: ``x + h``) and ``y = LayerNorm(x_new) * (1 + scale) + shift``,
    fused; returns ``(x_new, y)`` in x's dtype. See the module docstring for shapes."""
    if traced_ref(x):  # torch.compile on a CPU: the expression, for Inductor to fuse (mgkernels.dispatch)
        return _traced(x, h, gate, shift, scale, float(eps))
    return ResidualModulateFunction.apply(x, h, gate, shift, scale, float(eps))


def _traced(x, h, gate, shift, scale, eps):
    """:func:`residual_modulate_ref` in x's compute dtype, with ``x_new`` rounded to x's dtype before the norm, as
    the fused op does."""
    B, N, C = check_tokens(x)
    cd = compute_dtype(x.dtype)
    upd = h.to(cd) if gate is None else per_sample(gate, B, C, "gate")[:, None].to(cd) * h.to(cd)
    x_new = (x.to(cd) + upd).to(x.dtype)
    return x_new, _modulate_traced(x_new, shift, scale, eps)
