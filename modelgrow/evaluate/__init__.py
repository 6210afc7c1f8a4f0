"""Evaluation: the semantic evaluator of the synthetic video world (a stand-in for VBench / CompBench
prompt-following scores)."""

from .semantic import SCORED_ATTRIBUTES, SemanticClassifier, prepare_videos, train_classifier

__all__ = ["SCORED_ATTRIBUTES", "SemanticClassifier", "prepare_videos", "train_classifier"]
