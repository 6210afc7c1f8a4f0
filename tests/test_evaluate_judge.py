"""The MLLM judge dimension of `modelgrow evaluate`: the rating parser, and the plumbing end to end through the CLI
with a tiny random-weight LLaVA (real LlavaProcessor / CLIPImageProcessor / Llama tokenizer)."""

import json
import shutil

import numpy as np
import pytest
import torch

from modelgrow.evaluate.judge import JUDGE_INSTRUCTION, MLLMJudge, normalise, parse_score

# ---------------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("reply, rating", [
    ("4", 4.0), (" 5.", 5.0), ("Score: 3", 3.0), ("I would rate it 2.5 overall", 2.5), ("1", 1.0),
    ("4/5", 4.0), ("3 out of 5", 3.0), ("On a scale of 1 to 5, I give it a 4.", 4.0), ("1-5: 2", 2.0),
    ("The video shows 12 frames; rating: 3", 3.0),  # several numbers: the first in range
    ("0 objects match... I'd say 2, maybe 3", 2.0),
    ("Rating: 4\nExplanation: the 2 squares are red", 4.0),
])
def test_parse_score_in_range(reply, rating):
    assert parse_score(reply) == (rating, None)


@pytest.mark.parametrize("reply, reason", [
    ("", "no number"), ("The video matches well.", "no number"), ("four", "no number"), ("v2x", "no number"),
    ("10", "no number in [1, 5] (found 10)"), ("0", "no number in [1, 5] (found 0)"),
    ("-3", "no number in [1, 5] (found -3)"), ("7 and 9.5", "no number in [1, 5] (found 7, 9.5)"),
    ("5.5", "no number in [1, 5] (found 5.5)"),
])
def test_parse_score_failures(reply, reason):
    score, why = parse_score(reply)
    assert score is None and why.startswith(reason)


def test_parse_score_other_range_and_normalise():
    assert parse_score("I give 85/100", 0, 100) == (85.0, None)
    assert parse_score("150, no: 0", 0, 100) == (0.0, None)
    assert parse_score(None)[0] is None
    assert [normalise(r) for r in (1, 3, 5)] == [0.0, 0.5, 1.0]
    assert "{prompt}" in JUDGE_INSTRUCTION and "1 to 5" in JUDGE_INSTRUCTION


class _Scripted:
    """A VLM stand-in answering from a script (no model): only for the report's aggregation."""

    num_frames, batch_size = 2, 2

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def generate(self, videos, texts):
        self.calls.append((len(videos), [v.shape[0] for v in videos], list(texts)))
        return [self.answers.pop(0) for _ in videos]


def test_report_aggregates_scores_and_failures(tmp_path):
    pytest.importorskip("cv2")
    from modelgrow.evaluate.run import evaluate_videos, write_report
    from modelgrow.video_io import write_video

    rng = np.random.default_rng(0)
    items = []
    for i, prompt in enumerate(["a red square", "a blue disc", None, "a green star"]):
        write_video(tmp_path / f"{i}.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=8)
        items.append({"video": str(tmp_path / f"{i}.mp4"), "prompt": prompt})
    s = _Scripted(["Rating: 4/5", "I cannot tell.", "2"])
    res = evaluate_videos(items, progress=False, judge=MLLMJudge(vlm=s))
    assert [c[1] for c in s.calls] == [[2, 2], [2]]  # batches of 2 videos, 2 sampled frames each
    assert s.calls[0][2][0] == JUDGE_INSTRUCTION.format(prompt="a red square")
    v = res["videos"]
    assert [r["mllm_score"] for r in v] == [0.75, None, None, 0.25]
    assert v[1]["mllm_reply"] == "I cannot tell." and v[1]["mllm_error"] == "no number in the reply"
    assert v[2]["mllm_error"] == "no prompt" and "mllm_reply" not in v[2]
    assert res["summary"]["mllm_score"] == pytest.approx(0.5)
    j = res["judge"]
    assert (j["scored"], j["failed"], j["no_prompt"]) == (2, 1, 1)
    assert j["failures"] == [{"video": "1.mp4", "error": "no number in the reply", "reply": "I cannot tell."}]
    _, md = write_report(res, tmp_path / "rep")
    md = md.read_text()
    assert "| mllm_score | 0.5000 |" in md and "2 scored, 1 failed (no rating in the reply), 1 without a prompt" in md
    assert "- 1.mp4: no number in the reply; reply: `I cannot tell.`" in md


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("av")
    pytest.importorskip("cv2")
    from modelgrow.text.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("judge")
    rnd = build_tiny_llava(str(root / "random"))
    # the same model whose generation config suppresses every token but "4": a judge that answers "4"
    four = str(root / "four")
    shutil.copytree(rnd, four)
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(four, local_files_only=True)
    keep = tok.convert_tokens_to_ids("4")
    gc = GenerationConfig.from_pretrained(four, local_files_only=True)
    gc.suppress_tokens = [i for i in range(len(tok)) if i != keep]
    gc.save_pretrained(four)
    return {"random": rnd, "four": four}


@pytest.fixture()
def sample_folder(tmp_path):
    from modelgrow.video_io import write_video

    out = tmp_path / "samples"
    out.mkdir()
    rng = np.random.default_rng(1)
    recs = []
    for i, n in enumerate([8, 2, 6]):  # the 2-frame video shows the judge fewer frames than asked for
        name = f"{i:03d}.mp4"
        write_video(out / name, rng.integers(0, 256, (n, 40, 48, 3), dtype=np.uint8), fps=8)
        recs.append({"prompt": f"a red square moving left {i}", "video": name})
    write_video(out / "003.mp4", rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8), fps=8)
    recs.append({"prompt": "", "video": "003.mp4"})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def _spy_prepare(monkeypatch):
    from modelgrow.text.vlm import VLM

    seen, real = [], VLM.prepare

    def prepare(self, videos, texts):
        batch = real(self, videos, texts)
        image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        ref = self.processor.image_processor(images=[f for v in videos for f in v], return_tensors="pt")
        assert torch.equal(batch["pixel_values"], ref["pixel_values"])  # every sampled frame, in order
        seen.append({"frames": [np.array(v) for v in videos], "texts": list(texts),
                     "image_tokens": (batch["input_ids"] == image_id).sum(1).tolist(),
                     "pixel_values": tuple(batch["pixel_values"].shape)})
        return batch

    monkeypatch.setattr(VLM, "prepare", prepare)
    return seen


def test_judge_cli_random_llava(llava_dirs, sample_folder, tmp_path, monkeypatch):
    from modelgrow.cli import main
    from modelgrow.evaluate.run import load_video
    from modelgrow.text.vlm import sample_indices

    seen = _spy_prepare(monkeypatch)
    rep = tmp_path / "eval"
    assert main(["evaluate", "--videos", str(sample_folder), "--out", str(rep), "--judge", llava_dirs["random"],
                 "--judge-frames", "3", "--judge-batch-size", "2", "--judge-max-new-tokens", "8",
                 "--no-progress"]) == 0
    # batches of 2 then 1 (the prompt-less video is not judged); 16 image tokens per frame, 3 frames (2 for 001)
    assert [s["image_tokens"] for s in seen] == [[48, 32], [48]]
    assert [s["pixel_values"] for s in seen] == [(5, 3, 32, 32), (3, 3, 32, 32)]
    frames = [f for s in seen for f in s["frames"]]
    for name, f in zip(["000", "001", "002"], frames, strict=True):  # exactly the sampled decoded frames
        full, _ = load_video(str(sample_folder / f"{name}.mp4"))
        np.testing.assert_array_equal(f, full[sample_indices(len(full), 3)])
    assert seen[0]["texts"][0] == JUDGE_INSTRUCTION.format(prompt="a red square moving left 0")
    res = json.loads((rep / "evaluation.json").read_text())
    assert res["dimensions"][-1] == "mllm_score" and res["models"]["judge"] == llava_dirs["random"]
    judged = res["videos"][:3]
    for r in judged:  # every judged video: a parsed score or a failure, with its raw reply
        rating, err = parse_score(r["mllm_reply"])
        if err is None:
            assert r["mllm_rating"] == rating and r["mllm_score"] == normalise(rating)
        else:
            assert r["mllm_score"] is None and r["mllm_error"] == err
    assert res["videos"][3]["mllm_error"] == "no prompt"
    j = res["judge"]
    assert j["scored"] + j["failed"] == 3 and j["no_prompt"] == 1 and len(j["failures"]) == j["failed"]
    assert f"{j['scored']} scored, {j['failed']} failed" in (rep / "evaluation.md").read_text()


def test_judge_cli_scores_a_rating(llava_dirs, sample_folder, tmp_path, monkeypatch):
    from modelgrow.cli import main

    seen = _spy_prepare(monkeypatch)
    rep = tmp_path / "eval"
    assert main(["evaluate", "--videos", str(sample_folder), "--out", str(rep), "--judge", llava_dirs["four"],
                 "--judge-frames", "2", "--judge-batch-size", "4", "--judge-max-new-tokens", "3",
                 "--no-progress"]) == 0
    assert [s["image_tokens"] for s in seen] == [[32, 32, 32]]
    res = json.loads((rep / "evaluation.json").read_text())
    assert [r.get("mllm_reply") for r in res["videos"]] == ["444", "444", "444", None]
    assert [r["mllm_score"] for r in res["videos"]] == [None, None, None, None]  # "444" is out of range
    assert res["judge"]["failed"] == 3
    # one new token: the reply "4" is a rating of 4 -> 0.75 for every judged video
    assert main(["evaluate", "--videos", str(sample_folder), "--out", str(rep), "--judge", llava_dirs["four"],
                 "--judge-frames", "2", "--judge-max-new-tokens", "1", "--no-progress"]) == 0
    res = json.loads((rep / "evaluation.json").read_text())
    assert [r["mllm_score"] for r in res["videos"]] == [0.75, 0.75, 0.75, None]
    assert res["summary"]["mllm_score"] == 0.75 and (res["judge"]["scored"], res["judge"]["failed"]) == (3, 0)
    assert "| mllm_score | 0.7500 |" in (rep / "evaluation.md").read_text()
