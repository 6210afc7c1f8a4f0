"""mgkernels.st_attention: spatial / temporal attention read from fused qkv, forward and dqkv.

Checked against an independent float64 reference (explicit einsum + softmax on a reshaped copy) under the
DESIGN tolerance policy; Triton runs through the interpreter on CPU (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from mgkernels import _tiles as tiles
from mgkernels import st_attention as sta
from mgkernels.dispatch import use
from mgkernels.st_attention import st_attention, st_attention_ref
from tests.kernel_utils import KERNEL_DEVICE, KERNEL_DTYPES, assert_policy, requires_cuda

# (mode, B, T, S, H, D). The interpreter runs the GPU tile configurations (mgkernels.st_attention._config):
# fp16 packs sequences of <= 64 into 64-row tiles and runs flash tiles of 128 queries x 64 keys beyond;
# fp32 packs <= 32 into 32-row tiles and runs 32 x 32 flash tiles beyond. So L = 40 / 80 / 160 take the flash
# loops (several key and query blocks, partial last blocks) and short sequences the packed tiles (several
# sequences per tile, a partial last pack). Head dims: 72 = 64 + 16 split, 40 = 32 + 16, 24 = 16 + 16, 16.
CASES = [
    ("spatial", 2, 2, 6, 2, 72),  # odd S, D = 72 (STDiT-XL/2): packed
    ("spatial", 1, 2, 20, 2, 40),
    ("spatial", 2, 1, 80, 1, 24),  # T = 1; fp16: one 128-row query block, two key blocks
    ("spatial", 1, 2, 40, 2, 72),  # fp32: 2 flash blocks; fp16: packed (one sequence per tile)
    ("spatial", 1, 1, 160, 1, 72),  # fp16: 2 query blocks x 3 key blocks, partial last ones
    ("temporal", 2, 5, 6, 2, 72),  # odd T: 8 / 4 sequences per packed tile
    ("temporal", 1, 16, 3, 2, 24),  # T = 16
    ("temporal", 2, 16, 9, 2, 72),  # T = 16, 9 sequences: 3 packed tiles, the last one partial (fp16)
    ("temporal", 2, 1, 4, 1, 16),  # T = 1, D = 16 (no head-dim tail)
    ("temporal", 1, 40, 2, 1, 24),  # long temporal sequence: flash path (fp32), one packed tile (fp16)
]


def _ids(case):
    mode, B, T, S, H, D = case
    return f"{mode}-B{B}T{T}S{S}H{H}D{D}"


def attention64(qkv: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
    """Independent float64 reference: explicit scores / softmax / weighted sum on a reshaped copy."""
    B, N, _, H, D = qkv.shape
    x = qkv.double().reshape(B, T, S, 3, H, D)
    q, k, v = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]  # [B, T, S, H, D]
    scale = D**-0.5
    if mode == "spatial":  # sequences over s for every (b, t)
        p = torch.softmax(torch.einsum("btshd,btuhd->bthsu", q, k) * scale, dim=-1)
        o = torch.einsum("bthsu,btuhd->btshd", p, v)
    else:  # sequences over t for every (b, s)
        p = torch.softmax(torch.einsum("btshd,bushd->bshtu", q, k) * scale, dim=-1)
        o = torch.einsum("bshtu,bushd->btshd", p, v)
    return o.reshape(B, N, H * D)


def make_qkv(B, T, S, H, D, dtype, layout="contiguous", device=KERNEL_DEVICE) -> torch.Tensor:
    """A [B, T*S, 3, H, D] leaf in one of three memory layouts (values are the same random draw)."""
    base = torch.randn(B, T * S, 3, H, D, dtype=torch.float64)
    if layout == "contiguous":
        t = base.to(device=device, dtype=dtype)
    elif layout == "sliced":  # a slice of a wider tensor: row strides != 3*H*D
        wide = torch.zeros(B, T * S, 3, H, D + 8, dtype=dtype, device=device)
        wide[..., :D] = base.to(device=device, dtype=dtype)
        t = wide[..., :D]
    elif layout == "transposed":  # storage ordered [3, H, D, B, N]: stride(-1) != 1
        store = base.permute(2, 3, 4, 0, 1).contiguous().to(device=device, dtype=dtype)
        t = store.permute(3, 4, 0, 1, 2)
    else:
        raise ValueError(layout)
    assert t.shape == (B, T * S, 3, H, D)
    return t.detach().requires_grad_(True)


def _check_against_ref64(qkv: torch.Tensor, T: int, S: int, mode: str, provider: str, do: torch.Tensor | None = None):
    """Forward o and dqkv of ``provider`` vs the float64 reference, with PyTorch-in-dtype as the yardstick."""
    x64 = qkv.detach().double().requires_grad_(True)
    o64 = attention64(x64, T, S, mode)
    if do is None:
        do = torch.randn(o64.shape, dtype=torch.float64).to(device=qkv.device, dtype=qkv.dtype)
    (g64,) = torch.autograd.grad(o64, x64, do.double())

    xt = qkv.detach().clone().requires_grad_(True)  # PyTorch in the same dtype
    ot = st_attention_ref(xt, T, S, mode)
    (gt,) = torch.autograd.grad(ot, xt, do)

    with use(provider):
        o = st_attention(qkv, T, S, mode)
        (g,) = torch.autograd.grad(o, qkv, do)
    assert o.dtype == qkv.dtype and g.dtype == qkv.dtype
    assert_policy(o, ot, o64, name="o")
    assert_policy(g, gt, g64, name="dqkv")
    for i, name in enumerate("qkv"):
        assert_policy(g[:, :, i], gt[:, :, i], g64[:, :, i], name=f"d{name}")
    return o, g


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_float64(case, dtype):
    mode, B, T, S, H, D = case
    layout = ("contiguous", "sliced", "transposed")[CASES.index(case) % 3]
    qkv = make_qkv(B, T, S, H, D, dtype, layout)
    _check_against_ref64(qkv, T, S, mode, "triton")


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_non_contiguous_qkv_and_grad_output(mode, layout):
    """Arbitrary qkv strides and a non-contiguous dO; qkv is read in place (never modified)."""
    B, T, S, H, D = 2, 3, 5, 2, 24
    qkv = make_qkv(B, T, S, H, D, torch.float32, layout)
    before = qkv.detach().clone()
    do = torch.randn(B, H * D, T * S, device=KERNEL_DEVICE).transpose(1, 2)  # [B, N, H*D], stride(-1) != 1
    _check_against_ref64(qkv, T, S, mode, "triton", do=do)
    assert torch.equal(qkv.detach(), before)


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_expanded_grad_output(mode):
    """o.sum().backward() hands the kernel a stride-0 dO."""
    B, T, S, H, D = 1, 4, 6, 2, 40
    qkv = make_qkv(B, T, S, H, D, torch.float32)
    with use("triton"):
        st_attention(qkv, T, S, mode).sum().backward()
    xt = qkv.detach().clone().requires_grad_(True)  # PyTorch in the same dtype: the yardstick
    st_attention_ref(xt, T, S, mode).sum().backward()
    x64 = qkv.detach().double().requires_grad_(True)
    attention64(x64, T, S, mode).sum().backward()
    assert_policy(qkv.grad, xt.grad, x64.grad, atol=2e-5, name="dqkv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_ref_provider_matches_float64(mode, dtype):
    qkv = make_qkv(2, 3, 5, 2, 24, dtype, "sliced")
    _check_against_ref64(qkv, 3, 5, mode, "ref")


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_lse_triton_equals_ref(mode):
    """Both providers return the same (o, lse) from the forward custom op; lse is fp32 [B, H, T*S]."""
    B, T, S, H, D = 2, 3, 20, 2, 24
    qkv = make_qkv(B, T, S, H, D, torch.float32, "sliced").detach()
    with use("triton"):
        o_t, lse_t = torch.ops.mgkernels.st_attention_fwd(qkv, T, S, mode)
    with use("ref"):
        o_r, lse_r = torch.ops.mgkernels.st_attention_fwd(qkv, T, S, mode)
    assert lse_t.shape == lse_r.shape == (B, H, T * S) and lse_t.dtype == lse_r.dtype == torch.float32
    torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_t, lse_r, atol=1e-5, rtol=1e-5)
    # lse by token: logsumexp over the token's sequence of the scaled scores, in float64
    x = qkv.double().reshape(B, T, S, 3, H, D)
    q, k = x[:, :, :, 0], x[:, :, :, 1]
    if mode == "spatial":
        s = torch.einsum("btshd,btuhd->bhtsu", q, k)
    else:
        s = torch.einsum("btshd,bushd->bhtsu", q, k)
    lse64 = torch.logsumexp(s * D**-0.5, dim=-1).reshape(B, H, T * S)
    torch.testing.assert_close(lse_t.double(), lse64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_gradcheck_ref(mode):
    """Both reference routes: the eager one (SDPA under autograd) and the custom-op pair with its hand-written
    backward (what torch.ops and torch.compile reach)."""
    qkv = make_qkv(1, 3, 2, 2, 4, torch.float64, "sliced")
    with use("ref"):
        assert torch.autograd.gradcheck(lambda x: st_attention(x, 3, 2, mode), (qkv,), fast_mode=True)
        assert torch.autograd.gradcheck(lambda x: sta.STAttentionFunction.apply(x, 3, 2, mode, False), (qkv,),
                                        fast_mode=True)


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_eager_ref_skips_the_custom_op_and_matches_it(mode):
    """With the reference provider outside torch.compile, st_attention runs SDPA under autograd, not the
    custom-op pair (whose LSE and hand-written backward cost 2x on a CPU); outputs and grads agree."""
    qkv = make_qkv(2, 3, 5, 2, 8, torch.float32, "sliced")
    do = torch.randn(2, 15, 16)
    with use("ref"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            o = st_attention(qkv, 3, 5, mode)
            (g,) = torch.autograd.grad(o, qkv, do)
        o_op = sta.STAttentionFunction.apply(qkv, 3, 5, mode, False)
        (g_op,) = torch.autograd.grad(o_op, qkv, do)
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("mgkernels::st_attention") for n in names), sorted(names)
    torch.testing.assert_close(o, o_op, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_op, rtol=1e-4, atol=1e-5)


def test_custom_ops_opcheck():
    """Schema, fake (register_fake) and autograd registration checks of both custom ops (reference provider)."""
    qkv = torch.randn(1, 6, 3, 2, 4)
    with use("ref"):
        o, lse = torch.ops.mgkernels.st_attention_fwd(qkv, 2, 3, "temporal")
        torch.library.opcheck(torch.ops.mgkernels.st_attention_fwd, (qkv, 2, 3, "temporal"))
        torch.library.opcheck(
            torch.ops.mgkernels.st_attention_bwd, (torch.randn_like(o), qkv, o, lse, 2, 3, "temporal")
        )


def test_validation_errors():
    qkv = torch.randn(1, 6, 3, 2, 4)
    with pytest.raises(ValueError, match="unknown mode"):
        st_attention(qkv, 2, 3, "spacial")
    with pytest.raises(ValueError, match="rank 4"):
        st_attention(qkv.flatten(3), 2, 3, "spatial")
    with pytest.raises(ValueError, match="is not T\\*S"):
        st_attention(qkv, 2, 4, "spatial")
    with pytest.raises(ValueError, match="must be 3"):
        st_attention(torch.randn(1, 6, 2, 2, 4), 2, 3, "temporal")
    with pytest.raises(ValueError, match="T and S must be >= 1"):
        st_attention(torch.randn(1, 0, 3, 2, 4), 0, 3, "temporal")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("mode,T,S", [("spatial", 16, 256), ("temporal", 16, 256), ("temporal", 5, 1024)])
def test_stdit_xl_shapes_cuda(mode, T, S, dtype):
    """STDiT-XL/2 geometry (16 heads x 72) at real sizes with the native (non-interpreted) kernels."""
    qkv = make_qkv(2, T, S, 16, 72, dtype, "sliced")
    _check_against_ref64(qkv, T, S, mode, "triton")


class _CountLaunches:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("rows, several_launches", [(128, False), (64, True)])
def test_one_pass_backward_splits_and_launches(rows, several_launches, dtype, monkeypatch):
    """The flash path's one-pass backward with the queries cut into several splits (dK / dV of every key block
    summed over the splits), several key blocks and dQ query blocks per split (S = 160: 3 key blocks of 64 in
    fp16, 5 of 32 in fp32; 128-row splits hold two 64-row dQ blocks), and the sequences spread over several
    launches (a small scratch budget)."""
    monkeypatch.setattr(tiles, "SPLIT_ROWS", rows)
    if several_launches:
        monkeypatch.setattr(sta, "SCRATCH_BYTES", 3 * rows * 192 * 4)  # 1-2 of the 4 sequences x heads
    kernel = _CountLaunches(sta._st_attn_bwd_kernel)
    monkeypatch.setattr(sta, "_st_attn_bwd_kernel", kernel)
    B, T, S, H, D = 1, 2, 160, 2, 72
    qkv = make_qkv(B, T, S, H, D, dtype, "sliced")
    _check_against_ref64(qkv, T, S, "spatial", "triton")
    cfg = sta._config(S, D, dtype)
    assert not cfg["packed"] and -(-S // cfg["bwd"][1]) >= 3 and -(-S // rows) >= 2
    assert (kernel.launches >= 2) == several_launches


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_backward_with_very_negative_scores(dtype):
    """Every score of a sequence far below 0 (lse ~ -100): the padding keys of the last key block (S = 80 is not a
    multiple of the key block) must not turn exp(0 - lse) into inf and then inf * 0 = NaN in dQ = dS K."""
    B, T, S, H, D = 1, 2, 80, 1, 24
    u = torch.randn(D, dtype=torch.float64)
    u = u / u.norm()
    base = 0.05 * torch.randn(B, T * S, 3, H, D, dtype=torch.float64)
    base[:, :, 0] += -22.0 * u  # q . k / sqrt(D) ~ -22 * 22 / sqrt(24) ~ -99 for every pair
    base[:, :, 1] += 22.0 * u
    qkv = base.to(device=KERNEL_DEVICE, dtype=dtype).requires_grad_(True)
    _check_against_ref64(qkv, T, S, "spatial", "triton")
