"""Shared benchmark utilities: timing medians (p20/p50/p80), environment facts, JSON rows, tables.

Every benchmark in bench/ times with :func:`bench` and writes rows with :func:`write_results`, so results
from different scripts and machines share one schema:
``{"bench", "case", "provider", "mode", "ms_p20", "ms_p50", "ms_p80", ...metrics, "env": {...}}``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or platform.machine() or 'cpu'} ({cores} cores)"


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["sm"] = "".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, warmup: int = 3, rep: int = 10, min_time_s: float = 0.0) -> dict[str, float]:
    """Time ``fn`` -> {"ms_p20", "ms_p50", "ms_p80"}. On CUDA uses ``triton.testing.do_bench`` (L2 flushed
    between runs, CUDA events); on CPU wall-clock over ``rep`` runs after ``warmup``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=max(25, warmup), rep=max(100, rep), quantiles=[0.2, 0.5, 0.8])
        return {"ms_p20": p20, "ms_p50": p50, "ms_p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"ms_p20": q[1], "ms_p50": statistics.median(times), "ms_p80": q[7]}


def write_results(name: str, rows: list[dict[str, Any]], device: torch.device, out_dir: Path | None = None) -> Path:
    """Write ``rows`` (plus the environment) to bench/results/<device>/<name>.json and return the path."""
    env = env_info(device)
    out_dir = out_dir or RESULTS / slug(env["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "env": env, "rows": rows}, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Fixed-width table of ``columns`` (floats with 3 significant decimals)."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_threads() -> None:
    """Use every core the process may run on (benchmarks, unlike tests, should not share the machine)."""
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        pass


def time_steps(fn: Callable[[], Any], device: torch.device, steps: int) -> dict[str, float]:
    """Time ``steps`` consecutive calls of a stateful ``fn`` (a training step) without host syncs between
    them (CUDA events per call; wall clock on CPU) -> {"ms_p20", "ms_p50", "ms_p80", "ms_mean", "window_s"}.
    ``ms_mean`` is the pipelined throughput figure (window / steps); the quantiles spread single steps."""
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        synchronize(device)
        times = [a.elapsed_time(b) for a, b in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    window = time.perf_counter() - start
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"ms_p20": q[1], "ms_p50": statistics.median(times), "ms_p80": q[7], "ms_mean": 1e3 * window / steps,
            "window_s": window}
