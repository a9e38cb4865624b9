"""What a study returns: its tables, a summary, figures on demand, and how it writes itself.

A `Report` is data: ``tables`` (tidy ``pandas`` frames, one CSV each), ``summary`` (the headline
numbers with their intervals, one JSON file, and the same numbers as a long table, ``summary.csv``:
one row per quantity, `icl_kernels.studies.tidy`) and the configuration that produced them. Figures are
built from that data only when asked for (`Report.figures`), so a sweep that keeps one row per cell
never pays for them. `Report.write` is the only place a study touches the file system: tables,
``summary.csv``, summary, ``config.json``, ``environment.json``, figures that open offline and a study's
attachments (JSON records for `icl-kernels view`, `Report.attachments`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from icl_kernels.studies.identity import run_record, write_record
from icl_kernels.studies.registry import get_study
from icl_kernels.studies.tidy import COLUMNS, tidy
from icl_kernels.utils.config import Options
from icl_kernels.utils.environment import environment as env
from icl_kernels.utils.errors import UnknownNameError
from icl_kernels.utils.io import atomic_write_text, write_csv, write_json
from icl_kernels.utils.plotting import write_html

__all__ = ["SUMMARY_TABLE", "Report", "finite", "flatten"]

#: The long table of a run's summary (`Report.quantities`), written beside the summary JSON.
SUMMARY_TABLE = "summary.csv"


def finite(value: Any) -> Any:
    """NaN and infinities become None (JSON null), recursively, so that summaries are strict JSON."""
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; a list of records is keyed by each record's
    ``cell_id`` (or its position); lists of scalars stay as they are.

    >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": 2})
    {'a.b': 1, 'a.c': [1, 2], 'd': 2}
    >>> flatten({"cells": [{"cell_id": "eta=0.1", "accuracy": 0.5}]})
    {'cells[eta=0.1].cell_id': 'eta=0.1', 'cells[eta=0.1].accuracy': 0.5}
    """
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}[{item.get('cell_id', i)}]."))
        else:
            out[name] = value
    return out


@dataclass
class Report:
    """The outcome of one study run.

    Attributes:
        study: the registered study name.
        config: the configuration that produced it.
        tables: name -> tidy frame, written as ``<name>.csv``.
        summary: headline numbers (intervals and baselines beside them), written as `summary_file`.
        identity: the run record (`icl_kernels.studies.identity.RunIdentity.record`) the study call
            took after the run; None for a report built by hand (`record` then computes it).
    """

    study: str
    config: Options
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] | None = field(default=None, repr=False, compare=False, kw_only=True)

    #: File name of the summary (``metrics.json`` where the command documented that name first).
    summary_file: ClassVar[str] = "summary.json"
    #: Summary keys that differ between two runs of the same configuration (timings).
    volatile_keys: ClassVar[tuple[str, ...]] = ("seconds", "timing")

    def quantities(self, summary: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The summary as long rows, one per reported quantity (`icl_kernels.studies.tidy.tidy`:
        name, value, low, high, n, unit, split, method); ``summary`` defaults to this report's.
        A study whose headline numbers live in a table adds their rows here."""
        return tidy(finite(self.summary if summary is None else summary))

    def figures(self) -> dict[str, Any]:
        """name -> ``plotly`` figure, built from the tables and summary. None by default."""
        return {}

    def attachments(self) -> dict[str, Any]:
        """file name -> JSON record written with the figures (data for `icl-kernels view`), with the run's
        ``fingerprint`` and ``data_source`` added. None by default."""
        return {}

    def line(self) -> str:
        """One line for the terminal: the headline numbers."""
        return f"{self.study}: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in self.summary.items() if isinstance(v, (int, float, str))
        )

    def row(self) -> dict[str, Any]:
        """The summary as one flat row (a sweep cell), without volatile keys."""
        return {k: v for k, v in flatten(finite(self.summary)).items()
                if k.split(".")[0] not in self.volatile_keys and not isinstance(v, list)}

    def record(self) -> dict[str, Any]:
        """What identifies this run (`icl_kernels.studies.identity.run_record`): fingerprint, resume key,
        configuration, model identity and data source.

        The record the study call computed (`identity`); for a report built by hand, computed here
        once (with the registered study's grid keys) and kept."""
        if self.identity is None:
            try:
                self.identity = get_study(self.study).identify(self.config).record()
            except UnknownNameError:  # not a registered study: no grid keys

                self.identity = run_record(self.study, self.config)
        return self.identity

    def write(self, out: str | os.PathLike, *, environment: bool = True, figures: bool = True) -> Path:
        """Write ``fingerprint.json``, tables, ``config.json``, ``environment.json``, figures,
        ``summary.csv`` (`quantities` of the summary as written) and, last, the summary into
        ``out``; the summary and ``config.json`` carry the run's ``fingerprint`` and
        ``data_source``. No table may be named ``summary`` (its CSV is the long summary)."""
        if "summary" in self.tables:
            raise ValueError(f"{self.study}: a table named 'summary' would overwrite {SUMMARY_TABLE}; rename it.")
        record = self.record()
        stamp = {"fingerprint": record["fingerprint"], "data_source": record["data_source"]}
        out = write_record(out, record)
        for name, frame in self.tables.items():
            if frame is not None:
                write_csv(out / f"{name}.csv", frame.to_dict("records"))
        write_json(out / "config.json", {"study": self.study, **self.config.to_dict(), **stamp})
        if environment:
            write_json(out / "environment.json", env())
        if figures:
            for name, fig in self.figures().items():
                write_html(fig, out / f"{name}.html")
            for name, attachment in self.attachments().items():
                write_json(out / name, finite({**attachment, **stamp}))
        summary = finite({**self.summary, **stamp})
        rows = self.quantities(summary)
        atomic_write_text(out / SUMMARY_TABLE, pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
        write_json(out / self.summary_file, summary)
        return out
