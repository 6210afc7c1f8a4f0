"""The step between the two-clip pair (direction_pair.py) and the demo's world: many start positions, four directions.

    python experiments/direction_positions.py                 # eps (v1.0) vs v + tokens + 30 % share (~5 min, 2 cores)

``--pairs`` clips of a red medium square moving fast up or right from random start positions, plus each clip played
backwards (down / left), one shape, colour and background; the tiny STDiT trained on them by the project's
``Trainer``; then each of the four prompts sampled with 8 new noises, and the motion read off the sample (the object's
centroid in the first and last frame: the dominant axis and its sign; under 5 % of the frame reads as none).
Output: ``experiments/results/direction_positions/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from modelgrow.models import from_pretrained
from modelgrow.pipeline import ModelGrowPipeline
from modelgrow.synthetic.world import (
    BACKGROUNDS,
    DIRECTION_VECTORS,
    SIZES,
    SPEEDS,
    read_manifest,
    sample_specs,
    start_range,
    time_reversed,
    write_clips,
)
from modelgrow.text import T5Encoder
from modelgrow.vae import VideoVAE
from modelgrow.workbench import git_sha

sys.path.insert(0, str(Path(__file__).resolve().parent))
from direction_pair import FRAMES, SIZE, encoders_and_cache, train_tiny  # noqa: E402  (the same clips, VAE, T5, trainer)

RESULTS = Path(__file__).resolve().parent / "results" / "direction_positions"
T5_TOKENS = 48
CONFIGS = {  # name: (prediction_type, temporal_pos, high_noise_share)
    "eps-attention": ("epsilon", "attention", 0.0),
    "v-tokens-share30": ("v_prediction", "tokens", 0.3),
}


def build_data(root: Path, pairs: int) -> tuple[list[dict], VideoVAE, T5Encoder]:
    base = replace(sample_specs("A", 1, seed=0)[0], size="medium", speed="fast")  # a red square on gray
    rng = np.random.default_rng(0)
    r, travel = SIZES["medium"], SPEEDS["fast"]
    specs = []
    for i in range(pairs):
        d = ("up", "right")[i % 2]
        dx, dy = DIRECTION_VECTORS[d]
        s = replace(base, direction=d, index=2 * i, start_x=float(rng.uniform(*start_range(r, dx * travel))),
                    start_y=float(rng.uniform(*start_range(r, dy * travel))))
        specs += [s, time_reversed(s, index=2 * i + 1)]
    manifest = write_clips(root / "data", specs, num_frames=FRAMES, height=SIZE, width=SIZE, progress=False)
    rows = read_manifest(manifest)
    vae, t5 = encoders_and_cache(root, manifest, specs, rows[:4], T5_TOKENS, vae_steps=400, cache_batch=4)
    return rows, vae, t5


def read_motion(video: torch.Tensor, background: str) -> str:
    """The direction a sample [3, T, H, W] in [-1, 1] moves its object: centroid of the pixels away from the
    background colour, last frame minus first; the dominant axis and its sign."""
    bg = torch.tensor(BACKGROUNDS[background], dtype=torch.float32).view(3, 1, 1, 1) / 127.5 - 1
    m = ((video - bg).norm(dim=0) > 0.5).float()
    w = m.sum((1, 2)).clamp(min=1)
    ys = torch.arange(SIZE, dtype=torch.float32).view(1, SIZE, 1)
    xs = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE)
    dx = ((m * xs).sum((1, 2)) / w)[[0, -1]].diff().item() / SIZE
    dy = ((m * ys).sum((1, 2)) / w)[[0, -1]].diff().item() / SIZE
    if max(abs(dx), abs(dy)) < 0.05:
        return "none"
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def run(root: Path, name: str, rows, vae, t5, steps: int, noises: int) -> dict:
    pred, tpos, share = CONFIGS[name]
    out = root / name
    train_s = train_tiny(root / "cache", out, T5_TOKENS, pred, tpos, "logit_normal", share, 800, steps)
    pipe = ModelGrowPipeline(from_pretrained(out / "model").eval(), vae, t5, config={"t5_max_length": T5_TOKENS})
    captions = {}
    for r in rows:
        captions.setdefault(r["direction"], r["caption"])
    res = {"config": name, "prediction_type": pred, "temporal_pos": tpos, "high_noise_share": share,
           "train_seconds": round(train_s, 1), "by_guidance": {}}
    for g in (1.0, 4.0):
        read = {d: [read_motion(pipe(c, generator=torch.Generator().manual_seed(100 + s), num_frames=FRAMES,
                                     height=SIZE, width=SIZE, sampler="iddpm", num_inference_steps=50,
                                     guidance_scale=g, progress=False, output_type="pt").videos[0].float(),
                                rows[0]["background"]) for s in range(noises)]
                for d, c in captions.items()}
        right = sum(r == d for d, rs in read.items() for r in rs)
        res["by_guidance"][str(g)] = {"right": right, "n": noises * len(captions), "read": read}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64, help="clips moving up or right (each also played backwards)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--noises", type=int, default=8)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", type=Path, default=Path("runs/direction_positions"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = args.work / f"pairs{args.pairs}"
    rows, vae, t5 = build_data(root, args.pairs)
    results = []
    for name in args.configs.split(","):
        r = run(root, name, rows, vae, t5, args.steps, args.noises)
        print(name, {g: f"{v['right']}/{v['n']}" for g, v in r["by_guidance"].items()}, flush=True)
        results.append(r)
    meta = {"git_sha": git_sha(), "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": sys.version.split()[0], "pairs": args.pairs, "clips": 2 * args.pairs, "steps": args.steps,
            "noises": args.noises}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    lines = ["# Does the prompt set the direction? Many start positions, four directions "
             "(experiments/direction_positions.py)", "",
             f"{2 * args.pairs} clips (a red square on gray, up / down / left / right from random starts), {args.steps} "
             f"steps, batch 8; per prompt {args.noises} new noises, IDDPM-50; motion read from the object's centroid. "
             f"git {meta['git_sha'][:10]}, torch {meta['torch']}, {meta['machine']}.", "",
             "| config | objective | temporal embedding | high-noise share | right direction, guidance 1 | guidance 4 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        g = r["by_guidance"]
        lines.append(f"| {r['config']} | {r['prediction_type']} | {r['temporal_pos']} | {r['high_noise_share']:.0%} | "
                     f"{g['1.0']['right']}/{g['1.0']['n']} | {g['4.0']['right']}/{g['4.0']['n']} |")
    lines += ["", "Chance: a quarter. What each prompt's samples read as is in results.json."]
    (args.results / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
