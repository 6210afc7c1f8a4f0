"""Video recaptioning with a tiny random-weight LLaVA (real LlavaProcessor / CLIPImageProcessor / Llama
tokenizer): frames -> processor -> generate -> word-range policy -> resumable CSV, end to end."""

import csv

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")

from modelgrow.text.video_recaption import VIDEO_CAPTION_INSTRUCTION, VideoRecaptioner  # noqa: E402
from modelgrow.text.vlm import VLM, read_frames, sample_indices  # noqa: E402
from modelgrow.video_io import write_video  # noqa: E402


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from modelgrow.text.tiny import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("vlm") / "llava"))


@pytest.fixture(scope="module")
def vlm(llava_dir):
    return VLM(llava_dir, num_frames=3, max_new_tokens=12, batch_size=2)


def _video(n, seed, h=40, w=48):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_sample_indices():
    assert sample_indices(16, 4) == [0, 5, 10, 15]
    assert sample_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError):
        sample_indices(0, 4)


def test_instruction_is_fig9():
    assert VIDEO_CAPTION_INSTRUCTION.startswith("Please generate a detailed video caption that describes the scene")
    assert VIDEO_CAPTION_INSTRUCTION.endswith("understand the scene and the dynamics and actions fully.")


def test_vlm_inputs_carry_every_frame(vlm):
    assert vlm.frames_as == "images"  # LlavaProcessor has no video processor: frames are a multi-image message
    prompt = vlm.build_prompt(3, "Describe.")
    assert prompt == "USER: <image>\n<image>\n<image>\nDescribe.\nASSISTANT:"
    batch = vlm.prepare([_video(3, 0), _video(2, 1)], ["Describe.", "Describe."])
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    image_id = vlm.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [3 * 16, 2 * 16]  # 16 tokens per frame
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding
    a = vlm.generate([_video(3, 0), _video(3, 1)], ["Describe."] * 2)
    assert a == vlm.generate([_video(3, 0), _video(3, 1)], ["Describe."] * 2)  # greedy: deterministic
    assert a[0] == vlm.generate([_video(3, 0)], ["Describe."])[0]  # batching does not change the result
    assert a[0] != vlm.generate([_video(3, 5)], ["Describe."])[0]  # the frames reach the model


class _Scripted:
    """A VLM stand-in that answers from a script: only for the retry/flag policy (no model involved)."""

    batch_size, num_frames, seed = 2, 2, 0

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, videos, texts, do_sample=False, seed=None):
        self.calls.append((len(videos), do_sample, seed))
        return [self.answers[(len(self.calls) - 1) % len(self.answers)] for _ in videos]


def test_policy_regenerates_then_flags_never_pads():
    s = _Scripted(["one two", "one two three four", "a"])
    out = VideoRecaptioner(s, min_words=5, max_words=8, retries=2).caption([_video(2, 0)])
    assert out == [("one two three four", "too_short")]  # the longest candidate, as it is
    assert s.calls == [(1, False, None), (1, True, 1000), (1, True, 2000)]
    s = _Scripted(["w " * 3, "a b c d e f. g h i j k"])
    assert VideoRecaptioner(s, min_words=5, max_words=8, retries=2).caption([_video(2, 0)]) == [("a b c d e f.", "ok")]


def test_recaption_cli_end_to_end_and_resume(llava_dir, tmp_path, capsys):
    from modelgrow.cli import main as cli

    for i in range(3):
        write_video(tmp_path / f"v{i}.mp4", _video(6, i, 48, 48), fps=8)
    from PIL import Image

    Image.fromarray(_video(1, 9, 40, 40)[0]).save(tmp_path / "img.png")
    (tmp_path / "bad.mp4").write_bytes(b"broken")
    man = tmp_path / "m.csv"
    man.write_text("path,caption,extra\nv0.mp4,a,x0\nbad.mp4,b,x1\nv1.mp4,c,x2\nimg.png,d,x3\nv2.mp4,e,x4\n")
    out = tmp_path / "out" / "cap.csv"
    args = ["recaption", "--videos", str(man), "--vlm", llava_dir, "--out", str(out), "--recaption.num_frames", "3",
            "--recaption.batch_size", "2", "--recaption.max_new_tokens", "16", "--recaption.min_words", "2",
            "--recaption.max_words", "6", "--recaption.retries", "1", "--no-progress"]
    assert cli(args) == 1  # one row failed
    err = capsys.readouterr().err
    assert "1 failed" in err and "bad.mp4" in err
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == ["path", "caption", "extra", "long_caption", "long_caption_status"]
    assert [r["path"] for r in rows] == ["v0.mp4", "bad.mp4", "v1.mp4", "img.png", "v2.mp4"]
    assert [r["extra"] for r in rows] == ["x0", "x1", "x2", "x3", "x4"]
    assert rows[1]["long_caption_status"].startswith("failed: DecodeError")
    for r in rows[:1] + rows[2:]:
        n = len(r["long_caption"].split())
        assert (r["long_caption_status"] == "ok" and 2 <= n <= 6) or (r["long_caption_status"] == "too_short" and n < 2)
    assert not (tmp_path / "out" / "cap.csv.partial.jsonl").exists()
    # resume: the broken file is fixed; only that row is processed, the others are kept verbatim
    write_video(tmp_path / "bad.mp4", _video(6, 7, 48, 48), fps=8)
    assert cli(args) == 0
    assert "(4 done before)" in capsys.readouterr().err
    again = list(csv.DictReader(open(out, newline="")))
    assert [r["long_caption"] for i, r in enumerate(again) if i != 1] == [r["long_caption"] for i, r in enumerate(rows) if i != 1]
    assert again[1]["long_caption_status"] in ("ok", "too_short")


def test_resume_from_journal(llava_dir, tmp_path):
    """An interrupted run leaves the journal: the next run takes its rows and does the rest."""
    import json

    from modelgrow.text.video_recaption import recaption_manifest

    for i in range(2):
        write_video(tmp_path / f"v{i}.mp4", _video(4, i, 32, 32), fps=8)
    man = tmp_path / "m.csv"
    man.write_text("path,caption\nv0.mp4,a\nv1.mp4,b\n")
    out = tmp_path / "cap.csv"
    (tmp_path / "cap.csv.partial.jsonl").write_text(
        json.dumps({"row": 0, "path": "v0.mp4", "caption": "from the journal", "status": "ok"}) + "\n{broken line")
    s = _Scripted(["one two three four five"])
    res = recaption_manifest(VideoRecaptioner(s, min_words=2, max_words=8), str(man), str(out), progress=False)
    assert res["skipped"] == 1 and res["ok"] == 2 and s.calls == [(1, False, None)]
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["long_caption"] for r in rows] == ["from the journal", "one two three four five"]


def test_read_frames(tmp_path):
    write_video(tmp_path / "v.mp4", _video(10, 0, 32, 32), fps=8)
    assert read_frames(str(tmp_path / "v.mp4"), 4).shape == (4, 32, 32, 3)
