"""The README's compare table (`experiments.compare_table`): verdicts follow the intervals alone, and the
table is built from the runs' summaries without recomputing anything."""

from __future__ import annotations

import json

from experiments import compare_table
from experiments.compare_table import fmt, side, verdict


def _iv(value, low, high):
    return {"value": value, "low": low, "high": high, "n": 20, "unit": "demonstration sets", "method": "cluster bootstrap"}


def test_side_reads_only_the_interval():
    assert side(_iv(0.1, 0.01, 0.2)) == "above"
    assert side(_iv(-0.1, -0.2, -0.01)) == "below"
    assert side(_iv(0.1, 0.0, 0.2)) == "holds 0"  # touching 0 is holding it
    assert side(_iv(None, None, None)) == side(None) == "undefined"


def test_verdicts_agree_only_when_every_control_is_excluded_on_the_papers_side():
    above, holds, below = _iv(0.1, 0.05, 0.15), _iv(0.01, -0.01, 0.03), _iv(-0.1, -0.15, -0.05)
    assert verdict({"mismatched": above, "untrained": above}).startswith("agrees")
    assert verdict({"mismatched": above, "untrained": holds}) == "undetermined (holds 0: untrained)"
    assert verdict({"mismatched": above, "untrained": below}) == "opposite (below: untrained)"
    # a metric that does not move with the learning rate is not informative, whatever else it does
    assert verdict({"lr -> 0": holds, "untrained": above}, lr0="lr -> 0").startswith("not informative here")
    assert verdict({"lr -> 0": above, "untrained": None}, lr0="lr -> 0") == "agrees (above: lr -> 0)"
    assert verdict({"x": None}) == "undetermined (holds 0: no defined control)"


def test_fmt_scales_signs_and_marks_undefined():
    assert fmt(_iv(0.4, 0.2, 0.57), 100, 1, sign=True) == "+40.0 [+20.0, +57.0]"
    assert fmt(_iv(float("nan"), None, None)) == "undefined"
    # a t interval past the quantity's range is clipped to it (0.915 [0.721, 1.089] over 8 sets)
    assert fmt(_iv(0.915, 0.721, 1.089)) == "0.915 [0.721, 1.000]"
    assert fmt(_iv(0.05, -0.02, 0.12), 100, 1, bounds=(0.0, 1.0)) == "5.0 [0.0, 12.0]"
    # an effect that would print as -0.000 [-0.000, -0.000] shows its size
    assert fmt(_iv(-2.1e-5, -3.04e-5, -1.2e-5), sign=True) == "-2.1e-05 [-3.0e-05, -1.2e-05]"


def test_main_writes_the_tidy_table_and_verdicts(tmp_path, capsys):
    sets = {"unit": "demonstration sets"}
    for key in ("zsl_accuracy", "ft_accuracy", "icl_accuracy", "simaou_official", "kendall"):
        sets[key] = _iv(0.5, 0.4, 0.6)
    sets["ft_minus_zsl_accuracy"] = _iv(0.2, 0.1, 0.3)
    sets["icl_minus_ft_accuracy"] = _iv(0.1, -0.05, 0.2)
    metrics = {"n_test": 100, "n_episodes": 20, "shots": 4, "lr": 1e-3, "lr_untrained": 1e-2, "n_ftp": 0,
               "rec2ftp": float("nan"), "intervals_by_episode": sets,
               "controls": {"lr0": {"metrics": {"kendall": {"control": 0.5, "difference": _iv(0.0, -0.01, 0.01)}}}}}
    run = tmp_path / "run-a"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert compare_table.main([str(run), "--out", str(tmp_path / "table")]) == 0
    text = capsys.readouterr().out
    assert "| run-a |" in text.splitlines()[0] and "100 / 20 / 4; 0.001 / 0.01" in text
    assert "run-a: accuracy order ICL > FT > ZSL: undetermined (holds 0: ICL - FT)" in text
    assert "run-a: Kendall above its controls: not informative here" in text
    tidy = (tmp_path / "table" / "compare_table.csv").read_text().splitlines()
    assert tidy[0] == "run,quantity,value,low,high,n,unit,method" and any("kendall_minus_lr0" in row for row in tidy)
    assert (tmp_path / "table" / "verdicts.csv").is_file() and (tmp_path / "table" / "config.json").is_file()
