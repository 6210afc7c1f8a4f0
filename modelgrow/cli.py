"""``modelgrow`` command line. It only parses arguments and calls into the package.

    modelgrow env                                   # versions, devices, kernel providers
    modelgrow config [--config X.toml] [--section.key v ...] [--out F] [--keys]
    modelgrow export --ckpt IN --out DIR [--config X.toml] [--section.key v ...]
    modelgrow demo                                  # the end-to-end demo (not implemented yet)
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


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from .config import save_config
    from .models import STDiT, count_parameters, load_checkpoint, save_pretrained

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


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    print(
        "modelgrow demo is not implemented yet: the end-to-end demo (synthetic videos -> pre-train -> grow + LLM "
        "condition -> continual pre-training -> sampling) lands with a later issue. What works today: the "
        "Open-Sora v1.0 STDiT, checkpoint conversion (modelgrow export) and the config system; see README.md.",
        file=sys.stderr,
    )
    return 2


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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the end-to-end demo (not implemented yet)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("config", "export"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # checkpoint mismatches and other bad input
        print(f"modelgrow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
