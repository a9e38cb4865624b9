"""Errors raised on bad input.

Every error says what was wrong and what to do about it. They subclass the built-in exception a
caller would expect (``KeyError`` for unknown names, ``ValueError`` for bad values), so existing
``except`` clauses keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from icl_kernels.utils.paths import is_explicit_path


class IclKernelsError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownNameError(IclKernelsError, KeyError):
    """A name that no registry knows. The message lists the known names and close matches."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = ""):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        message = f"Unknown {kind} {name!r}."
        if close:
            message += f" Did you mean {', '.join(repr(c) for c in close)}?"
        message += f" Known {kind[:-1] + 'ies' if kind.endswith('y') else kind + 's'}: {', '.join(known)}."
        if hint:
            message += f" {hint}"
        super().__init__(message)
        self.name = name
        self.known = known

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class UnknownModelError(UnknownNameError):
    """`load_model` was given a name that is neither registered nor a local folder."""

    def __init__(self, name: str, known: Iterable[str]):
        super().__init__(
            "model",
            name,
            known,
            hint="A path to a local Hugging Face folder (with config.json) also works.",
        )


class UnknownArchitectureError(UnknownNameError, ValueError):
    """A model architecture without a record in `icl_kernels.models.architectures`."""

    def __init__(self, name: str, known: Iterable[str]):
        super().__init__(
            "architecture",
            name,
            known,
            hint="Attention geometry and HookedTransformer loading are known only for these; "
            "support another by adding its record to icl_kernels/models/architectures.py.",
        )


class UnknownTaskError(UnknownNameError):
    """`get_task` was given a name that is not registered."""

    def __init__(self, name: str, known: Iterable[str]):
        hint = "`icl-kernels tasks` lists them."
        if isinstance(name, str) and is_explicit_path(name):
            hint += (" A task is a registered name, not a path: to read a hub task's data from local files, set "
                     "ICL_KERNELS_DATA_DIR to a folder holding <task name>/train.csv and test.csv.")
        super().__init__("task", name, known, hint=hint)


class LabelTokenizationError(IclKernelsError, ValueError):
    """Label words that collide or tokenise in a way that would make scoring ambiguous."""


class PromptTooLongError(IclKernelsError, ValueError):
    """A prompt does not fit in the model's context."""


class MissingClassError(IclKernelsError, ValueError):
    """A class needed for the demonstrations is absent from the demonstration pool."""


class MissingAssetError(IclKernelsError, FileNotFoundError):
    """An offline asset (a PyPI data or weight package) is not installed."""


class DuplicateTaskError(IclKernelsError, ValueError):
    """`register_task` was given a name that is already registered."""


class TaskDefinitionError(IclKernelsError, ValueError):
    """A `Task` whose template, text fields or label words are inconsistent."""


class TaskDataError(IclKernelsError, ValueError):
    """A task's data could not be loaded or does not have the expected columns or labels."""


class MissingTokenizerError(IclKernelsError, ValueError):
    """A text task was asked of a model that has no text tokenizer (e.g. synthetic-gpt-neo)."""


class WorldFileError(IclKernelsError, ValueError):
    """A ``world.json`` that is not JSON, or not a world written by ``SyntheticWorld.to_json``."""


class InvalidOptionError(IclKernelsError, ValueError):
    """An analysis option is out of range or inconsistent with another option."""


class NonFiniteLogitsError(IclKernelsError, FloatingPointError):
    """The model produced NaN or infinite logits (float16 overflow, or NaN in the weights or an edit):
    a prediction made from them would be meaningless, so the run stops. The message names the
    prompts."""


class NonFiniteActivationsError(IclKernelsError, FloatingPointError):
    """A recorded run holds NaN or infinite activations (queries, keys, values, attention outputs or
    scores) although its prediction logits are finite: the comparison's linear algebra cannot use
    them, so the run stops. The message names the run, the layer and the tensor."""


class LearningRateCollapseError(IclKernelsError, ValueError):
    """Every candidate learning rate of a development search made the finetuned model collapse on at
    least one development fold; the message names each rate and its folds."""


class OutputLockedError(IclKernelsError, RuntimeError):
    """Another run holds the lock on an output folder (`icl_kernels.utils.locking.folder_lock`); the
    message names it (pid, host, start time, command)."""


class UnsafePathError(IclKernelsError, OSError):
    """A lock or state file is a symbolic link (or not a regular file): the run refuses to follow it,
    so that a planted link cannot make it overwrite the file the link points to."""
