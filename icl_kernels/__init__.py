"""icl-kernels: head-by-head tests of in-context learning as kernel regression and as implicit finetuning.

The common entry points are importable from the package; submodules are imported on first use so
that ``import icl_kernels`` stays cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "icl_kernels.models",
    "list_models": "icl_kernels.models",
    "get_task": "icl_kernels.tasks",
    "list_tasks": "icl_kernels.tasks",
    "PromptBuilder": "icl_kernels.prompts",
    "PromptBatch": "icl_kernels.prompts",
    "IclPrompt": "icl_kernels.prompts",
    "make_prompts": "icl_kernels.prompts",
    "evaluate_icl": "icl_kernels.evaluate",
    "act_name": "icl_kernels.hooks",
    "hooks_on": "icl_kernels.hooks",
    "ModelOptions": "icl_kernels.config",
    "PromptOptions": "icl_kernels.config",
    "PromptCondition": "icl_kernels.prompt_sets",
    "study_prompts": "icl_kernels.prompt_sets",
    "analyze_heads": "icl_kernels.head_scan",
    "heads_frame": "icl_kernels.kernel",
    "split_indices": "icl_kernels.stats",
    "momentum_attention": "icl_kernels.momentum",
    "relaxed_attention": "icl_kernels.relaxation",
    "capture": "icl_kernels.capture",
    "label_log_probs": "icl_kernels.capture",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'icl_kernels' has no attribute {name!r}")
