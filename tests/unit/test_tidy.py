"""Long summaries (`icl_kernels.studies.tidy`), `load_run` and the column dictionary: every interval
shape the studies write becomes one row, every number of a summary is in exactly one row (checked on
hand-built summaries and on every run committed under results/), and docs/columns.md is what the
code generates."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from icl_kernels.studies.report import finite, flatten
from icl_kernels.studies.runs import NotARunError, is_run, load_run
from icl_kernels.studies.tidy import COLUMNS, columns_markdown, describe, numeric_leaves, tidy, unflatten

ROOT = Path(__file__).resolve().parents[2]
#: Every study run committed under results/ (a folder with config.json and a summary JSON).
COMMITTED_RUNS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("results/**/") if is_run(p))


def _interval(value, low, high, n=8, unit="prompts", **extra):
    return dict(value=value, low=low, high=high, n=n, unit=unit, **extra)


def _rows(summary) -> dict[str, dict]:
    rows = tidy(summary)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), "a quantity appears twice"
    return {r["name"]: r for r in rows}


def _covers_every_number_once(summary) -> list[dict]:
    rows = tidy(summary, sources=True)
    sources = [s for row in rows for s in row["sources"]]
    assert len(sources) == len(set(sources)), "a number is in two rows"
    assert set(sources) == numeric_leaves(summary)
    return rows


def test_an_interval_record_is_one_row_with_its_interval():
    summary = {"held_out": {"unit": "prompts", "n": 8, "best_head": {"max": {
        "agreement": _interval(0.75, 0.4, 0.93, method="wilson")}}}}
    rows = _rows(summary)
    assert set(rows) == {"held_out.n", "held_out.best_head.max.agreement"}
    row = rows["held_out.best_head.max.agreement"]
    assert (row["value"], row["low"], row["high"], row["n"], row["unit"], row["split"], row["method"]) == (
        0.75, 0.4, 0.93, 8, "prompts", "report", "wilson")
    _covers_every_number_once(summary)


def test_mirrored_intervals_join_their_number():
    """compare: ``X`` and ``intervals.X``; theorem: ``bayes.1.accuracy`` and ``intervals.bayes.1.accuracy``
    and ``model_behaviour_intervals``; heads' probes: ``X`` and ``X_interval``."""
    summary = {
        "simaou": 0.01, "intervals": {"unit": "queries", "simaou": _interval(0.0100001, -0.09, 0.11, unit="queries"),
                                      "icl_minus_zsl_accuracy": _interval(0.1, 0.0, 0.2)},
        "bayes": {"1": {"accuracy": 0.66}},
        "theorem": {"intervals": {"x": 1}},
        "model_behaviour": {"1": {"model_accuracy": 0.59}},
        "model_behaviour_intervals": {"1": {"model_accuracy": _interval(0.59, 0.5, 0.7)}},
        "probe": {"report_accuracy": 0.9, "report_accuracy_interval": _interval(0.9, 0.86, 0.94)},
    }
    summary["intervals"]["bayes"] = {"1": {"accuracy": _interval(0.66, 0.63, 0.69)}}
    rows = _rows(summary)
    assert rows["simaou"]["value"] == 0.01 and (rows["simaou"]["low"], rows["simaou"]["high"]) == (-0.09, 0.11)
    assert rows["simaou"]["unit"] == "queries"
    assert (rows["bayes.1.accuracy"]["low"], rows["bayes.1.accuracy"]["high"]) == (0.63, 0.69)
    assert rows["model_behaviour.1.model_accuracy"]["high"] == 0.7
    assert rows["probe.report_accuracy"]["low"] == 0.86 and rows["probe.report_accuracy"]["split"] == "report"
    assert "intervals.icl_minus_zsl_accuracy" in rows  # a record without its number stays a row
    assert not any(name.startswith(("intervals.simaou", "intervals.bayes", "model_behaviour_intervals")) for name in rows)
    _covers_every_number_once(summary)


def test_ci95_lists_and_low_high_columns_join_their_number():
    summary = {"icl_accuracy": 0.6, "icl_ci95": [0.3, 0.9], "zsl_accuracy": 0.5, "zsl_ci95": [0.2, 0.8],
               "with_momentum": [{"cell_id": "eta=0.3|layers=all", "accuracy": 0.25, "accuracy_ci95": [0.1, 0.5]}],
               "top_drop": 0.25, "top_drop_low": 0.1, "top_drop_high": 0.4,
               "top_minus_random_drop": 0.2, "top_minus_random_low": 0.05, "top_minus_random_high": 0.45,
               "accuracy_drop": 0.125, "drop_low": 0.0, "drop_high": 0.25}
    rows = _rows(summary)
    assert set(rows) == {"icl_accuracy", "zsl_accuracy", "with_momentum[eta=0.3|layers=all].accuracy", "top_drop",
                         "top_minus_random_drop", "accuracy_drop"}
    assert (rows["icl_accuracy"]["low"], rows["icl_accuracy"]["high"], rows["icl_accuracy"]["method"]) == (0.3, 0.9, "ci95")
    assert rows["with_momentum[eta=0.3|layers=all].accuracy"]["high"] == 0.5
    assert (rows["top_minus_random_drop"]["low"], rows["accuracy_drop"]["high"]) == (0.05, 0.25)
    _covers_every_number_once(summary)


def test_unknown_numbers_are_rows_and_non_numbers_are_not():
    summary = {"a": {"b": {"c": 3}}, "rate": [1, 2, 3], "top_heads": [[1, 0], [2, 3]], "flag": True, "note": "text",
               "missing": None, "nan": float("nan")}
    rows = _rows(finite(summary))
    assert set(rows) == {"a.b.c", "rate[0]", "rate[1]", "rate[2]"}
    assert rows["rate[2]"]["value"] == 3
    _covers_every_number_once(finite(summary))


def test_a_flat_row_reads_back_as_its_summary():
    """Sweep rows are `Report.row` (flattened): unflattening gives the same quantities."""
    summary = {"held_out": {"kernel_regression": {"minilm_exp_dot(T=0.1)": {"agreement": _interval(0.4, 0.3, 0.5)}}},
               "with_momentum": [{"cell_id": "eta=0.3|layers=all", "accuracy": 0.25}], "icl_accuracy": 0.5}
    flat = flatten(summary)
    assert "held_out.kernel_regression.minilm_exp_dot(T=0.1).agreement.low" in flat
    nested = unflatten(flat)
    assert nested["held_out"]["kernel_regression"]["minilm_exp_dot(T=0.1)"]["agreement"] == _interval(0.4, 0.3, 0.5)
    assert nested["with_momentum[eta=0.3|layers=all]"] == {"cell_id": "eta=0.3|layers=all", "accuracy": 0.25}
    assert tidy(unflatten(flat)) == tidy(summary)


@pytest.mark.parametrize("folder", COMMITTED_RUNS)
def test_every_number_of_a_committed_run_is_in_exactly_one_row(folder):
    run = load_run(ROOT / folder)
    rows = _covers_every_number_once(run.summary)
    names = list(run.summary_table["name"])
    assert list(run.summary_table.columns) == COLUMNS and len(names) == len(set(names))
    assert {r["name"] for r in rows} <= set(names)
    # the only rows beyond summary.json's numbers: a causal run's conditions (CausalReport.quantities)
    extra = set(names) - {r["name"] for r in rows}
    assert all(run.study == "causal" and re.match(r"(icl|zsl): ", n) for n in extra), sorted(extra)[:5]
    with_interval = [r for r in rows if r["low"] is not None and r["value"] is not None]
    assert all(r["low"] <= r["value"] + 1e-9 and r["value"] <= r["high"] + 1e-9 for r in with_interval
               if not math.isnan(r["low"]))


def test_committed_runs_cover_the_studies_with_intervals():
    studies = {load_run(ROOT / f).study for f in COMMITTED_RUNS}
    assert {"heads", "compare", "theorem", "momentum", "families"} <= studies
    table = load_run(ROOT / "results/compare/gemma-trec").summary_table.set_index("name")
    # the number and its interval record (intervals.zsl_accuracy) are one row
    assert table.loc["zsl_accuracy", "method"] == "wilson" and "intervals.zsl_accuracy" not in table.index
    assert table.loc["zsl_accuracy", "low"] < table.loc["zsl_accuracy", "value"] < table.loc["zsl_accuracy", "high"]


@pytest.mark.parametrize("folder", [f for f in COMMITTED_RUNS if load_run(ROOT / f).study is not None])
def test_the_column_dictionary_describes_every_quantity_of_the_committed_runs(folder):
    run = load_run(ROOT / folder)
    missing = [name for name in run.summary_table["name"] if not describe(run.study, name)]
    assert not missing, f"{run.study}: no description for {missing[:5]}"


def test_load_run_reads_tables_summary_and_fingerprint():
    run = load_run(ROOT / "results/momentum/gemma-3-270m-mr")
    summary = json.loads((ROOT / "results/momentum/gemma-3-270m-mr/metrics.json").read_text())
    assert run.study == "momentum" and run.summary == summary and run.fingerprint == summary["fingerprint"]
    assert {"grid", "prompts", "perplexity"} <= set(run.tables) and isinstance(run.tables["grid"], pd.DataFrame)
    assert run.config["study"] == "momentum" and run.environment
    row = run.quantity("without_momentum.accuracy")
    assert row["value"] == summary["without_momentum"]["accuracy"]
    assert [row["low"], row["high"]] == summary["without_momentum"]["accuracy_ci95"]
    with pytest.raises(KeyError, match="no quantity"):
        run.quantity("no_such_quantity")


def test_an_older_causal_run_keeps_its_condition_table():
    """Runs written before summary.csv was the long table: that file is the table ``summary``
    (``tests/data/older-causal-run``: the synthetic causal run as committed before issue 28's rerun)."""
    run = load_run(ROOT / "tests/data/older-causal-run")
    assert "condition" in run.tables["summary"].columns and list(run.summary_table.columns) == COLUMNS
    assert run.study is None  # its config.json predates the study name


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    for folder, words in ((tmp_path / "absent", "is not a folder"), (tmp_path, "is not a study run")):
        with pytest.raises(NotARunError, match=words) as error:
            load_run(folder)
        assert "\n" not in str(error.value)
    (tmp_path / "results.csv").write_text("cell_id\n")
    with pytest.raises(NotARunError, match="a sweep"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(NotARunError, match="not a JSON object"):
        load_run(tmp_path)


def test_load_run_is_exported_without_importing_torch():
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = ("import sys, icl_kernels; run = icl_kernels.load_run('results/momentum/gemma-3-270m-mr'); "
            "print(run.study, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["momentum", "False"]


def test_docs_columns_md_is_what_the_code_generates():
    assert (ROOT / "docs" / "columns.md").read_text(encoding="utf-8") == columns_markdown(), (
        "docs/columns.md is out of date: run python -m experiments.columns_doc")
