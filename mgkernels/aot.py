"""Compile the Triton kernels ahead of time for a GPU this machine does not have, and read the machine code.

A kernel engineer's question "what will the H100/H200 run?" is answered without one: the Triton wheel ships
NVIDIA's ``ptxas`` and ``cuobjdump``, so every ``@triton.jit`` kernel can be compiled for sm_90 on a CPU-only
machine, exactly as its launcher would launch it, and its resources and instructions read from the SASS.

How it works (:func:`compile_only`): a stand-in Triton driver reports ``GPUTarget("cuda", 90, 32)`` and the
launch heuristics see a 132-SM GPU (:func:`mgkernels._common.target_sm_count`); ``kernel[grid](...)`` becomes
a compile-only warm-up (Triton's own ``warmup=True`` path: the same specialisation on argument values,
divisibility and constexprs as a real launch) and every compile is recorded with its grid. Call the op's
launchers (``_fwd_triton`` ...) with ``meta`` tensors of the real shapes: nothing is allocated.

:func:`inspect` turns one compiled kernel into a :class:`KernelStats`: registers, spill bytes and stack frame
(``ptxas -v``), static + dynamic shared memory, CTAs per SM and what limits them, waves over the SMs, MMA kind
(HGMMA = wgmma, HMMA = mma.sync, FFMA only), global load/store widths and cp.async / TMA use.

Must run in a process where ``TRITON_INTERPRET`` is not ``1`` (under the interpreter ``@triton.jit`` returns
interpreted functions that cannot be compiled); tests run it in a subprocess (``bench/compile_report.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _common

__all__ = ["Launch", "KernelStats", "compile_only", "inspect", "nvidia_tool", "H100_SXM", "SM90"]

# sm_90 per-SM limits (CUDA C Programming Guide, compute capability 9.0)
SM90 = dict(regs_per_sm=65536, max_regs_per_thread=255, max_threads_per_sm=2048, max_ctas_per_sm=32,
            smem_per_sm=233472, smem_reserved_per_cta=1024, reg_alloc_unit_per_warp=256)
H100_SXM = 132  # SMs of an H100 / H200 SXM


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](...)`` call seen by :func:`compile_only`."""

    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any]
    compiled: Any  # triton.compiler.CompiledKernel

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclasses.dataclass
class KernelStats:
    kernel: str
    num_warps: int
    num_stages: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    occupancy_limit: str  # registers | shared memory | threads | CTA slots
    programs: int
    waves: float
    mma: str  # HGMMA | HMMA | FFMA | none
    mma_counts: dict[str, int]
    loads: dict[str, int]  # global load instructions by width in bits ("128": n, ...)
    stores: dict[str, int]
    cp_async: int  # LDGSTS (cp.async) + UTMALDG (TMA) instructions
    local_mem_insts: int  # LDL + STL
    constexprs: dict[str, Any]

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def widest_load(self) -> int:
        return max((int(w) for w in self.loads), default=0)

    def narrow_load_fraction(self) -> float:
        """Share of global load instructions narrower than 128 bits (scalar or 64-bit)."""
        total = sum(self.loads.values())
        return 0.0 if not total else sum(n for w, n in self.loads.items() if int(w) < 128) / total

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spill_bytes"] = self.spill_bytes
        d["constexprs"] = {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in self.constexprs.items()}
        return d


# ----------------------------------------------------------------------------------------------------------
# compile-only launches
# ----------------------------------------------------------------------------------------------------------


def _triton_modules():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    return triton, GPUTarget, DriverBase, driver, JITFunction


def _make_driver(capability: int):
    _, GPUTarget, DriverBase, _, _ = _triton_modules()

    class CompileOnlyDriver(DriverBase):
        """Just enough of a CUDA driver for Triton to specialise and compile, never to launch."""

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("mgkernels.aot: compile-only driver cannot time kernels")

        def get_current_device(self):
            return 0

        def set_current_device(self, index):
            return None

        def get_current_stream(self, device=None):
            return 0

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(capability: int = 90, sms: int = H100_SXM) -> Iterator[list[Launch]]:
    """Inside the block, Triton kernel launches compile for ``sm_<capability>`` and run nothing; the launch
    heuristics see ``sms`` SMs. Yields the list the launches are appended to."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("mgkernels.aot.compile_only: TRITON_INTERPRET=1 is set, so @triton.jit made interpreted "
                           "functions that cannot be compiled; run in a process without it "
                           "(python bench/compile_report.py)")
    _, _, _, driver, JITFunction = _triton_modules()
    launches: list[Launch] = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            g = tuple(grid) + (1,) * (3 - len(grid))
            constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")}
            launches.append(Launch(self.fn.__name__, g, kernel.metadata.num_warps, kernel.metadata.num_stages,
                                   constexprs, kernel))
        return kernel

    token = _common.set_target_sm_count(sms)
    previous = driver._active  # None on a machine without a GPU: there is no default driver to reset to
    driver.set_active(_make_driver(capability))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        driver._active = previous
        _common.reset_target_sm_count(token)


# ----------------------------------------------------------------------------------------------------------
# reading the machine code
# ----------------------------------------------------------------------------------------------------------


def nvidia_tool(name: str) -> str:
    """Path of ``ptxas`` / ``cuobjdump`` / ``nvdisasm`` as shipped inside the Triton wheel."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this Triton wheel does not ship {name}")
    return str(path)


def _ptxas_report(ptx: str, arch: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([nvidia_tool("ptxas"), "-v", "--regAllocOptLevel=2", "-lineinfo", f"--gpu-name={arch}",
                              str(src), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    out = {"registers": 0, "stack": 0, "spill_store": 0, "spill_load": 0}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack"], out["spill_store"], out["spill_load"] = map(int, m.groups())
    return out


_LOAD = re.compile(r"\b(LDGSTS|UTMALDG|UBLKCP|LDG|STG|LDL|STL|HGMMA|HMMA|FFMA|DFMA)((?:\.[A-Za-z0-9_]+)*)(?=[\s;,])")


def _width(mods: str, default: int = 32) -> int:
    for w in ("128", "64", "U16", "S16", "U8", "S8", "16", "8"):
        if f".{w}" in mods:
            return {"U16": 16, "S16": 16, "U8": 8, "S8": 8}[w] if w[0] in "US" else int(w)
    return default


def _sass_counts(cubin: bytes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([nvidia_tool("cuobjdump"), "--dump-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
    loads: dict[str, int] = {}
    stores: dict[str, int] = {}
    mma = {"HGMMA": 0, "HMMA": 0, "FFMA": 0}
    cp_async = local = 0
    for line in sass.splitlines():
        if "/*" not in line:
            continue
        m = _LOAD.search(line.split("*/", 1)[-1])
        if not m:
            continue
        op, mods = m.group(1), m.group(2) or ""
        if op == "LDG":
            loads[str(_width(mods))] = loads.get(str(_width(mods)), 0) + 1
        elif op == "STG":
            stores[str(_width(mods))] = stores.get(str(_width(mods)), 0) + 1
        elif op in ("LDGSTS", "UTMALDG", "UBLKCP"):  # cp.async / TMA: counted as loads of their width too
            cp_async += 1
            if op == "LDGSTS":
                loads[str(_width(mods))] = loads.get(str(_width(mods)), 0) + 1
        elif op in ("LDL", "STL"):
            local += 1
        elif op in mma:
            mma[op] += 1
    static_smem = int(m.group(1)) if (m := re.search(r"SHARED:(\d+)", usage)) else 0
    return dict(loads=loads, stores=stores, mma=mma, cp_async=cp_async, local=local, static_smem=static_smem)


def _occupancy(regs: int, warps: int, smem: int) -> tuple[int, str]:
    threads = warps * 32
    regs_per_warp = math.ceil(max(regs, 1) * 32 / SM90["reg_alloc_unit_per_warp"]) * SM90["reg_alloc_unit_per_warp"]
    warps_by_regs = SM90["regs_per_sm"] // regs_per_warp
    limits = {
        "registers": warps_by_regs // warps,
        "threads": SM90["max_threads_per_sm"] // threads,
        "CTA slots": SM90["max_ctas_per_sm"],
        "shared memory": SM90["smem_per_sm"] // (smem + SM90["smem_reserved_per_cta"]) if smem else 10**9,
    }
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name


def inspect(launch: Launch, sms: int = H100_SXM) -> KernelStats:
    """Resources and instruction mix of one compiled launch (see the module docstring)."""
    compiled = launch.compiled
    arch = re.search(r"\.target (sm_\w+)", compiled.asm["ptx"]).group(1)
    ptxas = _ptxas_report(compiled.asm["ptx"], arch)
    sass = _sass_counts(compiled.asm["cubin"])
    smem = int(compiled.metadata.shared) + sass["static_smem"]
    ctas, limit = _occupancy(ptxas["registers"], launch.num_warps, smem)
    mma = sass["mma"]
    kind = "HGMMA" if mma["HGMMA"] else "HMMA" if mma["HMMA"] else "FFMA" if mma["FFMA"] else "none"
    return KernelStats(
        kernel=launch.kernel, num_warps=launch.num_warps, num_stages=launch.num_stages,
        registers=ptxas["registers"], spill_store_bytes=ptxas["spill_store"], spill_load_bytes=ptxas["spill_load"],
        stack_bytes=ptxas["stack"], shared_bytes=smem, ctas_per_sm=ctas, occupancy_limit=limit,
        programs=launch.programs, waves=launch.programs / max(1, ctas * sms), mma=kind, mma_counts=mma,
        loads=sass["loads"], stores=sass["stores"], cp_async=sass["cp_async"], local_mem_insts=sass["local"],
        constexprs=launch.constexprs,
    )  # fmt: skip
