"""mgkernels.gated_cross_attn: out = x + tanh(lam) * softmax(q k^T / sqrt(D) + mask) v, forward and gradients.

Checked against an independent float64 reference written here (an explicit per-sample loop over the valid
keys), under the DESIGN tolerance policy (tests/kernel_utils.py). On CPU the Triton kernels run through the
interpreter (TRITON_INTERPRET=1) with 16 x 16 tiles, so every key / query loop runs several blocks.
"""

import math

import pytest
import torch

from mgkernels import dispatch
from mgkernels import gated_cross_attn as gca_mod
from mgkernels.dispatch import custom_ops_under_compile, use
from mgkernels.gated_cross_attn import cross_attn, gated_cross_attn, gated_cross_attn_ref
from tests.kernel_utils import ATOL, INTERPRET, KERNEL_DEVICE, KERNEL_DTYPES, assert_policy, requires_cuda

TRITON_OK = dispatch.triton_available() and (KERNEL_DEVICE == "cuda" or INTERPRET)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")


# ---------------------------------------------------------------------------------------------------------
# Independent reference: per sample, gather the valid keys, einsum + softmax, einsum. Runs in any dtype
# (float64 for the reference, the kernel's dtype for "what PyTorch makes of it in that dtype").
# ---------------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v over each sample's valid keys, [B, N, H, D]; a sample without keys -> 0."""
    B, N, H, D = q.shape
    outs = []
    for b in range(B):
        idx = torch.arange(k.shape[1], device=q.device) if mask is None else torch.nonzero(mask[b]).flatten()
        if idx.numel() == 0:
            outs.append(torch.zeros_like(q[b]))
            continue
        kb, vb = k[b, idx], v[b, idx]  # [l, H, D]
        s = torch.einsum("nhd,lhd->hnl", q[b], kb) / math.sqrt(D)
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hnl,lhd->nhd", p, vb))
    return torch.stack(outs)


def reference(x, q, k, v, lam, mask):
    B, N, H, D = q.shape
    o = attention_reference(q, k, v, mask)
    g = torch.tanh(lam).reshape(-1).to(q.dtype)
    g = g.view(1, 1, H, 1) if lam.numel() == H and lam.dim() == 1 and H > 1 else g.reshape(())
    return (x.reshape(B, N, H, D) + g * o).reshape(x.shape)


def make_mask(kind, B, L, device):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    if kind == "varlen":  # prefix masks, a different caption length per sample (17: the last valid key opens a
        # 16-key block; 1: a single key), so off-by-one bounds on the valid keys show
        lens = [L, min(L, 17), 1][:B] + [max(1, L - 5)] * max(0, B - 3)
        m = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]
    elif kind == "holes":  # valid keys are not a prefix; sample 1 has none at all
        m = torch.rand(B, L, generator=g) > 0.4
        m[0, 0] = False
        m[0, -1] = True
        m[1] = False
    else:
        raise ValueError(kind)
    return m.to(device)


class Case:
    """Random inputs held in float64 (the bases), materialised in any dtype with the requested layouts."""

    def __init__(self, B=2, N=17, H=2, D=72, L=40, mask=None, lam="head", lam_value=None, x_flat=False,
                 noncontig=False, dout_noncontig=False):
        self.B, self.N, self.H, self.D, self.L = B, N, H, D, L
        self.x_flat, self.noncontig = x_flat, noncontig
        r = lambda *s: torch.randn(*s, dtype=torch.float64)
        if noncontig:  # q stored [B, H, N, D] (a transposed view), k / v slices of one packed [B, L, 2, H, D]
            self.bases = dict(q=r(B, H, N, D), kv=r(B, L, 2, H, D))
        else:
            self.bases = dict(q=r(B, N, H, D), k=r(B, L, H, D), v=r(B, L, H, D))
        self.bases["x"] = r(B, N, H * D) if x_flat else r(B, N, H, D)
        if lam == "head":
            lam_t = torch.linspace(-0.8, 0.6, H, dtype=torch.float64) if lam_value is None else torch.full((H,), float(lam_value), dtype=torch.float64)
        elif lam == "scalar":
            lam_t = torch.tensor(0.4 if lam_value is None else lam_value, dtype=torch.float64)
        else:  # "one": shape [1]
            lam_t = torch.tensor([-0.5 if lam_value is None else lam_value], dtype=torch.float64)
        self.bases["lam"] = lam_t
        self.mask = make_mask(mask, B, L, KERNEL_DEVICE)
        dout = r(B, N, H * D) if x_flat else r(B, N, H, D)
        self.dout64 = dout.to(KERNEL_DEVICE)
        self.dout_noncontig = dout_noncontig

    def inputs(self, dtype, lam_dtype=torch.float32):
        """(x, q, k, v, lam) in dtype (lam in lam_dtype), differentiable, with this case's layouts."""
        leaves = {n: t.to(device=KERNEL_DEVICE, dtype=lam_dtype if n == "lam" else dtype).requires_grad_(True)
                  for n, t in self.bases.items()}
        if self.noncontig:
            q = leaves["q"].transpose(1, 2)
            k, v = leaves["kv"][:, :, 0], leaves["kv"][:, :, 1]
            assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        else:
            q, k, v = leaves["q"], leaves["k"], leaves["v"]
        return leaves["x"], q, k, v, leaves["lam"]

    def dout(self, dtype):
        d = self.dout64.to(dtype)
        if self.dout_noncontig:  # same values, a transposed layout
            d = d.transpose(0, 1).contiguous().transpose(0, 1)
            assert not d.is_contiguous()
        return d

    def run(self, fn, dtype, lam_dtype=torch.float32):
        ins = self.inputs(dtype, lam_dtype)
        out = fn(*ins, self.mask)
        grads = torch.autograd.grad(out, ins, self.dout(dtype))
        return out.detach(), [g.detach() for g in grads]


NAMES = ("dx", "dq", "dk", "dv", "dlam")


def check_case(case, dtype, provider):
    with use(provider):
        out, grads = case.run(gated_cross_attn, dtype)
    ref_out, ref_grads = case.run(reference, torch.float64, torch.float64)
    t_out, t_grads = case.run(reference, dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_policy(out, t_out, ref_out, name="out")
    for name, g, tg, rg in zip(NAMES, grads, t_grads, ref_grads, strict=True):
        assert g.dtype == (torch.float32 if name == "dlam" else dtype), name
        # dlam is a sum over B*N*H*D products: its absolute floor grows with sqrt(count)
        atol = 0.1 * ATOL[dtype] * case.dout64.numel() ** 0.5 if name == "dlam" else None
        assert_policy(g, tg, rg, atol=atol, name=name)
    return out, grads, ref_out, ref_grads


CASES = {
    # D = 72 (padded to 128), prefix masks of three lengths, per-head lam, L = 40 -> 3 key blocks of 16
    "d72_varlen_head": dict(B=3, N=17, H=2, D=72, L=40, mask="varlen", lam="head"),
    # odd D, non-prefix mask + an all-False sample, scalar lam, flat x, odd N, non-contiguous dout
    "d40_holes_scalar_flat": dict(B=2, N=21, H=3, D=40, L=23, mask="holes", lam="scalar", x_flat=True,
                                  dout_noncontig=True),
    # no mask, lam of shape [1], non-contiguous q / k / v, flat x
    "d72_nomask_noncontig": dict(B=2, N=19, H=2, D=72, L=33, mask=None, lam="one", x_flat=True, noncontig=True),
    # a single key (L = 1), small odd D
    "d24_L1": dict(B=2, N=9, H=2, D=24, L=1, mask=None, lam="head"),
}


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_fp64(name, dtype):
    check_case(Case(**CASES[name]), dtype, "triton")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["d72_varlen_head", "d40_holes_scalar_flat"])
def test_ref_provider_matches_fp64(name, dtype):
    check_case(Case(**CASES[name]), dtype, "ref")


@needs_triton
@pytest.mark.parametrize("lam", ["head", "scalar"])
def test_lam_zero_is_identity_with_nonzero_dlam(lam):
    case = Case(B=2, N=13, H=2, D=72, L=20, mask="holes", lam=lam, lam_value=0.0)
    x, *_ = case.inputs(torch.float32)
    out, grads, _, ref_grads = check_case(case, torch.float32, "triton")
    assert torch.equal(out, x.detach()), "lam = 0 must give out == x exactly"
    for g in grads[1:4]:
        assert torch.count_nonzero(g) == 0, "lam = 0: no gradient flows into q / k / v"
    assert grads[4].abs().min() > 1e-3 and torch.allclose(grads[4], ref_grads[4].float(), rtol=1e-4, atol=1e-3)


@needs_triton
def test_empty_mask_row_gives_x_and_no_nan():
    case = Case(B=2, N=11, H=2, D=40, L=18, mask="holes", lam="head")
    with use("triton"):
        out, grads = case.run(gated_cross_attn, torch.float32)
    x, *_ = case.inputs(torch.float32)
    assert torch.equal(out[1], x[1].detach())  # sample 1 has no valid key
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.count_nonzero(grads[2][1]) == 0 and torch.count_nonzero(grads[3][1]) == 0
    # keys masked out in sample 0 get exactly zero gradient
    dead = ~case.mask[0]
    assert torch.count_nonzero(grads[2][0][dead]) == 0 and torch.count_nonzero(grads[3][0][dead]) == 0


@needs_triton
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32), (64, 64)])
def test_block_sizes_agree_with_ref_provider(block_m, block_n):
    """Launchers with other tiles (one block, several, partial last block) give the ref provider's outputs."""
    case = Case(B=2, N=37, H=2, D=72, L=40, mask="holes", lam="head")
    x, q, k, v, lam = (t.detach() for t in case.inputs(torch.float32))
    m = case.mask
    out, o, lse = gca_mod._triton_fwd(x, q, k, v, lam, m, True, block_m=block_m, block_n=block_n)
    r_out, r_o, r_lse = gca_mod._ref_fwd(x, q, k, v, lam, m, True)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, r_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)  # +inf on the empty sample in both
    assert torch.isinf(lse[1]).all()
    dout = case.dout(torch.float32)
    ours = gca_mod._triton_bwd(dout, q, k, v, lam, m, o, lse, block_m=block_m, block_n=block_n)
    refs = gca_mod._ref_bwd(dout, q, k, v, lam, m, r_o)
    for name, a, b in zip(NAMES[1:], ours, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@needs_triton
def test_no_grad_skips_saved_outputs():
    case = Case(B=2, N=9, H=2, D=40, L=12, mask="varlen", lam="head")
    x, q, k, v, lam = (t.detach() for t in case.inputs(torch.float32))
    with use("triton"):
        out, o, lse = torch.ops.mgkernels.gated_cross_attn_fwd(x, q, k, v, lam, case.mask, False)
        assert o.numel() == 0 and lse.numel() == 0
        out2, o2, lse2 = torch.ops.mgkernels.gated_cross_attn_fwd(x, q, k, v, lam, case.mask, True)
        assert o2.shape == q.shape and lse2.shape == (2, 2, 9) and lse2.dtype == torch.float32
        torch.testing.assert_close(out, out2, rtol=0, atol=0)
        with torch.no_grad():
            out3 = gated_cross_attn(*case.inputs(torch.float32), case.mask)
        assert out3.grad_fn is None
        torch.testing.assert_close(out3, out, rtol=0, atol=0)


@needs_triton
def test_only_x_requires_grad():
    case = Case(B=2, N=9, H=2, D=24, L=12, mask=None, lam="scalar")
    x, q, k, v, lam = (t.detach() for t in case.inputs(torch.float32))
    x.requires_grad_(True)
    with use("triton"):
        out = gated_cross_attn(x, q, k, v, lam)
    d = case.dout(torch.float32)
    (dx,) = torch.autograd.grad(out, (x,), d)
    assert torch.equal(dx, d)


def test_default_cpu_provider_is_ref_and_matches_module_ref():
    case = Case(B=2, N=9, H=2, D=40, L=12, mask="holes", lam="head")
    ins = [t.detach() for t in case.inputs(torch.float32)]
    if KERNEL_DEVICE == "cpu":
        assert dispatch.choose("gated_cross_attn", ins[1], ("triton", "ref")) == "ref"
    out = gated_cross_attn(*ins, case.mask)
    torch.testing.assert_close(out, gated_cross_attn_ref(*ins, case.mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference(*ins, case.mask), rtol=1e-5, atol=1e-5)


def test_gradcheck_ref_provider_fp64():
    B, N, H, D, L = 2, 3, 2, 5, 4
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    x, q, k, v = r(B, N, H * D), r(B, N, H, D), r(B, L, H, D), r(B, L, H, D)
    lam = torch.tensor([0.3, -0.6], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    custom_op = lambda *a: gca_mod.GatedCrossAttnFunction.apply(*a, True)  # the hand-written backward
    with use("ref"):
        assert torch.autograd.gradcheck(lambda *a: gated_cross_attn(*a, mask), (x, q, k, v, lam))
        assert torch.autograd.gradcheck(lambda *a: custom_op(*a, mask), (x, q, k, v, lam))
        lam0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: gated_cross_attn(*a, None), (x, q, k, v, lam0), fast_mode=True)
        assert torch.autograd.gradcheck(lambda *a: custom_op(*a, None), (x, q, k, v, lam0), fast_mode=True)
        assert torch.autograd.gradcheck(lambda *a: gca_mod.CrossAttnFunction.apply(*a, mask, True, False), (q, k, v))


@pytest.mark.parametrize("provider", ["ref"] + (["triton"] if TRITON_OK else []))
def test_opcheck_custom_ops(provider):
    case = Case(B=2, N=5, H=2, D=24, L=6, mask="holes", lam="head")
    x, q, k, v, lam = (t.detach() for t in case.inputs(torch.float32))
    with use(provider):
        torch.library.opcheck(torch.ops.mgkernels.gated_cross_attn_fwd.default, (x, q, k, v, lam, case.mask, True),
                              test_utils=("test_schema", "test_faketensor"))
        _, o, lse = torch.ops.mgkernels.gated_cross_attn_fwd(x, q, k, v, lam, case.mask, True)
        torch.library.opcheck(torch.ops.mgkernels.gated_cross_attn_bwd.default,
                              (case.dout(torch.float32), q, k, v, lam, case.mask, o, lse),
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_traces_through_fake_impls():
    case = Case(B=2, N=5, H=2, D=24, L=6, mask="varlen", lam="head")
    ins = case.inputs(torch.float32)
    with custom_ops_under_compile():  # on a CPU, compile traces the references unless told otherwise
        compiled = torch.compile(gated_cross_attn, backend="aot_eager", fullgraph=True)
        out = compiled(*ins, case.mask)
    grads = torch.autograd.grad(out, ins, case.dout(torch.float32))
    e_out, e_grads = case.run(gated_cross_attn, torch.float32)
    torch.testing.assert_close(out.detach(), e_out)
    for a, b in zip(grads, e_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(q=(2, 5, 2)), "q must be"),
    (dict(k=(2, 6, 3, 24)), "k must be"),
    (dict(v=(2, 7, 2, 24)), "v must have"),
    (dict(x=(2, 5, 24)), "x \\(the residual\\)"),
    (dict(lam=(3,)), "lam must have shape"),
    (dict(mask=(2, 5)), "mask must be"),
])
def test_validation_errors(bad, match):
    shapes = dict(x=(2, 5, 48), q=(2, 5, 2, 24), k=(2, 6, 2, 24), v=(2, 6, 2, 24), lam=(2,), mask=(2, 6))
    shapes.update(bad)
    t = {n: torch.randn(s) for n, s in shapes.items()}
    t["mask"] = t["mask"] > 0
    with pytest.raises(ValueError, match=match):
        gated_cross_attn(t["x"], t["q"], t["k"], t["v"], t["lam"], t["mask"])


@needs_triton
def test_bf16_runs_and_matches_fp64():
    """bf16 (CUDA's main dtype); under the interpreter the tiles are upcast to fp32 before tl.dot."""
    check_case(Case(B=2, N=13, H=2, D=40, L=20, mask="holes", lam="head"), torch.bfloat16, "triton")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_realistic_shape(dtype):
    """An Open-Sora-sized call (N = 16 frames x 256 tokens, L = 120 with varied caption lengths, D = 72)."""
    check_case(Case(B=2, N=4096, H=4, D=72, L=120, mask="holes", lam="head", x_flat=True), dtype, "triton")


# ---------------------------------------------------------------------------------------------------------
# The plain cross-attention (STDiT's T5 / LLM cross-attention core): same kernels with GATED=False
# ---------------------------------------------------------------------------------------------------------

def _plain_run(case, fn, dtype):
    _, q, k, v, _ = case.inputs(dtype)
    o = fn(q, k, v, case.mask)
    d = case.dout64.reshape(o.shape).to(dtype)
    return o.detach(), [g.detach() for g in torch.autograd.grad(o, (q, k, v), d)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("provider", ["triton", "ref"])
@pytest.mark.parametrize("name", list(CASES))
def test_cross_attn_matches_fp64(name, provider, dtype):
    if provider == "triton" and not TRITON_OK:
        pytest.skip("needs Triton (CUDA or TRITON_INTERPRET=1)")
    case = Case(**CASES[name])
    with use(provider):
        o, grads = _plain_run(case, cross_attn, dtype)
    o64, g64 = _plain_run(case, attention_reference, torch.float64)
    ot, gt = _plain_run(case, attention_reference, dtype)
    assert o.dtype == dtype and o.shape == (case.B, case.N, case.H, case.D)
    assert_policy(o, ot, o64, name="o")
    for name_, g, tg, rg in zip(("dq", "dk", "dv"), grads, gt, g64, strict=True):
        assert_policy(g, tg, rg, name=name_)


@needs_triton
def test_stdit_cross_attention_runs_the_kernel():
    """The model's cross-attention goes through mgkernels::cross_attn_fwd/bwd (not SDPA directly), with the
    Triton kernels when asked, and equals the reference provider."""
    from modelgrow.models.layers import MultiHeadCrossAttention

    layer = MultiHeadCrossAttention(48, 2)
    x, y = torch.randn(2, 10, 48, requires_grad=True), torch.randn(2, 7, 48)
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, use("triton"):
        out = layer(x, y, mask)
        (gx,) = torch.autograd.grad(out.sum(), x)
    names = {e.name for e in prof.events()}
    assert "mgkernels::cross_attn_fwd" in names and "mgkernels::cross_attn_bwd" in names
    with use("ref"):
        ref = layer(x, y, mask)
        (rgx,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-5)


def test_cross_attn_opcheck():
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    with use("ref"):
        torch.library.opcheck(torch.ops.mgkernels.cross_attn_fwd, (q, k, v, mask, True))
        o, lse = torch.ops.mgkernels.cross_attn_fwd(q, k, v, mask, True)
        torch.library.opcheck(torch.ops.mgkernels.cross_attn_bwd, (torch.randn_like(o), q, k, v, mask, o, lse))


# ---------------------------------------------------------------------------------------------------------
# The one-pass backward: several key blocks, query splits (dK / dV summed over them), dQ blocks, launches
# ---------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("gated", [True, False])
def test_one_pass_backward_splits_masks_and_launches(gated, dtype, monkeypatch):
    """N = 150 queries in splits of 64 (3 splits, dK / dV summed over them in L2), L = 130 keys (3 key blocks of
    64 in fp16, 5 of 32 in fp32) whose middle block is fully masked in sample 0 while a later key is valid, an
    all-False sample, 2 (b, h) pairs per launch; against float64 for both the gated and the plain op."""
    monkeypatch.setattr(gca_mod, "SCRATCH_BYTES", 2 * 3 * 64 * 160 * 4)
    from mgkernels import _tiles

    monkeypatch.setattr(_tiles, "SPLIT_ROWS", 64)
    case = Case(B=3, N=150, H=2, D=72, L=130, mask="holes", lam="head")
    m = torch.ones(3, 130, dtype=torch.bool)
    m[0, 60:128] = False  # key block 64..127 empty, key 128 valid
    m[1] = False  # no key at all
    m[2, 100:] = False  # keys after the last valid one are skipped
    case.mask = m.to(KERNEL_DEVICE)
    if gated:
        check_case(case, dtype, "triton")
        return
    with use("triton"):
        o, grads = _plain_run(case, cross_attn, dtype)
    o64, g64 = _plain_run(case, attention_reference, torch.float64)
    ot, gt = _plain_run(case, attention_reference, dtype)
    assert_policy(o, ot, o64, name="o")
    for name_, g, tg, rg in zip(("dq", "dk", "dv"), grads, gt, g64, strict=True):
        assert_policy(g, tg, rg, name=name_)
    assert torch.count_nonzero(grads[1][0, 60:128]) == 0 and torch.count_nonzero(grads[1][1]) == 0


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_backward_with_very_negative_scores(dtype):
    """Every score far below 0 (lse ~ -100): the padding keys of the last key block (L = 40) must not give
    exp(0 - lse) = inf and inf * 0 = NaN in dQ = dS K. (At such scores exp's argument carries ~|s| * eps relative
    error, and the interpreter sums q k^T (forward) and k q^T (backward) in different orders: fp32 gets an atol
    of 1e-4 on gradients of ~0.03 (dq, whose rows of dS cancel) to ~3.)"""
    case = Case(B=2, N=19, H=2, D=24, L=40, mask=None, lam="head")
    u = torch.randn(24, dtype=torch.float64)
    u = u / u.norm()
    case.bases["q"] = 0.05 * case.bases["q"] - 22.0 * u
    case.bases["k"] = 0.05 * case.bases["k"] + 22.0 * u
    with use("triton"):
        o, grads = _plain_run(case, cross_attn, dtype)
    o64, g64 = _plain_run(case, attention_reference, torch.float64)
    ot, gt = _plain_run(case, attention_reference, dtype)
    assert_policy(o, ot, o64, name="o")
    for name_, g, tg, rg in zip(("dq", "dk", "dv"), grads, gt, g64, strict=True):
        assert_policy(g, tg, rg, atol=max(ATOL[dtype], 1e-4), name=name_)


def test_eager_ref_skips_the_custom_ops_and_matches_them():
    """With the reference provider outside torch.compile, cross_attn and gated_cross_attn run the reference under
    autograd, not their custom-op pairs; outputs and grads agree with the custom ops' hand-written backward."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, requires_grad=True)
    x, q, k, v = r(2, 5, 16), r(2, 5, 2, 8), r(2, 6, 2, 8), r(2, 6, 2, 8)
    lam = torch.tensor([0.4, -0.7], requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with use("ref"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            eager = (gated_cross_attn(x, q, k, v, lam, mask), cross_attn(q, k, v, mask))
            ge = torch.autograd.grad(eager[0].sum() + (eager[1] ** 2).sum(), (x, q, k, v, lam))
        ops = (gca_mod.GatedCrossAttnFunction.apply(x, q, k, v, lam, mask, True),
               gca_mod.CrossAttnFunction.apply(q, k, v, mask, True, False))
        go = torch.autograd.grad(ops[0].sum() + (ops[1] ** 2).sum(), (x, q, k, v, lam))
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("mgkernels::") for n in names), sorted(n for n in names if "mgkernels" in n)
    for a, b in zip(eager, ops, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ge, go, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
