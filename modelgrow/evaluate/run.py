"""``modelgrow evaluate``: score a set of videos and write ``evaluation.json`` + ``evaluation.md``.

    modelgrow evaluate --videos DIR_OR_FILE --out DIR [--prompts F] [--dino DIR] [--clip DIR] [--judge DIR]
                       [--device D]

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
    mllm_score                     ``--judge DIR`` (VLM)        paper's MLLM judge: 1-5 rating -> [0, 1]
                                   + prompts                    (``modelgrow.evaluate.judge``, prompt there)
    ============================  ===========================  ================================================
VBench's aesthetic quality (LAION aesthetic head on CLIP ViT-L/14), imaging quality (MUSIQ) and its semantic
dimensions (GRiT, ViCLIP, UMT, Tag2Text...) need their own weights; they are not computed here.
A video that cannot be decoded is skipped and listed under ``failures``. ``--judge``: a local image/video-text-to-
text model directory (the recaptioning loader, ``modelgrow.text.vlm.VLM``); a reply with no rating in range is
recorded per video (``mllm_error``, raw ``mllm_reply``), counted under ``judge.failed`` and left out of the mean.
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
                    progress: bool = True, judge=None, judge_options: dict | None = None) -> dict:
    """Per-video scores and their aggregates (see the module docstring). ``judge``: a local VLM directory or an
    ``MLLMJudge``; ``judge_options``: ``MLLMJudge`` keyword arguments (num_frames, batch_size, ...)."""
    import torch
    from tqdm.auto import tqdm

    from .features import FeatureModel, clip_score_from_features, consistency_terms

    dino_m = FeatureModel(dino, device) if dino else None
    clip_m = FeatureModel(clip, device) if clip else None
    if clip_m is not None and not clip_m.is_clip:
        raise ValueError(f"--clip {clip} is not a CLIP checkpoint (config model_type {clip_m.model.config.model_type!r})")
    from .judge import SCORE_MAX, SCORE_MIN, MLLMJudge

    judge_m = None
    if judge is not None:
        judge_m = judge if isinstance(judge, MLLMJudge) else MLLMJudge(judge, device=device, **(judge_options or {}))
    pending: list[tuple[dict, np.ndarray]] = []

    def flush() -> None:
        if pending:
            recs = judge_m.rate([f for _, f in pending], [r["prompt"] for r, _ in pending])
            for (r, _), rec in zip(pending, recs, strict=True):
                r.update(rec)
            pending.clear()

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
        if judge_m is not None:
            if it.get("prompt"):
                pending.append((r, judge_m.sample(frames)))
                if len(pending) >= judge_m.batch_size:
                    flush()
            else:
                r["mllm_score"], r["mllm_error"] = None, "no prompt"
        rows.append(r)
    if judge_m is not None:
        flush()
    dims = ["temporal_flickering", "motion_smoothness_flow", "dynamic_degree"]
    if dino_m is not None:
        dims.append("subject_consistency")
    if clip_m is not None:
        dims += ["background_consistency", "clip_score"]
    judge_info = None
    if judge_m is not None:
        dims.append("mllm_score")
        judged = [r for r in rows if "mllm_reply" in r]
        judge_info = {
            "model": judge_m.path, "instruction": judge_m.instruction, "rating_range": [SCORE_MIN, SCORE_MAX],
            "normalisation": f"(rating - {SCORE_MIN}) / {SCORE_MAX - SCORE_MIN}", "num_frames": judge_m.num_frames,
            "scored": sum(r.get("mllm_score") is not None for r in judged),
            "failed": sum(r.get("mllm_score") is None for r in judged),
            "no_prompt": sum(r.get("mllm_error") == "no prompt" for r in rows),
            "failures": [{"video": r["video"], "error": r["mllm_error"], "reply": r["mllm_reply"]}
                         for r in judged if r.get("mllm_score") is None],
        }
    summary = {d: _mean(r.get(d) for r in rows) for d in dims}
    for d, ts in terms.items():  # VBench averages the consistency terms over all frames of all videos
        if ts and sum(len(t) for t in ts):
            summary[d] = float(torch.cat(ts).mean())
    return {"summary": summary, "videos": rows, "failures": failures, "num_videos": len(rows),
            "models": {"dino": dino, "clip": clip, "judge": judge_m.path if judge_m is not None else None},
            "dimensions": dims, "judge": judge_info}


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
    j = result.get("judge")
    if j:
        lines += ["", f"MLLM judge ({j['model']}, {j['num_frames']} frames, rating {j['rating_range'][0]}-"
                  f"{j['rating_range'][1]} normalised to [0, 1]): {j['scored']} scored, {j['failed']} failed "
                  f"(no rating in the reply), {j['no_prompt']} without a prompt."]
    lines += ["", "| video | prompt | " + " | ".join(dims) + " |", "|---|---|" + "---|" * len(dims)]
    for r in result["videos"]:
        prompt = (r.get("prompt") or "").replace("|", "\\|")
        prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        lines.append(f"| {r['video']} | {prompt} | " + " | ".join(_fmt(r.get(d)) for d in dims) + " |")
    if result["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f['video']}: {f['error']}" for f in result["failures"]]
    if j and j["failures"]:
        def _reply(t: str) -> str:
            t = " ".join(t.split())
            return t if len(t) <= 120 else t[:117] + "..."
        lines += ["", "## MLLM judge failures", ""]
        lines += [f"- {f['video']}: {f['error']}; reply: `{_reply(f['reply'])}`" for f in j["failures"]]
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
    p.add_argument("--judge", default=None, help="local image/video-text-to-text model directory: MLLM judge score")
    p.add_argument("--judge-frames", type=int, default=8, help="frames per video shown to the judge (default 8)")
    p.add_argument("--judge-batch-size", type=int, default=4, help="videos per judge generate call (default 4)")
    p.add_argument("--judge-max-new-tokens", type=int, default=16)
    p.add_argument("--judge-frames-as", choices=("auto", "images", "video"), default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    items = discover_videos(args.videos, args.prompts)
    if not items:
        raise ValueError(f"no videos found in {args.videos} (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    judge_options = {"num_frames": args.judge_frames, "batch_size": args.judge_batch_size,
                     "max_new_tokens": args.judge_max_new_tokens, "frames_as": args.judge_frames_as}
    res = evaluate_videos(items, dino=args.dino, clip=args.clip, device=args.device, progress=not args.no_progress,
                          judge=args.judge, judge_options=judge_options)
    js, md = write_report(res, args.out)
    print(md.read_text(encoding="utf-8").split("\n\n| video")[0])
    print(f"wrote {js} and {md} ({res['num_videos']} videos, {len(res['failures'])} failed)", file=sys.stderr)
    return 1 if not res["num_videos"] else 0
