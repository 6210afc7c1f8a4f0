"""Classifier-free guidance wrappers: a model function ``fn(x, t, **model_kwargs)`` that runs every
condition of a step in ONE batched forward and returns the guided output tiled over the whole batch, so
that any sampler (IDDPM, DDIM, DPM-Solver++) can use it unchanged.

The model returns ``[N, C_out, ...]`` with C_out = 2C (eps, then the learned-sigma values) or C (eps only),
C = ``x.shape[1]``. Only the sampled state of the FIRST group is fed to the model (it is tiled over the
groups), as Open-Sora's ``forward_with_cfg`` does: the groups of an ancestral sampler's state diverge (each
draws its own noise) but only the first group is the sample.
"""

from __future__ import annotations

import torch

from .gaussian_diffusion import _unwrap_output

__all__ = ["cfg_model_fn", "two_condition_model_fn"]


def _forward_groups(model, x, t, n_groups, model_kwargs):
    if x.shape[0] % n_groups:
        raise ValueError(f"batch {x.shape[0]} is not divisible by {n_groups} guidance groups")
    b = x.shape[0] // n_groups
    first = x[:b]
    out, _ = _unwrap_output(model(torch.cat([first] * n_groups, dim=0), t, **model_kwargs))
    return out, b


def cfg_model_fn(model, scale: float, channels: int | None = None):
    """Single-condition classifier-free guidance.

    The caller passes ``x = [x_half; x_half]`` and model_kwargs whose condition is
    ``cat([y_cond, y_null])`` (conditional half first). The returned function computes
    ``eps = eps_u + scale * (eps_c - eps_u)``:

    * ``channels=None`` (ModelGrow): on all C latent channels; the variance channels are the conditional
      branch's; the result is duplicated to both halves.
    * ``channels=k``: Open-Sora v1.0's ``forward_with_cfg`` verbatim: only output channels ``[:k]`` are guided
      (v1.0 uses k = 3 of the 4 latent channels) and duplicated; the remaining channels (unguided eps
      channel(s) and the variance) are left per half. The first half (the sample) sees the conditional
      branch's remaining channels, as with ``channels=None``.
    """

    def fn(x, t, **model_kwargs):
        out, b = _forward_groups(model, x, t, 2, model_kwargs)
        g = x.shape[1] if channels is None else channels
        eps, rest = out[:, :g], out[:, g:]
        cond, uncond = eps[:b], eps[b:]
        guided = uncond + scale * (cond - uncond)
        if channels is None:
            half = torch.cat([guided, rest[:b]], dim=1)
            return torch.cat([half, half], dim=0)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    return fn


def two_condition_model_fn(model, s_t5: float = 7.0, s_llm: float = 12.5, channels: int | None = None):
    """ModelGrow's two-condition guidance (T5 caption + LLM condition):

        eps = eps(0, 0) + s_t5 * (eps(t5, 0) - eps(0, 0)) + s_llm * (eps(t5, llm) - eps(t5, 0))

    in one forward of 3B samples: the caller passes ``x = [x; x; x]`` and model_kwargs ordered
    [(t5, llm); (t5, 0); (0, 0)]. Guided on the first ``channels`` output channels (default all C latent
    channels); the other channels (the variance) come from the fully conditioned (first) third. Returns
    the guided output tiled to 3B."""

    def fn(x, t, **model_kwargs):
        out, b = _forward_groups(model, x, t, 3, model_kwargs)
        g = x.shape[1] if channels is None else channels
        eps, rest = out[:, :g], out[:, g:]
        e_full, e_t5, e_none = eps[:b], eps[b : 2 * b], eps[2 * b :]
        guided = e_none + s_t5 * (e_t5 - e_none) + s_llm * (e_full - e_t5)
        third = torch.cat([guided, rest[:b]], dim=1)
        return torch.cat([third, third, third], dim=0)

    return fn
