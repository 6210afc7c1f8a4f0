"""Microbenchmarks of the fused kernels against eager PyTorch, torch.compile and library peers.

    python bench/bench_kernels.py                       # every op, shapes of STDiT-XL/2 16x256x256, B = 8
    python bench/bench_kernels.py --ops modulate --size 16x512x512 --batch 2
    python bench/bench_kernels.py --quick               # small shapes (CPU: csrc vs eager)
    python bench/bench_kernels.py --ops spatial_attention,temporal_attention,cross_attn --size 4x64x64 \
        --hidden 64 --heads 4 --caption-tokens 48 --out bench/results/amd-epyc-2-cores/demo-attention
                                                        # the demo's attention shapes (CPU: C++ vs SDPA)

Providers: ``eager`` (the op's PyTorch reference), ``compile`` (torch.compile of the reference), ``triton``
(CUDA), ``csrc`` (the C++ extension: CPU, or its CUDA build), and for attention ``sdpa`` is the reference
(permutes + SDPA) and ``flash-attn`` when installed; ``cross_attn`` is the plain cross-attention STDiT calls. Modes: fwd, bwd, full (fwd+bwd).
Columns: median ms (p20/p80), GB/s and % of the copy bandwidth measured in the same run (memory-bound ops),
TFLOP/s (attention), speed-up vs eager and vs compile. Results: bench/results/<device>/bench_kernels.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import bench, default_threads, pick_device, print_table, write_results  # noqa: E402

import mgkernels  # noqa: E402
from mgkernels import _cpu_attention  # noqa: E402
from mgkernels.dispatch import use  # noqa: E402


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], tuple]  # -> (inputs requiring grad..., ) fresh leaves
    ref: Callable  # reference expression
    fused: Callable  # functional API
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float = 0.0  # attention only


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write), the roofline for the elementwise ops."""
    n = (256 if device.type == "cuda" else 64) * 2**20  # floats
    src = torch.empty(n, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    r = bench(lambda: dst.copy_(src), device, warmup=3, rep=20)
    return 2 * n * 4 / (r["ms_p50"] * 1e-3) / 1e9


def _cases(ops: list[str], B: int, T: int, S: int, C: int, H: int, L: int, dtype, device) -> list[Case]:
    from mgkernels.modulate import modulate, modulate_ref
    from mgkernels.residual_modulate import residual_modulate, residual_modulate_ref

    N, e = T * S, torch.tensor([], dtype=dtype).element_size()
    act = B * N * C * e
    leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    out: list[Case] = []
    if "modulate" in ops:
        out.append(Case("modulate", f"[{B},{N},{C}]", lambda: (leaf(B, N, C), leaf(B, 1, C), leaf(B, 1, C)),
                        modulate_ref, modulate, bytes_fwd=2 * act, bytes_bwd=3 * act))
    if "residual_modulate" in ops:
        out.append(Case("residual_modulate", f"[{B},{N},{C}]",
                        lambda: (leaf(B, N, C), leaf(B, N, C), leaf(B, 1, C), leaf(B, 1, C), leaf(B, 1, C)),
                        residual_modulate_ref, residual_modulate, bytes_fwd=4 * act, bytes_bwd=6 * act))
    D = C // H
    for mode, seq, groups in (("spatial", S, B * T), ("temporal", T, B * S)):
        if f"{mode}_attention" not in ops:
            continue
        try:
            mod = importlib.import_module("mgkernels.st_attention")
        except ImportError:
            continue
        flops = 4.0 * groups * H * seq * seq * D
        out.append(Case(f"{mode}_attention", f"B={B} T={T} S={S} H={H} D={D}",
                        lambda: (leaf(B, N, 3, H, D),),
                        lambda qkv, m=mode, mod=mod: mod.st_attention_ref(qkv, T, S, m),
                        lambda qkv, m=mode, mod=mod: mod.st_attention(qkv, T, S, m),
                        bytes_fwd=4 * act, bytes_bwd=8 * act, flops_fwd=flops))
    if "cross_attn" in ops:  # the plain cross-attention: what STDiT's T5 and LLM cross-attention call
        mod = importlib.import_module("mgkernels.gated_cross_attn")

        def make_ca():
            mask = torch.ones(B, L, dtype=torch.bool, device=device)
            mask[B // 2:, L // 3:] = False
            return leaf(B, N, H, D), leaf(B, L, H, D), leaf(B, L, H, D), mask

        out.append(Case("cross_attn", f"B={B} N={N} L={L} H={H} D={D}", make_ca, mod._ref_attention, mod.cross_attn,
                        bytes_fwd=3 * act, bytes_bwd=6 * act, flops_fwd=4.0 * B * H * N * L * D))
    if "gated_cross_attn" in ops:
        try:
            mod = importlib.import_module("mgkernels.gated_cross_attn")
        except ImportError:
            mod = None
        if mod is not None:
            def make_gca():
                mask = torch.ones(B, L, dtype=torch.bool, device=device)
                mask[B // 2:, L // 3:] = False
                return (leaf(B, N, H, D), leaf(B, N, H, D), leaf(B, L, H, D), leaf(B, L, H, D),
                        torch.full((), 0.3, device=device, requires_grad=True), mask)
            out.append(Case("gated_cross_attn", f"B={B} N={N} L={L} H={H} D={D}", make_gca,
                            mod.gated_cross_attn_ref, mod.gated_cross_attn,
                            bytes_fwd=3 * act, bytes_bwd=6 * act, flops_fwd=4.0 * B * H * N * L * D))
    return out


def _outputs(res):
    return [r for r in (res if isinstance(res, tuple) else (res,)) if isinstance(r, torch.Tensor)]


def run_case(case: Case, provider: str, mode: str, device: torch.device, rep: int) -> dict | None:
    inputs = case.make()
    grads_of = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if provider == "eager":
        fn = case.ref
    elif provider == "compile":
        fn = torch.compile(case.ref)
    else:
        fn = case.fused

    def call():
        with use(provider if provider in ("triton", "csrc") else "ref"):
            return _outputs(fn(*inputs))

    def fwd():
        with torch.no_grad():
            call()

    def prepare():
        if mode == "fwd":
            return fwd
        outs = call()
        douts = [torch.randn_like(o) for o in outs]
        if mode == "bwd":
            return lambda: torch.autograd.grad(outs, grads_of, douts, retain_graph=True)
        return lambda: torch.autograd.grad(call(), grads_of, douts)

    try:
        r = bench(prepare(), device, warmup=3, rep=rep)
    except Exception as e:  # noqa: BLE001 - a provider that cannot run here is reported, not fatal
        print(f"  skip {case.op}/{provider}/{mode}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return None
    nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd, "full": case.bytes_fwd + case.bytes_bwd}[mode]
    nflops = case.flops_fwd * {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode]
    row = {"op": case.op, "shape": case.shape, "provider": provider, "mode": mode, **r,
           "gbps": nbytes / (r["ms_p50"] * 1e-3) / 1e9}
    if nflops:
        row["tflops"] = nflops / (r["ms_p50"] * 1e-3) / 1e12
    return row


def providers_for(device: torch.device, op: str, with_compile: bool) -> list[str]:
    out = ["eager"] + (["compile"] if with_compile else [])
    if device.type == "cuda":
        out.append("triton")
    if op in ("modulate", "residual_modulate") and mgkernels.ext_available() and (
        device.type == "cpu" or mgkernels.build_info().get("cuda")
    ):
        out.append("csrc")
    if op in ("spatial_attention", "temporal_attention", "cross_attn") and device.type == "cpu" and _cpu_attention.AVAILABLE:
        out.append("csrc")  # the C++ short-sequence attention (fp32 CPU)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="modulate,residual_modulate,spatial_attention,temporal_attention,gated_cross_attn")
    ap.add_argument("--size", default="16x256x256", help="video FxHxW in pixels (latent /8, patch 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--caption-tokens", type=int, default=120)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--modes", default="fwd,bwd,full")
    ap.add_argument("--compile", dest="with_compile", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="with_compile", action="store_false")
    ap.add_argument("--quick", action="store_true", help="small shapes: B=2, 16x128x128")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", default=None, help="directory for bench_kernels.json (default bench/results/<device>/)")
    args = ap.parse_args(argv)

    default_threads()
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with_compile = device.type == "cuda" if args.with_compile is None else args.with_compile
    if args.quick:
        args.size, args.batch = "16x128x128", 2
    F, Hp, Wp = (int(v) for v in args.size.split("x"))
    T, S = F, (Hp // 16) * (Wp // 16)
    rep = args.rep or (100 if device.type == "cuda" else 5)
    bw = copy_bandwidth(device)
    print(f"device {device} | {dtype} | copy bandwidth {bw:.1f} GB/s | T={T} S={S} C={args.hidden} B={args.batch}")

    out_dir = Path(args.out) if args.out else None
    rows = []
    for case in _cases(args.ops.split(","), args.batch, T, S, args.hidden, args.heads, args.caption_tokens, dtype, device):
        for mode in args.modes.split(","):
            base = {}
            for provider in providers_for(device, case.op, with_compile):
                row = run_case(case, provider, mode, device, rep)
                if row is None:
                    continue
                base.setdefault(provider, row["ms_p50"])
                row["pct_copy_bw"] = 100.0 * row["gbps"] / bw
                row["dtype"] = str(dtype).replace("torch.", "")
                rows.append(row)
            for row in rows:
                if row["op"] == case.op and row["mode"] == mode:
                    if "eager" in base:
                        row["x_vs_eager"] = base["eager"] / row["ms_p50"]
                    if "compile" in base:
                        row["x_vs_compile"] = base["compile"] / row["ms_p50"]
        if not args.no_save:  # every finished case is on disk at once (a time-boxed run keeps what it measured)
            write_results("bench_kernels", [{**r, "copy_bw_gbps": bw} for r in rows], device, out_dir)
    print_table(rows, ["op", "shape", "mode", "provider", "ms_p20", "ms_p50", "ms_p80", "gbps", "pct_copy_bw",
                       "tflops", "x_vs_eager", "x_vs_compile"])
    if not args.no_save:
        for row in rows:
            row["copy_bw_gbps"] = bw
        print("wrote", write_results("bench_kernels", rows, device, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
