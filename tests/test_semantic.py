"""The semantic evaluator: trained from scratch with its default settings on rendered ground truth, it must read
shape / colour / direction of held-out clips decoded from VP9 and H.264 files (>= 95% per attribute), give
~1.0 against the true prompts and ~chance against shuffled ones, and round-trip through save/load."""

import random

import numpy as np
import pytest
import torch

from modelgrow.synthetic import SCORED_ATTRIBUTES, SemanticClassifier, prepare_videos, train_classifier
from modelgrow.synthetic.semantic import ALL_ATTRIBUTES, background_of
from modelgrow.synthetic.world import BACKGROUNDS, generate, read_manifest, render_clip, sample_specs, vocabulary
from modelgrow.video_io import read_video


@pytest.fixture(scope="module")
def clf():
    return train_classifier(domains=("A", "B"), seed=0)  # default n_train / steps: the shipped evaluator


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Freshly generated held-out clips of both domains, decoded from files: (videos, manifest rows)."""
    root = tmp_path_factory.mktemp("heldout")
    videos, rows = [], []
    for domain, codec in (("A", "webm"), ("B", "mp4"), ("A", "mp4"), ("B", "webm")):
        man = generate(root / f"{domain}_{codec}", domain, "heldout", 40, codec=codec, seed=123)
        for r in read_manifest(man):
            videos.append(read_video(man.parent / r["path"])[0])
            rows.append(r)
    return videos, rows


def test_vocab_is_union(clf):
    u = vocabulary(("A", "B"))
    assert clf.vocab == {a: list(u[a]) for a in SCORED_ATTRIBUTES}
    info = clf.train_info
    assert info["time_s"] > 0 and info["split"] == "train"
    assert all(v >= 0.95 for d in "AB" for v in info["heldout_accuracy"][d].values()), info["heldout_accuracy"]


def test_heldout_accuracy_on_decoded_files(clf, heldout):
    videos, rows = heldout
    for domain in "AB":
        idx = [i for i, r in enumerate(rows) if r["domain"] == domain]
        res = clf.score([videos[i] for i in idx], [rows[i] for i in idx])
        for a in ALL_ATTRIBUTES:
            assert res[a] >= 0.95, (domain, a, res[a])
        assert res["semantic_score"] >= 0.97
    # the unseen (shape, colour) combinations are read as well as the seen ones
    unseen = [i for i, r in enumerate(rows) if (r["shape"], r["color"]) in
              {("square", "yellow"), ("circle", "blue"), ("triangle", "red"), ("star", "cyan"),
               ("cross", "orange"), ("diamond", "purple")}]
    assert len(unseen) > 20
    assert clf.score([videos[i] for i in unseen], [rows[i] for i in unseen])["semantic_score"] >= 0.95


def test_shuffled_prompts_score_chance(clf, heldout):
    videos, rows = heldout
    true = clf.score(videos, rows)
    assert true["semantic_score"] >= 0.97
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    res = clf.score(videos, shuffled)
    for a in ALL_ATTRIBUTES:
        chance = np.mean([r[a] == s[a] for r, s in zip(rows, shuffled, strict=True)])  # agreement of the shuffled labels
        assert abs(res[a] - chance) <= 0.1, (a, res[a], chance)
    assert res["semantic_score"] < 0.45


def test_inputs_and_robustness(clf):
    specs = sample_specs("B", 16, seed=9, split="heldout") + sample_specs("A", 16, seed=9, split="heldout")
    u8 = np.stack([render_clip(s, 16, 64, 64) for s in specs])
    model_space = torch.from_numpy(u8).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, T, H, W]
    p_u8, p_f = clf.predict(u8), clf.predict(model_space)
    assert p_u8 == p_f
    assert clf.predict(u8[0]) == {a: [p_u8[a][0]] for a in ALL_ATTRIBUTES}
    assert prepare_videos([u8[0], model_space[1]]).shape[0] == 2
    truth = [s.attributes for s in specs]
    # other sizes / frame counts, and a blurry, noisy, low-resolution version (like an early generation)
    odd = [render_clip(s, 9, 40, 56) for s in specs]
    assert clf.score(odd, truth)["semantic_score"] >= 0.95
    g = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(model_space.flatten(1, 2), size=(24, 24), mode="area")
    low = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear").unflatten(1, (3, 16))
    low = low + 0.08 * torch.randn(low.shape, generator=g)
    assert clf.score(low, truth)["semantic_score"] >= 0.9
    # a missing attribute is not scored; a length mismatch is an error
    res = clf.score(u8[:2], [{"shape": truth[0]["shape"]}, {"shape": truth[1]["shape"], "color": None}])
    assert res["shape"] == 1.0 and np.isnan(res["color"]) and res["semantic_score"] == 1.0
    with pytest.raises(ValueError):
        clf.score(u8[:2], truth[:1])


def test_save_load(clf, tmp_path):
    path = clf.save(tmp_path / "sem.safetensors")
    assert path.with_suffix(".json").exists()
    back = SemanticClassifier.load(path)
    x = np.stack([render_clip(s) for s in sample_specs("A", 4, seed=5)])
    a, b = clf.predict_logits(x), back.predict_logits(x)
    for k in SCORED_ATTRIBUTES:
        torch.testing.assert_close(a[k], b[k])
    path.with_suffix(".json").unlink()  # the config also lives in the safetensors metadata
    assert SemanticClassifier.load(path).predict(x) == clf.predict(x)
    assert train_classifier(cache=path).predict(x) == clf.predict(x)  # an existing cache is loaded


def test_background_is_measured_not_learned():
    """Every named background is read back from flat frames with an object, codec-like noise and a slight colour
    cast, whatever the object."""
    g = torch.Generator().manual_seed(0)
    names = list(BACKGROUNDS)
    clips = []
    for k, name in enumerate(names):
        v = torch.tensor(BACKGROUNDS[name], dtype=torch.float32).view(1, 3, 1, 1).expand(6, 3, 64, 64) / 255.0
        v = v.clone()
        v[:, :, 20:40, 10 + k:30 + k] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # an object, not the border
        v = (v * 0.97 + 0.01 + 0.02 * torch.randn(v.shape, generator=g)).clamp(0, 1)
        clips.append(v)
    assert background_of(torch.stack(clips)) == names
    # restricted vocabulary: the nearest of the names given
    assert background_of(torch.stack(clips[:2]), names=["white", "brown"]) == ["brown", "brown"]


def test_a_clip_with_no_object_reads_as_none(clf):
    """An empty generated clip (flat background, decoder noise) has no shape, colour or motion: the evaluator must
    not read them off the noise (the relative foreground threshold alone would), so it scores 0 on those; a faint
    but real object (the least contrast of rendered clips) is still read."""
    from modelgrow.synthetic.semantic import MIN_OBJECT_CONTRAST, NO_OBJECT, object_contrast

    g = np.random.default_rng(0)
    specs = sample_specs("A", 6, seed=7)
    rendered = np.stack([render_clip(s, 4, 32, 32) for s in specs])
    empty = np.stack([np.broadcast_to(np.array(BACKGROUNDS[s.background], np.uint8), rendered.shape[1:]) for s in specs])
    empty = np.clip(empty + g.normal(0, 2.0, empty.shape), 0, 255).astype(np.uint8)
    assert object_contrast(prepare_videos(empty)).max() < MIN_OBJECT_CONTRAST / 4
    res = clf.score(empty, [s.attributes for s in specs])
    assert res["shape"] == res["color"] == res["direction"] == 0.0 and res["background"] == 1.0
    assert all(p[a] == NO_OBJECT for p in res["predictions"] for a in SCORED_ATTRIBUTES)
    faint = rendered.astype(np.float32)  # the object pulled towards its background until its contrast is ~0.3
    bg = empty.astype(np.float32).mean((1, 2, 3), keepdims=True)
    faint = (bg + 0.4 * (faint - bg)).round().clip(0, 255).astype(np.uint8)
    assert (object_contrast(prepare_videos(faint)) >= MIN_OBJECT_CONTRAST).all()
    assert NO_OBJECT not in clf.predict(faint)["shape"]
