"""Manifests: CSV or Parquet tables of ``path, caption [, long_caption, num_frames, fps, height, width, ...]``.

* ``path`` may be absolute or relative; relative paths resolve against the manifest's own directory.
* Images (``.png .jpg .jpeg .webp .bmp``) and videos may be mixed; an image becomes a clip by repetition.
* Optional columns are parsed when present (empty cells -> ``None``); any other column is kept verbatim in
  ``Record.extra`` and passed through.
* CSV is read with the standard ``csv`` module; Parquet needs ``pyarrow`` (or ``pandas``) and says so.

Errors (``ManifestError``, a ``ValueError``) name the file and, for a bad cell, the row (1-based data row
as a spreadsheet shows it: the header is line 1, the first record line 2).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "ManifestError", "Record", "Manifest", "load_manifest", "is_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REQUIRED_COLUMNS = ("path", "caption")
OPTIONAL_COLUMNS = {"long_caption": str, "num_frames": int, "fps": float, "height": int, "width": int}


class ManifestError(ValueError):
    """A manifest that cannot be used (missing file or column, empty, bad value)."""


def is_image(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


@dataclass
class Record:
    """One manifest row. ``path`` is resolved (absolute when the manifest path was); ``line`` is the row's
    line in a CSV (header = 1) or its 1-based row number in a Parquet file."""

    path: str
    caption: str
    long_caption: str | None = None
    num_frames: int | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def is_image(self) -> bool:
        return is_image(self.path)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); re-save the manifest as UTF-8, "
                            f"e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.csv") from None
    return columns, rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise ManifestError(f"{path}: reading a Parquet manifest needs pyarrow or pandas "
                                "(pip install pyarrow), or convert it to CSV") from None
        df = pd.read_parquet(path)
        return list(df.columns), df.to_dict("records")
    table = pq.read_table(path)
    return list(table.column_names), table.to_pylist()


class Manifest:
    """The parsed rows of a manifest: ``len(m)``, ``m[i] -> Record``, iteration."""

    def __init__(self, path: str | os.PathLike, records: list[Record], columns: list[str]):
        self.path = Path(path)
        self.records = records
        self.columns = columns

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, {len(self)} rows)"


def load_manifest(path: str | os.PathLike, check_files: bool = False) -> Manifest:
    """Read a ``.csv`` / ``.parquet`` manifest. ``check_files=True`` also raises for rows whose file is
    missing (otherwise a missing file is a decode failure at load time, counted like any other)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns, rows = _read_csv(path)
        first_line = 2
    elif suffix in (".parquet", ".pq"):
        columns, rows = _read_parquet(path)
        first_line = 1
    else:
        raise ManifestError(f"manifest {path}: unsupported format {suffix!r}; use .csv or .parquet")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"manifest {path}: missing required column(s) {missing}; it has {columns} "
                            f"(required: {list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)})")
    if not rows:
        raise ManifestError(f"manifest {path} is empty (a header but no rows)")
    root = path.parent
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    records = []
    for i, row in enumerate(rows):
        line = first_line + i
        p = row.get("path")
        if _missing(p):
            raise ManifestError(f"manifest {path}, row {line}: empty 'path'")
        p = str(p).strip()
        full = p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p))
        cap = row.get("caption")
        rec = Record(path=full, caption="" if _missing(cap) else str(cap), line=line)
        for col, typ in OPTIONAL_COLUMNS.items():
            v = row.get(col)
            if _missing(v):
                continue
            try:
                setattr(rec, col, str(v) if typ is str else typ(float(v)) if typ is int else typ(v))
            except (TypeError, ValueError):
                raise ManifestError(f"manifest {path}, row {line}: column {col!r} = {v!r} is not a valid {typ.__name__}") from None
        rec.extra = {k: v for k, v in row.items() if k not in known}
        if check_files and not os.path.isfile(full):
            raise ManifestError(f"manifest {path}, row {line}: file {full} does not exist")
        records.append(rec)
    return Manifest(path, records, columns)
