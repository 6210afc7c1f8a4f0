"""Decoding the requested frames of a file to uint8 RGB ``[T, H, W, 3]``, with PyAV (the fallback decoder)
and the decoder router (``auto | dali | dali-cpu | pyav``).

PyAV decodes only what it must: frames before the first requested index are decoded but not converted to
RGB, decoding stops after the last requested index, and when the first requested index is far into the file
(``seek_threshold`` frames) it seeks to the key frame before it and recovers frame indices from timestamps
(falling back to a sequential decode if the timestamps do not look constant-rate). The RGB conversion is PyAV's
own (libswscale, ``frame_to_rgb``), with each frame's YUV matrix (BT.709 / BT.601 / ...) and colour range.

Frame numbering is presentation order, 0-based, the same as ``modelgrow.video_io.read_video`` and DALI's
``decoders.video``. ``probe(path)`` gives the frame count (container metadata, or counting packets without
decoding) and the codec name.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .manifest import is_image

__all__ = ["DecodeError", "SWS_FLAGS", "frame_to_rgb", "VideoInfo", "probe", "read_image", "decode_pyav", "PyAVDecoder",
           "FrameDecoder", "DALI_CPU_CODECS", "resolve_decoder"]

log = logging.getLogger("modelgrow.data")

DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})  # DALI's CPU backend (libavcodec); the rest need NVDEC


class DecodeError(RuntimeError):
    """A file that cannot be read/decoded (skipped and counted by the loader)."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    codec: str
    height: int
    width: int
    fps: float


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding videos needs PyAV: pip install av") from None
    return av


def probe(path: str) -> VideoInfo:
    """Frame count, codec and size of a video without decoding it (packets are counted when the container
    has no frame count, e.g. WebM)."""
    av = _av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DecodeError(f"{path}: no video stream")
            s = c.streams.video[0]
            codec = s.codec_context.name
            h, w = s.codec_context.height, s.codec_context.width
            fps = float(s.average_rate or s.guessed_rate or 0)
            n = int(s.frames or 0)
            if n <= 0:
                n = sum(1 for p in c.demux(s) if p.size > 0)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types for broken files
        raise DecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
    if n <= 0:
        raise DecodeError(f"{path}: no video frames")
    return VideoInfo(n, codec, h, w, fps)


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 ``[1, H, W, 3]``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return arr[None]


# AVColorSpace (the frame's tag) -> swscale's name for the YUV->RGB matrix; anything else (unspecified, ...) is
# converted as BT.601, swscale's default and DALI's. BT.2020 (9, 10) only where PyAV names it (>= 17).
_SWS_COLORSPACE = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
# SWS_BILINEAR | SWS_FULL_CHR_H_INT | SWS_ACCURATE_RND: bilinear chroma upsampling at full horizontal resolution
# with exact rounding, the conversion DALI's CPU video decoder makes (measured bit-identical on a VP9 clip with
# sharp colour edges). swscale's default fast path (SWS_BILINEAR alone: nearest chroma) converts 5-8x faster
# (256x256: 0.04 vs 0.2-0.3 ms a frame) but is up to ~115 levels off DALI at such edges.
SWS_FLAGS = 0x2 | 0x2000 | 0x40000
_sws_flags_ok = True  # PyAV < 14.4 accepts only one named interpolation, not OR-ed flags


@functools.cache
def _has_bt2020() -> bool:
    from av.video.reformatter import Colorspace

    return hasattr(Colorspace, "BT2020")


def _rgb_kwargs(frame) -> dict:
    """``VideoReformatter.reformat`` arguments that convert ``frame`` to RGB with its own matrix and range.

    PyAV >= 17 (``sws_scale_frame``) reads the frame's colorspace and colour range by itself. Older PyAV (checked:
    13.1, 16.0.1) passes neither to swscale unless told (BT.709 video came out in BT.601 colours, up to 23 levels
    off) and skips the colour set-up altogether when source and destination colorspace and range compare equal,
    so both are named explicitly here, with a destination colorspace that differs from the source one (an RGB
    output has no YUV matrix: swscale ignores it)."""
    fmt = frame.format
    kw = {"format": "rgb24"}
    if _sws_flags_ok:
        kw["interpolation"] = SWS_FLAGS
    if fmt.is_rgb or fmt.has_palette or len(fmt.components) < 3:  # RGB, palette, grey: no YUV matrix
        return kw
    src = _SWS_COLORSPACE.get(int(frame.colorspace), "ITU601")
    if src == "BT2020" and not _has_bt2020():
        src = "ITU601"
    full = int(frame.color_range) == 2 or fmt.name.startswith("yuvj")  # AVCOL_RANGE_JPEG, or a JPEG pixel format
    kw.update(src_colorspace=src, dst_colorspace="ITU601" if src == "ITU709" else "ITU709",
              src_color_range="JPEG" if full else "MPEG", dst_color_range="JPEG")
    return kw


def frame_to_rgb(frame, reformatter=None) -> np.ndarray:
    """A decoded PyAV frame -> uint8 ``[H, W, 3]`` through PyAV's own conversion (libswscale), with the frame's
    YUV matrix (BT.709, BT.601, ...; untagged: BT.601) and colour range (limited or full), and DALI's chroma
    upsampling (``SWS_FLAGS``). ``reformatter``: a ``av.video.reformatter.VideoReformatter`` to reuse across the
    frames of one video (its swscale context is kept)."""
    global _sws_flags_ok
    if frame.format.name == "rgb24":
        return frame.to_ndarray()
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        reformatter = VideoReformatter()
    kw = _rgb_kwargs(frame)
    try:
        out = reformatter.reformat(frame, **kw)
    except (KeyError, ValueError, TypeError):
        if "interpolation" not in kw:
            raise
        _sws_flags_ok = False  # old PyAV: swscale's default bilinear scaler
        out = reformatter.reformat(frame, **_rgb_kwargs(frame))
    return out.to_ndarray()


def _frame_index(frame, stream, t0: float) -> int | None:
    if frame.pts is None or not stream.average_rate:
        return None
    return int(round((float(frame.pts * stream.time_base) - t0) * float(stream.average_rate)))


def decode_pyav(path: str, indices: Sequence[int], seek_threshold: int = 64, threads: int = 1) -> np.ndarray:
    """The frames ``indices`` (any order, repeats allowed) of ``path`` as uint8 ``[len(indices), H, W, 3]``."""
    av = _av()
    if len(indices) == 0:
        raise ValueError("no frame indices requested")
    wanted = sorted(set(int(i) for i in indices))
    if wanted[0] < 0:
        raise ValueError(f"negative frame index in {list(indices)}")
    wanted_set = set(wanted)
    got: dict[int, np.ndarray] = {}
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()  # one swscale context for the whole file
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            if threads > 1:
                s.thread_type, s.thread_count = "AUTO", threads
            t0 = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
            seeked = False
            if wanted[0] >= seek_threshold and s.average_rate:
                target = t0 + wanted[0] / float(s.average_rate)
                c.seek(int(target / s.time_base), stream=s, backward=True, any_frame=False)
                seeked = True
            idx = -1
            for frame in c.decode(s):
                if seeked:
                    idx = _frame_index(frame, s, t0)
                    if idx is None or idx > wanted[0]:  # timestamps we cannot trust: decode from the start
                        return decode_pyav(path, indices, seek_threshold=1 << 62, threads=threads)
                    seeked = False
                else:
                    idx += 1
                if idx in wanted_set:
                    got[idx] = frame_to_rgb(frame, reformatter)
                    if len(got) == len(wanted):
                        break
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"{path}: decoding failed ({type(e).__name__}: {e})") from e
    if len(got) != len(wanted):
        missing = [i for i in wanted if i not in got]
        raise DecodeError(f"{path}: frames {missing[:8]} not found (the file has {idx + 1} decodable frames)")
    return np.stack([got[int(i)] for i in indices])


class PyAVDecoder:
    name = "pyav"

    def __init__(self, seek_threshold: int = 64, threads: int = 1):
        self.seek_threshold, self.threads = seek_threshold, threads

    def decode(self, path: str, indices: Sequence[int], info: VideoInfo | None = None) -> np.ndarray:
        return decode_pyav(path, indices, self.seek_threshold, self.threads)


def resolve_decoder(name: str) -> str:
    """``auto`` -> ``dali`` (CUDA + DALI), ``dali-cpu`` (DALI without CUDA) or ``pyav``; an explicit
    ``dali``/``dali-cpu`` without DALI (or ``dali`` without CUDA) raises."""
    from .dali import dali_gpu_available, is_dali_available

    if name == "pyav":
        return name
    if name == "auto":
        if dali_gpu_available():
            return "dali"
        return "dali-cpu" if is_dali_available() else "pyav"
    if name in ("dali", "dali-cpu"):
        if not is_dali_available():
            raise ImportError(f"decoder={name!r} needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use decoder='pyav')")
        if name == "dali" and not dali_gpu_available():
            raise RuntimeError("decoder='dali' needs a CUDA GPU; use 'dali-cpu' (VP9/VP8/MJPEG) or 'pyav'")
        return name
    raise ValueError(f"unknown decoder {name!r}; choose auto, dali, dali-cpu or pyav")


class FrameDecoder:
    """Picks the decoder per file: DALI (GPU: every NVDEC codec; CPU: VP8/VP9/MJPEG) with a per-file fallback
    to PyAV for codecs the DALI backend cannot decode, or PyAV alone. Images are read with PIL.
    Picklable (DALI pipelines are built lazily in the process that uses them)."""

    def __init__(self, decoder: str = "auto", device_id: int = 0, seek_threshold: int = 64, threads: int = 1):
        self.requested = decoder
        self.kind = resolve_decoder(decoder)
        self.device_id = device_id
        self.pyav = PyAVDecoder(seek_threshold, threads)
        self._dali = None
        self.counts = {"pyav": 0, "dali": 0, "dali-cpu": 0, "fallback": 0, "image": 0}

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_dali"] = None
        return st

    def _dali_decoder(self):
        if self._dali is None:
            from .dali import DaliVideoDecoder

            self._dali = DaliVideoDecoder(device="gpu" if self.kind == "dali" else "cpu", device_id=self.device_id)
        return self._dali

    def backend_for(self, info: VideoInfo) -> str:
        if self.kind == "dali-cpu" and info.codec not in DALI_CPU_CODECS:
            return "pyav"
        return self.kind

    def read(self, path: str, indices: Sequence[int] | None, info: VideoInfo | None = None) -> np.ndarray:
        """uint8 ``[T, H, W, 3]`` for a video (``indices``), ``[1, H, W, 3]`` for an image."""
        if is_image(path):
            self.counts["image"] += 1
            return read_image(path)
        if not os.path.isfile(path):
            raise DecodeError(f"{path}: file does not exist")
        info = info or probe(path)
        backend = self.backend_for(info)
        if backend != self.kind:
            self.counts["fallback"] += 1
            log.debug("%s: codec %s not supported by %s, decoding with PyAV", path, info.codec, self.kind)
        self.counts[backend] += 1
        if backend == "pyav":
            return self.pyav.decode(path, indices)
        return self._dali_decoder().decode(path, indices)
