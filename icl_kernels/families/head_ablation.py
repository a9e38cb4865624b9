"""Causal tests of label-attention heads: do the heads that *look* like kernel regression matter?

`icl_kernels.kernel.scores` ranks heads by how well the a-weighted vote over demonstration labels
reproduces the model's ICL prediction. That is correlational. This module intervenes
(`icl_kernels.engine.patching`) on the heads ranked highest, on prompts that took no part in the ranking:

1. **Ranking** on a selection split of the ICL prompts (`icl_kernels.utils.stats.split_indices`): heads
   sorted by agreement (or accuracy) of their reconstruction, for one aggregation of a_i.
2. **Ablation** on the disjoint report split: the top-k heads' outputs at the prediction position
   are replaced by their mean over the report prompts (or by zero), and the ICL accuracy and the
   agreement with the unedited ICL prediction are measured. The same for ``random_draws`` sets of k
   heads drawn uniformly from the other heads, a baseline for "removing any k heads hurts".
3. **Patching into the zero-shot run**: the top-k (and random) heads' ICL outputs are written into
   the zero-shot prompt of the same query at its prediction position. Recovery is
   (acc_patched - acc_zero_shot) / (acc_ICL - acc_zero_shot): 1 means those heads carry everything
   the demonstrations add, 0 nothing. The reverse patch (zero-shot outputs into the ICL run) is
   reported too.
4. **Per layer**: every head of one layer ablated in the ICL run, and patched from ICL into the
   zero-shot run, one layer at a time.

Intervals: accuracies and agreements get Wilson 95% intervals; differences (accuracy drop, top-k
minus random drop, recovery) get percentile intervals from a paired bootstrap over report prompts
(the random baseline is averaged over its draws inside each bootstrap sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from icl_kernels.engine.patching import (
    Head,
    effects_frame,
    mean_ablation,
    patch_heads,
    run_with_edits,
    zero_ablation,
)
from icl_kernels.kernel.head_scan import analyze_heads
from icl_kernels.kernel.scores import AGGREGATIONS
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.config import Options, at_least, one_of
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import (
    bootstrap_interval,
    mean_difference,
    recovery,
    split_indices,
    wilson_interval,
)
from icl_kernels.utils.stats import rng as seeded

__all__ = [
    "CausalConfig",
    "CausalResult",
    "rank_heads",
    "random_head_sets",
    "causal_study",
    "layer_study",
]

ABLATIONS = ("mean", "zero")
METRICS = ("agreement", "accuracy")


@dataclass
class CausalConfig(Options):
    """Options of `causal_study` (see the module docstring)."""

    k: int = field(default=3, metadata={"help": "heads ablated / patched (top-k and each random set)"})
    random_draws: int = field(default=5, metadata={"help": "random k-head sets (baseline)"})
    ablation: str = field(default="mean", metadata={"choices": ABLATIONS})
    aggregation: str = field(default="label", metadata={"help": "how a_i are aggregated to rank heads"})
    metric: str = field(default="agreement", metadata={"choices": METRICS, "help": "what heads are ranked by"})
    select_fraction: float = field(default=0.5, metadata={"help": "share of prompts used to rank heads"})
    seed: int = field(default=0, metadata={"cli": False, "help": "split, random heads and bootstrap seed"})
    layer_sweep: bool = field(default=True, metadata={"help": "also ablate / patch every layer, one at a time"})
    reverse_patch: bool = field(default=True, metadata={"help": "also patch zero-shot outputs into the ICL run"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples of each interval"})
    batch_size: int = 4

    def __post_init__(self) -> None:
        problems = at_least("k", self.k, 1) + at_least("random_draws", self.random_draws, 0)
        problems += one_of("ablation", self.ablation, ABLATIONS) + one_of("aggregation", self.aggregation, AGGREGATIONS)
        problems += one_of("metric", self.metric, METRICS)
        if not 0 < self.select_fraction < 1:
            problems.append(f"select_fraction must be in (0, 1), not {self.select_fraction}")
        problems += at_least("bootstrap", self.bootstrap, 100, " resamples") + at_least("batch_size", self.batch_size, 1)
        if problems:
            raise InvalidOptionError("Invalid causal-study options: " + "; ".join(problems) + ".")


@dataclass
class CausalResult:
    """What `causal_study` measured.

    Attributes:
        ranking: heads on the selection split (layer, head, agreement, accuracy, rank).
        top_heads: the k heads ablated and patched.
        random_heads: one list of k heads per random draw.
        effects: one row per (run, condition, prompt) on the report split (`patching.effects_frame`
            columns plus ``run`` "icl"/"zsl", ``group``, ``draw``, ``layer``).
        summary: one row per condition, and aggregated rows for the random draws (group
            ``random_mean``) and for top-k minus random (``top_minus_random``).
        layers: the per-layer sweep (one row per layer and kind), or None.
        info: sizes, clean accuracies and the configuration.
    """

    ranking: pd.DataFrame
    top_heads: list[Head]
    random_heads: list[list[Head]]
    effects: pd.DataFrame
    summary: pd.DataFrame
    layers: pd.DataFrame | None
    info: dict = field(default_factory=dict)


def rank_heads(scores, aggregation: str = "label", metric: str = "agreement") -> pd.DataFrame:
    """Heads sorted by ``metric`` (ties: earlier layer, then head) from a `kernel.HeadScores`."""
    matrix = getattr(scores, metric)[aggregation]
    other = scores.accuracy[aggregation] if metric == "agreement" else scores.agreement[aggregation]
    n_layers, n_heads = matrix.shape
    frame = pd.DataFrame(dict(
        layer=np.repeat(np.arange(n_layers), n_heads), head=np.tile(np.arange(n_heads), n_layers),
        **{metric: matrix.flatten().numpy(), ("accuracy" if metric == "agreement" else "agreement"): other.flatten().numpy()},
    ))
    frame = frame.sort_values([metric, "layer", "head"], ascending=[False, True, True], kind="stable")
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame.reset_index(drop=True)


def random_head_sets(
    n_layers: int, n_heads: int, k: int, draws: int, exclude: Sequence[Head] = (), seed: int = 0
) -> list[list[Head]]:
    """``draws`` sets of ``k`` distinct heads, uniformly from the heads not in ``exclude`` (seeded)."""
    excluded = {tuple(map(int, h)) for h in exclude}
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in excluded]
    if k > len(pool):
        raise ValueError(f"Cannot draw {k} random heads from {len(pool)} heads outside the top-k; use a smaller k.")
    out = []
    for d in range(draws):
        rng = seeded('random_heads', seed, d)
        out.append(sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False)))
    return out


def causal_study(
    model: tl_backend.Model,
    icl_prompts: Sequence,
    zsl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    config: CausalConfig | None = None,
    *,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> CausalResult:
    """Rank heads on a selection split, then ablate and patch them on the report split.

    Args:
        model: a HookedTransformer or TransformerBridge.
        icl_prompts: k-shot prompts with ``query_label`` (gold) set.
        zsl_prompts: the zero-shot prompts of the same queries, in the same order.
        label_ids: token ids of each class's label word (first token scored).
        config: a `CausalConfig`.
    """
    cfg = config or CausalConfig()
    if len(icl_prompts) != len(zsl_prompts):
        raise ValueError(f"{len(icl_prompts)} ICL prompts but {len(zsl_prompts)} zero-shot prompts; pass one of each per query.")
    for i, (a, b) in enumerate(zip(icl_prompts, zsl_prompts)):
        if a.query_label is None or a.query_label != b.query_label or (
            a.query_index is not None and b.query_index is not None and a.query_index != b.query_index
        ):
            raise ValueError(f"Prompt {i}: the ICL and zero-shot prompts are not of the same query (or lack gold).")
    if any(p.n_demos for p in zsl_prompts):
        raise ValueError("zsl_prompts must have no demonstrations.")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if cfg.k > n_layers * n_heads:
        raise ValueError(f"k={cfg.k} but the model has only {n_layers * n_heads} heads.")
    kw = dict(batch_size=cfg.batch_size, pad_token_id=pad_token_id)

    # 1. rank heads on the selection split only
    select, report = split_indices(len(icl_prompts), cfg.select_fraction, cfg.seed)
    run = analyze_heads(
        model, [icl_prompts[i] for i in select], label_ids, aggregations=(cfg.aggregation,),
        attention_map_length=None, progress=progress, **kw,
    )
    ranking = rank_heads(run.scores(), cfg.aggregation, cfg.metric)
    top = [tuple(map(int, r)) for r in ranking[["layer", "head"]].head(cfg.k).to_numpy()]
    randoms = random_head_sets(n_layers, n_heads, cfg.k, cfg.random_draws, exclude=top, seed=cfg.seed)

    # 2. clean runs of the report split (recording head outputs for patching and means)
    icl_r = [icl_prompts[i] for i in report]
    zsl_r = [zsl_prompts[i] for i in report]
    gold = torch.tensor([p.query_label for p in icl_r])
    conditions: list[tuple[str, str, str, int, int, list]] = []  # (name, run, group, draw, layer, edits)
    icl_clean, icl_z = run_with_edits(model, icl_r, label_ids, record=True, **kw)
    zsl_clean, zsl_z = run_with_edits(model, zsl_r, label_ids, record=True, **kw)
    means = icl_z.mean(0)

    def ablate(heads):
        return mean_ablation(heads, means) if cfg.ablation == "mean" else zero_ablation(heads)

    conditions.append(("ablate top", "icl", "top", -1, -1, ablate(top)))
    for d, heads in enumerate(randoms):
        conditions.append((f"ablate random {d}", "icl", "random", d, -1, ablate(heads)))
    conditions.append(("patch top into zsl", "zsl", "top", -1, -1, patch_heads(top, icl_z)))
    for d, heads in enumerate(randoms):
        conditions.append((f"patch random {d} into zsl", "zsl", "random", d, -1, patch_heads(heads, icl_z)))
    if cfg.reverse_patch:
        conditions.append(("patch top from zsl into icl", "icl", "reverse", -1, -1, patch_heads(top, zsl_z)))
    if cfg.layer_sweep:
        for layer in range(n_layers):
            heads = [(layer, h) for h in range(n_heads)]
            conditions.append((f"ablate layer {layer}", "icl", "layer", -1, layer, ablate(heads)))
            conditions.append((f"patch layer {layer} into zsl", "zsl", "layer", -1, layer, patch_heads(heads, icl_z)))

    edited = {"icl": {}, "zsl": {}}
    meta = {}
    for name, which, group, draw, layer, edits in tqdm(conditions, desc="causal: ablation and patching conditions", unit="condition", disable=not progress):
        prompts = icl_r if which == "icl" else zsl_r
        edited[which][name] = run_with_edits(model, prompts, label_ids, edits, **kw)
        meta[name] = dict(group=group, draw=draw, layer=layer)
    icl_pred = icl_clean.argmax(-1)
    ids = [int(i) for i in report]
    frames = []
    for which, clean in (("icl", icl_clean), ("zsl", zsl_clean)):
        f = effects_frame(clean, edited[which], gold, ids, reference=icl_pred)
        f.insert(0, "run", which)
        frames.append(f)
    effects = pd.concat(frames, ignore_index=True)
    effects["group"] = effects["condition"].map(lambda c: meta.get(c, {}).get("group", "clean"))
    effects["draw"] = effects["condition"].map(lambda c: meta.get(c, {}).get("draw", -1))
    effects["layer"] = effects["condition"].map(lambda c: meta.get(c, {}).get("layer", -1))

    summary, layers = _summaries(effects, cfg, [name for name, *_ in conditions])
    icl_acc = float((icl_pred == gold).float().mean())
    zsl_acc = float((zsl_clean.argmax(-1) == gold).float().mean())
    info = dict(
        n_select=len(select), n_report=len(report), icl_accuracy=icl_acc, zsl_accuracy=zsl_acc,
        top_heads=[list(h) for h in top], random_heads=[[list(h) for h in s] for s in randoms],
        config=asdict(cfg), n_layers=n_layers, n_heads=n_heads,
    )
    return CausalResult(ranking, top, randoms, effects, summary, layers if cfg.layer_sweep else None, info)


def _summaries(effects: pd.DataFrame, cfg: CausalConfig, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-condition accuracy/agreement with Wilson intervals; drops and recovery with bootstrap."""
    def column(run: str, condition: str, name: str = "correct") -> np.ndarray:
        g = effects[(effects["run"] == run) & (effects["condition"] == condition)].sort_values("prompt")
        return g[name].to_numpy(dtype=float)

    icl = column("icl", "clean")
    zsl = column("zsl", "clean")
    n = len(icl)
    boot = dict(n=n, resamples=cfg.bootstrap, seed=cfg.seed)
    records = []

    def add(run, condition, group, draw, layer, correct, agrees):
        lo, hi = wilson_interval(int(correct.sum()), n)
        alo, ahi = wilson_interval(int(agrees.sum()), n)
        rec = dict(run=run, condition=condition, group=group, draw=draw, layer=layer, n=n,
                   accuracy=float(correct.mean()), accuracy_low=lo, accuracy_high=hi,
                   agreement_icl=float(agrees.mean()), agreement_low=alo, agreement_high=ahi)
        if run == "icl" and condition != "clean":
            rec["accuracy_drop"] = float(icl.mean() - correct.mean())
            rec["drop_low"], rec["drop_high"] = bootstrap_interval(mean_difference, [icl, correct], **boot)
        if run == "zsl" and condition != "clean":
            rec["recovery"] = recovery(correct, zsl, icl)
            rec["recovery_low"], rec["recovery_high"] = bootstrap_interval(recovery, [correct, zsl, icl], **boot)
        records.append(rec)

    for run in ("icl", "zsl"):
        add(run, "clean", "clean", -1, -1, column(run, "clean"), column(run, "clean", "agrees_clean"))
    for condition in order:
        g = effects[effects["condition"] == condition].iloc[0]
        add(g["run"], condition, g["group"], int(g["draw"]), int(g["layer"]),
            column(g["run"], condition), column(g["run"], condition, "agrees_clean"))

    # random draws pooled: mean over draws inside each bootstrap sample
    for run, prefix in (("icl", "ablate random"), ("zsl", "patch random")):
        names = [c for c in order if c.startswith(prefix)]
        if not names:
            continue
        stacked = np.stack([column(run, c) for c in names], axis=1)  # [prompt draw]
        agree = np.stack([column(run, c, "agrees_clean") for c in names], axis=1)
        top_name = "ablate top" if run == "icl" else "patch top into zsl"
        top = column(run, top_name)
        rec = dict(run=run, condition=f"{prefix} (mean of {len(names)})", group="random_mean", draw=-1, layer=-1,
                   n=n, accuracy=float(stacked.mean()), agreement_icl=float(agree.mean()),
                   accuracy_min_draw=float(stacked.mean(0).min()), accuracy_max_draw=float(stacked.mean(0).max()))
        diff = dict(run=run, condition=f"top minus random ({run})", group="top_minus_random", draw=-1, layer=-1, n=n)
        if run == "icl":
            rec["accuracy_drop"] = float(icl.mean() - stacked.mean())
            rec["drop_low"], rec["drop_high"] = bootstrap_interval(lambda a, s: a.mean() - s.mean(), [icl, stacked], **boot)
            # positive: top-k ablation hurts more than random ablation
            diff["accuracy_drop"] = float(stacked.mean() - top.mean())
            diff["drop_low"], diff["drop_high"] = bootstrap_interval(lambda s, t: s.mean() - t.mean(), [stacked, top], **boot)
        else:
            rec["recovery"] = recovery(stacked, zsl, icl)
            rec["recovery_low"], rec["recovery_high"] = bootstrap_interval(recovery, [stacked, zsl, icl], **boot)
            diff["recovery"] = recovery(top, zsl, icl) - rec["recovery"]
            diff["recovery_low"], diff["recovery_high"] = bootstrap_interval(
                lambda t, s, z, i: recovery(t, z, i) - recovery(s, z, i), [top, stacked, zsl, icl], **boot
            )
        records += [rec, diff]
    summary = pd.DataFrame.from_records(records)
    layers = summary[summary["group"] == "layer"].copy()
    layers["kind"] = np.where(layers["run"] == "icl", "ablate", "patch into zsl")
    return summary, layers.reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# One layer at a time (a sweep cell)
# ------------------------------------------------------------------------------------------------


def layer_study(
    model: tl_backend.Model,
    icl_prompts: Sequence,
    zsl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    layer: int,
    *,
    ablation: str = "mean",
    bootstrap: int = 2000,
    seed: int = 0,
    batch_size: int = 4,
    pad_token_id: int | None = None,
) -> dict:
    """Every head of ``layer`` ablated in the ICL run and patched from it into the zero-shot run.

    No head is selected, so all prompts are used. Returns flat metrics: clean ICL and zero-shot
    accuracy, the ablated accuracy and its drop (paired bootstrap interval), agreement with the
    clean ICL prediction (Wilson), and the patched zero-shot accuracy and recovery (bootstrap).
    """
    if ablation not in ABLATIONS:
        raise InvalidOptionError(f"ablation must be one of {ABLATIONS}, not {ablation!r}.")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"Layer {layer} does not exist; the model has {model.cfg.n_layers} layers.")
    kw = dict(batch_size=batch_size, pad_token_id=pad_token_id)
    gold = torch.tensor([p.query_label for p in icl_prompts])
    icl_clean, icl_z = run_with_edits(model, icl_prompts, label_ids, record=True, **kw)
    zsl_clean = run_with_edits(model, zsl_prompts, label_ids, **kw)
    heads = [(layer, h) for h in range(model.cfg.n_heads)]
    edits = mean_ablation(heads, icl_z.mean(0)) if ablation == "mean" else zero_ablation(heads)
    ablated = run_with_edits(model, icl_prompts, label_ids, edits, **kw)
    patched = run_with_edits(model, zsl_prompts, label_ids, patch_heads(heads, icl_z), **kw)
    icl_pred = icl_clean.argmax(-1)
    icl = (icl_pred == gold).numpy().astype(float)
    zsl = (zsl_clean.argmax(-1) == gold).numpy().astype(float)
    abl = (ablated.argmax(-1) == gold).numpy().astype(float)
    pat = (patched.argmax(-1) == gold).numpy().astype(float)
    n = len(gold)
    boot = dict(n=n, resamples=bootstrap, seed=seed)
    agree = int((ablated.argmax(-1) == icl_pred).sum())
    agree_lo, agree_hi = wilson_interval(agree, n)
    drop_lo, drop_hi = bootstrap_interval(mean_difference, [icl, abl], **boot)
    rec_lo, rec_hi = bootstrap_interval(recovery, [pat, zsl, icl], **boot)
    return dict(
        n=n, icl_accuracy=float(icl.mean()), zsl_accuracy=float(zsl.mean()),
        ablated_accuracy=float(abl.mean()), accuracy_drop=float(icl.mean() - abl.mean()),
        drop_low=drop_lo, drop_high=drop_hi,
        ablated_agreement=agree / n, agreement_low=agree_lo, agreement_high=agree_hi,
        patched_zsl_accuracy=float(pat.mean()), recovery=recovery(pat, zsl, icl),
        recovery_low=rec_lo, recovery_high=rec_hi,
    )
