"""Resumable training checkpoints with torch.distributed.checkpoint (DCP).

``<output_dir>/checkpoints/step_00001000/`` holds the model, optimizer and EMA state (DCP, sharded the way
the run is sharded), ``extra-rank<r>.pt`` per rank (step, scheduler, data position, RNG states: plain
tensors and numbers, read back with ``weights_only=True``) and ``meta.json`` (the model config and the
training mode, enough to rebuild the model for export). A checkpoint is written into ``step_N.tmp`` and
renamed when every rank has finished, so an interrupted write leaves the previous checkpoint as the newest
complete one; only the last ``keep_last`` are kept.

Safety: DCP itself reads ``.metadata`` with plain ``pickle``; here every DCP read goes through
:class:`SafeFileSystemReader`, whose unpickler accepts only the checkpoint-metadata types (DCP's metadata
dataclasses, ``torch.Size``, dtypes, layouts, paths), so a crafted ``.metadata`` cannot run code. Storage
entries must name files inside the checkpoint directory, and a truncated or damaged file is an error naming
it (and the previous complete checkpoint). Before every write the parameters, optimizer state and EMA are
checked for NaN/inf (one fused norm per tensor list): a non-finite state never reaches a checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
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


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read (damaged, truncated, crafted) or must not be written."""


# --------------------------------------------------------------------------------------------------------
# safe reading of DCP checkpoints
# --------------------------------------------------------------------------------------------------------

_DCP_META_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_META_MODULE, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                     "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                     "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
    ("pathlib._local", "WindowsPath"), ("pathlib._local", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata``: only the checkpoint-metadata types; anything else (``os.system``,
    ``builtins.eval``, any other callable) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a checkpoint-metadata type")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in checkpoint metadata")


def safe_load_metadata(data: bytes, source: str | Path = "<metadata>") -> Any:
    """Unpickle DCP metadata with :class:`_MetadataUnpickler`; any refusal or damage is a CheckpointError."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{source}: refused to read checkpoint metadata ({e}); modelgrow reads DCP metadata with a restricted "
            "unpickler and never runs code from a checkpoint. Only load checkpoints written by modelgrow/DCP."
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated / garbage bytes
        raise CheckpointError(f"{source}: damaged checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{source}: not DCP checkpoint metadata (found {type(md).__name__})")
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` that reads ``.metadata`` through the restricted unpickler, checks that every
    storage entry names a file inside the checkpoint directory and is not truncated, and reports a damaged
    data file by name. (Data files themselves are read by DCP with ``torch.load(weights_only=True)``.)"""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read checkpoint metadata ({e})") from None
        md = safe_load_metadata(data, path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        check_storage_files(Path(self.path), metadata)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def read_data(self, plan: Any, planner: Any) -> Any:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        fut = None
        for rel, items in per_file.items():
            try:
                fut = super().read_data(dataclasses.replace(plan, items=items), planner)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged shard: name it
                raise CheckpointError(f"{Path(self.path) / rel}: damaged checkpoint data ({type(e).__name__}: {e})") from None
        if fut is None:
            fut = super().read_data(plan, planner)
        return fut


def check_storage_files(root: Path, metadata: Any) -> None:
    """Every storage entry names a file inside ``root`` that is at least as long as the entry needs."""
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise CheckpointError(f"{root / '.metadata'}: storage entry {rel!r} does not name a file in {root}")
        f = root / rel
        need = int(info.offset) + int(info.length)
        size = f.stat().st_size if f.exists() else -1
        if size < need:
            what = "is missing" if size < 0 else f"is truncated ({size} bytes, the metadata needs {need})"
            raise CheckpointError(f"{f} {what}: the checkpoint is damaged")


def _unwrap_dcp_error(e: BaseException) -> BaseException | None:
    """The first CheckpointError inside DCP's CheckpointException (which wraps per-rank failures)."""
    if isinstance(e, CheckpointError):
        return e
    failures = getattr(e, "failures", None) or {}
    for f in failures.values():
        inner = f[0] if isinstance(f, tuple) else f
        inner = getattr(inner, "exception", inner)
        if isinstance(inner, CheckpointError):
            return inner
    seen = e.__cause__ or e.__context__
    return _unwrap_dcp_error(seen) if seen is not None and seen is not e else None


def dcp_load(state: dict, path: str | Path) -> None:
    """``dcp.load`` through :class:`SafeFileSystemReader`; errors name the damaged file."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: no .metadata, not a (complete) DCP checkpoint")
    # checked up front (DCP would log a traceback per failed attempt and fall back to other files)
    check_storage_files(path, safe_load_metadata((path / ".metadata").read_bytes(), path / ".metadata"))
    with warnings.catch_warnings():  # single-process runs load without a process group, on purpose
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
        except CheckpointError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            inner = _unwrap_dcp_error(e)
            if inner is not None:
                raise CheckpointError(str(inner)) from None
            raise CheckpointError(f"{path}: cannot load the checkpoint ({type(e).__name__}: {str(e)[:500]})") from e


# --------------------------------------------------------------------------------------------------------
# finiteness before writing
# --------------------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN/inf (one fused ``_foreach_norm`` per device/dtype
    group; only the slow path that names them runs when something is wrong)."""
    items = [(n, _local(t).detach()) for n, t in named.items()
             if torch.is_tensor(t) and t.is_floating_point() and _local(t).numel() > 0]
    if not items:
        return []
    groups: dict[tuple, list] = {}
    for n, t in items:
        groups.setdefault((t.device, t.dtype), []).append((n, t))
    flags = []
    for group in groups.values():
        norms = torch._foreach_norm([t for _, t in group], float("inf"))
        flags.append((group, ~torch.isfinite(torch.stack([x.float() for x in norms]))))
    bad_any = torch.stack([f.any() for _, f in flags]).any()
    if dist.is_initialized():
        b = bad_any.to(torch.int32)
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
        bad_any = b.bool()
    if not bool(bad_any):
        return []
    return [n for group, f in flags for (n, _), bad in zip(group, f.tolist()) if bad] or ["<another rank's shard>"]


def _optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in enumerate(optimizer.state.values()):
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"optimizer.state.{i}.{k}"] = v
    return out


def check_state_finite(step: int, model, optimizer, ema) -> None:
    """Raise (naming the step and the tensors) when parameters, optimizer state or EMA hold NaN/inf."""
    named = {f"model.{n}": p for n, p in model.named_parameters()}
    if optimizer is not None:
        named |= _optimizer_tensors(optimizer)
    if ema is not None:
        named |= {f"ema.{n}": t for n, t in ema.state_dict().items()}
    bad = nonfinite_tensors(named)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise FloatingPointError(
            f"step {step}: {len(bad)} non-finite tensor(s) in the training state ({shown}); no checkpoint was "
            "written (the previous one is intact). Lower optim.lr, check the data, or train in fp32."
        )


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
    check_state_finite(step, model, optimizer, ema)
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
        raise FileNotFoundError(_incomplete(path))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
    dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    extra_file = path / f"extra-rank{_rank()}.pt"
    if not extra_file.exists():
        raise FileNotFoundError(f"{extra_file} missing: resume with the same number of ranks the checkpoint was written with")
    return load_extra(extra_file)


def load_extra(extra_file: str | Path) -> dict[str, Any]:
    """A rank's extra state (``torch.load(weights_only=True)``); damage or foreign objects name the file."""
    try:
        extra = torch.load(extra_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{extra_file}: refused, it holds objects other than tensors and plain containers "
                              f"(read with weights_only=True; {str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - truncated / garbage
        raise CheckpointError(f"{extra_file}: damaged ({type(e).__name__}: {e})") from None
    if not isinstance(extra, dict) or "step" not in extra:
        raise CheckpointError(f"{extra_file}: not a modelgrow extra-state file (no 'step')")
    return extra


def _incomplete(path: Path) -> str:
    """Why ``path`` is not a complete checkpoint, and what to use instead."""
    if path.name.endswith(".tmp"):
        done = list_checkpoints(path.parent)
        use = f"the newest complete one is {done[-1]}" if done else "there is no complete checkpoint beside it"
        return (f"{path} is an interrupted checkpoint write (the run stopped while saving it; it is deleted on the "
                f"next save): {use}")
    return f"{path} is not a complete modelgrow training checkpoint (meta.json missing)"


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "meta.json"
    if not f.exists():
        raise FileNotFoundError(_incomplete(Path(path)))
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: damaged ({e})") from None
    if not isinstance(meta, dict) or "model_config" not in meta or "step" not in meta:
        raise CheckpointError(f"{f}: not a modelgrow training-checkpoint meta.json (needs model_config and step)")
    return meta


def _dcp_load_single(state: dict, path: str | Path) -> None:
    dcp_load(state, path)


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
