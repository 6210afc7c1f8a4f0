"""Training checkpoint -> pretrained directory (single safetensors model + config)."""

from __future__ import annotations

from pathlib import Path

from ..models import STDiT, save_pretrained
from .checkpoint import load_model_weights, read_meta
from .state import apply_lora, merge_lora


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, which: str = "ema") -> tuple[Path, STDiT, dict]:
    """Write the EMA (``which="ema"``) or raw weights of a DCP training checkpoint as a pretrained dir (LoRA
    adapters merged into their linears); the choice is recorded in config.json as ``"weights"``."""
    meta = read_meta(ckpt_dir)
    model = STDiT(**meta["model_config"])
    mode = meta.get("train_mode")
    if mode == "lora":
        apply_lora(model, meta["lora_rank"])
    elif mode == "expand" and meta["config"]["grow"].get("train_new_only"):
        from ..grow import freeze_original_blocks

        freeze_original_blocks(model)  # the EMA covers the trainable parameters only
    load_model_weights(ckpt_dir, model, which=which)
    if mode == "lora":
        merge_lora(model)
    out = save_pretrained(model, out_dir, extra={"source": str(ckpt_dir), "source_step": meta["step"], "weights": which})
    return out, model, meta
