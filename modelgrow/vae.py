"""Video VAE: a diffusers image autoencoder applied frame by frame in micro-batches. ``AutoencoderKL`` is the
sd-vae-ft-ema layout Open-Sora v1.0 uses (latents scaled by 0.18215); ``AutoencoderTiny`` (TAESD layout,
deterministic, no GroupNorm) is what the demo trains on its synthetic frames. Latents are
``(raw - shift_factor) * scaling_factor``, both read from the autoencoder's config unless given (diffusers'
AutoencoderKL default, 0.18215 and no shift, is Open-Sora's value).

    vae = VideoVAE.from_pretrained("weights/sd-vae-ft-ema", micro_batch_size=4)
    z = vae.encode(video)     # [B, 3, T, H, W] in [-1, 1] -> [B, 4, T, H/8, W/8]
    video = vae.decode(z)     # and back

Weights load from a local directory only (nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

SCALING_FACTOR = 0.18215


def is_diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' AutoencoderTiny registers ``block_out_channels`` in its own config and then warns, on every
    load, that the attribute is unexpected; keep that noise out of the logs while loading."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def autoencoder_class(path: str | os.PathLike):
    """The diffusers class saved in ``path``/config.json (``_class_name``): AutoencoderKL or AutoencoderTiny."""
    import json

    from diffusers import AutoencoderKL, AutoencoderTiny

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no autoencoder here (config.json missing); VAEs load from local directories only")
    name = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    if name not in classes:
        raise ValueError(f"{path}/config.json: _class_name {name!r} is not a supported image autoencoder ({', '.join(classes)})")
    return classes[name]


class VideoVAE(nn.Module):
    """Frame-wise wrapper around an ``AutoencoderKL``; ``micro_batch_size`` frames go through at a time
    (None: all frames of the batch at once)."""

    def __init__(self, module: nn.Module, micro_batch_size: int | None = 4, scaling_factor: float | None = None,
                 sample_posterior: bool = True, shift_factor: float | None = None):
        super().__init__()
        if micro_batch_size is not None and micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0 or None, got {micro_batch_size}")
        self.module = module
        self.micro_batch_size = micro_batch_size
        cfg = module.config
        if scaling_factor is None:
            scaling_factor = getattr(cfg, "scaling_factor", None) or SCALING_FACTOR
        if shift_factor is None:
            shift_factor = getattr(cfg, "shift_factor", None) or 0.0
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.sample_posterior = sample_posterior
        self.out_channels = cfg.latent_channels
        # AutoencoderKL: one 2x downsample per block but the last; AutoencoderTiny: one per encoder block but the first
        levels = len(getattr(cfg, "encoder_block_out_channels", None) or cfg.block_out_channels) - 1
        if getattr(cfg, "upsampling_scaling_factor", 2) != 2:
            raise ValueError("only AutoencoderTiny with upsampling_scaling_factor=2 is supported")
        self.patch_size = (1, 2**levels, 2**levels)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, micro_batch_size: int | None = 4, device=None, dtype=None, **kw) -> VideoVAE:
        if not is_diffusers_available():
            raise ImportError("the VAE needs diffusers: pip install diffusers")
        path = Path(path)
        with quiet_diffusers():
            module = autoencoder_class(path).from_pretrained(str(path), local_files_only=True)
        vae = cls(module.eval().requires_grad_(False), micro_batch_size=micro_batch_size, **kw)
        return vae.to(device=device, dtype=dtype)

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) pixels -> (T, H/f, W/f) latent (f = 8 for sd-vae-ft-ema)."""
        return tuple(s // p for s, p in zip(input_size, self.patch_size, strict=True))  # type: ignore[return-value]

    def _framewise(self, x: torch.Tensor, fn) -> torch.Tensor:
        B, C, T, H, W = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        step = self.micro_batch_size or frames.shape[0]
        out = torch.cat([fn(frames[i : i + step]) for i in range(0, frames.shape[0], step)])
        return out.reshape(B, T, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> scaled latents [B, C_z, T, H/8, W/8]."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"expected a video batch [B, 3, T, H, W]; got {list(x.shape)}")

        def enc(f):
            out = self.module.encode(f.to(self.dtype))
            if hasattr(out, "latent_dist"):
                dist = out.latent_dist
                z = dist.sample(generator=generator) if self.sample_posterior else dist.mode()
            else:  # deterministic autoencoder (AutoencoderTiny)
                z = out.latents
            return (z - self.shift_factor) * self.scaling_factor

        return self._framewise(x, enc)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C_z, T, h, w] -> videos [B, 3, T, 8h, 8w] (roughly in [-1, 1])."""
        if z.ndim != 5 or z.shape[1] != self.out_channels:
            raise ValueError(f"expected latents [B, {self.out_channels}, T, h, w]; got {list(z.shape)}")
        return self._framewise(z, lambda f: self.module.decode(f.to(self.dtype) / self.scaling_factor + self.shift_factor).sample)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def foreground_mask(frames: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """[N, 1, H, W] bool: the pixels of frames [N, 3, H, W] in [-1, 1] whose largest channel difference from the
    frame's background colour (the median of its border pixels) exceeds ``threshold``."""
    border = torch.cat([frames[..., 0, :], frames[..., -1, :], frames[..., :, 0], frames[..., :, -1]], dim=-1)
    bg = border.median(dim=-1).values[..., None, None]  # [N, 3, 1, 1]
    return (frames - bg).abs().amax(dim=1, keepdim=True) > threshold


def foreground_weights(frames: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights ``1 + weight * fg`` for frames [N, 3, H, W] in [-1, 1] with a plain background
    (``fg``: :func:`foreground_mask`). In the synthetic world the object covers 1-5% of a frame, so a plain
    mean-squared error spends almost all of a small autoencoder's capacity on the background and returns the
    object as a blob of roughly the right colour; weighting the object's pixels keeps its outline."""
    return 1.0 + weight * foreground_mask(frames, threshold).to(frames.dtype)


def foreground_psnr(frames: torch.Tensor, recon: torch.Tensor, threshold: float = 0.1) -> float:
    """PSNR (dB, peak-to-peak 2) of ``recon`` against ``frames`` [N, 3, H, W] in [-1, 1] over the foreground
    pixels of ``frames`` only (:func:`foreground_mask`; every pixel when a batch has none). The whole-frame PSNR
    of an autoencoder that returns the background alone is still ~20 dB when objects cover a few % of a frame;
    this reads ~10 dB for it, 24 dB for the shipped demo bundle's VAE on held-out clips and 29-39 dB for
    ``experiments/direction_bridge.py``'s fits on their training clips."""
    m = foreground_mask(frames, threshold).expand_as(frames)
    err = (recon.clamp(-1, 1) - frames)[m] if m.any() else recon.clamp(-1, 1) - frames
    return 10 * math.log10(4.0 / max(err.square().mean().item(), 1e-12))


def check_reconstruction(vae: nn.Module, frames: torch.Tensor, min_foreground_psnr: float = 15.0, n: int = 256) -> float:
    """The foreground PSNR of a trained ``AutoencoderTiny`` on up to ``n`` of ``frames`` (evenly spaced); raises
    when it is below ``min_foreground_psnr``: a fit whose latents lost the object (seen once: a 1000-step fit on
    red/green/blue/yellow shapes on gray read 10.5 dB and a DiT trained on its latents drew empty frames)."""
    idx = torch.linspace(0, len(frames) - 1, min(n, len(frames))).long()
    with torch.no_grad():
        x = frames[idx]
        rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latents).sample for i in range(0, len(x), 64)])
    db = foreground_psnr(x, rec)
    if db < min_foreground_psnr:
        raise RuntimeError(f"the autoencoder does not reconstruct the objects: foreground PSNR {db:.1f} dB < "
                           f"{min_foreground_psnr:g} dB, so its latents carry (almost) nothing but the background. "
                           "Train it for more steps or with another seed (nothing was saved).")
    return db


def train_tiny_autoencoder(frames: torch.Tensor, steps: int, lr: float = 3e-3, channels: tuple[int, ...] = (32, 32, 32),
                           latent_channels: int = 4, batch_size: int = 16, foreground_weight: float = 0.0,
                           seed: int = 0, progress=None) -> tuple[nn.Module, list[float]]:
    """Train a diffusers ``AutoencoderTiny`` (TAESD layout: ``len(channels) - 1`` 2x downsamplings, no
    GroupNorm) on ``frames`` [N, 3, H, W] in [-1, 1] with a (foreground-weighted, see ``foreground_weights``)
    squared error, AdamW and a one-cycle learning rate. Afterwards the latents are standardised like SD's:
    ``shift_factor`` / ``scaling_factor`` (mean and 1/std of the training frames' latents) are written into the
    module's config, so ``VideoVAE`` picks them up after ``save_pretrained``. ``progress`` wraps the step
    iterator (e.g. tqdm). Returns the module (eval mode) and the loss per step."""
    from diffusers import AutoencoderTiny

    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [N, 3, H, W] in [-1, 1]; got {list(frames.shape)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ch = tuple(int(c) for c in channels)
        vae = AutoencoderTiny(encoder_block_out_channels=ch, decoder_block_out_channels=ch[::-1],
                              num_encoder_blocks=(1,) * len(ch), num_decoder_blocks=(1,) * len(ch),
                              latent_channels=latent_channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    it = range(steps) if progress is None else progress(range(steps))
    vae.train()
    for _ in it:
        batch = frames[torch.randint(0, len(frames), (batch_size,), generator=g)]
        err = (vae.decode(vae.encode(batch).latents).sample - batch).square()
        if foreground_weight > 0:
            err = err * foreground_weights(batch, foreground_weight)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(frames[i : i + 64]).latents for i in range(0, len(frames), 64)])
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / max(z.std().item(), 1e-6))
    return vae, losses
