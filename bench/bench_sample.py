"""Sampling speed of the denoiser: reference (eager PyTorch + SDPA, what an Open-Sora v1.0 user runs) vs
accelerated (``modelgrow.accelerate``: fused kernels, compile, CUDA graphs on CUDA).

    python bench/bench_sample.py                                  # STDiT-XL/2, 16x256x256, 100 steps (GPU)
    python bench/bench_sample.py --preset STDiT-tiny --size 4x64x64 --steps 5 --caption-tokens 8 --caption-channels 32

Per guidance mode (single-condition CFG: 2B samples per step; two-condition T5+LLM: 3B): milliseconds per
denoising step (median of timed steps), seconds per video for the whole loop (steps x per-step), TFLOP/s
from the analytic FLOP model and MFU against the matmul peak measured in the same run. Text encoders and
the VAE are not included (random conditions of the right shapes). JSON: bench/results/<device>/bench_sample.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import bench, default_threads, pick_device, print_table, write_results  # noqa: E402

from mgkernels.dispatch import use  # noqa: E402
from modelgrow import accelerate  # noqa: E402
from modelgrow.diffusion import cfg_model_fn, two_condition_model_fn  # noqa: E402
from modelgrow.grow import add_llm_condition  # noqa: E402
from modelgrow.models import create_model, dtype_from_name  # noqa: E402
from modelgrow.models.flops import stdit_flops  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul TFLOP/s (the MFU denominator): the best of a few square sizes."""
    best = 0.0
    for n in (4096, 8192) if device.type == "cuda" else (1024, 2048):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        r = bench(lambda: a @ b, device, warmup=3, rep=20 if device.type == "cuda" else 5)
        best = max(best, 2 * n**3 / (r["ms_p20"] * 1e-3) / 1e12)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="STDiT-XL/2")
    ap.add_argument("--size", default="16x256x256", help="frames x height x width in pixels (VAE /8)")
    ap.add_argument("--batch", type=int, default=1, help="videos per batch")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--caption-tokens", type=int, default=120)
    ap.add_argument("--caption-channels", type=int, default=4096)
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--modes", default="single,two")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", default=None, help="directory for bench_sample.json (default bench/results/<device>/)")
    args = ap.parse_args(argv)
    out_dir = Path(args.out) if args.out else None

    default_threads()
    device = pick_device(args.device)
    dtype = dtype_from_name(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    F, H, W = (int(v) for v in args.size.split("x"))
    latent = (F, H // 8, W // 8)
    L, Cc, B = args.caption_tokens, args.caption_channels, args.batch
    peak = matmul_peak(device, dtype)
    rep = args.rep or (20 if device.type == "cuda" else 3)
    print(f"device {device} | {dtype} | measured matmul peak {peak:.1f} TFLOP/s")

    rows = []
    for mode in args.modes.split(","):
        groups = 3 if mode == "two" else 2
        base = create_model(args.preset, input_size=latent, caption_channels=Cc, model_max_length=L, dtype=dtype)
        model = add_llm_condition(base, Cc, L) if mode == "two" else base
        model = model.to(device=device, dtype=dtype).eval()
        flops = stdit_flops(**model.config, caption_tokens=L, llm_tokens=L if mode == "two" else 0).total * groups * B
        x = torch.randn(groups * B, 4, *latent, device=device, dtype=dtype)
        t = torch.full((groups * B,), 500, device=device, dtype=torch.long)
        kw = {"y": torch.randn(groups * B, 1, L, Cc, device=device, dtype=dtype),
              "mask": torch.ones(B, L, dtype=torch.long, device=device)}
        if mode == "two":
            kw |= {"y_llm": torch.randn(groups * B, 1, L, Cc, device=device, dtype=dtype)}
        for provider in ("reference", "accelerated"):
            if provider == "reference":
                net, ctx = model, "ref"
            else:
                net, ctx = accelerate(model, dtype=dtype, compile=not args.no_compile), "auto"
            fn = two_condition_model_fn(net, 7.0, 12.5) if mode == "two" else cfg_model_fn(net, 7.0)

            def step():
                with torch.no_grad(), use(ctx):
                    fn(x, t, **kw)

            r = bench(step, device, warmup=3, rep=rep)
            tflops = flops / (r["ms_p50"] * 1e-3) / 1e12
            rows.append({"case": f"{args.preset} {args.size} B={B}", "guidance": mode, "provider": provider, **r,
                         "s_per_video": r["ms_p50"] * args.steps / 1e3 / B, "tflops": tflops, "mfu": tflops / peak,
                         "steps": args.steps, "dtype": str(dtype).replace("torch.", ""), "peak_tflops": peak})
        ref_ms = rows[-2]["ms_p50"]
        rows[-1]["speedup"] = ref_ms / rows[-1]["ms_p50"]
        if not args.no_save:  # each finished guidance mode is on disk at once
            write_results("bench_sample", rows, device, out_dir)
    print_table(rows, ["case", "guidance", "provider", "ms_p20", "ms_p50", "ms_p80", "s_per_video", "tflops", "mfu", "speedup"])
    if not args.no_save:
        print("wrote", write_results("bench_sample", rows, device, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
