"""The ``compare`` study: ICL vs finetuning of the key/value projections (Dai et al.) with controls.

Episodes. Text tasks: E sets of K class-balanced demonstrations from the task's train split
(stream ``episode_demos``), each shared by a consecutive share of the N test queries. The original
used one set for all queries; here E defaults to ``TEXT_EPISODES`` = 20, so that the intervals by
demonstration set rest on 20 independent units (a cluster bootstrap; 100 queries make 20 sets x 5
queries, the same number of queries as before). ``episodes=E`` sets E; a configuration that would
leave a set without a query (E > N) is refused. The learning rate is chosen on
``n_dev`` development queries taken from the train split outside every demonstration set (stream
``dev_queries``; never the test split).

The synthetic-world model (``synthetic-gpt-neo``, or any model folder with a ``world.json``) has
no text task: its task is the world itself (``task synthetic``, the default for such models). Each
episode draws one latent concept (episode e uses concept e mod n_concepts) and, from it (stream
``synthetic_episode``), K demonstrations ``x_i y_i``, its queries and its development queries; the
prompt is ``<d> x_1 y_1 <d> ... <d> x_K y_K <d> x`` and the zero-shot prompt ``<d> x``
(`icl_kernels.data.conditions.synthetic_prompt`); the delimiter plays the part of BOS. By default
there is one episode per concept, so the metrics average over concepts rather than depend on one.

Each episode's demonstrations are the finetuning data; `icl_kernels.finetuning.dai_metrics.compare_icl_with_finetuning`
then compares ZSL, ICL and FT runs on the trained model and on an untrained model of the same
architecture (`icl_kernels.finetuning.dai_metrics.untrained_copy`), which chooses its own learning rate
by the same development search. A candidate learning rate that collapses on any development fold
(one fold per demonstration set: the upper 95% Wilson bound of its accuracy more than
``--collapse-margin``, 0.25 by default, below the zero-shot accuracy on the same development
queries) is rejected.
SimAOU and SimAM are reported under both definitions of `icl_kernels.finetuning.dai_definitions`
(``--definition`` picks the one the unsuffixed keys hold, ``official`` by default), and every
finetuning-dependent metric is compared, paired over the same queries, with the same metric after
finetuning at learning rate 0 and after finetuning on another demonstration set (``controls`` in
``metrics.json``; ``--no-controls`` skips them). With several demonstration sets the intervals by
set use a cluster bootstrap from 20 sets and a t(G-1) interval on the set values below.

Writes ``metrics.json`` (``zsl_accuracy ft_accuracy icl_accuracy rec2ftp rec2ftp_chance simaou
simaou_random simaou_untrained simam_before simam_after kendall kendall_random`` and more, with
timings), ``layers.csv``, ``heads.csv``, ``examples.csv``, ``lr_search.csv`` (when the learning
rate is searched), ``config.json`` and figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from icl_kernels.data.conditions import SYNTHETIC_TASKS, synthetic_prompt
from icl_kernels.data.prompts import PromptBuilder, RandomSelector
from icl_kernels.data.synthetic_world import synthetic_world
from icl_kernels.data.tasks.registry import DEFAULT_TASK, get_task
from icl_kernels.finetuning.dai_definitions import DEFINITIONS
from icl_kernels.finetuning.dai_metrics import (
    ComparisonSettings,
    Episode,
    compare_icl_with_finetuning,
    training_sequences,
    untrained_copy,
)
from icl_kernels.finetuning.finetune import COLLAPSE_MARGIN, DEFAULT_LRS
from icl_kernels.finetuning.recording import POSITIONS
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.utils.config import Options, PromptOptions
from icl_kernels.utils.errors import InvalidOptionError, PromptTooLongError
from icl_kernels.utils.plotting import layer_head_heatmaps
from icl_kernels.utils.stats import MIN_BOOTSTRAP_CLUSTERS, rng

#: Demonstration sets of a text-task run by default: enough independent units for a cluster bootstrap
#: (`icl_kernels.utils.stats.MIN_BOOTSTRAP_CLUSTERS`).
TEXT_EPISODES = MIN_BOOTSTRAP_CLUSTERS

__all__ = [
    "TEXT_EPISODES",
    "CompareConfig",
    "CompareReport",
    "EpisodeSource",
    "episode_source",
    "episode_count",
    "build_episodes",
    "text_episodes",
    "synthetic_episodes",
    "compare_figures",
    "run",
]


@dataclass
class CompareConfig(Options):
    """Options of one ``compare`` run (see the module docstring)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    prompts: PromptOptions = field(default_factory=lambda: PromptOptions(task=None))  # type: ignore[arg-type]
    position: str = field(default="prediction", metadata={
        "choices": POSITIONS, "help": "recording position: last prompt token, or the first label token appended"})
    n_dev: int = field(default=32, metadata={"help": "development queries for the learning-rate search"})
    episodes: int | None = field(default=None, metadata={
        "help": f"demonstration sets, each shared by n_test / episodes queries (default: {TEXT_EPISODES} for text "
                "tasks, so intervals by set have 20 independent units, i.e. a cluster bootstrap: 20 sets x 5 "
                "queries at n_test 100; one per concept for the synthetic world). Must be <= n_test"})
    lrs: tuple[float, ...] = field(default=DEFAULT_LRS, metadata={"help": "candidate learning rates"})
    lr: float | None = field(default=None, metadata={"help": "fixed learning rate (skips the search)"})
    untrained: bool = field(default=True, metadata={"help": "run the untrained-model control"})
    direct: bool = field(default=True, metadata={"help": "compare dW_ICL with the finetuning update"})
    definition: str = field(default="official", metadata={
        "choices": DEFINITIONS,
        "help": "SimAOU/SimAM definition of the headline keys: official (Dai et al.'s code: L2-normalised "
                "attention outputs; pre-softmax scores incl. the recording token) or softmax-weights (raw "
                "outputs; softmax weights on the query's tokens). Both are always reported"})
    controls: bool = field(default=True, metadata={
        "help": "run the lr -> 0 (identity) and mismatched-demonstration controls of every FT-dependent metric"})
    collapse_margin: float = field(default=COLLAPSE_MARGIN, metadata={
        "help": "reject a candidate lr that collapses on a dev fold (demonstration set): the upper 95%% Wilson "
                "bound of its dev accuracy there is more than this below the zero-shot accuracy on the same queries"})

    prefix_reuse: bool = field(default=True, metadata={
        "identity": False,  # changes what is kept for display / how fast, not a number: not in the fingerprint
        "help": "run each demonstration set once and record its queries' ICL prompts after it (exact); "
                "off: every ICL prompt in full"})
    shared_work: bool = field(default=True, metadata={
        "identity": False,  # the same numbers bit for bit, only faster: not in the fingerprint
        "help": "compute once what runs share (each set's first SGD step across candidate lrs, the chosen lr's "
                "runs kept from the search, the mismatched control taken from the next set's run, the lr-0 "
                "control's recording from the zero-shot one) and every bootstrap's resamples at once; the same "
                "numbers bit for bit. Off: every run and resample on its own"})
    batched_finetuning: bool = field(default=True, metadata={
        "identity": False,  # equal to float64 rounding, only faster: not in the fingerprint
        "help": "with shared work, train the learning-rate search's runs of all demonstration sets in one batch "
                "per rate (one row and one copy of the key/value weights per run) and score them on the development "
                "queries the same way; equal to float64 rounding, float32 rounds differently (a near tie can "
                "choose another lr). Off, or a model it cannot batch (a TransformerBridge): one run at a time"})

    def __post_init__(self) -> None:
        problems = []
        shots, n_test = self.prompts.shots, self.prompts.n_test
        if shots < 1:
            problems.append(f"shots must be >= 1 (finetuning needs demonstrations), not {shots}")
        if self.position not in POSITIONS:
            problems.append(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.definition not in DEFINITIONS:
            problems.append(f"definition must be one of {DEFINITIONS}, not {self.definition!r}")
        if self.lr is None and self.n_dev < 1:
            problems.append("n_dev must be >= 1 to choose the learning rate (or give a fixed lr)")
        if self.episodes is not None and not 1 <= self.episodes <= n_test:
            problems.append(f"episodes must be in [1, n_test={n_test}] (every demonstration set needs at least one "
                            f"query), not {self.episodes}")
        if not (math.isfinite(self.collapse_margin) and self.collapse_margin >= 0):
            problems.append(f"collapse_margin must be a finite number >= 0, not {self.collapse_margin}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be positive, not {self.lr}")
        if not self.lrs or any(not (math.isfinite(x) and x > 0) for x in self.lrs):
            problems.append(f"every candidate lr must be positive, got {self.lrs}")
        if problems:
            raise InvalidOptionError("Invalid compare options: " + "; ".join(problems) + ".")


# ------------------------------------------------------------------------------------------------
# Episodes
# ------------------------------------------------------------------------------------------------


@dataclass
class EpisodeSource:
    """Where a run's episodes come from: a registered text task, or the synthetic world of the model."""

    task: Any = None
    world: Any = None

    @property
    def name(self) -> str:
        return self.task.name if self.task is not None else "synthetic"


def episode_source(cfg: CompareConfig) -> EpisodeSource:
    """The task or the synthetic world of a run, checked against the model before it loads.

    Raises:
        InvalidOptionError: a text task for a synthetic-world model.
        MissingAssetError: the synthetic world asked of a model without one.
        UnknownTaskError: an unknown task name.
    """
    task_name = cfg.prompts.task
    world = synthetic_world(cfg.model.model, required=task_name in SYNTHETIC_TASKS)
    if world is not None:
        if task_name not in (None, *SYNTHETIC_TASKS):
            raise InvalidOptionError(
                f"{cfg.model.model!r} is trained on the synthetic world, not on text: use --task synthetic (the "
                f"default for this model), not {task_name!r}."
            )
        return EpisodeSource(world=world)

    return EpisodeSource(task=get_task(task_name or DEFAULT_TASK))


def episode_count(cfg: CompareConfig, source: EpisodeSource) -> int:
    """The number of demonstration sets of a run: ``cfg.episodes``, else `TEXT_EPISODES` for a text
    task and one per concept (at most ``n_test``) for the synthetic world.

    Raises:
        InvalidOptionError: the sets would not all get a query (more sets than test queries).
    """
    n_test = cfg.prompts.n_test
    if cfg.episodes is not None:
        n_episodes = cfg.episodes
    elif source.world is not None:
        n_episodes = min(source.world.n_concepts, n_test)
    else:
        n_episodes = TEXT_EPISODES
    if not 1 <= n_episodes <= n_test:
        default = "" if cfg.episodes is not None else f" (the default for text tasks, {TEXT_EPISODES})"
        raise InvalidOptionError(
            f"{n_episodes} demonstration sets{default} for n_test={n_test} queries would leave a set with fewer "
            f"than 1 query: use --n-test >= {n_episodes} (e.g. {5 * n_episodes} for {n_episodes} sets x 5 "
            "queries) or fewer --episodes."
        )
    return n_episodes


def _split(n: int, parts: int) -> list[np.ndarray]:
    return list(np.array_split(np.arange(n), parts))


def text_episodes(task, tokenizer, n_ctx: int | None, cfg: CompareConfig) -> tuple[list[Episode], list[list[int]]]:
    """(episodes, label ids) for a text task: balanced demonstrations from train, queries from test."""
    seed, shots, n_test = cfg.prompts.seed, cfg.prompts.shots, cfg.prompts.n_test
    data = task.load(seed=seed)
    pool, test = data["train"], data["test"]
    if n_test > len(test):
        raise InvalidOptionError(f"n_test={n_test} but task {task.name!r} has {len(test)} test examples; use fewer.")
    n_episodes = episode_count(cfg, EpisodeSource(task=task))
    builder = PromptBuilder(task, tokenizer, n_ctx=n_ctx)
    builder.check_shots_fit(shots)  # before drawing demonstrations or running the model
    pool_labels = np.asarray(pool["label"])
    selector = RandomSelector(balanced=True)
    demo_sets = [selector.select(pool_labels, None, shots, rng("episode_demos", seed, e)) for e in range(n_episodes)]
    used = {i for s in demo_sets for i in s}
    rest = [i for i in rng("dev_queries", seed).permutation(len(pool)).tolist() if i not in used]
    dev_indices = rest[: cfg.n_dev] if cfg.lr is None else []
    if builder.bos_id is None:
        raise InvalidOptionError(
            "This tokenizer has no BOS token; the comparison aligns demonstrations through it. Use another model."
        )
    dev_prompts = [builder.build([], pool[i], query_index=i) for i in dev_indices]
    dev_gold = [int(pool[i]["label"]) for i in dev_indices]
    episodes = []
    for e, chunk in enumerate(_split(n_test, n_episodes)):
        demos = [pool[i] for i in demo_sets[e]]
        icl, zsl, gold = [], [], []
        for qi in chunk.tolist():
            query = test[qi]
            icl.append(builder.build(demos, query, demo_indices=demo_sets[e], query_index=qi))
            zsl.append(builder.build([], query, query_index=qi))
            gold.append(int(query["label"]))
        episodes.append(Episode(icl, zsl, gold, training_sequences(icl[0]), dev_prompts, dev_gold,
                                name=f"demos {demo_sets[e]}"))
    return episodes, builder.label_ids


def synthetic_episodes(world, n_ctx: int | None, cfg: CompareConfig) -> tuple[list[Episode], list[list[int]]]:
    """(episodes, label ids) on the synthetic world: one concept per episode (see the module docstring)."""
    seed, shots, n_test = cfg.prompts.seed, cfg.prompts.shots, cfg.prompts.n_test
    if n_ctx is not None and world.prompt_len(shots) > n_ctx:
        raise PromptTooLongError(
            f"A {shots}-shot synthetic prompt is {world.prompt_len(shots)} tokens, longer than the "
            f"model's context {n_ctx}; use fewer shots."
        )
    n_episodes = episode_count(cfg, EpisodeSource(world=world))
    n_dev = 0 if cfg.lr is not None else max(1, math.ceil(cfg.n_dev / n_episodes))
    length = world.config.x_len
    episodes = []
    for e, chunk in enumerate(_split(n_test, n_episodes)):
        concept = e % world.n_concepts
        generator = rng("synthetic_episode", seed, e)
        demos = world.sample_sequences(np.full(shots, concept), length + 1, generator)
        queries = world.sample_sequences(np.full(len(chunk), concept), length + 1, generator)
        dev = (world.sample_sequences(np.full(n_dev, concept), length + 1, generator) if n_dev
               else np.zeros((0, length + 1), np.int64))
        icl = [synthetic_prompt(world, demos, q[:length], q[length]) for q in queries]
        zsl = [synthetic_prompt(world, demos[:0], q[:length], q[length]) for q in queries]
        dev_prompts = [synthetic_prompt(world, demos[:0], q[:length], q[length]) for q in dev]
        episodes.append(Episode(icl, zsl, [int(q[length]) for q in queries], training_sequences(icl[0]),
                                dev_prompts, [int(q[length]) for q in dev], name=f"concept {concept}"))
    return episodes, [[v] for v in range(world.vocab_size)]


def build_episodes(
    cfg: CompareConfig, model: tl_backend.Model, source: EpisodeSource | None = None
) -> tuple[list[Episode], list[list[int]]]:
    """(episodes, label ids) of a run on a loaded model: `synthetic_episodes` or `text_episodes`."""
    source = source or episode_source(cfg)
    n_ctx = int(model.cfg.n_ctx)
    if source.world is not None:
        return synthetic_episodes(source.world, n_ctx, cfg)
    return text_episodes(source.task, model.tokenizer, n_ctx, cfg)


# ------------------------------------------------------------------------------------------------
# Report and figures
# ------------------------------------------------------------------------------------------------


def compare_figures(layers: Sequence[dict], heads: Sequence[dict], title: str = "") -> dict:
    """Per-layer lines (SimAOU, Kendall, SimAM) and layer x head maps (SimAM, dW cosine)."""

    layer_index = [row["layer"] for row in layers]
    figs = {}

    def lines(names: Sequence[str], heading: str, y_title: str) -> go.Figure:
        fig = go.Figure()
        for name in names:
            if name in layers[0]:
                fig.add_trace(go.Scatter(x=layer_index, y=[row[name] for row in layers], mode="lines+markers",
                                         name=name))
        fig.add_hline(y=0, line=dict(color="grey", width=1))
        fig.update_layout(title=f"{heading} {title}".strip(), xaxis_title="layer", yaxis_title=y_title,
                          template="plotly_white")
        return fig

    figs["simaou"] = lines(["simaou", "simaou_random", "simaou_untrained"], "SimAOU per layer", "cosine")
    figs["kendall"] = lines(["kendall", "kendall_random", "kendall_untrained"], "Kendall tau per layer", "tau")
    figs["simam"] = lines(["simam_before", "simam_after", "simam_before_untrained", "simam_after_untrained"],
                          "SimAM per layer", "cosine")
    if heads:
        n_layers = max(r["layer"] for r in heads) + 1
        n_heads = max(r["head"] for r in heads) + 1

        def grid(name: str) -> np.ndarray:
            out = np.full((n_layers, n_heads), np.nan)
            for r in heads:
                out[r["layer"], r["head"]] = r[name]
            return out

        figs["simam_heads"] = layer_head_heatmaps(
            {"before (ICL vs ZSL)": grid("simam_before"), "after (ICL vs FT)": grid("simam_after")},
            f"SimAM per head {title}".strip(),
        )
        if "dw_cosine" in heads[0]:
            figs["dw_heads"] = layer_head_heatmaps(
                {"cos(dW_ICL, dW_FT)": grid("dw_cosine"), "cos(dW_ICL q, dW_FT q)": grid("dw_output_cosine")},
                f"dW_ICL vs the finetuning update {title}".strip(), diverging=True,
            )
    return figs


@dataclass
class CompareReport(Report):
    """Tables ``layers``, ``heads``, ``examples``, ``lr_search``; summary = ``metrics.json``."""

    summary_file: ClassVar[str] = "metrics.json"

    def figures(self) -> dict[str, Any]:
        m = self.summary
        title = f"({m.get('model')}, {m.get('task')}, {m.get('shots')} shots)"
        return compare_figures(self.tables["layers"].to_dict("records"), self.tables["heads"].to_dict("records"),
                               title)

    def line(self) -> str:
        m = self.summary
        return (
            f"{m['model']} on {m['task']} ({m['shots']} shots, n={m['n_test']}, {m['n_episodes']} demonstration sets, "
            f"lr {m['lr']:g}{_untrained_lr(m)}, position "
            f"{m['position']}): accuracy ZSL {m['zsl_accuracy']:.3f} FT {m['ft_accuracy']:.3f} ICL "
            f"{m['icl_accuracy']:.3f}; Rec2FTP {m['rec2ftp']:.3f} (chance-corrected {m['rec2ftp_chance']:.3f}); "
            f"SimAOU {m['simaou']:.3f} (random {m['simaou_random']:.3f}, untrained {m['simaou_untrained']:.3f}); "
            f"SimAM {m['simam_before']:.3f} -> {m['simam_after']:.3f}; Kendall {m['kendall']:.3f} (random "
            f"{m['kendall_random']:.3f}); headline definition {m['definition']}; "
            f"official SimAOU {m['simaou_official']:.3f} SimAM {m['simam_before_official']:.3f} -> "
            f"{m['simam_after_official']:.3f}; softmax-weights SimAOU {m['simaou_softmax_weights']:.3f} SimAM "
            f"{m['simam_before_softmax_weights']:.3f} -> {m['simam_after_softmax_weights']:.3f}"
            + "".join(control_lines(m.get("controls", {})))
            + "".join(paired_lines(m))
        )


def _untrained_lr(m: dict) -> str:
    return f" (untrained {m['lr_untrained']:g})" if "lr_untrained" in m else ""


def _interval_text(d: dict) -> str:
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def paired_lines(m: dict) -> list[str]:
    """SimAM after minus before and trained minus untrained (paired), and the interval method."""
    paired = m.get("paired")
    if not paired:
        return []
    out = ["; SimAM after minus before " + ", ".join(
        f"{tag} {_interval_text(d)}" for tag, d in paired["simam_after_minus_before"].items())]
    gap = paired.get("trained_minus_untrained")
    if gap:
        names = ("simaou_official", "simaou_softmax_weights", "simam_after_minus_before_official",
                 "simam_after_minus_before_softmax_weights", "kendall", "icl_accuracy")
        out.append("; trained minus untrained " + ", ".join(f"{n} {_interval_text(gap[n])}" for n in names))
    settings = m.get("interval_settings", {})
    out.append(f"; intervals over {paired['unit']}: {settings.get('method')} ({settings.get('resamples')} resamples, "
               f"seed {settings.get('seed')})")
    return out


def control_lines(controls: dict) -> list[str]:
    """One clause per control and metric: trained minus control [interval] and the verdict."""
    out = []
    for control, entry in controls.items():
        parts = []
        for name, value in entry["metrics"].items():
            d = value["difference"]
            parts.append(f"{name} {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['verdict']})")
        out.append(f"; trained minus {control}: " + ", ".join(parts))
    return out


# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------


def run(cfg: CompareConfig, model: tl_backend.Model | None = None, progress: bool = True) -> CompareReport:
    """Build the episodes, run the comparison on the model (loaded from ``cfg.model`` when not given)
    and on its untrained copy, and return the report."""
    start = time.perf_counter()
    source = episode_source(cfg)  # a bad task or model/task pair fails before the model loads
    episode_count(cfg, source)  # and so does a set without a query
    if model is None:
        model = cfg.model.load()
    episodes, label_ids = build_episodes(cfg, model, source)
    timing: dict[str, float] = {}
    untrained = None
    if cfg.untrained:
        built = time.perf_counter()
        untrained = untrained_copy(model, cfg.model.model, seed=cfg.prompts.seed)
        timing["untrained_build_s"] = time.perf_counter() - built
    settings = ComparisonSettings(position=cfg.position, lrs=tuple(cfg.lrs), lr=cfg.lr, seed=cfg.prompts.seed,
                                  direct=cfg.direct, definition=cfg.definition, controls=cfg.controls,
                                  collapse_margin=cfg.collapse_margin, prefix_reuse=cfg.prefix_reuse,
                                  shared_finetuning=cfg.shared_work, vectorised_intervals=cfg.shared_work,
                                  batched_finetuning=cfg.batched_finetuning)
    result = compare_icl_with_finetuning(model, episodes, label_ids, settings, untrained=untrained,
                                         progress=progress, log=print if progress else None)
    if source.world is None:
        n_dev = len(episodes[0].dev_gold)  # shared by every episode
    else:
        n_dev = sum(len(ep.dev_gold) for ep in episodes)
    summary = dict(result.metrics)
    summary.update(model=cfg.model.model, task=source.name, shots=cfg.prompts.shots, seed=cfg.prompts.seed,
                   n_dev=n_dev, backend=tl_backend.backend_of(model))
    timing.update(result.timing)
    timing["total_s"] = time.perf_counter() - start
    summary["timing"] = timing
    tables = dict(
        layers=pd.DataFrame(result.layers),
        heads=pd.DataFrame(result.heads),
        examples=pd.DataFrame(result.examples),
        lr_search=pd.DataFrame(result.lr_table) if result.lr_table else None,
    )
    return CompareReport(study="compare", config=cfg, tables=tables, summary=summary)


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('compare', (
    ('(untrained\\.)?(zsl|ft|icl)_accuracy', 'zero-shot, finetuned (key/value projections on the demonstrations) and ICL accuracy on the test queries (Wilson interval; `untrained.`: the untrained model)'),
    ('(untrained\\.)?(intervals\\.)?rec2ftp(_chance|_baseline)?', 'Rec2FTP = N(FT right, ZSL wrong, ICL right) / N(FT right, ZSL wrong) (`_baseline`: P(ICL right | ZSL wrong); `_chance`: (Rec2FTP - baseline) / (1 - baseline))'),
    ('(untrained\\.)?simaou(_random)?(_official|_softmax_weights)?', 'SimAOU: cosine of the ICL and finetuning changes of the attention output against zero-shot, mean over layers (`_random`: a random direction instead of the FT change; suffix: the definition, unsuffixed: the chosen one)'),
    ('(untrained\\.)?simam_(before|after)(_official|_softmax_weights)?', 'SimAM: cosine of the ICL attention map with the zero-shot (before) and finetuned (after) maps, mean over layers and heads'),
    ('(untrained\\.)?kendall(_random)?', "Kendall tau-b between ICL attention scores to the demonstration tokens and the finetuning side's scores, mean over layers (`_random`: against uniform noise)"),
    ('(untrained\\.)?intervals\\.\\w+_minus_\\w+', 'paired differences (ICL minus FT, FT minus ZSL, ICL minus ZSL), bootstrap over queries'),
    ('intervals_by_episode\\..*', 'the same quantities with intervals by demonstration set (cluster bootstrap)'),
    ('paired\\..*', 'paired differences by demonstration set: SimAM after minus before, trained minus untrained model'),
    ('controls\\.\\w+\\..*', 'each finetuning-dependent metric against a control (finetuning at lr 0, or on another demonstration set): control value and difference'),
    ('(untrained\\.)?(intervals\\.)?(dw_|w_zsl|ft_dw|identity_max_abs_error|mean_demo_tokens).*', 'norms and cosines of the ICL update (dW) and the finetuning update, per token; the identity check'),
    ('lr_selection\\..*|lr|lr_untrained|(untrained\\.)?lr', 'the learning-rate search on development queries and the chosen rates'),
    ('(simaou|simam_before|simam_after|kendall|kendall_random)_untrained', 'the untrained model\'s value (as under `untrained.`)'),
    ('interval_settings\\..*', 'how the intervals were drawn: level, number of demonstration sets, resamples, seed'),
    ('timing\\..*', 'seconds spent per stage (volatile)'),
    ('n_test|n_episodes|n_dev|n_ftp|shots|seed|(untrained\\.)?n_ftp', 'sizes: test queries, demonstration sets, development queries, queries finetuning fixes'),
))

register(
    "compare", CompareConfig, run,
    help=builtin_help("compare"),
    description="\n\n".join(__doc__.split("\n\n")[:3]),
)
