"""Adversarial fault and bad-input cases (issue 15): non-finite values never persist, runs are never mixed,
settings are never silently ignored, and every error names its file, key or argument."""

from __future__ import annotations

import os

import pytest
import torch

from modelgrow.config import ConfigError, load_config
from modelgrow.models import STDiT, from_pretrained, load_checkpoint, save_pretrained
from modelgrow.models.checkpoint import CheckpointMismatchError
from modelgrow.train import RandomLatentLoader, Trainer
from modelgrow.train import checkpoint as ckpt

from .helpers import build_tiny_pipeline, randomize_

BASE = ["--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.log_every", "1", "--train.compute_dtype", "float32", "--optim.lr", "1e-3"]
TINY = dict(depth=2, hidden_size=32, num_heads=4, caption_channels=24, model_max_length=6, input_size=(2, 4, 4),
            class_dropout_prob=0.0)
QUIET = dict(log=lambda *_: None)


def _cfg(out, *extra):
    return load_config(None, [*BASE, "--train.output_dir", str(out), *extra])


def _loader():
    return RandomLatentLoader(2, (4, 4, 8, 8), (8, 32), seed=1)


# ------------------------------------------------------------------------------------------------------------
# 2. non-finite values never persist: config parse time, checkpoint writes, samples
# ------------------------------------------------------------------------------------------------------------

BAD_NUMBERS = [
    ("optim.lr", "inf"), ("optim.lr", "nan"), ("optim.lr", "-inf"), ("optim.eps", "nan"), ("optim.eps", "0"),
    ("optim.weight_decay", "nan"), ("optim.grad_clip", "inf"), ("optim.betas", "0.9,nan"),
    ("sample.cfg_scale_t5", "nan"), ("sample.cfg_scale_t5", "inf"), ("sample.cfg_scale_llm", "-inf"),
    ("grow.ratio", "inf"), ("grow.ratio", "1e6"), ("grow.ratio", "nan"), ("model.mlp_ratio", "nan"),
    ("model.space_scale", "0"), ("train.ema_decay", "nan"), ("data.max_fail_fraction", "nan"),
    ("model.drop_path", "nan"), ("train.t5_drop", "nan"),
]


@pytest.mark.parametrize("key,value", BAD_NUMBERS)
def test_non_finite_and_out_of_range_numbers_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"--{key}", value])


@pytest.mark.parametrize("text", ["[optim]\nlr = inf\n", "[optim]\neps = nan\n", "[sample]\ncfg_scale_t5 = -inf\n"])
def test_non_finite_toml_values_rejected(tmp_path, text):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"c\.toml.*finite"):
        load_config(f)


@pytest.mark.parametrize("where", ["param", "optimizer", "ema"])
def test_non_finite_state_never_reaches_a_checkpoint(tmp_path, where):
    tr = Trainer(_cfg(tmp_path, "--train.steps", "2", "--checkpoint.every_steps", "1"), loader=_loader(), **QUIET)
    tr.fit()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    tr.step = 3
    with torch.no_grad():
        if where == "param":
            next(tr.model.parameters())[0].fill_(float("nan"))
        elif where == "optimizer":
            next(iter(tr.optimizer.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
        else:
            next(iter(tr.ema.shadow.values())).view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 3"):
        tr.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_huge_lr_update_stops_before_checkpoint(tmp_path):
    tr = Trainer(_cfg(tmp_path, "--train.steps", "3", "--checkpoint.every_steps", "1", "--optim.lr", "1e30",
                      "--optim.grad_clip", "0"), loader=_loader(), **QUIET)
    with pytest.raises(FloatingPointError):
        tr.fit()
    for c in ckpt.list_checkpoints(tmp_path / "checkpoints"):  # whatever was written is finite
        m = STDiT(**ckpt.read_meta(c)["model_config"])
        ckpt.load_model_weights(c, m, which="raw")
        assert all(torch.isfinite(p).all() for p in m.parameters()), c


# ------------------------------------------------------------------------------------------------------------
# 3. runs never mixed, resume is honest, settings never ignored
# ------------------------------------------------------------------------------------------------------------


def test_resume_false_on_existing_run_refuses_then_overwrites_on_request(tmp_path):
    Trainer(_cfg(tmp_path, "--train.steps", "4", "--checkpoint.every_steps", "2"), loader=_loader(), **QUIET).fit()
    with pytest.raises(ValueError, match="checkpoint.overwrite"):
        Trainer(_cfg(tmp_path, "--train.steps", "2", "--checkpoint.resume", "false"), loader=_loader(), **QUIET)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000004"]
    tr = Trainer(_cfg(tmp_path, "--train.steps", "2", "--checkpoint.every_steps", "1", "--checkpoint.resume", "false",
                      "--checkpoint.overwrite", "true"), loader=_loader(), **QUIET)
    assert tr.step == 0
    tr.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001", "step_00000002"]


def test_resume_with_changed_lr_takes_effect_and_architecture_change_is_refused(tmp_path):
    Trainer(_cfg(tmp_path, "--train.steps", "2", "--checkpoint.every_steps", "2"), loader=_loader(), **QUIET).fit()
    lines = []
    tr = Trainer(_cfg(tmp_path, "--train.steps", "3", "--optim.lr", "5e-4"), loader=_loader(), log=lines.append)
    assert tr.step == 2
    assert [g["lr"] for g in tr.optimizer.param_groups] == [5e-4]
    assert any("optim.lr" in ln and "0.001" in ln and "0.0005" in ln for ln in lines)
    with pytest.raises(ValueError, match=r"model\.depth: checkpoint None -> now 3|train\.seed: checkpoint 42 -> now 7"):
        Trainer(_cfg(tmp_path, "--train.steps", "3", "--train.seed", "7"), loader=_loader(), **QUIET)
    with pytest.raises(ValueError, match=r"model\.depth"):
        Trainer(_cfg(tmp_path, "--train.steps", "3", "--model.depth", "3"), loader=_loader(), **QUIET)


def test_damaged_latest_checkpoint_names_file_and_offers_previous(tmp_path):
    Trainer(_cfg(tmp_path, "--train.steps", "2", "--checkpoint.every_steps", "1"), loader=_loader(), **QUIET).fit()
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    shard = next(last.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError) as e:
        Trainer(_cfg(tmp_path, "--train.steps", "3"), loader=_loader(), **QUIET)
    assert shard.name in str(e.value) and "step_00000001" in str(e.value)
    (last / "extra-rank0.pt").write_bytes(b"")
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(last)
    assert Trainer(_cfg(tmp_path, "--train.steps", "3"), loader=_loader(), **QUIET).step == 1  # the previous resumes


def test_model_from_pretrained_is_read(tmp_path):
    src = randomize_(STDiT(**_cfg(tmp_path).model.stdit_kwargs()), seed=5)
    save_pretrained(src, tmp_path / "pre")
    tr = Trainer(_cfg(tmp_path / "run", "--train.steps", "1", "--model.from_pretrained", str(tmp_path / "pre")),
                 loader=_loader(), **QUIET)
    for (n, p), q in zip(tr.model.named_parameters(), src.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(FileNotFoundError, match="model.from_pretrained"):
        Trainer(_cfg(tmp_path / "run2", "--model.from_pretrained", str(tmp_path / "missing")), loader=_loader(), **QUIET)


def test_save_pretrained_interrupted_keeps_old_directory_whole(tmp_path, monkeypatch):
    import modelgrow.models.checkpoint as mc

    a = STDiT(**TINY)
    b = STDiT(**{**TINY, "depth": 3})
    save_pretrained(a, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("keep me")
    calls = {"n": 0}
    real = os.replace

    def flaky(*args, **kw):  # any rename of a file inside the model dir dies half-way
        calls["n"] += 1
        raise OSError("killed")

    monkeypatch.setattr(mc, "_swap_dirs", lambda *a, **k: flaky())
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        save_pretrained(b, tmp_path / "m")
    monkeypatch.setattr(os, "replace", real)
    assert len(from_pretrained(tmp_path / "m").blocks) == 2  # the old model, whole
    monkeypatch.undo()
    save_pretrained(b, tmp_path / "m")
    assert len(from_pretrained(tmp_path / "m").blocks) == 3
    assert (tmp_path / "m" / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.saving-")]  # nothing left behind
    mask = os.umask(0)
    os.umask(mask)
    assert oct((tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~mask)


# ------------------------------------------------------------------------------------------------------------
# 4. errors name the file / key and the fix
# ------------------------------------------------------------------------------------------------------------


def test_override_without_value_does_not_swallow_the_next():
    with pytest.raises(ConfigError, match=r"train\.output_dir: missing value.*--train\.steps=5"):
        load_config(None, ["--train.output_dir", "--train.steps=5"])
    assert load_config(None, ["--train.output_dir=--odd", "--train.steps", "5"]).train.output_dir == "--odd"


def test_non_utf8_toml_names_the_file(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes('[train]\noutput_dir = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml.*UTF-8"):
        load_config(f)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"PK\x03\x04garbage" * 3])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_or_garbage_weights_name_the_file(tmp_path, suffix, content):
    good = tmp_path / f"good{suffix}"
    model = STDiT(**TINY)
    if suffix == ".pth":
        torch.save(model.state_dict(), good)
    else:
        save_pretrained(model, tmp_path / "d")
        good = tmp_path / "d" / "model.safetensors"
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(content or good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"bad{suffix}"):
        load_checkpoint(STDiT(**TINY), bad)


@pytest.mark.parametrize("text", ["not json{", "[1, 2]", '{"modelgrow_format": 1, "config": {"depth": 2, "bogus": 1}}',
                                  '{"modelgrow_format": 1, "config": {"depth": "two"}}', '"str"', "\xff\xfe"])
def test_garbage_config_json_names_the_file(tmp_path, text):
    save_pretrained(STDiT(**TINY), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json"):
        from_pretrained(tmp_path / "m")


def test_load_weights_pointing_at_dcp_checkpoint_says_export(tmp_path):
    Trainer(_cfg(tmp_path / "a", "--train.steps", "1", "--checkpoint.every_steps", "1"), loader=_loader(), **QUIET).fit()
    last = ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints")
    with pytest.raises(ValueError, match="modelgrow export"):
        Trainer(_cfg(tmp_path / "b", "--checkpoint.load_weights", str(last)), loader=_loader(), **QUIET)


def test_int8_checkpoint_into_float_model_refused():
    m = STDiT(**TINY)
    sd = {k: v.to(torch.int8) for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="integer"):
        load_checkpoint(STDiT(**TINY), sd)


def test_modulate_refuses_integer_input():
    from mgkernels.modulate import modulate

    with pytest.raises(TypeError, match="floating-point"):
        modulate(torch.ones(1, 2, 8, dtype=torch.int32), torch.zeros(8), torch.zeros(8))


def test_grow_ratio_bounds_up_front():
    from modelgrow.grow import expand, growth_plan

    for kw in (dict(ratio=float("inf")), dict(ratio=1e6), dict(ratio=float("nan")), dict(num_new=10**6), dict(num_new=0)):
        with pytest.raises(ValueError, match="ratio|num_new|new blocks"):
            growth_plan(28, "insert" if "ratio" in kw else "suffix", **kw)
    with pytest.raises(ValueError):
        expand(STDiT(**TINY), "prefix", ratio=100)


# ------------------------------------------------------------------------------------------------------------
# 6. growth: every order of expand / add_llm_condition keeps a gradient path to every new parameter
# ------------------------------------------------------------------------------------------------------------

ORDERS = ["EEL", "ELE", "LEE", "PSL", "SEL", "EL", "LE", "PEL", "ESL", "SSL", "PPL", "EPSL"]


@pytest.mark.parametrize("order", ORDERS)
def test_growth_in_any_order_leaves_no_dead_branch(order):
    from modelgrow.grow import add_llm_condition, expand

    ops = {"E": lambda m: expand(m, "insert", ratio=1), "P": lambda m: expand(m, "prefix", num_new=1),
           "S": lambda m: expand(m, "suffix", num_new=1), "L": lambda m: add_llm_condition(m, 20, 5)}
    m = randomize_(STDiT(**TINY), seed=1)
    for c in order:
        m = ops[c](m)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([5.0, 500.0]), torch.randn(2, 1, 6, 24, generator=g)
    kw = dict(y_llm=torch.randn(2, 1, 5, 20, generator=g), llm_mask=torch.ones(2, 5, dtype=torch.long))
    m.train()
    m(x, t, y, None, **kw).square().mean().backward()
    params = dict(m.named_parameters())
    dead = [n for n, p in params.items()
            if ("llm_gate" in n or (n.endswith(("attn.proj.weight", "mlp.fc2.weight")) and "llm_" not in n))
            and (p.grad is None or not bool(p.grad.abs().sum()))]
    # behind a zero gate the LLM projection gets its gradient from step 1 on: it must not be zero itself
    dead += [n for n, p in params.items() if n.endswith("llm_cross_attn.proj.weight") and not bool(p.abs().sum())]
    assert dead == []


# ------------------------------------------------------------------------------------------------------------
# 7. sampling arguments, non-finite samples, tokenizer files, CLI checks
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"), sampler="ddim", num_inference_steps=2, t5_max_length=8)


def _load_pipe(pipe_dir):
    from modelgrow.pipeline import ModelGrowPipeline

    return ModelGrowPipeline.from_pretrained(pipe_dir, device="cpu", accelerate_model=False)


@pytest.mark.parametrize("kw,match", [
    (dict(num_inference_steps=0), "num_inference_steps"), (dict(num_inference_steps=-3, sampler="iddpm"), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"), (dict(llm_guidance_scale=float("nan")), "llm_guidance_scale"),
])
def test_sampling_arguments_validated(pipe_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        _load_pipe(pipe_dir)("a red square", num_frames=3, height=32, width=32, progress=False, **kw)


def test_non_finite_latents_are_an_error_not_a_video(pipe_dir):
    pipe = _load_pipe(pipe_dir)
    with torch.no_grad():
        pipe.transformer.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        pipe("a red square", num_frames=3, height=32, width=32, progress=False)


def test_prompt_cleaned_to_nothing_warns(pipe_dir):
    pipe = _load_pipe(pipe_dir)
    with pytest.warns(UserWarning, match="empty after"):
        pipe("一只红色的正方形", num_frames=3, height=32, width=32, progress=False, num_inference_steps=1)


def test_pipeline_without_tokenizer_files_refused(pipe_dir, tmp_path):
    import shutil

    d = tmp_path / "p"
    shutil.copytree(pipe_dir, d)
    for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json"):
        (d / "tokenizer" / f).unlink(missing_ok=True)  # diffusers' layout: the T5 tokenizer has its own folder
    with pytest.raises(FileNotFoundError, match="tokenizer.*no tokenizer files"):
        _load_pipe(d)


def test_cli_sample_reads_batch_size_and_checks_output_and_prompts(pipe_dir, tmp_path, monkeypatch, capsys):
    from modelgrow.cli import main as cli
    from modelgrow.pipeline import ModelGrowPipeline

    seen = []
    real_call = ModelGrowPipeline.__call__

    def spy(self, prompt, *a, **k):
        seen.append(len(prompt) if isinstance(prompt, list) else 1)
        return real_call(self, prompt, *a, **k)

    monkeypatch.setattr(ModelGrowPipeline, "__call__", spy)
    base = ["sample", "--model", str(pipe_dir), "--no-accel", "--device", "cpu", "--sample.num_frames", "3",
            "--sample.height", "32", "--sample.width", "32", "--sample.num_sampling_steps", "1", "--sample.sampler", "ddim"]
    prompts = ["--prompt", "a red square", "--prompt", "a blue circle", "--prompt", "a green star"]
    assert cli([*base, *prompts, "--out", str(tmp_path / "o"), "--sample.batch_size", "2"]) == 0
    assert seen == [2, 1]
    assert len(list((tmp_path / "o").glob("*.mp4"))) == 3
    # an output path that cannot be written: refused before anything is sampled
    (tmp_path / "file").write_text("x")
    seen.clear()
    assert cli([*base, *prompts, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert seen == [] and "--out" in capsys.readouterr().err
    # a prompt the T5 cleaning empties: an error unless forced
    assert cli([*base, "--prompt", "一只红色的正方形", "--out", str(tmp_path / "z")]) == 2
    assert seen == [] and "--allow-empty-prompt" in capsys.readouterr().err
    # a bad MG_KERNELS is an error, not ignored
    monkeypatch.setenv("MG_KERNELS", "garbage")
    assert cli([*base, "--prompt", "a red square", "--out", str(tmp_path / "k")]) == 2
    assert "MG_KERNELS" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# caches: failure threshold from the first row, encoder fingerprints, file modes, damaged index
# ------------------------------------------------------------------------------------------------------------

from .test_cache import NF, setup  # noqa: E402,F401 - the tiny cache fixture (videos, VAE, T5, LLM)
from .test_cache import cli as cache_cli  # noqa: E402


def test_cache_failure_threshold_applies_to_small_manifests(setup, tmp_path, capsys):
    from modelgrow.cli import main as mg

    args = ["cache", "--manifest", str(setup["manifest"]), "--out", str(tmp_path / "c"), "--vae", setup["vae"],
            "--t5", setup["t5"], "--data.num_frames", str(NF), "--data.frame_interval", "2", "--data.image_size", "16,16",
            "--model.model_max_length", "12", "--data.decoder", "pyav", "--device", "cpu", "--data.max_fail_fraction", "0.1"]
    assert mg(args) == 2  # 1 of 6 rows fails: more than 0.1 x 6
    err = capsys.readouterr().err
    assert "bad.webm" in err and "data.max_fail_fraction" in err
    assert not (tmp_path / "c" / "index.json").exists()


def test_cache_fingerprints_and_modes(setup, tmp_path):
    from modelgrow.data.cache import CachedDataset, CacheMismatchError
    from modelgrow.text.tiny import build_tiny_t5

    out = tmp_path / "c"
    assert cache_cli(setup, out) == 0
    mask = os.umask(0)
    os.umask(mask)
    for f in out.glob("shard_*.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    cfg = load_config(None, ["--model.in_channels", "4", "--model.input_size", f"{NF},2,2", "--model.caption_channels", "32",
                             "--model.model_max_length", "12", "--data.t5", setup["t5"]])
    CachedDataset(out).check_compatible(cfg)  # the same T5: fine
    other = build_tiny_t5(str(tmp_path / "t5b"), seed=1)  # same config, other weights
    cfg.data.t5 = other
    with pytest.raises(CacheMismatchError, match=r"data\.t5.*weights"):
        CachedDataset(out).check_compatible(cfg)
    for text in ("garbage{", "[]", '{"settings": {}}'):
        (out / "index.json").write_text(text)
        with pytest.raises(CacheMismatchError, match="index.json"):
            CachedDataset(out)


def test_resume_compares_resolved_model_sizes():
    """A checkpoint saved with explicit sizes equal to the preset's defaults resumes under a config that leaves
    them unset; a real size change is still refused, naming the key."""
    from modelgrow.config import Config, config_to_dict
    from modelgrow.train.trainer import _resolve_model_sizes, _resume_diff

    now = config_to_dict(Config())
    old = config_to_dict(Config())
    old["model"].update(input_size=[16, 32, 32], caption_channels=4096, model_max_length=120)
    assert _resume_diff(_resolve_model_sizes(old), _resolve_model_sizes(now)) == ({}, {})
    old["model"]["input_size"] = [8, 32, 32]
    applied, refused = _resume_diff(_resolve_model_sizes(old), _resolve_model_sizes(now))
    assert not applied and list(refused) == ["model.input_size"]


def test_non_utf8_manifest_names_the_file(tmp_path):
    from modelgrow.data.manifest import ManifestError, load_manifest

    f = tmp_path / "clips.csv"
    f.write_bytes("path,text\nvideo.mp4,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"clips\.csv: not UTF-8 text.*re-save"):
        load_manifest(f)


def test_interrupted_checkpoint_write_is_named_with_the_fallback(tmp_path):
    trainer = Trainer(load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.steps", "2", "--train.output_dir", str(tmp_path / "run"),
        "--train.compute_dtype", "float32", "--checkpoint.every_steps", "2"]),
        loader=RandomLatentLoader(2, (4, 4, 8, 8), (8, 32), seed=1), log=lambda *_: None)
    trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    tmp = root / "step_00000004.tmp"
    tmp.mkdir()  # what kill -9 during a save leaves
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match=r"step_00000004\.tmp is an interrupted checkpoint write.*newest complete one is .*step_00000002"):
        ckpt.read_meta(tmp)
    from modelgrow.train.export import export_checkpoint

    with pytest.raises(FileNotFoundError, match="interrupted checkpoint write"):
        export_checkpoint(tmp, tmp_path / "out")
