"""Function-preserving model growth (ModelGrow §3.1, appendix A) and the LLM-condition surgery (§3.2).

    grown = expand(model, "insert", ratio=1)              # 28 -> 56 blocks, same function
    grown = add_llm_condition(grown, llm_channels=4096)    # + gated LLM cross-attention, same function

**Block expansion.** ``insert`` with ratio k = x/y (lowest terms): the N original blocks form N/y groups of y
consecutive blocks; after each group x new blocks are inserted, each a copy of the group's last block (the
block right before it). ``prefix``: P = k*N new blocks before the stack, copies of the first block;
``suffix``: P copies of the last block after it. In every new block the last linear of each residual branch
(``attn.proj``, ``attn_temp.proj``, ``cross_attn.proj``, ``mlp.fc2`` and ``llm_cross_attn.proj``) is zeroed
(weight and bias), so each new block is an identity and the grown model computes its parent's function. One
exception: while the copied LLM gate is exactly 0 the LLM branch is already an identity, and its projection is
kept (a zero projection behind a zero gate would receive no gradient, and neither would the gate). The
temporal position embedding stays on the original block it entered (block 0 of an Open-Sora model).

**LLM condition.** Every block gains ``llm_cross_attn`` right after the T5 ``cross_attn``, scaled by
``tanh(llm_gate)`` with ``llm_gate = 0``; its weights are copied from the block's T5 cross-attention (for a
block added by expansion, from the original block it duplicates: its own T5 projection is zero)
(``copy_t5=False``: the paper's "w/o duplication" ablation, freshly initialised, projection included — a zero
projection behind a zero gate could never start learning). An ``llm_embedder`` maps the LLM hidden size to
the model width (copied from the T5 caption embedder when the sizes match), with a null-LLM buffer.

Provenance lives in ``model.config["growth"]`` (saved with the checkpoint): for each block of the grown
model, the index of the parent block it was copied from and whether it is new.
"""

from __future__ import annotations

import copy
from fractions import Fraction
from typing import Any

import torch
import torch.nn as nn

from .models.stdit import STDiT

STRATEGIES = ("insert", "prefix", "suffix")
MAX_RATIO = 16  # at most 16 new blocks per original block: a larger k is a typo (and would hang building them)
ZERO_INIT = ("attn.proj", "attn_temp.proj", "cross_attn.proj", "mlp.fc2", "llm_cross_attn.proj")


def _ratio(ratio: float | str | Fraction) -> Fraction:
    try:
        k = Fraction(str(ratio)) if not isinstance(ratio, Fraction) else ratio
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"expansion ratio must be a finite number k > 0 (e.g. 1, 0.5, 2/3), got {ratio!r}") from None
    if k > MAX_RATIO:
        raise ValueError(f"expansion ratio k = {ratio} is larger than the maximum {MAX_RATIO} (k new blocks per "
                         f"original block); use a smaller ratio")
    if k.denominator > 64:
        k = k.limit_denominator(64)
    if k <= 0:
        raise ValueError(f"expansion ratio must be > 0, got {ratio}")
    return k


def growth_plan(depth: int, strategy: str, ratio: float | str | Fraction | None = None, num_new: int | None = None) -> list[tuple[int, bool]]:
    """[(parent block index, is_new)] for each block of the grown model, in order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown expansion strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if (ratio is None) == (num_new is None):
        raise ValueError("give exactly one of ratio (k > 0) and num_new (P = k * N new blocks)")
    if num_new is not None and (not isinstance(num_new, int) or isinstance(num_new, bool) or not 0 < num_new <= MAX_RATIO * depth):
        raise ValueError(f"num_new (new blocks) must be an integer in [1, {MAX_RATIO * depth}] for a {depth}-block model, "
                         f"got {num_new!r}")
    k = _ratio(ratio) if ratio is not None else Fraction(num_new, depth)
    if k <= 0:
        raise ValueError(f"the number of new blocks must be > 0, got {num_new}")
    if strategy == "insert":
        x, y = k.numerator, k.denominator
        if depth % y:
            raise ValueError(
                f"insert stacking with k = {x}/{y} groups the {depth} original blocks by {y}: {depth} is not divisible "
                f"by {y}; choose a ratio whose denominator divides {depth}"
            )
        plan: list[tuple[int, bool]] = []
        for group in range(depth // y):
            last = group * y + y - 1
            plan += [(i, False) for i in range(group * y, last + 1)]
            plan += [(last, True)] * x
        return plan
    p = k * depth
    if p.denominator != 1:
        raise ValueError(f"{strategy} stacking needs an integer number of new blocks: k * N = {k} * {depth} = {float(p)}")
    p = int(p)
    if strategy == "prefix":
        return [(0, True)] * p + [(i, False) for i in range(depth)]
    return [(i, False) for i in range(depth)] + [(depth - 1, True)] * p


def _grown_state(parent: STDiT, plan: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
    sd = parent.state_dict()
    out = {k: v.detach().clone() for k, v in sd.items() if not k.startswith("blocks.")}
    for new_i, (src, is_new) in enumerate(plan):
        prefix = f"blocks.{src}."
        # A zero LLM gate already makes the LLM branch an identity; zeroing its projection as well would
        # leave both factors of tanh(gate) * proj(.) at zero with zero gradients, so it could never learn.
        gate = sd.get(f"{prefix}llm_gate")
        keep_llm_proj = gate is not None and not bool(gate.abs().sum())
        for k, v in sd.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                t = v.detach().clone()
                zero = is_new and any(name.startswith(z + ".") for z in ZERO_INIT)
                if zero and not (keep_llm_proj and name.startswith("llm_cross_attn.proj.")):
                    t.zero_()
                out[f"blocks.{new_i}.{name}"] = t
    return out


def _build(config: dict[str, Any], state: dict[str, torch.Tensor], like: STDiT) -> STDiT:
    with torch.device("meta"):
        model = STDiT(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.train(like.training)


def expand(model: STDiT, strategy: str, ratio: float | str | Fraction | None = None, num_new: int | None = None) -> STDiT:
    """A new STDiT with the blocks of ``model`` expanded by ``strategy`` (the parent is left untouched).
    ``ratio`` k > 0 or ``num_new`` P = k * N new blocks; see the module docstring."""
    depth = len(model.blocks)
    plan = growth_plan(depth, strategy, ratio, num_new)
    old_tpe = model.temporal_pos_block
    config = copy.deepcopy(model.config)
    config["depth"] = len(plan)
    config["temporal_pos_block"] = next(i for i, (src, new) in enumerate(plan) if src == old_tpe and not new)
    k = _ratio(ratio) if ratio is not None else Fraction(num_new, depth)
    config["growth"] = {
        "strategy": strategy,
        "ratio": f"{k.numerator}/{k.denominator}",
        "parent_depth": depth,
        "sources": [src for src, _ in plan],
        "new": [new for _, new in plan],
        "parent": model.config.get("growth"),
    }
    return _build(config, _grown_state(model, plan), model)


def _fresh_linear(like: nn.Linear) -> dict[str, torch.Tensor]:
    w = torch.empty(like.weight.shape, dtype=like.weight.dtype, device="cpu")
    nn.init.xavier_uniform_(w)
    return {"weight": w.to(like.weight.device), "bias": torch.zeros_like(like.bias)}


def add_llm_condition(
    model: STDiT,
    llm_channels: int,
    llm_max_length: int = 120,
    copy_t5: bool = True,
    per_head_gate: bool = False,
) -> STDiT:
    """A new STDiT with the gated LLM cross-attention in every block and an LLM embedder (same function)."""
    if hasattr(model, "llm_embedder"):
        raise ValueError("the model already has an LLM condition")
    if llm_channels <= 0 or llm_max_length <= 0:
        raise ValueError(f"llm_channels and llm_max_length must be > 0, got {llm_channels}, {llm_max_length}")
    config = copy.deepcopy(model.config)
    config.update(llm_channels=llm_channels, llm_max_length=llm_max_length, llm_gate="per_head" if per_head_gate else "scalar")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = next(iter(model.parameters()))
    for i, block in enumerate(model.blocks):
        for lin in ("q_linear", "kv_linear", "proj"):
            src = getattr(_t5_source(model, i).cross_attn, lin)
            vals = {"weight": src.weight.detach().clone(), "bias": src.bias.detach().clone()} if copy_t5 else _fresh_linear(src)
            for name, v in vals.items():
                state[f"blocks.{i}.llm_cross_attn.{lin}.{name}"] = v
        state[f"blocks.{i}.llm_gate"] = torch.zeros(model.num_heads if per_head_gate else 1, dtype=ref.dtype, device=ref.device)
    y_proj = model.y_embedder.y_proj
    same = y_proj.fc1.in_features == llm_channels
    for lin in ("fc1", "fc2"):
        src = getattr(y_proj, lin)
        if same:
            w, b = src.weight.detach().clone(), src.bias.detach().clone()
        else:  # fresh, as Open-Sora initialises the caption embedder
            in_f = llm_channels if lin == "fc1" else src.in_features
            w = torch.randn(src.out_features, in_f, dtype=src.weight.dtype, device=src.weight.device) * 0.02
            b = torch.zeros_like(src.bias)
        state[f"llm_embedder.y_proj.{lin}.weight"], state[f"llm_embedder.y_proj.{lin}.bias"] = w, b
    null = torch.randn(llm_max_length, llm_channels, dtype=ref.dtype) / llm_channels**0.5
    state["llm_embedder.y_embedding"] = null.to(ref.device)
    return _build(config, state, model)


def _t5_source(model: STDiT, i: int) -> nn.Module:
    """The block whose T5 cross-attention block i's LLM cross-attention copies: block i itself, except for a
    block added by expansion (its T5 projection is zeroed), which copies the original block it duplicates, so
    that the LLM projection is not zero behind a zero gate (no gradient could ever reach either)."""
    growth = model.config.get("growth")
    if not growth or not growth["new"][i]:
        j = i
    else:
        src = growth["sources"][i]
        j = next(j for j, (s, n) in enumerate(zip(growth["sources"], growth["new"])) if s == src and not n)
    w = model.blocks[j].cross_attn.proj.weight
    if growth and not w.is_meta and not bool(w.detach().abs().sum()):
        # block j is itself a copy from an earlier expansion (zero T5 projection): follow the whole growth
        # history to a block whose projection came from the original model
        j = _original_block(growth, i)
    return model.blocks[j]


def _original_block(growth: dict | None, i: int) -> int:
    """Index (in the model ``growth`` describes) of a block never added by any expansion that block ``i``
    descends from."""
    if growth is None:
        return i
    sources, new = growth["sources"], growth["new"]
    q = _original_block(growth.get("parent"), sources[i])
    return next(j for j, (s, n) in enumerate(zip(sources, new)) if s == q and not n)


def freeze_original_blocks(model: STDiT) -> list[str]:
    """LLaMA-Pro style: train only the new blocks and the LLM-condition parameters; returns the trainable names."""
    growth = model.config.get("growth")
    if not growth:
        raise ValueError("the model has not been grown: there are no new blocks to train (grow it with expand first)")
    new = growth["new"]
    trainable = []
    for name, p in model.named_parameters():
        is_new_block = name.startswith("blocks.") and new[int(name.split(".")[1])]
        p.requires_grad = is_new_block or "llm_" in name
        if p.requires_grad:
            trainable.append(name)
    return trainable


def new_block_indices(model: STDiT) -> list[int]:
    """Indices of the blocks added by the last expansion (empty for a model that was never grown)."""
    growth = model.config.get("growth")
    return [i for i, n in enumerate(growth["new"]) if n] if growth else []
