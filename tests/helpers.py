"""Helpers shared by the tests."""

import math

import torch


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and the null-caption buffer random values, so that zero-initialised layers
    (cross-attention / temporal outputs, final linear) cannot hide a wrong computation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            scale = std if p.ndim == 1 or "scale_shift_table" in name else 1.0 / fan_in**0.5
            if name == "x_embedder.proj.weight":
                scale = 1.0 / p[0].numel() ** 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
        if hasattr(model, "y_embedder"):
            b = model.y_embedder.y_embedding
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
    return model


def build_tiny_pipeline(d, **settings):
    """A saved tiny ModelGrowPipeline under ``d / "pipeline"`` (2-block STDiT on a 3x4x4 latent, tiny
    AutoencoderKL, tiny T5 with a real tokenizer); ``settings`` are its sampling defaults."""
    import diffusers

    from modelgrow.models import STDiT
    from modelgrow.pipeline import ModelGrowPipeline
    from modelgrow.text import T5Encoder
    from modelgrow.text.tiny import build_tiny_t5
    from modelgrow.vae import VideoVAE

    build_tiny_t5(str(d / "t5"))
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4).save_pretrained(d / "vae")
    model = randomize_(STDiT(depth=2, hidden_size=32, num_heads=4, caption_channels=32, model_max_length=8,
                             input_size=(3, 4, 4))).eval()
    pipe = ModelGrowPipeline(model, VideoVAE.from_pretrained(d / "vae", micro_batch_size=2),
                             T5Encoder(str(d / "t5"), max_length=8, device="cpu"), config=settings)
    pipe.save_pretrained(d / "pipeline")
    return d / "pipeline"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of videos in [-1, 1]."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(frames: torch.Tensor, out, steps: int = 300, lr: float = 3e-3) -> None:
    """A tiny AutoencoderTiny (4x downsampling, 4 latent channels) fitted to ``frames`` [N, 3, H, W] in [-1, 1],
    latents standardised like the demo's (shift/scaling factors in the saved config)."""
    import diffusers

    torch.manual_seed(0)
    ch = (16, 16, 16)
    vae = diffusers.AutoencoderTiny(encoder_block_out_channels=ch, decoder_block_out_channels=ch[::-1],
                                    num_encoder_blocks=(1,) * 3, num_decoder_blocks=(1,) * 3)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        b = frames[torch.randint(0, len(frames), (16,), generator=g)]
        loss = (vae.decode(vae.encode(b).latents).sample - b).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        z = vae.encode(frames).latents
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    vae.save_pretrained(out)
