"""Training-step time of the demo's tiny STDiT on a CPU: DiT patch on the latents (``DemoSize``'s 8x8x4 since
session 9; ``--patch`` also times others), base vs grown (insert k = 1 + LLM condition), torch threads and fp32 vs
bf16 autocast, the attention ops' route on a CPU (``--route``: the C++ kernel as dispatcher operators, the same
kernel through the Python custom ops, SDPA under autograd, or the custom-op reference pair) and per-block ``torch.compile`` (``--compile blocks``: the trainer's ``parallel.compile
= true``; on a CPU the modulation ops are then traced as their PyTorch expressions,
``mgkernels.dispatch.traced_ref``). One step = IDDPM
loss (learned sigma, the demo's prediction type) forward, backward and AdamW, batch ``--batch`` with the
trainer's AdamW, on random latents and text states of the demo's shapes (``DemoSize``).

    python bench/bench_demo_step.py                       # the grid (a few minutes on a quiet 2-core machine)
    python bench/bench_demo_step.py --threads 2 --grown 1 --compile none,blocks --rounds 9
    python bench/bench_demo_step.py --threads 2 --grown 1 --route eager,csrc --rounds 9   # SDPA vs the C++ kernel
    python bench/bench_demo_step.py --threads 2 --grown 1 --compile blocks --route csrc-custom-op,csrc --rounds 9

Every configuration is built (and compiled) first, then timed ``--rounds`` times in turn, ``--steps`` steps
each, so a shared host's slow phases fall on all of them alike; a row reports the median and the minimum over
the rounds of each round's median step. Rows go to ``bench/results/<device>/bench_demo_step.json`` (device,
versions, git sha); the file is replaced by each run (earlier grids are in its git history). Run it on a quiet
machine: the two cores of the dev machine are easily shared.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import print_table, time_steps, write_results  # noqa: E402

from mgkernels import _cpu_attention  # noqa: E402

_CSRC_BUILT = _cpu_attention.AVAILABLE


ROUTES = ("csrc", "csrc-custom-op", "eager", "custom-op")


def _custom_route(tensor, csrc_ok, provider) -> str:
    """The custom op wherever the library would take another path (a module function: torch.compile guards on
    the identity of the route function, so it must not change between rounds)."""
    return "custom"


def set_route(route: str) -> None:
    """The attention ops' CPU route. ``csrc``: the C++ short-sequence attention as dispatcher operators called
    straight from the functional APIs (what the library does when the extension has them, session 15);
    ``csrc-custom-op``: the same kernel through the Python custom ops (session 14); ``eager``: SDPA under autograd
    (the library's route without the extension, session 10; under compile: traced as SDPA); ``custom-op``: the
    custom-op pair with the reference provider (its LSE and hand-written backward, before session 10)."""
    import mgkernels._cpu_attention as cpu_attention
    import mgkernels.gated_cross_attn as gca
    import mgkernels.st_attention as sta
    from mgkernels.dispatch import attention_route

    if route not in ROUTES:
        raise SystemExit(f"--route {route!r}: not one of {', '.join(ROUTES)}")
    if route.startswith("csrc") and not _CSRC_BUILT:
        raise SystemExit(f"--route {route}: the csrc extension has no attention operators here (make install)")
    cpu_attention.AVAILABLE = route.startswith("csrc")
    for mod in (gca, sta):
        mod.attention_route = attention_route if route in ("csrc", "eager") else _custom_route


def make_step(patch: int, grown: bool, dtype: str, batch: int):
    from modelgrow.config import OptimConfig
    from modelgrow.diffusion import IDDPM
    from modelgrow.grow import add_llm_condition, expand
    from modelgrow.models import create_model
    from modelgrow.train.state import build_optimizer
    from modelgrow.workbench import DemoSize

    s = DemoSize()
    lat = s.size // 2 ** (len(s.vae_channels) - 1)
    model = create_model("STDiT-tiny", depth=s.depth, hidden_size=s.hidden, num_heads=s.heads,
                         input_size=(s.frames, lat, lat), in_channels=s.vae_latent_channels,
                         patch_size=(1, patch, patch), caption_channels=32, model_max_length=s.t5_tokens,
                         space_scale=1.0, temporal_pos=s.temporal_pos, prediction_type=s.prediction_type)
    if grown:
        model = add_llm_condition(expand(model, "insert", 1), 32, s.llm_tokens)
    opt = build_optimizer(list(model.parameters()), OptimConfig(lr=1e-4), torch.device("cpu"))  # the trainer's
    diffusion = IDDPM(timestep_respacing="", prediction_type=s.prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, s.vae_latent_channels, s.frames, lat, lat, generator=g)
    kw = {"y": torch.randn(batch, 1, s.t5_tokens, 32, generator=g), "mask": torch.ones(batch, s.t5_tokens, dtype=torch.long)}
    if grown:
        kw |= {"y_llm": torch.randn(batch, 1, s.llm_tokens, 32, generator=g),
               "llm_mask": torch.ones(batch, s.llm_tokens, dtype=torch.long)}
    bf16 = dtype == "bfloat16"

    def step():
        t = torch.randint(0, 1000, (batch,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(model, x0, t, model_kwargs=kw)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    import statistics

    from modelgrow.train.parallelize import apply_compile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", default="2")
    ap.add_argument("--grown", default="0,1")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--route", default="csrc" if _CSRC_BUILT else "eager",
                    help="attention CPU route(s): " + " | ".join(ROUTES) + " (see set_route)")
    ap.add_argument("--compile", default="none,blocks", help="none | blocks (per-block torch.compile)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    configs = []
    for route, patch, grown, threads, dtype, comp in itertools.product(
            args.route.split(","), [int(v) for v in args.patch.split(",")], [v == "1" for v in args.grown.split(",")],
            [int(v) for v in args.threads.split(",")], args.dtype.split(","), args.compile.split(",")):
        if comp not in ("none", "blocks"):
            ap.error(f"--compile: {comp!r} is not none or blocks")
        torch.set_num_threads(threads)
        set_route(route)
        step, model, params = make_step(patch, grown, dtype, args.batch)
        if comp == "blocks":
            apply_compile(model)
        t0 = time.perf_counter()
        step()  # compiles where asked
        first_s = time.perf_counter() - t0
        step()
        configs.append(({"route": route, "patch": patch, "grown": grown, "threads": threads, "dtype": dtype,
                         "compile": comp, "batch": args.batch, "params": params, "first_step_s": round(first_s, 1)},
                        step, []))
    for _ in range(args.rounds):
        for row, step, p50s in configs:
            torch.set_num_threads(row["threads"])
            set_route(row["route"])
            p50s.append(time_steps(step, torch.device("cpu"), args.steps)["ms_p50"])
    rows = []
    for row, _, p50s in configs:
        med = statistics.median(p50s)
        rows.append(row | {"ms_per_step": round(med, 1), "ms_min": round(min(p50s), 1), "rounds": len(p50s),
                           "steps_per_round": args.steps, "samples_per_s": round(1000 * args.batch / med, 1)})
    print_table(rows, list(rows[0]))
    path = write_results("bench_demo_step", rows, torch.device("cpu"), args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
