"""A procedurally rendered video world with captions: one flat-coloured shape moving in a straight line on a
plain background. It stands in for the paper's web-scale video data so that the whole method (pre-training,
continual pre-training with model expansion, LLM-recaptioned long prompts, semantic evaluation) runs on a CPU
with nothing downloaded.

Domains
    ``A`` (pre-training): square / circle / triangle, red / green / blue / yellow, moving left / right / up /
    down, on black / gray / white.
    ``B`` (continual pre-training): star / cross / diamond, orange / purple / cyan, moving diagonally
    (up-left, up-right, down-left, down-right), on navy / beige / brown. Every shape, colour, direction and
    background of B is absent from A, so continual pre-training on B has to learn new vocabulary (and can
    forget A). Sizes (small / medium / large) and speeds (slow / fast) are shared.

Splits
    ``train`` never contains the held-out (shape, colour) pairs of ``HELDOUT_COMBOS``; ``heldout`` draws half
    of its clips from those unseen combinations and half from seen ones, from a different random stream.
    ``all`` samples every combination. ``generate_images`` writes the image split of a domain (PNG stills,
    the first frame of each clip, captioned without motion) for joint image + video training. Clip ``i`` of (domain, split, seed) depends only on those four values,
    so a longer run is a prefix-extension of a shorter one.

Geometry
    Positions and sizes are fractions of the frame (x across, y from the top), scaled by the width and height
    at render time. The object moves from ``(start_x, start_y)`` in a straight line at constant speed; its
    total travel is ``SPEEDS[speed]`` of the frame (``/sqrt(2)`` per axis on diagonals), and the start is
    drawn so that the whole object stays inside the frame with a margin. ``object_positions`` gives the
    area centroid per frame in pixel-index coordinates (pixel ``i`` covers ``[i, i+1)``; its centre is
    ``i + 0.5`` in continuous coordinates, index ``i``). Shapes are anti-aliased by 4x4 supersampling.

Captions
    ``short_caption``: ``"a red square moving left on a black background"``; ``long_caption``: a 35-128 word
    detailed description (deterministic for a spec and seed, varied phrasing), standing in for the paper's
    LLM recaptioning. Neither mentions any vocabulary word that is not the clip's own attribute, so
    ``parse_caption`` recovers the attributes from either.
"""

from __future__ import annotations

import csv
import math
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ..fileio import atomic_output

__all__ = [
    "DOMAINS", "COLORS", "BACKGROUNDS", "SIZES", "SPEEDS", "DIRECTION_VECTORS", "HELDOUT_COMBOS", "SPLITS",
    "ATTRIBUTES", "MANIFEST_COLUMNS", "ClipSpec", "vocabulary", "sample_specs", "object_positions",
    "render_clip", "short_caption", "long_caption", "direction_phrase", "parse_caption", "heldout_prompts",
    "generate", "write_clips", "time_reversed", "start_range", "read_manifest", "image_caption", "generate_images",
]

# ------------------------------------------------------------------------------------------------------------
# vocabularies
# ------------------------------------------------------------------------------------------------------------

DOMAINS: dict[str, dict[str, tuple[str, ...]]] = {
    "A": {
        "shape": ("square", "circle", "triangle"),
        "color": ("red", "green", "blue", "yellow"),
        "direction": ("left", "right", "up", "down"),
        "background": ("black", "gray", "white"),
        "size": ("small", "medium", "large"),
        "speed": ("slow", "fast"),
    },
    "B": {
        "shape": ("star", "cross", "diamond"),
        "color": ("orange", "purple", "cyan"),
        "direction": ("up-left", "up-right", "down-left", "down-right"),
        "background": ("navy", "beige", "brown"),
        "size": ("small", "medium", "large"),
        "speed": ("slow", "fast"),
    },
}
ATTRIBUTES = ("shape", "color", "direction", "background", "size", "speed")
SPLITS = ("train", "heldout", "all")

# (shape, colour) pairs that the train split never shows; half of the held-out split uses them.
HELDOUT_COMBOS: dict[str, tuple[tuple[str, str], ...]] = {
    "A": (("square", "yellow"), ("circle", "blue"), ("triangle", "red")),
    "B": (("star", "cyan"), ("cross", "orange"), ("diamond", "purple")),
}

# RGB; object colours and backgrounds are far apart in RGB (and in hue) so they survive blur and 4:2:0 codecs.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 185, 50), "blue": (40, 80, 235), "yellow": (240, 220, 40),
    "orange": (255, 140, 0), "purple": (150, 45, 205), "cyan": (0, 215, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "gray": (128, 128, 128), "white": (245, 245, 245),
    "navy": (20, 28, 80), "beige": (232, 218, 180), "brown": (100, 62, 32),
}
SIZES = {"small": 0.11, "medium": 0.155, "large": 0.20}  # half-extent of the shape, fraction of the frame
SPEEDS = {"slow": 0.22, "fast": 0.42}  # total travel over the clip, fraction of the frame
_D = 1 / math.sqrt(2)
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {  # (dx, dy), y pointing down
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-left": (-_D, -_D), "up-right": (_D, -_D), "down-left": (-_D, _D), "down-right": (_D, _D),
}
_MARGIN = 0.03
_SS = 4  # supersampling factor per axis

MANIFEST_COLUMNS = ("path", "caption", "long_caption", "num_frames", "fps", "height", "width", "shape", "color",
                    "direction", "background", "size", "speed", "domain", "split", "start_x", "start_y", "seed",
                    "index")


def vocabulary(domains: tuple[str, ...] | list[str] = ("A", "B")) -> dict[str, tuple[str, ...]]:
    """Union of the domains' vocabularies, attribute -> words (domain order, no duplicates)."""
    out: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for d in domains:
        for a in ATTRIBUTES:
            out[a] += [w for w in _domain(d)[a] if w not in out[a]]
    return {a: tuple(v) for a, v in out.items()}


def _domain(domain: str) -> dict[str, tuple[str, ...]]:
    try:
        return DOMAINS[str(domain).upper()]
    except KeyError:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAINS)}") from None


# ------------------------------------------------------------------------------------------------------------
# specs
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """One clip: attributes plus the start position (centre of the shape, fractions of the frame)."""

    shape: str
    color: str
    direction: str
    background: str
    size: str
    speed: str
    start_x: float
    start_y: float
    domain: str = "A"
    split: str = "all"
    index: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.shape not in _SHAPE_FUNCS:
            raise ValueError(f"unknown shape {self.shape!r}")
        for name, table in (("color", COLORS), ("background", BACKGROUNDS), ("size", SIZES), ("speed", SPEEDS),
                            ("direction", DIRECTION_VECTORS)):
            if getattr(self, name) not in table:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {sorted(table)}")

    @property
    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def displacement(self) -> tuple[float, float]:
        dx, dy = DIRECTION_VECTORS[self.direction]
        t = SPEEDS[self.speed]
        return dx * t, dy * t

    def end(self) -> tuple[float, float]:
        dx, dy = self.displacement()
        return self.start_x + dx, self.start_y + dy

    def to_dict(self) -> dict:
        return asdict(self)


def start_range(r: float, d: float) -> tuple[float, float]:
    """Feasible start interval on one axis for half-extent r and displacement d (whole object inside)."""
    lo, hi = r + _MARGIN, 1 - r - _MARGIN
    return (lo - min(d, 0.0), hi - max(d, 0.0))


def _rng(*keys) -> np.random.Generator:
    ints = [zlib.crc32(str(k).encode()) if not isinstance(k, int) else k & 0xFFFFFFFF for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ints))


def _spec_for(domain: str, split: str, seed: int, i: int) -> ClipSpec:
    vocab = _domain(domain)
    domain = str(domain).upper()
    rng = _rng("modelgrow-synthetic", domain, split, int(seed), int(i))
    held = set(HELDOUT_COMBOS[domain])
    pairs = [(s, c) for s in vocab["shape"] for c in vocab["color"]]
    if split == "train":
        pairs = [p for p in pairs if p not in held]
    elif split == "heldout":
        pairs = sorted(held) if rng.random() < 0.5 else [p for p in pairs if p not in held]
    elif split != "all":
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    shape, color = pairs[int(rng.integers(len(pairs)))]
    pick = {a: vocab[a][int(rng.integers(len(vocab[a])))] for a in ("direction", "background", "size", "speed")}
    r = SIZES[pick["size"]]
    dx, dy = DIRECTION_VECTORS[pick["direction"]]
    t = SPEEDS[pick["speed"]]
    sx = float(rng.uniform(*start_range(r, dx * t)))
    sy = float(rng.uniform(*start_range(r, dy * t)))
    return ClipSpec(shape=shape, color=color, start_x=round(sx, 4), start_y=round(sy, 4), domain=domain,
                    split=split, index=int(i), seed=int(seed), **pick)


def sample_specs(domain: str, n: int, seed: int = 0, split: str = "train") -> list[ClipSpec]:
    """``n`` clip specs of a domain and split; clip ``i`` depends only on (domain, split, seed, i)."""
    return [_spec_for(domain, split, seed, i) for i in range(int(n))]


def time_reversed(spec: ClipSpec, index: int | None = None) -> ClipSpec:
    """The spec whose clip is ``spec``'s clip played backwards: the opposite direction, starting where ``spec``
    ends (the world is time-symmetric, so it is a valid clip of the same domain when the domain has the opposite
    direction). ``index``: the new spec's index (default: the same)."""
    dx, dy = DIRECTION_VECTORS[spec.direction]
    opposite = next(k for k, (ox, oy) in DIRECTION_VECTORS.items() if math.isclose(ox, -dx) and math.isclose(oy, -dy))
    ex, ey = spec.end()
    return replace(spec, direction=opposite, start_x=ex, start_y=ey, index=spec.index if index is None else int(index))


# ------------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------------


def _poly_inside(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        (xi, yi), (xj, yj) = verts[k], verts[(k - 1) % n]
        cond = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= cond & (x < xc)
    return inside


def _regular(n: int, r: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_TRIANGLE = _regular(3, 1.0)  # equilateral, apex up, area centroid at the origin
_STAR = np.empty((10, 2))
_STAR[0::2] = _regular(5, 1.0)
_STAR[1::2] = _regular(5, 0.45, -math.pi / 2 + math.pi / 5)

# unit shapes (half-extent 1, area centroid at the origin); u, v are offsets divided by the half-extent
_SHAPE_FUNCS = {
    "square": lambda u, v: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "triangle": lambda u, v: _poly_inside(u, v, _TRIANGLE),
    "star": lambda u, v: _poly_inside(u, v, _STAR),
    "cross": lambda u, v: ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.34)) | ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
}


def object_positions(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """Centre of the object per frame, float [T, 2] as (x, y) in pixel-index coordinates."""
    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    dx, dy = spec.displacement()
    x = (spec.start_x + dx * t) * width - 0.5
    y = (spec.start_y + dy * t) * height - 0.5
    return np.stack([x, y], 1)


def render_clip(spec: ClipSpec, num_frames: int = 16, height: int = 64, width: int = 64) -> np.ndarray:
    """Render a clip: uint8 [T, H, W, 3]; deterministic (anti-aliased by 4x4 supersampling)."""
    if num_frames < 1 or height < 4 or width < 4:
        raise ValueError(f"bad clip size T={num_frames} H={height} W={width}")
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    fg = np.asarray(COLORS[spec.color], np.float32)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    out[:] = bg.round().astype(np.uint8)
    rx, ry = spec.radius * width, spec.radius * height  # half-extent in pixels
    inside = _SHAPE_FUNCS[spec.shape]
    sub = (np.arange(_SS) + 0.5) / _SS
    for f, (cx, cy) in enumerate(object_positions(spec, num_frames, height, width)):
        cx, cy = cx + 0.5, cy + 0.5  # continuous coordinates
        x0, x1 = max(int(math.floor(cx - rx)) - 1, 0), min(int(math.ceil(cx + rx)) + 1, width)
        y0, y1 = max(int(math.floor(cy - ry)) - 1, 0), min(int(math.ceil(cy + ry)) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = (np.arange(x0, x1)[:, None] + sub[None]).reshape(-1)
        ys = (np.arange(y0, y1)[:, None] + sub[None]).reshape(-1)
        u = (xs[None, :] - cx) / rx
        v = (ys[:, None] - cy) / ry
        cov = inside(*np.broadcast_arrays(u, v)).astype(np.float32)
        cov = cov.reshape(y1 - y0, _SS, x1 - x0, _SS).mean((1, 3))[..., None]
        out[f, y0:y1, x0:x1] = (bg * (1 - cov) + fg * cov).round().clip(0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------------------------


def direction_phrase(direction: str) -> str:
    """``left`` -> ``left``; ``up-left`` -> ``diagonally up-left``."""
    if direction not in DIRECTION_VECTORS:
        raise ValueError(f"unknown direction {direction!r}")
    return f"diagonally {direction}" if "-" in direction else direction


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def short_caption(spec: ClipSpec) -> str:
    """``"a red square moving left on a black background"``."""
    return (f"{_article(spec.color)} {spec.color} {spec.shape} moving {direction_phrase(spec.direction)} "
            f"on {_article(spec.background)} {spec.background} background")


_SHAPE_DETAIL = {
    "square": ["with four straight edges of equal length and crisp corners",
               "whose four equal sides meet at sharp corners"],
    "circle": ["with a perfectly round outline and smooth edges", "shaped like a smooth, round disc"],
    "triangle": ["with three straight sides and a pointed tip at the top",
                 "standing on a flat base with its apex pointing to the top of the frame"],
    "star": ["with five sharp points radiating from its centre", "shaped like a classic five-pointed star"],
    "cross": ["shaped like a plus sign, with two thick bars crossing at its centre",
              "made of a horizontal and a vertical bar of equal length crossing at the middle"],
    "diamond": ["standing on one of its pointed corners like a rhombus",
                "with four equal sides and corners pointing to the top, bottom and both sides"],
}
_COLOR_DETAIL = {
    "red": "vivid, saturated red", "green": "bright grass green", "blue": "strong, pure blue",
    "yellow": "bright lemon yellow", "orange": "deep tangerine orange", "purple": "rich violet purple",
    "cyan": "bright aqua cyan",
}
_BG_DETAIL = {
    "black": "solid black", "gray": "neutral mid-tone gray", "white": "clean, plain white",
    "navy": "dark navy", "beige": "pale sandy beige", "brown": "muted earthy brown",
}
_SPEED_ADV = {"slow": ["slowly", "at a slow, gentle pace", "unhurriedly"],
              "fast": ["quickly", "at a fast pace", "briskly"]}
_SIZE_DETAIL = {"small": "covering only a small part of the frame", "medium": "of a medium size",
                "large": "large enough to fill a good part of the frame"}


def _pct(v: float) -> int:
    return int(5 * round(100 * v / 5))


def long_caption(spec: ClipSpec, seed: int = 0) -> str:
    """A detailed 35-128 word description of the clip (deterministic given the spec and seed)."""
    rng = _rng("long-caption", int(seed), *[f"{f.name}={getattr(spec, f.name)}" for f in fields(spec)])

    def pick(options):
        return options[int(rng.integers(len(options)))]

    s, c, bg, sz = spec.shape, spec.color, spec.background, spec.size
    d, adv = direction_phrase(spec.direction), pick(_SPEED_ADV[spec.speed])
    ex, ey = spec.end()
    travel = _pct(SPEEDS[spec.speed])
    intro = pick([
        f"A {sz} {c} {s} {pick(_SHAPE_DETAIL[s])} is the only object in this short animated clip.",
        f"The video shows a single {sz} {c} {s}, {pick(_SHAPE_DETAIL[s])}.",
        f"A lone {c} {s} {_SIZE_DETAIL[sz]} appears on screen, {pick(_SHAPE_DETAIL[s])}.",
    ])
    color = pick([
        f"It is filled with a uniform {_COLOR_DETAIL[c]} colour that stays exactly the same in every frame.",
        f"Its surface is a flat {_COLOR_DETAIL[c]} with no gradient, pattern or texture.",
    ])
    background = pick([
        f"The background is a uniform {_BG_DETAIL[bg]} that fills the entire frame and never changes.",
        f"Behind it there is nothing but an empty, {_BG_DETAIL[bg]} background.",
        f"The {s} sits on a plain {bg} background without any other objects or details.",
    ])
    start = pick([
        f"Its centre starts about {_pct(spec.start_x)} percent of the way across the frame and "
        f"{_pct(spec.start_y)} percent of the way from the top edge.",
        f"At the first frame the {s} is placed roughly {_pct(spec.start_x)} percent across and "
        f"{_pct(spec.start_y)} percent from the top of the frame.",
    ])
    motion = pick([
        f"Over the clip it moves {d} {adv} in a straight line, travelling about {travel} percent of the frame.",
        f"The {c} {s} glides {d} {adv}, following a perfectly straight path at a constant speed.",
        f"Throughout the video the shape keeps moving {d}, {adv} and steadily, without stopping.",
    ])
    end = (f"By the final frame it has reached a spot about {_pct(ex)} percent across and {_pct(ey)} percent "
           f"from the top.")
    style = pick([
        "The scene is rendered in a flat, minimalist 2D style with no lighting, shading, shadows or reflections.",
        "Everything is drawn as clean vector-like graphics, completely flat, with no lighting effects or depth.",
    ])
    camera = pick([
        "The camera is completely static, with no zoom, pan or shake.",
        "The viewpoint stays fixed for the whole clip, as if filmed from a locked-off tripod.",
    ])
    keep = pick([
        f"The {s} keeps its colour, size and orientation throughout, without rotating or deforming.",
        "Nothing else moves or changes in the scene.",
    ])
    head = [color] if rng.random() < 0.6 else []
    tail = [x for x in (start, end, style, camera, keep) if rng.random() < 0.6]
    tail = [tail[k] for k in rng.permutation(len(tail))]
    spare = [x for x in (color, start, end, style, camera, keep) if x not in head and x not in tail]
    sentences = [intro, *head, background, motion, *tail]
    while len(" ".join(sentences).split()) < 35 and spare:  # pad with unused optional sentences
        sentences.append(spare.pop(0))
    while len(" ".join(sentences).split()) > 128 and len(sentences) > 3:  # drop optional sentences at the end
        sentences.pop()
    text = " ".join(sentences)
    return text


_WORD = r"(?<![\w-]){}(?![\w-])"


def parse_caption(text: str) -> dict[str, str]:
    """Recover the attributes a caption (short or long) names: attribute -> word, for every attribute that is
    named unambiguously (``shape``, ``color``, ``direction``, ``background``, ``size``, ``speed``)."""
    t = " " + str(text).lower() + " "
    vocab = vocabulary()
    out: dict[str, str] = {}
    for a in ("shape", "color", "background", "size"):
        hits = {w for w in vocab[a] if re.search(_WORD.format(re.escape(w)), t)}
        if a == "background":  # the background word is the one right before "background"
            hits = {w for w in hits if re.search(rf"{w}\s+background", t)} or hits
        if len(hits) == 1:
            out[a] = hits.pop()
    diag = set(re.findall(r"diagonally\s+((?:up|down)-(?:left|right))", t))
    if diag:
        if len(diag) == 1:
            out["direction"] = diag.pop()
    else:
        m = {w for w in ("left", "right", "up", "down") if re.search(_WORD.format(w), t)}
        if len(m) == 1:
            out["direction"] = m.pop()
    sp = {"slow" for w in ("slowly", "slow", "unhurriedly") if re.search(_WORD.format(w), t)}
    sp |= {"fast" for w in ("quickly", "fast", "briskly") if re.search(_WORD.format(w), t)}
    if len(sp) == 1:
        out["speed"] = sp.pop()
    return out


def heldout_prompts(domain: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` held-out prompts of a domain: dicts with ``short``, ``long`` and the clip's attributes/spec."""
    out = []
    for spec in sample_specs(domain, n, seed, split="heldout"):
        d = spec.to_dict()
        d.update(short=short_caption(spec), long=long_caption(spec, seed=seed))
        d["unseen_combo"] = (spec.shape, spec.color) in set(HELDOUT_COMBOS[spec.domain])
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------


def _row(spec: ClipSpec, rel: str, num_frames: int, fps: int, height: int, width: int, seed: int) -> dict:
    return {
        "path": rel, "caption": short_caption(spec), "long_caption": long_caption(spec, seed=seed),
        "num_frames": str(num_frames), "fps": str(fps), "height": str(height), "width": str(width),
        **{a: getattr(spec, a) for a in ("shape", "color", "direction", "background", "size", "speed")},
        "domain": spec.domain, "split": spec.split, "start_x": f"{spec.start_x:.4f}",
        "start_y": f"{spec.start_y:.4f}", "seed": str(seed), "index": str(spec.index),
    }


def _write_one(job) -> str:
    from ..video_io import write_video

    spec, path, num_frames, height, width, fps = job
    write_video(path, render_clip(spec, num_frames, height, width), fps=fps)
    return str(path)


def image_caption(spec: ClipSpec) -> str:
    """The caption of a still image of a clip: ``"a red square on a black background"`` (no motion)."""
    return f"{_article(spec.color)} {spec.color} {spec.shape} on {_article(spec.background)} {spec.background} background"


def generate_images(out_dir: str | os.PathLike, domain: str = "A", split: str = "train", n: int = 64,
                    height: int = 64, width: int = 64, seed: int = 0) -> Path:
    """The image split of a domain (joint image + video training): ``n`` PNG stills into ``out_dir`` and
    ``out_dir/manifest.csv`` (``MANIFEST_COLUMNS``, ``num_frames`` = 1, no fps, no long caption).

    Image ``i`` is the first frame of clip ``i`` of (domain, split, seed) (the same spec as ``generate``'s
    video ``i``), captioned ``image_caption`` (shape, colour, background: a still shows no motion). Files are
    rewritten only when missing; deterministic."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in sample_specs(domain, n, seed, split):
        rel = f"{spec.domain}_{split}_img_{spec.index:06d}.png"
        if not (out_dir / rel).exists():
            Image.fromarray(render_clip(spec, 1, height, width)[0]).save(out_dir / rel)
        row = _row(spec, rel, 1, 0, height, width, seed)
        row.update(caption=image_caption(spec), long_caption="", fps="", direction="", speed="")
        rows.append(row)
    return _write_manifest(out_dir / "manifest.csv", rows)


def _write_manifest(manifest: Path, rows: list[dict]) -> Path:
    """Write the manifest rows atomically (a temporary file, then a rename)."""
    with atomic_output(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return manifest


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a manifest CSV as dicts of strings (``path`` relative to the manifest)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def generate(out_dir: str | os.PathLike, domain: str, split: str = "train", n: int = 64, num_frames: int = 16,
             height: int = 64, width: int = 64, fps: int = 8, codec: str = "webm", seed: int = 0,
             workers: int = 1, progress: bool | None = None) -> Path:
    """Render ``n`` clips of ``domain``/``split`` into ``out_dir`` and write ``out_dir/manifest.csv``.

    ``codec``: ``"webm"`` (VP9, for DALI's CPU decoder) or ``"mp4"`` (H.264). Idempotent: a clip whose file
    exists and whose manifest row matches the requested one is not re-rendered; a manifest that already
    matches completely is left untouched. ``workers > 1`` renders/encodes in processes. Returns the manifest.
    """
    return write_clips(out_dir, sample_specs(domain, n, seed, split), num_frames=num_frames, height=height,
                       width=width, fps=fps, codec=codec, seed=seed, workers=workers, progress=progress,
                       desc=f"synthetic {domain}/{split}")


def write_clips(out_dir: str | os.PathLike, specs: list[ClipSpec], num_frames: int = 16, height: int = 64,
                width: int = 64, fps: int = 8, codec: str = "webm", seed: int = 0, workers: int = 1,
                progress: bool | None = None, desc: str = "synthetic") -> Path:
    """Render the clips of ``specs`` into ``out_dir`` (``<domain>_<split>_<index>.<codec>``, so indices must be
    unique per domain and split) and write ``out_dir/manifest.csv``; what :func:`generate` does for a sampled
    split, for any list of specs (e.g. a clip and its :func:`time_reversed` twin). ``seed`` picks the long
    captions' wording. Same idempotence as :func:`generate`. Returns the manifest."""
    codec = codec.lower().lstrip(".")
    if codec not in ("webm", "mp4"):
        raise ValueError(f"codec must be 'webm' or 'mp4'; got {codec!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.csv"
    rows = [_row(s, f"{s.domain}_{s.split}_{s.index:06d}.{codec}", num_frames, fps, height, width, seed)
            for s in specs]
    if len({r["path"] for r in rows}) != len(rows):
        raise ValueError("two specs map to the same file (same domain, split and index): give each a unique index")
    old = {}
    if manifest.exists():
        try:
            old = {r["path"]: r for r in read_manifest(manifest)}
        except (OSError, csv.Error, KeyError):
            old = {}
    todo = [(s, out_dir / r["path"], num_frames, height, width, fps) for s, r in zip(specs, rows, strict=True)
            if not ((out_dir / r["path"]).exists() and {k: old.get(r["path"], {}).get(k) for k in r} == r)]
    if todo:
        from tqdm.auto import tqdm

        show = (len(todo) >= 200) if progress is None else progress
        bar = tqdm(total=len(todo), desc=desc, unit="clip", disable=not show)
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=int(workers)) as ex:
                for _ in ex.map(_write_one, todo, chunksize=max(1, len(todo) // (8 * workers))):
                    bar.update()
        else:
            for job in todo:
                _write_one(job)
                bar.update()
        bar.close()
    if todo or list(old.values()) != rows:
        _write_manifest(manifest, rows)
    return manifest
