"""Checkpoint I/O for STDiT: Open-Sora v1.0 ``.pth``, PixArt-alpha ``.pth``, safetensors, and our own
pretrained directories (``model.safetensors`` + ``config.json``).

Pickled files are read with ``torch.load(weights_only=True)`` only. Loading is strict by default: keys that
do not fit raise :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped key. The
position-embedding buffers are never taken from a file; they are recomputed for the model's configured
size, so a checkpoint trained at one resolution loads into a model built for another.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .stdit import STDiT, dtype_from_name

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
POS_EMBED_KEYS = ("pos_embed", "pos_embed_temporal")
_WRAPPER_KEYS = ("ema", "model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


@dataclass
class LoadReport:
    source: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs model [..]"
    initialised: list[str] = field(default_factory=list)  # filled by a format conversion, not the file
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 40) -> str:
        lines = [f"{self.source} ({self.format}): {self.loaded} tensors loaded"]
        for title, keys in (
            ("missing from the checkpoint", self.missing),
            ("unexpected (not in the model)", self.unexpected),
            ("shape mismatch", self.mismatched),
            ("initialised by the conversion", self.initialised),
        ):
            if keys:
                shown = keys[:limit]
                more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
                lines.append(f"  {len(keys)} {title}:\n    " + "\n    ".join(shown) + more)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin`` (weights only), ``.safetensors`` or a pretrained dir.

    Wrappers are unwrapped: ``{"ema": sd}``, ``{"model": sd}``, ``{"state_dict": sd}``, ``{"module": sd}``
    (in that order of preference; ``key`` picks one explicitly), and a ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefix shared by every key is removed.
    """
    path = Path(path)
    if path.is_dir():
        if (path / ".metadata").exists() and (path / "meta.json").exists():
            raise ValueError(
                f"{path} is a resumable DCP training checkpoint, not a weights file: convert it first with "
                f"`modelgrow export --ckpt {path} --out DIR` and load DIR (or resume the run it belongs to)"
            )
        if not (path / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{path} is a directory without {WEIGHTS_NAME}: not a modelgrow pretrained directory")
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the file was not written completely; re-create or re-download it")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: name the file
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                             "truncated or damaged, re-create or re-download it") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (EOFError, RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); the file is "
                             "truncated or damaged, re-create or re-download it") from None
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} holds pickled objects other than tensors and plain containers; modelgrow reads "
                "checkpoints with torch.load(weights_only=True) only and will not execute arbitrary pickle "
                "code. Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or safetensors."
                f"\n  ({str(e).splitlines()[0]})"
            ) from None
    sd = _unwrap(obj, key, path)
    return _strip_prefixes(sd)


def _unwrap(obj: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    if key is not None:
        if key not in obj:
            raise KeyError(f"{path} has no entry {key!r}; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            raise ValueError(
                f"{path} is neither a state dict nor a {{'ema'|'model'|'state_dict'|'module': state_dict}} "
                f"wrapper; top-level keys: {sorted(map(str, obj))[:20]}"
            )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: the state dict holds no tensors")
    return tensors


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------------


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """'pixart' for a PixArt-alpha image checkpoint (2-D patch embedding, no temporal attention), else
    'opensora' (Open-Sora v1.0 and modelgrow share the layout)."""
    w = sd.get("x_embedder.proj.weight")
    has_temporal = any(".attn_temp." in k for k in sd)
    if (w is not None and w.ndim == 4) or (not has_temporal and any(k.startswith("blocks.") for k in sd)):
        return "pixart"
    return "opensora"


def convert_pixart(sd: Mapping[str, torch.Tensor], model: STDiT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PixArt-alpha -> STDiT: the 2-D patch-embedding kernel gains a temporal axis of size 1 (``unsqueeze(2)``
    as Open-Sora v1.0's ``reparameter``), and every block's temporal attention is filled from the model (qkv
    as initialised, proj zero, as v1.0's non-strict load leaves them), so the converted STDiT computes
    PixArt's blocks on each frame, with the model's own spatial position table (v1.0 too drops the file's
    ``pos_embed``). Returns (state dict, keys filled by the conversion)."""
    out = dict(sd)
    w = out.get("x_embedder.proj.weight")
    if w is not None and w.ndim == 4:
        if model.patch_size[0] != 1:
            raise CheckpointMismatchError(
                f"a PixArt checkpoint has a 2-D patch embedding; it needs patch_size (1, p, p), not {model.patch_size}"
            )
        out["x_embedder.proj.weight"] = w.unsqueeze(2)  # [C, C_in, ph, pw] -> [C, C_in, 1, ph, pw]
    filled = []
    own = model.state_dict()
    for i in range(len(model.blocks)):
        for name in ("attn_temp.qkv.weight", "attn_temp.qkv.bias", "attn_temp.proj.weight", "attn_temp.proj.bias"):
            k = f"blocks.{i}.{name}"
            if k in out:
                continue
            if f"blocks.{i}.scale_shift_table" not in out:
                continue  # the block is missing altogether: leave it to the key check
            ref = own[k]
            if ".proj." in k or (ref.is_meta and k.endswith(".bias")):
                out[k] = torch.zeros(ref.shape, dtype=ref.dtype)
            elif ref.is_meta:  # model built on the meta device: initialise as STDiT.initialize_weights does
                out[k] = torch.nn.init.xavier_uniform_(torch.empty(ref.shape, dtype=ref.dtype))
            else:
                out[k] = ref.detach().to("cpu", copy=True)
            filled.append(k)
    return out, filled


# --------------------------------------------------------------------------------------------------------
# loading into a model
# --------------------------------------------------------------------------------------------------------


def load_checkpoint(
    model: STDiT,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    format: str = "auto",
    key: str | None = None,
) -> LoadReport:
    """Load weights from a file, pretrained dir or state dict into ``model`` (in place).

    format: 'auto' | 'opensora' | 'pixart' | 'modelgrow' ('modelgrow' and 'opensora' are the same layout).
    strict: any missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` (nothing is
    loaded then); with ``strict=False`` the fitting tensors are loaded and the rest reported.
    Position embeddings are recomputed for the model's size; the file's are ignored.
    """
    if isinstance(source, Mapping):
        sd, name = _strip_prefixes(dict(source)), "<state dict>"
    else:
        sd, name = read_checkpoint(source, key=key), str(source)
    if format == "auto":
        format = detect_format(sd)
    if format not in ("opensora", "modelgrow", "pixart"):
        raise ValueError(f"unknown checkpoint format {format!r}; use auto, opensora, pixart or modelgrow")
    initialised: list[str] = []
    if format == "pixart":
        sd, initialised = convert_pixart(sd, model)

    own = model.state_dict()
    report = LoadReport(source=name, format=format, initialised=initialised)
    report.missing = [k for k in own if k not in sd and k not in POS_EMBED_KEYS]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
        for k in sd
        if k in own and k not in POS_EMBED_KEYS and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    bad_dtype = [f"{k}: checkpoint {sd[k].dtype} vs model {own[k].dtype}" for k in sd
                 if k in own and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if bad_dtype:
        shown = "\n    ".join(bad_dtype[:20]) + (f"\n    ... and {len(bad_dtype) - 20} more" if len(bad_dtype) > 20 else "")
        raise CheckpointMismatchError(
            f"{name}: {len(bad_dtype)} tensors are integer (quantised?) where the model has floating-point "
            f"parameters; modelgrow does not dequantise: convert the checkpoint to float first\n    {shown}"
        )
    if strict and not report.ok:
        raise CheckpointMismatchError(
            "checkpoint does not fit the model (pass strict=False to load what fits):\n" + report.describe()
        )
    bad = {m.split(":")[0] for m in report.mismatched}
    to_load = {k: v for k, v in sd.items() if k in own and k not in POS_EMBED_KEYS and k not in bad}
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and (report.missing or bad):
        raise CheckpointMismatchError(
            "the model is on the meta device and the checkpoint does not cover all of it; build the model on "
            "a real device to load a partial checkpoint:\n" + report.describe()
        )
    model.load_state_dict(to_load, strict=False, assign=on_meta)
    model.reset_pos_embed()
    report.loaded = len(to_load)
    return report


# --------------------------------------------------------------------------------------------------------
# pretrained directories
# --------------------------------------------------------------------------------------------------------


def save_pretrained(model: STDiT, out_dir: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir``. Each file is written to a temporary
    name and renamed into place, so an interrupted save leaves the previous files intact."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "modelgrow_format": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "config": model.config,
        **(dict(extra) if extra else {}),
    }
    fresh = not any(out.iterdir())
    # a sibling staging directory, swapped in as a whole: an interrupted save never pairs new weights with
    # an old config.json (other files of an existing directory are carried over, hard-linked)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-", dir=out.parent))
    stage.chmod(out.stat().st_mode & 0o7777)  # mkdtemp makes it 0700; keep the directory's own mode
    try:
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt", "modelgrow_format": str(FORMAT_VERSION)})
        (stage / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in (stage / WEIGHTS_NAME, stage / CONFIG_NAME):
            f.chmod(_file_mode())
        if not fresh:
            _carry_over(out, stage, skip={WEIGHTS_NAME, CONFIG_NAME})
        _swap_dirs(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # after the swap: the old directory
    return out


def _file_mode() -> int:
    """0666 minus the umask (0644 with the usual 022): what any other file the process creates gets (safetensors
    writes 0600, which other users of a shared cluster cannot read)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _carry_over(src: Path, dst: Path, skip: set[str]) -> None:
    for entry in src.iterdir():
        if entry.name in skip or entry.name.endswith(".tmp"):
            continue
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _swap_dirs(new: Path, target: Path) -> None:
    """Atomically exchange ``new`` and ``target`` (Linux renameat2 RENAME_EXCHANGE); where that is not
    available, two renames with the old directory kept until the new one is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(target), RENAME_EXCHANGE) == 0:
            return
    except (OSError, AttributeError):
        pass
    old = new.with_name(new.name + "-old")
    os.replace(target, old)
    os.replace(new, target)
    os.replace(old, new)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a modelgrow pretrained directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore the file (save_pretrained / modelgrow export write it)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("modelgrow_format") != FORMAT_VERSION or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: unsupported format {meta.get('modelgrow_format')!r} (expected {FORMAT_VERSION} "
                         "with a 'config' object)")
    return meta


def from_pretrained(
    model_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = True,
) -> STDiT:
    """Rebuild the model described by ``config.json`` and load ``model.safetensors`` into it (the model is
    constructed on the meta device, so no memory is spent on an initialisation that is overwritten)."""
    meta = read_config(model_dir)
    if meta.get("architecture", "STDiT") != "STDiT":
        raise ValueError(f"{model_dir}: architecture {meta['architecture']!r} is not an STDiT")
    cfg = meta["config"]
    known = set(STDiT.config_fields())  # the constructor's arguments (STDiT.config_of builds a config from them)
    misplaced = sorted(set(meta) & known)
    if misplaced:  # a hand edit that would otherwise be ignored silently
        raise ValueError(f"{Path(model_dir) / CONFIG_NAME}: model setting(s) {misplaced} at the top level, where they "
                         "have no effect; move them into the 'config' object")
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{Path(model_dir) / CONFIG_NAME}: unknown config field(s) {unknown}; valid fields: {sorted(known)}")
    try:
        with torch.device("meta"):
            model = STDiT(**cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{Path(model_dir) / CONFIG_NAME}: the config does not describe a valid STDiT "
                         f"({type(e).__name__}: {e})") from None
    load_checkpoint(model, model_dir, strict=strict, format="modelgrow")
    if dtype is not None:
        model.to(dtype_from_name(dtype))
    if device is not None:
        model.to(device)
    return model.eval()
