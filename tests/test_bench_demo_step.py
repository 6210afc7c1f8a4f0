"""bench/bench_demo_step.py times the demo's own model: one row per setting, written as JSON with the environment,
and the model it builds has the shipped base bundle's parameter count."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_demo_step_writes_rows_for_the_demo_model(tmp_path):
    r = subprocess.run([sys.executable, "bench/bench_demo_step.py", "--patch", "2", "--grown", "0", "--threads", "1",
                        "--dtype", "float32,bfloat16", "--route", "eager,custom-op", "--compile", "none", "--batch", "2", "--steps", "1", "--rounds", "2",
                        "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "bench_demo_step.json").read_text())
    assert out["env"]["git_sha"] and [(row["route"], row["dtype"]) for row in out["rows"]] == [
        ("eager", "float32"), ("eager", "bfloat16"), ("custom-op", "float32"), ("custom-op", "bfloat16")]
    base = json.loads((ROOT / "modelgrow/assets/demo_base/base.json").read_text())
    assert all(row["params"] == base["params"] and row["ms_per_step"] >= row["ms_min"] > 0 and row["rounds"] == 2
               and row["compile"] == "none" for row in out["rows"])
