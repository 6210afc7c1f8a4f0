"""ModelGrowPipeline end to end on tiny real components (random weights): shapes, determinism, one batched
guided forward per step, save/load round trip, and the sample CLI writing videos."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from modelgrow.grow import add_llm_condition  # noqa: E402
from modelgrow.models import STDiT  # noqa: E402
from modelgrow.pipeline import ModelGrowPipeline  # noqa: E402
from modelgrow.text import LLMEncoder, T5Encoder  # noqa: E402
from modelgrow.text.tiny import build_tiny_llama, build_tiny_t5  # noqa: E402
from modelgrow.vae import VideoVAE  # noqa: E402

from .helpers import randomize_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    build_tiny_t5(str(d / "t5"))
    build_tiny_llama(str(d / "llm"))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)
    vae.save_pretrained(d / "vae")
    return d


def _pipe(parts, llm: bool, steps=3, sampler="ddim"):
    t5 = T5Encoder(str(parts / "t5"), max_length=8, device="cpu")
    model = STDiT(depth=2, hidden_size=32, num_heads=4, caption_channels=32, model_max_length=8, input_size=(3, 4, 4))
    llm_enc = None
    if llm:
        llm_enc = LLMEncoder(str(parts / "llm"), max_length=6, device="cpu")
        model = add_llm_condition(model, llm_enc.hidden_size, 6)
    randomize_(model).eval()
    vae = VideoVAE.from_pretrained(parts / "vae", micro_batch_size=2)
    return ModelGrowPipeline(model, vae, t5, llm_enc, config={"sampler": sampler, "num_inference_steps": steps,
                                                               "t5_max_length": 8, "llm_max_length": 6})


def test_a_v_prediction_transformer_gets_v_schedulers(parts, tmp_path):
    """The scheduler follows the transformer's prediction_type (built by name, per call, after a save/load); an
    explicit scheduler that reads the output as eps is refused with the fix in the message."""
    from modelgrow.diffusion.schedulers import make_scheduler

    t5 = T5Encoder(str(parts / "t5"), max_length=8, device="cpu")
    vae = VideoVAE.from_pretrained(parts / "vae", micro_batch_size=2)
    model = randomize_(STDiT(depth=2, hidden_size=32, num_heads=4, caption_channels=32, model_max_length=8,
                             input_size=(3, 4, 4), prediction_type="v_prediction")).eval()
    for sampler in ("iddpm", "ddim", "dpm-solver"):
        pipe = ModelGrowPipeline(model, vae, t5, config={"sampler": sampler, "t5_max_length": 8})
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    seen = []
    out = pipe("a red square", num_frames=3, height=32, width=32, sampler="ddim", num_inference_steps=2,
               output_type="latent", callback_on_step_end=lambda p, i, t, kw: seen.append(p.scheduler) or {})
    assert out.videos.shape[1] == 4
    pipe.save_pretrained(tmp_path / "p")
    again = ModelGrowPipeline.from_pretrained(tmp_path / "p")
    assert again.transformer.prediction_type == "v_prediction" and again.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type='epsilon'.*make_scheduler"):
        ModelGrowPipeline(model, vae, t5, scheduler=make_scheduler("ddim"), config={"t5_max_length": 8})
    with pytest.raises(ValueError, match="prediction_type must be"):
        STDiT(depth=2, hidden_size=32, num_heads=4, caption_channels=32, model_max_length=8, input_size=(3, 4, 4),
              prediction_type="v")


@pytest.mark.parametrize("llm", [False, True])
def test_pipeline_generates_deterministic_videos_with_one_forward_per_step(parts, llm):
    pipe = _pipe(parts, llm)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = pipe(["a red square moving left", "a blue circle"], num_frames=3, height=32, width=32,
               generator=torch.Generator().manual_seed(7), progress=False)
    assert len(out.videos) == 2 and out.videos[0].shape == (3, 32, 32, 3) and out.videos[0].dtype == np.uint8
    assert calls == [(3 if llm else 2) * 2] * 3  # one batched guided forward per step
    again = pipe(["a red square moving left", "a blue circle"], num_frames=3, height=32, width=32,
                 generator=torch.Generator().manual_seed(7), progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(out.videos, again.videos)) and out.seed == 7
    other = pipe(["a red square moving left", "a blue circle"], num_frames=3, height=32, width=32,
                 generator=torch.Generator().manual_seed(8), progress=False, output_type="latent")
    first = pipe(["a red square moving left", "a blue circle"], num_frames=3, height=32, width=32,
                 generator=torch.Generator().manual_seed(7), progress=False, output_type="latent")
    assert not torch.equal(other.videos, first.videos)
    assert out.settings["steps"] == 3 and ("llm_guidance_scale" in out.settings) == llm


def test_prompt_modes_and_iddpm_sampler(parts):
    pipe = _pipe(parts, llm=True, sampler="iddpm", steps=2)
    out = pipe("a cat", long_prompt="a small grey cat walks slowly across a wooden floor", prompt_mode="SL",
               num_frames=3, height=32, width=32, generator=torch.Generator().manual_seed(1), progress=False,
               output_type="pt")
    assert out.prompts == ["a cat a small grey cat walks slowly across a wooden floor"]
    assert out.videos.shape == (1, 3, 3, 32, 32) and torch.isfinite(out.videos).all()
    assert pipe("a cat", long_prompt=None, prompt_mode="L", num_frames=3, height=32, width=32, progress=False,
                output_type="latent").prompts == ["a cat"]


def test_bad_inputs(parts):
    pipe = _pipe(parts, llm=False)
    with pytest.raises(ValueError, match="transformer was built for"):
        pipe("x", num_frames=3, height=64, width=64, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("x", num_frames=3, height=30, width=32, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        pipe([""], num_frames=3, height=32, width=32, progress=False)
    with pytest.raises(ValueError, match="needs an llm_encoder"):
        ModelGrowPipeline(_pipe(parts, llm=True).transformer, pipe.vae, pipe.text_encoder, tokenizer=pipe.tokenizer)


def test_save_load_round_trip_and_sample_cli(parts, tmp_path):
    pipe = _pipe(parts, llm=True)
    pipe.save_pretrained(tmp_path / "pipe")
    back = ModelGrowPipeline.from_pretrained(tmp_path / "pipe", device="cpu", compile=False)
    kw = dict(num_frames=3, height=32, width=32, progress=False, output_type="latent")
    a = pipe("a dog", generator=torch.Generator().manual_seed(3), **kw).videos
    b = back("a dog", generator=torch.Generator().manual_seed(3), **kw).videos
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na green triangle moving up\n")
    r = subprocess.run([sys.executable, "-m", "modelgrow", "sample", "--model", str(tmp_path / "pipe"),
                        "--prompts-file", str(prompts), "--out", str(tmp_path / "samples"), "--sample.num_frames", "3",
                        "--sample.height", "32", "--sample.width", "32", "--sample.sampler", "ddim",
                        "--sample.num_sampling_steps", "2", "--sample.seed", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    vids = sorted((tmp_path / "samples").glob("*.mp4"))
    assert len(vids) == 2 and len(list((tmp_path / "samples").glob("*.png"))) == 2
    meta = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in meta] == ["a red square", "a green triangle moving up"]
    assert all(m["seed"] == 5 + i for i, m in enumerate(meta))


# ------------------------------------------------------------------------------------------------------------
# diffusers-native: DiffusionPipeline.from_pretrained, swappable schedulers, diffusers' call arguments, offload


def test_diffusion_pipeline_from_pretrained_and_scheduler_swap(parts, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, ModelMixin

    from modelgrow.diffusion import IDDPMScheduler, make_scheduler

    pipe = _pipe(parts, llm=True, steps=3, sampler="ddim")
    assert isinstance(pipe, DiffusionPipeline) and isinstance(pipe.transformer, ModelMixin)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "ModelGrowPipeline"
    assert index["transformer"] == ["modelgrow.models.stdit", "STDiT"] and index["vae"][1] == "AutoencoderKL"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["defaults"]["num_inference_steps"] == 3
    back = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(back) is ModelGrowPipeline and back.settings["t5_max_length"] == 8 and back.settings["llm_max_length"] == 6
    kw = dict(progress=False, output_type="latent")
    a = pipe("a dog", generator=torch.Generator().manual_seed(3), **kw).videos
    b = back("a dog", generator=torch.Generator().manual_seed(3), **kw).videos
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # swap the scheduler the diffusers way: DPM-Solver++ gives other numbers, IDDPM too
    back.scheduler = DPMSolverMultistepScheduler.from_config(make_scheduler("dpm-solver").config)
    c = back("a dog", generator=torch.Generator().manual_seed(3), **kw)
    assert c.settings["sampler"] == "dpm-solver" and not torch.allclose(c.videos, a)
    back.scheduler = IDDPMScheduler()
    d = back("a dog", generator=torch.Generator().manual_seed(3), **kw)
    assert d.settings["sampler"] == "iddpm" and torch.isfinite(d.videos).all()
    back.save_pretrained(tmp_path / "pipe2")  # the IDDPM scheduler saves and loads as a component
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "pipe2").scheduler) is IDDPMScheduler


@pytest.mark.parametrize("first", ["modelgrow", "diffusers"])
def test_diffusers_finds_the_pipeline_after_a_cheap_import_modelgrow(parts, tmp_path, first):
    """``import modelgrow`` imports no torch, yet ``DiffusionPipeline.from_pretrained`` resolves ModelGrowPipeline
    afterwards, whether diffusers is imported after modelgrow or before it."""
    _pipe(parts, llm=False, steps=2).save_pretrained(tmp_path / "pipe")
    code = ("import sys\n"
            + ("import modelgrow\nassert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
               "import diffusers\n" if first == "modelgrow" else "import diffusers\nimport modelgrow\n")
            + "pipe = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1])\nprint(type(pipe).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ModelGrowPipeline"


def test_sampling_defaults_come_from_the_config_table():
    from modelgrow.config import PIPELINE_NAMES, SAMPLING_DEFAULTS
    from modelgrow.pipeline import DEFAULTS

    assert {k: DEFAULTS[PIPELINE_NAMES[k]] for k in PIPELINE_NAMES} == {k: SAMPLING_DEFAULTS[k] for k in PIPELINE_NAMES}


def test_call_arguments_the_diffusers_way(parts):
    pipe = _pipe(parts, llm=False, steps=2)
    kw = dict(progress=False, output_type="latent")
    # sizes default to the transformer's (3 frames, 4x4 latent = 32x32 pixels)
    out = pipe("a dog", progress=False)
    assert out.videos[0].shape == (3, 32, 32, 3) and out.settings["num_frames"] == 3
    # one generator advances: the same generator twice gives two different videos; a fresh one repeats
    g = torch.Generator().manual_seed(11)
    first, second = pipe("a dog", generator=g, **kw).videos, pipe("a dog", generator=g, **kw).videos
    assert not torch.equal(first, second)
    assert torch.equal(pipe("a dog", generator=torch.Generator().manual_seed(11), **kw).videos, first)
    # a list of generators: one per video, each video as if sampled alone with its generator
    both = pipe(["a dog", "a cat"], generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)], **kw)
    cat = pipe("a cat", generator=torch.Generator().manual_seed(12), **kw).videos
    torch.testing.assert_close(both.videos[:1], first, rtol=1e-3, atol=1e-3)  # batch-size rounding only
    torch.testing.assert_close(both.videos[1:], cat, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="generators"):
        pipe(["a dog", "a cat"], generator=[torch.Generator()], **kw)
    # num_videos_per_prompt
    many = pipe(["a dog", "a cat"], num_videos_per_prompt=2, generator=torch.Generator().manual_seed(0), **kw)
    assert many.videos.shape[0] == 4 and many.prompts == ["a dog", "a dog", "a cat", "a cat"]
    assert not torch.equal(many.videos[0], many.videos[1])
    # latents=: the same starting noise gives the same video as the generator that drew it
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(pipe("a dog", latents=z, **kw).videos, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("a dog", latents=torch.randn(1, 4, 3, 8, 8), **kw)
    # callback_on_step_end sees every step and may replace the latents
    seen = []

    def cb(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}

    zeroed = pipe("a dog", callback_on_step_end=cb, **kw).videos
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == 999 and torch.equal(zeroed, torch.zeros_like(zeroed))
    # return_dict=False and output types
    (vid,) = pipe("a dog", generator=torch.Generator().manual_seed(1), return_dict=False, progress=False, output_type="pt")
    assert vid.shape == (1, 3, 3, 32, 32)
    pil = pipe("a dog", generator=torch.Generator().manual_seed(1), output_type="pil", progress=False).videos
    assert len(pil) == 1 and len(pil[0]) == 3 and pil[0][0].size == (32, 32)
    assert np.array_equal(np.asarray(pil[0][2]), to_np(vid)[0][2])
    with pytest.raises(ValueError, match="output_type"):
        pipe("a dog", output_type="gif", progress=False)


def to_np(video):
    from modelgrow.video_io import to_uint8

    return [to_uint8(v) for v in video]


def test_progress_bar_and_model_cpu_offload(parts, capsys):
    pipe = _pipe(parts, llm=True, steps=2)
    ref = pipe("a dog", generator=torch.Generator().manual_seed(4), output_type="latent", progress=True).videos
    assert "2/2" in capsys.readouterr().err  # diffusers' progress bar
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(getattr(pipe, n), "_hf_hook") for n in ("text_encoder", "llm_encoder", "transformer", "vae"))
    out = pipe("a dog", generator=torch.Generator().manual_seed(4), output_type="latent", progress=False).videos
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert pipe("a dog", generator=torch.Generator().manual_seed(4), progress=False).videos[0].shape == (3, 32, 32, 3)
