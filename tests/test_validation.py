"""Training-loop features (issue 17, item 4): the EMA warm-up (checked against diffusers' EMAModel), the
validation during training (held-out denoising loss at fixed timesteps and noise, sampled clips written as
mp4/png and to TensorBoard), its independence from the training run, and its multi-rank (FSDP) form.

The held-out set: 3 synthetic clips of domain A's held-out split (4 frames, 32x32, VP9 files + manifest), a
random tiny AutoencoderKL (8x), a tiny T5, and their latent/text cache. Training runs on the random-latent stream.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from modelgrow.config import ConfigError, load_config
from modelgrow.diffusion import IDDPM
from modelgrow.models import STDiT
from modelgrow.train import RandomLatentLoader, Trainer
from modelgrow.train.state import EMA

from .helpers import randomize_

NF, SIZE, N_HELD = 4, 32, 3
QUIET = {"log": lambda *_: None}
BASE = ["--model.preset", "STDiT-tiny", "--model.input_size", f"{NF},4,4", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.log_every", "1", "--train.compute_dtype", "float32",
        "--optim.lr", "1e-3", "--checkpoint.every_steps", "1000", "--train.batch_size", "2"]


def _cfg(out, *extra):
    return load_config(None, [*BASE, "--train.output_dir", str(out), *extra])


def _loader():
    return RandomLatentLoader(2, (4, NF, 4, 4), (8, 32), seed=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a loaded 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from modelgrow import synthetic
    from modelgrow.data.cache import build_cache
    from modelgrow.text import T5Encoder
    from modelgrow.text.tiny import build_tiny_t5
    from modelgrow.vae import VideoVAE

    from .test_cache import tiny_vae

    d = tmp_path_factory.mktemp("heldout")
    manifest = synthetic.generate(d / "vid", "A", "heldout", n=N_HELD, num_frames=NF, height=SIZE, width=SIZE,
                                  codec="webm", progress=False)
    vae_dir = tiny_vae(d / "vae")
    t5_dir = build_tiny_t5(str(d / "t5"))
    vae = VideoVAE.from_pretrained(vae_dir, device="cpu")
    t5 = T5Encoder(t5_dir, max_length=8, device="cpu")
    build_cache(manifest, d / "cache", vae, t5, num_frames=NF, frame_interval=1, image_size=(SIZE, SIZE),
                prompt_mode="S", batch_size=3, shard_size=4, decoder="pyav", device="cpu")
    return {"manifest": str(manifest), "cache": str(d / "cache"), "vae": vae_dir, "t5": t5_dir}


def _val(heldout, *extra):
    return ["--data.val_cache_dir", heldout["cache"], "--data.vae", heldout["vae"], *extra]


# ------------------------------------------------------------------------------------------------------------
# EMA warm-up
# ------------------------------------------------------------------------------------------------------------


def _diffusers_decay(step, decay, inv_gamma, power, min_decay):
    """What diffusers' EMAModel(use_ema_warmup=True).step uses at its optimization_step = step."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay, min_decay=min_decay, use_ema_warmup=True,
                   inv_gamma=inv_gamma, power=power)
    return ema.get_decay(step)


@pytest.mark.parametrize("decay, inv_gamma, power, min_decay", [
    (0.9999, 1.0, 2 / 3, 0.0), (0.999, 1.0, 0.75, 0.0), (0.995, 10.0, 0.5, 0.1), (0.5, 2.0, 0.75, 0.3)])
def test_ema_warmup_decay_is_diffusers(decay, inv_gamma, power, min_decay):
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay, warmup=True, inv_gamma=inv_gamma, power=power, min_decay=min_decay)
    for step in [1, 2, 3, 4, 5, 10, 100, 1000, 31623, 10**6, 10**8]:
        assert ema.decay_at(step) == pytest.approx(_diffusers_decay(step, decay, inv_gamma, power, min_decay),
                                                   rel=1e-12, abs=0), step
    fixed = EMA(model, decay)  # no warm-up: the fixed decay from the first step (the behaviour before)
    assert fixed.decay_at(1) == fixed.decay_at(10**6) == decay


def test_ema_warmup_weights_are_the_hand_computed_average(tmp_path):
    from diffusers.training_utils import EMAModel

    g, p, hi, lo = 2.0, 0.75, 0.5, 0.3  # decays 0, 0.3 (min clip), 0.405, 0.497, 0.5 (max clip)
    tr = Trainer(_cfg(tmp_path / "run", "--train.steps", "5", "--train.ema_warmup", "true", "--train.ema_decay", str(hi),
                      "--train.ema_inv_gamma", str(g), "--train.ema_power", str(p), "--train.ema_min_decay", str(lo),
                      "--optim.lr", "1e-2"), loader=_loader(), **QUIET)
    names = list(tr.ema.shadow)
    init = {n: p_.detach().double().clone() for n, p_ in tr.model.named_parameters()}
    snaps = []
    step_fn = tr.train_step

    def recording(batches):
        out = step_fn(batches)
        snaps.append({n: p_.detach().clone() for n, p_ in tr.model.named_parameters()})
        return out

    tr.train_step = recording
    history = tr.fit()
    decays = [0.0] + [min(max(1 - (1 + n / g) ** -p, lo), hi) for n in range(1, 5)]
    assert decays[1] == lo and decays[4] == hi and lo < decays[2] < decays[3] < hi
    assert [m["ema_decay"] for m in history] == pytest.approx(decays, abs=1e-15)
    ema = dict(init)
    for d, snap in zip(decays, snaps, strict=True):
        ema = {n: d * ema[n] + (1 - d) * snap[n].double() for n in names}
    reference = EMAModel([torch.nn.Parameter(init[n].float().clone()) for n in names], decay=hi, min_decay=lo,
                         use_ema_warmup=True, inv_gamma=g, power=p)
    for snap in snaps:
        reference.step([torch.nn.Parameter(snap[n]) for n in names])
    fixed = dict(init)
    for snap in snaps:
        fixed = {n: hi * fixed[n] + (1 - hi) * snap[n].double() for n in names}
    moved = 0.0
    for n, ref in zip(names, reference.shadow_params, strict=True):
        torch.testing.assert_close(tr.ema.shadow[n].double(), ema[n], rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(tr.ema.shadow[n], ref, rtol=0, atol=1e-6, msg=n)
        moved = max(moved, (ema[n] - fixed[n]).abs().max().item())
    assert moved > 1e-4  # the warm-up average is not the fixed-decay one (100x the tolerance): the schedule is seen


def test_ema_warmup_resumes_its_schedule(tmp_path):
    warm = ["--train.ema_warmup", "true", "--train.ema_decay", "0.9", "--checkpoint.every_steps", "2"]
    straight = Trainer(_cfg(tmp_path / "a", "--train.steps", "4", *warm), loader=_loader(), **QUIET)
    straight.fit()
    Trainer(_cfg(tmp_path / "b", "--train.steps", "2", *warm), loader=_loader(), **QUIET).fit()
    resumed = Trainer(_cfg(tmp_path / "b", "--train.steps", "4", *warm), loader=_loader(), **QUIET)
    assert resumed.step == 2
    hist = resumed.fit()
    assert [m["ema_decay"] for m in hist] == [m["ema_decay"] for m in straight.history[2:]]
    for n, t in straight.ema.shadow.items():
        assert torch.equal(t, resumed.ema.shadow[n]), n


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------


def heldout_loss(model: torch.nn.Module, clips: list[dict]) -> float:
    """The documented definition, one clip and one timestep at a time: mean IDDPM loss at 8 timesteps
    (linspace(50, 950, 8)) with the noise of torch.Generator().manual_seed(8 * clip + k)."""
    diffusion = IDDPM(timestep_respacing="")
    losses = []
    model.eval()
    with torch.no_grad():
        for j, c in enumerate(clips):
            for k, tv in enumerate(np.linspace(50, 950, 8).round().astype(int)):
                noise = torch.randn(c["latent"].shape, generator=torch.Generator().manual_seed(8 * j + k))
                out = diffusion.training_losses(model, c["latent"][None].float(), torch.tensor([int(tv)]), noise=noise[None],
                                                model_kwargs={"y": c["y"][None], "mask": c["mask"][None]})
                losses.append(out["loss"].item())
    return float(np.mean(losses))


def _model_with(tr: Trainer, weights: dict[str, torch.Tensor]) -> STDiT:
    m = STDiT(**tr.cfg.model.stdit_kwargs())
    m.load_state_dict({**tr.model.state_dict(), **weights})
    return m


def _records(out, kind=None):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") == kind]


def test_validation_loss_is_logged_and_leaves_training_unchanged(heldout, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelgrow.data.cache import CachedDataset

    plain = Trainer(_cfg(tmp_path / "plain", "--train.steps", "4", "--train.ema_decay", "0.5"), loader=_loader(), **QUIET)
    plain.fit()
    lines: list[str] = []
    tr = Trainer(_cfg(tmp_path / "val", "--train.steps", "4", "--train.ema_decay", "0.5", "--train.val_every", "3",
                      "--train.val_batches", "1", "--train.val_weights", "both",
                      "--data.val_cache_dir", heldout["cache"]), loader=_loader(), log=lines.append)
    tr.fit()
    # the run is the same with and without validation: losses, weights, EMA (RNG, weights and mode restored)
    assert [m["loss"] for m in tr.history] == [m["loss"] for m in plain.history]
    for (n, a), b in zip(tr.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b), n
    for n, t in plain.ema.shadow.items():
        assert torch.equal(t, tr.ema.shadow[n]), n
    assert tr.model.training
    # at step 3 (val_every) and at the last step; both weights; the first batch_size = 2 held-out clips
    recs = _records(tmp_path / "val", "val")
    assert [r["step"] for r in recs] == [3, 4]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in recs] == tr.val_history
    assert all(r["clips"] == 2 and r["timesteps"] == 8 and r["weights"] == "both" for r in recs)
    assert len(_records(tmp_path / "val")) == 4  # the step records are untouched (no "kind")
    clips = [CachedDataset(heldout["cache"]).get(k) for k in range(2)]
    want_model = heldout_loss(_model_with(tr, dict(tr.model.named_parameters())), clips)
    want_ema = heldout_loss(_model_with(tr, tr.ema.shadow), clips)
    assert recs[-1]["loss_model"] == pytest.approx(want_model, rel=1e-5)
    assert recs[-1]["loss_ema"] == pytest.approx(want_ema, rel=1e-5)
    assert abs(want_ema - want_model) > 1e-4 * want_model  # the two weights really differ
    assert recs[0]["loss_model"] != recs[1]["loss_model"]
    assert any(line.startswith("val step 4 | loss ") and "(EMA weights)" in line and "(trained weights)" in line
               for line in lines)
    # TensorBoard: the validation scalars beside the training ones
    acc = EventAccumulator(str(tmp_path / "val" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss_ema", "val/loss_model"} <= set(tags)
    assert [e.step for e in acc.Scalars("val/loss_ema")] == [3, 4]
    assert acc.Scalars("val/loss_ema")[-1].value == pytest.approx(recs[-1]["loss_ema"], rel=1e-6)


def test_validation_from_the_manifest_equals_the_cache(heldout, tmp_path):
    common = ["--train.val_every", "1", "--train.val_batches", "2", "--train.val_weights", "model"]
    by_cache = Trainer(_cfg(tmp_path / "a", *common, "--data.val_cache_dir", heldout["cache"]), loader=_loader(), **QUIET)
    by_raw = Trainer(_cfg(tmp_path / "b", *common, "--data.val_manifest", heldout["manifest"], "--data.vae", heldout["vae"],
                          "--data.t5", heldout["t5"], "--data.prompt_mode", "S", "--data.num_frames", str(NF),
                          "--data.frame_interval", "1", "--data.image_size", f"{SIZE},{SIZE}", "--data.decoder", "pyav"),
                     loader=_loader(), **QUIET)
    for tr in (by_cache, by_raw):  # the same weights, and none zero (a zero final layer ignores the latents)
        randomize_(tr.model, std=0.05, seed=3)
    a, b = by_cache.validate(), by_raw.validate()
    assert a["clips"] == b["clips"] == N_HELD  # 2 batches of 2 asked, 3 clips held out
    assert b["loss_model"] == pytest.approx(a["loss_model"], rel=1e-5)
    assert [c["prompt"] for c in by_raw.validator.clips] == [c["prompt"] for c in by_cache.validator.clips]
    for c in by_cache.validator.clips:  # the loss sees the latents: mirrored latents move it 10x the tolerance
        c["latent"] = c["latent"].flip(-1)
    assert abs(by_cache.validate()["loss_model"] - a["loss_model"]) > 1e-4 * a["loss_model"]


def test_validation_samples_are_written_and_logged(heldout, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelgrow.data.cache import CachedDataset
    from modelgrow.video_io import read_video

    out = tmp_path / "run"
    lines: list[str] = []
    tr = Trainer(_cfg(out, "--train.steps", "2", "--train.val_every", "2", "--train.val_samples", "2",
                      "--sample.num_sampling_steps", "3", "--sample.fps", "4", *_val(heldout)), loader=_loader(),
                 log=lines.append)
    tr.fit()
    folder = out / "val" / "step_0000002"
    meta = json.loads((folder / "prompts.json").read_text())
    prompts = [CachedDataset(heldout["cache"]).get(k)["prompt"] for k in range(2)]
    assert [s["prompt"] for s in meta["samples"]] == prompts and meta["settings"]["steps"] == 3
    assert all(s["weights"] == "ema" for s in meta["samples"])
    for i in range(2):
        frames, fps = read_video(folder / f"{i:02d}.mp4")
        assert frames.shape == (NF, SIZE, SIZE, 3) and fps == 4
        assert (folder / f"{i:02d}.png").stat().st_size > 0
    assert any("2 samples (ema) in" in line for line in lines)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {"val/video/0", "val/video/1", "val/keyframes/0", "val/keyframes/1"} <= images
    gif = acc.Images("val/video/0")[0]
    assert gif.step == 2 and gif.encoded_image_string[:4] == b"GIF8" and (gif.width, gif.height) == (SIZE, SIZE)
    strip = acc.Images("val/keyframes/0")[0]
    assert strip.encoded_image_string[:4] == b"\x89PNG" and (strip.width, strip.height) == (NF * SIZE, SIZE)


def test_validation_config_errors(heldout, tmp_path):
    with pytest.raises(ValueError, match="data.val_cache_dir"):
        Trainer(_cfg(tmp_path / "a", "--train.val_every", "5"), loader=_loader(), **QUIET)
    with pytest.raises(ValueError, match="data.vae"):
        Trainer(_cfg(tmp_path / "b", "--train.val_every", "5", "--train.val_samples", "1",
                     "--data.val_cache_dir", heldout["cache"]), loader=_loader(), **QUIET)
    with pytest.raises(FileNotFoundError, match="data.val_manifest"):
        Trainer(_cfg(tmp_path / "c", "--train.val_every", "5", "--data.val_manifest", str(tmp_path / "none.csv")),
                loader=_loader(), **QUIET)
    for bad, key in ((["--train.ema_min_decay", "0.99", "--train.ema_decay", "0.9"], "train.ema_min_decay"),
                     (["--train.ema_power", "0"], "train.ema_power"), (["--train.val_batches", "0"], "train.val_batches"),
                     (["--train.wandb", "yes"], "train.wandb"), (["--train.val_weights", "raw"], "train.val_weights")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, bad)


def test_validation_keys_may_change_on_resume(heldout, tmp_path):
    Trainer(_cfg(tmp_path / "r", "--train.steps", "1", "--checkpoint.every_steps", "1"), loader=_loader(), **QUIET).fit()
    tr = Trainer(_cfg(tmp_path / "r", "--train.steps", "2", "--train.val_every", "1", "--train.ema_warmup", "true",
                      "--data.val_cache_dir", heldout["cache"]), loader=_loader(), **QUIET)
    assert tr.step == 1
    tr.fit()
    assert [r["step"] for r in tr.val_history] == [2]


@pytest.mark.slow
def test_torchrun_validation_matches_single_process(heldout, tmp_path):
    """FSDP2 on 2 ranks (tests/train_worker.py under torchrun): the all-reduced held-out loss is the single
    process's (3 clips in batches of 1: rank 1 runs a zero-weight batch), and validating (EMA swapped in and out of
    sharded parameters, reshard after the no-grad forwards) leaves the training losses unchanged."""
    from .test_train import _run_worker

    val = ["--train.val_every", "2", "--train.val_batches", "3", "--train.val_weights", "both",
           "--train.val_samples", "1", "--sample.num_sampling_steps", "2", "--train.ema_decay", "0.5",
           "--model.input_size", f"{NF},4,4", *_val(heldout)]
    two_h, _ = _run_worker(tmp_path / "two", 4, 4, nproc=2, extra=val)
    # the worker's single-process run, in this process
    cfg = load_config(None, ["--model.preset", "STDiT-tiny", "--model.caption_channels", "32", "--model.model_max_length",
                             "8", "--train.steps", "4", "--train.log_every", "1", "--train.output_dir", str(tmp_path / "one"),
                             "--train.compute_dtype", "float32", "--checkpoint.every_steps", "1000", "--optim.lr", "1e-3",
                             *val])
    one_h = [m["loss"] for m in Trainer(cfg, loader=RandomLatentLoader(4, (4, 4, 8, 8), (8, 32), seed=3), **QUIET).fit()]
    assert two_h == pytest.approx(one_h, rel=1e-5, abs=1e-6)
    one, two = _records(tmp_path / "one", "val"), _records(tmp_path / "two", "val")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4]
    for a, b in zip(one, two, strict=True):
        assert a["clips"] == b["clips"] == N_HELD
        assert b["loss_model"] == pytest.approx(a["loss_model"], rel=1e-5)
        assert b["loss_ema"] == pytest.approx(a["loss_ema"], rel=1e-5)
    for run in ("one", "two"):
        assert (tmp_path / run / "val" / "step_0000004" / "00.mp4").exists()
    assert math.isfinite(two[-1]["loss_ema"])


def test_compiled_training_matches_eager_and_validates_eager(heldout, tmp_path):
    """``parallel.compile`` on a CPU: per-block torch.compile (Inductor; the fused ops traced as their PyTorch
    expressions, mgkernels.dispatch.traced_ref) trains like the eager run, to round-off, and the validation inside
    runs eager: no block is compiled again for eval mode and no grad."""
    from torch._dynamo.utils import counters

    common = ("--train.steps", "3", "--train.val_every", "2", "--train.val_batches", "1", "--train.val_weights", "model",
              "--data.val_cache_dir", heldout["cache"])
    eager = Trainer(_cfg(tmp_path / "eager", *common), loader=_loader(), **QUIET)
    eager.fit()
    torch._dynamo.reset()
    counters.clear()
    comp = Trainer(_cfg(tmp_path / "comp", *common, "--parallel.compile", "true"), loader=_loader(), **QUIET)
    comp.fit()
    assert comp.applied["compile"] and not eager.applied.get("compile")
    # one graph per block, compiled once for training (a validation through the compiled blocks would add more)
    assert counters["stats"]["unique_graphs"] == len(comp.model.blocks)
    assert [m["loss"] for m in comp.history] == pytest.approx([m["loss"] for m in eager.history], rel=1e-4)
    assert [r["loss_model"] for r in comp.val_history] == pytest.approx([r["loss_model"] for r in eager.val_history],
                                                                       rel=1e-4)
    for (n, a), b in zip(comp.model.named_parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda e, n=n: f"{n}: {e}")
    torch._dynamo.reset()
