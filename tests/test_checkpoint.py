"""Checkpoint I/O: every loader path, strictness, position-embedding recomputation, round trips."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from modelgrow.models import (
    CheckpointMismatchError,
    STDiT,
    create_model,
    detect_format,
    from_pretrained,
    load_checkpoint,
    read_checkpoint,
    save_pretrained,
)

from .helpers import randomize_
from .stdit_reference import reference_forward

CFG = dict(depth=3, hidden_size=96, num_heads=4, caption_channels=32, model_max_length=8, input_size=(4, 8, 8), space_scale=0.5)


def _src():
    return randomize_(STDiT(**CFG), seed=7).eval()


def _inputs(B=2, T=4, H=8, W=8):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(B, 4, T, H, W, generator=g), torch.tensor([1.0, 640.0][:B]),
            torch.randn(B, 1, 8, 32, generator=g), torch.tensor([[1] * 8, [1] * 4 + [0] * 4][:B]))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrap", ["plain", "ema", "model", "ddp-prefix"])
def test_open_sora_pth_variants_load_strictly(tmp_path, wrap):
    src = _src()
    sd = src.state_dict()
    obj = {"plain": sd, "ema": {"ema": sd, "step": 10}, "model": {"model": sd},
           "ddp-prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "OpenSora-v1-test.pth"
    torch.save(obj, path)
    dst = STDiT(**CFG)
    report = load_checkpoint(dst, path)
    assert report.ok and report.format == "opensora" and report.loaded == len(sd) - 2  # pos tables recomputed
    _same_weights(src, dst)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(*_inputs()), src(*_inputs()), rtol=0, atol=0)


def test_plain_load_state_dict_strict_works_like_open_sora(tmp_path):
    """A user calling model.load_state_dict(open_sora_sd, strict=True) directly needs identical keys."""
    src = _src()
    dst = STDiT(**CFG)
    dst.load_state_dict(src.state_dict(), strict=True)
    _same_weights(src, dst)


def test_ema_preferred_and_explicit_key(tmp_path):
    a, b = _src(), randomize_(STDiT(**CFG), seed=8)
    path = tmp_path / "both.pth"
    torch.save({"model": a.state_dict(), "ema": b.state_dict()}, path)
    dst = STDiT(**CFG)
    load_checkpoint(dst, path)
    _same_weights(b, dst)
    load_checkpoint(dst, path, key="model")
    _same_weights(a, dst)
    with pytest.raises(KeyError, match="no entry 'optimizer'"):
        read_checkpoint(path, key="optimizer")


def test_safetensors_file_and_pretrained_round_trip(tmp_path):
    src = _src()
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    dst = STDiT(**CFG)
    load_checkpoint(dst, f)
    _same_weights(src, dst)

    out = save_pretrained(src, tmp_path / "pretrained")
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["depth"] == 3 and meta["architecture"] == "STDiT"
    assert not list(out.glob("*.tmp"))
    back = from_pretrained(out)
    _same_weights(src, back)
    assert not any(p.is_meta for p in back.parameters()) and not any(b.is_meta for b in back.buffers())
    with torch.no_grad():
        torch.testing.assert_close(back(*_inputs()), src(*_inputs()), rtol=0, atol=0)
    half = from_pretrained(out, dtype="bfloat16")
    assert half.x_embedder.proj.weight.dtype == torch.bfloat16
    # a model setting edited in at the top level instead of inside "config" would be ignored: refused instead
    meta["prediction_type"] = "v_prediction"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['prediction_type'\] at the top level.*into the 'config' object"):
        from_pretrained(out)


def test_pixart_checkpoint_equals_pixart_per_frame(tmp_path):
    """A PixArt-alpha image checkpoint: 2-D patch kernel, no temporal attention, {'state_dict': ...}."""
    pix = randomize_(STDiT(**dict(CFG, input_size=(1, 8, 8))), seed=9)
    sd = {k: v for k, v in pix.state_dict().items() if ".attn_temp." not in k and k != "pos_embed_temporal"}
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][:, :, 0]  # [C, 4, 2, 2]
    path = tmp_path / "PixArt-XL-2-test.pth"
    torch.save({"state_dict": sd}, path)
    assert detect_format(read_checkpoint(path)) == "pixart"

    video = STDiT(**CFG)
    report = load_checkpoint(video, path)
    assert report.format == "pixart" and len(report.initialised) == 4 * 3
    for b in video.blocks:
        assert b.attn_temp.proj.weight.abs().sum() == 0 and b.attn_temp.proj.bias.abs().sum() == 0

    video = video.double().eval()
    video.dtype = torch.float64
    x, t, y, mask = _inputs()
    with torch.no_grad():
        out = video(x.double(), t.double(), y.double(), mask)
    ref_cfg = dict(depth=3, hidden_size=96, num_heads=4, patch_size=(1, 2, 2), input_size=(1, 8, 8),
                   space_scale=0.5, time_scale=1.0, in_channels=4, pred_sigma=True)
    pix_sd = {k: v.double() for k, v in sd.items()}
    pix_sd["x_embedder.proj.weight"] = pix_sd["x_embedder.proj.weight"][:, :, None]
    for f in range(x.shape[2]):
        frame = reference_forward(pix_sd, ref_cfg, x[:, :, f : f + 1].double(), t.double(), y.double(), mask, temporal=False)
        torch.testing.assert_close(out[:, :, f : f + 1], frame, rtol=2.5e-7, atol=1e-7)


def test_pixart_meta_model_conversion(tmp_path):
    pix = randomize_(STDiT(**dict(CFG, input_size=(1, 8, 8))), seed=9)
    sd = {k: v for k, v in pix.state_dict().items() if ".attn_temp." not in k}
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][:, :, 0]
    with torch.device("meta"):
        video = STDiT(**CFG)
    load_checkpoint(video, sd)
    assert not any(p.is_meta for p in video.parameters())
    assert video.blocks[0].attn_temp.qkv.weight.abs().sum() > 0  # initialised, not left empty


def test_strict_mismatch_lists_every_key_and_loads_nothing():
    src = _src()
    sd = src.state_dict()
    sd.pop("blocks.1.mlp.fc1.weight")
    sd["blocks.9.extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(5, 96)
    dst = STDiT(**CFG)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(dst, sd)
    msg = str(e.value)
    for key in ("blocks.1.mlp.fc1.weight", "blocks.9.extra.weight", "final_layer.linear.weight", "strict=False"):
        assert key in msg
    for k, v in dst.state_dict().items():  # nothing was overwritten
        assert torch.equal(v, before[k]), k

    report = load_checkpoint(dst, sd, strict=False)
    assert report.missing == ["blocks.1.mlp.fc1.weight"] and report.unexpected == ["blocks.9.extra.weight"]
    assert len(report.mismatched) == 1
    assert torch.equal(dst.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, before["blocks.1.mlp.fc1.weight"])
    assert torch.equal(dst.final_layer.linear.weight, before["final_layer.linear.weight"])


def test_position_embeddings_recomputed_for_another_size():
    src = _src()
    big = STDiT(**dict(CFG, input_size=(8, 16, 12)))
    load_checkpoint(big, src.state_dict())  # pos tables of the file have the wrong size: ignored
    fresh = STDiT(**dict(CFG, input_size=(8, 16, 12)))
    assert torch.equal(big.pos_embed, fresh.pos_embed) and big.pos_embed.shape == (1, 48, 96)
    assert torch.equal(big.pos_embed_temporal, fresh.pos_embed_temporal)
    assert torch.equal(big.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_meta_model_partial_checkpoint_is_refused():
    sd = _src().state_dict()
    sd.pop("t_block.1.weight")
    with torch.device("meta"):
        m = STDiT(**CFG)
    with pytest.raises(CheckpointMismatchError, match="meta device"):
        load_checkpoint(m, sd, strict=False)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"step": 3, "config": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="neither a state dict"):
        read_checkpoint(tmp_path / "odd.pth")
    with pytest.raises(FileNotFoundError, match="pretrained directory"):
        from_pretrained(tmp_path)


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    src = _src()
    out = save_pretrained(src, tmp_path / "p")
    before = (out / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(create_model("STDiT-tiny"), out)
    assert (out / "model.safetensors").read_bytes() == before
    _same_weights(src, from_pretrained(out))
