"""modelgrow.fileio.atomic_output: all-or-nothing replacement, public file mode, no leftovers."""

import os

import pytest

from modelgrow.fileio import atomic_output


def test_replaces_in_one_step_with_the_umask_mode(tmp_path):
    target = tmp_path / "sub" / "index.json"
    old = os.umask(0o022)
    try:
        with atomic_output(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
            os.chmod(tmp, 0o600)  # what safetensors / mkstemp leave
            tmp.write_text("new")
            assert not target.exists()  # nothing visible before the block ends
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["index.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "shard.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]
