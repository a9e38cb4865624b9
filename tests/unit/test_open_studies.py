"""Open-vocabulary tasks in the heads, causal and families studies (issue 28, item 1): head votes over
single-token answers, the model's top-1 token read as a class (a token that is no answer agrees with
nothing), causal and families accuracies from the full-vocabulary scorer, and the refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_tiny

from icl_kernels.data.conditions import study_prompts
from icl_kernels.data.prompts import gold_answer_ids
from icl_kernels.data.tasks.definition import Task
from icl_kernels.data.tasks.registry import get_task, register_task, unregister_task
from icl_kernels.engine.patching import open_effects_frame, open_run_with_edits, patch_heads
from icl_kernels.engine.vocab_scoring import answer_scores
from icl_kernels.families.head_ablation import CausalConfig, ablation_edits, causal_study, layer_study
from icl_kernels.kernel.head_scan import MAX_OPEN_CLASSES, analyze_heads, vocabulary_classes
from icl_kernels.kernel.scores import score_heads
from icl_kernels.studies import families
from icl_kernels.studies.families import FamiliesConfig, _ablate, _anchors, _prompts, _rank_heads
from icl_kernels.studies.head_scores import HeadScoreInputs, head_scores
from icl_kernels.studies.preflight import check_installed
from icl_kernels.studies.registry import get_study
from icl_kernels.utils.config import PromptOptions
from icl_kernels.utils.errors import InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LETTERS = "capitalize-first-letter"  # 26 answers " A" .. " Z", one token each on the GPT-2 tokenizer


def test_a_top1_token_that_is_no_answer_is_no_class_and_agrees_with_no_head():
    """Three prompts, one head that votes class 0 and one that abstains (a tie): a prediction outside
    the answers (class n_classes) agrees with neither, also not with the abstention (-1)."""
    assert vocabulary_classes(torch.tensor([11, 30, 12]), [11, 12], 50).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="share a first token"):
        vocabulary_classes(torch.tensor([1]), [3, 3], 10)
    labels = torch.tensor([[0, 1]] * 3)
    weights = torch.tensor([[0.9, 0.1], [0.5, 0.5]])[None, None].expand(3, 1, 2, 2)  # [prompt layer head demo]
    predictions = torch.tensor([0, 2, 2])  # prompt 0 predicts class 0; prompts 1, 2 answer outside (n_classes=2)
    scores = score_heads({"max": weights}, labels, predictions, torch.tensor([0, 1, 0]), 2)
    assert scores.agreement["max"][0].tolist() == pytest.approx([1 / 3, 0.0])


def _letters_as_labels() -> Task:
    """The letter task as a classification task whose label words are its answers (same data, template)."""
    open_task = get_task(LETTERS)

    def loader(seed, cache_dir=None):
        return open_task.load(seed=seed).remove_columns("answer")

    return Task(name="letters-as-labels", description="capitalize-first-letter as classification (test)",
                source="test", text_fields=("input",), template=open_task.template,
                label_words=open_task.answer_words, demo_separator=open_task.demo_separator, loader=loader)


def test_open_heads_with_argmax_over_answers_equal_the_classification_task_with_those_label_words(backend):
    """``open_prediction=answers`` on an open task with single-token answers scores every head exactly as
    the classification task whose label words are those answers; ``vocabulary`` reads the model's top-1
    token over the vocabulary (checked against `answer_scores`) as its class or no class."""
    model = load_tiny("gpt-neo", backend)
    heads = get_study("heads")
    options = dict(model="tiny-gpt-neo", shots=3, n_test=12, balanced=False, similarity=False, kr_minilm=False,
                   view_prompts=0, device="cpu")
    register_task(_letters_as_labels())
    try:
        as_labels = heads({**options, "task": "letters-as-labels"}, model, progress=False)
    finally:
        unregister_task("letters-as-labels")
    as_answers = heads({**options, "task": LETTERS, "open_prediction": "answers"}, model, progress=False)
    columns = ["split", "aggregation", "layer", "head", "agreement", "accuracy", "rank", "last_label_agreement",
               "first_label_agreement", "demo_majority_agreement", "model_majority_share", "votes_last_label",
               "agreement_minus_best_trivial", "agreement_minus_best_trivial_low"]
    pd.testing.assert_frame_equal(as_answers.tables["heads"][columns], as_labels.tables["heads"][columns])
    assert as_answers.tables["prompts"]["icl_pred"].tolist() == as_labels.tables["prompts"]["icl_pred"].tolist()
    assert as_answers.tables["order_control"].equals(as_labels.tables["order_control"])

    vocab = heads({**options, "task": LETTERS}, model, progress=False)
    sp = study_prompts(model, PromptOptions(task=LETTERS, shots=3, n_test=12))
    top1 = answer_scores(model, sp.icl, gold_answer_ids(sp.builder, sp.icl)).top1
    class_of = {ids[0]: c for c, ids in enumerate(sp.label_ids)}
    n_classes = len(sp.label_ids)
    assert vocab.tables["prompts"]["icl_pred"].tolist() == [class_of.get(int(t), n_classes) for t in top1]
    assert vocab.summary["icl_outside_rate"] == pytest.approx(float(np.mean([int(t) not in class_of for t in top1])))
    prompts, frame = vocab.tables["prompts"], vocab.tables["heads"]
    best = vocab.summary["best_head"]["max"]
    row = frame[(frame["split"] == "report") & (frame["aggregation"] == "max") & (frame["layer"] == best["layer"])
                & (frame["head"] == best["head"])]
    report = prompts[prompts["split"] == "report"]
    by_hand = np.mean(report[f"head_max_L{best['layer']}H{best['head']}"] == report["icl_pred"])
    assert row["agreement"].item() == pytest.approx(by_hand, abs=1e-12)


def test_heads_refuse_open_tasks_with_multi_token_or_too_many_answers():
    model = load_tiny("gpt-neo")
    heads = get_study("heads")
    options = dict(model="tiny-gpt-neo", shots=2, n_test=4, similarity=False, kr_minilm=False, device="cpu")
    assert len(get_task("capitalize").answer_words) > MAX_OPEN_CLASSES
    with pytest.raises(InvalidOptionError, match="'capitalize' has 26,838 distinct answers"):
        heads({**options, "task": "capitalize"}, model, progress=False)
    with pytest.raises(InvalidOptionError, match="'country-capital' has answers of several tokens.*Abu Dhabi"):
        heads({**options, "task": "country-capital"}, model, progress=False)
    with pytest.raises(InvalidOptionError, match="--no-probes"):
        heads({**options, "task": LETTERS, "similarity": True, "probes": True}, model, progress=False)
    with pytest.raises(ValueError, match="single-token labels"):
        analyze_heads(model, [], [[1], [2, 3]], prediction="vocabulary")
    check_installed(heads.config.from_dict({"model": "tiny-gpt-neo", "task": LETTERS}))  # accepted now


def test_causal_accuracy_on_an_open_task_is_answer_scores_under_the_same_edits():
    """Every condition's prediction is the top-1 token of `answer_scores` with that condition's edits
    (by hand here for the clean runs, the mean-ablated top heads and the reverse patch), correct where it
    is the answer's first token; the heads are ranked on the top-1 token read as an answer."""
    model = load_tiny("llama", None, torch.float64)
    sp = study_prompts(model, PromptOptions(task=LETTERS, shots=3, n_test=10))
    answers = gold_answer_ids(sp.builder, sp.icl)
    cfg = CausalConfig(k=2, random_draws=2, other_ablations=("resample",), bootstrap=100, layer_sweep=False)
    result = causal_study(model, sp.icl, sp.zsl, sp.label_ids, cfg, progress=False, answer_ids=answers)
    report = [int(i) for i in sorted(result.effects["prompt"].unique())]
    icl_r, zsl_r = [sp.icl[i] for i in report], [sp.zsl[i] for i in report]
    gold = [answers[i] for i in report]
    clean, z = open_run_with_edits(model, icl_r, gold, record=True)
    zsl_clean, zsl_z = open_run_with_edits(model, zsl_r, gold, record=True)
    by_hand = {
        ("icl", "clean"): clean,
        ("zsl", "clean"): zsl_clean,
        ("icl", "ablate top"): answer_scores(model, icl_r, gold, edits=ablation_edits("mean", result.top_heads, z)),
        ("icl", "patch top from zsl into icl"): answer_scores(
            model, icl_r, gold, edits=patch_heads(result.top_heads, zsl_z)),
    }
    effects = result.effects
    for (run, condition), scores in by_hand.items():
        rows = effects[(effects["run"] == run) & (effects["condition"] == condition)].sort_values("prompt")
        assert rows["pred"].tolist() == scores.top1.tolist(), condition
        assert rows["correct"].tolist() == scores.first_token_correct.tolist(), condition
        assert rows["margin"].to_numpy() == pytest.approx(scores.first_log_prob.double().numpy(), abs=1e-10)
        assert (rows["gold"] == [g[0] for g in gold]).all()
    assert result.info["icl_accuracy"] == pytest.approx(float(clean.first_token_correct.double().mean()), abs=1e-12)
    assert not clean.first_token_correct.all()  # so scores against the top-1 tokens as gold do not fit
    with pytest.raises(ValueError, match="other gold answers"):
        open_effects_frame(clean, {}, clean.top1)


def test_causal_one_layer_takes_a_multi_token_open_task_and_ranking_refuses_it():
    model = load_tiny("gpt-neo")
    sp = study_prompts(model, PromptOptions(task="country-capital", shots=2, n_test=6))
    answers = gold_answer_ids(sp.builder, sp.icl)
    assert any(len(a) > 1 for a in answers)
    metrics = layer_study(model, sp.icl, sp.zsl, sp.label_ids, 1, bootstrap=100, answer_ids=answers)
    scores = answer_scores(model, sp.icl, answers)
    assert metrics["icl_accuracy"] == pytest.approx(float(scores.first_token_correct.double().mean()), abs=1e-12)
    causal = get_study("causal")
    with pytest.raises(InvalidOptionError, match="several tokens.*--layer L"):
        causal({"model": "tiny-gpt-neo", "task": "country-capital", "shots": 2, "n_test": 6, "device": "cpu"}, model,
               progress=False)


def _families_parts(task: str, model, monkeypatch):
    # a tiny random model answers no open-task prompt, and function vectors average over correct ones
    monkeypatch.setattr(families, "head_scores", lambda: [s for s in head_scores() if s.name != "function_vector"])
    cfg = FamiliesConfig.from_dict({"model": "tiny-gpt-neo", "task": task, "shots": 3, "n_test": 10, "random_draws": 2,
                                    "ablations": ["mean"], "bootstrap": 100, "saliency_prompts": 2,
                                    "induction_sequences": 2, "device": "cpu"})
    prompts, select, report = _prompts(cfg, model)
    return cfg, prompts, select, report


def test_families_ablation_and_anchors_on_an_open_task_read_the_top1_token(monkeypatch):
    """`_ablate`'s accuracies are top-1 first-token accuracies (`answer_scores`, here the clean ICL and
    zero-shot runs and a family's mean-ablated top heads by hand); `_anchors`' clean accuracy is the same
    and label loyalty keeps the top-1 token over the vocabulary."""
    model = load_tiny("gpt-neo")
    cfg, prompts, select, report = _families_parts(LETTERS, model, monkeypatch)
    icl_r, zsl_r = [prompts.icl[i] for i in report], [prompts.zsl[i] for i in report]
    inputs = HeadScoreInputs(model, cfg, prompts, select, False)
    ranked = _rank_heads(cfg, inputs)
    assert "label_attention" in ranked.families and not ranked.not_scored
    ablation = _ablate(cfg, model, icl_r, zsl_r, prompts.label_ids, ranked)
    gold = gold_answer_ids(prompts.builder, icl_r)
    clean, z = open_run_with_edits(model, icl_r, gold, record=True)
    assert ablation.clean.tolist() == clean.first_token_correct.double().tolist()
    assert ablation.zsl_correct.tolist() == answer_scores(model, zsl_r, gold).first_token_correct.double().tolist()
    top = ranked.top["label_attention"]
    ablated = answer_scores(model, icl_r, gold, edits=ablation_edits("mean", top, z))
    row = ablation.table[(ablation.table["family"] == "label_attention") & (ablation.table["ablation"] == "mean")]
    assert row["accuracy"].item() == pytest.approx(float(ablated.first_token_correct.double().mean()), abs=1e-12)
    isolation = _anchors(cfg, model, icl_r, prompts.label_ids, False)["isolation"].set_index("condition")
    assert isolation.loc["clean", "accuracy"] == pytest.approx(float(clean.first_token_correct.double().mean()))
    shifted = [dataclasses.replace(p, query_label=p.query_label) for p in icl_r]
    assert shifted == icl_r  # the prompts passed in are not changed


def test_families_leave_the_label_attention_family_out_on_a_multi_token_open_task(monkeypatch):
    model = load_tiny("gpt-neo")
    cfg, prompts, select, _ = _families_parts("country-capital", model, monkeypatch)
    ranked = _rank_heads(cfg, HeadScoreInputs(model, cfg, prompts, select, False))
    assert "label_attention" not in ranked.families and "induction" in ranked.families
    assert "several tokens" in ranked.not_scored["label_attention"]
