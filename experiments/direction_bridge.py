"""From one moving square to the demo's world, one factor at a time: where does the v recipe stop teaching direction?

    python experiments/direction_bridge.py --vary direction --clips 128 --config v    # ~ direction_positions
    python experiments/direction_bridge.py --vary all --clips 512 --config v          # domain A's full variety

The step after ``direction_positions.py`` (one red square on gray, four directions: v + tokens + 30 % share 31/32,
eps at chance). Here the clips come from domain A's train split with the attributes *not* named in ``--vary``
held at a red medium fast square on gray; a 4x-downsampling tiny VAE (8x8 latents, foreground-weighted) and a tiny
T5 are fitted to them, the STDiT (``--model tiny``: STDiT-tiny; ``wide``: the demo's depth 4, width 128) is trained
by the project's ``Trainer``, and ``--prompts`` held-out prompts (the same held factors) are sampled with IDDPM-50
at guidance 1 and 4. Read by the demo bundle's semantic evaluator (shape, colour, direction, background) and, for
direction, also by the object's centroid (first vs last frame). Each run appends a row to
``experiments/results/direction_bridge/results.{json,md}`` and writes a sheet of its samples (first | last frame)
to ``<work>/<run>/samples.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modelgrow.config import TrainConfig
from modelgrow.demo import DEFAULT_BASE
from modelgrow.models import from_pretrained
from modelgrow.pipeline import ModelGrowPipeline
from modelgrow.synthetic.semantic import SemanticClassifier
from modelgrow.synthetic.world import (
    DIRECTION_VECTORS,
    SIZES,
    SPEEDS,
    read_manifest,
    sample_specs,
    short_caption,
    start_range,
    time_reversed,
    write_clips,
)
from modelgrow.workbench import git_sha

sys.path.insert(0, str(Path(__file__).resolve().parent))
from direction_pair import FRAMES, SIZE, encoders_and_cache, train_tiny  # noqa: E402
from direction_positions import read_motion  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "direction_bridge"
T5_TOKENS = 48
HELD = {"shape": "square", "color": "red", "background": "gray", "size": "medium", "speed": "fast"}
CONFIGS = {"eps": ("epsilon", "attention", 0.0), "v": ("v_prediction", "tokens", 0.3)}
MODELS = {"tiny": (), "wide": ("--model.depth", "4", "--model.hidden_size", "128", "--model.num_heads", "4")}
SCORED = ("shape", "color", "direction", "background")
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


def specs_for(vary: set[str], n: int, seed: int, split: str, twins: bool = False) -> list:
    """Domain A specs with every attribute outside ``vary`` (direction always varies) set to ``HELD``'s value, the
    start clamped so the object stays inside the frame at the held size and speed. ``twins``: ``n // 2`` such clips,
    each followed by itself played backwards (``time_reversed``, captioned with the opposite direction)."""
    out = []
    for s in sample_specs("A", n // 2 if twins else n, seed=seed, split=split):
        s = _refit_start(replace(s, **{a: v for a, v in HELD.items() if a not in vary}))
        out += [replace(s, index=len(out)), time_reversed(s, index=len(out) + 1)] if twins else [s]
    return out


def _refit_start(s):
    """The spec with its start clamped into the range its own size, speed and direction allow."""
    r, travel = SIZES[s.size], SPEEDS[s.speed]
    dx, dy = DIRECTION_VECTORS[s.direction]
    (x0, x1), (y0, y1) = start_range(r, dx * travel), start_range(r, dy * travel)
    return replace(s, start_x=round(min(max(s.start_x, x0), x1), 4), start_y=round(min(max(s.start_y, y0), y1), 4))


def sheet(videos: np.ndarray, path: Path) -> None:
    """Samples in rows of 8: first frame | last frame, 2x nearest upscaling."""
    tiles = [np.concatenate([v[0], np.full((SIZE, 2, 3), 255, np.uint8), v[-1]], 1) for v in videos]
    rows = [np.concatenate([np.pad(t, ((2, 2), (4, 4), (0, 0)), constant_values=255) for t in tiles[i:i + 8]]
                           + [np.full((SIZE + 4, (2 * SIZE + 10) * (8 - len(tiles[i:i + 8])), 3), 255, np.uint8)], 1)
            for i in range(0, len(tiles), 8)]
    Image.fromarray(np.concatenate(rows, 0)).resize((rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2),
                                                    Image.NEAREST).save(path)


def _key(r: dict) -> tuple:
    return (tuple(r["vary"]), r["clips"], r.get("twins", False), r.get("latent_scale", 1.0), r.get("geometry", "8x8"),
            r["config"], r["high_noise_share"], r["model"], r["steps"], r["batch"], r.get("compute_dtype", "float32"),
            tuple(sorted(r.get("train_set", {}).items())))


def record(results: Path, res: dict, meta: dict) -> None:
    """Add run ``res`` to ``results``/results.json (replacing a run of the same settings) and rewrite results.md."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "results.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [r for r in runs if _key(r) != _key(res)] + [res]
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    lines = ["# From one moving square to domain A's variety (experiments/direction_bridge.py)", "",
             f"Held: {HELD} unless varied; per run {meta['prompts']} held-out "
             "prompts, IDDPM-50, one noise each; read by the demo bundle's evaluator and (direction) by the "
             f"object's centroid. Last run: git {(meta['git_sha'] or '?')[:10]}, torch {meta['torch']}, "
             f"{meta['machine']}.", "",
             "| varies besides direction | clips | time-reversed twins | latents | latent scale | objective | high-noise share | model | steps x batch | "
             "more [train] settings | guidance | shape | colour | background | direction (evaluator) | "
             "direction (centroid) | train s |",
             "|" + "---|" * 17]
    runs.sort(key=lambda r: (r.get("geometry", "8x8") != "8x8", len(r["vary"]), r["vary"], r["clips"],
                             r.get("twins", False), r.get("latent_scale", 1.0), r["model"], r["config"], r["high_noise_share"], r["steps"],
                             sorted(r.get("train_set", {}).items())))
    for r in runs:
        for g, s in r["by_guidance"].items():
            geo = "16x16 (bundle VAE)" if r.get("geometry") == "demo" else "8x8"
            lines.append(f"| {', '.join(r['vary']) or '-'} | {r['clips']} | "
                         f"{'yes' if r.get('twins') else 'no'} | {geo} | x{r.get('latent_scale', 1.0):g} | {r['config']} | "
                         f"{r['high_noise_share']:.0%} | {r['model']} | "
                         f"{r['steps']} x {r['batch']} | "
                         f"{', '.join(f'{k}={v}' for k, v in sorted(r.get('train_set', {}).items())) or '-'} | {float(g):g} | {s['shape']:.2f} | {s['color']:.2f} | "
                         f"{s['background']:.2f} | {s['direction']:.2f} | {s['direction_centroid']:.2f} | "
                         f"{r['train_seconds']:.0f} |")
    lines += ["", "v = v-prediction + temporal embedding on every token + 30 % of the timesteps in [800, 1000); "
              "eps = Open-Sora v1.0's objective and placement. Chance: direction 0.25, shape 0.33, colour 0.25."]
    (results / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vary", default="direction", help="comma-separated attributes that vary besides direction "
                    f"({', '.join(HELD)}), or 'all'")
    ap.add_argument("--clips", type=int, default=512)
    ap.add_argument("--twins", action="store_true", help="half the clips are the other half played backwards")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="v")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--share", type=float, default=None, help="high-noise share (default: the config's)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--geometry", choices=("8x8", "demo"), default="8x8",
                    help="8x8: a 4x-down VAE fitted here (8x8 latents); demo: the shipped bundle's VAE and T5 (16x16)")
    ap.add_argument("--latent-scale", type=float, default=1.0,
                    help="multiply the VAE's standardised latents by this (its scaling_factor), e.g. to give the "
                         "object the scale it has on one background")
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="more [train] settings for the DiT, e.g. snr_gamma=5 or noise_offset=0.1 (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("runs/direction_bridge"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    vary = set(HELD) if args.vary == "all" else {a for a in args.vary.split(",") if a and a != "direction"}
    bad = [kv for kv in args.train_set if kv.split("=", 1)[0] not in TRAIN_KEYS or "=" not in kv]
    if bad:
        ap.error(f"--train-set: expected KEY=VALUE with KEY a [train] setting (e.g. snr_gamma=5), got {bad}")
    if vary - set(HELD):
        ap.error(f"--vary: unknown attribute(s) {sorted(vary - set(HELD))}; choose from {list(HELD)} or 'all'")
    torch.set_num_threads(args.threads)
    tag = "+".join(sorted(vary)) or "direction-only"
    root = args.work / f"{tag}-n{args.clips}{'-twins' if args.twins else ''}" / args.geometry
    specs = specs_for(vary, args.clips, 0, "train", twins=args.twins)
    manifest = write_clips(root / "data", specs, num_frames=FRAMES, height=SIZE, width=SIZE, progress=False)
    rows = read_manifest(manifest)
    if args.latent_scale != 1.0:  # the same data, VAE and T5 as the unscaled run, latents multiplied by the scale
        base, root = root, root.with_name(f"{root.name}-latentx{args.latent_scale:g}")
        if not (root / "vae").exists():
            encoders_and_cache(base, manifest, specs, rows[:256], T5_TOKENS, vae_steps=args.vae_steps, cache_batch=8,
                               vae_kwargs={"foreground_weight": 8.0, "channels": (32, 32, 32)})
            for sub in ("vae", "t5"):
                shutil.copytree(base / sub, root / sub)
            cfg = json.loads((root / "vae" / "config.json").read_text())
            cfg["scaling_factor"] *= args.latent_scale
            (root / "vae" / "config.json").write_text(json.dumps(cfg, indent=2))
    if args.geometry == "demo" and not (root / "vae").exists():  # the shipped bundle's VAE and T5, as they are
        shutil.copytree(DEFAULT_BASE / "vae", root / "vae")
        shutil.copytree(DEFAULT_BASE / "t5", root / "t5")
    vae, t5 = encoders_and_cache(root, manifest, specs, rows[:256], T5_TOKENS, vae_steps=args.vae_steps, cache_batch=8,
                                 vae_kwargs={"foreground_weight": 8.0, "channels": (32, 32, 32)})
    lat = SIZE // (2 if args.geometry == "demo" else 4)
    pred, tpos, share = CONFIGS[args.config]
    share = share if args.share is None else args.share
    extra = dict(kv.split("=", 1) for kv in args.train_set)
    name = (f"{args.config}-share{share:g}-{args.model}-s{args.steps}-b{args.batch}-{args.compute_dtype}"
            + "".join(f"-{k}{v}" for k, v in sorted(extra.items())))
    out = root / name
    train_s = train_tiny(root / "cache", out, T5_TOKENS, pred, tpos, "logit_normal", share, 800, args.steps, lat=lat,
                         overrides=(*MODELS[args.model], "--train.batch_size", str(args.batch),
                                    "--train.compute_dtype", args.compute_dtype,
                                    *(x for k, v in sorted(extra.items()) for x in (f"--train.{k}", v)),
                                    *(("--model.space_scale", "1.0") if args.geometry == "demo" else ())))
    pipe = ModelGrowPipeline(from_pretrained(out / "model").eval(), vae, t5, config={"t5_max_length": T5_TOKENS})
    evaluator = SemanticClassifier.load(DEFAULT_BASE / "evaluator.safetensors")
    prompts = specs_for(vary, args.prompts, 5, "heldout")
    res = {"vary": sorted(vary), "clips": args.clips, "twins": args.twins, "latent_scale": args.latent_scale, "geometry": args.geometry, "compute_dtype": args.compute_dtype, "config": args.config, "prediction_type": pred,
           "temporal_pos": tpos, "high_noise_share": share, "model": args.model, "steps": args.steps,
           "batch": args.batch, "train_set": extra, "train_seconds": round(train_s, 1), "by_guidance": {}}
    for g in (1.0, 4.0):
        v = pipe([short_caption(p) for p in prompts], generator=torch.Generator().manual_seed(100),
                 num_frames=FRAMES, height=SIZE, width=SIZE, sampler="iddpm", num_inference_steps=50,
                 guidance_scale=g, progress=False, output_type="pt").videos.float()
        u8 = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
        sc = evaluator.score(u8, [p.to_dict() for p in prompts])
        centroid = [read_motion(v[i], p.background) for i, p in enumerate(prompts)]
        res["by_guidance"][str(g)] = {**{a: sc[a] for a in SCORED},
                                      "direction_centroid": float(np.mean([c == p.direction for c, p in
                                                                           zip(centroid, prompts, strict=True)])),
                                      "centroid_read": centroid}
        sheet(u8, out / f"samples_g{g:g}.png")
        print(name, tag, f"guidance {g:g}:", {a: round(sc[a], 2) for a in SCORED},
              "centroid", round(res["by_guidance"][str(g)]["direction_centroid"], 2), flush=True)
    meta = {"git_sha": git_sha(), "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": sys.version.split()[0], "prompts": args.prompts, "vae_steps": args.vae_steps}
    record(args.results, res, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
