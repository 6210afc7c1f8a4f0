"""Video quality dimensions computed with no learned weights (exact definitions; VBench-style).

All functions take one video as uint8 RGB ``[T, H, W, 3]`` (``numpy``).

Temporal flickering (VBench ``temporal_flickering``)
    ``mae_t = mean over pixels and channels of |f_{t+1} - f_t|`` (0..255) for every consecutive pair,
    ``score = (255 - mean_t mae_t) / 255`` in [0, 1]; 1 = no frame-to-frame change at all. Every frame is used.
    VBench applies it to static-scene videos only (its prompts are chosen so); here it is computed for every
    video, so camera/object motion lowers it too. Needs >= 2 frames.

Dynamic degree (VBench ``dynamic_degree`` with OpenCV's Farnebäck flow in place of RAFT)
    1. frames are subsampled with interval ``max(1, round(fps / 8))`` (fps = the file's frame rate, 8 if unknown);
    2. for each consecutive pair of the kept frames: dense optical flow (``cv2.calcOpticalFlowFarneback`` on
       the grey frames, ``FARNEBACK`` parameters), ``r = |flow|`` per pixel, ``m = mean of the largest
       int(0.05 * H * W) values of r`` (at least one value);
    3. ``thres = max(1, 8 / fps) * 6 * min(H, W) / 256`` pixels, ``count_num = max(1, round(4 * N / 16))`` with
       ``N`` the number of kept frames (VBench: ``round(4 * N / 16)``; the ``max(1, .)`` only matters for N <= 2,
       where VBench's rule would call any video dynamic);
    4. the video is *dynamic* when at least ``count_num`` pairs have ``m > thres``.
    The dimension over a set of videos is the fraction of dynamic videos. Farnebäck's magnitudes are not RAFT's:
    scores are comparable between models evaluated here, not with published VBench numbers.

Motion smoothness (flow-interpolation stand-in for VBench's AMT-based ``motion_smoothness``)
    Frames with even index are kept; each odd frame ``f_{2k+1}`` (with both neighbours) is predicted as the
    average of ``f_{2k}`` warped forward and ``f_{2k+2}`` warped backward half-way along their Farnebäck flows
    (``cv2.remap``, bilinear, border replicate); ``score = (255 - mean MAE(prediction, f_{2k+1})) / 255``.
    Needs >= 3 frames. (VBench uses the learned AMT interpolator; not comparable with its published numbers.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["temporal_flickering", "frame_mae", "farneback_flow", "flow_peak_magnitude", "dynamic_degree",
           "dynamic_degree_params", "motion_smoothness", "FARNEBACK", "check_video"]

# cv2.calcOpticalFlowFarneback(prev, next, None, **FARNEBACK) (OpenCV's documented example settings)
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("dynamic degree / motion smoothness need OpenCV: pip install 'modelgrow[eval]' "
                          "(opencv-python-headless)") from None
    return cv2


def check_video(frames: np.ndarray, min_frames: int = 1) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB video [T, H, W, 3]; got {frames.dtype} {list(frames.shape)}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"this dimension needs at least {min_frames} frames; the video has {frames.shape[0]}")
    return frames


def frame_mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 frames, over pixels and channels (0..255)."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def temporal_flickering(frames: np.ndarray) -> float:
    """``(255 - mean_t MAE(f_t, f_{t+1})) / 255`` (see the module docstring)."""
    f = check_video(frames, 2).astype(np.float32)
    maes = np.abs(f[1:] - f[:-1]).reshape(len(f) - 1, -1).mean(1)
    return float((255.0 - maes.mean()) / 255.0)


def _grey(frame: np.ndarray) -> np.ndarray:
    return _cv2().cvtColor(np.ascontiguousarray(frame), _cv2().COLOR_RGB2GRAY)


def farneback_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow from frame ``a`` to frame ``b`` (uint8 RGB ``[H, W, 3]``): float32 ``[H, W, 2]`` (dx, dy), so
    that ``b[y + dy, x + dx] ~ a[y, x]``."""
    return _cv2().calcOpticalFlowFarneback(_grey(a), _grey(b), None, **FARNEBACK)


def flow_peak_magnitude(flow: np.ndarray, top: float = 0.05) -> float:
    """Mean of the largest ``int(top * H * W)`` (at least 1) per-pixel flow magnitudes."""
    r = np.sqrt((flow.astype(np.float64) ** 2).sum(-1)).ravel()
    k = max(1, int(r.size * top))
    return float(np.partition(r, r.size - k)[r.size - k:].mean())


def dynamic_degree_params(num_frames: int, height: int, width: int, fps: float | None) -> dict:
    """VBench's rule: frame interval, magnitude threshold (pixels) and the number of pairs that must exceed it."""
    fps = float(fps) if fps and fps > 0 else 8.0
    interval = max(1, round(fps / 8))
    kept = len(range(0, num_frames, interval))
    thres = max(1.0, 8.0 / fps) * 6.0 * (min(height, width) / 256.0)
    return {"interval": interval, "kept_frames": kept, "thres": thres, "count_num": max(1, round(4 * kept / 16))}


def dynamic_degree(frames: np.ndarray, fps: float | None = None) -> dict:
    """``{"dynamic": bool, "magnitudes": [m per pair], **params}`` (see the module docstring)."""
    frames = check_video(frames, 2)
    p = dynamic_degree_params(len(frames), frames.shape[1], frames.shape[2], fps)
    kept = frames[:: p["interval"]]
    mags = [flow_peak_magnitude(farneback_flow(a, b)) for a, b in zip(kept[:-1], kept[1:], strict=True)]
    above = sum(m > p["thres"] for m in mags)
    return {"dynamic": bool(len(mags) > 0 and above >= p["count_num"]), "magnitudes": mags, "pairs_above": int(above),
            **p}


def _warp(img: np.ndarray, flow: np.ndarray, t: float) -> np.ndarray:
    """Backward-warp ``img`` by ``t * flow``: out[y, x] = img[y + t*dy, x + t*dx] (bilinear)."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img, gx + t * flow[..., 0], gy + t * flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def interpolate_midframe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The frame half-way between ``a`` and ``b`` (float32): mean of both warped half-way along their flows.
    The middle frame at x sees ``a`` at ``x - flow_ab/2`` and ``b`` at ``x + flow_ab/2`` (flow evaluated at the
    target, approximated by the flow of the opposite frame: ``flow_ba(x) ~ -flow_ab(x)``)."""
    f_ab = farneback_flow(a, b)
    f_ba = farneback_flow(b, a)
    wa = _warp(a.astype(np.float32), f_ba, 0.5)  # a(x + 0.5 * flow_ba) ~ a(x - 0.5 * flow_ab)
    wb = _warp(b.astype(np.float32), f_ab, 0.5)
    return (wa + wb) / 2


def motion_smoothness(frames: np.ndarray) -> float:
    """``(255 - mean MAE(interpolated odd frame, real odd frame)) / 255`` (see the module docstring)."""
    frames = check_video(frames, 3)
    maes = [float(np.abs(interpolate_midframe(frames[i - 1], frames[i + 1]) - frames[i].astype(np.float32)).mean())
            for i in range(1, len(frames) - 1, 2)]
    return float((255.0 - np.mean(maes)) / 255.0)
