"""Reading a finished latent / text cache: :class:`CachedDataset` (samples of the batch schema, latent kind) and
:class:`CachedLoader` (the shared loader base: order, sharding, resume, failure counting, over the cache's
entries; ``batch["index"]`` holds the manifest rows).

    ds = CachedDataset(DIR); ds.check_compatible(cfg)     # the model's sizes, the encoders, the [data] settings
    batch = next(iter(CachedLoader(ds, batch_size=8)))    # latent [B, C, T, h, w], y [B, 1, L, C], mask [B, L], ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..base import ShardedLoader
from .format import (
    CacheMismatchError,
    check_data_settings,
    config_fingerprint,
    fixed_settings,
    identity_diff,
    read_index,
    read_json,
)

__all__ = ["CachedDataset", "CachedLoader"]


class CachedDataset:
    """The samples of a finished cache. ``ds[(epoch, pos, k)]`` / ``ds[k]`` -> the k-th cached sample.

    ``expect``: encoder identities (``encoder_identity(...)``) or settings the cache must have, e.g.
    ``{"t5": encoder_identity("t5", t5)}``; a difference raises ``CacheMismatchError``."""

    def __init__(self, cache_dir: str | os.PathLike, expect: dict[str, Any] | None = None):
        self.dir = Path(cache_dir)
        self.index = read_index(self.dir)
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
                diff = identity_diff(have, v)
                if diff:
                    problems.append(f"encoder {k!r} differs in {diff}: cache has {have}, expected {v}")
            elif self.index["settings"].get(k) != v:
                problems.append(f"{k}: cache has {self.index['settings'].get(k)!r}, expected {v!r}")
        if problems:
            raise CacheMismatchError(f"{self.dir} does not match: " + "; ".join(problems))

    def check_compatible(self, cfg, key: str = "data.cache_dir") -> None:
        """The cache against a run's config: the ``[data]`` settings it was built with
        (:func:`~.format.check_data_settings`), its tensor shapes against ``cfg.model`` / ``cfg.grow``, and the
        encoders of ``cfg.data.t5`` / ``llm`` / ``vae`` when set. ``key``: the config key naming this cache."""
        problems = check_data_settings(self.index, cfg.data, self.dir, key)
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
                problems.append("the model has an LLM condition but the cache has no LLM states (build it with data.llm)")
            else:
                yl = self.tensors["y_llm"]["shape"]
                if yl[-1] != cfg.grow.llm_channels or yl[0] != cfg.grow.llm_max_length:
                    problems.append(f"LLM states {yl} vs grow.llm_channels {cfg.grow.llm_channels}, "
                                    f"llm_max_length {cfg.grow.llm_max_length}")
        data = cfg.data.resolved(self.fixed_settings())
        for kind in ("t5", "llm", "vae"):
            path = getattr(cfg.data, kind, None)
            have = self.index["encoders"].get(kind)
            if path and have and (Path(path) / "config.json").exists():
                fp = _config_fingerprint_of_dir(kind, path)
                if fp is not None and fp != have["config"]:
                    problems.append(f"data.{kind} = {path} is not the {kind} the cache was built with")
                elif fp is not None:  # same config: the weights, tokenizer and scaling must match too
                    want = _identity_of_dir(kind, cfg, data)
                    diff = identity_diff(have, want) if want is not None else []
                    if diff:
                        problems.append(f"data.{kind} = {path} differs from the {kind} the cache was built with "
                                        f"in {diff} (cache: {have.get('path')}: "
                                        + ", ".join(f"{k}={have.get(k)!r}" for k in diff) + "; configured: "
                                        + ", ".join(f"{k}={want.get(k)!r}" for k in diff) + ")")
        if problems:
            raise CacheMismatchError(f"cache {self.dir} does not fit the config: " + "; ".join(problems))

    def fixed_settings(self) -> dict[str, Any]:
        """The ``[data]`` settings this cache fixes (see :func:`~.format.fixed_settings`)."""
        return fixed_settings(self.index)

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
            self._meta[s] = read_json(self.shards[s].with_suffix(".json"))
        return self._meta[s]

    def get(self, k: int) -> dict[str, Any]:
        """Entry ``k`` as a latent sample of the batch schema (float32 states, int64 masks)."""
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


class CachedLoader(ShardedLoader):
    """Endless batches from a ``CachedDataset`` (the shared base's order / sharding / resume rules; the sample
    index space is the cache's entries, ``batch["index"]`` the manifest rows)."""


def _identity_of_dir(kind: str, cfg, data) -> dict[str, Any] | None:
    """The identity of the encoder ``cfg`` configures as ``data.<kind>`` (loaded on the CPU once, at start-up)."""
    from ..encode import load_encoder
    from .format import encoder_identity

    return encoder_identity(kind, load_encoder(kind, cfg, "cpu", data))


def _config_fingerprint_of_dir(kind: str, path: str) -> str | None:
    try:
        if kind == "vae":
            from ...vae import autoencoder_class, quiet_diffusers

            cls = autoencoder_class(path)
            with quiet_diffusers():
                return config_fingerprint(cls.from_config(cls.load_config(path)).config)
        from transformers import AutoConfig

        return config_fingerprint(AutoConfig.from_pretrained(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - an unreadable dir is reported by the encoder that loads it
        return None
