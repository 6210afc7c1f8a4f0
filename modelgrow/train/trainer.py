"""The training loop: ``modelgrow train --config X.toml [--section.key v ...]``, alone or under ``torchrun``.

Per optimizer step: ``train.grad_accum`` batches of latents and text states (from the latent/text cache, or
raw videos encoded on the fly by the VAE + T5 [+ LLM] in ``data.vae/t5/llm``), a diffusion timestep per
sample (uniform as in Open-Sora v1.0, or logit-normal: ``train.timestep_sampling``), the joint condition
dropout, the IDDPM loss (MSE + VB), AdamW with gradient clipping, the fp32 EMA. Every ``train.log_every`` steps one step line (DESIGN convention 8) goes to stdout, ``metrics.jsonl``
and TensorBoard (when installed); a non-finite loss stops the run with an error before any checkpoint is
written. Resumable checkpoints (train/checkpoint.py) every ``checkpoint.every_steps`` and at the end.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, config_to_dict, save_config
from ..diffusion import IDDPM
from ..grow import add_llm_condition, expand, freeze_original_blocks
from ..models import STDiT, from_pretrained, load_checkpoint
from ..models.checkpoint import CONFIG_NAME
from ..models.flops import stdit_flops
from . import checkpoint as ckpt
from .metrics import device_peak_tflops, memory_gib, step_line
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
    architecture; an Open-Sora / PixArt / safetensors file loads into ``[model]``), then growth and the LLM
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


class Encoders:
    """Raw video batches -> latents and text states, with the frozen VAE / T5 / LLM of ``[data]``."""

    def __init__(self, cfg: Config, device: torch.device, has_llm: bool):
        from ..text import LLMEncoder, T5Encoder
        from ..vae import VideoVAE

        d = cfg.data
        if not (d.vae and d.t5):
            raise ValueError("training from raw videos needs data.vae and data.t5 (local dirs), or use data.cache_dir")
        if has_llm and not d.llm:
            raise ValueError("the model has an LLM condition: set data.llm (a local causal LM dir)")
        self.vae = VideoVAE.from_pretrained(d.vae, device=device)
        self.t5 = T5Encoder(d.t5, max_length=cfg.model.stdit_kwargs()["model_max_length"], device=device)
        self.llm = (LLMEncoder(d.llm, max_length=cfg.grow.llm_max_length, layer=d.llm_layer,
                               use_template=d.llm_use_template, device=device) if has_llm else None)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        latent = self.vae.encode(batch["video"].to(self.vae.dtype))
        y, mask = self.t5.encode(batch["prompt"])
        out = {"latent": latent.float(), "y": y, "mask": mask}
        if self.llm is not None:
            out["y_llm"], out["llm_mask"] = self.llm.encode(batch["prompt"])
        return out


class Trainer:
    def __init__(self, cfg: Config, loader: Iterable | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.log = log if self.rank == 0 else (lambda *_: None)
        self.out = Path(cfg.train.output_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg).to(self.device)
        self.has_llm = hasattr(self.model, "llm_embedder")
        self.applied = parallelize(self.model, cfg.parallel, self.world)
        if self.world > 1 and cfg.parallel.fsdp:
            self.model.dtype = torch.float32 if cfg.parallel.param_dtype == "float32" else torch.bfloat16
        torch.manual_seed(cfg.train.seed + 1000 * self.rank + 1)  # per-rank stream for anything else random
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.diffusion = IDDPM(timestep_respacing="")
        self.loader = loader if loader is not None else self._default_loader()
        self.encoders: Encoders | None = None
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._writer = None
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
    def _default_loader(self):
        from ..data import build_loader  # the manifest / cache loaders (modelgrow.data)

        return build_loader(self.cfg, rank=self.rank, world_size=self.world)

    def _autocast(self):
        mp = self.cfg.train.mixed_precision
        if mp == "fp32" or (self.world > 1 and self.cfg.parallel.fsdp):  # FSDP2 casts by its policy
            return nullcontext()
        if mp == "fp16" and self.device.type == "cpu":
            raise ValueError("train.mixed_precision = fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "latent" not in batch:
            if self.encoders is None:
                self.encoders = Encoders(self.cfg, self.device, self.has_llm)
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
                loss = self.diffusion.training_losses(self.model, x0, t, model_kwargs=kwargs, noise=noise)["loss"].mean()
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
        self.ema.update(self.model)
        self._nonfinite |= ~torch.isfinite(total)
        return {"loss": total, "grad_norm": grad_norm, "samples": samples, "tokens": tokens, "flop": flop}

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
            noises.append(torch.randn(shape[1:], generator=g))
        return (torch.cat(ts).to(self.device), torch.stack(noises).to(self.device), torch.cat(us))

    def _draw_timestep(self, g: torch.Generator) -> torch.Tensor:
        """One training timestep [1] (int64) from ``g``: uniform (Open-Sora v1.0) or logit-normal (SD3)."""
        n, tc = self.diffusion.num_timesteps, self.cfg.train
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
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            if dist.is_initialized():
                dist.barrier()
            self._overwrite = False
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.toml")
            self.log(f"model: {len(self.model.blocks)} blocks, {sum(p.numel() for p in self.model.parameters()):,} "
                     f"parameters ({sum(p.numel() for p in self.params):,} trainable) | world {self.world} | "
                     f"{self.device} | parallel {self.applied}")
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
            if self.step % cfg.checkpoint.every_steps == 0 or last:
                self.save()
        if bar is not None:
            bar.close()
        return self.history

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
        self.history.append(m)
        if self.rank != 0:
            return
        self.log(step_line(self.step, m))
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._writer = False
        if self._writer:
            for k, v in m.items():
                if k != "step" and v is not None:
                    self._writer.add_scalar(f"train/{k}", v, self.step)

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
        applied, refused = _resume_diff(_resolve_model_sizes(old), _resolve_model_sizes(config_to_dict(self.cfg)))
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
        lrs = [base * fn(sch.last_epoch) for base, fn in zip(sch.base_lrs, sch.lr_lambdas)]
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        sch._last_lr = lrs


# keys that may differ from the checkpoint's run on resume: bookkeeping and sharding (no effect on the math) ...
RESUME_FREE = ("train.steps", "train.log_every", "train.output_dir", "checkpoint.", "parallel.", "sample.",
               "data.num_workers", "data.decoder", "data.max_fail_fraction", "model.from_pretrained")
# ... and hyper-parameters that take effect from the next step (applied to the restored optimizer / scheduler)
RESUME_APPLIED = ("optim.", "train.ema_decay")


def _resolve_model_sizes(cfg: dict) -> dict:
    """A saved config dict with the model sizes an unset key resolves to (the preset's, else the fallback):
    a run saved with input_size = [16, 32, 32] and one that leaves it to the same preset are the same model."""
    from ..config import MODEL_SIZE_FALLBACKS
    from ..models.zoo import PRESETS

    model = dict(cfg.get("model") or {})
    preset = PRESETS.get(model.get("preset"), {})
    for key, fallback in MODEL_SIZE_FALLBACKS.items():
        if model.get(key) is None:
            model[key] = preset.get(key, fallback)
    return {**cfg, "model": model}


def _resume_diff(old: dict, new: dict) -> tuple[dict, dict]:
    """(applied, refused) {dotted key: (old, new)} between a checkpoint's config and the current one."""
    applied, refused = {}, {}
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples vs lists, as saved in meta.json
    for section in sorted(set(old) | set(new)):
        o, n = old.get(section, {}) or {}, new.get(section, {}) or {}
        for key in sorted(set(o) | set(n)):
            a, b = norm(o.get(key)), norm(n.get(key))
            dotted = f"{section}.{key}"
            if a == b or dotted.startswith(RESUME_FREE) or dotted in RESUME_FREE:
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
