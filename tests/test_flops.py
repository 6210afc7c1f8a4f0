"""The analytic FLOP model against FLOPs counted from the layers a real forward calls (on the meta device)."""

import torch
import torch.nn as nn

from modelgrow.models import OPENSORA_V1_16x256x256, create_model
from modelgrow.models.flops import stdit_flops


def _counted_linear_flops(model, B, L):
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        x = inp[0]
        if isinstance(mod, nn.Linear):
            total += 2 * x.numel() // mod.in_features * mod.in_features * mod.out_features
        else:  # Conv3d patch embedding: one MAC per kernel element per output
            total += 2 * out.numel() * mod.weight[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv3d))]
    T, H, W = model.input_size
    with torch.no_grad():
        model(torch.zeros(B, 4, T, H, W, device="meta"), torch.zeros(B, device="meta"),
              torch.zeros(B, 1, L, model.y_embedder.y_embedding.shape[1], device="meta"))
    for h in hooks:
        h.remove()
    return total / B


def test_linear_flops_match_counted_layers():
    with torch.device("meta"):
        m = create_model("STDiT-XL/2", **OPENSORA_V1_16x256x256)
    f = stdit_flops(**m.config, caption_tokens=120)
    assert f.linear == _counted_linear_flops(m, B=2, L=120)
    # DESIGN: ~5.7 TFLOP forward per sample, linears ~96%
    assert 5.6e12 < f.total < 5.8e12 and 0.95 < f.linear / f.total < 0.97
    # attention: spatial 4*T*S^2*C + temporal 4*S*T^2*C + cross 4*N*L*C, per block
    C, T, S, L = 1152, 16, 256, 120
    assert f.attention == 28 * 4 * C * (T * S * S + S * T * T + T * S * L)


def test_llm_condition_adds_a_cross_attention():
    base = stdit_flops(1152, 28, caption_tokens=120)
    grown = stdit_flops(1152, 56, caption_tokens=120, llm_tokens=120)
    assert grown.total > 2 * base.total
