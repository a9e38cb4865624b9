"""``icl-kernels eval``: zero-shot and k-shot accuracy of a model on a task, as a study.

One k-shot prompt per test query (the first ``n_test`` of the task's seeded test split),
demonstrations drawn per query from the train split (class-balanced by default), the label word
with the highest log-probability as the prediction (`icl_kernels.engine.accuracy.evaluate_icl`), 95%
Wilson intervals, per-class prediction rates and, by default, contextual calibration (the k-shot
prediction corrected by the model's output on a content-free query, Zhao et al. 2021).

An open-vocabulary task (``kind`` ``open``: capitalize, country-capital, ...) is scored over the whole
vocabulary instead (`icl_kernels.engine.accuracy.evaluate_open`): zero-shot on the cue-free query
``Q: x\nA:`` against k-shot with randomly drawn demonstrations, top-1 accuracy of the answer's first
token with Wilson intervals, greedy exact match of the whole answer and its mean log-probability.
Calibration does not apply there, and the summary says so in place of a number.

Outputs: ``metrics.json`` (the summary, with how it was made: dtype, device, backend, selector,
calibration, context fitting, package versions, the run's fingerprint and data source) and
``predictions.csv`` (one row per query).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd

from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.accuracy import evaluate_icl, evaluate_open
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.utils.config import Options, PromptOptions
from icl_kernels.utils.environment import environment
from icl_kernels.utils.errors import InvalidOptionError

__all__ = ["EvalConfig", "EvalReport", "run", "run_setup"]


@dataclass
class EvalConfig(Options):
    """Options of one evaluation (see the module docstring)."""

    #: open-vocabulary tasks are scored over the whole vocabulary (`icl_kernels.studies.preflight`)
    supports_open_tasks: ClassVar[bool] = True

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
        if s.get("kind") == "open":
            return (f"{s['model']} on {s['task']} (open vocabulary, top-1 first token): zero-shot {s['zsl_accuracy']:.3f} "
                    f"[{zl:.3f}, {zh:.3f}], {s['shots']}-shot {s['icl_accuracy']:.3f} [{il:.3f}, {ih:.3f}]; exact match "
                    f"{s['zsl_exact_match']:.3f} -> {s['icl_exact_match']:.3f}; answer log-prob "
                    f"{s['zsl_answer_log_prob']:.2f} -> {s['icl_answer_log_prob']:.2f}; calibration: not applicable "
                    f"(n={s['n_test']})")
        text = (f"{s['model']} on {s['task']}: zero-shot {s['zsl_accuracy']:.3f} [{zl:.3f}, {zh:.3f}], "
                f"{s['shots']}-shot {s['icl_accuracy']:.3f} [{il:.3f}, {ih:.3f}]")
        if "icl_calibrated_accuracy" in s:
            cl, ch = s["icl_calibrated_ci95"]
            text += f", {s['shots']}-shot calibrated {s['icl_calibrated_accuracy']:.3f} [{cl:.3f}, {ch:.3f}]"
        return text + f" (n={s['n_test']})"


#: Package versions recorded in every evaluation's summary (`icl_kernels.utils.environment.environment`).
VERSION_KEYS = ("icl_kernels", "torch", "transformer_lens", "transformers", "numpy", "pandas", "python", "git_commit")


def run_setup(cfg: EvalConfig, model, open_task: bool = False) -> dict:
    """How the numbers were made, beside them in ``metrics.json``: the dtype, device and backend the
    model actually ran with, the demonstration selector, calibration, context fitting and versions
    (`Report.write` adds the fingerprint and the data source)."""
    env = environment()
    return {
        "backend": cfg.model.backend or "default",
        "backend_used": str(tl_backend.backend_of(model)),
        "dtype": str(tl_backend.model_dtype(model)).removeprefix("torch."),
        "device": str(tl_backend.model_device(model)),
        "selector": "random, class-balanced" if cfg.balanced and not open_task else "random",
        "balanced": cfg.balanced and not open_task, "drop_demos_to_fit": cfg.drop_demos_to_fit,
        **({} if open_task else {"calibration": cfg.calibration}),
        "versions": {k: env.get(k) for k in VERSION_KEYS},
    }


def run(cfg: EvalConfig, model=None, progress: bool = True) -> EvalReport:
    """Evaluate ``cfg.model`` (loaded unless given) on ``cfg.prompts``."""
    task = get_task(cfg.prompts.task)  # a bad task name or a missing data package fails before the model loads
    task.check_data()
    model = model if model is not None else cfg.model.load()
    if task.kind == "open":  # no label set: no class balancing, no calibration (the summary says so)
        result = evaluate_open(model, task, shots=cfg.prompts.shots, n_test=cfg.prompts.n_test, seed=cfg.prompts.seed,
                               batch_size=cfg.batch_size, drop_demos_to_fit=cfg.drop_demos_to_fit, progress=progress)
        summary = result.metrics() | {"model": cfg.model.model} | run_setup(cfg, model, open_task=True)
        return EvalReport("eval", cfg, {"predictions": pd.DataFrame(result.rows)}, summary)
    result = evaluate_icl(
        model, task, shots=cfg.prompts.shots, n_test=cfg.prompts.n_test, seed=cfg.prompts.seed,
        batch_size=cfg.batch_size, balanced=cfg.balanced, calibrated=cfg.calibration,
        drop_demos_to_fit=cfg.drop_demos_to_fit, progress=progress,
    )
    summary = result.metrics() | {"model": cfg.model.model} | run_setup(cfg, model)
    return EvalReport("eval", cfg, {"predictions": pd.DataFrame(result.rows)}, summary)


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('eval', (
    ('zsl_accuracy', 'zero-shot accuracy on the test queries (Wilson 95% interval from `zsl_ci95`); open tasks: '
                     'top-1 first answer token over the vocabulary, cue-free prompt'),
    ('icl_accuracy', 'k-shot (ICL) accuracy on the same queries (Wilson 95% interval from `icl_ci95`); open tasks: '
                     'top-1 first answer token over the vocabulary'),
    ('icl_calibrated_accuracy', 'k-shot accuracy after contextual calibration (Zhao et al. 2021; Wilson interval)'),
    ('(zsl|icl|icl_calibrated)_prediction_rate\\[\\d+\\]', 'how often the prediction is label word i (queries)'),
    ('(zsl|icl)_exact_match', 'open tasks: greedy exact match of the whole answer (Hendel et al.; Wilson interval)'),
    ('(zsl|icl)_answer_log_prob', 'open tasks: mean teacher-forced log-probability of the whole answer (nats)'),
    ('multi_token_answer_share', 'open tasks: share of test answers that are several tokens'),
    ('mean_demos_used', 'mean number of demonstrations in a prompt (fewer when prompts are cut to fit)'),
    ('n_test|shots|seed', "the run's settings: test queries, demonstrations per prompt, seed"),
))

register("eval", EvalConfig, run, help=builtin_help("eval"),
         description=__doc__.split("\n\n")[1])
