"""Sweep shards, moved to `icl_kernels.sweeps.shards` (this name keeps older imports working)."""

from __future__ import annotations

from icl_kernels.sweeps.shards import (
    COUNT_ENV,
    CRASH_ENV,
    FAILURES,
    LEADING_COLUMNS,
    PARQUET,
    RESULTS,
    SHARDS,
    TIME_LIMIT_ENV,
    TIMINGS,
    VOLATILE_COLUMNS,
    ShardJob,
    append_record,
    finished_rows,
    import_legacy_results,
    merge,
    model_for,
    plan_shards,
    read_records,
    run_cell,
    status_lines,
)

__all__ = ["ShardJob", "plan_shards", "run_cell", "model_for", "merge", "status_lines", "read_records", "finished_rows",
           "append_record", "import_legacy_results", "RESULTS", "PARQUET", "SHARDS", "FAILURES", "TIMINGS", "LEADING_COLUMNS",
           "VOLATILE_COLUMNS", "CRASH_ENV", "COUNT_ENV", "TIME_LIMIT_ENV"]
