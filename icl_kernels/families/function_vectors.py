"""Function vectors (Todd et al., ICLR 2024): heads whose mean ICL output carries the task.

As the official code (``ericwtodd/function_vectors`` @fb9eac7) runs it:

1. **Clean prompts**: 10-shot ICL prompts (``src/utils/prompt_utils.py``; for open-vocabulary tasks
   ``Q: x\nA: y`` demonstrations, `icl_kernels.data.tasks`), kept only where the model answers
   correctly (`correct_answers`: top-1 over the whole vocabulary equals the gold answer's first
   token, ``src/utils/eval_utils.py``; ``scoring="label-words"`` is the classification variant, argmax
   over the task's label words). How many were kept is reported.
2. **Mean head outputs** over the kept prompts at the last token: ``hook_z`` (a_bar, the CIE patch;
   ``get_mean_head_activations`` in ``src/utils/extract_utils.py``) and each head's actual write
   into the residual stream (`icl_kernels.engine.head_writes.mean_head_writes`, after Gemma's
   post-attention norm).
3. **Causal indirect effect** (CIE, ``src/compute_indirect_effect.py``) on corrupted prompts: the same
   demonstrations with their labels permuted among them (`shuffle_demo_labels`; a label may stay in
   place, as in the paper; `label_stay_fraction` reports how many do), CIE = P(gold | corrupted, z[l,
   h] := a_bar[l, h]) - P(gold | corrupted), P the softmax probability of the gold answer's first
   token over the whole vocabulary (`prompt_indirect_effects`). The average (AIE) ranks the heads;
   `split_half_correlation` reports how stable the ranking is (Spearman between two halves of the
   prompts).
4. **Function vector** v = the sum of the top-k heads' mean writes (`function_vector`; k from
   `fv_top_k`: 10 at the sizes studied here; ``compute_function_vector``). `projected_function_vector`
   is the older mean-z-through-W_O variant (equal without a post-attention norm, wrong on Gemma).
5. **Evaluation** (``intervention_utils.add_function_vector``, ``eval_utils.n_shot_eval``): v added to
   the residual stream after one layer (``hook_resid_post``) at the last token of cue-free zero-shot
   prompts (``Q: x\nA:``), top-1 accuracy over the vocabulary (`fv_correct`). The layer is chosen on
   a selection split (first best layer) and accuracy is reported on a separate report split, beside
   zero-shot and at least 10 random-head vectors of the same norm (`random_function_vectors`), with
   paired bootstrap intervals (`function_vector_study`).

Todd et al.'s numbers for GPT-J (six tasks, FV at layer 9): zero-shot .055 -> .575 with the FV
(`TODD_GPTJ`).

Tests (``tests/unit/test_function_vectors.py``, ``tests/unit/test_families.py``): means and CIE
measured on the same uncorrupted prompt give CIE = 0 for every head; with W_O zeroed for all heads
but one, only that planted head has a nonzero CIE, ranks first, and its function vector transfers
the task to zero-shot prompts; the per-layer sum of head writes plus the bias term is the mean
``hook_attn_out``; the split-half correlation equals a hand computation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy.stats import spearmanr
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import pad_id
from icl_kernels.engine.condition_runs import score_conditions
from icl_kernels.engine.head_writes import mean_head_outputs
from icl_kernels.engine.joining_rows import head_patch_log_probs, joining_reason
from icl_kernels.engine.label_scoring import label_log_probs, label_scores, prediction_logits, score_dtype
from icl_kernels.engine.patching import (
    Edit,
    EditContext,
    Head,
    check_heads,
    mean_ablation,
    patch_heads,
    run_with_edits,
)
from icl_kernels.engine.prefix_cache import encode_prefix, reuse_reason
from icl_kernels.engine.vocab_scoring import answer_scores
from icl_kernels.families.copy_control import copy_control
from icl_kernels.families.head_ablation import random_head_sets
from icl_kernels.families.task_vectors import choose_layer, residual_edits
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import NonFiniteLogitsError
from icl_kernels.utils.stats import mean_difference, paired_bootstrap, proportion, rng, wilson_interval

__all__ = [
    "SCORINGS",
    "answered_head_outputs",
    "TODD_GPTJ",
    "shuffle_demo_labels",
    "shuffled_label_prompts",
    "label_stay_fraction",
    "prompt_indirect_effects",
    "indirect_effects",
    "split_half_correlation",
    "top_heads",
    "fv_top_k",
    "function_vector",
    "projected_function_vector",
    "random_function_vectors",
    "check_scoring",
    "correct_answers",
    "fv_correct",
    "fv_layer_sweep",
    "conditions_correct",
    "FunctionVectorHeads",
    "function_vector_heads",
    "function_vector_study",
]

#: How an answer counts as correct: top-1 over the whole vocabulary (Todd et al.) or argmax over the
#: task's label words (classification tasks).
SCORINGS = ("vocab", "label-words")

#: Todd et al.'s GPT-J numbers (peers.md section 1, [2nd]): six tasks, FV added at layer 9 of 28,
#: top-1 accuracy; k = 10 heads.
TODD_GPTJ = {"model": "GPT-J 6B", "k": 10, "layer": 9, "n_layers": 28, "zero_shot": 0.055, "fv_zero_shot": 0.575,
             "shuffled": 0.391, "fv_shuffled": 0.908}


def shuffle_demo_labels(prompt, permutation: Sequence[int] | np.ndarray):
    """The prompt with demonstration ``i`` labelled as demonstration ``permutation[i]`` was (label
    tokens moved, every later span shifted when label words differ in length)."""
    n = prompt.n_demos
    perm = [int(p) for p in permutation]
    if sorted(perm) != list(range(n)):
        raise ValueError(f"permutation must reorder the {n} demonstrations, got {perm}.")
    tokens = list(prompt.tokens)
    label_tokens = [tokens[a:b] for a, b in prompt.demo_label_spans]
    order = sorted(range(n), key=lambda i: prompt.demo_label_spans[i][0])
    new_tokens: list[int] = []
    cursor = 0
    shifts: list[tuple[int, int]] = []  # (old end of a label span, cumulative shift after it)
    new_label_spans: dict[int, tuple[int, int]] = {}
    for i in order:
        a, b = prompt.demo_label_spans[i]
        new_tokens.extend(tokens[cursor:a])
        start = len(new_tokens)
        new_tokens.extend(label_tokens[perm[i]])
        new_label_spans[i] = (start, len(new_tokens))
        shifts.append((b, len(new_tokens) - b))
        cursor = b
    new_tokens.extend(tokens[cursor:])

    def moved(pos: int) -> int:
        shift = 0
        for end, s in shifts:
            if pos >= end:
                shift = s
        return pos + shift

    def span(s: tuple[int, int]) -> tuple[int, int]:
        return (moved(s[0]), moved(s[1]))

    return dataclasses.replace(
        prompt, tokens=tuple(new_tokens),
        demo_input_spans=tuple(span(s) for s in prompt.demo_input_spans),
        demo_label_spans=tuple(new_label_spans[i] for i in range(n)),
        separator_spans=tuple(span(s) for s in prompt.separator_spans),
        demo_labels=tuple(prompt.demo_labels[perm[i]] for i in range(n)),
        query_span=span(prompt.query_span),
    )


def shuffled_label_prompts(prompts: Sequence, seed: int = 0) -> list:
    """Each prompt with its demonstration labels permuted (seeded per prompt, stream
    ``shuffled_labels``)."""
    return [shuffle_demo_labels(p, rng("shuffled_labels", seed, i).permutation(p.n_demos)) for i, p in enumerate(prompts)]


def prompt_indirect_effects(
    model: tl_backend.Model,
    corrupted: Sequence,
    label_ids: Sequence[Sequence[int]],
    means: Float[Tensor, "layer head_index d_head"] | Float[Tensor, "prompt layer head_index d_head"],
    *,
    batch_size: int = 4,
    reuse_prefix: bool = True,
    head_batch: int = 32,
    join_rows: bool = True,
    progress: bool = False,
) -> Float[Tensor, "prompt layer head_index"]:
    """Causal indirect effect of each head on each of the ``corrupted`` prompts:
    P(gold | head's z := ``means``) - P(gold | corrupted), at the prediction position, P the softmax
    probability of the gold answer's first token over the whole vocabulary
    (``ericwtodd/function_vectors`` ``src/compute_indirect_effect.py``).

    ``means`` may also hold one value per prompt (``[prompt layer head_index d_head]``, e.g. each
    prompt's head outputs recorded in another run by `icl_kernels.engine.patching.run_with_edits`):
    prompt ``i``'s heads are then set to ``means[i]``, the one-head-at-a-time loop of
    `icl_kernels.engine.patching.patch_heads` (activation patching from a clean run) on the same fast paths.

    The patch touches only the prediction position, the last token, so everything before it is the
    same in every patched run. With ``reuse_prefix`` (the default) each prompt's first ``T - 1``
    tokens run once (`icl_kernels.engine.prefix_cache.encode_prefix`) and the last token runs against
    their keys and values in one batch of ``head_batch`` rows, one patched head per row plus an
    unpatched row: about two forward passes per prompt instead of one per head. It equals the
    per-head full forward to ~1e-14 relative in float64 (``tests/unit/test_families.py``; ~5e-5 on a
    bridge's GPT-Neo / GPT-J, whose Hugging Face attention takes q.k in float32); where prefix reuse
    cannot be exact (`icl_kernels.engine.prefix_cache.reuse_reason`) every head runs in full.

    With ``join_rows`` (the default, on a HookedTransformer: `icl_kernels.engine.joining_rows`) the
    unpatched last token runs once and a head's patched row joins the batch at the head's layer,
    from the unpatched residual there: a head at layer ``L`` costs ``n_layers - L`` layers, not all
    of them (equal to the batch of whole rows to 1e-10 in float64, ``tests/unit/test_joining_rows.py``).
    Effects are in the scores' dtype (`icl_kernels.engine.label_scoring.score_dtype`).
    """
    if not corrupted:
        raise ValueError("indirect effects need at least one corrupted prompt.")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    per_prompt = means.ndim == 4
    if per_prompt and means.shape[0] != len(corrupted):
        raise ValueError(f"means holds values for {means.shape[0]} prompts but {len(corrupted)} prompts were given: "
                         "record them on the same prompts, in the same order.")
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if reuse_prefix and reuse_reason(model, min(len(p.tokens) for p in corrupted) - 1) is None:
        if head_batch < 1:
            raise ValueError(f"head_batch must be >= 1, not {head_batch}.")
        first = [ids[0] for ids in label_ids]
        join = join_rows and joining_reason(model) is None
        # W_U transposed once for every prompt's unembedding (label_scoring.unembed)
        w_u_t = model.unembed.W_U.detach().T.contiguous() if join else None
        rows = [_prompt_indirect_effects(model, prompt, index, first[prompt.query_label],
                                         means[index] if per_prompt else means, heads, head_batch, join, w_u_t)
                for index, prompt in enumerate(tqdm(corrupted, desc="indirect effects: corrupted prompts",
                                                    unit="prompt", disable=not progress))]
        return torch.stack(rows).view(len(corrupted), n_layers, n_heads)
    gold = torch.tensor([p.query_label for p in corrupted])
    rows_ = torch.arange(len(gold))
    base = run_with_edits(model, corrupted, label_ids, batch_size=batch_size).exp()[rows_, gold]
    out = torch.zeros(len(corrupted), n_layers, n_heads, dtype=score_dtype(model))
    for layer, head in tqdm(heads, desc="indirect effects: heads", unit="head", disable=not progress):
        edits = patch_heads([(layer, head)], means) if per_prompt else mean_ablation([(layer, head)], means)
        patched = run_with_edits(model, corrupted, label_ids, edits, batch_size=batch_size).exp()[rows_, gold]
        out[:, layer, head] = patched - base
    return out


def indirect_effects(
    model: tl_backend.Model,
    corrupted: Sequence,
    label_ids: Sequence[Sequence[int]],
    means: Float[Tensor, "layer head_index d_head"] | Float[Tensor, "prompt layer head_index d_head"],
    *,
    batch_size: int = 4,
    reuse_prefix: bool = True,
    head_batch: int = 32,
    join_rows: bool = True,
    progress: bool = False,
) -> Float[Tensor, "layer head_index"]:
    """Average causal indirect effect (AIE) of each head: the mean over ``corrupted`` prompts of
    `prompt_indirect_effects`."""
    return prompt_indirect_effects(model, corrupted, label_ids, means, batch_size=batch_size,
                                   reuse_prefix=reuse_prefix, head_batch=head_batch, join_rows=join_rows,
                                   progress=progress).mean(0)


def _row_mean_patches(row_heads: Sequence[Head | None], means: Tensor) -> list[Edit]:
    """Edits that set, in batch row ``r``, the z of head ``row_heads[r]`` at the prediction position
    to its mean (rows with ``None`` are left alone)."""
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for row, head in enumerate(row_heads):
        if head is not None:
            rows, hs = by_layer.setdefault(head[0], ([], []))
            rows.append(row)
            hs.append(head[1])
    edits = []
    for layer, (rows, hs) in by_layer.items():
        def fn(z: Tensor, context: EditContext, rows=rows, hs=hs, layer=layer) -> Tensor:
            z = z.clone()
            r = torch.as_tensor(rows, device=z.device)
            h = torch.as_tensor(hs, device=z.device)
            z[r, context.predictions(z.device)[r], h] = means[layer, hs].to(z.device, z.dtype)
            return z

        edits.append(Edit(layer, fn, "z", f"mean L{layer} one head per row"))
    return edits


def _prompt_indirect_effects(model, prompt, index: int, gold_token: int, means: Tensor, heads: list[Head],
                             head_batch: int, join: bool, w_u_t: Tensor | None) -> Float[Tensor, " n_heads_total"]:
    """P(gold | one head patched) - P(gold) for every head on one prompt (``corrupted[index]``),
    prefix run once; with ``join`` (`icl_kernels.engine.joining_rows`) each patched row joins the
    batch at its head's layer, else every row runs every layer."""
    prefix = encode_prefix(model, prompt.tokens[:-1])
    if join:
        try:
            base, patched = head_patch_log_probs(model, prefix, prompt.tokens[-1:], heads, means, [gold_token],
                                                 max_rows=head_batch, w_u_t=w_u_t)
        except NonFiniteLogitsError as error:
            raise NonFiniteLogitsError(
                f"indirect effects of corrupted prompt {index} (the 'prompts' below are its rows: row 0 unpatched, "
                f"row 1 + layer * {model.cfg.n_heads} + head with that head patched): {error}"
            ) from None
        return patched[:, 0].exp() - base[0].exp()
    effects = []
    for start in range(0, len(heads), head_batch):
        row_heads: list[Head | None] = [None, *heads[start:start + head_batch]]
        try:
            log_p = label_log_probs(
                model, [prompt] * len(row_heads), [[gold_token]], edits=_row_mean_patches(row_heads, means),
                prefix=prefix, whole_label=False, batch_size=len(row_heads),
            )
        except NonFiniteLogitsError as error:  # its rows are one prompt under different patches
            raise NonFiniteLogitsError(
                f"indirect effects of corrupted prompt {index} (the 'prompts' below are its batch rows: row 0 "
                f"unpatched, then heads {heads[start]} to {row_heads[-1]} patched one per row): {error}"
            ) from None
        p_gold = log_p[:, 0].exp()
        effects.append(p_gold[1:] - p_gold[0])
    return torch.cat(effects)


def top_heads(scores: Float[Tensor, "layer head_index"], k: int) -> list[Head]:
    """The ``k`` heads with the highest scores (ties: earlier layer, then head)."""
    n_heads = scores.shape[1]
    flat = scores.flatten().numpy()
    order = np.lexsort((np.arange(len(flat)), -flat))[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def function_vector(
    writes: Float[Tensor, "layer head_index d_model"], heads: Sequence[Head]
) -> Float[Tensor, " d_model"]:
    """Todd et al.'s function vector: the sum over ``heads`` of each head's mean write into the
    residual stream (`icl_kernels.engine.head_writes.mean_head_writes`; ``compute_function_vector`` in
    ``ericwtodd/function_vectors`` ``src/utils/extract_utils.py``). No output bias: ``b_O`` belongs to
    the layer (Todd's code adds one ``b_O`` per head where the projection has one)."""
    n_layers, n_heads = writes.shape[:2]
    heads = _check_head_list(heads, n_layers, n_heads)
    if not heads:
        raise ValueError("A function vector needs at least one head.")
    return torch.stack([writes[layer, head] for layer, head in heads]).sum(0)


def projected_function_vector(
    model: tl_backend.Model, means: Float[Tensor, "layer head_index d_head"], heads: Sequence[Head]
) -> Float[Tensor, " d_model"]:
    """The older variant: sum over ``heads`` of means[l, h] @ W_O[l, h] (mean ``hook_z`` through the
    output projection, CPU float32). It equals `function_vector` of the mean writes where the
    attention output enters the residual stream unnormalised, and is wrong (too small by the
    post-attention norm's ``g / rms``, ~525x on gemma-3-270m) on Gemma-2/3."""
    heads = check_heads(model, heads)
    vector = torch.zeros(model.cfg.d_model)
    with torch.no_grad():
        for layer, head in heads:
            w_o = model.blocks[layer].attn.W_O[head].detach().float().cpu().contiguous()  # [d_head d_model]
            vector += means[layer, head].float() @ w_o
    return vector


def _check_head_list(heads: Sequence[Head], n_layers: int, n_heads: int) -> list[Head]:
    out = []
    for item in heads:
        layer, head = (int(x) for x in item)
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"Head {(layer, head)} does not exist: the model has {n_layers} layers x {n_heads} heads.")
        out.append((layer, head))
    return out


def fv_top_k(n_layers: int, n_heads: int) -> int:
    """How many heads the function vector sums, scaled to the model: Todd et al. use 10 for GPT-J
    (28 x 16 = 448 heads) and "10-100 scaled by model size" for larger models, so k = 10 x (heads /
    448) rounded, at least 10 and at most 100; in a model so small that 10 heads would be over a
    quarter of its heads, a quarter of them (at least 1). gemma-3-270m (72 heads) and
    smollm2-135m (270) get 10, Llama 2 7B (1,024) 23, Llama 2 70B (5,120) 100."""
    total = n_layers * n_heads
    k = min(100, max(10, round(10 * total / 448)))
    return max(1, min(k, total // 4))


def label_stay_fraction(clean: Sequence, corrupted: Sequence) -> float:
    """Share of demonstration labels that a corruption left correct (the same answer as in the clean
    prompt): about 1 / n_demos for a permutation of distinct answers, more where answers repeat."""
    same = [a == b for c, x in zip(clean, corrupted, strict=True) for a, b in zip(c.demo_labels, x.demo_labels, strict=True)]
    return float(np.mean(same)) if same else float("nan")


def split_half_correlation(effects: Float[Tensor, "prompt layer head_index"], seed: int = 0) -> float:
    """Spearman's rho between the heads' average indirect effects on two halves of the prompts (a
    seeded random split, stream ``fv_split_half``; the first half gets n // 2 prompts): how stable
    the head ranking is. NaN with fewer than 4 prompts."""
    n = effects.shape[0]
    if n < 4:
        return float("nan")
    order = rng("fv_split_half", seed).permutation(n)
    a = effects[torch.as_tensor(order[: n // 2])].mean(0).flatten().double().numpy()
    b = effects[torch.as_tensor(order[n // 2:])].mean(0).flatten().double().numpy()
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------
# Scoring: top-1 over the vocabulary (open tasks) or over the label words (classification)
# ------------------------------------------------------------------------------------------------


def check_scoring(scoring: str) -> None:
    """A clear error unless ``scoring`` is one of `SCORINGS`."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}.")


def correct_answers(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    scoring: str = "vocab",
    edits: Sequence[Edit] = (),
    batch_size: int = 4,
) -> Bool[Tensor, " prompt"]:
    """Whether each prompt is answered correctly under ``edits``: with ``scoring="vocab"`` the top-1
    token over the whole vocabulary is the gold answer's first token (Todd et al.;
    `icl_kernels.engine.vocab_scoring.answer_scores`), with ``"label-words"`` the gold class has the
    highest first-label-token score among the label words (`run_with_edits`)."""
    check_scoring(scoring)
    if not prompts:
        raise ValueError("correct_answers needs at least one prompt.")
    if scoring == "vocab":  # the first token decides; the rest of the answer would not change it
        answers = [label_ids[p.query_label][:1] for p in prompts]
        return answer_scores(model, list(prompts), answers, edits=edits, batch_size=batch_size,
                             pad_token_id=pad_id(model)).first_token_correct.cpu()
    gold = torch.tensor([p.query_label for p in prompts])
    return run_with_edits(model, prompts, label_ids, edits, batch_size=batch_size).argmax(-1) == gold


def answered_head_outputs(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    scoring: str = "vocab",
    batch_size: int = 4,
) -> tuple[Bool[Tensor, " prompt"], Float[Tensor, "layer head_index d_head"], Float[Tensor, "layer head_index d_model"]]:
    """Steps 1 and 2 from one pass over ``prompts``: whether each is answered correctly (as
    `correct_answers` scores it), and each head's mean ``z`` and mean write over the correctly answered
    ones (as `icl_kernels.engine.head_writes.mean_head_outputs` over them; NaN when none is).

    `correct_answers` then `mean_head_outputs` run the kept prompts a second time; here the answer is
    read from the same pass that records the heads (`icl_kernels.engine.head_writes.mean_head_outputs`
    with ``keep``). The prompts are batched as they come rather than only the kept ones, so in float32
    the means round differently (to ~1e-7, which can move a near-tied answer); in float64 they agree to
    1e-10 (``tests/unit/test_function_vectors.py``)."""
    check_scoring(scoring)
    if not prompts:
        raise ValueError("answered_head_outputs needs at least one prompt.")
    firsts = [int(ids[0]) for ids in label_ids]
    correct: list[Tensor] = []

    def answered(batch, out) -> Tensor:
        begin = sum(len(c) for c in correct)  # index of the batch's first prompt, for error messages
        gold = torch.tensor([p.query_label for p in batch.prompts])
        if scoring == "vocab":  # top-1 over the vocabulary is the gold answer's first token
            top1 = prediction_logits(model, out.final, first_index=begin).argmax(-1).cpu()
            hit = top1 == torch.tensor([firsts[g] for g in gold.tolist()])
        else:  # the gold class has the highest first-label-token score among the label words
            hit = label_scores(model, out.final, firsts, first_index=begin).argmax(-1) == gold
        correct.append(hit)
        return hit

    z_means, write_means = mean_head_outputs(model, prompts, batch_size=batch_size, keep=answered)
    return torch.cat(correct), z_means, write_means


def fv_correct(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    layer: int | None,
    vector: Float[Tensor, " d_model"] | None,
    *,
    scoring: str = "vocab",
    batch_size: int = 4,
) -> Bool[Tensor, " prompt"]:
    """`correct_answers` with ``vector`` added to ``hook_resid_post`` of ``layer`` at each prompt's
    last token (``layer=None``: no edit): Todd's ``add_function_vector``."""
    edits = () if layer is None else residual_edits(layer, vector[None].expand(len(prompts), -1), "add")
    return correct_answers(model, prompts, label_ids, scoring=scoring, edits=edits, batch_size=batch_size)


def fv_layer_sweep(
    model: tl_backend.Model,
    zsl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    vectors: dict[str, Float[Tensor, " d_model"]],
    *,
    layers: Sequence[int] | None = None,
    scoring: str = "label-words",
    batch_size: int = 4,
) -> pd.DataFrame:
    """Accuracy of ``zsl_prompts`` with each named vector added after every layer (or ``layers``) at
    the prediction position (Wilson intervals), plus the unedited zero-shot accuracy (layer -1)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    records = []

    def add(name: str, layer: int, correct: Tensor) -> None:
        lo, hi = wilson_interval(int(correct.sum()), len(correct))
        records.append(dict(vector=name, layer=layer, n=len(correct), accuracy=float(correct.float().mean()),
                            accuracy_low=lo, accuracy_high=hi))

    kw = dict(scoring=scoring, batch_size=batch_size)
    add("none", -1, fv_correct(model, zsl_prompts, label_ids, None, None, **kw))
    # every (vector, layer) edits the last token only: each prompt's context runs once for all of them
    keys = [(name, int(layer)) for name in vectors for layer in layers]
    conditions = [residual_edits(layer, vectors[name][None].expand(len(zsl_prompts), -1), "add") for name, layer in keys]
    for (name, layer), correct in zip(keys, conditions_correct(model, zsl_prompts, label_ids, conditions, **kw)):
        add(name, layer, correct)
    return pd.DataFrame(records)


def conditions_correct(
    model: tl_backend.Model,
    prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    conditions: Sequence[Sequence[Edit]],
    *,
    scoring: str = "vocab",
    batch_size: int = 4,
) -> list[Bool[Tensor, " prompt"]]:
    """`correct_answers` under each condition (a list of prediction-only edits), each prompt's
    context run once for all of them (`icl_kernels.engine.condition_runs.score_conditions`)."""
    check_scoring(scoring)
    if scoring == "vocab":
        answers = [label_ids[p.query_label][:1] for p in prompts]
        scored = score_conditions(model, list(prompts), conditions, answer_ids=answers, batch_size=batch_size)
        return [s.first_token_correct.cpu() for s in scored]
    gold = torch.tensor([p.query_label for p in prompts])
    scored = score_conditions(model, list(prompts), conditions, label_ids=label_ids, batch_size=batch_size)
    return [s.argmax(-1) == gold for s in scored]


# ------------------------------------------------------------------------------------------------
# The method end to end
# ------------------------------------------------------------------------------------------------


@dataclass
class FunctionVectorHeads:
    """Step 1-2 of the method on one set of clean ICL prompts.

    Attributes:
        correct: per clean prompt, whether the model answers it correctly (the prompts kept).
        z_means: mean ``hook_z`` at the last token over the kept prompts (the CIE patch).
        write_means: each head's mean write into the residual stream there (the function vector's terms).
        effects: per kept prompt, each head's CIE on its corrupted version ``[prompt layer head_index]``.
        label_stay: share of demonstration labels the corruption left correct.
        scoring: how ``correct`` was decided (`SCORINGS`).
    """

    correct: Bool[Tensor, " clean_prompt"]
    z_means: Float[Tensor, "layer head_index d_head"]
    write_means: Float[Tensor, "layer head_index d_model"]
    effects: Float[Tensor, "kept_prompt layer head_index"]
    label_stay: float
    scoring: str

    @property
    def aie(self) -> Float[Tensor, "layer head_index"]:
        """Average indirect effect of each head over the kept prompts."""
        return self.effects.mean(0)

    def split_half(self, seed: int = 0) -> float:
        """`split_half_correlation` of the kept prompts' effects."""
        return split_half_correlation(self.effects, seed)


def function_vector_heads(
    model: tl_backend.Model,
    icl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    scoring: str = "vocab",
    seed: int = 0,
    batch_size: int = 4,
    reuse_prefix: bool = True,
    head_batch: int = 32,
    join_rows: bool = True,
    one_pass: bool = True,
    progress: bool = False,
) -> FunctionVectorHeads:
    """Todd et al.'s extraction on clean ICL prompts: keep the prompts the model answers correctly
    (`correct_answers`), average each head's output and write there, corrupt the kept prompts by
    permuting their labels among the demonstrations (`shuffled_label_prompts`) and measure every
    head's CIE on them (`prompt_indirect_effects`). ``one_pass``: the answers and the means come from
    one pass over the prompts (`answered_head_outputs`); off: `correct_answers`, then
    `icl_kernels.engine.head_writes.mean_head_outputs` over the kept prompts."""
    check_scoring(scoring)
    if one_pass:
        correct, z_means, writes = answered_head_outputs(model, icl_prompts, label_ids, scoring=scoring,
                                                         batch_size=batch_size)
    else:
        correct = correct_answers(model, icl_prompts, label_ids, scoring=scoring, batch_size=batch_size)
    kept = [p for p, ok in zip(icl_prompts, correct.tolist(), strict=True) if ok]
    if len(kept) < 2:
        raise ValueError(
            f"The model answers {len(kept)} of {len(icl_prompts)} clean ICL prompts correctly ({scoring} scoring); "
            "function vectors need at least 2 (Todd et al. average over 100): use more prompts or shots, or "
            "a task the model can do in context.")
    if not one_pass:
        z_means, writes = mean_head_outputs(model, kept, batch_size=batch_size)  # one pass: head_means, mean_head_writes
    corrupted = shuffled_label_prompts(kept, seed)
    effects = prompt_indirect_effects(model, corrupted, label_ids, z_means, batch_size=batch_size,
                                      reuse_prefix=reuse_prefix, head_batch=head_batch, join_rows=join_rows,
                                      progress=progress)
    return FunctionVectorHeads(correct, z_means, writes, effects, label_stay_fraction(kept, corrupted), scoring)


def random_function_vectors(
    writes: Float[Tensor, "layer head_index d_model"],
    k: int,
    draws: int,
    norm: float,
    *,
    exclude: Sequence[Head] = (),
    seed: int = 0,
) -> tuple[Float[Tensor, "draw d_model"], list[list[Head]]]:
    """``draws`` control vectors: the summed mean writes of ``k`` random heads (outside ``exclude``;
    stream ``random_heads``), each rescaled to ``norm``; and the head sets."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, not {draws}.")
    sets = random_head_sets(writes.shape[0], writes.shape[1], k, draws, exclude=exclude, seed=seed)
    vectors = torch.stack([function_vector(writes, s) for s in sets])
    vectors = vectors * (norm / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return vectors, sets


def function_vector_study(
    model: tl_backend.Model,
    heads: FunctionVectorHeads,
    zsl_select: Sequence,
    zsl_report: Sequence,
    label_ids: Sequence[Sequence[int]],
    *,
    k: int,
    random_draws: int = 10,
    report_correct: Bool[Tensor, " prompt"] | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 4,
    bootstrap: int = 1000,
    random_layers: str = "selected",
    copy_match: Bool[Tensor, " prompt"] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Steps 3-4: the function vector of the top-``k`` heads by AIE, added at one layer of cue-free
    zero-shot prompts, against ``random_draws`` random-head vectors of the same norm and zero-shot.

    ``zsl_select`` are the zero-shot prompts of the queries of ``heads`` (same order); those whose ICL
    prompt was answered correctly choose the layer (first best, over ``layers``, default all).
    ``zsl_report`` are other queries; with ``report_correct`` (their clean ICL prompts answered
    correctly) only those are evaluated, as Todd et al. evaluate. Returns ``(tables, summary)``:
    ``function_vectors`` (report split per layer: zero-shot and FV with Wilson intervals, the random
    vectors' mean accuracy with their SD and, as low / high, the worst and best draw), ``function_vector_selection`` (selection sweep), ``function_vector_random``
    (each random draw at the chosen layer) and ``function_vector_heads`` (the top heads and AIEs).
    ``random_layers``: the random vectors at the chosen layer only (``"selected"``, the control the
    comparison needs) or at every layer of the report table (``"all"``, 10x the conditions).
    ``copy_match`` (one per ``zsl_report`` prompt, `icl_kernels.data.prompts.input_copy_matches`):
    whether echoing the query's input is scored right; with it the summary adds the copy baseline's
    accuracy (``fv_copy_share``) and zero-shot, function-vector and random-vector accuracy on the
    prompts copying cannot answer (``*_no_copy``).
    """
    if random_layers not in ("selected", "all"):
        raise ValueError(f"random_layers must be 'selected' or 'all', not {random_layers!r}.")
    scoring = heads.scoring
    n_layers = heads.write_means.shape[0]
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if len(zsl_select) != len(heads.correct):
        raise ValueError(f"zsl_select has {len(zsl_select)} prompts for {len(heads.correct)} clean ICL prompts; "
                         "give the zero-shot prompts of the same queries.")
    aie = heads.aie
    top = top_heads(aie, k)
    fv = function_vector(heads.write_means, top)
    randoms, sets = random_function_vectors(heads.write_means, k, random_draws, float(fv.norm()), exclude=top, seed=seed)
    kw = dict(scoring=scoring, batch_size=batch_size)
    select = [p for p, ok in zip(zsl_select, heads.correct.tolist()) if ok]
    report = list(zsl_report)
    copies = None if copy_match is None else [bool(c) for c in copy_match.tolist()]
    if copies is not None and len(copies) != len(report):
        raise ValueError(f"copy_match has {len(copies)} entries for {len(report)} report prompts.")
    if report_correct is not None:
        if len(report_correct) != len(report):
            raise ValueError(f"report_correct has {len(report_correct)} entries for {len(report)} report prompts.")
        kept = report_correct.tolist()
        report = [p for p, ok in zip(report, kept) if ok]
        copies = None if copies is None else [c for c, ok in zip(copies, kept) if ok]
    if not report:
        raise ValueError("No report prompt is left (none answered correctly in context); use more prompts.")
    selection = fv_layer_sweep(model, select, label_ids, {"function vector": fv}, layers=layers, **kw)
    per_layer = selection[selection["vector"] == "function vector"]
    layer = int(per_layer["layer"].iloc[choose_layer(per_layer["accuracy"].to_numpy())])

    zero = fv_correct(model, report, label_ids, None, None, **kw).numpy().astype(float)
    # the function vector and every random vector at every layer: each report prompt's context runs once
    vecs = [fv, *randoms]
    random_at = layers if random_layers == "all" else [layer]
    keys = [(0, lay) for lay in layers] + [(i, lay) for i in range(1, len(vecs)) for lay in random_at]
    conditions = [residual_edits(lay, vecs[i][None].expand(len(report), -1), "add") for i, lay in keys]
    by_key = {key: c.numpy().astype(float) for key, c in zip(keys, conditions_correct(model, report, label_ids,
                                                                                       conditions, **kw))}
    fv_by_layer = {lay: by_key[(0, lay)] for lay in layers}
    rnd_by_layer = {lay: np.stack([by_key[(i, lay)] for i in range(1, len(vecs))]) for lay in random_at}  # [draw prompt]
    records = [_row("none", -1, zero)]
    for lay in layers:
        records.append(_row("function vector", lay, fv_by_layer[lay]))
        if lay not in rnd_by_layer:
            continue
        per_draw = rnd_by_layer[lay].mean(1)
        # the random vectors' mean accuracy; low / high: the worst and best draw (not a Wilson interval)
        records.append(dict(vector="random heads", layer=lay, n=len(zero), accuracy=float(per_draw.mean()),
                            accuracy_low=float(per_draw.min()), accuracy_high=float(per_draw.max()),
                            accuracy_sd=float(per_draw.std(ddof=1)) if len(per_draw) > 1 else float("nan"),
                            draws=len(per_draw)))
    table = pd.DataFrame(records)
    fv_at, rnd_at = fv_by_layer[layer], rnd_by_layer[layer]
    draw_acc = rnd_at.mean(1)
    random_table = pd.DataFrame([dict(draw=d, layer=layer, heads=" ".join(f"L{a}H{b}" for a, b in s), n=len(fv_at),
                                      accuracy=float(draw_acc[d])) for d, s in enumerate(sets)])
    heads_table = pd.DataFrame([dict(rank=r + 1, layer=h[0], head=h[1], aie=float(aie[h])) for r, h in enumerate(top)])
    args = dict(unit="prompts", resamples=bootstrap, seed=seed)
    best = table[table["vector"] == "function vector"].sort_values("layer")
    best = best.iloc[choose_layer(best["accuracy"].to_numpy())]
    summary = dict(
        fv_scoring=scoring, fv_k=k, fv_heads=[list(h) for h in top], fv_norm=float(fv.norm()),
        fv_n_clean=len(heads.correct), fv_n_correct=int(heads.correct.sum()), fv_label_stay_fraction=heads.label_stay,
        fv_split_half_spearman=heads.split_half(seed), fv_random_draws=random_draws, fv_n_report=len(report),
        fv_selected_layer=layer, fv_selected_select_accuracy=float(per_layer["accuracy"].max()),
        fv_selected_accuracy=proportion(fv_at.astype(bool)),
        fv_selected_random_accuracy=dict(value=float(draw_acc.mean()), sd=float(draw_acc.std(ddof=1)) if len(draw_acc) > 1
                                         else float("nan"), min=float(draw_acc.min()), max=float(draw_acc.max()),
                                         n=len(fv_at), draws=len(draw_acc), unit="prompts"),
        fv_selected_random_below=float(((draw_acc < fv_at.mean()) + 0.5 * (draw_acc == fv_at.mean())).mean()),
        fv_selected_zero_shot_accuracy=proportion(zero.astype(bool)),
        fv_selected_minus_random=paired_bootstrap(mean_difference, [fv_at, rnd_at.mean(0)], **args),
        fv_selected_minus_zero_shot=paired_bootstrap(mean_difference, [fv_at, zero], **args),
        fv_best_layer=int(best["layer"]), fv_best_accuracy=float(best["accuracy"]),
        fv_random_best_accuracy=float(table[table["vector"] == "random heads"]["accuracy"].max()),
    )
    if copies is not None:
        summary.update(copy_control("fv", np.array(copies), fv_at, ("random", rnd_at.mean(0)), zero, args))
    return {"function_vectors": table, "function_vector_selection": selection, "function_vector_random": random_table,
            "function_vector_heads": heads_table}, summary


def _row(name: str, layer: int, correct: np.ndarray) -> dict:
    lo, hi = wilson_interval(int(correct.sum()), len(correct))
    return dict(vector=name, layer=layer, n=len(correct), accuracy=float(correct.mean()), accuracy_low=lo,
                accuracy_high=hi)
