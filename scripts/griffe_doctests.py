"""A Griffe extension for the documentation site (mkdocs.yml loads it): doctest examples in docstrings
become ``pycon`` code blocks.

The package's docstrings hold doctests as plain ``>>>`` lines, which Markdown would read as nested
block quotes (and an output such as ``[0.49, 0.943]`` as a link reference). Each run of lines that
starts with ``>>>`` and ends at the next blank line is fenced as a ``pycon`` block; nothing else in
the docstring changes. Only the rendered site uses this; the docstrings themselves stay doctests.
"""

from __future__ import annotations

from typing import Any

import griffe

FENCE = "```"


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
    """Fence the doctests of every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
