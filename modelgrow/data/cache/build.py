"""Pre-encoded latent / text cache: ``modelgrow cache --manifest M --out DIR --vae V --t5 T [--llm L]``.

Layout of ``DIR``
    ``shard_NNNNN.safetensors``: manifest rows ``[N * shard_size, (N + 1) * shard_size)`` that decoded, as
    ``latent [n, C, T, h, w]``, ``y [n, L, C_t5]``, ``mask [n, L]`` (int8), optionally ``y_llm [n, L', C_llm]``,
    ``llm_mask [n, L']``, and ``index [n]`` (int64 manifest rows).
    ``shard_NNNNN.json``: that shard's rows, failed rows and captions/prompts; written last, it marks the shard
    finished. ``cache.json``: the settings and encoder identities, written first. ``index.json``: written at
    the end: settings, encoder identities, per-sample tensor shapes and dtypes, shards, failed files and the
    entries (``[manifest index, shard, row]``). Every file is written to a temporary name and renamed.

Clip policy (decision)
    One fixed clip per sample, no augmentation: the centre temporal window (``clips.sample_frame_indices``
    with ``u=None``), the same resize + centre crop as training, no flip; the VAE latent is the posterior
    *mode* (mean), not a sample, so the cache is deterministic and a re-run gives the same bytes. Storing
    several augmentations would multiply the cache size for a small gain at this clip length; the trade-off
    (no temporal jitter, no flip, no posterior noise when training from the cache) is documented here and in
    ``index.json`` (``settings.clip``).

Resume
    Finished shards (both files present and consistent) are skipped; a ``cache.json`` with other settings or
    other encoders is an error (``CacheMismatchError``), never silently mixed.

Loading
    Joint image + video training: built with ``single_frame_images`` (``--single-frame-images``), an image row
    is a one-frame latent in the shard tensor ``latent_image`` (videos stay in ``latent``); ``index.json``
    marks them in ``is_image`` and ``loader.JointLoader`` batches the two shapes apart.
    ``CachedDataset(DIR)`` + ``CachedLoader`` yield ``{"latent": [B, C, T, h, w] float32, "y": [B, 1, L, C]
    float32, "mask": [B, L] int64, ["y_llm": [B, 1, L', C'], "llm_mask": [B, L']], "caption", "prompt",
    "index": LongTensor [B] (manifest rows)}`` with the sharding, shuffling and resume of the video loader.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_output
from ..models.stdit import dtype_from_name
from .loader import FailureCounter, ShardedLoader, VideoDataset, _identity
from .manifest import load_manifest

__all__ = ["build_cache", "CachedDataset", "CachedLoader", "CacheMismatchError", "encoder_identity", "main"]

log = logging.getLogger("modelgrow.data")
CACHE_VERSION = 1
_DTYPES = ("float32", "float16", "bfloat16")  # storage dtypes of cached latents / text states


class CacheMismatchError(ValueError):
    """A cache built with other settings or encoders than the ones asked for."""


# ----------------------------------------------------------------------------------------------------------
# identities
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


def _tokenizer_fingerprint(tok: Any) -> str | None:
    if tok is None or not hasattr(tok, "get_vocab"):
        return None
    return _sha({"vocab": sorted(tok.get_vocab().items()), "special": getattr(tok, "all_special_tokens", None),
                 "class": type(tok).__name__})


def _comparable(ident: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if ident is None else {k: v for k, v in ident.items() if k != "path"}


def _identity_diff(have: dict[str, Any] | None, want: dict[str, Any] | None) -> list[str]:
    """Fields in which two encoder identities differ (a field only one side records, e.g. the tokenizer
    fingerprint of a cache built by an older version, is not compared)."""
    if have is None or want is None:
        return [] if have is want else ["present" if want is not None else "absent"]
    return [k for k in sorted(set(have) & set(want)) if k != "path" and have[k] != want[k]]


# ----------------------------------------------------------------------------------------------------------
# small file helpers
# ----------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheMismatchError(f"{path}: damaged cache file, not valid JSON ({e}); rebuild the cache with "
                                 "`modelgrow cache` (finished shards are reused)") from None


def _manifest_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------------


def _load_encoders(vae, t5, llm, device):
    from ..text import LLMEncoder, T5Encoder
    from ..vae import VideoVAE

    if isinstance(vae, (str, os.PathLike)):
        vae = VideoVAE.from_pretrained(vae, device=device)
    if isinstance(t5, (str, os.PathLike)):
        t5 = T5Encoder(str(t5), device=device)
    if isinstance(llm, (str, os.PathLike)):
        llm = LLMEncoder(str(llm), device=device)
    return vae, t5, llm


@torch.no_grad()
def _encode_latents(vae, videos: torch.Tensor) -> torch.Tensor:
    keep = vae.sample_posterior
    vae.sample_posterior = False  # the posterior mode: deterministic
    try:
        dev = next(vae.module.parameters()).device
        return vae.encode(videos.to(dev, vae.dtype)).float().cpu()
    finally:
        vae.sample_posterior = keep


def build_cache(manifest: str | os.PathLike, out_dir: str | os.PathLike, vae, t5, llm=None, num_frames: int = 16,
                frame_interval: int = 3, image_size: tuple[int, int] = (256, 256), prompt_mode: str = "SL",
                batch_size: int = 8, shard_size: int = 256, seed: int = 0, decoder: str = "auto",
                num_workers: int = 0, latent_dtype: str = "float32", text_dtype: str = "float32",
                max_fail_fraction: float = 0.01, device: str | torch.device | None = None,
                overwrite: bool = False, single_frame_images: bool = False) -> Path:
    """Encode every manifest row once (see the module docstring) and return the path of ``index.json``.

    ``single_frame_images=True`` (joint image + video training) stores an image row as a one-frame latent
    ``[C, 1, h, w]`` (tensor ``latent_image`` of its shard) instead of a clip of repeated frames.

    ``vae``/``t5``/``llm``: a ``VideoVAE`` / ``T5Encoder`` / ``LLMEncoder`` or a local directory to load one
    from. ``overwrite=True`` discards a cache built with other settings instead of raising."""
    from safetensors.torch import save_file

    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    for name, dt in (("latent_dtype", latent_dtype), ("text_dtype", text_dtype)):
        if dt not in _DTYPES:
            raise ValueError(f"{name} must be one of {list(_DTYPES)}, got {dt!r}")
    if not 0.0 <= max_fail_fraction <= 1.0 or max_fail_fraction != max_fail_fraction:
        raise ValueError(f"max_fail_fraction must be in [0, 1], got {max_fail_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        man = load_manifest(manifest)
    except UnicodeDecodeError as e:
        raise ValueError(f"{manifest}: the manifest is not UTF-8 text ({e}); re-save it as UTF-8") from None
    vae, t5, llm = _load_encoders(vae, t5, llm, device)
    ds = VideoDataset(man, num_frames, frame_interval, image_size, hflip=False, decoder=decoder, seed=seed,
                      prompt_mode=prompt_mode, deterministic=True, single_frame_images=single_frame_images)
    settings = {"version": CACHE_VERSION, "num_frames": int(num_frames), "frame_interval": int(frame_interval),
                "image_size": [int(image_size[0]), int(image_size[1])], "prompt_mode": prompt_mode,
                "shard_size": int(shard_size), "latent_dtype": latent_dtype, "text_dtype": text_dtype,
                "clip": "centre window, centre crop, no flip, posterior mode",
                "manifest_sha256": _manifest_sha(man.path), "num_rows": len(man)}
    if single_frame_images:  # only then: caches built before this setting existed keep their identity
        settings["images"] = "single-frame"
    encoders = {"vae": encoder_identity("vae", vae), "t5": encoder_identity("t5", t5),
                "llm": encoder_identity("llm", llm) if llm is not None else None}
    head = {"settings": settings, "encoders": encoders}
    cache_json = out / "cache.json"
    if cache_json.exists():
        old = _read_json(cache_json)
        problems = _diff(old, head)
        if problems and not overwrite:
            raise CacheMismatchError(f"{out} holds a cache built with other settings/encoders ({'; '.join(problems)}); "
                                     "use another --out directory or overwrite=True")
        if problems:
            for f in list(out.glob("shard_*")) + [out / "index.json"]:
                f.unlink(missing_ok=True)
    _write_json(cache_json, head)
    (out / "index.json").unlink(missing_ok=True)

    counter = FailureCounter(max_fail_fraction)
    allowed = max_fail_fraction * len(man)  # the rule over the whole manifest, whatever its size

    def over_threshold() -> None:
        if counter.failed > allowed:
            counter.abort(f"{counter.failed} of the {len(man)} rows of {man.path} failed to decode (more than "
                          f"max_fail_fraction {max_fail_fraction:g} x {len(man)} rows = {allowed:g}); fix or drop "
                          "those rows, or raise --max-fail-fraction")

    n_shards = -(-len(man) // shard_size)
    shapes: dict[str, Any] = {}
    for s in range(n_shards):
        rows = list(range(s * shard_size, min(len(man), (s + 1) * shard_size)))
        st_path, js_path = out / f"shard_{s:05d}.safetensors", out / f"shard_{s:05d}.json"
        if st_path.exists() and js_path.exists():
            meta = _read_json(js_path)
            if meta.get("rows") == rows:
                log.info("cache: shard %d already done, skipped", s)
                for _ in meta["indices"]:
                    counter.ok()
                for path in meta["failed"]:
                    counter.tried += 1
                    counter.failed += 1
                    counter.failed_paths.append(path)
                over_threshold()
                continue
        samples, failed = [], []
        items = (ds[(0, 0, i)] for i in rows) if num_workers == 0 else iter(torch.utils.data.DataLoader(
            ds, sampler=[(0, 0, i) for i in rows], batch_size=None, num_workers=num_workers,
            collate_fn=_identity))
        for item in items:
            if "failed" in item:
                failed.append(item["failed"])
                counter.fail(f"{item['failed']} (manifest row {item.get('index')})", item["error"])
                over_threshold()
            else:
                counter.ok()
                samples.append(item)
        tensors: dict[str, list[torch.Tensor]] = {"latent": [], "latent_image": [], "y": [], "mask": []}
        if llm is not None:
            tensors |= {"y_llm": [], "llm_mask": []}
        # single-frame images go to "latent_image", in row order among the images (one shape per tensor)
        latent_keys = ["latent_image" if single_frame_images and c.get("is_image") else "latent" for c in samples]
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            prompts = [c["prompt"] for c in chunk]
            for key in ("latent", "latent_image"):
                group = [c["video"] for c, k in zip(chunk, latent_keys[b : b + batch_size], strict=True) if k == key]
                if group:
                    tensors[key].append(_encode_latents(vae, torch.stack(group)).to(dtype_from_name(latent_dtype)))
            y, mask = t5.encode(prompts)
            tensors["y"].append(y[:, 0].float().cpu().to(dtype_from_name(text_dtype)))
            tensors["mask"].append(mask.cpu().to(torch.int8))
            if llm is not None:
                yl, ml = llm.encode(prompts)
                tensors["y_llm"].append(yl[:, 0].float().cpu().to(dtype_from_name(text_dtype)))
                tensors["llm_mask"].append(ml.cpu().to(torch.int8))
        if samples:
            data = {k: torch.cat(v).contiguous() for k, v in tensors.items() if v}
            data["index"] = torch.tensor([c["index"] for c in samples], dtype=torch.long)
            with atomic_output(st_path) as tmp:
                save_file(data, str(tmp), metadata={"modelgrow_cache": str(CACHE_VERSION)})
        else:
            st_path.unlink(missing_ok=True)
        meta = {"rows": rows, "indices": [c["index"] for c in samples], "failed": failed,
                "captions": [c["caption"] for c in samples], "long_captions": [c["long_caption"] for c in samples],
                "prompts": [c["prompt"] for c in samples]}
        if "latent_image" in latent_keys:
            meta["latent_keys"] = latent_keys
        _write_json(js_path, meta)
        log.info("cache: shard %d/%d written (%d samples, %d failed)", s + 1, n_shards, len(samples), len(failed))

    # the index
    entries, shards, failed_all, images = [], [], [], []
    for s in range(n_shards):
        meta = _read_json(out / f"shard_{s:05d}.json")
        failed_all += meta["failed"]
        if not meta["indices"]:
            continue
        fname = f"shard_{s:05d}.safetensors"
        shards.append({"file": fname, "count": len(meta["indices"])})
        entries += [[idx, len(shards) - 1, r] for r, idx in enumerate(meta["indices"])]
        keys = meta.get("latent_keys") or ["latent"] * len(meta["indices"])
        images += [int(k == "latent_image") for k in keys]
        from safetensors import safe_open

        with safe_open(str(out / fname), framework="pt") as f:  # headers only: every tensor name and shape
            for k in f.keys():
                if k not in shapes:
                    sl = f.get_slice(k)
                    shapes[k] = {"shape": list(sl.get_shape()[1:]), "dtype": sl.get_dtype()}
    if not entries:
        raise RuntimeError(f"no sample of {man.path} could be encoded; failed files: {failed_all[:20]}")
    index = {**head, "manifest": str(man.path), "num_samples": len(entries), "tensors": shapes, "shards": shards,
             "failed": failed_all, "entries": entries}
    if any(images):
        index["is_image"] = images  # per entry: 1 = a single-frame image latent ("latent_image")
    _write_json(out / "index.json", index)
    return out / "index.json"


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    problems = []
    for k, v in new["settings"].items():
        if old.get("settings", {}).get(k) != v:
            problems.append(f"settings.{k}: cache has {old.get('settings', {}).get(k)!r}, asked {v!r}")
    for k, v in new["encoders"].items():
        if _identity_diff(old.get("encoders", {}).get(k), v):
            problems.append(f"encoder {k!r} differs (cache: {old.get('encoders', {}).get(k)}, asked: {v})")
    return problems


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------


class CachedDataset:
    """The samples of a finished cache. ``ds[(epoch, pos, k)]`` / ``ds[k]`` -> the k-th cached sample.

    ``expect``: encoder identities (``encoder_identity(...)``) or settings the cache must have, e.g.
    ``{"t5": encoder_identity("t5", t5)}``; a difference raises ``CacheMismatchError``."""

    def __init__(self, cache_dir: str | os.PathLike, expect: dict[str, Any] | None = None):
        self.dir = Path(cache_dir)
        idx_path = self.dir / "index.json"
        if not idx_path.exists():
            hint = " (cache.json exists: the build did not finish; run `modelgrow cache` again to resume)" \
                if (self.dir / "cache.json").exists() else ""
            raise FileNotFoundError(f"{self.dir}: no index.json, not a finished modelgrow cache{hint}")
        self.index = _read_json(idx_path)
        need = ("settings", "encoders", "entries", "shards", "tensors")
        if not isinstance(self.index, dict) or any(k not in self.index for k in need):
            raise CacheMismatchError(f"{idx_path}: damaged cache index (expected an object with {', '.join(need)}); "
                                     "rebuild the cache with `modelgrow cache` (finished shards are reused)")
        if self.index.get("settings", {}).get("version") != CACHE_VERSION:
            raise CacheMismatchError(f"{self.dir}: cache version {self.index.get('settings', {}).get('version')} "
                                     f"!= {CACHE_VERSION}; rebuild it")
        self.entries = self.index["entries"]
        self.shards = [self.dir / s["file"] for s in self.index["shards"]]
        self.tensors = self.index["tensors"]
        self.has_llm = "y_llm" in self.tensors
        self.images = self.index.get("is_image") or [0] * len(self.entries)
        self._latent_rows: dict[int, list[tuple[str, int]]] = {}
        self._meta: dict[int, dict] = {}
        self._open: dict[int, Any] = {}
        self._pid = None
        if expect:
            self.check(expect)

    def check(self, expect: dict[str, Any]) -> None:
        problems = []
        for k, v in expect.items():
            if k in ("vae", "t5", "llm"):
                have = self.index["encoders"].get(k)
                diff = _identity_diff(have, v)
                if diff:
                    problems.append(f"encoder {k!r} differs in {diff}: cache has {have}, expected {v}")
            elif self.index["settings"].get(k) != v:
                problems.append(f"{k}: cache has {self.index['settings'].get(k)!r}, expected {v!r}")
        if problems:
            raise CacheMismatchError(f"{self.dir} does not match: " + "; ".join(problems))

    def check_compatible(self, cfg) -> None:
        """Shapes against ``cfg.model``/``cfg.grow`` and encoder configs against ``cfg.data.t5``/``llm``/``vae``."""
        problems = []
        y = self.tensors["y"]["shape"]
        m = cfg.model.stdit_kwargs()  # sizes resolved: explicit settings, else the preset's
        if "latent" in self.tensors:
            lat = self.tensors["latent"]["shape"]
            if lat[0] != m["in_channels"] or tuple(lat[1:]) != tuple(m["input_size"]):
                problems.append(f"latents {lat} vs model in_channels {m['in_channels']}, input_size {tuple(m['input_size'])}")
        if "latent_image" in self.tensors:  # single-frame image latents: channels and spatial size must fit
            lat = self.tensors["latent_image"]["shape"]
            if lat[0] != m["in_channels"] or tuple(lat[2:]) != tuple(m["input_size"][1:]):
                problems.append(f"image latents {lat} vs model in_channels {m['in_channels']}, "
                                f"spatial input_size {tuple(m['input_size'][1:])}")
        if y[-1] != m["caption_channels"] or y[0] != m["model_max_length"]:
            problems.append(f"T5 states {y} vs model caption_channels {m['caption_channels']}, "
                            f"model_max_length {m['model_max_length']}")
        if getattr(cfg.grow, "llm", False):
            if not self.has_llm:
                problems.append("the model has an LLM condition but the cache has no LLM states (build it with --llm)")
            else:
                yl = self.tensors["y_llm"]["shape"]
                if yl[-1] != cfg.grow.llm_channels or yl[0] != cfg.grow.llm_max_length:
                    problems.append(f"LLM states {yl} vs grow.llm_channels {cfg.grow.llm_channels}, "
                                    f"llm_max_length {cfg.grow.llm_max_length}")
        for kind in ("t5", "llm", "vae"):
            path = getattr(cfg.data, kind, None)
            have = self.index["encoders"].get(kind)
            if path and have and (Path(path) / "config.json").exists():
                fp = _config_fingerprint_of_dir(kind, path)
                if fp is not None and fp != have["config"]:
                    problems.append(f"data.{kind} = {path} is not the {kind} the cache was built with")
                elif fp is not None:  # same config: the weights, tokenizer and scaling must match too
                    want = _identity_of_dir(kind, path, cfg)
                    diff = _identity_diff(have, want) if want is not None else []
                    if diff:
                        problems.append(f"data.{kind} = {path} differs from the {kind} the cache was built with "
                                        f"in {diff} (cache: {have.get('path')}: "
                                        + ", ".join(f"{k}={have.get(k)!r}" for k in diff) + "; configured: "
                                        + ", ".join(f"{k}={want.get(k)!r}" for k in diff) + ")")
        if problems:
            raise CacheMismatchError(f"cache {self.dir} does not fit the config: " + "; ".join(problems))

    def __len__(self) -> int:
        return len(self.entries)

    def is_image(self, k: int) -> bool:
        """Whether entry ``k`` is a single-frame image latent (a cache built with single_frame_images)."""
        return bool(self.images[k])

    def _latent_row(self, s: int, row: int) -> tuple[str, int]:
        """(tensor name, row in it) of a shard row's latent: images and videos are stored apart."""
        if s not in self._latent_rows:
            keys = self._shard_meta(s).get("latent_keys")
            if keys is None:
                self._latent_rows[s] = []
            else:
                seen: dict[str, int] = {}
                rows = []
                for k in keys:  # the r-th row of a kind is row r of that kind's tensor
                    rows.append((k, seen.get(k, 0)))
                    seen[k] = seen.get(k, 0) + 1
                self._latent_rows[s] = rows
        rows = self._latent_rows[s]
        return rows[row] if rows else ("latent", row)

    def _shard(self, s: int):
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            self._open[s] = safe_open(str(self.shards[s]), framework="pt")
        return self._open[s]

    def _shard_meta(self, s: int) -> dict:
        if s not in self._meta:
            self._meta[s] = _read_json(self.shards[s].with_suffix(".json"))
        return self._meta[s]

    def get(self, k: int) -> dict[str, Any]:
        index, s, row = self.entries[k]
        f = self._shard(s)
        meta = self._shard_meta(s)
        key, lrow = self._latent_row(s, row)
        out = {"latent": f.get_slice(key)[lrow : lrow + 1][0].float(),
               "y": f.get_slice("y")[row : row + 1].float(),  # [1, L, C]
               "mask": f.get_slice("mask")[row : row + 1][0].long()}
        if self.has_llm:
            out["y_llm"] = f.get_slice("y_llm")[row : row + 1].float()
            out["llm_mask"] = f.get_slice("llm_mask")[row : row + 1][0].long()
        out |= {"index": int(index), "caption": meta["captions"][row], "prompt": meta["prompts"][row]}
        return out

    def __getitem__(self, key) -> dict[str, Any]:
        epoch, pos, k = key if isinstance(key, tuple) else (0, 0, key)
        try:
            out = self.get(k)
        except Exception as e:  # noqa: BLE001 - a damaged shard
            return {"failed": str(self.shards[self.entries[k][1]]), "error": f"{type(e).__name__}: {e}",
                    "index": self.entries[k][0], "epoch": epoch, "pos": pos}
        out["epoch"], out["pos"] = epoch, pos
        return out


def _identity_of_dir(kind: str, path: str, cfg) -> dict[str, Any] | None:
    """The identity of the encoder ``cfg`` configures at ``path`` (loaded on the CPU once, at start-up)."""
    from ..text import LLMEncoder, T5Encoder
    from ..vae import VideoVAE

    if kind == "vae":
        return encoder_identity("vae", VideoVAE.from_pretrained(path, device="cpu"))
    if kind == "t5":
        return encoder_identity("t5", T5Encoder(path, max_length=cfg.model.stdit_kwargs()["model_max_length"], device="cpu"))
    d = cfg.data
    return encoder_identity("llm", LLMEncoder(path, max_length=cfg.grow.llm_max_length, layer=d.llm_layer,
                                              use_template=d.llm_use_template, device="cpu"))


def _config_fingerprint_of_dir(kind: str, path: str) -> str | None:
    try:
        if kind == "vae":
            from ..vae import autoencoder_class, quiet_diffusers

            cls = autoencoder_class(path)
            with quiet_diffusers():
                return config_fingerprint(cls.from_config(cls.load_config(path)).config)
        from transformers import AutoConfig

        return config_fingerprint(AutoConfig.from_pretrained(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - an unreadable dir is reported by the encoder that loads it
        return None


def collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.stack([s[k] for s in samples]) for k in ("latent", "y", "mask", "y_llm", "llm_mask") if k in samples[0]}
    out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    out["caption"] = [s["caption"] for s in samples]
    out["prompt"] = [s["prompt"] for s in samples]
    return out


class CachedLoader(ShardedLoader):
    """Endless batches from a ``CachedDataset`` (same order / sharding / resume rules as ``VideoLoader``;
    the sample index space is the cache's entries, ``batch["index"]`` the manifest rows)."""

    def collate(self, samples):
        return collate_cached(samples)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _size(s: str) -> tuple[int, int]:
    parts = [int(p) for p in s.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"image size must be H,W or S, got {s!r}")
    return parts[0], parts[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelgrow cache", description="pre-encode VAE latents and T5 (+ LLM) states")
    p.add_argument("--manifest", required=True, help="CSV/Parquet manifest (path, caption [, long_caption, ...])")
    p.add_argument("--out", required=True, help="cache directory (resumes a cache built with the same settings)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL dir")
    p.add_argument("--t5", required=True, help="local T5 encoder dir")
    p.add_argument("--llm", default=None, help="local causal-LM dir for the LLM condition")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--frame-interval", type=int, default=3)
    p.add_argument("--image-size", type=_size, default=(256, 256), help="H,W (or S for square)")
    p.add_argument("--prompt-mode", choices=("S", "L", "SL"), default="SL")
    p.add_argument("--t5-max-length", type=int, default=120)
    p.add_argument("--llm-max-length", type=int, default=120)
    p.add_argument("--llm-layer", type=int, default=-1)
    p.add_argument("--no-llm-template", action="store_true", help="the 'w/o template' ablation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder", choices=("auto", "dali", "dali-cpu", "pyav"), default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--latent-dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--text-dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--max-fail-fraction", type=float, default=0.01)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="discard a cache built with other settings")
    p.add_argument("--single-frame-images", action="store_true",
                   help="store image rows as one-frame latents (joint image + video training, data.image_batch_prob)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..text import LLMEncoder, T5Encoder
    from ..vae import VideoVAE

    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = VideoVAE.from_pretrained(a.vae, device=device)
    t5 = T5Encoder(a.t5, max_length=a.t5_max_length, device=device)
    llm = (LLMEncoder(a.llm, max_length=a.llm_max_length, layer=a.llm_layer, use_template=not a.no_llm_template,
                      device=device) if a.llm else None)
    path = build_cache(a.manifest, a.out, vae, t5, llm, num_frames=a.num_frames, frame_interval=a.frame_interval,
                       image_size=a.image_size, prompt_mode=a.prompt_mode, batch_size=a.batch_size,
                       shard_size=a.shard_size, seed=a.seed, decoder=a.decoder, num_workers=a.num_workers,
                       latent_dtype=a.latent_dtype, text_dtype=a.text_dtype, max_fail_fraction=a.max_fail_fraction,
                       device=device, overwrite=a.overwrite, single_frame_images=a.single_frame_images)
    idx = _read_json(path)
    print(f"cache: {idx['num_samples']} samples in {len(idx['shards'])} shards, {len(idx['failed'])} failed -> {path}")
    return 0
