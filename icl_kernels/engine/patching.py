"""Activation patching head by head: one engine, thin named edits.

A causal claim about a head ("head L.H reads the demonstration labels and the model's ICL answer
depends on it") is tested by changing what the head writes and watching the prediction. Every such
change here is an *edit*: a function that receives the head outputs of one layer, ``hook_z``
``[batch pos head_index d_head]`` (the per-head attention output before ``W_O``), or the layer's
``hook_attn_out`` ``[batch pos d_model]``, and returns a replacement. Edits at ``hook_z`` change the
output on both backends (a TransformerBridge discards edits to ``hook_pattern``), and a head's
contribution to the residual stream is ``z_h @ W_O[h]``, so zeroing ``z_h`` removes exactly that
head's term (the output bias ``b_O`` is shared by the layer and stays).

The engine, `edits_on` (with `Edit`, `EditContext` and `check_edits`, importable from here too),
lives in `icl_kernels.engine.edits`: a context manager that applies a list of `Edit`s to every
forward pass inside its block, hooks removed even when a hook or the model raises. `run_with_edits`
scores `icl_kernels.data.prompts.IclPrompt`s under edits with the package's one label scorer
(`icl_kernels.engine.label_scoring.label_log_probs`): the log-probabilities of each class's label
token at every prompt's prediction position. There edits see an `EditContext` with the global index
of each batch row and its prediction position, so an edit can carry per-prompt tensors recorded in
another run. The named variants build edits:

* `zero_ablation`: chosen heads write nothing (``z_h = 0``);
* `mean_ablation`: chosen heads write their mean output over reference prompts (`head_means`),
  which removes what a head says about *this* prompt while keeping its average contribution;
* `resample_ablation`: chosen heads write what they wrote on *another* prompt of the same set
  (resample ablation): prompt i receives the output recorded on prompt ``sources[i]``, a seeded
  pairing in which no prompt is its own source (`resample_sources`). Unlike a mean, a resampled
  output is one the head actually produces, so the run stays on the head's own distribution; it
  removes what the head says about *this* prompt and substitutes what it says about another.
  Yin & Steinhardt (ICML 2025, kayoyin/icl-heads ``src/evaluate_icl_score.py``) resample-ablate
  ``hook_v`` at every position from one random-token sequence for their token-loss metric, and
  their few-shot ablation (``src/ablate.py``) uses mean ablation with zero and shuffled-mean
  options; here the values are ``z`` at the prediction position from another prompt of the
  report set (prompts differ in length, so only the prediction position is paired);
* `patch_heads`: chosen heads write what they wrote in another run of the same prompts, e.g. the
  ICL run's outputs transplanted into the zero-shot run (and back); prompts of the two runs differ
  in length, so values are taken and written at each run's own prediction position;
* `zero_attn_out`: a whole layer's attention output is removed at ``hook_attn_out``.

Two more theories enter as edits of the same kind, built in their own modules:
`icl_kernels.finetuning.relaxation.relaxed_attention_edits` replaces chosen layers by relaxed linear
attention, (W_ZSL + dW_ICL) q, and `icl_kernels.finetuning.momentum_attention.momentum_edits` adds momentum attention's
decaying sum of earlier values. Their context managers (``relaxed_attention``,
``momentum_attention``) are ``edits_on`` with those edits.

`effects_frame` turns clean and edited scores into a tidy table (one row per prompt and
condition): prediction, correctness, agreement with the clean prediction and the change in the
gold class's log-probability margin. `summarize_effects` adds accuracy with Wilson intervals.
Labels are scored by their first token (as `icl_kernels.kernel.scores.analyze_heads` does).

**Open-vocabulary tasks** (`icl_kernels.data.tasks.open_vocab.OpenVocabTask`) have no label words to
compare: `open_run_with_edits` scores each prompt's gold answer over the whole vocabulary with the
same edits (`icl_kernels.engine.vocab_scoring.answer_scores`: top-1 token at the prediction position,
correct when it is the answer's first token, as Todd et al. score), and `open_effects_frame` makes
the same table from those scores (prediction = top-1 token id, gold = the answer's first token id,
agreement = the same top-1 token as the reference run, ``margin`` = log P(first gold token)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.data.prompts import batches, pad_id
from icl_kernels.engine.capture import capture
from icl_kernels.engine.edits import SITES, Edit, EditContext, check_edits, edits_on
from icl_kernels.engine.hooks import (
    attention_scores,
    attention_spec,
    repeat_kv,
    rotary_hook_kinds,
    rotated_qk,
)
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.vocab_scoring import AnswerScores, answer_scores
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import rng as seeded
from icl_kernels.utils.stats import wilson_interval

__all__ = [
    "SITES",
    "EDIT_POSITIONS",
    "Head",
    "EditContext",
    "Edit",
    "check_edits",
    "edits_on",
    "run_with_edits",
    "record_heads",
    "head_means",
    "zero_ablation",
    "mean_ablation",
    "patch_heads",
    "resample_sources",
    "resample_ablation",
    "zero_attn_out",
    "attention_edits",
    "effects_frame",
    "open_run_with_edits",
    "open_effects_frame",
    "summarize_effects",
    "check_heads",
    "check_positions",
]

EDIT_POSITIONS = ("prediction", "all")
Head = tuple[int, int]  # (layer, head)


def check_heads(model: tl_backend.Model, heads: Iterable[Head]) -> list[Head]:
    """Validate (layer, head) pairs against the model; returns them as a sorted list of int pairs."""
    out = []
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError) as error:
            raise ValueError(f"A head is a (layer, head) pair of ints, got {item!r}.") from error
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"Head {(layer, head)} does not exist: the model has {n_layers} layers x {n_heads} heads."
            )
        out.append((layer, head))
    return sorted(set(out))


def _by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(int(layer), []).append(int(head))
    return layers


def check_positions(positions: str) -> None:
    """A clear error unless ``positions`` is one of `EDIT_POSITIONS`."""
    if positions not in EDIT_POSITIONS:
        raise ValueError(f"positions must be one of {EDIT_POSITIONS}, not {positions!r}.")


# ------------------------------------------------------------------------------------------------
# Running prompts under edits
# ------------------------------------------------------------------------------------------------


def run_with_edits(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    edits: Sequence[Edit] = (),
    *,
    batch_size: int = 4,
    pad_token_id: int | None = None,
    record: bool = False,
) -> Float[Tensor, "batch n_classes"] | tuple[Tensor, Tensor]:
    """Log-probabilities (over the whole vocabulary) of each class's first label token at each
    prompt's prediction position, with ``edits`` applied: the package's scorer,
    `icl_kernels.engine.label_scoring.label_log_probs`, with ``whole_label=False``. CPU tensor; rows
    follow ``prompts``; NaN or infinite logits raise `icl_kernels.utils.errors.NonFiniteLogitsError`.

    Several edits on the same hook are applied in the order given. With ``record=True`` the same pass
    also returns every head's output ``z`` at the prediction positions (after any edits),
    ``[prompt layer head_index d_head]``, the values `patch_heads` writes into another run:
    ``(scores, z)``.
    """
    if not prompts:
        raise ValueError("run_with_edits needs at least one prompt.")
    scored = label_log_probs(
        model, list(prompts), label_ids, edits=edits, whole_label=False, keep=("z",) if record else (),
        batch_size=batch_size, pad_token_id=pad_id(model, pad_token_id),
    )
    if record:
        scores, kept = scored
        return scores, kept["z"]
    return scored


def open_run_with_edits(
    model: tl_backend.Model,
    prompts: Sequence,
    answer_ids: Sequence[Sequence[int]],
    edits: Sequence[Edit] = (),
    *,
    batch_size: int = 4,
    pad_token_id: int | None = None,
    record: bool = False,
) -> AnswerScores | tuple[AnswerScores, Float[Tensor, "batch layer head_index d_head"]]:
    """`run_with_edits` for an open-vocabulary task: each prompt's gold continuation ``answer_ids[i]``
    scored over the whole vocabulary under ``edits`` (`icl_kernels.engine.vocab_scoring.answer_scores`;
    the edits see the same row indices and prediction positions as in `run_with_edits`). With
    ``record=True`` also every head's unedited output ``z`` at the prediction positions
    (`record_heads`; one more forward pass, edits are not applied there): ``(scores, z)``."""
    if not prompts:
        raise ValueError("open_run_with_edits needs at least one prompt.")
    pad = pad_id(model, pad_token_id)
    scores = answer_scores(model, list(prompts), answer_ids, edits=edits, batch_size=batch_size, pad_token_id=pad)
    if record:
        if edits:
            raise ValueError("record=True records the unedited head outputs; pass no edits with it.")
        return scores, record_heads(model, prompts, batch_size=batch_size, pad_token_id=pad)
    return scores


def record_heads(
    model: tl_backend.Model,
    prompts: Sequence,
    *,
    batch_size: int = 4,
    pad_token_id: int | None = None,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "batch layer head_index d_head"]:
    """Every head's output ``z`` at each prompt's prediction position (CPU; ``layers`` default all).

    These are the values `patch_heads` writes into another run and `head_means` averages.
    """
    if not prompts:
        raise ValueError("record_heads needs at least one prompt.")
    device = tl_backend.model_device(model)
    pad_token_id = pad_id(model, pad_token_id)
    parts = []
    for batch in batches(list(prompts), batch_size, pad_token_id, device):
        cap = capture(
            model, batch.tokens, batch.prediction_positions, attention=False, layers=layers,
            features=["z"], final_residual=False,
        )
        parts.append(cap.query_features["z"])
    return torch.cat(parts)


def head_means(
    model: tl_backend.Model, prompts: Sequence, *, batch_size: int = 4, pad_token_id: int | None = None
) -> Float[Tensor, "layer head_index d_head"]:
    """Mean head output at the prediction position over reference ``prompts`` (for `mean_ablation`)."""
    return record_heads(model, prompts, batch_size=batch_size, pad_token_id=pad_token_id).mean(0)


# ------------------------------------------------------------------------------------------------
# Named variants
# ------------------------------------------------------------------------------------------------


def _write(
    z: Tensor, context: EditContext, heads: list[int], values: Tensor | None, positions: str
) -> Tensor:
    """z with ``heads`` set to ``values`` (``[batch head d_head]`` or None for 0) at ``positions``."""
    z = z.clone()
    idx = torch.as_tensor(heads, device=z.device)
    if positions == "all":
        if values is None:
            z[:, :, idx] = 0
        else:
            z[:, :, idx] = values.to(z.device, z.dtype)[:, None]
        return z
    rows = torch.arange(z.shape[0], device=z.device)
    pred = context.predictions(z.device)
    current = z[rows, pred]  # [batch head d_head]
    current[:, idx] = 0 if values is None else values.to(z.device, z.dtype)
    z[rows, pred] = current
    return z


def zero_ablation(heads: Iterable[Head], positions: str = "prediction") -> list[Edit]:
    """Edits that set the chosen heads' outputs to 0 at the prediction position (or at ``"all"``)."""
    check_positions(positions)
    edits = []
    for layer, hs in _by_layer(heads).items():

        def fn(z: Tensor, context: EditContext, hs=hs) -> Tensor:
            return _write(z, context, hs, None, positions)

        edits.append(Edit(layer, fn, "z", f"zero L{layer} H{hs}", prediction_only=positions == "prediction"))
    return edits


def mean_ablation(
    heads: Iterable[Head], means: Float[Tensor, "layer head_index d_head"], positions: str = "prediction"
) -> list[Edit]:
    """Edits that replace the chosen heads' outputs by their mean over reference prompts."""
    check_positions(positions)
    edits = []
    for layer, hs in _by_layer(heads).items():
        if layer >= means.shape[0] or max(hs) >= means.shape[1]:
            raise ValueError(f"means has shape {tuple(means.shape)}; it has no entry for layer {layer} heads {hs}.")
        value = means[layer, hs]  # [head d_head]

        def fn(z: Tensor, context: EditContext, hs=hs, value=value) -> Tensor:
            return _write(z, context, hs, value[None].expand(z.shape[0], -1, -1), positions)

        edits.append(Edit(layer, fn, "z", f"mean L{layer} H{hs}", prediction_only=positions == "prediction"))
    return edits


def patch_heads(heads: Iterable[Head], source: Float[Tensor, "prompt layer head_index d_head"]) -> list[Edit]:
    """Edits that write ``source[prompt, layer, head]`` (from `record_heads` on another run of the
    same prompts, in the same order) into the chosen heads at each prompt's prediction position."""
    edits = []
    for layer, hs in _by_layer(heads).items():
        if layer >= source.shape[1] or max(hs) >= source.shape[2]:
            raise ValueError(f"source has shape {tuple(source.shape)}; it has no layer {layer} heads {hs}.")

        def fn(z: Tensor, context: EditContext, layer=layer, hs=hs) -> Tensor:
            if int(context.rows.max()) >= source.shape[0]:
                raise ValueError(
                    f"source holds {source.shape[0]} prompts but the run has more; record the source "
                    "run on the same prompts."
                )
            values = source[context.rows.cpu(), layer][:, hs]
            return _write(z, context, hs, values, "prediction")

        edits.append(Edit(layer, fn, "z", f"patch L{layer} H{hs}", prediction_only=True))
    return edits


def resample_sources(n_prompts: int, seed: int = 0) -> Int[Tensor, " prompt"]:
    """For each of ``n_prompts`` prompts, the index of the other prompt whose head outputs replace
    its own in `resample_ablation`: the next prompt along one seeded random cycle through all of
    them, so no prompt is its own source and every prompt is the source of exactly one.

    >>> sources = resample_sources(5, seed=0)
    >>> sorted(sources.tolist()) == list(range(5)) and all(int(s) != i for i, s in enumerate(sources))
    True
    """
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 2:
        raise ValueError(f"Resample ablation needs at least 2 prompts (a prompt is never its own source), "
                         f"got {n_prompts!r}; use more report prompts or mean / zero ablation.")
    order = seeded("resample_sources", seed).permutation(n_prompts)
    sources = np.empty(n_prompts, dtype=np.int64)
    sources[order] = np.roll(order, -1)
    return torch.from_numpy(sources)


def resample_ablation(
    heads: Iterable[Head],
    source: Float[Tensor, "prompt layer head_index d_head"],
    sources: Int[Tensor, " prompt"],
) -> list[Edit]:
    """Edits that write into prompt i's chosen heads, at its prediction position, their output on
    prompt ``sources[i]`` (``source`` is every head's output on the same prompts, in the same order,
    from `record_heads` or ``run_with_edits(..., record=True)``; ``sources`` from `resample_sources`).

    With ``sources[i] == i`` (a prompt as its own source) this is `patch_heads` with the run's own
    outputs and changes nothing; the study always pairs a prompt with another.
    """
    sources = torch.as_tensor(sources, dtype=torch.long).cpu()
    if sources.ndim != 1 or len(sources) != source.shape[0]:
        raise ValueError(f"sources has shape {tuple(sources.shape)} but source holds {source.shape[0]} prompts; "
                         "pass one source index per prompt (resample_sources(n_prompts, seed)).")
    if len(sources) and (int(sources.min()) < 0 or int(sources.max()) >= source.shape[0]):
        raise ValueError(f"sources must index the {source.shape[0]} recorded prompts, got values "
                         f"{int(sources.min())}..{int(sources.max())}.")
    edits = patch_heads(heads, source[sources])
    return [dataclasses.replace(e, label=e.label.replace("patch", "resample", 1)) for e in edits]


def zero_attn_out(layers: Iterable[int], positions: str = "all") -> list[Edit]:
    """Edits that remove whole layers' attention outputs (``hook_attn_out`` set to 0)."""
    check_positions(positions)
    edits = []
    for layer in sorted({int(x) for x in layers}):

        def fn(out: Tensor, context: EditContext) -> Tensor:
            out = out.clone()
            if positions == "all":
                out.zero_()
            else:
                out[torch.arange(out.shape[0], device=out.device), context.predictions(out.device)] = 0
            return out

        edits.append(Edit(layer, fn, "attn_out", f"zero attn_out L{layer}"))
    return edits


def attention_edits(
    model: tl_backend.Model,
    layers: Iterable[int],
    *,
    blocked: Sequence[Bool[Tensor, "_query_pos _key_pos"] | None] | None = None,
    multipliers: Mapping[int, Tensor] | None = None,
) -> list[Edit]:
    """Edits that recompute chosen layers' attention at ``hook_z`` from the same pass's q, k, v,
    with some query -> key links cut, and/or the pattern multiplied elementwise by a tensor.

    The attention-mask edit of the engine (a TransformerBridge discards ``hook_pattern`` edits, so
    the pattern is rebuilt: scores = q.k / scale with the layer's causal / local mask
    (`icl_kernels.engine.hooks.attention_scores`), ``-inf`` where ``blocked`` is True, softmax, and
    ``z = pattern @ v``). ``blocked[i]`` is a ``[len_i, len_i]`` mask for prompt ``i`` of the run
    (`EditContext.rows`; None: nothing blocked); a row with every key blocked keeps its own
    position. ``multipliers[layer]`` (``[batch head_index query_pos key_pos]``, e.g. ones with
    ``requires_grad`` for attention x gradient saliency) multiplies the post-softmax pattern.
    With nothing blocked and no multiplier the edit reproduces the model's ``z`` (to float error).
    """
    q_kind, k_kind = rotary_hook_kinds(model)
    edits = []
    for layer in sorted({int(x) for x in layers}):
        spec = attention_spec(model, layer)

        def fn(z: Tensor, context: EditContext, layer=layer, spec=spec) -> Tensor:
            q, k = rotated_qk(model, layer, context.activations[q_kind], context.activations[k_kind])
            v = repeat_kv(context.activations["v"], spec.group_size)
            compute = torch.float64 if q.dtype == torch.float64 else torch.float32
            scores = attention_scores(q.to(compute), k.to(compute), spec)  # [batch head q k]
            if blocked is not None:
                width = scores.shape[-1]
                cut = torch.zeros(scores.shape[0], width, width, dtype=torch.bool, device=scores.device)
                rows = context.rows.tolist() if context.rows is not None else range(scores.shape[0])
                for b, row in enumerate(rows):
                    mask = blocked[row] if row < len(blocked) else None
                    if mask is not None:
                        n = min(mask.shape[0], width)
                        cut[b, :n, :n] = mask[:n, :n].to(scores.device)
                cut &= ~torch.eye(width, dtype=torch.bool, device=scores.device)[None]
                scores = scores.masked_fill(cut[:, None], float("-inf"))
            pattern = scores.softmax(-1)
            if multipliers is not None and layer in multipliers:
                pattern = pattern * multipliers[layer].to(pattern.device, pattern.dtype)
            out = torch.einsum("bhqk,bkhd->bqhd", pattern, v.to(compute))
            return out.to(z.dtype)

        edits.append(Edit(layer, fn, "z", f"attention L{layer}", reads=(q_kind, k_kind, "v")))
    return edits


# ------------------------------------------------------------------------------------------------
# Tidy tables
# ------------------------------------------------------------------------------------------------


def _margin(scores: Tensor, gold: Tensor) -> Tensor:
    """log p(gold) - max over other classes of log p(c)."""
    other = scores.clone()
    other[torch.arange(len(gold)), gold] = -torch.inf
    return scores[torch.arange(len(gold)), gold] - other.max(-1).values


def effects_frame(
    clean: Float[Tensor, "batch n_classes"],
    edited: Mapping[str, Float[Tensor, "batch n_classes"]],
    gold: Int[Tensor, " batch"],
    prompt_ids: Sequence | None = None,
    reference: Int[Tensor, " batch"] | None = None,
) -> pd.DataFrame:
    """One row per (condition, prompt): prediction, correct, agrees with the reference prediction
    (default: the clean run's), and the gold-class margin and its change from the clean run. The
    clean run itself is condition ``"clean"``. Pass the ICL run's predictions as ``reference`` when
    the edited run is the zero-shot one, so agreement measures how ICL-like the patched run is."""
    gold = torch.as_tensor(gold, dtype=torch.long)
    if clean.shape[0] != len(gold):
        raise ValueError(f"clean has {clean.shape[0]} rows but gold {len(gold)}.")
    ids = list(range(len(gold))) if prompt_ids is None else list(prompt_ids)
    clean_pred = clean.argmax(-1) if reference is None else torch.as_tensor(reference, dtype=torch.long)
    if len(clean_pred) != len(gold):
        raise ValueError(f"reference has {len(clean_pred)} rows but gold {len(gold)}.")
    clean_margin = _margin(clean, gold)
    frames = []
    for name, scores in {"clean": clean, **dict(edited)}.items():
        if scores.shape != clean.shape:
            raise ValueError(f"Condition {name!r} has scores of shape {tuple(scores.shape)}, clean {tuple(clean.shape)}.")
        pred = scores.argmax(-1)
        margin = _margin(scores, gold)
        frames.append(pd.DataFrame(dict(
            condition=name, prompt=ids, gold=gold.numpy(), pred=pred.numpy(),
            correct=(pred == gold).numpy(), agrees_clean=(pred == clean_pred).numpy(),
            margin=margin.numpy(), margin_change=(margin - clean_margin).numpy(),
        )))
    return pd.concat(frames, ignore_index=True)


def open_effects_frame(
    clean: AnswerScores,
    edited: Mapping[str, AnswerScores],
    gold_first: Int[Tensor, " batch"],
    prompt_ids: Sequence | None = None,
    reference: Int[Tensor, " batch"] | None = None,
) -> pd.DataFrame:
    """`effects_frame` for open-vocabulary scores (`open_run_with_edits`): one row per (condition,
    prompt) with ``pred`` the top-1 token id, ``gold`` the gold answer's first token id ``gold_first``,
    ``correct`` (top-1 is that token: `AnswerScores.first_token_correct`), ``agrees_clean`` (the same
    top-1 token as ``reference``, default the clean run's), ``margin`` = log P(first gold token) and its
    change from the clean run. The clean run is condition ``"clean"``."""
    gold = torch.as_tensor(gold_first, dtype=torch.long)
    if len(clean) != len(gold):
        raise ValueError(f"clean has {len(clean)} rows but gold {len(gold)}.")
    ids = list(range(len(gold))) if prompt_ids is None else list(prompt_ids)
    clean_pred = clean.top1 if reference is None else torch.as_tensor(reference, dtype=torch.long)
    if len(clean_pred) != len(gold):
        raise ValueError(f"reference has {len(clean_pred)} rows but gold {len(gold)}.")
    frames = []
    for name, scores in {"clean": clean, **dict(edited)}.items():
        if len(scores) != len(gold):
            raise ValueError(f"Condition {name!r} has {len(scores)} rows, clean {len(gold)}.")
        if not torch.equal(scores.top1 == gold, scores.first_token_correct):
            raise ValueError(f"Condition {name!r} was scored against other gold answers than gold_first.")
        margin = scores.first_log_prob.double()
        frames.append(pd.DataFrame(dict(
            condition=name, prompt=ids, gold=gold.numpy(), pred=scores.top1.numpy(),
            correct=scores.first_token_correct.numpy(), agrees_clean=(scores.top1 == clean_pred).numpy(),
            margin=margin.numpy(), margin_change=(margin - clean.first_log_prob.double()).numpy(),
        )))
    return pd.concat(frames, ignore_index=True)


def summarize_effects(frame: pd.DataFrame, by: Sequence[str] = ("condition",)) -> pd.DataFrame:
    """Accuracy and agreement with the clean run per group, with Wilson 95% intervals."""
    records = []
    for key, g in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n = len(g)
        correct, agree = int(g["correct"].sum()), int(g["agrees_clean"].sum())
        acc_lo, acc_hi = wilson_interval(correct, n)
        ag_lo, ag_hi = wilson_interval(agree, n)
        records.append(dict(
            **dict(zip(by, key)), n=n, accuracy=correct / n, accuracy_low=acc_lo, accuracy_high=acc_hi,
            agreement=agree / n, agreement_low=ag_lo, agreement_high=ag_hi,
            mean_margin_change=float(np.mean(g["margin_change"])),
        ))
    return pd.DataFrame.from_records(records)
