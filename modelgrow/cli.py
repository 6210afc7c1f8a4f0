"""``modelgrow`` command line. It only parses arguments and calls into the package.

    modelgrow env                                   # versions, devices, kernel providers
    modelgrow config [--config X.toml] [--section.key v ...] [--out F] [--keys]
    modelgrow train --config X.toml [--section.key v ...]              # or: torchrun --nproc_per_node N -m modelgrow train ...
    modelgrow export --ckpt IN --out DIR [--weights ema|raw] [--config X.toml] [--section.key v ...]
    modelgrow grow --ckpt IN --out OUT --strategy insert --ratio 1 [--llm 4096] [--section.key v ...]
    modelgrow pipeline --transformer DIR --vae DIR --t5 DIR [--llm DIR] [--recaptioner DIR] --out DIR [--sample.key v ...]
    modelgrow sample --model PIPELINE_DIR --prompt "..." --out DIR [--sample.key v ...] [--no-accel]
    modelgrow cache [--config X.toml] --manifest M --out DIR [--data.key v ...]   # data.vae, data.t5 [, data.llm]
    modelgrow recaption --model DIR (--prompts-file F | --csv IN) --out OUT [--recaption.key v ...]
    modelgrow recaption --videos MANIFEST.csv --vlm DIR --out OUT.csv [--recaption.key v ...]  # with a local VLM
    modelgrow evaluate --videos DIR --out DIR [--dino DIR] [--clip DIR]  # VBench-style dimensions
    modelgrow demo [--out runs/demo] [--quick] [--fresh]   # the whole method end to end on synthetic videos
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

TRAIN_HELP = """\
Train or continue pre-training; options are config keys: --config FILE.toml, then --section.key VALUE overrides
(list every key with its type, default and meaning: `modelgrow config --keys`; see the resolved config:
`modelgrow config --config FILE.toml [overrides]`).

Resume is automatic: with checkpoint.resume = true (the default) a run whose train.output_dir already holds
checkpoints continues from the newest one (model, optimizer, EMA, step, data position, RNG) - bit-exactly.
--checkpoint.resume false on such a directory is an error unless --checkpoint.overwrite true (start over).
The architecture must match the run's checkpoints: changing a [model] or [grow] key (e.g. --grow.ratio) on an
existing run is an error naming the keys; use a new --train.output_dir.
Continual pre-training from weights only (no optimizer or step): --checkpoint.load_weights PATH
(an Open-Sora .pth, .safetensors or pretrained dir; --checkpoint.strict false loads what fits).

  modelgrow train --config configs/grow.toml --train.steps 1000 --train.output_dir runs/grow
  torchrun --nproc_per_node 8 -m modelgrow train --config configs/grow.toml
"""


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
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or directory")
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

    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or directory")
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
    save_config(_describe_model(cfg, model), out / "modelgrow.toml")
    print(f"depth {before[0]} -> {after[0]}, parameters {before[1]:,} -> {after[1]:,}")
    print(f"wrote {out}")
    return 0


def _describe_model(cfg, model):
    """``cfg`` with its [model] section set to what ``model`` is (preset matched by architecture, sizes
    explicit), so a config saved beside a grown model describes that model, not the defaults."""
    import dataclasses

    from .models.zoo import PRESETS

    c = model.config
    arch = {k: c[k] for k in ("depth", "hidden_size", "num_heads")} | {"patch_size": tuple(c["patch_size"])}
    preset = next((n for n, p in PRESETS.items() if all(p.get(k) == v for k, v in arch.items())), cfg.model.preset)
    m = dataclasses.replace(cfg.model, preset=preset, depth=c["depth"], hidden_size=c["hidden_size"],
                            num_heads=c["num_heads"], patch_size=tuple(c["patch_size"]), input_size=tuple(c["input_size"]),
                            in_channels=c["in_channels"], caption_channels=c["caption_channels"],
                            model_max_length=c["model_max_length"], mlp_ratio=c["mlp_ratio"])
    g = dataclasses.replace(cfg.grow, llm=bool(c.get("llm_channels")), llm_channels=c.get("llm_channels") or cfg.grow.llm_channels,
                            llm_max_length=c.get("llm_max_length") or cfg.grow.llm_max_length)
    return dataclasses.replace(cfg, model=m, grow=g)


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
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such pipeline directory")
    # the recaptioner LLM is loaded only when it is used
    skip = {} if args.recaption else {"recaptioner": None, "recaptioner_tokenizer": None}
    if (Path(args.model) / "model_index.json").exists():
        pipe = ModelGrowPipeline.from_pretrained(args.model, device=args.device, accelerate_model=not args.no_accel, **skip)
    else:  # an older pipeline.json directory
        pipe = ModelGrowPipeline.from_pretrained(args.model, device=args.device, accelerate_model=not args.no_accel)
    # sizes, sampler, steps, guidance and prompt mode: the pipeline's own unless given (file or --sample.KEY)
    given = _given_keys(args, overrides, "sample")
    pick = {k: getattr(sc, k) if k in given else None for k in
            ("num_frames", "height", "width", "num_sampling_steps", "sampler", "cfg_scale_t5", "cfg_scale_llm", "prompt_mode")}
    fps = sc.fps if "fps" in given else pipe.settings["fps"]
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
            res = pipe(batch, negative_prompt=args.negative_prompt, num_frames=pick["num_frames"], height=pick["height"],
                       width=pick["width"], num_inference_steps=pick["num_sampling_steps"], sampler=pick["sampler"],
                       guidance_scale=pick["cfg_scale_t5"], llm_guidance_scale=pick["cfg_scale_llm"],
                       prompt_mode=pick["prompt_mode"], recaption=args.recaption,
                       generator=torch.Generator().manual_seed(seed))
        for j, prompt in enumerate(batch):
            i = start + j
            stem = f"{i:03d}-" + (re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt")
            frames = res.videos[j]
            video = write_video(out_dir / f"{stem}.mp4", frames, fps=fps)
            strip = write_png(out_dir / f"{stem}.png", keyframe_strip(frames, n=4))
            records.append({"prompt": prompt, "model_prompt": res.prompts[j], "seed": res.seed, "batch_size": len(batch),
                            "video": video.name, "keyframes": strip.name, **res.settings})
            print(f"[{i + 1}/{len(prompts)}] seed {res.seed}: {video}")
    with open(out_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


def cmd_pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    """Assemble a diffusers pipeline directory from component directories, with [sample] as its defaults."""
    from .config import PIPELINE_NAMES
    from .models import from_pretrained
    from .pipeline import ModelGrowPipeline
    from .text import LLMEncoder, Recaptioner, T5Encoder
    from .vae import VideoVAE

    for flag in ("transformer", "vae", "t5", "llm", "recaptioner"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"--{flag} {path}: no such directory")
    _check_writable(Path(args.out).parent if Path(args.out).parent != Path("") else Path("."), "--out")
    cfg = _load_cfg(args, overrides)
    model = from_pretrained(args.transformer)
    vae = VideoVAE.from_pretrained(args.vae, micro_batch_size=args.vae_micro_batch_size)
    t5 = T5Encoder(str(args.t5), max_length=args.t5_max_length or model.config["model_max_length"], device="cpu")
    llm = None
    if args.llm is not None:
        llm = LLMEncoder(str(args.llm), max_length=args.llm_max_length or model.config.get("llm_max_length", 120), device="cpu")
    recap = Recaptioner(str(args.recaptioner), device="cpu") if args.recaptioner is not None else None
    sc = cfg.sample  # the pipeline's saved sampling defaults: [sample] (the one table of defaults, config.py)
    config = {"sampler": sc.sampler, **{name: getattr(sc, key) for key, name in PIPELINE_NAMES.items()}}
    pipe = ModelGrowPipeline(model, vae, t5, llm, recap, config=config)
    out = pipe.save_pretrained(args.out)
    print(f"wrote {out} (components: {', '.join(k for k, v in pipe.components.items() if v is not None)}; "
          f"sampler {sc.sampler}, {sc.num_sampling_steps} steps)")
    return 0


def _given_keys(args: argparse.Namespace, overrides: list[str], section: str) -> set[str]:
    """The keys of ``section`` the user set, in the --config file or as --section.key overrides."""
    import tomllib

    from .config import parse_overrides

    keys = set(parse_overrides(overrides).get(section, {}))
    if args.config is not None and Path(args.config).exists():
        keys |= set(tomllib.loads(Path(args.config).read_text(encoding="utf-8")).get(section, {}))
    return keys


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
    from . import __version__

    parser = argparse.ArgumentParser(prog="modelgrow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"modelgrow {__version__}")
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

    p = sub.add_parser("train", help="train / continue pre-training (alone or under torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=TRAIN_HELP)
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("grow", help="expand a checkpoint's blocks and/or add the LLM condition (function preserving)")
    _add_config_args(p)
    p.add_argument("--ckpt", type=Path, required=True, help="pretrained dir, or .pth/.safetensors with --model.* overrides")
    p.add_argument("--out", type=Path, required=True, help="output pretrained dir")
    p.add_argument("--strategy", dest="_strategy", default=None, choices=["insert", "prefix", "suffix", "none"],
                   help="shorthand for --grow.strategy")
    p.add_argument("--ratio", dest="_ratio", default=None, metavar="K", help="shorthand for --grow.ratio (k, e.g. 1, 0.5, 2)")
    p.add_argument("--num-new", dest="_num_new", default=None, metavar="P", help="shorthand for --grow.num_new (P new blocks)")
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

    p = sub.add_parser("pipeline", help="assemble a pipeline directory (diffusers layout) from component directories; "
                       "its sampling defaults are the [sample] config keys (--config F, --sample.key VALUE)")
    _add_config_args(p)
    p.add_argument("--transformer", type=Path, required=True, help="pretrained STDiT dir (modelgrow export / grow / train export)")
    p.add_argument("--vae", type=Path, required=True, help="diffusers AutoencoderKL dir")
    p.add_argument("--t5", type=Path, required=True, help="T5 encoder dir (model + tokenizer)")
    p.add_argument("--llm", type=Path, default=None, help="causal-LM dir for the LLM condition (a grown model with --llm)")
    p.add_argument("--recaptioner", type=Path, default=None, help="instruct-LM dir for --recaption")
    p.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    p.add_argument("--sampler", dest="_sampler", default=None, choices=["iddpm", "ddim", "dpm-solver", "euler"],
                   help="shorthand for --sample.sampler (the default scheduler)")
    p.add_argument("--steps", dest="_steps", default=None, metavar="N",
                   help="shorthand for --sample.num_sampling_steps (the default number of inference steps)")
    p.add_argument("--t5-max-length", type=int, default=None, help="T5 tokens (default: the transformer's model_max_length)")
    p.add_argument("--llm-max-length", type=int, default=None, help="LLM tokens (default: the transformer's llm_max_length)")
    p.add_argument("--vae-micro-batch-size", type=int, default=4, help="frames per VAE call")
    p.set_defaults(func=cmd_pipeline)

    sub.add_parser("cache", add_help=False,
                   help="pre-encode VAE latents and T5 (+ LLM) states into safetensors shards (see: modelgrow cache --help)")
    sub.add_parser("recaption", add_help=False,
                   help="rewrite short prompts into detailed ones with a local instruct LLM (see: modelgrow recaption --help)")
    sub.add_parser("evaluate", add_help=False,
                   help="score videos: flickering, dynamic degree, DINO/CLIP consistency, CLIP score (see: modelgrow evaluate --help)")

    sub.add_parser("demo", add_help=False, help="the whole method end to end on synthetic videos (CPU minutes; "
                   "--quick: seconds; see: modelgrow demo --help)")
    return parser


SHORTHANDS = {"_strategy": "grow.strategy", "_ratio": "grow.ratio", "_num_new": "grow.num_new",
              "_sampler": "sample.sampler", "_steps": "sample.num_sampling_steps"}


def shorthand_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--section.key value`` overrides that shorthand flags (grow's --strategy, pipeline's --steps, ...) stand for."""
    out = []
    for dest, key in SHORTHANDS.items():
        if getattr(args, dest, None) is not None:
            out += [f"--{key}", str(getattr(args, dest))]
    if getattr(args, "_llm", None) is not None:
        out += ["--grow.llm", "true", "--grow.llm_channels", str(args._llm)]
    return out


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its own argument parser (modelgrow demo --help lists --out, --quick, --fresh, --stages)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] in (["recaption"], ["cache"], ["evaluate"]):  # commands with their own argument parsers
        if argv[0] == "recaption":  # typed config: --config F, --recaption.key VALUE
            from .text.recaption import main as command
        elif argv[0] == "evaluate":
            from .evaluate.run import main as command
        else:  # typed config: --config F, --data.key VALUE, --cache.key VALUE
            from .data.cache.build import main as command
        from .data.base import TooManyDecodeFailures

        try:
            return command(argv[1:])
        except (FileNotFoundError, ValueError, TooManyDecodeFailures) as e:
            print(f"modelgrow {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    rest += shorthand_overrides(args)
    if rest and args.command not in ("config", "export", "grow", "pipeline", "sample", "train"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # checkpoint mismatches and other bad input
        msg = str(e)
        if "pass strict=False" in msg:  # name the command-line flag, not the Python argument
            flag = "--no-strict" if args.command in ("export", "grow") else "--checkpoint.strict false"
            msg = msg.replace("pass strict=False", f"pass {flag}")
        print(f"modelgrow {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf loss, training state or samples: nothing was written
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
