"""The compiled S-AdaLN modulation operators of mgkernels._C (csrc/modulate.cpp, csrc/modulate_cuda.cu).

Every output and gradient is compared with an independent float64 reference written here with plain torch ops
(LayerNorm by hand, gradients by float64 autograd), under the DESIGN tolerance policy of kernel_utils: the
error of the kernel may be at most 2x the error PyTorch makes evaluating the same expression in the storage
dtype, plus a small atol. CUDA cases run only when torch sees a GPU and the extension was built with nvcc.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mgkernels
from mgkernels import _ext
from tests.kernel_utils import assert_policy, max_err

if not mgkernels.ext_available():
    pytest.skip(f"the csrc extension mgkernels._C is not available: {mgkernels.ext_error()}", allow_module_level=True)

C_ = _ext.ext()
EPS = 1e-6
EXT_CUDA = bool(mgkernels.build_info().get("cuda")) and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if EXT_CUDA else [])
DTYPES = [torch.float32, torch.bfloat16]
# (B, N, C): C a power of two or not, not a multiple of the SIMD width (13), N odd; the last two are big
# enough to run multi-threaded, with parts that start and end inside a sample.
SHAPES = [(2, 33, 72), (3, 7, 13), (1, 5, 1152), (2, 17, 1152), (5, 33, 200)]


def _params(B, C, bs, device, n=2):
    Bs = B if bs == "B" else 1
    return [(0.5 * torch.randn(Bs, C, device=device)).contiguous() for _ in range(n)]


def _ln64(x):
    m = x.mean(-1, keepdim=True)
    v = ((x - m) ** 2).mean(-1, keepdim=True)
    return (x - m) / torch.sqrt(v + EPS)


def _modulate(xn, shift, scale, ln):
    return ln(xn) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _ln_same(x):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS)


def _leaves(ts, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in ts]


def _grads(ts):
    return [t.grad for t in ts]


# ---- modulate_fwd / modulate_bwd -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("bs", ["B", "1"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulate_fwd_bwd(shape, bs, dtype, device):
    B, N, C = shape
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    shift, scale = _params(B, C, bs, device)

    y, mean, rstd = C_.modulate_fwd(x, shift, scale, EPS)
    dx, dscale, dshift = C_.modulate_bwd(dy, x, scale, mean, rstd)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape and dx.shape == x.shape
    assert mean.dtype == rstd.dtype == dscale.dtype == dshift.dtype == torch.float32
    assert mean.shape == rstd.shape == (B, N) and dscale.shape == dshift.shape == scale.shape

    # float64 reference (from the values as stored)
    x64, sh64, sc64 = _leaves([x, shift, scale], torch.float64)
    y64 = _modulate(x64, sh64, sc64, _ln64)
    y64.backward(dy.double())
    xd = x.double()
    m64 = xd.mean(-1)
    r64 = 1 / torch.sqrt(((xd - m64.unsqueeze(-1)) ** 2).mean(-1) + EPS)
    # the same expression evaluated by PyTorch in each output's dtype: the storage dtype for y and dx, float32
    # for the float32 outputs dscale and dshift
    def run(dt):
        xs, shs, scs = _leaves([x, shift, scale], dt)
        ys = _modulate(xs, shs, scs, _ln_same)
        ys.backward(dy.to(dt))
        return ys.detach(), xs.grad, scs.grad, shs.grad

    ys, dxs, _, _ = run(dtype)
    _, _, dscs, dshs = run(torch.float32)

    assert_policy(y, ys, y64, name="y")
    assert max_err(mean, m64) <= 1e-5 * (1 + m64.abs().max().item()), "mean"
    assert max_err(rstd / r64, torch.ones_like(r64)) <= 1e-5, "rstd"
    assert_policy(dx, dxs, x64.grad, name="dx")
    assert_policy(dscale, dscs, sc64.grad, name="dscale")
    assert_policy(dshift, dshs, sh64.grad, name="dshift")


# ---- residual_modulate_fwd / residual_modulate_bwd ---------------------------------------------------------------
def _round_ste(t, dtype):
    """t rounded to dtype in value, identity for the gradient (the kernel's x_new is stored rounded)."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dxnew_given", [False, True], ids=["no_dxnew", "dxnew"])
@pytest.mark.parametrize("gated", [False, True], ids=["no_gate", "gate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("bs", ["B", "1"])
@pytest.mark.parametrize("shape", [(2, 33, 72), (3, 7, 13), (5, 33, 200)], ids=lambda s: "x".join(map(str, s)))
def test_residual_modulate_fwd_bwd(shape, bs, dtype, gated, dxnew_given, device):
    B, N, C = shape
    x = (torch.randn(shape, device=device) + 0.3).to(dtype)
    h = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    dxnew = torch.randn(shape, device=device).to(dtype) if dxnew_given else None
    shift, scale, gate = _params(B, C, bs, device, 3)
    gate = gate if gated else None

    x_new, y, mean, rstd = C_.residual_modulate_fwd(x, h, gate, shift, scale, EPS)
    dx, dh, dgate, dshift, dscale = C_.residual_modulate_bwd(dy, dxnew, h, gate, x_new, scale, mean, rstd)
    for t in (x_new, y, dx, dh):
        assert t.dtype == dtype and t.shape == x.shape
    assert dshift.shape == dscale.shape == scale.shape and dshift.dtype == dscale.dtype == torch.float32
    if gated:
        assert dgate.shape == gate.shape and dgate.dtype == torch.float32
    else:
        assert dgate.numel() == 0

    def expr(xx, hh, gg, sh, sc, ln, round_to):
        xn = xx + (gg.unsqueeze(1) * hh if gg is not None else hh)
        if round_to is not None:
            xn = _round_ste(xn, round_to)
        return xn, _modulate(xn, sh, sc, ln)

    def run(dt, ln, round_to):
        leaves = _leaves([x, h, shift, scale] + ([gate] if gated else []), dt)
        xx, hh, sh, sc = leaves[:4]
        xn, yy = expr(xx, hh, leaves[4] if gated else None, sh, sc, ln, round_to)
        loss = (yy * dy.to(dt)).sum() + ((xn * dxnew.to(dt)).sum() if dxnew_given else 0)
        loss.backward()
        return xn.detach(), yy.detach(), leaves

    # float64 reference: x_new rounded to the storage dtype as the kernel stores it, exact gradients through it
    xn64, y64, l64 = run(torch.float64, _ln64, dtype)
    # the same expression evaluated by PyTorch in the storage dtype (x_new, y, dx, dh), and in float32 with x_new
    # rounded to the storage dtype like the kernel's (the float32 outputs dshift, dscale, dgate)
    xns, ys, ls = run(dtype, _ln_same, None)
    _, _, l32 = run(torch.float32, _ln_same, dtype)

    assert_policy(x_new, xns, xn64, name="x_new")
    assert_policy(y, ys, y64, name="y")
    xd = x_new.double()
    m64 = xd.mean(-1)
    r64 = 1 / torch.sqrt(((xd - m64.unsqueeze(-1)) ** 2).mean(-1) + EPS)
    assert max_err(mean, m64) <= 1e-5 * (1 + m64.abs().max().item()), "mean (of the stored x_new)"
    assert max_err(rstd / r64, torch.ones_like(r64)) <= 1e-5, "rstd (of the stored x_new)"
    names = ["dx", "dh", "dshift", "dscale"] + (["dgate"] if gated else [])
    ours = [dx, dh, dshift, dscale] + ([dgate] if gated else [])
    same = _grads(ls)[:2] + _grads(l32)[2:]
    for name, o, s, r in zip(names, ours, same, _grads(l64)):
        assert_policy(o, s, r, name=name)


def test_thread_count_does_not_change_results():
    B, N, C = 5, 33, 200
    x, dy, h = (torch.randn(B, N, C) for _ in range(3))
    shift, scale, gate = _params(B, C, "B", "cpu", 3)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            xn, y, m, r = C_.residual_modulate_fwd(x, h, gate, shift, scale, EPS)
            outs.append((xn, y, m, r, *C_.residual_modulate_bwd(dy, dy, h, gate, xn, scale, m, r)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_empty_tokens():
    x = torch.randn(2, 0, 8)
    shift, scale = _params(2, 8, "B", "cpu")
    y, m, r = C_.modulate_fwd(x, shift, scale, EPS)
    dx, dscale, dshift = C_.modulate_bwd(x, x, scale, m, r)
    assert y.shape == x.shape and m.shape == (2, 0) and dx.shape == x.shape
    assert (dscale == 0).all() and (dshift == 0).all()


# ---- argument checks -------------------------------------------------------------------------------------------
def _ok():
    x = torch.randn(2, 5, 8)
    shift, scale = _params(2, 8, "B", "cpu")
    y, m, r = C_.modulate_fwd(x, shift, scale, EPS)
    return x, shift, scale, m, r


def test_rejects_wrong_dtype():
    x, shift, scale, m, r = _ok()
    with pytest.raises(RuntimeError, match=r"x must be float32 or bfloat16, got Double"):
        C_.modulate_fwd(x.double(), shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"x must be float32 or bfloat16, got Half"):
        C_.modulate_fwd(x.half(), shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"shift must be float32, got BFloat16"):
        C_.modulate_fwd(x, shift.bfloat16(), scale, EPS)
    with pytest.raises(RuntimeError, match=r"gate must be float32"):
        C_.residual_modulate_fwd(x, x, scale.double(), shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"dy must have the dtype of x"):
        C_.modulate_bwd(x.bfloat16(), x, scale, m, r)
    with pytest.raises(RuntimeError, match=r"h must have the dtype of x"):
        C_.residual_modulate_fwd(x, x.bfloat16(), None, shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"rstd must be float32"):
        C_.modulate_bwd(x, x, scale, m, r.double())


def test_rejects_non_contiguous():
    x, shift, scale, m, r = _ok()
    xt = torch.randn(5, 2, 8).transpose(0, 1)
    with pytest.raises(RuntimeError, match=r"x must be contiguous \(call \.contiguous\(\)"):
        C_.modulate_fwd(xt, shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"dy must be contiguous"):
        C_.modulate_bwd(xt, x, scale, m, r)
    with pytest.raises(RuntimeError, match=r"scale must be contiguous"):
        C_.modulate_fwd(x, shift, torch.randn(8, 2).t(), EPS)


def test_rejects_wrong_shapes():
    x, shift, scale, m, r = _ok()
    with pytest.raises(RuntimeError, match=r"shift must have shape \[B, C\] or \[1, C\] = \[2, 8\] or \[1, 8\]"):
        C_.modulate_fwd(x, torch.randn(2, 9), scale, EPS)
    with pytest.raises(RuntimeError, match=r"shift must have shape"):
        C_.modulate_fwd(x, torch.randn(3, 8), scale, EPS)
    with pytest.raises(RuntimeError, match=r"scale must have shape"):
        C_.modulate_fwd(x, shift, torch.randn(2, 1, 8), EPS)
    with pytest.raises(RuntimeError, match=r"x must be 3-D \[B, N, C\]"):
        C_.modulate_fwd(x[0], shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"h must have the shape of x"):
        C_.residual_modulate_fwd(x, x[:, :4].contiguous(), None, shift, scale, EPS)
    with pytest.raises(RuntimeError, match=r"mean must have shape \[B, N\] = \[2, 5\]"):
        C_.modulate_bwd(x, x, scale, m[:, :4].contiguous(), r)
    with pytest.raises(RuntimeError, match=r"dxnew must have the shape of x_new"):
        C_.residual_modulate_bwd(x, x[:1].contiguous(), x, None, x, scale, m, r)
    with pytest.raises(RuntimeError, match=r"eps must be a finite number"):
        C_.modulate_fwd(x, shift, scale, -1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (wrong-device errors)")
def test_rejects_mixed_devices():
    x, shift, scale, m, r = _ok()
    if mgkernels.build_info().get("cuda"):
        with pytest.raises(RuntimeError, match=r"shift must be on the same device as x"):
            C_.modulate_fwd(x.cuda(), shift, scale.cuda(), EPS)
    else:
        with pytest.raises(RuntimeError, match=r"built without CUDA"):
            C_.modulate_fwd(x.cuda(), shift.cuda(), scale.cuda(), EPS)
