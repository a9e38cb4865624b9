"""Causal tests of label-attention heads: do the heads that *look* like kernel regression matter?

`icl_kernels.kernel.scores` ranks heads by how well the a-weighted vote over demonstration labels
reproduces the model's ICL prediction. That is correlational. This module intervenes
(`icl_kernels.engine.patching`) on the heads ranked highest, on prompts that took no part in the ranking:

1. **Ranking** on a selection split of the ICL prompts (`icl_kernels.utils.stats.split_indices`): heads
   sorted by agreement (or accuracy) of their reconstruction, for one aggregation of a_i.
2. **Ablation** on the disjoint report split, at the prediction position, three ways (`ABLATIONS`):
   *mean* (the head's output replaced by its mean over the report prompts, Yin & Steinhardt's
   default, kayoyin/icl-heads ``src/utils/ablate_utils.py``), *zero* (the head writes nothing but
   the layer's shared bias), and *resample* (the head's output on another report prompt, paired by
   one seeded cycle through the prompts, `icl_kernels.engine.patching.resample_ablation`; Yin &
   Steinhardt resample ``hook_v`` from random-token text for their token-loss metric). Mean
   ablation can leave a head's average message in place and zero ablation pushes the run off its
   distribution; resample ablation does neither, so a head that carries the query's answer shows up
   there if anywhere. ``ablation`` names the headline kind (conditions without a suffix, the layer
   sweep); ``other_ablations`` run too (conditions suffixed `` [zero]``, `` [resample]``). The ICL
   accuracy and the agreement with the unedited ICL prediction are measured, for the top-k heads
   and for ``random_draws`` sets of k heads drawn uniformly from the other heads (the baseline for
   "removing any k heads hurts").
3. **Patching into the zero-shot run**: the top-k (and random) heads' ICL outputs are written into
   the zero-shot prompt of the same query at its prediction position. Recovery is
   (acc_patched - acc_zero_shot) / (acc_ICL - acc_zero_shot): 1 means those heads carry everything
   the demonstrations add, 0 nothing.
4. **Reverse patch** (necessity from the other side): the top-k (and random) heads' *zero-shot*
   outputs written into the ICL run. If the heads carry what the demonstrations add, the ICL run
   loses it; the accuracy drop is reported like an ablation's.
5. **Per layer**: every head of one layer ablated in the ICL run, and patched from ICL into the
   zero-shot run, one layer at a time.

Intervals: accuracies and agreements get Wilson 95% intervals; differences (accuracy drop, top-k
minus random drop, recovery) get percentile intervals from a paired bootstrap over report prompts.
The random baseline is a mean over draws, and the draws themselves are a sample of all k-head
sets: with ``resample_draws`` (default) each bootstrap sample also resamples the draws with
replacement (`random_sets_interval`, a two-way bootstrap over prompts and draws), so the interval
covers the choice of random sets too. The draws' spread is reported beside it (mean, 2.5 and 97.5
percentiles, min and max of the per-draw accuracies) with the top set's rank among them
(``top_rank``: 1 + the number of draws whose effect is at least the top set's, out of
``n_draws + 1``; ties count against the top set).

**Open-vocabulary tasks** (``answer_ids`` given): accuracy is top-1 first-token accuracy over the
whole vocabulary (`icl_kernels.engine.patching.open_run_with_edits`, the full-vocabulary scorer
`icl_kernels.engine.vocab_scoring.answer_scores` under the same edits: mean, zero and resample ablation,
patch and reverse patch), agreement is the same top-1 token as the clean ICL run. Ranking heads by
their label-vote agreement (step 1) reads the model's prediction as a class, so it needs single-token
answers (`icl_kernels.kernel.head_scan.analyze_heads` with ``prediction="vocabulary"``: a top-1 token
that is none of the answers is no class and agrees with no head); `layer_study` ranks nothing and
takes any open task.

Recovery is a ratio of two paired differences and is **not clipped**: above 1 the patched
zero-shot run beat the ICL run, below 0 it fell under the zero-shot run. Its percentile interval
is taken over the resamples in which the ICL gain (the denominator) is not zero, so where the gain
is a few prompts the interval can reach far outside [0, 1] (a resample whose ICL gain is 7 prompts
and whose patched run gains 11 gives 11/7 = 1.571). Every recovery row therefore carries the ICL gain
(``icl_gain``) with its paired bootstrap interval; the rule of the report line and markdown table:
when the gain's interval reaches 0, the recovery is printed as uninformative instead of its interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_kernels.engine.condition_runs import score_conditions
from icl_kernels.engine.patching import (
    Edit,
    Head,
    effects_frame,
    mean_ablation,
    open_effects_frame,
    open_run_with_edits,
    patch_heads,
    resample_ablation,
    resample_sources,
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
    percentile_interval,
    recovery,
    split_indices,
    wilson_interval,
)
from icl_kernels.utils.stats import rng as seeded

__all__ = [
    "ABLATIONS",
    "CausalConfig",
    "CausalResult",
    "rank_heads",
    "random_head_sets",
    "ablation_edits",
    "random_sets_interval",
    "draw_spread",
    "top_rank",
    "causal_study",
    "layer_study",
]

ABLATIONS = ("mean", "zero", "resample")
METRICS = ("agreement", "accuracy")


@dataclass
class CausalConfig(Options):
    """Options of `causal_study` (see the module docstring)."""

    k: int = field(default=3, metadata={"help": "heads ablated / patched (top-k and each random set)"})
    random_draws: int = field(default=20, metadata={
        "help": "random k-head sets (baseline; their spread and the top set's rank are reported)"})
    ablation: str = field(default="mean", metadata={
        "choices": ABLATIONS, "help": "headline ablation (conditions without a suffix, the layer sweep)"})
    other_ablations: tuple[str, ...] = field(default=("zero", "resample"), metadata={
        "help": "ablations also run on the top and random sets (conditions suffixed ' [zero]', ' [resample]')"})
    aggregation: str = field(default="label", metadata={"help": "how a_i are aggregated to rank heads"})
    metric: str = field(default="agreement", metadata={"choices": METRICS, "help": "what heads are ranked by"})
    select_fraction: float = field(default=0.5, metadata={"help": "share of prompts used to rank heads"})
    seed: int = field(default=0, metadata={"cli": False, "help": "split, random heads and bootstrap seed"})
    layer_sweep: bool = field(default=True, metadata={"help": "also ablate / patch every layer, one at a time"})
    reverse_patch: bool = field(default=True, metadata={"help": "also patch zero-shot outputs into the ICL run"})
    resample_draws: bool = field(default=True, metadata={
        "help": "resample the random head sets inside the bootstrap too (two-way: prompts and draws)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples of each interval"})
    prefix_reuse: bool = field(default=True, metadata={
        "identity": False,  # how fast, not a number: not in the fingerprint
        "help": "run each report prompt's context once and its ablation / patch conditions on its last "
                "token (exact); off: every condition in full"})
    batch_size: int = 4

    def __post_init__(self) -> None:
        self.other_ablations = tuple(self.other_ablations)
        problems = at_least("k", self.k, 1) + at_least("random_draws", self.random_draws, 0)
        problems += one_of("ablation", self.ablation, ABLATIONS) + one_of("aggregation", self.aggregation, AGGREGATIONS)
        for kind in self.other_ablations:
            problems += one_of("other_ablations", kind, ABLATIONS)
        problems += one_of("metric", self.metric, METRICS)
        if not 0 < self.select_fraction < 1:
            problems.append(f"select_fraction must be in (0, 1), not {self.select_fraction}")
        problems += at_least("bootstrap", self.bootstrap, 100, " resamples") + at_least("batch_size", self.batch_size, 1)
        if problems:
            raise InvalidOptionError("Invalid causal-study options: " + "; ".join(problems) + ".")

    @property
    def ablations(self) -> tuple[str, ...]:
        """The headline ablation, then the other ones (each once)."""
        return tuple(dict.fromkeys((self.ablation, *self.other_ablations)))

    def suffix(self, kind: str) -> str:
        """The suffix of the conditions of ablation ``kind`` ('' for the headline one)."""
        return "" if kind == self.ablation else f" [{kind}]"


@dataclass
class CausalResult:
    """What `causal_study` measured.

    Attributes:
        ranking: heads on the selection split (layer, head, agreement, accuracy, rank).
        top_heads: the k heads ablated and patched.
        random_heads: one list of k heads per random draw.
        effects: one row per (run, condition, prompt) on the report split (`patching.effects_frame`
            columns plus ``run`` "icl"/"zsl", ``group``, ``draw``, ``layer``, ``intervention`` and
            ``resample_source``, the prompt whose head outputs a resample-ablated prompt received).
        summary: one row per condition, and aggregated rows for the random draws (groups
            ``random_mean``, ``reverse_random_mean``) and for top-k minus random (``top_minus_random``).
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
    """``draws`` distinct sets of ``k`` distinct heads, uniformly from the heads not in ``exclude``
    (seeded: draw d comes from the ``random_heads`` stream at (seed, d), so the first draws do not
    change when more are asked for; a set equal to an earlier one is drawn again from (seed, d,
    attempt), so no two draws are the same set)."""
    excluded = {tuple(map(int, h)) for h in exclude}
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in excluded]
    if draws and k > len(pool):
        raise ValueError(f"Cannot draw {k} random heads from {len(pool)} heads outside the top-k; use a smaller k.")
    if draws > math.comb(len(pool), k):
        raise ValueError(f"Only {math.comb(len(pool), k)} distinct sets of {k} heads exist outside the top-k; "
                         f"ask for at most that many random draws, not {draws}.")
    out: list[list[Head]] = []
    seen: set[tuple[Head, ...]] = set()
    for d in range(draws):
        attempt = 0
        while True:
            rng = seeded('random_heads', seed, d) if attempt == 0 else seeded('random_heads', seed, d, attempt)
            heads = sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))
            if tuple(heads) not in seen:
                break
            attempt += 1
        seen.add(tuple(heads))
        out.append(heads)
    return out


def ablation_edits(
    kind: str,
    heads: Sequence[Head],
    z: Float[Tensor, "prompt layer head_index d_head"],
    sources: Int[Tensor, " prompt"] | None = None,
) -> list[Edit]:
    """The edits of one ablation ``kind`` (`ABLATIONS`) of ``heads`` at the prediction position of
    the prompts whose clean head outputs are ``z``: ``mean`` (their mean over those prompts),
    ``zero``, or ``resample`` (prompt i gets the outputs of prompt ``sources[i]``)."""
    if kind == "mean":
        return mean_ablation(heads, z.mean(0))
    if kind == "zero":
        return zero_ablation(heads)
    if kind == "resample":
        if sources is None:
            raise ValueError("Resample ablation needs sources (resample_sources(n_prompts, seed)).")
        return resample_ablation(heads, z, sources)
    raise InvalidOptionError(f"ablation must be one of {ABLATIONS}, not {kind!r}.")


def random_sets_interval(
    statistic: Callable[..., float],
    arrays: Sequence[np.ndarray],
    drawn: Float[np.ndarray, "prompt draw"],
    *,
    resamples: int = 2000,
    seed: int = 0,
    resample_draws: bool = True,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(*[a[idx] for a in arrays], drawn[idx][:, cols])``: each
    bootstrap sample resamples the prompts (rows, shared by every array: paired) and, with
    ``resample_draws``, the random head sets (columns of ``drawn``) with replacement.

    The prompt indices are those of `icl_kernels.utils.stats.bootstrap_interval` with the same seed
    (stream ``bootstrap``), the draw indices come from their own stream, so with
    ``resample_draws=False`` the interval equals ``bootstrap_interval`` with the draws held fixed.
    NaN samples are dropped.
    """
    drawn = np.asarray(drawn, dtype=float)
    if drawn.ndim != 2 or any(len(a) != len(drawn) for a in arrays):
        raise ValueError(f"drawn must be [prompt, draw] with one row per prompt of arrays, got {drawn.shape}.")
    n, n_draws = drawn.shape
    prompts, draws = seeded("bootstrap", seed), seeded("random_draws_bootstrap", seed)
    all_draws = np.arange(n_draws)
    values = []
    for _ in range(resamples):
        idx = prompts.integers(0, n, size=n)
        cols = draws.integers(0, n_draws, size=n_draws) if resample_draws else all_draws
        values.append(statistic(*[a[idx] for a in arrays], drawn[idx][:, cols]))
    return percentile_interval(values, level)


def draw_spread(per_draw: Sequence[float] | np.ndarray, prefix: str) -> dict[str, float]:
    """Mean, 2.5 and 97.5 percentiles, min and max of a per-draw value, keyed ``{prefix}_draws``,
    ``{prefix}_p2_5_draw``, ``{prefix}_p97_5_draw``, ``{prefix}_min_draw``, ``{prefix}_max_draw``."""
    v = np.asarray(per_draw, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return {}
    return {f"{prefix}_draws": float(v.mean()), f"{prefix}_p2_5_draw": float(np.percentile(v, 2.5)),
            f"{prefix}_p97_5_draw": float(np.percentile(v, 97.5)), f"{prefix}_min_draw": float(v.min()),
            f"{prefix}_max_draw": float(v.max())}


def top_rank(top_effect: float, draw_effects: Sequence[float] | np.ndarray) -> int:
    """The top set's rank among the random draws by effect (larger = stronger): 1 + the number of
    draws whose effect is at least the top set's (ties count against the top set), out of
    ``len(draw_effects) + 1``; rank 1 means every draw had a strictly smaller effect.

    >>> top_rank(0.3, [0.1, 0.3, 0.0]), top_rank(0.5, [0.1, 0.2])
    (2, 1)
    """
    return 1 + int(sum(1 for e in draw_effects if e >= top_effect - 1e-12))


def causal_study(
    model: tl_backend.Model,
    icl_prompts: Sequence,
    zsl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    config: CausalConfig | None = None,
    *,
    pad_token_id: int | None = None,
    progress: bool = True,
    answer_ids: Sequence[Sequence[int]] | None = None,
) -> CausalResult:
    """Rank heads on a selection split, then ablate and patch them on the report split.

    Args:
        model: a HookedTransformer or TransformerBridge.
        icl_prompts: k-shot prompts with ``query_label`` (gold) set.
        zsl_prompts: the zero-shot prompts of the same queries, in the same order.
        label_ids: token ids of each class's label word (first token scored).
        config: a `CausalConfig`.
        answer_ids: an open-vocabulary task's gold answer tokens, one per prompt (``icl_prompts``
            order): accuracy becomes top-1 first-token accuracy over the whole vocabulary, and heads are
            ranked with the model's top-1 token read as a class (``label_ids`` must then be one token
            per class; see the module docstring).
    """
    cfg = config or CausalConfig()
    if answer_ids is not None and len(answer_ids) != len(icl_prompts):
        raise ValueError(f"{len(answer_ids)} gold answers for {len(icl_prompts)} prompts; give one per prompt.")
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
        attention_map_length=None, progress=progress, prediction="labels" if answer_ids is None else "vocabulary", **kw,
    )
    ranking = rank_heads(run.scores(), cfg.aggregation, cfg.metric)
    top = [tuple(map(int, r)) for r in ranking[["layer", "head"]].head(cfg.k).to_numpy()]
    randoms = random_head_sets(n_layers, n_heads, cfg.k, cfg.random_draws, exclude=top, seed=cfg.seed)

    # 2. clean runs of the report split (recording head outputs for patching, means and resampling)
    icl_r = [icl_prompts[i] for i in report]
    zsl_r = [zsl_prompts[i] for i in report]
    gold = torch.tensor([p.query_label for p in icl_r])
    # (name, run, group, draw, layer, intervention, edits)
    conditions: list[tuple[str, str, str, int, int, str, list]] = []
    score = _scorer(model, label_ids, None if answer_ids is None else [answer_ids[i] for i in report], kw)
    icl_clean, icl_z = score(icl_r, record=True)
    zsl_clean, zsl_z = score(zsl_r, record=True)
    sources = resample_sources(len(report), cfg.seed) if "resample" in cfg.ablations else None

    for kind in cfg.ablations:
        sfx = cfg.suffix(kind)
        conditions.append((f"ablate top{sfx}", "icl", "top", -1, -1, kind, ablation_edits(kind, top, icl_z, sources)))
        for d, heads in enumerate(randoms):
            conditions.append((f"ablate random {d}{sfx}", "icl", "random", d, -1, kind,
                               ablation_edits(kind, heads, icl_z, sources)))
    conditions.append(("patch top into zsl", "zsl", "top", -1, -1, "patch icl->zsl", patch_heads(top, icl_z)))
    for d, heads in enumerate(randoms):
        conditions.append((f"patch random {d} into zsl", "zsl", "random", d, -1, "patch icl->zsl", patch_heads(heads, icl_z)))
    if cfg.reverse_patch:
        conditions.append(("patch top from zsl into icl", "icl", "reverse", -1, -1, "patch zsl->icl", patch_heads(top, zsl_z)))
        for d, heads in enumerate(randoms):
            conditions.append((f"patch random {d} from zsl into icl", "icl", "reverse_random", d, -1, "patch zsl->icl",
                               patch_heads(heads, zsl_z)))
    if cfg.layer_sweep:
        for layer in range(n_layers):
            heads = [(layer, h) for h in range(n_heads)]
            conditions.append((f"ablate layer {layer}", "icl", "layer", -1, layer, cfg.ablation,
                               ablation_edits(cfg.ablation, heads, icl_z, sources)))
            conditions.append((f"patch layer {layer} into zsl", "zsl", "layer", -1, layer, "patch icl->zsl",
                               patch_heads(heads, icl_z)))

    edited = {"icl": {}, "zsl": {}}
    meta = {name: dict(group=group, draw=draw, layer=layer, intervention=intervention)
            for name, _, group, draw, layer, intervention, _ in conditions}
    # every ablation and patch edits the prediction position only: each report prompt's context
    # runs once and each condition its last token (`score_conditions`)
    by = dict(label_ids=label_ids) if answer_ids is None else dict(answer_ids=[answer_ids[i] for i in report])
    for which, prompts in (("icl", icl_r), ("zsl", zsl_r)):
        mine = [c for c in conditions if c[1] == which]
        scored = score_conditions(model, prompts, [c[-1] for c in mine], reuse_prefix=cfg.prefix_reuse, progress=progress,
                                  desc=f"causal: {which} conditions", **by, **kw)
        edited[which].update({c[0]: s for c, s in zip(mine, scored)})
    if answer_ids is None:
        icl_pred, frame = icl_clean.argmax(-1), effects_frame
    else:  # open task: predictions are top-1 tokens and gold the answers' first tokens
        icl_pred, frame = icl_clean.top1, open_effects_frame
        gold = torch.tensor([int(answer_ids[i][0]) for i in report])
    ids = [int(i) for i in report]
    frames = []
    for which, clean in (("icl", icl_clean), ("zsl", zsl_clean)):
        f = frame(clean, edited[which], gold, ids, reference=icl_pred)
        f.insert(0, "run", which)
        frames.append(f)
    effects = pd.concat(frames, ignore_index=True)
    for column, default in (("group", "clean"), ("draw", -1), ("layer", -1), ("intervention", "clean")):
        effects[column] = effects["condition"].map(lambda c, column=column, default=default: meta.get(c, {}).get(column, default))
    # resample ablation: the prompt whose head outputs each prompt received (-1 elsewhere)
    source_of = dict(zip(ids, [ids[int(j)] for j in sources])) if sources is not None else {}
    effects["resample_source"] = np.where(effects["intervention"] == "resample", effects["prompt"].map(source_of).fillna(-1), -1).astype(int)

    summary, layers = _summaries(effects, cfg, [c[0] for c in conditions], len(randoms))
    icl_acc = float((icl_pred == gold).float().mean())
    zsl_acc = float((_predictions(zsl_clean) == gold).float().mean())
    info = dict(
        n_select=len(select), n_report=len(report), icl_accuracy=icl_acc, zsl_accuracy=zsl_acc,
        top_heads=[list(h) for h in top], random_heads=[[list(h) for h in s] for s in randoms],
        config=asdict(cfg), n_layers=n_layers, n_heads=n_heads,
    )
    if answer_ids is not None:
        info["scoring"] = "top-1 first token over the vocabulary (open task)"
    return CausalResult(ranking, top, randoms, effects, summary, layers if cfg.layer_sweep else None, info)


def _scorer(model, label_ids, answer_ids, kw) -> Callable:
    """``score(prompts, edits=(), record=False)``: label log-probs (`run_with_edits`), or for an open
    task with the report prompts' gold ``answer_ids`` the vocabulary scores (`open_run_with_edits`)."""
    if answer_ids is None:
        return lambda prompts, edits=(), record=False: run_with_edits(model, prompts, label_ids, edits, record=record, **kw)
    return lambda prompts, edits=(), record=False: open_run_with_edits(model, prompts, answer_ids, edits, record=record, **kw)


def _predictions(scores) -> Tensor:
    """Predicted class (label scores) or top-1 token (`AnswerScores`) of each prompt."""
    return scores.top1 if hasattr(scores, "top1") else scores.argmax(-1)


def _summaries(effects: pd.DataFrame, cfg: CausalConfig, order: list[str], n_draws: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-condition accuracy/agreement with Wilson intervals; drops and recovery with bootstrap; the
    random draws pooled (mean, spread, two-way bootstrap) and the top set against them."""
    def column(run: str, condition: str, name: str = "correct") -> np.ndarray:
        g = effects[(effects["run"] == run) & (effects["condition"] == condition)].sort_values("prompt")
        return g[name].to_numpy(dtype=float)

    icl = column("icl", "clean")
    zsl = column("zsl", "clean")
    n = len(icl)
    boot = dict(n=n, resamples=cfg.bootstrap, seed=cfg.seed)
    two_way = dict(resamples=cfg.bootstrap, seed=cfg.seed, resample_draws=cfg.resample_draws)
    gain = dict(icl_gain=float(icl.mean() - zsl.mean()))
    gain["icl_gain_low"], gain["icl_gain_high"] = bootstrap_interval(mean_difference, [icl, zsl], **boot)
    records = []
    intervention = effects.drop_duplicates("condition").set_index("condition")["intervention"]

    def add(run, condition, group, draw, layer, correct, agrees):
        lo, hi = wilson_interval(int(correct.sum()), n)
        alo, ahi = wilson_interval(int(agrees.sum()), n)
        rec = dict(run=run, condition=condition, group=group, intervention=intervention.get(condition, "clean"),
                   draw=draw, layer=layer, n=n, accuracy=float(correct.mean()), accuracy_low=lo, accuracy_high=hi,
                   agreement_icl=float(agrees.mean()), agreement_low=alo, agreement_high=ahi)
        if run == "icl" and condition != "clean":
            rec["accuracy_drop"] = float(icl.mean() - correct.mean())
            rec["drop_low"], rec["drop_high"] = bootstrap_interval(mean_difference, [icl, correct], **boot)
        if run == "zsl" and condition != "clean":
            rec["recovery"] = recovery(correct, zsl, icl)
            rec["recovery_low"], rec["recovery_high"] = bootstrap_interval(recovery, [correct, zsl, icl], **boot)
            rec.update(gain)
        records.append(rec)

    for run in ("icl", "zsl"):
        add(run, "clean", "clean", -1, -1, column(run, "clean"), column(run, "clean", "agrees_clean"))
    for condition in order:
        g = effects[effects["condition"] == condition].iloc[0]
        add(g["run"], condition, g["group"], int(g["draw"]), int(g["layer"]),
            column(g["run"], condition), column(g["run"], condition, "agrees_clean"))

    # random draws pooled: (run, top condition, random conditions, pooled name, difference name)
    pools = []
    if n_draws:
        for kind in cfg.ablations:
            sfx = cfg.suffix(kind)
            pools.append(("icl", "random_mean", f"ablate top{sfx}", [f"ablate random {d}{sfx}" for d in range(n_draws)],
                          f"ablate random (mean of {n_draws}){sfx}", f"top minus random (icl){sfx}"))
        pools.append(("zsl", "random_mean", "patch top into zsl", [f"patch random {d} into zsl" for d in range(n_draws)],
                      f"patch random (mean of {n_draws})", "top minus random (zsl)"))
        if cfg.reverse_patch:
            pools.append(("icl", "reverse_random_mean", "patch top from zsl into icl",
                          [f"patch random {d} from zsl into icl" for d in range(n_draws)],
                          f"reverse patch random (mean of {n_draws})", "top minus random (reverse)"))
    for run, group, top_name, names, pooled, difference in pools:
        stacked = np.stack([column(run, c) for c in names], axis=1)  # [prompt draw]
        agree = np.stack([column(run, c, "agrees_clean") for c in names], axis=1)
        top = column(run, top_name)
        per_draw = stacked.mean(0)
        rec = dict(run=run, condition=pooled, group=group, intervention=intervention[top_name], draw=-1, layer=-1,
                   n=n, n_draws=n_draws, accuracy=float(stacked.mean()), agreement_icl=float(agree.mean()),
                   **draw_spread(per_draw, "accuracy"))
        diff = dict(run=run, condition=difference, group="top_minus_random", intervention=intervention[top_name],
                    draw=-1, layer=-1, n=n, n_draws=n_draws)
        if run == "icl":
            rec["accuracy_drop"] = float(icl.mean() - stacked.mean())
            rec["drop_low"], rec["drop_high"] = random_sets_interval(lambda a, s: a.mean() - s.mean(), [icl], stacked, **two_way)
            # positive: the top set hurts more than random sets; rank 1: more than every draw
            diff["accuracy_drop"] = float(stacked.mean() - top.mean())
            diff["drop_low"], diff["drop_high"] = random_sets_interval(lambda t, s: s.mean() - t.mean(), [top], stacked, **two_way)
            diff["top_rank"] = top_rank(float(-top.mean()), -per_draw)
        else:
            rec["recovery"] = recovery(stacked, zsl, icl)
            rec["recovery_low"], rec["recovery_high"] = random_sets_interval(
                lambda z, i, s: recovery(s, z, i), [zsl, icl], stacked, **two_way)
            rec.update(gain, **draw_spread([recovery(stacked[:, d], zsl, icl) for d in range(n_draws)], "recovery"))
            diff["recovery"] = recovery(top, zsl, icl) - rec["recovery"]
            diff["recovery_low"], diff["recovery_high"] = random_sets_interval(
                lambda t, z, i, s: recovery(t, z, i) - recovery(s, z, i), [top, zsl, icl], stacked, **two_way)
            diff.update(gain, top_rank=top_rank(float(top.mean()), per_draw))
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
    answer_ids: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Every head of ``layer`` ablated in the ICL run and patched from it into the zero-shot run.

    No head is selected, so all prompts are used. Returns flat metrics: clean ICL and zero-shot
    accuracy, the ablated accuracy and its drop (paired bootstrap interval), agreement with the
    clean ICL prediction (Wilson), the patched zero-shot accuracy and recovery (bootstrap, not
    clipped) and the ICL gain it divides by (paired bootstrap). ``ablation`` is one of `ABLATIONS`
    (resample: each prompt takes another prompt's outputs, `resample_sources` with ``seed``). With
    ``answer_ids`` (an open task's gold answer tokens, one per prompt) accuracy is top-1 first-token
    accuracy over the whole vocabulary (`icl_kernels.engine.patching.open_run_with_edits`).
    """
    if ablation not in ABLATIONS:
        raise InvalidOptionError(f"ablation must be one of {ABLATIONS}, not {ablation!r}.")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"Layer {layer} does not exist; the model has {model.cfg.n_layers} layers.")
    kw = dict(batch_size=batch_size, pad_token_id=pad_token_id)
    if answer_ids is not None and len(answer_ids) != len(icl_prompts):
        raise ValueError(f"{len(answer_ids)} gold answers for {len(icl_prompts)} prompts; give one per prompt.")
    if answer_ids is None:
        gold = torch.tensor([p.query_label for p in icl_prompts])
    else:
        gold = torch.tensor([int(ids[0]) for ids in answer_ids])
    score = _scorer(model, label_ids, answer_ids, kw)
    icl_clean, icl_z = score(icl_prompts, record=True)
    zsl_clean = score(zsl_prompts)
    heads = [(layer, h) for h in range(model.cfg.n_heads)]
    sources = resample_sources(len(icl_prompts), seed) if ablation == "resample" else None
    edits = ablation_edits(ablation, heads, icl_z, sources)
    ablated = score(icl_prompts, edits)
    patched = score(zsl_prompts, patch_heads(heads, icl_z))
    icl_pred = _predictions(icl_clean)
    icl = (icl_pred == gold).numpy().astype(float)
    zsl = (_predictions(zsl_clean) == gold).numpy().astype(float)
    abl = (_predictions(ablated) == gold).numpy().astype(float)
    pat = (_predictions(patched) == gold).numpy().astype(float)
    n = len(gold)
    boot = dict(n=n, resamples=bootstrap, seed=seed)
    agree = int((_predictions(ablated) == icl_pred).sum())
    agree_lo, agree_hi = wilson_interval(agree, n)
    drop_lo, drop_hi = bootstrap_interval(mean_difference, [icl, abl], **boot)
    rec_lo, rec_hi = bootstrap_interval(recovery, [pat, zsl, icl], **boot)
    gain_lo, gain_hi = bootstrap_interval(mean_difference, [icl, zsl], **boot)
    return dict(
        n=n, icl_accuracy=float(icl.mean()), zsl_accuracy=float(zsl.mean()),
        ablated_accuracy=float(abl.mean()), accuracy_drop=float(icl.mean() - abl.mean()),
        drop_low=drop_lo, drop_high=drop_hi,
        ablated_agreement=agree / n, agreement_low=agree_lo, agreement_high=agree_hi,
        patched_zsl_accuracy=float(pat.mean()), recovery=recovery(pat, zsl, icl),
        recovery_low=rec_lo, recovery_high=rec_hi,
        icl_gain=float(icl.mean() - zsl.mean()), icl_gain_low=gain_lo, icl_gain_high=gain_hi,
    )
