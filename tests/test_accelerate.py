"""modelgrow.accelerate: same function as the reference path, within the kernel tolerance policy."""

import torch

from mgkernels.dispatch import use
from modelgrow import accelerate
from modelgrow.grow import add_llm_condition
from modelgrow.models import create_model

from .helpers import randomize_


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([10.0, 600.0]), torch.randn(2, 1, 8, 32, generator=g),
            torch.tensor([[1] * 8, [1] * 4 + [0] * 4]))


def test_accelerated_equals_reference_fp32_and_compiled():
    m = randomize_(create_model("STDiT-tiny")).eval()
    args = _inputs()
    with use("ref"), torch.no_grad():
        ref = m(*args)
    fast = accelerate(m, dtype="float32", compile=True, backend="aot_eager")
    with torch.no_grad():
        out = fast(*args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert fast.config == m.config and fast.depth == 2  # attributes fall through to the model (config: a fresh copy)


def test_accelerated_bf16_within_policy_and_llm_kwargs():
    m = randomize_(add_llm_condition(create_model("STDiT-tiny"), 16, 4)).eval()
    for b in m.blocks:
        torch.nn.init.constant_(b.llm_gate, 0.5)
    args = _inputs()
    y_llm = torch.randn(2, 1, 4, 16)
    with use("ref"), torch.no_grad():
        m64 = m.double()
        m64.dtype = torch.float64
        ref64 = m64(*args, y_llm=y_llm)
        m.float()
        m.dtype = torch.float32
        ref32 = m(*args, y_llm=y_llm)
    fast = accelerate(m, dtype="bfloat16", kernels="ref")
    with torch.no_grad():
        out = fast(*args, y_llm=y_llm)
    assert out.dtype == torch.float32 and m.x_embedder.proj.weight.dtype == torch.bfloat16
    err, scale = (out - ref64).abs().max(), ref64.abs().max()
    assert err <= 0.05 * scale, f"bf16 error {err:.3e} vs output scale {scale:.3e}"
    assert (ref32 - ref64).abs().max() <= 1e-3 * scale
