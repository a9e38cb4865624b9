"""The edit engine: interventions applied to every forward pass inside a ``with`` block.

An *edit* is a function that receives one layer's activation at an edit site and returns its
replacement, for every forward pass inside `edits_on`. The sites (`SITES`):

* ``"z"``: ``hook_z`` ``[batch pos head_index d_head]``, the per-head attention output before
  ``W_O``. Edits there change the output on both backends (a TransformerBridge discards edits to
  ``hook_pattern``), and a head's contribution to the residual stream is ``z_h @ W_O[h]``, so zeroing
  ``z_h`` removes exactly that head's term;
* ``"attn_out"``: the layer's ``hook_attn_out`` ``[batch pos d_model]``;
* ``"resid_post"``: the residual stream after the block, ``hook_resid_post`` ``[batch pos d_model]``
  (task and function vectors are written there).

Edits declare the same-layer activations they need (`Edit.reads`: q, k, v of the same forward
pass), which the engine keeps for them and releases once the layer's last edit has run. Every edit
sees an `EditContext`; under `icl_kernels.engine.label_scoring.label_log_probs` it carries the
index of each batch row among the scored prompts, its prediction position and its length, so an
edit can write per-prompt tensors recorded in another run at each prompt's own position.

Hooks live inside `icl_kernels.engine.hooks.hooks_on`, so they are removed on exit, also when the
block, an edit or the model raises. The named edits (ablations, patches, attention masks) are built
in `icl_kernels.engine.patching`; relaxed and momentum attention in `icl_kernels.finetuning`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from icl_kernels.engine.hooks import act_name, hooks_on
from icl_kernels.models import backend as tl_backend

__all__ = ["SITES", "READABLE", "EditContext", "EditFn", "Edit", "check_edits", "edits_on"]

#: Where an edit can act, in the order their hooks fire within a layer.
SITES = ("z", "attn_out", "resid_post")
#: Same-layer activations an edit can ask to read (`Edit.reads`).
READABLE = ("q", "k", "v", "rot_q", "rot_k")


@dataclass(frozen=True)
class EditContext:
    """What an edit knows about the batch it is editing.

    Attributes:
        layer: the layer whose hook fired.
        rows: index of each batch row in the full list of scored prompts
            (`icl_kernels.engine.label_scoring.label_log_probs`, `icl_kernels.engine.patching.run_with_edits`).
        prediction_positions: each row's prediction position in this batch (with a shared prefix:
            in the suffix that is run, as every hook sees it).
        lengths: each row's real (unpadded) length in this batch.
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
        """The prediction positions (on ``device``); an error where the run gave none."""
        if self.prediction_positions is None:
            raise ValueError(
                f"An edit at layer {self.layer} acts at the prediction positions, which only a run over "
                "prompts knows; use positions='all' under edits_on, or score the prompts with "
                "label_log_probs(..., edits=...) / run_with_edits."
            )
        return self.prediction_positions.to(device) if device is not None else self.prediction_positions


EditFn = Callable[[Tensor, EditContext], Tensor]


@dataclass(frozen=True)
class Edit:
    """One intervention: ``fn(activation, context) -> replacement`` at ``site`` of ``layer``.

    ``site`` is one of `SITES`: ``"z"`` (``[batch pos head_index d_head]``), ``"attn_out"`` or
    ``"resid_post"`` (``[batch pos d_model]``). ``fn`` must return a tensor of the same shape; it may
    edit a clone.
    ``reads`` names activations of the same layer (``"q"``, ``"k"``, ``"v"``, ``"rot_q"``,
    ``"rot_k"``) that ``fn`` needs from the same forward pass; they arrive in
    ``context.activations``.

    ``prediction_only`` promises that ``fn`` changes nothing but each row's prediction position (and
    reads nothing else), so a run may take the keys and values of every earlier position from an
    unedited pass (`icl_kernels.engine.condition_runs.score_conditions`).
    """

    layer: int
    fn: EditFn
    site: str = "z"
    label: str = ""
    reads: tuple[str, ...] = ()
    prediction_only: bool = False

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"Edit site must be one of {SITES}, not {self.site!r}.")
        bad = [kind for kind in self.reads if kind not in READABLE]
        if bad:
            raise ValueError(f"Edit reads {bad}; an edit can read {READABLE} of its layer.")


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
    that need them (`icl_kernels.engine.label_scoring.label_log_probs` passes them); other hook
    contexts may be nested inside.
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
