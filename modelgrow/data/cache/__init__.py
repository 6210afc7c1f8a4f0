"""The pre-encoded latent / text cache, in three parts: ``format`` (the files, reading and writing them, the
identities and fingerprints of what a cache was built with, the check of a config against them), ``dataset``
(reading samples: ``CachedDataset``, ``CachedLoader``) and ``build`` (running the encoders over a manifest:
``build_cache``, the ``modelgrow cache`` command). Names load lazily from their part."""

from __future__ import annotations

import importlib

__all__ = ["build_cache", "main", "CachedDataset", "CachedLoader", "CacheMismatchError", "encoder_identity",
           "CACHE_VERSION", "fingerprint", "read_index", "check_data_settings"]

_LAZY = {
    **{n: "build" for n in ("build_cache", "main")},
    **{n: "dataset" for n in ("CachedDataset", "CachedLoader")},
    **{n: "format" for n in ("CacheMismatchError", "encoder_identity", "CACHE_VERSION", "fingerprint", "read_index",
                             "check_data_settings")},
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
