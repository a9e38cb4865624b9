"""The registry of studies: the one list the command line, the sweep, the notebook and the
benchmarks read.

A study is a name, a configuration dataclass (an `icl_kernels.utils.config.Options`), and
``run(config, model=None, progress=True) -> Report``. ``model`` lets a caller that already holds the
model (a notebook, a sweep job running many cells) skip loading it; without it the study loads
``config.model`` itself. Registering a name twice is an error, so a plugin cannot silently replace a
built-in study.

Calling a `Study` computes the run's identity (`icl_kernels.studies.identity.run_record`: it
hashes a local model folder) once, before the run, and hands that one record to everything that
needs it: the check of ``out``, the ``fingerprint.json`` a resumable run writes when it starts,
and the returned report (``Report.identity``, which `Report.record` and `Report.write` use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from icl_kernels.studies.identity import check_output, run_record, write_record
from icl_kernels.utils.config import Options
from icl_kernels.utils.errors import IclKernelsError, UnknownNameError

__all__ = ["Study", "register", "get_study", "list_studies", "DuplicateStudyError"]


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

        The run's record (`identify`) is computed once, first. With ``out`` (the folder the report
        will be written to), ``out`` is checked before any work (`check_output`: writable, and
        holding no run of another configuration; ``force`` deletes that run's files instead). A
        resumable study keeps its rows in ``out`` and, with ``record``, writes ``fingerprint.json``
        when it starts writing rows, so that an interrupted run can only be resumed by the same
        configuration. The returned report carries the record as ``identity``.
        """
        cfg = config if isinstance(config, self.config) else self.config.from_dict(config)
        identity = self.identify(cfg)
        if out is not None:
            check_output(out, identity, grid_keys=self.grid_keys, state_files=self.state_files, force=force)
        if self.resumable:
            start = partial(write_record, out, identity) if out is not None and record else None
            report = self.run(cfg, model=model, progress=progress, out=out, on_start=start)
        else:
            report = self.run(cfg, model=model, progress=progress)
        if hasattr(report, "identity"):  # a Report (the registry does not import it: report.py imports us)
            report.identity = identity
        return report

    def identify(self, config: Options) -> dict[str, Any]:
        """The run record of ``config`` (`icl_kernels.studies.identity.run_record` with this study's
        grid keys): fingerprint, resume key, configuration, model identity and data source."""
        return run_record(self.name, config, grid_keys=self.grid_keys)


_STUDIES: dict[str, Study] = {}


def register(
    name: str, config: type[Options], run: Callable[..., Any], *, help: str = "", description: str = "",
    resumable: bool = False, grid_keys: tuple[str, ...] = (), state_files: tuple[str, ...] = (),
) -> Study:
    """Add a study; raises `DuplicateStudyError` if the name is taken."""
    if name in _STUDIES:
        raise DuplicateStudyError(f"A study named {name!r} is already registered ({_STUDIES[name].run.__module__}).")
    if not (isinstance(config, type) and issubclass(config, Options)):
        raise TypeError(f"Study {name!r}: config must be an icl_kernels.utils.config.Options dataclass, not {config!r}.")
    study = Study(name, config, run, help, description, resumable, tuple(grid_keys), tuple(state_files))
    _STUDIES[name] = study
    return study


def get_study(name: str) -> Study:
    """The registered study ``name``; an `UnknownNameError` listing the known ones otherwise."""
    if name not in _STUDIES:
        raise UnknownNameError("study", name, _STUDIES, hint="`icl-kernels --help` lists them.")
    return _STUDIES[name]


def list_studies() -> list[Study]:
    """Every registered study, in registration order."""
    return list(_STUDIES.values())
