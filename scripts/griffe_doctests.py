"""A Griffe extension for the documentation site (mkdocs.yml loads it): doctest examples in docstrings
become ``pycon`` code blocks, and Sphinx roles become inline code.

The package's docstrings hold doctests as plain ``>>>`` lines, which Markdown would read as nested
block quotes (and an output such as ``[0.49, 0.943]`` as a link reference). Each run of lines that
starts with ``>>>`` and ends at the next blank line is fenced as a ``pycon`` block. A few docstrings
name objects with Sphinx roles (``:class:`Task```), which Markdown would print with the role; the
role is dropped and the name kept as inline code. Nothing else in a docstring changes, and only the
rendered site uses this: the docstrings themselves stay doctests.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

FENCE = "```"
SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def drop_sphinx_roles(text: str) -> str:
    """``:class:`Task``` -> ```Task``` (and the same for the other Python-domain roles)."""
    return SPHINX_ROLE.sub(r"`\1`", text)


def fence_doctests(text: str) -> str:
    """``text`` with every run of doctest lines (``>>>`` up to the next blank line) fenced as ``pycon``;
    lines already inside a fence are left alone (tests/integration/test_docs.py checks both)."""
    out: list[str] = []
    in_fence = in_doctest = False
    indent = ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if in_doctest and not stripped:
            out.append(f"{indent}{FENCE}")
            in_doctest = False
        elif not in_doctest and stripped.startswith(FENCE):
            in_fence = not in_fence
        elif not in_doctest and not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            if out and out[-1].strip():
                out.append("")
            out.append(f"{indent}{FENCE}pycon")
            in_doctest = True
        out.append(line)
    if in_doctest:
        out.append(f"{indent}{FENCE}")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctests and drop the Sphinx roles of every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = drop_sphinx_roles(fence_doctests(obj.docstring.value))
