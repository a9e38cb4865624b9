"""The studies that ship with the package, by name, without importing them.

`BUILTIN_STUDIES` holds each study's name, its module in `icl_kernels.studies` and its one-line
help, in registration order. The command line reads it to list the studies (``icl-kernels --help``)
and imports a study's module (which registers it, `icl_kernels.studies.registry.register`) only when
that study is asked for; the registry imports them all before its first lookup. This module imports
nothing heavy, and its help lines are the ones the modules register.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["BUILTIN_STUDIES", "BuiltinStudy", "builtin_help", "builtin_module"]


class BuiltinStudy(NamedTuple):
    name: str  #: the subcommand and sweep name
    module: str  #: the module in `icl_kernels.studies` that registers it
    help: str  #: one line for ``icl-kernels --help``


BUILTIN_STUDIES: tuple[BuiltinStudy, ...] = (
    BuiltinStudy("eval", "evaluation", "zero-shot and k-shot accuracy of a model on a task"),
    BuiltinStudy("heads", "heads", "label-attention heads as kernel regression (Han et al.)"),
    BuiltinStudy("theorem", "theorem", "Theorem 1 simulation on the synthetic mixture-of-HMMs world"),
    BuiltinStudy("compare", "compare", "ICL vs finetuning of key/value projections (Dai et al.) with controls"),
    BuiltinStudy("momentum", "momentum",
                 "momentum attention (Dai et al. sec. 5), training-free: ICL accuracy and perplexity over a grid"),
    BuiltinStudy("causal", "causal", "ablate / patch the top label-attention heads (vs random heads), and layer by layer"),
    BuiltinStudy("families", "families",
                 "label-attention, induction and function-vector heads, task vectors and anchors side by side"),
)

_BY_NAME = {study.name: study for study in BUILTIN_STUDIES}


def builtin_help(name: str) -> str:
    """The one-line help of the built-in study ``name``."""
    return _BY_NAME[name].help


def builtin_module(name: str) -> str | None:
    """The full module path of the built-in study ``name``; None for any other name."""
    study = _BY_NAME.get(name)
    return None if study is None else f"icl_kernels.studies.{study.module}"
