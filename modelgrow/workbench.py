"""The small synthetic workbench the demo and the continual-pre-training study are built from: library
functions, each one step of the method on the synthetic world, that other code can call
(``modelgrow demo`` and ``experiments/study_continual.py`` are thin scripts over them).

    ws = Workspace("runs/demo", DemoSize(), base_dir=DEFAULT_BASE)
    make_data(ws)                                    # clips of domains A and B, train + held-out
    build_llm(ws)                                    # tiny random Llama with the real Llama tokenizer
    build_caches(ws, [("B", "train", "SL"), ...])    # VAE latents + T5 (+ LLM) states
    cfg = train_config(ws, out, steps, lr, ws.cache("B", "train", "SL"), [...])
    info = train_and_export(cfg, out_model)          # Trainer.fit + EMA export
    pipe = make_pipeline(ws, model_dir, llm=True)    # ModelGrowPipeline with the workbench's VAE and encoders
    res = sample_and_score(pipe, evaluator, "B", "SL", n=8, seed=0)

A *base bundle* (``DEFAULT_BASE``, made by ``modelgrow demo --pretrain-base``) is a released pre-trained model
of this world: ``model/`` (STDiT pre-trained on domain A with short prompts, EMA weights), ``vae/`` (the tiny
AutoencoderTiny it was trained with), ``t5/`` (tiny T5 with a SentencePiece model trained on both domains'
captions, the stand-in for T5's general vocabulary), ``evaluator.safetensors`` (the semantic classifier),
``base.json`` (recipe, timings, scores, command) and ``train_log.jsonl`` (its training metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DemoSize", "QUICK", "DEFAULT_BASE", "BASE_SIZE_KEYS", "Workspace", "make_data", "build_t5", "build_llm",
           "train_vae", "build_caches", "train_config", "train_and_export", "heldout_batch", "heldout_loss",
           "time_reversal_gain", "make_pipeline", "sample_and_score", "load_evaluator", "load_base_info", "check_base", "git_sha", "read_frames"]

DEFAULT_BASE = Path(__file__).resolve().parent / "assets" / "demo_base"


@dataclass
class DemoSize:
    """Sizes and recipes of the synthetic workbench; see ``docs/demo_recipe.md`` for the measurements behind
    each choice (issue 14)."""

    # data
    n_train: int = 2000  # clips per domain (160 overfit: train loss 0.007 vs held-out 0.031 at step 2000)
    n_heldout: int = 16
    frames: int = 4
    size: int = 32
    # VAE (base bundle)
    vae_steps: int = 3000
    vae_lr: float = 3e-3
    vae_channels: tuple[int, ...] = (32, 32, 32)  # 4x spatial downsampling: 8x8x4 latents. 16x16 latents (32, 32)
    # cap shape less (reconstructions read 0.95 vs 0.73 on A) but make every DiT step ~8x dearer: on 2 cores the
    # direction word needs ~50k+ steps, affordable only at 8x8 (docs/demo_recipe.md sections 1, 9, 10)
    vae_latent_channels: int = 4
    vae_foreground_weight: float = 8.0
    vae_min_foreground_psnr: float = 15.0  # refuse a fit that lost the objects (train_vae; 24 dB: the shipped VAE)
    # DiT (STDiT-tiny's sizes: 2 blocks, width 64)
    patch: int = 2  # DiT spatial patch on the latent: a token covers 8x8 pixels, 16 tokens per frame
    depth: int = 2
    hidden: int = 64
    heads: int = 4
    temporal_pos: str = "tokens"  # the frame index on every token, not only block 0's temporal attention (v1.0's
    # "attention" placement): needed, with v-prediction and the high-noise share, to learn the direction word
    prediction_type: str = "v_prediction"  # with eps (Open-Sora v1.0's) the direction words stay at chance at any
    # budget tried (docs/demo_recipe.md sections 8-9)
    t5_tokens: int = 48
    llm_tokens: int = 48
    batch: int = 8
    compute_dtype: str = "float32"  # bf16 autocast paid off for the 128-wide model only (section 2)
    compile: bool = True  # per-block torch.compile of the training step (parallel.compile): the grown model's CPU step
    # 13 % faster at the median for ~40 s of compiling (bench_demo_step, docs/demo_recipe.md section 15); the eager
    # losses to round-off
    ema_decay: float = 0.99
    timestep_sampling: str = "logit_normal"
    high_noise_share: float = 0.3  # of the training timesteps drawn from [800, 1000) instead (section 8)
    snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (train.snr_gamma; 0: off) ...
    snr_gamma_mode: str = "x0"  # ... the paper's (x0) or only the low-noise end (cap)
    warmup_steps: int = 50  # linear warm-up, then a cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    # base pre-training on A (base bundle): 96000 steps, ~38 min on one thread
    pretrain_steps: int = 96000
    lr: float = 2e-3
    # continual pre-training on B (the demo)
    continual_steps: int = 14000  # the direction words of B need the steps: 8000 -> direction 0.28-0.34, 10000 ->
    # 0.28 / 0.38 / 0.47 over 3 seeds (the study; one run read 0.84), 14000 -> 0.72 (32 held-out prompts; batch 16 x
    # 6000, more samples in less time: 0.12; docs/demo_recipe.md sections 10-11)
    continual_lr: float = 1e-3
    continual_batch: int = 8
    val_every: int = 12000  # validation (held-out loss + sampled clips) during base pre-training
    continual_val_every: int = 2000  # ... and during the demo's continual pre-training
    val_samples: int = 4
    # evaluation
    sampler: str = "iddpm"
    sample_steps: int = 100
    guidance_scale: float = 4.0  # T5 caption (32 tuning prompts, IDDPM-100, mean of the 4 attributes: base on A 0.60 /
    # 0.66 / 0.70 / 0.69 at guidance 1 / 2 / 4 / 7; continual model on B 0.73 / 0.80 / 0.76 at 2 / 4 / 7)
    llm_guidance_scale: float = 2.0  # LLM caption (16x16 continual model, 16 tuning prompts of B: 0.31 at 2 vs 0.22
    # at 12.5)
    sample_prompts: int = 32  # per domain (8 made +-0.15 noise per attribute; sampling the tiny model is cheap)
    classifier_train: int = 512
    classifier_steps: int = 300


QUICK = DemoSize(n_train=8, n_heldout=4, frames=4, size=32, vae_steps=4, vae_min_foreground_psnr=0.0, vae_channels=(8, 8), depth=2, hidden=32,
                 heads=2, patch=4, compute_dtype="float32", compile=False, t5_tokens=16, llm_tokens=16, batch=4, pretrain_steps=3, continual_steps=3, continual_batch=4, warmup_steps=1,
                 sample_steps=2, sample_prompts=1, classifier_train=32, classifier_steps=5, val_every=2, continual_val_every=2,
                 val_samples=1)

# what a base bundle fixes: the continual stage must use the same data geometry, VAE, DiT and text sizes
BASE_SIZE_KEYS = ("frames", "size", "vae_channels", "vae_latent_channels", "patch", "depth", "hidden", "heads",
                  "temporal_pos", "prediction_type", "t5_tokens")
# what a bundle made before a key existed was made with
_BEFORE_KEY = {"temporal_pos": "attention", "prediction_type": "epsilon"}


class Workspace:
    """Paths of one run directory; ``base_dir`` is where the base bundle is read from (a run that builds the base
    has its own VAE, T5 and model under ``out``: pass ``base_dir=None``)."""

    def __init__(self, out: str | Path, size: DemoSize, base_dir: str | Path | None = None):
        self.out, self.size = Path(out), size
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.out.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def manifest(self, domain: str, split: str) -> Path:
        return self.path("data", f"{domain}_{split}", "manifest.csv")

    def cache(self, domain: str, split: str, mode: str, template: bool = True) -> Path:
        return self.path("cache", f"{domain}_{split}_{mode}" + ("" if template else "_notemplate"))

    @property
    def vae_dir(self) -> Path:
        return self.base_dir / "vae" if self.base_dir else self.path("vae", "model")

    @property
    def t5_dir(self) -> Path:
        return self.base_dir / "t5" if self.base_dir else self.path("encoders", "t5")

    @property
    def llm_dir(self) -> Path:
        return self.path("encoders", "llm")

    @property
    def base_model_dir(self) -> Path:
        return self.base_dir / "model" if self.base_dir else self.path("pretrain", "model")

    @property
    def evaluator_path(self) -> Path:
        return self.base_dir / "evaluator.safetensors" if self.base_dir else self.path("evaluate", "evaluator.safetensors")

    @property
    def latent_size(self) -> int:
        return self.size.size // 2 ** (len(self.size.vae_channels) - 1)


# ------------------------------------------------------------------------------------------------------------
# data, encoders, VAE, caches
# ------------------------------------------------------------------------------------------------------------


def make_data(ws: Workspace, domains=("A", "B"), splits=("train", "heldout")) -> None:
    """Clips of each (domain, split) as VP9 .webm + manifest with short and long captions (deterministic)."""
    from .synthetic.world import generate

    s = ws.size
    for domain in domains:
        for split in splits:
            n, seed = (s.n_train, 0) if split == "train" else (s.n_heldout, 1)
            generate(ws.path("data", f"{domain}_{split}"), domain, split, n=n, num_frames=s.frames, height=s.size,
                     width=s.size, codec="webm", seed=seed, progress=False)


def build_t5(ws: Workspace) -> str:
    """A tiny random T5 whose SentencePiece model is trained on both domains' captions (short and long)."""
    from .synthetic.world import read_manifest
    from .text.tiny import build_tiny_t5

    corpus = [r[k] for d in ("A", "B") for r in read_manifest(ws.manifest(d, "train")) for k in ("caption", "long_caption")]
    build_tiny_t5(str(ws.t5_dir), vocab_size=300, d_model=32, corpus=corpus)
    return "tiny random T5 (d_model 32), SentencePiece trained on the captions of A and B"


def build_llm(ws: Workspace) -> str:
    from .text.tiny import build_tiny_llama

    build_tiny_llama(str(ws.llm_dir), hidden_size=32)
    return "tiny random Llama (hidden 32), real Llama SentencePiece tokenizer from mistral-common"


def read_frames(ws: Workspace, domain_split: list[tuple[str, str]]) -> torch.Tensor:
    """All frames of the given (domain, split) clips: float [N, 3, H, W] in [-1, 1]."""
    from .synthetic.world import read_manifest
    from .video_io import read_video

    frames = []
    for d, sp in domain_split:
        root = ws.manifest(d, sp).parent
        for r in read_manifest(ws.manifest(d, sp)):
            frames.append(torch.from_numpy(read_video(root / r["path"])[0]))
    return torch.cat(frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(ws: Workspace, progress=None) -> dict:
    """The tiny AutoencoderTiny on the training frames of both domains (the stand-in for SD's general-purpose VAE:
    it must encode domain B too), foreground-weighted; saved to ``ws.vae_dir``. Returns held-out PSNR etc."""
    from .vae import check_reconstruction, train_tiny_autoencoder

    s = ws.size
    train = read_frames(ws, [("A", "train"), ("B", "train")])
    vae, losses = train_tiny_autoencoder(train, s.vae_steps, lr=s.vae_lr, channels=s.vae_channels,
                                         latent_channels=s.vae_latent_channels,
                                         foreground_weight=s.vae_foreground_weight, progress=progress)
    with torch.no_grad():
        held = read_frames(ws, [("A", "heldout"), ("B", "heldout")])[:128]
        rec = vae.decode(vae.encode(held).latents).sample.clamp(-1, 1)
    fg_db = check_reconstruction(vae, held, s.vae_min_foreground_psnr)  # raises before saving a fit that lost the objects
    vae.save_pretrained(ws.vae_dir)
    mse = ((rec - held) / 2).square().mean().item()
    return {"psnr_heldout_db": 10 * math.log10(1 / max(mse, 1e-12)), "foreground_psnr_heldout_db": fg_db,
            "final_loss": losses[-1] if losses else None,
            "steps": s.vae_steps, "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor,
            "losses": [(i, v) for i, v in enumerate(losses) if i % 50 == 0 or i == len(losses) - 1]}


def build_caches(ws: Workspace, which: list[tuple[str, str, str]], llm: bool = True, template: bool = True) -> None:
    """Latent + text caches for (domain, split, prompt mode) triples; ``llm``: also the LLM states."""
    from .data.cache import build_cache
    from .text import LLMEncoder, T5Encoder
    from .vae import VideoVAE

    s = ws.size
    vae = VideoVAE.from_pretrained(ws.vae_dir, micro_batch_size=32)
    t5 = T5Encoder(str(ws.t5_dir), max_length=s.t5_tokens, device="cpu")
    enc = LLMEncoder(str(ws.llm_dir), max_length=s.llm_tokens, use_template=template, device="cpu") if llm else None
    for d, sp, mode in which:
        build_cache(ws.manifest(d, sp), ws.cache(d, sp, mode, template), vae=vae, t5=t5, llm=enc, num_frames=s.frames,
                    frame_interval=1, image_size=(s.size, s.size), prompt_mode=mode, batch_size=16, shard_size=256,
                    device="cpu")


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------


def train_config(ws: Workspace, out: Path, steps: int, lr: float, cache: Path, extra: list[str] = (), seed: int = 0,
                 val_cache: Path | None = None, val_every: int | None = None):
    """The typed training config of a workbench run (tiny STDiT, cached data, logit-normal timesteps, warm-up +
    cosine decay, EMA), with ``extra`` dotted overrides last. ``val_cache``: a held-out cache validated every
    ``val_every`` steps (default ``size.val_every``; loss + ``size.val_samples`` sampled clips, EMA weights)."""
    from .config import load_config

    s = ws.size
    lat = ws.latent_size
    val_every = s.val_every if val_every is None else val_every
    val = [] if val_cache is None or val_every <= 0 else [
        "--train.val_every", str(val_every), "--data.val_cache_dir", str(val_cache),
        "--train.val_samples", str(s.val_samples), "--sample.num_sampling_steps", str(s.sample_steps),
        "--sample.sampler", s.sampler]
    return load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.depth", str(s.depth), "--model.hidden_size", str(s.hidden),
        "--model.num_heads", str(s.heads), "--model.input_size", f"{s.frames},{lat},{lat}",
        "--model.in_channels", str(s.vae_latent_channels),
        "--model.patch_size", f"1,{s.patch},{s.patch}",
        "--model.caption_channels", "32", "--model.model_max_length", str(s.t5_tokens), "--model.space_scale", "1.0",
        "--model.temporal_pos", s.temporal_pos, "--model.prediction_type", s.prediction_type,
        "--data.cache_dir", str(cache), "--data.t5", str(ws.t5_dir), "--data.llm", str(ws.llm_dir),
        "--data.vae", str(ws.vae_dir),
        "--train.steps", str(steps), "--train.batch_size", str(s.batch), "--train.output_dir", str(out),
        "--train.log_every", str(max(1, steps // 20)), "--train.compute_dtype", s.compute_dtype, "--train.seed", str(seed),
        "--train.ema_decay", str(s.ema_decay), "--train.timestep_sampling", s.timestep_sampling,
        "--parallel.compile", str(s.compile).lower(),
        "--train.high_noise_share", str(s.high_noise_share),
        "--train.snr_gamma", str(s.snr_gamma), "--train.snr_gamma_mode", s.snr_gamma_mode,
        "--optim.lr", str(lr), "--optim.warmup_steps", str(s.warmup_steps),
        "--optim.decay_steps", str(max(steps - s.warmup_steps, 0)), "--optim.min_lr_ratio", str(s.min_lr_ratio),
        "--checkpoint.every_steps", str(min(steps, val_every) if val else steps), "--grow.llm_channels", "32",
        "--grow.llm_max_length", str(s.llm_tokens), *val, *extra])


def train_and_export(cfg, model_dir: Path, log: Callable[[str], None] | None = None) -> dict:
    """``Trainer(cfg).fit()`` then the EMA weights exported to ``model_dir``; returns the loss history, parameter
    counts and the wall time."""
    import time

    from .train import Trainer
    from .train.checkpoint import latest_checkpoint
    from .train.export import export_checkpoint

    trainer = Trainer(cfg, log=log or (lambda *_: None))
    t0 = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - t0
    export_checkpoint(latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints"), model_dir, "ema")
    return {"losses": [(m["step"], m["loss"]) for m in history], "train_seconds": round(seconds, 1),
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "trainable": sum(p.numel() for p in trainer.params)}


# ------------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------------


def heldout_batch(cache: Path) -> dict:
    from .data.cache import CachedDataset, CachedLoader

    ds = CachedDataset(cache)
    return next(iter(CachedLoader(ds, len(ds), shuffle=False)))


@torch.no_grad()
def heldout_loss(model, cache: Path, llm: bool, reverse_time: bool = False) -> float:
    """Mean IDDPM loss over a held-out cache at 8 fixed timesteps with fixed noise (the same for every model);
    for a v-predicting model the loss of its prediction converted to eps (``eps_loss``), so losses compare.

    ``reverse_time``: the same noisy clips with their frames in reverse order (noise reversed too), captions
    unchanged. The synthetic worlds are time-symmetric (a clip played backwards is a clip of the opposite
    direction), so a model that ignores the prompted direction has the same loss either way, and a model that reads
    it has a higher loss on the reversed clips: :func:`time_reversal_gain`."""
    from .diffusion import IDDPM

    diffusion = IDDPM(timestep_respacing="", prediction_type=getattr(model, "prediction_type", "epsilon"))
    b = heldout_batch(cache)
    x0 = b["latent"].float()  # [B, C, T, H, W]
    if reverse_time:
        x0 = x0.flip(2)
    losses = []
    for k, tv in enumerate(np.linspace(50, 950, 8).round().astype(int)):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + k))
        if reverse_time:
            noise = noise.flip(2)
        t = torch.full((x0.shape[0],), int(tv), dtype=torch.long)
        kw = {"y": b["y"], "mask": b["mask"]}
        if llm:
            kw |= {"y_llm": b["y_llm"], "llm_mask": b["llm_mask"]}
        losses.append(diffusion.training_losses(model, x0, t, model_kwargs=kw, noise=noise)["eps_loss"].mean().item())
    return float(np.mean(losses))


def time_reversal_gain(model, cache: Path, llm: bool, loss: float | None = None) -> float:
    """Held-out loss on time-reversed clips minus on the clips (relative to the latter): how much the model uses
    the prompted motion direction. 0: not at all (a model blind to frame order, or one that ignores the direction
    words); > 0: the reversed clips, which contradict their captions, are predicted worse. ``loss``: the model's
    ``heldout_loss`` on ``cache`` if already known."""
    fwd = heldout_loss(model, cache, llm) if loss is None else loss
    return (heldout_loss(model, cache, llm, reverse_time=True) - fwd) / fwd


def make_pipeline(ws: Workspace, model_dir: Path, llm: bool, template: bool = True):
    from .models import from_pretrained
    from .pipeline import ModelGrowPipeline
    from .text import LLMEncoder, T5Encoder
    from .vae import VideoVAE

    s = ws.size
    return ModelGrowPipeline(
        from_pretrained(model_dir), VideoVAE.from_pretrained(ws.vae_dir, micro_batch_size=16),
        T5Encoder(str(ws.t5_dir), max_length=s.t5_tokens, device="cpu"),
        LLMEncoder(str(ws.llm_dir), max_length=s.llm_tokens, use_template=template, device="cpu") if llm else None,
        config={"sampler": s.sampler, "num_inference_steps": s.sample_steps, "guidance_scale": s.guidance_scale,
                "llm_guidance_scale": s.llm_guidance_scale})


def sample_and_score(ws: Workspace, pipe, evaluator, domain: str, mode: str, n: int | None = None, seed: int = 0,
                     prompt_seed: int = 2) -> tuple[dict, list[dict], np.ndarray]:
    """Sample ``n`` held-out prompts of ``domain`` (prompt mode S / L / SL) and score them with the semantic
    evaluator: (scores, prompts, uint8 videos [n, T, H, W, 3])."""
    from .synthetic.world import heldout_prompts

    s = ws.size
    prompts = heldout_prompts(domain, n or s.sample_prompts, seed=prompt_seed)
    out = pipe([p["short"] for p in prompts], long_prompt=[p["long"] for p in prompts], prompt_mode=mode,
               num_frames=s.frames, height=s.size, width=s.size, generator=torch.Generator().manual_seed(seed),
               progress=False)
    return evaluator.score(out.videos, prompts), prompts, np.asarray(out.videos)


def load_evaluator(ws: Workspace):
    """The semantic evaluator: the base bundle's, or trained (and saved) on the spot."""
    from .synthetic.semantic import SemanticClassifier, train_classifier

    path = ws.evaluator_path
    if path.exists():
        return SemanticClassifier.load(path)
    return train_classifier(("A", "B"), n_train=ws.size.classifier_train, steps=ws.size.classifier_steps, seed=0,
                            cache=path)


# ------------------------------------------------------------------------------------------------------------
# base bundle
# ------------------------------------------------------------------------------------------------------------


def git_sha() -> str | None:
    """The commit of the working tree this package runs from (None outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_base_info(base_dir: Path) -> dict[str, Any]:
    info = Path(base_dir) / "base.json"
    if not info.exists():
        raise FileNotFoundError(
            f"no base bundle at {base_dir} (base.json missing). The demo starts from a released pre-trained base "
            f"model; build it with `modelgrow demo --pretrain-base --base-dir {base_dir}` (about 45 minutes on "
            "2 CPU cores: 38 of them pre-training on one thread), or pass --base-dir to an existing one.")
    return json.loads(info.read_text())


def check_base(base_dir: Path, size: DemoSize) -> dict[str, Any]:
    """The bundle's base.json, after checking it was made with this size's data geometry, VAE, DiT and text sizes."""
    info = load_base_info(base_dir)
    made = info["size"]
    want = json.loads(json.dumps(asdict(size)))
    diff = {k: (made.get(k, _BEFORE_KEY.get(k)), want[k]) for k in BASE_SIZE_KEYS
            if made.get(k, _BEFORE_KEY.get(k)) != want[k]}
    if diff:
        raise ValueError(f"the base bundle at {base_dir} was made with other sizes (bundle, this run): {diff}; rebuild it "
                         f"with `modelgrow demo --pretrain-base` at these sizes or use the matching --base-dir")
    for part in ("model/config.json", "vae/config.json", "t5/config.json", "evaluator.safetensors"):
        if not (Path(base_dir) / part).exists():
            raise FileNotFoundError(f"base bundle {base_dir} is incomplete: {part} missing; rebuild it with "
                                    "`modelgrow demo --pretrain-base`")
    return info
