"""The latent / text cache *format*: its files, their reading and writing, the identities and fingerprints that
say what a cache was built with, and the check of a run's config against them. Nothing here runs an encoder
(building a cache: :mod:`.build`; reading its samples: :mod:`.dataset`).

Layout of a cache directory
    ``shard_NNNNN.safetensors``: manifest rows ``[N * shard_size, (N + 1) * shard_size)`` that decoded, as
    ``latent [n, C, T, h, w]`` (single-frame image rows of a cache built with single-frame images:
    ``latent_image [m, C, 1, h, w]``), ``y [n, L, C_t5]``, ``mask [n, L]`` (int8), optionally
    ``y_llm [n, L', C_llm]``, ``llm_mask [n, L']``, and ``index [n]`` (int64 manifest rows).
    ``shard_NNNNN.json``: that shard's rows, failed rows and captions/prompts (and ``latent_keys``, the tensor
    of each row's latent, when images are stored apart); written last, it marks the shard finished.
    ``cache.json``: the settings and encoder identities, written first. ``index.json``: written at the end:
    settings, encoder identities, their ``fingerprint``, per-sample tensor shapes and dtypes, shards, failed
    files, the entries (``[manifest index, shard, row]``) and ``is_image`` per entry. Every file is written to a
    temporary name and renamed (:func:`modelgrow.fileio.atomic_output`).

What a cache records (``settings``, ``encoders``)
    Every setting that shapes its content: ``num_frames``, ``frame_interval``, ``image_size``, ``prompt_mode``,
    ``decoder``, the clip policy (``clip``), storage dtypes, ``shard_size``, the manifest's SHA-256 and row
    count, ``images`` (single-frame image latents), and per encoder its class, config and weight fingerprints
    and output settings (T5: ``max_length``, ``clean``; LLM: ``max_length``, ``layer``, ``use_template``,
    ``system_prompt``; VAE: scaling, shift, posterior mode). ``fingerprint`` is the hash of both.

The run's check (:func:`check_data_settings`)
    Training from a cache fixes the ``[data]`` settings the cache was built with (:data:`CACHE_FIXED`): left
    unset they take the cache's values; set, they must equal them, else :class:`CacheMismatchError` names the
    key, the cache's value and the fix. ``data.hflip`` cannot apply to a cache at all (it holds one unflipped
    clip per sample): true is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ...fileio import atomic_output

__all__ = ["CACHE_VERSION", "STORAGE_DTYPES", "CACHE_FIXED", "CacheMismatchError", "encoder_identity",
           "config_fingerprint", "identity_diff", "head_diff", "fingerprint", "read_json", "write_json", "manifest_sha",
           "shard_paths", "write_shard", "write_index", "read_index", "fixed_settings", "check_data_settings"]

CACHE_VERSION = 1
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # storage dtypes of cached latents / text states
CLIP_POLICY = "centre window, centre crop, no flip, posterior mode"
# the [data] settings a cache fixes (data key -> where the cache records it)
CACHE_FIXED = ("manifest", "num_frames", "frame_interval", "image_size", "prompt_mode", "decoder", "llm_layer",
               "llm_use_template")
_ADDED_LATER = ("decoder",)  # settings older caches do not record: compared only when both sides have them


class CacheMismatchError(ValueError):
    """A cache built with other settings or encoders than the ones asked for."""


# ----------------------------------------------------------------------------------------------------------
# identities and fingerprints
# ----------------------------------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    drop = {"transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path"}
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in drop}


def config_fingerprint(cfg: Any) -> str:
    return _sha(_config_dict(cfg))


def _param_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:1024].float().cpu().numpy().tobytes())
        h.update(f"{float(flat.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _tokenizer_fingerprint(tok: Any) -> str | None:
    if tok is None or not hasattr(tok, "get_vocab"):
        return None
    return _sha({"vocab": sorted(tok.get_vocab().items()), "special": getattr(tok, "all_special_tokens", None),
                 "class": type(tok).__name__})


def encoder_identity(kind: str, enc: Any) -> dict[str, Any]:
    """What identifies an encoder in a cache: class, config and weight fingerprints, and the settings that
    change its output."""
    if kind == "vae":
        return {"class": type(enc.module).__name__, "config": config_fingerprint(enc.module.config),
                "weights": _param_fingerprint(enc.module), "scaling_factor": float(enc.scaling_factor),
                "shift_factor": float(getattr(enc, "shift_factor", 0.0)),
                "latent": "mode", "latent_channels": int(enc.out_channels)}
    ident = {"class": type(enc.model).__name__, "config": config_fingerprint(enc.model.config),
             "weights": _param_fingerprint(enc.model), "path": getattr(enc, "path", None),
             "max_length": int(enc.max_length), "hidden_size": int(enc.hidden_size),
             "tokenizer": _tokenizer_fingerprint(getattr(enc, "tokenizer", None))}
    if kind == "t5":
        ident["clean"] = bool(enc.clean)
    else:
        ident |= {"layer": int(enc.layer), "use_template": bool(enc.use_template),
                  "system_prompt": _sha(enc.system_prompt)}
    return ident


def identity_diff(have: dict[str, Any] | None, want: dict[str, Any] | None) -> list[str]:
    """Fields in which two encoder identities differ (a field only one side records, e.g. the tokenizer
    fingerprint of a cache built by an older version, is not compared)."""
    if have is None or want is None:
        return [] if have is want else ["present" if want is not None else "absent"]
    return [k for k in sorted(set(have) & set(want)) if k != "path" and have[k] != want[k]]


def head_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the head (settings + encoders) of an existing cache and the one asked for."""
    problems = []
    have = old.get("settings", {})
    for k, v in new["settings"].items():
        if k in _ADDED_LATER and k not in have:
            continue
        if have.get(k) != v:
            problems.append(f"settings.{k}: cache has {have.get(k)!r}, asked {v!r}")
    for k, v in new["encoders"].items():
        if identity_diff(old.get("encoders", {}).get(k), v):
            problems.append(f"encoder {k!r} differs (cache: {old.get('encoders', {}).get(k)}, asked: {v})")
    return problems


def fingerprint(head: dict[str, Any]) -> str:
    """The hash of a cache's settings and encoder identities (paths left out): equal fingerprints, equal caches."""
    enc = {k: None if v is None else {f: x for f, x in v.items() if f != "path"} for k, v in head["encoders"].items()}
    return _sha({"settings": head["settings"], "encoders": enc})


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheMismatchError(f"{path}: damaged cache file, not valid JSON ({e}); rebuild the cache with "
                                 "`modelgrow cache` (finished shards are reused)") from None


def manifest_sha(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def shard_paths(out: Path, s: int) -> tuple[Path, Path]:
    """(tensors, metadata) files of shard ``s``."""
    return out / f"shard_{s:05d}.safetensors", out / f"shard_{s:05d}.json"


def write_shard(out: Path, s: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Shard ``s``: its tensors (none: no row decoded, no tensor file), then its metadata, which marks it finished."""
    from safetensors.torch import save_file

    st_path, js_path = shard_paths(out, s)
    if tensors:
        with atomic_output(st_path) as tmp:
            save_file(tensors, str(tmp), metadata={"modelgrow_cache": str(CACHE_VERSION)})
    else:
        st_path.unlink(missing_ok=True)
    write_json(js_path, meta)


def write_index(out: Path, head: dict[str, Any], manifest: str | os.PathLike, n_shards: int) -> Path:
    """Assemble ``index.json`` from the finished shards (their metadata and the safetensors headers)."""
    from safetensors import safe_open

    entries, shards, failed_all, images = [], [], [], []
    shapes: dict[str, Any] = {}
    for s in range(n_shards):
        meta = read_json(shard_paths(out, s)[1])
        failed_all += meta["failed"]
        if not meta["indices"]:
            continue
        fname = shard_paths(out, s)[0].name
        shards.append({"file": fname, "count": len(meta["indices"])})
        entries += [[idx, len(shards) - 1, r] for r, idx in enumerate(meta["indices"])]
        keys = meta.get("latent_keys") or ["latent"] * len(meta["indices"])
        images += [int(k == "latent_image") for k in keys]
        with safe_open(str(out / fname), framework="pt") as f:  # headers only: every tensor name and shape
            for k in f.keys():
                if k not in shapes:
                    sl = f.get_slice(k)
                    shapes[k] = {"shape": list(sl.get_shape()[1:]), "dtype": sl.get_dtype()}
    if not entries:
        raise RuntimeError(f"no sample of {manifest} could be encoded; failed files: {failed_all[:20]}")
    index = {**head, "fingerprint": fingerprint(head), "manifest": str(manifest), "num_samples": len(entries),
             "tensors": shapes, "shards": shards, "failed": failed_all, "entries": entries}
    if any(images):
        index["is_image"] = images  # per entry: 1 = a single-frame image latent ("latent_image")
    write_json(out / "index.json", index)
    return out / "index.json"


def read_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a finished cache (checked: present, well formed, this version)."""
    d = Path(cache_dir)
    idx_path = d / "index.json"
    if not idx_path.exists():
        hint = " (cache.json exists: the build did not finish; run `modelgrow cache` again to resume)" \
            if (d / "cache.json").exists() else ""
        raise FileNotFoundError(f"{d}: no index.json, not a finished modelgrow cache{hint}")
    index = read_json(idx_path)
    need = ("settings", "encoders", "entries", "shards", "tensors")
    if not isinstance(index, dict) or any(k not in index for k in need):
        raise CacheMismatchError(f"{idx_path}: damaged cache index (expected an object with {', '.join(need)}); "
                                 "rebuild the cache with `modelgrow cache` (finished shards are reused)")
    if index.get("settings", {}).get("version") != CACHE_VERSION:
        raise CacheMismatchError(f"{d}: cache version {index.get('settings', {}).get('version')} "
                                 f"!= {CACHE_VERSION}; rebuild it")
    return index


# ----------------------------------------------------------------------------------------------------------
# the config check
# ----------------------------------------------------------------------------------------------------------


def fixed_settings(index: dict[str, Any]) -> dict[str, Any]:
    """The ``[data]`` settings a cache fixes (keys of :data:`CACHE_FIXED` it records) with their values."""
    s = index["settings"]
    out: dict[str, Any] = {"manifest": index.get("manifest"), "num_frames": s["num_frames"],
                           "frame_interval": s["frame_interval"], "image_size": tuple(s["image_size"]),
                           "prompt_mode": s["prompt_mode"]}
    if "decoder" in s:
        out["decoder"] = s["decoder"]
    llm = index["encoders"].get("llm")
    if llm:
        out |= {"llm_layer": llm.get("layer"), "llm_use_template": llm.get("use_template")}
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_data_settings(index: dict[str, Any], data, cache_dir: str | os.PathLike,
                        key: str = "data.cache_dir") -> list[str]:
    """The problems of training from the cache ``index`` (at ``cache_dir``, configured as ``key``) with the
    ``[data]`` section ``data``: settings set to something else than the cache was built with, and settings that
    cannot apply to a cache (see the module docstring). An empty list: they fit. The held-out cache
    (``key = "data.val_cache_dir"``) is checked for the clip and text settings only: it comes from another
    manifest, and the validation batches its clips by shape itself."""
    training = key != "data.val_cache_dir"
    fixed = fixed_settings(index)
    fix = f"leave it unset (the cache's value applies) or rebuild the cache with it (`modelgrow cache`, another {key})"
    problems = []
    for name in ("num_frames", "frame_interval", "image_size", "prompt_mode"):
        v = getattr(data, name)
        if v is not None and _norm(v) != _norm(fixed[name]):
            problems.append(f"data.{name} = {_norm(v)!r} but {key} {cache_dir} was built with {name} = "
                            f"{_norm(fixed[name])!r}: {fix}")
    if data.decoder is not None:
        if "decoder" not in fixed:
            problems.append(f"data.decoder = {data.decoder!r} cannot be checked: {key} {cache_dir} was built before "
                            "caches recorded their decoder (and training from a cache decodes nothing): leave "
                            "data.decoder unset")
        elif data.decoder != fixed["decoder"]:
            problems.append(f"data.decoder = {data.decoder!r} but {key} {cache_dir} was decoded with "
                            f"{fixed['decoder']!r}: {fix}")
    for name, enc_key in (("llm_layer", "layer"), ("llm_use_template", "use_template")):
        v = getattr(data, name)
        if v is None:
            continue
        if name not in fixed:
            problems.append(f"data.{name} = {v!r} does not apply: {key} {cache_dir} holds no LLM states (built "
                            "without data.llm); leave it unset or rebuild the cache with data.llm")
        elif v != fixed[name]:
            problems.append(f"data.{name} = {v!r} but the LLM states of {key} {cache_dir} were encoded with "
                            f"{enc_key} = {fixed[name]!r}: {fix}")
    if training and data.manifest is not None:
        want = index["settings"].get("manifest_sha256")
        if os.path.isfile(data.manifest):
            same = manifest_sha(data.manifest) == want
        else:
            same = str(data.manifest) == str(fixed["manifest"])
        if not same:
            problems.append(f"data.manifest = {data.manifest!r} is not the manifest {key} {cache_dir} was built from "
                            f"({fixed['manifest']}, sha256 {want}): leave data.manifest unset to train on the cache, "
                            f"or rebuild the cache from this manifest")
    if training and data.hflip:
        problems.append(f"data.hflip = true cannot apply to {key} {cache_dir}: a cache holds one unflipped clip per "
                        f"sample ({index['settings'].get('clip', CLIP_POLICY)}); set data.hflip = false, or train from "
                        "raw videos (data.manifest without data.cache_dir)")
    if training and "latent_image" in index["tensors"] and data.image_batch_prob is None:
        problems.append(f"{key} {cache_dir} stores images as single-frame latents (built with single-frame images): "
                        "set data.image_batch_prob (joint image + video training), or rebuild the cache without "
                        "cache.single_frame_images")
    return problems
