"""Evaluation of generated videos, the general dimensions: VBench-style video dimensions (``classical``: no
learned weights; ``features``: a local DINO / CLIP; ``judge``: the MLLM judge score with a local VLM; ``run``:
the ``modelgrow evaluate`` command). The synthetic world's semantic evaluator lives with that world
(``modelgrow.synthetic.semantic``). Submodules load on use."""
