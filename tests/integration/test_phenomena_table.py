"""`experiments.phenomena_table`: conditions paired on their shared report queries."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from experiments import phenomena_table


def _rate(value: float, n: int = 6) -> dict:
    return {"value": value, "low": value - 0.1, "high": value + 0.1, "n": n, "unit": "prompts"}


def _write_run(folder, gold, icl_pred, queries, head="L1.H0"):
    folder.mkdir(parents=True)
    n = len(gold)
    pd.DataFrame({
        "prompt": range(n + 2), "split": ["select"] * 2 + ["report"] * n, "query_index": [90, 91, *queries],
        "gold": [0, 1, *gold], "icl_pred": [0, 1, *icl_pred],
    }).to_csv(folder / "prompts.csv", index=False)
    held = {
        "icl_accuracy": _rate(float(np.mean(np.equal(gold, icl_pred)))),
        "gold_majority_share": {"value": 0.5, "n": n, "unit": "prompts"},
        "model_majority_share": {"value": 0.5, "n": n, "unit": "prompts"},
        "best_head": {"max": {"agreement": _rate(0.5), "accuracy": _rate(0.5),
                              "agreement_minus_majority_share": _rate(0.0)}},
        "kernel_regression": {"demo_majority": {"agreement": _rate(0.0), "abstain": _rate(1.0)},
                              "minilm_cosine": {"agreement": _rate(0.5), "accuracy": _rate(0.5)}},
        "best_head_minus_baseline": {"max": {"minilm_cosine": _rate(0.0)}},
    }
    (folder / "summary.json").write_text(json.dumps({"held_out": held, "best_head_max": head}))


def test_each_condition_is_paired_with_the_reference_on_the_same_queries(tmp_path, capsys):
    gold = [0, 1, 0, 1, 0, 1]
    _write_run(tmp_path / "original-334", gold, gold, range(6))  # all right
    _write_run(tmp_path / "flipped-334", gold, [1, 1, 1, 1, 0, 1], range(6))  # two wrong
    assert phenomena_table.main(["--runs", str(tmp_path), "--conditions", "original,flipped",
                                 "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "phenomena.csv")
    diff = table[(table.condition == "flipped") & (table.quantity == "icl_accuracy_minus_reference")].iloc[0]
    assert diff.value == pytest.approx(4 / 6 - 1.0) and diff.n == 6 and diff.low <= diff.value <= diff.high
    assert table[(table.condition == "original") & (table.quantity == "icl_accuracy_minus_reference")].empty
    assert "| flipped | .667 [.57, .77]; .50 (3 of 6) | -.333 [" in capsys.readouterr().out
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["interval_settings"]
    made_here = settings["icl_accuracy_minus_reference"]
    assert made_here["resamples"] == 2000 and made_here["seed"] == 0 and made_here["reference"] == "original"


def test_a_run_on_other_queries_is_refused(tmp_path):
    gold = [0, 1, 0, 1]
    _write_run(tmp_path / "original-334", gold, gold, range(4))
    _write_run(tmp_path / "flipped-334", gold, gold, [0, 1, 2, 7])
    with pytest.raises(ValueError, match="other report queries"):
        phenomena_table.main(["--runs", str(tmp_path), "--conditions", "original,flipped", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # a missing run is named before anything is read
        phenomena_table.main(["--runs", str(tmp_path), "--conditions", "original,arbitrary", "--out", str(tmp_path)])
