"""Joint image + video training: a mixed manifest of the synthetic world (domain A videos + its image split)
-> single-shape batches by bucket, the image/video mix ratio, resume, the cache with single-frame image
latents, STDiT at T = 1 (and another spatial size) against the float64 reference, and a few training steps
on mixed data that lower the loss of both shapes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from modelgrow import synthetic
from modelgrow.config import load_config
from modelgrow.data.base import JointLoader
from modelgrow.data.batch import collate
from modelgrow.data.cache import CachedDataset, build_cache
from modelgrow.data.loader import build_loader
from modelgrow.data.videos import VideoDataset
from modelgrow.models import STDiT

from .helpers import randomize_
from .stdit_reference import reference_forward
from .test_cache import tiny_vae

torch.set_num_threads(1)
NF, SIZE, N_VID, N_IMG = 4, (32, 32), 6, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Domain A: N_VID training clips and N_IMG stills of the image split, in one mixed manifest."""
    d = tmp_path_factory.mktemp("joint")
    vid = synthetic.generate(d / "vid", "A", "train", n=N_VID, num_frames=8, height=32, width=32, codec="webm")
    img = synthetic.generate_images(d / "img", "A", "train", n=N_IMG, height=32, width=32)
    rows = []
    for sub, man in (("vid", vid), ("img", img)):
        for r in synthetic.read_manifest(man):
            rows.append({**r, "path": f"{sub}/{r['path']}"})
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # interleaved
    with open(d / "mixed.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(synthetic.MANIFEST_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return {"dir": d, "manifest": d / "mixed.csv"}


def _dataset(world, seed=0):
    return VideoDataset(world["manifest"], NF, 1, SIZE, hflip=True, decoder="pyav", seed=seed, prompt_mode="S",
                        single_frame_images=True)


def _loader(ds, p=0.4, **kw):
    return JointLoader(ds, 2, p, collate, seed=3, **kw)


def test_image_split_of_domain_a(world):
    man = synthetic.read_manifest(world["dir"] / "img" / "manifest.csv")
    assert len(man) == N_IMG and all(r["path"].endswith(".png") and r["num_frames"] == "1" for r in man)
    for r in man:  # the caption names the still's attributes and no motion
        assert synthetic.parse_caption(r["caption"]) == {a: r[a] for a in ("shape", "color", "background")}
    ds = _dataset(world)
    k = next(i for i in range(len(ds)) if ds.is_image(i))
    s = ds.load(k)
    assert s["video"].shape == (3, 1, *SIZE) and s["is_image"]
    # without joint training an image is still a clip of repeated frames
    old = VideoDataset(world["manifest"], NF, 1, SIZE, decoder="pyav").load(k)["video"]
    assert old.shape == (3, NF, *SIZE) and torch.equal(old[:, 0], old[:, -1])


def test_batches_have_one_shape_and_cover_each_bucket(world):
    ds = _dataset(world)
    loader = _loader(ds)
    it = iter(loader)
    seen = {"image": [], "video": []}
    for b in range(12):
        batch = next(it)
        bucket = loader.bucket_of_batch(b)
        T = 1 if bucket == "image" else NF
        assert batch["video"].shape == (2, 3, T, *SIZE)  # one shape per batch
        assert all(ds.is_image(int(i)) == (bucket == "image") for i in batch["index"])
        seen[bucket] += batch["index"].tolist()
    assert seen["image"] and seen["video"]
    # each bucket's stream is a sequence of epochs: the first len(bucket) samples are all of its members
    for bucket, n in (("image", N_IMG), ("video", N_VID)):
        first = seen[bucket][:n]
        if len(first) == n:
            assert sorted(first) == sorted(loader.members[bucket].tolist())


def test_mix_ratio_is_respected():
    class Flags:  # a dataset reduced to what the bucket schedule reads (no decoding)
        def __init__(self, flags):
            self.flags = flags

        def __len__(self):
            return len(self.flags)

        def is_image(self, k):
            return self.flags[k]

    ds = Flags([True, False] * 4)
    for p in (0.0, 0.25, 0.7, 1.0):
        loader = JointLoader(ds, 2, p, collate, seed=11)
        frac = np.mean([loader.bucket_of_batch(b) == "image" for b in range(4000)])
        assert abs(frac - p) < 0.025, (p, frac)
    # every rank draws the same bucket for the same batch
    a = JointLoader(ds, 2, 0.5, collate, seed=11, rank=0, world_size=2)
    b = JointLoader(ds, 2, 0.5, collate, seed=11, rank=1, world_size=2)
    assert [a.bucket_of_batch(i) for i in range(50)] == [b.bucket_of_batch(i) for i in range(50)]
    with pytest.raises(ValueError, match="no single-frame images"):
        JointLoader(Flags([False] * 3), 2, 0.5, collate)
    with pytest.raises(ValueError, match="no videos"):
        JointLoader(Flags([True] * 3), 2, 0.5, collate)


def test_resume_gives_the_same_batches(world):
    ds = _dataset(world)
    straight = iter(_loader(ds))
    ref = [next(straight) for _ in range(9)]

    first = _loader(ds)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = _loader(_dataset(world))
    second.load_state_dict(state)
    rest = iter(second)
    for want in ref[4:]:
        got = next(rest)
        assert torch.equal(got["index"], want["index"])
        assert torch.equal(got["video"], want["video"])  # same augmentation (flip) too
    with pytest.raises(ValueError, match="image_batch_prob"):
        _loader(ds, p=0.9).load_state_dict(state)


def test_two_ranks_split_each_bucket(world):
    ds = _dataset(world)
    its = [iter(_loader(ds, rank=r, world_size=2)) for r in range(2)]
    for _ in range(3):
        b0, b1 = next(its[0]), next(its[1])
        assert b0["video"].shape == b1["video"].shape  # the ranks step with one shape
        assert not set(b0["index"].tolist()) & set(b1["index"].tolist())


# --------------------------------------------------------------------------------------------------------------
# STDiT serves both shapes
# --------------------------------------------------------------------------------------------------------------

CFG = dict(depth=3, hidden_size=96, num_heads=4, caption_channels=32, model_max_length=8, input_size=(4, 8, 8),
           space_scale=0.5, time_scale=0.75)


def _ref_cfg(m):
    return dict(depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads, patch_size=m.patch_size,
                input_size=m.input_size, space_scale=m.space_scale, time_scale=m.time_scale,
                in_channels=m.in_channels, pred_sigma=m.pred_sigma)


@pytest.mark.parametrize("size", [(1, 8, 8), (1, 6, 10), (3, 8, 8)])
def test_stdit_other_sizes_match_reference(size):
    m = randomize_(STDiT(**CFG, dtype=torch.float64).to(torch.float64)).eval()
    keys = set(m.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *size, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64) * 999
    y = torch.randn(2, 1, 8, 32, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    with torch.no_grad():
        out = m(x, t, y, mask)
    ref = reference_forward(m.state_dict(), _ref_cfg(m), x, t, y, mask)
    assert out.shape == (2, 8, *size)
    torch.testing.assert_close(out, ref, rtol=2.5e-7, atol=1e-7)
    assert ref.abs().max() > 1e-2
    assert set(m.state_dict()) == keys and m.pos_embed.shape == (1, 16, 96)  # buffers and keys unchanged
    # the same function as Open-Sora v1.0's model built for that size (its buffers are that size's tables)
    own = STDiT(**{**CFG, "input_size": size}, dtype=torch.float64).to(torch.float64).eval()
    sd = {k: v for k, v in m.state_dict().items() if k not in ("pos_embed", "pos_embed_temporal")}
    own.load_state_dict(sd, strict=False)
    with torch.no_grad():
        assert torch.equal(own(x, t, y, mask), out)


# --------------------------------------------------------------------------------------------------------------
# cache + training
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(world, tmp_path_factory):
    from modelgrow.text import T5Encoder
    from modelgrow.text.tiny import build_tiny_t5
    from modelgrow.vae import VideoVAE

    d = tmp_path_factory.mktemp("jcache")
    vae = VideoVAE.from_pretrained(tiny_vae(d / "vae"), device="cpu")
    t5 = T5Encoder(build_tiny_t5(str(d / "t5")), max_length=8, device="cpu")
    out = d / "cache"
    build_cache(world["manifest"], out, vae, t5, num_frames=NF, frame_interval=1, image_size=SIZE, prompt_mode="S",
                batch_size=3, shard_size=4, decoder="pyav", device="cpu", single_frame_images=True)
    return {"dir": out, "vae": vae, "t5": t5, "vae_dir": str(d / "vae"), "t5_dir": str(d / "t5")}


def test_cache_holds_single_frame_image_latents(world, cache):
    ds = CachedDataset(cache["dir"])
    assert ds.tensors["latent"]["shape"] == [4, NF, 4, 4] and ds.tensors["latent_image"]["shape"] == [4, 1, 4, 4]
    assert ds.index["settings"]["images"] == "single-frame"
    raw = VideoDataset(world["manifest"], NF, 1, SIZE, decoder="pyav", deterministic=True, single_frame_images=True)
    n_img = 0
    for k in range(len(ds)):
        s = ds.get(k)
        assert ds.is_image(k) == raw.is_image(s["index"])
        n_img += ds.is_image(k)
        if k in (0, len(ds) - 1) or ds.is_image(k):  # the latent is that row's own encoding (the cache's clip)
            want = raw.load(s["index"])["video"]
            enc = cache["vae"]
            keep, enc.sample_posterior = enc.sample_posterior, False
            z = enc.encode(want[None]).float()[0]
            enc.sample_posterior = keep
            torch.testing.assert_close(s["latent"], z, rtol=1e-5, atol=1e-5)
    assert n_img == N_IMG
    loader = JointLoader(ds, 2, 0.5, collate, seed=1)
    it = iter(loader)
    for b in range(6):
        batch = next(it)
        assert batch["latent"].shape[2] == (1 if loader.bucket_of_batch(b) == "image" else NF)


def test_training_on_mixed_data_lowers_the_loss(cache, tmp_path):
    from modelgrow.train import Trainer

    cfg = load_config(None, ["--model.preset", "STDiT-tiny", "--model.input_size", f"{NF},4,4",
                             "--model.caption_channels", "32", "--model.model_max_length", "8",
                             "--train.log_every", "1", "--train.compute_dtype", "float32", "--optim.lr", "2e-3",
                             "--train.batch_size", "4", "--train.steps", "24", "--train.t5_drop", "0",
                             "--checkpoint.every_steps", "1000", "--train.output_dir", str(tmp_path / "run"),
                             "--data.cache_dir", str(cache["dir"]), "--data.image_batch_prob", "0.5"])
    loader = build_loader(cfg)
    assert isinstance(loader, JointLoader)
    trainer = Trainer(cfg, loader=loader, log=lambda *_: None)
    ds = loader.dataset

    def held_loss(image):  # fixed samples, timesteps and noise
        ks = [k for k in range(len(ds)) if ds.is_image(k) == image][:4]
        b = collate([ds.get(k) for k in ks])
        g = torch.Generator().manual_seed(0)
        x0 = b["latent"]
        t = torch.randint(0, 1000, (16,), generator=g)
        noise = torch.randn((16, *x0.shape[1:]), generator=g)
        x0 = x0.repeat(4, 1, 1, 1, 1)
        kw = {"y": b["y"].repeat(4, 1, 1, 1), "mask": b["mask"].repeat(4, 1)}
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.diffusion.training_losses(trainer.model, x0, t, model_kwargs=kw, noise=noise)["mse"].mean()
        trainer.model.train()
        return float(loss)

    before = {img: held_loss(img) for img in (True, False)}
    hist = trainer.fit()
    after = {img: held_loss(img) for img in (True, False)}
    assert len(hist) == 24 and all(np.isfinite(h["loss"]) for h in hist)
    assert after[True] < 0.8 * before[True] and after[False] < 0.8 * before[False], (before, after)
    # the step line counts the tokens of the batches run: 16 per video sample, 4 per image sample
    tps = [h["tokens_per_s"] / h["samples_per_s"] for h in hist]
    assert sorted(set(round(v) for v in tps)) == [4, 16]
    assert loader.batches == 24 and 0 < sum(loader.bucket_of_batch(b) == "image" for b in range(24)) < 24


def test_raw_mixed_manifest_trains_with_on_the_fly_encoding(world, cache, tmp_path):
    from modelgrow.train import Trainer

    cfg = load_config(None, ["--model.preset", "STDiT-tiny", "--model.input_size", f"{NF},4,4",
                             "--model.caption_channels", "32", "--model.model_max_length", "8",
                             "--train.log_every", "1", "--train.compute_dtype", "float32", "--train.batch_size", "2",
                             "--train.steps", "4", "--checkpoint.every_steps", "1000",
                             "--train.output_dir", str(tmp_path / "raw"), "--data.manifest", str(world["manifest"]),
                             "--data.vae", cache["vae_dir"], "--data.t5", cache["t5_dir"], "--data.decoder", "pyav",
                             "--data.num_workers", "0", "--data.num_frames", str(NF), "--data.frame_interval", "1",
                             "--data.image_size", "32,32", "--data.image_batch_prob", "0.5"])
    trainer = Trainer(cfg, log=lambda *_: None)
    hist = trainer.fit()
    assert len(hist) == 4 and all(np.isfinite(h["loss"]) for h in hist)
    kinds = {trainer.loader.bucket_of_batch(b) for b in range(4)}
    assert {round(h["tokens_per_s"] / h["samples_per_s"]) for h in hist} == {{"image": 4, "video": 16}[k] for k in kinds}
    state = trainer._extra()["data"]  # the checkpoint's data position
    assert state["joint"] and state["batches"] == 4


def test_trainer_resume_on_mixed_data_is_bit_exact(cache, tmp_path):
    from modelgrow.train import Trainer

    def cfg(out, steps):
        return load_config(None, ["--model.preset", "STDiT-tiny", "--model.input_size", f"{NF},4,4",
                                  "--model.caption_channels", "32", "--model.model_max_length", "8",
                                  "--train.log_every", "1", "--train.compute_dtype", "float32", "--train.batch_size", "2",
                                  "--train.steps", str(steps), "--checkpoint.every_steps", "3",
                                  "--train.output_dir", str(out), "--data.cache_dir", str(cache["dir"]),
                                  "--data.image_batch_prob", "0.5"])

    straight = [h["loss"] for h in Trainer(cfg(tmp_path / "a", 6), log=lambda *_: None).fit()]
    first = [h["loss"] for h in Trainer(cfg(tmp_path / "b", 3), log=lambda *_: None).fit()]
    second = Trainer(cfg(tmp_path / "b", 6), log=lambda *_: None)
    assert second.step == 3 and second.loader.batches == 3  # the data position came from the checkpoint
    assert first + [h["loss"] for h in second.fit()] == straight
