"""Task vectors (Hendel et al., Findings EMNLP 2023): is the task a single vector in the residual stream?

As the official code (``roeehendel/icl_task_vectors`` @1da0db6) runs it:

* **Prompts** (``core/data/datasets/few_shot_format.py``): demonstrations ``example:{x}->{y}`` joined
  by ``\n``, the query ``example:{x}->``; here an open task with ``template="example:{input}->"``
  and ``demo_separator="\n"`` (`icl_kernels.data.tasks.open_vocab`; the answer follows with its
  leading space, ``example:x-> y``), or the task's own template (e.g. ``Q: x\nA:``) where it is
  used as is; the zero-shot prompt is the query alone and names no task.
* **Vector** (``core/task_vectors.py`` ``get_single_context_task_hiddens``): theta_l(S) is the
  residual stream after block l (``hook_resid_post``) at the last token of ``[S, x']``, x' a
  *dummy* query different from the test query, averaged over 2 dummy queries (`task_vectors`,
  `dummy_queries`: other prompts' queries, never the test query or a demonstration's input). One
  vector per demonstration set S.
* **Patching** (``core/models/context_managers/forward_modifiers/hidden_injector.py``): the
  zero-shot prompt of the test query runs with its residual after block l at the last token
  *replaced* by theta_l(S) (`residual_edits` with ``mode="replace"``).
* **Metric**: greedy decoding, exact match (`tv_correct`: Hendel's answers are one token; a
  multi-token answer must be decoded whole, `icl_kernels.engine.vocab_scoring.answer_scores`);
  ``scoring="label-words"`` is the classification variant (argmax over the label words).
* **Layer**: accuracy per layer on dev demonstration sets, the first (lowest) best layer
  (`choose_layer`), reported on other (test) demonstration sets beside zero-shot and ICL accuracy,
  with paired bootstrap differences (`task_vector_study`).

The older variant kept as ``source="other-query"``: the vector of query i is the residual of the ICL
prompt of query i + 1 (`source_order`), a real query instead of dummies. Hendel et al.'s GPT-J means
over 18 tasks are in `HENDEL_GPTJ`.

Identities (``tests/unit/test_task_vectors.py``): patching the last layer's residual with that of
``[S, x']`` reproduces its final logits exactly (the patched prompt answers the dummy query);
patching a prompt with its own hidden state changes nothing; `choose_layer` takes the lowest of
tied maxima.

`residual_at_prediction` records the residual after every layer; `residual_edits` adds to or
replaces ``hook_resid_post`` of one layer at each prompt's prediction position (an edit of
`icl_kernels.engine.edits`), `run_with_residual` scores label tokens under it. Function vectors
(`icl_kernels.families.function_vectors`) add a vector with the same edit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.data.prompts import batches, pad_id
from icl_kernels.engine.capture import capture
from icl_kernels.engine.condition_runs import score_conditions
from icl_kernels.engine.edits import Edit, EditContext, edits_on
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.vocab_scoring import answer_scores
from icl_kernels.families.copy_control import copy_control
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import mean_difference, paired_bootstrap, proportion, split_indices, wilson_interval

__all__ = [
    "RESIDUAL_MODES",
    "residual_at_prediction",
    "residual_edits",
    "residual_edit_on",
    "run_with_residual",
    "TV_SOURCES",
    "HENDEL_GPTJ",
    "source_order",
    "with_query",
    "dummy_queries",
    "task_vectors",
    "tv_correct",
    "tv_correct_layers",
    "choose_layer",
    "task_vector_study",
]

RESIDUAL_MODES = ("add", "replace")
#: Where a prompt's task vector comes from: Hendel et al.'s dummy queries, or (the older variant)
#: another real query's ICL prompt.
TV_SOURCES = ("dummy", "other-query")
#: Hendel et al.'s GPT-J 6B means over 18 tasks (peers.md section 2): zero-shot baseline, task
#: vector and ICL accuracy; best dev layer median 11 of 28.
HENDEL_GPTJ = {"model": "GPT-J 6B", "zero_shot": 0.12, "task_vector": 0.68, "icl": 0.81, "median_layer": 11,
               "n_layers": 28}


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

    return [Edit(layer, fn, "resid_post", f"{mode} resid_post L{layer}", prediction_only=True)]


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
    """The older variant's source of query ``i``'s vector: the ICL prompt of query ``(i + 1) mod n``
    (another real query; itself if n=1)."""
    return (np.arange(n) + 1) % max(n, 1)


def with_query(prompt, other):
    """``prompt``'s demonstrations followed by ``other``'s query (both built by the same builder):
    Hendel et al.'s ``[S, x']``. The query span and label come from ``other``."""
    q0, q1 = prompt.query_span
    o0, o1 = other.query_span
    if q1 != len(prompt.tokens) or o1 != len(other.tokens):
        raise ValueError("with_query needs prompts that end with their query (the prediction position).")
    tokens = tuple(prompt.tokens[:q0]) + tuple(other.tokens[o0:o1])
    return dataclasses.replace(prompt, tokens=tokens, query_span=(q0, q0 + o1 - o0), query_label=other.query_label,
                               query_index=other.query_index)


def dummy_queries(prompts: Sequence, n_dummy: int = 2) -> list[list[int]]:
    """For each prompt, the indices of ``n_dummy`` other prompts whose queries serve as its dummy
    queries x': the next ones in order (cyclically) whose query tokens differ from its own and from
    its demonstrations' inputs. Fewer than ``n_dummy`` such prompts raise ``ValueError``."""
    n = len(prompts)
    out = []
    for i, prompt in enumerate(prompts):
        own = tuple(prompt.tokens[slice(*prompt.query_span)])
        demos = {tuple(prompt.tokens[a:b]) for a, b in prompt.demo_input_spans}
        chosen = []
        for step in range(1, n):
            j = (i + step) % n
            query = tuple(prompts[j].tokens[slice(*prompts[j].query_span)])
            if query != own and query not in demos:
                chosen.append(j)
            if len(chosen) == n_dummy:
                break
        if len(chosen) < n_dummy:
            raise ValueError(f"Prompt {i} has {len(chosen)} other queries to use as dummy queries; {n_dummy} are needed "
                             "(Hendel et al. average 2): use more prompts.")
        out.append(chosen)
    return out


def task_vectors(
    model: tl_backend.Model,
    icl_prompts: Sequence,
    *,
    n_dummy: int = 2,
    batch_size: int = 4,
) -> Float[Tensor, "prompt layer d_model"]:
    """Hendel et al.'s theta_l(S) for every prompt's demonstrations S and every layer: the residual
    stream after block l at the last token of ``[S, x']``, averaged over ``n_dummy`` dummy queries x'
    (`dummy_queries`; ``get_single_context_task_hiddens`` in ``roeehendel/icl_task_vectors``
    ``core/task_vectors.py``, ``num_test_inputs_to_avg=2``). One vector per demonstration set."""
    if n_dummy < 1:
        raise ValueError(f"n_dummy must be >= 1, not {n_dummy}.")
    dummies = dummy_queries(icl_prompts, n_dummy)
    flat = [with_query(p, icl_prompts[j]) for p, js in zip(icl_prompts, dummies) for j in js]
    resid = residual_at_prediction(model, flat, batch_size=batch_size)
    return resid.view(len(icl_prompts), n_dummy, *resid.shape[1:]).mean(1)


def tv_correct(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    layer: int | None,
    vectors: Float[Tensor, "prompt d_model"] | None,
    *,
    scoring: str = "vocab",
    batch_size: int = 4,
) -> Bool[Tensor, " prompt"]:
    """Whether each prompt is answered correctly with its residual after ``layer`` at the last token
    replaced by ``vectors[i]`` (``layer=None``: unedited). ``scoring="vocab"``: greedy decoding of
    as many tokens as the gold answer has equals it (Hendel et al.'s exact match of a one-token
    answer; `icl_kernels.engine.vocab_scoring.answer_scores` with ``greedy=True``, the edit at the
    original last token only); ``"label-words"``: argmax over the label words."""
    if scoring not in ("vocab", "label-words"):
        raise ValueError(f"scoring must be 'vocab' or 'label-words', not {scoring!r}.")
    edits = () if layer is None else residual_edits(layer, vectors, "replace")
    if scoring == "vocab":
        answers = [label_ids[p.query_label] for p in prompts]
        scores = answer_scores(model, list(prompts), answers, edits=edits, batch_size=batch_size, greedy=True,
                               pad_token_id=pad_id(model))
        return scores.exact_match.cpu()
    gold = torch.tensor([p.query_label for p in prompts])
    return label_log_probs(model, list(prompts), label_ids, edits=edits, whole_label=False, batch_size=batch_size,
                           pad_token_id=pad_id(model)).argmax(-1) == gold


def tv_correct_layers(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    vectors: Float[Tensor, "prompt layer d_model"],
    *,
    scoring: str = "vocab",
    batch_size: int = 4,
) -> list[Bool[Tensor, " prompt"]]:
    """`tv_correct` at each of ``layers`` (prompt ``i`` replaced by ``vectors[i, layer]``), each
    prompt's context run once for all layers (`icl_kernels.engine.condition_runs.score_conditions`)."""
    if scoring not in ("vocab", "label-words"):
        raise ValueError(f"scoring must be 'vocab' or 'label-words', not {scoring!r}.")
    conditions = [residual_edits(layer, vectors[:, layer], "replace") for layer in layers]
    if scoring == "vocab":
        answers = [label_ids[p.query_label] for p in prompts]
        scored = score_conditions(model, list(prompts), conditions, answer_ids=answers, batch_size=batch_size, greedy=True)
        return [s.exact_match.cpu() for s in scored]
    gold = torch.tensor([p.query_label for p in prompts])
    scored = score_conditions(model, list(prompts), conditions, label_ids=label_ids, batch_size=batch_size)
    return [s.argmax(-1) == gold for s in scored]


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
    scoring: str = "label-words",
    source: str = "dummy",
    n_dummy: int = 2,
    control_prompts: Sequence | None = None,
    dev_fraction: float = 0.5,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 4,
    bootstrap: int = 1000,
    copy_match: Bool[Tensor, " prompt"] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Accuracy per layer (dev and test demonstration sets) and the test accuracy at the dev-chosen layer.

    Prompt ``i`` is one demonstration set S_i with its test query x_i; ``zsl_prompts[i]`` is x_i
    alone. ``source="dummy"`` (Hendel et al.): theta(S_i) from dummy queries (`task_vectors`);
    ``"other-query"`` (the older variant): the residual of ICL prompt ``source_order(n)[i]``, another
    real query's. The layer is the first best on the dev split; the test split reports it.

    Returns ``(layers, summary, info)``: ``layers`` one row per (split, layer) with task-vector
    accuracy; ``summary`` zero-shot, ICL, task vector and (with ``control_prompts``, ICL prompts of
    another task with the same tokenizer) the control vector, on the test split, Wilson intervals;
    ``info`` the layer, split sizes and paired bootstrap differences (task vector minus zero-shot,
    minus ICL). With ``copy_match`` (one per prompt, `icl_kernels.data.prompts.input_copy_matches`)
    ``info`` adds the copy baseline on the test split and the task vector, zero-shot and ICL on the
    test prompts copying cannot answer (`icl_kernels.families.copy_control.copy_control`).
    """
    if source not in TV_SOURCES:
        raise ValueError(f"source must be one of {TV_SOURCES}, not {source!r}.")
    n = len(icl_prompts)
    if n != len(zsl_prompts) or n < 2:
        raise ValueError(f"Need >= 2 paired ICL / zero-shot prompts, got {n} and {len(zsl_prompts)}.")
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    dev, test = split_indices(n, dev_fraction, seed)
    if source == "dummy":
        vectors = task_vectors(model, icl_prompts, n_dummy=n_dummy, batch_size=batch_size)
    else:
        vectors = residual_at_prediction(model, icl_prompts, batch_size=batch_size)[source_order(n)]
    kw = dict(scoring=scoring, batch_size=batch_size)
    correct = np.stack([c.numpy() for c in tv_correct_layers(model, zsl_prompts, label_ids, layers, vectors, **kw)])  # [layer prompt]
    rows = [dict(split=split, layer=layer, n=len(idx), accuracy=float(correct[li, idx].mean()))
            for split, idx in (("dev", dev), ("test", test)) for li, layer in enumerate(layers)]
    best_index = choose_layer(correct[:, dev].mean(1))
    best = layers[best_index]
    zsl = tv_correct(model, zsl_prompts, label_ids, None, None, **kw).numpy()
    icl = tv_correct(model, icl_prompts, label_ids, None, None, **kw).numpy()
    tv = correct[best_index]
    summary = [
        _accuracy_row("zero-shot", "test", -1, zsl[test]),
        _accuracy_row("icl", "test", -1, icl[test]),
        _accuracy_row("task vector", "test", best, tv[test]),
    ]
    if control_prompts:
        other = residual_at_prediction(model, control_prompts, batch_size=batch_size)[:, best]
        other = other[np.arange(n) % len(other)]
        control = tv_correct(model, zsl_prompts, label_ids, best, other, **kw).numpy()
        summary.append(_accuracy_row("other-task vector", "test", best, control[test]))
    args = dict(unit="demonstration sets", resamples=bootstrap, seed=seed)
    a, z, c = tv[test].astype(float), zsl[test].astype(float), icl[test].astype(float)
    info = dict(task_vector_layer=best, n_dev=len(dev), n_test=len(test), source=source, scoring=scoring,
                tv_minus_zero_shot=paired_bootstrap(mean_difference, [a, z], **args),
                tv_minus_icl=paired_bootstrap(mean_difference, [a, c], **args))
    if copy_match is not None:
        if len(copy_match) != n:
            raise ValueError(f"copy_match has {len(copy_match)} entries for {n} prompts.")
        copies = copy_match.numpy().astype(bool)[test]
        info.update(copy_control("tv", copies, a, ("zero_shot", z), z, args))
        if (~copies).sum() >= 2:
            info["tv_icl_accuracy_no_copy"] = proportion(c[~copies].astype(bool))
    return pd.DataFrame(rows), pd.DataFrame(summary), info
