"""Tiny random text models saved to local directories, for tests and offline demos (nothing is downloaded).

* ``build_tiny_t5(dir)``: a SentencePiece unigram model trained on a small generated caption corpus, wrapped
  as a ``T5Tokenizer``, and a random 2-layer ``T5EncoderModel`` (d_model 32).
* ``build_tiny_llama(dir)``: the real Llama SentencePiece tokenizer that ships with ``mistral-common``
  (``data/tokenizer.model.v1``, 32000 tokens) and a random 2-layer ``LlamaForCausalLM`` (hidden 32),
  optionally with a Llama-3-style chat template.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

__all__ = ["build_tiny_t5", "build_tiny_llama", "build_tiny_llava", "mistral_tokenizer_model", "LLAMA3_STYLE_CHAT_TEMPLATE",
           "LLAVA_STYLE_CHAT_TEMPLATE"]

LLAMA3_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_WORDS = (
    "a an the cat dog bird horse fish child woman man people car boat train plane bicycle runs walks flies swims "
    "jumps plays sits stands drives rides slowly quickly gently on in under over near across through along beach "
    "park city street forest river mountain lake field garden kitchen room sky water snow rain sunset night "
    "morning light shadow red blue green yellow white black golden tall small large old young happy camera pans "
    "zooms tilts shot close wide aerial view slow motion video of with and while at from its their is are"
).split()


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:  # a few odd tokens so that the vocabulary has sub-word pieces too
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))))
        out.append(" ".join(words))
    return out


def build_tiny_t5(path: str, vocab_size: int = 160, d_model: int = 32, seed: int = 0, corpus: list[str] | None = None) -> str:
    """Train a tiny SentencePiece model (on ``corpus``, default a generated one), save a ``T5Tokenizer`` and a
    random ``T5EncoderModel`` in ``path``."""
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus or _corpus(seed=seed)), model_prefix=os.path.join(tmp, "spiece"),
            vocab_size=vocab_size, model_type="unigram", hard_vocab_limit=False, character_coverage=1.0,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            minloglevel=2, num_threads=1,
        )
        tok = T5Tokenizer.from_pretrained(tmp, local_files_only=True, extra_ids=0)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = T5Config(d_model=d_model, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=len(tok),
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    T5EncoderModel(cfg).save_pretrained(path)
    return path


def mistral_tokenizer_model() -> str:
    """Path of the Llama SentencePiece model shipped in ``mistral-common``'s package data."""
    import mistral_common

    p = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"mistral-common does not ship {p!r}")
    return p


def build_tiny_llama(path: str, chat_template: str | None = None, hidden_size: int = 32, seed: int = 0) -> str:
    """Save the mistral-common Llama tokenizer (with ``chat_template`` if given) and a random 2-layer
    ``LlamaForCausalLM`` in ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_tokenizer_model(), os.path.join(tmp, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


LLAVA_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(path: str, hidden_size: int = 32, image_size: int = 32, seed: int = 0) -> str:
    """A random ``LlavaForConditionalGeneration`` (CLIP vision tower + 2-layer Llama, 32x32 images, patch 8:
    16 image tokens per frame) with a real ``LlavaProcessor`` (``CLIPImageProcessor`` + the mistral-common
    Llama tokenizer with an ``<image>`` token, a LLaVA-1.5-style chat template) saved in ``path``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from ._common import tolerate_broken_mistral_common

    tolerate_broken_mistral_common()
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_tokenizer_model(), os.path.join(tmp, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.unk_token
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   chat_template=LLAVA_STYLE_CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    return path
