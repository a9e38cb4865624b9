"""Many edit conditions on the same prompts, each prompt's context run once.

An ablation or patching study scores the same prompts under dozens of conditions: the top heads
and 20 random head sets, each mean-, zero- and resample-ablated, patched into the zero-shot run and
back. Every one of those edits changes a head's output at the prediction position only
(`icl_kernels.engine.edits.Edit.prediction_only`), and attention is causal, so every earlier
position's keys and values are those of the unedited prompt in every condition. `score_conditions`
therefore runs each prompt's first ``T - 1`` tokens once (`icl_kernels.engine.prefix_cache.encode_prefix`)
and then its last token (and, for a continuation, the answer tokens after it) against those keys and
values in one batch with one condition per row (`row_edits` applies each row's edits to that row only): the same scores as scoring every condition in full
(`icl_kernels.engine.patching.run_with_edits`, `icl_kernels.engine.patching.open_run_with_edits`),
equal to float64 rounding (tested at 1e-10 on every tiny architecture and both backends), at a cost
of one prompt pass plus one token per condition instead of one prompt pass per condition.

Where the reuse cannot be exact it is not attempted and every condition runs in full: an edit that is
not prediction-only (e.g. an ablation at every position) or that reads q, k, v, a model whose
positions `icl_kernels.engine.prefix_cache.reuse_reason` rejects, or ``reuse_prefix=False``.
`reuse_plan` says which applies and why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import pad_id
from icl_kernels.engine.edits import Edit, EditContext, check_edits
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.prefix_cache import encode_prefix, reuse_reason
from icl_kernels.engine.vocab_scoring import AnswerScores, answer_scores
from icl_kernels.models import backend as tl_backend

__all__ = ["reuse_plan", "score_conditions", "row_edits", "concat_answer_scores"]


def reuse_plan(model: tl_backend.Model, prompts: Sequence, conditions: Sequence[Sequence[Edit]]) -> str | None:
    """Why the conditions cannot reuse each prompt's context (``None`` when they can)."""
    not_local = sorted({e.label or str(e.fn) for edits in conditions for e in edits if not e.prediction_only})
    if not_local:
        return f"edits {not_local[:3]} change more than the prediction position"
    readers = sorted({e.label or str(e.fn) for edits in conditions for e in edits if e.reads})
    if readers:
        return f"edits {readers[:3]} read q, k, v"
    return reuse_reason(model, min(len(p.tokens) if hasattr(p, "tokens") else len(p) for p in prompts) - 1)


def score_conditions(
    model: tl_backend.Model,
    prompts: Sequence,
    conditions: Sequence[Sequence[Edit]],
    *,
    label_ids: Sequence[Sequence[int]] | None = None,
    answer_ids: Sequence[Sequence[int]] | None = None,
    batch_size: int = 4,
    pad_token_id: int | None = None,
    reuse_prefix: bool = True,
    condition_batch: int = 32,
    greedy: bool = False,
    progress: bool = False,
    desc: str = "conditions",
) -> list[Tensor] | list[AnswerScores]:
    """Score ``prompts`` under each condition (a list of edits) as `run_with_edits` would (with
    ``label_ids``: first-token label log-probs ``[prompt n_classes]``) or `open_run_with_edits` (with
    ``answer_ids``: `AnswerScores` of each prompt's gold continuation; ``greedy`` adds exact match).
    Returns one result per
    condition, in order; the edits see each prompt's index in ``prompts`` as its row.

    With ``reuse_prefix`` and every edit prediction-only (`reuse_plan`), each prompt's context runs
    once and its last token runs under ``condition_batch`` conditions at a time, one condition per
    batch row (`row_edits`); otherwise each condition runs in full, ``batch_size`` prompts at a time.

    Raises:
        ValueError: neither or both of ``label_ids`` and ``answer_ids``, no prompts, or an answer
            count different from the prompts'.
    """
    if (label_ids is None) == (answer_ids is None):
        raise ValueError("score_conditions scores labels (label_ids=) or open answers (answer_ids=); give exactly one.")
    if not prompts:
        raise ValueError("score_conditions needs at least one prompt.")
    if answer_ids is not None and len(answer_ids) != len(prompts):
        raise ValueError(f"answer_ids gives {len(answer_ids)} answers for {len(prompts)} prompts; give one per prompt.")
    conditions = [check_edits(model, edits) for edits in conditions]
    pad = pad_id(model, pad_token_id)
    prompts = list(prompts)

    def score(subset: list, edits: list[Edit], rows: list[int], prefix=None, size: int = batch_size):
        if label_ids is not None:
            return label_log_probs(model, subset, label_ids, edits=edits, whole_label=False, batch_size=size,
                                   pad_token_id=pad, prefix=prefix, row_ids=rows, first_index=rows[0])
        return answer_scores(model, subset, [answer_ids[i] for i in rows], edits=edits, batch_size=size,
                             pad_token_id=pad, prefix=prefix, row_ids=rows, first_index=rows[0], greedy=greedy)

    everyone = list(range(len(prompts)))
    if not reuse_prefix or reuse_plan(model, prompts, conditions) is not None:
        return [score(prompts, edits, everyone) for edits in tqdm(conditions, desc=desc, unit="condition",
                                                                  disable=not progress)]
    width = max(1, condition_batch)
    per_condition: list[list] = [[] for _ in conditions]
    for i in tqdm(everyone, desc=f"{desc} (context once per prompt)", unit="prompt", disable=not progress):
        tokens = prompts[i].tokens if hasattr(prompts[i], "tokens") else prompts[i]
        prefix = encode_prefix(model, list(tokens)[:-1])
        for begin in range(0, len(conditions), width):
            chunk = conditions[begin : begin + width]
            rows = score([prompts[i]] * len(chunk), row_edits(chunk), [i] * len(chunk), prefix, len(chunk))
            for r in range(len(chunk)):
                per_condition[begin + r].append(_row(rows, r))
    if label_ids is not None:
        return [torch.cat(parts) for parts in per_condition]
    return [concat_answer_scores(parts) for parts in per_condition]


def row_edits(conditions: Sequence[Sequence[Edit]]) -> list[Edit]:
    """One list of edits that applies ``conditions[r]`` to batch row ``r`` only: per hook, each row's
    edits run in their order on that row's slice, with that row's context (index, prediction
    position, length). For prediction-only edits without reads (`reuse_plan`)."""
    by_hook: dict[tuple[str, int], list[tuple[int, list[Edit]]]] = {}
    for r, edits in enumerate(conditions):
        mine: dict[tuple[str, int], list[Edit]] = {}
        for edit in edits:
            mine.setdefault((edit.site, edit.layer), []).append(edit)
        for key, group in mine.items():
            by_hook.setdefault(key, []).append((r, group))
    merged = []
    for (site, layer), members in by_hook.items():

        def fn(x: Tensor, context: EditContext, members=members) -> Tensor:
            out = x.clone()
            for r, group in members:
                sub = EditContext(context.layer, *(None if t is None else t[r : r + 1] for t in
                                                   (context.rows, context.prediction_positions, context.lengths)))
                piece = x[r : r + 1]
                for edit in group:
                    piece = edit.fn(piece, sub)
                out[r : r + 1] = piece
            return out

        merged.append(Edit(layer, fn, site, f"{len(members)} rows' edits at {site} L{layer}", prediction_only=True))
    return merged


def _row(scores, r: int):
    if isinstance(scores, AnswerScores):
        return AnswerScores(**{name: None if getattr(scores, name) is None else getattr(scores, name)[r : r + 1]
                               for name in AnswerScores.__dataclass_fields__})
    return scores[r : r + 1]


def concat_answer_scores(parts: Sequence[AnswerScores]) -> AnswerScores:
    """`AnswerScores` of consecutive prompt slices as one (fields concatenated in order)."""
    if not parts:
        raise ValueError("concat_answer_scores needs at least one part.")

    def cat(name: str):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return AnswerScores(**{name: cat(name) for name in AnswerScores.__dataclass_fields__})
