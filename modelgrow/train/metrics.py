"""Throughput accounting for the step line (DESIGN convention 8):
``step | loss | grad_norm | lr | samples/s | tokens/s | TFLOP/s | MFU | mem | data_wait``."""

from __future__ import annotations

import torch

# dense bf16 tensor-core peaks (TFLOP/s) of the devices the project targets, for MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:  # pragma: no cover
        return float("nan")


def step_line(step: int, m: dict) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    return (f"step {step} | loss {m['loss']:.4f} | grad_norm {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
            f"samples/s {m['samples_per_s']:.2f} | tokens/s {m['tokens_per_s']:.0f} | TFLOP/s {m['tflops']:.2f} | "
            f"MFU {mfu} | mem {m['mem_gib']:.2f} GiB | data_wait {100 * m['data_wait']:.1f}%")
