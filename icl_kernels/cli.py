"""The ``icl-kernels`` command line.

Subcommands: ``models`` and ``tasks`` (what is available, one per line, name first), ``view``
(`icl_kernels.studies.view`: one HTML page that explores a run head by head, offline), ``sweep`` and
``summarize`` (`icl_kernels.sweeps`: run registered studies over a grid from a TOML config, and turn
sweep folders into tables, figures, a report and one tidy table of headline numbers), and one
subcommand per registered study in `icl_kernels.studies` (``eval``, ``heads``, ``theorem``,
``compare``, ``momentum``, ``causal``, ``families``): its options are the fields of the study's configuration dataclass, plus
``--out`` (where `Report.write` puts tables, summary, configuration and figures; the run holds a lock
on it, ``.icl-kernels.lock``, while it runs), ``--threads`` and ``--verbose`` (let TransformerLens's
device/dtype lines through; `icl_kernels.utils.quiet`). Every option is the configuration field's
name with dashes (a former spelling still works, named in ``--help``), each default shown once, as typed.
This module is the only place that parses arguments, sets torch threads or picks the output folder.

The command line starts fast: building the parser imports no torch, TransformerLens, transformers,
datasets, plotly or pandas. Studies are listed from `icl_kernels.studies.catalog`, and only the
study a command names is imported (with its configuration, for its options and ``--help``), so
``icl-kernels --help``, ``--version``, ``models`` and ``tasks`` never load them. ``sweep`` and
``summarize`` hand their arguments to their own parser (`icl_kernels.sweeps.command`,
`icl_kernels.sweeps.summary`), imported only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.metadata
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import icl_kernels
from icl_kernels.data.tasks.open_vocab import find_user_open_tasks
from icl_kernels.data.tasks.registry import SYNTHETIC_TASK_DESCRIPTION, SYNTHETIC_TASKS, list_tasks
from icl_kernels.models.registry import list_models
from icl_kernels.studies.catalog import BUILTIN_STUDIES
from icl_kernels.utils.config import OptionsHelpFormatter, add_arguments, from_arguments
from icl_kernels.utils.errors import IclKernelsError, InvalidOptionError
from icl_kernels.utils.locking import folder_lock
from icl_kernels.utils.quiet import set_verbose

REGISTRY = "icl_kernels.studies.registry"
#: Subcommands with a parser of their own: name -> (module with ``command(argv, prog)``, help line).
DELEGATED = {
    "sweep": ("icl_kernels.sweeps.command", "run registered studies over a grid from a sweep config (CONFIG.toml)"),
    "summarize": ("icl_kernels.sweeps.summary",
                  "tables, figures, report and headline table of sweep folders; study runs side by side (RUN ...)"),
}


def version() -> str:
    """The installed distribution's version; the package's ``__version__`` when it is not installed."""
    try:
        return importlib.metadata.version("icl-kernels")
    except importlib.metadata.PackageNotFoundError:
        return icl_kernels.__version__


def _models(args) -> int:
    for spec in list_models():
        print(f"{spec.name}\t{spec.source}\t{spec.description}")
    return 0


def _tasks(args) -> int:
    # an open task's answers are read from its data, which listing does not do
    for task in [*list_tasks(), *find_user_open_tasks()]:
        kind = f"{task.n_classes} classes" if task.kind == "classification" else "open vocabulary"
        print(f"{task.name}\t{kind}\t{task.description}")
    print(f"{SYNTHETIC_TASKS[0]}\tper world\t{SYNTHETIC_TASK_DESCRIPTION}")
    return 0


def _view(args) -> int:
    """Write the run's head explorer (`icl_kernels.studies.view`) and print where it is."""
    from icl_kernels.studies.view import VIEW_FILE, view_html  # noqa: PLC0415 - only this command needs the view (and its imports)
    from icl_kernels.utils.io import atomic_write_text  # noqa: PLC0415 - as above

    page = view_html(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / VIEW_FILE
    if out.is_dir():
        raise InvalidOptionError(f"--out {out} is a folder; give the page's file name (e.g. {out / VIEW_FILE}).")
    atomic_write_text(out, page)
    print(f"{out} ({len(page) / 1024:.0f} KiB; opens offline)")
    return 0


def _study_helps() -> dict[str, str]:
    """Every study's one-line help, by name: the built-in ones from the catalog (nothing imported),
    then any other study registered before the parser is built (a plugin's)."""
    helps = {study.name: study.help for study in BUILTIN_STUDIES}
    registry = sys.modules.get(REGISTRY)  # imported only if something registered or ran a study already
    if registry is not None:
        for name in registry.registered_names():
            if name not in helps:
                helps[name] = registry.get_study(name).help
    return helps


def build_parser(studies: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The parser; the studies named in ``studies`` get their options (the others are listed with
    their help line only, their modules not imported)."""
    parser = argparse.ArgumentParser(
        prog="icl-kernels",
        description="Head-by-head tests of in-context learning as kernel regression and as implicit finetuning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list models, one per line").set_defaults(func=_models)
    sub.add_parser("tasks", help="list tasks, one per line").set_defaults(func=_tasks)
    view = sub.add_parser("view", help="one self-contained HTML page exploring a run head by head (RUN_DIR)",
                          description="Write a page that opens offline: the layer x head map of the run's score "
                                      "(hover: interval and baseline; click: the head's attention over a prompt's tokens).")
    view.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a heads, families or causal run")
    view.add_argument("--out", default=None, help="the page's file (default: RUN_DIR/view.html)")
    view.set_defaults(func=_view)
    for name, (_, help_line) in DELEGATED.items():  # their options: `icl-kernels sweep --help`
        delegated = sub.add_parser(name, help=help_line, add_help=False)
        delegated.add_argument("arguments", nargs=argparse.REMAINDER)
        delegated.set_defaults(func=partial(_delegate, name))

    full = set(studies)
    for name, help_line in _study_helps().items():
        if name in full:
            add_study_parser(sub, _get_study(name))
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _get_study(name: str):
    return importlib.import_module(REGISTRY).get_study(name)


def add_study_parser(subparsers, study) -> argparse.ArgumentParser:
    """One subcommand for a registered study: its configuration fields, ``--out`` and ``--threads``."""
    parser = subparsers.add_parser(
        study.name, help=study.help, description=study.description or study.help,
        formatter_class=OptionsHelpFormatter,
    )
    add_arguments(parser, study.config)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--force", action="store_true",
                        help="if --out holds a run of another configuration, delete its files and rerun")
    parser.add_argument("--verbose", action="store_true",
                        help="show what TransformerLens and transformers print while a model loads (quiet by default)")
    parser.set_defaults(func=partial(run_study, study))
    return parser


def run_study(study, args: argparse.Namespace) -> int:
    """Validate the options and the output folder, run the study, write its report, print its line.

    Everything a user can get wrong is checked before a model loads: the options (the
    configuration's ``__post_init__``), ``--threads``, and ``--out`` (writable, and holding no run of
    another configuration: `icl_kernels.studies.identity.check_output`, in the study call, which
    computes the run's record once for the check and the report). From the check of ``--out`` to
    the written report the run holds the lock on ``--out`` (`icl_kernels.utils.locking.folder_lock`):
    a second run into the same folder stops with an `OutputLockedError` naming this one. A refused
    or failed run leaves no empty ``--out`` behind.
    """
    config = from_arguments(study.config, args)  # bad options fail here, before a model loads
    set_verbose(args.verbose)
    if args.threads is not None and args.threads < 1:
        raise InvalidOptionError(f"--threads must be >= 1, not {args.threads}.")
    if args.threads:
        import torch  # noqa: PLC0415 - only a study run needs torch; `--help`, `models` and `tasks` start without it

        torch.set_num_threads(args.threads)
    from icl_kernels.studies.identity import check_writable  # noqa: PLC0415 - a study run only; the parser starts without the model loader

    check_writable(args.out)  # a file at --out: its own message, before the lock makes the folder
    with folder_lock(args.out):
        report = study(config, progress=True, out=args.out, force=args.force, record=True)  # --out checked first
        out = report.write(args.out)
    print(f"{report.line()} ({out / report.summary_file})")
    return 0


def _delegate(name: str, args: argparse.Namespace) -> int:
    return run_delegated(name, args.arguments)


def run_delegated(name: str, argv: Sequence[str]) -> int:
    """Run the subcommand ``name`` of `DELEGATED` on ``argv`` (its module's ``command``: a bad
    config or folder is one line on stderr and exit code 2)."""
    module = importlib.import_module(DELEGATED[name][0])
    return module.command(list(argv), prog=f"icl-kernels {name}")


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top-level options,
    ``--help`` and ``--version``, take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # its own parser reads every argument after the name, --help too
        return run_delegated(argv[0], argv[1:])
    command = _command(argv)
    parser = build_parser(studies=[command] if command else [])  # only the study run gets its options
    args = parser.parse_args(argv)
    with _sigterm_as_interrupt():
        try:
            return int(args.func(args) or 0)
        except IclKernelsError as error:
            print(f"icl-kernels: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            if error.errno not in _NO_SPACE:
                raise
            where = f" writing {error.filename}" if error.filename else ""
            print(f"icl-kernels: error: no space left on the device{where} ({error.strerror}); free some space "
                  "and rerun the same command (finished work in --out is kept, caches are checked and rebuilt).",
                  file=sys.stderr)
            return 2
        except (KeyboardInterrupt, _Terminated) as error:
            name = "SIGTERM" if isinstance(error, _Terminated) else "SIGINT"
            print(f"icl-kernels: interrupted ({name}); rerun the same command to continue "
                  "(a resumable study keeps its finished units in --out).", file=sys.stderr)
            return 143 if isinstance(error, _Terminated) else 130


#: errno values of a full disk or quota: one error line, not a traceback.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class _Terminated(BaseException):
    """SIGTERM arrived (a scheduler or ``kill``): unwinds like Ctrl-C, so locks and partial files are released."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a command runs, SIGTERM raises `_Terminated` (when it would otherwise end the process at once)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
