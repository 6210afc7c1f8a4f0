"""Raw videos: the manifest dataset (decode -> clip -> model space) and its loader on the shared base.

Batches (:mod:`modelgrow.data.batch`, raw kind): ``{"video": [B, 3, T, H, W] float32 in [-1, 1], "caption":
list[str], "long_caption": list[str | None], "prompt": list[str] (merge_prompt(caption, long_caption,
prompt_mode)), "path": list[str], "index": LongTensor [B] (manifest row of each sample)}``. Order, sharding,
resume and the failure rule: :mod:`modelgrow.data.base`.

Joint image + video training (``data.image_batch_prob``)
    Unset: an image row becomes a clip of ``num_frames`` repeated frames. Set to p in [0, 1]: images are
    single-frame samples ``[3, 1, H, W]`` (``single_frame_images=True``) and ``base.JointLoader`` batches
    images and videos apart.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..text.prompts import merge_prompt
from .base import ShardedLoader
from .clips import draw_clip, to_model_space
from .decode import DecodeError, FrameDecoder
from .manifest import Manifest, load_manifest

__all__ = ["VideoDataset", "VideoLoader"]


class VideoDataset:
    """Manifest rows -> model-space clips. ``load(index, epoch)`` raises ``DecodeError`` for a bad file;
    ``dataset[(epoch, pos, index)]`` returns the sample or a failure record (what the loader's workers call)."""

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
        """Sample ``index`` as a raw sample of the batch schema (plus ``is_image``)."""
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


class VideoLoader(ShardedLoader):
    """Endless batches of raw clips (see the module docstring); ``num_workers`` decode processes (none for the
    GPU DALI decoder); the seed defaults to the dataset's."""

    def __init__(self, dataset: VideoDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int | None = None,
                 num_workers: int = 0, shuffle: bool = True, max_fail_fraction: float = 0.01, min_tried: int = 20,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        super().__init__(dataset, batch_size, rank, world_size, dataset.seed if seed is None else seed, num_workers,
                         shuffle, max_fail_fraction, min_tried, prefetch_factor, pin_memory)
