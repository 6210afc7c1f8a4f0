"""The training loader of a run, above both data sources: the latent / text cache when ``data.cache_dir`` is set
(checked against the model, the encoders and the ``[data]`` settings of the config), else raw videos from
``data.manifest``; joint image + video batches when ``data.image_batch_prob`` is set. Order, sharding, resume and
the failure rule are the shared base's (:mod:`modelgrow.data.base`) for every source."""

from __future__ import annotations

import os

from ..config import RAW_VIDEO_WORKERS, DataConfig
from .base import JointLoader, ShardedLoader
from .cache.dataset import CachedDataset, CachedLoader
from .cache.format import fixed_settings, read_index
from .videos import VideoDataset, VideoLoader

__all__ = ["build_loader", "resolve_data"]


def resolve_data(cfg) -> DataConfig:
    """``cfg.data`` with every unset setting filled: from the cache when the run trains from one (what it was
    built with), else the raw-video defaults. (Settings that disagree with the cache are refused by
    :func:`build_loader`, not here.)"""
    d = cfg.data
    return d.resolved(fixed_settings(read_index(d.cache_dir)) if d.cache_dir else None)


def build_loader(cfg, rank: int = 0, world_size: int = 1, batch_size: int | None = None,
                 seed: int | None = None) -> ShardedLoader | JointLoader:
    """The training loader of a ``Config`` (see the module docstring)."""
    d = cfg.data
    batch_size = batch_size or cfg.train.batch_size
    seed = cfg.train.seed if seed is None else seed
    joint = d.image_batch_prob is not None  # joint image + video training: single-shape batches by bucket
    if d.cache_dir:
        ds = CachedDataset(d.cache_dir)
        ds.check_compatible(cfg)
        kw = dict(rank=rank, world_size=world_size, seed=seed, num_workers=d.num_workers or 0,
                  max_fail_fraction=d.max_fail_fraction)
        if joint:
            return JointLoader(ds, batch_size, d.image_batch_prob, **kw)
        return CachedLoader(ds, batch_size, **kw)
    if not d.manifest:
        raise ValueError("set data.manifest (raw videos) or data.cache_dir (pre-encoded latents, `modelgrow cache`)")
    r = d.resolved()
    ds = VideoDataset(r.manifest, r.num_frames, r.frame_interval, tuple(r.image_size), r.hflip, r.decoder, seed,
                      r.prompt_mode, device_id=int(os.environ.get("LOCAL_RANK", "0")), single_frame_images=joint)
    kw = dict(rank=rank, world_size=world_size, seed=seed,
              num_workers=RAW_VIDEO_WORKERS if d.num_workers is None else d.num_workers,
              max_fail_fraction=d.max_fail_fraction)
    if joint:
        return JointLoader(ds, batch_size, d.image_batch_prob, **kw)
    return VideoLoader(ds, batch_size, **kw)
