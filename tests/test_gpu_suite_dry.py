"""bench/gpu_suite.sh --dry-run (the GPU suite's script at tiny shapes on the CPU) and the step-time model.

The dry run runs with the Python packages the GPU image lacks made unimportable (the image's package list is
in the device tool's KINDS.md), so the first GPU call cannot fail on a script bug or a missing import. Every
stage must write its JSON with sane content. Benchmarks are not timed here: only their output is checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import step_model as sm  # noqa: E402

# project dependencies installed here but absent from the GPU image (torch 2.11 / triton 3.6 "cuda" image); torch's
# own optional packages (optree, ...) are left alone: "None in sys.modules" is not what torch sees when absent
MISSING_ON_GPU_IMAGE = ("av", "diffusers", "imageio_ffmpeg", "mistral_common", "nvidia.dali", "tomli_w")
OPS = {"modulate", "residual_modulate", "spatial_attention", "temporal_attention", "gated_cross_attn"}


def _finite_pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    shim = tmp_path_factory.mktemp("gpu_image")
    (shim / "sitecustomize.py").write_text(f"import sys\nfor _m in {MISSING_ON_GPU_IMAGE!r}:\n    sys.modules[_m] = None\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(shim)}
    env.pop("OUT", None)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    log = (out / "suite.log").read_text() if (out / "suite.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"gpu_suite.sh --dry-run: {wall:.1f} s")
    return out, log


def _json(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    assert path.exists(), f"stage {name} wrote no {path.name}"
    return json.loads(path.read_text())


def test_dry_run_every_stage_reports(dry_run):
    out, log = dry_run
    s = _json(out, "summary")
    assert s["dry_run"] is True and s["env"]["git_sha"] and s["env"]["torch"]
    status = {st["stage"]: st["status"] for st in s["stages"]}
    for name in ("env", "kernel_tests", "bench_kernels", "bench_train", "bench_sample_nocompile"):
        assert status.get(name) == "ok", f"{name}: {status.get(name)}\n{log[-4000:]}"
    assert status.get("bench_sample") == "skipped"
    md = (out / "summary.md").read_text()
    assert "Training step" in md and "Kernel tests" in md and "Sampling" in md
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8  # the device tool returns at most 8 files


def test_dry_run_kernel_tests(dry_run):
    kt = _json(dry_run[0], "kernel_tests")
    assert kt["passed"] >= 3 and kt["failed"] == 0 and kt["errors"] == 0, kt
    files = {t["name"].split("::")[0] for t in kt["tests"]}
    assert {"tests.test_modulate", "tests.test_st_attention", "tests.test_gated_cross_attn"} <= files, files


def test_dry_run_bench_kernels(dry_run):
    bk = _json(dry_run[0], "bench_kernels")
    assert bk["env"]["git_sha"] and bk["env"]["device"]
    rows = bk["rows"]
    assert {r["op"] for r in rows} == OPS
    assert all(_finite_pos(r["ms_p50"]) and _finite_pos(r["gbps"]) for r in rows)
    assert {r["mode"] for r in rows} == {"fwd", "full"}


def test_dry_run_bench_train(dry_run):
    bt = _json(dry_run[0], "bench_train")
    assert bt["env"]["git_sha"] and bt["env"]["torch"] and bt["env"]["device"]
    rows = bt["rows"]
    assert [(r["model"], r["provider"], r["ac"], r["batch"]) for r in rows] == [
        ("xl2-tiny", "ref", "none", 2), ("xl2-tiny", "fused", "every-2", 2), ("grown-tiny", "fused", "full", 2)]
    for r in rows:
        assert "error" not in r, r.get("error")
        for k in ("ms_p50", "ms_mean", "samples_per_s", "tokens_per_s", "tflops", "peak_mem_gib", "pred_ms"):
            assert _finite_pos(r[k]), (k, r[k])
        assert 0 < r["mfu"] < 1 and 0 < r["pred_mfu"] < 1
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 4 * 16)  # tiny: 4 frames x 4x4 tokens
        assert r["samples_per_s"] == pytest.approx(r["batch"] / (r["ms_mean"] * 1e-3))
        assert r["flop_model_check"]["rel_diff_total"] == 0.0
        prof = r["profile"]["ms_per_step"]
        assert set(prof) == {"gemm", "attention", "glue", "optimizer", "ema", "data"}
        assert all(prof[c] > 0 for c in ("gemm", "attention", "glue", "optimizer", "ema")), prof
        pred = r["predicted"]["measured_ceilings"]
        assert _finite_pos(pred["step_ms"]) and set(pred["ms_by_category"]) == set(sm.CATEGORIES)
    xl2, grown = rows[0], rows[2]
    assert grown["params"] > 2 * xl2["params"] and grown["tflop_per_sample"] > 2 * xl2["tflop_per_sample"]


def test_dry_run_bench_sample(dry_run):
    bs = _json(dry_run[0], "bench_sample_nocompile")
    rows = bs["rows"]
    assert [(r["guidance"], r["provider"]) for r in rows] == [("two", "reference"), ("two", "accelerated")]
    assert all(_finite_pos(r["ms_p50"]) and r["steps"] == 100 for r in rows) and _finite_pos(rows[1]["speedup"])


# ------------------------------------------------------------------------------------------------------
# the step-time model
# ------------------------------------------------------------------------------------------------------
def _meta_models():
    from modelgrow.grow import add_llm_condition, expand
    from modelgrow.models import OPENSORA_V1_16x256x256, create_model

    with torch.device("meta"):
        xl2 = create_model("STDiT-XL/2", **OPENSORA_V1_16x256x256)
        grown = add_llm_condition(expand(xl2, "insert", ratio=1), 4096, 120)
    return {"xl2": xl2, "grown": grown}


def test_step_model_shapes_parameters_and_flops_match_the_models():
    from tests.test_flops import _counted_linear_flops

    for name, model in _meta_models().items():
        s = sm.model_shapes(name)
        assert sm.Shapes.from_config(model.config) == s
        assert s.parameters() == sum(p.numel() for p in model.parameters())
        # the forward GEMMs of the step model = the layers a forward calls = modelgrow.models.flops
        assert sm.forward_gemm_flops(s, 1) == _counted_linear_flops(model, B=2, L=120)
        chk = sm.check_against_flop_model(s)
        assert chk["linear"] == chk["linear_flop_model"] and chk["attention"] == chk["attention_flop_model"]
    assert sm.model_shapes("xl2").parameters() == 759_620_768


def test_step_model_predictions_are_consistent():
    s, h200, h100 = sm.model_shapes("xl2"), sm.DEVICES["H200"], sm.DEVICES["H100"]
    p = {prov: sm.predict(s, h200, prov, "none", 8) for prov in sm.PROVIDERS}
    assert p["ref"].step_ms > p["fused"].step_ms > p["compile"].step_ms
    cats = p["compile"].by_category()
    assert max(cats, key=cats.get) == "gemm" and all(v > 0 for v in cats.values())
    # GEMM time at the ceiling: 3 x forward linear FLOPs / 790 TFLOP/s (large products are compute bound)
    assert cats["gemm"] == pytest.approx(3 * sm.forward_gemm_flops(s, 8) / 790e12 * 1e3, rel=0.03)
    assert 0.3 < p["compile"].mfu < 0.8
    # activation checkpointing re-runs the forward: full AC adds ~one third of the GEMM time
    full = sm.predict(s, h200, "compile", "full", 8).by_category()["gemm"]
    assert full / cats["gemm"] == pytest.approx(4 / 3, rel=0.02)
    assert sm.predict(s, h100, "compile", "none", 8).step_ms > p["compile"].step_ms
    # per-step costs (optimizer, EMA) are amortised by the batch
    assert sm.predict(s, h200, "compile", "none", 16).mfu > p["compile"].mfu


def test_committed_predictions_are_current():
    """bench/results/predicted/ is what bench/step_model.py computes now (regenerate: python bench/step_model.py)."""
    committed = json.loads((ROOT / "bench" / "results" / "predicted" / "step_model.json").read_text())
    fresh = sm.committed_predictions()
    assert len(committed["predictions"]) == len(fresh)
    for c, (model, p) in zip(committed["predictions"], fresh, strict=True):
        assert (c["model"], c["device"], c["provider"], c["ac"], c["batch"]) == (model, p.device, p.provider, p.ac, p.batch)
        assert c["step_ms"] == pytest.approx(p.step_ms, rel=1e-9) and c["mfu"] == pytest.approx(p.mfu, rel=1e-9)
    md = (ROOT / "bench" / "results" / "predicted" / "step_model.md").read_text()
    assert md == sm.markdown(fresh)


def test_breakdown_categories():
    from bench_train import categorize

    assert categorize("sm90_xmma_gemm_bf16bf16_bf16f32", "aten::addmm | aten::linear", None) == "gemm"
    assert categorize("aten::mm", "aten::mm | st_attention_bwd", None) == "attention"  # the ref attention's own matmuls
    assert categorize("_st_attn_fwd_kernel", "mgkernels::st_attention", None) == "attention"
    assert categorize("pytorch_flash::flash_fwd_kernel", "aten::_scaled_dot_product_flash_attention", None) == "attention"
    assert categorize("vectorized_elementwise_kernel", "aten::add", None) == "glue"
    assert categorize("multi_tensor_apply_kernel", "aten::_foreach_lerp_", "ema") == "ema"
    assert categorize("multi_tensor_apply_kernel", "aten::_fused_adamw_ | optimizer.step#adamw.step", None) == "optimizer"
    assert categorize("Memcpy HtoD (Pageable -> Device)", "aten::copy_", None) == "data"
    assert categorize("aten::randn", "mg::data", "data") == "data"
