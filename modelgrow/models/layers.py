"""Building blocks of STDiT: the same functions as Open-Sora v1.0.0's ``opensora/models/layers/blocks.py``
(checked against that file, see docs/opensora_v1_fidelity.md; in float32/bf16 the fused kernels differ from
its eager code by round-off only).

Module and parameter names are part of the contract: a released Open-Sora v1.0 state dict must load with
``strict=True``. Where Open-Sora's arithmetic has a precision quirk (timestep features in float32, the
eager self-attention softmax in float32) we reproduce it, so that float64 runs agree with Open-Sora's to
round-off; the quirk is named at the place it happens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mgkernels.gated_cross_attn import cross_attn
from mgkernels.modulate import modulate
from mgkernels.st_attention import st_attention


def approx_gelu() -> nn.Module:
    """GELU with the tanh approximation: the activation of the block MLPs and the caption projection in
    PixArt/Open-Sora (the timestep MLP uses SiLU)."""
    return nn.GELU(approximate="tanh")


# ------------------------------------------------------------------------------------------------------
# Sine/cosine position embeddings (MAE formulation, as Open-Sora v1.0 computes them: numpy, float64
# frequencies, float32 spatial grid, the whole table rounded to float32 when it becomes a buffer).
# ------------------------------------------------------------------------------------------------------


def sincos_1d_from_grid(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] table, sines in the first half, cosines in the second."""
    if dim % 2:
        raise ValueError(f"sin/cos position embedding needs an even dimension, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega  # [dim/2]
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, dim/2], outer product in float64
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, dim]


def sincos_2d(dim: int, grid_hw: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """[grid_h * grid_w, dim] table. As in MAE/PixArt the grid is built with w first and then *reshaped*
    (not transposed) to [2, 1, grid_w, grid_h]: the first half of the channels encodes the w coordinate.
    """
    if dim % 2:
        raise ValueError(f"2-D sin/cos position embedding needs an even dimension, got {dim}")
    grid_h = np.arange(grid_hw[0], dtype=np.float32) / scale
    grid_w = np.arange(grid_hw[1], dtype=np.float32) / scale
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # [2, H, W], w first
    grid = grid.reshape([2, 1, grid_hw[1], grid_hw[0]])
    emb_a = sincos_1d_from_grid(dim // 2, grid[0])  # [H*W, dim/2]
    emb_b = sincos_1d_from_grid(dim // 2, grid[1])  # [H*W, dim/2]
    return np.concatenate([emb_a, emb_b], axis=1)  # [H*W, dim]


def sincos_1d(dim: int, length: int, scale: float = 1.0) -> np.ndarray:
    """[length, dim] table for positions 0..length-1 divided by ``scale`` (float64 grid)."""
    pos = np.arange(0, length)[..., None] / scale
    return sincos_1d_from_grid(dim, pos)


# ------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """fc1 -> act -> fc2 (timm's ``Mlp`` with dropout 0 and no norm; the same parameter names)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, act_layer=approx_gelu):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``drop_path`` with ``scale_by_keep=True``)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchEmbed3D(nn.Module):
    """[B, C_in, T, H, W] video latent -> [B, N, C] tokens with a strided Conv3d (zero-pads ragged edges)."""

    def __init__(self, patch_size=(1, 2, 2), in_chans: int = 4, embed_dim: int = 1152):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        if w % pw:
            x = F.pad(x, (0, pw - w % pw))
        if h % ph:
            x = F.pad(x, (0, 0, 0, ph - h % ph))
        if t % pt:
            x = F.pad(x, (0, 0, 0, 0, 0, pt - t % pt))
        x = self.proj(x)  # [B, C, T', H', W']
        return x.flatten(2).transpose(1, 2)  # [B, T'*H'*W', C]


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> [B, hidden] through 256 sinusoidal features and an MLP (GLIDE/DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """[B] (possibly fractional) timesteps -> [B, dim] cos/sin features, always computed in float32
        (Open-Sora quirk kept on purpose: the features are float32 whatever the model dtype). Open-Sora builds
        the frequencies on the CPU and then moves them; here they are built on ``t``'s device (identical on
        the CPU, possibly 1 ulp apart on a GPU)."""
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / half)  # [half]
        args = t[:, None].float() * freqs[None]  # [B, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(dtype)  # [B, 256]
        return self.mlp(t_freq)  # [B, hidden]


class CaptionEmbedder(nn.Module):
    """Projects text-encoder states [B, 1, L, C_cap] -> [B, 1, L, hidden]; in training, replaces whole
    captions by the learned-at-init null caption ``y_embedding`` with probability ``uncond_prob`` (CFG)."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, act_layer=approx_gelu, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_features=in_channels, hidden_features=hidden_size, out_features=hidden_size, act_layer=act_layer)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop_ids = force_drop_ids.to(caption.device) == 1
        return torch.where(drop_ids[:, None, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if train and tuple(caption.shape[2:]) != tuple(self.y_embedding.shape):
            raise ValueError(
                f"training captions must be padded to [B, 1, {self.y_embedding.shape[0]}, {self.y_embedding.shape[1]}] "
                f"(model_max_length, caption_channels); got {list(caption.shape)}"
            )
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) [+ mask]) v over [..., N, D] tensors through SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    """Multi-head self-attention over [B, N, C] (spatial: N = S tokens of a frame; temporal: N = T frames).

    Parameters ``qkv`` and ``proj`` as in Open-Sora. The attention itself goes through
    ``F.scaled_dot_product_attention``. In float64 the softmax is taken in float32, exactly as Open-Sora
    v1.0's eager path (``attn.to(torch.float32).softmax(-1).to(dtype)``) does, so that float64 outputs
    agree with Open-Sora's to round-off. In float32 that cast is a no-op; in bf16/fp16 SDPA's fused kernels
    keep scores and softmax in float32 internally, like the flash-attn path (``enable_flashattn=True``) that
    v1.0's configs use, whereas v1.0's eager path rounds the scores to bf16/fp16 first: agreement to the
    dtype's round-off, not bit for bit.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward_st(self, x: torch.Tensor, T: int, S: int, mode: str) -> torch.Tensor:
        """x [B, T*S, C] (frames outermost) -> [B, T*S, C], attending over the S tokens of each frame
        (``mode="spatial"``) or over the T frames at each spatial position (``"temporal"``). The fused
        kernel reads q/k/v from the qkv projection through strides: no permute or contiguous copies."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # [B, T*S, 3, H, D]
        if qkv.dtype != torch.float64:
            return self.proj(st_attention(qkv, T, S, mode))  # [B, T*S, C]
        # float64 (verification against Open-Sora): its eager attention, with explicit layout changes
        if mode == "spatial":
            o = self._core(qkv.reshape(B * T, S, 3, self.num_heads, self.head_dim))  # [B*T, S, H, D]
            return self.proj(o.reshape(B, N, C))
        qkv = qkv.view(B, T, S, 3 * C).transpose(1, 2).reshape(B * S, T, 3, self.num_heads, self.head_dim)
        o = self._core(qkv).reshape(B, S, T, C).transpose(1, 2).reshape(B, N, C)  # [B, T*S, C]
        return self.proj(o)

    def _core(self, qkv: torch.Tensor) -> torch.Tensor:
        """[G, n, 3, H, D] -> [G, n, H, D] attention output per sequence."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [G, H, n, D]
        if q.dtype == torch.float64:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [G, H, n, n]
            attn = attn.to(torch.float32).softmax(dim=-1).to(q.dtype)  # Open-Sora: softmax in float32
            o = attn @ v  # [G, H, n, D]
        else:
            o = _attention(q, k, v)  # [G, H, n, D]
        return o.transpose(1, 2)  # [G, n, H, D]


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention from video tokens [B, N, C] to condition tokens [B, L, C] (un-normalised, un-gated).

    ``mask`` is a key-padding mask [B, L] (True / non-zero = real token). This equals Open-Sora's packed
    form (valid tokens of all captions concatenated, xformers ``BlockDiagonalMask.from_seqlens([N]*B,
    y_lens)``): each sample attends exactly to its own valid tokens. A caption with no valid token gives a
    zero update instead of NaN. The attention runs through ``mgkernels.cross_attn`` (Triton on CUDA: q, k, v
    read in place from the projections' outputs; the PyTorch SDPA reference on CPU and in float64).
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden size {d_model} is not divisible by num_heads {num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        L = cond.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim)  # [B, N, H, D]
        kv = self.kv_linear(cond).view(B, L, 2, self.num_heads, self.head_dim)  # [B, L, 2, H, D]
        o = cross_attn(q, kv[:, :, 0], kv[:, :, 1], mask)  # [B, N, H, D]
        return self.proj(o.reshape(B, N, C))  # [B, N, C]


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: LayerNorm (no affine, eps 1e-6: Open-Sora's ``norm_final``, which holds no
    parameters) -> modulate with (table + t) -> linear to patch pixels; the norm runs fused in ``modulate``."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 x [B, 1, C]
        x = modulate(x, shift, scale)  # [B, N, C] LayerNorm + modulation, fused
        return self.linear(x)  # [B, N, prod(patch) * C_out]
