"""The raw-video dataset and its sharded, shuffled, resumable loader.

Batches: ``{"video": [B, 3, T, H, W] float32 in [-1, 1], "caption": list[str], "long_caption":
list[str | None], "prompt": list[str] (merge_prompt(caption, long_caption, prompt_mode)), "path": list[str],
"index": LongTensor [B] (manifest row of each sample)}``.

Order
    Epoch ``e`` visits the manifest in the permutation drawn from ``(seed, e)`` (``shuffle=False``: manifest
    order). The permutation is padded to a multiple of ``world_size`` with its own first entries
    (``DistributedSampler``'s rule, so every rank has the same number of samples per epoch) and rank ``r``
    takes entries ``r, r + world_size, ...``. The loader is endless: after its last sample of an epoch a rank
    continues with the next epoch. Batches are filled in order with the next samples that decode.

Resume
    ``state_dict() -> {"epoch", "position", "seed", "rank", "world_size", "tried", "failed",
    "failed_paths"}``: ``position`` is the number of entries of the rank's epoch list already consumed by the
    batches handed out (prefetched samples do not count). A new loader given that state continues exactly where
    the old one stopped: no sample is repeated or skipped, and the augmentations are the same, since each
    sample's random crop/flip comes from ``(seed, epoch, index)`` alone (``clips.clip_rng``).

Bad files (the failure rule)
    A sample whose file does not decode is skipped, logged (``logging`` logger ``modelgrow.data``, with its
    path and the error) and counted (``tried``, ``failed``, ``failed_paths``). The run stops with
    ``TooManyDecodeFailures`` naming the failed files as soon as ``tried >= min_tried`` and
    ``failed > max_fail_fraction * tried`` (``min_tried`` = 20 by default, so that one bad file among the
    first few samples does not abort a run whose failure rate is really low; a failure rate above the limit is
    still caught at the 20th sample). A rank epoch in which not a single sample decodes is an error too.

Joint image + video training (``data.image_batch_prob``)
    Unset: an image row becomes a clip of ``num_frames`` repeated frames. Set to p in [0, 1]: images are
    single-frame samples ``[3, 1, H, W]`` and ``JointLoader`` batches images and videos apart (buckets by
    shape, one shape per batch), a batch being an image batch with probability p; same order / resume /
    failure rules, per bucket (see ``JointLoader``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..text.prompts import merge_prompt
from .clips import draw_clip, to_model_space
from .decode import DecodeError, FrameDecoder
from .manifest import Manifest, load_manifest

__all__ = ["VideoDataset", "VideoLoader", "JointLoader", "TooManyDecodeFailures", "epoch_order", "bucket_order",
           "FailureCounter", "build_loader"]

log = logging.getLogger("modelgrow.data")


class TooManyDecodeFailures(RuntimeError):
    """More files failed to decode than ``max_fail_fraction`` allows."""


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> np.ndarray:
    """Indices rank ``rank`` visits in ``epoch`` (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xD474]).permutation(n) if shuffle else np.arange(n)
    pad = (-n) % world_size
    if pad:
        order = np.concatenate([order, order[:pad]])
    return order[rank::world_size]


class VideoDataset:
    """Manifest rows -> model-space clips. ``load(index, epoch)`` raises ``DecodeError`` for a bad file;
    ``dataset[(epoch, index)]`` returns the sample or a failure record (what the loader's workers call)."""

    def __init__(self, manifest: str | os.PathLike | Manifest, num_frames: int = 16, frame_interval: int = 3,
                 image_size: tuple[int, int] = (256, 256), hflip: bool = False, decoder: str = "auto",
                 seed: int = 0, prompt_mode: str = "SL", deterministic: bool = False, device_id: int = 0,
                 single_frame_images: bool = False):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.single_frame_images = bool(single_frame_images)  # images -> [3, 1, H, W] (joint training)
        self.num_frames, self.frame_interval = int(num_frames), int(frame_interval)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.hflip, self.seed, self.deterministic = bool(hflip), int(seed), bool(deterministic)
        merge_prompt("", "", prompt_mode)  # validates the mode
        self.prompt_mode = prompt_mode
        self.decoder = FrameDecoder(decoder, device_id=device_id)

    def __len__(self) -> int:
        return len(self.manifest)

    def is_image(self, k: int) -> bool:
        """Whether sample ``k`` is an image (a single-frame sample under ``single_frame_images``)."""
        return self.manifest[k].is_image

    def clip_spec(self, index: int, epoch: int, total: int | None):
        return draw_clip(total, self.num_frames, self.frame_interval, self.hflip, self.seed, epoch, index,
                         deterministic=self.deterministic)

    def load_frames(self, index: int, epoch: int = 0) -> tuple[np.ndarray, Any]:
        """The uint8 frames ``[T, H, W, 3]`` of sample ``index`` (``[1, H, W, 3]`` for an image) and its
        ``ClipSpec``."""
        rec = self.manifest[index]
        if rec.is_image:
            spec = self.clip_spec(index, epoch, None)
            return self.decoder.read(rec.path, None), spec
        from .decode import probe

        if not os.path.isfile(rec.path):
            raise DecodeError(f"{rec.path}: file does not exist")
        info = probe(rec.path)
        spec = self.clip_spec(index, epoch, info.num_frames)
        return self.decoder.read(rec.path, spec.indices, info), spec

    def load(self, index: int, epoch: int = 0) -> dict[str, Any]:
        rec = self.manifest[index]
        frames, spec = self.load_frames(index, epoch)
        try:
            video = to_model_space(frames, self.image_size, spec.flip,
                                   num_frames=self.num_frames if rec.is_image and not self.single_frame_images else None)
        except Exception as e:  # noqa: BLE001 - e.g. a 0-pixel frame
            raise DecodeError(f"{rec.path}: bad frames ({type(e).__name__}: {e})") from e
        return {"video": video, "caption": rec.caption, "long_caption": rec.long_caption,
                "prompt": merge_prompt(rec.caption, rec.long_caption, self.prompt_mode), "path": rec.path,
                "index": index, "is_image": rec.is_image}

    def __getitem__(self, key) -> dict[str, Any]:
        epoch, pos, index = key if isinstance(key, tuple) else (0, 0, key)
        try:
            out = self.load(index, epoch)
        except DecodeError as e:
            return {"failed": self.manifest[index].path, "error": str(e), "index": index, "epoch": epoch, "pos": pos}
        except Exception as e:  # noqa: BLE001 - anything else a broken file can raise
            return {"failed": self.manifest[index].path, "error": f"{type(e).__name__}: {e}", "index": index,
                    "epoch": epoch, "pos": pos}
        out["epoch"], out["pos"] = epoch, pos
        return out


def collate_videos(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"video": torch.stack([s["video"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "long_caption": [s["long_caption"] for s in samples],
            "prompt": [s["prompt"] for s in samples],
            "path": [s["path"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


class FailureCounter:
    """Counts tried/failed samples and applies the failure rule (see the module docstring)."""

    def __init__(self, max_fail_fraction: float = 0.01, min_tried: int = 20):
        if not 0.0 <= max_fail_fraction <= 1.0:
            raise ValueError(f"max_fail_fraction must be in [0, 1], got {max_fail_fraction}")
        self.max_fail_fraction, self.min_tried = float(max_fail_fraction), int(min_tried)
        self.tried = 0
        self.failed = 0
        self.failed_paths: list[str] = []

    def ok(self) -> None:
        self.tried += 1

    def fail(self, path: str, error: str) -> None:
        self.tried += 1
        self.failed += 1
        self.failed_paths.append(path)
        log.warning("skipping %s: %s (%d of %d samples failed so far)", path, error, self.failed, self.tried)
        if self.tried >= self.min_tried and self.failed > self.max_fail_fraction * self.tried:
            self.abort()

    def abort(self, reason: str | None = None):
        shown = sorted(set(self.failed_paths))
        names = ", ".join(shown[:20]) + (f" and {len(shown) - 20} more" if len(shown) > 20 else "")
        raise TooManyDecodeFailures(
            (reason or f"{self.failed} of {self.tried} samples failed to decode "
             f"({self.failed / max(self.tried, 1):.1%} > max_fail_fraction {self.max_fail_fraction:.1%})")
            + f"; failed files: {names}")

    def state_dict(self) -> dict[str, Any]:
        return {"tried": self.tried, "failed": self.failed, "failed_paths": list(self.failed_paths)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.tried, self.failed = int(sd.get("tried", 0)), int(sd.get("failed", 0))
        self.failed_paths = list(sd.get("failed_paths", []))


def _identity(x):
    return x


class _KeyStream:
    """The endless (epoch, position, index) stream of one rank, from a starting point."""

    def __init__(self, n, seed, rank, world_size, shuffle, epoch, position):
        self.args = (n, seed, rank, world_size, shuffle)
        self.epoch, self.position = epoch, position

    def __iter__(self):
        n, seed, rank, world, shuffle = self.args
        epoch, pos = self.epoch, self.position
        while True:
            order = epoch_order(n, seed, epoch, rank, world, shuffle)
            for p in range(pos, len(order)):
                yield (epoch, p, int(order[p]))
            epoch, pos = epoch + 1, 0


class ShardedLoader:
    """The ordering / sharding / resume / failure logic shared by the video and the cached loaders.
    Subclasses give ``dataset`` (``dataset[(epoch, pos, index)]`` -> sample or ``{"failed": ...}``),
    ``collate`` and ``_device_workers`` (workers allowed)."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, max_fail_fraction: float = 0.01, min_tried: int = 20,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size {rank}/{world_size}")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_workers, self.shuffle = int(num_workers), bool(shuffle)
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.failures = FailureCounter(max_fail_fraction, min_tried)
        self.epoch = 0
        self.position = 0

    # ------------------------------------------------------------------ state
    @property
    def samples_per_epoch(self) -> int:
        """Samples one rank visits per epoch (padded, see ``epoch_order``)."""
        return -(-len(self.dataset) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_samples": len(self.dataset), "shuffle": self.shuffle,
                **self.failures.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for key, mine in (("world_size", self.world_size), ("seed", self.seed), ("num_samples", len(self.dataset))):
            if key in sd and int(sd[key]) != mine:
                raise ValueError(f"the data position was saved with {key}={sd[key]}, this loader has {key}={mine}: "
                                 "resuming would repeat or skip samples")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self.failures.load_state_dict(sd)

    @property
    def tried(self) -> int:
        return self.failures.tried

    @property
    def failed(self) -> int:
        return self.failures.failed

    @property
    def failed_paths(self) -> list[str]:
        return self.failures.failed_paths

    # ------------------------------------------------------------------ iteration
    def _workers(self) -> int:
        return self.num_workers

    def _items(self, keys: _KeyStream) -> Iterator[dict[str, Any]]:
        workers = self._workers()
        if workers == 0:
            return (self.dataset[k] for k in keys)
        return iter(torch.utils.data.DataLoader(
            self.dataset, sampler=keys, batch_size=None, num_workers=workers, collate_fn=_identity,
            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory, persistent_workers=False))

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keys = _KeyStream(len(self.dataset), self.seed, self.rank, self.world_size, self.shuffle, self.epoch, self.position)
        per_epoch = self.samples_per_epoch
        batch: list[dict[str, Any]] = []
        good_in_epoch = 0
        for item in self._items(keys):
            epoch, pos = item["epoch"], item["pos"]
            if "failed" in item:
                self.failures.fail(item["failed"], item["error"])
            else:
                self.failures.ok()
                good_in_epoch += 1
                batch.append(item)
            self.epoch, self.position = (epoch + 1, 0) if pos + 1 == per_epoch else (epoch, pos + 1)
            if pos + 1 == per_epoch:
                if good_in_epoch == 0:
                    self.failures.abort(f"no sample of epoch {epoch} (rank {self.rank}) could be decoded")
                good_in_epoch = 0
            if len(batch) == self.batch_size:
                out = self.collate(batch)
                batch = []
                yield out


class VideoLoader(ShardedLoader):
    """Endless batches of raw clips (see the module docstring); ``num_workers`` decode processes."""

    def __init__(self, dataset: VideoDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int | None = None,
                 num_workers: int = 0, shuffle: bool = True, max_fail_fraction: float = 0.01, min_tried: int = 20,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        super().__init__(dataset, batch_size, rank, world_size, dataset.seed if seed is None else seed, num_workers,
                         shuffle, max_fail_fraction, min_tried, prefetch_factor, pin_memory)

    def _workers(self) -> int:
        if self.num_workers and self.dataset.decoder.kind == "dali":
            log.info("decoder 'dali' (GPU) decodes in the main process: num_workers %d -> 0", self.num_workers)
            return 0
        return self.num_workers

    def collate(self, samples):
        return collate_videos(samples)


BUCKETS = ("video", "image")


def bucket_order(members: np.ndarray, seed: int, epoch: int, bucket: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> np.ndarray:
    """The dataset indices of one bucket (``members``) that rank ``rank`` visits in the bucket's ``epoch``:
    ``epoch_order``'s rule (permutation, padding, rank stride) on the bucket's own list and stream."""
    n = len(members)
    perm = (np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(bucket), 0xB0C7]).permutation(n)
            if shuffle else np.arange(n))
    pad = (-n) % world_size
    if pad:
        perm = np.concatenate([perm, perm[:pad]])
    return np.asarray(members)[perm[rank::world_size]]


class JointLoader:
    """Endless single-shape batches from a dataset that mixes images and videos (joint image + video training).

    Buckets
        The samples are split by shape, ``(frames, height, width)``: ``"video"`` (``num_frames`` frames) and
        ``"image"`` (1 frame); every batch comes from one bucket, so it has one shape. ``dataset.is_image(k)``
        tells the bucket of sample ``k`` (a ``VideoDataset`` built with ``single_frame_images=True`` or a
        ``CachedDataset`` whose images are single-frame latents).
    Mix
        Batch ``b`` of the stream is an image batch when ``u_b < image_batch_prob``, ``u_b`` uniform from
        ``(seed, b)`` alone: every rank draws the same bucket for the same batch (ranks step with one shape),
        and the fraction of image batches converges to ``image_batch_prob``.
    Order and resume
        Each bucket is its own endless stream of epochs (``bucket_order``: the permutation of the bucket's
        members drawn from ``(seed, epoch, bucket)``, padded and strided by rank as ``epoch_order``); a batch
        takes the next samples of its bucket that decode. ``state_dict()`` holds the batch counter and each
        bucket's (epoch, position) (samples handed out, prefetched ones not counted) and the failure counts;
        a new loader given it continues with the same batches. Failures follow the ``FailureCounter`` rule over
        both buckets together.
    ``num_workers`` decode processes per bucket in use (an image-only or video-only run starts one set)."""

    def __init__(self, dataset, batch_size: int, image_batch_prob: float, collate, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 0, shuffle: bool = True,
                 max_fail_fraction: float = 0.01, min_tried: int = 20, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size {rank}/{world_size}")
        p = float(image_batch_prob)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"image_batch_prob must be in [0, 1], got {image_batch_prob}")
        flags = np.array([bool(dataset.is_image(k)) for k in range(len(dataset))], dtype=bool)
        self.members = {"video": np.flatnonzero(~flags), "image": np.flatnonzero(flags)}
        if p > 0 and not len(self.members["image"]):
            raise ValueError(f"image_batch_prob = {p} but the data has no single-frame images (manifest rows with an "
                             "image file; a cache built with --single-frame-images)")
        if p < 1 and not len(self.members["video"]):
            raise ValueError(f"image_batch_prob = {p} < 1 but the data has no videos; set image_batch_prob = 1 "
                             "for an image-only run")
        self.dataset, self.batch_size, self.image_batch_prob, self.collate = dataset, int(batch_size), p, collate
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_workers, self.shuffle = int(num_workers), bool(shuffle)
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.failures = FailureCounter(max_fail_fraction, min_tried)
        self.batches = 0  # batches handed out
        self.streams = {b: [0, 0] for b in BUCKETS}  # bucket -> [epoch, position]

    def bucket_of_batch(self, b: int) -> str:
        """The bucket of batch ``b`` of the stream (a function of (seed, b, image_batch_prob) only)."""
        u = np.random.default_rng([self.seed & 0xFFFFFFFF, int(b), 0x1A6E]).random()
        return "image" if u < self.image_batch_prob else "video"

    def samples_per_epoch(self, bucket: str) -> int:
        return -(-len(self.members[bucket]) // self.world_size)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"joint": True, "batches": self.batches, "streams": {b: list(v) for b, v in self.streams.items()},
                "image_batch_prob": self.image_batch_prob, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_samples": len(self.dataset), "shuffle": self.shuffle,
                **self.failures.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not sd.get("joint"):
            raise ValueError("the data position was saved by a loader without joint image + video batches "
                             "(data.image_batch_prob unset): resuming it here would repeat or skip samples")
        for key, mine in (("world_size", self.world_size), ("seed", self.seed), ("num_samples", len(self.dataset)),
                          ("image_batch_prob", self.image_batch_prob)):
            if key in sd and float(sd[key]) != float(mine):
                raise ValueError(f"the data position was saved with {key}={sd[key]}, this loader has {key}={mine}: "
                                 "resuming would repeat or skip samples")
        self.batches = int(sd["batches"])
        self.streams = {b: [int(v[0]), int(v[1])] for b, v in sd["streams"].items()}
        self.failures.load_state_dict(sd)

    # ------------------------------------------------------------------ iteration
    def _keys(self, bucket: str) -> Iterator[tuple[int, int, int]]:
        members, bid = self.members[bucket], BUCKETS.index(bucket)
        epoch, pos = self.streams[bucket]
        while True:
            order = bucket_order(members, self.seed, epoch, bid, self.rank, self.world_size, self.shuffle)
            for p in range(pos, len(order)):
                yield (epoch, p, int(order[p]))
            epoch, pos = epoch + 1, 0

    def _items(self, bucket: str) -> Iterator[dict[str, Any]]:
        keys = self._keys(bucket)
        workers = self.num_workers
        if workers and getattr(getattr(self.dataset, "decoder", None), "kind", None) == "dali":
            workers = 0  # DALI (GPU) decodes in the main process
        if workers == 0:
            return (self.dataset[k] for k in keys)
        return iter(torch.utils.data.DataLoader(
            self.dataset, sampler=keys, batch_size=None, num_workers=workers, collate_fn=_identity,
            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory, persistent_workers=False))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items: dict[str, Iterator[dict[str, Any]]] = {}
        good = {b: 0 for b in BUCKETS}
        while True:
            bucket = self.bucket_of_batch(self.batches)
            if bucket not in items:
                items[bucket] = self._items(bucket)
            per_epoch = self.samples_per_epoch(bucket)
            batch: list[dict[str, Any]] = []
            while len(batch) < self.batch_size:
                item = next(items[bucket])
                epoch, pos = item["epoch"], item["pos"]
                if "failed" in item:
                    self.failures.fail(item["failed"], item["error"])
                else:
                    self.failures.ok()
                    good[bucket] += 1
                    batch.append(item)
                self.streams[bucket] = [epoch + 1, 0] if pos + 1 == per_epoch else [epoch, pos + 1]
                if pos + 1 == per_epoch:
                    if good[bucket] == 0:
                        self.failures.abort(f"no {bucket} sample of epoch {epoch} (rank {self.rank}) could be decoded")
                    good[bucket] = 0
            self.batches += 1
            yield self.collate(batch)


def build_loader(cfg, rank: int = 0, world_size: int = 1, batch_size: int | None = None, seed: int | None = None):
    """The training loader of a ``Config``: the latent/text cache when ``data.cache_dir`` is set (checked
    against the model and encoders of the config), else raw videos from ``data.manifest``."""
    d = cfg.data
    batch_size = batch_size or cfg.train.batch_size
    seed = cfg.train.seed if seed is None else seed
    joint = d.image_batch_prob is not None  # joint image + video training: single-shape batches by bucket
    if d.cache_dir:
        from .cache import CachedDataset, CachedLoader, collate_cached

        ds = CachedDataset(d.cache_dir)
        ds.check_compatible(cfg)
        if joint:
            return JointLoader(ds, batch_size, d.image_batch_prob, collate_cached, rank=rank, world_size=world_size,
                               seed=seed, num_workers=0)
        return CachedLoader(ds, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=0)
    if not d.manifest:
        raise ValueError("set data.manifest (raw videos) or data.cache_dir (pre-encoded latents, `modelgrow cache`)")
    ds = VideoDataset(d.manifest, d.num_frames, d.frame_interval, tuple(d.image_size), d.hflip, d.decoder, seed,
                      d.prompt_mode, device_id=int(os.environ.get("LOCAL_RANK", "0")), single_frame_images=joint)
    if joint:
        return JointLoader(ds, batch_size, d.image_batch_prob, collate_videos, rank=rank, world_size=world_size,
                           seed=seed, num_workers=d.num_workers, max_fail_fraction=d.max_fail_fraction)
    return VideoLoader(ds, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=d.num_workers,
                       max_fail_fraction=d.max_fail_fraction)
