"""Gaussian diffusion (IDDPM / guided-diffusion formulation) as used by Open-Sora v1.0, DiT and PixArt.

The schedule terms are numpy float64 arrays; every use gathers them per sample with
:func:`_extract_into_tensor`, which casts to float32 *after* the gather, exactly as guided-diffusion does,
so the numbers are the same as Open-Sora v1.0's ``IDDPM`` for the same inputs and noise.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "_extract_into_tensor",
]

_LOG2 = np.log(2.0)


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    PREVIOUS_X = enum.auto()
    START_X = enum.auto()
    EPSILON = enum.auto()
    VELOCITY = enum.auto()  # v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022; not Open-Sora v1.0's)


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained. LEARNED_RANGE: the model's last C channels are values
    in [-1, 1] interpolating the log-variance between the clipped posterior variance and beta_t."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # eps MSE (+ the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # eps MSE + VB * num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ------------------------------------------------------------------------------------------------------
# schedules


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, stretched so that it stays similar for any number of steps:
    betas from 1e-4 * (1000 / T) to 0.02 * (1000 / T), float64."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta=0.999):
    out = []
    for i in range(num_diffusion_timesteps):
        a1 = alpha_bar(i / num_diffusion_timesteps)
        a2 = alpha_bar((i + 1) / num_diffusion_timesteps)
        out.append(min(1 - a2 / a1, max_beta))
    return np.array(out)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """guided-diffusion's named schedules: "linear" and "squaredcos_cap_v2" (the cosine schedule)."""
    if schedule_name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if schedule_name == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


# ------------------------------------------------------------------------------------------------------
# helpers


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """Gather ``arr[timesteps]`` (a 1-D float64 numpy array) and broadcast it to ``broadcast_shape``
    ([B, 1, ...] expanded). The gather happens in float64; the cast to float32 comes after."""
    vals = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    vals = vals.reshape(vals.shape + (1,) * (len(broadcast_shape) - vals.ndim))
    return vals + torch.zeros(broadcast_shape, device=timesteps.device)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), element-wise, broadcasting scalars."""
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1 = logvar1 if isinstance(logvar1, torch.Tensor) else torch.tensor(logvar1).to(ref)
    logvar2 = logvar2 if isinstance(logvar2, torch.Tensor) else torch.tensor(logvar2).to(ref)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor):
    """Log-likelihood (nats) of data in [-1, 1] quantised to 256 bins (bin width 2/255) under
    N(means, exp(log_scales)^2); the two edge bins take the whole tails."""
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shape mismatch: {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_hi = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lo = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_hi = torch.log(cdf_hi.clamp(min=1e-12))
    log_sf_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))
    log_delta = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, log_delta))


def resolve_device(model, noise: torch.Tensor | None, device) -> torch.device:
    """The sampling device: as given, else the noise's, else the model's, else the CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return torch.device("cpu")


def _unwrap_output(out):
    """Models may return a tensor, a dict with "x", or (tensor, extra)."""
    extra = None
    if isinstance(out, tuple):
        out, extra = out
    if isinstance(out, dict):
        out = out["x"]
    return out, extra


# ------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Training and ancestral sampling utilities for a discrete-time Gaussian diffusion.

    :param betas: 1-D array of per-step betas (converted to float64).
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType, loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError("betas must be 1-D")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)

        # q(x_{t-1} | x_t, x_0); the variance is 0 at t = 0, so its log is clipped to the t = 1 value there
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)

    # -- forward process ---------------------------------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError("noise and x_start shapes differ")
        shape = x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError("x_start and x_t shapes differ")
        shape = x_t.shape
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, shape) * x_t
        )
        var = _extract_into_tensor(self.posterior_variance, t, shape)
        log_var = _extract_into_tensor(self.posterior_log_variance_clipped, t, shape)
        return mean, var, log_var

    # -- reverse process ---------------------------------------------------------------------------------
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _predict_xstart_from_v(self, x_t, t, v):
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def _predict_eps_from_v(self, x_t, t, v):
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def _velocity(self, x_start, t, noise):
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def _model_variance(self, model_output, x, t):
        """Split the model output into (mean part, variance, log-variance)."""
        B, C = x.shape[:2]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, 2 * C, *x.shape[2:]):
                raise ValueError(f"a learned-sigma model must return {(B, 2 * C, *x.shape[2:])}, got {tuple(model_output.shape)}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_var = var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(self.log_betas, t, x.shape)
                frac = (var_values + 1) / 2  # [-1, 1] -> [min, max]
                log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                v = np.append(self.posterior_variance[1], self.betas[1:])
                lv = np.log(v)
            else:
                v, lv = self.posterior_variance, self.posterior_log_variance_clipped
            var = _extract_into_tensor(v, t, x.shape)
            log_var = _extract_into_tensor(lv, t, x.shape)
        return model_output, var, log_var

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model and return p(x_{t-1} | x_t): dict with "mean", "variance", "log_variance",
        "pred_xstart" and "extra"."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output, extra = _unwrap_output(model(x, t, **model_kwargs))
        model_output, model_variance, model_log_variance = self._model_variance(model_output, x, t)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            pred_xstart = process_xstart(self._predict_xstart_from_v(x_t=x, t=t, v=model_output))
        else:
            raise NotImplementedError(self.model_mean_type)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise=None):
        """One ancestral step x_t -> x_{t-1}; ``noise`` defaults to ``randn_like(x)`` (drawn after the model
        call, as guided-diffusion does). No noise is added where t == 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False):
        """Yield the ``p_sample`` dict of every step, from t = num_timesteps - 1 down to 0."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError("shape must be a tuple or list")
        device = resolve_device(model, noise, device)
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    model_kwargs=model_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False) -> torch.Tensor:
        """Ancestral sampling from pure noise (``noise`` if given) through every step; returns x_0.

        ``clip_denoised`` defaults to False here (latents are not in [-1, 1]; Open-Sora always passes False),
        unlike guided-diffusion's True, which :meth:`p_mean_variance` / :meth:`p_sample` keep."""
        out = None
        for step in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                                   device=device, progress=progress):
            out = step
        return out["sample"]

    # -- losses --------------------------------------------------------------------------------------------
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dim: the decoder NLL at t == 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LOG2
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / _LOG2
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict[str, torch.Tensor]:
        """Per-sample losses at timesteps ``t``: "loss" (and "mse", "vb" for the MSE losses with a learned
        variance: loss = mse + vb, the VB term seeing a detached mean so that it only trains the variance;
        VB is scaled by num_timesteps / 1000 only for RESCALED_MSE, as in guided-diffusion)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output, _ = _unwrap_output(model(x_t, t, **model_kwargs))
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, 2 * C, *x_t.shape[2:]):
                raise ValueError(f"a learned-sigma model must return {(B, 2 * C, *x_t.shape[2:])}, got {tuple(model_output.shape)}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_a, _r=frozen, **_k: _r, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # without the 1/1000 the VB term would dominate the MSE term
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            target = self._velocity(x_start, t, noise)
        else:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        if model_output.shape != target.shape:
            raise ValueError("model output and target shapes differ")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        # the loss an eps-predicting model would report for the same prediction: held-out losses stay comparable
        # across parametrisations (identical to "loss" for an eps model)
        if self.model_mean_type == ModelMeanType.VELOCITY:
            eps_mse = mean_flat((noise - self._predict_eps_from_v(x_t, t, model_output)) ** 2)
            terms["eps_loss"] = eps_mse + terms["vb"] if "vb" in terms else eps_mse
        elif self.model_mean_type == ModelMeanType.EPSILON:
            terms["eps_loss"] = terms["loss"]
        return terms

    def _prior_bpd(self, x_start):
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LOG2
