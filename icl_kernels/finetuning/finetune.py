"""The finetuning baseline of Dai et al.: train only the attention key and value projections.

The dual form of relaxed attention says that demonstrations act on a query like an update of
``W_K`` and ``W_V``. The baseline makes that update for real, in the original setup:

* a model in which only the key and value projections of every layer train (their
  weights, and their biases where the architecture has them: none of GPT-Neo, GPT-J, Llama or
  Gemma-3 does, so there only the weights train); everything else is frozen;
* plain SGD (no momentum, no weight decay), batch size 1, one epoch, no shuffling;
* the training examples are the ICL demonstrations in ICL order, each written with the ICL
  template (``[BOS] x_i y_i``, the exact tokens of the demonstration in the prompt, without the
  separator), and the loss is the LM loss over every token of the demonstration;
* the learning rate is chosen on a development split disjoint from the test split (`select_lr`),
  which the original did not do, and a rate that *collapses* on any development fold is rejected:
  either the upper 95% Wilson bound of its accuracy there is more than `COLLAPSE_MARGIN` = 0.25
  below the zero-shot accuracy on the same queries (`collapsed_folds`), or it answers every query
  of the fold with one label where the gold labels and the zero-shot answers there take two or
  more (`single_label_folds`: a constant classifier is no finetuned model to compare with ICL,
  however often the majority label happens to be right).

The model stays in eval mode (no dropout), so training is deterministic.

Both backends train their underlying weights: a HookedTransformer its ``W_K``/``W_V`` (``_W_K``/
``_W_V`` for grouped heads), a TransformerBridge the wrapped Hugging Face ``k_proj``/``v_proj``.
Training runs on the model itself and restores it afterwards; the finetuned weights are kept
and swapped in on demand (`FinetuneResult.applied`), so the finetuned model is read through the
same hooks as the original and nothing but the key/value weights is ever duplicated.

While training, the query vector of every training token is recorded at every layer (in the
position-free frame of `icl_kernels.finetuning.relaxation`: ``R(-t) q_t``), for the Kendall comparison of
`icl_kernels.finetuning.dai_metrics`.

Shared work. The first step of every run on one demonstration set starts from the original weights,
so its loss, gradient and recorded queries are the same at every learning rate: `first_step`
computes them once and ``finetune(..., first=)`` applies them instead of running that pass again,
giving the same weights bit for bit (``tests/unit/test_finetune.py``). At learning rate 0 no step is
taken, so no backward pass runs. `select_lr` can keep the chosen rate's results (``keep_best``) for
the caller to reuse instead of training them again. TransformerLens 3's ``Unembed`` copies the
transposed unembedding on every forward pass (``F.linear(residual, W_U.T.contiguous(), b_U)``; 0.7 s
for Gemma-3's 262k x 640 on one CPU thread); it is frozen here, so a run makes that copy once and
every pass multiplies by it: the same operation on the same values, so the same numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from icl_kernels.engine.hooks import (
    act_name,
    apply_rotary,
    attention_spec,
    hooks_on,
    rotary_hook_kinds,
    rotate_by,
)
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.architectures import architecture_of
from icl_kernels.utils.errors import LearningRateCollapseError
from icl_kernels.utils.stats import wilson_interval

__all__ = [
    "has_kv_bias",
    "kv_parameters",
    "kv_weights",
    "FinetuneResult",
    "FirstStep",
    "first_step",
    "finetune",
    "COLLAPSE_MARGIN",
    "DevScore",
    "collapsed_folds",
    "single_label_folds",
    "LrSelection",
    "select_lr",
    "DEFAULT_LRS",
]

#: Learning-rate grid for `select_lr` (the original's picks spanned 1.6e-4 .. 0.2).
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def has_kv_bias(model: tl_backend.Model) -> bool:
    """Whether the architecture's key/value projections have biases (as loaded from Hugging Face)."""
    config = tl_backend.hf_config(model)
    return architecture_of(config).has_kv_bias(config)


def kv_parameters(model: tl_backend.Model) -> dict[str, torch.nn.Parameter]:
    """The key/value projection parameters of every layer, by name (what the baseline trains).

    Raises:
        ValueError: none found, or a layer lacks its key or value projection.
    """
    bias = has_kv_bias(model)
    record = architecture_of(tl_backend.hf_config(model))
    chosen: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        leaf = parts[-1]
        if tl_backend.is_bridge(model):  # the wrapped Hugging Face modules, named by the record
            is_kv = record.hf_key_proj in parts or record.hf_value_proj in parts
            if is_kv and (leaf == "weight" or (bias and leaf == "bias")):
                chosen[name] = param
        elif ".attn." in name:
            if leaf in ("W_K", "W_V", "_W_K", "_W_V") or (bias and leaf in ("b_K", "b_V", "_b_K", "_b_V")):
                chosen[name] = param
    n_layers = model.cfg.n_layers
    per_kind = 2 * (2 if bias else 1)
    if len(chosen) != n_layers * per_kind:
        raise ValueError(
            f"Found {len(chosen)} key/value projection parameters, expected {n_layers * per_kind} "
            f"({n_layers} layers); names: {sorted(chosen)[:6]}..."
        )
    return chosen


def kv_weights(model: tl_backend.Model, layer: int) -> tuple[
    Float[Tensor, "kv_head d_model d_head"], Float[Tensor, "kv_head d_model d_head"]
]:
    """``W_K`` and ``W_V`` of one layer as ``[kv_head, d_model, d_head]`` on either backend."""
    spec = attention_spec(model, layer)
    key_proj = architecture_of(tl_backend.hf_config(model)).hf_key_proj
    params = kv_parameters(model)
    marker = f".{layer}."
    found = {}
    for name, param in params.items():
        if marker not in name or name.endswith("bias") or name.split(".")[-1].startswith(("b_", "_b_")):
            continue
        kind = "k" if (key_proj in name.split(".") or name.endswith("W_K")) else "v"
        if tl_backend.is_bridge(model):  # Linear weight [kv_head * d_head, d_model]
            w = param.detach().view(spec.n_kv_heads, spec.d_head, -1).transpose(1, 2)
        else:
            w = param.detach()
        found[kind] = w.clone(memory_format=torch.contiguous_format)  # a contiguous snapshot, not a view of the live parameter
    return found["k"], found["v"]


@dataclass
class FinetuneResult:
    """The finetuned key/value weights of a model and what training recorded.

    The finetuned model is the base model with ``state`` swapped in: use ``with result.applied() as
    tuned: ...``. Only the key/value projections differ, so this is the model a full copy would
    be, without copying the rest of it (and without deep-copying a TransformerBridge, whose
    internal capture hooks are closures that a copy would share with the original).

    Attributes:
        base: the original model (left untouched outside ``applied()``).
        state: finetuned key/value parameters by name (see `kv_parameters`).
        lr: learning rate used.
        losses: mean LM loss of each training sequence, before its step.
        queries: per training sequence, ``[layer, n_tokens, head_index, d_head]``: the query of every
            trained token (positions 1.. of the sequence), in the position-free frame.
    """

    base: tl_backend.Model
    state: dict[str, Tensor]
    lr: float
    losses: list[float]
    queries: list[Tensor] = field(default_factory=list)

    def all_queries(self) -> Float[Tensor, "layer n_tokens head_index d_head"]:
        """Queries of all training tokens, in training order."""
        return torch.cat(self.queries, dim=1) if self.queries else torch.empty(0)

    @contextlib.contextmanager
    def applied(self) -> Iterator[tl_backend.Model]:
        """The base model with the finetuned weights, restored on exit (also on error)."""
        with _swapped(self.base, self.state):
            yield self.base


@contextlib.contextmanager
def _swapped(model: tl_backend.Model, state: dict[str, Tensor]) -> Iterator[tl_backend.Model]:
    params = kv_parameters(model)
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"Finetuned weights {missing[:3]} do not belong to this model.")
    saved = {name: params[name].detach().clone() for name in state}
    try:
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


#: TransformerLens 3's ``Unembed.forward`` line that copies ``W_U.T`` on every call (`_unembed_copied_once`).
_TL_UNEMBED_LINE = "F.linear(residual, self.W_U.T.contiguous(), self.b_U)"
#: whether a training run copies the frozen unembedding once (False: TransformerLens' own forward every pass)
_COPY_UNEMBED_ONCE = True


@contextlib.contextmanager
def _unembed_copied_once(model: tl_backend.Model) -> Iterator[None]:
    """While inside, a HookedTransformer's ``Unembed`` multiplies by one copy of ``W_U.T`` made on entry
    instead of copying it on every pass (module docstring); only where its forward is the known line
    (`_TL_UNEMBED_LINE`) and ``W_U`` does not train. Elsewhere (the bridge) nothing changes."""
    unembed = getattr(model, "unembed", None)
    if not _COPY_UNEMBED_ONCE or tl_backend.is_bridge(model) or unembed is None or \
            getattr(getattr(unembed, "W_U", None), "requires_grad", True) or not _known_unembed(type(unembed)):
        yield
        return
    weight = unembed.W_U.detach().T.contiguous()

    def forward(residual: Tensor) -> Tensor:
        residual = unembed.hook_in(residual)
        return unembed.hook_out(torch.nn.functional.linear(residual, weight, unembed.b_U))

    unembed.forward = forward
    try:
        yield
    finally:
        del unembed.forward


def _known_unembed(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    return body[-3:] == ["residual = self.hook_in(residual)", f"result = {_TL_UNEMBED_LINE}",
                         "return self.hook_out(result)"]


def _lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), tokens[0, 1:], reduction="mean"
    )


@dataclass
class FirstStep:
    """What the first training sequence gives at the original weights, whatever the learning rate:
    the gradient of every trained parameter (by name, see `kv_parameters`), the loss and the
    recorded queries (``[layer, n_tokens, head_index, d_head]``). Made by `first_step`."""

    sequences: tuple[tuple[int, ...], ...]
    grads: dict[str, Tensor]
    loss: float
    queries: Tensor


def first_step(model: tl_backend.Model, sequences: Sequence[Sequence[int]]) -> FirstStep:
    """The forward and backward pass of the first of ``sequences`` at the model's weights, for
    ``finetune(..., first=)`` at any learning rate (module docstring: shared work).

    Raises:
        ValueError: as `finetune`.
    """
    captured: dict = {}
    _finetune(model, sequences[:1], 0.0, record_queries=True, first=None, capture=captured)
    return FirstStep(tuple(tuple(int(t) for t in seq) for seq in sequences), captured["grads"], captured["loss"],
                     captured["queries"])


def finetune(
    model: tl_backend.Model,
    sequences: Sequence[Sequence[int]],
    lr: float,
    *,
    record_queries: bool = True,
    first: FirstStep | None = None,
) -> FinetuneResult:
    """One epoch of batch-1 SGD on ``sequences`` (token ids, BOS first) over key/value projections only.

    Every token after the first is a target (LM loss over the whole demonstration). Training runs
    on ``model`` itself; its weights, ``requires_grad`` flags and gradients are restored on exit,
    also on error, and the finetuned weights are returned in the result.

    ``lr=0`` is the identity control of `icl_kernels.finetuning.dai_metrics`: the same forward passes
    run (and record the training queries) but no step is taken (and no backward pass), so the
    "finetuned" weights are exactly the original ones.

    ``first``: `first_step` of the same model (at its current weights) and sequences; its gradient,
    loss and queries stand in for the first pass (the same result bit for bit).

    Raises:
        ValueError: ``lr`` negative or not finite, no sequences, a sequence shorter than 2, or a
            ``first`` made from other sequences.
    """
    if first is not None and tuple(tuple(int(t) for t in seq) for seq in sequences) != first.sequences:
        raise ValueError("finetune(first=...) was given the first step of other training sequences; "
                         "make it with first_step(model, sequences) on the same sequences.")
    return _finetune(model, sequences, lr, record_queries=record_queries, first=first, capture=None)


def _finetune(
    model: tl_backend.Model,
    sequences: Sequence[Sequence[int]],
    lr: float,
    *,
    record_queries: bool,
    first: FirstStep | None,
    capture: dict | None,
) -> FinetuneResult:
    """`finetune`; with ``capture`` the gradients, loss and queries of the first pass are stored there
    (before any step)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0 (0: no step), not {lr!r}.")
    if not sequences:
        raise ValueError("finetune needs at least one training sequence (a demonstration).")
    short = [i for i, s in enumerate(sequences) if len(s) < 2]
    if short:
        raise ValueError(f"Training sequences {short} have fewer than 2 tokens: nothing to predict.")
    was_training = model.training
    model.eval()
    trainable = kv_parameters(model)
    keep = {id(p) for p in trainable.values()}
    flags = {id(param): (param.requires_grad, param.grad) for param in model.parameters()}
    saved = {name: p.detach().clone() for name, p in trainable.items()}
    device = tl_backend.model_device(model)
    n_layers = model.cfg.n_layers
    q_kind, _ = rotary_hook_kinds(model)
    losses: list[float] = []
    queries: list[Tensor] = []
    seen: dict[int, Tensor] = {}

    def keep_q(layer: int):
        def hook(q: Tensor, hook) -> None:
            seen[layer] = q.detach()

        return hook

    hooks = [(act_name(q_kind, layer), keep_q(layer)) for layer in range(n_layers)] if record_queries else []
    try:
        for param in model.parameters():
            param.requires_grad_(id(param) in keep)
            param.grad = None
        optimiser = torch.optim.SGD(list(trainable.values()), lr=float(lr), momentum=0.0, weight_decay=0.0)
        with hooks_on(model, hooks), _unembed_copied_once(model):
            for index, seq in enumerate(sequences):
                optimiser.zero_grad(set_to_none=True)
                if index == 0 and first is not None:  # the shared first pass (same gradient at every lr)
                    if lr > 0:
                        for name, param in trainable.items():
                            param.grad = first.grads[name].clone()
                        optimiser.step()
                    losses.append(first.loss)
                    if record_queries:
                        queries.append(first.queries)
                    continue
                tokens = torch.tensor([list(seq)], dtype=torch.long, device=device)
                loss = _lm_loss(model(tokens), tokens)
                if lr > 0 or capture is not None:  # at lr 0 the gradient would not be used
                    loss.backward()
                if capture is not None and index == 0:
                    capture.update(grads={name: p.grad.detach().clone() for name, p in trainable.items()},
                                   loss=float(loss.detach()))
                if lr > 0:
                    optimiser.step()
                losses.append(float(loss.detach()))
                if record_queries:
                    per_layer = []
                    positions = torch.arange(1, tokens.shape[1], device=device)
                    for layer in range(n_layers):
                        spec = attention_spec(model, layer)
                        q = seen.pop(layer)
                        if q_kind == "q":  # backends that fire no rotary hook: rotate here
                            q = apply_rotary(q, spec)
                        per_layer.append(rotate_by(q[0, 1:], spec, -positions))  # [n_tokens head d]
                    queries.append(torch.stack(per_layer).cpu())
                    if capture is not None and index == 0:
                        capture["queries"] = queries[-1]
        state = {name: p.detach().clone() for name, p in trainable.items()}
    finally:
        seen.clear()
        with torch.no_grad():
            for name, value in saved.items():
                trainable[name].copy_(value)
        for param in model.parameters():
            requires_grad, grad = flags.get(id(param), (False, None))
            param.requires_grad_(requires_grad)
            param.grad = grad
        model.train(was_training)
        _forget_graph(model, device)
    return FinetuneResult(base=model, state=state, lr=float(lr), losses=losses, queries=queries)


def _forget_graph(model: tl_backend.Model, device) -> None:
    """One tiny forward without gradients, so that no module keeps tensors of the training graph.

    A TransformerBridge keeps the last inputs of some submodules (its capture hooks); after a
    training step those would hold the autograd graph alive.
    """
    if not tl_backend.is_bridge(model):
        return
    with torch.no_grad():
        try:
            model(torch.zeros((1, 1), dtype=torch.long, device=device), return_type=None)
        except Exception:  # best effort: never mask the real result or error
            pass


#: How far (absolute accuracy) a learning rate must fall below zero-shot on one development fold
#: before `select_lr` calls it collapsed and rejects it (see `collapsed_folds`).
COLLAPSE_MARGIN = 0.25


@dataclass
class DevScore:
    """What the development split says of one learning rate: the pooled accuracy and mean gold
    log-probability, and per fold (one fold per demonstration set: the model finetuned on that set,
    scored on its development queries) the number right, the number of queries and the number of
    distinct labels the model answered (empty: not recorded, no single-label check)."""

    accuracy: float
    gold_log_prob: float
    fold_right: tuple[int, ...] = ()
    fold_size: tuple[int, ...] = ()
    fold_labels: tuple[int, ...] = ()


def collapsed_folds(
    fold_right: Sequence[int], fold_size: Sequence[int], zero_shot_accuracy: Sequence[float],
    margin: float = COLLAPSE_MARGIN,
) -> list[int]:
    """The folds on which finetuning *collapsed*: even the upper end of the 95% Wilson interval of the
    finetuned development accuracy (``fold_right / fold_size``) is more than ``margin`` below the
    zero-shot accuracy of the unfinetuned model on the same development queries.

    The Wilson bound keeps a fold of a few queries from calling one unlucky miss a collapse: with
    2 queries only 0 of 2 against a zero-shot 2 of 2 collapses (upper bound 0.658 < 1 - 0.25),
    while with 32 queries 3 right (9%, bound 0.24) against 85% zero-shot does.

    >>> collapsed_folds([29, 3, 1], [32, 32, 2], [0.85, 0.85, 1.0])
    [1]
    """
    if not len(fold_right) == len(fold_size) == len(zero_shot_accuracy):
        raise ValueError(
            f"{len(fold_right)} fold counts, {len(fold_size)} fold sizes and {len(zero_shot_accuracy)} zero-shot "
            "accuracies: give one of each per development fold."
        )
    out = []
    for i, (right, n, zs) in enumerate(zip(fold_right, fold_size, zero_shot_accuracy)):
        if n and wilson_interval(int(right), int(n))[1] < zs - margin:
            out.append(i)
    return out


def single_label_folds(
    fold_labels: Sequence[int], zero_shot_fold_labels: Sequence[int], gold_fold_labels: Sequence[int],
) -> list[int]:
    """The folds on which finetuning collapsed to a *constant answer*: the finetuned model gives one
    label to every development query of the fold, while the gold labels of those queries and the
    unfinetuned model's answers to them each take two or more values.

    Each argument holds, per fold, a number of distinct labels. A fold whose gold labels are all one
    class, or on which the unfinetuned model already gave one answer, is never flagged: the
    finetuning did not take a distinction away there.

    >>> single_label_folds([1, 2, 1, 1], [2, 2, 1, 2], [2, 2, 2, 1])
    [0]
    """
    if not len(fold_labels) == len(zero_shot_fold_labels) == len(gold_fold_labels):
        raise ValueError(
            f"{len(fold_labels)} finetuned, {len(zero_shot_fold_labels)} zero-shot and {len(gold_fold_labels)} gold "
            "label counts: give one of each per development fold."
        )
    return [i for i, (ft, zs, gold) in enumerate(zip(fold_labels, zero_shot_fold_labels, gold_fold_labels))
            if ft == 1 and zs >= 2 and gold >= 2]


@dataclass
class LrSelection:
    """The learning rate chosen on the development split, with every candidate's score.

    ``rejected`` maps each collapsed candidate to its collapsed folds (`collapsed_folds` and
    `single_label_folds` together);
    ``zero_shot_fold_accuracy`` is the baseline they were judged against (empty: no check).
    """

    lr: float
    table: list[dict]
    rejected: dict[float, list[int]] = field(default_factory=dict)
    zero_shot_fold_accuracy: tuple[float, ...] = ()
    margin: float = COLLAPSE_MARGIN
    #: ``train(lr)`` of the chosen rate, when `select_lr` was asked to keep it (``keep_best``)
    models: Sequence | None = None


def select_lr(
    train: Callable[[float], Sequence[FinetuneResult]],
    score: Callable[[Sequence[FinetuneResult]], DevScore | tuple[float, float]],
    lrs: Sequence[float] = DEFAULT_LRS,
    progress: Callable[[str], None] | None = None,
    *,
    zero_shot_fold_accuracy: Sequence[float] | None = None,
    margin: float = COLLAPSE_MARGIN,
    fold_names: Sequence[str] | None = None,
    zero_shot_fold_labels: Sequence[int] | None = None,
    gold_fold_labels: Sequence[int] | None = None,
    keep_best: bool = False,
) -> LrSelection:
    """Pick the learning rate with the best development accuracy (ties: higher mean gold log-prob),
    among those that did not collapse.

    ``train(lr)`` returns finetuning results (one per episode); ``score(results)`` returns a
    `DevScore` (or ``(accuracy, mean gold log-probability)``) on the development split, which must
    be disjoint from the test split. Given ``zero_shot_fold_accuracy`` (the unfinetuned model's
    accuracy on each fold's development queries), a candidate is *collapsed*, and rejected, when on
    any fold even the upper 95% Wilson bound of its accuracy is more than ``margin`` below that
    fold's zero-shot accuracy (`collapsed_folds`); given also ``zero_shot_fold_labels`` and
    ``gold_fold_labels`` (distinct labels per fold) and a `DevScore` with ``fold_labels``, also when
    on some fold it answers one label where both the gold and the zero-shot answers had two or more
    (`single_label_folds`). A learning rate that wrecks the model on one demonstration set is not
    rescued by the others' average.

    ``keep_best``: keep ``train(lr)`` of the chosen rate in ``LrSelection.models`` (only the best
    so far is held while searching).

    Raises:
        ValueError: no candidates, or fold accuracies missing or of the wrong number.
        LearningRateCollapseError: every candidate collapsed (the message names each lr and its folds).
    """
    if not lrs:
        raise ValueError("select_lr needs at least one learning rate.")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, not {margin!r}.")
    baseline = None if zero_shot_fold_accuracy is None else tuple(float(x) for x in zero_shot_fold_accuracy)
    table = []
    rejected: dict[float, list[int]] = {}
    best_models, best_key = None, None
    for lr in lrs:
        models = train(float(lr))
        result = score(models)
        if not isinstance(result, DevScore):
            result = DevScore(*result)
        accuracy, log_prob = result.accuracy, result.gold_log_prob
        if not math.isfinite(log_prob):
            log_prob = -math.inf
        row = dict(lr=float(lr), dev_accuracy=float(accuracy), dev_gold_log_prob=float(log_prob))
        if baseline is not None:
            if not len(result.fold_right) == len(result.fold_size) == len(baseline):
                raise ValueError(
                    f"The collapse check needs one dev count per fold: got {len(result.fold_right)} for "
                    f"{len(baseline)} zero-shot folds."
                )
            folds = collapsed_folds(result.fold_right, result.fold_size, baseline, margin)
            constant: list[int] = []
            if zero_shot_fold_labels is not None and gold_fold_labels is not None and result.fold_labels:
                constant = single_label_folds(result.fold_labels, zero_shot_fold_labels, gold_fold_labels)
                folds = sorted(set(folds) | set(constant))
            accuracy_by_fold = [r / n if n else math.nan for r, n in zip(result.fold_right, result.fold_size)]
            row.update(min_fold_accuracy=float(min(accuracy_by_fold)),
                       worst_fold_drop=float(max(zs - a for a, zs in zip(accuracy_by_fold, baseline))),
                       single_label_folds=" ".join(str(i) for i in constant),
                       collapsed_folds=" ".join(str(i) for i in folds), rejected=bool(folds))
            if folds:
                rejected[float(lr)] = folds
        table.append(row)
        if progress is not None:
            note = f" (collapsed on folds {rejected[float(lr)]})" if float(lr) in rejected else ""
            progress(f"lr {lr:g}: dev accuracy {accuracy:.3f}{note}")
        key = (row["dev_accuracy"], row["dev_gold_log_prob"])
        if keep_best and float(lr) not in rejected and (best_key is None or key > best_key):  # max() keeps the first
            best_models, best_key = models, key
        del models
    kept = [row for row in table if row["lr"] not in rejected]
    if not kept:
        names = list(fold_names) if fold_names is not None else None

        def fold_text(folds: list[int]) -> str:
            return ", ".join(f"{i} ({names[i]})" if names else str(i) for i in folds)

        detail = "; ".join(
            f"lr {lr:g} on fold(s) {fold_text(folds)}" for lr, folds in rejected.items()
        )
        raise LearningRateCollapseError(
            f"Every candidate learning rate collapsed on some development fold (upper 95% Wilson bound of the "
            f"fold's finetuned accuracy more than {margin:g} below its zero-shot accuracy, or one label answered to "
            f"every query where gold and zero-shot answers took two or more): {detail}. Give smaller candidates "
            "(--lrs), more development queries (--n-dev), or a fixed --lr."
        )
    best = max(kept, key=lambda row: (row["dev_accuracy"], row["dev_gold_log_prob"]))
    return LrSelection(lr=best["lr"], table=table, rejected=rejected, zero_shot_fold_accuracy=baseline or (),
                       margin=margin, models=best_models)
