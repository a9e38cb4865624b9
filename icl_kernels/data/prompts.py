"""k-shot prompts that know every token position.

A prompt is built from pieces, each tokenised on its own and concatenated::

    [BOS] x_1 y_1 sep x_2 y_2 sep ... x_k y_k sep x_query

where ``x_i`` is the task template filled with demonstration ``i`` (e.g. ``"Review: ...\\nSentiment:"``),
``y_i`` its label word (``" positive"``) and ``sep`` the task's demonstration separator. Because the
pieces are tokenised separately, the token span of every piece is known exactly, label tokens in
demonstrations are exactly the tokens that are scored as continuations, and a test checks each span
against the decoded text for every tokenizer we ship. The prediction position is the last prompt
token: the model's next-token distribution there is scored against the label words.

Demonstrations come from a pool (the task's train split) through a selector: seeded random
(optionally class-balanced), fixed indices, or retrieval (nearest neighbours of the query under any
embedding function). Batches are right-padded (`PromptBatch`), so every position of every row is the
position in the unpadded prompt.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from icl_kernels.data.tasks.registry import Task
from icl_kernels.utils.errors import (
    InvalidOptionError,
    LabelTokenizationError,
    MissingClassError,
    MissingTokenizerError,
    PromptTooLongError,
)
from icl_kernels.utils.stats import rng

Span = tuple[int, int]  # [start, end) token positions


# --------------------------------------------------------------------------------------------
# Label words
# --------------------------------------------------------------------------------------------


def encode_piece(tokenizer, text: str) -> list[int]:
    """Token ids of one piece of text, without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def label_token_ids(
    tokenizer, label_words: Sequence[str], *, require_single_token: bool = False
) -> list[list[int]]:
    """Token ids of each label word, checked for collisions.

    Raises:
        LabelTokenizationError: two label words tokenise identically, one is empty, or (with
            ``require_single_token``) a label word is several tokens.
    """
    ids = [encode_piece(tokenizer, word) for word in label_words]
    for word, tokens in zip(label_words, ids):
        if not tokens:
            raise LabelTokenizationError(f"Label word {word!r} tokenises to nothing; choose another word.")
        if require_single_token and len(tokens) > 1:
            pieces = [tokenizer.decode([t]) for t in tokens]
            raise LabelTokenizationError(
                f"Label word {word!r} is {len(tokens)} tokens {pieces} for this tokenizer, but this "
                "analysis needs one token per label. Pick a single-token word (with its leading "
                "space), or use an analysis that scores full continuations."
            )
    seen: dict[tuple[int, ...], str] = {}
    for word, tokens in zip(label_words, ids):
        if tuple(tokens) in seen:
            raise LabelTokenizationError(
                f"Label words {seen[tuple(tokens)]!r} and {word!r} tokenise identically ({tokens}); "
                "they cannot be told apart. Choose distinct label words."
            )
        seen[tuple(tokens)] = word
    return ids


# --------------------------------------------------------------------------------------------
# One prompt
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IclPrompt:
    """Token ids of a k-shot prompt and the exact span of each of its pieces."""

    tokens: tuple[int, ...]
    demo_input_spans: tuple[Span, ...]  # x_i: the template filled with demonstration i
    demo_label_spans: tuple[Span, ...]  # y_i: the label word's tokens
    separator_spans: tuple[Span, ...]  # after each demonstration
    demo_labels: tuple[int, ...]
    query_span: Span
    query_label: int | None = None
    bos_position: int | None = None
    demo_indices: tuple[int, ...] = ()  # indices into the demonstration pool
    n_demos_requested: int | None = None
    query_index: int | None = None  # index into the query split

    @property
    def n_demos(self) -> int:
        return len(self.demo_labels)

    @property
    def prediction_position(self) -> int:
        """The last prompt token, whose next-token distribution is the prediction."""
        return len(self.tokens) - 1

    @property
    def demo_spans(self) -> tuple[Span, ...]:
        """[x_i start, y_i end): the span Han et al. take the max attention over."""
        return tuple((x[0], y[1]) for x, y in zip(self.demo_input_spans, self.demo_label_spans))

    def __len__(self) -> int:
        return len(self.tokens)


class PromptBuilder:
    """Builds `IclPrompt`s for one task and tokenizer.

    Args:
        task: the task (template, label words, separator).
        tokenizer: a Hugging Face tokenizer.
        template: overrides the task's template.
        label_words: override the task's label words.
        separator: overrides the task's separator between demonstrations.
        prepend_bos: put the tokenizer's BOS token first (default: when the tokenizer has one).
        n_ctx: the model's context length; longer prompts raise `PromptTooLongError`.
        drop_demos_to_fit: instead of raising, drop the earliest demonstrations until the prompt
            fits (the prompt records how many were used).
    """

    def __init__(
        self,
        task: Task,
        tokenizer,
        *,
        template: str | None = None,
        label_words: Sequence[str] | None = None,
        separator: str | None = None,
        prepend_bos: bool | None = None,
        n_ctx: int | None = None,
        drop_demos_to_fit: bool = False,
    ):
        if tokenizer is None:
            raise MissingTokenizerError(
                f"Task {task.name!r} is text and needs a tokenizer, but this model has none (e.g. "
                "synthetic-gpt-neo, whose tokens are HMM symbols). Use a text model, or for the "
                "synthetic world `icl-kernels theorem --model synthetic-gpt-neo`."
            )
        self.task = task
        self.tokenizer = tokenizer
        self.template = template if template is not None else task.template
        # an open task's answer vocabulary (read from its data) stands for the label words
        self.label_words = tuple(label_words if label_words is not None else task.answer_words)
        if len(self.label_words) != task.n_classes:
            raise ValueError(
                f"{len(self.label_words)} label words given for task {task.name!r} with "
                f"{task.n_classes} classes; give one word per class."
            )
        self.separator = separator if separator is not None else task.demo_separator
        self.label_ids = label_token_ids(tokenizer, self.label_words)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_id = bos if (prepend_bos if prepend_bos is not None else bos is not None) else None
        if prepend_bos and bos is None:
            raise ValueError("prepend_bos=True but this tokenizer has no BOS token.")
        self.separator_ids = encode_piece(tokenizer, self.separator) if self.separator else []
        self.n_ctx = n_ctx
        self.drop_demos_to_fit = drop_demos_to_fit

    @property
    def max_label_length(self) -> int:
        return max(len(ids) for ids in self.label_ids)

    def min_prompt_length(self, shots: int) -> int:
        """A lower bound on the tokens of any ``shots``-shot prompt: BOS, per demonstration its
        shortest label and the separator (its input counted as empty), the longest label after the
        query (whose text is also counted as empty)."""
        per_demo = min(len(ids) for ids in self.label_ids) + len(self.separator_ids)
        return (self.bos_id is not None) + shots * max(per_demo, 1) + self.max_label_length

    def check_shots_fit(self, shots: int) -> None:
        """Raise `PromptTooLongError` when even the shortest ``shots``-shot prompt would exceed the
        model's context (``n_ctx``), before any data is drawn or any model runs. Not checked without
        ``n_ctx`` or with ``drop_demos_to_fit`` (which drops demonstrations instead)."""
        if self.n_ctx is None or self.drop_demos_to_fit:
            return
        least = self.min_prompt_length(shots)
        if least > self.n_ctx:
            raise PromptTooLongError(
                f"--shots {shots} would make every prompt at least {least} tokens (labels and separators alone), "
                f"more than the model's context of {self.n_ctx}; use fewer shots."
            )

    def format_input(self, example: Mapping[str, Any]) -> str:
        fields = {name: example[name] for name in self.task.text_fields}
        return self.template.format(**fields)

    def build(
        self,
        demos: Sequence[Mapping[str, Any]],
        query: Mapping[str, Any],
        *,
        demo_labels: Sequence[int] | None = None,
        demo_indices: Sequence[int] = (),
        query_index: int | None = None,
    ) -> IclPrompt:
        """A prompt from demonstration examples (each with ``label`` unless ``demo_labels``) and a query."""
        labels = [int(d["label"]) for d in demos] if demo_labels is None else [int(y) for y in demo_labels]
        for y in labels:
            if not 0 <= y < len(self.label_words):
                raise ValueError(f"Label {y} is out of range for {len(self.label_words)} label words.")
        demo_pieces = [(encode_piece(self.tokenizer, self.format_input(d)), y) for d, y in zip(demos, labels)]
        query_ids = encode_piece(self.tokenizer, self.format_input(query))
        requested = len(demo_pieces)
        indices = list(demo_indices) if demo_indices else []

        def length(pieces) -> int:
            body = sum(len(x) + len(self.label_ids[y]) + len(self.separator_ids) for x, y in pieces)
            return (self.bos_id is not None) + body + len(query_ids) + self.max_label_length

        of_query = f" of query {query_index} (whose text is {len(query_ids)} tokens)" if query_index is not None else ""
        if self.n_ctx is not None and length(demo_pieces) > self.n_ctx:
            if not self.drop_demos_to_fit:
                fit = 0
                while fit < len(demo_pieces) and length(demo_pieces[: fit + 1]) <= self.n_ctx:
                    fit += 1
                raise PromptTooLongError(
                    f"The {requested}-shot prompt{of_query} is {length(demo_pieces)} tokens (with the longest "
                    f"label), more than the model's context of {self.n_ctx}; about {fit} shots fit. "
                    "Use fewer shots, or drop_demos_to_fit=True (--drop-demos-to-fit) to drop the "
                    "earliest demonstrations and record how many were used."
                )
            while demo_pieces and length(demo_pieces) > self.n_ctx:
                demo_pieces.pop(0)
                labels.pop(0)
                if indices:
                    indices.pop(0)
            if length(demo_pieces) > self.n_ctx:
                raise PromptTooLongError(
                    f"The zero-shot prompt{of_query} is {length([])} tokens, more than the context of "
                    f"{self.n_ctx}; shorten or drop that example."
                )

        tokens: list[int] = []
        bos_position = None
        if self.bos_id is not None:
            bos_position = 0
            tokens.append(self.bos_id)
        x_spans, y_spans, sep_spans = [], [], []

        def append(ids: list[int]) -> Span:
            start = len(tokens)
            tokens.extend(ids)
            return (start, len(tokens))

        for x_ids, y in demo_pieces:
            x_spans.append(append(x_ids))
            y_spans.append(append(self.label_ids[y]))
            sep_spans.append(append(self.separator_ids))
        query_span = append(query_ids)
        query_label = query.get("label") if isinstance(query, Mapping) else None
        return IclPrompt(
            tokens=tuple(tokens),
            demo_input_spans=tuple(x_spans),
            demo_label_spans=tuple(y_spans),
            separator_spans=tuple(sep_spans),
            demo_labels=tuple(labels),
            query_span=query_span,
            query_label=None if query_label is None else int(query_label),
            bos_position=bos_position,
            demo_indices=tuple(indices),
            n_demos_requested=requested,
            query_index=query_index,
        )

    def piece_texts(self, prompt: IclPrompt, demos: Sequence[Mapping[str, Any]], query: Mapping[str, Any]):
        """(span, expected text) for every piece, for checking spans against decoded text."""
        pieces = []
        used = demos[len(demos) - prompt.n_demos:] if prompt.n_demos else []
        for d, x, y_span, y, sep in zip(used, prompt.demo_input_spans, prompt.demo_label_spans,
                                        prompt.demo_labels, prompt.separator_spans):
            pieces += [(x, self.format_input(d)), (y_span, self.label_words[y]), (sep, self.separator)]
        pieces.append((prompt.query_span, self.format_input(query)))
        return pieces


# --------------------------------------------------------------------------------------------
# Demonstration selection
# --------------------------------------------------------------------------------------------


@runtime_checkable
class DemoSelector(Protocol):
    """Chooses demonstration indices from a pool for one query."""

    def select(self, pool_labels: np.ndarray, query: Mapping[str, Any], k: int, rng: np.random.Generator) -> list[int]:
        ...


@dataclass
class RandomSelector:
    """k random pool examples; with ``balanced``, as equal a count per class as k allows.

    ``n_classes`` is the task's class count (its number of label words). A balanced selection needs
    every class ``0 .. n_classes - 1`` in the pool and raises `MissingClassError` otherwise;
    `make_prompts` fills ``n_classes`` from its `PromptBuilder`. Without it (a selector used on its
    own) the count is inferred as ``max(label) + 1``, which cannot see a missing last class.
    """

    balanced: bool = False
    n_classes: int | None = None

    def select(self, pool_labels, query, k, rng) -> list[int]:
        n = len(pool_labels)
        if k > n:
            raise InvalidOptionError(f"{k} shots requested but the demonstration pool has only {n} examples; "
                                     "use fewer shots.")
        if not self.balanced:
            return [int(i) for i in rng.choice(n, size=k, replace=False)]
        classes = np.unique(pool_labels)
        if self.n_classes is not None:
            n_classes = int(self.n_classes)
            outside = sorted(int(c) for c in classes if not 0 <= c < n_classes)
            if outside:
                raise MissingClassError(
                    f"The demonstration pool has label(s) {outside} outside 0..{n_classes - 1} for a task "
                    f"of {n_classes} classes; check the task's data."
                )
        else:
            n_classes = int(pool_labels.max()) + 1 if len(pool_labels) else 0
        missing = sorted(set(range(n_classes)) - set(classes.tolist()))
        if missing:
            raise MissingClassError(
                f"Class(es) {missing} of {n_classes} are absent from the demonstration pool "
                f"({n} examples, classes {classes.tolist()}), so a class-balanced selection is "
                "impossible; use a training split that has every class, or balanced=False "
                "(--no-balanced)."
            )
        per_class = {c: list(rng.permutation(np.flatnonzero(pool_labels == c))) for c in classes}
        order = list(rng.permutation(classes))
        chosen: list[int] = []
        while len(chosen) < k:
            progressed = False
            for c in order:
                if per_class[c] and len(chosen) < k:
                    chosen.append(int(per_class[c].pop()))
                    progressed = True
            if not progressed:
                raise ValueError(f"The pool cannot supply {k} demonstrations.")
        return [chosen[i] for i in rng.permutation(len(chosen))]


@dataclass
class FixedSelector:
    """The same demonstrations for every query."""

    indices: Sequence[int]

    def select(self, pool_labels, query, k, rng) -> list[int]:
        if k > len(self.indices):
            raise ValueError(f"{k} shots requested but only {len(self.indices)} fixed indices given.")
        bad = [i for i in self.indices[:k] if not 0 <= i < len(pool_labels)]
        if bad:
            raise IndexError(f"Fixed demonstration indices {bad} are outside the pool of {len(pool_labels)}.")
        return [int(i) for i in self.indices[:k]]


@dataclass
class RetrievalSelector:
    """The k pool examples nearest to the query under an embedding (most similar placed last).

    ``embed`` maps a list of texts to an array [n, d]; cosine similarity is used.
    """

    embed: Callable[[list[str]], np.ndarray]
    pool_texts: Sequence[str]
    text_of: Callable[[Mapping[str, Any]], str]
    _pool_vectors: np.ndarray | None = field(default=None, repr=False)

    def _normalised(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float64)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)

    def select(self, pool_labels, query, k, rng) -> list[int]:
        if k > len(self.pool_texts):
            raise ValueError(f"{k} shots requested but the pool has {len(self.pool_texts)} examples.")
        if self._pool_vectors is None:
            self._pool_vectors = self._normalised(self.embed(list(self.pool_texts)))
        q = self._normalised(self.embed([self.text_of(query)]))[0]
        similarity = self._pool_vectors @ q
        nearest = np.argsort(-similarity, kind="stable")[:k]
        return [int(i) for i in nearest[::-1]]


def query_rng(seed: int, query_index: int) -> np.random.Generator:
    """The random stream for one query: the same demonstrations whatever else is evaluated."""
    return rng("query_demos", seed, query_index)


def make_prompts(
    builder: PromptBuilder,
    pool,
    queries,
    k: int,
    *,
    seed: int = 0,
    selector: DemoSelector | None = None,
    query_indices: Sequence[int] | None = None,
    label_map: Callable[[int], int] | None = None,
) -> list[IclPrompt]:
    """One k-shot prompt per query (a `datasets.Dataset` or list of dicts), demos from ``pool``.

    ``label_map`` rewrites demonstration labels (e.g. ``lambda y: 1 - y`` for flipped labels). A
    `RandomSelector` without ``n_classes`` gets the builder's class count (one per label word), so a
    balanced selection from a pool that lacks a class raises `MissingClassError`.
    """
    selector = selector or RandomSelector()
    if isinstance(selector, RandomSelector) and selector.n_classes is None:
        selector = dataclasses.replace(selector, n_classes=len(builder.label_words))
    pool_labels = np.asarray(pool["label"] if hasattr(pool, "column_names") else [p["label"] for p in pool])
    if k < 0:
        raise ValueError(f"shots must be >= 0, not {k}.")
    builder.check_shots_fit(k)
    if k > len(pool_labels):
        raise InvalidOptionError(
            f"{k} shots requested but the demonstration pool has only {len(pool_labels)} examples; "
            "use fewer shots."
        )
    indices = list(range(len(queries))) if query_indices is None else list(query_indices)
    prompts = []
    for qi in indices:
        query = queries[qi]
        chosen = selector.select(pool_labels, query, k, query_rng(seed, qi)) if k else []
        demos = [pool[i] for i in chosen]
        labels = [int(d["label"]) for d in demos]
        if label_map is not None:
            labels = [label_map(y) for y in labels]
        prompts.append(builder.build(demos, query, demo_labels=labels, demo_indices=chosen, query_index=qi))
    return prompts


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    """Right-padded token ids of several prompts, with their positions as tensors."""

    prompts: list[IclPrompt]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    pad_token_id: int

    @classmethod
    def from_prompts(cls, prompts: Sequence[IclPrompt], pad_token_id: int, device=None) -> PromptBatch:
        if not prompts:
            raise ValueError("A batch needs at least one prompt.")
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt.tokens, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return cls(list(prompts), tokens.to(device), lengths.to(device), pad_token_id)

    @property
    def prediction_positions(self) -> Int[Tensor, " batch"]:
        return self.lengths - 1

    def span_mask(self, kind: str) -> Bool[Tensor, "batch pos"]:
        """Positions of ``"demo_input"``, ``"demo_label"``, ``"separator"``, ``"demo"`` (x and y),
        ``"query"``, ``"bos"``, ``"real"`` (not padding) or ``"prediction"``."""
        mask = torch.zeros(self.tokens.shape, dtype=torch.bool)
        for row, prompt in enumerate(self.prompts):
            spans: Sequence[Span]
            if kind == "demo_input":
                spans = prompt.demo_input_spans
            elif kind == "demo_label":
                spans = prompt.demo_label_spans
            elif kind == "separator":
                spans = prompt.separator_spans
            elif kind == "demo":
                spans = prompt.demo_spans
            elif kind == "query":
                spans = (prompt.query_span,)
            elif kind == "bos":
                spans = () if prompt.bos_position is None else ((0, 1),)
            elif kind == "real":
                spans = ((0, len(prompt)),)
            elif kind == "prediction":
                spans = ((prompt.prediction_position, prompt.prediction_position + 1),)
            else:
                raise ValueError(f"Unknown span kind {kind!r}.")
            for start, end in spans:
                mask[row, start:end] = True
        return mask.to(self.tokens.device)

    def demo_index_map(self) -> Int[Tensor, "batch pos"]:
        """For each position, the demonstration (x_i through y_i) it belongs to, or -1."""
        index = torch.full(self.tokens.shape, -1, dtype=torch.long)
        for row, prompt in enumerate(self.prompts):
            for i, (start, end) in enumerate(prompt.demo_spans):
                index[row, start:end] = i
        return index.to(self.tokens.device)


def pad_id(model, pad_token_id: int | None = None) -> int:
    """``pad_token_id`` when given, else the model's tokenizer's pad id, else 0 (right padding never
    changes a real token's activations, so any id will do where there is none)."""
    if pad_token_id is not None:
        return pad_token_id
    tok = getattr(model, "tokenizer", None)
    return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def batches(prompts: Sequence[IclPrompt], batch_size: int, pad_token_id: int, device=None):
    """Yield `PromptBatch`es of at most ``batch_size`` prompts, in order."""
    for start in range(0, len(prompts), batch_size):
        yield PromptBatch.from_prompts(prompts[start : start + batch_size], pad_token_id, device)


def stable_hash(text: str) -> int:
    """A run-independent hash (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def gold_answer_ids(builder: PromptBuilder, prompts: Sequence[IclPrompt]) -> list[list[int]]:
    """The gold continuation of each prompt: the tokens of its query's answer (label word) with its
    leading space, as demonstrations carry it (``builder.label_ids[prompt.query_label]``). For
    `icl_kernels.engine.vocab_scoring.answer_scores` on an open-vocabulary task.

    Raises:
        ValueError: a prompt has no query label.
    """
    missing = [i for i, p in enumerate(prompts) if p.query_label is None]
    if missing:
        raise ValueError(f"Prompts {missing[:5]} have no query label; build them with make_prompts from a labelled split.")
    return [list(builder.label_ids[p.query_label]) for p in prompts]


def input_copy_matches(
    builder: PromptBuilder, queries: Sequence[Mapping[str, Any]], prompts: Sequence[IclPrompt]
) -> Bool[Tensor, " prompt"]:
    """Per prompt of an open task: would copying its query's input be scored right by the first
    answer token? That is, the input written as an answer (with the answers' leading space) begins
    with the same token as the gold answer.

    Top-1 first-token scoring (Todd et al.'s) credits a model that merely echoes the input whenever
    the answer starts with the input's own first token: on lemminflect's present-past and
    singular-plural pairs ``' abandon'`` / ``' abandoned'`` share their first token on many
    tokenizers, on the letter tasks never. The share of such prompts is the accuracy of the copy
    baseline; accuracies on the other prompts cannot come from copying.

    Raises:
        ValueError: a prompt without a query index or label, or a task without an ``input`` field.
    """
    if "input" not in builder.task.text_fields:
        raise ValueError(f"Task {builder.task.name!r} has no 'input' field; the copy control is for open tasks.")
    if any(p.query_index is None for p in prompts):
        raise ValueError("input_copy_matches needs prompts with their query index (built by make_prompts).")
    gold = gold_answer_ids(builder, prompts)  # raises for a prompt without a gold label
    space = " " if builder.label_words and builder.label_words[0].startswith(" ") else ""
    out = []
    for p, answer in zip(prompts, gold):
        copied = encode_piece(builder.tokenizer, space + str(queries[p.query_index]["input"]))
        out.append(bool(copied) and copied[0] == answer[0])
    return torch.tensor(out, dtype=torch.bool)
