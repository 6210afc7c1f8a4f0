"""Text-to-video pipeline in diffusers' shape: encode prompt -> timesteps -> latents -> denoise -> decode.

    pipe = ModelGrowPipeline.from_pretrained("ckpt/modelgrow-pipeline")          # accelerated by default
    out = pipe("a red square moving left", num_frames=16, height=256, width=256, generator=torch.Generator().manual_seed(0))
    out.videos[0]   # uint8 [T, H, W, 3]

A pretrained pipeline directory holds ``transformer/`` (modelgrow pretrained STDiT), ``vae/`` (diffusers
AutoencoderKL), ``text_encoder/`` (T5), optionally ``llm_encoder/`` (a causal LM) and ``recaptioner/`` (an
instruct LM), and ``pipeline.json`` (sampler defaults and encoder settings). Everything loads from local
paths only.

Guidance: a model with the LLM condition uses the paper's two-condition guidance (one forward of 3B
samples: [(t5, llm); (t5, null); (null, null)]); a model without it uses classifier-free guidance on the T5
caption (2B samples). Guidance acts on all latent eps channels; the null conditions are the model's own
null-embedding buffers (or the negative prompt's T5 embedding when one is given).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .accelerate import AcceleratedModel, accelerate
from .diffusion import cfg_model_fn, get_sampler, two_condition_model_fn
from .models import STDiT, from_pretrained, save_pretrained
from .text.prompts import merge_prompt
from .vae import VideoVAE
from .video_io import to_uint8

PIPELINE_CONFIG = "pipeline.json"
DEFAULTS: dict[str, Any] = {
    "sampler": "iddpm",
    "num_inference_steps": 100,
    "guidance_scale": 7.0,
    "llm_guidance_scale": 12.5,
    "prompt_mode": "SL",
    "fps": 8,
    "t5_max_length": 120,
    "llm_max_length": 120,
    "vae_micro_batch_size": 4,
}


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")


def _check_tokenizer(path: Path) -> None:
    """A text component needs its tokenizer files: without them transformers may fall back to a tokenizer that
    maps every word to <unk>, and sampling would 'succeed' unconditioned."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: component directory missing from the pipeline")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                                "tokenizer beside the model (tokenizer.save_pretrained) or re-save the pipeline")


@dataclass
class PipelineOutput:
    videos: list[np.ndarray] | torch.Tensor  # uint8 [T, H, W, 3] per prompt ("np"), or [B, 3, T, H, W] ("pt"/"latent")
    prompts: list[str]  # what the T5 encoder saw (after recaptioning and the prompt mode)
    seed: int | None
    settings: dict[str, Any] = field(default_factory=dict)


class ModelGrowPipeline:
    def __init__(self, transformer, vae: VideoVAE, text_encoder, llm_encoder=None, recaptioner=None,
                 config: dict[str, Any] | None = None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.llm_encoder = llm_encoder
        self.recaptioner = recaptioner
        self.config = {**DEFAULTS, **(config or {})}
        model = self._model
        if hasattr(model, "llm_embedder") and llm_encoder is None:
            raise ValueError("the transformer has an LLM condition: the pipeline needs an llm_encoder")
        if llm_encoder is not None and not hasattr(model, "llm_embedder"):
            raise ValueError("an llm_encoder was given but the transformer has no LLM condition")

    # ------------------------------------------------------------------------------------------------
    @property
    def _model(self) -> STDiT:
        t = self.transformer
        return t.model if isinstance(t, AcceleratedModel) else t

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, accelerate_model: bool = True,
                        compile: bool | None = None) -> ModelGrowPipeline:
        from .text import LLMEncoder, Recaptioner, T5Encoder

        root = Path(path)
        if not (root / PIPELINE_CONFIG).exists():
            raise FileNotFoundError(f"{root / PIPELINE_CONFIG} not found: {root} is not a ModelGrow pipeline directory")
        config = {**DEFAULTS, **json.loads((root / PIPELINE_CONFIG).read_text())}
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for name in ("text_encoder", "llm_encoder", "recaptioner"):
            if name == "text_encoder" or (root / name).exists():
                _check_tokenizer(root / name)
        model = from_pretrained(root / "transformer", device=device)
        transformer = accelerate(model, dtype=dtype, compile=compile) if accelerate_model else model
        vae = VideoVAE.from_pretrained(root / "vae", micro_batch_size=config["vae_micro_batch_size"], device=device)
        t5 = T5Encoder(str(root / "text_encoder"), max_length=config["t5_max_length"], device=device)
        llm = None
        if (root / "llm_encoder").exists():
            llm = LLMEncoder(str(root / "llm_encoder"), max_length=config["llm_max_length"], device=device,
                             layer=config.get("llm_layer", -1), use_template=config.get("llm_use_template", True))
        recap = Recaptioner(str(root / "recaptioner"), device=device) if (root / "recaptioner").exists() else None
        return cls(transformer, vae, t5, llm, recap, config)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        save_pretrained(self._model, root / "transformer")
        self.vae.module.save_pretrained(root / "vae")
        for name, enc in (("text_encoder", self.text_encoder), ("llm_encoder", self.llm_encoder), ("recaptioner", self.recaptioner)):
            if enc is not None:
                enc.model.save_pretrained(root / name)
                enc.tokenizer.save_pretrained(root / name)
        tmp = root / (PIPELINE_CONFIG + ".tmp")
        tmp.write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        tmp.replace(root / PIPELINE_CONFIG)
        return root

    # ------------------------------------------------------------------------------------------------
    def empty_after_cleaning(self, prompts: list[str]) -> list[str]:
        """The prompts the T5 text preprocessing reduces to nothing (e.g. non-Latin text with cleaning on)."""
        pre = getattr(self.text_encoder, "preprocess", None)
        if pre is None:
            return []
        return [p for p, c in zip(prompts, pre(list(prompts))) if not str(c).strip()]

    def check_inputs(self, prompts: list[str], num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of non-empty strings")
        latent = self.vae.get_latent_size((num_frames, height, width))
        if any(p * s != v for p, s, v in zip(self.vae.patch_size, latent, (num_frames, height, width))):
            raise ValueError(f"height and width must be multiples of {self.vae.patch_size[1]}; got {height}x{width}")
        want = tuple(self._model.input_size)
        if latent != want:
            raise ValueError(
                f"{num_frames}x{height}x{width} gives a latent of {latent} but the transformer was built for {want} "
                f"(= {want[0]}x{want[1] * self.vae.patch_size[1]}x{want[2] * self.vae.patch_size[2]} pixels); ask for "
                "that size or rebuild the transformer with another input_size"
            )
        return latent

    def encode_prompt(self, prompts: list[str], negative_prompt: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        """The batched model kwargs for one guided forward: 2B (T5 only) or 3B (T5 + LLM) samples."""
        model, device = self._model, self.device
        B = len(prompts)
        y, mask = self.text_encoder.encode(prompts)
        y, mask = y.to(device), mask.to(device)
        if negative_prompt is None:
            null_y = model.y_embedder.y_embedding[None, None].expand(B, 1, -1, -1).to(y.dtype)
        else:
            neg = [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt)
            null_y = self.text_encoder.encode(neg)[0].to(device)
        if self.llm_encoder is None:
            return {"y": torch.cat([y, null_y]), "mask": mask}
        y_llm, llm_mask = self.llm_encoder.encode(prompts)
        y_llm, llm_mask = y_llm.to(device), llm_mask.to(device)
        null_llm = model.llm_embedder.y_embedding[None, None].expand(B, 1, -1, -1).to(y_llm.dtype)
        ones = torch.ones_like(llm_mask)
        return {
            "y": torch.cat([y, y, null_y]),
            "mask": mask,  # tiled over the three groups by the model
            "y_llm": torch.cat([y_llm, null_llm, null_llm]),
            "llm_mask": torch.cat([llm_mask, ones, ones]),
        }

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        long_prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 16,
        height: int = 256,
        width: int = 256,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        llm_guidance_scale: float | None = None,
        prompt_mode: str | None = None,
        recaption: bool = False,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        progress: bool = True,
    ) -> PipelineOutput:
        cfg = self.config
        shorts = [prompt] if isinstance(prompt, str) else list(prompt)
        latent = self.check_inputs(shorts, num_frames, height, width)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be np, pt or latent; got {output_type!r}")
        steps = cfg["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        sampler = sampler or cfg["sampler"]
        s_t5 = cfg["guidance_scale"] if guidance_scale is None else guidance_scale
        s_llm = cfg["llm_guidance_scale"] if llm_guidance_scale is None else llm_guidance_scale
        for name, v in (("guidance_scale", s_t5), ("llm_guidance_scale", s_llm)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        mode = prompt_mode or cfg["prompt_mode"]

        # 1. prompts (recaptioned into long prompts on request) and their encodings
        longs = [long_prompt] * len(shorts) if isinstance(long_prompt, str) or long_prompt is None else list(long_prompt)
        if recaption:
            if self.recaptioner is None:
                raise ValueError("recaption=True needs a recaptioner component")
            longs = self.recaptioner.recaption(shorts)
        prompts = [merge_prompt(s, lp, mode) for s, lp in zip(shorts, longs)]
        for p in self.empty_after_cleaning(prompts):
            warnings.warn(f"prompt {p!r} is empty after the T5 caption cleaning (which keeps ASCII-ish text only): "
                          "it is sampled as the unconditional (null) caption", stacklevel=2)
        kwargs = self.encode_prompt(prompts, negative_prompt)

        # 2. latents and the guided denoiser
        groups = 3 if self.llm_encoder is not None else 2
        B, device = len(prompts), self.device
        seed = generator.initial_seed() if generator is not None else int(torch.seed() % 2**63)
        g = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(B, self._model.in_channels, *latent, generator=g).to(device)
        model_fn = (two_condition_model_fn(self.transformer, s_t5, s_llm) if groups == 3
                    else cfg_model_fn(self.transformer, s_t5))
        sample = get_sampler(sampler, steps)

        # 3. denoise (IDDPM draws its per-step noise from the global RNG: seeded and isolated here)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            x0 = sample(model_fn, (groups * B, *z.shape[1:]), noise=torch.cat([z] * groups), model_kwargs=kwargs,
                        progress=progress, device=device)[:B]

        if not bool(torch.isfinite(x0).all()):
            raise FloatingPointError(
                f"the sampled latents hold NaN/inf (sampler {sample.sampler_name}, {steps} steps, guidance "
                f"{s_t5}/{s_llm}): no video is produced; check the transformer weights and the guidance scales"
            )

        # 4. decode
        settings = {"sampler": sample.sampler_name, "steps": steps, "guidance_scale": s_t5, "prompt_mode": mode,
                    "num_frames": num_frames, "height": height, "width": width,
                    **({"llm_guidance_scale": s_llm} if groups == 3 else {})}
        if output_type == "latent":
            return PipelineOutput(x0, prompts, seed, settings)
        video = self.vae.decode(x0.to(self.vae.dtype)).float()
        if not bool(torch.isfinite(video).all()):
            raise FloatingPointError("the VAE decoded NaN/inf pixels: no video is produced; check the VAE weights")
        if output_type == "pt":
            return PipelineOutput(video, prompts, seed, settings)
        return PipelineOutput([to_uint8(v) for v in video], prompts, seed, settings)
