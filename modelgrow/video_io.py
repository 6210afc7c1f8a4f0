"""Video files in and out: H.264 ``.mp4`` and VP9 ``.webm`` through PyAV, PNG keyframe strips.

Frames are ``uint8`` arrays ``[T, H, W, 3]`` (RGB). ``to_uint8`` converts model-space videos
``[3, T, H, W]`` in [-1, 1] to that layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_output

_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"), ".mkv": ("libx264", "yuv420p")}


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("video files need PyAV: pip install 'modelgrow[video]' (PyAV)") from None
    return av


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] in [-1, 1]; got shape {list(video.shape)}")
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 18) -> Path:
    """Encode uint8 ``[T, H, W, 3]`` frames to ``path`` (codec from the suffix: .mp4 H.264, .webm VP9).
    Odd sizes are padded by one pixel (4:2:0 chroma needs even sizes). Written atomically."""
    av = _av()
    path = Path(path)
    if path.suffix not in _CODECS:
        raise ValueError(f"unsupported video suffix {path.suffix!r}; use one of {sorted(_CODECS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3]; got {frames.dtype} {list(frames.shape)}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    codec, pix_fmt = _CODECS[path.suffix]
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf + 14), "b": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode every frame: (uint8 [T, H, W, 3], fps)."""
    av = _av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames), fps


def keyframe_strip(frames: np.ndarray, n: int = 4) -> np.ndarray:
    """``n`` evenly spaced frames side by side: uint8 [H, n*W, 3]."""
    idx = np.linspace(0, len(frames) - 1, num=min(n, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in idx], axis=1)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    return path
