"""Label words as anchors (Wang et al., EMNLP 2023): information flows into the label words in
shallow layers and from them to the prediction in deep layers.

Official code: ``lancopku/label-words-are-anchors`` (@74b5804): ``attention_attr.py`` and
``icl/analysis/attentioner_for_attribution.py`` (saliency), ``icl/analysis/attentioner.py``
(``AttentionAdapter``), ``icl/analysis/shallow_layer.py`` and ``shallow_layer_non_label.py``
(isolation and its random non-label control).

**Saliency** (`flow_saliency`, paper eq. 1). For each layer l, I_l = | sum_h A_{h,l} * dL/dA_{h,l} |
with L the cross-entropy of the gold class over the label words' logits at the prediction position
q. As in Wang's code the post-softmax pattern is multiplied by a ones tensor that requires grad
(here the pattern is recomputed at ``hook_z``, `icl_kernels.engine.patching.attention_edits`, the
same on both backends; a TransformerBridge discards ``hook_pattern`` edits); its gradient is
A * dL/dA. The diagonal is zeroed. With p_k the first token of demonstration k's label word and
0-indexed positions (`flow_masks`, checked cell by cell in the tests):

* S_wp = mean I_l(p_k, j) over j < p_k and all k (demonstration text -> label words), |C_wp| = sum_k p_k;
* S_pq = mean I_l(q, p_k) over k (label words -> prediction), |C_pq| = C;
* S_ww = mean I_l(i, j) over every other j < i <= q, |C_ww| = q(q+1)/2 - sum_k p_k - C.

The study averages the three flows per layer over prompts (`saliency_summary`), with a percentile
bootstrap interval over prompts (Wang show figures only; the default is 100 prompts, Wang: 1000).

**Isolation** (`anchor_isolation`, paper 2.2). In the chosen layers (all heads) label position p_k
may attend only to itself (its scores for keys j < p_k are masked; Wang add -10000 before the
softmax, here -inf: the same to float precision): the flow *into* the label words is cut. Wang
isolate the first or the last 5 of GPT2-XL's 48 layers; here k = max(1, round(5/48 * n_layers))
(`isolation_layers`; 2 of gemma-3-270m's 18 layers, 3 of smollm2-135m's 30). The control isolates
as many random non-label positions in 1 .. q-2 (stream ``anchor_control``; Wang: random non-label
positions before q-1) the same way, on the same prompts. Reported per condition:

* **label loyalty**: the share of prompts whose prediction over the label words equals the
  unedited model's (Wilson interval);
* **word loyalty**: the Jaccard similarity of the top-5 vocabulary tokens at q with vs without
  isolation (Wang's paper: top 5; their released notebook: top 10), mean over prompts with a
  bootstrap interval;
* accuracy against the gold label;
* a **paired McNemar test** between label-word and random isolation in the same layers: exact
  two-sided binomial test on the discordant prompts (loyal under one isolation and not the other),
  and the paired bootstrap difference of word loyalty.

Wang et al. (Fig. 4, no table): isolating label words in the first 5 layers cuts both loyalties
sharply; the last 5 layers and random non-label isolation are nearly harmless (GPT2-XL, GPT-J).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy.stats import binomtest
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import IclPrompt, batches, pad_id
from icl_kernels.engine.edits import Edit, edits_on
from icl_kernels.engine.label_scoring import final_residual, prediction_logits
from icl_kernels.engine.patching import attention_edits
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_bootstrap, rng, wilson_interval

__all__ = [
    "WANG_LAYERS", "WANG_DEPTH", "WORD_LOYALTY_TOP", "label_positions", "isolation_mask", "flow_masks",
    "saliency_flows", "prompt_saliency", "flow_saliency", "saliency_summary", "isolation_layers", "layer_thirds",
    "IsolationRun", "isolated_predictions", "word_loyalty", "mcnemar_exact", "anchor_isolation",
]

#: Wang et al. isolate the first / last 5 layers of GPT2-XL's 48.
WANG_LAYERS, WANG_DEPTH = 5, 48
#: Word loyalty compares the top-5 vocabulary tokens (Wang's paper).
WORD_LOYALTY_TOP = 5


def label_positions(prompt) -> list[int]:
    """The first token of each demonstration's label word."""
    return [int(a) for a, _ in prompt.demo_label_spans]


def isolation_mask(length: int, positions: Sequence[int]) -> Bool[Tensor, "query_pos key_pos"]:
    """True where query row ``p`` (for ``p`` in ``positions``) may not see key ``j < p``."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for p in positions:
        if not 0 <= int(p) < length:
            raise ValueError(f"Position {p} is outside a prompt of {length} tokens.")
        mask[int(p), : int(p)] = True
    return mask


def flow_masks(labels: Sequence[int], q: int) -> dict[str, Bool[Tensor, "query_pos key_pos"]]:
    """Wang's cell sets over positions 0..q (0-indexed) as ``[q+1, q+1]`` masks: ``wp`` (row p_k,
    keys j < p_k), ``pq`` (row q, keys p_k) and ``ww`` (every other cell j < i <= q). The three
    are disjoint and cover the strict lower triangle, q(q+1)/2 cells."""
    labels = [int(p) for p in labels]
    if any(not 0 <= p < q for p in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"Label positions must be distinct and in [0, q={q}), not {labels}.")
    n = q + 1
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
    wp = torch.zeros(n, n, dtype=torch.bool)
    for p in labels:
        wp[p, :p] = True
    pq = torch.zeros(n, n, dtype=torch.bool)
    pq[q, labels] = True
    return {"wp": wp, "pq": pq, "ww": lower & ~wp & ~pq}


def saliency_flows(saliency: Float[Tensor, "layer query_pos key_pos"], labels: Sequence[int], q: int) -> pd.DataFrame:
    """S_wp, S_pq, S_ww per layer (columns ``text_to_label``, ``label_to_prediction``, ``other``)
    from one prompt's saliency matrices (see the module docstring)."""
    masks = flow_masks(labels, q)
    n = q + 1
    s = saliency[:, :n, :n]
    return pd.DataFrame(dict(
        layer=np.arange(s.shape[0]),
        text_to_label=s[:, masks["wp"]].mean(-1).numpy(), label_to_prediction=s[:, masks["pq"]].mean(-1).numpy(),
        other=s[:, masks["ww"]].mean(-1).numpy(),
    ))


def prompt_saliency(
    model: tl_backend.Model, prompt: IclPrompt, label_ids: Sequence[Sequence[int]], *, index: int = 0
) -> Float[Tensor, "layer query_pos key_pos"]:
    """Wang's I_l of one prompt: | sum_h A_h * dL/dA_h | per layer (diagonal zeroed; CPU), through a
    ones multiplier on the recomputed pattern whose gradient is A * dL/dA."""
    device = tl_backend.model_device(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    first = torch.tensor([ids[0] for ids in label_ids], device=device)
    length = len(prompt)
    tokens = torch.tensor([prompt.tokens], device=device)
    dtype = torch.float64 if model.unembed.W_U.dtype == torch.float64 else torch.float32
    ones = {layer: torch.ones(1, n_heads, length, length, device=device, dtype=dtype, requires_grad=True)
            for layer in range(n_layers)}
    q = torch.tensor([length - 1])
    with torch.enable_grad(), edits_on(model, attention_edits(model, range(n_layers), multipliers=ones),
                                       rows=torch.tensor([0]), prediction_positions=q, lengths=q + 1):
        final = final_residual(model, tokens, q)[0]
        logits = prediction_logits(model, final, first_index=index)[first]
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([prompt.query_label], device=device))
        grads = torch.autograd.grad(loss, [ones[layer] for layer in range(n_layers)])
    saliency = torch.stack([g[0].sum(0).abs() for g in grads]).detach().cpu()  # [layer q k]
    return saliency * (1 - torch.eye(length, dtype=saliency.dtype))[None]


def flow_saliency(
    model: tl_backend.Model, prompts: Sequence, label_ids: Sequence[Sequence[int]], *, progress: bool = False
) -> pd.DataFrame:
    """Per (prompt, layer): the three mean flows of the attention x gradient saliency."""
    frames = []
    for i, prompt in enumerate(tqdm(prompts, desc="saliency: prompts", unit="prompt", disable=not progress)):
        frame = saliency_flows(prompt_saliency(model, prompt, label_ids, index=i), label_positions(prompt), len(prompt) - 1)
        frame.insert(0, "prompt", i)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


FLOWS = ("text_to_label", "label_to_prediction", "other")


def saliency_summary(
    flows: pd.DataFrame, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> pd.DataFrame:
    """Per layer: the mean of each flow over prompts with a percentile bootstrap interval over
    prompts (one resampled prompt set serves every layer and flow; stream ``bootstrap``), and the
    share of prompts where S_pq > S_wp."""
    prompts = np.sort(flows["prompt"].unique())
    layers = np.sort(flows["layer"].unique())
    cube = np.stack([flows.pivot(index="prompt", columns="layer", values=f).loc[prompts, layers].to_numpy()
                     for f in FLOWS], axis=-1)  # [prompt layer flow]
    n = len(prompts)
    idx = rng("bootstrap", seed).integers(0, n, size=(resamples, n))
    boot = cube[idx].mean(1)  # [resample layer flow]
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, alpha, axis=0), np.quantile(boot, 1 - alpha, axis=0)
    out = pd.DataFrame(dict(layer=layers, n=n))
    for j, f in enumerate(FLOWS):
        out[f] = cube[:, :, j].mean(0)
        out[f"{f}_low"], out[f"{f}_high"] = low[:, j], high[:, j]
    out["label_to_prediction_exceeds_text_to_label"] = (cube[:, :, 1] > cube[:, :, 0]).mean(0)
    return out


def isolation_layers(n_layers: int, k: int | None = None) -> dict[str, list[int]]:
    """The first and the last ``k`` layers; by default k = max(1, round(5/48 * n_layers)) (Wang et
    al.: 5 of GPT2-XL's 48), at most half the layers."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, not {n_layers}.")
    if k is None:
        k = max(1, int(np.floor(WANG_LAYERS / WANG_DEPTH * n_layers + 0.5)))
    if not 1 <= k <= n_layers:
        raise ValueError(f"k must be in [1, n_layers={n_layers}], not {k}.")
    k = min(k, max(1, n_layers // 2))
    return {f"first {k}": list(range(k)), f"last {k}": list(range(n_layers - k, n_layers))}


def layer_thirds(n_layers: int) -> dict[str, list[int]]:
    """The first and the last third of the layers (at least one layer each): this package's earlier
    variant (``isolation="thirds"``), not Wang's."""
    k = max(1, n_layers // 3)
    return {"first third": list(range(k)), "last third": list(range(n_layers - k, n_layers))}


def _random_positions(prompt, count: int, seed: int, index: int) -> list[int]:
    labels = set(label_positions(prompt))
    q = len(prompt) - 1
    pool = [p for p in range(1, q - 1) if p not in labels]
    count = min(count, len(pool))
    return sorted(int(p) for p in rng("anchor_control", seed, index).choice(pool, size=count, replace=False))


@dataclass
class IsolationRun:
    """Per prompt: the prediction over the label words and the top vocabulary tokens at q."""

    label_pred: Int[Tensor, " batch"]
    top_tokens: Int[Tensor, "batch top"]


def isolated_predictions(
    model: tl_backend.Model, prompts: Sequence[IclPrompt], label_ids: Sequence[Sequence[int]],
    edits: Sequence[Edit] = (), *, top: int = WORD_LOYALTY_TOP, batch_size: int = 4,
) -> IsolationRun:
    """One pass per batch with ``edits``: the argmax over the label words' first tokens and the
    ``top`` vocabulary tokens at each prompt's prediction position (CPU)."""
    if not prompts:
        raise ValueError("isolated_predictions needs at least one prompt.")
    device = tl_backend.model_device(model)
    first = torch.tensor([int(ids[0]) for ids in label_ids], device=device)
    preds, tops = [], []
    start = 0
    for batch in batches(list(prompts), batch_size, pad_id(model), device):
        rows = torch.arange(start, start + len(batch.prompts))
        positions = batch.prediction_positions
        with torch.no_grad(), edits_on(model, edits, rows=rows, prediction_positions=positions, lengths=batch.lengths):
            resid = final_residual(model, batch.tokens, positions)
            logits = prediction_logits(model, resid, first_index=start)
        preds.append(logits[:, first].argmax(-1).cpu())
        tops.append(logits.topk(top, dim=-1).indices.cpu())
        start += len(batch.prompts)
    return IsolationRun(torch.cat(preds), torch.cat(tops))


def word_loyalty(clean: Int[Tensor, "batch top"], edited: Int[Tensor, "batch top"]) -> Float[Tensor, " batch"]:
    """Jaccard similarity |A & B| / |A | B| of each row's token sets (Wang's word loyalty)."""
    out = []
    for a, b in zip(clean.tolist(), edited.tolist()):
        a, b = set(a), set(b)
        out.append(len(a & b) / len(a | b) if a | b else 1.0)
    return torch.tensor(out, dtype=torch.float64)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, int | float]:
    """Exact McNemar test of paired booleans: two-sided binomial test (p = 1/2) of the prompts where
    ``a`` holds and ``b`` not (``a_only``) among the discordant ones; p = 1 without discordant pairs."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs paired arrays of one shape, not {a.shape} and {b.shape}.")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def anchor_isolation(
    model: tl_backend.Model, prompts: Sequence[IclPrompt], label_ids: Sequence[Sequence[int]], *, seed: int = 0,
    batch_size: int = 4, layers: dict[str, list[int]] | None = None, top: int = WORD_LOYALTY_TOP,
    resamples: int = BOOTSTRAP_RESAMPLES, per_prompt: bool = False, base_edits: Sequence[Edit] = (),
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Label and word loyalty and accuracy when label words (or as many random non-label positions)
    are isolated in the first or the last k layers (`isolation_layers` unless ``layers``), one row
    per condition; label-word rows carry the paired McNemar test against the random isolation in
    the same layers (``mcnemar_*``) and the paired difference of word loyalty (``word_loyalty_minus_random*``).
    With ``per_prompt`` also the per-prompt table (condition, prompt, prediction, loyal, word loyalty).
    ``base_edits`` are applied in every run, the clean one included (a variant of the model, e.g.
    with some heads ablated)."""
    gold = np.array([p.query_label for p in prompts])
    layers = isolation_layers(model.cfg.n_layers) if layers is None else layers
    base_edits = list(base_edits)
    clean = isolated_predictions(model, prompts, label_ids, base_edits, top=top, batch_size=batch_size)
    masks = {
        "label words": [isolation_mask(len(p), label_positions(p)) for p in prompts],
        "random non-label": [isolation_mask(len(p), _random_positions(p, len(label_positions(p)), seed, i))
                             for i, p in enumerate(prompts)],
    }
    records, rows = [], []
    boot = dict(unit="prompts", resamples=resamples, seed=seed)

    def add(condition: str, where: str, what: str, layer_list: list[int], run: IsolationRun) -> tuple:
        pred = run.label_pred.numpy()
        loyal = pred == clean.label_pred.numpy()
        words = word_loyalty(clean.top_tokens, run.top_tokens).numpy()
        n = len(gold)
        llo, lhi = wilson_interval(int(loyal.sum()), n)
        alo, ahi = wilson_interval(int((pred == gold).sum()), n)
        wl = paired_bootstrap(lambda w: float(w.mean()), [words], **boot)
        records.append(dict(condition=condition, isolated=what, where=where, layers=" ".join(map(str, layer_list)), n=n,
                            label_loyalty=loyal.mean(), loyalty_low=llo, loyalty_high=lhi, word_loyalty=wl["value"],
                            word_loyalty_low=wl["low"], word_loyalty_high=wl["high"], accuracy=(pred == gold).mean(),
                            accuracy_low=alo, accuracy_high=ahi))
        rows.append(pd.DataFrame(dict(condition=condition, prompt=np.arange(n), prediction=pred, loyal=loyal,
                                      word_loyalty=words)))
        return loyal, words

    add("clean", "", "nothing", [], clean)
    for where, layer_list in layers.items():
        out = {}
        for what, mask in masks.items():
            edits = base_edits + attention_edits(model, layer_list, blocked=mask)
            run = isolated_predictions(model, prompts, label_ids, edits, top=top, batch_size=batch_size)
            out[what] = add(f"isolate {what}, {where}", where, what, layer_list, run)
        (label_loyal, label_words), (random_loyal, random_words) = out["label words"], out["random non-label"]
        test = mcnemar_exact(random_loyal, label_loyal)
        diff = paired_bootstrap(lambda a, b: float(a.mean() - b.mean()), [label_words, random_words], **boot)
        records[-2].update(mcnemar_random_only_loyal=test["a_only"], mcnemar_label_only_loyal=test["b_only"],
                           mcnemar_p=test["p_value"], label_loyalty_minus_random=float(label_loyal.mean() - random_loyal.mean()),
                           word_loyalty_minus_random=diff["value"], word_loyalty_minus_random_low=diff["low"],
                           word_loyalty_minus_random_high=diff["high"])
    table = pd.DataFrame(records)
    return (table, pd.concat(rows, ignore_index=True)) if per_prompt else table
