"""Library pieces the demo and the study are built from: the foreground-weighted tiny-autoencoder training."""

import math

import pytest
import torch

pytest.importorskip("diffusers")

from modelgrow.vae import (  # noqa: E402
    VideoVAE,
    check_reconstruction,
    foreground_psnr,
    foreground_weights,
    train_tiny_autoencoder,
)


def _frames(n=24, size=16, seed=0):
    """Flat backgrounds with one 4x4 coloured square each: [n, 3, size, size] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, size, size).clone()
    for i in range(n):
        r, c = torch.randint(1, size - 5, (2,), generator=g).tolist()
        x[i, :, r:r + 4, c:c + 4] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x, g


def test_foreground_weights_mark_the_object_only():
    x, _ = _frames()
    w = foreground_weights(x, 8.0, threshold=0.1)
    assert w.shape == (24, 1, 16, 16)
    obj = (x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1  # the square, where it differs from the background
    assert torch.equal(w == 9.0, obj) and bool((w[~obj] == 1.0).all())
    # the background is the border median: an object touching the border does not change it
    y = x.clone()
    y[:, :, 0, :3] = 1.0
    assert foreground_weights(y, 8.0)[:, :, 8, 8].eq(foreground_weights(x, 8.0)[:, :, 8, 8]).all()


def test_tiny_autoencoder_learns_and_standardises_its_latents(tmp_path):
    x, _ = _frames(48)
    vae, losses = train_tiny_autoencoder(x, 60, lr=3e-3, channels=(8, 8), batch_size=8, foreground_weight=4.0)
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    vae.save_pretrained(tmp_path / "vae")
    video = VideoVAE.from_pretrained(tmp_path / "vae", micro_batch_size=None)
    z = video.encode(x.unsqueeze(2))  # [N, 4, 1, 8, 8]: 2x spatial downsampling
    assert z.shape == (48, 4, 1, 8, 8)
    assert abs(z.mean().item()) < 1e-3 and abs(z.std().item() - 1) < 1e-3  # shift/scaling written into the config
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        train_tiny_autoencoder(x[:, :1], 1)


def test_foreground_psnr_scores_the_object_pixels_only():
    x, _ = _frames()
    obj = ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1).expand_as(x)  # the squares, all channels
    background_only = torch.where(obj, x[:, :, :1, :1].expand_as(x), x)  # the object painted over
    mse = (background_only - x)[obj].square().mean().item()
    assert foreground_psnr(x, background_only) == pytest.approx(10 * math.log10(4 / mse), abs=1e-4)
    whole = 10 * math.log10(4 / (background_only - x).square().mean().item())
    assert whole - foreground_psnr(x, background_only) > 10  # the whole frame hides the missing object
    assert foreground_psnr(x, x + 0.01) == pytest.approx(10 * math.log10(4 / 1e-4), abs=1e-3)


def test_check_reconstruction_refuses_an_autoencoder_that_lost_the_object():
    """The shipped demo VAE passes on rendered domain-A clips (24 dB on held-out); the same architecture
    untrained, whose latents carry nothing of the object, is refused with the fix in the message."""
    from diffusers import AutoencoderTiny

    from modelgrow.synthetic.world import render_clip, sample_specs
    from modelgrow.workbench import DEFAULT_BASE

    specs = sample_specs("A", 16, seed=3, split="heldout")
    frames = torch.cat([torch.from_numpy(render_clip(s, 4, 32, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
                        for s in specs])
    shipped = AutoencoderTiny.from_pretrained(DEFAULT_BASE / "vae").eval()
    assert check_reconstruction(shipped, frames) > 20.0
    cfg = dict(shipped.config)
    untrained = AutoencoderTiny.from_config(cfg).eval()
    with pytest.raises(RuntimeError, match=r"foreground PSNR .* more steps"):
        check_reconstruction(untrained, frames)
