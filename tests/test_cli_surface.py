"""The command line a newcomer meets (issue 16): presets keep their sizes, flags named in hints, defaults from
the pipeline, --version, help texts, grow's config, missing paths reported before any model is built."""

import json

import pytest
import torch

from modelgrow.cli import main as cli
from modelgrow.config import load_config
from modelgrow.models import STDiT, create_model

from .helpers import build_tiny_pipeline


def test_preset_keeps_its_sizes_unless_overridden():
    kw = load_config(None, ["--model.preset", "STDiT-tiny"]).model.stdit_kwargs()
    assert kw["input_size"] == (4, 8, 8) and kw["caption_channels"] == 32 and kw["model_max_length"] == 8
    kw = load_config(None, ["--model.preset", "STDiT-tiny", "--model.caption_channels", "16"]).model.stdit_kwargs()
    assert kw["caption_channels"] == 16 and kw["input_size"] == (4, 8, 8)
    kw = load_config(None, []).model.stdit_kwargs()  # XL/2 brings no sizes: Open-Sora v1.0's 16x256x256
    assert kw["input_size"] == (16, 32, 32) and kw["caption_channels"] == 4096 and kw["model_max_length"] == 120


def test_export_of_a_tiny_checkpoint_with_its_preset(tmp_path, capsys):
    torch.save(create_model("STDiT-tiny").state_dict(), tmp_path / "tiny.pth")
    assert cli(["export", "--ckpt", str(tmp_path / "tiny.pth"), "--out", str(tmp_path / "out"), "--model.preset", "STDiT-tiny"]) == 0
    toml = (tmp_path / "out" / "modelgrow.toml").read_text()
    assert "STDiT-tiny" in toml
    # a mismatch names the command-line flag, not the Python argument
    assert cli(["export", "--ckpt", str(tmp_path / "tiny.pth"), "--out", str(tmp_path / "o2"), "--model.preset", "STDiT-mini"]) == 2
    err = capsys.readouterr().err
    assert "--no-strict" in err and "strict=False" not in err


def test_missing_weights_reported_before_building(tmp_path, capsys, monkeypatch):
    built = []
    real = STDiT.__init__
    monkeypatch.setattr(STDiT, "__init__", lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    for cmd in (["export", "--ckpt", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")],
                ["grow", "--ckpt", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "g"), "--strategy", "insert"]):
        assert cli(cmd) == 2
        assert "nope.pth" in capsys.readouterr().err
    assert built == []


def test_grow_writes_a_config_describing_the_grown_model(tmp_path):
    torch.save(create_model("STDiT-tiny").state_dict(), tmp_path / "tiny.pth")
    assert cli(["grow", "--ckpt", str(tmp_path / "tiny.pth"), "--out", str(tmp_path / "g"), "--strategy", "insert",
                "--ratio", "1", "--model.preset", "STDiT-tiny"]) == 0
    cfg = load_config(tmp_path / "g" / "modelgrow.toml")
    kw = cfg.model.stdit_kwargs()
    saved = json.loads((tmp_path / "g" / "config.json").read_text())["config"]
    assert kw["depth"] == saved["depth"] == 4 and kw["hidden_size"] == 64 and kw["caption_channels"] == 32
    assert list(kw["input_size"]) == saved["input_size"]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0 and "modelgrow 0." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out and "--fresh" in out
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    out = capsys.readouterr().out
    assert "resume" in out.lower() and "load_weights" in out and "modelgrow config --keys" in out


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"), sampler="ddim", num_inference_steps=2, fps=5)


def test_sample_takes_sizes_and_sampling_defaults_from_the_pipeline(pipe_dir, tmp_path, capsys):
    assert cli(["sample", "--model", str(pipe_dir), "--prompt", "a red square", "--out", str(tmp_path / "s"),
                "--no-accel", "--device", "cpu"]) == 0
    rec = json.loads((tmp_path / "s" / "samples.jsonl").read_text().splitlines()[0])
    assert (rec["num_frames"], rec["height"], rec["width"]) == (3, 32, 32)
    assert rec["sampler"] == "ddim" and rec["steps"] == 2  # the saved scheduler and steps, not IDDPM/100
    # what the user passes wins; a size that does not fit names the flags
    assert cli(["sample", "--model", str(pipe_dir), "--prompt", "a red square", "--out", str(tmp_path / "t"),
                "--no-accel", "--device", "cpu", "--sample.num_sampling_steps", "1", "--sample.sampler", "dpm-solver"]) == 0
    rec = json.loads((tmp_path / "t" / "samples.jsonl").read_text().splitlines()[0])
    assert rec["sampler"] == "dpm-solver" and rec["steps"] == 1
    assert cli(["sample", "--model", str(pipe_dir), "--prompt", "a red square", "--out", str(tmp_path / "u"),
                "--no-accel", "--device", "cpu", "--sample.height", "64"]) == 2
    assert "--sample.height 32" in capsys.readouterr().err


def test_pipeline_command_builds_a_loadable_directory(pipe_dir, tmp_path):
    from modelgrow.pipeline import ModelGrowPipeline

    src = ModelGrowPipeline.from_pretrained(pipe_dir, device="cpu", accelerate_model=False)
    src.transformer.save_pretrained(tmp_path / "tr")
    src.vae.save_pretrained(tmp_path / "vae")
    src.text_encoder.save_pretrained(tmp_path / "t5")
    src.tokenizer.save_pretrained(tmp_path / "t5")
    assert cli(["pipeline", "--transformer", str(tmp_path / "tr"), "--vae", str(tmp_path / "vae"), "--t5", str(tmp_path / "t5"),
                "--out", str(tmp_path / "p"), "--sampler", "dpm-solver", "--steps", "3", "--t5-max-length", "8",
                "--sample.fps", "12", "--sample.cfg_scale_t5", "4.5"]) == 0
    pipe = ModelGrowPipeline.from_pretrained(tmp_path / "p", device="cpu", accelerate_model=False)
    assert pipe.settings["num_inference_steps"] == 3 and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # the [sample] keys are the pipeline's saved defaults (the fps that `modelgrow sample` writes videos at)
    assert pipe.settings["fps"] == 12 and pipe.settings["guidance_scale"] == 4.5 and pipe.settings["prompt_mode"] == "SL"
    out = pipe("a dog", generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
    assert out.videos.shape == (1, 4, 3, 4, 4)
