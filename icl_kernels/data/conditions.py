"""The prompts a study runs on: a text task under a condition, or samples of the synthetic world.

Text tasks (`study_prompts`). One k-shot prompt per test query (the first ``n_test`` of the task's
seeded test split), demonstrations from the train split, and the zero-shot prompt of the same
query. A `PromptCondition` names the phenomenon or control:

* ``selector``: ``random`` (class-balanced by default, seeded per query) or ``retrieval`` (nearest
  MiniLM neighbours of the query, most similar last);
* ``label_format``: ``original``; ``swapped`` (label words permuted among classes); ``arbitrary``
  (unrelated words, `ARBITRARY_WORDS`); ``flipped`` (each demonstration's label shifted to the next
  class; gold labels and label words unchanged);
* ``control``: ``none`` or ``input-permutation`` (the words of every demonstration input shuffled,
  labels kept);
* ``drop_demos_to_fit``: prompts longer than the context drop their earliest demonstrations (the
  prompt records how many were used) instead of raising.

The synthetic world (`synthetic_prompts`). A model trained on the mixture-of-HMMs world of
`icl_kernels.data.synthetic_world` has no text task; its prompts are ``<d> x_1 y_1 <d> ... <d> x_k y_k <d> x``
(`synthetic_prompt` builds one from arrays) and its zero-shot prompt ``<d> x``. Every HMM token is
a class. The world is the ``world.json`` next to the model (`icl_kernels.data.synthetic_world.synthetic_world`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icl_kernels.data.prompts import (
    IclPrompt,
    PromptBuilder,
    RandomSelector,
    RetrievalSelector,
    make_prompts,
)
from icl_kernels.data.synthetic_world import synthetic_world
from icl_kernels.data.tasks.registry import SYNTHETIC_TASKS, get_task
from icl_kernels.models.encoders import minilm_encoder
from icl_kernels.utils.config import Options, PromptOptions, at_least, one_of
from icl_kernels.utils.errors import InvalidOptionError, PromptTooLongError
from icl_kernels.utils.stats import rng

__all__ = [
    "SYNTHETIC_TASKS",
    "LABEL_FORMATS",
    "CONTROLS",
    "SELECTORS",
    "ARBITRARY_WORDS",
    "PromptCondition",
    "StudyPrompts",
    "study_prompts",
    "text_prompts",
    "synthetic_prompts",
    "synthetic_prompt",
    "condition_words_and_map",
    "permute_words",
    "text_of",
]

LABEL_FORMATS = ("original", "swapped", "arbitrary", "flipped")
CONTROLS = ("none", "input-permutation")
SELECTORS = ("random", "retrieval")
#: Label words unrelated to any task (one token each on the GPT-2 and Gemma-3 tokenizers).
ARBITRARY_WORDS = (" apple", " table", " river", " cloud", " stone", " paper", " green", " house")


@dataclass
class PromptCondition(Options):
    """How demonstrations are chosen and shown (see the module docstring)."""

    selector: str = field(default="random", metadata={"choices": SELECTORS, "help": "retrieval: MiniLM nearest neighbours"})
    balanced: bool = field(default=True, metadata={"help": "class-balanced random demonstrations"})
    label_format: str = field(default="original", metadata={"choices": LABEL_FORMATS})
    control: str = field(default="none", metadata={"choices": CONTROLS})
    pool_size: int | None = field(default=None, metadata={"help": "use only the first N demonstration-pool examples"})
    drop_demos_to_fit: bool = field(default=True, metadata={
        "help": "drop the earliest demonstrations of prompts longer than the context"})

    def __post_init__(self) -> None:
        problems = one_of("selector", self.selector, SELECTORS) + one_of("label_format", self.label_format, LABEL_FORMATS)
        problems += one_of("control", self.control, CONTROLS)
        if self.pool_size is not None:
            problems += at_least("pool_size", self.pool_size, 1)
        if problems:
            raise InvalidOptionError("Invalid prompt condition: " + "; ".join(problems) + ".")


@dataclass
class StudyPrompts:
    """ICL prompts and the zero-shot prompts of the same queries, with what built them.

    Attributes:
        icl: one k-shot prompt per query.
        zsl: the zero-shot prompt of each query (same order).
        label_ids: token ids of each class's label continuation.
        builder: the text `PromptBuilder` (None on the synthetic world).
        pool: the demonstration pool rows (text tasks; after any control).
        queries: the query rows (text tasks).
        world: the `SyntheticWorld` (synthetic world only).
    """

    icl: list[IclPrompt]
    zsl: list[IclPrompt]
    label_ids: list[list[int]]
    builder: PromptBuilder | None = None
    pool: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    world: Any = None

    @property
    def n_classes(self) -> int:
        return len(self.label_ids)


def text_of(task, example: Mapping[str, Any]) -> str:
    """The input text of an example (its text fields joined by spaces)."""
    return " ".join(str(example[f]) for f in task.text_fields)


def permute_words(text: str, generator: np.random.Generator) -> str:
    """The words of ``text`` in a random order (the input-permutation control)."""
    words = text.split()
    return " ".join(words[i] for i in generator.permutation(len(words))) if len(words) > 1 else text


def condition_words_and_map(task, label_format: str) -> tuple[tuple[str, ...], Callable[[int], int] | None]:
    """(label words, demonstration label map or None) for a label format."""
    n = task.n_classes
    words = tuple(task.answer_words)  # an open task's answer vocabulary stands for its label words
    if label_format == "swapped":
        return tuple(words[(c + 1) % n] for c in range(n)), None
    if label_format == "arbitrary":
        if n > len(ARBITRARY_WORDS):
            raise InvalidOptionError(f"Only {len(ARBITRARY_WORDS)} arbitrary label words for {n} classes.")
        return ARBITRARY_WORDS[:n], None
    if label_format == "flipped":
        return words, (lambda y: (int(y) + 1) % n)
    return words, None


def study_prompts(
    model, prompts: PromptOptions, condition: PromptCondition | None = None, *, model_name: str | None = None
) -> StudyPrompts:
    """The prompts of a study: `text_prompts` for a registered task, `synthetic_prompts` for
    ``task`` in `SYNTHETIC_TASKS` (the world next to ``model_name``)."""
    if prompts.task in SYNTHETIC_TASKS:
        world = synthetic_world(model_name, required=True)
        return synthetic_prompts(world, prompts.shots, prompts.n_test, prompts.seed, n_ctx=int(model.cfg.n_ctx))
    return text_prompts(model.tokenizer, int(model.cfg.n_ctx), prompts, condition or PromptCondition())


def text_prompts(tokenizer, n_ctx: int | None, prompts: PromptOptions, condition: PromptCondition) -> StudyPrompts:
    """k-shot and zero-shot prompts of the first ``n_test`` test queries of a registered task."""
    task = get_task(prompts.task)
    data = task.load(seed=prompts.seed)
    pool = [dict(row) for row in data["train"]]
    if condition.pool_size is not None:
        pool = pool[: condition.pool_size]
    if prompts.n_test > len(data["test"]):
        raise InvalidOptionError(
            f"n_test={prompts.n_test} but task {task.name!r} has {len(data['test'])} test examples; use fewer."
        )
    queries = [dict(row) for row in data["test"].select(range(prompts.n_test))]
    if condition.control == "input-permutation":
        for i, row in enumerate(pool):
            generator = rng("input_permutation", prompts.seed, i)
            for name in task.text_fields:
                row[name] = permute_words(str(row[name]), generator)
    words, label_map = condition_words_and_map(task, condition.label_format)
    builder = PromptBuilder(task, tokenizer, label_words=words, n_ctx=n_ctx, drop_demos_to_fit=condition.drop_demos_to_fit)
    if condition.selector == "retrieval":
        selector = RetrievalSelector(
            embed=minilm_encoder(), pool_texts=[text_of(task, r) for r in pool], text_of=lambda q: text_of(task, q)
        )
    else:  # most answers of an open task occur once: no class balancing there
        selector = RandomSelector(balanced=condition.balanced and task.kind == "classification")
    icl = make_prompts(builder, pool, queries, prompts.shots, seed=prompts.seed, selector=selector, label_map=label_map)
    zsl = make_prompts(builder, pool, queries, 0, seed=prompts.seed)
    return StudyPrompts(icl, zsl, [list(ids) for ids in builder.label_ids], builder, pool, queries)


# ------------------------------------------------------------------------------------------------
# The synthetic world
# ------------------------------------------------------------------------------------------------


def synthetic_prompt(
    world, demos: np.ndarray, x: np.ndarray, y: int | np.integer | None, query_index: int | None = None
) -> IclPrompt:
    """``<d> x_1 y_1 <d> ... <d> x_k y_k <d> x`` from demonstration rows ``[k, x_len + 1]`` and ``x``."""
    d = world.delim_id
    tokens: list[int] = [d]
    xs, ys, seps = [], [], []
    length = world.config.x_len

    def append(ids) -> tuple[int, int]:
        start = len(tokens)
        tokens.extend(int(t) for t in ids)
        return (start, len(tokens))

    for demo in demos:
        xs.append(append(demo[:length]))
        ys.append(append(demo[length:]))
        seps.append(append([d]))
    query_span = append(x)
    return IclPrompt(
        tokens=tuple(tokens), demo_input_spans=tuple(xs), demo_label_spans=tuple(ys), separator_spans=tuple(seps),
        demo_labels=tuple(int(demo[length]) for demo in demos), query_span=query_span,
        query_label=None if y is None else int(y), bos_position=0, query_index=query_index,
    )


def synthetic_prompts(world, shots: int, n: int, seed: int = 0, *, n_ctx: int | None = None) -> StudyPrompts:
    """``n`` k-shot prompts sampled from ``world`` (concepts from its prior) and their zero-shot prompts."""
    if n_ctx is not None and world.prompt_len(shots) > n_ctx:
        raise PromptTooLongError(
            f"A {shots}-shot synthetic prompt is {world.prompt_len(shots)} tokens, over the model's context "
            f"{n_ctx}; use fewer shots."
        )
    batch = world.sample_prompts(n, shots, rng("synthetic_prompts", seed, shots))
    length = world.config.x_len
    block = length + 2  # x, y, delimiter
    icl, zsl = [], []
    for row in range(len(batch)):
        tokens = batch.tokens[row]
        demos = tokens[1 : 1 + shots * block].reshape(shots, block)[:, : length + 1]
        x = tokens[1 + shots * block :]
        gold = int(batch.labels[row])
        icl.append(synthetic_prompt(world, demos, x, gold, query_index=row))
        zsl.append(synthetic_prompt(world, demos[:0], x, gold, query_index=row))
    return StudyPrompts(icl, zsl, [[int(v)] for v in world.label_ids], world=world)

