"""NVIDIA DALI video decoding: ``fn.decoders.video`` on the encoded bytes of one file, the requested frame
indices fed per sample through ``fn.external_source``.

* CPU (``device="cpu"``, pipeline ``device_id=None``): libavcodec inside DALI; VP8, VP9 and MJPEG only (H.264,
  HEVC, AV1, MPEG-4 need the mixed/NVDEC backend -- the router falls back to PyAV for them per file).
* GPU (``device="gpu"``): the same operator with ``device="mixed"`` decodes on NVDEC (H.264/HEVC/AV1/VP9/...);
  the frames are copied back to host memory so that the resize/crop/normalise code is the same as the PyAV
  path. Written for DALI >= 1.40 (``fn.decoders.video``; older versions have it as
  ``fn.experimental.decoders.video``) and guarded; it has NOT been exercised on a GPU in this repository's
  CPU test suite.

A pipeline is built lazily per process (DALI pipelines are not picklable, and DataLoader workers are
processes); after a decoding error the pipeline is rebuilt, since a failed DALI pipeline may not be reusable.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["is_dali_available", "dali_gpu_available", "DaliVideoDecoder"]


@functools.lru_cache(maxsize=1)
def is_dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libs) counts as unavailable
        return False
    return True


def dali_gpu_available() -> bool:
    try:
        import torch

        return is_dali_available() and torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _video_decoder_op():
    import nvidia.dali.fn as fn

    dec = getattr(getattr(fn, "decoders", None), "video", None)
    if dec is None:  # DALI < 1.40
        dec = fn.experimental.decoders.video
    return dec


class DaliVideoDecoder:
    """``decode(path, indices) -> uint8 [len(indices), H, W, 3]`` with DALI on the CPU or the GPU."""

    def __init__(self, device: str = "cpu", device_id: int = 0, num_threads: int = 1):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if not is_dali_available():
            raise ImportError("NVIDIA DALI is not installed: pip install nvidia-dali-cuda130")
        self.device = device
        self.device_id = device_id
        self.num_threads = num_threads
        self._pipe = None
        self._pid = None

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_pipe"], st["_pid"] = None, None
        return st

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        decoder = _video_decoder_op()
        op_device = "mixed" if self.device == "gpu" else "cpu"

        @pipeline_def(batch_size=1, num_threads=self.num_threads,
                      device_id=self.device_id if self.device == "gpu" else None,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1, no_copy=False)
            return decoder(encoded, frames=frames, device=op_device)

        p = pipe()
        p.build()
        return p

    def _pipeline(self):
        if self._pipe is None or self._pid != os.getpid():
            self._pipe, self._pid = self._build(), os.getpid()
        return self._pipe

    def decode(self, path: str, indices: Sequence[int]) -> np.ndarray:
        from .decode import DecodeError

        if len(indices) == 0:
            raise ValueError("no frame indices requested")
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise DecodeError(f"{path}: cannot read ({e})") from e
        if data.size == 0:
            raise DecodeError(f"{path}: empty file")
        pipe = self._pipeline()
        try:
            pipe.feed_input("encoded", [data])
            pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            (out,) = pipe.run()
            if hasattr(out, "as_cpu"):
                out = out.as_cpu()
            arr = np.array(out[0])
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError with the backend's message
            self._pipe = None  # rebuild after a failure
            raise DecodeError(f"{path}: DALI ({self.device}) decoding failed: {str(e).splitlines()[0][:300]}") from e
        if arr.ndim != 4 or arr.shape[0] != len(indices) or arr.shape[-1] != 3:
            raise DecodeError(f"{path}: DALI returned frames of shape {arr.shape} for {len(indices)} indices")
        return arr
