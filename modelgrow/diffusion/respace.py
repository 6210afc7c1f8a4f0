"""Timestep respacing: run a diffusion on a subset of the training timesteps (guided-diffusion's scheme)."""

from __future__ import annotations

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["SpacedDiffusion", "space_timesteps"]


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The original timesteps to keep.

    ``section_counts`` is a list of ints or a comma-separated string: the process is cut into that many
    (near-)equal sections and section i keeps ``section_counts[i]`` steps spread evenly over it, both ends
    included (``"100"`` over 1000 steps keeps 0, 10, 20, ..., 989, 999). ``"ddimN"`` picks the integer stride
    giving exactly N steps (0, s, 2s, ...)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    n_sec = len(section_counts)
    base, rem = divmod(num_timesteps, n_sec)
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < rem else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0  # accumulated in floating point and rounded half-to-even, as guided-diffusion does
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class _WrappedModel:
    """Calls the model with the ORIGINAL timesteps: spaced index i -> timestep_map[i] (no rescaling)."""

    def __init__(self, model, map_tensor: torch.Tensor, original_num_steps: int):
        self.model = model
        self.map_tensor = map_tensor
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = self.map_tensor.to(ts.device)[ts].to(dtype=ts.dtype)
        return self.model(x, new_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only ``use_timesteps`` of a base process: the betas are re-derived so that
    alphas_cumprod at the kept steps is the base process's, and the model is called with the original
    timestep values.

    :param float32_betas: False (default) keeps the re-derived betas float64 (``np.array(new_betas)``), as
        Open-Sora **v1.0.0**, DiT and guided-diffusion do; True rounds them to float32 first
        (``torch.FloatTensor(new_betas)``), which first appears in Open-Sora v1.1.0 (respaced betas then
        differ by up to 2.9e-8: 2.7e-8 at 10 steps, 7.4e-9 at 100).
    """

    def __init__(self, use_timesteps, *, float32_betas: bool = False, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        self.timestep_map: list[int] = []
        new_betas = []
        last = 1.0
        for i, ac in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - ac / last)
                last = ac
                self.timestep_map.append(i)
        betas = np.array(new_betas, dtype=np.float64)
        if float32_betas:
            betas = betas.astype(np.float32).astype(np.float64)
        kwargs["betas"] = betas
        super().__init__(**kwargs)
        self.map_tensor = torch.tensor(self.timestep_map)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.map_tensor, self.original_num_steps)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)
