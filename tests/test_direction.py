"""The prompted motion direction steers generation (issue 14), end to end through the project's Trainer and
pipeline: two clips that are each other played backwards (a red square moving up, and the same clip reversed:
moving down), captions differing only in the direction word.

A model that reads the word regenerates the prompted clip for every noise; one that does not regenerates one of the
two, picked by the noise. Measured (1600 steps, batch 8, 2 CPU cores, 4 noise seeds each, IDDPM-50 / DDIM-25,
guidance 1-7): every model trained with Open-Sora v1.0's eps objective ignored the word -- temporal embedding in
block 0's temporal attention or on every token, uniform or logit-normal timesteps, even with 30% of the timesteps
in [800, 1000) -- while a colour pair (red / blue square, same motion) was learned in the same setting. Why: at
t >= ~850 x_t no longer shows which of the two clips it came from, so only the caption can tell, but the eps loss
there is nearly blind to x0 (eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) with ab < 3e-3): the caption gets no gradient
where the direction is decided. Predicting v = sqrt(ab) eps - sqrt(1 - ab) x0 instead (v ~ -x0 at high noise) with
30% of the timesteps in [800, 1000) and the temporal embedding on every token: the prompted clip for every seed at
48-55 dB. Without the tokens placement (v, 30%): the noise still decides at this budget; with every timestep in
[850, 1000) v1.0's placement follows the word in 2 of 3 cases, blurry. The table: experiments/direction_pair.py
(docs/demo_recipe.md section 8). ``DemoSize`` keeps v1.0's objective: on the demo's world this recipe did not move
the direction off chance at a CPU budget.

The eps model is the negative control: the same data, steps and sampling, only the objective differs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from modelgrow.config import load_config  # noqa: E402
from modelgrow.data.cache import CachedDataset, build_cache  # noqa: E402
from modelgrow.models import from_pretrained  # noqa: E402
from modelgrow.pipeline import ModelGrowPipeline  # noqa: E402
from modelgrow.synthetic.world import read_manifest, render_clip, sample_specs, time_reversed, write_clips  # noqa: E402
from modelgrow.text import T5Encoder  # noqa: E402
from modelgrow.text.tiny import build_tiny_t5  # noqa: E402
from modelgrow.train import Trainer  # noqa: E402
from modelgrow.train.checkpoint import latest_checkpoint  # noqa: E402
from modelgrow.train.export import export_checkpoint  # noqa: E402
from modelgrow.vae import VideoVAE  # noqa: E402

from .helpers import psnr, train_vae  # noqa: E402

FRAMES, SIZE, T5_TOKENS, STEPS = 4, 32, 16, 1600
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: fastest on one thread (see test_memorise)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("direction")
    up = sample_specs("A", 1, seed=0)[0]
    down = time_reversed(up, index=1)
    assert (up.direction, down.direction) == ("up", "down")
    truths = [torch.from_numpy(render_clip(s, FRAMES, SIZE, SIZE)).permute(3, 0, 1, 2).float() / 127.5 - 1
              for s in (up, down)]
    assert (truths[0].flip(1) - truths[1]).abs().max() < 0.02  # the world is time-symmetric: one clip, reversed
    manifest = write_clips(root / "data", [up, down], num_frames=FRAMES, height=SIZE, width=SIZE, progress=False)
    train_vae(torch.cat([t.permute(1, 0, 2, 3) for t in truths]), root / "vae")
    vae = VideoVAE.from_pretrained(root / "vae", micro_batch_size=16)
    captions = ["a red square moving up on a gray background", "a red square moving down on a gray background"]
    rows = read_manifest(manifest)
    build_tiny_t5(str(root / "t5"), vocab_size=60, d_model=32, corpus=[r[k] for r in rows for k in ("caption", "long_caption")] * 10)
    t5 = T5Encoder(str(root / "t5"), max_length=T5_TOKENS, device="cpu")
    build_cache(manifest, root / "cache", vae=vae, t5=t5, num_frames=FRAMES, frame_interval=1,
                image_size=(SIZE, SIZE), prompt_mode="S", batch_size=1, device="cpu")
    ds = CachedDataset(root / "cache")
    assert [ds[i]["caption"] for i in range(2)] == captions
    # the direction word survives tokenisation and truncation to T5_TOKENS (a tokenizer trained on the two short
    # captions alone splits them into characters and cuts both at 16 tokens, before the word: identical states)
    assert not torch.equal(ds[0]["y"], ds[1]["y"])
    recons = [vae.decode(ds[i]["latent"][None].float()).float()[0] for i in range(2)]
    return {"root": root, "vae": vae, "t5": t5, "captions": captions, "recons": recons}


def _train(pair, name: str, prediction_type: str):
    root, lat = pair["root"], SIZE // 4
    cfg = load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.input_size", f"{FRAMES},{lat},{lat}",
        "--model.caption_channels", "32", "--model.model_max_length", str(T5_TOKENS),
        "--model.temporal_pos", "tokens", "--model.prediction_type", prediction_type,
        "--data.cache_dir", str(root / "cache"), "--data.num_workers", "0",
        "--train.steps", str(STEPS), "--train.batch_size", "8", "--train.output_dir", str(root / name),
        "--train.log_every", str(STEPS // 4), "--train.compute_dtype", "float32", "--train.ema_decay", "0.99",
        "--train.timestep_sampling", "logit_normal", "--train.high_noise_share", "0.3",
        "--optim.lr", "2e-3", "--optim.warmup_steps", "50", "--optim.decay_steps", str(STEPS - 50),
        "--checkpoint.every_steps", str(STEPS)])
    Trainer(cfg, log=lambda *_: None).fit()
    export_checkpoint(latest_checkpoint(root / name / "checkpoints"), root / f"{name}_model", "ema")
    model = from_pretrained(root / f"{name}_model").eval()
    assert model.prediction_type == prediction_type  # recorded in the exported config
    return ModelGrowPipeline(model, pair["vae"], pair["t5"], config={"t5_max_length": T5_TOKENS})


def _regenerated(pipe, pair, sampler, steps, scale):
    """For each seed: per prompt (index of the clip the sample is closer to, PSNR to it, PSNR to the other), and the
    PSNR between the two prompts' samples (same noise)."""
    out = {}
    for seed in SEEDS:
        videos, res = [], []
        for caption in pair["captions"]:
            v = pipe(caption, generator=torch.Generator().manual_seed(seed), num_frames=FRAMES, height=SIZE,
                     width=SIZE, sampler=sampler, num_inference_steps=steps, guidance_scale=scale, progress=False,
                     output_type="pt").videos[0].float()
            p = [psnr(v, r) for r in pair["recons"]]
            k = int(p[1] > p[0])
            videos.append(v)
            res.append((k, round(p[k], 1), round(p[1 - k], 1)))
        out[seed] = (*res, round(psnr(*videos), 1))
    return out


@pytest.fixture(scope="module")
def v_pipe(pair):
    return _train(pair, "v", "v_prediction")


@pytest.fixture(scope="module")
def eps_pipe(pair):
    return _train(pair, "eps", "epsilon")


@pytest.mark.parametrize("sampler,steps,scale", [("iddpm", 50, 4.0), ("ddim", 25, 1.0)])
def test_v_prediction_follows_the_direction_word(pair, v_pipe, sampler, steps, scale):
    got = _regenerated(v_pipe, pair, sampler, steps, scale)
    print(f"v, {sampler}-{steps} cfg {scale}: seed -> per prompt (clip, PSNR, PSNR to the other), PSNR between the "
          f"prompts' samples: {got}")
    for up, down, between in got.values():
        for prompt, (clip, p, other) in enumerate((up, down)):
            assert clip == prompt and p > 30 and p - other > 5, got
        assert between < 30, got


def test_eps_prediction_ignores_the_direction_word(pair, eps_pipe):
    """The negative control (Open-Sora v1.0's objective): the prompt makes no difference, the noise picks the clip."""
    got = _regenerated(eps_pipe, pair, "iddpm", 50, 4.0)
    print(f"eps, iddpm-50 cfg 4: seed -> per prompt (clip, PSNR, PSNR to the other), PSNR between the prompts' "
          f"samples: {got}")
    for up, down, between in got.values():
        assert up[0] == down[0] and between > 40, got  # the same clip for both prompts, nearly the same pixels
