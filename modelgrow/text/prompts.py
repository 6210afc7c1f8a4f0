"""Prompt merging for the paper's S / L / SL ablation (Sec. 3.3, Table 3).

``S`` is the user's (short) prompt, ``L`` the LLM-rewritten detailed prompt, ``SL`` the short prompt with the
long one appended -- the paper's default, which keeps the key information of the short prompt while adding the
details of the long one.
"""

from __future__ import annotations

PROMPT_MODES = ("S", "L", "SL")


def _text(x: object) -> str:
    """None / NaN-like / non-string -> stripped string ('' for missing)."""
    if x is None:
        return ""
    if isinstance(x, float) and x != x:  # NaN from a pandas-read manifest
        return ""
    return str(x).strip()


def merge_prompt(short: str | None, long: str | None, mode: str = "SL") -> str:
    """Merge a short prompt and its long rewrite.

    ``"S"``  -> short;
    ``"L"``  -> long, or short when long is missing (None / empty / whitespace);
    ``"SL"`` -> ``short + " " + long`` (just short when long is missing, just long when short is missing).
    Both parts are stripped. Raises ``ValueError`` for an unknown mode.
    """
    if not isinstance(mode, str) or mode.upper() not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {', '.join(PROMPT_MODES)}")
    mode = mode.upper()
    s, lng = _text(short), _text(long)
    if mode == "S":
        return s
    if mode == "L":
        return lng or s
    return f"{s} {lng}" if s and lng else (s or lng)


def merge_prompts(shorts: list, longs: list | None, mode: str = "SL") -> list[str]:
    """``merge_prompt`` over two parallel lists (``longs=None`` = no long prompts)."""
    if longs is None:
        longs = [None] * len(shorts)
    if len(longs) != len(shorts):
        raise ValueError(f"{len(shorts)} short prompts but {len(longs)} long prompts")
    return [merge_prompt(s, lng, mode) for s, lng in zip(shorts, longs, strict=True)]
