"""Samplers as diffusers schedulers: any ``diffusers`` ``SchedulerMixin`` drives ModelGrow's denoising loop.

    scheduler = make_scheduler("dpm-solver")          # diffusers' DPMSolverMultistepScheduler, DPM-Solver++(2M)
    scheduler = make_scheduler("iddpm")               # Open-Sora v1.0's ancestral IDDPM, bit-exact
    x0 = denoise(scheduler, model_fn, noise, num_inference_steps=20)

The fast samplers are diffusers' own classes, configured for Open-Sora v1.0's training schedule (linear betas
1e-4 .. 0.02 over 1000 steps, eps prediction; diffusers builds the betas in float32, v1.0 in float64) with
the "trailing" timestep grid (the first model call at t = 999) and a final jump to the clean sample:

* ``ddim``       ``DDIMScheduler`` (eta = 0, ``set_alpha_to_one=True``);
* ``dpm-solver`` ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, ``final_sigmas_type="zero"``);
* ``euler``      ``EulerDiscreteScheduler``;
* ``iddpm``      :class:`IDDPMScheduler`, Open-Sora v1.0's respaced learned-range IDDPM wrapped as a
                 scheduler (it consumes the model's learned-variance channels; the others get eps only).

Open-Sora v1.0 draws the ancestral noise of each IDDPM step from torch's global RNG after the model call;
:class:`IDDPMScheduler` does the same when ``step`` gets no generator, so a loop over its steps reproduces
``IDDPM.p_sample_loop`` bit for bit. With a generator the noise comes from that generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .gaussian_diffusion import _unwrap_output
from .iddpm import IDDPM

__all__ = ["IDDPMScheduler", "SCHEDULERS", "make_scheduler", "denoise", "uses_learned_variance", "scheduler_name"]

# Open-Sora v1.0's training schedule
TRAIN_SCHEDULE: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                      prediction_type="epsilon")
SCHEDULERS = ("iddpm", "ddim", "dpm-solver", "euler")
_ALIASES = {"dpm-solver++": "dpm-solver", "dpm_solver": "dpm-solver", "dpmsolver": "dpm-solver", "dpm": "dpm-solver",
            "dpmsolver++": "dpm-solver"}


def _diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - diffusers is a core dependency of inference
        raise ImportError("sampling needs diffusers: pip install 'modelgrow[vae]' (it brings diffusers)") from e
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config

    return ConfigMixin, SchedulerMixin, register_to_config


ConfigMixin, SchedulerMixin, register_to_config = _diffusers()


class IDDPMScheduler(SchedulerMixin, ConfigMixin):
    """Open-Sora v1.0's IDDPM (linear betas, learned-range variance, eps prediction, respaced to
    ``num_inference_steps`` with ``space_timesteps``) as a diffusers scheduler.

    ``step(model_output, t, sample)`` takes the model's full output ``[B, 2C, ...]`` (eps, then the variance
    values) and returns x_{t-1} = mean + exp(0.5 log_var) z (no noise at the last step), computed by
    :class:`modelgrow.diffusion.IDDPM` itself, so the numbers are Open-Sora v1.0's (float64 schedule, respaced
    betas in float64 as v1.0.0 keeps them; ``float32_betas=True`` is v1.1's rounding)."""

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        variance_type: str = "learned_range",
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        float32_betas: bool = False,
    ):
        if variance_type not in ("learned_range", "fixed_small", "fixed_large"):
            raise ValueError(f"variance_type must be learned_range, fixed_small or fixed_large, got {variance_type!r}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._build(None)
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)

    def _build(self, steps: int | None) -> None:
        c = self.config
        self.diffusion = IDDPM(
            num_sampling_steps=steps, noise_schedule=c.beta_schedule, diffusion_steps=c.num_train_timesteps,
            learn_sigma=c.variance_type == "learned_range", sigma_small=c.variance_type == "fixed_small",
            prediction_type=c.prediction_type, float32_betas=c.float32_betas,
        )
        self._index = {t: i for i, t in enumerate(self.diffusion.timestep_map)}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if isinstance(num_inference_steps, bool) or not 1 <= int(num_inference_steps) <= self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.config.num_train_timesteps}], got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        self._build(self.num_inference_steps)
        self.timesteps = torch.tensor(self.diffusion.timestep_map[::-1], dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True,
             variance_noise: torch.Tensor | None = None):
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        t = int(timestep)
        if t not in self._index:
            raise ValueError(f"timestep {t} is not on this scheduler's grid (call set_timesteps first): {self.timesteps.tolist()[:8]}...")
        i = self._index[t]
        ts = torch.full((sample.shape[0],), i, dtype=torch.long, device=sample.device)
        out = self.diffusion.p_mean_variance(lambda x, _t, **_k: model_output, sample, ts,
                                             clip_denoised=self.config.clip_sample)
        if variance_noise is not None:
            noise = variance_noise
        elif generator is None:
            noise = torch.randn_like(sample)  # the global RNG, as Open-Sora v1.0's p_sample
        else:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        nonzero = (ts != 0).float().view(-1, *([1] * (sample.ndim - 1)))
        prev = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        if not return_dict:
            return (prev, out["pred_xstart"])
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=out["pred_xstart"])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) on the training schedule (``timesteps`` are original timesteps)."""
        base = IDDPM(noise_schedule=self.config.beta_schedule, diffusion_steps=self.config.num_train_timesteps)
        return base.q_sample(original_samples, timesteps.to(original_samples.device), noise=noise)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def scheduler_name(scheduler) -> str:
    """``iddpm`` / ``ddim`` / ``dpm-solver`` / ``euler`` for the schedulers :func:`make_scheduler` builds,
    else the class name."""
    names = {"IDDPMScheduler": "iddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm-solver",
             "EulerDiscreteScheduler": "euler"}
    return names.get(type(scheduler).__name__, type(scheduler).__name__)


def make_scheduler(name: str, **overrides: Any):
    """A scheduler by name (``iddpm``, ``ddim``, ``dpm-solver``, ``euler``) on Open-Sora v1.0's training schedule;
    ``overrides`` go to the scheduler's constructor."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key == "iddpm":
        return IDDPMScheduler(**overrides)
    if key == "ddim":
        return DDIMScheduler(**{**TRAIN_SCHEDULE, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                                "timestep_spacing": "trailing", **overrides})
    if key == "dpm-solver":
        return DPMSolverMultistepScheduler(**{**TRAIN_SCHEDULE, "algorithm_type": "dpmsolver++", "solver_order": 2,
                                              "timestep_spacing": "trailing", "final_sigmas_type": "zero",
                                              "lower_order_final": True, **overrides})
    if key == "euler":
        return EulerDiscreteScheduler(**{**TRAIN_SCHEDULE, "timestep_spacing": "trailing", **overrides})
    raise ValueError(f"unknown sampler {name!r}; expected one of {SCHEDULERS} (or pass any diffusers scheduler)")


def uses_learned_variance(scheduler) -> bool:
    """True when the scheduler consumes the model's variance channels (IDDPM / DDPM learned range)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


@torch.no_grad()
def denoise(
    scheduler,
    model: Callable,
    latents: torch.Tensor,
    num_inference_steps: int,
    model_kwargs: dict[str, Any] | None = None,
    groups: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool | Callable = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` from ``latents`` (already scaled by ``init_noise_sigma``) to x_0.

    Each step calls ``model(cat([x] * groups), t, **model_kwargs)`` ONCE (a guidance wrapper combines the
    groups and returns the guided output tiled over them) and steps on the first group's output: the full
    output for a learned-variance scheduler, the first C (eps) channels otherwise. ``callback(i, t, x)`` runs
    after every step and may return a replacement x. ``progress`` is a bool or a context-manager factory
    ``progress(total=N)`` (a diffusers pipeline's ``progress_bar``)."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    x, C, B = latents, latents.shape[1], latents.shape[0]
    learned = uses_learned_variance(scheduler)
    step_kw = {"generator": generator} if generator is not None else {}
    if callable(progress):
        bar = progress(total=len(timesteps))
    else:
        from contextlib import nullcontext

        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(timesteps))
        else:
            bar = nullcontext()
    with bar as pbar:
        for i, t in enumerate(timesteps):
            inp = scheduler.scale_model_input(x, t)
            inp = torch.cat([inp] * groups) if groups > 1 else inp
            tt = t.expand(inp.shape[0]) if torch.is_tensor(t) else torch.full((inp.shape[0],), t, device=x.device)
            out, _ = _unwrap_output(model(inp, tt, **model_kwargs))
            out = out[:B]
            if not learned:
                out = out[:, :C]
            x = scheduler.step(out.to(x.dtype), t, x, **step_kw).prev_sample
            if callback is not None:
                new = callback(i, t, x)
                if new is not None:
                    x = new
            if pbar is not None:
                pbar.update()
    return x
