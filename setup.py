"""Build script: package metadata lives in pyproject.toml; this file adds the optional csrc/ extension.

The extension ``mgkernels._C`` is built when a C++ compiler and torch are present at build time (install
with ``--no-build-isolation`` so the build sees the pinned torch instead of downloading another one).
``MG_BUILD_EXT=0`` skips it; so does a missing compiler. CUDA sources (csrc/*.cu) are compiled only when
torch is a CUDA build and nvcc is found. The package imports and works without the extension.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _skip(reason):
    print(f"modelgrow: not building the csrc extension ({reason}); the package works without it", file=sys.stderr)
    return {}


def extension_kwargs():
    if os.environ.get("MG_BUILD_EXT", "1").lower() in ("0", "false", "no", "off"):
        return _skip("MG_BUILD_EXT=0")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return _skip(f"no C++ compiler found ({cxx})")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip("torch is not importable at build time: install torch first and use pip --no-build-isolation")

    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp"), root_dir=here))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu"), root_dir=here))
    macros = [("MG_TORCH_VERSION", f'"{torch.__version__}"')]
    # -fno-trapping-math (clang's default): lets GCC if-convert the float selects / min / max in the SIMD loops
    # (csrc/attention.cpp's exp and masked max); results are unchanged (no reassociation, no fast-math)
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "mgkernels._C",
            cpp + cu,
            define_macros=macros + [("MG_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "mgkernels._C",
            cpp,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
    }


setup(**extension_kwargs())
