"""Clip sampling and the spatial transform, shared by every decoder (so they all give the same tensors).

Temporal crop (Open-Sora v1.0 ``TemporalRandomCrop(num_frames * frame_interval)``, with an exact stride)
    A video of ``total`` frames gives the indices ``start, start + k, ..., start + (n - 1) k`` (``n`` =
    ``num_frames``, ``k`` = ``frame_interval``), ``start`` uniform in ``[0, total - n k]`` (both ends
    included). Open-Sora v1.0 differs in two small ways that are not reproduced: its start is drawn from
    ``[0, total - n k - 1]`` (an off-by-one that never uses the last window) and it spreads
    ``np.linspace(start, start + n k - 1, n)`` over the window, i.e. strides of 3 or 4 instead of exactly k.
    ``deterministic=True`` (the latent cache) takes the centre window, ``start = (total - n k) // 2``.

Short videos (decision)
    * ``(n - 1) k + 1 <= total < n k``: the exact stride still fits, ``start`` is drawn from
      ``[0, total - (n - 1) k - 1]`` (centre for ``deterministic``).
    * ``total < (n - 1) k + 1``: the clip covers the whole video with a smaller stride,
      ``floor(linspace(0, total - 1, n))`` -- Open-Sora v1.0's formula for a short window. When ``total < n``
      this repeats frames (Open-Sora v1.0 asserts and resamples another video instead; here nothing is
      dropped, a 1-frame video is a still clip like an image).

Spatial transform (Open-Sora ``ResizeCrop`` / ``UCFCenterCropVideo``)
    Resize with scale ``max(H_t / H, W_t / W)`` (the short side -- relative to the target aspect -- becomes the
    target size; sizes ``round``-ed), bilinear, ``align_corners=False``, no antialias (as Open-Sora), then a
    centre crop at ``round((h - H_t) / 2)``, ``round((w - W_t) / 2)``; values ``(x / 255 - 0.5) / 0.5`` in
    [-1, 1]; optional horizontal flip; output ``[3, T, H_t, W_t]`` float32. Images use the same code (Open-Sora
    uses PIL's BICUBIC for images; one code path for both is preferred here).

Randomness
    Every random choice of a sample comes from ``clip_rng(seed, epoch, index)`` in a fixed order (the start,
    then the flip), so it does not depend on worker scheduling, world size or decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ClipSpec", "clip_rng", "sample_frame_indices", "draw_clip", "resize_crop", "to_model_space"]


def clip_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample (independent of everything else)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(epoch), int(index), 0x5EED])


def sample_frame_indices(total: int, num_frames: int, frame_interval: int, u: float | None = None) -> list[int]:
    """Frame indices of one clip of a ``total``-frame video (see the module docstring). ``u`` in [0, 1) picks
    the start uniformly among the valid ones; ``None`` = the centre window (deterministic)."""
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got total={total}")
    n, k = int(num_frames), int(frame_interval)
    span = (n - 1) * k + 1
    if total < span:
        return [int(i) for i in np.linspace(0, total - 1, n).astype(np.int64)]
    max_start = total - n * k if total >= n * k else total - span
    start = max_start // 2 if u is None else min(int(u * (max_start + 1)), max_start)
    return [start + i * k for i in range(n)]


@dataclass(frozen=True)
class ClipSpec:
    """What to read from a file and how to augment it: frame ``indices`` (empty for an image) and ``flip``."""

    indices: tuple[int, ...]
    flip: bool = False


def draw_clip(total: int | None, num_frames: int, frame_interval: int, hflip: bool, seed: int, epoch: int,
              index: int, deterministic: bool = False) -> ClipSpec:
    """The clip of sample ``index`` in ``epoch``; ``total=None`` for an image (no temporal choice).
    ``deterministic``: centre window, no flip (the latent cache)."""
    rng = clip_rng(seed, epoch, index)
    start_u, flip_u = rng.random(), rng.random()  # fixed order: the same draws for images and videos
    indices: tuple[int, ...] = ()
    if total is not None:
        indices = tuple(sample_frame_indices(total, num_frames, frame_interval, None if deterministic else start_u))
    return ClipSpec(indices, flip=bool(hflip and not deterministic and flip_u < 0.5))


def resize_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float ``[T, 3, H, W]`` -> ``[T, 3, H_t, W_t]``: resize to cover the target (bilinear, no antialias),
    centre crop."""
    th, tw = int(size[0]), int(size[1])
    h, w = frames.shape[-2:]
    scale = max(th / h, tw / w)
    sh, sw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (sh, sw) != (h, w):
        frames = F.interpolate(frames, size=(sh, sw), mode="bilinear", align_corners=False, antialias=False)
    i, j = int(round((sh - th) / 2.0)), int(round((sw - tw) / 2.0))
    return frames[..., i : i + th, j : j + tw]


def to_model_space(frames: torch.Tensor | np.ndarray, size: tuple[int, int], flip: bool = False,
                   num_frames: int | None = None) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` (RGB) -> float32 ``[3, T', H_t, W_t]`` in [-1, 1].

    ``num_frames``: repeat a single frame (an image) to that many frames (``T`` must be 1)."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3]; got {x.dtype} {list(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [T, 3, H, W] in [0, 1]
    x = resize_crop(x, size)
    x = (x - 0.5) / 0.5
    if flip:
        x = x.flip(-1)
    if num_frames is not None and x.shape[0] != num_frames:
        if x.shape[0] != 1:
            raise ValueError(f"can only repeat a single frame, got {x.shape[0]} frames")
        x = x.expand(num_frames, -1, -1, -1)
    return x.permute(1, 0, 2, 3).contiguous()  # [3, T, H, W]
