"""The registry of studies: the one list the command line, the sweep, the notebook and the
benchmarks read.

A study is a name, a configuration dataclass (an `icl_kernels.utils.config.Options`), and
``run(config, model=None, progress=True) -> Report``. ``model`` lets a caller that already holds the
model (a notebook, a sweep job running many cells) skip loading it; without it the study loads
``config.model`` itself. Registering a name twice is an error, so a plugin cannot silently replace a
built-in study.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

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
            skips it (the command line passes its ``--out``). Before it runs, ``out`` is checked
            (`icl_kernels.studies.identity.check_output`): rows of another configuration are never reused.
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

        For a resumable study with ``out``: ``out`` is checked first (`check_output`; ``force``
        deletes another run's files there) and, with ``record``, ``fingerprint.json`` is written
        when the study starts writing rows, so that an interrupted run can only be resumed by the
        same configuration.
        """
        cfg = config if isinstance(config, self.config) else self.config.from_dict(config)
        if self.resumable:
            start = None
            if out is not None:
                from icl_kernels.studies.identity import check_output, write_record

                run_record = check_output(out, self.name, cfg, force=force)
                if record:
                    start = partial(write_record, out, run_record)
            return self.run(cfg, model=model, progress=progress, out=out, on_start=start)
        return self.run(cfg, model=model, progress=progress)


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
