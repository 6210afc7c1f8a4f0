"""S-AdaLN modulation: ``y = LayerNorm(x) * (1 + scale) + shift`` (no affine, eps 1e-6) in one pass.

Shapes: x ``[B, N, C]``; shift and scale ``[B, 1, C]``, ``[B, C]`` (per sample) or ``[C]`` (shared), each
broadcast over the N tokens (and over B when shared). y has x's shape and dtype; statistics and math are
fp32 (fp64 for fp64 inputs). Backward gives dx, dscale, dshift; the token reduction for dscale/dshift is
done in-kernel into ``[B, P, C]`` partials (P = programs per sample, a few hundred at most) and summed by a
second tiny pass: no ``[B, N, C]`` temporary.

Triton kernels: each program streams a chunk of tokens, ``ROWS`` rows per step (a ``[ROWS, C]`` tile, so
ROWS x C x bytes are loaded per program at once; 128-bit accesses), about 4 programs per SM
(:func:`mgkernels._common.row_split`).

Providers (mgkernels.dispatch): ``triton`` (CUDA, or the CPU interpreter), ``csrc`` (the C++ extension,
CPU), ``ref`` (PyTorch).
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import check_tokens, compute_dtype, per_sample, providers_for, row_split, row_tile, tl, triton
from .dispatch import choose, traced_ref

PROVIDERS = ("triton", "csrc", "ref")
# resident programs per SM of the forward / backward kernels at C = 1152 by element size (sm_90 compile
# report): each grid is one full wave of that many programs per SM
_PER_SM = {2: (4, 3), 4: (5, 4)}


# ---------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------


def modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The plain PyTorch expression (test oracle in fp64, benchmark baseline, torch.compile target)."""
    B, N, C = check_tokens(x)
    shift, scale = per_sample(shift, B, C, "shift")[:, None], per_sample(scale, B, C, "scale")[:, None]
    return torch.nn.functional.layer_norm(x, (C,), eps=eps) * (1 + scale) + shift


def _fwd_ref(x, shift, scale, eps):
    cd = compute_dtype(x.dtype)
    xf = x.to(cd)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[..., None]) * rstd[..., None] * (1 + scale.to(cd)[:, None]) + shift.to(cd)[:, None]
    return y.to(x.dtype), mean, rstd


def ln_modulate_bwd_ref(dy, xhat, rstd, scale):
    """Row-wise backward of ``xhat * (1 + scale) + shift`` through the LayerNorm: returns (dx, dscale_rows,
    dshift_rows) in the compute dtype, with the per-sample token sums still to be taken by the caller."""
    g = dy * (1 + scale[:, None])
    c = xhat.shape[-1]
    dx = rstd[..., None] * (g - g.sum(-1, keepdim=True) / c - xhat * (g * xhat).sum(-1, keepdim=True) / c)
    return dx, dy * xhat, dy


def _bwd_ref(dy, x, scale, mean, rstd):
    cd = compute_dtype(x.dtype)
    xhat = (x.to(cd) - mean.to(cd)[..., None]) * rstd.to(cd)[..., None]
    dx, ds, dsh = ln_modulate_bwd_ref(dy.to(cd), xhat, rstd.to(cd), scale.to(cd))
    dscale, dshift = ds.sum(1), dsh.sum(1)  # [B, C]
    if scale.shape[0] == 1:
        dscale, dshift = dscale.sum(0, keepdim=True), dshift.sum(0, keepdim=True)
    return dx.to(x.dtype), dscale, dshift


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _modulate_fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD,
    N, C, rows_per_prog,
    stride_xb, stride_xn, stride_xc,
    stride_sb,
    eps,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (b, chunk of rows_per_prog tokens); ROWS rows per step: ROWS * C loads in flight per program
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = tl.load(SHIFT + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    one_plus_scale = 1.0 + tl.load(SCALE + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for i in range(0, rows_per_prog, ROWS):
        n = chunk * rows_per_prog + i + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
        rmask = n < N
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(X + b * stride_xb + (n * stride_xn)[:, None] + (cols * stride_xc)[None, :], mask=m,
                    other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        y = xc * rstd[:, None] * one_plus_scale + shift
        row = b * N + n
        tl.store(Y + (row * C)[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + row, mean, mask=rmask)
        tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit
def _modulate_bwd_kernel(
    DY, X, SCALE, MEAN, RSTD, DX, DSCALE_P, DSHIFT_P,
    N, C, rows_per_prog, n_chunks,
    stride_dyb, stride_dyn, stride_dyc,
    stride_xb, stride_xn, stride_xc,
    stride_sb,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    one_plus_scale = 1.0 + tl.load(SCALE + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, rows_per_prog, ROWS):
        n = chunk * rows_per_prog + i + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
        rmask = n < N
        m = rmask[:, None] & cmask[None, :]
        row = b * N + n
        dy = tl.load(DY + b * stride_dyb + (n * stride_dyn)[:, None] + (cols * stride_dyc)[None, :], mask=m,
                     other=0.0).to(tl.float32)
        x = tl.load(X + b * stride_xb + (n * stride_xn)[:, None] + (cols * stride_xc)[None, :], mask=m,
                    other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * one_plus_scale
        c1 = tl.sum(g, axis=1) / C
        c2 = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        tl.store(DX + (row * C)[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
        acc_scale += tl.sum(dy * xhat, axis=0)
        acc_shift += tl.sum(dy, axis=0)
    part = (b * n_chunks + chunk) * C
    tl.store(DSCALE_P + part + cols, acc_scale, mask=cmask)
    tl.store(DSHIFT_P + part + cols, acc_shift, mask=cmask)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------


def _fwd_triton(x, shift, scale, eps):
    B, N, C = x.shape
    shift, scale = shift.contiguous(), scale.contiguous()
    y = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    tile = row_tile(C, streams=1, esize=x.element_size())
    chunks, rows = row_split(x, B, N, tile["ROWS"], per_sm=_PER_SM.get(x.element_size(), (4, 3))[0])
    _modulate_fwd_kernel[(B, chunks)](
        x, shift, scale, y, mean, rstd,
        N, C, rows,
        x.stride(0), x.stride(1), x.stride(2),
        0 if shift.shape[0] == 1 else C,
        eps,
        **tile,
    )
    return y, mean, rstd


def _bwd_triton(dy, x, scale, mean, rstd):
    B, N, C = x.shape
    scale = scale.contiguous()
    dx = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    tile = row_tile(C, streams=2, esize=x.element_size())
    chunks, rows = row_split(x, B, N, tile["ROWS"], per_sm=_PER_SM.get(x.element_size(), (4, 3))[1])
    dscale_p = torch.empty((B, chunks, C), dtype=torch.float32, device=x.device)
    dshift_p = torch.empty_like(dscale_p)
    _modulate_bwd_kernel[(B, chunks)](
        dy, x, scale, mean, rstd, dx, dscale_p, dshift_p,
        N, C, rows, chunks,
        dy.stride(0), dy.stride(1), dy.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        0 if scale.shape[0] == 1 else C,
        **tile,
    )
    dims = (0, 1) if scale.shape[0] == 1 else (1,)
    dscale = dscale_p.sum(dims).view(scale.shape[0], C)
    dshift = dshift_p.sum(dims).view(scale.shape[0], C)
    return dx, dscale, dshift


def _fwd_csrc(x, shift, scale, eps):
    return tuple(_ext.ext().modulate_fwd(x.contiguous(), shift.float().contiguous(), scale.float().contiguous(), eps))


def _bwd_csrc(dy, x, scale, mean, rstd):
    return tuple(_ext.ext().modulate_bwd(dy.contiguous(), x.contiguous(), scale.float().contiguous(), mean, rstd))


# ---------------------------------------------------------------------------------------------------------
# custom ops (torch.library) — opaque to torch.compile, provider chosen at run time
# ---------------------------------------------------------------------------------------------------------


def _provider(x: torch.Tensor, csrc_fn: str) -> str:
    return choose("modulate", x, providers_for(x, PROVIDERS), csrc_fn)


@torch.library.custom_op("mgkernels::modulate_fwd", mutates_args=())
def modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    provider = _provider(x, "modulate_fwd")
    impl = {"triton": _fwd_triton, "csrc": _fwd_csrc, "ref": _fwd_ref}[provider]
    return impl(x, shift, scale, eps)


@modulate_fwd.register_fake
def _(x, shift, scale, eps):
    B, N, _ = x.shape
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((B, N), dtype=stat), x.new_empty((B, N), dtype=stat)


@torch.library.custom_op("mgkernels::modulate_bwd", mutates_args=())
def modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    provider = _provider(x, "modulate_bwd")
    impl = {"triton": _bwd_triton, "csrc": _bwd_csrc, "ref": _bwd_ref}[provider]
    return impl(dy, x, scale, mean, rstd)


@modulate_bwd.register_fake
def _(dy, x, scale, mean, rstd):
    red = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=red), scale.new_empty(scale.shape, dtype=red)


# ---------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------


class ModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        B, N, C = check_tokens(x)
        shift2, scale2 = per_sample(shift, B, C, "shift"), per_sample(scale, B, C, "scale")
        if shift2.shape[0] != scale2.shape[0]:
            shift2, scale2 = shift2.expand(B, C), scale2.expand(B, C)
        y, mean, rstd = torch.ops.mgkernels.modulate_fwd(x, shift2, scale2, eps)
        ctx.save_for_backward(x, scale2, mean, rstd)
        ctx.shapes = (shift.shape, shift.dtype, scale.shape, scale.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale2, mean, rstd = ctx.saved_tensors
        dx, dscale, dshift = torch.ops.mgkernels.modulate_bwd(dy, x, scale2, mean, rstd)
        shift_shape, shift_dtype, scale_shape, scale_dtype = ctx.shapes
        return dx, _reduce_to(dshift, shift_shape).to(shift_dtype), _reduce_to(dscale, scale_shape).to(scale_dtype), None


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[Bs, C] gradient -> the parameter's own broadcast shape ([C], [1, C], [B, C], [B, 1, C], ...)."""
    if len(shape) == 1 or (shape[0] == 1 and g.shape[0] != 1):
        g = g.sum(0, keepdim=True)
    return g.reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` for x ``[B, N, C]`` and shift/scale ``[B, 1, C]``, ``[B, C]``
    or ``[C]``; fused forward and backward. Output dtype = x.dtype (floating point only)."""
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):
        if not t.is_floating_point():
            raise TypeError(f"modulate: {name} must be a floating-point tensor, got {t.dtype}")
    if traced_ref(x):  # torch.compile on a CPU: the expression, for Inductor to fuse (mgkernels.dispatch)
        return _traced(x, shift, scale, float(eps))
    return ModulateFunction.apply(x, shift, scale, float(eps))


def _traced(x, shift, scale, eps):
    """:func:`modulate_ref` in x's compute dtype, returned in x's dtype (the fused op's contract)."""
    cd = compute_dtype(x.dtype)
    return modulate_ref(x.to(cd), shift.to(cd), scale.to(cd), eps).to(x.dtype)
