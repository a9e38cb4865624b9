"""The families tables of the README: every ``families`` run side by side, the papers' numbers beside.

Each run is one ``icl-kernels families`` output folder (one model and task). The script reads each
run's ``summary.json`` (accuracies, the function vector and task vector with their intervals, and
the GPT-J numbers of Todd et al. and Hendel et al. that the study records beside them),
``ablation.csv`` (each family's top-k heads under each ablation against the random head sets) and
``isolation.csv`` (label-word vs random isolation, McNemar tests), and writes nothing it does not
read: no interval is recomputed here.

    .venv/bin/python -m experiments.families_table            # every run under results/families

Writes ``families_table.csv`` (tidy: run, table, quantity, value, low, high, n, detail) and
``config.json`` into ``out`` and prints the markdown tables: necessity (each family's top-k
minus random, per ablation), function and task vectors with the papers' GPT-J rows, the copy control
of open tasks (runs that record it: the share of prompts echoing the input answers, and the vectors
on the others), and anchors.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.command_line import parse_config
from experiments.table_cells import cell, number
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text, write_csv

#: The copy control of open tasks (`icl_kernels.families.copy_control`), in the copy table's order.
COPY_QUANTITIES = ("fv_copy_share", "fv_zero_shot_accuracy_no_copy", "fv_accuracy_no_copy", "fv_minus_random_no_copy",
                   "tv_copy_share", "tv_zero_shot_accuracy_no_copy", "tv_accuracy_no_copy", "tv_icl_accuracy_no_copy",
                   "tv_minus_zero_shot_no_copy")
FAMILIES = ("label_attention", "induction", "previous_token", "duplicate_token", "function_vector")


@dataclass
class FamiliesTableConfig(Options):
    """Which families runs to put side by side, and where the table goes."""

    runs: str = field(default="results/families", metadata={
        "help": "folder whose subfolders are families runs (each with summary.json)"})
    names: str = field(default="", metadata={"help": "comma-separated run folders in table order (default: all, sorted)"})
    ablation: str = field(default="resample", metadata={
        "help": "the ablation of the necessity table's headline column (the others follow it)"})
    out: str = "results/families"

    def __post_init__(self) -> None:
        if not self.runs or not self.out:
            raise InvalidOptionError(f"runs and out must be folders, not {self.runs!r} and {self.out!r}.")
        if self.ablation not in ("mean", "zero", "resample"):
            raise InvalidOptionError(f"ablation must be mean, zero or resample, not {self.ablation!r}.")

    def run_names(self, runs: Path) -> list[str]:
        if self.names:
            return [n for n in self.names.split(",") if n]
        return sorted(p.name for p in runs.iterdir() if (p / "summary.json").is_file())


def _interval(value: dict | float | None) -> tuple[float, float, float]:
    if isinstance(value, dict):
        return value["value"], value.get("low", math.nan), value.get("high", math.nan)
    return (math.nan if value is None else float(value)), math.nan, math.nan


def run_rows(name: str, run: Path) -> list[dict]:
    """The tidy rows of one families run (values as the run wrote them)."""
    summary = json.loads((run / "summary.json").read_text())
    rows: list[dict] = []

    def add(table: str, quantity: str, value, n=None, detail: str = "") -> None:
        v, lo, hi = _interval(value)
        rows.append(dict(run=name, table=table, quantity=quantity, value=v, low=lo, high=hi,
                         n=n if n is not None else (value.get("n") if isinstance(value, dict) else None), detail=detail))

    where = f"{summary['model']} / {summary['task']}, {summary['shots']} shots"
    add("run", "icl_accuracy", summary["icl_accuracy"], summary["n_report"], where)
    add("run", "zsl_accuracy", summary["zsl_accuracy"], summary["n_report"], where)
    ablation = pd.read_csv(run / "ablation.csv")
    for r in ablation.itertuples():
        add("necessity", f"{r.family}.{r.ablation}.top_minus_random",
            dict(value=r.top_minus_random, low=r.top_minus_random_low, high=r.top_minus_random_high), r.n,
            f"{r.heads}; top rank {r.top_rank} of {r.n_draws + 1}")
    depth = summary.get("fv_relative_depth")
    fv_detail = (f"layer {summary.get('fv_selected_layer')} (relative depth {depth:.2f}), k={summary.get('fv_k')}, "
                 f"heads ranked on {summary.get('fv_n_correct')} of {summary.get('fv_n_clean')} correct prompts, "
                 f"split-half Spearman {summary.get('fv_split_half_spearman', math.nan):.2f}, "
                 f"label stay {summary.get('fv_label_stay_fraction', math.nan):.2f}") if depth is not None else ""
    for key in ("fv_selected_zero_shot_accuracy", "fv_selected_accuracy", "fv_selected_random_accuracy",
                "fv_selected_minus_random", "fv_selected_minus_zero_shot"):
        if key in summary:
            add("function_vector", key, summary[key], detail=fv_detail)
    if "tv_layer" in summary:
        tv_detail = (f"layer {summary['tv_layer']} (relative depth {summary.get('tv_relative_depth', math.nan):.2f}), "
                     f"{summary.get('tv_source')} queries, {summary.get('tv_format')} format")
        for key in ("tv_zsl_accuracy", "tv_accuracy", "tv_icl_accuracy", "tv_minus_zero_shot", "tv_minus_icl"):
            if key in summary:
                add("task_vector", key, summary[key], summary.get("n_tv_test"), tv_detail)
    for key in COPY_QUANTITIES:
        if key in summary:
            add("copy", key, summary[key])
    isolation_file = run / "isolation.csv"
    if isolation_file.is_file():
        for r in pd.read_csv(isolation_file).itertuples():
            if r.condition == "clean":
                continue
            add("anchors", f"{r.condition}.label_loyalty", dict(value=r.label_loyalty, low=r.loyalty_low,
                                                               high=r.loyalty_high), r.n,
                "" if pd.isna(r.mcnemar_p) else f"McNemar p vs random {r.mcnemar_p:.2g}")
            add("anchors", f"{r.condition}.word_loyalty", dict(value=r.word_loyalty, low=r.word_loyalty_low,
                                                              high=r.word_loyalty_high), r.n)
    return rows


def markdown(table: pd.DataFrame, ablation: str, paper_rows: list[str] = ()) -> str:
    """The README tables: necessity, vectors (``paper_rows``: `papers` of a run, under it), the copy
    control of the runs that have one, and anchors."""
    runs = list(dict.fromkeys(table["run"]))
    others = [a for a in ("mean", "zero", "resample") if a != ablation]
    out = [f"Necessity: each family's top-3 heads ablated at the prediction position, accuracy drop minus the "
           f"mean drop of the random 3-head sets ({ablation} ablation; {' / '.join(others)} after it), "
           "bootstrap over report prompts and random sets:", "",
           "| run | ICL / zero-shot | " + " | ".join(f.replace("_", " ") for f in FAMILIES) + " |",
           "|---|---|" + "---|" * len(FAMILIES)]
    for run in runs:
        rows = table[table["run"] == run]
        cells = []
        for family in FAMILIES:
            main = rows[rows["quantity"] == f"{family}.{ablation}.top_minus_random"]
            if main.empty:
                cells.append("not scored")
                continue
            rest = " / ".join(cell(rows, f"{family}.{a}.top_minus_random", True).split(" [")[0] for a in others)
            cells.append(f"{main.iloc[0]['detail'].split(';')[0]}: {cell(rows, f'{family}.{ablation}.top_minus_random', True)} ({rest})")
        out.append(f"| {run} | {cell(rows, 'icl_accuracy')} / {cell(rows, 'zsl_accuracy')} | " + " | ".join(cells) + " |")
    out += ["", "Function vectors (Todd et al.) and task vectors (Hendel et al.): top-1 accuracy on report prompts, "
            "layer chosen on the selection / dev split:", "",
            "| run | FV layer | zero-shot | + FV | + random-head vectors (mean) | FV minus random | TV layer | "
            "zero-shot | TV | ICL | TV minus zero-shot |", "|---|" + "---|" * 10]
    for run in runs:
        rows = table[table["run"] == run]
        fv = rows[rows["table"] == "function_vector"]
        tv = rows[rows["table"] == "task_vector"]
        fv_layer = fv["detail"].iloc[0].split(", k=")[0] if not fv.empty else "-"
        tv_layer = tv["detail"].iloc[0].split(",")[0] if not tv.empty else "-"
        out.append(" | ".join([
            f"| {run}", fv_layer, cell(rows, "fv_selected_zero_shot_accuracy"), cell(rows, "fv_selected_accuracy"),
            cell(rows, "fv_selected_random_accuracy"), cell(rows, "fv_selected_minus_random", True), tv_layer,
            cell(rows, "tv_zsl_accuracy"), cell(rows, "tv_accuracy"), cell(rows, "tv_icl_accuracy"),
            cell(rows, "tv_minus_zero_shot", True) + " |"]))
    out += list(paper_rows)
    copy_runs = [run for run in runs if not table[(table["run"] == run) & (table["table"] == "copy")].empty]
    if copy_runs:
        out += ["", "Copy control of the vectors on open tasks: the share of evaluated prompts whose answer starts with "
                "the input's own first token (echoing the input scores them), and the accuracies on the other prompts:", "",
                "| run | FV prompts: copy share | zero-shot | + FV | FV minus random | TV prompts: copy share | zero-shot "
                "| TV | ICL | TV minus zero-shot |", "|---|" + "---|" * 9]
        for run in copy_runs:
            rows = table[table["run"] == run]
            out.append(" | ".join([f"| {run}", *(cell(rows, q, "minus" in q)
                                               for q in COPY_QUANTITIES)]) + " |")
    out += ["", "Anchors (Wang et al.): label loyalty when the label words (or as many random non-label tokens) "
            "are isolated in the first / last layers; McNemar test of label words against random on the same prompts:",
            "", "| run | first layers: label words | random | McNemar p | last layers: label words | random | McNemar p |",
            "|---|---|---|---|---|---|---|"]
    for run in runs:
        rows = table[table["run"] == run]
        anchors = rows[rows["table"] == "anchors"]
        if anchors.empty:
            continue

        def pick(where: str, isolated: str) -> tuple[str, str]:
            hit = anchors[anchors["quantity"].str.startswith(f"isolate {isolated}, {where}")
                          & anchors["quantity"].str.endswith("label_loyalty")]
            if hit.empty:
                return "-", ""
            r = hit.iloc[0]
            return cell(hit, r["quantity"]), str(r["detail"]).replace("McNemar p vs random ", "")

        cells = []
        for where in ("first", "last"):
            label, p = pick(where, "label words")
            rnd, _ = pick(where, "random non-label")
            cells += [label, rnd, p or "-"]
        out.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def papers(summary: dict) -> list[str]:
    """The GPT-J rows a run records beside its own (``fv_todd_gptj``: Todd et al.'s function vector,
    ``tv_hendel_gptj``: Hendel et al.'s task vector), as rows of the vectors table."""
    out = []
    todd, hendel = summary.get("fv_todd_gptj"), summary.get("tv_hendel_gptj")
    if todd:
        out.append(f"| Todd et al., {todd['model']} (six tasks, k={todd['k']}) | {todd['layer']} "
                   f"(relative depth {todd['layer'] / (todd['n_layers'] - 1):.2f}) | {number(todd['zero_shot'])} | "
                   f"{number(todd['fv_zero_shot'])} | | | | | | | |")
    if hendel:
        out.append(f"| Hendel et al., {hendel['model']} (18 tasks) | | | | | | median {hendel['median_layer']} of "
                   f"{hendel['n_layers']} | {number(hendel['zero_shot'])} | {number(hendel['task_vector'])} | "
                   f"{number(hendel['icl'])} | |")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    add_arguments(parser, FamiliesTableConfig)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> FamiliesTableConfig:
    """The table's configuration from a command line; a bad value is a usage error (exit 2)."""
    return parse_config(parser or build_parser(), FamiliesTableConfig, argv)


def main(argv=None) -> int:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    runs, out = Path(cfg.runs), Path(cfg.out)
    if not runs.is_dir():
        parser.error(f"{runs} is not a folder of families runs.")
    names = cfg.run_names(runs)
    missing = [n for n in names if not (runs / n / "summary.json").is_file()]
    if missing or not names:
        parser.error(f"no finished families run for {missing or 'any run'} under {runs} (expected <run>/summary.json).")
    rows = [r for n in names for r in run_rows(n, runs / n)]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "families_table.csv", rows)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    summaries = [json.loads((runs / n / "summary.json").read_text()) for n in names]
    paper_rows = next((papers(s) for s in summaries if papers(s)), [])
    print(markdown(pd.DataFrame(rows), cfg.ablation, paper_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
