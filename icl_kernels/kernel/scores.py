"""The kernel-regression view of in-context learning (Han et al.), head by head.

Han et al. argue that an ICL prediction behaves like kernel regression over the demonstrations,

    y_hat(x) = sum_i y_i K(x, x_i) / sum_i K(x, x_i),

and that some attention heads compute it: the attention a_i that the prediction position pays to
demonstration i plays the role of K(x, x_i), and the label token y_i carries y_i. This module holds
the pieces of that test, each a pure function of tensors:

* **Demonstration attention** (`demo_attention`): from the prediction row of a head (see
  `icl_kernels.engine.capture`) and the demonstration spans, a_i aggregated over demonstration i by
  ``"max"`` over the span [x_i, y_i] (the paper's choice), ``"mean"`` over that span, or ``"label"``:
  the summed attention on y_i's tokens only.
* **Reconstruction** (`class_votes`, `reconstruct`): the head's label is the argmax of the
  a-weighted class vote sum_i a_i [y_i = c] (the a-weighted label average for one-hot labels);
  an exact tie at the top (e.g. a local head that sees no demonstration) is an abstention (-1), which
  counts as wrong. Per head, **agreement** is the fraction of prompts where the reconstruction equals
  the model's own ICL prediction, **accuracy** the fraction where it equals the gold label.
* **Trivial baselines** (`trivial_baselines`, `agreement_minus_baseline`): rules that read only the
  demonstration labels (the last demonstration's label: recency; the first's: primacy; their
  majority) and the constant model-majority predictor; every head's agreement minus the best of them,
  with a paired bootstrap interval over prompts, vectorised over heads.
* **Order control** (`order_following`): the demonstrations rotated by one; whether the demonstration
  a head attends to most moves with its content or stays at its position.
* **Held-out selection** (`select_best_head`, `held_out_best_head`): the best head is chosen on
  one split of the prompts (the paper: 700; `icl_kernels.utils.stats.split_indices`) and reported on the
  disjoint rest (300).
* **Kernel regression** (`kernel_regression`) with pluggable kernels (`Kernel`: exponentiated dot
  product, cosine, RBF) on any features: a head's query/key vectors, the residual stream at a layer,
  sentence embeddings (`icl_kernels.models.encoders`).
* **Kernel similarity** (`output_similarity`, `head_correlation`): per head, the Pearson correlation
  between a_i and P(o|x_test)^T P(o|x_i), the next-token distributions of single-example prompts.
* **Probes** (`ridge_probe_accuracy`): ridge regression (lambda 0.01) from keys or values at offsets
  around the label position to a class target, accuracy on held-out prompts.
* **The averaged attention map** (`resample_rows`): every piece of every prompt resampled to a fixed
  length, so rows of different prompts can be averaged (the paper's Figure 2).

Running a model to get these tensors is `icl_kernels.kernel.head_scan` (`analyze_heads`, `HeadRun`);
nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.utils.stats import rng

__all__ = [
    "AGGREGATIONS",
    "DemoLayout",
    "demo_attention",
    "class_votes",
    "reconstruct",
    "agreement",
    "HeadScores",
    "score_heads",
    "select_best_head",
    "heads_frame",
    "Kernel",
    "kernel_regression",
    "kr_predictions",
    "output_similarity",
    "head_correlation",
    "ridge_probe_accuracy",
    "ridge_probe_predictions",
    "resample_rows",
    "Segment",
    "held_out_best_head",
    "TRIVIAL_BASELINES",
    "trivial_baselines",
    "agreement_minus_baseline",
    "order_following",
]

Aggregation = Literal["max", "mean", "label"]
Rows = Sequence[int] | np.ndarray | Tensor  # prompt indices
AGGREGATIONS: tuple[str, ...] = ("max", "mean", "label")


# ------------------------------------------------------------------------------------------------
# Where the demonstrations are
# ------------------------------------------------------------------------------------------------


@dataclass
class DemoLayout:
    """Demonstration positions of a right-padded batch, as tensors.

    Attributes:
        demo_mask: positions of demonstration i from x_i through y_i (the paper's span).
        label_mask: positions of y_i's tokens.
        demo_labels: class of demonstration i, -1 where a row has fewer demonstrations.
        label_positions: first token of y_i, -1 for padding.
    """

    demo_mask: Bool[Tensor, "batch demo key_pos"]
    label_mask: Bool[Tensor, "batch demo key_pos"]
    demo_labels: Int[Tensor, "batch demo"]
    label_positions: Int[Tensor, "batch demo"]

    @property
    def valid(self) -> Bool[Tensor, "batch demo"]:
        return self.demo_labels >= 0

    @classmethod
    def from_spans(
        cls,
        demo_spans: Sequence[Sequence[tuple[int, int]]],
        label_spans: Sequence[Sequence[tuple[int, int]]],
        demo_labels: Sequence[Sequence[int]],
        width: int,
        n_demos: int | None = None,
    ) -> DemoLayout:
        """From per-row lists of [start, end) spans and labels (rows may have different counts)."""
        batch = len(demo_spans)
        n_demos = max([len(s) for s in demo_spans] + [0]) if n_demos is None else n_demos
        demo_mask = torch.zeros(batch, n_demos, width, dtype=torch.bool)
        label_mask = torch.zeros(batch, n_demos, width, dtype=torch.bool)
        labels = torch.full((batch, n_demos), -1, dtype=torch.long)
        label_pos = torch.full((batch, n_demos), -1, dtype=torch.long)
        for row in range(batch):
            if not len(demo_spans[row]) == len(label_spans[row]) == len(demo_labels[row]):
                raise ValueError(f"Row {row}: demo spans, label spans and labels differ in number.")
            if len(demo_spans[row]) > n_demos:
                raise ValueError(f"Row {row} has {len(demo_spans[row])} demonstrations, more than {n_demos}.")
            for i, ((s, e), (ls, le), y) in enumerate(zip(demo_spans[row], label_spans[row], demo_labels[row])):
                if not (0 <= s <= ls < le <= width and e >= le):
                    raise ValueError(f"Row {row}, demonstration {i}: bad spans {(s, e)} / label {(ls, le)}.")
                demo_mask[row, i, s:e] = True
                label_mask[row, i, ls:le] = True
                labels[row, i] = int(y)
                label_pos[row, i] = ls
        return cls(demo_mask, label_mask, labels, label_pos)

    @classmethod
    def from_prompts(cls, prompts: Sequence, width: int | None = None, n_demos: int | None = None) -> DemoLayout:
        """From `icl_kernels.data.prompts.IclPrompt`s (x_i through y_i is ``prompt.demo_spans``)."""
        width = max(len(p) for p in prompts) if width is None else width
        return cls.from_spans(
            [p.demo_spans for p in prompts], [p.demo_label_spans for p in prompts],
            [p.demo_labels for p in prompts], width, n_demos,
        )


# ------------------------------------------------------------------------------------------------
# Head scores (pure functions)
# ------------------------------------------------------------------------------------------------


def demo_attention(
    attention: Float[Tensor, "batch layer head_index key_pos"],
    layout: DemoLayout,
    how: str = "max",
) -> Float[Tensor, "batch layer head_index demo"]:
    """a_i: attention of the prediction position aggregated over each demonstration.

    ``how``: ``"max"`` over [x_i, y_i] (Han et al.), ``"mean"`` over [x_i, y_i], or ``"label"``
    (sum over y_i's tokens). Padding demonstrations get 0.

    >>> attn = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.25, 0.1]).view(1, 1, 1, 6)
    >>> layout = DemoLayout.from_spans([[(0, 3), (3, 5)]], [[(2, 3), (4, 5)]], [[0, 1]], width=6)
    >>> demo_attention(attn, layout, "max").flatten().tolist()
    [0.20000000298023224, 0.30000001192092896]
    >>> demo_attention(attn, layout, "label").flatten().tolist()
    [0.05000000074505806, 0.25]
    """
    if attention.shape[-1] != layout.demo_mask.shape[-1]:
        raise ValueError(
            f"attention covers {attention.shape[-1]} key positions but the layout {layout.demo_mask.shape[-1]}; "
            "build the layout with the batch's width."
        )
    if how not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {how!r}; choose from {AGGREGATIONS}.")
    mask = (layout.label_mask if how == "label" else layout.demo_mask).to(attention.device)
    a = attention[:, :, :, None, :]  # [b l h 1 k]
    m = mask[:, None, None, :, :]  # [b 1 1 d k]
    if how == "max":
        out = a.masked_fill(~m, float("-inf")).amax(-1)
        out = out.masked_fill(~mask.any(-1)[:, None, None, :], 0.0)
    elif how == "mean":
        total = (a * m).sum(-1)
        out = total / mask.sum(-1).clamp(min=1)[:, None, None, :]
    else:
        out = (a * m).sum(-1)
    return out


def class_votes(
    weights: Float[Tensor, "batch layer head_index demo"],
    demo_labels: Int[Tensor, "batch demo"],
    n_classes: int,
) -> Float[Tensor, "batch layer head_index n_classes"]:
    """sum_i a_i [y_i = c] for each class c (padding demonstrations, label -1, are ignored)."""
    if demo_labels.numel() and demo_labels.max() >= n_classes:
        raise ValueError(f"Demonstration labels go up to {int(demo_labels.max())} but n_classes={n_classes}.")
    onehot = torch.zeros(*demo_labels.shape, n_classes, dtype=weights.dtype, device=weights.device)
    valid = demo_labels >= 0
    onehot[valid] = torch.nn.functional.one_hot(demo_labels[valid], n_classes).to(weights.dtype)
    return torch.einsum("blhd,bdc->blhc", weights, onehot.to(weights.device))


def reconstruct(votes: Float[Tensor, "*batch n_classes"]) -> Int[Tensor, "*batch"]:
    """The argmax class of each vote vector; -1 where the top is an exact tie (an abstention).

    >>> reconstruct(torch.tensor([[0.2, 0.7], [0.0, 0.0], [0.5, 0.5]])).tolist()
    [1, -1, -1]
    """
    best = votes.argmax(-1)
    top = votes.max(-1, keepdim=True).values
    tied = (votes == top).sum(-1) > 1
    return best.masked_fill(tied, -1)


def agreement(
    predictions: Int[Tensor, " batch *rest"], target: Int[Tensor, " batch"]
) -> Float[Tensor, "*rest"]:
    """Fraction of rows where ``predictions`` equals ``target`` (per trailing index)."""
    if predictions.shape[0] == 0:
        raise ValueError("agreement of an empty set of prompts is undefined.")
    target = target.to(predictions.device).view(-1, *([1] * (predictions.ndim - 1)))
    return (predictions == target).float().mean(0)


@dataclass
class HeadScores:
    """Per-head agreement with the model and accuracy vs gold, per aggregation, on one set of prompts."""

    agreement: dict[str, Float[Tensor, "layer head_index"]]
    accuracy: dict[str, Float[Tensor, "layer head_index"]]
    n: int

    def best(self, aggregation: str = "max", metric: str = "agreement") -> tuple[int, int]:
        return select_best_head(getattr(self, metric)[aggregation])


def score_heads(
    demo_weights: dict[str, Float[Tensor, "batch layer head_index demo"]],
    demo_labels: Int[Tensor, "batch demo"],
    model_predictions: Int[Tensor, " batch"],
    gold: Int[Tensor, " batch"],
    n_classes: int,
    rows: Rows | None = None,
) -> HeadScores:
    """Agreement and accuracy matrices of every head for each aggregation, on ``rows`` (default all)."""
    index = torch.arange(len(gold)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if len(index) == 0:
        raise ValueError("score_heads needs at least one prompt.")
    agree, acc = {}, {}
    for how, weights in demo_weights.items():
        recon = reconstruct(class_votes(weights[index], demo_labels[index], n_classes))
        agree[how] = agreement(recon, model_predictions[index])
        acc[how] = agreement(recon, gold[index])
    return HeadScores(agree, acc, len(index))


def select_best_head(matrix: Float[Tensor, "layer head_index"]) -> tuple[int, int]:
    """(layer, head) of the largest entry; ties go to the earliest layer, then head."""
    flat = matrix.flatten()
    best = int(torch.nonzero(flat == flat.max())[0])
    return divmod(best, matrix.shape[1])


def held_out_best_head(
    demo_weights: Float[Tensor, "batch layer head_index demo"],
    demo_labels: Int[Tensor, "batch demo"],
    model_predictions: Int[Tensor, " batch"],
    gold: Int[Tensor, " batch"],
    n_classes: int,
    select_rows: Rows,
    report_rows: Rows,
    metric: str = "agreement",
) -> dict:
    """Choose the head with the best ``metric`` on ``select_rows`` only; report it on ``report_rows``.

    Returns ``{"layer", "head", "select_agreement", "select_accuracy", "report_agreement",
    "report_accuracy", "n_select", "n_report"}``. Nothing of ``report_rows`` enters the choice.
    """
    overlap = set(map(int, select_rows)) & set(map(int, report_rows))
    if overlap:
        raise ValueError(f"Selection and report prompts overlap ({len(overlap)} prompts); use disjoint splits.")
    weights = {"w": demo_weights}
    sel = score_heads(weights, demo_labels, model_predictions, gold, n_classes, select_rows)
    layer, head = select_best_head(getattr(sel, metric)["w"])
    rows = torch.as_tensor(list(report_rows), dtype=torch.long)
    recon = reconstruct(class_votes(demo_weights[rows][:, layer : layer + 1, head : head + 1], demo_labels[rows], n_classes))
    recon = recon[:, 0, 0]
    return dict(
        layer=layer, head=head,
        select_agreement=float(sel.agreement["w"][layer, head]), select_accuracy=float(sel.accuracy["w"][layer, head]),
        report_agreement=float((recon == model_predictions[rows]).float().mean()),
        report_accuracy=float((recon == gold[rows]).float().mean()),
        n_select=len(select_rows), n_report=len(rows),
    )


def heads_frame(
    scores: dict[str, HeadScores], layers: Sequence[int] | None = None, rank_on: str = "select"
) -> pd.DataFrame:
    """Tidy table: one row per (split, aggregation, layer, head) with agreement, accuracy and the
    head's rank by agreement on the ``rank_on`` split (1 = best; ties share the best rank)."""
    records = []
    for split, s in scores.items():
        for how in s.agreement:
            n_layers, n_heads = s.agreement[how].shape
            for li in range(n_layers):
                for h in range(n_heads):
                    records.append(dict(
                        split=split, aggregation=how,
                        layer=int(layers[li]) if layers is not None else li, head=h,
                        agreement=float(s.agreement[how][li, h]), accuracy=float(s.accuracy[how][li, h]),
                        n=s.n,
                    ))
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    ranked = frame[frame["split"] == rank_on] if rank_on in scores else frame[frame["split"] == next(iter(scores))]
    ranks = ranked.assign(rank=ranked.groupby("aggregation")["agreement"].rank(ascending=False, method="min").astype(int))
    frame = frame.merge(ranks[["aggregation", "layer", "head", "rank"]], on=["aggregation", "layer", "head"])
    return frame.sort_values(["split", "aggregation", "rank", "layer", "head"], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# Trivial baselines and the order control
# ------------------------------------------------------------------------------------------------

#: Rules that read only the demonstration labels (`trivial_baselines`), then the constant predictor.
TRIVIAL_BASELINES: tuple[str, ...] = ("last_label", "first_label", "demo_majority", "model_majority")


def trivial_baselines(demo_labels: Int[Tensor, "batch demo"], n_classes: int) -> dict[str, Int[Tensor, " batch"]]:
    """Per prompt: the last demonstration's label (``last_label``, recency), the first's
    (``first_label``, primacy) and the demonstrations' majority label (``demo_majority``; -1, an
    abstention, on a tie). Padding demonstrations (label -1) are skipped; a prompt without
    demonstrations gets -1.

    >>> labels = torch.tensor([[0, 1, 1], [1, 0, -1]])
    >>> {k: v.tolist() for k, v in trivial_baselines(labels, 2).items()}
    {'last_label': [1, 0], 'first_label': [0, 1], 'demo_majority': [1, -1]}
    """
    valid = demo_labels >= 0
    count = valid.sum(-1)
    rows = torch.arange(demo_labels.shape[0])
    last = torch.where(count > 0, demo_labels[rows, (count - 1).clamp(min=0)], -1)
    first = torch.where(count > 0, demo_labels[:, 0] if demo_labels.shape[1] else -1, -1)
    ones = valid.to(torch.float64)[:, None, None, :]
    majority = reconstruct(class_votes(ones, demo_labels, n_classes))[:, 0, 0]
    return {"last_label": last, "first_label": first, "demo_majority": majority}


def agreement_minus_baseline(
    head_agree: Bool[Tensor, "batch head"] | np.ndarray,
    baseline_agree: Bool[Tensor, " batch"] | np.ndarray,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each column's agreement minus the baseline's (paired: the same prompts), with a percentile
    bootstrap interval over prompts: ``(value, low, high)``, one entry per column. One resampled
    prompt set (stream ``bootstrap``, as `icl_kernels.utils.stats.paired_bootstrap` draws it) serves
    every column, as a resample count matrix, so thousands of heads cost one matrix product."""
    a = np.asarray(head_agree, dtype=np.float64)
    b = np.asarray(baseline_agree, dtype=np.float64)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"head_agree must be [prompt, head] and baseline_agree [prompt], not {a.shape} and {b.shape}.")
    n = a.shape[0]
    if n == 0:
        raise ValueError("agreement_minus_baseline needs at least one prompt.")
    diff = a - b[:, None]
    value = diff.mean(0)
    generator = rng("bootstrap", seed)
    counts = np.stack([np.bincount(generator.integers(0, n, size=n), minlength=n) for _ in range(resamples)])
    boot = counts @ diff / n  # [resample head]
    alpha = (1 - level) / 2
    return value, np.quantile(boot, alpha, axis=0), np.quantile(boot, 1 - alpha, axis=0)


def order_following(
    weights: Float[Tensor, "batch layer head_index demo"],
    permuted_weights: Float[Tensor, "batch layer head_index demo"],
    moved_to: Int[Tensor, "batch demo"],
) -> dict[str, Float[Tensor, "layer head_index"]]:
    """Where a head's most-attended demonstration goes when the demonstrations are reordered.

    ``moved_to[b, i]`` is the position demonstration i of prompt b takes in the permuted prompt
    (-1: padding). With i* the head's argmax demonstration in the original prompt and j* in the
    permuted one: ``follows_content`` is the share of prompts with j* = moved_to[i*] (the head
    tracks that demonstration's content), ``follows_position`` the share with j* = i* (it tracks the
    position, e.g. a recency head). Only prompts where demonstration i* moved count (``n``, per head).
    """
    valid = moved_to >= 0
    neg = torch.tensor(float("-inf"))
    w = weights.masked_fill(~valid[:, None, None, :], neg)
    wp = permuted_weights.masked_fill(~valid[:, None, None, :], neg)
    i_star = w.argmax(-1)  # [batch layer head]
    j_star = wp.argmax(-1)
    target = torch.gather(moved_to[:, None, None, :].expand_as(w), -1, i_star[..., None])[..., 0]
    moved = target != i_star
    n = moved.sum(0)
    content = ((j_star == target) & moved).sum(0) / n.clamp(min=1)
    position = ((j_star == i_star) & moved).sum(0) / n.clamp(min=1)
    nan = torch.tensor(float("nan"))
    return {"follows_content": torch.where(n > 0, content.float(), nan),
            "follows_position": torch.where(n > 0, position.float(), nan), "n": n}


# ------------------------------------------------------------------------------------------------
# Kernel regression
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A non-negative kernel K(x, x'), evaluated in log space for stability.

    ``name``:
      * ``"exp_dot"``: K = exp(<x, x'> / temperature) (attention's kernel; temperature = the score
        scale reproduces a head's softmax);
      * ``"cosine"``: K = (1 + cos(x, x')) / 2, in [0, 1];
      * ``"rbf"``: K = exp(-|x - x'|^2 / (2 bandwidth^2)); ``bandwidth=None`` takes, per query, the
        median distance to its demonstrations (the median heuristic).
    """

    name: str = "cosine"
    temperature: float = 1.0
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ("exp_dot", "cosine", "rbf"):
            raise ValueError(f"Unknown kernel {self.name!r}; choose exp_dot, cosine or rbf.")
        if self.temperature <= 0 or (self.bandwidth is not None and self.bandwidth <= 0):
            raise ValueError("Kernel temperature and bandwidth must be positive.")

    @property
    def label(self) -> str:
        if self.name == "exp_dot":
            return f"exp_dot(T={self.temperature:g})"
        if self.name == "rbf":
            return "rbf(median)" if self.bandwidth is None else f"rbf(s={self.bandwidth:g})"
        return "cosine"

    def log_kernel(
        self, query: Float[Tensor, "*batch d"], keys: Float[Tensor, "*batch n d"]
    ) -> Float[Tensor, "*batch n"]:
        query = query.double()
        keys = keys.double()
        if self.name == "exp_dot":
            return torch.einsum("...d,...nd->...n", query, keys) / self.temperature
        if self.name == "cosine":
            cos = torch.nn.functional.cosine_similarity(query.unsqueeze(-2), keys, dim=-1, eps=1e-12)
            return torch.log(((1 + cos) / 2).clamp(min=0))
        sq = ((query.unsqueeze(-2) - keys) ** 2).sum(-1)
        if self.bandwidth is None:
            width = sq.sqrt().median(dim=-1, keepdim=True).values.clamp(min=1e-12)
        else:
            width = torch.tensor(self.bandwidth, dtype=sq.dtype)
        return -sq / (2 * width**2)


def kernel_regression(
    query: Float[Tensor, "batch d"],
    keys: Float[Tensor, "batch demo d"],
    demo_labels: Int[Tensor, "batch demo"],
    n_classes: int,
    kernel: Kernel = Kernel(),
) -> Float[Tensor, "batch n_classes"]:
    """y_hat = sum_i onehot(y_i) K(x, x_i) / sum_i K(x, x_i); demonstrations with label -1 are ignored.

    Rows whose kernel weights are all zero get a uniform (tied) distribution.

    >>> q = torch.tensor([[1.0, 0.0]]); keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]])
    >>> kernel_regression(q, keys, torch.tensor([[1, 0, 1]]), 2, Kernel("cosine")).argmax(-1).tolist()
    [1]
    """
    log_k = kernel.log_kernel(query, keys)
    valid = (demo_labels >= 0).to(log_k.device)
    log_k = log_k.masked_fill(~valid, float("-inf"))
    empty = ~torch.isfinite(log_k).any(-1)
    weights = torch.softmax(log_k.masked_fill(empty[:, None], 0.0), dim=-1)
    weights = weights.masked_fill(~valid, 0.0)
    onehot = torch.zeros(*demo_labels.shape, n_classes, dtype=weights.dtype)
    onehot[demo_labels >= 0] = torch.nn.functional.one_hot(demo_labels[demo_labels >= 0], n_classes).to(weights.dtype)
    out = torch.einsum("bd,bdc->bc", weights, onehot.to(weights.device))
    out[empty] = 1.0 / n_classes
    return out.float()


def kr_predictions(probs: Float[Tensor, "batch n_classes"]) -> Int[Tensor, " batch"]:
    """Kernel-regression class (ties, e.g. no usable demonstration, abstain with -1)."""
    return reconstruct(probs)


# ------------------------------------------------------------------------------------------------
# Kernel similarity and probes
# ------------------------------------------------------------------------------------------------


def output_similarity(
    p_query: Float[Tensor, "batch vocab"], p_demos: Float[Tensor, "batch demo vocab"]
) -> Float[Tensor, "batch demo"]:
    """P(o|x_test)^T P(o|x_i) for each demonstration (distributions from single-example runs)."""
    return torch.einsum("bv,bdv->bd", p_query.double(), p_demos.double()).float()


def head_correlation(
    demo_weights: Float[Tensor, "batch layer head_index demo"],
    target: Float[Tensor, "batch demo"],
    valid: Bool[Tensor, "batch demo"],
    within_prompt: bool = False,
) -> Float[Tensor, "layer head_index"]:
    """Pearson correlation between each head's a_i and ``target`` over (prompt, demonstration) pairs.

    ``within_prompt``: centre both within each prompt first (removes prompt-level offsets), i.e. the
    pooled within-prompt correlation. A head whose a_i is constant gets NaN.
    """
    a = demo_weights.double()
    t = target.double()[:, None, None, :].expand_as(a)
    m = valid[:, None, None, :].expand_as(a).to(a.dtype)
    if within_prompt:
        count = m.sum(-1, keepdim=True).clamp(min=1)
        a = a - (a * m).sum(-1, keepdim=True) / count
        t = t - (t * m).sum(-1, keepdim=True) / count
    n = m.sum(dim=(0, 3))
    mean_a = (a * m).sum(dim=(0, 3)) / n
    mean_t = (t * m).sum(dim=(0, 3)) / n
    da = (a - mean_a[None, :, :, None]) * m
    dt = (t - mean_t[None, :, :, None]) * m
    cov = (da * dt).sum(dim=(0, 3))
    denom = torch.sqrt((da**2).sum(dim=(0, 3)) * (dt**2).sum(dim=(0, 3)))
    out = cov / denom
    out[denom <= 1e-300] = float("nan")
    return out.float()


def ridge_probe_accuracy(
    features: Float[Tensor, "group sample d"],
    targets: Int[Tensor, " sample"],
    train: Bool[Tensor, " sample"],
    n_classes: int,
    lam: float = 0.01,
) -> Float[Tensor, " group"]:
    """Held-out accuracy of a ridge-regression classifier, one per feature group
    (`ridge_probe_predictions` scored against the held-out targets)."""
    pred = ridge_probe_predictions(features, targets, train, n_classes, lam)
    return (pred == targets[~train][None]).double().mean(-1).float()


def ridge_probe_predictions(
    features: Float[Tensor, "group sample d"],
    targets: Int[Tensor, " sample"],
    train: Bool[Tensor, " sample"],
    n_classes: int,
    lam: float = 0.01,
) -> Int[Tensor, "group held_out"]:
    """A ridge-regression classifier's predictions on the held-out samples, one per feature group.

    Each group (e.g. one (layer, head, offset)) fits W = argmin |X W + b - Y|^2 + lam |W|^2 on the
    ``train`` samples (one-hot targets, centred features and targets, unpenalised intercept) and
    predicts argmax on the other samples, in their order. Solved in whichever of the primal (d x d)
    or dual (n x n) form is smaller.
    """
    if train.all() or not train.any():
        raise ValueError("A ridge probe needs both training and held-out samples.")
    x = features.double()
    y = torch.nn.functional.one_hot(targets, n_classes).double()
    xtr, xte = x[:, train], x[:, ~train]
    ytr = y[train]
    mu_x = xtr.mean(1, keepdim=True)
    mu_y = ytr.mean(0, keepdim=True)
    xc = xtr - mu_x
    yc = (ytr - mu_y)[None].expand(x.shape[0], -1, -1)
    n, d = xc.shape[1], xc.shape[2]
    # The Gram matrices are symmetric positive definite (lam > 0): solve by Cholesky. (Batched
    # torch.linalg.solve, an LU, fails inside MKL on torch 2.13 CPU with more than one thread.)
    if d <= n:
        gram = xc.transpose(1, 2) @ xc + lam * torch.eye(d, dtype=x.dtype)
        w = torch.cholesky_solve(xc.transpose(1, 2) @ yc, torch.linalg.cholesky(gram))
    else:
        gram = xc @ xc.transpose(1, 2) + lam * torch.eye(n, dtype=x.dtype)
        w = xc.transpose(1, 2) @ torch.cholesky_solve(yc.contiguous(), torch.linalg.cholesky(gram))
    return ((xte - mu_x) @ w + mu_y).argmax(-1)


# ------------------------------------------------------------------------------------------------
# The averaged attention map (Figure 2)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One piece of the resampled prompt layout (``x_3`` is the third demonstration input)."""

    name: str
    length: int


def _resample(values: Tensor, length: int) -> Tensor:
    """[..., n] -> [..., length]: linear interpolation; a length-1 target keeps the sum (mass)."""
    if length == 1:
        return values.sum(-1, keepdim=True)
    if values.shape[-1] == 0:
        return values.new_zeros(*values.shape[:-1], length)
    flat = values.reshape(-1, 1, values.shape[-1]).float()
    if values.shape[-1] == 1:
        out = flat.expand(-1, -1, length)
    else:
        out = torch.nn.functional.interpolate(flat, size=length, mode="linear", align_corners=True)
    return out.reshape(*values.shape[:-1], length).to(values.dtype)


def resample_rows(
    attention: Float[Tensor, "batch layer head_index key_pos"],
    prompts: Sequence,
    input_length: int = 30,
) -> tuple[Float[Tensor, "batch layer head_index resampled"], list[Segment]]:
    """Put prediction rows of prompts of different lengths on one axis.

    Every prompt must have the same number of demonstrations. The axis is ``[bos] x_1 y_1 sep_1 ...
    x_k y_k sep_k query``: each x_i and the query are linearly resampled to ``input_length`` points
    (the paper used 30); BOS, label and separator pieces become one point holding their summed
    attention.
    """
    counts = {p.n_demos for p in prompts}
    if len(counts) != 1:
        raise ValueError(f"resample_rows needs prompts with one number of demonstrations, got {sorted(counts)}.")
    segments: list[Segment] = []
    first = prompts[0]
    if first.bos_position is not None:
        segments.append(Segment("bos", 1))
    for i in range(first.n_demos):
        segments += [Segment(f"x_{i + 1}", input_length), Segment(f"y_{i + 1}", 1), Segment(f"sep_{i + 1}", 1)]
    segments.append(Segment("query", input_length))
    out = []
    for row, prompt in enumerate(prompts):
        if (prompt.bos_position is not None) != (first.bos_position is not None):
            raise ValueError("resample_rows needs every prompt to have (or lack) a BOS token.")
        spans = [] if prompt.bos_position is None else [(0, 1)]
        for x, y, sep in zip(prompt.demo_input_spans, prompt.demo_label_spans, prompt.separator_spans):
            spans += [x, y, sep]
        spans.append(prompt.query_span)
        pieces = [
            _resample(attention[row, :, :, s:e], seg.length) for (s, e), seg in zip(spans, segments)
        ]
        out.append(torch.cat(pieces, dim=-1))
    return torch.stack(out), segments
