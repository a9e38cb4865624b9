"""Caches and data that heal or refuse: atomic model conversion, checksummed converted models, local task data
keyed by content, no silently dropped rows, output files that respect the umask."""

from __future__ import annotations

import os

from icl_kernels import io


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "a.json", {"x": 1})
        io.write_csv(tmp_path / "a.csv", [{"x": 1}])
        os.umask(0o002)
        io.atomic_write_text(tmp_path / "b.txt", "b")
        io.append_rows(tmp_path / "rows.csv", [{"cell_id": "a", "v": 1}])
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode == {"a.json": 0o644, "a.csv": 0o644, "b.txt": 0o664, "rows.csv": 0o664}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
