"""ModelGrow: continual pre-training of text-to-video diffusion transformers (Open-Sora v1.0 STDiT) with
model expansion and LLM language-understanding enhancement.

``import modelgrow`` is cheap (no torch): the names below load from their module on first use. The diffusers
pipeline is registered with diffusers all the same, so ``diffusers.DiffusionPipeline.from_pretrained(dir)`` finds
``ModelGrowPipeline`` after ``import modelgrow`` (:func:`_lazy_pipeline_attribute`, installed at once when
diffusers is already imported, else right after it is by a one-shot import hook)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

__all__ = ["__version__", "STDiT", "ModelGrowPipeline", "accelerate", "create_model", "from_pretrained", "load_checkpoint",
           "save_pretrained"]

_LAZY = {"accelerate": "accelerate", "ModelGrowPipeline": "pipeline",
         **{n: "models" for n in ("STDiT", "create_model", "from_pretrained", "load_checkpoint", "save_pretrained")}}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        if name == "accelerate":  # the function, not the submodule of the same name the import just bound here
            globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _lazy_pipeline_attribute(diffusers) -> None:
    """Give the ``diffusers`` module a lazy ``ModelGrowPipeline`` attribute: diffusers resolves the class named in
    ``model_index.json`` with ``getattr(diffusers, name)``; the first such lookup imports ``modelgrow.pipeline``
    (which then sets the attribute for good). Nothing heavy is imported before that lookup."""
    base = type(diffusers)
    if getattr(base, "_modelgrow_lazy", False) or "ModelGrowPipeline" in getattr(diffusers, "__dict__", {}):
        return

    class _WithModelGrow(base):
        _modelgrow_lazy = True

        def __getattr__(self, name):
            if name == "ModelGrowPipeline":
                return importlib.import_module("modelgrow.pipeline").ModelGrowPipeline
            getter = getattr(super(), "__getattr__", None)
            if getter is None:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            return getter(name)

    try:
        diffusers.__class__ = _WithModelGrow
    except TypeError:  # pragma: no cover - a module type that cannot be subclassed: register eagerly
        importlib.import_module("modelgrow.pipeline")


class _RegisterWithDiffusers(importlib.abc.MetaPathFinder):
    """One-shot import hook: once ``diffusers`` has been imported, give it the lazy attribute."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _lazy_pipeline_attribute(sys.modules.get(fullname, module))

        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    if "diffusers" in sys.modules:  # imported already (or made unimportable: sys.modules["diffusers"] = None)
        if isinstance(sys.modules["diffusers"], types.ModuleType):
            _lazy_pipeline_attribute(sys.modules["diffusers"])
        return
    try:
        available = importlib.util.find_spec("diffusers") is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken installation: no pipeline
        available = False
    if available and not any(isinstance(f, _RegisterWithDiffusers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithDiffusers())


_install()
