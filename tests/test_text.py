"""Text encoders: the frozen T5 (Open-Sora v1.0) and the LLM condition with template cropping.

Every model is a tiny random one built from a config and saved to a tmp dir; the tokenizers are real
SentencePiece ones (one trained here for T5, the Llama one shipped in mistral-common)."""

import html
import os
import re
import urllib.parse as ul
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from modelgrow.text import LLAMA3_TEMPLATE, LLMEncoder, T5Encoder, clean_caption, text_preprocessing  # noqa: E402
from modelgrow.text.tiny import LLAMA3_STYLE_CHAT_TEMPLATE, build_tiny_llama, build_tiny_t5  # noqa: E402

try:  # Open-Sora v1.0's caption cleaning libraries (the `text` extra)
    import ftfy
    from bs4 import BeautifulSoup
except ImportError:
    ftfy = BeautifulSoup = None
needs_text_libs = pytest.mark.skipif(ftfy is None or BeautifulSoup is None,
                                     reason="ftfy or beautifulsoup4 missing (pip install ftfy beautifulsoup4)")

PROMPTS = [
    "A cat runs on the beach at sunset while the camera pans slowly",
    "dog",
    "Two people walk along a river in the city at night with golden light",
]


# ------------------------------------------------------------------------------------------------------------
# caption cleaning
# ------------------------------------------------------------------------------------------------------------


# every expected value below is what Open-Sora v1.0.0's own T5Embedder.text_preprocessing (ftfy + bs4) returns
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Check https://example.com/page and www.foo.org now", "check and now"),
        ("Tom &amp; Jerry &lt;3 <b>bold</b> text", "tom jerry <3 bold text"),
        ("hi @john_doe look at this", "hi look at this"),
        ("  A   cat\t\n sits   on a mat  ", "a cat sits on a mat"),
        ("A \u201cquoted\u201d dog \u2014 running", 'a "quoted" dog - running'),
        ('"A dog in the park"', "a dog in the park"),
        ("photo_of_a_cute_cat_on_a_sofa", "photo of a cute cat on a sofa"),
        ("IMG_1234.jpg a red car 1920x1080", "a red car"),
        ("\uff26\uff55\uff4c\uff4c width text", "full width text"),
        ("tea &amp;amp; cake", "tea ; cake"),
        ("one, two.three", "one, two. three"),
        ("A%20cat+on+a+mat", "a cat on a mat"),
        ("a cat \u732b sits", "a cat sits"),
        ("<p>a <i>red</i> ball</p><script>var x = 1;</script><!-- note -->", "a red ball"),
    ],
)
def test_clean_caption(raw, expected):
    assert text_preprocessing(raw) == expected
    assert clean_caption(clean_caption(raw)) == expected


def test_text_preprocessing_off():
    assert text_preprocessing("  A Cat  @x http://a.com ", use_text_preprocessing=False) == "a cat  @x http://a.com"


# The reference: a verbatim copy of Open-Sora v1.0's caption cleaning (hpcaitech/Open-Sora, tag v1.0.0,
# opensora/models/text_encoder/t5.py, class T5Embedder: bad_punct_regex, basic_clean and clean_caption; itself
# adapted from PixArt-alpha / DeepFloyd-IF, AGPL-3.0), kept here as an oracle independent of modelgrow's code. Only
# the class name is ours, and the invalid escapes of bad_punct_regex ("\)", "\(", ...) are written as raw strings
# (the same values, without Python's invalid-escape warning). Its text_preprocessing is clean_caption applied twice.
class OpenSoraT5Embedder:
    bad_punct_regex = re.compile(
        r"[" + "#®•©™&@·º½¾¿¡§~" + r"\)" + r"\(" + r"\]" + r"\[" + r"\}" + r"\{" + r"\|" + "\\" + r"\/" + r"\*" + r"]{1,}"
    )  # noqa

    @staticmethod
    def basic_clean(text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        return text.strip()

    def clean_caption(self, caption):
        caption = str(caption)
        caption = ul.unquote_plus(caption)
        caption = caption.strip().lower()
        caption = re.sub("<person>", "person", caption)
        # urls:
        caption = re.sub(
            r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",  # noqa
            "",
            caption,
        )  # regex for urls
        caption = re.sub(
            r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",  # noqa
            "",
            caption,
        )  # regex for urls
        # html:
        caption = BeautifulSoup(caption, features="html.parser").text

        # @<nickname>
        caption = re.sub(r"@[\w\d]+\b", "", caption)

        # 31C0—31EF CJK Strokes
        # 31F0—31FF Katakana Phonetic Extensions
        # 3200—32FF Enclosed CJK Letters and Months
        # 3300—33FF CJK Compatibility
        # 3400—4DBF CJK Unified Ideographs Extension A
        # 4DC0—4DFF Yijing Hexagram Symbols
        # 4E00—9FFF CJK Unified Ideographs
        caption = re.sub(r"[\u31c0-\u31ef]+", "", caption)
        caption = re.sub(r"[\u31f0-\u31ff]+", "", caption)
        caption = re.sub(r"[\u3200-\u32ff]+", "", caption)
        caption = re.sub(r"[\u3300-\u33ff]+", "", caption)
        caption = re.sub(r"[\u3400-\u4dbf]+", "", caption)
        caption = re.sub(r"[\u4dc0-\u4dff]+", "", caption)
        caption = re.sub(r"[\u4e00-\u9fff]+", "", caption)
        #######################################################

        # все виды тире / all types of dash --> "-"
        caption = re.sub(
            r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+",  # noqa
            "-",
            caption,
        )

        # кавычки к одному стандарту
        caption = re.sub(r"[`´«»“”¨]", '"', caption)
        caption = re.sub(r"[‘’]", "'", caption)

        # &quot;
        caption = re.sub(r"&quot;?", "", caption)
        # &amp
        caption = re.sub(r"&amp", "", caption)

        # ip adresses:
        caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)

        # article ids:
        caption = re.sub(r"\d:\d\d\s+$", "", caption)

        # \n
        caption = re.sub(r"\\n", " ", caption)

        # "#123"
        caption = re.sub(r"#\d{1,3}\b", "", caption)
        # "#12345.."
        caption = re.sub(r"#\d{5,}\b", "", caption)
        # "123456.."
        caption = re.sub(r"\b\d{6,}\b", "", caption)
        # filenames:
        caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)

        #
        caption = re.sub(r"[\"\']{2,}", r'"', caption)  # """AUSVERKAUFT"""
        caption = re.sub(r"[\.]{2,}", r" ", caption)  # """AUSVERKAUFT"""

        caption = re.sub(self.bad_punct_regex, r" ", caption)  # ***AUSVERKAUFT***, #AUSVERKAUFT
        caption = re.sub(r"\s+\.\s+", r" ", caption)  # " . "

        # this-is-my-cute-cat / this_is_my_cute_cat
        regex2 = re.compile(r"(?:\-|\_)")
        if len(re.findall(regex2, caption)) > 3:
            caption = re.sub(regex2, " ", caption)

        caption = self.basic_clean(caption)

        caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)  # jc6640
        caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)  # jc6640vc
        caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)  # 6640vc231

        caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
        caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
        caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
        caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
        caption = re.sub(r"\bpage\s+\d+\b", "", caption)

        caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)  # j2d1a2a...

        caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)

        caption = re.sub(r"\b\s+\:\s+", r": ", caption)
        caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)
        caption = re.sub(r"\s+", " ", caption)

        caption.strip()

        caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
        caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
        caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
        caption = re.sub(r"^\.\S+$", "", caption)

        return caption.strip()


def reference_preprocessing(text):
    ref = OpenSoraT5Embedder()
    return ref.clean_caption(ref.clean_caption(text))


# captions without mojibake: the standard-library fallback gives the same result as ftfy + bs4 on these
PLAIN_CAPTIONS = [
    "Check https://example.com/page and www.foo.org now",
    "Tom &amp; Jerry &lt;3 <b>bold</b> text",
    "tea &amp;amp; cake &quot;fresh&quot; &#169; 2020 &eacute;t&eacute; &#x263A;",
    "<p>a <i>red</i> ball</p><script>var x = 1;</script><!-- note --><style>p {}</style>",
    "<div class='x'>Two <span>dogs</span><br/>playing</div> in the <a href='http://a.com'>park</a>",
    "hi @john_doe look at this <person> walking",
    "A \u201cquoted\u201d dog \u2014 running \u2013 fast, \u2018really\u2019 `fast` \u00abhere\u00bb",
    "photo_of_a_cute_cat_on_a_sofa",
    "this-is-my-cute-cat-video",
    "IMG_1234.jpg a red car 1920x1080 at 192.168.0.1",
    "\uff26\uff55\uff4c\uff4c width text \ufb01sh \u3000gap",
    "A%20cat+on+a+mat",
    "a cat \u732b sits \u3042\u30ab\u30bf\u30ab\u30ca \u3300 in Tokyo \u6771\u4eac",
    "free shipping worldwide! download free now, click for details page 3",
    "product jc6640 and jc6640vc and 6640vc231 and j2d1a2a3",
    "#123 #12345 1234567 ***AUSVERKAUFT*** ...wow... a . b",
    '"""a dog in the park"""',
    "'single quoted caption'",
    "literal \\n newline and a real\nnewline\r\nand tabs\tok",
    "a: b :  c, d.e/f",
    "  A   cat\t\n sits   on a mat  ",
    "emoji \U0001f600 and symbols \u00ae \u2022 \u00b7 \u00bd",
    "<![CDATA[raw text]]> after cdata <?php echo 1; ?>",
    "price 12:30 ",
    ".hidden",
    "",
    12345,
]
# mojibake (UTF-8 read as cp1252): only ftfy repairs some of it. Open-Sora lower-cases before ftfy, so "Ã©"
# becomes "ã©", which ftfy leaves alone (both paths agree there); three-byte sequences starting with "â"
# (punctuation U+2000..U+20FF) survive lower-casing and are repaired by ftfy only.
MOJIBAKE_CAPTIONS = [
    "CafÃ© au lait in the morning",
    "crÃ¨me brÃ»lÃ©e on a plate",
    "wait for itâ€¦ now",
    "â€œquotedâ€\x9d text",
    "priceâ€¯tag",
    "euro â‚¬ sign",
    "donâ€™t stop",
]
# (raw, Open-Sora v1.0 with ftfy + bs4, the standard-library fallback); measured with the reference above
MOJIBAKE_FALLBACK = [
    ("wait for itâ€¦ now", "wait for it\u2026 now", "wait for it\u00e2\u20ac\u00a6 now"),
    ("priceâ€¯tag", "price tag", "price\u00e2\u20ac\u00aftag"),
    ("euro â‚¬ sign", "euro \u20ac sign", "euro \u00e2'\u00ac sign"),
    ("CafÃ© au lait in the morning", "caf\u00e3 au lait in the morning", "caf\u00e3 au lait in the morning"),
]


@needs_text_libs
@pytest.mark.parametrize("raw", PLAIN_CAPTIONS + MOJIBAKE_CAPTIONS)
def test_clean_caption_equals_open_sora_v1(raw):
    import modelgrow.text.t5 as t5

    assert t5.ftfy is not None and t5.BeautifulSoup is not None  # the libraries are the primary path
    ref = OpenSoraT5Embedder()
    assert clean_caption(raw) == ref.clean_caption(raw)
    assert text_preprocessing(raw) == reference_preprocessing(raw)


@pytest.fixture
def fallback(monkeypatch, request):
    """Force the standard-library stand-ins (``request.param``: which library is missing)."""
    import modelgrow.text.t5 as t5

    missing = getattr(request, "param", "both")
    if missing in ("ftfy", "both"):
        monkeypatch.setattr(t5, "ftfy", None)
    if missing in ("bs4", "both"):
        monkeypatch.setattr(t5, "BeautifulSoup", None)
    monkeypatch.setattr(t5, "_warned_missing", False)
    return missing


@needs_text_libs
@pytest.mark.parametrize("fallback", ["ftfy", "bs4", "both"], indirect=True)
def test_clean_caption_fallback_warns_once_and_matches_without_mojibake(fallback):
    names = {"ftfy": "ftfy not installed", "bs4": "beautifulsoup4 not installed",
             "both": "ftfy and beautifulsoup4 not installed"}
    with pytest.warns(RuntimeWarning, match=names[fallback]) as rec:
        out = text_preprocessing(PLAIN_CAPTIONS[0])
    assert len(rec) == 1 and "pip install ftfy beautifulsoup4" in str(rec[0].message)
    assert out == reference_preprocessing(PLAIN_CAPTIONS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time: no second warning
        for raw in PLAIN_CAPTIONS:
            assert clean_caption(raw) == OpenSoraT5Embedder().clean_caption(raw), raw
            assert text_preprocessing(raw) == reference_preprocessing(raw), raw


@needs_text_libs
@pytest.mark.parametrize("raw, with_ftfy, without", MOJIBAKE_FALLBACK)
def test_clean_caption_fallback_mojibake_difference(fallback, raw, with_ftfy, without):
    """Without ftfy, mojibake that survives lower-casing is left unrepaired (documented difference)."""
    with pytest.warns(RuntimeWarning):
        got = text_preprocessing(raw)
    assert reference_preprocessing(raw) == with_ftfy
    assert got == without


# ------------------------------------------------------------------------------------------------------------
# T5
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5")))


@pytest.fixture(scope="module")
def t5(t5_dir):
    return T5Encoder(t5_dir)


def test_t5_frozen_and_config(t5):
    assert t5.max_length == 120 and t5.hidden_size == 32
    assert not t5.model.training
    assert all(not p.requires_grad for p in t5.model.parameters())


def test_t5_shapes_masks(t5):
    emb, mask = t5.encode(PROMPTS)
    assert emb.shape == (3, 1, 120, 32) and emb.dtype == torch.float32
    assert mask.shape == (3, 120) and mask.dtype == torch.long
    counts = [len(t5.tokenizer(text_preprocessing(p)).input_ids) for p in PROMPTS]  # incl. </s>
    assert len(set(counts)) == 3
    assert mask.sum(1).tolist() == counts
    for i, n in enumerate(counts):  # right padding: ones then zeros
        assert mask[i, :n].all() and not mask[i, n:].any()
    ids, _ = t5.tokenize(PROMPTS)
    assert (ids[mask == 0] == t5.tokenizer.pad_token_id).all()
    assert all(ids[i, n - 1] == t5.tokenizer.eos_token_id for i, n in enumerate(counts))
    # the encoder output is the model's last hidden state on the padded batch
    ref = t5.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(emb[:, 0], ref)


def test_t5_cleans_before_tokenising(t5):
    a, ma = t5.encode(["A cat runs @someone https://spam.com/x"])
    b, mb = t5.encode(["a cat runs"])
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b)
    raw = T5Encoder.__new__(T5Encoder)
    raw.__dict__.update(t5.__dict__, clean=False)
    assert raw.tokenize(["A cat runs @someone"])[1].sum() > mb.sum()


def test_t5_truncation(t5, t5_dir):
    long = " ".join(["a cat runs on the beach"] * 40)
    emb, mask = t5.encode([long, "dog"])
    assert mask[0].sum() == 120 and mask[1].sum() == 2
    ids, _ = t5.tokenize([long])
    assert ids[0, -1] == t5.tokenizer.eos_token_id  # truncation keeps the end-of-sequence token
    short = T5Encoder(t5_dir, max_length=8)
    emb8, mask8 = short.encode([long, "dog"])
    assert emb8.shape == (2, 1, 8, 32) and mask8.sum(1).tolist() == [8, 2]


def test_t5_padding_invariance(t5):
    alone, m_alone = t5.encode([PROMPTS[0]])
    batch, m_batch = t5.encode(PROMPTS)
    assert torch.equal(m_alone[0], m_batch[0])
    torch.testing.assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-5)
    rev, _ = t5.encode(PROMPTS[::-1])
    torch.testing.assert_close(rev[2], batch[0], atol=1e-5, rtol=1e-5)


def test_missing_paths(tmp_path):
    missing = str(tmp_path / "nope")
    for cls in (T5Encoder, LLMEncoder):
        with pytest.raises(FileNotFoundError, match="local directories only") as e:
            cls(missing)
        assert missing in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# LLM
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {
        "chat": build_tiny_llama(str(root / "chat"), chat_template=LLAMA3_STYLE_CHAT_TEMPLATE),
        "plain": build_tiny_llama(str(root / "plain")),  # no chat template: the built-in Llama-3 template
    }


@pytest.fixture(scope="module")
def ref_lms(llama_dirs):
    from transformers import LlamaForCausalLM

    return {k: LlamaForCausalLM.from_pretrained(d, local_files_only=True).eval() for k, d in llama_dirs.items()}


def _plain_ids(enc, p):
    return enc.tokenizer(p, add_special_tokens=False).input_ids


def _reference(ref, ids_row, layer):
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([ids_row]), output_hidden_states=True)
    return out.hidden_states[layer][0]


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_llm_template_cropping(llama_dirs, ref_lms, kind):
    enc = LLMEncoder(llama_dirs[kind], max_length=32)
    assert enc.hidden_size == 32 and not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    tok = enc.tokenizer
    # the rendered template, prefix and suffix
    text = enc.template_text("PROMPT")
    if kind == "chat":
        assert tok.chat_template and text == tok.apply_chat_template(
            [{"role": "system", "content": enc.system_prompt}, {"role": "user", "content": "PROMPT"}], tokenize=False)
        assert enc.prefix_ids[0] == tok.bos_token_id  # the template's {{ bos_token }} is a real BOS token
    else:
        assert not tok.chat_template
        assert text == LLAMA3_TEMPLATE.format(system=enc.system_prompt, prompt="PROMPT")
    assert tok.decode(enc.prefix_ids).rstrip().endswith("user<|end_header_id|>")
    assert tok.decode(enc.suffix_ids).strip() == "<|eot_id|>"

    ids, mask = enc.tokenize(PROMPTS)
    lens = [len(_plain_ids(enc, p)) for p in PROMPTS]
    assert len(set(lens)) == 3 and max(lens) <= 32
    assert mask.sum(1).tolist() == lens
    for i, p in enumerate(PROMPTS):  # template cropping leaves exactly the user-prompt tokens
        assert ids[i, : lens[i]].tolist() == _plain_ids(enc, p)
        assert not mask[i, lens[i]:].any()

    full, att, n = enc.model_inputs(PROMPTS)
    P = len(enc.prefix_ids)
    for i, p in enumerate(PROMPTS):
        row = enc.prefix_ids + _plain_ids(enc, p) + enc.suffix_ids
        assert full[i, : len(row)].tolist() == row and att[i].sum() == len(row)

    # the features are the model's hidden states on the whole templated sequence, at the prompt positions
    emb, emask = enc.encode(PROMPTS)
    assert emb.shape == (3, 1, 32, 32) and torch.equal(emask, mask)
    for i, p in enumerate(PROMPTS):
        row = enc.prefix_ids + _plain_ids(enc, p) + enc.suffix_ids
        ref = _reference(ref_lms[kind], row, -1)[P : P + lens[i]]
        torch.testing.assert_close(emb[i, 0, : lens[i]], ref, atol=1e-5, rtol=1e-4)
        assert (emb[i, 0, lens[i]:] == 0).all()
        # ... and not a re-run of the prompt without its template context
        bare = _reference(ref_lms[kind], _plain_ids(enc, p), -1)
        assert not torch.allclose(emb[i, 0, : lens[i]], bare, atol=1e-3)


def test_llm_layer_selection(llama_dirs, ref_lms):
    encs = {layer: LLMEncoder(llama_dirs["chat"], max_length=24, layer=layer) for layer in (-1, 1, 0)}
    p = PROMPTS[0]
    n = len(_plain_ids(encs[-1], p))
    row = encs[-1].prefix_ids + _plain_ids(encs[-1], p) + encs[-1].suffix_ids
    P = len(encs[-1].prefix_ids)
    feats = {}
    for layer, enc in encs.items():
        emb, _ = enc.encode([p])
        feats[layer] = emb[0, 0, :n]
        torch.testing.assert_close(feats[layer], _reference(ref_lms["chat"], row, layer)[P : P + n], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(feats[-1], feats[1]) and not torch.allclose(feats[1], feats[0])
    with pytest.raises(ValueError, match="layer"):
        LLMEncoder(llama_dirs["chat"], layer=3)  # 2 layers -> hidden_states has 3 entries


def test_llm_max_length_truncation_and_padding(llama_dirs, ref_lms):
    enc = LLMEncoder(llama_dirs["chat"], max_length=5)
    emb, mask = enc.encode(PROMPTS)
    assert emb.shape == (3, 1, 5, 32)
    assert mask.sum(1).tolist() == [5, 1, 5]
    ids, _ = enc.tokenize(PROMPTS)
    assert ids[0].tolist() == _plain_ids(enc, PROMPTS[0])[:5]
    row = enc.prefix_ids + _plain_ids(enc, PROMPTS[0])[:5] + enc.suffix_ids
    P = len(enc.prefix_ids)
    torch.testing.assert_close(emb[0, 0], _reference(ref_lms["chat"], row, -1)[P : P + 5], atol=1e-5, rtol=1e-4)
    assert (emb[1, 0, 1:] == 0).all()


def test_llm_padding_invariance(llama_dirs):
    enc = LLMEncoder(llama_dirs["plain"], max_length=32)
    alone, m_alone = enc.encode([PROMPTS[1]])
    batch, m_batch = enc.encode(PROMPTS)
    assert torch.equal(m_alone[0], m_batch[1])
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-4)


def test_llm_without_template(llama_dirs, ref_lms):
    enc = LLMEncoder(llama_dirs["chat"], max_length=32, use_template=False)
    tok = enc.tokenizer
    full, att, lens = enc.model_inputs(PROMPTS)
    ids, mask = enc.tokenize(PROMPTS)
    emb, _ = enc.encode(PROMPTS)
    for i, p in enumerate(PROMPTS):
        plain = _plain_ids(enc, p)
        assert ids[i, : len(plain)].tolist() == plain and mask[i].sum() == len(plain)
        # the model input is exactly what tokenizer(prompt) gives (its own special tokens, if any)
        usual = tok(p).input_ids
        assert full[i, : att[i].sum()].tolist() == usual
        P = len(enc.prefix_ids)
        ref = _reference(ref_lms["chat"], usual, -1)[P : P + len(plain)]
        torch.testing.assert_close(emb[i, 0, : len(plain)], ref, atol=1e-5, rtol=1e-4)
    with_t = LLMEncoder(llama_dirs["chat"], max_length=32)
    assert not torch.allclose(with_t.encode(PROMPTS)[0], emb, atol=1e-3)


def test_llm_system_prompt_and_custom_model(llama_dirs, ref_lms):
    a = LLMEncoder(llama_dirs["chat"], max_length=16, system_prompt="Describe the video.")
    b = LLMEncoder.from_model(ref_lms["chat"].model, a.tokenizer, max_length=16, system_prompt="Something else entirely.")
    assert "Describe the video." in a.template_text("x")
    ea, ma = a.encode(PROMPTS[:1])
    eb, mb = b.encode(PROMPTS[:1])
    assert torch.equal(ma, mb) and not torch.allclose(ea, eb, atol=1e-3)  # the system prompt is context
    assert os.path.isdir(a.path) and b.path is None
