"""The ``causal`` study: do the label-attention heads matter when they are ablated or patched?

One model and task (or the synthetic world the model was trained on). With ``layer`` unset, heads
are ranked by label-attention agreement on a selection split, and on the disjoint report split the
top-k heads are ablated (vs ``random_draws`` random k-head sets) and their ICL outputs patched into
the zero-shot run; with ``layer_sweep`` the same for every layer's heads, one layer at a time
(`icl_kernels.families.head_ablation.causal_study`). With ``layer`` set (what a per-layer sweep cell runs), every
head of that one layer is ablated and patched on all prompts (`icl_kernels.families.head_ablation.layer_study`).

Report: tables ``ranking`` (heads on the selection split), ``effects`` (one row per prompt and
condition), ``conditions`` (one row per condition, Wilson and bootstrap intervals; named ``summary``,
``summary.csv``, in runs written before the long ``summary.csv``) and ``layers`` (the per-layer
sweep); ``summary.json`` (sizes, clean accuracies, chosen heads, configuration) and ``summary.csv``
(its numbers and each condition's accuracy, agreement, drop and recovery, one row each);
figures of the accuracy drop (top-k vs random heads) and of the per-layer sweep.

    icl-kernels causal --model synthetic-gpt-neo --task synthetic-world --shots 16 --n-test 600 \\
        --k 3 --random-draws 10 --batch-size 50 --out results/causal-synthetic

Open-vocabulary tasks (`icl_kernels.data.tasks.open_vocab.OpenVocabTask`): accuracy is top-1
first-token accuracy over the whole vocabulary under the same edits (``summary.json`` ``scoring``).
Ranking heads by label-vote agreement needs every answer to be one token and at most
`icl_kernels.kernel.head_scan.MAX_OPEN_CLASSES` answers (the letter tasks); other open tasks are refused
with the reason, except with ``layer`` (one layer's heads, nothing ranked), which takes any open task.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from icl_kernels.data.conditions import SYNTHETIC_TASKS, study_prompts
from icl_kernels.data.prompts import gold_answer_ids
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.families.head_ablation import CausalConfig, causal_study, layer_study
from icl_kernels.kernel.head_scan import check_open_task
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.utils.config import Options, PromptOptions
from icl_kernels.utils.errors import InvalidOptionError

__all__ = ["CausalStudyConfig", "CausalReport", "run"]


@dataclass
class CausalStudyConfig(Options):
    """Model, prompts, the `CausalConfig` options (its seed is ``prompts.seed``) and an optional layer."""

    supports_open_tasks: ClassVar[bool] = True

    model: ModelOptions = field(default_factory=ModelOptions)
    prompts: PromptOptions = field(default_factory=lambda: PromptOptions(shots=4, n_test=80))
    causal: CausalConfig = field(default_factory=CausalConfig)
    layer: int | None = field(default=None, metadata={
        "help": "ablate / patch all heads of this one layer on all prompts, instead of ranking heads"})

    def __post_init__(self) -> None:
        problems = self.prompts.split_problems("causal tests")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            problems.append(f"layer must be a non-negative layer index or unset, not {self.layer!r}")
        if problems:
            raise InvalidOptionError("Invalid causal-study options: " + "; ".join(problems) + ".")
        self.causal.seed = self.prompts.seed  # one seed for prompts, split, random heads and bootstrap


@dataclass
class CausalReport(Report):
    """Tables ``ranking``, ``effects``, ``conditions``, ``layers``; ``summary.json`` as described above."""

    volatile_keys: ClassVar[tuple[str, ...]] = ("elapsed_s",)

    def line(self) -> str:
        s = self.summary
        cfg = self.config
        head = f"{cfg.model.model} / {cfg.prompts.task}, {cfg.prompts.shots} shots, {cfg.causal.ablation}-ablation"
        if cfg.layer is not None:
            return (f"{head}, layer {cfg.layer}: ICL accuracy {s['icl_accuracy']:.3f}, zero-shot {s['zsl_accuracy']:.3f}, "
                    f"ablated {s['ablated_accuracy']:.3f}, recovery {s['recovery']:.3f} (n={s['n']}), {s['elapsed_s']} s")
        lines = [f"{head}, k={cfg.causal.k}: ICL accuracy {s['icl_accuracy']:.3f}, zero-shot {s['zsl_accuracy']:.3f} "
                 f"(report split, n={s['n_report']}), {s['elapsed_s']} s"]
        if "conditions" in self.tables:
            lines += condition_lines(self.tables["conditions"], cfg.causal)
        return "\n".join(lines)

    def row(self) -> dict[str, Any]:
        """One flat row: the layer metrics, or the headline conditions of the whole-model study (the
        headline ablation unprefixed, the other ablations as ``top_<kind>_...``, the reverse patch as
        ``reverse_...``)."""
        if self.config.layer is not None:
            skip = {"model", "task", "shots", "layer", "scoring", *self.volatile_keys}
            return {k: v for k, v in self.summary.items() if k not in skip}
        info = self.summary
        c = self.config.causal
        s = self.tables["conditions"].set_index("condition")
        draws = c.random_draws
        top = s.loc["ablate top"]
        patch = s.loc["patch top into zsl"]
        out = dict(
            n_report=info["n_report"], icl_accuracy=info["icl_accuracy"], zsl_accuracy=info["zsl_accuracy"],
            top_heads=json.dumps(info["top_heads"]),
            top_ablated_accuracy=top["accuracy"], top_drop=top["accuracy_drop"], top_drop_low=top["drop_low"],
            top_drop_high=top["drop_high"], top_agreement=top["agreement_icl"],
            top_agreement_low=top["agreement_low"], top_agreement_high=top["agreement_high"],
            top_recovery=patch["recovery"], top_recovery_low=patch["recovery_low"], top_recovery_high=patch["recovery_high"],
            icl_gain=patch["icl_gain"], icl_gain_low=patch["icl_gain_low"], icl_gain_high=patch["icl_gain_high"],
        )
        for kind in c.ablations[1:]:
            other = s.loc[f"ablate top [{kind}]"]
            out.update({f"top_{kind}_drop": other["accuracy_drop"], f"top_{kind}_drop_low": other["drop_low"],
                        f"top_{kind}_drop_high": other["drop_high"]})
        if c.reverse_patch:
            rev = s.loc["patch top from zsl into icl"]
            out.update(reverse_accuracy=rev["accuracy"], reverse_drop=rev["accuracy_drop"],
                       reverse_drop_low=rev["drop_low"], reverse_drop_high=rev["drop_high"])
        if draws:
            rnd = s.loc[f"ablate random (mean of {draws})"]
            diff = s.loc["top minus random (icl)"]
            prnd = s.loc[f"patch random (mean of {draws})"]
            out.update(
                random_ablated_accuracy=rnd["accuracy"], random_drop=rnd["accuracy_drop"], random_drop_low=rnd["drop_low"],
                random_drop_high=rnd["drop_high"], random_agreement=rnd["agreement_icl"],
                random_accuracy_p2_5=rnd["accuracy_p2_5_draw"], random_accuracy_p97_5=rnd["accuracy_p97_5_draw"],
                top_minus_random_drop=diff["accuracy_drop"], top_minus_random_low=diff["drop_low"],
                top_minus_random_high=diff["drop_high"], top_rank=diff["top_rank"], n_draws=draws,
                random_recovery=prnd["recovery"],
            )
            for kind in c.ablations[1:]:
                other = s.loc[f"top minus random (icl) [{kind}]"]
                out.update({f"top_{kind}_minus_random": other["accuracy_drop"], f"top_{kind}_minus_random_low": other["drop_low"],
                            f"top_{kind}_minus_random_high": other["drop_high"], f"top_{kind}_rank": other["top_rank"]})
            if c.reverse_patch:
                rrnd = s.loc[f"reverse patch random (mean of {draws})"]
                rdiff = s.loc["top minus random (reverse)"]
                out.update(reverse_random_drop=rrnd["accuracy_drop"], reverse_minus_random=rdiff["accuracy_drop"],
                           reverse_minus_random_low=rdiff["drop_low"], reverse_minus_random_high=rdiff["drop_high"],
                           reverse_rank=rdiff["top_rank"])
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}

    def markdown(self) -> str:
        """The headline rows of the whole-model study as a markdown table (3 decimals)."""
        return markdown_table(self.tables["conditions"], self.summary) if "conditions" in self.tables else ""

    def quantities(self, summary=None) -> list[dict[str, Any]]:
        """The summary's numbers, then accuracy, agreement with ICL, drop and recovery of each
        condition but the single random draws (`CONDITION_QUANTITIES`), with their intervals."""
        rows = super().quantities(summary)
        conditions = self.tables.get("conditions")
        if conditions is None:
            return rows
        for record in conditions[~conditions["group"].isin(SINGLE_DRAWS)].to_dict("records"):
            for column, (low, high, method) in CONDITION_QUANTITIES.items():
                value = record.get(column)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                if column == "icl_gain" and record["group"] != "top":  # the same gain on every zero-shot row
                    continue
                bounds = [record.get(low) if low else None, record.get(high) if high else None]
                bounds = [None if b is None or (isinstance(b, float) and math.isnan(b)) else float(b) for b in bounds]
                rows.append(dict(name=f"{record['run']}: {record['condition']}.{column}", value=float(value),
                                 low=bounds[0], high=bounds[1], n=int(record["n"]),
                                 unit="rank among random draws" if column == "top_rank" else "prompts", split="report",
                                 method=method if bounds[0] is not None else None))
        return rows

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        summary = self.tables.get("conditions")
        if summary is not None:
            icl = summary[(summary["run"] == "icl") & summary["group"].isin(["top", "random_mean", "reverse"])]
            fig = go.Figure()
            fig.add_bar(x=icl["condition"], y=icl["accuracy_drop"], **_error_bars(icl, "accuracy_drop", "drop_low", "drop_high"))
            fig.update_layout(title="ICL accuracy drop when heads are ablated (report split, 95% CI)",
                              xaxis_title="heads ablated", yaxis_title="accuracy drop", template="plotly_white")
            figures["ablation"] = fig
        layers = self.tables.get("layers")
        if layers is not None and not layers.empty:
            fig = make_subplots(rows=1, cols=2, subplot_titles=(
                "ablate all heads of the layer: accuracy drop", "patch the layer's ICL outputs into zero-shot: recovery"))
            abl = layers[layers["kind"] == "ablate"].sort_values("layer")
            pat = layers[layers["kind"] != "ablate"].sort_values("layer")
            fig.add_scatter(x=abl["layer"], y=abl["accuracy_drop"], mode="lines+markers", name="accuracy drop",
                            row=1, col=1, **_error_bars(abl, "accuracy_drop", "drop_low", "drop_high"))
            fig.add_scatter(x=pat["layer"], y=pat["recovery"], mode="lines+markers", name="recovery",
                            row=1, col=2, **_error_bars(pat, "recovery", "recovery_low", "recovery_high"))
            fig.update_xaxes(title_text="layer")
            fig.update_yaxes(title_text="accuracy drop", row=1, col=1)
            fig.update_yaxes(title_text="recovery", row=1, col=2)
            fig.update_layout(template="plotly_white", title="Per layer: ablation and patching (report split, 95% CI)")
            figures["layers"] = fig
        return figures


#: Columns of the ``conditions`` table that are quantities: column -> (low column, high column,
#: interval method), as `icl_kernels.families.head_ablation` computes them. The random-set
#: intervals (groups ``random_mean``, ``reverse_random_mean``, ``top_minus_random``) resample the
#: draws too (a two-way bootstrap, with ``resample_draws``); ``accuracy_draws`` is the mean of the
#: per-draw accuracies with their 2.5 / 97.5 percentiles; ``top_rank`` has no interval.
CONDITION_QUANTITIES = {
    "accuracy": ("accuracy_low", "accuracy_high", "wilson"),
    "agreement_icl": ("agreement_low", "agreement_high", "wilson"),
    "accuracy_drop": ("drop_low", "drop_high", "percentile bootstrap"),
    "recovery": ("recovery_low", "recovery_high", "percentile bootstrap"),
    "accuracy_draws": ("accuracy_p2_5_draw", "accuracy_p97_5_draw", "percentiles of the draws"),
    "icl_gain": ("icl_gain_low", "icl_gain_high", "percentile bootstrap"),
    "top_rank": ("", "", None),
}

#: Condition groups of single random draws (kept in ``conditions.csv``, not in ``summary.csv``).
SINGLE_DRAWS = ("random", "reverse_random")


def _error_bars(frame, value: str, low: str, high: str) -> dict:
    if low not in frame or high not in frame:
        return {}
    return dict(error_y=dict(type="data", symmetric=False, array=frame[high] - frame[value],
                             arrayminus=frame[value] - frame[low]))


def _present(row, key) -> bool:
    value = row.get(key)
    return isinstance(value, (int, float)) and not math.isnan(value)


def _with_interval(row, value: str, low: str, high: str) -> str:
    text = f"{row[value]:.3f}"
    return text + (f" [{row[low]:.3f}, {row[high]:.3f}]" if _present(row, low) else "")


def recovery_text(row) -> str:
    """A recovery with its interval, or "uninformative" when the ICL gain's interval reaches 0 (the
    rule of the module docstring of `icl_kernels.families.head_ablation`); the gain beside it."""
    gain = f"ICL gain {_with_interval(row, 'icl_gain', 'icl_gain_low', 'icl_gain_high')}"
    if not _present(row, "icl_gain") or not _present(row, "recovery"):
        return f"recovery undefined ({gain})" if _present(row, "icl_gain") else "recovery undefined"
    if not _present(row, "icl_gain_low") or row["icl_gain_low"] <= 0:
        return f"recovery {row['recovery'] + 0.0:.3f}, uninformative ({gain} reaches 0)"
    return f"recovery {_with_interval(row, 'recovery', 'recovery_low', 'recovery_high')} ({gain})"


def condition_lines(summary, causal: CausalConfig) -> list[str]:
    """The report line's rows: each ablation of the top set against the random sets (their spread
    and the top set's rank), the reverse patch, and the patch into the zero-shot run."""
    s = {row["condition"]: row for row in summary.to_dict("records")}
    draws, k = causal.random_draws, causal.k

    def against_random(top_name: str, pooled: str, difference: str) -> str:
        text = f"drop {_with_interval(s[top_name], 'accuracy_drop', 'drop_low', 'drop_high')}"
        if draws and pooled in s:
            rnd, diff = s[pooled], s[difference]
            text += (f"; {draws} random sets {_with_interval(rnd, 'accuracy_drop', 'drop_low', 'drop_high')} "
                     f"(their accuracies {rnd['accuracy_p2_5_draw']:.3f}-{rnd['accuracy_p97_5_draw']:.3f}, 2.5-97.5%); "
                     f"top minus random {_with_interval(diff, 'accuracy_drop', 'drop_low', 'drop_high')}, "
                     f"top rank {int(diff['top_rank'])} of {draws + 1}")
        return text

    lines = []
    for kind in causal.ablations:
        sfx = causal.suffix(kind)
        lines.append(f"{kind} ablation of the top {k}: " + against_random(
            f"ablate top{sfx}", f"ablate random (mean of {draws}){sfx}", f"top minus random (icl){sfx}"))
    if "patch top from zsl into icl" in s:
        lines.append(f"reverse patch (top {k} zero-shot outputs into ICL): " + against_random(
            "patch top from zsl into icl", f"reverse patch random (mean of {draws})", "top minus random (reverse)"))
    patch = s["patch top into zsl"]
    text = f"patch top {k} ICL outputs into zero-shot: {recovery_text(patch)}"
    if draws and f"patch random (mean of {draws})" in s:
        rnd, diff = s[f"patch random (mean of {draws})"], s["top minus random (zsl)"]
        text += (f"; random sets recovery {rnd['recovery']:.3f} (their accuracies {rnd['accuracy_p2_5_draw']:.3f}-"
                 f"{rnd['accuracy_p97_5_draw']:.3f}), top rank {int(diff['top_rank'])} of {draws + 1}")
    lines.append(text)
    return lines


def markdown_table(summary, info: dict) -> str:
    """The headline rows (clean, top-k under each ablation, random means, top minus random, reverse
    patch) as a markdown table; recovery follows `recovery_text`'s rule."""
    lines = [
        "| condition | accuracy [95% CI] | agreement with ICL [95% CI] | accuracy drop [95% CI] | recovery [95% CI] | top rank among random sets |",
        "|---|---|---|---|---|---|",
    ]
    keep = summary[summary["group"].isin(["clean", "top", "random_mean", "top_minus_random", "reverse", "reverse_random_mean"])]
    for _, row in keep.iterrows():
        row = row.to_dict()
        acc = _with_interval(row, "accuracy", "accuracy_low", "accuracy_high") if _present(row, "accuracy") else ""
        if row["group"] in ("random_mean", "reverse_random_mean"):
            acc = (f"{row['accuracy']:.3f} (draws 2.5-97.5%: {row['accuracy_p2_5_draw']:.3f}-{row['accuracy_p97_5_draw']:.3f}; "
                   f"min-max {row['accuracy_min_draw']:.3f}-{row['accuracy_max_draw']:.3f})")
        agree = _with_interval(row, "agreement_icl", "agreement_low", "agreement_high") if _present(row, "agreement_icl") else ""
        drop = _with_interval(row, "accuracy_drop", "drop_low", "drop_high") if _present(row, "accuracy_drop") else ""
        rec = recovery_text(row) if _present(row, "recovery") else ""
        rank = f"{int(row['top_rank'])} of {int(row['n_draws']) + 1}" if _present(row, "top_rank") else ""
        lines.append(f"| {row['run']}: {row['condition']} | {acc} | {agree} | {drop} | {rec} | {rank} |")
    lines.append("")
    lines.append(f"top heads {info['top_heads']}; random sets {info['random_heads']}; "
                 f"n_select={info['n_select']}, n_report={info['n_report']}")
    return "\n".join(lines)


def run(cfg: CausalStudyConfig, model=None, progress: bool = True) -> CausalReport:
    """Rank, ablate and patch heads (or one layer's heads) on one model and task."""
    started = time.time()
    task = None if cfg.prompts.task in SYNTHETIC_TASKS else get_task(cfg.prompts.task)
    open_task = task is not None and task.kind == "open"
    hint = (" Ablating and patching one layer's heads (--layer L) ranks nothing and takes any open task; "
            "`icl-kernels eval` scores it.")
    if open_task and cfg.layer is None:  # ranking heads by their vote: before the model loads
        check_open_task(task, study="causal", hint=hint)
    if model is None:
        model = cfg.model.load()
    if open_task and cfg.layer is None:
        check_open_task(task, model.tokenizer, study="causal", hint=hint)
    prompts = study_prompts(model, cfg.prompts, model_name=cfg.model.model)
    icl, zsl, label_ids = prompts.icl, prompts.zsl, prompts.label_ids
    answers = gold_answer_ids(prompts.builder, icl) if open_task else None
    where = dict(model=cfg.model.model, task=cfg.prompts.task, shots=cfg.prompts.shots)
    if open_task:
        where["scoring"] = "top-1 first token over the vocabulary (open task)"
    if cfg.layer is not None:
        c = cfg.causal
        metrics = layer_study(model, icl, zsl, label_ids, cfg.layer, ablation=c.ablation, bootstrap=c.bootstrap,
                              seed=c.seed, batch_size=c.batch_size, answer_ids=answers)
        summary = dict(metrics, **where, layer=cfg.layer, elapsed_s=round(time.time() - started, 1))
        return CausalReport("causal", cfg, {}, summary)
    result = causal_study(model, icl, zsl, label_ids, cfg.causal, progress=progress, answer_ids=answers)
    summary = dict(result.info, **where,
                   mean_demos=float(sum(p.n_demos for p in icl) / len(icl)),
                   mean_prompt_tokens=float(sum(len(p) for p in icl) / len(icl)),
                   elapsed_s=round(time.time() - started, 1))
    tables = dict(conditions=result.summary, ranking=result.ranking, effects=result.effects)
    if result.layers is not None:
        tables["layers"] = result.layers
    return CausalReport("causal", cfg, tables, summary)


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('causal', (
    ('icl: clean\\.accuracy|zsl: clean\\.accuracy', 'ICL / zero-shot accuracy on the report prompts (Wilson interval)'),
    ('(icl|zsl): clean\\.agreement_icl', 'agreement of the clean run with the ICL prediction (1 for ICL itself)'),
    ('icl: ablate top\\.\\w+', 'the top-k label-attention heads ablated with the headline ablation (`ablation`, default mean): accuracy, agreement with ICL (Wilson), accuracy drop (paired bootstrap)'),
    ('icl: ablate top \\[(mean|zero|resample)\\]\\.\\w+', 'the same under another ablation (`other_ablations`): zero, or resample (each prompt takes the heads\' outputs on another report prompt)'),
    ('icl: ablate random \\(mean of \\d+\\)( \\[\\w+\\])?\\.\\w+', 'k random heads ablated, mean over the draws; accuracy_draws: mean of the per-draw accuracies with their 2.5 / 97.5 percentiles; the drop interval resamples prompts and draws'),
    ('(icl|zsl): top minus random \\(\\w+\\)( \\[\\w+\\])?\\.\\w+', 'top-k minus random drop (or recovery), bootstrap over prompts and draws; top_rank: 1 + draws with an effect at least the top set\'s, of draws + 1'),
    ('zsl: patch top into zsl\\.\\w+', "the top heads' ICL outputs patched into the zero-shot run: accuracy, recovery (not clipped), and the ICL gain it divides by (paired bootstrap)"),
    ('zsl: patch random \\(mean of \\d+\\)\\.\\w+', 'random heads patched into the zero-shot run, mean over the draws'),
    ('icl: patch top from zsl into icl\\.\\w+', "reverse patch: the top heads' zero-shot outputs patched into the ICL run (accuracy drop: necessity)"),
    ('icl: reverse patch random \\(mean of \\d+\\)\\.\\w+', 'reverse patch of random head sets, mean over the draws'),
    ('(icl: ablate layer \\d+|zsl: patch layer \\d+ into zsl)\\.\\w+', 'all heads of layer <l> ablated / patched (with `layer_sweep`)'),
    ('icl_accuracy|zsl_accuracy|ablated_accuracy', "clean ICL / zero-shot accuracy and, in a one-layer run, the accuracy with the layer's heads ablated"),
    ('accuracy_drop|recovery|agreement\\w*|icl_gain', 'one-layer run: accuracy drop (paired bootstrap), recovery of the zero-shot run when the layer is patched in (not clipped), the ICL gain it divides by, agreement'),
    ('n_select|n_report|n|n_layers|n_heads|shots|layer|mean_demos|mean_prompt_tokens|config\\.\\w+', 'sizes and the causal options'),
    ('elapsed_s', 'seconds the run took (volatile)'),
))

register(
    "causal", CausalStudyConfig, run,
    help=builtin_help("causal"),
    description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
)
