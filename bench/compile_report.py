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
the model; a GPU run checks it). A kernel launched several times (a problem split over launches) gets its
bytes and FLOPs in proportion to its programs.

Attention backwards (one pass, see mgkernels.st_attention): DRAM bytes = every input read once (q, k, v, o,
dO, lse) + every gradient written once + the small tensors they zero (counters; the cross-attention's
rowsum(dO * o) for dlam, zeroed and written). Issued FLOPs = 4 GEMMs over (queries covered by BLOCK_M) x
(keys covered by BLOCK_N) + 1 GEMM (dQ = dS K) over (queries covered by BLOCK_Q) x (keys covered by BLOCK_N),
each over the padded head dim. Their scratch -- dS in q's dtype, stored once and read once, and for split
sequences the fp32 dK / dV partial sums (zero-filled once, one atomic add per split, read once; an atomic
counted as the bytes it sends to L2) -- is counted as L2 traffic only, not as DRAM bytes: it is written and
read back within about one program's lifetime by programs that run side by side (the key block is the fastest
grid index), at most ~13 MB of it is live on a 50 MB L2 (3 CTAs x 132 SMs x 64 keys x 256 queries x 2 bytes),
and the last reader drops it with discard.global.L2, so the dirty lines are never written back. The report
lists, per op, all SM<->L2 traffic (re-reads and scratch included), the scratch part, and the L2 bandwidth the
predicted time implies: the L2 is not a ceiling of the model (no measurement on this device yet), so an op
whose implied L2 bandwidth is high (> ~10 TB/s) may be L2-bound on the GPU.

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
from mgkernels._tiles import padded_head, split_rows  # noqa: E402

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
    kernel_l2: dict[str, float] = dataclasses.field(default_factory=dict)  # kernel -> SM<->L2 bytes (all of them)
    kernel_scratch: dict[str, float] = dataclasses.field(default_factory=dict)  # kernel -> of which L2-only scratch


def _op(name: str, launch: tuple, min_bytes: float, useful_flops: float, kbytes: dict[str, float],
        kflops: dict[str, float] | None = None, kl2: dict[str, float] | None = None,
        kscratch: dict[str, float] | None = None) -> Op:
    """Compile ``launch = (launcher, *arguments)`` for sm_90 and wrap it with its byte / FLOP counts (``kl2``:
    the SM<->L2 traffic where it exceeds the DRAM bytes -- re-reads, scratch; default: the DRAM bytes)."""
    fn, *args = launch
    with aot.compile_only(sms=H200["sms"]) as launches:
        fn(*args)
    return Op(name, min_bytes, useful_flops, kbytes, kflops or {}, list(launches), kl2 or {}, kscratch or {})


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
    cover = lambda n, b: math.ceil(n / b) * b  # noqa: E731
    ops = []
    for mode in ("spatial", "temporal"):
        G, L, _, _ = sta._geometry(s.T, s.S, mode)
        cfg = sta._config(L, s.D, dt)
        seqs = s.B * G * s.H
        row = s.D * E  # bytes of one token's head
        useful_fwd = seqs * _attn_flops(L, L, s.D, 2)
        if cfg["packed"]:
            tiles = s.B * math.ceil(G / cfg["PACK"]) * s.H
            issued = tiles * _attn_flops(cfg["BLOCK"], cfg["BLOCK"], Dp, 1)  # per GEMM over the packed tile
            fwd_k = {"_st_attn_fwd_kernel": issued * 2}
            fwd_l2 = {}
            bwd_k = {"_st_attn_bwd_packed_kernel": issued * 5}
            bwd_bytes = {"_st_attn_bwd_packed_kernel": 8 * big + lse}
            bwd_l2, bwd_scr = {}, {}
        else:
            bm, bn = cfg["fwd"][:2]
            fwd_k = {"_st_attn_fwd_kernel": seqs * _attn_flops(cover(L, bm), cover(L, bn), Dp, 2)}
            # every query block reads all of its sequence's keys and values (L2 hits after the first)
            fwd_l2 = {"_st_attn_fwd_kernel": seqs * row * L * (2 + 2 * math.ceil(L / bm)) + lse}
            # one-pass backward: program (sequence, split, key block); pass A = 4 GEMMs (P^T, dV, dP^T, dK) over
            # the split's queries, then the split's last program 1 GEMM (dQ = dS K) over all keys
            kbm, kbn, kbq = cfg["bwd"][:3]
            cq = split_rows(L, max(kbm, kbq))
            nqs, nn_ = math.ceil(L / cq), math.ceil(L / kbn)
            q_rows = nqs * cover(cq, kbq) if nqs > 1 else cover(L, kbq)
            bwd_k = {"_st_attn_bwd_kernel": seqs * (_attn_flops(cover(L, kbm), nn_ * kbn, Dp, 4)
                                                    + _attn_flops(q_rows, nn_ * kbn, Dp, 1))}
            counters = 4 * seqs * (nqs + (3 * nn_ if nqs > 1 else 0))  # torch.zeros
            # DRAM: q, k, v, o, dO and lse read once, dq, dk, dv written once; the dS scratch (and the dK / dV
            # accumulators of split sequences) stay in L2 -- see the module docstring
            bwd_bytes = {"_st_attn_bwd_kernel": 8 * big + lse + counters}
            ds_bytes = seqs * nqs * cq * nn_ * kbn * E
            acc = seqs * nn_ * 2 * kbn * Dp * 4 if nqs > 1 else 0  # fp32 dK / dV partial sums of split keys
            scratch = 2 * ds_bytes + acc * (nqs + 2)  # dS stored + read; acc zeroed, nqs atomic adds, read
            # SM<->L2: every key block of a split reads the split's q, dO, o and lse; the dQ program all keys
            reread = seqs * (nn_ * L * (3 * row + 4) + nqs * L * row) + (nqs - 1) * seqs * L * 2 * row
            bwd_l2 = {"_st_attn_bwd_kernel": reread + 2 * big + 3 * big + lse + scratch}
            bwd_scr = {"_st_attn_bwd_kernel": scratch}
        o = meta(s.B, s.N, s.C, dtype=dt)
        l_ = meta(s.B, s.H, s.N, dtype=torch.float32)
        ops.append(_op(f"{mode} attention fwd", (sta._st_attention_fwd_triton, qkv, s.T, s.S, mode),
                       4 * big + lse, useful_fwd, {"_st_attn_fwd_kernel": 4 * big + lse}, fwd_k, fwd_l2))
        ops.append(_op(f"{mode} attention bwd",
                       (sta._st_attention_bwd_triton, o, qkv, o, l_, s.T, s.S, mode),
                       8 * big + lse, 2.5 * useful_fwd, bwd_bytes, bwd_k, bwd_l2, bwd_scr))
    return ops


def cross_attention_ops(s: Shapes, dt: torch.dtype) -> list[Op]:
    E = torch.tensor([], dtype=dt).element_size()
    big = s.B * s.N * s.C * E
    lse = s.B * s.H * s.N * 4
    Dp = padded_head(s.D)
    row = s.D * E
    heads = s.B * s.H
    q = meta(s.B, s.N, s.H, s.D, dtype=dt)
    tiles = gca._TILES["fp32" if dt == torch.float32 else "tc"]
    cover = lambda n, b: math.ceil(n / b) * b  # noqa: E731
    bm, bn = tiles["fwd"][:2]
    ops = []
    for L in s.captions:
        kv = meta(s.B, L, 2, s.H, s.D, dtype=dt)
        k, v = kv[:, :, 0], kv[:, :, 1]
        mask = torch.empty(s.B, L, dtype=torch.bool, device="meta")
        small = 2 * s.B * L * s.C * E  # k and v
        useful = heads * _attn_flops(s.N, L, s.D, 2)
        fwd_l2 = {"_gca_fwd_kernel": 2 * big + lse + heads * math.ceil(s.N / bm) * L * 2 * row}
        ops.append(_op(f"cross attention fwd L={L}", (gca._triton_fwd, None, q, k, v, None, mask, True),
                       2 * big + small + lse, useful, {"_gca_fwd_kernel": 2 * big + small + lse},
                       {"_gca_fwd_kernel": heads * _attn_flops(cover(s.N, bm), cover(L, bn), Dp, 2)}, fwd_l2))
        # one-pass backward: program (b, h, query split, key block); see st_attention_ops
        kbm, kbn, kbq = tiles["bwd"][:3]
        cq = split_rows(s.N, max(kbm, kbq))
        nqs, nn_ = math.ceil(s.N / cq), math.ceil(L / kbn)
        q_rows = nqs * cover(cq, kbq) if nqs > 1 else cover(s.N, kbq)
        counters = 4 * heads * (nqs + (3 * nn_ if nqs > 1 else 0))
        ds_bytes = heads * nqs * cq * nn_ * kbn * E
        acc = heads * nn_ * 2 * kbn * Dp * 4 if nqs > 1 else 0
        scratch = 2 * ds_bytes + acc * (nqs + 2)
        # DRAM: q, o, dO, k, v, lse read once; dq, dk, dv written once; DOT (rowsum dO * o, for dlam) zeroed and
        # written; dS and the fp32 dK / dV sums stay in L2
        bwd_bytes = 4 * big + 2 * small + 3 * lse + counters
        reread = heads * (nn_ * s.N * (3 * row + 4) + nqs * L * row) + (nqs - 1) * small
        o = meta(s.B, s.N, s.H, s.D, dtype=dt)
        l_ = meta(s.B, s.H, s.N, dtype=torch.float32)
        ops.append(_op(f"cross attention bwd L={L}", (gca._triton_bwd, o, q, k, v, None, mask, o, l_),
                       4 * big + 2 * small + lse, 2.5 * useful, {"_gca_bwd_kernel": bwd_bytes},
                       {"_gca_bwd_kernel": heads * (_attn_flops(cover(s.N, kbm), nn_ * kbn, Dp, 4)
                                                    + _attn_flops(q_rows, nn_ * kbn, Dp, 1))},
                       {"_gca_bwd_kernel": reread + big + 2 * small + 2 * lse + scratch},
                       {"_gca_bwd_kernel": scratch}))
    # the gated op itself (residual in the epilogue), at the first caption length
    L = s.captions[0]
    kv = meta(s.B, L, 2, s.H, s.D, dtype=dt)
    x = meta(s.B, s.N, s.C, dtype=dt)
    lam = meta(s.H, dtype=torch.float32)
    mask = torch.empty(s.B, L, dtype=torch.bool, device="meta")
    small = 2 * s.B * L * s.C * E
    useful = heads * _attn_flops(s.N, L, s.D, 2)
    issued = heads * _attn_flops(cover(s.N, bm), cover(L, bn), Dp, 2)
    ops.append(_op(f"gated cross attention fwd L={L}",
                   (gca._triton_fwd, x, q, kv[:, :, 0], kv[:, :, 1], lam, mask, True),
                   4 * big + small + lse, useful, {"_gca_fwd_kernel": 4 * big + small + lse},
                   {"_gca_fwd_kernel": issued},
                   {"_gca_fwd_kernel": 4 * big + lse + heads * math.ceil(s.N / bm) * L * 2 * row}))
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
            t_pred = issued_flops = moved = l2 = scratch = 0.0
            programs: dict[str, int] = {}
            for launch in op.launches:  # a kernel launched several times (problem split over launches)
                programs[launch.kernel] = programs.get(launch.kernel, 0) + launch.programs
            for launch in op.launches:
                st = aot.inspect(launch, sms=H200["sms"])
                share = launch.programs / programs[launch.kernel]  # of the kernel's bytes / FLOPs
                b = share * op.kernel_bytes.get(launch.kernel, 0.0)
                f = share * op.kernel_flops.get(launch.kernel, 0.0)
                c = share * op.kernel_l2.get(launch.kernel, op.kernel_bytes.get(launch.kernel, 0.0))
                x = share * op.kernel_scratch.get(launch.kernel, 0.0)
                t = kernel_time(st, b, f)
                t_pred += t["t_pred_us"]
                issued_flops += f
                moved += b
                l2 += c
                scratch += x
                kernels.append(dict(op=op.name, dtype=dname, grid=list(launch.grid), **st.as_dict(),
                                    narrow_load_fraction=st.narrow_load_fraction(), dram_bytes=b,
                                    issued_flops=f, l2_bytes=c, scratch_bytes=x, **t))
            t_min = 1e6 * max(op.min_bytes / H200["bw"], op.useful_flops / (H200["fma"] if dt == torch.float32 else H200["tc"]))
            ops.append(dict(op=op.name, dtype=dname, kernels=[launch.kernel for launch in op.launches],
                            min_bytes=op.min_bytes, dram_bytes=moved, useful_flops=op.useful_flops,
                            issued_flops=issued_flops, l2_bytes=l2, scratch_bytes=scratch,
                            l2_tbps_needed=l2 / (t_pred * 1e-6) / 1e12 if t_pred else 0.0,
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
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mgkernels"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
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
              "moved MB: DRAM bytes; L2 MB: all SM<->L2 traffic (re-reads included), of which L2-only MB is scratch "
              "assumed never to reach DRAM (the one-pass backwards' dS and split dK / dV sums; module docstring); "
              "L2 TB/s: what the L2 must deliver for the predicted time (not a ceiling of the model).", "",
              "| op | dtype | min MB | moved MB | L2 MB | L2-only MB | L2 TB/s | useful GFLOP | issued GFLOP "
              "| tile waste | min us | predicted us | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in data["ops"]:
        lines.append(
            f"| {o['op']} | {o['dtype']} | {o['min_bytes'] / 1e6:.1f} | {o['dram_bytes'] / 1e6:.1f} | "
            f"{o['l2_bytes'] / 1e6:.1f} | {o['scratch_bytes'] / 1e6:.1f} | {o['l2_tbps_needed']:.1f} | "
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
