"""Label words as anchors (Wang et al., 2023): information flows into the label words in shallow
layers and from them to the prediction in deep layers.

**Saliency** (`flow_saliency`). For each layer l, I_l = | sum_h A_{h,l} * dL/dA_{h,l} | with L the
cross-entropy of the gold class over the label words' logits at the prediction position q. The
pattern is recomputed at ``hook_z`` and multiplied by a ones tensor that requires grad
(`icl_kernels.engine.patching.attention_edits`, the same on both backends); its gradient is A * dL/dA.
The diagonal is zeroed. With p_k the first token of demonstration k's label word:

* S_wp = mean I_l(p_k, j) over j < p_k and all k (demonstration text -> label words);
* S_pq = mean I_l(q, p_k) over k (label words -> prediction);
* S_ww = mean I_l(i, j) over every other j < i <= q.

**Isolation** (`anchor_isolation`). In the chosen layers (all heads), label position p_k may attend
only to itself (its scores for keys j < p_k are -inf): the flow *into* the label words is cut. In
the first third vs the last third of the layers, against isolating the same number of random
non-label positions (in 1 .. q-2, stream ``anchor_control``) the same way. Reported: label loyalty
(the prediction over the label words equals the unedited one) and accuracy, Wilson intervals.
Wang et al.: isolating label words in shallow layers hurts far more than in deep layers, and random
non-label isolation is nearly harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.edits import edits_on
from icl_kernels.engine.label_scoring import final_residual, prediction_logits
from icl_kernels.engine.patching import attention_edits, run_with_edits
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import rng, wilson_interval

__all__ = ["label_positions", "isolation_mask", "flow_saliency", "saliency_flows", "layer_thirds", "anchor_isolation"]


def label_positions(prompt) -> list[int]:
    """The first token of each demonstration's label word."""
    return [int(a) for a, _ in prompt.demo_label_spans]


def isolation_mask(length: int, positions: Sequence[int]) -> Bool[Tensor, "query_pos key_pos"]:
    """True where query row ``p`` (for ``p`` in ``positions``) may not see key ``j < p``."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for p in positions:
        mask[int(p), : int(p)] = True
    return mask


def saliency_flows(saliency: Float[Tensor, "layer query_pos key_pos"], labels: Sequence[int], q: int) -> pd.DataFrame:
    """S_wp, S_pq, S_ww per layer from one prompt's saliency matrices (see the module docstring)."""
    n = q + 1
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
    wp = torch.zeros(n, n, dtype=torch.bool)
    for p in labels:
        wp[p, :p] = True
    pq = torch.zeros(n, n, dtype=torch.bool)
    pq[q, list(labels)] = True
    ww = lower & ~wp & ~pq
    s = saliency[:, :n, :n]
    return pd.DataFrame(dict(
        layer=np.arange(s.shape[0]),
        text_to_label=s[:, wp].mean(-1).numpy(), label_to_prediction=s[:, pq].mean(-1).numpy(),
        other=s[:, ww].mean(-1).numpy(),
    ))


def flow_saliency(
    model: tl_backend.Model, prompts: Sequence, label_ids: Sequence[Sequence[int]], *, progress: bool = False
) -> pd.DataFrame:
    """Per (prompt, layer): the three mean flows of the attention x gradient saliency."""
    device = tl_backend.model_device(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    first = torch.tensor([ids[0] for ids in label_ids], device=device)
    frames = []
    for i, prompt in enumerate(tqdm(prompts, desc="saliency: prompts", unit="prompt", disable=not progress)):
        length = len(prompt)
        tokens = torch.tensor([prompt.tokens], device=device)
        ones = {layer: torch.ones(1, n_heads, length, length, device=device, requires_grad=True) for layer in range(n_layers)}
        q = torch.tensor([length - 1])
        with torch.enable_grad(), edits_on(model, attention_edits(model, range(n_layers), multipliers=ones),
                                           rows=torch.tensor([0]), prediction_positions=q, lengths=q + 1):
            final = final_residual(model, tokens, q)[0]
            logits = prediction_logits(model, final, first_index=i)[first]
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([prompt.query_label], device=device))
            grads = torch.autograd.grad(loss, [ones[layer] for layer in range(n_layers)])
        saliency = torch.stack([g[0].sum(0).abs() for g in grads]).detach().cpu()  # [layer q k]
        saliency = saliency * (1 - torch.eye(length))[None]
        frame = saliency_flows(saliency, label_positions(prompt), length - 1)
        frame.insert(0, "prompt", i)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def layer_thirds(n_layers: int) -> dict[str, list[int]]:
    """The first and the last third of the layers (at least one layer each)."""
    k = max(1, n_layers // 3)
    return {"first third": list(range(k)), "last third": list(range(n_layers - k, n_layers))}


def _random_positions(prompt, count: int, seed: int, index: int) -> list[int]:
    labels = set(label_positions(prompt))
    q = len(prompt) - 1
    pool = [p for p in range(1, q - 1) if p not in labels]
    count = min(count, len(pool))
    return sorted(int(p) for p in rng("anchor_control", seed, index).choice(pool, size=count, replace=False))


def anchor_isolation(
    model: tl_backend.Model, prompts: Sequence[IclPrompt], label_ids: Sequence[Sequence[int]], *, seed: int = 0,
    batch_size: int = 4,
) -> pd.DataFrame:
    """Label loyalty and accuracy when label words (or as many random non-label positions) are
    isolated in the first or the last third of the layers; one row per condition."""
    gold = np.array([p.query_label for p in prompts])
    clean = run_with_edits(model, prompts, label_ids, batch_size=batch_size).argmax(-1).numpy()
    label_masks = [isolation_mask(len(p), label_positions(p)) for p in prompts]
    random_masks = [isolation_mask(len(p), _random_positions(p, len(label_positions(p)), seed, i))
                    for i, p in enumerate(prompts)]
    records = []

    def add(condition: str, layers: list[int], pred: np.ndarray) -> None:
        n = len(gold)
        loyal, correct = int((pred == clean).sum()), int((pred == gold).sum())
        llo, lhi = wilson_interval(loyal, n)
        alo, ahi = wilson_interval(correct, n)
        records.append(dict(condition=condition, layers=" ".join(map(str, layers)), n=n, label_loyalty=loyal / n,
                            loyalty_low=llo, loyalty_high=lhi, accuracy=correct / n, accuracy_low=alo, accuracy_high=ahi))

    add("clean", [], clean)
    for where, layers in layer_thirds(model.cfg.n_layers).items():
        for what, masks in (("label words", label_masks), ("random non-label", random_masks)):
            edits = attention_edits(model, layers, blocked=masks)
            pred = run_with_edits(model, prompts, label_ids, edits, batch_size=batch_size).argmax(-1).numpy()
            add(f"isolate {what}, {where}", layers, pred)
    return pd.DataFrame(records)
