"""Model growth and the LLM condition: exact provenance, function preservation, gradients, round trips."""

import pytest
import torch

from mgkernels.dispatch import use
from modelgrow.grow import add_llm_condition, expand, freeze_original_blocks, growth_plan, new_block_indices
from modelgrow.models import OPENSORA_V1_16x256x256, STDiT, count_parameters, create_model, from_pretrained, save_pretrained

from .helpers import randomize_

CFG = dict(depth=4, hidden_size=48, num_heads=4, caption_channels=24, model_max_length=6, input_size=(3, 4, 6),
           space_scale=0.5, class_dropout_prob=0.0)
LLM_C, LLM_L = 20, 5


def _inputs(B=2, seed=0, llm=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 3, 4, 6, generator=g)
    t = torch.tensor([5.0, 930.0])[:B]
    y = torch.randn(B, 1, 6, 24, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])[:B]
    kw = dict(y_llm=torch.randn(B, 1, LLM_L, LLM_C, generator=g), llm_mask=torch.tensor([[1] * 5, [1] * 3 + [0] * 2])[:B]) if llm else {}
    return (x, t, y, mask), kw


# appendix A: (source block, new?) for every block of the grown model
PLANS = [
    (4, "insert", 1, None, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]),
    (4, "insert", 0.5, None, [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (3, 1)]),
    (2, "insert", 2, None, [(0, 0), (0, 1), (0, 1), (1, 0), (1, 1), (1, 1)]),
    (4, "insert", 1.5, None, [(0, 0), (1, 0), (1, 1), (1, 1), (1, 1), (2, 0), (3, 0), (3, 1), (3, 1), (3, 1)]),
    (4, "prefix", None, 3, [(0, 1), (0, 1), (0, 1), (0, 0), (1, 0), (2, 0), (3, 0)]),
    (4, "suffix", None, 1, [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1)]),
    (4, "suffix", 0.5, None, [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 1)]),
]


@pytest.mark.parametrize("depth,strategy,ratio,num_new,want", PLANS)
def test_growth_plan_matches_appendix(depth, strategy, ratio, num_new, want):
    assert growth_plan(depth, strategy, ratio, num_new) == [(s, bool(n)) for s, n in want]


def test_bad_growth_requests():
    with pytest.raises(ValueError, match="not divisible by 3"):
        growth_plan(4, "insert", 1 / 3)
    with pytest.raises(ValueError, match="integer number of new blocks"):
        growth_plan(4, "prefix", 0.3)
    with pytest.raises(ValueError, match="exactly one"):
        growth_plan(4, "prefix", 1, 2)
    with pytest.raises(ValueError, match="unknown expansion strategy"):
        growth_plan(4, "middle", 1)
    with pytest.raises(ValueError, match="> 0"):
        growth_plan(4, "insert", 0)


GROWTHS = [("insert", 0.5, None), ("insert", 1, None), ("insert", 2, None),
           ("prefix", None, 1), ("prefix", None, 3), ("suffix", None, 1), ("suffix", None, 3)]


@pytest.mark.parametrize("strategy,ratio,num_new", GROWTHS)
@pytest.mark.parametrize("llm", ["none", "before", "after"])
@pytest.mark.parametrize("train", [False, True])
def test_function_preserved(strategy, ratio, num_new, llm, train):
    parent = randomize_(STDiT(**CFG), seed=1).train(train)
    if llm == "before":
        grown = expand(add_llm_condition(parent, LLM_C, LLM_L), strategy, ratio, num_new)
    else:
        grown = expand(parent, strategy, ratio, num_new)
        if llm == "after":
            grown = add_llm_condition(grown, LLM_C, LLM_L)
    assert grown.training == train
    args, kw = _inputs(llm=llm != "none")
    with torch.no_grad():
        want = parent(*args)
        got = grown(*args, **kw)
    assert (got - want).abs().max() <= 1e-6
    # the parent is untouched and the new blocks are real copies with zeroed residual outputs
    src, new = grown.config["growth"]["sources"], grown.config["growth"]["new"]
    for i, (s, n) in enumerate(zip(src, new)):
        for name, p in grown.blocks[i].named_parameters():
            if "llm_" in name:
                continue
            ref = dict(parent.blocks[s].named_parameters())[name]
            zeroed = n and any(name.startswith(z) for z in ("attn.proj", "attn_temp.proj", "cross_attn.proj", "mlp.fc2"))
            assert torch.equal(p, torch.zeros_like(ref) if zeroed else ref), (i, name)
    assert grown.temporal_pos_block == next(i for i, (s, n) in enumerate(zip(src, new)) if s == 0 and not n)


@pytest.mark.parametrize("order", ["llm-after-expand", "expand-after-trained-llm", "expand-after-fresh-llm"])
def test_gradients_reach_zeroed_projections_and_gate_at_step_zero(order):
    parent = randomize_(STDiT(**CFG), seed=2).train()
    if order == "llm-after-expand":
        grown = add_llm_condition(expand(parent, "insert", 1), LLM_C, LLM_L)
    else:
        with_llm = add_llm_condition(parent, LLM_C, LLM_L)
        if order == "expand-after-trained-llm":
            with torch.no_grad():
                for b in with_llm.blocks:
                    b.llm_gate.fill_(0.3)
        grown = expand(with_llm, "insert", 1)
    args, kw = _inputs(llm=True)
    grown(*args, **kw).square().mean().backward()
    for i in new_block_indices(grown):
        blk = grown.blocks[i]
        for name in ("attn.proj", "attn_temp.proj", "cross_attn.proj", "mlp.fc2", "llm_cross_attn.proj"):
            lin = blk.get_submodule(name)
            # llm_cross_attn.proj is zeroed only behind a non-zero gate (else neither could ever learn)
            zero = name != "llm_cross_attn.proj" or order == "expand-after-trained-llm"
            assert bool(lin.weight.abs().sum() == 0) == zero, (i, name)
            if zero:  # a kept projection behind a zero gate gets its gradient from step 1 on, the gate now
                assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0, (i, name)
    for b in grown.blocks:  # the gate learns wherever its projection is not zero
        if b.llm_cross_attn.proj.weight.abs().sum() > 0:
            assert b.llm_gate.grad is not None and b.llm_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("copy_t5,per_head", [(True, False), (False, True)])
def test_llm_condition_copies_t5_and_learns(copy_t5, per_head):
    parent = randomize_(STDiT(**CFG), seed=3).eval()
    m = add_llm_condition(parent, 24 if copy_t5 else LLM_C, LLM_L, copy_t5=copy_t5, per_head_gate=per_head)
    blk = m.blocks[1]
    assert blk.llm_gate.shape == ((4,) if per_head else (1,)) and blk.llm_gate.abs().sum() == 0
    same = torch.equal(blk.llm_cross_attn.kv_linear.weight, blk.cross_attn.kv_linear.weight)
    assert same == copy_t5
    assert blk.llm_cross_attn.proj.weight.abs().sum() > 0  # never zero behind a zero gate
    if copy_t5:  # sizes match: the LLM embedder starts as the T5 caption embedder
        assert torch.equal(m.llm_embedder.y_proj.fc1.weight, m.y_embedder.y_proj.fc1.weight)
    c = 24 if copy_t5 else LLM_C
    g = torch.Generator().manual_seed(4)
    args, _ = _inputs()
    y1, y2 = torch.randn(2, 1, LLM_L, c, generator=g), torch.randn(2, 1, LLM_L, c, generator=g)
    with torch.no_grad():
        for b in m.blocks:
            b.llm_gate.fill_(0.7)
        o1, o2, o0 = m(*args, y_llm=y1), m(*args, y_llm=y2), m(*args)  # o0: null LLM condition
        dropped = m(*args, y_llm=y1, drop_llm=torch.tensor([True, False]))
    assert (o1 - o2).abs().max() > 1e-3 and (o1 - o0).abs().max() > 1e-3
    torch.testing.assert_close(dropped[0], o0[0])
    torch.testing.assert_close(dropped[1], o1[1])


def test_grown_checkpoint_round_trip(tmp_path):
    parent = randomize_(STDiT(**CFG), seed=5)
    grown = add_llm_condition(expand(parent, "prefix", num_new=2), LLM_C, LLM_L, per_head_gate=True)
    with torch.no_grad():
        for b in grown.blocks:
            b.llm_gate.uniform_(-1, 1)
    save_pretrained(grown, tmp_path / "g")
    back = from_pretrained(tmp_path / "g")
    assert back.config["growth"] == grown.config["growth"] and back.temporal_pos_block == 2
    args, kw = _inputs(llm=True)
    with torch.no_grad():
        torch.testing.assert_close(back(*args, **kw), grown.eval()(*args, **kw), rtol=0, atol=0)


def test_freeze_original_blocks():
    grown = add_llm_condition(expand(STDiT(**CFG), "insert", 0.5), LLM_C, LLM_L)
    trainable = freeze_original_blocks(grown)
    assert new_block_indices(grown) == [2, 5]
    assert {n.split(".")[1] for n in trainable if n.startswith("blocks.") and "llm_" not in n} == {"2", "5"}
    assert all(p.requires_grad == (n in trainable) for n, p in grown.named_parameters())
    assert any(n.startswith("llm_embedder") for n in trainable)
    with pytest.raises(ValueError, match="not been grown"):
        freeze_original_blocks(STDiT(**CFG))


def test_xl2_grown_parameter_count():
    with torch.device("meta"):
        m = create_model("STDiT-XL/2", **OPENSORA_V1_16x256x256)
        assert count_parameters(expand(m, "insert", 1)) == 1_503_540_896


def test_llm_errors():
    m = STDiT(**CFG)
    args, kw = _inputs(llm=True)
    with pytest.raises(ValueError, match="no LLM condition"):
        m(*args, **kw)
    m = add_llm_condition(m, LLM_C, LLM_L)
    with pytest.raises(ValueError, match="already has"):
        add_llm_condition(m, LLM_C, LLM_L)
    with pytest.raises(ValueError, match="y_llm must be"):
        m(*args, y_llm=torch.randn(2, 1, LLM_L, LLM_C + 1))


def test_grown_llm_model_fused_equals_reference():
    m = randomize_(add_llm_condition(expand(STDiT(**CFG), "insert", 1), LLM_C, LLM_L, per_head_gate=True), seed=6)
    args, kw = _inputs(llm=True)
    outs = {}
    for p in ("ref", "triton"):
        m.zero_grad(set_to_none=True)
        with use(p):
            o = m(*args, **kw)
            o.square().mean().backward()
        outs[p] = (o.detach(), {n: q.grad.clone() for n, q in m.named_parameters()})
    torch.testing.assert_close(outs["triton"][0], outs["ref"][0], rtol=1e-4, atol=1e-5)
    for n, gr in outs["ref"][1].items():
        torch.testing.assert_close(outs["triton"][1][n], gr, rtol=1e-4, atol=1e-5, msg=n)
