"""Feature-based VBench-style dimensions with a local image encoder (``transformers``; nothing is downloaded).

Encoders (``FeatureModel(path)``)
    * a CLIP checkpoint (``config.model_type == "clip"``, e.g. ``openai/clip-vit-base-patch32`` saved locally):
      image features = ``CLIPModel.get_image_features`` (projected), text features = ``get_text_features``;
    * any other vision backbone ``AutoModel`` loads (DINO ``ViTModel``, ``Dinov2Model``, ...): image features =
      the CLS token of ``last_hidden_state`` (after the final layer norm; what DINO's own ``forward`` returns).
    Frames are prepared by the checkpoint's own image processor (``AutoImageProcessor``).

Dimensions (frames ``f_0 .. f_{T-1}``, L2-normalised features ``e_t``, ``c(a, b) = max(0, cos(a, b))``)
    * consistency (VBench ``subject_consistency`` with DINO ViT-B/16, ``background_consistency`` with CLIP
      ViT-B/32): ``mean over t >= 1 of (c(e_{t-1}, e_t) + c(e_0, e_t)) / 2``; over a set of videos the mean over
      all frames t >= 1 of all videos (VBench's per-frame average), per video the mean over its frames.
    * CLIP score (text-video alignment): ``mean_t c(e_t, e_text)`` with CLIP image and text features of the
      prompt (CLIPScore without its 2.5 rescaling).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..text._common import check_local_dir, freeze, load_pretrained, resolve_device

__all__ = ["FeatureModel", "consistency_terms", "consistency", "clip_score_from_features"]


def consistency_terms(features: torch.Tensor) -> torch.Tensor:
    """``[T, D]`` features -> the ``T - 1`` per-frame terms ``(c(e_{t-1}, e_t) + c(e_0, e_t)) / 2``."""
    e = F.normalize(features.double(), dim=-1)
    prev = (e[1:] * e[:-1]).sum(-1).clamp_min(0)
    first = (e[1:] * e[:1]).sum(-1).clamp_min(0)
    return (prev + first) / 2


def consistency(features: torch.Tensor) -> float:
    """Mean of ``consistency_terms`` (1.0 for a single frame)."""
    terms = consistency_terms(features)
    return float(terms.mean()) if len(terms) else 1.0


def clip_score_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """``[T, D]`` frame features and ``[D]`` text features -> ``mean_t max(0, cos)``."""
    e = F.normalize(image_features.double(), dim=-1)
    t = F.normalize(text_features.double().reshape(-1), dim=-1)
    return float((e @ t).clamp_min(0).mean())


class FeatureModel:
    """A local image (and, for CLIP, text) encoder. ``image_features(frames)`` takes uint8 ``[T, H, W, 3]``."""

    def __init__(self, path: str, device: str | torch.device | None = None, batch_size: int = 16) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        self.path = check_local_dir(path, "feature model")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        cfg = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.is_clip = cfg.model_type == "clip"
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "falling back to the PIL image processor" without torchvision
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
            if self.is_clip:
                from transformers import AutoTokenizer, CLIPModel

                self.model = load_pretrained(CLIPModel, self.path, torch.float32)
                self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            else:
                self.model = load_pretrained(AutoModel, self.path, torch.float32)
                self.tokenizer = None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model = freeze(self.model.float()).to(self.device)
        self.name = getattr(cfg, "_name_or_path", "") or self.path

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        """``get_*_features`` returns the projected features (transformers 4) or an output whose
        ``pooler_output`` holds them (transformers 5)."""
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_features(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> float ``[T, D]`` (not normalised)."""
        feats = []
        for b in range(0, len(frames), self.batch_size):
            px = self.processor(images=list(frames[b : b + self.batch_size]), return_tensors="pt")["pixel_values"]
            px = px.to(self.device, torch.float32)
            if self.is_clip:
                f = self._pooled(self.model.get_image_features(pixel_values=px))
            else:
                f = self.model(pixel_values=px).last_hidden_state[:, 0]
            feats.append(f.float().cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """``[N, D]`` CLIP text features (CLIP checkpoints only)."""
        if not self.is_clip:
            raise ValueError(f"{self.path} is not a CLIP model: text features need one (--clip DIR)")
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        f = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                         attention_mask=tok["attention_mask"].to(self.device))
        return self._pooled(f).float().cpu()
