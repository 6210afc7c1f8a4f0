"""Loader for the optional compiled extension ``mgkernels._C`` (built from csrc/ by setup.py).

``MG_NO_EXT=1`` makes the package behave as if the extension had not been built (used by the tests that
check the pure-Python path, and a quick way to rule the extension out when debugging).
"""

from __future__ import annotations

import os
from typing import Any

import torch  # the extension links against libtorch: torch must be loaded first

_C: Any = None
_ERROR: str | None = None


def _load() -> None:
    global _C, _ERROR
    if os.environ.get("MG_NO_EXT", "0") == "1":
        _ERROR = "disabled by MG_NO_EXT=1"
        return
    try:
        from mgkernels import _C as ext  # type: ignore[attr-defined]
    except ImportError as e:
        _ERROR = f"not built or not loadable ({e})"
        return
    built = ext.build_info().get("torch_version")
    if built not in (None, "unknown") and built != torch.__version__:
        _ERROR = f"built against torch {built} but torch {torch.__version__} is installed; rebuild it (make install)"
        return
    _C = ext


_load()


def ext_available() -> bool:
    """True when the compiled extension is loaded and matches the running torch."""
    return _C is not None


def ext_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    return _ERROR


def build_info() -> dict[str, Any]:
    """How the extension was compiled (OpenMP, SIMD level, CUDA, compiler); {'available': False, ...} if absent."""
    if _C is None:
        return {"available": False, "reason": _ERROR}
    info = {"available": True, **dict(_C.build_info())}
    if hasattr(_C, "modulate_cpu_isa"):
        info["cpu_isa"] = _C.modulate_cpu_isa()  # picked at run time (AVX2+FMA where the CPU has it)
    return info


def ext() -> Any:
    """The extension module; raises with the reason when it is not available."""
    if _C is None:
        raise RuntimeError(f"mgkernels._C is not available: {_ERROR}. Build it with `make install` (needs a C++ compiler).")
    return _C
