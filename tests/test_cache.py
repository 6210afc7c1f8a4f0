"""The latent / text cache: build with tiny models, index contents, equality with direct encoding, shard
resume, mismatched encoders refused."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from modelgrow.data.cache import CachedDataset, CachedLoader, CacheMismatchError, encoder_identity, main
from modelgrow.data.cache.format import fingerprint
from modelgrow.data.videos import VideoDataset
from modelgrow.video_io import write_png, write_video

NF, FI, SIZE = 3, 2, (16, 16)


def tiny_vae(path, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from modelgrow.text.tiny import build_tiny_llama, build_tiny_t5

    d = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        frames = rng.integers(0, 256, (10 + i, 24, 32, 3), dtype=np.uint8)
        write_video(d / f"v{i}.webm", frames)
        rows.append((f"v{i}.webm", f"a red square {i}", f"it moves left slowly {i}" if i % 2 else ""))
    write_png(d / "img.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    rows.append(("img.png", "a still image", "a blue circle"))
    (d / "bad.webm").write_bytes(rng.bytes(500))
    rows.append(("bad.webm", "broken", ""))
    with open(d / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "caption", "long_caption"))
        w.writerows(rows)
    return {"dir": d, "manifest": d / "m.csv", "vae": tiny_vae(d / "vae"), "t5": build_tiny_t5(str(d / "t5")),
            "llm": build_tiny_llama(str(d / "llm"))}


def cli(setup, out, *extra):
    """``modelgrow cache`` on the typed config: shorthands for the paths, --section.key overrides for the rest."""
    return main(["--manifest", str(setup["manifest"]), "--out", str(out), "--vae", setup["vae"], "--t5", setup["t5"],
                 "--llm", setup["llm"], "--data.num_frames", str(NF), "--data.frame_interval", str(FI),
                 "--data.image_size", "16,16", "--cache.batch_size", "2", "--cache.shard_size", "2",
                 "--model.model_max_length", "12", "--grow.llm_max_length", "10", "--data.decoder", "pyav",
                 "--data.max_fail_fraction", "0.5", "--device", "cpu", *extra])


LEGACY = ["--num-frames", str(NF), "--frame-interval", str(FI), "--image-size", "16", "--batch-size", "2",
          "--shard-size", "2", "--t5-max-length", "12", "--llm-max-length", "10", "--decoder", "pyav",
          "--max-fail-fraction", "0.5", "--seed", "3"]


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    assert cli(setup, out) == 0
    return out


def test_index_contents(built, setup):
    idx = json.loads((built / "index.json").read_text())
    assert idx["num_samples"] == 5 and len(idx["shards"]) == 3
    assert idx["settings"]["decoder"] == "pyav" and idx["settings"]["prompt_mode"] == "SL"
    assert idx["fingerprint"] == fingerprint(idx) and len(idx["fingerprint"]) == 16
    assert [os.path.basename(p) for p in idx["failed"]] == ["bad.webm"]
    assert sorted(e[0] for e in idx["entries"]) == [0, 1, 2, 3, 4]
    assert idx["tensors"]["latent"] == {"shape": [4, NF, 2, 2], "dtype": "F32"}
    assert idx["tensors"]["y"]["shape"] == [12, 32] and idx["tensors"]["mask"]["shape"] == [12]
    assert idx["tensors"]["y_llm"]["shape"] == [10, 32]
    assert idx["settings"]["num_frames"] == NF and idx["settings"]["image_size"] == [16, 16]
    assert idx["encoders"]["t5"]["max_length"] == 12 and idx["encoders"]["llm"]["max_length"] == 10
    assert idx["encoders"]["vae"]["latent"] == "mode"
    assert not list(built.glob("*.tmp"))


def test_cached_samples_equal_direct_encoding(built, setup):
    from modelgrow.text import LLMEncoder, T5Encoder
    from modelgrow.vae import VideoVAE

    vae = VideoVAE.from_pretrained(setup["vae"], sample_posterior=False)
    t5 = T5Encoder(setup["t5"], max_length=12, device="cpu")
    llm = LLMEncoder(setup["llm"], max_length=10, device="cpu")
    ds = CachedDataset(built, expect={"t5": encoder_identity("t5", t5), "vae": encoder_identity("vae", vae)})
    vds = VideoDataset(setup["manifest"], NF, FI, SIZE, decoder="pyav", deterministic=True)
    loader = CachedLoader(ds, batch_size=5, seed=3)
    b = next(iter(loader))
    assert b["latent"].shape == (5, 4, NF, 2, 2) and b["y"].shape == (5, 1, 12, 32) and b["mask"].shape == (5, 12)
    assert b["y_llm"].shape == (5, 1, 10, 32) and b["llm_mask"].dtype == torch.long
    assert sorted(b["index"].tolist()) == [0, 1, 2, 3, 4]
    for j, i in enumerate(b["index"].tolist()):
        s = vds.load(i)
        torch.testing.assert_close(b["latent"][j], vae.encode(s["video"][None])[0], rtol=1e-5, atol=1e-5)
        y, m = t5.encode([s["prompt"]])
        yl, ml = llm.encode([s["prompt"]])
        assert b["prompt"][j] == s["prompt"]
        torch.testing.assert_close(b["y"][j], y[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["y_llm"][j], yl[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(b["mask"][j], m[0]) and torch.equal(b["llm_mask"][j], ml[0])


def test_cached_loader_shards_and_resumes(built):
    ds = CachedDataset(built)
    ranks = [next(iter(CachedLoader(ds, batch_size=2, rank=r, world_size=2, seed=1)))["index"].tolist() for r in range(2)]
    assert set(ranks[0]).isdisjoint(ranks[1])
    it = iter(CachedLoader(ds, batch_size=2, seed=1))
    ref = [next(it)["index"].tolist() for _ in range(4)]
    part = CachedLoader(ds, batch_size=2, seed=1)
    it = iter(part)
    next(it)
    resumed = CachedLoader(ds, batch_size=2, seed=1)
    resumed.load_state_dict(part.state_dict())
    it = iter(resumed)
    assert [next(it)["index"].tolist() for _ in range(3)] == ref[1:]


def test_shard_resume(setup, built, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(built, out)
    (out / "index.json").unlink()
    (out / "shard_00001.safetensors").unlink()
    (out / "shard_00001.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[02].*")}
    assert cli(setup, out) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[02].*")} == before  # not rewritten
    assert (out / "shard_00001.safetensors").exists()
    assert json.loads((out / "index.json").read_text()) == json.loads((built / "index.json").read_text()) | {
        "manifest": json.loads((out / "index.json").read_text())["manifest"]}
    from safetensors.torch import load_file

    a, b = load_file(str(out / "shard_00001.safetensors")), load_file(str(built / "shard_00001.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_encoder_refused(setup, built, tmp_path):
    import shutil

    from modelgrow.text import T5Encoder
    from modelgrow.text.tiny import build_tiny_t5

    other = build_tiny_t5(str(tmp_path / "t5b"), seed=1)
    out = tmp_path / "c"
    shutil.copytree(built, out)
    with pytest.raises(CacheMismatchError, match="encoder 't5'"):
        cli({**setup, "t5": other}, out)
    with pytest.raises(CacheMismatchError, match="t5"):
        CachedDataset(built, expect={"t5": encoder_identity("t5", T5Encoder(other, max_length=12, device="cpu"))})
    with pytest.raises(CacheMismatchError, match="num_frames"):
        CachedDataset(built, expect={"num_frames": 16})
    from modelgrow.config import Config

    cfg = Config()
    with pytest.raises(CacheMismatchError, match="caption_channels"):
        CachedDataset(built).check_compatible(cfg)
    with pytest.raises(FileNotFoundError, match="index.json"):
        CachedDataset(tmp_path)


def test_old_flags_still_build_with_a_warning(setup, built, tmp_path):
    """The flags of before the typed config are read as their keys (a FutureWarning names each new key): the same
    cache, every shard reused."""
    import shutil

    from modelgrow.config import translate_legacy_flags
    from modelgrow.data.cache.build import LEGACY_FLAGS

    with pytest.warns(FutureWarning, match=r"--num-frames is deprecated: use --data\.num_frames 3"):
        argv = translate_legacy_flags(["--num-frames", "3", "--image-size=16", "--no-llm-template"], LEGACY_FLAGS, "x",
                                      transforms={"--image-size": lambda v: f"{v},{v}"})
    assert argv == ["--data.num_frames", "3", "--data.image_size", "16,16", "--data.llm_use_template", "false"]
    out = tmp_path / "c"
    shutil.copytree(built, out)
    (out / "index.json").unlink()
    with pytest.warns(FutureWarning, match="t5_max_length|model_max_length"):
        assert main(["--manifest", str(setup["manifest"]), "--out", str(out), "--vae", setup["vae"], "--t5", setup["t5"],
                     "--llm", setup["llm"], *LEGACY, "--device", "cpu"]) == 0
    assert json.loads((out / "index.json").read_text())["fingerprint"] == json.loads((built / "index.json").read_text())["fingerprint"]


def _train_cfg(built, *extra):
    from modelgrow.config import load_config

    return load_config(None, ["--model.preset", "STDiT-tiny", "--model.input_size", f"{NF},2,2", "--model.caption_channels",
                              "32", "--model.model_max_length", "12", "--grow.llm", "true", "--grow.llm_channels", "32",
                              "--grow.llm_max_length", "10", "--data.cache_dir", str(built), *extra])


def test_training_config_is_checked_against_the_cache(built, setup, tmp_path):
    """A cache fixes the [data] settings it was built with: unset, they take the cache's values; set to the same
    values, fine; set otherwise, an error naming the key, the cache's value and the fix; data.hflip cannot apply."""
    from modelgrow.data.loader import build_loader, resolve_data

    ds = CachedDataset(built)
    ds.check_compatible(_train_cfg(built))  # nothing set: the cache's settings
    d = resolve_data(_train_cfg(built))
    assert (d.num_frames, d.frame_interval, d.image_size, d.prompt_mode, d.decoder) == (NF, FI, SIZE, "SL", "pyav")
    assert (d.llm_layer, d.llm_use_template) == (-1, True)
    ds.check_compatible(_train_cfg(built, "--data.num_frames", str(NF), "--data.prompt_mode", "SL", "--data.decoder",
                                   "pyav", "--data.image_size", "16,16", "--data.manifest", str(setup["manifest"]),
                                   "--data.llm_use_template", "true"))
    for args, match in [
        (["--data.num_frames", "16"], rf"data\.num_frames = 16 but data\.cache_dir .* built with num_frames = {NF}: "
                                      r"leave it unset .* or rebuild the cache"),
        (["--data.prompt_mode", "S"], r"data\.prompt_mode = 'S' .* prompt_mode = 'SL'"),
        (["--data.frame_interval", "3"], rf"data\.frame_interval = 3 .* frame_interval = {FI}"),
        (["--data.image_size", "32,32"], r"data\.image_size = \[32, 32\] .* image_size = \[16, 16\]"),
        (["--data.decoder", "dali"], r"data\.decoder = 'dali' .* decoded with 'pyav'"),
        (["--data.llm_use_template", "false"], r"data\.llm_use_template = False .* use_template = True"),
        (["--data.llm_layer", "-2"], r"data\.llm_layer = -2 .* layer = -1"),
        (["--data.hflip", "true"], r"data\.hflip = true cannot apply .* unflipped"),
        (["--data.manifest", str(tmp_path / "other.csv")], r"data\.manifest = .*other\.csv.* is not the manifest"),
    ]:
        with pytest.raises(CacheMismatchError, match=match):
            build_loader(_train_cfg(built, *args))
