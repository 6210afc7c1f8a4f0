"""Building a latent / text cache: ``modelgrow cache [--config F.toml] [--section.key v ...]``, the same typed
config as ``modelgrow train`` (``data.manifest`` in, ``data.cache_dir`` out; see :func:`main`).

Clip policy (decision)
    One fixed clip per sample, no augmentation: the centre temporal window (``clips.sample_frame_indices``
    with ``u=None``), the same resize + centre crop as training, no flip; the VAE latent is the posterior
    *mode* (mean), not a sample, so the cache is deterministic and a re-run gives the same bytes. Storing
    several augmentations would multiply the cache size for a small gain at this clip length; the trade-off
    (no temporal jitter, no flip, no posterior noise when training from the cache) is documented here and in
    ``index.json`` (``settings.clip``).

Resume
    Finished shards (both files present and consistent) are skipped; a ``cache.json`` with other settings or
    other encoders is an error (``CacheMismatchError``), never silently mixed.

Joint image + video training
    Built with single-frame images (``cache.single_frame_images``, or ``data.image_batch_prob`` set), an image
    row is a one-frame latent in the shard tensor ``latent_image`` (videos stay in ``latent``); ``index.json``
    marks them in ``is_image`` and ``base.JointLoader`` batches the two shapes apart.

The file layout and what a cache records: :mod:`.format`. The encoders run through :mod:`modelgrow.data.encode`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from ...models.stdit import dtype_from_name
from ..base import FailureCounter, load_items
from ..encode import Encoders, encode_latents, encode_text
from ..manifest import load_manifest
from ..videos import VideoDataset
from .format import (
    CACHE_VERSION,
    CLIP_POLICY,
    STORAGE_DTYPES,
    CacheMismatchError,
    encoder_identity,
    head_diff,
    manifest_sha,
    read_json,
    shard_paths,
    write_index,
    write_json,
    write_shard,
)

__all__ = ["build_cache", "main"]

log = logging.getLogger("modelgrow.data")


def _load_encoders(vae, t5, llm, device):
    from ...text import LLMEncoder, T5Encoder
    from ...vae import VideoVAE

    if isinstance(vae, (str, os.PathLike)):
        vae = VideoVAE.from_pretrained(vae, device=device)
    if isinstance(t5, (str, os.PathLike)):
        t5 = T5Encoder(str(t5), device=device)
    if isinstance(llm, (str, os.PathLike)):
        llm = LLMEncoder(str(llm), device=device)
    return vae, t5, llm


def build_cache(manifest: str | os.PathLike, out_dir: str | os.PathLike, vae, t5, llm=None, num_frames: int = 16,
                frame_interval: int = 3, image_size: tuple[int, int] = (256, 256), prompt_mode: str = "SL",
                batch_size: int = 8, shard_size: int = 256, seed: int = 0, decoder: str = "auto",
                num_workers: int = 0, latent_dtype: str = "float32", text_dtype: str = "float32",
                max_fail_fraction: float = 0.01, device: str | torch.device | None = None,
                overwrite: bool = False, single_frame_images: bool = False) -> Path:
    """Encode every manifest row once (see the module docstring) and return the path of ``index.json``.

    ``single_frame_images=True`` (joint image + video training) stores an image row as a one-frame latent
    ``[C, 1, h, w]`` (tensor ``latent_image`` of its shard) instead of a clip of repeated frames.

    ``vae``/``t5``/``llm``: a ``VideoVAE`` / ``T5Encoder`` / ``LLMEncoder`` or a local directory to load one
    from. ``overwrite=True`` discards a cache built with other settings instead of raising."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    for name, dt in (("latent_dtype", latent_dtype), ("text_dtype", text_dtype)):
        if dt not in STORAGE_DTYPES:
            raise ValueError(f"{name} must be one of {list(STORAGE_DTYPES)}, got {dt!r}")
    if not 0.0 <= max_fail_fraction <= 1.0 or max_fail_fraction != max_fail_fraction:
        raise ValueError(f"max_fail_fraction must be in [0, 1], got {max_fail_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        man = load_manifest(manifest)
    except UnicodeDecodeError as e:
        raise ValueError(f"{manifest}: the manifest is not UTF-8 text ({e}); re-save it as UTF-8") from None
    vae, t5, llm = _load_encoders(vae, t5, llm, device)
    ds = VideoDataset(man, num_frames, frame_interval, image_size, hflip=False, decoder=decoder, seed=seed,
                      prompt_mode=prompt_mode, deterministic=True, single_frame_images=single_frame_images)
    settings = {"version": CACHE_VERSION, "num_frames": int(num_frames), "frame_interval": int(frame_interval),
                "image_size": [int(image_size[0]), int(image_size[1])], "prompt_mode": prompt_mode,
                "decoder": decoder, "shard_size": int(shard_size), "latent_dtype": latent_dtype,
                "text_dtype": text_dtype, "clip": CLIP_POLICY, "manifest_sha256": manifest_sha(man.path),
                "num_rows": len(man)}
    if single_frame_images:  # only then: caches built before this setting existed keep their identity
        settings["images"] = "single-frame"
    encoders = {"vae": encoder_identity("vae", vae), "t5": encoder_identity("t5", t5),
                "llm": encoder_identity("llm", llm) if llm is not None else None}
    head = {"settings": settings, "encoders": encoders}
    cache_json = out / "cache.json"
    if cache_json.exists():
        old = read_json(cache_json)
        problems = head_diff(old, head)
        if problems and not overwrite:
            raise CacheMismatchError(f"{out} holds a cache built with other settings/encoders ({'; '.join(problems)}); "
                                     "use another output directory (data.cache_dir) or overwrite (--overwrite)")
        if problems:
            for f in list(out.glob("shard_*")) + [out / "index.json"]:
                f.unlink(missing_ok=True)
    write_json(cache_json, head)
    (out / "index.json").unlink(missing_ok=True)

    counter = FailureCounter(max_fail_fraction)

    def over_threshold() -> None:  # the rule over the whole manifest, whatever its size
        counter.check_total(len(man), f"rows of {man.path}", "fix or drop those rows, or raise data.max_fail_fraction")

    n_shards = -(-len(man) // shard_size)
    for s in range(n_shards):
        rows = list(range(s * shard_size, min(len(man), (s + 1) * shard_size)))
        st_path, js_path = shard_paths(out, s)
        if st_path.exists() and js_path.exists():
            meta = read_json(js_path)
            if meta.get("rows") == rows:
                log.info("cache: shard %d already done, skipped", s)
                counter.record(ok=len(meta["indices"]), failed=meta["failed"])
                over_threshold()
                continue
        samples, failed = [], []
        for item in load_items(ds, [(0, 0, i) for i in rows], num_workers):
            if "failed" in item:
                failed.append(item["failed"])
                counter.fail(f"{item['failed']} (manifest row {item.get('index')})", item["error"])
                over_threshold()
            else:
                counter.ok()
                samples.append(item)
        tensors: dict[str, list[torch.Tensor]] = {"latent": [], "latent_image": [], "y": [], "mask": []}
        if llm is not None:
            tensors |= {"y_llm": [], "llm_mask": []}
        # single-frame images go to "latent_image", in row order among the images (one shape per tensor)
        latent_keys = ["latent_image" if single_frame_images and c.get("is_image") else "latent" for c in samples]
        latent_dt, text_dt = dtype_from_name(latent_dtype), dtype_from_name(text_dtype)
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            for key in ("latent", "latent_image"):
                group = [c["video"] for c, k in zip(chunk, latent_keys[b : b + batch_size], strict=True) if k == key]
                if group:
                    tensors[key].append(encode_latents(vae, torch.stack(group), "mode").cpu().to(latent_dt))
            text = encode_text(t5, llm, [c["prompt"] for c in chunk])
            tensors["y"].append(text["y"][:, 0].float().cpu().to(text_dt))
            tensors["mask"].append(text["mask"].cpu().to(torch.int8))
            if llm is not None:
                tensors["y_llm"].append(text["y_llm"][:, 0].float().cpu().to(text_dt))
                tensors["llm_mask"].append(text["llm_mask"].cpu().to(torch.int8))
        data = {k: torch.cat(v).contiguous() for k, v in tensors.items() if v}
        if samples:
            data["index"] = torch.tensor([c["index"] for c in samples], dtype=torch.long)
        meta = {"rows": rows, "indices": [c["index"] for c in samples], "failed": failed,
                "captions": [c["caption"] for c in samples], "long_captions": [c["long_caption"] for c in samples],
                "prompts": [c["prompt"] for c in samples]}
        if "latent_image" in latent_keys:
            meta["latent_keys"] = latent_keys
        write_shard(out, s, data, meta)
        log.info("cache: shard %d/%d written (%d samples, %d failed)", s + 1, n_shards, len(samples), len(failed))
    return write_index(out, head, man.path, n_shards)


# ----------------------------------------------------------------------------------------------------------
# CLI: the typed config
# ----------------------------------------------------------------------------------------------------------

# shorthand flags (kept) and the flags of the command before it took the typed config (deprecated)
SHORTHANDS = {"--manifest": "data.manifest", "--out": "data.cache_dir", "--vae": "data.vae", "--t5": "data.t5",
              "--llm": "data.llm"}
LEGACY_FLAGS = {
    "--num-frames": "data.num_frames", "--frame-interval": "data.frame_interval", "--image-size": "data.image_size",
    "--prompt-mode": "data.prompt_mode", "--t5-max-length": "model.model_max_length",
    "--llm-max-length": "grow.llm_max_length", "--llm-layer": "data.llm_layer",
    "--no-llm-template": ("data.llm_use_template", "false"), "--batch-size": "cache.batch_size",
    "--shard-size": "cache.shard_size", "--seed": None, "--decoder": "data.decoder",
    "--num-workers": "data.num_workers", "--latent-dtype": "cache.latent_dtype", "--text-dtype": "cache.text_dtype",
    "--max-fail-fraction": "data.max_fail_fraction", "--single-frame-images": ("cache.single_frame_images", "true"),
}

USAGE = """\
Pre-encode VAE latents and T5 (+ LLM) states of a manifest into a cache that `modelgrow train` reads
(data.cache_dir). Options are config keys, as for `modelgrow train`: --config FILE.toml, then --section.key VALUE
overrides. It reads data.manifest, data.vae, data.t5 [, data.llm], the clip settings data.num_frames,
data.frame_interval, data.image_size, data.prompt_mode, data.decoder, data.num_workers, data.max_fail_fraction,
the text lengths model.model_max_length (T5) and grow.llm_max_length (LLM), data.llm_layer,
data.llm_use_template, and [cache] (batch_size, shard_size, latent_dtype, text_dtype, single_frame_images).
The cache records every one of them; training from it checks the config against them.

  modelgrow cache --config run.toml --manifest train.csv --out cache/train
  modelgrow cache --data.manifest m.csv --data.cache_dir cache/m --data.vae vae --data.t5 t5 --data.num_frames 16
"""


def _image_size(value: str) -> str:
    parts = [p for p in value.replace("x", ",").split(",") if p]
    return f"{parts[0]},{parts[0]}" if len(parts) == 1 else value.replace("x", ",")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelgrow cache", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="TOML config file; --section.key VALUE overrides follow")
    for flag, key in SHORTHANDS.items():
        p.add_argument(flag, dest=f"_{key.replace('.', '__')}", default=None, help=f"shorthand for --{key}")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="discard a cache built with other settings")
    return p


def main(argv: list[str] | None = None) -> int:
    from ...config import load_config, translate_legacy_flags

    argv = translate_legacy_flags(list(sys.argv[1:] if argv is None else argv), LEGACY_FLAGS, "modelgrow cache",
                                  transforms={"--image-size": _image_size},
                                  dropped={"--seed": "the cache holds the deterministic centre clip"})
    args, rest = parser().parse_known_args(argv)
    for key in SHORTHANDS.values():
        v = getattr(args, f"_{key.replace('.', '__')}")
        if v is not None:
            rest += [f"--{key}", v]
    cfg = load_config(args.config, rest)
    d, c = cfg.data.resolved(), cfg.cache
    if not d.manifest:
        raise ValueError("modelgrow cache: set data.manifest (--manifest FILE), the videos to encode")
    if not d.cache_dir:
        raise ValueError("modelgrow cache: set data.cache_dir (--out DIR), where the cache goes")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    enc = Encoders.from_config(cfg, device, llm=bool(d.llm), data=d, what="modelgrow cache")
    path = build_cache(d.manifest, d.cache_dir, enc.vae, enc.t5, enc.llm, num_frames=d.num_frames,
                       frame_interval=d.frame_interval, image_size=d.image_size, prompt_mode=d.prompt_mode,
                       batch_size=c.batch_size, shard_size=c.shard_size, decoder=d.decoder,
                       num_workers=cfg.data.num_workers or 0, latent_dtype=c.latent_dtype, text_dtype=c.text_dtype,
                       max_fail_fraction=d.max_fail_fraction, device=device, overwrite=args.overwrite,
                       single_frame_images=c.single_frame_images or d.image_batch_prob is not None)
    idx = read_json(path)
    print(f"cache: {idx['num_samples']} samples in {len(idx['shards'])} shards, {len(idx['failed'])} failed -> {path}")
    return 0
