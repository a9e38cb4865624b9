"""The ``icl-kernels`` command line.

Subcommands: ``eval`` (zero-shot and k-shot accuracy), ``models`` and ``tasks`` (what is
available, one per line, name first), and one subcommand per registered study
(`icl_kernels.studies`): its options are the fields of the study's configuration dataclass, plus
``--out`` (where `Report.write` puts tables, summary, configuration and figures) and ``--threads``.
This module is the only place that parses arguments, sets torch threads or picks the output folder.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from functools import partial

from icl_kernels.config import add_arguments, from_arguments, parse_list
from icl_kernels.errors import IclKernelsError
from icl_kernels.io import write_csv, write_json

# (module, function that adds the subparsers) for analysis subcommands not yet registered as studies.
ANALYSIS_COMMANDS: tuple[tuple[str, str], ...] = (
    ("icl_kernels.cli_compare", "add_compare_parser"),
    ("icl_kernels.cli_momentum", "add_momentum_parser"),
)


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    """``--model --device --dtype --backend``, shared by every subcommand that loads a model."""
    from icl_kernels.models import DEFAULT_MODEL

    parser.add_argument("--model", default=default_model or DEFAULT_MODEL,
                        help="registered name (see `icl-kernels models`), hub id or local HF folder")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, bf16, fp16")
    parser.add_argument("--backend", default=None, choices=("hooked", "bridge"),
                        help="TransformerLens backend (default: HookedTransformer where installed)")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--task --shots --n-test --seed --out``, shared by the task-level subcommands."""
    from icl_kernels.tasks import DEFAULT_TASK

    parser.add_argument("--task", default=DEFAULT_TASK, help="see `icl-kernels tasks`")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory")


#: ``"0.1,0.3"`` -> ``(0.1, 0.3)`` (kept under its first name for the subcommands that use it).
parse_numbers = parse_list


def load_model_from_args(args):
    from icl_kernels.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)


def _eval(args) -> int:
    from icl_kernels.evaluate import evaluate_icl
    from icl_kernels.tasks import get_task

    task = get_task(args.task)  # fail on a bad task name before loading a model
    model = load_model_from_args(args)
    result = evaluate_icl(
        model, task, shots=args.shots, n_test=args.n_test, seed=args.seed,
        batch_size=args.batch_size, balanced=not args.unbalanced,
        calibrated=not args.no_calibration, drop_demos_to_fit=args.drop_demos_to_fit,
    )
    metrics = result.metrics() | {"model": args.model, "backend": args.backend or "default"}
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "predictions.csv"), result.rows)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    line = (
        f"{args.model} on {task.name}: zero-shot {result.zsl.accuracy:.3f} "
        f"[{result.zsl.ci_low:.3f}, {result.zsl.ci_high:.3f}], {args.shots}-shot "
        f"{result.icl.accuracy:.3f} [{result.icl.ci_low:.3f}, {result.icl.ci_high:.3f}]"
    )
    if result.icl_calibrated is not None:
        line += f", {args.shots}-shot calibrated {result.icl_calibrated.accuracy:.3f}"
    print(line + f" (n={args.n_test}; {args.out}/metrics.json)")
    return 0


def _models(args) -> int:
    from icl_kernels.models import list_models

    for spec in list_models():
        print(f"{spec.name}\t{spec.source}\t{spec.description}")
    return 0


def _tasks(args) -> int:
    from icl_kernels.tasks import list_tasks

    for task in list_tasks():
        print(f"{task.name}\t{task.n_classes} classes\t{task.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-kernels",
        description="Head-by-head tests of in-context learning as kernel regression and as implicit finetuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    evaluate = sub.add_parser("eval", help="zero-shot and k-shot accuracy of a model on a task")
    add_model_arguments(evaluate)
    add_task_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--unbalanced", action="store_true", help="random rather than class-balanced demos")
    evaluate.add_argument("--no-calibration", action="store_true", help="skip contextual calibration")
    evaluate.add_argument("--drop-demos-to-fit", action="store_true",
                          help="drop the earliest demonstrations of prompts longer than the context")
    evaluate.set_defaults(func=_eval)

    sub.add_parser("models", help="list models, one per line").set_defaults(func=_models)
    sub.add_parser("tasks", help="list tasks, one per line").set_defaults(func=_tasks)

    from icl_kernels.studies import list_studies

    for study in list_studies():
        add_study_parser(sub, study)
    for module_name, function in ANALYSIS_COMMANDS:
        getattr(importlib.import_module(module_name), function)(sub)
    return parser


def add_study_parser(subparsers, study) -> argparse.ArgumentParser:
    """One subcommand for a registered study: its configuration fields, ``--out`` and ``--threads``."""
    parser = subparsers.add_parser(study.name, help=study.help, description=study.description or study.help)
    add_arguments(parser, study.config)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=partial(run_study, study))
    return parser


def run_study(study, args: argparse.Namespace) -> int:
    """Validate the options, run the study, write its report and print its line."""
    config = from_arguments(study.config, args)  # bad options fail here, before a model loads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = study(config, progress=True, out=args.out)
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
