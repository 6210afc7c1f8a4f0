"""STDiT with the fused kernels equals STDiT on the PyTorch reference path (outputs and gradients)."""

import pytest
import torch

from mgkernels import _cpu_attention, _ext
from mgkernels.dispatch import custom_ops_under_compile, use
from modelgrow.models import STDiTBlock, create_model

from .helpers import randomize_
from .kernel_utils import KERNEL_DEVICE

FUSED = ["triton"] + (["csrc"] if _ext.ext_available() and hasattr(_ext._C, "residual_modulate_bwd") else [])


def _run(module, fn, provider, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    module.zero_grad(set_to_none=True)
    with use(provider):
        out = fn(*leaves)
        out.backward(dout)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), [lf.grad for lf in leaves if lf.grad is not None], grads


@pytest.mark.parametrize("provider", FUSED)
def test_block_fused_equals_reference(provider):
    device = KERNEL_DEVICE if provider == "triton" else "cpu"
    g = torch.Generator().manual_seed(0)
    B, T, S, C, L = 2, 5, 6, 48, 7
    block = randomize_(STDiTBlock(C, num_heads=4, d_s=S, d_t=T)).to(device)
    x = torch.randn(B, T * S, C, generator=g).to(device)
    y = torch.randn(B, L, C, generator=g).to(device)
    t = torch.randn(B, 6 * C, generator=g).to(device)
    mask = torch.tensor([[True] * L, [True] * 3 + [False] * (L - 3)], device=device)
    tpe = torch.randn(1, T, C, generator=g).to(device)
    dout = torch.randn(B, T * S, C, generator=g).to(device)

    def f(x, y, t, tpe):
        return block(x, y, t, mask, tpe)

    ref = _run(block, f, "ref", [x, y, t, tpe], dout)
    fused = _run(block, f, provider, [x, y, t, tpe], dout)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(fused[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name in ref[2]:
        torch.testing.assert_close(fused[2][name], ref[2][name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("provider", FUSED)
def test_model_fused_equals_reference(provider):
    device = KERNEL_DEVICE if provider == "triton" else "cpu"
    m = randomize_(create_model("STDiT-tiny")).to(device).train()
    m.y_embedder.uncond_prob = 0.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 8, 8, generator=g).to(device)
    y = torch.randn(2, 1, 8, 32, generator=g).to(device)
    ts = torch.tensor([17.0, 801.0], device=device)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], device=device)
    dout = torch.randn(2, 8, 4, 8, 8, generator=g).to(device)
    outs = {}
    for p in ("ref", provider):
        m.zero_grad(set_to_none=True)
        with use(p):
            o = m(x, ts, y, mask)
            o.backward(dout)
        outs[p] = (o.detach(), {n: q.grad.clone() for n, q in m.named_parameters()})
    torch.testing.assert_close(outs[provider][0], outs["ref"][0], rtol=1e-4, atol=1e-5)
    for name, gr in outs["ref"][1].items():
        torch.testing.assert_close(outs[provider][1][name], gr, rtol=1e-4, atol=1e-4, msg=name)


def test_compiled_and_checkpointed_model_match_eager():
    """The custom ops trace under torch.compile and re-run under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    m = randomize_(create_model("STDiT-tiny")).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 1, 8, 32, generator=g)
    ts, mask = torch.tensor([3.0, 500.0]), torch.tensor([[1] * 8, [1] * 2 + [0] * 6])
    eager = m(x, ts, y, mask)
    with custom_ops_under_compile():  # on a CPU, compile traces the references unless told otherwise
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, ts, y, mask), eager, rtol=1e-5, atol=1e-5)

    blk = m.blocks[0]
    h = torch.randn(2, 64, 64, generator=g, requires_grad=True)
    c = torch.randn(2, 8, 64, generator=g)
    t6 = torch.randn(2, 6 * 64, generator=g)
    plain = blk(h, c, t6, None, None)
    (gp,) = torch.autograd.grad(plain.square().sum(), h)
    ck = checkpoint(blk, h, c, t6, None, None, use_reentrant=False)
    (gc,) = torch.autograd.grad(ck.square().sum(), h)
    torch.testing.assert_close(ck, plain)
    torch.testing.assert_close(gc, gp)


def test_compile_on_cpu_traces_the_references():
    """Under torch.compile, a CPU model's fused modulation ops are traced as their PyTorch expressions (no opaque
    custom op left to cut Inductor's graph), its attention ops stay custom ops when the C++ kernel is built (else
    they are traced as SDPA), with the eager model's outputs and gradients; ``custom_ops_under_compile`` keeps
    every custom op in the graph."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def capture(gm, _inputs):
        graphs.append(str(gm.graph))
        return gm

    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    from modelgrow.grow import add_llm_condition

    # the grown model's LLM branch too (its gated residual); eval: no random caption dropout between the runs
    m = randomize_(add_llm_condition(create_model("STDiT-tiny"), 32, 6)).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 1, 8, 32, generator=g)
    ts, mask = torch.tensor([3.0, 500.0]), torch.tensor([[1] * 8, [1] * 2 + [0] * 6])
    y_llm, llm_mask = torch.randn(2, 1, 6, 32, generator=g), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    dout = torch.randn(2, 8, 4, 8, 8, generator=g)

    def run(model):
        m.zero_grad(set_to_none=True)
        out = model(x, ts, y, mask, y_llm=y_llm, llm_mask=llm_mask)
        out.backward(dout)
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    eager, eager_grads = run(m)  # the custom ops (the C++ kernels where built, else the reference pair)
    torch._dynamo.reset()
    out, grads = run(torch.compile(m, backend=backend, fullgraph=True))
    assert len(graphs) == 2, "one forward and one backward graph"
    # the modulation ops are traced (Inductor fuses them with their neighbours) ...
    assert not any("mgkernels.modulate" in gr or "mgkernels.residual" in gr for gr in graphs), "modulate op left"
    assert any("native_layer_norm" in gr for gr in graphs)
    if _cpu_attention.AVAILABLE:  # ... the attention ops are the C++ operators when the kernel is built
        for op in ("st_attention_fwd", "st_attention_bwd", "cross_attn_fwd", "cross_attn_bwd"):
            assert any(f"mgkernels.csrc_{op}" in gr for gr in graphs), f"csrc_{op} is not in the compiled graphs"
            assert not any(f"mgkernels.{op}" in gr for gr in graphs), f"the custom op {op} is in the compiled graphs"
    else:  # ... or are traced as SDPA too
        assert not any("mgkernels" in gr for gr in graphs) and any("attention" in gr for gr in graphs)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for name, gr in eager_grads.items():
        torch.testing.assert_close(grads[name], gr, rtol=1e-4, atol=1e-4, msg=lambda e, n=name: f"{n}: {e}")

    if _cpu_attention.AVAILABLE:  # a provider request re-traces: use("ref") gives SDPA, no C++ operator
        graphs.clear()
        compiled = torch.compile(m, backend=backend, fullgraph=True)
        with use("ref"):
            out_ref, _ = run(compiled)
        assert len(graphs) == 2 and not any("mgkernels" in gr for gr in graphs)
        torch.testing.assert_close(out_ref, eager, rtol=1e-5, atol=1e-5)

    graphs.clear()
    torch._dynamo.reset()
    with custom_ops_under_compile():
        run(torch.compile(m, backend=backend, fullgraph=True))
    assert any("mgkernels.modulate_fwd" in gr for gr in graphs) and any("mgkernels.st_attention_bwd" in gr for gr in graphs)
    torch._dynamo.reset()
