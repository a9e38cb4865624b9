"""Runs that start at a layer: the residual stream below an edited layer, computed once.

An edit at layers ``L..`` (momentum attention on a late subset, a patch at one layer) leaves every
layer below ``L`` as it is, so every condition of a grid sees the same residual stream entering
layer ``L`` (``blocks.L.hook_resid_pre``). `layer_start` runs the prompts' first ``L`` layers once,
in the batches `icl_kernels.engine.label_scoring.label_log_probs` will use (the same prompts in the
same right-padded batches), and keeps that residual; ``label_log_probs(..., start=)`` and
``sequence_nll(..., start=)`` then run only layers ``L..`` of each batch, from it
(TransformerLens's ``start_at_layer``). The layers below ``L`` run the same operations on the same
batches as in a full pass, so the scores are those of the full pass, bit for bit (tested on tiny
models of every architecture in float32 and float64, ``tests/unit/test_layer_start.py``).

Where a tokenizer pads on the left (Gemma's), TransformerLens builds an attention mask from the
tokens in a full pass; a started run is given the same mask (`started_forward_kwargs`). Where it
cannot be exact it is refused (`start_reason`): a TransformerBridge (its forward takes no residual)
or a model with a shortformer positional embedding (added at every layer from the tokens). Callers
fall back to full passes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from icl_kernels.engine.hooks import act_name, run_until
from icl_kernels.engine.prefix_cache import right_pad
from icl_kernels.models import backend as tl_backend

__all__ = ["LayerStart", "residual_input_reason", "start_reason", "started_forward_kwargs", "layer_start"]


@dataclass(frozen=True)
class LayerStart:
    """The residual stream entering ``layer`` of every batch of a run: ``batches[b]`` is batch ``b``
    (prompts ``b * batch_size ..``, right-padded) ``[batch pos d_model]``; made by `layer_start`."""

    layer: int
    batch_size: int
    n_prompts: int
    batches: tuple[Tensor, ...]  # each [batch pos d_model], its own batch and width

    def batch(self, index: int, begin: int, n_rows: int, batch_size: int) -> Tensor:
        """Batch ``index`` after checking that the caller batches as this start was made."""
        if batch_size != self.batch_size or begin != index * self.batch_size or index >= len(self.batches) \
                or self.batches[index].shape[0] != n_rows:
            raise ValueError(
                f"This LayerStart was made for {self.n_prompts} prompts in batches of {self.batch_size}; the run asks "
                f"for rows {begin}.. in batches of {batch_size}: make it with layer_start on the same prompts and "
                "batch size."
            )
        return self.batches[index]


def residual_input_reason(model: tl_backend.Model) -> str | None:
    """Why this model cannot run its blocks from a given residual stream exactly (``None`` when it
    can), whatever the layer."""
    if tl_backend.is_bridge(model):
        return "a TransformerBridge forward takes tokens, not a residual stream"
    if getattr(model.cfg, "positional_embedding_type", "") == "shortformer":
        return "a shortformer positional embedding is added at every layer from the tokens"
    return None


def start_reason(model: tl_backend.Model, layer: int) -> str | None:
    """Why a run cannot start at ``layer`` exactly (``None`` when it can)."""
    reason = residual_input_reason(model)
    if reason is None and not 0 < layer < model.cfg.n_layers:
        reason = f"layer {layer} is not inside the model (1..{model.cfg.n_layers - 1}; layer 0 saves nothing)"
    return reason


def started_forward_kwargs(model: tl_backend.Model, layer: int, tokens: Tensor) -> dict:
    """The keyword arguments that make ``model(residual, **kwargs)`` run layers ``layer..`` as the full
    pass over ``tokens`` runs them: ``start_at_layer``, and the attention mask TransformerLens builds
    from the tokens when its tokenizer pads on the left (Gemma's does; a started run builds none)."""
    kwargs: dict = {"start_at_layer": layer}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "padding_side", "right") == "left":
        from transformer_lens import utils as tl_utils  # noqa: PLC0415 - HookedTransformer's helpers, only for a hooked model

        kwargs["attention_mask"] = tl_utils.get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos)
    return kwargs


def layer_start(
    model: tl_backend.Model,
    prompts: Sequence,
    layer: int,
    *,
    batch_size: int,
    pad_token_id: int = 0,
) -> LayerStart:
    """Run ``prompts`` (`IclPrompt`s or token lists) up to ``layer`` in batches of ``batch_size``
    (right-padded with ``pad_token_id``, as `label_log_probs` pads them) and keep the residual stream
    entering ``layer``.

    Raises:
        ValueError: `start_reason` gives a reason, or no prompts.
    """
    reason = start_reason(model, layer)
    if reason is not None:
        raise ValueError(f"Cannot start runs at layer {layer}: {reason}.")
    if not prompts:
        raise ValueError("layer_start needs at least one prompt.")
    lists = [tuple(int(t) for t in (p.tokens if hasattr(p, "tokens") else p)) for p in prompts]
    device = tl_backend.model_device(model)
    name = act_name("resid_pre", layer)
    batches = []
    for begin in range(0, len(lists), batch_size):
        tokens = right_pad(lists[begin:begin + batch_size], pad_token_id).to(device)
        kept: dict[str, Tensor] = {}

        def keep(tensor: Tensor, hook) -> None:
            kept["x"] = tensor.detach()

        with torch.no_grad():
            run_until(model, tokens, [(name, keep)], stop=name)
        batches.append(kept["x"])
    return LayerStart(layer, batch_size, len(lists), tuple(batches))
