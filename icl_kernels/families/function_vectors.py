"""Function vectors (Todd et al., 2024): heads whose mean ICL output carries the task.

1. **Mean head outputs** a_bar[l, h]: the mean of ``hook_z`` at the prediction position over clean
   ICL prompts (`icl_kernels.engine.patching.head_means`).
2. **Causal indirect effect** (CIE) of head (l, h) on a corrupted prompt (the same demonstrations
   with their labels permuted among them, `shuffle_demo_labels`; a label may stay in place, as in
   the paper): P(gold | corrupted, z[l, h] at the prediction position := a_bar[l, h]) - P(gold |
   corrupted), P the softmax probability of the gold label's first token over the whole
   vocabulary. The average over corrupted prompts (AIE) ranks the heads (`indirect_effects`). The
   patch is `icl_kernels.engine.patching.mean_ablation` with the clean means, run on corrupted prompts.
3. **Function vector** v = sum over the top heads of a_bar[l, h] @ W_O[l, h] (`function_vector`).
   The output bias b_O is *not* included (it belongs to the layer, not to a head; Todd's code adds
   one b_O per head for models whose out-projection has a bias).
4. **Evaluation**: v added to the residual stream after layer l (``hook_resid_post``) at the
   prediction position of zero-shot prompts (`icl_kernels.families.task_vectors.run_with_residual`),
   accuracy for every l; the control is the same construction from random heads, rescaled to the
   norm of v (`fv_layer_sweep`).

Tests: means and CIE measured on the same uncorrupted prompt give CIE = 0 for every head; with W_O
zeroed for all heads but one, only that planted head has a nonzero CIE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.engine.label_scoring import label_log_probs, score_dtype
from icl_kernels.engine.patching import (
    Edit,
    EditContext,
    Head,
    check_heads,
    mean_ablation,
    run_with_edits,
)
from icl_kernels.engine.prefix_cache import encode_prefix, reuse_reason
from icl_kernels.families.task_vectors import run_with_residual
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import NonFiniteLogitsError
from icl_kernels.utils.stats import rng, wilson_interval

__all__ = [
    "shuffle_demo_labels",
    "shuffled_label_prompts",
    "indirect_effects",
    "top_heads",
    "function_vector",
    "fv_layer_sweep",
]


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


def indirect_effects(
    model: tl_backend.Model,
    corrupted: Sequence,
    label_ids: Sequence[Sequence[int]],
    means: Float[Tensor, "layer head_index d_head"],
    *,
    batch_size: int = 4,
    reuse_prefix: bool = True,
    head_batch: int = 32,
    progress: bool = False,
) -> Float[Tensor, "layer head_index"]:
    """Average causal indirect effect of each head: mean over ``corrupted`` prompts of
    P(gold | head's z := ``means``) - P(gold | corrupted), at the prediction position.

    The patch touches only the prediction position, the last token, so everything before it is the
    same in every patched run. With ``reuse_prefix`` (the default) each prompt's first ``T - 1``
    tokens run once (`icl_kernels.engine.prefix_cache.encode_prefix`) and the last token runs against
    their keys and values in one batch of ``head_batch`` rows, one patched head per row plus an
    unpatched row: about two forward passes per prompt instead of one per head. It equals the
    per-head full forward to ~1e-14 relative in float64 (``tests/unit/test_families.py``; ~5e-5 on a
    bridge's GPT-Neo / GPT-J, whose Hugging Face attention takes q.k in float32); where prefix reuse
    cannot be exact (`icl_kernels.engine.prefix_cache.reuse_reason`) every head runs in full.
    Effects are accumulated in the scores' dtype (`icl_kernels.engine.label_scoring.score_dtype`).
    """

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if reuse_prefix and reuse_reason(model, min(len(p.tokens) for p in corrupted) - 1) is None:
        if head_batch < 1:
            raise ValueError(f"head_batch must be >= 1, not {head_batch}.")
        out = torch.zeros(n_layers * n_heads, dtype=score_dtype(model))
        first = [ids[0] for ids in label_ids]
        for index, prompt in enumerate(tqdm(corrupted, desc="indirect effects: corrupted prompts", unit="prompt", disable=not progress)):
            out += _prompt_indirect_effects(model, prompt, index, first[prompt.query_label], means, heads, head_batch)
        return (out / len(corrupted)).view(n_layers, n_heads)
    gold = torch.tensor([p.query_label for p in corrupted])
    rows = torch.arange(len(gold))
    base = run_with_edits(model, corrupted, label_ids, batch_size=batch_size).exp()[rows, gold]
    out = torch.zeros(n_layers, n_heads, dtype=score_dtype(model))
    for layer, head in tqdm(heads, desc="indirect effects: heads", unit="head", disable=not progress):
        patched = run_with_edits(model, corrupted, label_ids, mean_ablation([(layer, head)], means),
                                 batch_size=batch_size).exp()[rows, gold]
        out[layer, head] = (patched - base).mean()
    return out


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
                             head_batch: int) -> Float[Tensor, " n_heads_total"]:
    """P(gold | one head patched) - P(gold) for every head on one prompt (``corrupted[index]``),
    prefix run once."""
    prefix = encode_prefix(model, prompt.tokens[:-1])
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
    model: tl_backend.Model, means: Float[Tensor, "layer head_index d_head"], heads: Sequence[Head]
) -> Float[Tensor, " d_model"]:
    """sum over ``heads`` of means[l, h] @ W_O[l, h] (no output bias; CPU float32)."""
    heads = check_heads(model, heads)
    vector = torch.zeros(model.cfg.d_model)
    with torch.no_grad():
        for layer, head in heads:
            w_o = model.blocks[layer].attn.W_O[head].detach().float().cpu()  # [d_head d_model]
            vector += means[layer, head].float() @ w_o
    return vector


def fv_layer_sweep(
    model: tl_backend.Model,
    zsl_prompts: Sequence,
    label_ids: Sequence[Sequence[int]],
    vectors: dict[str, Float[Tensor, " d_model"]],
    *,
    batch_size: int = 4,
) -> pd.DataFrame:
    """Accuracy of ``zsl_prompts`` with each named vector added after every layer at the
    prediction position (Wilson intervals), plus the unedited zero-shot accuracy (layer -1)."""
    gold = np.array([p.query_label for p in zsl_prompts])
    records = []

    def add(name: str, layer: int, scores: Tensor) -> None:
        correct = scores.argmax(-1).numpy() == gold
        lo, hi = wilson_interval(int(correct.sum()), len(correct))
        records.append(dict(vector=name, layer=layer, n=len(gold), accuracy=float(correct.mean()),
                            accuracy_low=lo, accuracy_high=hi))

    add("none", -1, run_with_edits(model, zsl_prompts, label_ids, batch_size=batch_size))
    for name, vector in vectors.items():
        for layer in range(model.cfg.n_layers):
            add(name, layer, run_with_residual(model, zsl_prompts, label_ids, layer, vector, batch_size=batch_size))
    return pd.DataFrame(records)

