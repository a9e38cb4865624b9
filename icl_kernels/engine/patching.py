"""Activation patching head by head: one engine, thin named edits.

A causal claim about a head ("head L.H reads the demonstration labels and the model's ICL answer
depends on it") is tested by changing what the head writes and watching the prediction. Every such
change here is an *edit*: a function that receives the head outputs of one layer, ``hook_z``
``[batch pos head_index d_head]`` (the per-head attention output before ``W_O``), or the layer's
``hook_attn_out`` ``[batch pos d_model]``, and returns a replacement. Edits at ``hook_z`` change the
output on both backends (a TransformerBridge discards edits to ``hook_pattern``), and a head's
contribution to the residual stream is ``z_h @ W_O[h]``, so zeroing ``z_h`` removes exactly that
head's term (the output bias ``b_O`` is shared by the layer and stays).

`edits_on` is the engine: a context manager that applies a list of `Edit`s to every forward pass
inside its block (hooks live inside `icl_kernels.engine.hooks.hooks_on`, so they are removed even when a
hook or the model raises). Edits declare the same-layer activations they need (`Edit.reads`: q, k,
v of the same forward pass), which the engine keeps for them. `run_with_edits` runs a model over
`icl_kernels.data.prompts.IclPrompt`s under `edits_on` and returns the log-probabilities of each
class's label token at every prompt's prediction position; there edits see an `EditContext` with
the global index of each batch row and its prediction position, so an edit can carry per-prompt
tensors recorded in another run. The named variants build edits:

* `zero_ablation`: chosen heads write nothing (``z_h = 0``);
* `mean_ablation`: chosen heads write their mean output over reference prompts (`head_means`),
  which removes what a head says about *this* prompt while keeping its average contribution;
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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.engine.capture import capture, unembed
from icl_kernels.engine.hooks import (
    act_name,
    attention_scores,
    attention_spec,
    hooks_on,
    repeat_kv,
    rotary_hook_kinds,
    rotated_qk,
    run_until,
)
from icl_kernels.models import backend as tl_backend
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
    "zero_attn_out",
    "attention_edits",
    "effects_frame",
    "summarize_effects",
    "check_heads",
    "check_positions",
]

SITES = ("z", "attn_out")
_READABLE = ("q", "k", "v", "rot_q", "rot_k")
EDIT_POSITIONS = ("prediction", "all")
Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class EditContext:
    """What an edit knows about the batch it is editing.

    Attributes:
        layer: the layer whose hook fired.
        rows: index of each batch row in the full list of prompts given to `run_with_edits`.
        prediction_positions: each row's prediction position in this batch.
        lengths: each row's real (unpadded) length.
        activations: the activations of this layer that the edit asked for (`Edit.reads`), from the
            same forward pass, keyed by kind (e.g. ``"v"``, ``"rot_q"``).

    ``rows``, ``prediction_positions`` and ``lengths`` are None under a bare `edits_on` (any
    forward pass, no prompts); `predictions` fails clearly there.
    """

    layer: int
    rows: Int[Tensor, " batch"] | None = None
    prediction_positions: Int[Tensor, " batch"] | None = None
    lengths: Int[Tensor, " batch"] | None = None
    activations: Mapping[str, Tensor] = field(default_factory=dict)

    def predictions(self, device: torch.device | str | None = None) -> Int[Tensor, " batch"]:
        """The prediction positions (on ``device``); an error outside `run_with_edits`."""
        if self.prediction_positions is None:
            raise ValueError(
                f"An edit at layer {self.layer} acts at the prediction positions, which only run_with_edits "
                "knows; use positions='all' under edits_on, or run the prompts with run_with_edits."
            )
        return self.prediction_positions.to(device) if device is not None else self.prediction_positions


EditFn = Callable[[Tensor, EditContext], Tensor]


@dataclass(frozen=True)
class Edit:
    """One intervention: ``fn(activation, context) -> replacement`` at ``site`` of ``layer``.

    ``site`` is ``"z"`` (``[batch pos head_index d_head]``) or ``"attn_out"``
    (``[batch pos d_model]``). ``fn`` must return a tensor of the same shape; it may edit a clone.
    ``reads`` names activations of the same layer (``"q"``, ``"k"``, ``"v"``, ``"rot_q"``,
    ``"rot_k"``) that ``fn`` needs from the same forward pass; they arrive in
    ``context.activations``.
    """

    layer: int
    fn: EditFn
    site: str = "z"
    label: str = ""
    reads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"Edit site must be one of {SITES}, not {self.site!r}.")
        bad = [kind for kind in self.reads if kind not in _READABLE]
        if bad:
            raise ValueError(f"Edit reads {bad}; an edit can read {_READABLE} of its layer.")


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
# The engine
# ------------------------------------------------------------------------------------------------


def check_edits(model: tl_backend.Model, edits: Iterable[Edit]) -> list[Edit]:
    """``edits`` as a list, after checking that each is an `Edit` on a layer of the model."""
    edits = list(edits)
    n_layers = model.cfg.n_layers
    for edit in edits:
        if not isinstance(edit, Edit):
            raise TypeError(f"edits must be Edit objects, got {type(edit).__name__}.")
        if not 0 <= edit.layer < n_layers:
            raise ValueError(f"Edit {edit.label or edit.fn} targets layer {edit.layer}; the model has {n_layers}.")
    return edits


@contextlib.contextmanager
def edits_on(
    model: tl_backend.Model,
    edits: Iterable[Edit],
    *,
    rows: Int[Tensor, " batch"] | None = None,
    prediction_positions: Int[Tensor, " batch"] | None = None,
    lengths: Int[Tensor, " batch"] | None = None,
) -> Iterator[tl_backend.Model]:
    """Apply ``edits`` to every forward pass inside the block; the hooks are gone afterwards, also
    when the block, an edit or the model raises.

    Several edits on the same hook are applied in the order given. The activations an edit reads
    (`Edit.reads`) are kept from the same forward pass and released once the layer's last editing
    hook has run. ``rows``, ``prediction_positions`` and ``lengths`` describe the batch for edits
    that need them (`run_with_edits` passes them); other hook contexts may be nested inside.
    """
    edits = check_edits(model, edits)
    seen: dict[int, dict[str, Tensor]] = {}
    grouped: dict[tuple[str, int], list[Edit]] = {}
    for edit in edits:
        grouped.setdefault((edit.site, edit.layer), []).append(edit)
    last_reader: dict[int, str] = {}  # the site whose hook releases the layer's kept activations
    for edit in edits:
        if edit.reads:
            last_reader[edit.layer] = max(last_reader.get(edit.layer, edit.site), edit.site, key=SITES.index)

    def keep(kind: str, layer: int):
        def hook(tensor: Tensor, hook) -> None:
            seen.setdefault(layer, {})[kind] = tensor

        return hook

    def apply(site: str, layer: int, group: list[Edit]):
        context = EditContext(layer, rows, prediction_positions, lengths, seen.setdefault(layer, {}))
        needed = sorted({kind for edit in group for kind in edit.reads})

        def hook(tensor: Tensor, hook) -> Tensor:
            missing = [kind for kind in needed if kind not in context.activations]
            if missing:
                raise RuntimeError(
                    f"hook_{'/'.join(missing)} of layer {layer} did not fire before hook_{site}; cannot apply "
                    f"{', '.join(edit.label or str(edit.fn) for edit in group)}."
                )
            for edit in group:
                new = edit.fn(tensor, context)
                if new.shape != tensor.shape:
                    raise ValueError(
                        f"An edit at layer {layer} returned shape {tuple(new.shape)} for an activation "
                        f"of shape {tuple(tensor.shape)}."
                    )
                tensor = new.to(tensor.dtype)
            if last_reader.get(layer) == site:
                context.activations.clear()  # type: ignore[attr-defined]
            return tensor

        return hook

    reads = sorted({(edit.layer, kind) for edit in edits for kind in edit.reads})
    hooks = [(act_name(kind, layer), keep(kind, layer)) for layer, kind in reads]
    hooks += [(act_name(site, layer), apply(site, layer, group)) for (site, layer), group in grouped.items()]
    try:
        with hooks_on(model, hooks):
            yield model
    finally:
        for kept in seen.values():
            kept.clear()


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
    prompt's prediction position, with ``edits`` applied (`edits_on`). CPU tensor; rows follow
    ``prompts``.

    Several edits on the same hook are applied in the order given. The forward pass stops at the
    unembedding input (`icl_kernels.engine.hooks.run_until`). With ``record=True`` the same pass also
    returns every head's output ``z`` at the prediction positions (after any edits),
    ``[prompt layer head_index d_head]``, the values `patch_heads` writes into another run:
    ``(scores, z)``.
    """
    from icl_kernels.data.prompts import batches, pad_id

    if not prompts:
        raise ValueError("run_with_edits needs at least one prompt.")
    if not label_ids or any(len(ids) == 0 for ids in label_ids):
        raise ValueError("label_ids must give at least one token id per class.")
    edits = check_edits(model, edits)
    n_layers = model.cfg.n_layers
    device = tl_backend.model_device(model)
    pad_token_id = pad_id(model, pad_token_id)
    first = torch.tensor([ids[0] for ids in label_ids], device=device)
    out: list[Tensor] = []
    recorded: list[Tensor] = []
    start = 0
    for batch in batches(list(prompts), batch_size, pad_token_id, device):
        n = len(batch.prompts)
        rows = torch.arange(start, start + n)
        start += n
        positions = batch.prediction_positions
        kept: dict[str, Tensor] = {}

        def keep_at_prediction(key: str, positions=positions):
            def hook(tensor: Tensor, hook) -> None:
                kept[key] = tensor.detach()[torch.arange(tensor.shape[0], device=tensor.device), positions]

            return hook

        # registered after the edits (an inner hook context), so they see the edited values
        hooks = [(act_name("z", layer), keep_at_prediction(f"z{layer}")) for layer in range(n_layers)] if record else []
        hooks.append(("unembed.hook_in", keep_at_prediction("final")))
        with torch.no_grad(), edits_on(model, edits, rows=rows, prediction_positions=positions, lengths=batch.lengths):
            run_until(model, batch.tokens, hooks)
        if "final" not in kept:
            raise RuntimeError("unembed.hook_in did not fire; cannot score the prediction positions.")
        with torch.no_grad():
            logits = unembed(model, kept["final"]).float()
        out.append(logits.log_softmax(-1)[:, first].cpu())
        if record:
            recorded.append(torch.stack([kept[f"z{layer}"].cpu() for layer in range(n_layers)], dim=1))
    scores = torch.cat(out)
    return (scores, torch.cat(recorded)) if record else scores


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
    from icl_kernels.data.prompts import batches, pad_id

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

        edits.append(Edit(layer, fn, "z", f"zero L{layer} H{hs}"))
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

        edits.append(Edit(layer, fn, "z", f"mean L{layer} H{hs}"))
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

        edits.append(Edit(layer, fn, "z", f"patch L{layer} H{hs}"))
    return edits


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
