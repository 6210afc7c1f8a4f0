"""mgkernels: fused kernels for STDiT (Triton on CUDA, the csrc/ C++ extension on CPU, PyTorch reference).

This package knows nothing of ``modelgrow``. Each fused op lives in its own file (reference -> Triton kernels
-> launchers -> autograd.Function -> functional API). The compiled extension is optional; see ``_ext``.
"""

from ._ext import build_info, ext_available, ext_error
from .dispatch import use

__all__ = ["build_info", "ext_available", "ext_error", "use"]
