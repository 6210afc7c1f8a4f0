"""The model zoo: named STDiT presets (the table: :mod:`.presets`). A preset fixes the architecture; anything
else (input size, caption channels, ...) is passed as a keyword override:
``create_model("STDiT-XL/2", input_size=(16, 32, 32), space_scale=0.5)``."""

from __future__ import annotations

from typing import Any

from .presets import PRESETS, OPENSORA_V1_16x256x256, OPENSORA_V1_16x512x512
from .stdit import STDiT

__all__ = ["PRESETS", "OPENSORA_V1_16x256x256", "OPENSORA_V1_16x512x512", "preset_kwargs", "create_model",
           "count_parameters"]


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
