"""``icl-kernels eval``: zero-shot and k-shot accuracy of a model on a task, as a study.

One k-shot prompt per test query (the first ``n_test`` of the task's seeded test split),
demonstrations drawn per query from the train split (class-balanced by default), the label word
with the highest log-probability as the prediction (`icl_kernels.evaluate.evaluate_icl`), 95%
Wilson intervals, per-class prediction rates and, by default, contextual calibration (the k-shot
prediction corrected by the model's output on a content-free query, Zhao et al. 2021).

Outputs: ``metrics.json`` (the summary) and ``predictions.csv`` (one row per query).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from icl_kernels.config import ModelOptions, Options, PromptOptions
from icl_kernels.errors import InvalidOptionError
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report

__all__ = ["EvalConfig", "EvalReport", "run"]


@dataclass
class EvalConfig(Options):
    """Options of one evaluation (see the module docstring)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    batch_size: int = field(default=4, metadata={"help": "prompts per forward pass"})
    balanced: bool = field(default=True, metadata={"help": "class-balanced demonstrations"})
    calibration: bool = field(default=True, metadata={"help": "also report contextually calibrated accuracy"})
    drop_demos_to_fit: bool = field(default=False, metadata={
        "help": "drop the earliest demonstrations of prompts longer than the context"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidOptionError(f"batch_size must be >= 1, not {self.batch_size}.")


@dataclass
class EvalReport(Report):
    summary_file = "metrics.json"

    def line(self) -> str:
        s = self.summary
        zl, zh = s["zsl_ci95"]
        il, ih = s["icl_ci95"]
        text = (f"{s['model']} on {s['task']}: zero-shot {s['zsl_accuracy']:.3f} [{zl:.3f}, {zh:.3f}], "
                f"{s['shots']}-shot {s['icl_accuracy']:.3f} [{il:.3f}, {ih:.3f}]")
        if "icl_calibrated_accuracy" in s:
            text += f", {s['shots']}-shot calibrated {s['icl_calibrated_accuracy']:.3f}"
        return text + f" (n={s['n_test']})"


def run(cfg: EvalConfig, model=None, progress: bool = True) -> EvalReport:
    """Evaluate ``cfg.model`` (loaded unless given) on ``cfg.prompts``."""
    from icl_kernels.evaluate import evaluate_icl
    from icl_kernels.tasks import get_task

    task = get_task(cfg.prompts.task)  # a bad task name fails before the model loads
    model = model if model is not None else cfg.model.load()
    result = evaluate_icl(
        model, task, shots=cfg.prompts.shots, n_test=cfg.prompts.n_test, seed=cfg.prompts.seed,
        batch_size=cfg.batch_size, balanced=cfg.balanced, calibrated=cfg.calibration,
        drop_demos_to_fit=cfg.drop_demos_to_fit, progress=progress,
    )
    summary = result.metrics() | {"model": cfg.model.model, "backend": cfg.model.backend or "default"}
    return EvalReport("eval", cfg, {"predictions": pd.DataFrame(result.rows)}, summary)


register("eval", EvalConfig, run, help="zero-shot and k-shot accuracy of a model on a task",
         description=__doc__.split("\n\n")[1])
