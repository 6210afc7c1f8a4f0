"""Can the model learn the direction word at all? The two-clip experiment of docs/demo_recipe.md section 8.

    python experiments/direction_pair.py                      # every configuration (~12 min on 2 CPU cores)
    python experiments/direction_pair.py --configs v-tokens-share30,eps-tokens-share30 --train-seeds 42,1

Two clips that are each other played backwards (a red square moving up; the same clip reversed, captioned "moving
down"), or as a control a colour pair (the same motion, red vs blue): a tiny VAE and T5 fitted to them, the tiny
STDiT trained on both by the project's ``Trainer``, then sampled with each prompt and the same noise. The model
memorises both clips; the question is whether the prompt or the noise picks which one comes out. A configuration
*follows the prompt* for a (noise seed, sampler) when each prompt's sample is closer (PSNR against the VAE
reconstructions) to its own clip. Output: ``experiments/results/direction_pair/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from modelgrow.config import load_config
from modelgrow.data.cache import CachedDataset, build_cache
from modelgrow.models import from_pretrained
from modelgrow.pipeline import ModelGrowPipeline
from modelgrow.synthetic.world import read_manifest, render_clip, sample_specs, time_reversed, write_clips
from modelgrow.text import T5Encoder
from modelgrow.text.tiny import build_tiny_t5
from modelgrow.train import Trainer
from modelgrow.train.checkpoint import latest_checkpoint
from modelgrow.train.export import export_checkpoint
from modelgrow.vae import VideoVAE, check_reconstruction, train_tiny_autoencoder
from modelgrow.workbench import git_sha

RESULTS = Path(__file__).resolve().parent / "results" / "direction_pair"
FRAMES, SIZE, T5_TOKENS = 4, 32, 16
SAMPLERS = (("iddpm", 50, 1.0), ("iddpm", 50, 7.0), ("ddim", 25, 4.0))

# name: (pair, prediction_type, temporal_pos, timestep sampling, high_noise_share, high_noise_from)
CONFIGS: dict[str, tuple[str, str, str, str, float, int]] = {
    "eps-attention": ("reversal", "epsilon", "attention", "logit_normal", 0.0, 800),
    "eps-tokens": ("reversal", "epsilon", "tokens", "logit_normal", 0.0, 800),
    "eps-tokens-share30": ("reversal", "epsilon", "tokens", "logit_normal", 0.3, 800),
    "eps-attention-only850": ("reversal", "epsilon", "attention", "uniform", 1.0, 850),
    "v-attention": ("reversal", "v_prediction", "attention", "logit_normal", 0.0, 800),
    "v-tokens-uniform": ("reversal", "v_prediction", "tokens", "uniform", 0.0, 800),
    "v-attention-share30": ("reversal", "v_prediction", "attention", "logit_normal", 0.3, 800),
    "v-attention-only850": ("reversal", "v_prediction", "attention", "uniform", 1.0, 850),
    "v-tokens-share30": ("reversal", "v_prediction", "tokens", "logit_normal", 0.3, 800),
    "eps-attention-colour": ("colour", "epsilon", "attention", "logit_normal", 0.0, 800),
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def encoders_and_cache(root: Path, manifest: Path, specs, caption_rows: list[dict], t5_tokens: int,
                       vae_steps: int = 300, cache_batch: int = 1, vae_kwargs: dict | None = None,
                       ) -> tuple[VideoVAE, T5Encoder]:
    """A tiny VAE fitted to the clips of ``specs``, a tiny T5 whose tokenizer is trained on ``caption_rows``' short
    and long captions, and the latent/text cache of ``manifest``, under ``root`` (each reused when present). Raises
    when the first clip's caption and the first different one encode identically (the distinguishing word cut off
    by the tokenizer).
    ``vae_kwargs``: more ``train_tiny_autoencoder`` arguments (default channels (16, 16, 16): 4x down)."""
    if not (root / "vae" / "config.json").exists():
        frames = torch.cat([torch.from_numpy(render_clip(s, FRAMES, SIZE, SIZE)).permute(0, 3, 1, 2).float() / 127.5 - 1
                            for s in specs])
        vae, _ = train_tiny_autoencoder(frames, vae_steps, **{"channels": (16, 16, 16), **(vae_kwargs or {})})
        check_reconstruction(vae, frames)  # a fit that lost the objects is not saved (a rerun fits again)
        vae.save_pretrained(root / "vae")
        # short and long captions: a tokenizer trained on the short ones alone splits them into characters
        build_tiny_t5(str(root / "t5"), vocab_size=60, d_model=32,
                      corpus=[r[k] for r in caption_rows for k in ("caption", "long_caption")] * 10)
    vae = VideoVAE.from_pretrained(root / "vae", micro_batch_size=16)
    t5 = T5Encoder(str(root / "t5"), max_length=t5_tokens, device="cpu")
    if not (root / "cache").exists():
        build_cache(manifest, root / "cache", vae=vae, t5=t5, num_frames=FRAMES, frame_interval=1,
                    image_size=(SIZE, SIZE), prompt_mode="S", batch_size=cache_batch, device="cpu")
    ds, captions = CachedDataset(root / "cache"), [r["caption"] for r in read_manifest(manifest)]
    other = next(i for i, c in enumerate(captions) if c != captions[0])
    if torch.equal(ds[0]["y"], ds[other]["y"]):
        raise RuntimeError(f"captions {captions[0]!r} and {captions[other]!r} encode identically (the "
                           "distinguishing word was cut off)")
    return vae, t5


def train_tiny(cache: Path, out: Path, t5_tokens: int, prediction_type: str, temporal_pos: str, timesteps: str,
               share: float, share_from: int, steps: int, seed: int = 42, lat: int = SIZE // 4,
               overrides: tuple[str, ...] = ()) -> float:
    """The tiny STDiT trained on ``cache`` (latents ``lat`` x ``lat``) by the project's Trainer (batch 8, lr 2e-3,
    fp32, EMA 0.99; ``overrides``: more ``--section.key value`` arguments, last wins), its EMA weights exported to
    ``out / "model"``; returns the training seconds."""
    cfg = load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.input_size", f"{FRAMES},{lat},{lat}",
        "--model.caption_channels", "32", "--model.model_max_length", str(t5_tokens),
        "--model.temporal_pos", temporal_pos, "--model.prediction_type", prediction_type,
        "--data.cache_dir", str(cache), "--data.num_workers", "0",
        "--train.steps", str(steps), "--train.batch_size", "8", "--train.output_dir", str(out / "run"),
        "--train.log_every", str(steps // 4), "--train.compute_dtype", "float32", "--train.ema_decay", "0.99",
        "--train.timestep_sampling", timesteps, "--train.high_noise_share", str(share),
        "--train.high_noise_from", str(share_from), "--train.seed", str(seed),
        "--optim.lr", "2e-3", "--optim.warmup_steps", "50", "--optim.decay_steps", str(steps - 50),
        "--checkpoint.every_steps", str(steps), *overrides])
    t0 = time.perf_counter()
    Trainer(cfg, log=lambda *_: None).fit()
    seconds = time.perf_counter() - t0
    export_checkpoint(latest_checkpoint(out / "run" / "checkpoints"), out / "model", "ema")
    return seconds


def build_pair(root: Path, kind: str) -> dict:
    """The two clips, their VAE, T5 and cache under ``root`` (reused when present)."""
    first = sample_specs("A", 1, seed=0)[0]  # a red square moving up on a gray background
    second = time_reversed(first, index=1) if kind == "reversal" else replace(first, color="blue", index=1)
    manifest = write_clips(root / "data", [first, second], num_frames=FRAMES, height=SIZE, width=SIZE, progress=False)
    rows = read_manifest(manifest)
    vae, t5 = encoders_and_cache(root, manifest, [first, second], rows, T5_TOKENS)
    ds = CachedDataset(root / "cache")
    return {"vae": vae, "t5": t5, "captions": [r["caption"] for r in rows],
            "recons": [vae.decode(ds[i]["latent"][None].float()).float()[0] for i in range(2)]}


def run_config(work: Path, name: str, steps: int, train_seed: int, noise_seeds: int) -> dict:
    kind, pred, tpos, sampling, share, hi_from = CONFIGS[name]
    pair = build_pair(work / f"pair-{kind}", kind)
    out = work / f"{name}-s{train_seed}"
    train_s = train_tiny(work / f"pair-{kind}" / "cache", out, T5_TOKENS, pred, tpos, sampling, share, hi_from, steps,
                         train_seed)
    pipe = ModelGrowPipeline(from_pretrained(out / "model").eval(), pair["vae"], pair["t5"],
                             config={"t5_max_length": T5_TOKENS})
    cases = []
    for sampler, n, g in SAMPLERS:
        for seed in range(noise_seeds):
            got = []
            for caption in pair["captions"]:
                v = pipe(caption, generator=torch.Generator().manual_seed(seed), num_frames=FRAMES, height=SIZE,
                         width=SIZE, sampler=sampler, num_inference_steps=n, guidance_scale=g, progress=False,
                         output_type="pt").videos[0].float()
                got.append([round(psnr(v, r), 1) for r in pair["recons"]])
            follows = got[0][0] > got[0][1] and got[1][1] > got[1][0]
            cases.append({"sampler": f"{sampler}-{n}", "guidance": g, "noise_seed": seed, "psnr": got,
                          "follows_prompt": follows, "best_psnr": min(max(p) for p in got)})
    return {"config": name, "pair": kind, "prediction_type": pred, "temporal_pos": tpos, "timesteps": sampling,
            "high_noise_share": share, "high_noise_from": hi_from, "train_seed": train_seed, "steps": steps,
            "train_seconds": round(train_s, 1), "follows": sum(c["follows_prompt"] for c in cases) / len(cases),
            "median_best_psnr": sorted(c["best_psnr"] for c in cases)[len(cases) // 2], "cases": cases}


def write_report(results: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    lines = ["# Does the prompt pick the clip? (experiments/direction_pair.py)", "",
             f"{meta['steps']} steps, batch 8, {meta['noise_seeds']} noise seeds x {len(SAMPLERS)} samplers "
             f"(IDDPM-50 at guidance 1 and 7, DDIM-25 at 4) per run; git {meta['git_sha'][:10]}, torch "
             f"{meta['torch']}, {meta['machine']}.", "",
             "| config | pair | objective | temporal embedding | timesteps | high-noise share | train seed | "
             "follows the prompt | median PSNR of the closer clip |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        share = f"{r['high_noise_share']:.0%} in [{r['high_noise_from']}, 1000)" if r["high_noise_share"] else "-"
        lines.append(f"| {r['config']} | {r['pair']} | {r['prediction_type']} | {r['temporal_pos']} | {r['timesteps']} "
                     f"| {share} | {r['train_seed']} | {r['follows']:.0%} | {r['median_best_psnr']} dB |")
    lines += ["", "A case follows the prompt when, with the same noise, each prompt's sample is closer to its own clip. A "
              "model that ignores the prompt gives both prompts the same clip: 0 %."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--train-seeds", default="42")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--noise-seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--work", type=Path, default=Path("runs/direction_pair"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="merge into an existing results.json")
    args = ap.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    results = []
    for name in names:
        for seed in (int(s) for s in args.train_seeds.split(",")):
            r = run_config(args.work, name, args.steps, seed, args.noise_seeds)
            print(f"{name} seed {seed}: follows the prompt in {r['follows']:.0%} of the cases, median PSNR "
                  f"{r['median_best_psnr']} dB ({r['train_seconds']} s)", flush=True)
            results.append(r)
    if args.append and (args.results / "results.json").exists():  # keep earlier runs of other (config, seed) pairs
        done = {(r["config"], r["train_seed"]) for r in results}
        old = json.loads((args.results / "results.json").read_text())["runs"]
        results = [r for r in old if (r["config"], r["train_seed"]) not in done] + results
        order = {n: i for i, n in enumerate(CONFIGS)}
        results.sort(key=lambda r: (order.get(r["config"], 99), r["train_seed"]))
    meta = {"git_sha": git_sha(), "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": sys.version.split()[0], "steps": args.steps, "noise_seeds": args.noise_seeds,
            "threads": args.threads}
    write_report(results, args.results, meta)
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
