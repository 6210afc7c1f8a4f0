"""Generation is seen to work, end to end (issue 14): the tiny STDiT, trained by the project's Trainer on one
cached clip until it memorises it, regenerates that clip through ``ModelGrowPipeline`` (IDDPM and DDIM, with
classifier-free guidance), decoded by the VAE.

Every real component is in the loop: a synthetic clip written as a VP9 file and its manifest, a tiny
AutoencoderTiny trained on its frames (latents standardised by the saved shift/scaling factors), a tiny T5,
the latent/text cache, ``Trainer`` (IDDPM MSE + VB loss, condition dropout, AdamW, EMA, DCP checkpoint), the
EMA export to a pretrained directory, the pipeline's samplers and guidance, the VAE decode, and the project's
semantic evaluator. The checks: PSNR of the generated video against the VAE reconstruction of the clip, and the
evaluator reading the prompted colour and direction (and the same shape it reads on the VAE reconstruction). A
freshly initialised model through the same path fails the same checks, so the test can fail.

What this test caught (issue 14): the Trainer keyed each sample's timestep and noise on (seed, step, manifest
row), so the 8 copies of the one clip in a batch shared one timestep and one noise: a batch of 8 trained like a
batch of 1. Fixed (a repeated clip gets a draw per occurrence; tests/test_train.py checks it). Before the fix,
1600 steps gave PSNR 28 dB (IDDPM) / 25 dB (DDIM), a faint square and the wrong direction: at t >= 600 the
model predicted the mean of the 4 frames (it had not learned which frame a token is in, which at high noise
only the temporal position embedding of block 0's temporal attention tells it).

Why these settings (measured on 2 CPU cores): eps prediction at t ~ 1000 needs the network to reproduce x_t
almost exactly (x0 = (x_t - 0.99998 eps) / 0.0064 at t = 999), so a small eps error becomes a large x0 error.
With patch (1, 2, 2) on 4 latent channels (16 values per token, hidden 64) the tiny model learns that identity
in ~1000 steps; with 16x16 latent patches of 64 values per token (the old demo's patch 4) it does not in this
budget (eps MSE 0.04 at t = 999, sampled latents std ~30). Which frame a token is in -- the motion -- is what
is learned last: its loss signal lives at mid/high noise (t ~ 400-800), which Open-Sora's uniform timesteps
visit rarely next to the large low-noise losses. Logit-normal timesteps (train.timestep_sampling, SD3's) put
60% of the draws in [300, 700): 1600 steps then give PSNR 55 dB (IDDPM-50) / 50 dB (DDIM-25) and the right
direction; with uniform timesteps (and the fix) 1600 steps give 27 dB and the wrong direction; with logit-normal
timesteps 1000 steps give 34 / 27 dB (wrong DDIM direction), 800 steps 25 / 26 dB.
"""

from __future__ import annotations

import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from modelgrow.config import load_config  # noqa: E402
from modelgrow.data.cache import CachedDataset, build_cache  # noqa: E402
from modelgrow.models import STDiT, from_pretrained  # noqa: E402
from modelgrow.pipeline import ModelGrowPipeline  # noqa: E402
from modelgrow.synthetic.semantic import train_classifier  # noqa: E402
from modelgrow.synthetic.world import generate, read_manifest, render_clip, sample_specs  # noqa: E402
from modelgrow.text import T5Encoder  # noqa: E402
from modelgrow.text.tiny import build_tiny_t5  # noqa: E402
from modelgrow.train import Trainer  # noqa: E402
from modelgrow.train.checkpoint import latest_checkpoint  # noqa: E402
from modelgrow.train.export import export_checkpoint  # noqa: E402
from modelgrow.vae import VideoVAE  # noqa: E402

from .helpers import psnr, train_vae  # noqa: E402

FRAMES, SIZE, T5_TOKENS = 4, 32, 16
STEPS = 1600


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run fastest on one thread: with two, a loaded 2-core machine makes the VAE's small
    convolutions 30x slower (measured: 254 s instead of 7 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, one_thread):
    t_start = time.perf_counter()
    root = tmp_path_factory.mktemp("memorise")
    torch.manual_seed(0)
    # one clip of domain A (a red square moving up on a gray background), as a VP9 file + manifest
    manifest = generate(root / "data", "A", "train", n=1, num_frames=FRAMES, height=SIZE, width=SIZE, codec="webm",
                        seed=0, progress=False)
    row = read_manifest(manifest)[0]
    spec = sample_specs("A", 1, seed=0, split="train")[0]
    assert row["caption"] == "a red square moving up on a gray background"
    truth = torch.from_numpy(render_clip(spec, FRAMES, SIZE, SIZE)).permute(3, 0, 1, 2).float() / 127.5 - 1

    train_vae(truth.permute(1, 0, 2, 3), root / "vae")
    build_tiny_t5(str(root / "t5"), vocab_size=60, d_model=32, corpus=[row["caption"], row["long_caption"]] * 10)
    vae = VideoVAE.from_pretrained(root / "vae", micro_batch_size=16)
    t5 = T5Encoder(str(root / "t5"), max_length=T5_TOKENS, device="cpu")
    build_cache(manifest, root / "cache", vae=vae, t5=t5, num_frames=FRAMES, frame_interval=1,
                image_size=(SIZE, SIZE), prompt_mode="S", batch_size=1, device="cpu")
    latent = CachedDataset(root / "cache")[0]["latent"][None].float()  # [1, 4, T, 8, 8]

    lat = SIZE // 4
    cfg = load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.input_size", f"{FRAMES},{lat},{lat}",
        "--model.caption_channels", "32", "--model.model_max_length", str(T5_TOKENS),
        "--data.cache_dir", str(root / "cache"),
        "--data.num_workers", "0", "--train.steps", str(STEPS), "--train.batch_size", "8",
        "--train.output_dir", str(root / "run"), "--train.log_every", str(STEPS // 4),
        "--train.compute_dtype", "float32", "--train.ema_decay", "0.99", "--optim.lr", "2e-3",
        "--optim.warmup_steps", "50", "--optim.decay_steps", str(STEPS - 50), "--checkpoint.every_steps", str(STEPS),
        "--train.timestep_sampling", "logit_normal"])
    lines: list[str] = []
    trainer = Trainer(cfg, log=lines.append)
    history = trainer.fit()
    _, _, meta = export_checkpoint(latest_checkpoint(root / "run" / "checkpoints"), root / "model", "ema")
    return {"root": root, "spec": spec, "caption": row["caption"], "truth": truth, "latent": latent, "vae": vae,
            "t5": t5, "model_dir": root / "model", "history": history, "log": lines, "meta": meta,
            "setup_s": time.perf_counter() - t_start}


@pytest.fixture(scope="module")
def evaluator(one_thread):
    # a quick evaluator (domain A only): colour and direction are read reliably at this size, shape less so
    return train_classifier(("A",), n_train=192, steps=120, seed=0, eval_n=0)


def _sample(pipe, caption, sampler, steps, scale):
    """The pipeline's latents and its decoded video [3, T, H, W] in [-1, 1] for one prompt."""
    kw = dict(num_frames=FRAMES, height=SIZE, width=SIZE, sampler=sampler, num_inference_steps=steps,
              guidance_scale=scale, progress=False)
    z = pipe(caption, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).videos
    video = pipe(caption, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).videos
    return z[0], video[0].float()


def test_training_converged(memorised):
    h = memorised["history"]
    assert h[-1]["step"] == STEPS and memorised["meta"]["step"] == STEPS
    assert max(m["loss"] for m in h[-2:]) < 0.05, [round(m["loss"], 4) for m in h]


@pytest.mark.parametrize("sampler,steps,scale", [("iddpm", 50, 7.0), ("ddim", 25, 4.0)])
def test_regenerates_the_memorised_clip(memorised, evaluator, sampler, steps, scale):
    m = memorised
    vae = m["vae"]
    recon = vae.decode(m["latent"]).float()[0]  # what a perfect generator would give through this VAE
    truth_psnr = psnr(recon, m["truth"])
    assert truth_psnr > 24, f"the VAE itself does not reconstruct the clip ({truth_psnr:.1f} dB)"

    def run(model):
        pipe = ModelGrowPipeline(model.eval(), vae, m["t5"], config={"t5_max_length": T5_TOKENS})
        return _sample(pipe, m["caption"], sampler, steps, scale)

    z, video = run(from_pretrained(m["model_dir"]))  # the exported EMA weights
    quality = psnr(video, recon)
    pred = evaluator.predict([video, m["truth"], recon])
    fresh_z, fresh_video = run(STDiT(**from_pretrained(m["model_dir"]).config))  # untrained: the negative control
    fresh_pred = evaluator.predict([fresh_video])
    report = (f"{sampler}-{steps} cfg {scale}: PSNR vs VAE recon {quality:.1f} dB (untrained {psnr(fresh_video, recon):.1f}),"
              f" latent std {z.std():.2f} (data {m['latent'].std():.2f}), max |z| {z.abs().max():.1f};"
              f" evaluator on sample {[pred[a][0] for a in pred]}, on the clip {[pred[a][1] for a in pred]},"
              f" on the VAE recon {[pred[a][2] for a in pred]},"
              f" untrained {[fresh_pred[a][0] for a in fresh_pred]}; setup {m['setup_s']:.0f} s")
    print(report)
    from modelgrow.video_io import keyframe_strip, to_uint8, write_png

    for name, v in (("sample", video), ("recon", recon), ("untrained", fresh_video)):
        write_png(m["root"] / f"{sampler}_{name}.png", keyframe_strip(to_uint8(v), n=FRAMES))
    assert quality >= 24.0, report
    assert (z.std() / m["latent"].std() - 1).abs() < 0.15 and z.abs().max() < 3 * m["latent"].abs().max(), report
    spec = m["spec"]
    assert pred["color"][0] == spec.color and pred["direction"][0] == spec.direction, report
    # the shape it reads on the VAE reconstruction (a 7-pixel square at 32x32 is too small for the quick
    # evaluator to name reliably: it reads the rendered clip as a circle)
    assert pred["shape"][0] == pred["shape"][2], report
    # the same path with an untrained model fails these checks
    assert psnr(fresh_video, recon) < 15.0, report


def test_time_reversal_gain_separates_a_model_that_knows_the_motion(memorised):
    """workbench.time_reversal_gain (the demo's motion diagnostic): the memorised model, which regenerates the
    clip's motion, predicts the time-reversed clip clearly worse; a model blind to frame order (random weights,
    Open-Sora's zero temporal-attention output) scores exactly the same on both."""
    from modelgrow.workbench import time_reversal_gain

    from .helpers import randomize_

    cache = memorised["root"] / "cache"
    gain = time_reversal_gain(from_pretrained(memorised["model_dir"]).eval(), cache, llm=False)
    blind = randomize_(STDiT(**from_pretrained(memorised["model_dir"]).config))
    blind.initialize_temporal()
    blind_gain = time_reversal_gain(blind.eval(), cache, llm=False)
    print(f"time-reversal gain: memorised {gain:.3f}, order-blind {blind_gain:.2e}")
    assert abs(blind_gain) < 1e-6, blind_gain
    assert gain > 2.0, gain  # measured 22: the reversed clip's loss is 23x the clip's
