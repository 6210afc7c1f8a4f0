"""``modelgrow demo``: the whole method, end to end, on a laptop-sized CPU machine with nothing downloaded.

Stages (each writes ``<out>/<stage>/DONE`` and is skipped when re-run):
 1. data       synthetic clips of moving shapes: domain A (pre-training) and B (new shapes, colours, motions),
               train and held-out splits, VP9 .webm files + manifests with short and long captions
 2. encoders   a tiny T5 (SentencePiece trained on the captions) and a tiny Llama with the real Llama
               tokenizer shipped in mistral-common, both random-weight transformers built from configs
 3. vae        a tiny diffusers AutoencoderTiny (TAESD layout, 4x downsampling) trained on the synthetic frames
               (a random VAE would turn every generated video into noise whatever the DiT learned); latents
               standardised by the saved shift/scaling factors; its held-out PSNR goes in the report
 4. cache      VAE latents + T5 + LLM states of every split (modelgrow.data.cache)
 5. pretrain   a tiny STDiT trained on A with short prompts (modelgrow.train.Trainer)
 6. grow       insert expansion k = 1 + the LLM condition; function preservation checked on the spot
 7. continual  continual pre-training of the grown model on B with SL prompts (short + long)
 8. evaluate   held-out denoising loss on A and B before/after; semantic score (a trained classifier of
               shape / colour / direction) of videos sampled with two-condition guidance
 9. report     report.md, loss curves, mp4 + keyframe contact sheets per prompt
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

STAGES = ("data", "encoders", "vae", "cache", "pretrain", "grow", "continual", "evaluate", "report")


@dataclass
class DemoSize:
    """The demo's sizes and training recipe. Why this recipe (issue 14, measured on 2 CPU cores): with 4x4
    latent patches (64 values per token) the tiny DiT does not learn eps at high noise in a CPU budget and its
    samples blow up (latent std ~30); with 2x2 patches it does. Which frame a token is in (the motion) is
    learned last, from mid/high-noise timesteps: with logit-normal timesteps (60% of the draws in t = 300..700)
    1600 steps memorise one clip's motion (tests/test_memorise.py), with Open-Sora's uniform ones they do not.
    A high learning rate with warm-up and a cosine decay, and a short EMA (0.99), make the most of few steps.
    At this budget (9.7 minutes on 2 cores, one thread) the samples get backgrounds and colours, not yet shapes and
    motion: see the report's semantic scores."""

    n_train: int = 160  # clips per domain
    n_heldout: int = 16
    frames: int = 4
    size: int = 32
    vae_steps: int = 600
    vae_lr: float = 3e-3
    vae_channels: tuple[int, ...] = (32, 32, 32)  # 4x spatial downsampling
    patch: int = 2  # DiT spatial patch on the latent: a token covers 8x8 pixels
    depth: int = 4
    hidden: int = 128
    heads: int = 4
    t5_tokens: int = 48
    llm_tokens: int = 48
    batch: int = 16
    pretrain_steps: int = 1500
    continual_steps: int = 600
    lr: float = 2e-3
    continual_lr: float = 1e-3
    warmup_steps: int = 100  # linear warm-up, then a cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.99
    timestep_sampling: str = "logit_normal"
    sampler: str = "iddpm"  # measured on the demo's models: IDDPM-100 scores above DDIM-25 (base A 0.46 vs 0.38)
    sample_steps: int = 100
    sample_prompts: int = 8  # per domain
    classifier_train: int = 512
    classifier_steps: int = 300


QUICK = DemoSize(n_train=8, n_heldout=4, frames=4, size=32, vae_steps=4, vae_channels=(8, 8, 8), depth=2, hidden=32,
                 heads=2, t5_tokens=16, llm_tokens=16, batch=4, pretrain_steps=3, continual_steps=3, warmup_steps=1,
                 sample_steps=2, sample_prompts=1, classifier_train=32, classifier_steps=5)


class Demo:
    def __init__(self, out: Path, size: DemoSize, log=print):
        self.out, self.size, self.log = Path(out), size, log
        self.timings: dict[str, float] = {}
        self.out.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def run(self, stages=STAGES) -> Path:
        for name in stages:
            marker = self.path(name, "DONE")
            if marker.exists():
                self.log(f"[{name}] done already, reusing {marker.parent}")
                self.timings[name] = json.loads(marker.read_text()).get("seconds", 0.0)
                continue
            self.log(f"[{name}] ...")
            t0 = time.perf_counter()
            self.path(name).mkdir(parents=True, exist_ok=True)
            info = getattr(self, f"stage_{name}")() or {}
            self.timings[name] = time.perf_counter() - t0
            marker.write_text(json.dumps({"seconds": self.timings[name], **info}, indent=2))
            self.log(f"[{name}] {self.timings[name]:.1f} s")
        return self.path("report.md")

    def _progress(self, iterable, desc: str):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=f"[{desc}]", leave=False, disable=self.log is None or not sys.stderr.isatty())

    def info(self, stage: str) -> dict:
        return json.loads(self.path(stage, "DONE").read_text())

    # -- 1 --------------------------------------------------------------------------------------------
    def stage_data(self):
        from .data.synthetic import generate

        s = self.size
        for domain in ("A", "B"):
            for split, n, seed in (("train", s.n_train, 0), ("heldout", s.n_heldout, 1)):
                generate(self.path("data", f"{domain}_{split}"), domain, split, n=n, num_frames=s.frames, height=s.size,
                         width=s.size, codec="webm", seed=seed, progress=False)

    def manifest(self, domain: str, split: str) -> Path:
        return self.path("data", f"{domain}_{split}", "manifest.csv")

    # -- 2 --------------------------------------------------------------------------------------------
    def stage_encoders(self):
        from .data.synthetic import read_manifest
        from .text.tiny import build_tiny_llama, build_tiny_t5

        corpus = [r[k] for d in ("A", "B") for r in read_manifest(self.manifest(d, "train")) for k in ("caption", "long_caption")]
        build_tiny_t5(str(self.path("encoders", "t5")), vocab_size=300, d_model=32, corpus=corpus)
        build_tiny_llama(str(self.path("encoders", "llm")), hidden_size=32)
        return {"t5": "tiny random T5 (d_model 32), SentencePiece trained on the captions",
                "llm": "tiny random Llama (hidden 32), real Llama SentencePiece tokenizer from mistral-common"}

    # -- 3 --------------------------------------------------------------------------------------------
    def _frames(self, domain_split: list[tuple[str, str]]) -> torch.Tensor:
        from .data.synthetic import read_manifest
        from .video_io import read_video

        frames = []
        for d, sp in domain_split:
            root = self.manifest(d, sp).parent
            for r in read_manifest(self.manifest(d, sp)):
                v, _ = read_video(root / r["path"])
                frames.append(torch.from_numpy(v))
        x = torch.cat(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W] in [-1, 1]
        return x

    def stage_vae(self):
        """Train a tiny diffusers ``AutoencoderTiny`` (TAESD layout, 4x spatial downsampling) on the training frames.
        A tiny ``AutoencoderKL`` was tried first and does not learn these flat-coloured frames in a CPU budget: its
        GroupNorm layers normalise a uniform background away, so backgrounds and object colours came back wrong
        (held-out PSNR 20 dB, the semantic classifier at chance on colour). Latents are standardised like SD's:
        ``shift_factor`` / ``scaling_factor`` (mean, 1/std of the training latents) go into the saved config."""
        from diffusers import AutoencoderTiny

        s = self.size
        torch.manual_seed(0)
        ch = s.vae_channels
        vae = AutoencoderTiny(encoder_block_out_channels=ch, decoder_block_out_channels=ch[::-1],
                              num_encoder_blocks=(1,) * len(ch), num_decoder_blocks=(1,) * len(ch))
        train = self._frames([("A", "train"), ("B", "train")])
        opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.vae_lr, total_steps=max(s.vae_steps, 1), pct_start=0.1)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in self._progress(range(s.vae_steps), "vae"):
            batch = train[torch.randint(0, len(train), (16,), generator=g)]
            loss = (vae.decode(vae.encode(batch).latents).sample - batch).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        vae.eval()
        with torch.no_grad():
            z = torch.cat([vae.encode(train[i : i + 64]).latents for i in range(0, len(train), 64)])
            shift, scale = z.mean().item(), 1.0 / max(z.std().item(), 1e-6)
            vae.register_to_config(shift_factor=shift, scaling_factor=scale)
            held = self._frames([("A", "heldout"), ("B", "heldout")])[:128]
            rec = vae.decode(vae.encode(held).latents).sample.clamp(-1, 1)
        vae.save_pretrained(self.path("vae", "model"))
        mse = ((rec - held) / 2).square().mean().item()
        return {"psnr_heldout_db": 10 * math.log10(1 / max(mse, 1e-12)), "final_loss": losses[-1], "steps": s.vae_steps,
                "shift_factor": shift, "scaling_factor": scale}

    # -- 4 --------------------------------------------------------------------------------------------
    def stage_cache(self):
        from .data.cache import build_cache
        from .text import LLMEncoder, T5Encoder
        from .vae import VideoVAE

        s = self.size
        vae = VideoVAE.from_pretrained(self.path("vae", "model"), micro_batch_size=32)
        t5 = T5Encoder(str(self.path("encoders", "t5")), max_length=s.t5_tokens, device="cpu")
        llm = LLMEncoder(str(self.path("encoders", "llm")), max_length=s.llm_tokens, device="cpu")
        for d in ("A", "B"):
            for sp in ("train", "heldout"):
                for mode in ("S", "SL"):
                    build_cache(self.manifest(d, sp), self.cache(d, sp, mode), vae=vae, t5=t5, llm=llm,
                                num_frames=s.frames, frame_interval=1, image_size=(s.size, s.size), prompt_mode=mode,
                                batch_size=16, shard_size=256, device="cpu")

    def cache(self, domain: str, split: str, mode: str) -> Path:
        return self.path("cache", f"{domain}_{split}_{mode}")

    # -- 5 / 7 ----------------------------------------------------------------------------------------
    def _config(self, out: Path, steps: int, lr: float, cache: Path, extra: list[str]):
        from .config import load_config

        s = self.size
        lat = s.size // 2 ** (len(s.vae_channels) - 1)
        return load_config(None, [
            "--model.preset", "STDiT-tiny", "--model.depth", str(s.depth), "--model.hidden_size", str(s.hidden),
            "--model.num_heads", str(s.heads), "--model.input_size", f"{s.frames},{lat},{lat}",
            "--model.patch_size", f"1,{s.patch},{s.patch}",
            "--model.caption_channels", "32", "--model.model_max_length", str(s.t5_tokens), "--model.space_scale", "1.0",
            "--data.cache_dir", str(cache), "--data.t5", str(self.path("encoders", "t5")),
            "--data.llm", str(self.path("encoders", "llm")), "--data.vae", str(self.path("vae", "model")),
            "--train.steps", str(steps), "--train.batch_size", str(s.batch), "--train.output_dir", str(out),
            "--train.log_every", str(max(1, steps // 20)), "--train.mixed_precision", "fp32",
            "--train.ema_decay", str(s.ema_decay), "--train.timestep_sampling", s.timestep_sampling,
            "--optim.lr", str(lr), "--optim.warmup_steps", str(s.warmup_steps),
            "--optim.decay_steps", str(max(steps - s.warmup_steps, 0)), "--optim.min_lr_ratio", str(s.min_lr_ratio),
            "--checkpoint.every_steps", str(steps), "--grow.llm_channels", "32",
            "--grow.llm_max_length", str(s.llm_tokens), *extra])

    def _train(self, stage: str, cfg) -> dict:
        from .train import Trainer
        from .train.checkpoint import latest_checkpoint
        from .train.export import export_checkpoint

        trainer = Trainer(cfg, log=lambda line: self.log(f"  {line}"))
        history = trainer.fit()
        export_checkpoint(latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints"), self.path(stage, "model"), "ema")
        return {"losses": [(m["step"], m["loss"]) for m in history], "params": sum(p.numel() for p in trainer.model.parameters())}

    def stage_pretrain(self):
        cfg = self._config(self.path("pretrain", "run"), self.size.pretrain_steps, self.size.lr, self.cache("A", "train", "S"), [])
        return self._train("pretrain", cfg)

    def stage_grow(self):
        from .grow import add_llm_condition, expand
        from .models import count_parameters, from_pretrained, save_pretrained

        base = from_pretrained(self.path("pretrain", "model"))
        grown = add_llm_condition(expand(base, "insert", 1), 32, self.size.llm_tokens)
        batch = self._eval_batch("A", "SL")
        t = torch.linspace(0, 999, batch["latent"].shape[0]).round()
        with torch.no_grad():
            before = base(batch["latent"], t, batch["y"], batch["mask"])
            after = grown(batch["latent"], t, batch["y"], batch["mask"], y_llm=batch["y_llm"], llm_mask=batch["llm_mask"])
        save_pretrained(grown, self.path("grow", "model"))
        return {"depth": [len(base.blocks), len(grown.blocks)], "params": [count_parameters(base), count_parameters(grown)],
                "max_abs_diff": (after - before).abs().max().item()}

    def stage_continual(self):
        cfg = self._config(self.path("continual", "run"), self.size.continual_steps, self.size.continual_lr,
                           self.cache("B", "train", "SL"),
                           ["--train.mode", "expand", "--grow.llm", "true", "--checkpoint.load_weights", str(self.path("grow", "model"))])
        return self._train("continual", cfg)

    # -- 8 --------------------------------------------------------------------------------------------
    def _eval_batch(self, domain: str, mode: str, cache: Path | None = None) -> dict:
        from .data.cache import CachedDataset, CachedLoader

        ds = CachedDataset(cache or self.cache(domain, "heldout", mode))
        loader = CachedLoader(ds, len(ds), shuffle=False)
        return next(iter(loader))

    @torch.no_grad()
    def heldout_loss(self, model, domain: str, mode: str, llm: bool, cache: Path | None = None) -> float:
        """Mean IDDPM loss over the held-out clips at 8 fixed timesteps with fixed noise (same for every model)."""
        from .diffusion import IDDPM

        diffusion = IDDPM(timestep_respacing="")
        b = self._eval_batch(domain, mode, cache)
        x0 = b["latent"].float()
        losses = []
        for k, tv in enumerate(np.linspace(50, 950, 8).round().astype(int)):
            g = torch.Generator().manual_seed(1000 + k)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.full((x0.shape[0],), int(tv), dtype=torch.long)
            kw = {"y": b["y"], "mask": b["mask"]}
            if llm:
                kw |= {"y_llm": b["y_llm"], "llm_mask": b["llm_mask"]}
            losses.append(diffusion.training_losses(model, x0, t, model_kwargs=kw, noise=noise)["loss"].mean().item())
        return float(np.mean(losses))

    def _pipeline(self, model_dir: Path, llm: bool):
        from .models import from_pretrained
        from .pipeline import ModelGrowPipeline
        from .text import LLMEncoder, T5Encoder
        from .vae import VideoVAE

        s = self.size
        return ModelGrowPipeline(
            from_pretrained(model_dir), VideoVAE.from_pretrained(self.path("vae", "model"), micro_batch_size=16),
            T5Encoder(str(self.path("encoders", "t5")), max_length=s.t5_tokens, device="cpu"),
            LLMEncoder(str(self.path("encoders", "llm")), max_length=s.llm_tokens, device="cpu") if llm else None,
            config={"sampler": s.sampler, "num_inference_steps": s.sample_steps, "guidance_scale": 7.0, "llm_guidance_scale": 12.5})

    def stage_evaluate(self):
        from .data.synthetic import heldout_prompts
        from .evaluate.semantic import train_classifier
        from .models import from_pretrained
        from .video_io import keyframe_strip, write_png, write_video

        s = self.size
        base, cont = from_pretrained(self.path("pretrain", "model")), from_pretrained(self.path("continual", "model"))
        losses = {
            "base": {d: self.heldout_loss(base, d, "S", llm=False) for d in ("A", "B")},
            "continual": {d: self.heldout_loss(cont, d, "SL", llm=True) for d in ("A", "B")},
        }
        clf = train_classifier(("A", "B"), n_train=s.classifier_train, steps=s.classifier_steps, seed=0,
                               cache=self.path("evaluate", "classifier.safetensors"))
        semantic, samples = {}, []
        for name, model_dir, llm, mode in (("base", self.path("pretrain", "model"), False, "S"),
                                           ("continual", self.path("continual", "model"), True, "SL")):
            pipe = self._pipeline(model_dir, llm)
            semantic[name] = {}
            for d in ("A", "B"):
                prompts = heldout_prompts(d, s.sample_prompts, seed=2)
                out = pipe([p["short"] for p in prompts], long_prompt=[p["long"] for p in prompts], prompt_mode=mode,
                           num_frames=s.frames, height=s.size, width=s.size, generator=torch.Generator().manual_seed(0),
                           progress=False)
                semantic[name][d] = clf.score(out.videos, prompts)
                for i, (p, v) in enumerate(zip(prompts, out.videos)):
                    stem = f"{name}_{d}_{i}"
                    write_video(self.path("evaluate", "videos", f"{stem}.mp4"), v, fps=8)
                    write_png(self.path("evaluate", "videos", f"{stem}.png"), keyframe_strip(v, n=min(4, len(v))))
                    samples.append({"model": name, "domain": d, "prompt": p["short"], "video": f"videos/{stem}.mp4",
                                    "keyframes": f"videos/{stem}.png"})
        accuracy = getattr(clf, "train_info", {})
        return {"heldout_loss": losses, "semantic": semantic, "samples": samples, "classifier": accuracy}

    # -- 9 --------------------------------------------------------------------------------------------
    def stage_report(self):
        from .video_io import write_png

        curves = {k: self.info(k)["losses"] for k in ("pretrain", "continual")}
        write_png(self.path("loss_curves.png"), plot_curves(curves))
        sheet = contact_sheet(self.path("evaluate", "videos"), self.info("evaluate")["samples"])
        if sheet is not None:
            write_png(self.path("contact_sheet.png"), sheet)
        self.path("report.md").write_text(self.report())

    def report(self) -> str:
        vae, grow, ev = self.info("vae"), self.info("grow"), self.info("evaluate")
        L, sem = ev["heldout_loss"], ev["semantic"]
        fmt = lambda v: f"{v:.4f}"  # noqa: E731
        score = lambda m, d: fmt(sem[m][d].get("semantic_score", sem[m][d].get("mean", float("nan"))))  # noqa: E731
        lines = [
            "# ModelGrow demo report", "",
            f"Sizes: {json.dumps(asdict(self.size))}", "",
            "## What ran",
            "synthetic clips (A: pre-training, B: continual) -> tiny T5 + tiny Llama (random weights, real tokenizers) ->",
            f"a tiny AutoencoderTiny trained on the synthetic frames (held-out PSNR {vae['psnr_heldout_db']:.1f} dB) -> latent/text cache ->",
            "STDiT pre-trained on A (short prompts) -> insert expansion k = 1 + LLM condition -> continual pre-training on B",
            f"(SL prompts) -> sampling with two-condition guidance ({self.size.sampler}, {self.size.sample_steps} steps).", "",
            "## Growth",
            f"depth {grow['depth'][0]} -> {grow['depth'][1]}, parameters {grow['params'][0]:,} -> {grow['params'][1]:,};",
            f"function preservation on held-out A inputs: max |grown - base| = {grow['max_abs_diff']:.2e}", "",
            "## Held-out denoising loss (lower is better)", "",
            "| model | A (forgetting) | B (new knowledge) |", "|---|---|---|",
            f"| base (pre-trained on A) | {fmt(L['base']['A'])} | {fmt(L['base']['B'])} |",
            f"| grown + LLM, after continual pre-training on B | {fmt(L['continual']['A'])} | {fmt(L['continual']['B'])} |", "",
            "## Semantic score of sampled videos (classifier agreement with the prompt: shape, colour, direction)", "",
            "| model | A | B |", "|---|---|---|",
            f"| base | {score('base', 'A')} | {score('base', 'B')} |",
            f"| continual | {score('continual', 'A')} | {score('continual', 'B')} |", "",
            "Samples: `evaluate/videos/` (mp4 + keyframe PNG), `contact_sheet.png`; curves: `loss_curves.png`.", "",
            "## Timings (s)", "", "| stage | seconds |", "|---|---|",
            *[f"| {k} | {v:.1f} |" for k, v in self.timings.items()], "",
            "## Reading these numbers",
            "This is a few-minute CPU run of tiny models with random-weight text encoders: it shows that every stage of",
            "the method works end to end and moves the numbers in the expected direction when it does, not that the",
            "paper's quality claims hold. The study in bench/study_continual.py is where the paper's comparisons belong.",
        ]
        return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list], width: int = 640, height: int = 320) -> np.ndarray:
    """A minimal line plot of (step, loss) series with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(img)
    pts = [p for series in curves.values() for p in series]
    if not pts:
        return np.asarray(img)
    offset, all_pts, colours = 0, [], [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for series in curves.values():
        all_pts.append([(s + offset, v) for s, v in series])
        offset += max((s for s, _ in series), default=0)
    xs = [p[0] for s in all_pts for p in s]
    ys = [p[1] for s in all_pts for p in s]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    pad = 40
    sx = lambda x: pad + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * pad)  # noqa: E731
    dr.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for (name, _), series, col in zip(curves.items(), all_pts, colours):
        if len(series) > 1:
            dr.line([(sx(x), sy(y)) for x, y in series], fill=col, width=2)
        dr.text((pad + 5, pad + 5 + 12 * list(curves).index(name)), f"{name} loss", fill=col)
    dr.text((pad, height - pad + 5), f"step 0 .. {int(x1)}   loss {y0:.3f} .. {y1:.3f}", fill="black")
    return np.asarray(img)


def contact_sheet(video_dir: Path, samples: list[dict]) -> np.ndarray | None:
    from PIL import Image

    rows = [np.asarray(Image.open(video_dir.parent / s["keyframes"]).convert("RGB")) for s in samples]
    if not rows:
        return None
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modelgrow demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--quick", action="store_true", help="minimal sizes (seconds; what the test suite runs)")
    ap.add_argument("--fresh", action="store_true", help="delete the output directory first")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these tiny models run fastest on one; with two on a busy 2-core "
                         "machine the VAE's small convolutions were measured 5-20x slower)")
    args = ap.parse_args(argv)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    torch.set_num_threads(max(1, args.threads))
    demo = Demo(args.out, QUICK if args.quick else DemoSize())
    report = demo.run([s for s in args.stages.split(",") if s])
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
