"""experiments/study_continual.py --quick: the harness runs the requested arms x seeds from a (quick) base bundle,
reuses finished arms and tabulates mean +- std; it does not check the paper's claims (that is the committed run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_runs_arms_by_seed_and_reuses_them(tmp_path):
    cmd = [sys.executable, "experiments/study_continual.py", "--quick", "--work", str(tmp_path / "w"), "--results",
           str(tmp_path / "res"), "--seeds", "0,1", "--other-seeds", "", "--arms", "vanilla,expand+llm,lora-nope"]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown arm(s) ['lora-nope']" in bad.stderr
    assert not (tmp_path / "w" / "study_size.json").exists()  # a refused invocation leaves nothing behind
    bad = subprocess.run(cmd[:-1] + ["vanilla", "--set", "high_noise_shar=0.4"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "--set 'high_noise_shar=0.4': expected KEY=VALUE" in bad.stderr
    cmd[-1] = "vanilla,expand+llm,expand-prefix-k1"  # prefix is not a main arm: --other-seeds "" skips it
    cmd += ["--set", "high_noise_share=0.4"]  # a DemoSize override reaches every arm's training config
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads((tmp_path / "res" / "quick" / "study_continual.json").read_text())
    got = sorted((row["arm"], row["seed"]) for row in out["rows"])
    assert got == [("base", 0), ("expand+llm", 0), ("expand+llm", 1), ("vanilla", 0), ("vanilla", 1)]
    assert out["size"]["high_noise_share"] == 0.4
    for arm in ("vanilla-seed1", "expand+llm-seed0"):
        assert "high_noise_share = 0.4" in (tmp_path / "w" / "study" / arm / "run" / "config.toml").read_text()
    for row in out["rows"]:
        for mode, sem in row["semantic"].items():
            assert set(sem) == {"A", "B"} and set(sem["A"]) == {"shape", "color", "direction", "background",
                                                                 "semantic_score"}, (row["arm"], mode)
    assert set(next(r for r in out["rows"] if r["arm"] == "expand+llm")["semantic"]) == {"S", "L", "SL"}
    md = (tmp_path / "res" / "quick" / "study_continual.md").read_text()
    assert "| vanilla | S | 2 |" in md and "±" in md
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[study]" in again.stdout
    assert json.loads((tmp_path / "res" / "quick" / "study_continual.json").read_text())["rows"] == out["rows"]
