"""``modelgrow evaluate``: score a set of videos and write ``evaluation.json`` + ``evaluation.md``.

    modelgrow evaluate --videos DIR_OR_FILE --out DIR [--prompts F] [--dino DIR] [--clip DIR] [--device D]

Videos: the output folder of ``modelgrow sample`` (its ``samples.jsonl`` gives each video's prompt), any folder
of videos (``.mp4 .webm .mkv .mov .avi``, sorted by name), one video file, or a CSV manifest (``path,caption``).
``--prompts``: a JSON object ``{file name: prompt}`` (VBench's custom-prompt format) or a JSONL file with
``video``/``prompt`` keys, for folders without ``samples.jsonl``.

Dimensions (which need what):
    ============================  ===========================  ================================================
    dimension                      needs                        definition
    ============================  ===========================  ================================================
    temporal_flickering            nothing                      ``modelgrow.evaluate.classical``
    motion_smoothness_flow         OpenCV                       Farnebäck-interpolation stand-in for VBench's AMT
    dynamic_degree                 OpenCV                       VBench's rule on Farnebäck flow (fraction dynamic)
    subject_consistency            ``--dino DIR`` (DINO/ViT)    ``modelgrow.evaluate.features``
    background_consistency         ``--clip DIR`` (CLIP)        same formula on CLIP image features
    clip_score                     ``--clip DIR`` + prompts     mean frame-text cosine (clamped at 0)
    ============================  ===========================  ================================================
VBench's aesthetic quality (LAION aesthetic head on CLIP ViT-L/14), imaging quality (MUSIQ) and its semantic
dimensions (GRiT, ViCLIP, UMT, Tag2Text...) need their own weights; they are not computed here.
A video that cannot be decoded is skipped and listed under ``failures``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import classical

__all__ = ["VIDEO_EXTENSIONS", "discover_videos", "load_video", "evaluate_videos", "write_report", "main"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")


def _prompts_from(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        out = {}
        for line in text.splitlines():
            if line.strip():
                r = json.loads(line)
                out[os.path.basename(r["video"])] = r["prompt"]
        return out
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object {{video file name: prompt}}")
    return {os.path.basename(k): str(v) for k, v in d.items()}


def discover_videos(videos: str, prompts: str | None = None) -> list[dict]:
    """``[{"video": path, "prompt": str | None}]`` for a sample folder, a folder, a video file or a manifest."""
    p = Path(videos)
    extra = _prompts_from(prompts)
    if p.is_dir() and (p / "samples.jsonl").is_file():
        items = []
        for line in (p / "samples.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                items.append({"video": str(p / r["video"]), "prompt": extra.get(r["video"], r.get("prompt"))})
        return items
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS)
        return [{"video": str(f), "prompt": extra.get(f.name)} for f in files]
    if p.is_file() and p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{"video": r["path"] if os.path.isabs(r["path"]) else str(p.parent / r["path"]),
                 "prompt": extra.get(os.path.basename(r["path"]), r.get("caption"))} for r in rows]
    if p.is_file():
        return [{"video": str(p), "prompt": extra.get(p.name)}]
    raise FileNotFoundError(f"no videos at {videos}")


def load_video(path: str) -> tuple[np.ndarray, float]:
    """Every frame of a video, decoded with the project's decoder: (uint8 ``[T, H, W, 3]``, fps)."""
    from ..data.decode import decode_pyav, probe

    info = probe(path)
    return decode_pyav(path, list(range(info.num_frames))), info.fps


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def evaluate_videos(items: list[dict], dino: str | None = None, clip: str | None = None, device: str | None = None,
                    progress: bool = True) -> dict:
    """Per-video scores and their aggregates (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from .features import FeatureModel, clip_score_from_features, consistency_terms

    dino_m = FeatureModel(dino, device) if dino else None
    clip_m = FeatureModel(clip, device) if clip else None
    if clip_m is not None and not clip_m.is_clip:
        raise ValueError(f"--clip {clip} is not a CLIP checkpoint (config model_type {clip_m.model.config.model_type!r})")
    rows, failures, terms = [], [], {"subject_consistency": [], "background_consistency": []}
    for it in tqdm(items, desc="evaluate", unit="video", disable=not progress):
        try:
            frames, fps = load_video(it["video"])
        except Exception as e:  # noqa: BLE001 - skip, count and report the file
            failures.append({"video": it["video"], "error": f"{type(e).__name__}: {e}"})
            continue
        r = {"video": os.path.basename(it["video"]), "prompt": it.get("prompt"), "frames": int(len(frames)),
             "height": int(frames.shape[1]), "width": int(frames.shape[2]), "fps": fps}
        multi = len(frames) >= 2
        r["temporal_flickering"] = classical.temporal_flickering(frames) if multi else None
        r["motion_smoothness_flow"] = classical.motion_smoothness(frames) if len(frames) >= 3 else None
        if multi:
            dd = classical.dynamic_degree(frames, fps)
            r["dynamic_degree"] = float(dd["dynamic"])
            r["flow_peak_magnitude"] = float(np.mean(dd["magnitudes"]))
        else:
            r["dynamic_degree"] = r["flow_peak_magnitude"] = None
        if dino_m is not None:
            t = consistency_terms(dino_m.image_features(frames))
            terms["subject_consistency"].append(t)
            r["subject_consistency"] = float(t.mean()) if len(t) else 1.0
        if clip_m is not None:
            img = clip_m.image_features(frames)
            t = consistency_terms(img)
            terms["background_consistency"].append(t)
            r["background_consistency"] = float(t.mean()) if len(t) else 1.0
            if it.get("prompt"):
                r["clip_score"] = clip_score_from_features(img, clip_m.text_features([it["prompt"]])[0])
        rows.append(r)
    dims = ["temporal_flickering", "motion_smoothness_flow", "dynamic_degree"]
    if dino_m is not None:
        dims.append("subject_consistency")
    if clip_m is not None:
        dims += ["background_consistency", "clip_score"]
    summary = {d: _mean(r.get(d) for r in rows) for d in dims}
    for d, ts in terms.items():  # VBench averages the consistency terms over all frames of all videos
        if ts and sum(len(t) for t in ts):
            summary[d] = float(torch.cat(ts).mean())
    return {"summary": summary, "videos": rows, "failures": failures, "num_videos": len(rows),
            "models": {"dino": dino, "clip": clip}, "dimensions": dims}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(result: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """``evaluation.json`` + ``evaluation.md`` (summary table, per-video table, failures) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "evaluation.json"
    js.write_text(json.dumps(result, indent=2), encoding="utf-8")
    dims = result["dimensions"]
    lines = ["# Evaluation", "", f"{result['num_videos']} videos; feature models: dino={result['models']['dino']}, "
             f"clip={result['models']['clip']}.", "", "| dimension | score |", "|---|---|"]
    lines += [f"| {d} | {_fmt(result['summary'].get(d))} |" for d in dims]
    lines += ["", "| video | prompt | " + " | ".join(dims) + " |", "|---|---|" + "---|" * len(dims)]
    for r in result["videos"]:
        prompt = (r.get("prompt") or "").replace("|", "\\|")
        prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        lines.append(f"| {r['video']} | {prompt} | " + " | ".join(_fmt(r.get(d)) for d in dims) + " |")
    if result["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f['video']}: {f['error']}" for f in result["failures"]]
    md = out / "evaluation.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return js, md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelgrow evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="`modelgrow sample` output folder, a folder, a video or a CSV manifest")
    p.add_argument("--out", required=True, help="output folder (evaluation.json, evaluation.md)")
    p.add_argument("--prompts", default=None, help="JSON {file name: prompt} or JSONL with video/prompt keys")
    p.add_argument("--dino", default=None, help="local DINO / DINOv2 / ViT directory: subject consistency")
    p.add_argument("--clip", default=None, help="local CLIP directory: background consistency and CLIP score")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    items = discover_videos(args.videos, args.prompts)
    if not items:
        raise ValueError(f"no videos found in {args.videos} (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    res = evaluate_videos(items, dino=args.dino, clip=args.clip, device=args.device, progress=not args.no_progress)
    js, md = write_report(res, args.out)
    print(md.read_text(encoding="utf-8").split("\n\n| video")[0])
    print(f"wrote {js} and {md} ({res['num_videos']} videos, {len(res['failures'])} failed)", file=sys.stderr)
    return 1 if not res["num_videos"] else 0
