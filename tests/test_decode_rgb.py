"""YUV -> RGB in the PyAV decoding path: PyAV's own conversion (libswscale), honouring the frame's YUV matrix
(BT.709 / BT.601) and colour range (limited / full).

The clips are written here from YUV planes computed with the textbook matrices (not with swscale), losslessly
(H.264 with qp 0, VP9 lossless), tagged with their colorspace and range, so the decoded RGB can be checked against
the true colours. Full range comes back from H.264 as the ``yuvj420p`` pixel format and from VP9 as ``yuv420p``
with ``color_range`` JPEG: both must be honoured.
"""

from __future__ import annotations

import numpy as np
import pytest

av = pytest.importorskip("av")

from modelgrow.data import decode  # noqa: E402
from modelgrow.data.dali import is_dali_available  # noqa: E402
from modelgrow.data.decode import SWS_FLAGS, decode_pyav, frame_to_rgb  # noqa: E402

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
                    [200, 120, 40], [30, 80, 160], [128, 128, 128], [240, 240, 240]], np.uint8)
P = 32  # patch size: 2 rows x 5 columns of flat patches
KR_KB = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114), "bt2020": (0.2627, 0.0593)}
AVCOL_SPC = {"bt709": 1, "bt601": 6, "bt2020": 9, "untagged": 2}  # BT709, SMPTE170M (BT.601), BT2020_NCL, UNSPECIFIED
NUM_FRAMES = 3
PYAV = tuple(int(x) for x in av.__version__.split(".")[:2])


def patches() -> np.ndarray:
    img = np.zeros((2 * P, 5 * P, 3), np.uint8)
    for i, c in enumerate(COLOURS):
        img[(i // 5) * P:(i // 5 + 1) * P, (i % 5) * P:(i % 5 + 1) * P] = c
    return img


def rgb_to_yuv420(rgb: np.ndarray, matrix: str, full: bool) -> list[np.ndarray]:
    """Y'CbCr 4:2:0 planes (uint8) with the given matrix and range; chroma averaged over 2x2 blocks."""
    kr, kb = KR_KB[matrix]
    x = rgb.astype(np.float64) / 255
    y = kr * x[..., 0] + (1 - kr - kb) * x[..., 1] + kb * x[..., 2]
    cb, cr = (x[..., 2] - y) / (2 * (1 - kb)), (x[..., 0] - y) / (2 * (1 - kr))
    if full:
        planes = [255 * y, 128 + 255 * cb, 128 + 255 * cr]
    else:
        planes = [16 + 219 * y, 128 + 224 * cb, 128 + 224 * cr]
    h, w = y.shape
    planes[1:] = [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in planes[1:]]
    return [np.clip(np.round(p), 0, 255).astype(np.uint8) for p in planes]


def write_tagged_clip(path, img: np.ndarray, matrix: str, full: bool, tag: str) -> str:
    planes = rgb_to_yuv420(img, matrix, full)
    colorspace, color_range = AVCOL_SPC[tag], 2 if full else 1  # AVCOL_RANGE_JPEG / AVCOL_RANGE_MPEG
    vp9 = str(path).endswith(".webm")
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9" if vp9 else "libx264", rate=8)
        s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], "yuv420p"
        s.options = {"lossless": "1"} if vp9 else {"qp": "0"}  # lossless: the decoder gets back these planes
        s.codec_context.colorspace, s.codec_context.color_range = colorspace, color_range
        for _ in range(NUM_FRAMES):
            f = av.VideoFrame(img.shape[1], img.shape[0], "yuv420p")
            for plane, a in zip(f.planes, planes, strict=True):
                buf = np.zeros((a.shape[0], plane.line_size), np.uint8)
                buf[:, : a.shape[1]] = a
                plane.update(buf.tobytes())
            f.colorspace, f.color_range = colorspace, color_range
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return str(path)


def patch_interiors(rgb: np.ndarray, margin: int = 4) -> np.ndarray:
    """[10, (P - 2 margin)^2, 3] int: each patch without its border (where the 4:2:0 chroma of neighbours mixes)."""
    out = [rgb[(i // 5) * P + margin:(i // 5 + 1) * P - margin, (i % 5) * P + margin:(i % 5 + 1) * P - margin]
           for i in range(len(COLOURS))]
    return np.stack(out).reshape(len(COLOURS), -1, 3).astype(int)


# (matrix, full range, colorspace tag, container); untagged: BT.601, as swscale and DALI assume
CASES = [("bt709", False, "bt709", "mp4"), ("bt601", False, "bt601", "mp4"), ("bt709", True, "bt709", "mp4"),
         ("bt601", True, "bt601", "mp4"), ("bt709", False, "bt709", "webm"), ("bt709", True, "bt709", "webm"),
         ("bt601", True, "bt601", "webm"), ("bt601", False, "untagged", "mp4"),
         pytest.param("bt2020", False, "bt2020", "mp4",
                      marks=pytest.mark.skipif(PYAV < (17, 0), reason="PyAV < 17 has no BT.2020 matrix name"))]
IDS = [f"{m}-{'full' if f else 'limited'}-{t}-{ext}"
       for m, f, t, ext in (c.values if hasattr(c, "values") else c for c in CASES)]


@pytest.mark.parametrize("matrix, full, tag, ext", CASES, ids=IDS)
def test_decoded_colours_match_the_true_colours(tmp_path, matrix, full, tag, ext):
    path = write_tagged_clip(tmp_path / f"clip.{ext}", patches(), matrix, full, tag)
    with av.open(path) as c:  # the tags made it through the file (untagged: range unspecified, i.e. limited)
        f = next(c.decode(video=0))
        assert f.colorspace == AVCOL_SPC[tag] and f.color_range == (2 if full else 0 if tag == "untagged" else 1)
        assert f.format.name == ("yuvj420p" if full and ext == "mp4" else "yuv420p")
    rgb = decode_pyav(path, list(range(NUM_FRAMES)))
    assert rgb.shape == (NUM_FRAMES, 2 * P, 5 * P, 3) and rgb.dtype == np.uint8
    for frame in rgb:
        err = np.abs(patch_interiors(frame) - COLOURS[:, None].astype(int)).max()
        assert err <= 2, f"{matrix} {'full' if full else 'limited'} range: {err} levels off the true colours"


def test_bt709_and_bt601_differ_where_it_matters(tmp_path):
    """The same YUV values decode to different colours under the two tags (the test above can tell them apart):
    e.g. saturated red/green/blue differ by more than 20 levels."""
    planes_img = patches()
    a = decode_pyav(write_tagged_clip(tmp_path / "a.mp4", planes_img, "bt709", False, "bt709"), [0])[0]
    b = decode_pyav(write_tagged_clip(tmp_path / "b.mp4", planes_img, "bt709", False, "bt601"), [0])[0]
    assert np.abs(patch_interiors(a) - patch_interiors(b)).max() > 20


def test_decoding_goes_through_pyav_conversion(tmp_path, monkeypatch):
    import av.video.reformatter as avr

    assert not hasattr(decode, "yuv420_to_rgb")  # the hand-written conversion is gone
    real, made, calls = avr.VideoReformatter, [], []

    class Spy:  # PyAV's VideoReformatter is a final extension type: wrap it instead of subclassing
        def __init__(self):
            made.append(self)
            self.inner = real()

        def reformat(self, frame, **kw):
            calls.append(dict(kw))
            return self.inner.reformat(frame, **kw)

    monkeypatch.setattr(avr, "VideoReformatter", Spy)
    path = write_tagged_clip(tmp_path / "clip.mp4", patches(), "bt709", False, "bt709")
    rgb = decode_pyav(path, [0, 2])
    assert len(made) == 1  # one swscale context for the file
    assert len(calls) == 2  # one PyAV conversion per requested frame, no other path
    kw = calls[0]
    assert kw["format"] == "rgb24" and kw["src_colorspace"] == "ITU709" and kw["src_color_range"] == "MPEG"
    monkeypatch.undo()
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    # bit-identical to PyAV's own conversion with the same arguments
    for got, f in zip(rgb, (frames[0], frames[2]), strict=True):
        np.testing.assert_array_equal(got, f.to_ndarray(**kw))
        np.testing.assert_array_equal(got, frame_to_rgb(f))


@pytest.mark.skipif(PYAV < (17, 0), reason="PyAV < 17 ignores the frame's colour tags")
@pytest.mark.parametrize("matrix, full, tag, ext", CASES, ids=IDS)
def test_same_as_pyav_reading_the_tags_itself(tmp_path, matrix, full, tag, ext):
    """PyAV >= 17 picks the matrix and range up from the frame: our explicit arguments change nothing."""
    path = write_tagged_clip(tmp_path / f"clip.{ext}", patches(), matrix, full, tag)
    with av.open(path) as c:
        f = next(c.decode(video=0))
        np.testing.assert_array_equal(frame_to_rgb(f), f.to_ndarray(format="rgb24", interpolation=SWS_FLAGS))


@pytest.mark.skipif(not is_dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
@pytest.mark.skipif(PYAV < (14, 4), reason="PyAV < 14.4 cannot pass swscale flags (SWS_FLAGS) to the conversion")
def test_dali_cpu_parity_at_colour_edges(tmp_path):
    """DALI's CPU decoder and the PyAV path give the same pixels on saturated colour edges (VP9, untagged, i.e.
    BT.601 limited range); measured identical."""
    from modelgrow.data.dali import DaliVideoDecoder
    from modelgrow.video_io import write_video

    rng = np.random.default_rng(0)
    frames = np.repeat(patches()[None], 4, axis=0)
    frames[:, 5:20, 7:61] = rng.integers(0, 256, (4, 1, 1, 3), dtype=np.uint8)  # odd-aligned edges, per frame
    path = str(write_video(tmp_path / "edges.webm", frames))
    idx = [0, 1, 3]
    a = DaliVideoDecoder("cpu").decode(path, idx).astype(int)
    b = decode_pyav(path, idx).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1
