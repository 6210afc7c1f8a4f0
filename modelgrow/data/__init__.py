"""Data: manifests, clip sampling, video decoding (PyAV / DALI CPU / DALI GPU), the sharded resumable loader,
the latent/text cache and (``modelgrow.data.synthetic``) procedurally generated videos.

Imports are lazy so that ``import modelgrow.data`` stays cheap (no PyAV / DALI / safetensors until used).
"""

from __future__ import annotations

import importlib

__all__ = [
    "IMAGE_EXTENSIONS", "Manifest", "ManifestError", "Record", "load_manifest", "is_image",
    "ClipSpec", "clip_rng", "sample_frame_indices", "draw_clip", "resize_crop", "to_model_space",
    "DecodeError", "VideoInfo", "probe", "read_image", "decode_pyav", "FrameDecoder", "resolve_decoder",
    "DALI_CPU_CODECS", "is_dali_available", "dali_gpu_available", "DaliVideoDecoder",
    "VideoDataset", "VideoLoader", "TooManyDecodeFailures", "FailureCounter", "epoch_order", "build_loader",
    "JointLoader", "bucket_order", "build_cache", "CachedDataset", "CachedLoader", "CacheMismatchError", "encoder_identity",
]

_LAZY = {
    **{n: "manifest" for n in ("IMAGE_EXTENSIONS", "Manifest", "ManifestError", "Record", "load_manifest", "is_image")},
    **{n: "clips" for n in ("ClipSpec", "clip_rng", "sample_frame_indices", "draw_clip", "resize_crop", "to_model_space")},
    **{n: "decode" for n in ("DecodeError", "VideoInfo", "probe", "read_image", "decode_pyav", "FrameDecoder",
                             "resolve_decoder", "DALI_CPU_CODECS")},
    **{n: "dali" for n in ("is_dali_available", "dali_gpu_available", "DaliVideoDecoder")},
    **{n: "loader" for n in ("VideoDataset", "VideoLoader", "TooManyDecodeFailures", "FailureCounter", "epoch_order",
                             "build_loader", "JointLoader", "bucket_order")},
    **{n: "cache" for n in ("build_cache", "CachedDataset", "CachedLoader", "CacheMismatchError", "encoder_identity")},
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
