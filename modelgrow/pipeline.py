"""Text-to-video pipeline, a ``diffusers.DiffusionPipeline``: encode prompt -> timesteps -> latents -> denoise -> decode.

    pipe = ModelGrowPipeline.from_pretrained("ckpt/modelgrow-pipeline")          # accelerated by default
    pipe = diffusers.DiffusionPipeline.from_pretrained("ckpt/modelgrow-pipeline")  # the same class (import modelgrow first)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # any diffusers scheduler
    pipe.enable_model_cpu_offload()
    out = pipe("a red square moving left", num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    out.videos[0]   # uint8 [T, H, W, 3] ("np"); "pil": lists of PIL frames; "pt": [B, 3, T, H, W]; "latent"

A pipeline directory is diffusers' layout: ``model_index.json`` (components and the sampling defaults),
``transformer/`` (modelgrow pretrained STDiT: ``model.safetensors`` + ``config.json``), ``vae/`` (diffusers
AutoencoderKL), ``text_encoder/`` + ``tokenizer/`` (T5), ``scheduler/``, and optionally ``llm_encoder/`` +
``llm_tokenizer/`` (a causal LM's base model) and ``recaptioner/`` + ``recaptioner_tokenizer/`` (an instruct
LM). Everything loads from local paths only. Directories written before (``pipeline.json``) still load.

Frame count and size default to what the transformer was built for. Guidance: a model with the LLM
condition uses the paper's two-condition guidance (one forward of 3B samples: [(t5, llm); (t5, null);
(null, null)]); a model without it uses classifier-free guidance on the T5 caption (2B samples). Guidance
acts on all latent eps channels; the null conditions are the model's own null-embedding buffers (or the
negative prompt's T5 embedding when one is given).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .accelerate import AcceleratedModel, accelerate
from .config import DATA_DEFAULTS, MODEL_SIZE_FALLBACKS, PIPELINE_NAMES, SAMPLING_DEFAULTS
from .diffusion import cfg_model_fn, two_condition_model_fn
from .diffusion.schedulers import denoise, make_scheduler, scheduler_name
from .models import STDiT
from .text.prompts import merge_prompt
from .vae import VideoVAE
from .video_io import to_uint8

PIPELINE_CONFIG = "pipeline.json"  # the settings file of pipeline directories written before model_index.json
# the sampling defaults (config.SAMPLING_DEFAULTS, the one table, under the pipeline's names) and the encoder settings
DEFAULTS: dict[str, Any] = {
    **{PIPELINE_NAMES[k]: v for k, v in SAMPLING_DEFAULTS.items() if k in PIPELINE_NAMES},
    "t5_max_length": MODEL_SIZE_FALLBACKS["model_max_length"],
    "t5_clean": True,
    "llm_max_length": 120,
    "llm_layer": DATA_DEFAULTS["llm_layer"],
    "llm_use_template": DATA_DEFAULTS["llm_use_template"],
    "vae_micro_batch_size": 4,
}
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")
TOKENIZERS = {"tokenizer": "text_encoder", "llm_tokenizer": "llm_encoder", "recaptioner_tokenizer": "recaptioner"}


def _check_tokenizer(path: Path) -> None:
    """A text component needs its tokenizer files: without them transformers may fall back to a tokenizer that
    maps every word to <unk>, and sampling would 'succeed' unconditioned."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: component directory missing from the pipeline")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                                "tokenizer beside the model (tokenizer.save_pretrained) or re-save the pipeline")


@dataclass
class PipelineOutput(BaseOutput):
    """``videos``: uint8 [T, H, W, 3] per video ("np"), lists of PIL frames ("pil"), [B, 3, T, H, W] in about
    [-1, 1] ("pt") or the latents ("latent"); ``prompts``: what the T5 encoder saw per video (after
    recaptioning and the prompt mode); ``seed``: the generator's initial seed (None without one)."""

    videos: Any
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


class ModelGrowPipeline(DiffusionPipeline):
    """Components: ``transformer`` (STDiT), ``vae`` (AutoencoderKL), ``text_encoder`` + ``tokenizer`` (T5),
    ``scheduler`` (any diffusers scheduler; default :class:`~modelgrow.diffusion.IDDPMScheduler`), optional
    ``llm_encoder`` + ``llm_tokenizer`` and ``recaptioner`` + ``recaptioner_tokenizer``.

    For convenience ``vae`` may be a :class:`~modelgrow.vae.VideoVAE` and ``text_encoder`` / ``llm_encoder`` /
    ``recaptioner`` modelgrow's wrappers (``T5Encoder``, ``LLMEncoder``, ``Recaptioner``): their model and
    tokenizer become the components and their settings the pipeline's. ``defaults`` (saved in
    ``model_index.json``) holds the sampling defaults and encoder settings (:data:`DEFAULTS`); ``config`` is
    the same for older callers and may name a ``sampler`` (iddpm, ddim, dpm-solver, euler)."""

    model_cpu_offload_seq = "recaptioner->text_encoder->llm_encoder->transformer->vae"
    _optional_components = ["tokenizer", "scheduler", "llm_encoder", "llm_tokenizer", "recaptioner", "recaptioner_tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, vae, text_encoder, llm_encoder=None, recaptioner=None, config: dict | None = None,
                 tokenizer=None, scheduler=None, llm_tokenizer=None, recaptioner_tokenizer=None,
                 defaults: dict | None = None):
        super().__init__()
        settings = {**DEFAULTS, **(defaults or {}), **(config or {})}
        sampler = settings.pop("sampler", None)
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown pipeline setting(s) {unknown}; valid: {sorted(DEFAULTS)} (and sampler)")
        from .text import LLMEncoder, Recaptioner, T5Encoder

        if isinstance(transformer, AcceleratedModel):
            denoiser, transformer = transformer, transformer.model
        else:
            denoiser = transformer
        if isinstance(vae, VideoVAE):
            settings["vae_micro_batch_size"] = vae.micro_batch_size
            vae = vae.module
        if isinstance(text_encoder, T5Encoder):
            settings.update(t5_max_length=text_encoder.max_length, t5_clean=text_encoder.clean)
            text_encoder, tokenizer = text_encoder.model, text_encoder.tokenizer
        if isinstance(llm_encoder, LLMEncoder):
            settings.update(llm_max_length=llm_encoder.max_length, llm_layer=llm_encoder.layer,
                            llm_use_template=llm_encoder.use_template)
            llm_encoder, llm_tokenizer = llm_encoder.model, llm_encoder.tokenizer
        if isinstance(recaptioner, Recaptioner):
            recaptioner, recaptioner_tokenizer = recaptioner.model, recaptioner.tokenizer
        if hasattr(transformer, "llm_embedder") and llm_encoder is None:
            raise ValueError("the transformer has an LLM condition: the pipeline needs an llm_encoder")
        if llm_encoder is not None and not hasattr(transformer, "llm_embedder"):
            raise ValueError("an llm_encoder was given but the transformer has no LLM condition")
        if tokenizer is None:
            raise ValueError("the T5 text encoder needs its tokenizer: pass tokenizer=, or a modelgrow T5Encoder")
        if llm_encoder is not None and llm_tokenizer is None:
            raise ValueError("the llm_encoder needs its llm_tokenizer")
        if recaptioner is not None and recaptioner_tokenizer is None:
            raise ValueError("the recaptioner needs its recaptioner_tokenizer")
        pred = getattr(transformer, "prediction_type", "epsilon")
        if scheduler is None:
            scheduler = make_scheduler(sampler or SAMPLING_DEFAULTS["sampler"], prediction_type=pred)
        elif sampler is not None:
            raise ValueError("give a scheduler or a sampler name, not both")
        elif getattr(scheduler.config, "prediction_type", pred) != pred:
            raise ValueError(f"the scheduler expects prediction_type={scheduler.config.prediction_type!r} but the "
                             f"transformer predicts {pred!r}: build it with "
                             f"make_scheduler(name, prediction_type={pred!r}) or from_config(..., prediction_type={pred!r})")
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, llm_encoder=llm_encoder, llm_tokenizer=llm_tokenizer,
                              recaptioner=recaptioner, recaptioner_tokenizer=recaptioner_tokenizer)
        self.register_to_config(defaults=settings)
        self._denoiser = denoiser
        self._wrappers: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        """The sampling defaults and encoder settings (saved in model_index.json)."""
        return {**DEFAULTS, **dict(self.config.get("defaults") or {})}

    @property
    def _model(self) -> STDiT:
        return self.transformer

    @property
    def denoiser(self):
        """What the denoising loop calls: the transformer, or its accelerated wrapper (:meth:`accelerate`)."""
        d = self.__dict__.get("_denoiser")
        return d if d is not None and (d is self.transformer or getattr(d, "model", None) is self.transformer) else self.transformer

    def accelerate(self, dtype: str | torch.dtype | None = None, compile: bool | None = None) -> ModelGrowPipeline:
        """Fused kernels (+ torch.compile on CUDA) for the transformer; see :func:`modelgrow.accelerate`."""
        self._denoiser = accelerate(self.transformer, dtype=dtype, compile=compile)
        return self

    @property
    def video_vae(self) -> VideoVAE:
        w = self._wrappers.get("vae")
        if w is None or w.module is not self.vae:
            w = self._wrappers["vae"] = VideoVAE(self.vae, micro_batch_size=self.settings["vae_micro_batch_size"])
        return w

    def _text(self, name: str):
        """modelgrow's encoder wrapper around the registered model + tokenizer (built once, device refreshed)."""
        from .text import LLMEncoder, Recaptioner, T5Encoder

        model = getattr(self, name)
        if model is None:
            return None
        w = self._wrappers.get(name)
        s = self.settings
        if w is None or w.model is not model:
            if name == "text_encoder":
                w = T5Encoder.from_model(model, self.tokenizer, max_length=s["t5_max_length"], clean=s["t5_clean"])
            elif name == "llm_encoder":
                w = LLMEncoder.from_model(model, self.llm_tokenizer, max_length=s["llm_max_length"], layer=s["llm_layer"],
                                          use_template=s["llm_use_template"])
            else:
                w = Recaptioner.from_model(model, self.recaptioner_tokenizer)
            self._wrappers[name] = w
        w.device = next(model.parameters()).device  # follows .to() / offloading (the hooks move the inputs)
        return w

    @property
    def default_size(self) -> tuple[int, int, int]:
        """(num_frames, height, width) the transformer was built for."""
        t, h, w = self.transformer.input_size
        p = self.video_vae.patch_size
        return t * p[0], h * p[1], w * p[2]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, accelerate_model: bool = True, compile: bool | None = None,
                        **kwargs) -> ModelGrowPipeline:
        """Load a local pipeline directory (diffusers' ``model_index.json`` layout, or an older ``pipeline.json``
        one), move it to ``device`` (default CUDA when available) and, with ``accelerate_model``, switch the
        transformer to the fast path. Other keywords go to ``DiffusionPipeline.from_pretrained``."""
        root = Path(pretrained_model_name_or_path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if (root / "model_index.json").exists():
            index = json.loads((root / "model_index.json").read_text())
            for tok, enc in TOKENIZERS.items():
                if isinstance(index.get(tok), list) and index[tok][0] is not None:
                    _check_tokenizer(root / tok)
                elif isinstance(index.get(enc), list) and index[enc][0] is not None:
                    raise FileNotFoundError(f"{root}: {enc} has no tokenizer ({tok} missing from model_index.json)")
            kwargs.setdefault("local_files_only", True)
            pipe = super().from_pretrained(str(root), **kwargs)
        elif (root / PIPELINE_CONFIG).exists():
            pipe = cls._from_legacy_dir(root)
        else:
            raise FileNotFoundError(f"{root / 'model_index.json'} not found: {root} is not a ModelGrow pipeline directory "
                                    "(build one with `modelgrow pipeline --transformer DIR --vae DIR --t5 DIR --out DIR`)")
        pipe.to(device)
        if accelerate_model:
            pipe.accelerate(dtype=dtype, compile=compile)
        elif dtype is not None:
            pipe.transformer.to(dtype)
            pipe.transformer.dtype = dtype
        return pipe

    @classmethod
    def _from_legacy_dir(cls, root: Path) -> ModelGrowPipeline:
        from .models import from_pretrained
        from .text import LLMEncoder, Recaptioner, T5Encoder

        config = {**DEFAULTS, **json.loads((root / PIPELINE_CONFIG).read_text())}
        for name in ("text_encoder", "llm_encoder", "recaptioner"):
            if name == "text_encoder" or (root / name).exists():
                _check_tokenizer(root / name)
        model = from_pretrained(root / "transformer")
        vae = VideoVAE.from_pretrained(root / "vae", micro_batch_size=config["vae_micro_batch_size"])
        t5 = T5Encoder(str(root / "text_encoder"), max_length=config["t5_max_length"], device="cpu")
        llm = None
        if (root / "llm_encoder").exists():
            llm = LLMEncoder(str(root / "llm_encoder"), max_length=config["llm_max_length"], device="cpu",
                             layer=config.get("llm_layer", -1), use_template=config.get("llm_use_template", True))
        recap = Recaptioner(str(root / "recaptioner"), device="cpu") if (root / "recaptioner").exists() else None
        return cls(model, vae, t5, llm, recap, config={k: v for k, v in config.items() if k in DEFAULTS or k == "sampler"})

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """diffusers' layout (``model_index.json`` + one folder per component), written to a sibling staging
        directory and swapped in whole, so an interrupted save leaves the previous pipeline intact."""
        import shutil
        import tempfile

        from .models.checkpoint import _swap_dirs

        root = Path(save_directory)
        root.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.saving-", dir=root.parent))
        try:
            super().save_pretrained(str(stage), **kwargs)
            _swap_dirs(stage, root)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return root

    # ------------------------------------------------------------------------------------------------
    def empty_after_cleaning(self, prompts: list[str]) -> list[str]:
        """The prompts the T5 text preprocessing reduces to nothing (e.g. non-Latin text with cleaning on)."""
        pre = getattr(self._text("text_encoder"), "preprocess", None)
        if pre is None:
            return []
        return [p for p, c in zip(prompts, pre(list(prompts))) if not str(c).strip()]

    def check_inputs(self, prompts: list[str], num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of non-empty strings")
        vae = self.video_vae
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        latent = vae.get_latent_size((num_frames, height, width))
        if any(p * s != v for p, s, v in zip(vae.patch_size, latent, (num_frames, height, width))):
            raise ValueError(f"height and width must be multiples of {vae.patch_size[1]}; got {height}x{width}")
        want = tuple(self.transformer.input_size)
        if latent != want:
            f, h, w = self.default_size
            raise ValueError(
                f"{num_frames}x{height}x{width} gives a latent of {latent} but the transformer was built for {want} "
                f"(= {f}x{h}x{w} pixels); ask for that size (num_frames={f}, height={h}, width={w}; on the command "
                f"line --sample.num_frames {f} --sample.height {h} --sample.width {w}, or leave them out) or rebuild "
                "the transformer with another input_size"
            )
        return latent

    def encode_prompt(self, prompts: list[str], negative_prompt: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        """The batched model kwargs for one guided forward: 2B (T5 only) or 3B (T5 + LLM) samples."""
        model, device = self.transformer, self._execution_device
        t5 = self._text("text_encoder")
        B = len(prompts)
        y, mask = t5.encode(prompts)
        y, mask = y.to(device), mask.to(device)
        if negative_prompt is None:
            null_y = model.y_embedder.y_embedding.to(device)[None, None].expand(B, 1, -1, -1).to(y.dtype)
        else:
            neg = [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(neg) != B:
                raise ValueError(f"negative_prompt has {len(neg)} entries for {B} prompts")
            null_y = t5.encode(neg)[0].to(device)
        if self.llm_encoder is None:
            return {"y": torch.cat([y, null_y]), "mask": mask}
        y_llm, llm_mask = self._text("llm_encoder").encode(prompts)
        y_llm, llm_mask = y_llm.to(device), llm_mask.to(device)
        null_llm = model.llm_embedder.y_embedding.to(device)[None, None].expand(B, 1, -1, -1).to(y_llm.dtype)
        ones = torch.ones_like(llm_mask)
        return {
            "y": torch.cat([y, y, null_y]),
            "mask": mask,  # tiled over the three groups by the model
            "y_llm": torch.cat([y_llm, null_llm, null_llm]),
            "llm_mask": torch.cat([llm_mask, ones, ones]),
        }

    @property
    def num_timesteps(self) -> int:
        return getattr(self, "_num_timesteps", 0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        long_prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        llm_guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        prompt_mode: str | None = None,
        recaption: bool = False,
        sampler: str | None = None,
        progress: bool = True,
    ) -> PipelineOutput | tuple:
        """Generate videos. Sizes default to the transformer's; ``num_inference_steps``, the guidance scales
        and ``prompt_mode`` to the pipeline's saved defaults. ``generator``: one (it advances: two calls give
        two different videos) or one per video (B x num_videos_per_prompt). ``latents``: the starting noise
        [B x num_videos_per_prompt, C, T, h, w] (scaled by the scheduler's ``init_noise_sigma``).
        ``callback_on_step_end(pipe, i, t, {"latents": ...})`` may return ``{"latents": new}``.
        ``sampler``: use this scheduler name for this call only (default: ``pipe.scheduler``)."""
        cfg = self.settings
        shorts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        f0, h0, w0 = self.default_size
        num_frames, height, width = num_frames or f0, height or h0, width or w0
        latent = self.check_inputs(shorts, num_frames, height, width)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        steps = cfg["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        nv = num_videos_per_prompt
        if isinstance(nv, bool) or not isinstance(nv, (int, np.integer)) or nv < 1:
            raise ValueError(f"num_videos_per_prompt must be an integer >= 1, got {nv!r}")
        s_t5 = cfg["guidance_scale"] if guidance_scale is None else guidance_scale
        s_llm = cfg["llm_guidance_scale"] if llm_guidance_scale is None else llm_guidance_scale
        for name, v in (("guidance_scale", s_t5), ("llm_guidance_scale", s_llm)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs may hold {self._callback_tensor_inputs}, not {sorted(bad)}")
        mode = prompt_mode or cfg["prompt_mode"]
        scheduler = (make_scheduler(sampler, prediction_type=getattr(self.transformer, "prediction_type", "epsilon"))
                     if sampler is not None else self.scheduler)
        n = len(shorts) * nv
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} videos ({len(shorts)} prompts x {nv} per prompt)")

        # 1. prompts (recaptioned into long prompts on request) and their encodings
        longs = [long_prompt] * len(shorts) if isinstance(long_prompt, str) or long_prompt is None else list(long_prompt)
        if len(longs) != len(shorts):
            raise ValueError(f"long_prompt has {len(longs)} entries for {len(shorts)} prompts")
        if recaption:
            if self.recaptioner is None:
                raise ValueError("recaption=True needs a recaptioner component")
            longs = self._text("recaptioner").recaption(shorts)
        prompts = [merge_prompt(s, lp, mode) for s, lp in zip(shorts, longs)]
        for p in self.empty_after_cleaning(prompts):
            warnings.warn(f"prompt {p!r} is empty after the T5 caption cleaning (which keeps ASCII-ish text only): "
                          "it is sampled as the unconditional (null) caption", stacklevel=2)
        prompts = [p for p in prompts for _ in range(nv)]
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negative_prompt = [p for p in negative_prompt for _ in range(nv)]
        kwargs = self.encode_prompt(prompts, negative_prompt)

        # 2. latents and the guided denoiser
        device = self._execution_device
        groups = 3 if self.llm_encoder is not None else 2
        shape = (n, self.transformer.in_channels, *latent)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        model_fn = (two_condition_model_fn(self.denoiser, s_t5, s_llm) if groups == 3
                    else cfg_model_fn(self.denoiser, s_t5))

        callback = None
        if callback_on_step_end is not None:
            def callback(i, t, x):
                out = callback_on_step_end(self, i, t, {k: x for k in callback_on_step_end_tensor_inputs})
                return (out or {}).get("latents")

        # 3. denoise: one batched guided forward per step
        self._num_timesteps = steps
        x0 = denoise(scheduler, model_fn, latents, steps, kwargs, groups=groups, generator=generator,
                     progress=(lambda total: self.progress_bar(total=total)) if progress else False, callback=callback)
        name = scheduler_name(scheduler)
        if not bool(torch.isfinite(x0).all()):
            self.maybe_free_model_hooks()
            raise FloatingPointError(
                f"the sampled latents hold NaN/inf (sampler {name}, {steps} steps, guidance "
                f"{s_t5}/{s_llm}): no video is produced; check the transformer weights and the guidance scales"
            )

        # 4. decode
        seed = None
        if isinstance(generator, torch.Generator):
            seed = generator.initial_seed()
        elif isinstance(generator, list):
            seed = generator[0].initial_seed()
        settings = {"sampler": name, "steps": steps, "guidance_scale": s_t5, "prompt_mode": mode,
                    "num_frames": num_frames, "height": height, "width": width,
                    **({"llm_guidance_scale": s_llm} if groups == 3 else {})}
        if output_type == "latent":
            videos: Any = x0
        else:
            video = self.video_vae.decode(x0.to(self.video_vae.dtype)).float()
            if not bool(torch.isfinite(video).all()):
                self.maybe_free_model_hooks()
                raise FloatingPointError("the VAE decoded NaN/inf pixels: no video is produced; check the VAE weights")
            if output_type == "pt":
                videos = video
            elif output_type == "np":
                videos = [to_uint8(v) for v in video]
            else:
                from PIL import Image

                videos = [[Image.fromarray(frame) for frame in to_uint8(v)] for v in video]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (videos,)
        return PipelineOutput(videos=videos, prompts=prompts, seed=seed, settings=settings)


def _register_with_diffusers() -> None:
    """``diffusers.DiffusionPipeline.from_pretrained(dir)`` finds the class named in ``model_index.json`` in the
    diffusers namespace: make ``ModelGrowPipeline`` resolvable there (no code is stored in the directory)."""
    import diffusers

    if getattr(diffusers, "ModelGrowPipeline", None) is not ModelGrowPipeline:
        setattr(diffusers, "ModelGrowPipeline", ModelGrowPipeline)


_register_with_diffusers()
