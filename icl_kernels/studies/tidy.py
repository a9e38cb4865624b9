"""A study's summary as a long table: one row per reported quantity, its interval in the same row.

Summaries (``summary.json`` / ``metrics.json``) are nested dictionaries, and the studies attach an
interval to a number in a few ways. `tidy` recognises the ones they use:

* an *interval record*: a mapping with ``value`` and any of ``low``, ``high``, ``n``, ``unit``,
  ``method`` (and ``resamples``, ``seed``, ``level``, ``n_rows``, ``widened``), as
  `icl_kernels.utils.stats` builds them (``heads``' ``held_out``, ``families``' ``fv_selected_*``,
  ``compare``'s ``intervals``);
* a *mirror*: ``intervals`` beside numbers holds interval records at the same paths as those numbers
  (``compare``: ``zsl_accuracy`` and ``intervals.zsl_accuracy``; ``theorem``: ``bayes.1.accuracy``
  and ``intervals.bayes.1.accuracy``), ``K_intervals`` mirrors ``K`` (``theorem``'s
  ``model_behaviour_intervals``), and a record ``X_interval`` beside ``X`` is its interval
  (``heads``' probes' ``report_accuracy_interval``): the number and its record become one row;
* a ``[low, high]`` list: ``X_ci95`` beside ``X`` (``momentum``), or beside ``P_accuracy`` as
  ``P_ci95`` (``eval``'s ``icl_ci95``);
* ``X_low`` / ``X_high`` beside ``X``, and the two pairs named otherwise (`INTERVAL_ALIASES`:
  ``causal``'s ``top_minus_random_low`` and ``drop_low``).

Every other number becomes a row of its own named by its dotted path, so nothing is dropped: a
list of records is entered by each record's ``cell_id`` (``with_momentum[eta=0.3|layers=all]``, as
`icl_kernels.studies.report.flatten` names it) and a flat list of numbers by position
(``icl_prediction_rate[2]``). Not quantities, hence not rows: text, booleans, nulls and lists of
lists (head coordinates such as ``top_heads``); they stay in the JSON.

Columns (`COLUMNS`): ``name``, ``value``, ``low``, ``high`` (empty without an interval), ``n`` and
``unit`` (what the interval counts: prompts, queries, demonstration sets; the nearest ``unit`` of
the record or of an enclosing mapping), ``split`` (``report`` for numbers under ``held_out`` or
named ``report_*``/``*_report``, ``select`` for ``select_*``; otherwise empty) and ``method`` (how
the interval was made: ``wilson``, ``percentile bootstrap``, ``cluster bootstrap``; ``ci95`` for a
bare ``[low, high]`` list).

`unflatten` turns a flat row (a sweep's ``results.csv`` row, `Report.row`) back into the nested
form, so that `tidy` reads sweep cells too. `numeric_leaves` lists what a summary holds, so that a
test can check every number is in exactly one row. `QUANTITIES` and `columns_markdown` are the
column dictionary (``docs/columns.md``, written by ``python -m experiments.columns_doc``).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = ["COLUMNS", "INTERVAL_ALIASES", "QUANTITIES", "columns_markdown", "describe", "numeric_leaves", "register_quantities",
           "split_name", "tidy", "tidy_frame", "unflatten"]

COLUMNS = ["name", "value", "low", "high", "n", "unit", "split", "method"]

#: Keys of an interval record besides ``value``.
RECORD_KEYS = frozenset({"low", "high", "n", "unit", "method", "resamples", "seed", "level", "n_rows", "widened"})

#: Numbers whose interval bounds are named otherwise: value key -> (low key, high key).
INTERVAL_ALIASES: dict[str, tuple[str, str]] = {
    "top_minus_random_drop": ("top_minus_random_low", "top_minus_random_high"),
    "accuracy_drop": ("drop_low", "drop_high"),
}

Path = tuple[str, ...]


def _is_number(value: Any) -> bool:
    """A real number that is not a bool and not NaN (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(float(value))


def _str_keys(node: Any) -> Any:
    """``node`` with every mapping key a string (an in-memory summary may key shot counts by int,
    its JSON by string: both give the same names)."""
    if isinstance(node, Mapping):
        return {str(k): _str_keys(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_str_keys(v) for v in node]
    return node


def _is_record(value: Any) -> bool:
    return (isinstance(value, Mapping) and "value" in value and set(value) - {"value"} <= RECORD_KEYS
            and bool({"low", "high", "n"} & set(value)) and (value["value"] is None or _is_number(value["value"])))


def _list_key(key: str, item: Mapping, i: int) -> str:
    return f"{key}[{item.get('cell_id', i)}]"


def _walk(node: Mapping[Any, Any], path: Path, out: dict[Path, Any]) -> None:
    """Fill ``out`` with path -> number, interval record or ``[low, high]`` list, in summary order."""
    for key, value in node.items():
        key = str(key)
        here = (*path, key)
        if _is_record(value):
            out[here] = dict(value)
        elif isinstance(value, Mapping):
            _walk(value, here, out)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                _walk(item, (*path, _list_key(key, item, i)), out)
        elif isinstance(value, (list, tuple)):
            if key.endswith("_ci95") and len(value) == 2 and all(v is None or _is_number(v) for v in value):
                out[here] = list(value)
            elif all(_is_number(v) or v is None for v in value):
                for i, v in enumerate(value):
                    if _is_number(v):
                        out[(*path, f"{key}[{i}]")] = v
        elif _is_number(value):
            out[here] = value


def numeric_leaves(summary: Mapping[Any, Any]) -> set[str]:
    """The dotted path of every number in ``summary`` that `tidy` must account for (list elements
    as ``key[i]``, records of a list by ``cell_id``; lists of lists and non-numbers excluded)."""
    out: set[str] = set()

    def visit(node: Any, path: Path) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, (*path, str(key)))
        elif isinstance(node, (list, tuple)):
            if node and all(isinstance(v, Mapping) for v in node):
                for i, item in enumerate(node):
                    visit(item, (*path[:-1], _list_key(path[-1], item, i)))
            elif all(_is_number(v) or v is None for v in node):
                for i, v in enumerate(node):
                    if _is_number(v):
                        out.add(".".join((*path[:-1], f"{path[-1]}[{i}]")))
        elif _is_number(node):
            out.add(".".join(path))

    visit(_str_keys(summary), ())
    return out


def _unit(summary: Mapping[str, Any], path: Path) -> str | None:
    """The ``unit`` of the nearest enclosing mapping of ``path`` that has one."""
    nodes = [summary]
    for key in path[:-1]:
        node = nodes[-1].get(key) if isinstance(nodes[-1], Mapping) else None
        if not isinstance(node, Mapping):
            break
        nodes.append(node)
    for node in reversed(nodes):
        if isinstance(node.get("unit"), str):
            return node["unit"]
    return None


def split_name(path: Path) -> str:
    """``report`` for numbers under ``held_out`` or named ``report_*``/``*_report``; ``select`` for
    ``select_*``/``*_select``; otherwise empty."""
    leaf = path[-1] if path else ""
    if "held_out" in path or leaf.startswith("report_") or leaf.endswith("_report"):
        return "report"
    if leaf.startswith("select_") or leaf.endswith("_select"):
        return "select"
    return ""


def _mirror_target(path: Path) -> Path | None:
    """The path of the number an interval record at ``path`` mirrors (see the module docstring)."""
    if path and path[-1].endswith("_interval"):
        return (*path[:-1], path[-1].removesuffix("_interval"))
    for i, key in enumerate(path[:-1]):
        if key == "intervals":
            return (*path[:i], *path[i + 1:])
        if key.endswith("_intervals"):
            return (*path[:i], key.removesuffix("_intervals"), *path[i + 1:])
    return None


def _bare_leaf(key: str) -> str:
    return re.sub(r"\[[^\]]*\]$", "", key)


def tidy(summary: Mapping[Any, Any], *, sources: bool = False) -> list[dict[str, Any]]:
    """One row per quantity of ``summary`` (`COLUMNS`), in the summary's order.

    With ``sources``, each row also has ``sources``: the `numeric_leaves` paths it accounts for
    (its value, its bounds, its ``n``, a mirrored number), so that a test can check that every
    number of a summary is in exactly one row.
    """
    summary = _str_keys(summary)
    items: dict[Path, Any] = {}
    _walk(summary, (), items)
    used: set[Path] = set()
    # a record that mirrors a number: the number's row takes the record's interval
    mirrored: dict[Path, Path] = {}
    for path, item in items.items():
        target = _mirror_target(path) if isinstance(item, dict) else None
        if target is not None and _is_number(items.get(target)):
            mirrored[target] = path
    rows = []
    for path, item in items.items():
        if path in used:
            continue
        used.add(path)
        parent, leaf = path[:-1], path[-1]
        row: dict[str, Any] = dict(name=".".join(path), value=None, low=None, high=None, n=None,
                                   unit=_unit(summary, path), split=split_name(path), method=None)
        covered = []
        if isinstance(item, dict):  # an interval record (not mirrored: those join their number)
            if path in mirrored.values():
                used.discard(path)
                continue
            record, covered = item, [f"{row['name']}.{k}" for k, v in item.items() if _is_number(v)]
            row.update(value=record["value"], low=record.get("low"), high=record.get("high"), n=record.get("n"),
                       method=record.get("method"), unit=record.get("unit") or row["unit"])
        elif isinstance(item, list):  # a [low, high] list whose number is absent: a row of its own
            row.update(low=item[0], high=item[1], method="ci95")
            covered = [f"{row['name']}[{i}]" for i, v in enumerate(item) if _is_number(v)]
        else:
            row["value"] = item
            covered = [row["name"]]
            bare = _bare_leaf(leaf)
            if path in mirrored:
                rpath = mirrored[path]
                record = items[rpath]
                used.add(rpath)
                name = ".".join(rpath)
                covered += [f"{name}.{k}" for k, v in record.items() if _is_number(v)]
                row.update(low=record.get("low"), high=record.get("high"), n=record.get("n"),
                           method=record.get("method"), unit=record.get("unit") or row["unit"])
            else:
                ci_keys = [f"{bare}_ci95"] + ([f"{bare.removesuffix('_accuracy')}_ci95"] if bare.endswith("_accuracy") else [])
                for ci in ci_keys:
                    ci_path = (*parent, ci)
                    if isinstance(items.get(ci_path), list) and ci_path not in used:
                        used.add(ci_path)
                        low, high = items[ci_path]
                        row.update(low=low, high=high, method="ci95")
                        covered += [f"{'.'.join(ci_path)}[{i}]" for i, v in enumerate(items[ci_path]) if _is_number(v)]
                        break
                else:
                    lo_key, hi_key = INTERVAL_ALIASES.get(bare, (f"{bare}_low", f"{bare}_high"))
                    lo_path, hi_path = (*parent, lo_key), (*parent, hi_key)
                    if (lo_path in items or hi_path in items) and lo_path not in used and hi_path not in used:
                        for p, column in ((lo_path, "low"), (hi_path, "high")):
                            if _is_number(items.get(p)):
                                used.add(p)
                                row[column] = items[p]
                                covered.append(".".join(p))
        if sources:
            row["sources"] = covered
        rows.append(row)
    return rows


def tidy_frame(summary: Mapping[Any, Any]) -> pd.DataFrame:
    """`tidy` as a ``pandas`` frame with `COLUMNS`."""
    return pd.DataFrame(tidy(summary), columns=COLUMNS)


_SEGMENT = re.compile(r"(?:[^.\[(]|\[[^\]]*\]|\([^)]*\))+")


def unflatten(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A flat row (``{"a.b": 1}``, `icl_kernels.studies.report.flatten`) back into nested mappings;
    dots inside ``[...]`` or ``(...)`` do not split. A key that is both a number and a prefix of
    other keys stays whole."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        parts = _SEGMENT.findall(str(key)) or [str(key)]
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:  # a number here already: keep this key flat
                    node = None
                    break
                child = node[part] = {}
            node = child
        if node is None or isinstance(node.get(parts[-1]), dict):
            out[str(key)] = value
        else:
            node[parts[-1]] = value
    return out


#: The column dictionary: per study, (pattern, description) of its quantities, read by
#: `describe` and `columns_markdown`. A pattern is a regular expression matched against the whole
#: quantity name; ``<k>`` in a description stands for what ``\\d+`` matches (a shot count).
QUANTITIES: dict[str, tuple[tuple[str, str], ...]] = {}


#: Quantities every run may have, described after the study's own (`describe`).
COMMON_QUANTITIES: tuple[tuple[str, str], ...] = (
    (r"data_source\..*", "the task data the run read: bytes, rows read, rows dropped (empty, duplicate, conflicting labels)"),
    (r"seconds|elapsed_s|timing\..*", "seconds the run (or a stage) took: differs between reruns"),
)


def register_quantities(study: str, entries: tuple[tuple[str, str], ...]) -> None:
    """Describe ``study``'s quantities: (pattern, description) pairs, first match wins (each study's
    module calls this next to its report code)."""
    for pattern, _ in entries:
        re.compile(pattern)
    QUANTITIES[study] = tuple(entries)


def describe(study: str, name: str) -> str:
    """The description of quantity ``name`` of ``study`` from `QUANTITIES` (first match), or ''."""
    from icl_kernels.studies.registry import get_study  # noqa: PLC0415 - imports torch; reading runs must not

    get_study(study)  # registers the built-in studies, and with them their descriptions
    for pattern, text in (*QUANTITIES.get(study, ()), *COMMON_QUANTITIES):
        if re.fullmatch(pattern, name):
            return text
    return ""


def _shown(pattern: str) -> str:
    """A pattern for a markdown table cell (``|`` escaped)."""
    return pattern.replace("|", "\\|")


def columns_markdown() -> str:
    """``docs/columns.md``: the long table's columns, then each registered study's quantities."""
    from icl_kernels.studies.registry import list_studies  # noqa: PLC0415 - imports torch; reading runs must not

    studies = list_studies()
    lines = [
        "# Column dictionary",
        "",
        "Generated from the code by `python -m experiments.columns_doc` (`icl_kernels.studies.tidy.columns_markdown`);",
        "a test checks that this file is what the code generates. Do not edit by hand.",
        "",
        "Every run writes `summary.csv` beside its summary JSON: one row per reported quantity",
        "(`icl_kernels.studies.tidy`). `icl_kernels.load_run(folder).summary_table` reads it back, and",
        "`icl-kernels summarize RUN [RUN ...]` prints runs side by side.",
        "",
        "| column | meaning |",
        "|---|---|",
        "| name | the quantity: its dotted path in the summary JSON (records of a list by `cell_id`, list items by position) |",
        "| value | the number |",
        "| low, high | its 95% interval, empty when the run reports none |",
        "| n | how many units the interval counts |",
        "| unit | the unit: prompts, queries, demonstration sets |",
        "| split | `report` (held out: chosen on the selection split, measured on the report split), `select`, or empty |",
        "| method | how the interval was made (`wilson`, `percentile bootstrap`, `cluster bootstrap`; `ci95`: a bare [low, high]) |",
        "",
        "A sweep's long table (`<sweep>/summary/long.csv`, `icl-kernels summarize SWEEP`) has `cell`, the cell's",
        "coordinates, `study`, `quantity`, `value`, `low`, `high`, `n`; `--wide` prints one row per cell instead.",
        "",
        "Quantities not listed below are still rows (named by their path); text, booleans, nulls and lists of",
        "lists (head coordinates) stay in the JSON only.",
    ]
    for study in studies:
        lines += ["", f"## {study.name}", "", study.help, ""]
        entries = QUANTITIES.get(study.name, ())
        if not entries:
            lines.append("(no descriptions registered)")
            continue
        lines += ["| quantity (regular expression, first match) | description |", "|---|---|"]
        lines += [f"| `{_shown(pattern)}` | {_shown(text)} |" for pattern, text in entries]
    lines += ["", "## every study", "", "After a study's own patterns:", "", "| quantity | description |", "|---|---|"]
    lines += [f"| `{_shown(pattern)}` | {_shown(text)} |" for pattern, text in COMMON_QUANTITIES]
    return "\n".join(lines) + "\n"
