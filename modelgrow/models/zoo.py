"""Named STDiT presets. A preset fixes the architecture; anything else (input size, caption channels, ...)
is passed as a keyword override: ``create_model("STDiT-XL/2", input_size=(16, 32, 32), space_scale=0.5)``."""

from __future__ import annotations

from typing import Any

from .stdit import STDiT

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


def preset_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The STDiT keyword arguments of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


def create_model(name: str, **overrides: Any) -> STDiT:
    """Build preset ``name`` (weights initialised as Open-Sora does). Works under ``torch.device('meta')``."""
    return STDiT(**preset_kwargs(name, **overrides))


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
