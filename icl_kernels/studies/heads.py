"""``heads``: label-attention heads as kernel regression (Han et al.), end to end.

For a task's k-shot prompts (`icl_kernels.data.conditions.study_prompts`, under a `PromptCondition`),
the model runs once per batch (`icl_kernels.kernel.head_scan.analyze_heads`) and every head is scored: how
well the a-weighted vote over demonstration labels reconstructs the model's ICL prediction
(agreement) and the gold label (accuracy), for each aggregation of a_i (max over [x_i, y_i], mean,
label tokens). The best head is chosen on a seeded ``select_fraction`` of the prompts and reported
on the rest (``layer`` restricts that search to one layer). Baselines, on the same held-out prompts:
kernel regression on MiniLM sentence embeddings of the inputs (Han et al.'s Table 2 baseline), on
the residual stream at the best layer, on the best head's own query/key vectors, and the
demonstrations' majority label. Beside every head row, the **trivial baselines** that read only
the demonstration labels (last demonstration's label: recency; first: primacy; their majority) and
the constant model-majority predictor, and the head's agreement minus the best of them (chosen on
the selection split) with a paired bootstrap interval over prompts. The **order control**
(``order_control``) reruns every prompt with its demonstrations rotated by one and reports, per
head, whether its most-attended demonstration moves with its content or stays at its position. With ``similarity`` every x is also run alone, for the correlation
of a_i with P(o|x_test)^T P(o|x_i) (Figure 4), zero-shot accuracy, and ridge probes of keys
(target: the zero-shot class of x_i) and values (target: y_i) around the label position (Figure 5).

**Open-vocabulary tasks** (`icl_kernels.data.tasks.open_vocab.OpenVocabTask`) run when every answer
of the task is one token for the model's tokenizer (the letter tasks: capitalize/lowercase first/last
letter) and there are at most `icl_kernels.kernel.head_scan.MAX_OPEN_CLASSES` answers: the classes are the task's answers
(``task.answer_words``, every distinct answer in its data), demonstration labels and gold are answer
indices, and the model's prediction (``open_prediction``) is by default its top-1 token over the whole
vocabulary (``vocabulary``, as the papers score open tasks); a top-1 token that is none of the answers
is "no class", which no head vote or baseline equals, so it counts as a disagreement for every head and
every baseline (``icl_outside_rate`` reports how often it happens; ``model_majority`` is the most
frequent class prediction). ``open_prediction=answers`` takes the argmax over the answers' tokens
instead, exactly as a classification task with those answers as label words. Other open tasks (a
multi-token answer, e.g. country-capital; or too many answers for the per-class arrays, e.g.
capitalize's 26,838) are refused with the reason. Probes need a class target for every x and are off
on open tasks.

Phenomena and controls are options of the same study: ``selector=retrieval`` (nearest MiniLM
neighbours as demonstrations), ``label_format`` ``swapped`` (label words permuted among classes),
``arbitrary`` (unrelated words), ``flipped`` (demonstration labels shifted to the next class; gold
and label words unchanged), and ``control=input-permutation`` (the words of every demonstration
input shuffled; labels kept).

Tables: ``heads`` (split, aggregation, layer, head, agreement, accuracy, rank, the trivial
baselines' agreement, ``votes_last_label`` / ``votes_first_label`` and the head's margin over the
best: ``agreement_minus_best_trivial`` with ``_low``/``_high``), ``prompts`` (one row per prompt), ``order_control``, ``kernel_similarity`` and ``probes`` (with ``similarity``/``probes``); figures: head
heatmaps, the averaged attention map, kernel similarity and probes; ``view_data.json``: tokens, spans,
every head's attention row and vote for the first ``view_prompts`` prompts, which `icl-kernels view`
shows token by token (`icl_kernels.studies.view_data`).

`run` is these steps in order: `_search_layers`, the prompts (`study_prompts`), `_forward`, the
split, `_head_scores`, `_baselines`, `_trivial`, `_order_control` (with ``order_control``), `_similarity` (with ``similarity``) and `_report`; they pass
typed data (`Split`, `BestHead`, `HeadScores`, `Baselines`, `Similarity`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from icl_kernels.data.conditions import (
    SYNTHETIC_TASKS,
    PromptCondition,
    study_prompts,
    text_of,
)
from icl_kernels.data.prompts import pad_id
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.kernel.head_scan import (
    analyze_heads,
    check_open_task,
    demo_output_similarity,
    head_kernel_regression,
    probe_accuracies,
    probe_scored_pairs,
    resid_kernel_regression,
    rotated_demonstrations,
)
from icl_kernels.kernel.scores import (
    AGGREGATIONS,
    TRIVIAL_BASELINES,
    Kernel,
    agreement_minus_baseline,
    class_votes,
    head_correlation,
    heads_frame,
    held_out_best_head,
    kernel_regression,
    order_following,
    reconstruct,
    trivial_baselines,
)
from icl_kernels.models.encoders import minilm_encoder
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.studies.view_data import VIEW_DATA_FILE, view_data
from icl_kernels.utils.config import Options, PromptOptions
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.plotting import (
    attention_map_figure,
    layer_head_heatmaps,
    probe_figure,
)
from icl_kernels.utils.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    majority_share,
    mean_difference,
    paired_bootstrap,
    proportion,
    split_indices,
    wilson_interval,
)

__all__ = ["HeadsConfig", "HeadsReport", "run", "PROBE_OFFSETS", "OPEN_PREDICTIONS"]

#: Offsets from each label's first token at which keys and values are probed.
PROBE_OFFSETS = (-1, 0, 1, 2, 3)
#: The model's prediction on an open task: top-1 over the whole vocabulary, or argmax over the answers.
OPEN_PREDICTIONS = ("vocabulary", "answers")


@dataclass
class HeadsConfig(Options):
    """Options of one heads analysis (see the module docstring)."""

    supports_open_tasks: ClassVar[bool] = True

    model: ModelOptions = field(default_factory=ModelOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    condition: PromptCondition = field(default_factory=PromptCondition)
    batch_size: int = field(default=4, metadata={"help": "prompts per forward pass"})
    select_fraction: float = field(default=0.7, metadata={"help": "share of prompts used to choose the best head"})
    similarity: bool = field(default=True, metadata={
        "help": "single-example runs (kernel similarity, probes, zero-shot)"})
    probes: bool | None = field(default=None, metadata={
        "help": "key/value probes (need --similarity; default: on with it)"})
    kr_minilm: bool = field(default=True, metadata={
        "alias": "minilm", "help": "the MiniLM kernel-regression baseline"})
    layer: int | None = field(default=None, metadata={
        "help": "restrict the best-head search to one layer (default: all layers)"})
    order_control: bool = field(default=True, metadata={
        "help": "rerun with the demonstrations rotated by one: does each head follow content or position"})
    view_prompts: int = field(default=8, metadata={
        "identity": False,  # changes what is kept for display / how fast, not a number: not in the fingerprint
        "help": "prompts whose token-level attention goes to view_data.json for `icl-kernels view` (0: none)"})
    open_prediction: str = field(default="vocabulary", metadata={
        "choices": OPEN_PREDICTIONS,
        "help": "open-vocabulary tasks: the model's prediction is its top-1 token over the whole vocabulary "
                "(vocabulary; a token that is no answer counts as no class) or the argmax over the answers "
                "(answers); classification tasks always use the label words"})

    def __post_init__(self) -> None:
        problems = self.prompts.split_problems("head scores")
        if self.open_prediction not in OPEN_PREDICTIONS:
            problems.append(f"open_prediction must be one of {OPEN_PREDICTIONS}, not {self.open_prediction!r}")
        if self.prompts.task in SYNTHETIC_TASKS:
            if self.similarity or self.kr_minilm:
                problems.append("the synthetic world has no text for single-example runs or MiniLM: pass "
                                "--no-similarity --no-kr-minilm (similarity=false, kr_minilm=false)")
            if self.condition != PromptCondition():
                problems.append("prompt conditions (selector, label format, controls) apply to text tasks only")
        if not 0 < self.select_fraction < 1:
            problems.append(f"select_fraction must be in (0, 1), not {self.select_fraction}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, not {self.batch_size}")
        if self.probes and not self.similarity:
            problems.append("probes need the single-example runs of similarity=True (key targets)")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            problems.append(f"layer must be a layer index >= 0 or None (all layers), not {self.layer!r}")
        if isinstance(self.view_prompts, bool) or not isinstance(self.view_prompts, int) or self.view_prompts < 0:
            problems.append(f"view_prompts must be an integer >= 0, not {self.view_prompts!r}")
        if problems:
            raise InvalidOptionError("Invalid heads options: " + "; ".join(problems) + ".")

    @property
    def with_probes(self) -> bool:
        """Whether the key/value probes run (``probes``, by default on exactly when ``similarity`` is,
        and off on open-vocabulary tasks)."""
        if self.probes is None:
            return bool(self.similarity) and not self.open_task
        return bool(self.probes)

    @property
    def open_task(self) -> bool:
        """Whether ``task`` is an open-vocabulary task."""
        if self.prompts.task in SYNTHETIC_TASKS:
            return False
        return get_task(self.prompts.task).kind == "open"

    @property
    def prediction(self) -> str:
        """How `analyze_heads` reads the model's prediction (`icl_kernels.kernel.head_scan.PREDICTIONS`)."""
        return "vocabulary" if self.open_task and self.open_prediction == "vocabulary" else "labels"


def head_matrix(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, list[int], tuple[np.ndarray, np.ndarray]]:
    """``column`` of a heads table (one split and aggregation) as a [layer, head] matrix, its layer
    ids, and the 95% Wilson interval of each rate (from its ``n``)."""
    pivot = frame.pivot(index="layer", columns="head", values=column).sort_index()
    n = frame.pivot(index="layer", columns="head", values="n").sort_index().to_numpy()
    values = pivot.to_numpy()
    low, high = np.full(values.shape, np.nan), np.full(values.shape, np.nan)
    for idx in np.ndindex(values.shape):
        if np.isfinite(values[idx]) and n[idx] > 0:
            low[idx], high[idx] = wilson_interval(int(round(values[idx] * n[idx])), int(n[idx]))
    return values, [int(v) for v in pivot.index], (low, high)


@dataclass
class HeadsReport(Report):
    """Tables ``heads``, ``prompts``, ``kernel_similarity``, ``probes``; the summary of `run`.

    ``data`` holds the tensors the figures are drawn from (score matrices, the attention map) and
    ``view``, the token-level record of the first prompts (`icl_kernels.studies.view_data`).
    """

    data: dict[str, Any] = field(default_factory=dict, repr=False)

    def attachments(self) -> dict[str, Any]:
        view = self.data.get("view")
        return {VIEW_DATA_FILE: view} if view and view["prompts"] else {}

    def figures(self) -> dict[str, Any]:
        """Head maps on the report split (the held-out prompts the summary's rates are on), each next
        to its baseline, with 95% Wilson intervals on hover; the kernel-similarity and probe figures;
        the attention map when the run's tensors are at hand (``data``; not kept on disk)."""
        summary, data = self.summary, self.data
        heads = self.tables.get("heads")
        if heads is None or heads.empty:
            return {}
        b = summary["best_head"]["max"]
        mark = (b["layer"], b["head"])
        title = f"{summary['model']} on {summary['task']}, {summary['shots']} shots"
        held_out = summary.get("held_out") or {}
        figs = {}
        report = heads[(heads["split"] == "report") & (heads["aggregation"] == "max")]
        for column, share, what in (("agreement", "model_majority_share", "agreement with the model"),
                                    ("accuracy", "gold_majority_share", "accuracy vs gold")):
            matrix, layers, interval = head_matrix(report, column)
            baseline = (held_out.get(share) or {}).get("value")
            name = f"report split, n={summary.get('n_report', '?')}"
            figs[f"heads_{column}"] = layer_head_heatmaps(
                {name: matrix}, f"Head reconstruction {what} (best head marked; chosen on the selection split) - {title}",
                layers=layers, mark=mark, colorbar_title=column, intervals={name: interval},
                baselines=None if baseline is None else {name: baseline},
                baseline_name=f"baseline: always the {'model' if column == 'agreement' else 'gold'} majority label")
        if data.get("attention_map") is not None:
            figs["attention_map"] = attention_map_figure(
                data["attention_map"], data["segments"], title=f"Prediction-row attention, each x resampled - {title}",
                n_prompts=summary["attention_map_prompts"],
            )
        similarity = self.tables.get("kernel_similarity")
        if similarity is not None and not similarity.empty:
            corr, layers = {}, None
            for how, g in similarity.groupby("aggregation", sort=False):
                pivot = g.pivot(index="layer", columns="head", values="pearson").sort_index()
                corr[how], layers = pivot.to_numpy(), list(pivot.index)
            figs["kernel_similarity"] = layer_head_heatmaps(
                corr, f"Pearson(a_i, P(o|x)^T P(o|x_i)) per head (baseline 0: no relation) - {title}", diverging=True,
                mark=mark, layers=layers, colorbar_title="Pearson r")
        probes = self.tables.get("probes")
        if probes is not None and not probes.empty:
            offsets = sorted(int(o) for o in probes["offset"].unique())
            layers = sorted(int(v) for v in probes["layer"].unique())
            n_kv = int(probes["kv_head"].max()) + 1
            acc = {}
            for name, g in probes.groupby("probe", sort=False):
                arr = np.full((len(offsets), len(layers), n_kv), np.nan)
                for r in g.itertuples():
                    arr[offsets.index(int(r.offset)), layers.index(int(r.layer)), int(r.kv_head)] = r.accuracy
                acc[name] = arr
            figs["probes"] = probe_figure(acc, offsets, layers=layers, chance=None,
                                          title=f"Ridge probes (lambda 0.01) around the label position - {title}")
        return figs

    def line(self) -> str:
        summary = self.summary
        b = summary["best_head"]["max"]
        kr = summary["kernel_regression"]
        parts = [
            f"{summary['model']} on {summary['task']} ({summary['shots']} shots, {summary['n_prompts']} prompts,"
            f" select {summary['n_select']} / report {summary['n_report']})",
            f"ICL accuracy {summary['icl_accuracy']:.3f} (report {summary['icl_accuracy_report']:.3f})",
            f"best head L{b['layer']}.H{b['head']} (max): held-out agreement {b['report_agreement']:.3f}, "
            f"accuracy {b['report_accuracy']:.3f}",
        ]
        if "icl_outside_rate" in summary:
            parts.append(f"top-1 none of the answers on {summary['icl_outside_rate']:.3f} of prompts (no class)")
        if "minilm_cosine" in kr:
            parts.append(f"KR MiniLM cosine: accuracy {kr['minilm_cosine']['accuracy']:.3f}, "
                         f"agreement {kr['minilm_cosine']['agreement']:.3f}")
        if "zsl_accuracy" in summary:
            parts.append(f"zero-shot {summary['zsl_accuracy']:.3f}")
        held_out = summary.get("held_out") or {}
        if "trivial_baselines" in held_out:
            tb = held_out["trivial_baselines"]
            parts.append("trivial baselines (report agreement with the model): " + ", ".join(
                f"{name} {tb[name]['agreement']['value']:.3f}" for name in tb))
            d = held_out["best_head_minus_best_trivial"]["max"]
            parts.append(f"best head minus {held_out['best_trivial_baseline']} (chosen on select): "
                         f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
        order = summary.get("order_control")
        if order:
            o = order["max"]
            parts.append(f"order control (demonstrations rotated, n={o['n']}): {o['head']} follows content "
                         f"{o['follows_content']:.2f}, position {o['follows_position']:.2f}, vote unchanged "
                         f"{o['vote_unchanged']:.2f}; model prediction unchanged {order['model_prediction_unchanged']:.2f}")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# What passes between the steps
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Prompt indices: ``select`` chooses every best head, layer and baseline; ``report`` scores it."""

    select: np.ndarray
    report: np.ndarray


@dataclass
class BestHead:
    """The head of one aggregation with the best agreement on the selection prompts.

    Attributes:
        aggregation: how a_i is read from the attention (`icl_kernels.kernel.scores.AGGREGATIONS`).
        scores: `icl_kernels.kernel.scores.held_out_best_head`'s entry (layer, head, selection and
            report agreement/accuracy, split sizes): the summary's ``best_head`` entry.
        predictions: the head's reconstruction of the model's prediction on every prompt (-1: a tie).
    """

    aggregation: str
    scores: dict[str, Any]
    predictions: Int[Tensor, " batch"]

    @property
    def layer(self) -> int:
        return self.scores["layer"]

    @property
    def head(self) -> int:
        return self.scores["head"]

    @property
    def name(self) -> str:
        """``L{layer}.H{head}``."""
        return f"L{self.layer}.H{self.head}"

    @property
    def column(self) -> str:
        """Its column in the ``prompts`` table."""
        return f"head_{self.aggregation}_L{self.layer}H{self.head}"


@dataclass
class HeadScores:
    """Every head scored on each split (``frame``: the ``heads`` table) and the best head per aggregation."""

    by_split: dict[str, Any]
    frame: pd.DataFrame
    best: dict[str, BestHead]


@dataclass
class Baselines:
    """Kernel-regression baselines, chosen on the selection prompts and scored on the report prompts.

    Attributes:
        scores: name -> held-out agreement/accuracy/abstain (the summary's ``kernel_regression``).
        predictions: name -> per-prompt predictions of each baseline the best head is paired with.
        demo_majority: the demonstrations' majority label of each prompt.
        minilm: kernel label -> MiniLM kernel-regression predictions (empty without ``kr_minilm``).
    """

    scores: dict[str, dict]
    predictions: dict[str, Tensor]
    demo_majority: Int[Tensor, " batch"]
    minilm: dict[str, Tensor]


@dataclass
class Similarity:
    """Kernel similarity (Fig. 4), zero-shot predictions and key/value probes (Fig. 5).

    Attributes:
        zsl_pred: the zero-shot prediction of each prompt's query.
        corr: aggregation -> [layer, head] Pearson correlation of a_i with P(o|x)^T P(o|x_i).
        frame: the ``kernel_similarity`` table.
        probe_acc: probe name -> [offset, layer, kv_head] report accuracy (empty without probes).
        probe_frame: the ``probes`` table (None without probes).
        probe_targets: probe name -> (``"k"`` or ``"v"``, [batch, demo] target).
    """

    zsl_pred: Int[Tensor, " batch"]
    corr: dict[str, Tensor]
    frame: pd.DataFrame
    probe_acc: dict[str, Tensor] = field(default_factory=dict)
    probe_frame: pd.DataFrame | None = None
    probe_targets: dict[str, tuple[str, Tensor]] = field(default_factory=dict)


@dataclass
class Trivial:
    """Rules that read only the demonstration labels, and the constant model-majority predictor.

    Attributes:
        predictions: name (`icl_kernels.kernel.scores.TRIVIAL_BASELINES`) -> per-prompt prediction
            (-1: an abstention); ``model_majority`` is the model's most frequent prediction on the
            selection split, on every prompt.
        best: the baseline with the highest agreement with the model on the selection split (the
            one each head must beat).
    """

    predictions: dict[str, Tensor]
    best: str


@dataclass
class OrderControl:
    """The demonstrations rotated by one (`icl_kernels.kernel.head_scan.rotated_demonstrations`).

    Attributes:
        frame: the ``order_control`` table: per aggregation and head, on the report prompts, the
            share whose most-attended demonstration follows its content / stays at its position, and
            the share whose vote is unchanged.
        model_unchanged: share of report prompts whose model prediction is unchanged.
        votes: aggregation -> [prompt layer head] votes on the rotated prompts.
    """

    frame: pd.DataFrame
    model_unchanged: float
    votes: dict[str, Tensor]


# ------------------------------------------------------------------------------------------------
# Scoring helpers
# ------------------------------------------------------------------------------------------------


def _class_majority_share(predictions: np.ndarray, n_classes: int) -> float:
    """Share of the most frequent class among ``predictions`` (the agreement of the best constant
    class predictor); an open task's "no class" (``n_classes``) is no class a constant can predict.
    Equals `majority_share` when every prediction is a class."""
    values = np.asarray(predictions).ravel()
    if not values.size:
        return float("nan")
    return float(np.bincount(values, minlength=n_classes + 1)[:n_classes].max() / values.size)


def _rate(pred: torch.Tensor, target: torch.Tensor, rows) -> float:
    rows = torch.as_tensor(rows, dtype=torch.long)
    return float((pred[rows] == target[rows]).float().mean())


def _kr_entry(pred: torch.Tensor, model_pred, gold, report) -> dict:
    return {"agreement": _rate(pred, model_pred, report), "accuracy": _rate(pred, gold, report),
            "abstain": float((pred[torch.as_tensor(report)] < 0).float().mean())}


def _best_by_selection(candidates: dict, model_pred, gold, select, report) -> dict:
    """Among named prediction vectors, the one with the best agreement on ``select``; its report scores."""
    best_name, best_score = None, -1.0
    for name, pred in candidates.items():
        score = _rate(pred, model_pred, select)
        if score > best_score:
            best_name, best_score = name, score
    entry = _kr_entry(candidates[best_name], model_pred, gold, report)
    return {"chosen": best_name, "select_agreement": best_score, **entry}


def _best_heads(run, layers: tuple[int, ...], split: Split) -> dict[str, BestHead]:
    """Per aggregation: the head with the best agreement on ``select`` among ``layers``, scored on
    ``report``, with its reconstruction of every prompt's prediction."""
    first, last = layers[0], layers[-1] + 1
    best = {}
    for how in AGGREGATIONS:
        weights = run.demo_weights[how][:, first:last]
        entry = held_out_best_head(weights, run.demo_labels, run.model_predictions, run.gold, run.n_classes,
                                   split.select, split.report)
        entry["layer"] += first
        layer, head = entry["layer"], entry["head"]
        votes = class_votes(run.demo_weights[how][:, layer : layer + 1, head : head + 1], run.demo_labels, run.n_classes)
        best[how] = BestHead(how, entry, reconstruct(votes)[:, 0, 0])
    return best


def _minilm_baselines(sp, run, task, model_pred, gold, report) -> tuple[dict, dict]:
    """Kernel regression on MiniLM sentence embeddings of x_test and the x_i (three kernels)."""
    enc = minilm_encoder()
    n = run.n_prompts
    demo_rows = [[sp.pool[i] for i in p.demo_indices] for p in sp.icl]
    q_vec = torch.as_tensor(enc([text_of(task, sp.queries[p.query_index]) for p in sp.icl]))
    width = run.demo_labels.shape[1]
    d_vec = torch.zeros(n, width, q_vec.shape[1])
    for r, rows in enumerate(demo_rows):
        if rows:
            d_vec[r, : len(rows)] = torch.as_tensor(enc([text_of(task, x) for x in rows]))
    entries, preds = {}, {}
    for kernel in (Kernel("cosine"), Kernel("exp_dot", temperature=0.1), Kernel("rbf")):
        pred = reconstruct(kernel_regression(q_vec, d_vec, run.demo_labels, run.n_classes, kernel))
        preds[kernel.label] = pred
        entries[f"minilm_{kernel.label}"] = _kr_entry(pred, model_pred, gold, report)
    return entries, preds


def _held_out(hrun, report, head_preds: dict, kr_preds: dict, zsl_pred) -> dict[str, Any]:
    """Every held-out rate with its 95% Wilson interval, unit and n, and the baselines beside them.

    ``model_majority_share``: agreement of a constant predictor (the model's most frequent class on
    the same report prompts), the fair baseline of an agreement. ``*_minus_majority_share``: paired
    bootstrap over the report prompts of (head agreement - that share). ``best_head_minus_baseline``:
    paired bootstrap of (head agreement - baseline agreement) for every kernel-regression baseline
    (the demonstration-majority vote and MiniLM KR among them); abstentions count as disagreement.
    """
    rows = torch.as_tensor(report, dtype=torch.long)
    model_pred, gold = hrun.model_predictions[rows].numpy(), hrun.gold[rows].numpy()
    unit = "prompts"
    out: dict[str, Any] = {"unit": unit, "n": len(rows)}
    out["icl_accuracy"] = proportion(model_pred == gold, unit=unit)
    n_classes = hrun.n_classes
    out["model_majority_share"] = {"value": _class_majority_share(model_pred, n_classes), "n": len(rows), "unit": unit}
    out["icl_prediction_rate"] = np.bincount(model_pred, minlength=n_classes + 1)[:n_classes].tolist()
    if getattr(hrun, "vocab_predictions", None) is not None:
        out["icl_outside_rate"] = proportion(model_pred == n_classes, unit=unit)
    out["gold_majority_share"] = {"value": majority_share(gold), "n": len(rows), "unit": unit}
    if zsl_pred is not None:
        out["zsl_accuracy"] = proportion(zsl_pred[rows].numpy() == gold, unit=unit)

    def agrees(pred: torch.Tensor) -> np.ndarray:
        return (pred[rows].numpy() == model_pred).astype(float)  # an abstention (-1) never agrees

    def rates(pred: torch.Tensor) -> dict:
        p, agree = pred[rows].numpy(), agrees(pred)
        return {
            "agreement": proportion(agree > 0, unit=unit), "accuracy": proportion(p == gold, unit=unit),
            "abstain": proportion(p < 0, unit=unit),
            "agreement_minus_majority_share": paired_bootstrap(
                lambda a, m: float(a.mean() - _class_majority_share(m, n_classes)), [agree, model_pred], unit),
        }

    out["best_head"] = {how: rates(pred) for how, pred in head_preds.items()}
    out["kernel_regression"] = {name: rates(pred) for name, pred in kr_preds.items()}
    out["best_head_minus_baseline"] = {
        how: {name: paired_bootstrap(mean_difference, [agrees(pred), agrees(kr)], unit) for name, kr in kr_preds.items()}
        for how, pred in head_preds.items()
    }
    return out


def _trivial(hrun, split: Split) -> Trivial:
    """The trivial baselines of every prompt; the best one chosen on the selection split."""
    model_pred = hrun.model_predictions
    preds = trivial_baselines(hrun.demo_labels, hrun.n_classes)
    select = torch.as_tensor(split.select, dtype=torch.long)
    counts = np.bincount(model_pred[select].numpy(), minlength=hrun.n_classes + 1)[: hrun.n_classes]
    preds["model_majority"] = torch.full_like(model_pred, int(counts.argmax()))
    best = max(TRIVIAL_BASELINES, key=lambda name: (_rate(preds[name], model_pred, select), -TRIVIAL_BASELINES.index(name)))
    return Trivial(preds, best)


def _head_predictions(hrun) -> dict[str, Tensor]:
    """Every head's vote on every prompt, per aggregation: [prompt layer head] (-1: a tie)."""
    return {how: reconstruct(class_votes(w, hrun.demo_labels, hrun.n_classes)) for how, w in hrun.demo_weights.items()}


def _with_trivial(frame: pd.DataFrame, hrun, split: Split, trivial: Trivial, votes: dict[str, Tensor]) -> pd.DataFrame:
    """The ``heads`` table with, on every row, the trivial baselines' agreement on the row's split
    (``model_majority_share``: always the model's most frequent selection-split prediction), how
    often the head's own vote is the last / first demonstration's label (``votes_last_label``,
    ``votes_first_label``: a recency / primacy head scores near 1), and the head's agreement minus
    the best baseline's (chosen on the selection split; paired percentile
    bootstrap over the split's prompts)."""
    model_pred = hrun.model_predictions
    rows_of = {"select": split.select, "report": split.report, "all": np.arange(hrun.n_prompts)}
    n_heads = hrun.n_heads
    parts = []
    for (name, how), g in frame.groupby(["split", "aggregation"], sort=False):
        rows = torch.as_tensor(rows_of[name], dtype=torch.long)
        g = g.copy()
        for baseline in TRIVIAL_BASELINES:
            column = "model_majority_share" if baseline == "model_majority" else f"{baseline}_agreement"
            g[column] = _rate(trivial.predictions[baseline], model_pred, rows)
        g["best_trivial_baseline"] = trivial.best
        for rule in ("last_label", "first_label"):  # how often the head's vote is that rule's label (recency / primacy)
            same = (votes[how][rows] == trivial.predictions[rule][rows][:, None, None]).float().mean(0).flatten()
            g[f"votes_{rule}"] = same.numpy()[(g["layer"].to_numpy() - hrun.layers[0]) * n_heads + g["head"].to_numpy()]
        head_agree = (votes[how][rows] == model_pred[rows][:, None, None]).flatten(1).numpy()
        base_agree = (trivial.predictions[trivial.best][rows] == model_pred[rows]).numpy()
        value, low, high = agreement_minus_baseline(head_agree, base_agree, resamples=BOOTSTRAP_RESAMPLES,
                                                    seed=BOOTSTRAP_SEED)
        flat = (g["layer"].to_numpy() - hrun.layers[0]) * n_heads + g["head"].to_numpy()
        g["agreement_minus_best_trivial"] = value[flat]
        g["agreement_minus_best_trivial_low"] = low[flat]
        g["agreement_minus_best_trivial_high"] = high[flat]
        parts.append(g)
    return pd.concat(parts).loc[frame.index]


def _order_control(cfg: HeadsConfig, model, sp, hrun, split: Split, votes: dict[str, Tensor],
                   progress: bool) -> OrderControl:
    """Every prompt rerun with its demonstrations rotated by one: per head (report prompts), does its
    most-attended demonstration follow the content or stay at the position, and is its vote unchanged."""
    rotated, moved_to = rotated_demonstrations(sp.icl)
    prun = analyze_heads(model, rotated, sp.label_ids, batch_size=cfg.batch_size, pad_token_id=pad_id(model),
                         attention_map_length=None, progress=progress, prediction=cfg.prediction)
    report = torch.as_tensor(split.report, dtype=torch.long)
    width = min(hrun.demo_labels.shape[1], prun.demo_labels.shape[1], moved_to.shape[1])
    pvotes = _head_predictions(prun)
    records = []
    for how in hrun.demo_weights:
        follow = order_following(hrun.demo_weights[how][report][..., :width], prun.demo_weights[how][report][..., :width],
                                 moved_to[report][:, :width])
        unchanged = (pvotes[how][report] == votes[how][report]).float().mean(0)
        for li, layer in enumerate(hrun.layers):
            for h in range(hrun.n_heads):
                records.append(dict(aggregation=how, layer=layer, head=h, n=int(follow["n"][li, h]),
                                    follows_content=float(follow["follows_content"][li, h]),
                                    follows_position=float(follow["follows_position"][li, h]),
                                    vote_unchanged=float(unchanged[li, h]), n_report=len(report)))
    model_unchanged = float((prun.model_predictions[report] == hrun.model_predictions[report]).float().mean())
    return OrderControl(pd.DataFrame(records), model_unchanged, pvotes)


def _held_out_trivial(hrun, report, head_preds: dict, trivial: Trivial) -> dict[str, Any]:
    """The trivial baselines on the report prompts (Wilson intervals) and each best head's agreement
    minus the best of them (chosen on the selection split; paired bootstrap over report prompts)."""
    rows = torch.as_tensor(report, dtype=torch.long)
    model_pred, gold = hrun.model_predictions[rows].numpy(), hrun.gold[rows].numpy()
    unit = "prompts"

    def agrees(pred: torch.Tensor) -> np.ndarray:
        return (pred[rows].numpy() == model_pred).astype(float)

    rates = {name: {"agreement": proportion(agrees(pred) > 0, unit=unit),
                    "accuracy": proportion(pred[rows].numpy() == gold, unit=unit),
                    "abstain": proportion(pred[rows].numpy() < 0, unit=unit)}
             for name, pred in trivial.predictions.items()}
    best = agrees(trivial.predictions[trivial.best])
    return {
        "trivial_baselines": rates,
        "best_trivial_baseline": trivial.best,
        "best_head_minus_best_trivial": {
            how: paired_bootstrap(mean_difference, [agrees(pred), best], unit) for how, pred in head_preds.items()},
    }


def _order_summary(order: OrderControl, best: dict[str, BestHead]) -> dict[str, Any]:
    """The order control of each aggregation's best head, and how often the model's prediction survives."""
    out: dict[str, Any] = {"model_prediction_unchanged": order.model_unchanged}
    frame = order.frame
    for how, b in best.items():
        row = frame[(frame["aggregation"] == how) & (frame["layer"] == b.layer) & (frame["head"] == b.head)].iloc[0]
        out[how] = {"head": b.name, "n": int(row["n"]), "follows_content": float(row["follows_content"]),
                    "follows_position": float(row["follows_position"]), "vote_unchanged": float(row["vote_unchanged"])}
    out["note"] = ("demonstrations rotated by one (the first becomes the last), report prompts; follows_content: the "
                   "head's most-attended demonstration moves with its content, follows_position: it stays at its "
                   "position (only prompts where it moved count, n)")
    return out


def _probe_layers(cfg: HeadsConfig, hrun, select, report, targets: dict, probe_acc: dict) -> dict[str, Any]:
    """The best (layer, key/value head) per probe and offset, chosen on the selection prompts only.

    The selection prompts are halved (stream ``probe_layer_split``): a probe fit on one half is scored
    on the other to choose; the reported accuracy is that (layer, head)'s probe fit on all selection
    prompts and scored on the report prompts (the ``probes`` table). The summary's ``probes`` key
    instead takes the max of the report accuracies (chosen on the report split).
    """
    select = np.asarray(select)
    fit, choose = split_indices(len(select), 0.5, cfg.prompts.seed, stream="probe_layer_split")
    out: dict[str, Any] = {}
    for name, (which, target) in targets.items():
        masked = target.clone()
        masked[torch.as_tensor(report, dtype=torch.long)] = -1  # report prompts take no part in the choice
        sel_acc = probe_accuracies(hrun, masked, torch.as_tensor(select[fit]), which=which)
        entry = {}
        for oi, off in enumerate(hrun.probe_offsets):
            scores = torch.nan_to_num(sel_acc[oi], nan=-1.0)
            if float(scores.max()) < 0:
                continue
            j = int(scores.flatten().argmax())
            layer_i, kv = divmod(j, scores.shape[1])
            right, truth, prompt = probe_scored_pairs(hrun, target, select, oi, layer_i, kv, which=which)
            right, truth, prompt = right.numpy().astype(float), truth.numpy(), prompt.numpy()
            entry[f"{off:+d}"] = {
                "layer": int(hrun.layers[layer_i]), "kv_head": kv, "selection_accuracy": float(scores[layer_i, kv]),
                "report_accuracy": float(probe_acc[name][oi, layer_i, kv]),
                # the baseline it must beat: always answering the most frequent target of the scored pairs
                "report_majority_share": majority_share(truth),
                # 95% intervals: cluster bootstrap over report prompts (a prompt's pairs share its context)
                "report_accuracy_interval": paired_bootstrap(lambda r: float(r.mean()), [right], "prompts",
                                                             groups=prompt),
                "report_minus_majority_share": paired_bootstrap(
                    lambda r, t: float(r.mean() - majority_share(t)), [right, truth], "prompts", groups=prompt),
            }
        out[name] = entry
    out["note"] = ("layer and key/value head chosen on the selection prompts (probe fit on half, scored on "
                   "the other half); accuracy of that probe fit on all selection prompts, on the report prompts; "
                   "report_majority_share: accuracy of always answering the scored pairs' most frequent target; "
                   "intervals: cluster bootstrap over report prompts")
    return out



# ------------------------------------------------------------------------------------------------
# The steps of the study
# ------------------------------------------------------------------------------------------------


def _search_layers(cfg: HeadsConfig, model) -> tuple[int, ...]:
    """The layers the best head is chosen among: all of them, or ``cfg.layer`` (checked against the model)."""
    n_layers = model.cfg.n_layers
    if cfg.layer is not None and cfg.layer >= n_layers:
        raise InvalidOptionError(f"layer={cfg.layer} but the model has {n_layers} layers (0..{n_layers - 1}).")
    return tuple(range(n_layers)) if cfg.layer is None else (cfg.layer,)


def _forward(cfg: HeadsConfig, model, sp, progress: bool):
    """One forward pass per batch of ICL prompts: every head's a_i, the model's predictions, the
    residual stream after each layer, each head's query/key vectors and, for the probes, keys and
    values around each label (`icl_kernels.kernel.head_scan.HeadRun`)."""
    n_layers = model.cfg.n_layers
    return analyze_heads(
        model, sp.icl, sp.label_ids, batch_size=cfg.batch_size, pad_token_id=pad_id(model),
        head_features=True, resid_layers=tuple(range(n_layers)),
        probe_offsets=PROBE_OFFSETS if cfg.with_probes else (), keep_rows=cfg.view_prompts, progress=progress,
        prediction=cfg.prediction,
    )


def _head_scores(hrun, split: Split, search_layers: tuple[int, ...]) -> HeadScores:
    """Agreement and accuracy of every head on each split, ranked on the selection prompts; the best
    head per aggregation, chosen on the selection prompts and scored on the report prompts."""
    by_split = {"select": hrun.scores(split.select), "report": hrun.scores(split.report), "all": hrun.scores()}
    return HeadScores(by_split, heads_frame(by_split, rank_on="select"), _best_heads(hrun, search_layers, split))


def _baselines(cfg: HeadsConfig, sp, task, hrun, split: Split, search_layers: tuple[int, ...],
               best: BestHead) -> Baselines:
    """Kernel regression that the best head must beat, chosen on the selection split and scored held
    out: the demonstrations' majority vote, cosine KR on the residual stream (best layer), on each
    head's own query/key vectors (best head, and the best reconstruction head's), and on MiniLM."""
    model_pred, gold, select, report = hrun.model_predictions, hrun.gold, split.select, split.report
    scores: dict[str, Any] = {}
    ones = torch.ones_like(hrun.demo_weights["max"][:, :1, :1])
    majority = reconstruct(class_votes(ones, hrun.demo_labels, hrun.n_classes))[:, 0, 0]
    scores["demo_majority"] = _kr_entry(majority, model_pred, gold, report)
    resid = {f"layer {layer}": reconstruct(resid_kernel_regression(hrun, layer)) for layer in hrun.resid_layers}
    scores["resid_cosine_best_layer"] = _best_by_selection(resid, model_pred, gold, select, report)
    head_kr = {
        f"L{layer}.H{h}": reconstruct(head_kernel_regression(hrun, layer, h))
        for layer in search_layers for h in range(hrun.n_heads)
    }
    scores["head_qk_best_head"] = _best_by_selection(head_kr, model_pred, gold, select, report)
    scores["head_qk_of_best_reconstruction_head"] = _kr_entry(head_kr[best.name], model_pred, gold, report)
    minilm: dict[str, Tensor] = {}
    if cfg.kr_minilm:
        entries, minilm = _minilm_baselines(sp, hrun, task, model_pred, gold, report)
        scores.update(entries)
    predictions = {"demo_majority": majority, **{f"minilm_{k}": v for k, v in minilm.items()},
                   "resid_cosine_best_layer": resid[scores["resid_cosine_best_layer"]["chosen"]],
                   "head_qk_best_head": head_kr[scores["head_qk_best_head"]["chosen"]],
                   "head_qk_of_best_reconstruction_head": head_kr[best.name]}
    return Baselines(scores, predictions, majority, minilm)


def _similarity(cfg: HeadsConfig, model, sp, run, split: Split, progress: bool) -> Similarity:
    """Every x run alone: kernel similarity (Fig. 4), zero-shot predictions and key/value probes (Fig. 5)."""
    demo_rows = [[sp.pool[i] for i in p.demo_indices] for p in sp.icl]
    sim, zs_demo, zsl_pred = demo_output_similarity(
        model, sp.builder, [sp.queries[p.query_index] for p in sp.icl], demo_rows,
        pad_token_id=pad_id(model), batch_size=max(cfg.batch_size * 4, 8), progress=progress,
        prediction=cfg.prediction,
    )
    width = min(sim.shape[1], run.demo_labels.shape[1])
    valid = (run.demo_labels >= 0)[:, :width]
    corr, records = {}, []
    for how in AGGREGATIONS:
        corr[how] = head_correlation(run.demo_weights[how][..., :width], torch.nan_to_num(sim[:, :width]), valid)
        for li, layer in enumerate(run.layers):
            for h in range(run.n_heads):
                records.append({"aggregation": how, "layer": layer, "head": h, "pearson": float(corr[how][li, h])})
    out = Similarity(zsl_pred, corr, pd.DataFrame(records))
    if cfg.with_probes:
        train = torch.as_tensor(split.select)
        out.probe_targets = {"keys -> zero-shot class of x_i": ("k", zs_demo[:, :width]),
                             "values -> y_i": ("v", run.demo_labels)}
        out.probe_acc = {name: probe_accuracies(run, target, train, which=which)
                         for name, (which, target) in out.probe_targets.items()}
        records = []
        for name, acc in out.probe_acc.items():
            for oi, off in enumerate(run.probe_offsets):
                for li, layer in enumerate(run.layers):
                    for kv in range(acc.shape[2]):
                        records.append({"probe": name, "offset": off, "layer": layer, "kv_head": kv,
                                        "accuracy": float(acc[oi, li, kv])})
        out.probe_frame = pd.DataFrame(records)
    return out


def _prompt_table(hrun, split: Split, heads: HeadScores, baselines: Baselines,
                  similarity: Similarity | None, trivial: Trivial | None = None) -> pd.DataFrame:
    """One row per prompt: its split, size, gold label and every prediction (model, baselines, best heads)."""
    n = hrun.n_prompts
    split_of = np.full(n, "report", dtype=object)
    split_of[split.select] = "select"
    table = {
        "prompt": np.arange(n), "split": split_of, "query_index": [m["query_index"] for m in hrun.meta],
        "n_demos": [m["n_demos"] for m in hrun.meta], "prompt_tokens": [m["prompt_tokens"] for m in hrun.meta],
        "gold": hrun.gold.numpy(), "icl_pred": hrun.model_predictions.numpy(),
        "demo_majority": baselines.demo_majority.numpy(),
    }
    if trivial is not None:
        table["last_label"] = trivial.predictions["last_label"].numpy()
        table["first_label"] = trivial.predictions["first_label"].numpy()
    if similarity is not None:
        table["zsl_pred"] = similarity.zsl_pred.numpy()
    for best in heads.best.values():
        table[best.column] = best.predictions.numpy()
    for name, pred in baselines.minilm.items():
        table[f"kr_minilm_{name}"] = pred.numpy()
    return pd.DataFrame(table)


def _report(cfg: HeadsConfig, task, sp, hrun, split: Split, heads: HeadScores, baselines: Baselines,
            similarity: Similarity | None, started: float, tokenizer=None, trivial: Trivial | None = None,
            order: OrderControl | None = None) -> HeadsReport:
    """Tables, the summary (held-out rates beside their baselines) and the data of the figures."""
    zsl_pred = similarity.zsl_pred if similarity is not None else None
    corr = similarity.corr if similarity is not None else {}
    probe_acc = similarity.probe_acc if similarity is not None else {}
    summary = _summary(cfg, task, sp, hrun, split.select, split.report, heads.best, baselines.scores, zsl_pred,
                       corr, probe_acc)
    head_preds = {how: best.predictions for how, best in heads.best.items()}
    summary["held_out"] = _held_out(hrun, split.report, head_preds, baselines.predictions, zsl_pred)
    if trivial is not None:
        summary["held_out"].update(_held_out_trivial(hrun, split.report, head_preds, trivial))
    if order is not None:
        summary["order_control"] = _order_summary(order, heads.best)
    if probe_acc:
        summary["probes_selected_layer"] = _probe_layers(cfg, hrun, split.select, split.report,
                                                         similarity.probe_targets, probe_acc)
    summary["seconds"] = round(time.time() - started, 1)
    summary["note"] = (
        "Best heads are chosen by agreement on the 'select' prompts and scored on the disjoint 'report' "
        "prompts; kernel-regression baselines are scored on the 'report' prompts (their layer/head "
        "chosen on 'select')."
    )
    # added after the existing keys (issue 23): how every bootstrap interval above was drawn
    summary["interval_settings"] = {
        "rates": "wilson (95%)",
        "bootstrap": ("percentile bootstrap over the report prompts, paired (*_minus_*); probes_selected_layer: "
                      "cluster bootstrap with a report prompt's pairs as one cluster"),
        "level": 0.95, "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "stream": "bootstrap",
    }
    tables = {"heads": heads.frame, "prompts": _prompt_table(hrun, split, heads, baselines, similarity, trivial)}
    if order is not None:
        tables["order_control"] = order.frame
    if similarity is not None:
        tables["kernel_similarity"] = similarity.frame
        if similarity.probe_frame is not None:
            tables["probes"] = similarity.probe_frame
    words = summary["label_words"]
    if words is not None and getattr(hrun, "vocab_predictions", None) is not None:  # the model's "no class" answer, index n_classes
        words = [*words, "(none of the answers)"]
    data = {"select_scores": heads.by_split["select"], "attention_map": hrun.attention_map,
            "segments": hrun.segments, "corr": corr, "probe_acc": probe_acc, "probe_offsets": hrun.probe_offsets,
            "view": view_data(sp.icl, hrun, tables["prompts"]["split"].tolist(), tokenizer, words,
                              summary["model"], summary["task"])}
    return HeadsReport("heads", cfg, tables, summary, data=data)


def run(cfg: HeadsConfig, model=None, progress: bool = True) -> HeadsReport:
    """Run the whole heads analysis for one configuration (loads ``cfg.model`` unless given)."""
    started = time.time()
    synthetic = cfg.prompts.task in SYNTHETIC_TASKS
    task = None if synthetic else get_task(cfg.prompts.task)  # a bad task name fails before a model loads
    if task is not None and task.kind == "open":
        if cfg.probes:
            raise InvalidOptionError(f"Task {task.name!r} is an open-vocabulary task: the key probes' target (the "
                                     "zero-shot class of every x) is often none of the answers; pass --no-probes.")
        check_open_task(task)
    if model is None:
        model = cfg.model.load()
    if task is not None and task.kind == "open":
        check_open_task(task, model.tokenizer)
    search_layers = _search_layers(cfg, model)
    sp = study_prompts(model, cfg.prompts, cfg.condition, model_name=cfg.model.model)
    hrun = _forward(cfg, model, sp, progress)
    split = Split(*split_indices(hrun.n_prompts, cfg.select_fraction, cfg.prompts.seed))
    heads = _head_scores(hrun, split, search_layers)
    baselines = _baselines(cfg, sp, task, hrun, split, search_layers, heads.best["max"])
    trivial = _trivial(hrun, split)
    votes = _head_predictions(hrun)
    heads.frame = _with_trivial(heads.frame, hrun, split, trivial, votes)
    order = _order_control(cfg, model, sp, hrun, split, votes, progress) if cfg.order_control else None
    similarity = _similarity(cfg, model, sp, hrun, split, progress) if cfg.similarity else None
    return _report(cfg, task, sp, hrun, split, heads, baselines, similarity, started,
                   tokenizer=getattr(model, "tokenizer", None), trivial=trivial, order=order)


def _summary(cfg, task, sp, hrun, select, report, best: dict[str, BestHead], kr, zsl_pred, corr,
             probe_acc) -> dict[str, Any]:
    model_pred, gold = hrun.model_predictions, hrun.gold
    summary: dict[str, Any] = {
        "model": cfg.model.model, "task": task.name if task is not None else cfg.prompts.task, "shots": cfg.prompts.shots, "n_prompts": hrun.n_prompts,
        "seed": cfg.prompts.seed, "n_select": len(select), "n_report": len(report),
        "label_words": list(sp.builder.label_words) if sp.builder is not None else None, "label_format": cfg.condition.label_format,
        "control": cfg.condition.control, "selector": cfg.condition.selector,
        "n_layers": len(hrun.layers), "n_heads": hrun.n_heads, "prediction": cfg.prediction,
        "icl_accuracy": float((model_pred == gold).float().mean()),
        "icl_accuracy_report": _rate(model_pred, gold, report),
        "icl_prediction_rate": np.bincount(model_pred.numpy(), minlength=hrun.n_classes + 1)[: hrun.n_classes].tolist(),
        "mean_demos_used": float(np.mean([m["n_demos"] for m in hrun.meta])),
        "mean_prompt_tokens": float(np.mean([m["prompt_tokens"] for m in hrun.meta])),
        "best_head": {how: dict(b.scores) for how, b in best.items()},
        "kernel_regression": kr,
    }
    if getattr(hrun, "vocab_predictions", None) is not None:
        summary["icl_outside_rate"] = float((model_pred == hrun.n_classes).float().mean())
    if cfg.layer is not None:
        summary["layer"] = cfg.layer
    summary["best_head_max"] = best["max"].name
    if zsl_pred is not None:
        summary["zsl_accuracy"] = float((zsl_pred == gold).float().mean())
        summary["zsl_accuracy_report"] = _rate(zsl_pred, gold, report)
    if corr:
        c = torch.nan_to_num(corr["max"], nan=-2.0)
        j = int(c.flatten().argmax())
        summary["kernel_similarity"] = {
            "max_pearson": float(c.flatten()[j]), "at": f"L{hrun.layers[j // hrun.n_heads]}.H{j % hrun.n_heads}",
            "median_pearson": float(torch.nanmedian(corr["max"])),
            "pearson_of_best_reconstruction_head": float(corr["max"][best["max"].layer, best["max"].head]),
        }
    if probe_acc:
        summary["probes_note"] = ("probes: max over layers and key/value heads of the report-split accuracy "
                                  "(chosen on the report split); probes_selected_layer chooses on the selection split")
        summary["probes"] = {
            name: {f"{off:+d}": float(np.nanmax(acc[oi].numpy())) for oi, off in enumerate(hrun.probe_offsets)}
            for name, acc in probe_acc.items()
        }
    summary["attention_map_prompts"] = hrun.attention_map_n
    return summary


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('heads', (
    ('interval_settings\\.(level|resamples|seed)', 'how the bootstrap intervals were drawn: level, resamples, seed'),
    ('held_out\\.icl_accuracy', 'ICL accuracy of the model on the report (held-out) prompts'),
    ('held_out\\.zsl_accuracy', 'zero-shot accuracy on the report prompts (with `similarity`)'),
    ('held_out\\.(model|gold)_majority_share', 'share of the most frequent model prediction / gold label on the report prompts (the chance level of agreement / accuracy)'),
    ('held_out\\.best_head\\.\\w+\\.agreement', "best head (chosen on the selection split, per aggregation max/mean/label): how often its a-weighted label vote equals the model's prediction, report prompts"),
    ('held_out\\.best_head\\.\\w+\\.accuracy', "best head's label vote against the gold label, report prompts"),
    ('held_out\\.best_head\\.\\w+\\.abstain', "share of report prompts where the best head's vote is a tie (no prediction)"),
    ('held_out\\.best_head\\.\\w+\\.agreement_minus_majority_share', "best head's agreement minus the model's majority share (paired bootstrap)"),
    ('held_out\\.kernel_regression\\..+\\.\\w+', "a kernel-regression baseline (MiniLM embeddings, residual stream, the head's own query/key vectors, demonstration majority) on the report prompts: agreement, accuracy, abstain"),
    ('held_out\\.best_head_minus_baseline\\..*', "best head's agreement minus a baseline's, report prompts (paired bootstrap)"),
    ('held_out\\.trivial_baselines\\.\\w+\\.\\w+', "a trivial baseline on the report prompts (last_label: the last demonstration's label, first_label: the first's, demo_majority: their majority, model_majority: always the model's most frequent selection-split prediction): agreement with the model, accuracy, abstain (Wilson)"),
    ('held_out\\.best_head_minus_best_trivial\\.\\w+', "best head's agreement minus the best trivial baseline's (chosen on the selection split), report prompts (paired bootstrap)"),
    ('order_control\\.model_prediction_unchanged', "share of report prompts whose model prediction survives rotating the demonstrations by one"),
    ('order_control\\.\\w+\\.(follows_content|follows_position|vote_unchanged|n)', "best head under rotated demonstrations: share whose most-attended demonstration moves with its content / stays at its position (prompts where it moved, n), share with an unchanged vote"),
    ('best_head\\.\\w+\\.(select|report)_(agreement|accuracy)', "best head's agreement / accuracy on the selection or report split (numbers without intervals; `held_out` has the intervals)"),
    ('best_head\\.\\w+\\.(layer|head|n_select|n_report)', "the best head's position and the split sizes"),
    ('kernel_regression\\..*', 'kernel-regression baselines over all prompts (numbers without intervals)'),
    ('kernel_similarity\\..*', 'correlation of a_i with P(o|x_test)^T P(o|x_i) over heads (Figure 4; with `similarity`)'),
    ('probes(_selected_layer)?\\..*', 'ridge probes of keys (target: zero-shot class of x_i) and values (target: y_i) around the label position (Figure 5; with `similarity`)'),
    ('icl_accuracy(_report)?|zsl_accuracy(_report)?', 'ICL / zero-shot accuracy over all prompts (`_report`: report prompts only)'),
    ('(held_out\\.)?icl_prediction_rate\\[\\d+\\]', 'how often the model predicts label word i'),
    ('(held_out\\.)?icl_outside_rate', "open tasks with open_prediction=vocabulary: share of prompts whose top-1 token is none of the task's answers (no class; a disagreement for every head and baseline)"),
    ('n_prompts|n_select|n_report|n_layers|n_heads|shots|seed|held_out\\.n|attention_map_prompts', 'sizes: prompts, split sizes, layers, heads, demonstrations'),
    ('mean_demos_used|mean_prompt_tokens', 'mean demonstrations and tokens per prompt'),
))

register(
    "heads", HeadsConfig, run,
    help=builtin_help("heads"),
    description=__doc__.split("\n\n")[1],
)
