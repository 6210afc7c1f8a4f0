"""Weights & Biases logging (train.wandb): an offline run of a tiny training writes, under the run's output dir,
a W&B run whose records hold the step scalars and the validation loss and media (read back from the run's
``.wandb`` record log); a resumed run continues the same W&B run; without wandb installed the error says how to
install it. No network: mode offline, telemetry / console capture / system stats off through env vars."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from modelgrow.train import Trainer

from .test_validation import NF, QUIET, _cfg, _loader, _val, heldout, one_thread  # noqa: F401 - fixtures

wandb = pytest.importorskip("wandb")


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    for key, value in {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true",
                       "WANDB_ERROR_REPORTING": "false", "WANDB_CONFIG_DIR": str(tmp_path / "wb" / "config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wb" / "cache"), "WANDB_DATA_DIR": str(tmp_path / "wb" / "data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config's mode decides


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file: W&B's header (7 bytes) then LevelDB's log format
    (32 KiB blocks of chunks: crc32, length, type = full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


def _history(records) -> dict[int, dict]:
    """{step: {key: value}} of the history records (values JSON-decoded)."""
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def _run_file(out: Path, run_id: str) -> Path:
    """The newest offline run file of ``run_id`` (a resumed run writes a new offline-run directory, named by the
    start second; when that name is taken, W&B appends ``-1``, ``-2``...: sorted by (second, suffix))."""
    def start_order(path: Path) -> tuple[str, int]:
        stamp, _, suffix = path.parent.name.removeprefix("offline-run-").partition(f"-{run_id}")
        return stamp, int(suffix.lstrip("-") or -1)

    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"), key=start_order)
    assert files, sorted(p.name for p in (out / "wandb").iterdir())
    return files[-1]


def _finished_records(out: Path, run_id: str, newer_than: Path | None = None) -> list:
    """The records of the run once its exit record is written (the W&B service process writes the file).
    ``newer_than``: an earlier run's file; wait for a different one (the service may create the resumed run's
    directory after the trainer returns: on a busy machine the earlier, finished file was read instead)."""
    for _ in range(200):
        path = _run_file(out, run_id)
        if path == newer_than:
            time.sleep(0.05)
            continue
        records = read_wandb_records(path) if path.stat().st_size else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"{path}: no exit record (or no newer run file than {newer_than}) after 10 s")


def test_wandb_offline_run_holds_the_logged_scalars_and_media(heldout, quiet_wandb, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, "--train.steps", "3", "--train.wandb", "offline", "--train.wandb_project", "mg-test",
                      "--train.run_name", "tiny", "--train.val_every", "3", "--train.val_samples", "1",
                      "--sample.num_sampling_steps", "2", "--checkpoint.every_steps", "3", *_val(heldout)),
                 loader=_loader(), **QUIET)
    history = tr.fit()
    run_id = (out / "wandb_run_id").read_text().strip()
    records = _finished_records(out, run_id)
    assert "run" in [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.project, run.display_name) == (run_id, "mg-test", "tiny")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train"]["wandb"] == "offline" and config["model"]["preset"] == "STDiT-tiny"
    rows = _history(records)
    assert sorted(rows) == [1, 2, 3]
    for m in history:  # the step line's scalars, as in metrics.jsonl and TensorBoard
        row = rows[m["step"]]
        for key in ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "data_wait"):
            assert row[f"train/{key}"] == pytest.approx(m[key], rel=1e-12), key
        assert "train/mfu" not in row  # None on a CPU: not logged
    val = tr.val_history[-1]
    assert rows[3]["val/loss_ema"] == pytest.approx(val["loss_ema"], rel=1e-12)
    assert rows[3]["val/keyframes/_type"] == "images/separated" and rows[3]["val/keyframes/count"] == 1
    assert rows[3]["val/keyframes/captions"] == [json.loads((out / "val" / "step_0000003" / "prompts.json").read_text())
                                                 ["samples"][0]["prompt"]]
    assert rows[3]["val/video/_type"] == "videos"
    first_file = _run_file(out, run_id)
    run_dir = first_file.parent
    assert list((run_dir / "files" / "media" / "videos").rglob("*.mp4"))
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    # a resumed run continues the same W&B run (the id is kept beside the checkpoints)
    more = Trainer(_cfg(out, "--train.steps", "4", "--train.wandb", "offline", "--train.wandb_project", "mg-test",
                        "--checkpoint.every_steps", "3", *_val(heldout)), loader=_loader(), **QUIET)
    assert more.step == 3
    more.fit()
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert sorted(_history(_finished_records(out, run_id, newer_than=first_file))) == [4]


def test_wandb_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match=r"pip install wandb.*modelgrow\[wandb\]"):
        Trainer(_cfg(tmp_path / "run", "--train.wandb", "online"), loader=_loader(), **QUIET)
    Trainer(_cfg(tmp_path / "run", "--train.steps", "1"), loader=_loader(), **QUIET).fit()  # off: wandb not needed
