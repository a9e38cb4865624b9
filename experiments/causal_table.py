"""The causal table of the README: every ``causal`` run side by side, read from its ``summary.csv``.

Each run is one ``icl-kernels causal`` output folder (one model and task; the top-k label-attention
heads ranked on the selection split). Per run the table gives the report split's ICL and zero-shot
accuracy, the top heads' accuracy drop minus the random head sets' under mean, zero and resample
ablation, the reverse patch (the top heads' zero-shot outputs written into the ICL run) minus random,
and the recovery of the ICL gain when the top heads' ICL outputs are patched into the zero-shot run
(with the gain it divides by). Every number and interval is the run's own (bootstrap over report
prompts and random head sets, as the study drew it); nothing is recomputed here.

    .venv/bin/python -m experiments.causal_table --runs results/causal --extra results/causal-synthetic

Writes ``causal_table.csv`` (tidy: run, quantity, value, low, high, n) and ``config.json`` into
``out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.command_line import parse_config
from experiments.table_cells import cell
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text, write_csv

#: (column, summary.csv name) of each quantity the table shows, in order.
QUANTITIES = (
    ("icl_accuracy", "icl: clean.accuracy"),
    ("zsl_accuracy", "zsl: clean.accuracy"),
    ("mean_top_minus_random", "icl: top minus random (icl).accuracy_drop"),
    ("zero_top_minus_random", "icl: top minus random (icl) [zero].accuracy_drop"),
    ("resample_top_minus_random", "icl: top minus random (icl) [resample].accuracy_drop"),
    ("resample_top_drop", "icl: ablate top [resample].accuracy_drop"),
    ("reverse_top_minus_random", "icl: top minus random (reverse).accuracy_drop"),
    ("reverse_top_drop", "icl: patch top from zsl into icl.accuracy_drop"),
    ("patch_recovery", "zsl: patch top into zsl.recovery"),
    ("patch_icl_gain", "zsl: patch top into zsl.icl_gain"),
    ("patch_top_minus_random", "zsl: top minus random (zsl).recovery"),
)


@dataclass
class CausalTableConfig(Options):
    """Which causal runs to put side by side, and where the table goes."""

    runs: str = field(default="results/causal", metadata={
        "help": "folder whose subfolders are causal runs (each with summary.csv and summary.json)"})
    extra: tuple[str, ...] = field(default=(), metadata={"help": "further run folders, after those under runs"})
    out: str = "results/causal"

    def __post_init__(self) -> None:
        if not self.runs or not self.out:
            raise InvalidOptionError(f"runs and out must be folders, not {self.runs!r} and {self.out!r}.")


def run_rows(run: Path) -> list[dict]:
    """The table's quantities of one run, as its ``summary.csv`` holds them."""
    summary = pd.read_csv(run / "summary.csv").set_index("name")
    info = json.loads((run / "summary.json").read_text())
    heads = " ".join(f"L{layer}H{head}" for layer, head in info["top_heads"])
    rows = []
    for column, name in QUANTITIES:
        if name not in summary.index:
            continue
        r = summary.loc[name]
        rows.append(dict(run=run.name, quantity=column, value=float(r["value"]), low=float(r["low"]),
                         high=float(r["high"]), n=r["n"], heads=heads, shots=info.get("shots"),
                         model=info.get("model"), task=info.get("task")))
    return rows


def markdown(table: pd.DataFrame) -> str:
    lines = ["| run (top-3 heads) | ICL / zero-shot | top minus random drop: mean ablation | zero | resample "
             "| reverse patch: top minus random | patch ICL into zero-shot: recovery (ICL gain) | recovery minus random |",
             "|---|---|---|---|---|---|---|---|"]
    for _, rows in table.groupby("run", sort=False):
        first = rows.iloc[0]
        gain = rows[rows["quantity"] == "patch_icl_gain"]
        uninformative = not gain.empty and gain.iloc[0]["low"] <= 0
        recovery = ("uninformative (ICL gain " + cell(rows, "patch_icl_gain") + ")" if uninformative
                    else f"{cell(rows, 'patch_recovery')} ({cell(rows, 'patch_icl_gain')})")
        lines.append(" | ".join([
            f"| {first['model']} {first['task']}, {first['shots']} shots ({first['heads']})",
            f"{cell(rows, 'icl_accuracy')} / {cell(rows, 'zsl_accuracy')}",
            cell(rows, "mean_top_minus_random", True), cell(rows, "zero_top_minus_random", True),
            cell(rows, "resample_top_minus_random", True), cell(rows, "reverse_top_minus_random", True), recovery,
            "-" if uninformative else cell(rows, "patch_top_minus_random", True)]) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    add_arguments(parser, CausalTableConfig)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> CausalTableConfig:
    """The table's configuration from a command line; a bad value is a usage error (exit 2)."""
    return parse_config(parser or build_parser(), CausalTableConfig, argv)


def main(argv=None) -> int:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    runs, out = Path(cfg.runs), Path(cfg.out)
    folders = sorted(p for p in runs.iterdir() if (p / "summary.csv").is_file()) if runs.is_dir() else []
    folders += [Path(p) for p in cfg.extra]
    missing = [str(p) for p in folders if not (p / "summary.csv").is_file() or not (p / "summary.json").is_file()]
    if missing or not folders:
        parser.error(f"no finished causal run in {missing or cfg.runs} (expected summary.csv and summary.json).")
    rows = [r for p in folders for r in run_rows(p)]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "causal_table.csv", rows)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    print(markdown(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
