"""One-head patches of one prompt, each patched row joining the batch at its head's layer.

A causal indirect effect (Todd et al.'s CIE, `icl_kernels.families.function_vectors`) sets one
head's output ``z`` at the prediction position to a given vector and reads the label's probability,
for every head of the model, on one prompt. A row patched at layer ``L`` is the unpatched run below
``L``: its residual stream entering ``L`` is the unpatched one. So:

1. the unpatched run goes once, one row, block by block, and keeps the residual entering every layer
   (its own scores are the baseline);
2. the patched rows run in batches of at most ``max_rows`` heads (layer-major order); a batch starts
   at its first head's layer, and each row *joins* it at its head's layer, as a copy of the
   unpatched residual there, patched in that layer's ``hook_z``.

A head at layer ``L`` costs ``n_layers - L`` row-layers instead of ``n_layers``: for every head of
an ``n``-layer model, about half the row-layers of one full row per head. The prompt's context (all
but its last tokens) runs once before (`icl_kernels.engine.prefix_cache.encode_prefix`); every block
call attends to its keys and values, as `icl_kernels.engine.prefix_cache.prefix_forward` does, so
each row attends only to its own suffix positions and the shared prefix.

Exactness (``tests/unit/test_joining_rows.py``): equal to the one-batch prefix run of
`icl_kernels.engine.label_scoring.label_log_probs` with one patched head per row, to 1e-10 in float64
on tiny GPT-Neo, GPT-J, Gemma-3 and Llama. In float32 the rows run in batches of other sizes, so their
last bits may differ (tolerance stated in the test).

Only a HookedTransformer runs this way (`joining_reason`): a TransformerBridge's forward takes tokens,
not a residual stream, and a shortformer model adds positions at every layer; callers fall back to
whole rows there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from icl_kernels.engine.hooks import act_name, hooks_on
from icl_kernels.engine.label_scoring import label_scores
from icl_kernels.engine.layer_start import residual_input_reason
from icl_kernels.engine.patching import Head, check_heads
from icl_kernels.engine.prefix_cache import SharedPrefix, batch_state
from icl_kernels.models import backend as tl_backend

__all__ = ["joining_reason", "head_patch_log_probs"]


def joining_reason(model: tl_backend.Model) -> str | None:
    """Why patched rows cannot join a run at their layer for this model (``None`` when they can)."""
    return residual_input_reason(model)


def _block(model, layer: int, residual: Tensor, prefix: SharedPrefix, width: int, hooks=()) -> Tensor:
    """Block ``layer`` on ``residual`` [row suffix_pos d_model] after the prefix's keys and values."""
    rows = residual.shape[0]
    mask = torch.ones((rows, width), dtype=torch.long, device=residual.device)
    with hooks_on(model, hooks):
        return model(residual, start_at_layer=layer, stop_at_layer=layer + 1,
                     past_kv_cache=batch_state(prefix, rows), attention_mask=mask)


def head_patch_log_probs(
    model: tl_backend.Model,
    prefix: SharedPrefix,
    suffix: Sequence[int],
    heads: Sequence[Head],
    values: Float[Tensor, "layer head_index d_head"],
    token_ids: Sequence[int],
    *,
    max_rows: int = 32,
    dtype: torch.dtype | None = None,
    w_u_t: Float[Tensor, "d_vocab d_model"] | None = None,
) -> tuple[Float[Tensor, " n_tokens"], Float[Tensor, "n_patched n_tokens"]]:
    """log-softmax over the whole vocabulary at the last token of ``prefix + suffix``, read at
    ``token_ids``: unpatched, and with ``z`` of each head in ``heads`` (``(layer, head)``, one per
    row) set to ``values[layer, head]`` at that position (CPU; rows in the order of ``heads``).
    ``dtype`` and ``w_u_t`` as in `icl_kernels.engine.label_scoring.label_scores`; non-finite
    logits raise `NonFiniteLogitsError` (row 0 unpatched, row ``1 + i`` head ``heads[i]``).

    Raises:
        ValueError: `joining_reason` gives a reason, an empty suffix, ``max_rows < 1``, or a head
            outside the model.
    """
    reason = joining_reason(model)
    if reason is not None:
        raise ValueError(f"Patched rows cannot join at their layer: {reason}; run one row per head in full.")
    if not suffix:
        raise ValueError("head_patch_log_probs needs at least one suffix token (the prediction position).")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, not {max_rows}.")
    check_heads(model, heads)  # only checked: the rows keep the order of ``heads``
    n_layers = model.cfg.n_layers
    device = tl_backend.model_device(model)
    ids = torch.tensor([list(suffix)], dtype=torch.long, device=device)
    width = len(prefix) + ids.shape[1]
    with torch.no_grad():
        x = model(ids, stop_at_layer=0, past_kv_cache=batch_state(prefix, 1),
                  attention_mask=torch.ones((1, ids.shape[1]), dtype=torch.long, device=device))
        entering: list[Tensor] = []
        for layer in range(n_layers):
            entering.append(x)
            x = _block(model, layer, x, prefix, width)
        finals = {-1: _final_residual(model, x)[0]}  # -1: the unpatched row
        order = sorted(range(len(heads)), key=lambda i: (heads[i][0], i))  # layer-major, stable
        for begin in range(0, len(order), max_rows):
            chunk = order[begin:begin + max_rows]
            x = None
            for layer in range(heads[chunk[0]][0], n_layers):
                joining = [i for i in chunk if heads[i][0] == layer]
                hooks = []
                if joining:
                    first = 0 if x is None else x.shape[0]
                    new = entering[layer].expand(len(joining), -1, -1)
                    x = new if x is None else torch.cat([x, new])
                    hooks = [(act_name("z", layer), _patch(first, [heads[i][1] for i in joining], values[layer]))]
                x = _block(model, layer, x, prefix, width, hooks)
            finals.update(zip(chunk, _final_residual(model, x), strict=True))  # rows joined in chunk order
        rows = [finals[i] for i in range(-1, len(heads))]
        scores = label_scores(model, torch.stack(rows), token_ids, dtype=dtype, w_u_t=w_u_t)
    return scores[0], scores[1:]


def _patch(first: int, head_idx: list[int], layer_values: Tensor):
    """A ``hook_z`` hook: rows ``first..`` (one per head in ``head_idx``) get their head's value at
    the last position."""

    def hook(z: Tensor, hook) -> Tensor:
        z = z.clone()
        rows = torch.arange(first, first + len(head_idx), device=z.device)
        heads = torch.as_tensor(head_idx, device=z.device)
        z[rows, -1, heads] = layer_values[head_idx].to(z.device, z.dtype)
        return z

    return hook


def _final_residual(model, residual: Float[Tensor, "row pos d_model"]) -> Float[Tensor, "row d_model"]:
    """The unembedding input at the last position, after the last block (the final norm)."""
    last = residual[:, -1:]
    return (model.ln_final(last) if model.cfg.normalization_type is not None else last)[:, 0]
