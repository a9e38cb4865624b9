"""Every analysis of the package as a registered study: a configuration dataclass, ``run`` and a
`Report`. The command line builds one subcommand per study, the sweep runs them cell by cell, and
the notebook calls them directly::

    from icl_kernels.studies import get_study
    report = get_study("heads")({"model": "tiny-gpt-neo", "n_test": 8, "shots": 2})
    report.tables["heads"], report.summary

Importing this package registers the built-in studies (`BUILTIN`) and head scores (the module
`icl_kernels.studies.head_scores`: the families the ``families`` study compares; a new one is
``register_head_score(name, fn)``).
"""

from __future__ import annotations

import importlib

from icl_kernels.studies.head_scores import register_head_score
from icl_kernels.studies.registry import (
    DuplicateStudyError,
    Study,
    get_study,
    list_studies,
    register,
)
from icl_kernels.studies.report import Report

__all__ = [
    "BUILTIN", "DuplicateStudyError", "Report", "Study", "get_study", "list_studies", "register", "register_head_score",
]

#: The studies that ship with the package, registered in this order on import.
BUILTIN: tuple[str, ...] = ("evaluation", "heads", "theorem", "compare", "momentum", "causal", "families")

for _name in BUILTIN:
    importlib.import_module(f"icl_kernels.studies.{_name}")
