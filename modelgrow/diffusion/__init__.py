"""Diffusion for ModelGrow: Open-Sora v1.0's IDDPM (training losses and ancestral sampling, numerically
identical), deterministic few-step samplers (DDIM, DPM-Solver++(2M)) and classifier-free guidance
wrappers (single condition, and the paper's T5 + LLM two-condition guidance)."""

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
from .samplers import ddim_sample, dpm_solver_pp_sample, sampling_timesteps

__all__ = [
    "IDDPM",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "cfg_model_fn",
    "ddim_sample",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_pp_sample",
    "get_named_beta_schedule",
    "get_sampler",
    "mean_flat",
    "normal_kl",
    "sampling_timesteps",
    "space_timesteps",
    "two_condition_model_fn",
]

SAMPLERS = ("iddpm", "ddim", "dpm-solver")
_ALIASES = {"dpm-solver++": "dpm-solver", "dpm_solver": "dpm-solver", "dpmsolver": "dpm-solver", "dpm": "dpm-solver"}


def get_sampler(name: str, steps: int) -> Callable:
    """``sample(model_fn, shape, noise=None, model_kwargs=None, progress=False, device=None) -> x0``.

    iddpm: Open-Sora's ancestral sampler on ``IDDPM(num_sampling_steps=steps)`` (clip_denoised=False;
    draws its per-step noise from torch's global RNG). ddim / dpm-solver: deterministic, ``steps`` model
    calls on the trailing grid (see :mod:`modelgrow.diffusion.samplers`)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "iddpm":
        diffusion = IDDPM(num_sampling_steps=steps)

        def sample(model_fn, shape, noise=None, model_kwargs=None, progress=False, device=None):
            return diffusion.p_sample_loop(model_fn, shape, noise=noise, clip_denoised=False,
                                           model_kwargs=model_kwargs, device=device, progress=progress)

        sample.diffusion = diffusion
    elif key in ("ddim", "dpm-solver"):
        fn = ddim_sample if key == "ddim" else dpm_solver_pp_sample

        def sample(model_fn, shape, noise=None, model_kwargs=None, progress=False, device=None):
            return fn(model_fn, shape, steps, noise=noise, model_kwargs=model_kwargs, progress=progress, device=device)

    else:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    sample.sampler_name = key
    sample.steps = steps
    return sample
