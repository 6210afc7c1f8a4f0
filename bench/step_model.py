"""Step-time model of STDiT training: FLOPs and bytes of every component, a device's ceilings -> predicted
step time, per-component time and MFU. Printed beside every ``bench_train`` measurement, so a GPU run shows
at once where time goes versus where it should go.

    python bench/step_model.py                       # XL/2 and grown 1.5B on H100 / H200 -> bench/results/predicted/
    python bench/step_model.py --model xl2 --device H200 --provider compile --ac full --batch 16

What is modelled (one optimizer step, ``batch`` samples, bf16 autocast over fp32 parameters, world size 1 --
exactly what ``Trainer.train_step`` runs):

* **gemm** -- every linear (and the patch-embedding conv) forward, dX and dW products: roofline per product,
  ``max(flops / gemm_ceiling, bytes / copy_bw)``. The forward FLOPs equal ``modelgrow.models.flops`` (the MFU
  FLOP model) to the FLOP (checked by ``check_against_flop_model`` and tests/test_gpu_suite_dry.py).
* **attention** -- spatial (seq S), temporal (seq T) and the cross-attentions (L caption / LLM tokens):
  ``max(flops / (eff x gemm_ceiling), bytes / copy_bw)``; the reference provider's backward is the explicit
  fp32 math of ``st_attention_ref`` (fp32 SIMT ceiling, the score matrix through memory).
* **glue** -- every memory-bound kernel of a block (norm + modulation, autocast casts, gated residual adds,
  GELU, layout copies), bytes per token counted per provider: ``ref`` (the PyTorch references), ``fused``
  (mgkernels' fused ops, the rest eager) and ``compile`` (fused ops + inductor fusing the remaining
  elementwise chains per block). The residual stream is fp32 under autocast (the fp32 position embedding
  promotes it), matmul inputs/outputs bf16.
* **weights** -- autocast's fp32 -> bf16 weight casts each forward (and recompute) and the bf16 -> fp32
  weight-gradient casts.
* **optimizer** -- ``clip_grad_norm_`` (foreach norm + scale) and fused AdamW: 40 bytes per parameter.
* **ema** -- ``torch._foreach_lerp_`` of the fp32 shadow: 12 bytes per parameter.
* **data** -- host -> device copies of the batch and of the per-sample noise/timesteps (PCIe ceiling).
* activation checkpointing re-runs the forward of the checkpointed blocks inside backward.

Kernels are assumed back to back (no launch gaps, no host stalls): the measured minus the predicted time is
the overhead to hunt. Device ceilings: ``H200`` measured on this project's machine (788 TFLOP/s for an
8192^3 bf16 matmul, 4.3 TB/s device-to-device copy); ``H100`` (SXM) are datasheet-derived leads (989 dense
bf16 TFLOP/s -> ~660 achieved on GEMMs, 3.35 TB/s HBM3 -> ~3.0 TB/s copy), to be replaced by a measurement.
Attention efficiencies (fraction of the GEMM ceiling a flash-style kernel reaches at head dim 72) are leads
too. MFU = ``modelgrow.models.flops`` FLOPs (3 x forward) / step time / the device table's dense bf16 peak
(``modelgrow.train.metrics.PEAK_BF16_TFLOPS``, 989 for H100/H200).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelgrow.models.flops import stdit_flops  # noqa: E402
from modelgrow.models.zoo import PRESETS, OPENSORA_V1_16x256x256  # noqa: E402
from modelgrow.train.metrics import PEAK_BF16_TFLOPS  # noqa: E402
from modelgrow.train.parallelize import checkpointed_blocks  # noqa: E402

PROVIDERS = ("ref", "fused", "compile")
CATEGORIES = ("gemm", "attention", "glue", "weights", "optimizer", "ema", "data")


# ------------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceCeilings:
    name: str
    gemm_tflops: float  # achieved dense bf16 GEMM throughput (large products)
    copy_tbps: float  # achieved device-to-device copy (bytes read + written per second)
    peak_tflops: float | None  # MFU denominator: datasheet dense bf16 (the trainer's device table)
    fp32_tflops: float  # fp32 SIMT matmul (the reference attention backward)
    attn_fwd_eff: float = 0.45  # flash-style attention forward, fraction of gemm_tflops (head dim 72)
    attn_bwd_eff: float = 0.35  # its backward
    h2d_gbps: float = 25.0  # host -> device copies
    source: str = ""


DEVICES: dict[str, DeviceCeilings] = {
    "H200": DeviceCeilings("H200", 790.0, 4.3, PEAK_BF16_TFLOPS["H200"], 50.0,
                           source="measured on this project's H200: 788 TFLOP/s bf16 8192^3 matmul, 4.3 TB/s d2d copy; "
                                  "attention efficiencies, fp32 and PCIe are leads"),
    "H100": DeviceCeilings("H100 SXM", 660.0, 3.0, PEAK_BF16_TFLOPS["H100"], 45.0,
                           source="datasheet-derived leads (989 TFLOP/s dense bf16 -> ~660 achieved, 3.35 TB/s HBM3 -> "
                                  "~3.0 TB/s copy), not measured"),
}


def device_key(name: str) -> str | None:
    """'NVIDIA H200' -> 'H200' (a row of DEVICES), else None."""
    for key in DEVICES:
        if key in name:
            return key
    return None


def measured_ceilings(name: str, gemm_tflops: float, copy_gbps: float, peak_tflops: float | None = None) -> DeviceCeilings:
    """Ceilings measured in the same run (any device, a CPU too): GEMM and copy as measured, fp32 = GEMM
    ceiling when the run is fp32, attention efficiencies kept from the table row of the same GPU if any."""
    base = DEVICES.get(device_key(name) or "", None)
    eff = {} if base is None else {"attn_fwd_eff": base.attn_fwd_eff, "attn_bwd_eff": base.attn_bwd_eff, "h2d_gbps": base.h2d_gbps}
    return DeviceCeilings(name, gemm_tflops, copy_gbps / 1e3, peak_tflops, min(gemm_tflops, base.fp32_tflops) if base else gemm_tflops,
                          source="measured in this run (matmul peak, copy bandwidth)", **eff)


# ------------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    depth: int
    hidden: int
    heads: int
    T: int  # latent frames / patch_t
    S: int  # tokens per frame
    L: int  # T5 tokens
    caption_channels: int
    L_llm: int = 0  # LLM tokens (0: no LLM condition)
    llm_channels: int = 0
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)
    pred_sigma: bool = True
    input_size: tuple[int, int, int] = (16, 32, 32)

    @property
    def N(self) -> int:
        return self.T * self.S

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.pred_sigma else 1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shapes:
        """From an STDiT ``model.config`` (a grown one too)."""
        inp, p = tuple(config["input_size"]), tuple(config["patch_size"])
        return cls(depth=config["depth"], hidden=config["hidden_size"], heads=config["num_heads"], T=inp[0] // p[0],
                   S=(inp[1] // p[1]) * (inp[2] // p[2]), L=config["model_max_length"], caption_channels=config["caption_channels"],
                   L_llm=config.get("llm_max_length", 0) if config.get("llm_channels") else 0,
                   llm_channels=config.get("llm_channels") or 0, mlp_ratio=config["mlp_ratio"],
                   in_channels=config["in_channels"], patch=p, pred_sigma=config["pred_sigma"], input_size=inp)

    def stdit_config(self) -> dict[str, Any]:
        """Keyword arguments of ``modelgrow.models.flops.stdit_flops`` for these shapes."""
        return dict(hidden_size=self.hidden, depth=self.depth, input_size=self.input_size, patch_size=self.patch,
                    in_channels=self.in_channels, caption_channels=self.caption_channels, caption_tokens=self.L,
                    mlp_ratio=self.mlp_ratio, pred_sigma=self.pred_sigma, llm_tokens=self.L_llm,
                    llm_channels=self.llm_channels or None)

    def parameters(self) -> int:
        """Trainable parameters (analytic; STDiT-XL/2 at 16x256x256 = 759,620,768)."""
        C, hid = self.hidden, int(self.hidden * self.mlp_ratio)
        lin = lambda i, o: i * o + o  # noqa: E731
        block = 2 * (lin(C, 3 * C) + lin(C, C)) + lin(C, C) + lin(C, 2 * C) + lin(C, C) + lin(C, hid) + lin(hid, C) + 6 * C
        if self.L_llm:
            block += lin(C, C) + lin(C, 2 * C) + lin(C, C) + 1
        emb = lin(self.in_channels * math.prod(self.patch), C) + lin(256, C) + lin(C, C) + lin(C, 6 * C)
        emb += lin(self.caption_channels, C) + lin(C, C)
        if self.L_llm:
            emb += lin(self.llm_channels, C) + lin(C, C)
        final = lin(C, math.prod(self.patch) * self.out_channels) + 2 * C
        return self.depth * block + emb + final


def model_shapes(name: str) -> Shapes:
    """'xl2' (STDiT-XL/2 16x256x256) or 'grown' (XL/2 grown by insert k=1 + the LLM condition, L=120x4096)."""
    p, o = PRESETS["STDiT-XL/2"], OPENSORA_V1_16x256x256
    base = Shapes(depth=p["depth"], hidden=p["hidden_size"], heads=p["num_heads"], T=o["input_size"][0],
                  S=(o["input_size"][1] // 2) * (o["input_size"][2] // 2), L=o["model_max_length"],
                  caption_channels=o["caption_channels"], input_size=tuple(o["input_size"]))
    if name == "xl2":
        return base
    if name == "grown":
        return replace(base, depth=2 * base.depth, L_llm=120, llm_channels=4096)
    raise ValueError(f"unknown model {name!r}: xl2 or grown")


# ------------------------------------------------------------------------------------------------------
# components
# ------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    name: str
    category: str
    flops: float = 0.0
    bytes: float = 0.0
    ms: float = 0.0
    bound: str = ""


@dataclass
class Prediction:
    device: str
    provider: str
    ac: str
    batch: int
    params: int
    items: list[Item] = field(default_factory=list)
    model_flops: float = 0.0  # modelgrow.models.flops per step (3 x forward x batch)
    peak_tflops: float | None = None
    gemm_tflops: float = 0.0

    @property
    def step_ms(self) -> float:
        return sum(i.ms for i in self.items)

    def by_category(self) -> dict[str, float]:
        out = {c: 0.0 for c in CATEGORIES}
        for i in self.items:
            out[i.category] += i.ms
        return out

    @property
    def tflops(self) -> float:
        return self.model_flops / (self.step_ms * 1e-3) / 1e12

    @property
    def mfu(self) -> float | None:
        return self.tflops / self.peak_tflops if self.peak_tflops else None

    mem_gib: float = 0.0  # rough lead: fp32 params + grads + AdamW + EMA, plus saved activations

    def summary(self) -> dict[str, Any]:
        return {"device": self.device, "provider": self.provider, "ac": self.ac, "batch": self.batch, "params": self.params,
                "mem_gib_est": self.mem_gib,
                "step_ms": self.step_ms, "samples_per_s": self.batch / (self.step_ms * 1e-3), "tflops": self.tflops,
                "mfu": self.mfu, "mfu_of_gemm_ceiling": self.tflops / self.gemm_tflops,
                "ms_by_category": self.by_category(), "model_tflop_per_step": self.model_flops / 1e12}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "items": [asdict(i) for i in self.items]}


def _roof(item: Item, tflops: float, tbps: float) -> Item:
    t_c = item.flops / (tflops * 1e12) if item.flops else 0.0
    t_m = item.bytes / (tbps * 1e12) if item.bytes else 0.0
    item.ms = 1e3 * max(t_c, t_m)
    item.bound = "compute" if t_c >= t_m else "memory"
    return item


def gemms(s: Shapes, B: int) -> list[tuple[str, int, int, int, bool, float]]:
    """Every matrix product of one forward: (name, M, K, N, needs dX, count per forward)."""
    C, hid, M = s.hidden, int(s.hidden * s.mlp_ratio), B * s.N
    per_block = [("attn.qkv", M, C, 3 * C), ("attn.proj", M, C, C), ("attn_temp.qkv", M, C, 3 * C), ("attn_temp.proj", M, C, C),
                 ("cross_attn.q_linear", M, C, C), ("cross_attn.kv_linear", B * s.L, C, 2 * C), ("cross_attn.proj", M, C, C),
                 ("mlp.fc1", M, C, hid), ("mlp.fc2", M, hid, C)]
    if s.L_llm:
        per_block += [("llm_cross_attn.q_linear", M, C, C), ("llm_cross_attn.kv_linear", B * s.L_llm, C, 2 * C),
                      ("llm_cross_attn.proj", M, C, C)]
    out = [(f"blocks.{n}", m, k, n_, True, float(s.depth)) for n, m, k, n_ in per_block]
    P = math.prod(s.patch)
    out += [("x_embedder", M, s.in_channels * P, C, False, 1.0), ("t_embedder.0", B, 256, C, False, 1.0),
            ("t_embedder.2", B, C, C, True, 1.0), ("t_block", B, C, 6 * C, True, 1.0),
            ("y_embedder.fc1", B * s.L, s.caption_channels, C, False, 1.0), ("y_embedder.fc2", B * s.L, C, C, True, 1.0),
            ("final_layer", M, C, P * s.out_channels, True, 1.0)]
    if s.L_llm:
        out += [("llm_embedder.fc1", B * s.L_llm, s.llm_channels, C, False, 1.0), ("llm_embedder.fc2", B * s.L_llm, C, C, True, 1.0)]
    return out


def forward_gemm_flops(s: Shapes, B: int = 1) -> float:
    return sum(2.0 * m * k * n * c for _, m, k, n, _, c in gemms(s, B))


def check_against_flop_model(s: Shapes) -> dict[str, float]:
    """This model's forward FLOPs per sample vs ``modelgrow.models.flops.stdit_flops`` (must agree)."""
    ref = stdit_flops(**s.stdit_config())
    ours_lin = forward_gemm_flops(s, 1)
    ours_attn = s.depth * (4.0 * s.T * s.S * s.S * s.hidden + 4.0 * s.S * s.T * s.T * s.hidden
                           + 4.0 * s.N * (s.L + s.L_llm) * s.hidden)
    return {"linear": ours_lin, "linear_flop_model": ref.linear, "attention": ours_attn, "attention_flop_model": ref.attention,
            "rel_diff_total": (ours_lin + ours_attn - ref.total) / ref.total}


# bytes per token, in units of C, of the memory-bound glue of one block: (name, fwd, bwd) as functions of
# a = residual-stream bytes (4: fp32 under autocast) and h = activation bytes (2: bf16)
def glue_ops(provider: str, llm: bool, a: int = 4, h: int = 2, mlp_ratio: float = 4.0) -> list[tuple[str, float, float]]:
    r = mlp_ratio
    gate_add_eager = [("gate*branch (fp32 out)", h + a, 2 * a + 2 * h), ("residual add", 3 * a, 3 * a)]
    cast = lambda what: (f"autocast cast {what}", a + h, h + a + 3 * a)  # noqa: E731  (bwd: cast back + dx accumulation)
    ops: list[tuple[str, float, float]] = []
    if provider == "ref":
        ops += [("layer_norm + modulate (3 kernels)", 6 * a, 12 * a), cast("x_m -> qkv"),
                ("spatial attn layout copies (to/from groups)", 3 * h + 3 * h + 2 * h, 6 * h + 6 * h)]
        ops += gate_add_eager + [cast("x -> temporal qkv"), ("temporal attn layout copies", 8 * h, 12 * h)] + gate_add_eager
    elif provider == "fused":
        ops += [("modulate (fused)", 2 * a, 3 * a), cast("x_m -> qkv")] + gate_add_eager + [cast("x -> temporal qkv")] + gate_add_eager
    elif provider == "compile":
        ops += [("modulate (fused)", 2 * a, 3 * a), ("cast x_m -> qkv", a + h, h + a),
                ("gate-add + cast (inductor)", 2 * a + 2 * h, 4 * a + 3 * h), ("gate-add + cast (inductor)", 2 * a + 2 * h, 4 * a + 3 * h)]
    else:
        raise ValueError(f"unknown provider {provider!r}")
    conds = ["cross"] + (["llm cross"] if llm else [])
    for i, c in enumerate(conds):
        if provider != "compile":
            ops.append(cast(f"x -> {c} q"))
        if provider == "ref":  # the reference's masked SDPA output: where(has_key) + transpose/reshape copy
            ops += [(f"{c}: where(has_key) + transpose/reshape copy", 4 * h, 4 * h)]
        last = i == len(conds) - 1
        if not last:  # x = x + cross(x) before the LLM cross-attention
            ops.append((f"{c}: residual add", h + 2 * a, 3 * a))
    if provider == "ref":
        ops.append(("residual add + layer_norm + modulate (ref)", (a + h + 2 * a) + 6 * a, 2 * (9 * a + h)))
    else:
        ops.append(("residual_modulate (fused)", 3 * a + h, 4 * a + 2 * h))
    if provider == "compile":
        ops += [("cast x_m -> fc1", a + h, h + a), ("GELU (+cast)", 2 * r * h, 3 * r * h), ("gate-add (inductor)", 3 * a + h, 4 * a + 2 * h)]
    else:
        ops += [cast("x_m -> fc1"), ("GELU tanh", 2 * r * h, 3 * r * h)] + gate_add_eager
    return ops


def predict(s: Shapes, dev: DeviceCeilings, provider: str = "fused", ac: str = "none", batch: int = 8,
            dtype_bytes: int = 2, resid_bytes: int = 4) -> Prediction:
    """Predicted component times of one training step (see the module docstring)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")
    B, C, h = batch, s.hidden, dtype_bytes
    M = B * s.N
    recompute = len(checkpointed_blocks(ac, s.depth)) / s.depth  # fraction of block forwards run twice
    P = s.parameters()
    pred = Prediction(dev.name, provider, ac, B, P, peak_tflops=dev.peak_tflops, gemm_tflops=dev.gemm_tflops,
                      model_flops=stdit_flops(**s.stdit_config()).per_step(training=True) * B)
    roof = lambda it: _roof(it, dev.gemm_tflops, dev.copy_tbps)  # noqa: E731
    items = pred.items

    # GEMMs: forward (+ recompute of checkpointed blocks), dX, dW
    for name, m, k, n, needs_dx, count in gemms(s, B):
        rep = count * (1 + recompute) if name.startswith("blocks.") else count
        f = 2.0 * m * k * n
        by = h * (m * k + k * n + m * n)
        it = roof(Item(f"{name} fwd", "gemm", f, by))
        it.flops, it.bytes, it.ms = f * rep, by * rep, it.ms * rep
        items.append(it)
        for kind in (["dX"] if needs_dx else []) + ["dW"]:
            it = roof(Item(f"{name} {kind}", "gemm", f, by))
            it.flops, it.bytes, it.ms = f * count, by * count, it.ms * count
            items.append(it)

    # attention
    H, D = s.heads, C // s.heads
    fwd_mult = 1 + recompute
    for mode, groups, seq in (("spatial", B * s.T * H, s.S), ("temporal", B * s.S * H, s.T)):
        f = 4.0 * groups * seq * seq * D * s.depth
        by = (3 + 1) * M * C * h * s.depth
        it = _roof(Item(f"{mode} attention fwd", "attention", f, by), dev.gemm_tflops * dev.attn_fwd_eff, dev.copy_tbps)
        it.flops, it.bytes, it.ms = it.flops * fwd_mult, it.bytes * fwd_mult, it.ms * fwd_mult
        items.append(it)
        if provider == "ref":  # explicit fp32 math: scores, softmax, dP, dS through memory
            scores = groups * seq * seq * 4.0 * s.depth
            it = _roof(Item(f"{mode} attention bwd (fp32 ref)", "attention", 2.5 * f, 8 * scores + (8 + 8 * 2) * M * C * s.depth),
                       dev.fp32_tflops, dev.copy_tbps)
        else:
            it = _roof(Item(f"{mode} attention bwd", "attention", 2.5 * f, (3 + 1 + 1 + 3) * M * C * h * s.depth),
                       dev.gemm_tflops * dev.attn_bwd_eff, dev.copy_tbps)
        items.append(it)
    for c, Lc in (("cross", s.L),) + ((("llm cross", s.L_llm),) if s.L_llm else ()):
        f = 4.0 * M * Lc * C * s.depth
        by = (2 * M * C + 2 * B * Lc * C) * h * s.depth
        it = _roof(Item(f"{c} attention fwd", "attention", f, by), dev.gemm_tflops * dev.attn_fwd_eff, dev.copy_tbps)
        it.flops, it.bytes, it.ms = it.flops * fwd_mult, it.bytes * fwd_mult, it.ms * fwd_mult
        items.append(it)
        items.append(_roof(Item(f"{c} attention bwd", "attention", 2.5 * f, 2 * by), dev.gemm_tflops * dev.attn_bwd_eff, dev.copy_tbps))

    # glue (per block, bytes per token x C)
    fwd_units = bwd_units = 0.0
    for _, fu, bu in glue_ops(provider, bool(s.L_llm), resid_bytes, h, s.mlp_ratio):
        fwd_units += fu
        bwd_units += bu
    per = M * C * s.depth
    items.append(roof(Item("block glue fwd", "glue", 0.0, fwd_units * per * fwd_mult)))
    items.append(roof(Item("block glue bwd", "glue", 0.0, bwd_units * per)))
    # embedders / head glue: patch-embed + pos-embed add, final norm/modulate, unpatchify, loss (MSE + VB)
    head = 10 * resid_bytes * M * C  # pos-embed add, final norm + modulate, fwd and bwd (~10 passes of the stream)
    head += 6 * 4 * M * math.prod(s.patch) * s.out_channels  # [B, 8, T, H, W] fp32 output: unpatchify, loss terms
    items.append(roof(Item("embedders / final layer / loss glue", "glue", 0.0, head)))

    # weights: autocast casts (fwd + recompute) and weight-gradient casts
    lin_params = P  # nearly every parameter is a linear weight
    items.append(roof(Item("autocast weight casts fp32->bf16", "weights", 0.0, (4 + h) * lin_params * (1 + recompute))))
    items.append(roof(Item("weight-grad casts bf16->fp32", "weights", 0.0, (h + 4) * lin_params)))
    # optimizer and EMA
    items.append(roof(Item("clip_grad_norm (foreach norm + scale)", "optimizer", 0.0, 12.0 * P)))
    items.append(roof(Item("AdamW (fused)", "optimizer", 0.0, 28.0 * P)))
    items.append(roof(Item("EMA foreach_lerp", "ema", 0.0, 12.0 * P)))
    # data: batch + noise + timesteps host -> device
    h2d = B * (2 * s.in_channels * math.prod(s.input_size) * 4 + s.L * s.caption_channels * 4 + s.L_llm * s.llm_channels * 4)
    it = Item("batch + noise host->device", "data", 0.0, h2d)
    it.ms, it.bound = 1e3 * h2d / (dev.h2d_gbps * 1e9), "pcie"
    items.append(it)
    pred.mem_gib = memory_gib_estimate(s, batch, ac)
    return pred


def memory_gib_estimate(s: Shapes, batch: int, ac: str = "none") -> float:
    """Rough peak memory (a lead, not a measurement): 20 bytes per parameter (fp32 weights, grads, AdamW m/v,
    EMA) plus the activations autograd saves: ~66 bytes x C per token per block under autocast (~76 with the
    LLM cross-attention: the fp32 residual stream, bf16 casts, qkv, attention outputs, the 4C MLP hidden twice),
    a checkpointed block keeping only its fp32 input."""
    per_block = (76 if s.L_llm else 66) * s.hidden * s.N * batch
    n_ckpt = len(checkpointed_blocks(ac, s.depth))
    act = (s.depth - n_ckpt) * per_block + n_ckpt * 4 * s.hidden * s.N * batch + per_block  # + one block recomputing
    return (20 * s.parameters() + act) / 2**30


# ------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------
def category_table(pred: Prediction, measured_ms: dict[str, float] | None = None, fold_weights: bool = False) -> list[dict[str, Any]]:
    """One row per category: predicted ms and share (and measured ms where given). ``fold_weights`` counts the
    weight casts as glue (a profile cannot tell autocast's weight casts from its activation casts)."""
    rows = []
    total = pred.step_ms
    fold = (lambda c: "glue" if c == "weights" else c) if fold_weights else (lambda c: c)  # noqa: E731
    cats: dict[str, float] = {}
    for cat, ms in pred.by_category().items():
        cats[fold(cat)] = cats.get(fold(cat), 0.0) + ms
    for cat, ms in cats.items():
        flops = sum(i.flops for i in pred.items if fold(i.category) == cat)
        by = sum(i.bytes for i in pred.items if fold(i.category) == cat)
        row = {"component": cat + (" (+weight casts)" if fold_weights and cat == "glue" else ""), "pred_ms": ms,
               "pred_pct": 100 * ms / total, "tflop": flops / 1e12, "gbytes": by / 1e9}
        if measured_ms is not None:
            row["meas_ms"] = measured_ms.get(cat, 0.0)
            row["meas/pred"] = row["meas_ms"] / ms if ms else float("nan")
        rows.append(row)
    return rows


def markdown(preds: list[tuple[str, Prediction]]) -> str:
    lines = ["# Predicted training step (bench/step_model.py)", "",
             "One optimizer step, bf16 autocast over fp32 parameters, one GPU. Components are rooflines at the "
             "device's ceilings (kernels back to back: no launch gaps, no host stalls); MFU = modelgrow.models.flops "
             "FLOPs (3 x forward) / step time / dense bf16 peak of the device table (989 TFLOP/s for H100 and H200). "
             "Memory is a rough count (20 B/parameter + saved activations): rows above ~135 GiB (H200) or ~75 GiB "
             "(H100 80 GB) do not fit as configured and are listed for the time they would take.", ""]
    for dev in DEVICES.values():
        lines.append(f"- **{dev.name}**: GEMM {dev.gemm_tflops:.0f} TFLOP/s, copy {dev.copy_tbps:.1f} TB/s, attention "
                     f"{dev.attn_fwd_eff:.0%} / {dev.attn_bwd_eff:.0%} of GEMM (fwd / bwd), fp32 {dev.fp32_tflops:.0f} TFLOP/s "
                     f"-- {dev.source}")
    lines += ["", "## Summary", "",
              "| model | device | provider | AC | batch | params | step ms | samples/s | TFLOP/s | MFU | of GEMM ceiling | memory (rough) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, p in preds:
        s = p.summary()
        lines.append(f"| {model} | {p.device} | {p.provider} | {p.ac} | {p.batch} | {p.params / 1e9:.3f} B | {s['step_ms']:.1f} | "
                     f"{s['samples_per_s']:.2f} | {s['tflops']:.0f} | {100 * (s['mfu'] or 0):.1f}% | {100 * s['mfu_of_gemm_ceiling']:.1f}% | "
                     f"{s['mem_gib_est']:.0f} GiB |")
    for model, p in preds:
        if p.provider != "compile" or p.ac != "none":
            continue
        lines += ["", f"## {model} on {p.device}: components (provider {p.provider}, AC {p.ac}, batch {p.batch})", "",
                  "| component | ms | share | TFLOP | GB |", "|---|---|---|---|---|"]
        for r in category_table(p):
            lines.append(f"| {r['component']} | {r['pred_ms']:.2f} | {r['pred_pct']:.1f}% | {r['tflop']:.2f} | {r['gbytes']:.1f} |")
    return "\n".join(lines) + "\n"


def committed_predictions(batch: int = 8) -> list[tuple[str, Prediction]]:
    out = []
    for model in ("xl2", "grown"):
        s = model_shapes(model)
        for key in ("H200", "H100"):
            for provider in PROVIDERS:
                for ac in ("none", "every-2", "full"):
                    if provider != "compile" and ac != "none":
                        continue
                    out.append((model, predict(s, DEVICES[key], provider, ac, batch)))
            if model == "grown":  # what fits one H200 without activation checkpointing
                out.append((model, predict(s, DEVICES[key], "compile", "none", batch // 2)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["xl2", "grown"], default=None, help="one prediction instead of the committed tables")
    ap.add_argument("--device", choices=list(DEVICES), default="H200")
    ap.add_argument("--provider", choices=PROVIDERS, default="compile")
    ap.add_argument("--ac", default="none")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "predicted"))
    args = ap.parse_args(argv)
    from utils import print_table  # noqa: E402

    if args.model:
        s = model_shapes(args.model)
        p = predict(s, DEVICES[args.device], args.provider, args.ac, args.batch)
        print(json.dumps(p.summary(), indent=1))
        print_table(category_table(p), ["component", "pred_ms", "pred_pct", "tflop", "gbytes"])
        print("FLOP model check:", check_against_flop_model(s))
        return 0
    preds = committed_predictions()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = {m: check_against_flop_model(model_shapes(m)) for m in ("xl2", "grown")}
    (out / "step_model.json").write_text(json.dumps(
        {"devices": {k: asdict(v) for k, v in DEVICES.items()}, "flop_model_check": checks,
         "predictions": [{"model": m, **p.to_json()} for m, p in preds]}, indent=1) + "\n")
    (out / "step_model.md").write_text(markdown(preds))
    print((out / "step_model.md").read_text())
    print("wrote", out / "step_model.json", "and", out / "step_model.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
