"""The synthetic video world: vocabularies, splits, rendering geometry, captions, and the file generator
(decodable VP9 / H.264 files with a manifest, idempotent re-generation)."""

import os
import re

import numpy as np
import pytest

from modelgrow.synthetic.world import (
    ATTRIBUTES,
    COLORS,
    DIRECTION_VECTORS,
    DOMAINS,
    HELDOUT_COMBOS,
    MANIFEST_COLUMNS,
    ClipSpec,
    generate,
    heldout_prompts,
    long_caption,
    object_positions,
    parse_caption,
    read_manifest,
    render_clip,
    sample_specs,
    short_caption,
    vocabulary,
)
from modelgrow.video_io import read_video


def _key(s: ClipSpec):
    return (*(getattr(s, a) for a in ATTRIBUTES), s.start_x, s.start_y)


def _color_centroids(frames: np.ndarray, color: str, tol: int = 60) -> np.ndarray:
    """(x, y) centroid per frame of the pixels close to the object's colour."""
    d = np.abs(frames.astype(int) - np.array(COLORS[color])).sum(-1) < tol
    out = []
    for m in d:
        ys, xs = np.nonzero(m)
        assert len(xs) > 10, "object colour not found in a frame"
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


# ------------------------------------------------------------------------------------------------------------


def test_vocabularies():
    a, b = DOMAINS["A"], DOMAINS["B"]
    assert a["shape"] == ("square", "circle", "triangle") and b["shape"] == ("star", "cross", "diamond")
    assert a["color"] == ("red", "green", "blue", "yellow") and b["color"] == ("orange", "purple", "cyan")
    assert a["direction"] == ("left", "right", "up", "down")
    assert b["direction"] == ("up-left", "up-right", "down-left", "down-right")
    for attr in ("shape", "color", "direction", "background"):  # B is genuinely new vocabulary
        assert not set(a[attr]) & set(b[attr]), attr
    assert set(COLORS) == set(a["color"]) | set(b["color"])
    u = vocabulary()
    for attr in ATTRIBUTES:
        assert set(u[attr]) == set(a[attr]) | set(b[attr])
    # object colours never equal a background colour
    assert not set(u["color"]) & set(u["background"])
    for d, pairs in HELDOUT_COMBOS.items():
        for s, c in pairs:
            assert s in DOMAINS[d]["shape"] and c in DOMAINS[d]["color"]


def test_specs_deterministic_and_prefix_stable():
    assert sample_specs("A", 5, seed=0) == sample_specs("A", 12, seed=0)[:5]
    assert sample_specs("B", 8, seed=3, split="heldout") == sample_specs("b", 8, seed=3, split="heldout")
    assert sample_specs("A", 8, seed=0) != sample_specs("A", 8, seed=1)
    with pytest.raises(ValueError):
        sample_specs("C", 1)
    with pytest.raises(ValueError):
        sample_specs("A", 1, split="test")


@pytest.mark.parametrize("domain", ["A", "B"])
def test_splits(domain):
    train = sample_specs(domain, 400, seed=0, split="train")
    held = sample_specs(domain, 200, seed=0, split="heldout")
    combos = set(HELDOUT_COMBOS[domain])
    for s in train + held:  # only the domain's own vocabulary, objects fully inside the frame
        for attr in ATTRIBUTES:
            assert getattr(s, attr) in DOMAINS[domain][attr]
        for x, y in (s.start_x, s.start_y), s.end():
            assert s.radius <= x <= 1 - s.radius and s.radius <= y <= 1 - s.radius
    assert not {(s.shape, s.color) for s in train} & combos  # unseen combinations never in train
    unseen = [s for s in held if (s.shape, s.color) in combos]
    assert 0.3 < len(unseen) / len(held) < 0.7
    assert not {_key(s) for s in train} & {_key(s) for s in held}  # no held-out clip is a training clip
    for attr in ("shape", "color", "direction", "background", "size", "speed"):  # every word is used
        assert {getattr(s, attr) for s in train} == set(DOMAINS[domain][attr])


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_render_geometry(hw):
    H, W = hw
    specs = [s for d in "AB" for s in sample_specs(d, 12, seed=2, split="all")]
    specs += [ClipSpec(shape=sh, color="red" if sh in DOMAINS["A"]["shape"] else "cyan", direction="up-right",
                       background="gray", size="small", speed="fast", start_x=0.3, start_y=0.7)
              for sh in DOMAINS["A"]["shape"] + DOMAINS["B"]["shape"]]
    for s in specs:
        v = render_clip(s, 16, H, W)
        assert v.shape == (16, H, W, 3) and v.dtype == np.uint8
        assert np.array_equal(v, render_clip(s, 16, H, W))  # deterministic
        pos = object_positions(s, 16, H, W)
        c = _color_centroids(v, s.color)
        assert np.abs(c - pos).max() < 0.75, (s, np.abs(c - pos).max())
        dx, dy = DIRECTION_VECTORS[s.direction]
        move = c[-1] - c[0]
        assert (np.sign(move) * (np.abs(move) > 1)).tolist() == np.sign([dx, dy]).tolist()
        # the background is the declared colour at the corners
        assert (np.abs(v[:, [0, -1]][:, :, [0, -1]].astype(int) - v[0, 0, 0].astype(int)).max()) == 0


def _tokens(spec: ClipSpec) -> set[str]:
    return {t for a in ATTRIBUTES for t in getattr(spec, a).split("-")}


@pytest.mark.parametrize("domain", ["A", "B"])
def test_captions(domain):
    vocab = vocabulary()
    words = {t for a in ("shape", "color", "direction", "background", "size") for w in vocab[a]
             for t in w.split("-")}
    long_texts = set()
    for i, s in enumerate(sample_specs(domain, 150, seed=1, split="train") + sample_specs(domain, 50, 1, "heldout")):
        short, lng = short_caption(s), long_caption(s, seed=i)
        assert lng == long_caption(s, seed=i)
        long_texts.add(lng.split(".")[0])
        assert 35 <= len(lng.split()) <= 128, len(lng.split())
        assert all(s.__getattribute__(a) in short for a in ("shape", "color", "background"))
        assert parse_caption(short) == {a: getattr(s, a) for a in ("shape", "color", "direction", "background")}
        assert parse_caption(lng) == s.attributes, lng
        own = _tokens(s)
        for text in (short, lng):
            for w in words - own:  # no other attribute word appears anywhere
                assert not re.search(rf"\b{w}\b", text.lower()), (w, text)
    assert short_caption(ClipSpec("square", "red", "left", "black", "small", "slow", 0.5, 0.5)) == \
        "a red square moving left on a black background"
    assert short_caption(ClipSpec("star", "orange", "up-left", "navy", "small", "slow", 0.5, 0.5)) == \
        "an orange star moving diagonally up-left on a navy background"
    assert len(long_texts) > 5  # varied phrasing


def test_heldout_prompts():
    p = heldout_prompts("B", 10, seed=4)
    assert p == heldout_prompts("B", 10, seed=4) and len(p) == 10
    for d in p:
        assert parse_caption(d["short"])["shape"] == d["shape"]
        assert 35 <= len(d["long"].split()) <= 128
        assert d["split"] == "heldout" and d["domain"] == "B"
        assert d["unseen_combo"] == ((d["shape"], d["color"]) in HELDOUT_COMBOS["B"])


@pytest.mark.parametrize("codec", ["webm", "mp4"])
def test_generate_files(tmp_path, codec):
    man = generate(tmp_path / "d", "B" if codec == "mp4" else "A", "train", 5, num_frames=12, height=64, width=48,
                   fps=8, codec=codec, seed=0)
    rows = read_manifest(man)
    assert len(rows) == 5 and list(rows[0]) == list(MANIFEST_COLUMNS)
    specs = sample_specs("B" if codec == "mp4" else "A", 5, seed=0)
    for r, s in zip(rows, specs, strict=True):
        assert r["path"].endswith("." + codec) and not os.path.isabs(r["path"])
        assert r["caption"] == short_caption(s) and 35 <= len(r["long_caption"].split()) <= 128
        assert (r["num_frames"], r["fps"], r["height"], r["width"]) == ("12", "8", "64", "48")
        assert all(r[a] == getattr(s, a) for a in ATTRIBUTES) and r["split"] == "train"
        frames, fps = read_video(man.parent / r["path"])
        assert frames.shape == (12, 64, 48, 3) and fps == 8
        c = _color_centroids(frames, s.color, tol=90)
        assert np.abs(c - object_positions(s, 12, 64, 48)).max() < 1.5


def test_generate_idempotent(tmp_path):
    out = tmp_path / "a"
    man = generate(out, "A", "heldout", 3, num_frames=8, seed=1)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert generate(out, "A", "heldout", 3, num_frames=8, seed=1) == man
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # nothing rewritten
    generate(out, "A", "heldout", 5, num_frames=8, seed=1)  # extension: the first 3 clips are reused
    now = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert all(now[k] == v for k, v in stamp.items() if k.endswith(".webm")) and len(read_manifest(man)) == 5
    generate(out, "A", "heldout", 5, num_frames=8, fps=4, seed=1)  # different arguments: re-rendered
    assert all(p.stat().st_mtime_ns != now[p.name] for p in out.glob("*.webm"))
    assert read_video(out / read_manifest(man)[0]["path"])[1] == 4
    (out / read_manifest(man)[1]["path"]).unlink()  # a missing file is re-rendered
    generate(out, "A", "heldout", 5, num_frames=8, fps=4, seed=1)
    assert (out / read_manifest(man)[1]["path"]).exists()


def test_generate_workers(tmp_path):
    one = generate(tmp_path / "one", "B", "train", 4, num_frames=6, codec="mp4", seed=2)
    two = generate(tmp_path / "two", "B", "train", 4, num_frames=6, codec="mp4", seed=2, workers=2)
    assert read_manifest(one) == read_manifest(two)
    for r in read_manifest(one):
        a, b = read_video(one.parent / r["path"])[0], read_video(two.parent / r["path"])[0]
        assert np.array_equal(a, b)
