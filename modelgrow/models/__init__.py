"""STDiT (Open-Sora v1.0 compatible), its layers, the model zoo and checkpoint I/O.

Names load lazily from their module (``from modelgrow.models import STDiT`` imports ``.stdit`` then), so that
the preset table (``modelgrow.models.presets``, what a config validates against) is readable without torch."""

from __future__ import annotations

import importlib

__all__ = [
    "STDiT",
    "STDiTBlock",
    "PRESETS",
    "OPENSORA_V1_16x256x256",
    "OPENSORA_V1_16x512x512",
    "create_model",
    "preset_kwargs",
    "count_parameters",
    "dtype_from_name",
    "CheckpointMismatchError",
    "LoadReport",
    "detect_format",
    "read_checkpoint",
    "load_checkpoint",
    "save_pretrained",
    "from_pretrained",
]

_LAZY = {
    **{n: "stdit" for n in ("STDiT", "STDiTBlock", "dtype_from_name")},
    **{n: "presets" for n in ("PRESETS", "OPENSORA_V1_16x256x256", "OPENSORA_V1_16x512x512")},
    **{n: "zoo" for n in ("create_model", "preset_kwargs", "count_parameters")},
    **{n: "checkpoint" for n in ("CheckpointMismatchError", "LoadReport", "detect_format", "read_checkpoint",
                                 "load_checkpoint", "save_pretrained", "from_pretrained")},
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
