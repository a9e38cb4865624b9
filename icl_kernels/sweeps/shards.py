"""Sweep shards: the jobs a sweep submits, their record files, and the merged results.

A *shard* is a list of cells of one model (or of a few models, when there are fewer jobs than
models), run in order by one job: the job loads each model once. `ShardJob` is the callable a
submitit executor pickles (it must be importable, hence a module-level class of this package): it
runs its cells, skipping every cell that already has a row in any record file of the sweep, and
appends one JSON line per finished or failed cell to its own record file
``<out>/shards/<shard>.jsonl`` (one ``write`` of one full line, ``fsync``-ed: a kill leaves at most a
torn last line, which readers skip and the next append repairs). Each record carries the cell's id
(its coordinates and its configuration fingerprint), the fingerprint, and the row; timings go to a
separate ``timing`` field so that the merged table does not depend on the run.

Claims: before a job runs a cell it creates ``<out>/claims/<hash of the cell id>.claim``
(``O_EXCL``: one creator wins) naming its process (pid, start time, host, job id); once the cell's
row is written the claim is marked done (a failed cell's claim is deleted, so a rerun retries it).
A job skips a cell claimed by a live process (another job of this or an earlier run of the sweep,
e.g. a worker left running by a killed parent) or marked done (it reads the records again only
then, to tell a row written since it started from a row lost with a damaged record file), and
takes over, with a note, a claim whose process has ended before the cell was done (a job killed
mid-cell). So no cell is computed by two processes.

Preemption and time limits: submitit sends the job a signal shortly before its time limit (or on
preemption); it calls `ShardJob.checkpoint`, which returns the same shard with its attempt counter
raised, and submitit requeues it; the requeued job skips the cells it already finished.

`merge` turns all record files into ``results.csv`` (cells in the sweep config's order; columns
``cell_id``, the coordinates, then the metrics sorted by name), ``results.parquet`` when pyarrow is
installed (it records the sha256 of the results.csv it was made from, and every merge rewrites it
when that differs, so a copy left behind by a failed write is repaired), ``timings.csv`` (elapsed time, finish time, process, host, ``CUDA_VISIBLE_DEVICES`` and shard of each row) and
``failures.csv`` (cells whose last record is a failure: error type, message, traceback file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from submitit.helpers import DelayedSubmission

import icl_kernels
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies import get_study
from icl_kernels.utils.faults import unit_done
from icl_kernels.utils.io import atomic_write_text, read_json, write_json
from icl_kernels.utils.locking import open_no_follow

RESULTS = "results.csv"
PARQUET = "results.parquet"
#: Key of the parquet schema metadata that holds the sha256 of the results.csv it was made from.
PARQUET_SOURCE_KEY = b"icl_kernels.source_sha256"
FAILURES = "failures.csv"
TIMINGS = "timings.csv"
SHARDS = "shards"
PLAN = "plan.json"
#: Columns first in results.csv (then the metrics, sorted): the table's layout never depends on
#: which cells finished first.
LEADING_COLUMNS = ("model", "task", "shots", "seed", "layer", "analysis", "n_test", "status")
#: Per-run values of a row, kept in timings.csv instead of results.csv.
VOLATILE_COLUMNS = ("elapsed_s", "finished_at", "worker_pid")
FAILURE_COLUMNS = ("cell_id", "error_type", "message", "traceback_file", "shard", "attempt", "at")

# Testing aids (environment variables read by the shard jobs):
#: exit abruptly (as if killed) after this many rows were written by one process.
CRASH_ENV = "ICL_SWEEP_CRASH_AFTER"
#: append one line "cell_id<TAB>pid<TAB>attempt" to this file each time a cell starts.
COUNT_ENV = "ICL_SWEEP_COUNT_FILE"
#: on a shard's first attempt, after this many cells, send the job the signal submitit's controller
#: sends at the time limit (SIGUSR2), at a point that does not depend on the machine's speed.
TIME_LIMIT_ENV = "ICL_SWEEP_TIME_LIMIT_AFTER"
#: sleep this many seconds before each cell (a slow cell whose worker outlives a killed parent).
CELL_SLEEP_ENV = "ICL_SWEEP_CELL_SLEEP_S"
#: The folder of the cells' claims.
CLAIMS = "claims"
#: on a shard's first attempt, after this many cells, write the state ``holding`` and wait (at most
#: `HOLD_MAX_S`) before the next cell: a test then shortens the job's time limit on the cluster, so
#: that the scheduler's own time-limit signal comes between two cells, not inside one.
HOLD_ENV = "ICL_SWEEP_HOLD_AFTER"
HOLD_MAX_S = 600


# ------------------------------------------------------------------------------------------------
# Record files
# ------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready scalars (numpy and torch scalars to Python)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to a record file in a single write, repairing a torn last line first.

    A symbolic link at ``path`` is refused (`UnsafePathError`), never written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(_plain(record), sort_keys=True) + "\n").encode()
    fd = open_no_follow(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # a write cut by a kill: drop the partial line
                os.lseek(fd, 0, os.SEEK_SET)
                data = os.read(fd, size)
                os.ftruncate(fd, data.rfind(b"\n") + 1)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(out: Path) -> list[dict]:
    """Every complete record of a sweep folder, record files in name order, lines in file order."""
    records = []
    for path in sorted((Path(out) / SHARDS).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if isinstance(record, dict) and "cell_id" in record:
                records.append(record)
    return records


def finished_rows(records: Sequence[dict]) -> dict[str, dict]:
    """cell_id -> its first finished record."""
    rows: dict[str, dict] = {}
    for record in records:
        if record.get("kind") == "row":
            rows.setdefault(record["cell_id"], record)
    return rows


def import_legacy_results(out: Path) -> int:
    """Rows of a results.csv written by the former runner (no record files) become records."""
    out = Path(out)
    if not (out / RESULTS).exists() or list((out / SHARDS).glob("*.jsonl")):
        return 0
    frame = pd.read_csv(out / RESULTS)
    for row in frame.to_dict("records"):
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        timing = {k: row.pop(k) for k in VOLATILE_COLUMNS if k in row}
        cell_id = str(row["cell_id"])
        append_record(out / SHARDS / "imported.jsonl", dict(kind="row", cell_id=cell_id, key=cell_id.rsplit("|", 1)[0],
                                                           fingerprint=cell_id.rsplit("|", 1)[-1], row=row,
                                                           timing=timing, shard="imported", attempt=0))
    return len(frame)


# ------------------------------------------------------------------------------------------------
# Claims: one process per cell
# ------------------------------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc/<pid>/stat``, clock ticks since boot), which tells
    a process from a later one given the same pid; None where it cannot be read (no /proc, ended)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[19]


def process_alive(pid: int, host: str | None, started: str | None = None) -> bool | None:
    """Whether the process ``pid`` of ``host`` (started at ``started``, `process_start`) still runs;
    None on another host (unknown here)."""
    if host is not None and host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError, TypeError):
        return False
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return True  # no /proc: the signal test above is all there is
    if fields[0] in ("Z", "X"):  # a zombie: ended, not yet reaped (a container's init may never reap it)
        return False
    return started is None or fields[19] == started


def claim_path(out: str | os.PathLike, cell_id: str) -> Path:
    return Path(out) / CLAIMS / f"{hashlib.sha256(cell_id.encode()).hexdigest()[:32]}.claim"


def _read_claim(path: Path) -> dict:
    try:
        fd = open_no_follow(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        claim = json.loads(data.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        return {}  # torn by a kill while it was written: its owner is gone
    return claim if isinstance(claim, dict) else {}


def _claim_owner_alive(claim: dict) -> bool:
    if not claim:
        return False
    alive = process_alive(claim.get("pid"), claim.get("host"), claim.get("started"))
    return alive is not False  # another host: assumed alive


def claim_cell(out: str | os.PathLike, cell_id: str, take_done: bool = False) -> dict | None:
    """Claim ``cell_id`` for this process. Returns None when claimed, else the claim that stands: of
    a live process, or marked done (taken over only with ``take_done``: its row was lost). A claim
    whose process ended before the cell was done is taken over (a note on stderr)."""
    path = claim_path(out, cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = dict(cell_id=cell_id, pid=os.getpid(), started=process_start(os.getpid()), host=socket.gethostname(),
              job_id=_job_id(), at=time.time())
    for _ in range(100):
        try:
            fd = open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            claim = _read_claim(path)
            if claim.get("done") and not take_done:
                return claim
            if claim.get("pid") == os.getpid() and claim.get("host") == me["host"] and not claim.get("done"):
                return None  # left by this process (an earlier call that was interrupted): ours
            if _claim_owner_alive(claim) and not claim.get("done"):
                return claim
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            try:
                os.rename(path, stale)  # one process wins the take-over
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            if not claim.get("done"):
                print(f"note: cell {cell_id}: its claim by pid {claim.get('pid')} on {claim.get('host')} was left by a "
                      "process that has ended; running the cell again.", file=sys.stderr)
            continue
        try:
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    raise RuntimeError(f"could not claim cell {cell_id} ({path})")


def mark_done(out: str | os.PathLike, cell_id: str) -> None:
    """Mark this process's claim of ``cell_id`` done (its row is written)."""
    path = claim_path(out, cell_id)
    claim = _read_claim(path)
    if claim.get("pid") == os.getpid() and claim.get("host") == socket.gethostname():
        atomic_write_text(path, json.dumps(dict(claim, done=True)))


def release_cell(out: str | os.PathLike, cell_id: str) -> None:
    """Delete this process's claim of ``cell_id`` (a claim of another process is left alone)."""
    path = claim_path(out, cell_id)
    claim = _read_claim(path)
    if claim.get("pid") == os.getpid() and claim.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def live_claims(out: str | os.PathLike) -> list[dict]:
    """The claims of ``out`` of cells not done whose process still runs (or runs on another host)."""
    folder = Path(out) / CLAIMS
    claims = [_read_claim(p) for p in sorted(folder.glob("*.claim"))] if folder.is_dir() else []
    return [c for c in claims if not c.get("done") and _claim_owner_alive(c)]


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def plan_shards(cells: Sequence, max_jobs: int) -> list[list]:
    """At most ``max_jobs`` contiguous groups of cells, each of one model where there are at least as
    many jobs as models (jobs shared out in proportion to the models' cell counts), else runs of
    whole models. Cells keep the sweep order; the plan depends only on the cells and ``max_jobs``."""
    by_model: dict[str, list] = {}
    for cell in cells:
        by_model.setdefault(cell.model, []).append(cell)
    groups = list(by_model.values())
    if not groups:
        return []
    if max_jobs < len(groups):  # several models per job, each model in one job
        shards: list[list] = [[] for _ in range(max_jobs)]
        for i, group in enumerate(groups):
            shards[i * max_jobs // len(groups)].extend(group)
        return [s for s in shards if s]
    jobs = [1] * len(groups)
    for _ in range(max_jobs - len(groups)):  # one more job for the model with most cells per job
        best = max(range(len(groups)), key=lambda i: (len(groups[i]) / jobs[i], -i))
        if len(groups[best]) <= jobs[best]:
            break
        jobs[best] += 1
    shards = []
    for group, n in zip(groups, jobs):
        bounds = [round(j * len(group) / n) for j in range(n + 1)]
        shards.extend(group[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)
    return shards


_MODELS: dict[str, Any] = {}  # per process: the last model loaded


def model_for(config):
    """The model of a study configuration (its ``model`` options), loaded once per process while
    consecutive cells use it; None for a study without a model."""
    options = getattr(config, "model", None)
    if not isinstance(options, ModelOptions):
        return None
    key = json.dumps(options.to_dict(), sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = options.load()
    return _MODELS[key]


def run_cell(cell, threads: int = 1) -> dict:
    """Run one cell's study in this process and return its row (coordinates, ``report.row()``, the
    run's fingerprint and data source) and,
    under ``"timing"``, its elapsed time, finish time and process."""
    torch.set_num_threads(threads)
    started = time.time()
    study = get_study(cell.analysis)
    config = cell.config()
    model = model_for(config)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if cell.layer != "all" and n_layers is not None and not 0 <= int(cell.layer) < n_layers:
        raise ValueError(f"Layer {cell.layer} does not exist in {cell.model} ({n_layers} layers).")
    report = study(config, model=model, progress=False)
    record = report.record()  # what identifies the run: full config, model identity, data source
    metrics = report.row()
    metrics.update(run_fingerprint=record["fingerprint"], data_source=json.dumps(record["data_source"], sort_keys=True))
    coordinates = cell.coordinates()
    clash = sorted(k for k in set(metrics) & set(coordinates) if str(metrics[k]) != str(coordinates[k]))
    if clash:
        raise RuntimeError(f"study {cell.analysis!r} returned metrics named like coordinates: {clash}")
    metrics = {k: v for k, v in metrics.items() if k not in coordinates}
    timing = dict(elapsed_s=round(time.time() - started, 2), finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  worker_pid=os.getpid(), host=socket.gethostname(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return dict(coordinates, **metrics, status="ok", package_version=icl_kernels.__version__, timing=timing)


def _is_job_control(error: BaseException) -> bool:
    """submitit's own end-of-job errors (time limit without requeue) must end the job, not a cell."""
    return type(error).__name__ in {"UncompletedJobError", "FailedJobError"}


@dataclass
class ShardJob:
    """One job of a sweep: run ``cells`` in order into ``<out>/shards/<name>.jsonl``.

    Submitted through submitit (pickled), or called in this process by the ``inline`` executor.
    ``checkpoint`` (called by submitit on preemption or before the time limit) returns the job to
    requeue: the same cells, the attempt counter raised; finished cells are skipped on every start.
    """

    out: str
    name: str
    cells: list
    threads: int = 1
    attempt: int = 0
    on_record: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def record_file(self) -> Path:
        return Path(self.out) / SHARDS / f"{self.name}.jsonl"

    @property
    def state_file(self) -> Path:
        return Path(self.out) / SHARDS / f"{self.name}.state.json"

    def _state(self, state: str, current: str | None = None, **extra) -> None:
        write_json(self.state_file, dict(state=state, current=current, attempt=self.attempt, pid=os.getpid(),
                                         host=socket.gethostname(), job_id=_job_id(), updated=time.time(), **extra))

    def checkpoint(self, *args, **kwargs):
        self._state("requeued")
        return DelayedSubmission(replace(self, attempt=self.attempt + 1, on_record=None))

    def __call__(self) -> dict:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        limit_after = int(os.environ.get(TIME_LIMIT_ENV, "0") or 0)
        hold_after = int(os.environ.get(HOLD_ENV, "0") or 0)
        count_file = os.environ.get(COUNT_ENV)
        sleep_s = float(os.environ.get(CELL_SLEEP_ENV, "0") or 0)
        done = finished_rows(read_records(Path(self.out)))
        todo = [c for c in self.cells if c.cell_id not in done]
        written = failed = skipped = 0
        try:
            for i, cell in enumerate(todo):
                if limit_after and self.attempt == 0 and i == limit_after:
                    os.kill(os.getpid(), signal.SIGUSR2)  # submitit's handler checkpoints and requeues
                    time.sleep(60)
                if hold_after and self.attempt == 0 and i == hold_after:
                    self._state("holding", cell.cell_id)  # the time-limit signal ends the wait (see HOLD_ENV)
                    deadline = time.time() + HOLD_MAX_S
                    while time.time() < deadline:
                        time.sleep(0.5)
                holder = claim_cell(self.out, cell.cell_id)
                if holder is not None and holder.get("done"):
                    if cell.cell_id in finished_rows(read_records(Path(self.out))):
                        continue  # finished by another job since this one started
                    holder = claim_cell(self.out, cell.cell_id, take_done=True)  # its row was lost: run it again
                if holder is not None:  # a live process runs it (a worker of an earlier run): not twice
                    print(f"cell {cell.cell_id} is being run by pid {holder.get('pid')} on {holder.get('host')} "
                          f"(job {holder.get('job_id')}); skipped here.", file=sys.stderr)
                    skipped += 1
                    continue
                self._state("running", cell.cell_id)
                if sleep_s:
                    time.sleep(sleep_s)
                if count_file:
                    with open(count_file, "a", encoding="utf-8") as handle:
                        handle.write(f"{cell.cell_id}\t{os.getpid()}\t{self.attempt}\n")
                base = dict(cell_id=cell.cell_id, key=cell.key, fingerprint=cell.fingerprint, shard=self.name,
                            attempt=self.attempt)
                try:
                    row = run_cell(cell, self.threads)
                except Exception as error:  # noqa: BLE001 - recorded; the shard goes on
                    if _is_job_control(error):
                        raise
                    failed += 1
                    tb_file = Path(self.out) / "tracebacks" / f"{self.name}-{cell.fingerprint}-{i}.txt"
                    atomic_write_text(tb_file, traceback.format_exc())
                    append_record(self.record_file, dict(base, kind="failure", error_type=type(error).__name__,
                                                         message=str(error).splitlines()[0] if str(error) else "",
                                                         traceback_file=str(tb_file.relative_to(self.out)), at=time.time()))
                    print(f"cell failed: {cell.cell_id}: {type(error).__name__}: {error}", file=sys.stderr)
                    release_cell(self.out, cell.cell_id)
                else:
                    timing = row.pop("timing")
                    append_record(self.record_file, dict(base, kind="row", row=row, timing=timing))
                    written += 1
                    mark_done(self.out, cell.cell_id)
                unit_done()  # a test seam: ICL_KERNELS_FAULT_AFTER interrupts the job here (icl_kernels.utils.faults)
                if self.on_record is not None:
                    self.on_record()
                if crash_after and written >= crash_after:
                    os._exit(3)  # as if killed: no cleanup, no further rows
        except BaseException:
            self._state("interrupted")
            for cell in todo:
                release_cell(self.out, cell.cell_id)
            raise
        self._state("finished")
        return dict(shard=self.name, written=written, failed=failed, skipped=len(self.cells) - len(todo),
                    claimed_elsewhere=skipped)


def _job_id() -> str | None:
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(var):
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            return f"{os.environ[var]}_{task}" if var == "SLURM_ARRAY_JOB_ID" and task else os.environ[var]
    return None


# ------------------------------------------------------------------------------------------------
# Merging and status
# ------------------------------------------------------------------------------------------------


def merge(out: Path, cells: Sequence) -> tuple[int, list[dict]]:
    """Write results.csv (+ parquet), timings.csv and failures.csv of the current cells from every
    record file. Returns (rows written, failure records of cells without a row)."""
    out = Path(out)
    records = read_records(out)
    rows = finished_rows(records)
    last_failure: dict[str, dict] = {}
    for record in records:
        if record.get("kind") == "failure":
            last_failure[record["cell_id"]] = record
    table = [dict(cell_id=c.cell_id, **{k: v for k, v in rows[c.cell_id]["row"].items() if k != "cell_id"})
             for c in cells if c.cell_id in rows]
    if table:
        frame = pd.DataFrame(table)
        first = [c for c in ("cell_id", *LEADING_COLUMNS) if c in frame.columns]
        frame = frame[first + sorted(c for c in frame.columns if c not in first)]
        text = frame.to_csv(index=False)
        path = out / RESULTS
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        _refresh_parquet(out / PARQUET, frame, hashlib.sha256(text.encode("utf-8")).hexdigest())
        timings = pd.DataFrame([dict(cell_id=c.cell_id, shard=rows[c.cell_id].get("shard"),
                                     attempt=rows[c.cell_id].get("attempt"), **rows[c.cell_id].get("timing", {}))
                                for c in cells if c.cell_id in rows])
        atomic_write_text(out / TIMINGS, timings.to_csv(index=False))
    failures = [last_failure[c.cell_id] for c in cells if c.cell_id not in rows and c.cell_id in last_failure]
    if failures:
        frame = pd.DataFrame([{k: f.get(k) for k in FAILURE_COLUMNS} for f in failures], columns=list(FAILURE_COLUMNS))
        atomic_write_text(out / FAILURES, frame.to_csv(index=False))
    elif (out / FAILURES).exists():
        (out / FAILURES).unlink()
    return len(table), failures


_PARQUET_NOTE = []


def _parquet_tmp(path: Path) -> Path:
    """The temporary file a parquet write goes through (left behind only by a killed process)."""
    return path.with_name(f".{path.name}.tmp")


def _parquet_source(path: Path) -> str | None:
    """The results.csv sha256 recorded in the parquet at ``path``; None if absent, unreadable or
    written before it was recorded."""
    import pyarrow  # noqa: PLC0415 - optional, checked by the caller
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, ValueError, pyarrow.ArrowException):
        return None
    value = metadata.get(PARQUET_SOURCE_KEY)
    return value.decode("ascii", "replace") if value else None


def _refresh_parquet(path: Path, frame, source_sha256: str) -> None:
    """Make ``path`` the parquet copy of the results.csv whose sha256 is ``source_sha256``.

    A partial temporary file is removed first. A parquet that records this sha256 is kept; any
    other is rewritten, so one left stale by a failed or killed write is repaired by the next merge
    (a rerun or ``--merge-only``). Without pyarrow an existing parquet is removed (it cannot be
    checked against the table); a write that fails removes the stale copy and says so.
    """
    _parquet_tmp(path).unlink(missing_ok=True)
    try:
        import pyarrow  # noqa: F401, PLC0415 - optional: the parquet copy is written only where it is installed
    except ImportError:
        if not _PARQUET_NOTE:
            _PARQUET_NOTE.append(1)
            print("note: pyarrow is not installed; results.parquet skipped (results.csv has every row).", file=sys.stderr)
        if path.is_symlink() or path.is_file():
            path.unlink()
            print(f"note: removed {path}: without pyarrow it cannot be checked against results.csv.", file=sys.stderr)
        return
    if path.is_file() and not path.is_symlink() and _parquet_source(path) == source_sha256:
        return
    _write_parquet(path, frame, source_sha256)


def _write_parquet(path: Path, frame, source_sha256: str) -> None:
    """Write ``frame`` to ``path`` through a temporary file, recording ``source_sha256`` in the
    schema metadata. On failure the temporary file and the stale ``path`` are removed, with a
    warning: results.csv holds every row, and the next merge tries again."""
    import pyarrow  # noqa: PLC0415 - optional, checked by the caller
    import pyarrow.parquet as pq  # noqa: PLC0415

    frame = frame.copy()
    for column in frame.columns:  # mixed columns (layer "all" and 3, shots "-" and 4) as text
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    tmp = _parquet_tmp(path)
    try:
        table = pyarrow.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_SOURCE_KEY: source_sha256.encode()})
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except (OSError, ValueError, TypeError, pyarrow.ArrowException) as error:
        path.unlink(missing_ok=True)
        print(f"warning: could not write {path} ({type(error).__name__}: {error}); removed the stale copy. "
              "results.csv has every row; a rerun or --merge-only writes the parquet again.", file=sys.stderr)
    finally:
        tmp.unlink(missing_ok=True)


def status_lines(out: Path, cells: Sequence) -> list[str]:
    """Cells done / running / failed / pending per shard of the last submission, then in total."""
    out = Path(out)
    records = read_records(out)
    rows = finished_rows(records)
    failed = {r["cell_id"] for r in records if r.get("kind") == "failure"} - set(rows)
    current = {c.cell_id for c in cells}
    try:
        plan = read_json(out / SHARDS / PLAN) if (out / SHARDS / PLAN).exists() else dict(shards={})
    except (OSError, ValueError):  # torn or overwritten: per-shard lines are unknown, the totals below still hold
        plan = dict(run="(plan.json unreadable)", shards={})
    lines = [f"run {plan.get('run', '-')} ({plan.get('executor', '-')}):",
             f"{'shard':<28} {'job':<14} {'state':<16} {'cells':>5} {'done':>5} {'running':>7} {'failed':>6} {'pending':>7}"]
    for name, info in plan["shards"].items():
        ids = [i for i in info["cells"] if i in current]
        state_path = out / SHARDS / f"{name}.state.json"
        try:
            state = read_json(state_path) if state_path.exists() else {}
        except (OSError, ValueError):  # torn or overwritten: the job's progress is unknown, its records still count
            state = {"state": "unreadable"}
        alive = _alive(state)
        running = {state.get("current")} if state.get("state") == "running" and alive else set()
        n_done = sum(i in rows for i in ids)
        n_failed = sum(i in failed for i in ids)
        n_running = sum(i in running and i not in rows for i in ids)
        shown = state.get("state", "queued") + ("" if alive or state.get("state") in (None, "finished") else " (dead)")
        lines.append(f"{name:<28} {str(info.get('job_id') or state.get('job_id') or '-'):<14} {shown:<16} {len(ids):>5} "
                     f"{n_done:>5} {n_running:>7} {n_failed:>6} {len(ids) - n_done - n_failed - n_running:>7}")
    n_done = sum(c.cell_id in rows for c in cells)
    n_failed = sum(c.cell_id in failed for c in cells)
    lines.append(f"all cells: {len(cells)}, done {n_done}, failed {n_failed}, not done {len(cells) - n_done - n_failed}")
    return lines


def _alive(state: dict) -> bool:
    """Whether the process in a state file still runs (unknown on another host: assumed alive)."""
    if not state or state.get("state") in ("finished", "interrupted", "unreadable"):
        return False
    if state.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True


__all__ = ["ShardJob", "plan_shards", "run_cell", "model_for", "merge", "status_lines", "read_records", "finished_rows",
           "append_record", "import_legacy_results", "RESULTS", "FAILURES", "TIMINGS", "LEADING_COLUMNS",
           "VOLATILE_COLUMNS", "CRASH_ENV", "COUNT_ENV", "TIME_LIMIT_ENV", "HOLD_ENV", "CELL_SLEEP_ENV", "CLAIMS",
           "claim_cell", "release_cell", "mark_done", "live_claims", "process_alive", "process_start"]
