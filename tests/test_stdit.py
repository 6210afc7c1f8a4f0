"""STDiT against the independent float64 reference in stdit_reference.py (randomised weights)."""

import pytest
import torch

from modelgrow.models import STDiT, create_model
from modelgrow.models.layers import CaptionEmbedder

from .helpers import randomize_
from .stdit_reference import reference_forward

# The configuration the Open-Sora cross-check uses, plus odd shapes: non-square grids, odd T, temporal
# patching, time_scale != 1, more heads than 4.
CONFIGS = {
    "opensora-check": dict(depth=3, hidden_size=96, num_heads=4, caption_channels=32, model_max_length=8,
                           input_size=(4, 8, 8), space_scale=0.5),
    "odd": dict(depth=2, hidden_size=72, num_heads=6, caption_channels=24, model_max_length=7,
                input_size=(5, 6, 10), space_scale=1.0, time_scale=0.75, patch_size=(1, 2, 2)),
    "tokens-tpe": dict(depth=2, hidden_size=64, num_heads=4, caption_channels=16, model_max_length=6,
                       input_size=(4, 6, 6), space_scale=1.0, temporal_pos="tokens"),
    "tpatch": dict(depth=2, hidden_size=48, num_heads=2, caption_channels=16, model_max_length=5,
                   input_size=(6, 4, 4), patch_size=(2, 2, 2), pred_sigma=False, in_channels=3),
}


def _model(cfg, dtype=torch.float64):
    m = STDiT(**cfg, dtype=dtype).to(dtype)
    return randomize_(m).eval()


def _ref_cfg(m: STDiT) -> dict:
    return dict(depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads, patch_size=m.patch_size,
                input_size=m.input_size, space_scale=m.space_scale, time_scale=m.time_scale,
                in_channels=m.in_channels, pred_sigma=m.pred_sigma, temporal_pos=m.temporal_pos)


def _inputs(m: STDiT, B: int, g: torch.Generator):
    T, H, W = m.input_size
    L, Cc = m.y_embedder.y_embedding.shape
    x = torch.randn(B, m.in_channels, T, H, W, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 999
    y = torch.randn(B, 1, L, Cc, generator=g, dtype=torch.float64)
    return x, t, y


def _compare(m, x, t, y, mask):
    captured = {}
    hook = m.final_layer.register_forward_hook(lambda mod, inp, out: captured.setdefault("tokens", out))
    with torch.no_grad():
        out = m(x, t, y, mask)
    hook.remove()
    ref_out, ref_tokens = reference_forward(m.state_dict(), _ref_cfg(m), x, t, y, mask, return_tokens=True)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    # float64 head output before Open-Sora's final float32 cast: agreement to round-off
    tok = captured["tokens"]
    rel = (tok - ref_tokens).abs().max() / ref_tokens.abs().max()
    assert rel <= 1e-10, f"relative error {rel:.3e}"
    # the float32 output (after unpatchify) agrees to the last float32 bit
    torch.testing.assert_close(out, ref_out, rtol=2.5e-7, atol=1e-7)
    assert ref_out.abs().max() > 1e-2  # a real signal, not zeros


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B", [1, 3])
def test_forward_matches_reference(name, B):
    m = _model(CONFIGS[name])
    g = torch.Generator().manual_seed(B)
    x, t, y = _inputs(m, B, g)
    L = y.shape[2]
    lens = [L, max(1, L // 2), 1][:B]
    mask = torch.zeros(B, L, dtype=torch.int64)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    _compare(m, x, t, y, mask)


def test_forward_no_mask_and_holey_mask():
    m = _model(CONFIGS["opensora-check"])
    g = torch.Generator().manual_seed(1)
    x, t, y = _inputs(m, 2, g)
    _compare(m, x, t, y, None)
    # valid tokens need not be a prefix: Open-Sora packs whatever the mask selects
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 1, 1, 1]])
    _compare(m, x, t, y, mask.bool())


def test_cfg_batch_reuses_prompt_masks():
    """A classifier-free-guidance batch is [cond; uncond] (2B samples) with the B prompt masks: Open-Sora
    tiles them (mask.repeat(2, 1))."""
    m = _model(CONFIGS["opensora-check"])
    g = torch.Generator().manual_seed(2)
    B = 2
    x, t, y = _inputs(m, B, g)
    null = m.y_embedder.y_embedding.detach()[None, None].expand(B, 1, -1, -1)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    _compare(m, x2, t2, y2, mask)
    # the CFG batch equals running the two halves separately with their own masks
    with torch.no_grad():
        both = m(x2, t2, y2, mask)
        cond = m(x, t, y, mask)
        unc = m(x, t, null, mask)
    torch.testing.assert_close(both, torch.cat([cond, unc]), rtol=0, atol=1e-6)


def test_float32_matches_float64_reference():
    m = _model(CONFIGS["opensora-check"], dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    x, t, y = _inputs(m, 2, g)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        out = m(x.float(), t.float(), y.float(), mask)
    ref = reference_forward(m.state_dict(), _ref_cfg(m), x.float(), t.float(), y.float(), mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_y_without_singleton_axis_and_eval_train_equivalence():
    cfg = dict(CONFIGS["opensora-check"], class_dropout_prob=0.0)
    m = _model(cfg)
    g = torch.Generator().manual_seed(4)
    x, t, y = _inputs(m, 2, g)
    with torch.no_grad():
        ref = m(x, t, y)
        assert torch.equal(m(x, t, y[:, 0]), ref)
        m.train()  # no dropout, no drop-path: training mode computes the same function
        torch.testing.assert_close(m(x, t, y), ref, rtol=0, atol=0)


def test_caption_dropout_uses_null_embedding():
    emb = CaptionEmbedder(in_channels=6, hidden_size=8, uncond_prob=1.0, token_num=3).double()
    cap = torch.randn(4, 1, 3, 6, dtype=torch.float64)
    out = emb(cap, train=True)
    null = emb.y_proj(emb.y_embedding)
    torch.testing.assert_close(out, null.expand(4, 1, 3, 8))
    forced = emb(cap, train=False, force_drop_ids=torch.tensor([1, 0, 0, 1]))
    torch.testing.assert_close(forced[1:3], emb.y_proj(cap[1:3]))
    torch.testing.assert_close(forced[[0, 3]], null.expand(2, 1, 3, 8))
    with pytest.raises(ValueError, match="model_max_length"):
        emb(torch.randn(2, 1, 5, 6, dtype=torch.float64), train=True)


def test_empty_caption_gives_zero_cross_attention_not_nan():
    m = _model(CONFIGS["opensora-check"])
    g = torch.Generator().manual_seed(5)
    x, t, y = _inputs(m, 2, g)
    mask = torch.tensor([[1] * 8, [0] * 8])
    with torch.no_grad():
        out = m(x, t, y, mask)
    assert torch.isfinite(out).all()
    _compare(m, x, t, y, mask)


def test_backward_is_finite_and_reaches_every_parameter():
    m = randomize_(create_model("STDiT-tiny")).train()
    x = torch.randn(2, 4, 4, 8, 8)
    y = torch.randn(2, 1, 8, 32)
    mask = torch.tensor([[1] * 8, [1] * 2 + [0] * 6])
    m.y_embedder.uncond_prob = 0.0
    m(x, torch.tensor([3.0, 700.0]), y, mask).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_drop_path_and_freeze():
    m = STDiT(**CONFIGS["opensora-check"], drop_path=0.3, freeze="not_temporal")
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.15, 0.3])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("attn_temp" in n for n in trainable)
    m = STDiT(**CONFIGS["opensora-check"], freeze="text")
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all("cross_attn" in n for n in frozen)


def test_open_sora_init_zeroes_identity_paths():
    m = STDiT(**CONFIGS["opensora-check"])
    for b in m.blocks:
        assert b.cross_attn.proj.weight.abs().sum() == 0 and b.attn_temp.proj.weight.abs().sum() == 0
    assert m.final_layer.linear.weight.abs().sum() == 0
    out = m(torch.randn(1, 4, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 1, 8, 32))
    assert torch.equal(out, torch.zeros_like(out))  # zero final layer: Open-Sora starts predicting 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=90, num_heads=4), "divisible by num_heads"),
        (dict(hidden_size=6, num_heads=3), "divisible by 4"),
        (dict(input_size=(4, 8)), r"\(T, H, W\)"),
        (dict(enable_sequence_parallelism=True), "FSDP2"),
        (dict(freeze="everything"), "freeze"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    base = dict(CONFIGS["opensora-check"])
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        STDiT(**base)


def test_bad_forward_inputs_name_the_problem():
    m = create_model("STDiT-tiny")
    x, t, y = torch.randn(2, 4, 4, 8, 8), torch.ones(2), torch.randn(2, 1, 8, 32)
    with pytest.raises(ValueError, match="input_size"):  # another size must be divisible by the patch
        m(torch.randn(2, 4, 4, 9, 9), t, y)
    with pytest.raises(ValueError, match="timestep"):
        m(x, torch.ones(3), y)
    with pytest.raises(ValueError, match="y must be"):
        m(x, t, torch.randn(2, 1, 8, 31))
    with pytest.raises(ValueError, match="mask"):
        m(x, t, y, torch.ones(2, 7))
    with pytest.raises(ValueError, match="mask"):
        m(x, t, y, torch.ones(3, 8))


def test_no_temporal_pos_emb_warns_and_changes_nothing():
    with pytest.warns(UserWarning, match="no effect"):
        m = STDiT(**CONFIGS["opensora-check"], no_temporal_pos_emb=True)
    assert m.pos_embed_temporal.shape == (1, 4, 96)


def test_temporal_position_placement_decides_whether_a_fresh_model_knows_frame_order(tmp_path):
    """Open-Sora v1.0 feeds the temporal table only to block 0's temporal attention, whose output projection
    starts at zero: a model fresh from that init cannot tell frames apart (reversing the frames reverses the output exactly).
    With temporal_pos="tokens" every token carries its frame index from the first layer."""
    g = torch.Generator().manual_seed(0)
    for placement, order_blind in (("attention", True), ("tokens", False)):
        torch.manual_seed(0)
        m = randomize_(STDiT(**CONFIGS["opensora-check"], temporal_pos=placement, dtype=torch.float64).to(torch.float64))
        m.initialize_temporal()  # random weights (the fresh final layer is zero), temporal output still zero
        m.eval()
        x, t, y = _inputs(m, 2, g)
        with torch.no_grad():
            out, rev = m(x, t, y), m(x.flip(2), t, y).flip(2)
        assert torch.equal(out, rev) == order_blind, placement
        m.save_pretrained(tmp_path / placement)
        back = STDiT.from_pretrained(tmp_path / placement, torch_dtype=torch.float64).eval()
        assert back.temporal_pos == placement
        with torch.no_grad():
            torch.testing.assert_close(back(x, t, y), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="temporal_pos must be one of"):
        STDiT(**CONFIGS["opensora-check"], temporal_pos="rope")
