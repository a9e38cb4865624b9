"""The typechecker the test run hands jaxtyping's import hook (``--jaxtyping-packages`` in
pyproject.toml): beartype on every function and method of ``icl_kernels``, except functions defined
inside another function.

jaxtyping's hook decorates every ``def`` in the package, and a nested ``def`` (a TransformerLens hook,
a local helper) is decorated again each time its enclosing function runs, and beartype compiles a new
checker for every decoration: with every function checked, single test files of the engine ran a
quarter to a third slower than without the hook. Those hooks take
TransformerLens's ``(activation, hook)``, which the enclosing function's own checked signature and the
exactness tests already pin down; they keep jaxtyping's shape context but get no beartype checker.
"""

from __future__ import annotations

from beartype import beartype


def beartype_outside_locals(fn):
    """``beartype(fn)``, or ``fn`` unchanged when it is defined inside a function (its qualified name
    has ``<locals>``; jaxtyping passes a generated function carrying the original's qualified name)."""
    if "<locals>" in getattr(fn, "__qualname__", ""):
        return fn
    return beartype(fn)
