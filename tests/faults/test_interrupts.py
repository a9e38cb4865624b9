"""Interrupted and repeated runs of the resumable study (``momentum``; sweeps: test_sweep_workers.py).

A child process runs the study and is interrupted by SIGKILL, SIGINT or SIGTERM after N finished
units (``ICL_KERNELS_FAULT_AFTER``, `icl_kernels.utils.faults`: a point that does not depend on the
machine's speed); rerunning the same command must end with tables equal, byte for byte, to those
of an uninterrupted run. SIGINT and SIGTERM end the child with one ``interrupted`` line (exit 130 /
143, no traceback) and release the lock; SIGKILL leaves a lock file that the rerun takes over.
A rerun of a finished run changes nothing; a grid extension computes only the new cells.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from faultkit import MOMENTUM, MOMENTUM_TABLES, N_MOMENTUM_UNITS, cli_child, run_cli, same_files

import icl_kernels.studies.momentum as momentum
from icl_kernels.cli import main
from icl_kernels.utils.faults import FAULT_AFTER_ENV, FAULT_SIGNAL_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXIT = {"KILL": -9, "INT": 130, "TERM": 143}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "momentum"
    assert main([*MOMENTUM, "--out", str(out)]) == 0
    return out


def _units_done(out: Path) -> int:
    units = set()
    for name in ("prompts.csv", "perplexity.csv"):
        if (out / name).exists():
            units |= set(pd.read_csv(out / name)["unit_id"])
    return len(units)


CASES = [pytest.param("KILL", 2, id="SIGKILL-after-2")] + [
    pytest.param(sig, n, id=f"SIG{sig}-after-{n}", marks=pytest.mark.slow)
    for sig, n in (("KILL", 5), ("KILL", N_MOMENTUM_UNITS), ("INT", 1), ("INT", 4), ("TERM", 3), ("TERM", N_MOMENTUM_UNITS))
]


@pytest.mark.parametrize("sig, after", CASES)
def test_an_interrupted_run_resumes_to_the_uninterrupted_tables(sig, after, uninterrupted, tmp_path, capsys):
    out = tmp_path / "momentum"
    child = cli_child([*MOMENTUM, "--out", str(out)], **{FAULT_AFTER_ENV: str(after), FAULT_SIGNAL_ENV: sig})
    _, err = child.communicate(timeout=600)
    assert child.returncode == EXIT[sig], err[-3000:]
    if sig != "KILL":  # a handled interruption: one line, no traceback, the lock released
        assert "Traceback" not in err, err[-3000:]
        assert len(re.findall(r"^icl-kernels: interrupted \(SIG", err, re.MULTILINE)) == 1, err[-3000:]
        assert not (out / ".icl-kernels.lock").exists()
    assert _units_done(out) == after  # every finished unit was kept, and nothing more
    assert not (out / "metrics.json").exists()
    code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    same_files(uninterrupted, out, MOMENTUM_TABLES)


def test_a_rerun_of_a_finished_run_changes_nothing(uninterrupted, tmp_path, capsys):
    out = tmp_path / "momentum"
    assert run_cli([*MOMENTUM, "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    same_files(uninterrupted, out, MOMENTUM_TABLES)
    for name in ("prompts.csv", "perplexity.csv", "fingerprint.json"):
        assert (out / name).read_bytes() == before[name], name


def test_a_grid_extension_computes_only_the_new_cells(uninterrupted, tmp_path, capsys, monkeypatch):
    out = tmp_path / "momentum"
    first = list(MOMENTUM)
    first[first.index("--eta") + 1] = "0.3"
    assert run_cli([*first, "--out", str(out)], capsys)[0] == 0
    kept = pd.read_csv(out / "prompts.csv")
    computed = []
    real = momentum.label_log_probs

    def counted(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(momentum, "label_log_probs", counted)
    code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    assert len(computed) == 1  # one new cell x one prompt set; the baseline and eta 0.3 were kept
    pd.testing.assert_frame_equal(pd.read_csv(out / "prompts.csv").iloc[: len(kept)], kept)
    same_files(uninterrupted, out, MOMENTUM_TABLES)
