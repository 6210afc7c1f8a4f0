"""STDiT-XL/2's state dict against Open-Sora v1.0's published structure, built on the meta device."""

import math

import torch

from modelgrow.models import OPENSORA_V1_16x256x256, count_parameters, create_model

C, CAP, L, MLP, OUT = 1152, 4096, 120, 4608, 8  # hidden, T5 channels, tokens, MLP width, 2 * 4 latent channels


def expected_opensora_v1_xl2_keys() -> dict[str, tuple[int, ...]]:
    """Every key and shape of an OpenSora-v1-16x256x256.pth state dict (STDiT-XL/2, depth 28)."""
    lin = lambda name, o, i: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
    keys: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, 256, C),  # 16 x 16 spatial tokens
        "pos_embed_temporal": (1, 16, C),
        "x_embedder.proj.weight": (C, 4, 1, 2, 2),
        "x_embedder.proj.bias": (C,),
        **lin("t_embedder.mlp.0", C, 256),
        **lin("t_embedder.mlp.2", C, C),
        **lin("t_block.1", 6 * C, C),
        "y_embedder.y_embedding": (L, CAP),
        **lin("y_embedder.y_proj.fc1", C, CAP),
        **lin("y_embedder.y_proj.fc2", C, C),
        "final_layer.scale_shift_table": (2, C),
        **lin("final_layer.linear", 4 * OUT, C),
    }
    for i in range(28):
        p = f"blocks.{i}"
        keys[f"{p}.scale_shift_table"] = (6, C)
        keys.update(lin(f"{p}.attn.qkv", 3 * C, C))
        keys.update(lin(f"{p}.attn.proj", C, C))
        keys.update(lin(f"{p}.cross_attn.q_linear", C, C))
        keys.update(lin(f"{p}.cross_attn.kv_linear", 2 * C, C))
        keys.update(lin(f"{p}.cross_attn.proj", C, C))
        keys.update(lin(f"{p}.mlp.fc1", MLP, C))
        keys.update(lin(f"{p}.mlp.fc2", C, MLP))
        keys.update(lin(f"{p}.attn_temp.qkv", 3 * C, C))
        keys.update(lin(f"{p}.attn_temp.proj", C, C))
    return keys


def _xl2():
    with torch.device("meta"):
        return create_model("STDiT-XL/2", **OPENSORA_V1_16x256x256)


def test_xl2_state_dict_keys_and_shapes_match_open_sora():
    m = _xl2()
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = expected_opensora_v1_xl2_keys()
    assert sorted(set(got) - set(want)) == []
    assert sorted(set(want) - set(got)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}


def test_xl2_parameter_count_and_meta_construction():
    m = _xl2()
    assert all(p.is_meta for p in m.parameters())  # nothing was allocated
    assert count_parameters(m) == 759_620_768
    # the same number from the published key list alone (v1.0.0's own STDiT-XL/2 gives it too, see
    # docs/opensora_v1_fidelity.md): every key but the three buffers is a parameter
    buffers = {"pos_embed", "pos_embed_temporal", "y_embedder.y_embedding"}
    assert sum(math.prod(s) for k, s in expected_opensora_v1_xl2_keys().items() if k not in buffers) == 759_620_768
    # buffers: the position tables and the null caption are not parameters
    assert {n for n, _ in m.named_buffers()} == {"pos_embed", "pos_embed_temporal", "y_embedder.y_embedding"}
    assert (m.num_temporal, m.num_spatial, m.out_channels) == (16, 256, 8)
