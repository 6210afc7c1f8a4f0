"""Atomic file output: the one way modelgrow writes a file that a reader (or a resumed run) may see.

``with atomic_output(path) as tmp:`` hands out a temporary path in the destination's folder (same suffix, so
writers that pick a format by extension still work); when the block ends without an exception the file gets
the mode every new file gets under the umask (0644 with umask 022, whatever the writer used: safetensors and
mkstemp write 0600) and replaces ``path`` in one rename. On an exception the temporary file is removed and the
old ``path``, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "public_mode"]


def public_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plainly created file gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
