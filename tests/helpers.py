"""Helpers shared by the tests."""

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
