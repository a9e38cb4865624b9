"""The registry of head scores: one number per (layer, head) that ranks heads into a family.

The ``families`` study scores every head with every registered score (in registration order),
ranks each family's top-k heads on the selection prompts, and compares the families: overlap,
mean ablation, and so on. A new family is one call::

    from icl_kernels.studies.head_scores import register_head_score

    def last_layer(inputs):  # HeadScoreInputs -> [layer, head_index]
        n_layers, n_heads = inputs.model.cfg.n_layers, inputs.model.cfg.n_heads
        return torch.zeros(n_layers, n_heads).index_fill_(0, torch.tensor([n_layers - 1]), 1.0)

    register_head_score("last_layer", last_layer, description="1 in the last layer, else 0")

The five built-in scores, registered on import in this order:

* ``label_attention``: agreement of the head's attention-weighted vote over the demonstration
  labels (a_i read at the label tokens) with the model's ICL prediction
  (`icl_kernels.kernel.head_scan.analyze_heads`);
* ``induction``, ``previous_token``, ``duplicate_token``: attention patterns on repeated random
  token sequences (`icl_kernels.families.induction`), TransformerLens ``head_detector``'s default
  (first token counted) unless the config's ``induction_exclude_bos``; a head with less than the
  config's ``min_attention_off_first_token`` (default 0.05) of its attention off the first token is
  not ranked in these three families (`HeadScore.ranked`);
* ``function_vector``: average indirect effect of the head's mean output on prompts whose labels are
  permuted among the demonstrations, as Todd et al. (`icl_kernels.families.function_vectors`): on the
  function-vector prompts (``fv_shots`` demonstrations, ``fv_prompts`` queries, their selection
  split), means and CIE over the clean prompts the model answers correctly
  (`HeadScoreInputs.function_vector_run`).

A score may also say which heads it ranks (``ranked``: inputs -> a [layer, head_index] bool mask);
the others keep their score in the ``heads`` table but never enter the family's top-k.

Registering a name twice raises `DuplicateHeadScoreError`, so a plugin cannot silently replace a
score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from icl_kernels.data.conditions import SYNTHETIC_TASKS, study_prompts
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.patching import head_means
from icl_kernels.families.function_vectors import FunctionVectorHeads, function_vector_heads
from icl_kernels.families.induction import (
    MIN_ATTENTION_OFF_FIRST_TOKEN,
    head_pattern_scores,
    ranked_heads,
    repeated_random_tokens,
)
from icl_kernels.kernel.head_scan import analyze_heads
from icl_kernels.utils.config import PromptOptions
from icl_kernels.utils.errors import IclKernelsError
from icl_kernels.utils.stats import split_indices

__all__ = [
    "DuplicateHeadScoreError", "FunctionVectorRun", "HeadScore", "HeadScoreInputs", "fv_scoring", "head_scores",
    "register_head_score",
]


class DuplicateHeadScoreError(IclKernelsError, ValueError):
    """A head score name is registered twice."""


def fv_scoring(scoring: str, task: str | None) -> str:
    """``"auto"``: top-1 over the vocabulary (``"vocab"``) for an open-vocabulary task, else the
    label words (``"label-words"``); another value is returned as it is."""
    if scoring != "auto":
        return scoring
    if task is None or task in SYNTHETIC_TASKS:
        return "label-words"
    return "vocab" if getattr(get_task(task), "kind", "classification") == "open" else "label-words"


@dataclass
class FunctionVectorRun:
    """The function-vector prompts (Todd et al.: 10-shot by default) and the head ranking on them.

    Attributes:
        prompts: `icl_kernels.data.conditions.StudyPrompts` with ``fv_shots`` demonstrations.
        select, report: indices of the selection split (heads ranked, layer chosen) and report split.
        heads: `icl_kernels.families.function_vectors.FunctionVectorHeads` on the selection ICL prompts.
    """

    prompts: Any
    select: np.ndarray
    report: np.ndarray
    heads: FunctionVectorHeads


@dataclass
class HeadScoreInputs:
    """What a head score may use: the model, the study's options and prompts, and the selection split.

    Heads are ranked on the selection prompts only; the report prompts are kept for the causal
    tests. Work that several scores share (the repeated-token attention patterns, the heads' mean
    outputs) is computed on first use and kept.

    Attributes:
        model: the model (TransformerLens, hooked or bridge).
        config: the study's options (``prompts``, ``batch_size``, ``induction_sequences``, ``joining_rows``,
            ``fv_one_pass``, ``induction_length``; `icl_kernels.studies.families.FamiliesConfig`).
        prompts: the study's `icl_kernels.data.conditions.StudyPrompts` (ICL and zero-shot).
        select: indices of the selection prompts.
        progress: whether long loops show progress bars.
    """

    model: Any
    config: Any
    prompts: Any
    select: np.ndarray
    progress: bool = False

    @property
    def seed(self) -> int:
        return self.config.prompts.seed

    @property
    def label_ids(self) -> list[list[int]]:
        return self.prompts.label_ids

    @cached_property
    def selection(self) -> list:
        """The selection split's ICL prompts."""
        return [self.prompts.icl[i] for i in self.select]

    @cached_property
    def repeated_token_patterns(self):
        """Induction, previous-token and duplicate-token scores per head on repeated random token
        sequences (`icl_kernels.families.induction.head_pattern_scores`, one row per head)."""
        cfg, model = self.config, self.model
        d_vocab = model.cfg.d_vocab
        low, high = (1, d_vocab) if d_vocab < 2000 else (1000, min(d_vocab, 30000))
        first = self.prompts.icl[0]
        bos = first.tokens[0] if first.bos_position == 0 else None
        tokens = repeated_random_tokens(cfg.induction_sequences, min(cfg.induction_length, high - low), low, high,
                                        bos, self.seed)
        return head_pattern_scores(model, tokens, batch_size=cfg.batch_size,
                                   exclude_bos=bool(getattr(cfg, "induction_exclude_bos", False)))

    @property
    def first_token_share(self) -> Float[Tensor, "layer head_index"]:
        """Each head's mean attention on the first token of the repeated random-token sequences."""
        shape = (self.model.cfg.n_layers, self.model.cfg.n_heads)
        return torch.tensor(self.repeated_token_patterns["first_token_share"].to_numpy()).view(*shape)

    @cached_property
    def selection_head_means(self):
        """Each head's mean output at the prediction position over the selection prompts
        (`icl_kernels.engine.patching.head_means`): the function vectors are built from them."""
        return head_means(self.model, self.selection, batch_size=self.config.batch_size)

    @cached_property
    def function_vector_run(self) -> FunctionVectorRun:
        """Todd et al.'s extraction on the function-vector prompts (``config.fv_shots`` shots,
        ``config.fv_prompts`` queries, split like the study's prompts): the correctly answered
        selection prompts, their mean head outputs and writes, and each head's CIE."""
        cfg = self.config
        options = PromptOptions(task=cfg.prompts.task, shots=cfg.fv_shots, n_test=cfg.fv_prompts, seed=self.seed)
        prompts = study_prompts(self.model, options, model_name=cfg.model.model)
        select, report = split_indices(len(prompts.icl), cfg.select_fraction, self.seed)
        heads = function_vector_heads(
            self.model, [prompts.icl[i] for i in select], prompts.label_ids,
            scoring=fv_scoring(cfg.fv_scoring, cfg.prompts.task), seed=self.seed, batch_size=cfg.batch_size,
            join_rows=cfg.joining_rows, one_pass=cfg.fv_one_pass, progress=self.progress)
        return FunctionVectorRun(prompts, select, report, heads)


#: A head score: inputs -> one score per (layer, head); higher ranks a head higher in the family.
HeadScoreFn = Callable[[HeadScoreInputs], Float[Tensor, "layer head_index"]]
#: Which heads a score ranks: inputs -> True where a head may enter the family's top-k.
RankedFn = Callable[[HeadScoreInputs], Bool[Tensor, "layer head_index"]]


@dataclass(frozen=True)
class HeadScore:
    """One registered head score.

    Attributes:
        name: the family's name (a column of the ``heads`` table).
        fn: ``fn(inputs: HeadScoreInputs) -> [layer, head_index]`` scores.
        description: one line on what it measures.
        ranked: ``ranked(inputs)`` -> True where a head may be ranked (None: every head).
    """

    name: str
    fn: HeadScoreFn
    description: str = ""
    ranked: RankedFn | None = None


_HEAD_SCORES: dict[str, HeadScore] = {}


def register_head_score(name: str, fn: HeadScoreFn, *, description: str = "", ranked: RankedFn | None = None) -> HeadScore:
    """Add a head score; raises `DuplicateHeadScoreError` if the name is taken."""
    if name in _HEAD_SCORES:
        taken = _HEAD_SCORES[name].fn
        raise DuplicateHeadScoreError(
            f"A head score named {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
            "choose another name.")
    if not callable(fn):
        raise TypeError(f"Head score {name!r}: fn must be callable (inputs -> [layer, head] scores), not {fn!r}.")
    if ranked is not None and not callable(ranked):
        raise TypeError(f"Head score {name!r}: ranked must be callable (inputs -> [layer, head] bool mask), not {ranked!r}.")
    score = HeadScore(name, fn, description, ranked)
    _HEAD_SCORES[name] = score
    return score


def head_scores() -> list[HeadScore]:
    """Every registered head score, in registration order."""
    return list(_HEAD_SCORES.values())


# ------------------------------------------------------------------------------------------------
# The built-in scores
# ------------------------------------------------------------------------------------------------


def label_attention(inputs: HeadScoreInputs) -> Float[Tensor, "layer head_index"]:
    """Agreement of the head's label-token attention vote with the model's ICL prediction (an open
    task's: its top-1 token over the vocabulary read as an answer, `analyze_heads` ``prediction="vocabulary"``;
    single-token answers only)."""
    task = getattr(inputs.prompts.builder, "task", None)
    prediction = "vocabulary" if getattr(task, "kind", "classification") == "open" else "labels"
    run = analyze_heads(inputs.model, inputs.selection, inputs.label_ids, aggregations=("label",),
                        attention_map_length=None, progress=inputs.progress, batch_size=inputs.config.batch_size,
                        prediction=prediction)
    return run.scores().agreement["label"].float()


def _pattern_score(kind: str) -> HeadScoreFn:
    def score(inputs: HeadScoreInputs) -> Float[Tensor, "layer head_index"]:
        shape = (inputs.model.cfg.n_layers, inputs.model.cfg.n_heads)
        return torch.tensor(inputs.repeated_token_patterns[kind].to_numpy()).view(*shape)

    score.__name__ = score.__qualname__ = f"{kind}_score"
    score.__doc__ = f"The {kind.replace('_', '-')} attention score on repeated random tokens."
    return score


def attends_off_first_token(inputs: HeadScoreInputs) -> Bool[Tensor, "layer head_index"]:
    """Heads with at least ``min_attention_off_first_token`` of their attention off the first token
    (`icl_kernels.families.induction.ranked_heads`)."""
    threshold = getattr(inputs.config, "min_attention_off_first_token", MIN_ATTENTION_OFF_FIRST_TOKEN)
    return ranked_heads(inputs.first_token_share, threshold)


def function_vector(inputs: HeadScoreInputs) -> Float[Tensor, "layer head_index"]:
    """Average indirect effect of the head's mean output on label-permuted prompts (Todd et al.)."""
    return inputs.function_vector_run.heads.aie.float()


register_head_score("label_attention", label_attention, description=label_attention.__doc__)
for _kind in ("induction", "previous_token", "duplicate_token"):
    _fn = _pattern_score(_kind)
    register_head_score(_kind, _fn, description=_fn.__doc__, ranked=attends_off_first_token)
register_head_score("function_vector", function_vector, description=function_vector.__doc__)
