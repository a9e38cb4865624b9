"""Shared-prefix reuse: run the demonstrations once, reuse their keys and values for every query.

Many analyses score a set of prompts that share one demonstration set (the compare study's
episodes, a fixed selector, a momentum grid): ``[BOS] x_1 y_1 ... x_K y_K | x_query``. Everything
a causal transformer computes at a prefix position depends on the prefix alone, so the keys and
values of the common token prefix can be computed once and every query run on its own suffix
against them. The cost of a query falls from ``prefix + suffix`` positions to ``suffix``.

How (`encode_prefix`, then `prefix_forward`):

* HookedTransformer: TransformerLens's ``TransformerLensKeyValueCache`` (``HookedTransformerKeyValueCache``),
  frozen so that queries never append to it. TransformerLens caches *pre-rotary* keys and rotates the
  whole key sequence on every call, takes the position offset of the suffix from the cache length
  (learned positions and rotary alike), and builds the causal mask with the local window
  (``key > query - window``) from absolute positions, so GPT-Neo local layers and Gemma-3 sliding
  layers stay exact at any prompt length. An all-ones attention mask is passed for the suffix, so
  TransformerLens never guesses padding from the tokenizer's pad id (GPT-2's pad is its BOS/EOS).
* TransformerBridge: the Hugging Face ``DynamicCache`` of the wrapped model (built without a config,
  so sliding-window layers keep every key and apply the window in the mask), copied and repeated to
  the batch for every call.

On both backends ``hook_pattern`` of a suffix run is ``[batch head suffix_pos prefix+suffix_pos]``:
the prediction row over *all* keys, exactly the row of the full-prompt forward. Hooks at
``hook_q/k/v/z`` and residual hooks see suffix positions only.

Exactness (``tests/unit/test_prefix_cache.py``): prediction rows, label scores and the final residual
equal the full forward to 1e-5 in float64 on tiny GPT-Neo (local and global layers), GPT-J, Gemma-3
(sliding window 8, prompts of ~40 tokens) and Llama, on both backends, for queries of different
lengths, single- and multi-token labels. The results are not bit-identical to the full forward in
float32 (different matrix shapes sum in a different order).

Fallback to the full forward (`reuse_reason` says why; `shared_label_log_probs` and
`shared_capture` fall back on their own):

* no common prefix of at least ``min_prefix`` tokens, or a prompt with no token after it (the
  prefix is cut one token short of the shortest prompt);
* a HookedTransformer with ``alibi`` or relative positional biases (not checked), or one whose config
  asks for attention sinks / shortformer positions;
* a TransformerBridge whose Hugging Face model takes no ``past_key_values`` argument. From
  transformers 5.24 the models take ``cache`` (``past_key_values`` is a deprecated alias), and
  TransformerLens 3.9's bridge attention for rotary models (Llama, Gemma) reads only
  ``past_key_values`` from its keyword arguments: the cache would be ignored there and the scores
  silently wrong, so reuse is refused and the full forward is used.

Padding: suffixes are right-padded; a real token never attends to a later pad, so pads change nothing.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformers import DynamicCache

from icl_kernels.engine.hooks import STOP_HOOK, act_name, run_until
from icl_kernels.models import backend as tl_backend

__all__ = [
    "SharedPrefix",
    "SharedCapture",
    "common_prefix_length",
    "reuse_reason",
    "encode_prefix",
    "prefix_forward",
    "batch_state",
    "shared_capture",
    "right_pad",
]

_EXACT_POSITIONS = ("standard", "rotary")


@dataclass
class SharedPrefix:
    """Keys and values of a token prefix (batch of one), ready to be reused by suffix runs."""

    tokens: tuple[int, ...]
    backend: str
    state: Any  # TransformerLensKeyValueCache (hooked) or transformers DynamicCache (bridge)

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every list, cut so that each list keeps at
    least one token after it (a query must have a position of its own)."""
    if not token_lists:
        return 0
    shortest = min(len(t) for t in token_lists)
    first = token_lists[0]
    n = 0
    while n < shortest - 1 and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n


def reuse_reason(model: tl_backend.Model, prefix_len: int = 1, min_prefix: int = 1) -> str | None:
    """Why prefix reuse cannot be exact for this model and prefix (``None`` when it can)."""
    if prefix_len < max(1, min_prefix):
        return f"the common prefix is {prefix_len} tokens (< {max(1, min_prefix)})"
    if tl_backend.is_bridge(model):
        hf = getattr(model, "original_model", None)
        if hf is None or "past_key_values" not in inspect.signature(hf.forward).parameters:
            return (
                "the bridge's Hugging Face model takes no past_key_values argument (transformers "
                ">= 5.24 names it `cache`, which TransformerLens 3.9's bridge attention does not "
                "read); install transformers<5.24 to reuse prefixes on the bridge"
            )
        return None
    cfg = model.cfg
    kind = getattr(cfg, "positional_embedding_type", "standard")
    if kind not in _EXACT_POSITIONS:
        return f"positional embedding {kind!r} is not supported with a shared prefix"
    if getattr(cfg, "use_attn_sink", False) or kind == "shortformer":
        return "attention sinks / shortformer positions are not supported with a shared prefix"
    return None


def _ones(batch: int, width: int, device) -> Tensor:
    return torch.ones((batch, width), dtype=torch.long, device=device)


def encode_prefix(model: tl_backend.Model, prefix_tokens: Sequence[int], fwd_hooks: Sequence = ()) -> SharedPrefix:
    """Run ``prefix_tokens`` once and keep every layer's keys and values (no logits are formed).

    ``fwd_hooks`` run in that pass (batch of one, prefix positions), e.g. to keep the prefix's own
    activations beside its cache (`icl_kernels.finetuning.recording.encode_recording_prefix`).

    Raises:
        ValueError: reuse is impossible for this model (see `reuse_reason`).
    """
    reason = reuse_reason(model, len(prefix_tokens))
    if reason is not None:
        raise ValueError(f"Cannot reuse a shared prefix: {reason}.")
    device = tl_backend.model_device(model)
    ids = torch.tensor([list(prefix_tokens)], dtype=torch.long, device=device)
    with torch.no_grad():
        if tl_backend.is_bridge(model):
            state = DynamicCache()
            run_until(model, ids, fwd_hooks, past_key_values=state, use_cache=True)
        else:
            state = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
            run_until(model, ids, fwd_hooks, past_kv_cache=state, attention_mask=_ones(1, ids.shape[1], device))
            state.freeze()
    return SharedPrefix(tuple(int(t) for t in prefix_tokens), tl_backend.backend_of(model), state)


def batch_state(prefix: SharedPrefix, batch: int):
    """A per-call copy of the prefix state for ``batch`` rows (the stored one is never changed): views
    expanded to the batch on a HookedTransformer, a repeated deep copy on a bridge."""
    if prefix.backend == "bridge":
        state = copy.deepcopy(prefix.state)
        if batch > 1:
            state.batch_repeat_interleave(batch)
        return state

    cache = prefix.state
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys.expand(batch, *e.past_keys.shape[1:]),
            e.past_values.expand(batch, *e.past_values.shape[1:]),
            frozen=True,
        )
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask.expand(batch, -1)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def prefix_forward(
    model: tl_backend.Model,
    prefix: SharedPrefix,
    suffix_tokens: Int[Tensor, "batch suffix_pos"],
    fwd_hooks: Sequence = (),
    stop: str = STOP_HOOK,
) -> None:
    """Run right-padded suffixes after the cached prefix with ``fwd_hooks``, ending at ``stop``.

    Position ``j`` of a suffix is position ``len(prefix) + j`` of its prompt; attention hooks see
    ``key_pos = len(prefix) + suffix_pos``.
    """
    device = tl_backend.model_device(model)
    suffix_tokens = suffix_tokens.to(device)
    batch, width = suffix_tokens.shape
    state = batch_state(prefix, batch)
    with torch.no_grad():
        if prefix.backend == "bridge":
            run_until(model, suffix_tokens, fwd_hooks, stop, past_key_values=state, use_cache=True)
        else:
            run_until(model, suffix_tokens, fwd_hooks, stop, past_kv_cache=state,
                      attention_mask=_ones(batch, width, device))


@dataclass
class SharedCapture:
    """Prediction rows and final residuals of prompts run against a shared prefix (or in full)."""

    attention: Float[Tensor, "batch layer head_index key_pos"] | None
    final_residual: Float[Tensor, "batch d_model"]
    prediction_positions: Int[Tensor, " batch"]
    reused: bool


def _groups(token_lists: Sequence[Sequence[int]], batch_size: int):
    for start in range(0, len(token_lists), batch_size):
        yield list(range(start, min(start + batch_size, len(token_lists))))


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> Int[Tensor, "batch pos"]:
    """Token rows as one right-padded ``[batch, pos]`` tensor (CPU), ``pad`` after each row's end."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def shared_capture(
    model: tl_backend.Model,
    token_lists: Sequence[Sequence[int]],
    *,
    attention: bool = True,
    batch_size: int = 8,
    pad_token_id: int = 0,
    min_prefix: int = 1,
    prefix: SharedPrefix | None = None,
) -> SharedCapture:
    """Attention rows of every prompt's last token over all its keys (0 beyond it) and the final
    residual there, reusing the prompts' common prefix when `reuse_reason` allows, else in full."""
    n_prefix = len(prefix) if prefix is not None else common_prefix_length(token_lists)
    reused = prefix is not None or reuse_reason(model, n_prefix, min_prefix) is None
    if reused and prefix is None:
        prefix = encode_prefix(model, token_lists[0][:n_prefix])
    if not reused:
        n_prefix = 0
    n_layers = model.cfg.n_layers
    total = max(len(t) for t in token_lists)
    rows_out: list[Tensor] = []
    finals: list[Tensor] = []
    device = tl_backend.model_device(model)
    for group in _groups(token_lists, batch_size):
        suffixes = [token_lists[i][n_prefix:] for i in group]
        ids = right_pad(suffixes, pad_token_id).to(device)
        pred = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        rows = torch.arange(len(group), device=device)
        store: dict[int, Tensor] = {}
        kept: dict[str, Tensor] = {}

        def keep_row(layer: int):
            def hook(pattern: Tensor, hook) -> None:
                store[layer] = pattern.detach()[rows, :, pred]  # [batch head key]

            return hook

        def keep_final(tensor: Tensor, hook) -> None:
            kept["final"] = tensor.detach()[rows, pred]

        hooks = [(act_name("pattern", layer), keep_row(layer)) for layer in range(n_layers)] if attention else []
        hooks.append((STOP_HOOK, keep_final))
        if reused:
            prefix_forward(model, prefix, ids, hooks)
        else:
            with torch.no_grad():
                run_until(model, ids, hooks)
        finals.append(kept["final"].cpu())
        if attention:
            att = torch.stack([store[layer] for layer in range(n_layers)], dim=1).cpu()
            full = torch.zeros(*att.shape[:3], total, dtype=att.dtype)
            full[..., : att.shape[-1]] = att
            rows_out.append(full)
    lengths = torch.tensor([len(t) for t in token_lists])
    return SharedCapture(
        attention=torch.cat(rows_out) if attention else None,
        final_residual=torch.cat(finals),
        prediction_positions=lengths - 1,
        reused=reused,
    )
