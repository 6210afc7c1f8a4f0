"""modelgrow evaluate: exact weight-free dimensions on constructed videos, feature dimensions with tiny random
DINOv2 / CLIP models, and the CLI on a `modelgrow sample`-style folder."""

import json

import numpy as np
import pytest
import torch

from modelgrow.evaluate import classical
from modelgrow.evaluate.features import clip_score_from_features, consistency, consistency_terms

cv2 = pytest.importorskip("cv2")


def texture(h, w, seed=0):
    r = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    r = cv2.GaussianBlur(r, (0, 0), 2.0)
    return ((r - r.min()) / (r.max() - r.min()) * 255).round().astype(np.uint8)


def translating(shifts, H=128, W=128, seed=0):
    """A smooth texture moving right by shifts[t] pixels between frame t and t+1."""
    pos = np.concatenate([[0], np.cumsum(shifts)]).astype(int)
    big = texture(H, W + pos[-1] + 8, seed)
    start = pos[-1] + 4
    return np.stack([big[:, start - p : start - p + W] for p in pos])


# ---------------------------------------------------------------------------------------------------- flickering
def test_temporal_flickering_exact():
    still = np.full((5, 8, 8, 3), 77, np.uint8)
    assert classical.temporal_flickering(still) == 1.0
    alt = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)] * 2)
    assert classical.temporal_flickering(alt) == 0.0
    v = np.zeros((3, 2, 2, 3), np.uint8)
    v[1, 0, 0, 0] = 120  # pair 0: |diff| sum 120 over 12 values -> 10; pair 1: the same -> 10
    assert classical.temporal_flickering(v) == pytest.approx((255 - 10) / 255)
    rnd = np.random.default_rng(0).integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    ref = np.mean([np.abs(rnd[i + 1].astype(float) - rnd[i]).mean() for i in range(5)])
    assert classical.temporal_flickering(rnd) == pytest.approx((255 - ref) / 255, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        classical.temporal_flickering(still[:1])
    with pytest.raises(ValueError, match="uint8"):
        classical.temporal_flickering(still.astype(np.float32))


# ---------------------------------------------------------------------------------------------------- flow
def test_dynamic_degree_params_vbench_rule():
    p = classical.dynamic_degree_params(16, 256, 256, 8)
    assert p == {"interval": 1, "kept_frames": 16, "thres": 6.0, "count_num": 4}
    p = classical.dynamic_degree_params(32, 128, 200, 24)  # every 3rd frame, 11 kept
    assert p["interval"] == 3 and p["kept_frames"] == 11 and p["thres"] == 3.0 and p["count_num"] == 3
    assert classical.dynamic_degree_params(16, 256, 256, 4)["thres"] == 12.0  # low fps: factor 8 / fps


def test_flow_peak_magnitude_is_top_5_percent_mean():
    flow = np.zeros((100, 100, 2), np.float32)
    flow[:5, :, 0] = 6.0  # 500 px = 5%: |(6, 8)| = 10
    flow[:5, :, 1] = 8.0
    flow[50, 50] = (0.0, 1.0)
    assert classical.flow_peak_magnitude(flow) == pytest.approx(10.0)
    assert classical.flow_peak_magnitude(flow, top=0.1) == pytest.approx((500 * 10 + 1) / 1000)
    assert classical.flow_peak_magnitude(flow[:1, :1]) == pytest.approx(10.0)  # at least one value


@pytest.mark.parametrize("shift", [0, 2, 6])
def test_flow_magnitude_matches_translation(shift):
    v = translating([shift] * 7)
    d = classical.dynamic_degree(v, fps=8)
    assert np.allclose(d["magnitudes"], shift, atol=0.15 + 0.1 * shift)
    assert d["thres"] == 3.0 and d["count_num"] == 2
    assert d["dynamic"] is (shift > 3)


def test_dynamic_degree_counts_pairs():
    # 8 frames at 128 px: threshold 3 px, count_num 2 -> one fast pair is not enough, two are
    assert classical.dynamic_degree(translating([0, 0, 6, 0, 0, 0, 0]), 8)["dynamic"] is False
    assert classical.dynamic_degree(translating([0, 0, 6, 0, 6, 0, 0]), 8)["dynamic"] is True


def test_motion_smoothness_orders_smooth_above_jerky():
    smooth = classical.motion_smoothness(translating([4] * 8))
    jerky = classical.motion_smoothness(translating([0, 8] * 4))
    still = classical.motion_smoothness(translating([0] * 8))
    assert still == pytest.approx(1.0, abs=1e-4)
    assert smooth > 0.99 and jerky < smooth - 0.01


# ---------------------------------------------------------------------------------------------------- features
def test_consistency_formula():
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    # t=1: prev cos .6, first .6 -> .6; t=2: prev .8, first 0 -> .4; t=3: prev 0, first max(0, -1) = 0 -> 0
    assert consistency_terms(e * 3).tolist() == pytest.approx([0.6, 0.4, 0.0])
    assert consistency(e) == pytest.approx(1.0 / 3)
    assert consistency(e[:1]) == 1.0
    assert clip_score_from_features(e, torch.tensor([0.0, 2.0])) == pytest.approx((0 + 0.8 + 1 + 0) / 4)


@pytest.fixture(scope="module")
def feature_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    from modelgrow.evaluate.tiny import build_tiny_clip, build_tiny_dinov2

    root = tmp_path_factory.mktemp("feat")
    return {"clip": build_tiny_clip(str(root / "clip")), "dino": build_tiny_dinov2(str(root / "dino"))}


def test_feature_models(feature_dirs):
    from transformers import CLIPModel

    from modelgrow.evaluate.features import FeatureModel

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    still = np.repeat(noise[:1], 4, 0)
    for kind in ("dino", "clip"):
        m = FeatureModel(feature_dirs[kind])
        assert m.is_clip == (kind == "clip")
        assert consistency(m.image_features(still)) == pytest.approx(1.0, abs=1e-6)
        assert consistency(m.image_features(noise)) < 0.9999
    from transformers import Dinov2Model

    dino = FeatureModel(feature_dirs["dino"])
    ref_dino = Dinov2Model.from_pretrained(feature_dirs["dino"], local_files_only=True).eval()
    with torch.no_grad():  # the CLS token after the final layer norm, as DINO's own forward returns
        cls = ref_dino(pixel_values=dino.processor(images=list(noise), return_tensors="pt")["pixel_values"]
                       ).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.image_features(noise), cls)
    clip = FeatureModel(feature_dirs["clip"])
    # the plumbing computes exactly CLIP's own projected features of the processor's pixels / tokens
    ref = CLIPModel.from_pretrained(feature_dirs["clip"], local_files_only=True).eval()
    px = clip.processor(images=list(noise), return_tensors="pt")["pixel_values"]
    assert px.shape == (4, 3, 32, 32)
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=px)
        ref_img = ref_img if isinstance(ref_img, torch.Tensor) else ref_img.pooler_output
        ids = clip.tokenizer(["a red square"], return_tensors="pt")
        ref_txt = ref.get_text_features(**ids)
        ref_txt = ref_txt if isinstance(ref_txt, torch.Tensor) else ref_txt.pooler_output
    torch.testing.assert_close(clip.image_features(noise), ref_img)
    torch.testing.assert_close(clip.text_features(["a red square"]), ref_txt)
    with pytest.raises(ValueError, match="not a CLIP"):
        FeatureModel(feature_dirs["dino"]).text_features(["x"])


# ---------------------------------------------------------------------------------------------------- CLI
def test_evaluate_cli_on_sample_folder(feature_dirs, tmp_path, capsys):
    from modelgrow.cli import main
    from modelgrow.video_io import write_video

    out = tmp_path / "samples"
    out.mkdir()
    vids = {"000-still.mp4": translating([0] * 7, 64, 64), "001-fast.mp4": translating([5] * 7, 64, 64)}
    recs = []
    for i, (name, v) in enumerate(vids.items()):
        write_video(out / name, v, fps=8)
        recs.append({"prompt": f"prompt {i}", "video": name})
    (out / "002-broken.mp4").write_bytes(b"not a video")
    recs.append({"prompt": "broken", "video": "002-broken.mp4"})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = tmp_path / "eval"
    rc = main(["evaluate", "--videos", str(out), "--out", str(rep), "--dino", feature_dirs["dino"],
               "--clip", feature_dirs["clip"], "--no-progress"])
    assert rc == 0
    res = json.loads((rep / "evaluation.json").read_text())
    assert [r["video"] for r in res["videos"]] == ["000-still.mp4", "001-fast.mp4"]
    assert [r["prompt"] for r in res["videos"]] == ["prompt 0", "prompt 1"]
    assert len(res["failures"]) == 1 and "002-broken" in res["failures"][0]["video"]
    still, fast = res["videos"]
    assert still["dynamic_degree"] == 0.0 and fast["dynamic_degree"] == 1.0  # 64 px: threshold 1.5 px
    assert still["temporal_flickering"] > 0.99 > fast["temporal_flickering"]
    assert still["subject_consistency"] == pytest.approx(1.0, abs=1e-3)
    for d in ("subject_consistency", "background_consistency", "clip_score"):
        assert 0.0 <= fast[d] <= 1.0
    assert res["summary"]["dynamic_degree"] == 0.5
    assert res["summary"]["temporal_flickering"] == pytest.approx(
        (still["temporal_flickering"] + fast["temporal_flickering"]) / 2)
    md = (rep / "evaluation.md").read_text()
    assert "| dynamic_degree | 0.5000 |" in md and "| 001-fast.mp4 | prompt 1 |" in md and "002-broken" in md
    # a folder without samples.jsonl, prompts from a VBench-style JSON map; no feature models
    (out / "samples.jsonl").unlink()
    (out / "002-broken.mp4").unlink()
    (tmp_path / "p.json").write_text(json.dumps({"001-fast.mp4": "fast"}))
    assert main(["evaluate", "--videos", str(out), "--out", str(rep), "--prompts", str(tmp_path / "p.json"),
                 "--no-progress"]) == 0
    res = json.loads((rep / "evaluation.json").read_text())
    assert [r["prompt"] for r in res["videos"]] == [None, "fast"]
    assert res["dimensions"] == ["temporal_flickering", "motion_smoothness_flow", "dynamic_degree"]
    assert main(["evaluate", "--videos", str(tmp_path / "nope"), "--out", str(rep)]) == 2
