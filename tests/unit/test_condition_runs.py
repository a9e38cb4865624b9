"""Edit conditions scored with each prompt's context run once equal every condition run in full
(float64, every tiny architecture, both backends), and the reuse is refused where it cannot be exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_tiny

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.condition_runs import concat_answer_scores, reuse_plan, score_conditions
from icl_kernels.engine.patching import (
    mean_ablation,
    open_run_with_edits,
    patch_heads,
    record_heads,
    resample_ablation,
    resample_sources,
    run_with_edits,
    zero_ablation,
)
from icl_kernels.families.function_vectors import conditions_correct, fv_correct
from icl_kernels.families.task_vectors import residual_edits, tv_correct, tv_correct_layers
from icl_kernels.models import backend as tl_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-10


def _tol(model) -> float:
    """1e-10 in float64, except on a bridge, whose Hugging Face modules compute some steps in float32
    whatever the model's dtype (GPT-Neo / GPT-J attention's q.k, Gemma's RMSNorm, Llama's softmax)."""
    return 1e-5 if tl_backend.is_bridge(model) else TOL


def _prompt(tokens) -> IclPrompt:
    tokens = tuple(int(t) for t in tokens)
    return IclPrompt(tokens=tokens, demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                     demo_labels=(), query_span=(len(tokens) - 1, len(tokens)))


def _prompts(n: int = 4, seed: int = 0) -> list[IclPrompt]:
    """Prompts of different lengths (12..21 tokens, longer than the tiny models' window of 8)."""
    g = torch.Generator().manual_seed(seed)
    return [_prompt([50256, *torch.randint(10, 5000, (11 + 3 * i,), generator=g).tolist()]) for i in range(n)]


def _conditions(model, prompts):
    z = record_heads(model, prompts, batch_size=2)
    other = record_heads(model, prompts[::-1], batch_size=2).flip(0)  # another run's outputs, same order
    heads = [(0, 1), (1, 0)]
    return [
        mean_ablation(heads, z.mean(0)),
        zero_ablation([(1, 1)]),
        resample_ablation(heads, z, resample_sources(len(prompts), 0)),
        patch_heads([(0, 0), (1, 1)], other + 0.5),
        [],
    ]


def test_label_conditions_equal_full_runs(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _prompts()
    labels = [[311], [4000], [17, 18]]
    conditions = _conditions(model, prompts)
    assert reuse_plan(model, prompts, conditions) is None
    got = score_conditions(model, prompts, conditions, label_ids=labels, batch_size=3)
    for edits, scores in zip(conditions, got):
        want = run_with_edits(model, prompts, labels, edits, batch_size=3)
        assert scores.shape == want.shape
        assert (scores - want).abs().max() < _tol(model), [e.label for e in edits]
    clean = got[-1]
    assert (got[1] - clean).abs().max() > 1e-4  # the edits change the scores: the check can fail


def test_open_conditions_equal_full_runs(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _prompts()
    answers = [[311, 312], [4000], [17, 18, 19], [90]]
    conditions = _conditions(model, prompts)
    got = score_conditions(model, prompts, conditions, answer_ids=answers, batch_size=2, condition_batch=2)
    for edits, scores in zip(conditions, got):
        want = open_run_with_edits(model, prompts, answers, edits, batch_size=2)
        assert torch.equal(scores.top1, want.top1)
        assert torch.equal(scores.n_answer_tokens, want.n_answer_tokens)
        assert (scores.first_log_prob - want.first_log_prob).abs().max() < _tol(model)
        assert (scores.answer_log_prob - want.answer_log_prob).abs().max() < _tol(model)
    assert (got[1].answer_log_prob - got[-1].answer_log_prob).abs().max() > 1e-4


def test_edits_at_every_position_run_in_full_and_still_agree():
    model = load_tiny("gpt-neo", None, torch.float64)
    prompts = _prompts(3)
    conditions = [zero_ablation([(0, 0)], positions="all"), zero_ablation([(0, 0)])]
    assert "prediction position" in reuse_plan(model, prompts, conditions)
    got = score_conditions(model, prompts, conditions, label_ids=[[311], [4000]])
    for edits, scores in zip(conditions, got):
        assert torch.equal(scores, run_with_edits(model, prompts, [[311], [4000]], edits))
    # the two ablations differ (every position vs the prediction position only)
    assert (got[0] - got[1]).abs().max() > 1e-6


def test_reuse_matches_no_reuse_and_rows_follow_prompts():
    model = load_tiny("llama", None, torch.float64)
    prompts = _prompts(4, seed=1)
    z = record_heads(model, prompts)
    conditions = [patch_heads([(1, 0)], z.flip(0))]  # prompt i receives prompt n-1-i's output
    reused = score_conditions(model, prompts, conditions, label_ids=[[5], [6]])[0]
    full = score_conditions(model, prompts, conditions, label_ids=[[5], [6]], reuse_prefix=False)[0]
    assert (reused - full).abs().max() < _tol(model)
    swapped = score_conditions(model, prompts[::-1], [patch_heads([(1, 0)], z)], label_ids=[[5], [6]])[0]
    assert (swapped.flip(0) - reused).abs().max() < _tol(model)


def test_bad_calls_are_refused():
    model = load_tiny("gpt-neo", None, torch.float64)
    prompts = _prompts(2)
    with pytest.raises(ValueError, match="exactly one"):
        score_conditions(model, prompts, [[]])
    with pytest.raises(ValueError, match="one per prompt"):
        score_conditions(model, prompts, [[]], answer_ids=[[1]])
    with pytest.raises(ValueError, match="at least one part"):
        concat_answer_scores([])


def test_vector_sweeps_equal_one_run_per_layer(arch, backend):
    """The function-vector and task-vector layer sweeps (one condition per layer / vector) equal
    `fv_correct` / `tv_correct` run layer by layer, under both scorings."""
    model = load_tiny(arch, backend, torch.float64)
    prompts = [dataclasses.replace(p, query_label=i % 3) for i, p in enumerate(_prompts(5))]
    label_ids = [[311, 5], [4000], [17, 18]]
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64) * 3
    per_prompt = torch.randn(len(prompts), model.cfg.n_layers, model.cfg.d_model, generator=g, dtype=torch.float64) * 3
    layers = list(range(model.cfg.n_layers))
    for scoring in ("vocab", "label-words"):
        swept = conditions_correct(model, prompts, label_ids, [residual_edits(L, vector[None].expand(5, -1)) for L in layers],
                                   scoring=scoring)
        assert [c.tolist() for c in swept] == [fv_correct(model, prompts, label_ids, L, vector, scoring=scoring).tolist()
                                               for L in layers]
        if scoring == "label-words":  # the vectors move answers: the comparison can fail
            assert 0 < sum(int(c.sum()) for c in swept) < len(layers) * len(prompts)
        tv = tv_correct_layers(model, prompts, label_ids, layers, per_prompt, scoring=scoring)
        assert [c.tolist() for c in tv] == [tv_correct(model, prompts, label_ids, L, per_prompt[:, L], scoring=scoring).tolist()
                                            for L in layers]
