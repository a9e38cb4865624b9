"""Keep other libraries' chatter off the terminal while a model loads, unless asked for.

TransformerLens prints ``Moving model to device: cpu`` and ``Changing model dtype to ...`` on
stdout (plain ``print`` calls) every time a model is built, and it and ``transformers`` log
informational lines; none of it says anything a run's own output does not. `library_quiet` is a
context manager that, for the duration of its block, sends stdout to a buffer and raises the
``transformer_lens`` and ``transformers`` loggers to ERROR; warnings and errors still show, and
whatever was printed is kept (`Quieted.text`). `set_verbose` (the command line's ``--verbose``)
turns it into a no-op for the rest of the process.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["LOGGERS", "Quieted", "library_quiet", "set_verbose", "verbose"]

#: Loggers lowered to ERROR inside `library_quiet`.
LOGGERS = ("transformer_lens", "transformers")

_VERBOSE = False


def set_verbose(on: bool) -> None:
    """Let library output through (``True``) or quiet it while models load (``False``, the default)."""
    global _VERBOSE
    _VERBOSE = bool(on)


def verbose() -> bool:
    """Whether library output is let through."""
    return _VERBOSE


@dataclass
class Quieted:
    """What a quiet block swallowed from stdout (empty when verbose)."""

    text: str = ""


@contextlib.contextmanager
def library_quiet() -> Iterator[Quieted]:
    """Within the block: stdout to a buffer and the `LOGGERS` at ERROR (nothing changes when `verbose`)."""
    record = Quieted()
    if _VERBOSE:
        yield record
        return
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    buffer = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(buffer):
            yield record
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        record.text = buffer.getvalue()
