"""The ``icl-kernels`` command line.

Subcommands: ``models`` and ``tasks`` (what is available, one per line, name first), and one
subcommand per registered study in `icl_kernels.studies` (``eval``, ``heads``, ``theorem``,
``compare``, ``momentum``, ``causal``, ``families``): its options are the fields of the study's configuration dataclass, plus
``--out`` (where `Report.write` puts tables, summary, configuration and figures; the run holds a lock
on it, ``.icl-kernels.lock``, while it runs) and ``--threads``.
This module is the only place that parses arguments, sets torch threads or picks the output folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import torch

from icl_kernels.data.tasks.registry import list_tasks
from icl_kernels.models.loading import list_models
from icl_kernels.studies import list_studies
from icl_kernels.studies.identity import check_writable
from icl_kernels.utils.config import add_arguments, from_arguments
from icl_kernels.utils.errors import IclKernelsError, InvalidOptionError
from icl_kernels.utils.locking import folder_lock


def _models(args) -> int:
    for spec in list_models():
        print(f"{spec.name}\t{spec.source}\t{spec.description}")
    return 0


def _tasks(args) -> int:
    for task in list_tasks():
        print(f"{task.name}\t{task.n_classes} classes\t{task.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-kernels",
        description="Head-by-head tests of in-context learning as kernel regression and as implicit finetuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list models, one per line").set_defaults(func=_models)
    sub.add_parser("tasks", help="list tasks, one per line").set_defaults(func=_tasks)


    for study in list_studies():
        add_study_parser(sub, study)
    return parser


def add_study_parser(subparsers, study) -> argparse.ArgumentParser:
    """One subcommand for a registered study: its configuration fields, ``--out`` and ``--threads``."""
    parser = subparsers.add_parser(
        study.name, help=study.help, description=study.description or study.help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser, study.config)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--force", action="store_true",
                        help="if --out holds a run of another configuration, delete its files and rerun")
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
    if args.threads is not None and args.threads < 1:
        raise InvalidOptionError(f"--threads must be >= 1, not {args.threads}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_writable(args.out)  # a file at --out: its own message, before the lock makes the folder
    with folder_lock(args.out):
        report = study(config, progress=True, out=args.out, force=args.force, record=True)  # --out checked first
        out = report.write(args.out)
    print(f"{report.line()} ({out / report.summary_file})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IclKernelsError as error:
        print(f"icl-kernels: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
