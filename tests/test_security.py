"""No file modelgrow reads can run code: crafted DCP ``.metadata``, ``extra-rank*.pt``, weights and cache files
are refused (a marker file must never appear) at every entry point that reads them."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from modelgrow.config import load_config
from modelgrow.train import RandomLatentLoader, Trainer
from modelgrow.train import checkpoint as ckpt

BASE = ["--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.log_every", "1", "--train.compute_dtype", "float32", "--optim.lr", "1e-3"]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


def _cfg(out, *extra):
    return load_config(None, [*BASE, "--train.output_dir", str(out), *extra])


def _loader():
    return RandomLatentLoader(2, (4, 4, 8, 8), (8, 32), seed=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run")
    Trainer(_cfg(out, "--train.steps", "2", "--checkpoint.every_steps", "1"), loader=_loader(), log=lambda *_: None).fit()
    return out


def _copy_run(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("payload", [_Evil, _EvilEval])
def test_crafted_metadata_cannot_run_code_on_export_or_resume(run, tmp_path, payload):
    from modelgrow.cli import main as cli

    out = _copy_run(run, tmp_path)
    last = ckpt.latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "PWNED"
    (last / ".metadata").write_bytes(pickle.dumps(payload(marker)))
    # export (CLI and API)
    assert cli(["export", "--ckpt", str(last), "--out", str(tmp_path / "exp")]) == 2
    assert not marker.exists()
    from modelgrow.train.export import export_checkpoint

    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata.*refused"):
        export_checkpoint(last, tmp_path / "exp2")
    assert not marker.exists()
    # resume (train with the same output dir)
    with pytest.raises(ckpt.CheckpointError, match="refused") as e:
        Trainer(_cfg(out, "--train.steps", "3", "--checkpoint.every_steps", "1"), loader=_loader(), log=lambda *_: None)
    assert "step_00000001" in str(e.value)  # offers the previous complete checkpoint
    assert not marker.exists()


def test_crafted_metadata_storage_path_escape_is_refused(run, tmp_path):
    out = _copy_run(run, tmp_path)
    last = ckpt.latest_checkpoint(out / "checkpoints")
    md = ckpt.safe_load_metadata((last / ".metadata").read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../../secret.distcp"
    (last / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(ckpt.CheckpointError, match="does not name a file"):
        ckpt.dcp_load({"ema": {}}, last)


def test_crafted_extra_state_cannot_run_code(run, tmp_path):
    out = _copy_run(run, tmp_path)
    last = ckpt.latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "PWNED"
    with open(last / "extra-rank0.pt", "wb") as f:
        pickle.dump({"step": 2, "x": _Evil(marker)}, f, protocol=2)
    with pytest.raises(ckpt.CheckpointError, match="extra-rank0.pt"):
        Trainer(_cfg(out, "--train.steps", "3"), loader=_loader(), log=lambda *_: None)
    assert not marker.exists()


def test_crafted_dcp_shard_cannot_run_code(run, tmp_path):
    out = _copy_run(run, tmp_path)
    last = ckpt.latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "PWNED"
    shard = next(last.glob("*.distcp"))
    size = shard.stat().st_size
    evil = pickle.dumps(_Evil(marker), protocol=2)
    shard.write_bytes((evil * (size // len(evil) + 1))[:size])
    with pytest.raises(ckpt.CheckpointError, match=r"\.distcp"):
        ckpt.dcp_load({"model": Trainer(_cfg(tmp_path / "fresh", "--train.steps", "1"), loader=_loader(),
                                        log=lambda *_: None).model.state_dict()}, last)
    assert not marker.exists()


def test_crafted_pth_and_cache_files_cannot_run_code(tmp_path):
    from modelgrow.data.cache import CachedDataset, CacheMismatchError
    from modelgrow.models import STDiT, load_checkpoint

    marker = tmp_path / "PWNED"
    for name in ("evil.pth", "evil.pt", "evil.bin"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"model": _Evil(marker)}, f, protocol=2)
        with pytest.raises(ValueError, match=name):
            load_checkpoint(STDiT(depth=1, hidden_size=32, num_heads=4, caption_channels=8, model_max_length=4,
                                  input_size=(2, 4, 4)), tmp_path / name)
    # a cache whose files were replaced by pickles: data formats only, nothing is unpickled
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CacheMismatchError, match="index.json"):
        CachedDataset(cache)
    assert not marker.exists()


def test_restricted_unpickler_accepts_real_metadata_only(run):
    last = ckpt.latest_checkpoint(run / "checkpoints")
    md = ckpt.safe_load_metadata((last / ".metadata").read_bytes())
    assert len(md.state_dict_metadata) > 10
    for bad in (pickle.dumps(os.getcwd), pickle.dumps(torch.nn.Linear), pickle.dumps({"a": 1}), b"", b"\x80\x04garbage"):
        with pytest.raises(ckpt.CheckpointError):
            ckpt.safe_load_metadata(bad)
