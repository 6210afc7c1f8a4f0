"""Named STDiT presets (plain data: importing this module needs no torch). A preset fixes the architecture;
anything else (input size, caption channels, ...) is passed as a keyword override (``zoo.create_model``)."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "OPENSORA_V1_16x256x256", "OPENSORA_V1_16x512x512"]

# STDiT-XL/2 is the only named size Open-Sora v1.0 registers; S and B follow DiT's naming for smaller experiments.
PRESETS: dict[str, dict[str, Any]] = {
    "STDiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16),
    "STDiT-B/2": dict(depth=12, hidden_size=768, patch_size=(1, 2, 2), num_heads=12),
    "STDiT-S/2": dict(depth=12, hidden_size=384, patch_size=(1, 2, 2), num_heads=6),
    # tiny presets: seconds on a CPU, for tests and the demo
    "STDiT-tiny": dict(
        depth=2, hidden_size=64, patch_size=(1, 2, 2), num_heads=4,
        input_size=(4, 8, 8), caption_channels=32, model_max_length=8,
    ),
    "STDiT-mini": dict(
        depth=4, hidden_size=96, patch_size=(1, 2, 2), num_heads=4,
        input_size=(8, 16, 16), caption_channels=64, model_max_length=16,
    ),
}

# What Open-Sora v1.0's released 16x256x256 / 16x512x512 checkpoints were trained with (on top of XL/2).
OPENSORA_V1_16x256x256 = dict(input_size=(16, 32, 32), space_scale=0.5, time_scale=1.0, caption_channels=4096, model_max_length=120)
OPENSORA_V1_16x512x512 = dict(input_size=(16, 64, 64), space_scale=1.0, time_scale=1.0, caption_channels=4096, model_max_length=120)
