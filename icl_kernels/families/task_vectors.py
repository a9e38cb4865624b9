"""Task vectors (Hendel et al., 2023): is the task a single vector in the residual stream?

theta_l(S) is the residual stream after block ``l`` (``hook_resid_post``) at the prediction position
of an ICL prompt ``[S, x']``. Replacing the zero-shot prompt's residual at the same layer and
position by theta_l(S) (``[x]`` alone, another query ``x``) should make the model answer ``x`` as
the demonstrations ``S`` teach. Here ``x'`` is simply another test query: the vector of query
``i``'s zero-shot prompt comes from the ICL prompt of query ``(i + 1) mod n`` (`source_order`), so
the source prompt's own answer is a different query's and copying it is not rewarded beyond
chance.

`residual_at_prediction` records theta_l for every layer (one forward per batch); `residual_edits`
adds to or replaces ``hook_resid_post`` of one layer at each prompt's prediction position (an edit
of `icl_kernels.engine.edits`), and `run_with_residual` scores the label tokens under it with the
package's scorer (`icl_kernels.engine.label_scoring.label_log_probs`); `task_vector_sweep` gives accuracy per layer;
`choose_layer` takes the first (lowest) layer with the best dev accuracy, and `task_vector_study`
reports it on a disjoint test split, next to zero-shot, ICL and a control vector from another
task's ICL prompts (same layer). Function vectors (`icl_kernels.families.function_vectors`) add a vector with
the same engine.

Patching the last layer's residual with the ICL prompt's own reproduces its final logits exactly
(the test of the engine); a last-layer patch therefore copies the source prompt's answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_kernels.data.prompts import batches, pad_id
from icl_kernels.engine.capture import capture
from icl_kernels.engine.edits import Edit, EditContext, edits_on
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import split_indices, wilson_interval

__all__ = [
    "RESIDUAL_MODES",
    "residual_at_prediction",
    "residual_edits",
    "residual_edit_on",
    "run_with_residual",
    "source_order",
    "task_vector_sweep",
    "choose_layer",
    "task_vector_study",
]

RESIDUAL_MODES = ("add", "replace")


def residual_at_prediction(
    model: tl_backend.Model, prompts: Sequence, *, batch_size: int = 4, pad_token_id: int | None = None
) -> Float[Tensor, "batch layer d_model"]:
    """``hook_resid_post`` of every layer at each prompt's prediction position (CPU)."""
    device = tl_backend.model_device(model)
    parts = []
    for batch in batches(list(prompts), batch_size, pad_id(model, pad_token_id), device):
        cap = capture(model, batch.tokens, batch.prediction_positions, attention=False,
                      features=["resid_post"], final_residual=False)
        parts.append(cap.query_features["resid_post"])
    return torch.cat(parts)


def _write_residual(
    resid: Float[Tensor, "batch pos d_model"], values: Tensor, positions: Tensor, mode: str
) -> Float[Tensor, "batch pos d_model"]:
    """``resid`` with row ``r``'s ``positions[r]`` added to or replaced by ``values[r]``."""
    resid = resid.clone()
    rows = torch.arange(resid.shape[0], device=resid.device)
    pos = positions.to(resid.device)
    new = values.to(resid.device, resid.dtype)
    resid[rows, pos] = new if mode == "replace" else resid[rows, pos] + new
    return resid


def _check_mode(mode: str) -> None:
    if mode not in RESIDUAL_MODES:
        raise ValueError(f"mode must be one of {RESIDUAL_MODES}, not {mode!r}.")


def residual_edits(
    layer: int, values: Float[Tensor, "prompt d_model"], mode: str = "add"
) -> list[Edit]:
    """An edit of ``hook_resid_post`` of ``layer``: prompt ``i``'s residual at its prediction position
    gets ``values[i]`` added (``mode="add"``) or put in its place (``"replace"``). For the scorer
    (`icl_kernels.engine.label_scoring.label_log_probs`), which tells the edit each row's prompt."""
    _check_mode(mode)

    def fn(resid: Tensor, context: EditContext) -> Tensor:
        return _write_residual(resid, values[context.rows.cpu()], context.predictions(), mode)

    return [Edit(layer, fn, "resid_post", f"{mode} resid_post L{layer}")]


@contextlib.contextmanager
def residual_edit_on(
    model: tl_backend.Model,
    layer: int,
    values: Float[Tensor, "batch d_model"],
    positions: Int[Tensor, " batch"],
    mode: str = "add",
) -> Iterator[tl_backend.Model]:
    """Add ``values`` to (or replace by them) ``hook_resid_post`` of ``layer`` at ``positions``,
    one row per batch row, for every forward pass in the block (hooks gone afterwards)."""
    _check_mode(mode)
    edit = Edit(layer, lambda resid, context: _write_residual(resid, values, positions, mode), "resid_post")
    with edits_on(model, [edit]):
        yield model


def run_with_residual(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    layer: int,
    values: Float[Tensor, "batch d_model"] | Float[Tensor, " d_model"],
    *,
    mode: str = "add",
    batch_size: int = 4,
    pad_token_id: int | None = None,
) -> Float[Tensor, "batch n_classes"]:
    """Log-probabilities of each class's first label token at each prompt's prediction position
    with ``values`` (one row per prompt, or one vector for all) added to / replacing the residual
    after ``layer`` there (`residual_edits`, scored by
    `icl_kernels.engine.label_scoring.label_log_probs`). CPU tensor."""
    if values.ndim == 1:
        values = values[None].expand(len(prompts), -1)
    if values.shape[0] != len(prompts):
        raise ValueError(f"values has {values.shape[0]} rows for {len(prompts)} prompts.")
    return label_log_probs(
        model, list(prompts), label_ids, edits=residual_edits(layer, values, mode), whole_label=False,
        batch_size=batch_size, pad_token_id=pad_id(model, pad_token_id),
    )


def source_order(n: int) -> np.ndarray:
    """Which ICL prompt gives query ``i``'s vector: ``(i + 1) mod n`` (another query; itself if n=1)."""
    return (np.arange(n) + 1) % max(n, 1)


def task_vector_sweep(
    model: tl_backend.Model,
    zsl_prompts: Sequence,
    vectors: Float[Tensor, "batch layer d_model"],
    label_ids: Sequence[Sequence[int]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
) -> Float[Tensor, "layer batch n_classes"]:
    """Label scores of ``zsl_prompts[i]`` with its residual after each layer replaced by
    ``vectors[i, layer]`` (rows already matched to the prompts)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    return torch.stack([
        run_with_residual(model, zsl_prompts, label_ids, layer, vectors[:, layer], mode="replace", batch_size=batch_size)
        for layer in layers
    ])


def choose_layer(accuracy: Sequence[float] | np.ndarray) -> int:
    """The first (lowest) layer among those with the best accuracy."""
    values = np.asarray(accuracy, dtype=float)
    return int(np.flatnonzero(values == values.max())[0])


def _accuracy_row(name: str, split: str, layer: int, correct: np.ndarray) -> dict:
    lo, hi = wilson_interval(int(correct.sum()), len(correct))
    return dict(condition=name, split=split, layer=layer, n=len(correct), accuracy=float(correct.mean()),
                accuracy_low=lo, accuracy_high=hi)


def task_vector_study(
    model: tl_backend.Model,
    icl_prompts: Sequence,
    zsl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    control_prompts: Sequence | None = None,
    dev_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 4,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Accuracy per layer (dev and test splits) and the test accuracy at the dev-chosen layer.

    Returns ``(layers, summary, info)``: ``layers`` one row per (split, layer) with task-vector
    accuracy; ``summary`` zero-shot, ICL, task vector and (with ``control_prompts``, ICL prompts of
    another task with the same tokenizer) the control vector, on the test split, Wilson intervals.
    """
    n = len(icl_prompts)
    if n != len(zsl_prompts) or n < 2:
        raise ValueError(f"Need >= 2 paired ICL / zero-shot prompts, got {n} and {len(zsl_prompts)}.")
    gold = np.array([p.query_label for p in icl_prompts])
    dev, test = split_indices(n, dev_fraction, seed)
    source = residual_at_prediction(model, icl_prompts, batch_size=batch_size)[source_order(n)]
    scores = task_vector_sweep(model, zsl_prompts, source, label_ids, batch_size=batch_size)
    correct = (scores.argmax(-1).numpy() == gold[None])  # [layer batch]
    rows = [dict(split=split, layer=layer, n=len(idx), accuracy=float(correct[layer, idx].mean()))
            for split, idx in (("dev", dev), ("test", test)) for layer in range(correct.shape[0])]
    layers = pd.DataFrame(rows)
    best = choose_layer(correct[:, dev].mean(1))
    zsl = run_with_residual(model, zsl_prompts, label_ids, 0, torch.zeros(model.cfg.d_model), batch_size=batch_size)
    icl_scores = run_with_residual(model, icl_prompts, label_ids, 0, torch.zeros(model.cfg.d_model), batch_size=batch_size)
    summary = [
        _accuracy_row("zero-shot", "test", -1, (zsl.argmax(-1).numpy() == gold)[test]),
        _accuracy_row("icl", "test", -1, (icl_scores.argmax(-1).numpy() == gold)[test]),
        _accuracy_row("task vector", "test", best, correct[best, test]),
    ]
    if control_prompts:
        other = residual_at_prediction(model, control_prompts, batch_size=batch_size)[:, best]
        other = other[np.arange(n) % len(other)]
        control = run_with_residual(model, zsl_prompts, label_ids, best, other, mode="replace", batch_size=batch_size)
        summary.append(_accuracy_row("other-task vector", "test", best, (control.argmax(-1).numpy() == gold)[test]))
    info = dict(task_vector_layer=best, n_dev=len(dev), n_test=len(test))
    return layers, pd.DataFrame(summary), info
