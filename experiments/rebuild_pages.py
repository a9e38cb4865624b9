"""Redraw the HTML figure pages of finished study runs from the tables they wrote; no model runs.

    python -m experiments.rebuild_pages                       # every run under results/
    python -m experiments.rebuild_pages --results results/heads

A study's figures are built from its report's tables and summary only (`Report.figures`), so the
CSV files and ``summary.json`` / ``metrics.json`` a run left are all a page needs: this reads them
back into the study's report class and rewrites each figure page next to them. Nothing else in the
folder is written, so no number changes. A page that needs tensors the run did not keep (the heads
study's ``attention_map``) is left as it is. A folder whose ``config.json`` names no study, or a
study without figures, is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.command_line import parse_config
from icl_kernels.studies.causal import CausalReport
from icl_kernels.studies.compare import CompareReport
from icl_kernels.studies.families import FamiliesReport
from icl_kernels.studies.heads import HeadsReport
from icl_kernels.studies.momentum import MomentumReport
from icl_kernels.studies.registry import get_study
from icl_kernels.studies.theorem import TheoremReport
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.plotting import write_html

#: The report class of every study whose runs carry figure pages.
REPORTS = {"causal": CausalReport, "compare": CompareReport, "families": FamiliesReport, "heads": HeadsReport,
           "momentum": MomentumReport, "theorem": TheoremReport}


@dataclass
class PagesConfig(Options):
    """Which runs' pages are redrawn."""

    results: str = field(default="results", metadata={"help": "a run folder, or a folder searched for runs"})

    def __post_init__(self) -> None:
        if not self.results:
            raise InvalidOptionError("Invalid PagesConfig: results must not be empty.")


def load_report(run: Path):
    """The report of the study run in ``run``, rebuilt from its files, or a reason why not (str)."""
    config = json.loads((run / "config.json").read_text())
    study = config.pop("study", None)
    if study not in REPORTS:
        return f"no study with figures ({study})"
    cls = REPORTS[study]
    summary_path = run / cls.summary_file
    if not summary_path.is_file():
        return f"no {cls.summary_file}"
    options = get_study(study).config
    known = options.field_names()
    try:
        cfg = options.from_dict({k: v for k, v in config.items() if k in known})
    except (InvalidOptionError, ValueError, TypeError) as err:
        return f"its config.json no longer parses ({err})"
    tables = {path.stem: pd.read_csv(path) for path in sorted(run.glob("*.csv"))}
    summary = json.loads(summary_path.read_text())
    return cls(study, cfg, tables, summary)


def rebuild(run: Path) -> list[Path] | str:
    """Rewrite the figure pages of one run; the pages written, or why none were."""
    report = load_report(run)
    if isinstance(report, str):
        return report
    written = []
    for name, fig in report.figures().items():
        written.append(write_html(fig, run / f"{name}.html"))
    return written or "its report draws no figure from its tables"


def parse_args(argv=None) -> PagesConfig:
    """The configuration from a command line (one flag per `PagesConfig` field)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    add_arguments(parser, PagesConfig)
    return parse_config(parser, PagesConfig, argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    root = Path(cfg.results)
    runs = sorted({p.parent for p in root.rglob("config.json")} | ({root} if (root / "config.json").is_file() else set()))
    for run in runs:
        outcome = rebuild(run)
        if isinstance(outcome, str):
            print(f"{run}: skipped: {outcome}")
        else:
            print(f"{run}: " + ", ".join(p.name for p in outcome))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
