"""The synthetic video world the demo, the study and the tests run on -- not production data: one flat-coloured
shape moving on a plain background, with short and long captions (``world``: domains A/B, held-out splits, the
file generator), and the semantic evaluator trained on it (``semantic``: a small classifier that reads shape,
colour, direction and background off a clip, a CPU stand-in for VBench's semantic dimensions).

``from modelgrow import synthetic; synthetic.generate(...)``: the world's names are exported here; the
evaluator's (``SemanticClassifier``, ``train_classifier``, ``prepare_videos``, ...) load lazily (torch)."""

from __future__ import annotations

from .world import *  # noqa: F403 - the world's public names (numpy only)
from .world import __all__ as _WORLD

_SEMANTIC = ("SemanticClassifier", "train_classifier", "prepare_videos", "background_of", "SCORED_ATTRIBUTES",
             "MEASURED_ATTRIBUTES", "ALL_ATTRIBUTES")

__all__ = [*_WORLD, *_SEMANTIC]


def __getattr__(name: str):
    if name in _SEMANTIC:
        from . import semantic

        return getattr(semantic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
