"""Text side of ModelGrow: the frozen T5 and LLM text encoders, S/L/SL prompt merging and LLM recaptioning.

Everything is loaded from local directories (``local_files_only=True``); nothing is downloaded. The encoders
need ``transformers`` (the ``text`` extra), imported lazily so that ``import modelgrow.text`` is cheap.
"""

from .prompts import PROMPT_MODES, merge_prompt, merge_prompts

__all__ = [
    "PROMPT_MODES", "merge_prompt", "merge_prompts",
    "T5Encoder", "clean_caption", "text_preprocessing",
    "LLMEncoder", "LLAMA3_TEMPLATE", "DEFAULT_SYSTEM_PROMPT",
    "Recaptioner", "RECAPTION_INSTRUCTION", "count_words", "fit_word_range",
]

_LAZY = {
    "T5Encoder": "t5", "clean_caption": "t5", "text_preprocessing": "t5",
    "LLMEncoder": "llm", "LLAMA3_TEMPLATE": "llm", "DEFAULT_SYSTEM_PROMPT": "llm",
    "Recaptioner": "recaption", "RECAPTION_INSTRUCTION": "recaption", "count_words": "recaption",
    "fit_word_range": "recaption",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
