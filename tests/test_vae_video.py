"""Video VAE wrapper (tiny diffusers AutoencoderKL / AutoencoderTiny from configs) and video file I/O."""

import numpy as np
import pytest
import torch

from modelgrow.vae import SCALING_FACTOR, VideoVAE
from modelgrow.video_io import keyframe_strip, read_video, to_uint8, write_png, write_video

diffusers = pytest.importorskip("diffusers")


def _tiny_vae_dir(tmp_path):
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    )
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae", vae


@pytest.mark.parametrize("micro", [None, 1, 3])
def test_framewise_encode_decode_match_per_frame_calls(tmp_path, micro):
    path, raw = _tiny_vae_dir(tmp_path)
    vae = VideoVAE.from_pretrained(path, micro_batch_size=micro, sample_posterior=False)
    assert vae.patch_size == (1, 8, 8) and vae.get_latent_size((16, 256, 256)) == (16, 32, 32)
    x = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 5, 2, 3)
    with torch.no_grad():
        for b in range(2):
            for t in range(5):
                want = raw.encode(x[b : b + 1, :, t]).latent_dist.mode() * SCALING_FACTOR
                torch.testing.assert_close(z[b : b + 1, :, t], want, rtol=1e-4, atol=1e-5)
        out = vae.decode(z)
        assert out.shape == (2, 3, 5, 16, 24)
        want = raw.decode(z[1:2, :, 3] / SCALING_FACTOR).sample
        torch.testing.assert_close(out[1:2, :, 3], want, rtol=1e-4, atol=1e-5)


def test_tiny_autoencoder_with_shift_and_scale_from_its_config(tmp_path):
    """AutoencoderTiny (the demo's VAE): deterministic latents, 2**(blocks - 1) downsampling, and the latent
    standardisation ``(raw - shift_factor) * scaling_factor`` taken from the saved config."""
    raw = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
    raw.register_to_config(shift_factor=-0.25, scaling_factor=1.75)
    raw.save_pretrained(tmp_path / "taesd")
    vae = VideoVAE.from_pretrained(tmp_path / "taesd", micro_batch_size=2)
    assert type(vae.module).__name__ == "AutoencoderTiny"
    assert vae.patch_size == (1, 4, 4) and (vae.shift_factor, vae.scaling_factor) == (-0.25, 1.75)
    x = torch.rand(2, 3, 3, 16, 8) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 3, 4, 2)
    with torch.no_grad():
        want = (raw.encode(x[1:2, :, 2]).latents + 0.25) * 1.75
        torch.testing.assert_close(z[1:2, :, 2], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vae.decode(z)[0:1, :, 1], raw.decode(z[0:1, :, 1] / 1.75 - 0.25).sample, rtol=1e-4, atol=1e-5)
    # an explicit argument wins over the config; AutoencoderKL keeps Open-Sora's 0.18215 and no shift
    assert VideoVAE(raw, scaling_factor=0.5).scaling_factor == 0.5
    path, _ = _tiny_vae_dir(tmp_path)
    kl = VideoVAE.from_pretrained(path)
    assert (kl.scaling_factor, kl.shift_factor) == (SCALING_FACTOR, 0.0)


def test_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories only"):
        VideoVAE.from_pretrained(tmp_path / "nothing")
    path, _ = _tiny_vae_dir(tmp_path)
    vae = VideoVAE.from_pretrained(path)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="micro_batch_size"):
        VideoVAE(vae.module, micro_batch_size=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="UNet2DModel.*not a supported"):
        VideoVAE.from_pretrained(tmp_path / "other")


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_video_round_trip(tmp_path, suffix):
    g = np.random.default_rng(0)
    T, H, W = 6, 32, 48
    # smooth moving gradient: lossy codecs keep it within a few grey levels
    base = np.linspace(0, 255, W, dtype=np.float32)[None, None, :, None] * np.ones((T, H, W, 3), np.float32)
    frames = ((base + 8 * np.arange(T)[:, None, None, None]) % 256).astype(np.uint8)
    frames[..., 1] = g.integers(100, 110, size=(T, H, W)).astype(np.uint8)
    path = write_video(tmp_path / f"v{suffix}", frames, fps=8)
    back, fps = read_video(path)
    assert back.shape == frames.shape and fps == pytest.approx(8)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6
    assert not list(tmp_path.glob("*.tmp*"))


def test_uint8_conversion_and_strip(tmp_path):
    v = torch.linspace(-1, 1, 3 * 4 * 2 * 2).reshape(3, 4, 2, 2)
    u = to_uint8(v)
    assert u.shape == (4, 2, 2, 3) and u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    strip = keyframe_strip(np.zeros((10, 5, 7, 3), np.uint8), n=4)
    assert strip.shape == (5, 28, 3)
    assert write_png(tmp_path / "s.png", strip).exists()
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "x.avi", np.zeros((2, 4, 4, 3), np.uint8))
