"""Prompt merging (S / L / SL) and LLM recaptioning with a tiny random Llama: the word range is enforced
whatever the (gibberish) generations are; CSV manifests and the CLI entry point."""

import csv
import json

import pytest

from modelgrow.text.prompts import merge_prompt, merge_prompts

# ------------------------------------------------------------------------------------------------------------
# merge_prompt (no transformers needed)
# ------------------------------------------------------------------------------------------------------------


def test_merge_prompt_modes():
    s, lng = "A tent.", "A large canvas tent stands in a forest clearing."
    assert merge_prompt(s, lng, "SL") == "A tent. A large canvas tent stands in a forest clearing."
    assert merge_prompt(s, lng, "S") == s
    assert merge_prompt(s, lng, "L") == lng
    assert merge_prompt("  A tent. ", "  long  ", "sl") == "A tent. long"
    for missing in (None, "", "   ", float("nan")):
        assert merge_prompt(s, missing, "L") == s
        assert merge_prompt(s, missing, "SL") == s
        assert merge_prompt(s, missing, "S") == s
    assert merge_prompt(None, lng, "SL") == lng
    assert merge_prompts([s, "b"], [lng, None], "SL") == [f"{s} {lng}", "b"]
    assert merge_prompts([s], None, "L") == [s]


@pytest.mark.parametrize("mode", ["X", "", "LS", None, 1])
def test_merge_prompt_bad_mode(mode):
    with pytest.raises(ValueError, match="unknown prompt mode"):
        merge_prompt("a", "b", mode)


def test_merge_prompts_length_mismatch():
    with pytest.raises(ValueError):
        merge_prompts(["a", "b"], ["c"])


# ------------------------------------------------------------------------------------------------------------
# word-range policy (no model)
# ------------------------------------------------------------------------------------------------------------

pytest.importorskip("transformers")

from modelgrow.text.recaption import (  # noqa: E402
    RECAPTION_INSTRUCTION,
    Recaptioner,
    clean_generation,
    count_words,
    fit_word_range,
    main,
    recaption_instruction,
)
from modelgrow.text.tiny import LLAMA3_STYLE_CHAT_TEMPLATE, build_tiny_llama  # noqa: E402


def test_instruction_is_the_papers():
    assert RECAPTION_INSTRUCTION == (
        "Your task is to rewrite the provided prompt into a new one that offers more specific details. "
        "There are also some requirements: 1. Add specific details about objects, entities, and motions. "
        "2. Ensure the new prompt stays true to the original content. "
        "3. Keep the rewritten prompt between 35 and 128 words."
    )
    assert recaption_instruction() == RECAPTION_INSTRUCTION
    assert recaption_instruction(5, 8).endswith("between 5 and 8 words.")


def test_clean_generation():
    assert clean_generation("<|start_header_id|>assistant<|end_header_id|>\n\nReply: A  red\n ball.<|eot_id|>") == "A red ball."
    assert clean_generation('  "A dog runs."  ') == "A dog runs."
    assert clean_generation("Rewritten prompt: [INST] x </s>") == "x"


def test_fit_word_range():
    words = " ".join(f"w{i}" for i in range(20))
    assert fit_word_range(words, 5, 8) == ("w0 w1 w2 w3 w4 w5 w6 w7", "ok")
    # cut at the last sentence end that keeps >= min words
    assert fit_word_range("a b c d e f. g h i j k", 5, 8) == ("a b c d e f.", "ok")
    assert fit_word_range("a b. c d e f g h i j", 5, 8) == ("a b. c d e f g h", "ok")
    # too short: kept as it is and flagged -- never padded with repeated words
    assert fit_word_range("", 5, 8) == ("", "too_short")
    assert fit_word_range("x  y", 5, 8) == ("x y", "too_short")
    assert fit_word_range("a b c d e f", 5, 8) == ("a b c d e f", "ok")


# ------------------------------------------------------------------------------------------------------------
# Recaptioner with a tiny random Llama
# ------------------------------------------------------------------------------------------------------------

PROMPTS = ["A cat runs on the beach", "Pyramidal tent sheltering a round grill.", "dog",
           "Two people walk along a river at night"]


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rc")
    return {"chat": build_tiny_llama(str(root / "chat"), chat_template=LLAMA3_STYLE_CHAT_TEMPLATE),
            "plain": build_tiny_llama(str(root / "plain"))}


@pytest.fixture(scope="module")
def rc(llama_dirs):
    return Recaptioner(llama_dirs["chat"], max_new_tokens=48, batch_size=3, seed=0, top_p=1.0, retries=1)


def _in_range(outs, lo, hi):
    return all(lo <= count_words(o) <= hi for o in outs)


def _fitted(outs, status, lo, hi):
    """Every output is in range with status ok, or under ``lo`` words and flagged too_short."""
    assert len(outs) == len(status)
    return all((st == "ok" and lo <= count_words(o) <= hi) or (st == "too_short" and count_words(o) < lo)
               for o, st in zip(outs, status, strict=True))


def test_recaption_input_uses_template(rc, llama_dirs):
    text = rc.build_input("A   cat")
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\n" + RECAPTION_INSTRUCTION)
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\nA cat<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rc.tokenizer.padding_side == "left"
    assert not rc.model.training and all(not p.requires_grad for p in rc.model.parameters())
    plain = Recaptioner(llama_dirs["plain"], max_new_tokens=8)
    assert plain.build_input("A cat") == f"{RECAPTION_INSTRUCTION}\n\nPrompt: A cat\nReply:"


@pytest.mark.parametrize("lo, hi", [(35, 128), (5, 8)])
def test_recaption_word_range(rc, lo, hi):
    rc.min_words, rc.max_words = lo, hi
    try:
        batched = rc.recaption(PROMPTS)
        status = rc.last_status
        single = [(rc.recaption([p])[0], rc.last_status[0]) for p in PROMPTS[:2]]
    finally:
        rc.min_words, rc.max_words = 35, 128
    assert len(batched) == len(PROMPTS)
    assert _fitted(batched, status, lo, hi)
    assert _fitted([o for o, _ in single], [st for _, st in single], lo, hi)
    if hi == 8:
        assert "ok" in status  # 48 new tokens reach 5 words (and are cut to 8)
    assert all("<|" not in o and "<s>" not in o for o in batched)
    assert rc.recaption(["", "   "]) == ["", ""]


def test_recaption_too_short_is_flagged_not_padded(llama_dirs):
    r = Recaptioner(llama_dirs["plain"], max_new_tokens=4, batch_size=4, retries=1, min_words=12, max_words=20, top_p=1.0)
    a = r.recaption(PROMPTS)
    # 4 new tokens can never make 12 words: every caption is flagged and is the generation itself, not padded
    assert r.last_status == ["too_short"] * 4
    assert all(count_words(o) < 12 for o in a)
    raw = [clean_generation(g) for g in r.generate(PROMPTS)]
    assert all(count_words(o) >= count_words(g) for o, g in zip(a, raw, strict=True))  # the longest candidate
    assert not a[2].endswith("dog dog")
    assert a == r.recaption(PROMPTS)  # greedy first pass, seeded retries


def test_recaption_csv(rc, tmp_path):
    src = tmp_path / "m.csv"
    rows = [{"path": f"v{i}.mp4", "caption": p, "num_frames": str(10 + i)} for i, p in enumerate(PROMPTS + [PROMPTS[0]])]
    with open(src, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "num_frames"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out" / "m2.csv"
    assert rc.recaption_csv(str(src), str(out)) == 5
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        got = list(reader)
        assert reader.fieldnames == ["path", "caption", "num_frames", "long_caption", "long_caption_status"]
    assert [{k: r[k] for k in ("path", "caption", "num_frames")} for r in got] == rows
    assert _fitted([r["long_caption"] for r in got], [r["long_caption_status"] for r in got], 35, 128)
    assert got[0]["long_caption"] == got[4]["long_caption"]  # same caption, recaptioned once
    with pytest.raises(ValueError, match="overwrite"):
        rc.recaption_csv(str(out), str(tmp_path / "m3.csv"))
    assert not (tmp_path / "m3.csv").exists()
    rc.recaption_csv(str(out), str(out), overwrite=True)  # in place
    with open(out, newline="") as f:
        again = list(csv.DictReader(f))
    assert len(again) == 5 and list(again[0]) == ["path", "caption", "num_frames", "long_caption", "long_caption_status"]
    with pytest.raises(KeyError, match="text"):
        rc.recaption_csv(str(src), str(tmp_path / "m4.csv"), caption_col="text")


def test_recaption_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories only"):
        Recaptioner(str(tmp_path / "nope"))


def test_main_prompts_file_and_csv(llama_dirs, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("A cat runs on the beach\n\n  dog  \n")
    common = ["--model", llama_dirs["chat"], "--recaption.max_new_tokens", "24", "--recaption.batch_size", "2",
              "--recaption.top_p", "1.0", "--recaption.retries", "1"]
    assert main([*common, "--prompts-file", str(pf), "--out", str(tmp_path / "o.jsonl"), "--recaption.min_words", "6",
                 "--recaption.max_words", "10"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["short"] for r in recs] == ["A cat runs on the beach", "dog"]
    assert all(count_words(r["long"]) <= 10 for r in recs)
    assert all(r["prompt"] == f"{r['short']} {r['long']}" for r in recs)  # default mode SL

    with pytest.warns(FutureWarning, match=r"--mode is deprecated: use --recaption\.prompt_mode L"):  # old flags work
        assert main([*common, "--prompts-file", str(pf), "--out", str(tmp_path / "o.txt"), "--mode", "L",
                     "--min-words", "6", "--max-words", "10"]) == 0
    lines = (tmp_path / "o.txt").read_text().splitlines()
    assert lines == [r["long"] for r in recs]  # greedy: the same long prompts

    src = tmp_path / "m.csv"
    src.write_text("path,caption\na.mp4,A cat runs\nb.mp4,dog\n")
    assert main([*common, "--csv", str(src), "--out", str(tmp_path / "m_out.csv")]) == 0
    got = list(csv.DictReader(open(tmp_path / "m_out.csv", newline="")))
    assert [r["path"] for r in got] == ["a.mp4", "b.mp4"]
    assert _fitted([r["long_caption"] for r in got], [r["long_caption_status"] for r in got], 35, 128)
    with pytest.raises(ValueError, match="overwrite"):
        main([*common, "--csv", str(tmp_path / "m_out.csv"), "--out", str(tmp_path / "m_out.csv")])
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x.txt")])  # needs --prompts-file or --csv
