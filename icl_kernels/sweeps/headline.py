"""One tidy table of a sweep's headline numbers: a row per (cell, metric), the same columns for every study.

`headline` reads a sweep's ``results.csv`` (one wide row per cell, each study with its own columns:
``report.row()``) and keeps, per cell, the few metrics `HEADLINES` names for its study, with their
95% interval where the row has one. Columns: `ID_COLUMNS`, ``study``, ``metric``, ``value``,
``low``, ``high``. An interval of metric ``X`` is read from ``X.low``/``X.high`` (with the value in
``X.value``), ``intervals.X.low``/``intervals.X.high``, ``X_low``/``X_high``, or the columns
`INTERVALS` names. A study not in `HEADLINES` (a plugin's) shows every numeric metric of its rows.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from icl_kernels.studies.tidy import INTERVAL_ALIASES

__all__ = ["BOOKKEEPING", "COLUMNS", "HEADLINES", "ID_COLUMNS", "INTERVALS", "headline", "text"]

#: A cell's coordinates (``-``: an axis its study has no field for).
ID_COLUMNS = ["model", "task", "shots", "seed", "layer"]
COLUMNS = [*ID_COLUMNS, "study", "metric", "value", "low", "high"]

#: Per study: (label, column pattern) of each headline metric. A pattern is a regular expression
#: matched against the row's columns (whole name; ``X.value`` counts as ``X``); the label is a format
#: string over the row's values (``{column}``) and ``{match}``, the matched column. Rows of the
#: former analysis name ``patching`` count as ``causal``.
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "eval": (("zero-shot accuracy", "zsl_accuracy"), ("ICL accuracy", "icl_accuracy"),
             ("ICL accuracy, calibrated", "icl_calibrated_accuracy")),
    "heads": (("ICL accuracy", "icl_accuracy"),
              ("best head {best_head_max}: agreement with the model (held out)", r"held_out\.best_head\.max\.agreement"),
              ("best head {best_head_max}: accuracy (held out)", r"held_out\.best_head\.max\.accuracy")),
    "theorem": (("{match}", r"(bayes|oracle|kr_\w+|label_\w+)\.\d+\.accuracy"),
                ("{match}", r"model_behaviour\.\d+\.(model|head)_accuracy")),
    "compare": (("ICL accuracy", "icl_accuracy"), ("zero-shot accuracy", "zsl_accuracy"),
                ("finetuned accuracy", "ft_accuracy"), ("SimAOU", "simaou"), ("Kendall", "kendall")),
    "momentum": (("accuracy without momentum", r"without_momentum\.accuracy"),
                 ("{match}", r"with_momentum\[.*\]\.(accuracy|delta_accuracy)")),
    "causal": (("ICL accuracy", "icl_accuracy"), ("zero-shot accuracy", "zsl_accuracy"),
               ("drop, top-k heads ablated", "top_drop"), ("drop, random k heads ablated", "random_drop"),
               ("drop, top minus random", "top_minus_random_drop"),
               ("drop, layer's heads ablated", "accuracy_drop"), ("recovery, layer patched into zero-shot", "recovery")),
    "families": (("ICL accuracy", "icl_accuracy"), ("zero-shot accuracy", "zsl_accuracy"),
                 ("function vector accuracy (selected layer)", "fv_selected_accuracy"),
                 ("task vector accuracy", "tv_accuracy")),
}

#: Metrics whose interval columns are named otherwise: metric -> (low column, high column).
INTERVALS = INTERVAL_ALIASES

#: Columns that are never metrics of a plugin study's fallback rows.
BOOKKEEPING = {"cell_id", "analysis", "status", "n_test", "package_version", "run_fingerprint", "data_source",
                "elapsed_s", "finished_at", "worker_pid", *ID_COLUMNS}
_INTERVAL_PARTS = re.compile(r"(^intervals\.|\.(low|high|n|unit|method|resamples|seed)$|_(low|high)$)")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _metric_columns(row: dict[str, Any]) -> list[str]:
    """Every metric name of a row: its columns with a number, ``X.value`` read as ``X``."""
    names = []
    for column, value in row.items():
        name = column.removesuffix(".value")
        if name not in names and _number(value) is not None:
            names.append(name)
    return names


def _value_and_interval(row: dict[str, Any], name: str) -> tuple[float | None, float | None, float | None]:
    value = _number(row.get(name, row.get(f"{name}.value")))
    for low, high in (INTERVALS.get(name, ("", "")), (f"{name}.low", f"{name}.high"),
                      (f"intervals.{name}.low", f"intervals.{name}.high"), (f"{name}_low", f"{name}_high")):
        if _number(row.get(low)) is not None and _number(row.get(high)) is not None:
            return value, _number(row[low]), _number(row[high])
    return value, None, None


def _label(label: str, row: dict[str, Any], match: str) -> str:
    try:
        return label.format(match=match, **{k: v for k, v in row.items() if k.isidentifier()})
    except (KeyError, IndexError, ValueError):
        return match


def _metrics(study: str, row: dict[str, Any]) -> list[tuple[str, float, float | None, float | None]]:
    """(label, value, low, high) of each headline metric of one cell's row."""
    names = _metric_columns(row)
    specs = HEADLINES.get(study)
    if specs is None:  # a study without headlines here: every number of its row
        specs = tuple(("{match}", re.escape(name)) for name in names
                      if name not in BOOKKEEPING and not _INTERVAL_PARTS.search(name))
    out = []
    for label, pattern in specs:
        for name in names:
            if re.fullmatch(pattern, name):
                value, low, high = _value_and_interval(row, name)
                if value is not None:
                    out.append((_label(label, row, name), value, low, high))
    return out


def headline(results: pd.DataFrame) -> pd.DataFrame:
    """The tidy table of a sweep's ``results.csv`` rows: `COLUMNS`, cells in the table's order."""
    rows = []
    for record in results.to_dict("records"):
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        study = {"patching": "causal"}.get(str(record.get("analysis")), str(record.get("analysis")))
        ids = {c: record.get(c, "-") for c in ID_COLUMNS}
        for label, value, low, high in _metrics(study, record):
            rows.append(dict(ids, study=study, metric=label, value=value, low=low, high=high))
    return pd.DataFrame(rows, columns=COLUMNS)


def text(table: pd.DataFrame) -> str:
    """The table for a terminal: aligned columns, 3 decimals, empty cells for missing intervals."""
    if table.empty:
        return "(no headline numbers)"
    shown = table.copy()
    for column in ("value", "low", "high"):
        if column in shown:
            shown[column] = shown[column].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{round(v, 3) + 0.0:.3f}")  # no "-0.000"
    return shown.to_string(index=False)
