"""The project's parallelize() (activation checkpointing -> FSDP2 per block + root) composes with the fused
custom ops: 2 ranks under torchrun (gloo, CPU), gradients equal to the plain model's."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("policy", ["full", "every-2"])
def test_parallelize_fsdp2_and_checkpointing_match_plain_model(policy):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "tests.fsdp_worker", policy]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["max_grad_diff"] <= 1e-6
    assert "fsdp" in out["applied"] and out["applied"]["fsdp"]["compute_dtype"] == "float32"
    depth = 2  # STDiT-tiny
    assert out["applied"]["activation_checkpointing"] == (list(range(depth)) if policy == "full" else [0])
