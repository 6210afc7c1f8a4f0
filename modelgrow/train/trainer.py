"""The training loop: ``modelgrow train --config X.toml [--section.key v ...]``, alone or under ``torchrun``.

Per optimizer step: ``train.grad_accum`` batches of latents and text states (from the latent/text cache, or
raw videos encoded on the fly by the VAE + T5 [+ LLM] in ``data.vae/t5/llm``), a diffusion timestep per
sample (uniform as in Open-Sora v1.0, or logit-normal: ``train.timestep_sampling``), the joint condition
dropout, the IDDPM loss (MSE + VB), AdamW with gradient clipping, the fp32 EMA (fixed ``train.ema_decay``, or
diffusers' warm-up with ``train.ema_warmup``). Every ``train.log_every`` steps one step line (DESIGN convention 8)
goes to stdout, ``metrics.jsonl``, TensorBoard (when installed) and Weights & Biases (``train.wandb``; see
:class:`~modelgrow.train.metrics.MetricSinks`); a non-finite loss stops the run with an error before any checkpoint
is written. Every ``train.val_every`` steps and at the last step, the validation (:class:`Validator`): the held-out
denoising loss and optionally sampled clips. Resumable checkpoints (train/checkpoint.py) every
``checkpoint.every_steps`` and at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, config_to_dict, save_config
from ..data.encode import Encoders, encode_latents, encode_text
from ..diffusion import IDDPM
from ..grow import add_llm_condition, expand, freeze_original_blocks
from ..models import STDiT, from_pretrained, load_checkpoint
from ..models.checkpoint import CONFIG_NAME
from ..models.flops import stdit_flops
from . import checkpoint as ckpt
from .metrics import MetricSinks, device_peak_tflops, import_wandb, memory_gib, step_line
from .parallelize import parallelize
from .state import EMA, apply_lora, build_optimizer, build_scheduler, draw_condition_dropout


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build_model(cfg: Config) -> STDiT:
    """The model a run trains: weights from ``checkpoint.load_weights`` (a pretrained dir brings its own
    architecture, except an explicit ``model.prediction_type``, which switches its objective; an Open-Sora / PixArt /
    safetensors file loads into ``[model]``), then growth and the LLM
    condition from ``[grow]``, then the trainable set from ``train.mode``."""
    src, pre = cfg.checkpoint.load_weights, cfg.model.from_pretrained
    if src and pre and Path(src) != Path(pre):
        raise ValueError(f"model.from_pretrained = {pre!r} and checkpoint.load_weights = {src!r} both name the start "
                         "weights; set only one of them")
    src = src or pre
    if src and not Path(src).exists():
        key = "checkpoint.load_weights" if cfg.checkpoint.load_weights else "model.from_pretrained"
        raise FileNotFoundError(f"{key} = {src!r}: no such file or directory")
    if src and Path(src).is_dir() and (Path(src) / CONFIG_NAME).exists():
        model = from_pretrained(src, strict=cfg.checkpoint.strict).train()
        if cfg.model.prediction_type and cfg.model.prediction_type != model.prediction_type:
            model.set_prediction_type(cfg.model.prediction_type)  # asked for explicitly: fine-tune into it
    else:
        model = STDiT(**cfg.model.stdit_kwargs())
        if src:
            load_checkpoint(model, src, strict=cfg.checkpoint.strict)
    mode, grow = cfg.train.mode, cfg.grow
    if grow.strategy != "none":
        if mode != "expand":
            raise ValueError(f"grow.strategy = {grow.strategy!r} expands the model: set train.mode = 'expand' (got {mode!r})")
        model = expand(model, grow.strategy, ratio=None if grow.num_new else grow.ratio, num_new=grow.num_new)
    if grow.llm and not hasattr(model, "llm_embedder"):
        model = add_llm_condition(model, grow.llm_channels, grow.llm_max_length, copy_t5=grow.copy_t5_to_llm,
                                  per_head_gate=grow.per_head_gate)
    for p in model.parameters():
        p.requires_grad = True
    if mode == "lora":
        apply_lora(model, cfg.train.lora_rank)
    elif mode == "expand":
        if not model.config.get("growth"):
            raise ValueError("train.mode = 'expand' needs a grown model: set grow.strategy or load a grown checkpoint")
        if grow.train_new_only:
            freeze_original_blocks(model)
    return model.train()


# the held-out loss: the demo's 8 timesteps, and noise keyed on (held-out clip, timestep) alone
VAL_TIMESTEPS = tuple(int(t) for t in np.linspace(50, 950, 8).round())


def val_noise(position: int, k: int, shape) -> torch.Tensor:
    """The fixed noise of held-out clip ``position`` (its place in the held-out set) at ``VAL_TIMESTEPS[k]``: the
    same in every run, whatever the seed, world size or batch size."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(position * len(VAL_TIMESTEPS) + k))


def _reshard(model: torch.nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state (a no-grad forward leaves the ones with
    reshard_after_forward = False gathered, and the parameters are about to be swapped)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class Validator:
    """``train.val_every``: every N steps and at the last step, with the weights of ``train.val_weights`` (the
    EMA by default; the trained weights are swapped back bit for bit afterwards), in eval mode, without touching
    the training RNG (the training run is identical with and without validation):

    * **held-out loss**: the mean IDDPM training loss (MSE + VB, the training objective without condition
      dropout) of the first ``val_batches * batch_size`` clips of ``data.val_cache_dir`` (or of
      ``data.val_manifest``, encoded once: centre clip, VAE posterior mode, like the cache) at the 8 timesteps
      :data:`VAL_TIMESTEPS` with the noise :func:`val_noise`: a function of the weights and the held-out set alone,
      comparable across steps and runs. Cost: ceil(clips / batch_size / world) * 8 forwards per rank.
      Multi-rank (FSDP included): the clips' batches are split over the ranks (ranks with one batch fewer run a
      zero-weight one: FSDP needs every rank in every forward) and the sum and count are all-reduced, so the value
      is the same for any world size.
    * **samples** (``train.val_samples`` > 0): the first held-out prompts (their cached text states, or the
      manifest's prompts through data.t5 / llm) sampled with ``[sample]`` (sampler, num_sampling_steps, guidance
      scales; start noise and sampler noise from ``sample.seed + i`` for prompt i, so the clips of two validations
      differ only by the weights), the denoising loop and guidance of :class:`~modelgrow.pipeline.ModelGrowPipeline`
      (T5-only classifier-free guidance, or the two-condition guidance with an LLM condition), decoded by
      ``data.vae`` on rank 0. Every rank samples (FSDP forwards are collective); rank 0 writes
      ``<output_dir>/val/step_NNNNNNN/NN.mp4`` + ``NN.png`` (keyframes) + ``prompts.json`` and hands them to the
      metric sinks. Cost: val_samples * num_sampling_steps guided forwards (2 or 3 x the batch) + the VAE decode."""

    def __init__(self, trainer: Trainer):
        self.tr = trainer
        cfg = trainer.cfg
        d, t = cfg.data, cfg.train
        if not (d.val_cache_dir or d.val_manifest):
            raise ValueError(f"train.val_every = {t.val_every} needs held-out data: set data.val_cache_dir (a `modelgrow "
                             "cache` of the held-out clips) or data.val_manifest (raw held-out videos)")
        key, path = ("data.val_cache_dir", d.val_cache_dir) if d.val_cache_dir else ("data.val_manifest", d.val_manifest)
        if not Path(path).exists():
            raise FileNotFoundError(f"{key} = {path!r}: no such file or directory")
        if t.val_samples and not d.vae:
            raise ValueError(f"train.val_samples = {t.val_samples} decodes the sampled clips with data.vae: set data.vae "
                             "(a local VAE dir) or train.val_samples = 0")
        self.weights = ["model", "ema"] if t.val_weights == "both" else [t.val_weights]
        self.sample_weights = "model" if t.val_weights == "model" else "ema"
        self.clips: list[dict[str, Any]] | None = None  # held-out clips (CPU): latent, y, mask [, y_llm, llm_mask], prompt
        self.prompts: list[dict[str, Any]] = []  # prompts to sample and their text states
        self.vae = None

    # -- the held-out set --------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.clips is not None:
            return
        tr, cfg = self.tr, self.tr.cfg
        n_loss = cfg.train.val_batches * cfg.train.batch_size
        if cfg.data.val_cache_dir:
            from ..data.cache.dataset import CachedDataset

            ds = CachedDataset(cfg.data.val_cache_dir)
            ds.check_compatible(cfg, key="data.val_cache_dir")
            clips = [ds.get(k) for k in range(min(n_loss, len(ds)))]
            prompts = [{k: v for k, v in ds.get(k).items() if k != "latent"} for k in range(min(cfg.train.val_samples, len(ds)))]
            source = f"data.val_cache_dir = {cfg.data.val_cache_dir}"
        else:
            clips, prompts = self._from_manifest(n_loss, cfg.train.val_samples)
            source = f"data.val_manifest = {cfg.data.val_manifest}"
        if not clips:
            raise ValueError(f"{source}: the held-out set is empty")
        if tr.has_llm and "y_llm" not in clips[0]:
            raise ValueError(f"{source}: the model has an LLM condition but the held-out set has no LLM states "
                             "(build the cache with --llm)")
        if cfg.train.val_samples and tr.rank == 0:
            if self.vae is None:
                self.vae = self._load_vae()
            if self.vae.out_channels != tr.model.in_channels:
                raise ValueError(f"data.vae = {cfg.data.vae} has {self.vae.out_channels} latent channels, the model "
                                 f"{tr.model.in_channels}")
        self.clips, self.prompts = clips, prompts
        if tr.rank == 0:
            tr.log(f"validation every {cfg.train.val_every} steps: {len(clips)} held-out clips x {len(VAL_TIMESTEPS)} "
                   f"timesteps ({source}), {len(prompts)} sampled prompts, weights {cfg.train.val_weights}")

    def _load_vae(self):
        from ..data.encode import load_encoder

        if self.tr.encoders is not None:
            return self.tr.encoders.vae
        return load_encoder("vae", self.tr.cfg, self.tr.device, self.tr.data)

    @torch.no_grad()
    def _from_manifest(self, n_loss: int, n_prompts: int) -> tuple[list[dict], list[dict]]:
        from ..data.videos import VideoDataset
        from ..text.prompts import merge_prompt

        tr, d = self.tr, self.tr.data  # [data] resolved: the training cache's clip settings when training from one
        if tr.encoders is None:
            enc = Encoders.from_config(tr.cfg, tr.device, tr.has_llm, data=d)
            if d.manifest and not d.cache_dir:  # the run trains from raw videos too: one set of encoders
                tr.encoders = enc
        else:
            enc = tr.encoders
        ds = VideoDataset(d.val_manifest, d.num_frames, d.frame_interval, tuple(d.image_size), hflip=False,
                          decoder=d.decoder, prompt_mode=d.prompt_mode, deterministic=True,
                          device_id=int(os.environ.get("LOCAL_RANK", "0")))

        def text(prompts: list[str]) -> list[dict[str, Any]]:  # per-sample text states of the batch schema
            states = encode_text(enc.t5, enc.llm, prompts)
            return [{**{k: v[i].float().cpu() if k.startswith("y") else v[i].long().cpu() for k, v in states.items()},
                     "prompt": p} for i, p in enumerate(prompts)]

        clips, B = [], tr.cfg.train.batch_size
        n = min(n_loss, len(ds))
        for start in range(0, n, B):
            items = [ds.load(k) for k in range(start, min(start + B, n))]
            latent = encode_latents(enc.vae, torch.stack([it["video"] for it in items]), "mode").cpu()  # as the cache
            for i, o in enumerate(text([it["prompt"] for it in items])):
                clips.append({"latent": latent[i], "index": items[i]["index"], **o})
        recs = [ds.manifest[k] for k in range(min(n_prompts, len(ds)))]
        prompts = text([merge_prompt(r.caption, r.long_caption, d.prompt_mode) for r in recs]) if recs else []
        if tr.cfg.train.val_samples and tr.rank == 0:
            self.vae = enc.vae  # kept for decoding the samples (the text encoders go unless training uses them)
        return clips, prompts

    # -- one validation ----------------------------------------------------------------------------------
    def run(self, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(record, sampled clips) of the current weights; every rank takes part."""
        tr = self.tr
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"step": step}
        items: list[dict[str, Any]] = []
        was_training = tr.model.training
        tr.model.eval()
        devices = [tr.device.index or 0] if tr.device.type == "cuda" else []
        # a compiled model (parallel.compile) validates eager: eval mode, no grad and the sampling batches would
        # each cost a recompile of every block for a few calls
        stance = torch.compiler.set_stance("force_eager") if tr.applied.get("compile") else nullcontext()
        try:
            with torch.random.fork_rng(devices=devices), stance:
                for which in self.weights:
                    with self._weights(which):
                        rec[f"loss_{which}"] = self.loss()
                        if self.prompts and which == self.sample_weights:
                            items = self.sample(step, which)
        finally:
            tr.model.train(was_training)
        rec |= {"clips": len(self.clips), "timesteps": len(VAL_TIMESTEPS), "weights": tr.cfg.train.val_weights,
                "time_s": time.perf_counter() - t0}
        return rec, items

    def line(self, rec: dict[str, Any], items: list[dict[str, Any]]) -> str:
        losses = " | ".join(f"loss {rec[f'loss_{w}']:.4f} ({'EMA' if w == 'ema' else 'trained'} weights)"
                            for w in self.weights)
        media = f" | {len(items)} samples ({self.sample_weights}) in {items[0]['dir']}" if items else ""
        return (f"val step {rec['step']} | {losses} | {rec['clips']} held-out clips x {rec['timesteps']} timesteps"
                f"{media} | {rec['time_s']:.1f} s")

    @contextmanager
    def _weights(self, which: str):
        """The model holds ``which`` weights inside the block (the EMA swapped in, then the trained ones back)."""
        model, ema = self.tr.model, self.tr.ema
        if which == "model":
            try:
                yield
            finally:
                _reshard(model)
            return
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in ema.shadow}
            ema.copy_to(model)
        try:
            yield
        finally:
            _reshard(model)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    def _batches(self) -> list[list[int]]:
        """Global batches (the same on every rank): consecutive held-out clips of one latent shape, <= batch_size."""
        out: list[list[int]] = []
        B = self.tr.cfg.train.batch_size
        for j, c in enumerate(self.clips):
            if out and len(out[-1]) < B and c["latent"].shape == self.clips[out[-1][0]]["latent"].shape:
                out[-1].append(j)
            else:
                out.append([j])
        return out

    def _kwargs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        dev = self.tr.device
        kw = {"y": torch.stack([r["y"] for r in rows]).to(dev), "mask": torch.stack([r["mask"] for r in rows]).to(dev)}
        if self.tr.has_llm:
            kw |= {"y_llm": torch.stack([r["y_llm"] for r in rows]).to(dev),
                   "llm_mask": torch.stack([r["llm_mask"] for r in rows]).to(dev)}
        return kw

    @torch.no_grad()
    def loss(self) -> float:
        tr = self.tr
        batches = self._batches()
        per_rank = -(-len(batches) // tr.world)
        mine = batches[tr.rank :: tr.world]
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine += [batches[0]] * (per_rank - len(mine))
        acc = torch.zeros(2, dtype=torch.float64, device=tr.device)  # weighted sum of losses, clip count
        for idx, w in zip(mine, weights, strict=True):
            rows = [self.clips[j] for j in idx]
            x0 = torch.stack([r["latent"] for r in rows]).float().to(tr.device)
            kw = self._kwargs(rows)
            for k, tv in enumerate(VAL_TIMESTEPS):
                noise = torch.stack([val_noise(j, k, x0.shape[1:]) for j in idx]).to(tr.device)
                t = torch.full((len(idx),), tv, dtype=torch.long, device=tr.device)
                with tr._autocast():
                    loss = tr.diffusion.training_losses(tr.model, x0, t, model_kwargs=kw, noise=noise)["eps_loss"]
                acc[0] += w * loss.double().sum()
            acc[1] += w * len(idx) * len(VAL_TIMESTEPS)
        if tr.world > 1:
            dist.all_reduce(acc)
        return float(acc[0] / acc[1])

    @torch.no_grad()
    def sample(self, step: int, which: str) -> list[dict[str, Any]]:
        from diffusers.utils.torch_utils import randn_tensor

        from ..diffusion import cfg_model_fn, two_condition_model_fn
        from ..diffusion.schedulers import denoise, make_scheduler
        from ..video_io import keyframe_strip, to_uint8, write_png, write_video

        tr, s = self.tr, self.tr.cfg.sample
        model = tr.model

        def forward(x, t, **kw):
            with tr._autocast():
                return model(x, t, **kw)

        groups = 3 if tr.has_llm else 2
        fn = two_condition_model_fn(forward, s.cfg_scale_t5, s.cfg_scale_llm) if tr.has_llm else cfg_model_fn(forward, s.cfg_scale_t5)
        shape = (model.in_channels, *model.input_size)
        scheduler = make_scheduler(s.sampler, prediction_type=tr.prediction_type)
        latents = []
        for start in range(0, len(self.prompts), s.batch_size):
            rows = self.prompts[start : start + s.batch_size]
            n = len(rows)
            gens = [torch.Generator().manual_seed(s.seed + start + i) for i in range(n)]
            x = randn_tensor((n, *shape), generator=gens, device=tr.device, dtype=torch.float32) * scheduler.init_noise_sigma
            c = self._kwargs(rows)
            null_y = model.y_embedder.y_embedding.to(tr.device)[None, None].expand(n, 1, -1, -1).to(c["y"].dtype)
            if tr.has_llm:
                null_llm = model.llm_embedder.y_embedding.to(tr.device)[None, None].expand(n, 1, -1, -1).to(c["y_llm"].dtype)
                ones = torch.ones_like(c["llm_mask"])
                kw = {"y": torch.cat([c["y"], c["y"], null_y]), "mask": c["mask"],
                      "y_llm": torch.cat([c["y_llm"], null_llm, null_llm]), "llm_mask": torch.cat([c["llm_mask"], ones, ones])}
            else:
                kw = {"y": torch.cat([c["y"], null_y]), "mask": c["mask"]}
            latents.append(denoise(scheduler, fn, x, s.num_sampling_steps, kw, groups=groups, generator=gens))
        if tr.rank != 0:
            return []
        x0 = torch.cat(latents)
        folder = tr.out / "val" / f"step_{step:07d}"
        if not bool(torch.isfinite(x0).all()):
            tr.log(f"val step {step}: the sampled latents hold NaN/inf; no clips written")
            return []
        video = self.vae.decode(x0.to(self.vae.dtype)).float()
        items, meta = [], []
        for i, (row, v) in enumerate(zip(self.prompts, video, strict=True)):
            frames = to_uint8(v)
            strip = keyframe_strip(frames, n=min(4, len(frames)))
            png = write_png(folder / f"{i:02d}.png", strip)
            try:
                mp4 = write_video(folder / f"{i:02d}.mp4", frames, fps=s.fps)
            except ImportError:  # no PyAV: keyframes and the TensorBoard GIF only
                mp4 = None
            items.append({"prompt": row["prompt"], "frames": frames, "keyframes": strip, "fps": s.fps, "mp4": mp4,
                          "png": png, "dir": folder})
            meta.append({"index": i, "prompt": row["prompt"], "seed": s.seed + i, "weights": which,
                         "mp4": mp4.name if mp4 else None, "png": png.name})
        settings = {"sampler": s.sampler, "steps": s.num_sampling_steps, "cfg_scale_t5": s.cfg_scale_t5,
                    **({"cfg_scale_llm": s.cfg_scale_llm} if tr.has_llm else {}), "step": step}
        (folder / "prompts.json").write_text(json.dumps({"settings": settings, "samples": meta}, indent=1) + "\n")
        return items


class Trainer:
    def __init__(self, cfg: Config, loader: Iterable | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.log = log if self.rank == 0 else (lambda *_: None)
        self.out = Path(cfg.train.output_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg).to(self.device)
        self.prediction_type = self.model.prediction_type  # the checkpoint's when training from one
        self.has_llm = hasattr(self.model, "llm_embedder")
        # dtypes (train.param_dtype / compute_dtype), activation checkpointing, compile, FSDP2: all in parallelize()
        self.applied = parallelize(self.model, cfg.parallel, self.world, param_dtype=cfg.train.param_dtype,
                                   compute_dtype=cfg.train.compute_dtype)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank + 1)  # per-rank stream for anything else random
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        tc = cfg.train
        self.ema = EMA(self.model, tc.ema_decay, warmup=tc.ema_warmup, inv_gamma=tc.ema_inv_gamma, power=tc.ema_power,
                       min_decay=tc.ema_min_decay)
        if tc.wandb != "off":
            import_wandb()  # fail now, on every rank, rather than after the first steps
        self.validator = Validator(self) if tc.val_every > 0 else None
        self.val_history: list[dict[str, Any]] = []
        self.sinks: MetricSinks | None = None
        self.diffusion = IDDPM(timestep_respacing="", prediction_type=self.prediction_type)
        self.data = self._data_settings()  # [data] resolved (a cache's settings where the run trains from one)
        self.loader = loader if loader is not None else self._default_loader()
        self.encoders: Encoders | None = None
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._overwrite = False
        last = ckpt.latest_checkpoint(self.out / "checkpoints")
        if cfg.checkpoint.resume and last is not None:
            self.resume(last)
        elif last is not None:
            if not cfg.checkpoint.overwrite:
                raise ValueError(
                    f"train.output_dir = {self.out} already holds a run (newest checkpoint {last.name}) and "
                    "checkpoint.resume = false: refusing to mix two runs in one directory. Use another "
                    "train.output_dir, resume it (checkpoint.resume = true), or delete its checkpoints and start over "
                    "with checkpoint.overwrite = true"
                )
            self._overwrite = True

    # --------------------------------------------------------------------------------------------------
    def _data_settings(self):
        from ..data.loader import resolve_data  # the manifest / cache loaders (modelgrow.data)

        return resolve_data(self.cfg)

    def _default_loader(self):
        from ..data.loader import build_loader

        return build_loader(self.cfg, rank=self.rank, world_size=self.world)

    def _autocast(self):
        """The forward's precision context: autocast to train.compute_dtype in one process; nothing under FSDP2
        (its MixedPrecisionPolicy casts, see parallelize) or in float32."""
        compute = self.cfg.train.compute_dtype
        if compute == "float32" or self.applied.get("fsdp"):
            return nullcontext()
        if compute == "float16" and self.device.type == "cpu":
            raise ValueError("train.compute_dtype = float16 needs a CUDA device; use bfloat16 or float32 on CPU")
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if compute == "bfloat16" else torch.float16)

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "latent" not in batch:
            if self.encoders is None:
                self.encoders = Encoders.from_config(self.cfg, self.device, self.has_llm, data=self.data)
            batch = self.encoders(batch)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(batches)
        total = torch.zeros((), device=self.device)
        samples, tokens, flop = 0, 0, 0.0
        for raw in batches:
            b = self._prepare(raw)
            x0 = b["latent"].float()
            B = x0.shape[0]
            n_tok, f_tok = self.batch_cost(x0.shape)  # per sample: this batch's shape (an image batch: T = 1)
            tokens += B * n_tok
            flop += B * f_tok
            t, noise, u = self.sample_randomness(raw, x0.shape)
            drop_t5, drop_llm = draw_condition_dropout(B, self.cfg.train, self.has_llm, u=u, device=self.device)
            kwargs = {"y": b["y"], "mask": b["mask"], "drop_t5": drop_t5}
            if self.has_llm:
                kwargs |= {"y_llm": b.get("y_llm"), "llm_mask": b.get("llm_mask"), "drop_llm": drop_llm}
            with self._autocast():
                terms = self.diffusion.training_losses(self.model, x0, t, model_kwargs=kwargs, noise=noise)
            loss = self._weighted_loss(terms, t).mean()
            (loss / n).backward()
            total += loss.detach() / n
            samples += B
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_decay = self.ema.update(self.model, step=self.step + 1)  # the optimizer step just taken (1-based)
        self._nonfinite |= ~torch.isfinite(total)
        return {"loss": total, "grad_norm": grad_norm, "samples": samples, "tokens": tokens, "flop": flop,
                "ema_decay": ema_decay}

    def _weighted_loss(self, terms: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss: the diffusion's ``loss``, or with ``train.snr_gamma`` > 0 its MSE term weighted
        by Min-SNR-gamma (``snr_gamma_mode`` x0: the x0 error weighted min(SNR, gamma), expressed for the model's
        target; cap: the target's own error weighted min(1, gamma / SNR)) plus the unweighted learned-variance term."""
        gamma = self.cfg.train.snr_gamma
        if gamma <= 0:
            return terms["loss"]
        if not hasattr(self, "_snr"):
            ac = torch.as_tensor(self.diffusion.alphas_cumprod, dtype=torch.float64)
            self._snr = (ac / (1 - ac)).to(self.device)
        snr = self._snr[t]
        if self.cfg.train.snr_gamma_mode == "cap":
            w = (gamma / snr).clamp(max=1).float()
        else:
            per = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[self.prediction_type]
            w = (snr.clamp(max=gamma) / per).float()
        return w * terms["mse"] + terms.get("vb", 0.0)

    def batch_cost(self, shape) -> tuple[int, float]:
        """(tokens, training FLOPs) of one sample of latent shape [B, C, T, H, W], cached per shape."""
        key = tuple(shape[2:])
        cache = self.__dict__.setdefault("_cost", {})
        if key not in cache:
            m = self.model
            grid = m.token_grid(key)
            size = [g * p for g, p in zip(grid, m.patch_size, strict=True)]
            f = stdit_flops(**{**m.config, "input_size": size},
                            caption_tokens=self.cfg.model.stdit_kwargs()["model_max_length"],
                            llm_tokens=self.cfg.grow.llm_max_length if self.has_llm else 0).per_step(training=True)
            cache[key] = (grid[0] * grid[1] * grid[2], f)
        return cache[key]

    def sample_randomness(self, batch: dict[str, Any], shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timestep, noise and the condition-dropout draw of every sample, a function of (seed, step, the
        sample's index in the data stream) only: the same whatever the world size, worker count or resume
        point. Batches without an ``index`` fall back to a per-rank stream. A clip that occurs more than once in
        a batch (a dataset smaller than the batch, or an epoch boundary) gets a new draw per occurrence: the
        k-th repeat also keys on k (without it a one-clip batch of 8 trains on one timestep and one noise)."""
        idx = batch.get("index")
        if idx is None:
            idx = torch.arange(shape[0]) + (self.step * self.world + self.rank) * shape[0] + (1 << 40)
        ts, noises, us = [], [], []
        seen: dict[int, int] = {}
        for i in idx.tolist():
            k = seen[int(i)] = seen.get(int(i), -1) + 1  # occurrences of this clip earlier in the batch
            key = (self.cfg.train.seed * 1_000_003 + self.step) * 1_000_000_007 + int(i)
            if k:
                key = int(np.random.SeedSequence([self.cfg.train.seed, self.step, int(i), k]).generate_state(1, np.uint64)[0] >> 1)
            g = torch.Generator().manual_seed(key)
            ts.append(self._draw_timestep(g))
            us.append(torch.rand(1, generator=g))
            noise = torch.randn(shape[1:], generator=g)
            if self.cfg.train.noise_offset > 0:  # drawn after the rest: runs without it keep their streams
                noise += self.cfg.train.noise_offset * torch.randn(shape[1], *(1,) * (len(shape) - 2), generator=g)
            noises.append(noise)
        return (torch.cat(ts).to(self.device), torch.stack(noises).to(self.device), torch.cat(us))

    def _draw_timestep(self, g: torch.Generator) -> torch.Tensor:
        """One training timestep [1] (int64) from ``g``: uniform (Open-Sora v1.0) or logit-normal (SD3); with
        ``train.high_noise_share`` > 0 that share is drawn uniformly from [high_noise_from, 1000) instead (one
        more draw from ``g``, so runs without it keep their random streams)."""
        n, tc = self.diffusion.num_timesteps, self.cfg.train
        if tc.high_noise_share > 0 and float(torch.rand(1, generator=g, dtype=torch.float64)) < tc.high_noise_share:
            return torch.randint(min(tc.high_noise_from, n - 1), n, (1,), generator=g)
        if tc.timestep_sampling == "uniform":
            return torch.randint(0, n, (1,), generator=g)
        u = torch.sigmoid(tc.timestep_mean + tc.timestep_std * torch.randn(1, generator=g, dtype=torch.float64))
        return (u * n).long().clamp_(0, n - 1)

    def check_finite(self) -> None:
        if bool(self._nonfinite):
            raise FloatingPointError(
                f"non-finite loss at or before step {self.step}: stopping before any checkpoint is written "
                "(lower optim.lr, check the data, or train in fp32)"
            )

    # --------------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg
        if self._overwrite:  # checkpoint.resume = false + checkpoint.overwrite = true: the old run goes
            if self.rank == 0:
                import shutil

                shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
                shutil.rmtree(self.out / "val", ignore_errors=True)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            if dist.is_initialized():
                dist.barrier()
            self._overwrite = False
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.toml")
            self.log(f"model: {len(self.model.blocks)} blocks, {sum(p.numel() for p in self.model.parameters()):,} "
                     f"parameters ({sum(p.numel() for p in self.params):,} trainable) | predicts {self.prediction_type} | "
                     f"world {self.world} | "
                     f"{self.device} | parallel {self.applied}")
            self.sinks = MetricSinks(self.out, cfg.train.wandb, cfg.train.wandb_project, cfg.train.run_name,
                                     config=config_to_dict(cfg), resume=self.step > 0)
        failed = True
        try:
            self._fit()
            failed = False
        finally:
            if self.sinks is not None:
                self.sinks.close(failed=failed)
                self.sinks = None
        return self.history

    def _fit(self) -> None:
        cfg = self.cfg
        if self.sinks is not None:
            self.sinks.open()
        if self.validator is not None:
            self.validator.prepare()  # load (and check) the held-out set before the first step, not at the first validation
        it = iter(self.loader)
        window = {"time": 0.0, "data": 0.0, "samples": 0, "steps": 0, "tokens": 0, "flop": 0.0}
        tokens = self.model.num_temporal * self.model.num_spatial
        flops = stdit_flops(**self.model.config, caption_tokens=cfg.model.stdit_kwargs()["model_max_length"],
                            llm_tokens=cfg.grow.llm_max_length if self.has_llm else 0).per_step(training=True)
        peak = device_peak_tflops(self.device)
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, disable=self.rank != 0 or not os.isatty(2), desc="train")
        except ImportError:  # pragma: no cover
            bar = None
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(cfg.train.grad_accum)]
            t1 = time.perf_counter()
            out = self.train_step(batches)
            self.step += 1
            if bar is not None:
                bar.update(1)
            last = self.step == cfg.train.steps
            log_now = self.step % cfg.train.log_every == 0 or last
            if log_now and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # only at log steps: the step time is then real
            window["time"] += time.perf_counter() - t0
            window["data"] += t1 - t0
            window["samples"] += out["samples"] * self.world
            window["tokens"] += out.get("tokens", out["samples"] * tokens) * self.world
            window["flop"] += out.get("flop", out["samples"] * flops) * self.world
            window["steps"] += 1
            if log_now:
                self.check_finite()
                self._log_step(out, window, tokens, flops, peak)
                window = {"time": 0.0, "data": 0.0, "samples": 0, "steps": 0, "tokens": 0, "flop": 0.0}
            if self.validator is not None and (self.step % cfg.train.val_every == 0 or last):
                self.validate()  # outside the timed window: the step line's throughput is training alone
            if self.step % cfg.checkpoint.every_steps == 0 or last:
                self.save()
        if bar is not None:
            bar.close()

    def validate(self) -> dict[str, Any]:
        """One validation now (every rank takes part): the record logged as ``kind = "val"``."""
        if self.validator is None:
            raise ValueError("no validation configured: set train.val_every > 0 and data.val_cache_dir / val_manifest")
        self.validator.prepare()
        rec, items = self.validator.run(self.step)
        self.val_history.append(rec)
        if self.rank == 0:
            self.log(self.validator.line(rec, items))
            if self.sinks is not None:
                self.sinks.log(rec, "val")
                self.sinks.media(self.step, items)
        return rec

    def _log_step(self, out, window, tokens, flops_per_sample, peak) -> None:
        loss = out["loss"].detach().clone()
        if self.world > 1:  # the step's loss over every rank's samples
            dist.all_reduce(loss)
            loss /= self.world
        out = {**out, "loss": loss}
        sps = window["samples"] / max(window["time"], 1e-9)
        # tokens and FLOPs of the batches actually run (joint image + video batches differ in size)
        tps = window["tokens"] / max(window["time"], 1e-9) if "tokens" in window else sps * tokens
        tflops = (window["flop"] / max(window["time"], 1e-9) if "flop" in window else sps * flops_per_sample) / 1e12
        m = {"step": self.step, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
             "lr": self.scheduler.get_last_lr()[0], "samples_per_s": sps, "tokens_per_s": tps,
             "tflops": tflops, "mfu": tflops / (peak * self.world) if peak else None, "mem_gib": memory_gib(self.device),
             "data_wait": window["data"] / max(window["time"], 1e-9)}
        if self.cfg.train.ema_warmup:  # the warm-up's current decay (fixed decay: not logged, as before)
            m["ema_decay"] = out["ema_decay"]
        self.history.append(m)
        if self.rank != 0:
            return
        self.log(step_line(self.step, m))
        if self.sinks is None:  # a step logged outside fit()
            self.sinks = MetricSinks(self.out, "off")
        self.sinks.log(m, "train")

    # --------------------------------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state()}
        if hasattr(self.loader, "state_dict"):
            extra["data"] = self.loader.state_dict()
        if self.device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return extra

    def save(self) -> Path:
        self.check_finite()
        meta = {"model_config": self.model.config, "train_mode": self.cfg.train.mode,
                "lora_rank": self.cfg.train.lora_rank if self.cfg.train.mode == "lora" else None,
                "world_size": self.world, "config": config_to_dict(self.cfg)}
        path = ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer, self.ema,
                                    self._extra(), meta, keep_last=self.cfg.checkpoint.keep_last)
        self.log(f"checkpoint: {path}")
        return path

    def resume(self, path: Path) -> None:
        changed = self._resume_changes(path)
        try:
            extra = ckpt.load_checkpoint(path, self.model, self.optimizer, self.ema)
        except (ckpt.CheckpointError, FileNotFoundError, KeyError, RuntimeError) as e:
            prev = [p for p in ckpt.list_checkpoints(self.out / "checkpoints") if p != Path(path)]
            hint = (f"the previous complete checkpoint is {prev[-1]}: move the damaged one aside "
                    f"(mv {path} {path}.damaged) and run again to resume from {prev[-1].name}") if prev else \
                "there is no earlier complete checkpoint; start over in another train.output_dir"
            raise ckpt.CheckpointError(f"cannot resume from {path}: {e}\n  {hint}") from None
        self.step = int(extra["step"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if changed:
            self._apply_optim_config()
            for key, (old, new) in changed.items():
                self.log(f"resume: {key} changed {old!r} -> {new!r}; takes effect from step {self.step + 1}")
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["rng_cuda"], self.device)
        if "data" in extra and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(extra["data"])
        self.log(f"resumed from {path} at step {self.step}")

    def _resume_changes(self, path: Path) -> dict:
        meta = ckpt.read_meta(path)
        old = meta.get("config")
        if not old:
            return {}
        old, new = _resolve_saved(old), _resolve_saved(config_to_dict(self.cfg))
        applied, refused = _resume_diff(old, new, cache_fixed=bool(self.cfg.data.cache_dir))
        if refused:
            lines = "\n".join(f"  {k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in refused.items())
            raise ValueError(
                f"resuming {path} with settings that differ from the run that wrote it:\n{lines}\nput the old values "
                "back, or start a new run from these weights in another train.output_dir (modelgrow export, then "
                f"checkpoint.load_weights). Settings that may change on resume: {', '.join(RESUME_FREE + RESUME_APPLIED)}"
            )
        return applied

    def _apply_optim_config(self) -> None:
        """The configured optimizer hyper-parameters over the restored ones; lr keeps the restored schedule position."""
        o = self.cfg.optim
        for g in self.optimizer.param_groups:
            g.update(initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        sch = self.scheduler
        sch.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        lrs = [base * fn(sch.last_epoch) for base, fn in zip(sch.base_lrs, sch.lr_lambdas, strict=True)]
        for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        sch._last_lr = lrs


# keys that may differ from the checkpoint's run on resume: bookkeeping and sharding (no effect on the math) ...
RESUME_FREE = ("train.steps", "train.log_every", "train.output_dir", "checkpoint.", "parallel.", "sample.", "cache.",
               "recaption.", "data.num_workers", "data.decoder", "data.max_fail_fraction", "model.from_pretrained",
               "train.val_", "data.val_", "train.wandb", "train.run_name")
# ... and hyper-parameters that take effect from the next step (applied to the restored optimizer / scheduler / EMA)
RESUME_APPLIED = ("optim.", "train.ema_")


def _resolve_saved(cfg: dict) -> dict:
    """A saved config dict (``meta.json``, any version) in today's keys (replaced keys read as their new ones),
    with the model sizes and the unset ``[data]`` settings resolved to what they mean."""
    import warnings

    from ..config import DATA_DEFAULTS, ConfigError, config_from_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            cfg = config_to_dict(config_from_dict(cfg))
    except ConfigError:  # a config this version cannot read: compare it as it is
        cfg = dict(cfg)
    data = dict(cfg.get("data") or {})
    for key, default in DATA_DEFAULTS.items():
        if data.get(key) is None:
            data[key] = list(default) if isinstance(default, tuple) else default
    return _resolve_model_sizes({**cfg, "data": data})


def _resolve_model_sizes(cfg: dict) -> dict:
    """A saved config dict with the model sizes an unset key resolves to (the preset's, else the fallback):
    a run saved with input_size = [16, 32, 32] and one that leaves it to the same preset are the same model."""
    from ..config import MODEL_SIZE_FALLBACKS
    from ..models.presets import PRESETS

    model = dict(cfg.get("model") or {})
    preset = PRESETS.get(model.get("preset"), {})
    for key, fallback in MODEL_SIZE_FALLBACKS.items():
        if model.get(key) is None:
            model[key] = preset.get(key, fallback)
    return {**cfg, "model": model}


def _resume_diff(old: dict, new: dict, cache_fixed: bool = False) -> tuple[dict, dict]:
    """(applied, refused) {dotted key: (old, new)} between a checkpoint's config and the current one.
    ``cache_fixed``: the run trains from a cache (``data.cache_dir``, itself compared): the ``[data]`` settings the
    cache fixes are checked against the cache, not against the old config."""
    from ..data.cache.format import CACHE_FIXED

    skip = {f"data.{k}" for k in CACHE_FIXED} if cache_fixed else set()
    applied, refused = {}, {}
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples vs lists, as saved in meta.json
    for section in sorted(set(old) | set(new)):
        o, n = old.get(section, {}) or {}, new.get(section, {}) or {}
        for key in sorted(set(o) | set(n)):
            a, b = norm(o.get(key)), norm(n.get(key))
            dotted = f"{section}.{key}"
            if a == b or dotted.startswith(RESUME_FREE) or dotted in RESUME_FREE or dotted in skip:
                continue
            (applied if dotted.startswith(RESUME_APPLIED) else refused)[dotted] = (a, b)
    return applied, refused


def main(cfg: Config) -> int:
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
