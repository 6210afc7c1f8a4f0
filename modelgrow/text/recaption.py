"""Prompt recaptioning with a local instruct LLM (the paper's "modified re-captioning", Sec. 3.3 and its
recaption instruction): short prompt p -> detailed prompt p_l of ``min_words``..``max_words`` words.

Generation
    The paper's instruction (``RECAPTION_INSTRUCTION``) is the system message and the prompt the user message,
    rendered with the tokenizer's chat template (``add_generation_prompt=True``) when it has one; otherwise a
    plain-text form ``"{instruction}\\n\\nPrompt: {prompt}\\nReply:"``. Prompts are generated in batches with
    left padding (decoder-only batching); greedy by default (``do_sample=False``), sampled otherwise.

Word-range policy (words = whitespace-separated tokens, ``count_words``)
    1. clean: drop special tokens and template markers (``<|...|>``, ``<s>``, ``[INST]`` ...), a leading
       ``Reply:`` / ``Rewritten prompt:`` label, wrapping quotes; collapse whitespace.
    2. too long: cut to ``max_words`` words at a word boundary -- at the last sentence end (``.``, ``!``, ``?``)
       that still leaves at least ``min_words`` words, else exactly after word ``max_words``.
    3. too short: regenerate the short ones up to ``retries`` times with sampling (``temperature``/``top_p``)
       and seed ``seed + attempt`` (deterministic for a given seed), keeping the longest candidate.
    4. still short: the longest candidate is kept as it is and *flagged* (status ``too_short``; ``last_status``
       after ``recaption``, a ``<out_col>_status`` column in CSVs) -- never padded with repeated words. An empty
       prompt gives ``""`` (there is nothing to rewrite); an empty generation stays empty, and the SL merge then
       falls back to the short prompt alone.

CLI (``modelgrow recaption ...`` -> ``main(argv)``; settings: the ``[recaption]`` config keys)
    ``--prompts-file F`` (one prompt per line, blank lines skipped) -> ``--out``: ``*.jsonl`` gets one object
    per prompt ``{"short", "long", "prompt"}`` (``prompt`` = the ``recaption.prompt_mode`` merge), any other extension one
    merged prompt per line. ``--csv IN`` -> ``--out`` CSV with ``long_caption`` + ``long_caption_status`` columns added (the long prompt
    itself; the data loader merges by ``data.prompt_mode``), other columns and row order kept.
    ``--videos M --vlm DIR`` captions the videos themselves with a vision-language model
    (``modelgrow.text.video_recaption``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Sequence

import torch

from ..fileio import atomic_output
from ._common import check_local_dir, freeze, generation_kwargs, load_pretrained, resolve_device, resolve_dtype
from .prompts import merge_prompt

__all__ = ["Recaptioner", "RECAPTION_INSTRUCTION", "recaption_instruction", "count_words", "fit_word_range",
           "clean_generation", "main"]

# The paper's recaption instruction, verbatim (its recaption figure).
RECAPTION_INSTRUCTION = (
    "Your task is to rewrite the provided prompt into a new one that offers more specific details. "
    "There are also some requirements: 1. Add specific details about objects, entities, and motions. "
    "2. Ensure the new prompt stays true to the original content. "
    "3. Keep the rewritten prompt between 35 and 128 words."
)


def recaption_instruction(min_words: int = 35, max_words: int = 128) -> str:
    """The paper's instruction with the word range filled in (the verbatim text for 35/128)."""
    return RECAPTION_INSTRUCTION.replace("between 35 and 128 words", f"between {min_words} and {max_words} words")


def count_words(text: str) -> int:
    return len(text.split())


_MARKERS = re.compile(
    r"<\|[^|>]{0,40}\|>|</?s>|<unk>|<pad>|\[/?INST\]|<<SYS>>|<</SYS>>|<start_of_turn>|<end_of_turn>"
)
_LABEL = re.compile(
    r"^\s*(?:(?:assistant|llms?|reply|answer|rewritten(?: prompt)?|new prompt|prompt|output)\s*:\s*)+", re.I
)
_QUOTED = re.compile(r'^\s*["\u201c\u2018\'](.*)["\u201d\u2019\']\s*$', re.S)


def clean_generation(text: str) -> str:
    """Strip template echoes / special tokens / labels / wrapping quotes and collapse whitespace."""
    text = _MARKERS.sub(" ", text)
    text = re.sub(r"^\s*(?:system|user|assistant)\s*\n", "", text)  # role header left by a stripped marker
    text = _LABEL.sub("", text)
    m = _QUOTED.match(text)
    if m:
        text = m.group(1)
    return " ".join(text.split())


def _truncate(words: list[str], min_words: int, max_words: int) -> list[str]:
    if len(words) <= max_words:
        return words
    for k in range(max_words, min_words - 1, -1):  # last sentence end that keeps >= min_words words
        if words[k - 1].endswith((".", "!", "?")):
            return words[:k]
    return words[:max_words]


def fit_word_range(text: str, min_words: int, max_words: int) -> tuple[str, str]:
    """Steps 1, 2 and 4 of the policy: clean, cut to ``max_words`` -> ``(text, "ok")``; fewer than ``min_words``
    words -> ``(text, "too_short")`` unchanged (never padded)."""
    words = clean_generation(text).split()
    if len(words) < min_words:
        return " ".join(words), "too_short"
    return " ".join(_truncate(words, min_words, max_words)), "ok"


class Recaptioner:
    """Rewrite short prompts into detailed ones with a local instruct LLM (``transformers`` ``generate``).

    Args:
        path: local model directory (a causal LM and its tokenizer).
        max_new_tokens: generation budget per prompt (128 words are roughly 170-200 tokens).
        batch_size: prompts per ``generate`` call.
        min_words, max_words: the enforced word range (the paper: 35..128).
        seed: base seed of sampled generation and retries.
        do_sample, temperature, top_p: first-pass decoding (greedy by default); retries always sample.
        retries: regeneration rounds for outputs shorter than ``min_words``.
        instruction: the system instruction (default: the paper's, with the word range filled in).
    """

    def __init__(
        self,
        path: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        min_words: int = 35,
        max_words: int = 128,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        retries: int = 2,
        instruction: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_local_dir(path, "recaption LLM")
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        if batch_size < 1 or max_new_tokens < 1 or retries < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1, retries >= 0")
        self.path = path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # decoder-only batching: the new tokens follow every prompt
        self.model = freeze(load_pretrained(AutoModelForCausalLM, path, self.dtype))
        self.model.to(self.device)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.min_words = int(min_words)
        self.max_words = int(max_words)
        self.seed = int(seed)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.retries = int(retries)
        self.instruction = instruction or recaption_instruction(self.min_words, self.max_words)
        self.last_status: list[str] = []  # per prompt of the last ``recaption`` call: ok | too_short | empty
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (
            tok.eos_token_id if tok.eos_token_id is not None else 0)

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> Recaptioner:
        """Wrap an already-loaded causal LM and its tokenizer (the other arguments as in ``__init__``)."""
        import inspect

        self = cls.__new__(cls)
        sig = inspect.signature(cls.__init__)
        opts = {k: p.default for k, p in sig.parameters.items() if k not in ("self", "path", "device", "dtype")}
        unknown = set(kwargs) - set(opts)
        if unknown:
            raise TypeError(f"unknown Recaptioner arguments {sorted(unknown)}")
        opts.update(kwargs)
        self.path = None
        self.model, self.tokenizer = freeze(model), tokenizer
        self.tokenizer.padding_side = "left"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        for k in ("max_new_tokens", "batch_size", "min_words", "max_words", "seed", "retries"):
            setattr(self, k, int(opts[k]))
        self.do_sample, self.temperature, self.top_p = bool(opts["do_sample"]), float(opts["temperature"]), float(opts["top_p"])
        self.instruction = opts["instruction"] or recaption_instruction(self.min_words, self.max_words)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        return self

    # ------------------------------------------------------------------------------------------------------
    def build_input(self, prompt: str) -> str:
        """The generation input text for one prompt."""
        tok = self.tokenizer
        prompt = " ".join(str(prompt).split())
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "system", "content": self.instruction}, {"role": "user", "content": prompt}]
            try:
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - no system role in this template
                msgs = [{"role": "user", "content": f"{self.instruction}\n\nPrompt: {prompt}"}]
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"{self.instruction}\n\nPrompt: {prompt}\nReply:"

    def _encode_inputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        # a chat template writes its own BOS; the plain-text form gets the tokenizer's usual special tokens
        add_special = not getattr(tok, "chat_template", None)
        rows = [list(tok(self.build_input(p), add_special_tokens=add_special)["input_ids"]) for p in prompts]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding
            ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            att[i, T - len(r):] = 1
        return ids, att

    @torch.no_grad()
    def generate(self, prompts: list[str], do_sample: bool | None = None, seed: int | None = None) -> list[str]:
        """Raw (decoded, special tokens skipped) generations for ``prompts``, in batches of ``batch_size``."""
        do_sample = self.do_sample if do_sample is None else do_sample
        seed = self.seed if seed is None else seed
        out: list[str] = []
        devices = [self.device] if self.device.type == "cuda" else []
        for b in range(0, len(prompts), self.batch_size):
            chunk = prompts[b : b + self.batch_size]
            ids, att = self._encode_inputs(chunk)
            kw = generation_kwargs(self.max_new_tokens, do_sample, self.pad_id, self.temperature, self.top_p)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + b)
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device), **kw)
            new = gen[:, ids.shape[1]:].cpu()
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    def recaption(self, prompts: list[str]) -> list[str]:
        """Short prompts -> long prompts of ``min_words``..``max_words`` words, or shorter ones flagged
        ``too_short`` in ``self.last_status`` (see the module docstring)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        prompts = [" ".join(str(p).split()) for p in prompts]
        todo = [i for i, p in enumerate(prompts) if p]
        best = {i: "" for i in todo}
        if todo:
            for i, g in zip(todo, self.generate([prompts[i] for i in todo]), strict=True):
                best[i] = clean_generation(g)
        for attempt in range(1, self.retries + 1):
            short = [i for i in todo if count_words(best[i]) < self.min_words]
            if not short:
                break
            gens = self.generate([prompts[i] for i in short], do_sample=True, seed=self.seed + 1000 * attempt)
            for i, g in zip(short, gens, strict=True):
                g = clean_generation(g)
                if count_words(g) > count_words(best[i]):
                    best[i] = g
        fitted = [fit_word_range(best[i], self.min_words, self.max_words) if p else ("", "empty")
                  for i, p in enumerate(prompts)]
        self.last_status = [st for _, st in fitted]
        return [t for t, _ in fitted]

    __call__ = recaption

    def recaption_csv(self, in_csv: str, out_csv: str, caption_col: str = "caption",
                      out_col: str = "long_caption", overwrite: bool = False) -> int:
        """Add ``out_col`` (the long prompt of each row's ``caption_col``) and ``<out_col>_status`` (ok |
        too_short | empty) to a CSV manifest, keeping every other column and the row order; identical captions are
        recaptioned once. Written atomically to ``out_csv``. Returns the number of rows."""
        with open(in_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        if caption_col not in fields:
            raise KeyError(f"{in_csv}: no {caption_col!r} column (columns: {fields})")
        if out_col in fields and not overwrite:
            raise ValueError(f"{in_csv} already has a {out_col!r} column; pass overwrite=True (--overwrite) to replace it")
        captions = [r.get(caption_col) or "" for r in rows]
        unique = list(dict.fromkeys(" ".join(c.split()) for c in captions))
        longs = dict(zip(unique, zip(self.recaption(unique), self.last_status, strict=True), strict=True))
        status_col = f"{out_col}_status"
        fields += [c for c in (out_col, status_col) if c not in fields]
        for r, c in zip(rows, captions, strict=True):
            r[out_col], r[status_col] = longs[" ".join(c.split())]
        _atomic_write_csv(out_csv, fields, rows)
        return len(rows)


def _atomic_write(path: str, write) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)


def _atomic_write_csv(path: str, fields: list[str], rows: list[dict]) -> None:
    def write(f):
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    _atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


# the flags of the command before it took the typed config (deprecated: a FutureWarning names the new key)
LEGACY_FLAGS = {
    "--batch-size": "recaption.batch_size", "--min-words": "recaption.min_words", "--max-words": "recaption.max_words",
    "--max-new-tokens": "recaption.max_new_tokens", "--retries": "recaption.retries",
    "--sample": ("recaption.sample", "true"), "--temperature": "recaption.temperature", "--top-p": "recaption.top_p",
    "--seed": "recaption.seed", "--dtype": "recaption.dtype", "--caption-col": "recaption.caption_col",
    "--out-col": "recaption.out_col", "--mode": "recaption.prompt_mode", "--num-frames": "recaption.num_frames",
    "--frames-as": "recaption.frames_as", "--instruction": "recaption.instruction",
}

USAGE = """\
Rewrite short prompts into detailed ones with a local instruct LLM (the paper's recaptioning), or caption the
videos of a manifest with a local vision-language model (--videos). Settings are the [recaption] config keys, as
for the other commands: --config FILE.toml, then --recaption.key VALUE overrides (`modelgrow config --keys`).

  modelgrow recaption --model DIR --csv manifest.csv --out out.csv --recaption.max_words 128
  modelgrow recaption --model DIR --prompts-file prompts.txt --out prompts.jsonl --recaption.prompt_mode SL
  modelgrow recaption --videos manifest.csv --vlm DIR --out out.csv --recaption.num_frames 8
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelgrow recaption", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML config file; --section.key VALUE overrides follow")
    p.add_argument("--model", default=None, help="shorthand for --recaption.model (local instruct-LLM dir)")
    p.add_argument("--vlm", default=None, help="shorthand for --recaption.vlm (local vision-language model dir)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts-file", help="text file, one prompt per line (blank lines skipped)")
    src.add_argument("--csv", help="CSV manifest; a long-caption column is added")
    src.add_argument("--videos", help="CSV manifest with a 'path' column: caption the videos with --vlm")
    p.add_argument("--out", required=True, help="output: .jsonl or text (prompts file), CSV (--csv, --videos)")
    p.add_argument("--overwrite", action="store_true", help="--csv: replace an existing recaption.out_col column")
    p.add_argument("--redo-flagged", action="store_true", help="--videos: also redo rows flagged too_short before")
    p.add_argument("--no-progress", action="store_true", help="--videos: no progress bar")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def parse_args(argv: Sequence[str] | None = None):
    """(arguments, typed config) of ``modelgrow recaption`` (legacy flags translated, with a warning)."""
    from ..config import load_config, translate_legacy_flags

    argv = translate_legacy_flags(list(sys.argv[1:] if argv is None else argv), LEGACY_FLAGS, "modelgrow recaption")
    args, rest = build_parser().parse_known_args(argv)
    for flag in ("model", "vlm"):
        if getattr(args, flag) is not None:
            rest += [f"--recaption.{flag}", getattr(args, flag)]
    return args, load_config(args.config, rest)


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    r = cfg.recaption
    if args.videos:  # caption the videos with a VLM
        from .video_recaption import run as video_run

        return video_run(args, r)
    if not r.model:
        raise ValueError("modelgrow recaption: set recaption.model (--model DIR), the local instruct LLM")
    rc = Recaptioner(
        r.model, device=args.device, dtype=r.dtype, max_new_tokens=r.max_new_tokens or 256,
        batch_size=r.batch_size or 8, min_words=r.min_words, max_words=r.max_words or 128, seed=r.seed,
        do_sample=r.sample, temperature=r.temperature, top_p=r.top_p, retries=r.retries, instruction=r.instruction,
    )
    if args.csv:
        n = rc.recaption_csv(args.csv, args.out, caption_col=r.caption_col, out_col=r.out_col,
                             overwrite=args.overwrite)
        print(f"recaptioned {n} rows -> {args.out}", file=sys.stderr)
        return 0
    with open(args.prompts_file, encoding="utf-8") as f:
        shorts = [" ".join(line.split()) for line in f if line.strip()]
    longs = rc.recaption(shorts)
    flagged = [s for s, st in zip(shorts, rc.last_status, strict=True) if st == "too_short"]
    if flagged:
        print(f"{len(flagged)} long prompt(s) stayed under recaption.min_words after {r.retries} retries (kept, not "
              f"padded), e.g. {flagged[:3]}", file=sys.stderr)
    merged = [merge_prompt(s, lng, r.prompt_mode) for s, lng in zip(shorts, longs, strict=True)]
    if args.out.lower().endswith(".jsonl"):
        def write(f):
            for s, lng, m in zip(shorts, longs, merged, strict=True):
                f.write(json.dumps({"short": s, "long": lng, "prompt": m}, ensure_ascii=False) + "\n")
    else:
        def write(f):
            for m in merged:
                f.write(m + "\n")
    _atomic_write(args.out, write)
    print(f"recaptioned {len(shorts)} prompts -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
