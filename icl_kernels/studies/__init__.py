"""Every analysis of the package as a registered study: a configuration dataclass, ``run`` and a
`Report`. The command line builds one subcommand per study, the sweep runs them cell by cell, and
the notebook calls them directly::

    from icl_kernels.studies import get_study
    report = get_study("heads")({"model": "tiny-gpt-neo", "n_test": 8, "shots": 2})
    report.tables["heads"], report.summary

The built-in studies (`BUILTIN`, named in `icl_kernels.studies.catalog`) and head scores (the module
`icl_kernels.studies.head_scores`: the families the ``families`` study compares; a new one is
``register_head_score(name, fn)``) are registered on first use: importing this package is cheap
(no torch), and reading any of its names below imports what it needs, the registry looking up a
study registers every built-in one first.
"""

from __future__ import annotations

import importlib
from typing import Any

from icl_kernels.studies.catalog import BUILTIN_STUDIES

__all__ = [
    "BUILTIN", "DuplicateStudyError", "Report", "Study", "get_study", "list_studies", "register", "register_head_score",
]

#: The modules of the studies that ship with the package, registered in this order on first use.
BUILTIN: tuple[str, ...] = tuple(study.module for study in BUILTIN_STUDIES)

_EXPORTS = {
    "DuplicateStudyError": "icl_kernels.studies.registry",
    "Study": "icl_kernels.studies.registry",
    "get_study": "icl_kernels.studies.registry",
    "list_studies": "icl_kernels.studies.registry",
    "register": "icl_kernels.studies.registry",
    "Report": "icl_kernels.studies.report",
    "register_head_score": "icl_kernels.studies.head_scores",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'icl_kernels.studies' has no attribute {name!r}")
