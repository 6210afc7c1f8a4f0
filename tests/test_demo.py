"""`modelgrow demo --quick`: every stage runs at a minimal size and produces every artefact; a re-run reuses
finished stages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_produces_every_artefact(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "modelgrow", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("data", "encoders", "vae", "cache", "pretrain", "grow", "continual", "evaluate", "report"):
        assert (out / stage / "DONE").exists(), stage
    report = (out / "report.md").read_text()
    for needle in ("Held-out denoising loss", "Semantic score", "function preservation", "parameters"):
        assert needle in report
    assert (out / "loss_curves.png").stat().st_size > 0 and (out / "contact_sheet.png").stat().st_size > 0
    ev = json.loads((out / "evaluate" / "DONE").read_text())
    assert {s["model"] for s in ev["samples"]} == {"base", "continual"}
    for s in ev["samples"]:
        assert (out / "evaluate" / s["video"]).stat().st_size > 0 and (out / "evaluate" / s["keyframes"]).exists()
    grow = json.loads((out / "grow" / "DONE").read_text())
    assert grow["depth"][1] == 2 * grow["depth"][0] and grow["max_abs_diff"] <= 1e-6
    again = subprocess.run([sys.executable, "-m", "modelgrow", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 9
