"""Video recaptioning with a local vision-language model (the paper's appendix C: long training captions
generated *from the videos* by LLaVA-NeXT with the Fig. 9 instruction).

    modelgrow recaption --videos manifest.csv --vlm DIR --out out.csv [--recaption.num_frames 8] [--recaption.batch_size 4]

Input: a CSV manifest (``path`` column, relative paths resolve against the manifest's directory; any other
columns are kept). Videos and images may be mixed; ``recaption.num_frames`` evenly spaced frames are read with the project's
decoders (``modelgrow.text.vlm.read_frames``).

Output: the same CSV with two columns added, ``long_caption`` (``recaption.out_col``) and ``<out_col>_status``:
    ``ok``         -- the caption has ``min_words``..``max_words`` words (a longer one is cut at its last sentence
                      end that keeps >= ``min_words`` words, else after word ``max_words``);
    ``too_short``  -- still under ``min_words`` after ``retries`` seeded, sampled regenerations: the longest
                      candidate is kept as it is and flagged -- never padded;
    ``failed: ...`` -- the row's file could not be decoded or generation raised; the message says why.
Resumable: every finished batch is appended to ``<out>.partial.jsonl``; a re-run (same manifest, same ``--out``)
reads that journal and the existing output and only processes rows that are not done (``failed`` rows are retried,
``too_short`` ones only with ``--redo-flagged``). The final CSV is written atomically and the journal removed.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence

from .recaption import _atomic_write_csv, clean_generation, count_words, fit_word_range

__all__ = ["VIDEO_CAPTION_INSTRUCTION", "VideoRecaptioner", "recaption_manifest", "main"]

# The paper's Fig. 9 instruction. The extracted text has one clause out of order ("... a clear and precise description
# to help someone The focus should be on providing who cannot see ..."); it is restored here, wording unchanged.
VIDEO_CAPTION_INSTRUCTION = (
    "Please generate a detailed video caption that describes the scene comprehensively and accurately. "
    "The caption should include specific elements such as the appearance of objects, their actions and clothing, "
    "the scene and setting, video style, lighting and weather conditions, or any notable objects. "
    "Also the caption should including the camera movement, camera angle and shot type. "
    "The focus should be on providing a clear and precise description to help someone who cannot see the video "
    "understand the scene and the dynamics and actions fully."
)

DONE = ("ok", "too_short")


class VideoRecaptioner:
    """Frames -> a long caption of ``min_words``..``max_words`` words (flagged, never padded, when shorter)."""

    def __init__(self, vlm, instruction: str | None = None, min_words: int = 35, max_words: int = 200,
                 retries: int = 2) -> None:
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.vlm = vlm
        self.instruction = instruction or VIDEO_CAPTION_INSTRUCTION
        self.min_words, self.max_words, self.retries = int(min_words), int(max_words), int(retries)

    def caption(self, videos: Sequence) -> list[tuple[str, str]]:
        """``(caption, status)`` per video (status ``ok`` or ``too_short``)."""
        texts = [self.instruction] * len(videos)
        best = [clean_generation(g) for g in self.vlm.generate(list(videos), texts)]
        for attempt in range(1, self.retries + 1):
            short = [i for i, b in enumerate(best) if count_words(b) < self.min_words]
            if not short:
                break
            gens = self.vlm.generate([videos[i] for i in short], [self.instruction] * len(short), do_sample=True,
                                     seed=self.vlm.seed + 1000 * attempt)
            for i, g in zip(short, gens, strict=True):
                g = clean_generation(g)
                if count_words(g) > count_words(best[i]):
                    best[i] = g
        return [fit_word_range(b, self.min_words, self.max_words) for b in best]


def _read_csv(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _resolve(manifest: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(os.path.dirname(os.path.abspath(manifest)), p)


def _done_rows(out: str, rows: list[dict], out_col: str, status_col: str, redo_flagged: bool) -> dict[int, tuple]:
    """Row index -> (caption, status) already finished by an earlier run (output CSV + journal)."""
    done: dict[int, tuple] = {}
    ok = ("ok",) if redo_flagged else DONE
    if os.path.isfile(out):
        _, prev = _read_csv(out)
        if len(prev) == len(rows) and all(a.get("path") == b.get("path") for a, b in zip(prev, rows, strict=True)):
            for i, r in enumerate(prev):
                if r.get(status_col) in ok:
                    done[i] = (r.get(out_col) or "", r[status_col])
    journal = out + ".partial.jsonl"
    if os.path.isfile(journal):
        with open(journal, encoding="utf-8") as f:
            for line in f:
                try:
                    j = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                i = j.get("row")
                if isinstance(i, int) and 0 <= i < len(rows) and j.get("path") == rows[i].get("path"):
                    if j.get("status") in ok:
                        done[i] = (j["caption"], j["status"])
                    else:
                        done.pop(i, None)
    return done


def recaption_manifest(recaptioner: VideoRecaptioner, manifest: str, out: str, out_col: str = "long_caption",
                       redo_flagged: bool = False, progress: bool = True, decoder=None) -> dict:
    """Caption every row of ``manifest`` into ``out`` (see the module docstring). Returns counts
    ``{"rows", "skipped", "ok", "too_short", "failed", "failures": [(row, path, message)]}``."""
    from tqdm.auto import tqdm

    from ..data.decode import FrameDecoder
    from .vlm import read_frames

    fields, rows = _read_csv(manifest)
    if "path" not in fields:
        raise ValueError(f"{manifest}: no 'path' column (columns: {fields})")
    status_col = f"{out_col}_status"
    for c in (out_col, status_col):
        if c not in fields:
            fields.append(c)
    done = _done_rows(out, rows, out_col, status_col, redo_flagged)
    todo = [i for i in range(len(rows)) if i not in done]
    results: dict[int, tuple] = dict(done)
    decoder = decoder or FrameDecoder("pyav")
    journal = out + ".partial.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    bs = recaptioner.vlm.batch_size
    with open(journal, "a", encoding="utf-8") as jf, tqdm(total=len(todo), desc="recaption", unit="video",
                                                          disable=not progress) as bar:
        for b in range(0, len(todo), bs):
            batch, frames = [], []
            for i in todo[b : b + bs]:
                try:
                    frames.append(read_frames(_resolve(manifest, rows[i]["path"]), recaptioner.vlm.num_frames, decoder))
                    batch.append(i)
                except Exception as e:  # noqa: BLE001 - a bad file fails its row only
                    results[i] = ("", f"failed: {type(e).__name__}: {e}")
            if batch:
                try:
                    caps = recaptioner.caption(frames)
                except Exception as e:  # noqa: BLE001 - report the batch's rows, keep going
                    caps = [("", f"failed: {type(e).__name__}: {e}")] * len(batch)
                results.update(zip(batch, caps, strict=True))
            for i in todo[b : b + bs]:
                cap, st = results[i]
                jf.write(json.dumps({"row": i, "path": rows[i]["path"], "caption": cap, "status": st}) + "\n")
            jf.flush()
            bar.update(len(todo[b : b + bs]))
    for i, r in enumerate(rows):
        r[out_col], r[status_col] = results[i]
    _atomic_write_csv(out, fields, rows)
    os.unlink(journal)
    failures = [(i, rows[i]["path"], results[i][1]) for i in range(len(rows)) if results[i][1].startswith("failed")]
    return {"rows": len(rows), "skipped": len(done), "ok": sum(results[i][1] == "ok" for i in results),
            "too_short": sum(results[i][1] == "too_short" for i in results), "failed": len(failures),
            "failures": failures}


def run(args, r) -> int:
    """``modelgrow recaption --videos M --vlm DIR --out OUT`` with the ``[recaption]`` settings ``r`` (the command
    line is parsed by :func:`modelgrow.text.recaption.parse_args`)."""
    from .vlm import VLM

    if not r.vlm:
        raise ValueError("modelgrow recaption --videos: set recaption.vlm (--vlm DIR), the local vision-language model")
    if not os.path.isfile(args.videos):
        raise FileNotFoundError(f"manifest not found: {args.videos}")
    vlm = VLM(r.vlm, device=args.device, dtype=r.dtype, num_frames=r.num_frames, frames_as=r.frames_as,
              max_new_tokens=r.max_new_tokens or 320, batch_size=r.batch_size or 4, seed=r.seed)
    rc = VideoRecaptioner(vlm, r.instruction, r.min_words, r.max_words or 200, r.retries)
    res = recaption_manifest(rc, args.videos, args.out, r.out_col, args.redo_flagged, not args.no_progress)
    print(f"{args.out}: {res['rows']} rows ({res['skipped']} done before), {res['ok']} ok, "
          f"{res['too_short']} flagged too_short, {res['failed']} failed", file=sys.stderr)
    for i, path, msg in res["failures"][:20]:
        print(f"  row {i + 2} {path}: {msg}", file=sys.stderr)
    return 1 if res["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``modelgrow recaption --videos ...`` (the same command line as :func:`modelgrow.text.recaption.main`)."""
    from .recaption import main as recaption_main

    return recaption_main(argv)
