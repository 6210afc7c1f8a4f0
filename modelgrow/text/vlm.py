"""A local vision-language model that reads video frames: ``transformers``' ``AutoModelForImageTextToText`` +
``AutoProcessor`` from a local directory (LLaVA / LLaVA-NeXT / LLaVA-NeXT-Video / LLaVA-OneVision / Qwen2-VL /
any image-text-to-text model whose processor takes several images). Shared by video recaptioning
(``modelgrow.text.video_recaption``) and the MLLM judge score (``modelgrow.evaluate``).

Input
    ``num_frames`` evenly spaced frames of each video (``sample_indices``), read with the project's decoders
    (``modelgrow.data.decode.FrameDecoder``; images are one frame). ``frames_as``:
    ``"images"`` -- the frames are a multi-image message (one ``{"type": "image"}`` per frame), which every
    multi-image model accepts; ``"video"`` -- one ``{"type": "video"}`` entry and ``videos=`` (models with a video
    processor: LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL; transformers' video processors need torchvision);
    ``"auto"`` -- ``video`` when the processor has a video processor, else ``images``.
    The user message is the frames followed by the instruction text, rendered with the processor's chat template
    (``add_generation_prompt=True``); a processor without one gets ``"<image-token> x frames\\n{text}"``.

Generation
    batched (left padding), greedy by default, sampled (seeded: ``seed``) when asked; the new tokens are decoded
    with special tokens skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._common import (
    check_local_dir,
    freeze,
    generation_kwargs,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    tolerate_broken_mistral_common,
)

__all__ = ["VLM", "sample_indices", "read_frames"]


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` evenly spaced indices in ``[0, total)`` (rounded linspace; all frames when fewer)."""
    if total <= 0:
        raise ValueError("the video has no frames")
    if total <= num_frames:
        return list(range(total))
    return [int(round(x)) for x in np.linspace(0, total - 1, num_frames)]


def read_frames(path: str, num_frames: int, decoder=None) -> np.ndarray:
    """uint8 ``[n, H, W, 3]``: ``num_frames`` evenly spaced frames of a video (one frame for an image)."""
    from ..data.decode import FrameDecoder, probe
    from ..data.manifest import is_image

    decoder = decoder or FrameDecoder("pyav")
    if is_image(path):
        return decoder.read(path, None)
    info = probe(path)
    return decoder.read(path, sample_indices(info.num_frames, num_frames), info)


class VLM:
    """Frames + text -> text with a local image/video-text-to-text model (see the module docstring)."""

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 num_frames: int = 8, frames_as: str = "auto", max_new_tokens: int = 256, batch_size: int = 4,
                 seed: int = 0, temperature: float = 0.7, top_p: float = 0.9) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        self.path = check_local_dir(path, "vision-language model")
        if frames_as not in ("auto", "images", "video"):
            raise ValueError(f"frames_as must be auto, images or video; got {frames_as!r}")
        if num_frames < 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError("num_frames, batch_size and max_new_tokens must be >= 1")
        tolerate_broken_mistral_common()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "no torchvision: PIL image processor" notice
        try:
            self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: the processor has no tokenizer")
        self.tokenizer.padding_side = "left"
        self.model = freeze(load_pretrained(AutoModelForImageTextToText, self.path, self.dtype)).to(self.device)
        has_video = getattr(self.processor, "video_processor", None) is not None
        self.frames_as = ("video" if has_video else "images") if frames_as == "auto" else frames_as
        self.num_frames, self.max_new_tokens, self.batch_size = int(num_frames), int(max_new_tokens), int(batch_size)
        self.seed, self.temperature, self.top_p = int(seed), float(temperature), float(top_p)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ------------------------------------------------------------------------------------------------------
    def build_prompt(self, n_frames: int, text: str) -> str:
        """The generation input text for ``n_frames`` frames and an instruction ``text``."""
        if self.frames_as == "video":
            visual = [{"type": "video"}]
        else:
            visual = [{"type": "image"} for _ in range(n_frames)]
        if getattr(self.processor, "chat_template", None):
            msgs = [{"role": "user", "content": [*visual, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "video_token" if self.frames_as == "video" else "image_token", "<image>")
        return token * len(visual) + "\n" + text

    def prepare(self, videos: Sequence[np.ndarray], texts: Sequence[str]) -> dict:
        """Processor outputs for one batch (frames uint8 ``[T, H, W, 3]``; ``texts`` one per video)."""
        prompts = [self.build_prompt(len(v), t) for v, t in zip(videos, texts, strict=True)]
        if self.frames_as == "video":
            kw = {"videos": [np.asarray(v) for v in videos]}
        else:
            kw = {"images": [list(v) for v in videos]}
        return self.processor(text=prompts, padding=True, return_tensors="pt", **kw)

    @torch.no_grad()
    def generate(self, videos: Sequence[np.ndarray], texts: Sequence[str], do_sample: bool = False,
                 seed: int | None = None) -> list[str]:
        """Decoded new text for every (video, text) pair, ``batch_size`` pairs per ``generate`` call."""
        seed = self.seed if seed is None else seed
        out: list[str] = []
        devices = [self.device] if self.device.type == "cuda" else []
        for b in range(0, len(videos), self.batch_size):
            inputs = self.prepare(videos[b : b + self.batch_size], texts[b : b + self.batch_size])
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            kw = generation_kwargs(self.max_new_tokens, do_sample, self.pad_id, self.temperature, self.top_p)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + b)
                gen = self.model.generate(**inputs, **kw)
            new = gen[:, inputs["input_ids"].shape[1]:].cpu()
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out
