"""``IDDPM``: the diffusion factory of Open-Sora v1.0 (and DiT / PixArt's ``create_diffusion``)."""

from __future__ import annotations

from .gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["IDDPM", "PREDICTION_TYPES", "mean_type_of"]


PREDICTION_TYPES = {"epsilon": ModelMeanType.EPSILON, "sample": ModelMeanType.START_X,
                    "v_prediction": ModelMeanType.VELOCITY}  # diffusers' names


def mean_type_of(prediction_type: str | None, predict_xstart: bool = False) -> ModelMeanType:
    """The ``ModelMeanType`` of a diffusers ``prediction_type`` name (None: ``predict_xstart`` decides)."""
    if prediction_type is None:
        return ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {prediction_type!r}")
    return PREDICTION_TYPES[prediction_type]


class IDDPM(SpacedDiffusion):
    """Open-Sora v1.0's diffusion: linear schedule over 1000 steps, eps prediction, learned-range variance,
    MSE + VB loss.

    ``num_sampling_steps=N`` respaces to ``str(N)`` (uniform over the 1000 steps, both ends kept); with
    neither it nor ``timestep_respacing`` every step is kept (training). The model is called with the
    original integer timesteps (no rescaling). ``float32_betas=True`` rounds the respaced betas to float32
    as Open-Sora v1.1+ does; the default (float64) is v1.0.0's. ``prediction_type`` (diffusers' names:
    ``epsilon``, ``sample``, ``v_prediction``) overrides ``predict_xstart``; ``v_prediction`` is not Open-Sora
    v1.0's (see :class:`modelgrow.diffusion.ModelMeanType`).
    """

    def __init__(
        self,
        num_sampling_steps=None,
        timestep_respacing=None,
        noise_schedule="linear",
        use_kl=False,
        sigma_small=False,
        predict_xstart=False,
        learn_sigma=True,
        rescale_learned_sigmas=False,
        diffusion_steps=1000,
        float32_betas=False,
        prediction_type=None,
    ):
        betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
        if use_kl:
            loss_type = LossType.RESCALED_KL
        elif rescale_learned_sigmas:
            loss_type = LossType.RESCALED_MSE
        else:
            loss_type = LossType.MSE
        if num_sampling_steps is not None:
            if timestep_respacing is not None:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            timestep_respacing = str(num_sampling_steps)
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]
        if learn_sigma:
            var_type = ModelVarType.LEARNED_RANGE
        else:
            var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
        super().__init__(
            use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
            betas=betas,
            model_mean_type=mean_type_of(prediction_type, predict_xstart),
            model_var_type=var_type,
            loss_type=loss_type,
            float32_betas=float32_betas,
        )
        self.num_sampling_steps = num_sampling_steps
        self.timestep_respacing = timestep_respacing
