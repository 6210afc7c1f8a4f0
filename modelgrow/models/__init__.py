"""STDiT (Open-Sora v1.0 compatible), its layers, the model zoo and checkpoint I/O."""

from .checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    detect_format,
    from_pretrained,
    load_checkpoint,
    read_checkpoint,
    save_pretrained,
)
from .stdit import STDiT, STDiTBlock, dtype_from_name
from .zoo import OPENSORA_V1_16x256x256, OPENSORA_V1_16x512x512, PRESETS, count_parameters, create_model, preset_kwargs

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
