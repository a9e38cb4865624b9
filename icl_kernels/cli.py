"""The ``icl-kernels`` command line.

Subcommands: ``eval`` (zero-shot and k-shot accuracy), ``models`` and ``tasks`` (what is
available, one per line, name first), and the analyses ``heads``, ``theorem``, ``compare`` and
``momentum``, each defined next to the code it runs (``cli_heads.py``, ``cli_compare.py``,
``cli_momentum.py``) and registered here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from icl_kernels.io import write_csv, write_json

# (module, function that adds the subparsers) for the analysis subcommands.
ANALYSIS_COMMANDS = (
    ("icl_kernels.cli_heads", "add_heads_parser"),
    ("icl_kernels.cli_heads", "add_theorem_parser"),
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


def parse_numbers(text: str, kind: type = float, what: str = "value") -> tuple:
    """``"0.1,0.3"`` -> ``(0.1, 0.3)``; a clear `InvalidOptionError` for a bad or empty list."""
    from icl_kernels.errors import InvalidOptionError

    try:
        values = tuple(kind(x) for x in str(text).split(",") if x.strip())
    except ValueError as error:
        raise InvalidOptionError(f"{what}: expected comma-separated numbers, got {text!r}.") from error
    if not values:
        raise InvalidOptionError(f"{what}: no value in {text!r}.")
    return values


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

    for module_name, function in ANALYSIS_COMMANDS:
        getattr(importlib.import_module(module_name), function)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as error:
        from icl_kernels.errors import IclKernelsError

        if isinstance(error, IclKernelsError):
            print(f"icl-kernels: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
