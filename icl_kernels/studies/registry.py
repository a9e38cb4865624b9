"""The registry of studies: the one list the command line, the sweep, the notebook and the
benchmarks read.

A study is a name, a configuration dataclass (an `icl_kernels.utils.config.Options`), and
``run(config, model=None, progress=True) -> Report``. ``model`` lets a caller that already holds the
model (a notebook, a sweep job running many cells) skip loading it; without it the study loads
``config.model`` itself. Registering a name twice is an error, so a plugin cannot silently replace a
built-in study.

Calling a `Study` gathers the run's identity (`icl_kernels.studies.identity.RunIdentity`: the
model identity hashes a local model folder) once, before the run, and hands what it records to
everything that needs it: the record before the run to the check of ``out`` and to the
``fingerprint.json`` a resumable run writes when it starts, the record after the run (its data
source says what loading the task saw) to the returned report (``Report.identity``, which
`Report.record` and `Report.write` use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from icl_kernels.studies.catalog import BUILTIN_STUDIES
from icl_kernels.studies.identity import RunIdentity, check_output, write_record
from icl_kernels.studies.preflight import check_installed
from icl_kernels.utils.config import Options
from icl_kernels.utils.errors import IclKernelsError, UnknownNameError

__all__ = ["Study", "register", "get_study", "list_studies", "registered_names", "DuplicateStudyError"]


class DuplicateStudyError(IclKernelsError, ValueError):
    """A study name is registered twice."""


@dataclass(frozen=True)
class Study:
    """One registered analysis.

    Attributes:
        name: the subcommand and sweep name.
        config: its configuration dataclass.
        run: ``run(config, model=None, progress=True) -> Report``.
        help: one line for ``icl-kernels --help``.
        description: a paragraph for ``icl-kernels NAME --help``.
        resumable: ``run`` takes ``out=`` and keeps finished work there, so a rerun after a crash
            skips it (the command line passes its ``--out``). Rows of another configuration are
            never reused: see `__call__`.
        grid_keys: options that add rows to a resumable run rather than change them (a rerun that
            only changes these may extend the run in the same ``out``).
        state_files: the files in ``out`` a resumable run reads back (deleted by ``force``).
    """

    name: str
    config: type[Options]
    run: Callable[..., Any]
    help: str = ""
    description: str = ""
    resumable: bool = False
    grid_keys: tuple[str, ...] = ()
    state_files: tuple[str, ...] = ()

    def __call__(
        self, config: Options | dict, model=None, progress: bool = True, out=None, *, force: bool = False,
        record: bool = False,
    ):
        """Run the study on a configuration (or a mapping of its options).

        What the run needs installed (its tasks' data packages, its backend) is checked first
        (`icl_kernels.studies.preflight.check_installed`). The run's identity (`identify`) is gathered once, then. With ``out`` (the folder the
        report will be written to), ``out`` is checked before any work (`check_output`: writable,
        and holding no run of another configuration; ``force`` deletes that run's files instead).
        A resumable study keeps its rows in ``out`` and, with ``record``, writes ``fingerprint.json``
        when it starts writing rows, so that an interrupted run can only be resumed by the same
        configuration. The returned report carries the run's record, taken after the run, as
        ``identity``.
        """
        cfg = config if isinstance(config, self.config) else self.config.from_dict(config)
        check_installed(cfg, loads_model=model is None)  # a missing data package or backend: one line, before any load
        identity = self.identify(cfg)
        start = None
        if out is not None:
            before = identity.record()
            check_output(out, before, grid_keys=self.grid_keys, state_files=self.state_files, force=force)
            if record:
                start = partial(write_record, out, before)
        if self.resumable:
            report = self.run(cfg, model=model, progress=progress, out=out, on_start=start)
        else:
            report = self.run(cfg, model=model, progress=progress)
        if hasattr(report, "identity"):  # a Report (the registry does not import it: report.py imports us)
            report.identity = identity.record()
        return report

    def identify(self, config: Options) -> RunIdentity:
        """The identity of a run of ``config`` (`icl_kernels.studies.identity.RunIdentity` with this
        study's grid keys): its ``record()`` is the fingerprint, resume key, configuration, model
        identity and data source."""
        return RunIdentity(self.name, config, self.grid_keys)


_STUDIES: dict[str, Study] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Import the built-in studies' modules (`icl_kernels.studies.catalog`), which register them,
    once, before the first lookup or registration: built-in studies come first, and a plugin cannot
    take a built-in name."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True  # set first: each module registers itself through `register`
    for study in BUILTIN_STUDIES:
        importlib.import_module(f"icl_kernels.studies.{study.module}")


def register(
    name: str, config: type[Options], run: Callable[..., Any], *, help: str = "", description: str = "",
    resumable: bool = False, grid_keys: tuple[str, ...] = (), state_files: tuple[str, ...] = (),
) -> Study:
    """Add a study; raises `DuplicateStudyError` if the name is taken."""
    _load_builtins()
    if name in _STUDIES:
        raise DuplicateStudyError(f"A study named {name!r} is already registered ({_STUDIES[name].run.__module__}).")
    if not (isinstance(config, type) and issubclass(config, Options)):
        raise TypeError(f"Study {name!r}: config must be an icl_kernels.utils.config.Options dataclass, not {config!r}.")
    study = Study(name, config, run, help, description, resumable, tuple(grid_keys), tuple(state_files))
    _STUDIES[name] = study
    return study


def get_study(name: str) -> Study:
    """The registered study ``name``; an `UnknownNameError` listing the known ones otherwise."""
    _load_builtins()
    if name not in _STUDIES:
        raise UnknownNameError("study", name, _STUDIES, hint="`icl-kernels --help` lists them.")
    return _STUDIES[name]


def list_studies() -> list[Study]:
    """Every registered study: the built-in ones in their order (`BUILTIN_STUDIES`), then the others
    in registration order."""
    _load_builtins()
    order = {study.name: i for i, study in enumerate(BUILTIN_STUDIES)}
    return sorted(_STUDIES.values(), key=lambda study: order.get(study.name, len(order)))


def registered_names() -> list[str]:
    """The names registered so far, without importing the built-in studies (the command line
    adds a plugin study that was registered before it ran)."""
    return list(_STUDIES)
