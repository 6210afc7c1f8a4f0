"""``modelgrow`` command line. It only parses arguments and calls into the package.

    modelgrow env                                   # versions, devices, kernel providers
    modelgrow config [--config X.toml] [--section.key v ...] [--out F] [--keys]
    modelgrow train --config X.toml [--section.key v ...]              # or: torchrun --nproc_per_node N -m modelgrow train ...
    modelgrow export --ckpt IN --out DIR [--weights ema|raw] [--config X.toml] [--section.key v ...]
    modelgrow grow --ckpt IN --out OUT --strategy insert --ratio 1 [--llm 4096] [--section.key v ...]
    modelgrow sample --model PIPELINE_DIR --prompt "..." --out DIR [--sample.key v ...] [--no-accel]
    modelgrow cache --manifest M --out DIR --vae DIR --t5 DIR [--llm DIR] [...]
    modelgrow recaption --model DIR (--prompts-file F | --csv IN) --out OUT [--mode SL]
    modelgrow demo [--out runs/demo] [--quick] [--fresh]   # the whole method end to end on synthetic videos
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="TOML config file; --section.key VALUE overrides follow")


def _load_cfg(args: argparse.Namespace, overrides: list[str]):
    from .config import load_config

    return load_config(args.config, overrides)


def cmd_env(args: argparse.Namespace, overrides: list[str]) -> int:
    import numpy
    import torch

    import mgkernels

    from . import __version__

    info = {
        "modelgrow": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "csrc_extension": mgkernels.build_info(),
    }
    for mod in ("triton", "safetensors", "transformers", "diffusers", "peft", "av", "nvidia.dali", "flash_attn"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - any import failure means "not usable here"
            info[mod] = None
    print(json.dumps(info, indent=2))
    return 0


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import describe_keys, dumps_config, save_config

    if args.keys:
        print(describe_keys())
        return 0
    cfg = _load_cfg(args, overrides)
    if args.out:
        print(f"wrote {save_config(cfg, args.out)}")
    else:
        print(dumps_config(cfg), end="")
    return 0


def _export_training_checkpoint(args: argparse.Namespace) -> int:
    """A DCP training checkpoint -> a pretrained dir with the EMA (default) or raw weights (LoRA merged)."""
    from .models import count_parameters
    from .train.export import export_checkpoint

    out, model, meta = export_checkpoint(args.ckpt, args.out, which=args.weights)
    print(f"wrote {out}: {args.weights.upper()} weights of step {meta['step']} ({count_parameters(model):,} parameters)")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mgkernels.dispatch import requested

    from .train.trainer import main as train_main

    cfg = _load_cfg(args, overrides)
    requested()  # a bad MG_KERNELS is an error before the model is built
    return train_main(cfg)


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from .config import save_config
    from .models import STDiT, count_parameters, load_checkpoint, save_pretrained

    if (Path(args.ckpt) / "meta.json").exists() and (Path(args.ckpt) / ".metadata").exists():
        return _export_training_checkpoint(args)
    cfg = _load_cfg(args, overrides)
    kwargs = cfg.model.stdit_kwargs()
    if args.meta_load:
        with torch.device("meta"):
            model = STDiT(**kwargs)
    else:
        model = STDiT(**kwargs)
    report = load_checkpoint(model, args.ckpt, strict=args.strict, format=args.format, key=args.key)
    print(report.describe())
    out = save_pretrained(model, args.out, extra={"source": str(args.ckpt), "source_format": report.format})
    save_config(cfg, out / "modelgrow.toml")
    print(f"wrote {out} ({count_parameters(model):,} parameters, {len(model.blocks)} blocks)")
    return 0


def _load_model_for(args: argparse.Namespace, cfg):
    """A pretrained dir loads with its own config; any other checkpoint needs the [model] config."""
    from .models import STDiT, from_pretrained, load_checkpoint
    from .models.checkpoint import CONFIG_NAME

    if Path(args.ckpt).is_dir() and (Path(args.ckpt) / CONFIG_NAME).exists():
        return from_pretrained(args.ckpt)
    model = STDiT(**cfg.model.stdit_kwargs())
    print(load_checkpoint(model, args.ckpt).describe())
    return model


def cmd_grow(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import save_config
    from .grow import add_llm_condition, expand
    from .models import count_parameters, save_pretrained

    cfg = _load_cfg(args, overrides)
    g = cfg.grow
    if g.strategy == "none" and not g.llm:
        raise ValueError("nothing to do: set --grow.strategy insert|prefix|suffix and/or --grow.llm true")
    model = _load_model_for(args, cfg)
    before = (len(model.blocks), count_parameters(model))
    if g.strategy != "none":
        model = expand(model, g.strategy, ratio=None if g.num_new else g.ratio, num_new=g.num_new)
    if g.llm:
        model = add_llm_condition(model, g.llm_channels, g.llm_max_length, copy_t5=g.copy_t5_to_llm, per_head_gate=g.per_head_gate)
    after = (len(model.blocks), count_parameters(model))
    out = save_pretrained(model, args.out, extra={"source": str(args.ckpt)})
    save_config(cfg, out / "modelgrow.toml")
    print(f"depth {before[0]} -> {after[0]}, parameters {before[1]:,} -> {after[1]:,}")
    print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> int:
    import re

    import torch

    from .pipeline import ModelGrowPipeline
    from .video_io import keyframe_strip, write_png, write_video

    cfg = _load_cfg(args, overrides)
    sc = cfg.sample
    if args.prompt:
        prompts = list(args.prompt)
    elif args.prompts_file:
        prompts = [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    else:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    if not prompts:
        raise ValueError(f"{args.prompts_file} holds no prompts")
    from mgkernels.dispatch import requested, use

    requested()  # a bad MG_KERNELS is an error here, before anything is loaded or sampled
    out_dir = Path(args.out)
    _check_writable(out_dir, "--out")
    pipe = ModelGrowPipeline.from_pretrained(args.model, device=args.device, accelerate_model=not args.no_accel)
    empty = pipe.empty_after_cleaning(prompts) if not args.recaption else []
    if empty and not args.allow_empty_prompt:
        raise ValueError(f"{len(empty)} prompt(s) are empty after the T5 caption cleaning (non-Latin text is removed): "
                         f"{empty[:5]}; rephrase them, or pass --allow-empty-prompt to sample them unconditionally")
    records = []
    from contextlib import nullcontext

    bs = sc.batch_size
    for start in range(0, len(prompts), bs):
        batch = prompts[start : start + bs]
        seed = sc.seed + start  # one seed per forward batch (sample.batch_size = 1: sample.seed + prompt index)
        with use("ref") if args.no_accel else nullcontext():  # --no-accel: the PyTorch reference path
            res = pipe(batch, negative_prompt=args.negative_prompt, num_frames=sc.num_frames, height=sc.height,
                       width=sc.width, num_inference_steps=sc.num_sampling_steps, sampler=sc.sampler,
                       guidance_scale=sc.cfg_scale_t5, llm_guidance_scale=sc.cfg_scale_llm, prompt_mode=sc.prompt_mode,
                       recaption=args.recaption, generator=torch.Generator().manual_seed(seed))
        for j, prompt in enumerate(batch):
            i = start + j
            stem = f"{i:03d}-" + (re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt")
            frames = res.videos[j]
            video = write_video(out_dir / f"{stem}.mp4", frames, fps=sc.fps)
            strip = write_png(out_dir / f"{stem}.png", keyframe_strip(frames, n=4))
            records.append({"prompt": prompt, "model_prompt": res.prompts[j], "seed": res.seed, "batch_size": len(batch),
                            "video": video.name, "keyframes": strip.name, **res.settings})
            print(f"[{i + 1}/{len(prompts)}] seed {res.seed}: {video}")
    with open(out_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


def _check_writable(out_dir: Path, what: str) -> None:
    """Create ``out_dir`` and prove a file can be written there, before any expensive work."""
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {out_dir} is not writable ({e.strerror or e}); choose another directory") from None


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelgrow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print versions, devices and which kernel providers are available")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("config", help="resolve a config (file + overrides) and print or save it as TOML")
    _add_config_args(p)
    p.add_argument("--out", type=Path, default=None, help="write the resolved config here instead of printing it")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("export", help="convert an Open-Sora/PixArt/safetensors checkpoint into a pretrained dir")
    _add_config_args(p)
    p.add_argument("--ckpt", type=Path, required=True, help=".pth/.pt (read weights-only), .safetensors or a pretrained dir")
    p.add_argument("--out", type=Path, required=True, help="output directory (model.safetensors + config.json)")
    p.add_argument("--format", default="auto", choices=["auto", "opensora", "pixart", "modelgrow"])
    p.add_argument("--key", default=None, help="entry of a wrapped checkpoint to read (ema, model, state_dict)")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="load what fits and report the rest")
    p.add_argument("--meta-load", action="store_true", help="build the model on the meta device (no init memory; strict only)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="training checkpoints: export the EMA (default) or the raw weights (recorded in config.json)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train / continue pre-training (alone or under torchrun)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("grow", help="expand a checkpoint's blocks and/or add the LLM condition (function preserving)")
    _add_config_args(p)
    p.add_argument("--ckpt", type=Path, required=True, help="pretrained dir, or .pth/.safetensors with --model.* overrides")
    p.add_argument("--out", type=Path, required=True, help="output pretrained dir")
    p.add_argument("--strategy", dest="_strategy", default=None, choices=["insert", "prefix", "suffix", "none"],
                   help="shorthand for --grow.strategy")
    p.add_argument("--ratio", dest="_ratio", default=None, help="shorthand for --grow.ratio (k, e.g. 1, 0.5, 2)")
    p.add_argument("--num-new", dest="_num_new", default=None, help="shorthand for --grow.num_new (P new blocks)")
    p.add_argument("--llm", dest="_llm", default=None, type=int, metavar="CHANNELS",
                   help="shorthand for --grow.llm true --grow.llm_channels CHANNELS")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("sample", help="generate videos from prompts with a pretrained pipeline (H.264 mp4 + keyframe PNG)")
    _add_config_args(p)
    p.add_argument("--model", type=Path, required=True, help="pipeline directory (ModelGrowPipeline.save_pretrained)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--recaption", action="store_true", help="rewrite prompts with the pipeline's recaptioner first")
    p.add_argument("--no-accel", action="store_true", help="reference path: no fused kernels' compile / dtype change")
    p.add_argument("--device", default=None)
    p.add_argument("--allow-empty-prompt", action="store_true",
                   help="sample prompts the T5 cleaning reduces to nothing (e.g. non-Latin text) unconditionally")
    p.set_defaults(func=cmd_sample)

    sub.add_parser("cache", add_help=False,
                   help="pre-encode VAE latents and T5 (+ LLM) states into safetensors shards (see: modelgrow cache --help)")
    sub.add_parser("recaption", add_help=False,
                   help="rewrite short prompts into detailed ones with a local instruct LLM (see: modelgrow recaption --help)")

    p = sub.add_parser("demo", help="the whole method end to end on synthetic videos (CPU minutes; --quick: seconds)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["recaption"], ["cache"]):  # commands with their own argument parsers
        if argv[0] == "recaption":
            from .text.recaption import main as command
        else:
            from .data.cache import main as command
        from .data.loader import TooManyDecodeFailures

        try:
            return command(argv[1:])
        except (FileNotFoundError, ValueError, TooManyDecodeFailures) as e:
            print(f"modelgrow {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    for short, key in (("_strategy", "strategy"), ("_ratio", "ratio"), ("_num_new", "num_new")):
        if getattr(args, short, None) is not None:
            rest += [f"--grow.{key}", str(getattr(args, short))]
    if getattr(args, "_llm", None) is not None:
        rest += ["--grow.llm", "true", "--grow.llm_channels", str(args._llm)]
    if rest and args.command not in ("config", "export", "grow", "sample", "train", "demo"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # checkpoint mismatches and other bad input
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf loss, training state or samples: nothing was written
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
