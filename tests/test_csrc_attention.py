"""The compiled short-sequence attention of mgkernels._C (csrc/attention.cpp) and its dispatch as the ``csrc``
provider of st_attention / cross_attn on fp32 CPU tensors.

Outputs and gradients are compared with a float64 softmax attention written here with einsum and autograd (not
the library's reference), under the DESIGN tolerance policy of kernel_utils.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

import mgkernels
from mgkernels import _cpu_attention, _ext
from mgkernels.dispatch import use
from tests.kernel_utils import assert_policy

if not (mgkernels.ext_available() and _cpu_attention.AVAILABLE):
    pytest.skip("the csrc extension with the attention kernels is not built", allow_module_level=True)

C_ = _ext.ext()


def _attn64(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v on [B, G, L, H, D] tensors in float64; a row with no valid key -> 0."""
    s = torch.einsum("bgihd,bgjhd->bghij", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1))  # all -inf rows give NaN -> 0
    lse = torch.logsumexp(s, dim=-1)  # [B, G, H, Lq]
    return torch.einsum("bghij,bgjhd->bgihd", p, v), lse.permute(0, 1, 3, 2)


def _inputs(B, G, Lq, Lk, H, D, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # views with permuted storage, as the callers pass them (a unit stride on D only)
        q = torch.randn(B, Lq, H, G, D, generator=g).permute(0, 3, 1, 2, 4)
        kv = torch.randn(B, H, Lk, 2, G, D, generator=g).permute(0, 4, 2, 1, 5, 3)
        k, v = kv[..., 0], kv[..., 1]
        return q, k, v
    return tuple(torch.randn(B, G, L, H, D, generator=g) for L in (Lq, Lk, Lk))


# (B, G, Lq, Lk, H, D): the demo's spatial / temporal / cross shapes, head dims with and without a compile-time
# kernel (16 / 32 / 64 vs 13 / 72), query counts off the block of 8, key counts off the block of 4, single keys
CASES = [(2, 4, 16, 16, 4, 16), (2, 16, 4, 4, 4, 16), (2, 1, 64, 48, 4, 16), (3, 2, 5, 7, 3, 13),
         (1, 3, 17, 1, 2, 32), (2, 1, 9, 3, 1, 64), (1, 2, 11, 21, 2, 72)]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_backward_match_float64(case, strided, masked):
    B, G, Lq, Lk, H, D = case
    q, k, v = _inputs(B, G, Lq, Lk, H, D, strided)
    mask = None
    if masked:
        mask = torch.rand(B, Lk, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0, -1] = True  # at least one valid key in sample 0 ...
        if B > 1:
            mask[1] = False  # ... and none in sample 1: o = 0, lse = +inf, zero gradients
    o = torch.empty(B, G, Lq, H, D)
    lse = torch.empty(B, G, Lq, H)
    C_.attention_fwd(q, k, v, mask, o, lse)
    do = torch.randn(B, G, Lq, H, D, generator=torch.Generator().manual_seed(2))
    dq, dk, dv = torch.empty(q.shape), torch.empty(k.shape), torch.empty(v.shape)
    C_.attention_bwd(q, k, v, mask, o, lse, do, dq, dk, dv)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, lse64 = _attn64(*leaves64, mask)
    o64.backward(do.double())
    leaves32 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o32, _ = _attn64(*leaves32, mask)  # the same expression in fp32 (the policy's yardstick)
    o32.backward(do)
    assert_policy(o, o32.detach(), o64.detach(), name="o")
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[~finite]).all() and (lse[~finite] > 0).all()
    for name, ours, same, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves32, leaves64, strict=True):
        assert_policy(ours, same.grad, ref.grad, name=name)
    if masked and B > 1:
        assert (o[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
        assert (dk[0][:, ~mask[0]] == 0).all() and (dv[0][:, ~mask[0]] == 0).all()  # masked keys get exactly 0


def test_thread_count_and_isa_do_not_change_results(tmp_path):
    """Tasks own their keys: the same bits on 1 and 3 threads. The baseline (SSE2) build of the same kernels,
    forced with MG_CPU_ISA=baseline in a subprocess, agrees to round-off."""
    q, k, v = _inputs(4, 3, 19, 21, 2, 16, strided=True)
    do = torch.randn(q.shape)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            o, lse = torch.empty(q.shape), torch.empty(q.shape[:-1])
            C_.attention_fwd(q, k, v, None, o, lse)
            grads = [torch.empty(t.shape) for t in (q, k, v)]
            C_.attention_bwd(q, k, v, None, o, lse, do, *grads)
            outs.append([o, lse, *grads])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)

    code = ("import sys, torch; from mgkernels import _ext; C = _ext.ext(); assert C.modulate_cpu_isa() == 'baseline'\n"
            "q, k, v, do = torch.load(sys.argv[1])\n"
            "o, lse = torch.empty(q.shape), torch.empty(q.shape[:-1]); C.attention_fwd(q, k, v, None, o, lse)\n"
            "g = [torch.empty(t.shape) for t in (q, k, v)]; C.attention_bwd(q, k, v, None, o, lse, do, *g)\n"
            "torch.save([o, lse, *g], sys.argv[2])\n")
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save([q.contiguous(), k.contiguous(), v.contiguous(), do], src)
    subprocess.run([sys.executable, "-c", code, str(src), str(dst)], check=True, env={**os.environ, "MG_CPU_ISA": "baseline"})
    base = torch.load(dst)
    for a, b in zip(outs[0], base, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_rejects_bad_arguments():
    q, k, v = _inputs(2, 1, 4, 3, 2, 8, strided=False)
    o, lse = torch.empty(q.shape), torch.empty(q.shape[:-1])
    with pytest.raises(RuntimeError, match=r"q must be float32 \(other dtypes use the PyTorch reference\)"):
        C_.attention_fwd(q.double(), k, v, None, o, lse)
    with pytest.raises(RuntimeError, match=r"v must have shape \[2, 1, 3, 2, 8\]"):
        C_.attention_fwd(q, k, v[:, :, :2], None, o, lse)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 1, 4, 2\]"):
        C_.attention_fwd(q, k, v, None, o, torch.empty(2, 1, 2, 4))
    with pytest.raises(RuntimeError, match=r"k needs a unit stride on the head dim"):
        C_.attention_fwd(q, torch.randn(2, 1, 3, 8, 2).transpose(-1, -2), v, None, o, lse)
    with pytest.raises(RuntimeError, match=r"mask must be a contiguous CPU bool \[B, Lk\] = \[2, 3\]"):
        C_.attention_fwd(q, k, v, torch.ones(2, 3, dtype=torch.long), o, lse)
    with pytest.raises(RuntimeError, match=r"at least one key"):
        C_.attention_fwd(q, k[:, :, :0], v[:, :, :0], None, o, lse)
    with pytest.raises(RuntimeError, match=r"dq must have shape"):
        C_.attention_bwd(q, k, v, None, o, lse, o, torch.empty(2, 1, 4, 2, 7), torch.empty(k.shape), torch.empty(v.shape))


# ---- dispatch: the csrc provider of st_attention and cross_attn ------------------------------------------------
@contextlib.contextmanager
def _count_calls():
    """Counts the C++ operators' calls (``fwd`` / ``bwd``) and the Python custom ops' (``custom``) in the block, as
    the profiler records them."""
    calls = {"fwd": 0, "bwd": 0, "custom": 0}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield calls
    for e in prof.events():
        if e.name.startswith("mgkernels::csrc_"):
            calls["fwd" if e.name.endswith("_fwd") else "bwd"] += 1
        elif e.name in ("mgkernels::st_attention_fwd", "mgkernels::st_attention_bwd", "mgkernels::cross_attn_fwd",
                        "mgkernels::cross_attn_bwd"):
            calls["custom"] += 1


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_st_attention_runs_the_kernel_on_cpu_fp32(mode):
    from mgkernels.st_attention import st_attention

    B, T, S, H, D = 2, 3, 5, 2, 16
    qkv = torch.randn(B, T * S, 3 * H * D).view(B, T * S, 3, H, D).requires_grad_()
    with _count_calls() as calls:
        o = st_attention(qkv, T, S, mode)
        do = torch.randn(o.shape)
        (dqkv,) = torch.autograd.grad(o, qkv, do)
    assert calls == {"fwd": 1, "bwd": 1, "custom": 0}  # the C++ operators, without the custom-op layer

    x = qkv.detach().double().requires_grad_()
    g = x.unflatten(1, (T, S))  # [B, T, S, 3, H, D]
    g = g if mode == "spatial" else g.transpose(1, 2)  # groups x sequence
    o64, _ = _attn64(g[..., 0, :, :], g[..., 1, :, :], g[..., 2, :, :], None)
    o64 = (o64 if mode == "spatial" else o64.transpose(1, 2)).reshape(B, T * S, H * D)
    o64.backward(do.double())
    torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dqkv.double(), x.grad, rtol=1e-5, atol=1e-5)

    with _count_calls() as calls, use("ref"):  # an explicit provider request is honoured: no kernel call
        st_attention(qkv, T, S, mode).sum().backward()
    assert calls == {"fwd": 0, "bwd": 0, "custom": 0}
    with _count_calls() as calls:  # the custom op (torch.ops, torch.compile on CUDA) takes the same kernels
        o2, lse = torch.ops.mgkernels.st_attention_fwd(qkv.detach(), T, S, mode)
        dqkv2 = torch.ops.mgkernels.st_attention_bwd(do, qkv.detach(), o2, lse, T, S, mode)
    assert calls == {"fwd": 1, "bwd": 1, "custom": 2}
    assert torch.equal(o2, o.detach()) and torch.equal(dqkv2, dqkv)


def test_cross_attn_runs_the_kernel_on_cpu_fp32():
    from mgkernels.gated_cross_attn import cross_attn

    B, N, L, H, D = 3, 10, 6, 2, 16
    q = torch.randn(B, N, H, D, requires_grad=True)
    kv = torch.randn(B, L, 2, H, D, requires_grad=True)  # k, v as slices of one projection
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0] * 6, [1] * 6])  # long, as the text encoders give it
    with _count_calls() as calls:
        o = cross_attn(q, kv[:, :, 0], kv[:, :, 1], mask)
        do = torch.randn(o.shape)
        dq, dkv = torch.autograd.grad(o, (q, kv), do)
    assert calls == {"fwd": 1, "bwd": 1, "custom": 0}
    x, y = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    o64, _ = _attn64(x.unsqueeze(1), y[:, :, 0].unsqueeze(1), y[:, :, 1].unsqueeze(1), mask.bool())
    o64.squeeze(1).backward(do.double())
    torch.testing.assert_close(o.double(), o64.squeeze(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double(), x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dkv.double(), y.grad, rtol=1e-5, atol=1e-5)
    assert (o[1] == 0).all()  # no valid key: 0, not NaN

    with _count_calls() as calls:
        cross_attn(q.double(), kv[:, :, 0].double(), kv[:, :, 1].double(), mask)  # float64: the reference
    assert calls == {"fwd": 0, "bwd": 0, "custom": 0}
    with _count_calls() as calls:  # the custom op takes the same kernels
        o2, lse = torch.ops.mgkernels.cross_attn_fwd(q.detach(), kv[:, :, 0].detach(), kv[:, :, 1].detach(), mask, True)
        dq2, dk2, dv2 = torch.ops.mgkernels.cross_attn_bwd(do, q.detach(), kv[:, :, 0].detach(), kv[:, :, 1].detach(),
                                                           mask, o2, lse)
    assert calls == {"fwd": 1, "bwd": 1, "custom": 2}
    assert torch.equal(o2, o.detach()) and torch.equal(dq2, dq) and torch.equal(torch.stack([dk2, dv2], 2), dkv)


def test_operator_argument_errors():
    """The dispatcher operators name the bad argument (the custom ops check theirs before reaching them)."""
    qkv = torch.randn(2, 6, 3, 2, 16)
    with pytest.raises(RuntimeError, match=r"mode must be 'spatial' or 'temporal', got 'diagonal'"):
        torch.ops.mgkernels.csrc_st_attention_fwd(qkv, 2, 3, "diagonal")
    with pytest.raises(RuntimeError, match=r"qkv has 6 tokens, not T\*S = 2\*4"):
        torch.ops.mgkernels.csrc_st_attention_fwd(qkv, 2, 4, "spatial")
    with pytest.raises(RuntimeError, match=r"qkv must be \[B, T\*S, 3, H, D\]"):
        torch.ops.mgkernels.csrc_st_attention_fwd(qkv[:, :, :2], 2, 3, "spatial")
    with pytest.raises(RuntimeError, match=r"must be \[B, N, H, D\], \[B, L, H, D\]"):
        torch.ops.mgkernels.csrc_cross_attn_fwd(qkv, qkv, qkv, None, False)


def test_operators_compile_with_dynamic_shapes():
    """Under torch.compile with symbolic shapes the operators' fake functions give the outputs' shapes; a
    compiled function calling both attentions matches eager at two batch sizes without re-tracing per size."""
    from mgkernels.gated_cross_attn import cross_attn
    from mgkernels.st_attention import st_attention

    def f(qkv, ctx, mask):
        o = st_attention(qkv, 3, 4, "temporal")  # [B, 12, H*D]
        q = o.unflatten(-1, (2, 16))
        return cross_attn(q, ctx[:, :, 0], ctx[:, :, 1], mask).sum(), o

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for B in (2, 5):
        qkv = torch.randn(B, 12, 3, 2, 16, requires_grad=True)
        ctx = torch.randn(B, 7, 2, 2, 16, requires_grad=True)
        mask = (torch.arange(7) < torch.randint(0, 8, (B, 1))).long()
        want = f(qkv, ctx, mask)
        want_g = torch.autograd.grad(want[0], (qkv, ctx))
        got = compiled(qkv, ctx, mask)
        got_g = torch.autograd.grad(got[0], (qkv, ctx))
        for a, b in zip((*got, *got_g), (*want, *want_g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_operators_pass_opcheck():
    """torch.library.opcheck: schemas (no hidden mutation or aliasing), fake functions against the real
    outputs, and dispatch under FakeTensor / functionalization."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 6, 3, 2, 16, generator=g)
    o, lse = torch.ops.mgkernels.csrc_st_attention_fwd(qkv, 2, 3, "temporal")
    q, kv = torch.randn(2, 5, 2, 16, generator=g), torch.randn(2, 4, 2, 2, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    co, clse = torch.ops.mgkernels.csrc_cross_attn_fwd(q, kv[:, :, 0], kv[:, :, 1], mask, True)
    cases = [
        (torch.ops.mgkernels.csrc_st_attention_fwd, (qkv, 2, 3, "temporal")),
        (torch.ops.mgkernels.csrc_st_attention_bwd, (torch.randn(o.shape, generator=g), qkv, o, lse, 2, 3, "temporal")),
        (torch.ops.mgkernels.csrc_cross_attn_fwd, (q, kv[:, :, 0], kv[:, :, 1], mask, True)),
        (torch.ops.mgkernels.csrc_cross_attn_fwd, (q, kv[:, :, 0], kv[:, :, 1], None, False)),
        (torch.ops.mgkernels.csrc_cross_attn_bwd, (torch.randn(co.shape, generator=g), q, kv[:, :, 0], kv[:, :, 1], mask, co, clse)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
