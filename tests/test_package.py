"""The package imports with and without the compiled extension; the CLI works end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import mgkernels
from modelgrow.models import STDiT, from_pretrained

from .helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, check=True):
    env = {**os.environ, **(env_extra or {})}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_import_without_extension():
    r = _run(["-c", "import modelgrow, mgkernels; print(mgkernels.ext_available(), mgkernels.ext_error())"],
             {"MG_NO_EXT": "1"})
    assert r.stdout.split()[0] == "False" and "MG_NO_EXT" in r.stdout


def test_runs_without_triton(tmp_path):
    """Triton is optional on a CPU: with it unimportable, modelgrow imports, the model runs (reference /
    csrc providers, identical to the default run) and an explicit MG_KERNELS=triton says why it cannot."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None\n")
    code = (
        "import torch, mgkernels, modelgrow\n"
        "from mgkernels import dispatch\n"
        "from modelgrow.models import create_model\n"
        "assert not dispatch.triton_available()\n"
        "torch.manual_seed(0)\n"
        "m = create_model('STDiT-tiny').eval()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "args = (torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([10.0, 600.0]), torch.randn(2, 1, 8, 32, generator=g))\n"
        "with torch.no_grad():\n"
        "    out = m(*args)\n"
        "    with mgkernels.use('ref'):\n"
        "        ref = m(*args)\n"
        "torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)\n"
        "try:\n"
        "    with mgkernels.use('triton'), torch.no_grad():\n"
        "        m(*args)\n"
        "except dispatch.KernelUnavailable as e:\n"
        "    print('unavailable:', e)\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "TRITON_INTERPRET": "0"}
    r = _run(["-c", code], env)
    assert "unavailable:" in r.stdout and "triton is not installed" in r.stdout, r.stdout


def test_import_with_extension_when_built():
    built = list((ROOT / "mgkernels").glob("_C*.so"))
    r = _run(["-c", "import modelgrow, mgkernels, json; print(json.dumps(mgkernels.build_info()))"])
    info = json.loads(r.stdout)
    if built:  # a built extension must load against the installed torch
        assert info["available"], info
        assert info["torch_version"] == torch.__version__
        assert info["omp_max_threads"] >= 1
    else:
        assert not info["available"] and info["reason"]
    assert mgkernels.ext_available() == bool(built)


def test_cli_env_and_config(tmp_path):
    info = json.loads(_run(["-m", "modelgrow", "env"]).stdout)
    assert info["torch"] == torch.__version__ and "csrc_extension" in info
    out = tmp_path / "cfg.toml"
    _run(["-m", "modelgrow", "config", "--model.depth", "4", "--out", str(out)])
    assert "depth = 4" in out.read_text()
    bad = _run(["-m", "modelgrow", "config", "--model.dpth", "4"], check=False)
    assert bad.returncode == 2 and "did you mean 'model.depth'" in bad.stderr


def test_cli_export_open_sora_checkpoint(tmp_path):
    cfg = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8, input_size=(4, 8, 8))
    src = randomize_(STDiT(**cfg, space_scale=0.5)).eval()
    ckpt = tmp_path / "OpenSora-v1-tiny.pth"
    torch.save(src.state_dict(), ckpt)
    args = ["-m", "modelgrow", "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"),
            "--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
            "--model.model_max_length", "8"]
    r = _run(args)
    assert "24 unexpected" not in r.stdout and "wrote" in r.stdout
    back = from_pretrained(tmp_path / "out")
    x, t, y = torch.randn(1, 4, 4, 8, 8), torch.tensor([9.0]), torch.randn(1, 1, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), src(x, t, y), rtol=0, atol=0)
    assert (tmp_path / "out" / "modelgrow.toml").exists()
    # a wrong architecture is refused with the keys listed, and nothing is written
    bad = _run(args[:-8] + ["--out", str(tmp_path / "bad"), "--model.preset", "STDiT-tiny", "--model.depth", "3",
                            "--model.input_size", "4,8,8", "--model.caption_channels", "32", "--model.model_max_length", "8"],
               check=False)
    assert bad.returncode == 2 and "blocks.2.attn.qkv.weight" in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_grow(tmp_path):
    from modelgrow.models import save_pretrained

    src = randomize_(STDiT(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8,
                           input_size=(4, 8, 8), class_dropout_prob=0.0)).eval()
    save_pretrained(src, tmp_path / "base")
    r = _run(["-m", "modelgrow", "grow", "--ckpt", str(tmp_path / "base"), "--out", str(tmp_path / "grown"),
              "--strategy", "insert", "--ratio", "1", "--llm", "24", "--grow.llm_max_length", "6"])
    assert "depth 2 -> 4" in r.stdout
    grown = from_pretrained(tmp_path / "grown")
    assert grown.config["growth"]["sources"] == [0, 0, 1, 1] and grown.config["llm_channels"] == 24
    x, t, y = torch.randn(1, 4, 4, 8, 8), torch.tensor([9.0]), torch.randn(1, 1, 8, 32)
    with torch.no_grad():  # exact in-process (test_grow); here the weights come back from disk, whose buffer
        # alignment can change the SIMD summation order by an ulp or two
        torch.testing.assert_close(grown(x, t, y, y_llm=torch.randn(1, 1, 6, 24)), src(x, t, y), rtol=1e-6, atol=1e-6)
    bad = _run(["-m", "modelgrow", "grow", "--ckpt", str(tmp_path / "base"), "--out", str(tmp_path / "bad"),
                "--strategy", "insert", "--ratio", "0.3333"], check=False)
    assert bad.returncode == 2 and "divisible" in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_recaption_on_a_manifest(tmp_path):
    from modelgrow.text.tiny import build_tiny_llama

    build_tiny_llama(tmp_path / "llm")
    csv_in = tmp_path / "m.csv"
    csv_in.write_text("path,caption\na.mp4,a red square moving left\nb.mp4,a blue circle\n")
    _run(["-m", "modelgrow", "recaption", "--model", str(tmp_path / "llm"), "--csv", str(csv_in),
          "--out", str(tmp_path / "out.csv"), "--recaption.min_words", "5", "--recaption.max_words", "9",
          "--recaption.max_new_tokens", "12"])
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [r["path"] for r in rows] == ["a.mp4", "b.mp4"]
    assert all(5 <= len(r["long_caption"].split()) <= 9 for r in rows)
    bad = _run(["-m", "modelgrow", "recaption", "--model", str(tmp_path / "nope"), "--csv", str(csv_in),
                "--out", str(tmp_path / "x.csv")], check=False)
    assert bad.returncode != 0 and "local directories only" in bad.stderr
