"""Typed run configuration: dataclass sections, TOML files, ``--section.key value`` overrides.

    cfg = load_config("configs/grow.toml", ["--model.depth", "3", "--optim.lr=1e-4"])
    save_config(cfg, run_dir / "config.toml")   # the resolved config, written beside every run

Unknown sections or keys and values of the wrong type are :class:`ConfigError` (a ``ValueError``) naming
the dotted key and, for typos, the closest valid key. Every field has a docstring-like ``help`` entry in
its metadata, printed by ``modelgrow config --help-keys``. Fields that may be unset default to ``None``
(TOML cannot spell ``None``; a saved config simply omits them), so ``load(save(cfg)) == cfg`` always holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_finite(obj: Any, section: str) -> None:
    """Every float (and float in a tuple) of a section is finite: NaN/inf never reach a run."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, float):
                _check(math.isfinite(x), f"{section}.{f.name}", f"must be a finite number, got {x!r}")


MODEL_SIZE_FALLBACKS: dict[str, Any] = {"input_size": (16, 32, 32), "caption_channels": 4096, "model_max_length": 120}
MAX_GROW_RATIO = 16  # growth beyond k = 16 (17x the depth) is a typo, not an experiment


@dataclass
class ModelConfig:
    preset: str = _f("STDiT-XL/2", "model zoo preset giving depth / hidden_size / num_heads / patch_size")
    depth: int | None = _f(None, "number of STDiT blocks (default: the preset's)")
    hidden_size: int | None = _f(None, "transformer width (default: the preset's)")
    num_heads: int | None = _f(None, "attention heads (default: the preset's)")
    patch_size: tuple[int, int, int] | None = _f(None, "(t, h, w) patch size (default: the preset's)")
    input_size: tuple[int, int, int] | None = _f(None, "latent (T, H, W) (default: the preset's, else 16,32,32 = 16 frames at 256x256 after the 8x VAE)")
    in_channels: int = _f(4, "latent channels")
    mlp_ratio: float = _f(4.0, "MLP hidden width / hidden size")
    caption_channels: int | None = _f(None, "T5 hidden size (default: the preset's, else 4096 for T5-v1.1-XXL)")
    model_max_length: int | None = _f(None, "caption tokens, the T5 max length (default: the preset's, else 120)")
    class_dropout_prob: float = _f(0.1, "probability of replacing the T5 caption by the null caption in training")
    pred_sigma: bool = _f(True, "predict the variance too (learned-range IDDPM): out_channels = 2 * in_channels")
    drop_path: float = _f(0.0, "stochastic depth rate of the last block (linear from 0)")
    space_scale: float = _f(0.5, "spatial position-embedding scale (Open-Sora v1.0: 0.5 at 256px, 1.0 at 512px)")
    time_scale: float = _f(1.0, "temporal position-embedding scale")
    temporal_pos: Literal["attention", "tokens"] = _f(
        "attention", "where the temporal position embedding enters: attention = one block's temporal attention "
        "(Open-Sora v1.0), tokens = every token after the patch embedding (as Latte)")
    prediction_type: Literal["epsilon", "v_prediction"] | None = _f(
        None, "what the model predicts: epsilon (Open-Sora v1.0) or v_prediction (v = sqrt(ab) eps - "
        "sqrt(1 - ab) x0; trains the caption at high noise, where eps gets almost no signal). Default: epsilon, "
        "or a pretrained directory's own; set with a pretrained directory, it switches that model's objective "
        "(fine-tuning an eps checkpoint into a v one)")
    from_pretrained: str | None = _f(None, "checkpoint to load: Open-Sora/PixArt .pth, .safetensors or a pretrained dir")

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        from .models.presets import PRESETS

        _check(self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r}; choose from {list(PRESETS)}")
        _check(self.input_size is None or all(v > 0 for v in self.input_size), "model.input_size",
               f"must be positive, got {self.input_size}")
        _check(0.0 <= self.class_dropout_prob < 1.0, "model.class_dropout_prob", "must be in [0, 1)")
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")
        for name in ("mlp_ratio", "space_scale", "time_scale"):
            _check(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("in_channels", "caption_channels", "model_max_length", "depth", "hidden_size", "num_heads"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"model.{name}", f"must be > 0, got {v}")
        _check(self.patch_size is None or all(v > 0 for v in self.patch_size), "model.patch_size",
               f"must be positive, got {self.patch_size}")

    def stdit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`modelgrow.models.STDiT` (preset + explicit fields). The model's dtypes
        are not architecture: training sets them from ``train.param_dtype`` / ``train.compute_dtype``."""
        from .models.presets import PRESETS

        kw = dict(PRESETS[self.preset])
        for name in ("depth", "hidden_size", "num_heads", "patch_size"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        # sizes the preset brings (the tiny presets do) stay unless set explicitly
        for name, fallback in MODEL_SIZE_FALLBACKS.items():
            v = getattr(self, name)
            kw[name] = tuple(v) if isinstance(v, (list, tuple)) else v if v is not None else kw.get(name, fallback)
        kw.update(
            in_channels=self.in_channels,
            mlp_ratio=self.mlp_ratio,
            class_dropout_prob=self.class_dropout_prob,
            pred_sigma=self.pred_sigma,
            drop_path=self.drop_path,
            space_scale=self.space_scale,
            time_scale=self.time_scale,
            temporal_pos=self.temporal_pos,
            prediction_type=self.prediction_type or "epsilon",
        )
        return kw


@dataclass
class GrowConfig:
    strategy: Literal["none", "insert", "prefix", "suffix"] = _f("none", "block expansion strategy (none = no expansion)")
    ratio: float = _f(1.0, "expansion ratio k = new blocks / original blocks (insert: k = x/y in lowest terms)")
    num_new: int | None = _f(None, "number of new blocks P = k * N instead of ratio (prefix/suffix/insert)")
    llm: bool = _f(False, "add the gated LLM cross-attention to every block")
    llm_channels: int = _f(4096, "hidden size of the LLM whose states condition the model (Llama-3-8B: 4096)")
    llm_max_length: int = _f(120, "LLM condition tokens (user-prompt tokens after template cropping)")
    copy_t5_to_llm: bool = _f(True, "initialise the LLM cross-attention from the T5 one (False: the 'w/o duplication' ablation)")
    per_head_gate: bool = _f(False, "one tanh gate per head instead of one per block")
    train_new_only: bool = _f(False, "freeze the original blocks (LLaMA-Pro style); the paper trains everything")

    def __post_init__(self) -> None:
        _check_finite(self, "grow")
        _check(self.strategy in ("none", "insert", "prefix", "suffix"), "grow.strategy", f"unknown strategy {self.strategy!r}")
        _check(0 < self.ratio <= MAX_GROW_RATIO, "grow.ratio", f"must be in (0, {MAX_GROW_RATIO}], got {self.ratio}")
        _check(self.num_new is None or self.num_new > 0, "grow.num_new", f"must be > 0, got {self.num_new}")
        _check(self.llm_channels > 0 and self.llm_max_length > 0, "grow", "llm_channels and llm_max_length must be > 0")


# [data] settings left unset (None) take these values when raw videos are read (training from data.manifest,
# `modelgrow cache`); training from a cache (data.cache_dir) takes the cache's instead (CACHE_FIXED below).
DATA_DEFAULTS: dict[str, Any] = {"num_frames": 16, "frame_interval": 3, "image_size": (256, 256), "prompt_mode": "SL",
                                 "decoder": "auto", "llm_layer": -1, "llm_use_template": True}
RAW_VIDEO_WORKERS = 4  # data.num_workers unset: decode workers per rank for raw-video training (0 for caches)
_FROM_CACHE = "unset: the cache's with data.cache_dir, else {}"


@dataclass
class DataConfig:
    manifest: str | None = _f(None, "CSV or Parquet with path, caption [, long_caption, num_frames, fps, height, width]; "
                                    "with data.cache_dir it must be the manifest the cache was built from (or unset)")
    cache_dir: str | None = _f(None, "pre-encoded latent/text cache (modelgrow cache); used instead of raw videos when "
                                     "set (its settings fix num_frames, frame_interval, image_size, prompt_mode, "
                                     "decoder, llm_layer, llm_use_template: leave them unset or equal to the cache's)")
    num_frames: int | None = _f(None, "frames per clip (" + _FROM_CACHE.format(16) + ")")
    frame_interval: int | None = _f(None, "stride between sampled frames (" + _FROM_CACHE.format(3) + ")")
    image_size: tuple[int, int] | None = _f(None, "training (height, width) (" + _FROM_CACHE.format("256, 256") + ")")
    hflip: bool = _f(False, "random horizontal flip (raw videos only: a cache holds unflipped clips)")
    decoder: Literal["auto", "dali", "dali-cpu", "pyav"] | None = _f(
        None, "video decoder (" + _FROM_CACHE.format("auto") + ")")
    num_workers: int | None = _f(None, f"decode / read workers per rank (unset: {RAW_VIDEO_WORKERS} for raw videos, 0 "
                                       "for modelgrow cache and for reading a cache)")
    prompt_mode: Literal["S", "L", "SL"] | None = _f(
        None, "S = short caption, L = long caption, SL = short + long (" + _FROM_CACHE.format("SL") + ")")
    max_fail_fraction: float = _f(0.01, "stop when more than this fraction of videos fails to decode (or of cache "
                                        "samples fails to read)")
    image_batch_prob: float | None = _f(None, "joint image + video training: the probability that a batch is an image "
                                        "batch (images are single-frame samples, T = 1, batched apart from videos "
                                        "by shape); None = off, images become repeated-frame clips")
    vae: str | None = _f(None, "local diffusers AutoencoderKL dir (sd-vae-ft-ema layout) for raw-video training and caching")
    t5: str | None = _f(None, "local T5 encoder dir (T5EncoderModel + tokenizer)")
    llm: str | None = _f(None, "local causal-LM dir for the LLM condition")
    llm_layer: int | None = _f(None, "which hidden state of the LLM conditions the model (" + _FROM_CACHE.format(
        "-1 = last layer") + ")")
    llm_use_template: bool | None = _f(None, "wrap prompts in the LLM's chat template (false: the paper's 'w/o "
                                              "template' ablation) (" + _FROM_CACHE.format("true") + ")")
    val_cache_dir: str | None = _f(None, "held-out latent/text cache (modelgrow cache) for the validation of train.val_every; "
                                   "used instead of data.val_manifest when set")
    val_manifest: str | None = _f(None, "held-out CSV/Parquet manifest for the validation (raw videos, encoded once by "
                                  "data.vae / t5 / llm: the centre clip, the VAE posterior mode)")

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        for name in ("num_frames", "frame_interval"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"data.{name}", f"must be > 0, got {v}")
        _check(self.image_size is None or all(v > 0 for v in self.image_size), "data.image_size",
               f"must be positive, got {self.image_size}")
        _check(self.decoder in (None, "auto", "dali", "dali-cpu", "pyav"), "data.decoder", f"unknown decoder {self.decoder!r}")
        _check(self.prompt_mode in (None, "S", "L", "SL"), "data.prompt_mode", f"must be S, L or SL, got {self.prompt_mode!r}")
        _check(self.num_workers is None or self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(0.0 <= self.max_fail_fraction <= 1.0, "data.max_fail_fraction", "must be in [0, 1]")
        _check(self.image_batch_prob is None or 0.0 <= self.image_batch_prob <= 1.0, "data.image_batch_prob",
               f"must be in [0, 1] (or none = off), got {self.image_batch_prob}")

    def resolved(self, fixed: dict[str, Any] | None = None) -> DataConfig:
        """A copy with every unset setting of :data:`DATA_DEFAULTS` filled: from ``fixed`` (what a cache was
        built with, ``CachedDataset.fixed_settings()``) where it has the key, else the raw-video default. Set
        settings are kept (training from a cache checks them against the cache). ``num_workers`` stays as set:
        its default depends on the reader."""
        fixed = fixed or {}
        fill = {k: (fixed[k] if fixed.get(k) is not None else v) for k, v in DATA_DEFAULTS.items()
                if getattr(self, k) is None}
        if "image_size" in fill:
            fill["image_size"] = tuple(fill["image_size"])
        return dataclasses.replace(self, **fill)


@dataclass
class OptimConfig:
    lr: float = _f(2e-5, "AdamW learning rate (Open-Sora v1.0: 2e-5)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 = off)")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    decay_steps: int = _f(0, "cosine learning-rate decay to min_lr_ratio * lr over this many steps after the "
                             "warm-up, then constant (0 = no decay: constant after the warm-up)")
    min_lr_ratio: float = _f(0.0, "final learning rate of the cosine decay, as a fraction of lr")
    fused: bool = _f(True, "use the fused AdamW implementation where available")

    def __post_init__(self) -> None:
        _check_finite(self, "optim")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0, "optim", "weight_decay, grad_clip and warmup_steps must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {self.decay_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    mode: Literal["vanilla", "lora", "expand"] = _f("vanilla", "what is trained: all parameters, LoRA adapters, or a grown model")
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(1, "samples per rank per step")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(42, "global seed (per-rank streams derive from it)")
    ema_decay: float = _f(0.9999, "EMA decay (fp32 EMA weights); with ema_warmup the largest decay the warm-up reaches")
    ema_warmup: bool = _f(False, "EMA decay warm-up as diffusers' EMAModel(use_ema_warmup=True): at optimizer step n the "
                                 "decay is 1 - (1 + (n - 1) / ema_inv_gamma) ** -ema_power clipped to [ema_min_decay, "
                                 "ema_decay] (step 1 copies the weights); false: the fixed ema_decay from step 1")
    ema_inv_gamma: float = _f(1.0, "EMA warm-up: inverse multiplicative factor of the step (diffusers' inv_gamma)")
    ema_power: float = _f(2 / 3, "EMA warm-up exponent: 2/3 reaches 0.999 at 31.6K steps and 0.9999 at 1M (long runs), "
                                 "3/4 reaches 0.999 at 10K and 0.9999 at 215K (diffusers' guidance)")
    ema_min_decay: float = _f(0.0, "EMA warm-up: the smallest decay after the first step (diffusers' min_decay)")
    timestep_sampling: Literal["uniform", "logit_normal"] = _f(
        "uniform", "how the diffusion timestep of a training sample is drawn: uniform over the 1000 steps "
        "(Open-Sora v1.0) or logit-normal, t = 1000 * sigmoid(timestep_mean + timestep_std * n) (SD3), which "
        "spends more steps on the mid-noise levels where a clip's layout and motion are decided")
    timestep_mean: float = _f(0.0, "logit-normal timestep sampling: mean of the logit (> 0: noisier timesteps)")
    timestep_std: float = _f(1.0, "logit-normal timestep sampling: standard deviation of the logit")
    high_noise_share: float = _f(0.0, "fraction of training samples whose timestep is drawn uniformly from "
                                      "[high_noise_from, 1000) instead (0: off, Open-Sora v1.0); with v_prediction it "
                                      "teaches the caption where x_t no longer shows the clip (the motion's direction)")
    high_noise_from: int = _f(800, "lowest timestep of the high-noise share")
    snr_gamma: float = _f(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma): the MSE term of "
                               "a sample at timestep t is weighted min(SNR(t), gamma) / SNR(t) (eps), / (SNR(t) + 1) "
                               "(v) or / 1 (x0), i.e. min(SNR, gamma) on the x0 error; the learned-variance term and "
                               "the logged held-out losses are unweighted. 0: off (Open-Sora v1.0); 5 is the paper's")
    snr_gamma_mode: Literal["x0", "cap"] = _f(
        "x0", "with snr_gamma > 0: x0 = the paper's weighting above; cap = only the low-noise end is down-weighted, "
        "the model's own MSE times min(1, gamma / SNR(t)): the same as x0 for eps, but for v it keeps v's full weight "
        "where SNR <= gamma (x0 gives the high-noise end, where a clip's motion is decided, almost no weight)")
    noise_offset: float = _f(0.0, "offset noise (diffusers' --noise_offset): each training sample's noise gets "
                                  "noise_offset * N(0, 1) per latent channel, constant over frames and pixels, so the "
                                  "model learns to move a clip's mean colour. 0: off (Open-Sora v1.0)")
    param_dtype: Literal["float32", "bfloat16"] = _f(
        "float32", "dtype the trained weights, their gradients and the optimizer state are kept in (the EMA is fp32 "
        "either way): float32 (master weights, the default) or bfloat16 (pure-bf16 training: half the memory; needs "
        "compute_dtype = bfloat16). Replaces model.dtype")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "bfloat16", "dtype of the forward and backward math: torch.autocast in one process, FSDP2's "
        "MixedPrecisionPolicy(param_dtype) when sharded (with the model's inputs cast to it); float16 needs CUDA. "
        "Replaces train.mixed_precision and parallel.param_dtype")
    t5_drop: float = _f(0.1, "P(T5 caption -> null), Open-Sora's rate")
    llm_drop: float = _f(0.01, "P(LLM condition alone -> null), the paper's rate")
    both_drop: float = _f(0.001, "P(both conditions -> null), the paper's rate")
    lora_rank: int = _f(16, "LoRA rank (mode = lora)")
    log_every: int = _f(10, "print a step line every N steps")
    output_dir: str = _f("runs/train", "where checkpoints, logs and the resolved config go")
    val_every: int = _f(0, "validate every N steps and at the last step (0 = off): the held-out denoising loss of "
                           "data.val_cache_dir / data.val_manifest (mean IDDPM loss at 8 fixed timesteps with fixed "
                           "noise: comparable across steps and runs) and train.val_samples sampled clips")
    val_batches: int = _f(1, "held-out clips in the validation loss: the first val_batches * batch_size of the set")
    val_samples: int = _f(0, "clips sampled at each validation from the first held-out prompts (0 = none), with the "
                             "[sample] sampler, steps, guidance and seed, decoded by data.vae; mp4 + keyframe png "
                             "under output_dir/val/step_N, TensorBoard and W&B")
    val_weights: Literal["ema", "model", "both"] = _f("ema", "weights validated: the EMA, the trained weights or both "
                                                             "(samples: the EMA's unless model)")
    wandb: Literal["off", "online", "offline"] = _f("off", "Weights & Biases logging (pip install 'modelgrow[wandb]'): "
                                                    "offline writes the run under output_dir/wandb without network "
                                                    "(upload later with `wandb sync`)")
    wandb_project: str = _f("modelgrow", "W&B project")
    run_name: str | None = _f(None, "run name (W&B); default: the name of output_dir")

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        _check(self.mode in ("vanilla", "lora", "expand"), "train.mode", f"unknown mode {self.mode!r}")
        _check(self.steps > 0 and self.batch_size > 0 and self.grad_accum > 0, "train", "steps, batch_size and grad_accum must be > 0")
        _check(0.0 < self.ema_decay <= 1.0, "train.ema_decay", "must be in (0, 1]")
        _check(self.param_dtype in ("float32", "bfloat16"), "train.param_dtype", f"unknown {self.param_dtype!r}")
        _check(self.compute_dtype in ("float32", "bfloat16", "float16"), "train.compute_dtype",
               f"unknown {self.compute_dtype!r}")
        _check(self.param_dtype == "float32" or self.compute_dtype == self.param_dtype, "train.compute_dtype",
               f"must be {self.param_dtype} with train.param_dtype = {self.param_dtype} (the math cannot run wider "
               f"than the weights it reads), got {self.compute_dtype}")
        for name in ("t5_drop", "llm_drop", "both_drop"):
            _check(0.0 <= getattr(self, name) < 1.0, f"train.{name}", "must be in [0, 1)")
        _check(self.lora_rank > 0 and self.log_every > 0, "train", "lora_rank and log_every must be > 0")
        _check(self.timestep_sampling in ("uniform", "logit_normal"), "train.timestep_sampling",
               f"unknown {self.timestep_sampling!r}; choose uniform or logit_normal")
        _check(self.timestep_std > 0, "train.timestep_std", f"must be > 0, got {self.timestep_std}")
        _check(0.0 <= self.high_noise_share <= 1.0, "train.high_noise_share", f"must be in [0, 1], got {self.high_noise_share}")
        _check(0 <= self.high_noise_from < 1000, "train.high_noise_from", f"must be in [0, 1000), got {self.high_noise_from}")
        _check(self.snr_gamma >= 0, "train.snr_gamma", f"must be >= 0 (0: off), got {self.snr_gamma}")
        _check(self.snr_gamma_mode in ("x0", "cap"), "train.snr_gamma_mode",
               f"unknown {self.snr_gamma_mode!r}; choose x0 or cap")
        _check(self.noise_offset >= 0, "train.noise_offset", f"must be >= 0 (0: off), got {self.noise_offset}")
        _check(self.ema_inv_gamma > 0, "train.ema_inv_gamma", f"must be > 0, got {self.ema_inv_gamma}")
        _check(self.ema_power > 0, "train.ema_power", f"must be > 0, got {self.ema_power}")
        _check(0.0 <= self.ema_min_decay <= self.ema_decay, "train.ema_min_decay",
               f"must be in [0, train.ema_decay = {self.ema_decay}], got {self.ema_min_decay}")
        _check(self.val_every >= 0 and self.val_samples >= 0, "train", "val_every and val_samples must be >= 0")
        _check(self.val_batches > 0, "train.val_batches", f"must be > 0, got {self.val_batches}")
        _check(self.val_weights in ("ema", "model", "both"), "train.val_weights", f"unknown {self.val_weights!r}")
        _check(self.wandb in ("off", "online", "offline"), "train.wandb",
               f"must be off, online or offline, got {self.wandb!r}")


@dataclass
class ParallelConfig:
    activation_checkpointing: str = _f("none", "none | full | every-N (checkpoint every N-th block)")
    compile: bool = _f(False, "torch.compile each block")
    fsdp: bool = _f(True, "FSDP2 fully_shard per block and root when world size > 1")
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)")
    reduce_dtype: Literal["float32", "bfloat16"] = _f("float32", "FSDP2 MixedPrecisionPolicy gradient-reduce dtype "
                                                                 "(the compute dtype is train.compute_dtype)")

    def __post_init__(self) -> None:
        _check_finite(self, "parallel")
        ac = self.activation_checkpointing
        ok = ac in ("none", "full") or (ac.startswith("every-") and ac[6:].isdigit() and int(ac[6:]) > 0)
        _check(ok, "parallel.activation_checkpointing", f"must be none, full or every-N (N > 0), got {ac!r}")
        _check(self.reduce_dtype in ("float32", "bfloat16"), "parallel.reduce_dtype", f"unknown {self.reduce_dtype!r}")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(1000, "write a resumable checkpoint every N steps")
    keep_last: int = _f(3, "resumable checkpoints kept (older ones are deleted)")
    resume: bool = _f(True, "resume from the newest checkpoint in train.output_dir when there is one")
    load_weights: str | None = _f(None, "weights-only start for continual pre-training (model only, no optimizer/step)")
    strict: bool = _f(True, "a weights file whose keys do not fit is an error")
    overwrite: bool = _f(False, "with resume = false: delete the checkpoints already in train.output_dir and start over "
                                "(without it, resume = false on a run directory that has checkpoints is an error)")

    def __post_init__(self) -> None:
        _check_finite(self, "checkpoint")
        _check(self.every_steps > 0 and self.keep_last > 0, "checkpoint", "every_steps and keep_last must be > 0")


# The one table of sampling defaults: [sample] (modelgrow sample, the training's validation samples), the defaults
# a pipeline directory is saved with (modelgrow pipeline, ModelGrowPipeline: PIPELINE_NAMES gives their names there).
SAMPLING_DEFAULTS: dict[str, Any] = {"sampler": "iddpm", "num_sampling_steps": 100, "cfg_scale_t5": 7.0,
                                     "cfg_scale_llm": 12.5, "prompt_mode": "SL", "fps": 8}
# [sample] key -> the name of the same setting among a pipeline's saved defaults / call arguments
PIPELINE_NAMES: dict[str, str] = {"num_sampling_steps": "num_inference_steps", "cfg_scale_t5": "guidance_scale",
                                  "cfg_scale_llm": "llm_guidance_scale", "prompt_mode": "prompt_mode", "fps": "fps"}


@dataclass
class SampleConfig:
    sampler: Literal["iddpm", "ddim", "dpm-solver", "euler"] = _f(SAMPLING_DEFAULTS["sampler"], "sampler")
    num_sampling_steps: int = _f(SAMPLING_DEFAULTS["num_sampling_steps"], "denoising steps")
    cfg_scale_t5: float = _f(SAMPLING_DEFAULTS["cfg_scale_t5"], "guidance scale of the T5 condition")
    cfg_scale_llm: float = _f(SAMPLING_DEFAULTS["cfg_scale_llm"], "guidance scale of the LLM condition")
    prompt_mode: Literal["S", "L", "SL"] = _f(SAMPLING_DEFAULTS["prompt_mode"], "which prompt the model sees")
    num_frames: int | None = _f(None, "frames to generate (default: what the transformer was built for)")
    height: int | None = _f(None, "pixels (default: what the transformer was built for)")
    width: int | None = _f(None, "pixels (default: what the transformer was built for)")
    fps: int = _f(SAMPLING_DEFAULTS["fps"], "frame rate of the written video")
    seed: int = _f(0, "sampling seed (recorded beside every video)")
    batch_size: int = _f(1, "prompts per forward")

    def __post_init__(self) -> None:
        _check_finite(self, "sample")
        _check(self.sampler in ("iddpm", "ddim", "dpm-solver", "euler"), "sample.sampler", f"unknown sampler {self.sampler!r}")
        _check(self.num_sampling_steps > 0 and self.batch_size > 0, "sample", "num_sampling_steps and batch_size must be > 0")
        _check(self.prompt_mode in ("S", "L", "SL"), "sample.prompt_mode", f"must be S, L or SL, got {self.prompt_mode!r}")
        sizes = [v for v in (self.num_frames, self.height, self.width) if v is not None]
        _check(min([*sizes, self.fps]) > 0, "sample", "num_frames, height, width, fps must be > 0")


@dataclass
class CacheConfig:
    batch_size: int = _f(8, "modelgrow cache: clips per VAE / text-encoder call")
    shard_size: int = _f(256, "modelgrow cache: manifest rows per safetensors shard")
    latent_dtype: Literal["float32", "float16", "bfloat16"] = _f("float32", "modelgrow cache: storage dtype of the latents")
    text_dtype: Literal["float32", "float16", "bfloat16"] = _f("float32", "modelgrow cache: storage dtype of the text "
                                                                         "states")
    single_frame_images: bool = _f(False, "modelgrow cache: store image rows as one-frame latents (joint image + video "
                                          "training; implied by data.image_batch_prob)")

    def __post_init__(self) -> None:
        _check(self.batch_size > 0 and self.shard_size > 0, "cache", "batch_size and shard_size must be > 0")


@dataclass
class RecaptionConfig:
    model: str | None = _f(None, "modelgrow recaption: local instruct-LLM dir (rewrite short prompts)")
    vlm: str | None = _f(None, "modelgrow recaption --videos: local vision-language model dir (caption the videos)")
    batch_size: int | None = _f(None, "prompts / videos per generate call (default: 8 prompts, 4 videos)")
    min_words: int = _f(35, "fewest words of a long caption (shorter ones are retried, then flagged too_short)")
    max_words: int | None = _f(None, "most words of a long caption (default: 128 for prompts, the paper's; 200 for videos)")
    max_new_tokens: int | None = _f(None, "generated tokens per caption (default: 256 for prompts, 320 for videos)")
    retries: int = _f(2, "sampled regenerations of too-short outputs")
    sample: bool = _f(False, "prompts: sample the first pass too (default greedy)")
    temperature: float = _f(0.7, "prompts: sampling temperature")
    top_p: float = _f(0.9, "prompts: nucleus sampling mass")
    seed: int = _f(0, "generation seed")
    dtype: Literal["float32", "bfloat16", "float16"] | None = _f(None, "model dtype (default: bf16 on CUDA, fp32 on CPU)")
    prompt_mode: Literal["S", "L", "SL"] = _f("SL", "prompts file: what is written per prompt, S, L or SL = short + long")
    caption_col: str = _f("caption", "--csv: the column with the short caption")
    out_col: str = _f("long_caption", "--csv / --videos: the column added (with <out_col>_status)")
    num_frames: int = _f(8, "--videos: evenly spaced frames per video")
    frames_as: Literal["auto", "images", "video"] = _f("auto", "--videos: how frames reach the VLM")
    instruction: str | None = _f(None, "instruction (default: the paper's, for prompts / for videos)")

    def __post_init__(self) -> None:
        _check_finite(self, "recaption")
        for name in ("batch_size", "max_words", "max_new_tokens"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"recaption.{name}", f"must be > 0, got {v}")
        _check(self.min_words > 0 and self.num_frames > 0, "recaption", "min_words and num_frames must be > 0")
        _check(self.retries >= 0, "recaption.retries", f"must be >= 0, got {self.retries}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]

# Keys that were replaced (still read, with a FutureWarning naming the new key): dotted key -> (type, new key, value map).
# The three dtype keys of before (model.dtype, train.mixed_precision, parallel.param_dtype) became the pair
# train.param_dtype / train.compute_dtype; of the old keys set together, train.mixed_precision wins.
LEGACY_KEYS: dict[str, tuple[Any, str, dict[str, str]]] = {
    "train.mixed_precision": (Literal["bf16", "fp16", "fp32"], "train.compute_dtype",
                              {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}),
    "parallel.param_dtype": (Literal["bfloat16", "float32"], "train.compute_dtype", {}),
    "model.dtype": (Literal["float32", "bfloat16", "float16", "float64"], "train.compute_dtype", {}),
}
_LEGACY_ORDER = ("train.mixed_precision", "parallel.param_dtype", "model.dtype")  # precedence


# --------------------------------------------------------------------------------------------------------
# typing helpers
# --------------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(tp)):
            return True, args[0]
    return False, tp


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check/convert a TOML value (already typed) to the field type; raise ConfigError naming ``key``."""
    optional, tp = _optional_inner(tp)
    if value is None:
        _check(optional, key, "may not be empty")
        return None
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        _check(isinstance(value, (list, tuple)), key, f"expected a list of {len(args)} values, got {value!r}")
        _check(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(key, a, v) for a, v in zip(args, value, strict=True))
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        _check(math.isfinite(float(value)), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover - schema bug


def _parse_cli_value(key: str, tp: Any, text: str) -> Any:
    """Parse an override string by the field type (bool words, numbers, comma lists, 'none')."""
    optional, inner = _optional_inner(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    origin = get_origin(inner)
    if origin is tuple:
        parts = [p.strip() for p in text.strip().strip("[]()").split(",") if p.strip()]
        args = get_args(inner)
        _check(len(parts) == len(args), key, f"expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_cli_value(key, a, p) for a, p in zip(args, parts, strict=True))
    if inner is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if inner is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if inner is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return text


def _unknown(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def _upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the replaced keys of :data:`LEGACY_KEYS` turned into their new keys (a FutureWarning each)."""
    import warnings

    def given(dotted: str) -> bool:
        section, key = dotted.split(".")
        return isinstance(data.get(section), dict) and key in data[section]

    if not any(given(k) for k in _LEGACY_ORDER):
        return data
    data = {sec: dict(v) if isinstance(v, dict) else v for sec, v in data.items()}
    given_new = {new: data[new.split(".")[0]][new.split(".")[1]] for _, new, _ in LEGACY_KEYS.values() if given(new)}
    chosen: dict[str, tuple[str, Any]] = {}  # new key -> (the old key that set it, value)
    for dotted in [k for k in _LEGACY_ORDER if given(k)]:
        section, key = dotted.split(".")
        tp, new_key, mapping = LEGACY_KEYS[dotted]
        value = _coerce(dotted, tp, data[section].pop(key))
        if not data[section]:
            del data[section]
        new_value = mapping.get(value, value)
        new_section, new_name = new_key.split(".")

        def warn(note: str, dotted=dotted, value=value, new_key=new_key) -> None:
            warnings.warn(f"{dotted} = {value!r} is deprecated{note}; set {new_key} instead", FutureWarning, stacklevel=5)

        if dotted == "model.dtype" and value == "float32":  # the old default input cast: no effect under autocast
            warn(" and ignored (the model computes in train.compute_dtype, its weights are in train.param_dtype)")
            continue
        if dotted == "model.dtype" and value == "float64":
            raise ConfigError("model.dtype = 'float64' is no longer a setting: the model computes in train.compute_dtype "
                              "(float32, bfloat16 or float16) with weights in train.param_dtype; remove model.dtype")
        explicit = given_new.get(new_key)  # the new key, set beside the old one
        if explicit is not None and explicit != new_value:
            raise ConfigError(f"{dotted} = {value!r} (deprecated: it means {new_key} = {new_value!r}) conflicts with "
                              f"{new_key} = {explicit!r}; remove {dotted}")
        if new_key in chosen and chosen[new_key][1] != new_value:
            warn(f" and ignored: {chosen[new_key][0]} sets {new_key} = {chosen[new_key][1]!r}")
            continue
        warn(f": it means {new_key} = {new_value!r}")
        if explicit is None:
            data.setdefault(new_section, {})[new_name] = new_value
        chosen.setdefault(new_key, (dotted, new_value))
    return data


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested ``{section: {key: value}}`` (TOML-typed values) on top of ``base``; replaced
    keys (:data:`LEGACY_KEYS`) are read as their new keys with a FutureWarning."""
    base = base or Config()
    data = _upgrade_legacy(data)
    raw = {name: dataclasses.asdict(getattr(base, name)) for name in SECTIONS}
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a [{section}] table, got {values!r}")
        hints = _hints(SECTIONS[section])
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"{section}.{key}", [f"{section}.{k}" for k in hints])
            raw[section][key] = _coerce(f"{section}.{key}", hints[key], value)
    return _build(raw)


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**raw[name])
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # pragma: no cover - defensive
            raise ConfigError(f"{name}: {e}") from None
    return Config(**sections)


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """``["--model.depth", "3", "--optim.lr=1e-4"]`` -> ``{"model": {"depth": 3}, "optim": {"lr": 1e-4}}``."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"expected an override --section.key VALUE, got {arg!r}")
        if "=" in arg:
            dotted, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg[2:]}: missing value")
            nxt = args[i + 1]
            if nxt.startswith("--") and "." in nxt.split("=", 1)[0]:
                raise ConfigError(f"{arg[2:]}: missing value (the next argument {nxt!r} is another override); "
                                  f"write {arg}=VALUE for a value that starts with --")
            dotted, text = arg[2:], nxt
            i += 2
        section, _, key = dotted.partition(".")
        if dotted in LEGACY_KEYS:  # read as given; config_from_dict turns it into the new key
            out.setdefault(section, {})[key] = _parse_cli_value(dotted, LEGACY_KEYS[dotted][0], text)
            continue
        if section not in SECTIONS:
            raise _unknown(dotted, _all_keys())
        hints = _hints(SECTIONS[section])
        if key not in hints:
            raise _unknown(dotted, _all_keys())
        out.setdefault(section, {})[key] = _parse_cli_value(dotted, hints[key], text)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- TOML file (if given) <- ``--section.key value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e}); TOML files must be UTF-8, re-save it as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        cfg = config_from_dict(parse_overrides(overrides), base=cfg)
    return cfg


def config_to_dict(cfg: Config, keep_none: bool = False) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        sec = dataclasses.asdict(getattr(cfg, name))
        out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sec.items() if keep_none or v is not None}
    return out


def dumps_config(cfg: Config) -> str:
    import tomli_w  # only for writing: a machine without it can still load and run configs

    return tomli_w.dumps(config_to_dict(cfg))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as TOML (atomically); ``load_config(path)`` gives ``cfg`` back."""
    from .fileio import atomic_output

    path = Path(path)
    text = "# resolved modelgrow config\n" + dumps_config(cfg)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def describe_keys() -> str:
    """One line per key: dotted name, type, default, help."""
    lines = []
    for sname, cls in SECTIONS.items():
        hints = _hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            tp = str(hints[f.name]).replace("typing.", "")
            lines.append(f"{sname}.{f.name:<24} {tp:<40} default={default!r:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def translate_legacy_flags(argv: list[str], table: dict[str, Any], prog: str,
                           transforms: dict[str, Any] | None = None, dropped: dict[str, str] | None = None) -> list[str]:
    """A command's flags of before the typed config -> ``--section.key value`` overrides, with a FutureWarning
    naming the new key. ``table``: flag -> dotted key (the flag takes a value), ``(dotted key, value)`` (a flag
    without a value) or None (a flag whose setting no longer exists: dropped with its value, ``dropped`` says
    why). ``transforms``: flag -> function applied to its value."""
    import warnings

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=")
        if flag not in table:
            out.append(arg)
            i += 1
            continue
        target = table[flag]
        if isinstance(target, tuple):
            key, value = target
            i += 1
        else:
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise ConfigError(f"{prog}: {flag} needs a value")
            key = target
            value = (transforms or {}).get(flag, lambda v: v)(value)
        if key is None:
            warnings.warn(f"{prog}: {flag} is deprecated and has no effect ({(dropped or {}).get(flag, 'removed')})",
                          FutureWarning, stacklevel=2)
            continue
        warnings.warn(f"{prog}: {flag} is deprecated: use --{key} {value}", FutureWarning, stacklevel=2)
        out += [f"--{key}", str(value)]
    return out
