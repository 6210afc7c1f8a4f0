"""S-AdaLN modulation and fused residual + S-AdaLN: every provider against float64 references."""

import pytest
import torch

from mgkernels import _ext
from mgkernels.dispatch import custom_ops_under_compile, use
from mgkernels.modulate import modulate, modulate_ref
from mgkernels.residual_modulate import residual_modulate, residual_modulate_ref

from .kernel_utils import KERNEL_DEVICE, KERNEL_DTYPES, assert_policy

HAS_CSRC = _ext.ext_available() and hasattr(_ext._C, "residual_modulate_bwd")
PROVIDERS = ["triton", "ref"] + (["csrc"] if HAS_CSRC else [])
BROADCASTS = ["B1C", "BC", "C"]


def _vec(kind, B, C, dtype, device, g):
    shape = {"B1C": (B, 1, C), "BC": (B, C), "C": (C,)}[kind]
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype).requires_grad_()


def _ln_mod64(x, shift, scale):
    """Independent fp64 math: LayerNorm by hand, explicit broadcasting."""
    C = x.shape[-1]
    fix = lambda p: p.reshape(-1, 1, C) if p.ndim > 1 else p  # noqa: E731
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * (1 + fix(scale)) + fix(shift)


def _grads(out_fn, inputs, dout):
    outs = out_fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs], [d for d in dout])
    return [p.grad for p in inputs if p is not None]


def _devices_dtypes(provider):
    if provider == "csrc":
        return [("cpu", torch.float32)]
    if provider == "triton":
        return [(KERNEL_DEVICE, dt) for dt in KERNEL_DTYPES]
    return [("cpu", torch.float32), ("cpu", torch.float16)]


CASES = [(p, d, dt) for p in PROVIDERS for d, dt in _devices_dtypes(p)]


@pytest.mark.parametrize("provider,device,dtype", CASES)
@pytest.mark.parametrize("bcast", BROADCASTS)
def test_modulate_forward_backward(provider, device, dtype, bcast):
    g = torch.Generator().manual_seed(0)
    B, N, C = 3, 7, 72
    x64 = torch.randn(B, N, C, generator=g, dtype=torch.float64) * 2 + 0.5
    sh64, sc64 = _vec(bcast, B, C, torch.float64, "cpu", g), _vec(bcast, B, C, torch.float64, "cpu", g)
    dy64 = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    x64.requires_grad_()
    ref = _ln_mod64(x64, sh64, sc64)
    ref.backward(dy64)

    def low():
        x = x64.detach().to(device, dtype).requires_grad_()
        return x, sh64.detach().to(device, dtype).requires_grad_(), sc64.detach().to(device, dtype).requires_grad_()

    xt, sht, sct = low()  # PyTorch doing the same math in the same dtype
    yt = _ln_mod64(xt, sht, sct)
    yt.backward(dy64.to(device, dtype))
    xo, sho, sco = low()
    with use(provider):
        yo = modulate(xo, sho, sco)
        yo.backward(dy64.to(device, dtype))
    assert yo.dtype == dtype
    assert_policy(yo, yt, ref, name="y")
    for name, ours, torch_low, r in (("dx", xo, xt, x64), ("dshift", sho, sht, sh64), ("dscale", sco, sct, sc64)):
        assert ours.grad.shape == r.grad.shape and ours.grad.dtype == dtype, name
        assert_policy(ours.grad, torch_low.grad, r.grad, atol=1e-4 if dtype == torch.float32 else None, name=name)


@pytest.mark.parametrize("provider,device,dtype", CASES)
@pytest.mark.parametrize("bcast,gated,use_xnew", [("B1C", True, True), ("BC", False, True), ("C", True, False)])
def test_residual_modulate_forward_backward(provider, device, dtype, bcast, gated, use_xnew):
    g = torch.Generator().manual_seed(1)
    B, N, C = 2, 9, 40
    x64 = (torch.randn(B, N, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    h64 = torch.randn(B, N, C, generator=g, dtype=torch.float64).requires_grad_()
    gt64 = _vec(bcast, B, C, torch.float64, "cpu", g) if gated else None
    sh64, sc64 = _vec(bcast, B, C, torch.float64, "cpu", g), _vec(bcast, B, C, torch.float64, "cpu", g)
    dxn64 = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    dy64 = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    fix = lambda p: p.reshape(-1, 1, C) if p.ndim > 1 else p  # noqa: E731

    def math(x, h, gate, shift, scale):
        xn = x + (h if gate is None else fix(gate) * h)
        return xn, _ln_mod64(xn, shift, scale)

    def run(fn, dev, dt):
        leaves = [t.detach().to(dev, dt).requires_grad_() if t is not None else None for t in (x64, h64, gt64, sh64, sc64)]
        xn, y = fn(*leaves)
        outs, grads = ([xn, y], [dxn64.to(dev, dt), dy64.to(dev, dt)]) if use_xnew else ([y], [dy64.to(dev, dt)])
        torch.autograd.backward(outs, grads)
        return xn, y, [lf.grad if lf is not None else None for lf in leaves]

    xn_r, y_r, g_r = run(math, "cpu", torch.float64)
    xn_t, y_t, g_t = run(math, device, dtype)
    with use(provider):
        xn_o, y_o, g_o = run(residual_modulate, device, dtype)
    assert_policy(xn_o, xn_t, xn_r, name="x_new")
    assert_policy(y_o, y_t, y_r, name="y")
    for name, o, t, r in zip(("dx", "dh", "dgate", "dshift", "dscale"), g_o, g_t, g_r, strict=True):
        if r is None:
            assert o is None
            continue
        assert_policy(o, t, r, atol=1e-4 if dtype == torch.float32 else None, name=name)


def test_reference_functions_agree_with_fused_ref_path():
    g = torch.Generator().manual_seed(2)
    x, h = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    sh, sc, gt = torch.randn(2, 1, 24, generator=g), torch.randn(2, 1, 24, generator=g), torch.randn(24, generator=g)
    with use("ref"):
        torch.testing.assert_close(modulate(x, sh, sc), modulate_ref(x, sh, sc))
        for a, b in zip(residual_modulate(x, h, gt, sh, sc), residual_modulate_ref(x, h, gt, sh, sc), strict=True):
            torch.testing.assert_close(a, b)


def test_gradcheck_ref_fp64():
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, h, gt, sh, sc = mk(2, 3, 5), mk(2, 3, 5), mk(2, 1, 5), mk(5), mk(2, 5)
    with use("ref"):
        assert torch.autograd.gradcheck(lambda a, b, c: modulate(a, b, c), (x, sh, sc))
        assert torch.autograd.gradcheck(lambda *a: residual_modulate(*a), (x, h, gt, sh, sc))
        assert torch.autograd.gradcheck(lambda a, b, c, d: residual_modulate(a, b, None, c, d), (x, h, sh, sc))


@pytest.mark.parametrize("provider", ["triton", "ref"])
def test_non_contiguous_inputs(provider):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 40, 6, generator=g).to(KERNEL_DEVICE)
    x = base.transpose(1, 2)  # [2, 6, 40] with strides (240, 1, 6)
    h = torch.randn(2, 6, 80, generator=g).to(KERNEL_DEVICE)[..., ::2]
    sh, sc = torch.randn(2, 40, generator=g).to(KERNEL_DEVICE), torch.randn(40, generator=g).to(KERNEL_DEVICE)
    dy = torch.randn(2, 40, 6, generator=g).to(KERNEL_DEVICE).transpose(1, 2)
    with use(provider):
        x1 = x.clone().requires_grad_()
        y = modulate(x1.transpose(1, 2).transpose(1, 2), sh, sc)
        y.backward(dy)
        xn, y2 = residual_modulate(x, h, sh, sh, sc)
    with use("ref"):
        x2 = x.contiguous().requires_grad_()
        modulate(x2, sh, sc).backward(dy.contiguous())
        torch.testing.assert_close(y, modulate(x.contiguous(), sh, sc), rtol=1e-5, atol=1e-5)
        xn_r, y2_r = residual_modulate(x.contiguous(), h.contiguous(), sh, sh, sc)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xn, xn_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, y2_r, rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="shift"):
        modulate(x, torch.randn(3, 8), torch.randn(8))
    with pytest.raises(ValueError, match="scale"):
        modulate(x, torch.randn(8), torch.randn(7))
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        modulate(torch.randn(2, 3, 4, 8), torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="h must"):
        residual_modulate(x, torch.randn(2, 4, 8), None, torch.randn(8), torch.randn(8))


def test_compile_and_checkpoint_compose():
    """The custom ops trace under torch.compile (fake impls) and re-run under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 4, 16, requires_grad=True)
    h = torch.randn(2, 4, 16, requires_grad=True)
    sh, sc, gt = torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)

    def f(x, h):
        xn, y = residual_modulate(x, h, gt, sh, sc)
        return (modulate(xn, sc, sh) * y).sum()

    eager = f(x, h)
    gx, gh = torch.autograd.grad(eager, (x, h))
    ck = checkpoint(f, x, h, use_reentrant=False)
    torch.testing.assert_close(ck, eager)
    torch.testing.assert_close(torch.autograd.grad(ck, (x, h)), (gx, gh))
    with custom_ops_under_compile():  # on a CPU, compile traces the references unless told otherwise
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        out = compiled(x, h)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out, (x, h)), (gx, gh), rtol=1e-5, atol=1e-5)
