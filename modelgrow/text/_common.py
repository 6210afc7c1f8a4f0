"""Shared helpers of the text package: local-only loading, device/dtype resolution."""

from __future__ import annotations

import os

import torch

LOCAL_ONLY_MSG = "models are loaded from local directories only (no hub downloads)"


def check_local_dir(path: str | os.PathLike, what: str = "model") -> str:
    """Return ``path`` as a string if it is an existing local directory, else raise ``FileNotFoundError``."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"{what} directory not found: {p!r}; {LOCAL_ONLY_MSG}")
    return p


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; strings like "bf16" / "float32" are accepted."""
    from ..models.stdit import dtype_from_name

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(dtype)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_pretrained(cls, path: str, dtype: torch.dtype, ignore_unexpected: tuple[str, ...] = ()):
    """``cls.from_pretrained(path, local_files_only=True, dtype=dtype)`` without transformers' load report and
    progress bar. Raises ``RuntimeError`` when weights are missing (a frozen encoder with random weights would
    silently produce noise); unexpected keys starting with one of ``ignore_unexpected`` (e.g. the ``lm_head.``
    of a causal-LM checkpoint loaded as its base model) are fine, other unexpected keys are warned about."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RuntimeError(f"{path}: {len(missing)} weights missing from the checkpoint, e.g. {missing[:5]}")
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not k.startswith(ignore_unexpected))
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} unused checkpoint weights, e.g. {unexpected[:5]}", stacklevel=3)
    return model


def tolerate_broken_mistral_common() -> None:
    """``mistral-common`` installed without its dependencies (the Makefile installs it ``--no-deps`` for the
    Llama tokenizer file it ships) makes transformers believe ``MistralCommonBackend`` is importable; every
    ``ProcessorMixin`` then fails while checking its tokenizer's class. When that import fails, register an
    unrelated placeholder class under that name so processors load (no tokenizer can be an instance of it)."""
    import transformers

    try:
        import transformers.tokenization_mistral_common  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - missing optional dependencies of mistral-common
        pass
    placeholder = type("MistralCommonBackendUnavailable", (), {})
    for mod in (transformers, getattr(__import__("transformers.processing_utils").processing_utils,
                                      "transformers_module", None)):
        if mod is not None and "MistralCommonBackend" not in vars(mod):
            mod.MistralCommonBackend = placeholder


def generation_kwargs(max_new_tokens: int, do_sample: bool, pad_id: int | None, temperature: float,
                      top_p: float) -> dict:
    """``generate()`` arguments shared by the recaptioners: sampling with temperature / top-p (no top-k), or
    greedy with the sampling knobs cleared (so a model's generation_config does not warn or leak them in)."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw
