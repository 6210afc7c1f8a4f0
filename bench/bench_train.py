"""Training-step benchmark: the optimizer step ``modelgrow train`` runs (``Trainer.train_step``: IDDPM loss
under bf16 autocast, joint condition dropout, backward, grad clipping, AdamW, fp32 EMA), on random latents
and text states of the real shapes, with the step-time model's prediction printed beside every measurement.

    python bench/bench_train.py                                     # GPU: XL/2 + grown 1.5B, every provider, AC none
    python bench/bench_train.py --models xl2 --providers fused,compile --ac none,every-2,full --batch 4,8,16
    python bench/bench_train.py --configs xl2:ref:none:4,xl2:compile:none:8,grown:compile:none:4   # explicit list
    python bench/bench_train.py --tiny --providers ref,fused --batch 2                       # CPU: tiny shapes

Models: ``xl2`` = STDiT-XL/2 at 16x256x256 (T5 120x4096), ``grown`` = XL/2 grown by insert k = 1 plus the LLM
condition (LLM 120x4096), both built by the trainer's own ``build_model`` from a ``[model]/[grow]`` config;
``--tiny`` swaps in STDiT-tiny shapes (seconds on a CPU). Providers: ``ref`` (the PyTorch references of the
fused ops, eager: ``MG_KERNELS=ref``), ``fused`` (mgkernels' dispatcher ``auto``: Triton on CUDA, csrc on
CPU) and ``compile`` (fused + per-block ``torch.compile``, ``parallel.compile = true``). Activation
checkpointing: ``none | every-N | full`` (``parallel.activation_checkpointing``). A batch that does not fit
is reported as ``oom`` and the sweep goes on.

Per row: step time (p20/p50/p80 of single steps and the pipelined mean), samples/s, tokens/s, TFLOP/s and
MFU (``modelgrow.models.flops``, the dense bf16 peak of the trainer's device table; on other devices the
matmul peak measured in the same run), peak memory, the first step's time (compilation), a per-component
breakdown from ``torch.profiler`` (gemm, attention, glue, optimizer, ema, data; ms per step) and the
step-time model's prediction for the same shapes (bench/step_model.py) at the ceilings measured in this run
and, on an H100/H200, at the table's. The data are a small pool of host batches cycled through the trainer's
own ``_prepare`` (host -> device copies, as a cached-latent loader feeds it). Every finished row is written
at once to ``bench/results/<device>/bench_train.json`` (or ``--out DIR``), so a time-out keeps them.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_model import DEVICES, Shapes, category_table, check_against_flop_model, device_key, measured_ceilings, predict  # noqa: E402
from utils import default_threads, env_info, pick_device, print_table, time_steps, write_results  # noqa: E402

from mgkernels.dispatch import use  # noqa: E402
from modelgrow.config import load_config  # noqa: E402
from modelgrow.models.flops import stdit_flops  # noqa: E402
from modelgrow.train import RandomLatentLoader, Trainer  # noqa: E402
from modelgrow.train.metrics import device_peak_tflops  # noqa: E402

MODELS = {
    "xl2": ["--model.preset", "STDiT-XL/2", "--model.input_size", "16,32,32", "--model.space_scale", "0.5",
            "--model.caption_channels", "4096", "--model.model_max_length", "120"],
    "grown": ["--model.preset", "STDiT-XL/2", "--model.input_size", "16,32,32", "--model.space_scale", "0.5",
              "--model.caption_channels", "4096", "--model.model_max_length", "120", "--train.mode", "expand",
              "--grow.strategy", "insert", "--grow.ratio", "1", "--grow.llm", "true", "--grow.llm_channels", "4096",
              "--grow.llm_max_length", "120"],
}
# --tiny: the same two models at STDiT-tiny size (depth 2 -> 4 grown, hidden 64, 4x8x8 latent, 8 tokens x 32)
TINY = ["--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--grow.llm_channels", "32", "--grow.llm_max_length", "8"]

CATEGORY_ORDER = ("gemm", "attention", "glue", "optimizer", "ema", "data")


# ------------------------------------------------------------------------------------------------------
# device ceilings measured in this run (the step model's inputs, the MFU denominator off the device table)
# ------------------------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    from bench_kernels import copy_bandwidth
    from bench_sample import matmul_peak

    return {"matmul_tflops": matmul_peak(device, dtype), "copy_gbps": copy_bandwidth(device)}


# ------------------------------------------------------------------------------------------------------
# profiler breakdown
# ------------------------------------------------------------------------------------------------------
GEMM_KEYS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
             "aten::baddbmm", "aten::_convolution", "aten::convolution", "conv", "mkldnn", "aten::matmul", "aten::linear")
ATTN_KEYS = ("flash", "fmha", "attention", "attn", "sdpa", "_gca_", "softmax")
OPT_KEYS = ("optimizer.", "adam", "_foreach_norm", "clip_grad", "zero_grad")
DATA_KEYS = ("memcpy htod", "mg::data")


def _ancestry(ev) -> str:
    names = []
    while ev is not None:
        names.append(ev.name.lower())
        ev = ev.cpu_parent
    return " | ".join(names)


def categorize(name: str, ancestry: str, phase: str | None) -> str:
    """Component of one kernel (CUDA) or leaf op (CPU): the step phase it ran in (data, ema, optimizer), else by
    name: attention (also any op inside an attention op), gemm, else the memory-bound glue."""
    n = name.lower()
    if phase in ("data", "ema", "optimizer"):
        return phase
    if any(k in n for k in DATA_KEYS):
        return "data"
    if any(k in ancestry for k in OPT_KEYS) or any(k in n for k in OPT_KEYS):
        return "optimizer"
    if any(k in n for k in ATTN_KEYS) or any(k in ancestry for k in ("attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in GEMM_KEYS):
        return "gemm"
    return "glue"


def breakdown(prof, steps: int, device: torch.device) -> dict[str, Any]:
    """ms per step of each component from a profile of ``steps`` training steps. Phases come from the time
    windows of the ``mg::data`` / ``mg::ema`` / ``mg::optimizer`` (grad clipping) ranges and torch's
    ``Optimizer.*`` ranges (by the launching op's
    start time, so ops of the autograd thread are placed too); CUDA: kernel durations, CPU: self time of leaf
    ops. ``unattributed_ms`` = device kernel time not linked to any op (should be ~0)."""
    events = list(prof.events())
    windows = []
    for e in events:
        name = e.name
        phase = ("data" if name.startswith("mg::data") else "ema" if name.startswith("mg::ema")
                 else "optimizer" if name.startswith(("Optimizer.", "mg::optimizer")) else None)
        if phase and e.device_type == torch.autograd.DeviceType.CPU:
            windows.append((e.time_range.start, e.time_range.end, phase))

    def phase_of(t):
        for a, b, p in windows:
            if a <= t <= b:
                return p
        return None

    out = {c: 0.0 for c in CATEGORY_ORDER}
    top: dict[str, float] = {}
    kernel_total = attached = 0.0
    cuda = device.type == "cuda"
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            if not getattr(e, "is_user_annotation", False):
                kernel_total += e.time_range.elapsed_us()
            continue
        if cuda:
            if not e.kernels:
                continue
            anc, ph = _ancestry(e), phase_of(e.time_range.start)
            for k in e.kernels:
                cat = categorize(k.name + " " + e.name, anc, ph)
                out[cat] += k.duration / 1e3
                attached += k.duration
                key = f"{cat}: {k.name[:90]}"
                top[key] = top.get(key, 0.0) + k.duration / 1e3
        else:
            if e.name.startswith(("mg::", "Optimizer.", "ProfilerStep")) or getattr(e, "is_user_annotation", False):
                continue
            self_ms = e.self_cpu_time_total / 1e3
            if self_ms <= 0:
                continue
            cat = categorize(e.name, _ancestry(e), phase_of(e.time_range.start))
            out[cat] += self_ms
            key = f"{cat}: {e.name[:90]}"
            top[key] = top.get(key, 0.0) + self_ms
    res = {"ms_per_step": {c: v / steps for c, v in out.items()},
           "top": [{"what": k, "ms_per_step": v / steps} for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]],
           "source": "CUDA kernel time" if cuda else "CPU self time of leaf ops"}
    if cuda:
        res["unattributed_ms"] = (kernel_total - attached) / 1e3 / steps
        res["kernel_ms_per_step"] = kernel_total / 1e3 / steps
    return res


# ------------------------------------------------------------------------------------------------------
# one configuration
# ------------------------------------------------------------------------------------------------------
@contextmanager
def _range(name: str):
    with torch.profiler.record_function(name):
        yield


def _wrap(fn, name):
    def wrapped(*a, **k):
        with _range(name):
            return fn(*a, **k)
    return wrapped


COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --precision -> train.compute_dtype


def build_trainer(model: str, provider: str, ac: str, batch: int, device: torch.device, tiny: bool, precision: str,
                  out_dir: str, seed: int = 0) -> tuple[Trainer, list[dict[str, Any]]]:
    """The trainer ``modelgrow train`` would build for this configuration, and a pool of host batches."""
    args = MODELS[model] + (TINY if tiny else []) + [
        "--train.batch_size", str(batch), "--train.compute_dtype", COMPUTE_DTYPES[precision], "--train.output_dir", out_dir,
        "--checkpoint.resume", "false", "--parallel.activation_checkpointing", ac,
        "--parallel.compile", "true" if provider == "compile" else "false"]
    cfg = load_config(None, args)
    with torch.device(device):  # weights materialise on the device (the same init code, no host round trip)
        trainer = Trainer(cfg, loader=[], log=lambda *_: None)
    m = cfg.model
    llm = (cfg.grow.llm_max_length, cfg.grow.llm_channels) if cfg.grow.llm else None
    latent = (m.in_channels, *m.input_size)
    gen = iter(RandomLatentLoader(batch, latent, (m.model_max_length, m.caption_channels), llm=llm, seed=seed))
    pool = []
    for _ in range(2):
        b = next(gen)
        if device.type == "cuda":
            b = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
        pool.append(b)
    return trainer, pool


def run_config(model: str, provider: str, ac: str, batch: int, device: torch.device, args, ceil: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model + ("-tiny" if args.tiny else ""), "provider": provider, "ac": ac, "batch": batch,
                           "precision": args.precision}
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    trainer = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        trainer, pool = build_trainer(model, provider, ac, batch, device, args.tiny, args.precision, tmp.name)
        row["build_s"] = time.perf_counter() - t0
        cfg = trainer.cfg
        # phase ranges for the profiler: instance-level wrappers around the trainer's own methods
        trainer._prepare = _wrap(trainer._prepare, "mg::data")
        trainer.sample_randomness = _wrap(trainer.sample_randomness, "mg::data")
        trainer.ema.update = _wrap(trainer.ema.update, "mg::ema")
        batches = itertools.cycle(pool)
        kernels = "ref" if provider == "ref" else "auto"

        def step():
            with use(kernels):
                trainer.train_step([next(batches)])
            trainer.step += 1

        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["first_step_s"] = time.perf_counter() - t0  # includes compilation / autotuning
        for _ in range(max(0, args.warmup - 1)):
            step()
        row.update(time_steps(step, device, args.steps))
        n_params = sum(p.numel() for p in trainer.model.parameters())
        mc = trainer.model.config
        fl = stdit_flops(**mc, caption_tokens=cfg.model.stdit_kwargs()["model_max_length"],
                         llm_tokens=cfg.grow.llm_max_length if trainer.has_llm else 0).per_step(training=True)
        ms = row["ms_mean"]
        sps = batch / (ms * 1e-3)
        peak = device_peak_tflops(device)
        row.update({"params": n_params, "tokens_per_sample": trainer.model.num_temporal * trainer.model.num_spatial,
                    "samples_per_s": sps, "tokens_per_s": sps * trainer.model.num_temporal * trainer.model.num_spatial,
                    "tflop_per_sample": fl / 1e12, "tflops": sps * fl / 1e12,
                    "peak_tflops": peak or ceil["matmul_tflops"],
                    "peak_source": "device table (dense bf16)" if peak else "matmul measured in this run"})
        row["mfu"] = row["tflops"] / row["peak_tflops"]
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            from modelgrow.train.metrics import memory_gib

            row["peak_mem_gib"] = memory_gib(device)  # host max RSS of the process
        if args.profile_steps > 0:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(args.profile_steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            try:
                row["profile"] = breakdown(prof, args.profile_steps, device)
            except Exception as e:  # noqa: BLE001 - a profiler quirk must not lose the timing
                row["profile"] = {"error": f"{type(e).__name__}: {e}"}
        # the step-time model for the same shapes, at this run's ceilings (and the device table's)
        shapes = Shapes.from_config(mc)
        dev = measured_ceilings(env_info(device)["device"], ceil["matmul_tflops"], ceil["copy_gbps"], peak or ceil["matmul_tflops"])
        preds = {"measured_ceilings": predict(shapes, dev, provider, ac, batch)}
        key = device_key(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if key:
            preds["table_ceilings"] = predict(shapes, DEVICES[key], provider, ac, batch)
        row["predicted"] = {k: p.summary() for k, p in preds.items()}
        row["flop_model_check"] = check_against_flop_model(shapes)
        p = preds.get("table_ceilings", preds["measured_ceilings"])
        row["pred_ms"], row["pred_mfu"] = p.step_ms, p.mfu
        row["meas/pred"] = ms / p.step_ms
        row["_pred_obj"] = p
    except torch.cuda.OutOfMemoryError as e:
        row.update({"oom": True, "error": str(e).splitlines()[0][:200]})
    except Exception as e:  # noqa: BLE001 - one failing configuration must not end the sweep
        row.update({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
    finally:
        trainer = None  # noqa: F841 - drop the model, optimizer and EMA before the next configuration
        gc.collect()
        if provider == "compile":
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tmp.cleanup()
    return row


def print_row(row: dict[str, Any]) -> None:
    head = f"== {row['model']} | {row['provider']} | AC {row['ac']} | batch {row['batch']}"
    if "error" in row:
        print(f"{head}: {'OOM' if row.get('oom') else 'FAILED'}: {row['error']}")
        return
    print(f"{head}: {row['ms_mean']:.1f} ms/step (p50 {row['ms_p50']:.1f}) | {row['samples_per_s']:.2f} samples/s | "
          f"{row['tokens_per_s']:.0f} tokens/s | {row['tflops']:.2f} TFLOP/s | MFU {100 * row['mfu']:.1f}% | "
          f"peak mem {row['peak_mem_gib']:.2f} GiB | first step {row['first_step_s']:.1f} s")
    p = row["_pred_obj"]
    print(f"   predicted ({p.device}): {p.step_ms:.1f} ms/step | MFU {100 * (p.mfu or 0):.1f}% | measured/predicted "
          f"{row['meas/pred']:.2f}")
    meas = (row.get("profile") or {}).get("ms_per_step")
    print_table(category_table(p, meas, fold_weights=True) if meas else category_table(p),
                ["component", "pred_ms", "pred_pct", "meas_ms", "meas/pred"] if meas else ["component", "pred_ms", "pred_pct"])


def parse_configs(args) -> list[tuple[str, str, str, int]]:
    if args.configs:
        out = []
        for item in args.configs.split(","):
            model, provider, ac, batch = item.split(":")
            out.append((model, provider, ac, int(batch)))
        return out
    return [(m, p, a, int(b)) for m in args.models.split(",") for p in args.providers.split(",")
            for a in args.ac.split(",") for b in args.batch.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="xl2,grown")
    ap.add_argument("--providers", default="ref,fused,compile")
    ap.add_argument("--ac", default="none", help="comma list of none | every-N | full")
    ap.add_argument("--batch", default="4", help="comma list of per-step batch sizes")
    ap.add_argument("--configs", default=None, help="explicit list model:provider:ac:batch,... (overrides the sweep)")
    ap.add_argument("--tiny", action="store_true", help="STDiT-tiny shapes (CPU smoke runs, the GPU suite's dry run)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=1, help="profiled steps per configuration (0: no breakdown)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="directory for bench_train.json (default bench/results/<device>/)")
    args = ap.parse_args(argv)

    default_threads()
    device = pick_device(args.device)
    configs = parse_configs(args)
    # a profiler range around the trainer's gradient clipping (it looks the function up at call time)
    torch.nn.utils.clip_grad_norm_ = _wrap(torch.nn.utils.clip_grad_norm_, "mg::optimizer")
    for m, p, _a, _ in configs:
        if m not in MODELS or p not in ("ref", "fused", "compile"):
            ap.error(f"unknown model/provider in {m}:{p} (models {list(MODELS)}, providers ref, fused, compile)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    ceil = measure_ceilings(device, dtype)
    print(f"device {env_info(device)['device']} | matmul {ceil['matmul_tflops']:.1f} TFLOP/s ({dtype}) | copy "
          f"{ceil['copy_gbps']:.1f} GB/s | {len(configs)} configurations")
    rows: list[dict[str, Any]] = []
    out_dir = Path(args.out) if args.out else None
    path = None
    for model, provider, ac, batch in configs:
        row = run_config(model, provider, ac, batch, device, args, ceil)
        print_row(row)
        row.pop("_pred_obj", None)
        row["ceilings"] = ceil
        rows.append(row)
        path = write_results("bench_train", rows, device, out_dir)  # every finished row is on disk at once
    cols = ["model", "provider", "ac", "batch", "ms_mean", "samples_per_s", "tflops", "mfu", "pred_ms", "pred_mfu", "meas/pred",
            "peak_mem_gib", "first_step_s"]
    print_table([{k: r.get(k, "oom" if r.get("oom") else "") for k in cols} for r in rows], cols)
    print("wrote", path)
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
