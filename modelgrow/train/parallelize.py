"""One place for parallelism, outside the model (torchtitan's order):

1. activation checkpointing: ``none`` | ``full`` (every block) | ``every-N`` (every N-th block);
2. optional per-block ``torch.compile``;
3. FSDP2 ``fully_shard`` per block, then the root, with ``MixedPrecisionPolicy(param bf16, reduce fp32)``
   (only when the world size is > 1 and ``parallel.fsdp`` is on).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ParallelConfig
from ..models.stdit import dtype_from_name


def checkpointed_blocks(policy: str, depth: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if policy == "none":
        return []
    if policy == "full":
        return list(range(depth))
    every = int(policy.split("-", 1)[1])
    return list(range(0, depth, every))


def apply_activation_checkpointing(model: nn.Module, policy: str) -> list[int]:
    chosen = set(checkpointed_blocks(policy, len(model.blocks)))
    for i, block in enumerate(model.blocks):
        block.grad_checkpointing = i in chosen  # STDiT.forward wraps these in torch.utils.checkpoint
    return sorted(chosen)


def apply_compile(model: nn.Module) -> None:
    for block in model.blocks:
        block.compile(dynamic=False)


def apply_fsdp(model: nn.Module, cfg: ParallelConfig) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype_from_name(cfg.param_dtype), reduce_dtype=dtype_from_name(cfg.reduce_dtype))
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed right away by backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < n - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)


def parallelize(model: nn.Module, cfg: ParallelConfig, world_size: int = 1) -> dict:
    """Apply AC -> compile -> FSDP2 in place; returns what was applied (for the run log)."""
    done = {"activation_checkpointing": apply_activation_checkpointing(model, cfg.activation_checkpointing)}
    if cfg.compile:
        apply_compile(model)
        done["compile"] = True
    if world_size > 1 and cfg.fsdp:
        if not torch.distributed.is_initialized():
            raise RuntimeError("FSDP needs an initialised process group: launch with torchrun")
        apply_fsdp(model, cfg)
        done["fsdp"] = {"param_dtype": cfg.param_dtype, "reduce_dtype": cfg.reduce_dtype,
                        "reshard_after_forward": cfg.reshard_after_forward}
    return done
