"""Batched finetuning runs equal the one-at-a-time runs of `finetune`: weights, losses, recorded queries
and development scores, in float64 to 1e-10 on tiny models of every architecture; the learning-rate
search and the whole comparison agree with the unbatched path; the hooks are gone afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tiny
from test_compare_shared import _episodes
from test_relaxation import assert_tiny

from benchmarks.bench_compare_reuse import leaves
from icl_kernels.engine.hooks import active_hook_count
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.finetuning import dai_metrics
from icl_kernels.finetuning.batched_finetune import (
    RunWeights,
    batch_reason,
    finetune_runs,
    first_steps,
    kv_per_row,
    length_buckets,
    row_label_log_probs,
)
from icl_kernels.finetuning.dai_metrics import ComparisonSettings, compare_icl_with_finetuning
from icl_kernels.finetuning.finetune import finetune, first_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
#: the tests of the batched path itself: a TransformerBridge falls back to one run at a time (last test)
hooked_only = pytest.mark.tl3_only(reason="batching replaces HookedTransformer's key/value projections; a "
                                          "TransformerBridge falls back to one run at a time (last test)")

ARCHS = ["gpt-neo", "gpt-j", "gemma-3", "llama"]


def _runs(n_runs: int = 3, seed: int = 0) -> list[list[list[int]]]:
    """Runs of three training sequences each, of different lengths (so batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    return [[[1, *torch.randint(10, 900, (n,), generator=g).tolist()] for n in (4 + r, 6, 3 + 2 * r)]
            for r in range(n_runs)]


def _model(arch: str):
    model = load_tiny(arch, dtype=torch.float64)
    assert_tiny(arch, model)
    return model


@hooked_only
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_runs_equal_one_at_a_time(arch):
    """Every run's weights, losses and recorded queries equal `finetune`'s to 1e-10 in float64, each run
    at its own learning rate, with and without the shared first step; the model is left unchanged."""
    model = _model(arch)
    runs, rates = _runs(), [0.05, 0.0, 0.3]
    assert len(length_buckets([len(run[2]) for run in runs])) > 1  # a step runs in groups of similar length
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    alone = [finetune(model, run, lr, record_queries=True) for run, lr in zip(runs, rates)]
    for firsts in (None, first_steps(model, runs)):
        together = finetune_runs(model, runs, rates, record_queries=True, firsts=firsts)
        for one, many in zip(alone, together):
            assert one.lr == many.lr and one.state.keys() == many.state.keys()
            for name in one.state:
                torch.testing.assert_close(many.state[name], one.state[name], rtol=0, atol=1e-10)
            assert many.losses == pytest.approx(one.losses, abs=1e-10)
            assert len(many.queries) == len(one.queries) == 3
            for q_many, q_one in zip(many.queries, one.queries):
                torch.testing.assert_close(q_many, q_one, rtol=0, atol=1e-10)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved == [] and active_hook_count(model) == 0
    assert not any(p.requires_grad != before_p.requires_grad for p, before_p in
                   zip(model.parameters(), (torch.nn.Parameter(t) for t in before.values())))


@hooked_only
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_first_steps_equal_first_step(arch):
    model = _model(arch)
    runs = _runs()
    for one, many in zip((first_step(model, run) for run in runs), first_steps(model, runs, budget=1)):
        assert one.sequences == many.sequences and one.loss == pytest.approx(many.loss, abs=1e-10)
        for name in one.grads:
            torch.testing.assert_close(many.grads[name], one.grads[name], rtol=0, atol=1e-10)
        torch.testing.assert_close(many.queries, one.queries, rtol=0, atol=1e-10)


@hooked_only
@pytest.mark.parametrize("arch", ARCHS)
def test_row_scores_equal_each_model_applied(arch):
    """Each finetuned model's development log-probabilities, scored for all models in one batch, equal
    label_log_probs under that model's own weights; with ``normalise=False`` the label logits are
    those log-probabilities plus one constant per prompt (the same answers and label log-softmax)."""
    model = _model(arch)
    tuned = finetune_runs(model, _runs(), [0.1, 0.2, 0.4], record_queries=False)
    g = torch.Generator().manual_seed(3)
    prompts = [[[1, *torch.randint(10, 900, (n,), generator=g).tolist()] for n in (3, 7, 5, 2)] for _ in tuned]
    labels = [311, 4000, 17]
    together = row_label_log_probs(model, tuned, prompts, labels, dtype=torch.float64, batch_size=6)
    logits = row_label_log_probs(model, tuned, prompts, labels, dtype=torch.float64, batch_size=6, normalise=False)
    for result, rows, got, raw in zip(tuned, prompts, together, logits):
        with result.applied() as applied:
            expected = label_log_probs(applied, rows, [[t] for t in labels], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        shift = raw - expected  # the vocabulary-wide log-normaliser of each prompt
        assert shift.shape == (len(rows), len(labels)) and bool((shift.std(-1) < 1e-10).all())
        assert bool((shift.mean(-1) > 1e-3).all())  # really unnormalised: log Z exceeds every label logit
        torch.testing.assert_close(raw.log_softmax(-1), expected.log_softmax(-1), rtol=0, atol=1e-10)
    assert active_hook_count(model) == 0


@hooked_only
def test_kv_per_row_refuses_rows_out_of_run_order_and_cleans_up():
    model = _model("llama")
    weights = RunWeights.stacked(model, [None, None])
    tokens = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10], [1, 11, 12]])
    with pytest.raises(ValueError, match="grouped by run"):
        with kv_per_row(model, weights, torch.tensor([0, 1, 0, 1])):
            model(tokens)
    with pytest.raises(ValueError, match="give owners"):
        with kv_per_row(model, weights):  # 4 rows for 2 runs and no owners
            model(tokens)
    assert active_hook_count(model) == 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    with kv_per_row(model, weights, torch.tensor([0, 0, 1, 1])):
        same = model(tokens)
    torch.testing.assert_close(same, model(tokens), rtol=0, atol=1e-10)  # the model's own weights in every row


@hooked_only
def test_bad_runs_are_refused():
    model = _model("gpt-neo")
    with pytest.raises(ValueError, match="same number of sequences"):
        finetune_runs(model, [[[1, 2, 3]], [[1, 2, 3], [1, 4, 5]]], 0.1)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        finetune_runs(model, [[[1]]], 0.1)
    with pytest.raises(ValueError, match="one each"):
        finetune_runs(model, _runs(2), [0.1])


@hooked_only
@pytest.mark.parametrize("arch", ARCHS)
def test_comparison_batched_equals_unbatched(arch, monkeypatch):
    """The whole comparison (lr search with its development scores, trained side, controls, untrained copy)
    gives the same chosen rates and every number to 1e-9 with the batched learning-rate search on and off."""
    monkeypatch.setattr(dai_metrics, "_RESAMPLES", 200)
    model = _model(arch)
    untrained = dai_metrics.untrained_copy(model, f"tiny-{arch}")
    episodes = _episodes()
    runs = {}
    for batched in (False, True):
        cfg = ComparisonSettings(lrs=(0.02, 0.3), collapse_margin=1.0, batched_finetuning=batched)
        assert dai_metrics.batches(model, episodes, cfg) is batched
        result = compare_icl_with_finetuning(model, episodes, [[311], [4000]], cfg, untrained=untrained,
                                             progress=False)
        runs[batched] = json.loads(json.dumps([result.metrics, result.lr_table, result.layers], default=str))
    assert runs[True][0]["lr"] == runs[False][0]["lr"]
    assert [row["lr"] for row in runs[True][1]] == [row["lr"] for row in runs[False][1]]

    right = dict(leaves(runs[False]))
    compared = 0
    for key, value in leaves(runs[True]):
        if "timing" in key or "_s" == key[-2:]:
            continue
        assert value == pytest.approx(right[key], abs=1e-9, nan_ok=True), key
        compared += 1
    assert compared > 100


def test_a_bridge_runs_one_at_a_time():
    """A TransformerBridge is not batched: the reason names it and the comparison takes the unbatched path."""
    model = load_tiny("llama", backend="bridge", dtype=torch.float64)
    assert "TransformerBridge" in batch_reason(model)
    assert not dai_metrics.batches(model, _episodes(), ComparisonSettings())
    with pytest.raises(ValueError, match="TransformerBridge"):
        finetune_runs(model, _runs(1), 0.1)
