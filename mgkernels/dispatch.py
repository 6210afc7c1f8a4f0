"""Which implementation of a fused op runs: ``triton``, ``csrc`` or ``ref``.

Every op calls :func:`choose(op, tensor, implemented)` inside its ``torch.library`` custom op, so the choice
is made at run time (opaque to ``torch.compile``) from, in order:

1. the innermost :func:`use` context (``with mgkernels.use("ref"): ...``), else
2. the ``MG_KERNELS`` environment variable (``auto`` | ``ref`` | ``triton`` | ``csrc``; default ``auto``).

The attention ops' functional APIs (``st_attention``, ``cross_attn``, ``gated_cross_attn``) ask first, outside
the custom op (:func:`attention_route`, :func:`eager_ref`): when the answer is ``ref`` and no ``torch.compile``
trace is running, they run the PyTorch reference under plain autograd; when it is ``csrc`` (``st_attention`` and
``cross_attn`` on fp32 CPU tensors), they call the C++ kernel's dispatcher operators
(``torch.ops.mgkernels.csrc_*``) under autograd, without the custom-op layer. The custom op's own providers
(its reference pair, forward + hand-written backward; its csrc branch) are reached through
``torch.ops.mgkernels.*`` and under ``torch.compile`` on CUDA.

Under ``torch.compile``, the modulation ops on a **CPU** tensor trace their PyTorch reference expressions
instead of the custom op (:func:`traced_ref`), so Inductor fuses them with their neighbours: an opaque op (our
C++ kernel or the reference pair) cuts the graph into small kernels, and the demo's compiled CPU training step
was slower than eager with the custom ops and is 13 % faster than eager at the median with the traced
references (docs/demo_recipe.md section 15). The attention ops (``st_attention``, ``cross_attn``) put the C++
kernel's dispatcher operators in the graph on an fp32 CPU tensor when the extension has them (one op either
way, faster than the SDPA it would be traced as, and called from the compiled graph without Python: sections
17-18), else they are traced too; that choice is made when the graph is traced (:func:`compile_request`: a
``use()`` block re-traces, ``MG_KERNELS`` is read at trace time). CUDA tensors keep the custom op (the Triton
kernels, chosen at run time). Tests that check the custom ops compose with ``torch.compile`` on a
CPU turn the tracing off with :func:`custom_ops_under_compile`.

``auto``: CUDA tensors -> ``triton``; CPU tensors -> ``csrc`` when the op has a C++ implementation and the
extension is built, else ``ref``. A preferred provider that cannot run (Triton not importable, extension not
built) falls back to ``ref`` with a one-time warning.

An explicit provider must run where the op implements it: ``triton`` on a CPU tensor needs the Triton
interpreter (``TRITON_INTERPRET=1``, how the tests run kernels on CPU); ``csrc`` needs the built extension
(and its CUDA build for CUDA tensors). Otherwise :class:`KernelUnavailable` is raised. An op that does not
implement the forced provider at all (e.g. ``csrc`` for ``gated_cross_attn``, or for the attention ops on a
CUDA or non-fp32 tensor) uses ``ref``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from . import _ext
from ._common import HAS_TRITON

PROVIDERS = ("triton", "csrc", "ref")
_CHOICES = ("auto",) + PROVIDERS
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("mgkernels_provider", default=None)
# The innermost use() request again, as a module global: torch.compile cannot read the context variable but guards
# on a global it reads, so a graph traced under one request is re-traced under another (compile_request).
_COMPILE_OVERRIDE: str | None = None
_warned: set[tuple[str, str]] = set()


class KernelUnavailable(RuntimeError):
    """An explicitly requested kernel provider cannot run here."""


def requested() -> str:
    """The provider asked for: the innermost ``use()`` context, else ``MG_KERNELS``, else ``auto``."""
    value = _override.get() or os.environ.get("MG_KERNELS", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"MG_KERNELS={value!r} is not one of {', '.join(_CHOICES)}")
    return value


@contextlib.contextmanager
def use(provider: str) -> Iterator[None]:
    """Force a provider for the ops called inside the block (same meaning as ``MG_KERNELS``)."""
    provider = provider.lower()
    if provider not in _CHOICES:
        raise ValueError(f"provider {provider!r} is not one of {', '.join(_CHOICES)}")
    global _COMPILE_OVERRIDE
    token = _override.set(provider)
    before, _COMPILE_OVERRIDE = _COMPILE_OVERRIDE, provider
    try:
        yield
    finally:
        _override.reset(token)
        _COMPILE_OVERRIDE = before


def triton_available() -> bool:
    return HAS_TRITON


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def csrc_available(device: torch.device) -> bool:
    if not _ext.ext_available():
        return False
    return device.type == "cpu" or (device.type == "cuda" and bool(_ext.build_info().get("cuda")))


def _can_run(provider: str, device: torch.device, csrc_fn: str | None = None) -> tuple[bool, str]:
    if provider == "ref":
        return True, ""
    if provider == "triton":
        if not triton_available():
            return False, "triton is not installed"
        if device.type == "cuda" or interpreter_enabled():
            return True, ""
        return False, f"Triton kernels need a CUDA tensor (got {device.type}) or TRITON_INTERPRET=1"
    if provider == "csrc":
        if not _ext.ext_available():
            return False, f"the csrc extension is not available: {_ext.ext_error()}"
        if not csrc_available(device):
            return False, f"the csrc extension was built without CUDA; it cannot run on {device.type}"
        if csrc_fn is not None and not hasattr(_ext.ext(), csrc_fn):
            return False, f"the built csrc extension has no {csrc_fn}; rebuild it (make install)"
        return True, ""
    raise ValueError(provider)


def _warn_once(op: str, msg: str) -> None:
    if (op, msg) not in _warned:
        _warned.add((op, msg))
        warnings.warn(f"mgkernels.{op}: {msg}; using the PyTorch reference", RuntimeWarning, stacklevel=3)


def choose(op: str, tensor: torch.Tensor, implemented: tuple[str, ...], csrc_fn: str | None = None) -> str:
    """The provider that runs ``op`` on ``tensor``'s device; ``implemented`` lists what the op has and
    ``csrc_fn`` names the extension function the csrc provider calls (checked to exist)."""
    device = tensor.device
    want = requested()
    if want != "auto":
        if want not in implemented:
            return "ref"
        ok, why = _can_run(want, device, csrc_fn)
        if not ok:
            raise KernelUnavailable(f"mgkernels.{op}: provider {want!r} was requested but {why}")
        return want
    preferred = "triton" if device.type == "cuda" else "csrc"
    if preferred not in implemented:
        return "ref"
    ok, why = _can_run(preferred, device, csrc_fn)
    if ok:
        return preferred
    if device.type == "cuda" or preferred == "csrc":
        _warn_once(op, why)
    return "ref"


_TRACE_CPU_REF = True  # read by traced_ref under torch.compile (a module global: Dynamo guards on its value)


@contextlib.contextmanager
def custom_ops_under_compile() -> Iterator[None]:
    """Inside the block, ``torch.compile`` traces the custom ops on CPU tensors too (not their references)."""
    global _TRACE_CPU_REF
    before, _TRACE_CPU_REF = _TRACE_CPU_REF, False
    try:
        yield
    finally:
        _TRACE_CPU_REF = before


def traced_ref(tensor: torch.Tensor) -> bool:
    """Whether an op's functional API should return its PyTorch reference expression because a
    ``torch.compile`` trace is running on a CPU tensor (see the module docstring). Dynamo cannot read the
    provider's context variable, so no provider request is consulted here."""
    return torch.compiler.is_compiling() and tensor.device.type == "cpu" and _TRACE_CPU_REF


def compile_request() -> str:
    """:func:`requested` as a ``torch.compile`` trace can read it: the innermost :func:`use` request (a guarded
    module global, so entering or leaving ``use()`` re-traces), else ``MG_KERNELS`` as it was when the graph was
    traced (Dynamo does not guard the environment: set it before compiling)."""
    value = _COMPILE_OVERRIDE or os.environ.get("MG_KERNELS", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"MG_KERNELS={value!r} is not one of {', '.join(_CHOICES)}")
    return value


def attention_route(tensor: torch.Tensor, csrc_ok: bool, provider: Callable[[], str]) -> str:
    """The path an attention op's functional API takes on ``tensor``: ``csrc`` (the C++ operators under
    autograd, no custom-op layer), ``ref`` (the PyTorch reference under autograd, or traced) or ``custom`` (the
    custom op, which picks its provider at run time). ``csrc_ok``: the C++ kernel takes the tensor;
    ``provider``: the op's :func:`choose`. Eagerly the provider decides. Under ``torch.compile`` on a CPU tensor
    (see :func:`traced_ref`) the decision is made when the graph is traced: ``csrc`` where it can run and
    :func:`compile_request` is ``auto`` or ``csrc``, else ``ref``; elsewhere under compile the custom op stays."""
    if torch.compiler.is_compiling():
        if not traced_ref(tensor):
            return "custom"
        return "csrc" if csrc_ok and compile_request() in ("auto", "csrc") else "ref"
    p = provider()
    return p if p in ("csrc", "ref") else "custom"


def eager_ref(provider: Callable[[], str]) -> bool:
    """Whether an op's functional API should call its PyTorch reference directly, under autograd, instead of
    the custom-op pair: when ``provider()`` (the op's :func:`choose`) says ``ref`` and no ``torch.compile``
    trace is running. The reference pair of a custom op cannot use autograd (its body runs below the
    autograd key), so it saves an LSE and differentiates by hand; plain autograd through SDPA makes the demo's
    CPU training step 1.3-1.7x faster. Under ``torch.compile`` the custom op stays, so the provider is still chosen at run
    time."""
    if torch.compiler.is_compiling():
        return False
    return provider() == "ref"
