"""The kernel-regression view of in-context learning (Han et al.), head by head.

Han et al. argue that an ICL prediction behaves like kernel regression over the demonstrations,

    y_hat(x) = sum_i y_i K(x, x_i) / sum_i K(x, x_i),

and that some attention heads compute it: the attention a_i that the prediction position pays to
demonstration i plays the role of K(x, x_i), and the label token y_i carries y_i. This module holds
the pieces of that test, each a pure function of tensors:

* **Demonstration attention** (`demo_attention`): from the prediction row of a head (see
  `icl_kernels.capture`) and the demonstration spans, a_i aggregated over demonstration i by
  ``"max"`` over the span [x_i, y_i] (the paper's choice), ``"mean"`` over that span, or ``"label"``:
  the summed attention on y_i's tokens only.
* **Reconstruction** (`class_votes`, `reconstruct`): the head's label is the argmax of the
  a-weighted class vote sum_i a_i [y_i = c] (the a-weighted label average for one-hot labels);
  an exact tie at the top (e.g. a local head that sees no demonstration) is an abstention (-1), which
  counts as wrong. Per head, **agreement** is the fraction of prompts where the reconstruction equals
  the model's own ICL prediction, **accuracy** the fraction where it equals the gold label.
* **Held-out selection** (`split_indices`, `select_best_head`): the best head is chosen on one
  split of the prompts (the paper: 700) and reported on the disjoint rest (300).
* **Kernel regression** (`kernel_regression`) with pluggable kernels (`Kernel`: exponentiated dot
  product, cosine, RBF) on any features: a head's query/key vectors, the residual stream at a layer,
  sentence embeddings (`icl_kernels.encoders`).
* **Kernel similarity** (`output_similarity`, `head_correlation`): per head, the Pearson correlation
  between a_i and P(o|x_test)^T P(o|x_i), the next-token distributions of single-example prompts.
* **Probes** (`ridge_probe_accuracy`): ridge regression (lambda 0.01) from keys or values at offsets
  around the label position to a class target, accuracy on held-out prompts.
* **The averaged attention map** (`resample_rows`): every piece of every prompt resampled to a fixed
  length, so rows of different prompts can be averaged (the paper's Figure 2).

`analyze_heads` is the driver: it runs a model over `icl_kernels.prompts.IclPrompt`s with
`icl_kernels.capture.capture` (one forward per batch) and returns a `HeadRun` of per-prompt tensors
from which every score above is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels import backend as tl_backend
from icl_kernels.capture import capture
from icl_kernels.evaluate import unembed
from icl_kernels.stats import split_indices

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
    "resample_rows",
    "Segment",
    "HeadRun",
    "analyze_heads",
    "head_kernel_regression",
    "resid_kernel_regression",
    "probe_accuracies",
    "held_out_best_head",
    "single_example_outputs",
    "demo_output_similarity",
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
        """From `icl_kernels.prompts.IclPrompt`s (x_i through y_i is ``prompt.demo_spans``)."""
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
    predictions: Int[Tensor, "batch *rest"], target: Int[Tensor, " batch"]
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
    """Held-out accuracy of a ridge-regression classifier, one per feature group.

    Each group (e.g. one (layer, head, offset)) fits W = argmin |X W + b - Y|^2 + lam |W|^2 on the
    ``train`` samples (one-hot targets, centred features and targets, unpenalised intercept) and
    predicts argmax on the other samples. Solved in whichever of the primal (d x d) or dual (n x n)
    form is smaller.
    """
    if train.all() or not train.any():
        raise ValueError("ridge_probe_accuracy needs both training and held-out samples.")
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
    pred = ((xte - mu_x) @ w + mu_y).argmax(-1)
    return (pred == targets[~train][None]).double().mean(-1).float()


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

    @property
    def n_prompts(self) -> int:
        return len(self.gold)

    @property
    def model_predictions(self) -> Tensor:
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
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> HeadRun:
    """Run ``model`` over k-shot ``prompts`` (one captured forward per batch) and keep per-prompt tensors.

    Args:
        model: a HookedTransformer or TransformerBridge.
        prompts: `icl_kernels.prompts.IclPrompt`s with ``query_label`` set (the gold class).
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
    """
    from icl_kernels.prompts import batches

    if any(p.query_label is None for p in prompts):
        raise ValueError("Every prompt needs query_label (the gold class) for head accuracy.")
    if not prompts:
        raise ValueError("analyze_heads needs at least one prompt.")
    device = tl_backend.model_device(model)
    if pad_token_id is None:
        tok = getattr(model, "tokenizer", None)
        pad_token_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    first_ids = torch.tensor([ids[0] for ids in label_ids], device=device)
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
    bar = tqdm(total=len(prompts), desc="heads", disable=not progress)
    for batch in batches(list(prompts), batch_size, pad_token_id, device):
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
            logits = unembed(model, cap.final_residual.to(device)).float()
        parts.setdefault("scores", []).append(logits.log_softmax(-1)[:, first_ids].cpu())
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
        for p in bp:
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

    return HeadRun(
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


def single_example_outputs(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 8,
) -> tuple[Float[Tensor, "batch vocab"], Int[Tensor, " batch"]]:
    """Next-token distribution P(o|x) over the whole vocabulary and the argmax label class, for
    zero-shot prompts (one example each, `PromptBuilder.build([], example)`)."""
    from icl_kernels.prompts import batches

    device = tl_backend.model_device(model)
    first_ids = torch.tensor([ids[0] for ids in label_ids], device=device)
    probs, preds = [], []
    for batch in batches(list(prompts), batch_size, pad_token_id, device):
        cap = capture(model, batch.tokens, batch.prediction_positions, attention=False, out_device=None)
        with torch.no_grad():
            logits = unembed(model, cap.final_residual).float()
        probs.append(logits.softmax(-1).cpu())
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
) -> tuple[Float[Tensor, "batch demo"], Int[Tensor, "batch demo"], Int[Tensor, " batch"]]:
    """For each ICL prompt: P(o|x_test)^T P(o|x_i) for its demonstrations (NaN for padding), the
    zero-shot label class of every x_i (-1 for padding) and of x_test.

    Each x is run alone as a zero-shot prompt of ``builder``; distributions over the full
    vocabulary are kept only for one chunk of prompts at a time.
    """
    n = len(query_examples)
    n_demo = max([len(d) for d in demo_examples] + [1])
    sim = torch.full((n, n_demo), float("nan"))
    demo_pred = torch.full((n, n_demo), -1, dtype=torch.long)
    query_pred = torch.full((n,), -1, dtype=torch.long)
    chunk = max(1, batch_size // (n_demo + 1)) if batch_size > n_demo else 1
    for start in tqdm(range(0, n, chunk), desc="single-example runs", disable=not progress):
        rows = list(range(start, min(n, start + chunk)))
        texts, owners = [], []
        for r in rows:
            texts.append(query_examples[r])
            owners.append((r, -1))
            for i, ex in enumerate(demo_examples[r]):
                texts.append(ex)
                owners.append((r, i))
        zero = [builder.build([], ex) for ex in texts]
        probs, preds = single_example_outputs(model, zero, builder.label_ids, pad_token_id=pad_token_id, batch_size=batch_size)
        query_at = {r: j for j, (r, i) in enumerate(owners) if i == -1}
        for j, (r, i) in enumerate(owners):
            if i == -1:
                query_pred[r] = preds[j]
            else:
                sim[r, i] = float(probs[query_at[r]].double() @ probs[j].double())
                demo_pred[r, i] = preds[j]
    return sim, demo_pred, query_pred
