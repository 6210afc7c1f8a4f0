"""A semantic evaluator for the synthetic video world: a small trained classifier that reads the shape, colour and
motion direction of the object in a clip, used to score generated videos against their prompts -- the CPU
stand-in for VBench's semantic dimensions and the CompBench/MLLM attribute score of the paper.

Design (hybrid: fixed, differentiable-free measurement + small learned heads)
    1. Input: uint8 ``[T, H, W, 3]`` frames or model-space float ``[3, T, H, W]`` in [-1, 1] (or batches /
       lists of those). ``FRAMES`` (6) evenly spaced frames are taken and resized to 64x64.
    2. Measurement: the background colour is the median of the border pixels (over frames); the foreground map
       of a frame is the distance to the background, soft-thresholded relative to the frame's peak distance.
       From it: per-frame centroid and rms radius, the mean foreground colour (soft and core pixels), and a
       crop of the foreground map centred on the centroid and scaled by the radius (``CROP`` x ``CROP``).
    3. Learned heads: a small CNN over the crops (averaged over frames) -> shape (colour- and
       scale-invariant); an MLP over the colour statistics -> colour; an MLP over the centroid trajectory
       (least-squares velocity, end-start displacement, centred track) -> direction.
    Trained from scratch with cross-entropy on rendered ground-truth clips of the train split (so the held-out
    (shape, colour) pairs are unseen by the evaluator too), with augmentation for codec artefacts and for
    blurry generated clips: Gaussian blur, down/up-sampling, 4:2:0 chroma subsampling, noise, colour gain and
    offset, per-frame spatial jitter, temporal crop and frame-index jitter.

``score`` compares predictions with the prompt's attributes and reports per-attribute accuracy and their mean,
the "semantic score".
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .world import BACKGROUNDS, render_clip, sample_specs, vocabulary

__all__ = ["SemanticClassifier", "train_classifier", "prepare_videos", "background_of", "SCORED_ATTRIBUTES",
           "MEASURED_ATTRIBUTES", "ALL_ATTRIBUTES", "FRAMES", "RES", "CROP", "object_contrast",
           "MIN_OBJECT_CONTRAST", "NO_OBJECT"]

SCORED_ATTRIBUTES = ("shape", "color", "direction")  # learned heads
MEASURED_ATTRIBUTES = ("background",)  # read off the frames with no learned weights
ALL_ATTRIBUTES = SCORED_ATTRIBUTES + MEASURED_ATTRIBUTES
FRAMES = 6  # frames the classifier looks at
RES = 64  # frames are resized to RES x RES
CROP = 24  # side of the foreground crop fed to the shape CNN
_SHAPE_FRAMES = (0, 2, 3, 5)  # frames whose crops the shape CNN sees
# below this RGB distance between object and background (object_contrast) a clip has no object to read: its shape,
# colour and direction are predicted as NO_OBJECT (wrong for every prompt). Measured on 300 rendered clips per
# domain (32x32, 4 frames): >= 0.48 on A, 0.64 on B; their reconstructions by the demo's VAE >= 0.47; an empty
# generated clip (flat background): 0.007.
MIN_OBJECT_CONTRAST = 0.2
NO_OBJECT = "none"


# ------------------------------------------------------------------------------------------------------------
# input handling
# ------------------------------------------------------------------------------------------------------------


def _one_video(v) -> torch.Tensor:
    """One video -> float [T, 3, H, W] in [0, 1]."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor video; got {type(v).__name__}")
    if v.ndim != 4:
        raise ValueError(f"expected one video with 4 dims; got shape {list(v.shape)}")
    if v.dtype == torch.uint8:
        if v.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be [T, H, W, 3]; got {list(v.shape)}")
        return v.permute(0, 3, 1, 2).float() / 255.0
    if v.shape[0] != 3:
        raise ValueError(f"float videos must be model-space [3, T, H, W] in [-1, 1]; got {list(v.shape)}")
    return ((v.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3)


def _select(x: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
    """[T, 3, H, W] -> [frames, 3, RES, RES]: evenly spaced frames, resized."""
    idx = torch.linspace(0, x.shape[0] - 1, frames).round().long()
    x = x[idx]
    if x.shape[-2:] != (RES, RES):
        x = F.interpolate(x, size=(RES, RES), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def prepare_videos(videos) -> torch.Tensor:
    """Videos (one, a batch, or a list; uint8 ``[T, H, W, 3]`` or float ``[3, T, H, W]`` in [-1, 1]) ->
    float ``[B, FRAMES, 3, RES, RES]`` in [0, 1]."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            videos = [videos]
        elif videos.ndim == 5:
            videos = list(videos)
        else:
            raise ValueError(f"expected a video or a batch of videos; got shape {list(videos.shape)}")
    return torch.stack([_select(_one_video(v)) for v in videos]) if len(videos) else torch.zeros(
        0, FRAMES, 3, RES, RES)


# ------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------


def _foreground(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, K, 3, S, S] in [0, 1] -> (x lightly smoothed, background colour [B, 3], RGB distance to the
    background [B, K, S, S], peak distance per frame [B, K]: the mean of the 16 largest)."""
    B, K, _, S, _ = x.shape
    # light 3x3 smoothing: the foreground map of noisy generations stays clean
    p = F.pad(x.reshape(B * K, 3, S, S), (1, 1, 1, 1), mode="replicate")
    p = p[..., :, :-2] + p[..., :, 1:-1] + p[..., :, 2:]  # separable box sums (avg_pool2d is slow here)
    x = ((p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]) / 9).reshape(x.shape)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)  # [B, K, 3, 4S]
    bg = border.median(-1).values.median(1).values  # [B, 3]
    diff = ((x - bg[:, None, :, None, None]) ** 2).sum(2).sqrt()  # [B, K, S, S] (faster than .norm(dim=2))
    return x, bg, diff, diff.flatten(2).topk(16, dim=-1).values.mean(-1)


def object_contrast(x: torch.Tensor) -> torch.Tensor:
    """Prepared clips [B, K, 3, RES, RES] -> [B]: the object's RGB distance to the background (peak of the
    foreground map, median over frames; rendered clips: >= 0.48, a clip with no object: ~0.01)."""
    return _foreground(x)[3].median(1).values


def _measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [B, K, 3, S, S] in [0, 1] -> colour features [B, 12], trajectory features [B, 4 + 2K],
    foreground crops [B, len(_SHAPE_FRAMES), 1, CROP, CROP]."""
    B, K, _, S, _ = x.shape
    x, bg, diff, peak = _foreground(x)
    peak = peak.clamp_min(0.05)  # [B, K]
    lo = (0.25 * peak).clamp_min(0.06)[..., None, None]
    hi = (0.6 * peak)[..., None, None].clamp_min(lo + 1e-3)
    w = ((diff - lo) / (hi - lo)).clamp(0, 1)  # soft foreground
    core = ((diff - 0.7 * peak[..., None, None]) / (0.2 * peak[..., None, None])).clamp(0, 1)
    grid = (torch.arange(S, dtype=x.dtype) + 0.5) / S * 2 - 1  # pixel centres in [-1, 1]
    mass = w.sum((-1, -2)).clamp_min(1e-4)  # [B, K]
    cx = (w * grid[None, None, None, :]).sum((-1, -2)) / mass
    cy = (w * grid[None, None, :, None]).sum((-1, -2)) / mass
    r2 = (w * ((grid[None, None, None, :] - cx[..., None, None]) ** 2
               + (grid[None, None, :, None] - cy[..., None, None]) ** 2)).sum((-1, -2)) / mass
    rr = r2.clamp_min(1e-6).sqrt()  # rms radius, [-1, 1] units

    def wmean(m):
        return (m[:, :, None] * x).sum((1, 3, 4)) / m.sum((1, 2, 3)).clamp_min(1e-4)[:, None]

    color = torch.cat([wmean(w), wmean(core), bg, wmean(core) - bg], 1) * 2 - 1  # [B, 12]

    c = torch.stack([cx, cy], -1)  # [B, K, 2]
    tc = torch.linspace(-1, 1, K, dtype=x.dtype)
    cc = c - c.mean(1, keepdim=True)
    slope = (tc[None, :, None] * cc).sum(1) / (tc**2).sum()  # per unit of centred time
    traj = torch.cat([slope * 3, (c[:, -1] - c[:, 0]) * 1.5, cc.flatten(1) * 3], 1)  # [B, 4 + 2K]

    sel = torch.tensor(_SHAPE_FRAMES)
    half = (2.0 * rr[:, sel] + 2.0 / S).clamp(4.0 / S, 1.0)  # crop half-size, [-1, 1] units
    theta = torch.zeros(B * len(sel), 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = half.reshape(-1)
    theta[:, 0, 2] = cx[:, sel].reshape(-1)
    theta[:, 1, 2] = cy[:, sel].reshape(-1)
    g = F.affine_grid(theta, (B * len(sel), 1, CROP, CROP), align_corners=False)
    crops = F.grid_sample(w[:, sel].reshape(B * len(sel), 1, S, S), g, align_corners=False, padding_mode="zeros")
    return {"color": color, "traj": traj, "crops": crops.reshape(B, len(sel), 1, CROP, CROP)}


# ------------------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------------------


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x [B, K, 3, S, S], per-clip sigma [B] (pixels), replicate borders."""
    B, K, C, S, _ = x.shape
    r = 4
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 2r+1]
    k = k[:, None].expand(B, K * C, 2 * r + 1).reshape(B * K * C, 1, 1, 2 * r + 1)
    y = F.pad(x.reshape(1, B * K * C, S, S), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k, groups=B * K * C), k.transpose(2, 3), groups=B * K * C)
    return y.reshape(B, K, C, S, S)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Codec- and generation-like corruption of clean clips x [B, K, 3, S, S] in [0, 1] (modified in place).
    Each corruption hits a random contiguous run of the (randomly ordered) batch, so every op works on a
    view; the run lengths and offsets vary per call, so all combinations occur."""
    B, K, C, S, _ = x.shape

    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    def span(p: float) -> slice:
        n = int((torch.rand(B, generator=g) < p).sum())
        s0 = int(torch.randint(0, B - n + 1, (1,), generator=g))
        return slice(s0, s0 + n)

    # per-frame spatial jitter (translation) and a per-clip scale: an axis-aligned affine grid
    sl = span(0.6)
    n = sl.stop - sl.start
    if n:
        base = (torch.arange(S, dtype=x.dtype) + 0.5) / S * 2 - 1
        scale = u(n, 1, 1, 1, lo=0.94, hi=1.06)
        shift = u(n, 1, 2, lo=-0.05, hi=0.05) + u(n, K, 2, lo=-1.2, hi=1.2) * (2.0 / S)
        gx = (base[None, None, None, :] * scale + shift[..., 0, None, None]).expand(n, K, S, S)
        gy = (base[None, None, :, None] * scale + shift[..., 1, None, None]).expand(n, K, S, S)
        grid = torch.stack([gx, gy], -1).reshape(n * K, S, S, 2)
        x[sl] = F.grid_sample(x[sl].reshape(n * K, C, S, S), grid, align_corners=False,
                              padding_mode="border").reshape(n, K, C, S, S)
    # down/up-sampling (low-resolution generations)
    sl = span(0.3)
    n = sl.stop - sl.start
    if n:
        f = [16, 24, 32][int(torch.randint(3, (1,), generator=g))]
        y = F.interpolate(x[sl].reshape(n * K, C, S, S), size=(f, f), mode="area")
        x[sl] = F.interpolate(y, size=(S, S), mode="bilinear", align_corners=False).reshape(n, K, C, S, S)
    # Gaussian blur
    sl = span(0.7)
    n = sl.stop - sl.start
    if n:
        x[sl] = _gaussian_blur(x[sl], u(n, lo=0.3, hi=2.2))
    # 4:2:0 chroma subsampling
    sl = span(0.5)
    n = sl.stop - sl.start
    if n:
        y = x[sl]
        lum = (0.299 * y[:, :, 0] + 0.587 * y[:, :, 1] + 0.114 * y[:, :, 2])[:, :, None]
        ch = F.avg_pool2d((y - lum).reshape(n * K, C, S, S), 2)
        x[sl] = F.interpolate(ch, scale_factor=2, mode="nearest").reshape(n, K, C, S, S).add_(lum)
    # colour gain / offset, noise
    x.mul_(u(B, 1, C, 1, 1, lo=0.92, hi=1.08)).add_(u(B, 1, C, 1, 1, lo=-0.04, hi=0.04))
    bank = _noise_bank()
    noise = bank[torch.randint(0, len(bank), (B, K), generator=g)]
    x.add_(noise.mul_(u(B, 1, 1, 1, 1, lo=0.0, hi=0.08)))
    return x.clamp_(0, 1)


_NOISE: list[torch.Tensor] = []


def _noise_bank() -> torch.Tensor:
    """A fixed bank of unit Gaussian noise frames [256, 3, RES, RES] (drawing fresh noise every step is slow)."""
    if not _NOISE:
        _NOISE.append(torch.randn(256, 3, RES, RES, generator=torch.Generator().manual_seed(1234)))
    return _NOISE[0]


# ------------------------------------------------------------------------------------------------------------
# the classifier
# ------------------------------------------------------------------------------------------------------------


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, o))


def background_of(x: torch.Tensor, names: Sequence[str] | None = None) -> list[str]:
    """The named background of prepared clips x [B, K, 3, S, S] in [0, 1]: the median colour of the border pixels
    over all frames, matched to the nearest of ``BACKGROUNDS`` (RGB distance; all names by default). No learned
    weights: a clip whose border is a blend of two backgrounds gets the nearer one."""
    names = list(names or BACKGROUNDS)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)  # [B, K, 3, 4S]
    bg = border.transpose(1, 2).flatten(2).median(-1).values  # [B, 3]
    ref = torch.tensor([BACKGROUNDS[n] for n in names], dtype=bg.dtype) / 255.0
    return [names[int(k)] for k in torch.cdist(bg, ref).argmin(-1)]


class SemanticClassifier(nn.Module):
    """Predicts shape, colour and motion direction of the synthetic world's object (labels: the union of the
    domains' vocabularies). ``predict`` -> attribute -> labels; ``score`` -> per-attribute accuracy against
    the prompts' attributes and their mean (``"semantic_score"``)."""

    def __init__(self, vocab: dict[str, Sequence[str]] | None = None, width: int = 16, hidden: int = 64):
        super().__init__()
        full = vocabulary()
        self.vocab = {a: list((vocab or full)[a]) for a in SCORED_ATTRIBUTES}
        self.config = {"vocab": self.vocab, "width": int(width), "hidden": int(hidden), "frames": FRAMES,
                       "res": RES, "crop": CROP}
        w = int(width)
        self.shape_net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.shape_head = nn.Sequential(nn.Linear(4 * w, hidden), nn.GELU(), nn.Linear(hidden, len(self.vocab["shape"])))
        self.color_head = _mlp(12, hidden, len(self.vocab["color"]))
        self.direction_head = _mlp(4 + 2 * FRAMES, hidden, len(self.vocab["direction"]))
        self.train_info: dict = {}

    # -- forward ------------------------------------------------------------------------------------------
    def forward_features(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B, n = feats["crops"].shape[:2]
        z = self.shape_net(feats["crops"].reshape(B * n, 1, CROP, CROP)).reshape(B, n, -1).mean(1)
        return {"shape": self.shape_head(z), "color": self.color_head(feats["color"]),
                "direction": self.direction_head(feats["traj"])}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute ([B, len(vocab[attr])]) for prepared clips x [B, FRAMES, 3, RES, RES] in [0, 1]
        (``prepare_videos``)."""
        with torch.no_grad():
            feats = _measure(x)
        return self.forward_features(feats)

    @torch.no_grad()
    def predict_logits(self, videos, batch_size: int = 64) -> dict[str, torch.Tensor]:
        was = self.training
        self.eval()
        if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4:
            videos = [videos]
        out: dict[str, list[torch.Tensor]] = {a: [] for a in SCORED_ATTRIBUTES}
        for i in range(0, len(videos), batch_size):
            logits = self.forward(prepare_videos(videos[i:i + batch_size]))
            for a in SCORED_ATTRIBUTES:
                out[a].append(logits[a])
        self.train(was)
        return {a: torch.cat(v) if v else torch.zeros(0, len(self.vocab[a])) for a, v in out.items()}

    def predict(self, videos, batch_size: int = 64) -> dict[str, list[str]]:
        """Attribute -> predicted labels (one per video): the learned heads' argmax and the measured background."""
        logits = self.predict_logits(videos, batch_size)
        out = {a: [self.vocab[a][int(k)] for k in logits[a].argmax(-1)] for a in SCORED_ATTRIBUTES}
        if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4:
            videos = [videos]
        out["background"], present = [], []
        for i in range(0, len(videos), batch_size):
            x = prepare_videos(videos[i:i + batch_size])
            out["background"] += background_of(x)
            present += (object_contrast(x) >= MIN_OBJECT_CONTRAST).tolist()
        for a in SCORED_ATTRIBUTES:  # no object in the clip: nothing to read (the heads would read noise)
            out[a] = [p if ok else NO_OBJECT for p, ok in zip(out[a], present, strict=True)]
        return out

    def score(self, videos, attributes: Sequence[dict], batch_size: int = 64) -> dict:
        """Accuracy of the predictions against the prompts' attributes (dicts with ``shape``/``color``/
        ``direction``/``background``; a missing attribute is not scored for that video). Returns per-attribute
        accuracy, ``semantic_score`` (their mean), ``n`` and the per-video ``predictions``."""
        pred = self.predict(videos, batch_size)
        n = len(pred["shape"])
        if len(attributes) != n:
            raise ValueError(f"{n} videos but {len(attributes)} attribute dicts")
        out: dict = {"n": n}
        for a in ALL_ATTRIBUTES:
            hits = [pred[a][i] == attributes[i][a] for i in range(n) if attributes[i].get(a) is not None]
            out[a] = float(np.mean(hits)) if hits else float("nan")
        accs = [out[a] for a in ALL_ATTRIBUTES if not math.isnan(out[a])]
        out["semantic_score"] = float(np.mean(accs)) if accs else float("nan")
        out["predictions"] = [{a: pred[a][i] for a in ALL_ATTRIBUTES} for i in range(n)]
        return out

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """``path`` (.safetensors weights, config in its metadata) and ``path`` with suffix .json (config)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.config, train_info=self.train_info)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"modelgrow_semantic": json.dumps(cfg)})
        path.with_suffix(".json").write_text(json.dumps(cfg, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SemanticClassifier:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        side = path.with_suffix(".json")
        if side.exists():
            cfg = json.loads(side.read_text())
        else:
            with safe_open(str(path), "pt") as f:
                cfg = json.loads((f.metadata() or {})["modelgrow_semantic"])
        if (cfg.get("frames", FRAMES), cfg.get("res", RES), cfg.get("crop", CROP)) != (FRAMES, RES, CROP):
            raise ValueError(f"{path}: classifier saved with a different input geometry")
        model = cls(cfg["vocab"], width=cfg["width"], hidden=cfg["hidden"])
        model.load_state_dict(load_file(str(path)))
        model.train_info = cfg.get("train_info", {})
        return model.eval()


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------

_RENDER_FRAMES = 12


def _training_set(domains, n_train: int, seed: int, split: str):
    specs = []
    for k, d in enumerate(domains):
        n = n_train // len(domains) + (k < n_train % len(domains))
        specs += sample_specs(d, n, seed=seed, split=split)
    clips = np.stack([render_clip(s, _RENDER_FRAMES, RES, RES) for s in specs])  # [N, T, S, S, 3]
    return specs, torch.from_numpy(clips)


def _frame_indices(B: int, T: int, K: int, g: torch.Generator) -> torch.Tensor:
    """Temporal crop + jitter: [B, K] sorted indices into T frames."""
    start = torch.randint(0, T // 4 + 1, (B, 1), generator=g).float()
    end = T - 1 - torch.randint(0, T // 4 + 1, (B, 1), generator=g).float()
    base = start + (end - start) * torch.linspace(0, 1, K)[None]
    jit = (torch.rand(B, K, generator=g) - 0.5) * ((end - start) / (K - 1)) * 0.8
    return (base + jit).round().clamp(0, T - 1).long().sort(1).values


def train_classifier(domains: Sequence[str] = ("A", "B"), n_train: int = 1024, seed: int = 0, steps: int = 300,
                     batch_size: int = 48, lr: float = 4e-3, split: str = "train", augment: bool = True,
                     eval_n: int = 64, cache: str | os.PathLike | None = None,
                     verbose: bool = False) -> SemanticClassifier:
    """Train the evaluator on ``n_train`` freshly rendered clips of ``domains``/``split`` (12 frames, 64x64).
    ``cache``: a .safetensors path; loaded if it exists, written after training otherwise. The model's
    ``train_info`` records the training wall time (``time_s``), the final (smoothed) losses and, for
    ``eval_n > 0``, the accuracy on ``eval_n`` clean held-out clips per domain (``heldout_accuracy``, rendered
    16 frames 64x64 from the held-out split, half of them unseen (shape, colour) pairs)."""
    if cache is not None and Path(cache).exists():
        return SemanticClassifier.load(cache)
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        specs, clips = _training_set(tuple(domains), n_train, seed, split)
        model = SemanticClassifier()
        labels = {a: torch.tensor([model.vocab[a].index(getattr(s, a)) for s in specs]) for a in SCORED_ATTRIBUTES}
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
        model.train()
        N, T = clips.shape[:2]
        ema = None
        for step in range(steps):
            idx = torch.randint(0, N, (batch_size,), generator=g)
            fi = _frame_indices(batch_size, T, FRAMES, g)
            x = clips[idx[:, None], fi]  # [B, K, S, S, 3]
            x = x.permute(0, 1, 4, 2, 3).float() / 255.0
            if augment:
                x = _augment(x, g)
            with torch.no_grad():
                feats = _measure(x)
            logits = model.forward_features(feats)
            losses = {a: F.cross_entropy(logits[a], labels[a][idx], label_smoothing=0.05) for a in SCORED_ATTRIBUTES}
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            cur = {a: float(v.detach()) for a, v in losses.items()}
            ema = cur if ema is None else {a: 0.9 * ema[a] + 0.1 * cur[a] for a in cur}
            if verbose and (step % 50 == 0 or step == steps - 1):
                print(f"step {step:4d} " + " ".join(f"{a} {v:.3f}" for a, v in ema.items()), flush=True)
    model.eval()
    model.train_info = {"time_s": round(time.perf_counter() - t0, 2), "steps": steps, "n_train": n_train,
                        "domains": list(domains), "split": split, "seed": seed, "final_loss": ema or {}}
    if eval_n > 0:
        acc = {}
        for d in domains:
            specs = sample_specs(d, eval_n, seed=seed + 7919, split="heldout")
            res = model.score([render_clip(s) for s in specs], [s.attributes for s in specs])
            acc[d] = {a: res[a] for a in (*SCORED_ATTRIBUTES, "semantic_score")}
        model.train_info["heldout_accuracy"] = acc
    if cache is not None:
        model.save(cache)
    return model
