"""Training system: parallelize (AC -> compile -> FSDP2), AdamW + EMA, condition dropout, resumable DCP
checkpoints, the step line, and the Trainer that ties them together."""

from .inputs import RandomLatentLoader
from .parallelize import checkpointed_blocks, parallelize
from .state import EMA, apply_lora, draw_condition_dropout, merge_lora
from .trainer import Trainer, build_model

__all__ = ["EMA", "RandomLatentLoader", "Trainer", "apply_lora", "build_model", "checkpointed_blocks",
           "draw_condition_dropout", "merge_lora", "parallelize"]
