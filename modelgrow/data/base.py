"""The loader base shared by raw-video and cached datasets: deterministic per-epoch order, sharding over ranks,
decode workers, the resumable position and failure counting. Datasets only say how to load sample ``k``.

Datasets
    Anything with ``len(ds)`` and ``ds[(epoch, pos, k)]`` returning the sample (a dict of the batch schema,
    :mod:`modelgrow.data.batch`) or a failure record ``{"failed": path, "error": message, ...}``; the sample
    and the record carry ``epoch`` and ``pos`` back (what the loader advances its position by, whichever process
    loaded them). :class:`~modelgrow.data.videos.VideoDataset` (raw videos) and
    :class:`~modelgrow.data.cache.dataset.CachedDataset` (a latent/text cache) are the two.

Order
    Epoch ``e`` visits the dataset in the permutation drawn from ``(seed, e)`` (``shuffle=False``: dataset
    order). The permutation is padded to a multiple of ``world_size`` with its own first entries
    (``DistributedSampler``'s rule, so every rank has the same number of samples per epoch) and rank ``r``
    takes entries ``r, r + world_size, ...``. The loader is endless: after its last sample of an epoch a rank
    continues with the next epoch. Batches are filled in order with the next samples that load.

Resume
    ``state_dict() -> {"epoch", "position", "seed", "rank", "world_size", "tried", "failed",
    "failed_paths", ...}``: ``position`` is the number of entries of the rank's epoch list already consumed by
    the batches handed out (prefetched samples do not count). A new loader given that state continues exactly
    where the old one stopped: no sample is repeated or skipped, and the augmentations are the same, since each
    sample's random crop/flip comes from ``(seed, epoch, index)`` alone (``clips.clip_rng``).

Bad files (the failure rule)
    A sample that does not load is skipped, logged (``logging`` logger ``modelgrow.data``, with its path and
    the error) and counted (``tried``, ``failed``, ``failed_paths``). The run stops with
    ``TooManyDecodeFailures`` naming the failed files as soon as ``tried >= min_tried`` and
    ``failed > max_fail_fraction * tried`` (``min_tried`` = 20 by default, so that one bad file among the
    first few samples does not abort a run whose failure rate is really low; a failure rate above the limit is
    still caught at the 20th sample). A rank epoch in which not a single sample loads is an error too.

Joint image + video training
    :class:`JointLoader` batches images and videos apart (buckets by shape, one shape per batch), a batch being
    an image batch with probability ``image_batch_prob``; same order / resume / failure rules, per bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .batch import collate

__all__ = ["TooManyDecodeFailures", "FailureCounter", "epoch_order", "bucket_order", "KeyStream", "ShardedLoader",
           "JointLoader", "BUCKETS"]

log = logging.getLogger("modelgrow.data")


class TooManyDecodeFailures(RuntimeError):
    """More files failed to decode than ``max_fail_fraction`` allows."""


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
        """One sample that did not load: logged, counted, and the rule applied."""
        self.tried += 1
        self.failed += 1
        self.failed_paths.append(path)
        log.warning("skipping %s: %s (%d of %d samples failed so far)", path, error, self.failed, self.tried)
        if self.tried >= self.min_tried and self.failed > self.max_fail_fraction * self.tried:
            self.abort()

    def record(self, ok: int = 0, failed: Sequence[str] = ()) -> None:
        """Count results obtained earlier (a resumed job's finished work): no logging, no rule."""
        self.tried += int(ok) + len(failed)
        self.failed += len(failed)
        self.failed_paths.extend(failed)

    def check_total(self, total: int, what: str, hint: str) -> None:
        """The rule over a known total instead of the samples tried so far: abort when more than
        ``max_fail_fraction * total`` failed (``what`` names the total, ``hint`` the fix)."""
        allowed = self.max_fail_fraction * total
        if self.failed > allowed:
            self.abort(f"{self.failed} of the {total} {what} failed to decode (more than max_fail_fraction "
                       f"{self.max_fail_fraction:g} x {total} = {allowed:g}); {hint}")

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


def _permutation(n: int, key: list[int], shuffle: bool) -> np.ndarray:
    return np.random.default_rng(key).permutation(n) if shuffle else np.arange(n)


def _shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Pad ``order`` with its own first entries to a multiple of ``world_size``; rank ``rank``'s stride."""
    pad = (-len(order)) % world_size
    if pad:
        order = np.concatenate([order, order[:pad]])
    return order[rank::world_size]


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> np.ndarray:
    """Indices rank ``rank`` visits in ``epoch`` (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return _shard(_permutation(n, [int(seed) & 0xFFFFFFFF, int(epoch), 0xD474], shuffle), rank, world_size)


def bucket_order(members: np.ndarray, seed: int, epoch: int, bucket: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> np.ndarray:
    """The dataset indices of one bucket (``members``) that rank ``rank`` visits in the bucket's ``epoch``:
    ``epoch_order``'s rule (permutation, padding, rank stride) on the bucket's own list and stream."""
    perm = _permutation(len(members), [int(seed) & 0xFFFFFFFF, int(epoch), int(bucket), 0xB0C7], shuffle)
    return np.asarray(members)[_shard(perm, rank, world_size)]


class KeyStream:
    """The endless ``(epoch, position, index)`` stream of one rank from a starting point; ``order(epoch)``
    gives the rank's indices of an epoch (``epoch_order`` / ``bucket_order``)."""

    def __init__(self, order: Callable[[int], np.ndarray], epoch: int, position: int):
        self.order, self.epoch, self.position = order, int(epoch), int(position)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, pos = self.epoch, self.position
        while True:
            order = self.order(epoch)
            for p in range(pos, len(order)):
                yield (epoch, p, int(order[p]))
            epoch, pos = epoch + 1, 0


def _identity(x):
    return x


def usable_workers(dataset, num_workers: int) -> int:
    """Worker processes a dataset can use: none for a GPU DALI decoder (it decodes in the main process)."""
    if num_workers and getattr(getattr(dataset, "decoder", None), "kind", None) == "dali":
        log.info("decoder 'dali' (GPU) decodes in the main process: num_workers %d -> 0", num_workers)
        return 0
    return int(num_workers)


def load_items(dataset, keys: Iterable[tuple[int, int, int]], num_workers: int, prefetch_factor: int = 2,
               pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """``dataset[key]`` for every key, in order: in this process, or in ``num_workers`` worker processes."""
    workers = usable_workers(dataset, num_workers)
    if workers == 0:
        return (dataset[k] for k in keys)
    return iter(torch.utils.data.DataLoader(
        dataset, sampler=keys, batch_size=None, num_workers=workers, collate_fn=_identity,
        prefetch_factor=prefetch_factor, pin_memory=pin_memory, persistent_workers=False))


def _check_common(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank/world_size {rank}/{world_size}")


class _Stream:
    """One endless stream of samples (a whole dataset, or one bucket of a joint loader) with its position,
    feeding the shared failure counter; ``take(n)`` returns the next ``n`` samples that load."""

    def __init__(self, loader, order: Callable[[int], np.ndarray], per_epoch: int, what: str):
        self.loader, self.order, self.per_epoch, self.what = loader, order, per_epoch, what
        self.items: Iterator[dict[str, Any]] | None = None
        self.good = 0  # samples that loaded in the current epoch

    def take(self, n: int, position: list[int]) -> list[dict[str, Any]]:
        """The next ``n`` good samples; ``position`` ([epoch, position]) is advanced in place."""
        ld = self.loader
        if self.items is None:
            self.items = load_items(ld.dataset, KeyStream(self.order, *position), ld.num_workers, ld.prefetch_factor,
                                    ld.pin_memory)
        out: list[dict[str, Any]] = []
        while len(out) < n:
            item = next(self.items)
            epoch, pos = item["epoch"], item["pos"]
            if "failed" in item:
                ld.failures.fail(item["failed"], item["error"])
            else:
                ld.failures.ok()
                self.good += 1
                out.append(item)
            last = pos + 1 == self.per_epoch
            position[:] = [epoch + 1, 0] if last else [epoch, pos + 1]
            if last:
                if self.good == 0:
                    ld.failures.abort(f"no {self.what}of epoch {epoch} (rank {ld.rank}) could be decoded")
                self.good = 0
        return out


class ShardedLoader:
    """Endless batches from one dataset: the order / sharding / resume / failure rules of the module docstring.
    ``collate`` turns a list of samples into a batch (default: the one batch schema's :func:`~.batch.collate`)."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, max_fail_fraction: float = 0.01, min_tried: int = 20,
                 prefetch_factor: int = 2, pin_memory: bool = False, collate: Callable | None = None):
        _check_common(batch_size, rank, world_size)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_workers, self.shuffle = int(num_workers), bool(shuffle)
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._collate = collate
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
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return (self._collate or collate)(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self.dataset)
        stream = _Stream(self, lambda e: epoch_order(n, self.seed, e, self.rank, self.world_size, self.shuffle),
                         self.samples_per_epoch, "sample ")
        position = [self.epoch, self.position]
        while True:
            samples = stream.take(self.batch_size, position)
            self.epoch, self.position = position
            yield self.collate(samples)


BUCKETS = ("video", "image")


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

    def __init__(self, dataset, batch_size: int, image_batch_prob: float, collate: Callable | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0, shuffle: bool = True,
                 max_fail_fraction: float = 0.01, min_tried: int = 20, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        _check_common(batch_size, rank, world_size)
        p = float(image_batch_prob)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"image_batch_prob must be in [0, 1], got {image_batch_prob}")
        flags = np.array([bool(dataset.is_image(k)) for k in range(len(dataset))], dtype=bool)
        self.members = {"video": np.flatnonzero(~flags), "image": np.flatnonzero(flags)}
        if p > 0 and not len(self.members["image"]):
            raise ValueError(f"image_batch_prob = {p} but the data has no single-frame images (manifest rows with an "
                             "image file; a cache built with single-frame images: cache.single_frame_images)")
        if p < 1 and not len(self.members["video"]):
            raise ValueError(f"image_batch_prob = {p} < 1 but the data has no videos; set image_batch_prob = 1 "
                             "for an image-only run")
        self.dataset, self.batch_size, self.image_batch_prob = dataset, int(batch_size), p
        self._collate = collate
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_workers, self.shuffle = int(num_workers), bool(shuffle)
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.failures = FailureCounter(max_fail_fraction, min_tried)
        self.batches = 0  # batches handed out
        self.streams = {b: [0, 0] for b in BUCKETS}  # bucket -> [epoch, position]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return (self._collate or collate)(samples)

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
    def _stream(self, bucket: str) -> _Stream:
        members, bid = self.members[bucket], BUCKETS.index(bucket)
        return _Stream(self, lambda e: bucket_order(members, self.seed, e, bid, self.rank, self.world_size, self.shuffle),
                       self.samples_per_epoch(bucket), f"{bucket} sample ")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        streams: dict[str, _Stream] = {}
        while True:
            bucket = self.bucket_of_batch(self.batches)
            if bucket not in streams:
                streams[bucket] = self._stream(bucket)
            samples = streams[bucket].take(self.batch_size, self.streams[bucket])
            self.batches += 1
            yield self.collate(samples)
