"""STDiT: the spatial-temporal DiT of Open-Sora v1.0, drop-in compatible.

Same constructor keywords, same module and parameter names (state-dict keys) and the same forward function
as ``opensora/models/stdit/stdit.py`` (v1.0), quirks included:

* the spatial branch reads ``modulate(norm1(x))``; the temporal branch reads the *un-normalised* residual
  stream and reuses ``gate_msa``;
* the temporal position embedding enters only the temporal attention of block ``temporal_pos_block``
  (block 0 for an Open-Sora model; growth keeps it on the original block 0);
* cross-attention is un-normalised and un-gated; the null caption is the ``y_embedder.y_embedding`` buffer;
* the final layer is modulated by ``t``, not ``t0``;
* inputs (timesteps included) are cast to the model's ``dtype`` and the output is cast to float32;
* ``no_temporal_pos_emb`` is accepted but, as in Open-Sora v1.0, has no effect.

One departure is available and off by default: ``temporal_pos="tokens"`` adds the temporal position embedding
to every token once, with the spatial one (as Latte does), instead of to one block's temporal-attention input.
With v1.0's placement a token learns its frame index only through attention weights; on the synthetic workbench
the v1.0 model never learned the prompted motion direction (reversing its input's frames reverses its output),
see ``docs/demo_recipe.md`` section 7. A second one, also off by default: ``prediction_type="v_prediction"``
makes the first ``in_channels`` outputs v instead of eps (the model is the same; samplers and losses read the
attribute). With eps the caption gets almost no gradient at the high noise levels where a motion's direction is
decided (section 8 of the recipe).

Layout of the token stream: ``[B, T*S, C]`` with frames outermost (T = latent frames / patch_t,
S = spatial tokens per frame).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint

from mgkernels.modulate import modulate
from mgkernels.residual_modulate import residual_modulate

from .layers import (
    Attention,
    CaptionEmbedder,
    DropPath,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    T2IFinalLayer,
    TimestepEmbedder,
    approx_gelu,
    sincos_1d,
    sincos_2d,
)

try:  # the transformer is a diffusers model (ModelMixin / ConfigMixin) wherever diffusers is installed
    from diffusers import ConfigMixin, ModelMixin

    _HAS_DIFFUSERS = True
except ImportError:  # pragma: no cover - training and the kernels run without diffusers
    ModelMixin, ConfigMixin = nn.Module, object
    _HAS_DIFFUSERS = False

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (and likewise for the other float types): the
    project's one table of dtype names (models, text encoders, the cache, the config)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    name = {"fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64", "fp16": "float16",
            "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class STDiTBlock(nn.Module):
    """One STDiT block: spatial self-attn -> temporal self-attn -> T5 cross-attn [-> gated LLM cross-attn]
    -> MLP, adaLN-single. ``llm_gate`` = None builds Open-Sora's block; "scalar" / "per_head" adds the
    ModelGrow LLM cross-attention whose output is scaled by tanh(llm_gate) (llm_gate = 0 at init).

    ``grad_checkpointing``: recompute this block's activations in backward; set by
    :func:`modelgrow.train.parallelize.parallelize` only (``parallel.activation_checkpointing``)."""

    grad_checkpointing: bool = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        d_s: int,
        d_t: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        llm_gate: str | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.d_s = d_s  # spatial tokens per frame
        self.d_t = d_t  # frames
        # Open-Sora's norm1 / norm2 (LayerNorm, no affine, eps 1e-6: no parameters, so no state-dict keys) run
        # fused inside modulate / residual_modulate below
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        if llm_gate is not None:
            if llm_gate not in ("scalar", "per_head"):
                raise ValueError(f"llm_gate must be 'scalar' or 'per_head', got {llm_gate!r}")
            self.llm_cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
            self.llm_gate = nn.Parameter(torch.zeros(1 if llm_gate == "scalar" else num_heads))

    @property
    def has_llm(self) -> bool:
        return hasattr(self, "llm_cross_attn")

    def llm_gate_vector(self) -> torch.Tensor:
        """tanh(llm_gate) broadcast to the C channels: [C] (per-head gates repeat over each head's D)."""
        g = torch.tanh(self.llm_gate)
        return g.expand(self.hidden_size) if g.numel() == 1 else g.repeat_interleave(self.hidden_size // self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
        tpe: torch.Tensor | None = None,
        y_llm: torch.Tensor | None = None,
        llm_mask: torch.Tensor | None = None,
        shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x [B, T*S, C]; y [B, L, C] embedded caption; t [B, 6C] (t_block output); mask [B, L] bool
        key-padding mask or None; tpe [1, T, C] temporal position embedding or None; y_llm [B, L', C]
        embedded LLM condition and llm_mask [B, L'] (blocks with the LLM cross-attention only); shape
        (T, S) of this batch's token grid (None: the configured ``(d_t, d_s)``; an image batch has T = 1)."""
        B, N, C = x.shape
        T, S = (self.d_t, self.d_s) if shape is None else (int(shape[0]), int(shape[1]))
        if T * S != N:
            raise ValueError(f"x has {N} tokens, not T*S = {T}*{S}")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)
        ).chunk(6, dim=1)  # 6 x [B, 1, C]

        # spatial branch: attention among the S tokens of each frame
        x_m = modulate(x, shift_msa, scale_msa)  # [B, T*S, C] LayerNorm + S-AdaLN, fused
        x_s = self.attn.forward_st(x_m, T, S, "spatial")  # [B, T*S, C]
        x = x + self.drop_path(gate_msa * x_s)  # [B, T*S, C]

        # temporal branch: attention among the T frames at each spatial position (un-normalised input)
        x_t = x if tpe is None else (x.view(B, T, S, C) + tpe[:, :, None]).view(B, N, C)  # [B, T*S, C]
        x_t = self.attn_temp.forward_st(x_t, T, S, "temporal")  # [B, T*S, C]
        x = x + self.drop_path(gate_msa * x_t)  # [B, T*S, C] (gate_msa reused)

        # cross-attention to the caption (no norm, no gate); the last residual add before the MLP is fused
        # with its LayerNorm + modulation
        if not self.has_llm:
            x, x_m = residual_modulate(x, self.cross_attn(x, y, mask), None, shift_mlp, scale_mlp)  # 2 x [B, T*S, C]
        else:
            if y_llm is None:
                raise ValueError("this block has an LLM cross-attention: pass y_llm (the model passes its null embedding)")
            x = x + self.cross_attn(x, y, mask)  # [B, T*S, C]
            # LLM cross-attention scaled by tanh(llm_gate): gate + residual + LayerNorm + modulation in one pass
            h = self.llm_cross_attn(x, y_llm, llm_mask)  # [B, T*S, C]
            x, x_m = residual_modulate(x, h, self.llm_gate_vector(), shift_mlp, scale_mlp)  # 2 x [B, T*S, C]

        # MLP
        x = x + self.drop_path(gate_mlp * self.mlp(x_m))  # [B, T*S, C]
        return x


_NOT_RECORDED = ("enable_flashattn", "enable_layernorm_kernel", "enable_sequence_parallelism")  # no effect here
_LLM_FIELDS = ("llm_channels", "llm_max_length", "llm_gate")  # recorded only with the LLM condition


class STDiT(ModelMixin, ConfigMixin):
    """Open-Sora v1.0 STDiT. ``forward(x, timestep, y, mask=None) -> [B, out_channels, T, H, W]``.

    A diffusers ``ModelMixin`` / ``ConfigMixin`` (so it is a pipeline component that diffusers can load, save,
    offload and move); its state-dict keys are Open-Sora v1.0's. ``config`` is a plain dict of the
    constructor arguments (``STDiT(**model.config)`` rebuilds it); ``save_pretrained`` / ``from_pretrained``
    use modelgrow's pretrained directory (``model.safetensors`` + ``config.json``, see
    :mod:`modelgrow.models.checkpoint`). ``dtype`` is the compute dtype the forward casts its inputs to."""

    config_name = "config.json"

    def __init__(
        self,
        input_size=(1, 32, 32),
        in_channels: int = 4,
        patch_size=(1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        no_temporal_pos_emb: bool = False,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        dtype: torch.dtype | str = torch.float32,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        freeze: str | None = None,
        enable_flashattn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        temporal_pos_block: int = 0,
        temporal_pos: str = "attention",
        prediction_type: str = "epsilon",
        llm_channels: int | None = None,
        llm_max_length: int = 120,
        llm_gate: str = "scalar",
        growth: dict | None = None,
    ):
        config = self.config_of(locals())  # what STDiT(**model.config) rebuilds the model from (one place)
        super().__init__()
        input_size, patch_size = tuple(config["input_size"]), tuple(config["patch_size"])
        _check_arch(input_size, patch_size, hidden_size, depth, num_heads, temporal_pos_block)
        if enable_sequence_parallelism:
            raise ValueError(
                "enable_sequence_parallelism is not supported by modelgrow's STDiT: shard with FSDP2 "
                "(modelgrow.train.parallelize) instead and construct with enable_sequence_parallelism=False"
            )
        if temporal_pos not in TEMPORAL_POS:
            raise ValueError(f"temporal_pos must be one of {TEMPORAL_POS}, got {temporal_pos!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if freeze not in (None, "not_temporal", "text"):
            raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {freeze!r}")
        if no_temporal_pos_emb:
            warnings.warn(
                "no_temporal_pos_emb=True has no effect: Open-Sora v1.0 ignores it and so does this drop-in model",
                stacklevel=2,
            )
        self.pred_sigma = pred_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_temporal = input_size[0] // patch_size[0]
        self.num_spatial = (input_size[1] // patch_size[1]) * (input_size[2] // patch_size[2])
        self.num_patches = self.num_temporal * self.num_spatial
        self.num_heads = num_heads
        self._compute_dtype = dtype_from_name(dtype)
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.enable_flashattn = enable_flashattn  # SDPA picks flash attention by itself where it can
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.space_scale = space_scale
        self.time_scale = time_scale
        self.temporal_pos_block = temporal_pos_block
        self.temporal_pos = temporal_pos
        self.prediction_type = prediction_type  # what the first in_channels outputs mean (samplers and losses read it)
        if _HAS_DIFFUSERS:
            self.register_to_config(**config)
        else:  # pragma: no cover
            self._plain_config = config
        self.growth = growth

        self.register_buffer("pos_embed", self.get_spatial_pos_embed())  # [1, S, C]
        self.register_buffer("pos_embed_temporal", self.get_temporal_pos_embed())  # [1, T, C]

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(
            in_channels=caption_channels,
            hidden_size=hidden_size,
            uncond_prob=class_dropout_prob,
            act_layer=approx_gelu,
            token_num=model_max_length,
        )
        if llm_channels is not None:
            # LLM hidden states -> model width, like the caption embedder; its y_embedding is the null LLM condition
            self.llm_embedder = CaptionEmbedder(llm_channels, hidden_size, uncond_prob=0.0, act_layer=approx_gelu, token_num=llm_max_length)
        # stochastic-depth rates as Open-Sora computes them (float32 linspace); on CPU even under a meta context
        drop_rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [
                STDiTBlock(
                    hidden_size,
                    num_heads,
                    d_s=self.num_spatial,
                    d_t=self.num_temporal,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_rates[i],
                    llm_gate=llm_gate if llm_channels is not None else None,
                )
                for i in range(depth)
            ]
        )
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(patch_size), self.out_channels)

        self.initialize_weights()
        self.initialize_temporal()
        if freeze == "not_temporal":
            self.freeze_not_temporal()
        elif freeze == "text":
            self.freeze_text()

    # --------------------------------------------------------------------------------------------------
    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        """The constructor's keyword arguments: what a saved config may hold."""
        import inspect

        return tuple(n for n in inspect.signature(cls.__init__).parameters if n != "self")

    @classmethod
    def config_of(cls, args: dict[str, Any]) -> dict[str, Any]:
        """The config dict of a model built with the constructor arguments ``args`` (``locals()`` of
        ``__init__``): every argument in a plain JSON form (sizes as lists, the dtype by name), except Open-Sora's
        flags that change nothing here (``enable_*``), the LLM condition's only when it exists and the growth
        provenance only when there is one."""
        config = {n: args[n] for n in cls.config_fields() if n not in _NOT_RECORDED}
        config["input_size"] = [int(v) for v in config["input_size"]]
        config["patch_size"] = [int(v) for v in config["patch_size"]]
        config["dtype"] = dtype_name(dtype_from_name(config["dtype"]))
        if config["llm_channels"] is None:  # Open-Sora's model: no ModelGrow LLM condition (grow.add_llm_condition)
            for n in _LLM_FIELDS:
                del config[n]
        if config["growth"] is None:  # provenance of grown blocks (grow.expand)
            del config["growth"]
        return config

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (a fresh plain dict: edit a copy, build a new STDiT from it)."""
        import copy

        src = self._internal_dict if _HAS_DIFFUSERS else self._plain_config
        return copy.deepcopy(dict(src))

    def set_prediction_type(self, prediction_type: str) -> None:
        """Switch what the model is trained to predict (weights unchanged; recorded in ``config``): the start of
        fine-tuning an epsilon checkpoint into a v-prediction one, or back."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        if _HAS_DIFFUSERS:
            self.register_to_config(prediction_type=prediction_type)
        else:  # pragma: no cover
            self._plain_config["prediction_type"] = prediction_type

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: inputs are cast to it (``accelerate`` sets it together with the weights)."""
        return self._compute_dtype

    @dtype.setter
    def dtype(self, value: str | torch.dtype) -> None:
        self._compute_dtype = dtype_from_name(value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None,
                        device=None, strict: bool = True, **kwargs) -> STDiT:
        """Load a modelgrow pretrained directory (local only; diffusers' loading keywords are accepted, those
        that do not apply are ignored)."""
        from pathlib import Path

        from .checkpoint import from_pretrained

        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        model = from_pretrained(path, device=device, dtype=torch_dtype, strict=strict)
        if torch_dtype is not None:
            model.dtype = torch_dtype
        return model

    def save_pretrained(self, save_directory, extra: dict | None = None, **kwargs):
        """Write ``model.safetensors`` + ``config.json`` (modelgrow's pretrained directory)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, save_directory, extra=extra)

    # --------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        y_llm: torch.Tensor | None = None,
        llm_mask: torch.Tensor | None = None,
        drop_t5: torch.Tensor | None = None,
        drop_llm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        x:        [B, C_in, T, H, W] video latent: ``input_size``, or any other size divisible by the patch
                  (T = 1: an image batch; position embeddings follow the batch's size, see ``pos_embeds``).
        timestep: [B] diffusion timesteps (may be fractional).
        y:        [B, 1, L, caption_channels] (or [B, L, caption_channels]) text-encoder states.
        mask:     [B', L] with B' dividing B (a CFG batch reuses the prompt masks), non-zero = real token;
                  None = every token is real.
        y_llm, llm_mask: the LLM condition [B, 1, L', llm_channels] and its mask (models with the LLM
                  condition only; y_llm None = the null LLM condition).
        drop_t5, drop_llm: [B] bool, replace those samples' T5 caption / LLM condition by the null
                  embedding (the trainer's joint condition dropout; given drop_t5 replaces the random
                  caption dropout of training mode).
        returns   [B, out_channels, T, H, W] in float32.
        """
        self._check_inputs(x, timestep, y, mask)
        if y_llm is not None and not hasattr(self, "llm_embedder"):
            raise ValueError("y_llm was given but this model has no LLM condition (add one with modelgrow.grow.add_llm_condition)")
        x = x.to(self.dtype)
        timestep = timestep.to(self.dtype)
        y = y.to(self.dtype)
        if y.ndim == 3:
            y = y.unsqueeze(1)  # [B, 1, L, C_cap]
        B = x.shape[0]
        grid = self.token_grid(x.shape[2:])  # (T, H/p_h, W/p_w) tokens of this batch (T = 1: images)
        T, S, C = grid[0], grid[1] * grid[2], self.hidden_size
        pos_embed, pos_embed_temporal = self.pos_embeds(grid)  # [1, S, C], [1, T, C]

        # embeddings
        x = self.x_embedder(x)  # [B, T*S, C]
        if self.temporal_pos == "tokens":  # every token carries its frame index from the start (not Open-Sora v1.0)
            x = (x.reshape(B, T, S, C) + pos_embed + pos_embed_temporal[:, :, None]).reshape(B, T * S, C)
        else:
            x = (x.reshape(B, T, S, C) + pos_embed).reshape(B, T * S, C)  # [B, T*S, C]
        t = self.t_embedder(timestep, dtype=x.dtype)  # [B, C]
        t0 = self.t_block(t)  # [B, 6C]
        y = self.y_embedder(y, self.training, force_drop_ids=drop_t5).squeeze(1)  # [B, L, C]
        y_mask = self.caption_mask(mask, y.shape[0])  # [B, L] bool or None
        y_llm, llm_mask = self._llm_condition(y_llm, llm_mask, drop_llm, B)  # [B, L', C], [B, L'] or None

        # blocks
        for i, block in enumerate(self.blocks):
            tpe = pos_embed_temporal if self.temporal_pos == "attention" and i == self.temporal_pos_block else None
            args = (x, y, t0, y_mask, tpe) if y_llm is None else (x, y, t0, y_mask, tpe, y_llm, llm_mask)
            if block.grad_checkpointing and self.training and torch.is_grad_enabled():  # chosen by parallelize()
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, shape=(T, S))  # [B, T*S, C]
            else:
                x = block(*args, shape=(T, S))  # [B, T*S, C]

        # head
        x = self.final_layer(x, t)  # [B, T*S, prod(patch) * C_out]
        x = self.unpatchify(x, grid)  # [B, C_out, T, H, W]
        return x.to(torch.float32)

    def _llm_condition(self, y_llm, llm_mask, drop_llm, batch):
        """Embed the LLM condition (the null embedding where y_llm is None or drop_llm is set)."""
        if not hasattr(self, "llm_embedder"):
            return None, None
        null = self.llm_embedder.y_embedding
        if y_llm is None:
            y_llm = null[None, None].expand(batch, 1, -1, -1)
            llm_mask = None
        y_llm = y_llm.to(self.dtype)
        if y_llm.ndim == 3:
            y_llm = y_llm.unsqueeze(1)
        if y_llm.shape[0] != batch or tuple(y_llm.shape[2:]) != tuple(null.shape):
            raise ValueError(f"y_llm must be [B, 1, {null.shape[0]}, {null.shape[1]}] with B = {batch}; got {list(y_llm.shape)}")
        y_llm = self.llm_embedder(y_llm, False, force_drop_ids=drop_llm).squeeze(1)  # [B, L', C]
        if drop_llm is not None and llm_mask is not None:  # a dropped sample sees the whole null sequence
            llm_mask = self.caption_mask(llm_mask, batch) | (drop_llm.to(y_llm.device) == 1)[:, None]
        return y_llm, self.caption_mask(llm_mask, batch)

    @staticmethod
    def caption_mask(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """[B', L] (or [B', 1, 1, L]) caption mask -> [batch, L] bool, tiling it batch/B' times as Open-Sora
        does for classifier-free-guidance batches (``mask.repeat(batch // B', 1)``)."""
        if mask is None:
            return None
        if mask.ndim == 4:
            mask = mask.squeeze(1).squeeze(1)
        if mask.shape[0] != batch:
            mask = mask.repeat(batch // mask.shape[0], 1)
        return mask != 0

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """[B, Nt*Nh*Nw, Tp*Hp*Wp*C_out] -> [B, C_out, Nt*Tp, Nh*Hp, Nw*Wp]; ``grid`` = (Nt, Nh, Nw), default
        the configured input_size's."""
        n_t, n_h, n_w = grid if grid is not None else (self.input_size[i] // self.patch_size[i] for i in range(3))
        p_t, p_h, p_w = self.patch_size
        c = self.out_channels
        x = x.reshape(x.shape[0], n_t, n_h, n_w, p_t, p_h, p_w, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C_out, Nt, Tp, Nh, Hp, Nw, Wp]
        return x.reshape(x.shape[0], c, n_t * p_t, n_h * p_h, n_w * p_w)

    # --------------------------------------------------------------------------------------------------
    def get_spatial_pos_embed(self, grid_size=None) -> torch.Tensor:
        """[1, S, C] float32 buffer for a latent of spatial size ``grid_size`` (default: input_size[1:])."""
        if grid_size is None:
            grid_size = self.input_size[1:]
        table = sincos_2d(
            self.hidden_size,
            (grid_size[0] // self.patch_size[1], grid_size[1] // self.patch_size[2]),
            scale=self.space_scale,
        )
        return torch.tensor(table, dtype=torch.float32).unsqueeze(0)

    def get_temporal_pos_embed(self, num_frames: int | None = None) -> torch.Tensor:
        """[1, T, C] float32 buffer for ``num_frames`` latent frames after temporal patching (default: the
        configured input_size[0] / patch_t)."""
        if num_frames is None:
            num_frames = self.input_size[0] // self.patch_size[0]
        table = sincos_1d(self.hidden_size, int(num_frames), scale=self.time_scale)
        return torch.tensor(table, dtype=torch.float32).unsqueeze(0)

    def token_grid(self, size) -> tuple[int, int, int]:
        """(T, H, W) of a latent -> its token grid (T/p_t, H/p_h, W/p_w), ragged edges rounded up (zero-padded
        by the patch embedding)."""
        return tuple(-(-int(size[i]) // self.patch_size[i]) for i in range(3))

    def pos_embeds(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial [1, S, C] and temporal [1, T, C] position embeddings for a token grid (T, H', W').

        The configured size uses the ``pos_embed`` / ``pos_embed_temporal`` buffers (Open-Sora v1.0's numbers);
        any other size (an image batch, T = 1; another resolution) gets the same sin-cos formulas evaluated on
        its own grid (``get_spatial_pos_embed`` / ``get_temporal_pos_embed``), in the buffers' dtype and
        device, cached per (grid, device, dtype) outside the state dict."""
        want = tuple(self.input_size[i] // self.patch_size[i] for i in range(3))
        if tuple(grid) == want:
            return self.pos_embed, self.pos_embed_temporal
        ref = self.pos_embed
        device = ref.device if ref.device.type != "meta" else torch.device("cpu")
        key = (tuple(grid), device, ref.dtype)
        cache = self.__dict__.setdefault("_pos_embed_cache", {})
        if key not in cache:
            hw = (grid[1] * self.patch_size[1], grid[2] * self.patch_size[2])
            cache[key] = (self.get_spatial_pos_embed(hw).to(device=device, dtype=ref.dtype),
                          self.get_temporal_pos_embed(grid[0]).to(device=device, dtype=ref.dtype))
        return cache[key]

    @torch.no_grad()
    def reset_pos_embed(self) -> None:
        """Recompute both position-embedding buffers for the configured size (after loading weights)."""
        self.__dict__.pop("_pos_embed_cache", None)
        for name, fresh in (("pos_embed", self.get_spatial_pos_embed()), ("pos_embed_temporal", self.get_temporal_pos_embed())):
            old = getattr(self, name)
            device = old.device if old.device.type != "meta" else torch.device("cpu")
            dtype = old.dtype
            setattr(self, name, fresh.to(device=device, dtype=dtype))

    # --------------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Open-Sora/PixArt initialisation: xavier linears, zero biases, N(0, 0.02) embedders, zero
        cross-attention output and zero final linear."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view([w.shape[0], -1]))  # patch embed initialised like a linear
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def initialize_temporal(self) -> None:
        """Zero the temporal attention output so a fresh temporal branch is an identity."""
        for block in self.blocks:
            nn.init.constant_(block.attn_temp.proj.weight, 0)
            nn.init.constant_(block.attn_temp.proj.bias, 0)

    def freeze_not_temporal(self) -> None:
        for n, p in self.named_parameters():
            if "attn_temp" not in n:
                p.requires_grad = False

    def freeze_text(self) -> None:
        for n, p in self.named_parameters():
            if "cross_attn" in n:
                p.requires_grad = False

    # --------------------------------------------------------------------------------------------------
    def _check_inputs(self, x, timestep, y, mask) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, T, H, W]; got {list(x.shape)}")
        grid = self.token_grid(x.shape[2:])
        want = tuple(self.input_size[i] // self.patch_size[i] for i in range(3))
        if grid != want and any(x.shape[2 + i] % self.patch_size[i] for i in range(3)):
            raise ValueError(
                f"latent of size (T, H, W) = {tuple(x.shape[2:])} is neither this model's input_size "
                f"{self.input_size} nor a multiple of its patch_size {self.patch_size}: another size (an image "
                "batch with T = 1, another resolution) must be divisible by the patch"
            )
        B = x.shape[0]
        if timestep.ndim != 1 or timestep.shape[0] != B:
            raise ValueError(f"timestep must be [B] = [{B}]; got {list(timestep.shape)}")
        cap = tuple(self.y_embedder.y_embedding.shape[1:])
        if y.ndim not in (3, 4) or y.shape[0] != B or tuple(y.shape[-1:]) != cap or (y.ndim == 4 and y.shape[1] != 1):
            raise ValueError(f"y must be [B, 1, L, {cap[0]}] with B = {B}; got {list(y.shape)}")
        if mask is not None:
            m = mask.squeeze(1).squeeze(1) if mask.ndim == 4 else mask
            if m.ndim != 2 or m.shape[1] != y.shape[-2] or m.shape[0] == 0 or B % m.shape[0]:
                raise ValueError(
                    f"mask must be [B', L] with L = {y.shape[-2]} caption tokens and B' dividing B = {B}; "
                    f"got {list(mask.shape)}"
                )

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, tokens={self.num_temporal}x{self.num_spatial}, "
            f"dtype={dtype_name(self.dtype)}"
        )


PREDICTION_TYPES = ("epsilon", "v_prediction")  # the output's meaning: eps (Open-Sora v1.0) or v = sqrt(ab) eps - sqrt(1-ab) x0
TEMPORAL_POS = ("attention", "tokens")  # where the temporal position embedding enters (see the module docstring)


def _check_arch(input_size, patch_size, hidden_size, depth, num_heads, temporal_pos_block) -> None:
    if len(input_size) != 3 or len(patch_size) != 3:
        raise ValueError(f"input_size and patch_size must be (T, H, W); got {input_size} and {patch_size}")
    if any(p <= 0 for p in patch_size) or any(s < p for s, p in zip(input_size, patch_size)):
        raise ValueError(f"patch_size {patch_size} must be positive and no larger than input_size {input_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin/cos position embedding)")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0 <= temporal_pos_block < depth:
        raise ValueError(f"temporal_pos_block {temporal_pos_block} must index a block (depth {depth})")
