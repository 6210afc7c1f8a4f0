"""The provider dispatcher: MG_KERNELS, use(), fallbacks that warn once, explicit choices that raise."""

import warnings

import pytest
import torch

from mgkernels import _ext, dispatch
from mgkernels.dispatch import KernelUnavailable, choose, use

ALL = ("triton", "csrc", "ref")
CPU = torch.zeros(1)


def test_auto_on_cpu_prefers_csrc_then_ref(monkeypatch):
    monkeypatch.delenv("MG_KERNELS", raising=False)
    expected = "csrc" if _ext.ext_available() else "ref"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert choose("op_a", CPU, ALL) == expected
    assert choose("op_b", CPU, ("triton", "ref")) == "ref"  # no C++ implementation: plain reference, no warning


def test_env_and_context(monkeypatch):
    monkeypatch.setenv("MG_KERNELS", "ref")
    assert choose("op", CPU, ALL) == "ref"
    with use("triton"):  # interpreter is on in the tests (conftest)
        assert choose("op", CPU, ALL) == "triton"
        with use("ref"):
            assert choose("op", CPU, ALL) == "ref"
        assert choose("op", CPU, ALL) == "triton"
    assert choose("op", CPU, ALL) == "ref"
    monkeypatch.setenv("MG_KERNELS", "fastest")
    with pytest.raises(ValueError, match="MG_KERNELS='fastest'"):
        choose("op", CPU, ALL)


def test_explicit_choice_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use("triton"), pytest.raises(KernelUnavailable, match="CUDA tensor"):
        choose("op", CPU, ALL)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_ERROR", "disabled for the test")
    with use("csrc"), pytest.raises(KernelUnavailable, match="disabled for the test"):
        choose("op", CPU, ALL)
    with use("csrc"):  # an op without a C++ implementation runs its reference
        assert choose("op", CPU, ("triton", "ref")) == "ref"


def test_missing_extension_symbol_is_a_fallback_with_one_warning(monkeypatch):
    if not _ext.ext_available():
        pytest.skip("the csrc extension is not built")
    monkeypatch.delenv("MG_KERNELS", raising=False)
    dispatch._warned.clear()
    with pytest.warns(RuntimeWarning, match="no not_a_function"):
        assert choose("op_c", CPU, ALL, csrc_fn="not_a_function") == "ref"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert choose("op_c", CPU, ALL, csrc_fn="not_a_function") == "ref"
    with use("csrc"), pytest.raises(KernelUnavailable, match="rebuild"):
        choose("op_c", CPU, ALL, csrc_fn="not_a_function")


def test_bad_use_argument():
    with pytest.raises(ValueError, match="provider 'cuda'"):
        with use("cuda"):
            pass
