"""Writing results atomically: a file is either complete or absent, never half-written.

Every table and record goes to a temporary file in the same folder and is renamed into place, so a
crash leaves no partial result that looks complete. The file gets the mode an ordinary ``open`` would
give it (``0o666`` less the umask), not the ``0o600`` of the temporary file. `append_rows` adds rows to a CSV keyed by a
cell id and skips ids already present, which is what resumable experiments need.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Cannot write {type(value).__name__} as JSON.")


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename; mode ``0o666 & ~umask``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, default=_default, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, pd.DataFrame(list(rows)).to_csv(index=False))


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def append_rows(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    key: str = "cell_id",
    leading: Sequence[str] | None = None,
) -> int:
    """Append rows whose ``key`` is not yet in the CSV (rewritten atomically). Returns rows added.

    With ``leading``, columns are ordered ``key``, then ``leading``, then every other column sorted
    by name, so the file's layout does not depend on which rows were written first (rows of different
    kinds, finished by parallel workers in any order, give the same table).
    """
    path = Path(path)
    existing = pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame()
    new = pd.DataFrame(list(rows))
    if new.empty:
        return 0
    if not existing.empty and key in existing:
        new = new[~new[key].astype(str).isin(existing[key].astype(str))]
    combined = pd.concat([existing, new], ignore_index=True) if not existing.empty else new
    if leading is not None:
        first = [c for c in (key, *leading) if c in combined.columns]
        combined = combined[first + sorted(c for c in combined.columns if c not in first)]
    atomic_write_text(path, combined.to_csv(index=False))
    return len(new)


def finished_ids(path: str | os.PathLike, key: str = "cell_id") -> set[str]:
    """The ids of rows already written to a results CSV."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return set()
    frame = pd.read_csv(path)
    return set(frame[key].astype(str)) if key in frame else set()


__all__ = ["atomic_write_text", "current_umask", "write_json", "write_csv", "read_json", "append_rows", "finished_ids"]
