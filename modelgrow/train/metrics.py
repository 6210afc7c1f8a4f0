"""Throughput accounting for the step line (DESIGN convention 8):
``step | loss | grad_norm | lr | samples/s | tokens/s | TFLOP/s | MFU | mem | data_wait``, and the sinks every
record goes to (:class:`MetricSinks`: ``metrics.jsonl``, TensorBoard, Weights & Biases)."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import numpy as np
import torch

# dense bf16 tensor-core peaks (TFLOP/s) of the devices the project targets, for MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:  # pragma: no cover
        return float("nan")


def step_line(step: int, m: dict) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    return (f"step {step} | loss {m['loss']:.4f} | grad_norm {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
            f"samples/s {m['samples_per_s']:.2f} | tokens/s {m['tokens_per_s']:.0f} | TFLOP/s {m['tflops']:.2f} | "
            f"MFU {mfu} | mem {m['mem_gib']:.2f} GiB | data_wait {100 * m['data_wait']:.1f}%")


# ------------------------------------------------------------------------------------------------------------
# where the numbers go: metrics.jsonl, TensorBoard, Weights & Biases
# ------------------------------------------------------------------------------------------------------------

WANDB_HINT = "pip install wandb (or the extra: pip install 'modelgrow[wandb]')"
WANDB_ID_FILE = "wandb_run_id"  # in train.output_dir: a resumed run continues the same W&B run


def import_wandb():
    """``wandb``, or an ImportError that says how to install it (``train.wandb`` = online | offline needs it)."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"train.wandb = online/offline needs Weights & Biases, which is not importable ({e}): "
                          f"{WANDB_HINT}; or set train.wandb = off") from None
    return wandb


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """uint8 ``[T, H, W, 3]`` frames -> an animated GIF (what TensorBoard's add_video stores; made with PIL, so no
    moviepy is needed)."""
    from PIL import Image

    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0)
    return buf.getvalue()


class MetricSinks:
    """Rank 0's metric outputs, all fed by :meth:`log` / :meth:`media`:

    * ``metrics.jsonl``: one JSON object per record. Training step records as they always were (``step``,
      ``loss``, ``grad_norm``, ...); other records carry ``"kind"`` (``"val"``: the validation).
    * TensorBoard (``tensorboard/``, when installed): scalar ``<kind>/<key>`` per number (``train/loss``,
      ``val/loss_ema``); media: ``val/video/<i>`` (an animated GIF, the form add_video writes, made without moviepy),
      ``val/keyframes/<i>`` (keyframe strip) and ``val/prompts`` (text).
    * Weights & Biases (``train.wandb`` = online | offline): the same scalar keys at the same steps, the mp4 files as
      ``wandb.Video`` and the keyframe strips as ``wandb.Image`` (captioned with the prompt), the resolved config.
      The run lives in ``<output_dir>/wandb/`` (offline: ``wandb sync`` uploads it later); its id is kept in
      ``<output_dir>/wandb_run_id``, so a resumed training run continues the same W&B run."""

    def __init__(self, out: Path, wandb_mode: str = "off", project: str = "modelgrow", run_name: str | None = None,
                 config: dict | None = None, resume: bool = False):
        self.out = Path(out)
        self.wandb_mode, self.project, self.run_name = wandb_mode, project, run_name
        self.config, self.resume = config, resume
        self._writer = None  # None: not tried yet; False: tensorboard missing
        self._run = None
        self._wandb = import_wandb() if wandb_mode != "off" else None

    @property
    def tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._writer = False
        return self._writer or None

    @property
    def wandb_run(self):
        if self._wandb is None:
            return None
        if self._run is None:
            wandb = self._wandb
            self.out.mkdir(parents=True, exist_ok=True)
            id_file = self.out / WANDB_ID_FILE
            if self.resume and id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = secrets.token_hex(6)  # W&B run ids: [a-z0-9]
                id_file.write_text(run_id + "\n")
            self._run = wandb.init(project=self.project, name=self.run_name or self.out.resolve().name, id=run_id,
                                   resume="allow", dir=str(self.out), mode=self.wandb_mode, config=self.config)
        return self._run

    def open(self) -> None:
        """Start the W&B run now (at the start of training) rather than at the first record."""
        _ = self.wandb_run

    def log(self, record: dict, kind: str = "train") -> None:
        """One record (``record["step"]`` = the optimizer step) to every sink; ``kind`` names the section."""
        step = int(record["step"])
        line = record if kind == "train" else {"step": step, "kind": kind, **{k: v for k, v in record.items() if k != "step"}}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        if self.tensorboard is not None:
            for tag, v in scalars.items():
                self.tensorboard.add_scalar(tag, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def media(self, step: int, items: list[dict], kind: str = "val") -> None:
        """Sampled clips: ``items`` of ``{"prompt", "frames" (uint8 [T, H, W, 3]), "keyframes" (uint8 [H, W', 3]),
        "fps", "mp4" (path or None)}``."""
        if not items:
            return
        tb = self.tensorboard
        if tb is not None:
            from torch.utils.tensorboard.summary import Summary

            for i, it in enumerate(items):
                T, H, W, C = it["frames"].shape
                gif = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=gif_bytes(it["frames"], it["fps"]))
                tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"{kind}/video/{i}", image=gif)]), step)
                tb.add_image(f"{kind}/keyframes/{i}", it["keyframes"], step, dataformats="HWC")
            tb.add_text(f"{kind}/prompts", "\n".join(f"{i}. {it['prompt']}" for i, it in enumerate(items)), step)
            tb.flush()
        run = self.wandb_run
        if run is not None:
            wandb = self._wandb
            logged = {f"{kind}/keyframes": [wandb.Image(it["keyframes"], caption=it["prompt"]) for it in items]}
            videos = [wandb.Video(str(it["mp4"]), caption=it["prompt"], format="mp4") for it in items if it.get("mp4")]
            if videos:
                logged[f"{kind}/video"] = videos
            run.log(logged, step=step)

    def close(self, failed: bool = False) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
