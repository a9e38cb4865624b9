"""``python -m experiments.summarize``: the same command as ``icl-kernels summarize`` (`icl_kernels.sweeps.summary`).

    .venv/bin/python -m experiments.summarize runs/example
"""

from __future__ import annotations

import sys

from icl_kernels.sweeps.summary import (
    FIGURES,
    RESULTS,
    NoResultsError,
    SummarizeArgs,
    command,
    main,
    parse_args,
    read_results,
    tables,
    write_summary,
)

__all__ = ["FIGURES", "RESULTS", "NoResultsError", "SummarizeArgs", "command", "main", "parse_args", "read_results",
           "tables", "write_summary"]

if __name__ == "__main__":
    sys.exit(command())
