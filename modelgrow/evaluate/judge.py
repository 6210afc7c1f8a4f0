"""The MLLM judge score: a local vision-language model rates how well each video follows its prompt.

The paper (Table 1 and 3, "MLLM Score") reports "the semantic score reasoned by LLaVA-v1.6-34b" on the
T2V-CompBench consistent-attribute prompts, a number in [0, 1] (e.g. 0.6737), and gives **no judge prompt**.
The prompt below is therefore ours, not the paper's. T2V-CompBench's own LLaVA protocol (a 3x2 grid of 6 frames,
a describe-then-multiple-choice dialogue over per-prompt attribute phrases from its metadata, a 1-5 rating
normalised as ``(rating - 1) / 4``) needs that metadata; here any prompt works, so the model is asked directly for
a 1-5 rating, normalised the same way, so the score lives on the paper's [0, 1] scale.

Judge instruction (``JUDGE_INSTRUCTION``; ``{prompt}`` is the video's prompt)::

    These are frames sampled in order from a video generated from the text prompt: "{prompt}"
    How well does the video match the prompt? Consider the objects and their attributes (such as colour, shape
    and number), their actions and motion, and the setting described in the prompt.
    Rate the match on a scale from 1 (does not match at all) to 5 (matches the prompt completely).
    Answer with a single number from 1 to 5.

Input: ``num_frames`` (``--judge-frames``, default 8) evenly spaced frames of each decoded video
(``modelgrow.text.vlm.sample_indices``), given to the model with the same loader as video recaptioning
(``modelgrow.text.vlm.VLM``: a multi-image message, or a video entry for models with a video processor), followed
by the instruction; greedy generation, ``batch_size`` videos per ``generate`` call.

Parsing (``parse_score``): echoes of the scale ("1 to 5", "1-5", "/5", "out of 5") are removed, then the first
number (integer or decimal) in [1, 5] is the rating. A reply with no number, or with no number in range, is a
failure for that video: it is recorded with the raw reply and the reason, counted in the report, and left out of
the mean -- never a crash. Videos without a prompt are not judged (counted separately).

Per video: ``mllm_score`` (normalised, [0, 1]), ``mllm_rating`` (the parsed 1-5 number), ``mllm_reply`` (raw
text) and ``mllm_error`` for failures; the summary's ``mllm_score`` is the mean over the parsed videos.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["JUDGE_INSTRUCTION", "SCORE_MIN", "SCORE_MAX", "parse_score", "normalise", "MLLMJudge"]

SCORE_MIN, SCORE_MAX = 1, 5

JUDGE_INSTRUCTION = (
    'These are frames sampled in order from a video generated from the text prompt: "{prompt}"\n'
    "How well does the video match the prompt? Consider the objects and their attributes (such as colour, shape "
    "and number), their actions and motion, and the setting described in the prompt.\n"
    "Rate the match on a scale from 1 (does not match at all) to 5 (matches the prompt completely).\n"
    "Answer with a single number from 1 to 5."
)

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w]|\.\d)")


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_score(text: str, lo: float = SCORE_MIN, hi: float = SCORE_MAX) -> tuple[float | None, str | None]:
    """``(rating, None)``: the first number in ``[lo, hi]`` of a reply, after removing echoes of the scale
    ("1 to 5", "1-5", "/5", "out of 5"); ``(None, reason)`` when the reply has no number or none in range."""
    if not isinstance(text, str):
        return None, f"not text: {type(text).__name__}"
    a, b = re.escape(_fmt_num(lo)), re.escape(_fmt_num(hi))
    t = re.sub(rf"(?<![\w.]){a}\s*(?:-|–|—|to)\s*{b}(?![\w]|\.\d)", " ", text)
    t = re.sub(rf"(?:/|\bout\s+of)\s*{b}(?![\w]|\.\d)", " ", t)
    nums = [float(m) for m in _NUMBER.findall(t)]
    if not nums:
        return None, "no number in the reply"
    for x in nums:
        if lo <= x <= hi:
            return x, None
    return None, f"no number in [{_fmt_num(lo)}, {_fmt_num(hi)}] (found {', '.join(_fmt_num(x) for x in nums[:5])})"


def normalise(rating: float, lo: float = SCORE_MIN, hi: float = SCORE_MAX) -> float:
    """A rating in ``[lo, hi]`` on the paper's [0, 1] scale: ``(rating - lo) / (hi - lo)``."""
    return float((rating - lo) / (hi - lo))


class MLLMJudge:
    """Rates (frames, prompt) pairs with a local VLM (``modelgrow.text.vlm.VLM``; see the module docstring)."""

    def __init__(self, path: str | None = None, device=None, num_frames: int = 8, batch_size: int = 4,
                 max_new_tokens: int = 16, frames_as: str = "auto", instruction: str = JUDGE_INSTRUCTION,
                 vlm=None) -> None:
        if vlm is None:
            from ..text.vlm import VLM

            vlm = VLM(path, device=device, num_frames=num_frames, frames_as=frames_as,
                      max_new_tokens=max_new_tokens, batch_size=batch_size)
        if "{prompt}" not in instruction:
            raise ValueError("the judge instruction needs a {prompt} placeholder")
        self.vlm, self.instruction, self.path = vlm, instruction, path
        self.num_frames, self.batch_size = int(vlm.num_frames), int(vlm.batch_size)

    def sample(self, frames: np.ndarray) -> np.ndarray:
        """The ``num_frames`` evenly spaced frames the judge sees."""
        from ..text.vlm import sample_indices

        return frames[sample_indices(len(frames), self.num_frames)]

    def rate(self, videos: Sequence[np.ndarray], prompts: Sequence[str]) -> list[dict]:
        """One record per video: ``mllm_reply``, and ``mllm_rating`` + ``mllm_score`` or ``mllm_error``."""
        texts = [self.instruction.format(prompt=p) for p in prompts]
        replies = self.vlm.generate([self.sample(v) for v in videos], texts)
        out = []
        for reply in replies:
            rating, err = parse_score(reply)
            rec = {"mllm_reply": reply}
            if err is None:
                rec.update(mllm_rating=rating, mllm_score=normalise(rating))
            else:
                rec.update(mllm_score=None, mllm_error=err)
            out.append(rec)
        return out
