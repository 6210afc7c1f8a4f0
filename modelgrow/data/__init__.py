"""Data: manifests, clip sampling, video decoding (PyAV / DALI CPU / DALI GPU), the one batch schema, the shared
sharded / resumable loader base, raw-video datasets, the encoders, the latent/text cache (format, reading,
building) and the training loader above them all.

    manifest, clips, decode, dali   reading videos
    batch                           the batch schema (keys, shapes) and collate
    base                            order, sharding, workers, resume, failure counting (+ joint image/video)
    videos                          VideoDataset / VideoLoader (raw videos)
    encode                          the VAE / T5 / LLM of [data] and the one encode function
    cache/                          format (files, fingerprints, checks), dataset (reading), build (encoding)
    loader                          build_loader: the run's loader, cache or raw videos

Imports are lazy so that ``import modelgrow.data`` stays cheap (no PyAV / DALI / safetensors until used).
"""

from __future__ import annotations

import importlib

__all__ = [
    "IMAGE_EXTENSIONS", "Manifest", "ManifestError", "Record", "load_manifest", "is_image",
    "ClipSpec", "clip_rng", "sample_frame_indices", "draw_clip", "resize_crop", "to_model_space",
    "DecodeError", "VideoInfo", "probe", "read_image", "decode_pyav", "FrameDecoder", "resolve_decoder",
    "DALI_CPU_CODECS", "is_dali_available", "dali_gpu_available", "DaliVideoDecoder",
    "Batch", "collate",
    "TooManyDecodeFailures", "FailureCounter", "epoch_order", "bucket_order", "ShardedLoader", "JointLoader",
    "VideoDataset", "VideoLoader", "Encoders", "encode_batch",
    "build_cache", "CachedDataset", "CachedLoader", "CacheMismatchError", "encoder_identity",
    "build_loader", "resolve_data",
]

_LAZY = {
    **{n: "manifest" for n in ("IMAGE_EXTENSIONS", "Manifest", "ManifestError", "Record", "load_manifest", "is_image")},
    **{n: "clips" for n in ("ClipSpec", "clip_rng", "sample_frame_indices", "draw_clip", "resize_crop", "to_model_space")},
    **{n: "decode" for n in ("DecodeError", "VideoInfo", "probe", "read_image", "decode_pyav", "FrameDecoder",
                             "resolve_decoder", "DALI_CPU_CODECS")},
    **{n: "dali" for n in ("is_dali_available", "dali_gpu_available", "DaliVideoDecoder")},
    **{n: "batch" for n in ("Batch", "collate")},
    **{n: "base" for n in ("TooManyDecodeFailures", "FailureCounter", "epoch_order", "bucket_order", "ShardedLoader",
                           "JointLoader")},
    **{n: "videos" for n in ("VideoDataset", "VideoLoader")},
    **{n: "encode" for n in ("Encoders", "encode_batch")},
    **{n: "cache.build" for n in ("build_cache",)},
    **{n: "cache.dataset" for n in ("CachedDataset", "CachedLoader")},
    **{n: "cache.format" for n in ("CacheMismatchError", "encoder_identity")},
    **{n: "loader" for n in ("build_loader", "resolve_data")},
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
