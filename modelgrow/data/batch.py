"""The one batch schema: the keys and shapes every data source produces and every consumer (the trainer, the
cache builder, the validation and the evaluators) reads, and the one function that stacks samples into a batch.

A batch is one of two kinds, both :class:`Batch` dicts:

* **raw** (``VideoLoader``): ``video``, ``caption``, ``long_caption``, ``prompt``, ``path``, ``index``;
* **latent** (``CachedLoader``, :func:`modelgrow.data.encode.encode_batch`, ``RandomLatentLoader``):
  ``latent``, ``y``, ``mask`` [, ``y_llm``, ``llm_mask``], ``caption``, ``prompt``, ``index``.

A *sample* has the same keys without the batch dimension (``index`` an int, strings instead of lists);
``y`` / ``y_llm`` keep their condition dimension (``[1, L, C]``), as the text encoders return them.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch

__all__ = ["Batch", "TENSOR_KEYS", "TEXT_KEYS", "LATENT_KEYS", "collate"]


class Batch(TypedDict, total=False):
    video: torch.Tensor  # [B, 3, T, H, W] float32 in [-1, 1] (T = 1: a single-frame image)
    latent: torch.Tensor  # [B, C, T, h, w] float32: scaled VAE latents
    y: torch.Tensor  # [B, 1, L, C_t5] float32: T5 states (padding rows included)
    mask: torch.Tensor  # [B, L] int64: 1 for caption tokens
    y_llm: torch.Tensor  # [B, 1, L', C_llm] float32: LLM states (models with the LLM condition)
    llm_mask: torch.Tensor  # [B, L'] int64
    caption: list[str]  # the manifest's short caption
    long_caption: list[str | None]  # the manifest's long caption (raw batches)
    prompt: list[str]  # what the text encoders see: merge_prompt(caption, long_caption, prompt_mode)
    path: list[str]  # the video file (raw batches)
    index: torch.Tensor  # [B] int64: manifest rows (the key of every sample's training randomness)


TENSOR_KEYS = ("video", "latent", "y", "mask", "y_llm", "llm_mask")  # stacked along a new batch dimension
TEXT_KEYS = ("caption", "long_caption", "prompt", "path")  # gathered into lists
LATENT_KEYS = ("latent", "y", "mask", "y_llm", "llm_mask")  # what a latent batch carries to the model


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Samples (dicts of the schema, plus any bookkeeping keys, which are dropped) -> one :class:`Batch`."""
    first = samples[0]
    out: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in TENSOR_KEYS if k in first}
    out |= {k: [s[k] for s in samples] for k in TEXT_KEYS if k in first}
    out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return out  # type: ignore[return-value]
