"""The video data pipeline: manifests, clip sampling, PyAV / DALI decoding, the sharded resumable loader."""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import pytest
import torch

from modelgrow.data.base import TooManyDecodeFailures, epoch_order
from modelgrow.data.clips import draw_clip, resize_crop, sample_frame_indices, to_model_space
from modelgrow.data.dali import is_dali_available
from modelgrow.data.decode import DecodeError, FrameDecoder, decode_pyav, probe
from modelgrow.data.manifest import ManifestError, load_manifest
from modelgrow.data.videos import VideoDataset, VideoLoader
from modelgrow.video_io import write_png, write_video

T, H, W = 20, 40, 48
STRIPE = 12  # bright columns on the left: tells a flipped clip from an unflipped one


def grey(t: int) -> int:
    return 8 + 12 * t  # the frame index, readable through lossy compression


def make_frames(n: int = T) -> np.ndarray:
    f = np.zeros((n, H, W, 3), np.uint8)
    for t in range(n):
        f[t] = grey(t)
        f[t, :, :STRIPE] = 255
    return f


def frame_ids(video: torch.Tensor) -> list[int]:
    """[3, T, h, w] in [-1, 1] -> the index encoded by each frame's grey level (right half, away from the stripe)."""
    w = video.shape[-1]
    level = ((video[:, :, :, w // 2 :].mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
    return [round((v - 8) / 12) for v in level]


def write_manifest(path, rows, columns=("path", "caption", "long_caption")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    frames = make_frames()
    write_video(d / "a.webm", frames)
    write_video(d / "b.mp4", frames)
    write_video(d / "short.webm", frames[:5])
    img = np.full((H, W, 3), 100, np.uint8)
    img[:, :STRIPE] = 255
    write_png(d / "img.png", img)
    for i in range(4):  # more videos for the loader tests
        write_video(d / f"v{i}.webm", make_frames(12 + i))
    (d / "random.webm").write_bytes(np.random.default_rng(0).bytes(4000))
    data = (d / "a.webm").read_bytes()
    (d / "truncated.webm").write_bytes(data[: len(data) // 3])
    return d


@pytest.fixture(scope="module")
def mixed_manifest(media):
    rows = [(f"v{i}.webm", f"clip {i}", f"a longer caption {i}" if i % 2 else "") for i in range(4)]
    rows += [("img.png", "an image", "a still image"), ("a.webm", "clip a", "")]
    return write_manifest(media / "mixed.csv", rows)


# ------------------------------------------------------------------------------------------------ sampling
def test_frame_indices_interval_and_range():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(400):
        idx = sample_frame_indices(100, 16, 3, rng.random())
        assert np.all(np.diff(idx) == 3) and len(idx) == 16
        assert 0 <= idx[0] <= 100 - 48
        starts.add(idx[0])
    assert min(starts) == 0 and max(starts) == 52  # both ends of [0, total - n*k] are reachable
    assert sample_frame_indices(100, 16, 3, None)[0] == 26  # deterministic: centre window
    assert sample_frame_indices(47, 16, 3, 0.99) == list(range(1, 47, 3))  # (n-1)k+1 <= total < nk: stride kept
    assert sample_frame_indices(20, 16, 3, 0.5) == [int(x) for x in np.linspace(0, 19, 16)]  # short: spread
    assert sample_frame_indices(3, 4, 3, 0.5) == [0, 0, 1, 2]  # fewer frames than num_frames: repeats


def test_draw_clip_is_a_function_of_seed_epoch_index():
    a = draw_clip(100, 16, 3, True, seed=1, epoch=2, index=5)
    assert a == draw_clip(100, 16, 3, True, seed=1, epoch=2, index=5)
    assert len({draw_clip(100, 16, 3, True, 1, e, 5).indices[0] for e in range(10)}) > 1
    assert not draw_clip(100, 16, 3, True, 1, 2, 5, deterministic=True).flip


@pytest.mark.parametrize("name", ["a.webm", "b.mp4"])
def test_temporal_crop_reads_the_right_frames(media, name, tmp_path):
    m = write_manifest(tmp_path / "m.csv", [(str(media / name), "x", "")])
    ds = VideoDataset(m, num_frames=4, frame_interval=3, image_size=(16, 16), decoder="pyav", seed=3)
    assert probe(str(media / name)).num_frames == T
    seen = set()
    for epoch in range(6):
        spec = ds.clip_spec(0, epoch, T)
        assert np.all(np.diff(spec.indices) == 3) and 0 <= spec.indices[0] <= T - 12
        assert frame_ids(ds.load(0, epoch)["video"]) == list(spec.indices)
        seen.add(spec.indices[0])
    assert len(seen) > 1


def test_short_video_is_spread(media, tmp_path):
    m = write_manifest(tmp_path / "m.csv", [(str(media / "short.webm"), "x", "")])
    ds = VideoDataset(m, num_frames=4, frame_interval=3, image_size=(16, 16), decoder="pyav")
    assert frame_ids(ds.load(0)["video"]) == [0, 1, 2, 4]


def test_pyav_seek_equals_sequential(media):
    idx = [9, 12, 15, 18]
    a = decode_pyav(str(media / "a.webm"), idx, seek_threshold=1 << 30)
    b = decode_pyav(str(media / "a.webm"), idx, seek_threshold=0)
    c = decode_pyav(str(media / "b.mp4"), idx, seek_threshold=0)
    assert np.array_equal(a, b) and c.shape == a.shape


# ------------------------------------------------------------------------------------------------ transform
def test_resize_crop_geometry_and_range():
    x = torch.rand(2, 3, 40, 48)
    y = resize_crop(x, (16, 16))  # scale 0.4: 16 x 19.2 -> 16 x 19, centre crop columns 2..17
    ref = torch.nn.functional.interpolate(x, size=(16, 19), mode="bilinear", align_corners=False)[..., :, 2:18]
    assert torch.equal(y, ref)
    y = resize_crop(x, (30, 20))  # taller target: scale 0.75 -> 30 x 36, columns 8..27
    ref = torch.nn.functional.interpolate(x, size=(30, 36), mode="bilinear", align_corners=False)[..., :, 8:28]
    assert torch.equal(y, ref)
    frames = torch.randint(0, 256, (3, 40, 48, 3), dtype=torch.uint8)
    frames[0] = 0
    frames[1] = 255
    v = to_model_space(frames, (16, 16))
    assert v.shape == (3, 3, 16, 16) and v.dtype == torch.float32
    assert v[:, 0].eq(-1).all() and v[:, 1].eq(1).all() and v.min() >= -1 and v.max() <= 1


def test_hflip(media, tmp_path):
    m = write_manifest(tmp_path / "m.csv", [(str(media / "a.webm"), "x", "")])
    ds = VideoDataset(m, num_frames=2, frame_interval=3, image_size=(16, 16), hflip=True, decoder="pyav", seed=0)
    flips = {e: ds.clip_spec(0, e, T).flip for e in range(8)}
    assert set(flips.values()) == {True, False}
    for e, flip in list(flips.items())[:4]:
        v = ds.load(0, e)["video"]
        left, right = v[..., :2].mean(), v[..., -2:].mean()
        assert (right > left) if flip else (left > right)
    plain = VideoDataset(m, num_frames=2, frame_interval=3, image_size=(16, 16), decoder="pyav", seed=0)
    e = next(e for e, f in flips.items() if f)
    assert torch.equal(ds.load(0, e)["video"], plain.load(0, e)["video"].flip(-1))


def test_image_is_repeated(media, tmp_path):
    m = write_manifest(tmp_path / "m.csv", [("%s" % (media / "img.png"), "img", "")])
    v = VideoDataset(m, num_frames=5, frame_interval=3, image_size=(16, 16), decoder="pyav").load(0)["video"]
    assert v.shape == (3, 5, 16, 16)
    assert all(torch.equal(v[:, 0], v[:, t]) for t in range(5))


# ------------------------------------------------------------------------------------------------ DALI
needs_dali = pytest.mark.skipif(not is_dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")


@needs_dali
def test_dali_cpu_matches_pyav(media, tmp_path):
    m = write_manifest(tmp_path / "m.csv", [(str(media / "a.webm"), "x", ""), (str(media / "v3.webm"), "y", "")])
    kw = dict(num_frames=4, frame_interval=3, image_size=(24, 24), hflip=True, seed=5)
    dali, pyav = VideoDataset(m, decoder="dali-cpu", **kw), VideoDataset(m, decoder="pyav", **kw)
    worst = 0.0
    for i in range(2):
        for e in range(3):
            a, b = dali.load(i, e)["video"], pyav.load(i, e)["video"]
            assert a.shape == b.shape
            worst = max(worst, (a - b).abs().max().item())
    assert dali.decoder.counts["dali-cpu"] == 6 and dali.decoder.counts["fallback"] == 0
    # both decode with libavcodec and convert BT.601 with bilinear chroma: measured <= 1 level of 255
    assert worst <= 2 / 255 + 1e-6, worst
    raw_d = FrameDecoder("dali-cpu").read(str(media / "a.webm"), [0, 7, 19])
    raw_p = FrameDecoder("pyav").read(str(media / "a.webm"), [0, 7, 19])
    assert np.abs(raw_d.astype(int) - raw_p).max() <= 1


@needs_dali
def test_dali_cpu_falls_back_to_pyav_for_h264(media):
    dec = FrameDecoder("dali-cpu")
    a = dec.read(str(media / "b.mp4"), [1, 4, 7])
    assert dec.counts["fallback"] == 1 and dec.counts["pyav"] == 1
    assert np.array_equal(a, FrameDecoder("pyav").read(str(media / "b.mp4"), [1, 4, 7]))
    with pytest.raises(DecodeError, match="random.webm"):
        dec.read(str(media / "random.webm"), [0])


def test_decoder_resolution():
    assert FrameDecoder("pyav").kind == "pyav"
    if not torch.cuda.is_available():
        assert FrameDecoder("auto").kind == ("dali-cpu" if is_dali_available() else "pyav")
        if is_dali_available():
            with pytest.raises(RuntimeError, match="CUDA"):
                FrameDecoder("dali")
    with pytest.raises(ValueError, match="unknown decoder"):
        FrameDecoder("ffmpeg")


# ------------------------------------------------------------------------------------------------ loader
def _loader(manifest, world_size=1, rank=0, batch_size=2, num_workers=0, **kw):
    ds = VideoDataset(manifest, num_frames=3, frame_interval=2, image_size=(16, 16), hflip=True, decoder="pyav",
                      seed=7, prompt_mode=kw.pop("prompt_mode", "SL"))
    return VideoLoader(ds, batch_size, rank=rank, world_size=world_size, num_workers=num_workers, **kw)


def test_epoch_order_sharding_and_shuffle():
    a, b = epoch_order(10, 3, 0, 0, 2), epoch_order(10, 3, 0, 1, 2)
    assert set(a).isdisjoint(b) and sorted(np.concatenate([a, b])) == list(range(10))
    assert np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 3, 0))
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 3, 1))
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 4, 0))
    odd = [epoch_order(7, 0, 0, r, 2) for r in range(2)]  # padded: same length on every rank
    assert len(odd[0]) == len(odd[1]) == 4 and set(np.concatenate(odd)) == set(range(7))


def test_loader_batches_and_sharding(mixed_manifest):
    seen = []
    for rank in range(2):
        it = iter(_loader(mixed_manifest, world_size=2, rank=rank, batch_size=3))
        b = next(it)
        assert b["video"].shape == (3, 3, 3, 16, 16) and b["index"].dtype == torch.long
        assert len(b["caption"]) == len(b["long_caption"]) == len(b["prompt"]) == 3
        seen.append(b["index"].tolist())
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(6))
    man = load_manifest(mixed_manifest)
    b = next(iter(_loader(mixed_manifest, batch_size=6, shuffle=False)))
    for i, j in enumerate(b["index"].tolist()):
        rec = man[j]
        assert b["caption"][i] == rec.caption and b["long_caption"][i] == rec.long_caption
        assert b["prompt"][i] == (f"{rec.caption} {rec.long_caption}" if rec.long_caption else rec.caption)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_without_repetition(mixed_manifest, num_workers):
    full = _loader(mixed_manifest, batch_size=2, num_workers=num_workers)
    it = iter(full)
    ref = [next(it) for _ in range(5)]  # 10 samples: crosses the epoch boundary (6 per epoch)
    part = _loader(mixed_manifest, batch_size=2, num_workers=num_workers)
    it = iter(part)
    for _ in range(2):
        next(it)
    state = part.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4
    resumed = _loader(mixed_manifest, batch_size=2, num_workers=num_workers)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in ref[2:]:
        got = next(it)
        assert got["index"].tolist() == want["index"].tolist()
        assert torch.equal(got["video"], want["video"])
    assert resumed.state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="world_size"):
        _loader(mixed_manifest, world_size=2).load_state_dict(state)


def test_bad_files_are_skipped_and_counted(media, caplog, tmp_path):
    rows = [(str(media / n), n, "") for n in ("v0.webm", "random.webm", "v1.webm", "truncated.webm", "missing.webm", "v2.webm")]
    m = write_manifest(tmp_path / "m.csv", rows)
    loader = _loader(m, batch_size=3, shuffle=False, max_fail_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="modelgrow.data"):
        b = next(iter(loader))
    assert [os.path.basename(p) for p in b["path"]] == ["v0.webm", "v1.webm", "v2.webm"]
    assert loader.failed == 3 and loader.tried == 6
    assert {os.path.basename(p) for p in loader.failed_paths} == {"random.webm", "truncated.webm", "missing.webm"}
    assert "random.webm" in caplog.text and "truncated.webm" in caplog.text
    assert loader.state_dict()["failed"] == 3


def test_abort_past_max_fail_fraction(media, tmp_path):
    rows = [(str(media / "v0.webm"), "ok", "")] * 3 + [(str(media / "random.webm"), "bad", ""), (str(media / "truncated.webm"), "bad", "")]
    m = write_manifest(tmp_path / "m.csv", rows)
    lenient = _loader(m, batch_size=2, shuffle=False, max_fail_fraction=0.5, min_tried=1)
    next(iter(lenient))  # 0 failures so far
    strict = _loader(m, batch_size=4, shuffle=False, max_fail_fraction=0.1, min_tried=5)
    with pytest.raises(TooManyDecodeFailures, match=r"random\.webm.*truncated\.webm|truncated\.webm.*random\.webm"):
        it = iter(strict)
        next(it)
        next(it)
    # one failure among the first samples does not abort (min_tried)
    early = _loader(write_manifest(tmp_path / "e.csv", [(str(media / "random.webm"), "bad", "")] + [(str(media / "v0.webm"), "ok", "")] * 2),
                    batch_size=2, shuffle=False, max_fail_fraction=0.01)
    assert len(next(iter(early))["index"]) == 2 and early.failed == 1
    allbad = _loader(write_manifest(tmp_path / "b.csv", [(str(media / "random.webm"), "bad", "")]), batch_size=1,
                     max_fail_fraction=1.0)
    with pytest.raises(TooManyDecodeFailures, match="no sample"):
        next(iter(allbad))


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_errors_and_paths(media, tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")
    bad = write_manifest(tmp_path / "bad.csv", [("a.webm",)], columns=("path",))
    with pytest.raises(ManifestError, match=r"bad\.csv.*caption"):
        load_manifest(bad)
    empty = write_manifest(tmp_path / "empty.csv", [])
    with pytest.raises(ManifestError, match="empty"):
        load_manifest(empty)
    badnum = write_manifest(tmp_path / "n.csv", [("a.webm", "x", "abc")], columns=("path", "caption", "num_frames"))
    with pytest.raises(ManifestError, match=r"row 2.*num_frames"):
        load_manifest(badnum)
    sub = tmp_path / "sub"
    sub.mkdir()
    m = write_manifest(sub / "m.csv", [("clips/a.webm", "x", "", "16", "7", "9")],
                       columns=("path", "caption", "long_caption", "num_frames", "domain", "seed"))
    rec = load_manifest(m)[0]
    assert rec.path == str(sub / "clips" / "a.webm") and rec.long_caption is None and rec.num_frames == 16
    assert rec.extra == {"domain": "7", "seed": "9"}
    with pytest.raises(ManifestError, match="unsupported format"):
        load_manifest(media / "img.png")


def test_parquet_manifest(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        p = tmp_path / "m.parquet"
        p.write_bytes(b"PAR1")
        try:
            import pandas  # noqa: F401
        except ImportError:
            with pytest.raises(ManifestError, match="pyarrow"):
                load_manifest(p)
            return
        pytest.skip("pandas without pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x.webm"], "caption": ["c"], "fps": [8.0]}), tmp_path / "m.parquet")
    rec = load_manifest(tmp_path / "m.parquet")[0]
    assert rec.path == str(tmp_path / "x.webm") and rec.fps == 8.0
