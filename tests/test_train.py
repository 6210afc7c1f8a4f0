"""Training system on CPU: torchrun FSDP2 vs single process, bit-exact resume, atomic checkpoints,
condition dropout rates, LoRA and new-blocks-only modes, NaN handling, export."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modelgrow.config import TrainConfig, load_config
from modelgrow.models import from_pretrained
from modelgrow.train import RandomLatentLoader, Trainer, draw_condition_dropout
from modelgrow.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.log_every", "1", "--train.compute_dtype", "float32", "--optim.lr", "1e-3"]


def _cfg(out, *extra):
    return load_config(None, [*BASE, "--train.output_dir", str(out), *extra])


def _loader(llm=False, batch=2):
    return RandomLatentLoader(batch, (4, 4, 8, 8), (8, 32), llm=(5, 16) if llm else None, seed=1)


def _run_worker(out, global_batch, steps, nproc=1, extra=()):
    env = {**os.environ}
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
               "-m", "tests.train_worker"]
    else:
        cmd = [sys.executable, "-m", "tests.train_worker"]
    r = subprocess.run(cmd + [str(out), str(global_batch), str(steps), *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((Path(out) / "history.json").read_text()), load_file(str(Path(out) / "final.safetensors"))


def test_torchrun_fsdp2_matches_single_process(tmp_path):
    single_h, single_w = _run_worker(tmp_path / "one", 4, 3)
    fsdp_h, fsdp_w = _run_worker(tmp_path / "two", 4, 3, nproc=2, extra=["--parallel.activation_checkpointing", "full"])
    assert fsdp_h == pytest.approx(single_h, rel=1e-5, abs=1e-6)
    for k, v in single_w.items():
        torch.testing.assert_close(fsdp_w[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_resume_is_bit_exact(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a", "--train.steps", "6", "--checkpoint.every_steps", "100"), loader=_loader(),
                       log=lambda *_: None)
    h_straight = [m["loss"] for m in straight.fit()]

    first = Trainer(_cfg(tmp_path / "b", "--train.steps", "3", "--checkpoint.every_steps", "3"), loader=_loader(),
                    log=lambda *_: None)
    h1 = [m["loss"] for m in first.fit()]
    del first  # "killed"
    second = Trainer(_cfg(tmp_path / "b", "--train.steps", "6", "--checkpoint.every_steps", "3"), loader=_loader(),
                     log=lambda *_: None)
    assert second.step == 3 and second.loader.position == 3
    h2 = [m["loss"] for m in second.fit()]
    assert h1 + h2 == h_straight
    for (n, p), q in zip(straight.model.named_parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q), n
    for n, t in straight.ema.shadow.items():
        assert torch.equal(t, second.ema.shadow[n]), n


def test_interrupted_checkpoint_keeps_previous(tmp_path, monkeypatch):
    tr = Trainer(_cfg(tmp_path, "--train.steps", "4", "--checkpoint.every_steps", "2"), loader=_loader(), log=lambda *_: None)
    tr.step = 2
    tr.save()
    def dying_save(extra, path):  # the process "dies" after the DCP shards, before the rename
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt, "_save_extra", dying_save)
    tr.step = 4
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step_00000002" and (root / "step_00000004.tmp").exists()
    again = Trainer(_cfg(tmp_path, "--train.steps", "4", "--checkpoint.every_steps", "2"), loader=_loader(), log=lambda *_: None)
    assert again.step == 2
    again.fit()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert not (root / "step_00000004.tmp").exists()


def test_keep_last(tmp_path):
    tr = Trainer(_cfg(tmp_path, "--train.steps", "5", "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "2"),
                 loader=_loader(), log=lambda *_: None)
    tr.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_optimizer_is_adamw(fused):
    """build_optimizer on a CPU: the fused kernel by default (optim.fused), foreach otherwise; both follow
    AdamW's update (decoupled weight decay, bias correction) written out here, over 5 steps with a warm-up."""
    from modelgrow.config import OptimConfig
    from modelgrow.train.state import build_optimizer, build_scheduler

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=3, fused=fused)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((5, 3), (7,), (2, 2, 2))]
    ref = [p.detach().clone() for p in params]
    m, v = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    opt = build_optimizer(params, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    assert opt.defaults["fused"] is (True if fused else None) and opt.defaults["foreach"] is (None if fused else True)
    (b1, b2), eps = cfg.betas, cfg.eps
    for n in range(1, 6):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        lr = opt.param_groups[0]["lr"]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
        sched.step()
        for i, gr in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr * gr
            ref[i] = ref[i] * (1 - lr * cfg.weight_decay)
            ref[i] = ref[i] - lr * (m[i] / (1 - b1 ** n)) / ((v[i] / (1 - b2 ** n)).sqrt() + eps)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)


def test_condition_dropout_rates():
    cfg = TrainConfig()
    g = torch.Generator().manual_seed(0)
    n = 400_000
    t5, llm = draw_condition_dropout(n, cfg, True, g)
    both = (t5 & llm).float().mean().item()
    assert both == pytest.approx(0.001, abs=3e-4)
    assert (llm & ~t5).float().mean().item() == pytest.approx(0.01, abs=1e-3)
    assert (t5 & ~llm).float().mean().item() == pytest.approx(0.1, abs=3e-3)
    only_t5, none = draw_condition_dropout(n, cfg, False, g)
    assert none is None and only_t5.float().mean().item() == pytest.approx(0.1, abs=3e-3)


def test_repeated_clip_in_a_batch_gets_its_own_timestep_and_noise(tmp_path):
    """A dataset smaller than the batch (memorising one clip, issue 14) repeats a clip within a batch: every
    occurrence must get its own timestep and noise (they used to share one draw, so a batch of 8 copies trained
    like a batch of 1), while a clip's first occurrence keeps the draw it always had (bit-exact resume)."""
    tr = Trainer(_cfg(tmp_path, "--train.steps", "1"), loader=_loader(), log=lambda *_: None)
    shape = torch.Size([8, 4, 4, 8, 8])
    t, noise, u = tr.sample_randomness({"index": torch.zeros(8, dtype=torch.long)}, shape)
    assert len(set(t.tolist())) >= 6 and len(set(u.tolist())) == 8
    assert all(not torch.equal(noise[i], noise[j]) for i in range(8) for j in range(i))
    t1, noise1, _ = tr.sample_randomness({"index": torch.tensor([0, 5])}, torch.Size([2, *shape[1:]]))
    assert t1[0] == t[0] and torch.equal(noise1[0], noise[0])  # the first occurrence: the same draw as alone
    t2, noise2, _ = tr.sample_randomness({"index": torch.tensor([5, 0, 0])}, torch.Size([3, *shape[1:]]))
    assert t2[1] == t[0] and torch.equal(noise2[2], noise[1])  # the k-th repeat: a function of (step, clip, k)


def test_logit_normal_timesteps(tmp_path):
    """train.timestep_sampling = logit_normal draws t = 1000 * sigmoid(mean + std * n): mid-noise timesteps
    dominate (uniform puts 40% of the draws in [300, 700), logit-normal(0, 1) about 60%)."""
    draws = {}
    for mode in ("uniform", "logit_normal"):
        tr = Trainer(_cfg(tmp_path / mode, "--train.steps", "1", "--train.timestep_sampling", mode), loader=_loader(),
                     log=lambda *_: None)
        t, _, _ = tr.sample_randomness({"index": torch.arange(4000)}, torch.Size([4000, 1, 1, 1, 1]))
        assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
        draws[mode] = ((t >= 300) & (t < 700)).float().mean().item()
    assert draws["uniform"] == pytest.approx(0.4, abs=0.03)
    assert draws["logit_normal"] == pytest.approx(0.60, abs=0.03)
    with pytest.raises(ValueError, match="timestep_sampling"):
        _cfg(tmp_path, "--train.timestep_sampling", "cosine")


def test_high_noise_share(tmp_path):
    """train.high_noise_share = p: that share of the timesteps is drawn uniformly from [high_noise_from, 1000), the
    rest as before; p = 0 (the default) leaves every draw as it was (no extra random number)."""
    idx = {"index": torch.arange(4000)}
    shape = torch.Size([4000, 1, 1, 1, 1])

    def draw(*over):
        tr = Trainer(_cfg(tmp_path / "_".join(over).replace(".", ""), "--train.steps", "1",
                          "--train.timestep_sampling", "logit_normal", *over), loader=_loader(), log=lambda *_: None)
        return tr.sample_randomness(idx, shape)

    t0, n0, u0 = draw()
    tz, nz, uz = draw("--train.high_noise_share", "0.0")
    assert torch.equal(t0, tz) and torch.equal(n0, nz) and torch.equal(u0, uz)
    t, _, _ = draw("--train.high_noise_share", "0.3", "--train.high_noise_from", "800")
    base = (t0 >= 800).float().mean().item()  # logit-normal(0, 1) alone: ~4 %
    assert base < 0.08
    # share p from [800, 1000) plus (1 - p) of the base draws above 800
    assert (t >= 800).float().mean().item() == pytest.approx(0.3 + 0.7 * base, abs=0.025)
    # uniform over [800, 1000): half of the share lands in [900, 1000)
    base_900 = (t0 >= 900).float().mean().item()
    assert t.max() <= 999 and (t >= 900).float().mean().item() == pytest.approx(0.15 + 0.7 * base_900, abs=0.02)
    with pytest.raises(ValueError, match="high_noise_share"):
        _cfg(tmp_path, "--train.high_noise_share", "1.5")


@pytest.mark.parametrize("prediction,mode", [("epsilon", "x0"), ("v_prediction", "x0"), ("v_prediction", "cap")])
def test_min_snr_gamma_weights_the_mse_term(tmp_path, prediction, mode):
    """train.snr_gamma = 5: the loss a step optimises is mean(w(t) * MSE + VB), w = min(SNR, 5) / SNR for eps and
    min(SNR, 5) / (SNR + 1) for v (Hang et al. 2023; diffusers' --snr_gamma), or with snr_gamma_mode = cap
    min(1, 5 / SNR) whatever the target; SNR from the linear schedule and the MSE written out here (the model
    called directly on x_t); 0 leaves the plain MSE + VB."""
    losses = {}
    for gamma in ("0", "5"):
        tr = Trainer(_cfg(tmp_path / gamma, "--train.steps", "1", "--train.snr_gamma", gamma, "--train.t5_drop", "0",
                          "--model.prediction_type", prediction, "--train.snr_gamma_mode", mode),
                     loader=_loader(batch=6), log=lambda *_: None)
        batch = next(iter(tr.loader))
        x0 = batch["latent"].float()
        t, noise, _ = tr.sample_randomness(batch, x0.shape)
        ac = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].view(-1, 1, 1, 1, 1)
        x_t = (ac.sqrt() * x0 + (1 - ac).sqrt() * noise).float()
        with torch.no_grad():
            out = tr.model(x_t, t, y=batch["y"], mask=batch["mask"], drop_t5=torch.zeros(6, dtype=torch.bool))
            vb = tr.diffusion.training_losses(tr.model, x0, t, model_kwargs={"y": batch["y"], "mask": batch["mask"]},
                                              noise=noise)["vb"]
        target = noise if prediction == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        mse = (out[:, :4].double() - target).square().mean((1, 2, 3, 4))
        snr = (ac / (1 - ac)).flatten()
        w = snr.clamp(max=5) / (snr if prediction == "epsilon" else snr + 1)
        w = torch.ones_like(snr) if gamma == "0" else (5 / snr).clamp(max=1) if mode == "cap" else w
        got = tr.train_step([batch])["loss"].item()
        assert got == pytest.approx((w * mse + vb).mean().item(), rel=1e-4)
        losses[gamma] = got
    assert abs(losses["5"] - losses["0"]) > 1e-3 * losses["0"]  # the weighting is not a no-op on this batch
    with pytest.raises(ValueError, match="snr_gamma"):
        _cfg(tmp_path, "--train.snr_gamma", "-1")
    with pytest.raises(ValueError, match="snr_gamma_mode"):
        _cfg(tmp_path, "--train.snr_gamma_mode", "min")


def test_noise_offset_adds_one_value_per_sample_and_channel(tmp_path):
    """train.noise_offset = 0.5: each sample's noise is the same N(0, 1) draw as without it plus 0.5 * N(0, 1) per
    latent channel, constant over frames and pixels; 0 (the default) draws exactly as before."""
    shape = torch.Size([400, 4, 4, 8, 8])
    idx = {"index": torch.arange(400)}
    _, plain, _ = Trainer(_cfg(tmp_path / "a", "--train.steps", "1"), loader=_loader(),
                          log=lambda *_: None).sample_randomness(idx, shape)
    _, zero, _ = Trainer(_cfg(tmp_path / "b", "--train.steps", "1", "--train.noise_offset", "0"), loader=_loader(),
                         log=lambda *_: None).sample_randomness(idx, shape)
    _, off, _ = Trainer(_cfg(tmp_path / "c", "--train.steps", "1", "--train.noise_offset", "0.5"), loader=_loader(),
                        log=lambda *_: None).sample_randomness(idx, shape)
    assert torch.equal(plain, zero)
    d = off - plain
    per = d[:, :, :1, :1, :1]
    assert torch.allclose(d, per.expand_as(d), atol=1e-6)  # one value per (sample, channel)
    assert per.std().item() == pytest.approx(0.5, rel=0.08) and abs(per.mean().item()) < 0.05
    assert (per[:, 0] - per[:, 1]).std().item() == pytest.approx(0.5 * 2 ** 0.5, rel=0.1)  # independent per channel
    with pytest.raises(ValueError, match="noise_offset"):
        _cfg(tmp_path, "--train.noise_offset", "-0.1")


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _pretrained(tmp_path):
    """A 'pre-trained' tiny model (random weights: a fresh Open-Sora init has a zero final layer, through
    which no gradient would reach adapters)."""
    from modelgrow.models import create_model, save_pretrained

    from .helpers import randomize_

    return str(save_pretrained(randomize_(create_model("STDiT-tiny"), std=0.05), tmp_path / "pretrained"))


def test_explicit_prediction_type_switches_a_pretrained_objective(tmp_path):
    """A pretrained directory brings its own prediction type; an explicit model.prediction_type that differs
    switches it (fine-tuning an eps checkpoint into v): the loss the trainer optimises, the saved checkpoint and
    the export all follow."""
    from modelgrow.diffusion.gaussian_diffusion import ModelMeanType

    pre = _pretrained(tmp_path)
    kept = Trainer(_cfg(tmp_path / "kept", "--train.steps", "1", "--model.from_pretrained", pre),
                   loader=_loader(), log=lambda *_: None)
    assert kept.prediction_type == "epsilon" and kept.diffusion.model_mean_type == ModelMeanType.EPSILON
    tr = Trainer(_cfg(tmp_path / "v", "--train.steps", "1", "--checkpoint.every_steps", "1",
                      "--model.from_pretrained", pre, "--model.prediction_type", "v_prediction"),
                 loader=_loader(), log=lambda *_: None)
    assert tr.prediction_type == "v_prediction" and tr.diffusion.model_mean_type == ModelMeanType.VELOCITY
    tr.fit()
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "modelgrow", "export", "--ckpt", str(tmp_path / "v" / "checkpoints" /
                        "step_00000001"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert from_pretrained(out).prediction_type == "v_prediction"
    assert from_pretrained(pre).prediction_type == "epsilon"  # the source is untouched
    # and a v directory stays v when nothing is said
    again = Trainer(_cfg(tmp_path / "again", "--train.steps", "1", "--model.from_pretrained", str(out)),
                    loader=_loader(), log=lambda *_: None)
    assert again.prediction_type == "v_prediction"


def test_lora_mode_trains_only_adapters_and_exports_merged(tmp_path):
    tr = Trainer(_cfg(tmp_path, "--train.steps", "3", "--train.mode", "lora", "--train.lora_rank", "4",
                      "--checkpoint.every_steps", "3", "--checkpoint.load_weights", _pretrained(tmp_path)),
                 loader=_loader(), log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    changed = _changed(before, tr.model)
    assert changed and all("lora_" in n for n in changed)
    assert {n for n, p in tr.model.named_parameters() if p.requires_grad} == {n for n in before if "lora_" in n}
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "modelgrow", "export", "--ckpt", str(tmp_path / "checkpoints" / "step_00000003"),
                        "--out", str(out), "--weights", "raw"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    merged = from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    b = next(iter(_loader()))
    tr.model.eval()
    with torch.no_grad():
        want = tr.model(b["latent"], torch.tensor([10.0, 500.0]), b["y"], b["mask"])
        got = merged(b["latent"], torch.tensor([10.0, 500.0]), b["y"], b["mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["weights"] == "raw"


def test_new_blocks_only_mode_and_llm(tmp_path):
    tr = Trainer(_cfg(tmp_path, "--train.steps", "2", "--train.mode", "expand", "--grow.strategy", "insert",
                      "--grow.ratio", "1", "--grow.train_new_only", "true", "--grow.llm", "true",
                      "--grow.llm_channels", "16", "--grow.llm_max_length", "5", "--checkpoint.every_steps", "2",
                      "--checkpoint.load_weights", _pretrained(tmp_path)),
                 loader=_loader(llm=True), log=lambda *_: None)
    assert len(tr.model.blocks) == 4
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    changed = _changed(before, tr.model)
    new = {1, 3}
    for n in changed:
        assert "llm_" in n or (n.startswith("blocks.") and int(n.split(".")[1]) in new), n
    assert any(n.startswith("blocks.1.") and "llm_" not in n for n in changed)
    out = tmp_path / "ema"
    r = subprocess.run([sys.executable, "-m", "modelgrow", "export", "--ckpt", str(tmp_path / "checkpoints" / "step_00000002"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    exported = from_pretrained(out)
    params = dict(exported.named_parameters())
    for n, t in tr.ema.shadow.items():
        torch.testing.assert_close(params[n], t, msg=n)


def test_nan_loss_stops_before_any_checkpoint(tmp_path):
    class NaNLoader(RandomLatentLoader):
        def __iter__(self):
            for b in super().__iter__():
                b["latent"][:] = float("nan")
                yield b

    tr = Trainer(_cfg(tmp_path, "--train.steps", "3", "--checkpoint.every_steps", "1"),
                 loader=NaNLoader(2, (4, 4, 8, 8), (8, 32)), log=lambda *_: None)
    with pytest.raises(FloatingPointError, match="no checkpoint|before any checkpoint"):
        tr.fit()
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


def test_mode_errors(tmp_path):
    with pytest.raises(ValueError, match="train.mode = 'expand'"):
        Trainer(_cfg(tmp_path, "--grow.strategy", "insert"), loader=_loader())
    with pytest.raises(ValueError, match="needs a grown model"):
        Trainer(_cfg(tmp_path, "--train.mode", "expand"), loader=_loader())


def test_dtype_pair_decides_the_model_dtypes(tmp_path):
    """train.param_dtype / compute_dtype are the only dtype settings: parallelize() puts the weights in param_dtype
    and the input cast at the weights' dtype (autocast runs compute_dtype); pure bf16 trains in bf16."""
    t = Trainer(_cfg(tmp_path / "a", "--train.steps", "1", "--train.compute_dtype", "bfloat16"), loader=_loader(),
                log=lambda *_: None)
    assert t.applied["dtype"] == {"params": "float32", "compute": "bfloat16", "how": "autocast"}
    assert t.model.dtype == torch.float32 and all(p.dtype == torch.float32 for p in t.model.parameters())
    t = Trainer(_cfg(tmp_path / "b", "--train.steps", "2", "--train.param_dtype", "bfloat16",
                     "--train.compute_dtype", "bfloat16"), loader=_loader(), log=lambda *_: None)
    assert t.model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for v in t.ema.shadow.values())  # the EMA stays fp32
    hist = t.fit()
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in hist)
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
