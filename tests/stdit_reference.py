"""An independent float64 reference of Open-Sora v1.0's STDiT forward, written from the published math.

It reads a plain state dict (no modelgrow modules), patchifies with reshapes instead of a convolution,
packs the valid caption tokens per sample and runs explicit softmax attention per sample, as Open-Sora's
xformers path does. Open-Sora's precision quirks are reproduced where they change float64 results:
timestep features in float32, the self-attention softmax in float32, position tables rounded to float32,
the output cast to float32. ``return_tokens=True`` also returns the float64 output before that last cast.
"""

from __future__ import annotations

import math

import numpy as np
import torch

F64 = torch.float64


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1.0 + torch.exp(-x))


def sincos(positions: np.ndarray, dim: int) -> np.ndarray:
    """[M] positions -> [M, dim]: sin(p * w_k) for k < dim/2, then cos; w_k = 10000^(-k / (dim/2))."""
    k = np.arange(dim // 2, dtype=np.float64)
    w = 1.0 / np.power(10000.0, k / (dim / 2.0))
    arg = positions.astype(np.float64)[:, None] * w[None, :]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)


def spatial_table(hidden, gh, gw, scale):
    """Token s = h * gw + w: first half of the channels encodes w / scale, the second h / scale (fp32 grid)."""
    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    w_pos = (ww.reshape(-1).astype(np.float32) / np.float32(scale)).astype(np.float32)
    h_pos = (hh.reshape(-1).astype(np.float32) / np.float32(scale)).astype(np.float32)
    table = np.concatenate([sincos(w_pos, hidden // 2), sincos(h_pos, hidden // 2)], axis=1)
    return torch.tensor(table.astype(np.float32), dtype=F64)  # rounded to float32 like the buffer


def temporal_table(hidden, t, scale):
    table = sincos(np.arange(t, dtype=np.float64) / scale, hidden)
    return torch.tensor(table.astype(np.float32), dtype=F64)


def timestep_features(ts: torch.Tensor, dim=256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = ts.to(F64).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(F64)


def self_attention(x, sd, name, heads):
    """x [G, N, C] -> [G, N, C]; softmax in float32 as Open-Sora's eager path."""
    G, N, C = x.shape
    D = C // heads
    qkv = linear(x, sd, f"{name}.qkv").reshape(G, N, 3, heads, D)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [G, N, H, D]
    scores = torch.einsum("gnhd,gmhd->ghnm", q * D**-0.5, k)
    p = torch.softmax(scores.float(), dim=-1).to(F64)
    o = torch.einsum("ghnm,gmhd->gnhd", p, v).reshape(G, N, C)
    return linear(o, sd, f"{name}.proj")


def cross_attention(x, cond_list, sd, name, heads):
    """x [B, N, C]; cond_list: per sample [L_b, C] valid caption tokens -> [B, N, C]."""
    B, N, C = x.shape
    D = C // heads
    out = torch.zeros_like(x)
    for b in range(B):
        q = linear(x[b], sd, f"{name}.q_linear").reshape(N, heads, D)
        kv = linear(cond_list[b], sd, f"{name}.kv_linear").reshape(-1, 2, heads, D)
        k, v = kv[:, 0], kv[:, 1]
        if k.shape[0] == 0:
            continue
        s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(D)
        s = s - s.max(dim=-1, keepdim=True).values
        p = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
        out[b] = torch.einsum("hnm,mhd->nhd", p, v).reshape(N, C)
    return linear(out, sd, f"{name}.proj")


def reference_forward(sd, cfg, x, timestep, y, mask=None, temporal=True, return_tokens=False):
    """sd: state dict; cfg: dict with depth, hidden_size, num_heads, patch_size, input_size, space_scale,
    time_scale, in_channels, pred_sigma (and optionally temporal_pos: "tokens" adds the temporal table to the
    tokens with the spatial one instead of to block 0's temporal-attention input).
    x [B, Cin, T, H, W]; timestep [B]; y [B, 1, L, Ccap]; mask [B', L].
    temporal=False runs PixArt-alpha (no temporal attention), for checking the PixArt conversion."""
    sd = {k: v.to(F64) for k, v in sd.items()}
    C, heads, depth = cfg["hidden_size"], cfg["num_heads"], cfg["depth"]
    pt, ph, pw = cfg["patch_size"]
    Cin = cfg["in_channels"]
    Cout = 2 * Cin if cfg.get("pred_sigma", True) else Cin
    B, _, T_in, H_in, W_in = x.shape
    Tn, Hn, Wn = T_in // pt, H_in // ph, W_in // pw
    S = Hn * Wn
    x = x.to(F64)

    # patchify: token (t, h, w) gets the flattened (c, dt, dh, dw) patch, times the conv kernel
    patches = x.reshape(B, Cin, Tn, pt, Hn, ph, Wn, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, Tn * S, -1)
    w = sd["x_embedder.proj.weight"].reshape(C, -1)
    tok = patches @ w.T + sd["x_embedder.proj.bias"]  # [B, T*S, C]
    tok = (tok.reshape(B, Tn, S, C) + spatial_table(C, Hn, Wn, cfg["space_scale"])).reshape(B, Tn * S, C)
    tpe = temporal_table(C, Tn, cfg["time_scale"])  # [T, C]
    tpe_in_tokens = cfg.get("temporal_pos", "attention") == "tokens"
    if tpe_in_tokens:
        tok = (tok.reshape(B, Tn, S, C) + tpe[None, :, None]).reshape(B, Tn * S, C)

    # conditions
    tf = timestep_features(timestep)
    t = linear(silu(linear(tf, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")  # [B, C]
    t6 = linear(silu(t), sd, "t_block.1")  # [B, 6C]
    cap = y.to(F64).reshape(B, y.shape[-2], y.shape[-1])
    cap = linear(gelu_tanh(linear(cap, sd, "y_embedder.y_proj.fc1")), sd, "y_embedder.y_proj.fc2")  # [B, L, C]
    if mask is None:
        keep = torch.ones(B, cap.shape[1], dtype=torch.bool)
    else:
        m = mask.reshape(mask.shape[0], -1)
        keep = torch.cat([m] * (B // m.shape[0]), dim=0) != 0  # CFG batches tile the masks
    cond_list = [cap[b][keep[b]] for b in range(B)]

    for i in range(depth):
        p = f"blocks.{i}"
        mod = sd[f"{p}.scale_shift_table"][None] + t6.reshape(B, 6, C)  # [B, 6, C]
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, j : j + 1] for j in range(6))
        h = layer_norm(tok) * (1 + sc1) + sh1
        h = self_attention(h.reshape(B * Tn, S, C), sd, f"{p}.attn", heads).reshape(B, Tn * S, C)
        tok = tok + g1 * h
        if temporal:
            h = tok.reshape(B, Tn, S, C).permute(0, 2, 1, 3).reshape(B * S, Tn, C)
            if i == 0 and not tpe_in_tokens:
                h = h + tpe
            h = self_attention(h, sd, f"{p}.attn_temp", heads)
            tok = tok + g1 * h.reshape(B, S, Tn, C).permute(0, 2, 1, 3).reshape(B, Tn * S, C)
        tok = tok + cross_attention(tok, cond_list, sd, f"{p}.cross_attn", heads)
        h = layer_norm(tok) * (1 + sc2) + sh2
        h = linear(gelu_tanh(linear(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
        tok = tok + g2 * h

    fin = sd["final_layer.scale_shift_table"][None] + t[:, None]  # [B, 2, C]
    h = layer_norm(tok) * (1 + fin[:, 1:2]) + fin[:, 0:1]
    h = linear(h, sd, "final_layer.linear")  # [B, T*S, pt*ph*pw*Cout]
    out = h.reshape(B, Tn, Hn, Wn, pt, ph, pw, Cout).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = out.reshape(B, Cout, Tn * pt, Hn * ph, Wn * pw)
    if return_tokens:
        return out.to(torch.float32), h
    return out.to(torch.float32)
