"""icl-kernels: head-by-head tests of in-context learning as kernel regression and as implicit finetuning.

The common entry points are importable from the package; submodules are imported on first use so
that ``import icl_kernels`` stays cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "icl_kernels.models.loading",
    "list_models": "icl_kernels.models.loading",
    "get_task": "icl_kernels.data.tasks.registry",
    "list_tasks": "icl_kernels.data.tasks.registry",
    "PromptBuilder": "icl_kernels.data.prompts",
    "PromptBatch": "icl_kernels.data.prompts",
    "IclPrompt": "icl_kernels.data.prompts",
    "make_prompts": "icl_kernels.data.prompts",
    "evaluate_icl": "icl_kernels.engine.accuracy",
    "evaluate_open": "icl_kernels.engine.accuracy",
    "answer_scores": "icl_kernels.engine.vocab_scoring",
    "gold_answer_ids": "icl_kernels.data.prompts",
    "act_name": "icl_kernels.engine.hooks",
    "hooks_on": "icl_kernels.engine.hooks",
    "ModelOptions": "icl_kernels.models.options",
    "PromptOptions": "icl_kernels.utils.config",
    "PromptCondition": "icl_kernels.data.conditions",
    "study_prompts": "icl_kernels.data.conditions",
    "analyze_heads": "icl_kernels.kernel.head_scan",
    "heads_frame": "icl_kernels.kernel.scores",
    "split_indices": "icl_kernels.utils.stats",
    "momentum_attention": "icl_kernels.finetuning.momentum_attention",
    "relaxed_attention": "icl_kernels.finetuning.relaxation",
    "capture": "icl_kernels.engine.capture",
    "label_log_probs": "icl_kernels.engine.label_scoring",
    "load_run": "icl_kernels.studies.runs",
    "Run": "icl_kernels.studies.runs",
    "view_run": "icl_kernels.studies.view",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'icl_kernels' has no attribute {name!r}")
