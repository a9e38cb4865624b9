"""Hook names, per-layer attention geometry, and hook contexts that always clean up.

Nothing else in the package spells ``blocks.{l}.attn...``: `act_name` builds every hook name.

Interventions are made at ``hook_z`` (the per-head attention output before ``W_O``), because edits
there change the output on both backends (a TransformerBridge discards edits to ``hook_pattern``).
To recompute attention at ``hook_z`` we need each layer's geometry, `AttentionSpec`: the score
scale (GPT-Neo uses none, others ``sqrt(d_head)`` or Gemma's ``query_pre_attn_scalar``), the local
window of GPT-Neo / Gemma-3 sliding layers (key ``k`` visible from query ``q`` iff
``q - window < k <= q``), key/value groups (Gemma, Llama) and rotary embeddings. The spec is read
from the Hugging Face config, which both backends keep, by the rules of the architecture's record
(`icl_kernels.models.architectures`), so it is the same on either.

Rotary: HookedTransformer fires ``hook_rot_q/k`` after its rotary; a bridge does not, so
`rotated_qk` applies the model's rotary (`apply_rotary`, GPT-J adjacent pairs or the
Llama/Gemma half split) to the hooked ``q``/``k`` when needed.

Padding convention of the whole package: batches are **right**-padded. In a causal model no real
token attends to a later pad, so every real token's activations equal those of the unpadded
prompt and positions need no offset on any architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from icl_kernels.models import backend as tl_backend
from icl_kernels.models.architectures import (
    DEFAULT_ROPE_BASE,
    architecture_of,
    rope_bases,
)

HookFn = Callable[..., Tensor | None]

#: The hook point where every "run and read the prediction" forward pass stops: the input of the
#: unembedding (the residual stream after the final normalisation, what ``W_U`` multiplies). The one
#: place in the package that spells this name.
STOP_HOOK = "unembed.hook_in"

_ATTN_HOOKS = {"q", "k", "v", "z", "rot_q", "rot_k", "pattern", "attn_scores"}
_BLOCK_HOOKS = {"attn_out", "mlp_out", "resid_pre", "resid_mid", "resid_post"}


def act_name(kind: str, layer: int) -> str:
    """The TransformerLens hook name of an activation, e.g. ``act_name("z", 3)``.

    >>> act_name("z", 3)
    'blocks.3.attn.hook_z'
    >>> act_name("resid_post", 0)
    'blocks.0.hook_resid_post'
    """
    if kind in _ATTN_HOOKS:
        return f"blocks.{layer}.attn.hook_{kind}"
    if kind in _BLOCK_HOOKS:
        return f"blocks.{layer}.hook_{kind}"
    if kind in ("ln1_normalized", "ln2_normalized"):
        return f"blocks.{layer}.{kind[:3]}.hook_normalized"
    raise ValueError(
        f"Unknown activation kind {kind!r}; known: {sorted(_ATTN_HOOKS | _BLOCK_HOOKS)} "
        "and ln1_normalized / ln2_normalized."
    )


def active_hook_count(model: tl_backend.Model) -> int:
    """Number of hooks on the model's hook points (``model.hook_dict``; 0 when no intervention is
    active).

    A TransformerBridge registers its own permanent hooks on wrapped normalisation modules during
    its first forward; those are not hook points and are not counted.
    """
    count = 0
    points = {id(point): point for point in model.hook_dict.values()}  # a bridge lists a point under aliases too
    for module in points.values():
        if isinstance(module, HookPoint):
            count += len(module._forward_hooks) + len(module._forward_pre_hooks)
            count += len(module._backward_hooks)
    return count


@contextlib.contextmanager
def hooks_on(
    model: tl_backend.Model, fwd_hooks: Sequence[tuple[str, HookFn]]
) -> Iterator[tl_backend.Model]:
    """Add forward hooks for the duration of a ``with`` block; removed on exit, even on error.

    Unlike ``model.hooks`` on a bridge, an unknown hook name raises instead of being ignored.
    """
    known = model.hook_dict
    unknown = [name for name, _ in fwd_hooks if isinstance(name, str) and name not in known]
    if unknown:
        raise KeyError(f"No hook point named {unknown} on this model ({type(model).__name__}).")
    before = active_hook_count(model)  # hooks of enclosing contexts stay (nesting works)
    with model.hooks(fwd_hooks=list(fwd_hooks)):  # removes this level's hooks on exit, also on error
        yield model
    # TransformerLens removes the hooks of this context level; make sure, whatever the version.
    if active_hook_count(model) > before:
        model.reset_hooks(including_permanent=False)


class StopForward(Exception):
    """Raised by the hook `run_until` adds to end a forward pass at a hook point."""


def run_until(
    model: tl_backend.Model,
    tokens: Tensor,
    fwd_hooks: Sequence[tuple[str, HookFn]],
    stop: str = STOP_HOOK,
    **forward_kwargs,
) -> bool:
    """Run ``model(tokens, **forward_kwargs)`` with ``fwd_hooks`` and end it at hook point ``stop``,
    after the hooks given there have run (by default `STOP_HOOK`: skip the unembedding, which a 262k
    vocabulary makes the costliest step). Every hook is gone afterwards, also when one raises.
    Returns whether ``stop`` was reached.
    """

    def halt(tensor: Tensor, hook) -> None:
        raise StopForward

    try:
        with hooks_on(model, [*fwd_hooks, (stop, halt)]):
            model(tokens, **forward_kwargs)
    except StopForward:
        return True
    return False


@dataclass(frozen=True)
class AttentionSpec:
    """Geometry of one attention layer, enough to recompute its scores from hooked q and k."""

    layer: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    scale: float  # scores = q . k / scale
    window: int | None  # None: global (causal) attention
    rotary_dim: int | None  # None: no rotary
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False  # GPT-J rotates (x0, x1) pairs; Llama/Gemma split halves

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads


def attention_spec(model: tl_backend.Model, layer: int) -> AttentionSpec:
    """The attention geometry of ``layer``, from the model's Hugging Face config."""
    config = tl_backend.hf_config(model)
    if config is None:
        raise ValueError(
            "This model has no Hugging Face config attached; load it with icl_kernels.load_model."
        )
    record = architecture_of(config)  # raises UnknownArchitectureError for an unsupported one
    local = record.window_key is not None and tl_backend.layer_attention_types(model)[layer] == "local"
    window = tl_backend.local_window(model) if local else None
    n_heads = model.cfg.n_heads
    d_head = model.cfg.d_head
    global_base, local_base = rope_bases(config) or (DEFAULT_ROPE_BASE, DEFAULT_ROPE_BASE)
    return AttentionSpec(
        layer, n_heads, record.n_kv_heads(config, n_heads), d_head, record.score_scale(config, d_head),
        window, record.rotary_dim(config, d_head), local_base if local else global_base,
        rotary_adjacent_pairs=record.rotary == "adjacent",
    )


def rotate_by(
    x: Float[Tensor, "... head_index d_head"], spec: AttentionSpec, offset: Shaped[Tensor, "..."] | float | int
) -> Float[Tensor, "... head_index d_head"]:
    """Rotate vectors by ``offset`` positions with the model's rotary (``R(offset) x``).

    ``offset`` broadcasts against the leading dimensions of ``x`` (before the head dimension); a
    negative offset undoes the rotation applied at that position. Identity without rotary.
    """
    if spec.rotary_dim is None:
        return x
    dim = spec.rotary_dim
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    offset = torch.as_tensor(offset, dtype=compute, device=x.device)
    inv_freq = 1.0 / (spec.rotary_base ** (torch.arange(0, dim, 2, device=x.device, dtype=compute) / dim))
    angles = offset[..., None, None] * inv_freq  # [..., 1, dim/2]
    if spec.rotary_adjacent_pairs:
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat([angles, angles], dim=-1)
    rot, rest = x[..., :dim].to(compute), x[..., dim:]
    if spec.rotary_adjacent_pairs:
        flipped = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
    else:
        half = dim // 2
        flipped = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rotated = (rot * angles.cos() + flipped * angles.sin()).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head_index d_head"], spec: AttentionSpec
) -> Float[Tensor, "batch pos head_index d_head"]:
    """Rotate q or k at positions 0..pos-1 (right-padded batches) the way the model does."""
    if spec.rotary_dim is None:
        return x
    return rotate_by(x, spec, torch.arange(x.shape[1], device=x.device)[None, :])


def rotary_hook_kinds(model: tl_backend.Model) -> tuple[str, str]:
    """Which hooks hold the q and k that scores are made of: ``rot_q/rot_k`` where they fire.

    HookedTransformer fires ``hook_rot_q/k`` on every rotary model; a bridge fires them for some
    architectures (Gemma-3) and not others (GPT-J, Llama), where `rotated_qk` applies the rotary
    itself. Which case holds is probed once with a two-token forward and remembered on the model.
    """
    if not architecture_of(tl_backend.hf_config(model)).rotated_hooks:
        return "q", "k"
    cached = getattr(model, "_icl_rot_hooks_fire", None)
    if cached is None:
        name = act_name("rot_q", 0)
        fired: list[bool] = []
        if name in model.hook_dict:
            tokens = torch.zeros((1, 2), dtype=torch.long, device=tl_backend.model_device(model))

            def note(tensor: Tensor, hook) -> None:
                fired.append(True)

            with torch.no_grad(), hooks_on(model, [(name, note)]):
                model(tokens, return_type=None)
        cached = bool(fired)
        model._icl_rot_hooks_fire = cached
    return ("rot_q", "rot_k") if cached else ("q", "k")


def rotated_qk(
    model: tl_backend.Model,
    layer: int,
    q: Float[Tensor, "batch pos head_index d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
) -> tuple[Float[Tensor, "batch pos head_index d_head"], Float[Tensor, "batch pos kv_head d_head"]]:
    """Post-rotary q, k from the tensors captured at the hooks `rotary_hook_kinds` names."""
    if rotary_hook_kinds(model) == ("rot_q", "rot_k"):
        return q, k
    spec = attention_spec(model, layer)
    return apply_rotary(q, spec), apply_rotary(k, spec)


def visibility_mask(
    n_query: int, n_key: int, window: int | None, device: torch.device | None = None,
    query_offset: int = 0,
) -> Bool[Tensor, "query_pos key_pos"]:
    """Causal (and local-window) visibility: key k is visible from query q iff q-window < k <= q.

    ``query_offset`` is the position of the first query row (for a subset of query rows).
    """
    q = torch.arange(n_query, device=device)[:, None] + query_offset
    k = torch.arange(n_key, device=device)[None, :]
    visible = k <= q
    if window is not None:
        visible &= k > q - window
    return visible


def repeat_kv(
    x: Float[Tensor, "batch pos kv_head d_head"], group_size: int
) -> Float[Tensor, "batch pos head_index d_head"]:
    """Expand key/value heads to one per query head (grouped-query attention)."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=2)


def attention_scores(
    q: Float[Tensor, "batch query_pos head_index d_head"],
    k: Float[Tensor, "batch key_pos kv_head d_head"],
    spec: AttentionSpec,
    query_offset: int = 0,
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Scaled pre-softmax scores from post-rotary q, k; invisible keys are ``-inf``."""
    k = repeat_kv(k, spec.group_size)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / spec.scale
    visible = visibility_mask(q.shape[1], k.shape[1], spec.window, q.device, query_offset)
    return scores.masked_fill(~visible, float("-inf"))
