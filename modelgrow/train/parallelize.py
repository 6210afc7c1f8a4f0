"""One place for how the model runs in training, outside the model (torchtitan's order):

0. dtypes: the weights in ``param_dtype`` (``train.param_dtype``); the model's input cast (``model.dtype``)
   is ``compute_dtype`` under FSDP2 (whose policy gathers the weights in it), else the weights' dtype (autocast,
   entered by the trainer, runs the math in ``compute_dtype``);
1. activation checkpointing: ``none`` | ``full`` (every block) | ``every-N`` (every N-th block) -- the only place
   it is decided (``STDiT.forward`` recomputes the blocks marked here, in training mode with gradients on);
2. optional per-block ``torch.compile``;
3. FSDP2 ``fully_shard`` per block, then the root, with ``MixedPrecisionPolicy(param compute_dtype, reduce
   parallel.reduce_dtype)`` (only when the world size is > 1 and ``parallel.fsdp`` is on).
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


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, compute_dtype: str = "bfloat16") -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype_from_name(compute_dtype), reduce_dtype=dtype_from_name(cfg.reduce_dtype))
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed right away by backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < n - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)


def parallelize(model: nn.Module, cfg: ParallelConfig, world_size: int = 1, param_dtype: str = "float32",
                compute_dtype: str = "float32") -> dict:
    """Apply dtypes -> AC -> compile -> FSDP2 in place; returns what was applied (for the run log).
    ``param_dtype`` / ``compute_dtype``: ``train.param_dtype`` / ``train.compute_dtype`` (see the module docstring)."""
    fsdp = world_size > 1 and cfg.fsdp
    if fsdp and not torch.distributed.is_initialized():
        raise RuntimeError("FSDP needs an initialised process group: launch with torchrun")
    params = dtype_from_name(param_dtype)
    if any(p.dtype != params for p in model.parameters()):
        model.to(params)
    model.dtype = dtype_from_name(compute_dtype) if fsdp else params
    done: dict = {"dtype": {"params": param_dtype, "compute": compute_dtype,
                            "how": "fsdp" if fsdp else "autocast" if compute_dtype != param_dtype else "none"}}
    done["activation_checkpointing"] = apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
        done["compile"] = True
    if fsdp:
        apply_fsdp(model, cfg, compute_dtype)
        done["fsdp"] = {"compute_dtype": compute_dtype, "reduce_dtype": cfg.reduce_dtype,
                        "reshard_after_forward": cfg.reshard_after_forward}
    return done
