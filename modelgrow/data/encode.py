"""The frozen encoders of ``[data]`` (VAE, T5, optional LLM) and the one encode function that turns a raw batch
into a latent batch (:mod:`modelgrow.data.batch`). Training from raw videos, the cache builder and the
validation's held-out manifest all load and run the encoders through here.

Latents are the VAE posterior's *sample* for training from raw videos (Open-Sora's choice) and its *mode* for
everything that must be deterministic (the cache, the held-out set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from .batch import Batch

__all__ = ["Encoders", "load_encoder", "encode_latents", "encode_text", "encode_batch"]

Posterior = Literal["sample", "mode"]


def load_encoder(kind: str, cfg, device: str | torch.device | None, data=None):
    """The ``kind`` encoder (``"vae"``, ``"t5"`` or ``"llm"``) of a config: the local directory ``data.<kind>``
    with the config's settings (T5 tokens = ``model.model_max_length``, LLM tokens = ``grow.llm_max_length``,
    ``data.llm_layer``, ``data.llm_use_template``). ``data``: the resolved ``[data]`` section (default:
    ``cfg.data`` with its unset settings at their defaults)."""
    d = data if data is not None else cfg.data.resolved()
    path = getattr(d, kind)
    if kind == "vae":
        from ..vae import VideoVAE

        return VideoVAE.from_pretrained(path, device=device)
    if kind == "t5":
        from ..text import T5Encoder

        return T5Encoder(str(path), max_length=cfg.model.stdit_kwargs()["model_max_length"], device=device)
    if kind == "llm":
        from ..text import LLMEncoder

        return LLMEncoder(str(path), max_length=cfg.grow.llm_max_length, layer=d.llm_layer,
                          use_template=d.llm_use_template, device=device)
    raise ValueError(f"unknown encoder kind {kind!r}; choose vae, t5 or llm")


@torch.no_grad()
def encode_latents(vae, video: torch.Tensor, posterior: Posterior = "sample") -> torch.Tensor:
    """``[B, 3, T, H, W]`` in [-1, 1] -> float32 scaled latents ``[B, C, T, h, w]`` on the VAE's device."""
    keep = vae.sample_posterior
    vae.sample_posterior = posterior == "sample"
    try:
        device = next(vae.module.parameters()).device
        return vae.encode(video.to(device, vae.dtype)).float()
    finally:
        vae.sample_posterior = keep


@torch.no_grad()
def encode_text(t5, llm, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompts -> ``{"y": [B, 1, L, C], "mask": [B, L]`` [, ``"y_llm"``, ``"llm_mask"``]``}`` on the encoders'
    devices (``llm`` None: no LLM states)."""
    y, mask = t5.encode(list(prompts))
    out = {"y": y, "mask": mask}
    if llm is not None:
        out["y_llm"], out["llm_mask"] = llm.encode(list(prompts))
    return out


def encode_batch(batch: Batch | dict[str, Any], vae, t5, llm=None, posterior: Posterior = "sample") -> Batch:
    """A raw batch (``video`` + ``prompt``) -> the latent batch the model trains on (``latent``, ``y``,
    ``mask`` [, ``y_llm``, ``llm_mask``]; ``caption``, ``prompt`` and ``index`` carried over)."""
    out: dict[str, Any] = {"latent": encode_latents(vae, batch["video"], posterior)}
    out |= encode_text(t5, llm, batch["prompt"])
    out |= {k: batch[k] for k in ("caption", "prompt", "index") if k in batch}
    return out  # type: ignore[return-value]


class Encoders:
    """The frozen VAE, T5 and optional LLM of a run; ``encoders(batch)`` is :func:`encode_batch`."""

    def __init__(self, vae, t5, llm=None):
        self.vae, self.t5, self.llm = vae, t5, llm

    @classmethod
    def from_config(cls, cfg, device: str | torch.device | None, llm: bool, data=None,
                    what: str = "training from raw videos") -> Encoders:
        """``data.vae`` / ``data.t5`` [/ ``data.llm`` when ``llm``] loaded on ``device`` (see :func:`load_encoder`)."""
        d = data if data is not None else cfg.data.resolved()
        if not (d.vae and d.t5):
            raise ValueError(f"{what} needs data.vae and data.t5 (local dirs)"
                             + (", or use data.cache_dir" if what.startswith("training") else ""))
        if llm and not d.llm:
            raise ValueError("the model has an LLM condition: set data.llm (a local causal LM dir)")
        return cls(load_encoder("vae", cfg, device, d), load_encoder("t5", cfg, device, d),
                   load_encoder("llm", cfg, device, d) if llm else None)

    def __call__(self, batch: Batch | dict[str, Any], posterior: Posterior = "sample") -> Batch:
        return encode_batch(batch, self.vae, self.t5, self.llm, posterior)
