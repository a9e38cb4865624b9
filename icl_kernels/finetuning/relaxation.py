"""Linear relaxation of attention, and the split of its output into W_ZSL and dW_ICL (Dai et al.).

Dai et al. read in-context learning as implicit finetuning by relaxing attention to a linear map:
drop the softmax and the 1/scale factor, so that the output of a head at query position ``p`` is

    z_p = sum_j (q_p . k_j) v_j = (sum_j v_j k_j^T) q_p

over the keys ``j`` that ``p`` may see. Splitting the keys into the query's own tokens (BOS and the
query input: the zero-shot prompt) and the demonstration tokens gives

    z_p = (W_ZSL + dW_ICL) q_p,   W_ZSL = sum_{j in query} v_j k_j^T,   dW_ICL = sum_{j in demos} v_j k_j^T,

the "meta-gradient" dW_ICL that the demonstrations add to the zero-shot map. Both are ``d_head x
d_head`` per head: we never form the ``d_model x d_model`` products ``W_V X X^T W_K^T`` because the
hooked keys and values already are ``W_K x`` and ``W_V x``.

Architectures, handled from the hooked tensors (`icl_kernels.engine.hooks`):

* q, k are the post-rotary vectors whose dot product is the score (GPT-J, Llama, Gemma rotate them;
  `hooks.rotated_qk` covers backends that do not fire ``hook_rot_q/k``).
* Rotary frame. The score of ``p`` with ``j`` is ``q_p^rot . k_j^rot``. Rotating both by ``-p``
  (an orthogonal map) leaves every score unchanged and puts the query in a frame that does not
  depend on where the prompt places it: ``q~ = R(-p) q_p^rot`` is the query's content vector and
  ``k~_j = R(-p) k_j^rot = R(j - p) k_j`` carries the relative position. W_ZSL and dW_ICL are built
  from ``k~``, so the matrices of a zero-shot prompt and of a k-shot prompt act on the same kind of
  vector and can be compared. Without rotary (GPT-Neo) ``k~ = k`` and ``q~ = q``.
* Masks: causal, and GPT-Neo / Gemma-3 local layers see only keys ``p - window < j <= p``. A
  demonstration token outside the window contributes nothing to dW_ICL.
* Grouped key/value heads (Gemma, Llama): a query head uses its group's key/value head, so the
  matrices are computed per key/value head and repeated to the query heads.

The relaxed model itself is a list of `icl_kernels.engine.patching.Edit`s at ``hook_z``
(`relaxed_attention_edits`, for `icl_kernels.engine.patching.run_with_edits`; `relaxed_attention` is the
same edits as a context manager): each chosen layer's ``z`` is replaced by the relaxed output
computed from that forward pass's own q, k, v. The identity ``relaxed z_p == (W_ZSL + dW_ICL) q~_p``
is the test that the decomposition is right.

`dual_form_toy` reproduces the paper's toy argument exactly: one SGD pass of a linear layer on
inputs ``x'_i`` changes its output on ``q`` by ``sum_i e_i (x'_i . q)``, i.e. by linear attention
with keys ``x'_i`` and values the error signals ``e_i = -lr * dL/dy_i``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.engine.hooks import (
    AttentionSpec,
    attention_spec,
    repeat_kv,
    rotary_hook_kinds,
    rotate_by,
    rotated_qk,
    visibility_mask,
)
from icl_kernels.engine.patching import Edit, EditContext, check_positions, edits_on
from icl_kernels.models import backend as tl_backend

__all__ = [
    "linear_attention",
    "relaxed_z",
    "relaxed_attention_edits",
    "relaxed_attention",
    "Decomposition",
    "decompose",
    "spectrum",
    "stable_rank",
    "DualFormToy",
    "dual_form_toy",
]


def linear_attention(
    q: Float[Tensor, "batch query_pos head_index d_head"],
    k: Float[Tensor, "batch key_pos head_index d_head"],
    v: Float[Tensor, "batch key_pos head_index d_value"],
    visible: Bool[Tensor, "query_pos key_pos"] | None = None,
) -> Float[Tensor, "batch query_pos head_index d_value"]:
    """Attention without softmax or scale: ``z_p = sum_{j visible} (q_p . k_j) v_j``."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    if visible is not None:
        scores = scores * visible.to(scores.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", scores, v)


def relaxed_z(
    q: Float[Tensor, "batch pos head_index d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
    v: Float[Tensor, "batch pos kv_head d_head"],
    spec: AttentionSpec,
) -> Float[Tensor, "batch pos head_index d_head"]:
    """The relaxed output of one layer at every position from post-rotary q, k and v."""
    visible = visibility_mask(q.shape[1], k.shape[1], spec.window, q.device)
    return linear_attention(q, repeat_kv(k, spec.group_size), repeat_kv(v, spec.group_size), visible)


def relaxed_attention_edits(
    model: tl_backend.Model,
    layers: Iterable[int] | None = None,
    positions: str = "all",
    *,
    record: dict | None = None,
) -> list[Edit]:
    """Edits that replace the chosen layers' (default all) ``hook_z`` by relaxed linear attention,
    ``z_p = sum_j (q_p . k_j) v_j = (W_ZSL + dW_ICL) q_p`` (`relaxed_z`), from the same pass's q, k,
    v (post-rotary q, k; local windows; grouped key/value heads), so upstream relaxed layers feed
    downstream ones. With ``positions="prediction"`` only the prediction position's output is
    replaced (under `icl_kernels.engine.patching.run_with_edits`). ``record``, if given, receives
    ``(kind, layer) -> tensor`` for ``q`` and ``k`` (post-rotary), ``v`` and ``z`` (the relaxed
    output), detached.
    """
    check_positions(positions)
    n_layers = model.cfg.n_layers
    chosen = list(range(n_layers)) if layers is None else sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"Layers {bad} do not exist; the model has {n_layers} layers.")
    q_kind, k_kind = rotary_hook_kinds(model)
    edits = []
    for layer in chosen:
        spec = attention_spec(model, layer)

        def replace(z: Tensor, context: EditContext, layer=layer, spec=spec) -> Tensor:
            acts = context.activations
            q, k = rotated_qk(model, layer, acts[q_kind], acts[k_kind])
            v = acts["v"]
            new = relaxed_z(q, k, v, spec).to(z.dtype)
            if record is not None:
                for kind, tensor in (("q", q), ("k", k), ("v", v), ("z", new)):
                    record[(kind, layer)] = tensor.detach()
            if positions == "all":
                return new
            rows = torch.arange(z.shape[0], device=z.device)
            pred = context.predictions(z.device)
            z = z.clone()
            z[rows, pred] = new[rows, pred]
            return z

        edits.append(Edit(layer, replace, "z", f"relaxed L{layer}", reads=(q_kind, k_kind, "v")))
    return edits


@contextlib.contextmanager
def relaxed_attention(
    model: tl_backend.Model, layers: Iterable[int] | None = None, record: dict | None = None
) -> Iterator[tl_backend.Model]:
    """Within the block, the chosen layers' ``hook_z`` is replaced by the relaxed (linear) attention:
    `icl_kernels.engine.patching.edits_on` with `relaxed_attention_edits` (``record`` as there). Hooks are
    removed on exit, also on error.
    """
    with edits_on(model, relaxed_attention_edits(model, layers, record=record)):
        yield model


@dataclass
class Decomposition:
    """``z_p = (W_ZSL + dW_ICL) q~`` for one layer at one position per batch row (see module doc).

    Attributes:
        w_zsl: the map contributed by the query's own tokens (BOS and query input).
        dw_icl: the map contributed by the demonstration tokens.
        q: the query vector in the position-free frame, ``R(-p) q_p``.
        n_demo_visible: demonstration tokens the position can see (local windows hide some).
    """

    w_zsl: Float[Tensor, "batch head_index d_head d_head"]
    dw_icl: Float[Tensor, "batch head_index d_head d_head"]
    q: Float[Tensor, "batch head_index d_head"]
    n_demo_visible: Int[Tensor, " batch"]

    def output(self) -> Float[Tensor, "batch head_index d_head"]:
        """``(W_ZSL + dW_ICL) q``: the relaxed attention output at the position."""
        return torch.einsum("bhde,bhe->bhd", self.w_zsl + self.dw_icl, self.q)

    def zsl_output(self) -> Float[Tensor, "batch head_index d_head"]:
        return torch.einsum("bhde,bhe->bhd", self.w_zsl, self.q)


def frame_keys(
    k: Float[Tensor, "batch pos kv_head d_head"], spec: AttentionSpec, positions: Int[Tensor, " batch"]
) -> Float[Tensor, "batch pos kv_head d_head"]:
    """Post-rotary keys rotated by ``-p`` (``p`` one position per row): ``R(j - p) k_j``."""
    offsets = -positions.to(k.device)[:, None].expand(k.shape[0], k.shape[1])
    return rotate_by(k, spec, offsets)


def decompose(
    q: Float[Tensor, "batch pos head_index d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
    v: Float[Tensor, "batch pos kv_head d_head"],
    spec: AttentionSpec,
    positions: Int[Tensor, " batch"],
    demo_mask: Bool[Tensor, "batch pos"],
) -> Decomposition:
    """W_ZSL and dW_ICL of one layer at ``positions`` (one per row) from post-rotary q, k and v.

    ``demo_mask`` marks the demonstration tokens; every other visible key (BOS, the query's own
    tokens) belongs to W_ZSL. Computed per key/value head in ``d_head x d_head`` form.
    """
    batch, width = k.shape[:2]
    if positions.shape != (batch,) or demo_mask.shape != (batch, width):
        raise ValueError(
            f"positions must be [batch={batch}] and demo_mask [batch={batch}, pos={width}]; got "
            f"{tuple(positions.shape)} and {tuple(demo_mask.shape)}."
        )
    if positions.min() < 0 or positions.max() >= width:
        raise ValueError(f"positions must lie in [0, {width - 1}], got {positions.tolist()}.")
    device = k.device
    positions = positions.to(device).long()
    rows = torch.arange(batch, device=device)
    keys = torch.arange(width, device=device)[None, :]
    visible = keys <= positions[:, None]
    if spec.window is not None:
        visible &= keys > positions[:, None] - spec.window
    demo_mask = demo_mask.to(device)
    k_frame = frame_keys(k, spec, positions)
    q_frame = rotate_by(q[rows, positions], spec, -positions)  # [batch head d]

    def outer(mask: Tensor) -> Tensor:
        weights = mask.to(v.dtype)
        per_kv = torch.einsum("bj,bjgd,bjge->bgde", weights, v, k_frame)
        return per_kv.repeat_interleave(spec.group_size, dim=1) if spec.group_size > 1 else per_kv

    w_zsl = outer(visible & ~demo_mask)
    dw_icl = outer(visible & demo_mask)
    return Decomposition(w_zsl, dw_icl, q_frame, (visible & demo_mask).sum(-1))


def spectrum(w: Float[Tensor, "... d_head d_head"]) -> Float[Tensor, "... d_head"]:
    """Singular values, largest first."""
    return torch.linalg.svdvals(w.double() if w.dtype != torch.float64 else w)


def stable_rank(w: Float[Tensor, "... d_head d_head"]) -> Float[Tensor, "..."]:
    """``||W||_F^2 / ||W||_2^2``: how many directions carry the update (1 for rank one)."""
    s = spectrum(w)
    return (s.square().sum(-1) / s[..., 0].square().clamp_min(1e-300)).to(w.dtype)


@dataclass
class DualFormToy:
    """Outputs of the dual-form toy: finetuned linear layer vs linear attention over its training inputs."""

    finetuned: Float[Tensor, "n_query d_out"]
    attention: Float[Tensor, "n_query d_out"]
    delta_w: Float[Tensor, "d_out d_in"]
    error_signals: Float[Tensor, "n_demo d_out"]

    @property
    def max_abs_difference(self) -> float:
        return float((self.finetuned - self.attention).abs().max())


def dual_form_toy(
    d_in: int = 6, d_out: int = 4, n_demos: int = 5, n_queries: int = 3, lr: float | int = 0.1, seed: int = 0
) -> DualFormToy:
    """A linear layer ``W`` trained by SGD (batch 1, one epoch) vs ``W0 q + LinearAttn(q; K=X', V=E)``.

    Each step on demonstration ``x'_t`` (squared error to a random target) changes ``W`` by
    ``e_t x'_t^T`` with ``e_t = -lr dL/dy_t`` evaluated at the current ``W``; summed, the update acts
    on a query as linear attention with keys ``x'_t`` and values ``e_t``. float64 throughout.
    """
    if min(d_in, d_out, n_demos, n_queries) < 1 or lr <= 0:
        raise ValueError("dual_form_toy needs positive sizes and lr > 0.")
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    demos = torch.randn(n_demos, d_in, generator=gen, dtype=torch.float64)
    targets = torch.randn(n_demos, d_out, generator=gen, dtype=torch.float64)
    queries = torch.randn(n_queries, d_in, generator=gen, dtype=torch.float64)
    layer = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w0)
    optimiser = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    errors = []
    for x, t in zip(demos, targets):
        optimiser.zero_grad()
        y = layer(x)
        y.retain_grad()
        loss = 0.5 * (y - t).square().sum()
        loss.backward()
        errors.append(-lr * y.grad.detach().clone())
        optimiser.step()
    error_signals = torch.stack(errors)
    with torch.no_grad():
        finetuned = layer(queries)
    # linear attention: one head, query positions after all demonstration keys
    attn = linear_attention(queries[None, :, None], demos[None, :, None], error_signals[None, :, None])[0, :, 0]
    return DualFormToy(
        finetuned=finetuned,
        attention=queries @ w0.T + attn,
        delta_w=(layer.weight.detach() - w0),
        error_signals=error_signals,
    )
