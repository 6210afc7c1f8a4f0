"""Typed config: TOML files, dotted overrides, errors that name the key, faithful save/load."""

import pytest

from modelgrow.config import Config, ConfigError, config_from_dict, describe_keys, load_config, parse_overrides, save_config
from modelgrow.models import STDiT


def test_defaults_are_open_sora_v1_16x256x256():
    cfg = Config()
    kw = cfg.model.stdit_kwargs()
    assert kw["depth"] == 28 and kw["hidden_size"] == 1152 and kw["input_size"] == (16, 32, 32)
    assert kw["space_scale"] == 0.5 and cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.0
    assert cfg.train.t5_drop == 0.1 and cfg.train.llm_drop == 0.01 and cfg.train.both_drop == 0.001
    assert (cfg.sample.cfg_scale_t5, cfg.sample.cfg_scale_llm) == (7.0, 12.5)


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "STDiT-tiny"\ninput_size = [4, 8, 8]\ncaption_channels = 32\nmodel_max_length = 8\n'
                 '[optim]\nlr = 1\n[parallel]\nactivation_checkpointing = "every-2"\n')
    cfg = load_config(f, ["--model.depth", "3", "--optim.lr=3e-4", "--data.image_size", "128,96",
                          "--checkpoint.load_weights", "w.pth", "--grow.llm", "true"])
    assert cfg.model.depth == 3 and cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.image_size == (128, 96) and cfg.checkpoint.load_weights == "w.pth" and cfg.grow.llm is True
    assert cfg.model.input_size == (4, 8, 8) and cfg.parallel.activation_checkpointing == "every-2"
    m = STDiT(**cfg.model.stdit_kwargs())
    assert len(m.blocks) == 3 and m.hidden_size == 64
    assert load_config(None, ["--checkpoint.load_weights", "none"]).checkpoint.load_weights is None


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["--model.depth", "5", "--checkpoint.load_weights", "a.pth", "--optim.betas", "0.8,0.95"])
    path = save_config(cfg, tmp_path / "out" / "config.toml")
    assert load_config(path) == cfg
    assert load_config(save_config(Config(), tmp_path / "d.toml")) == Config()


@pytest.mark.parametrize(
    "data, match",
    [
        ({"model": {"dept": 3}}, r"model\.dept.*did you mean 'model\.depth'"),
        ({"modle": {"depth": 3}}, r"'modle'.*did you mean 'model'"),
        ({"model": {"depth": "three"}}, r"model\.depth: expected an integer"),
        ({"model": {"depth": 2.5}}, r"model\.depth: expected an integer"),
        ({"model": {"input_size": [16, 32]}}, r"model\.input_size: expected 3 values"),
        ({"grow": {"llm": "yes"}}, r"grow\.llm: expected true or false"),
        ({"grow": {"strategy": "middle"}}, r"grow\.strategy: must be one of"),
        ({"optim": {"lr": -1.0}}, r"optim\.lr: must be > 0"),
        ({"model": {"preset": "STDiT-XXL"}}, r"model\.preset: unknown preset"),
        ({"parallel": {"activation_checkpointing": "every-0"}}, r"parallel\.activation_checkpointing"),
        ({"train": 3}, r"train: expected a \[train\] table"),
    ],
)
def test_bad_config_names_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--model.depht", "3"], r"did you mean 'model\.depth'"),
        (["--optim.lr", "fast"], r"optim\.lr: expected a number"),
        (["--model.depth"], r"model\.depth: missing value"),
        (["depth=3"], r"expected an override --section\.key VALUE"),
        (["--data.image_size", "1,2,3"], r"data\.image_size: expected 2"),
    ],
)
def test_bad_overrides_name_the_key(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(args)


def test_bad_toml_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model\ndepth = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    f.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown config key 'model\.width'"):
        load_config(f)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_every_key_is_documented():
    from dataclasses import fields

    from modelgrow.config import SECTIONS

    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
    assert "model.depth" in describe_keys()


def test_documented_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "docs" / "example_continual.toml")
    assert cfg.train.mode == "expand" and cfg.grow.llm and cfg.model.stdit_kwargs()["depth"] == 28
