"""Tiny random-weight feature models saved to local directories, for tests and offline demos (nothing is
downloaded): real ``transformers`` model and processor classes, built from small configs.

* ``build_tiny_clip(dir)``: ``CLIPModel`` (2 layers, width 32, 32x32 images, patch 8) with a byte-level
  ``CLIPTokenizer`` (every byte a token, a few merges) and a ``CLIPImageProcessor``.
* ``build_tiny_dinov2(dir)``: ``Dinov2Model`` (2 layers, width 32, patch 8) with a ``BitImageProcessor``
  (DINOv2's processor class).
"""

from __future__ import annotations

import json
import os
import tempfile

__all__ = ["build_tiny_clip", "build_tiny_dinov2", "byte_level_vocab"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_level_vocab(merges: tuple[str, ...] = ("t h", "th e</w>", "a n", "an d</w>", "r e", "o n")) -> tuple[dict, list]:
    """A CLIP-style BPE vocabulary: the 256 byte symbols with and without ``</w>``, the given merges, and
    CLIP's special tokens."""
    syms = list(_bytes_to_unicode().values())
    tokens = syms + [s + "</w>" for s in syms] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, list(merges)


def build_tiny_clip(path: str, seed: int = 0, image_size: int = 32) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    vocab, merges = byte_level_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"))
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    ip.save_pretrained(path)  # (CLIPProcessor's own save would only write these two)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    return path


def build_tiny_dinov2(path: str, seed: int = 0, image_size: int = 32) -> str:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    os.makedirs(path, exist_ok=True)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                       image_size=image_size)
    Dinov2Model(cfg).save_pretrained(path)
    return path
