"""The one label scorer: equal to a plain forward, to the edits applied by hand, to itself after a
shared prefix (float64, every tiny architecture, both backends), and NaN logits stop every path."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import load_tiny
from test_patching import _prompts as _task_prompts
from test_prefix_cache import _prompts as _shared_prompts

from icl_kernels.engine.edits import Edit, edits_on
from icl_kernels.engine.label_scoring import check_finite, label_log_probs, shared_label_log_probs
from icl_kernels.engine.patching import attention_edits, mean_ablation, run_with_edits, zero_ablation
from icl_kernels.engine.prefix_cache import common_prefix_length, encode_prefix
from icl_kernels.families.anchors import anchor_isolation, flow_saliency
from icl_kernels.families.function_vectors import indirect_effects
from icl_kernels.families.task_vectors import residual_edits, run_with_residual
from icl_kernels.finetuning.recording import record
from icl_kernels.kernel.head_scan import analyze_heads, single_example_outputs
from icl_kernels.utils.errors import NonFiniteLogitsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-10  # float64 throughout: the paths differ only in batching, padding and matrix shapes
SINGLE = [[50256], [220], [4000]]  # one token per class
MULTI = [[311, 2000], [4000], [17, 18, 19]]  # a multi-token continuation for some classes


def _reference(model, prompts, label_ids, whole_label: bool, edits=()) -> torch.Tensor:
    """One plain forward per prompt and class (full logits, no stop, no batching), under ``edits``
    told the prompt's index and prediction position."""
    out = torch.zeros(len(prompts), len(label_ids), dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        tokens = list(prompt.tokens)
        n = len(tokens)
        for c, ids in enumerate(label_ids):
            ids = list(ids) if whole_label else list(ids[:1])
            where = dict(rows=torch.tensor([i]), prediction_positions=torch.tensor([n - 1]),
                         lengths=torch.tensor([n + len(ids)]))
            with torch.no_grad(), edits_on(model, edits, **where):
                logits = model(torch.tensor([tokens + ids]))[0]
            log_p = logits.double().log_softmax(-1)
            out[i, c] = sum(log_p[n - 1 + j, t] for j, t in enumerate(ids))
    return out


def test_scores_equal_a_plain_forward_log_softmax(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _shared_prompts(n=3, demo_len=12)
    for labels in (SINGLE, MULTI):
        for whole in (True, False):
            got = label_log_probs(model, prompts, labels, whole_label=whole, batch_size=2)
            assert got.dtype == torch.float64 and got.shape == (len(prompts), len(labels))
            torch.testing.assert_close(got, _reference(model, prompts, labels, whole), atol=TOL, rtol=0)
    # token lists are scored as the prompts they are
    assert torch.equal(label_log_probs(model, [p.tokens for p in prompts], SINGLE),
                       label_log_probs(model, prompts, SINGLE))


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3"])
def test_scores_with_edits_equal_the_edits_applied_by_hand(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    builder, icl, _ = _task_prompts(model.tokenizer, shots=2, n=5)
    labels = builder.label_ids
    means = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    vectors = torch.randn(len(icl), model.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cases = {
        "zero": zero_ablation([(0, 0), (1, 1)]),
        "mean": mean_ablation([(1, 0)], means),
        "mean everywhere": mean_ablation([(0, 1)], means, positions="all"),
        "residual": residual_edits(1, vectors, "add"),
        "attention": attention_edits(model, [1], blocked=[torch.ones(len(p), len(p), dtype=torch.bool) for p in icl]),
    }
    for name, edits in cases.items():
        got = label_log_probs(model, icl, labels, edits=edits, whole_label=False, batch_size=2)
        want = _reference(model, icl, labels, whole_label=False, edits=edits)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=name)
        # the patching engine's entry point is this scorer
        assert torch.equal(run_with_edits(model, icl, labels, edits, batch_size=2, pad_token_id=0), got), name
    clean = label_log_probs(model, icl, labels, whole_label=False)
    assert (clean - label_log_probs(model, icl, labels, edits=cases["zero"], whole_label=False)).abs().max() > 1e-6


def test_scores_after_a_shared_prefix_equal_the_full_prompts(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _shared_prompts(n=4)
    n_prefix = common_prefix_length([p.tokens for p in prompts])
    assert n_prefix >= 20
    prefix = encode_prefix(model, prompts[0].tokens[:n_prefix])
    means = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    for labels in (SINGLE, MULTI):
        full = label_log_probs(model, prompts, labels, batch_size=3)
        torch.testing.assert_close(label_log_probs(model, prompts, labels, prefix=prefix, batch_size=3), full,
                                   atol=TOL, rtol=0)
        torch.testing.assert_close(shared_label_log_probs(model, prompts, labels, batch_size=3), full, atol=TOL, rtol=0)
    # edits at the prediction position see suffix positions and give the full prompt's result; so do kept activations
    edits = mean_ablation([(0, 1), (1, 0)], means)
    full, full_z = label_log_probs(model, prompts, SINGLE, edits=edits, keep=("z",), whole_label=False, batch_size=3)
    got, got_z = label_log_probs(model, prompts, SINGLE, edits=edits, keep=("z",), whole_label=False, batch_size=3,
                                 prefix=prefix)
    torch.testing.assert_close(got, full, atol=TOL, rtol=0)
    torch.testing.assert_close(got_z["z"], full_z["z"], atol=TOL, rtol=0)
    assert full_z["z"].shape == (len(prompts), model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)


def test_a_prefix_refuses_other_prompts_and_attention_edits():
    model = load_tiny("gpt-neo", None, torch.float64)  # the installed TransformerLens's default backend
    prompts = _shared_prompts(n=2)
    prefix = encode_prefix(model, prompts[0].tokens[:10])
    other = [prompts[0], dataclasses.replace(prompts[1], tokens=(7, *prompts[1].tokens[1:]))]
    with pytest.raises(ValueError, match=r"Prompts \[1\] do not start with the shared prefix"):
        label_log_probs(model, other, SINGLE, prefix=prefix)
    with pytest.raises(ValueError, match="recompute attention from q, k, v"):
        label_log_probs(model, prompts, SINGLE, prefix=prefix, edits=attention_edits(model, [0]))


# ------------------------------------------------------------------------------------------------
# Non-finite logits stop every path
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model():
    """A copy of tiny-gpt-neo (default backend) whose unembedding has a NaN column: every logit row is NaN."""
    model = copy.deepcopy(load_tiny("gpt-neo"))
    with torch.no_grad():
        model.unembed.W_U[:, 7] = float("nan")
    return model


def test_an_edit_that_writes_nan_names_its_prompt():
    model = load_tiny("gpt-neo")
    builder, icl, _ = _task_prompts(model.tokenizer, shots=2, n=5)

    def poison(z, context):
        z = z.clone()
        z[context.rows.to(z.device) == 3] = float("nan")
        return z

    with pytest.raises(NonFiniteLogitsError, match=r"NaN logits for prompt 3 in float32;"):
        run_with_edits(model, icl, builder.label_ids, [Edit(1, poison)], batch_size=2)
    assert torch.isfinite(run_with_edits(model, icl, builder.label_ids, batch_size=2)).all()


def test_nan_logits_stop_the_heads_paths(nan_model):

    builder, icl, zsl = _task_prompts(nan_model.tokenizer, shots=2, n=3)
    with pytest.raises(NonFiniteLogitsError, match=r"NaN logits for prompt 0 \(and 2 more: 1, 2\) in float32"):
        analyze_heads(nan_model, icl, builder.label_ids, progress=False)
    with pytest.raises(NonFiniteLogitsError, match=r"NaN logits for prompt 0 \(and 1 more: 1\) in float32"):
        single_example_outputs(nan_model, zsl, builder.label_ids, batch_size=2)


def test_nan_logits_stop_the_patching_and_causal_paths(nan_model):
    builder, icl, _ = _task_prompts(nan_model.tokenizer, shots=2, n=3)
    for keep_z in (False, True):
        with pytest.raises(NonFiniteLogitsError, match="NaN logits for prompt 0"):
            run_with_edits(nan_model, icl, builder.label_ids, zero_ablation([(0, 0)]), record=keep_z)


def test_nan_logits_stop_the_family_paths(nan_model):

    builder, icl, zsl = _task_prompts(nan_model.tokenizer, shots=2, n=2)
    labels = builder.label_ids
    means = torch.zeros(nan_model.cfg.n_layers, nan_model.cfg.n_heads, nan_model.cfg.d_head)
    calls = {
        "task vectors": lambda: run_with_residual(nan_model, zsl, labels, 1, torch.zeros(nan_model.cfg.d_model)),
        "function vectors, prefix reused": lambda: indirect_effects(nan_model, icl, labels, means),
        "function vectors, prefix reused, whole rows": lambda: indirect_effects(nan_model, icl, labels, means,
                                                                                join_rows=False),
        "function vectors, full forward": lambda: indirect_effects(nan_model, icl, labels, means, reuse_prefix=False),
        "anchors, saliency": lambda: flow_saliency(nan_model, icl, labels),
        "anchors, isolation": lambda: anchor_isolation(nan_model, icl, labels),
    }
    for name, call in calls.items():
        match = "corrupted prompt 0 .*NaN logits for prompt 0" if "prefix" in name else "NaN logits for prompt 0"
        with pytest.raises(NonFiniteLogitsError, match=match):
            call()
            pytest.fail(f"{name} returned numbers made from NaN logits")


def test_nan_logits_stop_the_recording_of_a_prompt(nan_model):

    tokens = list(range(10, 20))
    with pytest.raises(NonFiniteLogitsError, match="NaN logits for prompt 0"):
        record(nan_model, tokens, 9, 9, [1, 2])


def test_the_finite_check_names_prompts_and_what_to_try():
    logits = torch.zeros(4, 6)
    logits[1, 2] = float("inf")
    logits[3, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"^infinite logits for prompt 11 \(and 1 more: 13\) in the model's "
                                                   r"dtype; .* Rerun with --dtype float32"):
        check_finite(logits, first_index=10)
    with pytest.raises(NonFiniteLogitsError, match=r"^NaN logits for query 7 in"):
        check_finite(logits[2:], indices=[5, 7], what="query")
    check_finite(logits[[0, 2]])  # finite rows pass
    float32_model = load_tiny("gpt-neo")
    with pytest.raises(NonFiniteLogitsError, match=r"In float32 this is no float16 overflow .* weights or in an edit"):
        check_finite(logits, model=float32_model)
