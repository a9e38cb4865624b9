"""Running a model over k-shot prompts for the head-by-head kernel-regression analyses.

`icl_kernels.kernel.scores` holds the scores of Han et al.'s test as pure functions of tensors; this
module runs the model to get those tensors:

* `analyze_heads` runs a HookedTransformer or TransformerBridge over `icl_kernels.data.prompts.IclPrompt`s,
  one `icl_kernels.engine.capture.capture` forward per batch (the prediction row of every head's attention,
  and optionally keys, values, queries and residuals at the demonstrations' label tokens), and keeps
  per-prompt CPU tensors in a `HeadRun`: a_i for every aggregation, the demonstration labels, the
  model's log-probabilities of the label words' first tokens at the prediction position (its ICL
  prediction is their argmax) and the gold labels. For an open-vocabulary task whose answers are
  single tokens (``prediction="vocabulary"``), the model's prediction is instead its top-1 token over
  the whole vocabulary, read as the class whose answer is that token, or `HeadRun.n_classes` (no
  class: an answer outside the task's answers, which no head vote and no baseline can equal, so it
  counts as a disagreement for all of them). Every score of `icl_kernels.kernel.scores` is then a
  function of the run (`HeadRun.scores`, `head_kernel_regression`, `resid_kernel_regression`,
  `probe_accuracies`).
* `permute_demonstrations` reorders a prompt's demonstrations token by token (each demonstration
  moves as one block: input, label, separator), for the order control of the heads study.
* `demo_output_similarity` (with `single_example_outputs`) runs every input x alone as a zero-shot
  prompt, for the kernel similarity P(o|x_test)^T P(o|x_i) of Han et al.'s Figure 4 and the
  zero-shot class of each x.

Every hook is added inside `icl_kernels.engine.hooks.run_until` (through `capture`) and is gone after each
forward pass, also when the model or a hook raises.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import LabelTokenizationError, batches, label_token_ids, pad_id
from icl_kernels.engine.capture import capture
from icl_kernels.engine.label_scoring import label_scores, prediction_logits
from icl_kernels.kernel.scores import (
    AGGREGATIONS,
    DemoLayout,
    HeadScores,
    Kernel,
    Rows,
    Segment,
    demo_attention,
    kernel_regression,
    resample_rows,
    ridge_probe_accuracy,
    ridge_probe_predictions,
    score_heads,
)
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import InvalidOptionError

__all__ = [
    "HeadRun",
    "analyze_heads",
    "head_kernel_regression",
    "resid_kernel_regression",
    "probe_accuracies",
    "probe_scored_pairs",
    "single_example_outputs",
    "demo_output_similarity",
    "permute_demonstrations",
    "rotated_demonstrations",
    "PREDICTIONS",
    "vocabulary_classes",
    "MAX_OPEN_CLASSES",
    "check_open_task",
]

#: How `analyze_heads` reads the model's prediction: ``"labels"``, the argmax over the label words'
#: first tokens (classification tasks; an open task's answers as a named option), or ``"vocabulary"``,
#: the top-1 token over the whole vocabulary mapped to its class (open tasks with single-token answers).
PREDICTIONS = ("labels", "vocabulary")


#: Most answers an open task may have for label-vote head scores (votes, kernel regression and
#: baselines keep one entry per class, per prompt and head).
MAX_OPEN_CLASSES = 256


def check_open_task(task, tokenizer=None, *, study: str = "heads", hint: str = "") -> None:
    """`InvalidOptionError` unless the heads of open task ``task`` can be scored by their label votes
    (the heads study; ranking heads in the causal and families studies): at most `MAX_OPEN_CLASSES`
    answers and (with ``tokenizer``) every answer one token, so that a vote names one answer token.
    ``hint`` ends the message (what else the study can do)."""
    n = len(task.answer_words)
    if n > MAX_OPEN_CLASSES:
        raise InvalidOptionError(
            f"Task {task.name!r} has {n:,} distinct answers; the {study} study scores heads by their vote over "
            f"the answers (one entry per answer, per prompt and head) and takes at most {MAX_OPEN_CLASSES}. Use an "
            "open task with few single-token answers (e.g. capitalize-first-letter, lowercase-last-letter)." + hint)
    if tokenizer is not None:
        try:
            label_token_ids(tokenizer, task.answer_words, require_single_token=True)
        except LabelTokenizationError as err:
            raise InvalidOptionError(
                f"Task {task.name!r} has answers of several tokens for this model's tokenizer ({err}); the {study} "
                "study scores heads by their vote over the answers, which names one answer token, so it takes open "
                "tasks whose answers are all single tokens (e.g. capitalize-first-letter, lowercase-last-letter)." + hint
            ) from err


def vocabulary_classes(
    top1: Int[Tensor, " batch"], class_tokens: Sequence[int], d_vocab: int
) -> Int[Tensor, " batch"]:
    """The class whose (single) token is each top-1 token; ``len(class_tokens)`` where it is none.

    >>> vocabulary_classes(torch.tensor([5, 7, 2]), [7, 5], 10).tolist()
    [1, 0, 2]
    """
    tokens = [int(t) for t in class_tokens]
    if len(set(tokens)) != len(tokens):
        raise ValueError("Two classes share a first token, so a top-1 token cannot name one class; "
                         "give each class a distinct single-token answer.")
    top1 = top1.cpu().long()
    size = max(int(d_vocab), max(tokens, default=-1) + 1, int(top1.max()) + 1 if top1.numel() else 0)
    lookup = torch.full((size,), len(tokens), dtype=torch.long)
    lookup[torch.as_tensor(tokens, dtype=torch.long)] = torch.arange(len(tokens))
    return lookup[top1]


# ------------------------------------------------------------------------------------------------
# The driver: run a model over prompts and keep per-prompt tensors
# ------------------------------------------------------------------------------------------------


@dataclass
class HeadRun:
    """Everything the head analyses need, per prompt (CPU tensors).

    ``demo_weights[how]`` is a_i ``[prompt layer head demo]`` for each aggregation; ``label_scores``
    the model's log-probabilities of each label word's first token at the prediction position (its
    ICL prediction is their argmax); optional extras are filled when requested from `analyze_heads`.
    """

    layers: tuple[int, ...]
    n_heads: int
    n_classes: int
    demo_weights: dict[str, Tensor]
    demo_labels: Tensor
    gold: Tensor
    label_scores: Tensor
    query_q: Tensor | None = None  # [prompt layer head d_head] (pre-rotary)
    label_k: Tensor | None = None  # [prompt demo layer kv_head d_head] (pre-rotary, first label token)
    resid_layers: tuple[int, ...] = ()
    query_resid: Tensor | None = None  # [prompt layer' d_model] at the prediction position
    demo_resid: Tensor | None = None  # [prompt demo layer' d_model] at the last token of x_i
    probe_offsets: tuple[int, ...] = ()
    probe_k: Tensor | None = None  # [prompt demo offset layer kv_head d_head]
    probe_v: Tensor | None = None
    probe_valid: Tensor | None = None  # [prompt demo offset]
    attention_map: Tensor | None = None  # [layer head resampled], mean over `attention_map_n` prompts
    attention_map_n: int = 0
    segments: list[Segment] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    attention_rows: list[Tensor] = field(default_factory=list)  # first `keep_rows` prompts: [layer head pos]
    top1: Tensor | None = None  # [prompt] top-1 token over the vocabulary (prediction="vocabulary" only)
    vocab_predictions: Tensor | None = None  # [prompt] class of `top1`; n_classes: none of the classes

    @property
    def n_prompts(self) -> int:
        return len(self.gold)

    @property
    def model_predictions(self) -> Tensor:
        """The model's ICL prediction per prompt: the argmax over the label words' first tokens, or with
        ``prediction="vocabulary"`` the class of its top-1 token over the vocabulary (``n_classes``
        when that token is no class's answer)."""
        if self.vocab_predictions is not None:
            return self.vocab_predictions
        return self.label_scores.argmax(-1)

    def scores(self, rows=None) -> HeadScores:
        return score_heads(self.demo_weights, self.demo_labels, self.model_predictions, self.gold, self.n_classes, rows)


def _pad_demo_dim(tensors: list[Tensor], dim: int, fill) -> Tensor:
    width = max(t.shape[dim] for t in tensors)
    out = []
    for t in tensors:
        if t.shape[dim] < width:
            pad_shape = list(t.shape)
            pad_shape[dim] = width - t.shape[dim]
            t = torch.cat([t, torch.full(pad_shape, fill, dtype=t.dtype)], dim=dim)
        out.append(t)
    return torch.cat(out, dim=0)


def analyze_heads(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 4,
    pad_token_id: int | None = None,
    aggregations: Sequence[str] = AGGREGATIONS,
    head_features: bool = False,
    resid_layers: Sequence[int] = (),
    probe_offsets: Sequence[int] = (),
    attention_map_length: int | None = 30,
    keep_rows: int = 0,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    prediction: str = "labels",
) -> HeadRun:
    """Run ``model`` over k-shot ``prompts`` (one captured forward per batch) and keep per-prompt tensors.

    Args:
        model: a HookedTransformer or TransformerBridge.
        prompts: `icl_kernels.data.prompts.IclPrompt`s with ``query_label`` set (the gold class).
        label_ids: token ids of each class's label word; the model's ICL prediction is the argmax of
            the log-probabilities of their first tokens at the prediction position.
        batch_size: prompts per forward pass.
        aggregations: which a_i to keep (`AGGREGATIONS`).
        head_features: keep every head's query at the prediction position and keys at each label's
            first token (pre-rotary; for kernel regression on head features).
        resid_layers: keep the residual stream (``resid_post``) of these layers at the prediction
            position and at the last token of each x_i.
        probe_offsets: keep keys and values at these offsets from each label's first token (positions
            at or after the prediction position are marked invalid).
        attention_map_length: resample x_i to this many points for the averaged attention map
            (``None``: no map). Prompts whose demonstration count differs from the first prompt's are
            left out of the map.
        keep_rows: keep the whole prediction-row attention of every head (``[layer head
            pos]`` over the prompt's own tokens, padding cut) for the first ``keep_rows`` prompts
            (`HeadRun.attention_rows`), for token-level views of single prompts.
        prediction: `PREDICTIONS`: ``"labels"`` (argmax over the label words' first tokens) or
            ``"vocabulary"`` (top-1 over the whole vocabulary, as its class or ``n_classes`` when no
            class's answer; every label must then be one token: `vocabulary_classes`).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}.")
    if prediction == "vocabulary" and any(len(ids) != 1 for ids in label_ids):
        multi = [c for c, ids in enumerate(label_ids) if len(ids) != 1]
        raise ValueError(f"prediction='vocabulary' needs single-token labels; classes {multi[:5]} have "
                         f"{[len(label_ids[c]) for c in multi[:5]]} tokens.")
    if keep_rows < 0:
        raise ValueError(f"keep_rows must be >= 0, not {keep_rows}.")
    if any(p.query_label is None for p in prompts):
        raise ValueError("Every prompt needs query_label (the gold class) for head accuracy.")
    if not prompts:
        raise ValueError("analyze_heads needs at least one prompt.")
    device = tl_backend.model_device(model)
    pad_token_id = pad_id(model, pad_token_id)
    first_ids = [ids[0] for ids in label_ids]
    n_classes = len(label_ids)
    layers = tuple(range(model.cfg.n_layers))
    resid_layers = tuple(int(x) for x in resid_layers)
    probe_offsets = tuple(int(x) for x in probe_offsets)
    want = set()
    if head_features:
        want |= {"q", "k"}
    if probe_offsets:
        want |= {"k", "v"}
    if resid_layers:
        want |= {"resid_post"}
    map_demos = prompts[0].n_demos

    parts: dict[str, list[Tensor]] = {}
    map_sum: Tensor | None = None
    map_n = 0
    segments: list[Segment] = []
    meta: list[dict] = []
    rows_kept: list[Tensor] = []
    bar = tqdm(total=len(prompts), desc="heads: prompts (one forward each)", unit="prompt", disable=not progress)
    for index, batch in enumerate(batches(list(prompts), batch_size, pad_token_id, device)):
        bp = batch.prompts
        width = batch.tokens.shape[1]
        layout = DemoLayout.from_prompts(bp, width)
        n_d = layout.demo_labels.shape[1]
        # positions: label first tokens, last x tokens, probe offsets
        pos_parts, names = [], []
        if head_features:
            pos_parts.append(layout.label_positions)
            names.append("label")
        if resid_layers:
            pos_parts.append(torch.where(layout.valid, layout.label_positions - 1, -1))
            names.append("last_x")
        if probe_offsets:
            pred = batch.prediction_positions.cpu()[:, None]
            for o in probe_offsets:
                p = layout.label_positions + o
                ok = layout.valid & (p >= 0) & (p < pred)
                pos_parts.append(torch.where(ok, p, -1))
                names.append(f"off{o}")
        feature_positions = torch.cat(pos_parts, dim=1) if pos_parts else None
        cap = capture(
            model, batch.tokens, batch.prediction_positions, features=sorted(want),
            feature_positions=feature_positions, rotate=False,
        )
        attn = cap.attention.float()
        for how in aggregations:
            parts.setdefault(f"w_{how}", []).append(demo_attention(attn, layout, how))
        parts.setdefault("labels", []).append(layout.demo_labels)
        with torch.no_grad():
            if prediction == "vocabulary":  # the same log-softmax as `label_scores`, and the top-1 token
                logits = prediction_logits(model, cap.final_residual.to(device), first_index=index * batch_size)
                scores = logits.log_softmax(-1)[:, torch.as_tensor(first_ids, device=logits.device)].cpu()
                parts.setdefault("top1", []).append(logits.argmax(-1).cpu())
            else:
                scores = label_scores(model, cap.final_residual.to(device), first_ids, first_index=index * batch_size)
        parts.setdefault("scores", []).append(scores)
        parts.setdefault("gold", []).append(torch.tensor([p.query_label for p in bp]))

        def block(kind: str, name: str) -> Tensor:
            j = names.index(name)
            return cap.features[kind][:, j * n_d : (j + 1) * n_d]

        if head_features:
            parts.setdefault("query_q", []).append(cap.query_features["q"].float())
            parts.setdefault("label_k", []).append(block("k", "label").float())
        if resid_layers:
            parts.setdefault("query_resid", []).append(cap.query_features["resid_post"][:, list(resid_layers)].float())
            parts.setdefault("demo_resid", []).append(block("resid_post", "last_x")[:, :, list(resid_layers)].float())
        if probe_offsets:
            ks = torch.stack([block("k", f"off{o}") for o in probe_offsets], dim=2)
            vs = torch.stack([block("v", f"off{o}") for o in probe_offsets], dim=2)
            valid = torch.stack([feature_positions[:, names.index(f"off{o}") * n_d:][:, :n_d] >= 0 for o in probe_offsets], dim=2)
            parts.setdefault("probe_k", []).append(ks.float())
            parts.setdefault("probe_v", []).append(vs.float())
            parts.setdefault("probe_valid", []).append(valid.cpu())
        if attention_map_length:
            same = [i for i, p in enumerate(bp) if p.n_demos == map_demos]
            if same:
                rows, segments = resample_rows(attn[same], [bp[i] for i in same], attention_map_length)
                map_sum = rows.sum(0) if map_sum is None else map_sum + rows.sum(0)
                map_n += len(same)
        for i, p in enumerate(bp):
            if len(meta) < keep_rows:
                rows_kept.append(attn[i, :, :, : len(p)].cpu().clone())
            meta.append(dict(
                query_index=p.query_index, n_demos=p.n_demos, prompt_tokens=len(p),
                demo_indices=list(p.demo_indices), demo_labels=list(p.demo_labels),
            ))
        bar.update(len(bp))
        if on_batch is not None:
            on_batch(len(bp))
    bar.close()

    def cat(name: str, dim_demo: int | None = None, fill=0) -> Tensor | None:
        if name not in parts:
            return None
        if dim_demo is None:
            return torch.cat(parts[name], dim=0)
        return _pad_demo_dim(parts[name], dim_demo, fill)

    top1 = cat("top1")
    return HeadRun(
        top1=top1,
        vocab_predictions=None if top1 is None else vocabulary_classes(top1, first_ids, int(model.cfg.d_vocab)),
        layers=layers,
        n_heads=model.cfg.n_heads,
        n_classes=n_classes,
        demo_weights={how: cat(f"w_{how}", 3) for how in aggregations},
        demo_labels=cat("labels", 1, -1),
        gold=cat("gold"),
        label_scores=cat("scores"),
        query_q=cat("query_q"),
        label_k=cat("label_k", 1),
        resid_layers=resid_layers,
        query_resid=cat("query_resid"),
        demo_resid=cat("demo_resid", 1),
        probe_offsets=probe_offsets,
        probe_k=cat("probe_k", 1),
        probe_v=cat("probe_v", 1),
        probe_valid=cat("probe_valid", 1, False),
        attention_map=None if map_sum is None else map_sum / max(map_n, 1),
        attention_map_n=map_n,
        segments=segments,
        meta=meta,
        attention_rows=rows_kept,
    )


# ------------------------------------------------------------------------------------------------
# Analyses on a HeadRun
# ------------------------------------------------------------------------------------------------


def head_kernel_regression(
    run: HeadRun, layer: int, head: int, kernel: Kernel | None = None
) -> Float[Tensor, "batch n_classes"]:
    """KR with one head's features: its query at the prediction position against its key at each
    label's first token (pre-rotary, so position-free). Default kernel: exp dot product at the
    model's own score scale, sqrt(d_head)."""
    if run.query_q is None or run.label_k is None:
        raise ValueError("This HeadRun has no head features; run analyze_heads(..., head_features=True).")
    li = run.layers.index(layer)
    group = run.n_heads // run.label_k.shape[3]
    q = run.query_q[:, li, head]
    k = run.label_k[:, :, li, head // group]
    kernel = kernel or Kernel("exp_dot", temperature=math.sqrt(q.shape[-1]))
    return kernel_regression(q, k, run.demo_labels[:, : k.shape[1]], run.n_classes, kernel)


def resid_kernel_regression(run: HeadRun, layer: int, kernel: Kernel = Kernel("cosine")) -> Float[Tensor, "batch n_classes"]:
    """KR on the residual stream after ``layer``: prediction position vs the last token of each x_i."""
    if run.query_resid is None or layer not in run.resid_layers:
        raise ValueError(f"This HeadRun has no residuals of layer {layer}; pass resid_layers to analyze_heads.")
    li = run.resid_layers.index(layer)
    return kernel_regression(run.query_resid[:, li], run.demo_resid[:, :, li], run.demo_labels, run.n_classes, kernel)


def probe_accuracies(
    run: HeadRun, target: Int[Tensor, "batch demo"], train_prompts: Rows, which: str = "k", lam: float = 0.01
) -> Float[Tensor, "offset layer kv_head"]:
    """Ridge-probe accuracy of keys (``which="k"``) or values at every offset, layer and key/value head.

    Samples are (prompt, demonstration) pairs with a valid position and target >= 0; the probe
    trains on pairs from ``train_prompts`` and is scored on the other prompts' pairs.
    """
    feats = run.probe_k if which == "k" else run.probe_v
    if feats is None:
        raise ValueError("This HeadRun has no probe features; pass probe_offsets to analyze_heads.")
    n_prompts, n_demo, n_off, n_layers, n_kv, d = feats.shape
    train_rows = torch.zeros(n_prompts, dtype=torch.bool)
    train_rows[torch.as_tensor(list(train_prompts), dtype=torch.long)] = True
    out = torch.full((n_off, n_layers, n_kv), float("nan"))
    for oi in range(n_off):
        ok = run.probe_valid[:, :n_demo, oi] & (target[:, :n_demo] >= 0)
        if ok.sum() < 4:
            continue
        x = feats[:, :, oi][ok]  # [sample layer kv d]
        y = target[:, :n_demo][ok]
        train = train_rows[:, None].expand(-1, n_demo)[ok]
        if train.all() or not train.any():
            continue
        groups = x.permute(1, 2, 0, 3).reshape(n_layers * n_kv, x.shape[0], d)
        out[oi] = ridge_probe_accuracy(groups, y, train, run.n_classes, lam).view(n_layers, n_kv)
    return out


def probe_scored_pairs(
    run: HeadRun, target: Int[Tensor, "batch demo"], train_prompts: Rows, offset_index: int, layer_index: int,
    kv_head: int, which: str = "k", lam: float = 0.01,
) -> tuple[Bool[Tensor, " pair"], Int[Tensor, " pair"], Int[Tensor, " pair"]]:
    """One probe of `probe_accuracies` pair by pair: for every held-out (prompt, demonstration) pair,
    whether the probe at (offset, layer, key/value head) is right, its target, and its prompt (the
    independent unit to bootstrap over). The mean of the first equals that probe's accuracy."""
    feats = run.probe_k if which == "k" else run.probe_v
    if feats is None:
        raise ValueError("This HeadRun has no probe features; pass probe_offsets to analyze_heads.")
    n_prompts, n_demo = feats.shape[:2]
    ok = run.probe_valid[:, :n_demo, offset_index] & (target[:, :n_demo] >= 0)
    x = feats[:, :, offset_index, layer_index, kv_head][ok]  # [sample d]
    y = target[:, :n_demo][ok]
    prompt = torch.arange(n_prompts)[:, None].expand(-1, n_demo)[ok]
    train = torch.isin(prompt, torch.as_tensor(list(train_prompts), dtype=torch.long))
    pred = ridge_probe_predictions(x[None], y, train, run.n_classes, lam)[0]
    return pred == y[~train], y[~train], prompt[~train]


def single_example_outputs(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 8,
    prediction: str = "labels",
) -> tuple[Float[Tensor, "batch vocab"], Int[Tensor, " batch"]]:
    """Next-token distribution P(o|x) over the whole vocabulary and the argmax label class, for
    zero-shot prompts (one example each, `PromptBuilder.build([], example)`); with
    ``prediction="vocabulary"`` the class of the top-1 token (`vocabulary_classes`)."""
    device = tl_backend.model_device(model)
    first_ids = torch.tensor([ids[0] for ids in label_ids], device=device)
    probs, preds = [], []
    for index, batch in enumerate(batches(list(prompts), batch_size, pad_token_id, device)):
        cap = capture(model, batch.tokens, batch.prediction_positions, attention=False, out_device=None)
        with torch.no_grad():
            logits = prediction_logits(model, cap.final_residual, first_index=index * batch_size)
        probs.append(logits.softmax(-1).cpu())
        if prediction == "vocabulary":
            preds.append(vocabulary_classes(logits.argmax(-1), first_ids.tolist(), logits.shape[-1]))
        else:
            preds.append(logits[:, first_ids].argmax(-1).cpu())
    return torch.cat(probs), torch.cat(preds)


def demo_output_similarity(
    model: tl_backend.Model,
    builder,
    query_examples: Sequence,
    demo_examples: Sequence[Sequence],
    *,
    pad_token_id: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    prediction: str = "labels",
) -> tuple[Float[Tensor, "batch demo"], Int[Tensor, "batch demo"], Int[Tensor, " batch"]]:
    """For each ICL prompt: P(o|x_test)^T P(o|x_i) for its demonstrations (NaN for padding), the
    zero-shot label class of every x_i (-1 for padding) and of x_test (``prediction`` as in
    `single_example_outputs`).

    Each x is run alone as a zero-shot prompt of ``builder``; distributions over the full
    vocabulary are kept only for one chunk of prompts at a time.
    """
    n = len(query_examples)
    n_demo = max([len(d) for d in demo_examples] + [1])
    sim = torch.full((n, n_demo), float("nan"))
    demo_pred = torch.full((n, n_demo), -1, dtype=torch.long)
    query_pred = torch.full((n,), -1, dtype=torch.long)
    chunk = max(1, batch_size // (n_demo + 1)) if batch_size > n_demo else 1
    for start in tqdm(range(0, n, chunk), desc=f"single-example runs: batches of {chunk}", unit="batch", disable=not progress):
        rows = list(range(start, min(n, start + chunk)))
        texts, owners = [], []
        for r in rows:
            texts.append(query_examples[r])
            owners.append((r, -1))
            for i, ex in enumerate(demo_examples[r]):
                texts.append(ex)
                owners.append((r, i))
        zero = [builder.build([], ex) for ex in texts]
        probs, preds = single_example_outputs(model, zero, builder.label_ids, pad_token_id=pad_token_id,
                                              batch_size=batch_size, prediction=prediction)
        query_at = {r: j for j, (r, i) in enumerate(owners) if i == -1}
        for j, (r, i) in enumerate(owners):
            if i == -1:
                query_pred[r] = preds[j]
            else:
                sim[r, i] = float(probs[query_at[r]].double() @ probs[j].double())
                demo_pred[r, i] = preds[j]
    return sim, demo_pred, query_pred


# ------------------------------------------------------------------------------------------------
# Reordered demonstrations (the order control)
# ------------------------------------------------------------------------------------------------


def permute_demonstrations(prompt, order: Sequence[int]):
    """The prompt with its demonstrations in ``order`` (new position j holds old demonstration
    ``order[j]``): the same tokens, each demonstration (input, label, separator) moved as one block,
    every span moved with it; the query and what precedes the first demonstration stay in place."""
    n = prompt.n_demos
    order = [int(i) for i in order]
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must reorder the {n} demonstrations, not {order}.")
    if n == 0:
        return prompt
    blocks = [(x[0], sep[1]) for x, sep in zip(prompt.demo_input_spans, prompt.separator_spans)]
    for (_, b), (c, _) in zip(blocks, blocks[1:]):
        if b != c:
            raise ValueError(f"Demonstrations are not contiguous blocks (one ends at {b}, the next starts at {c}); "
                             "cannot reorder them.")
    tokens = list(prompt.tokens)
    start, end = blocks[0][0], blocks[-1][1]
    new_tokens = tokens[:start]
    shift = {}
    for i in order:
        a, b = blocks[i]
        shift[i] = len(new_tokens) - a
        new_tokens.extend(tokens[a:b])
    new_tokens.extend(tokens[end:])

    def moved(span, i):
        return (span[0] + shift[i], span[1] + shift[i])

    return dataclasses.replace(
        prompt, tokens=tuple(new_tokens),
        demo_input_spans=tuple(moved(prompt.demo_input_spans[i], i) for i in order),
        demo_label_spans=tuple(moved(prompt.demo_label_spans[i], i) for i in order),
        separator_spans=tuple(moved(prompt.separator_spans[i], i) for i in order),
        demo_labels=tuple(prompt.demo_labels[i] for i in order),
        demo_indices=tuple(prompt.demo_indices[i] for i in order) if len(prompt.demo_indices) == n else prompt.demo_indices,
    )


def rotated_demonstrations(prompts: Sequence) -> tuple[list, Int[Tensor, "batch demo"]]:
    """Each prompt with its demonstrations rotated by one (the first becomes the last, so every
    demonstration moves when there are at least two), and ``moved_to[b, i]``, the new position of
    demonstration i (-1: padding, or a prompt with fewer than two demonstrations)."""
    width = max([p.n_demos for p in prompts] + [1])
    moved_to = torch.full((len(prompts), width), -1, dtype=torch.long)
    out = []
    for b, p in enumerate(prompts):
        n = p.n_demos
        if n < 2:
            out.append(p)
            continue
        out.append(permute_demonstrations(p, [*range(1, n), 0]))
        moved_to[b, :n] = torch.tensor([(i - 1) % n for i in range(n)])
    return out, moved_to
