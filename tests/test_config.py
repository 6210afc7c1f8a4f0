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


def test_one_pair_of_dtypes_and_the_replaced_keys(tmp_path):
    """train.param_dtype / train.compute_dtype replace model.dtype, train.mixed_precision and parallel.param_dtype:
    the old keys still load (a FutureWarning names the new key) and mean the same run."""
    from modelgrow.config import SECTIONS

    assert "mixed_precision" not in SECTIONS["train"].__dataclass_fields__
    assert "param_dtype" not in SECTIONS["parallel"].__dataclass_fields__ and "dtype" not in SECTIONS["model"].__dataclass_fields__
    cfg = Config()
    assert (cfg.train.param_dtype, cfg.train.compute_dtype) == ("float32", "bfloat16")  # the defaults of before
    new = load_config(None, ["--train.compute_dtype", "float32"])
    with pytest.warns(FutureWarning, match=r"train\.mixed_precision .* train\.compute_dtype = 'float32'"):
        assert load_config(None, ["--train.mixed_precision", "fp32"]) == new
    with pytest.warns(FutureWarning, match=r"parallel\.param_dtype"):
        assert load_config(None, ["--parallel.param_dtype", "float32"]) == new
    with pytest.warns(FutureWarning, match="ignored"):  # a saved config of before: its three dtype keys
        f = tmp_path / "old.toml"
        f.write_text('[model]\ndtype = "float32"\n[train]\nmixed_precision = "fp32"\n[parallel]\nparam_dtype = "bfloat16"\n')
        assert load_config(f) == new
    with pytest.raises(ConfigError, match=r"train\.mixed_precision = 'bf16' .* conflicts with train\.compute_dtype"):
        config_from_dict({"train": {"mixed_precision": "bf16", "compute_dtype": "float32"}})
    with pytest.raises(ConfigError, match=r"train\.compute_dtype: must be bfloat16 with train\.param_dtype = bfloat16"):
        load_config(None, ["--train.param_dtype", "bfloat16", "--train.compute_dtype", "float32"])
    keys = describe_keys()
    listed = [line.split()[0] for line in keys.splitlines()]
    assert "train.compute_dtype" in listed and "train.mixed_precision" not in listed and "model.dtype" not in listed


def test_data_settings_unset_take_defaults_or_the_cache():
    """[data] clip / text settings left unset resolve to the raw-video defaults, or to what a cache fixes."""
    from modelgrow.config import DATA_DEFAULTS

    d = Config().data
    assert d.num_frames is None and d.prompt_mode is None and d.num_workers is None
    r = d.resolved()
    assert {k: getattr(r, k) for k in DATA_DEFAULTS} == DATA_DEFAULTS
    r = load_config(None, ["--data.num_frames", "8"]).data.resolved({"num_frames": 4, "prompt_mode": "S",
                                                                    "image_size": [32, 32]})
    assert (r.num_frames, r.prompt_mode, r.image_size, r.frame_interval) == (8, "S", (32, 32), 3)


def test_one_table_of_sampling_defaults():
    from modelgrow.config import PIPELINE_NAMES, SAMPLING_DEFAULTS

    s = Config().sample
    assert {k: getattr(s, k) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert (s.num_frames, s.height, s.width) == (None, None, None)  # the transformer's size
    assert set(PIPELINE_NAMES) <= set(SAMPLING_DEFAULTS)


def test_cache_and_recaption_sections():
    cfg = load_config(None, ["--cache.shard_size", "16", "--recaption.max_words", "64", "--recaption.prompt_mode", "L"])
    assert cfg.cache.shard_size == 16 and cfg.recaption.max_words == 64 and cfg.recaption.prompt_mode == "L"
    with pytest.raises(ConfigError, match=r"recaption\.retries"):
        load_config(None, ["--recaption.retries", "-1"])
