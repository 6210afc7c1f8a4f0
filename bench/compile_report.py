"""sm_90 compile report: what an H100 / H200 would run for every fused kernel, read without a GPU.

Every ``@triton.jit`` kernel of ``mgkernels`` is compiled ahead of time for sm_90, exactly as its launcher
launches it for the model's shapes (``mgkernels.aot.compile_only``: meta tensors, a compile-only Triton
driver, 132 SMs), and its machine code is read (``mgkernels.aot.inspect``: ptxas -v + cuobjdump from the
Triton wheel). Per kernel: registers, spill bytes, shared memory, CTAs per SM and the limiting resource,
waves over 132 SMs, MMA kind (HGMMA = wgmma / HMMA = mma.sync / FFMA), global load / store widths, cp.async.
Per op (its kernels together): a roofline line -- the DRAM bytes and matmul FLOPs the kernels move / issue
against the op's minimum (every input read once, every output written once; useful FLOPs only), and the
time each predicts at the H200 ceilings measured on this project's device (4.3 TB/s copy, 790 TFLOP/s
dense bf16; fp32 IEEE products on the FMA units at 60 TFLOP/s).

Predicted kernel time = max(bytes / BW, issued FLOPs / peak) / utilisation, where utilisation is the share
of the SMs that have work (a grid smaller than the GPU), times the last wave's fill, times (memory-bound
kernels) min(1, loads in flight per SM / 32 KB) -- Little's law: an SM needs about 32 KB of loads in flight
to stream at its share of 4.3 TB/s with ~1 us of latency. K/V re-reads across the query blocks of one
sequence count once: the 1-D grids run those programs side by side, so they are L2 hits (an assumption of
the model; a GPU run checks it).

    python bench/compile_report.py                 # STDiT-XL/2 16x256x256, B = 8, captions 120 / 300
    python bench/compile_report.py --small --dtypes fp16 --out /tmp/r   # the CI test's shapes

Writes ``compile_report.json`` and ``compile_report.md`` under ``--out`` (default
``bench/results/sm90-aot/``). Runs in a process without ``TRITON_INTERPRET=1`` (it removes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, never interpret

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgkernels import aot  # noqa: E402
from mgkernels import gated_cross_attn as gca  # noqa: E402
from mgkernels import modulate as mod  # noqa: E402
from mgkernels import residual_modulate as resmod  # noqa: E402
from mgkernels import st_attention as sta  # noqa: E402
from mgkernels._tiles import padded_head  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sm90-aot"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
H200 = dict(bw=4.3e12, tc=790e12, fma=60e12, sms=aot.H100_SXM, inflight=32 * 1024)


@dataclasses.dataclass
class Shapes:
    """Model shapes of one report: B samples, T frames x S tokens, H heads x D, captions of L tokens."""

    B: int = 8
    T: int = 16
    S: int = 256
    H: int = 16
    D: int = 72
    captions: tuple[int, ...] = (120, 300)

    @property
    def N(self) -> int:
        return self.T * self.S

    @property
    def C(self) -> int:
        return self.H * self.D


XL2 = Shapes()
# the CI test's shapes: the same code paths as XL/2 (flash spatial tiles, packed temporal tiles, captions of
# one and several key blocks, hidden 1152), a batch of 2 (nothing is allocated either way: meta tensors)
SMALL = Shapes(B=2, T=16, S=256, H=16, D=72, captions=(120, 300))


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------------------------------------
# The ops: each runs its launchers under compile_only and returns, per kernel, the DRAM bytes it moves and
# the matmul FLOPs it issues, plus the op's minimum bytes and useful FLOPs.
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    name: str
    min_bytes: float
    useful_flops: float
    kernel_bytes: dict[str, float]  # kernel name -> DRAM bytes moved
    kernel_flops: dict[str, float]  # kernel name -> matmul FLOPs issued (tiles as computed)
    launches: list[aot.Launch]


def _op(name: str, launch: tuple, min_bytes: float, useful_flops: float, kbytes: dict[str, float],
        kflops: dict[str, float] | None = None) -> Op:
    """Compile ``launch = (launcher, *arguments)`` for sm_90 and wrap it with its byte / FLOP counts."""
    fn, *args = launch
    with aot.compile_only(sms=H200["sms"]) as launches:
        fn(*args)
    return Op(name, min_bytes, useful_flops, kbytes, kflops or {}, list(launches))


def modulate_ops(s: Shapes, dt: torch.dtype) -> list[Op]:
    E, rows = torch.tensor([], dtype=dt).element_size(), s.B * s.N
    x, v, st = meta(s.B, s.N, s.C, dtype=dt), meta(s.B, s.C, dtype=dt), meta(s.B, s.N, dtype=torch.float32)
    big = rows * s.C * E
    part = lambda per_sm: 2 * 4 * s.C * s.B * max(1, per_sm * H200["sms"] // s.B)  # noqa: E731 (fp32 partials, w + r)
    return [
        _op("modulate fwd", (mod._fwd_triton, x, v, v, 1e-6), 2 * big, 0,
            {"_modulate_fwd_kernel": 2 * big + 8 * rows}),
        _op("modulate bwd", (mod._bwd_triton, x, x, v, st, st), 3 * big, 0,
            {"_modulate_bwd_kernel": 3 * big + 8 * rows + part(3)}),
        _op("residual_modulate fwd", (resmod._fwd_triton, x, x, v, v, v, 1e-6), 4 * big, 0,
            {"_resmod_fwd_kernel": 4 * big + 8 * rows}),
        _op("residual_modulate bwd", (resmod._bwd_triton, x, x, x, v, x, v, st, st), 6 * big, 0,
            {"_resmod_bwd_kernel": 6 * big + 8 * rows + 1.5 * part(3)}),
    ]


def _attn_flops(n_q_rows: float, n_k_cols: float, D: int, gemms: int) -> float:
    return 2.0 * n_q_rows * n_k_cols * D * gemms


def st_attention_ops(s: Shapes, dt: torch.dtype) -> list[Op]:
    E = torch.tensor([], dtype=dt).element_size()
    big = s.B * s.N * s.C * E  # one [B, T*S, C] tensor
    lse = s.B * s.H * s.N * 4
    qkv = meta(s.B, s.N, 3, s.H, s.D, dtype=dt)
    Dp = padded_head(s.D)
    ops = []
    for mode in ("spatial", "temporal"):
        G, L, _, _ = sta._geometry(s.T, s.S, mode)
        cfg = sta._config(L, s.D, dt)
        seqs = s.B * G * s.H
        useful_fwd = seqs * _attn_flops(L, L, s.D, 2)
        if cfg["packed"]:
            tiles = s.B * math.ceil(G / cfg["PACK"]) * s.H
            issued = tiles * _attn_flops(cfg["BLOCK"], cfg["BLOCK"], Dp, 1)  # per GEMM over the packed tile
            fwd_k = {"_st_attn_fwd_kernel": issued * 2}
            bwd_k = {"_st_attn_bwd_packed_kernel": issued * 5}
            bwd_bytes = {"_st_attn_bwd_packed_kernel": 8 * big + lse}
        else:
            bm, bn = cfg["fwd"][:2]
            cover = lambda b, n=L: math.ceil(n / b) * b  # noqa: E731
            fwd_k = {"_st_attn_fwd_kernel": seqs * _attn_flops(cover(bm), cover(bn), Dp, 2)}
            (kbm, kbn), (qbm, qbn) = cfg["dkdv"][:2], cfg["dq"][:2]
            bwd_k = {"_st_attn_bwd_dkdv_kernel": seqs * _attn_flops(cover(kbm), cover(kbn), Dp, 4),
                     "_st_attn_bwd_dq_kernel": seqs * _attn_flops(cover(qbm), cover(qbn), Dp, 3)}
            bwd_bytes = {"_st_attn_bwd_delta_kernel": 2 * big + lse,
                         "_st_attn_bwd_dkdv_kernel": 4 * big + 2 * lse + 2 * big,
                         "_st_attn_bwd_dq_kernel": 4 * big + 2 * lse + big}
        o = meta(s.B, s.N, s.C, dtype=dt)
        l_ = meta(s.B, s.H, s.N, dtype=torch.float32)
        ops.append(_op(f"{mode} attention fwd", (sta._st_attention_fwd_triton, qkv, s.T, s.S, mode),
                       4 * big + lse, useful_fwd, {"_st_attn_fwd_kernel": 4 * big + lse}, fwd_k))
        ops.append(_op(f"{mode} attention bwd",
                       (sta._st_attention_bwd_triton, o, qkv, o, l_, s.T, s.S, mode),
                       8 * big + lse, 2.5 * useful_fwd, bwd_bytes, bwd_k))
    return ops


def cross_attention_ops(s: Shapes, dt: torch.dtype) -> list[Op]:
    E = torch.tensor([], dtype=dt).element_size()
    big = s.B * s.N * s.C * E
    lse = s.B * s.H * s.N * 4
    Dp = padded_head(s.D)
    q = meta(s.B, s.N, s.H, s.D, dtype=dt)
    ops = []
    for L in s.captions:
        kv = meta(s.B, L, 2, s.H, s.D, dtype=dt)
        k, v = kv[:, :, 0], kv[:, :, 1]
        mask = torch.empty(s.B, L, dtype=torch.bool, device="meta")
        small = 2 * s.B * L * s.C * E  # k and v
        bm, bn = gca._TILES["fp32" if dt == torch.float32 else "tc"]["fwd"][:2]
        kbm, kbn = gca._TILES["fp32" if dt == torch.float32 else "tc"]["dkdv"][:2]
        qbm, qbn = gca._TILES["fp32" if dt == torch.float32 else "tc"]["dq"][:2]
        cover = lambda n, b: math.ceil(n / b) * b  # noqa: E731
        heads = s.B * s.H
        useful = heads * _attn_flops(s.N, L, s.D, 2)
        ops.append(_op(f"cross attention fwd L={L}", (gca._triton_fwd, None, q, k, v, None, mask, True),
                       2 * big + small + lse, useful, {"_gca_fwd_kernel": 2 * big + small + lse},
                       {"_gca_fwd_kernel": heads * _attn_flops(cover(s.N, bm), cover(L, bn), Dp, 2)}))
        o = meta(s.B, s.N, s.H, s.D, dtype=dt)
        l_ = meta(s.B, s.H, s.N, dtype=torch.float32)
        ops.append(_op(f"cross attention bwd L={L}", (gca._triton_bwd, o, q, k, v, None, mask, o, l_),
                       4 * big + 2 * small + lse, 2.5 * useful,
                       {"_gca_bwd_preprocess_kernel": 2 * big + lse,
                        "_gca_bwd_dkdv_kernel": 2 * big + 2 * small + 2 * lse,
                        "_gca_bwd_dq_kernel": 3 * big + small + 2 * lse},
                       {"_gca_bwd_dkdv_kernel": heads * _attn_flops(cover(s.N, kbm), cover(L, kbn), Dp, 4),
                        "_gca_bwd_dq_kernel": heads * _attn_flops(cover(s.N, qbm), cover(L, qbn), Dp, 3)}))
    # the gated op itself (residual in the epilogue), at the first caption length
    L = s.captions[0]
    kv = meta(s.B, L, 2, s.H, s.D, dtype=dt)
    x = meta(s.B, s.N, s.C, dtype=dt)
    lam = meta(s.H, dtype=torch.float32)
    mask = torch.empty(s.B, L, dtype=torch.bool, device="meta")
    small = 2 * s.B * L * s.C * E
    useful = s.B * s.H * _attn_flops(s.N, L, s.D, 2)
    bm, bn = gca._TILES["fp32" if dt == torch.float32 else "tc"]["fwd"][:2]
    issued = s.B * s.H * _attn_flops(math.ceil(s.N / bm) * bm, math.ceil(L / bn) * bn, Dp, 2)
    ops.append(_op(f"gated cross attention fwd L={L}",
                   (gca._triton_fwd, x, q, kv[:, :, 0], kv[:, :, 1], lam, mask, True),
                   4 * big + small + lse, useful, {"_gca_fwd_kernel": 4 * big + small + lse},
                   {"_gca_fwd_kernel": issued}))
    return ops


# ----------------------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------------------


def _step_bytes(st: aot.KernelStats) -> float:
    """Bytes of global loads one program has in flight per step: its load instructions' widths x threads
    (a whole loop body's loads issue before their first use; cp.async stages add to it)."""
    per_thread = sum(int(w) // 8 * n for w, n in st.loads.items())
    return per_thread * st.num_warps * 32 / max(1, st.num_stages if st.cp_async else 1)


def kernel_time(st: aot.KernelStats, dram_bytes: float, flops: float) -> dict[str, float]:
    peak = H200["tc"] if st.mma in ("HGMMA", "HMMA") else H200["fma"]
    if st.mma == "HMMA":
        peak /= 2  # mma.sync reaches about half of wgmma's rate on Hopper
    t_bytes, t_flops = dram_bytes / H200["bw"], flops / peak
    sm_busy = min(1.0, st.programs / H200["sms"])
    waves = st.waves
    tail = waves / math.ceil(waves) if waves >= 1 else 1.0
    util = sm_busy * tail
    if t_bytes >= t_flops:  # memory-bound: enough loads in flight per SM?
        inflight = min(st.ctas_per_sm, max(1, math.ceil(st.programs / H200["sms"]))) * _step_bytes(st)
        util *= min(1.0, inflight / H200["inflight"])
    return dict(t_bytes_us=1e6 * t_bytes, t_flops_us=1e6 * t_flops, utilisation=util,
                t_pred_us=1e6 * max(t_bytes, t_flops) / max(util, 1e-9))


def report(shapes: Shapes, dtypes: list[str]) -> dict[str, Any]:
    kernels, ops = [], []
    for dname in dtypes:
        dt = DTYPES[dname]
        for op in modulate_ops(shapes, dt) + st_attention_ops(shapes, dt) + cross_attention_ops(shapes, dt):
            t_pred = 0.0
            issued_flops = 0.0
            moved = 0.0
            for launch in op.launches:
                st = aot.inspect(launch, sms=H200["sms"])
                b = op.kernel_bytes.get(launch.kernel, 0.0)
                f = op.kernel_flops.get(launch.kernel, 0.0)
                t = kernel_time(st, b, f)
                t_pred += t["t_pred_us"]
                issued_flops += f
                moved += b
                kernels.append(dict(op=op.name, dtype=dname, grid=list(launch.grid), **st.as_dict(),
                                    narrow_load_fraction=st.narrow_load_fraction(), dram_bytes=b,
                                    issued_flops=f, **t))
            t_min = 1e6 * max(op.min_bytes / H200["bw"], op.useful_flops / (H200["fma"] if dt == torch.float32 else H200["tc"]))
            ops.append(dict(op=op.name, dtype=dname, kernels=[launch.kernel for launch in op.launches],
                            min_bytes=op.min_bytes, dram_bytes=moved, useful_flops=op.useful_flops,
                            issued_flops=issued_flops,
                            padding_waste=(1 - op.useful_flops / issued_flops) if issued_flops else 0.0,
                            t_min_us=t_min, t_pred_us=t_pred, ratio=t_pred / t_min if t_min else float("nan")))
    return dict(kernels=kernels, ops=ops)


def head_padding_waste(D: int) -> float:
    """Share of the tensor-core work over the head dim that is padding (72 -> 64 + 16 = 80: 10%)."""
    return 1 - D / padded_head(D)


def environment(shapes: Shapes) -> dict[str, Any]:
    import triton

    ptxas = subprocess.run([aot.nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mgkernels"],
                           capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return dict(target="sm_90a (compiled ahead of time, no GPU)", sms=H200["sms"], triton=triton.__version__,
                torch=torch.__version__, ptxas=ptxas.strip().splitlines()[-1] if ptxas else "?",
                git_sha=(sha or "unknown") + ("-dirty" if dirty else ""),
                date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                shapes=dataclasses.asdict(shapes), ceilings=H200,
                head_dim_padding_waste=head_padding_waste(shapes.D))


def markdown(data: dict[str, Any]) -> str:
    env = data["env"]
    sh = env["shapes"]
    lines = [
        "# sm_90 compile report",
        "",
        f"Every Triton kernel compiled ahead of time for {env['target']}, {env['sms']} SMs; triton {env['triton']}, "
        f"{env['ptxas']}; git {env['git_sha']}, {env['date']}. Shapes: B = {sh['B']}, T = {sh['T']}, S = {sh['S']}, "
        f"H = {sh['H']}, D = {sh['D']}, captions {sh['captions']}. Head-dim padding waste in every attention "
        f"GEMM: {100 * env['head_dim_padding_waste']:.0f}% ({sh['D']} computed as {padded_head(sh['D'])}).",
        "",
        "Regenerate: `python bench/compile_report.py` (the module docstring explains the roofline).",
        "",
        "## Kernels",
        "",
        "| op | dtype | kernel | warps | stages | regs | spill B | smem KB | CTA/SM (limit) | programs | waves | MMA | loads (bits: n) | cp.async | pred us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in data["kernels"]:
        loads = " ".join(f"{w}:{n}" for w, n in sorted(k["loads"].items(), key=lambda x: -int(x[0])))
        lines.append(
            f"| {k['op']} | {k['dtype']} | {k['kernel']} | {k['num_warps']} | {k['num_stages']} | {k['registers']} | "
            f"{k['spill_bytes']} | {k['shared_bytes'] / 1024:.1f} | {k['ctas_per_sm']} ({k['occupancy_limit']}) | "
            f"{k['programs']} | {k['waves']:.2f} | {k['mma']} | {loads} | {k['cp_async']} | {k['t_pred_us']:.1f} |")
    lines += ["", "## Roofline per op (H200 ceilings: 4.3 TB/s, 790 TFLOP/s bf16, 60 TFLOP/s fp32 FMA)", "",
              "| op | dtype | min MB | moved MB | useful GFLOP | issued GFLOP | tile waste | min us | predicted us | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for o in data["ops"]:
        lines.append(
            f"| {o['op']} | {o['dtype']} | {o['min_bytes'] / 1e6:.1f} | {o['dram_bytes'] / 1e6:.1f} | "
            f"{o['useful_flops'] / 1e9:.1f} | {o['issued_flops'] / 1e9:.1f} | {100 * o['padding_waste']:.0f}% | "
            f"{o['t_min_us']:.1f} | {o['t_pred_us']:.1f} | {o['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="small shapes (the CI test): B=2, T=16, S=256, H=16, D=72")
    ap.add_argument("--batch", type=int, default=None, help="override B")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (compile_report.json / .md)")
    args = ap.parse_args(argv)
    shapes = dataclasses.replace(SMALL if args.small else XL2)
    if args.batch:
        shapes.B = args.batch
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    data = report(shapes, dtypes)
    data["env"] = environment(shapes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_report.json").write_text(json.dumps(data, indent=1) + "\n")
    md = markdown(data)
    (args.out / "compile_report.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'compile_report.json'} and compile_report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
