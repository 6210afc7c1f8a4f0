"""Deterministic few-step samplers for eps-prediction models trained with the IDDPM linear schedule.

Both use only the eps half of the model output (channels ``[:C]``, C = the latent channels; a learned
sigma in channels ``[C:]`` is ignored) and call the model with integer (long) ORIGINAL timesteps in
[0, num_train_timesteps - 1], like :class:`~modelgrow.diffusion.IDDPM` does.

Time grid ("trailing" spacing): ``t_i = round(T - i * T / steps) - 1`` for i = 0 .. steps-1, i.e. the grid
starts at the last training step T-1 = 999 (the step the model was trained to denoise from pure noise,
and the one Open-Sora's IDDPM sampling starts from) and ends at ``T / steps - 1``. After the last model
call both samplers jump to the clean sample (alpha_bar = 1, sigma = 0), so ``steps`` model calls in all.
"""

from __future__ import annotations

import numpy as np
import torch

from .gaussian_diffusion import _unwrap_output, get_named_beta_schedule, resolve_device

__all__ = ["ddim_sample", "dpm_solver_pp_sample", "sampling_timesteps", "train_alphas_cumprod"]


def train_alphas_cumprod(num_train_timesteps: int = 1000, noise_schedule: str = "linear") -> np.ndarray:
    """alpha_bar_t (float64) of the training schedule."""
    return np.cumprod(1.0 - get_named_beta_schedule(noise_schedule, num_train_timesteps))


def sampling_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The "trailing" grid, descending: [T-1, ..., T/steps - 1] (``steps`` distinct integer timesteps)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ts = [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]
    assert len(set(ts)) == steps and ts[0] == num_train_timesteps - 1 and ts[-1] >= 0
    return ts


def _setup(model, shape, noise, device):
    if not isinstance(shape, (tuple, list)):
        raise TypeError("shape must be a tuple or list")
    device = resolve_device(model, noise, device)
    x = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(x.shape)} != shape {tuple(shape)}")
    return x, device


def _eps(model, x, t: int, model_kwargs):
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out, _ = _unwrap_output(model(x, tt, **model_kwargs))
    return out[:, : x.shape[1]]


def _iter(ts, progress):
    it = list(enumerate(ts))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it)
    return it


@torch.no_grad()
def ddim_sample(model, shape, steps, noise=None, model_kwargs=None, progress=False, device=None,
                num_train_timesteps: int = 1000, noise_schedule: str = "linear", clip_denoised: bool = False):
    """DDIM with eta = 0 (deterministic) over ``steps`` trailing timesteps; returns x_0.

    x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t);  x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps  (s the next
    grid step, ab_s = 1 after the last one)."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    ab = train_alphas_cumprod(num_train_timesteps, noise_schedule)
    ts = sampling_timesteps(steps, num_train_timesteps)
    x, _ = _setup(model, shape, noise, device)
    for i, t in _iter(ts, progress):
        eps = _eps(model, x, t, model_kwargs)
        a_t, s_t = float(np.sqrt(ab[t])), float(np.sqrt(1.0 - ab[t]))
        x0 = (x - s_t * eps) / a_t
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(ts):
            x = x0
        else:
            ab_s = ab[ts[i + 1]]
            x = float(np.sqrt(ab_s)) * x0 + float(np.sqrt(1.0 - ab_s)) * eps
    return x


@torch.no_grad()
def dpm_solver_pp_sample(model, shape, steps, noise=None, model_kwargs=None, progress=False, device=None,
                         num_train_timesteps: int = 1000, noise_schedule: str = "linear",
                         clip_denoised: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data (x0) prediction, exact in the
    log-SNR lambda = log(alpha / sigma) with alpha = sqrt(ab), sigma = sqrt(1 - ab).

    Step s -> t with h = lambda_t - lambda_s and D the data estimate:
        x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D
    D = x0_s at the first step (first order, = DDIM), then
    D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev with r = h_prev / h. The final step (to sigma = 0, h = inf) is
    first order: x_0 = x0 prediction at the last grid step. ``steps`` model calls; returns x_0."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    ab = train_alphas_cumprod(num_train_timesteps, noise_schedule)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sigma)
    ts = sampling_timesteps(steps, num_train_timesteps)
    x, _ = _setup(model, shape, noise, device)
    x0_prev, h_prev = None, None
    for i, t in _iter(ts, progress):
        eps = _eps(model, x, t, model_kwargs)
        x0 = (x - float(sigma[t]) * eps) / float(alpha[t])
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(ts):
            x = x0
            break
        s = ts[i + 1]
        h = float(lam[s] - lam[t])
        if x0_prev is None:
            d = x0
        else:
            c = 1.0 / (2.0 * (h_prev / h))
            d = (1.0 + c) * x0 - c * x0_prev
        x = float(sigma[s] / sigma[t]) * x - float(alpha[s] * np.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return x
