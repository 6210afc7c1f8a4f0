"""Re-score trained continual models of the demo's arm at other guidance scales (issue 14, session 15).

Samples a domain's held-out prompts (SL prompt mode, the demo's IDDPM-100, sample seed 0) with each model at each
(T5 scale, LLM scale) pair of ModelGrow's two-condition guidance and scores them with the run's semantic
evaluator; one JSON line per (model, pair) to stdout and ``--out``. Use a prompt seed other than the report's
(2) so the scales are not tuned on the prompts that judge them.

    python experiments/guidance_sweep.py --runs runs/demo-s14,runs/s14-t2-s0 --pairs 4:2,4:1,4:0 \
        --prompt-seed 5 --out experiments/results/guidance-b/sweep.jsonl

A run directory is a demo's (``<run>/continual/model``) or the study's (``<run>/study/<arm>-seed<k>/model``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelgrow import workbench as wb  # noqa: E402
from modelgrow.synthetic.world import heldout_prompts  # noqa: E402

ATTRS = ("shape", "color", "direction", "background")


def model_dir(run: Path) -> Path:
    if (run / "continual" / "model" / "config.json").exists():
        return run / "continual" / "model"
    found = sorted(run.glob("study/*/model/config.json"))
    if len(found) != 1:
        raise SystemExit(f"{run}: expected a demo run (continual/model) or one study arm (study/*/model), "
                         f"found {len(found)} study models")
    return found[0].parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="comma-separated run directories")
    ap.add_argument("--pairs", default="4:2", help="comma-separated T5:LLM guidance scales")
    ap.add_argument("--domain", default="B")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    try:
        pairs = [tuple(float(x) for x in p.split(":")) for p in args.pairs.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--pairs {args.pairs!r}: expected T5:LLM scale pairs such as 4:2,4:1") from None
    torch.set_num_threads(args.threads)
    rows = []
    for run in (Path(r) for r in args.runs.split(",")):
        ws = wb.Workspace(run, wb.DemoSize(), base_dir=wb.DEFAULT_BASE)
        evaluator = wb.load_evaluator(ws)
        pipe = wb.make_pipeline(ws, model_dir(run), True, template=True)
        prompts = heldout_prompts(args.domain, args.prompts, seed=args.prompt_seed)
        s = ws.size
        for s_t5, s_llm in pairs:
            out = pipe([p["short"] for p in prompts], long_prompt=[p["long"] for p in prompts], prompt_mode="SL",
                       num_frames=s.frames, height=s.size, width=s.size, generator=torch.Generator().manual_seed(0),
                       progress=False, guidance_scale=s_t5, llm_guidance_scale=s_llm)
            scores = evaluator.score(out.videos, prompts)
            row = {"run": str(run), "domain": args.domain, "prompt_seed": args.prompt_seed, "t5": s_t5, "llm": s_llm,
                   **{k: round(float(scores[k]), 3) for k in ATTRS}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
