"""Frozen T5 text encoder (Open-Sora v1.0 / PixArt-alpha: T5-v1.1-XXL, 120 tokens) and the caption cleaning
that Open-Sora applies before tokenising.

``clean_caption`` is Open-Sora v1.0's ``T5Embedder.clean_caption`` (from DeepFloyd-IF / PixArt-alpha), which it
applies twice (``T5Embedder.text_preprocessing`` with ``use_text_preprocessing`` left at True by its
``T5Encoder``): the same regular expressions in the same order, and the same two third-party steps, called as
Open-Sora calls them:

* ``BeautifulSoup(caption, features="html.parser").text`` (beautifulsoup4) to strip HTML;
* ``ftfy.fix_text(caption)`` inside ``basic_clean``, followed by ``html.unescape`` twice.

Both libraries come with the ``text`` extra (``pip install 'modelgrow[text]'`` or ``pip install ftfy
beautifulsoup4``). When one of them cannot be imported, a standard-library stand-in is used for that step and a
warning is issued once:

* instead of bs4: ``html.parser.HTMLParser`` (the parser bs4 itself drives with ``features="html.parser"``),
  keeping text data and dropping tags, comments, declarations, processing instructions and the contents of
  ``<script>``/``<style>``/``<template>`` (what ``.text`` of bs4 >= 4.10 leaves out). Character references are
  decoded by ``html.unescape``, whereas bs4 decodes them itself; the results differ only for malformed
  references.
* instead of ftfy: terminal escapes removed, line breaks unified, control characters removed, Latin ligatures
  and full-width characters replaced by their NFKC forms, curly quotes uncurled, NFC normalisation. ftfy's
  mojibake repair (e.g. ``"itâ€¦"`` -> ``"it…"``) is NOT reproduced: text that is already valid Unicode comes
  out the same, doubly-decoded text is left as is. (Since the caption is lower-cased before ftfy runs, ``"Ã©"``
  has become ``"ã©"``, which ftfy does not repair either: both paths agree there.)
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse
import warnings
from html.parser import HTMLParser

import torch

from ._common import check_local_dir, freeze, load_pretrained, resolve_device, resolve_dtype

try:
    import ftfy
except ImportError:  # the standard-library stand-in below is used (see the module docstring)
    ftfy = None
try:
    import bs4
    from bs4 import BeautifulSoup
except ImportError:
    BeautifulSoup = None
else:
    # bs4 warns when its input looks like a file name or URL ("cat.jpg"); a caption is never one, and the
    # text comes out the same either way
    if hasattr(bs4, "MarkupResemblesLocatorWarning"):
        warnings.filterwarnings("ignore", category=bs4.MarkupResemblesLocatorWarning)

__all__ = ["T5Encoder", "clean_caption", "text_preprocessing"]


# ----------------------------------------------------------------------------------------------------------
# caption cleaning
# ----------------------------------------------------------------------------------------------------------


_warned_missing = False


def _warn_missing_once() -> None:
    global _warned_missing
    if _warned_missing:
        return
    _warned_missing = True
    missing = [name for name, mod in (("ftfy", ftfy), ("beautifulsoup4", BeautifulSoup)) if mod is None]
    if missing:
        warnings.warn(
            f"caption cleaning: {' and '.join(missing)} not installed, using a standard-library stand-in, so "
            "captions may differ from Open-Sora v1.0's (without ftfy, mojibake such as 'itâ€¦' is not repaired); "
            "install them with `pip install ftfy beautifulsoup4` or the `text` extra "
            "(`pip install 'modelgrow[text]'`)",
            RuntimeWarning,
            stacklevel=3,
        )


class _TextOnly(HTMLParser):
    """Fallback for bs4: HTML -> its text nodes (bs4 ``.text`` with the html.parser backend)."""

    _SKIP = {"script", "style", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip_depth += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data):
        if not self._skip_depth:
            self.parts.append(data)

    def unknown_decl(self, data):  # <![CDATA[...]]> is text for bs4
        if data.upper().startswith("CDATA["):
            self.handle_data(data[6:])


def _html_text_fallback(s: str) -> str:
    p = _TextOnly()
    p.feed(s)
    p.close()
    return "".join(p.parts)


def _html_text(s: str) -> str:
    if BeautifulSoup is not None:
        return BeautifulSoup(s, features="html.parser").text
    return _html_text_fallback(s)


_ANSI = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")
_LINE_BREAKS = re.compile(r"\r\n|[\r\u2028\u2029\x85]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
_LIGATURES = re.compile(r"[\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3\ufb00-\ufb06]")
_WIDE = re.compile(r"[\u3000\uff01-\uff5e\uff61-\uffdc]")  # ideographic space, full-width ASCII, half-width kana
_SINGLE_QUOTES = re.compile(r"[\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile(r"[\u201c-\u201f]")


def _fix_text_fallback(s: str) -> str:
    """Fallback for ftfy: the parts of ``ftfy.fix_text`` (default settings) that need no mojibake tables."""
    s = _ANSI.sub("", s)
    s = _LINE_BREAKS.sub("\n", s)
    s = _CONTROL.sub("", s)
    s = _LIGATURES.sub(lambda m: unicodedata.normalize("NFKC", m.group()), s)
    s = _WIDE.sub(lambda m: unicodedata.normalize("NFKC", m.group()), s)
    s = _SINGLE_QUOTES.sub("'", s)
    s = _DOUBLE_QUOTES.sub('"', s)
    return unicodedata.normalize("NFC", s)


def _fix_text(s: str) -> str:
    return ftfy.fix_text(s) if ftfy is not None else _fix_text_fallback(s)


def _basic_clean(s: str) -> str:
    s = _fix_text(s)
    s = html.unescape(html.unescape(s))
    return s.strip()


_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}"
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+")


def _rules(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(p), r) for p, r in pairs]


# stage 1: before the HTML is stripped
_PRE_HTML = _rules(
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),  # urls
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),
)
# stage 2: after the HTML is stripped, before basic_clean
_PRE_BASIC = _rules(
    (r"@[\w\d]+\b", ""),  # @nickname
    (r"[\u31c0-\u31ef]+", ""),  # CJK strokes
    (r"[\u31f0-\u31ff]+", ""),  # katakana phonetic extensions
    (r"[\u3200-\u32ff]+", ""),  # enclosed CJK letters and months
    (r"[\u3300-\u33ff]+", ""),  # CJK compatibility
    (r"[\u3400-\u4dbf]+", ""),  # CJK unified ideographs extension A
    (r"[\u4dc0-\u4dff]+", ""),  # Yijing hexagram symbols
    (r"[\u4e00-\u9fff]+", ""),  # CJK unified ideographs
    (_DASHES, "-"),  # every kind of dash -> "-"
    (r"[`´«»“”¨]", '"'),  # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),  # "#123"
    (r"#\d{5,}\b", ""),  # "#12345.."
    (r"\b\d{6,}\b", ""),  # "123456.."
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'),  # """AUSVERKAUFT"""
    (r"[\.]{2,}", " "),
    (_BAD_PUNCT, " "),  # ***AUSVERKAUFT***, #AUSVERKAUFT
    (r"\s+\.\s+", " "),  # " . "
)
_DASH_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")  # this-is-my-cute-cat / this_is_my_cute_cat
# stage 3: after basic_clean
_POST_BASIC = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    # (PixArt calls caption.strip() here without assigning it: a no-op, kept as such)
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(rules: list[tuple[re.Pattern, str]], s: str) -> str:
    for pat, rep in rules:
        s = pat.sub(rep, s)
    return s


def clean_caption(caption: object) -> str:
    """One pass of Open-Sora v1.0's (PixArt-alpha's) caption cleaning, with ftfy and bs4 (or, without them, the
    stand-ins described in the module docstring, after a one-time warning).

    Note that, like PixArt's, it lower-cases the caption, removes URLs, HTML tags and entities, @handles,
    CJK characters, file names, long numbers and product codes, normalises dashes and quotes, and collapses
    whitespace.
    """
    _warn_missing_once()
    s = str(caption)
    s = urllib.parse.unquote_plus(s)
    s = s.strip().lower()
    s = _apply(_PRE_HTML, s)
    s = _html_text(s)
    s = _apply(_PRE_BASIC, s)
    if len(_DASH_OR_UNDERSCORE.findall(s)) > 3:
        s = _DASH_OR_UNDERSCORE.sub(" ", s)
    s = _basic_clean(s)
    s = _apply(_POST_BASIC, s)
    return s.strip()


def text_preprocessing(text: object, use_text_preprocessing: bool = True) -> str:
    """Open-Sora v1.0's ``text_preprocessing``: ``clean_caption`` twice, or just lower/strip when disabled."""
    if use_text_preprocessing:
        return clean_caption(clean_caption(text))
    return str(text).lower().strip()


# ----------------------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------------------


class T5Encoder:
    """Frozen T5 encoder loaded from a local directory (``config.json`` + weights + tokenizer files).

    ``encode(prompts) -> (emb [B, 1, max_length, C] float32, mask [B, max_length] int64)``: each prompt is
    cleaned (``clean=True``: Open-Sora's ``text_preprocessing``, i.e. ``clean_caption`` twice; ``clean=False``:
    lower-case + strip, Open-Sora's other branch), tokenised with the tokenizer's special tokens (T5's ``</s>``),
    truncated and right-padded to ``max_length``; ``emb`` is the encoder's ``last_hidden_state`` (padding
    positions are not zeroed, as in Open-Sora; the mask marks them).
    """

    def __init__(
        self,
        path: str,
        max_length: int = 120,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        clean: bool = True,
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        path = check_local_dir(path, "T5")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.path = path
        self.max_length = int(max_length)
        self.clean = clean
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = freeze(load_pretrained(T5EncoderModel, path, self.dtype, ignore_unexpected=("decoder.", "lm_head.")))
        self.model.to(self.device)

    @classmethod
    def from_model(cls, model, tokenizer, max_length: int = 120, clean: bool = True,
                   device: str | torch.device | None = None) -> T5Encoder:
        """Wrap an already-loaded ``T5EncoderModel`` and its tokenizer (frozen; moved to ``device`` if given)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self = cls.__new__(cls)
        self.path, self.max_length, self.clean = None, int(max_length), clean
        self.model, self.tokenizer = freeze(model), tokenizer
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        return self

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    def preprocess(self, prompts: list[str]) -> list[str]:
        return [text_preprocessing(p, self.clean) for p in prompts]

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> (input_ids [B, max_length], attention_mask [B, max_length]) on the CPU."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        tok = self.tokenizer(
            self.preprocess(list(prompts)),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tok["input_ids"], tok["attention_mask"].long()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        emb = out.last_hidden_state.float()  # [B, L, C]
        return emb[:, None], mask.to(self.device)  # [B, 1, L, C], [B, L]

    __call__ = encode
