"""Golden loss (torchtitan style): 20 optimizer steps of a tiny STDiT through the Trainer that
``modelgrow train`` runs (IDDPM loss, condition dropout, AdamW + warm-up, clipping, EMA) on the
deterministic random-latent stream, with a fixed seed; the loss sequence is pinned to
``tests/golden/loss_stdit_tiny.json``. Any change to the training math (loss terms, timestep or noise
draws, dropout, optimizer, schedule, model init or forward) moves these numbers and fails here.

Tolerance: fp32 on CPU; the only legitimate differences are summation-order effects of other BLAS / SIMD
code paths (MKL/oneDNN pick kernels by CPU), which stay below 1e-6 relative per op and compound to ~1e-5
over 20 steps of a model this small; a real change of the math moves the losses by >= 1e-3 relative.
Regenerate after an intended change: ``MG_REGEN_GOLDEN=1 pytest tests/test_golden_loss.py`` (and say why in
the commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelgrow.config import load_config
from modelgrow.train import RandomLatentLoader, Trainer

GOLDEN = Path(__file__).parent / "golden" / "loss_stdit_tiny.json"
STEPS = 20


def _losses(tmp_path) -> list[float]:
    cfg = load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.steps", str(STEPS), "--train.log_every", "1",
        "--train.output_dir", str(tmp_path / "run"), "--train.mixed_precision", "fp32", "--train.seed", "7",
        "--checkpoint.every_steps", "1000", "--optim.lr", "1e-3", "--optim.warmup_steps", "5",
        "--parallel.param_dtype", "float32"])
    loader = RandomLatentLoader(2, (4, 4, 8, 8), (8, 32), seed=11)
    return [m["loss"] for m in Trainer(cfg, loader=loader, log=lambda *_: None).fit()]


def test_loss_sequence_matches_golden(tmp_path):
    losses = _losses(tmp_path)
    assert len(losses) == STEPS
    if os.environ.get("MG_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"steps": STEPS, "loss": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["loss"]
    assert losses == pytest.approx(golden, rel=1e-4, abs=1e-7)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])  # and it trains (per-step losses are noisy: random t)
