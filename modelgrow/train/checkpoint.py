"""Resumable training checkpoints with torch.distributed.checkpoint (DCP).

``<output_dir>/checkpoints/step_00001000/`` holds the model, optimizer and EMA state (DCP, sharded the way
the run is sharded), ``extra-rank<r>.pt`` per rank (step, scheduler, data position, RNG states: plain
tensors and numbers, read back with ``weights_only=True``) and ``meta.json`` (the model config and the
training mode, enough to rebuild the model for export). A checkpoint is written into ``step_N.tmp`` and
renamed when every rank has finished, so an interrupted write leaves the previous checkpoint as the newest
complete one; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(root: str | Path, step: int, model, optimizer, ema, extra: dict[str, Any], meta: dict[str, Any],
                    keep_last: int = 3) -> Path:
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous attempt that died half-way
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # single-process runs save without a process group, on purpose
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}, checkpoint_id=str(tmp))
    _save_extra(extra, tmp / f"extra-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _save_extra(extra: dict[str, Any], path: Path) -> None:
    torch.save(extra, path)


def load_checkpoint(path: str | Path, model, optimizer, ema) -> dict[str, Any]:
    """Restore model, optimizer and EMA in place; returns this rank's extra state."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (meta.json missing)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    extra_file = path / f"extra-rank{_rank()}.pt"
    if not extra_file.exists():
        raise FileNotFoundError(f"{extra_file} missing: resume with the same number of ranks the checkpoint was written with")
    return torch.load(extra_file, weights_only=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def _dcp_load_single(state: dict, path: str | Path) -> None:
    with warnings.catch_warnings():  # a single process reading a (possibly sharded) checkpoint, on purpose
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))


def load_model_weights(path: str | Path, model, which: str = "ema") -> None:
    """Weights only (single process): the EMA (``which="ema"``) or raw model parameters of a checkpoint."""
    if which not in ("ema", "raw"):
        raise ValueError(f"which must be ema or raw, got {which!r}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if which == "raw":
        state = {"model": sd}
        _dcp_load_single(state, path)
        model.load_state_dict(state["model"])
        return
    ema = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {"ema": ema, "model": sd}
    _dcp_load_single(state, path)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in state["ema"].items():
            params[n].copy_(t.to(params[n].dtype))
