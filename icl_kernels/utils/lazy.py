"""A module imported on first use: `lazy_module`.

The command line lists models and tasks without the libraries that only running them needs
(``datasets``, ``pandas``): a module that uses one of those names it at the top with
``pd = lazy_module("pandas")``, and the library is imported the first time an attribute of it is
read (``pd.read_csv``, or an annotation such as ``pd.DataFrame`` when a type checker resolves it).
Until then the library is not in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(types.ModuleType):
    """Stands in for the module ``__name__``; imports it on the first attribute it is asked for."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__dict__["__name__"]
        module = sys.modules.get(name) or importlib.import_module(name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> types.ModuleType:
    """``name`` (a module path such as ``"pandas"``), imported when one of its attributes is first read."""
    return _LazyModule(name)
