"""Evaluation: VBench-style video dimensions (``classical``: no learned weights; ``features``: a local DINO / CLIP;
``judge``: the MLLM judge score with a local VLM; ``run``: the ``modelgrow evaluate`` command) and the semantic
evaluator of the synthetic video world (``semantic``, a stand-in for VBench / CompBench prompt-following scores).
Submodules load lazily, so the evaluation command does not import the synthetic world."""

__all__ = ["SCORED_ATTRIBUTES", "SemanticClassifier", "prepare_videos", "train_classifier"]


def __getattr__(name: str):
    if name in __all__:
        from . import semantic

        return getattr(semantic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
