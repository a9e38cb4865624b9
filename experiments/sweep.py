"""``python -m experiments.sweep``: the same command as ``icl-kernels sweep`` (`icl_kernels.sweeps.command`).

    .venv/bin/python -m experiments.sweep experiments/configs/example.toml --out runs/example
    .venv/bin/python -m experiments.sweep experiments/configs/example.toml --executor local --max-jobs 2
    .venv/bin/python -m experiments.sweep experiments/configs/example.toml --executor slurm --partition gpu \\
        --gpus-per-job 1 --time-min 120 --max-jobs 8 --device auto
    .venv/bin/python -m experiments.sweep experiments/configs/example.toml --status
    .venv/bin/python -m experiments.summarize runs/example
"""

from __future__ import annotations

import sys

from icl_kernels.sweeps.command import (
    CRASH_ENV,
    EXECUTORS,
    FAILURES,
    LEADING_COLUMNS,
    LOCK_FILE,
    RESULTS,
    VOLATILE_COLUMNS,
    Cell,
    SweepArgs,
    SweepConfig,
    SweepLockedError,
    command,
    main,
    parse_args,
    run_cell,
    slurm_executor,
    sweep_lock,
)

__all__ = ["SweepArgs", "SweepConfig", "SweepLockedError", "Cell", "main", "command", "parse_args", "run_cell",
           "slurm_executor", "sweep_lock", "RESULTS", "FAILURES", "CRASH_ENV", "VOLATILE_COLUMNS", "LEADING_COLUMNS",
           "EXECUTORS", "LOCK_FILE"]

if __name__ == "__main__":
    sys.exit(command())
