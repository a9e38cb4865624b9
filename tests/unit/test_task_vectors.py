"""Task vectors as Hendel et al.: dummy queries, replacement at the last token, layer on dev sets;
the identities of peers.md section 5 on tiny models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import load_tiny
from test_patching import _prompts

from icl_kernels.data.prompts import PromptBuilder, RandomSelector, make_prompts
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.patching import run_with_edits
from icl_kernels.engine.vocab_scoring import answer_scores
from icl_kernels.families.task_vectors import (
    dummy_queries,
    residual_at_prediction,
    residual_edits,
    run_with_residual,
    task_vector_study,
    task_vectors,
    tv_correct,
    with_query,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hendel_prompts(tok, shots=3, n=8):
    """Hendel et al.'s format on the next-item task (generated data, offline)."""
    task = dataclasses.replace(get_task("next-item"), template="example:{input}->", demo_separator="\n")
    data = task.load(seed=0)
    builder = PromptBuilder(task, tok)
    queries = data["test"].select(range(n))
    selector = RandomSelector(balanced=False)
    icl = make_prompts(builder, data["train"], queries, shots, seed=0, selector=selector)
    zsl = make_prompts(builder, data["train"], queries, 0, seed=0)
    return builder, icl, zsl, data


def test_a_dummy_query_prompt_is_the_prompt_the_builder_would_build(backend):
    model = load_tiny("gpt-neo", backend)
    builder, icl, zsl, data = _hendel_prompts(model.tokenizer)
    assert model.tokenizer.decode(icl[0].tokens[1:]).startswith("example:")  # Hendel's format
    assert "->" in model.tokenizer.decode(zsl[0].tokens) and "\n" not in model.tokenizer.decode(zsl[0].tokens[1:])
    pool = data["train"]
    other = icl[3]
    built = builder.build([pool[i] for i in icl[0].demo_indices], data["test"][other.query_index],
                          demo_indices=icl[0].demo_indices, query_index=other.query_index)
    assert with_query(icl[0], other) == built


def test_dummy_queries_are_other_queries_and_never_the_test_query():
    model = load_tiny("gpt-neo")
    _, icl, _, _ = _hendel_prompts(model.tokenizer, n=6)
    picks = dummy_queries(icl, 2)
    for i, js in enumerate(picks):
        assert len(js) == 2 and i not in js
        own = icl[i].tokens[slice(*icl[i].query_span)]
        assert all(icl[j].tokens[slice(*icl[j].query_span)] != own for j in js)
    with pytest.raises(ValueError, match="dummy queries"):
        dummy_queries(icl[:2], 2)


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3", "llama"])
def test_theta_is_the_mean_over_two_dummy_queries_and_a_last_layer_patch_answers_the_dummy(arch, backend):
    """peers.md 5(a): replacing the last layer's residual at the last token by that of [S, x']
    reproduces [S, x']'s final logits exactly (the patched prompt answers the dummy query)."""
    model = load_tiny(arch, backend, torch.float64)
    builder, icl, zsl, _ = _hendel_prompts(model.tokenizer, n=6)
    picks = dummy_queries(icl, 2)
    dummies = [[with_query(p, icl[j]) for j in js] for p, js in zip(icl, picks)]
    theta = task_vectors(model, icl, n_dummy=2)
    by_hand = torch.stack([residual_at_prediction(model, d).mean(0) for d in dummies])
    torch.testing.assert_close(theta, by_hand, atol=1e-10, rtol=0)
    last = model.cfg.n_layers - 1
    first_dummy = [d[0] for d in dummies]
    source = residual_at_prediction(model, first_dummy)[:, last]
    patched = run_with_residual(model, zsl, builder.label_ids, last, source, mode="replace")
    torch.testing.assert_close(patched, run_with_edits(model, first_dummy, builder.label_ids), atol=1e-10, rtol=0)
    answers = [builder.label_ids[p.query_label] for p in first_dummy]
    vocab = answer_scores(model, zsl, answers, edits=residual_edits(last, source, "replace"))
    assert torch.equal(vocab.top1, answer_scores(model, first_dummy, answers).top1)
    # peers.md 5(b): a prompt patched with its own hidden state is unchanged, at every layer
    own = residual_at_prediction(model, zsl)
    clean = run_with_edits(model, zsl, builder.label_ids)
    for layer in range(model.cfg.n_layers):
        same = run_with_residual(model, zsl, builder.label_ids, layer, own[:, layer], mode="replace")
        torch.testing.assert_close(same, clean, atol=1e-10, rtol=0)


def test_exact_match_decodes_the_whole_answer_with_the_patch_at_the_last_token_only():
    model = load_tiny("gpt-neo")
    builder, icl, zsl, _ = _hendel_prompts(model.tokenizer, n=6)
    theta = task_vectors(model, icl)
    layer = 1
    got = tv_correct(model, zsl, builder.label_ids, layer, theta[:, layer], scoring="vocab")
    answers = [builder.label_ids[p.query_label] for p in zsl]
    scores = answer_scores(model, zsl, answers, edits=residual_edits(layer, theta[:, layer], "replace"), greedy=True)
    assert torch.equal(got, scores.exact_match)
    assert torch.equal(tv_correct(model, zsl, builder.label_ids, None, None, scoring="vocab"),
                       answer_scores(model, zsl, answers, greedy=True).exact_match)


@pytest.mark.parametrize("source", ["dummy", "other-query"])
def test_the_layer_is_the_first_best_on_dev_and_reported_on_test(source, backend):
    """peers.md 5(c) through the study: the chosen layer is the lowest of the dev split's tied
    maxima; the summary's task-vector accuracy is the test split's row at that layer."""
    model = load_tiny("gpt-neo", backend)
    builder, icl, zsl = _prompts(model.tokenizer, shots=2, n=10)
    layers, summary, info = task_vector_study(model, icl, zsl, builder.label_ids, scoring="label-words",
                                              source=source, bootstrap=100)
    dev = layers[layers["split"] == "dev"].sort_values("layer")
    best = dev[dev["accuracy"] == dev["accuracy"].max()]["layer"].min()
    assert info["task_vector_layer"] == best and info["source"] == source
    test = layers[layers["split"] == "test"].set_index("layer")["accuracy"]
    acc = summary.set_index("condition")
    assert acc.loc["task vector", "accuracy"] == pytest.approx(test[best])
    assert info["tv_minus_zero_shot"]["value"] == pytest.approx(test[best] - acc.loc["zero-shot", "accuracy"])
    assert info["n_dev"] + info["n_test"] == len(icl) and set(dev["n"]) == {info["n_dev"]}
    assert np.isfinite(info["tv_minus_icl"]["value"])
