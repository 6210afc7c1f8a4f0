"""Diffusion for ModelGrow: Open-Sora v1.0's IDDPM (training losses and ancestral sampling, numerically
identical), samplers as diffusers schedulers (IDDPM wrapped as one, diffusers' DDIM / DPM-Solver++(2M) /
Euler for few-step sampling) and classifier-free guidance wrappers (single condition, and the paper's
T5 + LLM two-condition guidance)."""

from __future__ import annotations

from collections.abc import Callable

from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    normal_kl,
)
from .guidance import cfg_model_fn, two_condition_model_fn
from .iddpm import IDDPM
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "IDDPM",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "cfg_model_fn",
    "IDDPMScheduler",
    "SCHEDULERS",
    "denoise",
    "make_scheduler",
    "scheduler_name",
    "uses_learned_variance",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "get_sampler",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
    "two_condition_model_fn",
]

SAMPLERS = ("iddpm", "ddim", "dpm-solver", "euler")
_SCHEDULER_NAMES = ("SCHEDULERS", "IDDPMScheduler", "denoise", "make_scheduler", "scheduler_name", "uses_learned_variance")


def __getattr__(name: str):
    # the schedulers need diffusers (the inference extra); training uses IDDPM alone and does not import it
    if name in _SCHEDULER_NAMES:
        from . import schedulers

        return getattr(schedulers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_sampler(name: str, steps: int, prediction_type: str = "epsilon") -> Callable:
    """``sample(model_fn, shape, noise=None, model_kwargs=None, progress=False, device=None) -> x0``: the
    scheduler ``make_scheduler(name)`` run for ``steps`` model calls over the whole batch (see
    :func:`modelgrow.diffusion.schedulers.denoise`). iddpm draws its per-step noise from torch's global RNG,
    as Open-Sora v1.0 does."""
    import torch

    from .gaussian_diffusion import resolve_device

    from .schedulers import denoise, make_scheduler, scheduler_name

    scheduler = make_scheduler(name, prediction_type=prediction_type)

    def sample(model_fn, shape, noise=None, model_kwargs=None, progress=False, device=None):
        if not isinstance(shape, (tuple, list)):
            raise TypeError("shape must be a tuple or list")
        device = resolve_device(model_fn, noise, device)
        x = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(x.shape)} != shape {tuple(shape)}")
        return denoise(scheduler, model_fn, x * scheduler.init_noise_sigma, steps, model_kwargs, progress=progress)

    sample.scheduler = scheduler
    sample.sampler_name = scheduler_name(scheduler)
    sample.steps = steps
    return sample
