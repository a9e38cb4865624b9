"""When a name is a path: registered names win over same-named folders of the current directory.

Models and tasks are named by the user (``--model tiny-gpt-neo``, ``--task ag_news``), and the same
string may also name a folder of the current directory (``./tiny-gpt-neo``) or a hub id that
``transformers`` and ``datasets`` would resolve against that directory first (``./fancyzhx/ag_news``).
A run must read what its record says it read, so a string is taken as a local path only when it is
written as one: it starts with ``./``, ``../``, ``/`` or ``~`` (or is ``.`` or ``..``, or an absolute
path of the platform). Anything else is looked up by name first.
"""

from __future__ import annotations

import os

__all__ = ["is_explicit_path"]

_PREFIXES = ("./", "../", "/", "~")


def is_explicit_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` is written as a path (``./x``, ``../x``, ``/x``, ``~/x``, ``.``, ``..``), not a bare name."""
    text = os.fspath(name)
    prefixes = _PREFIXES + tuple(p.replace("/", os.sep) for p in _PREFIXES if os.sep != "/")
    return text in (".", "..") or text.startswith(prefixes) or os.path.isabs(text)
