"""The copy control of open-vocabulary steering results: what echoing the query's input would score.

Todd et al. and Hendel et al. score an open task by whether the model's top-1 next token is the
gold answer's first token. When an answer begins with the input's own first token (lemminflect's
``abandon`` -> ``abandoned`` on tokenizers that split the past form as ``' abandon' 'ed'``), a
vector that only makes the model repeat the input is scored right. The share of such prompts is the
accuracy of that copy baseline (`icl_kernels.data.prompts.input_copy_matches` finds them), and the
accuracy on the remaining prompts is what copying cannot explain. Letter tasks never share a first
token with their input; present-past and singular-plural do on a third to a half of the pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from icl_kernels.utils.stats import mean_difference, paired_bootstrap, proportion

__all__ = ["copy_control"]


def copy_control(prefix: str, copies: np.ndarray, vector: np.ndarray, baseline: tuple[str, np.ndarray],
                 zero: np.ndarray, args: dict) -> dict[str, Any]:
    """The copy baseline beside a steering vector: the share of evaluated prompts that echoing the
    input answers (``{prefix}_copy_share``, Wilson), and on the other prompts the vector's and the
    zero-shot accuracy and the vector minus ``baseline`` (``(name, per-prompt accuracy)``: random
    vectors for a function vector, zero-shot for a task vector; ``{prefix}_minus_{name}_no_copy``,
    paired bootstrap with ``args``). Only the share and count where fewer than 2 prompts are left."""
    copies = np.asarray(copies, dtype=bool)
    out: dict[str, Any] = {f"{prefix}_copy_share": proportion(copies)}
    rest = ~copies
    out[f"{prefix}_n_no_copy"] = int(rest.sum())
    if rest.sum() >= 2:
        out[f"{prefix}_accuracy_no_copy"] = proportion(vector[rest].astype(bool))
        out[f"{prefix}_zero_shot_accuracy_no_copy"] = proportion(zero[rest].astype(bool))
        name, values = baseline
        out[f"{prefix}_minus_{name}_no_copy"] = paired_bootstrap(mean_difference, [vector[rest], values[rest]], **args)
    return out
