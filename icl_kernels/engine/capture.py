"""Capturing only what the kernel-regression analyses need, in one forward pass.

Han et al. read, for every head, the attention *row* of the prediction position (the last prompt
token) over the prompt, plus a few activations at chosen positions (keys and values at label tokens,
residuals at the last token of each demonstration input). A full activation cache keeps
``layers x heads x pos x pos`` attention weights per prompt; this module keeps
``layers x heads x pos`` (the prediction row) and the requested vectors at the requested positions,
so memory grows with layers x heads x prompt length, not with its square.

How the rows are read (``method``):

* ``"pattern"`` (default): a hook on ``hook_pattern`` slices the prediction row of every batch row
  out of the softmaxed pattern the model has computed anyway. This is exact and costs nothing extra
  on either backend (on a TransformerBridge ``hook_pattern`` is a copy of the pattern; reading it is
  fine, only *editing* it is discarded).
* ``"qk"``: the row is recomputed from the hooked query of the prediction position and the hooked
  keys (post-rotary, grouped key/value heads expanded, local windows masked, the model's own score
  scale; see `icl_kernels.engine.hooks.attention_spec`). This is for models whose attention implementation
  does not fire ``hook_pattern``; it does a little extra work and agrees with ``"pattern"`` to float
  rounding.

Batches are right-padded (package convention), so a row's real tokens never see its pads; each row
has its own prediction position. Keys after a row's prediction position get weight exactly 0.

The forward pass stops at the unembedding input (`icl_kernels.engine.hooks.STOP_HOOK`, after the
final residual of the prediction positions has been kept): the unembedding, which for Gemma's 262k
vocabulary costs about as much as the rest of the model, is never computed for every position.
Label scores of the prediction positions are one `icl_kernels.engine.label_scoring.label_scores`
call away.

The package's one scorer of label words, `label_log_probs`, lives in
`icl_kernels.engine.label_scoring`; it and its helpers (`unembed`, `final_residual`,
`check_finite`, `NonFiniteLogitsError`) are also importable from here, where they used to live.

All hooks live inside `icl_kernels.engine.hooks.run_until` and are removed on exit, also when a hook or
the model raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_kernels.engine.hooks import (
    STOP_HOOK,
    act_name,
    apply_rotary,
    attention_spec,
    repeat_kv,
    rotary_hook_kinds,
    run_until,
)
from icl_kernels.models import backend as tl_backend

__all__ = ["Capture", "capture", "FEATURE_KINDS", "ATTENTION_METHODS", "nbytes"]

#: Activations that can be captured at chosen positions. ``q``/``k`` are post-rotary when
#: ``rotate=True`` (the vectors whose dot product is the attention score), pre-rotary otherwise.
FEATURE_KINDS = ("q", "k", "v", "z", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
ATTENTION_METHODS = ("pattern", "qk")


@dataclass
class Capture:
    """What one forward pass kept.

    Attributes:
        attention: softmaxed attention of each row's prediction position to every key position, for
            the captured layers (in ``layers`` order) and every head; 0 after the prediction position.
        layers: the captured layers.
        prediction_positions: the query position of each row.
        feature_positions: positions where ``features`` were taken; -1 marks padding (its features
            are 0).
        features: ``kind -> [batch n_pos layer ...]``: ``[... head_index d_head]`` for q/z,
            ``[... kv_head d_head]`` for k/v (grouped heads are not expanded), ``[... d_model]`` for
            residual-stream kinds.
        query_features: the same kinds at the prediction position, ``[batch layer ...]``.
        final_residual: input of the unembedding at the prediction position, ``[batch d_model]``.
    """

    attention: Float[Tensor, "batch layer head_index key_pos"] | None
    layers: tuple[int, ...]
    prediction_positions: Int[Tensor, " batch"]
    feature_positions: Int[Tensor, "batch n_pos"] | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    query_features: dict[str, Tensor] = field(default_factory=dict)
    final_residual: Float[Tensor, "batch d_model"] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the captured tensors (what a dataset of captures costs)."""
        tensors = [self.attention, self.final_residual, *self.features.values(), *self.query_features.values()]
        return sum(nbytes(t) for t in tensors if t is not None)


def nbytes(tensor: Tensor) -> int:
    """Bytes of a tensor's own elements (not of a larger storage it may view)."""
    return tensor.numel() * tensor.element_size()


def _check_positions(
    tokens: Tensor, prediction_positions: Tensor, feature_positions: Tensor | None
) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}.")
    batch, width = tokens.shape
    if prediction_positions.shape != (batch,):
        raise ValueError(
            f"prediction_positions must have one entry per batch row ({batch}), got shape "
            f"{tuple(prediction_positions.shape)}."
        )
    if len(prediction_positions) and (prediction_positions.min() < 0 or prediction_positions.max() >= width):
        raise ValueError(
            f"prediction_positions must lie in [0, {width - 1}] (the batch is {width} tokens wide); got "
            f"{prediction_positions.tolist()}."
        )
    if feature_positions is not None:
        if feature_positions.ndim != 2 or feature_positions.shape[0] != batch:
            raise ValueError(
                f"feature_positions must be [batch={batch}, n_pos] with -1 for padding, got shape "
                f"{tuple(feature_positions.shape)}."
            )
        bad = (feature_positions < -1) | (feature_positions >= width)
        if bad.any():
            raise ValueError(
                f"feature_positions must be -1 (padding) or in [0, {width - 1}]; got values "
                f"{sorted(set(feature_positions[bad].tolist()))[:5]}."
            )


def capture(
    model: tl_backend.Model,
    tokens: Int[Tensor, "batch pos"],
    prediction_positions: Int[Tensor, " batch"],
    *,
    attention: bool = True,
    method: str = "pattern",
    layers: Sequence[int] | None = None,
    features: Sequence[str] = (),
    feature_positions: Int[Tensor, "batch n_pos"] | None = None,
    rotate: bool = True,
    final_residual: bool = True,
    out_device: str | torch.device | None = "cpu",
) -> Capture:
    """Run ``model`` on right-padded ``tokens`` once and keep prediction-row attention and features.

    Args:
        model: a HookedTransformer or TransformerBridge.
        tokens: right-padded token ids.
        prediction_positions: the query position of each row (the last real token).
        attention: keep the attention rows.
        method: ``"pattern"`` (slice ``hook_pattern``) or ``"qk"`` (recompute from hooked q, k).
        layers: layers to capture (default: all).
        features: activation kinds (`FEATURE_KINDS`) to keep at ``feature_positions`` and at the
            prediction position.
        feature_positions: ``[batch, n_pos]`` positions, -1 for none.
        rotate: q/k features after the model's rotary embedding (so that q.k/scale is the score).
        final_residual: keep the unembedding input at the prediction positions.
        out_device: where the captured tensors go (default CPU; ``None`` keeps the model's device).

    Returns:
        A `Capture`.

    Raises:
        ValueError: bad positions, unknown feature kind or method.
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"method must be one of {ATTENTION_METHODS}, not {method!r}.")
    unknown = [kind for kind in features if kind not in FEATURE_KINDS]
    if unknown:
        raise ValueError(f"Unknown feature kind(s) {unknown}; choose from {FEATURE_KINDS}.")
    if features and feature_positions is None:
        feature_positions = torch.full((tokens.shape[0], 0), -1, dtype=torch.long)
    device = tl_backend.model_device(model)
    tokens = tokens.to(device)
    prediction_positions = prediction_positions.to(device).long()
    if feature_positions is not None:
        feature_positions = feature_positions.to(device).long()
    _check_positions(tokens, prediction_positions, feature_positions)
    n_layers = model.cfg.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(layer) for layer in layers)
    bad_layers = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad_layers:
        raise ValueError(f"Layers {bad_layers} do not exist; the model has {n_layers} layers.")
    out = torch.device(out_device) if out_device is not None else device
    batch, width = tokens.shape
    rows = torch.arange(batch, device=device)

    store: dict[tuple[str, int], Tensor] = {}
    pending: dict[tuple[str, int], Tensor] = {}  # full post-rotary q/k for method "qk"
    kept: dict[str, Tensor] = {}
    hooks = []

    # Which hooks hold the q and k that scores are made of, and do they still need rotating?
    rot_kinds = rotary_hook_kinds(model) if (method == "qk" or (rotate and {"q", "k"} & set(features))) else ("q", "k")
    need_rotary = rot_kinds == ("q", "k")

    def rotated(tensor: Tensor, layer: int) -> Tensor:
        if not need_rotary:
            return tensor
        return apply_rotary(tensor, attention_spec(model, layer))

    def gather(tensor: Tensor) -> tuple[Tensor, Tensor]:
        """(values at feature positions [batch n_pos ...], values at the prediction position)."""
        safe = feature_positions.clamp(min=0)
        at = tensor[rows[:, None], safe]
        at = at.masked_fill((feature_positions < 0).view(*feature_positions.shape, *([1] * (at.ndim - 2))), 0)
        return at, tensor[rows, prediction_positions]

    def keep_feature(kind: str, layer: int):
        def hook(tensor: Tensor, hook) -> None:
            value = tensor.detach()
            if kind in ("q", "k") and rotate:
                value = rotated(value, layer)
            store[(kind, layer)], store[("query_" + kind, layer)] = gather(value)

        return hook

    def keep_row(layer: int):
        def hook(pattern: Tensor, hook) -> None:
            store[("attention", layer)] = pattern.detach()[rows, :, prediction_positions]

        return hook

    def keep_qk(kind: str, layer: int):
        def hook(tensor: Tensor, hook) -> None:
            pending[(kind, layer)] = rotated(tensor.detach(), layer)
            if ("q", layer) in pending and ("k", layer) in pending:
                spec = attention_spec(model, layer)
                q = pending.pop(("q", layer))[rows, prediction_positions]  # [batch head d_head]
                k = repeat_kv(pending.pop(("k", layer)), spec.group_size)  # [batch key head d_head]
                compute = torch.float64 if q.dtype == torch.float64 else torch.float32
                scores = torch.einsum("bhd,bkhd->bhk", q.to(compute), k.to(compute)) / spec.scale
                keys = torch.arange(width, device=device)[None, :]
                visible = keys <= prediction_positions[:, None]
                if spec.window is not None:
                    visible &= keys > prediction_positions[:, None] - spec.window
                scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
                store[("attention", layer)] = scores.softmax(-1).to(tensor.dtype)

        return hook

    def keep_final(tensor: Tensor, hook) -> None:
        if final_residual:
            kept["final"] = tensor.detach()[rows, prediction_positions]

    for layer in layers:
        if attention and method == "pattern":
            hooks.append((act_name("pattern", layer), keep_row(layer)))
        if attention and method == "qk":
            hooks.append((act_name(rot_kinds[0], layer), keep_qk("q", layer)))
            hooks.append((act_name(rot_kinds[1], layer), keep_qk("k", layer)))
        for kind in features:
            hook_kind = kind
            if kind in ("q", "k") and rotate:
                hook_kind = rot_kinds[0] if kind == "q" else rot_kinds[1]
            hooks.append((act_name(hook_kind, layer), keep_feature(kind, layer)))
    hooks.append((STOP_HOOK, keep_final))

    try:
        with torch.no_grad():
            run_until(model, tokens, hooks)
    finally:
        pending.clear()
    if "final" not in kept and final_residual:
        raise RuntimeError(f"{STOP_HOOK} did not fire; the forward pass did not reach the unembedding.")

    def stack(kind: str, dim: int) -> Tensor:
        missing = [layer for layer in layers if (kind, layer) not in store]
        if missing:
            raise RuntimeError(f"Hook for {kind!r} did not fire on layers {missing}.")
        return torch.stack([store[(kind, layer)] for layer in layers], dim=dim).to(out)

    result = Capture(
        attention=stack("attention", 1) if attention else None,
        layers=layers,
        prediction_positions=prediction_positions.to(out),
        feature_positions=feature_positions.to(out) if feature_positions is not None else None,
        final_residual=kept["final"].to(out) if final_residual else None,
    )
    for kind in features:
        result.features[kind] = stack(kind, 2)
        result.query_features[kind] = stack("query_" + kind, 1)
    return result
