"""Drop-in acceleration of an existing STDiT (e.g. one loaded from an Open-Sora v1.0 checkpoint).

    model = modelgrow.accelerate(model)                    # bf16 on CUDA, fused kernels, compiled step
    model = modelgrow.accelerate(model, dtype="float32", compile=False)

What it does, in order:
1. casts the weights and the model's compute dtype (``model.dtype``, the dtype its forward casts inputs to)
   to ``dtype`` (default bf16 on CUDA, unchanged on CPU);
2. selects the fused kernels: the dispatcher's ``auto`` choice (Triton on CUDA, the C++ extension on CPU),
   which STDiT uses by default; ``kernels="ref"`` pins the PyTorch reference instead;
3. optionally wraps the denoiser in ``torch.compile``; on CUDA with ``cuda_graphs=True`` it compiles with
   ``mode="reduce-overhead"``, which records the fixed-shape denoising step as a CUDA graph and replays it.
The result computes the same function within the kernel tolerance policy (see tests/test_accelerate.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mgkernels.dispatch import use

from .models.stdit import dtype_from_name


class AcceleratedModel(nn.Module):
    """Calls ``model`` under a fixed kernel provider, optionally through ``torch.compile``; attribute access
    falls through to the wrapped model (``config``, ``y_embedder``, ...)."""

    def __init__(self, model: nn.Module, kernels: str, compiled: Any | None):
        super().__init__()
        self.model = model
        self.kernels = kernels
        self._compiled = compiled

    def forward(self, *args, **kwargs):
        fn = self._compiled if self._compiled is not None else self.model
        with use(self.kernels):
            return fn(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)


def accelerate(
    model: nn.Module,
    dtype: str | torch.dtype | None = None,
    kernels: str = "auto",
    compile: bool | None = None,
    cuda_graphs: bool = True,
    backend: str = "inductor",
) -> AcceleratedModel:
    """Switch ``model`` to the fast path (in place for the dtype cast; returns a wrapper). ``compile``
    defaults to True on CUDA and False on CPU (a first CPU compile costs tens of seconds)."""
    if isinstance(model, AcceleratedModel):
        model = model.model
    device = next(model.parameters()).device
    if kernels not in ("auto", "triton", "csrc", "ref"):
        raise ValueError(f"kernels must be auto, triton, csrc or ref; got {kernels!r}")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else getattr(model, "dtype", torch.float32)
    dtype = dtype_from_name(dtype)
    model.to(dtype)
    if hasattr(model, "dtype"):
        model.dtype = dtype
    model.eval()
    if compile is None:
        compile = device.type == "cuda"
    compiled = None
    if compile:
        mode = "reduce-overhead" if (device.type == "cuda" and cuda_graphs) else None
        compiled = torch.compile(model, mode=mode, dynamic=False, backend=backend)
    return AcceleratedModel(model, kernels, compiled)
