"""Analytic FLOP model of STDiT (multiply-add = 2 FLOPs), for MFU in step lines and benchmarks.

Counts matrix products only (linears, the patch-embedding convolution, attention's two products); the
elementwise glue (norms, modulation, softmax, GELU) is memory-bound and excluded, as MFU conventions do.
A training step costs 3x the forward (forward + backward with respect to inputs and weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StdItFlops:
    linear: float  # block linears + embedders + final layer
    attention: float  # QK^T and PV of spatial, temporal and cross attention
    total: float

    def per_step(self, training: bool = True) -> float:
        return self.total * (3.0 if training else 1.0)


def stdit_flops(
    hidden_size: int,
    depth: int,
    input_size=(16, 32, 32),
    patch_size=(1, 2, 2),
    in_channels: int = 4,
    caption_channels: int = 4096,
    caption_tokens: int = 120,
    mlp_ratio: float = 4.0,
    pred_sigma: bool = True,
    llm_tokens: int = 0,
    llm_channels: int | None = None,
    **_: object,
) -> StdItFlops:
    """Forward FLOPs for one sample. ``caption_tokens`` = T5 tokens attended to; ``llm_tokens`` > 0 adds the
    LLM cross-attention of a grown model (same shape as the T5 one) and its embedder (``llm_channels`` in,
    default ``caption_channels``). Extra keyword arguments (e.g. a full
    STDiT config) are ignored so ``stdit_flops(**model.config)`` works."""
    C = hidden_size
    T = input_size[0] // patch_size[0]
    S = (input_size[1] // patch_size[1]) * (input_size[2] // patch_size[2])
    N = T * S
    hid = int(C * mlp_ratio)
    out_ch = in_channels * (2 if pred_sigma else 1)
    conds = [caption_tokens] + ([llm_tokens] if llm_tokens else [])

    per_block_linear = N * (4 * C * C) * 2  # spatial and temporal: qkv (3C^2) + proj (C^2)
    per_block_linear += N * 2 * C * hid  # MLP
    per_block_attn = T * 2 * S * S * C + S * 2 * T * T * C  # spatial, temporal (QK^T + PV: 2 products x MACs)
    for L in conds:
        per_block_linear += N * 2 * C * C + L * 2 * C * C  # q + proj on video tokens, kv on condition tokens
        per_block_attn += 2 * N * L * C
    linear = 2.0 * depth * per_block_linear
    attention = 2.0 * depth * per_block_attn
    patch = math.prod(patch_size)
    embed = N * in_channels * patch * C + 256 * C + C * C + C * 6 * C + caption_tokens * (caption_channels * C + C * C)
    if llm_tokens:  # the LLM embedder: llm_channels -> C -> C on the LLM tokens
        embed += llm_tokens * ((llm_channels or caption_channels) * C + C * C)
    final = N * C * patch * out_ch
    linear += 2.0 * (embed + final)
    return StdItFlops(linear=linear, attention=attention, total=linear + attention)
