"""modelgrow.diffusion against an independent float64 implementation of the IDDPM formulas (written here,
not imported from the package), plus the respacing, the samplers (diffusers schedulers, checked against
float64 reference DDIM / DPM-Solver++(2M) loops written here) and the guidance wrappers."""

import math

import numpy as np
import pytest
import torch

from modelgrow.diffusion import (
    IDDPM,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    cfg_model_fn,
    discretized_gaussian_log_likelihood,
    get_sampler,
    make_scheduler,
    normal_kl,
    space_timesteps,
    two_condition_model_fn,
)

SHAPE = (4, 4, 2, 3, 3)  # B, C, T, H, W
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# independent float64 reference


class Ref:
    """The IDDPM schedule in float64 for the kept original steps ``kept`` (all 1000 by default). Open-Sora
    v1.0.0 keeps the re-derived betas float64 (``np.array(new_betas)``); v1.1 rounds them to float32
    (``torch.FloatTensor``): ``f32_betas=True``."""

    def __init__(self, kept=None, T=1000, f32_betas=False):
        base_betas = np.linspace(0.0001 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
        base_ac = np.cumprod(1.0 - base_betas)
        self.kept = sorted(range(T) if kept is None else kept)
        ac_kept = base_ac[self.kept]
        betas = 1.0 - ac_kept / np.concatenate([[1.0], ac_kept[:-1]])
        if f32_betas:
            betas = betas.astype(np.float32).astype(np.float64)
        self.base_ac = base_ac
        self.betas = betas
        self.ac = np.cumprod(1.0 - betas)
        self.ac_prev = np.concatenate([[1.0], self.ac[:-1]])
        self.post_var = betas * (1.0 - self.ac_prev) / (1.0 - self.ac)
        self.post_logvar = np.log(np.where(np.arange(len(betas)) == 0, self.post_var[1], self.post_var))
        self.coef1 = betas * np.sqrt(self.ac_prev) / (1.0 - self.ac)
        self.coef2 = (1.0 - self.ac_prev) * np.sqrt(1.0 - betas) / (1.0 - self.ac)

    @staticmethod
    def g(arr, t):
        return torch.from_numpy(np.asarray(arr)[t.numpy()]).view(-1, 1, 1, 1, 1)

    def orig_t(self, t):
        return torch.tensor([self.kept[i] for i in t.tolist()], dtype=torch.long)

    def q_sample(self, x0, t, noise):
        return self.g(np.sqrt(self.ac), t) * x0.double() + self.g(np.sqrt(1 - self.ac), t) * noise.double()

    def posterior(self, x0, xt, t):
        mean = self.g(self.coef1, t) * x0 + self.g(self.coef2, t) * xt
        return mean, self.g(self.post_var, t), self.g(self.post_logvar, t)

    def p_mean_variance(self, model, xt, t, clip=False):
        out = model(xt.float(), self.orig_t(t)).double()
        C = xt.shape[1]
        eps, v = out[:, :C], out[:, C:]
        frac = (v + 1) / 2
        logvar = frac * self.g(np.log(self.betas), t) + (1 - frac) * self.g(self.post_logvar, t)
        x0 = self.g(np.sqrt(1 / self.ac), t) * xt - self.g(np.sqrt(1 / self.ac - 1), t) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.posterior(x0, xt, t)
        return {"mean": mean, "log_variance": logvar, "variance": logvar.exp(), "pred_xstart": x0, "eps": eps}

    @staticmethod
    def kl(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))

    @staticmethod
    def nll(x, mean, log_std):
        def cdf(z):
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

        inv = torch.exp(-log_std)
        hi, lo = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
        lp = torch.where(
            x < -0.999,
            torch.log(hi.clamp(min=1e-12)),
            torch.where(x > 0.999, torch.log((1 - lo).clamp(min=1e-12)), torch.log((hi - lo).clamp(min=1e-12))),
        )
        return -lp

    def losses(self, model, x0, t, noise, vb_scale=1.0):
        x0 = x0.double()
        xt = self.q_sample(x0, t, noise)
        out = self.p_mean_variance(model, xt, t)
        dims = list(range(1, x0.ndim))
        mse = ((noise.double() - out["eps"]) ** 2).mean(dims)
        tm, _, tlv = self.posterior(x0, xt, t)
        kl = self.kl(tm, tlv, out["mean"], out["log_variance"]).mean(dims) / math.log(2)
        nll = self.nll(x0, out["mean"], 0.5 * out["log_variance"]).mean(dims) / math.log(2)
        vb = torch.where(t == 0, nll, kl) * vb_scale
        return {"mse": mse, "vb": vb, "loss": mse + vb}


class LinearFake:
    """A fixed random model: eps = A x + a sin(3 t / 1000), var values = tanh(B x + b cos(2 t / 1000)), all
    per-channel linear maps (float32). Records the timesteps it is called with."""

    def __init__(self, C=4, learn_sigma=True, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(C, C, generator=g) * 0.4
        self.B = torch.randn(C, C, generator=g) * 0.4
        self.a = torch.randn(C, generator=g)
        self.b = torch.randn(C, generator=g)
        self.learn_sigma = learn_sigma
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append(t.clone())
        tt = t.float().view(-1, *([1] * (x.ndim - 1))) / 1000
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = torch.einsum("oc,bc...->bo...", self.A, x) + self.a.view(shape) * torch.sin(3 * tt)
        if not self.learn_sigma:
            return eps
        v = torch.tanh(torch.einsum("oc,bc...->bo...", self.B, x) + self.b.view(shape) * torch.cos(2 * tt))
        return torch.cat([eps, v], dim=1)


def _x_start():
    x0 = torch.rand(SHAPE) * 2 - 1
    x0.view(-1)[:6] = torch.tensor([-1.0, 1.0, -0.9995, 0.9995, -1.0, 1.0])  # the decoder's edge bins
    return x0


def _close(a, b, rtol=RTOL, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# schedule, q, posterior, p


def test_schedule_matches_reference():
    d, r = IDDPM(), Ref()
    assert d.num_timesteps == 1000 and d.betas.dtype == np.float64
    assert d.model_mean_type == ModelMeanType.EPSILON and d.model_var_type == ModelVarType.LEARNED_RANGE
    assert d.loss_type == LossType.MSE
    np.testing.assert_allclose(d.betas[[0, -1]], [1e-4, 0.02], rtol=1e-7)
    np.testing.assert_array_equal(d.betas, r.betas)  # float64 betas re-derived from alphas_cumprod, as v1.0.0
    np.testing.assert_allclose(d.alphas_cumprod, r.ac, rtol=1e-13)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, r.post_logvar, rtol=1e-13)
    # the base (un-respaced) schedule is guided-diffusion's float64 one
    g = GaussianDiffusion(betas=np.linspace(1e-4, 0.02, 1000), model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)
    np.testing.assert_allclose(g.alphas_cumprod, r.base_ac, rtol=1e-13)


def test_q_sample_and_posterior():
    d, r = IDDPM(), Ref()
    x0, noise, t = _x_start(), torch.randn(SHAPE), torch.tensor([0, 1, 500, 999])
    xt = d.q_sample(x0, t, noise=noise)
    assert xt.dtype == torch.float32
    _close(xt, r.q_sample(x0, t, noise))
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    rm, rv, rlv = r.posterior(x0.double(), xt.double(), t)
    _close(mean, rm)
    _close(var, rv.expand(SHAPE), atol=0)
    _close(logvar, rlv.expand(SHAPE), atol=0)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [None, 100])
def test_p_mean_variance(clip, steps):
    d, model = IDDPM(num_sampling_steps=steps), LinearFake()
    r = Ref(kept=space_timesteps(1000, str(steps)) if steps else None)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    x = torch.randn(SHAPE) * 1.5
    out = d.p_mean_variance(model, x, t, clip_denoised=clip)
    ref = r.p_mean_variance(model, x.double(), t, clip=clip)
    for k in ("mean", "log_variance", "variance", "pred_xstart"):
        _close(out[k], ref[k])
    assert torch.equal(model.calls[0], r.orig_t(t))  # the model sees the original timesteps


@pytest.mark.parametrize("steps", [None, 100])
@pytest.mark.parametrize("rescale", [False, True])
def test_training_losses(steps, rescale):
    d = IDDPM(timestep_respacing=str(steps) if steps else None, rescale_learned_sigmas=rescale)
    assert d.loss_type == (LossType.RESCALED_MSE if rescale else LossType.MSE)
    r = Ref(kept=space_timesteps(1000, str(steps)) if steps else None)
    model = LinearFake()
    x0, noise = _x_start(), torch.randn(SHAPE)
    t = torch.tensor([0, 1, d.num_timesteps // 3, d.num_timesteps - 1])
    out = d.training_losses(model, x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb", "eps_loss"} and out["loss"].shape == (SHAPE[0],)
    assert torch.equal(out["eps_loss"], out["loss"])  # an eps model's loss is its eps loss
    # guided-diffusion scales VB by num_timesteps / 1000 only for RESCALED_MSE (Open-Sora's default is MSE)
    ref = r.losses(model, x0, t, noise, vb_scale=d.num_timesteps / 1000 if rescale else 1.0)
    for k in ("mse", "vb", "loss"):
        _close(out[k], ref[k])
    assert torch.equal(model.calls[0], r.orig_t(t))


def _no_grad(module):
    return all(p.grad is None or p.grad.abs().max() == 0 for p in module.parameters())


def test_vb_does_not_train_the_mean():
    """The frozen-out trick: VB gradients reach the variance head only, MSE gradients the eps head only."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.eps = torch.nn.Conv3d(4, 4, 1)
            self.var = torch.nn.Conv3d(4, 4, 1)

        def forward(self, x, t):
            return torch.cat([self.eps(x), torch.tanh(self.var(x))], 1)

    net, d = Net(), IDDPM()
    out = d.training_losses(net, _x_start(), torch.tensor([0, 3, 400, 999]))
    out["vb"].sum().backward()
    assert _no_grad(net.eps) and not _no_grad(net.var)
    net.zero_grad(set_to_none=True)
    out = d.training_losses(net, _x_start(), torch.tensor([0, 3, 400, 999]))
    out["mse"].sum().backward()
    assert _no_grad(net.var) and not _no_grad(net.eps)


def test_kl_and_nll_helpers():
    m1, m2 = torch.randn(5), torch.randn(5)
    lv1, lv2 = torch.randn(5), torch.randn(5)
    _close(normal_kl(m1, lv1, m2, lv2), Ref.kl(m1.double(), lv1.double(), m2.double(), lv2.double()))
    _close(normal_kl(m1, lv1, 0.0, 0.0), Ref.kl(m1.double(), lv1.double(), 0.0, torch.zeros(5, dtype=torch.float64)))
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0])
    # near the data, as at t = 0 (far in the tails 1 + tanh cancels in float32, in Open-Sora too)
    mean, log_std = x + torch.randn(5) * 0.05, torch.full((5,), -3.0)
    _close(-discretized_gaussian_log_likelihood(x, means=mean, log_scales=log_std),
           Ref.nll(x.double(), mean.double(), log_std.double()))


def test_p_sample_step():
    d, r, model = IDDPM(num_sampling_steps=100), Ref(kept=space_timesteps(1000, "100")), LinearFake()
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 1, 50, 99])
    out = d.p_sample(model, x, t, clip_denoised=False, noise=noise)
    ref = r.p_mean_variance(model, x.double(), t)
    nonzero = (t != 0).double().view(-1, 1, 1, 1, 1)
    _close(out["sample"], ref["mean"] + nonzero * torch.exp(0.5 * ref["log_variance"]) * noise.double())
    _close(out["pred_xstart"], ref["pred_xstart"])
    assert torch.isfinite(out["sample"]).all()
    _close(out["sample"][0], ref["mean"][0])  # no noise at t = 0


# ----------------------------------------------------------------------------------------------------------
# respacing and sampling loop


def test_space_timesteps():
    s = space_timesteps(1000, "100")
    assert len(s) == 100
    # guided-diffusion: stride (1000-1)/(100-1) accumulated and rounded; 111k/11 never has a .5 fraction
    assert s == {round(k * 999 / 99) for k in range(100)}
    assert sorted(s)[:11] == [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101]
    assert sorted(s)[-4:] == [969, 979, 989, 999]
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    # sections of 100 steps; guided-diffusion accumulates the fractional stride in floating point, so the
    # exact tie 7 * 99 / 14 = 49.5 arrives as 49.4999... and rounds to 49 (not 50)
    mid = space_timesteps(300, [10, 15, 20])
    assert len(mid) == 45 and 149 in mid and 150 not in mid
    assert {s for s in mid if s < 100} == {round(k * 99 / 9) for k in range(10)}
    assert {s for s in mid if s >= 200} == {200 + round(k * 99 / 19) for k in range(20)}
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


@pytest.mark.parametrize("f32", [True, False])
def test_spaced_betas_reproduce_alphas_cumprod(f32):
    kept = space_timesteps(1000, "100")
    base = IDDPM(diffusion_steps=1000)
    sp = SpacedDiffusion(kept, float32_betas=f32, betas=np.linspace(1e-4, 0.02, 1000),
                         model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.LEARNED_RANGE,
                         loss_type=LossType.MSE)
    assert sp.timestep_map == sorted(kept) and sp.num_timesteps == 100
    np.testing.assert_allclose(sp.alphas_cumprod, Ref().base_ac[sorted(kept)], rtol=2e-6 if f32 else 1e-12)
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[sorted(kept)], rtol=2e-6)
    if f32:
        np.testing.assert_array_equal(sp.betas, sp.betas.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(sp.betas, IDDPM(num_sampling_steps=100, float32_betas=True).betas)
    else:
        np.testing.assert_array_equal(sp.betas, IDDPM(num_sampling_steps=100).betas)


def test_iddpm_default_is_open_sora_v1_0_float64_betas():
    """v1.0.0's respace.py: ``np.array(new_betas)`` (float64); the float32 rounding arrived with v1.1."""
    kept = space_timesteps(1000, "100")
    v10 = IDDPM(num_sampling_steps=100)
    np.testing.assert_array_equal(v10.betas, Ref(kept).betas)  # bit-exact float64 re-derivation
    v11 = IDDPM(num_sampling_steps=100, float32_betas=True)
    np.testing.assert_array_equal(v11.betas, Ref(kept, f32_betas=True).betas)
    diff = np.abs(v10.betas - v11.betas).max()
    assert 1e-9 < diff < 1e-7  # the v1.1 rounding is real and small (7.4e-9 at 100 steps)


def test_iddpm_factory():
    assert IDDPM(num_sampling_steps=100).num_timesteps == 100
    assert IDDPM(timestep_respacing="").num_timesteps == 1000
    assert IDDPM(timestep_respacing="ddim25").num_timesteps == 25
    assert IDDPM(use_kl=True).loss_type == LossType.RESCALED_KL
    assert IDDPM(learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert IDDPM(learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert IDDPM(predict_xstart=True).model_mean_type == ModelMeanType.START_X
    with pytest.raises(ValueError):
        IDDPM(num_sampling_steps=10, timestep_respacing="10")


def test_p_sample_loop_matches_reference_chain(capsys):
    d, r = IDDPM(num_sampling_steps=10), Ref(kept=space_timesteps(1000, "10"))
    model = LinearFake()
    shape = (2, 4, 2, 3, 3)
    noise = torch.randn(shape)
    torch.manual_seed(123)
    out = d.p_sample_loop(model, shape, noise=noise, clip_denoised=False, progress=True)
    assert out.shape == shape and out.dtype == torch.float32
    assert "10/10" in capsys.readouterr().err
    # the model saw the original timesteps, last first, as long tensors
    seen = [int(c[0]) for c in model.calls]
    assert seen == sorted(space_timesteps(1000, "10"), reverse=True)
    assert all(c.dtype == torch.long for c in model.calls)
    # same chain in float64 with the same per-step noise draws (one randn after each model call)
    torch.manual_seed(123)
    x = noise.double()
    for i in reversed(range(10)):
        t = torch.full((shape[0],), i)
        p = r.p_mean_variance(model, x, t)
        z = torch.randn(shape).double()
        x = p["mean"] + (i != 0) * torch.exp(0.5 * p["log_variance"]) * z
    _close(out, x, rtol=1e-4, atol=1e-5)
    # determinism
    torch.manual_seed(123)
    again = d.p_sample_loop(model, shape, noise=noise, clip_denoised=False)
    assert torch.equal(out, again)


# ----------------------------------------------------------------------------------------------------------
# fast samplers: diffusers' schedulers against float64 reference DDIM / DPM-Solver++(2M) loops


def _ref_ts(steps, T=1000):
    """The trailing grid, descending: [T-1, ..., T/steps - 1]."""
    return [round(T - i * T / steps) - 1 for i in range(steps)]


# Both loops are modelgrow's former hand-written samplers (float32 state, float64 coefficients), kept here as
# the yardstick the diffusers schedulers that replaced them are held to.


def ref_ddim(model, noise, steps):
    """DDIM (eta = 0) over the trailing grid, stepping to the next grid timestep, then to x0."""
    ab = Ref().base_ac
    ts, x = _ref_ts(steps), noise
    for i, t in enumerate(ts):
        eps = model(x, torch.full((x.shape[0],), t))[:, : x.shape[1]]
        x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        x = x0 if i + 1 == len(ts) else math.sqrt(ab[ts[i + 1]]) * x0 + math.sqrt(1 - ab[ts[i + 1]]) * eps
    return x


def ref_dpm_solver_pp_2m(model, noise, steps):
    """DPM-Solver++(2M): x_s = (sigma_s / sigma_t) x - alpha_s expm1(-h) D, D = x0 at the first
    step, (1 + 1/2r) x0 - 1/2r x0_prev after; the last step jumps to x0 (sigma = 0)."""
    ab = Ref().base_ac
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
    lam = np.log(alpha) - np.log(sigma)
    ts, x, prev, h_prev = _ref_ts(steps), noise, None, None
    for i, t in enumerate(ts):
        eps = model(x, torch.full((x.shape[0],), t))[:, : x.shape[1]]
        x0 = (x - float(sigma[t]) * eps) / float(alpha[t])
        if i + 1 == len(ts):
            return x0
        s = ts[i + 1]
        h = float(lam[s] - lam[t])
        d = x0 if prev is None else (1 + 1 / (2 * h_prev / h)) * x0 - 1 / (2 * h_prev / h) * prev
        x = float(sigma[s] / sigma[t]) * x - float(alpha[s] * np.expm1(-h)) * d
        prev, h_prev = x0, h
    return x


class TrueEps:
    """eps of a known x0: (x_t - sqrt(ab) x0) / sqrt(1 - ab), plus junk sigma channels."""

    def __init__(self, x0, learn_sigma=True):
        self.x0, self.learn_sigma, self.calls = x0.double(), learn_sigma, []
        self.ab = torch.from_numpy(Ref(f32_betas=False).base_ac)

    def __call__(self, x, t, **kwargs):
        self.calls.append(t.clone())
        ab = self.ab[t.long()].view(-1, *([1] * (x.ndim - 1)))
        eps = ((x.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()).float()
        return torch.cat([eps, torch.full_like(eps, 1e6)], 1) if self.learn_sigma else eps


# diffusers' DDIM steps from t to t - 1000 // steps, on the trailing grid only when steps divides 1000 (its
# documented behaviour, kept: modelgrow uses diffusers' scheduler as it is); DPM-Solver++ follows any grid.
@pytest.mark.parametrize("name,steps", [("ddim", 1), ("ddim", 8), ("ddim", 20), ("ddim", 50), ("dpm-solver", 1),
                                        ("dpm-solver", 7), ("dpm-solver", 20), ("dpm-solver", 50)])
def test_fast_samplers_recover_known_x0(name, steps):
    x0 = torch.randn(SHAPE)
    model = TrueEps(x0)
    sample = get_sampler(name, steps)
    assert type(sample.scheduler).__module__.startswith("diffusers.")  # diffusers' own scheduler, not a copy
    out = sample(model, SHAPE, noise=torch.randn(SHAPE))
    _close(out, x0, rtol=1e-4, atol=1e-4)
    ts = [int(c[0]) for c in model.calls]
    assert len(ts) == steps and ts[0] == 999 and all(c.dtype == torch.long for c in model.calls)
    assert ts == _ref_ts(steps)  # trailing spacing


class TrueV(TrueEps):
    """v of a known x0: sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022), plus mid-range variance channels."""

    def __call__(self, x, t, **kwargs):
        self.calls.append(t.clone())
        ab = self.ab[t.long()].view(-1, *([1] * (x.ndim - 1)))
        eps = (x.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        v = (ab.sqrt() * eps - (1 - ab).sqrt() * self.x0).float()
        return torch.cat([v, torch.zeros_like(v)], 1) if self.learn_sigma else v


def test_v_prediction_losses_and_x0():
    """prediction_type="v_prediction": the exact v gives x0 back at every t and zero MSE; the eps loss of a wrong
    v is the eps MSE of the eps it implies (eps = sqrt(ab) v + sqrt(1 - ab) x_t), plus the same VB term."""
    d, x0, noise = IDDPM(prediction_type="v_prediction"), _x_start(), torch.randn(SHAPE)
    assert d.model_mean_type == ModelMeanType.VELOCITY and IDDPM().model_mean_type == ModelMeanType.EPSILON
    t = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(TrueV(x0), x_t, t, clip_denoised=False)
    _close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-4)
    assert d.training_losses(TrueV(x0), x0, t, noise=noise)["mse"].abs().max() < 1e-8
    wrong = torch.randn(SHAPE[0], 2 * SHAPE[1], *SHAPE[2:])
    got = d.training_losses(lambda *_a, **_k: wrong, x0, t, noise=noise)
    ab = torch.from_numpy(Ref(f32_betas=False).base_ac)[t].view(-1, 1, 1, 1, 1)
    eps_hat = ab.sqrt() * wrong[:, :4].double() + (1 - ab).sqrt() * x_t.double()
    v_true = ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()
    _close(got["mse"], ((wrong[:, :4].double() - v_true) ** 2).mean((1, 2, 3, 4)))
    _close(got["eps_loss"], ((eps_hat - noise.double()) ** 2).mean((1, 2, 3, 4)) + got["vb"].double())
    with pytest.raises(ValueError, match="prediction_type"):
        IDDPM(prediction_type="v")


@pytest.mark.parametrize("name,steps", [("iddpm", 20), ("ddim", 20), ("dpm-solver", 10), ("euler", 10)])
def test_samplers_take_a_v_prediction_model(name, steps):
    x0 = torch.randn(SHAPE)
    v_out = get_sampler(name, steps, prediction_type="v_prediction")(TrueV(x0, learn_sigma=name == "iddpm"), SHAPE,
                                                                     noise=torch.randn(SHAPE))
    _close(v_out, x0, rtol=1e-3, atol=1e-3)
    if name != "iddpm":  # the same model read as eps does not (the ancestral IDDPM corrects itself at low noise,
        # where v ~ eps: there the first step's x0 tells)
        eps_out = get_sampler(name, steps)(TrueV(x0), SHAPE, noise=torch.randn(SHAPE))
        assert (eps_out - x0).abs().max() > 0.5
        return
    x_t = torch.randn(SHAPE)
    for pred, ok in (("v_prediction", True), ("epsilon", False)):
        sched = make_scheduler("iddpm", prediction_type=pred)
        sched.set_timesteps(steps)
        t = sched.timesteps[0]
        x0_hat = sched.step(TrueV(x0)(x_t, t.expand(SHAPE[0])), t, x_t).pred_original_sample
        assert ((x0_hat - x0).abs().max() < 1e-3) == ok


def test_euler_scheduler_swaps_in():
    x0 = torch.randn(SHAPE)
    out = get_sampler("euler", 10)(TrueEps(x0), SHAPE, noise=torch.randn(SHAPE))
    _close(out, x0, rtol=1e-3, atol=1e-3)


class GaussianData:
    """Exact eps for data x0 ~ N(mu, s^2) i.i.d.: E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).
    The probability-flow ODE keeps z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so the
    exact ODE sample from x_T is mu + s z."""

    mu, s = 0.3, 0.5

    def __init__(self):
        self.ab = torch.from_numpy(Ref(f32_betas=False).base_ac)

    def __call__(self, x, t, **kwargs):
        ab = self.ab[t.long()].view(-1, *([1] * (x.ndim - 1)))
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1).float()

    def exact(self, xT):
        ab = self.ab[999]
        return self.mu + self.s * (xT.double() - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab).sqrt()


class Nonlinear:
    """A deterministic, non-linear, timestep-dependent eps (unlike the exact models above, every sampler
    step matters)."""

    def __call__(self, x, t, **kwargs):
        tt = t.float().view(-1, *([1] * (x.ndim - 1)))
        eps = torch.tanh(0.8 * x + torch.sin(tt / 150)) + 0.1 * x
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.mark.parametrize("name,ref", [("ddim", ref_ddim), ("dpm-solver", ref_dpm_solver_pp_2m)])
@pytest.mark.parametrize("steps", [1, 4, 10, 20, 50, 100])
def test_diffusers_schedulers_match_the_reference_samplers(name, ref, steps):
    """diffusers' DDIMScheduler / DPMSolverMultistepScheduler give the former samplers' numbers (float32
    rounding apart: the 1/sqrt(alpha_bar_999) = 158 of the first x0 estimate amplifies it)."""
    xT = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    for model in (Nonlinear(), GaussianData()):
        want = ref(model, xT, steps)
        got = get_sampler(name, steps)(model, SHAPE, noise=xT)
        err = (got - want).abs().max().item()
        # one step is the x0 estimate alone: float32 rounding of x - sigma eps (|x| ~ 1) times 158
        tol = 1e-4 if steps == 1 else 2e-6 * want.abs().max().item()
        assert err < tol, (name, steps, err)


def test_dpm_solver_matches_reference_on_any_grid_and_ddim_on_divisors():
    """DPM-Solver++ steps between grid timesteps; diffusers' DDIM steps to t - T // steps, which is the next
    grid timestep only when steps divides T (7 steps: 999 -> 857 where the grid has 856)."""
    xT = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    m = Nonlinear()
    want = ref_dpm_solver_pp_2m(m, xT, 7)
    assert ((get_sampler("dpm-solver", 7)(m, SHAPE, noise=xT) - want).abs().max() / want.abs().max()) < 2e-6
    want = ref_ddim(m, xT, 7)
    assert ((get_sampler("ddim", 7)(m, SHAPE, noise=xT) - want).abs().max() / want.abs().max()) > 1e-4


def test_fast_samplers_solve_the_ode():
    model, xT = GaussianData(), torch.randn(SHAPE)
    exact = model.exact(xT)

    def err(name, steps):
        return (get_sampler(name, steps)(model, SHAPE, noise=xT).double() - exact).abs().max().item()

    e_dpm20, e_dpm50 = err("dpm-solver", 20), err("dpm-solver", 50)
    e_ddim20, e_ddim50 = err("ddim", 20), err("ddim", 50)
    # (seeded: about 0.074 / 0.0019 for DPM-Solver++, 0.23 / 0.098 for DDIM; data std 0.5)
    assert e_dpm20 < 0.15 and e_dpm50 < 5e-3 and e_ddim50 < 0.2
    assert 1.8 < e_ddim20 / e_ddim50 < 3.5  # DDIM: first order (the error ~ 1 / steps)
    assert e_dpm20 / e_dpm50 > 10  # DPM-Solver++(2M): second order, then the first-order last jump
    assert e_dpm20 < e_ddim20 and e_dpm50 < e_ddim50


def test_fast_samplers_deterministic_and_progress(capsys):
    model, noise = LinearFake(), torch.randn(SHAPE)
    for name in ("ddim", "dpm-solver"):
        a = get_sampler(name, 5)(model, SHAPE, noise=noise, progress=True)
        b = get_sampler(name, 5)(model, SHAPE, noise=noise)
        assert torch.equal(a, b) and torch.isfinite(a).all()
    assert "5/5" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# IDDPM as a diffusers scheduler


@pytest.mark.parametrize("steps", [2, 10, 25])
def test_iddpm_scheduler_is_p_sample_loop_bit_for_bit(steps):
    from diffusers import SchedulerMixin

    from modelgrow.diffusion import IDDPMScheduler, denoise

    shape = (2, 4, 2, 3, 3)
    noise = torch.randn(shape)
    torch.manual_seed(123)
    want = IDDPM(num_sampling_steps=steps).p_sample_loop(LinearFake(), shape, noise=noise, clip_denoised=False)
    sched = IDDPMScheduler()
    assert isinstance(sched, SchedulerMixin)
    torch.manual_seed(123)
    got = denoise(sched, LinearFake(), noise, steps)
    assert torch.equal(got, want)
    assert sched.timesteps.tolist() == sorted(space_timesteps(1000, str(steps)), reverse=True)
    # the v1.1 rounding of the respaced betas is a config switch; it changes the numbers
    torch.manual_seed(123)
    v11 = denoise(IDDPMScheduler(float32_betas=True), LinearFake(), noise, steps)
    assert not torch.equal(v11, want)
    # with a generator the per-step noise comes from it (reproducible, the global RNG untouched)
    state = torch.get_rng_state()
    g1 = denoise(sched, LinearFake(), noise, steps, generator=torch.Generator().manual_seed(5))
    g2 = denoise(sched, LinearFake(), noise, steps, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2) and torch.equal(torch.get_rng_state(), state)


def test_iddpm_scheduler_save_load_and_swap(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from modelgrow.diffusion import IDDPMScheduler, make_scheduler

    s = IDDPMScheduler(float32_betas=True)
    s.save_pretrained(tmp_path / "sched")
    back = IDDPMScheduler.from_pretrained(tmp_path / "sched")
    assert back.config.float32_betas is True and back.config.variance_type == "learned_range"
    dpm = DPMSolverMultistepScheduler.from_config(make_scheduler("dpm-solver").config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun-nonexistent")


# ----------------------------------------------------------------------------------------------------------
# guidance


class CondFake:
    """eps = 0.5 x + y_t5 (+ y_t5 * y_llm, a non-additive interaction) + t/1000 per channel; var values
    depend on the conditions too. y_t5 / y_llm: [N, C] (a zero row = the null condition)."""

    def __init__(self, learn_sigma=True):
        self.learn_sigma, self.batches = learn_sigma, []

    def __call__(self, x, t, y, y_llm=None, **kwargs):
        self.batches.append(x.shape[0])
        view = (x.shape[0], -1) + (1,) * (x.ndim - 2)
        eps = 0.5 * x + y.view(view) + t.float().view(-1, *([1] * (x.ndim - 1))) / 1000
        if y_llm is not None:
            eps = eps + (y * y_llm).view(view) + 0.3 * y_llm.view(view) ** 2
        if not self.learn_sigma:
            return eps
        v = torch.tanh(0.1 * x + 2 * y.view(view) + (0 if y_llm is None else y_llm.view(view)))
        return torch.cat([eps, v], 1)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_cfg_model_fn(learn_sigma):
    B, C = 2, 4
    model = CondFake(learn_sigma)
    xh, t = torch.randn(B, C, 2, 3, 3), torch.full((2 * B,), 500)
    y_c, y_0 = torch.randn(B, C), torch.zeros(B, C)
    fn = cfg_model_fn(model, 4.0)
    out = fn(torch.cat([xh, xh]), t, y=torch.cat([y_c, y_0]))
    assert model.batches == [2 * B]  # one forward
    oc, ou = model(xh, t[:B], y=y_c), model(xh, t[:B], y=y_0)
    guided = ou[:, :C] + 4.0 * (oc[:, :C] - ou[:, :C])
    want = torch.cat([guided, oc[:, C:]], 1)
    _close(out[:B], want)
    _close(out[B:], want)
    # channels=3: Open-Sora v1.0's forward_with_cfg verbatim (eps channel 3 unguided, rest per half)
    out3 = cfg_model_fn(model, 4.0, channels=3)(torch.cat([xh, xh]), t, y=torch.cat([y_c, y_0]))
    full = torch.cat([oc, ou])
    g3 = ou[:, :3] + 4.0 * (oc[:, :3] - ou[:, :3])
    _close(out3, torch.cat([torch.cat([g3, g3]), full[:, 3:]], 1))
    assert not torch.allclose(out3[:B, 3], out[:B, 3])  # the quirk is real
    # the sampled (first) half does not depend on the second half of the state
    out_b = fn(torch.cat([xh, torch.randn_like(xh)]), t, y=torch.cat([y_c, y_0]))
    assert torch.equal(out_b, out)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_two_condition_model_fn(learn_sigma):
    B, C = 2, 4
    model = CondFake(learn_sigma)
    x, t = torch.randn(B, C, 2, 3, 3), torch.full((3 * B,), 250)
    t5, llm, z = torch.randn(B, C), torch.randn(B, C), torch.zeros(B, C)
    fn = two_condition_model_fn(model, s_t5=7.0, s_llm=12.5)
    out = fn(torch.cat([x, x, x]), t, y=torch.cat([t5, t5, z]), y_llm=torch.cat([llm, z, z]))
    assert model.batches == [3 * B] and out.shape == (3 * B, (2 if learn_sigma else 1) * C, 2, 3, 3)
    e_full = model(x, t[:B], y=t5, y_llm=llm)
    e_t5 = model(x, t[:B], y=t5, y_llm=z)
    e_0 = model(x, t[:B], y=z, y_llm=z)
    guided = e_0[:, :C] + 7.0 * (e_t5[:, :C] - e_0[:, :C]) + 12.5 * (e_full[:, :C] - e_t5[:, :C])
    want = torch.cat([guided, e_full[:, C:]], 1)
    for k in range(3):
        _close(out[k * B : (k + 1) * B], want, atol=1e-5)


@pytest.mark.parametrize("name", ["iddpm", "ddim", "dpm-solver"])
def test_get_sampler_with_guidance(name):
    B, C = 1, 4
    model = CondFake()
    sample = get_sampler(name, 5)
    noise = torch.randn(B, C, 2, 3, 3)
    kw = {"y": torch.cat([torch.randn(B, C), torch.zeros(B, C)]) * 0.1}
    out = sample(cfg_model_fn(model, 2.0), (2 * B, C, 2, 3, 3), noise=torch.cat([noise, noise]), model_kwargs=kw)
    assert out.shape == (2 * B, C, 2, 3, 3) and torch.isfinite(out).all()
    assert model.batches == [2 * B] * 5  # one forward per step
    if name != "iddpm":
        assert torch.equal(out[:B], out[B:])
    with pytest.raises(ValueError):
        get_sampler("no-such-sampler", 5)
