"""Reading a written run back: `load_run` returns what `icl_kernels.studies.report.Report.write` wrote.

A run folder holds ``config.json`` (with the study's name), a summary JSON (``summary.json``, or
``metrics.json`` for the studies that named it so first), ``summary.csv`` (the summary as a long
table, `icl_kernels.studies.tidy`), one CSV per table, and usually ``fingerprint.json`` and
``environment.json``. Only JSON and CSV are read (nothing is unpickled), and no study module is
imported, so loading needs neither torch nor the model. A run written before ``summary.csv`` was
long (its causal ``summary.csv`` is the per-condition table) still loads: that file is a table
named ``summary`` and the long table is computed from the JSON.

    from icl_kernels import load_run
    run = load_run("results/causal-synthetic")
    run.study, run.fingerprint, run.summary_table.head(), sorted(run.tables)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from icl_kernels.studies.tidy import COLUMNS, tidy_frame
from icl_kernels.utils.errors import IclKernelsError

__all__ = ["NotARunError", "Run", "SUMMARY_FILES", "is_run", "load_run"]

#: Summary JSON names, in the order they are looked for.
SUMMARY_FILES = ("summary.json", "metrics.json")
SUMMARY_TABLE = "summary.csv"


class NotARunError(IclKernelsError, FileNotFoundError):
    """A folder given as a run holds no run (no ``config.json``, or no summary JSON)."""


@dataclass
class Run:
    """One run, as written to its folder.

    Attributes:
        path: the run folder.
        study: the registered study that wrote it (``config.json``'s ``study``); None for a run
            written before ``config.json`` named its study.
        config: ``config.json``: the configuration, with ``study``, ``fingerprint`` and ``data_source``.
        summary: the summary JSON (``summary.json`` or ``metrics.json``) as a dict.
        summary_table: one row per reported quantity, columns ``name``, ``value``, ``low``, ``high``,
            ``n``, ``unit``, ``split``, ``method`` (``summary.csv``; computed from ``summary`` for a
            run written before that file existed).
        tables: table name -> frame, one per other CSV of the folder (``heads``, ``predictions``...).
        fingerprint: the run's fingerprint (`icl_kernels.studies.identity`), or None when the
            folder records none.
        record: ``fingerprint.json`` (fingerprint, resume key, config, model and data identity), or {}.
        environment: ``environment.json`` (package versions, machine), or {}.
    """

    path: Path
    study: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    summary_table: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    fingerprint: str | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)
    environment: dict[str, Any] = field(default_factory=dict, repr=False)

    def quantity(self, name: str) -> dict[str, Any]:
        """The row of quantity ``name`` of `summary_table` as a dict; KeyError naming close ones otherwise."""
        found = self.summary_table[self.summary_table["name"] == name]
        if found.empty:
            close = [n for n in self.summary_table["name"] if name.split(".")[-1] in n][:5]
            raise KeyError(f"{self.path}: no quantity {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        return found.iloc[0].to_dict()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise NotARunError(f"{path} cannot be read as JSON ({type(error).__name__}: {error}).") from None
    if not isinstance(value, dict):
        raise NotARunError(f"{path} holds {type(value).__name__}, not a JSON object.")
    return value


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with ``config.json`` and a summary JSON (what `load_run` needs)."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in SUMMARY_FILES)


def load_run(path: str | os.PathLike) -> Run:
    """The run written to folder ``path`` (see `Run`); `NotARunError`, one line, for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise NotARunError(f"{path} is not a folder; give the --out folder of a study run.")
    summary_file = next((path / name for name in SUMMARY_FILES if (path / name).is_file()), None)
    if not (path / "config.json").is_file() or summary_file is None:
        hint = " (it holds results.csv: a sweep; `icl-kernels summarize` reads it)" if (path / "results.csv").is_file() else ""
        raise NotARunError(f"{path} is not a study run: it needs config.json and summary.json or metrics.json{hint}.")
    config = _read_json(path / "config.json")
    summary = _read_json(summary_file)
    record = _read_json(path / "fingerprint.json") if (path / "fingerprint.json").is_file() else {}
    environment = _read_json(path / "environment.json") if (path / "environment.json").is_file() else {}
    tables = {csv.stem: _read_csv(csv) for csv in sorted(path.glob("*.csv")) if not csv.name.startswith(".")}
    summary_table = tables.pop("summary", None)
    if summary_table is None or list(summary_table.columns) != COLUMNS:
        if summary_table is not None:  # an older run's per-condition table of the same name
            tables["summary"] = summary_table
        summary_table = tidy_frame(summary)
    fingerprint = summary.get("fingerprint") or config.get("fingerprint") or record.get("fingerprint")
    study = config.get("study") if isinstance(config.get("study"), str) else None
    return Run(path=path, study=study, config=config, summary=summary, summary_table=summary_table,
               tables=tables, fingerprint=fingerprint, record=record, environment=environment)
