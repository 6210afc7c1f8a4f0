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
