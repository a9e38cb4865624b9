"""ICL vs finetuning, head by head: Dai et al.'s metrics with the controls their critics asked for.

Setup. An *episode* is one set of k demonstrations shared by a group of test queries (the
original used one set for the whole test split; the synthetic world uses one per latent concept).
For every query three runs are compared:

* ZSL: the original model on the zero-shot prompt ``[BOS] x``;
* ICL: the original model on the k-shot prompt ``[BOS] x_1 y_1 sep ... x_k y_k sep x``;
* FT: the model finetuned on the episode's demonstrations (`icl_kernels.finetuning.finetune`) on ``[BOS] x``.

Everything is read at an explicit *recording position*: ``"prediction"`` (the last prompt token,
whose next-token distribution is the prediction; the default) or ``"first-label"`` (the first token
of the first class's label word appended after the prompt: what the original code recorded).
Predictions always come from the prediction position (the first token of each label word).
Each run is one forward pass recorded by `icl_kernels.finetuning.recording.record`; the ICL
prompts of one demonstration set share everything before the query, which is run once per set
(`icl_kernels.finetuning.recording.encode_recording_prefix`) and reused by each query's recording
(``ComparisonSettings.prefix_reuse``, on by default; the records equal the full forward's to
1e-10 in float64 where the model computes in float64, ``tests/unit/test_recording_prefix.py``).
Work that several runs share is done once (``ComparisonSettings.shared_finetuning``: each set's
first SGD step across the candidate rates, the chosen rate's runs kept from the search, each set's
run reused as the previous set's mismatched control, the lr-0 control's recording taken from the
zero-shot one) and the bootstrap resamples are computed together (``vectorised_intervals``); both
give the same numbers bit for bit (``tests/unit/test_compare_shared.py``).

Metrics (the definitions collected in the project's shared reference `papers.md`, part A):

* accuracy of ZSL, FT and ICL;
* Rec2FTP = N(FT right, ZSL wrong, ICL right) / N(FT right, ZSL wrong). Chance correction: the same
  rate among *all* ZSL-wrong queries, ``b = P(ICL right | ZSL wrong)``, is what Rec2FTP would be if
  FT's successes told nothing about ICL's; ``rec2ftp_chance = (Rec2FTP - b) / (1 - b)`` (0: no
  more overlap than chance, 1: ICL recalls every FT success);
* SimAOU per layer, with ``h`` the attention-module output (``hook_attn_out``) at the recording
  position, and SimAM per layer and head (before = cos(ICL, ZSL), after = cos(ICL, FT)), each under
  two definitions (`icl_kernels.finetuning.dai_definitions`, which cites the official code):

  - ``official`` (default): SimAOU = ``cos(n(h_ICL) - n(h_ZSL), n(h_FT) - n(h_ZSL))`` with ``n`` the
    L2 normalisation (``understand_icl/icl_ft/compute_sim.py`` lines 63-67 and 126-136, called with
    ``normalize=True`` on line 226); SimAM = cosine of the pre-softmax scores ``q.k/sqrt(d)`` from
    the recording position to the query's tokens *and the recording token itself*
    (``fairseq/fairseq/modules/multihead_attention.py``, ``MultiheadAttention.forward``: the map is
    ``bmm(q, k^T)`` before mask and softmax; ``struprompting/criterions/fs_eval.py``,
    ``process_attention_map_classification``: slice ``[:, :, -1, c_len:]``; ``compute_sim.py``
    line 230: ``softmax=False``);
  - ``softmax-weights`` (this package's earlier variant): SimAOU = ``cos(h_ICL - h_ZSL, h_FT -
    h_ZSL)``; SimAM = cosine of the softmax weights to the query's own tokens.

  The unsuffixed keys (``simaou``, ``simam_before``, ``simam_after``, ``simaou_random``) hold the
  definition chosen by ``ComparisonSettings.definition``; ``<name>_official`` and
  ``<name>_softmax_weights`` hold both. Baselines: the same SimAOU with a zero-mean isotropic
  Gaussian direction instead of the FT update (``simaou_random``), and the whole metric on an
  *untrained* model of the same architecture (random weights, finetuned the same way:
  ``simaou_untrained``; Deutch et al.'s control);
* Kendall tau-b per layer between the ICL side, pre-softmax scores of the recording position to
  every visible demonstration token summed over heads, and the FT side, ``sum_heads Q'^T q`` with
  ``Q'`` the queries recorded for each training token during finetuning and ``q`` the finetuned
  model's query at the recording position (both in the rotary-free frame of
  `icl_kernels.finetuning.relaxation`, so token positions do not enter). Baseline: tau with uniform noise;
* the direct comparison: dW_ICL (demonstration part of the relaxed attention, ``d_head x d_head``
  per head) against the change that finetuning made to the zero-shot map,
  ``dW_FT = W_ZSL(FT model) - W_ZSL(original)`` on the zero-shot prompt: cosine of the matrices,
  cosine of their action on the zero-shot query, and norms; plus the Frobenius norms of the actual
  updates of ``W_K`` and ``W_V``.

Controls that can fail (``ComparisonSettings.controls``). Every FT-dependent metric (SimAOU and SimAM
after under both definitions, Kendall, FT accuracy, Rec2FTP) is recomputed on the same queries with
the finetuning replaced by (a) finetuning at learning rate exactly 0 (``lr0``: dW_FT = 0, the
training queries recorded by the same passes) and (b) finetuning at the chosen rate on the next
episode's demonstrations (``mismatched``; needs two episodes). The summary's ``controls`` gives,
per control and metric, the control's value and trained minus control paired over the queries with
its interval; a metric whose difference with ``lr0`` holds 0 is labelled "not informative here".
At lr 0 SimAOU is undefined (h_FT = h_ZSL) and SimAM after equals SimAM before, so the lr0
difference of SimAM after is the paired after-minus-before.

Intervals: over queries (percentile bootstrap, Wilson for accuracies) and, with several episodes,
over demonstration sets by `icl_kernels.utils.stats.clustered_interval` (cluster bootstrap from 20
sets, a t(G-1) interval on the set values below, never narrower than the query-level interval);
each entry records its method, resamples and seed (``interval_settings`` in the summary).

Means: per layer over queries (NaN-aware), then over layers (and heads for SimAM). Each query's
relaxed identity ``(W_ZSL + dW_ICL) q == relaxed z`` is checked on the fly; the worst error is
reported (``identity_max_abs_error``).

Paired intervals (``paired`` in the summary): SimAM after minus before (trained and untrained, both
definitions) and trained minus untrained (accuracies, SimAOU, SimAM before/after/after-minus-before,
Kendall), each over the same queries, with the demonstration set as the unit when there are several.

The learning rate is chosen once, for all episodes, by `icl_kernels.finetuning.finetune.select_lr` on the
episodes' development queries (zero-shot prompts scored after finetuning), separately for the trained
model and for the untrained control (`choose_lr`; ``lr`` and ``lr_untrained`` in the summary). One
*fold* is one episode: the model finetuned on its demonstrations, scored on its development queries.
A candidate rate *collapses* when on some fold the upper end of the 95% Wilson interval of its
accuracy is more than ``ComparisonSettings.collapse_margin`` (default 0.25, absolute) below the
unfinetuned model's zero-shot accuracy on the same queries (a 2-query fold collapses only at 0 of 2
against 2 of 2), or when on some fold it gives one label to every development query while the gold
labels and the unfinetuned model's answers there take two or more (a constant classifier: at lr 0.1
smollm2 answered one label to every development query on 15 of its 20 SMS sets); collapsed rates are rejected, and a
search in which every
rate collapses stops with `icl_kernels.utils.errors.LearningRateCollapseError` naming rates and folds. `compare_icl_with_finetuning` runs everything and returns the summary
metrics and tidy per-layer, per-head and per-query rows (`CompareResult`); the ``compare`` study
(`icl_kernels.studies.compare`) builds the episodes from a task or the synthetic world.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.hooks import attention_spec, repeat_kv, visibility_mask
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.prefix_cache import common_prefix_length, reuse_reason
from icl_kernels.finetuning.batched_finetune import batch_reason, finetune_runs, first_steps, row_label_log_probs
from icl_kernels.finetuning.dai_definitions import (
    DEFINITION_TAGS,
    DEFINITIONS,
    check_definition,
    kendall,
    simam,
    simam_span,
    simaou,
    simaou_update,
)
from icl_kernels.finetuning.finetune import (
    COLLAPSE_MARGIN,
    DEFAULT_LRS,
    DevScore,
    FinetuneResult,
    FirstStep,
    LrSelection,
    finetune,
    first_step,
    kv_weights,
    select_lr,
)
from icl_kernels.finetuning.recording import (
    POSITIONS,
    Record,
    RecordingPrefix,
    encode_recording_prefix,
    record,
    recording_tokens,
)
from icl_kernels.finetuning.relaxation import decompose, linear_attention, stable_rank
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.loading import hf_to_transformer_lens
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import (
    BOOTSTRAP_RESAMPLES,
    MIN_BOOTSTRAP_CLUSTERS,
    UNTRAINED_SEED_OFFSET,
    batched_statistic,
    clustered_interval,
    cosine,
    kendall_tau,
    mean_difference,
    paired_bootstrap,
    proportion,
)

__all__ = [
    "Episode",
    "rec2ftp",
    "training_sequences",
    "first_label_tokens",
    "ComparisonSettings",
    "CompareResult",
    "compare_icl_with_finetuning",
    "choose_lr",
    "untrained_copy",
    "demo_token_mask",
]

# ------------------------------------------------------------------------------------------------
# Pure scores
# ------------------------------------------------------------------------------------------------


def rec2ftp(
    zsl_right: Bool[Tensor, " n"] | np.ndarray, ft_right: Bool[Tensor, " n"] | np.ndarray,
    icl_right: Bool[Tensor, " n"] | np.ndarray,
) -> dict:
    """Rec2FTP, its chance level ``P(ICL right | ZSL wrong)`` and the chance-corrected value."""
    zsl, ft, icl = (np.asarray(a, dtype=bool) for a in (zsl_right, ft_right, icl_right))
    ftp = ft & ~zsl
    zsl_wrong = ~zsl
    rec = float((ftp & icl).sum() / ftp.sum()) if ftp.sum() else float("nan")
    base = float((zsl_wrong & icl).sum() / zsl_wrong.sum()) if zsl_wrong.sum() else float("nan")
    if math.isnan(rec) or math.isnan(base) or base >= 1.0:
        corrected = float("nan")
    else:
        corrected = (rec - base) / (1.0 - base)
    return dict(rec2ftp=rec, rec2ftp_baseline=base, rec2ftp_chance=corrected, n_ftp=int(ftp.sum()))


# ------------------------------------------------------------------------------------------------
# Prompts and episodes
# ------------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """Demonstrations shared by a group of queries, and the development queries for the lr search.

    ``icl_prompts[i]`` and ``zsl_prompts[i]`` are the same query with and without the demonstrations;
    ``train_sequences`` are the demonstrations as finetuning sequences (``[BOS] x_i y_i``).
    """

    icl_prompts: list[IclPrompt]
    zsl_prompts: list[IclPrompt]
    gold: list[int]
    train_sequences: list[list[int]]
    dev_prompts: list[IclPrompt] = field(default_factory=list)
    dev_gold: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if not (len(self.icl_prompts) == len(self.zsl_prompts) == len(self.gold)):
            raise ValueError("An episode needs one ICL prompt, one zero-shot prompt and one gold label per query.")
        if len(self.dev_prompts) != len(self.dev_gold):
            raise ValueError("An episode needs one gold label per development prompt.")
        for prompt in self.icl_prompts:
            if prompt.bos_position != 0:
                raise ValueError(
                    "Prompts must start with a BOS (or delimiter) token: the finetuning sequences and the "
                    "recorded training queries are aligned through it."
                )


def training_sequences(prompt: IclPrompt) -> list[list[int]]:
    """The demonstrations of a prompt as finetuning sequences: BOS then the tokens of ``x_i y_i``."""
    if prompt.bos_position != 0:
        raise ValueError("training_sequences needs a prompt that starts with BOS.")
    bos = prompt.tokens[0]
    return [[bos, *prompt.tokens[start:end]] for start, end in prompt.demo_spans]


def first_label_tokens(label_ids: Sequence[Sequence[int]]) -> list[int]:
    """First token of each label word; they must differ (classes are scored by it)."""
    first = [int(ids[0]) for ids in label_ids]
    if len(set(first)) != len(first):
        raise ValueError(
            f"Label words share a first token ({first}); this comparison scores classes by their first "
            "token. Choose label words whose first tokens differ."
        )
    return first


def demo_token_mask(prompt: IclPrompt, width: int) -> Bool[Tensor, "1 pos"]:
    """The keys of a recorded ICL prompt (``width`` tokens) that make dW_ICL: the demonstrations and
    their separators, ``1 .. query_span[0] - 1``. BOS, the query's own tokens and anything recorded
    after them (the appended first label token) belong to W_ZSL, as in the zero-shot prompt.
    """
    start = prompt.query_span[0]
    if not 1 <= start <= width:
        raise ValueError(f"The query starts at {start}, outside a recorded prompt of {width} tokens.")
    mask = torch.zeros(1, width, dtype=torch.bool)
    mask[0, 1:start] = True
    return mask


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------


@dataclass
class ComparisonSettings:
    """How one comparison runs: recording position, learning rate (fixed or searched), noise seed,
    the SimAOU/SimAM definition the unsuffixed keys hold, and whether the lr -> 0 and mismatched
    controls run."""

    position: str = "prediction"
    lrs: tuple[float, ...] = DEFAULT_LRS
    lr: float | None = None  # fixed learning rate: skip the development search
    seed: int = 0
    direct: bool = True  # the dW_ICL vs finetuning-update comparison
    definition: str = "official"  # which SimAOU / SimAM the headline keys hold (both are always reported)
    controls: bool = True  # the lr -> 0 and mismatched-update controls
    #: a candidate lr is rejected when on some fold its dev accuracy is more than this below zero-shot
    collapse_margin: float = COLLAPSE_MARGIN
    #: record each demonstration set's ICL prompts after one shared pass over the demonstrations
    #: (`icl_kernels.finetuning.recording.encode_recording_prefix`); False: every ICL prompt in full
    prefix_reuse: bool = True
    #: compute the bootstrap resamples of every interval at once (`icl_kernels.utils.stats.batched_statistic`;
    #: the same draws and values bit for bit); False: one statistic call per resample
    vectorised_intervals: bool = True
    #: compute once what several finetuning runs share (`icl_kernels.finetuning.finetune.first_step`: the
    #: first SGD step of each demonstration set at every candidate rate; the chosen rate's runs kept from
    #: the search for the trained side; each set's run reused as the previous set's mismatched control;
    #: the lr-0 control's recording taken from the zero-shot one, its weights being the original);
    #: the same numbers bit for bit. False: every run trained and recorded on its own
    shared_finetuning: bool = True
    #: with ``shared_finetuning``, train the learning-rate search's runs of every demonstration set in one
    #: batch per rate and score them on the development queries the same way
    #: (`icl_kernels.finetuning.batched_finetune`; equal to float64 rounding, float32 rounds differently);
    #: False, or a model it cannot batch: one run at a time
    batched_finetuning: bool = True

    def __post_init__(self) -> None:
        check_definition(self.definition)
        if not (math.isfinite(self.collapse_margin) and self.collapse_margin >= 0):
            raise InvalidOptionError(f"collapse_margin must be a finite number >= 0, not {self.collapse_margin}.")
        if self.position not in POSITIONS:
            raise InvalidOptionError(f"position must be one of {POSITIONS}, not {self.position!r}.")
        if self.lr is None and not self.lrs:
            raise InvalidOptionError("Give a learning rate (lr=) or candidates to search (lrs=).")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidOptionError(f"lr must be positive and finite, not {self.lr}.")


@dataclass
class CompareResult:
    """Summary metrics (``metrics``), tidy per-layer / per-head / per-query rows, lr search table."""

    metrics: dict
    layers: list[dict]
    heads: list[dict]
    examples: list[dict]
    lr_table: list[dict]
    timing: dict = field(default_factory=dict)


def _predict(rec: Record) -> int:
    return int(rec.label_log_probs.argmax())


#: Development prompts per forward pass: zero-shot prompts are short, so a fold's queries go in one
#: or two padded batches (right padding: the scored positions never see a pad).
_DEV_BATCH = 16


def _dev_accuracy(model, episode: Episode, label_tokens) -> tuple[int, float, int]:
    """(right answers, summed gold log-probability, number of distinct labels answered) of ``model``
    on one episode's development queries."""
    if not episode.dev_prompts:
        return 0, 0.0, 0
    records = label_log_probs(model, list(episode.dev_prompts), [[t] for t in label_tokens], dtype=torch.float64,
                              batch_size=_DEV_BATCH)
    return _fold_counts(records, episode.dev_gold)


def _fold_counts(records: Tensor, gold_labels: Sequence[int]) -> tuple[int, float, int]:
    """(right answers, summed gold log-probability, distinct labels answered) from development records:
    each prompt's label log-probabilities or label logits (one constant apart, the same counts; the
    gold log-probability is over the labels)."""
    right, gold_lp, answers = 0, 0.0, set()
    for rec, gold in zip(records, gold_labels):
        answer = int(rec.argmax())
        answers.add(answer)
        right += int(answer == gold)
        gold_lp += float(rec.log_softmax(-1)[gold])
    return right, gold_lp, len(answers)


def _dev_score(tuned: Sequence[FinetuneResult], episodes: Sequence[Episode], label_tokens,
               batched: bool = False) -> DevScore:
    """Pooled development accuracy and gold log-probability of the finetuned models, and the accuracy
    of each fold (episode ``e``'s finetuned model on episode ``e``'s development queries); ``batched``:
    every model in one pass per batch (`icl_kernels.finetuning.batched_finetune.row_label_log_probs`,
    reading only the label logits: `_fold_counts` compares the labels of a prompt with each other, so the
    vocabulary-wide normalisation would change nothing but rounding)."""
    if batched:
        records = row_label_log_probs(tuned[0].base, tuned, [list(ep.dev_prompts) for ep in episodes], label_tokens,
                                      dtype=torch.float64, normalise=False)
        counts = [_fold_counts(rec, ep.dev_gold) for rec, ep in zip(records, episodes)]
    else:
        counts = []
        for result, episode in zip(tuned, episodes):
            with result.applied() as model:
                counts.append(_dev_accuracy(model, episode, label_tokens))
    right, total, gold_lp, fold_right, fold_size, fold_labels = 0, 0, 0.0, [], [], []
    for (n_right, fold_lp, n_labels), episode in zip(counts, episodes):
        n = len(episode.dev_gold)
        right, total, gold_lp = right + n_right, total + n, gold_lp + fold_lp
        fold_right.append(n_right)
        fold_size.append(n)
        fold_labels.append(n_labels)
    if total == 0:
        raise ValueError("No development queries: the learning rate cannot be chosen; give lr= or dev prompts.")
    return DevScore(right / total, gold_lp / total, tuple(fold_right), tuple(fold_size), tuple(fold_labels))


def _zero_shot_folds(model, episodes: Sequence[Episode], label_tokens) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The unfinetuned model's accuracy on each episode's development queries and the number of
    distinct labels it answered there (the collapse baselines); episodes that share their development
    prompts (text tasks) are scored once."""
    seen: dict[tuple, tuple[float, int]] = {}
    out = []
    for episode in episodes:
        key = tuple(tuple(p.tokens) for p in episode.dev_prompts) + (tuple(episode.dev_gold),)
        if key not in seen:
            right, _, n_labels = _dev_accuracy(model, episode, label_tokens)
            seen[key] = (right / len(episode.dev_gold) if episode.dev_gold else float("nan"), n_labels)
        out.append(seen[key])
    return tuple(a for a, _ in out), tuple(n for _, n in out)


def choose_lr(model, episodes: Sequence[Episode], label_tokens, cfg: "ComparisonSettings",
              log: Callable[[str], None] | None = None) -> LrSelection:
    """The learning rate of ``model`` (the trained one or its untrained copy): ``cfg.lr`` when fixed,
    else `icl_kernels.finetuning.finetune.select_lr` over ``cfg.lrs`` on the episodes' development
    queries, rejecting a rate that collapses on any fold (fold = demonstration set; collapse = the
    upper 95% Wilson bound of the fold's finetuned accuracy more than ``cfg.collapse_margin`` below
    the zero-shot accuracy of the same model on that fold's development queries;
    `icl_kernels.finetuning.finetune.collapsed_folds`; or one label answered to every development query
    of a fold whose gold labels and zero-shot answers take two or more,
    `icl_kernels.finetuning.finetune.single_label_folds`)."""
    if cfg.lr is not None:
        return LrSelection(lr=float(cfg.lr), table=[], margin=cfg.collapse_margin)
    zero_shot_accuracy, zero_shot_labels = _zero_shot_folds(model, episodes, label_tokens)
    shared = cfg.shared_finetuning
    starts: dict[int, FirstStep] = {}
    batched = shared and batches(model, episodes, cfg)

    def train(lr: float) -> list[FinetuneResult]:
        if batched:
            runs = [ep.train_sequences for ep in episodes]
            if not starts:
                starts.update(enumerate(first_steps(model, runs)))
            return finetune_runs(model, runs, lr, record_queries=True, firsts=[starts[e] for e in range(len(runs))])
        out = []
        for e, ep in enumerate(episodes):
            if shared and e not in starts:
                starts[e] = first_step(model, ep.train_sequences)
            # with shared work the chosen rate's runs are kept for the comparison, which needs their queries
            out.append(finetune(model, ep.train_sequences, lr, record_queries=shared, first=starts.get(e)))
        return out

    return select_lr(
        train,
        lambda tuned: _dev_score(tuned, episodes, label_tokens, batched=batched),
        cfg.lrs, progress=log,
        zero_shot_fold_accuracy=zero_shot_accuracy, zero_shot_fold_labels=zero_shot_labels,
        gold_fold_labels=[len(set(ep.dev_gold)) for ep in episodes],
        margin=cfg.collapse_margin, fold_names=[ep.name for ep in episodes], keep_best=shared,
    )


def batches(model, episodes: Sequence[Episode], cfg: "ComparisonSettings") -> bool:
    """Whether the learning-rate search runs batched (`icl_kernels.finetuning.batched_finetune`): asked
    for, a model it can batch, and episodes with the same numbers of training sequences and of
    development queries."""
    return (cfg.batched_finetuning and batch_reason(model) is None
            and len({len(ep.train_sequences) for ep in episodes}) == 1
            and len({len(ep.dev_prompts) for ep in episodes}) == 1)


class _ModelPass:
    """One model's pass over the episodes: finetuning and per-query metrics (trained or untrained).

    With ``controls`` every episode is also finetuned at learning rate 0 (``"lr0"``: the weights
    stay exactly those of the original model) and, given two or more episodes, on the next episode's
    demonstrations at the same learning rate (``"mismatched"``); each query is then scored against
    those models exactly as against the finetuned one (`_similarities`).
    """

    def __init__(self, model, episodes, label_tokens, cfg: ComparisonSettings, lr: float, *, direct: bool,
                 controls: bool = False, tuned: Sequence[FinetuneResult] | None = None):
        self.model = model
        # the search's runs at ``lr`` (queries recorded), one per episode, reused when work is shared
        self._tuned_cache: dict[int, FinetuneResult] = (
            dict(enumerate(tuned)) if tuned is not None and cfg.shared_finetuning else {})
        self.episodes = episodes
        self.label_tokens = label_tokens
        self.cfg = cfg
        self.lr = lr
        self.direct = direct
        self.controls = controls
        self.n_layers = model.cfg.n_layers
        self.n_heads = model.cfg.n_heads
        self.rows: list[dict] = []
        self.per_layer: dict[str, list[Tensor]] = {}
        self.per_head: dict[str, list[Tensor]] = {}
        self.control_layer: dict[str, dict[str, list[Tensor]]] = {}
        self.control_head: dict[str, dict[str, list[Tensor]]] = {}
        self.control_updates: dict[str, list[dict]] = {}
        self.ft_update_rows: list[dict] = []
        self.identity_error = 0.0
        self.ft_seconds = 0.0
        self.control_seconds = 0.0
        self.prefix_seconds = 0.0
        self.icl_record_seconds = 0.0

    def add(self, store: dict, name: str, value: Tensor) -> None:
        store.setdefault(name, []).append(value.double())

    def run(self, progress: Callable[[int], None] | None = None, generator: torch.Generator | None = None) -> None:
        gen = generator or torch.Generator().manual_seed(self.cfg.seed)
        for e, episode in enumerate(self.episodes):
            start = time.perf_counter()
            tuned = self._tuned(e)
            self.ft_seconds += time.perf_counter() - start
            self.ft_update_rows += self._ft_updates(e, tuned)
            start = time.perf_counter()
            controls = self._control_models(e) if self.controls else {}
            self.control_seconds += time.perf_counter() - start
            for name, control in controls.items():
                self.control_updates.setdefault(name, []).extend(self._ft_updates(e, control))
            train_q = tuned.all_queries()  # [layer n_tok head d]
            start = time.perf_counter()
            prefix = self._demonstration_prefix(episode)
            self.prefix_seconds += time.perf_counter() - start
            for i, (icl_p, zsl_p, gold) in enumerate(zip(episode.icl_prompts, episode.zsl_prompts, episode.gold)):
                self._compare_query(e, i, icl_p, zsl_p, gold, tuned, train_q, gen, controls, prefix)
                if progress is not None:
                    progress(1)
            del tuned, controls, prefix
            if e > 0:  # episode 0's run is the last episode's mismatched control
                self._tuned_cache.pop(e, None)
        self._tuned_cache.clear()

    def _tuned(self, e: int) -> FinetuneResult:
        """Episode ``e`` finetuned at ``self.lr`` with its training queries: kept from the search or an
        earlier episode's mismatched control when work is shared, else trained now."""
        if not self.cfg.shared_finetuning:
            return finetune(self.model, self.episodes[e].train_sequences, self.lr, record_queries=True)
        if e not in self._tuned_cache:
            self._tuned_cache[e] = finetune(self.model, self.episodes[e].train_sequences, self.lr, record_queries=True)
        return self._tuned_cache[e]

    def _demonstration_prefix(self, episode: Episode) -> RecordingPrefix | None:
        """The tokens every ICL recording of the episode starts with (BOS, the demonstrations and
        whatever the template puts before the query) run once, or None (``prefix_reuse`` off, no
        common prefix, or a model on which reuse is not exact: every ICL prompt is then run in full)."""
        if not self.cfg.prefix_reuse:
            return None
        first = self.label_tokens[0]
        tokens = [recording_tokens(p, self.cfg.position, first)[0] for p in episode.icl_prompts]
        n_prefix = min(common_prefix_length(tokens), min(p.query_span[0] for p in episode.icl_prompts))
        if reuse_reason(self.model, n_prefix) is not None:
            return None
        return encode_recording_prefix(self.model, tokens[0][:n_prefix])

    def _control_models(self, e: int) -> dict[str, FinetuneResult]:
        """The lr -> 0 model (learning rate exactly 0) and, with another episode, the mismatched one."""
        episode = self.episodes[e]
        out = {"lr0": finetune(self.model, episode.train_sequences, 0.0, record_queries=True)}
        if len(self.episodes) > 1:
            other = (e + 1) % len(self.episodes)
            if self.cfg.shared_finetuning:  # the next episode's own run (the same weights: queries only added)
                out["mismatched"] = self._tuned(other)
            else:
                out["mismatched"] = finetune(self.model, self.episodes[other].train_sequences, self.lr,
                                             record_queries=False)
        return out

    def _ft_updates(self, episode: int, tuned: FinetuneResult) -> list[dict]:
        rows = []
        for layer in range(self.n_layers):
            k0, v0 = kv_weights(self.model, layer)
            with tuned.applied() as tuned_model:
                k1, v1 = kv_weights(tuned_model, layer)
            rows.append(dict(
                episode=episode, layer=layer,
                dwk_norm=float((k1 - k0).double().norm()), dwv_norm=float((v1 - v0).double().norm()),
                wk_norm=float(k0.double().norm()), wv_norm=float(v0.double().norm()),
            ))
        return rows

    def _headline(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The chosen definition's values under the unsuffixed names (``simaou``, ``simam_after`` ...)."""
        tag = DEFINITION_TAGS[self.cfg.definition]
        return {base: values[f"{base}_{tag}"] for base in _DEFINED_METRICS if f"{base}_{tag}" in values}

    def _similarities(self, icl_p: IclPrompt, zsl_p: IclPrompt, icl: Record, zsl: Record, ft: Record,
                      train_q: Tensor, demo_positions: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The FT-dependent scores of one query: SimAOU and SimAM after (both definitions), Kendall."""
        per_layer: dict[str, Tensor] = {}
        per_head: dict[str, Tensor] = {}
        for definition in DEFINITIONS:
            tag = DEFINITION_TAGS[definition]
            per_layer[f"simaou_{tag}"] = simaou(icl.attn_out, zsl.attn_out, ft.attn_out, definition)
            span_icl = simam_span(icl_p, icl.recording_position, definition)
            span_zsl = simam_span(zsl_p, zsl.recording_position, definition)
            per_head[f"simam_after_{tag}"] = simam(icl.scores, span_icl, ft.scores, span_zsl, definition)
        per_layer["kendall"] = torch.tensor([  # float64: the taus are exact ratios (float32 before issue 23)
            kendall(icl.scores[layer][:, demo_positions], train_q[layer], ft.q[layer])[0]
            for layer in range(self.n_layers)
        ], dtype=torch.float64)
        return per_layer, per_head

    def _compare_query(self, e, i, icl_p: IclPrompt, zsl_p: IclPrompt, gold, tuned: FinetuneResult, train_q, gen,
                       controls: dict[str, FinetuneResult], prefix: RecordingPrefix | None = None):
        pos = self.cfg.position
        first = self.label_tokens[0]
        icl_tokens, icl_pred, icl_rec = recording_tokens(icl_p, pos, first)
        zsl_tokens, zsl_pred, zsl_rec = recording_tokens(zsl_p, pos, first)
        direct = self.direct
        query = f"query {i} of demonstration set {e}"
        start = time.perf_counter()
        icl = record(self.model, icl_tokens, icl_pred, icl_rec, self.label_tokens, with_kv=direct,
                     what=f"the ICL run of {query}", prefix=prefix)
        self.icl_record_seconds += time.perf_counter() - start
        zsl = record(self.model, zsl_tokens, zsl_pred, zsl_rec, self.label_tokens, with_kv=direct,
                     what=f"the zero-shot run of {query}")
        with tuned.applied() as tuned_model:
            ft = record(tuned_model, zsl_tokens, zsl_pred, zsl_rec, self.label_tokens, with_kv=direct,
                        what=f"the finetuned (lr {self.lr:g}) run of {query}")
        row = dict(episode=e, index=i, gold=int(gold), zsl_pred=_predict(zsl), icl_pred=_predict(icl),
                   ft_pred=_predict(ft), n_demo_tokens=sum(b - a for a, b in icl_p.demo_spans))
        self.rows.append(row)
        demo_positions = torch.cat([torch.arange(a, b) for a, b in icl_p.demo_spans])
        if len(demo_positions) != train_q.shape[1]:
            raise RuntimeError(
                f"{len(demo_positions)} demonstration tokens but {train_q.shape[1]} training queries: "
                "the finetuning sequences do not match the prompt's demonstrations."
            )
        per_layer, per_head = self._similarities(icl_p, zsl_p, icl, zsl, ft, train_q, demo_positions)
        # random baselines: one isotropic direction for SimAOU (shared by both definitions), uniform
        # noise for Kendall (drawn in this order, layer by layer)
        noise = torch.randn((icl.attn_out - zsl.attn_out).shape, generator=gen, dtype=torch.float64)
        for definition in DEFINITIONS:
            tag = DEFINITION_TAGS[definition]
            per_layer[f"simaou_random_{tag}"] = cosine(simaou_update(icl.attn_out, zsl.attn_out, definition), noise)
            span_icl = simam_span(icl_p, icl.recording_position, definition)
            span_zsl = simam_span(zsl_p, zsl.recording_position, definition)
            per_head[f"simam_before_{tag}"] = simam(icl.scores, span_icl, zsl.scores, span_zsl, definition)
        randoms = []
        for layer in range(self.n_layers):
            icl_side = kendall(icl.scores[layer][:, demo_positions], train_q[layer], ft.q[layer])[1]
            randoms.append(kendall_tau(icl_side, torch.rand(icl_side.shape, generator=gen, dtype=torch.float64)))
        per_layer["kendall_random"] = torch.tensor(randoms, dtype=torch.float64)
        for name, value in {**self._headline(per_layer), **per_layer}.items():
            self.add(self.per_layer, name, value)
        for name, value in {**self._headline(per_head), **per_head}.items():
            self.add(self.per_head, name, value)
        for name, control in controls.items():
            if name == "lr0" and self.cfg.shared_finetuning:
                ft_c = zsl  # lr 0: the original weights, so the zero-shot recording itself
            else:
                with control.applied() as control_model:
                    ft_c = record(control_model, zsl_tokens, zsl_pred, zsl_rec, self.label_tokens,
                                  what=f"the {name} control run of {query}")
            row[f"{name}_ft_pred"] = _predict(ft_c)
            # the lr -> 0 run recorded its own training queries; the mismatched run trained on other
            # tokens, so its query is ranked against this episode's training queries
            queries = control.all_queries() if name == "lr0" else train_q
            c_layer, c_head = self._similarities(icl_p, zsl_p, icl, zsl, ft_c, queries, demo_positions)
            for value_name, value in c_layer.items():
                self.add(self.control_layer.setdefault(name, {}), value_name, value)
            for value_name, value in c_head.items():
                self.add(self.control_head.setdefault(name, {}), value_name, value)
        if direct:
            self._compare_updates(icl_p, zsl_p, icl, zsl, ft)

    def _compare_updates(self, icl_p, zsl_p, icl: Record, zsl: Record, ft: Record) -> None:
        demo_mask = demo_token_mask(icl_p, len(icl.k[0]))  # demonstrations and separators
        no_demo = torch.zeros(1, len(zsl.k[0]), dtype=torch.bool)
        cos_m, cos_o, n_icl, n_ft, n_zsl, srank = [], [], [], [], [], []
        per_token = {"dw_icl_norm_per_token": [], "w_zsl_norm_per_token": [], "w_zsl_zsl_run_norm": [],
                     "w_zsl_zsl_run_norm_per_token": []}
        for layer in range(self.n_layers):
            spec = attention_spec(self.model, layer)

            def split(rec: Record, mask: Tensor):
                p = torch.tensor([rec.recording_position])
                return decompose(rec.q_full[layer][None].double(), rec.k[layer][None].double(),
                                 rec.v[layer][None].double(), spec, p, mask)

            d_icl = split(icl, demo_mask)
            d_zsl = split(zsl, no_demo)
            d_ft = split(ft, no_demo)
            # relaxed identity at the recording position
            p = icl.recording_position
            q, k, v = (t[layer][None].double() for t in (icl.q_full, icl.k, icl.v))
            visible = visibility_mask(1, k.shape[1], spec.window, query_offset=p)
            z = linear_attention(q[:, p : p + 1], repeat_kv(k, spec.group_size), repeat_kv(v, spec.group_size), visible)
            self.identity_error = max(self.identity_error, float((d_icl.output()[0] - z[0, 0]).abs().max()))
            dw_icl = d_icl.dw_icl[0]  # [head d d]
            dw_ft = d_ft.w_zsl[0] - d_zsl.w_zsl[0]
            cos_m.append(cosine(dw_icl.flatten(1), dw_ft.flatten(1)))
            qz = d_zsl.q[0]
            cos_o.append(cosine(torch.einsum("hde,he->hd", dw_icl, qz), torch.einsum("hde,he->hd", dw_ft, qz)))
            n_icl.append(dw_icl.flatten(1).norm(dim=-1))
            n_ft.append(dw_ft.flatten(1).norm(dim=-1))
            n_zsl.append(d_icl.w_zsl[0].flatten(1).norm(dim=-1))
            srank.append(stable_rank(dw_icl))
            # per token: each map divided by the number of visible keys that built it (same ICL run);
            # W_ZSL of the zero-shot run beside it
            n_demo = d_icl.n_demo_visible[0].double()
            n_own = _visible_keys(p, spec.window) - n_demo
            n_zsl_keys = _visible_keys(zsl.recording_position, spec.window)
            per_token["dw_icl_norm_per_token"].append(
                n_icl[-1] / n_demo if n_demo > 0 else torch.full_like(n_icl[-1], float("nan")))
            per_token["w_zsl_norm_per_token"].append(n_zsl[-1] / n_own)
            per_token["w_zsl_zsl_run_norm"].append(d_zsl.w_zsl[0].flatten(1).norm(dim=-1))
            per_token["w_zsl_zsl_run_norm_per_token"].append(per_token["w_zsl_zsl_run_norm"][-1] / n_zsl_keys)
        self.add(self.per_head, "dw_cosine", torch.stack(cos_m))
        self.add(self.per_head, "dw_output_cosine", torch.stack(cos_o))
        self.add(self.per_head, "dw_icl_norm", torch.stack(n_icl))
        self.add(self.per_head, "dw_ft_norm", torch.stack(n_ft))
        self.add(self.per_head, "w_zsl_norm", torch.stack(n_zsl))
        self.add(self.per_head, "dw_icl_stable_rank", torch.stack(srank))
        for name, values in per_token.items():
            self.add(self.per_head, name, torch.stack(values))

    # -- summaries -------------------------------------------------------------------------------
    def layer_means(self) -> dict[str, Tensor]:
        out = {name: torch.stack(values).nanmean(0) for name, values in self.per_layer.items()}
        for name, values in self.per_head.items():
            out[name] = torch.stack(values).nanmean(0).nanmean(-1)
        return out

    def control_means(self) -> dict[str, dict[str, Tensor]]:
        """Per-layer means of each control's metrics (heads averaged for SimAM)."""
        out: dict[str, dict[str, Tensor]] = {}
        for control, store in self.control_layer.items():
            out[control] = {name: torch.stack(values).nanmean(0) for name, values in store.items()}
            for name, values in self.control_head[control].items():
                out[control][name] = torch.stack(values).nanmean(0).nanmean(-1)
        return out

    def head_means(self) -> dict[str, Tensor]:
        return {name: torch.stack(values).nanmean(0) for name, values in self.per_head.items()}

    def _interval(self, statistic, arrays, groups: np.ndarray | None, floor: tuple[float, float] | None = None,
                  bounds: tuple[float, float] | None = None) -> dict:
        """The interval of one statistic over the queries (``groups=None``: percentile bootstrap) or
        over the demonstration sets (`icl_kernels.utils.stats.clustered_interval`: cluster bootstrap
        from 20 sets, a t(G-1) interval on the set values below, never narrower than the query-level
        interval or ``floor``)."""
        if not self.cfg.vectorised_intervals:  # one call per resample (the path before; same numbers)
            statistic = _one_at_a_time(statistic)
        with warnings.catch_warnings():  # resamples whose values are all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            if groups is None:
                out = paired_bootstrap(statistic, arrays, "queries", seed=self.cfg.seed, resamples=_RESAMPLES)
                out.update(method="percentile bootstrap", resamples=_RESAMPLES, seed=self.cfg.seed)
                return out
            return clustered_interval(statistic, arrays, "demonstration sets", groups, seed=self.cfg.seed,
                                      resamples=_RESAMPLES, floor=floor, bounds=bounds)

    def right(self, pred_key: str = "ft_pred") -> np.ndarray:
        """1.0 where a run's prediction (``zsl_pred``, ``ft_pred``, ``lr0_ft_pred`` ...) is the gold label."""
        gold = np.array([r["gold"] for r in self.rows])
        return (np.array([r[pred_key] for r in self.rows]) == gold).astype(float)

    def intervals(self, groups: np.ndarray | None) -> dict:
        """95% intervals of the accuracies, their paired differences, Rec2FTP and the metric means.

        The unit is the query (``groups=None``; accuracies get Wilson intervals) or, with one episode
        label per query, the demonstration set (`_interval`). Every entry names its method, number of
        resamples and seed.
        """
        unit = "queries" if groups is None else "demonstration sets"
        right = {k: self.right(f"{k}_pred") for k in ("zsl", "ft", "icl")}

        def boot(statistic, arrays, floor=None, bounds=None):
            return self._interval(statistic, arrays, groups, floor, bounds)

        out: dict = {"unit": unit}
        for k, v in right.items():
            wilson = proportion(v.astype(bool), unit="queries")
            if groups is None:
                out[f"{k}_accuracy"] = dict(wilson, method="wilson")
            else:
                out[f"{k}_accuracy"] = boot(_accuracy_statistic, [v], floor=(wilson["low"], wilson["high"]),
                                            bounds=(0.0, 1.0))
        for a, b in (("icl", "ft"), ("ft", "zsl"), ("icl", "zsl")):
            out[f"{a}_minus_{b}_accuracy"] = boot(_difference_of_means, [right[a], right[b]], bounds=(-1.0, 1.0))
        for key in ("rec2ftp", "rec2ftp_chance"):
            out[key] = boot(_rec2ftp_statistic(key), [right["zsl"], right["ft"], right["icl"]],
                            bounds=(0.0, 1.0) if key == "rec2ftp" else None)
        for name, values in self.per_layer.items():
            out[name] = boot(_layer_statistic, [torch.stack(values).numpy()], bounds=_bounds(name))
        for name, values in self.per_head.items():
            out[name] = boot(_head_statistic, [torch.stack(values).numpy()], bounds=_bounds(name))
        return out

    def control_differences(self, groups: np.ndarray | None) -> dict:
        """Trained minus each control, paired over the same queries, with a verdict per metric.

        For every FT-dependent metric (`_CONTROLLED_METRICS`) and control: the value under the
        control, the paired difference and its interval (`_interval`; a query whose value is NaN under
        either run is left out of both), and ``verdict``. Against ``lr0``: ``"not informative here"``
        when the interval holds 0 (the metric does not tell the finetuned model from the original),
        ``"undefined at lr 0"`` when the control's value is NaN (SimAOU and Rec2FTP: FT == ZSL),
        else ``"differs from the lr -> 0 control"``. Against ``mismatched``: ``"no different from
        a mismatched update"`` or ``"differs from the mismatched update"``. SimAM after at lr 0 is
        SimAM before, so its lr0 difference is the paired SimAM after minus before.
        """
        out: dict = {}
        zsl, icl, ft = self.right("zsl_pred"), self.right("icl_pred"), self.right("ft_pred")
        for control in self.control_layer:
            c_right = self.right(f"{control}_ft_pred")
            values: dict = {}
            trained_arrays = {name: torch.stack(v).numpy() for name, v in self.per_layer.items()}
            trained_arrays.update({name: torch.stack(v).numpy() for name, v in self.per_head.items()})
            control_arrays = {name: torch.stack(v).numpy() for name, v in self.control_layer[control].items()}
            control_arrays.update({name: torch.stack(v).numpy() for name, v in self.control_head[control].items()})
            for name in _CONTROLLED_METRICS:
                if name == "ft_accuracy":
                    pair, control_value = [ft, c_right], float(c_right.mean())
                    diff = self._interval(_difference_of_means, pair, groups, bounds=(-1.0, 1.0))
                elif name == "rec2ftp":
                    control_value = rec2ftp(zsl > 0, c_right > 0, icl > 0)["rec2ftp"]
                    diff = self._interval(_REC2FTP_GAP, [zsl, ft, c_right, icl], groups, bounds=(-1.0, 1.0))
                else:
                    a, b = _jointly_finite(trained_arrays[name], control_arrays[name])
                    statistic = _layer_statistic if a.ndim == 2 else _head_statistic
                    control_value = statistic(control_arrays[name])
                    diff = self._interval(_difference(statistic), [a, b], groups, bounds=(-2.0, 2.0))
                diff["verdict"] = _verdict(control, control_value, diff)
                values[name] = dict(control=control_value, difference=diff)
            updates = self.control_updates.get(control, [])
            out[control] = dict(
                description=_CONTROL_DESCRIPTIONS[control],
                lr=0.0 if control == "lr0" else self.lr,
                ft_dwk_norm=float(np.mean([r["dwk_norm"] for r in updates])) if updates else None,
                ft_dwv_norm=float(np.mean([r["dwv_norm"] for r in updates])) if updates else None,
                metrics=values,
            )
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Every per-query metric as an array (``[query, layer]`` or ``[query, layer, head]``)."""
        out = {name: torch.stack(v).numpy() for name, v in self.per_layer.items()}
        out.update({name: torch.stack(v).numpy() for name, v in self.per_head.items()})
        return out

    def after_minus_before(self, groups: np.ndarray | None) -> dict:
        """SimAM after minus SimAM before under each definition, paired over the same queries (and
        heads), with its interval (`_interval`; clusters = demonstration sets when ``groups`` is given)."""
        arrays = self.arrays()
        out = {}
        for definition in DEFINITIONS:
            tag = DEFINITION_TAGS[definition]
            after, before = _jointly_finite(arrays[f"simam_after_{tag}"], arrays[f"simam_before_{tag}"])
            out[tag] = self._interval(_difference(_head_statistic), [after, before], groups, bounds=(-2.0, 2.0))
        return out

    def accuracies(self) -> dict:
        gold = np.array([r["gold"] for r in self.rows])
        right = {k: np.array([r[f"{k}_pred"] for r in self.rows]) == gold for k in ("zsl", "ft", "icl")}
        out = {f"{k}_accuracy": float(v.mean()) for k, v in right.items()}
        out.update(rec2ftp(right["zsl"], right["ft"], right["icl"]))
        return out


#: Bootstrap resamples of every compare interval.
_RESAMPLES = BOOTSTRAP_RESAMPLES
#: Metrics that depend on the finetuning, compared with the lr -> 0 and mismatched controls.
_CONTROLLED_METRICS = (
    "simaou_official", "simaou_softmax_weights", "simam_after_official", "simam_after_softmax_weights", "kendall",
    "ft_accuracy", "rec2ftp",
)
_CONTROL_DESCRIPTIONS = {
    "lr0": "finetuned at learning rate 0 (identity: dW_FT exactly 0), same demonstrations",
    "mismatched": "finetuned at the chosen learning rate on the next episode's demonstrations (another set); "
                  "Kendall ranks its query against this episode's training queries",
}


#: Metrics compared between the trained model and its untrained copy, paired over the same queries.
_PAIRED_WITH_UNTRAINED = (
    "simaou_official", "simaou_softmax_weights", "simam_before_official", "simam_before_softmax_weights",
    "simam_after_official", "simam_after_softmax_weights", "kendall",
)


def _trained_minus_untrained(side: "_ModelPass", control: "_ModelPass", groups: np.ndarray | None) -> dict:
    """Trained minus untrained for the accuracies, SimAOU, SimAM (before, after and after minus before,
    both definitions) and Kendall, paired over the same queries; the interval's unit is the
    demonstration set when ``groups`` is given (`_ModelPass._interval`), else the query."""
    if [(r["episode"], r["index"]) for r in side.rows] != [(r["episode"], r["index"]) for r in control.rows]:
        raise RuntimeError("The trained and untrained passes scored different queries; they cannot be paired.")
    out: dict = {}
    for run in ("zsl", "ft", "icl"):
        pair = [side.right(f"{run}_pred"), control.right(f"{run}_pred")]
        out[f"{run}_accuracy"] = side._interval(_difference_of_means, pair, groups, bounds=(-1.0, 1.0))
    trained, untrained = side.arrays(), control.arrays()
    for name in _PAIRED_WITH_UNTRAINED:
        a, b = _jointly_finite(trained[name], untrained[name])
        statistic = _layer_statistic if a.ndim == 2 else _head_statistic
        out[name] = side._interval(_difference(statistic), [a, b], groups, bounds=(-2.0, 2.0))
    for definition in DEFINITIONS:
        tag = DEFINITION_TAGS[definition]
        arrays = [trained[f"simam_after_{tag}"], trained[f"simam_before_{tag}"],
                  untrained[f"simam_after_{tag}"], untrained[f"simam_before_{tag}"]]
        missing = np.any([np.isnan(x) for x in arrays], axis=0)
        arrays = [np.where(missing, np.nan, x) for x in arrays]

        change_gap = batched_statistic(
            lambda ta, tb, ua, ub: (_head_statistic(ta) - _head_statistic(tb)) - (_head_statistic(ua) - _head_statistic(ub)),
            lambda ta, tb, ua, ub: (_head_means(ta) - _head_means(tb)) - (_head_means(ua) - _head_means(ub)))
        out[f"simam_after_minus_before_{tag}"] = side._interval(change_gap, arrays, groups, bounds=(-4.0, 4.0))
    return out


def _layer_means(x: np.ndarray) -> np.ndarray:
    """`_layer_statistic` of each resample of a ``[resample, query, layer]`` stack (the same
    reductions in the same order, so each value equals the per-resample call bit for bit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.nanmean(x, 1), -1)


def _head_means(x: np.ndarray) -> np.ndarray:
    """`_head_statistic` of each resample of a ``[resample, query, layer, head]`` stack."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.nanmean(np.nanmean(x, 1), -1), -1)


def _layer_statistic_loop(x: np.ndarray) -> float:
    """Mean over queries (NaN-aware) then over layers of a ``[query, layer]`` array (NaN if all NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(x, 0)))


def _head_statistic_loop(x: np.ndarray) -> float:
    """Mean over queries, heads and layers of a ``[query, layer, head]`` array (NaN-aware)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(np.nanmean(x, 0), -1)))


#: The statistics of the intervals, each with its stacked form for the vectorised bootstrap
#: (`icl_kernels.utils.stats.batched_statistic`; ``batched_intervals`` off: one call per resample).
_layer_statistic = batched_statistic(_layer_statistic_loop, _layer_means)
_head_statistic = batched_statistic(_head_statistic_loop, _head_means)
_accuracy_statistic = batched_statistic(np.mean, lambda x: x.mean(axis=1))
_difference_of_means = batched_statistic(mean_difference, lambda a, b: a.mean(axis=1) - b.mean(axis=1))


def _one_at_a_time(statistic) -> Callable[..., float]:
    """``statistic`` without its stacked form: the bootstrap calls it once per resample."""
    return lambda *arrays: statistic(*arrays)


def _difference(statistic) -> Callable[..., float]:
    """``statistic(x) - statistic(y)``, with its stacked form."""
    return batched_statistic(lambda x, y: statistic(x) - statistic(y),
                             lambda x, y: statistic.batched(x) - statistic.batched(y))


def _rec2ftp_statistic(key: str) -> Callable[..., float]:
    """``rec2ftp(z > 0, f > 0, i > 0)[key]`` of (ZSL, FT, ICL) right-answer arrays, with its stacked form."""
    return batched_statistic(lambda z, f, i: rec2ftp(z > 0, f > 0, i > 0)[key],
                             lambda z, f, i: _rec2ftp_batched(z > 0, f > 0, i > 0)[key])


def _rec2ftp_batched(zsl: np.ndarray, ft: np.ndarray, icl: np.ndarray) -> dict[str, np.ndarray]:
    """`rec2ftp` of every row of ``[resample, query]`` boolean stacks (the same integer counts and
    float64 divisions, so equal to it bit for bit)."""
    ftp = ft & ~zsl
    zsl_wrong = ~zsl
    n_ftp, n_wrong = ftp.sum(1), zsl_wrong.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = np.where(n_ftp > 0, (ftp & icl).sum(1) / np.maximum(n_ftp, 1), np.nan)
        base = np.where(n_wrong > 0, (zsl_wrong & icl).sum(1) / np.maximum(n_wrong, 1), np.nan)
        defined = ~(np.isnan(rec) | np.isnan(base) | (base >= 1.0))
        corrected = np.where(defined, (rec - base) / np.where(defined, 1.0 - base, 1.0), np.nan)
    return dict(rec2ftp=rec, rec2ftp_baseline=base, rec2ftp_chance=corrected)


#: Rec2FTP of (ZSL, FT, ICL) minus Rec2FTP of (ZSL, control FT, ICL): arrays ``zsl, ft, control, icl``.
_REC2FTP_GAP = batched_statistic(
    lambda z, f, c, i: rec2ftp(z > 0, f > 0, i > 0)["rec2ftp"] - rec2ftp(z > 0, c > 0, i > 0)["rec2ftp"],
    lambda z, f, c, i: _rec2ftp_batched(z > 0, f > 0, i > 0)["rec2ftp"] - _rec2ftp_batched(z > 0, c > 0, i > 0)["rec2ftp"])


def _bounds(name: str) -> tuple[float, float] | None:
    """The range of a metric's mean: [-1, 1] for the cosines and taus, none for norms and ranks."""
    if name.startswith(("simaou", "simam", "kendall", "dw_cosine", "dw_output_cosine")):
        return (-1.0, 1.0)
    return None


def _jointly_finite(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` with NaN wherever either is NaN, so that a paired difference uses the same queries."""
    missing = np.isnan(a) | np.isnan(b)
    return np.where(missing, np.nan, a), np.where(missing, np.nan, b)


def _verdict(control: str, control_value: float, diff: dict) -> str:
    low, high = diff["low"], diff["high"]
    if control == "lr0" and math.isnan(control_value):
        return "undefined at lr 0"
    if math.isnan(low) or math.isnan(high):
        return "undefined"
    holds_zero = low <= 0.0 <= high
    if control == "lr0":
        return "not informative here" if holds_zero else "differs from the lr -> 0 control"
    return "no different from a mismatched update" if holds_zero else "differs from the mismatched update"


def _visible_keys(position: int, window: int | None) -> float:
    """How many keys a position sees (causal, within a local window)."""
    return float(position + 1 if window is None else min(position + 1, window))


def _mean(x: Tensor) -> float:
    return float(x.double().nanmean())


def untrained_copy(model: tl_backend.Model, name: str, seed: int = 0) -> tl_backend.Model:
    """The same architecture with freshly initialised (random) weights, on the same backend and device.

    Initialised by Hugging Face's own scheme with ``torch.manual_seed(UNTRAINED_SEED_OFFSET + seed)``
    (`icl_kernels.utils.stats.UNTRAINED_SEED_OFFSET`); ``name`` is the original model's name, and the copy
    is called ``untrained-<name>``.
    """

    config = tl_backend.hf_config(model)
    if config is None:
        raise ValueError("The model has no Hugging Face config; load it with icl_kernels.load_model.")
    dtype = tl_backend.model_dtype(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED_OFFSET + seed)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).eval()
    return hf_to_transformer_lens(
        hf, model.tokenizer, backend=tl_backend.backend_of(model), device=tl_backend.model_device(model),
        dtype=dtype, n_ctx=model.cfg.n_ctx, name=f"untrained-{name}",
    )


def compare_icl_with_finetuning(
    model: tl_backend.Model,
    episodes: Sequence[Episode],
    label_ids: Sequence[Sequence[int]],
    cfg: ComparisonSettings | None = None,
    *,
    untrained: tl_backend.Model | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CompareResult:
    """Run ZSL, ICL and FT on every query of every episode and compute all metrics.

    ``untrained``: a random-weight model of the same architecture (`untrained_copy`) for the
    control; it chooses its own learning rate by the same search on the same development queries
    (`choose_lr`), or takes ``cfg.lr`` when that is fixed.
    """
    cfg = cfg or ComparisonSettings()
    if not episodes:
        raise ValueError("compare_icl_with_finetuning needs at least one episode.")
    label_tokens = first_label_tokens(label_ids)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    selections = {"trained": choose_lr(model, episodes, label_tokens, cfg, log)}
    timing["lr_search_s"] = time.perf_counter() - start
    if untrained is not None:
        start = time.perf_counter()
        selections["untrained"] = choose_lr(
            untrained, episodes, label_tokens, cfg, (lambda text: log(f"untrained {text}")) if log else None)
        timing["untrained_lr_search_s"] = time.perf_counter() - start
    lr = selections["trained"].lr
    n_queries = sum(len(ep.gold) for ep in episodes)
    # closed also when a run raises, so that an error starts its own line after the bar
    with tqdm(total=n_queries * (2 if untrained is not None else 1), unit="query",
              desc="compare: test queries" + (" (twice: trained model, untrained copy)" if untrained is not None else ""),
              disable=not progress) as bar:
        gen = torch.Generator().manual_seed(cfg.seed)
        start = time.perf_counter()
        side = _ModelPass(model, episodes, label_tokens, cfg, lr, direct=cfg.direct, controls=cfg.controls,
                          tuned=selections["trained"].models)
        selections["trained"].models = None  # held by the pass until each is used
        side.run(bar.update, gen)
        timing["trained_s"] = time.perf_counter() - start
        timing["trained_finetune_s"] = side.ft_seconds
        timing["controls_finetune_s"] = side.control_seconds
        timing["trained_icl_record_s"] = side.icl_record_seconds + side.prefix_seconds  # prefix passes included
        control = None
        if untrained is not None:
            start = time.perf_counter()
            control = _ModelPass(untrained, episodes, label_tokens, cfg, selections["untrained"].lr, direct=False,
                                 tuned=selections["untrained"].models)
            selections["untrained"].models = None
            control.run(bar.update, gen)
            timing["untrained_s"] = time.perf_counter() - start
    metrics = _summary_metrics(side, control, cfg, lr, n_episodes=len(episodes))
    metrics["lr_selection"] = _lr_selection_summary(selections, cfg, episodes)
    layers, heads, examples = _rows(side, control)
    lr_table = [dict(model=name, **row) for name, selection in selections.items() for row in selection.table]
    return CompareResult(metrics=metrics, layers=layers, heads=heads, examples=examples, lr_table=lr_table,
                         timing=timing)


def _lr_selection_summary(selections: dict[str, LrSelection], cfg: ComparisonSettings,
                          episodes: Sequence[Episode]) -> dict:
    """Each model's chosen learning rate, the rejected (collapsed) candidates and the collapse rule."""
    out: dict = {
        "method": ("fixed (--lr)" if cfg.lr is not None else
                   "best pooled dev accuracy (ties: mean gold log-prob) among candidates that did not collapse, "
                   "searched separately for the trained model and for the untrained copy"),
        "collapse_rule": (f"a candidate collapses when, on some development fold (the model finetuned on one "
                          f"demonstration set, scored on that set's development queries), the upper end of the "
                          f"95% Wilson interval of its accuracy is more than {cfg.collapse_margin:g} below the "
                          "zero-shot accuracy of the same unfinetuned model on those queries, or it gives one "
                          "label to every one of those queries while their gold labels and the unfinetuned "
                          "model's answers take two or more; collapsed candidates are rejected"),
        "collapse_margin": cfg.collapse_margin,
        "n_folds": len(episodes),
        "dev_queries_per_fold": [len(ep.dev_gold) for ep in episodes],
    }
    for name, selection in selections.items():
        out[name] = dict(
            lr=selection.lr,
            candidates=[row["lr"] for row in selection.table],
            rejected={f"{lr:g}": folds for lr, folds in selection.rejected.items()},
            zero_shot_fold_accuracy=list(selection.zero_shot_fold_accuracy),
        )
    return out


#: Metrics with an official and a variant definition (`icl_kernels.finetuning.dai_definitions`).
_DEFINED_METRICS = ("simaou", "simaou_random", "simam_before", "simam_after")
_METRICS = ("simaou", "simaou_random", "simam_before", "simam_after", "kendall", "kendall_random")
_DIRECT_METRICS = ("dw_cosine", "dw_output_cosine", "dw_icl_norm", "dw_ft_norm", "w_zsl_norm", "dw_icl_stable_rank")
#: Added beside the direct metrics: norms per visible key (dW_ICL and W_ZSL from the same ICL run), and
#: W_ZSL of the zero-shot run (the run dW_FT is measured from).
_PER_TOKEN_METRICS = ("dw_icl_norm_per_token", "w_zsl_norm_per_token", "w_zsl_zsl_run_norm",
                      "w_zsl_zsl_run_norm_per_token")


def _summary_metrics(
    side: _ModelPass, control: _ModelPass | None, cfg: ComparisonSettings, lr: float, n_episodes: int
) -> dict:
    """Accuracies, Rec2FTP and the layer means of every metric (the untrained control's beside them)."""
    layer_means = side.layer_means()
    n_queries = len(side.rows)
    metrics: dict = dict(position=cfg.position, lr=lr, n_test=n_queries, n_episodes=n_episodes,
                         definition=cfg.definition)
    metrics.update(side.accuracies())
    for name in _METRICS:
        metrics[name] = _mean(layer_means[name])
    for definition in DEFINITIONS:  # both definitions side by side, whichever the headline keys hold
        for name in _DEFINED_METRICS:
            metrics[f"{name}_{DEFINITION_TAGS[definition]}"] = _mean(layer_means[f"{name}_{DEFINITION_TAGS[definition]}"])
    if control is not None:
        c_means = control.layer_means()
        metrics["simaou_untrained"] = _mean(c_means["simaou"])
        metrics["lr_untrained"] = control.lr
        metrics["untrained"] = dict(lr=control.lr, **control.accuracies())
        for name in _METRICS:
            metrics["untrained"][name] = _mean(c_means[name])
        for definition in DEFINITIONS:
            for name in _DEFINED_METRICS:
                key = f"{name}_{DEFINITION_TAGS[definition]}"
                metrics["untrained"][key] = _mean(c_means[key])
    else:
        metrics["simaou_untrained"] = float("nan")
    if cfg.direct:
        for name in _DIRECT_METRICS:
            metrics[name] = _mean(layer_means[name])
        metrics["identity_max_abs_error"] = side.identity_error
    updates = side.ft_update_rows
    metrics["ft_dwk_norm"] = float(np.mean([r["dwk_norm"] for r in updates]))
    metrics["ft_dwv_norm"] = float(np.mean([r["dwv_norm"] for r in updates]))
    # --- added keys (issue 13): per-token norms, untrained SimAM beside SimAM, intervals -------------
    if cfg.direct:
        for name in _PER_TOKEN_METRICS:
            metrics[name] = _mean(layer_means[name])
        metrics["dw_icl_to_w_zsl_per_token"] = metrics["dw_icl_norm_per_token"] / metrics["w_zsl_norm_per_token"]
        metrics["mean_demo_tokens"] = float(np.mean([r["n_demo_tokens"] for r in side.rows]))
    for name in ("simam_before", "simam_after", "kendall", "kendall_random"):
        metrics[f"{name}_untrained"] = metrics["untrained"][name] if control is not None else float("nan")
    metrics["intervals"] = side.intervals(None)
    groups = np.array([r["episode"] for r in side.rows]) if n_episodes > 1 else None
    if groups is not None:
        metrics["intervals_by_episode"] = side.intervals(groups)
    by_set = (f"cluster bootstrap ({n_episodes} >= {MIN_BOOTSTRAP_CLUSTERS} sets)" if n_episodes >= MIN_BOOTSTRAP_CLUSTERS
              else f"t({n_episodes - 1}) on the {n_episodes} set values")
    metrics["interval_settings"] = dict(
        level=0.95, resamples=_RESAMPLES, seed=cfg.seed, stream="bootstrap",
        by_episode=("none: one demonstration set" if groups is None else
                    f"cluster bootstrap from {MIN_BOOTSTRAP_CLUSTERS} sets, else t(G-1) on the set values; "
                    "never narrower than the query-level interval"),
        method=("percentile bootstrap over queries (Wilson for accuracies)" if groups is None else
                f"{by_set}, never narrower than the query-level interval"),
        n_clusters=n_episodes,
    )
    if side.control_layer:
        # paired over queries; with several demonstration sets, by set (the interval chooser)
        metrics["controls"] = side.control_differences(groups)
    if control is not None:
        metrics["untrained"]["intervals"] = control.intervals(None)
    # paired intervals (issue 23): SimAM after minus before, trained minus untrained; same queries, and
    # the demonstration set as the unit when there are several
    paired: dict = {
        "unit": "queries" if groups is None else "demonstration sets",
        "simam_after_minus_before": side.after_minus_before(groups),
    }
    if control is not None:
        paired["untrained_simam_after_minus_before"] = control.after_minus_before(groups)
        paired["trained_minus_untrained"] = _trained_minus_untrained(side, control, groups)
    metrics["paired"] = paired
    return metrics


def _rows(side: _ModelPass, control: _ModelPass | None) -> tuple[list[dict], list[dict], list[dict]]:
    """Per-layer, per-head and per-query rows (the untrained control's columns beside the trained ones)."""
    layer_means = side.layer_means()
    head_means = side.head_means()
    updates = side.ft_update_rows
    layers = []
    c_means = control.layer_means() if control is not None else {}
    for layer in range(side.n_layers):
        row = dict(layer=layer)
        for name, values in layer_means.items():
            row[name] = float(values[layer])
        for name in ("simaou", "kendall", "simam_before", "simam_after"):
            if name in c_means:
                row[f"{name}_untrained"] = float(c_means[name][layer])
        for kind, stores in side.control_means().items():
            for name, values in stores.items():
                row[f"{name}_{kind}"] = float(values[layer])
        upd = [r for r in updates if r["layer"] == layer]
        row["ft_dwk_norm"] = float(np.mean([r["dwk_norm"] for r in upd]))
        row["ft_dwv_norm"] = float(np.mean([r["dwv_norm"] for r in upd]))
        layers.append(row)
    heads = []
    for layer in range(side.n_layers):
        for head in range(side.n_heads):
            heads.append(dict(layer=layer, head=head, **{n: float(v[layer, head]) for n, v in head_means.items()}))
    examples = side.rows
    if control is not None:
        for row, c_row in zip(examples, control.rows):
            row.update({f"untrained_{k}": c_row[k] for k in ("zsl_pred", "icl_pred", "ft_pred")})
    return layers, heads, examples
