"""One prompt through one model, recorded for the ICL-vs-finetuning comparison (`icl_kernels.finetuning.dai_metrics`).

The comparison reads every run (ZSL, ICL, FT) at one *recording position* of a prompt:

* ``"prediction"``: the last prompt token, whose next-token distribution is the prediction (the
  default);
* ``"first-label"``: the first token of the first class's label word appended after the prompt
  (what Dai et al.'s code recorded). `recording_tokens` appends it.

Predictions always come from the prediction position (the first token of each label word).

`record` runs the prompt once, with hooks on the queries, keys, values and attention outputs of
every layer, and stops at the unembedding input (`icl_kernels.engine.label_scoring.final_residual`;
only the prediction position is unembedded, and its label log-probabilities are taken in float64 by
`icl_kernels.engine.label_scoring.label_scores`, which refuses NaN or infinite logits; the kept
tensors are then checked too, `check_recorded_finite`, so that NaN never reaches the comparison's
linear algebra). From the hooked tensors it keeps, at the recording position:
the attention-module output per layer, the pre-softmax (scaled) attention score row of every head
(recomputed from the post-rotary ``q`` and ``k``), and the query rotated back to the position-free
frame of `icl_kernels.finetuning.relaxation` (``R(-p) q_p``), where the finetuning side's recorded training
queries live. With ``with_kv`` it also keeps the full post-rotary ``q``, ``k`` and ``v`` of every
layer for the ``W_ZSL`` / ``dW_ICL`` split of `icl_kernels.finetuning.relaxation.decompose`.

Shared demonstrations (``prefix=``). The ICL prompts of one demonstration set share their tokens up
to the query: `encode_recording_prefix` runs that prefix once (`icl_kernels.engine.prefix_cache`),
keeping its keys and values for reuse and the hooked ``q``, ``k``, ``v`` of its positions; `record`
then runs only the query's suffix against it and joins the prefix's hooked tensors to the
suffix's, so that every kept tensor (score rows over all keys, full ``q``/``k``/``v`` for the
dW_ICL split) is the one the full prompt gives. Where a hook already sees prefix and suffix
(HookedTransformer's ``hook_rot_k`` rotates the whole cached key sequence) it is taken as it is.
Equal to the full forward to 1e-10 in float64 on tiny models of every architecture and backend
(``tests/unit/test_recording_prefix.py``), except where the bridge's Hugging Face attention rounds
to float32 in a float64 model (equal there to 1e-5): GPT-Neo and GPT-J compute their scores in
float32, and Llama's and Gemma's eager attention takes its softmax in float32, whose sums over a row
of the prefix pass (as long as the prefix) and of a full pass (as long as the prompt) round
differently for the prefix's own positions (a whole llama comparison moved by 8.6e-9; by 0 with a
float64 softmax); float32 differs by rounding (matrix shapes differ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.hooks import (
    act_name,
    attention_scores,
    attention_spec,
    rotary_hook_kinds,
    rotate_by,
    rotated_qk,
)
from icl_kernels.engine.label_scoring import final_residual, label_scores
from icl_kernels.engine.prefix_cache import SharedPrefix, encode_prefix, reuse_reason
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import NonFiniteActivationsError, NonFiniteLogitsError

__all__ = [
    "POSITIONS",
    "Record",
    "RecordingPrefix",
    "check_recorded_finite",
    "encode_recording_prefix",
    "record",
    "recording_tokens",
]

#: Recording positions (see the module docstring).
POSITIONS = ("prediction", "first-label")


def recording_tokens(prompt: IclPrompt, position: str, first_label: int) -> tuple[list[int], int, int]:
    """(tokens, prediction position, recording position) of a prompt for a recording-position option."""
    tokens = list(prompt.tokens)
    prediction = len(tokens) - 1
    if position == "prediction":
        return tokens, prediction, prediction
    return tokens + [first_label], prediction, len(tokens)


@dataclass
class Record:
    """What a comparison needs from one prompt through one model (batch of one).

    ``scores`` are the pre-softmax (scaled) scores of the recording position, ``-inf`` where
    masked; ``q`` the recording position's query in the rotary-free frame; ``q_full``, ``k``, ``v``
    (post-rotary, every position) are kept when ``with_kv`` for the W_ZSL / dW_ICL split.
    """

    label_log_probs: Float[Tensor, " n_classes"]
    attn_out: Float[Tensor, "layer d_model"]
    scores: Float[Tensor, "layer head_index key_pos"]
    q: Float[Tensor, "layer head_index d_head"]
    prediction_position: int
    recording_position: int
    q_full: list[Tensor] | None = None
    k: list[Tensor] | None = None
    v: list[Tensor] | None = None

    @property
    def pattern(self) -> Float[Tensor, "layer head_index key_pos"]:
        return self.scores.softmax(-1)


def check_recorded_finite(
    tensors: Mapping[str, Sequence[Tensor]], *, what: str = "the prompt", model: tl_backend.Model | None = None
) -> None:
    """Raise `NonFiniteActivationsError` if a recorded tensor holds NaN or inf.

    ``tensors``: name (``"keys"``, ``"attention scores"`` ...) -> one tensor per layer. Attention
    scores are ``-inf`` where masked, so there only NaN and ``+inf`` count. The message names
    ``what`` (the run), the first layer and tensor found, the dtype and what to try.
    """
    for name, per_layer in tensors.items():
        for layer, tensor in enumerate(per_layer):
            bad = tensor.isnan() | (tensor == float("inf")) if name == "attention scores" else ~tensor.isfinite()
            if not bool(bad.any()):
                continue
            kind = "NaN" if bool(tensor.isnan().any()) else "infinite"
            dtype = tl_backend.model_dtype(model) if model is not None else tensor.dtype
            dtype_name = str(dtype).removeprefix("torch.")
            hint = ("Rerun with --dtype float32 (float16 and bfloat16 overflow easily)."
                    if dtype in (torch.float16, torch.bfloat16) else
                    "Look for NaN or inf in the model's weights, or a learning rate so large that finetuning diverged.")
            raise NonFiniteActivationsError(
                f"{kind} {name} in layer {layer} of {what} in {dtype_name} (the prediction logits are finite); "
                f"the comparison cannot use them. {hint}"
            )


@dataclass
class RecordingPrefix:
    """Demonstration tokens run once for `record`: their keys and values for reuse
    (`icl_kernels.engine.prefix_cache.SharedPrefix`) and the hooked ``q``, ``k``, ``v`` of their
    positions, ``(kind, layer) -> [1, prefix_pos, head, d_head]``."""

    shared: SharedPrefix
    acts: dict[tuple[str, int], Tensor]

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.shared.tokens

    def __len__(self) -> int:
        return len(self.shared)


def _qkv_hooks(model: tl_backend.Model, store: dict[tuple[str, int], Tensor], attn_out: bool) -> list:
    """Hooks keeping ``q``, ``k`` (at the hooks `rotary_hook_kinds` names), ``v`` and optionally
    ``attn_out`` of every layer in ``store``, detached."""
    q_kind, k_kind = rotary_hook_kinds(model)

    def keep(kind: str, layer: int):
        def hook(tensor: Tensor, hook) -> None:
            store[(kind, layer)] = tensor.detach()

        return hook

    hooks = []
    for layer in range(model.cfg.n_layers):
        hooks += [
            (act_name(q_kind, layer), keep("q", layer)),
            (act_name(k_kind, layer), keep("k", layer)),
            (act_name("v", layer), keep("v", layer)),
        ]
        if attn_out:
            hooks.append((act_name("attn_out", layer), keep("attn_out", layer)))
    return hooks


def encode_recording_prefix(model: tl_backend.Model, tokens: Sequence[int]) -> RecordingPrefix:
    """Run the shared ``tokens`` (BOS and the demonstrations) once for `record` (module docstring).

    Raises:
        ValueError: prefix reuse cannot be exact for this model (`icl_kernels.engine.prefix_cache.reuse_reason`).
    """
    reason = reuse_reason(model, len(tokens))
    if reason is not None:
        raise ValueError(f"Cannot reuse a shared prefix: {reason}.")
    acts: dict[tuple[str, int], Tensor] = {}
    shared = encode_prefix(model, tokens, _qkv_hooks(model, acts, attn_out=False))
    return RecordingPrefix(shared, acts)


def _joined(prefix: RecordingPrefix | None, kept: Tensor, key: tuple[str, int], width: int) -> Tensor:
    """A hooked tensor over all ``width`` positions: as it is when the hook saw them all, else the
    prefix's positions before the suffix's."""
    if prefix is None or kept.shape[1] == width:
        return kept
    joined = torch.cat([prefix.acts[key].to(kept.device), kept], dim=1)
    if joined.shape[1] != width:
        raise RuntimeError(f"Hook {key} saw {kept.shape[1]} suffix positions after a prefix of {len(prefix)}; "
                           f"the prompt has {width}.")
    return joined


def record(
    model: tl_backend.Model,
    tokens: Sequence[int],
    prediction_position: int,
    recording_position: int,
    label_tokens: Sequence[int],
    *,
    with_kv: bool = False,
    what: str = "the prompt",
    prefix: RecordingPrefix | None = None,
) -> Record:
    """Run one prompt and keep attention outputs, score rows and queries at the recording position.

    ``what`` names the run in errors: NaN or infinite logits raise `NonFiniteLogitsError`, NaN or
    infinite kept tensors `NonFiniteActivationsError` (`check_recorded_finite`). With ``prefix``
    (`encode_recording_prefix` of the prompt's first tokens) only the rest of the prompt is run;
    the record is the same (module docstring).
    """
    width = len(tokens)
    if not (0 <= prediction_position < width and 0 <= recording_position < width):
        raise ValueError(
            f"Positions {prediction_position}, {recording_position} outside a prompt of {width} tokens."
        )
    n_prefix = 0 if prefix is None else len(prefix)
    if prefix is not None and (tuple(int(t) for t in tokens[:n_prefix]) != prefix.tokens
                               or min(prediction_position, recording_position) < n_prefix):
        raise ValueError(
            f"The shared prefix ({n_prefix} tokens) is not the start of this {width}-token prompt, or the "
            f"prediction/recording position ({prediction_position}, {recording_position}) lies inside it."
        )
    device = tl_backend.model_device(model)
    n_layers = model.cfg.n_layers
    kept: dict[tuple[str, int], Tensor] = {}
    hooks = _qkv_hooks(model, kept, attn_out=True)
    ids = torch.tensor([list(tokens)[n_prefix:]], dtype=torch.long, device=device)
    try:
        with torch.no_grad():  # stops at the unembedding input: no logits for every position
            final = final_residual(model, ids, torch.tensor([prediction_position - n_prefix]), hooks=hooks,
                                   prefix=None if prefix is None else prefix.shared)
            try:
                log_probs = label_scores(model, final, label_tokens, dtype=torch.float64)[0]
            except NonFiniteLogitsError as error:
                raise NonFiniteLogitsError(f"{what}: {error}") from None
        p = recording_position
        attn_out, scores, queries = [], [], []
        q_full, k_full, v_full = [], [], []
        for layer in range(n_layers):
            spec = attention_spec(model, layer)
            q, k = rotated_qk(model, layer, _joined(prefix, kept.pop(("q", layer)), ("q", layer), width),
                              _joined(prefix, kept.pop(("k", layer)), ("k", layer), width))
            v = _joined(prefix, kept.pop(("v", layer)), ("v", layer), width)
            attn_out.append(kept.pop(("attn_out", layer))[0, p - n_prefix])
            compute = torch.float64 if q.dtype == torch.float64 else torch.float32
            row = attention_scores(q[:, p : p + 1].to(compute), k.to(compute), spec, query_offset=p)
            scores.append(row[0, :, 0])
            queries.append(rotate_by(q[0, p], spec, -p))
            if with_kv:
                q_full.append(q[0])
                k_full.append(k[0])
                v_full.append(v[0])
    finally:
        kept.clear()
    kept_tensors = {"queries": q_full, "keys": k_full, "values": v_full} if with_kv else {"queries": queries}
    kept_tensors.update({"attention scores": scores, "attention outputs": attn_out})
    check_recorded_finite(kept_tensors, what=what, model=model)
    return Record(
        label_log_probs=log_probs,
        attn_out=torch.stack(attn_out).cpu(),
        scores=torch.stack(scores).cpu(),
        q=torch.stack(queries).cpu(),
        prediction_position=prediction_position,
        recording_position=recording_position,
        q_full=[t.cpu() for t in q_full] if with_kv else None,
        k=[t.cpu() for t in k_full] if with_kv else None,
        v=[t.cpu() for t in v_full] if with_kv else None,
    )
