"""STDiT forward / forward+backward latency of the reference (eager PyTorch + SDPA) model.

    python bench/bench_stdit.py --preset STDiT-XL/2 --batch 2 --dtype bfloat16     # on a GPU
    python bench/bench_stdit.py --preset STDiT-S/2 --input-size 8,16,16              # on a CPU

Prints a table and writes bench/results/<device>/bench_stdit.json. Throughput is reported as TFLOP/s
from the analytic FLOP model (modelgrow.models.flops); MFU is left to the GPU benchmarks, which know the
device's peak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import bench, default_threads, pick_device, print_table, write_results  # noqa: E402

from modelgrow.models import create_model, dtype_from_name  # noqa: E402
from modelgrow.models.flops import stdit_flops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="STDiT-S/2")
    ap.add_argument("--input-size", default="16,32,32", help="latent T,H,W")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--caption-tokens", type=int, default=120)
    ap.add_argument("--caption-channels", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    default_threads()
    device = pick_device(args.device)
    dtype = dtype_from_name(args.dtype)
    size = tuple(int(v) for v in args.input_size.split(","))
    model = create_model(args.preset, input_size=size, caption_channels=args.caption_channels,
                         model_max_length=args.caption_tokens, dtype=dtype).to(device=device, dtype=dtype)
    B, L = args.batch, args.caption_tokens
    x = torch.randn(B, 4, *size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (B,), device=device).to(dtype)
    y = torch.randn(B, 1, L, args.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    flops = stdit_flops(**model.config, caption_tokens=L)

    def fwd():
        with torch.no_grad():
            model(x, t, y, mask)

    def fwd_bwd():
        model(x, t, y, mask).float().square().mean().backward()

    rows = []
    for mode, fn, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.0)):
        r = bench(fn, device, warmup=2, rep=args.rep)
        tflops = flops.total * mult * B / (r["ms_p50"] * 1e-3) / 1e12
        rows.append({"case": f"{args.preset} {B}x{size}", "provider": "ref", "mode": mode, "dtype": args.dtype,
                     **r, "tflop_per_sample": flops.total * mult / 1e12, "tflops": tflops})
    print_table(rows, ["case", "provider", "mode", "dtype", "ms_p20", "ms_p50", "ms_p80", "tflops"])
    if not args.no_save:
        print("wrote", write_results("bench_stdit", rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
